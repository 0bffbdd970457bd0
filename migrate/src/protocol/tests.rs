//! Deterministic in-memory pair: both machines, a simulated link and a simulated host world with
//! injectable faults. Every run checks the one-live-copy invariant.

use super::*;
use crate::wire::{MigrationMode, Phase, Prepare, Resolution, SourceView};
use mig_runtime::image::{Image, ImageConfig};
use mig_runtime::pidmap::PidEntry;
use mig_runtime::spec::{ContainerSpec, ImageRef, Limits, ProcessSpec};
use std::collections::VecDeque;

const ID: &str = "0123456789abcdef0123456789abcdef";

pub(crate) fn prepare() -> Prepare {
    let image = Image {
        name: "busybox".into(),
        id: format!("sha256:{}", "a".repeat(64)),
        layers: vec![format!("sha256:{}", "b".repeat(64))],
        config: ImageConfig::default(),
        created: 1,
        size: 10,
    };
    Prepare {
        migration_id: ID.into(),
        spec: ContainerSpec {
            id: "f".repeat(32),
            name: "web".into(),
            image: ImageRef {
                name: image.name.clone(),
                id: image.id.clone(),
                layers: image.layers.clone(),
            },
            process: ProcessSpec {
                args: vec!["sleep".into(), "1000".into()],
                env: vec![],
                cwd: "/".into(),
                uid: 0,
                gid: 0,
            },
            hostname: "web".into(),
            limits: Limits::default(),
            userns: None,
        },
        image,
        criu_version: "4.1.1".into(),
        kernel: "6.18".into(),
        bytes_estimate: 1 << 20,
        mode: MigrationMode::PreCopy,
    }
}

#[derive(Debug, Default, Clone)]
struct Faults {
    refuse: bool,
    presync_send_fail: bool,
    final_send_fail: bool,
    freeze_fail: bool,
    dump_fail: bool,
    bad_file: Option<Phase>,
    files_missing: Option<Phase>,
    restore_fail: bool,
    resume_fail: bool,
    thaw_fail: bool,
    cleanup_fail: bool,
    destroy_fail: bool,
    /// Fail the n-th journal write of this role (0-based).
    journal_fail: Option<(Role, usize)>,
    /// Deliver this many messages, then the link is cut (both sides see LinkLost).
    cut_after: Option<usize>,
    /// Deliver this many messages, then drop everything silently (both sides time out).
    blackhole_after: Option<usize>,
}

#[derive(Debug)]
struct World {
    src_running: bool,
    src_exists: bool,
    dst_exists: bool,
    dst_running: bool,
    src_journal: Vec<JournalState>,
    dst_journal: Vec<JournalState>,
    trace: Vec<&'static str>,
}

impl World {
    fn new() -> World {
        World {
            src_running: true,
            src_exists: true,
            dst_exists: false,
            dst_running: false,
            src_journal: vec![],
            dst_journal: vec![],
            trace: vec![],
        }
    }
}

struct Sim {
    src: SourceMachine,
    dst: DestMachine,
    w: World,
    f: Faults,
    to_dst: VecDeque<Message>,
    to_src: VecDeque<Message>,
    delivered: usize,
    link_up: bool,
    blackhole: bool,
    lost_src: bool,
    lost_dst: bool,
}

impl Sim {
    fn new(f: Faults) -> Sim {
        Sim {
            src: SourceMachine::new(prepare(), Timeouts::default()),
            dst: DestMachine::new(Timeouts::default()),
            w: World::new(),
            f,
            to_dst: VecDeque::new(),
            to_src: VecDeque::new(),
            delivered: 0,
            link_up: true,
            blackhole: false,
            lost_src: false,
            lost_dst: false,
        }
    }

