//! Root tests of `spawn` and `exec` against the real kernel: a busybox container observed from
//! the inside with a probe script.

mod container_support;

use container_support::{kv, no_cgroup, pipe, raw, read_to_end, spec, userns_map, Fixture, Proc};
use mig_runtime::container::{
    default_caps_mask, exec, spawn, ContainerError, ExecFailure, LaunchConfig, Step,
};
use nix::errno::Errno;
use std::collections::BTreeSet;

const PROBE: &str = r#"
echo "pid=$$"
echo "host=$(hostname)"
while read k v rest; do
  case "$k" in Seccomp:|CapEff:|CapBnd:|CapPrm:|NoNewPrivs:|SigIgn:|SigBlk:) echo "${k%:}=$v";; esac
done < /proc/self/status
if mount -t tmpfs x /mnt 2>/dev/null; then echo mount=allowed; else echo mount=denied; fi
if unshare -n true 2>/dev/null; then echo unshare=allowed; else echo unshare=denied; fi
echo "kcore=$(cat /proc/kcore | wc -c)"
echo "keys=$(cat /proc/keys | wc -c)"
echo "procsys=$(grep ' /proc/sys ' /proc/self/mountinfo | cut -d' ' -f6)"
echo "sysfs=$(grep ' /sys ' /proc/self/mountinfo | cut -d' ' -f6)"
if echo x > /proc/sysrq-trigger 2>/dev/null; then echo sysrq=writable; else echo sysrq=ro; fi
echo "net=$(ls /sys/class/net | tr '\n' ' ')"
echo "loflags=$(cat /sys/class/net/lo/flags)"
echo "ps=$(ps -o pid | tail -n +2 | tr '\n' ' ')"
echo "dev=$(ls -A /dev | tr '\n' ' ')"
echo "stdin=$(readlink /proc/$$/fd/0)"
fds=""; for f in /proc/$$/fd/*; do fds="$fds ${f##*/}"; done; echo "fds=$fds"
echo "cwd=$(pwd)"
echo "uid=$(id -u)"
echo "sid=$(cut -d' ' -f6 /proc/$$/stat)"
echo "uidmap=$(cat /proc/self/uid_map | tr -s ' ' | tr '\n' ';')"
echo end=1
"#;

/// Spawns `s` on `root` without a cgroup, waits for it, asserts it exited 0 and returns its
/// output.
fn run_to_end(s: &mig_runtime::spec::ContainerSpec, root: &std::path::Path, what: &str) -> String {
    let cg = no_cgroup();
    let (r, w) = pipe();
    let pid = spawn(&LaunchConfig {
        spec: s,
        rootfs: root,
        cgroup: &cg,
        output: raw(&w),
    })
    .expect(what);
    let mut init = Proc(pid);
    drop(w);
    let out = read_to_end(r);
    let status = init.wait();
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "status {status:#x}, output:\n{out}"
    );
    out
}

fn run_probe(test: &str, userns: bool) -> std::collections::HashMap<String, String> {
    let mut fx = Fixture::new(test);
    let root = fx.mount("merged");
    let mut s = spec(test, &["sh", "-c", PROBE]);
    if userns {
        s.userns = Some(userns_map());
    }
    let out = run_to_end(&s, &root, "spawn");
    let map = kv(&out);
    assert_eq!(
        map.get("end").map(String::as_str),
        Some("1"),
        "output:\n{out}"
    );
    assert_eq!(map["host"], s.hostname, "{out}");
    map
}

