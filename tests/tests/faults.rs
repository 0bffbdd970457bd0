//! Faults at every phase of a live move, on both sides, in a real two-host lab (real `migd`s, real
//! CRIU, QUIC between network namespaces). Each case arms one fault (docs/reliability.md lists
//! them) through `<state-dir>/mig-fault`, moves the test container from host-a to host-b, lets a
//! crashed agent restart, and then checks: exactly one running copy, on the expected host, its
//! memory intact and its counter going on; nothing of it left on the other host; and no leaked
//! descriptors, mounts, cgroups, network namespaces, processes or temporary files on either host
//! (compared with what they held before the case). A case that ends on host-b moves the container
//! back (a checked move) before the leak check, so every case starts from the same place.
//!
//! Tables share one lab each to save time; labs use subnets among 10.214.20-41.0/24 and
//! 10.214.175-194.0/24. Needs root.
//! The soak (`soak_back_and_forth`, ignored) moves one container back and forth and three at once.

use anyhow::{bail, ensure, Context, Result};
use mig_tests::lab::{
    continues, lazy_daemons_under, leaks, log_state, move_and_check, no_leaks, nothing_left,
    running_on, usage, DiskLab, Events, Lab, Usage,
};
use std::time::{Duration, Instant};

const A: usize = 0;
const B: usize = 1;

/// Something the test does while the move runs.
#[derive(Debug, Clone, Copy)]
enum During {
    Nothing,
    /// Takes the host's link down once the destination has the presync files (the source is
    /// held by an armed delay), and up again after the move returned.
    LinkDown(usize),
    /// SIGKILLs the host's agent from outside at the same moment.
    KillAgent(usize),
    /// SIGKILLs the shim of the destination's restored copy while the source is held before
    /// its Commit.
    KillDestShim,
}

struct Case {
    /// Faults armed, per host.
    arm: Vec<(usize, &'static str)>,
    during: During,
    /// Agents to start again after the move (they crashed).
    restart: Vec<usize>,
    /// Where the container runs afterwards.
    expect: usize,
    /// A host whose copy is in doubt after the move returned (before any restart): `mig ps`
    /// there must say so.
    in_doubt: Option<usize>,
    /// What the docs' table calls it.
    label: &'static str,
}

/// A case arming the one fault `point:fault` on `host` (its label too): a `kill` crashes that
/// agent, which is restarted after the move; the container ends on `expect`.
fn on(host: usize, fault: &'static str, expect: usize) -> Case {
    Case {
        arm: vec![(host, fault)],
        during: During::Nothing,
        restart: if fault.ends_with(":kill") {
            vec![host]
        } else {
            Vec::new()
        },
        expect,
        in_doubt: None,
        label: fault,
    }
}

/// Like [`on`], and the copy on `doubt` is in doubt until the crashed agent is back.
fn on_in_doubt(host: usize, fault: &'static str, expect: usize, doubt: usize) -> Case {
    Case {
        in_doubt: Some(doubt),
        ..on(host, fault, expect)
    }
}

/// A case that holds the source in an armed delay while the test acts on `during`.
fn held(label: &'static str, delay: &'static str, during: During) -> Case {
    Case {
        during,
        label,
        ..on(A, delay, A)
    }
}

/// While a move is in doubt, `mig ps` and `mig inspect` on `host` show the container's copy as
/// frozen and in doubt (not "running"; `state: "frozen"` in `--json`), with the migration id and
/// this host's role in `in_doubt`. `said` is what
/// `mig move` printed (it names the id when the source reported the doubt).
fn check_in_doubt(lab: &Lab, host: usize, name: &str, said: &str) -> Result<()> {
    let mut last = serde_json::Value::Null;
    let seen = mig_tests::wait_until(Duration::from_secs(30), || {
        let Ok(v) = lab.mig_json(host, &["ps", "-a", "--json"]) else {
            return false;
        };
        let c = v
            .as_array()
            .and_then(|l| l.iter().find(|c| c["name"] == name))
            .cloned()
            .unwrap_or_default();
        last = c;
        last["in_doubt"]["migration_id"].is_string()
    });
    if !seen {
        bail!("{name} on {} not shown in doubt: {last}", host_name(host));
    }
    let d = &last["in_doubt"];
    let id = d["migration_id"].as_str().unwrap_or_default();
    let role = if host == A { "source" } else { "destination" };
    if id.len() != 32 || d["role"] != role || d["peer"] != host_name(1 - host) {
        bail!("{name} on {}: in_doubt {d}", host_name(host));
    }
    if said.contains("is in doubt") && !said.contains(id) {
        bail!("`mig move` said {said:?}, ps names migration {id}");
    }
    if last["state"] != "frozen" {
        bail!("{name} on {}: ps --json state {last}", host_name(host));
    }
    // `mig inspect` tells the same, in JSON and in text.
    let d = lab.mig_json(host, &["inspect", name, "--json"])?;
    if d["state"] != "frozen" || d["in_doubt"] != last["in_doubt"] {
        bail!("{name} on {}: inspect --json {d}", host_name(host));
    }
    let text = lab.mig_ok(host, &["inspect", name])?;
    let want = format!("in doubt:  migration {id}, this host is its {role}");
    if !text.contains("state:     frozen (migration in doubt)") || !text.contains(&want) {
        bail!("{name} on {}: inspect says\n{text}", host_name(host));
    }
    let table = lab.mig_ok(host, &["ps"])?;
    if !table
        .lines()
        .any(|l| l.contains(name) && l.contains("frozen (migration in doubt)"))
    {
        bail!(
            "mig ps on {} does not show the doubt:\n{table}",
            host_name(host)
        );
    }
    // Refused operations say why, and how it ends (QA of session 25: "try again once it ended",
    // which a move in doubt does not do by itself).
    let stop = lab.mig(host, &["stop", name]);
    if stop.code == 0 || !stop.stderr.contains("is in doubt") || !stop.stderr.contains("--resolve")
    {
        bail!("mig stop on {}: {stop:?}", host_name(host));
    }
    eprintln!("in doubt on {}: migration {id}", host_name(host));
    Ok(())
}

/// One table row of the results.
struct Row {
    label: &'static str,
    exit: i32,
    ended_on: &'static str,
    settled_ms: u128,
    message: String,
}

fn host_name(h: usize) -> &'static str {
    ["host-a", "host-b", "host-c"][h]
}

fn run_case(lab: &mut Lab, c: &Case, name: &str, id: &str, base: &mut [Usage]) -> Result<Row> {
    eprintln!("--- case {}", c.label);
    let (count, bad) = log_state(&lab.mig(A, &["logs", name]).stdout);
    if bad {
        bail!("the container is already BAD before {}", c.label);
    }
    for (h, f) in &c.arm {
        lab.fault(*h, Some(f))?;
    }
    let t0 = Instant::now();
    let out = std::thread::scope(|s| -> Result<mig_tests::MigOutput> {
        let l: &Lab = lab;
        let mover = s.spawn(move || l.mig(A, &["move", name, "host-b", "--json"]));
        match c.during {
            During::Nothing => {}
            During::LinkDown(h) | During::KillAgent(h) => {
                // The destination has the presync files; the source now sits in its delay.
                let staging = l.state_dir(B).join("migrations");
                mig_tests::wait_until(Duration::from_secs(20), || {
                    std::fs::read_dir(&staging)
                        .into_iter()
                        .flatten()
                        .flatten()
                        .any(|e| e.path().join("presync").exists())
                });
                std::thread::sleep(Duration::from_millis(300));
                if let During::LinkDown(_) = c.during {
                    l.link(h, false)?;
                } else {
                    l.kill_agent(h)?;
                }
            }
            During::KillDestShim => kill_dest_shim(l, id, Duration::from_secs(30))?,
        }
        mover
            .join()
            .map_err(|_| anyhow::anyhow!("the mover thread panicked"))
    })?;
    if let During::LinkDown(h) = c.during {
        lab.link(h, true)?;
    }
    for (h, _) in &c.arm {
        lab.fault(*h, None)?;
    }
    let message = if out.code == 0 {
        "moved".to_string()
    } else {
        out.stderr.trim().to_string()
    };
    eprintln!("move exit {}: {message}", out.code);
    // A destination that went away while the source was frozen is named as the cause (QA: the
    // error blamed the dump and quoted CRIU's page server).
    if matches!(c.during, During::KillAgent(B) | During::LinkDown(_)) {
        ensure!(
            message.contains("was lost during it") || message.contains("link lost"),
            "{}: the error does not say the destination was lost: {message}",
            c.label
        );
    }
    // A copy lost before the Commit rolls the move back (QA of session 25: it committed, and
    // the container was gone).
    if let During::KillDestShim = c.during {
        ensure!(
            out.code != 0 && message.contains("rolled back"),
            "{}: {message}",
            c.label
        );
    }
    if let Some(h) = c.in_doubt {
        check_in_doubt(lab, h, name, &message)?;
    }
    let mut restarted = c.restart.clone();
    if let During::KillAgent(h) = c.during {
        restarted.push(h);
    }
    for &h in &restarted {
        lab.restart_after_crash(h)
            .with_context(|| format!("restarting host {h}"))?;
    }
    let other = 1 - c.expect;
    let settled = mig_tests::wait_until(Duration::from_secs(90), || {
        running_on(lab, c.expect, name).is_ok()
            && lab.mig(other, &["inspect", name, "--json"]).code != 0
    });
    if !settled {
        bail!(
            "{}: not settled on {}: ps a {:?} ps b {:?}",
            c.label,
            host_name(c.expect),
            lab.mig(A, &["ps", "-a"]).stdout,
            lab.mig(B, &["ps", "-a"]).stdout
        );
    }
    let settled_ms = t0.elapsed().as_millis();
    running_on(lab, c.expect, name)?;
    continues(lab, c.expect, name, count)?;
    nothing_left(lab, other, id)?;
    if c.expect == B {
        move_and_check(lab, B, A, name, id)?;
    }
    // A restarted agent is another process: its descriptors count from now on.
    for &h in &restarted {
        let now = usage(lab, h);
        base[h].agent_pid = now.agent_pid;
        base[h].fds = now.fds;
    }
    no_leaks(lab, base).with_context(|| format!("after {}", c.label))?;
    Ok(Row {
        label: c.label,
        exit: out.code,
        ended_on: host_name(c.expect),
        settled_ms,
        message,
    })
}

