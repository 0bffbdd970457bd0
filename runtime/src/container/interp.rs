//! Why an exec that failed with ENOENT failed, when the command's file is there: the kernel
//! answers ENOENT as well when a program's ELF interpreter (its dynamic loader) or a script's
//! `#!` interpreter is missing, and "the command is not in the image" then sends the user
//! looking for a file that exists (QA of session 26: a dynamically linked program in a busybox
//! image).
//!
//! The files belong to the container: they are opened below its root with `RESOLVE_IN_ROOT`
//! (a symlink cannot lead to the host's files), and only the first bytes are read.

use super::sys;
use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// Longest interpreter path read from a file.
const MAX_INTERP: u64 = 4096;

/// A command whose file is in the container but whose interpreter is not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingInterpreter {
    /// The command's file, as the container sees it.
    pub file: String,
    /// The interpreter it names (`PT_INTERP` of an ELF file, or the `#!` line's).
    pub interpreter: String,
    /// Whether the interpreter comes from a `#!` line (else from the ELF header).
    pub script: bool,
}

/// The file `cmd` runs (searched in `path`, the `PATH` value, when it has no `/`; relative to
/// `cwd` otherwise) in the container whose root directory is `root` on the host, when it is
/// there and its interpreter is not. `None` when the file is missing, or its interpreter is there,
/// or it names none.
pub fn missing_interpreter(
    root: &Path,
    cmd: &str,
    cwd: &str,
    path: &str,
) -> Option<MissingInterpreter> {
    let dir = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(root)
        .ok()?;
    let candidates: Vec<String> = if cmd.contains('/') {
        vec![if cmd.starts_with('/') {
            cmd.to_owned()
        } else {
            format!("{}/{cmd}", cwd.trim_end_matches('/'))
        }]
    } else {
        path.split(':')
            .map(|d| if d.is_empty() { "." } else { d })
            .map(|d| format!("{}/{cmd}", d.trim_end_matches('/')))
            .collect()
    };
    let found = candidates
        .into_iter()
        .find_map(|c| open_file(&dir, &c).map(|f| (c, f)));
    let (file, f) = found?;
    let (interpreter, script) = interpreter_of(&f)?;
    if open_file(&dir, &interpreter).is_some() {
        return None;
    }
    Some(MissingInterpreter {
        file,
        interpreter,
        script,
    })
}

/// Opens regular file `path` (absolute or relative to the root) below `dir`.
fn open_file(dir: &File, path: &str) -> Option<File> {
    let rel = CString::new(path.trim_start_matches('/')).ok()?;
    let fd = sys::open_in_root(dir.as_raw_fd(), &rel, libc::O_RDONLY | libc::O_NOFOLLOW).ok();
    // O_NOFOLLOW refuses only a final symlink: open it again following it, still in the root.
    let fd = match fd {
        Some(fd) => fd,
        None => sys::open_in_root(dir.as_raw_fd(), &rel, libc::O_RDONLY).ok()?,
    };
    let f = File::from(fd);
    f.metadata().ok()?.is_file().then_some(f)
}

/// The interpreter a file names: its `#!` line's program, or its ELF `PT_INTERP`.
fn interpreter_of(f: &File) -> Option<(String, bool)> {
    let mut head = [0u8; 256];
    let n = f.read_at(&mut head, 0).ok()?;
    let head = &head[..n];
    if let Some(line) = head.strip_prefix(b"#!") {
        let line = line.split(|b| *b == b'\n').next()?;
        let text = std::str::from_utf8(line).ok()?;
        let prog = text.split_ascii_whitespace().next()?;
        return Some((prog.to_owned(), true));
    }
    elf_interp(f, head).map(|i| (i, false))
}

/// `PT_INTERP` of an ELF file whose first bytes are `head`.
fn elf_interp(f: &File, head: &[u8]) -> Option<String> {
    if head.len() < 64 || &head[..4] != b"\x7fELF" {
        return None;
    }
    let wide = match head[4] {
        1 => false,
        2 => true,
        _ => return None,
    };
    let little = match head[5] {
        1 => true,
        2 => false,
        _ => return None,
    };
    let num = |b: &[u8]| -> u64 {
        let mut v = 0u64;
        for (i, byte) in b.iter().enumerate() {
            let shift = if little { i } else { b.len() - 1 - i };
            v |= u64::from(*byte) << (8 * shift);
        }
        v
    };
    let (phoff, phentsize, phnum) = if wide {
        (num(&head[32..40]), num(&head[54..56]), num(&head[56..58]))
    } else {
        (num(&head[28..32]), num(&head[42..44]), num(&head[44..46]))
    };
    let mut ph = vec![0u8; phentsize as usize];
    for i in 0..phnum.min(256) {
        f.read_exact_at(&mut ph, phoff + i * phentsize).ok()?;
        if ph.len() < 24 || num(&ph[0..4]) != 3 {
            continue;
        }
        // PT_INTERP: p_offset and p_filesz.
        let (off, size) = if wide {
            (num(&ph[8..16]), num(&ph[32..40]))
        } else {
            (num(&ph[4..8]), num(&ph[16..20]))
        };
        let mut name = vec![0u8; size.min(MAX_INTERP) as usize];
        let n = f.read_at(&mut name, off).ok()?;
        name.truncate(n);
        let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
        return String::from_utf8(name[..end].to_vec()).ok();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_interpreters_are_found() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir_all(r.join("bin")).unwrap();
        std::fs::create_dir_all(r.join("usr/bin")).unwrap();
        // A script whose interpreter is missing, and one whose interpreter is there.
        std::fs::write(r.join("bin/py"), "#!/usr/bin/python3 -u\nprint(1)\n").unwrap();
        std::fs::write(r.join("bin/ok"), "#! /bin/sh\necho\n").unwrap();
        std::fs::write(r.join("bin/sh"), "").unwrap();
        // This test's own binary: a dynamically linked ELF whose loader the root lacks.
        let me = std::fs::read("/proc/self/exe").unwrap();
        std::fs::write(r.join("usr/bin/prog"), &me).unwrap();
        // An absolute symlink must resolve inside the root, not on the host.
        std::os::unix::fs::symlink("/usr/bin/prog", r.join("bin/link")).unwrap();
        let path = "/usr/local/bin:/usr/bin:/bin";
        assert_eq!(
            missing_interpreter(r, "py", "/", path),
            Some(MissingInterpreter {
                file: "/bin/py".into(),
                interpreter: "/usr/bin/python3".into(),
                script: true,
            })
        );
        assert_eq!(missing_interpreter(r, "/bin/ok", "/", path), None);
        assert_eq!(missing_interpreter(r, "nosuch", "/", path), None);
        let elf = missing_interpreter(r, "prog", "/", path).expect("the loader is missing");
        assert_eq!(elf.file, "/usr/bin/prog");
        assert!(!elf.script);
        assert!(
            elf.interpreter.starts_with('/') && elf.interpreter.contains("ld"),
            "{elf:?}"
        );
        let linked = missing_interpreter(r, "../bin/link", "/usr", path).expect("through the link");
        assert_eq!(linked.interpreter, elf.interpreter);
        // With the loader in the root, nothing is missing.
        let loader = r.join(elf.interpreter.trim_start_matches('/'));
        std::fs::create_dir_all(loader.parent().unwrap()).unwrap();
        std::fs::write(&loader, "").unwrap();
        assert_eq!(missing_interpreter(r, "prog", "/", path), None);
    }
}
