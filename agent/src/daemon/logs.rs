//! `logs`: the container's output from `container.log`, optionally followed until it ends.

use super::Agent;
use crate::api::frame::{write_frame, FrameError};
use crate::api::{ApiError, Response};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;
use tokio::sync::broadcast;

/// The largest piece of log sent in one frame.
const CHUNK: usize = 64 << 10;
/// How often a followed log is checked for new data.
const POLL: Duration = Duration::from_millis(100);

/// Streams the log as `LogData` frames and a final `LogEnd` (or one `Error`).
pub(super) async fn stream(
    agent: &Arc<Agent>,
    out: &mut UnixStream,
    container: &str,
    follow: bool,
    shutdown: &mut broadcast::Receiver<()>,
) -> Result<(), FrameError> {
    let id = match agent.resolve(container) {
        Ok(id) => id,
        Err(e) => return write_frame(out, &Response::Error(e)).await,
    };
    let path = agent.dirs.container(&id).log();
    let mut file = None;
    let mut buf = vec![0u8; CHUNK];
    // Bytes of an incomplete UTF-8 sequence carried to the next read.
    let mut carry: Vec<u8> = Vec::new();
    loop {
        if file.is_none() {
            file = tokio::fs::File::open(&path).await.ok();
        }
        let n = match file.as_mut() {
            Some(f) => match f.read(&mut buf).await {
                Ok(n) => n,
                Err(e) => {
                    let err = ApiError::new(
                        crate::api::ErrorKind::Internal,
                        format!("reading the log: {e}"),
                    );
                    return write_frame(out, &Response::Error(err)).await;
                }
            },
            None => 0,
        };
        if n > 0 {
            carry.extend_from_slice(&buf[..n]);
            let valid = match std::str::from_utf8(&carry) {
                Ok(_) => carry.len(),
                Err(e) if e.error_len().is_none() => e.valid_up_to(),
                Err(_) => carry.len(),
            };
            let data = String::from_utf8_lossy(&carry[..valid]).into_owned();
            carry.drain(..valid);
            write_frame(out, &Response::LogData { data }).await?;
            continue;
        }
        // At the end of what is written so far.
        if !follow || !agent.is_live(&id) {
            // A live check that says "ended" is final: read once more to catch the last bytes.
            if follow && file.is_some() {
                let mut rest = Vec::new();
                if let Some(f) = file.as_mut() {
                    let _ = f.read_to_end(&mut rest).await;
                }
                carry.extend_from_slice(&rest);
            }
            if !carry.is_empty() {
                let data = String::from_utf8_lossy(&carry).into_owned();
                write_frame(out, &Response::LogData { data }).await?;
            }
            return write_frame(out, &Response::LogEnd).await;
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = shutdown.recv() => return write_frame(out, &Response::LogEnd).await,
        }
        agent.refresh(&id);
    }
}
