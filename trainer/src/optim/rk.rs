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
use crate::field::{any_nonfinite, VectorField};
use crate::optim::step_size::{cosine, dalr, DalrEstimator, ErrorControl};
use crate::optim::{Optimizer, OptimizerState, StepReport};
use crate::scalar::{sum_squares, Scalar};
use crate::tableau::Tableau;
use serde_json::json;

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

pub struct RkSolver<F: Scalar = f32> {
    opts: RkOptions,
    /// AdaGrad accumulator G (P), committed at acceptance. Empty when there is no preconditioner.
    g_acc: Vec<F>,
    /// Momentum m (P). Empty when β = 0.
    m: Vec<F>,
    /// v measured from the previous step's first two stages (stage estimator).
    dalr_prev_v: Option<f64>,
    /// The error controller's h for the next step.
    h_ec: Option<f64>,
    // ---- scratch, reused across steps; none of it is state ----
    k1: Vec<F>,
    /// D for this step (P); empty without preconditioner.
    d: Vec<F>,
    /// The stage point θ_i (the "model's own parameter storage"), later the candidate θ_{n+1}.
    x: Vec<F>,
    /// Σ b_i k_i, then (with momentum) β m + g*.
    acc: Vec<F>,
    /// Σ (b_i − b̂_i) k_i for the error estimate.
    err_acc: Vec<F>,
    /// Stage gradients k_2..k_s (index i−1 = stage i, 0-based); None when not live.
    stages: Vec<Option<Vec<F>>>,
    /// Freed stage buffers, reused to avoid allocation.
    pool: Vec<Vec<F>>,
    /// Most stage buffers (besides k_1) live at once, for tests and the memory planner.
    pub peak_live_stage_buffers: usize,
}

impl<F: Scalar> RkSolver<F> {
    pub fn new(opts: RkOptions) -> Result<Self> {
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
        let s = t.stages();
        Ok(Self {
            opts,
            g_acc: Vec::new(),
            m: Vec::new(),
            dalr_prev_v: None,
            h_ec: None,
            k1: Vec::new(),
            d: Vec::new(),
            x: Vec::new(),
            acc: Vec::new(),
            err_acc: Vec::new(),
            stages: (0..s).map(|_| None).collect(),
            pool: Vec::new(),
            peak_live_stage_buffers: 0,
        })
    }

    pub fn options(&self) -> &RkOptions {
        &self.opts
    }

    fn ensure(&mut self, p: usize) {
        let pre = self.opts.preconditioner.eps().is_some();
        resize(&mut self.k1, p);
        resize(&mut self.x, p);
        resize(&mut self.acc, p);
        if pre {
            resize(&mut self.g_acc, p);
            resize(&mut self.d, p);
        }
        if self.opts.momentum != 0.0 {
            resize(&mut self.m, p);
        }
        if self.opts.tableau.is_embedded() {
            resize(&mut self.err_acc, p);
        }
    }

    fn take_buffer(&mut self, p: usize) -> Vec<F> {
        let mut b = self.pool.pop().unwrap_or_default();
        resize(&mut b, p);
        b
    }

    /// ‖D·v‖ (D = I without preconditioner), over all shards of θ (`VectorField::sum_shards`).
    fn d_norm(&self, v: &[F], field: &mut dyn VectorField<F>) -> Result<f64> {
        let local = if self.d.is_empty() {
            sum_squares(v)
        } else {
            v.iter().zip(&self.d).map(|(a, d)| (a.as_f64() * d.as_f64()).powi(2)).sum::<f64>()
        };
        Ok(field.sum_shards(local)?.sqrt())
    }

    /// ‖D·(a − b)‖, over all shards of θ.
    fn d_norm_diff(&self, a: &[F], b: &[F], field: &mut dyn VectorField<F>) -> Result<f64> {
        let mut s = 0.0;
        for i in 0..a.len() {
            let d = if self.d.is_empty() { 1.0 } else { self.d[i].as_f64() };
            let v = (a[i].as_f64() - b[i].as_f64()) * d;
            s += v * v;
        }
        Ok(field.sum_shards(s)?.sqrt())
    }

