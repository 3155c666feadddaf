//! The explicit Runge-Kutta step of the gradient flow dθ/dt = −D·g(θ) (SPEC §2-4), on flat
//! buffers, for any Butcher tableau, with the paper's three modifications:
//! a diagonal preconditioner D (AdaGrad / modified AdaGrad), the DALR step size, and momentum on
//! the RK gradient g* = Σ b_i k_i; plus error-controlled steps for embedded pairs.
//!
//! One step, with all stages on the same mini-batch:
//!
//! ```text
//! k_1 = g(θ_n)                       (its loss is the step's training loss)
//! D   = (ε + G_n)^(-1/2),  G_n = G_{n-1} + k_1⊙k_1     (fixed for the whole step)
//! h   = schedule / DALR / error controller
//! θ_i = θ_n − h·D·Σ_{j<i} a_ij k_j,  k_i = g(θ_i)       i = 2..s
//! g*  = Σ b_i k_i;  m ← β m + g*;  θ_{n+1} = θ_n − h·D·m  (m = g* without momentum)
//! ```
//!
//! Buffers. `k_1` is kept for the whole step: a retry (a rejected error-controlled attempt or a
//! non-finite value) redoes stages 2..s from θ_n on the same batch and reuses it, the stage-DALR
//! estimator needs it next to k_2, and G is only committed once the step is accepted.
//! With `streaming`, b_i·k_i is added into the accumulator as soon as k_i exists and k_i goes
//! back to the pool after its last use (`Tableau::last_use`); without it all s stage gradients
//! stay resident and are combined at the end. Both modes perform the same floating-point
//! operations in the same order, so they produce bit-identical results (a test checks this).
//!
//! Failure contract (see `optim`): nothing in `self` or θ changes until the step is accepted.

use crate::error::{Error, Result};
use crate::field::VectorField;
use crate::optim::arith::{Arith, Host};
use crate::optim::step_size::{cosine, dalr, DalrEstimator, ErrorControl};
use crate::optim::{Optimizer, OptimizerState, StepReport};
use crate::scalar::Scalar;
use crate::tableau::Tableau;
use serde_json::json;
use std::borrow::{Borrow, BorrowMut};

/// The diagonal preconditioner of paper §3.1.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Preconditioner {
    None,
    /// D = (ε + G)^(-1/2) with a small ε (config `optimizer.adagrad_eps`).
    Adagrad { eps: f64 },
    /// The paper's choice: ε = 1.
    ModifiedAdagrad,
}

impl Preconditioner {
    fn eps(&self) -> Option<f64> {
        match self {
            Preconditioner::None => None,
            Preconditioner::Adagrad { eps } => Some(*eps),
            Preconditioner::ModifiedAdagrad => Some(1.0),
        }
    }
}

/// How h is chosen each step.
#[derive(Clone, Debug, PartialEq)]
pub enum StepSize {
    Constant { lr: f64 },
    Cosine { lr: f64, warmup: u64, total: u64, min_fraction: f64 },
    /// h = c / (1 + (c/2)·v^p).
    Dalr { c: f64, p: f64, estimator: DalrEstimator, fd_eps: f64 },
    /// Embedded-pair control starting from h0 (SPEC §4).
    ErrorControlled { h0: f64, control: ErrorControl },
}

#[derive(Clone, Debug)]
pub struct RkOptions {
    pub tableau: Tableau,
    pub preconditioner: Preconditioner,
    pub step_size: StepSize,
    /// β of momentum on the RK gradient; 0 disables momentum (and its buffer).
    pub momentum: f64,
    /// Accumulate stage gradients as they appear and free them after their last use.
    pub streaming: bool,
    /// Attempts redone with h halved when a stage point, gradient or θ_{n+1} becomes non-finite.
    pub nonfinite_retries: u32,
}

impl RkOptions {
    /// Plain RK with a constant step, no modifications.
    pub fn plain(tableau: Tableau, lr: f64) -> Self {
        Self {
            tableau,
            preconditioner: Preconditioner::None,
            step_size: StepSize::Constant { lr },
            momentum: 0.0,
            streaming: true,
            nonfinite_retries: 4,
        }
    }
}

