//! A gratuitous ARP from inside a container's network namespace: an ARP request for the
//! container's own address, broadcast from its MAC. Bridges on the segment learn the port the MAC
//! is behind now, and neighbours refresh their caches. Sent from a short-lived thread that joins
//! the container's network namespace (`setns` affects only the calling thread).

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const ETH_P_ARP: u16 = 0x0806;
/// How many announcements to send (one can be lost while a bridge port comes up).
const COUNT: usize = 3;
const GAP: std::time::Duration = std::time::Duration::from_millis(20);

/// The Ethernet frame: broadcast destination, ARP request "who has ADDR, tell ADDR" from `mac`.
fn frame(mac: [u8; 6], address: Ipv4Addr) -> [u8; 42] {
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
    f[28..32].copy_from_slice(&address.octets());
    // target hardware address stays zero
    f[38..42].copy_from_slice(&address.octets());
    f
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
    let c = std::ffi::CString::new(name).map_err(io::Error::other)?;
    // SAFETY: `c` is a NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(index)
}

fn send(ifindex: u32, mac: [u8; 6], address: Ipv4Addr) -> io::Result<()> {
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(ETH_P_ARP.to_be()),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor we own; OwnedFd closes it once.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value that we then fill in.
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = libc::AF_PACKET as u16;
    to.sll_protocol = ETH_P_ARP.to_be();
    to.sll_ifindex = ifindex as i32;
    to.sll_halen = 6;
    to.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    let f = frame(mac, address);
    for i in 0..COUNT {
        if i > 0 {
            std::thread::sleep(GAP);
        }
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
}
