//! `mig rebalance`: a reference rebalancer over the agent API. It reads every host's memory use
//! (the sum of its running containers' cgroup memory), plans moves that even it out ([`plan`]),
//! prints the plan (`--dry-run`) or carries it out with `move_start`/`move_status`, at most
//! `--max-concurrent` moves at a time, and reports the spread before and after.

use super::commands::{json, out, CliError};
use super::Cli;
use crate::client::Client;
use clap::Args;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// Arguments of `mig rebalance`.
#[derive(Debug, Args)]
pub struct RebalanceArgs {
    /// The hosts to balance: lab host names or agent socket paths, comma-separated (default:
    /// every host of the lab named by --lab or MIG_LAB).
    #[arg(long, value_delimiter = ',', value_name = "HOSTS")]
    pub hosts: Vec<String>,
    /// The lab whose hosts to balance.
    #[arg(long, value_name = "NAME")]
    pub lab: Option<String>,
    /// At most this many moves.
    #[arg(long, default_value_t = 4, value_name = "N")]
    pub max_moves: usize,
    /// At most this many moves at the same time (never two from or to one host).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub max_concurrent: usize,
    /// Also move containers with established TCP connections, keeping them (as `mig move
    /// --tcp-established`, docs/networking.md); without it such containers are left out of the
    /// plan, as their moves would be refused.
    #[arg(long)]
    pub tcp_established: bool,
    /// Print the plan and do nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print JSON (the API's types, docs/api.md) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The pure planner: no I/O, unit-tested.
pub mod plan {
    use serde::Serialize;

    /// One host's running containers and their memory.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize)]
    pub struct HostLoad {
        pub host: String,
        /// (container name, memory bytes) of the containers that may move.
        pub containers: Vec<(String, u64)>,
        /// Memory bytes of the running containers that stay (left out of the plan).
        pub staying: u64,
    }

    impl HostLoad {
        pub fn total(&self) -> u64 {
            self.staying + self.containers.iter().map(|(_, m)| m).sum::<u64>()
        }
    }

    /// One planned move.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize)]
    pub struct Move {
        pub container: String,
        pub from: String,
        pub to: String,
        pub memory_bytes: u64,
        /// Moves of the same wave run at the same time.
        pub wave: usize,
    }

    /// The largest minus the smallest host load.
    pub fn spread(hosts: &[HostLoad]) -> u64 {
        let loads = hosts.iter().map(HostLoad::total);
        let (min, max) = loads.fold((u64::MAX, 0), |(a, b), l| (a.min(l), b.max(l)));
        max.saturating_sub(min.min(max))
    }

    /// Greedy: while moves remain, take the most and the least loaded hosts (largest spread
    /// first) and move the container of the first that best narrows their gap (one that is
    /// smaller than the gap, closest to half of it). A container moves at most once. Moves are
    /// grouped in waves of at most `max_concurrent`, none sharing a host.
    /// The least a move must narrow the gap between its two hosts to be worth its downtime
    /// (QA of session 20: two moves of containers of 0.1 MiB were planned).
    pub const MIN_GAIN: u64 = 4 << 20;

