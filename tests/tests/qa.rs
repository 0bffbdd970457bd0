//! What a new user met that the other tests did not (sessions 7 and 8's independent checks): each
//! test is one problem found by hand, reproduced end to end in a real two-host lab.
//!
//! Needs root. Subnets 10.79.74.0/24 to 10.79.79.0/24 and 10.79.81.0/24 to 10.79.88.0/24, one
//! per test; each lab is removed by its guard whatever happens. Session 9's checks (a new user's
//! commands and the docs' promises) are at the end.

use anyhow::{ensure, Result};
use mig_tests::lab::{last_tick, running_on, ticks_past, Lab};
use std::time::Duration;

/// Runs a busybox counter (one line every 0.2 s) named `name` from `image` on host 0 and waits
/// until it counts; returns its id.
fn run_ticker(lab: &Lab, image: &str, name: &str) -> Result<String> {
    let script = "i=0; while :; do i=$((i+1)); echo $i; sleep 0.2; done";
    let id = lab.mig_ok(
        0,
        &["run", "-d", "--name", name, image, "--", "sh", "-c", script],
    )?;
    ticks_past(lab, 0, name, 0)?;
    Ok(id.trim().to_owned())
}

/// A FIFO in the container's writable layer (`mkfifo /tmp/f`). Before the fix every move
/// was rolled back ("cannot write the layer tar: paths in archives must be relative") and
/// `checkpoint --export` failed the same way: tar named the FIFO by its path on the host.
#[test]
fn a_fifo_in_the_writable_layer_moves_and_exports() -> Result<()> {
    if !mig_tests::is_root("migration tests") {
        return Ok(());
    }
    let lab = Lab::up_on("qafifo", [10, 79, 74], 2)?;
    let script = "mkfifo -m 640 /tmp/f; i=0; while :; do i=$((i+1)); echo $i; sleep 0.2; done";
    lab.mig_ok(
        0,
        &[
            "run", "-d", "--name", "fifo", "busybox", "--", "sh", "-c", script,
        ],
    )?;
    ticks_past(&lab, 0, "fifo", 0)?;
    let before = last_tick(&lab, 0, "fifo");
    lab.mig_ok(0, &["move", "fifo", "host-b", "--json"])?;
    running_on(&lab, 1, "fifo")?;
    ticks_past(&lab, 1, "fifo", before)?;
    let kind = lab.mig_ok(1, &["exec", "fifo", "--", "stat", "-c", "%F %a", "/tmp/f"])?;
    assert_eq!(kind.trim(), "fifo 640");
    let dir = tempfile::tempdir()?;
    let export = dir.path().join("fifo.tar");
    let export = export.display().to_string();
    lab.mig_ok(
        1,
        &["checkpoint", "fifo", "--leave-running", "--export", &export],
    )?;
    let list = std::process::Command::new("tar")
        .args(["-tvf", &export, "upper.tar"])
        .output()?;
    assert!(list.status.success(), "{list:?}");
    let inner = std::process::Command::new("sh")
        .args(["-c", &format!("tar -xOf {export} upper.tar | tar -tvf -")])
        .output()?;
    let inner = String::from_utf8_lossy(&inner.stdout);
    assert!(
        inner
            .lines()
            .any(|l| l.starts_with('p') && l.ends_with("tmp/f")),
        "{inner}"
    );
    Ok(())
}