/// A lab, the container on host-a, one move there and back (so lazily made state exists), the
/// baseline, then every case of `table`.
fn run_table(tag: &str, third: u8, table: &[Case]) -> Result<()> {
    if !mig_tests::is_root("fault tests") {
        return Ok(());
    }
    let mut lab = Lab::up(tag, third)?;
    let name = format!("f{tag}");
    let id = lab.run_container(A, &name, 8)?;
    move_and_check(&lab, A, B, &name, &id)?;
    move_and_check(&lab, B, A, &name, &id)?;
    let mut base: Vec<Usage> = (0..2).map(|h| usage(&lab, h)).collect();
    eprintln!("baseline: a {} | b {}", base[0], base[1]);
    let mut rows = Vec::new();
    for c in table {
        rows.push(run_case(&mut lab, c, &name, &id, &mut base)?);
    }
    eprintln!("| fault | move exit | runs on | settled after | what the move said |");
    eprintln!("|---|---|---|---|---|");
    for r in rows {
        let msg: String = r.message.chars().take(110).collect();
        eprintln!(
            "| `{}` | {} | {} | {} ms | {} |",
            r.label, r.exit, r.ended_on, r.settled_ms, msg
        );
    }
    let end: Vec<Usage> = (0..2).map(|h| usage(&lab, h)).collect();
    eprintln!("end: a {} | b {}", end[0], end[1]);
    Ok(())
}

#[test]
fn source_faults_before_the_dump() -> Result<()> {
    run_table(
        "sa",
        20,
        &[
            on(A, "source-prepare:kill", A),
            on(A, "source-prepare:fail", A),
            on(A, "source-presync:kill", A),
            on(A, "source-presync:fail", A),
            on(A, "source-presync:cut", A),
            on(A, "source-freeze:kill", A),
            on(A, "source-freeze:fail", A),
            on(A, "source-freeze:cut", A),
            on(A, "source-dump:kill", A),
            on(A, "source-dump:fail", A),
            on(A, "source-dump:criu-fail", A),
        ],
    )
}

#[test]
fn source_faults_from_the_transfer() -> Result<()> {
    run_table(
        "sb",
        21,
        &[
            on(A, "source-transfer:kill", A),
            on(A, "source-transfer:corrupt", A),
            on(A, "source-transfer:cut", A),
            on(A, "source-transfer:delay:1500", B),
            on(A, "source-restore:kill", A),
            on(A, "source-restore:fail", A),
            on(A, "source-restore:cut", A),
            on_in_doubt(A, "source-commit:kill", B, B),
            on(A, "source-commit:fail", A),
            on(A, "source-commit:cut", A),
        ],
    )
}

#[test]
fn destination_faults() -> Result<()> {
    run_table(
        "da",
        22,
        &[
            on(B, "dest-prepare:kill", A),
            on(B, "dest-prepare:fail", A),
            on(B, "dest-presync:kill", A),
            on(B, "dest-presync:fail", A),
            on(B, "dest-transfer:kill", A),
            on(B, "dest-transfer:fail", A),
            on(B, "dest-transfer:delay:1500", B),
        ],
    )
}

#[test]
fn destination_faults_at_restore_and_commit() -> Result<()> {
    run_table(
        "db",
        23,
        &[
            on(B, "dest-restore:kill", A),
            on(B, "dest-restore:fail", A),
            on(B, "dest-restore:criu-fail", A),
            on(B, "dest-restore:cut", A),
            on_in_doubt(B, "dest-commit:kill", B, A),
            on(B, "dest-commit:fail", A),
            on(B, "dest-commit:cut", A),
            on(B, "dest-commit:delay:1500", B),
            held(
                "restored copy's shim killed before the commit",
                "source-restore:delay:3000",
                During::KillDestShim,
            ),
        ],
    )
}

/// The destination cuts the link while files arrive: its cleanup must not race the file tasks
/// of the same migration (a task placing a file after the cleanup re-created the staging
/// directory `<state-dir>/migrations/<id>.in`); the driver stops placing and joins every file
/// task before cleaning up.
#[test]
fn destination_cut_while_files_arrive() -> Result<()> {
    run_table(
        "dc",
        28,
        &[on(B, "dest-presync:cut", A), on(B, "dest-transfer:cut", A)],
    )
}

/// The link goes down, and the destination agent is killed from outside, while the source is
/// frozen (held in a delay at freeze or dump): the destination has no step of its own in those
/// phases, so this is how it fails there.
#[test]
fn link_down_and_destination_crash_while_frozen() -> Result<()> {
    run_table(
        "ln",
        24,
        &[
            held(
                "link down (veth) while frozen",
                "source-freeze:delay:3000",
                During::LinkDown(B),
            ),
            held(
                "destination killed at freeze",
                "source-freeze:delay:3000",
                During::KillAgent(B),
            ),
            held(
                "destination killed at dump",
                "source-dump:delay:3000",
                During::KillAgent(B),
            ),
            held(
                "source link down at transfer",
                "source-transfer:delay:3000",
                During::LinkDown(A),
            ),
        ],
    )
}

/// host-b's containers are under a memory limit (on its agent's cgroup parent, as an operator's
/// slice would set) with less room than the container holds. Stream and lazy mode charge the
/// restored memory only after the commit, so such a move used to be reported a success and the
/// copy on host-b was OOM-killed at once (QA of session 21): now host-b refuses to restore, the
/// move rolls back and the container runs on at host-a. Without the limit the move succeeds.
#[test]
fn a_destination_without_room_for_the_memory_rolls_back() -> Result<()> {
    if !mig_tests::is_root("fault tests") {
        return Ok(());
    }
    let lab = Lab::up("oom", 30)?;
    let id = lab.run_container(A, "oom", 8)?;
    let before: Vec<Usage> = (0..2).map(|h| usage(&lab, h)).collect();
    let parent = lab.cgroup_parent(B);
    let ParentLimit {
        dir,
        limit_file,
        no_limit,
        used,
    } = parent_limit(&parent)?;
    let memory = lab.mig_json(A, &["inspect", "oom", "--json"])?["usage"]["memory_bytes"]
        .as_u64()
        .unwrap_or(0);
    assert!(memory > 16 << 20, "the container holds {memory} bytes");
    // Room for the restore itself (CRIU, the processes' first pages) but not for the memory:
    // without the check the move committed and host-b's copy was killed right after.
    std::fs::write(dir.join(limit_file), (used + memory / 2).to_string())?;
    for mode in ["stream", "lazy"] {
        let (count, _) = log_state(&lab.mig(A, &["logs", "oom"]).stdout);
        let o = lab.mig(A, &["move", "oom", "host-b", "--mode", mode]);
        eprintln!("{mode}: move exit {}: {}", o.code, o.stderr.trim());
        assert_ne!(o.code, 0, "{mode}: {}", o.stdout);
        assert!(
            o.stderr.contains("cannot hold the container's memory") && o.stderr.contains(&parent),
            "{mode}: {}",
            o.stderr
        );
        running_on(&lab, A, "oom")?;
        continues(&lab, A, "oom", count)?;
        nothing_left(&lab, B, &id)?;
    }
    no_leaks(&lab, &before)?;
    std::fs::write(dir.join(limit_file), no_limit)?;
    move_and_check(&lab, A, B, "oom", &id)?;
    Ok(())
}

/// The memory limit file of a host's cgroup parent (cgroup v1's memory mount, else cgroup2),
/// what writing no limit takes, and what the parent holds now.
struct ParentLimit {
    dir: std::path::PathBuf,
    limit_file: &'static str,
    no_limit: &'static str,
    used: u64,
}

fn parent_limit(parent: &str) -> Result<ParentLimit> {
    let (dir, limit_file, no_limit) = match std::path::Path::new("/sys/fs/cgroup/memory") {
        v1 if v1.is_dir() => (v1.join(parent), "memory.limit_in_bytes", "-1"),
        _ => (
            std::path::Path::new("/sys/fs/cgroup").join(parent),
            "memory.max",
            "max",
        ),
    };
    // Removed with the lab (`mig lab down` removes the host's cgroup parent).
    std::fs::create_dir_all(&dir)?;
    let used: u64 = ["memory.usage_in_bytes", "memory.current"]
        .iter()
        .find_map(|f| std::fs::read_to_string(dir.join(f)).ok())
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0);
    Ok(ParentLimit {
        dir,
        limit_file,
        no_limit,
        used,
    })
}

