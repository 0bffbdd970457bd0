//! Bench results: one [`Row`] per run, the link measurements, CSV, JSON and the summary table.

use super::{BenchError, BenchMoveArgs};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RowStatus {
    /// Moved (or checkpointed, copied and restored).
    Ok,
    /// The mode was refused (by this mig or the agent); nothing moved.
    Refused,
    /// The move or the workload failed.
    Failed,
}

impl RowStatus {
    fn as_str(self) -> &'static str {
        match self {
            RowStatus::Ok => "ok",
            RowStatus::Refused => "refused",
            RowStatus::Failed => "failed",
        }
    }
}

/// One run. For runc, `dump_ms` is `runc checkpoint`, `transfer_ms` the copy over the link and
/// `restore_ms` `runc restore`; `freeze_ms` is not measured separately (it is inside the checkpoint).
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub size_mib: u64,
    /// `mig` or `runc`.
    pub kind: String,
    /// The `mig move --mode`, or `runc`.
    pub mode: String,
    pub run: u32,
    pub status: RowStatus,
    pub downtime_ms: Option<u64>,
    pub total_ms: Option<u64>,
    pub freeze_ms: Option<u64>,
    pub dump_ms: Option<u64>,
    pub transfer_ms: Option<u64>,
    pub restore_ms: Option<u64>,
    pub bytes: Option<u64>,
    /// `bytes` over the time pages cross the link (`transfer_ms`; `dump_ms + transfer_ms` for
    /// stream mode; for lazy mode `page_bytes` from the restore's start, when the destination's
    /// lazy-pages daemon starts fetching, to the last page), in MB/s (10^6 bytes per second).
    pub transfer_mbs: Option<f64>,
    /// The workload counted on and a whole verification pass after the move was OK.
    pub verified: bool,
    /// Same in-namespace PIDs and commands before and after (mig only).
    pub pids_kept: Option<bool>,
    /// The refusal or failure, or what did not verify. `null` in the JSON when empty, as the
    /// other columns the CSV leaves empty.
    #[serde(serialize_with = "empty_as_null")]
    pub note: String,
    /// Bytes of memory pages through the page tunnel (`stream`; `lazy`: served after the resume).
    pub page_bytes: Option<u64>,
    /// `lazy`: from Commit until the destination had the last page.
    pub postcopy_ms: Option<u64>,
    /// Inside `dump_ms`: the `criu dump` command alone.
    pub criu_dump_ms: Option<u64>,
    /// Inside `dump_ms`: hashing the image set and writing its manifest.
    pub seal_ms: Option<u64>,
    /// The pre-flight's prediction of `downtime_ms` (mig only), to judge the model against.
    pub predicted_downtime_ms: Option<u64>,
    /// Where the prediction's link throughput came from: `probe`, `previous` or `default`.
    pub throughput_source: Option<String>,
    /// The link throughput the prediction used, MiB/s.
    pub throughput_mib_s: Option<u64>,
    /// `stream`: the memory presync while the container ran (docs/migration.md "Memory
    /// presync"): its time, its bytes, and the dump's pages it spared (reused) or not (sent
    /// while frozen).
    pub presync_ms: Option<u64>,
    pub presync_bytes: Option<u64>,
    pub pages_reused: Option<u64>,
    pub pages_sent_frozen: Option<u64>,
    /// The fixed part of the prediction (`fixed_cost` of `mig move --json`): its ms, and
    /// `measured` (learned from the agent's last moves of the mode to the peer) or `default`.
    pub fixed_cost_ms: Option<u64>,
    pub fixed_cost_source: Option<String>,
    /// The CPU time both lab agents' own threads took over `mig move` (user and system: the
    /// page stream, QUIC and TLS, hashing; not CRIU's), in ms (mig only; `null` when it could
    /// not be read).
    pub agents_cpu_ms: Option<u64>,
}

/// An empty string as `null` (the JSON has `null` where the CSV is empty).
fn empty_as_null<S: serde::Serializer>(s: &str, ser: S) -> Result<S::Ok, S::Error> {
    match s.is_empty() {
        true => ser.serialize_none(),
        false => ser.serialize_str(s),
    }
}

