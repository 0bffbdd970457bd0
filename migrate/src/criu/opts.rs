//! The options of a dump and a restore, and the `criu` command lines they become.

use std::ffi::OsString;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

/// Where memory pages go (dump) or come from (page server) instead of image files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageTarget {
    /// A TCP page server: the dump connects to `address:port`, the page server listens there.
    Tcp { address: String, port: u16 },
    /// A connected stream socket (for example one end of a socketpair the agent bridges to its
    /// QUIC connection); the `criu` child inherits it. Must be open and at least 3.
    Socket(RawFd),
}

impl PageTarget {
    fn push_args(&self, a: &mut Vec<OsString>) {
        match self {
            PageTarget::Tcp { address, port } => {
                push(a, "--address", address);
                push(a, "--port", port.to_string());
            }
            PageTarget::Socket(fd) => push(a, "--ps-socket", fd.to_string()),
        }
    }
}

/// What [`super::Criu::dump`] dumps and how.
#[derive(Debug, Clone, Default)]
pub struct DumpOpts {
    /// Host PID of the tree's root (the container's init).
    pub pid: i32,
    /// Where the images go (created if missing).
    pub images_dir: PathBuf,
    /// The container's root filesystem as the host sees it (`--root`); `None` for a tree that
    /// shares the host's mount namespace.
    pub root: Option<PathBuf>,
    /// The cgroup the caller froze first (`--freeze-cgroup`): CRIU then skips its own slow
    /// freeze and leaves the cgroup in the state it found it.
    pub freeze_cgroup: Option<PathBuf>,
    /// Keep the tree running after the dump (a checkpoint) instead of killing it.
    pub leave_running: bool,
    /// `--external` resources (`mnt[PATH]:KEY`, `file[MNT_ID:INODE]`, ...).
    pub external: Vec<String>,
    /// Dump established TCP connections (`--tcp-established`, with CRIU's iptables network
    /// lock). When false the network lock is skipped (`--network-lock skip`), which saves about
    /// 80 ms of dump and restore time here: without dumped connections there is nothing to
    /// protect from the peer.
    pub tcp_established: bool,
    /// Send memory pages to a page server (`--page-server`) instead of writing `pages-*.img`
    /// into `images_dir`: the destination's `criu page-server` writes them into its own images
    /// directory while the dump runs.
    pub page_server: Option<PageTarget>,
    /// CRIU's log; relative paths are relative to `images_dir` (kept next to the image set).
    pub log_file: PathBuf,
    /// Soft-dirty memory tracking (`--track-mem`): the dump resets the tree's dirty bits so the
    /// next iteration writes only pages changed since. Needs the kernel's
    /// `CONFIG_MEM_SOFT_DIRTY` (`criu check --feature mem_dirty_track`); a pre-dump always
    /// tracks.
    pub track_mem: bool,
    /// The previous iteration's images (`--prev-images-dir`), relative to `images_dir` as CRIU
    /// wants it (it becomes the `parent` symlink in `images_dir`): pages unchanged since then
    /// are not written again and the restore reads them through the link.
    pub prev_images_dir: Option<PathBuf>,
    /// Copies of the frozen tree's `smaps` ([`super::smaps::SmapsCopy`]) that the dump may use
    /// instead of reading them itself ([`super::smaps::SMAPS_DIR`]); only for a tree the caller
    /// froze before starting CRIU. Dumps only, never a pre-dump.
    pub smaps_dir: Option<PathBuf>,
    /// Anything else, passed as given after mig's options (`--tcp-established`, ...).
    pub extra: Vec<String>,
}

