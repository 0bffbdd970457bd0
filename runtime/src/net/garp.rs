//! A gratuitous ARP from inside a container's network namespace: an ARP request for the
//! container's own address, broadcast from its MAC. Bridges on the segment learn the port the MAC
//! is behind now, and neighbours refresh their caches. Sent from a short-lived thread that joins
//! the container's network namespace (`setns` affects only the calling thread).
//!
//! Also the other way round, [`probe`]: an ARP probe (RFC 5227: "who has ADDR", from no address)
//! sent from a host's bridge, to learn whether something on the segment already answers for an
//! address before a container that owns it is restored.

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recv, MsgFlags};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

const ETH_P_ARP: u16 = 0x0806;
/// How many announcements to send (one can be lost while a bridge port comes up).
const COUNT: usize = 3;
const GAP: std::time::Duration = std::time::Duration::from_millis(20);

/// The Ethernet frame: broadcast destination, ARP request "who has ADDR, tell ADDR" from `mac`.
fn frame(mac: [u8; 6], address: Ipv4Addr) -> [u8; 42] {
    request(mac, address, address)
}

/// An ARP request for `target` from `mac` and `sender` (0.0.0.0 for a probe), broadcast.
fn request(mac: [u8; 6], sender: Ipv4Addr, target: Ipv4Addr) -> [u8; 42] {
    let mut f = [0u8; 42];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // hardware type: Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol type: IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&1u16.to_be_bytes()); // operation: request
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&sender.octets());
    // target hardware address stays zero
    f[38..42].copy_from_slice(&target.octets());
    f
}

/// The sender's MAC of an ARP frame in which someone other than `own` says it has `address` (a
/// reply, or a request or announcement from that address).
fn claims(frame: &[u8], address: Ipv4Addr, own: [u8; 6]) -> Option<[u8; 6]> {
    if frame.len() < 42 || frame[12..14] != ETH_P_ARP.to_be_bytes() {
        return None;
    }
    let op = u16::from_be_bytes([frame[20], frame[21]]);
    let sha: [u8; 6] = frame[22..28].try_into().ok()?;
    ((op == 1 || op == 2) && frame[28..32] == address.octets() && sha != own).then_some(sha)
}

/// Probes for `address` from interface `ifname` of the calling thread's network namespace: two
/// ARP probes 50 ms apart, then waits until `wait` after the first. Returns the MAC that
/// answered, if any.
pub(super) fn probe(
    ifname: &str,
    address: Ipv4Addr,
    wait: std::time::Duration,
) -> io::Result<Option<[u8; 6]>> {
    let ifindex = if_index(ifname)?;
    // No protocol until bound to the interface: nothing from other interfaces is queued.
    let fd = packet_socket(0)?;
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value that we then fill in.
    let mut at: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    at.sll_family = libc::AF_PACKET as u16;
    at.sll_protocol = ETH_P_ARP.to_be();
    at.sll_ifindex = ifindex as i32;
    // SAFETY: `at` lives across the call and its length is passed with it.
    if unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::addr_of!(at).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    let own = hw_address(&fd, ifname)?;
    let f = request(own, Ipv4Addr::UNSPECIFIED, address);
    let start = std::time::Instant::now();
    let mut sent = 0;
    let mut buf = [0u8; 128];
    loop {
        if sent < 2 && start.elapsed() >= GAP_PROBE * sent {
            send_to(&fd, ifindex, &f)?;
            sent += 1;
        }
        let left = wait.saturating_sub(start.elapsed());
        if left.is_zero() {
            return Ok(None);
        }
        let next = if sent < 2 {
            left.min((GAP_PROBE * sent).saturating_sub(start.elapsed()))
        } else {
            left
        };
        let ms = u16::try_from(next.as_millis().clamp(1, 1000)).unwrap_or(1000);
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) | Err(Errno::EINTR) => continue,
            Ok(_) => {}
            Err(e) => return Err(e.into()),
        }
        let Ok(got) = recv(fd.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) else {
            continue;
        };
        if let Some(mac) = claims(&buf[..got], address, own) {
            return Ok(Some(mac));
        }
    }
}

