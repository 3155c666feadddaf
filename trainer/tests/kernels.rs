//! The RK kernels (`trainer/src/kernels/rk.cu`) against their CPU references
//! (`kutta_trainer::kernels::reference`), and the references against each other.
//!
//! - `references_agree_with_each_other` runs everywhere (no GPU, no feature).
//! - `gpu_kernels_match_references` needs `--features cuda` and a GPU. Without the feature it
//!   prints `SKIPPED: kernel tests need --features cuda and a GPU` and passes; with the feature
//!   but no usable device (the driver reports an error, or cudarc cannot load libcuda) it prints
//!   `SKIPPED: …` with the reason and passes. Where it runs, every kernel is checked on random
//!   inputs of many lengths (0, 1, odd, not a multiple of 4, large), on 16-byte aligned buffers
//!   (the float4 path) and on views at an odd offset (the scalar path), with and without D,
//!   momentum and the error accumulator: elementwise results to a max-norm relative error of
//!   1e-6 (they are in fact expected to be bit-identical: same operations, no FMA contraction),
//!   f64 reductions to 1e-9 relative, counts exactly.
//! - `gpu_bandwidth_report` (ignored; `--features cuda -- --ignored --nocapture`) prints each
//!   kernel's achieved bandwidth next to the device's copy bandwidth.

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

