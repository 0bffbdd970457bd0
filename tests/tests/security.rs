//! The security surface end to end: user-namespace maps kept across moves (lab subnets
//! 10.214.100-109), processes of other users than root moved with their uid and limits (lab
//! subnet 10.79.61), the agent's unix socket refused to non-root users, the QUIC endpoint refused to
//! unpinned peers and to pinned peers that send anything but a migration, and incoming migrations
//! bounded by `migd --max-incoming-bytes` before anything is written.
//!
//! Needs root, real CRIU. Every resource is named after the test and the process id and removed by
//! the lab and agent guards whatever happens.

use anyhow::{bail, ensure, Context, Result};
use mig_migrate::transport::{self, AllowedPeers, Identity, Peer};
use mig_migrate::wire::{
    decode_frame, encode_frame, Hello, Message, MigrationMode, Prepare, RefuseReason,
    MAX_CONTROL_FRAME,
};
use mig_tests::lab::{self, Lab};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// The host PID of the container's init (ns PID 1) on `host`.
fn init_host_pid(lab: &Lab, host: usize, name: &str) -> Result<i64> {
    let v = lab::running_on(lab, host, name)?;
    v["pid_map"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["ns_pid"] == 1)
        .and_then(|e| e["host_pid"].as_i64())
        .with_context(|| format!("no init in the pid map: {v}"))
}

/// The uid and gid maps of the container's init, as the kernel shows them.
fn id_maps(lab: &Lab, host: usize, name: &str) -> Result<(String, String)> {
    let pid = init_host_pid(lab, host, name)?;
    let read = |f: &str| -> Result<String> {
        let s = std::fs::read_to_string(format!("/proc/{pid}/{f}"))?;
        Ok(s.split_whitespace().collect::<Vec<_>>().join(" "))
    };
    Ok((read("uid_map")?, read("gid_map")?))
}

/// The owner (uid, gid) of `path` in the container's writable layer on `host`.
fn upper_owner(lab: &Lab, host: usize, id: &str, path: &str) -> Result<(u32, u32)> {
    let p = lab
        .state_dir(host)
        .join("containers")
        .join(id)
        .join("upper")
        .join(path.trim_start_matches('/'));
    let m = std::fs::symlink_metadata(&p).with_context(|| format!("{}", p.display()))?;
    Ok((m.uid(), m.gid()))
}

/// The host id that container root maps to, from a `0 HOST SIZE` map line.
fn mapped_root(map: &str) -> Result<u32> {
    let f: Vec<&str> = map.split(' ').collect();
    ensure!(f.len() == 3 && f[0] == "0", "unexpected map {map:?}");
    Ok(f[1].parse()?)
}

/// The counter `u` writes into `/data/n` on `host`. The shell's `>` truncates before it writes,
/// so a read can find the file empty: read again.
fn data_n(lab: &Lab, host: usize) -> Result<u64> {
    for _ in 0..20 {
        let text = lab.mig_ok(host, &["exec", "u", "--", "cat", "/data/n"])?;
        if let Ok(n) = text.trim().parse() {
            return Ok(n);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("/data/n never held a number")
}

#[test]
fn userns_maps_kept_across_moves() -> Result<()> {
    if !mig_tests::is_root("security tests") {
        return Ok(());
    }
    let lab = Lab::up("usrns", 100)?;
    let id = lab
        .mig_ok(
            0,
            &[
                "run", "-d", "--userns", "--name", "u", "busybox", "--", "sh", "-c",
                "echo hi > /owned; mkdir -p /data; i=0; while :; do i=$((i+1)); echo $i > /data/n; sleep 0.2; done",
            ],
        )?
        .trim()
        .to_string();
    ensure!(
        mig_tests::wait_until(Duration::from_secs(20), || upper_owner(
            &lab, 0, &id, "/data/n"
        )
        .is_ok()),
        "the container never wrote /data/n"
    );
    let maps = id_maps(&lab, 0, "u")?;
    let root = mapped_root(&maps.0)?;
    ensure!(root != 0, "container root is host root: {maps:?}");
    ensure!(maps.0 == maps.1, "uid and gid maps differ: {maps:?}");
    for p in ["/owned", "/data", "/data/n"] {
        ensure!(
            upper_owner(&lab, 0, &id, p)? == (root, root),
            "{p} in the writable layer is not owned by {root}"
        );
    }
    // Stream mode restores a user-namespace container without the local lazy-pages daemon
    // where user namespaces may not open userfaultfd (vm.unprivileged_userfaultfd = 0).
    for (from, to, mode) in [(0, 1, "cold"), (1, 0, "stream")] {
        let peer = lab.hosts[to].name.clone();
        let r = lab.mig_json(from, &["move", "u", &peer, "--mode", mode, "--json"])?;
        eprintln!("userns move {from} -> {to} ({mode}): {r}");
        let after = id_maps(&lab, to, "u")?;
        ensure!(
            after == maps,
            "maps changed across the move: {maps:?} -> {after:?}"
        );
        for p in ["/owned", "/data", "/data/n"] {
            ensure!(
                upper_owner(&lab, to, &id, p)? == (root, root),
                "{p} on host {to} is not owned by {root}"
            );
        }
        // It keeps running and writing under its mapped ids.
        let n0 = data_n(&lab, to)?;
        std::thread::sleep(Duration::from_millis(600));
        ensure!(data_n(&lab, to)? > n0, "the counter stopped");
        lab::nothing_left(&lab, from, &id)?;
    }
    // Lazy mode needs the same; without it the move is refused before anything is frozen.
    let uffd = std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd")?;
    if uffd.trim() != "1" {
        let peer = lab.hosts[1].name.clone();
        let o = lab.mig(0, &["move", "u", &peer, "--mode", "lazy"]);
        ensure!(
            failed_saying(&o, &["user namespace", "nothing was frozen"]),
            "lazy move of a userns container: {} {}",
            o.stdout,
            o.stderr
        );
        lab::running_on(&lab, 0, "u")?;
    }
    lab.mig_ok(0, &["rm", "-f", "u"])?;
    Ok(())
}

/// Whether a `mig` command failed with every one of `words` in its error.
fn failed_saying(o: &mig_tests::MigOutput, words: &[&str]) -> bool {
    o.code != 0 && words.iter().all(|w| o.stderr.contains(w))
}

/// Whether `criu` children of root get CAP_SYS_RESOURCE (its bounding set) on this machine.
fn root_has_cap_sys_resource() -> Result<bool> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("CapBnd:"))
        .context("no CapBnd line")?;
    let bnd = u64::from_str_radix(line["CapBnd:".len()..].trim(), 16)?;
    Ok(bnd & (1 << 24) != 0)
}