/// Two moves into one host at once, each of which fits alone but not both: the memory the first
/// was found to need is held for it until its copy is charged, so the second is refused and its
/// container keeps running at its source (QA of session 26: both "moved", and one was OOM-killed
/// a second after the commit).
#[test]
fn two_moves_that_fit_only_alone_do_not_both_arrive() -> Result<()> {
    if !mig_tests::is_root("fault tests") {
        return Ok(());
    }
    const C: usize = 2;
    let lab = Lab::up_n("oom2", 174, 3)?;
    let image = lab.image_tar.display().to_string();
    lab.mig_ok(C, &["image", "import", &image, "--name", "busybox"])?;
    // One process holding the memory (a forked copy would count again, at a moment the dump
    // cannot choose), counting.
    let hold = "d=$(head -c 48000000 /dev/urandom | base64 -w0); i=0; while :; do i=$((i+1)); echo \"tick $i OK\"; sleep 0.5; done";
    let run = |host, name| -> Result<String> {
        let id = lab.mig_ok(
            host,
            &[
                "run", "-d", "--name", name, "busybox", "--", "sh", "-c", hold,
            ],
        )?;
        Ok(id.trim().to_owned())
    };
    let ids = [run(A, "oa")?, run(C, "oc")?];
    std::thread::sleep(Duration::from_secs(2));
    let ParentLimit {
        dir,
        limit_file,
        no_limit,
        used,
    } = parent_limit(&lab.cgroup_parent(B))?;
    // What one container needs there, as the destination counts it: from its refusal with no
    // room at all.
    let tight = used + (1 << 20);
    std::fs::write(dir.join(limit_file), tight.to_string())?;
    let o = lab.mig(A, &["move", "oa", "host-b", "--mode", "stream"]);
    let mib_after = |words: &str| -> Option<u64> {
        let (_, rest) = o.stderr.split_once(words)?;
        rest.split_once(" MiB")?.0.parse().ok()
    };
    let (need_mib, left_mib) = mib_after("its image set holds ")
        .zip(mib_after(" MiB, and "))
        .with_context(|| format!("no memory refusal: {o:?}"))?;
    running_on(&lab, A, "oa")?;
    // Room for one container's memory and its forks, not for two containers, over what the
    // destination counts as held there (its words, not `used`: that holds page cache the
    // destination counts as room, and in an official CI run enough of it for both moves).
    let held = tight.saturating_sub(left_mib << 20);
    let room = (need_mib * 8 / 5) << 20;
    std::fs::write(dir.join(limit_file), (held + room).to_string())?;
    // Both restores wait here, so that each memory check runs before either copy is charged.
    lab.fault(B, Some("dest-restore:delay:4000"))?;
    let counts = [
        log_state(&lab.mig(A, &["logs", "oa"]).stdout).0,
        log_state(&lab.mig(C, &["logs", "oc"]).stdout).0,
    ];
    let (oa, oc) = std::thread::scope(|s| {
        let a = s.spawn(|| lab.mig(A, &["move", "oa", "host-b", "--mode", "stream"]));
        let c = s.spawn(|| lab.mig(C, &["move", "oc", "host-b", "--mode", "stream"]));
        (a.join(), c.join())
    });
    lab.fault(B, None)?;
    let outs = [
        oa.map_err(|_| anyhow::anyhow!("a move thread panicked"))?,
        oc.map_err(|_| anyhow::anyhow!("a move thread panicked"))?,
    ];
    for o in &outs {
        eprintln!(
            "move exit {}: {}{}",
            o.code,
            o.stdout.trim(),
            o.stderr.trim()
        );
    }
    let moved: Vec<usize> = (0..2).filter(|i| outs[*i].code == 0).collect();
    if moved.len() != 1 {
        // What host-b found for each (its agent's log, beside its socket).
        let log = lab.hosts[B].socket.with_file_name("host-b.log");
        for line in std::fs::read_to_string(log).unwrap_or_default().lines() {
            if line.contains("memory") {
                eprintln!("host-b: {line}");
            }
        }
        eprintln!(
            "{}: {:?}",
            dir.display(),
            std::fs::read_to_string(dir.join("memory.stat"))
        );
    }
    ensure!(moved.len() == 1, "not exactly one move arrived: {outs:?}");
    let (won, lost) = (moved[0], 1 - moved[0]);
    ensure!(
        outs[lost]
            .stderr
            .contains("cannot hold the container's memory")
            && outs[lost].stderr.contains("other moves arriving here hold"),
        "{:?}",
        outs[lost]
    );
    let names = ["oa", "oc"];
    let sources = [A, C];
    // The moved copy keeps running (not killed once its memory arrived), the other at home.
    std::thread::sleep(Duration::from_secs(3));
    eprintln!("{}", lab.mig(B, &["inspect", names[won]]).stdout);
    running_on(&lab, B, names[won])?;
    continues(&lab, B, names[won], counts[won])?;
    running_on(&lab, sources[lost], names[lost])?;
    continues(&lab, sources[lost], names[lost], counts[lost])?;
    nothing_left(&lab, B, &ids[lost])?;
    std::fs::write(dir.join(limit_file), no_limit)?;
    Ok(())
}

/// The agent killed during a local `mig checkpoint`, after CRIU's dump and before the image set
/// is sealed. Before session 21 a plain checkpoint's container was dead by then (CRIU killed it)
/// with no checkpoint to restore, and a `--leave-running` one stayed frozen after the restart
/// (QA). Now the dumped tree waits frozen until the seal, and the restarted agent thaws it: in
/// both cases the container runs on, intact. A checkpoint after that succeeds and restores.
#[test]
fn an_agent_killed_during_a_checkpoint_leaves_the_container_running() -> Result<()> {
    if !mig_tests::is_root("fault tests") {
        return Ok(());
    }
    let mut lab = Lab::up("ckk", 31)?;
    lab.run_container(A, "ckk", 8)?;
    for flags in [&[][..], &["--leave-running"][..]] {
        let (count, _) = log_state(&lab.mig(A, &["logs", "ckk"]).stdout);
        lab.fault(A, Some("checkpoint-dump:kill"))?;
        let o = lab.mig(A, &[&["checkpoint", "ckk"][..], flags].concat());
        lab.fault(A, None)?;
        assert_ne!(o.code, 0, "{flags:?}: the agent was to die: {}", o.stdout);
        lab.restart_after_crash(A)?;
        running_on(&lab, A, "ckk").with_context(|| format!("after {flags:?}"))?;
        continues(&lab, A, "ckk", count)?;
    }
    let (count, _) = log_state(&lab.mig(A, &["logs", "ckk"]).stdout);
    lab.mig_ok(A, &["checkpoint", "ckk"])?;
    let v = lab.mig_json(A, &["inspect", "ckk", "--json"])?;
    assert_eq!(v["state"], "checkpointed", "{v}");
    lab.mig_ok(A, &["restore", "ckk"])?;
    running_on(&lab, A, "ckk")?;
    continues(&lab, A, "ckk", count)?;
    // Killed while exporting, after the seal: the container had ended with its checkpoint whole.
    // The restarted agent records it checkpointed (QA of session 25: `exited (137)`, and
    // `mig restore` refused), and it restores.
    let (count, _) = log_state(&lab.mig(A, &["logs", "ckk"]).stdout);
    let out = tempfile::tempdir()?;
    let file = out.path().join("ckk.tar");
    lab.fault(A, Some("checkpoint-export:kill"))?;
    let o = lab.mig(
        A,
        &[
            "checkpoint",
            "ckk",
            "--export",
            file.to_str().unwrap_or_default(),
        ],
    );
    lab.fault(A, None)?;
    assert_ne!(o.code, 0, "the agent was to die: {}", o.stdout);
    lab.restart_after_crash(A)?;
    let v = lab.mig_json(A, &["inspect", "ckk", "--json"])?;
    assert_eq!(v["state"], "checkpointed", "{v}");
    lab.mig_ok(A, &["restore", "ckk"])?;
    running_on(&lab, A, "ckk")?;
    continues(&lab, A, "ckk", count)?;
    Ok(())
}

/// An operator settles in-doubt moves whose other host cannot answer (`mig move --resolve
/// --decide`). Each time host-a has sent its Commit and host-b dies before it could record it
/// (killed while host-a waits in a delay after journaling `CommitSent`). First host-b stays down:
/// on host-a `--decide rolled-back` thaws the container, and host-b, started again, hears of it
/// and removes its copy. Then host-a dies too and host-b comes back alone: `--resolve` there says
/// how to decide, `--decide committed` runs the copy, and host-a, started again, learns it from
/// host-b and removes its own. Exactly one copy at the end of each. (Before session 22 only the
/// source could resolve, and only with its destination's answer.)
#[test]
fn an_operator_settles_a_move_whose_peer_is_gone() -> Result<()> {
    if !mig_tests::is_root("fault tests") {
        return Ok(());
    }
    let mut lab = Lab::up("opd", 36)?;
    let id = lab.run_container(A, "opd", 8)?;
    let (count, _) = log_state(&lab.mig(A, &["logs", "opd"]).stdout);

    in_doubt_without_b(&lab, "opd")?;
    let o = lab.mig(A, &["move", "--resolve", "opd", "--decide", "rolled-back"]);
    eprintln!("decided on host-a: {}", o.stderr.trim());
    ensure!(
        o.stderr.contains("decided by the operator") && o.stderr.contains("runs here"),
        "{o:?}"
    );
    running_on(&lab, A, "opd")?;
    let count = continues(&lab, A, "opd", count)?;
    lab.restart_after_crash(B)?;
    let gone = mig_tests::wait_until(Duration::from_secs(60), || {
        !lab.mig(B, &["ps", "-a"]).stdout.contains("opd")
    });
    ensure!(
        gone,
        "host-b kept its copy: {}",
        lab.mig(B, &["ps", "-a"]).stdout
    );
    nothing_left(&lab, B, &id)?;

    in_doubt_without_b(&lab, "opd")?;
    lab.kill_agent(A)?;
    lab.restart_after_crash(B)?;
    // Asked without --decide, the destination says how.
    let o = lab.mig(B, &["move", "--resolve", "opd"]);
    ensure!(o.stderr.contains("--decide"), "{o:?}");
    let said = lab.mig_ok(B, &["move", "--resolve", "opd", "--decide", "committed"])?;
    ensure!(said.contains("runs on host-b"), "{said}");
    running_on(&lab, B, "opd")?;
    continues(&lab, B, "opd", count)?;
    // A normal container afterwards: its memory all there (no "memory arriving" for good, QA),
    // its page images removed.
    let settled = mig_tests::wait_until(Duration::from_secs(30), || {
        lab.mig_json(B, &["inspect", "opd", "--json"])
            .is_ok_and(|v| v["memory_arriving"] == false)
    });
    ensure!(settled, "{}", lab.mig(B, &["inspect", "opd"]).stdout);
    mig_tests::lab::pages_spent(&lab, B, &id)?;
    lab.restart_after_crash(A)?;
    nothing_left(&lab, A, &id)?;
    running_on(&lab, B, "opd")?;
    Ok(())
}

/// The source dies after the destination restored its copy and before any Commit; the
/// destination's operator, told host-a may be gone for good, decides the move committed there.
/// When host-a comes back it asks host-b before thawing its own frozen copy, hears that the
/// container runs there, and removes its copy (QA of session 26: it thawed it, and the container
/// ran on both hosts).
#[test]
fn a_source_back_after_a_committed_decision_removes_its_copy() -> Result<()> {
    if !mig_tests::is_root("fault tests") {
        return Ok(());
    }
    let mut lab = Lab::up("opdc", 175)?;
    let id = lab.run_container(A, "opc", 8)?;
    let (count, _) = log_state(&lab.mig(A, &["logs", "opc"]).stdout);
    // host-a waits after host-b's Restored, before it decides.
    lab.fault(A, Some("source-restore:delay:8000"))?;
    let o = move_killing_at(&lab, "opc", B, "Restored", A)?;
    lab.fault(A, None)?;
    ensure!(o.code != 0, "host-a was to die mid-move: {o:?}");
    let said = lab.mig_ok(B, &["move", "--resolve", "opc", "--decide", "committed"])?;
    ensure!(said.contains("runs on host-b"), "{said}");
    running_on(&lab, B, "opc")?;
    lab.restart_after_crash(A)?;
    nothing_left(&lab, A, &id)?;
    running_on(&lab, B, "opc")?;
    continues(&lab, B, "opc", count)?;
    Ok(())
}