    fn transmit(&mut self, m: Message, to_dst: bool) {
        if self.f.cut_after == Some(self.delivered) && self.link_up {
            self.link_up = false;
            self.lost_src = true;
            self.lost_dst = true;
        }
        if self.f.blackhole_after == Some(self.delivered) {
            self.blackhole = true;
        }
        if !self.link_up || self.blackhole {
            return;
        }
        self.w.trace.push(m.name());
        if to_dst {
            self.to_dst.push_back(m);
        } else {
            self.to_src.push_back(m);
        }
        self.delivered += 1;
    }

    fn journal(&mut self, role: Role, r: JournalRecord) -> Result<(), String> {
        assert_eq!(r.role, role);
        assert_eq!(r.migration_id, ID);
        let list = match role {
            Role::Source => &mut self.w.src_journal,
            Role::Dest => &mut self.w.dst_journal,
        };
        if self.f.journal_fail == Some((role, list.len())) {
            self.f.journal_fail = None;
            return Err("disk full".into());
        }
        list.push(r.state);
        Ok(())
    }

    fn drain_src(&mut self) -> bool {
        let mut progressed = false;
        while let Some(o) = self.src.poll_output() {
            progressed = true;
            match o {
                Output::Send(m) => self.transmit(m, true),
                Output::Journal(r) => {
                    if let Err(detail) = self.journal(Role::Source, r) {
                        self.src.handle(SourceInput::JournalFailed { detail });
                    }
                }
                Output::Do(a) => {
                    let input = self.src_action(a);
                    self.src.handle(input);
                }
            }
        }
        progressed
    }

    fn src_action(&mut self, a: SourceAction) -> SourceInput {
        let fail = |d: &str| SourceInput::ActionFailed { detail: d.into() };
        match a {
            SourceAction::SendFiles {
                phase: Phase::Presync,
                missing_layers,
            } => {
                assert_eq!(missing_layers, vec![format!("sha256:{}", "b".repeat(64))]);
                if self.f.presync_send_fail {
                    return fail("stream reset");
                }
                SourceInput::FilesSent {
                    phase: Phase::Presync,
                    files: 2,
                    bytes: 100,
                }
            }
            SourceAction::SendFiles {
                phase: Phase::Final,
                ..
            } => {
                if self.f.final_send_fail {
                    return fail("stream reset");
                }
                SourceInput::FilesSent {
                    phase: Phase::Final,
                    files: 5,
                    bytes: 1000,
                }
            }
            SourceAction::Freeze => {
                self.w.src_running = false;
                if self.f.freeze_fail {
                    return fail("cgroup.freeze: timed out");
                }
                SourceInput::Frozen
            }
            SourceAction::Dump => {
                if self.f.dump_fail {
                    return fail("criu dump exited 1");
                }
                SourceInput::Dumped
            }
            SourceAction::Thaw => {
                if self.f.thaw_fail {
                    return fail("cgroup.freeze: io error");
                }
                if self.w.src_exists {
                    self.w.src_running = true;
                }
                SourceInput::Thawed
            }
            SourceAction::DestroySource => {
                assert!(!self.w.src_running, "destroying a running source");
                if self.f.destroy_fail {
                    return fail("rmdir: busy");
                }
                self.w.src_exists = false;
                SourceInput::Destroyed
            }
        }
    }

    fn drain_dst(&mut self) -> bool {
        let mut progressed = false;
        while let Some(o) = self.dst.poll_output() {
            progressed = true;
            match o {
                Output::Send(m) => self.transmit(m, false),
                Output::Journal(r) => {
                    if let Err(detail) = self.journal(Role::Dest, r) {
                        self.dst.handle(DestInput::JournalFailed { detail });
                    }
                }
                Output::Do(a) => {
                    let input = self.dst_action(a);
                    self.dst.handle(input);
                }
            }
        }
        progressed
    }

