//! Resolves an OCI config's `User` (`name`, `uid`, `name:group`, `uid:gid`) to the numeric
//! `uid:gid` an [`super::ImageConfig`] holds, from the image's own /etc/passwd and /etc/group
//! (the topmost layer that has them). As in Docker, a numeric uid without a passwd entry gets
//! gid 0.

use super::ImageError;
use std::fs::{self, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Largest passwd or group file read.
const MAX_DB: u64 = 1 << 20;

/// Reads `etc/<file>` from the topmost layer that has it, checking that neither `etc` nor the
/// file is a symlink (a layer's symlinks point into the container, not the host). A whiteout
/// (or anything other than a regular file) hides the file.
fn read_db(layers: &[PathBuf], file: &str) -> Result<Option<String>, ImageError> {
    for l in layers.iter().rev() {
        let etc = l.join("etc");
        match fs::symlink_metadata(&etc) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(ImageError::io("inspecting", &etc)(e)),
        }
        let p = etc.join(file);
        match fs::symlink_metadata(&p) {
            Ok(m) if m.is_file() => {}
            Ok(_) => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(ImageError::io("inspecting", &p)(e)),
        }
        let f = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&p)
            .map_err(ImageError::io("opening", &p))?;
        let mut data = Vec::new();
        f.take(MAX_DB)
            .read_to_end(&mut data)
            .map_err(ImageError::io("reading", &p))?;
        return Ok(Some(String::from_utf8_lossy(&data).into_owned()));
    }
    Ok(None)
}

/// Finds `key` in field 0 (by name) or field 2 (by id) of a colon-separated database; returns
/// the fields of the matching line.
fn lookup<'a>(db: &'a str, key: &str, by_id: bool) -> Option<Vec<&'a str>> {
    db.lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 3 && if by_id { f[2] == key } else { f[0] == key })
}

impl super::ImageStore {
    /// Resolves `user` (`name`, `uid`, `name:group`, `uid:gid`, as `mig run --user` takes it)
    /// to numeric ids from an image's own /etc/passwd and /etc/group, looked up in its `layers`
    /// (digests, bottom first; the topmost file counts) and, when given, in `top` above them (a container's writable layer, whose
    /// whiteouts hide the image's files). A numeric uid without a passwd entry gets gid 0, as in
    /// Docker. An unknown name is [`ImageError::UnknownUser`].
    pub fn resolve_user(
        &self,
        layers: &[String],
        user: &str,
        top: Option<&Path>,
    ) -> Result<(u32, u32), ImageError> {
        let mut dirs = Vec::with_capacity(layers.len() + 1);
        for d in layers {
            crate::spec::validate_digest(d).map_err(ImageError::InvalidDigest)?;
            dirs.push(self.layer_dir(d));
        }
        dirs.extend(top.map(Path::to_owned));
        resolve_ids(user, &dirs)
    }
}

/// [`resolve`] as numbers; an empty `user` is root.
pub(crate) fn resolve_ids(user: &str, layers: &[PathBuf]) -> Result<(u32, u32), ImageError> {
    let s = resolve(user, layers)?;
    let bad = || ImageError::UnknownUser(user.to_owned());
    match s.split_once(':') {
        None if s.is_empty() => Ok((0, 0)),
        Some((u, g)) => Ok((u.parse().map_err(|_| bad())?, g.parse().map_err(|_| bad())?)),
        None => Err(bad()),
    }
}

/// Resolves `user` against the layers (bottom first). Empty stays empty.
pub(crate) fn resolve(user: &str, layers: &[PathBuf]) -> Result<String, ImageError> {
    if user.is_empty() {
        return Ok(String::new());
    }
    let unknown = || ImageError::UnknownUser(user.to_owned());
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let numeric = |s: &str| s.parse::<u32>().ok();
    let mut passwd: Option<Option<String>> = None;
    let mut passwd_db = || -> Result<Option<String>, ImageError> {
        if passwd.is_none() {
            passwd = Some(read_db(layers, "passwd")?);
        }
        Ok(passwd.clone().flatten())
    };
    let (uid, default_gid) = match numeric(u) {
        Some(uid) => {
            let gid = passwd_db()?
                .as_deref()
                .and_then(|db| lookup(db, u, true))
                .and_then(|f| f.get(3).and_then(|g| numeric(g)))
                .unwrap_or(0);
            (uid, gid)
        }
        None => {
            let db = passwd_db()?.ok_or_else(unknown)?;
            let f = lookup(&db, u, false).ok_or_else(unknown)?;
            let uid = numeric(f[2]).ok_or_else(unknown)?;
            let gid = f.get(3).and_then(|g| numeric(g)).ok_or_else(unknown)?;
            (uid, gid)
        }
    };
    let gid = match g {
        None => default_gid,
        Some(g) => match numeric(g) {
            Some(gid) => gid,
            None => {
                let db = read_db(layers, "group")?.ok_or_else(unknown)?;
                let f = lookup(&db, g, false).ok_or_else(unknown)?;
                numeric(f[2]).ok_or_else(unknown)?
            }
        },
    };
    Ok(format!("{uid}:{gid}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(passwd: Option<&str>, group: Option<&str>) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("etc")).unwrap();
        if let Some(p) = passwd {
            fs::write(d.path().join("etc/passwd"), p).unwrap();
        }
        if let Some(g) = group {
            fs::write(d.path().join("etc/group"), g).unwrap();
        }
        d
    }

    #[test]
    fn resolves_users() {
        let base = layer(
            Some("root:x:0:0::/root:/bin/sh\nwww:x:33:34::/var/www:/bin/false\n"),
            Some("root:x:0:\nstaff:x:50:\n"),
        );
        let top = layer(
            Some("root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/app:/bin/sh\n"),
            None,
        );
        let layers = vec![base.path().to_owned(), top.path().to_owned()];
        assert_eq!(resolve("", &layers).unwrap(), "");
        assert_eq!(resolve("app", &layers).unwrap(), "1000:1001");
        assert_eq!(resolve("1000", &layers).unwrap(), "1000:1001");
        assert_eq!(resolve("4242", &layers).unwrap(), "4242:0");
        assert_eq!(resolve("7:8", &layers).unwrap(), "7:8");
        assert_eq!(resolve("app:staff", &layers).unwrap(), "1000:50");
        // The top layer's passwd hides the base's.
        assert!(matches!(
            resolve("www", &layers),
            Err(ImageError::UnknownUser(_))
        ));
        assert!(resolve("app:nogroup", &layers).is_err());
        assert!(resolve("nobody", &[]).is_err());
        assert_eq!(resolve("5", &[]).unwrap(), "5:0");
        assert_eq!(resolve_ids("app:staff", &layers).unwrap(), (1000, 50));
        assert_eq!(resolve_ids("", &layers).unwrap(), (0, 0));
        assert!(resolve_ids("4294967296", &layers).is_err());
        assert!(resolve_ids("-1", &layers).is_err());
    }

    #[test]
    fn does_not_follow_symlinks() {
        let d = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/etc", d.path().join("etc")).unwrap();
        assert!(resolve("root", &[d.path().to_owned()]).is_err());
        let d = layer(None, None);
        std::os::unix::fs::symlink("/etc/passwd", d.path().join("etc/passwd")).unwrap();
        assert!(resolve("root", &[d.path().to_owned()]).is_err());
    }
}
