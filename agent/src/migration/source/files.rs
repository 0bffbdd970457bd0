//! The source's files besides the images: the writable layer (a tar at the presync, the delta
//! while frozen), the container's log in two parts, and its state record.

use super::{
    io, SourceError, SourceSide, LOG_FILE, LOG_PRESYNC_MINOR, LOG_TAIL_FILE, STATE_FILE,
    UPPER_DELTA_TAR, UPPER_TAR,
};
use mig_migrate::transport::OutgoingFile;
use mig_migrate::wire::FileKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

impl SourceSide {
    /// Archives the writable layer while the container runs and keeps the scan of it.
    pub(super) fn presync_upper(&self, tar: &Path) -> Result<(), SourceError> {
        // Mapped before the copy: written through the mapping since, with no trace in the times.
        let mapped = self.mapped_files();
        let mut scan = write_file(tar, true, |w| {
            mig_migrate::archive::write_layer_tar_scanned(&self.upper(), w)
        })?;
        self.forget_mapped(&mut scan, &mapped);
        let size = std::fs::metadata(tar).map(|m| m.len()).unwrap_or(0);
        self.upper_sync.presync_bytes.store(size, Ordering::Relaxed);
        *self
            .upper_sync
            .scan
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(scan);
        Ok(())
    }

    /// The writable layer while frozen: the delta since the presync scan (remote name
    /// [`UPPER_DELTA_TAR`]), or the whole layer ([`UPPER_TAR`]) when there was no presync.
    pub(super) fn final_upper(&self) -> Result<(PathBuf, &'static str), SourceError> {
        let scan = self
            .upper_sync
            .scan
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let (tar, remote) = match scan {
            Some(mut scan) => {
                self.forget_mapped(&mut scan, &self.mapped_files());
                let tar = self.work.join("final-upper-delta.tar");
                let t_delta = std::time::Instant::now();
                // Not synced: the file only feeds the transfer of this move (digests taken
                // from what is read, checked by the destination); a crash rolls the move back.
                let stats = write_file(&tar, false, |w| {
                    mig_migrate::archive::write_layer_delta(
                        &self.upper(),
                        &scan,
                        w,
                        self.peer_speaks(super::UPPER_APPEND_MINOR),
                    )
                })?;
                let delta_ms = super::ms(t_delta.elapsed());
                self.upper_sync.delta_ms.store(delta_ms, Ordering::Relaxed);
                tracing::debug!(
                    changed = stats.changed,
                    appended = stats.appended,
                    deleted = stats.deleted,
                    delta_ms,
                    "writable-layer delta"
                );
                (tar, UPPER_DELTA_TAR)
            }
            None => {
                let tar = self.work.join("final-upper.tar");
                write_tar(&self.upper(), &tar)?;
                (tar, UPPER_TAR)
            }
        };
        let size = std::fs::metadata(&tar).map(|m| m.len()).unwrap_or(0);
        self.upper_sync.delta_bytes.store(size, Ordering::Relaxed);
        Ok((tar, remote))
    }

    /// The container's log as it is before the freeze (kind Presync, remote [`LOG_FILE`]), for a
    /// destination that takes it in two parts: the bulk of a long log travels while the
    /// container runs, and only what it gains after this goes while frozen ([`Self::record_files`]).
    pub(super) fn presync_log(&self) -> Result<Option<OutgoingFile>, SourceError> {
        let from = self.agent.dirs.container(&self.id).log();
        if !self.peer_speaks(LOG_PRESYNC_MINOR) || !from.is_file() {
            return Ok(None);
        }
        let copy = self.work.join("presync-container.log");
        let len = copy_log_range(&from, &copy, 0)?;
        let _ = self.log_sync.head.set(len);
        Ok(Some(OutgoingFile {
            kind: FileKind::Presync,
            local: copy,
            remote: LOG_FILE.to_owned(),
            sha256: None,
        }))
    }

