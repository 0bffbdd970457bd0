//! OCI runtime bundles (`mig run --bundle DIR`): a directory with `config.json` and a root
//! filesystem, as runc takes them (runtime-spec 1.x).
//!
//! mig maps what its containers support and refuses everything else with a message naming the
//! JSON field (every such field in one message), instead of silently running something weaker
//! than the bundle asks for:
//!
//! | field | mapping |
//! |---|---|
//! | `ociVersion` | must be 1.x |
//! | `root.path` | the rootfs, imported as an image (relative to the bundle) |
//! | `root.readonly` | `false` only: the writable layer is what moves with the container |
//! | `process.args`, `env`, `cwd`, `user.uid`, `user.gid` | the init process |
//! | `process.terminal` | `false` only |
//! | `process.noNewPrivileges` | `true` or absent (mig always sets it) |
//! | `hostname` | the container's hostname |
//! | `mounts` | only what mig mounts itself: `/proc` (proc), `/dev` (tmpfs), `/dev/pts` (devpts), `/dev/shm` (tmpfs), `/sys` (sysfs, read-only) |
//! | `linux.namespaces` | exactly pid, network, ipc, uts and mount, none with a `path` |
//! | `linux.resources.memory.limit`, `cpu.quota`/`cpu.period`, `pids.limit` | the cgroup limits |
//! | `linux.resources.devices` | deny rules only (containers get no devices besides their own /dev) |
//! | `annotations` | ignored (informational) |
//!
//! Anything else (`linux.seccomp`, `process.capabilities`, `hooks`, `linux.uidMappings`, ...)
//! is refused: mig applies its own capability set, seccomp filter and user namespace mapping.

use crate::spec::Limits;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// The largest `config.json` read.
const MAX_CONFIG: u64 = 4 << 20;

/// Why a bundle was refused.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is larger than {MAX_CONFIG} bytes")]
    TooLarge { path: PathBuf },
    #[error("{path} is not valid JSON")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("the bundle's root filesystem {path} is not a directory")]
    NoRootfs { path: PathBuf },
    /// The fields mig cannot honour, every one of them: `runc spec`'s default config was refused
    /// one field per attempt, seven attempts (QA of session 32, F6).
    #[error("{}", describe(.0))]
    Unsupported(Vec<Refusal>),
    /// A field with a wrong type or an invalid value.
    #[error("{field}: {why}")]
    Invalid { field: String, why: String },
}

/// A field of `config.json` mig cannot honour, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub field: String,
    pub why: String,
}

/// One refusal on one line, as before; several as a list, one per line.
fn describe(refusals: &[Refusal]) -> String {
    match refusals {
        [one] => format!("{} is not supported: {}", one.field, one.why),
        many => {
            let mut s = format!(
                "{} fields are not supported (change or remove each):",
                many.len()
            );
            for r in many {
                s.push_str(&format!("\n  {}: {}", r.field, r.why));
            }
            s
        }
    }
}

/// The refusals found so far: the whole config is read before any is reported, so that one
/// attempt names them all. A field of the wrong type or with an invalid value still ends the
/// reading at once ([`BundleError::Invalid`]): what follows it may not be readable.
#[derive(Debug, Default)]
struct Refusals(Vec<Refusal>);

impl Refusals {
    fn push(&mut self, field: &str, why: impl Into<String>) {
        self.0.push(Refusal {
            field: field.to_owned(),
            why: why.into(),
        });
    }

    /// Refuses the keys of `m` (the object at `at`) that are in `refused` (with its reason) or
    /// not in `known`.
    fn allow(
        &mut self,
        m: &Map<String, Value>,
        at: &str,
        known: &[&str],
        refused: &[(&str, &str)],
    ) {
        for key in m.keys() {
            let field = if at.is_empty() {
                key.clone()
            } else {
                format!("{at}.{key}")
            };
            if let Some((_, why)) = refused.iter().find(|(k, _)| k == key) {
                self.push(&field, *why);
            } else if !known.contains(&key.as_str()) {
                self.push(&field, "mig does not know this field");
            }
        }
    }

    fn finish(self) -> Result<(), BundleError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(BundleError::Unsupported(self.0))
        }
    }
}