    fn dst_action(&mut self, a: DestAction) -> DestInput {
        let fail = |d: &str| DestInput::ActionFailed { detail: d.into() };
        match a {
            DestAction::CheckPrepare(p) => {
                assert_eq!(p.migration_id, ID);
                if self.f.refuse {
                    return DestInput::PrepareChecked(Err((
                        crate::wire::RefuseReason::NameClash,
                        "name web exists".into(),
                    )));
                }
                DestInput::PrepareChecked(Ok(p.image.layers.clone()))
            }
            DestAction::AwaitFiles { phase, files, .. } => {
                assert!(files > 0);
                if self.f.bad_file == Some(phase) {
                    return DestInput::FileFailed {
                        detail: "digest mismatch".into(),
                    };
                }
                if self.f.files_missing == Some(phase) {
                    return fail("1 file missing");
                }
                DestInput::FilesReceived { phase }
            }
            DestAction::Restore => {
                if self.f.restore_fail {
                    return fail("criu restore exited 1");
                }
                self.w.dst_exists = true;
                DestInput::Restored {
                    pid_map: vec![PidEntry {
                        ns_pid: 1,
                        host_pid: 4242,
                        cmd: "sleep".into(),
                    }],
                }
            }
            DestAction::Resume => {
                assert!(self.w.dst_exists, "resuming without a restored copy");
                assert!(!self.w.src_running, "resuming while the source runs");
                if self.f.resume_fail {
                    return fail("thaw failed");
                }
                self.w.dst_running = true;
                DestInput::Resumed
            }
            DestAction::Cleanup => {
                if self.f.cleanup_fail {
                    return fail("umount: busy");
                }
                self.w.dst_exists = false;
                self.w.dst_running = false;
                DestInput::CleanedUp
            }
        }
    }

    /// Runs until both machines are finished.
    fn run(&mut self) {
        for _ in 0..1000 {
            let mut progressed = self.drain_src() | self.drain_dst();
            if let Some(m) = self.to_dst.pop_front() {
                self.dst.handle(DestInput::Received(m));
                progressed = true;
            } else if let Some(m) = self.to_src.pop_front() {
                self.src.handle(SourceInput::Received(m));
                progressed = true;
            }
            if progressed {
                continue;
            }
            if self.lost_src {
                self.lost_src = false;
                self.src.handle(SourceInput::LinkLost);
                continue;
            }
            if self.lost_dst {
                self.lost_dst = false;
                self.dst.handle(DestInput::LinkLost);
                continue;
            }
            // Quiet: whoever waits for the peer times out.
            let mut timed_out = false;
            if self.src.timeout().is_some() && !self.src.is_finished() {
                self.src.handle(SourceInput::TimedOut);
                timed_out = true;
            }
            if self.dst.timeout().is_some() && !self.dst.is_finished() {
                self.dst.handle(DestInput::TimedOut);
                timed_out = true;
            }
            if !timed_out {
                assert!(
                    self.src.is_finished(),
                    "source stuck in {:?}",
                    self.src.state()
                );
                assert!(
                    self.dst.is_finished(),
                    "dest stuck in {:?}",
                    self.dst.state()
                );
                return;
            }
        }
        panic!(
            "no convergence: {:?} / {:?}",
            self.src.state(),
            self.dst.state()
        );
    }

    /// Never two live copies; zero only when a side is in doubt or reports a failed rollback.
    fn check_invariant(&self) {
        let w = &self.w;
        assert!(!(w.src_running && w.dst_running), "two live copies: {w:?}");
        if !w.src_running && !w.dst_running {
            let reported = |o: Option<&Outcome>| {
                matches!(
                    o,
                    Some(Outcome::RolledBack {
                        rollback_error: Some(_),
                        ..
                    })
                )
            };
            assert!(
                *self.src.state() == SourceState::InDoubt
                    || *self.dst.state() == DestState::InDoubt
                    || reported(self.src.outcome())
                    || reported(self.dst.outcome()),
                "no live copy and nobody in doubt: {w:?} {:?} {:?}",
                self.src.state(),
                self.dst.state()
            );
        }
        if let (Some(s), Some(d)) = (self.src.outcome(), self.dst.outcome()) {
            assert_eq!(
                matches!(s, Outcome::Committed { .. }),
                matches!(d, Outcome::Committed { .. }),
                "outcomes disagree: {s:?} {d:?}"
            );
        }
    }

