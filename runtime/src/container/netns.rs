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
//! Whether an image set was dumped that way is read from the images
//! (`mig_migrate::criu::images_external_netns`, with CRIU's other image readers), so image sets
//! of an older mig (a full netns dump) restore exactly as before.
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
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;

/// The key that names the container's network namespace in an image set (`--external
/// net[INODE]:mig-netns` on dump, `--inherit-fd fd[FD]:mig-netns` on restore).
pub const NETNS_KEY: &str = "mig-netns";

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