/// What [`super::Criu::restore`] restores and how.
#[derive(Debug, Clone, Default)]
pub struct RestoreOpts {
    pub images_dir: PathBuf,
    /// The new root filesystem (`--root`); `None` for a tree that shares the host's mounts.
    pub root: Option<PathBuf>,
    /// Descriptors the `criu` child inherits and hands to the restored tree in place of the
    /// dumped resource: `(fd, "pipe:[INO]")` becomes `--inherit-fd fd[FD]:pipe:[INO]`. The fd
    /// must be open in the caller and at least 3.
    pub inherit_fds: Vec<(RawFd, String)>,
    /// `cgroup.procs` files the `criu` child writes `0` to before exec, so the restored tasks
    /// are born in the container's cgroup (CRIU itself runs with `--manage-cgroups=ignore`).
    pub cgroup_procs: Vec<PathBuf>,
    /// CRIU's log; relative paths are relative to `images_dir`.
    pub log_file: PathBuf,
    /// Where CRIU writes the host PID of the restored root (`--pidfile`); relative paths are
    /// relative to `images_dir`.
    pub pidfile: PathBuf,
    pub external: Vec<String>,
    /// Must match the dump's [`DumpOpts::tcp_established`].
    pub tcp_established: bool,
    /// Post-copy: memory comes from a `criu lazy-pages` daemon started on `images_dir` first
    /// (`--lazy-pages`).
    pub lazy_pages: bool,
    /// CRIU's work directory (`--work-dir`); a lazy restore needs the one its `criu lazy-pages`
    /// daemon uses. `None`: the images directory.
    pub work_dir: Option<PathBuf>,
    /// An action script (`--action-script`) and the actions it is needed for.
    pub action_script: Option<ActionScript>,
    /// Anything else, passed as given after mig's options.
    pub extra: Vec<String>,
}

/// A CRIU action script and the actions (CRIU's names, such as `pre-resume`) it is needed for.
///
/// CRIU runs a script for every action, a fork and an exec each (1 to 5 ms), while the
/// container is down; a restore passes through six. A CRIU with mig's patch 0007
/// (docs/criu.md, "Patches") runs it only for the actions named in [`ACTION_SCRIPT_ONLY`], which
/// [`super::Criu::restore`] sets. Any other CRIU runs it for all of them, so the script must
/// still return at once for the others.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ActionScript {
    pub path: PathBuf,
    pub actions: Vec<&'static str>,
}

/// The environment variable of mig's patch 0007: the actions, comma-separated, that action
/// scripts are run for.
pub const ACTION_SCRIPT_ONLY: &str = "CRIU_ACTION_SCRIPT_ONLY";

/// `path` if absolute, else `dir/path` (CRIU resolves `-o` and `--pidfile` against its work
/// directory, which is the images directory).
pub fn resolve(dir: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_owned()
    } else {
        dir.join(path)
    }
}

fn network(args: &mut Vec<OsString>, tcp_established: bool) {
    if tcp_established {
        args.push("--tcp-established".into());
    } else {
        push(args, "--network-lock", "skip");
    }
}

pub(super) fn push(args: &mut Vec<OsString>, flag: &str, value: impl Into<OsString>) {
    args.push(flag.into());
    args.push(value.into());
}

impl DumpOpts {
    /// The argument list of `criu` (without the program name).
    pub fn args(&self) -> Vec<OsString> {
        let mut a = self.head("dump", true);
        if self.leave_running {
            a.push("--leave-running".into());
        }
        // A connection a listening socket has not accepted yet (CRIU: "In-flight connection")
        // is left out rather than failing the dump: its client sees it reset, as at a server
        // restart (QA of session 21: 3 of 20 moves of a busy web server failed).
        a.push("--skip-in-flight".into());
        network(&mut a, self.tcp_established);
        if let Some(ps) = &self.page_server {
            a.push("--page-server".into());
            ps.push_args(&mut a);
        }
        self.iteration(&mut a);
        self.tail(&mut a);
        a
    }

    /// The argument list of `criu pre-dump` (without the program name): one iteration of
    /// pre-copy. The tree is frozen only while its memory is collected, then runs again while
    /// CRIU writes the pages (`--pre-dump-mode splice`, CRIU's default). Tracking is implied;
    /// `leave_running`, the network options and the page server do not apply.
    pub fn pre_dump_args(&self) -> Vec<OsString> {
        let mut a = self.head("pre-dump", false);
        a.push("--track-mem".into());
        if let Some(prev) = &self.prev_images_dir {
            push(&mut a, "--prev-images-dir", prev);
        }
        self.tail(&mut a);
        a
    }