    /// Reconnects after an in-doubt end: both sides are rebuilt from their journals (as after a
    /// restart) and run a Resolve exchange.
    fn resolve(&mut self) {
        let src_last = self.w.src_journal.last().cloned().expect("source journal");
        let dst_last = self.w.dst_journal.last().cloned();
        self.src = SourceMachine::recover(ID, &src_last, Timeouts::default());
        self.dst = DestMachine::recover(ID, dst_last.as_ref(), Timeouts::default());
        self.f.cut_after = None;
        self.f.blackhole_after = None;
        self.link_up = true;
        self.blackhole = false;
        self.to_dst.clear();
        self.to_src.clear();
        self.drain_src();
        self.drain_dst();
        self.src.handle(SourceInput::Reconnected);
        self.run();
    }
}

fn run(f: Faults) -> Sim {
    let mut sim = Sim::new(f);
    sim.src.start();
    sim.run();
    sim.check_invariant();
    sim
}

fn rolled_back(o: Option<&Outcome>) -> Option<(Cause, Option<String>)> {
    match o {
        Some(Outcome::RolledBack {
            cause,
            rollback_error,
            ..
        }) => Some((cause.clone(), rollback_error.clone())),
        _ => None,
    }
}

#[test]
fn happy_path_commits() {
    let sim = run(Faults::default());
    assert_eq!(
        sim.w.trace,
        [
            "prepare",
            "prepare-ok",
            "transfer-done",
            "transfer-ok",
            "frozen",
            "dump-done",
            "transfer-done",
            "restored",
            "commit",
            "committed"
        ]
    );
    assert!(matches!(
        sim.src.outcome(),
        Some(Outcome::Committed {
            cleanup_error: None
        })
    ));
    assert!(matches!(
        sim.dst.outcome(),
        Some(Outcome::Committed {
            cleanup_error: None
        })
    ));
    assert!(sim.w.dst_running && !sim.w.src_exists);
    use JournalState as J;
    assert_eq!(
        sim.w.src_journal,
        [J::Preparing, J::Frozen, J::CommitSent, J::Committed]
    );
    assert_eq!(sim.w.dst_journal, [J::Preparing, J::Restored, J::Committed]);
    assert_eq!(sim.src.dest_pid_map()[0].host_pid, 4242);
}

#[test]
fn refusal_changes_nothing() {
    let sim = run(Faults {
        refuse: true,
        ..Default::default()
    });
    assert!(sim.w.src_running && !sim.w.dst_exists);
    assert!(matches!(
        rolled_back(sim.src.outcome()),
        Some((Cause::Refused(crate::wire::RefuseReason::NameClash), None))
    ));
}

