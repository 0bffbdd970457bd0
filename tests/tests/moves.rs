//! Live migration end to end: a real two-host lab (`mig_agent::lab`), real `migd` agents talking
//! QUIC with pinned certificates, real CRIU. A multi-process busybox container (a shell parent and
//! a child connected by a pipe, each holding random data and checking its md5 every few seconds,
//! the child writing a counter file) moves to host-b and back; then the faults: the destination
//! agent killed during the transfer and during the restore, a corrupted file in transit, a
//! failing restore, an unpinned source. After each: the container runs on exactly one host with
//! its memory intact, and nothing of it is left on the other.
//!
//! Needs root. Each test has its own lab (name from the test and the process id, own subnet),
//! removed by a guard with `lab::down` whatever happens.

use anyhow::{bail, Context, Result};
use mig_tests::lab::{continues, log_state, move_and_check, nothing_left, running_on, Lab};
use std::time::Duration;

#[test]
fn move_there_and_back() -> Result<()> {
    if !mig_tests::is_root("migration tests") {
        return Ok(());
    }
    let lab = Lab::up("h", 1)?;
    // Two processes with 55 MB of random bytes each, held as base64 by busybox sh (with its
    // copies the dump holds about 300 MB).
    let id = lab.run_container(0, "mover", 55)?;
    move_and_check(&lab, 0, 1, "mover", &id)?;
    move_and_check(&lab, 1, 0, "mover", &id)?;
    Ok(())
}

/// After a failed move: the container runs on host-a, intact and counting, and host-b has
/// nothing of it.
fn rolled_back(lab: &Lab, name: &str, id: &str, count_before: u64) -> Result<()> {
    running_on(lab, 0, name)?;
    continues(lab, 0, name, count_before)?;
    nothing_left(lab, 1, id)
}

fn failed_move(lab: &Lab, name: &str) -> Result<(u64, String)> {
    let (count, _) = log_state(&lab.mig(0, &["logs", name]).stdout);
    let o = lab.mig(0, &["move", name, "host-b", "--json"]);
    if o.code == 0 {
        bail!("the move succeeded despite the fault: {}", o.stdout);
    }
    eprintln!("move failed as expected: {}", o.stderr.trim());
    Ok((count, o.stderr))
}

#[test]
fn dest_killed_during_transfer() -> Result<()> {
    if !mig_tests::is_root("migration tests") {
        return Ok(());
    }
    let mut lab = Lab::up("t", 2)?;
    let id = lab.run_container(0, "victim", 8)?;
    lab.fault(1, Some("dest-transfer:kill"))?;
    let (count, _) = failed_move(&lab, "victim")?;
    lab.fault(1, None)?;
    lab.restart(1)?;
    rolled_back(&lab, "victim", &id, count)?;
    // The restarted destination takes it now.
    move_and_check(&lab, 0, 1, "victim", &id)?;
    Ok(())
}

#[test]
fn dest_killed_during_restore() -> Result<()> {
    if !mig_tests::is_root("migration tests") {
        return Ok(());
    }
    let mut lab = Lab::up("r", 3)?;
    let id = lab.run_container(0, "victim", 8)?;
    lab.fault(1, Some("dest-restore:kill"))?;
    let (count, _) = failed_move(&lab, "victim")?;
    lab.fault(1, None)?;
    lab.restart(1)?;
    rolled_back(&lab, "victim", &id, count)?;
    Ok(())
}

#[test]
fn corrupted_file_in_transit() -> Result<()> {
    if !mig_tests::is_root("migration tests") {
        return Ok(());
    }
    let lab = Lab::up("c", 4)?;
    let id = lab.run_container(0, "victim", 8)?;
    lab.fault(0, Some("source-dump:corrupt"))?;
    let (count, err) = failed_move(&lab, "victim")?;
    lab.fault(0, None)?;
    assert!(err.contains("rolled back"), "{err}");
    rolled_back(&lab, "victim", &id, count)?;
    Ok(())
}

#[test]
fn restore_fails_on_destination() -> Result<()> {
    if !mig_tests::is_root("migration tests") {
        return Ok(());
    }
    let lab = Lab::up("f", 5)?;
    let id = lab.run_container(0, "victim", 8)?;
    lab.fault(1, Some("dest-restore:fail"))?;
    let (count, err) = failed_move(&lab, "victim")?;
    lab.fault(1, None)?;
    assert!(err.contains("rolled back"), "{err}");
    rolled_back(&lab, "victim", &id, count)?;
    Ok(())
}

#[test]
fn unpinned_peer_is_refused() -> Result<()> {
    if !mig_tests::is_root("migration tests") {
        return Ok(());
    }
    let lab = Lab::up("u", 6)?;
    let id = lab.run_container(0, "victim", 8)?;
    // host-b no longer trusts host-a: the handshake fails before anything is sent.
    lab.mig_ok(1, &["peers", "rm", "host-a"])?;
    let (count, err) = failed_move(&lab, "victim")?;
    assert!(err.contains("host-b"), "{err}");
    rolled_back(&lab, "victim", &id, count)?;
    Ok(())
}

