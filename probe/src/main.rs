//! `mig-probe`: run inside a container, prints one JSON object (one line on stdout) describing
//! what the process can see and do. The end-to-end tests (tests/tests/isolation.rs) compare it
//! with what the runtime promises; it asserts nothing itself.
//!
//! Every system call is tried in a forked child with harmless arguments (a call that the filter
//! let through fails on its arguments, or at worst changes only that child), and the child's exit
//! status carries the errno back. Built statically so it runs in a busybox image:
//! `RUSTFLAGS="-C target-feature=+crt-static" cargo build -p mig-probe --release`.

mod json;
mod syscalls;

use json::Json;
use std::ffi::CString;
use std::io::Read;

fn main() {
    let mut out = Vec::new();
    out.push(("pid", Json::Int(std::process::id() as i64)));
    // SAFETY: getppid and getuid take no arguments and cannot fail.
    let (ppid, uid) = unsafe { (libc::getppid(), libc::getuid()) };
    out.push(("ppid", Json::Int(ppid as i64)));
    out.push(("uid", Json::Int(uid as i64)));
    // The user-namespace maps as seen from inside ("0 0 4294967295" without a user namespace).
    for (key, file) in [
        ("uid_map", "/proc/self/uid_map"),
        ("gid_map", "/proc/self/gid_map"),
    ] {
        let map = std::fs::read_to_string(file).unwrap_or_default();
        let words: Vec<&str> = map.split_whitespace().collect();
        out.push((key, Json::Str(words.join(" "))));
    }
    out.push(("status", status_fields()));
    out.push(("syscalls", syscalls::probe_all()));
    out.push(("masked", masked()));
    out.push(("writable", writable()));
    out.push(("readonly_mounts", readonly_mounts()));
    out.push(("dev", Json::strings(list_dir("/dev"))));
    out.push((
        "pids",
        Json::Arr(pids().into_iter().map(Json::Int).collect()),
    ));
    out.push((
        "init_cmd",
        Json::Str(
            std::fs::read("/proc/1/cmdline")
                .map(|b| {
                    String::from_utf8_lossy(&b)
                        .replace('\0', " ")
                        .trim()
                        .to_owned()
                })
                .unwrap_or_default(),
        ),
    ));
    out.push(("net", Json::strings(list_dir("/sys/class/net"))));
    out.push(("connect_outside", Json::Str(connect_outside())));
    let obj = Json::Obj(out.into_iter().map(|(k, v)| (k.to_owned(), v)).collect());
    println!("{obj}");
}

/// CapEff, CapBnd, CapPrm, NoNewPrivs and Seccomp from /proc/self/status, as strings.
fn status_fields() -> Json {
    let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let keys = [
        "CapInh",
        "CapPrm",
        "CapEff",
        "CapBnd",
        "CapAmb",
        "NoNewPrivs",
        "Seccomp",
    ];
    Json::Obj(
        text.lines()
            .filter_map(|l| l.split_once(':'))
            .filter(|(k, _)| keys.contains(k))
            .map(|(k, v)| (k.to_owned(), Json::Str(v.trim().to_owned())))
            .collect(),
    )
}

/// For each masked path: `{"bytes": N}` (how much could be read, up to 64 KiB) for a file,
/// `{"entries": [..]}` for a directory, or `{"error": "ENAME"}`.
fn masked() -> Json {
    let files = [
        "/proc/kcore",
        "/proc/keys",
        "/proc/timer_list",
        "/proc/sched_debug",
        "/proc/latency_stats",
    ];
    let dirs = [
        "/sys/firmware",
        "/proc/acpi",
        "/proc/scsi",
        "/sys/devices/virtual/powercap",
    ];
    let mut v = Vec::new();
    for f in files {
        let r = std::fs::File::open(f).and_then(|file| {
            let mut buf = Vec::new();
            file.take(64 << 10).read_to_end(&mut buf).map(|_| buf.len())
        });
        let j = match r {
            Ok(n) => Json::Obj(vec![("bytes".into(), Json::Int(n as i64))]),
            Err(e) => err_obj(&e),
        };
        v.push((f.to_owned(), j));
    }
    for d in dirs {
        let j = match std::fs::read_dir(d) {
            Ok(rd) => {
                let mut names: Vec<String> = rd
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
                names.sort();
                Json::Obj(vec![("entries".into(), Json::strings(names))])
            }
            Err(e) => err_obj(&e),
        };
        v.push((d.to_owned(), j));
    }
    Json::Obj(v)
}

fn err_obj(e: &std::io::Error) -> Json {
    Json::Obj(vec![(
        "error".into(),
        Json::Str(syscalls::errno_name(e.raw_os_error().unwrap_or(0))),
    )])
}

/// open(O_WRONLY) of files that must not be writable: "ok" or the errno name.
fn writable() -> Json {
    let paths = [
        "/proc/sys/kernel/hostname",
        "/proc/sysrq-trigger",
        "/sys/kernel/uevent_helper",
        "/sys/kernel/mm/transparent_hugepage/enabled",
        "/proc/sys/vm/drop_caches",
    ];
    Json::Obj(
        paths
            .iter()
            .map(|p| {
                let r = std::fs::OpenOptions::new().write(true).open(p);
                let s = match r {
                    Ok(_) => "ok".to_owned(),
                    Err(e) => syscalls::errno_name(e.raw_os_error().unwrap_or(0)),
                };
                ((*p).to_owned(), Json::Str(s))
            })
            .collect(),
    )
}

/// statvfs's ST_RDONLY for /sys and /proc/sys: true when mounted read-only.
fn readonly_mounts() -> Json {
    let paths = ["/sys", "/proc/sys", "/proc/sysrq-trigger"];
    Json::Obj(
        paths
            .iter()
            .map(|p| {
                let j = match statvfs_flags(p) {
                    Some(f) => Json::Bool(f & libc::ST_RDONLY != 0),
                    None => Json::Null,
                };
                ((*p).to_owned(), j)
            })
            .collect(),
    )
}

fn statvfs_flags(path: &str) -> Option<libc::c_ulong> {
    let c = CString::new(path).ok()?;
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a NUL-terminated path and st a writable statvfs owned by this frame.
    let r = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    (r == 0).then_some(st.f_flag)
}

fn list_dir(path: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(path)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Numeric entries of /proc: the processes this one can see.
fn pids() -> Vec<i64> {
    let mut v: Vec<i64> = list_dir("/proc")
        .iter()
        .filter_map(|n| n.parse().ok())
        .collect();
    v.sort_unstable();
    v
}

/// A non-blocking TCP connect to 10.255.255.1:9: "ok", "EINPROGRESS" (a route out exists: the
/// attempt is abandoned at once) or the errno name (ENETUNREACH with only lo).
fn connect_outside() -> String {
    // SAFETY: socket takes plain integer arguments.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return format!("socket: {}", syscalls::errno_name(syscalls::errno()));
    }
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 9u16.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_be_bytes([10, 255, 255, 1]).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: addr is a valid sockaddr_in for the length given; fd is our socket.
    let r = unsafe {
        libc::connect(
            fd,
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    let res = if r == 0 {
        "ok".to_owned()
    } else {
        syscalls::errno_name(syscalls::errno())
    };
    // SAFETY: fd is ours and closed once.
    unsafe { libc::close(fd) };
    res
}
