//! Reading the reason of a failure out of a CRIU log (`-v4 -o FILE`).
//!
//! CRIU logs a line per step; a failure ends with a few lines containing `Error (file:line):`
//! followed by `Dumping FAILED.` or `Restoring FAILED.`. Only the tail of the log is read.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// How much of the end of a log is searched.
const TAIL_BYTES: u64 = 256 << 10;
/// How many lines an error carries.
pub const MAX_ERROR_LINES: usize = 5;
/// Error lines CRIU prints on every run on hosts where root cannot raise RLIMIT_NOFILE; they say
/// nothing about the failure.
const HARMLESS: &[&str] = &[
    "Can't setup RLIMIT_NOFILE",
    // Every page request over a `--ps-socket` Unix socket (stream and lazy modes) logs it.
    "Unable to set TCP_NODELAY",
];

/// The last (at most [`MAX_ERROR_LINES`]) error lines of the log at `path`; when the log has none,
/// its last non-empty lines. Empty when the log cannot be read.
pub fn error_lines(path: &Path) -> Vec<String> {
    match read_tail(path) {
        Ok(text) => pick_error_lines(&text),
        Err(_) => Vec::new(),
    }
}

fn read_tail(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES)))?;
    let mut buf = Vec::new();
    f.take(TAIL_BYTES).read_to_end(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Picks the lines that explain a failure from the text of a log.
pub fn pick_error_lines(text: &str) -> Vec<String> {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .filter(|l| !HARMLESS.iter().any(|h| l.contains(h)))
        .collect();
    let mut errors: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.contains("Error") || l.contains("error") || l.contains("FAILED"))
        .collect();
    if errors.is_empty() {
        errors = lines;
    }
    let start = errors.len().saturating_sub(MAX_ERROR_LINES);
    let mut picked: Vec<String> = errors[start..]
        .iter()
        .map(|l| l.chars().take(400).collect())
        .collect();
    // What CRIU's words mean to a mig user, first.
    if let Some((_, hint)) = HINTS
        .iter()
        .find(|(needle, _)| picked.iter().any(|l| l.contains(needle)))
    {
        picked.insert(0, (*hint).to_owned());
    }
    picked
}

/// CRIU's words for a failure, and what they mean to a mig user.
const HINTS: &[(&str, &str)] = &[
    // CRIU names its own option; mig's flag of the same name is what a user can pass. mig
    // checks for connections before it freezes, so this is one made in between.
    (
        "consider using --tcp-established option",
        "the container opened a TCP connection after mig checked for them: move or checkpoint it again, with --tcp-established to keep its connections (docs/networking.md)",
    ),
    // A process CRIU could not stop: asleep in the kernel (state D) for all of CRIU's timeout.
    // mig's freeze already avoids the common case, a shell between vfork and exec.
    // readlink of /proc/PID/cwd or /proc/PID/fd/N on a path over PATH_MAX (QA of session 26:
    // a process working in a directory 5,000 bytes deep).
    (
        "File name too long",
        "a process of the container has its working directory or an open file at a path longer than the kernel's 4096 bytes, which CRIU cannot read: move that process to a shorter path (or close the file) to checkpoint or move the container",
    ),
    (
        "Unseizable non-zombie",
        "a process of the container stayed asleep in the kernel (state D: waiting for a disk, a network filesystem, or a vfork child) for all of CRIU's 10 s, and could not be stopped; the container runs on: try again",
    ),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_too_long_is_explained() {
        let log = "(00.02) Error (criu/files.c:1266): Can't read link of fd 18: File name too long\n(00.04) Error (criu/cr-dump.c:2111): Dumping FAILED.";
        let got = pick_error_lines(log);
        assert!(got[0].contains("4096 bytes"), "{got:?}");
    }

    #[test]
    fn a_connection_made_after_the_check_is_explained_with_migs_flag() {
        let log = "(00.03) Error (criu/sk-inet.c:200): inet: Connected TCP socket, consider using --tcp-established option.\n(00.04) Error (criu/cr-dump.c:2111): Dumping FAILED.";
        let got = pick_error_lines(log);
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(got[0].contains("mig checked") && got[0].contains("--tcp-established"));
        assert!(
            pick_error_lines("(00.04) Error (criu/cr-dump.c:2111): Dumping FAILED.")
                .iter()
                .all(|l| !l.contains("mig checked"))
        );
    }

    #[test]
    fn picks_last_errors_without_the_rlimit_noise() {
        let log = [
            "(00.01) Error (criu/util.c:1533): rlimit: Can't setup RLIMIT_NOFILE for self: \
             Operation not permitted",
            "(00.02) info",
            "(00.03) Error (criu/namespaces.c:460): Can't dump nested pid namespace for 12178",
            "(00.04) Error (criu/cr-dump.c:2111): Dumping FAILED.",
        ]
        .join("\n");
        let log = log.as_str();
        let got = pick_error_lines(log);
        assert_eq!(got.len(), 2);
        assert!(got[0].contains("nested pid namespace"));
    }

    #[test]
    fn falls_back_to_last_lines_and_bounds_count() {
        let log: String = (0..20).map(|i| format!("line {i}\n")).collect();
        let got = pick_error_lines(&log);
        assert_eq!(
            got,
            vec!["line 15", "line 16", "line 17", "line 18", "line 19"]
        );
        assert!(error_lines(Path::new("/nonexistent/log")).is_empty());
    }

    #[test]
    fn the_last_lines_leave_out_the_socketpair_noise() {
        let log = "(00.1) Restoring pages\n\
                   (00.2) Warn  (criu/page-xfer.c:97): Unable to set TCP_NODELAY: Operation not supported\n\
                   (00.3) uffd: 42: Fetching pages\n\
                   (00.4) Warn  (criu/page-xfer.c:97): Unable to set TCP_NODELAY: Operation not supported\n";
        let picked = pick_error_lines(log);
        assert_eq!(
            picked.last().map(String::as_str),
            Some("(00.3) uffd: 42: Fetching pages")
        );
        assert!(
            picked.iter().all(|l| !l.contains("TCP_NODELAY")),
            "{picked:?}"
        );
    }
}
