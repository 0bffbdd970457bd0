//! The destination's check of a Prepare (spec, CRIU and kernel versions, name clashes, limits,
//! disk space) and the reservation of an arriving container's id and name.

use super::{DestError, DestSide, Incoming};
use crate::migration::chain;
use crate::migration::journal;
use mig_migrate::criu::Criu;
use mig_migrate::transport::Refusal;
use mig_migrate::wire::{Prepare, RefuseReason};
use std::collections::BTreeMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long an arriving container waits for this host's old copy of it to go: the copy that a
/// committed move away is ending. After a post-copy that copy served the pages until the last
/// one arrived and is removed right after, so a move straight back met it for a moment.
const OLD_COPY_WAIT: Duration = Duration::from_secs(10);

impl DestSide {
    /// Waits (up to [`OLD_COPY_WAIT`]) while container `id` is here only as a copy being ended
    /// after its move away committed ([`crate::migration::source::ending`]: from the commit
    /// until its removal ended); any other copy is left to the checks, which refuse it.
    pub(super) async fn wait_for_old_copy(&self, id: &str) {
        let started = Instant::now();
        let deadline = started + OLD_COPY_WAIT;
        let mut waited = false;
        loop {
            let ending = crate::migration::source::ending(id);
            if !ending || Instant::now() >= deadline {
                if waited {
                    let ms = crate::migration::ms(started.elapsed());
                    tracing::info!(%id, ms, gone = !ending, "waited for the copy of a move away to be removed");
                }
                return;
            }
            waited = true;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub(super) fn check_blocking(&self, p: &Prepare) -> Result<Vec<String>, Refusal> {
        let refuse = |reason, detail: String| Refusal { reason, detail };
        if !journal::valid_id(&p.migration_id) {
            return Err(refuse(
                RefuseReason::InvalidSpec,
                "invalid migration id".into(),
            ));
        }
        p.spec
            .validate()
            .map_err(|e| refuse(RefuseReason::InvalidSpec, e.to_string()))?;
        if p.spec.image.id != p.image.id || p.spec.image.layers != p.image.layers {
            return Err(refuse(
                RefuseReason::InvalidSpec,
                "the image does not match the spec".into(),
            ));
        }
        let criu = Criu::locate().map_err(|e| refuse(RefuseReason::CriuVersion, chain(&e)))?;
        older_here(&criu, &p.criu_version, &p.kernel, "the source's")
            .map_err(|(reason, why)| refuse(reason, why))?;
        crate::migration::criu_kdat(&criu);
        // From the check of this host's containers to the reservation of the arriving id and
        // name: a `mig run` or an import of the same name waits (they take it too).
        let _reserving = reserving();
        {
            let map = self.agent.lock();
            // CRIU restores the user namespace with the dumped maps: the range must be free here.
            if let Some(m) = &p.spec.userns {
                if let Some(e) = map.values().find(|e| {
                    e.spec
                        .userns
                        .as_ref()
                        .is_some_and(|u| mig_runtime::container::userns::overlaps(m, u))
                }) {
                    return Err(refuse(
                        RefuseReason::NameClash,
                        format!(
                            "user-namespace host ids {}-{} overlap those of container {} ({}) here",
                            m.host_id,
                            u64::from(m.host_id) + u64::from(m.size) - 1,
                            e.spec.name,
                            e.spec.id
                        ),
                    ));
                }
            }
            if let Some(e) = map
                .values()
                .find(|e| e.spec.id == p.spec.id || e.spec.name == p.spec.name)
            {
                // Not running here: a record left by a checkpoint exported and restored
                // elsewhere, say, which `mig rm` removes (QA of session 26).
                let hint = if crate::migration::source::ending(&e.spec.id) {
                    // QA of session 32, F1: "exited here; `mig rm` removes that record", and
                    // `mig rm` answered "no such container".
                    " (its copy here is still ending after its move away committed: serving a post-copy's last pages, or being removed, which takes a while for a writable layer of many files; try again in a few seconds)".to_owned()
                } else if e.state.state.is_live() {
                    String::new()
                } else {
                    format!(
                        " ({} here; `mig rm {}` on this host removes that record)",
                        e.state.state.as_str(),
                        e.spec.name
                    )
                };
                return Err(refuse(
                    RefuseReason::NameClash,
                    format!(
                        "a container {} ({}) exists here{hint}",
                        e.spec.name, e.spec.id
                    ),
                ));
            }
        }
        if self.agent.dirs.container(&p.spec.id).dir.exists() {
            return Err(refuse(
                RefuseReason::NameClash,
                format!("a directory for container {} exists here", p.spec.id),
            ));
        }
        let busy = self
            .migs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .any(|i| i.container_id == p.spec.id);
        if busy {
            return Err(refuse(
                RefuseReason::Busy,
                "this container is already arriving".into(),
            ));
        }
        if let Some(max) = self.agent.cfg.max_incoming_moves {
            // Every incoming migration has a staging directory until it ends.
            let arriving = staging_dirs(&self.agent.cfg.state_dir).count();
            if arriving >= max as usize {
                return Err(refuse(
                    RefuseReason::Busy,
                    format!(
                        "this agent already receives {arriving} migration(s), its limit (limits.max_incoming_moves)"
                    ),
                ));
            }
        }
        let limit = self.agent.cfg.max_incoming_bytes;
        if p.bytes_estimate > limit {
            return Err(refuse(
                RefuseReason::Policy,
                format!(
                    "the migration declares {} bytes, above this agent's limit of {limit} (migd --max-incoming-bytes)",
                    p.bytes_estimate
                ),
            ));
        }
        let free = nix::sys::statvfs::statvfs(&self.agent.cfg.state_dir)
            .map(|s| s.blocks_available().saturating_mul(s.fragment_size()))
            .unwrap_or(u64::MAX);
        // An image this host lacks lands twice before the restore: the layers as received, and
        // unpacked by the import (QA of session 25: a 190 MB image was accepted with 279 MB free
        // and the import failed for want of space; the estimate counts the image once).
        let lacks_image = p
            .spec
            .image
            .layers
            .iter()
            .any(|l| !self.agent.images.has_layer(l));
        let need = p
            .bytes_estimate
            .saturating_add(p.bytes_estimate / 10)
            .saturating_add(if lacks_image { p.image.size } else { 0 });
        if free < need {
            return Err(refuse(
                RefuseReason::DiskFull,
                format!("{free} bytes free, the migration needs about {need}"),
            ));
        }
        let missing = p
            .spec
            .image
            .layers
            .iter()
            .filter(|l| !self.agent.images.has_layer(l))
            .cloned()
            .collect();
        let staging = self
            .staging(&p.migration_id)
            .map_err(|e| refuse(RefuseReason::InvalidSpec, e.to_string()))?;
        // Another connection may be receiving a container of the same id or name (two sources
        // at once): checked and reserved in the staging directories every incoming migration
        // keeps until it ends, under the lock taken above.
        if let Some((id, name)) = arriving_elsewhere(&self.agent.cfg.state_dir, &staging, p) {
            return Err(if id == p.spec.id {
                refuse(
                    RefuseReason::Busy,
                    format!("container {id} is already arriving here from another host"),
                )
            } else {
                refuse(
                    RefuseReason::NameClash,
                    format!("a container named {name} ({id}) is arriving here from another host"),
                )
            });
        }
        let _ = std::fs::remove_dir_all(&staging);
        let reserve = |staging: &Path| -> std::io::Result<()> {
            // 0700 from the start, as docs/security.md says (QA of session 25: it was 0755,
            // reachable only through the 0700 `migrations/`).
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(crate::privacy::PRIVATE_DIR)
                .create(staging)?;
            std::fs::write(
                staging.join(ARRIVING_FILE),
                format!("{}\n{}\n{}\n", p.spec.id, p.spec.name, p.image.id),
            )
        };
        reserve(&staging).map_err(|e| {
            refuse(
                RefuseReason::DiskFull,
                format!("{}: {e}", staging.display()),
            )
        })?;
        self.migs.lock().unwrap_or_else(|p| p.into_inner()).insert(
            p.migration_id.clone(),
            Incoming {
                container_id: p.spec.id.clone(),
                container_name: p.spec.name.clone(),
                prepare: Some(Box::new(p.clone())),
                started: std::time::Instant::now(),
                bytes: 0,
            },
        );
        Ok(missing)
    }
}

/// Why an image set made by CRIU `criu_there` on kernel `kernel_there` cannot be restored here
/// (this host's CRIU missing or older, or its kernel older), as the Prepare of a move refuses
/// it; `None` when it can. For `restore --import` (QA of session 25, F3: an archive of a newer
/// CRIU was restored without a word, and would fail inside CRIU).
pub(crate) fn unrestorable_here(criu_there: &str, kernel_there: &str) -> Option<String> {
    match Criu::locate() {
        Ok(criu) => older_here(&criu, criu_there, kernel_there, "the archive's")
            .err()
            .map(|(_, why)| why),
        Err(e) => Some(chain(&e)),
    }
}

/// Whether images dumped by CRIU `criu_there` on kernel `kernel_there` (`whose` they are, for the
/// message: `the source's`) can be restored with `criu` on this kernel: not when either is older
/// here (CRIU reads no newer images; a dump may use what an older kernel lacks).
fn older_here(
    criu: &Criu,
    criu_there: &str,
    kernel_there: &str,
    whose: &str,
) -> Result<(), (RefuseReason, String)> {
    let v = criu
        .version()
        .map_err(|e| (RefuseReason::CriuVersion, chain(&e)))?;
    if version_key(&v) < version_key(criu_there) {
        return Err((
            RefuseReason::CriuVersion,
            format!("CRIU {v} here is older than {whose} {criu_there}"),
        ));
    }
    let kernel = mig_migrate::criu::kernel_release();
    if version_key(&kernel)[..2] < version_key(kernel_there)[..2] {
        return Err((
            RefuseReason::Kernel,
            format!("kernel {kernel} here is older than {whose} {kernel_there}"),
        ));
    }
    Ok(())
}

/// `4.1.1` or `6.18.0-1-amd64` as numbers for comparison (missing parts are 0).
fn version_key(v: &str) -> [u64; 3] {
    let v = v.trim().trim_start_matches("Version:").trim();
    let mut out = [0; 3];
    for (i, part) in v.split(['.', '-']).take(3).enumerate() {
        out[i] = part
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect::<String>()
            .parse()
            .unwrap_or(0);
    }
    out
}

/// Held while an incoming migration's Prepare looks at the layers and images this host has
/// until its staging directory names its image ([`ARRIVING_FILE`]), and while a migration that
/// rolls back hands the image it added to another arriving move ([`arriving_with_image`]) or
/// removes it, and removes its staging directory. Without it a Prepare could find the image
/// between a rollback's look for another move of it and its removal (and lose it underneath),
/// and a rollback could hand the image to a move whose own cleanup had already read its
/// `IMAGE_ADDED` (the image then leaked) (review of session 26, F7). An async lock: the
/// removal awaits.
static IMAGES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Takes [`IMAGES`].
pub(super) async fn images_held() -> tokio::sync::MutexGuard<'static, ()> {
    IMAGES.lock().await
}

/// Held while an incoming migration checks that no other one brings a container of the same id
/// or name, and reserves its own ([`ARRIVING_FILE`]).
static ARRIVING: Mutex<()> = Mutex::new(());

/// In an incoming migration's staging directory: the container's id, name and image id, one per
/// line.
const ARRIVING_FILE: &str = "ARRIVING";

/// How old a staging directory without a journal must be to count as left over: a Prepare
/// journals its migration right after it reserved the directory.
const STALE_STAGING: Duration = Duration::from_secs(300);

/// The incoming migrations' staging directories (`<id>.in`), those left over excepted
/// ([`left_over`]).
fn staging_dirs(state_dir: &Path) -> impl Iterator<Item = PathBuf> + '_ {
    std::fs::read_dir(journal::dir(state_dir))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(".in"))
        .filter(move |p| !left_over(state_dir, p))
}