    /// The container's log and state record as they are while frozen, so that the destination
    /// keeps the old output (`mig logs`) and the creation time.
    pub(super) fn record_files(&self) -> Result<Vec<OutgoingFile>, SourceError> {
        let cd = self.agent.dirs.container(&self.id);
        let mut files: Vec<OutgoingFile> = self.frozen_log(&cd.log())?.into_iter().collect();
        let from = cd.state();
        if from.is_file() {
            let copy = self.work.join(STATE_FILE);
            if self.peer_speaks(1) {
                std::fs::copy(&from, &copy).map_err(io(&from))?;
            } else {
                // A protocol 1.0 destination (mig 0.1.0) reads the record strictly and knows no
                // `format` key: send it in mig 0.1's format (no key), or it loses `created`.
                let st: crate::layout::StateRecord =
                    crate::layout::read_record(&from).map_err(io(&from))?;
                mig_runtime::fsutil::write_json(&copy, &st).map_err(io(&copy))?;
            }
            files.push(OutgoingFile {
                kind: FileKind::Delta,
                local: copy,
                remote: STATE_FILE.to_owned(),
                sha256: None,
            });
        }
        Ok(files)
    }

    /// The container's log while frozen: what it gained since [`Self::presync_log`]
    /// ([`LOG_TAIL_FILE`]), else all of it ([`LOG_FILE`]); `None` without a log.
    fn frozen_log(&self, from: &Path) -> Result<Option<OutgoingFile>, SourceError> {
        let Ok(meta) = std::fs::metadata(from) else {
            return Ok(None);
        };
        // The shim only appends, so the log still starts with the presync copy; were it shorter
        // (replaced by hand), it goes whole and the destination drops the copy.
        let head = self
            .log_sync
            .head
            .get()
            .copied()
            .filter(|&h| meta.len() >= h);
        let remote = if head.is_some() {
            LOG_TAIL_FILE
        } else {
            LOG_FILE
        };
        let copy = self.work.join(remote);
        let skip = head.unwrap_or(0);
        let end = copy_log_range(from, &copy, skip)?;
        self.log_sync
            .delta_bytes
            .store(end.saturating_sub(skip), Ordering::Relaxed);
        Ok(Some(OutgoingFile {
            kind: FileKind::Delta,
            local: copy,
            remote: remote.to_owned(),
            sha256: None,
        }))
    }
}

/// Copies the bytes of the log `from` after its first `skip` into `to` (created anew); returns
/// the length of `from` it copied up to. Reads one open file, so bytes the shim appends meanwhile
/// either go or wait for the next part, never half.
fn copy_log_range(from: &Path, to: &Path, skip: u64) -> Result<u64, SourceError> {
    use std::io::{Read, Seek};
    let mut src = std::fs::File::open(from).map_err(io(from))?;
    let end = src.metadata().map_err(io(from))?.len();
    src.seek(std::io::SeekFrom::Start(skip)).map_err(io(from))?;
    let mut dst = std::fs::File::create(to).map_err(io(to))?;
    std::io::copy(&mut src.take(end.saturating_sub(skip)), &mut dst).map_err(io(to))?;
    Ok(end)
}

/// The whole writable layer while frozen, not synced (see [`SourceSide::final_upper`]).
fn write_tar(dir: &Path, tar: &Path) -> Result<(), SourceError> {
    write_file(tar, false, |w| {
        mig_migrate::archive::write_layer_tar(dir, w)
    })
}

/// Writes `path` with `f` through a buffer, then syncs it when `sync`.
fn write_file<T>(
    path: &Path,
    sync: bool,
    f: impl FnOnce(&mut dyn std::io::Write) -> Result<T, mig_migrate::archive::LayerError>,
) -> Result<T, SourceError> {
    let file = std::fs::File::create(path).map_err(io(path))?;
    let mut w = std::io::BufWriter::new(file);
    let out = f(&mut w).map_err(SourceError::Layer)?;
    let file = w.into_inner().map_err(|e| SourceError::Io {
        path: path.to_owned(),
        source: e.into_error(),
    })?;
    if sync {
        file.sync_all().map_err(io(path))?;
    }
    Ok(out)
}
