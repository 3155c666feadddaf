//! The peak-RSS probe, in a test binary of its own: other tests running in parallel in the same
//! process allocate, free and reset the peak, which would make these numbers meaningless.

use kutta_trainer::memory::{peak_rss_bytes, reset_peak, rss_bytes};

#[test]
fn peak_tracks_a_large_allocation_and_resets() {
    if !std::path::Path::new("/proc/self/status").exists() {
        eprintln!("SKIPPED: no /proc on this system");
        return;
    }
    let before = rss_bytes().unwrap();
    let v = vec![1u8; 64 << 20];
    std::hint::black_box(&v);
    let peak = peak_rss_bytes().unwrap();
    assert!(peak >= before + (60 << 20), "peak {peak} after touching 64 MiB from {before}");
    drop(v);
    if reset_peak() {
        let after = peak_rss_bytes().unwrap();
        assert!(after + (32 << 20) < peak, "reset left the peak at {after} (was {peak})");
    } else {
        eprintln!("note: /proc/self/clear_refs not writable here; reset not checked");
    }
}
