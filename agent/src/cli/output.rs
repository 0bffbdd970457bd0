//! Human-readable output of `mig` (JSON output is the API types serialized as they are).

use crate::api::{ContainerDetails, ContainerState, ContainerSummary, HostInfo, ImageInfo, Moving};
use std::fmt::Write;

/// "3 minutes ago" style age of a timestamp (seconds since the epoch).
fn age(t: u64) -> String {
    age_of(crate::layout::now().saturating_sub(t))
}

/// "1 minute ago", "3 minutes ago" for an age of `d` seconds.
fn age_of(d: u64) -> String {
    let (n, unit) = match d {
        0..=59 => (d, "second"),
        60..=3599 => (d / 60, "minute"),
        3600..=86399 => (d / 3600, "hour"),
        _ => (d / 86400, "day"),
    };
    let s = if n == 1 { "" } else { "s" };
    format!("{n} {unit}{s} ago")
}

/// `text` on one line for a table: whitespace runs (newlines included) become one space, and
/// more than `max` characters are cut with an ellipsis.
pub fn one_line(text: &str, max: usize) -> String {
    let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() <= max {
        return flat;
    }
    let mut cut: String = flat.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

pub fn human_size(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Left-aligned columns separated by three spaces.
fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let n = cells.len();
        for (i, c) in cells.into_iter().enumerate() {
            if i + 1 == n {
                out.push_str(c);
            } else {
                let _ = write!(out, "{c:<width$}   ", width = w[i]);
            }
        }
        out.push('\n');
    };
    line(header.to_vec(), &mut out);
    for r in &rows {
        line(r.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

/// `frozen (moving to host-b)`, `frozen (arriving from host-a)`, or the state alone when no move
/// is in progress.
fn moving_state(
    state: ContainerState,
    moving: Option<&Moving>,
    memory_arriving: bool,
    arriving: Option<&crate::api::Arriving>,
) -> String {
    match (moving, arriving) {
        (Some(m), _) => format!("{} (moving to {})", state.as_str(), m.peer),
        (None, Some(a)) => format!("{} (arriving from {})", state.as_str(), a.peer),
        (None, None) if memory_arriving => format!("{} (memory arriving)", state.as_str()),
        (None, None) => state.as_str().to_owned(),
    }
}

/// `ps -q`: the short ids (as the table shows them), one a line.
pub fn ps_ids(list: &[ContainerSummary]) -> String {
    list.iter()
        .map(|c| format!("{}\n", &c.id[..12.min(c.id.len())]))
        .collect()
}

/// `image ls -q`: the short ids (as the table shows them), one a line, each once (an image held
/// by several names is one image); an image whose record cannot be read has no id to print.
pub fn image_ids(list: &[ImageInfo]) -> String {
    let mut seen = std::collections::HashSet::new();
    let mut s = String::new();
    for i in list.iter().filter(|i| i.unreadable.is_none()) {
        let short = i.id.strip_prefix("sha256:").unwrap_or(&i.id);
        let short = &short[..12.min(short.len())];
        if seen.insert(short.to_owned()) {
            s.push_str(short);
            s.push('\n');
        }
    }
    s
}

/// ` (killed by SIGSYS: ...)`: the signal that ended a container's init, by name, and what a
/// signal mig itself causes means.
fn killed_by(signal: i32) -> String {
    let name = nix::sys::signal::Signal::try_from(signal)
        .map(|s| s.as_str().to_owned())
        .unwrap_or_else(|_| format!("signal {signal}"));
    let why = match signal {
        // The seccomp filter kills a call of an architecture it does not know: on x86_64
        // anything but x86_64 and i386 (docs/security.md).
        libc::SIGSYS => {
            ": a system call of an architecture the seccomp filter does not know, neither the host's nor, on x86_64, 32-bit x86"
        }
        _ => "",
    };
    format!(" (killed by {name}{why})")
}

/// The head of a container's `reason` for the `ps` table (`post-copy failed`, `oom-killed`):
/// up to its first colon or parenthesis; `mig inspect` gives all of it (QA of session 27, F4: a
/// container a post-copy lost showed only `exited (137)`).
pub(crate) fn short_reason(why: &str) -> &str {
    let end = why.find([':', '(']).unwrap_or(why.len());
    why[..end].trim_end()
}

pub fn ps_table(list: &[ContainerSummary]) -> String {
    let rows = list
        .iter()
        .map(|c| {
            let state = match (c.exit_code, &c.in_doubt) {
                (_, Some(_)) => format!("{} (migration in doubt)", c.state.as_str()),
                (_, None) if c.moving.is_some() || c.memory_arriving || c.arriving.is_some() => {
                    moving_state(
                        c.state,
                        c.moving.as_ref(),
                        c.memory_arriving,
                        c.arriving.as_ref(),
                    )
                }
                (Some(code), None) if !c.state.is_live() => match c.reason.as_deref() {
                    Some(why) => format!("{} ({code}: {})", c.state.as_str(), short_reason(why)),
                    None => format!("{} ({code})", c.state.as_str()),
                },
                _ => match &c.also_running_on {
                    Some(peer) => format!("{} (also on {peer})", c.state.as_str()),
                    None => c.state.as_str().to_owned(),
                },
            };
            vec![
                c.id[..12.min(c.id.len())].to_owned(),
                c.name.clone(),
                state,
                c.image.clone(),
                c.host.clone(),
                age(c.created),
                one_line(&c.command.join(" "), 60),
            ]
        })
        .collect();
    table(
        &["ID", "NAME", "STATE", "IMAGE", "HOST", "CREATED", "COMMAND"],
        rows,
    )
}

/// The image table; an image whose record cannot be read shows as `unreadable`, with why in a
/// line below the table.
pub fn images_table(list: &[ImageInfo]) -> String {
    let rows = list
        .iter()
        .map(|i| {
            if i.unreadable.is_some() {
                let dash = || "-".to_owned();
                return vec![i.name.clone(), "unreadable".into(), dash(), dash(), dash()];
            }
            let short = i.id.strip_prefix("sha256:").unwrap_or(&i.id);
            vec![
                i.name.clone(),
                short[..12.min(short.len())].to_owned(),
                i.layers.len().to_string(),
                human_size(i.size),
                age(i.created),
            ]
        })
        .collect();
    let mut s = table(&["NAME", "ID", "LAYERS", "SIZE", "CREATED"], rows);
    for i in list {
        if let Some(u) = &i.unreadable {
            let why = match u.format {
                Some(f) => format!(
                    "its record is of format {f}, this mig reads up to {}",
                    u.supported_format
                ),
                None => "its record is damaged".to_owned(),
            };
            let _ = writeln!(s, "image {} not read: {why} ({})", i.name, u.path);
        }
    }
    s
}

pub fn inspect_text(d: &ContainerDetails) -> String {
    let mut s = String::new();
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    let _ = writeln!(s, "id:        {}", d.id);
    let _ = writeln!(s, "name:      {}", d.name);
    match &d.in_doubt {
        Some(x) => {
            let _ = writeln!(s, "state:     {} (migration in doubt)", d.state.as_str());
            let _ = writeln!(
                s,
                "in doubt:  migration {}, this host is its {}, peer {}",
                x.migration_id, x.role, x.peer
            );
        }
        None => {
            let _ = writeln!(
                s,
                "state:     {}",
                moving_state(
                    d.state,
                    d.moving.as_ref(),
                    d.memory_arriving,
                    d.arriving.as_ref()
                )
            );
            if let Some(m) = &d.moving {
                let _ = writeln!(
                    s,
                    "moving:    to {}, migration {} ({})",
                    m.peer, m.migration_id, m.stage
                );
            }
            if let Some(a) = &d.arriving {
                let _ = writeln!(
                    s,
                    "arriving:  from {}, migration {}",
                    a.peer, a.migration_id
                );
            }
            if let Some(peer) = &d.also_running_on {
                let _ = writeln!(
                    s,
                    "also on:   {peer} (a move settled each way on the two hosts: remove one copy)"
                );
            }
        }
    }
    let _ = writeln!(s, "host:      {}", d.host);
    let _ = writeln!(s, "image:     {} ({})", d.image.name, d.image.id);
    let _ = writeln!(s, "hostname:  {}", d.hostname);
    if let Some(n) = &d.net {
        let gateway = n
            .gateway
            .map(|g| format!(", gateway {g}"))
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "network:   {}/{}{gateway}, mac {}, bridge {}",
            n.address, n.prefix_len, n.mac, n.bridge
        );
    }
    let _ = writeln!(s, "command:   {}", d.command.join(" "));
    if let Some(u) = &d.user {
        let _ = writeln!(s, "user:      {}:{}, in {}", u.uid, u.gid, u.cwd);
    }
    if let Some(m) = &d.id_map {
        let _ = writeln!(
            s,
            "userns:    ids 0-{} are host ids {}-{}",
            m.size.saturating_sub(1),
            m.host_id,
            m.host_id.saturating_add(m.size.saturating_sub(1))
        );
    }
    let _ = writeln!(s, "created:   {}", age(d.created));
    let _ = writeln!(s, "started:   {}", opt(d.started.map(age)));
    let _ = writeln!(s, "finished:  {}", opt(d.finished.map(age)));
    let _ = writeln!(
        s,
        "exit code: {}{}",
        opt(d.exit_code.map(|c| c.to_string())),
        d.signal.map(killed_by).unwrap_or_default()
    );
    if d.oom_killed {
        let _ = writeln!(s, "oom:       killed (out of memory)");
    }
    if let Some(r) = &d.reason {
        let _ = writeln!(s, "reason:    {r}");
    }
    let l = &d.limits;
    let _ = writeln!(
        s,
        "limits:    memory {}, cpus {}, pids {}",
        opt(l.memory.map(human_size)),
        opt(l.cpu_millis.map(|m| format!("{}", m as f64 / 1000.0))),
        opt(l.pids.map(|p| p.to_string()))
    );
    if let Some(u) = &d.usage {
        let _ = writeln!(
            s,
            "usage:     memory {}, cpu {:.2} s, pids {}, oom kills {}",
            human_size(u.memory_bytes),
            u.cpu_usec as f64 / 1e6,
            u.pids,
            u.oom_kills
        );
    }
    if !d.pid_map.is_empty() {
        let _ = writeln!(s, "processes:");
        let rows = d
            .pid_map
            .iter()
            .map(|p| {
                vec![
                    p.ns_pid.to_string(),
                    p.host_pid.to_string(),
                    one_line(&p.cmd, 80),
                ]
            })
            .collect();
        for l in table(&["NS_PID", "HOST_PID", "CMD"], rows).lines() {
            let _ = writeln!(s, "  {l}");
        }
    }
    s
}

pub fn info_text(i: &HostInfo) -> String {
    format!(
        "name:        {}\nversion:     {} (API {}, migration protocol {})\ncriu:        {}\nkernel:      {}\ncpus:        {}\nmemory:      {}\nstate dir:   {}\ncgroup:      {}\ncontainers:  {} running, {} total\n",
        i.name,
        i.version,
        i.api_version,
        if i.protocol_version.is_empty() {
            "?"
        } else {
            &i.protocol_version
        },
        i.criu_version.as_deref().unwrap_or("not found"),
        i.kernel,
        i.cpus,
        human_size(i.memory_bytes),
        i.state_dir,
        i.cgroup_parent,
        i.containers_running,
        i.containers_total
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_are_singular_for_one() {
        assert_eq!(age_of(0), "0 seconds ago");
        assert_eq!(age_of(1), "1 second ago");
        assert_eq!(age_of(61), "1 minute ago");
        assert_eq!(age_of(150), "2 minutes ago");
        assert_eq!(age_of(3600), "1 hour ago");
        assert_eq!(age_of(86400 * 3), "3 days ago");
    }

    #[test]
    fn one_line_flattens_and_cuts() {
        assert_eq!(one_line("sh -c 'a\n   b'", 80), "sh -c 'a b'");
        assert_eq!(one_line("abcdef", 4), "abc…");
        assert_eq!(one_line("abcd", 4), "abcd");
    }

    /// QA of session 19: a 32-bit program's container showed only "exit code: 159".
    #[test]
    fn a_signal_is_named_and_seccomp_s_explained() {
        assert_eq!(killed_by(libc::SIGKILL), " (killed by SIGKILL)");
        let sys = killed_by(libc::SIGSYS);
        assert!(
            sys.starts_with(" (killed by SIGSYS: ") && sys.contains("architecture"),
            "{sys}"
        );
        assert_eq!(killed_by(99), " (killed by signal 99)");
    }

    /// QA of session 27, F4: a container its post-copy lost showed only `exited (137)`.
    #[test]
    fn ps_says_why_a_container_ended() {
        let c: ContainerSummary = serde_json::from_value(serde_json::json!({
            "id": "0123456789abcdef0123456789abcdef", "name": "web", "state": "exited",
            "image": "busybox", "host": "host-b", "created": 0, "exit_code": 137,
            "command": ["sh"],
            "reason": "post-copy failed (pages from host-a stopped before the last one): gone"
        }))
        .unwrap();
        assert!(
            ps_table(std::slice::from_ref(&c)).contains("exited (137: post-copy failed)"),
            "{}",
            ps_table(&[c])
        );
        assert_eq!(
            short_reason("oom-killed: the container exceeded its memory limit"),
            "oom-killed"
        );
        assert_eq!(
            short_reason("the restore was interrupted"),
            "the restore was interrupted"
        );
        // From an older agent: no reason, the code alone.
        let old: ContainerSummary = serde_json::from_value(serde_json::json!({
            "id": "0123456789abcdef0123456789abcdef", "name": "web", "state": "exited",
            "image": "busybox", "host": "host-b", "created": 0, "exit_code": 0,
            "command": ["sh"]
        }))
        .unwrap();
        assert!(ps_table(&[old]).contains("exited (0) "));
    }

    #[test]
    fn sizes_and_tables() {
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(256 << 20), "256.0 MiB");
        let t = table(&["A", "B"], vec![vec!["xyz".into(), "1".into()]]);
        assert_eq!(t, "A     B\nxyz   1\n");
    }

    /// `mig inspect` of a `--net bridge` container shows its address (it did not: a user had
    /// to read /etc/hosts inside); a record without `net` (an older agent) shows no line.
    #[test]
    fn inspect_shows_the_network() {
        let mut v = serde_json::json!({
            "id": "0123456789abcdef0123456789abcdef", "name": "web", "state": "running",
            "host": "host-a", "image": {"name": "debian", "id": "sha256:ab"},
            "hostname": "web", "command": ["nginx"], "env": [], "userns": false,
            "limits": {"memory": null, "cpu_millis": null, "pids": null},
            "created": 0, "started": null, "finished": null, "exit_code": null,
            "signal": null, "oom_killed": false, "reason": null, "init_pid": null,
            "shim_pid": null, "usage": null, "pid_map": [], "cgroup": "mig/x"
        });
        let d: ContainerDetails = serde_json::from_value(v.clone()).unwrap();
        assert!(d.net.is_none());
        assert!(!inspect_text(&d).contains("network:"));
        v["net"] = serde_json::json!({
            "mode": "bridge", "address": "10.79.94.100", "prefix_len": 24,
            "gateway": "10.79.94.1", "mac": "02:01:23:45:67:89", "bridge": "migbr0",
            "host_ifname": "mv0123456789ab", "dns": []
        });
        let d: ContainerDetails = serde_json::from_value(v).unwrap();
        let text = inspect_text(&d);
        assert!(
            text.contains(
                "network:   10.79.94.100/24, gateway 10.79.94.1, mac 02:01:23:45:67:89, bridge migbr0\n"
            ),
            "{text}"
        );
    }

    /// `mig inspect` says whom the command runs as and, with `--userns`, which host ids the
    /// container's ids are (a user had to read /proc/PID/uid_map on the host).
    #[test]
    fn inspect_shows_the_user_and_the_id_map() {
        let mut v = serde_json::json!({
            "id": "0123456789abcdef0123456789abcdef", "name": "web", "state": "running",
            "host": "host-a", "image": {"name": "debian", "id": "sha256:ab"},
            "hostname": "web", "command": ["nginx"], "env": [], "userns": true,
            "limits": {"memory": null, "cpu_millis": null, "pids": null},
            "created": 0, "started": null, "finished": null, "exit_code": null,
            "signal": null, "oom_killed": false, "reason": null, "init_pid": null,
            "shim_pid": null, "usage": null, "pid_map": [], "cgroup": "mig/x"
        });
        let old: ContainerDetails = serde_json::from_value(v.clone()).unwrap();
        let text = inspect_text(&old);
        assert!(
            !text.contains("user:") && !text.contains("userns:"),
            "{text}"
        );
        v["user"] = serde_json::json!({"uid": 1000, "gid": 100, "cwd": "/srv"});
        v["id_map"] = serde_json::json!({"host_id": 1_000_000, "size": 65536});
        let d: ContainerDetails = serde_json::from_value(v).unwrap();
        let text = inspect_text(&d);
        assert!(text.contains("user:      1000:100, in /srv\n"), "{text}");
        assert!(
            text.contains("userns:    ids 0-65535 are host ids 1000000-1065535\n"),
            "{text}"
        );
    }
}
