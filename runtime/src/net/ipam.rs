//! The host's container network (`<state-dir>/net.json`) and the address table its containers'
//! addresses come from. Hosts that share an L2 segment (a lab's hosts) share one table file, so an
//! address is never given twice on the segment, and a container keeps its entry when it moves.
//! The table is a JSON map `address -> container id`, changed under an exclusive `flock`.

use super::{host_ifname_for_id, mac_for_id, NetError, NetMode, NetSpec};
use crate::fsutil;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

/// File name of the host's network configuration in the agent's state directory.
pub const HOST_NET_FILE: &str = "net.json";
/// How long [`HostNet::answering`] waits for an answer (on a bridged segment one comes in well
/// under a millisecond).
pub const PROBE_WAIT: std::time::Duration = std::time::Duration::from_millis(200);
/// Largest configuration or table read back.
const MAX_FILE: u64 = 1 << 20;

/// How this host networks `--net bridge` containers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostNet {
    /// The bridge container veths join (it must exist in the agent's network namespace).
    pub bridge: String,
    /// Network address and prefix length of the container subnet.
    pub subnet: Ipv4Addr,
    pub prefix_len: u8,
    /// The containers' default route.
    pub gateway: Option<Ipv4Addr>,
    /// The pool addresses are taken from, inclusive.
    pub first: Ipv4Addr,
    pub last: Ipv4Addr,
    /// The address table shared by the hosts of the segment.
    pub table: PathBuf,
    /// Name servers for the containers' `/etc/resolv.conf`.
    #[serde(default)]
    pub dns: Vec<Ipv4Addr>,
    /// Addresses of the subnet that are not containers' (hosts, routers): never given out,
    /// refused to `--ip` and to an imported checkpoint. `mig lab up` lists its hosts here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reserved: Vec<Ipv4Addr>,
}

type Table = BTreeMap<Ipv4Addr, String>;

fn mask(prefix_len: u8) -> u32 {
    if prefix_len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix_len.min(32)))
    }
}

impl HostNet {
    /// Reads `<state_dir>/net.json`.
    pub fn load(state_dir: &Path) -> Result<HostNet, NetError> {
        let path = state_dir.join(HOST_NET_FILE);
        match fsutil::read_json(&path, MAX_FILE) {
            Ok(n) => Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(NetError::NoHostNet { path }),
            Err(source) => Err(NetError::ReadFile { path, source }),
        }
    }

    /// Writes `<state_dir>/net.json`.
    pub fn store(&self, state_dir: &Path) -> Result<(), NetError> {
        let path = state_dir.join(HOST_NET_FILE);
        fsutil::write_json(&path, self).map_err(|source| NetError::WriteFile { path, source })
    }

    /// `SUBNET/PREFIX`.
    pub fn subnet_cidr(&self) -> String {
        format!("{}/{}", self.subnet, self.prefix_len)
    }

    /// Whether `a` is a host address of the subnet (not its network or broadcast address).
    pub fn contains(&self, a: Ipv4Addr) -> bool {
        let m = mask(self.prefix_len);
        let net = u32::from(self.subnet) & m;
        let a = u32::from(a);
        a & m == net && a != net && a != net | !m
    }

    /// Gives container `id` an address: `want` when it is in the subnet and free (or already
    /// `id`'s), else the first free one of the pool (or the one `id` already holds), and returns
    /// the container's network spec.
    pub fn allocate(&self, id: &str, want: Option<Ipv4Addr>) -> Result<NetSpec, NetError> {
        let address = self.with_table(|table| {
            if let Some(a) = want {
                if !self.contains(a) || Some(a) == self.gateway {
                    return Err(NetError::OutOfSubnet {
                        address: a,
                        subnet: self.subnet_cidr(),
                    });
                }
                if self.reserved.contains(&a) {
                    return Err(NetError::Reserved { address: a });
                }
                match table.get(&a) {
                    Some(owner) if owner != id => {
                        return Err(NetError::AddressTaken {
                            address: a,
                            owner: owner.clone(),
                        })
                    }
                    _ => {}
                }
                table.retain(|_, owner| owner != id);
                table.insert(a, id.to_owned());
                return Ok(a);
            }
            if let Some((a, _)) = table.iter().find(|(_, owner)| *owner == id) {
                return Ok(*a);
            }
            let free = (u32::from(self.first)..=u32::from(self.last))
                .map(Ipv4Addr::from)
                .find(|a| {
                    self.contains(*a)
                        && Some(*a) != self.gateway
                        && !self.reserved.contains(a)
                        && !table.contains_key(a)
                })
                .ok_or_else(|| NetError::Exhausted {
                    subnet: self.subnet_cidr(),
                })?;
            table.insert(free, id.to_owned());
            Ok(free)
        })?;
        Ok(NetSpec {
            mode: NetMode::Bridge,
            address,
            prefix_len: self.prefix_len,
            gateway: self.gateway,
            mac: mac_for_id(id),
            bridge: self.bridge.clone(),
            host_ifname: host_ifname_for_id(id),
            dns: self.dns.clone(),
        })
    }

