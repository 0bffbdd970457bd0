//! Confinement applied to every process started in a container (the init and `exec`ed commands):
//! user and group ids with the supplementary groups the container's /etc/group gives the user,
//! Docker's default capability set, no_new_privs, and a deny-list seccomp
//! filter. [`Confinement::new`] builds everything (the BPF program included) before the fork;
//! [`Confinement::apply`] only makes system calls.

use super::channel::{At, Fail, Step};
use super::sys;
use std::io;

/// Docker's default capabilities: the bounding, permitted and effective sets of a container's
/// root (its inheritable set is empty; a non-root user's sets other than bounding are too).
pub const DEFAULT_CAPS: &[u32] = &[
    0,  // CAP_CHOWN
    1,  // CAP_DAC_OVERRIDE
    3,  // CAP_FOWNER
    4,  // CAP_FSETID
    5,  // CAP_KILL
    6,  // CAP_SETGID
    7,  // CAP_SETUID
    8,  // CAP_SETPCAP
    10, // CAP_NET_BIND_SERVICE
    13, // CAP_NET_RAW
    18, // CAP_SYS_CHROOT
    27, // CAP_MKNOD
    29, // CAP_AUDIT_WRITE
    31, // CAP_SETFCAP
];

/// [`DEFAULT_CAPS`] as a bit mask (the `CapEff` a root process shows: `00000000a80425fb`).
pub fn default_caps_mask() -> u64 {
    DEFAULT_CAPS.iter().fold(0, |m, c| m | 1 << c)
}

/// Reads the highest capability number the kernel knows.
pub(crate) fn cap_last_cap() -> io::Result<u32> {
    let s = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")?;
    s.trim()
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Everything needed to confine a process, prepared before clone/fork.
#[derive(Debug)]
pub(crate) struct Confinement {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups, set exactly (from the container's /etc/group: `account`).
    pub groups: Vec<libc::gid_t>,
    pub cap_last: u32,
    pub seccomp: Vec<libc::sock_filter>,
}

impl Confinement {
    pub(crate) fn new(uid: u32, gid: u32, groups: Vec<libc::gid_t>) -> io::Result<Confinement> {
        Ok(Confinement {
            uid,
            gid,
            groups,
            cap_last: cap_last_cap()?,
            seccomp: seccomp_program(),
        })
    }

    /// Applies ids, capabilities, no_new_privs and, last, seccomp. Allocation-free.
    pub(crate) fn apply(&self) -> Result<(), Fail> {
        let keep = default_caps_mask();
        // Bounding set first: dropping needs CAP_SETPCAP, which we still have as root.
        for cap in 0..=self.cap_last.min(63) {
            if keep & (1 << cap) == 0 {
                sys::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong).at(Step::CapBounding)?;
            }
        }
        // Keep the permitted set across setuid to a non-root uid so that capset below decides.
        sys::prctl(libc::PR_SET_KEEPCAPS, 1).at(Step::KeepCaps)?;
        // Exactly the user's groups: none of the caller's survive.
        sys::set_groups(&self.groups).at(Step::SetGroups)?;
        sys::setresgid(self.gid).at(Step::SetGid)?;
        sys::setresuid(self.uid).at(Step::SetUid)?;
        // Root gets the default set as permitted and effective; execve gives it back from the
        // bounding set. A non-root uid gets none. No process gets an inheritable set: with one,
        // a file's inheritable capabilities gave a non-root user the default set back at execve,
        // no_new_privs notwithstanding, as its permitted set still held them (QA of session 29,
        // the pattern of CVE-2022-24769 that Docker and podman fixed in 2022).
        let (eff, perm) = if self.uid == 0 { (keep, keep) } else { (0, 0) };
        sys::capset(eff, perm, 0).at(Step::CapSet)?;
        sys::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
        )
        .at(Step::AmbientCaps)?;
        sys::prctl(libc::PR_SET_NO_NEW_PRIVS, 1).at(Step::NoNewPrivs)?;
        // Seccomp last: everything above may need a syscall the filter denies.
        sys::seccomp_install(&self.seccomp).at(Step::Seccomp)
    }
}

