//! The agent's configuration file, `/etc/mig/config.toml` by default (`migd --config FILE`).
//!
//! Every key is optional; command-line flags override the file, and built-in defaults fill the
//! rest ([`ConfigFile::resolve`]). Unknown keys and bad values are refused with the key and its line
//! (`/etc/mig/config.toml line 4: unknown field `colour`, expected one of ...`).
//! `migd --check-config` prints the [`Effective`] configuration. docs/operations.md lists the keys.
//!
//! ```toml
//! name = "host-a"
//! listen = "10.0.0.1:7878"
//! state_dir = "/var/lib/mig"
//! socket = "/run/mig/migd.sock"
//! cgroup_parent = "mig-host-a"
//! metrics = "127.0.0.1:9478"
//! log_format = "json"
//!
//! [limits]
//! max_incoming_moves = 2
//! max_outgoing_moves = 2
//! max_incoming_bytes = "64G"
//!
//! [[peers]]
//! name = "host-b"
//! address = "10.0.0.2:7878"
//! fingerprint = "<64 hex characters: `mig info` on host-b>"
//!
//! [[clients]]
//! name = "rebalancer"
//! fingerprint = "<64 hex characters>"
//! ```

use mig_migrate::transport::{is_fingerprint, Peer, PeerError, PeerStore};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Where `migd` looks for its configuration when `--config` is not given (an absent file there
/// means "no file": every value comes from flags and defaults).
pub const DEFAULT_CONFIG: &str = "/etc/mig/config.toml";
/// The default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/mig";
/// The largest configuration file read.
const MAX_CONFIG_FILE: u64 = 1 << 20;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is larger than {MAX_CONFIG_FILE} bytes")]
    TooLarge { path: PathBuf },
    /// A syntax error, an unknown key or a value of the wrong type, as the TOML parser found it.
    #[error("{path} line {line}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        message: String,
    },
    /// A value that parses but is not acceptable (a bad name, a duplicate peer, ...).
    #[error("{path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
    #[error("cannot read the hostname (set `name`)")]
    Hostname(#[source] nix::Error),
    #[error("cannot pin the configured peer {name}")]
    Peer {
        name: String,
        #[source]
        source: PeerError,
    },
}

/// The log output of `migd`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (for journald or a log shipper).
    Json,
}

/// A byte count: an integer, or a string with a unit (`"512M"`, `"64G"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct ByteSize(pub u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => mig_runtime::spec::parse_size(&s)
                .map(ByteSize)
                .ok_or_else(|| {
                    serde::de::Error::custom(format!(
                        "invalid size {s:?} (use a number of bytes or e.g. \"512M\", \"64G\")"
                    ))
                }),
        }
    }
}

/// `[limits]`: bounds on the agent's migrations.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Migrations accepted from peers at the same time (more are refused as busy).
    pub max_incoming_moves: Option<u32>,
    /// Migrations started from this host at the same time.
    pub max_outgoing_moves: Option<u32>,
    /// The largest image set (checkpoint and writable layer) accepted from a peer.
    pub max_incoming_bytes: Option<ByteSize>,
}

/// `[[peers]]`: an agent this one trusts for migrations, pinned by its certificate fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub name: String,
    /// Its QUIC endpoint (`ADDR:PORT`).
    pub address: SocketAddr,
    /// Hex SHA-256 of its certificate (`mig info` on that host prints it).
    pub fingerprint: String,
}

/// `[[clients]]`: a remote API client allowed to connect (mutual TLS, pinned fingerprint).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    pub name: String,
    /// Hex SHA-256 of the client's certificate.
    pub fingerprint: String,
}

/// The configuration file as written: every key optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// The agent's (host's) name; default: the hostname.
    pub name: Option<String>,
    /// The QUIC endpoint for peers and remote clients; without it only outgoing moves work.
    pub listen: Option<SocketAddr>,
    pub state_dir: Option<PathBuf>,
    /// The local API socket.
    pub socket: Option<PathBuf>,
    /// Parent cgroup of the containers; default `mig-<name>`.
    pub cgroup_parent: Option<String>,
    /// Where the metrics endpoint listens (HTTP, Prometheus text format).
    pub metrics: Option<SocketAddr>,
    pub log_format: Option<LogFormat>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
    #[serde(default)]
    pub clients: Vec<ClientConfig>,
}