/// `mig image import X --name busybox` while a container runs from the image named busybox.
/// Before the fix the old image's record was replaced and its layers collected: the running
/// container's /bin emptied under it and `mig move` failed with "no such image".
#[test]
fn an_import_under_a_used_name_keeps_the_image() -> Result<()> {
    if !mig_tests::is_root("migration tests") {
        return Ok(());
    }
    let lab = Lab::up_on("qaimg", [10, 79, 75], 2)?;
    let old = lab.mig_json(0, &["image", "ls", "--json"])?;
    let old_id = old[0]["id"].as_str().unwrap_or_default().to_owned();
    run_ticker(&lab, "busybox", "user")?;
    // Another image under the same name.
    let dir = tempfile::tempdir()?;
    let rootfs = mig_tests::busybox_rootfs(dir.path())?;
    std::fs::write(rootfs.join("etc/release"), "2\n")?;
    let tar = mig_tests::tar_of(&rootfs, dir.path(), "busybox2.tar")?;
    let new_id = lab.mig_ok(
        0,
        &[
            "image",
            "import",
            &tar.display().to_string(),
            "--name",
            "busybox",
        ],
    )?;
    assert_ne!(new_id.trim(), old_id);
    let images = lab.mig_json(0, &["image", "ls", "--json"])?;
    let kept = format!("busybox-{}", &old_id[7..19]);
    assert!(
        images.as_array().is_some_and(|a| a
            .iter()
            .any(|i| i["name"] == kept.as_str() && i["id"] == old_id.as_str())),
        "{images}"
    );
    // The container's root filesystem is intact, and it still moves.
    let out = lab.mig_ok(0, &["exec", "user", "--", "ls", "/bin/busybox"])?;
    assert_eq!(out.trim(), "/bin/busybox");
    let before = last_tick(&lab, 0, "user");
    lab.mig_ok(0, &["move", "user", "host-b", "--json"])?;
    running_on(&lab, 1, "user")?;
    ticks_past(&lab, 1, "user", before)?;
    // Removed, the kept image can go too.
    lab.mig_ok(1, &["rm", "-f", "user"])?;
    Ok(())
}

/// `mig drain` of a host whose container has an established TCP connection (a client and a
/// server on its loopback). The refusal told the user to "use --tcp-established", which
/// `mig drain` did not have; it has it now (and `--mode`).
#[test]
fn drain_keeps_tcp_connections_when_asked() -> Result<()> {
    if !mig_tests::is_root("migration tests") {
        return Ok(());
    }
    let lab = Lab::up_on("qadrain", [10, 79, 76], 2)?;
    let script = "sleep 100000 | nc -l -p 9000 > /tmp/got & sleep 0.5; i=0; \
                  while :; do i=$((i+1)); echo $i >&2; echo $i; sleep 0.2; done | nc 127.0.0.1 9000";
    lab.mig_ok(
        0,
        &[
            "run", "-d", "--name", "tcp", "busybox", "--", "sh", "-c", script,
        ],
    )?;
    ticks_past(&lab, 0, "tcp", 0)?;
    let refused = lab.mig(0, &["drain", "--json"]);
    assert_eq!(refused.code, 125, "{refused:?}");
    assert!(refused.stdout.contains("--tcp-established"), "{refused:?}");
    // Named as `mig move` names it, not by the id drain passes.
    assert!(
        refused.stdout.contains("container tcp has 2 established"),
        "{refused:?}"
    );
    // The JSON has the reasons; stderr still names the container that was not moved.
    assert!(
        refused.stderr.contains("mig: tcp: not moved: ")
            && refused.stderr.contains("--tcp-established"),
        "{refused:?}"
    );
    running_on(&lab, 0, "tcp")?;
    let before = last_tick(&lab, 0, "tcp");
    let r = lab.mig_json(
        0,
        &["drain", "--tcp-established", "--mode", "stream", "--json"],
    )?;
    assert!(r["moved"] == 1 && r["failed"] == 0, "{r}");
    running_on(&lab, 1, "tcp")?;
    ticks_past(&lab, 1, "tcp", before)?;
    // The server still receives what the client sends over the moved connection.
    let got = |lab: &Lab| -> u64 {
        lab.mig(1, &["exec", "tcp", "--", "tail", "-n", "1", "/tmp/got"])
            .stdout
            .trim()
            .parse()
            .unwrap_or(0)
    };
    let first = got(&lab);
    assert!(
        mig_tests::wait_until(Duration::from_secs(10), || got(&lab) > first.max(before)),
        "the connection stopped after the move: {first}"
    );
    Ok(())
}