/// As `a_source_back_after_a_committed_decision_removes_its_copy`, but the copy that host-b's
/// committed decision ran is removed there before host-a comes back: host-a hears from host-b's
/// record of the move that it committed, and removes its own copy instead of running the
/// container again. Before session 29 host-a asked only whether host-b held the container live
/// (review of session 27, L1), heard no, and thawed its copy: the removed container ran again.
#[test]
fn a_source_back_after_its_container_ended_on_the_destination_does_not_run_it() -> Result<()> {
    if !mig_tests::is_root("fault tests") {
        return Ok(());
    }
    let mut lab = Lab::up("opdx", 182)?;
    let id = lab.run_container(A, "opx", 8)?;
    lab.fault(A, Some("source-restore:delay:8000"))?;
    let o = move_killing_at(&lab, "opx", B, "Restored", A)?;
    lab.fault(A, None)?;
    ensure!(o.code != 0, "host-a was to die mid-move: {o:?}");
    let said = lab.mig_ok(B, &["move", "--resolve", "opx", "--decide", "committed"])?;
    ensure!(said.contains("runs on host-b"), "{said}");
    running_on(&lab, B, "opx")?;
    lab.mig_ok(B, &["rm", "-f", "opx"])?;
    lab.restart_after_crash(A)?;
    nothing_left(&lab, A, &id)?;
    nothing_left(&lab, B, &id)?;
    Ok(())
}

/// host-a dies after host-b restored its copy, and that copy's supervisor is killed while it
/// waits, frozen, in doubt: it never ran. host-b's operator decides `committed`, which cannot
/// run a dead copy: the move is rolled back on host-b instead, and host-a, back, runs its own
/// copy. Before session 29's second review host-b's journal kept `Committed` after the failed
/// resume, and once the dead copy was gone host-a heard "committed" and removed the only copy.
#[test]
fn a_committed_decision_on_a_dead_copy_rolls_the_move_back() -> Result<()> {
    if !mig_tests::is_root("fault tests") {
        return Ok(());
    }
    let mut lab = Lab::up("dcopy", 183)?;
    let id = lab.run_container(A, "dcg", 8)?;
    let (count, _) = log_state(&lab.mig(A, &["logs", "dcg"]).stdout);
    lab.fault(A, Some("source-restore:delay:8000"))?;
    let o = move_killing_at(&lab, "dcg", B, "Restored", A)?;
    lab.fault(A, None)?;
    ensure!(o.code != 0, "host-a was to die mid-move: {o:?}");
    kill_dest_shim(&lab, &id, Duration::ZERO)?;
    let o = lab.mig(B, &["move", "--resolve", "dcg", "--decide", "committed"]);
    ensure!(
        o.code != 0 && o.stderr.contains("is gone") && o.stderr.contains("rolled back here"),
        "{o:?}"
    );
    lab.restart_after_crash(A)?;
    running_on(&lab, A, "dcg")?;
    continues(&lab, A, "dcg", count)?;
    nothing_left(&lab, B, &id)?;
    Ok(())
}

/// A post-copy whose source dies before its Commit: host-b's copy has most of its memory on
/// host-a, so `--decide committed` there is refused, and `--resolve` says only host-a can
/// settle it; host-a, back, runs its copy. Before (QA of session 29, HIGH 1) the decision
/// "ran" the copy, which was killed at once for its missing pages, and host-a, back, took the
/// move for committed and removed the only copy with the memory. Then host-b's agent restarts
/// after its guard ended the lazy-pages daemon: the copy, which never ran and cannot get its
/// memory any more, is killed, and the decision is still refused (review 3 of session 29, H1:
/// the restart set the daemon's marker aside, and the decision ran the copy on zero pages).
#[test]
fn a_post_copy_whose_source_died_is_not_committed_on_its_destination() -> Result<()> {
    if !mig_tests::is_root("fault tests") {
        return Ok(());
    }
    let mut lab = Lab::up("pcdec", 184)?;
    let id = lab.run_container(A, "pcd", 8)?;
    let (count, _) = log_state(&lab.mig(A, &["logs", "pcd"]).stdout);
    lab.fault(A, Some("source-restore:kill"))?;
    let o = lab.mig(A, &["move", "pcd", "host-b", "--mode", "lazy"]);
    ensure!(o.code != 0, "host-a was to die mid-move: {o:?}");
    lab.fault(A, None)?;
    let hint = lab.mig(B, &["move", "--resolve", "pcd"]);
    ensure!(
        hint.code != 0 && hint.stderr.contains("by post-copy"),
        "{hint:?}"
    );
    let o = lab.mig(B, &["move", "--resolve", "pcd", "--decide", "committed"]);
    ensure!(
        o.code != 0 && o.stderr.contains("cannot run without it"),
        "{o:?}"
    );
    let ended = mig_tests::wait_until(Duration::from_secs(60), || {
        lazy_daemons_under(lab.state_dir(B)).is_empty()
    });
    ensure!(ended, "host-b's guard never ended the lazy-pages daemon");
    lab.restart(B)?;
    let cgroup = format!("{}/{id}", lab.cgroup_parent(B));
    let killed = mig_tests::wait_until(Duration::from_secs(30), || {
        mig_runtime::cgroup::Cgroup::open(&cgroup)
            .and_then(|cg| cg.procs())
            .map_or(true, |p| p.is_empty())
    });
    ensure!(killed, "host-b's copy still runs after the restart");
    let o = lab.mig(B, &["move", "--resolve", "pcd", "--decide", "committed"]);
    ensure!(
        o.code != 0 && o.stderr.contains("cannot run without it"),
        "{o:?}"
    );
    lab.restart_after_crash(A)?;
    running_on(&lab, A, "pcd")?;
    continues(&lab, A, "pcd", count)?;
    nothing_left(&lab, B, &id)?;
    Ok(())
}

/// A post-copy whose source dies right after journaling `CommitSent`, before its Commit reached
/// host-b: host-b's copy waits in doubt with most of its memory on host-a, and its lazy-pages
/// daemon is ended once host-a's pages stop. host-a, back, asks host-b to resume it (a
/// `Resolve` saying `CommitSent`), which a copy whose memory can no longer arrive refuses:
/// host-b rolls the move back and host-a runs its own copy, its memory intact. Before, host-b
/// resumed the copy, which then died for its missing pages (or ran on zero pages), and host-a
/// removed its own: the container was lost.
#[test]
fn a_post_copy_in_doubt_is_rolled_back_when_its_source_comes_back() -> Result<()> {
    post_copy_cut_runs_on_the_source("pcsent", 187, A, "source-commit:kill")
}

/// A post-copy whose destination's agent dies right after journaling `Committed`, before it
/// resumed its copy: back, host-b kills that copy, which cannot get its memory any more, and
/// answers host-a's question (`Resolve`, `CommitSent`) with `RolledBack`: host-a runs its own
/// copy. Before (session 30) the restarted agent resumed the dying copy before its supervisor
/// noticed the kill and answered `Committed`, and host-a removed its copy: the container was lost.
#[test]
fn a_post_copy_whose_destination_died_at_commit_runs_on_its_source() -> Result<()> {
    post_copy_cut_runs_on_the_source("pcdcom", 188, B, "dest-commit:kill")
}

/// The link goes down just after host-b journals `Committed` for a lazy move, and host-b resumes
/// its copy 3 s later (a delay) over the dead link: host-a never hears `Committed` and is in
/// doubt, and host-b's copy, whose memory cannot arrive, is stopped and killed once host-b finds
/// the link gone. When the link is back, host-a asks, hears that the move rolled back, and runs
/// its own frozen copy, its memory intact. Before (QA of session 30, F1) host-b answered
/// `Committed` for its dead copy, and host-a removed the only one left: the container was lost.
#[test]
fn a_post_copy_cut_after_its_destination_resumed_runs_on_its_source() -> Result<()> {
    if !mig_tests::is_root("fault tests") {
        return Ok(());
    }
    let lab = Lab::up("pcres", 191)?;
    // About 100 MB of random data in each of two shells, sent to host-b at 200 Mbit/s: most of
    // it is still on host-a when the link goes (CRIU's lazy-pages daemon fetches the pages in
    // the background from the restore on; 8 MB had all arrived by then, and the copy ran).
    let id = lab.run_container(A, "pcr", 100)?;
    let (count, _) = log_state(&lab.mig(A, &["logs", "pcr"]).stdout);
    lab.throttle_to(B, "200mbit")?;
    lab.fault(B, Some("dest-commit:delay:3000"))?;
    let (o, cut) = std::thread::scope(|s| {
        let mover = s.spawn(|| lab.mig(A, &["move", "pcr", "host-b", "--mode", "lazy"]));
        let committed = mig_tests::wait_until(Duration::from_secs(60), || {
            lab.journaled(B, "Committed") || mover.is_finished()
        });
        let cut = committed && !mover.is_finished() && lab.link(B, false).is_ok();
        (mover.join(), cut)
    });
    let o = o.map_err(|_| anyhow::anyhow!("the move's thread panicked"))?;
    lab.fault(B, None)?;
    let result = (|| -> Result<()> {
        ensure!(cut, "the move ended before its link could be cut: {o:?}");
        ensure!(o.code != 0 && o.stderr.contains("in doubt"), "{o:?}");
        // host-b stops its copy by itself (its memory cannot arrive), with the link still down.
        let stopped = mig_tests::wait_until(Duration::from_secs(60), || {
            lab.mig_json(B, &["inspect", "pcr", "--json"])
                .is_ok_and(|v| {
                    v["reason"]
                        .as_str()
                        .is_some_and(|r| r.contains("post-copy failed"))
                })
        });
        ensure!(stopped, "host-b: {}", lab.mig(B, &["ps", "-a"]).stdout);
        Ok(())
    })();
    lab.link(B, true)?;
    result?;
    mig_tests::wait_until(Duration::from_secs(90), || {
        running_on(&lab, A, "pcr").is_ok()
    });
    running_on(&lab, A, "pcr")?;
    continues(&lab, A, "pcr", count)?;
    nothing_left(&lab, B, &id)
}

