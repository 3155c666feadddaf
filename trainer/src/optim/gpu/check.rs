//! The RK kernels of `rk.cu` checked against their CPU references ([`crate::kernels::reference`]) on a
//! GPU (feature `cuda`). One library function, [`run`], so that the same checks run from the
//! test suite (`trainer/tests/kernels.rs`, `gpu_kernels_match_references`) and from the `kutta`
//! binary (`kutta bench kernels`, which `scripts/gpu-check run` calls on the GPU machine: one
//! binary to carry there instead of a test binary per crate).
//!
//! Every kernel is run on random inputs of many lengths ([`SIZES`]: 0, 1, odd, not a multiple of
//! 4, large), on 16-byte aligned buffers (the float4 path) and on views at an odd offset (the
//! scalar path), with and without D, momentum and the error accumulator. Each buffer sits in a
//! NaN-padded allocation and the padding is checked after every kernel (no out-of-bounds
//! writes). Tolerances: elementwise results to a max-norm relative error of [`ELEM_TOL`] (they are
//! in fact expected to be bit-identical: same operations, no FMA contraction), f64 reductions to
//! [`SUM_TOL`] relative, counts exactly; and the length/segment argument checks must refuse bad
//! calls before launching anything.
//!
//! The result is one [`CheckRow`] per check (a kernel in one configuration, e.g.
//! `stage_point ns=3 D=true`), aggregated over all sizes and both alignments: the largest
//! relative error seen, the case where it was seen, and whether every case passed. A driver
//! error (no device, out of memory, a failed launch) is an `Err`, not a failed row.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::kernels::cuda::{In, KResult, KernelError, RkKernels, Segment};
use crate::kernels::reference as r;

/// Elementwise results: max-norm relative error at most this.
pub const ELEM_TOL: f64 = 1e-6;
/// f64 reductions: relative error at most this.
pub const SUM_TOL: f64 = 1e-9;
/// Buffer lengths every kernel is checked at.
pub const SIZES: [usize; 13] = [0, 1, 2, 3, 4, 5, 7, 8, 31, 1000, 4097, 100_003, (1 << 20) + 3];
/// Seed of the random inputs (the checks are reproducible).
pub const SEED: u64 = 2024;

/// One check, aggregated over all the cases it ran on.
#[derive(Clone, Debug, Serialize)]
pub struct CheckRow {
    /// The kernel and its configuration, e.g. `final_update m=true D=false: acc`.
    pub check: String,
    /// Cases (sizes × alignments) it ran on.
    pub cases: usize,
    /// The largest relative error over the cases (0 for an exact check that held, +∞ — `null`
    /// in JSON — where an exact check failed, a NaN appeared or a kernel wrote out of bounds).
    pub max_rel_error: f64,
    /// The tolerance; 0 for exact checks (counts, argument checks).
    pub tolerance: f64,
    /// The case with the largest error (`n=…, offset=…`), and what went wrong where it failed.
    pub worst_case: String,
    pub pass: bool,
}

/// [`run`]'s result.
#[derive(Clone, Debug, Serialize)]
pub struct CheckReport {
    /// The GPU's name.
    pub device: String,
    /// Kernel launches (method calls) compared with a reference.
    pub kernel_calls: usize,
    pub rows: Vec<CheckRow>,
}

impl CheckReport {
    /// Whether every check passed.
    pub fn passed(&self) -> bool {
        !self.rows.is_empty() && self.rows.iter().all(|r| r.pass)
    }

    pub fn failures(&self) -> Vec<&CheckRow> {
        self.rows.iter().filter(|r| !r.pass).collect()
    }

    /// The largest relative error of the toleranced (non-exact) checks.
    pub fn max_rel_error(&self) -> f64 {
        self.rows.iter().filter(|r| r.tolerance > 0.0).map(|r| r.max_rel_error).fold(0.0, f64::max)
    }

