//! `migd --metrics ADDR`: Prometheus text (exposition format 0.0.4) over plain HTTP, hand-written on
//! a tokio `TcpListener`. Counters come from the agent's event stream (so they count from the
//! agent's start); container gauges are read at each scrape. docs/api.md lists the metrics.

use crate::api::{ContainerState, Event, EventKind};
use crate::daemon::Agent;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Upper bounds (milliseconds) of the migration downtime histogram's buckets.
pub const DOWNTIME_BUCKETS_MS: &[u64] = &[10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000];
/// The largest request head read.
const MAX_HEAD: usize = 8 << 10;
/// How long a scraper may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Scrapes served at once.
const MAX_SCRAPES: usize = 16;

/// Why the metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen for metrics on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Counters kept from events.
#[derive(Debug, Default, Clone)]
pub struct Counters {
    /// (role, outcome) -> migrations ended.
    pub migrations: BTreeMap<(String, String), u64>,
    /// Downtime histogram of committed migrations on the source: bucket counts (same order as
    /// [`DOWNTIME_BUCKETS_MS`]), sum in ms and count.
    pub downtime_buckets: Vec<u64>,
    pub downtime_sum_ms: u64,
    pub downtime_count: u64,
    /// Migration bytes by role (`source`: sent, `destination`: received).
    pub bytes: BTreeMap<String, u64>,
    /// Container lifecycle events by type.
    pub container_events: BTreeMap<String, u64>,
    /// Subscriber lag: events the counters missed.
    pub events_missed: u64,
}

impl Counters {
    /// Counts one event.
    pub fn observe(&mut self, e: &Event) {
        if self.downtime_buckets.is_empty() {
            self.downtime_buckets = vec![0; DOWNTIME_BUCKETS_MS.len()];
        }
        let ty = match &e.kind {
            EventKind::ContainerStarted { .. } => "started",
            EventKind::ContainerStopped { .. } => "stopped",
            EventKind::ContainerOom { .. } => "oom",
            EventKind::ContainerCheckpointed { .. } => "checkpointed",
            EventKind::ContainerRestored { .. } => "restored",
            EventKind::ContainerRemoved { .. } => "removed",
            EventKind::MigrationConflict { .. } => "migration_conflict",
            EventKind::MigrationPhase { .. } | EventKind::Unknown => return,
            EventKind::MigrationDone {
                role,
                outcome,
                downtime_ms,
                bytes,
                ..
            } => {
                *self
                    .migrations
                    .entry((role.clone(), outcome.clone()))
                    .or_default() += 1;
                *self.bytes.entry(role.clone()).or_default() += bytes;
                if let (Some(d), "source", "committed") =
                    (downtime_ms, role.as_str(), outcome.as_str())
                {
                    for (i, b) in DOWNTIME_BUCKETS_MS.iter().enumerate() {
                        if d <= b {
                            self.downtime_buckets[i] += 1;
                        }
                    }
                    self.downtime_sum_ms += d;
                    self.downtime_count += 1;
                }
                return;
            }
            EventKind::Lagged { missed } => {
                self.events_missed += missed;
                return;
            }
        };
        *self.container_events.entry(ty.into()).or_default() += 1;
    }
}

/// Containers by state and their summed usage, read at scrape time.
#[derive(Debug, Default, Clone)]
pub struct Gauges {
    pub by_state: BTreeMap<String, u64>,
    pub memory_bytes: u64,
    pub cpu_usec: u64,
}

fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The exposition text for `host`.
pub fn render(host: &str, g: &Gauges, c: &Counters) -> String {
    let h = esc(host);
    let mut o = String::new();
    let _ = writeln!(
        o,
        "# HELP mig_containers Containers on this agent by state."
    );
    let _ = writeln!(o, "# TYPE mig_containers gauge");
    let states = [
        ContainerState::Created,
        ContainerState::Running,
        ContainerState::Frozen,
        ContainerState::Stopped,
        ContainerState::Exited,
        ContainerState::Checkpointed,
        ContainerState::Restoring,
        ContainerState::Failed,
    ];
    for s in states {
        let n = g.by_state.get(s.as_str()).copied().unwrap_or(0);
        let _ = writeln!(
            o,
            "mig_containers{{host=\"{h}\",state=\"{}\"}} {n}",
            s.as_str()
        );
    }
    let _ = writeln!(
        o,
        "# HELP mig_containers_memory_bytes Memory used by running containers (cgroup)."
    );
    let _ = writeln!(o, "# TYPE mig_containers_memory_bytes gauge");
    let _ = writeln!(
        o,
        "mig_containers_memory_bytes{{host=\"{h}\"}} {}",
        g.memory_bytes
    );
    let _ = writeln!(
        o,
        "# HELP mig_containers_cpu_seconds_total CPU time of running containers (cgroup)."
    );
    let _ = writeln!(o, "# TYPE mig_containers_cpu_seconds_total counter");
    let _ = writeln!(
        o,
        "mig_containers_cpu_seconds_total{{host=\"{h}\"}} {:.6}",
        g.cpu_usec as f64 / 1e6
    );
    let _ = writeln!(
        o,
        "# HELP mig_container_events_total Container lifecycle events since the agent started."
    );
    let _ = writeln!(o, "# TYPE mig_container_events_total counter");
    for (ty, n) in &c.container_events {
        let _ = writeln!(
            o,
            "mig_container_events_total{{host=\"{h}\",event=\"{}\"}} {n}",
            esc(ty)
        );
    }
    let _ = writeln!(
        o,
        "# HELP mig_migrations_total Migrations ended on this agent, by role and outcome."
    );
    let _ = writeln!(o, "# TYPE mig_migrations_total counter");
    for ((role, outcome), n) in &c.migrations {
        let _ = writeln!(
            o,
            "mig_migrations_total{{host=\"{h}\",role=\"{}\",outcome=\"{}\"}} {n}",
            esc(role),
            esc(outcome)
        );
    }
    let _ = writeln!(o, "# HELP mig_migration_bytes_total Migration bytes sent (role source) or received (role destination).");
    let _ = writeln!(o, "# TYPE mig_migration_bytes_total counter");
    for role in ["source", "destination"] {
        let n = c.bytes.get(role).copied().unwrap_or(0);
        let _ = writeln!(
            o,
            "mig_migration_bytes_total{{host=\"{h}\",role=\"{role}\"}} {n}"
        );
    }
    let _ = writeln!(
        o,
        "# HELP mig_migration_downtime_seconds Downtime of committed migrations (source side)."
    );
    let _ = writeln!(o, "# TYPE mig_migration_downtime_seconds histogram");
    for (i, b) in DOWNTIME_BUCKETS_MS.iter().enumerate() {
        let n = c.downtime_buckets.get(i).copied().unwrap_or(0);
        let _ = writeln!(
            o,
            "mig_migration_downtime_seconds_bucket{{host=\"{h}\",le=\"{}\"}} {n}",
            *b as f64 / 1000.0
        );
    }
    let _ = writeln!(
        o,
        "mig_migration_downtime_seconds_bucket{{host=\"{h}\",le=\"+Inf\"}} {}",
        c.downtime_count
    );
    let _ = writeln!(
        o,
        "mig_migration_downtime_seconds_sum{{host=\"{h}\"}} {:.3}",
        c.downtime_sum_ms as f64 / 1000.0
    );
    let _ = writeln!(
        o,
        "mig_migration_downtime_seconds_count{{host=\"{h}\"}} {}",
        c.downtime_count
    );
    let _ = writeln!(
        o,
        "# HELP mig_events_missed_total Events the metrics missed (subscriber lag)."
    );
    let _ = writeln!(o, "# TYPE mig_events_missed_total counter");
    let _ = writeln!(
        o,
        "mig_events_missed_total{{host=\"{h}\"}} {}",
        c.events_missed
    );
    o
}

/// Binds `addr`, counts events from now on and serves `GET /metrics`. Returns the bound address.
pub async fn start(agent: &Arc<Agent>, addr: SocketAddr) -> Result<SocketAddr, MetricsError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| MetricsError::Bind { addr, source })?;
    let counters = Arc::new(Mutex::new(Counters::default()));
    let mut rx = agent.subscribe_events();
    let c2 = counters.clone();
    tokio::spawn(async move {
        loop {
            let e = match rx.recv().await {
                Ok(e) => e,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => Event {
                    seq: 0,
                    time_ms: 0,
                    host: String::new(),
                    kind: EventKind::Lagged { missed },
                },
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            };
            c2.lock().unwrap_or_else(|p| p.into_inner()).observe(&e);
        }
    });
    let agent = agent.clone();
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPES));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = limit.clone().acquire_owned().await else {
                return;
            };
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let agent = agent.clone();
            let counters = counters.clone();
            tokio::spawn(async move {
                let _ = serve(&agent, &counters, stream).await;
                drop(permit);
            });
        }
    });
    tracing::info!(addr = %bound, "metrics endpoint ready");
    Ok(bound)
}