/// A post-copy in doubt on its source (host-b's agent died at the commit and stays down): the
/// operator's `--decide committed` on host-a is refused, since host-b's copy cannot run without
/// host-a's memory; `--decide rolled-back` runs it on host-a, and host-b, back, removes its copy.
/// Before (QA of session 30, F3) the decision exited 0, said the container ran on host-b, and
/// removed the only copy that could run.
#[test]
fn a_committed_decision_on_a_post_copy_source_is_refused() -> Result<()> {
    if !mig_tests::is_root("fault tests") {
        return Ok(());
    }
    let mut lab = Lab::up("pcsdec", 190)?;
    let id = lab.run_container(A, "psd", 8)?;
    let (count, _) = log_state(&lab.mig(A, &["logs", "psd"]).stdout);
    lab.fault(B, Some("dest-commit:kill"))?;
    let o = lab.mig(A, &["move", "psd", "host-b", "--mode", "lazy"]);
    ensure!(o.code != 0, "host-b was to die mid-move: {o:?}");
    lab.fault(B, None)?;
    // host-b cannot be asked: the answer says what to do (QA of session 30, F5).
    let o = lab.mig(A, &["move", "--resolve", "psd"]);
    ensure!(
        o.code != 0 && o.stderr.contains("--decide rolled-back"),
        "{o:?}"
    );
    let o = lab.mig(A, &["move", "--resolve", "psd", "--decide", "committed"]);
    ensure!(
        o.code != 0 && o.stderr.contains("by post-copy") && o.stderr.contains("nothing was done"),
        "{o:?}"
    );
    let events = mig_tests::lab::Events::follow(&lab, A)?;
    lab.mig(A, &["move", "--resolve", "psd", "--decide", "rolled-back"]);
    running_on(&lab, A, "psd")?;
    // The move's second `migration_done`, as an automatic resolution's (QA of session 31, L2).
    let settled = mig_tests::wait_until(Duration::from_secs(10), || {
        events
            .of_type("migration_done")
            .iter()
            .any(|e| e["outcome"] == "rolled_back")
    });
    ensure!(settled, "no rolled_back migration_done on host-a");
    continues(&lab, A, "psd", count)?;
    lab.restart_after_crash(B)?;
    let cleaned = mig_tests::wait_until(Duration::from_secs(60), || {
        nothing_left(&lab, B, &id).is_ok()
    });
    ensure!(cleaned, "host-b kept its copy");
    running_on(&lab, A, "psd")?;
    Ok(())
}

/// A post-copy in doubt on its source (host-b's agent died at the commit), whose frozen copy on
/// host-a is then killed: once host-b is back and answers that the move rolled back, host-a says
/// the container is lost (its reason, the answer), lists it ended, not `frozen`, and lets it be
/// removed. Before (QA of session 31, M2 and M3) host-a said it ran there, and kept it listed
/// `frozen` and busy (no `stop`, no `rm -f`) until its agent restarted.
#[test]
fn a_post_copy_source_copy_that_dies_in_doubt_is_reported_lost() -> Result<()> {
    if !mig_tests::is_root("fault tests") {
        return Ok(());
    }
    let mut lab = Lab::up("pcgone", 194)?;
    let id = lab.run_container(A, "pgo", 8)?;
    lab.fault(B, Some("dest-commit:kill"))?;
    let o = lab.mig(A, &["move", "pgo", "host-b", "--mode", "lazy"]);
    ensure!(o.code != 0, "host-b was to die mid-move: {o:?}");
    lab.fault(B, None)?;
    let cgroup = format!("{}/{id}", lab.cgroup_parent(A));
    mig_runtime::cgroup::Cgroup::open(&cgroup)?.kill()?;
    lab.restart_after_crash(B)?;
    let mut last = serde_json::Value::Null;
    let said = mig_tests::wait_until(Duration::from_secs(60), || {
        last = lab
            .mig_json(A, &["inspect", "pgo", "--json"])
            .unwrap_or_default();
        last["reason"].as_str().is_some_and(|r| r.contains("lost"))
    });
    ensure!(said, "host-a: {last}");
    ensure!(last["state"] == "exited", "host-a: {last}");
    lab.mig_ok(A, &["rm", "pgo"])?;
    nothing_left(&lab, A, &id)?;
    nothing_left(&lab, B, &id)
}

/// A lazy move from host-a to host-b whose agent on `host` dies at `fault`, in the commit window:
/// once that agent is back, the container runs on host-a, its memory intact, and nothing of it
/// is left on host-b.
fn post_copy_cut_runs_on_the_source(tag: &str, third: u8, host: usize, fault: &str) -> Result<()> {
    if !mig_tests::is_root("fault tests") {
        return Ok(());
    }
    let mut lab = Lab::up(tag, third)?;
    let id = lab.run_container(A, "pcut", 8)?;
    let (count, _) = log_state(&lab.mig(A, &["logs", "pcut"]).stdout);
    lab.fault(host, Some(fault))?;
    let o = lab.mig(A, &["move", "pcut", "host-b", "--mode", "lazy"]);
    ensure!(o.code != 0, "host {host} was to die mid-move: {o:?}");
    lab.fault(host, None)?;
    lab.restart_after_crash(host)?;
    mig_tests::wait_until(Duration::from_secs(90), || {
        running_on(&lab, A, "pcut").is_ok()
    });
    running_on(&lab, A, "pcut")?;
    continues(&lab, A, "pcut", count)?;
    nothing_left(&lab, B, &id)
}

/// An operator's `--decide rolled-back` on the destination of a move that is not in doubt
/// (held in a delay on its source, then committed as usual) is not applied, and says where the
/// container runs: host-b. Before (QA of session 29) it said "settled as committed: the
/// container runs on host-a", the source, and exited 0.
#[test]
fn a_decision_on_a_live_move_that_commits_is_not_applied() -> Result<()> {
    if !mig_tests::is_root("fault tests") {
        return Ok(());
    }
    let lab = Lab::up("livedec", 185)?;
    lab.run_container(A, "lvd", 8)?;
    lab.fault(A, Some("source-restore:delay:6000"))?;
    let (moved, decided) = std::thread::scope(|s| -> Result<_> {
        let mover = s.spawn(|| lab.mig(A, &["move", "lvd", "host-b"]));
        let restored = mig_tests::wait_until(Duration::from_secs(60), || {
            lab.journaled(B, "Restored") || mover.is_finished()
        });
        ensure!(restored, "host-b never journaled Restored");
        let decided = lab.mig(B, &["move", "--resolve", "lvd", "--decide", "rolled-back"]);
        let moved = mover
            .join()
            .map_err(|_| anyhow::anyhow!("the mover thread panicked"))?;
        Ok((moved, decided))
    })?;
    lab.fault(A, None)?;
    ensure!(moved.code == 0, "{moved:?}");
    ensure!(
        decided.code != 0
            && decided.stderr.contains("runs on host-b")
            && decided.stderr.contains("not applied"),
        "{decided:?}"
    );
    running_on(&lab, B, "lvd")?;
    Ok(())
}

/// Three hosts: host-a dies after host-b restored its copy; host-b's operator decides
/// `committed`, host-b moves the container on to host-c and its agent goes down. host-a, back,
/// cannot ask host-b for 60 s, and before thawing asks its other pinned peers: host-c holds the
/// container, so host-a removes its copy. Before (QA of session 29) it thawed a second copy.
#[test]
fn a_source_that_cannot_ask_its_destination_finds_the_container_moved_on() -> Result<()> {
    if !mig_tests::is_root("fault tests") {
        return Ok(());
    }
    let mut lab = Lab::up_n("onward", 186, 3)?;
    let id = lab.run_container(A, "onw", 8)?;
    lab.fault(A, Some("source-restore:delay:8000"))?;
    let o = move_killing_at(&lab, "onw", B, "Restored", A)?;
    lab.fault(A, None)?;
    ensure!(o.code != 0, "host-a was to die mid-move: {o:?}");
    let said = lab.mig_ok(B, &["move", "--resolve", "onw", "--decide", "committed"])?;
    ensure!(said.contains("runs on host-b"), "{said}");
    let (count, _) = log_state(&lab.mig(B, &["logs", "onw"]).stdout);
    lab.mig_ok(B, &["move", "onw", "host-c"])?;
    lab.kill_agent(B)?;
    lab.restart_after_crash(A)?;
    // 60 s of patience, then the other peers are asked.
    let gone = mig_tests::wait_until(Duration::from_secs(120), || {
        !lab.mig(A, &["ps", "-a"]).stdout.contains("onw")
    });
    ensure!(
        gone,
        "host-a kept its copy: {}",
        lab.mig(A, &["ps", "-a"]).stdout
    );
    nothing_left(&lab, A, &id)?;
    running_on(&lab, 2, "onw")?;
    continues(&lab, 2, "onw", count)?;
    // What host-a says of the move names host-c, where the container ran (review 3 of session
    // 29, L2: it said only that it went to host-b, which was down).
    let said = lab.mig(A, &["move", "--resolve", "onw"]);
    ensure!(said.stderr.contains("ran on host-c"), "{said:?}");
    lab.restart_after_crash(B)?;
    Ok(())
}

