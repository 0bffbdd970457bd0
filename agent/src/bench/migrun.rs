//! One mig run: start the workload on host-a, move it to host-b with `mig move --json --mode M`,
//! verify it there, remove it. `mig` is run as a command (the same binary), so the bench works
//! with whatever modes this mig and its agents offer.

use super::report::{Row, RowStatus};
use super::workload::{self, Status};
use super::{progress, BenchError, Ctx};
use serde_json::Value;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The bench image's name on every lab host.
pub const IMAGE: &str = "mig-memload";

/// Runs `mig --socket <host's socket> ARGS`.
pub fn mig(ctx: &Ctx, host: usize, args: &[&str]) -> Result<Output, BenchError> {
    Command::new(&ctx.mig)
        .arg("--socket")
        .arg(&ctx.hosts[host].socket)
        .args(args)
        .env_remove("MIG_HOST")
        .output()
        .map_err(|source| BenchError::Spawn {
            command: format!("mig {}", args.join(" ")),
            source,
        })
}

/// Like [`mig`], its stdout on success, [`BenchError::CommandFailed`] otherwise.
pub fn mig_ok(ctx: &Ctx, host: usize, args: &[&str]) -> Result<String, BenchError> {
    let out = mig(ctx, host, args)?;
    if !out.status.success() {
        return Err(BenchError::CommandFailed {
            command: format!("mig {} (on {})", args.join(" "), ctx.hosts[host].name),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn import_image(ctx: &Ctx, host: usize) -> Result<(), BenchError> {
    let rootfs = ctx.rootfs.display().to_string();
    mig_ok(ctx, host, &["image", "import", &rootfs, "--name", IMAGE])?;
    Ok(())
}

/// The workload's status from its log on `host`, and whether it has ended there.
fn status_on(ctx: &Ctx, host: usize, id: &str) -> Status {
    let mut s = match mig(ctx, host, &["logs", id]) {
        Ok(o) if o.status.success() => Status::parse(&String::from_utf8_lossy(&o.stdout)),
        _ => Status::default(),
    };
    if let Ok(o) = mig(ctx, host, &["inspect", "--json", id]) {
        let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
        if matches!(v["state"].as_str(), Some("exited" | "stopped" | "failed")) {
            s.exited = Some(v["exit_code"].as_i64().unwrap_or(-1));
        }
    }
    s
}

/// The last line the workload wrote on host-a (stdout and stderr), for a failure's note.
fn last_line(ctx: &Ctx, id: &str) -> String {
    let Ok(o) = mig(ctx, 0, &["logs", id]) else {
        return String::new();
    };
    let text = [o.stdout, o.stderr].concat();
    let text = String::from_utf8_lossy(&text);
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .chars()
        .take(200)
        .collect()
}

/// Polls the workload's log on `host` until `done` or `timeout`; the last status either way.
pub fn wait_status(
    ctx: &Ctx,
    timeout: Duration,
    mut poll: impl FnMut() -> Status,
    done: impl Fn(&Status) -> bool,
) -> Result<Status, BenchError> {
    let start = Instant::now();
    loop {
        let s = poll();
        if done(&s) || s.bad.is_some() || s.exited.is_some() || start.elapsed() > timeout {
            return Ok(s);
        }
        ctx.sleep(Duration::from_millis(250))?;
    }
}

/// How long a workload of `size_mib` may take to start (fill its memory) or finish a pass.
pub fn patience(size_mib: u64) -> Duration {
    Duration::from_secs(30 + size_mib / 32)
}

/// Removes the container from both hosts on drop (whatever happened to the move).
struct Remove<'a> {
    ctx: &'a Ctx,
    id: String,
}

impl Drop for Remove<'_> {
    fn drop(&mut self) {
        for host in 0..self.ctx.hosts.len() {
            let _ = mig(self.ctx, host, &["rm", "-f", &self.id]);
        }
    }
}

/// Whether a failed `mig move` was a refusal (of the mode, by this mig or the agent) rather than a
/// failure of the move itself.
fn is_refusal(stderr: &str) -> bool {
    let s = stderr.to_ascii_lowercase();
    [
        "refus",
        "unexpected argument",
        "invalid value",
        "not supported",
        "unsupported",
        "lacks",
    ]
    .iter()
    .any(|w| s.contains(w))
}

/// The bench's mode for stream mode without the memory presync (plain stop-and-copy).
pub const STREAM_NO_PRESYNC: &str = "stream-nopresync";

fn move_args<'a>(id: &'a str, mode: Option<&'a str>) -> Vec<&'a str> {
    let mut args = vec!["move", "--json"];
    match mode {
        Some(STREAM_NO_PRESYNC) => args.extend(["--mode", "stream", "--no-memory-presync"]),
        Some(m) => args.extend(["--mode", m]),
        None => {}
    }
    args.extend([id, "host-b"]);
    args
}

fn first_line(s: &str) -> String {
    s.lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_string()
}

/// The note of a run whose wait for the workload a stop cut short before the move: the bench
/// does not record it, and prints the note as it says so.
pub const INTERRUPTED_BEFORE_THE_MOVE: &str =
    "stopped while the workload filled and verified its memory; nothing was moved";
/// The same after the move, while the workload's verification on host-b was awaited.
pub const INTERRUPTED_AFTER_THE_MOVE: &str =
    "the move committed; stopped while the workload was verified on host-b";

/// The note of a workload that ended before it verified its memory: its exit code and its last
/// line, or that it wrote none (QA of session 26: the note ended in ": ").
fn ended_before_verifying(code: i64, last_line: &str) -> String {
    let last = match last_line.is_empty() {
        true => "(no output)",
        false => last_line,
    };
    format!("the workload ended (exit code {code}) before it verified its memory: {last}")
}

/// One size/mode/run. Harness failures (cannot run mig) are errors; a refused or failed move, a
/// workload that does not verify, are recorded in the row.
pub fn run(ctx: &Ctx, size_mib: u64, mode: &str, run: u32) -> Result<Row, BenchError> {
    let mut row = Row::new(size_mib, "mig", mode, run);
    let safe: String = mode
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let name = format!("bench-{size_mib}m-{safe}-{run}");
    progress(&format!(
        "{size_mib} MiB, mig {mode}, run {run}: starting {name}"
    ));
    let cmd = workload::command(size_mib, ctx.dirty_mib);
    let mut args = vec!["run", "-d", "--name", &name, IMAGE, "--"];
    args.extend(cmd.iter().map(String::as_str));
    let id = match mig_ok(ctx, 0, &args) {
        Ok(out) => out.trim().to_string(),
        Err(e) => {
            let _ = mig(ctx, 0, &["rm", "-f", &name]);
            row.fail(RowStatus::Failed, &format!("start: {e}"));
            return Ok(row);
        }
    };
    let _remove = Remove {
        ctx,
        id: id.clone(),
    };
    let ready = wait_status(
        ctx,
        patience(size_mib),
        || status_on(ctx, 0, &id),
        |s| s.last_ok.is_some(),
    );
    let ready = match ready {
        Err(BenchError::Interrupted) => {
            row.fail(RowStatus::Failed, INTERRUPTED_BEFORE_THE_MOVE);
            return Ok(row);
        }
        r => r?,
    };
    let Some(before) = ready.last_ok.filter(|_| ready.bad.is_none()) else {
        let why = match ready.exited {
            Some(code) => ended_before_verifying(code, &last_line(ctx, &id)),
            None => "the workload did not verify its memory before the move".into(),
        };
        row.fail(RowStatus::Failed, &why);
        return Ok(row);
    };

    let mut cpu_before = agents_cpu_ms(ctx);
    let mut out = mig(ctx, 0, &move_args(&id, Some(mode)))?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    // A mig without `--mode` moves the one way it knows: cold.
    if !out.status.success() && mode == "cold" && stderr.contains("'--mode'") {
        cpu_before = agents_cpu_ms(ctx);
        out = mig(ctx, 0, &move_args(&id, None))?;
    }
    let cpu_after = agents_cpu_ms(ctx);
    if !out.status.success() {
        let reason = first_line(&String::from_utf8_lossy(&out.stderr));
        let status = if is_refusal(&reason) {
            RowStatus::Refused
        } else {
            RowStatus::Failed
        };
        row.fail(status, &reason);
        return Ok(row);
    }
    let result: Value = match serde_json::from_slice(&out.stdout) {
        Ok(v) => v,
        Err(e) => {
            row.fail(
                RowStatus::Failed,
                &format!("unreadable mig move --json: {e}"),
            );
            return Ok(row);
        }
    };
    row.fill_from_move(&result);
    row.agents_cpu_ms = cpu_before.zip(cpu_after).map(|(b, a)| a.saturating_sub(b));

    let after = wait_status(
        ctx,
        patience(size_mib),
        || status_on(ctx, 1, &id),
        |s| s.verified_after(before),
    );
    let after = match after {
        Err(BenchError::Interrupted) => {
            row.fail(RowStatus::Failed, INTERRUPTED_AFTER_THE_MOVE);
            return Ok(row);
        }
        r => r?,
    };
    row.verified = after.verified_after(before);
    if !row.verified {
        // Its times stay in the row, but not in the medians (a failed run).
        row.status = RowStatus::Failed;
        row.note = match (after.exited, after.bad, after.last_ok) {
            (Some(code), _, _) => format!("the workload ended on host-b after the move (exit code {code})"),
            (None, Some(n), _) => format!("memory BAD at tick {n} after the move"),
            (None, None, Some((n, p))) => format!(
                "no full verification pass after the move (before: tick {} pass {}, last: tick {n} pass {p})",
                before.0, before.1
            ),
            (None, None, None) => "no OK line on host-b after the move".into(),
        };
    }
    row.pids_kept = pids_kept(&result);
    Ok(row)
}

/// The CPU time the lab's agents' own threads have taken so far, in ms: user and system time
/// from `/proc/PID/stat`; `None` when an agent's cannot be read. Not their children's: an agent
/// reaps its shims, and a shim's children are the container's, so a committed move (the
/// source's copy ends within `mig move`) would add the workload's whole life (review of session
/// 28, H1); CRIU's restore runs under the new shim and is not the agent's child at all.
fn agents_cpu_ms(ctx: &Ctx) -> Option<u64> {
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|t| u64::try_from(t).ok())
        .filter(|&t| t > 0)?;
    let mut total = 0;
    for h in &ctx.hosts {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", h.agent_pid?)).ok()?;
        total += stat_cpu_ticks(&stat)?;
    }
    Some(total * 1000 / ticks)
}

/// utime + stime of a `/proc/PID/stat` line (fields 14 and 15; the command, field 2, is in
/// parentheses and may hold spaces).
fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // `rest` starts at field 3 (state): fields 14 and 15 are its 12th and 13th words.
    let f: Vec<&str> = rest.split_whitespace().collect();
    f.get(11..13)?
        .iter()
        .map(|w| w.parse::<i64>().ok().map(|v| v.max(0) as u64))
        .sum()
}