/// CSV header; [`Row::csv`] writes the same columns.
pub const CSV_HEADER: &str = "size_mib,kind,mode,run,status,downtime_ms,total_ms,freeze_ms,dump_ms,transfer_ms,restore_ms,bytes,transfer_mbs,verified,pids_kept,note,page_bytes,postcopy_ms,criu_dump_ms,seal_ms,predicted_downtime_ms,throughput_source,throughput_mib_s,presync_ms,presync_bytes,pages_reused,pages_sent_frozen,fixed_cost_ms,fixed_cost_source,agents_cpu_ms";

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

fn csv_quote(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\"").replace('\n', " "))
    } else {
        s.to_string()
    }
}

pub fn mbs(bytes: u64, ms: u64) -> Option<f64> {
    (ms > 0).then(|| (bytes as f64 / 1e6) / (ms as f64 / 1e3))
}

impl Row {
    pub fn new(size_mib: u64, kind: &str, mode: &str, run: u32) -> Row {
        Row {
            size_mib,
            kind: kind.to_string(),
            mode: mode.to_string(),
            run,
            status: RowStatus::Ok,
            downtime_ms: None,
            total_ms: None,
            freeze_ms: None,
            dump_ms: None,
            transfer_ms: None,
            restore_ms: None,
            bytes: None,
            transfer_mbs: None,
            verified: false,
            pids_kept: None,
            note: String::new(),
            page_bytes: None,
            postcopy_ms: None,
            criu_dump_ms: None,
            seal_ms: None,
            predicted_downtime_ms: None,
            throughput_source: None,
            throughput_mib_s: None,
            presync_ms: None,
            presync_bytes: None,
            pages_reused: None,
            pages_sent_frozen: None,
            fixed_cost_ms: None,
            fixed_cost_source: None,
            agents_cpu_ms: None,
        }
    }

    pub fn fail(&mut self, status: RowStatus, note: &str) {
        self.status = status;
        self.verified = false;
        self.note = note.to_string();
    }

    /// Takes the timings of `mig move --json`.
    pub fn fill_from_move(&mut self, v: &Value) {
        let n = |k: &str| v.get(k).and_then(Value::as_u64);
        self.downtime_ms = n("downtime_ms");
        self.total_ms = n("total_ms");
        self.freeze_ms = n("freeze_ms");
        self.dump_ms = n("dump_ms");
        self.transfer_ms = n("transfer_ms");
        self.restore_ms = n("restore_ms");
        self.bytes = n("bytes_sent");
        self.page_bytes = n("page_bytes");
        self.postcopy_ms = n("postcopy_ms");
        self.criu_dump_ms = n("criu_dump_ms");
        self.seal_ms = n("seal_ms");
        self.predicted_downtime_ms = n("predicted_downtime_ms");
        self.throughput_source = v
            .get("throughput_source")
            .and_then(Value::as_str)
            .map(str::to_owned);
        self.throughput_mib_s = n("throughput_bytes_s").map(|b| b >> 20);
        if let Some(p) = v.get("memory_presync").filter(|p| p.is_object()) {
            let n = |k: &str| p.get(k).and_then(Value::as_u64);
            self.presync_ms = n("ms");
            self.presync_bytes = n("bytes");
            self.pages_reused = n("pages_reused");
            self.pages_sent_frozen = n("pages_sent_frozen");
        }
        if let Some(f) = v.get("fixed_cost").filter(|f| f.is_object()) {
            self.fixed_cost_ms = f.get("ms").and_then(Value::as_u64);
            self.fixed_cost_source = f.get("source").and_then(Value::as_str).map(str::to_owned);
        }
        let asked = self.mode.strip_suffix("-nopresync").unwrap_or(&self.mode);
        let reported = v.get("mode").and_then(Value::as_str);
        // The time pages cross the link, by the mode the agent used (`auto` picks one): the
        // transfer phase for cold mode, the memory presync for stream mode with one (the pages
        // left for the freeze are few), else dump and transfer (pages go while CRIU dumps), the
        // lazy mode's pages (page_bytes), which the destination's daemon fetches from the
        // restore on: the rest of the downtime after the transfer phase, and the post-copy
        // (counting the post-copy alone gave a lazy move of 64 MiB 6106 MB/s, QA of session 23).
        let (bytes, page_ms) = match reported.unwrap_or(asked) {
            "lazy" => {
                let before_restore = [self.freeze_ms, self.dump_ms, self.transfer_ms]
                    .iter()
                    .map(|m| m.unwrap_or(0))
                    .sum::<u64>();
                let restore_to_resume = self
                    .downtime_ms
                    .map(|d| d.saturating_sub(before_restore))
                    .or(self.restore_ms)
                    .unwrap_or(0);
                (
                    self.page_bytes,
                    self.postcopy_ms.map(|p| p + restore_to_resume),
                )
            }
            "stream" if self.presync_bytes.is_some_and(|b| b > 0) => {
                (self.presync_bytes, self.presync_ms)
            }
            "stream" => (
                self.bytes,
                self.dump_ms.zip(self.transfer_ms).map(|(d, t)| d + t),
            ),
            _ => (self.bytes, self.transfer_ms),
        };
        if let (Some(b), Some(t)) = (bytes.filter(|b| *b > 0), page_ms) {
            self.transfer_mbs = mbs(b, t);
        }
        if let Some(m) = reported {
            if m != asked {
                self.note = format!("the agent reported mode {m}");
            }
        }
    }