    /// DALR's finite-difference probe: v ≈ ‖D(g(θ_n + ε u) − k_1)‖ / ε, u = f/‖f‖, f = −D k_1.
    fn dalr_probe(&mut self, theta: &[F], field: &mut dyn VectorField<F>, eps: f64) -> Result<f64> {
        let fnorm = self.d_norm(&self.k1, field)?;
        if fnorm == 0.0 {
            return Ok(0.0);
        }
        // θ_n + ε·u with u = f/‖f‖ = −D k_1/‖D k_1‖: the same descent as a stage point.
        self.x.copy_from_slice(&self.k1);
        descend(&mut self.x, theta, &self.d, F::from_f64(eps / fnorm));
        let mut probe = self.take_buffer(theta.len());
        let loss = field.eval(&self.x, &mut probe)?;
        // `loss` is the same on every rank, so all ranks make the same collective calls.
        let v = if loss.is_finite() && !any_nonfinite(field, &[&probe])? {
            self.d_norm_diff(&probe, &self.k1, field)? / eps
        } else {
            f64::NAN
        };
        self.pool.push(probe);
        Ok(v)
    }

    /// θ_i = θ_n − h·D·Σ_{j<i} a_ij k_j into `self.x`, as passes over contiguous slices that
    /// the compiler vectorizes: Σ a_ij k_j is built in `x` (in j order), then x = θ − (h·d)·x.
    fn form_stage_point(&mut self, theta: &[F], i: usize, h: F) {
        let row = &self.opts.tableau.a[i];
        let feeding: Vec<usize> = (0..i).filter(|&j| row[j] != 0.0).collect();
        if let [j] = feeding[..] {
            // One earlier stage (rk4, heun, midpoint, …): a single fused pass, the same
            // operations in the same order as the general path below.
            let k: &[F] = if j == 0 { &self.k1 } else { self.stages[j].as_deref().expect("stage buffer live until last use") };
            let a = F::from_f64(row[j]);
            if self.d.is_empty() {
                self.x.iter_mut().zip(theta).zip(k).for_each(|((x, t), k)| *x = *t - h * (a * *k));
            } else {
                self.x.iter_mut().zip(theta).zip(k).zip(&self.d).for_each(|(((x, t), k), d)| *x = *t - h * *d * (a * *k));
            }
            return;
        }
        let mut first = true;
        for j in feeding {
            let k: &[F] = if j == 0 { &self.k1 } else { self.stages[j].as_deref().expect("stage buffer live until last use") };
            let a = F::from_f64(row[j]);
            if first {
                self.x.iter_mut().zip(k).for_each(|(x, k)| *x = a * *k);
                first = false;
            } else {
                self.x.iter_mut().zip(k).for_each(|(x, k)| *x = *x + a * *k);
            }
        }
        if first {
            // No earlier stage feeds this one (c_i = 0): θ_i = θ_n.
            self.x.copy_from_slice(theta);
            return;
        }
        descend(&mut self.x, theta, &self.d, h);
    }

    /// Add stage i's contributions b_i k_i (and (b_i − b̂_i) k_i) to the accumulators.
    fn accumulate(&mut self, i: usize) {
        let t = &self.opts.tableau;
        let k: &[F] = if i == 0 { &self.k1 } else { self.stages[i].as_deref().expect("stage live at accumulation") };
        let b = t.b[i];
        if b != 0.0 {
            axpy(&mut self.acc, F::from_f64(b), k);
        }
        if let Some(bh) = &t.b_hat {
            let e = b - bh[i];
            if e != 0.0 {
                axpy(&mut self.err_acc, F::from_f64(e), k);
            }
        }
    }

