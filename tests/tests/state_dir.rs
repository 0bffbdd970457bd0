//! The agent's state directory is private (agent/src/privacy.rs, docs/security.md "The state
//! directory") while a `--userns` container runs, moves (stream, the default) to the other host
//! and back, is checkpointed and restored, and exported and imported again: an unprivileged,
//! unmapped user (`nobody`) can list or read nothing in it, and the container's mapped root
//! reaches its own directory only. A state directory left 0755 by an older migd is made private
//! at start. Lab `s13sd`, subnet 10.79.95.0/24.
//!
//! Needs root, real CRIU and `setpriv`/`nsenter` (util-linux). The lab guard removes every
//! agent, process, mount, cgroup and netns whatever happens.

use anyhow::{ensure, Context, Result};
use mig_tests::lab::{self, Lab};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const SUBNET: [u8; 3] = [10, 79, 95];

/// Writes into the image's `/etc` as the container's root, then counts ("tick N OK", and the
/// count in `/tmp/counter` for `lab::move_and_check`).
const SCRIPT: &str = r#"if echo made > /etc/mig-test; then echo "writes 0 OK"; else echo "writes BAD"; fi
i=0
while :; do i=$((i+1)); echo $i; sleep 0.3; done | while read n; do
  echo $n > /tmp/counter
  if echo $n > /etc/mig-counter; then echo "tick $n OK"; else echo "tick $n BAD"; fi
done"#;

/// For each path read on stdin (one a line), prints `r PATH` when the caller may read it and
/// `x PATH` when it is a directory the caller may traverse.
const PROBE: &str = r#"while IFS= read -r p; do
  if [ -r "$p" ]; then echo "r $p"; fi
  if [ -d "$p" ] && [ -x "$p" ]; then echo "x $p"; fi
done"#;

fn mode(p: &Path) -> Result<(u32, u32)> {
    let m = std::fs::symlink_metadata(p).with_context(|| format!("{}", p.display()))?;
    Ok((m.permissions().mode() & 0o7777, m.gid()))
}

/// Every directory and regular file under `dir` (not following symbolic links), `dir` first.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_owned()];
    let mut i = 0;
    while i < out.len() {
        let d = out[i].clone();
        i += 1;
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() || t.is_file() => out.push(e.path()),
                _ => {}
            }
        }
    }
    out
}

/// `nsenter` into the mount namespace of `host`'s agent (where the containers' rootfs are
/// mounted), then `setpriv` to host id `id` (uid and gid, no other group); the command follows.
fn as_id(lab: &Lab, host: usize, id: u32) -> Result<Command> {
    let agent = lab.hosts[host].agent_pid.context("no agent")?;
    let ids = id.to_string();
    let mut c = Command::new("nsenter");
    c.arg(format!("--mount=/proc/{agent}/ns/mnt")).args([
        "--",
        "setpriv",
        "--reuid",
        &ids,
        "--regid",
        &ids,
        "--clear-groups",
        "--",
    ]);
    Ok(c)
}