/// Values given on `migd`'s command line; each one set overrides the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub name: Option<String>,
    pub listen: Option<SocketAddr>,
    pub state_dir: Option<PathBuf>,
    pub socket: Option<PathBuf>,
    pub cgroup_parent: Option<String>,
    pub metrics: Option<SocketAddr>,
    pub log_format: Option<LogFormat>,
    pub max_incoming_bytes: Option<u64>,
}

/// The configuration in force: file, then flags, then defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Effective {
    pub name: String,
    pub listen: Option<SocketAddr>,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub cgroup_parent: String,
    pub metrics: Option<SocketAddr>,
    pub log_format: LogFormat,
    pub limits: Limits,
    pub peers: Vec<PeerConfig>,
    /// Remote API clients allowed in (read by the remote API).
    pub clients: Vec<ClientConfig>,
}

impl ConfigFile {
    /// Parses `text` (the contents of `path`, named in errors) and checks its values.
    pub fn parse(path: &Path, text: &str) -> Result<ConfigFile, ConfigError> {
        let file: ConfigFile = toml::from_str(text).map_err(|e| {
            let line = e.span().map_or(1, |s| line_of(text, s.start));
            // The parser's message names neither key nor value for a value it cannot convert
            // ("invalid socket address syntax"), and may span lines: one line, with the
            // file's line (key and value) in front when it is an assignment.
            let message = e
                .message()
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join("; ");
            let message = match text.lines().nth(line - 1).map(str::trim) {
                Some(l) if l.contains('=') && l.len() <= 200 => format!("{l}: {message}"),
                _ => message,
            };
            ConfigError::Parse {
                path: path.to_owned(),
                line,
                message,
            }
        })?;
        file.validate(path)?;
        Ok(file)
    }

    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
        let read = |source| ConfigError::Read {
            path: path.to_owned(),
            source,
        };
        let len = std::fs::metadata(path).map_err(read)?.len();
        if len > MAX_CONFIG_FILE {
            return Err(ConfigError::TooLarge {
                path: path.to_owned(),
            });
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        ConfigFile::parse(path, &text)
    }