/// What the kernel shows of a process that must survive a move unchanged: its `Uid:` and `Gid:`
/// lines and its resource limits (`/proc/PID/limits`).
fn ids_and_limits(pid: i64) -> Result<(String, String)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let ids = status
        .lines()
        .filter(|l| l.starts_with("Uid:") || l.starts_with("Gid:"))
        .collect::<Vec<_>>()
        .join(" ");
    Ok((ids, std::fs::read_to_string(format!("/proc/{pid}/limits"))?))
}

/// With a CRIU that lacks the /proc/PID/limits fallback (a copy of the installed one with the
/// patch's marker string overwritten: the detection is what is tested), a checkpoint and a move
/// of the container `nr` on host-a are refused up front with the reason, and it runs on.
fn refused_by_criu_without_fallback(lab: &mut Lab) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut bytes = std::fs::read(mig_migrate::criu::DEFAULT_CRIU)?;
    let marker = b"criu-rlimits-proc-fallback";
    let at = bytes
        .windows(marker.len())
        .position(|w| w == marker)
        .context("the installed CRIU lacks the fallback: run scripts/setup.sh")?;
    bytes[at..at + marker.len()].fill(b'x');
    let criu = dir.path().join("criu");
    std::fs::write(&criu, bytes)?;
    std::fs::set_permissions(&criu, std::fs::Permissions::from_mode(0o755))?;
    let migd = dir.path().join("migd");
    std::fs::write(
        &migd,
        format!(
            "#!/bin/sh\nMIG_CRIU={} exec {} \"$@\"\n",
            criu.display(),
            mig_tests::bin("migd").display()
        ),
    )?;
    std::fs::set_permissions(&migd, std::fs::Permissions::from_mode(0o755))?;
    lab.restart_with(0, &migd)?;
    let peer = lab.hosts[1].name.clone();
    let outcome = (|| -> Result<()> {
        for args in [
            vec!["checkpoint", "--leave-running", "nr"],
            vec!["move", "nr", peer.as_str()],
        ] {
            let o = lab.mig(0, &args);
            ensure!(
                failed_saying(&o, &["uid 1000", "CAP_SYS_RESOURCE", "scripts/setup.sh"]),
                "{args:?}: {} {}",
                o.stdout,
                o.stderr
            );
            lab::running_on(lab, 0, "nr")?;
        }
        let after = lab::continues(lab, 0, "nr", 0)?;
        lab::continues(lab, 0, "nr", after)?;
        Ok(())
    })();
    lab.restart_with(0, &mig_tests::bin("migd"))?;
    outcome
}