/// System calls a container may never make (they fail with EPERM), on every architecture.
fn denied_syscalls() -> Vec<libc::c_long> {
    use libc::*;
    #[allow(unused_mut)]
    let mut v = vec![
        SYS_mount,
        SYS_umount2,
        SYS_pivot_root,
        SYS_fsopen,
        SYS_fsconfig,
        SYS_fsmount,
        SYS_fspick,
        SYS_move_mount,
        SYS_open_tree,
        SYS_mount_setattr,
        SYS_kexec_load,
        SYS_kexec_file_load,
        SYS_init_module,
        SYS_finit_module,
        SYS_delete_module,
        SYS_bpf,
        SYS_ptrace,
        SYS_keyctl,
        SYS_add_key,
        SYS_request_key,
        SYS_unshare,
        SYS_setns,
        SYS_swapon,
        SYS_swapoff,
        SYS_reboot,
        SYS_acct,
        SYS_open_by_handle_at,
        SYS_name_to_handle_at,
        SYS_perf_event_open,
        SYS_userfaultfd,
        SYS_io_uring_setup,
        SYS_io_uring_enter,
        SYS_io_uring_register,
        SYS_lookup_dcookie,
        SYS_quotactl,
        SYS_quotactl_fd,
        SYS_settimeofday,
        SYS_clock_settime,
        SYS_clock_adjtime,
        SYS_adjtimex,
        SYS_syslog,
        SYS_vhangup,
        SYS_process_vm_readv,
        SYS_process_vm_writev,
        SYS_kcmp,
        SYS_pidfd_getfd,
    ];
    #[cfg(target_arch = "x86_64")]
    v.extend([SYS_iopl, SYS_ioperm, SYS_uselib, SYS_ustat, SYS_sysfs]);
    v
}

/// i386 numbers of the system calls [`denied_syscalls`] names, and of the ones only i386 has
/// (`umount`, `vm86old`, `vm86`, and the 64-bit time versions of `clock_settime` and
/// `clock_adjtime`): a 32-bit x86 program runs on x86_64 under its own numbers and audit
/// architecture (`arch/x86/entry/syscalls/syscall_32.tbl`; i386 has no `kexec_file_load`).
#[cfg(target_arch = "x86_64")]
const DENIED_I386: [(&str, u32); 55] = [
    ("mount", 21),
    ("umount", 22),
    ("umount2", 52),
    ("pivot_root", 217),
    ("fsopen", 430),
    ("fsconfig", 431),
    ("fsmount", 432),
    ("fspick", 433),
    ("move_mount", 429),
    ("open_tree", 428),
    ("mount_setattr", 442),
    ("kexec_load", 283),
    ("init_module", 128),
    ("finit_module", 350),
    ("delete_module", 129),
    ("bpf", 357),
    ("ptrace", 26),
    ("keyctl", 288),
    ("add_key", 286),
    ("request_key", 287),
    ("unshare", 310),
    ("setns", 346),
    ("swapon", 87),
    ("swapoff", 115),
    ("reboot", 88),
    ("acct", 51),
    ("open_by_handle_at", 342),
    ("name_to_handle_at", 341),
    ("perf_event_open", 336),
    ("userfaultfd", 374),
    ("io_uring_setup", 425),
    ("io_uring_enter", 426),
    ("io_uring_register", 427),
    ("lookup_dcookie", 253),
    ("quotactl", 131),
    ("quotactl_fd", 443),
    ("settimeofday", 79),
    ("clock_settime", 264),
    ("clock_settime64", 404),
    ("clock_adjtime", 343),
    ("clock_adjtime64", 405),
    ("adjtimex", 124),
    ("syslog", 103),
    ("vhangup", 111),
    ("process_vm_readv", 347),
    ("process_vm_writev", 348),
    ("kcmp", 349),
    ("pidfd_getfd", 438),
    ("iopl", 110),
    ("ioperm", 101),
    ("uselib", 86),
    ("ustat", 62),
    ("sysfs", 135),
    ("vm86old", 113),
    ("vm86", 166),
];
/// i386's `clone`, `clone3` and `personality` (checked as on x86_64; `clone`'s flags are its
/// first argument there too).
#[cfg(target_arch = "x86_64")]
const I386_CLONE: u32 = 120;
#[cfg(target_arch = "x86_64")]
const I386_CLONE3: u32 = 435;
#[cfg(target_arch = "x86_64")]
const I386_PERSONALITY: u32 = 136;
#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH_I386: u32 = 0x4000_0003;

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E; // AUDIT_ARCH_X86_64
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7; // AUDIT_ARCH_AARCH64