/// A process, killed and reaped on drop.
struct Kill(std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `mig` command of the lab running in the background, its output read as it comes.
struct Watched {
    child: Kill,
    seen: std::sync::Arc<std::sync::Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Watched {
    /// Its whole standard output and error, once it ended.
    fn output(&mut self) -> Result<(String, String)> {
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        let mut stderr = String::new();
        if let Some(mut e) = self.child.0.stderr.take() {
            std::io::Read::read_to_string(&mut e, &mut stderr)?;
        }
        let stdout = self.seen.lock().map(|s| s.clone()).unwrap_or_default();
        Ok((stdout, stderr))
    }
}

/// Starts `mig ARGS` against the lab.
fn watched(lab: &Lab, args: &[&str]) -> Result<Watched> {
    let mut child = Kill(
        std::process::Command::new(mig_tests::bin("mig"))
            .args(args)
            .env("MIG_LAB", &lab.name)
            .env_remove("MIG_SOCKET")
            .env_remove("MIG_HOST")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?,
    );
    let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = child.0.stdout.take().map(|mut o| {
        let seen = seen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = std::io::Read::read(&mut o, &mut buf) {
                if n == 0 {
                    break;
                }
                if let Ok(mut s) = seen.lock() {
                    s.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }
        })
    });
    Ok(Watched {
        child,
        seen,
        reader,
    })
}

/// `mig logs -f` while the container moves. It used to end silently, exit code 0, when the
/// container left: the user could not tell a move from an exit. Now it follows the container
/// to the lab host it moved to (saying so on stderr), without printing anything twice.
#[test]
fn logs_follow_goes_with_the_container() -> Result<()> {
    if !mig_tests::is_root("migration tests") {
        return Ok(());
    }
    let lab = Lab::up_on("qalogs", [10, 79, 77], 2)?;
    let script = "i=0; while :; do i=$((i+1)); echo $i; sleep 0.1; done";
    lab.mig_ok(
        0,
        &[
            "run", "-d", "--name", "lf", "busybox", "--", "sh", "-c", script,
        ],
    )?;
    ticks_past(&lab, 0, "lf", 0)?;
    let mut follow = watched(&lab, &["--host", "host-a", "logs", "-f", "lf"])?;
    let seen = follow.seen.clone();
    // Read as it comes: the move starts once the follower is following.
    let following = mig_tests::wait_until(Duration::from_secs(20), || {
        seen.lock().is_ok_and(|s| s.lines().count() > 2)
    });
    assert!(following, "mig logs -f printed nothing");
    lab.mig_ok(0, &["move", "lf", "host-b", "--json"])?;
    let after = last_tick(&lab, 1, "lf");
    ticks_past(&lab, 1, "lf", after)?;
    lab.mig_ok(1, &["stop", "-t", "1", "lf"])?;
    let end = last_tick(&lab, 1, "lf");
    let exited = mig_tests::wait_until(Duration::from_secs(20), || {
        matches!(follow.child.0.try_wait(), Ok(Some(_)))
    });
    assert!(exited, "mig logs -f did not end with the container");
    let (stdout, stderr) = follow.output()?;
    assert!(
        stderr.contains("lf moved to host-b; following it there"),
        "{stderr}"
    );
    let printed: Vec<u64> = stdout
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    let want: Vec<u64> = (1..=end).collect();
    assert!(
        printed == want,
        "printed {} lines ({:?} .. {:?}), want 1..={end}; stderr: {stderr}",
        printed.len(),
        printed.first(),
        printed.last()
    );

    // An attached `run --rm` follows its container the same way: it ends with the command's
    // exit code on the host the container moved to, and removes it there (QA of session 24:
    // it exited 125 with "no such container", and the container stayed there, exited).
    let mut run = watched(
        &lab,
        &[
            "--host",
            "host-a",
            "run",
            "--rm",
            "--name",
            "att",
            "busybox",
            "--",
            "sh",
            "-c",
            "echo started; while [ ! -e /tmp/go ]; do sleep 0.1; done; echo bye; exit 7",
        ],
    )?;
    let started = mig_tests::wait_until(Duration::from_secs(20), || {
        lab.mig(0, &["logs", "att"]).stdout.contains("started")
    });
    assert!(started, "the attached container did not start");
    lab.mig_ok(0, &["move", "att", "host-b"])?;
    lab.mig_ok(1, &["exec", "att", "--", "touch", "/tmp/go"])?;
    let mut status = None;
    let ended = mig_tests::wait_until(Duration::from_secs(30), || {
        status = run.child.0.try_wait().ok().flatten();
        status.is_some()
    });
    assert!(ended, "the attached run did not end with its container");
    let (stdout, stderr) = run.output()?;
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(7),
        "stdout: {stdout}; stderr: {stderr}"
    );
    assert!(
        stdout.contains("started") && stdout.contains("bye"),
        "{stdout}"
    );
    assert!(
        stderr.contains("att moved to host-b; following it there"),
        "{stderr}"
    );
    let left = lab.mig_ok(1, &["ps", "-a", "-q"])?;
    let gone = lab.mig(1, &["inspect", "att"]);
    assert!(gone.code != 0, "--rm left the container on host-b: {left}");

    // A shell running a command with its stdout redirected keeps the log pipe in another
    // descriptor meanwhile (busybox: the read below holds fd 1 on /dev/null). Dumped then, the
    // pipe is still the log's: the output goes on after a move and after a checkpoint and
    // restore (QA of session 25: the restored container wrote into a pipe nobody read).
    let script = "mkfifo /tmp/f; exec 3<>/tmp/f; i=0; \
                  while :; do i=$((i+1)); echo $i; read -t 1 x <&3 >/dev/null; done";
    lab.mig_ok(
        0,
        &[
            "run", "-d", "--name", "redir", "busybox", "--", "sh", "-c", script,
        ],
    )?;
    let before = ticks_past(&lab, 0, "redir", 0)?;
    lab.mig_ok(0, &["move", "redir", "host-b"])?;
    let moved = ticks_past(&lab, 1, "redir", before)?;
    lab.mig_ok(1, &["checkpoint", "redir"])?;
    lab.mig_ok(1, &["restore", "redir"])?;
    ticks_past(&lab, 1, "redir", moved)?;
    lab.mig_ok(1, &["rm", "-f", "redir"])?;
    Ok(())
}