    fn free_stage(&mut self, j: usize) {
        if let Some(b) = self.stages[j].take() {
            self.pool.push(b);
        }
    }

    fn live_stage_buffers(&self) -> usize {
        self.stages.iter().filter(|s| s.is_some()).count()
    }

    /// Stages 2..s with step h from θ_n, leaving g* in `acc` and Σ(b−b̂)k in `err_acc`.
    /// Returns (whether every value stayed finite, the stage-DALR v measured at stage 2).
    fn run_stages(&mut self, theta: &[F], field: &mut dyn VectorField<F>, h: f64) -> Result<(bool, Option<f64>, u64)> {
        let s = self.opts.tableau.stages();
        let p = theta.len();
        let hf = F::from_f64(h);
        let streaming = self.opts.streaming;
        fill(&mut self.acc, F::zero());
        fill(&mut self.err_acc, F::zero());
        if streaming {
            self.accumulate(0);
        }
        let mut v_stage = None;
        let mut evals = 0;
        let mut finite = true;
        for i in 1..s {
            self.form_stage_point(theta, i, hf);
            if streaming {
                // k_j with last use i is not needed after θ_i exists (k_1 is kept; see module doc).
                for j in 1..i {
                    if self.stages[j].is_some() && self.opts.tableau.last_use(j) <= i {
                        self.free_stage(j);
                    }
                }
            }
            let mut k = self.take_buffer(p);
            let loss = field.eval(&self.x, &mut k)?;
            evals += 1;
            self.stages[i] = Some(k);
            self.peak_live_stage_buffers = self.peak_live_stage_buffers.max(self.live_stage_buffers());
            if !loss.is_finite() || any_nonfinite(field, &[self.stages[i].as_deref().unwrap()])? {
                finite = false;
                break;
            }
            if i == 1 {
                if let StepSize::Dalr { estimator: DalrEstimator::Stage, .. } = self.opts.step_size {
                    // k_2 − k_1 ≈ −h a_21 H D k_1  ⇒  v ≈ ‖D(k_2 − k_1)‖ / (h a_21 ‖D k_1‖)
                    let a21 = self.opts.tableau.a[1][0];
                    let num = self.d_norm_diff(self.stages[1].as_deref().unwrap(), &self.k1, field)?;
                    let den = h * a21.abs() * self.d_norm(&self.k1, field)?;
                    v_stage = if den > 0.0 { Some(num / den) } else { Some(0.0) };
                }
            }
            if streaming {
                self.accumulate(i);
            }
        }
        if finite && !streaming {
            for i in 0..s {
                self.accumulate(i);
            }
        }
        for j in 1..s {
            self.free_stage(j);
        }
        Ok((finite, v_stage, evals))
    }

    /// Scaled RMS error of e = h·D·Σ(b−b̂)k against atol + rtol·|θ_n|.
    fn error_norm(&self, theta: &[F], h: f64, ec: &ErrorControl, field: &mut dyn VectorField<F>) -> Result<f64> {
        let s: f64 = theta
            .iter()
            .zip(&self.err_acc)
            .enumerate()
            .map(|(p, (t, e))| {
                let d = self.d.get(p).map_or(1.0, |d| d.as_f64());
                let e = h * d * e.as_f64();
                (e / (ec.atol + ec.rtol * t.as_f64().abs())).powi(2)
            })
            .sum();
        let s = field.sum_shards(s)?;
        let n = field.sum_shards(theta.len() as f64)?;
        Ok((s / n.max(1.0)).sqrt())
    }

    /// The candidate θ_{n+1} into `x` (and β m + g* into `acc` with momentum). Returns finiteness.
    fn form_update(&mut self, theta: &[F], h: f64, field: &mut dyn VectorField<F>) -> Result<bool> {
        if !self.m.is_empty() {
            let beta = F::from_f64(self.opts.momentum);
            self.acc.iter_mut().zip(&self.m).for_each(|(a, m)| *a = beta * *m + *a);
        }
        self.x.copy_from_slice(&self.acc);
        descend(&mut self.x, theta, &self.d, F::from_f64(h));
        Ok(!any_nonfinite(field, &[&self.x, &self.acc])?)
    }
}

