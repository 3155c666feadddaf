//! Measured memory of this process, for the metrics and for checking the planner's predictions:
//! the peak resident set size (VmHWM) that Linux keeps per process (elsewhere these return None),
//! and — where the binary installs `CountingAlloc` as its global allocator, as `kutta` does — the
//! bytes live on the heap and their peak, exact and resettable at any point (what a benchmark of
//! one computation's working memory needs: RSS also holds pages the allocator keeps after a
//! free, `threads::keep_freed_memory`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Peak resident set size since the process started (or since `reset_peak`), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    status_kib("VmHWM:").map(|k| k * 1024)
}

/// Current resident set size, in bytes.
pub fn rss_bytes() -> Option<u64> {
    status_kib("VmRSS:").map(|k| k * 1024)
}

/// Reset the peak to the current RSS (Linux ≥ 4.0: writing 5 to /proc/self/clear_refs).
/// Returns whether it worked.
pub fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Bytes in MiB, for logs and reports.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

fn status_kib(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].trim().trim_end_matches("kB").trim().parse().ok()
}

/// GPU memory in use on `device`'s GPU, in bytes: total − free as the driver reports it (every
/// process on that GPU and the CUDA context included, and candle's freed-but-pooled blocks).
/// None on the CPU or in a build without the `cuda` feature.
pub fn device_used_bytes(device: &candle_core::Device) -> Option<u64> {
    crate::kernels::cuda::device_used_bytes(device)
}

/// The system allocator, counting the bytes live and their peak (`heap_live_bytes`,
/// `heap_peak_bytes`, `reset_heap_peak`). Install it with
/// `#[global_allocator] static A: CountingAlloc = CountingAlloc;`. The cost is two relaxed atomic
/// operations per allocation.
pub struct CountingAlloc;

static LIVE: AtomicU64 = AtomicU64::new(0);
static PEAK: AtomicU64 = AtomicU64::new(0);

fn grew(bytes: usize) {
    let now = LIVE.fetch_add(bytes as u64, Relaxed) + bytes as u64;
    PEAK.fetch_max(now, Relaxed);
}

fn shrank(bytes: usize) {
    LIVE.fetch_sub(bytes as u64, Relaxed);
}

// SAFETY: every call is forwarded to `System` unchanged; the counters only observe sizes.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        shrank(layout.size());
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size());
            } else {
                shrank(layout.size() - new_size);
            }
        }
        p
    }
}

/// Bytes live on the heap now; None unless `CountingAlloc` is the global allocator.
pub fn heap_live_bytes() -> Option<u64> {
    Some(LIVE.load(Relaxed)).filter(|_| PEAK.load(Relaxed) > 0)
}

/// The most bytes live on the heap since the start or the last `reset_heap_peak`; None unless
/// `CountingAlloc` is the global allocator.
pub fn heap_peak_bytes() -> Option<u64> {
    Some(PEAK.load(Relaxed)).filter(|&p| p > 0)
}

/// Restart the heap peak from the bytes live now.
pub fn reset_heap_peak() {
    PEAK.store(LIVE.load(Relaxed), Relaxed);
}