/// The pids limit in force on the destination cgroup: v1 `pids` hierarchy or cgroup2.
fn pids_max(cgroup: &str) -> Option<String> {
    ["/sys/fs/cgroup/pids", "/sys/fs/cgroup"]
        .iter()
        .map(|root| std::path::Path::new(root).join(cgroup).join("pids.max"))
        .find_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_owned())
}

/// A container near its `--pids` limit (7 tasks under 8) could not be moved or restored:
/// CRIU runs in the container's cgroup and forks its tasks there, and the restore failed with
/// "Can't fork for 3: Resource temporarily unavailable" (session 8's check). The limit is set
/// once CRIU is done, and holds on the destination.
#[test]
fn a_container_near_its_pids_limit_moves() -> Result<()> {
    if !mig_tests::is_root("migration tests") {
        return Ok(());
    }
    let lab = Lab::up_on("qapids", [10, 79, 81], 2)?;
    let script = "for i in 1 2 3 4 5; do sleep 100000 & done; \
                  i=0; while :; do i=$((i+1)); echo $i; sleep 0.2; done";
    lab.mig_ok(
        0,
        &[
            "run", "-d", "--name", "pl", "--pids", "8", "busybox", "--", "sh", "-c", script,
        ],
    )?;
    ticks_past(&lab, 0, "pl", 0)?;
    for (from, to, mode) in [(0, 1, "cold"), (1, 0, "lazy"), (0, 1, "stream")] {
        let before = last_tick(&lab, from, "pl");
        let peer = if to == 1 { "host-b" } else { "host-a" };
        lab.mig_ok(from, &["move", "pl", peer, "--mode", mode, "--json"])?;
        let v = running_on(&lab, to, "pl")?;
        ticks_past(&lab, to, "pl", before)?;
        assert_eq!(v["limits"]["pids"], 8, "{v}");
        let cgroup = v["cgroup"].as_str().unwrap_or_default().to_owned();
        assert_eq!(pids_max(&cgroup).as_deref(), Some("8"), "{cgroup}");
        // The PID map, not `mig exec`: an exec joins the cgroup and would meet the limit.
        let sleepers = v["pid_map"].as_array().map_or(0, |m| {
            m.iter().filter(|p| p["cmd"] == "sleep 100000").count()
        });
        assert_eq!(sleepers, 5, "{v}");
    }
    lab.mig_ok(1, &["rm", "-f", "pl"])?;

    // At its limit, an exec says so rather than a bare EAGAIN (QA of session 24).
    lab.mig_ok(
        1,
        &[
            "run",
            "-d",
            "--name",
            "full",
            "--pids",
            "3",
            "busybox",
            "--",
            "sh",
            "-c",
            "sleep 100000 & sleep 100000 & wait",
        ],
    )?;
    let three = mig_tests::wait_until(Duration::from_secs(20), || {
        lab.mig_json(1, &["inspect", "full", "--json"])
            .is_ok_and(|v| v["pid_map"].as_array().is_some_and(|m| m.len() == 3))
    });
    assert!(three, "the container did not start its two sleeps");
    let o = lab.mig(1, &["exec", "full", "--", "true"]);
    assert!(
        o.code != 0 && o.stderr.contains("at its process limit (--pids 3)"),
        "{o:?}"
    );
    lab.mig_ok(1, &["rm", "-f", "full"])?;
    Ok(())
}

