//! Typed messages between the parent (the shim, or `exec`'s caller) and the child it cloned, over a
//! close-on-exec `SOCK_SEQPACKET` socketpair. Every message is one 8-byte datagram:
//! `[tag, step, 0, 0, errno as i32 little-endian]`. Encoding and decoding allocate nothing, so the
//! child can use them between clone and exec.
//!
//! Protocol: the parent sends [`Message::Go`] once it has finished its side (user-namespace maps);
//! the child runs its steps and sends either [`Message::Failed`] for the first failing step, or
//! [`Message::AboutToExec`] followed by `execve`, which closes the socket: the parent then reads
//! end-of-file. An exec failure after `AboutToExec` still arrives as `Failed`.

use super::sys::{self, SysResult};
use nix::errno::Errno;
use std::os::fd::RawFd;

/// A step of the container's setup, reported with the errno that made it fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Step {
    WaitParent = 1,
    JoinCgroup,
    BecomeRoot,
    Setsid,
    MountsPrivate,
    CloneHostMounts,
    BindRootfs,
    PivotRoot,
    DetachOldRoot,
    MountProc,
    MountDev,
    MakeDevNodes,
    MountDevPts,
    MountDevShm,
    MountDevMqueue,
    DevLinks,
    MountSys,
    MaskPaths,
    ReadonlyPaths,
    Hostname,
    Loopback,
    Stdio,
    Chdir,
    CapBounding,
    KeepCaps,
    SetGroups,
    SetGid,
    SetUid,
    CapSet,
    AmbientCaps,
    NoNewPrivs,
    Seccomp,
    CloseFds,
    Exec,
    Setns,
    Fork,
    Wait,
    Signals,
}

impl Step {
    const ALL: [Step; 38] = [
        Step::WaitParent,
        Step::JoinCgroup,
        Step::BecomeRoot,
        Step::Setsid,
        Step::MountsPrivate,
        Step::CloneHostMounts,
        Step::BindRootfs,
        Step::PivotRoot,
        Step::DetachOldRoot,
        Step::MountProc,
        Step::MountDev,
        Step::MakeDevNodes,
        Step::MountDevPts,
        Step::MountDevShm,
        Step::MountDevMqueue,
        Step::DevLinks,
        Step::MountSys,
        Step::MaskPaths,
        Step::ReadonlyPaths,
        Step::Hostname,
        Step::Loopback,
        Step::Stdio,
        Step::Chdir,
        Step::CapBounding,
        Step::KeepCaps,
        Step::SetGroups,
        Step::SetGid,
        Step::SetUid,
        Step::CapSet,
        Step::AmbientCaps,
        Step::NoNewPrivs,
        Step::Seccomp,
        Step::CloseFds,
        Step::Exec,
        Step::Setns,
        Step::Fork,
        Step::Wait,
        Step::Signals,
    ];

    fn from_u8(b: u8) -> Option<Step> {
        Step::ALL.iter().copied().find(|s| *s as u8 == b)
    }

    /// A short lowercase description, used in error messages.
    pub fn describe(self) -> &'static str {
        match self {
            Step::WaitParent => "waiting for the parent",
            Step::JoinCgroup => "joining the cgroup",
            Step::BecomeRoot => "becoming root in the user namespace",
            Step::Setsid => "creating a session",
            Step::MountsPrivate => "making mounts private",
            Step::CloneHostMounts => "cloning host mounts for the user namespace",
            Step::BindRootfs => "bind-mounting the rootfs",
            Step::PivotRoot => "pivot_root",
            Step::DetachOldRoot => "detaching the old root",
            Step::MountProc => "mounting /proc",
            Step::MountDev => "mounting /dev",
            Step::MakeDevNodes => "creating device nodes",
            Step::MountDevPts => "mounting /dev/pts",
            Step::MountDevShm => "mounting /dev/shm",
            Step::MountDevMqueue => "mounting /dev/mqueue",
            Step::DevLinks => "creating /dev symlinks",
            Step::MountSys => "mounting /sys",
            Step::MaskPaths => "masking paths",
            Step::ReadonlyPaths => "making paths read-only",
            Step::Hostname => "setting the hostname",
            Step::Loopback => "bringing up loopback",
            Step::Stdio => "setting up stdio",
            Step::Chdir => "changing to the working directory",
            Step::CapBounding => "dropping bounding capabilities",
            Step::KeepCaps => "keeping capabilities across setuid",
            Step::SetGroups => "setting supplementary groups",
            Step::SetGid => "setting the gid",
            Step::SetUid => "setting the uid",
            Step::CapSet => "setting capabilities",
            Step::AmbientCaps => "clearing ambient capabilities",
            Step::NoNewPrivs => "setting no_new_privs",
            Step::Seccomp => "installing the seccomp filter",
            Step::CloseFds => "closing inherited descriptors",
            Step::Exec => "executing the command",
            Step::Setns => "joining the container's namespaces",
            Step::Fork => "forking into the pid namespace",
            Step::Wait => "waiting for the command",
            Step::Signals => "resetting signal handling",
        }
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.describe())
    }
}

