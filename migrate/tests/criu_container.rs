//! Root integration test of the whole checkpoint path on a real container: a busybox container
//! (mig_runtime::container::spawn: own mount, PID, UTS, IPC and network namespaces, overlay
//! rootfs) writing a counter to a pipe is frozen through its cgroup, dumped leaving it frozen,
//! sealed, exported with its writable layer, imported elsewhere, and restored onto a second
//! overlay mount built from the imported layer, in a new cgroup, with a new pipe handed over by
//! `--inherit-fd`. It must be PID 1 again and continue counting.
//!
//! Everything (processes, mounts, cgroups, temp dirs) is removed by guards even on failure.

use mig_migrate::archive;
use mig_migrate::criu::{Criu, DumpOpts, RestoreOpts};
use mig_migrate::imageset::{self, SealInfo};
use mig_runtime::cgroup::Cgroup;
use mig_runtime::container::{mount_rootfs, spawn, unmount_rootfs, LaunchConfig};
use mig_runtime::pidmap::pid_map;
use mig_runtime::spec::{ContainerSpec, ImageRef, Limits, ProcessSpec};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::waitpid;
use nix::unistd::Pid;
use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const COUNTER: &str = "i=0; while :; do i=$((i+1)); echo $i; sleep 0.05; done";

/// Kills and reaps processes, unmounts rootfs mounts, kills and removes cgroups, on drop.
#[derive(Default)]
struct Cleanup {
    pids: Vec<i32>,
    mounts: Vec<PathBuf>,
    cgroups: Vec<Cgroup>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for cg in &self.cgroups {
            let _ = cg.thaw();
            let _ = cg.kill();
        }
        for &p in &self.pids {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
            let _ = waitpid(Pid::from_raw(p), None);
        }
        for m in &self.mounts {
            let _ = unmount_rootfs(m);
        }
        for cg in &self.cgroups {
            for _ in 0..100 {
                if cg.destroy().is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            // The shared parent goes too when no other test uses it.
            for (_, dir) in &cg.dirs {
                if let Some(parent) = dir.parent() {
                    let _ = std::fs::remove_dir(parent);
                }
            }
        }
    }
}

