//! Isolation observed from inside: `mig-probe` (the `probe/` crate, built statically) runs in a
//! busybox container at start and again through `mig exec`, and every expectation of the runtime's
//! confinement is checked on its report: capabilities, no_new_privs, seccomp mode, each denied
//! system call actually denied, masked paths empty, /proc/sys and /sys read-only, a minimal /dev,
//! only the container's processes, only `lo`, no route out. Then the container is checkpointed
//! and restored, and (another one) moved between two lab hosts: the probe must report exactly
//! the same.
//!
//! Needs root, real CRIU. Resources are named after the test and the process id and removed by
//! the [`Agent`] and lab guards whatever happens.

use anyhow::{bail, ensure, Context, Result};
use mig_tests::{busybox_rootfs, wait_until, Agent};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

/// Docker's default capability mask, which `mig_runtime` gives a container's root
/// (`mig_runtime::container::security::default_caps_mask`).
const DEFAULT_CAPS: &str = "00000000a80425fb";

/// Calls that must succeed in a container (controls: the probe reaches the kernel).
const ALLOWED: [&str; 2] = ["getpid", "chroot"];

/// `clone3` is answered with ENOSYS so that libc falls back to `clone`, whose flags the filter
/// can inspect (runtime/src/container/security.rs).
const ENOSYS: [&str; 1] = ["clone3"];

/// What `/dev` may hold: the runtime's nodes, links and mounts.
const DEV_OK: [&str; 14] = [
    "null", "zero", "full", "random", "urandom", "tty", "ptmx", "fd", "stdin", "stdout", "stderr",
    "pts", "shm", "mqueue",
];

/// The static probe, built once per test binary with
/// `RUSTFLAGS="-C target-feature=+crt-static" cargo build -p mig-probe --release` into a target
/// directory of its own (`target/probe`), so the main build cache keeps its flags.
fn probe_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        mig_tests::static_binary("mig-probe", "mig-probe", "MIG_PROBE").expect("building mig-probe")
    })
}

/// A busybox rootfs with the probe at /bin/mig-probe, under `dir`.
fn probe_rootfs(dir: &Path) -> Result<PathBuf> {
    let rootfs = busybox_rootfs(dir)?;
    std::fs::copy(probe_binary(), rootfs.join("bin/mig-probe")).context("copying the probe")?;
    Ok(rootfs)
}

/// The shell command of the test container: the probe once at start (its report goes to the
/// log), then a long sleep as PID 1.
const START: &str = "/bin/mig-probe; exec sleep 100000";

/// The probe's report from the container's log (its first JSON line).
fn report_from_log(log: &str) -> Result<Value> {
    let line = log
        .lines()
        .find(|l| l.starts_with('{'))
        .context("no probe report in the log")?;
    serde_json::from_str(line).with_context(|| format!("probe printed invalid JSON: {line}"))
}

fn parse_report(out: &str) -> Result<Value> {
    serde_json::from_str(out.trim()).with_context(|| format!("probe printed invalid JSON: {out}"))
}