    pub fn csv(&self) -> String {
        [
            self.size_mib.to_string(),
            csv_quote(&self.kind),
            csv_quote(&self.mode),
            self.run.to_string(),
            self.status.as_str().to_string(),
            opt(self.downtime_ms),
            opt(self.total_ms),
            opt(self.freeze_ms),
            opt(self.dump_ms),
            opt(self.transfer_ms),
            opt(self.restore_ms),
            opt(self.bytes),
            opt(self.transfer_mbs.map(|t| format!("{t:.1}"))),
            self.verified.to_string(),
            opt(self.pids_kept),
            csv_quote(&self.note),
            opt(self.page_bytes),
            opt(self.postcopy_ms),
            opt(self.criu_dump_ms),
            opt(self.seal_ms),
            opt(self.predicted_downtime_ms),
            opt(self.throughput_source.as_deref().map(csv_quote)),
            opt(self.throughput_mib_s),
            opt(self.presync_ms),
            opt(self.presync_bytes),
            opt(self.pages_reused),
            opt(self.pages_sent_frozen),
            opt(self.fixed_cost_ms),
            opt(self.fixed_cost_source.as_deref().map(csv_quote)),
            opt(self.agents_cpu_ms),
        ]
        .join(",")
    }

    /// The run's name in progress lines: `64 MiB, mig lazy, run 1`.
    pub fn label(&self) -> String {
        let what = if self.kind == self.mode {
            self.kind.clone()
        } else {
            format!("{} {}", self.kind, self.mode)
        };
        format!("{} MiB, {what}, run {}", self.size_mib, self.run)
    }

    pub fn progress_line(&self) -> String {
        let mut s = format!("{}: {}", self.label(), self.status.as_str());
        if let (Some(d), Some(t)) = (self.downtime_ms, self.total_ms) {
            let _ = write!(s, ", downtime {d} ms, total {t} ms");
        }
        if let Some(p) = self.predicted_downtime_ms {
            let _ = write!(s, ", predicted {p} ms");
            if let (Some(src), Some(l)) = (&self.throughput_source, self.throughput_mib_s) {
                let _ = write!(s, " (link {l} MiB/s, {src})");
            }
        }
        if self.status == RowStatus::Ok {
            let _ = write!(s, ", verified {}", self.verified);
        }
        if !self.note.is_empty() {
            let _ = write!(s, " ({})", self.note);
        }
        s
    }
}

/// `--csv` written as the bench goes: the header, then each row as its run ends, so that a bench
/// killed with SIGKILL (no cleanup, no end-of-bench write) keeps the runs it finished (QA of
/// session 26 found no file at all). After a failed write the whole file waits for the end.
pub struct CsvLog {
    path: PathBuf,
    file: Option<File>,
}

