//! The restore of an incoming migration: the staged files placed in a new container directory,
//! the pages made ready for the mode, the agent's restore, the copy frozen until Commit.

use super::staging::{import_layers, place_log, place_upper};
use super::{io, DestError, DestSide, Incoming, FREEZE_TIMEOUT, MARKER};
use crate::api::{ContainerState, Response};
use crate::daemon::Entry;
use crate::layout::{now, StateRecord};
use crate::migration::chain;
use crate::migration::fault::{self, Fault};
use crate::migration::source::STATE_FILE;
use mig_migrate::wire::MigrationMode;
use mig_runtime::cgroup::Cgroup;
use mig_runtime::fsutil;
use mig_runtime::pidmap::PidEntry;
use std::collections::HashMap;
use std::path::Path;

/// Memory forked processes share (per [`mig_migrate::criu::lazy_proxy::forked_overlap_bytes`])
/// from which a stream move restores every page before the resume rather than through its local
/// lazy-pages daemon: the restore copies memory while frozen (about 1 GiB/s here), the daemon
/// would multiply the shared part by the number of processes.
const KEEP_SHARED_MIN: u64 = 4 << 20;

impl DestSide {
    fn restore_files(&self, id: &str, inc: &Incoming) -> Result<(), DestError> {
        let prepare = inc
            .prepare
            .as_ref()
            .ok_or_else(|| DestError::Unknown { id: id.to_owned() })?;
        let staging = self.staging(id)?;
        // Done at the end of the presync already (while the container still ran on the
        // source); here only for a source that sent no presync phase.
        import_layers(&self.agent.images, &staging, &prepare.image)?;
        let cd = self.agent.dirs.container(&inc.container_id);
        if cd.dir.exists() {
            return Err(DestError::Exists { path: cd.dir });
        }
        // Private from the start: the moved images are renamed into it before the restore
        // gives it the container's own mode (crate::privacy).
        crate::privacy::create_dir(&cd.dir, crate::privacy::PRIVATE_DIR)
            .map_err(DestError::ContainerDir)?;
        let marker = cd.dir.join(MARKER);
        fsutil::atomic_write(&marker, id.as_bytes()).map_err(io(&marker))?;
        place_upper(&staging, &cd.upper())?;
        place_log(&staging, &cd.log())?;
        let checkpoint = cd.checkpoint();
        let from = staging.join("images");
        std::fs::rename(&from, &checkpoint).map_err(io(&from))?;
        // Pre-copy: the rounds go beside the checkpoint, and CRIU's `parent` links (not sent)
        // are written again so that the restore reads the pages of the rounds.
        let rounds = staging.join(crate::migration::precopy::ROUNDS_DIR);
        if rounds.exists() {
            let to = cd.dir.join(crate::migration::precopy::ROUNDS_DIR);
            std::fs::rename(&rounds, &to).map_err(io(&rounds))?;
            crate::migration::precopy::link_rounds(&cd.dir, &checkpoint)
                .map_err(DestError::Rounds)?;
        }
        Ok(())
    }