/// Between the two probes.
const GAP_PROBE: std::time::Duration = std::time::Duration::from_millis(50);

/// The hardware address of interface `ifname` (`SIOCGIFHWADDR`).
fn hw_address(fd: &OwnedFd, ifname: &str) -> io::Result<[u8; 6]> {
    // SAFETY: ifreq is plain data; all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let name = ifname.as_bytes();
    if name.len() >= req.ifr_name.len() {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    for (d, s) in req.ifr_name.iter_mut().zip(name) {
        *d = *s as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR fills the ifreq it is given.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: after SIOCGIFHWADDR the union holds the hardware address.
    let data = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
    let mut mac = [0u8; 6];
    for (d, s) in mac.iter_mut().zip(data.iter()) {
        *d = *s as u8;
    }
    Ok(mac)
}

/// Sends the announcement from interface `ifname` in the network namespace of `pid`.
pub(super) fn announce(pid: i32, ifname: &str, mac: [u8; 6], address: Ipv4Addr) -> io::Result<()> {
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))?;
    let ifname = ifname.to_owned();
    std::thread::spawn(move || -> io::Result<()> {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        send(if_index(&ifname)?, mac, address)
    })
    .join()
    .map_err(|_| io::Error::other("the announcing thread panicked"))?
}

/// The index of interface `name` in the calling thread's network namespace.
fn if_index(name: &str) -> io::Result<u32> {
    Ok(nix::net::if_::if_nametoindex(name)?)
}

fn send(ifindex: u32, mac: [u8; 6], address: Ipv4Addr) -> io::Result<()> {
    let fd = packet_socket(ETH_P_ARP)?;
    let f = frame(mac, address);
    for i in 0..COUNT {
        if i > 0 {
            std::thread::sleep(GAP);
        }
        send_to(&fd, ifindex, &f)?;
    }
    Ok(())
}

/// A raw packet socket receiving frames of `protocol` (0: none until bound).
fn packet_socket(protocol: u16) -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with plain integer arguments; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(protocol.to_be()),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor we own; OwnedFd closes it once.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sends frame `f` (broadcast) out of interface `ifindex`.
fn send_to(fd: &OwnedFd, ifindex: u32, f: &[u8]) -> io::Result<()> {
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value that we then fill in.
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = libc::AF_PACKET as u16;
    to.sll_protocol = ETH_P_ARP.to_be();
    to.sll_ifindex = ifindex as i32;
    to.sll_halen = 6;
    to.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    // SAFETY: `f` and `to` live across the call and their lengths are passed with them.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            f.as_ptr().cast(),
            f.len(),
            0,
            std::ptr::addr_of!(to).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_layout() {
        let f = frame([2, 1, 2, 3, 4, 5], Ipv4Addr::new(10, 0, 0, 7));
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[22..28], &[2, 1, 2, 3, 4, 5]);
        assert_eq!(&f[28..32], &[10, 0, 0, 7]);
        assert_eq!(&f[32..38], &[0; 6]);
        assert_eq!(&f[38..42], &[10, 0, 0, 7]);
    }

    #[test]
    fn a_probe_is_from_no_address_and_replies_are_recognised() {
        let own = [2, 0, 0, 0, 0, 1];
        let a = Ipv4Addr::new(10, 0, 0, 7);
        let p = request(own, Ipv4Addr::UNSPECIFIED, a);
        assert_eq!(&p[28..32], &[0; 4]);
        assert_eq!(&p[38..42], &[10, 0, 0, 7]);
        // Our own probe says nothing; another host's reply or announcement does.
        assert_eq!(claims(&p, a, own), None);
        let other = [2, 9, 9, 9, 9, 9];
        let mut reply = frame(other, a);
        reply[20..22].copy_from_slice(&2u16.to_be_bytes());
        assert_eq!(claims(&reply, a, own), Some(other));
        assert_eq!(claims(&frame(other, a), a, own), Some(other));
        assert_eq!(claims(&reply, Ipv4Addr::new(10, 0, 0, 8), own), None);
        assert_eq!(claims(&reply[..30], a, own), None);
    }
}