/// The phases one agent reported for `container` during a move (consecutive repeats folded),
/// the outcome of its MigrationDone and the bytes it said. The phases' bytes count from the
/// start of the move: they never go back (QA session 18: the source's fell from the memory
/// presync's 533 MB to the files' 8.7 MB at the freeze, and its MigrationDone said 8.7 MB of a
/// 548 MB move, the destination's 0).
async fn watch(mut client: mig_agent::client::Client, container: String) -> Result<Seen> {
    use mig_agent::daemon::events::EventKind;
    let mut phases: Vec<String> = Vec::new();
    let mut last = 0u64;
    loop {
        let e = tokio::time::timeout(std::time::Duration::from_secs(180), client.next_event())
            .await??;
        match e.kind {
            EventKind::MigrationPhase {
                container_id,
                phase,
                bytes,
                total_bytes,
                ..
            } if container_id == container => {
                if let Some(t) = total_bytes {
                    assert!(bytes <= t, "{phase}: {bytes} bytes of {t}");
                }
                assert!(bytes >= last, "{phase}: {bytes} bytes after {last}");
                last = bytes;
                if phases.last() != Some(&phase) {
                    phases.push(phase);
                }
            }
            EventKind::MigrationDone {
                container_id,
                outcome,
                bytes,
                ..
            } if container_id == container => {
                assert!(bytes >= last, "done: {bytes} bytes after {last}");
                return Ok((phases, outcome, bytes));
            }
            _ => {}
        }
    }
}

/// What each agent's event stream saw of the move of container `id` (named `watched`) from
/// host `from` to host `to` with `mig move` options `options`: (phases, outcome, bytes) of the
/// source, of the destination, and the move's JSON.
type Seen = (Vec<String>, String, u64);
fn watched_move(
    rt: &tokio::runtime::Runtime,
    lab: &Lab,
    from: usize,
    to: usize,
    id: &str,
    options: &[&str],
) -> Result<(Seen, Seen, serde_json::Value)> {
    let (source, dest) = rt.block_on(async {
        let mut a = mig_agent::client::Client::connect(&lab.hosts[from].socket).await?;
        a.subscribe_events().await?;
        let mut b = mig_agent::client::Client::connect(&lab.hosts[to].socket).await?;
        b.subscribe_events().await?;
        anyhow::Ok((
            tokio::spawn(watch(a, id.to_owned())),
            tokio::spawn(watch(b, id.to_owned())),
        ))
    })?;
    let peer = lab.hosts[to].name.clone();
    let mut args = vec!["move", "watched", &peer, "--json"];
    args.extend_from_slice(options);
    let r = lab.mig_json(from, &args)?;
    let (source, dest) = rt.block_on(async { anyhow::Ok((source.await??, dest.await??)) })?;
    Ok((source, dest, r))
}

#[test]
fn move_reports_phases_on_both_agents() -> Result<()> {
    if !mig_tests::is_root("migration tests") {
        return Ok(());
    }
    let lab = Lab::up("p", 7)?;
    let id = lab.run_container(0, "watched", 8)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (source, dest, r) = watched_move(&rt, &lab, 0, 1, &id, &[])?;
    eprintln!("source saw {source:?}, destination saw {dest:?}; move: {r}");
    let expect = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(
        source.0,
        expect(&["prepare", "presync", "freeze", "dump", "transfer", "restore", "commit"])
    );
    assert_eq!(source.1, "committed");
    // The source's MigrationDone says what the move's result says; the destination's counts
    // what it received (on the connection, so at least the payload).
    assert_eq!(Some(source.2), r["bytes_sent"].as_u64(), "{r}");
    assert!(
        dest.2 >= source.2,
        "destination {} < source {}",
        dest.2,
        source.2
    );
    assert_eq!(
        dest.0,
        expect(&["prepare", "presync", "dump", "transfer", "restore", "commit"])
    );
    assert_eq!(dest.1, "committed");
    running_on(&lab, 1, "watched")?;
    nothing_left(&lab, 0, &id)?;
    // Back in stream mode: the memory presync reports progress in the presync phase, and the
    // phases come in the same order.
    let (source, dest, r) = watched_move(&rt, &lab, 1, 0, &id, &["--mode", "stream"])?;
    eprintln!("stream: source saw {source:?}, destination saw {dest:?}; move: {r}");
    assert!(
        r["memory_presync"]["bytes"].as_u64().unwrap_or(0) > 0,
        "{r}"
    );
    assert_eq!(Some(source.2), r["bytes_sent"].as_u64(), "{r}");
    assert_eq!(
        source.0,
        expect(&["prepare", "presync", "freeze", "dump", "transfer", "restore", "commit"])
    );
    assert_eq!(
        (source.1.as_str(), dest.1.as_str()),
        ("committed", "committed")
    );
    running_on(&lab, 0, "watched")?;
    nothing_left(&lab, 1, &id)?;
    Ok(())
}

