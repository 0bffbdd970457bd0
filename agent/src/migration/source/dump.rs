//! The dump while frozen: CRIU leaves the container frozen, the image set is sealed (at once for
//! a 1.0 destination, from the digests sent for a later one); a fault test may corrupt a file.

use super::{io, SourceError, SourceSide, MANIFEST_DRAFT};
use crate::migration::fault::{self, Fault, Point};
use crate::migration::{chain, ms};
use mig_migrate::criu::{Criu, DumpOpts};
use mig_migrate::imageset::{self, SealInfo, MANIFEST};
use mig_migrate::transport::{OutgoingFile, SentFile};
use mig_migrate::wire::FileKind;
use std::sync::atomic::Ordering;
use std::time::Instant;

impl SourceSide {
    /// Freezes, dumps (leaving the container frozen), seals; returns the final files.
    pub(super) fn dump_blocking(
        &self,
        tunnel: Option<&mig_migrate::transport::tunnel::Tunnel>,
    ) -> Result<Vec<OutgoingFile>, SourceError> {
        let t_prep = Instant::now();
        let init_pid = self
            .agent
            .init_pid_of(&self.id)
            .ok_or(SourceError::NoInit)?;
        let criu = Criu::locate().map_err(SourceError::Criu)?;
        let criu_version = criu.version().map_err(SourceError::Criu)?;
        let cg = self.cg()?;
        let images = self.work.join("images");
        if images.exists() {
            std::fs::remove_dir_all(&images).map_err(io(&images))?;
        }
        std::fs::create_dir_all(&images).map_err(io(&images))?;
        let pid_map = mig_runtime::pidmap::pid_map(&cg.procs().unwrap_or_else(|_| vec![init_pid]));
        // CRIU keeps no CPU masks: the narrowed ones go with the image set (after the dump).
        let pids: Vec<i32> = pid_map.iter().map(|e| e.host_pid).collect();
        let masks = mig_runtime::affinity::narrowed(&pids);
        let stdio_pipe = self.stdio_pipe(init_pid, &pids);
        let injected = fault::hit(&self.agent.cfg.state_dir, Point::SourceDump)?;
        let (track_mem, prev_images_dir) = self.precopy.final_dump();
        let smaps = self.smaps.lock().unwrap_or_else(|p| p.into_inner()).take();
        let t_criu = Instant::now();
        let prep_ms = ms(t_criu - t_prep);
        let stats = self.pages.dump(
            &criu,
            &self.migration_id,
            DumpOpts {
                leave_running: true,
                tcp_established: self.tcp_established,
                log_file: "dump.log".into(),
                // Pre-copy: only what changed since the last round.
                track_mem,
                prev_images_dir,
                smaps_dir: smaps.as_ref().map(|c| c.dir().to_owned()),
                ..self.dump_opts(fault::criu_pid(injected, init_pid), &cg, &images)
            },
            tunnel,
        );
        drop(smaps);
        let stats = stats.map_err(|source| {
            match tunnel.and_then(mig_migrate::transport::tunnel::Tunnel::peer_stopped) {
                Some(why) => SourceError::DumpStopped { why, source },
                None => SourceError::Dump(source),
            }
        })?;
        if let Err(e) = mig_runtime::affinity::save(&images, &masks) {
            tracing::warn!(id = %self.id, error = %e, "cannot save the tasks' CPU masks: they are not restored");
        }
        self.precopy
            .set_final(stats.pages_written * crate::migration::precopy::PAGE_SIZE);
        // The "before" PID map is what CRIU dumped (the cgroup is frozen again): a read of
        // `cgroup.procs` at the freeze can miss a short-lived process CRIU found.
        match crate::migration::pstree::dumped_pids(&images) {
            Ok(dumped) => {
                let live = mig_runtime::pidmap::pid_map(&cg.procs().unwrap_or_default());
                let map = crate::migration::pstree::dumped_map(live, &dumped);
                *self.frozen_pids.lock().unwrap_or_else(|p| p.into_inner()) = map;
            }
            Err(e) => {
                tracing::warn!(id = %self.id, error = %chain(&e), "cannot read the dumped process tree: the PID map read at the freeze stands")
            }
        }
        let t_seal = Instant::now();
        self.pages
            .criu_dump_ms
            .store(ms(t_seal - t_criu), Ordering::Relaxed);
        let criu_wall_ms = stats.wall_time_us / 1000;
        let spec = self
            .agent
            .entry(&self.id)
            .map(|e| e.spec)
            .map_err(|e| SourceError::Destroy { message: e.message })?;
        let info = SealInfo {
            spec,
            criu_version,
            pid_map,
            stdio_pipe,
            stats: Some(stats),
        };
        let mut files = if self.peer_speaks(1) {
            // The images are hashed while they are sent (digests after the bytes) and the
            // manifest is sealed from those digests once all arrived (`closing_files`).
            let draft = self.work.join(MANIFEST_DRAFT);
            let json = serde_json::to_vec(&imageset::draft(info)).map_err(std::io::Error::other);
            json.and_then(|j| std::fs::write(&draft, j))
                .map_err(io(&draft))?;
            let listed = imageset::list_files(&images).map_err(SourceError::Seal)?;
            let mut files = Vec::with_capacity(listed.len() + 3);
            for rel in listed {
                files.push(OutgoingFile {
                    kind: FileKind::Image,
                    local: images.join(&rel),
                    remote: rel,
                    sha256: None,
                });
            }
            files
        } else {
            // A 1.0 destination wants every digest up front: seal (hash) first.
            let manifest = imageset::seal(&images, info).map_err(SourceError::Seal)?;
            self.pages
                .seal_ms
                .store(ms(t_seal.elapsed()), Ordering::Relaxed);
            let mut files = Vec::with_capacity(manifest.files.len() + 3);
            for f in &manifest.files {
                let mut sha = [0u8; 32];
                let known = hex::decode_to_slice(&f.sha256, &mut sha).is_ok();
                files.push(OutgoingFile {
                    kind: FileKind::Image,
                    local: images.join(&f.path),
                    remote: f.path.clone(),
                    sha256: known.then_some(sha),
                });
            }
            files.push(OutgoingFile {
                kind: FileKind::Image,
                local: images.join(MANIFEST),
                remote: MANIFEST.to_owned(),
                sha256: None,
            });
            files
        };
        let t_upper = Instant::now();
        // What changed in the writable layer since the presync (or all of it without one).
        let (tar, upper_remote) = self.final_upper()?;
        files.push(OutgoingFile {
            kind: FileKind::Delta,
            local: tar,
            remote: upper_remote.to_owned(),
            sha256: None,
        });
        let t_records = Instant::now();
        files.extend(self.record_files()?);
        tracing::info!(
            migration = %self.migration_id,
            prep_ms,
            criu_ms = ms(t_seal - t_criu),
            criu_wall_ms,
            manifest_ms = ms(t_upper - t_seal),
            upper_ms = ms(t_records - t_upper),
            records_ms = ms(t_records.elapsed()),
            "dump phases"
        );
        if injected == Some(Fault::Corrupt)
            || fault::hit(&self.agent.cfg.state_dir, Point::SourceTransfer)? == Some(Fault::Corrupt)
        {
            corrupt_one(&mut files)?;
        }
        Ok(files)
    }

