//! The lab's network: named network namespaces, a bridge in the switch namespace and a veth pair per
//! host, all made with `ip` from iproute2. Both ends of each veth are created directly inside their
//! namespaces, so no lab interface ever appears in the machine's own namespace.

use super::{LabError, LabHost};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where `ip netns add` pins named namespaces.
pub(crate) const NETNS_DIR: &str = "/run/netns";
/// MTU of the bridge and the veths.
const MTU: &str = "9000";

/// Runs `ip ARGS`, turning a failure into [`LabError::CommandFailed`] with its stderr.
pub(crate) fn ip(args: &[&str]) -> Result<(), LabError> {
    run("ip", args)
}

pub(crate) fn run(program: &str, args: &[&str]) -> Result<(), LabError> {
    let command = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| LabError::SpawnCommand {
            command: command.clone(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(LabError::CommandFailed {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Path of named namespace `ns`.
pub(crate) fn netns_path(ns: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(ns)
}

/// Inode of named namespace `ns` (compare with /proc/PID/ns/net), if it exists.
pub(crate) fn netns_inode(ns: &str) -> Option<(u64, u64)> {
    std::fs::metadata(netns_path(ns))
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// Named namespaces that belong to lab `lab` (`<lab>-host-*` and `<lab>-sw`).
pub(crate) fn lab_namespaces(lab: &str) -> Result<Vec<String>, LabError> {
    let rd = match std::fs::read_dir(NETNS_DIR) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(LabError::ReadFile {
                path: PathBuf::from(NETNS_DIR),
                source,
            })
        }
    };
    let host_prefix = format!("{lab}-host-");
    let switch = format!("{lab}-sw");
    let mut names: Vec<String> = rd
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n == &switch || is_host_suffix(n.strip_prefix(&host_prefix)))
        .collect();
    names.sort();
    Ok(names)
}

/// `a`..`z`: the part after `host-` of a lab host's name (so lab `t1` never claims `t1-host-x-y`).
fn is_host_suffix(rest: Option<&str>) -> bool {
    matches!(rest, Some(r) if r.len() == 1 && r.bytes().all(|b| b.is_ascii_lowercase()))
}

/// Creates the switch namespace with lo up and a bridge.
pub(crate) fn create_switch(ns: &str, bridge: &str) -> Result<(), LabError> {
    ip(&["netns", "add", ns])?;
    ip(&["-n", ns, "link", "set", "lo", "up"])?;
    ip(&[
        "-n",
        ns,
        "link",
        "add",
        bridge,
        "mtu",
        MTU,
        "type",
        "bridge",
        "stp_state",
        "0",
        "forward_delay",
        "0",
    ])?;
    ip(&["-n", ns, "link", "set", bridge, "up"])
}

/// Creates the host's namespace and its veth link to the switch: `eth0` with the host's address on
/// the host side, a port of the bridge named after the host on the switch side.
pub(crate) fn create_host(host: &LabHost, switch: &str, bridge: &str) -> Result<(), LabError> {
    let ns = host.netns.as_str();
    ip(&["netns", "add", ns])?;
    ip(&["-n", ns, "link", "set", "lo", "up"])?;
    ip(&[
        "link", "add", "eth0", "netns", ns, "mtu", MTU, "type", "veth", "peer", "name", &host.name,
        "netns", switch, "mtu", MTU,
    ])?;
    ip(&["-n", switch, "link", "set", &host.name, "master", bridge])?;
    ip(&["-n", switch, "link", "set", &host.name, "up"])?;
    let cidr = format!("{}/24", host.address);
    ip(&["-n", ns, "addr", "add", &cidr, "dev", "eth0"])?;
    // The host also reaches the switch through its container uplink (1500-byte MTU, see
    // `create_container_bridge`). By default Linux answers an ARP request for any of its
    // addresses on any interface, so a peer could learn the host's address at the uplink's MAC
    // and send jumbo frames down the 1500-byte path, where they are dropped (TCP stalls). Answer
    // only on the interface that holds the address, and announce from it.
    ip(&[
        "netns",
        "exec",
        ns,
        "sh",
        "-c",
        "echo 1 > /proc/sys/net/ipv4/conf/all/arp_ignore && \
         echo 2 > /proc/sys/net/ipv4/conf/all/arp_announce",
    ])?;
    ip(&["-n", ns, "link", "set", "eth0", "up"])
}

/// Name of the host end of a host's container uplink (its bridge's link to the switch).
const UPLINK: &str = "migup0";

/// Gives the host a container bridge ([`mig_runtime::net::DEFAULT_BRIDGE`]) joined to the switch by
/// a second veth (`migup0` in the host, `c-<host>` in the switch's bridge): the containers of every
/// host then share the switch's L2 segment, and a container's address is reachable on whichever
/// host runs it. The host's own `eth0` and address are untouched.
pub(crate) fn create_container_bridge(
    host: &LabHost,
    switch: &str,
    switch_bridge: &str,
) -> Result<(), LabError> {
    let ns = host.netns.as_str();
    let bridge = mig_runtime::net::DEFAULT_BRIDGE;
    ip(&[
        "-n",
        ns,
        "link",
        "add",
        bridge,
        "type",
        "bridge",
        "stp_state",
        "0",
        "forward_delay",
        "0",
    ])?;
    let port = format!("c-{}", host.name);
    ip(&[
        "link", "add", UPLINK, "netns", ns, "type", "veth", "peer", "name", &port, "netns", switch,
    ])?;
    ip(&["-n", switch, "link", "set", &port, "master", switch_bridge])?;
    ip(&["-n", switch, "link", "set", &port, "up"])?;
    ip(&["-n", ns, "link", "set", UPLINK, "master", bridge])?;
    ip(&["-n", ns, "link", "set", UPLINK, "up"])?;
    ip(&["-n", ns, "link", "set", bridge, "up"])
}

/// Waits (at most `timeout`) until the bridge ports of the containers' segment forward: each
/// host's uplink and its switch end. A veth's carrier reaches its bridge port only when the
/// kernel's link watch runs (up to a second later): until then the port is `disabled`, and a
/// frame from one host's containers to another's is dropped (an ARP probe right after `lab up`
/// got no answer). Returns whether they all forward.
pub(crate) fn wait_container_segment(
    hosts: &[LabHost],
    switch: &str,
    timeout: std::time::Duration,
) -> bool {
    let forwarding = |ns: &str, dev: &str| {
        Command::new("bridge")
            .args(["-n", ns, "-j", "link", "show", "dev", dev])
            .output()
            .is_ok_and(|o| {
                o.status.success()
                    && String::from_utf8_lossy(&o.stdout).contains("\"state\":\"forwarding\"")
            })
    };
    let ports: Vec<(String, String)> = hosts
        .iter()
        .flat_map(|h| {
            [
                (h.netns.clone(), UPLINK.to_owned()),
                (switch.to_owned(), format!("c-{}", h.name)),
            ]
        })
        .collect();
    let deadline = std::time::Instant::now() + timeout;
    let mut waiting = ports;
    loop {
        waiting.retain(|(ns, dev)| !forwarding(ns, dev));
        if waiting.is_empty() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Puts the containers' gateway address on the switch's bridge (the one place every host's
/// containers reach, wherever they run).
pub(crate) fn set_gateway(switch: &str, bridge: &str, cidr: &str) -> Result<(), LabError> {
    ip(&["-n", switch, "addr", "add", cidr, "dev", bridge])
}

/// Deletes named namespace `ns` (its veth ends go with it). Not an error when it is already gone.
pub(crate) fn delete_netns(ns: &str) -> Result<bool, LabError> {
    if !netns_path(ns).exists() {
        return Ok(false);
    }
    ip(&["netns", "delete", ns])?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_suffixes() {
        assert!(is_host_suffix(Some("a")));
        assert!(is_host_suffix(Some("z")));
        assert!(!is_host_suffix(Some("x-y")));
        assert!(!is_host_suffix(Some("")));
        assert!(!is_host_suffix(None));
    }
}