/// Same `ns_pid` and command for every process before and after, when the move reports both.
fn pids_kept(result: &Value) -> Option<bool> {
    let list = |key: &str| -> Option<Vec<(u64, String)>> {
        let mut v: Vec<(u64, String)> = result
            .get(key)?
            .as_array()?
            .iter()
            .map(|e| {
                (
                    e.get("ns_pid").and_then(Value::as_u64).unwrap_or(0),
                    e.get("cmd")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string(),
                )
            })
            .collect();
        v.sort();
        Some(v)
    };
    let (before, after) = (list("pid_map_before")?, list("pid_map")?);
    Some(!before.is_empty() && before == after)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_told_apart() {
        assert!(is_refusal("mig: error: unexpected argument '--mode' found"));
        assert!(is_refusal("mig: precopy refused: no dirty memory tracking"));
        assert!(is_refusal(
            "mig: --mode precopy needs soft-dirty memory tracking, which this kernel lacks"
        ));
        assert!(!is_refusal("mig: move failed: restore failed"));
    }

    /// A workload that exits at once says so, not ": " and nothing (QA of session 26).
    #[test]
    fn a_workload_without_output_says_so() {
        assert_eq!(
            ended_before_verifying(0, ""),
            "the workload ended (exit code 0) before it verified its memory: (no output)"
        );
        assert!(ended_before_verifying(1, "mig-memload: cannot map")
            .ends_with("memory: mig-memload: cannot map"));
    }

    #[test]
    fn cpu_ticks_from_a_stat_line() {
        let stat = "4242 (mi g) S 1 4242 4242 0 -1 4194560 100 0 0 0 25 7 3 2 20 0 9 0 100";
        assert_eq!(stat_cpu_ticks(stat), Some(32));
        assert_eq!(stat_cpu_ticks("4242 (migd) S 1"), None);
    }

    #[test]
    fn pid_maps_compare() {
        let v: Value = serde_json::from_str(
            r#"{"pid_map_before":[{"ns_pid":1,"host_pid":5,"cmd":"m"}],"pid_map":[{"ns_pid":1,"host_pid":9,"cmd":"m"}]}"#,
        )
        .unwrap();
        assert_eq!(pids_kept(&v), Some(true));
        let v: Value = serde_json::from_str(
            r#"{"pid_map_before":[{"ns_pid":1,"cmd":"m"}],"pid_map":[{"ns_pid":2,"cmd":"m"}]}"#,
        )
        .unwrap();
        assert_eq!(pids_kept(&v), Some(false));
        assert_eq!(pids_kept(&serde_json::json!({})), None);
    }
}