/// A container whose processes run as another user than root (uid 1000, with a soft limit of
/// open files of 1000 set as root before dropping privileges, as nginx's workers or an image's
/// `USER` run) moves there and back in every mode the tests use: cold, stream with and without
/// the memory presync, lazy; then checkpoints and restores. Each time its init keeps its uid,
/// gid and every resource limit, the processes keep their in-namespace PIDs, its memory (2 MB
/// checked every 0.2 s) is intact, and the source keeps nothing. Where root lacks
/// CAP_SYS_RESOURCE (this machine), only the CRIU that scripts/setup.sh builds can dump such a
/// process: it reads the limits from /proc/PID/limits (docs/criu.md, "Patches"); with a CRIU
/// without that fallback the move and the checkpoint are refused up front, as checked first.
#[test]
fn non_root_processes_move_with_their_uid_and_limits() -> Result<()> {
    if !mig_tests::is_root("security tests") {
        return Ok(());
    }
    eprintln!(
        "root has CAP_SYS_RESOURCE here: {} (without it CRIU reads limits from /proc/PID/limits)",
        root_has_cap_sys_resource()?
    );
    let mut lab = Lab::up_on("nr", [10, 79, 61], 2)?;
    // busybox su as root needs no password, only the user in /etc/passwd; it execs the shell,
    // which becomes the init. The pipe makes three processes at least (the init, the loop's
    // subshell, cat).
    let app = r#"d=$(head -c 1500000 /dev/urandom | base64 -w0); s=$(echo "$d" | md5sum); i=0; while :; do i=$((i+1)); if [ "$(echo "$d" | md5sum)" = "$s" ]; then echo "n $i OK"; else echo "n $i BAD"; fi; sleep 0.2; done | cat"#;
    let init = format!(
        "echo app:x:1000:1000::/:/bin/sh >> /etc/passwd; echo app:x:1000: >> /etc/group; ulimit -S -n 1000; exec su -s /bin/sh app -c '{app}'"
    );
    let out = lab.mig_ok(
        0,
        &[
            "run", "-d", "--name", "nr", "busybox", "--", "sh", "-c", &init,
        ],
    )?;
    let id = out.trim().to_string();
    lab::continues(&lab, 0, "nr", 0)?;
    if !root_has_cap_sys_resource()? {
        refused_by_criu_without_fallback(&mut lab)?;
    }
    let before = ids_and_limits(init_host_pid(&lab, 0, "nr")?)?;
    ensure!(
        before.0.starts_with("Uid:\t1000\t1000\t1000")
            && before.0.contains("Gid:\t1000\t1000\t1000"),
        "the init does not run as app: {}",
        before.0
    );
    let nofile = before
        .1
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .context("no open files limit")?;
    ensure!(
        nofile.split_whitespace().nth(3) == Some("1000"),
        "the soft limit was not set: {nofile}"
    );
    let kept = |host: usize, what: &str| -> Result<()> {
        let after = ids_and_limits(init_host_pid(&lab, host, "nr")?)?;
        ensure!(
            after == before,
            "{what}: the init changed: {after:?}, was {before:?}"
        );
        Ok(())
    };
    let moves: [(usize, usize, &[&str], &str); 4] = [
        (0, 1, &["--mode", "cold"], "cold"),
        (1, 0, &["--mode", "stream"], "stream"),
        (0, 1, &["--mode", "stream", "--no-memory-presync"], "stream"),
        (1, 0, &["--mode", "lazy"], "lazy"),
    ];
    for (from, to, options, mode) in moves {
        let r = lab::move_and_check_with(&lab, from, to, "nr", &id, options, mode)?;
        let presync = &r["memory_presync"];
        if options == ["--mode", "stream"] {
            // The presync read the memory of processes that do not run as root.
            ensure!(
                presync["error"].is_null() && presync["bytes"].as_u64() > Some(1_000_000),
                "the memory was not presynced: {r}"
            );
        }
        if mode == "lazy" {
            ensure!(
                r["postcopy_ms"].is_u64() && r["postcopy_error"].is_null(),
                "post-copy not reported as complete: {r}"
            );
        }
        kept(to, &format!("{options:?}"))?;
    }
    let pids = lab::ns_pids(&lab::running_on(&lab, 0, "nr")?["pid_map"]);
    lab.mig_ok(0, &["checkpoint", "nr"])?;
    let (count, _) = lab::log_state(&lab.mig(0, &["logs", "nr"]).stdout);
    lab.mig_ok(0, &["restore", "nr"])?;
    let after = lab::ns_pids(&lab::running_on(&lab, 0, "nr")?["pid_map"]);
    ensure!(
        after.contains(&1) && after.iter().filter(|p| pids.contains(p)).count() >= 3,
        "restore: PIDs {after:?}, were {pids:?}"
    );
    kept(0, "checkpoint and restore")?;
    lab::continues(&lab, 0, "nr", count)?;

    // A destination whose migd (and so CRIU) has a lower hard limit of open files than the
    // process: root without CAP_SYS_RESOURCE cannot raise it, and the patched CRIU then restores
    // the soft limit under the highest hard limit it may set, with a warning in the restore log
    // (a plain CRIU silently gave the process its own limits, soft 1000 lost).
    let hard: u64 = nofile
        .split_whitespace()
        .nth(4)
        .and_then(|h| h.parse().ok())
        .with_context(|| format!("hard limit of {nofile}"))?;
    let lower = hard / 2;
    if lower <= 1000 || root_has_cap_sys_resource()? {
        eprintln!(
            "hard limit {hard} or CAP_SYS_RESOURCE: the lower destination limit is not tried"
        );
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let migd = dir.path().join("migd");
    std::fs::write(
        &migd,
        format!(
            "#!/bin/sh\nulimit -n {lower} && exec {} \"$@\"\n",
            mig_tests::bin("migd").display()
        ),
    )?;
    std::fs::set_permissions(&migd, std::fs::Permissions::from_mode(0o755))?;
    lab.restart_with(1, &migd)?;
    lab::move_and_check_with(&lab, 0, 1, "nr", &id, &["--mode", "stream"], "stream")?;
    let (ids, limits) = ids_and_limits(init_host_pid(&lab, 1, "nr")?)?;
    ensure!(ids == before.0, "the ids changed: {ids}, were {}", before.0);
    for (now, was) in limits.lines().zip(before.1.lines()) {
        if was.starts_with("Max open files") {
            let v: Vec<&str> = now.split_whitespace().collect();
            ensure!(
                v.get(3..5) == Some(&["1000", &lower.to_string()][..]),
                "open files not fitted under {lower}: {now}"
            );
        } else {
            ensure!(now == was, "a limit changed: {now}, was {was}");
        }
    }
    let log = lab
        .state_dir(1)
        .join("containers")
        .join(&id)
        .join("checkpoint")
        .join("restore.log");
    let log = std::fs::read_to_string(&log).with_context(|| format!("{}", log.display()))?;
    let warned = log
        .lines()
        .any(|l| l.contains("criu-rlimits-clamped") && l.contains(&format!("to {hard} ")));
    ensure!(
        warned,
        "host-b's restore log does not warn of the fitted limit"
    );
    Ok(())
}

/// Host ids `a..=b` of a `0 HOST SIZE` map line.
fn map_range(map: &str) -> Result<(u64, u64)> {
    let f: Vec<u64> = map
        .split(' ')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("map {map:?}"))?;
    ensure!(f.len() == 3, "map {map:?}");
    Ok((f[1], f[1] + f[2] - 1))
}

