//! CRIU smoke test: a container made by `spawn` dumps with a plain `criu dump -t PID --root ROOTFS`
//! and restores onto a different overlay mount of the same layers, where it keeps counting.

mod container_support;

use container_support::{no_cgroup, pipe, raw, spec, Fixture, Proc};
use mig_runtime::container::{external_mounts, spawn, LaunchConfig};
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const CRIU: &str = "/usr/local/sbin/criu";
/// The descriptor number the output pipe has in `criu restore` (see `--inherit-fd`).
const INHERIT_FD: i32 = 10;

fn counter(root: &Path) -> u64 {
    std::fs::read_to_string(root.join("tmp/counter"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn wait_counter_above(root: &Path, n: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let c = counter(root);
        if c > n || Instant::now() > deadline {
            return c;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn log_tail(path: &Path) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Reads whatever the pipe holds until a `tick N` line with N > `after` shows up (or a deadline).
fn read_ticks_after(r: &mut std::fs::File, after: u64) -> Option<u64> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut all = String::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match r.read(&mut buf) {
            Ok(0) => return None,
            Ok(n) => all.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => panic!("reading the output pipe: {e}"),
        }
        let found = all
            .lines()
            .filter_map(|l| l.strip_prefix("tick ")?.parse::<u64>().ok())
            .find(|n| *n > after);
        if found.is_some() {
            return found;
        }
    }
    None
}

#[test]
fn container_criu_dump_and_restore_on_another_mount() {
    criu_round_trip("criu", false, &[], &[]);
}

#[test]
fn container_criu_userns() {
    // Device nodes and masked files are host binds in a user namespace: declared external.
    let mut probe = spec("criu_userns", &["true"]);
    probe.userns = Some(container_support::userns_map());
    let ext = external_mounts(&probe);
    let dump: Vec<String> = ext
        .iter()
        .flat_map(|m| ["--external".into(), m.dump_arg()])
        .collect();
    let restore: Vec<String> = ext
        .iter()
        .flat_map(|m| ["--external".into(), m.restore_arg()])
        .collect();
    let d: Vec<&str> = dump.iter().map(String::as_str).collect();
    let r: Vec<&str> = restore.iter().map(String::as_str).collect();
    criu_round_trip("criu_userns", true, &d, &r);
}

fn criu_round_trip(test: &str, userns: bool, dump_args: &[&str], restore_args: &[&str]) {
    // The restored tree is reparented to us when `criu restore -d` exits, so we can reap it.
    // SAFETY: prctl with integer arguments.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(r, 0);
    let mut fx = Fixture::new(test);
    let root_a = fx.mount("merged-a");
    let script =
        "i=0; while :; do i=$((i+1)); echo $i > /tmp/counter; echo \"tick $i\"; sleep 0.05; done";
    let mut s = spec(test, &["sh", "-c", script]);
    if userns {
        s.userns = Some(container_support::userns_map());
    }
    let cg = no_cgroup();
    let (r, w) = pipe();
    let t = Instant::now();
    let pid = spawn(&LaunchConfig {
        spec: &s,
        rootfs: &root_a,
        cgroup: &cg,
        output: raw(&w),
    })
    .expect("spawn");
    let spawn_time = t.elapsed();
    let mut init = Proc(pid);
    let before = wait_counter_above(&root_a, 3);
    assert!(before > 3, "the container counts");

    let pipe_link = std::fs::read_link(format!("/proc/{pid}/fd/1")).unwrap();
    let pipe_id = pipe_link.to_string_lossy().into_owned();
    assert!(pipe_id.starts_with("pipe:["), "{pipe_id}");

    let images = fx.dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    let t = Instant::now();
    let dump = Command::new(CRIU)
        .args(["dump", "-t", &pid.to_string(), "--root"])
        .arg(&root_a)
        .arg("-D")
        .arg(&images)
        .args(["-o", "dump.log", "-v4", "--manage-cgroups=ignore"])
        .args(dump_args)
        .status()
        .expect("run criu dump");
    let dump_time = t.elapsed();
    assert!(
        dump.success(),
        "criu dump failed:\n{}",
        log_tail(&images.join("dump.log"))
    );
    // CRIU killed the tree after dumping it: reap our child.
    let status = init.wait();
    assert!(libc::WIFSIGNALED(status), "status {status:#x}");
    let at_dump = counter(&root_a);

    fx.unmount(&root_a);
    let root_b = fx.mount("merged-b");
    let pidfile = images.join("restore.pid");
    let wfd = raw(&w);
    let mut restore = Command::new(CRIU);
    restore
        .args(["restore", "-D"])
        .arg(&images)
        .arg("--root")
        .arg(&root_b)
        .args([
            "-d",
            "-o",
            "restore.log",
            "-v4",
            "--manage-cgroups=ignore",
            "--pidfile",
        ])
        .arg(&pidfile)
        .arg("--inherit-fd")
        .arg(format!("fd[{INHERIT_FD}]:{pipe_id}"))
        .args(restore_args);
    // SAFETY: dup2 is async-signal-safe; it gives criu the pipe's write end at INHERIT_FD
    // (without close-on-exec).
    unsafe {
        restore.pre_exec(move || {
            if libc::dup2(wfd, INHERIT_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let t = Instant::now();
    let restored = restore.status().expect("run criu restore");
    let restore_time = t.elapsed();
    assert!(
        restored.success(),
        "criu restore failed:\n{}",
        log_tail(&images.join("restore.log"))
    );
    let new_pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let _restored = Proc(new_pid);

    // The counter keeps going from where it stopped, in the new mount.
    let after = wait_counter_above(&root_b, at_dump + 3);
    assert!(
        after > at_dump + 3,
        "counter stuck at {after} (dumped at {at_dump})"
    );
    let ns_pid = std::fs::read_to_string(format!("/proc/{new_pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("NSpid:")
                .map(|v| v.split_whitespace().last().unwrap().to_owned())
        })
        .unwrap();
    assert_eq!(ns_pid, "1", "still PID 1 inside");
    // And its output still reaches our pipe.
    drop(w);
    let mut r = std::fs::File::from(r);
    nix::fcntl::fcntl(
        std::os::fd::AsRawFd::as_raw_fd(&r),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .unwrap();
    let tick = read_ticks_after(&mut r, at_dump);
    assert!(tick.is_some(), "no output after restore");
    eprintln!(
        "criu smoke: spawn {spawn_time:?}, dump {dump_time:?}, restore {restore_time:?}, \
         counter {before} -> dumped at {at_dump} -> {after} after restore"
    );
}
