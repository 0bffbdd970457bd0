//! Shared helpers for the container tests: a busybox image, an overlay rootfs, a spec, and guards
//! that clean up (kill by pid, unmount, remove) even when a test fails.
#![allow(dead_code)]

use mig_runtime::cgroup::Cgroup;
use mig_runtime::container::{mount_rootfs, unmount_rootfs};
use mig_runtime::spec::{ContainerSpec, IdMap, ImageRef, Limits, ProcessSpec};
use std::fs;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

const APPLETS: &[&str] = &[
    "sh", "cat", "ls", "ps", "hostname", "mount", "umount", "sleep", "ip", "echo", "grep", "wc",
    "head", "tail", "tr", "cut", "id", "kill", "readlink", "touch", "mkdir", "pwd", "sed", "true",
    "false", "printf", "test", "stat", "seq", "unshare",
];

/// A temp dir holding a busybox image layer, an upper/work pair and one or more merged mounts.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    mounted: Vec<PathBuf>,
}

impl Fixture {
    /// Builds the busybox layer under a directory named after the test and this process.
    pub fn new(test: &str) -> Fixture {
        let dir = tempfile::Builder::new()
            .prefix(&format!("mig-{test}-{}-", std::process::id()))
            .tempdir()
            .expect("temp dir");
        let lower = dir.path().join("lower");
        fs::create_dir_all(lower.join("bin")).unwrap();
        for d in ["proc", "dev", "sys", "tmp", "mnt", "etc", "root"] {
            fs::create_dir_all(lower.join(d)).unwrap();
        }
        fs::copy("/bin/busybox", lower.join("bin/busybox")).expect("copy /bin/busybox");
        for a in APPLETS {
            symlink("busybox", lower.join("bin").join(a)).unwrap();
        }
        fs::write(lower.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
        // Writable by the container's root even when it is an unprivileged host uid (userns).
        fs::set_permissions(lower.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
        Fixture {
            dir,
            mounted: Vec::new(),
        }
    }

    pub fn lower(&self) -> PathBuf {
        self.dir.path().join("lower")
    }
    pub fn upper(&self) -> PathBuf {
        self.dir.path().join("upper")
    }
    pub fn work(&self) -> PathBuf {
        self.dir.path().join("work")
    }

    /// Mounts the overlay (single lower layer) on `<dir>/<name>` and returns that path.
    pub fn mount(&mut self, name: &str) -> PathBuf {
        let target = self.dir.path().join(name);
        mount_rootfs(&[self.lower()], &self.upper(), &self.work(), &target).expect("mount_rootfs");
        self.mounted.push(target.clone());
        target
    }

    pub fn unmount(&mut self, target: &Path) {
        unmount_rootfs(target).expect("unmount_rootfs");
        self.mounted.retain(|m| m != target);
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for m in self.mounted.drain(..) {
            let _ = unmount_rootfs(&m);
        }
    }
}

/// A process we started (or restored): SIGKILLed and reaped on drop.
pub struct Proc(pub i32);

impl Proc {
    /// Waits for the process and returns its raw wait status; the guard is then disarmed.
    pub fn wait(&mut self) -> i32 {
        let mut status = 0;
        // SAFETY: plain waitpid on our own child with a valid out pointer.
        let r = unsafe { libc::waitpid(self.0, &mut status, 0) };
        assert_eq!(r, self.0, "waitpid");
        self.0 = 0;
        status
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.0 > 0 {
            // SAFETY: signalling and reaping a process this test started, by pid.
            unsafe {
                libc::kill(self.0, libc::SIGKILL);
                libc::waitpid(self.0, std::ptr::null_mut(), 0);
            }
        }
    }
}

pub fn spec(test: &str, args: &[&str]) -> ContainerSpec {
    ContainerSpec {
        id: format!(
            "{:032x}",
            std::process::id() as u128 * 7919 + test.len() as u128
        ),
        name: format!("t-{}", std::process::id()),
        image: ImageRef {
            name: "busybox".into(),
            id: format!("sha256:{}", "a".repeat(64)),
            layers: vec![format!("sha256:{}", "b".repeat(64))],
        },
        process: ProcessSpec {
            args: args.iter().map(|s| s.to_string()).collect(),
            env: vec!["PATH=/bin".into(), "HOME=/root".into()],
            cwd: "/".into(),
            uid: 0,
            gid: 0,
        },
        hostname: format!("ct-{}", test.replace('_', "-")),
        limits: Limits::default(),
        userns: None,
        net: None,
    }
}

pub fn userns_map() -> IdMap {
    IdMap {
        host_id: 200_000,
        size: 65536,
    }
}

/// The cgroup helper's `Cgroup` with no hierarchies: `procs_files` is empty, nothing is joined.
pub fn no_cgroup() -> Cgroup {
    Cgroup {
        name: String::new(),
        dirs: Vec::new(),
    }
}

/// A close-on-exec pipe: (read end, write end).
pub fn pipe() -> (OwnedFd, OwnedFd) {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe2")
}

/// Reads until every write end is closed.
pub fn read_to_end(fd: OwnedFd) -> String {
    let mut f = fs::File::from(fd);
    let mut s = String::new();
    f.read_to_string(&mut s).expect("read pipe");
    s
}

/// `key=value` lines of a probe script's output.
pub fn kv(out: &str) -> std::collections::HashMap<String, String> {
    out.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

pub fn raw(fd: &OwnedFd) -> i32 {
    fd.as_raw_fd()
}