/// What mig takes from a bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    /// The root filesystem directory (absolute when the bundle path was).
    pub rootfs: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub hostname: Option<String>,
    pub limits: Limits,
}

impl Bundle {
    /// Reads and maps `<dir>/config.json`; the rootfs must exist.
    pub fn load(dir: &Path) -> Result<Bundle, BundleError> {
        let path = dir.join("config.json");
        let read = |source| BundleError::Read {
            path: path.clone(),
            source,
        };
        if std::fs::metadata(&path).map_err(read)?.len() > MAX_CONFIG {
            return Err(BundleError::TooLarge { path });
        }
        let text = std::fs::read(&path).map_err(read)?;
        let value: Value = serde_json::from_slice(&text).map_err(|source| BundleError::Json {
            path: path.clone(),
            source,
        })?;
        let mut b = Bundle::from_config(&value)?;
        b.rootfs = dir.join(&b.rootfs);
        if !b.rootfs.is_dir() {
            return Err(BundleError::NoRootfs { path: b.rootfs });
        }
        Ok(b)
    }

    /// Maps a parsed `config.json` (`rootfs` stays as written).
    pub fn from_config(v: &Value) -> Result<Bundle, BundleError> {
        let mut no = Refusals::default();
        let top = object(v, "config.json")?;
        no.allow(
            top,
            "",
            &[
                "ociVersion",
                "root",
                "process",
                "hostname",
                "mounts",
                "linux",
                "annotations",
            ],
            &[
                ("hooks", "mig runs no hooks"),
                ("domainname", "containers have no NIS domain name in mig"),
            ],
        );
        let version = string(top.get("ociVersion"), "ociVersion")?;
        if !version.starts_with("1.") {
            return Err(invalid(
                "ociVersion",
                format!("version {version:?}, mig reads 1.x"),
            ));
        }
        let root = object(required(top, "root", "")?, "root")?;
        no.allow(root, "root", &["path", "readonly"], &[]);
        let rootfs = string(root.get("path"), "root.path")?;
        if rootfs.is_empty() {
            return Err(invalid("root.path", "empty".into()));
        }
        if boolean(root.get("readonly"), "root.readonly")? == Some(true) {
            no.push(
                "root.readonly",
                "a mig container always has a writable layer (it moves with the container); set it to false",
            );
        }
        let process = object(required(top, "process", "")?, "process")?;
        let (args, env, cwd, uid, gid) = map_process(process, &mut no)?;
        let hostname = match top.get("hostname") {
            None => None,
            Some(h) => Some(string(Some(h), "hostname")?).filter(|h| !h.is_empty()),
        };
        if let Some(m) = top.get("mounts") {
            check_mounts(m, &mut no)?;
        }
        let limits = match top.get("linux") {
            Some(l) => map_linux(l, &mut no)?,
            None => {
                no.push(
                    "linux",
                    "absent: mig runs Linux containers and needs linux.namespaces",
                );
                Limits::default()
            }
        };
        no.finish()?;
        Ok(Bundle {
            rootfs: rootfs.into(),
            args,
            env,
            cwd,
            uid,
            gid,
            hostname,
            limits,
        })
    }
}

type Process = (Vec<String>, Vec<String>, String, u32, u32);

