//! The RK kernels of `rk.cu` on a CUDA device, through cudarc (feature `cuda`).
//!
//! [`RkKernels`] loads the PTX that `build.rs` compiled with nvcc (at build time, so a
//! `--features cuda` build without a GPU, as in CI, still catches kernel compile errors) once
//! into a context and launches every kernel on one stream. Each method checks lengths and
//! contexts, then launches asynchronously; the reductions copy their f64 result back and so
//! synchronize the stream. The arithmetic of every method is defined by the function of the same
//! name in [`super::reference`] (which follows `optim::rk` operation for operation); the kernels
//! are compiled without FMA contraction and with IEEE division/sqrt, so elementwise results are
//! bit-identical to the references, and reductions agree to f64 rounding.
//!
//! Buffers are passed as `&dyn DevicePtr<f32>` (read) and `&mut dyn DevicePtrMut<f32>` (written):
//! `CudaSlice<f32>`, `CudaView<f32>` or `CudaViewMut<f32>`. Optional buffers are `Option`s:
//! `d: None` means D = I, `err: None` no embedded error accumulator, `m: None` no momentum.
//! cudarc's event tracking orders the launches after earlier writes to these buffers from other
//! streams, as for its own copies.

use std::sync::{Arc, Mutex};

use cudarc::driver::{
    sys, CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, DeviceSlice,
    DriverError, LaunchConfig, PushKernelArg, SyncOnDrop,
};
use cudarc::nvrtc::Ptx;
use serde::Serialize;

use super::reference::MAX_STAGES;

/// The PTX of `rk.cu`, compiled by `build.rs` for `compute_$CUDA_COMPUTE_CAP` (default 90).
pub const RK_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/rk.ptx"));

/// Threads per block of every launch (a multiple of 32, as the reductions require).
const BLOCK: u32 = 256;
/// Most blocks of the first reduction pass = entries of the partial-sum buffer.
const REDUCE_BLOCKS: usize = 1024;

/// A read-only device buffer of f32.
pub type In<'a> = &'a dyn DevicePtr<f32>;

/// A flat f32 buffer on the GPU: what the RK solver's GPU back end holds (`super::backend`).
pub type DeviceBuf = CudaSlice<f32>;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("CUDA driver: {0}")]
    Driver(#[from] DriverError),
    #[error("RK kernel arguments: {0}")]
    Args(String),
}

pub type KResult<T> = std::result::Result<T, KernelError>;

/// CUDA devices the driver sees (0 when it cannot be asked).
pub fn device_count() -> usize {
    CudaContext::device_count().map_or(0, |n| n.max(0) as usize)
}

/// GPU memory in use on `device`'s GPU, in bytes: total − free as the driver reports it (every
/// process on that GPU and the CUDA context included, and candle's freed-but-pooled blocks).
/// None on the CPU.
pub fn device_used_bytes(device: &candle_core::Device) -> Option<u64> {
    let d = device.as_cuda_device().ok()?;
    let (free, total) = d.cuda_stream().context().mem_get_info().ok()?;
    Some(total.saturating_sub(free) as u64)
}

fn args_err<T>(msg: impl Into<String>) -> KResult<T> {
    Err(KernelError::Args(msg.into()))
}

/// The stage gradients of one stage point (`StageTable` in rk.cu: 8 pointers then 8 floats).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct StageTable {
    k: [u64; MAX_STAGES],
    a: [f32; MAX_STAGES],
}
// SAFETY: plain old data with the C layout of `StageTable` in rk.cu.
unsafe impl DeviceRepr for StageTable {}

/// One gather/scatter segment (`Segment` in rk.cu): `len` floats at device address `ptr`, at
/// `offset` (in floats) in the flat buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub ptr: sys::CUdeviceptr,
    pub offset: u64,
    pub len: u64,
}
// SAFETY: three u64, the C layout of `Segment` in rk.cu.
unsafe impl DeviceRepr for Segment {}

struct Functions {
    stage_point: CudaFunction,
    accumulate: CudaFunction,
    final_update: CudaFunction,
    adagrad_d: CudaFunction,
    adagrad_commit: CudaFunction,
    reduce_dnorm2: CudaFunction,
    reduce_ddiff2: CudaFunction,
    reduce_errsum: CudaFunction,
    reduce_nonfinite: CudaFunction,
    reduce_final: CudaFunction,
    gather: CudaFunction,
    scatter: CudaFunction,
}

/// The RK kernels loaded on one CUDA stream.
pub struct RkKernels {
    stream: Arc<CudaStream>,
    f: Functions,
    sm_count: u32,
    /// REDUCE_BLOCKS partial sums, then the final sum.
    scratch: Mutex<CudaSlice<f64>>,
    /// The thread that built these kernels. Candle's stream is the per-thread default stream,
    /// which the driver resolves per calling thread, so a launch from another thread would run
    /// on that thread's stream, unordered with the model's work (see `owner`).
    owner: std::thread::ThreadId,
}

/// Device pointers of the current launch, with cudarc's guards that record the accesses on the
/// stream when dropped (after the launch).
struct Ptrs<'a> {
    stream: &'a CudaStream,
    guards: Vec<SyncOnDrop<'a>>,
}

