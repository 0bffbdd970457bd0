//! Root test of the memory presync's reader against the real CRIU: the pages the presync reads
//! from a running process (`memsync::reader::anon_runs`) must be exactly the pages `criu dump`
//! then writes for it, in a dynamically linked PIE (`/usr/bin/sleep`) and in a static binary
//! (busybox). A page the dump has and the presync lacks shifts every later page of the
//! destination's presync file: the dynamic program's first text page, which CRIU's parasite
//! writes into, did so until 2026-12-03 and cost a rewrite of the whole image while frozen.
//! Skipped (with a note) when not root, CRIU or a binary is missing.
//!
//! Every process started here is killed and reaped by a guard, even when an assertion fails.

use mig_migrate::criu::DumpOpts;
use mig_migrate::memsync::reader::{anon_runs, dump_adds, ProcMemory};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

mod support;

use support::{criu_or_skip, dump_retrying, in_pid_namespace, spawn_init, Reaper};

const PAGE: u64 = 4096;
const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
const PAGEMAP_MAGIC: u32 = 0x5608_4025;
const PE_PRESENT: u64 = 1 << 2;

/// Reads a protobuf varint at `*at`.
fn varint(data: &[u8], at: &mut usize) -> u64 {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = data[*at];
        *at += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return v;
        }
    }
    panic!("varint too long");
}

/// The pages id and the page addresses of the present entries of a pagemap image, in the
/// order of the pages image.
fn pagemap_pages(path: &Path) -> (u64, Vec<u64>) {
    let data = std::fs::read(path).unwrap();
    let word = |at: usize| u32::from_le_bytes(data[at..at + 4].try_into().unwrap());
    assert_eq!((word(0), word(4)), (IMG_COMMON_MAGIC, PAGEMAP_MAGIC));
    let mut at = 8;
    let mut pages = Vec::new();
    let mut pages_id = None;
    while at < data.len() {
        let len = word(at) as usize;
        at += 4;
        let msg = &data[at..at + len];
        at += len;
        let mut fields = [0u64; 6];
        let mut i = 0;
        while i < msg.len() {
            let key = varint(msg, &mut i);
            assert_eq!(key & 7, 0, "pagemap messages hold varints only");
            let v = varint(msg, &mut i);
            if let Some(f) = fields.get_mut((key >> 3) as usize) {
                *f = v;
            }
        }
        if pages_id.is_none() {
            // PagemapHead { pages_id = 1 }
            pages_id = Some(fields[1]);
            continue;
        }
        // PagemapEntry { vaddr = 1, flags = 4, nr_pages = 5 }
        if fields[4] & PE_PRESENT != 0 {
            pages.extend((0..fields[5]).map(|k| fields[1] + k * PAGE));
        }
    }
    (pages_id.unwrap(), pages)
}

/// Starts `argv` as the init of new namespaces, waits until it runs `exe`, compares the
/// presync's pages with the dump's.
// The `unshare` child is reaped by the Reaper guard with waitpid, not through `Child`.
#[allow(clippy::zombie_processes)]
fn presync_pages_are_the_dumps(argv: &[&str], exe: &str) {
    let Some(criu) = criu_or_skip() else { return };
    if !Path::new(argv[0]).exists() {
        eprintln!("no {}: skipping", argv[0]);
        return;
    }
    nix::sys::prctl::set_child_subreaper(true).unwrap();
    let mut reaper = Reaper::default();
    let init = spawn_init(
        in_pid_namespace()
            .args(argv)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
        &mut reaper,
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !std::fs::read_link(format!("/proc/{init}/exe"))
        .is_ok_and(|p| p.to_string_lossy().ends_with(exe))
    {
        assert!(Instant::now() < deadline, "{init} does not run {exe}");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Past the loader's start-up: the process sleeps from here on.
    std::thread::sleep(Duration::from_millis(200));

    // What the presync reads, page by page.
    let mut read: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let memory = ProcMemory::open(init).unwrap();
    for run in anon_runs(init).unwrap() {
        let (data, pages, _) = memory.read_run(run);
        assert_eq!(
            pages, run.pages,
            "{exe}: the run at {:#x} reads whole",
            run.vaddr
        );
        for (k, page) in data.chunks_exact(PAGE as usize).enumerate() {
            read.insert(run.vaddr + k as u64 * PAGE, page.to_vec());
        }
    }
    let presync: BTreeSet<u64> = read.keys().copied().collect();
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    dump_retrying(
        &criu,
        &DumpOpts {
            pid: init,
            images_dir: images.clone(),
            leave_running: true,
            log_file: "dump.log".into(),
            ..Default::default()
        },
    );
    let (pages_id, order) = pagemap_pages(&images.join("pagemap-1.img"));
    let dumped: BTreeSet<u64> = order.iter().copied().collect();
    let only_dump: Vec<String> = dumped
        .difference(&presync)
        .map(|a| format!("{a:#x}"))
        .collect();
    let only_presync: Vec<String> = presync
        .difference(&dumped)
        .map(|a| format!("{a:#x}"))
        .collect();
    assert!(
        only_dump.is_empty() && only_presync.is_empty(),
        "{exe}: pages only the dump has: {only_dump:?}; only the presync: {only_presync:?} \
         ({} dumped, {} in the presync)",
        dumped.len(),
        presync.len()
    );
    // The pages the presync adds are the bytes the dump sends: the destination holds them, and
    // they do not travel again while frozen.
    let maps = std::fs::read_to_string(format!("/proc/{init}/maps")).unwrap();
    let image = std::fs::read(images.join(format!("pages-{pages_id}.img"))).unwrap();
    let mut checked = 0;
    for (a, b) in dump_adds(&maps) {
        for v in (a..b).step_by(PAGE as usize) {
            let pos = order.iter().position(|&x| x == v).unwrap() as u64;
            let dumped = &image[(pos * PAGE) as usize..((pos + 1) * PAGE) as usize];
            assert!(read[&v] == dumped, "{exe}: the page at {v:#x} differs");
            checked += 1;
        }
    }
    assert!(checked > 0, "{exe}: no executable page or vDSO found");
}

#[test]
fn a_dynamically_linked_program_is_read_as_criu_dumps_it() {
    presync_pages_are_the_dumps(&["/usr/bin/sleep", "1000"], "/sleep");
}

#[test]
fn a_static_program_is_read_as_criu_dumps_it() {
    presync_pages_are_the_dumps(&["/bin/busybox", "sleep", "1000"], "/busybox");
}
