//! The runc baseline: the same workload in a runc container (a bundle made from the bench rootfs),
//! `runc checkpoint` on "host-a", a copy of the image directory over the lab link
//! ([`super::link::copy_dir`]), `runc restore` on "host-b" (its own runc root and its own copy of
//! the rootfs). Downtime is from the start of the checkpoint to the end of the restore.
//!
//! The container's stdio are pipes held by the bench: runc dumps them and, on restore, connects
//! the restored process to the pipes `runc restore` is given (runc's `--inherit-fd` handling), so
//! the workload's status lines are read before and after the move.

use super::report::{mbs, Row, RowStatus};
use super::workload::{self, Status};
use super::{link, migrun, progress, BenchError, Ctx};
use serde_json::Value;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Instant;

pub fn installed() -> bool {
    Command::new("runc")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Deletes every container of runc root `root` (cleanup).
pub fn delete_all(root: &Path) {
    if !root.exists() {
        return;
    }
    let Ok(out) = Command::new("runc")
        .arg("--root")
        .arg(root)
        .args(["list", "-q"])
        .output()
    else {
        return;
    };
    for id in String::from_utf8_lossy(&out.stdout).lines() {
        delete(root, id.trim());
    }
}

fn delete(root: &Path, id: &str) {
    if id.is_empty() {
        return;
    }
    let _ = Command::new("runc")
        .arg("--root")
        .arg(root)
        .args(["delete", "-f", id])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn runc(root: &Path) -> Command {
    let mut c = Command::new("runc");
    c.arg("--root").arg(root);
    c
}

fn run_ok(mut cmd: Command, what: &str) -> Result<(), String> {
    match cmd.output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "{what} failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!("{what}: {e}")),
    }
}

/// The two runc "hosts": a runc root and a copy of the rootfs each.
pub struct RuncHosts {
    dir: PathBuf,
    roots: [PathBuf; 2],
    rootfs: [PathBuf; 2],
}

/// Text read so far from a pipe.
type Pipe = Arc<Mutex<String>>;

/// Collects a pipe's text on a thread.
fn collect(mut r: impl Read + Send + 'static) -> Pipe {
    let buf = Arc::new(Mutex::new(String::new()));
    let b = buf.clone();
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = r.read(&mut chunk) {
            if n == 0 {
                break;
            }
            if let Ok(mut s) = b.lock() {
                s.push_str(&String::from_utf8_lossy(&chunk[..n]));
            }
        }
    });
    buf
}

fn text(buf: &Pipe) -> String {
    buf.lock().map(|s| s.clone()).unwrap_or_default()
}

/// Starts `cmd` with three pipes as stdio and waits for it (runc run -d / restore -d return once
/// the container runs); the container's stdout and stderr as they come.
fn start_with_pipes(mut cmd: Command) -> Result<(Pipe, Pipe), String> {
    let mut child: Child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run runc: {e}"))?;
    drop(child.stdin.take());
    let out = collect(child.stdout.take().ok_or("no stdout pipe")?);
    let err = collect(child.stderr.take().ok_or("no stderr pipe")?);
    let status = child.wait().map_err(|e| format!("waiting for runc: {e}"))?;
    if !status.success() {
        std::thread::sleep(std::time::Duration::from_millis(200));
        return Err(format!("runc {status}: {}", text(&err).trim()));
    }
    Ok((out, err))
}