pub struct RkSolver<F: Scalar = f32, A: Arith<F> = Host> {
    opts: RkOptions,
    /// Where the buffers live and the arithmetic runs (`Host`, or the GPU kernels).
    arith: A,
    /// AdaGrad accumulator G (P), committed at acceptance. None without preconditioner.
    g_acc: Option<A::Owned>,
    /// Momentum m (P). None when β = 0.
    m: Option<A::Owned>,
    /// v measured from the previous step's first two stages (stage estimator).
    dalr_prev_v: Option<f64>,
    /// The error controller's h for the next step.
    h_ec: Option<f64>,
    /// Scratch, reused across steps (none of it is state); allocated at the first step.
    work: Option<Work<A::Owned>>,
    /// Most stage buffers (besides k_1) live at once, for tests and the memory planner.
    pub peak_live_stage_buffers: usize,
}

/// The solver's scratch buffers, each of P entries.
struct Work<B> {
    p: usize,
    k1: B,
    /// D for this step; None without preconditioner.
    d: Option<B>,
    /// The stage point θ_i (the "model's own parameter storage"), later the candidate θ_{n+1}.
    x: B,
    /// Σ b_i k_i, then (with momentum) β m + g*.
    acc: B,
    /// Σ (b_i − b̂_i) k_i for the error estimate; None without an embedded pair.
    err_acc: Option<B>,
    /// Stage gradients k_2..k_s (index i−1 = stage i, 0-based); None when not live.
    stages: Vec<Option<B>>,
    /// Freed stage buffers, reused to avoid allocation.
    pool: Vec<B>,
}

/// The borrowed view of an owned buffer (`Vec<F>` → `[F]`).
fn rd<F: Scalar, A: Arith<F>>(b: &A::Owned) -> &A::Buf {
    b.borrow()
}

fn wr<F: Scalar, A: Arith<F>>(b: &mut A::Owned) -> &mut A::Buf {
    b.borrow_mut()
}

fn rd_opt<F: Scalar, A: Arith<F>>(b: &Option<A::Owned>) -> Option<&A::Buf> {
    b.as_ref().map(rd::<F, A>)
}

impl<F: Scalar> RkSolver<F, Host> {
    pub fn new(opts: RkOptions) -> Result<Self> {
        Self::with_backend(opts, Host)
    }
}

impl<F: Scalar, A: Arith<F>> RkSolver<F, A> {
    /// A solver whose buffers live in and whose arithmetic runs on `arith`.
    pub fn with_backend(opts: RkOptions, arith: A) -> Result<Self> {
        let t = &opts.tableau;
        if let StepSize::ErrorControlled { .. } = opts.step_size {
            if !t.is_embedded() {
                return Err(Error::config(
                    "optimizer.step_size",
                    format!("error-controlled steps need an embedded pair (bs32, dopri54 or a custom tableau with b_hat); `{}` has none", t.name),
                ));
            }
        }
        if let StepSize::Dalr { estimator: DalrEstimator::Stage, .. } = opts.step_size {
            if t.stages() < 2 || t.a[1][0] == 0.0 {
                return Err(Error::config(
                    "optimizer.dalr.estimator",
                    format!("the `stage` estimator needs a_21 ≠ 0; tableau `{}` has a_21 = 0 or one stage: use `finite-difference`", t.name),
                ));
            }
        }
        Ok(Self { opts, arith, g_acc: None, m: None, dalr_prev_v: None, h_ec: None, work: None, peak_live_stage_buffers: 0 })
    }

    pub fn options(&self) -> &RkOptions {
        &self.opts
    }

    pub fn backend(&self) -> &A {
        &self.arith
    }

    /// Allocate the scratch for P parameters and the state buffers that are not loaded yet.
    fn ensure(&mut self, p: usize) -> Result<()> {
        let a = &self.arith;
        let fits = |b: &Option<A::Owned>| b.as_ref().is_some_and(|b| a.len(rd::<F, A>(b)) == p);
        if self.opts.preconditioner.eps().is_some() && !fits(&self.g_acc) {
            self.g_acc = Some(a.alloc(p)?);
        }
        if self.opts.momentum != 0.0 && !fits(&self.m) {
            self.m = Some(a.alloc(p)?);
        }
        if self.work.as_ref().is_none_or(|w| w.p != p) {
            let pre = self.opts.preconditioner.eps().is_some();
            self.work = Some(Work {
                p,
                k1: a.alloc(p)?,
                d: if pre { Some(a.alloc(p)?) } else { None },
                x: a.alloc(p)?,
                acc: a.alloc(p)?,
                err_acc: if self.opts.tableau.is_embedded() { Some(a.alloc(p)?) } else { None },
                stages: (0..self.opts.tableau.stages()).map(|_| None).collect(),
                pool: Vec::new(),
            });
        }
        Ok(())
    }