#[test]
fn userns_ranges_allocated_and_clashes_refused() -> Result<()> {
    if !mig_tests::is_root("security tests") {
        return Ok(());
    }
    let lab = Lab::up("usrcl", 101)?;
    let loop_cmd = "i=0; while :; do i=$((i+1)); echo $i > /n; sleep 0.2; done";
    for name in ["u1", "u2"] {
        lab.mig_ok(
            0,
            &[
                "run", "-d", "--userns", "--name", name, "busybox", "--", "sh", "-c", loop_cmd,
            ],
        )?;
    }
    let (m1, m2) = (id_maps(&lab, 0, "u1")?.0, id_maps(&lab, 0, "u2")?.0);
    let (r1, r2) = (map_range(&m1)?, map_range(&m2)?);
    ensure!(
        r1.1 < r2.0 || r2.1 < r1.0,
        "two containers share host ids: {m1:?} {m2:?}"
    );
    ensure!(r1.0 > 0 && r2.0 > 0, "a container root is host root");

    // A copy of u1 (its checkpoint exported and imported under another name) would restore
    // with u1's maps: refused while u1 holds them.
    let tmp = tempfile::tempdir()?;
    let export = tmp.path().join("u1.tar");
    let export = export.to_str().context("path")?;
    lab.mig_ok(
        0,
        &["checkpoint", "u1", "--leave-running", "--export", export],
    )?;
    let o = lab.mig(0, &["restore", "--import", export, "--name", "u1copy"]);
    ensure!(
        o.code != 0,
        "a second container with u1's host ids was restored"
    );
    ensure!(
        o.stderr.contains("user-namespace"),
        "unclear refusal: {}",
        o.stderr
    );
    lab::running_on(&lab, 0, "u1")?;

    // u2 moves to host-b with its maps; a migration declaring u2's range there is refused
    // before anything is written (CRIU would restore it with ids another container uses).
    lab.mig_ok(0, &["move", "u2", &lab.hosts[1].name.clone()])?;
    ensure!(id_maps(&lab, 1, "u2")?.0 == m2, "u2's maps changed");
    let (peer, intruder) = pin_intruder(&lab, 1)?;
    let mut p = prepare(1 << 20)?;
    p.spec.userns = Some(mig_runtime::spec::IdMap {
        host_id: u32::try_from(r2.0)? + 5,
        size: 65_536,
    });
    let mut bytes = frame(&Hello::new("0.1.0", "intruder"));
    bytes.extend(frame(&Message::Prepare(Box::new(p))));
    let a = talk_from(&lab, 0, &intruder, &peer, bytes)?;
    eprintln!("clashing prepare: {a:?}");
    match a.messages.first() {
        Some(Message::Refused { detail, .. }) if detail.contains("user-namespace host ids") => {}
        _ => bail!("a clashing user namespace was not refused: {a:?}"),
    }
    untouched(&lab, 1)?;
    for (h, n) in [(0, "u1"), (1, "u2")] {
        lab.mig_ok(h, &["rm", "-f", n])?;
    }
    Ok(())
}

