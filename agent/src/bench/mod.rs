//! `mig bench move`: the migration experiment harness.
//!
//! It builds its own two-host lab ([`crate::lab`], on its own lab name and subnet), imports an
//! image made of busybox and `mig-memload` (the self-verifying memory workload, `workload/`), and
//! for each memory size, each `mig move --mode` and each run: starts the workload on host-a, waits
//! until it verifies its memory, moves it to host-b, checks that its counter continues, that a full
//! verification pass after the move reports `OK` and that the PIDs are kept, then removes it. With
//! `--baseline runc` the same workload is measured with `runc checkpoint`, a copy of the image
//! directory over the same lab link (plain TCP between the two hosts' namespaces) and `runc
//! restore`. The link's raw TCP and QUIC throughput (mig's own TLS setup) are measured too.
//!
//! Results: one row per run ([`report::Row`]) to `--csv` (as each run ends) and `--json`, a
//! summary of medians and ratios on stdout, a plot with `--plot` (SVG). Progress goes to stderr.
//! The lab, containers, runc containers and the work directory are removed at the end, also after
//! an error or Ctrl-C.

mod link;
mod migrun;
mod plot;
mod report;
mod runc;
mod workload;

use crate::lab::{self, LabConfig, LabHost};
use clap::{Args, Subcommand, ValueEnum};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use report::CsvLog;
pub use report::{BenchReport, LinkRow, Row, RowStatus};

/// Where the work directories of bench runs live (one per lab name).
const WORK_ROOT: &str = "/var/lib/mig-bench";

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Move the memory workload between two lab hosts for each size, mode and run, and measure.
    Move(BenchMoveArgs),
}

/// A baseline measured in the same run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Baseline {
    /// `runc checkpoint` + copy over the lab link + `runc restore`.
    Runc,
}

#[derive(Debug, Args)]
pub struct BenchMoveArgs {
    /// Memory sizes of the workload, comma-separated, each with its unit and a whole number of
    /// MiB (64M, 1G; at most 1T, and at most the machine's memory), each once.
    #[arg(long, value_delimiter = ',', value_parser = parse_mib, default_value = "64M,256M,1G")]
    pub sizes: Vec<u64>,
    /// `mig move --mode` values, comma-separated, each once: cold, stream, stream-nopresync,
    /// lazy, precopy, auto. `stream-nopresync` is `--mode stream --no-memory-presync` (plain
    /// stop-and-copy, to compare with `stream`). A mode the agent refuses (precopy without
    /// soft-dirty tracking) is recorded as refused, with the reason. Default: `stream`, the
    /// default of `mig move`.
    #[arg(long, value_delimiter = ',', value_parser = parse_mode, default_value = "stream")]
    pub modes: Vec<String>,
    /// Runs per size and mode.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub runs: u32,
    /// Also measure this baseline on the same workload.
    #[arg(long, value_enum)]
    pub baseline: Option<Baseline>,
    /// Write one row per run as CSV, each as its run ends (a bench interrupted, failed or
    /// killed leaves the runs done by then).
    #[arg(long, value_name = "FILE", conflicts_with = "link_only")]
    pub csv: Option<PathBuf>,
    /// Write the rows, the link measurements and the machine as JSON (as --csv, the runs done).
    #[arg(long, value_name = "FILE", conflicts_with = "link_only")]
    pub json: Option<PathBuf>,
    /// Plot downtime and total time against memory size (SVG).
    #[arg(long, value_name = "FILE", conflicts_with = "link_only")]
    pub plot: Option<PathBuf>,
    /// Name of the bench's lab (its namespaces, state and run directories).
    #[arg(long, default_value = "mig-bench")]
    pub lab: String,
    /// First three octets of the lab's /24.
    #[arg(long, value_parser = parse_subnet, default_value = "10.79.0")]
    pub subnet: [u8; 3],
    /// The workload binary (default: mig-memload next to mig). A dynamically linked one gets its
    /// libraries copied into the image.
    #[arg(long, value_name = "PATH")]
    pub workload: Option<PathBuf>,
    /// The migd binary of the lab's agents (default: migd next to mig).
    #[arg(long, value_name = "PATH")]
    pub migd: Option<PathBuf>,
    /// MiB the workload rewrites per second (its dirty rate).
    #[arg(long, default_value_t = 1)]
    pub dirty_mib: u64,
    /// MiB sent by each raw throughput measurement, each repeated 3 times (0: skip them; else
    /// at least 4: less measures start-up, not throughput).
    #[arg(long, default_value_t = 1024, value_parser = parse_link_mib)]
    pub link_mib: u64,
    /// Only measure the link (raw TCP, raw QUIC, the page tunnel) and print it, with the CPU each
    /// transfer took (cores busy, CPU seconds per GB); no workload, no moves.
    #[arg(long)]
    pub link_only: bool,
    /// With --link-only: the QUIC variants to compare, comma-separated, each
    /// `[tunnel:|utunnel:]CxS[:tweak+...]` (C connections of S streams, raw or through the page
    /// tunnel over loopback TCP or a Unix socket; tweaks of mig's settings: untuned, mtu=N,
    /// nomtud, initmtu=N, nogso, gso=N, ep1472, bbr, newreno, cubic=IW, ackfreq, win4x, nofair,
    /// aes256). Default: 1x1, 1x4, 2x2, tunnel:1x1, utunnel:1x1.
    #[arg(long, value_delimiter = ',', value_parser = link::parse_variant, requires = "link_only")]
    pub link_variants: Vec<link::Variant>,
}