/// The same image imported under two names (an OCI layout and its archive, or one tar twice):
/// both records have one id. A container made from either could not move or be checkpointed
/// ("the container's image: \"sha256:...\" matches several images"), and `image rm` of the
/// spare name was refused because of that container.
#[test]
fn an_image_under_two_names_moves_and_its_spare_name_goes() -> Result<()> {
    if !mig_tests::is_root("migration tests") {
        return Ok(());
    }
    let lab = Lab::up_on("qa2names", [10, 79, 82], 2)?;
    let dir = tempfile::tempdir()?;
    let rootfs = mig_tests::busybox_rootfs(dir.path())?;
    // Not the lab's busybox image: built in the same second, it would have the same id.
    std::fs::write(rootfs.join("etc/qa-two-names"), "1\n")?;
    let tar = mig_tests::tar_of(&rootfs, dir.path(), "bb.tar")?;
    let tar = tar.display().to_string();
    let one = lab.mig_ok(0, &["image", "import", &tar, "--name", "bb-one"])?;
    let two = lab.mig_ok(0, &["image", "import", &tar, "--name", "bb-two"])?;
    assert_eq!(one.trim(), two.trim());
    run_ticker(&lab, "bb-one", "two")?;
    let before = last_tick(&lab, 0, "two");
    lab.mig_ok(0, &["move", "two", "host-b", "--json"])?;
    running_on(&lab, 1, "two")?;
    ticks_past(&lab, 1, "two", before)?;
    let before = last_tick(&lab, 1, "two");
    lab.mig_ok(1, &["move", "two", "host-a", "--json"])?;
    running_on(&lab, 0, "two")?;
    ticks_past(&lab, 0, "two", before)?;
    lab.mig_ok(0, &["checkpoint", "two", "--leave-running", "--json"])?;
    // By id the image is still two names: which one to remove is not guessed.
    let by_id = lab.mig(0, &["image", "rm", one.trim()]);
    assert!(by_id.code != 0, "{by_id:?}");
    assert!(by_id.stderr.contains("matches several images"), "{by_id:?}");
    // The spare name goes; the one left still serves the container and is refused.
    lab.mig_ok(0, &["image", "rm", "bb-two"])?;
    let used = lab.mig(0, &["image", "rm", "bb-one"]);
    assert!(
        used.stderr.contains("is used by containers: two"),
        "{used:?}"
    );
    let out = lab.mig_ok(0, &["exec", "two", "--", "ls", "/bin/busybox"])?;
    assert_eq!(out.trim(), "/bin/busybox");
    lab.mig_ok(0, &["rm", "-f", "two"])?;
    Ok(())
}