    pub(super) async fn restore_inner(&self, id: &str) -> Result<Vec<PidEntry>, DestError> {
        let injected = fault::before_restore(&self.agent.cfg.state_dir).await?;
        let inc = self.incoming(id)?;
        let spec = inc
            .prepare
            .as_ref()
            .map(|p| p.spec.clone())
            .ok_or_else(|| DestError::Unknown { id: id.to_owned() })?;
        let t_pages = std::time::Instant::now();
        if let Ok(staging) = self.staging(id) {
            // Stream mode: the pages are complete once the page server ended cleanly.
            let mid = id.to_owned();
            tokio::task::spawn_blocking(move || {
                crate::migration::pages::finish_page_server(&mid, &staging.join("images"))
            })
            .await
            .unwrap_or_else(|e| Err(crate::migration::pages::PagesError::Task(e.to_string())))
            .map_err(DestError::Pages)?;
        }
        let pages_ms = crate::migration::ms(t_pages.elapsed());
        let arrived = self
            .arrived
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
            .unwrap_or_default();
        let t_place = std::time::Instant::now();
        {
            let inc = inc.clone();
            let me = DestSide::new(self.agent.clone(), self.source.clone());
            me.migs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id.to_owned(), inc.clone());
            let id = id.to_owned();
            tokio::task::spawn_blocking(move || me.restore_files(&id, &inc))
                .await
                .unwrap_or_else(|e| Err(DestError::Task(e.to_string())))?;
        }
        let cd = self.agent.dirs.container(&spec.id);
        // Memory that forked processes share copy-on-write: a plain restore gives it back
        // shared, a lazy-pages daemon one copy per process (QA of session 22: a parent and three
        // workers sharing 32 MiB held 129 MiB after a stream or lazy move, and a container with
        // a memory limit lost workers to the OOM killer after the commit).
        let forked_shared = {
            let checkpoint = cd.checkpoint();
            tokio::task::spawn_blocking(move || {
                mig_migrate::criu::lazy_proxy::forked_overlap_bytes(&checkpoint)
            })
            .await
            .ok()
            .and_then(|r| {
                r.inspect_err(|e| tracing::warn!(migration = %id, error = %chain(e), "cannot tell the memory forked processes share"))
                    .ok()
            })
            .unwrap_or(0)
        };
        let post_copy = Self::mode_of(&inc) == Some(MigrationMode::PostCopy);
        if post_copy && forked_shared >= KEEP_SHARED_MIN {
            tracing::warn!(migration = %id, shared_mib = forked_shared >> 20, "forked processes share memory that a post-copy gives each of them a copy of: the container will hold more memory here than on the source");
        }
        let stream = Self::mode_of(&inc) == Some(MigrationMode::Stream);
        // Stream mode restores every page first (CRIU then gives a parent's and its children's
        // equal pages back shared) for a user-namespace container that cannot use userfaultfd,
        // and for forked processes that share memory with their parent; otherwise a local
        // lazy-pages daemon copies the memory in after the resume.
        let stream_plain = stream
            && ((spec.userns.is_some() && !crate::migration::modes::userns_may_use_uffd())
                || forked_shared >= KEEP_SHARED_MIN);
        {
            let (checkpoint, limit) = (cd.checkpoint(), spec.limits.memory);
            let parent = self.agent.cfg.cgroup_parent.clone();
            // Pages that arrive through a lazy-pages daemon come one copy per process, and
            // they arrive after the commit: memory that processes shared and that overflows
            // the limit then kills one of them on a container that "moved" (QA of session 23:
            // workers sharing what their exited parent had mapped, 64 MiB each, under a
            // 160 MiB limit). Counted per process, such a move is refused before the commit.
            let per_process = post_copy || (stream && !stream_plain);
            let mid = id.to_owned();
            tokio::task::spawn_blocking(move || {
                super::check::memory_fits(&mid, &checkpoint, limit, &parent, per_process)
            })
            .await
            .unwrap_or_else(|e| Err(DestError::Task(e.to_string())))?;
        }
        let place_ms = crate::migration::ms(t_place.elapsed());
        let checkpoint = cd.checkpoint();
        let noted = tokio::task::spawn_blocking(move || note_arrival(&checkpoint, &arrived))
            .await
            .unwrap_or(false);
        if Self::mode_of(&inc) == Some(MigrationMode::PostCopy) {
            let conn = self.conn.get().cloned().ok_or(DestError::Pages(
                crate::migration::pages::PagesError::NoConnection,
            ))?;
            let cgroup = self.agent.cgroup_name(&spec.id);
            crate::migration::pages::start_lazy_daemon(conn, id, cd.checkpoint(), &cd.dir, cgroup)
                .await
                .map_err(DestError::Pages)?;
        }
        let mut local_lazy = false;
        if stream_plain && forked_shared < KEEP_SHARED_MIN {
            // The restored tasks could not open their userfaultfd inside the user namespace.
            tracing::info!(migration = %id, "user-namespace container: restoring every page before the resume (vm.unprivileged_userfaultfd = 0)");
        } else if stream_plain {
            tracing::info!(migration = %id, shared_mib = forked_shared >> 20, "forked processes share memory: restoring every page before the resume keeps it shared");
        } else if stream {
            // Every page is here: restore without copying memory, served by a local daemon
            // (a plain restore when it cannot start).
            match crate::migration::pages::start_local_lazy_daemon(id, cd.checkpoint(), &cd.dir)
                .await
            {
                Ok(()) => local_lazy = true,
                Err(e) => {
                    let _ = std::fs::remove_dir_all(cd.dir.join(crate::migration::pages::LAZY_DIR));
                    tracing::warn!(migration = %id, error = %chain(&e), "no local lazy-pages daemon; restoring every page first");
                }
            }
        }
        if injected == Some(Fault::CriuFail) {
            fault::spoil_restore_log(&cd.checkpoint());
        }
        // The source's creation time (its state record came with the final files).
        let created = self
            .staging(id)
            .ok()
            .and_then(|st| {
                crate::layout::read_record::<StateRecord>(&st.join("delta").join(STATE_FILE)).ok()
            })
            .map(|s| s.created)
            .unwrap_or_else(now);
        let state = StateRecord {
            created,
            reason: Some(format!("arriving from {}", self.source)),
            ..StateRecord::new(ContainerState::Checkpointed, self.cgroup_of(&spec.id))
        };
        crate::layout::write_record(&cd.spec(), &spec).map_err(io(&cd.spec()))?;
        crate::layout::write_record(&cd.state(), &state).map_err(io(&cd.state()))?;
        self.agent.lock().insert(
            spec.id.clone(),
            Entry {
                spec: spec.clone(),
                state: state.clone(),
                busy: false,
            },
        );
        let t_restore = std::time::Instant::now();
        let restored = self.agent.restore(&spec.id).await;
        // The restore read the rounds' pages (pre-copy); a failure removes everything anyway.
        crate::migration::precopy::remove_rounds(&cd.dir, &cd.checkpoint());
        // CRIU's own account of the restore (its stats-restore image).
        let criu_stats =
            mig_migrate::criu::stats::read_stats(&cd.checkpoint().join("stats-restore"))
                .ok()
                .and_then(|s| s.restore);
        tracing::info!(
            migration = %id,
            pages_ms,
            place_ms,
            shim_restore_ms = crate::migration::ms(t_restore.elapsed()),
            criu_restore_ms = criu_stats.as_ref().map(|s| s.restore_time_us / 1000),
            criu_forking_ms = criu_stats.as_ref().map(|s| s.forking_time_us / 1000),
            verified_on_arrival = noted,
            local_lazy,
            "restore phases"
        );
        let mut result = match restored {
            Ok(Response::Restored(r)) => r,
            Ok(_) => {
                return Err(DestError::Restore {
                    message: "unexpected answer".into(),
                })
            }
            // The agent's restore says "restore failed: " already, as this error does.
            Err(e) => {
                return Err(DestError::Restore {
                    message: e
                        .message
                        .strip_prefix("restore failed: ")
                        .map_or_else(|| e.message.clone(), str::to_owned),
                })
            }
        };
        if !local_lazy && Self::mode_of(&inc) != Some(MigrationMode::PostCopy) {
            // Restored with every page: its cgroup is charged for them now, so they are no
            // longer held for it as well.
            super::release_memory(id);
        }
        // Stopped until Commit: the source is frozen, so nothing of the container runs twice.
        let cg = Cgroup::open(&state.cgroup).map_err(|source| DestError::Cgroup {
            name: state.cgroup.clone(),
            source,
        })?;
        self.agent.set_busy(&spec.id, true);
        let t_after = std::time::Instant::now();
        cg.freeze(FREEZE_TIMEOUT).map_err(DestError::Freeze)?;
        if local_lazy || Self::mode_of(&inc) == Some(MigrationMode::PostCopy) {
            let mut map = std::mem::take(&mut result.pid_map);
            result.pid_map = tokio::task::spawn_blocking(move || {
                crate::migration::pages::fill_lazy_cmds(&mut map);
                map
            })
            .await
            .map_err(|e| DestError::Task(e.to_string()))?;
        }
        tracing::debug!(migration = %id, after_ms = crate::migration::ms(t_after.elapsed()), "frozen after the restore, commands read");
        if injected == Some(Fault::Kill) {
            fault::die();
        }
        Ok(result.pid_map)
    }
}

/// Leaves the image set's arrival note (`mig_migrate::imageset::ArrivalNote`) when every file of
/// its manifest arrived with that very digest (checked on arrival): the shim's restore then
/// checks the listing and sizes without hashing the memory a second time (stream mode's page
/// images are checked by size in any case). Returns whether the note was written.
fn note_arrival(checkpoint: &Path, arrived: &HashMap<String, String>) -> bool {
    use mig_migrate::imageset;
    let Ok(manifest) = imageset::read_manifest(checkpoint) else {
        return false;
    };
    let all_known = manifest
        .files
        .iter()
        .all(|f| arrived.get(&f.path) == Some(&f.sha256));
    if !all_known || !arrived.contains_key(imageset::MANIFEST) {
        return false;
    }
    match imageset::write_arrival_note(checkpoint, std::process::id()) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %chain(&e), "cannot write the arrival note; the restore hashes the images again");
            false
        }
    }
}