/// What host id `id` (uid and gid, no other group) may read (`r`) and traverse (`x`) of `paths`,
/// seen in the mount namespace of `host`'s agent (where the containers' rootfs are mounted).
fn probe(lab: &Lab, host: usize, id: u32, paths: &[PathBuf]) -> Result<Vec<String>> {
    let mut child = as_id(lab, host, id)?
        .args(["sh", "-c", PROBE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("nsenter setpriv")?;
    let mut list = String::new();
    for p in paths {
        list.push_str(p.to_str().context("path")?);
        list.push('\n');
    }
    let mut stdin = child.stdin.take().context("stdin")?;
    // Written from a thread: the child's output could fill its pipe before it read everything.
    let writer = std::thread::spawn(move || stdin.write_all(list.as_bytes()));
    let out = child.wait_with_output()?;
    let _ = writer.join();
    ensure!(out.status.success(), "probe as {id}: {out:?}");
    Ok(String::from_utf8(out.stdout)?
        .lines()
        .map(str::to_owned)
        .collect())
}

/// `cmd` run as host id `id` in `host`'s agent's mount namespace succeeds.
fn can(lab: &Lab, host: usize, id: u32, cmd: &[&str]) -> Result<bool> {
    let s = as_id(lab, host, id)?
        .args(cmd)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    Ok(s.success())
}

const NOBODY: u32 = 65534;

/// The state directory of `host` is private; `containers` are the (id, mapped root) of the
/// `--userns` containers on it, whose roots may reach their own directory and rootfs only.
fn private(lab: &Lab, host: usize, containers: &[(&str, u32)]) -> Result<()> {
    let root = lab.state_dir(host).to_owned();
    let cdir = root.join("containers");
    for (p, want) in [
        (&root, 0o711),
        (&cdir, 0o711),
        (&root.join("images"), 0o700),
        (&root.join("identity"), 0o700),
        (&root.join("migrations"), 0o700),
    ] {
        ensure!(
            mode(p)?.0 == want,
            "{} is {:o}, want {want:o}",
            p.display(),
            mode(p)?.0
        );
    }
    for (id, mapped) in containers {
        let d = cdir.join(id);
        ensure!(
            mode(&d)? == (0o710, *mapped),
            "{}: {:?}",
            d.display(),
            mode(&d)?
        );
    }
    let paths = walk(&root);
    ensure!(
        paths.iter().any(|p| p.ends_with("identity/key.der")),
        "no identity key in {}",
        root.display()
    );
    // nobody: no file or directory readable, and only the two traverse-only directories
    // traversable.
    let seen = probe(lab, host, NOBODY, &paths)?;
    let want = vec![
        format!("x {}", root.display()),
        format!("x {}", cdir.display()),
    ];
    ensure!(seen == want, "nobody on host {host} may: {seen:?}");
    for cmd in [
        vec!["ls", root.to_str().context("path")?],
        vec!["ls", cdir.to_str().context("path")?],
    ] {
        ensure!(!can(lab, host, NOBODY, &cmd)?, "nobody may {cmd:?}");
    }
    // A container's root: its own directory (and rootfs) and nothing else.
    for (id, mapped) in containers {
        let own = cdir.join(id);
        let seen = probe(lab, host, *mapped, &paths)?;
        let outside: Vec<&String> = seen
            .iter()
            .filter(|l| !Path::new(&l[2..]).starts_with(&own))
            .filter(|l| !want.contains(*l))
            .collect();
        ensure!(
            outside.is_empty(),
            "the root of {id} on host {host} may: {outside:?}"
        );
        let etc = own.join("rootfs/etc");
        ensure!(
            can(lab, host, *mapped, &["ls", etc.to_str().context("path")?])?,
            "the root of {id} cannot reach its rootfs on host {host}"
        );
    }
    Ok(())
}

/// The host id the container's root maps to, from its spec.
fn mapped_root(lab: &Lab, host: usize, id: &str) -> Result<u32> {
    let spec = lab
        .state_dir(host)
        .join("containers")
        .join(id)
        .join("spec.json");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&spec)?)?;
    let h = v["userns"]["host_id"]
        .as_u64()
        .with_context(|| format!("no userns in {v}"))?;
    ensure!(h != 0, "mapped to host root");
    Ok(u32::try_from(h)?)
}