/// Every expectation of the runtime's confinement on one report. `exec` is true for a probe run
/// through `mig exec` (PID 1 is then the container's `sleep`).
fn check_report(r: &Value, exec: bool) -> Result<()> {
    ensure!(r["uid"] == 0, "uid: {}", r["uid"]);
    let st = &r["status"];
    for k in ["CapEff", "CapPrm", "CapBnd"] {
        ensure!(st[k] == DEFAULT_CAPS, "{k} {} (want {DEFAULT_CAPS})", st[k]);
    }
    for k in ["CapAmb", "CapInh"] {
        ensure!(st[k] == "0000000000000000", "{k} {}", st[k]);
    }
    ensure!(st["NoNewPrivs"] == "1", "NoNewPrivs {}", st["NoNewPrivs"]);
    ensure!(
        st["Seccomp"] == "2",
        "Seccomp {} (want 2, filter)",
        st["Seccomp"]
    );

    let calls = r["syscalls"].as_object().context("syscalls")?;
    ensure!(calls.len() >= 30, "only {} calls probed", calls.len());
    for (name, result) in calls {
        let want = if ALLOWED.contains(&name.as_str()) {
            "ok"
        } else if ENOSYS.contains(&name.as_str()) {
            "ENOSYS"
        } else {
            "EPERM"
        };
        ensure!(result == want, "{name}: {result} (want {want})");
    }

    let masked = r["masked"].as_object().context("masked")?;
    for (path, m) in masked {
        let empty = m["bytes"] == 0
            || m["entries"].as_array().is_some_and(|e| e.is_empty())
            || m["error"].is_string();
        ensure!(empty, "masked path {path} shows content: {m}");
    }
    // /proc/keys exists on every kernel with keys: it must be the container's /dev/null.
    if Path::new("/proc/keys").exists() {
        ensure!(
            masked["/proc/keys"]["bytes"] == 0,
            "{}",
            masked["/proc/keys"]
        );
    }
    if Path::new("/sys/firmware").exists() {
        ensure!(
            masked["/sys/firmware"]["entries"] == serde_json::json!([]),
            "{}",
            masked["/sys/firmware"]
        );
    }

    let w = r["writable"].as_object().context("writable")?;
    for (path, res) in w {
        ensure!(res != "ok", "{path} is writable");
    }
    // In a user namespace the host-owned files refuse a write open with EACCES before the
    // read-only mount is consulted; without one, the read-only mount answers (EROFS).
    let in_userns = r["uid_map"].as_str().is_some_and(|m| m != "0 0 4294967295");
    let denied = |v: &Value| v == "EROFS" || (in_userns && v == "EACCES");
    ensure!(denied(&w["/proc/sys/kernel/hostname"]), "{w:?}");
    if Path::new("/proc/sysrq-trigger").exists() {
        ensure!(denied(&w["/proc/sysrq-trigger"]), "{w:?}");
    }
    for p in ["/sys", "/proc/sys"] {
        ensure!(
            r["readonly_mounts"][p] == true,
            "{p} not read-only: {}",
            r["readonly_mounts"]
        );
    }

    let dev = r["dev"].as_array().context("dev")?;
    for d in dev {
        let d = d.as_str().unwrap_or_default();
        ensure!(DEV_OK.contains(&d), "unexpected /dev/{d}");
    }
    ensure!(
        r["net"] == serde_json::json!(["lo"]),
        "interfaces: {}",
        r["net"]
    );
    ensure!(
        r["connect_outside"] == "ENETUNREACH",
        "outside: {}",
        r["connect_outside"]
    );

    // Processes: PID 1 and the probe (with, at start, the shell between them); no host PID.
    let own = r["pid"].as_i64().context("pid")?;
    let pids: Vec<i64> = r["pids"]
        .as_array()
        .context("pids")?
        .iter()
        .filter_map(Value::as_i64)
        .collect();
    ensure!(pids.contains(&1) && pids.contains(&own), "pids {pids:?}");
    ensure!(
        pids.len() <= 3,
        "more processes visible than the container's: {pids:?}"
    );
    if exec {
        let init = r["init_cmd"].as_str().unwrap_or_default();
        ensure!(init.starts_with("sleep"), "PID 1 is {init:?}");
    } else {
        ensure!(r["ppid"] == 1, "the start probe's parent: {}", r["ppid"]);
    }
    Ok(())
}

/// The parts of a report that must not change across checkpoint, restore or move (PIDs of the
/// probe itself aside).
fn stable(r: &Value) -> Value {
    let mut v = r.clone();
    if let Some(o) = v.as_object_mut() {
        for k in ["pid", "ppid", "pids"] {
            o.remove(k);
        }
    }
    v
}

fn exec_probe(agent: &Agent, name: &str) -> Result<Value> {
    parse_report(&agent.mig_ok(&["exec", name, "--", "/bin/mig-probe"])?)
}

#[test]
fn probe_confined_before_and_after_restore() -> Result<()> {
    if !mig_tests::is_root("isolation tests") {
        return Ok(());
    }
    let agent = Agent::start("isolation_restore")?;
    let rootfs = probe_rootfs(agent.dir.path())?;
    agent.mig_ok(&[
        "image",
        "import",
        rootfs.to_str().unwrap_or_default(),
        "--name",
        "probe",
    ])?;
    agent.mig_ok(&[
        "run", "-d", "--name", "iso", "probe", "--", "sh", "-c", START,
    ])?;
    let mut log = String::new();
    let seen = wait_until(Duration::from_secs(20), || {
        log = agent.mig(&["logs", "iso"]).stdout;
        log.lines().any(|l| l.starts_with('{'))
    });
    ensure!(seen, "the start probe never reported: {log}");
    let at_start = report_from_log(&log)?;
    check_report(&at_start, false).context("probe at start")?;

    let before = exec_probe(&agent, "iso")?;
    check_report(&before, true).context("probe through exec")?;
    ensure!(
        stable(&at_start)["syscalls"] == stable(&before)["syscalls"],
        "init and exec'd processes confined differently"
    );

    agent.mig_ok(&["checkpoint", "iso"])?;
    agent.mig_ok(&["restore", "iso"])?;
    let after = exec_probe(&agent, "iso")?;
    check_report(&after, true).context("probe after restore")?;
    ensure!(
        stable(&before) == stable(&after),
        "confinement changed across checkpoint/restore:\nbefore {before}\nafter  {after}"
    );
    agent.mig_ok(&["rm", "-f", "iso"])?;
    Ok(())
}