    pub fn plan(hosts: &[HostLoad], max_moves: usize, max_concurrent: usize) -> Vec<Move> {
        let mut hosts = hosts.to_vec();
        let mut moves: Vec<Move> = Vec::new();
        let mut moved: Vec<String> = Vec::new();
        while moves.len() < max_moves && hosts.len() >= 2 {
            let lo = (0..hosts.len())
                .min_by_key(|&i| hosts[i].total())
                .unwrap_or(0);
            // The most loaded host with a container worth moving to the least loaded one: the
            // busiest may hold only containers that stay (QA of session 29: one with a TCP
            // connection there stopped the whole plan).
            let mut by_load: Vec<usize> = (0..hosts.len()).filter(|&i| i != lo).collect();
            by_load.sort_by_key(|&i| std::cmp::Reverse(hosts[i].total()));
            let pick = by_load.into_iter().find_map(|hi| {
                let gap = hosts[hi].total().saturating_sub(hosts[lo].total());
                // Moving `m` from `hi` to the least loaded host narrows their gap by this much.
                let gain = |m: u64| gap - gap.abs_diff(2 * m);
                hosts[hi]
                    .containers
                    .iter()
                    .enumerate()
                    .filter(|(_, (n, m))| {
                        *m > 0 && *m < gap && gain(*m) >= MIN_GAIN && !moved.contains(n)
                    })
                    .min_by_key(|(_, (_, m))| (gap / 2).abs_diff(*m))
                    .map(|(ci, _)| (hi, ci))
            });
            let Some((hi, ci)) = pick else { break };
            let (name, mem) = hosts[hi].containers.remove(ci);
            hosts[lo].containers.push((name.clone(), mem));
            moved.push(name.clone());
            moves.push(Move {
                container: name,
                from: hosts[hi].host.clone(),
                to: hosts[lo].host.clone(),
                memory_bytes: mem,
                wave: 0,
            });
        }
        // Waves: in order, each move joins the first wave after its predecessors' that has room
        // and does not touch its hosts.
        let max_concurrent = max_concurrent.max(1);
        let mut waves: Vec<Vec<usize>> = Vec::new();
        for i in 0..moves.len() {
            let m = &moves[i];
            let mut w = 0;
            loop {
                if w == waves.len() {
                    waves.push(Vec::new());
                }
                let busy = waves[w].iter().any(|&j| {
                    let o = &moves[j];
                    o.from == m.from || o.from == m.to || o.to == m.from || o.to == m.to
                });
                // A later move may depend on an earlier one's result on the same hosts: keep
                // order by never placing it before a wave that uses its hosts.
                if !busy
                    && waves[w].len() < max_concurrent
                    && !waves[w + 1..].iter().flatten().any(|&j| {
                        let o = &moves[j];
                        o.from == m.from || o.from == m.to || o.to == m.from || o.to == m.to
                    })
                {
                    break;
                }
                w += 1;
            }
            waves[w].push(i);
        }
        for (w, ids) in waves.iter().enumerate() {
            for &i in ids {
                moves[i].wave = w;
            }
        }
        moves.sort_by_key(|m| m.wave);
        moves
    }