/// x32 system calls carry this bit on x86_64 under the same audit architecture; they would bypass
/// a filter on x86_64 numbers, so all of them are refused.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// `clone` flags that create namespaces: refused like `unshare`.
const CLONE_NS_FLAGS: u32 = 0x7E02_0000;

/// personality(2) values Docker allows: PER_LINUX, UNAME26, PER_LINUX32, PER_LINUX32|UNAME26, query.
const PERSONALITY_OK: [u32; 5] = [0x0, 0x0008, 0x0002_0000, 0x0002_0008, 0xffff_ffff];

// seccomp_data offsets
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
const OFF_ARG0_LO: u32 = 16; // little-endian low half of args[0]

/// Jump target of a conditional in the small assembler below.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    Next,
    Kill,
    Allow,
    Deny,
    Enosys,
    Personality,
    /// The checks of the second architecture (i386 on x86_64).
    Compat,
    CompatPersonality,
}

const LABELS: [Target; 7] = [
    Target::Kill,
    Target::Allow,
    Target::Deny,
    Target::Enosys,
    Target::Personality,
    Target::Compat,
    Target::CompatPersonality,
];

enum Insn {
    Ld(u32),
    Jmp {
        op: u16,
        k: u32,
        jt: Target,
        jf: Target,
    },
    Ret(u32),
    Label(Target),
}

/// One architecture's system call numbers for [`seccomp_program`].
struct Numbers {
    denied: Vec<u32>,
    clone: u32,
    clone3: u32,
    personality: u32,
}

/// The host architecture's numbers.
fn native_numbers() -> Numbers {
    Numbers {
        denied: denied_syscalls().into_iter().map(|n| n as u32).collect(),
        clone: libc::SYS_clone as u32,
        clone3: libc::SYS_clone3 as u32,
        personality: libc::SYS_personality as u32,
    }
}

const JEQ: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const JGE: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
const JSET: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;

/// The checks of one architecture, with the number already loaded: denied calls get EPERM,
/// `clone3` ENOSYS (so libc falls back to `clone`, whose flags can be checked), `clone` with
/// namespace flags EPERM, `personality` only the harmless values; the rest runs.
fn arch_checks(p: &mut Vec<Insn>, n: &Numbers, personality: Target) {
    use Target::*;
    for &nr in &n.denied {
        p.push(Insn::Jmp {
            op: JEQ,
            k: nr,
            jt: Deny,
            jf: Next,
        });
    }
    p.push(Insn::Jmp {
        op: JEQ,
        k: n.clone3,
        jt: Enosys,
        jf: Next,
    });
    // clone: refuse namespace flags (args[0] is the flags word on x86_64, i386 and aarch64).
    p.push(Insn::Jmp {
        op: JEQ,
        k: n.clone,
        jt: Next,
        jf: personality,
    });
    p.push(Insn::Ld(OFF_ARG0_LO));
    p.push(Insn::Jmp {
        op: JSET,
        k: CLONE_NS_FLAGS,
        jt: Deny,
        jf: Allow,
    });
    p.push(Insn::Label(personality));
    p.push(Insn::Jmp {
        op: JEQ,
        k: n.personality,
        jt: Next,
        jf: Allow,
    });
    p.push(Insn::Ld(OFF_ARG0_LO));
    for ok in PERSONALITY_OK {
        p.push(Insn::Jmp {
            op: JEQ,
            k: ok,
            jt: Allow,
            jf: Next,
        });
    }
    p.push(Insn::Ret(libc::SECCOMP_RET_ERRNO | libc::EPERM as u32));
}

