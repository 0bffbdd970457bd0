//! [`Src`], the handle the protocol driver calls: its `SourceHost` actions (presync files and
//! rounds, freeze, dump, closing files, thaw, destroy, journal, progress) on blocking tasks.

use super::destroy::{destroy_copy, mark_frozen};
use super::rollback::keep_dump_log;
use super::{io, SourceError, SourceSide, FREEZE_TIMEOUT, UPPER_TAR};
use crate::migration::chain;
use crate::migration::fault::{self, Point};
use crate::migration::journal;
use mig_migrate::criu::smaps::SmapsCopy;
use mig_migrate::protocol::{JournalRecord, Role};
use mig_migrate::transport::{self, HostError, OutgoingFile, Progress, SentFile, SourceHost};
use mig_migrate::wire::{FileKind, Phase};
use std::sync::atomic::Ordering;
use std::sync::Arc;

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SourceError> + Send + 'static,
) -> Result<T, SourceError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(SourceError::Task(e.to_string())))
}

fn boxed(e: SourceError) -> HostError {
    Box::new(e)
}

/// The [`SourceHost`] handle of a [`SourceSide`] (cloned into blocking tasks).
#[derive(Clone)]
pub(crate) struct Src(pub Arc<SourceSide>);

impl std::ops::Deref for Src {
    type Target = SourceSide;
    fn deref(&self) -> &SourceSide {
        &self.0
    }
}

impl Src {
    /// [`SourceSide::memory_presync`] with progress events while it runs (phase `presync`,
    /// the page bytes sent so far added to what the move had sent before).
    async fn memory_presync_with_progress(&self) {
        let before = self.progress_bytes.load(Ordering::Relaxed);
        let presync = self.memory_presync();
        tokio::pin!(presync);
        let mut tick = tokio::time::interval(transport::PROGRESS_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                () = &mut presync => return,
                _ = tick.tick() => {
                    // Page bytes as they go, the figure the move's result counts (the
                    // connection's UDP bytes, headers and resends included, overshot it).
                    let moved = self.pages.presync.sent.load(Ordering::Relaxed);
                    self.emit_progress(Progress { phase: "presync", bytes: before + moved, total: None });
                }
            }
        }
    }
}

impl SourceHost for Src {
    async fn presync_files(
        &self,
        missing_layers: &[String],
    ) -> Result<Vec<OutgoingFile>, HostError> {
        fault::hit_async(&self.agent.cfg.state_dir, Point::SourcePresync).await?;
        let me = self.clone();
        let missing = missing_layers.to_vec();
        blocking(move || {
            let mut files = Vec::new();
            for d in &missing {
                let blob =
                    me.agent
                        .images
                        .layer_blob(d)
                        .map_err(|source| SourceError::LayerBlob {
                            digest: d.clone(),
                            source,
                        })?;
                let mut sha = [0u8; 32];
                let known = d
                    .strip_prefix("sha256:")
                    .is_some_and(|h| hex::decode_to_slice(h, &mut sha).is_ok());
                files.push(OutgoingFile {
                    kind: FileKind::Layer,
                    local: blob,
                    remote: d.clone(),
                    sha256: known.then_some(sha),
                });
            }
            std::fs::create_dir_all(&me.work).map_err(io(&me.work))?;
            files.extend(me.presync_log()?);
            let tar = me.work.join("presync-upper.tar");
            me.presync_upper(&tar)?;
            files.push(OutgoingFile {
                kind: FileKind::Presync,
                local: tar,
                remote: UPPER_TAR.to_owned(),
                sha256: None,
            });
            Ok(files)
        })
        .await
        .map_err(boxed)
    }

    async fn presync_round(&self, round: u32) -> Result<Option<Vec<OutgoingFile>>, HostError> {
        if !self.precopy.active() {
            if round == 1 {
                self.memory_presync_with_progress().await;
            }
            return Ok(None);
        }
        let me = self.clone();
        blocking(move || me.precopy_round(round))
            .await
            .map_err(boxed)
    }

    async fn before_freeze(&self) -> Result<(), HostError> {
        let me = self.clone();
        blocking(move || {
            fault::hit(&me.agent.cfg.state_dir, Point::SourceBeforeFreeze)?;
            me.check_downtime_bound()?;
            me.find_stdio_pipe_early();
            Ok(())
        })
        .await
        .map_err(boxed)
    }