#[test]
fn every_failure_before_commit_thaws_source_and_cleans_dest() {
    let cases: Vec<(Faults, AbortReason)> = vec![
        (
            Faults {
                presync_send_fail: true,
                ..Default::default()
            },
            AbortReason::SendFailed,
        ),
        (
            Faults {
                freeze_fail: true,
                ..Default::default()
            },
            AbortReason::FreezeFailed,
        ),
        (
            Faults {
                dump_fail: true,
                ..Default::default()
            },
            AbortReason::DumpFailed,
        ),
        (
            Faults {
                final_send_fail: true,
                ..Default::default()
            },
            AbortReason::SendFailed,
        ),
        (
            Faults {
                bad_file: Some(Phase::Presync),
                ..Default::default()
            },
            AbortReason::BadFile,
        ),
        (
            Faults {
                bad_file: Some(Phase::Final),
                ..Default::default()
            },
            AbortReason::BadFile,
        ),
        (
            Faults {
                files_missing: Some(Phase::Final),
                ..Default::default()
            },
            AbortReason::TransferIncomplete,
        ),
        (
            Faults {
                restore_fail: true,
                ..Default::default()
            },
            AbortReason::RestoreFailed,
        ),
        (
            Faults {
                resume_fail: true,
                ..Default::default()
            },
            AbortReason::ResumeFailed,
        ),
    ];
    for (f, reason) in cases {
        let sim = run(f.clone());
        assert!(sim.w.src_running, "{f:?}: source not running");
        assert!(!sim.w.dst_exists, "{f:?}: destination not cleaned");
        let (src_cause, src_err) = rolled_back(sim.src.outcome()).expect("source rolled back");
        let (dst_cause, dst_err) = rolled_back(sim.dst.outcome()).expect("dest rolled back");
        assert!(src_err.is_none() && dst_err.is_none());
        assert!(
            src_cause == Cause::Local(reason) || src_cause == Cause::Peer(reason),
            "{f:?}: {src_cause:?}"
        );
        assert!(dst_cause == Cause::Local(reason) || dst_cause == Cause::Peer(reason));
        assert!(!sim.w.trace.contains(&"committed"));
        assert_eq!(sim.w.src_journal.last(), Some(&JournalState::RolledBack));
        assert_eq!(sim.w.dst_journal.last(), Some(&JournalState::RolledBack));
    }
}

#[test]
fn rollback_errors_travel_with_the_primary_error() {
    let sim = run(Faults {
        dump_fail: true,
        thaw_fail: true,
        ..Default::default()
    });
    let (cause, err) = rolled_back(sim.src.outcome()).unwrap();
    assert_eq!(cause, Cause::Local(AbortReason::DumpFailed));
    assert!(err.unwrap().contains("thaw"));
    assert!(matches!(
        sim.w.src_journal.last(),
        Some(JournalState::RollbackFailed { .. })
    ));

    let sim = run(Faults {
        restore_fail: true,
        cleanup_fail: true,
        ..Default::default()
    });
    assert!(sim.w.src_running);
    let (cause, err) = rolled_back(sim.dst.outcome()).unwrap();
    assert_eq!(cause, Cause::Local(AbortReason::RestoreFailed));
    assert!(err.unwrap().contains("cleanup"));
}

#[test]
fn resume_and_cleanup_failing_leaves_both_in_doubt() {
    // The destination's copy may be half-running: it must not tell the source to thaw.
    let sim = run(Faults {
        resume_fail: true,
        cleanup_fail: true,
        ..Default::default()
    });
    assert!(!sim.w.src_running && sim.w.src_exists);
    assert_eq!(*sim.src.state(), SourceState::InDoubt);
    assert_eq!(*sim.dst.state(), DestState::InDoubt);
}

#[test]
fn destroy_failure_is_reported_after_commit() {
    let sim = run(Faults {
        destroy_fail: true,
        ..Default::default()
    });
    assert!(sim.w.dst_running);
    assert!(matches!(
        sim.src.outcome(),
        Some(Outcome::Committed {
            cleanup_error: Some(_)
        })
    ));
}

/// The number of messages of the happy path.
const MESSAGES: usize = 10;

