//! What a CRIU driver must tell CRIU about a container built by [`spawn`](super::spawn).
//!
//! A container without a user namespace needs nothing: every mount in it is its own (overlay
//! root, proc, tmpfs /dev with real nodes, devpts, mqueue, sysfs, binds of its own /dev/null), so
//! a plain `criu dump -t PID --root ROOTFS` works. A container with a user namespace cannot
//! mknod, so its device nodes are bind mounts of the host's, and so are the masked files (they
//! bind the container's /dev/null, which is the host's node): CRIU refuses to dump those ("doesn't
//! have a proper root mount") unless each is declared external, as runc does for its binds and
//! masked paths. The output pipe is handled separately with `--inherit-fd` on restore.

use super::init::{DEVICES, MASKED_FILES};
use crate::pidmap::MapsLine;
use crate::spec::ContainerSpec;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// One bind mount CRIU must treat as external.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalMount {
    /// The mount point inside the container.
    pub mountpoint: String,
    /// The key that names it in the image set.
    pub key: String,
    /// What to bind there on restore (a host path).
    pub host_source: String,
}

impl ExternalMount {
    /// The value of `criu dump --external` (RPC `external`): `mnt[MOUNTPOINT]:KEY`.
    pub fn dump_arg(&self) -> String {
        format!("mnt[{}]:{}", self.mountpoint, self.key)
    }

    /// The value of `criu restore --external` (RPC `external`): `mnt[KEY]:HOST_SOURCE`.
    pub fn restore_arg(&self) -> String {
        format!("mnt[{}]:{}", self.key, self.host_source)
    }
}

/// The external mounts of a container made from `spec` (empty without a user namespace). Paths
/// that do not exist in a given container (e.g. `/proc/sched_debug` on newer kernels) are listed
/// anyway; CRIU ignores declarations that match no mount.
pub fn external_mounts(spec: &ContainerSpec) -> Vec<ExternalMount> {
    if spec.userns.is_none() {
        return Vec::new();
    }
    let key = |p: &str| format!("mig{}", p.replace('/', "-"));
    let devices = DEVICES.iter().map(|(p, _, _)| {
        let p = p.to_string_lossy();
        ExternalMount {
            mountpoint: p.to_string(),
            key: key(&p),
            host_source: p.to_string(),
        }
    });
    let masked = MASKED_FILES.iter().map(|p| {
        let p = p.to_string_lossy();
        ExternalMount {
            mountpoint: p.to_string(),
            key: key(&p),
            host_source: "/dev/null".into(),
        }
    });
    devices.chain(masked).collect()
}

/// The `--external` values of `criu dump` for a container made from `spec` (none without a user
/// namespace).
pub fn dump_externals(spec: &ContainerSpec) -> Vec<String> {
    external_mounts(spec)
        .iter()
        .map(ExternalMount::dump_arg)
        .collect()
}

/// The `--external` values of `criu restore` for a checkpoint dumped from `spec`.
pub fn restore_externals(spec: &ContainerSpec) -> Vec<String> {
    external_mounts(spec)
        .iter()
        .map(ExternalMount::restore_arg)
        .collect()
}

/// `CAP_SYS_RESOURCE`, bit 24 of the capability sets in `/proc/PID/status`.
const CAP_SYS_RESOURCE: u32 = 24;

/// A string that scripts/criu-patches/0001-dump-rlimits-from-proc-limits.patch puts into CRIU (in
/// the log message of its fallback): a CRIU binary holding it reads a process's resource limits
/// from `/proc/PID/limits` when `prlimit` is refused.
const RLIMITS_FALLBACK_MARKER: &[u8] = b"criu-rlimits-proc-fallback";

