//! `mig bench move` end to end, one tiny run: 16 MiB, cold and stream mode, one run each (plus the
//! runc baseline when runc is installed), small link measurements. Checks the CSV and JSON
//! columns (stream's memory presync among them), that every run verified, and that the plot is a
//! non-empty SVG. No timing is asserted.
//!
//! Needs root, real CRIU. The bench removes its own lab (subnets 10.214.60.0/24, 62-64, 67 and 68) and
//! work directory; the guard here removes them too if the bench itself dies.

use anyhow::{ensure, Context, Result};
use mig_tests::{bin, dirty_tracking, is_root, lab_down_quietly};
use serde_json::Value;
use std::path::Path;
use std::process::Command;

struct Guard {
    lab: String,
}

impl Drop for Guard {
    fn drop(&mut self) {
        lab_down_quietly(&self.lab);
        let _ = std::fs::remove_dir_all(Path::new("/var/lib/mig-bench").join(&self.lab));
    }
}

fn runc_installed() -> bool {
    Command::new("runc")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `mig bench move ARGS` on lab `lab` and subnet `subnet`, with the static workload, reaching no
/// agent of the environment's.
fn bench_move(lab: &str, subnet: &str, args: &[&str]) -> Result<Command> {
    let mut cmd = Command::new(bin("mig"));
    cmd.args(["bench", "move"])
        .args(args)
        .args(["--lab", lab, "--subnet", subnet])
        .arg("--workload")
        .arg(mig_tests::static_binary(
            "mig-memload",
            "mig-memload",
            "MIG_MEMLOAD",
        )?)
        .env_remove("MIG_HOST")
        .env_remove("MIG_SOCKET");
    Ok(cmd)
}

#[test]
fn bench_move_tiny_run_writes_csv_json_and_svg() -> Result<()> {
    if !is_root("bench tests") {
        return Ok(());
    }
    let lab = format!("bn{}", std::process::id() % 100_000);
    let _guard = Guard { lab: lab.clone() };
    let tmp = tempfile::tempdir()?;
    let (csv, json, svg) = (
        tmp.path().join("b.csv"),
        tmp.path().join("b.json"),
        tmp.path().join("b.svg"),
    );
    let runc = runc_installed();
    let mut cmd = bench_move(
        &lab,
        "10.214.60",
        &[
            "--sizes",
            "16M",
            "--runs",
            "1",
            "--modes",
            "cold,stream",
            "--link-mib",
            "64",
        ],
    )?;
    cmd.arg("--csv")
        .arg(&csv)
        .arg("--json")
        .arg(&json)
        .arg("--plot")
        .arg(&svg);
    if runc {
        cmd.args(["--baseline", "runc"]);
    } else {
        eprintln!("runc is not installed: no baseline in this run");
    }
    let out = cmd.output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success(),
        "mig bench failed ({}):\n{stderr}\n{stdout}",
        out.status
    );
    eprintln!("{stderr}\n{stdout}");

    let text = std::fs::read_to_string(&csv)?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().context("empty csv")?.split(',').collect();
    for col in [
        "size_mib",
        "kind",
        "mode",
        "run",
        "status",
        "downtime_ms",
        "total_ms",
        "freeze_ms",
        "dump_ms",
        "transfer_ms",
        "restore_ms",
        "bytes",
        "verified",
        "pids_kept",
        "page_bytes",
        "postcopy_ms",
        "criu_dump_ms",
        "seal_ms",
        "predicted_downtime_ms",
        "throughput_source",
        "throughput_mib_s",
        "presync_ms",
        "presync_bytes",
        "pages_reused",
        "pages_sent_frozen",
        "fixed_cost_ms",
        "fixed_cost_source",
        "agents_cpu_ms",
    ] {
        ensure!(header.contains(&col), "csv has no column {col}: {header:?}");
    }
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    ensure!(rows.len() == 2 + runc as usize, "csv rows: {rows:?}");
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap_or(0);
    for r in &rows {
        ensure!(r[col("size_mib")] == "16", "{r:?}");
        ensure!(r[col("status")] == "ok", "{r:?}");
        ensure!(r[col("verified")] == "true", "{r:?}");
        ensure!(!r[col("downtime_ms")].is_empty(), "{r:?}");
    }
    ensure!(rows[0][col("mode")] == "cold" && rows[0][col("pids_kept")] == "true");
    // Both lab agents speak protocol 1.2: the pre-flight predicted from this move's link probe.
    ensure!(
        rows[0][col("throughput_source")] == "probe"
            && rows[0][col("predicted_downtime_ms")]
                .parse::<u64>()
                .is_ok_and(|ms| ms > 0)
            && rows[0][col("throughput_mib_s")]
                .parse::<u64>()
                .is_ok_and(|m| m > 0),
        "{:?}",
        rows[0]
    );
    // Each prediction names its fixed cost: the first move of a mode to a peer has none
    // measured yet.
    for r in &rows[..2] {
        ensure!(
            r[col("fixed_cost_source")] == "default"
                && r[col("fixed_cost_ms")]
                    .parse::<u64>()
                    .is_ok_and(|ms| ms > 0),
            "{r:?}"
        );
    }
    // Stream mode presynced the workload's memory (16 MiB and more) and the dump reused it.
    let n = |r: &[&str], c: &str| r[col(c)].parse::<u64>().unwrap_or(0);
    ensure!(
        rows[1][col("mode")] == "stream"
            && n(&rows[1], "presync_bytes") > 16 << 20
            && n(&rows[1], "pages_reused") > 2048,
        "{:?}",
        rows[1]
    );
    // Each move took the agents some CPU (with CRIU's); runc's row has none.
    for r in &rows[..2] {
        ensure!(n(r, "agents_cpu_ms") > 0, "{r:?}");
    }
    if runc {
        ensure!(rows[2][col("mode")] == "runc", "{:?}", rows[2]);
        ensure!(rows[2][col("agents_cpu_ms")].is_empty(), "{:?}", rows[2]);
    }

    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json)?)?;
    let jrows = report["rows"].as_array().context("json rows")?;
    ensure!(jrows.len() == rows.len());
    for r in jrows {
        for key in [
            "downtime_ms",
            "total_ms",
            "dump_ms",
            "transfer_ms",
            "restore_ms",
            "bytes",
        ] {
            ensure!(r[key].is_u64(), "json row without {key}: {r}");
        }
        ensure!(r["verified"] == true, "{r}");
        // `null` where the CSV is empty, the note too (QA of session 26: `""`).
        ensure!(r["note"].is_null(), "{r}");
    }
    // Each raw measurement, 3 per protocol (QA of sessions 25 and 26: the median alone), each
    // with the CPU it took.
    let link = report["link"].as_array().context("json link")?;
    let protos: Vec<&str> = link.iter().filter_map(|l| l["proto"].as_str()).collect();
    ensure!(
        protos == ["tcp", "tcp", "tcp", "quic", "quic", "quic"],
        "{protos:?}"
    );
    ensure!(
        link.iter()
            .all(|l| l["cpu_ms"].as_u64().is_some() && l["mbs"].as_f64() > Some(0.0)),
        "{link:?}"
    );
    ensure!(
        stdout.contains("raw tcp between the lab hosts: ")
            && stdout.contains("median of 3")
            && stdout.contains("CPU-s per GB"),
        "{stdout}"
    );

    let plot = std::fs::read_to_string(&svg)?;
    ensure!(plot.starts_with("<svg") && plot.contains("cold") && plot.len() > 1000);
    ensure!(stdout.contains("16 MiB"), "no summary: {stdout}");
    ensure!(
        !Path::new("/var/lib/mig-bench").join(&lab).exists(),
        "work directory left"
    );
    Ok(())
}

