//! Starting a container's shim (`mig-shim start` or `restore`): the container's records written
//! (once), the shim spawned, and its one-line report read.

use super::internal;
use crate::api::{ApiError, ErrorKind};
use crate::daemon::Agent;
use crate::layout::StateRecord;
use crate::shim::StartReport;
use mig_runtime::fsutil;
use mig_runtime::spec::ContainerSpec;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};

/// How long the shim may take to report that the init runs.
const START_TIMEOUT: Duration = Duration::from_secs(60);

impl Agent {
    /// Writes the container's files, starts `mig-shim <mode>` (`start` or `restore`) and reads
    /// its one-line report.
    pub(in crate::daemon) async fn start_shim(
        &self,
        spec: &ContainerSpec,
        state: &StateRecord,
        mode: &str,
    ) -> Result<(Child, i32), ApiError> {
        let cd = self.dirs.container(&spec.id);
        let t_records = Instant::now();
        let io = |what: &str, e: std::io::Error| internal(format!("{what}: {e}"));
        // The container's directory is the gate to its rootfs and images (privacy.rs): made
        // root's alone, then opened to its mapped root's group for a --userns container (a
        // directory made by an incoming move or an import gets its mode here too).
        let private = |e: crate::privacy::PrivacyError| internal(crate::shim::chain(&e));
        crate::privacy::create_dir(&cd.dir, crate::privacy::PRIVATE_DIR).map_err(private)?;
        crate::privacy::secure_container_dir(&cd.dir, spec.userns.as_ref()).map_err(private)?;
        for d in [cd.upper(), cd.work(), cd.rootfs()] {
            std::fs::create_dir_all(&d).map_err(|e| io(&format!("creating {}", d.display()), e))?;
        }
        write_record_once(&cd.spec(), spec).map_err(|e| io("writing spec.json", e))?;
        write_record_once(&cd.state(), state).map_err(|e| io("writing state.json", e))?;
        // Records of a previous run must not be mistaken for this one's.
        for old in [cd.shim(), cd.exit()] {
            match std::fs::remove_file(&old) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(io(&format!("removing {}", old.display()), e))
                }
                _ => {}
            }
        }
        let shim_log =
            crate::layout::open_log(&cd.shim_log()).map_err(|e| io("opening shim.log", e))?;
        let t_spawn = Instant::now();
        let mut cmd = Command::new(&self.cfg.shim);
        // The CRIU this agent checked: the shim's restore need not ask its version again.
        if let Some(token) = mig_migrate::criu::Criu::locate()
            .ok()
            .and_then(|c| c.known_token())
        {
            cmd.env(mig_migrate::criu::KNOWN_ENV, token);
        }
        let mut child = cmd
            .arg(mode)
            .arg("--state-dir")
            .arg(&self.cfg.state_dir)
            .arg("--id")
            .arg(&spec.id)
            .arg("--cgroup-parent")
            .arg(&self.cfg.cgroup_parent)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(shim_log))
            .spawn()
            .map_err(|e| io(&format!("starting {}", self.cfg.shim.display()), e))?;
        let t_report = Instant::now();
        let Some(stdout) = child.stdout.take() else {
            return Err(internal("the shim has no stdout pipe"));
        };
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = tokio::time::timeout(START_TIMEOUT, lines.next_line()).await;
        tracing::debug!(
            id = %spec.id,
            mode,
            records_ms = crate::migration::ms(t_spawn - t_records),
            spawn_ms = crate::migration::ms(t_report - t_spawn),
            report_ms = crate::migration::ms(t_report.elapsed()),
            "shim phases"
        );
        let line = match line {
            Ok(Ok(Some(l))) => l,
            Ok(Ok(None)) => {
                let _ = child.wait().await;
                return Err(internal(format!(
                    "the shim exited without a report (see {})",
                    cd.shim_log().display()
                )));
            }
            Ok(Err(e)) => return Err(io("reading the shim's report", e)),
            Err(_) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(internal("the shim did not report within 60 s"));
            }
        };
        match serde_json::from_str::<StartReport>(&line) {
            Ok(StartReport::Started { init_pid }) => Ok((child, init_pid)),
            Ok(StartReport::Failed { stage, message }) => {
                let _ = child.wait().await;
                let kind = if stage.is_unavailable(&message) {
                    ErrorKind::Unavailable
                } else if stage == crate::shim::Stage::Spawn && command_not_runnable(&message) {
                    // The caller's mistake, not the agent's.
                    ErrorKind::InvalidArgument
                } else {
                    ErrorKind::Internal
                };
                Err(ApiError::new(
                    kind,
                    format!("{}: {message}", stage.as_str()),
                ))
            }
            Err(e) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                Err(internal(format!("unreadable report from the shim: {e}")))
            }
        }
    }
}