/// Why `criu dump` would fail on these host PIDs of a container, if it would. CRIU reads each
/// process's resource limits with `prlimit`, which the kernel allows only when the process's
/// real, effective and saved uid and gid are all the caller's (root's), or the caller has
/// `CAP_SYS_RESOURCE` in the process's user namespace. Some machines run root without
/// `CAP_SYS_RESOURCE` in its bounding set (what a `criu` child gets): there, a plain CRIU fails
/// to dump a container process running as another user ("Can't get rlimit 0: Operation not
/// permitted"). The CRIU that scripts/setup.sh builds reads such a process's limits from the
/// world-readable `/proc/PID/limits` instead, and then nothing is refused; only a CRIU without
/// that fallback is. Root owns a `--userns` container's user namespace, and so has every
/// capability in it: such containers are never refused. `criu` is the binary the dump will run
/// (`mig_migrate::criu::Criu::locate`). `None` when the dump can read every limit.
pub fn rlimit_blocker(pids: &[i32], userns: bool, criu: &Path) -> Option<String> {
    if userns {
        return None;
    }
    let own = std::fs::read_to_string("/proc/self/status").ok()?;
    let bounding = status_hex(&own, "CapBnd:")?;
    if bounding & (1 << CAP_SYS_RESOURCE) != 0 {
        return None;
    }
    let (pid, uid, gid) = pids.iter().find_map(|&pid| {
        let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let uids = status_ids(&text, "Uid:")?;
        let gids = status_ids(&text, "Gid:")?;
        (uids.iter().chain(&gids).any(|&id| id != 0)).then_some((pid, uids[1], gids[1]))
    })?;
    // Only now, when it matters: a process that does not run as root.
    if has_rlimits_fallback(criu) {
        return None;
    }
    Some(format!(
        "process {pid} runs as uid {uid} gid {gid}, and {} can read the resource limits of a process that does not run as root only with CAP_SYS_RESOURCE, which root on this host lacks (capability bounding set {bounding:x}); install the CRIU that scripts/setup.sh builds (it reads them from /proc/PID/limits), or run the container with --userns, or its processes as root",
        criu.display()
    ))
}

/// Why a dump would lose a file lock, or `None`: a process of `pids` holds a POSIX (`fcntl`)
/// lock on a file it also maps, and `criu` lacks patch 0015. CRIU 4.2.1 restores the process's
/// locks, then maps its files through descriptors it opens for the purpose and closes, and
/// closing any descriptor of a file drops every POSIX lock the process holds on it. The restored
/// process runs on without its lock and nothing says so (QA of session 25: SQLite in WAL mode
/// holds one on its `-shm` file, which it maps; after a restore another connection took it for
/// unused, truncated it, and the container died of SIGBUS). The patch takes the locks again once
/// the mappings are in place. Checked before anything is frozen.
pub fn lock_blocker(pids: &[i32], criu: &Path) -> Option<String> {
    let blocker = posix_lock_on_mapped_file(pids)?;
    (!has_marker(criu, POSIX_LOCKS_MARKER)).then(|| {
        format!(
            "{blocker}; {} drops such a lock when it restores the mapping, and the process would run on without it (SQLite in WAL mode then breaks its -shm file): install the CRIU that scripts/setup.sh builds (its patch 0015 keeps the lock), or end that program first",
            criu.display()
        )
    })
}

/// "process N holds a POSIX lock on PATH, which it also maps", for the first such process.
fn posix_lock_on_mapped_file(pids: &[i32]) -> Option<String> {
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    let held = posix_locks(&locks);
    pids.iter().find_map(|&pid| {
        let files: Vec<&(u32, u32, u64)> = held
            .iter()
            .filter(|(p, _)| *p == pid)
            .map(|(_, f)| f)
            .collect();
        if files.is_empty() {
            return None;
        }
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
        let path = maps.lines().find_map(|l| {
            let (file, path) = MapsLine::parse(l)?.file()?;
            files.contains(&&file).then(|| path.to_owned())
        })?;
        Some(format!(
            "process {pid} holds a POSIX (fcntl) lock on {path}, which it also maps"
        ))
    })
}

/// (host PID, (major, minor, inode)) of every POSIX lock held in a `/proc/locks` text (waiters,
/// `->` lines, left out).
fn posix_locks(text: &str) -> Vec<(i32, (u32, u32, u64))> {
    text.lines()
        .filter_map(|l| {
            // "1: POSIX  ADVISORY  READ 8 00:b2:1311212 128 128"
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 6 || f[1] != "POSIX" {
                return None;
            }
            let pid = f[4].parse().ok()?;
            let mut id = f[5].split(':');
            let major = u32::from_str_radix(id.next()?, 16).ok()?;
            let minor = u32::from_str_radix(id.next()?, 16).ok()?;
            let inode = id.next()?.parse().ok()?;
            Some((pid, (major, minor, inode)))
        })
        .collect()
}

/// The identity of a file's content for the cache: device, inode, size, modification time.
type FileId = (u64, u64, u64, i64, i64);

fn file_id(path: &Path) -> Option<FileId> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
}

/// Whether the CRIU binary at `path` holds [`RLIMITS_FALLBACK_MARKER`]. Reading the 6 MB binary
/// takes milliseconds, so the answer is kept per path and asked again only when the file changes
/// (scripts/setup.sh replaces it with a rename: a new inode). An unreadable file has no fallback.
fn has_rlimits_fallback(path: &Path) -> bool {
    has_marker(path, RLIMITS_FALLBACK_MARKER)
}

