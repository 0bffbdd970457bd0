//! The network namespace of a loopback-only container, which a CRIU driver may leave out of the
//! image set and recreate on restore.
//!
//! A container started without `--net` and without a user namespace gets a network namespace
//! with only `lo` in it, brought up by its init ([`spawn`](super::spawn)). Its processes hold
//! no capability that changes the namespace (`CAP_NET_ADMIN` is not in [`DEFAULT_CAPS`]), so
//! nothing in it is worth saving: CRIU's full dump of it (`ip addr/route/rule save`,
//! `iptables-save`, `ip6tables-save`, sysctls; about 40 ms of a dump and 35 ms of a restore
//! here) can be replaced by an empty one, the way runc handles a network namespace given by
//! path:
//!
//! - dump with `--external net[INODE]:KEY` ([`external_netns_arg`]): CRIU then writes a
//!   `netns-ID.img` whose entry holds only `ext_key = KEY` (criu/net.c `dump_net_ns`) and no
//!   link, address, route, rule or iptables images;
//! - restore with `--inherit-fd fd[FD]:KEY` where FD is a fresh namespace with `lo` up
//!   ([`LoopbackNetns`]): CRIU joins it instead of creating and filling one (`net_set_ext`).
//!
//! Whether an image set was dumped that way is read from the images ([`images_external_netns`]),
//! so image sets of an older mig (a full netns dump) restore exactly as before.
//!
//! A user-namespace container keeps the full dump: a namespace created here would be owned by
//! the initial user namespace, not the container's, and root in the container would lose what
//! it may do in its own network namespace (bind ports below 1024, for one). So does a `--net`
//! container (its veth, address and routes are the point; docs/networking.md).
//!
//! [`DEFAULT_CAPS`]: super::DEFAULT_CAPS

use super::sys;
use crate::spec::ContainerSpec;
use nix::errno::Errno;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The key that names the container's network namespace in an image set (`--external
/// net[INODE]:mig-netns` on dump, `--inherit-fd fd[FD]:mig-netns` on restore).
pub const NETNS_KEY: &str = "mig-netns";

/// The magic of a `netns-ID.img` (criu/include/magic.h `NETNS_MAGIC`).
const NETNS_MAGIC: u32 = 0x5593_3752;
/// Head magic of most images (criu/include/magic.h).
const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
/// `netns_entry.ext_key` (images/netdev.proto), a string.
const EXT_KEY_FIELD: u64 = 8;
/// A full netns entry is a few KiB of sysctls; anything much bigger is not one.
pub const MAX_NETNS_IMAGE_BYTES: u64 = 1 << 20;

