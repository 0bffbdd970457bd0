//! The destination's `DestHost` actions, and the acceptor that runs the protocol's destination
//! side for each incoming connection.

use super::finish::{cleanup_incoming, resume_incoming};
use super::staging::{import_layers, unpack_presync};
use super::{boxed, io, DestError, DestSide};
use crate::daemon::Agent;
use crate::migration::chain;
use crate::migration::fault::{self, Point};
use crate::migration::journal::{self, JournalEntry};
use mig_migrate::protocol::{JournalRecord, JournalState, Role, Timeouts};
use mig_migrate::transport::{self, DestHost, HostError, Progress, Refusal};
use mig_migrate::wire::{FileHeader, FileKind, MigrationMode, Phase, Prepare, RefuseReason};
use mig_runtime::pidmap::PidEntry;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

impl DestHost for DestSide {
    async fn check(&self, prepare: &Prepare) -> Result<Vec<String>, Refusal> {
        fault::hit_async(&self.agent.cfg.state_dir, Point::DestPrepare)
            .await
            .map_err(|e| Refusal {
                reason: RefuseReason::Policy,
                detail: e.to_string(),
            })?;
        if journal::valid_id(&prepare.migration_id) && !self.hold(&prepare.migration_id).await {
            return Err(Refusal {
                reason: RefuseReason::Busy,
                detail: "this migration is being handled on another connection".into(),
            });
        }
        self.wait_for_old_copy(&prepare.spec.id).await;
        // Quick checks (a statvfs, a few stats): fine on the runtime thread. The layers and
        // images found here are not removed by a rolled-back move meanwhile.
        let missing = {
            let _images = super::check::images_held().await;
            self.check_blocking(prepare)?
        };
        if prepare.mode == MigrationMode::Stream {
            self.start_stream(prepare).await?;
        }
        Ok(missing)
    }

