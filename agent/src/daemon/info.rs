//! `info` and the image requests.

use super::Agent;
use crate::api::{
    ApiError, ContainerState, ContainerSummary, ErrorKind, HostInfo, ImageInfo, InDoubt, Moving,
    Response, UnreadableRecord, API_VERSION, API_VERSION_MIN,
};
use mig_migrate::protocol::{JournalState, Role};
use mig_runtime::cgroup::{Cgroup, Usage};
use mig_runtime::image::{Image, ImageError, UnreadableImage, RECORD_FORMAT};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

fn image_info(i: Image) -> ImageInfo {
    ImageInfo {
        name: i.name,
        id: i.id,
        layers: i.layers,
        created: i.created,
        size: i.size,
        unreadable: None,
    }
}

fn unreadable_info(u: UnreadableImage) -> ImageInfo {
    ImageInfo {
        name: u.name.clone(),
        id: String::new(),
        layers: Vec::new(),
        created: 0,
        size: 0,
        unreadable: Some(UnreadableRecord {
            path: u.path.display().to_string(),
            format: u.newer_format,
            supported_format: RECORD_FORMAT.current,
            message: u.message(),
        }),
    }
}

fn image_error(e: ImageError) -> ApiError {
    let kind = match &e {
        ImageError::NotFound(_) => ErrorKind::NotFound,
        ImageError::Unimplemented | ImageError::NewerRecord { .. } => ErrorKind::Unavailable,
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
        // A tree holding the state directory would be copied into itself, without end (QA of
        // session 25: a bundle whose root.path was `/` filled 7 GB in 4 minutes).
        let state =
            std::fs::canonicalize(&self.cfg.state_dir).unwrap_or(self.cfg.state_dir.clone());
        if let Ok(real) = std::fs::canonicalize(&path) {
            if real.is_dir() && state.starts_with(&real) {
                return Err(ApiError::new(
                    ErrorKind::InvalidArgument,
                    format!(
                        "refusing to import {path}: it holds this agent's state directory ({}), which the import would copy into itself; import the root filesystem's own directory",
                        state.display()
                    ),
                ));
            }
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
        let all = self.blocking(move || images.list_all()).await?;
        for u in &all.unreadable {
            tracing::warn!(path = %u.path.display(), error = %u.message(), "image record not read");
        }
        let mut list: Vec<ImageInfo> = all.images.into_iter().map(image_info).collect();
        list.extend(all.unreadable.into_iter().map(unreadable_info));
        list.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Response::Images(list))
    }

    pub(crate) async fn image_remove(self: &Arc<Self>, key: String) -> Result<Response, ApiError> {
        let images = self.images.clone();
        let img = {
            let k = key.clone();
            self.blocking(move || images.get(&k)).await?
        };
        // Another name of the same image (the same layout imported twice) keeps it for the
        // containers that use it: this name can go.
        let images = self.images.clone();
        let (id, name) = (img.id.clone(), img.name.clone());
        let other_name = self
            .blocking(move || images.list())
            .await?
            .iter()
            .any(|i| i.id == id && i.name != name);
        let used_by: Vec<String> = self
            .lock()
            .values()
            .filter(|e| e.spec.image.id == img.id && !other_name)
            .map(|e| e.spec.name.clone())
            .collect();
        // A container whose records this agent cannot read may use it too: its spec is read as
        // text (the image id appears in it whatever its format); unreadable, it may use any image.
        let unread_users: Vec<String> = self
            .unread_containers()
            .into_iter()
            .filter(|(id, _)| {
                std::fs::read_to_string(self.dirs.container(id).spec())
                    .map_or(true, |text| text.contains(&img.id))
            })
            .map(|(id, _)| id)
            .collect();
        if !unread_users.is_empty() {
            return Err(ApiError::new(
                ErrorKind::Conflict,
                format!(
                    "image {} may be used by containers whose records this agent cannot read: {}",
                    img.name,
                    unread_users.join(", ")
                ),
            ));
        }
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
        let mem = meminfo();
        let total_mem = mem.total.unwrap_or(0);
        let free = mem.available.unwrap_or(0);
        let mut by_state = BTreeMap::new();
        for c in self.list_with_usage(true) {
            *by_state.entry(c.state.as_str().to_owned()).or_insert(0u32) += 1;
        }
        let (cmem, ccpu) = self.containers_usage();
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
            memory_bytes: total_mem,
            state_dir: self.cfg.state_dir.display().to_string(),
            cgroup_parent: self.cfg.cgroup_parent.clone(),
            containers_running: running,
            containers_total: total,
            api_version_min: API_VERSION_MIN,
            protocol_version: mig_migrate::wire::PROTOCOL_VERSION.to_string(),
            criu_features: criu_features().await.clone(),
            memory_total_bytes: total_mem,
            memory_used_bytes: total_mem.saturating_sub(free),
            memory_free_bytes: free,
            containers_memory_bytes: cmem,
            containers_cpu_usec: ccpu,
            containers_by_state: by_state,
            load_avg_1m: load_avg(),
        }
    }

    /// `list`, with the live usage of running containers read from their cgroups and the
    /// migrations in doubt from the journal.
    pub(crate) fn list_with_usage(&self, all: bool) -> Vec<ContainerSummary> {
        let mut list = self.list(all);
        let journals = self.journals();
        let doubt = in_doubt(&journals);
        for c in &mut list {
            c.in_doubt = doubt.get(&c.id).cloned();
            let Some(e) = self.lock().get(&c.id).cloned() else {
                continue;
            };
            // In doubt, not moving: one of the two says why it is frozen (review of session
            // 27, L2: a restarted source's waiting copy had both).
            if c.in_doubt.is_none() {
                c.moving = moving(&journals, &e, &c.id);
            }
            c.arriving = arriving(&journals, &c.id);
            c.state = shown_state(
                &c.id,
                c.state,
                c.in_doubt.is_some(),
                c.moving.as_ref(),
                || self.cgroup_frozen(&e.state.cgroup),
            );
            if c.state == ContainerState::Running {
                c.usage = self.cgroup_usage(&c.id);
                c.memory_arriving = crate::migration::memory_arriving(&c.id);
                c.also_running_on = crate::migration::also_runs_on(&c.id);
                c.tcp_established = self
                    .init_pid_of(&c.id)
                    .and_then(|pid| mig_runtime::net::established_tcp(pid).ok())
                    .map(|n| n as u32);
            }
        }
        list
    }

    /// The migration journals on this host, read once for [`in_doubt`] and [`moving`].
    pub(crate) fn journals(&self) -> Vec<crate::migration::journal::JournalEntry> {
        crate::migration::journal::list(&self.cfg.state_dir).unwrap_or_default()
    }

    /// Whether the cgroup is frozen (or freezing): its processes do not run.
    pub(crate) fn cgroup_frozen(&self, cgroup: &str) -> bool {
        use mig_runtime::cgroup::FreezeState;
        Cgroup::open(cgroup)
            .and_then(|cg| cg.freeze_state())
            .is_ok_and(|s| matches!(s, FreezeState::Frozen | FreezeState::Freezing))
    }

    fn cgroup_usage(&self, id: &str) -> Option<Usage> {
        let cgroup = self.lock().get(id)?.state.cgroup.clone();
        Cgroup::open(&cgroup).ok()?.usage().ok()
    }

    /// The running containers' memory (bytes) and CPU time (µs), summed.
    pub(crate) fn containers_usage(&self) -> (u64, u64) {
        let running: Vec<String> = self
            .lock()
            .iter()
            .filter(|(_, e)| e.state.state == ContainerState::Running)
            .map(|(id, _)| id.clone())
            .collect();
        running
            .iter()
            .filter_map(|id| self.cgroup_usage(id))
            .fold((0, 0), |(m, c), u| (m + u.memory_bytes, c + u.cpu_usec))
    }
}