/// A process running a binary deleted since it started (an upgrade inside the container): CRIU
/// copies such a file into the images only up to `--ghost-limit`, 1 MiB by default, and every
/// move and checkpoint failed ("Can't dump ghost file /tmp/sh of 1982256 size, increase
/// limit"). mig passes a limit of 1 GiB.
#[test]
fn a_process_running_a_deleted_binary_moves() -> Result<()> {
    if !mig_tests::is_root("migration tests") {
        return Ok(());
    }
    let lab = Lab::up_on("qaghost", [10, 79, 83], 2)?;
    // The shell runs from a copy of busybox (about 2 MB) that it deletes.
    let script = "cp /bin/busybox /tmp/sh && exec /tmp/sh -c \
                  'rm /tmp/sh; i=0; while :; do i=$((i+1)); echo $i; sleep 0.2; done'";
    lab.mig_ok(
        0,
        &[
            "run", "-d", "--name", "ghost", "busybox", "--", "sh", "-c", script,
        ],
    )?;
    ticks_past(&lab, 0, "ghost", 0)?;
    let exe = lab.mig_ok(0, &["exec", "ghost", "--", "readlink", "/proc/1/exe"])?;
    assert_eq!(exe.trim(), "/tmp/sh (deleted)");
    lab.mig_ok(0, &["checkpoint", "ghost", "--leave-running"])?;
    for (from, to, mode) in [(0, 1, "cold"), (1, 0, "stream")] {
        let before = last_tick(&lab, from, "ghost");
        let peer = if to == 1 { "host-b" } else { "host-a" };
        lab.mig_ok(from, &["move", "ghost", peer, "--mode", mode, "--json"])?;
        running_on(&lab, to, "ghost")?;
        ticks_past(&lab, to, "ghost", before)?;
    }
    lab.mig_ok(0, &["rm", "-f", "ghost"])?;
    Ok(())
}

/// A deleted file a container holds open is copied into the checkpoint and crosses while
/// frozen, in every mode: the pre-flight counts it (QA of session 19: 300 MiB of it made a lazy
/// move take 2658 ms, predicted 1031). Checked on the model's own figures, not on timings: the
/// prediction covers at least the file over the link the move measured, past the fixed cost.
#[test]
fn the_pre_flight_counts_deleted_files_held_open() -> Result<()> {
    if !mig_tests::is_root("migration tests") {
        return Ok(());
    }
    let lab = Lab::up_on("qaghostpf", [10, 79, 89], 2)?;
    let script = "dd if=/dev/urandom of=/big bs=1M count=128 2>/dev/null; exec 3</big; rm /big; \
                  i=0; while :; do i=$((i+1)); echo $i; sleep 0.2; done";
    lab.mig_ok(
        0,
        &[
            "run", "-d", "--name", "held", "busybox", "--", "sh", "-c", script,
        ],
    )?;
    ticks_past(&lab, 0, "held", 0)?;
    let r: serde_json::Value =
        lab.mig_json(0, &["move", "held", "host-b", "--mode", "lazy", "--json"])?;
    running_on(&lab, 1, "held")?;
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    let (predicted, fixed, rate) = (
        n(&r["predicted_downtime_ms"]),
        n(&r["fixed_cost"]["ms"]),
        n(&r["throughput_bytes_s"]).max(1),
    );
    let file_ms = (128u64 << 20) * 1000 / rate;
    lab.mig_ok(1, &["rm", "-f", "held"])?;
    ensure!(
        predicted >= fixed + file_ms,
        "predicted {predicted} ms: less than the fixed {fixed} ms and the file's {file_ms} ms over the link ({r})"
    );
    Ok(())
}

/// A move whose dump fails names CRIU's log in its error; the log used to be removed with the
/// move's work directory before the user could read it. It is kept as
/// `containers/<id>/move-dump.log`, and the error names that file.
#[test]
fn a_failed_dump_keeps_the_log_the_error_names() -> Result<()> {
    if !mig_tests::is_root("migration tests") {
        return Ok(());
    }
    let lab = Lab::up_on("qadumplog", [10, 79, 84], 2)?;
    let id = run_ticker(&lab, "busybox", "dl")?;
    lab.fault(0, Some("source-dump:criu-fail"))?;
    let out = lab.mig(0, &["move", "dl", "host-b"]);
    lab.fault(0, None)?;
    assert!(out.code != 0, "{out:?}");
    let kept = lab
        .state_dir(0)
        .join("containers")
        .join(id.trim())
        .join("move-dump.log");
    assert!(
        out.stderr.contains(&format!("log {}", kept.display())),
        "{}",
        out.stderr
    );
    let log = std::fs::read_to_string(&kept)?;
    assert!(log.contains("Error"), "{log}");
    // The container runs on here, and moves once the fault is gone.
    let before = last_tick(&lab, 0, "dl");
    ticks_past(&lab, 0, "dl", before)?;
    lab.mig_ok(0, &["move", "dl", "host-b", "--json"])?;
    running_on(&lab, 1, "dl")?;
    lab.mig_ok(1, &["rm", "-f", "dl"])?;
    Ok(())
}

