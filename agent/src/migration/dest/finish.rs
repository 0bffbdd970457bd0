//! The end of an incoming migration: the restored container resumed at Commit, or everything
//! the migration made removed.

use super::staging::IMAGE_ADDED;
use super::{io, DestError, MARKER};
use crate::daemon::Agent;
use crate::migration::{fault, journal};
use mig_runtime::cgroup::Cgroup;
use std::sync::Arc;

/// Removes what an incoming migration made: kills and removes its container (only one this
/// migration created, by the marker), removes the staging directory. Idempotent.
pub(crate) async fn cleanup_incoming(
    agent: &Arc<Agent>,
    migration_id: &str,
    container_id: &str,
) -> Result<(), DestError> {
    super::release_memory(migration_id);
    let cd = agent.dirs.container(container_id);
    if super::marked_by(agent, container_id, migration_id) {
        let cgroup = agent.cgroup_name(container_id);
        if let Ok(cg) = Cgroup::open(&cgroup) {
            let _ = cg.kill();
            let _ = cg.thaw();
        }
        if agent.entry(container_id).is_ok() {
            agent.set_busy(container_id, false);
            agent
                .remove(container_id, true)
                .await
                .map_err(|e| DestError::Remove { message: e.message })?;
        } else if cd.dir.exists() {
            // Not mounted is no error; it also detaches idmapped layers left staged by a crash.
            let _ = mig_runtime::container::unmount_rootfs(&cd.rootfs());
            if let Ok(cg) = Cgroup::open(&cgroup) {
                let _ = cg.destroy();
            }
            // Off the runtime's threads (a large writable layer takes seconds).
            let dir = cd.dir.clone();
            tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))
                .map_err(io(&cd.dir))?;
        }
    }
    if let Ok(staging) = journal::staging(&agent.cfg.state_dir, migration_id) {
        // From the look for another move of the image to the removal of this staging directory:
        // another move's Prepare, and another move's cleanup, wait.
        let _images = super::check::images_held().await;
        let added = std::fs::read_to_string(staging.join(IMAGE_ADDED));
        let image = added.as_deref().map(str::trim).unwrap_or_default();
        let heir = (!image.is_empty())
            .then(|| super::check::arriving_with_image(&agent.cfg.state_dir, &staging, image))
            .flatten();
        // Another move brings a container of this image: it keeps the image, and removes it
        // if it rolls back in turn.
        let handed = heir.is_some_and(|heir| match std::fs::write(heir.join(IMAGE_ADDED), image) {
            Ok(()) => {
                tracing::info!(migration = %migration_id, %image, "kept the image this move added: another incoming move uses it");
                true
            }
            Err(e) => {
                tracing::warn!(migration = %migration_id, %image, heir = %heir.display(), error = %e, "cannot hand the image this move added to another incoming move: removing it unless a container uses it");
                false
            }
        });
        if !handed && !image.is_empty() {
            // Only a delay (a test holds the lock here); nothing else is carried out.
            let _ = fault::hit_async(&agent.cfg.state_dir, fault::Point::DestImageRemove).await;
            // Refused while a container uses it (the same checks as `mig image rm`).
            match agent.image_remove(image.to_owned()).await {
                Ok(_) => {
                    tracing::info!(migration = %migration_id, %image, "removed the image this move added")
                }
                Err(e) => {
                    tracing::info!(migration = %migration_id, %image, reason = %e.message, "kept the image this move added")
                }
            }
        }
        let _ = std::fs::remove_dir_all(staging);
    }
    Ok(())
}

/// Lets the restored container run; idempotent.
pub(crate) fn resume_incoming(
    agent: &Agent,
    migration_id: &str,
    container_id: &str,
) -> Result<(), DestError> {
    // A copy whose shim died (killed, out of memory) would run unsupervised and be taken for
    // ended at once: the resume fails instead, so that the source thaws its own copy (QA of
    // session 25: the move was reported done, and the container was gone).
    if agent.init_pid_of(container_id).is_none() {
        return Err(DestError::CopyGone);
    }
    let cgroup = agent.cgroup_name(container_id);
    let cg = Cgroup::open(&cgroup).map_err(|source| DestError::Cgroup {
        name: cgroup.clone(),
        source,
    })?;
    cg.thaw().map_err(DestError::Thaw)?;
    // Before it is no longer busy: a move or checkpoint must not start before its memory is
    // all here ([`crate::migration::memory_arriving`]; the daemon's watch clears it).
    let cd = agent.dirs.container(container_id);
    if crate::migration::pages::has_lazy_daemon(migration_id) {
        crate::migration::postcopy::mark_filling(container_id, true);
    } else if !crate::migration::postcopy::memory_arriving(container_id) {
        // Every page is in the restored processes (a lazy-pages daemon's watch removes them
        // once it has served the last one, as does the watch of one a restarted agent found).
        let (images, id) = (cd.checkpoint(), container_id.to_owned());
        std::thread::spawn(move || crate::daemon::checkpoint::spend_pages(&images, &id));
    }
    agent.set_busy(container_id, false);
    let _ = std::fs::remove_file(cd.dir.join(MARKER));
    if let Ok(staging) = journal::staging(&agent.cfg.state_dir, migration_id) {
        let _ = std::fs::remove_dir_all(staging);
    }
    Ok(())
}