/// Why a network namespace could not be named, created or recognised.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("reading the network namespace of pid {pid}")]
    Inode {
        pid: i32,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the thread that creates a network namespace")]
    Thread(#[source] std::io::Error),
    #[error("the thread that creates a network namespace panicked")]
    ThreadPanicked,
    #[error("creating a network namespace")]
    Unshare(#[source] Errno),
    #[error("opening the new network namespace")]
    Open(#[source] std::io::Error),
    #[error("bringing up loopback in the new network namespace")]
    Loopback(#[source] Errno),
    #[error("listing the image set {dir}")]
    ListImages {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading netns image {path}")]
    ReadImage {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("netns image {path} is more than {MAX_NETNS_IMAGE_BYTES} bytes")]
    ImageTooBig { path: PathBuf },
    #[error("netns image {path} is malformed: {reason}")]
    Malformed { path: PathBuf, reason: &'static str },
}

/// Whether a container made from `spec` has a network namespace mig can recreate (only `lo`):
/// no `--net` and no user namespace.
pub fn netns_recreatable(spec: &ContainerSpec) -> bool {
    spec.net.is_none() && spec.userns.is_none()
}

/// The `criu dump --external` value that leaves the network namespace of `pid` out of the image
/// set: `net[INODE]:mig-netns`, INODE being that of `/proc/PID/ns/net`.
pub fn external_netns_arg(pid: i32) -> Result<String, NetnsError> {
    let ino = std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .map_err(|source| NetnsError::Inode { pid, source })?
        .ino();
    Ok(format!("net[{ino}]:{NETNS_KEY}"))
}

/// Whether the image set in `images_dir` was dumped with the network namespace external under
/// [`NETNS_KEY`]: some `netns-ID.img` holds that `ext_key`. An image set without netns images,
/// or with full ones (an older mig, a `--net` or user-namespace container), gives `false`.
pub fn images_external_netns(images_dir: &Path) -> Result<bool, NetnsError> {
    let list = std::fs::read_dir(images_dir).map_err(|source| NetnsError::ListImages {
        dir: images_dir.to_owned(),
        source,
    })?;
    for entry in list {
        let entry = entry.map_err(|source| NetnsError::ListImages {
            dir: images_dir.to_owned(),
            source,
        })?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !(name.starts_with("netns-") && name.ends_with(".img")) {
            continue;
        }
        let path = entry.path();
        let data = read_bounded(&path)?;
        let key = ext_key(&data).map_err(|reason| NetnsError::Malformed {
            path: path.clone(),
            reason,
        })?;
        if key == Some(NETNS_KEY.as_bytes()) {
            return Ok(true);
        }
    }
    Ok(false)
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, NetnsError> {
    let read = |source| NetnsError::ReadImage {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read)?;
    let mut data = Vec::new();
    file.take(MAX_NETNS_IMAGE_BYTES + 1)
        .read_to_end(&mut data)
        .map_err(read)?;
    if data.len() as u64 > MAX_NETNS_IMAGE_BYTES {
        return Err(NetnsError::ImageTooBig {
            path: path.to_owned(),
        });
    }
    Ok(data)
}

/// The `ext_key` of the first entry of a netns image: `IMG_COMMON_MAGIC`, `NETNS_MAGIC`, then a
/// little-endian `u32` length and a protobuf `netns_entry` (criu/image.c, images/netdev.proto).
fn ext_key(data: &[u8]) -> Result<Option<&[u8]>, &'static str> {
    let u32_at = |at: usize| -> Option<u32> {
        let b = data.get(at..at + 4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    if u32_at(0) != Some(IMG_COMMON_MAGIC) || u32_at(4) != Some(NETNS_MAGIC) {
        return Err("bad magic");
    }
    let Some(size) = u32_at(8) else {
        // No entry at all: nothing external.
        return Ok(None);
    };
    let msg = data
        .get(12..12usize.saturating_add(size as usize))
        .ok_or("truncated entry")?;
    string_field(msg, EXT_KEY_FIELD)
}

/// The last value of string field `field` in the protobuf message `msg` (the top level only;
/// every other field is skipped by its wire type).
fn string_field(msg: &[u8], field: u64) -> Result<Option<&[u8]>, &'static str> {
    let mut pos = 0usize;
    let mut found = None;
    let varint = |pos: &mut usize| -> Result<u64, &'static str> {
        let mut v = 0u64;
        for i in 0..10 {
            let b = *msg.get(*pos).ok_or("truncated varint")?;
            *pos += 1;
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint longer than 10 bytes")
    };
    while pos < msg.len() {
        let key = varint(&mut pos)?;
        let len = match key & 7 {
            0 => {
                varint(&mut pos)?;
                0
            }
            1 => 8,
            2 => usize::try_from(varint(&mut pos)?).map_err(|_| "length overflows")?,
            5 => 4,
            _ => return Err("unsupported wire type"),
        };
        let end = pos.checked_add(len).ok_or("length overflows")?;
        let value = msg.get(pos..end).ok_or("field runs past the end")?;
        if key >> 3 == field && key & 7 == 2 {
            found = Some(value);
        }
        pos = end;
    }
    Ok(found)
}

/// A new network namespace with only `lo`, up: what a loopback-only container's restore joins
/// (`--inherit-fd`). Dropping it closes the descriptor; the namespace then lives on only while
/// processes are in it.
#[derive(Debug)]
pub struct LoopbackNetns {
    fd: OwnedFd,
}

impl LoopbackNetns {
    /// Creates the namespace in a short-lived thread (`unshare(CLONE_NEWNET)` there, so the
    /// calling thread and the rest of the process stay where they are), brings `lo` up and
    /// keeps a descriptor of it (close-on-exec).
    pub fn create() -> Result<LoopbackNetns, NetnsError> {
        let thread = std::thread::Builder::new()
            .name("mig-netns".into())
            .spawn(|| -> Result<OwnedFd, NetnsError> {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(NetnsError::Unshare)?;
                let fd: OwnedFd = std::fs::File::open("/proc/thread-self/ns/net")
                    .map_err(NetnsError::Open)?
                    .into();
                sys::loopback_up().map_err(NetnsError::Loopback)?;
                Ok(fd)
            })
            .map_err(NetnsError::Thread)?;
        // The thread ends in the new namespace; the descriptor keeps the namespace alive.
        let fd = thread.join().map_err(|_| NetnsError::ThreadPanicked)??;
        Ok(LoopbackNetns { fd })
    }

    /// The `(fd, key)` pair of `criu restore --inherit-fd fd[FD]:mig-netns`.
    pub fn inherit_fd(&self) -> (RawFd, String) {
        (self.fd.as_raw_fd(), NETNS_KEY.to_owned())
    }
}

impl AsRawFd for LoopbackNetns {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A netns image as CRIU writes it: the magics, one entry of `len` + protobuf.
    fn image(msg: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&IMG_COMMON_MAGIC.to_le_bytes());
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
            Err(NetnsError::Malformed { .. })
        ));
        assert!(matches!(
            images_external_netns(&junk.path().join("missing")),
            Err(NetnsError::ListImages { .. })
        ));
    }

    #[test]
    fn recreatable_only_without_net_and_userns() {
        let mut spec = crate::spec::tests::sample();
        assert!(netns_recreatable(&spec));
        spec.userns = Some(crate::spec::IdMap {
            host_id: 100_000,
            size: 65536,
        });
        assert!(!netns_recreatable(&spec));
        spec.userns = None;
        spec.net = Some(
            serde_json::from_value(serde_json::json!({
                "mode": "bridge", "address": "10.214.80.100", "prefix_len": 24,
                "gateway": null, "mac": "02:01:23:45:67:89", "bridge": "migbr0",
                "host_ifname": "mv0123456789ab"
            }))
            .unwrap(),
        );
        assert!(!netns_recreatable(&spec));
    }

    /// Needs root: the namespace is new, has `lo` up, and the caller's namespace is unchanged.
    #[test]
    fn loopback_netns_is_new_with_lo_up() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let before = std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino();
        let ns = LoopbackNetns::create().unwrap();
        let after = std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino();
        assert_eq!(before, after);
        let fd = ns.as_raw_fd();
        let ino = std::fs::metadata(format!("/proc/self/fd/{fd}"))
            .unwrap()
            .ino();
        assert_ne!(ino, before);
        // lo's flags, seen from inside: a thread that joins the namespace.
        let joined = ns.fd.try_clone().unwrap();
        let flags = std::thread::spawn(move || {
            nix::sched::setns(&joined, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let out = std::process::Command::new("ip")
                .args(["-o", "link", "show", "lo"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
        .join()
        .unwrap();
        assert!(flags.contains("UP"), "lo in the new netns: {flags}");
        assert_eq!(
            external_netns_arg(std::process::id() as i32).unwrap(),
            format!("net[{before}]:{NETNS_KEY}")
        );
    }
}