/// Errors of `mig bench move`, one variant per failing step.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("mig bench needs root")]
    NotRoot,
    #[error("no {what} next to mig: pass --{option}")]
    NoBinary {
        what: &'static str,
        option: &'static str,
    },
    #[error("{} is not there", path.display())]
    Missing {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("--baseline runc: runc is not installed")]
    NoRunc,
    #[error("cannot prepare {}", path.display())]
    Prepare {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot run `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` failed: {stderr}")]
    CommandFailed { command: String, stderr: String },
    #[error("bench lab")]
    Lab(#[source] Box<lab::LabError>),
    #[error("a lab named {lab} exists: mig bench move makes and removes a lab of its own; choose another --lab, or remove that one first (MIG_LAB={lab} mig lab down)")]
    LabExists { lab: String },
    #[error("cannot enter network namespace {netns}")]
    Netns {
        netns: String,
        #[source]
        source: io::Error,
    },
    #[error("link measurement {what}")]
    Link {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("quic measurement: {0}")]
    Quic(String),
    #[error("cannot write {}", path.display())]
    Output {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {}: its directory does not exist (checked before the bench runs)", path.display())]
    OutputDir { path: PathBuf },
    #[error("cannot write {}: it is a directory (checked before the bench runs)", path.display())]
    OutputIsDir { path: PathBuf },
    #[error("cannot write {}: it is not a regular file", path.display())]
    OutputNotFile { path: PathBuf },
    #[error("{} is given for two outputs", path.display())]
    OutputTwice { path: PathBuf },
    #[error("--plot {} would not be what its name says: the plot is SVG (name it .svg)", path.display())]
    PlotNotSvg { path: PathBuf },
    #[error("--sizes {size_mib}M does not fit twice in this machine's memory ({mem_mib} MiB): the workload holds the whole size, and both lab hosts hold a copy while it moves")]
    TooBig { size_mib: u64, mem_mib: u64 },
    #[error("--sizes {size_mib}M is given twice")]
    SizeTwice { size_mib: u64 },
    #[error("--modes {mode} is given twice")]
    ModeTwice { mode: String },
    #[error("--link-only with --link-mib 0 would measure nothing")]
    NothingToMeasure,
    #[error("{failed} of {total} runs failed (see the status and note columns)")]
    RunsFailed { failed: usize, total: usize },
    #[error("all {total} runs were refused: nothing was measured (see the note column)")]
    NothingMeasured { total: usize },
    #[error("cannot draw the plot {}: {reason}", path.display())]
    Plot { path: PathBuf, reason: String },
    #[error("interrupted")]
    Interrupted,
    #[error("bench thread failed")]
    Thread,
}

fn parse_mib(s: &str) -> Result<u64, String> {
    match mig_runtime::spec::parse_size(s) {
        Some(b) if b > 1 << 40 => Err(format!("size {s:?} is over 1T, the workload's largest")),
        Some(b) if b >= 1 << 20 && b % (1 << 20) == 0 => Ok(b >> 20),
        _ => Err(format!(
            "invalid size {s:?} (a whole number of MiB with its unit, e.g. 64M, 1G)"
        )),
    }
}

/// `--link-mib`: 0 (skip) or at least 4 (1 MiB over 4 streams printed 0 MB/s for some
/// variants: their streams sent whole MiB only; less than a few MiB measures the connection's
/// start, not its throughput).
fn parse_link_mib(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(n) if n == 0 || n >= 4 => Ok(n),
        Ok(_) => Err("0 (skip the measurement) or at least 4".into()),
        Err(_) => Err(format!("invalid number {s:?}")),
    }
}

/// A mode of `--modes`: one of `mig move --mode`, or the bench's `stream-nopresync`. Checked
/// here so that a misspelt one is refused before the lab is built, not after every size's run.
fn parse_mode(s: &str) -> Result<String, String> {
    let known = crate::migration::modes::MoveMode::value_variants()
        .iter()
        .map(|m| m.as_str())
        .chain([migrun::STREAM_NO_PRESYNC]);
    let known: Vec<&str> = known.collect();
    if known.contains(&s) {
        Ok(s.to_owned())
    } else {
        Err(format!("unknown mode {s:?} (one of {})", known.join(", ")))
    }
}

fn parse_subnet(s: &str) -> Result<[u8; 3], String> {
    let parts: Vec<Option<u8>> = s.split('.').map(|p| p.parse().ok()).collect();
    match parts.as_slice() {
        [Some(a), Some(b), Some(c)] => Ok([*a, *b, *c]),
        _ => Err(format!("invalid subnet {s:?} (three octets, e.g. 10.79.0)")),
    }
}

/// Everything a run needs: the lab's hosts, binaries, directories, options.
pub(crate) struct Ctx {
    pub mig: PathBuf,
    pub hosts: Vec<LabHost>,
    pub work: PathBuf,
    pub rootfs: PathBuf,
    pub dirty_mib: u64,
    pub stop: Arc<AtomicBool>,
}

impl Ctx {
    pub fn check_stop(&self) -> Result<(), BenchError> {
        if self.stop.load(Ordering::SeqCst) {
            Err(BenchError::Interrupted)
        } else {
            Ok(())
        }
    }

    /// Sleeps `d` unless interrupted.
    pub fn sleep(&self, d: Duration) -> Result<(), BenchError> {
        self.check_stop()?;
        std::thread::sleep(d);
        self.check_stop()
    }
}

/// Results on stdout (lost, not a panic, when stdout is a closed pipe: `| head`).
pub(crate) fn to_stdout(text: &str) {
    use std::io::Write;
    let _ = io::stdout().write_all(text.as_bytes());
}

/// Progress line on stderr (lost, not a panic, when stderr is a closed pipe).
pub(crate) fn progress(msg: &str) {
    use std::io::Write;
    let _ = writeln!(io::stderr(), "bench: {msg}");
}

/// Deletes the runc baseline's containers that a bench of lab `lab` killed before its cleanup
/// left, and that bench's work directory (`mig lab down` and the next bench call it: QA of
/// session 25 found the baseline container still running, and a rerun removed the directory
/// runc needed to find it). Returns what it removed, for a report.
pub fn remove_runc_leftovers(lab: &str) -> Option<PathBuf> {
    if lab.is_empty() || lab.contains('/') || lab.starts_with('.') {
        return None;
    }
    let work = Path::new(WORK_ROOT).join(lab);
    if !work.is_dir() {
        return None;
    }
    for host in ["root-a", "root-b"] {
        runc::delete_all(&work.join("runc").join(host));
    }
    Some(work)
}

/// Removes what a bench made, whatever happens: runc containers, the lab, the work directory.
struct Cleanup {
    lab: String,
    work: PathBuf,
    runc_roots: Vec<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for root in &self.runc_roots {
            runc::delete_all(root);
        }
        match lab::down(&self.lab) {
            Ok(r) if !r.is_clean() => progress(&format!("lab {} cleanup problems: {r}", self.lab)),
            Ok(_) => {}
            Err(e) => progress(&format!("lab {} cleanup failed: {e}", self.lab)),
        }
        if let Err(e) = std::fs::remove_dir_all(&self.work) {
            if e.kind() != io::ErrorKind::NotFound {
                progress(&format!("cannot remove {}: {e}", self.work.display()));
            }
        }
    }
}

