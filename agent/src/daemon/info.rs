//! `info` and the image requests.

use super::Agent;
use crate::api::{ApiError, ErrorKind, HostInfo, ImageInfo, Response, API_VERSION};
use mig_runtime::image::{Image, ImageError};
use std::sync::Arc;
use std::time::Duration;

fn image_info(i: Image) -> ImageInfo {
    ImageInfo {
        name: i.name,
        id: i.id,
        layers: i.layers,
        created: i.created,
        size: i.size,
    }
}

fn image_error(e: ImageError) -> ApiError {
    let kind = match &e {
        ImageError::NotFound(_) => ErrorKind::NotFound,
        ImageError::Unimplemented => ErrorKind::Unavailable,
        #[allow(unreachable_patterns)]
        _ => ErrorKind::InvalidArgument,
    };
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    ApiError::new(kind, msg)
}

impl Agent {
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T, ImageError> + Send + 'static,
    ) -> Result<T, ApiError> {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| ApiError::new(ErrorKind::Internal, format!("image task failed: {e}")))?
            .map_err(image_error)
    }

    pub(crate) async fn image_import(
        self: &Arc<Self>,
        path: String,
        name: String,
    ) -> Result<Response, ApiError> {
        mig_runtime::spec::validate_name(&name)
            .map_err(|e| ApiError::new(ErrorKind::InvalidArgument, e.to_string()))?;
        if !path.starts_with('/') {
            return Err(ApiError::new(
                ErrorKind::InvalidArgument,
                format!("the image path must be absolute: {path}"),
            ));
        }
        let images = self.images.clone();
        let img = self
            .blocking(move || images.import(std::path::Path::new(&path), &name))
            .await?;
        tracing::info!(name = %img.name, id = %img.id, "image imported");
        Ok(Response::Image(image_info(img)))
    }

    pub(crate) async fn image_list(self: &Arc<Self>) -> Result<Response, ApiError> {
        let images = self.images.clone();
        let list = self.blocking(move || images.list()).await?;
        Ok(Response::Images(list.into_iter().map(image_info).collect()))
    }

    pub(crate) async fn image_remove(self: &Arc<Self>, key: String) -> Result<Response, ApiError> {
        let images = self.images.clone();
        let img = {
            let k = key.clone();
            self.blocking(move || images.get(&k)).await?
        };
        let used_by: Vec<String> = self
            .lock()
            .values()
            .filter(|e| e.spec.image.id == img.id)
            .map(|e| e.spec.name.clone())
            .collect();
        if !used_by.is_empty() {
            return Err(ApiError::new(
                ErrorKind::Conflict,
                format!(
                    "image {} is used by containers: {}",
                    img.name,
                    used_by.join(", ")
                ),
            ));
        }
        let images = self.images.clone();
        let removed = self.blocking(move || images.remove(&key)).await?;
        Ok(Response::Image(image_info(removed)))
    }

    pub(crate) async fn info(self: &Arc<Self>) -> HostInfo {
        let (running, total) = self.running_count();
        HostInfo {
            name: self.cfg.name.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            api_version: API_VERSION,
            criu_version: criu_version().await,
            kernel: nix::sys::utsname::uname()
                .map(|u| u.release().to_string_lossy().into_owned())
                .unwrap_or_default(),
            cpus: std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1),
            memory_bytes: mem_total().unwrap_or(0),
            state_dir: self.cfg.state_dir.display().to_string(),
            cgroup_parent: self.cfg.cgroup_parent.clone(),
            containers_running: running,
            containers_total: total,
        }
    }
}

/// `criu --version`'s "Version: X" line.
async fn criu_version() -> Option<String> {
    let out = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::process::Command::new("criu")
            .arg("--version")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .ok()?
    .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("Version:"))
        .map(|v| v.trim().to_owned())
}

/// MemTotal from /proc/meminfo, in bytes.
fn mem_total() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}
