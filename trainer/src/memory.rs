//! Measured memory of this process, for the metrics and for checking the planner's predictions:
//! the peak resident set size (VmHWM) that Linux keeps per process. Elsewhere these return None.

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