/// Whether staging directory `dir` belongs to no migration under way: its journal says the
/// migration ended, or it has none and is older than [`STALE_STAGING`] (the agent stopped
/// between the Prepare's check and its journal). Its `ARRIVING` then refused every later move
/// of that container, or of one of its name, into this host (QA of session 30, L6: two were
/// left after moves settled as committed).
fn left_over(state_dir: &Path, dir: &Path) -> bool {
    let Some(id) = dir
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_suffix(".in"))
    else {
        return false;
    };
    match journal::read(state_dir, id) {
        Some(e) => journal::is_final(&e.state),
        // A journal that cannot be read (the start's recovery skips it and says so) keeps it.
        None if journal::path(state_dir, id).is_ok_and(|p| p.exists()) => false,
        None => std::fs::metadata(dir)
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > STALE_STAGING)),
    }
}

/// Removes the staging directories left over ([`left_over`]); at the agent's start.
pub(crate) fn remove_left_over_staging(state_dir: &Path) {
    let dirs = std::fs::read_dir(journal::dir(state_dir))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(".in") && left_over(state_dir, p));
    for dir in dirs {
        tracing::info!(dir = %dir.display(), "removing the staging directory of a migration that ended");
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a left-over staging directory");
        }
    }
}

/// Another incoming migration's staging directory (not `mine`) whose container is of image
/// `image`: a move that rolls back leaves such an image to it (QA of session 26: two moves of
/// one image into one host, the one that rolled back removed the image the other had found
/// there, and the other's restore failed).
pub(super) fn arriving_with_image(state_dir: &Path, mine: &Path, image: &str) -> Option<PathBuf> {
    staging_dirs(state_dir).filter(|p| p != mine).find(|p| {
        std::fs::read_to_string(p.join(ARRIVING_FILE))
            .is_ok_and(|t| t.lines().nth(2) == Some(image))
    })
}

