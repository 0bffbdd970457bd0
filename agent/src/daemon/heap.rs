//! The agent's heap settings for moving pages.
//!
//! A move in stream or lazy mode passes every page through the agent in buffers of a few hundred
//! KiB: read from CRIU's socket, held by QUIC until the peer acknowledges them, then freed.
//! glibc's defaults hand such buffers back to the kernel almost at once (a freed chunk above the
//! dynamic mmap threshold is unmapped; a heap with more than twice that threshold free at its top
//! is trimmed), so every new buffer is fresh memory again: a page fault, a zeroed page and a
//! memory cgroup charge per 4 KiB, on the same two cores that encrypt and copy the pages. In the
//! bench's stream moves that cost about a tenth of the page path's time (docs/performance.md,
//! "Session 9").
//!
//! [`tune`] keeps freed memory in the heap while a move runs; [`release`] hands what is free back
//! to the kernel when the last running move ends, and [`release_when_idle`] once a minute while
//! no move runs (after an image import, say), so an idle agent does not keep large buffers.

use std::sync::atomic::{AtomicU32, Ordering};

/// Buffers below this come from the heap (glibc's largest mmap threshold on 64-bit).
const MMAP_THRESHOLD: i32 = 32 << 20;
/// Free memory a heap keeps at its top before giving it back.
const TRIM_THRESHOLD: i32 = 512 << 20;

/// Moves running in this process (either direction).
static MOVES: AtomicU32 = AtomicU32::new(0);

/// Sets the heap thresholds; call once at the start of the agent, before its threads start.
pub fn tune() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes glibc's allocator parameters; it is called before any other
    // thread of this process allocates concurrently and with valid parameter numbers.
    unsafe {
        if libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 0
            || libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 0
        {
            tracing::debug!("the allocator refused mig's heap thresholds; glibc's are kept");
        }
    }
}

/// One running move; when the last running move ends, free heap memory goes back to the kernel.
#[derive(Debug)]
#[must_use = "the move counts as running only while this is held"]
pub struct Running(());

impl Running {
    pub fn start() -> Running {
        MOVES.fetch_add(1, Ordering::SeqCst);
        Running(())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if MOVES.fetch_sub(1, Ordering::SeqCst) == 1 {
            release();
        }
    }
}

/// Gives the heap's free memory back to the kernel.
pub fn release() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim is thread-safe (it takes each arena's lock) and only returns free
    // memory to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// How often [`release_when_idle`] looks.
const IDLE_RELEASE: std::time::Duration = std::time::Duration::from_secs(60);

/// Gives free heap memory back to the kernel once a minute while no move runs. Needs a tokio
/// runtime; runs until it is dropped with the runtime.
pub fn release_when_idle() {
    tokio::spawn(async {
        let mut tick = tokio::time::interval(IDLE_RELEASE);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if MOVES.load(Ordering::SeqCst) == 0 {
                release();
            }
        }
    });
}