#[test]
fn writable_layer_travels_as_presync_and_delta() -> Result<()> {
    if !mig_tests::is_root("migration tests") {
        return Ok(());
    }
    let lab = Lab::up("d", 8)?;
    // A big file written before the move; once /arm exists, 1.5 s later, small changes (made by
    // the container itself: `mig exec` is refused while it moves).
    let script = "head -c 24000000 /dev/urandom > /big; echo one > /small1; echo two > /small2; \
        mkdir -p /d/e; echo x > /d/e/f; echo ready; \
        while [ ! -f /arm ]; do sleep 0.1; done; sleep 1.5; \
        rm /small1; echo changed > /small2; rm -r /d; echo new > /new; echo changed; \
        while :; do sleep 1; done";
    let id = lab.mig_ok(
        0,
        &[
            "run", "-d", "--name", "writer", "busybox", "--", "sh", "-c", script,
        ],
    )?;
    let id = id.trim().to_string();
    let sh = |host: usize, cmd: &str| lab.mig_ok(host, &["exec", "writer", "--", "sh", "-c", cmd]);
    let ready = mig_tests::wait_until(std::time::Duration::from_secs(60), || {
        lab.mig(0, &["logs", "writer"]).stdout.contains("ready")
    });
    assert!(ready, "the container never got ready");
    let big = sh(0, "md5sum /big")?;
    // Extended attributes (user attributes here; file capabilities and ACLs are the same kind)
    // go with the layer: one in the presync, one set after the scan (in the delta).
    let upper = |host: usize, path: &str| {
        lab.state_dir(host)
            .join("containers")
            .join(&id)
            .join("upper")
            .join(path)
    };
    set_xattr(&upper(0, "big"), "user.color", b"blue")?;
    // The presync phase lasts 3 s (the destination sleeps on the first presync file): the
    // changes land between the presync scan and the freeze.
    lab.fault(1, Some("dest-presync:delay:3000"))?;
    sh(0, "touch /arm")?;
    let mover = std::thread::spawn({
        let small2 = upper(0, "small2");
        move || {
            std::thread::sleep(std::time::Duration::from_millis(2000));
            set_xattr(&small2, "user.late", b"yes")
        }
    });
    let r = lab.mig_json(0, &["move", "writer", "host-b", "--json"]);
    mover.join().expect("the xattr thread")?;
    lab.fault(1, None)?;
    let r = r?;
    eprintln!("move: {r}");
    let (presync, delta) = (
        r["presync_upper_bytes"].as_u64().unwrap_or(0),
        r["delta_bytes"].as_u64().unwrap_or(u64::MAX),
    );
    assert!(presync > 24_000_000, "{r}");
    assert!(delta < presync / 10, "the delta resent the big file: {r}");
    running_on(&lab, 1, "writer")?;
    assert_eq!(sh(1, "md5sum /big")?, big);
    assert_eq!(
        sh(1, "cat /small2 /new; ls /small1 /d 2>&1 || true")?,
        "changed\nnew\nls: /small1: No such file or directory\nls: /d: No such file or directory\n"
    );
    assert_eq!(
        get_xattr(&upper(1, "big"), "user.color").as_deref(),
        Some(&b"blue"[..])
    );
    assert_eq!(
        get_xattr(&upper(1, "small2"), "user.late").as_deref(),
        Some(&b"yes"[..])
    );
    // The old output came along.
    let log = lab.mig_ok(1, &["logs", "writer"])?;
    assert!(log.contains("ready") && log.contains("changed"), "{log}");
    nothing_left(&lab, 0, &id)?;
    Ok(())
}