/// Runs `mig bench move`; Ctrl-C (SIGINT), SIGTERM and SIGHUP stop it after the current step,
/// write what was measured and clean up. A signal ignored as mig started stays ignored (`nohup
/// mig bench ...` goes on after the terminal closes, as it did before SIGHUP was handled).
pub async fn run(args: BenchMoveArgs) -> Result<(), BenchError> {
    use tokio::signal::unix::{signal, Signal, SignalKind};
    let handler = |kind: SignalKind| -> Result<Option<Signal>, BenchError> {
        if crate::cli::ignored_at_start(kind.as_raw_value()) {
            return Ok(None);
        }
        signal(kind).map(Some).map_err(|source| BenchError::Spawn {
            command: "signal handler".into(),
            source,
        })
    };
    let (mut int, mut term, mut hup) = (
        handler(SignalKind::interrupt())?,
        handler(SignalKind::terminate())?,
        handler(SignalKind::hangup())?,
    );
    async fn next(s: &mut Option<Signal>) {
        if let Some(s) = s {
            if s.recv().await.is_some() {
                return;
            }
        }
        std::future::pending().await
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = tokio::sync::oneshot::channel();
    let s = stop.clone();
    std::thread::Builder::new()
        .name("bench".into())
        .spawn(move || {
            let _ = tx.send(run_blocking(&args, s));
        })
        .map_err(|source| BenchError::Spawn {
            command: "bench thread".into(),
            source,
        })?;
    let mut rx = rx;
    loop {
        tokio::select! {
            r = &mut rx => return r.map_err(|_| BenchError::Thread)?,
            () = next(&mut int) => interrupted(&stop, "SIGINT"),
            () = next(&mut term) => interrupted(&stop, "SIGTERM"),
            () = next(&mut hup) => interrupted(&stop, "SIGHUP"),
        }
    }
}

fn interrupted(stop: &AtomicBool, signal: &str) {
    progress(&format!(
        "{signal}: stopping after the current step, writing the runs done and cleaning up"
    ));
    stop.store(true, Ordering::SeqCst);
}

/// The binary `name` (`option` given, else next to mig).
fn resolve(
    given: &Option<PathBuf>,
    name: &'static str,
    option: &'static str,
) -> Result<PathBuf, BenchError> {
    let path = match given {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .ok()
            .map(|e| e.with_file_name(name))
            .filter(|p| p.is_file())
            .ok_or(BenchError::NoBinary { what: name, option })?,
    };
    std::fs::metadata(&path).map_err(|source| BenchError::Missing {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

/// The bench's lab name must be a plain lab name (it names `/var/lib/mig-bench/<lab>`, which the
/// bench removes: `--lab ..` would be `/var/lib`) and must not name an existing lab (the bench's
/// cleanup takes its lab down, containers and all).
pub fn check_lab(lab: &str) -> Result<(), BenchError> {
    lab::validate_name(lab).map_err(|e| BenchError::Lab(Box::new(e)))?;
    if lab::lab_file_path(lab).exists() {
        return Err(BenchError::LabExists {
            lab: lab.to_owned(),
        });
    }
    Ok(())
}

/// The bench writes `--json` and `--plot` at its end, and `--csv` from its first run on: a path
/// that cannot be written (no such directory, a directory, a file system that refuses it) would
/// be found only after the lab was built or the whole run, so each is created (and removed again
/// when it was not there) first. An existing file is replaced, without a word (a rerun into the
/// same path is the usual case).
pub fn check_outputs(args: &BenchMoveArgs) -> Result<(), BenchError> {
    // QA of session 23: `--plot x.png` wrote SVG into x.png.
    if let Some(p) = &args.plot {
        let ext = p
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase());
        if ext.is_some_and(|e| e != "svg") {
            return Err(BenchError::PlotNotSvg { path: p.clone() });
        }
    }
    for path in [&args.csv, &args.json, &args.plot].into_iter().flatten() {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        if !dir.is_dir() {
            return Err(BenchError::OutputDir { path: path.clone() });
        }
        if path.is_dir() {
            return Err(BenchError::OutputIsDir { path: path.clone() });
        }
        // A FIFO would block the check (and a device take the results); a dangling symlink
        // is kept, not removed after the check made its target.
        let existed = path.symlink_metadata().is_ok();
        if path.metadata().is_ok_and(|m| !m.is_file()) {
            return Err(BenchError::OutputNotFile { path: path.clone() });
        }
        let given = [&args.csv, &args.json, &args.plot];
        if given.into_iter().flatten().filter(|p| *p == path).count() > 1 {
            return Err(BenchError::OutputTwice { path: path.clone() });
        }
        std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .map_err(|source| BenchError::Output {
                path: path.clone(),
                source,
            })?;
        if !existed {
            let _ = std::fs::remove_file(path);
        }
    }
    Ok(())
}

/// Each size once, none whose workload and its copy (both lab hosts are this machine, and hold
/// one each while a move runs) would not fit in this machine's memory.
fn check_sizes(sizes: &[u64]) -> Result<(), BenchError> {
    let mem_mib = crate::daemon::mem_total_bytes().map(|b| b >> 20);
    for (i, &size_mib) in sizes.iter().enumerate() {
        if sizes[..i].contains(&size_mib) {
            return Err(BenchError::SizeTwice { size_mib });
        }
        if let Some(mem_mib) = mem_mib.filter(|&m| size_mib.saturating_mul(2) > m) {
            return Err(BenchError::TooBig { size_mib, mem_mib });
        }
    }
    Ok(())
}

/// Each mode once: a mode given twice ran twice under the same run numbers, so two rows had the
/// same (size, mode, run) and the summary counted "2/2" for `--runs 1` (QA of session 26).
fn check_modes(modes: &[String]) -> Result<(), BenchError> {
    for (i, mode) in modes.iter().enumerate() {
        if modes[..i].contains(mode) {
            return Err(BenchError::ModeTwice { mode: mode.clone() });
        }
    }
    Ok(())
}

fn run_blocking(args: &BenchMoveArgs, stop: Arc<AtomicBool>) -> Result<(), BenchError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(BenchError::NotRoot);
    }
    check_lab(&args.lab)?;
    check_outputs(args)?;
    if !args.link_only {
        check_sizes(&args.sizes)?;
        check_modes(&args.modes)?;
    }
    if args.link_only && args.link_mib == 0 {
        return Err(BenchError::NothingToMeasure);
    }
    let migd = resolve(&args.migd, "migd", "migd")?;
    let memload = match args.link_only {
        true => None,
        false => Some(resolve(&args.workload, "mig-memload", "workload")?),
    };
    let mig = std::env::current_exe().map_err(|source| BenchError::Missing {
        path: PathBuf::from("/proc/self/exe"),
        source,
    })?;
    if args.baseline == Some(Baseline::Runc) && !runc::installed() {
        return Err(BenchError::NoRunc);
    }
    let work = Path::new(WORK_ROOT).join(&args.lab);
    let mut cleanup = Cleanup {
        lab: args.lab.clone(),
        work: work.clone(),
        runc_roots: Vec::new(),
    };
    if work.exists() {
        // A bench killed before its cleanup (SIGKILL) may have left its runc baseline running.
        remove_runc_leftovers(&args.lab);
        std::fs::remove_dir_all(&work).map_err(|source| BenchError::Prepare {
            path: work.clone(),
            source,
        })?;
    }
    let rootfs = match &memload {
        Some(memload) => workload::build_rootfs(&work, memload)?,
        None => work.clone(),
    };

    progress(&format!(
        "lab {} up on {}.{}.{}.0/24",
        args.lab, args.subnet[0], args.subnet[1], args.subnet[2]
    ));
    let mut cfg = LabConfig::new(&args.lab, 2, migd);
    cfg.subnet_base = args.subnet;
    cfg.extra_agent_args = vec!["--listen".into(), "{addr}:{port}".into()];
    let hosts = lab::up(&cfg).map_err(|e| BenchError::Lab(Box::new(e)))?;
    let ctx = Ctx {
        mig,
        hosts,
        work: work.clone(),
        rootfs,
        dirty_mib: args.dirty_mib,
        stop,
    };
    // A stop interrupts the commands under way too (a terminal's Ctrl-C reaches them): their
    // failure is the stop's.
    let stop_first = |e: BenchError| match ctx.check_stop() {
        Err(stopped) => stopped,
        Ok(()) => e,
    };
    if args.link_only {
        let measured = link::measure_all(&ctx, args.link_mib, &args.link_variants);
        drop(cleanup);
        return measured.map(drop).map_err(stop_first);
    }
    let mut report = BenchReport::for_this_machine();
    let mut csv = args.csv.as_deref().map(CsvLog::create);
    let measured = measure(args, &ctx, &mut cleanup, &mut report, csv.as_mut()).map_err(stop_first);
    if let Err(e) = &measured {
        report.stopped = Some(e.to_string());
    }
    // Whatever stopped the bench, the runs done so far are written and summed up, none too
    // (QA of session 23: a bench stopped before its first run wrote no file at all).
    let written = {
        let w = report.write(args, csv.as_ref().is_some_and(CsvLog::is_whole));
        to_stdout(&report.summary());
        if let Err(e) = &measured {
            let link = match report.link.len() {
                0 => String::new(),
                n => format!(" and the {n} link measurement(s)"),
            };
            match &w {
                Ok(()) => progress(&format!(
                    "stopped early ({e}): the files and the summary have the {} run(s){link} done before",
                    report.rows.len()
                )),
                Err(we) => progress(&format!(
                    "stopped early ({e}), and the runs done could not all be written: {we}"
                )),
            }
        }
        w
    };
    drop(cleanup);
    measured?;
    written?;
    let failed = report
        .rows
        .iter()
        .filter(|r| r.status == RowStatus::Failed)
        .count();
    if failed > 0 {
        return Err(BenchError::RunsFailed {
            failed,
            total: report.rows.len(),
        });
    }
    // Every run refused (a mode this kernel cannot run): nothing was measured, which a script
    // must not take for success (QA of session 25: exit 0 and an empty plot).
    if !report.rows.is_empty() && report.rows.iter().all(|r| r.status == RowStatus::Refused) {
        return Err(BenchError::NothingMeasured {
            total: report.rows.len(),
        });
    }
    Ok(())
}

/// The bench's measurements into `report` (and each run's row into `csv` as it ends): the link,
/// then each size, mode and run, then the baseline of the size. A run in flight when the bench
/// is interrupted is not recorded; a line says so, and where it was.
fn measure(
    args: &BenchMoveArgs,
    ctx: &Ctx,
    cleanup: &mut Cleanup,
    report: &mut BenchReport,
    mut csv: Option<&mut CsvLog>,
) -> Result<(), BenchError> {
    for host in 0..2 {
        migrun::import_image(ctx, host)?;
    }
    if args.link_mib > 0 {
        ctx.check_stop()?;
        link::measure(ctx, args.link_mib, &mut report.link)?;
    }
    let runc_ctx = match args.baseline {
        Some(Baseline::Runc) => {
            let r = runc::RuncHosts::prepare(ctx)?;
            cleanup.runc_roots = r.roots();
            Some(r)
        }
        None => None,
    };
    // `run` is the run named `label`; its row's status once recorded.
    let mut record = |report: &mut BenchReport,
                      label: String,
                      run: Result<Row, BenchError>|
     -> Result<RowStatus, BenchError> {
        let stopped = ctx.check_stop().is_err();
        let row = match run {
            // A failure because the bench was stopped (its wait cut short, or its commands
            // interrupted too) is not a result.
            Ok(row) if stopped && row.status == RowStatus::Failed => {
                progress(&format!(
                    "{}: interrupted, not recorded ({})",
                    row.label(),
                    row.note
                ));
                return Err(BenchError::Interrupted);
            }
            Ok(row) => row,
            Err(e) => {
                if stopped {
                    progress(&format!("{label}: interrupted, not recorded"));
                }
                return Err(e);
            }
        };
        // In the CSV before the line that says it is done.
        if let Some(csv) = csv.as_deref_mut() {
            csv.append(&row);
        }
        progress(&row.progress_line());
        let status = row.status;
        report.rows.push(row);
        Ok(status)
    };
    for &size in &args.sizes {
        for mode in &args.modes {
            for run in 1..=args.runs {
                ctx.check_stop()?;
                let label = Row::new(size, "mig", mode, run).label();
                let row = migrun::run(ctx, size, mode, run);
                if record(report, label, row)? == RowStatus::Refused {
                    break;
                }
            }
        }
        if let Some(r) = &runc_ctx {
            for run in 1..=args.runs {
                ctx.check_stop()?;
                let label = Row::new(size, "runc", "runc", run).label();
                record(report, label, r.run(ctx, size, run))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sizes the workload cannot take, and link sizes that measure nothing, are refused before
    /// the lab is built.
    #[test]
    fn sizes_are_bounded() {
        assert_eq!(parse_mib("64M"), Ok(64));
        assert_eq!(parse_mib("1T"), Ok(1 << 20));
        assert!(parse_mib("10T").unwrap_err().contains("over 1T"));
        assert!(parse_mib("16").unwrap_err().contains("with its unit"));
        assert!(check_sizes(&[64, 64]).is_err());
        assert!(matches!(
            check_sizes(&[1 << 20]),
            Err(BenchError::TooBig { .. })
        ));
        assert_eq!(parse_link_mib("0"), Ok(0));
        assert_eq!(parse_link_mib("4"), Ok(4));
        assert!(parse_link_mib("2").is_err());
    }

    /// An output that cannot be written is refused before the bench runs, and the check leaves
    /// no file behind.
    #[test]
    fn outputs_are_checked_first() {
        let tmp = tempfile::tempdir().unwrap();
        let parse = |extra: &[&str]| {
            let mut argv = vec!["bench", "move"];
            argv.extend(extra);
            use clap::Parser;
            let cli = crate::cli::Cli::try_parse_from(std::iter::once("mig").chain(argv)).unwrap();
            match cli.command {
                crate::cli::Command::Bench(BenchCommand::Move(a)) => a,
                _ => unreachable!(),
            }
        };
        let dir = tmp.path().to_str().unwrap();
        let a = parse(&["--csv", dir]);
        assert!(matches!(
            check_outputs(&a),
            Err(BenchError::OutputIsDir { .. })
        ));
        let file = tmp.path().join("r.csv");
        let a = parse(&["--csv", file.to_str().unwrap()]);
        check_outputs(&a).unwrap();
        assert!(!file.exists());
        let a = parse(&["--json", "/proc/mig-bench-test.json"]);
        assert!(matches!(check_outputs(&a), Err(BenchError::Output { .. })));
        // A FIFO would have blocked the check; one path for two outputs is refused.
        let fifo = tmp.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let a = parse(&["--csv", fifo.to_str().unwrap()]);
        assert!(matches!(
            check_outputs(&a),
            Err(BenchError::OutputNotFile { .. })
        ));
        let f = file.to_str().unwrap();
        let a = parse(&["--csv", f, "--json", f]);
        assert!(matches!(
            check_outputs(&a),
            Err(BenchError::OutputTwice { .. })
        ));
        // The plot is SVG: another extension is refused, none or .SVG taken.
        let png = tmp.path().join("plot.png");
        let a = parse(&["--plot", png.to_str().unwrap()]);
        assert!(matches!(
            check_outputs(&a),
            Err(BenchError::PlotNotSvg { .. })
        ));
        assert!(!png.exists());
        for name in ["plot", "plot.SVG"] {
            let p = tmp.path().join(name);
            check_outputs(&parse(&["--plot", p.to_str().unwrap()])).unwrap();
        }
        // A dangling symlink stays.
        let link = tmp.path().join("link.csv");
        std::os::unix::fs::symlink(tmp.path().join("target.csv"), &link).unwrap();
        check_outputs(&parse(&["--csv", link.to_str().unwrap()])).unwrap();
        assert!(link.symlink_metadata().is_ok());
    }

    /// A mode given twice is refused as a size given twice is, before the lab is built (QA of
    /// session 26: `--modes cold,stream,cold` ran cold twice under the same run numbers).
    #[test]
    fn a_mode_given_twice_is_refused_like_a_size() {
        let modes = |m: &[&str]| m.iter().map(|m| m.to_string()).collect::<Vec<_>>();
        check_modes(&modes(&["cold", "stream", "stream-nopresync", "lazy"])).unwrap();
        let e = check_modes(&modes(&["cold", "stream", "cold"])).unwrap_err();
        assert_eq!(e.to_string(), "--modes cold is given twice");
        let e = check_sizes(&[16, 16]).unwrap_err();
        assert_eq!(e.to_string(), "--sizes 16M is given twice");
    }

    #[test]
    fn modes_are_those_of_mig_move_and_stream_nopresync() {
        for m in [
            "cold",
            "stream",
            "stream-nopresync",
            "lazy",
            "precopy",
            "auto",
        ] {
            assert_eq!(parse_mode(m).as_deref(), Ok(m));
        }
        let e = parse_mode("strem").unwrap_err();
        assert!(
            e.contains("\"strem\"") && e.contains("stream-nopresync"),
            "{e}"
        );
        assert!(parse_mode("").is_err());
    }
}