/// Takes [`ARRIVING`]: held by whatever checks a new container's name against this host's
/// containers and the arriving ones until the container is recorded (`mig run`, an import),
/// taken before the containers' map.
pub(crate) fn reserving() -> std::sync::MutexGuard<'static, ()> {
    ARRIVING.lock().unwrap_or_else(|p| p.into_inner())
}

/// The id of the container named `name` that an incoming migration brings, if one does.
pub(crate) fn arriving_named(state_dir: &Path, name: &str) -> Option<String> {
    arriving(state_dir).find_map(|(_, id, n)| (n == name).then_some(id))
}

/// Whether an incoming migration reserved container id `id` (from its Prepare on, before the
/// container has a directory here).
pub(crate) fn arriving_id(state_dir: &Path, id: &str) -> bool {
    arriving(state_dir).any(|(_, i, _)| i == id)
}

/// The incoming migrations' staging directories with the id and name each reserved.
fn arriving(state_dir: &Path) -> impl Iterator<Item = (PathBuf, String, String)> + '_ {
    staging_dirs(state_dir).filter_map(|dir| {
        let text = std::fs::read_to_string(dir.join(ARRIVING_FILE)).ok()?;
        let mut lines = text.lines();
        let (id, name) = (lines.next()?.to_owned(), lines.next()?.to_owned());
        Some((dir, id, name))
    })
}