    fn work(&mut self) -> &mut Work<A::Owned> {
        self.work.as_mut().expect("ensure() runs first in every step")
    }

    fn take_buffer(&mut self) -> Result<A::Owned> {
        let w = self.work.as_mut().expect("ensure() runs first in every step");
        match w.pool.pop() {
            Some(b) => Ok(b),
            None => self.arith.alloc(w.p),
        }
    }

    /// True when some entry of `parts` is NaN/Inf on any shard of θ (one `sum_shards`).
    fn any_nonfinite(&self, field: &mut dyn VectorField<F, A::Buf>, parts: &[&A::Buf]) -> Result<bool> {
        let mut local = 0u64;
        for p in parts {
            local += self.arith.nonfinite_count(p)?;
        }
        Ok(field.sum_shards(local as f64)? > 0.0)
    }

    /// ‖D·k_1‖ over all shards of θ.
    fn k1_norm(&self, field: &mut dyn VectorField<F, A::Buf>) -> Result<f64> {
        let w = self.work.as_ref().expect("ensure() runs first in every step");
        let local = self.arith.dnorm2(rd::<F, A>(&w.k1), rd_opt::<F, A>(&w.d))?;
        Ok(field.sum_shards(local)?.sqrt())
    }

    /// ‖D·(v − k_1)‖ over all shards of θ.
    fn diff_k1_norm(&self, v: &A::Buf, field: &mut dyn VectorField<F, A::Buf>) -> Result<f64> {
        let w = self.work.as_ref().expect("ensure() runs first in every step");
        let local = self.arith.ddiff2(v, rd::<F, A>(&w.k1), rd_opt::<F, A>(&w.d))?;
        Ok(field.sum_shards(local)?.sqrt())
    }

    /// DALR's finite-difference probe: v ≈ ‖D(g(θ_n + ε u) − k_1)‖ / ε, u = f/‖f‖, f = −D k_1.
    fn dalr_probe(&mut self, theta: &A::Buf, field: &mut dyn VectorField<F, A::Buf>, eps: f64) -> Result<f64> {
        let fnorm = self.k1_norm(field)?;
        if fnorm == 0.0 {
            return Ok(0.0);
        }
        // θ_n + ε·u with u = f/‖f‖ = −D k_1/‖D k_1‖: the same descent as a stage point.
        let mut probe = self.take_buffer()?;
        let w = self.work.as_mut().expect("ensure() runs first in every step");
        let (d, k1) = (rd_opt::<F, A>(&w.d), rd::<F, A>(&w.k1));
        self.arith.stage_point(wr::<F, A>(&mut w.x), theta, d, &[(k1, F::one())], F::from_f64(eps / fnorm))?;
        let loss = field.eval(rd::<F, A>(&w.x), wr::<F, A>(&mut probe))?;
        // `loss` is the same on every rank, so all ranks make the same collective calls.
        let v = if loss.is_finite() && !self.any_nonfinite(field, &[rd::<F, A>(&probe)])? {
            self.diff_k1_norm(rd::<F, A>(&probe), field)? / eps
        } else {
            f64::NAN
        };
        self.work().pool.push(probe);
        Ok(v)
    }

    /// θ_i = θ_n − h·D·Σ_{j<i} a_ij k_j into `x`, in one pass over the stages that feed it
    /// (a_ij ≠ 0, in j order; θ_i = θ_n when none does).
    fn form_stage_point(&mut self, theta: &A::Buf, i: usize, h: F) -> Result<()> {
        let row = &self.opts.tableau.a[i];
        let w = self.work.as_mut().expect("ensure() runs first in every step");
        let mut stages: Vec<(&A::Buf, F)> = Vec::with_capacity(i);
        for (j, &a) in row.iter().enumerate().take(i).filter(|(_, &a)| a != 0.0) {
            let k = if j == 0 { &w.k1 } else { w.stages[j].as_ref().expect("stage buffer live until last use") };
            stages.push((rd::<F, A>(k), F::from_f64(a)));
        }
        self.arith.stage_point(wr::<F, A>(&mut w.x), theta, rd_opt::<F, A>(&w.d), &stages, h)
    }