impl CsvLog {
    /// Truncates `path` (a rerun into the same path replaces it) and writes the header.
    pub fn create(path: &Path) -> CsvLog {
        let mut log = CsvLog {
            path: path.to_path_buf(),
            file: None,
        };
        let file = File::create(path);
        log.file = log.written(file.and_then(|mut f| {
            f.write_all(format!("{CSV_HEADER}\n").as_bytes())?;
            Ok(f)
        }));
        log
    }

    /// Appends `row`: one write of the whole line, so a kill leaves whole lines.
    pub fn append(&mut self, row: &Row) {
        if let Some(mut f) = self.file.take() {
            let line = format!("{}\n", row.csv());
            let w = f.write_all(line.as_bytes()).and_then(|()| f.flush());
            self.file = self.written(w.map(|()| f));
        }
    }

    /// Whether every row so far is in the file (else it is written whole at the end).
    pub fn is_whole(&self) -> bool {
        self.file.is_some()
    }

    fn written(&self, w: io::Result<File>) -> Option<File> {
        w.map_err(|e| {
            super::progress(&format!(
                "cannot write {}: {e} (tried again at the end)",
                self.path.display()
            ))
        })
        .ok()
    }
}

/// A raw throughput measurement between the two lab hosts.
#[derive(Debug, Clone, Serialize)]
pub struct LinkRow {
    /// `tcp` or `quic`.
    pub proto: String,
    pub bytes: u64,
    pub ms: u64,
    pub mbs: f64,
    /// CPU time (user and system) the bench process spent over the transfer, in which both
    /// ends run; None where it could not be read.
    pub cpu_ms: Option<u64>,
}

impl LinkRow {
    /// What was measured, for people: `raw tcp between the lab hosts`.
    pub fn what(&self) -> String {
        match self.proto.as_str() {
            // Tunnel variants' names say so; the others are raw.
            p if p.contains("tunnel") => format!("{p} between the lab hosts"),
            p => format!("raw {p} between the lab hosts"),
        }
    }

    /// CPU seconds the transfer spent per 10^9 bytes moved.
    pub fn cpu_s_per_gb(&self) -> Option<f64> {
        let cpu = self.cpu_ms? as f64 / 1e3;
        (self.bytes > 0).then(|| cpu / (self.bytes as f64 / 1e9))
    }
}

/// Everything one bench writes.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub command: String,
    pub machine: BTreeMap<String, String>,
    pub link: Vec<LinkRow>,
    pub rows: Vec<Row>,
    /// Why the bench stopped before its last run (interrupted, a lab failure), if it did.
    pub stopped: Option<String>,
}

fn command_output(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.lines().next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_default()
}

impl BenchReport {
    pub fn for_this_machine() -> BenchReport {
        let mut machine = BTreeMap::new();
        machine.insert("mig".into(), env!("CARGO_PKG_VERSION").into());
        machine.insert("kernel".into(), command_output("uname", &["-r"]));
        machine.insert("cpus".into(), command_output("nproc", &[]));
        machine.insert("criu".into(), command_output("criu", &["--version"]));
        machine.insert("runc".into(), command_output("runc", &["--version"]));
        let mem = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        machine.insert(
            "memory".into(),
            mem.lines().next().unwrap_or("").to_string(),
        );
        BenchReport {
            command: std::env::args().collect::<Vec<_>>().join(" "),
            machine,
            link: Vec::new(),
            rows: Vec::new(),
            stopped: None,
        }
    }

    pub fn csv(&self) -> String {
        let mut s = format!("{CSV_HEADER}\n");
        for r in &self.rows {
            s.push_str(&r.csv());
            s.push('\n');
        }
        s
    }

    /// Writes `--csv` (unless `csv_whole`: a [`CsvLog`] has every row), `--json` and `--plot`:
    /// each that can be, whatever happens to the others; the first failure, if any.
    pub fn write(&self, args: &BenchMoveArgs, csv_whole: bool) -> Result<(), BenchError> {
        let write = |path: &Path, text: String| {
            std::fs::write(path, text).map_err(|source| BenchError::Output {
                path: path.to_path_buf(),
                source,
            })
        };
        let mut results = Vec::new();
        if let Some(p) = args.csv.as_ref().filter(|_| !csv_whole) {
            results.push(write(p, self.csv()));
        }
        if let Some(p) = &args.json {
            let text = serde_json::to_string_pretty(self).unwrap_or_else(|_| "null".into());
            results.push(write(p, text + "\n"));
        }
        if let Some(p) = &args.plot {
            if self.rows.is_empty() {
                super::progress(&format!("no run was done: no plot in {}", p.display()));
            } else if self.rows.iter().all(|r| r.status == RowStatus::Refused) {
                super::progress(&format!(
                    "every run was refused: no plot in {}",
                    p.display()
                ));
            } else {
                results.push(super::plot::draw(self, p));
            }
        }
        for e in results.iter().filter_map(|r| r.as_ref().err()).skip(1) {
            super::progress(&e.to_string());
        }
        results.into_iter().collect()
    }