    /// A Markdown table of the rows.
    pub fn table(&self) -> String {
        let mut s = format!(
            "{}: RK kernels against their CPU references, {} kernel calls, {} sizes × 2 alignments\n\n| check | cases | max rel. error | tolerance | worst case | pass |\n|---|---:|---:|---:|---|---|\n",
            self.device,
            self.kernel_calls,
            SIZES.len()
        );
        for r in &self.rows {
            let tol = if r.tolerance > 0.0 { format!("{:.0e}", r.tolerance) } else { "exact".into() };
            s += &format!(
                "| {} | {} | {:.2e} | {} | {} | {} |\n",
                r.check,
                r.cases,
                r.max_rel_error,
                tol,
                r.worst_case,
                if r.pass { "yes" } else { "**NO**" }
            );
        }
        s
    }
}

/// Open the kernels on GPU `ordinal`, or say why not. cudarc panics (instead of returning an
/// error) in a few no-driver situations; in builds that unwind (tests, debug) those panics become
/// errors here too. (Release builds abort on panic: there the process ends with the message.)
pub fn open(ordinal: usize) -> Result<RkKernels, String> {
    match std::panic::catch_unwind(|| RkKernels::on_device(ordinal)) {
        Ok(Ok(k)) => Ok(k),
        Ok(Err(e)) => Err(e.to_string()),
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(format!("creating the CUDA context panicked: {msg}"))
        }
    }
}

/// Run every check on `k`'s device (a few seconds; about 100 MB of device memory).
pub fn run(k: &RkKernels) -> KResult<CheckReport> {
    let s = k.stream().clone();
    let mut rng = ChaCha8Rng::seed_from_u64(SEED);
    let mut rows = Rows::default();
    let mut calls = 0;
    for n in SIZES {
        for off in [0usize, 1] {
            calls += run_case(k, &s, &mut rng, &mut rows, n, off)?;
        }
    }
    argument_errors(k, &s, &mut rows)?;
    calls += solver_steps(&s, &mut rows)?;
    let device = k.context().name().unwrap_or_else(|_| "unknown CUDA device".to_string());
    Ok(CheckReport { device, kernel_calls: calls, rows: rows.rows })
}

fn random(rng: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

/// max_i |a_i − b_i| / max(max_i |b_i|, 1e-30); NaN anywhere or unequal lengths give +∞.
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
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

/// The rows, in the order the checks first ran, aggregated by name.
#[derive(Default)]
struct Rows {
    rows: Vec<CheckRow>,
    index: HashMap<String, usize>,
}

impl Rows {
    fn record(&mut self, check: &str, case: &str, err: f64, tol: f64, note: &str) {
        let err = if err.is_nan() { f64::INFINITY } else { err };
        let pass = err <= tol;
        let i = *self.index.entry(check.to_string()).or_insert_with(|| {
            self.rows.push(CheckRow {
                check: check.to_string(),
                cases: 0,
                max_rel_error: 0.0,
                tolerance: tol,
                worst_case: String::new(),
                pass: true,
            });
            self.rows.len() - 1
        });
        let row = &mut self.rows[i];
        row.cases += 1;
        if row.cases == 1 || err > row.max_rel_error {
            row.max_rel_error = err;
            row.worst_case = if note.is_empty() { case.to_string() } else { format!("{case}: {note}") };
        }
        row.pass &= pass;
    }

    /// An elementwise result against its reference.
    fn elem(&mut self, check: &str, case: &str, gpu: &Host, cpu: &[f32]) {
        if gpu.out_of_bounds {
            self.record(check, case, f64::INFINITY, ELEM_TOL, "a kernel wrote outside its buffer");
        } else {
            self.record(check, case, rel_err(&gpu.data, cpu), ELEM_TOL, "");
        }
    }

    /// An f64 reduction against its reference.
    fn sum(&mut self, check: &str, case: &str, gpu: f64, cpu: f64) {
        let e = (gpu - cpu).abs() / cpu.abs().max(1e-300);
        let note = if e > SUM_TOL { format!("GPU {gpu} vs CPU {cpu}") } else { String::new() };
        self.record(check, case, e, SUM_TOL, &note);
    }

    /// An exact check (a count, an argument check): 0 when it held, +∞ when not.
    fn exact(&mut self, check: &str, case: &str, ok: bool, note: &str) {
        self.record(check, case, if ok { 0.0 } else { f64::INFINITY }, 0.0, if ok { "" } else { note });
    }
}

/// A device copy of `host` placed `off` floats into a NaN-padded allocation (off = 1 makes every
/// view misaligned for float4, so the kernels take their scalar path).
struct Buf {
    dev: CudaSlice<f32>,
    off: usize,
    n: usize,
}

/// A buffer copied back, and whether its padding was overwritten.
struct Host {
    data: Vec<f32>,
    out_of_bounds: bool,
}

impl Buf {
    fn new(s: &Arc<CudaStream>, host: &[f32], off: usize) -> KResult<Buf> {
        let mut padded = vec![f32::NAN; off];
        padded.extend_from_slice(host);
        padded.push(f32::NAN);
        Ok(Buf { dev: s.clone_htod(&padded)?, off, n: host.len() })
    }
    fn zeros(s: &Arc<CudaStream>, n: usize, off: usize) -> KResult<Buf> {
        Self::new(s, &vec![0.0; n], off)
    }
    fn view(&self) -> CudaView<'_, f32> {
        self.dev.slice(self.off..self.off + self.n)
    }
    fn view_mut(&mut self) -> CudaViewMut<'_, f32> {
        self.dev.slice_mut(self.off..self.off + self.n)
    }
    fn host(&self, s: &Arc<CudaStream>) -> KResult<Host> {
        let all = s.clone_dtoh(&self.dev)?;
        let out_of_bounds = !(all[..self.off].iter().all(|v| v.is_nan()) && all[self.off + self.n].is_nan());
        Ok(Host { data: all[self.off..self.off + self.n].to_vec(), out_of_bounds })
    }
    /// Raw-pointer segment for this buffer at `offset` in a flat buffer.
    fn segment(&self, s: &Arc<CudaStream>, offset: usize) -> Segment {
        let (p, _g) = self.dev.device_ptr(s);
        Segment { ptr: p + (self.off * 4) as u64, offset: offset as u64, len: self.n as u64 }
    }
}