fn map_process(p: &Map<String, Value>, no: &mut Refusals) -> Result<Process, BundleError> {
    no.allow(
        p,
        "process",
        &["terminal", "user", "args", "env", "cwd", "noNewPrivileges"],
        &[
            ("capabilities", "mig applies its own capability set"),
            ("rlimits", "mig keeps the agent's resource limits"),
            ("apparmorProfile", "mig applies no AppArmor profile"),
            ("selinuxLabel", "mig applies no SELinux label"),
            ("oomScoreAdj", "mig does not set an OOM score"),
            ("consoleSize", "mig containers have no terminal"),
            ("commandLine", "Windows only"),
            ("scheduler", "mig does not set a scheduling policy"),
            ("ioPriority", "mig does not set an I/O priority"),
            ("execCPUAffinity", "mig does not pin CPUs"),
        ],
    );
    if boolean(p.get("terminal"), "process.terminal")? == Some(true) {
        no.push(
            "process.terminal",
            "mig containers run detached with their output in the log (`mig logs`); set it to false",
        );
    }
    if boolean(p.get("noNewPrivileges"), "process.noNewPrivileges")? == Some(false) {
        no.push(
            "process.noNewPrivileges",
            "mig always sets no_new_privs; set it to true",
        );
    }
    let args = strings(required(p, "args", "process")?, "process.args")?;
    if args.first().is_none_or(|a| a.is_empty()) {
        return Err(invalid("process.args", "empty".into()));
    }
    let env = match p.get("env") {
        Some(e) => strings(e, "process.env")?,
        None => Vec::new(),
    };
    for (i, e) in env.iter().enumerate() {
        if e.split_once('=').is_none_or(|(k, _)| k.is_empty()) {
            return Err(invalid(
                &format!("process.env[{i}]"),
                format!("{e:?} is not KEY=VALUE"),
            ));
        }
    }
    let cwd = string(Some(required(p, "cwd", "process")?), "process.cwd")?;
    if !cwd.starts_with('/') {
        return Err(invalid("process.cwd", format!("{cwd:?} is not absolute")));
    }
    let (mut uid, mut gid) = (0, 0);
    if let Some(u) = p.get("user") {
        let u = object(u, "process.user")?;
        no.allow(
            u,
            "process.user",
            &["uid", "gid", "additionalGids", "umask"],
            &[("username", "Windows only")],
        );
        uid = id(u.get("uid"), "process.user.uid")?;
        gid = id(u.get("gid"), "process.user.gid")?;
        if let Some(g) = u.get("additionalGids") {
            if !array(g, "process.user.additionalGids")?.is_empty() {
                no.push(
                    "process.user.additionalGids",
                    "mig sets only the groups the image's /etc/group gives the user",
                );
            }
        }
        if u.get("umask").is_some() {
            no.push("process.user.umask", "mig keeps the default umask");
        }
    }
    Ok((args, env, cwd, uid, gid))
}

/// The mounts mig makes itself: destination and type.
const OWN_MOUNTS: &[(&str, &str)] = &[
    ("/proc", "proc"),
    ("/dev", "tmpfs"),
    ("/dev/pts", "devpts"),
    ("/dev/shm", "tmpfs"),
    ("/sys", "sysfs"),
];

fn check_mounts(v: &Value, no: &mut Refusals) -> Result<(), BundleError> {
    for (i, m) in array(v, "mounts")?.iter().enumerate() {
        let field = format!("mounts[{i}]");
        let m = object(m, &field)?;
        no.allow(
            m,
            &field,
            &["destination", "type", "source", "options"],
            &[
                ("uidMappings", "mig makes no id-mapped mounts"),
                ("gidMappings", "mig makes no id-mapped mounts"),
            ],
        );
        let dest = string(m.get("destination"), &format!("{field}.destination"))?;
        let kind = match m.get("type") {
            Some(t) => string(Some(t), &format!("{field}.type"))?,
            None => String::new(),
        };
        let dest = dest.trim_end_matches('/');
        if !OWN_MOUNTS.iter().any(|(d, t)| *d == dest && *t == kind) {
            no.push(
                &field,
                format!(
                    "{dest} ({}): mig mounts only /proc, /dev, /dev/pts, /dev/shm and /sys (read-only) itself, and no bind mounts (they could not move with the container)",
                    if kind.is_empty() { "no type" } else { &kind }
                ),
            );
        }
    }
    Ok(())
}

/// The namespaces every mig container has.
const NAMESPACES: &[&str] = &["pid", "network", "ipc", "uts", "mount"];