/// Runs a cold bench of 16 MiB (`runs` runs, no link measurement) writing `csv` and `json`,
/// sends it SIGTERM at its first progress line containing `at`, and returns its exit status,
/// its stdout and its progress lines once it ended.
fn terminated_bench(
    lab: &str,
    runs: &str,
    csv: &Path,
    json: &Path,
    at: &str,
) -> Result<(std::process::ExitStatus, String, String)> {
    let sigterm = nix::sys::signal::Signal::SIGTERM;
    signalled_bench(lab, "10.214.62", runs, "0", csv, json, at, sigterm)
}

/// [`terminated_bench`] on `subnet`, with `signal`, and link measurements of `link_mib`.
#[allow(clippy::too_many_arguments)]
fn signalled_bench(
    lab: &str,
    subnet: &str,
    runs: &str,
    link_mib: &str,
    csv: &Path,
    json: &Path,
    at: &str,
    signal: nix::sys::signal::Signal,
) -> Result<(std::process::ExitStatus, String, String)> {
    use std::io::{BufRead, BufReader};
    let mut cmd = bench_move(
        lab,
        subnet,
        &[
            "--sizes",
            "16M",
            "--runs",
            runs,
            "--modes",
            "cold",
            "--link-mib",
            link_mib,
        ],
    )?;
    cmd.arg("--csv")
        .arg(csv)
        .arg("--json")
        .arg(json)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    // In CI the tests may run as a background job, with SIGINT ignored (then kept ignored).
    let mut child = mig_tests::default_sigint(&mut cmd).spawn()?;
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let stderr = child.stderr.take().context("stderr")?;
    let mut seen = Vec::new();
    for line in BufReader::new(stderr).lines() {
        let line = line?;
        let now = line.contains(at);
        seen.push(line);
        if now {
            nix::sys::signal::kill(pid, signal)?;
        }
    }
    let out = child.wait_with_output()?;
    Ok((
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        seen.join("\n"),
    ))
}