fn ms(from: Instant, to: Instant) -> u64 {
    to.duration_since(from).as_millis() as u64
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

impl RuncHosts {
    pub fn prepare(ctx: &Ctx) -> Result<RuncHosts, BenchError> {
        let dir = ctx.work.join("runc");
        let mk = |p: &Path| {
            std::fs::create_dir_all(p).map_err(|source| BenchError::Prepare {
                path: p.to_path_buf(),
                source,
            })
        };
        let roots = [dir.join("root-a"), dir.join("root-b")];
        let rootfs = [dir.join("rootfs-a"), dir.join("rootfs-b")];
        for (root, fs) in roots.iter().zip(&rootfs) {
            mk(root)?;
            let mut cp = Command::new("cp");
            cp.arg("-a").arg(&ctx.rootfs).arg(fs);
            run_ok(cp, "cp -a").map_err(|stderr| BenchError::CommandFailed {
                command: format!("cp -a {} {}", ctx.rootfs.display(), fs.display()),
                stderr,
            })?;
        }
        Ok(RuncHosts { dir, roots, rootfs })
    }

    pub fn roots(&self) -> Vec<PathBuf> {
        self.roots.to_vec()
    }

    /// Writes `bundle/config.json`: `runc spec`'s default with our rootfs, no terminal, the
    /// workload as the process.
    fn bundle(&self, bundle: &Path, host: usize, args: &[String]) -> Result<(), String> {
        std::fs::create_dir_all(bundle).map_err(|e| format!("{}: {e}", bundle.display()))?;
        let mut spec = Command::new("runc");
        spec.arg("spec").arg("--bundle").arg(bundle);
        run_ok(spec, "runc spec")?;
        let path = bundle.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| format!("config.json: {e}"))?;
        let mut v: Value = serde_json::from_str(&text).map_err(|e| format!("config.json: {e}"))?;
        v["process"]["terminal"] = Value::Bool(false);
        v["process"]["args"] = serde_json::json!(args);
        v["root"]["path"] = Value::String(self.rootfs[host].display().to_string());
        v["root"]["readonly"] = Value::Bool(false);
        v["hostname"] = Value::String("memload".into());
        std::fs::write(&path, v.to_string()).map_err(|e| format!("config.json: {e}"))
    }

    /// One run of the baseline for `size_mib`. A stop while it waits for the workload ends it as
    /// failed, with a note saying where (the bench drops it and prints the note).
    pub fn run(&self, ctx: &Ctx, size_mib: u64, run: u32) -> Result<Row, BenchError> {
        let mut row = Row::new(size_mib, "runc", "runc", run);
        let id = format!("mig-bench-{}-{size_mib}m-{run}", std::process::id());
        progress(&format!("{size_mib} MiB, runc, run {run}: starting {id}"));
        let run_dir = self.dir.join(&id);
        let guard = RunGuard {
            roots: &self.roots,
            id: &id,
            dir: &run_dir,
        };
        let r = self.measure(ctx, size_mib, &id, &run_dir, &mut row);
        drop(guard);
        if let Err(note) = r? {
            row.fail(RowStatus::Failed, &note);
        }
        Ok(row)
    }

    /// The steps of a run; `Ok(Err(note))` records a failure of runc or the workload.
    fn measure(
        &self,
        ctx: &Ctx,
        size_mib: u64,
        id: &str,
        dir: &Path,
        row: &mut Row,
    ) -> Result<Result<(), String>, BenchError> {
        let args = workload::command(size_mib, ctx.dirty_mib);
        let (bundle_a, bundle_b) = (dir.join("bundle-a"), dir.join("bundle-b"));
        let (img_a, img_b) = (dir.join("image-a"), dir.join("image-b"));
        for (b, h) in [(&bundle_a, 0), (&bundle_b, 1)] {
            if let Err(e) = self.bundle(b, h, &args) {
                return Ok(Err(e));
            }
        }
        let mut start = runc(&self.roots[0]);
        start.args(["run", "-d", "--bundle"]).arg(&bundle_a).arg(id);
        let (out_a, _err_a) = match start_with_pipes(start) {
            Ok(p) => p,
            Err(e) => return Ok(Err(format!("runc run: {e}"))),
        };
        let ready = migrun::wait_status(
            ctx,
            migrun::patience(size_mib),
            || Status::parse(&text(&out_a)),
            |s| s.last_ok.is_some(),
        );
        let ready = match ready {
            Err(BenchError::Interrupted) => {
                return Ok(Err(migrun::INTERRUPTED_BEFORE_THE_MOVE.into()))
            }
            r => r?,
        };
        let Some(before) = ready.last_ok.filter(|_| ready.bad.is_none()) else {
            return Ok(Err(
                "the workload did not verify its memory before the move".into(),
            ));
        };

        let t0 = Instant::now();
        let mut ckpt = runc(&self.roots[0]);
        ckpt.args(["checkpoint", "--image-path"])
            .arg(&img_a)
            .arg("--work-path")
            .arg(dir.join("work-a"))
            .arg(id);
        if let Err(e) = run_ok(ckpt, "runc checkpoint") {
            return Ok(Err(e));
        }
        let t1 = Instant::now();
        let sent = link::copy_dir(ctx, &img_a, &img_b)?;
        let t2 = Instant::now();
        let mut restore = runc(&self.roots[1]);
        restore
            .args(["restore", "-d", "--image-path"])
            .arg(&img_b)
            .arg("--work-path")
            .arg(dir.join("work-b"))
            .arg("--bundle")
            .arg(&bundle_b)
            .arg(id);
        let (out_b, _err_b) = match start_with_pipes(restore) {
            Ok(p) => p,
            Err(e) => return Ok(Err(format!("runc restore: {e}"))),
        };
        let t3 = Instant::now();
        row.dump_ms = Some(ms(t0, t1));
        row.transfer_ms = Some(ms(t1, t2));
        row.restore_ms = Some(ms(t2, t3));
        row.downtime_ms = Some(ms(t0, t3));
        row.total_ms = Some(ms(t0, t3));
        row.bytes = Some(sent.max(dir_size(&img_b)));
        row.transfer_mbs = mbs(sent, ms(t1, t2));

        let after = migrun::wait_status(
            ctx,
            migrun::patience(size_mib),
            || Status::parse(&text(&out_b)),
            |s| s.verified_after(before),
        );
        let after = match after {
            Err(BenchError::Interrupted) => return Ok(Err(INTERRUPTED_AFTER_THE_RESTORE.into())),
            r => r?,
        };
        row.verified = after.verified_after(before);
        if !row.verified {
            // Its times stay in the row, but not in the medians (a failed run).
            row.status = RowStatus::Failed;
            row.note = match (after.bad, after.last_ok) {
                (Some(tick), _) => format!("memory BAD at tick {tick} after the restore"),
                (None, Some((n, p))) => format!(
                    "no full verification pass after the restore (before: tick {} pass {}, last: tick {n} pass {p})",
                    before.0, before.1
                ),
                (None, None) => "no OK line on host-b after the restore".to_owned(),
            };
        }
        Ok(Ok(()))
    }
}

/// The note of a baseline run whose verification on host-b a stop cut short.
const INTERRUPTED_AFTER_THE_RESTORE: &str =
    "restored; stopped while the workload was verified on host-b";

/// Deletes a run's containers and files on drop.
struct RunGuard<'a> {
    roots: &'a [PathBuf; 2],
    id: &'a str,
    dir: &'a Path,
}

impl Drop for RunGuard<'_> {
    fn drop(&mut self) {
        for root in self.roots {
            delete(root, self.id);
        }
        let _ = std::fs::remove_dir_all(self.dir);
    }
}
