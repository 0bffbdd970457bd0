//! Whether an image set was dumped with the container's network namespace external
//! (`mig_runtime::container::external_netns_arg`): the restore then hands CRIU a fresh
//! namespace (`LoopbackNetns`) instead of letting it rebuild the dumped one.

use super::protobuf::{self, Fields, Value};
use mig_runtime::container::NETNS_KEY;
use std::io::Read;
use std::path::{Path, PathBuf};

/// The magic of a `netns-ID.img` (criu/include/magic.h `NETNS_MAGIC`).
const NETNS_MAGIC: u32 = 0x5593_3752;
/// `netns_entry.ext_key` (images/netdev.proto), a string.
const EXT_KEY_FIELD: u64 = 8;
/// A full netns entry is a few KiB of sysctls; anything much bigger is not one.
pub const MAX_NETNS_IMAGE_BYTES: u64 = 1 << 20;

/// Why an image set's network namespace images could not be read.
#[derive(Debug, thiserror::Error)]
pub enum NetnsImageError {
    #[error("listing the image set {dir}")]
    List {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading netns image {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("netns image {path} is more than {MAX_NETNS_IMAGE_BYTES} bytes")]
    TooBig { path: PathBuf },
    #[error("netns image {path} is malformed: {reason}")]
    Malformed { path: PathBuf, reason: &'static str },
}

/// Whether the image set in `images_dir` was dumped with the network namespace external under
/// [`NETNS_KEY`]: some `netns-ID.img` holds that `ext_key`. An image set without netns images,
/// or with full ones (an older mig, a `--net` or user-namespace container), gives `false`.
pub fn images_external_netns(images_dir: &Path) -> Result<bool, NetnsImageError> {
    let list = |source| NetnsImageError::List {
        dir: images_dir.to_owned(),
        source,
    };
    for entry in std::fs::read_dir(images_dir).map_err(list)? {
        let entry = entry.map_err(list)?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !(name.starts_with("netns-") && name.ends_with(".img")) {
            continue;
        }
        let path = entry.path();
        let data = read_bounded(&path)?;
        let key = ext_key(&data).map_err(|reason| NetnsImageError::Malformed {
            path: path.clone(),
            reason,
        })?;
        if key == Some(NETNS_KEY.as_bytes()) {
            return Ok(true);
        }
    }
    Ok(false)
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, NetnsImageError> {
    let read = |source| NetnsImageError::Read {
        path: path.to_owned(),
        source,
    };
    let mut data = Vec::new();
    std::fs::File::open(path)
        .map_err(read)?
        .take(MAX_NETNS_IMAGE_BYTES + 1)
        .read_to_end(&mut data)
        .map_err(read)?;
    if data.len() as u64 > MAX_NETNS_IMAGE_BYTES {
        return Err(NetnsImageError::TooBig {
            path: path.to_owned(),
        });
    }
    Ok(data)
}

/// The `ext_key` of the first entry of a netns image (the last one, should the field repeat).
fn ext_key(data: &[u8]) -> Result<Option<&[u8]>, &'static str> {
    let Some(entry) = protobuf::entries(data, NETNS_MAGIC)?.into_iter().next() else {
        return Ok(None);
    };
    let mut key = None;
    for field in Fields::new(entry, 0) {
        if let (EXT_KEY_FIELD, Value::Bytes(b)) = field? {
            key = Some(b);
        }
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A netns image as CRIU writes it: the magics, one entry of `len` + protobuf.
    fn image(msg: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&protobuf::IMG_COMMON_MAGIC.to_le_bytes());
        v.extend_from_slice(&NETNS_MAGIC.to_le_bytes());
        v.extend_from_slice(&(msg.len() as u32).to_le_bytes());
        v.extend_from_slice(msg);
        v
    }

    /// `netns_entry { ext_key = key }`, as criu/net.c `dump_net_ns` writes it.
    fn external(key: &str) -> Vec<u8> {
        let mut m = vec![0x42, key.len() as u8];
        m.extend_from_slice(key.as_bytes());
        m
    }

    /// A full entry's start: `def_conf` (packed varints, field 1), a `def_conf4` sysctl entry
    /// (field 3, a nested message with a string), a fixed32 and a fixed64 field.
    fn full() -> Vec<u8> {
        let mut m = vec![0x0a, 3, 1, 0x80, 0x01];
        let sysctl = [
            0x0a, 10, b'f', b'o', b'r', b'w', b'a', b'r', b'd', b'i', b'n', b'g',
        ];
        m.push(0x1a);
        m.push(sysctl.len() as u8);
        m.extend_from_slice(&sysctl);
        m.extend_from_slice(&[0x5d, 1, 2, 3, 4, 0x61, 1, 2, 3, 4, 5, 6, 7, 8]);
        m
    }

    #[test]
    fn ext_key_of_an_external_netns_image() {
        assert_eq!(
            ext_key(&image(&external(NETNS_KEY))).unwrap(),
            Some(NETNS_KEY.as_bytes())
        );
        assert_eq!(ext_key(&image(&full())).unwrap(), None);
        // Other fields around the key do not hide it.
        let mut both = full();
        both.extend(external("other"));
        assert_eq!(ext_key(&image(&both)).unwrap(), Some(&b"other"[..]));
        // An image with the magics only has no entry.
        assert_eq!(ext_key(&image(&[])[..8]).unwrap(), None);
    }

    #[test]
    fn malformed_netns_images_are_errors() {
        assert_eq!(ext_key(b"\0\0\0\0\0\0\0\0"), Err("bad magic"));
        let mut cut = image(&external(NETNS_KEY));
        cut.truncate(cut.len() - 1);
        assert_eq!(ext_key(&cut), Err("truncated entry"));
        // The entry's own string length runs past the entry.
        assert_eq!(
            ext_key(&image(&[0x42, 9, b'm'])),
            Err("field runs past the end")
        );
        assert_eq!(ext_key(&image(&[0x43])), Err("unsupported wire type"));
        assert_eq!(ext_key(&image(&[0x08, 0xff])), Err("truncated varint"));
    }

    #[test]
    fn images_dir_marker() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("core-1.img"), b"x").unwrap();
        assert!(!images_external_netns(dir.path()).unwrap());
        std::fs::write(dir.path().join("netns-10.img"), image(&full())).unwrap();
        assert!(!images_external_netns(dir.path()).unwrap());
        std::fs::write(dir.path().join("netns-11.img"), image(&external(NETNS_KEY))).unwrap();
        assert!(images_external_netns(dir.path()).unwrap());
        let junk = tempfile::tempdir().unwrap();
        std::fs::write(junk.path().join("netns-12.img"), b"junk").unwrap();
        assert!(matches!(
            images_external_netns(junk.path()),
            Err(NetnsImageError::Malformed { .. })
        ));
        assert!(matches!(
            images_external_netns(&junk.path().join("missing")),
            Err(NetnsImageError::List { .. })
        ));
    }
}