    /// With a 1.1 destination: seals the image set from the digests its files were sent with
    /// (`sent`) and returns the manifest, sent last. `seal_ms` is this step (no hashing).
    pub(super) fn seal_sent(&self, sent: &[SentFile]) -> Result<Vec<OutgoingFile>, SourceError> {
        let t_seal = Instant::now();
        let images = self.work.join("images");
        let draft_path = self.work.join(MANIFEST_DRAFT);
        let draft: imageset::Manifest =
            mig_runtime::fsutil::read_json(&draft_path, imageset::MAX_MANIFEST_BYTES)
                .map_err(io(&draft_path))?;
        let digests = sent
            .iter()
            .filter(|f| f.kind == FileKind::Image)
            .map(|f| (f.remote.clone(), (f.size, f.sha256)))
            .collect();
        imageset::seal_hashed(&images, draft, &digests).map_err(SourceError::Seal)?;
        self.pages
            .seal_ms
            .store(ms(t_seal.elapsed()), Ordering::Relaxed);
        Ok(vec![OutgoingFile {
            kind: FileKind::Image,
            local: images.join(MANIFEST),
            remote: MANIFEST.to_owned(),
            sha256: None,
        }])
    }
}

/// Flips one byte of the largest image file after its digest is computed: the digest goes out
/// (in the header, or after the bytes with a 1.1 destination) for the bytes before the flip.
fn corrupt_one(files: &mut [OutgoingFile]) -> Result<(), SourceError> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let Some(f) = files
        .iter_mut()
        .filter(|f| f.kind == FileKind::Image && f.remote != MANIFEST)
        .max_by_key(|f| std::fs::metadata(&f.local).map(|m| m.len()).unwrap_or(0))
    else {
        return Ok(());
    };
    if f.sha256.is_none() {
        let (_, hex_sha) = imageset::hash_file(&f.local).map_err(SourceError::Seal)?;
        let mut sha = [0u8; 32];
        if hex::decode_to_slice(hex_sha, &mut sha).is_ok() {
            f.sha256 = Some(sha);
        }
    }
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&f.local)
        .map_err(io(&f.local))?;
    let mut b = [0u8; 1];
    file.read_exact(&mut b).map_err(io(&f.local))?;
    file.seek(SeekFrom::Start(0)).map_err(io(&f.local))?;
    file.write_all(&[b[0] ^ 0xff]).map_err(io(&f.local))?;
    tracing::warn!(file = %f.local.display(), "corrupted a file for the fault test");
    Ok(())
}