#[test]
fn probe_is_static() -> Result<()> {
    // It must run in an image without a libc: no program interpreter (PT_INTERP) in its ELF.
    let bin = std::fs::read(probe_binary())?;
    ensure!(
        bin.starts_with(b"\x7fELF") && bin.len() > 64,
        "not an ELF file"
    );
    let phoff = u64::from_le_bytes(bin[32..40].try_into()?) as usize;
    let phentsize = u16::from_le_bytes(bin[54..56].try_into()?) as usize;
    let phnum = u16::from_le_bytes(bin[56..58].try_into()?) as usize;
    for i in 0..phnum {
        let at = phoff + i * phentsize;
        let kind = bin
            .get(at..at + 4)
            .context("program header out of the file")?;
        if kind == 3u32.to_le_bytes() {
            bail!("mig-probe has a program interpreter: it is not static");
        }
    }
    Ok(())
}

/// A two-host lab for the move check, removed on drop whatever happens.
struct Lab {
    name: String,
    hosts: Vec<mig_agent::lab::LabHost>,
    _tmp: tempfile::TempDir,
}

impl Drop for Lab {
    fn drop(&mut self) {
        mig_tests::lab_down_quietly(&self.name);
    }
}

impl Lab {
    fn mig_ok(&self, host: usize, args: &[&str]) -> Result<String> {
        let o: mig_tests::MigOutput = Command::new(mig_tests::bin("mig"))
            .arg("--socket")
            .arg(&self.hosts[host].socket)
            .args(args)
            .env_remove("MIG_HOST")
            .env_remove("MIG_SOCKET")
            .output()?
            .into();
        if o.code != 0 {
            bail!(
                "mig {args:?} on host {host} exited {}: {}",
                o.code,
                o.stderr
            );
        }
        Ok(o.stdout)
    }
}

#[test]
fn probe_confined_after_move() -> Result<()> {
    if !mig_tests::is_root("isolation tests") {
        return Ok(());
    }
    let name = format!("iso{}", std::process::id() % 100_000);
    let mut cfg = mig_agent::lab::LabConfig::new(&name, 2, mig_tests::bin("migd"));
    cfg.subnet_base = [10, 215, 8];
    cfg.extra_agent_args = vec!["--listen".into(), "{addr}:{port}".into()];
    let tmp = tempfile::tempdir()?;
    let rootfs = probe_rootfs(tmp.path())?;
    let tar = mig_tests::tar_of(&rootfs, tmp.path(), "probe.tar")?;
    let hosts = mig_agent::lab::up(&cfg).with_context(|| format!("lab up {name}"))?;
    let lab = Lab {
        name,
        hosts,
        _tmp: tmp,
    };
    let tar = tar.to_str().unwrap_or_default();
    lab.mig_ok(0, &["image", "import", tar, "--name", "probe"])?;
    lab.mig_ok(
        0,
        &[
            "run", "-d", "--name", "iso", "probe", "--", "sh", "-c", START,
        ],
    )?;
    // The probe that START runs first may still be running (a fourth process) on a loaded
    // machine: a leak stays, a late probe goes, so ask again for a while.
    let mut before = parse_report(&lab.mig_ok(0, &["exec", "iso", "--", "/bin/mig-probe"])?)?;
    for _ in 0..50 {
        if check_report(&before, true).is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
        before = parse_report(&lab.mig_ok(0, &["exec", "iso", "--", "/bin/mig-probe"])?)?;
    }
    check_report(&before, true).context("probe before the move")?;
    let peer = lab.hosts[1].name.clone();
    lab.mig_ok(0, &["move", "iso", &peer, "--json"])?;
    let after = parse_report(&lab.mig_ok(1, &["exec", "iso", "--", "/bin/mig-probe"])?)?;
    check_report(&after, true).context("probe after the move")?;
    ensure!(
        stable(&before) == stable(&after),
        "confinement changed across the move:\nbefore {before}\nafter  {after}"
    );
    lab.mig_ok(1, &["rm", "-f", "iso"])?;
    Ok(())
}