/// CRIU features worth knowing before a move, checked once per agent run.
const CRIU_FEATURES: &[&str] = &["uffd-noncoop", "mem_dirty_track", "timens"];

/// The [`CRIU_FEATURES`] that `criu check --feature` accepts here (cached).
async fn criu_features() -> &'static Vec<String> {
    static FEATURES: tokio::sync::OnceCell<Vec<String>> = tokio::sync::OnceCell::const_new();
    FEATURES
        .get_or_init(|| async {
            let mut ok = Vec::new();
            // The agent's CRIU (as criu_version), none when it has none.
            let Some(criu) = tokio::task::spawn_blocking(mig_migrate::criu::Criu::locate)
                .await
                .ok()
                .and_then(Result::ok)
            else {
                return ok;
            };
            for f in CRIU_FEATURES {
                let st = tokio::time::timeout(
                    Duration::from_secs(10),
                    tokio::process::Command::new(criu.path())
                        .args(["check", "--feature", f])
                        .stdout(std::process::Stdio::null())
                        .stderr(std::process::Stdio::null())
                        .kill_on_drop(true)
                        .status(),
                )
                .await;
                if matches!(st, Ok(Ok(s)) if s.success()) {
                    ok.push((*f).to_owned());
                }
            }
            ok
        })
        .await
}

/// The 1-minute load average.
fn load_avg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// The version of the CRIU this agent uses (`MIG_CRIU`, else the default path, else `PATH`:
/// `Criu::locate`), `None` when it finds none (QA of session 25: `mig info` showed the CRIU on
/// `PATH` while the agent's own, set by `MIG_CRIU`, was missing and every move was refused).
async fn criu_version() -> Option<String> {
    tokio::task::spawn_blocking(|| {
        mig_migrate::criu::Criu::locate()
            .ok()
            .and_then(|c| c.version().ok())
    })
    .await
    .ok()
    .flatten()
}

