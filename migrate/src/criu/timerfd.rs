//! A periodic timerfd that expired while the tree was frozen, unread, is dumped by CRIU with
//! `it_value` 0: the kernel's fdinfo shows the time left until the next expiry, which is none
//! until the task reads it. CRIU restores the entry with `timerfd_settime(it_value = 0,
//! it_interval)`, which disarms the timer: an event loop waiting on it stops after the move.
//! [`rearm_expired`] rewrites such entries of `files.img` right after the dump to expire 1 ns
//! after the restore (its pending expirations are restored as they were), which is what the
//! kernel would have done next.

use super::protobuf::{self, put_entry, put_varint, put_varint_field, Fields, Value};
use std::io::Write;
use std::path::{Path, PathBuf};

/// `FILES_MAGIC` (criu/include/magic.h).
const FILES_MAGIC: u32 = 0x5630_3138;
/// `file_entry.tfd` (images/fdinfo.proto).
const FILE_ENTRY_TFD: u64 = 12;
/// `timerfd_entry` fields (images/timerfd.proto): `fown` is the only message, the rest varints.
const TFD_FOWN: u64 = 3;
const TFD_VSEC: u64 = 7;
const TFD_VNSEC: u64 = 8;
const TFD_ISEC: u64 = 9;
const TFD_INSEC: u64 = 10;
const TFD_LAST: u64 = 10;
/// files.img of a large tree is a few MiB at most.
const MAX_FILES_IMAGE: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum TimerfdError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is more than {MAX_FILES_IMAGE} bytes")]
    TooBig { path: PathBuf },
    #[error("{path} is malformed: {reason}")]
    Malformed { path: PathBuf, reason: &'static str },
    #[error("rewriting {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Rewrites the expired periodic timerfds of `images_dir/files.img` (see the module
/// documentation); returns how many. No `files.img`, or none to change: nothing is written.
pub fn rearm_expired(images_dir: &Path) -> Result<usize, TimerfdError> {
    let path = images_dir.join("files.img");
    let read = |source| TimerfdError::Read {
        path: path.clone(),
        source,
    };
    let len = match std::fs::metadata(&path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(read(e)),
    };
    if len > MAX_FILES_IMAGE {
        return Err(TimerfdError::TooBig { path });
    }
    let data = std::fs::read(&path).map_err(read)?;
    let malformed = |reason| TimerfdError::Malformed {
        path: path.clone(),
        reason,
    };
    let Some((out, n)) = rewrite(&data).map_err(malformed)? else {
        return Ok(0);
    };
    let tmp = images_dir.join(".files.img.mig");
    let write = |source| TimerfdError::Write {
        path: path.clone(),
        source,
    };
    let result = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(&out))
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(write(e));
    }
    Ok(n)
}

/// [`rearm_expired`] on a finished dump; a failure leaves the image as CRIU wrote it (the timer
/// may then stop after the restore, as it would without mig) and is logged.
pub(crate) fn rearm_after_dump(images_dir: &Path) {
    match rearm_expired(images_dir) {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            timerfds = n,
            "periodic timerfds that expired while frozen re-armed in files.img"
        ),
        Err(e) => tracing::warn!(error = %e, "timerfds of the dump not checked"),
    }
}

/// The image with its expired periodic timerfds re-armed, and how many, or `None` when there is
/// nothing to change.
fn rewrite(data: &[u8]) -> Result<Option<(Vec<u8>, usize)>, &'static str> {
    let entries = protobuf::entries(data, FILES_MAGIC)?;
    let head = if protobuf::u32_at(data, 0) == Some(FILES_MAGIC) {
        4
    } else {
        8
    };
    let mut out = data[..head].to_vec();
    let mut changed = 0;
    for entry in entries {
        match rewrite_file_entry(entry)? {
            Some(new) => {
                put_entry(&mut out, &new).ok_or("entry too long")?;
                changed += 1;
            }
            None => put_entry(&mut out, entry).ok_or("entry too long")?,
        }
    }
    Ok((changed > 0).then_some((out, changed)))
}

/// A `file_entry` holding an expired periodic timerfd, re-encoded with `vnsec` 1; `None` for
/// any other entry (left byte for byte as it is).
fn rewrite_file_entry(entry: &[u8]) -> Result<Option<Vec<u8>>, &'static str> {
    let mut fields = decode(entry, 0)?;
    let Some(tfd) = fields.iter_mut().find_map(|(num, v)| match v {
        Value::Bytes(b) if *num == FILE_ENTRY_TFD => Some(b),
        _ => None,
    }) else {
        return Ok(None);
    };
    let Some(new_tfd) = rearmed(tfd)? else {
        return Ok(None);
    };
    *tfd = &new_tfd;
    encode(&fields).map(Some)
}

/// A `timerfd_entry` re-encoded with `vnsec` 1 when its `it_value` is 0 and its interval is not;
/// `None` otherwise (or when it has fields this code does not know).
fn rearmed(tfd: &[u8]) -> Result<Option<Vec<u8>>, &'static str> {
    let mut fields = decode(tfd, 1)?;
    let known = fields.iter().all(|(num, v)| match v {
        Value::Bytes(_) => *num == TFD_FOWN,
        Value::Varint(_) => (1..=TFD_LAST).contains(num) && *num != TFD_FOWN,
    });
    if !known {
        return Ok(None);
    }
    let get = |n| {
        fields
            .iter()
            .find_map(|(num, v)| match v {
                Value::Varint(v) if *num == n => Some(*v),
                _ => None,
            })
            .unwrap_or(0)
    };
    let expired = get(TFD_VSEC) == 0 && get(TFD_VNSEC) == 0;
    let periodic = get(TFD_ISEC) != 0 || get(TFD_INSEC) != 0;
    if !(expired && periodic) {
        return Ok(None);
    }
    match fields.iter_mut().find(|(num, _)| *num == TFD_VNSEC) {
        Some((_, v)) => *v = Value::Varint(1),
        None => fields.push((TFD_VNSEC, Value::Varint(1))),
    }
    encode(&fields).map(Some)
}