#[cfg(not(feature = "cuda"))]
#[test]
#[ignore = "needs --features cuda and a GPU"]
fn gpu_bandwidth_report() {
    eprintln!("SKIPPED: the bandwidth report needs --features cuda and a GPU");
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::*;
    use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
    use kutta_trainer::kernels::cuda::{In, KernelError, RkKernels, Segment};
    use std::sync::Arc;

    /// max_i |a_i − b_i| / max(max_i |b_i|, 1e-30); NaN anywhere gives +∞.
    fn rel_err(a: &[f32], b: &[f32]) -> f64 {
        assert_eq!(a.len(), b.len());
        let mut num = 0.0f64;
        let mut den = 1e-30f64;
        for (x, y) in a.iter().zip(b) {
            if x.is_nan() || y.is_nan() {
                return f64::INFINITY;
            }
            num = num.max((*x as f64 - *y as f64).abs());
            den = den.max((*y as f64).abs());
        }
        num / den
    }

    const ELEM_TOL: f64 = 1e-6;
    const SUM_TOL: f64 = 1e-9;

    /// The kernels on device 0, or None after printing why they cannot run here.
    fn kernels_or_skip() -> Option<RkKernels> {
        // cudarc panics (instead of returning an error) in a few no-driver situations; treat
        // those like errors.
        match std::panic::catch_unwind(|| RkKernels::on_device(0)) {
            Ok(Ok(k)) => Some(k),
            Ok(Err(e)) => {
                eprintln!("SKIPPED: kernel tests need a usable CUDA device: {e}");
                None
            }
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                eprintln!("SKIPPED: kernel tests need a usable CUDA device: creating the context panicked: {msg}");
                None
            }
        }
    }

    /// A device copy of `host` placed `off` floats into a padded allocation (off = 1 makes every
    /// view misaligned for float4, so the kernels take their scalar path).
    struct Buf {
        dev: CudaSlice<f32>,
        off: usize,
        n: usize,
    }

    impl Buf {
        fn new(s: &Arc<CudaStream>, host: &[f32], off: usize) -> Buf {
            let mut padded = vec![f32::NAN; off];
            padded.extend_from_slice(host);
            padded.push(f32::NAN);
            Buf { dev: s.clone_htod(&padded).unwrap(), off, n: host.len() }
        }
        fn view(&self) -> cudarc::driver::CudaView<'_, f32> {
            self.dev.slice(self.off..self.off + self.n)
        }
        fn view_mut(&mut self) -> cudarc::driver::CudaViewMut<'_, f32> {
            self.dev.slice_mut(self.off..self.off + self.n)
        }
        fn host(&self, s: &Arc<CudaStream>) -> Vec<f32> {
            let all = s.clone_dtoh(&self.dev).unwrap();
            // The padding must be untouched (no out-of-bounds writes).
            assert!(all[..self.off].iter().all(|v| v.is_nan()) && all[self.off + self.n].is_nan(), "a kernel wrote outside its buffer");
            all[self.off..self.off + self.n].to_vec()
        }
    }

    fn check(what: &str, gpu: &[f32], cpu: &[f32]) {
        let e = rel_err(gpu, cpu);
        assert!(e <= ELEM_TOL, "{what}: relative error {e:e} > {ELEM_TOL:e}");
    }

    fn check_sum(what: &str, gpu: f64, cpu: f64) {
        let e = (gpu - cpu).abs() / cpu.abs().max(1e-300);
        assert!(e <= SUM_TOL, "{what}: GPU {gpu} vs CPU {cpu}, relative error {e:e}");
    }

    #[test]
    fn gpu_kernels_match_references() {
        let Some(k) = kernels_or_skip() else { return };
        let s = k.stream().clone();
        let mut rng = ChaCha8Rng::seed_from_u64(2024);
        let mut cases = 0;
        for n in [0usize, 1, 2, 3, 4, 5, 7, 8, 31, 1000, 4097, 100_003, (1 << 20) + 3] {
            for off in [0usize, 1] {
                cases += run_case(&k, &s, &mut rng, n, off);
            }
        }
        argument_errors(&k, &s);
        eprintln!("gpu_kernels_match_references: {cases} kernel calls checked on {}", k.context().name().unwrap_or_default());
    }

    fn run_case(k: &RkKernels, s: &Arc<CudaStream>, rng: &mut ChaCha8Rng, n: usize, off: usize) -> usize {
        let tag = |what: &str| format!("{what} (n={n}, offset={off})");
        let mut calls = 0;
        let theta = random(rng, n, -2.0, 2.0);
        let d = random(rng, n, 0.1, 2.0);
        let g = random(rng, n, 0.0, 3.0);
        let m = random(rng, n, -1.0, 1.0);
        let ks: Vec<Vec<f32>> = (0..r::MAX_STAGES).map(|_| random(rng, n, -2.0, 2.0)).collect();
        let coef = random(rng, r::MAX_STAGES, -1.0, 1.0);
        let (theta_d, d_d, g_d, m_d) = (Buf::new(s, &theta, off), Buf::new(s, &d, off), Buf::new(s, &g, off), Buf::new(s, &m, off));
        let ks_d: Vec<Buf> = ks.iter().map(|v| Buf::new(s, v, off)).collect();
        let (tv, dv, gv, mv) = (theta_d.view(), d_d.view(), g_d.view(), m_d.view());
        let kv: Vec<_> = ks_d.iter().map(|b| b.view()).collect();
        let h = 0.037f32;

        // 1. stage point
        for with_d in [false, true] {
            let d_cpu = with_d.then_some(&d[..]);
            let d_gpu: Option<In> = if with_d { Some(&dv) } else { None };
            for ns in [0usize, 1, 2, 3, 6, 8] {
                let stages_cpu: Vec<(&[f32], f32)> = (0..ns).map(|j| (&ks[j][..], coef[j])).collect();
                let stages_gpu: Vec<(In, f32)> = (0..ns).map(|j| (&kv[j] as In, coef[j])).collect();
                let mut want = vec![0.0f32; n];
                r::stage_point(&mut want, &theta, d_cpu, &stages_cpu, h);
                let mut x = Buf::new(s, &vec![0.0; n], off);
                k.stage_point(&mut x.view_mut(), &tv, d_gpu, &stages_gpu, h).unwrap();
                check(&tag(&format!("stage_point ns={ns} D={with_d}")), &x.host(s), &want);
                calls += 1;
            }
        }

        // 2. accumulate
        for with_err in [false, true] {
            for (b, e) in [(0.3f32, -0.1f32), (0.0, 0.2), (0.25, 0.0)] {
                let acc0 = random(rng, n, -1.0, 1.0);
                let err0 = random(rng, n, -1.0, 1.0);
                let (mut acc_c, mut err_c) = (acc0.clone(), err0.clone());
                r::accumulate(&mut acc_c, with_err.then_some(&mut err_c[..]), &ks[0], b, e);
                let (mut acc_g, mut err_g) = (Buf::new(s, &acc0, off), Buf::new(s, &err0, off));
                {
                    let mut av = acc_g.view_mut();
                    let mut ev = err_g.view_mut();
                    let err_arg: Option<&mut dyn cudarc::driver::DevicePtrMut<f32>> = if with_err { Some(&mut ev) } else { None };
                    k.accumulate(&mut av, err_arg, &kv[0], b, e).unwrap();
                }
                let what = format!("accumulate err={with_err} b={b} e={e}");
                check(&tag(&format!("{what}: acc")), &acc_g.host(s), &acc_c);
                check(&tag(&format!("{what}: err")), &err_g.host(s), &err_c);
                calls += 1;
            }
        }

        // 3. final update (out of place and in place)
        for with_m in [false, true] {
            for with_d in [false, true] {
                let (m_cpu, d_cpu) = (with_m.then_some(&m[..]), with_d.then_some(&d[..]));
                let m_gpu: Option<In> = if with_m { Some(&mv) } else { None };
                let d_gpu: Option<In> = if with_d { Some(&dv) } else { None };
                let acc0 = random(rng, n, -1.0, 1.0);
                let (mut acc_c, mut x_c) = (acc0.clone(), vec![0.0f32; n]);
                r::final_update(&mut x_c, &theta, &mut acc_c, m_cpu, d_cpu, 0.9, h);
                let (mut acc_g, mut x_g) = (Buf::new(s, &acc0, off), Buf::new(s, &vec![0.0; n], off));
                k.final_update(&mut x_g.view_mut(), &tv, &mut acc_g.view_mut(), m_gpu, d_gpu, 0.9, h).unwrap();
                let what = format!("final_update m={with_m} D={with_d}");
                check(&tag(&format!("{what}: x")), &x_g.host(s), &x_c);
                check(&tag(&format!("{what}: acc")), &acc_g.host(s), &acc_c);
                let (mut acc_g, mut th_g) = (Buf::new(s, &acc0, off), Buf::new(s, &theta, off));
                k.final_update_in_place(&mut th_g.view_mut(), &mut acc_g.view_mut(), m_gpu, d_gpu, 0.9, h).unwrap();
                check(&tag(&format!("{what} in place: θ")), &th_g.host(s), &x_c);
                check(&tag(&format!("{what} in place: acc")), &acc_g.host(s), &acc_c);
                calls += 2;
            }
        }

        // 4. AdaGrad
        for eps in [1.0f32, 1e-8] {
            let mut want = vec![0.0f32; n];
            r::adagrad_d(&mut want, &g, &ks[0], eps);
            let mut out = Buf::new(s, &vec![0.0; n], off);
            k.adagrad_d(&mut out.view_mut(), &gv, &kv[0], eps).unwrap();
            check(&tag(&format!("adagrad_d eps={eps}")), &out.host(s), &want);
            calls += 1;
        }
        let mut want = g.clone();
        r::adagrad_commit(&mut want, &ks[1]);
        let mut gg = Buf::new(s, &g, off);
        k.adagrad_commit(&mut gg.view_mut(), &kv[1]).unwrap();
        check(&tag("adagrad_commit"), &gg.host(s), &want);
        calls += 1;

        // 5. reductions
        for with_d in [false, true] {
            let d_cpu = with_d.then_some(&d[..]);
            let d_gpu: Option<In> = if with_d { Some(&dv) } else { None };
            check_sum(&tag(&format!("dnorm2 D={with_d}")), k.dnorm2(&kv[0], d_gpu).unwrap(), r::dnorm2(&ks[0], d_cpu));
            check_sum(
                &tag(&format!("ddiff2 D={with_d}")),
                k.ddiff2(&kv[0], &kv[1], d_gpu).unwrap(),
                r::ddiff2(&ks[0], &ks[1], d_cpu),
            );
            check_sum(
                &tag(&format!("error_sum D={with_d}")),
                k.error_sum(&tv, &kv[2], d_gpu, 0.05, 1e-3, 1e-2).unwrap(),
                r::error_sum(&theta, &ks[2], d_cpu, 0.05, 1e-3, 1e-2),
            );
            calls += 3;
        }
        assert_eq!(k.nonfinite_count(&tv).unwrap(), 0, "{}", tag("nonfinite_count of finite data"));
        let mut bad = theta.clone();
        for (i, v) in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY].into_iter().enumerate() {
            if n > 0 {
                let p = (i * 7919) % n;
                bad[p] = v;
            }
        }
        let bad_d = Buf::new(s, &bad, off);
        assert_eq!(k.nonfinite_count(&bad_d.view()).unwrap(), r::nonfinite_count(&bad), "{}", tag("nonfinite_count"));
        calls += 2;

        // 6. gather / scatter: tensors of random lengths (some empty), laid out in shuffled order.
        let mut lens = Vec::new();
        let mut left = n;
        while left > 0 {
            let l = rng.random_range(0..=left.min(40_000));
            lens.push(l);
            left -= l;
        }
        lens.push(0);
        let mut order: Vec<usize> = (0..lens.len()).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.random_range(0..=i));
        }
        let mut offs = vec![0usize; lens.len()];
        let mut pos = 0;
        for &t in &order {
            offs[t] = pos;
            pos += lens[t];
        }
        let tensors: Vec<Vec<f32>> = lens.iter().map(|&l| random(rng, l, -1.0, 1.0)).collect();
        let mut flat_c = vec![0.0f32; n];
        r::gather(&mut flat_c, &tensors.iter().zip(&offs).map(|(t, o)| (&t[..], *o)).collect::<Vec<_>>());
        let tensors_d: Vec<Buf> = tensors.iter().map(|t| Buf::new(s, t, off)).collect();
        let mut flat_g = Buf::new(s, &vec![0.0; n], off);
        {
            let views: Vec<_> = tensors_d.iter().map(|b| b.view()).collect();
            let parts: Vec<(In, usize)> = views.iter().zip(&offs).map(|(v, o)| (v as In, *o)).collect();
            k.gather(&mut flat_g.view_mut(), &parts).unwrap();
        }
        check(&tag("gather"), &flat_g.host(s), &flat_c);
        // Scatter a different flat buffer back into fresh tensors.
        let flat2 = random(rng, n, -1.0, 1.0);
        let flat2_d = Buf::new(s, &flat2, off);
        let mut back_c: Vec<Vec<f32>> = lens.iter().map(|&l| vec![0.0; l]).collect();
        r::scatter(&flat2, &mut back_c.iter_mut().zip(&offs).map(|(t, o)| (&mut t[..], *o)).collect::<Vec<_>>());
        let mut back_d: Vec<Buf> = lens.iter().map(|&l| Buf::new(s, &vec![0.0; l], off)).collect();
        {
            let mut views: Vec<_> = back_d.iter_mut().map(|b| b.view_mut()).collect();
            let mut parts: Vec<(&mut dyn cudarc::driver::DevicePtrMut<f32>, usize)> =
                views.iter_mut().zip(&offs).map(|(v, o)| (v as &mut dyn cudarc::driver::DevicePtrMut<f32>, *o)).collect();
            k.scatter(&flat2_d.view(), &mut parts).unwrap();
        }
        for (j, (b, c)) in back_d.iter().zip(&back_c).enumerate() {
            check(&tag(&format!("scatter tensor {j}")), &b.host(s), c);
        }
        // The raw-pointer variants on the same layout.
        let raw: Vec<Segment> = tensors_d
            .iter()
            .zip(&offs)
            .map(|(b, o)| {
                let (p, _g) = b.dev.device_ptr(s);
                Segment { ptr: p + (b.off * 4) as u64, offset: *o as u64, len: b.n as u64 }
            })
            .collect();
        let mut flat_r = Buf::new(s, &vec![0.0; n], off);
        // SAFETY: the segments point into live buffers of the stated lengths, used on this stream only.
        unsafe { k.gather_raw(&mut flat_r.view_mut(), &raw) }.unwrap();
        check(&tag("gather_raw"), &flat_r.host(s), &flat_c);
        let back_raw: Vec<Buf> = lens.iter().map(|&l| Buf::new(s, &vec![0.0; l], off)).collect();
        let raw_back: Vec<Segment> = back_raw
            .iter()
            .zip(&offs)
            .map(|(b, o)| {
                let (p, _g) = b.dev.device_ptr(s);
                Segment { ptr: p + (b.off * 4) as u64, offset: *o as u64, len: b.n as u64 }
            })
            .collect();
        // SAFETY: as above; the destinations are distinct buffers.
        unsafe { k.scatter_raw(&flat2_d.view(), &raw_back) }.unwrap();
        for (j, (b, c)) in back_raw.iter().zip(&back_c).enumerate() {
            check(&tag(&format!("scatter_raw tensor {j}")), &b.host(s), c);
        }
        calls += 4;
        s.synchronize().unwrap();
        calls
    }

    /// Mismatched lengths and bad segments are errors, not launches.
    fn argument_errors(k: &RkKernels, s: &Arc<CudaStream>) {
        let a = s.alloc_zeros::<f32>(10).unwrap();
        let b = s.alloc_zeros::<f32>(11).unwrap();
        let mut x = s.alloc_zeros::<f32>(10).unwrap();
        let is_args = |r: Result<(), KernelError>| matches!(r, Err(KernelError::Args(_)));
        assert!(is_args(k.stage_point(&mut x, &b, None, &[], 0.1)));
        assert!(is_args(k.stage_point(&mut x, &a, None, &[(&b as In, 1.0)], 0.1)));
        let nine: Vec<(In, f32)> = (0..9).map(|_| (&a as In, 1.0)).collect();
        assert!(is_args(k.stage_point(&mut x, &a, None, &nine, 0.1)));
        assert!(is_args(k.accumulate(&mut x, None, &b, 1.0, 0.0)));
        assert!(is_args(k.adagrad_d(&mut x, &a, &b, 1.0)));
        assert!(matches!(k.dnorm2(&a, Some(&b)), Err(KernelError::Args(_))));
        // Overlapping / out-of-range segments.
        let mut flat = s.alloc_zeros::<f32>(15).unwrap();
        assert!(is_args(k.gather(&mut flat, &[(&a as In, 0), (&a as In, 5)])));
        assert!(is_args(k.gather(&mut flat, &[(&a as In, 6)])));
        assert!(k.gather(&mut flat, &[(&a as In, 5)]).is_ok());
        // A table not checked for disjointness cannot gather; a table is tied to a flat length.
        let (pa, _g) = a.device_ptr(s);
        let seg = |offset| Segment { ptr: pa, offset, len: 10 };
        let overlapping = k.segment_table(&[seg(0), seg(5)], 15, false).unwrap();
        // SAFETY: the launch is refused before anything runs.
        assert!(matches!(unsafe { k.gather_table(&mut flat, &overlapping) }, Err(KernelError::Args(_))));
        assert!(matches!(k.segment_table(&[seg(0), seg(5)], 15, true), Err(KernelError::Args(_))));
        let table = k.segment_table(&[seg(5)], 15, true).unwrap();
        let mut short = s.alloc_zeros::<f32>(14).unwrap();
        // SAFETY: refused before anything runs.
        assert!(matches!(unsafe { k.gather_table(&mut short, &table) }, Err(KernelError::Args(_))));
        // SAFETY: a lives until the end of this function; the stream is synchronized below.
        assert!(unsafe { k.gather_table(&mut flat, &table) }.is_ok());
        s.synchronize().unwrap();
    }

    #[test]
    #[ignore = "a measurement; run with --features cuda -- --ignored --nocapture on a GPU"]
    fn gpu_bandwidth_report() {
        let Some(k) = kernels_or_skip() else { return };
        let n: usize = std::env::var("KUTTA_BW_FLOATS").ok().and_then(|v| v.parse().ok()).unwrap_or(64 << 20);
        let report = k.bandwidth(n, 20).unwrap();
        println!("{}", report.table());
        let slow = report.below(0.8);
        if !slow.is_empty() {
            println!("below 80 % of copy bandwidth: {:?}", slow.iter().map(|r| &r.kernel).collect::<Vec<_>>());
        }
    }
}