/// A container appending to a file as fast as it can while it moves: the presync archives the
/// file as it grows. The layer tar had more bytes than its header said and every move rolled
/// back ("cannot unpack the writable layer: cannot read the layer tar: numeric field was not a
/// number"). After the moves every line is there, in order.
#[test]
fn a_file_appended_during_the_presync_moves() -> Result<()> {
    if !mig_tests::is_root("migration tests") {
        return Ok(());
    }
    let lab = Lab::up_on("qaappend", [10, 79, 85], 2)?;
    let pad = "x".repeat(56);
    let script = format!("i=0; while :; do i=$((i+1)); echo \"$i {pad}\"; done >> /data.log");
    let id = lab.mig_ok(
        0,
        &[
            "run", "-d", "--name", "app", "busybox", "--", "sh", "-c", &script,
        ],
    )?;
    let grown = mig_tests::wait_until(Duration::from_secs(20), || {
        lab.mig_ok(0, &["exec", "app", "--", "stat", "-c", "%s", "/data.log"])
            .is_ok_and(|s| s.trim().parse::<u64>().unwrap_or(0) > 2 << 20)
    });
    assert!(grown, "/data.log did not grow");
    for (from, to, mode) in [(0, 1, "cold"), (1, 0, "stream")] {
        let peer = if to == 1 { "host-b" } else { "host-a" };
        lab.mig_ok(from, &["move", "app", peer, "--mode", mode, "--json"])?;
        running_on(&lab, to, "app")?;
    }
    lab.mig_ok(0, &["stop", "-t", "1", "app"])?;
    // Stopped, the file no longer changes: every line numbered in order, none cut.
    let upper = lab
        .state_dir(0)
        .join("containers")
        .join(id.trim())
        .join("upper/data.log");
    let text = std::fs::read_to_string(&upper)?;
    let mut n = 0u64;
    for (k, line) in text.lines().enumerate() {
        let want = format!("{} {pad}", k + 1);
        assert_eq!(line, want, "line {} of {}", k + 1, upper.display());
        n += 1;
    }
    assert!(n > 10_000, "{n} lines");
    lab.mig_ok(0, &["rm", "app"])?;
    Ok(())
}

/// `mig run -w DIR` with DIR missing from the image: podman and runc create it (and its missing
/// parents), owned by the container's user; mig failed the start ("container setup failed at
/// step changing to the working directory: ENOENT"). The directory is in the writable layer:
/// it moves with the container, and `exec` starts in it on the new host.
#[test]
fn run_creates_a_missing_workdir() -> Result<()> {
    if !mig_tests::is_root("migration tests") {
        return Ok(());
    }
    let lab = Lab::up_on("qaworkdir", [10, 79, 86], 2)?;
    let script = "pwd; stat -c %u:%g:%a . /srv; stat -c %u:%g /tmp; touch f && echo written";
    let o = lab.mig(
        0,
        &[
            "run",
            "-w",
            "/srv/app",
            "-u",
            "1000:1000",
            "busybox",
            "--",
            "sh",
            "-c",
            script,
        ],
    );
    ensure!(o.code == 0, "{o:?}");
    ensure!(
        o.stdout == "/srv/app\n1000:1000:755\n1000:1000:755\n0:0\nwritten\n",
        "{o:?}"
    );
    lab.mig_ok(
        0,
        &[
            "run",
            "-d",
            "--name",
            "wd",
            "-w",
            "/work/dir",
            "busybox",
            "--",
            "sh",
            "-c",
            "while :; do sleep 1; done",
        ],
    )?;
    lab.mig_ok(0, &["move", "wd", "host-b", "--json"])?;
    running_on(&lab, 1, "wd")?;
    let pwd = lab.mig_ok(1, &["exec", "wd", "--", "pwd"])?;
    ensure!(pwd == "/work/dir\n", "{pwd:?}");
    lab.mig_ok(1, &["rm", "-f", "wd"])?;
    Ok(())
}

/// Ctrl-C (SIGINT) to `mig move` in the middle of the move: the command died of the signal
/// with nothing said (on a terminal its progress line was left half drawn), and the user could
/// not tell that the agent carries the move on. mig now says so in one line (exit 125); the
/// container ends up running on exactly one host, nothing of it left on the other.