/// A failing step in the child: which one and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fail {
    pub step: Step,
    pub errno: Errno,
}

/// Attaches a [`Step`] to a syscall result.
pub(crate) trait At<T> {
    fn at(self, step: Step) -> Result<T, Fail>;
}

impl<T> At<T> for SysResult<T> {
    fn at(self, step: Step) -> Result<T, Fail> {
        self.map_err(|errno| Fail { step, errno })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Message {
    /// Parent to child: continue with the setup.
    Go,
    /// Child to parent: every step succeeded, `execve` comes next.
    AboutToExec,
    /// Child to parent: a step failed.
    Failed(Fail),
}

const LEN: usize = 8;
const TAG_GO: u8 = 1;
const TAG_ABOUT_TO_EXEC: u8 = 2;
const TAG_FAILED: u8 = 3;

impl Message {
    pub(crate) fn encode(self) -> [u8; LEN] {
        let (tag, step, errno) = match self {
            Message::Go => (TAG_GO, 0, 0),
            Message::AboutToExec => (TAG_ABOUT_TO_EXEC, 0, 0),
            Message::Failed(f) => (TAG_FAILED, f.step as u8, f.errno as i32),
        };
        let e = errno.to_le_bytes();
        [tag, step, 0, 0, e[0], e[1], e[2], e[3]]
    }

    pub(crate) fn decode(buf: &[u8]) -> Option<Message> {
        let buf: &[u8; LEN] = buf.try_into().ok()?;
        let errno = i32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
        match buf[0] {
            TAG_GO => Some(Message::Go),
            TAG_ABOUT_TO_EXEC => Some(Message::AboutToExec),
            TAG_FAILED => Some(Message::Failed(Fail {
                step: Step::from_u8(buf[1])?,
                errno: Errno::from_raw(errno),
            })),
            _ => None,
        }
    }
}

pub(crate) fn send(fd: RawFd, msg: Message) -> SysResult<()> {
    sys::send(fd, &msg.encode())
}

/// Receives one message; `Ok(None)` at end of file. A malformed datagram is `EBADMSG`.
pub(crate) fn recv(fd: RawFd) -> SysResult<Option<Message>> {
    let mut buf = [0u8; LEN + 1];
    match sys::recv(fd, &mut buf)? {
        0 => Ok(None),
        n => Message::decode(&buf[..n]).map(Some).ok_or(Errno::EBADMSG),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        for step in Step::ALL {
            let m = Message::Failed(Fail {
                step,
                errno: Errno::EPERM,
            });
            assert_eq!(Message::decode(&m.encode()), Some(m));
        }
        assert_eq!(Message::decode(&Message::Go.encode()), Some(Message::Go));
        assert_eq!(
            Message::decode(&Message::AboutToExec.encode()),
            Some(Message::AboutToExec)
        );
    }

    #[test]
    fn malformed_messages_are_refused() {
        assert_eq!(Message::decode(&[9, 0, 0, 0, 0, 0, 0, 0]), None);
        assert_eq!(Message::decode(&[3, 200, 0, 0, 1, 0, 0, 0]), None);
        assert_eq!(Message::decode(&[1, 0, 0]), None);
    }

    #[test]
    fn step_codes_are_distinct() {
        for (i, s) in Step::ALL.iter().enumerate() {
            assert_eq!(*s as u8 as usize, i + 1);
        }
    }
}