#[test]
fn unix_socket_refuses_non_root() -> Result<()> {
    if !mig_tests::is_root("security tests") {
        return Ok(());
    }
    let agent = mig_tests::Agent::start("sec_socket")?;
    let meta = std::fs::metadata(&agent.socket)?;
    ensure!(meta.uid() == 0, "socket owned by {}", meta.uid());
    ensure!(
        meta.permissions().mode() & 0o777 == 0o600,
        "socket mode {:o}",
        meta.permissions().mode()
    );
    // Let everyone through the directories: only the socket's own mode may stop nobody.
    let mut dir = agent.socket.parent();
    while let Some(d) = dir {
        if d == Path::new("/") || d == Path::new("/tmp") {
            break;
        }
        let mode = std::fs::metadata(d)?.permissions().mode();
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode | 0o711))?;
        dir = d.parent();
    }
    // The mig CLI as nobody (setuid/setgid in the child before exec).
    let o = Command::new(mig_tests::bin("mig"))
        .args(["ps"])
        .env("MIG_SOCKET", &agent.socket)
        .env_remove("MIG_HOST")
        .uid(65534)
        .gid(65534)
        .output()?;
    let err = String::from_utf8_lossy(&o.stderr);
    ensure!(!o.status.success(), "nobody listed the containers");
    ensure!(
        err.to_lowercase().contains("permission denied"),
        "unexpected failure: {err}"
    );
    // And a raw connect as nobody, in a forked child that only makes async-signal-safe calls
    // (setgid, setuid, socket, connect, _exit) on data prepared before the fork.
    let path = std::ffi::CString::new(agent.socket.as_os_str().as_encoded_bytes())?;
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid (empty) value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_bytes_with_nul();
    ensure!(bytes.len() <= addr.sun_path.len(), "socket path too long");
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: the child below only makes async-signal-safe calls, then _exit.
    let pid = unsafe { libc::fork() };
    ensure!(pid >= 0, "fork failed");
    if pid == 0 {
        // SAFETY: plain system calls in the forked child, then _exit.
        unsafe {
            if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                libc::_exit(2);
            }
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            let r = libc::connect(
                fd,
                std::ptr::addr_of!(addr).cast(),
                std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
            );
            let errno = *libc::__errno_location();
            libc::_exit(if r == 0 {
                0
            } else if errno == libc::EACCES {
                13
            } else {
                3
            });
        }
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    ensure!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 13,
        "connect as nobody: exit {} (13 = EACCES wanted, 0 = connected)",
        libc::WEXITSTATUS(status)
    );
    // Root still gets in.
    agent.mig_ok(&["ps"])?;
    Ok(())
}