/// SIGTERM (what `timeout`, systemd and `kill` send) in the middle of a bench: it stops after the
/// current step, writes the runs done to its CSV, prints the summary and removes its lab. It
/// used to die at once, leaving the lab's agents and the workload running and writing nothing.
#[test]
fn a_terminated_bench_keeps_its_finished_runs_and_leaves_nothing() -> Result<()> {
    if !is_root("bench tests") {
        return Ok(());
    }
    let lab = format!("bt{}", std::process::id() % 100_000);
    let _guard = Guard { lab: lab.clone() };
    let tmp = tempfile::tempdir()?;
    let csv = tmp.path().join("t.csv");
    let json = tmp.path().join("t.json");
    let (status, stdout, seen) = terminated_bench(&lab, "5", &csv, &json, "run 1: ok")?;
    ensure!(
        !status.success(),
        "a terminated bench says it succeeded:\n{seen}"
    );
    ensure!(seen.contains("SIGTERM: stopping"), "{seen}");
    let text = std::fs::read_to_string(&csv).with_context(|| format!("no csv:\n{seen}"))?;
    let rows: Vec<&str> = text.lines().skip(1).collect();
    ensure!(
        !rows.is_empty() && rows.len() < 5 && rows.iter().all(|r| r.contains(",ok,")),
        "rows: {rows:?}\n{seen}"
    );
    ensure!(stdout.contains("16 MiB cold"), "no summary: {stdout}");
    // The run in flight, if one started, is dropped with a line saying so (QA of session 26:
    // without a word).
    let next = format!("run {}: ", rows.len() + 1);
    ensure!(
        !seen.contains(&format!("{next}starting"))
            || seen.contains(&format!("{next}interrupted, not recorded")),
        "{seen}"
    );
    // The JSON says that the bench stopped early, and why.
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json)?)?;
    ensure!(
        v["stopped"]
            .as_str()
            .is_some_and(|s| s.contains("interrupted"))
            && v["rows"].as_array().is_some_and(|r| r.len() == rows.len()),
        "{v}"
    );
    ensure!(
        !Path::new("/run/mig")
            .join(format!("lab-{lab}.json"))
            .exists()
            && !Path::new("/var/lib/mig-bench").join(&lab).exists(),
        "the lab or its work directory is left:\n{seen}"
    );

    // Stopped before its first run: the files are written all the same, with no rows (QA of
    // session 23: there were none at all).
    std::fs::remove_file(&csv)?;
    std::fs::remove_file(&json)?;
    let (status, _, seen) = terminated_bench(&lab, "1", &csv, &json, " up on ")?;
    ensure!(!status.success(), "{seen}");
    let text = std::fs::read_to_string(&csv).with_context(|| format!("no csv:\n{seen}"))?;
    ensure!(text.lines().count() == 1, "{text}\n{seen}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json)?)?;
    ensure!(
        v["stopped"].is_string() && v["rows"].as_array().is_some_and(Vec::is_empty),
        "{v}\n{seen}"
    );
    Ok(())
}