/// The container's log goes in two parts (protocol 1.5): as it is at the presync while the
/// container runs, then only what it gained while frozen; the destination's log is the source's,
/// every line once, and the container goes on writing to it.
#[test]
fn the_log_travels_as_presync_and_tail() -> Result<()> {
    if !mig_tests::is_root("migration tests") {
        return Ok(());
    }
    let lab = Lab::up("lg", 13)?;
    let script = "seq 1 400000; i=400000; \
        while :; do i=$((i+1)); echo $i; usleep 20000; done";
    let id = lab.mig_ok(
        0,
        &[
            "run", "-d", "--name", "talker", "busybox", "--", "sh", "-c", script,
        ],
    )?;
    let id = id.trim().to_string();
    let talking = mig_tests::wait_until(std::time::Duration::from_secs(60), || {
        lab.mig(0, &["logs", "talker"])
            .stdout
            .contains("\n400005\n")
    });
    assert!(talking, "the container never got past its first lines");
    // The presync phase lasts 2 s: lines land between the log's presync copy and the freeze.
    lab.fault(1, Some("dest-presync:delay:2000"))?;
    let r = lab.mig_json(0, &["move", "talker", "host-b", "--json"]);
    lab.fault(1, None)?;
    let r = r?;
    eprintln!("move: {r}");
    let head = r["presync_log_bytes"].as_u64().unwrap_or(0);
    let tail = r["delta_log_bytes"].as_u64().unwrap_or(u64::MAX);
    assert!(head > 2_000_000, "the log did not go with the presync: {r}");
    assert!(
        tail > 0 && tail < 100_000,
        "the frozen part is not the log's tail: {r}"
    );
    running_on(&lab, 1, "talker")?;
    // Lines written on the destination join the moved ones.
    let last_line = || {
        let log = lab.mig(1, &["logs", "talker"]).stdout;
        // The last line may be cut in the middle by the read: the one before it is whole.
        log.lines().rev().nth(1).and_then(|l| l.parse::<u64>().ok())
    };
    let moved = last_line().unwrap_or(0);
    assert!(
        mig_tests::wait_until(std::time::Duration::from_secs(30), || {
            last_line().is_some_and(|n| n > moved + 5)
        }),
        "the container does not write on the destination"
    );
    let log = lab.mig_ok(1, &["logs", "talker"])?;
    let lines: Vec<&str> = log.lines().collect();
    // The last line may be cut in the middle by the read.
    let whole = &lines[..lines.len() - 1];
    for (i, l) in whole.iter().enumerate() {
        assert_eq!(
            l.parse::<usize>().ok(),
            Some(i + 1),
            "line {} of the moved log is {l:?}",
            i + 1
        );
    }
    nothing_left(&lab, 0, &id)?;
    Ok(())
}

#[test]
fn link_cut_at_commit_is_resolved_with_one_copy() -> Result<()> {
    if !mig_tests::is_root("migration tests") {
        return Ok(());
    }
    let lab = Lab::up("i", 9)?;
    let id = lab.run_container(0, "doubt", 8)?;
    let (count, _) = log_state(&lab.mig(0, &["logs", "doubt"]).stdout);
    // The destination journals Committed when Commit arrives, then drops the connection before
    // resuming and answering: the source cannot know (in doubt).
    lab.fault(1, Some("dest-commit:cut"))?;
    // Started as a rebalancer would (`move_start`), watched through the events.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let socket = lab.hosts[0].socket.clone();
    let (mut client, mut events, move_id, failed) = rt.block_on(async {
        use mig_agent::client::Client;
        let mut events = Client::connect(&socket).await?;
        events.subscribe_events().await?;
        let mut c = Client::connect(&socket).await?;
        let id = c.move_start("doubt", "host-b").await?;
        let failed = c.move_wait(&id, Duration::from_millis(100)).await?;
        anyhow::Ok((c, events, id, failed))
    })?;
    lab.fault(1, None)?;
    eprintln!("move: {failed:?}");
    assert_eq!(
        failed.state,
        mig_agent::api::MoveState::Failed,
        "{failed:?}"
    );
    // In doubt the frozen copy belongs to the move (it may still resume here): not killed by
    // hand, as stop, rm and checkpoint are refused.
    let k = lab.mig(0, &["kill", "doubt"]);
    assert!(
        k.code != 0
            && (k.stderr.contains("being moved")
                || k.stderr.contains("busy")
                || k.stderr.contains("is in doubt")),
        "kill of a copy in doubt: {} {}",
        k.code,
        k.stderr
    );
    // Settled: the container runs on exactly one host and nothing of it is left on the other.
    // (While in doubt both copies are frozen; their records still say running.)
    let running = |h: usize| running_on(&lab, h, "doubt").is_ok();
    let r = lab.mig(0, &["move", "--resolve", "doubt", "--json"]);
    eprintln!("resolve: {} {}", r.stdout, r.stderr.trim());
    let settled = mig_tests::wait_until(std::time::Duration::from_secs(60), || {
        let (a, b) = (running(0), running(1));
        a != b && nothing_left(&lab, if a { 1 } else { 0 }, &id).is_ok()
    });
    if !settled {
        agent_logs(&lab);
    }
    assert!(settled, "not settled: {}", lab.mig(0, &["ps", "-a"]).stdout);
    let host = if running(1) { 1 } else { 0 };
    eprintln!("settled on {}", lab.hosts[host].name);
    continues(&lab, host, "doubt", count)?;
    // The move_start's status and the events say how it was settled (they said failed, in
    // doubt, and nothing more: QA of session 20).
    let (status, done) = rt.block_on(async {
        let status = client.move_status(&move_id).await?;
        let done = loop {
            let e = tokio::time::timeout(Duration::from_secs(10), events.next_event()).await??;
            if let mig_agent::api::EventKind::MigrationDone { outcome, .. } = e.kind {
                if outcome != "in_doubt" {
                    break outcome;
                }
            }
        };
        anyhow::Ok((status, done))
    })?;
    let committed = host == 1;
    assert_eq!(
        status.state == mig_agent::api::MoveState::Committed,
        committed,
        "{status:?}"
    );
    assert_eq!(
        done,
        if committed {
            "committed"
        } else {
            "rolled_back"
        }
    );
    Ok(())
}

