//! The container's description: everything needed to build it again on this host or another one.
//!
//! A [`ContainerSpec`] is written to `containers/<id>/spec.json`, travels inside checkpoint archives
//! and migration messages, and is therefore untrusted input when it arrives from elsewhere:
//! [`ContainerSpec::validate`] checks it before anything uses it.

use serde::{Deserialize, Serialize};

/// Resource limits applied through the container's cgroup.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Memory limit in bytes (hard limit; the kernel OOM-kills above it).
    pub memory: Option<u64>,
    /// CPU limit in thousandths of a CPU (1500 = 1.5 CPUs).
    pub cpu_millis: Option<u64>,
    /// Maximum number of processes and threads.
    pub pids: Option<u64>,
}

/// Which image the container's root filesystem is built from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageRef {
    /// The name the image was imported under (informational on other hosts).
    pub name: String,
    /// The image id: `sha256:<hex>` of its manifest/config.
    pub id: String,
    /// Layer digests (`sha256:<hex>` of the uncompressed layer tar), bottom layer first.
    pub layers: Vec<String>,
}

/// The container's init process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessSpec {
    /// argv; `args[0]` is resolved against `PATH` inside the container when it has no `/`.
    pub args: Vec<String>,
    /// `KEY=VALUE` pairs.
    pub env: Vec<String>,
    /// Working directory inside the container (absolute).
    pub cwd: String,
    /// User and group ids inside the container.
    pub uid: u32,
    pub gid: u32,
}

/// A user-namespace mapping: container ids `0..size` map to host ids `host_id..host_id+size`
/// (the same range for uids and gids).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdMap {
    pub host_id: u32,
    pub size: u32,
}

/// Everything that defines a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerSpec {
    /// 32 lowercase hex characters, unique per host (and kept across moves).
    pub id: String,
    /// Human name, unique per host: `[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}`.
    pub name: String,
    pub image: ImageRef,
    pub process: ProcessSpec,
    pub hostname: String,
    pub limits: Limits,
    /// `Some` when the container runs in its own user namespace.
    pub userns: Option<IdMap>,
    /// `Some` for a container with a veth into the host's bridge (`mig run --net bridge`); `None`:
    /// loopback only. (Always serialized: the spec also travels in postcard, which is not
    /// self-describing.)
    #[serde(default)]
    pub net: Option<crate::net::NetSpec>,
}

/// Why a spec (or one of its parts) was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("invalid container id {0:?}: expected 32 lowercase hex characters")]
    Id(String),
    #[error("invalid name {0:?}: use 1-63 characters from [a-zA-Z0-9_.-], starting with a letter or digit")]
    Name(String),
    #[error("invalid hostname {0:?}")]
    Hostname(String),
    #[error("invalid digest {0:?}: expected sha256:<64 hex>")]
    Digest(String),
    #[error("the command is empty")]
    EmptyCommand,
    #[error("invalid working directory {0:?}: must be absolute")]
    Cwd(String),
    #[error("invalid environment entry {0:?}: expected KEY=VALUE")]
    Env(String),
    #[error("invalid limit: {0}")]
    Limit(&'static str),
    #[error("invalid user namespace mapping: {0}")]
    IdMap(&'static str),
    #[error("a string contains a NUL byte")]
    Nul,
    #[error("invalid network: {0}")]
    Net(&'static str),
}

/// Checks a container id: 32 lowercase hex characters.
pub fn validate_id(id: &str) -> Result<(), SpecError> {
    if id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(())
    } else {
        Err(SpecError::Id(id.to_owned()))
    }
}

/// Checks a container or image name.
pub fn validate_name(name: &str) -> Result<(), SpecError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(SpecError::Name(name.to_owned()))
    }
}

/// Checks a layer or image digest: `sha256:` and 64 lowercase hex characters.
pub fn validate_digest(digest: &str) -> Result<(), SpecError> {
    match digest.strip_prefix("sha256:") {
        Some(hex)
            if hex.len() == 64
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
        {
            Ok(())
        }
        _ => Err(SpecError::Digest(digest.to_owned())),
    }
}

fn validate_hostname(h: &str) -> Result<(), SpecError> {
    let ok = !h.is_empty()
        && h.len() <= 64
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !h.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(SpecError::Hostname(h.to_owned()))
    }
}