fn map_linux(v: &Value, no: &mut Refusals) -> Result<Limits, BundleError> {
    let l = object(v, "linux")?;
    no.allow(
        l,
        "linux",
        &["namespaces", "resources", "maskedPaths", "readonlyPaths"],
        &[
            ("seccomp", "mig applies its own filter"),
            (
                "uidMappings",
                "mig maps user namespaces itself (`mig run --userns`)",
            ),
            (
                "gidMappings",
                "mig maps user namespaces itself (`mig run --userns`)",
            ),
            ("devices", "mig creates the container's /dev nodes itself"),
            (
                "cgroupsPath",
                "mig places containers under its own cgroup parent",
            ),
            ("sysctl", "mig sets no sysctls"),
            ("rootfsPropagation", "mig makes every mount private"),
            ("mountLabel", "mig applies no SELinux label"),
            ("intelRdt", "mig does not use Intel RDT"),
            ("personality", "mig does not set a personality"),
            ("timeOffsets", "mig does not create time namespaces"),
            ("memoryPolicy", "mig does not set a memory policy"),
            ("netDevices", "mig moves no network devices"),
        ],
    );
    // mig masks nothing beyond what its read-only /sys and own /proc give: an empty list is fine,
    // a non-empty one would be a promise mig does not keep.
    for key in ["maskedPaths", "readonlyPaths"] {
        if let Some(p) = l.get(key) {
            if !array(p, &format!("linux.{key}"))?.is_empty() {
                no.push(
                    &format!("linux.{key}"),
                    "mig applies its own /proc and /sys policy; remove the list",
                );
            }
        }
    }
    let ns = array(required(l, "namespaces", "linux")?, "linux.namespaces")?;
    let mut seen = Vec::new();
    for (i, n) in ns.iter().enumerate() {
        let field = format!("linux.namespaces[{i}]");
        let n = object(n, &field)?;
        no.allow(n, &field, &["type", "path"], &[]);
        let kind = string(n.get("type"), &format!("{field}.type"))?;
        if n.get("path").is_some() {
            no.push(
                &format!("{field}.path"),
                "mig creates a container's namespaces; it cannot join existing ones",
            );
        }
        if !NAMESPACES.contains(&kind.as_str()) {
            no.push(
                &format!("{field}.type"),
                format!("{kind:?}: mig gives a container exactly pid, network, ipc, uts and mount namespaces"),
            );
        }
        seen.push(kind);
    }
    for want in NAMESPACES {
        if !seen.iter().any(|s| s == want) {
            no.push(
                "linux.namespaces",
                format!("no {want} namespace: mig always gives a container its own pid, network, ipc, uts and mount namespaces"),
            );
        }
    }
    match l.get("resources") {
        Some(r) => map_resources(r, no),
        None => Ok(Limits::default()),
    }
}

fn map_resources(v: &Value, no: &mut Refusals) -> Result<Limits, BundleError> {
    let r = object(v, "linux.resources")?;
    no.allow(
        r,
        "linux.resources",
        &["memory", "cpu", "pids", "devices"],
        &[
            ("blockIO", "mig sets no block I/O limits"),
            ("hugepageLimits", "mig sets no hugepage limits"),
            ("network", "mig sets no network priorities"),
            ("rdma", "mig sets no RDMA limits"),
            ("unified", "mig sets only memory, cpu and pids limits"),
        ],
    );
    let mut limits = Limits::default();
    if let Some(m) = r.get("memory") {
        let m = object(m, "linux.resources.memory")?;
        no.allow(m, "linux.resources.memory", &["limit"], &[]);
        limits.memory = positive(m.get("limit"), "linux.resources.memory.limit")?;
    }
    if let Some(c) = r.get("cpu") {
        let c = object(c, "linux.resources.cpu")?;
        no.allow(c, "linux.resources.cpu", &["quota", "period"], &[]);
        let quota = positive(c.get("quota"), "linux.resources.cpu.quota")?;
        let period = positive(c.get("period"), "linux.resources.cpu.period")?.unwrap_or(100_000);
        if let Some(q) = quota {
            let millis = q.saturating_mul(1000) / period;
            // Below, the cgroup step would refuse it once the container is made (QA of session
            // 32, F8).
            let min = crate::cgroup::CPU_MIN_MILLIS;
            if millis < min {
                return Err(invalid(
                    "linux.resources.cpu.quota",
                    format!(
                        "{q} per period of {period} is less than {} of a CPU, the smallest limit \
                         the kernel can enforce (a quota of 1 ms per 100 ms period)",
                        min as f64 / 1000.0
                    ),
                ));
            }
            limits.cpu_millis = Some(millis);
        }
    }
    if let Some(p) = r.get("pids") {
        let p = object(p, "linux.resources.pids")?;
        no.allow(p, "linux.resources.pids", &["limit"], &[]);
        limits.pids = positive(p.get("limit"), "linux.resources.pids.limit")?;
    }
    if let Some(d) = r.get("devices") {
        for (i, rule) in array(d, "linux.resources.devices")?.iter().enumerate() {
            let field = format!("linux.resources.devices[{i}]");
            let rule = object(rule, &field)?;
            if rule.get("allow") != Some(&Value::Bool(false)) {
                no.push(
                    &field,
                    "only deny rules: mig containers get no devices besides their own /dev",
                );
            }
        }
    }
    Ok(limits)
}