/// Prints the end of every agent's log (next to its socket) to the test's output.
fn agent_logs(lab: &Lab) {
    for h in &lab.hosts {
        let log = h.socket.with_file_name(format!("{}.log", h.name));
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        eprintln!("--- {} ({} lines)", log.display(), lines.len());
        for l in &lines[lines.len().saturating_sub(60)..] {
            eprintln!("{l}");
        }
    }
}

/// Two hosts move a container of the same name to one destination at the same time: one arrives,
/// the other is refused before anything is frozen (the destination reserves an arriving
/// container's id and name for all its connections) and runs on at its source.
#[test]
fn two_sources_cannot_bring_the_same_name_at_once() -> Result<()> {
    if !mig_tests::is_root("migration tests") {
        return Ok(());
    }
    let lab = Lab::up_n("dupname", 176, 3)?;
    let tar = lab.image_tar.display().to_string();
    lab.mig_ok(2, &["image", "import", &tar, "--name", "busybox"])?;
    // Enough memory that both moves are still under way when the other one prepares.
    let ids = [
        lab.run_container(0, "dup", 30)?,
        lab.run_container(2, "dup", 30)?,
    ];
    let dest = lab.hosts[1].name.clone();
    let (a, c) = std::thread::scope(|s| {
        let a = s.spawn(|| lab.mig(0, &["move", "dup", &dest]));
        let c = s.spawn(|| lab.mig(2, &["move", "dup", &dest]));
        (a.join(), c.join())
    });
    let (a, c) = (
        a.map_err(|_| anyhow::anyhow!("a mover panicked"))?,
        c.map_err(|_| anyhow::anyhow!("a mover panicked"))?,
    );
    eprintln!("a: {} {}\nc: {} {}", a.code, a.stderr, c.code, c.stderr);
    let (moved_from, refused) = match (a.code, c.code) {
        (0, 0) => bail!("both containers named dup arrived on {dest}"),
        (0, _) => (0, &c),
        (_, 0) => (2, &a),
        _ => bail!("neither move succeeded: {} / {}", a.stderr, c.stderr),
    };
    // Refused while the other arrives, or (if that one had already arrived) as a name taken.
    if !refused.stderr.contains("arriving here from another host")
        && !refused.stderr.contains("already there")
    {
        bail!("unclear refusal: {}", refused.stderr);
    }
    let kept = 2 - moved_from;
    running_on(&lab, 1, "dup")?;
    running_on(&lab, kept, "dup")?;
    let ps = lab.mig_ok(1, &["ps", "-a"])?;
    if ps
        .lines()
        .filter(|l| l.split_whitespace().any(|w| w == "dup"))
        .count()
        != 1
    {
        bail!("{dest} does not hold exactly one dup:\n{ps}");
    }
    for (host, id) in [(1, &ids[moved_from / 2]), (kept, &ids[kept / 2])] {
        let _ = lab.mig(host, &["rm", "-f", id]);
    }
    Ok(())
}

/// While a container arrives, its name is taken on the destination: `mig run --name` of it there
/// is refused (it made a second container of that name), and the move ends with one.
#[test]
fn a_run_cannot_take_the_name_of_an_arriving_container() -> Result<()> {
    if !mig_tests::is_root("migration tests") {
        return Ok(());
    }
    let lab = Lab::up("runarr", 178)?;
    let tar = lab.image_tar.display().to_string();
    lab.mig_ok(1, &["image", "import", &tar, "--name", "busybox"])?;
    let id = lab.run_container(0, "comer", 4)?;
    // The presync phase lasts 4 s on the destination: the run comes in the middle of it.
    lab.fault(1, Some("dest-presync:delay:4000"))?;
    let dest = lab.hosts[1].name.clone();
    let (mv, run) = std::thread::scope(|s| {
        let mv = s.spawn(|| lab.mig(0, &["move", "comer", &dest]));
        std::thread::sleep(std::time::Duration::from_millis(1500));
        let run = lab.mig(
            1,
            &[
                "run", "-d", "--name", "comer", "busybox", "--", "sleep", "600",
            ],
        );
        (mv.join(), run)
    });
    lab.fault(1, None)?;
    let mv = mv.map_err(|_| anyhow::anyhow!("the mover panicked"))?;
    eprintln!(
        "move: {} {}\nrun: {} {} {}",
        mv.code, mv.stderr, run.code, run.stdout, run.stderr
    );
    if run.code == 0 {
        let _ = lab.mig(1, &["rm", "-f", run.stdout.trim()]);
        bail!("mig run took the name of the arriving container");
    }
    assert!(
        run.stderr.contains("is arriving here from another host"),
        "{}",
        run.stderr
    );
    assert_eq!(mv.code, 0, "{}", mv.stderr);
    running_on(&lab, 1, "comer")?;
    let ps = lab.mig_ok(1, &["ps", "-a"])?;
    let named = ps
        .lines()
        .filter(|l| l.split_whitespace().any(|w| w == "comer"))
        .count();
    assert_eq!(named, 1, "{ps}");
    let _ = lab.mig(1, &["rm", "-f", &id]);
    Ok(())
}