impl<'a> Ptrs<'a> {
    fn new(stream: &'a CudaStream) -> Self {
        Self { stream, guards: Vec::new() }
    }
    fn rd(&mut self, s: &'a dyn DevicePtr<f32>) -> u64 {
        let (p, g) = s.device_ptr(self.stream);
        self.guards.push(g);
        p
    }
    fn rd_opt(&mut self, s: Option<&'a dyn DevicePtr<f32>>) -> u64 {
        s.map_or(0, |s| self.rd(s))
    }
    fn wr(&mut self, s: &'a mut dyn DevicePtrMut<f32>) -> u64 {
        let (p, g) = s.device_ptr_mut(self.stream);
        self.guards.push(g);
        p
    }
}

impl RkKernels {
    /// Load the kernels into `stream`'s context; they will run on `stream`.
    pub fn new(stream: Arc<CudaStream>) -> KResult<Self> {
        let ctx = stream.context().clone();
        let module = ctx.load_module(Ptx::from_src(RK_PTX))?;
        let load = |name: &str| module.load_function(name);
        let f = Functions {
            stage_point: load("kutta_stage_point")?,
            accumulate: load("kutta_accumulate")?,
            final_update: load("kutta_final_update")?,
            adagrad_d: load("kutta_adagrad_d")?,
            adagrad_commit: load("kutta_adagrad_commit")?,
            reduce_dnorm2: load("kutta_reduce_dnorm2")?,
            reduce_ddiff2: load("kutta_reduce_ddiff2")?,
            reduce_errsum: load("kutta_reduce_errsum")?,
            reduce_nonfinite: load("kutta_reduce_nonfinite")?,
            reduce_final: load("kutta_reduce_final")?,
            gather: load("kutta_gather")?,
            scatter: load("kutta_scatter")?,
        };
        let sm_count = ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?.max(1) as u32;
        let scratch = Mutex::new(stream.alloc_zeros::<f64>(REDUCE_BLOCKS + 1)?);
        Ok(Self { stream, f, sm_count, scratch, owner: std::thread::current().id() })
    }

    /// A new context on device `ordinal` and its default stream. Fails (does not panic) when the
    /// driver finds no such device.
    pub fn on_device(ordinal: usize) -> KResult<Self> {
        let ctx = CudaContext::new(ordinal)?;
        Self::new(ctx.default_stream())
    }

