//! The command's account as the container's own /etc/passwd and /etc/group describe it: its
//! supplementary groups and its home directory. Read by the parent before clone or fork (the
//! child must not allocate), through the container's root directory.
//!
//! As runc does for Docker and podman:
//! - the groups are the primary gid, then every group of /etc/group that lists the user's name
//!   (from the passwd entry of the uid) as a member, in file order, without duplicates;
//! - `HOME`, when the environment has none, is the home of the uid's passwd entry, or `/` when
//!   there is no entry (or its home is empty).
//!
//! The files belong to the container and may be hostile: they are opened with
//! `RESOLVE_IN_ROOT` (a symlink cannot lead to the host's files), only regular files are read,
//! at most [`MAX_DB`] bytes each. A file that is missing or cannot be read counts as empty.

use super::sys;
use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Largest passwd or group file read.
const MAX_DB: u64 = 1 << 20;

/// The kernel's NGROUPS_MAX: setgroups refuses longer lists.
const MAX_GROUPS: usize = 65536;

/// What the container's files say about the command's user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Account {
    /// Supplementary groups to set, the primary gid first.
    pub groups: Vec<u32>,
    /// The home directory for `HOME`.
    pub home: String,
}

impl Account {
    /// Looks up `uid` (primary group `gid`) in the files of the container whose root directory
    /// is `root` on the host (the overlay mount, or `/proc/PID/root` of a running container).
    /// With a user namespace of `mapped` ids, groups it does not map are left out (setgroups
    /// would refuse them).
    pub(crate) fn lookup(root: &Path, uid: u32, gid: u32, mapped: Option<u32>) -> Account {
        let dir = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
            .open(root)
            .ok();
        let read = |name: &CStr| dir.as_ref().and_then(|d| read_db(d, name));
        let passwd = read(c"etc/passwd").unwrap_or_default();
        let group = read(c"etc/group").unwrap_or_default();
        Account::from_dbs(&passwd, &group, uid, gid, mapped)
    }

    /// [`Account::lookup`] on the files' contents.
    pub(crate) fn from_dbs(
        passwd: &str,
        group: &str,
        uid: u32,
        gid: u32,
        mapped: Option<u32>,
    ) -> Account {
        let entry = passwd
            .lines()
            .map(|l| l.split(':').collect::<Vec<_>>())
            .find(|f| f.len() >= 3 && f[2].parse() == Ok(uid));
        let name = entry.as_ref().map(|f| f[0]).filter(|n| !n.is_empty());
        let home = entry
            .as_ref()
            .and_then(|f| f.get(5).copied())
            .filter(|h| !h.is_empty())
            .unwrap_or("/")
            .to_owned();
        let mut groups = vec![gid];
        if let Some(name) = name {
            for f in group.lines().map(|l| l.split(':').collect::<Vec<_>>()) {
                let Some(members) = f.get(3) else { continue };
                if !members.split(',').any(|m| m.trim() == name) {
                    continue;
                }
                if let Ok(g) = f[2].parse::<u32>() {
                    if !groups.contains(&g) {
                        groups.push(g);
                    }
                }
            }
        }
        // (gid_t)-1 means "unchanged" to the kernel and is never a group.
        groups.retain(|&g| g != u32::MAX && mapped.is_none_or(|size| g < size));
        groups.truncate(MAX_GROUPS);
        Account { groups, home }
    }
}

/// `env` with `HOME=home` added when it has no `HOME` entry.
pub(crate) fn with_home(env: &[String], home: &str) -> Vec<String> {
    let mut env = env.to_vec();
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        env.push(format!("HOME={home}"));
    }
    env
}