/// Runs `f` on a new thread inside the network namespace `netns` (a lab host's), with a
/// current-thread tokio runtime: sockets made there belong to that namespace.
fn in_netns<T, F>(netns: &str, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    let path = format!("/run/netns/{netns}");
    std::thread::spawn(move || -> Result<T> {
        let ns = std::fs::File::open(&path).with_context(|| path.clone())?;
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("setns {path}"))?;
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the netns thread panicked"))?
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// What the destination answered on one control stream.
#[derive(Debug, Default)]
struct Answer {
    /// Whether the TLS handshake completed from our side.
    connected: bool,
    hello: Option<Hello>,
    messages: Vec<Message>,
    /// How the exchange ended (stream end, connection error, timeout).
    end: String,
}

/// Connects to `peer` as `identity`, opens a stream, sends `bytes` and collects what comes back
/// until the stream ends, the connection closes or 10 s pass.
async fn talk(identity: &Identity, peer: &Peer, bytes: &[u8]) -> Result<Answer> {
    let ep = transport::endpoint(
        "0.0.0.0:0".parse()?,
        identity,
        AllowedPeers::new(HashSet::new()),
    )?;
    let mut a = Answer::default();
    let conn = match transport::connect(&ep, identity, peer).await {
        Ok(c) => c,
        Err(e) => {
            a.end = format!("handshake: {e:#}");
            return Ok(a);
        }
    };
    a.connected = true;
    let mut buf = Vec::new();
    let exchange = async {
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(bytes).await?;
        let mut chunk = vec![0u8; 64 << 10];
        loop {
            match recv.read(&mut chunk).await? {
                Some(n) => buf.extend_from_slice(&chunk[..n]),
                None => return anyhow::Ok("end of stream".to_string()),
            }
        }
    };
    a.end = match tokio::time::timeout(Duration::from_secs(10), exchange).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => format!("{e:#}"),
        Err(_) => "timeout".into(),
    };
    conn.close(0u32.into(), b"bye");
    ep.wait_idle().await;
    let mut at = 0;
    if let Ok(Some((h, n))) = decode_frame::<Hello>(&buf, MAX_CONTROL_FRAME) {
        a.hello = Some(h);
        at = n;
    }
    while let Ok(Some((m, n))) = decode_frame::<Message>(&buf[at..], MAX_CONTROL_FRAME) {
        a.messages.push(m);
        at += n;
    }
    Ok(a)
}

fn frame<T: serde::Serialize>(v: &T) -> Vec<u8> {
    encode_frame(v, MAX_CONTROL_FRAME).expect("encodable frame")
}

/// A Prepare for a container that does not exist anywhere, declaring `bytes`.
fn prepare(bytes: u64) -> Result<Prepare> {
    let layer = format!("sha256:{}", "ab".repeat(32));
    let image_id = format!("sha256:{}", "cd".repeat(32));
    let spec = serde_json::from_value(json!({
        "id": "5ec0000000000000000000000000beef",
        "name": "intruder",
        "image": {"name": "busybox", "id": image_id, "layers": [layer]},
        "process": {"args": ["sh"], "env": [], "cwd": "/", "uid": 0, "gid": 0},
        "hostname": "intruder",
        "limits": {},
        "userns": null
    }))?;
    Ok(Prepare {
        migration_id: "5ec00000000000000000000000000001".into(),
        spec,
        image: mig_runtime::image::Image {
            name: "busybox".into(),
            id: image_id,
            layers: vec![layer],
            config: Default::default(),
            created: 0,
            size: 0,
        },
        criu_version: "0.0.1".into(),
        kernel: "0.0.1".into(),
        bytes_estimate: bytes,
        mode: MigrationMode::PreCopy,
    })
}

/// A fresh identity pinned on host `host` as peer `intruder`, and that host as a peer.
fn pin_intruder(lab: &Lab, host: usize) -> Result<(Peer, Identity)> {
    let h = &lab.hosts[host];
    let peer = Peer {
        name: h.name.clone(),
        address: std::net::SocketAddr::from((h.address, h.quic_port)),
        fingerprint: h.fingerprint.clone().context("the host's fingerprint")?,
    };
    let intruder = Identity::generate("intruder")?;
    let fp = intruder.fingerprint().to_owned();
    lab.mig_ok(
        host,
        &[
            "peers",
            "add",
            "intruder",
            "192.0.2.1:7878",
            "--fingerprint",
            &fp,
        ],
    )?;
    // The host's own fingerprint pins no peer (QA of session 25: a move to it waited 30 s).
    let own = lab.mig(
        host,
        &[
            "peers",
            "add",
            "myself",
            "192.0.2.2:7878",
            "--fingerprint",
            &peer.fingerprint,
        ],
    );
    ensure!(
        own.code != 0 && own.stderr.contains("is this agent's own"),
        "{own:?}"
    );
    Ok((peer, intruder))
}

/// [`talk`] from lab host `from`'s network namespace.
fn talk_from(lab: &Lab, from: usize, id: &Identity, peer: &Peer, bytes: Vec<u8>) -> Result<Answer> {
    let (i, p) = (id.clone(), peer.clone());
    in_netns(&lab.hosts[from].netns.clone(), move || {
        runtime()?.block_on(talk(&i, &p, &bytes))
    })
}

/// Nothing of the test's migration or container on `host`.
fn untouched(lab: &Lab, host: usize) -> Result<()> {
    let sd = lab.state_dir(host);
    let migrations: Vec<String> = std::fs::read_dir(sd.join("migrations"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("5ec0"))
        .collect();
    ensure!(
        migrations.is_empty(),
        "written on host {host}: {migrations:?}"
    );
    ensure!(
        !sd.join("containers/5ec0000000000000000000000000beef")
            .exists(),
        "a container directory was made"
    );
    let ps = lab.mig_ok(host, &["ps", "-a"])?;
    ensure!(!ps.contains("intruder"), "{ps}");
    Ok(())
}

/// Sets `--max-incoming-bytes` for host `host`'s agent (through the lab file's agent arguments)
/// and restarts it.
fn restart_with_limit(lab: &mut Lab, host: usize, limit: &str) -> Result<()> {
    let file = mig_agent::lab::lab_file_path(&lab.name);
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&file)?)?;
    let args = v["extra_agent_args"]
        .as_array_mut()
        .context("extra_agent_args in the lab file")?;
    // A later limit replaces an earlier one (migd takes the option once).
    if let Some(i) = args.iter().position(|a| a == "--max-incoming-bytes") {
        args.drain(i..(i + 2).min(args.len()));
    }
    args.push("--max-incoming-bytes".into());
    args.push(limit.into());
    std::fs::write(&file, serde_json::to_vec(&v)?)?;
    if let Some(pid) = lab.hosts[host].agent_pid {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
        mig_tests::wait_until(Duration::from_secs(20), || !mig_tests::pid_alive(pid));
    }
    lab.restart(host)
}