    /// Median of `f` over the verified rows of (`size`, `mode`).
    pub fn median(&self, size: u64, mode: &str, f: impl Fn(&Row) -> Option<f64>) -> Option<f64> {
        let mut v: Vec<f64> = self
            .rows
            .iter()
            .filter(|r| r.size_mib == size && r.mode == mode && r.status == RowStatus::Ok)
            .filter_map(&f)
            .collect();
        median(&mut v)
    }

    /// The modes in the order they were run.
    pub fn modes(&self) -> Vec<String> {
        let mut modes: Vec<String> = Vec::new();
        for r in &self.rows {
            if !modes.contains(&r.mode) {
                modes.push(r.mode.clone());
            }
        }
        modes
    }

    pub fn sizes(&self) -> Vec<u64> {
        let mut s: Vec<u64> = self.rows.iter().map(|r| r.size_mib).collect();
        s.sort_unstable();
        s.dedup();
        s
    }

    /// The link's protocols in the order they were measured.
    fn link_protos(&self) -> Vec<&str> {
        let mut protos: Vec<&str> = Vec::new();
        for l in &self.link {
            if !protos.contains(&l.proto.as_str()) {
                protos.push(&l.proto);
            }
        }
        protos
    }

    /// The median throughput of the raw measurements of `proto`.
    fn link_mbs(&self, proto: &str) -> Option<f64> {
        let mut v: Vec<f64> = self
            .link
            .iter()
            .filter(|l| l.proto == proto)
            .map(|l| l.mbs)
            .collect();
        median(&mut v)
    }

    /// The summary's line for the raw measurements of `proto`: their median, each, and the
    /// median CPU cost per GB.
    fn link_line(&self, proto: &str) -> String {
        let mut each: Vec<&LinkRow> = self.link.iter().filter(|l| l.proto == proto).collect();
        each.sort_by(|a, b| a.mbs.total_cmp(&b.mbs));
        let m = self.link_mbs(proto).unwrap_or(0.0);
        let mib = each.first().map_or(0, |l| l.bytes >> 20);
        let mut cpu: Vec<f64> = each.iter().filter_map(|l| l.cpu_s_per_gb()).collect();
        let cpu = median(&mut cpu)
            .map(|c| format!(", {c:.2} CPU-s per GB"))
            .unwrap_or_default();
        let what = each.first().map(|l| l.what()).unwrap_or_default();
        match each.as_slice() {
            [one] => format!("{what}: {m:.0} MB/s ({mib} MiB in {} ms){cpu}", one.ms),
            _ => {
                let list: Vec<String> = each.iter().map(|l| format!("{:.0}", l.mbs)).collect();
                format!(
                    "{what}: {m:.0} MB/s (median of {} measurements of {mib} MiB: {} MB/s){cpu}",
                    each.len(),
                    list.join(", ")
                )
            }
        }
    }

