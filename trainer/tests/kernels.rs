//! The RK kernels (`trainer/src/kernels/rk.cu`) against their CPU references
//! (`kutta_trainer::kernels::reference`), and the references against each other.
//!
//! - `references_agree_with_each_other` runs everywhere (no GPU, no feature).
//! - `gpu_kernels_match_references` needs `--features cuda` and a GPU. Without the feature it
//!   prints `SKIPPED: kernel tests need --features cuda and a GPU` and passes; with the feature
//!   but no usable device (the driver reports an error, or cudarc cannot load libcuda) it prints
//!   `SKIPPED: …` with the reason and passes. Where it runs, it runs `optim::gpu::check::run` (the
//!   same checks as `kutta bench kernels`): every kernel on random inputs of many lengths (0, 1,
//!   odd, not a multiple of 4, large), on 16-byte aligned buffers (the float4 path) and on views
//!   at an odd offset (the scalar path), with and without D, momentum and the error accumulator:
//!   elementwise results to a max-norm relative error of 1e-6 (they are in fact expected to be
//!   bit-identical: same operations, no FMA contraction), f64 reductions to 1e-9 relative,
//!   counts exactly, bad arguments refused; then whole RK trajectories of the solver on the GPU
//!   back end against the host solver (`optim::gpu::check::SOLVER_TOL`).
//!
//! Bandwidth is measured, not tested: `kutta bench kernels` prints each kernel's achieved
//! bandwidth next to the device's copy bandwidth.

use kutta_trainer::kernels::reference as r;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn random(rng: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

#[test]
fn references_agree_with_each_other() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for n in [0usize, 1, 3, 8, 257] {
        let theta = random(&mut rng, n, -2.0, 2.0);
        let d = random(&mut rng, n, 0.1, 2.0);
        let ks: Vec<Vec<f32>> = (0..r::MAX_STAGES).map(|_| random(&mut rng, n, -2.0, 2.0)).collect();
        let coef: Vec<f32> = random(&mut rng, r::MAX_STAGES, -1.0, 1.0);
        let h = 0.037f32;
        for dd in [None, Some(&d[..])] {
            for ns in 1..=r::MAX_STAGES {
                // One fused stage point == Σ a_j k_j built with `accumulate` (from zero, where
                // 0 + a·k is exact) followed by a momentum-free `final_update`.
                let stages: Vec<(&[f32], f32)> = (0..ns).map(|j| (&ks[j][..], coef[j])).collect();
                let mut x = vec![0.0f32; n];
                r::stage_point(&mut x, &theta, dd, &stages, h);
                let mut acc = vec![0.0f32; n];
                for (k, a) in &stages {
                    r::accumulate(&mut acc, None, k, *a, 0.0);
                }
                let mut y = vec![0.0f32; n];
                r::final_update(&mut y, &theta, &mut acc, None, dd, 0.0, h);
                assert_eq!(x, y, "n={n} ns={ns} d={}", dd.is_some());
                // In place == out of place.
                let mut th = theta.clone();
                r::final_update_in_place(&mut th, &mut acc, None, dd, 0.0, h);
                assert_eq!(th, y);
            }
            let mut x = vec![1.0f32; n];
            r::stage_point(&mut x, &theta, dd, &[], h);
            assert_eq!(x, theta);
            // ‖D(a − 0)‖² == ‖D a‖²; the error sum with atol = 1, rtol = 0, h = 1, D = I is ‖e‖².
            let zero = vec![0.0f32; n];
            assert_eq!(r::ddiff2(&ks[0], &zero, dd), r::dnorm2(&ks[0], dd));
            assert_eq!(r::error_sum(&theta, &ks[1], None, 1.0, 1.0, 0.0), r::dnorm2(&ks[1], None));
            // Momentum: acc ← β m + acc, and the update uses the new acc.
            let m = &ks[2];
            let mut acc = ks[3].clone();
            let mut x1 = vec![0.0f32; n];
            r::final_update(&mut x1, &theta, &mut acc, Some(m), dd, 0.9, h);
            let mut acc2: Vec<f32> = ks[3].iter().zip(m).map(|(a, m)| 0.9 * m + a).collect();
            let mut x2 = vec![0.0f32; n];
            r::final_update(&mut x2, &theta, &mut acc2, None, dd, 0.0, h);
            assert_eq!((x1, acc), (x2, acc2));
        }
        // AdaGrad: D from (G, k1) == D from (G + k1², 0) after the commit.
        let g = random(&mut rng, n, 0.0, 3.0);
        let mut d1 = vec![0.0f32; n];
        r::adagrad_d(&mut d1, &g, &ks[0], 1e-3);
        let mut g2 = g.clone();
        r::adagrad_commit(&mut g2, &ks[0]);
        let mut d2 = vec![0.0f32; n];
        r::adagrad_d(&mut d2, &g2, &vec![0.0; n], 1e-3);
        assert_eq!(d1, d2);
        // Gather/scatter round trip, tensors laid out in reverse order.
        let lens = [n / 3, 0, n - n / 3];
        let tensors: Vec<Vec<f32>> = lens.iter().map(|&l| random(&mut rng, l, -1.0, 1.0)).collect();
        let offs = [lens[1] + lens[2], lens[2], 0];
        let mut flat = vec![0.0f32; n];
        let parts: Vec<(&[f32], usize)> = tensors.iter().zip(offs).map(|(t, o)| (&t[..], o)).collect();
        r::gather(&mut flat, &parts);
        let mut back: Vec<Vec<f32>> = lens.iter().map(|&l| vec![0.0; l]).collect();
        let mut parts: Vec<(&mut [f32], usize)> = back.iter_mut().zip(offs).map(|(t, o)| (&mut t[..], o)).collect();
        r::scatter(&flat, &mut parts);
        assert_eq!(back, tensors);
    }
}

#[cfg(not(feature = "cuda"))]
#[test]
fn gpu_kernels_match_references() {
    eprintln!("SKIPPED: kernel tests need --features cuda and a GPU");
}

#[cfg(feature = "cuda")]
mod gpu {
    use kutta_trainer::kernels::cuda::RkKernels;
    use kutta_trainer::optim::gpu::check;

    /// The kernels on device 0, or None after printing why they cannot run here.
    fn kernels_or_skip() -> Option<RkKernels> {
        match check::open(0) {
            Ok(k) => Some(k),
            Err(e) => {
                eprintln!("SKIPPED: kernel tests need a usable CUDA device: {e}");
                None
            }
        }
    }

    /// `optim::gpu::check::run` (the checks `kutta bench kernels` runs too): every check passes.
    #[test]
    fn gpu_kernels_match_references() {
        let Some(k) = kernels_or_skip() else { return };
        let report = check::run(&k).expect("the kernel checks ran");
        eprintln!("{}", report.table());
        let failures: Vec<String> = report
            .failures()
            .iter()
            .map(|r| {
                format!("{}: relative error {:e} > {:e} ({})", r.check, r.max_rel_error, r.tolerance, r.worst_case)
            })
            .collect();
        assert!(
            failures.is_empty(),
            "{} of {} kernel checks failed:\n{}",
            failures.len(),
            report.rows.len(),
            failures.join("\n")
        );
        assert!(report.passed());
        eprintln!("gpu_kernels_match_references: {} kernel calls checked on {}", report.kernel_calls, report.device);
    }
}