/// Every kernel at length `n` and alignment offset `off`; returns the kernel calls checked.
fn run_case(
    k: &RkKernels,
    s: &Arc<CudaStream>,
    rng: &mut ChaCha8Rng,
    rows: &mut Rows,
    n: usize,
    off: usize,
) -> KResult<usize> {
    let case = format!("n={n}, offset={off}");
    let case = case.as_str();
    let mut calls = 0;
    let theta = random(rng, n, -2.0, 2.0);
    let d = random(rng, n, 0.1, 2.0);
    let g = random(rng, n, 0.0, 3.0);
    let m = random(rng, n, -1.0, 1.0);
    let ks: Vec<Vec<f32>> = (0..r::MAX_STAGES).map(|_| random(rng, n, -2.0, 2.0)).collect();
    let coef = random(rng, r::MAX_STAGES, -1.0, 1.0);
    let (theta_d, d_d, g_d, m_d) =
        (Buf::new(s, &theta, off)?, Buf::new(s, &d, off)?, Buf::new(s, &g, off)?, Buf::new(s, &m, off)?);
    let ks_d: Vec<Buf> = ks.iter().map(|v| Buf::new(s, v, off)).collect::<KResult<_>>()?;
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
            let mut x = Buf::zeros(s, n, off)?;
            k.stage_point(&mut x.view_mut(), &tv, d_gpu, &stages_gpu, h)?;
            rows.elem(&format!("stage_point ns={ns} D={with_d}"), case, &x.host(s)?, &want);
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
            let (mut acc_g, mut err_g) = (Buf::new(s, &acc0, off)?, Buf::new(s, &err0, off)?);
            {
                let mut av = acc_g.view_mut();
                let mut ev = err_g.view_mut();
                let err_arg: Option<&mut dyn DevicePtrMut<f32>> = if with_err { Some(&mut ev) } else { None };
                k.accumulate(&mut av, err_arg, &kv[0], b, e)?;
            }
            let what = format!("accumulate err={with_err} b={b} e={e}");
            rows.elem(&format!("{what}: acc"), case, &acc_g.host(s)?, &acc_c);
            rows.elem(&format!("{what}: err"), case, &err_g.host(s)?, &err_c);
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
            let (mut acc_g, mut x_g) = (Buf::new(s, &acc0, off)?, Buf::zeros(s, n, off)?);
            k.final_update(&mut x_g.view_mut(), &tv, &mut acc_g.view_mut(), m_gpu, d_gpu, 0.9, h)?;
            let what = format!("final_update m={with_m} D={with_d}");
            rows.elem(&format!("{what}: x"), case, &x_g.host(s)?, &x_c);
            rows.elem(&format!("{what}: acc"), case, &acc_g.host(s)?, &acc_c);
            let (mut acc_g, mut th_g) = (Buf::new(s, &acc0, off)?, Buf::new(s, &theta, off)?);
            k.final_update_in_place(&mut th_g.view_mut(), &mut acc_g.view_mut(), m_gpu, d_gpu, 0.9, h)?;
            rows.elem(&format!("{what} in place: θ"), case, &th_g.host(s)?, &x_c);
            rows.elem(&format!("{what} in place: acc"), case, &acc_g.host(s)?, &acc_c);
            calls += 2;
        }
    }

    // 4. AdaGrad
    for eps in [1.0f32, 1e-8] {
        let mut want = vec![0.0f32; n];
        r::adagrad_d(&mut want, &g, &ks[0], eps);
        let mut out = Buf::zeros(s, n, off)?;
        k.adagrad_d(&mut out.view_mut(), &gv, &kv[0], eps)?;
        rows.elem(&format!("adagrad_d eps={eps}"), case, &out.host(s)?, &want);
        calls += 1;
    }
    let mut want = g.clone();
    r::adagrad_commit(&mut want, &ks[1]);
    let mut gg = Buf::new(s, &g, off)?;
    k.adagrad_commit(&mut gg.view_mut(), &kv[1])?;
    rows.elem("adagrad_commit", case, &gg.host(s)?, &want);
    calls += 1;

    // 5. reductions
    for with_d in [false, true] {
        let d_cpu = with_d.then_some(&d[..]);
        let d_gpu: Option<In> = if with_d { Some(&dv) } else { None };
        rows.sum(&format!("dnorm2 D={with_d}"), case, k.dnorm2(&kv[0], d_gpu)?, r::dnorm2(&ks[0], d_cpu));
        rows.sum(
            &format!("ddiff2 D={with_d}"),
            case,
            k.ddiff2(&kv[0], &kv[1], d_gpu)?,
            r::ddiff2(&ks[0], &ks[1], d_cpu),
        );
        rows.sum(
            &format!("error_sum D={with_d}"),
            case,
            k.error_sum(&tv, &kv[2], d_gpu, 0.05, 1e-3, 1e-2)?,
            r::error_sum(&theta, &ks[2], d_cpu, 0.05, 1e-3, 1e-2),
        );
        calls += 3;
    }
    let got = k.nonfinite_count(&tv)?;
    rows.exact("nonfinite_count of finite data", case, got == 0, &format!("counted {got}, want 0"));
    let mut bad = theta.clone();
    for (i, v) in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY].into_iter().enumerate() {
        if n > 0 {
            let p = (i * 7919) % n;
            bad[p] = v;
        }
    }
    let bad_d = Buf::new(s, &bad, off)?;
    let (got, want) = (k.nonfinite_count(&bad_d.view())?, r::nonfinite_count(&bad));
    rows.exact("nonfinite_count with NaN/±Inf", case, got == want, &format!("counted {got}, want {want}"));
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
    let tensors_d: Vec<Buf> = tensors.iter().map(|t| Buf::new(s, t, off)).collect::<KResult<_>>()?;
    let mut flat_g = Buf::zeros(s, n, off)?;
    {
        let views: Vec<_> = tensors_d.iter().map(|b| b.view()).collect();
        let parts: Vec<(In, usize)> = views.iter().zip(&offs).map(|(v, o)| (v as In, *o)).collect();
        k.gather(&mut flat_g.view_mut(), &parts)?;
    }
    rows.elem("gather", case, &flat_g.host(s)?, &flat_c);
    // Scatter a different flat buffer back into fresh tensors.
    let flat2 = random(rng, n, -1.0, 1.0);
    let flat2_d = Buf::new(s, &flat2, off)?;
    let mut back_c: Vec<Vec<f32>> = lens.iter().map(|&l| vec![0.0; l]).collect();
    r::scatter(&flat2, &mut back_c.iter_mut().zip(&offs).map(|(t, o)| (&mut t[..], *o)).collect::<Vec<_>>());
    let mut back_d: Vec<Buf> = lens.iter().map(|&l| Buf::zeros(s, l, off)).collect::<KResult<_>>()?;
    {
        let mut views: Vec<_> = back_d.iter_mut().map(|b| b.view_mut()).collect();
        let mut parts: Vec<(&mut dyn DevicePtrMut<f32>, usize)> =
            views.iter_mut().zip(&offs).map(|(v, o)| (v as &mut dyn DevicePtrMut<f32>, *o)).collect();
        k.scatter(&flat2_d.view(), &mut parts)?;
    }
    for (j, (b, c)) in back_d.iter().zip(&back_c).enumerate() {
        rows.elem("scatter", &format!("{case}, tensor {j}"), &b.host(s)?, c);
    }
    // The raw-pointer variants on the same layout.
    let raw: Vec<Segment> = tensors_d.iter().zip(&offs).map(|(b, o)| b.segment(s, *o)).collect();
    let mut flat_r = Buf::zeros(s, n, off)?;
    // SAFETY: the segments point into live buffers of the stated lengths, used on this stream only.
    unsafe { k.gather_raw(&mut flat_r.view_mut(), &raw) }?;
    rows.elem("gather_raw", case, &flat_r.host(s)?, &flat_c);
    let back_raw: Vec<Buf> = lens.iter().map(|&l| Buf::zeros(s, l, off)).collect::<KResult<_>>()?;
    let raw_back: Vec<Segment> = back_raw.iter().zip(&offs).map(|(b, o)| b.segment(s, *o)).collect();
    // SAFETY: as above; the destinations are distinct buffers.
    unsafe { k.scatter_raw(&flat2_d.view(), &raw_back) }?;
    for (j, (b, c)) in back_raw.iter().zip(&back_c).enumerate() {
        rows.elem("scatter_raw", &format!("{case}, tensor {j}"), &b.host(s)?, c);
    }
    calls += 4;
    s.synchronize()?;
    Ok(calls)
}

