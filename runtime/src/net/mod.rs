//! Container networking (`mig run --net bridge`): a veth pair per container, the host end in the
//! host's bridge, the container end (`eth0`) in the container's network namespace with a fixed
//! address and a MAC derived from the container id, so that both survive a move.
//!
//! - [`NetSpec`]: what a container's spec records (address, MAC, interface names, bridge);
//! - [`attach`]: creates and configures the pair for a freshly cloned init (before it execs);
//! - [`write_etc`]: `/etc/hosts` and `/etc/resolv.conf` in the container's rootfs;
//! - [`criu_restore_external`], [`after_restore`]: what a restore needs (CRIU recreates the pair
//!   from the image set; the host end is then brought up in the bridge and a gratuitous ARP sent);
//! - [`set_host_link`]: cuts (and restores) the container's link while a frozen copy waits;
//! - [`established_tcp`], [`images_have_tcp`]: established TCP connections in a live container
//!   and in an image set;
//! - `ipam`: the host's network configuration and the address table shared by a lab's hosts.
//!
//! Interfaces are configured with `ip` from iproute2 (entered into the container's namespace with
//! `nsenter`), as the lab does; docs/networking.md describes the model.

mod garp;
pub mod ipam;

pub use ipam::{HostNet, HOST_NET_FILE};

use serde::{Deserialize, Serialize};
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Name of the container's interface.
pub const CONTAINER_IFNAME: &str = "eth0";
/// Default name of the host bridge containers attach to.
pub const DEFAULT_BRIDGE: &str = "migbr0";
/// Longest interface name the kernel accepts (IFNAMSIZ - 1).
const IFNAME_MAX: usize = 15;

/// How a container is networked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetMode {
    /// A veth pair into the host's bridge.
    Bridge,
}

/// A container's network, recorded in its spec (and so carried by moves and checkpoints).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetSpec {
    pub mode: NetMode,
    /// The container's IPv4 address on `eth0`.
    pub address: Ipv4Addr,
    /// Prefix length of the container subnet.
    pub prefix_len: u8,
    /// Default route, when the subnet has one.
    pub gateway: Option<Ipv4Addr>,
    /// MAC address of `eth0` (`02:..`, derived from the container id).
    pub mac: String,
    /// The host bridge the host end joins.
    pub bridge: String,
    /// Name of the host end of the veth pair (`mv` + 12 characters of the id).
    pub host_ifname: String,
    /// Name servers written to the container's `/etc/resolv.conf`.
    #[serde(default)]
    pub dns: Vec<Ipv4Addr>,
}

/// Failures of container networking, one variant per operation.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("invalid network spec: {0}")]
    Invalid(&'static str),
    #[error("cannot run `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("cannot write {}", path.display())]
    WriteFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is a symbolic link or not a directory in the container's rootfs", path.display())]
    UnsafePath { path: PathBuf },
    #[error("cannot read {}", path.display())]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot send a gratuitous arp for {address} in the namespace of pid {pid}")]
    Garp {
        pid: i32,
        address: Ipv4Addr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot probe the segment for {address} from {bridge}")]
    Probe {
        address: Ipv4Addr,
        bridge: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot lock the address table {}", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("address {address} is not in the container subnet {subnet}")]
    OutOfSubnet { address: Ipv4Addr, subnet: String },
    #[error("address {address} is already used by container {owner}")]
    AddressTaken { address: Ipv4Addr, owner: String },
    #[error(
        "address {address} is reserved on this segment for a host or router (net.json `reserved`)"
    )]
    Reserved { address: Ipv4Addr },
    #[error("no free address left in {subnet}")]
    Exhausted { subnet: String },
    #[error("this host has no container network ({} is missing; `mig lab up` writes one)", path.display())]
    NoHostNet { path: PathBuf },
}

/// The MAC of a container's `eth0`: locally administered, unicast, from the id's first 10 hex
/// characters (ids are random, so clashes in a subnet are as unlikely as id prefix clashes).
pub fn mac_for_id(id: &str) -> String {
    let hex: Vec<u8> = id
        .bytes()
        .filter(u8::is_ascii_hexdigit)
        .chain(std::iter::repeat(b'0'))
        .take(10)
        .collect();
    let mut mac = String::from("02");
    for pair in hex.chunks(2) {
        mac.push(':');
        mac.push_str(&String::from_utf8_lossy(pair).to_ascii_lowercase());
    }
    mac
}