#[test]
fn container_isolation_seen_from_inside() {
    let m = run_probe("isolation", false);
    let caps = format!("{:016x}", default_caps_mask());
    assert_eq!(m["pid"], "1");
    assert_eq!(m["Seccomp"], "2");
    assert_eq!(m["NoNewPrivs"], "1");
    assert_eq!(m["CapEff"], caps);
    assert_eq!(m["CapPrm"], caps);
    assert_eq!(m["CapBnd"], caps);
    assert_eq!(m["mount"], "denied");
    assert_eq!(m["unshare"], "denied");
    // Nothing ignored or blocked leaks from the caller (Rust ignores SIGPIPE, for one); busybox
    // sh ignores SIGQUIT by itself.
    assert_eq!(m["SigIgn"], "0000000000000004");
    assert_eq!(m["SigBlk"], "0000000000000000");
    assert_eq!(m["kcore"], "0");
    assert_eq!(m["keys"], "0");
    assert!(m["procsys"].starts_with("ro"), "{m:?}");
    assert!(m["sysfs"].starts_with("ro"), "{m:?}");
    assert_eq!(m["sysrq"], "ro");
    assert_eq!(m["net"], "lo");
    let flags = u32::from_str_radix(m["loflags"].trim_start_matches("0x"), 16).unwrap();
    assert_eq!(
        flags & libc::IFF_UP as u32,
        libc::IFF_UP as u32,
        "loopback is up"
    );
    let pids: Vec<u32> = m["ps"]
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    // The init, the probe's pipeline, and nothing from the host.
    assert!(
        pids.contains(&1) && pids.len() <= 6 && pids.iter().all(|p| *p < 100),
        "ps: {pids:?}"
    );
    let dev: BTreeSet<&str> = m["dev"].split_whitespace().collect();
    let want: BTreeSet<&str> = [
        "fd", "full", "mqueue", "null", "ptmx", "pts", "random", "shm", "stderr", "stdin",
        "stdout", "tty", "urandom", "zero",
    ]
    .into();
    assert_eq!(dev, want);
    assert_eq!(m["stdin"], "/dev/null");
    // 0, 1, 2 and the directory the shell's own glob expansion holds open (3). The shell lists
    // its descriptors itself: a `$(ls ...)` pipeline made the list depend on when the shell's
    // transient pipe ends were closed. The host's view of an idle init is checked in the exec
    // test.
    let fds: BTreeSet<&str> = m["fds"].split_whitespace().collect();
    assert!(fds.is_subset(&["0", "1", "2", "3"].into()), "{m:?}");
    assert_eq!(m["cwd"], "/");
    assert_eq!(m["uid"], "0");
    assert_eq!(m["sid"], "1", "the init leads its own session");
}