#[test]
fn state_dir_stays_private_with_userns_moves_and_checkpoints() -> Result<()> {
    if !mig_tests::is_root("state dir tests") {
        return Ok(());
    }
    let mut guard = Lab::up_on("s13sd", SUBNET, 2)?;
    // As an older migd left it (umask 022): made private again when the agent starts.
    let root = guard.state_dir(0).to_owned();
    for p in ["", "containers", "images", "migrations", "identity"] {
        std::fs::set_permissions(root.join(p), std::fs::Permissions::from_mode(0o755))?;
    }
    std::fs::set_permissions(
        root.join("peers.json"),
        std::fs::Permissions::from_mode(0o644),
    )?;
    guard.restart(0)?;
    let lab = &guard;
    ensure!(mode(&root.join("peers.json"))?.0 == 0o600, "peers.json");
    private(lab, 0, &[])?;
    private(lab, 1, &[])?;

    let before: Vec<lab::Usage> = (0..2).map(|h| lab::usage(lab, h)).collect();
    let id = lab
        .mig_ok(
            0,
            &[
                "run", "-d", "--userns", "--name", "p", "busybox", "--", "sh", "-c", SCRIPT,
            ],
        )?
        .trim()
        .to_string();
    let ok = mig_tests::wait_until(Duration::from_secs(30), || {
        let log = lab.mig(0, &["logs", "p"]).stdout;
        log.contains("BAD") || lab::log_state(&log).0 > 2
    });
    let log = lab.mig(0, &["logs", "p"]).stdout;
    ensure!(ok && !log.contains("BAD"), "the container's writes: {log}");
    let mapped = mapped_root(lab, 0, &id)?;
    private(lab, 0, &[(&id, mapped)])?;

    // Stream (the default) to host-b and back.
    lab::move_and_check(lab, 0, 1, "p", &id)?;
    private(lab, 1, &[(&id, mapped)])?;
    // The moved output (received with the umask's mode) and the new shim's log are root's alone.
    let moved = lab.state_dir(1).join("containers").join(&id);
    for f in ["container.log", "shim.log"] {
        ensure!(mode(&moved.join(f))?.0 == 0o600, "{f} on host-b");
    }
    private(lab, 0, &[])?;
    lab::move_and_check(lab, 1, 0, "p", &id)?;
    private(lab, 0, &[(&id, mapped)])?;
    private(lab, 1, &[])?;

    // Checkpointed: the images (memory pages) are in the container's directory, out of
    // nobody's reach; the restore (CRIU reads some images as the mapped root) works.
    let (count, _) = lab::log_state(&lab.mig(0, &["logs", "p"]).stdout);
    lab.mig_ok(0, &["checkpoint", "p"])?;
    let images = root.join("containers").join(&id).join("checkpoint");
    ensure!(
        walk(&images).iter().any(|p| p
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("pages-"))),
        "no page images in {}",
        images.display()
    );
    // Its rootfs is not mounted now: checked without it.
    let inv = images.join("inventory.img");
    ensure!(
        !can(lab, 0, NOBODY, &["cat", inv.to_str().context("path")?])?,
        "nobody can read {}",
        inv.display()
    );
    ensure!(
        can(lab, 0, mapped, &["cat", inv.to_str().context("path")?])?,
        "the mapped root cannot read {}",
        inv.display()
    );
    lab.mig_ok(0, &["restore", "p"])?;
    lab::continues(lab, 0, "p", count)?;
    ensure!(lab.mig_ok(0, &["exec", "p", "--", "cat", "/etc/mig-test"])? == "made\n");
    private(lab, 0, &[(&id, mapped)])?;

    // Exported, removed and imported again: the imported directory gets the same gate.
    let tmp = tempfile::tempdir()?;
    let archive = tmp.path().join("p.tar.zst");
    let archive_s = archive.to_str().context("path")?;
    lab.mig_ok(0, &["checkpoint", "p", "--export", archive_s])?;
    lab.mig_ok(0, &["rm", "-f", "p"])?;
    lab::nothing_left(lab, 0, &id)?;
    lab.mig_ok(0, &["restore", "--import", archive_s, "--name", "p2"])?;
    let id2 = lab::running_on(lab, 0, "p2")?["id"]
        .as_str()
        .context("no id")?
        .to_owned();
    ensure!(mapped_root(lab, 0, &id2)? == mapped, "the map changed");
    ensure!(lab.mig_ok(0, &["exec", "p2", "--", "cat", "/etc/mig-test"])? == "made\n");
    private(lab, 0, &[(&id2, mapped)])?;

    lab.mig_ok(0, &["rm", "-f", "p2"])?;
    lab::nothing_left(lab, 0, &id2)?;
    private(lab, 0, &[])?;
    lab::no_leaks(lab, &before)
}