/// Mismatched lengths and bad segments are errors, not launches.
fn argument_errors(k: &RkKernels, s: &Arc<CudaStream>, rows: &mut Rows) -> KResult<()> {
    let a = s.alloc_zeros::<f32>(10)?;
    let b = s.alloc_zeros::<f32>(11)?;
    let mut x = s.alloc_zeros::<f32>(10)?;
    let is_args = |r: Result<(), KernelError>| matches!(r, Err(KernelError::Args(_)));
    let mut refused = |what: &str, ok: bool| rows.exact(&format!("argument check: {what}"), "n=10", ok, "not refused");
    refused("stage_point θ of another length", is_args(k.stage_point(&mut x, &b, None, &[], 0.1)));
    refused("stage_point stage of another length", is_args(k.stage_point(&mut x, &a, None, &[(&b as In, 1.0)], 0.1)));
    let nine: Vec<(In, f32)> = (0..9).map(|_| (&a as In, 1.0)).collect();
    refused("stage_point with 9 stages", is_args(k.stage_point(&mut x, &a, None, &nine, 0.1)));
    refused("accumulate k of another length", is_args(k.accumulate(&mut x, None, &b, 1.0, 0.0)));
    refused("adagrad_d k1 of another length", is_args(k.adagrad_d(&mut x, &a, &b, 1.0)));
    refused("dnorm2 D of another length", matches!(k.dnorm2(&a, Some(&b)), Err(KernelError::Args(_))));
    // Overlapping / out-of-range segments.
    let mut flat = s.alloc_zeros::<f32>(15)?;
    refused("gather overlapping segments", is_args(k.gather(&mut flat, &[(&a as In, 0), (&a as In, 5)])));
    refused("gather segment past the end", is_args(k.gather(&mut flat, &[(&a as In, 6)])));
    let ok = k.gather(&mut flat, &[(&a as In, 5)]);
    rows.exact("argument check: gather of a valid segment runs", "n=10", ok.is_ok(), &format!("{:?}", ok.err()));
    // A table not checked for disjointness cannot gather; a table is tied to a flat length.
    let (pa, _g) = a.device_ptr(s);
    let seg = |offset| Segment { ptr: pa, offset, len: 10 };
    let overlapping = k.segment_table(&[seg(0), seg(5)], 15, false)?;
    // SAFETY: the launch is refused before anything runs.
    let r = unsafe { k.gather_table(&mut flat, &overlapping) };
    rows.exact(
        "argument check: gather with an unchecked table",
        "n=10",
        matches!(r, Err(KernelError::Args(_))),
        "not refused",
    );
    let r = k.segment_table(&[seg(0), seg(5)], 15, true);
    rows.exact(
        "argument check: disjoint table of overlapping segments",
        "n=10",
        matches!(r, Err(KernelError::Args(_))),
        "not refused",
    );
    let table = k.segment_table(&[seg(5)], 15, true)?;
    let mut short = s.alloc_zeros::<f32>(14)?;
    // SAFETY: refused before anything runs.
    let r = unsafe { k.gather_table(&mut short, &table) };
    rows.exact(
        "argument check: table used with a shorter flat buffer",
        "n=10",
        matches!(r, Err(KernelError::Args(_))),
        "not refused",
    );
    // SAFETY: a lives until the end of this function; the stream is synchronized below.
    let r = unsafe { k.gather_table(&mut flat, &table) };
    rows.exact("argument check: gather with a valid table runs", "n=10", r.is_ok(), &format!("{:?}", r.err()));
    s.synchronize()?;
    Ok(())
}