/// Reads `path` below `root` if it is a regular file: opened without reading first (`O_PATH`, so
/// a FIFO or device node of the container is never opened for reading by the host), checked,
/// then reopened for reading.
fn read_db(root: &File, path: &CStr) -> Option<String> {
    let fd = sys::open_in_root(root.as_raw_fd(), path, libc::O_PATH).ok()?;
    let file = File::from(fd);
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    let reopened = File::open(format!("/proc/self/fd/{}", file.as_raw_fd())).ok()?;
    let mut data = Vec::new();
    reopened.take(MAX_DB).read_to_end(&mut data).ok()?;
    Some(String::from_utf8_lossy(&data).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
        postgres:x:101:103:PostgreSQL administrator,,,:/var/lib/postgresql:/bin/bash\n\
        nohome:x:202:202::/:/bin/sh\n\
        empty:x:203:203:::/bin/sh\n";
    const GROUP: &str = "root:x:0:\n\
        ssl-cert:x:101:postgres\n\
        postgres:x:103:\n\
        audio:x:29:pulse, postgres ,root\n\
        big:x:4294967295:postgres\n\
        far:x:70000:postgres\n\
        broken\n\
        wheel:x:10:root\n";

    #[test]
    fn groups_are_the_primary_gid_then_the_memberships() {
        let a = Account::from_dbs(PASSWD, GROUP, 101, 103, None);
        assert_eq!(a.groups, [103, 101, 29, 70000]);
        assert_eq!(a.home, "/var/lib/postgresql");
        let root = Account::from_dbs(PASSWD, GROUP, 0, 0, None);
        assert_eq!(root.groups, [0, 29, 10]);
        assert_eq!(root.home, "/root");
    }

    #[test]
    fn an_explicit_group_stays_first_and_is_not_repeated() {
        let a = Account::from_dbs(PASSWD, GROUP, 101, 101, None);
        assert_eq!(a.groups, [101, 29, 70000]);
    }

    #[test]
    fn unmapped_groups_are_left_out_in_a_user_namespace() {
        let a = Account::from_dbs(PASSWD, GROUP, 101, 103, Some(65536));
        assert_eq!(a.groups, [103, 101, 29]);
    }

    #[test]
    fn a_uid_without_an_entry_has_its_gid_only_and_home_slash() {
        let a = Account::from_dbs(PASSWD, GROUP, 4242, 7, None);
        assert_eq!(a.groups, [7]);
        assert_eq!(a.home, "/");
        assert_eq!(Account::from_dbs("", "", 0, 0, None).home, "/");
        assert_eq!(Account::from_dbs(PASSWD, GROUP, 203, 203, None).home, "/");
    }

    #[test]
    fn home_is_added_only_when_missing() {
        let env = vec!["PATH=/bin".to_string()];
        assert_eq!(with_home(&env, "/root"), ["PATH=/bin", "HOME=/root"]);
        let set = vec!["HOME=/srv".to_string()];
        assert_eq!(with_home(&set, "/root"), ["HOME=/srv"]);
        let empty = vec!["HOME=".to_string()];
        assert_eq!(with_home(&empty, "/root"), ["HOME="]);
        let other = vec!["HOMEDIR=/x".to_string()];
        assert_eq!(with_home(&other, "/"), ["HOMEDIR=/x", "HOME=/"]);
    }

    #[test]
    fn files_are_read_inside_the_root_only() {
        let d = tempfile::tempdir().unwrap();
        let etc = d.path().join("etc");
        std::fs::create_dir(&etc).unwrap();
        // An absolute symlink resolves inside the root, not to the host's /etc/passwd.
        std::fs::write(d.path().join("pw"), "u:x:5:5::/home/u:/bin/sh\n").unwrap();
        std::os::unix::fs::symlink("/pw", etc.join("passwd")).unwrap();
        std::os::unix::fs::symlink("/../../../../etc/group", etc.join("group")).unwrap();
        let a = Account::lookup(d.path(), 5, 5, None);
        assert_eq!(a.home, "/home/u");
        assert_eq!(a.groups, [5]);
        // The host's root (uid 0) is not found through the escaping symlink.
        assert_eq!(Account::lookup(d.path(), 0, 0, None).home, "/");
        // A FIFO is not opened for reading (this would block).
        std::fs::remove_file(etc.join("passwd")).unwrap();
        nix::unistd::mkfifo(
            &etc.join("passwd"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        assert_eq!(Account::lookup(d.path(), 5, 5, None).home, "/");
        assert_eq!(
            Account::lookup(&d.path().join("none"), 0, 9, None).groups,
            [9]
        );
    }
}