/// The id and name of a container another incoming migration (another staging directory than
/// `mine`) brings, when it has `p`'s id or name.
fn arriving_elsewhere(state_dir: &Path, mine: &Path, p: &Prepare) -> Option<(String, String)> {
    arriving(state_dir)
        .find(|(dir, id, name)| dir != mine && (*id == p.spec.id || *name == p.spec.name))
        .map(|(_, id, name)| (id, name))
}

/// Refuses to restore an image set whose memory this host cannot hold. In stream mode (a local
/// lazy-pages daemon) and in post-copy the restored processes are charged for their memory only
/// after the resume, when the move has committed and the source's copy is gone: a lack of
/// memory found then loses the container (QA of session 21: an OOM kill 20 ms after a commit).
/// What the processes will hold is every page the pagemaps list (at most the container's own
/// memory limit); what is left is the host's MemAvailable and the room under the limits of the
/// agent's cgroup parent and its ancestors. With `per_process` (the pages arrive through a
/// lazy-pages daemon, one copy per process even where forked processes shared them: post-copy,
/// and stream mode's local daemon), the container's own limit is room too, not a cap: above it
/// the copy would be OOM-killed after the commit.
///
/// Moves arriving at once each fit alone but not together (QA of session 26: two hosts moving
/// 180 MiB each into 250 MiB, both "moved", one OOM-killed a second later): what a move was
/// found to need is held for it ([`RESERVED`]) until its copy is charged for it or the move
/// ends ([`release_memory`]), and the check of another leaves that out of the room.
pub(super) fn memory_fits(
    migration_id: &str,
    checkpoint: &Path,
    limit: Option<u64>,
    cgroup_parent: &str,
    per_process: bool,
) -> Result<(), DestError> {
    let pages = match mig_migrate::criu::lazy_proxy::pagemap_bytes(checkpoint) {
        Ok(b) => b,
        Err(e) => {
            // The restore reads the same images and reports what is wrong with them.
            tracing::warn!(error = %chain(&e), "cannot count the image set's pages; no memory check");
            return Ok(());
        }
    };
    let need = match limit {
        Some(l) if !per_process => pages.min(l),
        _ => pages,
    };
    let mut reserved = RESERVED.lock().unwrap_or_else(|p| p.into_inner());
    reserved.retain(|_, (_, at)| at.elapsed() < RESERVATION_LIFE);
    let others: u64 = reserved
        .iter()
        .filter(|(id, _)| id.as_str() != migration_id)
        .map(|(_, (bytes, _))| *bytes)
        .sum();
    // What other arriving moves hold comes out of the rooms they share with this one (the
    // host's, the agent's cgroup parent's), not out of this container's own limit.
    let shared = |room: u64, within: String| {
        if others == 0 {
            (room, within)
        } else {
            (
                room.saturating_sub(others),
                format!(
                    "{within}, less the {} MiB that other moves arriving here hold",
                    others >> 20
                ),
            )
        }
    };
    let mut left: Vec<(u64, String)> = Vec::new();
    if let (Some(l), true) = (limit, per_process) {
        left.push((
            l,
            "the container's own memory limit (pages that arrive after the resume come one copy per process, so memory that forked processes share counts once per process; a restore keeps shared only what a process shares with its living parent: raise the limit to hold every process's copy)".into(),
        ));
    }
    if let Some(avail) = crate::daemon::info::mem_available_bytes() {
        left.push(shared(
            avail,
            "the host's available memory (MemAvailable)".into(),
        ));
    }
    match mig_runtime::cgroup::memory_room(cgroup_parent) {
        Ok(Some((room, dir))) => left.push(shared(
            room,
            format!("the memory limit of {}", dir.display()),
        )),
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(error = %chain(&e), "cannot read the memory limits above the containers")
        }
    }
    match left.into_iter().min_by_key(|(room, _)| *room) {
        Some((room, within)) if need > room => Err(DestError::NoMemory { need, room, within }),
        least => {
            tracing::info!(
                migration = %migration_id,
                need_mib = need >> 20,
                room_mib = least.as_ref().map(|(room, _)| room >> 20),
                within = least.as_ref().map(|(_, within)| within.as_str()),
                "the container's memory fits here; held for it until its copy is charged"
            );
            reserved.insert(migration_id.to_owned(), (need, Instant::now()));
            Ok(())
        }
    }
}