    /// The command, the tree, where the images and the log go, the cgroup options, `--root`
    /// and `--freeze-cgroup`: what a dump and a pre-dump share, in that order.
    fn head(&self, command: &str, file_locks: bool) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec![command.into()];
        push(&mut a, "--tree", self.pid.to_string());
        push(&mut a, "--images-dir", &self.images_dir);
        push(
            &mut a,
            "--log-file",
            resolve(&self.images_dir, &self.log_file),
        );
        a.push("-v4".into());
        a.push("--manage-cgroups=ignore".into());
        if file_locks {
            a.push("--file-locks".into());
        }
        if let Some(root) = &self.root {
            push(&mut a, "--root", root);
        }
        if let Some(cg) = &self.freeze_cgroup {
            push(&mut a, "--freeze-cgroup", cg);
        }
        a
    }

    /// `--external` and the caller's extra arguments, last.
    fn tail(&self, a: &mut Vec<OsString>) {
        for e in &self.external {
            push(a, "--external", e);
        }
        a.extend(self.extra.iter().map(OsString::from));
    }

    fn iteration(&self, a: &mut Vec<OsString>) {
        if self.track_mem {
            a.push("--track-mem".into());
        }
        if let Some(prev) = &self.prev_images_dir {
            push(a, "--prev-images-dir", prev);
        }
    }
}

impl RestoreOpts {
    /// The argument list of `criu` (without the program name).
    pub fn args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec!["restore".into()];
        push(&mut a, "--images-dir", &self.images_dir);
        push(
            &mut a,
            "--log-file",
            resolve(&self.images_dir, &self.log_file),
        );
        a.push("-v4".into());
        a.push("--manage-cgroups=ignore".into());
        a.push("--file-locks".into());
        a.push("--restore-detached".into());
        push(
            &mut a,
            "--pidfile",
            resolve(&self.images_dir, &self.pidfile),
        );
        if let Some(root) = &self.root {
            push(&mut a, "--root", root);
        }
        network(&mut a, self.tcp_established);
        if self.lazy_pages {
            a.push("--lazy-pages".into());
        }
        if let Some(w) = &self.work_dir {
            push(&mut a, "--work-dir", w);
        }
        for (fd, what) in &self.inherit_fds {
            push(&mut a, "--inherit-fd", format!("fd[{fd}]:{what}"));
        }
        for e in &self.external {
            push(&mut a, "--external", e);
        }
        if let Some(s) = &self.action_script {
            push(&mut a, "--action-script", &s.path);
        }
        a.extend(self.extra.iter().map(OsString::from));
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strs(a: Vec<OsString>) -> Vec<String> {
        a.into_iter().map(|s| s.into_string().unwrap()).collect()
    }

    #[test]
    fn dump_args() {
        let o = DumpOpts {
            pid: 42,
            images_dir: "/var/img".into(),
            root: Some("/rootfs".into()),
            freeze_cgroup: Some("/sys/fs/cgroup/unified/mig/x".into()),
            leave_running: true,
            external: vec!["mnt[/x]:x".into()],
            tcp_established: true,
            page_server: Some(PageTarget::Tcp {
                address: "10.0.0.2".into(),
                port: 27000,
            }),
            log_file: "dump.log".into(),
            track_mem: false,
            prev_images_dir: None,
            smaps_dir: Some("/var/smaps".into()),
            extra: vec!["--ext-unix-sk".into()],
        };
        let a = strs(o.args()).join(" ");
        assert_eq!(
            a,
            "dump --tree 42 --images-dir /var/img --log-file /var/img/dump.log -v4 \
             --manage-cgroups=ignore --file-locks --root /rootfs --freeze-cgroup \
             /sys/fs/cgroup/unified/mig/x --leave-running --skip-in-flight --tcp-established \
             --page-server \
             --address 10.0.0.2 --port 27000 --external mnt[/x]:x \
             --ext-unix-sk"
        );
    }

    #[test]
    fn final_dump_after_rounds_tracks_and_names_the_last_round() {
        let o = DumpOpts {
            pid: 42,
            images_dir: "/w/images".into(),
            leave_running: true,
            log_file: "dump.log".into(),
            track_mem: true,
            prev_images_dir: Some("../rounds/3".into()),
            ..Default::default()
        };
        assert_eq!(
            strs(o.args()).join(" "),
            "dump --tree 42 --images-dir /w/images --log-file /w/images/dump.log -v4 \
             --manage-cgroups=ignore --file-locks --leave-running --skip-in-flight \
             --network-lock skip --track-mem --prev-images-dir ../rounds/3"
        );
    }