#[test]
fn ctrl_c_of_a_move_says_the_move_goes_on() -> Result<()> {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    if !mig_tests::is_root("migration tests") {
        return Ok(());
    }
    let lab = Lab::up_on("qaintr", [10, 79, 88], 2)?;
    let id = run_ticker(&lab, "busybox", "intr")?;
    let before = last_tick(&lab, 0, "intr");
    // A presync that takes 3 s: the move is surely under way when Ctrl-C comes.
    lab.fault(0, Some("source-presync:delay:3000"))?;
    let child = mig_tests::default_sigint(&mut std::process::Command::new(mig_tests::bin("mig")))
        .arg("--socket")
        .arg(&lab.hosts[0].socket)
        .args(["move", "intr", "host-b"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let moving = mig_tests::wait_until(Duration::from_secs(20), || {
        lab.mig_json(0, &["inspect", "intr", "--json"])
            .is_ok_and(|v| !v["moving"].is_null())
    });
    // A second move meanwhile is refused, naming the move under way (it said "another
    // operation on the container is in progress").
    let second = lab.mig(0, &["move", "intr", "host-b"]);
    kill(Pid::from_raw(child.id() as i32), Signal::SIGINT)?;
    let o = child.wait_with_output()?;
    ensure!(moving, "the move never showed in inspect");
    ensure!(
        second.code == 125 && second.stderr.contains("intr is being moved to host-b"),
        "{second:?}"
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    ensure!(
        o.status.code() == Some(125)
            && stderr.lines().count() == 1
            && stderr.contains("goes on in the agent"),
        "{o:?}"
    );
    lab.fault(0, None)?;
    let landed = mig_tests::wait_until(Duration::from_secs(60), || {
        running_on(&lab, 1, "intr").is_ok()
    });
    ensure!(landed, "{:?}", lab.mig(1, &["ps", "-a"]));
    ticks_past(&lab, 1, "intr", before)?;
    mig_tests::lab::nothing_left(&lab, 0, &id)?;
    // The old host says where it went (it said only "no such container: intr").
    let o = lab.mig(0, &["stop", "intr"]);
    ensure!(
        o.code == 125 && o.stderr.contains("intr moved from here to host-b"),
        "{o:?}"
    );
    lab.mig_ok(1, &["rm", "-f", "intr"])?;
    // Ctrl-C of an attached `mig run`: it died of the signal with nothing said; the container
    // runs on, and mig now says so.
    let child = mig_tests::default_sigint(&mut std::process::Command::new(mig_tests::bin("mig")))
        .arg("--socket")
        .arg(&lab.hosts[0].socket)
        .args([
            "run",
            "--name",
            "att",
            "busybox",
            "--",
            "sh",
            "-c",
            "echo up; sleep 1000",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let up = mig_tests::wait_until(Duration::from_secs(20), || {
        lab.mig(0, &["logs", "att"]).stdout.contains("up")
    });
    // The client follows the log once `run` answered; give it a moment to be there.
    std::thread::sleep(Duration::from_millis(500));
    kill(Pid::from_raw(child.id() as i32), Signal::SIGINT)?;
    let o = child.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&o.stderr);
    ensure!(
        up && o.status.code() == Some(125)
            && String::from_utf8_lossy(&o.stdout) == "up\n"
            && stderr.lines().count() == 1
            && stderr.contains("container att keeps running"),
        "{o:?}"
    );
    running_on(&lab, 0, "att")?;
    lab.mig_ok(0, &["rm", "-f", "att"])?;
    Ok(())
}

/// A new user's mistakes each get one line saying what is wrong (exit 125): `mig drain --to` a
/// peer that is not pinned said "background task failed: host-z is not a pinned peer".
#[test]
fn operator_mistakes_say_what_is_wrong() -> Result<()> {
    if !mig_tests::is_root("migration tests") {
        return Ok(());
    }
    let lab = Lab::up_on("qamistake", [10, 79, 87], 2)?;
    let o = lab.mig(0, &["drain", "--to", "host-z"]);
    ensure!(
        o.code == 125
            && o.stderr == "mig: host-z is not a pinned peer of this host (pinned: host-b)\n",
        "{o:?}"
    );
    Ok(())
}
