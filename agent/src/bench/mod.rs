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
//! Results: one row per run ([`report::Row`]) to `--csv` and `--json`, a summary of medians and
//! ratios on stdout, a plot with `--plot` (SVG). Progress goes to stderr. The lab, containers,
//! runc containers and the work directory are removed at the end, also after an error or Ctrl-C.

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
    /// Memory sizes of the workload, comma-separated (whole MiB).
    #[arg(long, value_delimiter = ',', value_parser = parse_mib, default_value = "64M,256M,1G")]
    pub sizes: Vec<u64>,
    /// `mig move --mode` values, comma-separated: cold, stream, stream-nopresync, lazy, precopy,
    /// auto. `stream-nopresync` is `--mode stream --no-memory-presync` (plain stop-and-copy, to
    /// compare with `stream`). A mode the agent refuses (precopy without soft-dirty tracking) is
    /// recorded as refused, with the reason. Default: `stream`, the default of `mig move`.
    #[arg(long, value_delimiter = ',', value_parser = parse_mode, default_value = "stream")]
    pub modes: Vec<String>,
    /// Runs per size and mode.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub runs: u32,
    /// Also measure this baseline on the same workload.
    #[arg(long, value_enum)]
    pub baseline: Option<Baseline>,
    /// Write one row per run as CSV.
    #[arg(long, value_name = "FILE")]
    pub csv: Option<PathBuf>,
    /// Write the rows, the link measurements and the machine as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Plot downtime and total time against memory size (SVG).
    #[arg(long, value_name = "FILE")]
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
    /// MiB sent by each raw throughput measurement, each repeated 3 times (0: skip them).
    #[arg(long, default_value_t = 1024)]
    pub link_mib: u64,
    /// Only measure the link (raw TCP, raw QUIC, the page tunnel) and print it; no workload, no
    /// moves.
    #[arg(long)]
    pub link_only: bool,
    /// With --link-only: the QUIC variants to compare, comma-separated, each
    /// `[tunnel:]CxS[:tweak+...]` (C connections of S streams; tweaks of mig's settings:
    /// untuned, mtu=N, nomtud, initmtu=N, nogso, gso=N, ep1472, bbr, newreno, cubic=IW, ackfreq,
    /// win4x, nofair). Default: 1x1, 1x4, 2x2, tunnel:1x1.
    #[arg(long, value_delimiter = ',', value_parser = link::parse_variant)]
    pub link_variants: Vec<link::Variant>,
}

/// Errors of `mig bench move`, one variant per failing step.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("mig bench needs root")]
    NotRoot,
    #[error("no {what} next to mig: pass --{what}")]
    NoBinary { what: &'static str },
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
    #[error("cannot write {}: its directory does not exist (the bench writes its results at the end: checked before it runs)", path.display())]
    OutputDir { path: PathBuf },
    #[error("cannot draw the plot {}: {reason}", path.display())]
    Plot { path: PathBuf, reason: String },
    #[error("interrupted")]
    Interrupted,
    #[error("bench thread failed")]
    Thread,
}

fn parse_mib(s: &str) -> Result<u64, String> {
    match mig_runtime::spec::parse_size(s) {
        Some(b) if b >= 1 << 20 && b % (1 << 20) == 0 => Ok(b >> 20),
        _ => Err(format!("invalid size {s:?} (whole MiB, e.g. 64M, 1G)")),
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

/// Progress line on stderr.
pub(crate) fn progress(msg: &str) {
    eprintln!("bench: {msg}");
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

/// Runs `mig bench move`; Ctrl-C stops it after the current step and cleans up.
pub async fn run(args: BenchMoveArgs) -> Result<(), BenchError> {
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
            c = tokio::signal::ctrl_c() => {
                if c.is_ok() {
                    progress("interrupted: stopping after the current step and cleaning up");
                    stop.store(true, Ordering::SeqCst);
                }
            }
        }
    }
}

fn resolve(given: &Option<PathBuf>, name: &'static str) -> Result<PathBuf, BenchError> {
    let path = match given {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .ok()
            .map(|e| e.with_file_name(name))
            .filter(|p| p.is_file())
            .ok_or(BenchError::NoBinary { what: name })?,
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

/// The bench writes `--csv`, `--json` and `--plot` only at its end: a directory that does not
/// exist would lose the whole run (and its summary table), so it is refused first.
pub fn check_outputs(args: &BenchMoveArgs) -> Result<(), BenchError> {
    for path in [&args.csv, &args.json, &args.plot].into_iter().flatten() {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        if !dir.is_dir() {
            return Err(BenchError::OutputDir { path: path.clone() });
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
    let migd = resolve(&args.migd, "migd")?;
    let memload = match args.link_only {
        true => None,
        false => Some(resolve(&args.workload, "mig-memload")?),
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
    let mut report = BenchReport::for_this_machine();
    if args.link_only {
        link::measure_all(&ctx, args.link_mib.max(1), &args.link_variants)?;
        drop(cleanup);
        return Ok(());
    }
    for host in 0..2 {
        migrun::import_image(&ctx, host)?;
    }
    if args.link_mib > 0 {
        ctx.check_stop()?;
        report.link = link::measure(&ctx, args.link_mib)?;
    }
    let runc_ctx = match args.baseline {
        Some(Baseline::Runc) => {
            let r = runc::RuncHosts::prepare(&ctx)?;
            cleanup.runc_roots = r.roots();
            Some(r)
        }
        None => None,
    };
    for &size in &args.sizes {
        for mode in &args.modes {
            for run in 1..=args.runs {
                ctx.check_stop()?;
                let row = migrun::run(&ctx, size, mode, run)?;
                progress(&row.progress_line());
                let refused = row.status == RowStatus::Refused;
                report.rows.push(row);
                if refused {
                    break;
                }
            }
        }
        if let Some(r) = &runc_ctx {
            for run in 1..=args.runs {
                ctx.check_stop()?;
                let row = r.run(&ctx, size, run)?;
                progress(&row.progress_line());
                report.rows.push(row);
            }
        }
    }
    report.write(args)?;
    print!("{}", report.summary());
    drop(cleanup);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
