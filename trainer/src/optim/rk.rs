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
    Adagrad {
        eps: f64,
    },
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
    Constant {
        lr: f64,
    },
    Cosine {
        lr: f64,
        warmup: u64,
        total: u64,
        min_fraction: f64,
    },
    /// h = c / (1 + (c/2)·v^p).
    Dalr {
        c: f64,
        p: f64,
        estimator: DalrEstimator,
        fd_eps: f64,
    },
    /// Embedded-pair control starting from h0 (SPEC §4).
    ErrorControlled {
        h0: f64,
        control: ErrorControl,
    },
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
    /// The AdaGrad accumulator G and the step's D. None without preconditioner, and until the
    /// first step (or a loaded state) allocates them.
    pre: Option<Preconditioned<A::Owned>>,
    /// Momentum m (P). None when β = 0.
    m: Option<A::Owned>,
    /// v measured from the previous step's first two stages (stage estimator).
    dalr_prev_v: Option<f64>,
    /// The error controller's h for the next step.
    h_ec: Option<f64>,
    /// Scratch, reused across steps (none of it is state); allocated at the first step. A step
    /// takes it out (`ensure`), lends it to the helpers and puts it back on every path.
    work: Option<Work<A::Owned>>,
    /// Most stage buffers (besides k_1) live at once, for tests and the memory planner.
    pub peak_live_stage_buffers: usize,
}

/// The diagonal preconditioner's buffers, each of P entries, allocated together (so a step that
/// has G also has D).
struct Preconditioned<B> {
    /// ε of D = (ε + G)^(-1/2).
    eps: f64,
    /// G, the state: committed when a step is accepted.
    g_acc: B,
    /// D for the current step, from G + k_1² (scratch).
    d: B,
}

/// The solver's scratch buffers, each of P entries.
struct Work<B> {
    p: usize,
    k1: B,
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

impl<B> Work<B> {
    fn free_stage(&mut self, j: usize) {
        if let Some(b) = self.stages[j].take() {
            self.pool.push(b);
        }
    }

    /// Every stage buffer back to the pool, in stage order.
    fn free_stages(&mut self) {
        for j in 1..self.stages.len() {
            self.free_stage(j);
        }
    }