    fn place_file(&self, migration_id: &str, header: &FileHeader) -> Result<PathBuf, HostError> {
        let staging = self.staging(migration_id).map_err(boxed)?;
        {
            // Whatever the Prepare declared, a peer never writes more than the limit here.
            let mut placed = self.placed.lock().unwrap_or_else(|p| p.into_inner());
            let total = placed.entry(migration_id.to_owned()).or_insert(0);
            *total = total.saturating_add(header.size);
            if *total > self.agent.cfg.max_incoming_bytes {
                return Err(boxed(DestError::TooLarge {
                    limit: self.agent.cfg.max_incoming_bytes,
                }));
            }
        }
        fault::hit_once(
            &self.agent.cfg.state_dir,
            fault::file_point(header.kind),
            migration_id,
        )?;
        let path = match header.kind {
            FileKind::Layer => {
                let hex = header
                    .path
                    .strip_prefix("sha256:")
                    .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
                    .ok_or_else(|| {
                        boxed(DestError::BadName {
                            path: header.path.clone(),
                        })
                    })?;
                staging.join("layers").join(hex)
            }
            // Pre-copy's rounds (`rounds/<n>/<file>`, from a 1.2 source) beside the images.
            FileKind::Presync => crate::migration::precopy::round_file(&staging, &header.path)
                .unwrap_or_else(|| staging.join("presync").join(&header.path)),
            FileKind::Image => staging.join("images").join(&header.path),
            FileKind::Delta => staging.join("delta").join(&header.path),
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| boxed(io(parent)(e)))?;
        }
        Ok(path)
    }

    async fn restore(&self, migration_id: &str) -> Result<Vec<PidEntry>, HostError> {
        self.restore_inner(migration_id).await.map_err(boxed)
    }

    async fn resume(&self, migration_id: &str) -> Result<(), HostError> {
        fault::hit_async(&self.agent.cfg.state_dir, Point::DestCommit).await?;
        let inc = self.incoming(migration_id).map_err(boxed)?;
        // A post-copy's copy fetches its missing memory through the tunnel of the connection
        // that carried the move, which has ended when another connection asks for the resume
        // (a source back from a restart, with `CommitSent`); on the move's own connection the
        // source's pages may have ended before its Commit (its lazy dump died). Resumed, the
        // copy died for its missing pages, and the source removed its own: the container was
        // lost. Failing here rolls the move back, and the source runs its copy (session 30 and
        // its review, H1).
        if crate::migration::postcopy::fetches_from_source(
            &self.agent,
            &inc.container_id,
            migration_id,
        ) && (self.known(migration_id).is_none()
            || !crate::migration::pages::lazy_pages_can_arrive(migration_id))
        {
            return Err(boxed(DestError::PostcopyCut {
                peer: self.source.clone(),
            }));
        }
        resume_incoming(&self.agent, migration_id, &inc.container_id).map_err(boxed)?;
        // The container needs its lazy-pages daemon, if any, until the last page.
        crate::migration::pages::watch_lazy_daemon(
            self.agent.clone(),
            migration_id.to_owned(),
            inc.container_id.clone(),
            inc.container_name.clone(),
            self.source.clone(),
        );
        tracing::info!(id = %inc.container_id, migration = %migration_id, "container arrived and runs");
        Ok(())
    }

    fn locate(&self, container_id: &str) -> Option<String> {
        self.agent.held_live(container_id)
    }

    async fn cleanup(&self, migration_id: &str) -> Result<(), HostError> {
        crate::migration::pages::forget(migration_id);
        super::release_memory(migration_id);
        let Ok(inc) = self.incoming(migration_id) else {
            if let Ok(staging) = self.staging(migration_id) {
                let _ = std::fs::remove_dir_all(staging);
            }
            return Ok(());
        };
        cleanup_incoming(&self.agent, migration_id, &inc.container_id)
            .await
            .map_err(boxed)
    }

    async fn journal(&self, record: &JournalRecord) -> Result<(), HostError> {
        let inc = self.incoming(&record.migration_id).map_err(boxed)?;
        let (updated, updated_ns) = journal::now();
        let entry = JournalEntry {
            migration_id: record.migration_id.clone(),
            role: Role::Dest,
            state: record.state.clone(),
            cgroup: self.cgroup_of(&inc.container_id),
            container_id: inc.container_id,
            container_name: inc.container_name,
            peer: self.source.clone(),
            updated,
            updated_ns,
        };
        journal::write(&self.agent.cfg.state_dir, &entry).map_err(|e| boxed(DestError::Journal(e)))
    }

    async fn files_received(&self, migration_id: &str, phase: Phase) -> Result<(), HostError> {
        if phase != Phase::Presync {
            return Ok(());
        }
        let staging = self.staging(migration_id).map_err(boxed)?;
        let image = self
            .incoming(migration_id)
            .map_err(boxed)?
            .prepare
            .map(|p| p.image);
        let agent = self.agent.clone();
        tokio::task::spawn_blocking(move || {
            if let Some(image) = image {
                import_layers(&agent.images, &staging, &image)?;
            }
            unpack_presync(&staging)
        })
        .await
        .unwrap_or_else(|e| Err(DestError::Task(e.to_string())))
        .map_err(boxed)
    }

    fn progress(&self, migration_id: &str, p: Progress) {
        self.emit_phase(migration_id, p);
    }

    fn file_arrived(&self, migration_id: &str, file: &mig_migrate::transport::ReceivedFile) {
        if file.header.kind == FileKind::Image {
            self.arrived
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(migration_id.to_owned())
                .or_default()
                .insert(file.header.path.clone(), hex::encode(file.header.sha256));
        }
    }

    async fn load_journal(&self, migration_id: &str) -> Option<JournalState> {
        // A machine of this migration may still be at work (a rollback after a failed resume,
        // a recovery): answer from its final journal entry, not from the one it is replacing.
        // Still busy after the limit: no answer ("undecided"), the source asks again later.
        if !journal::valid_id(migration_id) || !self.hold(migration_id).await {
            tracing::warn!(migration = %migration_id, "a Resolve found the migration busy: answering undecided");
            return None;
        }
        let e = journal::read(&self.agent.cfg.state_dir, migration_id)
            .filter(|e| e.role == Role::Dest)?;
        // Committed here but the link went before the copy was resumed (in doubt at Commit):
        // the Resolve answers Committed, so the copy must run now. Only while the container
        // still carries this migration's marker: a copy resumed since may be frozen again for
        // another move or a checkpoint, which a late Resolve must not thaw (review of session
        // 29, H2).
        if e.state == JournalState::Committed
            && super::marked_by(&self.agent, &e.container_id, migration_id)
        {
            // A copy gone before it ran is rolled back here, and the answer says so (review of
            // session 29, M1: Committed had the source remove the only copy left).
            match crate::migration::recover::resume_committed(&self.agent, &e).await {
                Ok(JournalState::Committed) => {}
                Ok(other) => return Some(other),
                Err(err) => {
                    tracing::error!(migration = %migration_id, error = %chain(&err), "cannot resume the arrived container: answering undecided");
                    return None;
                }
            }
            crate::migration::pages::watch_lazy_daemon(
                self.agent.clone(),
                migration_id.to_owned(),
                e.container_id.clone(),
                e.container_name.clone(),
                self.source.clone(),
            );
        }
        if e.state == JournalState::Committed {
            // The copy here died when its memory stopped arriving: the source asking still
            // holds its whole frozen copy, and runs it again (QA of session 30, F1 and F2: told
            // `Committed`, it removed that copy, and the container was lost).
            if crate::migration::postcopy::failed(&self.agent, migration_id) {
                return Some(crate::migration::postcopy::settle_failed(&self.agent, &e).await);
            }
            // Still waiting for its memory, through the move's connection, which the source
            // asking here on another one has left: the copy is stopped now (its guard), and
            // killed once its daemon is ended; then the answer is `RolledBack`. Until then
            // undecided: `Committed` would have the source remove the only whole copy.
            if crate::migration::postcopy::fetches_from_source(
                &self.agent,
                &e.container_id,
                migration_id,
            ) && crate::migration::postcopy::memory_arriving(&e.container_id)
            {
                let id = migration_id.to_owned();
                let _ =
                    tokio::task::spawn_blocking(move || crate::migration::pages::source_left(&id))
                        .await;
                let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
                while !crate::migration::postcopy::failed(&self.agent, migration_id)
                    && tokio::time::Instant::now() < deadline
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                if crate::migration::postcopy::failed(&self.agent, migration_id) {
                    return Some(crate::migration::postcopy::settle_failed(&self.agent, &e).await);
                }
                tracing::warn!(migration = %migration_id, "a Resolve found the post-copy's copy still waiting for its memory: answering undecided");
                return None;
            }
        }
        Some(e.state)
    }
}