#[test]
fn link_cut_after_every_message() {
    for k in 0..MESSAGES {
        let mut sim = run(Faults {
            cut_after: Some(k),
            ..Default::default()
        });
        let in_doubt = *sim.src.state() == SourceState::InDoubt;
        // The commit window is after "restored" (message 8) was delivered and before
        // "committed" (message 10) arrived.
        match k {
            0..=6 => {
                assert!(
                    sim.w.src_running && !sim.w.dst_exists,
                    "cut {k}: {:?}",
                    sim.w
                );
                assert!(!in_doubt);
            }
            7 => {
                // Restored was lost: the source rolled back, the destination cannot know.
                assert!(sim.w.src_running && sim.w.dst_exists && !sim.w.dst_running);
                assert_eq!(*sim.dst.state(), DestState::InDoubt);
                sim.resolve();
                sim.check_invariant();
                assert!(
                    sim.w.src_running && !sim.w.dst_exists,
                    "cut {k}: {:?}",
                    sim.w
                );
            }
            8 | 9 => {
                assert!(in_doubt, "cut {k}: source {:?}", sim.src.state());
                assert_eq!(
                    *sim.dst.state(),
                    if k == 8 {
                        DestState::InDoubt
                    } else {
                        DestState::Done(Outcome::Committed {
                            cleanup_error: None,
                        })
                    }
                );
                assert!(sim.w.src_exists && !sim.w.src_running);
                sim.resolve();
                sim.check_invariant();
                // Commit was decided by the source: resolution completes the move.
                assert!(
                    sim.w.dst_running && !sim.w.src_exists,
                    "cut {k}: {:?}",
                    sim.w
                );
            }
            _ => unreachable!(),
        }
    }
    // Cut after the last message: nothing to lose.
    let sim = run(Faults {
        cut_after: Some(MESSAGES),
        ..Default::default()
    });
    assert!(sim.w.dst_running && !sim.w.src_exists);
}

#[test]
fn silent_peer_after_every_message_times_out_safely() {
    for k in 0..MESSAGES {
        let mut sim = run(Faults {
            blackhole_after: Some(k),
            ..Default::default()
        });
        if *sim.src.state() == SourceState::InDoubt || *sim.dst.state() == DestState::InDoubt {
            assert!(k >= 7, "in doubt outside the commit window at {k}");
            sim.resolve();
            sim.check_invariant();
            assert!(
                sim.w.src_running ^ sim.w.dst_running,
                "cut {k}: {:?}",
                sim.w
            );
        } else {
            assert!(
                sim.w.src_running && !sim.w.dst_exists,
                "cut {k}: {:?}",
                sim.w
            );
        }
    }
}

#[test]
fn cuts_combined_with_failures() {
    let faults = [
        Faults {
            restore_fail: true,
            ..Default::default()
        },
        Faults {
            resume_fail: true,
            ..Default::default()
        },
        Faults {
            bad_file: Some(Phase::Final),
            ..Default::default()
        },
        Faults {
            dump_fail: true,
            ..Default::default()
        },
    ];
    for f in faults {
        for k in 0..MESSAGES {
            let mut sim = run(Faults {
                cut_after: Some(k),
                ..f.clone()
            });
            if *sim.src.state() == SourceState::InDoubt || *sim.dst.state() == DestState::InDoubt {
                sim.resolve();
                sim.check_invariant();
            }
        }
    }
}

#[test]
fn journal_failure_at_every_write() {
    for role in [Role::Source, Role::Dest] {
        for n in 0..4 {
            let mut sim = run(Faults {
                journal_fail: Some((role, n)),
                ..Default::default()
            });
            if *sim.src.state() == SourceState::InDoubt || *sim.dst.state() == DestState::InDoubt {
                sim.resolve();
                sim.check_invariant();
            }
            assert!(
                sim.w.src_running ^ sim.w.dst_running,
                "{role:?} {n}: {:?}",
                sim.w
            );
        }
    }
    // The commit decision cannot be recorded: Commit is never sent, the source thaws.
    let sim = run(Faults {
        journal_fail: Some((Role::Source, 2)),
        ..Default::default()
    });
    assert!(!sim.w.trace.contains(&"commit"));
    assert!(sim.w.src_running && !sim.w.dst_exists);
}