/// A `mig exec` still running when its container moves is killed with the source's copy (exit
/// 137, as before), and says why on its last line.
#[test]
fn an_exec_the_move_ends_says_so() -> Result<()> {
    if !mig_tests::is_root("migration tests") {
        return Ok(());
    }
    let lab = Lab::up("execmv", 179)?;
    let id = lab.run_container(0, "busy", 2)?;
    let dest = lab.hosts[1].name.clone();
    let (exec, mv) = std::thread::scope(|s| {
        let exec = s.spawn(|| lab.mig(0, &["exec", "busy", "--", "sleep", "600"]));
        let started = mig_tests::wait_until(std::time::Duration::from_secs(20), || {
            lab.mig(0, &["exec", "busy", "--", "ps"])
                .stdout
                .contains("sleep 600")
        });
        let mv = started.then(|| lab.mig(0, &["move", "busy", &dest]));
        (exec.join(), mv)
    });
    let exec = exec.map_err(|_| anyhow::anyhow!("the exec thread panicked"))?;
    let mv = mv.context("the exec never started")?;
    eprintln!(
        "move: {} {}\nexec: {} {}",
        mv.code, mv.stderr, exec.code, exec.stderr
    );
    assert_eq!(mv.code, 0, "{}", mv.stderr);
    assert_eq!(exec.code, 137, "{}", exec.stderr);
    assert!(
        exec.stderr
            .contains(&format!("busy moved to {dest} while the command ran")),
        "{}",
        exec.stderr
    );
    running_on(&lab, 1, "busy")?;
    // A command killed inside a container that stays says nothing more.
    let o = lab.mig(1, &["exec", "busy", "--", "sh", "-c", "kill -9 $$"]);
    assert_eq!(o.code, 137, "{}", o.stderr);
    assert!(!o.stderr.contains("while the command ran"), "{}", o.stderr);
    let _ = lab.mig(1, &["rm", "-f", &id]);
    Ok(())
}

/// CPU masks set inside the container (`taskset`) survive a move and a checkpoint and restore
/// (CRIU keeps none: the narrowed masks travel in the image set); unpinned processes stay so.
#[test]
fn pinned_processes_stay_pinned_across_a_move() -> Result<()> {
    if !mig_tests::is_root("migration tests") {
        return Ok(());
    }
    if mig_runtime::affinity::online_cpus().len() < 2 {
        eprintln!("skipped: one CPU online, nothing to pin");
        return Ok(());
    }
    let lab = Lab::up("pin", 180)?;
    let id = lab.mig_ok(
        0,
        &[
            "run",
            "-d",
            "--name",
            "pinned",
            "busybox",
            "--",
            "sh",
            "-c",
            "sleep 1000 & echo $! > /bg; taskset -p 1 $$ >/dev/null; echo ready; \
             while :; do sleep 1; done",
        ],
    )?;
    let id = id.trim().to_string();
    assert!(
        mig_tests::wait_until(std::time::Duration::from_secs(30), || {
            lab.mig(0, &["logs", "pinned"]).stdout.contains("ready")
        }),
        "the container never got ready"
    );
    // The init (ns pid 1) pinned to CPU 0; the sleep started before keeps every CPU.
    let masks = |host: usize| -> Result<String> {
        lab.mig_ok(
            host,
            &[
                "exec",
                "pinned",
                "--",
                "sh",
                "-c",
                "taskset -p 1; taskset -p $(cat /bg)",
            ],
        )
    };
    let before = masks(0)?;
    assert!(
        before.contains("pid 1's current affinity mask: 1\n"),
        "{before}"
    );
    assert!(
        !before.lines().nth(1).unwrap_or(": 1").ends_with(": 1"),
        "{before}"
    );
    lab.mig_ok(0, &["move", "pinned", "host-b"])?;
    let after = masks(1)?;
    assert_eq!(after.lines().next(), before.lines().next(), "{after}");
    assert!(
        !after.lines().nth(1).unwrap_or("").ends_with(": 1"),
        "{after}"
    );
    lab.mig_ok(1, &["checkpoint", "pinned"])?;
    lab.mig_ok(1, &["restore", "pinned"])?;
    let restored = masks(1)?;
    assert_eq!(restored.lines().next(), before.lines().next(), "{restored}");
    let _ = lab.mig(1, &["rm", "-f", &id]);
    Ok(())
}