/// The name of the host end of a container's veth: `mv` and the first 12 characters of the id.
pub fn host_ifname_for_id(id: &str) -> String {
    let short: String = id.chars().take(12).collect();
    format!("mv{short}")
}

fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= IFNAME_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && name != "."
        && name != ".."
}

fn valid_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
        // Unicast: the low bit of the first octet is clear.
        && u8::from_str_radix(parts[0], 16).is_ok_and(|o| o & 1 == 0)
}

/// The six octets of a MAC that passed [`NetSpec::validate`].
fn mac_octets(mac: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = mac.split(':');
    for o in &mut out {
        *o = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    Some(out)
}

impl NetSpec {
    /// Checks what later code puts on command lines and in files (the spec may come from a peer).
    pub fn validate(&self) -> Result<(), NetError> {
        if !(1..=32).contains(&self.prefix_len) {
            return Err(NetError::Invalid("prefix length must be 1 to 32"));
        }
        if !valid_mac(&self.mac) {
            return Err(NetError::Invalid("mac must be six hex octets, unicast"));
        }
        if !valid_ifname(&self.bridge) || !valid_ifname(&self.host_ifname) {
            return Err(NetError::Invalid(
                "interface names are 1 to 15 characters of [a-zA-Z0-9_.-]",
            ));
        }
        let a = self.address;
        if a.is_unspecified() || a.is_broadcast() || a.is_multicast() || a.is_loopback() {
            return Err(NetError::Invalid("the address must be a unicast address"));
        }
        if self.dns.len() > 3 {
            return Err(NetError::Invalid("at most 3 name servers"));
        }
        Ok(())
    }

    /// `ADDRESS/PREFIX`.
    pub fn cidr(&self) -> String {
        format!("{}/{}", self.address, self.prefix_len)
    }
}

/// Runs `program args` and maps a failure to [`NetError`] with its stderr; `input` goes to stdin.
fn run(program: &str, args: &[&str], input: Option<&str>) -> Result<(), NetError> {
    let command = format!("{program} {}", args.join(" "));
    let spawn = |source| NetError::Spawn {
        command: command.clone(),
        source,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn)?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(text.as_bytes()).map_err(spawn)?;
    }
    let out = child.wait_with_output().map_err(spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetError::Command {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// `ip -batch -` run inside the network namespace of `pid`.
fn ip_batch_in(pid: i32, commands: &str) -> Result<(), NetError> {
    let netns = format!("--net=/proc/{pid}/ns/net");
    run(
        "nsenter",
        &[&netns, "--", "ip", "-batch", "-"],
        Some(commands),
    )
}

/// Gives the freshly cloned init `pid` its network: a veth pair with the host end in the bridge and
/// `eth0` (address, MAC, default route, loopback up) in the init's network namespace. Called by
/// the parent before the init execs; on failure the caller kills the init, which removes the pair
/// with its namespace.
pub fn attach(pid: i32, net: &NetSpec) -> Result<(), NetError> {
    net.validate()?;
    let pid_s = pid.to_string();
    let host = net.host_ifname.as_str();
    // A stale host end (a container of this id that died without its namespace going away yet)
    // would make the add fail; it is ours by name, so remove it.
    let _ = run("ip", &["link", "del", host], None);
    run(
        "ip",
        &[
            "link",
            "add",
            host,
            "type",
            "veth",
            "peer",
            "name",
            CONTAINER_IFNAME,
            "address",
            &net.mac,
            "netns",
            &pid_s,
        ],
        None,
    )?;
    run("ip", &["link", "set", host, "master", &net.bridge], None)?;
    run("ip", &["link", "set", host, "up"], None)?;
    let mut batch = format!(
        "link set lo up\naddr add {} dev {CONTAINER_IFNAME}\nlink set {CONTAINER_IFNAME} up\n",
        net.cidr()
    );
    if let Some(gw) = net.gateway {
        batch.push_str(&format!(
            "route add default via {gw} dev {CONTAINER_IFNAME}\n"
        ));
    }
    ip_batch_in(pid, &batch)
}

/// Connects the host end of the container's veth to the bridge, or takes it out. Out while a
/// frozen copy waits for a move's outcome: nothing from the segment reaches its sockets (no ACK,
/// no RST) and nothing of theirs reaches the segment while the copy on the destination owns the
/// address; back in when the move rolls back. The link itself stays up: CRIU would dump the
/// container's routes as `linkdown`, which `ip route restore` refuses.
pub fn set_host_link(net: &NetSpec, connected: bool) -> Result<(), NetError> {
    net.validate()?;
    if connected {
        run(
            "ip",
            &["link", "set", &net.host_ifname, "master", &net.bridge],
            None,
        )
    } else {
        run("ip", &["link", "set", &net.host_ifname, "nomaster"], None)
    }
}

/// The `criu restore --external` value that recreates the pair: `eth0` inside, the host end by
/// its recorded name in the bridge.
pub fn criu_restore_external(net: &NetSpec) -> String {
    format!(
        "veth[{CONTAINER_IFNAME}]:{}@{}",
        net.host_ifname, net.bridge
    )
}

/// Before CRIU restores the container: removes a host end of the same name left in this
/// namespace. It belongs to an earlier copy of this container whose network namespace is still
/// being torn down by the kernel (a move back to a host it just left), and CRIU could not create
/// the pair while it exists. The name holds the container id, which the restoring agent has
/// checked is not running here; an imported checkpoint whose recorded name is another
/// container's (a copy restored under a new id) is refused before this is reached
/// (daemon/checkpoint.rs `check_import_net`).
pub fn before_restore(net: &NetSpec) -> Result<(), NetError> {
    net.validate()?;
    // `ip`, not /sys/class/net: sysfs shows the namespace it was mounted in, not ours.
    if run("ip", &["link", "show", &net.host_ifname], None).is_ok() {
        run("ip", &["link", "del", &net.host_ifname], None)?;
    }
    Ok(())
}

/// Whether this network namespace has an interface named `name` (a veth's host end).
pub fn host_link_exists(name: &str) -> bool {
    // `ip`, not /sys/class/net: sysfs shows the namespace it was mounted in, not ours.
    valid_ifname(name) && run("ip", &["link", "show", name], None).is_ok()
}

/// After CRIU restored the container (`pid` is its init): the host end joins the bridge and comes
/// up, and a gratuitous ARP from `eth0` tells the segment's bridges and neighbours where the
/// address now is.
pub fn after_restore(pid: i32, net: &NetSpec) -> Result<(), NetError> {
    net.validate()?;
    run(
        "ip",
        &["link", "set", &net.host_ifname, "master", &net.bridge],
        None,
    )?;
    run("ip", &["link", "set", &net.host_ifname, "up"], None)?;
    let mac = mac_octets(&net.mac).ok_or(NetError::Invalid("mac"))?;
    garp::announce(pid, CONTAINER_IFNAME, mac, net.address).map_err(|source| NetError::Garp {
        pid,
        address: net.address,
        source,
    })
}

/// Writes `/etc/hosts` (localhost, and the address under `hostname`) and `/etc/resolv.conf` into
/// the container's rootfs (the merged mount, before the init starts). Refuses to write through a
/// symbolic link: the rootfs comes from an image.
pub fn write_etc(rootfs: &Path, hostname: &str, net: &NetSpec) -> Result<(), NetError> {
    let etc = rootfs.join("etc");
    match std::fs::symlink_metadata(&etc) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(NetError::UnsafePath { path: etc }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir(&etc).map_err(|source| NetError::WriteFile {
                path: etc.clone(),
                source,
            })?
        }
        Err(source) => return Err(NetError::ReadFile { path: etc, source }),
    }
    let hosts = format!(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{}\t{hostname}\n",
        net.address
    );
    let mut resolv = String::from("# written by mig (docs/networking.md)\n");
    for d in &net.dns {
        resolv.push_str(&format!("nameserver {d}\n"));
    }
    write_no_follow(&etc.join("hosts"), &hosts)?;
    write_no_follow(&etc.join("resolv.conf"), &resolv)
}

fn write_no_follow(path: &Path, text: &str) -> Result<(), NetError> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| NetError::WriteFile {
        path: path.to_owned(),
        source,
    };
    if std::fs::symlink_metadata(path).is_ok_and(|m| !m.is_file()) {
        // A link (or anything else) from the image: replace it, never follow it.
        std::fs::remove_file(path).map_err(err)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)
}

/// How many TCP connections are ESTABLISHED in the network namespace of `pid` (IPv4 and IPv6,
/// from `/proc/PID/net/tcp{,6}`).
pub fn established_tcp(pid: i32) -> Result<usize, NetError> {
    let mut n = 0;
    for file in ["tcp", "tcp6"] {
        let path = PathBuf::from(format!("/proc/{pid}/net/{file}"));
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if file == "tcp6" && e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(NetError::ReadFile { path, source }),
        };
        n += count_established(&text);
    }
    Ok(n)
}

