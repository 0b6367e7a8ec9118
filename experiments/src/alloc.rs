//! A counting global allocator, so that benchmarks can report peak memory: the system
//! allocator plus counters of the bytes in use and their peak, kept only while
//! [`peak_of`] measures (a locked add and compare-exchange on every allocation cost about a
//! tenth of a small model's training step, and the sweep's jobs would share their cache line).
//! And [`keep_freed_memory`], which stops glibc from handing tensor-sized blocks back to the
//! kernel after every step; blocks of 4 MiB and more live on huge pages (see [`fresh`]).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering::Relaxed, Ordering::SeqCst};

pub struct Counting;

/// Whether [`peak_of`] is measuring: read (never written) by every allocation otherwise.
static COUNTING: AtomicBool = AtomicBool::new(false);
/// Bytes allocated less bytes freed since the measurement began: negative where more of the
/// older blocks were freed than new ones allocated.
static IN_USE: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);

fn counted(p: *mut u8, layout: Layout) -> *mut u8 {
    if !p.is_null() && COUNTING.load(Relaxed) {
        let size = layout.size() as isize;
        let now = IN_USE.fetch_add(size, Relaxed) + size;
        if now > PEAK.load(Relaxed) {
            PEAK.fetch_max(now, Relaxed);
        }
    }
    p
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        fresh::ask_for_huge_pages(p, layout.size());
        counted(p, layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = fresh::zeroed(layout.size(), layout.align());
        if !p.is_null() {
            return counted(p, layout);
        }
        counted(System.alloc_zeroed(layout), layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if !fresh::release(ptr, layout.size()) {
            System.dealloc(ptr, layout);
        }
        if COUNTING.load(Relaxed) {
            IN_USE.fetch_sub(layout.size() as isize, Relaxed);
        }
    }
}

/// Large blocks (4 MiB and more) on huge pages. Zeroed ones (candle's `zeros`, which its
/// backprop allocates for every gradient it accumulates) are fresh anonymous mappings: their
/// pages read as zeros without anyone writing them, from the kernel's shared zero huge page
/// (the mapping asks for huge pages), so a gradient accumulated as zeros + dx reads dx from
/// memory and zeros from cache, and nothing is memset; they are unmapped when freed. The others
/// come from the system allocator and ask for huge pages ([`ask_for_huge_pages`]). Elsewhere
/// than Linux: neither.
mod fresh {
    use std::sync::Mutex;

    /// Zeroed blocks from this size up are mapped.
    pub const MIN_BYTES: usize = 4 << 20;
    const HUGE_PAGE: usize = 2 << 20;

    /// Start addresses of the blocks mapped here.
    static MAPPED: Mutex<Vec<usize>> = Mutex::new(Vec::new());

    fn mapped_len(size: usize) -> usize {
        size.next_multiple_of(HUGE_PAGE)
    }

    /// A zeroed block of `size` bytes aligned to `align`, or null where this does not apply
    /// (then the caller asks the system allocator).
    #[cfg(target_os = "linux")]
    pub unsafe fn zeroed(size: usize, align: usize) -> *mut u8 {
        use libc::{c_void, MAP_ANONYMOUS, MAP_FAILED, MAP_PRIVATE, PROT_READ, PROT_WRITE};
        if size < MIN_BYTES || align > HUGE_PAGE {
            return std::ptr::null_mut();
        }
        let len = mapped_len(size);
        // One huge page more than needed, to cut out a range aligned to one.
        let flags = MAP_PRIVATE | MAP_ANONYMOUS;
        let raw = libc::mmap(
            std::ptr::null_mut(),
            len + HUGE_PAGE,
            PROT_READ | PROT_WRITE,
            flags,
            -1,
            0,
        );
        if raw == MAP_FAILED {
            return std::ptr::null_mut();
        }
        let start = (raw as usize).next_multiple_of(HUGE_PAGE);
        let (head, tail) = (start - raw as usize, HUGE_PAGE - (start - raw as usize));
        if head > 0 {
            libc::munmap(raw, head);
        }
        if tail > 0 {
            libc::munmap((start + len) as *mut c_void, tail);
        }
        ask_for_huge_pages(start as *mut u8, len);
        let Ok(mut mapped) = MAPPED.lock() else {
            libc::munmap(start as *mut c_void, len);
            return std::ptr::null_mut();
        };
        mapped.push(start);
        start as *mut u8
    }

    #[cfg(not(target_os = "linux"))]
    pub unsafe fn zeroed(_: usize, _: usize) -> *mut u8 {
        std::ptr::null_mut()
    }

    /// Asks the kernel to back the whole 2 MiB pages inside a large block (`size` ≥
    /// [`MIN_BYTES`]) from the system allocator with huge pages when they are first touched.
    /// Linux's usual transparent-huge-page setting (`madvise`) gives 4 KiB pages unless asked,
    /// and one thread reads 13–14 GB/s from those but 18–19 GB/s from 2 MiB pages on this
    /// project's machine (the hardware prefetcher and the TLB cover more per page). Pages
    /// already touched stay as they are; since glibc keeps freed memory (see
    /// [`super::keep_freed_memory`]), a block reused from the heap usually was asked for
    /// before. Changes no value, only speed; elsewhere than Linux, nothing.
    pub unsafe fn ask_for_huge_pages(ptr: *mut u8, size: usize) {
        #[cfg(target_os = "linux")]
        if !ptr.is_null() && size >= MIN_BYTES {
            let start = (ptr as usize).next_multiple_of(HUGE_PAGE);
            let end = (ptr as usize + size) / HUGE_PAGE * HUGE_PAGE;
            if end > start {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = (ptr, size);
    }

    /// Whether `ptr` is a live block from [`zeroed`].
    #[cfg(test)]
    pub fn release_is_known(ptr: *const u8) -> bool {
        MAPPED.lock().is_ok_and(|m| m.contains(&(ptr as usize)))
    }

    /// Unmaps `ptr` if it is a block from [`zeroed`]; false if it is not.
    pub unsafe fn release(ptr: *mut u8, size: usize) -> bool {
        if size < MIN_BYTES {
            return false;
        }
        let Ok(mut mapped) = MAPPED.lock() else {
            return false;
        };
        let Some(i) = mapped.iter().position(|&a| a == ptr as usize) else {
            return false;
        };
        mapped.swap_remove(i);
        drop(mapped);
        #[cfg(target_os = "linux")]
        libc::munmap(ptr.cast(), mapped_len(size));
        true
    }
}

/// Runs `f` and returns its result with the most bytes that were in use during it beyond
/// those in use before it (by any thread: measure one thing at a time).
pub fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    IN_USE.store(0, SeqCst);
    PEAK.store(0, SeqCst);
    COUNTING.store(true, SeqCst);
    let out = f();
    COUNTING.store(false, SeqCst);
    (out, PEAK.load(SeqCst).max(0) as usize)
}

/// Tells glibc's malloc to serve blocks up to 32 MiB (its largest setting) from its heaps and to
/// keep freed memory instead of returning it to the kernel. By default each tensor above a
/// dynamic threshold is a fresh `mmap`, so every training step and every benchmark call pays a
/// page fault per 4 KiB of every large tensor, and how often depends on the allocation history
/// (benchmarks of the same op then differ by 2–3× from run to run). Each thread keeps its own
/// arena (glibc's default): with one arena for all, the sweep's two jobs queued on its lock at
/// every allocation, and an epoch at B=2 took 9 s instead of 6 (B=32: 5 instead of 4). With
/// the trim threshold at its largest, no arena's heaps are trimmed or unmapped either. Other
/// platforms: no-op.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes malloc's tuning; called before any threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The counters are global: tests that allocate much take turns.
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn peak_sees_a_temporary_allocation_and_nothing_outside_the_measurement() {
        let _turn = SERIAL.lock();
        let ((), p) = peak_of(|| {
            let v = vec![0u8; 1 << 20];
            drop(std::hint::black_box(v));
        });
        // Other threads of the test harness may free a few bytes meanwhile.
        assert!(p + (64 << 10) >= 1 << 20, "peak {p}");
        assert!(p < 2 << 20, "peak {p}");
        // Between measurements nothing is counted: a block allocated now and freed inside the
        // next measurement lowers its level, and the peak is its own allocation's.
        let before = vec![1u8; 4 << 20];
        let ((), p) = peak_of(|| {
            drop(std::hint::black_box(before));
            let v = vec![1u8; 1 << 20];
            drop(std::hint::black_box(v));
        });
        assert!(
            p < 64 << 10,
            "freeing an older block is no allocation: peak {p}"
        );
    }

    #[test]
    fn large_zeroed_blocks_are_fresh_mappings_that_read_and_write_like_any_other() {
        let _turn = SERIAL.lock();
        let n = (fresh::MIN_BYTES + 12345) / 4;
        for round in 0..3 {
            let mut z = vec![0f32; n];
            assert!(z.iter().all(|&v| v == 0.0), "round {round}");
            assert!(fresh::release_is_known(z.as_ptr().cast()));
            z[n - 1] = 1.5;
            z[round * 1000] = 2.5;
            let total: f32 = z.iter().sum();
            assert_eq!(total, 4.0);
            // Growing copies it into a block of the system allocator and unmaps this one.
            z.push(1.0);
            assert!(!fresh::release_is_known(z.as_ptr().cast()));
            assert_eq!(z.iter().sum::<f32>(), 5.0);
        }
        // Blocks that need not be zero, and small zeroed ones, come from the system allocator.
        let v: Vec<f32> = Vec::with_capacity(n);
        assert!(!fresh::release_is_known(v.as_ptr().cast()));
        let small = vec![0f32; 1000];
        assert!(!fresh::release_is_known(small.as_ptr().cast()));
    }

    /// The kernel's flags for the mapping that holds `addr` (the `VmFlags` line of
    /// /proc/self/smaps), or None where there is no such file.
    #[cfg(target_os = "linux")]
    fn vm_flags(addr: usize) -> Option<Vec<String>> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let mut inside = false;
        for line in smaps.lines() {
            let range = line
                .split_whitespace()
                .next()
                .and_then(|r| r.split_once('-'));
            let bounds = range.and_then(|(a, b)| {
                Some((
                    usize::from_str_radix(a, 16).ok()?,
                    usize::from_str_radix(b, 16).ok()?,
                ))
            });
            if let Some((a, b)) = bounds.filter(|_| !line.starts_with("VmFlags")) {
                inside = (a..b).contains(&addr);
            } else if let (true, Some(flags)) = (inside, line.strip_prefix("VmFlags:")) {
                return Some(flags.split_whitespace().map(str::to_string).collect());
            }
        }
        None
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn large_blocks_ask_for_huge_pages_and_small_ones_do_not() {
        let _turn = SERIAL.lock();
        if !std::path::Path::new("/sys/kernel/mm/transparent_hugepage/enabled").exists() {
            eprintln!("no transparent huge pages on this system: nothing to check");
            return;
        }
        let n = (3 * fresh::MIN_BYTES / 2) / 4;
        let mut v: Vec<f32> = Vec::with_capacity(n);
        v.extend((0..n).map(|i| i as f32));
        // The middle of the block lies in whole 2 MiB pages, which were asked for.
        let middle = v.as_ptr() as usize + n * 2;
        let flags = vm_flags(middle).expect("the block's mapping is in /proc/self/smaps");
        assert!(flags.iter().any(|f| f == "hg"), "flags {flags:?}");
        assert_eq!(v[n - 1], (n - 1) as f32);
        // A small block asks for nothing. Checked on a mapping of its own: heap memory keeps
        // the flag after a large block there is freed, so a small block from the heap may
        // carry it without having asked.
        let len = 2 * fresh::MIN_BYTES;
        let (prot, flags) = (
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
        );
        // SAFETY: a fresh private mapping, advised and unmapped here, never read or written.
        unsafe {
            let raw = libc::mmap(std::ptr::null_mut(), len, prot, flags, -1, 0);
            assert_ne!(raw, libc::MAP_FAILED);
            fresh::ask_for_huge_pages(raw.cast(), fresh::MIN_BYTES - 1);
            let small = vm_flags(raw as usize + fresh::MIN_BYTES / 2).expect("mapped");
            libc::munmap(raw, len);
            assert!(!small.iter().any(|f| f == "hg"), "flags {small:?}");
        }
    }
}
