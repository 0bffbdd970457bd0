//! `mig run --bundle DIR`: an OCI runtime bundle on the agent's host (`mig_runtime::bundle` maps
//! its `config.json` and refuses what mig does not support). The rootfs is imported as the image
//! `bundle-<name>` (replaced on the next run of a bundle of that name), then the container runs
//! like any other: it can be checkpointed and moved.

use super::Agent;
use crate::api::{ApiError, ErrorKind, RunRequest};
use mig_runtime::bundle::Bundle;
use std::path::PathBuf;
use std::sync::Arc;

impl Agent {
    /// Loads the bundle at `dir` (absolute), imports its rootfs and rewrites `req` to run it:
    /// the bundle's args, env, hostname and limits, each unless the request sets it. The caller
    /// applies the returned bundle's `cwd`, `uid` and `gid` to the spec.
    pub(crate) async fn bundle_request(
        self: &Arc<Self>,
        dir: &str,
        req: &mut RunRequest,
    ) -> Result<Bundle, ApiError> {
        let invalid = |m: String| ApiError::new(ErrorKind::InvalidArgument, m);
        if !dir.starts_with('/') {
            return Err(invalid(format!("the bundle path must be absolute: {dir}")));
        }
        let path = PathBuf::from(dir);
        let bundle = tokio::task::spawn_blocking(move || Bundle::load(&path))
            .await
            .map_err(|e| ApiError::new(ErrorKind::Internal, format!("bundle task failed: {e}")))?
            .map_err(|e| invalid(format!("bundle {dir}: {}", chain(&e))))?;
        let base = req.name.clone().unwrap_or_else(|| {
            let n = std::path::Path::new(dir)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            n.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || "_.-".contains(c) {
                        c
                    } else {
                        '-'
                    }
                })
                .collect()
        });
        let image_name: String = format!("bundle-{base}").chars().take(63).collect();
        let rootfs = bundle.rootfs.to_string_lossy().into_owned();
        let image = self.image_import(rootfs, image_name).await?;
        let crate::api::Response::Image(image) = image else {
            return Err(ApiError::new(
                ErrorKind::Internal,
                "the bundle's rootfs import answered nothing".to_string(),
            ));
        };
        req.image = image.id;
        if req.args.is_empty() {
            req.args = bundle.args.clone();
        }
        let mut env = bundle.env.clone();
        env.append(&mut req.env);
        req.env = env;
        if req.hostname.is_none() {
            req.hostname = bundle.hostname.clone();
        }
        let l = &mut req.limits;
        l.memory = l.memory.or(bundle.limits.memory);
        l.cpu_millis = l.cpu_millis.or(bundle.limits.cpu_millis);
        l.pids = l.pids.or(bundle.limits.pids);
        Ok(bundle)
    }
}

fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