/// Reads the request head (bounded in size and time) and answers it.
async fn serve(
    agent: &Arc<Agent>,
    counters: &Mutex<Counters>,
    mut stream: TcpStream,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let read = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    if tokio::time::timeout(READ_TIMEOUT, read).await.is_err() {
        return Ok(());
    }
    let line = String::from_utf8_lossy(head.split(|b| *b == b'\n').next().unwrap_or(&[]))
        .trim()
        .to_owned();
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, body) = match (method, path.split('?').next().unwrap_or("")) {
        ("GET", "/metrics") | ("GET", "/") => {
            let g = gauges(agent);
            let c = counters.lock().unwrap_or_else(|p| p.into_inner()).clone();
            ("200 OK", render(&agent.name(), &g, &c))
        }
        ("GET", _) => ("404 Not Found", "not found: try /metrics\n".to_owned()),
        _ => ("405 Method Not Allowed", "only GET\n".to_owned()),
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(resp.as_bytes()).await?;
    stream.shutdown().await
}

fn gauges(agent: &Agent) -> Gauges {
    let mut g = Gauges::default();
    for c in agent.containers_view() {
        *g.by_state.entry(c.state.as_str().to_owned()).or_default() += 1;
        if let Some(u) = &c.usage {
            g.memory_bytes += u.memory_bytes;
            g.cpu_usec += u.cpu_usec;
        }
    }
    g
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(role: &str, outcome: &str, downtime: Option<u64>, bytes: u64) -> Event {
        Event {
            seq: 1,
            time_ms: 0,
            host: "a".into(),
            kind: EventKind::MigrationDone {
                migration_id: "m".into(),
                container_id: "c".into(),
                container_name: "n".into(),
                role: role.into(),
                peer: "b".into(),
                outcome: outcome.into(),
                total_ms: 1,
                downtime_ms: downtime,
                bytes,
                error: None,
            },
        }
    }

    #[test]
    fn counts_and_renders() {
        let mut c = Counters::default();
        c.observe(&done("source", "committed", Some(120), 1000));
        c.observe(&done("source", "rolled_back", None, 10));
        c.observe(&done("destination", "committed", None, 900));
        c.observe(&Event {
            seq: 2,
            time_ms: 0,
            host: "a".into(),
            kind: EventKind::ContainerStarted {
                id: "c".into(),
                name: "n".into(),
            },
        });
        let mut g = Gauges::default();
        g.by_state.insert("running".into(), 2);
        let t = render("host-\"a", &g, &c);
        assert!(t.contains("mig_containers{host=\"host-\\\"a\",state=\"running\"} 2\n"));
        assert!(t.contains("mig_containers{host=\"host-\\\"a\",state=\"exited\"} 0\n"));
        assert!(t.contains("role=\"source\",outcome=\"committed\"} 1\n"));
        assert!(t.contains("role=\"source\",outcome=\"rolled_back\"} 1\n"));
        assert!(t.contains("mig_migration_bytes_total{host=\"host-\\\"a\",role=\"source\"} 1010\n"));
        assert!(t.contains("le=\"0.1\"} 0\n"));
        assert!(t.contains("le=\"0.25\"} 1\n"));
        assert!(t.contains("le=\"+Inf\"} 1\n"));
        assert!(t.contains("mig_migration_downtime_seconds_sum{host=\"host-\\\"a\"} 0.120\n"));
        assert!(t.contains("event=\"started\"} 1\n"));
        // Every line is a comment or `name{labels} value`.
        for l in t.lines() {
            assert!(
                l.starts_with('#')
                    || l.rsplit_once(' ')
                        .is_some_and(|(_, v)| v.parse::<f64>().is_ok()),
                "{l}"
            );
        }
    }
}
