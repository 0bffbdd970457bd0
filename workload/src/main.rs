//! `mig-memload`: the self-verifying memory workload of `mig bench move`, run the same way in a
//! mig container and in the runc baseline.
//!
//! It allocates `--mib` MiB, fills them with a pseudo-random pattern derived from `--seed` (every
//! 8-byte word is a pure function of the seed and its index, so any part can be checked alone),
//! prints `READY <mib>`, then once a second (`--interval-ms`):
//!
//! - rewrites `--dirty-mib` MiB (default 1) at a rotating offset with the pattern of the next
//!   generation of each MiB (its seed mixed with a per-MiB counter kept in memory too), so the
//!   pages change content, as a program's writes do, and stay verifiable;
//! - verifies the next `--verify-mib` MiB (default 256) against the pattern, wrapping around;
//! - prints `COUNT <n>` and then `OK <n> passes <p>` (`p` = complete verification passes over the
//!   whole buffer so far) or `BAD <n> offset <byte>` at the first wrong word.
//!
//! With `--guarded-mib G` it also fills a separate G MiB mapping and keeps it `PROT_NONE`, except
//! while it verifies the whole of it once a tick (`BAD <n> guarded offset <byte>` when wrong): memory
//! the process itself cannot read most of the time, which a dump must still carry (CRIU reads it
//! through its parasite; a lazy dump puts it into the images, docs/criu.md "Patches").
//!
//! With `--pipes P` it also holds P pipes, each with 8 bytes of the pattern in it, and once a
//! tick reads each one, checks it and writes it back (`BAD <n> pipe <i>` when wrong); with
//! `--threads T`, T threads each count every 50 ms, and a tick after which one of them has not
//! counted since the tick before prints `BAD <n> thread <i>`. Both are what a dump must carry
//! beyond memory: pipe buffers, and a task per thread.
//!
//! With `--mapped-file PATH` it also maps the first MiB of file PATH (made anew) shared, and a
//! thread writes a counter into each of its pages every 2 ms, checking first that every page still
//! holds the counter it wrote last (`BAD <n> mapped page <i>` when not): the file is the memory
//! here, which a move must carry as the process left it (stores through such a mapping do not
//! touch the file's times). It also holds a POSIX read lock on the file's first byte, as SQLite
//! holds one on the `-shm` file it maps (a restore must keep it: `/proc/locks` shows it).
//!
//! A move keeps the counter going (it lives in the moved memory); a restored process whose memory
//! is not intact prints `BAD`. Static build: `RUSTFLAGS="-C target-feature=+crt-static" cargo build
//! -p mig-memload --release`. No dependencies beyond std and libc.

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

const MIB_WORDS: usize = (1 << 20) / 8;

struct Options {
    mib: usize,
    seed: u64,
    dirty_mib: usize,
    verify_mib: usize,
    guarded_mib: usize,
    pipes: usize,
    threads: usize,
    interval: Duration,
    mapped_file: Option<String>,
}

const USAGE: &str =
    "usage: mig-memload --mib N [--seed S] [--dirty-mib D] [--verify-mib V] [--guarded-mib G] [--pipes P] [--threads T] [--interval-ms MS] [--mapped-file PATH]";