/// Whether the CRIU binary at `path` holds `marker` (a patch's log message), kept per path and
/// marker until the file changes.
fn has_marker(path: &Path, marker: &'static [u8]) -> bool {
    type Known = (PathBuf, &'static [u8], FileId, bool);
    static KNOWN: Mutex<Vec<Known>> = Mutex::new(Vec::new());
    let Some(id) = file_id(path) else {
        return false;
    };
    let mut known = KNOWN.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((.., has)) = known
        .iter()
        .find(|(p, m, i, _)| p == path && *m == marker && *i == id)
    {
        return *has;
    }
    let has = file_contains(path, marker).unwrap_or(false);
    known.retain(|(p, m, ..)| !(p == path && *m == marker));
    known.push((path.to_owned(), marker, id, has));
    has
}

/// The log message of CRIU patch 0015 (scripts/criu-patches): the restorer takes a process's
/// POSIX locks again once its files are mapped.
const POSIX_LOCKS_MARKER: &[u8] = b"criu-posix-locks-after-vmas";

/// Whether the file at `path` contains `needle` (not empty), read in chunks.
fn file_contains(path: &Path, needle: &[u8]) -> std::io::Result<bool> {
    let mut file = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 64 << 10];
    // The last `keep` bytes of a chunk start the next one: a needle across two chunks is found.
    let keep = needle.len().saturating_sub(1);
    let mut filled = 0;
    loop {
        let n = file.read(&mut buf[filled..])?;
        if n == 0 {
            return Ok(false);
        }
        filled += n;
        if buf[..filled]
            .windows(needle.len())
            .any(|w| w[0] == needle[0] && w == needle)
        {
            return Ok(true);
        }
        let tail = filled.saturating_sub(keep);
        buf.copy_within(tail..filled, 0);
        filled -= tail;
    }
}

/// The hexadecimal value of a `/proc/PID/status` line such as `CapBnd:\t000001fffeffffff`.
fn status_hex(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    u64::from_str_radix(line[key.len()..].trim(), 16).ok()
}