/// As `a_source_back_after_a_committed_decision_removes_its_copy`, but host-b's agent is down
/// when host-a comes back (both hosts restarting after a power cut) and back ten seconds later:
/// host-a keeps its copy frozen while it cannot ask host-b, asks again, hears that the container
/// runs there, and removes its copy. Before the review of session 26 (F4) host-a thawed its copy
/// after 2 s without an answer, and the container ran on both hosts.
#[test]
fn a_source_back_before_its_destination_waits_for_it() -> Result<()> {
    if !mig_tests::is_root("fault tests") {
        return Ok(());
    }
    let mut lab = Lab::up("slowd", 39)?;
    let id = lab.run_container(A, "slw", 8)?;
    let (count, _) = log_state(&lab.mig(A, &["logs", "slw"]).stdout);
    lab.fault(A, Some("source-restore:delay:8000"))?;
    let o = move_killing_at(&lab, "slw", B, "Restored", A)?;
    lab.fault(A, None)?;
    ensure!(o.code != 0, "host-a was to die mid-move: {o:?}");
    // Its operator is told what deciding committed risks (QA of session 27, F5).
    let hint = lab.mig(B, &["move", "--resolve", "slw"]);
    ensure!(
        hint.stderr.contains(
            "only if host-a is gone for good: its agent, back from a restart, runs its own copy again when it cannot reach this host for 60 s"
        ),
        "{hint:?}"
    );
    let said = lab.mig_ok(B, &["move", "--resolve", "slw", "--decide", "committed"])?;
    ensure!(said.contains("runs on host-b"), "{said}");
    running_on(&lab, B, "slw")?;
    // The container keeps running on host-b while its agent is down.
    lab.kill_agent(B)?;
    lab.restart_after_crash(A)?;
    let kept_frozen = (|| -> Result<()> {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            let d = lab.mig_json(A, &["inspect", "slw", "--json"])?;
            ensure!(
                d["state"] == "frozen",
                "host-a runs its copy while host-b cannot be asked: {d}"
            );
            // Shown in doubt, not as a move under way.
            ensure!(
                d["in_doubt"]["role"] == "source"
                    && d["in_doubt"]["peer"] == "host-b"
                    && d["moving"].is_null(),
                "{d}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        // Asked now, the operator hears why it stays frozen.
        let o = lab.mig(A, &["move", "--resolve", "slw"]);
        ensure!(
            o.code != 0 && o.stderr.contains("stays frozen while it is asked again"),
            "{o:?}"
        );
        Ok(())
    })();
    lab.restart_after_crash(B)?;
    kept_frozen?;
    let gone = mig_tests::wait_until(Duration::from_secs(30), || {
        !lab.mig(A, &["ps", "-a"]).stdout.contains("slw")
    });
    ensure!(
        gone,
        "host-a kept its copy: {}",
        lab.mig(A, &["ps", "-a"]).stdout
    );
    nothing_left(&lab, A, &id)?;
    running_on(&lab, B, "slw")?;
    continues(&lab, B, "slw", count)?;
    // Settled: each side's `--resolve` says how the move ended and where it runs (QA of
    // session 27, F2: only "no unfinished migration").
    for (host, said) in [
        (A, "committed: it went to host-b"),
        (B, "committed: it runs here"),
    ] {
        let o = lab.mig(host, &["move", "--resolve", "slw"]);
        ensure!(
            o.code != 0 && o.stderr.contains("no unfinished migration") && o.stderr.contains(said),
            "{o:?}"
        );
    }
    // A name nothing here knows (QA of session 28, F4: the same words as for a settled move).
    let o = lab.mig(A, &["move", "--resolve", "nosuch"]);
    ensure!(
        o.code != 0
            && o.stderr
                .contains("no container nosuch here, and no migration of it"),
        "{o:?}"
    );
    Ok(())
}

/// A move that rolls back removes the image it brought to the destination, unless another
/// arriving move uses it. Another move's Prepare that comes while the rollback is about to
/// remove it (held there by `dest-image-remove:delay`) waits for the removal and is sent the
/// layers, so its restore finds them. Before the review of session 26 (F7) it found the image,
/// was sent no layers, and its restore failed once the rollback had removed them.
#[test]
fn a_rolled_back_move_leaves_alone_an_image_another_move_found() -> Result<()> {
    if !mig_tests::is_root("fault tests") {
        return Ok(());
    }
    let lab = Lab::up("imgrb", 40)?;
    lab.run_container(A, "imx", 1)?;
    let y = lab.run_container(A, "imy", 1)?;
    // The agent's log, beside its socket.
    let log = lab.hosts[B]
        .socket
        .parent()
        .context("no lab directory")?
        .join("host-b.log");
    let seen = std::fs::read_to_string(&log).map_or(0, |l| l.len());
    // imx's move brings the image to host-b and rolls back (its restore fails); host-b then
    // waits before it removes the image.
    lab.fault(B, Some("dest-restore:fail\ndest-image-remove:delay:8000"))?;
    let (x, y_moved) = std::thread::scope(|s| -> Result<_> {
        let mover = s.spawn(|| lab.mig(A, &["move", "imx", "host-b"]));
        let held = mig_tests::wait_until(Duration::from_secs(60), || {
            std::fs::read_to_string(&log).is_ok_and(|l| {
                l.get(seen..)
                    .is_some_and(|l| l.contains("dest-image-remove"))
            })
        });
        lab.fault(B, None)?;
        // imy's move is held before its freeze, after its Prepare and presync, for longer than
        // the removal waits: a restore that lacks the layers fails.
        lab.fault(A, Some("source-before-freeze:delay:10000"))?;
        let y_moved = held.then(|| lab.mig(A, &["move", "imy", "host-b"]));
        lab.fault(A, None)?;
        let x = mover
            .join()
            .map_err(|_| anyhow::anyhow!("the mover thread panicked"))?;
        Ok((x, y_moved))
    })?;
    ensure!(x.code == 125, "imx's move was to roll back: {x:?}");
    let y_moved = y_moved.context("host-b never held the image's removal")?;
    ensure!(y_moved.code == 0, "imy's move failed: {y_moved:?}");
    running_on(&lab, A, "imx")?;
    running_on(&lab, B, "imy")?;
    move_and_check(&lab, B, A, "imy", &y)?;
    Ok(())
}

/// A container frozen with nothing on its agent to say why (the copy of a move left in doubt
/// whose journal entry could not be read, made here by freezing its cgroup by hand) is not moved
/// on: that could leave two copies (QA of session 25, F6: it was). `--resolve` says how to let it
/// run, `--decide rolled-back` thaws it, and it moves again.
#[test]
fn a_container_frozen_without_a_journal_is_not_moved_on() -> Result<()> {
    if !mig_tests::is_root("fault tests") {
        return Ok(());
    }
    let lab = Lab::up("unexp", 176)?;
    let id = lab.run_container(A, "unx", 8)?;
    let cgroup = lab.mig_json(A, &["inspect", "unx", "--json"])?["cgroup"]
        .as_str()
        .context("no cgroup")?
        .to_owned();
    let cg = mig_runtime::cgroup::Cgroup::open(&cgroup)?;
    cg.freeze(Duration::from_secs(10))?;
    let o = lab.mig(A, &["move", "unx", "host-b"]);
    let thawed = cg.thaw();
    ensure!(
        o.code == 125 && o.stderr.contains("no operation of this agent froze it"),
        "{o:?}"
    );
    thawed?;
    cg.freeze(Duration::from_secs(10))?;
    let o = lab.mig(A, &["move", "--resolve", "unx"]);
    ensure!(o.stderr.contains("--decide rolled-back"), "{o:?}");
    let o = lab.mig(A, &["move", "--resolve", "unx", "--decide", "rolled-back"]);
    ensure!(o.stderr.contains("runs here again"), "{o:?}");
    ensure!(
        cg.freeze_state()? == mig_runtime::cgroup::FreezeState::Thawed,
        "still frozen"
    );
    nothing_left(&lab, B, &id)?;
    move_and_check(&lab, A, B, "unx", &id)?;
    Ok(())
}

/// Kills the shim of container `id`'s restored copy on host-b, waiting up to `within` for its
/// `shim.json`.
fn kill_dest_shim(lab: &Lab, id: &str, within: Duration) -> Result<()> {
    let record = lab
        .state_dir(B)
        .join("containers")
        .join(id)
        .join("shim.json");
    let mut shim = None;
    mig_tests::wait_until(within, || {
        shim = std::fs::read_to_string(&record)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["shim_pid"].as_i64());
        shim.is_some()
    });
    let pid = shim.context("the restored copy's shim.json never appeared")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    Ok(())
}

/// Moves `name` from host-a to host-b and kills host `kill`'s agent once host `watch` has
/// journaled `state` (a fault delay on the source holds the move there); the move's output.
fn move_killing_at(
    lab: &Lab,
    name: &str,
    watch: usize,
    state: &str,
    kill: usize,
) -> Result<mig_tests::MigOutput> {
    std::thread::scope(|s| -> Result<mig_tests::MigOutput> {
        let mover = s.spawn(|| lab.mig(A, &["move", name, "host-b"]));
        let reached = mig_tests::wait_until(Duration::from_secs(60), || {
            lab.journaled(watch, state) || mover.is_finished()
        });
        if reached && !mover.is_finished() {
            lab.kill_agent(kill)?;
        }
        mover
            .join()
            .map_err(|_| anyhow::anyhow!("the mover thread panicked"))
    })
}

/// Moves `name` from host-a to host-b and kills host-b's agent after host-a journaled its commit
/// decision and before host-b could record it: host-a's move ends in doubt, host-b is down.
fn in_doubt_without_b(lab: &Lab, name: &str) -> Result<()> {
    lab.fault(A, Some("source-commit:delay:3000"))?;
    // host-a journaled its decision and now waits before it sends the Commit.
    let o = move_killing_at(lab, name, A, "CommitSent", B)?;
    lab.fault(A, None)?;
    eprintln!("move exit {}: {}", o.code, o.stderr.trim());
    ensure!(o.stderr.contains("in doubt"), "not in doubt: {o:?}");
    Ok(())
}

/// Each side of an in-doubt move settled by its own operator, each the other way: host-a decides
/// `rolled-back` while host-b is down, then host-a's agent is down while host-b, back, decides
/// `committed`. Both copies run (a documented risk of deciding on a destination). host-a, back,
/// tells host-b of its rollback, hears that host-b committed, and says so where operators look:
/// `mig ps` (`running (also on host-b)`, `also_running_on` in JSON) and a `migration_conflict`
/// event. Before session 28 only host-a's log said it (QA of session 27, F5). Removing host-b's
/// copy ends it: host-a asks host-b again and clears the mark.
#[test]
fn two_operators_deciding_each_way_are_told_it_runs_twice() -> Result<()> {
    if !mig_tests::is_root("fault tests") {
        return Ok(());
    }
    let mut lab = Lab::up("dup", 41)?;
    let id = lab.run_container(A, "dup", 8)?;
    in_doubt_without_b(&lab, "dup")?;
    let o = lab.mig(A, &["move", "--resolve", "dup", "--decide", "rolled-back"]);
    ensure!(o.stderr.contains("decided by the operator"), "{o:?}");
    running_on(&lab, A, "dup")?;
    lab.kill_agent(A)?;
    lab.restart_after_crash(B)?;
    let said = lab.mig_ok(B, &["move", "--resolve", "dup", "--decide", "committed"])?;
    ensure!(said.contains("runs on host-b"), "{said}");
    running_on(&lab, B, "dup")?;
    // host-a comes back cut off from host-b, so that its events are followed before its
    // rollback notice can reach host-b (it retries every 5 s).
    lab.link(B, false)?;
    let back = lab.restart_after_crash(A);
    let events = back.and_then(|()| Events::follow(&lab, A));
    lab.link(B, true)?;
    let events = events?;
    let mut ps = String::new();
    let told = mig_tests::wait_until(Duration::from_secs(60), || {
        ps = lab.mig(A, &["ps"]).stdout;
        ps.contains("running (also on host-b)")
    });
    ensure!(
        told,
        "host-a does not say the container also runs on host-b: {ps}"
    );
    let list = lab.mig_json(A, &["ps", "--json"])?;
    ensure!(list[0]["also_running_on"] == "host-b", "{list}");
    let said = lab.mig_ok(A, &["inspect", "dup"])?;
    ensure!(said.contains("also on:   host-b"), "{said}");
    let conflicts = events.of_type("migration_conflict");
    ensure!(
        conflicts.len() == 1
            && conflicts[0]["container_name"] == "dup"
            && conflicts[0]["peer"] == "host-b",
        "host-a's migration_conflict events: {conflicts:?}"
    );
    // The copy on host-b removed: host-a's runs on, and soon says it runs there alone (it asks
    // host-b every 5 s).
    lab.mig_ok(B, &["rm", "-f", "dup"])?;
    nothing_left(&lab, B, &id)?;
    running_on(&lab, A, "dup")?;
    let alone = mig_tests::wait_until(Duration::from_secs(30), || {
        ps = lab.mig(A, &["ps"]).stdout;
        ps.contains("dup") && !ps.contains("also on")
    });
    ensure!(
        alone,
        "host-a still says the container also runs on host-b: {ps}"
    );
    lab.mig_ok(A, &["rm", "-f", "dup"])?;
    nothing_left(&lab, A, &id)?;
    Ok(())
}