    /// Records `address` as container `id`'s, as it comes in a checkpoint (`restore --import`):
    /// refused when the table gives it to another container, whatever the subnet. The address
    /// cannot change: it is in the checkpoint's images.
    pub fn claim(&self, id: &str, address: Ipv4Addr) -> Result<(), NetError> {
        if self.reserved.contains(&address) {
            return Err(NetError::Reserved { address });
        }
        self.with_table(|table| {
            if let Some(owner) = table.get(&address).filter(|o| *o != id) {
                return Err(NetError::AddressTaken {
                    address,
                    owner: owner.clone(),
                });
            }
            table.retain(|_, owner| owner != id);
            table.insert(address, id.to_owned());
            Ok(())
        })
    }

    /// The MAC that answers ARP for `address` on the segment now, seen from this host's bridge
    /// (RFC 5227 probes, [`PROBE_WAIT`]): a container that owns it still running elsewhere, as
    /// after `checkpoint --leave-running` and a `restore --import` on another host.
    pub fn answering(&self, address: Ipv4Addr) -> Result<Option<[u8; 6]>, NetError> {
        super::garp::probe(&self.bridge, address, PROBE_WAIT).map_err(|source| NetError::Probe {
            address,
            bridge: self.bridge.clone(),
            source,
        })
    }

    /// Gives back the addresses of container `id` (when it is removed for good).
    pub fn release(&self, id: &str) -> Result<(), NetError> {
        self.with_table(|table| {
            table.retain(|_, owner| owner != id);
            Ok(())
        })
    }

    /// Runs `f` on the table under its lock and writes the table back when `f` succeeds.
    fn with_table<T>(
        &self,
        f: impl FnOnce(&mut Table) -> Result<T, NetError>,
    ) -> Result<T, NetError> {
        let lock_path = self.table.with_extension("lock");
        if let Some(dir) = self.table.parent() {
            std::fs::create_dir_all(dir).map_err(|source| NetError::WriteFile {
                path: dir.to_owned(),
                source,
            })?;
        }
        let lock_err = |source| NetError::Lock {
            path: lock_path.clone(),
            source,
        };
        let _guard = fsutil::lock_exclusive(&lock_path).map_err(lock_err)?;
        let mut table: Table = match fsutil::read_json(&self.table, MAX_FILE) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Table::new(),
            Err(source) => {
                return Err(NetError::ReadFile {
                    path: self.table.clone(),
                    source,
                })
            }
        };
        let out = f(&mut table)?;
        fsutil::write_json(&self.table, &table).map_err(|source| NetError::WriteFile {
            path: self.table.clone(),
            source,
        })?;
        Ok(out)
    }
}