    /// Add stage i's contributions b_i k_i (and (b_i − b̂_i) k_i) to the accumulators.
    fn accumulate(&mut self, i: usize) -> Result<()> {
        let t = &self.opts.tableau;
        let b = t.b[i];
        let e = t.b_hat.as_ref().map_or(0.0, |bh| b - bh[i]);
        if b == 0.0 && e == 0.0 {
            return Ok(());
        }
        let w = self.work.as_mut().expect("ensure() runs first in every step");
        let k = if i == 0 { &w.k1 } else { w.stages[i].as_ref().expect("stage live at accumulation") };
        let err = w.err_acc.as_mut().map(wr::<F, A>);
        self.arith.accumulate(wr::<F, A>(&mut w.acc), err, rd::<F, A>(k), F::from_f64(b), F::from_f64(e))
    }

    fn free_stage(&mut self, j: usize) {
        let w = self.work();
        if let Some(b) = w.stages[j].take() {
            w.pool.push(b);
        }
    }

    fn live_stage_buffers(&self) -> usize {
        self.work.as_ref().map_or(0, |w| w.stages.iter().filter(|s| s.is_some()).count())
    }

    /// Stages 2..s with step h from θ_n, leaving g* in `acc` and Σ(b−b̂)k in `err_acc`.
    /// Returns (whether every value stayed finite, the stage-DALR v measured at stage 2).
    fn run_stages(&mut self, theta: &A::Buf, field: &mut dyn VectorField<F, A::Buf>, h: f64) -> Result<(bool, Option<f64>, u64)> {
        let s = self.opts.tableau.stages();
        let hf = F::from_f64(h);
        let streaming = self.opts.streaming;
        {
            let w = self.work.as_mut().expect("ensure() runs first in every step");
            self.arith.zero(wr::<F, A>(&mut w.acc))?;
            if let Some(e) = w.err_acc.as_mut() {
                self.arith.zero(wr::<F, A>(e))?;
            }
        }
        if streaming {
            self.accumulate(0)?;
        }
        let mut v_stage = None;
        let mut evals = 0;
        let mut finite = true;
        for i in 1..s {
            self.form_stage_point(theta, i, hf)?;
            if streaming {
                // k_j with last use i is not needed after θ_i exists (k_1 is kept; see module doc).
                for j in 1..i {
                    if self.work().stages[j].is_some() && self.opts.tableau.last_use(j) <= i {
                        self.free_stage(j);
                    }
                }
            }
            let mut k = self.take_buffer()?;
            let loss = field.eval(rd::<F, A>(&self.work().x), wr::<F, A>(&mut k))?;
            evals += 1;
            self.work().stages[i] = Some(k);
            self.peak_live_stage_buffers = self.peak_live_stage_buffers.max(self.live_stage_buffers());
            let ki = rd::<F, A>(self.work.as_ref().and_then(|w| w.stages[i].as_ref()).expect("just stored"));
            if !loss.is_finite() || self.any_nonfinite(field, &[ki])? {
                finite = false;
                break;
            }
            if i == 1 {
                if let StepSize::Dalr { estimator: DalrEstimator::Stage, .. } = self.opts.step_size {
                    // k_2 − k_1 ≈ −h a_21 H D k_1  ⇒  v ≈ ‖D(k_2 − k_1)‖ / (h a_21 ‖D k_1‖)
                    let a21 = self.opts.tableau.a[1][0];
                    let num = self.diff_k1_norm(ki, field)?;
                    let den = h * a21.abs() * self.k1_norm(field)?;
                    v_stage = if den > 0.0 { Some(num / den) } else { Some(0.0) };
                }
            }
            if streaming {
                self.accumulate(i)?;
            }
        }
        if finite && !streaming {
            for i in 0..s {
                self.accumulate(i)?;
            }
        }
        for j in 1..s {
            self.free_stage(j);
        }
        Ok((finite, v_stage, evals))
    }

    /// Scaled RMS error of e = h·D·Σ(b−b̂)k against atol + rtol·|θ_n|.
    fn error_norm(&self, theta: &A::Buf, h: f64, ec: &ErrorControl, field: &mut dyn VectorField<F, A::Buf>) -> Result<f64> {
        let w = self.work.as_ref().expect("ensure() runs first in every step");
        let err = rd::<F, A>(w.err_acc.as_ref().expect("error control needs an embedded pair (checked in new)"));
        let s = self.arith.error_sum(theta, err, rd_opt::<F, A>(&w.d), h, ec.atol, ec.rtol)?;
        let s = field.sum_shards(s)?;
        let n = field.sum_shards(self.arith.len(theta) as f64)?;
        Ok((s / n.max(1.0)).sqrt())
    }