/// Writes a container record, or only syncs the file when it already holds exactly this record
/// (the same value in the current format). The restore of an arriving container otherwise wrote
/// again the spec and state the agent had just written and synced (two atomic writes, 10-25 ms
/// of the downtime here under load); syncing a file that is already on disk costs microseconds,
/// and makes the record durable whoever wrote it.
fn write_record_once<T: serde::Serialize>(
    path: &std::path::Path,
    value: &T,
) -> std::io::Result<()> {
    use crate::layout::{MAX_RECORD, RECORD_FORMAT};
    let mut want = serde_json::to_value(value).map_err(std::io::Error::other)?;
    if let Some(obj) = want.as_object_mut() {
        obj.insert(RECORD_FORMAT.key.to_owned(), RECORD_FORMAT.current.into());
    }
    let have = fsutil::read_json::<serde_json::Value>(path, MAX_RECORD).ok();
    if have.as_ref() != Some(&want) {
        return crate::layout::write_record(path, value);
    }
    std::fs::File::open(path)?.sync_all()?;
    match path.parent() {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

/// Whether a failed start's message is the shim's "the command \"x\" is not in the image ..." or
/// "the command \"x\" cannot be executed: ..." (agent/src/shim/start.rs `spawn_failure`). The
/// CLI matches these words to exit 127 or 126: keep them.
fn command_not_runnable(message: &str) -> bool {
    let Some(tail) = message.strip_prefix("the command \"") else {
        return false;
    };
    // The command's name is a Rust debug string: skip it to its closing quote.
    let mut escaped = false;
    let end = tail.char_indices().find_map(|(i, ch)| {
        let close = ch == '"' && !escaped;
        escaped = ch == '\\' && !escaped;
        close.then_some(i)
    });
    end.is_some_and(|end| {
        let rest = &tail[end + 1..];
        rest.starts_with(" is not in the image") || rest.starts_with(" cannot be executed")
    })
}

#[cfg(test)]
mod record_tests {
    use super::write_record_once;
    use std::os::unix::fs::MetadataExt;

    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Rec {
        a: u32,
    }

    /// Written when missing or different, left in place (same inode) when identical.
    #[test]
    fn a_record_is_written_once() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        write_record_once(&p, &Rec { a: 1 }).unwrap();
        let first = std::fs::metadata(&p).unwrap().ino();
        write_record_once(&p, &Rec { a: 1 }).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().ino(), first);
        write_record_once(&p, &Rec { a: 2 }).unwrap();
        assert_ne!(std::fs::metadata(&p).unwrap().ino(), first);
        let back: Rec = crate::layout::read_record(&p).unwrap();
        assert_eq!(back, Rec { a: 2 });
        // A record in another format is rewritten in the current one.
        std::fs::write(&p, br#"{"a":2}"#).unwrap();
        let old = std::fs::metadata(&p).unwrap().ino();
        write_record_once(&p, &Rec { a: 2 }).unwrap();
        assert_ne!(std::fs::metadata(&p).unwrap().ino(), old);
    }
}