/// Real, effective and saved ids of a `Uid:`/`Gid:` line of `/proc/PID/status`.
fn status_ids(status: &str, key: &str) -> Option<[u32; 3]> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    let mut it = line[key.len()..].split_whitespace().map(str::parse::<u32>);
    Some([it.next()?.ok()?, it.next()?.ok()?, it.next()?.ok()?])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_parse() {
        let text = "Name:\tsleep\nUid:\t1000\t1000\t1000\t1000\nGid:\t0\t0\t0\t0\nCapBnd:\t000001fffeffffff\n";
        assert_eq!(status_ids(text, "Uid:"), Some([1000, 1000, 1000]));
        assert_eq!(status_ids(text, "Gid:"), Some([0, 0, 0]));
        let bnd = status_hex(text, "CapBnd:").unwrap();
        assert_eq!(bnd & (1 << CAP_SYS_RESOURCE), 0);
        assert_eq!(
            status_hex("CapBnd:\t000001ffffffffff\n", "CapBnd:"),
            Some(0x1ff_ffff_ffff)
        );
        assert_eq!(status_ids("Uid:\t1\n", "Uid:"), None);
    }

    #[test]
    fn locks_on_mapped_files_are_found() {
        let locks = "1: POSIX  ADVISORY  READ 8 00:b2:1311212 128 128\n\
                     1: -> POSIX  ADVISORY  WRITE 9 00:b2:1311212 128 128\n\
                     2: FLOCK  ADVISORY  WRITE 7 fe:00:42 0 EOF\n\
                     3: OFDLCK ADVISORY  READ -1 00:b2:5 0 EOF\n";
        assert_eq!(posix_locks(locks), vec![(8, (0, 0xb2, 1_311_212))]);
        let line = "7fa78f90f000-7fa78fa0f000 rw-s 00000000 00:b2 1311212    /var/tmp/wal.db-shm";
        let mapped_file = |l| MapsLine::parse(l)?.file();
        assert_eq!(
            mapped_file(line),
            Some(((0, 0xb2, 1_311_212), "/var/tmp/wal.db-shm"))
        );
        assert_eq!(mapped_file("7f-8f rw-p 00000000 00:00 0 "), None);
        assert_eq!(mapped_file("7f-8f r--p 00000000 00:05 1 [vvar]"), None);
        assert_eq!(
            mapped_file("7f-8f rw-s 00000000 00:05 17 /a dir/x (deleted)"),
            Some(((0, 5, 17), "/a dir/x (deleted)"))
        );

        // A process holding a lock on a file it maps, and one that only locks: this process.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("locked");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let lock = nix::libc::flock {
            l_type: nix::libc::F_RDLCK as i16,
            l_whence: nix::libc::SEEK_SET as i16,
            l_start: 128,
            l_len: 1,
            l_pid: 0,
        };
        use std::os::fd::AsRawFd;
        // SAFETY: a plain fcntl on a descriptor of this test, with a valid struct flock.
        let set = unsafe { nix::libc::fcntl(file.as_raw_fd(), nix::libc::F_SETLK, &lock) };
        assert_eq!(set, 0);
        let me = std::process::id() as i32;
        let plain = dir.path().join("criu-plain");
        std::fs::write(&plain, b"no marker here").unwrap();
        let patched = dir.path().join("criu-patched");
        std::fs::write(&patched, [b"xx".as_slice(), POSIX_LOCKS_MARKER].concat()).unwrap();
        assert_eq!(lock_blocker(&[me], &plain), None);
        // SAFETY: a fresh shared mapping of the file, unmapped below.
        let map = unsafe {
            nix::libc::mmap(
                std::ptr::null_mut(),
                4096,
                nix::libc::PROT_READ,
                nix::libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(map, nix::libc::MAP_FAILED);
        let why = lock_blocker(&[me], &plain);
        let with_patch = lock_blocker(&[me], &patched);
        // SAFETY: mapped above.
        unsafe { nix::libc::munmap(map, 4096) };
        let why = why.expect("the lock on a mapped file is not found");
        assert!(why.contains(&path.display().to_string()), "{why}");
        assert_eq!(with_patch, None);
    }

    #[test]
    fn own_processes_are_not_refused() {
        // This test runs as root (uid and gid 0) or is not refused for its own user namespace.
        let me = std::process::id() as i32;
        if nix::unistd::getuid().is_root() && nix::unistd::getgid().as_raw() == 0 {
            assert_eq!(rlimit_blocker(&[me], false, Path::new("criu")), None);
        }
        assert_eq!(rlimit_blocker(&[me], true, Path::new("criu")), None);
    }

    #[test]
    fn the_fallback_is_found_in_the_binary() {
        let dir = tempfile::tempdir().unwrap();
        let without = dir.path().join("criu-plain");
        std::fs::write(&without, vec![0x7fu8; 200_000]).unwrap();
        assert!(!file_contains(&without, RLIMITS_FALLBACK_MARKER).unwrap());
        assert!(!has_rlimits_fallback(&without));
        // The marker across the first two 64 KiB chunks, and at the very end.
        for at in [(64 << 10) - 5, 200_000 - RLIMITS_FALLBACK_MARKER.len()] {
            let path = dir.path().join(format!("criu-{at}"));
            let mut bytes = vec![0u8; 200_000];
            bytes[at..at + RLIMITS_FALLBACK_MARKER.len()].copy_from_slice(RLIMITS_FALLBACK_MARKER);
            std::fs::write(&path, bytes).unwrap();
            assert!(
                file_contains(&path, RLIMITS_FALLBACK_MARKER).unwrap(),
                "{at}"
            );
            assert!(has_rlimits_fallback(&path));
        }
        // A patched binary renamed over the plain one (as scripts/setup.sh installs it) is read
        // again, not answered from the cache.
        std::fs::rename(dir.path().join("criu-65531"), &without).unwrap();
        assert!(has_rlimits_fallback(&without));
        assert!(!has_rlimits_fallback(&dir.path().join("missing")));
        assert!(!file_contains(&dir.path().join("criu-plain"), b"\x7f\x7f\x01").unwrap());
    }

    #[test]
    fn only_userns_containers_have_external_mounts() {
        let mut spec = crate::spec::tests::sample();
        assert!(external_mounts(&spec).is_empty());
        spec.userns = Some(crate::spec::IdMap {
            host_id: 100_000,
            size: 65536,
        });
        let ext = external_mounts(&spec);
        let null = ext.iter().find(|m| m.mountpoint == "/dev/null").unwrap();
        assert_eq!(null.dump_arg(), "mnt[/dev/null]:mig-dev-null");
        assert_eq!(null.restore_arg(), "mnt[mig-dev-null]:/dev/null");
        let kcore = ext.iter().find(|m| m.mountpoint == "/proc/kcore").unwrap();
        assert_eq!(kcore.restore_arg(), "mnt[mig-proc-kcore]:/dev/null");
    }
}