    fn live_stage_buffers(&self) -> usize {
        self.stages.iter().filter(|s| s.is_some()).count()
    }
}

/// k_{j+1} (0-based stage j): k_1 or a live stage gradient.
fn stage_gradient<'a, B>(k1: &'a B, stages: &'a [Option<B>], j: usize) -> Result<&'a B> {
    if j == 0 {
        return Ok(k1);
    }
    stages[j].as_ref().ok_or_else(|| internal(format!("stage gradient k_{} was freed before its last use", j + 1)))
}

/// A broken invariant of the solver, as an error rather than a panic.
fn internal(msg: String) -> Error {
    Error::internal(msg)
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
                    format!(
                        "error-controlled steps need an embedded pair (bs32, dopri54 or a custom tableau with b_hat); \
                         `{}` has none",
                        t.name
                    ),
                ));
            }
        }
        if let StepSize::Dalr { estimator: DalrEstimator::Stage, .. } = opts.step_size {
            if t.stages() < 2 || t.a[1][0] == 0.0 {
                return Err(Error::config(
                    "optimizer.dalr.estimator",
                    format!(
                        "the `stage` estimator needs a_21 ≠ 0; tableau `{}` has a_21 = 0 or one stage: \
                         use `finite-difference`",
                        t.name
                    ),
                ));
            }
        }
        Ok(Self {
            opts,
            arith,
            pre: None,
            m: None,
            dalr_prev_v: None,
            h_ec: None,
            work: None,
            peak_live_stage_buffers: 0,
        })
    }

    pub fn options(&self) -> &RkOptions {
        &self.opts
    }

    pub fn backend(&self) -> &A {
        &self.arith
    }

    /// Allocate the state buffers for P parameters that are not loaded yet, and take the scratch
    /// out of `self` (allocated for P unless it fits); the caller puts it back.
    fn ensure(&mut self, p: usize) -> Result<Work<A::Owned>> {
        let a = &self.arith;
        let fits = |b: &A::Owned| a.len(rd::<F, A>(b)) == p;
        if let Some(eps) = self.opts.preconditioner.eps() {
            if !self.pre.as_ref().is_some_and(|pre| fits(&pre.g_acc)) {
                self.pre = Some(Preconditioned { eps, g_acc: a.alloc(p)?, d: a.alloc(p)? });
            }
        }
        if self.opts.momentum != 0.0 && !self.m.as_ref().is_some_and(fits) {
            self.m = Some(a.alloc(p)?);
        }
        match self.work.take() {
            Some(w) if w.p == p => Ok(w),
            _ => Ok(Work {
                p,
                k1: a.alloc(p)?,
                x: a.alloc(p)?,
                acc: a.alloc(p)?,
                err_acc: if self.opts.tableau.is_embedded() { Some(a.alloc(p)?) } else { None },
                stages: (0..self.opts.tableau.stages()).map(|_| None).collect(),
                pool: Vec::new(),
            }),
        }
    }

    /// This step's D; None without preconditioner.
    fn d(&self) -> Option<&A::Buf> {
        self.pre.as_ref().map(|pre| rd::<F, A>(&pre.d))
    }

    fn take_buffer(&self, w: &mut Work<A::Owned>) -> Result<A::Owned> {
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
    fn k1_norm(&self, k1: &A::Buf, field: &mut dyn VectorField<F, A::Buf>) -> Result<f64> {
        let local = self.arith.dnorm2(k1, self.d())?;
        Ok(field.sum_shards(local)?.sqrt())
    }

    /// ‖D·(v − k_1)‖ over all shards of θ.
    fn diff_k1_norm(&self, v: &A::Buf, k1: &A::Buf, field: &mut dyn VectorField<F, A::Buf>) -> Result<f64> {
        let local = self.arith.ddiff2(v, k1, self.d())?;
        Ok(field.sum_shards(local)?.sqrt())
    }

    /// DALR's finite-difference probe: v ≈ ‖D(g(θ_n + ε u) − k_1)‖ / ε, u = f/‖f‖, f = −D k_1.
    fn dalr_probe(
        &self,
        w: &mut Work<A::Owned>,
        theta: &A::Buf,
        field: &mut dyn VectorField<F, A::Buf>,
        eps: f64,
    ) -> Result<f64> {
        let fnorm = self.k1_norm(rd::<F, A>(&w.k1), field)?;
        if fnorm == 0.0 {
            return Ok(0.0);
        }
        let mut probe = self.take_buffer(w)?;
        let v = self.probe_v(w, &mut probe, theta, field, eps, fnorm);
        w.pool.push(probe);
        v
    }

    /// `dalr_probe` with ‖D k_1‖ = `fnorm` ≠ 0, the gradient at the probe point into `probe`.
    fn probe_v(
        &self,
        w: &mut Work<A::Owned>,
        probe: &mut A::Owned,
        theta: &A::Buf,
        field: &mut dyn VectorField<F, A::Buf>,
        eps: f64,
        fnorm: f64,
    ) -> Result<f64> {
        // θ_n + ε·u with u = f/‖f‖ = −D k_1/‖D k_1‖: the same descent as a stage point.
        let k1 = rd::<F, A>(&w.k1);
        self.arith.stage_point(wr::<F, A>(&mut w.x), theta, self.d(), &[(k1, F::one())], F::from_f64(eps / fnorm))?;
        let loss = field.eval(rd::<F, A>(&w.x), wr::<F, A>(probe))?;
        // `loss` is the same on every rank, so all ranks make the same collective calls.
        let v = if loss.is_finite() && !self.any_nonfinite(field, &[rd::<F, A>(probe)])? {
            self.diff_k1_norm(rd::<F, A>(probe), k1, field)? / eps
        } else {
            f64::NAN
        };
        Ok(v)
    }

    /// θ_i = θ_n − h·D·Σ_{j<i} a_ij k_j into `x`, in one pass over the stages that feed it
    /// (a_ij ≠ 0, in j order; θ_i = θ_n when none does).
    fn form_stage_point(&self, w: &mut Work<A::Owned>, theta: &A::Buf, i: usize, h: F) -> Result<()> {
        let row = &self.opts.tableau.a[i];
        let mut stages: Vec<(&A::Buf, F)> = Vec::with_capacity(i);
        for (j, &a) in row.iter().enumerate().take(i).filter(|(_, &a)| a != 0.0) {
            stages.push((rd::<F, A>(stage_gradient(&w.k1, &w.stages, j)?), F::from_f64(a)));
        }
        self.arith.stage_point(wr::<F, A>(&mut w.x), theta, self.d(), &stages, h)
    }

    /// Add stage i's contributions b_i k_i (and (b_i − b̂_i) k_i) to the accumulators.
    fn accumulate(&self, w: &mut Work<A::Owned>, i: usize) -> Result<()> {
        let t = &self.opts.tableau;
        let b = t.b[i];
        let e = t.b_hat.as_ref().map_or(0.0, |bh| b - bh[i]);
        if b == 0.0 && e == 0.0 {
            return Ok(());
        }
        let k = stage_gradient(&w.k1, &w.stages, i)?;
        let err = w.err_acc.as_mut().map(wr::<F, A>);
        self.arith.accumulate(wr::<F, A>(&mut w.acc), err, rd::<F, A>(k), F::from_f64(b), F::from_f64(e))
    }

    /// Stages 2..s with step h from θ_n, leaving g* in `acc` and Σ(b−b̂)k in `err_acc`.
    /// Returns (whether every value stayed finite, the stage-DALR v measured at stage 2, the
    /// gradient evaluations). The stage buffers go back to the pool on every path.
    fn run_stages(
        &mut self,
        w: &mut Work<A::Owned>,
        theta: &A::Buf,
        field: &mut dyn VectorField<F, A::Buf>,
        h: f64,
    ) -> Result<(bool, Option<f64>, u64)> {
        let r = self.stages_2_to_s(w, theta, field, h);
        w.free_stages();
        r
    }

    /// `run_stages` without freeing the stage buffers at the end.
    fn stages_2_to_s(
        &mut self,
        w: &mut Work<A::Owned>,
        theta: &A::Buf,
        field: &mut dyn VectorField<F, A::Buf>,
        h: f64,
    ) -> Result<(bool, Option<f64>, u64)> {
        let s = self.opts.tableau.stages();
        let hf = F::from_f64(h);
        let streaming = self.opts.streaming;
        self.arith.zero(wr::<F, A>(&mut w.acc))?;
        if let Some(e) = w.err_acc.as_mut() {
            self.arith.zero(wr::<F, A>(e))?;
        }
        if streaming {
            self.accumulate(w, 0)?;
        }
        let mut v_stage = None;
        let mut evals = 0;
        let mut finite = true;
        for i in 1..s {
            self.form_stage_point(w, theta, i, hf)?;
            if streaming {
                // k_j with last use i is not needed after θ_i exists (k_1 is kept; see module doc).
                for j in 1..i {
                    if w.stages[j].is_some() && self.opts.tableau.last_use(j) <= i {
                        w.free_stage(j);
                    }
                }
            }
            // k_i joins the stage buffers live now (its slot is empty: `run_stages` frees them all).
            let live = 1 + w.live_stage_buffers();
            let k = self.take_buffer(w)?;
            let ki = w.stages[i].insert(k);
            let loss = field.eval(rd::<F, A>(&w.x), wr::<F, A>(ki))?;
            evals += 1;
            self.peak_live_stage_buffers = self.peak_live_stage_buffers.max(live);
            let ki = rd::<F, A>(ki);
            if !loss.is_finite() || self.any_nonfinite(field, &[ki])? {
                finite = false;
                break;
            }
            if i == 1 {
                if let StepSize::Dalr { estimator: DalrEstimator::Stage, .. } = self.opts.step_size {
                    // k_2 − k_1 ≈ −h a_21 H D k_1  ⇒  v ≈ ‖D(k_2 − k_1)‖ / (h a_21 ‖D k_1‖)
                    let a21 = self.opts.tableau.a[1][0];
                    let k1 = rd::<F, A>(&w.k1);
                    let num = self.diff_k1_norm(ki, k1, field)?;
                    let den = h * a21.abs() * self.k1_norm(k1, field)?;
                    v_stage = if den > 0.0 { Some(num / den) } else { Some(0.0) };
                }
            }
            if streaming {
                self.accumulate(w, i)?;
            }
        }
        if finite && !streaming {
            for i in 0..s {
                self.accumulate(w, i)?;
            }
        }
        Ok((finite, v_stage, evals))
    }

    /// Scaled RMS error of e = h·D·Σ(b−b̂)k against atol + rtol·|θ_n|.
    fn error_norm(
        &self,
        w: &Work<A::Owned>,
        theta: &A::Buf,
        h: f64,
        ec: &ErrorControl,
        field: &mut dyn VectorField<F, A::Buf>,
    ) -> Result<f64> {
        let err = w.err_acc.as_ref().ok_or_else(|| {
            internal(format!("error control without an error accumulator (tableau `{}`)", self.opts.tableau.name))
        })?;
        let s = self.arith.error_sum(theta, rd::<F, A>(err), self.d(), h, ec.atol, ec.rtol)?;
        let s = field.sum_shards(s)?;
        let n = field.sum_shards(self.arith.len(theta) as f64)?;
        Ok((s / n.max(1.0)).sqrt())
    }

    /// The candidate θ_{n+1} into `x` (and β m + g* into `acc` with momentum). Returns finiteness.
    fn form_update(
        &self,
        w: &mut Work<A::Owned>,
        theta: &A::Buf,
        h: f64,
        field: &mut dyn VectorField<F, A::Buf>,
    ) -> Result<bool> {
        let beta = F::from_f64(self.opts.momentum);
        let (m, d) = (rd_opt::<F, A>(&self.m), self.d());
        self.arith.final_update(wr::<F, A>(&mut w.x), theta, wr::<F, A>(&mut w.acc), m, d, beta, F::from_f64(h))?;
        Ok(!self.any_nonfinite(field, &[rd::<F, A>(&w.x), rd::<F, A>(&w.acc)])?)
    }

    /// One step on the back end's buffers (see `Optimizer::step` for the contract): θ and every
    /// gradient the field returns are `A::Buf`s.
    pub fn step_on(
        &mut self,
        step: u64,
        theta: &mut A::Buf,
        field: &mut dyn VectorField<F, A::Buf>,
    ) -> Result<StepReport> {
        let p = self.arith.len(theta);
        if p != field.dim() {
            return Err(Error::optimizer(format!("θ has {p} entries but the model has {}", field.dim())));
        }
        let mut w = self.ensure(p)?;
        let report = self.step_with(&mut w, step, theta, field);
        self.work = Some(w);
        report
    }

    /// `step_on` with the scratch `w` taken out of `self`.
    fn step_with(
        &mut self,
        w: &mut Work<A::Owned>,
        step: u64,
        theta: &mut A::Buf,
        field: &mut dyn VectorField<F, A::Buf>,
    ) -> Result<StepReport> {
        let mut report = StepReport::default();

        // Stage 1: k_1 = g(θ_n) and the step's loss.
        let loss = field.eval(theta, wr::<F, A>(&mut w.k1))?;
        report.grad_evals += 1;
        report.loss = loss;
        if !loss.is_finite() || self.any_nonfinite(field, &[rd::<F, A>(&w.k1)])? {
            return Err(Error::NonFinite(format!(
                "step {step}: the loss ({loss}) or its gradient at the current parameters is not finite; \
                 a smaller step cannot help"
            )));
        }

        // D for this step from G_n = G_{n-1} + k_1², without committing G yet.
        if let Some(pre) = self.pre.as_mut() {
            let eps = F::from_f64(pre.eps);
            self.arith.adagrad_d(wr::<F, A>(&mut pre.d), rd::<F, A>(&pre.g_acc), rd::<F, A>(&w.k1), eps)?;
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
                        self.dalr_probe(w, theta, field, fd_eps)?
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
            let (finite, v_stage, evals) = self.run_stages(w, theta, field, h)?;
            report.grad_evals += evals;
            if !finite {
                self.retry_nonfinite(&mut report, &mut h, step, "a stage gradient")?;
                continue;
            }
            if let StepSize::ErrorControlled { control, .. } = &self.opts.step_size {
                let control = *control;
                let q = self.opts.tableau.embedded_order().unwrap_or(1);
                let err = self.error_norm(w, theta, h, &control, field)?;
                if !err.is_finite() {
                    self.retry_nonfinite(&mut report, &mut h, step, "the error estimate")?;
                    continue;
                }
                if err > 1.0 {
                    report.rejected += 1;
                    if report.rejected > control.max_rejects {
                        return Err(Error::optimizer(format!(
                            "step {step}: error control rejected {} attempts in a row (h fell to {h:.3e}, \
                             scaled error {err:.3e}); loosen optimizer.error_control.atol/rtol",
                            report.rejected
                        )));
                    }
                    h = control.next_h(h, err, q);
                    continue;
                }
                report.error_estimate = Some(err);
                h_next = Some(control.next_h(h, err, q));
            }
            if !self.form_update(w, theta, h, field)? {
                self.retry_nonfinite(&mut report, &mut h, step, "the updated parameters")?;
                continue;
            }
            v_next = v_stage;
            break;
        }

        // Accept: commit θ, m, G and the controllers' state together.
        self.arith.copy(theta, rd::<F, A>(&w.x))?;
        if let Some(m) = self.m.as_mut() {
            std::mem::swap(m, &mut w.acc);
        }
        if let Some(pre) = self.pre.as_mut() {
            self.arith.adagrad_commit(wr::<F, A>(&mut pre.g_acc), rd::<F, A>(&w.k1))?;
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
        if let Some(pre) = &self.pre {
            st.buffers.push(("rk.G".into(), self.arith.download(rd::<F, A>(&pre.g_acc))?));
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
            match (name.as_str(), self.opts.preconditioner.eps()) {
                ("rk.G", Some(eps)) => {
                    let g_acc = self.arith.upload(buf)?;
                    let d = self.arith.alloc(buf.len())?;
                    self.pre = Some(Preconditioned { eps, g_acc, d });
                }
                ("rk.m", _) if self.opts.momentum != 0.0 => self.m = Some(self.arith.upload(buf)?),
                (other, _) => {
                    return Err(Error::optimizer(format!(
                        "optimizer state holds `{other}`, which this RK configuration does not use \
                         (was the preconditioner or momentum changed?)"
                    )))
                }
            }
        }
        let get = |k: &str| st.scalars.get(k).and_then(|v| v.as_f64());
        self.dalr_prev_v = get("dalr_prev_v");
        self.h_ec = get("h_ec");
        Ok(())
    }

    fn retry_nonfinite(&self, report: &mut StepReport, h: &mut f64, step: u64, what: &str) -> Result<()> {
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