// ---- whole RK steps: the solver on the GPU back end against the host solver ------------------

/// Whole trajectories: θ after [`SOLVER_STEPS`] steps of `RkSolver<f32, Arc<RkKernels>>` against
/// `RkSolver<f32, Host>` (max-norm relative error), with the same gradient oracle. Elementwise
/// kernels are bit-identical to the references; the f64 reductions (DALR's v, the error norm)
/// may differ in the last bits, which can move h by an f32 ulp and so θ slightly after many steps.
pub const SOLVER_TOL: f64 = 1e-5;
/// Steps per solver trajectory.
pub const SOLVER_STEPS: u64 = 12;

/// A diagonal quadratic whose θ and gradient are device buffers: the gradient is computed on the
/// host (the point is the solver's buffer arithmetic, not the oracle).
struct DeviceQuadratic {
    q: crate::field::DiagonalQuadratic,
    stream: Arc<CudaStream>,
    theta: Vec<f32>,
    grad: Vec<f32>,
}

impl crate::field::VectorField<f32, CudaSlice<f32>> for DeviceQuadratic {
    fn dim(&self) -> usize {
        self.q.lambda.len()
    }
    fn eval(&mut self, theta: &CudaSlice<f32>, grad: &mut CudaSlice<f32>) -> crate::Result<f64> {
        let drv = |e: cudarc::driver::DriverError| crate::Error::from(KernelError::from(e));
        self.stream.memcpy_dtoh(theta, &mut self.theta).map_err(drv)?;
        let loss = crate::field::VectorField::<f32>::eval(&mut self.q, &self.theta, &mut self.grad)?;
        self.stream.memcpy_htod(&self.grad, grad).map_err(drv)?;
        Ok(loss)
    }
}