/// x ← θ − (h·d)·x, with d = 1 when `d` is empty (no preconditioner). The one place where the
/// preconditioned step is formed, for stage points and the final update alike.
fn descend<F: Scalar>(x: &mut [F], theta: &[F], d: &[F], h: F) {
    if d.is_empty() {
        x.iter_mut().zip(theta).for_each(|(x, t)| *x = *t - h * *x);
    } else {
        x.iter_mut().zip(theta).zip(d).for_each(|((x, t), d)| *x = *t - h * *d * *x);
    }
}

impl<F: Scalar> Optimizer<F> for RkSolver<F> {
    fn name(&self) -> String {
        format!("rk({})", self.opts.tableau.name)
    }

    fn step(&mut self, step: u64, theta: &mut [F], field: &mut dyn VectorField<F>) -> Result<StepReport> {
        let p = theta.len();
        if p != field.dim() {
            return Err(Error::Other(format!("θ has {p} entries but the model has {}", field.dim())));
        }
        self.ensure(p);
        let mut report = StepReport::default();

        // Stage 1: k_1 = g(θ_n) and the step's loss.
        let loss = field.eval(theta, &mut self.k1)?;
        report.grad_evals += 1;
        report.loss = loss;
        if !loss.is_finite() || any_nonfinite(field, &[&self.k1])? {
            return Err(Error::NonFinite(format!(
                "step {step}: the loss ({loss}) or its gradient at the current parameters is not finite; a smaller step cannot help"
            )));
        }

        // D for this step from G_n = G_{n-1} + k_1², without committing G yet.
        if let Some(eps) = self.opts.preconditioner.eps() {
            let eps = F::from_f64(eps);
            for ((d, g), k) in self.d.iter_mut().zip(&self.g_acc).zip(&self.k1) {
                *d = F::one() / (eps + (*g + *k * *k)).sqrt();
            }
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
        theta.copy_from_slice(&self.x);
        if !self.m.is_empty() {
            std::mem::swap(&mut self.m, &mut self.acc);
        }
        if !self.g_acc.is_empty() {
            self.g_acc.iter_mut().zip(&self.k1).for_each(|(g, k)| *g = *g + *k * *k);
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

    fn state(&self) -> OptimizerState<F> {
        let mut st = OptimizerState::default();
        if !self.g_acc.is_empty() {
            st.buffers.push(("rk.G".into(), self.g_acc.clone()));
        }
        if !self.m.is_empty() {
            st.buffers.push(("rk.m".into(), self.m.clone()));
        }
        st.scalars.insert("dalr_prev_v".into(), json!(self.dalr_prev_v));
        st.scalars.insert("h_ec".into(), json!(self.h_ec));
        st
    }

    fn load_state(&mut self, st: &OptimizerState<F>) -> Result<()> {
        for (name, buf) in &st.buffers {
            match name.as_str() {
                "rk.G" if self.opts.preconditioner.eps().is_some() => self.g_acc = buf.clone(),
                "rk.m" if self.opts.momentum != 0.0 => self.m = buf.clone(),
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
}

impl<F: Scalar> RkSolver<F> {
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

fn resize<F: Scalar>(v: &mut Vec<F>, p: usize) {
    if v.len() != p {
        v.clear();
        v.resize(p, F::zero());
    }
}

fn fill<F: Scalar>(v: &mut [F], x: F) {
    v.iter_mut().for_each(|e| *e = x);
}

/// y += a·x
fn axpy<F: Scalar>(y: &mut [F], a: F, x: &[F]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y = *y + a * *x;
    }
}

#[cfg(test)]
#[path = "rk_tests.rs"]
mod tests;