/// Gives back container `id`'s address when this host has a container network (no-op otherwise).
pub fn release(state_dir: &Path, id: &str) -> Result<(), NetError> {
    match HostNet::load(state_dir) {
        Ok(n) => n.release(id),
        Err(NetError::NoHostNet { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host_net(dir: &Path) -> HostNet {
        HostNet {
            bridge: "migbr0".into(),
            subnet: Ipv4Addr::new(10, 214, 80, 0),
            prefix_len: 24,
            gateway: Some(Ipv4Addr::new(10, 214, 80, 1)),
            first: Ipv4Addr::new(10, 214, 80, 100),
            last: Ipv4Addr::new(10, 214, 80, 101),
            table: dir.join("addresses.json"),
            dns: vec![],
            reserved: vec![],
        }
    }

    #[test]
    fn reserved_addresses_are_never_given_out() {
        let dir = tempfile::tempdir().unwrap();
        let n = HostNet {
            reserved: vec![
                Ipv4Addr::new(10, 214, 80, 100),
                Ipv4Addr::new(10, 214, 80, 10),
            ],
            ..host_net(dir.path())
        };
        let a = "a".repeat(32);
        assert_eq!(
            n.allocate(&a, None).unwrap().address,
            Ipv4Addr::new(10, 214, 80, 101)
        );
        let b = "b".repeat(32);
        for host in [10, 100] {
            let e = n.allocate(&b, Some(Ipv4Addr::new(10, 214, 80, host)));
            assert!(matches!(e, Err(NetError::Reserved { .. })), "{e:?}");
            let e = n.claim(&b, Ipv4Addr::new(10, 214, 80, host));
            assert!(matches!(e, Err(NetError::Reserved { .. })), "{e:?}");
        }
        assert!(matches!(
            n.allocate(&b, None),
            Err(NetError::Exhausted { .. })
        ));
    }

    #[test]
    fn allocates_without_clash_and_releases() {
        let dir = tempfile::tempdir().unwrap();
        let n = host_net(dir.path());
        let a = "a".repeat(32);
        let b = "b".repeat(32);
        let c = "c".repeat(32);
        let sa = n.allocate(&a, None).unwrap();
        assert_eq!(sa.address, Ipv4Addr::new(10, 214, 80, 100));
        assert_eq!(sa.gateway, n.gateway);
        // The same container asking again keeps its address.
        assert_eq!(n.allocate(&a, None).unwrap().address, sa.address);
        let sb = n.allocate(&b, None).unwrap();
        assert_eq!(sb.address, Ipv4Addr::new(10, 214, 80, 101));
        assert!(matches!(
            n.allocate(&c, None),
            Err(NetError::Exhausted { .. })
        ));
        assert!(matches!(
            n.allocate(&c, Some(sa.address)),
            Err(NetError::AddressTaken { .. })
        ));
        assert!(matches!(
            n.allocate(&c, Some(Ipv4Addr::new(10, 9, 9, 9))),
            Err(NetError::OutOfSubnet { .. })
        ));
        assert!(matches!(
            n.allocate(&c, Some(Ipv4Addr::new(10, 214, 80, 255))),
            Err(NetError::OutOfSubnet { .. })
        ));
        // An explicit address outside the pool but in the subnet is fine.
        let sc = n
            .allocate(&c, Some(Ipv4Addr::new(10, 214, 80, 50)))
            .unwrap();
        assert_eq!(sc.address, Ipv4Addr::new(10, 214, 80, 50));
        n.release(&a).unwrap();
        assert_eq!(
            n.allocate(&c, None).unwrap().address,
            Ipv4Addr::new(10, 214, 80, 50)
        );
        let d = "d".repeat(32);
        assert_eq!(n.allocate(&d, None).unwrap().address, sa.address);
    }

    #[test]
    fn a_claim_never_takes_another_containers_address() {
        let dir = tempfile::tempdir().unwrap();
        let n = host_net(dir.path());
        let a = "a".repeat(32);
        let b = "b".repeat(32);
        let sa = n.allocate(&a, None).unwrap();
        assert!(matches!(
            n.claim(&b, sa.address),
            Err(NetError::AddressTaken { owner, .. }) if owner == a
        ));
        // Its own address, and one nobody holds (outside the pool too), are recorded.
        n.claim(&a, sa.address).unwrap();
        let other = Ipv4Addr::new(10, 214, 80, 7);
        n.claim(&b, other).unwrap();
        assert!(matches!(
            n.allocate(&a, Some(other)),
            Err(NetError::AddressTaken { .. })
        ));
        n.release(&b).unwrap();
        n.allocate(&a, Some(other)).unwrap();
    }

    #[test]
    fn host_net_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let n = host_net(dir.path());
        n.store(dir.path()).unwrap();
        assert_eq!(HostNet::load(dir.path()).unwrap(), n);
        let missing = tempfile::tempdir().unwrap();
        assert!(matches!(
            HostNet::load(missing.path()),
            Err(NetError::NoHostNet { .. })
        ));
        release(missing.path(), "x").unwrap();
    }
}