#[test]
fn resolution_rules() {
    // Source in doubt, destination has no record: undecided, both keep what they have.
    let mut src = SourceMachine::recover(ID, &JournalState::CommitSent, Timeouts::default());
    let mut dst = DestMachine::recover(ID, None, Timeouts::default());
    src.handle(SourceInput::Reconnected);
    let Some(Output::Send(m)) = src.poll_output() else {
        panic!()
    };
    dst.handle(DestInput::Received(m));
    let Some(Output::Send(reply)) = dst.poll_output() else {
        panic!()
    };
    assert!(matches!(
        reply,
        Message::Resolved {
            outcome: Resolution::Undecided,
            ..
        }
    ));
    src.handle(SourceInput::Received(reply));
    assert_eq!(*src.state(), SourceState::InDoubt);

    // Destination rolled back: the source thaws.
    let mut dst = DestMachine::recover(ID, Some(&JournalState::RolledBack), Timeouts::default());
    dst.handle(DestInput::Received(Message::Resolve {
        migration_id: ID.into(),
        source: SourceView::CommitSent,
    }));
    let Some(Output::Send(reply)) = dst.poll_output() else {
        panic!()
    };
    assert!(matches!(
        reply,
        Message::Resolved {
            outcome: Resolution::RolledBack,
            ..
        }
    ));
    src.handle(SourceInput::Reconnected);
    src.poll_output();
    src.handle(SourceInput::Received(reply));
    assert_eq!(src.poll_output(), Some(Output::Do(SourceAction::Thaw)));

    // Source rolled back, destination in doubt: the destination cleans up.
    let mut dst = DestMachine::recover(ID, Some(&JournalState::Restored), Timeouts::default());
    assert_eq!(*dst.state(), DestState::InDoubt);
    dst.handle(DestInput::Received(Message::Resolve {
        migration_id: ID.into(),
        source: SourceView::RolledBack,
    }));
    assert_eq!(dst.poll_output(), Some(Output::Do(DestAction::Cleanup)));
}

#[test]
fn operator_resolves_in_doubt() {
    let mut src = SourceMachine::recover(ID, &JournalState::InDoubt, Timeouts::default());
    src.handle(SourceInput::Operator(Resolution::RolledBack));
    assert_eq!(src.poll_output(), Some(Output::Do(SourceAction::Thaw)));
    let mut dst = DestMachine::recover(ID, Some(&JournalState::InDoubt), Timeouts::default());
    dst.handle(DestInput::Operator(Resolution::Committed));
    assert!(matches!(
        dst.poll_output(),
        Some(Output::Journal(JournalRecord {
            state: JournalState::Committed,
            ..
        }))
    ));
    assert_eq!(dst.poll_output(), Some(Output::Do(DestAction::Resume)));
}

#[test]
fn recovery_after_restart() {
    let mut src = SourceMachine::recover(ID, &JournalState::Frozen, Timeouts::default());
    assert_eq!(src.poll_output(), Some(Output::Do(SourceAction::Thaw)));
    let mut src = SourceMachine::recover(ID, &JournalState::Committed, Timeouts::default());
    assert!(matches!(src.poll_output(), Some(Output::Journal(_))));
    assert_eq!(
        src.poll_output(),
        Some(Output::Do(SourceAction::DestroySource))
    );
    let mut dst = DestMachine::recover(ID, Some(&JournalState::Preparing), Timeouts::default());
    assert_eq!(dst.poll_output(), Some(Output::Do(DestAction::Cleanup)));
}

#[test]
fn protocol_violation_aborts_before_commit() {
    let mut dst = DestMachine::new(Timeouts::default());
    dst.handle(DestInput::Received(Message::Commit));
    assert!(matches!(
        dst.poll_output(),
        Some(Output::Send(Message::Abort {
            reason: AbortReason::ProtocolViolation,
            ..
        }))
    ));
    let mut src = SourceMachine::new(prepare(), Timeouts::default());
    src.start();
    while src.poll_output().is_some() {}
    src.handle(SourceInput::Received(Message::Committed));
    assert!(matches!(
        src.poll_output(),
        Some(Output::Send(Message::Abort {
            reason: AbortReason::ProtocolViolation,
            ..
        }))
    ));
    while src.poll_output().is_some() {}
    assert!(src.is_finished());
}