#[test]
fn quic_endpoint_refuses_unpinned_and_non_migrations() -> Result<()> {
    if !mig_tests::is_root("security tests") {
        return Ok(());
    }
    let mut lab = Lab::up("quic", 102)?;
    let b = lab.hosts[1].clone();
    let peer = Peer {
        name: b.name.clone(),
        address: std::net::SocketAddr::from((b.address, b.quic_port)),
        fingerprint: b.fingerprint.clone().context("host-b's fingerprint")?,
    };
    let intruder = Identity::generate("intruder")?;
    let hello = frame(&Hello::new("0.1.0", "intruder"));

    // 1. Not pinned: refused in the handshake, not one byte of the protocol answered.
    let (id2, p2, h2) = (intruder.clone(), peer.clone(), hello.clone());
    let a = in_netns(&lab.hosts[0].netns.clone(), move || {
        runtime()?.block_on(talk(&id2, &p2, &h2))
    })?;
    eprintln!("unpinned: {a:?}");
    ensure!(
        a.hello.is_none() && a.messages.is_empty(),
        "an unpinned peer got answers: {a:?}"
    );
    ensure!(
        a.end.to_lowercase().contains("certificate")
            || a.end.to_lowercase().contains("handshake")
            || a.end.to_lowercase().contains("crypto")
            || a.end.to_lowercase().contains("closed"),
        "not refused by TLS: {}",
        a.end
    );
    untouched(&lab, 1)?;

    // Pinned from now on: it may offer migrations, nothing else.
    lab.mig_ok(
        1,
        &[
            "peers",
            "add",
            "intruder",
            "10.214.102.250:7878",
            "--fingerprint",
            intruder.fingerprint(),
        ],
    )?;
    let netns_a = lab.hosts[0].netns.clone();
    let run = |bytes: Vec<u8>| -> Result<Answer> {
        let (i, p) = (intruder.clone(), peer.clone());
        in_netns(&netns_a, move || runtime()?.block_on(talk(&i, &p, &bytes)))
    };

    // 2. API requests on the migration stream (exec into, read logs of a container): the
    // destination's hello answers, nothing else happens.
    for req in [
        json!({"Exec": {"container": "x", "args": ["cat", "/etc/shadow"], "env": []}}),
        json!({"Logs": {"container": "x", "follow": false}}),
        json!("List"),
    ] {
        let body = serde_json::to_vec(&req)?;
        let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(&body);
        let a = run(bytes)?;
        eprintln!("api request {req}: {a:?}");
        ensure!(a.connected, "a pinned peer was refused: {a:?}");
        ensure!(
            a.messages.is_empty(),
            "an API request got protocol answers: {a:?}"
        );
        // After a valid hello, the same request as the first message.
        let mut bytes = hello.clone();
        bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&body);
        let a = run(bytes)?;
        eprintln!("api request after hello {req}: {a:?}");
        ensure!(a.hello.is_some(), "no hello back: {a:?}");
        ensure!(
            !a.messages
                .iter()
                .any(|m| matches!(m, Message::PrepareOk { .. } | Message::Restored { .. })),
            "{a:?}"
        );
    }
    // 3. Protocol messages out of order: never accepted.
    for m in [Message::Frozen, Message::DumpDone] {
        let mut bytes = hello.clone();
        bytes.extend(frame(&m));
        let a = run(bytes)?;
        eprintln!("out of order {m:?}: {a:?}");
        ensure!(
            !a.messages
                .iter()
                .any(|m| matches!(m, Message::PrepareOk { .. } | Message::Restored { .. })),
            "{a:?}"
        );
    }
    untouched(&lab, 1)?;

    // 4. A Prepare declaring more than the disk holds: refused before anything is written.
    let mut bytes = hello.clone();
    bytes.extend(frame(&Message::Prepare(Box::new(prepare(1 << 62)?))));
    let a = run(bytes)?;
    eprintln!("huge prepare: {a:?}");
    ensure!(
        matches!(
            a.messages.first(),
            Some(Message::Refused {
                reason: RefuseReason::DiskFull | RefuseReason::Policy,
                ..
            })
        ),
        "{a:?}"
    );
    untouched(&lab, 1)?;

    // 4b. A source with a newer CRIU than this host's: refused before anything is written,
    // naming both versions' relation.
    let mut p = prepare(1 << 20)?;
    p.criu_version = "99.0.0".into();
    let mut bytes = hello.clone();
    bytes.extend(frame(&Message::Prepare(Box::new(p))));
    let a = run(bytes)?;
    eprintln!("newer criu: {a:?}");
    match a.messages.first() {
        Some(Message::Refused {
            reason: RefuseReason::CriuVersion,
            detail,
        }) if detail.contains("older than the source's 99.0.0") => {}
        _ => bail!("a source with a newer CRIU was not refused: {a:?}"),
    }
    untouched(&lab, 1)?;

    // 5. With `--max-incoming-bytes 1M`: a 2 MB Prepare is refused by policy, naming the limit.
    restart_with_limit(&mut lab, 1, "1M")?;
    let mut bytes = hello.clone();
    bytes.extend(frame(&Message::Prepare(Box::new(prepare(2_000_000)?))));
    let a = run(bytes)?;
    eprintln!("prepare above the limit: {a:?}");
    match a.messages.first() {
        Some(Message::Refused {
            reason: RefuseReason::Policy,
            detail,
        }) if detail.contains("max-incoming-bytes") => {}
        _ => bail!("not refused by the limit: {a:?}"),
    }
    untouched(&lab, 1)?;

    // And a real move of a container bigger than that: refused, the container keeps running
    // on host-a, nothing of it on host-b.
    let id = lab.run_container(0, "big", 2)?;
    let o = lab.mig(0, &["move", "big", &b.name]);
    ensure!(o.code != 0, "a move above the limit succeeded");
    ensure!(o.stderr.contains("max-incoming-bytes"), "{}", o.stderr);
    lab::running_on(&lab, 0, "big")?;
    lab::nothing_left(&lab, 1, &id)?;
    lab.mig_ok(0, &["rm", "-f", "big"])?;

    // 6. A container that grows after its Prepare (declared small, within the limit): the
    // pages it then sends are bounded by the same limit, with the memory presync (mig's page
    // writer) and without it (`criu page-server` behind the tunnel). The move rolls back; the
    // container keeps running on host-a with its memory.
    restart_with_limit(&mut lab, 1, "40M")?;
    for (name, extra) in [("grow", None), ("grow2", Some("--no-memory-presync"))] {
        // 4 s after its start (inside the move's 8 s hold before the freeze, after the
        // presync), it holds 60 MB it did not have at the Prepare.
        let script = "sleep 4; d=$(head -c 60000000 /dev/zero | tr '\\0' x); touch /tmp/grown; \
                      while :; do sleep 1; [ ${#d} = 60000000 ] || echo BAD; done";
        let id = lab.mig_ok(
            0,
            &[
                "run", "-d", "--name", name, "busybox", "--", "sh", "-c", script,
            ],
        )?;
        let id = id.trim().to_owned();
        lab.fault(0, Some("source-before-freeze:delay:8000"))?;
        let mut args = vec!["move", name, b.name.as_str()];
        args.extend(extra);
        let o = lab.mig(0, &args);
        lab.fault(0, None)?;
        eprintln!("{name}: {o:?}");
        ensure!(
            o.code != 0,
            "{name}: a move that grew past --max-incoming-bytes succeeded: {o:?}"
        );
        // The error says why, not only CRIU's broken pipe (QA of session 23, R1).
        ensure!(
            o.stderr
                .contains("the destination stopped the dump's page stream: the pages passed")
                && o.stderr.contains("--max-incoming-bytes"),
            "{name}: the error does not name the limit: {}",
            o.stderr
        );
        lab::running_on(&lab, 0, name)?;
        lab::nothing_left(&lab, 1, &id)?;
        lab.mig_ok(0, &["exec", name, "--", "test", "-e", "/tmp/grown"])
            .with_context(|| format!("{name} did not grow during the move"))?;
        let log = lab.mig_ok(0, &["logs", name])?;
        ensure!(!log.contains("BAD"), "{name}: {log}");
        lab.mig_ok(0, &["rm", "-f", name])?;
    }
    // 7. The same with the writable layer: a 60 MB file written after the Prepare passes the
    // limit in the files sent while frozen; the error says so, not only that the destination
    // stopped a file (QA of session 24).
    let script = "sleep 4; head -c 60000000 /dev/zero > /big; touch /tmp/grown; \
                  while :; do sleep 1; done";
    let id = lab.mig_ok(
        0,
        &[
            "run", "-d", "--name", "growfile", "busybox", "--", "sh", "-c", script,
        ],
    )?;
    let id = id.trim().to_owned();
    lab.fault(0, Some("source-before-freeze:delay:8000"))?;
    let o = lab.mig(0, &["move", "growfile", b.name.as_str()]);
    lab.fault(0, None)?;
    eprintln!("growfile: {o:?}");
    ensure!(
        o.code != 0 && o.stderr.contains("--max-incoming-bytes"),
        "growfile: the error does not name the limit: {o:?}"
    );
    lab::running_on(&lab, 0, "growfile")?;
    lab::nothing_left(&lab, 1, &id)?;
    lab.mig_ok(0, &["rm", "-f", "growfile"])?;
    Ok(())
}