/// `mig stop` waits for a container that ignores SIGTERM; a move started meanwhile is refused
/// (it would carry off a container its user is stopping), and the stop ends it here.
#[test]
fn a_move_is_refused_while_the_container_is_being_stopped() -> Result<()> {
    if !mig_tests::is_root("migration tests") {
        return Ok(());
    }
    let lab = Lab::up("stopmv", 177)?;
    lab.mig_ok(
        0,
        &[
            "run",
            "-d",
            "--name",
            "stubborn",
            "busybox",
            "--",
            "sh",
            "-c",
            "trap '' TERM; while :; do sleep 1; done",
        ],
    )?;
    let (stop, mv) = std::thread::scope(|s| {
        let stop = s.spawn(|| lab.mig(0, &["stop", "-t", "4", "stubborn"]));
        std::thread::sleep(std::time::Duration::from_millis(1000));
        let mv = lab.mig(0, &["move", "stubborn", "host-b"]);
        (stop.join(), mv)
    });
    let stop = stop.map_err(|_| anyhow::anyhow!("the stop's thread panicked"))?;
    eprintln!(
        "stop: {} {}\nmove: {} {}",
        stop.code, stop.stderr, mv.code, mv.stderr
    );
    if mv.code == 0 || !mv.stderr.contains("being stopped") {
        bail!(
            "a move during mig stop was not refused: {} {}",
            mv.code,
            mv.stderr
        );
    }
    if stop.code != 0 {
        bail!("the stop failed: {}", stop.stderr);
    }
    let v = lab.mig_json(0, &["inspect", "stubborn", "--json"])?;
    if v["state"] == "running" {
        bail!("stubborn still runs after mig stop: {v}");
    }
    if lab.mig(1, &["inspect", "stubborn"]).code == 0 {
        bail!("stubborn arrived on host-b");
    }
    let _ = lab.mig(0, &["rm", "-f", "stubborn"]);
    Ok(())
}

/// No moment of a move has both hosts list the container `running` (QA session 18: for 80 to
/// 300 ms after the commit the source listed the copy it was ending as `running`, and during
/// CRIU's dump it flipped from `frozen` to `running` for about 190 ms). Host-a is sampled before
/// host-b each time: a sample is a few ms, a move's freeze to commit over 100 ms.
#[test]
fn a_container_is_listed_running_on_one_host_at_a_time() -> Result<()> {
    if !mig_tests::is_root("migration tests") {
        return Ok(());
    }
    let lab = Lab::up("once", 181)?;
    let id = lab.run_container(0, "once", 8)?;
    let state = |host: usize| -> Option<String> {
        let v = lab.mig_json(host, &["ps", "-a", "--json"]).ok()?;
        v.as_array()?
            .iter()
            .find(|c| c["id"] == id.as_str())
            .and_then(|c| c["state"].as_str().map(str::to_owned))
    };
    for (from, to) in [(0, 1), (1, 0)] {
        let peer = lab.hosts[to].name.clone();
        let samples = std::thread::scope(|s| -> Result<Vec<(Option<String>, Option<String>)>> {
            let mover = s.spawn(|| lab.mig(from, &["move", "once", &peer]));
            let mut samples = Vec::new();
            while !mover.is_finished() {
                let a = state(0);
                let b = state(1);
                samples.push((a, b));
            }
            // A few more after the move returned: the copy is ended after the commit.
            for _ in 0..20 {
                samples.push((state(0), state(1)));
            }
            let o = mover
                .join()
                .map_err(|_| anyhow::anyhow!("mover panicked"))?;
            anyhow::ensure!(o.code == 0, "{o:?}");
            Ok(samples)
        })?;
        let both = samples
            .iter()
            .filter(|(a, b)| a.as_deref() == Some("running") && b.as_deref() == Some("running"))
            .count();
        anyhow::ensure!(
            both == 0,
            "{both} of {} samples had it running on both hosts: {samples:?}",
            samples.len()
        );
        running_on(&lab, to, "once")?;
    }
    Ok(())
}

