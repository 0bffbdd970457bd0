//! CRIU's kerndat cache where `/run` is not a tmpfs (migrate/src/criu/kdat.rs, docs/criu.md
//! "Kerndat cache"): a `migd` that starts replaces a `/run/criu.kdat` older than this boot, and
//! CRIU's dumps then load it instead of probing the kernel again; a cache deleted meanwhile (as
//! another CRIU build does) or made for another binary is made again before the next freeze. Skipped where `/run` is a
//! tmpfs (CRIU keeps its cache itself there).
//!
//! Needs root and CRIU. Lab subnet 10.79.72.0/24.
//!
//! `cargo test -p mig-tests --test kerndat`

use anyhow::{ensure, Context, Result};
use mig_migrate::criu::kdat;
use mig_tests::lab::{nothing_left, Lab};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime};

const SUBNET: [u8; 3] = [10, 79, 72];

fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

#[test]
fn migd_leaves_a_kerndat_cache_of_this_boot_that_criu_loads() -> Result<()> {
    if !mig_tests::is_root("kerndat") {
        return Ok(());
    }
    let dir = Path::new(kdat::KDAT_DIR);
    if kdat::is_tmpfs(dir)? {
        eprintln!(
            "{} is a tmpfs: CRIU keeps its own cache; skipping",
            dir.display()
        );
        return Ok(());
    }
    let file = dir.join(kdat::KDAT_NAME);
    let boot = kdat::boot_time()?;
    // A cache that looks older than this boot: the agent must write it again. (Its contents
    // stay valid, so CRIU runs of other tests meanwhile are not disturbed.)
    if file.exists() {
        let before_boot = boot
            .duration_since(SystemTime::UNIX_EPOCH)?
            .saturating_sub(Duration::from_secs(60))
            .as_secs();
        let st = Command::new("touch")
            .arg("-d")
            .arg(format!("@{before_boot}"))
            .arg(&file)
            .status()?;
        ensure!(st.success(), "touch {} failed", file.display());
    }
    let lab = Lab::up_on("kdat", SUBNET, 1)?;
    let written = mtime(&file).context("no kerndat cache after migd started")?;
    ensure!(
        written >= boot,
        "the kerndat cache is older than this boot: {written:?} < {boot:?}"
    );
    let id = lab.mig_ok(
        0,
        &[
            "run", "-d", "--name", "kd", "busybox", "--", "sleep", "1000",
        ],
    )?;
    let id = id.trim().to_owned();
    let log_path = lab
        .state_dir(0)
        .join("containers")
        .join(&id)
        .join("checkpoint")
        .join("dump.log");
    let loaded = format!("Loaded kdat cache from {}", file.display());
    let checkpoint_loads_the_cache = |when: &str| -> Result<()> {
        lab.mig_ok(0, &["checkpoint", "kd", "--leave-running"])?;
        let log = std::fs::read_to_string(&log_path)
            .with_context(|| format!("reading {}", log_path.display()))?;
        ensure!(
            log.contains(&loaded),
            "{when}: the dump did not load the cache: {}",
            log.lines().take(12).collect::<Vec<_>>().join("\n")
        );
        Ok(())
    };
    checkpoint_loads_the_cache("after migd started")?;
    // A CRIU of another build deletes a cache it did not write (criu/kerndat.c); the agent
    // makes it again before the next freeze instead of letting every CRIU run probe.
    std::fs::remove_file(&file)?;
    checkpoint_loads_the_cache("after the cache was deleted")?;
    // A cache made for another binary (its identity file says so) is made again too.
    std::fs::write(
        dir.join(kdat::KDAT_SOURCE),
        "/usr/sbin/criu dev 1 ino 2 size 3 mtime 4.000000000\n",
    )?;
    checkpoint_loads_the_cache("after the cache was said to be another binary's")?;
    ensure!(
        std::fs::read_to_string(dir.join(kdat::KDAT_SOURCE))?.contains("/usr/local/sbin/criu")
            || std::env::var_os("MIG_CRIU").is_some(),
        "the cache's identity was not written again"
    );
    lab.mig_ok(0, &["rm", "-f", "kd"])?;
    nothing_left(&lab, 0, &id)?;
    Ok(())
}
