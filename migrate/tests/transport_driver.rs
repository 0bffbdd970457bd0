//! The drivers and state machines over a real loopback QUIC connection, with in-test hosts whose
//! "containers" are files in temporary directories.

use mig_migrate::protocol::{Cause, JournalRecord, JournalState, Outcome, SourceMachine, Timeouts};
use mig_migrate::transport::{
    accept, connect, endpoint, locate, run_dest, run_source, AllowedPeers, DestHost, HostError,
    Identity, Located, OutgoingFile, Peer, Refusal, SourceHost,
};
use mig_migrate::wire::{AbortReason, FileHeader, FileKind, Hello, MigrationMode, Prepare};
use mig_runtime::image::{Image, ImageConfig};
use mig_runtime::pidmap::PidEntry;
use mig_runtime::spec::{ContainerSpec, ImageRef, Limits, ProcessSpec};
use rand::{RngCore, SeedableRng};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

const LAYER: &str = "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

fn prepare(id: &str) -> Prepare {
    let image = Image {
        name: "busybox".into(),
        id: format!("sha256:{}", "a".repeat(64)),
        layers: vec![LAYER.into()],
        config: ImageConfig::default(),
        created: 1,
        size: 10,
    };
    Prepare {
        migration_id: id.into(),
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
        bytes_estimate: 8 << 20,
        mode: MigrationMode::PreCopy,
    }
}

fn write_random(path: &Path, len: usize, seed: u64) {
    let mut data = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
}

fn err(s: &str) -> HostError {
    s.to_string().into()
}

/// The source's world: a "container" that is running, frozen or gone.
struct FakeSource {
    dir: PathBuf,
    calls: Mutex<Vec<&'static str>>,
    journal: Mutex<Vec<JournalState>>,
    state: Mutex<&'static str>,
    /// Presync rounds to send after the presync files (pre-copy), and the round that fails.
    rounds: Mutex<(u32, Option<u32>)>,
}

impl FakeSource {
    fn new(dir: &Path) -> FakeSource {
        write_random(&dir.join("layer.tar"), 1 << 20, 1);
        write_random(&dir.join("upper.tar"), 2 << 20, 2);
        FakeSource {
            dir: dir.to_path_buf(),
            calls: Mutex::new(vec![]),
            journal: Mutex::new(vec![]),
            state: Mutex::new("running"),
            rounds: Mutex::new((0, None)),
        }
    }
    fn call(&self, c: &'static str) {
        self.calls.lock().unwrap().push(c);
    }
}

/// Round `n`'s one file: (n × 256 KiB).
fn round_len(n: u32) -> usize {
    n as usize * (256 << 10)
}

impl SourceHost for FakeSource {
    async fn presync_files(&self, missing: &[String]) -> Result<Vec<OutgoingFile>, HostError> {
        self.call("presync");
        assert_eq!(missing, [LAYER]);
        Ok(vec![
            OutgoingFile {
                kind: FileKind::Layer,
                local: self.dir.join("layer.tar"),
                remote: LAYER.replace(':', "-"),
                sha256: None,
            },
            OutgoingFile {
                kind: FileKind::Presync,
                local: self.dir.join("upper.tar"),
                remote: "upper.tar".into(),
                sha256: None,
            },
        ])
    }
    async fn presync_round(&self, n: u32) -> Result<Option<Vec<OutgoingFile>>, HostError> {
        let (count, fail_at) = *self.rounds.lock().unwrap();
        if n > count {
            return Ok(None);
        }
        self.call("round");
        if fail_at == Some(n) {
            return Err(err("criu pre-dump exited 1"));
        }
        let p = self.dir.join(format!("rounds/{n}/pages-1.img"));
        write_random(&p, round_len(n), 100 + u64::from(n));
        Ok(Some(vec![OutgoingFile {
            kind: FileKind::Presync,
            local: p,
            remote: format!("rounds/{n}/pages-1.img"),
            sha256: None,
        }]))
    }
    async fn freeze(&self) -> Result<(), HostError> {
        self.call("freeze");
        *self.state.lock().unwrap() = "frozen";
        Ok(())
    }
    async fn dump(&self) -> Result<Vec<OutgoingFile>, HostError> {
        self.call("dump");
        let mut files = Vec::new();
        for i in 0..6u64 {
            let p = self.dir.join(format!("dump/pages-{i}.img"));
            write_random(&p, (i as usize + 1) << 20, 10 + i);
            files.push(OutgoingFile {
                kind: FileKind::Image,
                local: p,
                remote: format!("images/pages-{i}.img"),
                sha256: None,
            });
        }
        write_random(&self.dir.join("delta.tar"), 4096, 3);
        files.push(OutgoingFile {
            kind: FileKind::Delta,
            local: self.dir.join("delta.tar"),
            remote: "delta.tar".into(),
            sha256: None,
        });
        Ok(files)
    }
    async fn thaw(&self) -> Result<(), HostError> {
        self.call("thaw");
        *self.state.lock().unwrap() = "running";
        Ok(())
    }
    async fn destroy(&self) -> Result<(), HostError> {
        self.call("destroy");
        *self.state.lock().unwrap() = "gone";
        Ok(())
    }
    async fn journal(&self, r: &JournalRecord) -> Result<(), HostError> {
        self.journal.lock().unwrap().push(r.state.clone());
        Ok(())
    }
}