/// The source killed after host-b restored its copy, then restarted twice while host-b is cut
/// off: the first restart thaws the container on host-a once host-b could not be asked for a
/// minute (`recover::back::ASK_PATIENCE`) and must tell host-b to drop its frozen copy, the
/// second stops that agent before it could. Before session 21 the notice lived in
/// memory only, and host-b's copy stayed frozen "in doubt" for good, refusing rm, stop and
/// moves (QA); now it is kept on disk and sent once host-b is reachable again.
#[test]
fn a_rollback_notice_outlives_a_restart_of_the_source() -> Result<()> {
    if !mig_tests::is_root("fault tests") {
        return Ok(());
    }
    let mut lab = Lab::up("ntc", 32)?;
    let id = lab.run_container(A, "ntc", 8)?;
    lab.fault(A, Some("source-restore:kill"))?;
    let o = lab.mig(A, &["move", "ntc", "host-b"]);
    lab.fault(A, None)?;
    assert_ne!(o.code, 0, "the source was to die: {}", o.stdout);
    lab.link(B, false)?;
    let cut = (|| -> Result<()> {
        lab.restart_after_crash(A)?;
        let ran = mig_tests::wait_until(Duration::from_secs(90), || {
            running_on(&lab, A, "ntc").is_ok()
        });
        ensure!(ran, "host-a never ran its copy while host-b was cut off");
        // Long enough for the restarted agent to try host-b once.
        std::thread::sleep(Duration::from_secs(2));
        lab.kill_agent(A)?;
        lab.restart(A)?;
        Ok(())
    })();
    lab.link(B, true)?;
    cut?;
    let (count, _) = log_state(&lab.mig(A, &["logs", "ntc"]).stdout);
    running_on(&lab, A, "ntc")?;
    continues(&lab, A, "ntc", count)?;
    let gone = mig_tests::wait_until(Duration::from_secs(60), || {
        !lab.mig(B, &["ps", "-a"]).stdout.contains("ntc")
    });
    assert!(
        gone,
        "host-b still holds its copy: {}",
        lab.mig(B, &["ps", "-a"]).stdout
    );
    nothing_left(&lab, B, &id)?;
    Ok(())
}

/// SIGTERM (`systemctl stop`) to the source agent while a move holds the container frozen: the
/// agent lets the move end before it exits, so the container runs on host-b. Before session 21
/// it exited at once and left the container frozen on host-a until it was started again (QA).
#[test]
fn a_stopping_agent_lets_its_moves_end() -> Result<()> {
    if !mig_tests::is_root("fault tests") {
        return Ok(());
    }
    let mut lab = Lab::up("stp", 33)?;
    let id = lab.run_container(A, "stp", 8)?;
    let (count, _) = log_state(&lab.mig(A, &["logs", "stp"]).stdout);
    lab.fault(A, Some("source-dump:delay:3000"))?;
    let agent = lab.hosts[A].agent_pid.context("host-a's agent")?;
    let o = std::thread::scope(|s| {
        let l: &Lab = &lab;
        let mover = s.spawn(move || l.mig(A, &["move", "stp", "host-b"]));
        // Frozen and held by the delay: then the stop.
        let frozen = mig_tests::wait_until(Duration::from_secs(60), || {
            l.mig(A, &["ps"]).stdout.contains("frozen")
        });
        assert!(frozen, "the container was never frozen for its move");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(agent),
            nix::sys::signal::Signal::SIGTERM,
        );
        mover.join()
    })
    .map_err(|_| anyhow::anyhow!("the mover thread panicked"))?;
    lab.fault(A, None)?;
    eprintln!(
        "move exit {}: {} {}",
        o.code,
        o.stdout.trim(),
        o.stderr.trim()
    );
    assert_eq!(o.code, 0, "the move did not end: {}", o.stderr);
    lab.restart_after_crash(A)?;
    running_on(&lab, B, "stp")?;
    continues(&lab, B, "stp", count)?;
    nothing_left(&lab, A, &id)?;
    Ok(())
}

/// A container that exits while its move waits to freeze it: the move fails, and its error says
/// the container ended rather than "keeps running here" (QA: it said so, or that the rollback
/// failed and the container "may still be frozen").
#[test]
fn a_container_that_ends_during_its_move_is_not_said_to_run() -> Result<()> {
    if !mig_tests::is_root("fault tests") {
        return Ok(());
    }
    let lab = Lab::up("end", 34)?;
    lab.mig_ok(
        A,
        &[
            "run",
            "-d",
            "--name",
            "brief",
            "busybox",
            "--",
            "sh",
            "-c",
            "sleep 3; exit 3",
        ],
    )?;
    lab.fault(A, Some("source-before-freeze:delay:6000"))?;
    let o = lab.mig(A, &["move", "brief", "host-b"]);
    lab.fault(A, None)?;
    eprintln!("move exit {}: {}", o.code, o.stderr.trim());
    ensure!(
        o.code != 0,
        "the move of an ended container succeeded: {}",
        o.stdout
    );
    ensure!(
        o.stderr.contains("ended during its move") && !o.stderr.contains("keeps running"),
        "the error does not say the container ended: {}",
        o.stderr
    );
    let ps = lab.mig_json(A, &["inspect", "brief", "--json"])?;
    ensure!(ps["state"] == "exited", "host-a: {ps}");
    let b = lab.mig(B, &["ps", "-a"]);
    ensure!(!b.stdout.contains("brief"), "host-b holds it: {}", b.stdout);
    Ok(())
}

/// A stop (SIGTERM) while a move is still in its pre-flight, before anything is journaled or
/// frozen (here: connecting to a destination whose agent is down): the agent waits for the move's
/// answer before it exits, so `mig move` says why it failed rather than "connection closed" (CI
/// of session 22 met it under load).
#[test]
fn a_stopping_agent_answers_a_move_in_its_preflight() -> Result<()> {
    if !mig_tests::is_root("fault tests") {
        return Ok(());
    }
    let mut lab = Lab::up("stq", 37)?;
    lab.run_container(A, "stq", 1)?;
    lab.kill_agent(B)?;
    let agent = lab.hosts[A].agent_pid.context("host-a's agent")?;
    let o = std::thread::scope(|s| {
        let l: &Lab = &lab;
        let mover = s.spawn(move || l.mig(A, &["move", "stq", "host-b"]));
        std::thread::sleep(Duration::from_millis(1500));
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(agent),
            nix::sys::signal::Signal::SIGTERM,
        );
        mover.join()
    })
    .map_err(|_| anyhow::anyhow!("the mover thread panicked"))?;
    eprintln!("move exit {}: {}", o.code, o.stderr.trim());
    ensure!(
        o.code != 0 && o.stderr.contains("host-b") && !o.stderr.contains("connection closed"),
        "the move's answer was lost: {}",
        o.stderr
    );
    lab.restart_after_crash(A)?;
    lab.restart_after_crash(B)?;
    running_on(&lab, A, "stq")?;
    Ok(())
}

/// host-b's state directory is a 24 MB tmpfs: the 8 MB container (about 50 MB to move) is
/// refused at Prepare, and keeps running on host-a.
#[test]
fn disk_full_is_refused_at_prepare() -> Result<()> {
    let Some(DiskCase {
        lab,
        id,
        before,
        count,
    }) = disk_lab("dfp", 25, 24 << 20)?
    else {
        return Ok(());
    };
    let o = lab.mig(A, &["move", "dfp", "host-b", "--json"]);
    eprintln!("move exit {}: {}", o.code, o.stderr.trim());
    assert_ne!(o.code, 0, "{}", o.stdout);
    assert!(o.stderr.contains("not enough disk space"), "{}", o.stderr);
    running_on(&lab, A, "dfp")?;
    continues(&lab, A, "dfp", count)?;
    nothing_left(&lab, B, &id)?;
    no_leaks(&lab, &before)
}

/// host-b's state directory is a 200 MB tmpfs that is filled up after Prepare (while the source
/// sits frozen in a delay): the transfer fails with ENOSPC, both sides roll back, and the space
/// the move took on host-b is given back. Cold mode: every image file crosses while frozen.
#[test]
fn disk_full_during_the_transfer_rolls_back() -> Result<()> {
    disk_full_while_frozen("dft", 26, &["--mode", "cold"])
}

/// The same in stream mode without the memory presync: the destination's page writer meets the
/// full disk while the dump streams every page. (With the presync, the memory is on host-b
/// before the freeze and the few pages that changed may still fit: such a move can succeed.)
#[test]
fn disk_full_during_the_page_stream_rolls_back() -> Result<()> {
    disk_full_while_frozen("dfs", 29, &["--mode", "stream", "--no-memory-presync"])
}

