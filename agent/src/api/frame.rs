//! Framing: a `u32` big-endian length, then that many bytes of JSON. The length is checked against
//! [`MAX_FRAME`] before anything is allocated.

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The largest frame either side accepts (16 MiB).
pub const MAX_FRAME: u32 = 16 << 20;

/// A framing failure.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection closed")]
    Closed,
    #[error("reading a frame failed")]
    Read(#[source] std::io::Error),
    #[error("writing a frame failed")]
    Write(#[source] std::io::Error),
    #[error("frame of {len} bytes exceeds the limit of {MAX_FRAME}")]
    TooLarge { len: u64 },
    #[error("frame is not valid JSON for {what}")]
    Decode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("encoding a frame failed")]
    Encode(#[source] serde_json::Error),
}

/// Reads one frame and decodes it as `T`. A clean end of stream before the length is [`FrameError::Closed`].
pub async fn read_frame<T, R>(r: &mut R) -> Result<T, FrameError>
where
    T: DeserializeOwned,
    R: AsyncRead + Unpin,
{
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(FrameError::Read(e)),
    }
    let mut buf = vec![0u8; body_len(len)?];
    r.read_exact(&mut buf).await.map_err(FrameError::Read)?;
    decode(&buf)
}

/// The body length a frame's 4-byte header gives, checked against [`MAX_FRAME`].
pub fn body_len(header: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header);
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge { len: len.into() });
    }
    Ok(len as usize)
}

/// Decodes a frame's body as `T`.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    serde_json::from_slice(body).map_err(|source| FrameError::Decode {
        what: std::any::type_name::<T>(),
        source,
    })
}

/// Encodes `value` and writes it as one frame, then flushes.
pub async fn write_frame<T, W>(w: &mut W, value: &T) -> Result<(), FrameError>
where
    T: Serialize,
    W: AsyncWrite + Unpin,
{
    let buf = serde_json::to_vec(value).map_err(FrameError::Encode)?;
    let len = buf.len() as u64;
    if len > u64::from(MAX_FRAME) {
        return Err(FrameError::TooLarge { len });
    }
    let mut out = Vec::with_capacity(4 + buf.len());
    out.extend_from_slice(&(len as u32).to_be_bytes());
    out.extend_from_slice(&buf);
    w.write_all(&out).await.map_err(FrameError::Write)?;
    w.flush().await.map_err(FrameError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Hello, Request};

    #[tokio::test]
    async fn round_trip_and_limits() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        write_frame(&mut a, &Hello::new("test")).await.unwrap();
        write_frame(&mut a, &Request::Info).await.unwrap();
        let h: Hello = read_frame(&mut b).await.unwrap();
        assert_eq!(h.api_version, crate::api::API_VERSION);
        let r: Request = read_frame(&mut b).await.unwrap();
        assert_eq!(r, Request::Info);
        drop(a);
        assert!(matches!(
            read_frame::<Request, _>(&mut b).await,
            Err(FrameError::Closed)
        ));
    }

    #[tokio::test]
    async fn oversized_length_is_refused_before_allocating() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        assert!(matches!(
            read_frame::<Request, _>(&mut b).await,
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[tokio::test]
    async fn garbage_is_a_decode_error() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&3u32.to_be_bytes()).await.unwrap();
        a.write_all(b"{x}").await.unwrap();
        assert!(matches!(
            read_frame::<Request, _>(&mut b).await,
            Err(FrameError::Decode { .. })
        ));
    }
}