/// Builds the deny-list filter ([`arch_checks`]) for the host's architecture and, on x86_64,
/// for 32-bit x86 programs under their own numbers; any other architecture kills the process.
pub(crate) fn seccomp_program() -> Vec<libc::sock_filter> {
    use Target::*;
    let compat = cfg!(target_arch = "x86_64");
    let mut p = vec![
        Insn::Ld(OFF_ARCH),
        Insn::Jmp {
            op: JEQ,
            k: AUDIT_ARCH,
            jt: Next,
            jf: if compat { Compat } else { Kill },
        },
    ];
    p.push(Insn::Ld(OFF_NR));
    if cfg!(target_arch = "x86_64") {
        p.push(Insn::Jmp {
            op: JGE,
            k: X32_SYSCALL_BIT,
            jt: Deny,
            jf: Next,
        });
    }
    arch_checks(&mut p, &native_numbers(), Personality);
    #[cfg(target_arch = "x86_64")]
    {
        p.push(Insn::Label(Compat));
        p.push(Insn::Jmp {
            op: JEQ,
            k: AUDIT_ARCH_I386,
            jt: Next,
            jf: Kill,
        });
        p.push(Insn::Ld(OFF_NR));
        let i386 = Numbers {
            denied: DENIED_I386.iter().map(|&(_, nr)| nr).collect(),
            clone: I386_CLONE,
            clone3: I386_CLONE3,
            personality: I386_PERSONALITY,
        };
        arch_checks(&mut p, &i386, CompatPersonality);
    }
    p.push(Insn::Label(Allow));
    p.push(Insn::Ret(libc::SECCOMP_RET_ALLOW));
    p.push(Insn::Label(Deny));
    p.push(Insn::Ret(libc::SECCOMP_RET_ERRNO | libc::EPERM as u32));
    p.push(Insn::Label(Enosys));
    p.push(Insn::Ret(libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32));
    p.push(Insn::Label(Kill));
    p.push(Insn::Ret(libc::SECCOMP_RET_KILL_PROCESS));
    assemble(&p)
}