/// MemTotal and MemAvailable from /proc/meminfo, in bytes.
#[derive(Debug, Default)]
struct MemInfo {
    total: Option<u64>,
    available: Option<u64>,
}

/// This machine's memory (MemTotal), bytes.
pub(crate) fn mem_total_bytes() -> Option<u64> {
    meminfo().total
}

/// The memory this machine can still give without swapping (MemAvailable), bytes.
pub(crate) fn mem_available_bytes() -> Option<u64> {
    meminfo().available
}

fn meminfo() -> MemInfo {
    let Ok(info) = std::fs::read_to_string("/proc/meminfo") else {
        return MemInfo::default();
    };
    parse_meminfo(&info)
}

fn parse_meminfo(info: &str) -> MemInfo {
    let field = |name: &str| -> Option<u64> {
        let kb: u64 = info
            .lines()
            .find_map(|l| l.strip_prefix(name))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kb * 1024)
    };
    MemInfo {
        total: field("MemTotal:"),
        available: field("MemAvailable:"),
    }
}

/// The migrations in doubt on this host (journal state `InDoubt`: the link was lost at
/// Commit, or the agent restarted in the commit window; or a move this source agent found
/// stopped before its Commit when it restarted, whose destination it could not ask yet), by
/// container id; the latest when a container has several.
pub(crate) fn in_doubt(
    journals: &[crate::migration::journal::JournalEntry],
) -> BTreeMap<String, InDoubt> {
    let mut entries = journals.to_vec();
    entries.retain(|e| {
        e.state == JournalState::InDoubt
            || (e.role == Role::Source
                && crate::migration::waiting_for_destination(&e.migration_id))
    });
    entries.sort_by_key(|e| e.stamp());
    entries
        .into_iter()
        .map(|e| {
            let role = match e.role {
                Role::Source => "source",
                Role::Dest => "destination",
            };
            let d = InDoubt {
                migration_id: e.migration_id,
                role: role.into(),
                peer: e.peer,
            };
            (e.container_id, d)
        })
        .collect()
}

/// The move that took the container named or identified by `key` (a name, an id or an id
/// prefix of at least 4 characters) away from this host, when that was the last migration of it
/// here (source side, committed): for "no such container" to say where it went.
pub(crate) fn moved_away<'a>(
    journals: &'a [crate::migration::journal::JournalEntry],
    key: &str,
) -> Option<&'a crate::migration::journal::JournalEntry> {
    let last = journals
        .iter()
        .filter(|j| j.is_named(key))
        // A move back here that did not commit (refused, rolled back) never brought the
        // container back: it still is where it went (QA of session 30, F1).
        .filter(|j| j.role == Role::Source || j.state == JournalState::Committed)
        .max_by_key(|j| j.stamp())?;
    (last.role == Role::Source && last.state == JournalState::Committed).then_some(last)
}

/// The state container `id` is reported in: a running one is `frozen` while its move is in
/// doubt, while a move away holds it frozen (CRIU thaws the cgroup while it holds the tasks
/// itself), once that move sent its commit (the copy here is then ended), or while its cgroup
/// is frozen.
pub(crate) fn shown_state(
    id: &str,
    recorded: ContainerState,
    in_doubt: bool,
    moving: Option<&Moving>,
    cgroup_frozen: impl FnOnce() -> bool,
) -> ContainerState {
    let committing = moving.is_some_and(|m| m.stage == "commit_sent" || m.stage == "committed");
    let held = crate::migration::frozen_for_move(id);
    if recorded == ContainerState::Running && (in_doubt || held || committing || cgroup_frozen()) {
        ContainerState::Frozen
    } else {
        recorded
    }
}

/// The move away of a busy container in progress, from its journal (source side, not ended).
/// Whether a journal entry (`role`, `state`) is a move away still in progress here;
/// `ending_here`: this agent still holds the moved copy frozen or is ending it.
fn move_in_progress(role: Role, state: &JournalState, ending_here: bool) -> bool {
    role == Role::Source
        && match state {
            JournalState::Preparing | JournalState::Frozen | JournalState::CommitSent => true,
            JournalState::Committed => ending_here,
            _ => false,
        }
}

/// The move bringing container `id` to this host, while it is under way (its journal not
/// final and not in doubt: an in-doubt copy says so in `in_doubt`).
pub(crate) fn arriving(
    journals: &[crate::migration::journal::JournalEntry],
    id: &str,
) -> Option<crate::api::Arriving> {
    journals
        .iter()
        .filter(|j| {
            j.container_id == id
                && j.role == Role::Dest
                && !crate::migration::journal::is_final(&j.state)
                && j.state != JournalState::InDoubt
        })
        .max_by_key(|j| j.stamp())
        .map(|j| crate::api::Arriving {
            migration_id: j.migration_id.clone(),
            peer: j.peer.clone(),
        })
}

