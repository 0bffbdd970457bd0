//! Removing the frozen source copy once the destination committed ([`destroy_copy`]), and the
//! marks of the containers a move away froze.

use super::SourceError;
use crate::daemon::Agent;
use mig_runtime::cgroup::Cgroup;
use std::sync::Arc;
use std::time::Duration;

/// Kills the frozen source copy and removes it (cgroup, mount, directory, record). Idempotent.
pub(crate) async fn destroy_copy(
    agent: &Arc<Agent>,
    id: &str,
    cgroup: &str,
) -> Result<(), SourceError> {
    if let Ok(cg) = Cgroup::open(cgroup) {
        // cgroup.kill reaches frozen tasks; thaw so that nothing waits on the freezer.
        let _ = cg.kill();
        let _ = cg.thaw();
    }
    if agent.entry(id).is_err() {
        mark_frozen(id, false);
        return Ok(());
    }
    // Still busy (listed `frozen`, stage `committed`) until its shim has gone: once not busy, a
    // killed copy whose shim still runs would be listed `running` on this host while it runs on
    // the destination (QA session 18: 80 to 300 ms). The removal below waits again if needed.
    agent.wait_shim_gone(id, DESTROY_GRACE).await;
    agent.set_busy(id, false);
    let removed = match agent.remove(id, true).await {
        Ok(()) => Ok(()),
        // Removed meanwhile by another caller: what was asked is done.
        Err(_) if agent.entry(id).is_err() => Ok(()),
        Err(e) => Err(SourceError::Destroy { message: e.message }),
    };
    if removed.is_ok() {
        mark_frozen(id, false);
    }
    removed
}

/// Containers this agent froze for a move away and has not thawed or removed yet: listed
/// `frozen` whatever their cgroup says (CRIU thaws the cgroup while it holds the tasks itself).
static MOVE_FROZEN: crate::daemon::marks::Marks = crate::daemon::marks::Marks::new();

/// Marks container `id` frozen for a move away, or clears the mark.
pub(crate) fn mark_frozen(id: &str, frozen: bool) {
    MOVE_FROZEN.set(id, frozen);
}

/// Whether a move away froze container `id` (and has not thawed or removed it since).
pub(crate) fn frozen_for_move(id: &str) -> bool {
    MOVE_FROZEN.contains(id)
}

/// Containers whose move away committed and whose copy here is being ended (the post-copy's
/// last pages served, then [`destroy_copy`]), success or not: a move of the same container back
/// to this host waits for that ([`crate::migration::dest`]) instead of being refused.
static ENDING: crate::daemon::marks::Marks = crate::daemon::marks::Marks::new();

/// Marks container `id` as being ended after its move away committed, until the guard drops.
pub(crate) fn hold_ending(id: &str) -> crate::daemon::marks::Mark {
    ENDING.hold(id)
}

/// How many containers are frozen for a move away or being ended after one (a post-copy still
/// serving its pages counts), but for those in `settled_later` (frozen in doubt: nothing ends
/// their move but an answer, so a stopping agent does not wait for them).
pub(crate) fn moving_away(settled_later: &[&str]) -> usize {
    // A container is both frozen and being ended between its commit and its removal: once
    // (QA of session 26: migd's shutdown log counted one move as two).
    let mut ids = MOVE_FROZEN.distinct();
    ids.extend(ENDING.distinct());
    ids.retain(|id| !settled_later.contains(&id.as_str()));
    ids.len()
}

/// Whether container `id`'s copy here is being ended after its move away committed.
pub(crate) fn ending(id: &str) -> bool {
    ENDING.contains(id)
}

/// How long [`destroy_copy`] waits for the killed copy's shim before it removes the copy.
const DESTROY_GRACE: Duration = Duration::from_secs(5);