/// Rows of a `/proc/net/tcp` table in state `01` (TCP_ESTABLISHED).
fn count_established(table: &str) -> usize {
    table
        .lines()
        .skip(1)
        .filter(|l| l.split_whitespace().nth(3) == Some("01"))
        .count()
}

/// Whether an image set holds established TCP connections (CRIU writes a `tcp-stream-*.img` per
/// connection dumped with `--tcp-established`); its restore then needs the same flag.
pub fn images_have_tcp(images_dir: &Path) -> bool {
    std::fs::read_dir(images_dir).is_ok_and(|rd| {
        rd.flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("tcp-stream-"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> NetSpec {
        let id = "0123456789abcdef0123456789abcdef";
        NetSpec {
            mode: NetMode::Bridge,
            address: Ipv4Addr::new(10, 214, 80, 100),
            prefix_len: 24,
            gateway: Some(Ipv4Addr::new(10, 214, 80, 1)),
            mac: mac_for_id(id),
            bridge: DEFAULT_BRIDGE.into(),
            host_ifname: host_ifname_for_id(id),
            dns: vec![],
        }
    }

    #[test]
    fn names_from_the_id() {
        let s = sample();
        assert_eq!(s.mac, "02:01:23:45:67:89");
        assert_eq!(s.host_ifname, "mv0123456789ab");
        assert_eq!(mac_octets(&s.mac), Some([2, 1, 0x23, 0x45, 0x67, 0x89]));
        s.validate().unwrap();
        assert_eq!(
            criu_restore_external(&s),
            "veth[eth0]:mv0123456789ab@migbr0"
        );
    }

    #[test]
    fn hostile_specs_are_refused() {
        let mut s = sample();
        s.bridge = "br0; reboot".into();
        assert!(s.validate().is_err());
        let mut s = sample();
        s.host_ifname = "a-very-long-interface".into();
        assert!(s.validate().is_err());
        let mut s = sample();
        s.mac = "03:00:00:00:00:01".into();
        assert!(s.validate().is_err());
        let mut s = sample();
        s.prefix_len = 33;
        assert!(s.validate().is_err());
        let mut s = sample();
        s.address = Ipv4Addr::BROADCAST;
        assert!(s.validate().is_err());
    }

    #[test]
    fn counts_established_rows() {
        let t = "  sl  local_address rem_address   st tx_queue\n\
                 0: 00000000:1388 00000000:0000 0A 0\n\
                 1: 0500630A:1388 0100630A:B57A 01 0\n";
        assert_eq!(count_established(t), 1);
        assert_eq!(count_established(""), 0);
    }

    #[test]
    fn etc_files_are_written_without_following_links() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir(root.join("etc")).unwrap();
        let outside = root.join("outside");
        std::fs::write(&outside, "keep").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("etc/hosts")).unwrap();
        write_etc(root, "web", &sample()).unwrap();
        assert_eq!(std::fs::read_to_string(&outside).unwrap(), "keep");
        let hosts = std::fs::read_to_string(root.join("etc/hosts")).unwrap();
        assert!(hosts.contains("10.214.80.100\tweb"), "{hosts}");
        assert!(root.join("etc/resolv.conf").is_file());
    }
}