fn solver_steps(s: &Arc<CudaStream>, rows: &mut Rows) -> KResult<usize> {
    use crate::optim::rk::{Preconditioner, RkOptions, RkSolver, StepSize};
    use crate::optim::step_size::{DalrEstimator, ErrorControl};
    use crate::optim::Optimizer;
    use crate::tableau::Tableau;

    let dalr = |estimator| StepSize::Dalr { c: 0.5, p: 1.0, estimator, fd_eps: 1e-3 };
    let cases: Vec<(&str, Preconditioner, StepSize, f64, bool)> = vec![
        ("rk4", Preconditioner::None, StepSize::Constant { lr: 0.05 }, 0.0, true),
        ("rk4", Preconditioner::ModifiedAdagrad, dalr(DalrEstimator::Stage), 0.9, true),
        ("rk4", Preconditioner::ModifiedAdagrad, dalr(DalrEstimator::Stage), 0.9, false),
        ("bs32", Preconditioner::Adagrad { eps: 1e-8 }, dalr(DalrEstimator::FiniteDifference), 0.5, true),
        (
            "dopri54",
            Preconditioner::None,
            StepSize::ErrorControlled {
                h0: 0.3,
                control: ErrorControl { atol: 1e-4, rtol: 1e-4, ..Default::default() },
            },
            0.0,
            true,
        ),
        (
            "dopri54",
            Preconditioner::ModifiedAdagrad,
            StepSize::ErrorControlled { h0: 0.3, control: ErrorControl::default() },
            0.9,
            false,
        ),
    ];
    let mut rng = ChaCha8Rng::seed_from_u64(SEED + 1);
    let p = 4099;
    let lambda: Vec<f64> = (0..p).map(|_| rng.random_range(0.1..10.0)).collect();
    let theta0 = random(&mut rng, p, -1.0, 1.0);
    let kernels = Arc::new(RkKernels::new(s.clone())?);
    let mut calls = 0;
    for (tableau, pre, step_size, momentum, streaming) in cases {
        let opts = RkOptions {
            tableau: Tableau::builtin(tableau).expect("builtin tableau"),
            preconditioner: pre,
            step_size: step_size.clone(),
            momentum,
            streaming,
            nonfinite_retries: 4,
        };
        let name = format!(
            "rk solver {SOLVER_STEPS} steps: {tableau} D={} mom={momentum} {} streaming={streaming}",
            pre != Preconditioner::None,
            step_kind(&step_size)
        );
        let args = |e: crate::Error| KernelError::Args(format!("{name}: {e}"));
        let mut host = RkSolver::<f32>::new(opts.clone()).map_err(args)?;
        let mut gpu = RkSolver::with_backend(opts, kernels.clone()).map_err(args)?;
        let mut th_host = theta0.clone();
        let mut th_gpu = s.clone_htod(&theta0)?;
        let mut f_host = crate::field::DiagonalQuadratic::new(lambda.clone());
        let mut f_gpu = DeviceQuadratic {
            q: crate::field::DiagonalQuadratic::new(lambda.clone()),
            stream: s.clone(),
            theta: vec![0.0; p],
            grad: vec![0.0; p],
        };
        let mut same_h = true;
        for n in 0..SOLVER_STEPS {
            let a = host.step(n, &mut th_host, &mut f_host).map_err(args)?;
            let b = gpu.step_on(n, &mut th_gpu, &mut f_gpu).map_err(args)?;
            // h comes from f64 sums whose order differs on the GPU (DALR, error control).
            same_h &= (a.h - b.h).abs() <= 1e-6 * a.h.abs() && a.grad_evals == b.grad_evals && a.rejected == b.rejected;
            calls += 1;
        }
        let got = s.clone_dtoh(&th_gpu)?;
        let mut err = rel_err(&got, &th_host);
        let mut note = if same_h {
            "same h (1e-6), evaluations and rejections every step".to_string()
        } else {
            "h or the attempt count differed".to_string()
        };
        let st_host = host.state_on_host().map_err(args)?;
        let st_gpu = gpu.state_on_host().map_err(args)?;
        for ((name_h, a), (name_g, b)) in st_host.buffers.iter().zip(&st_gpu.buffers) {
            if name_h != name_g {
                err = f64::INFINITY;
                note = format!("state buffers {name_h} vs {name_g}");
            } else {
                err = err.max(rel_err(b, a));
            }
        }
        if st_host.buffers.len() != st_gpu.buffers.len() {
            err = f64::INFINITY;
            note = "state buffers differ in number".into();
        }
        rows.record(&name, &format!("n={p}"), err, SOLVER_TOL, &note);
    }
    Ok(calls)
}

fn step_kind(s: &crate::optim::rk::StepSize) -> &'static str {
    use crate::optim::rk::StepSize;
    use crate::optim::step_size::DalrEstimator;
    match s {
        StepSize::Constant { .. } => "constant",
        StepSize::Cosine { .. } => "cosine",
        StepSize::Dalr { estimator: DalrEstimator::Stage, .. } => "dalr(stage)",
        StepSize::Dalr { .. } => "dalr(fd)",
        StepSize::ErrorControlled { .. } => "error-controlled",
    }
}