/// Ctrl-C while the bench measures the link: it stops there, and the JSON keeps the measurements
/// taken before (each with its CPU time), says why it stopped and has no rows; the lab goes.
#[test]
fn an_interrupted_link_measurement_keeps_the_samples_taken() -> Result<()> {
    if !is_root("bench tests") {
        return Ok(());
    }
    let lab = format!("bi{}", std::process::id() % 100_000);
    let _guard = Guard { lab: lab.clone() };
    let tmp = tempfile::tempdir()?;
    let csv = tmp.path().join("i.csv");
    let json = tmp.path().join("i.json");
    let (status, _, seen) = signalled_bench(
        &lab,
        "10.214.68",
        "1",
        "64",
        &csv,
        &json,
        "raw tcp between the lab hosts: ",
        nix::sys::signal::Signal::SIGINT,
    )?;
    ensure!(!status.success(), "{seen}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json)?)?;
    // A loaded machine may finish the other measurements (64 MiB each) before the signal
    // arrives; the run is stopped then.
    let link = v["link"].as_array().context("no link")?;
    ensure!(
        !link.is_empty()
            && link.len() <= 6
            && link[0]["proto"] == "tcp"
            && link.iter().all(|l| l["cpu_ms"].is_u64()),
        "{v}\n{seen}"
    );
    ensure!(
        v["stopped"]
            .as_str()
            .is_some_and(|s| s.contains("interrupted"))
            && v["rows"].as_array().is_some_and(Vec::is_empty),
        "{v}\n{seen}"
    );
    ensure!(
        !Path::new("/run/mig")
            .join(format!("lab-{lab}.json"))
            .exists(),
        "the lab is left:\n{seen}"
    );
    Ok(())
}

/// A bench killed with SIGKILL (no cleanup, no end-of-bench write) keeps the runs it finished in
/// its CSV, written as each run ends (QA of session 26: no file at all). The guard takes its lab
/// down.
#[test]
fn a_killed_bench_keeps_its_finished_runs_in_the_csv() -> Result<()> {
    if !is_root("bench tests") {
        return Ok(());
    }
    let lab = format!("bk{}", std::process::id() % 100_000);
    let _guard = Guard { lab: lab.clone() };
    let tmp = tempfile::tempdir()?;
    let csv = tmp.path().join("k.csv");
    let json = tmp.path().join("k.json");
    let (status, _, seen) = signalled_bench(
        &lab,
        "10.214.67",
        "5",
        "0",
        &csv,
        &json,
        "run 1: ok",
        nix::sys::signal::Signal::SIGKILL,
    )?;
    ensure!(!status.success(), "{seen}");
    let text = std::fs::read_to_string(&csv).with_context(|| format!("no csv:\n{seen}"))?;
    let mut lines = text.lines();
    ensure!(
        lines
            .next()
            .is_some_and(|h| h.starts_with("size_mib,kind,mode,run,")),
        "{text}"
    );
    let rows: Vec<&str> = lines.collect();
    ensure!(
        rows.first()
            .is_some_and(|r| r.starts_with("16,mig,cold,1,ok,"))
            && rows.len() < 5,
        "{text}\n{seen}"
    );
    ensure!(!json.exists(), "the JSON is written at the end only");
    Ok(())
}

/// A mode given twice is refused before any work, as a size given twice is (QA of session 26:
/// two rows with the same size, mode and run).
#[test]
fn a_mode_given_twice_is_refused_at_once() -> Result<()> {
    if !is_root("bench tests") {
        return Ok(());
    }
    let lab = format!("bd{}", std::process::id() % 100_000);
    let _guard = Guard { lab: lab.clone() };
    let out = bench_move(
        &lab,
        "10.214.64",
        &[
            "--sizes",
            "16M",
            "--modes",
            "cold,stream,cold",
            "--runs",
            "1",
        ],
    )?
    .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(125) && stderr.contains("--modes cold is given twice"),
        "{:?}: {stderr}",
        out.status
    );
    ensure!(!stderr.contains(" up on "), "the lab was built: {stderr}");
    Ok(())
}

/// A bench whose every run is refused (pre-copy: this kernel has no soft-dirty tracking, and
/// where it has, `--runs 1` of a mode asked by name still measures something) measured nothing:
/// it exits 125 saying so and draws no plot (QA of session 25: exit 0 and an empty plot).
#[test]
fn a_bench_that_measured_nothing_says_so() -> Result<()> {
    if !is_root("bench tests") {
        return Ok(());
    }
    if dirty_tracking() {
        eprintln!("skipping: this kernel runs pre-copy, so a pre-copy bench measures something");
        return Ok(());
    }
    let lab = format!("bz{}", std::process::id() % 100_000);
    let _guard = Guard { lab: lab.clone() };
    let tmp = tempfile::tempdir()?;
    let svg = tmp.path().join("z.svg");
    let out = bench_move(
        &lab,
        "10.214.63",
        &[
            "--sizes",
            "16M",
            "--runs",
            "1",
            "--modes",
            "precopy",
            "--link-mib",
            "0",
        ],
    )?
    .arg("--plot")
    .arg(&svg)
    .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(125) && stderr.contains("nothing was measured"),
        "{:?}: {stderr}",
        out.status
    );
    ensure!(!svg.exists(), "a plot of nothing was drawn");
    Ok(())
}