/// Memory found to fit for incoming moves whose copies are not charged for it yet, by
/// migration id, with when it was found.
static RESERVED: Mutex<BTreeMap<String, (u64, Instant)>> = Mutex::new(BTreeMap::new());

/// A reservation left by a path that did not release it stops counting after this long.
const RESERVATION_LIFE: Duration = Duration::from_secs(30 * 60);

/// The copy of `migration_id` is charged for its memory (restored with every page, or the last
/// page arrived), or the move rolled back: its memory no longer needs holding.
pub(crate) fn release_memory(migration_id: &str) {
    RESERVED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(migration_id);
}

#[cfg(test)]
mod tests {
    use super::{unrestorable_here, version_key};

    /// Staging directories of migrations that ended, or that never got a journal and are old,
    /// are left over: removed at the start, and not taken for a container arriving (QA of
    /// session 30, L6).
    #[test]
    fn staging_of_ended_migrations_is_left_over() {
        use crate::migration::journal::{self, JournalEntry};
        use mig_migrate::protocol::{JournalState, Role};
        let state = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(journal::dir(state.path())).unwrap();
        let staged = |state_now: Option<JournalState>| {
            let id = journal::new_id();
            let dir = journal::staging(state.path(), &id).unwrap();
            std::fs::create_dir(&dir).unwrap();
            std::fs::write(dir.join(super::ARRIVING_FILE), format!("{id}\nweb\nimg\n")).unwrap();
            if let Some(st) = state_now {
                let (updated, updated_ns) = journal::now();
                let e = JournalEntry {
                    migration_id: id.clone(),
                    role: Role::Dest,
                    state: st,
                    container_id: id.clone(),
                    container_name: "web".into(),
                    peer: "host-a".into(),
                    cgroup: String::new(),
                    updated,
                    updated_ns,
                };
                journal::write(state.path(), &e).unwrap();
            }
            dir
        };
        let committed = staged(Some(JournalState::Committed));
        let rolled_back = staged(Some(JournalState::RolledBack));
        let in_doubt = staged(Some(JournalState::InDoubt));
        let fresh = staged(None);
        let old = staged(None);
        let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        std::fs::File::open(&old)
            .unwrap()
            .set_modified(hour_ago)
            .unwrap();
        let arriving: Vec<_> = super::arriving(state.path()).map(|(d, _, _)| d).collect();
        assert!(arriving.contains(&in_doubt) && arriving.contains(&fresh));
        assert_eq!(arriving.len(), 2, "{arriving:?}");
        super::remove_left_over_staging(state.path());
        for gone in [&committed, &rolled_back, &old] {
            assert!(!gone.exists(), "{gone:?}");
        }
        assert!(in_doubt.exists() && fresh.exists());
    }

    #[test]
    fn archives_of_a_newer_criu_or_kernel_are_refused() {
        let newer = unrestorable_here("99.0", "").expect("CRIU 99.0 is newer than any here");
        assert!(newer.contains("99.0"), "{newer}");
        if mig_migrate::criu::Criu::locate().is_ok() {
            assert_eq!(unrestorable_here("1.0", "1.0"), None);
            let kernel = unrestorable_here("1.0", "999.0.0").expect("a newer kernel");
            assert!(
                kernel.contains("older than the archive's 999.0.0"),
                "{kernel}"
            );
        }
    }

    #[test]
    fn versions() {
        assert_eq!(version_key("4.1.1"), [4, 1, 1]);
        assert_eq!(version_key("Version: 4.2"), [4, 2, 0]);
        assert_eq!(version_key("6.18.0-1-amd64"), [6, 18, 0]);
        assert!(version_key("4.1.1") < version_key("4.2.1"));
    }
}