/// The probe in a `--userns` container (lab subnet 10.214.103.0/24): as confined as without a
/// user namespace, root inside mapped to an unprivileged host range, and exactly the same after
/// checkpoint and restore and after a move to host-b.
#[test]
fn probe_confined_in_userns_across_restore_and_move() -> Result<()> {
    if !mig_tests::is_root("isolation tests") {
        return Ok(());
    }
    let lab = mig_tests::lab::Lab::up("isous", 103)?;
    let tmp = tempfile::tempdir()?;
    let rootfs = probe_rootfs(tmp.path())?;
    let tar = mig_tests::tar_of(&rootfs, tmp.path(), "probe.tar")?;
    let tar = tar.to_str().unwrap_or_default();
    lab.mig_ok(0, &["image", "import", tar, "--name", "probe"])?;
    lab.mig_ok(
        0,
        &[
            "run", "-d", "--userns", "--name", "isou", "probe", "--", "sh", "-c", START,
        ],
    )?;
    let mut log = String::new();
    let seen = wait_until(Duration::from_secs(20), || {
        log = lab.mig(0, &["logs", "isou"]).stdout;
        log.lines().any(|l| l.starts_with('{'))
    });
    ensure!(seen, "the start probe never reported: {log}");
    let at_start = report_from_log(&log)?;
    check_report(&at_start, false).context("userns probe at start")?;
    let map = at_start["uid_map"].as_str().unwrap_or_default().to_owned();
    let host_root: u64 = map
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("uid_map {map:?}"))?;
    ensure!(
        map.starts_with("0 ") && host_root > 0,
        "root inside is not mapped to an unprivileged host id: {map:?}"
    );
    ensure!(at_start["gid_map"] == at_start["uid_map"], "{at_start}");

    let probe = |host: usize| -> Result<Value> {
        parse_report(&lab.mig_ok(host, &["exec", "isou", "--", "/bin/mig-probe"])?)
    };
    let before = probe(0)?;
    check_report(&before, true).context("userns probe through exec")?;
    lab.mig_ok(0, &["checkpoint", "isou"])?;
    lab.mig_ok(0, &["restore", "isou"])?;
    let restored = probe(0)?;
    check_report(&restored, true).context("userns probe after restore")?;
    ensure!(
        stable(&before) == stable(&restored),
        "confinement changed across checkpoint/restore:\nbefore {before}\nafter  {restored}"
    );
    let peer = lab.hosts[1].name.clone();
    lab.mig_ok(0, &["move", "isou", &peer, "--json"])?;
    let moved = probe(1)?;
    check_report(&moved, true).context("userns probe after the move")?;
    ensure!(
        stable(&before) == stable(&moved),
        "confinement changed across the move:\nbefore {before}\nafter  {moved}"
    );
    lab.mig_ok(1, &["rm", "-f", "isou"])?;
    Ok(())
}

/// A 32-bit x86 program (an i386 ELF of 112 bytes, made here: no 32-bit toolchain needed): it
/// calls `unshare(0)` through `int 0x80` (i386's number 310) and exits with the call's negated
/// result, so 0 where the call runs and 1 (EPERM) where the seccomp filter denies it.
fn i386_unshare_program() -> Vec<u8> {
    #[rustfmt::skip]
    let code: [u8; 28] = [
        0xb8, 0x36, 0x01, 0x00, 0x00, // mov eax, 310 (unshare)
        0x31, 0xdb, 0x31, 0xc9, 0x31, 0xd2, 0x31, 0xf6, 0x31, 0xff, // zero ebx ecx edx esi edi
        0xcd, 0x80, // int 0x80
        0xf7, 0xd8, // neg eax
        0x89, 0xc3, // mov ebx, eax
        0xb8, 0x01, 0x00, 0x00, 0x00, // mov eax, 1 (exit)
        0xcd, 0x80, // int 0x80
    ];
    let base: u32 = 0x0804_8000;
    let size = (52 + 32 + code.len()) as u32;
    let mut elf = b"\x7fELF\x01\x01\x01\x00".to_vec();
    elf.extend([0u8; 8]);
    for half in [2u16, 3] {
        elf.extend(half.to_le_bytes()); // ET_EXEC, EM_386
    }
    for word in [1u32, base + 84, 52, 0, 0] {
        elf.extend(word.to_le_bytes()); // version, entry, phoff, shoff, flags
    }
    for half in [52u16, 32, 1, 0, 0, 0] {
        elf.extend(half.to_le_bytes()); // ehsize, phentsize, phnum, no sections
    }
    for word in [1u32, 0, base, base, size, size, 5, 0x1000] {
        elf.extend(word.to_le_bytes()); // PT_LOAD of the whole file, r-x
    }
    elf.extend(code);
    elf
}