#[test]
fn container_spawn_reports_typed_errors() {
    let mut fx = Fixture::new("typed_errors");
    let root = fx.mount("merged");
    let cg = no_cgroup();
    let (_r, w) = pipe();

    let s = spec("typed_errors", &["no-such-command"]);
    let err = spawn(&LaunchConfig {
        spec: &s,
        rootfs: &root,
        cgroup: &cg,
        output: raw(&w),
    })
    .unwrap_err();
    assert!(
        matches!(
            err,
            ContainerError::Step {
                step: Step::Exec,
                errno: Errno::ENOENT,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.exec_failure(), Some(ExecFailure::NotFound));

    // A missing working directory is created (see container_creates_a_missing_workdir); one
    // under a regular file cannot be.
    let mut s = spec("typed_errors", &["sh"]);
    s.process.cwd = "/bin/busybox/sub".into();
    let err = spawn(&LaunchConfig {
        spec: &s,
        rootfs: &root,
        cgroup: &cg,
        output: raw(&w),
    })
    .unwrap_err();
    assert!(
        matches!(
            err,
            ContainerError::Step {
                step: Step::Chdir,
                errno: Errno::ENOTDIR,
                ..
            }
        ),
        "{err:?}"
    );
    // A setup step failing is not the command missing.
    assert_eq!(err.exec_failure(), None);

    let s = spec("typed_errors", &["sh"]);
    let missing = fx.dir.path().join("not-a-rootfs");
    let err = spawn(&LaunchConfig {
        spec: &s,
        rootfs: &missing,
        cgroup: &cg,
        output: raw(&w),
    })
    .unwrap_err();
    assert!(
        matches!(
            err,
            ContainerError::Step {
                step: Step::BindRootfs,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn container_exec_joins_running_container() {
    let mut fx = Fixture::new("exec");
    let root = fx.mount("merged");
    let s = spec("exec", &["sleep", "1000"]);
    let cg = no_cgroup();
    let (_r, w) = pipe();
    let pid = spawn(&LaunchConfig {
        spec: &s,
        rootfs: &root,
        cgroup: &cg,
        output: raw(&w),
    })
    .expect("spawn");
    let _init = Proc(pid);
    // Seen from the host, the init holds exactly stdin (its own /dev/null) and the output pipe.
    let fds: BTreeSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(fds, ["0", "1", "2"].map(String::from).into());
    let out = std::fs::read_link(format!("/proc/{pid}/fd/1")).unwrap();
    assert!(out.to_string_lossy().starts_with("pipe:["), "{out:?}");

    let script = r#"echo "init=$(tr '\0' ' ' < /proc/1/cmdline)" > /tmp/exec.out
echo "host=$(hostname)" >> /tmp/exec.out
echo "mypid=$$" >> /tmp/exec.out
echo "extra=$EXTRA" >> /tmp/exec.out
while read k v rest; do case "$k" in Seccomp:|CapEff:|NoNewPrivs:) echo "${k%:}=$v";; esac; done < /proc/self/status >> /tmp/exec.out
exit 7"#;
    let args: Vec<String> = ["sh", "-c", script].iter().map(|s| s.to_string()).collect();
    let code = exec(pid, &s, &cg, &args, &["EXTRA=yes".into()]).expect("exec");
    assert_eq!(code, 7);
    let out = std::fs::read_to_string(root.join("tmp/exec.out")).unwrap();
    let m = kv(&out);
    assert_eq!(m["init"], "sleep 1000", "{out}");
    assert_eq!(m["host"], s.hostname);
    assert_ne!(m["mypid"], "1");
    assert!(m["mypid"].parse::<u32>().unwrap() < 20, "{out}");
    assert_eq!(m["extra"], "yes");
    assert_eq!(m["Seccomp"], "2");
    assert_eq!(m["NoNewPrivs"], "1");
    assert_eq!(m["CapEff"], format!("{:016x}", default_caps_mask()));

    let args: Vec<String> = ["sh", "-c", "kill -9 $$"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(exec(pid, &s, &cg, &args, &[]).expect("exec"), 128 + 9);

    let args = vec!["no-such-command".to_string()];
    let err = exec(pid, &s, &cg, &args, &[]).unwrap_err();
    assert!(
        matches!(
            err,
            ContainerError::Step {
                step: Step::Exec,
                errno: Errno::ENOENT,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.exec_failure(), Some(ExecFailure::NotFound));
    assert_eq!(ExecFailure::NotFound.exit_code(), 127);
    // A file that exists but is not executable (mode 0644), and a directory.
    for path in ["/etc/passwd", "/tmp"] {
        let err = exec(pid, &s, &cg, &[path.to_string()], &[]).unwrap_err();
        assert_eq!(
            err.exec_failure(),
            Some(ExecFailure::NotExecutable),
            "{err:?}"
        );
        assert_eq!(ExecFailure::NotExecutable.exit_code(), 126);
    }
    // A missing directory on the way is "not found" too.
    let err = exec(pid, &s, &cg, &["/etc/passwd/x".to_string()], &[]).unwrap_err();
    assert_eq!(err.exec_failure(), Some(ExecFailure::NotFound), "{err:?}");
}

#[test]
fn container_userns_maps_root() {
    let m = run_probe("userns", true);
    assert_eq!(m["pid"], "1");
    assert_eq!(m["uid"], "0");
    let map = userns_map();
    assert_eq!(
        m["uidmap"],
        format!("0 {} {};", map.host_id, map.size)
            .trim_start()
            .to_string()
    );
    assert_eq!(m["Seccomp"], "2");
    assert_eq!(m["net"], "lo");
    assert_eq!(m["kcore"], "0");
}

/// Kills whatever is left in the cgroup and removes it.
struct CgroupGuard(mig_runtime::cgroup::Cgroup);

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        for _ in 0..50 {
            if self.0.destroy().is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // The shared parent (`mig-test`) goes too when no other test uses it.
        for (_, dir) in &self.0.dirs {
            if let Some(parent) = dir.parent() {
                let _ = std::fs::remove_dir(parent);
            }
        }
    }
}

#[test]
fn container_init_and_exec_join_the_cgroup() {
    let name = format!("mig-test/container-cgroup-{}", std::process::id());
    let limits = mig_runtime::spec::Limits {
        pids: Some(64),
        ..Default::default()
    };
    let cg = CgroupGuard(mig_runtime::cgroup::Cgroup::create(&name, &limits).expect("cgroup"));
    assert!(!cg.0.procs_files().is_empty());
    let mut fx = Fixture::new("cgroup");
    let root = fx.mount("merged");
    let s = spec("cgroup", &["sleep", "1000"]);
    let (_r, w) = pipe();
    let pid = spawn(&LaunchConfig {
        spec: &s,
        rootfs: &root,
        cgroup: &cg.0,
        output: raw(&w),
    })
    .expect("spawn");
    let _init = Proc(pid);
    assert_eq!(cg.0.procs().unwrap(), vec![pid]);
    let args: Vec<String> = ["sh", "-c", "cat /proc/self/cgroup > /tmp/cg.txt"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(exec(pid, &s, &cg.0, &args, &[]).expect("exec"), 0);
    let seen = std::fs::read_to_string(root.join("tmp/cg.txt")).unwrap();
    let inside = seen.lines().filter(|l| l.ends_with(&name)).count();
    assert_eq!(inside, cg.0.dirs.len(), "every hierarchy: {seen}");
}

#[test]
fn container_exec_into_userns_container() {
    let mut fx = Fixture::new("exec_userns");
    let root = fx.mount("merged");
    let mut s = spec("exec_userns", &["sleep", "1000"]);
    s.userns = Some(userns_map());
    let cg = no_cgroup();
    let (_r, w) = pipe();
    let pid = spawn(&LaunchConfig {
        spec: &s,
        rootfs: &root,
        cgroup: &cg,
        output: raw(&w),
    })
    .expect("spawn");
    let _init = Proc(pid);
    let script = r#"echo "uid=$(id -u)" > /tmp/exec.out
echo "uidmap=$(cat /proc/self/uid_map | tr -s ' ' | tr '\n' ';')" >> /tmp/exec.out
echo "init=$(tr '\0' ' ' < /proc/1/cmdline)" >> /tmp/exec.out"#;
    let args: Vec<String> = ["sh", "-c", script].iter().map(|s| s.to_string()).collect();
    assert_eq!(exec(pid, &s, &cg, &args, &[]).expect("exec"), 0);
    let out = std::fs::read_to_string(root.join("tmp/exec.out")).unwrap();
    let m = kv(&out);
    assert_eq!(m["uid"], "0", "{out}");
    assert_eq!(
        m["uidmap"],
        format!("0 {} {};", userns_map().host_id, userns_map().size)
    );
    assert_eq!(m["init"], "sleep 1000");
    // The file the container's root wrote belongs to the mapped host uid.
    let owner =
        std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(root.join("tmp/exec.out")).unwrap());
    assert_eq!(owner, userns_map().host_id);
}

/// An image without /proc, /dev and /sys (the init mounts there) runs in a user namespace, and the
/// container's root may write in `/` (the writable layer's root is its own) and in a 1777 /tmp.
#[test]
fn container_userns_image_without_mount_points() {
    let mut fx = Fixture::new("userns_bare");
    for d in ["proc", "dev", "sys"] {
        std::fs::remove_dir(fx.lower().join(d)).unwrap();
    }
    let root = fx.mount("merged");
    let script = r#"echo top > /top.txt && cat /top.txt
mkdir /newdir && echo sub > /newdir/f && cat /newdir/f
echo tmp > /tmp/t.txt && cat /tmp/t.txt
echo "rootowner=$(stat -c %u:%g /)"
echo "procowner=$(stat -c %u /proc/1)"
echo "devnull=$(echo x > /dev/null && echo ok)"
echo "sysnet=$(ls /sys/class/net)"
echo end=1"#;
    let mut s = spec("userns_bare", &["sh", "-c", script]);
    s.userns = Some(userns_map());
    let cg = no_cgroup();
    let (r, w) = pipe();
    let pid = spawn(&LaunchConfig {
        spec: &s,
        rootfs: &root,
        cgroup: &cg,
        output: raw(&w),
    })
    .expect("spawn");
    let mut init = Proc(pid);
    drop(w);
    let out = read_to_end(r);
    let status = init.wait();
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "status {status:#x}, output:\n{out}"
    );
    let m = kv(&out);
    assert_eq!(m.get("end").map(String::as_str), Some("1"), "{out}");
    assert!(out.starts_with("top\nsub\ntmp\n"), "{out}");
    assert_eq!(m["rootowner"], "0:0", "{out}");
    assert_eq!(m["procowner"], "0", "{out}");
    assert_eq!(m["devnull"], "ok", "{out}");
    assert_eq!(m["sysnet"], "lo", "{out}");
    // On the host: the files are in the writable layer, owned by the mapped root.
    use std::os::unix::fs::MetadataExt;
    let host_id = userns_map().host_id;
    for f in ["top.txt", "newdir/f", "tmp/t.txt", "proc", "dev", "sys", ""] {
        let md = std::fs::symlink_metadata(fx.upper().join(f)).unwrap();
        assert_eq!((md.uid(), md.gid()), (host_id, host_id), "upper/{f}");
    }
    // The image layer itself is untouched.
    for d in ["proc", "dev", "sys", "top.txt"] {
        assert!(!fx.lower().join(d).exists(), "lower/{d}");
    }
    assert_eq!(std::fs::metadata(fx.lower()).unwrap().uid(), 0);
}

/// A working directory missing from the image is created with its missing parents, owned by
/// the command's user and group (podman's and runc's behaviour; the start used to fail at
/// "changing to the working directory" with ENOENT). Directories that exist keep their owner.
/// With a user namespace the owner is the container's uid, mapped on the host.
#[test]
fn container_creates_a_missing_workdir() {
    for userns in [false, true] {
        let test = if userns { "workdir_userns" } else { "workdir" };
        let mut fx = Fixture::new(test);
        let root = fx.mount("merged");
        let script = "echo cwd=$(pwd); echo app=$(stat -c %u:%g:%a /srv/app); \
                      echo srv=$(stat -c %u:%g /srv); echo tmp=$(stat -c %u:%g /tmp); \
                      touch f && echo write=ok";
        let mut s = spec(test, &["sh", "-c", script]);
        s.process.cwd = "/srv/./app/".into();
        s.process.uid = 1000;
        s.process.gid = 1001;
        if userns {
            s.userns = Some(userns_map());
        }
        let out = run_to_end(&s, &root, "spawn with a missing working directory");
        let m = kv(&out);
        assert_eq!(m.get("cwd").map(String::as_str), Some("/srv/app"), "{out}");
        assert_eq!(m["app"], "1000:1001:755", "{out}");
        assert_eq!(m["srv"], "1000:1001", "{out}");
        if !userns {
            // (The image's root-owned files show as the overflow id in a user namespace.)
            assert_eq!(
                m["tmp"], "0:0",
                "an existing directory keeps its owner: {out}"
            );
        }
        assert_eq!(m.get("write").map(String::as_str), Some("ok"), "{out}");
        // In the writable layer, owned by the (mapped) user on the host.
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(fx.upper().join("srv/app")).expect("srv/app in upper");
        let base = if userns { userns_map().host_id } else { 0 };
        assert_eq!((meta.uid(), meta.gid()), (base + 1000, base + 1001));
    }
}