    /// The summary table: medians per size and mode, and the ratios the targets are stated in.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        for proto in self.link_protos() {
            let _ = writeln!(s, "{}", self.link_line(proto));
        }
        let _ = writeln!(
            s,
            "{:>8} {:<16} {:>5} {:>11} {:>9} {:>8} {:>9} {:>9} {:>8} {:>8} {:>8} {:>9}",
            "SIZE",
            "MODE",
            "OK",
            "DOWNTIME",
            "TOTAL",
            "DUMP",
            "TRANSFER",
            "MB/S",
            "/RUNC",
            "/COLD",
            "/TCP",
            "AGENT-CPU"
        );
        let tcp = self.link_mbs("tcp");
        let ms = |v: Option<f64>| v.map(|v| format!("{v:.0} ms")).unwrap_or("-".into());
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
            _ => "-".into(),
        };
        for size in self.sizes() {
            let runc = self.median(size, "runc", |r| r.downtime_ms.map(|v| v as f64));
            let cold = self.median(size, "cold", |r| r.downtime_ms.map(|v| v as f64));
            for mode in self.modes() {
                let rows: Vec<&Row> = self
                    .rows
                    .iter()
                    .filter(|r| r.size_mib == size && r.mode == mode)
                    .collect();
                if rows.is_empty() {
                    continue;
                }
                let ok = rows.iter().filter(|r| r.verified).count();
                if rows.iter().all(|r| r.status == RowStatus::Refused) {
                    let _ = writeln!(s, "{:>4} MiB {:<16} refused: {}", size, mode, rows[0].note);
                    continue;
                }
                let down = self.median(size, &mode, |r| r.downtime_ms.map(|v| v as f64));
                let total = self.median(size, &mode, |r| r.total_ms.map(|v| v as f64));
                let dump = self.median(size, &mode, |r| r.dump_ms.map(|v| v as f64));
                let xfer = self.median(size, &mode, |r| r.transfer_ms.map(|v| v as f64));
                let thr = self.median(size, &mode, |r| r.transfer_mbs);
                let cpu = self.median(size, &mode, |r| r.agents_cpu_ms.map(|v| v as f64));
                let _ =
                    writeln!(
                    s,
                    "{:>4} MiB {:<16} {:>2}/{:<2} {:>11} {:>9} {:>8} {:>9} {:>9} {:>8} {:>8} {:>8} {:>9}",
                    size,
                    mode,
                    ok,
                    rows.len(),
                    ms(down),
                    ms(total),
                    ms(dump),
                    ms(xfer),
                    thr.map(|t| format!("{t:.0}")).unwrap_or("-".into()),
                    if mode == "runc" { "-".into() } else { ratio(down, runc) },
                    if mode == "runc" || mode == "cold" {
                        "-".into()
                    } else {
                        ratio(down, cold)
                    },
                    ratio(thr, tcp),
                    ms(cpu),
                );
            }
        }
        s.push_str(
            "DOWNTIME, TOTAL, DUMP, TRANSFER: medians of the runs that completed; MB/S: the bytes \
             sent over the time they crossed the link (cold: all bytes over the transfer; stream: \
             the presync's bytes over the memory presync, or all bytes over dump + transfer without \
             one; lazy: the page bytes over the restore and the post-copy; runc: the image \
             directory over the copy); /RUNC: downtime over runc's for the same size; /COLD: over \
             cold mode's; /TCP: MB/S over the raw TCP throughput of the same link (its median); \
             AGENT-CPU: the CPU time both agents' own threads took over `mig move` (not CRIU's)\n",
        );
        s
    }
}

