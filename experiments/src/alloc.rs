//! A counting global allocator, so that benchmarks can report peak memory: the system
//! allocator plus two atomic counters (bytes in use, and the peak since the last reset).
//! And [`keep_freed_memory`], which stops glibc from handing tensor-sized blocks back to the
//! kernel after every step.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

pub struct Counting;

static IN_USE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            let now = IN_USE.fetch_add(layout.size(), Relaxed) + layout.size();
            PEAK.fetch_max(now, Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        IN_USE.fetch_sub(layout.size(), Relaxed);
    }
}

/// Starts a new peak at the current use, and returns that use.
pub fn reset_peak() -> usize {
    let now = IN_USE.load(Relaxed);
    PEAK.store(now, Relaxed);
    now
}

/// The highest use since the last [`reset_peak`].
pub fn peak() -> usize {
    PEAK.load(Relaxed)
}

/// Tells glibc's malloc to serve blocks up to 32 MiB (its largest setting) from one heap shared
/// by all threads and to keep freed memory instead of returning it to the kernel. By default each tensor above a
/// dynamic threshold is a fresh `mmap`, so every training step and every benchmark call pays a
/// page fault per 4 KiB of every large tensor, and how often depends on the allocation history
/// (benchmarks of the same op then differ by 2–3× from run to run). Other platforms: no-op.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes malloc's tuning; called before any threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        // One arena: a worker thread's own arena lives in 64 MiB heaps that are mapped and
        // unmapped as tensors come and go.
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_sees_a_temporary_allocation() {
        let base = reset_peak();
        let v = vec![0u8; 1 << 20];
        drop(std::hint::black_box(v));
        assert!(peak() - base >= 1 << 20);
    }
}