impl ContainerSpec {
    /// Checks every field that later code relies on (paths built from ids, argv without NULs, ...).
    pub fn validate(&self) -> Result<(), SpecError> {
        validate_id(&self.id)?;
        validate_name(&self.name)?;
        validate_hostname(&self.hostname)?;
        validate_digest(&self.image.id)?;
        for l in &self.image.layers {
            validate_digest(l)?;
        }
        let p = &self.process;
        if p.args.is_empty() || p.args[0].is_empty() {
            return Err(SpecError::EmptyCommand);
        }
        if !p.cwd.starts_with('/') {
            return Err(SpecError::Cwd(p.cwd.clone()));
        }
        for e in &p.env {
            match e.split_once('=') {
                Some((k, _)) if !k.is_empty() => {}
                _ => return Err(SpecError::Env(e.clone())),
            }
        }
        let strings = p
            .args
            .iter()
            .chain(&p.env)
            .chain([&p.cwd, &self.image.name]);
        if strings.into_iter().any(|s| s.contains('\0')) {
            return Err(SpecError::Nul);
        }
        let l = &self.limits;
        if l.memory.is_some_and(|m| m < 4 << 20) {
            return Err(SpecError::Limit("memory must be at least 4 MiB"));
        }
        // From 0.001, not from the smallest the kernel takes (`cgroup::CPU_MIN_MILLIS`, 0.01): a
        // container recorded with less before that was checked (it failed at its start) must stay
        // readable, to be listed and removed. Where a limit is made (the agent's run, a bundle) it
        // is checked against the kernel's (QA of session 32, F8).
        if l.cpu_millis.is_some_and(|c| c == 0 || c > 1_000_000) {
            return Err(SpecError::Limit("cpus must be between 0.001 and 1000"));
        }
        if l.pids.is_some_and(|p| p == 0) {
            return Err(SpecError::Limit("pids must be at least 1"));
        }
        if let Some(m) = self.userns {
            if m.size < 65536 || m.host_id == 0 || m.host_id.checked_add(m.size).is_none() {
                return Err(SpecError::IdMap(
                    "needs a non-root host range of at least 65536 ids",
                ));
            }
        }
        if let Some(net) = &self.net {
            net.validate().map_err(|e| match e {
                crate::net::NetError::Invalid(why) => SpecError::Net(why),
                _ => SpecError::Net("invalid"),
            })?;
        }
        Ok(())
    }

    /// The first 12 characters of the id, as `mig ps` shows it.
    pub fn short_id(&self) -> &str {
        &self.id[..12.min(self.id.len())]
    }
}

/// Parses a human size: `256M`, `1G`, `512k`, `1048576` (bytes; binary multiples).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let mult: u64 = match s[i..].to_ascii_lowercase().as_str() {
                "b" => 1,
                "k" | "kb" | "kib" => 1 << 10,
                "m" | "mb" | "mib" => 1 << 20,
                "g" | "gb" | "gib" => 1 << 30,
                "t" | "tb" | "tib" => 1 << 40,
                _ => return None,
            };
            (&s[..i], mult)
        }
        None => (s, 1),
    };
    num.trim().parse::<u64>().ok()?.checked_mul(mult)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A valid spec for tests across the crate (no user namespace, no network).
    pub(crate) fn sample() -> ContainerSpec {
        ContainerSpec {
            id: "0123456789abcdef0123456789abcdef".into(),
            name: "web".into(),
            image: ImageRef {
                name: "busybox".into(),
                id: format!("sha256:{}", "a".repeat(64)),
                layers: vec![format!("sha256:{}", "b".repeat(64))],
            },
            process: ProcessSpec {
                args: vec!["sh".into()],
                env: vec!["PATH=/bin".into()],
                cwd: "/".into(),
                uid: 0,
                gid: 0,
            },
            hostname: "web".into(),
            limits: Limits::default(),
            userns: None,
            net: None,
        }
    }

    #[test]
    fn sample_is_valid_and_round_trips() {
        let s = sample();
        s.validate().unwrap();
        let j = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<ContainerSpec>(&j).unwrap(), s);
    }

    #[test]
    fn refuses_bad_fields() {
        let mut s = sample();
        s.id = "../../etc".into();
        assert!(matches!(s.validate(), Err(SpecError::Id(_))));
        let mut s = sample();
        s.image.layers.push("sha256:zz".into());
        assert!(matches!(s.validate(), Err(SpecError::Digest(_))));
        let mut s = sample();
        s.process.args.clear();
        assert_eq!(s.validate(), Err(SpecError::EmptyCommand));
        let mut s = sample();
        s.process.env.push("NOEQUALS".into());
        assert!(matches!(s.validate(), Err(SpecError::Env(_))));
        let mut s = sample();
        s.name = "-x".into();
        assert!(matches!(s.validate(), Err(SpecError::Name(_))));
    }

    #[test]
    fn unknown_fields_are_refused() {
        let mut v = serde_json::to_value(sample()).unwrap();
        v["extra"] = 1.into();
        assert!(serde_json::from_value::<ContainerSpec>(v).is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256M"), Some(256 << 20));
        assert_eq!(parse_size("1g"), Some(1 << 30));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("12x"), None);
        assert_eq!(parse_size(""), None);
    }
}