/// Sets extended attribute `name` of `path` (not following a symlink).
fn set_xattr(path: &std::path::Path, name: &str, value: &[u8]) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let p = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let n = std::ffi::CString::new(name)?;
    // SAFETY: NUL-terminated strings and a slice that live across the call.
    let r = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    anyhow::ensure!(
        r == 0,
        "setxattr {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// The value of extended attribute `name` of `path`, if it has one (up to 4 KiB).
fn get_xattr(path: &std::path::Path, name: &str) -> Option<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    let p = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let n = std::ffi::CString::new(name).ok()?;
    let mut buf = vec![0u8; 4096];
    // SAFETY: NUL-terminated strings; the kernel writes at most `buf.len()` bytes.
    let r = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    buf.truncate(usize::try_from(r).ok()?);
    Some(buf)
}

/// A container with 50,000 small files in its writable layer moves to host-b and, as soon as
/// host-b lists it running (host-a still removing its old copy), straight back: host-a answers,
/// and takes it once its old copy is gone or refuses saying that copy is still being removed.
/// Before (QA of session 32, F1) host-a removed the files on its runtime's threads and answered
/// nothing meanwhile: the move back failed with "cannot reach host-a: timed out", "the link to
/// the destination was lost", or "exited here; `mig rm` removes that record", which `mig rm`
/// there answered with "no such container".
#[test]
fn a_move_straight_back_while_the_old_copy_is_removed_is_answered() -> Result<()> {
    if !mig_tests::is_root("migration tests") {
        return Ok(());
    }
    let lab = Lab::up("back", 197)?;
    let id = lab.run_container(0, "many", 1)?;
    // Written from the host into the writable layer (the container's shell takes minutes).
    let upper = lab.state_dir(0).join("containers").join(&id).join("upper");
    for d in 0..200 {
        let dir = upper.join(format!("m/d{d}"));
        std::fs::create_dir_all(&dir)?;
        for f in 0..250 {
            std::fs::write(dir.join(format!("f{f}")), format!("{d}-{f}\n"))?;
        }
    }
    let state = |host| {
        lab.mig_json(host, &["inspect", "many", "--json"])
            .map(|v| v["state"].as_str().unwrap_or_default().to_owned())
            .unwrap_or_default()
    };
    let (first, back) = std::thread::scope(|s| {
        let mover = s.spawn(|| lab.mig(0, &["move", "many", "host-b"]));
        let seen = mig_tests::wait_until(Duration::from_secs(180), || state(1) == "running");
        let back = seen.then(|| lab.mig(1, &["move", "many", "host-a"]));
        (mover.join(), back)
    });
    let first = first.map_err(|_| anyhow::anyhow!("the mover panicked"))?;
    anyhow::ensure!(first.code == 0, "{first:?}");
    let back = back.context("host-b never listed the container running")?;
    eprintln!(
        "move back: exit {}: {}{}",
        back.code,
        back.stdout.trim(),
        back.stderr.trim()
    );
    let here = if back.code == 0 {
        0
    } else {
        anyhow::ensure!(
            back.stderr
                .contains("still ending after its move away committed"),
            "the move back failed for another reason: {back:?}"
        );
        1
    };
    running_on(&lab, here, "many")?;
    continues(&lab, here, "many", 0)?;
    let files = lab.mig_ok(here, &["exec", "many", "--", "ls", "/m/d199"])?;
    anyhow::ensure!(files.lines().count() == 250, "{files}");
    nothing_left(&lab, 1 - here, &id)
}

/// An image recorded under two names goes to the destination under the name the container was
/// made from, which `mig run` there then knows (QA of session 32, F4: it went as the other name,
/// and `mig run <the name inspect showed>` there said "no such image").
#[test]
fn a_moved_container_brings_its_image_under_the_name_it_was_made_from() -> Result<()> {
    if !mig_tests::is_root("migration tests") {
        return Ok(());
    }
    let lab = Lab::up("imgname", 198)?;
    let tar = lab.image_tar.display().to_string();
    // "busybox" (from Lab::up) sorts first; the container uses the second name.
    lab.mig_ok(0, &["image", "import", &tar, "--name", "zz-second"])?;
    let id = lab
        .mig_ok(
            0,
            &[
                "run",
                "-d",
                "--name",
                "named",
                "zz-second",
                "--",
                "sleep",
                "1000",
            ],
        )?
        .trim()
        .to_owned();
    lab.mig_ok(0, &["move", "named", "host-b", "--mode", "cold"])?;
    running_on(&lab, 1, "named")?;
    let images = lab.mig_ok(1, &["image", "ls"])?;
    anyhow::ensure!(images.contains("zz-second"), "host-b's images: {images}");
    let other = lab.mig_ok(
        1,
        &[
            "run",
            "-d",
            "--name",
            "again",
            "zz-second",
            "--",
            "sleep",
            "1000",
        ],
    )?;
    let _ = lab.mig(1, &["rm", "-f", other.trim()]);
    let _ = lab.mig(1, &["rm", "-f", &id]);
    Ok(())
}
