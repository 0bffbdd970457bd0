//! The bench image (busybox and `mig-memload`) and the workload's status lines.

use super::BenchError;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where the workload lives in the image.
pub const MEMLOAD_PATH: &str = "/bin/mig-memload";

fn prep(path: &Path) -> impl FnOnce(std::io::Error) -> BenchError + '_ {
    move |source| BenchError::Prepare {
        path: path.to_path_buf(),
        source,
    }
}

/// Makes `<work>/rootfs`: busybox with its applets, `mig-memload` at [`MEMLOAD_PATH`] and, when it
/// is dynamically linked, the libraries `ldd` names at their host paths.
pub fn build_rootfs(work: &Path, memload: &Path) -> Result<PathBuf, BenchError> {
    let root = work.join("rootfs");
    for d in ["bin", "proc", "dev", "sys", "tmp", "etc", "root"] {
        let p = root.join(d);
        std::fs::create_dir_all(&p).map_err(prep(&p))?;
    }
    let busybox = root.join("bin/busybox");
    std::fs::copy("/bin/busybox", &busybox).map_err(prep(&busybox))?;
    for applet in ["sh", "cat", "ls", "ps", "sleep"] {
        let p = root.join("bin").join(applet);
        std::os::unix::fs::symlink("busybox", &p).map_err(prep(&p))?;
    }
    let target = root.join(MEMLOAD_PATH.trim_start_matches('/'));
    std::fs::copy(memload, &target).map_err(prep(&target))?;
    for lib in shared_libraries(memload)? {
        let dest = root.join(lib.strip_prefix("/").unwrap_or(&lib));
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(prep(parent))?;
        }
        std::fs::copy(&lib, &dest).map_err(prep(&dest))?;
    }
    let passwd = root.join("etc/passwd");
    std::fs::write(&passwd, "root:x:0:0:root:/root:/bin/sh\n").map_err(prep(&passwd))?;
    Ok(root)
}

/// The absolute library paths `ldd` lists for `bin` (none for a static binary).
fn shared_libraries(bin: &Path) -> Result<Vec<PathBuf>, BenchError> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .map_err(|source| BenchError::Spawn {
            command: format!("ldd {}", bin.display()),
            source,
        })?;
    // `ldd` fails ("not a dynamic executable") on a static binary.
    if !out.status.success() {
        return Ok(Vec::new());
    }
    Ok(parse_ldd(&String::from_utf8_lossy(&out.stdout)))
}

fn parse_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// What the workload has printed so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Status {
    pub ready: bool,
    /// The last `OK <n> passes <p>` line: (n, p).
    pub last_ok: Option<(u64, u64)>,
    /// The first `BAD` line's counter.
    pub bad: Option<u64>,
    /// The workload's exit code, once it has ended (it never does by itself).
    pub exited: Option<i64>,
}

impl Status {
    pub fn parse(log: &str) -> Status {
        let mut s = Status::default();
        for line in log.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["READY", ..] => s.ready = true,
                ["OK", n, "passes", p] => {
                    if let (Ok(n), Ok(p)) = (n.parse(), p.parse()) {
                        s.last_ok = Some((n, p));
                    }
                }
                ["BAD", n, ..] if s.bad.is_none() => s.bad = Some(n.parse().unwrap_or(0)),
                _ => {}
            }
        }
        s
    }

    /// Whether the workload, last seen at `before` (counter, passes) before a move, has since
    /// counted on and completed a whole verification pass that started after the move: the pass in
    /// progress at `before` may end before the freeze, so two more must end.
    pub fn verified_after(&self, before: (u64, u64)) -> bool {
        self.bad.is_none()
            && self
                .last_ok
                .is_some_and(|(n, p)| n > before.0 && p >= before.1 + 3)
    }
}

/// MiB the workload verifies per second: a pass over `size_mib` takes at most two seconds.
pub fn verify_mib(size_mib: u64) -> u64 {
    256.max(size_mib.div_ceil(2))
}

/// The workload's command line in the image.
pub fn command(size_mib: u64, dirty_mib: u64) -> Vec<String> {
    vec![
        MEMLOAD_PATH.to_string(),
        "--mib".into(),
        size_mib.to_string(),
        "--dirty-mib".into(),
        dirty_mib.to_string(),
        "--verify-mib".into(),
        verify_mib(size_mib).to_string(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_parses() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x7f)\n\t/lib64/ld-linux-x86-64.so.2 (0x7f)\n";
        assert_eq!(
            parse_ldd(text),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
    }

    #[test]
    fn status_lines_parse() {
        let s = Status::parse("READY 16\nCOUNT 1\nOK 1 passes 1\nCOUNT 2\nOK 2 passes 2\n");
        assert!(s.ready);
        assert_eq!(s.last_ok, Some((2, 2)));
        assert!(!s.verified_after((1, 0)));
        let s = Status::parse("READY 16\nOK 9 passes 3\n");
        assert!(s.verified_after((1, 0)));
        let s = Status::parse("OK 9 passes 3\nBAD 10 offset 8\n");
        assert_eq!(s.bad, Some(10));
        assert!(!s.verified_after((1, 0)));
        assert_eq!(verify_mib(16), 256);
        assert_eq!(verify_mib(1024), 512);
    }
}