fn invalid(field: &str, why: String) -> BundleError {
    BundleError::Invalid {
        field: field.to_owned(),
        why,
    }
}

fn required<'a>(m: &'a Map<String, Value>, key: &str, at: &str) -> Result<&'a Value, BundleError> {
    m.get(key).ok_or_else(|| {
        let field = if at.is_empty() {
            key.to_owned()
        } else {
            format!("{at}.{key}")
        };
        invalid(&field, "missing".into())
    })
}

fn object<'a>(v: &'a Value, field: &str) -> Result<&'a Map<String, Value>, BundleError> {
    v.as_object()
        .ok_or_else(|| invalid(field, "expected an object".into()))
}

fn array<'a>(v: &'a Value, field: &str) -> Result<&'a Vec<Value>, BundleError> {
    v.as_array()
        .ok_or_else(|| invalid(field, "expected an array".into()))
}

fn string(v: Option<&Value>, field: &str) -> Result<String, BundleError> {
    match v {
        Some(Value::String(s)) if !s.contains('\0') => Ok(s.clone()),
        Some(_) => Err(invalid(field, "expected a string".into())),
        None => Err(invalid(field, "missing".into())),
    }
}

fn strings(v: &Value, field: &str) -> Result<Vec<String>, BundleError> {
    array(v, field)?
        .iter()
        .enumerate()
        .map(|(i, s)| string(Some(s), &format!("{field}[{i}]")))
        .collect()
}

fn boolean(v: Option<&Value>, field: &str) -> Result<Option<bool>, BundleError> {
    match v {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(invalid(field, "expected true or false".into())),
    }
}

fn id(v: Option<&Value>, field: &str) -> Result<u32, BundleError> {
    match v {
        None => Ok(0),
        Some(n) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| invalid(field, "expected an id (0 to 4294967295)".into())),
    }
}