/// Accepts migrations until the endpoint closes; one task per connection.
pub(crate) fn spawn_acceptor(agent: Arc<Agent>, endpoint: quinn::Endpoint) {
    tokio::spawn(async move {
        while let Some(conn) = transport::accept(&endpoint).await {
            let conn = match conn {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %chain(&e), "refused an incoming connection");
                    continue;
                }
            };
            fault::track(&conn);
            // Remote API clients are served by crate::remote; only pinned peers migrate.
            let Some(conn) = crate::remote::route(&agent, conn) else {
                continue;
            };
            let agent = agent.clone();
            tokio::spawn(async move {
                let _running = crate::daemon::heap::Running::start();
                let fp = transport::peer_fingerprint(&conn).unwrap_or_default();
                let source = agent
                    .migration
                    .net()
                    .and_then(|n| {
                        n.peers
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .by_fingerprint(&fp)
                            .map(|p| p.name.clone())
                    })
                    .unwrap_or_else(|| conn.remote_address().to_string());
                let side = Arc::new(DestSide::new(agent.clone(), source.clone()));
                let _ = side.conn.set(conn.clone());
                let hello = crate::migration::hello(&agent);
                let ran =
                    transport::run_dest(conn.clone(), side.clone(), &hello, Timeouts::default())
                        .await;
                side.release();
                match ran {
                    Ok(r) => {
                        // Post-copy: the lazy-pages daemon needs the connection until the last page.
                        crate::migration::pages::until_done(&r.migration_id).await;
                        side.emit_done(&r);
                        // A connection that only answered the source's resolve did not run the
                        // migration (QA of session 23: a rolled-back move was logged as ended
                        // twice, the second time "agent restarted during the migration").
                        let what = if r.migration_id.is_empty() {
                            "answered a peer's question about a container"
                        } else if side.known(&r.migration_id).is_some() {
                            "incoming migration ended"
                        } else {
                            "answered the source's resolve of a migration"
                        };
                        tracing::info!(
                            migration = %r.migration_id,
                            %source,
                            outcome = ?r.outcome,
                            in_doubt = r.in_doubt,
                            "{what}"
                        )
                    }
                    Err(e) => {
                        tracing::warn!(%source, error = %chain(&e), "incoming migration failed")
                    }
                }
                // Give the peer a moment to read our last frames before closing.
                tokio::time::sleep(Duration::from_millis(100)).await;
                conn.close(0u32.into(), b"done");
            });
        }
    });
}