    async fn freeze(&self) -> Result<(), HostError> {
        let me = self.clone();
        blocking(move || {
            let cg = me.cg()?;
            let vforks = cg.freeze_for_dump(FREEZE_TIMEOUT).map_err(|e| {
                let _ = cg.thaw();
                SourceError::Freeze(e)
            })?;
            if vforks > 0 {
                tracing::info!(id = %me.id, vforks, "frozen again: a process was between vfork and exec");
            }
            fault::hit(&me.agent.cfg.state_dir, Point::SourceFreeze)?;
            let map = mig_runtime::pidmap::pid_map(&cg.procs().unwrap_or_default());
            // Read on a thread while the dump starts; the dump reads what is not ready itself.
            let pids: Vec<i32> = map.iter().map(|e| e.host_pid).collect();
            match SmapsCopy::start(&me.work.join("smaps"), &pids) {
                Ok(c) => *me.smaps.lock().unwrap_or_else(|p| p.into_inner()) = Some(c),
                Err(e) => tracing::debug!(id = %me.id, error = %e, "no copies of smaps: the dump reads them"),
            }
            *me.frozen_pids.lock().unwrap_or_else(|p| p.into_inner()) = map;
            if let Some(net) = &me.net {
                // From here the copy on the destination owns the address: nothing may reach
                // the frozen sockets here (no ACK, no RST) until the move rolls back.
                mig_runtime::net::set_host_link(net, false).map_err(|e| {
                    let _ = mig_runtime::net::set_host_link(net, true);
                    let _ = cg.thaw();
                    SourceError::Net(e)
                })?;
            }
            mark_frozen(&me.id, true);
            Ok(())
        })
        .await
        .map_err(boxed)
    }

    async fn dump(&self) -> Result<Vec<OutgoingFile>, HostError> {
        let tunnel = self
            .pages
            .before_dump(&self.migration_id)
            .await
            .map_err(|e| boxed(SourceError::Pages(e)))?;
        let me = self.clone();
        blocking(move || me.dump_blocking(tunnel.as_ref()))
            .await
            .map_err(boxed)
    }

    async fn closing_files(
        &self,
        phase: Phase,
        sent: &[SentFile],
    ) -> Result<Vec<OutgoingFile>, HostError> {
        if phase != Phase::Final || !self.peer_speaks(1) {
            return Ok(Vec::new());
        }
        let me = self.clone();
        let sent = sent.to_vec();
        blocking(move || me.seal_sent(&sent)).await.map_err(boxed)
    }

    async fn thaw(&self) -> Result<(), HostError> {
        self.pages.abandon(&self.migration_id);
        let me = self.clone();
        blocking(move || {
            // Thawed first: the copies of smaps need not be finished to roll back.
            let smaps = me.smaps.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(net) = &me.net {
                if let Err(e) = mig_runtime::net::set_host_link(net, true) {
                    tracing::warn!(id = %me.id, error = %chain(&e), "cannot bring the container's link up again");
                }
            }
            let thawed = me.cg()?.thaw().map_err(SourceError::Thaw);
            drop(smaps);
            thawed?;
            mark_frozen(&me.id, false);
            crate::migration::postcopy::mark_source(&me.agent, &me.id, None);
            keep_dump_log(&me.work);
            let _ = std::fs::remove_dir_all(&me.work);
            Ok(())
        })
        .await
        .map_err(boxed)?;
        self.agent.set_busy(&self.id, false);
        Ok(())
    }

    async fn destroy(&self) -> Result<(), HostError> {
        let _ending = super::destroy::hold_ending(&self.id);
        // Post-copy: the destination needs this copy's pages until it has the last one.
        let me = self.clone();
        let served = blocking(move || Ok(me.pages.finish_postcopy(&me.migration_id)))
            .await
            .map_err(boxed)?;
        if !served {
            // The destination's copy cannot get the rest of its memory, and is killed there;
            // this copy is whole. Kept frozen, in doubt, until the destination says its copy is
            // gone (then it runs here again) or that it has every page after all (QA of
            // session 30, F1 and F2: it was removed, and the container was lost).
            let (cgroup, id) = (self.cgroup.clone(), self.id.clone());
            let _ = tokio::task::spawn_blocking(move || {
                crate::migration::postcopy::keep_source_frozen(&cgroup, &id)
            })
            .await;
            let dir = &self.agent.cfg.state_dir;
            journal::write(
                dir,
                &self.entry(mig_migrate::protocol::JournalState::InDoubt),
            )
            .map_err(|e| boxed(SourceError::Journal(e)))?;
            tracing::error!(id = %self.id, migration = %self.migration_id, peer = %self.peer, "post-copy ended before the destination had every page: the frozen copy here is kept, in doubt, until the destination says whether its copy is gone");
            return Ok(());
        }
        crate::migration::postcopy::mark_source(&self.agent, &self.id, None);
        destroy_copy(&self.agent, &self.id, &self.cgroup)
            .await
            .map_err(boxed)
    }

    fn peer_hello(&self, hello: &mig_migrate::wire::Hello) {
        let _ = self.peer_version.set(hello.protocol_version);
    }

    /// The files' progress (the driver's: bytes of files, capped at their total), counted from
    /// the start of the move: the memory presync's and the page tunnel's bytes are added, so
    /// that `bytes` never goes back between phases.
    fn progress(&self, p: Progress) {
        let other = self.bytes_besides_files();
        self.emit_progress(Progress {
            bytes: p.bytes + other,
            total: p.total.map(|t| t + other),
            ..p
        });
    }

    async fn journal(&self, record: &JournalRecord) -> Result<(), HostError> {
        let dir = &self.agent.cfg.state_dir;
        fault::journal(dir, Role::Source, &record.state, false).await?;
        journal::write(dir, &self.entry(record.state.clone()))
            .map_err(|e| boxed(SourceError::Journal(e)))?;
        Ok(fault::journal(dir, Role::Source, &record.state, true).await?)
    }
}
