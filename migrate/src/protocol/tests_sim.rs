//! The simulated link and host world of the in-memory pair, with injectable faults.

use super::super::*;
use crate::wire::{MigrationMode, Phase, Prepare};
use mig_runtime::image::{Image, ImageConfig};
use mig_runtime::pidmap::PidEntry;
use mig_runtime::spec::{ContainerSpec, ImageRef, Limits, ProcessSpec};
use std::collections::VecDeque;

pub(super) const ID: &str = "0123456789abcdef0123456789abcdef";

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
            net: None,
        },
        image,
        criu_version: "4.1.1".into(),
        kernel: "6.18".into(),
        bytes_estimate: 1 << 20,
        mode: MigrationMode::PreCopy,
    }
}

#[derive(Debug, Default, Clone)]
pub(super) struct Faults {
    pub(super) refuse: bool,
    pub(super) presync_send_fail: bool,
    pub(super) final_send_fail: bool,
    pub(super) freeze_fail: bool,
    pub(super) dump_fail: bool,
    pub(super) bad_file: Option<Phase>,
    pub(super) files_missing: Option<Phase>,
    pub(super) restore_fail: bool,
    pub(super) resume_fail: bool,
    pub(super) thaw_fail: bool,
    pub(super) cleanup_fail: bool,
    pub(super) destroy_fail: bool,
    /// Fail the n-th journal write of this role (0-based).
    pub(super) journal_fail: Option<(Role, usize)>,
    /// Deliver this many messages, then the link is cut (both sides see LinkLost).
    pub(super) cut_after: Option<usize>,
    /// Deliver this many messages, then drop everything silently (both sides time out).
    pub(super) blackhole_after: Option<usize>,
}

#[derive(Debug)]
pub(super) struct World {
    pub(super) src_running: bool,
    pub(super) src_exists: bool,
    pub(super) dst_exists: bool,
    pub(super) dst_running: bool,
    pub(super) src_journal: Vec<JournalState>,
    pub(super) dst_journal: Vec<JournalState>,
    pub(super) trace: Vec<&'static str>,
}

impl World {
    pub(super) fn new() -> World {
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

pub(super) struct Sim {
    pub(super) src: SourceMachine,
    pub(super) dst: DestMachine,
    pub(super) w: World,
    pub(super) f: Faults,
    pub(super) to_dst: VecDeque<Message>,
    pub(super) to_src: VecDeque<Message>,
    pub(super) delivered: usize,
    pub(super) link_up: bool,
    pub(super) blackhole: bool,
    pub(super) lost_src: bool,
    pub(super) lost_dst: bool,
}

impl Sim {
    pub(super) fn new(f: Faults) -> Sim {
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

    pub(super) fn transmit(&mut self, m: Message, to_dst: bool) {
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

    pub(super) fn journal(&mut self, role: Role, r: JournalRecord) -> Result<(), String> {
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

    pub(super) fn drain_src(&mut self) -> bool {
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

    pub(super) fn src_action(&mut self, a: SourceAction) -> SourceInput {
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

    pub(super) fn drain_dst(&mut self) -> bool {
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

    pub(super) fn dst_action(&mut self, a: DestAction) -> DestInput {
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
    pub(super) fn run(&mut self) {
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
    pub(super) fn check_invariant(&self) {
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
    pub(super) fn resolve(&mut self) {
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