    /// The candidate θ_{n+1} into `x` (and β m + g* into `acc` with momentum). Returns finiteness.
    fn form_update(&mut self, theta: &A::Buf, h: f64, field: &mut dyn VectorField<F, A::Buf>) -> Result<bool> {
        let w = self.work.as_mut().expect("ensure() runs first in every step");
        let beta = F::from_f64(self.opts.momentum);
        let (m, d) = (rd_opt::<F, A>(&self.m), rd_opt::<F, A>(&w.d));
        self.arith.final_update(wr::<F, A>(&mut w.x), theta, wr::<F, A>(&mut w.acc), m, d, beta, F::from_f64(h))?;
        let w = self.work.as_ref().expect("ensure() runs first in every step");
        Ok(!self.any_nonfinite(field, &[rd::<F, A>(&w.x), rd::<F, A>(&w.acc)])?)
    }

    /// One step on the back end's buffers (see `Optimizer::step` for the contract): θ and every
    /// gradient the field returns are `A::Buf`s.
    pub fn step_on(&mut self, step: u64, theta: &mut A::Buf, field: &mut dyn VectorField<F, A::Buf>) -> Result<StepReport> {
        let p = self.arith.len(theta);
        if p != field.dim() {
            return Err(Error::Other(format!("θ has {p} entries but the model has {}", field.dim())));
        }
        self.ensure(p)?;
        let mut report = StepReport::default();

        // Stage 1: k_1 = g(θ_n) and the step's loss.
        let loss = field.eval(theta, wr::<F, A>(&mut self.work().k1))?;
        report.grad_evals += 1;
        report.loss = loss;
        let k1 = rd::<F, A>(&self.work.as_ref().expect("allocated above").k1);
        if !loss.is_finite() || self.any_nonfinite(field, &[k1])? {
            return Err(Error::NonFinite(format!(
                "step {step}: the loss ({loss}) or its gradient at the current parameters is not finite; a smaller step cannot help"
            )));
        }

        // D for this step from G_n = G_{n-1} + k_1², without committing G yet.
        if let Some(eps) = self.opts.preconditioner.eps() {
            let w = self.work.as_mut().expect("allocated above");
            let g = rd::<F, A>(self.g_acc.as_ref().expect("allocated with the preconditioner"));
            let d = wr::<F, A>(w.d.as_mut().expect("allocated with the preconditioner"));
            self.arith.adagrad_d(d, g, rd::<F, A>(&w.k1), F::from_f64(eps))?;
        }

        // The step size.
        let mut h = match self.opts.step_size.clone() {
            StepSize::Constant { lr } => lr,
            StepSize::Cosine { lr, warmup, total, min_fraction } => cosine(lr, step, warmup, total, min_fraction),
            StepSize::Dalr { c, p: pw, estimator, fd_eps } => {
                let v = match (estimator, self.dalr_prev_v) {
                    (DalrEstimator::Stage, Some(v)) => v,
                    _ => {
                        report.grad_evals += 1;
                        self.dalr_probe(theta, field, fd_eps)?
                    }
                };
                if !v.is_finite() {
                    return Err(Error::NonFinite(format!("step {step}: DALR's curvature estimate v is not finite")));
                }
                report.dalr_v = Some(v);
                dalr(c, pw, v)
            }
            StepSize::ErrorControlled { h0, control } => self.h_ec.unwrap_or(h0).min(control.h_max),
        };

        // Attempts: stages 2..s, acceptance tests, retries from θ_n on the same batch.
        let v_next;
        let mut h_next = None;
        loop {
            let (finite, v_stage, evals) = self.run_stages(theta, field, h)?;
            report.grad_evals += evals;
            if !finite {
                self.retry_nonfinite(&mut report, &mut h, step, "a stage gradient")?;
                continue;
            }
            if let StepSize::ErrorControlled { control, .. } = &self.opts.step_size {
                let control = *control;
                let q = self.opts.tableau.embedded_order().unwrap_or(1);
                let err = self.error_norm(theta, h, &control, field)?;
                if !err.is_finite() {
                    self.retry_nonfinite(&mut report, &mut h, step, "the error estimate")?;
                    continue;
                }
                if err > 1.0 {
                    report.rejected += 1;
                    if report.rejected > control.max_rejects {
                        return Err(Error::Other(format!(
                            "step {step}: error control rejected {} attempts in a row (h fell to {h:.3e}, scaled error {err:.3e}); loosen optimizer.error_control.atol/rtol",
                            report.rejected
                        )));
                    }
                    h = control.next_h(h, err, q);
                    continue;
                }
                report.error_estimate = Some(err);
                h_next = Some(control.next_h(h, err, q));
            }
            if !self.form_update(theta, h, field)? {
                self.retry_nonfinite(&mut report, &mut h, step, "the updated parameters")?;
                continue;
            }
            v_next = v_stage;
            break;
        }

        // Accept: commit θ, m, G and the controllers' state together.
        let w = self.work.as_mut().expect("allocated above");
        self.arith.copy(theta, rd::<F, A>(&w.x))?;
        if let Some(m) = self.m.as_mut() {
            std::mem::swap(m, &mut w.acc);
        }
        if let Some(g) = self.g_acc.as_mut() {
            self.arith.adagrad_commit(wr::<F, A>(g), rd::<F, A>(&w.k1))?;
        }
        if v_next.is_some() {
            self.dalr_prev_v = v_next;
        }
        if h_next.is_some() {
            self.h_ec = h_next;
        }
        report.h = h;
        Ok(report)
    }