pub(crate) fn moving(
    journals: &[crate::migration::journal::JournalEntry],
    e: &super::Entry,
    id: &str,
) -> Option<Moving> {
    if !e.busy {
        return None;
    }
    // The container's move away that is not over yet, else its newest migration whatever its
    // role (an old move away that committed, the container come back since, is not this one).
    let j = journals
        .iter()
        .filter(|j| {
            j.container_id == id
                && j.role == Role::Source
                && !crate::migration::journal::is_final(&j.state)
        })
        .max_by_key(|j| j.stamp())
        .or_else(|| crate::migration::journal::newest_of(journals, id))?
        .clone();
    // A committed move away is in progress only while this agent still ends its copy here:
    // otherwise the container came back since, and an entry of the same second as the move
    // that brought it back may be the newest (CI of session 23: a container busy with a refused
    // lazy move was shown `frozen` for the committed move away before the one back).
    let ending_here = crate::migration::frozen_for_move(id) || crate::migration::ending(id);
    if !move_in_progress(j.role, &j.state, ending_here) {
        return None;
    }
    let stage = match j.state {
        JournalState::Preparing => "preparing",
        JournalState::Frozen => "frozen",
        JournalState::CommitSent => "commit_sent",
        // The destination runs it; this copy is being ended (its entry is still busy).
        _ => "committed",
    };
    Some(Moving {
        migration_id: j.migration_id,
        peer: j.peer,
        stage: stage.into(),
    })
}

#[cfg(test)]
mod tests {
    use crate::migration::journal::JournalEntry;
    use mig_migrate::protocol::{JournalState, Role};

    fn journal(
        id: &str,
        name: &str,
        role: Role,
        state: JournalState,
        updated: u64,
    ) -> JournalEntry {
        JournalEntry {
            migration_id: format!("{updated:032x}"),
            role,
            state,
            container_id: id.into(),
            container_name: name.into(),
            peer: "host-b".into(),
            cgroup: String::new(),
            updated,
            updated_ns: 0,
        }
    }

    #[test]
    fn where_a_container_went() {
        let id = "0123456789abcdef0123456789abcdef";
        let away = journal(id, "web", Role::Source, JournalState::Committed, 10);
        let js = vec![away.clone()];
        assert_eq!(super::moved_away(&js, "web"), Some(&away));
        assert_eq!(super::moved_away(&js, id), Some(&away));
        assert_eq!(super::moved_away(&js, "0123"), Some(&away));
        assert_eq!(super::moved_away(&js, "012"), None, "too short a prefix");
        assert_eq!(super::moved_away(&js, "db"), None);
        assert_eq!(super::moved_away(&js, ""), None);
        // Rolled back: it stayed (and was removed here later).
        let stayed = vec![journal(
            id,
            "web",
            Role::Source,
            JournalState::RolledBack,
            10,
        )];
        assert_eq!(super::moved_away(&stayed, "web"), None);
        // Moved away, then back: the last migration here is the arrival.
        let back = vec![
            away.clone(),
            journal(id, "web", Role::Dest, JournalState::Committed, 20),
        ];
        assert_eq!(super::moved_away(&back, "web"), None);
        // Moved away, then a move back refused here: it is still where it went.
        let refused = vec![
            away.clone(),
            journal(id, "web", Role::Dest, JournalState::RolledBack, 20),
        ];
        assert_eq!(super::moved_away(&refused, "web"), Some(&away));
    }

    /// A committed move away is in progress only while its copy is still held or ended here:
    /// after that the container came back (CI of session 23 showed it `frozen`).
    #[test]
    fn a_committed_move_away_is_over_once_its_copy_is_gone() {
        use super::move_in_progress as p;
        for state in [
            JournalState::Preparing,
            JournalState::Frozen,
            JournalState::CommitSent,
        ] {
            assert!(p(Role::Source, &state, false), "{state:?}");
        }
        assert!(p(Role::Source, &JournalState::Committed, true));
        assert!(!p(Role::Source, &JournalState::Committed, false));
        assert!(!p(Role::Source, &JournalState::RolledBack, true));
        assert!(!p(Role::Dest, &JournalState::Frozen, true));
    }

    #[test]
    fn meminfo_fields() {
        let m = super::parse_meminfo(
            "MemTotal:       2000 kB\nMemFree: 5 kB\nMemAvailable:   1000 kB\n",
        );
        assert_eq!(m.total, Some(2000 * 1024));
        assert_eq!(m.available, Some(1000 * 1024));
        assert_eq!(super::parse_meminfo("").total, None);
    }
}