struct FakeDest {
    dir: PathBuf,
    restore_fails: bool,
    calls: Mutex<Vec<&'static str>>,
    journal: Mutex<Vec<JournalState>>,
    state: Mutex<&'static str>,
}

impl FakeDest {
    fn new(dir: &Path, restore_fails: bool) -> FakeDest {
        FakeDest {
            dir: dir.to_path_buf(),
            restore_fails,
            calls: Mutex::new(vec![]),
            journal: Mutex::new(vec![]),
            state: Mutex::new("none"),
        }
    }
    fn call(&self, c: &'static str) {
        self.calls.lock().unwrap().push(c);
    }
    fn mdir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }
}

impl DestHost for FakeDest {
    async fn check(&self, p: &Prepare) -> Result<Vec<String>, Refusal> {
        self.call("check");
        p.spec.validate().map_err(|e| Refusal {
            reason: mig_migrate::wire::RefuseReason::InvalidSpec,
            detail: e.to_string(),
        })?;
        Ok(p.image.layers.clone())
    }
    fn place_file(&self, id: &str, h: &FileHeader) -> Result<PathBuf, HostError> {
        let kind = match h.kind {
            FileKind::Layer => "layers",
            FileKind::Presync => "presync",
            FileKind::Image => "image",
            FileKind::Delta => "delta",
        };
        Ok(self.mdir(id).join(kind).join(&h.path))
    }
    async fn restore(&self, id: &str) -> Result<Vec<PidEntry>, HostError> {
        self.call("restore");
        if self.restore_fails {
            return Err(err("criu restore exited 1"));
        }
        let n = std::fs::read_dir(self.mdir(id).join("image/images"))?.count();
        assert_eq!(n, 6);
        *self.state.lock().unwrap() = "stopped";
        Ok(vec![PidEntry {
            ns_pid: 1,
            host_pid: 777,
            cmd: "sleep 1000".into(),
        }])
    }
    async fn resume(&self, _id: &str) -> Result<(), HostError> {
        self.call("resume");
        *self.state.lock().unwrap() = "running";
        Ok(())
    }
    async fn cleanup(&self, id: &str) -> Result<(), HostError> {
        self.call("cleanup");
        *self.state.lock().unwrap() = "none";
        match std::fs::remove_dir_all(self.mdir(id)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }
    async fn journal(&self, r: &JournalRecord) -> Result<(), HostError> {
        self.journal.lock().unwrap().push(r.state.clone());
        Ok(())
    }
    async fn load_journal(&self, _id: &str) -> Option<JournalState> {
        self.journal.lock().unwrap().last().cloned()
    }
    fn locate(&self, id: &str) -> Option<String> {
        self.call("locate");
        (id == HELD).then(|| "frozen".to_owned())
    }
}

/// The container [`FakeDest::locate`] holds.
const HELD: &str = "0000000000000000000000000000000h";

struct Run {
    src: Arc<FakeSource>,
    dst: Arc<FakeDest>,
    report: Result<mig_migrate::transport::SourceReport, mig_migrate::transport::DriverError>,
    dest_report: Result<mig_migrate::transport::DestReport, mig_migrate::transport::DriverError>,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

/// Host-a's client endpoint and host-b's server endpoint (which lets host-a in), on loopback.
struct Pair {
    a: Identity,
    b: Identity,
    server: quinn::Endpoint,
    client: quinn::Endpoint,
}

fn pair() -> Pair {
    let (a, b) = (
        Identity::generate("host-a").unwrap(),
        Identity::generate("host-b").unwrap(),
    );
    let any = "127.0.0.1:0".parse().unwrap();
    let server = endpoint(
        any,
        &b,
        AllowedPeers::new([a.fingerprint().to_string()].into()),
    )
    .unwrap();
    let client = endpoint(any, &a, AllowedPeers::default()).unwrap();
    Pair {
        a,
        b,
        server,
        client,
    }
}

async fn migrate(id: &str, restore_fails: bool) -> Run {
    run(
        SourceMachine::new(prepare(id), Timeouts::default()),
        Hello::new("0.1.0", "host-a"),
        restore_fails,
        None,
    )
    .await
}

async fn run(
    machine: SourceMachine,
    src_hello: Hello,
    restore_fails: bool,
    dest_journal: Option<JournalState>,
) -> Run {
    run_rounds(machine, src_hello, restore_fails, dest_journal, (0, None)).await
}

/// [`run`] with a source that sends `rounds.0` presync rounds, failing at round `rounds.1`.
async fn run_rounds(
    machine: SourceMachine,
    src_hello: Hello,
    restore_fails: bool,
    dest_journal: Option<JournalState>,
    rounds: (u32, Option<u32>),
) -> Run {
    let (sdir, ddir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let Pair {
        a,
        b,
        server,
        client,
    } = pair();
    let src = Arc::new(FakeSource::new(sdir.path()));
    *src.rounds.lock().unwrap() = rounds;
    let dst = Arc::new(FakeDest::new(ddir.path(), restore_fails));
    dst.journal.lock().unwrap().extend(dest_journal);
    let dest_task = tokio::spawn({
        let (server, dst) = (server.clone(), dst.clone());
        async move {
            let conn = accept(&server).await.unwrap().unwrap();
            let r = run_dest(
                conn.clone(),
                dst,
                &Hello::new("0.1.0", "host-b"),
                Timeouts::default(),
            )
            .await;
            conn.close(0u32.into(), b"done");
            r
        }
    });
    let peer = Peer {
        name: "host-b".into(),
        address: server.local_addr().unwrap(),
        fingerprint: b.fingerprint().into(),
    };
    let conn = connect(&client, &a, &peer).await.unwrap();
    let report = run_source(&conn, machine, src.as_ref(), &src_hello).await;
    let dest_report = dest_task.await.unwrap();
    conn.close(0u32.into(), b"done");
    Run {
        src,
        dst,
        report,
        dest_report,
        _dirs: (sdir, ddir),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_over_quic_commits() {
    let id = "0123456789abcdef0123456789abcdef";
    let mut r = migrate(id, false).await;
    let report = r.report.take_ok();
    let dest_report = r.dest_report.take_ok();
    assert!(
        matches!(
            report.outcome,
            Some(Outcome::Committed {
                cleanup_error: None
            })
        ),
        "{:?}",
        r.report
    );
    assert!(matches!(
        dest_report.outcome,
        Some(Outcome::Committed { .. })
    ));
    assert_eq!(report.peer.agent_name, "host-b");
    assert_eq!(dest_report.peer.agent_name, "host-a");
    assert_eq!(*r.src.state.lock().unwrap(), "gone");
    assert_eq!(*r.dst.state.lock().unwrap(), "running");
    assert_eq!(
        *r.src.calls.lock().unwrap(),
        ["presync", "freeze", "dump", "destroy"]
    );
    assert_eq!(*r.dst.calls.lock().unwrap(), ["check", "restore", "resume"]);
    use JournalState as J;
    assert_eq!(
        *r.src.journal.lock().unwrap(),
        [J::Preparing, J::Frozen, J::CommitSent, J::Committed]
    );
    assert_eq!(
        *r.dst.journal.lock().unwrap(),
        [J::Preparing, J::Restored, J::Committed]
    );
    assert_eq!(report.dest_pid_map[0].host_pid, 777);
    assert_eq!(report.files_sent, 9);
    assert_eq!(report.bytes_sent, (1 + 2 + 21) * (1 << 20) + 4096);
    // Every file arrived where the destination host placed it, intact.
    let got = std::fs::read(r.dst.mdir(id).join("image/images/pages-5.img")).unwrap();
    let want = std::fs::read(r._dirs.0.path().join("dump/pages-5.img")).unwrap();
    assert!(got == want);
    let t = report.timings;
    println!(
        "loopback migration: freeze {:?} dump {:?} transfer {:?} restore {:?} downtime {:?} total {:?}",
        t.freeze, t.dump, t.transfer, t.restore, t.downtime, t.total
    );
    assert!(t.downtime >= t.transfer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_failure_thaws_source_and_cleans_dest() {
    let id = "fedcba9876543210fedcba9876543210";
    let mut r = migrate(id, true).await;
    let report = r.report.take_ok();
    match &report.outcome {
        Some(Outcome::RolledBack {
            cause,
            detail,
            rollback_error: None,
        }) => {
            assert_eq!(*cause, Cause::Peer(AbortReason::RestoreFailed));
            assert!(detail.contains("criu restore exited 1"), "{detail}");
        }
        o => panic!("unexpected outcome {o:?}"),
    }
    assert_eq!(*r.src.state.lock().unwrap(), "running");
    assert_eq!(
        *r.src.calls.lock().unwrap(),
        ["presync", "freeze", "dump", "thaw"]
    );
    assert_eq!(
        *r.dst.calls.lock().unwrap(),
        ["check", "restore", "cleanup"]
    );
    assert!(!r.dst.mdir(id).exists());
    assert_eq!(
        r.src.journal.lock().unwrap().last(),
        Some(&JournalState::RolledBack)
    );
    assert_eq!(
        r.dst.journal.lock().unwrap().last(),
        Some(&JournalState::RolledBack)
    );
}

/// Pre-copy's rounds (`SourceHost::presync_round`): sent one after the other in the presync
/// phase, counted in its TransferDone, each placed and intact on the destination.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presync_rounds_are_sent_and_counted() {
    let id = "0123456789abcdef0123456789abcde1";
    let machine = SourceMachine::new(prepare(id), Timeouts::default());
    let mut r = run_rounds(
        machine,
        Hello::new("0.1.0", "host-a"),
        false,
        None,
        (3, None),
    )
    .await;
    let report = r.report.take_ok();
    assert!(
        matches!(report.outcome, Some(Outcome::Committed { .. })),
        "{:?}",
        report.outcome
    );
    assert_eq!(
        *r.src.calls.lock().unwrap(),
        ["presync", "round", "round", "round", "freeze", "dump", "destroy"]
    );
    assert_eq!(report.files_sent, 9 + 3);
    let rounds: usize = (1..=3).map(round_len).sum();
    assert_eq!(
        report.bytes_sent,
        (1 + 2 + 21) * (1 << 20) + 4096 + rounds as u64
    );
    for n in 1..=3 {
        let got = std::fs::read(
            r.dst
                .mdir(id)
                .join(format!("presync/rounds/{n}/pages-1.img")),
        )
        .unwrap();
        let want = std::fs::read(r._dirs.0.path().join(format!("rounds/{n}/pages-1.img"))).unwrap();
        assert!(got == want, "round {n}");
    }
}

/// A round that fails rolls the move back before anything was frozen: the source is thawed
/// (a no-op: it never froze) and the destination removes everything, the rounds it got too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_round_rolls_back_before_the_freeze() {
    let id = "0123456789abcdef0123456789abcde2";
    let machine = SourceMachine::new(prepare(id), Timeouts::default());
    let mut r = run_rounds(
        machine,
        Hello::new("0.1.0", "host-a"),
        false,
        None,
        (3, Some(2)),
    )
    .await;
    let report = r.report.take_ok();
    match &report.outcome {
        Some(Outcome::RolledBack { detail, .. }) => {
            assert!(detail.contains("criu pre-dump exited 1"), "{detail}")
        }
        o => panic!("unexpected outcome {o:?}"),
    }
    let calls = r.src.calls.lock().unwrap().clone();
    assert!(!calls.contains(&"freeze"), "{calls:?}");
    assert_eq!(*r.src.state.lock().unwrap(), "running");
    assert!(r.dst.calls.lock().unwrap().contains(&"cleanup"));
    assert!(!r.dst.mdir(id).exists());
}

trait TakeOk<T> {
    fn take_ok(&mut self) -> T;
}

impl<T: Clone, E: std::fmt::Debug> TakeOk<T> for Result<T, E> {
    fn take_ok(&mut self) -> T {
        self.as_ref().unwrap().clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_doubt_resolved_over_a_new_connection() {
    // The source sent Commit and lost the link; the destination had restored and never got it.
    let id = "00000000000000000000000000000001";
    let machine = SourceMachine::recover(id, &JournalState::CommitSent, Timeouts::default());
    let mut r = run(
        machine,
        Hello::new("0.1.0", "host-a"),
        false,
        Some(JournalState::Restored),
    )
    .await;
    let report = r.report.take_ok();
    assert!(
        matches!(report.outcome, Some(Outcome::Committed { .. })),
        "{report:?}"
    );
    assert_eq!(*r.src.calls.lock().unwrap(), ["destroy"]);
    assert_eq!(*r.dst.calls.lock().unwrap(), ["resume"]);
    assert_eq!(*r.dst.state.lock().unwrap(), "running");
    assert_eq!(
        r.dst.journal.lock().unwrap().last(),
        Some(&JournalState::Committed)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_major_version_refused_naming_both() {
    let id = "00000000000000000000000000000002";
    let mut hello = Hello::new("9.0.0", "host-a");
    hello.protocol_version.major += 1;
    let r = run(
        SourceMachine::new(prepare(id), Timeouts::default()),
        hello,
        false,
        None,
    )
    .await;
    let err = r.dest_report.unwrap_err();
    let text = format!("{err}: {}", std::error::Error::source(&err).unwrap());
    let ours = mig_migrate::wire::PROTOCOL_VERSION;
    let theirs = format!("speaks {}.{}", ours.major + 1, ours.minor);
    assert!(
        text.contains(&format!("we speak {ours}")) && text.contains(&theirs),
        "{text}"
    );
    // The source never got further than Prepare (or its hello exchange): nothing was frozen.
    if let Ok(report) = r.report {
        assert!(
            matches!(report.outcome, Some(Outcome::RolledBack { .. })),
            "{report:?}"
        );
    }
    assert!(r.src.calls.lock().unwrap().is_empty());
}

/// Protocol 1.7: a peer asked whether it holds a container answers from its host and starts no
/// migration; a peer older than 1.7 is not asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_says_whether_it_holds_a_container() {
    let Pair {
        a,
        b,
        server,
        client,
    } = pair();
    let ddir = tempfile::tempdir().unwrap();
    let dst = Arc::new(FakeDest::new(ddir.path(), false));
    let peer = Peer {
        name: "host-b".into(),
        address: server.local_addr().unwrap(),
        fingerprint: b.fingerprint().into(),
    };
    let limit = std::time::Duration::from_secs(10);
    let cases = [
        (HELD, 7, Located::Held("frozen".into())),
        ("00000000000000000000000000000003", 7, Located::NotHeld),
        (HELD, 6, Located::CannotTell),
    ];
    for (id, minor, want) in cases {
        let serving = tokio::spawn({
            let (server, dst) = (server.clone(), dst.clone());
            async move {
                let conn = accept(&server).await.unwrap().unwrap();
                let mut hello = Hello::new("0.2.0", "host-b");
                hello.protocol_version.minor = minor;
                let r = run_dest(conn.clone(), dst, &hello, Timeouts::default()).await;
                conn.close(0u32.into(), b"done");
                r
            }
        });
        let conn = connect(&client, &a, &peer).await.unwrap();
        let got = locate(&conn, &Hello::new("0.2.0", "host-a"), id, limit).await;
        conn.close(0u32.into(), b"done");
        assert_eq!(got.unwrap(), want, "{id} from a 1.{minor} peer");
        let served = serving.await.unwrap();
        if minor >= 7 {
            assert_eq!(served.unwrap().migration_id, "", "no migration ran");
        }
    }
    // Asked twice (the 1.6 peer was not asked), and nothing else happened there.
    assert_eq!(*dst.calls.lock().unwrap(), ["locate", "locate"]);
}

/// The agent spawns the drivers on tokio: their futures must be `Send`.
#[allow(dead_code)]
fn drivers_are_send(
    conn: quinn::Connection,
    src: FakeSource,
    dst: Arc<FakeDest>,
    machine: SourceMachine,
) {
    fn is_send<T: Send>(_: &T) {}
    let hello = Hello::new("0.1.0", "x");
    let f = run_source(&conn, machine, &src, &hello);
    is_send(&f);
    let g = run_dest(conn.clone(), dst, &hello, Timeouts::default());
    is_send(&g);
}