    /// G, m and the controllers' scalars, on the host.
    pub fn state_on_host(&self) -> Result<OptimizerState<F>> {
        let mut st = OptimizerState::default();
        if let Some(g) = &self.g_acc {
            st.buffers.push(("rk.G".into(), self.arith.download(rd::<F, A>(g))?));
        }
        if let Some(m) = &self.m {
            st.buffers.push(("rk.m".into(), self.arith.download(rd::<F, A>(m))?));
        }
        st.scalars.insert("dalr_prev_v".into(), json!(self.dalr_prev_v));
        st.scalars.insert("h_ec".into(), json!(self.h_ec));
        Ok(st)
    }

    /// Load what `state_on_host` returned (buffers go to the back end).
    pub fn load_state_from_host(&mut self, st: &OptimizerState<F>) -> Result<()> {
        for (name, buf) in &st.buffers {
            match name.as_str() {
                "rk.G" if self.opts.preconditioner.eps().is_some() => self.g_acc = Some(self.arith.upload(buf)?),
                "rk.m" if self.opts.momentum != 0.0 => self.m = Some(self.arith.upload(buf)?),
                other => {
                    return Err(Error::Other(format!(
                        "optimizer state holds `{other}`, which this RK configuration does not use (was the preconditioner or momentum changed?)"
                    )))
                }
            }
        }
        let get = |k: &str| st.scalars.get(k).and_then(|v| v.as_f64());
        self.dalr_prev_v = get("dalr_prev_v");
        self.h_ec = get("h_ec");
        Ok(())
    }

    fn retry_nonfinite(&mut self, report: &mut StepReport, h: &mut f64, step: u64, what: &str) -> Result<()> {
        report.nonfinite_retries += 1;
        if report.nonfinite_retries > self.opts.nonfinite_retries {
            return Err(Error::NonFinite(format!(
                "step {step}: {what} became NaN/Inf and {} retries with smaller steps (last h = {h:.3e}) did not help",
                self.opts.nonfinite_retries
            )));
        }
        tracing::warn!(step, h = *h, "{what} became non-finite; retrying the step with h/2");
        *h *= 0.5;
        Ok(())
    }
}

impl<F: Scalar> Optimizer<F> for RkSolver<F, Host> {
    fn name(&self) -> String {
        format!("rk({})", self.opts.tableau.name)
    }

    fn step(&mut self, step: u64, theta: &mut [F], field: &mut dyn VectorField<F>) -> Result<StepReport> {
        self.step_on(step, theta, field)
    }

    fn state(&self) -> Result<OptimizerState<F>> {
        self.state_on_host()
    }

    fn load_state(&mut self, st: &OptimizerState<F>) -> Result<()> {
        self.load_state_from_host(st)
    }
}

#[cfg(test)]
#[path = "rk_tests.rs"]
mod tests;