    /// Loads `explicit` when given (it must exist), else [`DEFAULT_CONFIG`] when it exists, else
    /// an empty configuration. Returns the file read, if any.
    pub fn discover(explicit: Option<&Path>) -> Result<(ConfigFile, Option<PathBuf>), ConfigError> {
        match explicit {
            Some(p) => Ok((ConfigFile::load(p)?, Some(p.to_owned()))),
            None if Path::new(DEFAULT_CONFIG).exists() => Ok((
                ConfigFile::load(Path::new(DEFAULT_CONFIG))?,
                Some(DEFAULT_CONFIG.into()),
            )),
            None => Ok((ConfigFile::default(), None)),
        }
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key: String, message: &str| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            message: message.to_owned(),
        };
        if let Some(n) = &self.name {
            if mig_runtime::spec::validate_name(n).is_err() {
                return Err(bad("name".into(), NAME_RULE));
            }
        }
        for (key, p) in [("state_dir", &self.state_dir), ("socket", &self.socket)] {
            if p.as_ref().is_some_and(|p| !p.is_absolute()) {
                return Err(bad(key.into(), "must be an absolute path"));
            }
        }
        if let Some(c) = &self.cgroup_parent {
            if !valid_cgroup_parent(c) {
                return Err(bad("cgroup_parent".into(), CGROUP_RULE));
            }
        }
        let l = &self.limits;
        for (key, v) in [
            ("limits.max_incoming_moves", l.max_incoming_moves),
            ("limits.max_outgoing_moves", l.max_outgoing_moves),
        ] {
            if v == Some(0) {
                return Err(bad(key.into(), "must be at least 1"));
            }
        }
        if l.max_incoming_bytes.is_some_and(|b| b.0 == 0) {
            return Err(bad(
                "limits.max_incoming_bytes".into(),
                "must be at least 1",
            ));
        }
        let mut names = std::collections::HashSet::new();
        let mut fps = std::collections::HashSet::new();
        for (i, p) in self.peers.iter().enumerate() {
            if mig_runtime::spec::validate_name(&p.name).is_err() {
                return Err(bad(format!("peers[{i}].name"), NAME_RULE));
            }
            if !is_fingerprint(&p.fingerprint) {
                return Err(bad(format!("peers[{i}].fingerprint"), FINGERPRINT_RULE));
            }
            if !names.insert(p.name.as_str()) {
                return Err(bad(format!("peers[{i}].name"), "duplicate peer name"));
            }
            if !fps.insert(p.fingerprint.as_str()) {
                return Err(bad(
                    format!("peers[{i}].fingerprint"),
                    "duplicate fingerprint",
                ));
            }
        }
        let mut names = std::collections::HashSet::new();
        for (i, c) in self.clients.iter().enumerate() {
            if mig_runtime::spec::validate_name(&c.name).is_err() {
                return Err(bad(format!("clients[{i}].name"), NAME_RULE));
            }
            if !is_fingerprint(&c.fingerprint) {
                return Err(bad(format!("clients[{i}].fingerprint"), FINGERPRINT_RULE));
            }
            if !names.insert(c.name.as_str()) {
                return Err(bad(format!("clients[{i}].name"), "duplicate client name"));
            }
        }
        Ok(())
    }

    /// Applies the flags over the file and fills defaults. `flags` are checked like the file's
    /// values (`path` names them in errors as "command line").
    pub fn resolve(mut self, flags: Overrides) -> Result<Effective, ConfigError> {
        let cli = Path::new("command line");
        let flag_file = ConfigFile {
            name: flags.name,
            state_dir: flags.state_dir,
            socket: flags.socket,
            cgroup_parent: flags.cgroup_parent,
            ..ConfigFile::default()
        };
        flag_file.validate(cli)?;
        let name = match flag_file.name.or(self.name) {
            Some(n) => n,
            None => {
                let h = nix::unistd::gethostname().map_err(ConfigError::Hostname)?;
                let h = h.to_string_lossy().into_owned();
                if mig_runtime::spec::validate_name(&h).is_err() {
                    return Err(ConfigError::Invalid {
                        path: "hostname".into(),
                        key: "name".into(),
                        message: format!(
                            "the hostname {h:?} is not a valid agent name: set `name`"
                        ),
                    });
                }
                h
            }
        };
        if let Some(b) = flags.max_incoming_bytes {
            self.limits.max_incoming_bytes = Some(ByteSize(b));
        }
        self.limits
            .max_incoming_bytes
            .get_or_insert(ByteSize(crate::daemon::DEFAULT_MAX_INCOMING_BYTES));
        Ok(Effective {
            cgroup_parent: flag_file
                .cgroup_parent
                .or(self.cgroup_parent)
                .unwrap_or_else(|| format!("mig-{name}")),
            name,
            listen: flags.listen.or(self.listen),
            state_dir: flag_file
                .state_dir
                .or(self.state_dir)
                .unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
            socket: flag_file
                .socket
                .or(self.socket)
                .unwrap_or_else(|| crate::cli::DEFAULT_SOCKET.into()),
            metrics: flags.metrics.or(self.metrics),
            log_format: flags.log_format.or(self.log_format).unwrap_or_default(),
            limits: self.limits,
            peers: self.peers,
            clients: self.clients,
        })
    }
}

impl Effective {
    /// The configuration as TOML (what `migd --check-config` prints).
    /// Settings left unset, which TOML cannot show, follow as comments saying what that means.
    pub fn to_toml(&self) -> String {
        let mut s = toml::to_string(self)
            .unwrap_or_else(|e| format!("# cannot print the configuration: {e}\n"));
        let unset = [
            (self.listen.is_none(), "listen: not set (no QUIC endpoint: peers cannot move containers here, remote clients cannot connect; outgoing moves work)"),
            (self.metrics.is_none(), "metrics: not set (no metrics endpoint)"),
            (self.limits.max_incoming_moves.is_none(), "limits.max_incoming_moves: not set (no limit)"),
            (self.limits.max_outgoing_moves.is_none(), "limits.max_outgoing_moves: not set (no limit)"),
        ];
        for (_, what) in unset.iter().filter(|(u, _)| *u) {
            s.push_str(&format!("# {what}\n"));
        }
        s
    }

