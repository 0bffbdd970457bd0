//! Pure checks on the names found in archives: entry paths, hardlink names and symlink targets.
//!
//! Policy (what the unpacker refuses, and why):
//!
//! - Entry paths and hardlink names must be relative and must not contain `..`: an archive entry
//!   names a place inside the layer, nothing else. Empty and `.` components are dropped, so
//!   `./bin//sh` is `bin/sh`. A NUL byte or a name longer than [`MAX_PATH`] bytes is refused.
//! - Symlink targets are stored as they are, never followed by the unpacker (every parent
//!   directory is checked to be a real directory before anything is created in it). An absolute
//!   target (`/bin/sh -> /bin/busybox`) is accepted: it resolves inside the container's root.
//!   A relative target is resolved lexically from the link's directory and refused when it climbs
//!   above the layer root (`etc/x -> ../../host`): such a link points at host files whenever a
//!   host tool reads the layer directory, and no well-formed image needs one.

use std::path::PathBuf;

/// Longest accepted entry name or link target, in bytes (PATH_MAX).
pub const MAX_PATH: usize = 4096;

/// Why a name from an archive is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("absolute path")]
    Absolute,
    #[error("path has a `..` component")]
    DotDot,
    #[error("path is longer than {MAX_PATH} bytes")]
    TooLong,
    #[error("path contains a NUL byte")]
    Nul,
    #[error("symlink target is empty")]
    EmptyTarget,
    #[error("symlink target escapes the layer root")]
    EscapingTarget,
}

/// A normalized relative path inside a layer: its components, none empty, `.` or `..`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RelPath(Vec<Vec<u8>>);

impl RelPath {
    /// The layer root itself (an entry named `./`).
    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }
    pub fn components(&self) -> &[Vec<u8>] {
        &self.0
    }
    /// The last component, or `None` for the root.
    pub fn file_name(&self) -> Option<&[u8]> {
        self.0.last().map(Vec::as_slice)
    }
    /// The parent directory (the root's parent is the root).
    pub fn parent(&self) -> RelPath {
        let n = self.0.len().saturating_sub(1);
        RelPath(self.0[..n].to_vec())
    }
    /// `self` with `name` appended.
    pub fn join(&self, name: &[u8]) -> RelPath {
        let mut v = self.0.clone();
        v.push(name.to_vec());
        RelPath(v)
    }
    /// True when `self` is `other` or inside it.
    pub fn starts_with(&self, other: &RelPath) -> bool {
        self.0.starts_with(&other.0)
    }
    /// The path as a relative filesystem path (empty for the root).
    pub fn to_path(&self) -> PathBuf {
        use std::os::unix::ffi::OsStrExt;
        let mut p = PathBuf::new();
        for c in &self.0 {
            p.push(std::ffi::OsStr::from_bytes(c));
        }
        p
    }
}

impl std::fmt::Display for RelPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<_> = self.0.iter().map(|c| String::from_utf8_lossy(c)).collect();
        write!(f, "{}", parts.join("/"))
    }
}

fn check_bytes(raw: &[u8]) -> Result<(), PathError> {
    if raw.len() > MAX_PATH {
        return Err(PathError::TooLong);
    }
    if raw.contains(&0) {
        return Err(PathError::Nul);
    }
    Ok(())
}

/// Normalizes an entry path or hardlink name from an archive.
pub fn entry_path(raw: &[u8]) -> Result<RelPath, PathError> {
    check_bytes(raw)?;
    if raw.first() == Some(&b'/') {
        return Err(PathError::Absolute);
    }
    let mut out = Vec::new();
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err(PathError::DotDot),
            _ => out.push(c.to_vec()),
        }
    }
    Ok(RelPath(out))
}

/// Checks the target of a symlink stored at `link` (see the module documentation).
pub fn symlink_target(link: &RelPath, target: &[u8]) -> Result<(), PathError> {
    check_bytes(target)?;
    if target.is_empty() {
        return Err(PathError::EmptyTarget);
    }
    if target[0] == b'/' {
        return Ok(());
    }
    let mut depth = link.components().len().saturating_sub(1);
    for c in target.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                depth = depth.checked_sub(1).ok_or(PathError::EscapingTarget)?;
            }
            _ => depth += 1,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        entry_path(s.as_bytes()).unwrap()
    }

    #[test]
    fn normalizes_entry_paths() {
        assert_eq!(p("./bin//sh").to_path(), PathBuf::from("bin/sh"));
        assert_eq!(p("bin/").to_path(), PathBuf::from("bin"));
        assert!(p("./").is_root());
        assert!(p("").is_root());
        assert_eq!(p("a/./b").components().len(), 2);
        assert_eq!(p("a/b").parent(), p("a"));
        assert_eq!(p("a").parent(), p("."));
        assert_eq!(p("a/b").file_name(), Some(&b"b"[..]));
        assert!(p("a/b/c").starts_with(&p("a/b")));
        assert!(!p("a/bc").starts_with(&p("a/b")));
        assert_eq!(p("x/y").to_string(), "x/y");
    }

    #[test]
    fn refuses_bad_entry_paths() {
        assert_eq!(entry_path(b"/etc/passwd"), Err(PathError::Absolute));
        assert_eq!(entry_path(b"../x"), Err(PathError::DotDot));
        assert_eq!(entry_path(b"a/../../x"), Err(PathError::DotDot));
        assert_eq!(entry_path(b"a/.."), Err(PathError::DotDot));
        assert_eq!(entry_path(b"a\0b"), Err(PathError::Nul));
        assert_eq!(entry_path(&[b'a'; MAX_PATH + 1]), Err(PathError::TooLong));
        assert!(entry_path(&[b'a'; MAX_PATH]).is_ok());
        // `..` inside a name is just a name.
        assert!(entry_path(b"a/..b/c..").is_ok());
    }

    #[test]
    fn symlink_targets() {
        let link = p("bin/sh");
        assert_eq!(symlink_target(&link, b"/bin/busybox"), Ok(()));
        assert_eq!(symlink_target(&link, b"busybox"), Ok(()));
        assert_eq!(symlink_target(&link, b"../usr/bin/x"), Ok(()));
        assert_eq!(symlink_target(&link, b"./../."), Ok(()));
        assert_eq!(
            symlink_target(&link, b"../../etc/shadow"),
            Err(PathError::EscapingTarget)
        );
        // Climbing out and back in still escapes at some point: refused.
        assert_eq!(
            symlink_target(&link, b"../../bin/x"),
            Err(PathError::EscapingTarget)
        );
        assert_eq!(
            symlink_target(&p("top"), b".."),
            Err(PathError::EscapingTarget)
        );
        assert_eq!(symlink_target(&p("top"), b"."), Ok(()));
        assert_eq!(symlink_target(&link, b""), Err(PathError::EmptyTarget));
        assert_eq!(symlink_target(&link, b"a\0"), Err(PathError::Nul));
        assert_eq!(
            symlink_target(&link, &[b'a'; MAX_PATH + 1]),
            Err(PathError::TooLong)
        );
        assert_eq!(symlink_target(&p("a/b/c/d"), b"../../../x"), Ok(()));
        assert_eq!(
            symlink_target(&p("a/b/c/d"), b"../../../../x"),
            Err(PathError::EscapingTarget)
        );
    }
}