    #[test]
    fn pre_dump_args() {
        let first = DumpOpts {
            pid: 7,
            images_dir: "/w/rounds/1".into(),
            root: Some("/rootfs".into()),
            freeze_cgroup: Some("/sys/fs/cgroup/unified/mig/x".into()),
            // Ignored by a pre-dump: the tree always keeps running, nothing of the network
            // is dumped, pages go to files.
            leave_running: true,
            tcp_established: true,
            page_server: Some(PageTarget::Socket(5)),
            external: vec!["mnt[/x]:x".into()],
            log_file: "pre-dump.log".into(),
            ..Default::default()
        };
        assert_eq!(
            strs(first.pre_dump_args()).join(" "),
            "pre-dump --tree 7 --images-dir /w/rounds/1 --log-file /w/rounds/1/pre-dump.log \
             -v4 --manage-cgroups=ignore --root /rootfs --freeze-cgroup \
             /sys/fs/cgroup/unified/mig/x --track-mem --external mnt[/x]:x"
        );
        let second = DumpOpts {
            images_dir: "/w/rounds/2".into(),
            prev_images_dir: Some("../1".into()),
            root: None,
            freeze_cgroup: None,
            external: vec![],
            ..first
        };
        assert_eq!(
            strs(second.pre_dump_args()).join(" "),
            "pre-dump --tree 7 --images-dir /w/rounds/2 --log-file /w/rounds/2/pre-dump.log \
             -v4 --manage-cgroups=ignore --track-mem --prev-images-dir ../1"
        );
    }

    /// A loopback-only container's move (docs/criu.md "Network namespace"): its network
    /// namespace is external on dump, and the restore inherits a fresh one under the same key,
    /// after the log pipe.
    #[test]
    fn external_netns_on_dump_and_inherited_on_restore() {
        let dump = DumpOpts {
            pid: 42,
            images_dir: "/w/images".into(),
            leave_running: true,
            log_file: "dump.log".into(),
            external: vec!["net[4026532301]:mig-netns".into()],
            ..Default::default()
        };
        assert_eq!(
            strs(dump.args()).join(" "),
            "dump --tree 42 --images-dir /w/images --log-file /w/images/dump.log -v4 \
             --manage-cgroups=ignore --file-locks --leave-running --skip-in-flight \
             --network-lock skip --external net[4026532301]:mig-netns"
        );
        let restore = RestoreOpts {
            images_dir: "/c/checkpoint".into(),
            inherit_fds: vec![(5, "pipe:[123]".into()), (7, "mig-netns".into())],
            log_file: "restore.log".into(),
            pidfile: "/c/restore.pid".into(),
            tcp_established: true,
            ..Default::default()
        };
        assert_eq!(
            strs(restore.args()).join(" "),
            "restore --images-dir /c/checkpoint --log-file /c/checkpoint/restore.log -v4 \
             --manage-cgroups=ignore --file-locks --restore-detached --pidfile /c/restore.pid \
             --tcp-established --inherit-fd fd[5]:pipe:[123] --inherit-fd fd[7]:mig-netns"
        );
    }

    #[test]
    fn restore_args() {
        let o = RestoreOpts {
            images_dir: "/var/img".into(),
            root: None,
            inherit_fds: vec![(5, "pipe:[123]".into())],
            cgroup_procs: vec![],
            log_file: "/logs/restore.log".into(),
            pidfile: "restore.pid".into(),
            external: vec![],
            tcp_established: false,
            lazy_pages: false,
            work_dir: None,
            action_script: Some(ActionScript {
                path: "/c/hook.sh".into(),
                actions: vec!["pre-resume"],
            }),
            extra: vec![],
        };
        let a = strs(o.args()).join(" ");
        assert_eq!(
            a,
            "restore --images-dir /var/img --log-file /logs/restore.log -v4 \
             --manage-cgroups=ignore --file-locks --restore-detached --pidfile \
             /var/img/restore.pid --network-lock skip --inherit-fd fd[5]:pipe:[123] \
             --action-script /c/hook.sh"
        );
    }
}