/// 32-bit x86 programs run in a container under the same filter as x86_64 ones: a denied call
/// fails with EPERM. Before, any of their system calls killed them with SIGSYS (exit 159).
#[cfg(target_arch = "x86_64")]
#[test]
fn i386_programs_run_under_the_same_filter() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if !mig_tests::is_root("isolation tests") {
        return Ok(());
    }
    let agent = Agent::start("isolation_i386")?;
    let rootfs = busybox_rootfs(agent.dir.path())?;
    let prog = rootfs.join("bin/unshare32");
    std::fs::write(&prog, i386_unshare_program())?;
    std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o755))?;
    // The program itself, outside any filter: the kernel runs 32-bit programs, and the call
    // succeeds.
    let host = Command::new(&prog).status()?;
    if host.code().is_none() && !host.success() {
        bail!("the i386 program did not run on the host: {host}");
    }
    ensure!(host.code() == Some(0), "unshare(0) on the host: {host}");
    agent.mig_ok(&[
        "image",
        "import",
        rootfs.to_str().unwrap_or_default(),
        "--name",
        "i386",
    ])?;
    let o = agent.mig(&["run", "--name", "u32", "i386", "--", "/bin/unshare32"]);
    ensure!(
        o.code == 1,
        "the i386 unshare: want exit 1 (EPERM from the filter), got {o:?}"
    );
    Ok(())
}

/// A non-root user has no capability, and gets none from a program whose file carries
/// capabilities (`security.capability`, which an imported image keeps): inheritable ones (before
/// session 29 every process held the default set as inheritable, and a non-root one also as
/// permitted until its execve: such a file gave uid 1000 CAP_DAC_OVERRIDE and CAP_SETUID, and
/// `mkdir /made` in its read-only `/` succeeded; QA of session 29, CVE-2022-24769's pattern),
/// nor permitted ones (no_new_privs, as Docker's no-new-privileges: docs/security.md).
#[test]
fn a_non_root_user_gets_no_capability_from_a_file() -> Result<()> {
    if !mig_tests::is_root("isolation tests") {
        return Ok(());
    }
    let agent = Agent::start("isolation_fcaps")?;
    let dir = tempfile::tempdir()?;
    let root = busybox_rootfs(dir.path())?;
    // CAP_DAC_OVERRIDE and CAP_SETUID, as the file's inheritable or its permitted set.
    let caps: u32 = (1 << 1) | (1 << 7);
    for (name, permitted, inheritable) in [("inh", 0, caps), ("perm", caps, 0)] {
        // Named busybox: busybox runs the applet its name says.
        std::fs::create_dir_all(root.join("x").join(name))?;
        let file = root.join("x").join(name).join("busybox");
        std::fs::copy(root.join("bin/busybox"), &file)?;
        // VFS_CAP_REVISION_2 with the effective bit, then the low and high words of each set.
        let xattr: Vec<u8> = [0x0200_0001u32, permitted, inheritable, 0, 0]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        let path = std::ffi::CString::new(file.as_os_str().as_encoded_bytes())?;
        // SAFETY: both strings are NUL-terminated and the value is a live buffer of its length.
        let r = unsafe {
            libc::setxattr(
                path.as_ptr(),
                c"security.capability".as_ptr(),
                xattr.as_ptr().cast(),
                xattr.len(),
                0,
            )
        };
        ensure!(
            r == 0,
            "setxattr security.capability: {}",
            std::io::Error::last_os_error()
        );
    }
    agent.mig_ok(&[
        "image",
        "import",
        root.to_str().unwrap_or_default(),
        "--name",
        "fcaps",
    ])?;
    for name in ["inh", "perm"] {
        // The file itself, run as uid 1000.
        let file = format!("/x/{name}/busybox");
        let as_user = |args: &[&str]| {
            let mut all = vec!["run", "--rm", "-u", "1000", "fcaps", "--", file.as_str()];
            all.extend_from_slice(args);
            agent.mig(&all)
        };
        let status = as_user(&["grep", "^Cap", "/proc/self/status"]).stdout;
        for k in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
            let line = status
                .lines()
                .find(|l| l.starts_with(k))
                .with_context(|| format!("no {k} in {status}"))?;
            ensure!(
                line.ends_with("0000000000000000"),
                "uid 1000 through {file}: {line}"
            );
        }
        let made = as_user(&["mkdir", &format!("/made-{name}")]);
        ensure!(
            made.code != 0,
            "uid 1000 made a directory in / through {file}'s capabilities: {made:?}"
        );
    }
    Ok(())
}
