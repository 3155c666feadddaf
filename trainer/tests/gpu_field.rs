//! `ModelField::eval_device` (θ and the gradient as flat device buffers) against the host path
//! `eval` on the same CUDA device: an MLP and a CNN, plain, with micro-batches of 3 and with
//! activation recomputation. Needs `--features cuda` and a GPU; without a usable device it prints
//! `SKIPPED: …` with the reason and passes.
//!
//! The two paths run the same candle forward/backward passes on the same device; only θ's way in
//! and the gradients' way out differ (and the micro-batch sums are candle f32 adds instead of host
//! f32 adds), so the results are expected to be bit-identical. The test requires the loss to 1e-6
//! relative and the gradient to 1e-6 · max|g|, and prints how many entries differ in any bit.

#[cfg(not(feature = "cuda"))]
#[test]
fn eval_device_matches_eval() {
    eprintln!("SKIPPED: gpu_field tests need --features cuda and a GPU");
}

#[cfg(feature = "cuda")]
#[path = "gpu_field/device.rs"]
mod device;