fn parse(args: &[String]) -> Result<Options, String> {
    let mut o = Options {
        mib: 0,
        seed: 1,
        dirty_mib: 1,
        verify_mib: 256,
        guarded_mib: 0,
        pipes: 0,
        threads: 0,
        interval: Duration::from_millis(1000),
        mapped_file: None,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let raw = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        if flag == "--mapped-file" {
            o.mapped_file = Some(raw.clone());
            continue;
        }
        let value = raw
            .parse::<u64>()
            .map_err(|_| format!("{flag} needs a number"))?;
        match flag.as_str() {
            "--mib" => o.mib = value as usize,
            "--seed" => o.seed = value,
            "--dirty-mib" => o.dirty_mib = value as usize,
            "--verify-mib" => o.verify_mib = value as usize,
            "--guarded-mib" => o.guarded_mib = value as usize,
            "--pipes" => o.pipes = value as usize,
            "--threads" => o.threads = value as usize,
            "--interval-ms" => o.interval = Duration::from_millis(value.max(10)),
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    if o.mib == 0 || o.mib > 1 << 20 {
        return Err("--mib must be 1 to 1048576".into());
    }
    if o.guarded_mib > 1 << 16 {
        return Err("--guarded-mib must be at most 65536".into());
    }
    if o.pipes > 1 << 16 || o.threads > 1 << 14 {
        return Err("--pipes must be at most 65536 and --threads at most 16384".into());
    }
    o.verify_mib = o.verify_mib.clamp(1, o.mib);
    o.dirty_mib = o.dirty_mib.min(o.mib);
    Ok(o)
}

/// The pattern word at `index` (splitmix64 of the seed and the index).
fn word(seed: u64, index: usize) -> u64 {
    let mut z = seed
        .wrapping_add(0x9e37_79b9_7f4a_7c15)
        .wrapping_add((index as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The pattern seed of a MiB in generation `gen` (generation 0: the seed itself).
fn mib_seed(seed: u64, gen: u64) -> u64 {
    seed ^ gen.wrapping_mul(0xd6e8_feb8_6659_fd93)
}

fn fill(mem: &mut [u64], seed: u64, start: usize) {
    for (i, w) in mem.iter_mut().enumerate() {
        *w = word(seed, start + i);
    }
}

/// Index of the first word of `mem` (starting at word `start`) that is wrong.
fn check(mem: &[u64], seed: u64, start: usize) -> Option<usize> {
    mem.iter()
        .enumerate()
        .find(|&(i, &w)| w != word(seed, start + i))
        .map(|(i, _)| start + i)
}

/// The seed of the guarded mapping's pattern.
fn guarded_seed(seed: u64) -> u64 {
    seed ^ 0x6a09_e667_f3bc_c908
}

/// A private anonymous mapping of `mib` MiB filled with the guarded pattern, then made
/// inaccessible (`PROT_NONE`).
struct Guarded {
    ptr: *mut u64,
    words: usize,
}

impl Guarded {
    fn new(mib: usize, seed: u64) -> Result<Guarded, String> {
        let words = mib * MIB_WORDS;
        // SAFETY: a fresh anonymous mapping; the kernel picks the address.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                words * 8,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(format!("mmap: {}", std::io::Error::last_os_error()));
        }
        let g = Guarded {
            ptr: ptr.cast(),
            words,
        };
        // SAFETY: the mapping is readable and writable, `words` u64 long, and only ours.
        fill(
            unsafe { std::slice::from_raw_parts_mut(g.ptr, words) },
            guarded_seed(seed),
            0,
        );
        g.protect(libc::PROT_NONE)?;
        Ok(g)
    }

    fn protect(&self, prot: libc::c_int) -> Result<(), String> {
        // SAFETY: the range is exactly our mapping.
        if unsafe { libc::mprotect(self.ptr.cast(), self.words * 8, prot) } != 0 {
            return Err(format!("mprotect: {}", std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Makes the mapping readable, checks all of it and makes it inaccessible again.
    fn check(&self, seed: u64) -> Result<Option<usize>, String> {
        self.protect(libc::PROT_READ)?;
        // SAFETY: readable now, `words` u64 long; nothing writes it.
        let bad = check(
            unsafe { std::slice::from_raw_parts(self.ptr, self.words) },
            guarded_seed(seed),
            0,
        );
        self.protect(libc::PROT_NONE)?;
        Ok(bad)
    }
}

/// Pipes each holding the 8 bytes of pattern word `i` (read end, write end).
/// `--mapped-file`: the first bad page a writer thread found (page + 1; 0 while all are good),
/// and the file, whose descriptor holds the lock.
struct Mapped {
    bad: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    _file: std::fs::File,
}

impl Mapped {
    const PAGES: usize = 256;

    fn start(path: &str) -> Result<Mapped, String> {
        use std::os::fd::AsRawFd;
        let len = Mapped::PAGES * 4096;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .and_then(|f| f.set_len(len as u64).map(|()| f))
            .map_err(|e| format!("{path}: {e}"))?;
        // SAFETY: a new shared mapping of a file of `len` bytes, kept for the process's life.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(format!("mmap {path}: {}", std::io::Error::last_os_error()));
        }
        let lock = libc::flock {
            l_type: libc::F_RDLCK as libc::c_short,
            l_whence: libc::SEEK_SET as libc::c_short,
            l_start: 0,
            l_len: 1,
            l_pid: 0,
        };
        // SAFETY: fcntl on our own descriptor with a valid struct flock.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLK, &lock) } != 0 {
            return Err(format!("lock {path}: {}", std::io::Error::last_os_error()));
        }
        let bad = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let flag = bad.clone();
        let base = base as usize;
        std::thread::spawn(move || {
            let mut last = 0u64;
            loop {
                for page in 0..Mapped::PAGES {
                    let word = (base + page * 4096) as *mut u64;
                    // SAFETY: the first word of a page of the mapping above, which lives on.
                    let seen = unsafe { word.read_volatile() };
                    if seen != last && flag.load(std::sync::atomic::Ordering::Relaxed) == 0 {
                        flag.store(page + 1, std::sync::atomic::Ordering::Relaxed);
                    }
                    // SAFETY: as above.
                    unsafe { word.write_volatile(last + 1) };
                }
                last += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        Ok(Mapped { bad, _file: file })
    }

    fn check(&self) -> Option<usize> {
        let b = self.bad.load(std::sync::atomic::Ordering::Relaxed);
        b.checked_sub(1)
    }
}

struct Pipes(Vec<(libc::c_int, libc::c_int)>);

impl Pipes {
    fn new(n: usize, seed: u64) -> Result<Pipes, String> {
        // Two descriptors a pipe: the soft limit of open files goes up to the hard one.
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit with a valid struct.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
                lim.rlim_cur = lim.rlim_max;
                libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            }
        }
        let mut p = Pipes(Vec::with_capacity(n));
        for i in 0..n {
            let mut fds = [0 as libc::c_int; 2];
            // Non-blocking: a pipe that lost its bytes reads EAGAIN (BAD), not forever.
            // SAFETY: `fds` has room for the two descriptors pipe2(2) returns.
            if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
                return Err(format!("pipe {i}: {}", std::io::Error::last_os_error()));
            }
            p.0.push((fds[0], fds[1]));
            p.put(i, seed)?;
        }
        Ok(p)
    }

    fn put(&self, i: usize, seed: u64) -> Result<(), String> {
        let w = word(seed ^ 0xbb67_ae85_84ca_a73b, i).to_le_bytes();
        // SAFETY: writes 8 bytes from a live buffer to our own pipe.
        let n = unsafe { libc::write(self.0[i].1, w.as_ptr().cast(), 8) };
        if n != 8 {
            return Err(format!(
                "write pipe {i}: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    }

    /// Index of the first pipe whose bytes are wrong; each is refilled.
    fn check(&self, seed: u64) -> Result<Option<usize>, String> {
        let mut bad = None;
        for i in 0..self.0.len() {
            let mut b = [0u8; 8];
            // SAFETY: reads at most 8 bytes into a live buffer from our own pipe.
            let n = unsafe { libc::read(self.0[i].0, b.as_mut_ptr().cast(), 8) };
            if n != 8 || u64::from_le_bytes(b) != word(seed ^ 0xbb67_ae85_84ca_a73b, i) {
                bad = bad.or(Some(i));
            }
            if n >= 0 {
                self.put(i, seed)?;
            }
        }
        Ok(bad)
    }
}

impl Drop for Pipes {
    fn drop(&mut self) {
        for &(r, w) in &self.0 {
            // SAFETY: our own descriptors, closed once.
            unsafe {
                libc::close(r);
                libc::close(w);
            }
        }
    }
}

/// Threads that each count every 50 ms.
struct Counters {
    counts: std::sync::Arc<Vec<std::sync::atomic::AtomicU64>>,
    seen: Vec<u64>,
    /// Threads that had not counted at the check before.
    idle: Vec<bool>,
}

impl Counters {
    fn start(n: usize) -> Result<Counters, String> {
        use std::sync::atomic::{AtomicU64, Ordering};
        let counts: std::sync::Arc<Vec<AtomicU64>> =
            std::sync::Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
        for i in 0..n {
            let c = counts.clone();
            std::thread::Builder::new()
                .stack_size(64 << 10)
                .spawn(move || loop {
                    std::thread::sleep(Duration::from_millis(50));
                    c[i].fetch_add(1, Ordering::Relaxed);
                })
                .map_err(|e| format!("thread {i}: {e}"))?;
        }
        Ok(Counters {
            counts,
            seen: vec![0; n],
            idle: vec![false; n],
        })
    }

    /// Index of a thread that has not counted since the call before the one before (two checks
    /// in a row: one check may come soon after the last, or right after a thaw).
    fn check(&mut self) -> Option<usize> {
        let mut stuck = None;
        for (i, c) in self.counts.iter().enumerate() {
            let now = c.load(std::sync::atomic::Ordering::Relaxed);
            let idle = now == self.seen[i];
            if idle && self.idle[i] {
                stuck = stuck.or(Some(i));
            }
            self.idle[i] = idle;
            self.seen[i] = now;
        }
        stuck
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let o = match parse(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("mig-memload: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&o) {
        Ok(never) => match never {},
        Err(e) => {
            eprintln!("mig-memload: {e}");
            ExitCode::from(1)
        }
    }
}

/// Sets up the memory, the pipes and the threads, then checks them once a tick, forever.
fn run(o: &Options) -> Result<std::convert::Infallible, String> {
    let words = o.mib * MIB_WORDS;
    let mut mem = vec![0u64; words];
    // Generation of each MiB: its pattern's seed is `mib_seed(seed, gen)`.
    let mut gens = vec![0u64; o.mib];
    fill(&mut mem, o.seed, 0);
    let guarded = (o.guarded_mib > 0)
        .then(|| Guarded::new(o.guarded_mib, o.seed))
        .transpose()?;
    let pipes = (o.pipes > 0)
        .then(|| Pipes::new(o.pipes, o.seed))
        .transpose()?;
    let mut threads = Counters::start(o.threads)?;
    let mapped = o.mapped_file.as_deref().map(Mapped::start).transpose()?;
    let mut out = std::io::stdout().lock();
    // Output errors (a closed log) must not stop the workload: the memory is what is measured.
    let _ = writeln!(out, "READY {}", o.mib);
    let _ = out.flush();

    let (dirty_words, verify_words) = (o.dirty_mib * MIB_WORDS, o.verify_mib * MIB_WORDS);
    let (mut dirty_at, mut verify_at, mut passes) = (0usize, 0usize, 0u64);
    let mut next = Instant::now() + o.interval;
    let mut n = 0u64;
    loop {
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
        // After a long stop (a freeze, a move) start again from now instead of catching up.
        next = Instant::now().max(next) + o.interval;
        n += 1;

        if dirty_words > 0 {
            let end = (dirty_at + dirty_words).min(words);
            let first = dirty_at / MIB_WORDS;
            for (m, gen) in gens[first..end / MIB_WORDS].iter_mut().enumerate() {
                *gen += 1;
                let at = (first + m) * MIB_WORDS;
                fill(&mut mem[at..at + MIB_WORDS], mib_seed(o.seed, *gen), at);
            }
            dirty_at = if end == words { 0 } else { end };
        }
        let end = (verify_at + verify_words).min(words);
        let bad = (verify_at / MIB_WORDS..end / MIB_WORDS).find_map(|m| {
            let at = m * MIB_WORDS;
            check(&mem[at..at + MIB_WORDS], mib_seed(o.seed, gens[m]), at)
        });
        verify_at = if end == words {
            passes += 1;
            0
        } else {
            end
        };
        let guarded_bad = guarded
            .as_ref()
            .map(|g| g.check(o.seed))
            .transpose()?
            .flatten();
        let pipe_bad = pipes
            .as_ref()
            .map(|p| p.check(o.seed))
            .transpose()?
            .flatten();
        // The first tick only takes the counts (the threads may not have run yet).
        let stuck = threads.check().filter(|_| n > 1);
        let mapped_bad = mapped.as_ref().and_then(Mapped::check);
        let _ = writeln!(out, "COUNT {n}");
        let _ = match (bad, guarded_bad, pipe_bad, stuck, mapped_bad) {
            (Some(i), ..) => writeln!(out, "BAD {n} offset {}", i * 8),
            (None, Some(i), ..) => writeln!(out, "BAD {n} guarded offset {}", i * 8),
            (None, None, Some(i), ..) => writeln!(out, "BAD {n} pipe {i}"),
            (None, None, None, Some(i), _) => writeln!(out, "BAD {n} thread {i}"),
            (None, None, None, None, Some(i)) => writeln!(out, "BAD {n} mapped page {i}"),
            (None, None, None, None, None) => writeln!(out, "OK {n} passes {passes}"),
        };
        let _ = out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn options_parse_and_clamp() {
        let o = parse(&args("--mib 16 --verify-mib 64 --seed 7")).unwrap();
        assert_eq!((o.mib, o.verify_mib, o.seed, o.dirty_mib), (16, 16, 7, 1));
        assert!(parse(&args("")).is_err());
        assert!(parse(&args("--mib x")).is_err());
        assert!(parse(&args("--mib 1 --what 2")).is_err());
        let o = parse(&args("--mib 1 --mapped-file /data.mm")).unwrap();
        assert_eq!(o.mapped_file.as_deref(), Some("/data.mm"));
        assert!(parse(&args("--mib")).is_err());
        assert_eq!(
            parse(&args("--mib 4 --guarded-mib 2")).unwrap().guarded_mib,
            2
        );
        assert!(parse(&args("--mib 4 --guarded-mib 70000")).is_err());
        let o = parse(&args("--mib 4 --pipes 1100 --threads 8")).unwrap();
        assert_eq!((o.pipes, o.threads), (1100, 8));
        assert!(parse(&args("--mib 4 --threads 20000")).is_err());
    }

    #[test]
    fn pipes_keep_their_bytes_and_a_changed_one_is_found() {
        let p = Pipes::new(3, 4).unwrap();
        assert_eq!(p.check(4).unwrap(), None);
        assert_eq!(p.check(4).unwrap(), None);
        assert_eq!(p.check(5).unwrap(), Some(0));
        // A pipe that lost its bytes is found, not waited on.
        let mut b = [0u8; 8];
        // SAFETY: reads 8 bytes into a live buffer from our own pipe.
        assert_eq!(unsafe { libc::read(p.0[1].0, b.as_mut_ptr().cast(), 8) }, 8);
        assert_eq!(p.check(5).unwrap(), Some(1));
    }

    #[test]
    fn a_thread_that_does_not_count_is_found() {
        use std::sync::atomic::{AtomicU64, Ordering};
        let mut c = Counters::start(2).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        c.check();
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(c.check(), None);
        // Counters no thread moves: the second one is found.
        let mut c = Counters {
            counts: std::sync::Arc::new(vec![AtomicU64::new(0), AtomicU64::new(0)]),
            seen: vec![0, 0],
            idle: vec![false, false],
        };
        c.counts[0].fetch_add(1, Ordering::Relaxed);
        assert_eq!(c.check(), None, "one idle check is not enough");
        c.counts[0].fetch_add(1, Ordering::Relaxed);
        assert_eq!(c.check(), Some(1));
    }

    #[test]
    fn pattern_verifies_and_detects_a_flip() {
        let mut mem = vec![0u64; 4096];
        fill(&mut mem, 3, 100);
        assert_eq!(check(&mem, 3, 100), None);
        assert_eq!(check(&mem, 4, 100), Some(100));
        mem[1234] ^= 1;
        assert_eq!(check(&mem, 3, 100), Some(1334));
        assert_ne!(word(1, 0), word(1, 1));
    }

    #[test]
    fn a_new_generation_changes_every_word() {
        let (mut a, mut b) = (vec![0u64; 512], vec![0u64; 512]);
        fill(&mut a, mib_seed(5, 0), 0);
        fill(&mut b, mib_seed(5, 1), 0);
        assert_eq!(mib_seed(5, 0), 5);
        assert!(a.iter().zip(&b).all(|(x, y)| x != y));
        assert_eq!(check(&b, mib_seed(5, 1), 0), None);
    }

    #[test]
    fn the_guarded_mapping_verifies_while_inaccessible_between_checks() {
        let g = Guarded::new(1, 9).unwrap();
        assert_eq!(g.check(9).unwrap(), None);
        assert_eq!(g.check(8).unwrap(), Some(0));
        assert_eq!(g.check(9).unwrap(), None);
    }
}