    /// The kernels on candle's stream of `device` (a CUDA device; anything else is an error), so
    /// that they run in order with the model's work there.
    pub fn for_candle(device: &candle_core::Device) -> KResult<Self> {
        match device {
            candle_core::Device::Cuda(cuda) => Self::new(cuda.cuda_stream()),
            other => args_err(format!("the RK kernels need a CUDA device, not {:?}", other.location())),
        }
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The thread that built these kernels: the only one whose launches are ordered with
    /// candle's work on the per-thread stream. Callers check it before using the kernels with a
    /// model (`ModelField::eval_device`).
    pub fn owner(&self) -> std::thread::ThreadId {
        self.owner
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        self.stream.context()
    }

    // ---- argument checks and launch configurations ----

    fn check<S: DeviceSlice<f32> + ?Sized>(&self, what: &str, s: &S, n: usize) -> KResult<()> {
        if s.len() != n {
            return args_err(format!("{what} has {} entries, expected {n}", s.len()));
        }
        if s.stream().context() != self.stream.context() {
            return args_err(format!("{what} lives in another CUDA context than the kernels"));
        }
        Ok(())
    }

    /// `check` for several inputs of length n and an optional preconditioner D.
    fn check_all(&self, n: usize, inputs: &[(&str, In)], d: Option<In>) -> KResult<()> {
        for (what, s) in inputs {
            self.check(what, *s, n)?;
        }
        match d {
            Some(d) => self.check("d", d, n),
            None => Ok(()),
        }
    }

    fn check_ctx<S: DeviceSlice<f32> + ?Sized>(&self, what: &str, s: &S) -> KResult<()> {
        if s.stream().context() != self.stream.context() {
            return args_err(format!("{what} lives in another CUDA context than the kernels"));
        }
        Ok(())
    }

    /// Elementwise kernels: one float4 per thread and iteration where aligned; enough blocks to
    /// fill the device, at most 32 per SM (the loops are grid-stride).
    fn elementwise_cfg(&self, n: usize) -> LaunchConfig {
        let blocks = n.div_ceil(4).div_ceil(BLOCK as usize).clamp(1, self.sm_count as usize * 32);
        LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
    }

    fn reduce_blocks(&self, n: usize) -> usize {
        n.div_ceil(BLOCK as usize * 4).clamp(1, REDUCE_BLOCKS)
    }

    // ---- 1. stage point ----

    /// x = θ − (h·D)⊙Σ_j a_j k_j in one pass (x = θ − h·Σ a_j k_j without D; x = θ with no
    /// stage), summing the stages left to right. At most [`MAX_STAGES`] stages. See
    /// [`super::reference::stage_point`].
    pub fn stage_point(
        &self,
        x: &mut dyn DevicePtrMut<f32>,
        theta: In,
        d: Option<In>,
        stages: &[(In, f32)],
        h: f32,
    ) -> KResult<()> {
        let n = x.len();
        self.check("x", x, n)?;
        self.check_all(n, &[("theta", theta)], d)?;
        if stages.len() > MAX_STAGES {
            return args_err(format!(
                "{} stages in one stage point; the kernel takes at most {MAX_STAGES}",
                stages.len()
            ));
        }
        for (j, (k, _)) in stages.iter().enumerate() {
            self.check(&format!("stage gradient {j}"), *k, n)?;
        }
        if n == 0 {
            return Ok(());
        }
        let mut p = Ptrs::new(&self.stream);
        let mut table = StageTable::default();
        for (j, (k, a)) in stages.iter().enumerate() {
            table.k[j] = p.rd(*k);
            table.a[j] = *a;
        }
        let (xp, tp, dp) = (p.wr(x), p.rd(theta), p.rd_opt(d));
        let (ns, n64) = (stages.len() as i32, n as u64);
        let mut b = self.stream.launch_builder(&self.f.stage_point);
        b.arg(&xp).arg(&tp).arg(&dp).arg(&table).arg(&ns).arg(&h).arg(&n64);
        // SAFETY: the argument list matches `kutta_stage_point`; every pointer addresses n floats
        // (checked above) or is null where the kernel allows it.
        unsafe { b.launch(self.elementwise_cfg(n)) }?;
        Ok(())
    }

    // ---- 2. accumulate ----

    /// acc += b·k (skipped when b == 0) and err += e·k with e = b_i − b̂_i (skipped when `err` is
    /// None or e == 0), one pass over k. See [`super::reference::accumulate`].
    pub fn accumulate(
        &self,
        acc: &mut dyn DevicePtrMut<f32>,
        err: Option<&mut dyn DevicePtrMut<f32>>,
        k: In,
        b: f32,
        e: f32,
    ) -> KResult<()> {
        let n = acc.len();
        self.check("acc", acc, n)?;
        self.check("k", k, n)?;
        if let Some(err) = &err {
            self.check("err", &**err, n)?;
        }
        if n == 0 {
            return Ok(());
        }
        let mut p = Ptrs::new(&self.stream);
        let (ap, kp) = (p.wr(acc), p.rd(k));
        let ep = err.map_or(0, |e| p.wr(e));
        let n64 = n as u64;
        let mut l = self.stream.launch_builder(&self.f.accumulate);
        l.arg(&ap).arg(&ep).arg(&kp).arg(&b).arg(&e).arg(&n64);
        // SAFETY: matches `kutta_accumulate`; lengths checked.
        unsafe { l.launch(self.elementwise_cfg(n)) }?;
        Ok(())
    }

    // ---- 3. final update ----

    /// With momentum acc = β·m + acc (m is only read; swap m and acc at acceptance), then
    /// x = θ − (h·D)⊙acc. See [`super::reference::final_update`].
    #[allow(clippy::too_many_arguments)]
    pub fn final_update(
        &self,
        x: &mut dyn DevicePtrMut<f32>,
        theta: In,
        acc: &mut dyn DevicePtrMut<f32>,
        m: Option<In>,
        d: Option<In>,
        beta: f32,
        h: f32,
    ) -> KResult<()> {
        let n = x.len();
        self.check("x", x, n)?;
        self.check("theta", theta, n)?;
        self.final_update_checks(n, acc, m, d)?;
        if n == 0 {
            return Ok(());
        }
        let mut p = Ptrs::new(&self.stream);
        let (xp, tp) = (p.wr(x), p.rd(theta));
        self.final_update_launch(&mut p, xp, tp, acc, m, d, beta, h, n)
    }

    /// [`Self::final_update`] writing θ_{n+1} over θ.
    pub fn final_update_in_place(
        &self,
        theta: &mut dyn DevicePtrMut<f32>,
        acc: &mut dyn DevicePtrMut<f32>,
        m: Option<In>,
        d: Option<In>,
        beta: f32,
        h: f32,
    ) -> KResult<()> {
        let n = theta.len();
        self.check("theta", theta, n)?;
        self.final_update_checks(n, acc, m, d)?;
        if n == 0 {
            return Ok(());
        }
        let mut p = Ptrs::new(&self.stream);
        let tp = p.wr(theta);
        self.final_update_launch(&mut p, tp, tp, acc, m, d, beta, h, n)
    }

    fn final_update_checks(&self, n: usize, acc: &dyn DevicePtrMut<f32>, m: Option<In>, d: Option<In>) -> KResult<()> {
        self.check("acc", acc, n)?;
        if let Some(m) = m {
            self.check("m", m, n)?;
        }
        if let Some(d) = d {
            self.check("d", d, n)?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn final_update_launch<'a>(
        &'a self,
        p: &mut Ptrs<'a>,
        xp: u64,
        tp: u64,
        acc: &'a mut dyn DevicePtrMut<f32>,
        m: Option<In<'a>>,
        d: Option<In<'a>>,
        beta: f32,
        h: f32,
        n: usize,
    ) -> KResult<()> {
        let (ap, mp, dp) = (p.wr(acc), p.rd_opt(m), p.rd_opt(d));
        let n64 = n as u64;
        let mut l = self.stream.launch_builder(&self.f.final_update);
        l.arg(&xp).arg(&tp).arg(&ap).arg(&mp).arg(&dp).arg(&beta).arg(&h).arg(&n64);
        // SAFETY: matches `kutta_final_update`; lengths checked by the callers; x may equal θ.
        unsafe { l.launch(self.elementwise_cfg(n)) }?;
        Ok(())
    }

    // ---- 4. AdaGrad ----

    /// D = 1/sqrt(ε + (G + k1²)) for the step (G unchanged). See [`super::reference::adagrad_d`].
    pub fn adagrad_d(&self, d: &mut dyn DevicePtrMut<f32>, g: In, k1: In, eps: f32) -> KResult<()> {
        let n = d.len();
        self.check("d", d, n)?;
        self.check("g", g, n)?;
        self.check("k1", k1, n)?;
        if n == 0 {
            return Ok(());
        }
        let mut p = Ptrs::new(&self.stream);
        let (dp, gp, kp) = (p.wr(d), p.rd(g), p.rd(k1));
        let n64 = n as u64;
        let mut l = self.stream.launch_builder(&self.f.adagrad_d);
        l.arg(&dp).arg(&gp).arg(&kp).arg(&eps).arg(&n64);
        // SAFETY: matches `kutta_adagrad_d`; lengths checked.
        unsafe { l.launch(self.elementwise_cfg(n)) }?;
        Ok(())
    }

    /// G += k1² at acceptance. See [`super::reference::adagrad_commit`].
    pub fn adagrad_commit(&self, g: &mut dyn DevicePtrMut<f32>, k1: In) -> KResult<()> {
        let n = g.len();
        self.check("g", g, n)?;
        self.check("k1", k1, n)?;
        if n == 0 {
            return Ok(());
        }
        let mut p = Ptrs::new(&self.stream);
        let (gp, kp) = (p.wr(g), p.rd(k1));
        let n64 = n as u64;
        let mut l = self.stream.launch_builder(&self.f.adagrad_commit);
        l.arg(&gp).arg(&kp).arg(&n64);
        // SAFETY: matches `kutta_adagrad_commit`; lengths checked.
        unsafe { l.launch(self.elementwise_cfg(n)) }?;
        Ok(())
    }

    // ---- 5. reductions ----

    /// ‖D⊙v‖² (‖v‖² without D), accumulated in f64. See [`super::reference::dnorm2`].
    pub fn dnorm2(&self, v: In, d: Option<In>) -> KResult<f64> {
        let n = v.len();
        self.check_all(n, &[("v", v)], d)?;
        let r = Reduction::DNorm2 { v, d };
        self.reduce(n, |partials, cfg| self.launch_reduction(&r, n, partials, cfg))
    }

    /// ‖D⊙(a − b)‖² in f64 (D = I without D). See [`super::reference::ddiff2`].
    pub fn ddiff2(&self, a: In, b: In, d: Option<In>) -> KResult<f64> {
        let n = a.len();
        self.check_all(n, &[("a", a), ("b", b)], d)?;
        let r = Reduction::DDiff2 { a, b, d };
        self.reduce(n, |partials, cfg| self.launch_reduction(&r, n, partials, cfg))
    }

    /// Σ ((h·d·e) / (atol + rtol·|θ|))² in f64 (d = 1 without D); the scaled error of rk.rs is
    /// sqrt(sum / P) (sums and P over all shards). See [`super::reference::error_sum`].
    pub fn error_sum(&self, theta: In, err: In, d: Option<In>, h: f64, atol: f64, rtol: f64) -> KResult<f64> {
        let n = theta.len();
        self.check_all(n, &[("theta", theta), ("err", err)], d)?;
        let r = Reduction::ErrorSum { theta, err, d, h, atol, rtol };
        self.reduce(n, |partials, cfg| self.launch_reduction(&r, n, partials, cfg))
    }

    /// Number of NaN/±Inf entries of v. See [`super::reference::nonfinite_count`].
    pub fn nonfinite_count(&self, v: In) -> KResult<u64> {
        let n = v.len();
        self.check("v", v, n)?;
        let r = Reduction::NonFinite { v };
        let c = self.reduce(n, |partials, cfg| self.launch_reduction(&r, n, partials, cfg))?;
        Ok(c as u64)
    }

    /// The first pass of reduction `r` over n entries: per-block partial sums into `partials`
    /// (cfg.grid_dim.0 doubles). Lengths were checked by the caller.
    fn launch_reduction(&self, r: &Reduction, n: usize, partials: u64, cfg: LaunchConfig) -> KResult<()> {
        let mut p = Ptrs::new(&self.stream);
        let n64 = n as u64;
        let mut l;
        match *r {
            Reduction::DNorm2 { v, d } => {
                let (vp, dp) = (p.rd(v), p.rd_opt(d));
                l = self.stream.launch_builder(&self.f.reduce_dnorm2);
                l.arg(&vp).arg(&dp).arg(&n64).arg(&partials);
                // SAFETY: matches `kutta_reduce_dnorm2`.
                unsafe { l.launch(cfg) }?;
            }
            Reduction::DDiff2 { a, b, d } => {
                let (ap, bp, dp) = (p.rd(a), p.rd(b), p.rd_opt(d));
                l = self.stream.launch_builder(&self.f.reduce_ddiff2);
                l.arg(&ap).arg(&bp).arg(&dp).arg(&n64).arg(&partials);
                // SAFETY: matches `kutta_reduce_ddiff2`.
                unsafe { l.launch(cfg) }?;
            }
            Reduction::ErrorSum { theta, err, d, h, atol, rtol } => {
                let (tp, ep, dp) = (p.rd(theta), p.rd(err), p.rd_opt(d));
                l = self.stream.launch_builder(&self.f.reduce_errsum);
                l.arg(&tp).arg(&ep).arg(&dp).arg(&h).arg(&atol).arg(&rtol).arg(&n64).arg(&partials);
                // SAFETY: matches `kutta_reduce_errsum`.
                unsafe { l.launch(cfg) }?;
            }
            Reduction::NonFinite { v } => {
                let vp = p.rd(v);
                l = self.stream.launch_builder(&self.f.reduce_nonfinite);
                l.arg(&vp).arg(&n64).arg(&partials);
                // SAFETY: matches `kutta_reduce_nonfinite`.
                unsafe { l.launch(cfg) }?;
            }
        }
        Ok(())
    }

    /// Both passes of a reduction (the first by `first(partials, cfg)`), then the result to the
    /// host (this synchronizes the stream). n == 0 gives 0 without a launch.
    fn reduce(&self, n: usize, first: impl FnOnce(u64, LaunchConfig) -> KResult<()>) -> KResult<f64> {
        if n == 0 {
            return Ok(0.0);
        }
        let mut scratch = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        self.reduce_launch(&mut scratch, n, first)?;
        let mut host = [0.0f64; 1];
        self.stream.memcpy_dtoh(&scratch.slice(REDUCE_BLOCKS..REDUCE_BLOCKS + 1), &mut host)?;
        self.stream.synchronize()?;
        Ok(host[0])
    }

    /// The two reduction launches, leaving the sum in scratch[REDUCE_BLOCKS] (no copy, no sync).
    fn reduce_launch(
        &self,
        scratch: &mut CudaSlice<f64>,
        n: usize,
        first: impl FnOnce(u64, LaunchConfig) -> KResult<()>,
    ) -> KResult<()> {
        let blocks = self.reduce_blocks(n);
        let (base, _guard) = scratch.device_ptr_mut(&self.stream);
        let cfg = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        first(base, cfg)?;
        let out = base + (REDUCE_BLOCKS * std::mem::size_of::<f64>()) as u64;
        let m = blocks as u32;
        let mut l = self.stream.launch_builder(&self.f.reduce_final);
        l.arg(&base).arg(&m).arg(&out);
        let one = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: matches `kutta_reduce_final`; partials[0..m) were written by `first`, out is the
        // last entry of scratch (REDUCE_BLOCKS + 1 doubles).
        unsafe { l.launch(one) }?;
        Ok(())
    }

    // ---- 6. gather / scatter ----

    /// flat[offset .. offset + len(t)] = t for every (t, offset), in one launch. The segments
    /// must lie inside `flat` and must not overlap there. See [`super::reference::gather`].
    ///
    /// (A dtod memcpy per tensor would do the same with one driver call per tensor; this is one
    /// launch for all of them, which matters for models with many small tensors.)
    pub fn gather(&self, flat: &mut dyn DevicePtrMut<f32>, parts: &[(In, usize)]) -> KResult<()> {
        self.check_ctx("flat", flat)?;
        let mut p = Ptrs::new(&self.stream);
        let mut segs = Vec::with_capacity(parts.len());
        for (j, (t, off)) in parts.iter().enumerate() {
            self.check_ctx(&format!("tensor {j}"), *t)?;
            if t.len() > 0 {
                segs.push(Segment { ptr: p.rd(*t), offset: *off as u64, len: t.len() as u64 });
            }
        }
        let table = self.segment_table(&segs, flat.len(), true)?;
        let fp = p.wr(flat);
        self.segments_launch(&self.f.gather, fp, &table)
    }

    /// t = flat[offset .. offset + len(t)] for every (t, offset), in one launch. See
    /// [`super::reference::scatter`].
    pub fn scatter(&self, flat: In, parts: &mut [(&mut dyn DevicePtrMut<f32>, usize)]) -> KResult<()> {
        self.check_ctx("flat", flat)?;
        for (j, (t, _)) in parts.iter().enumerate() {
            self.check_ctx(&format!("tensor {j}"), &**t)?;
        }
        let mut p = Ptrs::new(&self.stream);
        let mut segs = Vec::with_capacity(parts.len());
        for (t, off) in parts.iter_mut() {
            let len = t.len();
            if len > 0 {
                segs.push(Segment { ptr: p.wr(&mut **t), offset: *off as u64, len: len as u64 });
            }
        }
        let table = self.segment_table(&segs, flat.len(), false)?;
        let fp = p.rd(flat);
        self.segments_launch(&self.f.scatter, fp, &table)
    }

    /// [`Self::gather`] from raw device pointers (e.g. the storage of candle tensors). Uploads the
    /// segment table on every call; for a fixed layout build a [`SegmentTable`] once instead.
    ///
    /// # Safety
    /// Each `seg.ptr` must address at least `seg.len` f32 of device memory in this context that
    /// stays allocated until the launch has run, and the caller orders earlier writes to it
    /// (on other streams) before this stream's work.
    pub unsafe fn gather_raw(&self, flat: &mut dyn DevicePtrMut<f32>, segs: &[Segment]) -> KResult<()> {
        let table = self.segment_table(segs, flat.len(), true)?;
        self.gather_table(flat, &table)
    }

    /// [`Self::scatter`] to raw device pointers.
    ///
    /// # Safety
    /// As [`Self::gather_raw`], and the destinations must not overlap each other and must not be
    /// read or written by other streams until this stream's work has run.
    pub unsafe fn scatter_raw(&self, flat: In, segs: &[Segment]) -> KResult<()> {
        let table = self.segment_table(segs, flat.len(), false)?;
        self.scatter_table(flat, &table)
    }

    /// Check `segs` against a flat buffer of `flat_len` floats (inside it; with `disjoint`, not
    /// overlapping there, as a gather needs) and upload them once, for any number of
    /// [`Self::gather_table`] / [`Self::scatter_table`] calls. Empty segments are dropped.
    pub fn segment_table(&self, segs: &[Segment], flat_len: usize, disjoint: bool) -> KResult<SegmentTable> {
        let segs: Vec<Segment> = segs.iter().copied().filter(|s| s.len > 0).collect();
        check_segments(&segs, flat_len, disjoint)?;
        let max_len = segs.iter().map(|s| s.len as usize).max().unwrap_or(0);
        let table = if segs.is_empty() { None } else { Some(self.stream.clone_htod(&segs)?) };
        Ok(SegmentTable { table, nsegs: segs.len(), max_len, flat_len, disjoint })
    }

    /// flat[seg.offset + i] = seg.ptr[i] for every segment of `table`, one launch.
    ///
    /// # Safety
    /// As [`Self::gather_raw`] for the pointers in `table`, and `table` was built with
    /// `disjoint = true`.
    pub unsafe fn gather_table(&self, flat: &mut dyn DevicePtrMut<f32>, table: &SegmentTable) -> KResult<()> {
        self.check_ctx("flat", flat)?;
        table.check(flat.len(), true)?;
        let mut p = Ptrs::new(&self.stream);
        let fp = p.wr(flat);
        self.segments_launch(&self.f.gather, fp, table)
    }

    /// seg.ptr[i] = flat[seg.offset + i] for every segment of `table`, one launch.
    ///
    /// # Safety
    /// As [`Self::scatter_raw`] for the pointers in `table`.
    pub unsafe fn scatter_table(&self, flat: In, table: &SegmentTable) -> KResult<()> {
        self.check_ctx("flat", flat)?;
        table.check(flat.len(), false)?;
        let mut p = Ptrs::new(&self.stream);
        let fp = p.rd(flat);
        self.segments_launch(&self.f.scatter, fp, table)
    }

    /// Launch `func(flat, table, nsegs)`: grid y walks the segments, grid x strides over the
    /// longest segment's elements.
    fn segments_launch(&self, func: &CudaFunction, flat: u64, table: &SegmentTable) -> KResult<()> {
        let Some(t) = &table.table else { return Ok(()) };
        let (tp, _tg) = t.device_ptr(&self.stream);
        let nsegs = table.nsegs as u32;
        let bx = table.max_len.div_ceil(BLOCK as usize * 4).clamp(1, self.sm_count as usize * 8);
        let by = table.nsegs.min(65535);
        let cfg = LaunchConfig { grid_dim: (bx as u32, by as u32, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        let mut l = self.stream.launch_builder(func);
        l.arg(&flat).arg(&tp).arg(&nsegs);
        // SAFETY: matches `kutta_gather`/`kutta_scatter`; the segments were checked against a flat
        // buffer of this length when the table was built.
        unsafe { l.launch(cfg) }?;
        Ok(())
    }

    // ---- bandwidth ----

    /// Time every kernel on buffers of `n` floats (median of `reps` runs after one warm-up, CUDA
    /// events around the launches) and compare the achieved bandwidth with a dtod memcpy of the
    /// same size (bytes read + written). Needs about 12·n·4 bytes of device memory (3 GiB for
    /// n = 64 Mi). The goal: every kernel at ≥ 80 % of the copy bandwidth.
    pub fn bandwidth(&self, n: usize, reps: usize) -> KResult<BandwidthReport> {
        let reps = reps.max(1);
        let s = &self.stream;
        let zeros = |_: usize| s.alloc_zeros::<f32>(n);
        let mut bufs: Vec<CudaSlice<f32>> = (0..12).map(zeros).collect::<Result<_, _>>()?;
        let [theta, d, m, k0, k1, k2, k3, k4, k5] = std::array::from_fn(|_| bufs.pop().unwrap());
        let (mut x, mut acc, mut err) = (bufs.pop().unwrap(), bufs.pop().unwrap(), bufs.pop().unwrap());
        let f4 = 4u64;
        let nn = n as u64;
        let mut rows = Vec::new();

        let copy_ms = self.time_ms(reps, || Ok(s.memcpy_dtod(&theta, &mut x)?))?;
        let copy_bytes = 2 * nn * f4;
        let copy_gbs = gb_per_s(copy_bytes, copy_ms);
        let mut row = |kernel: &str, elems: u64, ms: f64| {
            let bytes = elems * nn * f4;
            let g = gb_per_s(bytes, ms);
            rows.push(BandwidthRow {
                kernel: kernel.to_string(),
                bytes,
                median_ms: ms,
                gb_per_s: g,
                fraction_of_copy: g / copy_gbs,
            });
        };
        row("memcpy dtod (reference)", 2, copy_ms);

        let ks: [&CudaSlice<f32>; 6] = [&k0, &k1, &k2, &k3, &k4, &k5];
        for (ns, with_d) in [(1usize, false), (1, true), (2, true), (4, true), (6, true)] {
            let stages: Vec<(In, f32)> = ks[..ns].iter().map(|k| (*k as In, 0.5f32)).collect();
            let dd: Option<In> = with_d.then_some(&d as In);
            let ms = self.time_ms(reps, || self.stage_point(&mut x, &theta, dd, &stages, 0.01))?;
            // reads θ, the stages (and D), writes x
            row(
                &format!("stage_point {ns} stage(s){}", if with_d { " + D" } else { "" }),
                2 + ns as u64 + with_d as u64,
                ms,
            );
        }
        let ms = self.time_ms(reps, || self.accumulate(&mut acc, None, &k0, 0.5, 0.0))?;
        row("accumulate acc", 3, ms);
        let ms = self.time_ms(reps, || self.accumulate(&mut acc, Some(&mut err), &k0, 0.5, 0.25))?;
        row("accumulate acc + err", 5, ms);
        let ms = self.time_ms(reps, || self.final_update(&mut x, &theta, &mut acc, None, None, 0.0, 0.01))?;
        row("final_update", 3, ms);
        let ms = self.time_ms(reps, || self.final_update(&mut x, &theta, &mut acc, Some(&m), Some(&d), 0.9, 0.01))?;
        row("final_update + momentum + D", 6, ms);
        let ms = self.time_ms(reps, || self.adagrad_d(&mut x, &m, &k0, 1.0))?;
        row("adagrad_d", 3, ms);
        let ms = self.time_ms(reps, || self.adagrad_commit(&mut acc, &k0))?;
        row("adagrad_commit", 3, ms);

        // Reductions: only the two launches are timed (not the copy of the result to the host).
        let mut scratch = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let (h, atol, rtol) = (0.01f64, 1e-4f64, 1e-2f64);
        let reductions = [
            ("dnorm2 + D (reduction)", 2, Reduction::DNorm2 { v: &k0, d: Some(&d) }),
            ("ddiff2 + D (reduction)", 3, Reduction::DDiff2 { a: &k0, b: &k1, d: Some(&d) }),
            (
                "error_sum + D (reduction)",
                3,
                Reduction::ErrorSum { theta: &theta, err: &err, d: Some(&d), h, atol, rtol },
            ),
            ("nonfinite_count (reduction)", 1, Reduction::NonFinite { v: &k0 }),
        ];
        for (label, elems, r) in &reductions {
            let ms = self.time_ms(reps, || {
                self.reduce_launch(&mut scratch, n, |pp, cfg| self.launch_reduction(r, n, pp, cfg))
            })?;
            row(label, *elems, ms);
        }
        drop(scratch);

        // Gather/scatter: 16 equal segments of k0 (the "tensors") into/out of x (the flat buffer).
        let nseg = 16usize.min(n.max(1));
        let seg_len = n / nseg;
        let segs: Vec<Segment> = {
            let (base, _g) = k0.device_ptr(s);
            (0..nseg)
                .map(|i| Segment {
                    ptr: base + (i * seg_len * 4) as u64,
                    offset: (i * seg_len) as u64,
                    len: seg_len as u64,
                })
                .collect()
        };
        let table = self.segment_table(&segs, n, true)?;
        // SAFETY: the segments are disjoint ranges of k0, alive for the whole measurement.
        let ms = self.time_ms(reps, || unsafe { self.gather_table(&mut x, &table) })?;
        row(&format!("gather {nseg} segments"), 2, ms);
        // SAFETY: as above; k0 is not used concurrently.
        let ms = self.time_ms(reps, || unsafe { self.scatter_table(&x, &table) })?;
        row(&format!("scatter {nseg} segments"), 2, ms);

        s.synchronize()?;
        let device = self.context().name().unwrap_or_else(|_| "unknown CUDA device".to_string());
        Ok(BandwidthReport { device, n, reps, copy_gb_per_s: copy_gbs, rows })
    }

    /// Median GPU time of one call of `f` in ms: CUDA events around `TIMING_BATCH` back-to-back
    /// calls (so launch gaps are hidden behind running work), `reps` samples, after a warm-up.
    fn time_ms(&self, reps: usize, mut f: impl FnMut() -> KResult<()>) -> KResult<f64> {
        const TIMING_BATCH: usize = 5;
        let timing = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        f()?;
        self.stream.synchronize()?;
        let mut ts = Vec::with_capacity(reps);
        for _ in 0..reps {
            let start = self.stream.record_event(timing)?;
            for _ in 0..TIMING_BATCH {
                f()?;
            }
            let end = self.stream.record_event(timing)?;
            ts.push(start.elapsed_ms(&end)? as f64 / TIMING_BATCH as f64);
        }
        ts.sort_by(|a, b| a.total_cmp(b));
        Ok(ts[ts.len() / 2])
    }
}

/// A fused reduction's first pass and its inputs (`RkKernels::launch_reduction`).
enum Reduction<'a> {
    DNorm2 { v: In<'a>, d: Option<In<'a>> },
    DDiff2 { a: In<'a>, b: In<'a>, d: Option<In<'a>> },
    ErrorSum { theta: In<'a>, err: In<'a>, d: Option<In<'a>>, h: f64, atol: f64, rtol: f64 },
    NonFinite { v: In<'a> },
}

/// A gather/scatter layout uploaded once ([`RkKernels::segment_table`]).
pub struct SegmentTable {
    table: Option<CudaSlice<Segment>>,
    nsegs: usize,
    max_len: usize,
    flat_len: usize,
    disjoint: bool,
}

impl SegmentTable {
    /// Segments (non-empty ones).
    pub fn len(&self) -> usize {
        self.nsegs
    }

    pub fn is_empty(&self) -> bool {
        self.nsegs == 0
    }

    fn check(&self, flat_len: usize, need_disjoint: bool) -> KResult<()> {
        if flat_len < self.flat_len {
            return args_err(format!(
                "segment table built for a flat buffer of {}, used with one of {flat_len}",
                self.flat_len
            ));
        }
        if need_disjoint && !self.disjoint {
            return args_err(
                "a gather needs a segment table checked for disjointness (segment_table(.., disjoint = true))",
            );
        }
        Ok(())
    }
}

/// Segments lie inside the flat buffer of `flat_len` floats; with `disjoint`, they do not overlap
/// there (gather writes them).
fn check_segments(segs: &[Segment], flat_len: usize, disjoint: bool) -> KResult<()> {
    for s in segs {
        let end = s.offset.checked_add(s.len).filter(|&e| e <= flat_len as u64);
        if end.is_none() {
            return args_err(format!("segment {}..+{} outside the flat buffer of {flat_len}", s.offset, s.len));
        }
    }
    if disjoint {
        let mut r: Vec<(u64, u64)> = segs.iter().map(|s| (s.offset, s.offset + s.len)).collect();
        r.sort_unstable();
        for w in r.windows(2) {
            if w[1].0 < w[0].1 {
                return args_err(format!(
                    "segments {}..{} and {}..{} overlap in the flat buffer",
                    w[0].0, w[0].1, w[1].0, w[1].1
                ));
            }
        }
    }
    if segs.len() > u32::MAX as usize {
        return args_err("too many segments");
    }
    Ok(())
}

fn gb_per_s(bytes: u64, ms: f64) -> f64 {
    if ms > 0.0 {
        bytes as f64 / (ms * 1e-3) / 1e9
    } else {
        f64::INFINITY
    }
}

/// One kernel's measured bandwidth.
#[derive(Clone, Debug, Serialize)]
pub struct BandwidthRow {
    pub kernel: String,
    /// Bytes the kernel must move (every buffer it reads or writes, once).
    pub bytes: u64,
    pub median_ms: f64,
    pub gb_per_s: f64,
    /// gb_per_s / the memcpy's.
    pub fraction_of_copy: f64,
}

/// [`RkKernels::bandwidth`]'s result.
#[derive(Clone, Debug, Serialize)]
pub struct BandwidthReport {
    pub device: String,
    /// Floats per buffer.
    pub n: usize,
    pub reps: usize,
    /// Measured dtod memcpy bandwidth (read + write) of n floats.
    pub copy_gb_per_s: f64,
    pub rows: Vec<BandwidthRow>,
}

impl BandwidthReport {
    /// A Markdown table of the rows.
    pub fn table(&self) -> String {
        let mut s = format!(
            "{}: {} floats per buffer, median of {} runs; copy bandwidth {:.1} GB/s\n\n| kernel | MB moved | ms | GB/s | of copy |\n|---|---:|---:|---:|---:|\n",
            self.device, self.n, self.reps, self.copy_gb_per_s
        );
        for r in &self.rows {
            s += &format!(
                "| {} | {:.1} | {:.4} | {:.1} | {:.0} % |\n",
                r.kernel,
                r.bytes as f64 / 1e6,
                r.median_ms,
                r.gb_per_s,
                100.0 * r.fraction_of_copy
            );
        }
        s
    }

    /// Rows below `fraction` of the copy bandwidth.
    pub fn below(&self, fraction: f64) -> Vec<&BandwidthRow> {
        self.rows.iter().filter(|r| r.fraction_of_copy < fraction).collect()
    }
}