fn disk_full_while_frozen(name: &str, third: u8, mode: &[&str]) -> Result<()> {
    let Some(DiskCase {
        lab,
        id,
        before,
        count,
    }) = disk_lab(name, third, 200 << 20)?
    else {
        return Ok(());
    };
    let free_before = free_bytes(lab.state_dir(B));
    lab.fault(A, Some("source-freeze:delay:3000"))?;
    let filler = lab.state_dir(B).join("filler");
    let o = std::thread::scope(|s| {
        let l: &Lab = &lab;
        let mover = s.spawn(move || {
            let mut args = vec!["move", name, "host-b", "--json"];
            args.extend_from_slice(mode);
            l.mig(A, &args)
        });
        let staging = l.state_dir(B).join("migrations");
        mig_tests::wait_until(Duration::from_secs(20), || {
            std::fs::read_dir(&staging)
                .into_iter()
                .flatten()
                .flatten()
                .any(|e| e.path().join("presync").exists())
        });
        // Leave about 1 MB: far less than the dump.
        fill_disk(l.state_dir(B), &filler, 1 << 20);
        mover.join()
    })
    .map_err(|_| anyhow::anyhow!("the mover thread panicked"))?;
    lab.fault(A, None)?;
    eprintln!("move exit {}: {}", o.code, o.stderr.trim());
    std::fs::remove_file(&filler)?;
    assert_ne!(o.code, 0, "{}", o.stdout);
    running_on(&lab, A, name)?;
    continues(&lab, A, name, count)?;
    nothing_left(&lab, B, &id)?;
    no_leaks(&lab, &before)?;
    let free_after = free_bytes(lab.state_dir(B));
    assert!(
        free_after + (1 << 20) >= free_before,
        "host-b lost space: {free_before} -> {free_after}"
    );
    Ok(())
}

/// host-b's state directory fills up between its restore and the Commit (the source held by a
/// delay after Restored): host-b cannot record the commit, removes its copy, which never ran,
/// and the source thaws at once (QA: both copies stayed frozen, in doubt, for as long as the
/// disk stayed full).
#[test]
fn disk_full_at_the_commit_rolls_back() -> Result<()> {
    let Some(DiskCase {
        lab,
        id,
        before,
        count,
    }) = disk_lab("dfc", 35, 200 << 20)?
    else {
        return Ok(());
    };
    lab.fault(A, Some("source-restore:delay:4000"))?;
    let filler = lab.state_dir(B).join("filler");
    let o = std::thread::scope(|s| {
        let l: &Lab = &lab;
        let mover = s.spawn(move || l.mig(A, &["move", "dfc", "host-b"]));
        // Restored and frozen on host-b, waiting for the Commit: then the disk fills.
        let restored = mig_tests::wait_until(Duration::from_secs(60), || {
            l.mig(B, &["ps"]).stdout.contains("frozen") || mover.is_finished()
        });
        if restored && !mover.is_finished() {
            fill_disk(l.state_dir(B), &filler, 0);
        }
        mover.join()
    })
    .map_err(|_| anyhow::anyhow!("the mover thread panicked"))?;
    lab.fault(A, None)?;
    eprintln!("move exit {}: {}", o.code, o.stderr.trim());
    ensure!(
        filler.exists(),
        "the disk was not filled in time: {}",
        o.stderr
    );
    ensure!(o.code != 0, "the move succeeded: {}", o.stdout);
    ensure!(
        !o.stderr.contains("in doubt"),
        "the move was left in doubt: {}",
        o.stderr
    );
    // Running, not frozen, before the disk has room again.
    running_on(&lab, A, "dfc")?;
    continues(&lab, A, "dfc", count)?;
    std::fs::remove_file(&filler)?;
    nothing_left(&lab, B, &id)?;
    no_leaks(&lab, &before)
}

/// A lab whose host-b keeps its state directory on a small tmpfs, with the container running on
/// host-a.
struct DiskCase {
    lab: DiskLab,
    /// The container's id.
    id: String,
    /// Both hosts' usage before the move.
    before: Vec<Usage>,
    /// The container's counter before the move.
    count: u64,
}

/// A [`DiskCase`] with a tmpfs of `bytes` and the container `name`; `None` when not root.
fn disk_lab(name: &str, third: u8, bytes: u64) -> Result<Option<DiskCase>> {
    if !mig_tests::is_root("fault tests") {
        return Ok(None);
    }
    let lab = DiskLab::up(name, third, B, bytes)?;
    let id = lab.run_container(A, name, 8)?;
    let before: Vec<Usage> = (0..2).map(|h| usage(&lab, h)).collect();
    let (count, _) = log_state(&lab.mig(A, &["logs", name]).stdout);
    Ok(Some(DiskCase {
        lab,
        id,
        before,
        count,
    }))
}

/// Fills the file system of `dir` with the file `filler` up to `leave` bytes free. A move may
/// still be writing there, so the free space can shrink between the measure and the
/// `fallocate`: measured again and retried.
fn fill_disk(dir: &std::path::Path, filler: &std::path::Path, leave: u64) {
    for _ in 0..20 {
        let fill = free_bytes(dir).saturating_sub(leave);
        let filled = std::process::Command::new("fallocate")
            .args(["-l", &fill.to_string()])
            .arg(filler)
            .status()
            .is_ok_and(|st| st.success());
        if filled {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn free_bytes(p: &std::path::Path) -> u64 {
    nix::sys::statvfs::statvfs(p)
        .map(|s| s.blocks_available() * s.fragment_size())
        .unwrap_or(0)
}

/// `SOAK_ITERS` (default 100) moves of one container back and forth, each checked (PIDs, memory,
/// counter, nothing left on the source), then three containers moved concurrently there and
/// back; leaks compared before and after. Run: `cargo test -p mig-tests --test faults --
/// --ignored soak`.
#[test]
#[ignore]
fn soak_back_and_forth() -> Result<()> {
    if !mig_tests::is_root("soak") {
        return Ok(());
    }
    let iters: usize = std::env::var("SOAK_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let lab = Lab::up("soak", 27)?;
    let id = lab.run_container(A, "soak", 8)?;
    move_and_check(&lab, A, B, "soak", &id)?;
    move_and_check(&lab, B, A, "soak", &id)?;
    let before: Vec<Usage> = (0..2).map(|h| usage(&lab, h)).collect();
    let mut downtimes = Vec::new();
    let t0 = Instant::now();
    for i in 0..iters {
        let (from, to) = if i % 2 == 0 { (A, B) } else { (B, A) };
        let r = move_and_check(&lab, from, to, "soak", &id).with_context(|| format!("move {i}"))?;
        downtimes.push(r["downtime_ms"].as_u64().unwrap_or(0));
    }
    if iters % 2 == 1 {
        move_and_check(&lab, B, A, "soak", &id)?;
    }
    let elapsed = t0.elapsed();
    // Three more containers, moved at the same time.
    let ids: Vec<String> = (0..3)
        .map(|i| lab.run_container(A, &format!("soak{i}"), 4))
        .collect::<Result<_>>()?;
    let during: Vec<Usage> = (0..2).map(|h| usage(&lab, h)).collect();
    for (from, to) in [(A, B), (B, A)] {
        std::thread::scope(|s| {
            let handles: Vec<_> = ids
                .iter()
                .enumerate()
                .map(|(i, id)| {
                    let l = &lab;
                    s.spawn(move || move_and_check(l, from, to, &format!("soak{i}"), id))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().map_err(|_| anyhow::anyhow!("mover panicked"))?)
                .collect::<Result<Vec<_>>>()
        })?;
    }
    no_leaks(&lab, &during)?;
    for i in 0..3 {
        lab.mig_ok(A, &["rm", "-f", &format!("soak{i}")])?;
    }
    no_leaks(&lab, &before)?;
    let after: Vec<Usage> = (0..2).map(|h| usage(&lab, h)).collect();
    downtimes.sort_unstable();
    let pct = |p: usize| {
        downtimes
            .get(downtimes.len() * p / 100)
            .copied()
            .unwrap_or(0)
    };
    eprintln!(
        "soak: {iters} checked moves in {:.1} s; downtime p50 {} ms, p90 {} ms, max {} ms; then 3 containers moved concurrently there and back",
        elapsed.as_secs_f64(),
        pct(50),
        pct(90),
        downtimes.last().copied().unwrap_or(0)
    );
    eprintln!("before: a {} | b {}", before[0], before[1]);
    eprintln!("after:  a {} | b {}", after[0], after[1]);
    for h in 0..2 {
        let l = leaks(&before[h], &after[h]);
        assert!(l.is_empty(), "host {h} leaked: {l:?}");
    }
    Ok(())
}

/// An in-doubt move whose peer is unpinned for a while (`mig peers rm`) stays in doubt, and the
/// automatic resolver settles it once the peer is pinned again and answers. Before session 25 it
/// stopped asking at the first try, logged the move "settled" with the outcome "no pinned peer
/// named host-b", and host-a's copy stayed frozen until an operator's `--resolve` (QA B, F5).
#[test]
fn an_in_doubt_move_waits_for_its_peer_to_be_pinned_again() -> Result<()> {
    if !mig_tests::is_root("fault tests") {
        return Ok(());
    }
    let mut lab = Lab::up("unp", 38)?;
    let id = lab.run_container(A, "unp", 8)?;
    in_doubt_without_b(&lab, "unp")?;
    let b = &lab.hosts[B];
    let addr = format!("{}:{}", b.address, b.quic_port);
    let fp = b.fingerprint.clone().context("host-b's fingerprint")?;
    lab.mig_ok(A, &["peers", "rm", "host-b"])?;
    let o = lab.mig(A, &["move", "--resolve", "unp"]);
    ensure!(
        o.code != 0 && o.stderr.contains("still in doubt") && o.stderr.contains("pin it again"),
        "{o:?}"
    );
    // The resolver asks every 5 s: it found no peer at least once meanwhile.
    std::thread::sleep(Duration::from_secs(7));
    lab.mig_ok(A, &["peers", "add", "host-b", &addr, "--fingerprint", &fp])?;
    lab.restart_after_crash(B)?;
    let settled = mig_tests::wait_until(Duration::from_secs(60), || {
        running_on(&lab, B, "unp").is_ok() && lab.mig(A, &["inspect", "unp"]).code != 0
    });
    ensure!(
        settled,
        "not settled: host-a {} host-b {}",
        lab.mig(A, &["ps", "-a"]).stdout,
        lab.mig(B, &["ps", "-a"]).stdout
    );
    nothing_left(&lab, A, &id)?;
    Ok(())
}
