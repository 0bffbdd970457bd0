//! Extended attributes by path without following symlinks (nix has no wrapper for them).

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn cstr(p: &[u8]) -> io::Result<CString> {
    CString::new(p).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// The value of xattr `name` on `path` (at most 256 bytes), or `None` when absent or unreadable.
pub fn lgetxattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let p = cstr(path.as_os_str().as_bytes()).ok()?;
    let n = cstr(name.as_bytes()).ok()?;
    let mut buf = [0u8; 256];
    // SAFETY: both strings are NUL-terminated and live across the call; the kernel writes at most
    // `buf.len()` bytes into `buf`.
    let len =
        unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    let len = usize::try_from(len).ok()?;
    buf.get(..len).map(<[u8]>::to_vec)
}

/// Sets xattr `name` on `path` to `value`.
pub fn lsetxattr(path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    lsetxattr_bytes(path, name.as_bytes(), value)
}

/// [`lsetxattr`] for a name given as bytes.
pub fn lsetxattr_bytes(path: &Path, name: &[u8], value: &[u8]) -> io::Result<()> {
    let p = cstr(path.as_os_str().as_bytes())?;
    let n = cstr(name)?;
    // SAFETY: both strings are NUL-terminated and live across the call; `value` is a valid
    // slice of `value.len()` bytes the kernel only reads.
    let r = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Removes xattr `name` from `path` (not following a symlink).
pub fn lremovexattr(path: &Path, name: &[u8]) -> io::Result<()> {
    let p = cstr(path.as_os_str().as_bytes())?;
    let n = cstr(name)?;
    // SAFETY: both strings are NUL-terminated and live across the call.
    if unsafe { libc::lremovexattr(p.as_ptr(), n.as_ptr()) } < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Names of the extended attributes of `path` (not following a symlink).
pub fn llistxattr(path: &Path) -> io::Result<Vec<Vec<u8>>> {
    let p = cstr(path.as_os_str().as_bytes())?;
    let mut buf = vec![0u8; 1024];
    loop {
        // SAFETY: `p` is NUL-terminated and lives across the call; the kernel writes at most
        // `buf.len()` bytes into `buf`.
        let len = unsafe { libc::llistxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if len >= 0 {
            buf.truncate(len as usize);
            return Ok(buf
                .split(|b| *b == 0)
                .filter(|n| !n.is_empty())
                .map(<[u8]>::to_vec)
                .collect());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ERANGE) || buf.len() >= XATTR_MAX {
            return Err(e);
        }
        buf.resize(buf.len() * 4, 0);
    }
}

/// The largest list or value read (the kernel's own limit, `XATTR_SIZE_MAX`).
const XATTR_MAX: usize = 64 << 10;

/// The whole value of xattr `name` on `path` (not following a symlink).
pub fn lgetxattr_value(path: &Path, name: &[u8]) -> io::Result<Vec<u8>> {
    let p = cstr(path.as_os_str().as_bytes())?;
    let n = cstr(name)?;
    let mut buf = vec![0u8; 256];
    loop {
        // SAFETY: both strings are NUL-terminated and live across the call; the kernel writes
        // at most `buf.len()` bytes into `buf`.
        let len =
            unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if len >= 0 {
            buf.truncate(len as usize);
            return Ok(buf);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ERANGE) || buf.len() >= XATTR_MAX {
            return Err(e);
        }
        buf.resize((buf.len() * 4).min(XATTR_MAX), 0);
    }
}