fn busybox_layer(dir: &Path) -> PathBuf {
    let lower = dir.join("lower");
    std::fs::create_dir_all(lower.join("bin")).unwrap();
    for d in ["proc", "dev", "sys", "tmp", "etc"] {
        std::fs::create_dir_all(lower.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", lower.join("bin/busybox")).unwrap();
    for a in ["sh", "sleep", "echo", "cat"] {
        symlink("busybox", lower.join("bin").join(a)).unwrap();
    }
    lower
}

fn spec() -> ContainerSpec {
    ContainerSpec {
        id: format!("{:032x}", 0xc0de_0000_u128 + u128::from(std::process::id())),
        name: format!("criu-ct-{}", std::process::id()),
        image: ImageRef {
            name: "busybox".into(),
            id: format!("sha256:{}", "a".repeat(64)),
            layers: vec![format!("sha256:{}", "b".repeat(64))],
        },
        process: ProcessSpec {
            args: vec!["/bin/sh".into(), "-c".into(), COUNTER.into()],
            env: vec!["PATH=/bin".into()],
            cwd: "/".into(),
            uid: 0,
            gid: 0,
        },
        hostname: "criu-ct".into(),
        limits: Limits::default(),
        userns: None,
        net: None,
    }
}

fn read_number(lines: &mut impl BufRead) -> u64 {
    let mut l = String::new();
    assert!(
        lines.read_line(&mut l).unwrap() > 0,
        "the counter's pipe closed"
    );
    l.trim().parse().unwrap()
}

#[test]
fn container_checkpoint_export_import_restore() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("not root: skipping");
        return;
    }
    let criu = match Criu::locate() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}: skipping");
            return;
        }
    };
    nix::sys::prctl::set_child_subreaper(true).unwrap();
    let tmp = tempfile::Builder::new()
        .prefix(&format!("mig-criu-container-{}-", std::process::id()))
        .tempdir()
        .unwrap();
    let t = tmp.path();
    let mut cleanup = Cleanup::default();
    let spec = spec();
    let lower = busybox_layer(t);

    // Source: overlay, cgroup, container with stdout on a pipe.
    let src_root = t.join("src-rootfs");
    mount_rootfs(
        std::slice::from_ref(&lower),
        &t.join("upper"),
        &t.join("work"),
        &src_root,
    )
    .unwrap();
    cleanup.mounts.push(src_root.clone());
    std::fs::write(t.join("upper/created-before-dump"), b"hello").unwrap();
    let src_cg = Cgroup::create(
        &format!("mig-test/criu-src-{}", std::process::id()),
        &Limits::default(),
    )
    .unwrap();
    cleanup.cgroups.push(src_cg.clone());
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let init = spawn(&LaunchConfig {
        spec: &spec,
        rootfs: &src_root,
        cgroup: &src_cg,
        output: w.as_raw_fd(),
    })
    .unwrap();
    cleanup.pids.push(init);
    drop(w);
    let mut lines = BufReader::new(std::fs::File::from(r));
    let mut last = read_number(&mut lines);
    let stdio_pipe = mig_migrate::criu::stdout_pipe(init).unwrap();
    let map_before = pid_map(&[init]);
    assert_eq!(map_before[0].ns_pid, 1);

    // Freeze, dump leaving it frozen, seal.
    let t0 = Instant::now();
    src_cg.freeze(Duration::from_secs(5)).unwrap();
    let freeze_us = t0.elapsed().as_micros();
    let images = t.join("images");
    let stats = criu
        .dump(&DumpOpts {
            pid: init,
            images_dir: images.clone(),
            root: Some(src_root.clone()),
            freeze_cgroup: src_cg.freezer_dir(),
            leave_running: true,
            log_file: "dump.log".into(),
            ..Default::default()
        })
        .unwrap();
    eprintln!("freeze {freeze_us} us, dump {stats:?}");
    imageset::seal(
        &images,
        SealInfo {
            spec: spec.clone(),
            criu_version: criu.version().unwrap(),
            pid_map: map_before.clone(),
            stdio_pipe: Some(stdio_pipe.clone()),
            stats: Some(stats),
        },
    )
    .unwrap();
    // Everything the frozen container printed before the dump.
    {
        let fd = lines.get_ref().as_raw_fd();
        let fl = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL).unwrap();
        let fl = nix::fcntl::OFlag::from_bits_truncate(fl) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFL(fl)).unwrap();
        let mut l = String::new();
        while let Ok(n) = lines.read_line(&mut l) {
            if n == 0 {
                break;
            }
            last = l.trim().parse().unwrap_or(last);
            l.clear();
        }
    }

    // Export with the writable layer, then destroy the frozen source (the "commit").
    let out = t.join("checkpoint.tar.zst");
    let t0 = Instant::now();
    archive::export(&images, Some(&t.join("upper")), &out, true).unwrap();
    eprintln!(
        "export {} us, {} bytes",
        t0.elapsed().as_micros(),
        std::fs::metadata(&out).unwrap().len()
    );
    src_cg.kill().unwrap();
    let _ = waitpid(Pid::from_raw(init), None);
    unmount_rootfs(&src_root).unwrap();
    cleanup.mounts.clear();

    // Destination: import, unpack the layer into a new upper, mount elsewhere, restore.
    let dest = t.join("imported");
    let t0 = Instant::now();
    let manifest = archive::import(&out, &dest).unwrap();
    eprintln!("import+verify {} us", t0.elapsed().as_micros());
    assert_eq!(manifest.stdio_pipe.as_deref(), Some(stdio_pipe.as_str()));
    assert!(archive::unpack_upper(&dest, &t.join("upper2")).unwrap());
    let dst_root = t.join("dst-rootfs");
    mount_rootfs(&[lower], &t.join("upper2"), &t.join("work2"), &dst_root).unwrap();
    cleanup.mounts.push(dst_root.clone());
    assert_eq!(
        std::fs::read(dst_root.join("created-before-dump")).unwrap(),
        b"hello"
    );
    let dst_cg = Cgroup::create(
        &format!("mig-test/criu-dst-{}", std::process::id()),
        &Limits::default(),
    )
    .unwrap();
    cleanup.cgroups.push(dst_cg.clone());
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let outcome = criu
        .restore(&RestoreOpts {
            images_dir: dest.clone(),
            root: Some(dst_root.clone()),
            inherit_fds: vec![(w.as_raw_fd(), stdio_pipe.clone())],
            cgroup_procs: dst_cg.procs_files(),
            log_file: "restore.log".into(),
            pidfile: "restore.pid".into(),
            ..Default::default()
        })
        .unwrap();
    cleanup.pids.push(outcome.pid);
    drop(w);
    eprintln!("restore {outcome:?}");
    let map_after = pid_map(&[outcome.pid]);
    assert_eq!(map_after[0].ns_pid, 1, "PID 1 inside again");
    assert_eq!(map_after[0].cmd, map_before[0].cmd);
    assert!(dst_cg.procs().unwrap().contains(&outcome.pid));
    let mut lines = BufReader::new(std::fs::File::from(r));
    let next = read_number(&mut lines);
    assert_eq!(next, last + 1, "the counter continues");
    drop(cleanup);
}