/// Resolves labels into relative jumps. Every jump goes forward; the program is short enough for
/// 8-bit offsets (checked by a unit test).
fn assemble(p: &[Insn]) -> Vec<libc::sock_filter> {
    let mut labels = [0u32; LABELS.len()];
    let mut n = 0u32;
    for insn in p {
        match insn {
            Insn::Label(t) => {
                if let Some(i) = LABELS.iter().position(|l| l == t) {
                    labels[i] = n;
                }
            }
            _ => n += 1,
        }
    }
    let ld = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    let ret = (libc::BPF_RET | libc::BPF_K) as u16;
    let mut out = Vec::with_capacity(n as usize);
    for insn in p {
        let at = out.len() as u32;
        let rel = |t: Target| -> u8 {
            let dest = match LABELS.iter().position(|l| *l == t) {
                Some(i) => labels[i],
                None => at + 1,
            };
            u8::try_from(dest - at - 1).unwrap_or(u8::MAX)
        };
        match *insn {
            Insn::Ld(off) => out.push(libc::sock_filter {
                code: ld,
                jt: 0,
                jf: 0,
                k: off,
            }),
            Insn::Ret(k) => out.push(libc::sock_filter {
                code: ret,
                jt: 0,
                jf: 0,
                k,
            }),
            Insn::Label(_) => {}
            Insn::Jmp { op, k, jt, jf } => out.push(libc::sock_filter {
                code: op,
                jt: rel(jt),
                jf: rel(jf),
                k,
            }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_default_mask() {
        assert_eq!(default_caps_mask(), 0xa80425fb);
    }

    /// A minimal classic-BPF interpreter for the instructions the program uses.
    fn run(prog: &[libc::sock_filter], arch: u32, nr: u32, arg0: u64) -> u32 {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&nr.to_le_bytes());
        data[4..8].copy_from_slice(&arch.to_le_bytes());
        data[16..24].copy_from_slice(&arg0.to_le_bytes());
        let (mut pc, mut a) = (0usize, 0u32);
        loop {
            let i = prog[pc];
            let k = i.k;
            pc += 1;
            match i.code as u32 {
                c if c == libc::BPF_LD | libc::BPF_W | libc::BPF_ABS => {
                    let o = k as usize;
                    a = u32::from_le_bytes(data[o..o + 4].try_into().unwrap());
                }
                c if c == libc::BPF_RET | libc::BPF_K => return k,
                c => {
                    let taken = match c & 0xf0 {
                        x if x == libc::BPF_JEQ => a == k,
                        x if x == libc::BPF_JGE => a >= k,
                        x if x == libc::BPF_JSET => a & k != 0,
                        _ => panic!("unexpected opcode {c:#x}"),
                    };
                    pc += if taken { i.jt } else { i.jf } as usize;
                }
            }
        }
    }

    #[test]
    fn filter_decisions() {
        let p = seccomp_program();
        let allow = libc::SECCOMP_RET_ALLOW;
        let eperm = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
        let enosys = libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32;
        let nr = |n: libc::c_long| n as u32;
        assert_eq!(run(&p, AUDIT_ARCH, nr(libc::SYS_read), 0), allow);
        assert_eq!(run(&p, AUDIT_ARCH, nr(libc::SYS_mount), 0), eperm);
        assert_eq!(run(&p, AUDIT_ARCH, nr(libc::SYS_unshare), 0), eperm);
        assert_eq!(run(&p, AUDIT_ARCH, nr(libc::SYS_io_uring_setup), 0), eperm);
        assert_eq!(run(&p, AUDIT_ARCH, nr(libc::SYS_clone3), 0), enosys);
        let fork_flags = libc::SIGCHLD as u64 | libc::CLONE_CHILD_SETTID as u64;
        assert_eq!(run(&p, AUDIT_ARCH, nr(libc::SYS_clone), fork_flags), allow);
        let ns = fork_flags | libc::CLONE_NEWNET as u64;
        assert_eq!(run(&p, AUDIT_ARCH, nr(libc::SYS_clone), ns), eperm);
        assert_eq!(run(&p, AUDIT_ARCH, nr(libc::SYS_personality), 0), allow);
        assert_eq!(
            run(&p, AUDIT_ARCH, nr(libc::SYS_personality), 0xffff_ffff),
            allow
        );
        assert_eq!(
            run(&p, AUDIT_ARCH, nr(libc::SYS_personality), 0x0040_0000),
            eperm
        );
        // Neither the host's architecture nor i386.
        assert_eq!(
            run(&p, 0x4000_0028, nr(libc::SYS_read), 0),
            libc::SECCOMP_RET_KILL_PROCESS
        );
        if cfg!(target_arch = "x86_64") {
            assert_eq!(
                run(&p, AUDIT_ARCH, X32_SYSCALL_BIT | nr(libc::SYS_read), 0),
                eperm
            );
        }
    }

    /// 32-bit x86 programs: the same decisions under i386's numbers (read is 3, exit 1; mount
    /// 21, unshare 310, clone 120, clone3 435, personality 136), and x86_64's numbers mean other
    /// calls there (x86_64's mount, 165, is i386's getresuid).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn i386_programs_get_the_same_decisions() {
        let p = seccomp_program();
        let allow = libc::SECCOMP_RET_ALLOW;
        let eperm = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
        let enosys = libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32;
        let a = AUDIT_ARCH_I386;
        assert_eq!(run(&p, a, 3, 0), allow);
        assert_eq!(run(&p, a, 1, 0), allow);
        assert_eq!(run(&p, a, 165, 0), allow);
        assert_eq!(run(&p, a, 21, 0), eperm);
        assert_eq!(run(&p, a, 310, 0), eperm);
        assert_eq!(run(&p, a, 404, 0), eperm, "clock_settime64");
        assert_eq!(run(&p, a, 435, 0), enosys);
        let fork_flags = libc::SIGCHLD as u64;
        assert_eq!(run(&p, a, 120, fork_flags), allow);
        assert_eq!(
            run(&p, a, 120, fork_flags | libc::CLONE_NEWPID as u64),
            eperm
        );
        assert_eq!(run(&p, a, 136, 0x0002_0000), allow);
        assert_eq!(run(&p, a, 136, 0x0040_0000), eperm);
        // The numbers are i386's for their names (from the kernel's headers when they are
        // installed).
        let Ok(h) = std::fs::read_to_string("/usr/include/x86_64-linux-gnu/asm/unistd_32.h") else {
            return;
        };
        let number = |name: &str| {
            h.lines().find_map(|l| {
                let mut f = l.split_whitespace();
                (f.next() == Some("#define") && f.next() == Some(&format!("__NR_{name}")[..]))
                    .then(|| f.next()?.parse::<u32>().ok())
                    .flatten()
            })
        };
        let named = [
            ("clone", I386_CLONE),
            ("clone3", I386_CLONE3),
            ("personality", I386_PERSONALITY),
        ];
        for (name, nr) in DENIED_I386.iter().chain(&named) {
            assert_eq!(number(name), Some(*nr), "{name}");
        }
    }

    #[test]
    fn program_fits_and_jumps_stay_inside() {
        let p = seccomp_program();
        assert!(p.len() < 255, "jump offsets are 8-bit");
        for (i, ins) in p.iter().enumerate() {
            if ins.code & 0x07 == libc::BPF_JMP as u16 {
                assert!(i + 1 + (ins.jt as usize) < p.len());
                assert!(i + 1 + (ins.jf as usize) < p.len());
            }
        }
        let last = p.last().unwrap();
        assert_eq!(last.code, (libc::BPF_RET | libc::BPF_K) as u16);
    }
}