    /// The loads after `moves`.
    pub fn apply(hosts: &[HostLoad], moves: &[Move]) -> Vec<HostLoad> {
        let mut hosts = hosts.to_vec();
        for m in moves {
            let Some(fi) = hosts.iter().position(|h| h.host == m.from) else {
                continue;
            };
            let Some(ci) = hosts[fi]
                .containers
                .iter()
                .position(|(n, _)| *n == m.container)
            else {
                continue;
            };
            let c = hosts[fi].containers.remove(ci);
            if let Some(t) = hosts.iter_mut().find(|h| h.host == m.to) {
                t.containers.push(c);
            }
        }
        hosts
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// Host `name` with containers of `cs` MiB.
        fn h(name: &str, cs: &[u64]) -> HostLoad {
            HostLoad {
                host: name.into(),
                containers: cs
                    .iter()
                    .enumerate()
                    .map(|(i, m)| (format!("{name}-{i}"), *m << 20))
                    .collect(),
                staying: 0,
            }
        }

        #[test]
        fn evens_out_uneven_load() {
            let hosts = vec![h("a", &[100, 100, 100, 100]), h("b", &[]), h("c", &[50])];
            assert_eq!(spread(&hosts), 400 << 20);
            let p = plan(&hosts, 10, 1);
            let after = apply(&hosts, &p);
            assert!(spread(&after) <= 100 << 20, "{p:?} {after:?}");
            assert!(p.iter().all(|m| m.from == "a"));
            // One move per wave when max_concurrent is 1.
            for (i, m) in p.iter().enumerate() {
                assert_eq!(m.wave, i);
            }
            // Every container still exists exactly once.
            let n: usize = after.iter().map(|h| h.containers.len()).sum();
            assert_eq!(n, 5);
        }

        #[test]
        fn bounded_and_stable() {
            let hosts = vec![h("a", &[100, 100, 100, 100]), h("b", &[]), h("c", &[])];
            assert_eq!(plan(&hosts, 1, 1).len(), 1);
            assert!(plan(&hosts, 0, 1).is_empty());
            // Already even: nothing to do; a single big container is never bounced around.
            assert!(plan(&[h("a", &[100]), h("b", &[100])], 5, 1).is_empty());
            assert!(plan(&[h("a", &[300]), h("b", &[0])], 5, 1).is_empty());
            assert!(plan(&[h("a", &[100])], 5, 1).is_empty());
        }

        #[test]
        fn waves_do_not_share_hosts() {
            let hosts = vec![
                h("a", &[100, 100]),
                h("b", &[100, 100]),
                h("c", &[]),
                h("d", &[]),
            ];
            let p = plan(&hosts, 2, 2);
            assert_eq!(p.len(), 2);
            assert_eq!(p[0].wave, 0);
            assert_eq!(p[1].wave, 0, "{p:?}");
            let p1 = plan(&hosts, 2, 1);
            assert_eq!(p1[1].wave, 1);
        }

        /// Moves that would narrow a gap by less than [`MIN_GAIN`] are not worth their downtime.
        /// The busiest host holds only a container that stays: the next one's move is planned.
        #[test]
        fn a_busiest_host_with_nothing_movable_does_not_stop_the_plan() {
            let mut b = h("b", &[]);
            b.staying = 40 << 20;
            let hosts = vec![h("a", &[15, 15]), b, h("c", &[])];
            let p = plan(&hosts, 5, 1);
            assert!(!p.is_empty(), "{p:?}");
            assert_eq!((p[0].from.as_str(), p[0].to.as_str()), ("a", "c"));
            assert!(spread(&apply(&hosts, &p)) < spread(&hosts));
        }

        /// Containers that stay count in their host's load; only the others move.
        #[test]
        fn staying_containers_weigh_but_do_not_move() {
            let mut a = h("a", &[10]);
            a.staying = 200 << 20;
            let hosts = vec![a, h("b", &[100])];
            let p = plan(&hosts, 5, 1);
            assert_eq!(p.len(), 1, "{p:?}");
            // a is the heavier for what stays on it: its one movable container goes.
            assert_eq!((p[0].container.as_str(), p[0].from.as_str()), ("a-0", "a"));
            assert_eq!(spread(&hosts), 110 << 20);
        }

        #[test]
        fn tiny_moves_are_not_planned() {
            let tiny = vec![
                HostLoad {
                    host: "a".into(),
                    containers: vec![("x".into(), 100 << 10), ("y".into(), 100 << 10)],
                    staying: 0,
                },
                h("b", &[]),
            ];
            assert!(plan(&tiny, 5, 1).is_empty());
        }
    }
}

/// One host the rebalancer talks to.
#[derive(Debug, Clone)]
struct Target {
    /// The agent's name (from `info`).
    name: String,
    socket: PathBuf,
    fingerprint: Option<String>,
}

/// What `--json` prints.
#[derive(Debug, Serialize)]
struct Report {
    before: BTreeMap<String, u64>,
    spread_before: u64,
    plan: Vec<plan::Move>,
    dry_run: bool,
    /// Containers left out of the plan: those with established TCP connections, without
    /// `--tcp-established`.
    left_out: Vec<LeftOut>,
    /// Per move: `committed` or the error.
    outcomes: Vec<String>,
    after: BTreeMap<String, u64>,
    spread_after: u64,
}

fn resolve_targets(cli: &Cli, a: &RebalanceArgs) -> Result<Vec<PathBuf>, CliError> {
    let lab = a.lab.clone().unwrap_or_else(crate::lab::lab_name_from_env);
    let lab_err = |e| CliError::Lab(Box::new(e));
    if a.hosts.is_empty() {
        let _ = cli;
        return Ok(crate::lab::status(&lab)
            .map_err(lab_err)?
            .into_iter()
            .map(|h| h.socket)
            .collect());
    }
    a.hosts
        .iter()
        .map(|h| {
            if h.starts_with('/') {
                Ok(PathBuf::from(h))
            } else {
                crate::lab::find_host(&lab, h)
                    .map(|h| h.socket)
                    .map_err(lab_err)
            }
        })
        .collect()
}

/// A running container the plan leaves where it is.
#[derive(Debug, Serialize)]
struct LeftOut {
    container: String,
    host: String,
    /// Its established TCP connections (a move needs `--tcp-established`).
    tcp_established: u32,
}

/// What [`loads`] found on the hosts.
struct Loads {
    /// Each host's running containers that may move, and their memory.
    hosts: Vec<plan::HostLoad>,
    /// The moves under way, in words.
    unsettled: Vec<String>,
    /// Running containers that cannot move.
    left_out: Vec<LeftOut>,
}

/// Each host's running containers and their memory, and the moves under way on the hosts in
/// words (`the move of m2 from host-b to host-a`): a container being moved is running on
/// neither host (QA of session 26: a rebalance during another move moved a container the wrong
/// way and made the spread worse). Without `tcp_established`, containers with established TCP
/// connections are left out, named: their moves would be refused (QA of session 29: the plan
/// chose one, and the rebalance failed every time).
async fn loads(targets: &[Target], tcp_established: bool) -> Result<Loads, CliError> {
    let mut out = Vec::new();
    let mut unsettled = Vec::new();
    let mut left_out = Vec::new();
    // What a move carries and what the host cannot reclaim: anonymous and shared memory, not
    // the page cache the cgroup is also charged for.
    let memory = |c: &crate::api::ContainerSummary| {
        c.usage
            .as_ref()
            .map(|u| crate::migration::modes::checkpoint_memory(u).0)
            .unwrap_or(0)
    };
    for t in targets {
        let mut c = Client::connect(&t.socket).await?;
        let listed = c.list(false).await?;
        for s in &listed {
            if let Some(m) = &s.moving {
                unsettled.push(format!(
                    "the move of {} from {} to {}",
                    s.name, t.name, m.peer
                ));
            } else if s.in_doubt.is_some() {
                unsettled.push(format!(
                    "the in-doubt move of {} on {} (`mig move --resolve {}` there settles it)",
                    s.name, t.name, s.name
                ));
            } else if s.memory_arriving {
                unsettled.push(format!("the move of {} into {}", s.name, t.name));
            } else if s.state != crate::api::ContainerState::Running {
                let state = s.state.as_str();
                unsettled.push(format!("a change of {} on {} ({state})", s.name, t.name));
            }
        }
        let mut staying = 0;
        let containers = listed
            .into_iter()
            .filter(|c| c.state == crate::api::ContainerState::Running)
            .filter(|c| match c.tcp_established {
                Some(n) if n > 0 && !tcp_established => {
                    left_out.push(LeftOut {
                        container: c.name.clone(),
                        host: t.name.clone(),
                        tcp_established: n,
                    });
                    staying += memory(c);
                    false
                }
                _ => true,
            })
            .map(|c| {
                let m = memory(&c);
                (c.name, m)
            })
            .collect();
        out.push(plan::HostLoad {
            host: t.name.clone(),
            containers,
            staying,
        });
    }
    Ok(Loads {
        hosts: out,
        unsettled,
        left_out,
    })
}

/// Runs one move: on the source, to the pinned peer whose fingerprint is the destination's.
async fn run_move(
    from: &Target,
    to: &Target,
    m: &plan::Move,
    tcp_established: bool,
) -> Result<(), CliError> {
    let mut c = Client::connect(&from.socket).await?;
    let peer = match &to.fingerprint {
        Some(fp) => c
            .peer_list()
            .await?
            .into_iter()
            .find(|p| &p.fingerprint == fp)
            .map(|p| p.name)
            .unwrap_or_else(|| to.name.clone()),
        None => to.name.clone(),
    };
    let id = c
        .move_start_opts(&m.container, &peer, tcp_established, Default::default())
        .await?;
    let s = c.move_wait(&id, Duration::from_millis(200)).await?;
    match s.error {
        None => Ok(()),
        Some(e) => Err(CliError::Client(crate::client::ClientError::Api(e))),
    }
}

/// The text `mig rebalance` prints after its moves' lines (`moved ...`, printed as each ends):
/// what it left out, the plan (`--dry-run`), each host's memory before and after (planned with
/// `--dry-run`), and the spread. The memory came unlabelled after the moves, from before them,
/// and read as their result (QA of session 32, F5).
fn text(report: &Report) -> String {
    let mib = |b: u64| format!("{:.1} MiB", b as f64 / (1 << 20) as f64);
    let planned = if report.dry_run { " (planned)" } else { "" };
    let mut s = String::new();
    for c in &report.left_out {
        s.push_str(&format!(
            "left out: {} on {} ({} established TCP connection(s); --tcp-established moves it)\n",
            c.container, c.host, c.tcp_established
        ));
    }
    if report.dry_run {
        for m in &report.plan {
            s.push_str(&format!(
                "plan (wave {}): move {} {} -> {} ({})\n",
                m.wave,
                m.container,
                m.from,
                m.to,
                mib(m.memory_bytes)
            ));
        }
    }
    s.push_str(&format!("memory per host, before -> after{planned}:\n"));
    let mut hosts: Vec<&String> = report.before.keys().chain(report.after.keys()).collect();
    hosts.sort();
    hosts.dedup();
    for h in hosts {
        // A host read only once (none so far: every read covers every host) shows `-`.
        let at = |m: &BTreeMap<String, u64>| m.get(h).map_or("-".to_owned(), |b| mib(*b));
        s.push_str(&format!(
            "  {h}: {} -> {}\n",
            at(&report.before),
            at(&report.after)
        ));
    }
    s.push_str(&format!(
        "spread {} -> {}{planned}\n",
        mib(report.spread_before),
        mib(report.spread_after),
    ));
    s
}

/// `mig rebalance`.
pub(super) async fn run(cli: &Cli, a: &RebalanceArgs) -> Result<u8, CliError> {
    let mut targets = Vec::new();
    for socket in resolve_targets(cli, a)? {
        let mut c = Client::connect(&socket).await?;
        let name = c.info().await?.name;
        let fingerprint = c.identity().await.ok().map(|i| i.fingerprint);
        targets.push(Target {
            name,
            socket,
            fingerprint,
        });
    }
    let Loads {
        hosts: before,
        unsettled,
        left_out,
    } = loads(&targets, a.tcp_established).await?;
    if let Some(first) = unsettled.first() {
        let what = match unsettled.len() {
            1 => first.clone(),
            n => format!("{first} (and {} more)", n - 1),
        };
        if !a.dry_run {
            return Err(CliError::MovesUnderWay { what });
        }
        eprintln!("mig: {what} is under way: this plan leaves it out");
    }
    let moves = plan::plan(&before, a.max_moves, a.max_concurrent);
    let by_name = |n: &str| targets.iter().find(|t| t.name == n).cloned();
    // One per move of the plan, at its index.
    let mut outcomes = Vec::new();
    if !a.dry_run {
        outcomes = vec![String::new(); moves.len()];
        let waves = moves.iter().map(|m| m.wave).max().map_or(0, |w| w + 1);
        for w in 0..waves {
            let wave: Vec<(usize, &plan::Move)> = moves
                .iter()
                .enumerate()
                .filter(|(_, m)| m.wave == w)
                .collect();
            let runs = wave.iter().map(|&(_, m)| {
                let (from, to) = (by_name(&m.from), by_name(&m.to));
                async move {
                    match (from, to) {
                        (Some(f), Some(t)) => run_move(&f, &t, m, a.tcp_established).await,
                        _ => Ok(()),
                    }
                }
            });
            for (&(i, m), r) in wave.iter().zip(futures::future::join_all(runs).await) {
                let o = match r {
                    Ok(()) => "committed".to_owned(),
                    Err(e) => format!("failed: {e}"),
                };
                if !a.json {
                    out(&format!(
                        "moved {} {} -> {}: {o}\n",
                        m.container, m.from, m.to
                    ))?;
                }
                outcomes[i] = o;
            }
        }
    }
    let after = if a.dry_run {
        plan::apply(&before, &moves)
    } else {
        loads(&targets, a.tcp_established).await?.hosts
    };
    let total = |h: &[plan::HostLoad]| -> BTreeMap<String, u64> {
        h.iter().map(|h| (h.host.clone(), h.total())).collect()
    };
    let report = Report {
        before: total(&before),
        spread_before: plan::spread(&before),
        plan: moves,
        dry_run: a.dry_run,
        left_out,
        outcomes,
        after: total(&after),
        spread_after: plan::spread(&after),
    };
    if a.json {
        json(&report)?;
    } else {
        out(&text(&report))?;
    }
    let failed = report.outcomes.iter().filter(|o| *o != "committed").count();
    if failed > 0 {
        return Err(CliError::Partial {
            failed,
            total: report.outcomes.len(),
        });
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mib(n: u64) -> u64 {
        n << 20
    }

    fn report(dry_run: bool) -> Report {
        let hosts = |a, b, c| {
            BTreeMap::from([
                ("host-a".to_owned(), a),
                ("host-b".to_owned(), b),
                ("host-c".to_owned(), c),
            ])
        };
        Report {
            before: hosts(mib(257), mib(8), 0),
            spread_before: mib(257),
            plan: vec![plan::Move {
                container: "m5".into(),
                from: "host-a".into(),
                to: "host-c".into(),
                memory_bytes: mib(200),
                wave: 0,
            }],
            dry_run,
            left_out: vec![LeftOut {
                container: "web".into(),
                host: "host-b".into(),
                tcp_established: 1,
            }],
            outcomes: if dry_run {
                vec![]
            } else {
                vec!["committed".into()]
            },
            after: hosts(mib(57), mib(8), mib(200)),
            spread_after: mib(192),
        }
    }

    /// Each host's memory is labelled, from before and after the moves (QA of session 32, F5:
    /// the figures from before came unlabelled after the `moved` lines).
    #[test]
    fn text_gives_each_hosts_memory_before_and_after() {
        assert_eq!(
            text(&report(false)),
            "left out: web on host-b (1 established TCP connection(s); --tcp-established moves it)
memory per host, before -> after:
  host-a: 257.0 MiB -> 57.0 MiB
  host-b: 8.0 MiB -> 8.0 MiB
  host-c: 0.0 MiB -> 200.0 MiB
spread 257.0 MiB -> 192.0 MiB
"
        );
        assert_eq!(
            text(&report(true)),
            "left out: web on host-b (1 established TCP connection(s); --tcp-established moves it)
plan (wave 0): move m5 host-a -> host-c (200.0 MiB)
memory per host, before -> after (planned):
  host-a: 257.0 MiB -> 57.0 MiB
  host-b: 8.0 MiB -> 8.0 MiB
  host-c: 0.0 MiB -> 200.0 MiB
spread 257.0 MiB -> 192.0 MiB (planned)
"
        );
        // A host in one reading only is shown with `-` on the other side, not dropped.
        let mut r = report(false);
        r.after.remove("host-b");
        assert!(
            text(&r).contains("\n  host-b: 8.0 MiB -> -\n"),
            "{}",
            text(&r)
        );
    }
}
