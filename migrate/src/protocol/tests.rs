//! Deterministic in-memory pair: both machines, a simulated link and a simulated host world with
//! injectable faults (`sim`). Every run checks the one-live-copy invariant.

use super::*;
use crate::wire::{DestView, Phase, Resolution, SourceView};
use sim::{prepare, Faults, Sim, ID};

#[path = "tests_sim.rs"]
mod sim;

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
    // The destination cannot record the commit: its copy, which never ran, is removed and the
    // source thaws at once, nothing in doubt.
    let sim = run(Faults {
        journal_fail: Some((Role::Dest, 2)),
        ..Default::default()
    });
    assert_ne!(*sim.src.state(), SourceState::InDoubt);
    assert!(sim.w.src_running && !sim.w.dst_exists, "{:?}", sim.w);
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

/// A source that rolled back tells its destination; one that answers it committed (an
/// operator decided there too, the other way) leaves the container on both hosts, which the
/// machine says (QA of session 27, F5: only a log line said so).
#[test]
fn a_rollback_answered_with_a_commit_is_reported() {
    for (dest, answer, both) in [
        (DestView::Committed, Resolution::Committed, true),
        (DestView::RolledBack, Resolution::RolledBack, false),
    ] {
        let mut src = SourceMachine::recover(ID, &JournalState::RolledBack, Timeouts::default());
        src.handle(SourceInput::Reconnected);
        assert!(matches!(
            src.poll_output(),
            Some(Output::Send(Message::Resolve {
                source: SourceView::RolledBack,
                ..
            }))
        ));
        src.handle(SourceInput::Received(Message::Resolved {
            migration_id: ID.into(),
            dest,
            outcome: answer,
        }));
        assert_eq!(src.both_run(), both);
        assert_eq!(src.notice_answer(), Some(answer));
    }
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

/// Every output queued so far: the actions, and the journal states.
fn drain_source(m: &mut SourceMachine) -> (Vec<SourceAction>, Vec<JournalState>) {
    let (mut actions, mut journal) = (Vec::new(), Vec::new());
    while let Some(o) = m.poll_output() {
        match o {
            Output::Do(a) => actions.push(a),
            Output::Journal(r) => journal.push(r.state),
            Output::Send(_) => {}
        }
    }
    (actions, journal)
}

/// The driver sends the message queued before an action (Frozen before the dump, DumpDone before
/// the final files); that send fails and the machine hears LinkLost while the action is still
/// queued. The queued action must not run, and a thaw that worked is a clean rollback, not a
/// rollback that "failed too" because of the moot action's failure.
#[test]
fn rollback_drops_actions_queued_before_it() {
    for at_dump in [false, true] {
        let mut m = SourceMachine::new(prepare(), Timeouts::default());
        m.start();
        drain_source(&mut m);
        m.handle(SourceInput::Received(Message::PrepareOk {
            missing_layers: Vec::new(),
        }));
        drain_source(&mut m);
        m.handle(SourceInput::FilesSent {
            phase: Phase::Presync,
            files: 1,
            bytes: 1,
        });
        drain_source(&mut m);
        m.handle(SourceInput::Received(Message::TransferOk {
            phase: Phase::Presync,
        }));
        assert_eq!(drain_source(&mut m).0, [SourceAction::Freeze]);
        m.handle(SourceInput::Frozen);
        if at_dump {
            assert_eq!(drain_source(&mut m).0, [SourceAction::Dump]);
            m.handle(SourceInput::Dumped);
        }
        assert!(matches!(m.poll_output(), Some(Output::Send(_))));
        m.handle(SourceInput::LinkLost);
        let (actions, _) = drain_source(&mut m);
        assert_eq!(actions, [SourceAction::Thaw], "at_dump {at_dump}");
        m.handle(SourceInput::Thawed);
        let (_, journal) = drain_source(&mut m);
        assert_eq!(journal, [JournalState::RolledBack]);
        assert_eq!(
            rolled_back(m.outcome()),
            Some((Cause::LinkLost, None)),
            "at_dump {at_dump}"
        );
    }
}