pub fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&mut []), None);
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }

    fn report() -> BenchReport {
        BenchReport {
            command: "test".into(),
            machine: Default::default(),
            link: Vec::new(),
            rows: Vec::new(),
            stopped: None,
        }
    }

    fn sample(proto: &str, mbs: f64) -> LinkRow {
        LinkRow {
            proto: proto.into(),
            bytes: 64 << 20,
            ms: (67.108864 / mbs * 1e3) as u64,
            mbs,
            cpu_ms: Some(100),
        }
    }

    /// The JSON has `null` where the CSV is empty, the note too (QA of session 26: `""`).
    #[test]
    fn an_empty_note_is_null_in_the_json() {
        let mut r = Row::new(16, "mig", "cold", 1);
        let json = serde_json::to_value(&r).unwrap();
        assert!(
            json["note"].is_null() && json["downtime_ms"].is_null(),
            "{json}"
        );
        r.note = "refused".into();
        assert_eq!(serde_json::to_value(&r).unwrap()["note"], "refused");
    }

    /// The JSON keeps every raw link measurement (docs: one entry per raw measurement; QA of
    /// sessions 25 and 26 found the median alone); the summary and /TCP take their median, and
    /// the summary gives their median CPU cost.
    #[test]
    fn the_json_keeps_each_link_measurement_and_the_summary_their_median() {
        let mut report = report();
        for (proto, mbs) in [
            ("tcp", 404.0),
            ("tcp", 559.0),
            ("tcp", 528.0),
            ("quic", 300.0),
            ("quic", 350.0),
            ("quic", 320.0),
        ] {
            report.link.push(sample(proto, mbs));
        }
        let mut r = Row::new(16, "mig", "stream", 1);
        r.status = RowStatus::Ok;
        r.verified = true;
        r.downtime_ms = Some(100);
        r.transfer_mbs = Some(264.2);
        report.rows.push(r);
        let json = serde_json::to_value(&report).unwrap();
        let link = json["link"].as_array().unwrap();
        assert_eq!(link.len(), 6);
        assert_eq!(link[1]["proto"], "tcp");
        assert_eq!(link[1]["mbs"], 559.0);
        assert_eq!(link[1]["bytes"], 64 << 20);
        let summary = report.summary();
        assert!(
            summary.contains(
                "raw tcp between the lab hosts: 528 MB/s (median of 3 measurements of 64 MiB: 404, 528, 559 MB/s), 1.49 CPU-s per GB\n\
                 raw quic between the lab hosts: 320 MB/s"
            ),
            "{summary}"
        );
        // /TCP: 264.2 over the median, 528 (then AGENT-CPU, not measured here).
        assert!(summary.contains(" 0.50         -\n"), "{summary}");
        // Two measurements (a bench stopped during the third): their mean; one: itself.
        report.link.truncate(2);
        assert_eq!(report.link_mbs("tcp"), Some(481.5));
        report.link.truncate(1);
        assert!(report.summary().contains(
            "raw tcp between the lab hosts: 404 MB/s (64 MiB in 166 ms), 1.49 CPU-s per GB\n"
        ));
    }

    /// The footnote says what MB/S divides for each mode: all bytes sent, except lazy's page
    /// bytes and a stream presync's bytes (QA of session 26: "the page bytes" for every mode).
    #[test]
    fn the_summary_says_which_bytes_mb_s_counts() {
        let s = report().summary();
        assert!(s.contains("MB/S: the bytes sent over the time they crossed the link (cold: all bytes over the transfer;"), "{s}");
        assert!(s.contains("lazy: the page bytes over the restore and the post-copy; runc: the image directory over the copy)"), "{s}");
        assert!(!s.contains("MB/S: the page bytes"), "{s}");
    }

    /// The CSV as the bench goes holds whole lines, the same as the CSV written at the end.
    #[test]
    fn the_csv_log_has_each_row_as_it_ends() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.csv");
        std::fs::write(&path, "an older bench's rows\n".repeat(100)).unwrap();
        let mut log = CsvLog::create(&path);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{CSV_HEADER}\n")
        );
        let mut report = report();
        for run in 1..=2 {
            let mut r = Row::new(16, "mig", "cold", run);
            r.note = "a, \"b\"".into();
            log.append(&r);
            report.rows.push(r);
            assert_eq!(std::fs::read_to_string(&path).unwrap(), report.csv());
        }
        assert!(log.is_whole());
        // A file that cannot be written: nothing is whole, the end writes it all.
        let log = CsvLog::create(Path::new("/proc/mig-bench-test.csv"));
        assert!(!log.is_whole());
    }

    #[test]
    fn csv_rows_have_every_column() {
        let mut r = Row::new(16, "mig", "cold", 1);
        r.fill_from_move(&serde_json::json!({
            "downtime_ms": 300, "total_ms": 500, "freeze_ms": 5, "dump_ms": 100,
            "transfer_ms": 50, "restore_ms": 140, "bytes_sent": 50_000_000, "mode": "cold"
        }));
        r.verified = true;
        r.note = "a, \"b\"".into();
        let line = r.csv();
        assert_eq!(
            line,
            "16,mig,cold,1,ok,300,500,5,100,50,140,50000000,1000.0,true,,\"a, \"\"b\"\"\",,,,,,,,,,,,,,"
        );
        assert_eq!(CSV_HEADER.split(',').count(), 30);
    }

    /// From the restore (the daemon starts fetching) to the last page: 300 ms of downtime less
    /// 150 before the restore, plus 350 of post-copy.
    #[test]
    fn lazy_throughput_is_page_bytes_from_the_restore_to_the_last_page() {
        let mut r = Row::new(16, "mig", "lazy", 1);
        r.fill_from_move(&serde_json::json!({
            "downtime_ms": 300, "dump_ms": 100, "transfer_ms": 50, "bytes_sent": 60_000_000,
            "page_bytes": 50_000_000, "postcopy_ms": 350, "criu_dump_ms": 90, "seal_ms": 5,
            "mode": "lazy"
        }));
        assert_eq!(r.transfer_mbs, Some(100.0));
        assert!(
            r.csv().ends_with(",50000000,350,90,5,,,,,,,,,,"),
            "{}",
            r.csv()
        );
        assert_eq!(r.csv().split(',').count(), CSV_HEADER.split(',').count());
    }

    /// `auto` rows take the formula of the mode the agent chose: a stream move's presync, not
    /// all bytes over the short transfer phase (QA: 22380 MB/s, 11.5x raw TCP).
    #[test]
    fn auto_throughput_follows_the_mode_the_agent_used() {
        let mut r = Row::new(256, "mig", "auto", 1);
        r.fill_from_move(&serde_json::json!({
            "downtime_ms": 340, "dump_ms": 122, "transfer_ms": 12, "bytes_sent": 268_561_250u64,
            "memory_presync": {"ms": 349, "bytes": 268_529_664u64}, "mode": "stream"
        }));
        let mbs = r.transfer_mbs.unwrap();
        assert!((mbs - 769.4).abs() < 1.0, "{mbs}");
        assert_eq!(r.note, "the agent reported mode stream");
    }

    #[test]
    fn the_prediction_is_recorded_next_to_the_downtime() {
        let mut r = Row::new(64, "mig", "stream", 2);
        r.fill_from_move(&serde_json::json!({
            "downtime_ms": 900, "predicted_downtime_ms": 612, "throughput_bytes_s": 400u64 << 20,
            "throughput_source": "probe", "probe": {"bytes": 1, "ms": 2}, "mode": "stream",
            "fixed_cost": {"ms": 140, "source": "measured", "moves": 3}
        }));
        assert_eq!(r.predicted_downtime_ms, Some(612));
        assert!(
            r.csv().ends_with(",612,probe,400,,,,,140,measured,"),
            "{}",
            r.csv()
        );
        assert_eq!(r.csv().split(',').count(), CSV_HEADER.split(',').count());
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["predicted_downtime_ms"], 612);
        assert_eq!(json["throughput_source"], "probe");
        assert_eq!(json["fixed_cost_source"], "measured");
        assert!(r
            .progress_line()
            .contains("predicted 612 ms (link 400 MiB/s, probe)"));
    }

    #[test]
    fn stream_with_a_presync_counts_the_presync_as_the_page_transfer() {
        let mut r = Row::new(256, "mig", "stream", 1);
        r.fill_from_move(&serde_json::json!({
            "downtime_ms": 300, "dump_ms": 180, "transfer_ms": 5, "bytes_sent": 270_000_000,
            "page_bytes": 20_000, "mode": "stream",
            "memory_presync": {"ms": 400, "bytes": 268_000_000, "processes": 1, "capped": false,
                "pages_reused": 65_000, "pages_sent_frozen": 5, "error": null}
        }));
        assert_eq!(r.transfer_mbs, Some(670.0));
        assert!(
            r.csv().ends_with(",400,268000000,65000,5,,,"),
            "{}",
            r.csv()
        );
        assert_eq!(r.note, "");
        // Without: the bench's own mode name, the agent's mode, the pages while frozen.
        let mut r = Row::new(256, "mig", "stream-nopresync", 1);
        r.fill_from_move(&serde_json::json!({
            "downtime_ms": 600, "dump_ms": 495, "transfer_ms": 5, "bytes_sent": 270_000_000,
            "page_bytes": 269_000_000, "mode": "stream", "memory_presync": null
        }));
        assert_eq!(r.transfer_mbs, Some(540.0));
        assert_eq!((r.presync_bytes, r.note.as_str()), (None, ""));
    }
}