    /// Pins the configured peers in `<state-dir>/peers.json`: adds the missing ones and replaces
    /// a same-named peer whose address or fingerprint changed. Peers added with `mig peers add`
    /// and absent from the file stay.
    pub fn pin_peers(&self) -> Result<(), ConfigError> {
        if self.peers.is_empty() {
            return Ok(());
        }
        let err = |name: &str| {
            let name = name.to_owned();
            move |source| ConfigError::Peer { name, source }
        };
        let mut store = PeerStore::open(&self.state_dir).map_err(err("*"))?;
        for p in &self.peers {
            let want = Peer {
                name: p.name.clone(),
                address: p.address,
                fingerprint: p.fingerprint.clone(),
            };
            match store.get(&p.name) {
                Some(have) if *have == want => continue,
                Some(_) => {
                    store.remove(&p.name).map_err(err(&p.name))?;
                }
                None => {}
            }
            store.add(want).map_err(err(&p.name))?;
        }
        Ok(())
    }
}

const NAME_RULE: &str = "use 1-63 characters from [a-zA-Z0-9_.-], starting with a letter or digit";
const CGROUP_RULE: &str = "use '/'-separated components of [a-zA-Z0-9_.-], none empty, '.' or '..'";
const FINGERPRINT_RULE: &str = "want 64 lowercase hex characters (`mig info` prints it)";

/// Whether `c` is an acceptable cgroup parent (relative, no `..`, plain characters).
pub fn valid_cgroup_parent(c: &str) -> bool {
    !c.is_empty()
        && c.split('/').all(|c| {
            !c.is_empty()
                && c != "."
                && c != ".."
                && c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        })
}