/// A positive integer; OCI's `-1` ("unlimited") and absence are `None`.
fn positive(v: Option<&Value>, field: &str) -> Result<Option<u64>, BundleError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(n) if n.as_i64() == Some(-1) => Ok(None),
        Some(n) => match n.as_u64() {
            Some(x) if x > 0 => Ok(Some(x)),
            _ => Err(invalid(field, "expected a positive integer".into())),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn good() -> Value {
        json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs", "readonly": false},
            "process": {
                "terminal": false,
                "user": {"uid": 1000, "gid": 100},
                "args": ["sh", "-c", "sleep 100"],
                "env": ["PATH=/bin", "A=b"],
                "cwd": "/tmp",
                "noNewPrivileges": true
            },
            "hostname": "bundled",
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid"]},
                {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["ro"]}
            ],
            "linux": {
                "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
                "resources": {
                    "memory": {"limit": 268435456},
                    "cpu": {"quota": 50000, "period": 100000},
                    "pids": {"limit": 64},
                    "devices": [{"allow": false, "access": "rwm"}]
                },
                "maskedPaths": []
            },
            "annotations": {"x": "y"}
        })
    }

    fn refused(mutate: impl FnOnce(&mut Value)) -> String {
        let mut v = good();
        mutate(&mut v);
        Bundle::from_config(&v).unwrap_err().to_string()
    }

    #[test]
    fn maps_a_good_config() {
        let b = Bundle::from_config(&good()).unwrap();
        assert_eq!(b.rootfs, Path::new("rootfs"));
        assert_eq!(b.args, ["sh", "-c", "sleep 100"]);
        assert_eq!(b.env, ["PATH=/bin", "A=b"]);
        assert_eq!((b.cwd.as_str(), b.uid, b.gid), ("/tmp", 1000, 100));
        assert_eq!(b.hostname.as_deref(), Some("bundled"));
        assert_eq!(
            b.limits,
            Limits {
                memory: Some(256 << 20),
                cpu_millis: Some(500),
                pids: Some(64),
            }
        );
        // The minimum: no mounts, no resources, no user.
        let min = json!({
            "ociVersion": "1.1.0",
            "root": {"path": "/abs/rootfs"},
            "process": {"args": ["true"], "cwd": "/"},
            "linux": {"namespaces": [{"type": "mount"}, {"type": "pid"}, {"type": "uts"}, {"type": "ipc"}, {"type": "network"}]}
        });
        let b = Bundle::from_config(&min).unwrap();
        assert_eq!((b.uid, b.limits.clone()), (0, Limits::default()));
        assert!(b.hostname.is_none());
    }

    #[test]
    fn refuses_unsupported_fields_by_name() {
        let e = refused(|v| v["linux"]["seccomp"] = json!({"defaultAction": "SCMP_ACT_ALLOW"}));
        assert_eq!(
            e,
            "linux.seccomp is not supported: mig applies its own filter"
        );
        let e = refused(|v| v["root"]["readonly"] = json!(true));
        assert_eq!(
            e,
            "root.readonly is not supported: a mig container always has a writable layer (it \
             moves with the container); set it to false"
        );
        let e = refused(|v| v["process"]["terminal"] = json!(true));
        assert!(e.starts_with("process.terminal is not supported"), "{e}");
        let e = refused(|v| v["process"]["capabilities"] = json!({}));
        assert!(
            e.starts_with("process.capabilities is not supported"),
            "{e}"
        );
        let e = refused(|v| v["hooks"] = json!({}));
        assert!(e.starts_with("hooks is not supported"), "{e}");
        // A user namespace in the network one's place: both what is there and what is missing.
        let e = refused(|v| v["linux"]["namespaces"][1] = json!({"type": "user"}));
        assert_eq!(
            e,
            "2 fields are not supported (change or remove each):
  linux.namespaces[1].type: \"user\": mig gives a container exactly pid, network, ipc, uts and mount namespaces
  linux.namespaces: no network namespace: mig always gives a container its own pid, network, ipc, uts and mount namespaces"
        );
        let e = refused(|v| v["linux"]["namespaces"][1]["path"] = json!("/proc/1/ns/net"));
        assert!(
            e.starts_with("linux.namespaces[1].path is not supported"),
            "{e}"
        );
        let e = refused(|v| {
            v["linux"]["namespaces"].as_array_mut().unwrap().remove(1);
        });
        assert!(e.contains("no network namespace"), "{e}");
        let e = refused(|v| {
            v["mounts"]
                .as_array_mut()
                .unwrap()
                .push(json!({"destination": "/data", "type": "bind", "source": "/srv"}))
        });
        assert!(
            e.starts_with("mounts[3] is not supported: /data (bind)"),
            "{e}"
        );
        let e = refused(|v| v["linux"]["resources"]["blockIO"] = json!({}));
        assert!(
            e.starts_with("linux.resources.blockIO is not supported"),
            "{e}"
        );
        let e = refused(|v| v["linux"]["resources"]["devices"][0]["allow"] = json!(true));
        assert!(
            e.starts_with("linux.resources.devices[0] is not supported"),
            "{e}"
        );
        let e = refused(|v| v["linux"]["maskedPaths"] = json!(["/proc/kcore"]));
        assert!(e.starts_with("linux.maskedPaths is not supported"), "{e}");
        let e = refused(|v| v["process"]["frobnicate"] = json!(1));
        assert_eq!(
            e,
            "process.frobnicate is not supported: mig does not know this field"
        );
    }

    /// What `runc spec` (runc 1.1.5) writes, as it wrote it.
    const RUNC_SPEC: &str = r#"{
	"ociVersion": "1.0.2-dev",
	"process": {
		"terminal": true,
		"user": {
			"uid": 0,
			"gid": 0
		},
		"args": [
			"sh"
		],
		"env": [
			"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
			"TERM=xterm"
		],
		"cwd": "/",
		"capabilities": {
			"bounding": [
				"CAP_AUDIT_WRITE",
				"CAP_KILL",
				"CAP_NET_BIND_SERVICE"
			],
			"effective": [
				"CAP_AUDIT_WRITE",
				"CAP_KILL",
				"CAP_NET_BIND_SERVICE"
			],
			"permitted": [
				"CAP_AUDIT_WRITE",
				"CAP_KILL",
				"CAP_NET_BIND_SERVICE"
			],
			"ambient": [
				"CAP_AUDIT_WRITE",
				"CAP_KILL",
				"CAP_NET_BIND_SERVICE"
			]
		},
		"rlimits": [
			{
				"type": "RLIMIT_NOFILE",
				"hard": 1024,
				"soft": 1024
			}
		],
		"noNewPrivileges": true
	},
	"root": {
		"path": "rootfs",
		"readonly": true
	},
	"hostname": "runc",
	"mounts": [
		{
			"destination": "/proc",
			"type": "proc",
			"source": "proc"
		},
		{
			"destination": "/dev",
			"type": "tmpfs",
			"source": "tmpfs",
			"options": [
				"nosuid",
				"strictatime",
				"mode=755",
				"size=65536k"
			]
		},
		{
			"destination": "/dev/pts",
			"type": "devpts",
			"source": "devpts",
			"options": [
				"nosuid",
				"noexec",
				"newinstance",
				"ptmxmode=0666",
				"mode=0620",
				"gid=5"
			]
		},
		{
			"destination": "/dev/shm",
			"type": "tmpfs",
			"source": "shm",
			"options": [
				"nosuid",
				"noexec",
				"nodev",
				"mode=1777",
				"size=65536k"
			]
		},
		{
			"destination": "/dev/mqueue",
			"type": "mqueue",
			"source": "mqueue",
			"options": [
				"nosuid",
				"noexec",
				"nodev"
			]
		},
		{
			"destination": "/sys",
			"type": "sysfs",
			"source": "sysfs",
			"options": [
				"nosuid",
				"noexec",
				"nodev",
				"ro"
			]
		},
		{
			"destination": "/sys/fs/cgroup",
			"type": "cgroup",
			"source": "cgroup",
			"options": [
				"nosuid",
				"noexec",
				"nodev",
				"relatime",
				"ro"
			]
		}
	],
	"linux": {
		"resources": {
			"devices": [
				{
					"allow": false,
					"access": "rwm"
				}
			]
		},
		"namespaces": [
			{
				"type": "pid"
			},
			{
				"type": "network"
			},
			{
				"type": "ipc"
			},
			{
				"type": "uts"
			},
			{
				"type": "mount"
			}
		],
		"maskedPaths": [
			"/proc/acpi",
			"/proc/asound",
			"/proc/kcore",
			"/proc/keys",
			"/proc/latency_stats",
			"/proc/timer_list",
			"/proc/timer_stats",
			"/proc/sched_debug",
			"/sys/firmware",
			"/proc/scsi"
		],
		"readonlyPaths": [
			"/proc/bus",
			"/proc/fs",
			"/proc/irq",
			"/proc/sys",
			"/proc/sysrq-trigger"
		]
	}
}"#;

    /// `runc spec`'s default config is refused once, naming every field to change, each with its
    /// reason: it took seven attempts, one field each (QA of session 32, F6). Changed as
    /// docs/operations.md says, it maps.
    #[test]
    fn runc_specs_default_config_is_refused_with_every_field_at_once() {
        let mut v: Value = serde_json::from_str(RUNC_SPEC).unwrap();
        let e = Bundle::from_config(&v).unwrap_err();
        let BundleError::Unsupported(refusals) = &e else {
            panic!("{e}");
        };
        let fields: Vec<&str> = refusals.iter().map(|r| r.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "root.readonly",
                "process.capabilities",
                "process.rlimits",
                "process.terminal",
                "mounts[4]",
                "mounts[6]",
                "linux.maskedPaths",
                "linux.readonlyPaths",
            ]
        );
        let text = e.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "8 fields are not supported (change or remove each):"
        );
        assert_eq!(
            lines[1],
            "  root.readonly: a mig container always has a writable layer (it moves with the \
             container); set it to false"
        );
        assert_eq!(
            lines[5],
            "  mounts[4]: /dev/mqueue (mqueue): mig mounts only /proc, /dev, /dev/pts, /dev/shm \
             and /sys (read-only) itself, and no bind mounts (they could not move with the \
             container)"
        );
        assert!(
            lines[6].starts_with("  mounts[6]: /sys/fs/cgroup (cgroup): "),
            "{text}"
        );
        assert_eq!(lines.len(), 9, "{text}");

        // The changes docs/operations.md lists.
        v["root"]["readonly"] = json!(false);
        v["process"]["terminal"] = json!(false);
        let process = v["process"].as_object_mut().unwrap();
        process.remove("capabilities");
        process.remove("rlimits");
        v["mounts"]
            .as_array_mut()
            .unwrap()
            .retain(|m| m["destination"] != "/dev/mqueue" && m["destination"] != "/sys/fs/cgroup");
        let linux = v["linux"].as_object_mut().unwrap();
        linux.remove("maskedPaths");
        linux.remove("readonlyPaths");
        let b = Bundle::from_config(&v).unwrap();
        assert_eq!(b.args, ["sh"]);
        assert_eq!(b.hostname.as_deref(), Some("runc"));
        assert_eq!(b.limits, Limits::default());
    }

    #[test]
    fn refuses_invalid_values() {
        let e = refused(|v| v["ociVersion"] = json!("2.0.0"));
        assert!(e.starts_with("ociVersion:"), "{e}");
        let e = refused(|v| v["process"]["args"] = json!([]));
        assert_eq!(e, "process.args: empty");
        let e = refused(|v| v["process"]["cwd"] = json!("tmp"));
        assert!(e.starts_with("process.cwd:"), "{e}");
        let e = refused(|v| v["process"]["env"][1] = json!("novalue"));
        assert!(e.starts_with("process.env[1]:"), "{e}");
        let e = refused(|v| v["process"]["user"]["uid"] = json!(-3));
        assert!(e.starts_with("process.user.uid:"), "{e}");
        let e = refused(|v| v["linux"]["resources"]["memory"]["limit"] = json!("lots"));
        assert!(e.starts_with("linux.resources.memory.limit:"), "{e}");
        let e = refused(|v| {
            v.as_object_mut().unwrap().remove("process");
        });
        assert_eq!(e, "process: missing");
        // Below the kernel's smallest quota (QA of session 32, F8); the smallest it takes maps.
        let e =
            refused(|v| v["linux"]["resources"]["cpu"] = json!({"quota": 999, "period": 100000}));
        assert_eq!(
            e,
            "linux.resources.cpu.quota: 999 per period of 100000 is less than 0.01 of a CPU, the \
             smallest limit the kernel can enforce (a quota of 1 ms per 100 ms period)"
        );
        let mut v = good();
        v["linux"]["resources"]["cpu"] = json!({"quota": 100, "period": 10000});
        assert_eq!(Bundle::from_config(&v).unwrap().limits.cpu_millis, Some(10));
        // OCI's -1 means unlimited.
        let mut v = good();
        v["linux"]["resources"]["pids"]["limit"] = json!(-1);
        assert_eq!(Bundle::from_config(&v).unwrap().limits.pids, None);
    }

    #[test]
    fn load_reads_the_directory() {
        let d = tempfile::tempdir().unwrap();
        assert!(matches!(
            Bundle::load(d.path()),
            Err(BundleError::Read { .. })
        ));
        std::fs::write(d.path().join("config.json"), good().to_string()).unwrap();
        assert!(matches!(
            Bundle::load(d.path()),
            Err(BundleError::NoRootfs { .. })
        ));
        std::fs::create_dir(d.path().join("rootfs")).unwrap();
        let b = Bundle::load(d.path()).unwrap();
        assert_eq!(b.rootfs, d.path().join("rootfs"));
        std::fs::write(d.path().join("config.json"), "{").unwrap();
        assert!(matches!(
            Bundle::load(d.path()),
            Err(BundleError::Json { .. })
        ));
    }
}