/// The fields of one message, in their order.
fn decode(message: &[u8], depth: u32) -> Result<Vec<(u64, Value<'_>)>, &'static str> {
    Fields::new(message, depth).collect()
}

/// The message of `fields` (varints as wire type 0, bytes as wire type 2).
fn encode(fields: &[(u64, Value<'_>)]) -> Result<Vec<u8>, &'static str> {
    let mut out = Vec::new();
    for (num, v) in fields {
        match v {
            Value::Varint(v) => put_varint_field(&mut out, field_num(*num)?, *v),
            Value::Bytes(b) => put_bytes_field(&mut out, *num, b),
        }
    }
    Ok(out)
}

fn field_num(num: u64) -> Result<u32, &'static str> {
    u32::try_from(num).map_err(|_| "field number overflows")
}

/// Appends field `num` (wire type 2) with `bytes`.
fn put_bytes_field(out: &mut Vec<u8>, num: u64, bytes: &[u8]) {
    put_varint(out, (num << 3) | 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tfd(vsec: u64, vnsec: u64, isec: u64, insec: u64) -> Vec<u8> {
        let mut fown = Vec::new();
        put_varint_field(&mut fown, 1, 0);
        let mut m = Vec::new();
        put_varint_field(&mut m, 1, 7);
        put_varint_field(&mut m, 2, 0x80800);
        put_bytes_field(&mut m, TFD_FOWN, &fown);
        put_varint_field(&mut m, 4, 1);
        put_varint_field(&mut m, 5, 3);
        put_varint_field(&mut m, 6, 0);
        put_varint_field(&mut m, 7, vsec);
        put_varint_field(&mut m, 8, vnsec);
        put_varint_field(&mut m, 9, isec);
        put_varint_field(&mut m, 10, insec);
        m
    }

    fn file_entry(tfd: Option<&[u8]>) -> Vec<u8> {
        let mut e = Vec::new();
        put_varint_field(&mut e, 1, if tfd.is_some() { 11 } else { 1 });
        put_varint_field(&mut e, 2, 7);
        match tfd {
            Some(t) => put_bytes_field(&mut e, FILE_ENTRY_TFD, t),
            None => put_bytes_field(&mut e, 3, b"\x08\x01"),
        }
        e
    }

    fn image(entries: &[Vec<u8>]) -> Vec<u8> {
        let mut img = Vec::new();
        img.extend_from_slice(&protobuf::IMG_COMMON_MAGIC.to_le_bytes());
        img.extend_from_slice(&FILES_MAGIC.to_le_bytes());
        for e in entries {
            put_entry(&mut img, e).unwrap();
        }
        img
    }

    fn vnsec_of(entry: &[u8]) -> u64 {
        let mut tfd = None;
        for f in Fields::new(entry, 0) {
            if let (FILE_ENTRY_TFD, Value::Bytes(b)) = f.unwrap() {
                tfd = Some(b);
            }
        }
        Fields::new(tfd.unwrap(), 1)
            .find_map(|f| match f.unwrap() {
                (TFD_VNSEC, Value::Varint(v)) => Some(v),
                _ => None,
            })
            .unwrap()
    }

    #[test]
    fn only_expired_periodic_timers_are_rearmed() {
        let expired = file_entry(Some(&tfd(0, 0, 0, 200_000_000)));
        let armed = file_entry(Some(&tfd(0, 5_000, 0, 200_000_000)));
        let one_shot = file_entry(Some(&tfd(0, 0, 0, 0)));
        let other = file_entry(None);
        let img = image(&[other.clone(), expired, armed.clone(), one_shot.clone()]);
        let (out, n) = rewrite(&img).unwrap().unwrap();
        assert_eq!(n, 1);
        let e = protobuf::entries(&out, FILES_MAGIC).unwrap();
        assert_eq!(e.len(), 4);
        assert_eq!(e[0], &other[..]);
        assert_eq!(vnsec_of(e[1]), 1);
        assert_eq!(e[2], &armed[..]);
        assert_eq!(e[3], &one_shot[..]);
        // Everything but vnsec is kept.
        let fields =
            |b: &[u8]| -> Vec<u64> { Fields::new(b, 0).map(|f| f.unwrap().0).collect::<Vec<_>>() };
        assert_eq!(fields(e[1]), vec![1, 2, FILE_ENTRY_TFD]);
        // Nothing to change: None, and nothing written.
        assert!(rewrite(&image(&[other, armed])).unwrap().is_none());
    }

    #[test]
    fn malformed_images_are_errors() {
        assert!(rewrite(b"nope").is_err());
        let mut img = image(&[file_entry(Some(&tfd(0, 0, 1, 0)))]);
        img.truncate(img.len() - 3);
        assert!(rewrite(&img).is_err());
    }

    #[test]
    fn the_file_is_rewritten_in_place() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(rearm_expired(dir.path()).unwrap(), 0);
        let img = image(&[file_entry(Some(&tfd(0, 0, 1, 0)))]);
        std::fs::write(dir.path().join("files.img"), &img).unwrap();
        assert_eq!(rearm_expired(dir.path()).unwrap(), 1);
        let out = std::fs::read(dir.path().join("files.img")).unwrap();
        assert_eq!(
            vnsec_of(protobuf::entries(&out, FILES_MAGIC).unwrap()[0]),
            1
        );
        assert_eq!(rearm_expired(dir.path()).unwrap(), 0);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