/// The 1-based line of byte offset `at` in `text`.
fn line_of(text: &str, at: usize) -> usize {
    let at = at.min(text.len());
    text.as_bytes()[..at]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn parse(text: &str) -> Result<ConfigFile, ConfigError> {
        ConfigFile::parse(Path::new("/etc/mig/config.toml"), text)
    }

    #[test]
    fn good_file_resolves_with_flags_over_it() {
        let text = format!(
            r#"
name = "host-a"
listen = "10.0.0.1:7878"
state_dir = "/srv/mig"
log_format = "json"

[limits]
max_incoming_moves = 2
max_incoming_bytes = "64G"

[[peers]]
name = "host-b"
address = "10.0.0.2:7878"
fingerprint = "{FP}"

[[clients]]
name = "rebalancer"
fingerprint = "{FP}"
"#
        );
        let f = parse(&text).unwrap();
        assert_eq!(f.limits.max_incoming_bytes, Some(ByteSize(64 << 30)));
        assert_eq!(f.peers.len(), 1);
        let e = f
            .resolve(Overrides {
                state_dir: Some("/tmp/x".into()),
                ..Overrides::default()
            })
            .unwrap();
        assert_eq!(e.name, "host-a");
        assert_eq!(e.state_dir, Path::new("/tmp/x"));
        assert_eq!(e.socket, Path::new(crate::cli::DEFAULT_SOCKET));
        assert_eq!(e.cgroup_parent, "mig-host-a");
        assert_eq!(e.log_format, LogFormat::Json);
        assert_eq!(e.clients[0].name, "rebalancer");
        assert_eq!(e.limits.max_incoming_moves, Some(2));
        // The printed configuration parses back as a file.
        let again = parse(&e.to_toml()).unwrap();
        assert_eq!(again.listen, e.listen);
        assert_eq!(again.peers, e.peers);
        // An empty file is fine: defaults (the name from the flag here).
        let e = parse("")
            .unwrap()
            .resolve(Overrides {
                name: Some("n1".into()),
                ..Overrides::default()
            })
            .unwrap();
        assert_eq!(e.state_dir, Path::new(DEFAULT_STATE_DIR));
        assert_eq!(e.listen, None);
        assert_eq!(e.log_format, LogFormat::Text);
        // What --check-config prints: the defaults in force, and what is unset said so.
        let t = e.to_toml();
        assert!(t.contains("max_incoming_bytes = 68719476736"), "{t}");
        assert!(
            t.contains("# listen: not set") && t.contains("# metrics: not set"),
            "{t}"
        );
        assert!(
            t.contains("# limits.max_outgoing_moves: not set (no limit)"),
            "{t}"
        );
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let e = parse("name = \"a\"\n\ncolour = \"blue\"\n").unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, ConfigError::Parse { line: 3, .. }), "{msg}");
        assert!(msg.contains("line 3") && msg.contains("`colour`"), "{msg}");
        let e = parse(&format!(
            "[[peers]]\nname = \"b\"\naddress = \"10.0.0.2:1\"\nfingerprint = \"{FP}\"\nport = 1\n"
        ))
        .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("line 5") && msg.contains("`port`"), "{msg}");
        let e = parse("[limits]\nmax_moves = 1\n").unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
    }

    #[test]
    fn bad_values_are_refused() {
        let e = parse("listen = \"nowhere\"\n").unwrap_err();
        assert!(matches!(e, ConfigError::Parse { line: 1, .. }), "{e}");
        // The key and the value are named, on one line.
        assert!(e.to_string().contains("listen = \"nowhere\": "), "{e}");
        let e = parse("name = x\n").unwrap_err();
        assert!(
            !e.to_string().contains('\n') && e.to_string().contains("name = x"),
            "{e}"
        );
        let e = parse("\nlog_format = \"xml\"\n").unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
        let e = parse("[limits]\nmax_incoming_bytes = \"lots\"\n").unwrap_err();
        assert!(e.to_string().contains("invalid size"), "{e}");
        let e = parse("name = \"a b\"\n").unwrap_err();
        assert!(
            matches!(&e, ConfigError::Invalid { key, .. } if key == "name"),
            "{e}"
        );
        let e = parse("state_dir = \"relative\"\n").unwrap_err();
        assert!(e.to_string().contains("state_dir"), "{e}");
        let e = parse("cgroup_parent = \"../x\"\n").unwrap_err();
        assert!(e.to_string().contains("cgroup_parent"), "{e}");
        let e = parse("[limits]\nmax_outgoing_moves = 0\n").unwrap_err();
        assert!(e.to_string().contains("limits.max_outgoing_moves"), "{e}");
        let e = parse("[[peers]]\nname = \"b\"\naddress = \"10.0.0.2:1\"\nfingerprint = \"abc\"\n")
            .unwrap_err();
        assert!(e.to_string().contains("peers[0].fingerprint"), "{e}");
        let dup = format!(
            "[[clients]]\nname = \"c\"\nfingerprint = \"{FP}\"\n[[clients]]\nname = \"c\"\nfingerprint = \"{FP}\"\n"
        );
        let e = parse(&dup).unwrap_err();
        assert!(e.to_string().contains("clients[1].name"), "{e}");
        // A bad flag is refused like a bad key.
        let e = parse("")
            .unwrap()
            .resolve(Overrides {
                name: Some("n".into()),
                cgroup_parent: Some("/abs".into()),
                ..Overrides::default()
            })
            .unwrap_err();
        assert!(e.to_string().contains("command line"), "{e}");
    }

    #[test]
    fn packaged_default_config_parses() {
        let f = parse(include_str!("../dist/config.toml")).unwrap();
        assert_eq!(f, ConfigFile::default());
    }

    #[test]
    fn configured_peers_are_pinned() {
        let dir = tempfile::tempdir().unwrap();
        let mut e = parse("")
            .unwrap()
            .resolve(Overrides {
                name: Some("n".into()),
                state_dir: Some(dir.path().into()),
                ..Overrides::default()
            })
            .unwrap();
        e.peers = vec![PeerConfig {
            name: "b".into(),
            address: "10.0.0.2:1".parse().unwrap(),
            fingerprint: FP.into(),
        }];
        e.pin_peers().unwrap();
        e.pin_peers().unwrap();
        e.peers[0].address = "10.0.0.3:1".parse().unwrap();
        e.pin_peers().unwrap();
        let store = PeerStore::open(dir.path()).unwrap();
        assert_eq!(store.list().len(), 1);
        assert_eq!(store.list()[0].address, e.peers[0].address);
    }
}
