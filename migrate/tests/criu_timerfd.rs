//! A periodic timerfd keeps firing across a dump and restore even when it expired, unread, while
//! the task was stopped for the dump: CRIU dumps such a timer with `it_value` 0 and would restore
//! it disarmed; mig re-arms it in `files.img` after the dump (`criu::timerfd`). The task is this
//! test binary itself, run again as `timerfd_child` in its own PID namespace: it reads its 50 ms
//! timer, stores the count of expirations in a file, then sleeps 300 ms, so that the timer
//! expires unread while it sleeps. Root only (skipped otherwise, or without CRIU).

use mig_migrate::criu::{DumpOpts, RestoreOpts};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

mod support;

use support::{criu_or_skip, dump_retrying, in_pid_namespace, spawn_init, Reaper};

const CHILD_ENV: &str = "MIG_TIMERFD_TEST_FILE";

/// The child's loop (does nothing unless run by the test below with the file in its env).
#[test]
fn timerfd_child() {
    let Some(path) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    // SAFETY: plain syscalls on descriptors this process owns.
    unsafe {
        let tfd = libc::timerfd_create(libc::CLOCK_MONOTONIC, 0);
        assert!(tfd >= 0);
        let period = libc::timespec {
            tv_sec: 0,
            tv_nsec: 50_000_000,
        };
        let spec = libc::itimerspec {
            it_interval: period,
            it_value: period,
        };
        assert_eq!(
            libc::timerfd_settime(tfd, 0, &spec, std::ptr::null_mut()),
            0
        );
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
        let mut count: u64 = 0;
        loop {
            let mut ticks: u64 = 0;
            let n = libc::read(tfd, (&mut ticks as *mut u64).cast(), 8);
            if n == 8 {
                count += ticks;
                let line = format!("{count:020}\n");
                libc::pwrite(fd, line.as_ptr().cast(), line.len(), 0);
            }
            // Long enough for the timer to expire unread; EINTR after a restore is fine.
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

fn count(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .trim()
        .parse()
        .unwrap_or(0)
}

/// Waits up to `timeout` for the count in `path` to pass `after`.
fn grows(path: &Path, after: u64, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if count(path) > after {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

// The `unshare` child is reaped by the Reaper guard with waitpid, not through `Child`.
#[allow(clippy::zombie_processes)]
#[test]
fn an_expired_periodic_timerfd_keeps_firing_after_a_restore() {
    let Some(criu) = criu_or_skip() else { return };
    let mut reaper = Reaper::default();
    let dir = tempfile::tempdir().unwrap();
    let counter = dir.path().join("count");
    std::fs::write(&counter, "").unwrap();
    let init = spawn_init(
        in_pid_namespace()
            .arg(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "timerfd_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &counter)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
        &mut reaper,
    );
    assert!(grows(&counter, 0, Duration::from_secs(10)), "no count");
    // Right after a read the child sleeps 300 ms: 150 ms in, its timer has expired unread.
    let seen = count(&counter);
    assert!(grows(&counter, seen, Duration::from_secs(2)));
    std::thread::sleep(Duration::from_millis(150));
    let images = dir.path().join("images");
    let opts = DumpOpts {
        pid: init,
        images_dir: images.clone(),
        log_file: "dump.log".into(),
        ..Default::default()
    };
    dump_retrying(&criu, &opts);
    let log = std::fs::read_to_string(images.join("dump.log")).unwrap_or_default();
    let dumped = log
        .lines()
        .find(|l| l.contains("Dumping id") && l.contains("it_value"))
        .unwrap_or_default()
        .to_owned();
    eprintln!("{dumped}");
    let before = count(&counter);
    let outcome = criu
        .restore(&RestoreOpts {
            images_dir: images.clone(),
            log_file: "restore.log".into(),
            pidfile: "restore.pid".into(),
            ..Default::default()
        })
        .unwrap();
    reaper.0.push(outcome.pid);
    // Without the re-arm the child reads its pending expirations once, then blocks forever.
    let mut last = before;
    for round in 0..3 {
        assert!(
            grows(&counter, last, Duration::from_secs(3)),
            "the timer stopped after the restore (round {round}, count {last}; dumped as: {dumped})"
        );
        last = count(&counter);
    }
    drop(reaper);
}
