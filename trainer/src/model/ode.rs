//! Neural-ODE blocks: Runge–Kutta in *depth*. A block maps its input x to y(T), the solution at
//! time T of dy/dt = f_θ(t, y), y(0) = x, computed with `steps` fixed steps h = T / steps of an
//! explicit Runge–Kutta method given by a Butcher tableau (`tableau::Tableau`: every built-in
//! method and every custom one), and differentiates through the solve in one of three ways
//! (`model.ode.gradient`):
//!
//! - **backprop** — the solve is built from differentiable ops and autograd walks back through
//!   every stage of every step: one forward and one backward pass, but every step's activations
//!   stay alive until the backward pass reaches them (memory ∝ steps).
//! - **checkpoint** — the forward pass keeps only `checkpoints` intermediate states; the
//!   backward pass walks the steps in reverse, recomputing each step's input state forward from
//!   the nearest stored one and taking that one step's vector–Jacobian product. The states are
//!   placed by the binomial (recursive) schedule of Griewank's `revolve` (Griewank 1992;
//!   Griewank & Walther 2000), the optimal offline schedule that diffrax's
//!   `RecursiveCheckpointAdjoint` approximates online and that McCallum & Foster compare against:
//!   it minimises the number of recomputed steps for the given number of stored states
//!   (`Schedule`). Memory: the stored states plus one step's activations.
//! - **reversible** — the algebraically reversible solver of McCallum & Foster, "Efficient,
//!   Accurate and Stable Gradients for Neural ODEs" (arXiv:2410.11648, 2024). With Ψ_h(t, y) the
//!   increment of one step of the base tableau (y_{n+1} = y_n + Ψ_h(t_n, y_n) for the plain
//!   method) and a coupling λ ∈ (0, 1], it carries a pair of states, y_0 = z_0 = x:
//!
//!   ```text
//!   y_{n+1} = λ·y_n + (1 − λ)·z_n + Ψ_h(t_n, z_n)
//!   z_{n+1} = z_n − Ψ_{−h}(t_{n+1}, y_{n+1})
//!   ```
//!
//!   and outputs y_N. Each step can be undone in closed form (the paper's eq. 3):
//!
//!   ```text
//!   z_n = z_{n+1} + Ψ_{−h}(t_{n+1}, y_{n+1})
//!   y_n = (y_{n+1} − (1 − λ)·z_n − Ψ_h(t_n, z_n)) / λ
//!   ```
//!
//!   so the backward pass needs only (y_N, z_N): it walks n = N−1 … 0, rebuilding (y_n, z_n) from
//!   (y_{n+1}, z_{n+1}) and taking the vector–Jacobian products of the two local increments on
//!   the way (the paper's Algorithm 1, derived at `Inner::reverse_reversible`). Only one step's
//!   activations are ever alive: memory does not grow with the number of steps, and the
//!   gradient is the exact gradient of the discrete reversible solve, up to the rounding of the
//!   reconstruction. The scheme has the base method's order (the paper's Theorem; tested here on
//!   a linear ODE) and is a different discretisation from the plain method: a model trained with
//!   it should be evaluated with it (kutta does: the scheme follows `model.ode.gradient`).
//!
//! Backprop and checkpoint compute the same function (the plain Runge–Kutta solve) and the same
//! gradient up to the order of the sums; reversible computes the reversible solve and its exact
//! gradient, which backprop through the same scheme reproduces (tests: f64 ≤ 1e-9 relative).
//!
//! Checkpoint and reversible are a custom op over (x, the field's parameters packed into one
//! vector): the forward pass runs the solve on detached tensors (no graph), the op's backward pass
//! runs the reverse sweep with one small autograd graph per step (`vjp`). Nothing here is
//! device-specific: the ops are candle ops, so the block runs wherever its dynamics do.

use std::sync::Arc;

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::layers::with_grads;
use crate::error::{Error, Result};
use crate::tableau::{CustomTableau, Tableau};

/// The right-hand side f_θ(t, y) of a neural ODE: a small network with its own parameters and
/// the time as an input.
pub trait Dynamics: Send + Sync {
    /// f_θ(t, y) for a batch of states y, with the field's parameter tensors `params` (in the
    /// field's own order). Built from differentiable ops: the result's gradient must reach y and
    /// every parameter.
    fn eval(&self, params: &[Tensor], t: f64, y: &Tensor) -> Result<Tensor>;
}

/// `model.ode.gradient`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GradientMethod {
    /// Differentiate through every step (memory ∝ steps).
    #[default]
    Backprop,
    /// Keep `model.ode.checkpoints` states (binomial schedule), recompute the rest.
    Checkpoint,
    /// McCallum–Foster reversible solver: reconstruct the states backwards (memory independent
    /// of steps).
    Reversible,
}

impl GradientMethod {
    pub fn name(self) -> &'static str {
        match self {
            GradientMethod::Backprop => "backprop",
            GradientMethod::Checkpoint => "checkpoint",
            GradientMethod::Reversible => "reversible",
        }
    }
}

/// The coupling λ of the reversible solver by default (the paper recommends λ ∈ [0.99, 0.999]).
pub const DEFAULT_COUPLING: f64 = 0.999;
/// Steps of the block by default.
pub const DEFAULT_STEPS: usize = 4;
/// The end time T by default: the block integrates over [0, 1].
pub const DEFAULT_TIME: f64 = 1.0;

/// `[model.ode]`: the ODE block's solver and gradient. Defaults are filled in when the config is
/// loaded (`OdeConfig::fill_defaults`), so `config.toml` shows every value used.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OdeConfig {
    /// A built-in tableau (`kutta tableaux`; default `rk4`) or `custom` with `custom_tableau`.
    pub tableau: Option<String>,
    /// `[model.ode.custom_tableau]` (a, b; as `optimizer.custom_tableau`), with tableau = "custom".
    pub custom_tableau: Option<CustomTableau>,
    /// Fixed steps over [0, time] (4).
    pub steps: Option<usize>,
    /// The end time T (1.0).
    pub time: Option<f64>,
    /// `backprop` (default), `checkpoint` or `reversible`.
    pub gradient: Option<GradientMethod>,
    /// checkpoint: the states kept besides the block's input (default ⌈log₂ steps⌉).
    pub checkpoints: Option<usize>,
    /// reversible: the coupling λ ∈ (0, 1] (0.999).
    pub coupling: Option<f64>,
}

impl OdeConfig {
    /// Fill in the defaults: tableau, steps, time, gradient, and the key of the chosen gradient
    /// (checkpoints or coupling).
    pub fn fill_defaults(&mut self) {
        self.tableau.get_or_insert_with(|| "rk4".into());
        let steps = *self.steps.get_or_insert(DEFAULT_STEPS);
        self.time.get_or_insert(DEFAULT_TIME);
        match *self.gradient.get_or_insert_default() {
            GradientMethod::Checkpoint => {
                self.checkpoints.get_or_insert(default_checkpoints(steps));
            }
            GradientMethod::Reversible => {
                self.coupling.get_or_insert(DEFAULT_COUPLING);
            }
            GradientMethod::Backprop => {}
        }
    }

    /// The solver this table describes, validated; errors name the key (`model.ode.…`).
    pub fn solver(&self) -> Result<Solver> {
        let key = |k: &str| format!("model.ode.{k}");
        let name = self.tableau.as_deref().unwrap_or("rk4");
        let tableau = if name == "custom" {
            let spec = self.custom_tableau.as_ref().ok_or_else(|| {
                Error::config(
                    key("custom_tableau"),
                    "model.ode.tableau = \"custom\" needs a [model.ode.custom_tableau] table with a and b",
                )
            })?;
            Tableau::custom(spec).map_err(|e| Error::config(key("custom_tableau"), e.to_string()))?
        } else {
            if self.custom_tableau.is_some() {
                return Err(Error::config(
                    key("custom_tableau"),
                    format!("given, but model.ode.tableau = {name:?}; set model.ode.tableau = \"custom\" to use it"),
                ));
            }
            Tableau::builtin(name).map_err(|e| Error::config(key("tableau"), e.to_string()))?
        };
        let steps = self.steps.unwrap_or(DEFAULT_STEPS);
        if steps == 0 {
            return Err(Error::config(key("steps"), "must be at least 1"));
        }
        let time = self.time.unwrap_or(DEFAULT_TIME);
        if !(time.is_finite() && time > 0.0) {
            return Err(Error::config(key("time"), format!("must be a positive number, got {time}")));
        }
        let gradient = self.gradient.unwrap_or_default();
        if gradient != GradientMethod::Checkpoint && self.checkpoints.is_some() {
            return Err(Error::config(
                key("checkpoints"),
                format!("is read only with model.ode.gradient = \"checkpoint\", not {:?}", gradient.name()),
            ));
        }
        if gradient != GradientMethod::Reversible && self.coupling.is_some() {
            return Err(Error::config(
                key("coupling"),
                format!("is read only with model.ode.gradient = \"reversible\", not {:?}", gradient.name()),
            ));
        }
        let method = match gradient {
            GradientMethod::Backprop => Method::Backprop,
            GradientMethod::Checkpoint => {
                Method::Checkpoint { checkpoints: self.checkpoints.unwrap_or(default_checkpoints(steps)) }
            }
            GradientMethod::Reversible => {
                let coupling = self.coupling.unwrap_or(DEFAULT_COUPLING);
                if !(coupling > 0.0 && coupling <= 1.0) {
                    return Err(Error::config(
                        key("coupling"),
                        format!(
                            "must be in (0, 1] (λ = 1 is the plain asynchronous leapfrog pairing, λ → 0 \
                             divides by λ in the backward pass; the paper uses 0.99–0.999), got {coupling}"
                        ),
                    ));
                }
                Method::Reversible { coupling }
            }
        };
        Ok(Solver { tableau, steps, time, method })
    }
}

/// ⌈log₂ steps⌉ stored states (at least 1): what diffrax's recursive checkpointing keeps by
/// default for a known number of steps.
pub fn default_checkpoints(steps: usize) -> usize {
    (usize::BITS - steps.saturating_sub(1).leading_zeros()).max(1) as usize
}

/// How the block is solved and differentiated.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Method {
    /// The plain Runge–Kutta solve, autograd through every step.
    Backprop,
    /// The plain solve, `checkpoints` stored states, the rest recomputed.
    Checkpoint { checkpoints: usize },
    /// The reversible solve with coupling λ, its states reconstructed backwards.
    Reversible { coupling: f64 },
    /// The reversible solve, autograd through every step (the reference the reconstruction is
    /// tested against; not a config choice).
    ReversibleBackprop { coupling: f64 },
}

/// A validated ODE solver: tableau, steps over [0, time], and method.
#[derive(Clone, Debug)]
pub struct Solver {
    pub tableau: Tableau,
    pub steps: usize,
    pub time: f64,
    pub method: Method,
}

impl Solver {
    pub fn new(tableau: Tableau, steps: usize, time: f64, method: Method) -> Result<Self> {
        if steps == 0 || !(time.is_finite() && time > 0.0) {
            return Err(Error::model(format!("an ODE solve needs steps ≥ 1 and time > 0, got {steps} and {time}")));
        }
        if let Method::Reversible { coupling } | Method::ReversibleBackprop { coupling } = method {
            if !(coupling > 0.0 && coupling <= 1.0) {
                return Err(Error::model(format!("the coupling λ must be in (0, 1], got {coupling}")));
            }
        }
        Ok(Self { tableau, steps, time, method })
    }

    /// e.g. "rk4, 4 steps over [0, 1], reversible (λ 0.999)".
    pub fn describe(&self) -> String {
        let method = match self.method {
            Method::Backprop => "backprop".to_string(),
            Method::Checkpoint { checkpoints } => format!("checkpoint ({checkpoints} states)"),
            Method::Reversible { coupling } => format!("reversible (λ {coupling})"),
            Method::ReversibleBackprop { coupling } => format!("reversible scheme, backprop (λ {coupling})"),
        };
        format!("{}, {} steps over [0, {}], {method}", self.tableau.name, self.steps, self.time)
    }

    /// The states one forward step carries: 2 for the reversible scheme, else 1.
    pub fn state_tensors(&self) -> usize {
        match self.method {
            Method::Reversible { .. } | Method::ReversibleBackprop { .. } => 2,
            _ => 1,
        }
    }
}

/// A neural-ODE block: a solver and the dynamics it integrates.
#[derive(Clone)]
pub struct OdeBlock {
    inner: Arc<Inner>,
}

struct Inner {
    solver: Solver,
    dynamics: Arc<dyn Dynamics>,
    /// The checkpoint schedule (checkpoint method only).
    schedule: Option<Schedule>,
}

impl std::fmt::Debug for OdeBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OdeBlock({})", self.inner.solver.describe())
    }
}

impl OdeBlock {
    pub fn new(solver: Solver, dynamics: Arc<dyn Dynamics>) -> Self {
        let schedule = match solver.method {
            Method::Checkpoint { checkpoints } => Some(Schedule::new(solver.steps, checkpoints)),
            _ => None,
        };
        Self { inner: Arc::new(Inner { solver, dynamics, schedule }) }
    }

    pub fn solver(&self) -> &Solver {
        &self.inner.solver
    }

    /// y(T) from y(0) = x with the field's parameters `params`, differentiable with respect to x
    /// and `params` by the solver's method. Without anything to differentiate (evaluation) it is
    /// the plain forward solve.
    pub fn solve(&self, params: &[Tensor], x: &Tensor) -> Result<Tensor> {
        let inner = &self.inner;
        let tracked = x.track_op() || params.iter().any(|p| p.track_op());
        match inner.solver.method {
            Method::Backprop | Method::ReversibleBackprop { .. } => {
                let mut state = inner.initial(x);
                for n in 0..inner.solver.steps {
                    state = inner.step(params, n, &state)?;
                }
                Ok(state.swap_remove(0))
            }
            _ if !tracked => {
                let mut state = inner.initial(x);
                for n in 0..inner.solver.steps {
                    state = inner.step(params, n, &state)?;
                }
                Ok(state.swap_remove(0))
            }
            Method::Checkpoint { .. } | Method::Reversible { .. } => {
                let plain: Vec<Tensor> = params.iter().map(Tensor::detach).collect();
                let x0 = x.detach();
                let (value, saved) = inner.forward_saving(&plain, &x0)?;
                let shapes = params.iter().map(|p| p.dims().to_vec()).collect();
                let flat: Vec<Tensor> = params.iter().map(|p| p.flatten_all()).collect::<candle_core::Result<_>>()?;
                let packed = Tensor::cat(&flat, 0)?;
                let op = Adjoint { inner: self.inner.clone(), shapes, saved };
                with_grads(&value, x, &packed, "ode-adjoint", move |x, packed, g| {
                    let (dx, dp) = op.backward(x, packed, g).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                    Ok((x.track_op().then_some(dx), packed.track_op().then_some(dp)))
                })
            }
        }
    }

    /// Every state of the forward solve, (y_n) or (y_n, z_n) for n = 0 … steps, without a graph
    /// (tests and diagnostics).
    pub fn trajectory(&self, params: &[Tensor], x: &Tensor) -> Result<Vec<Vec<Tensor>>> {
        let plain: Vec<Tensor> = params.iter().map(Tensor::detach).collect();
        let mut states = vec![self.inner.initial(&x.detach())];
        for n in 0..self.inner.solver.steps {
            let next = self.inner.step(&plain, n, states.last().expect("one state at least"))?;
            states.push(next);
        }
        Ok(states)
    }

    /// The reversible scheme's inverse step: (y_n, z_n) from (y_{n+1}, z_{n+1}) (tests).
    pub fn inverse_step(&self, params: &[Tensor], n: usize, next: &[Tensor]) -> Result<Vec<Tensor>> {
        let (Method::Reversible { coupling } | Method::ReversibleBackprop { coupling }) = self.inner.solver.method
        else {
            return Err(Error::model("only the reversible scheme has an inverse step"));
        };
        let plain: Vec<Tensor> = params.iter().map(Tensor::detach).collect();
        let (y1, z1) = (&next[0], &next[1]);
        let h = self.inner.h();
        let z0 = (z1 + self.inner.increment(&plain, self.inner.t(n + 1), -h, y1)?)?;
        let y0 = inverse_y(y1, &z0, &self.inner.increment(&plain, self.inner.t(n), h, &z0)?, coupling)?;
        Ok(vec![y0, z0])
    }

    /// Steps recomputed by the checkpoint schedule's backward pass beyond the forward solve (0
    /// for the other methods).
    pub fn recomputed_steps(&self) -> u64 {
        self.inner.schedule.as_ref().map_or(0, |s| s.recomputed(self.inner.solver.steps))
    }
}

/// y_n = (y_{n+1} − (1 − λ)·z_n − Ψ_h(t_n, z_n)) / λ.
fn inverse_y(y1: &Tensor, z0: &Tensor, psi: &Tensor, coupling: f64) -> Result<Tensor> {
    Ok(((y1 - z0.affine(1.0 - coupling, 0.0)?)? - psi)?.affine(1.0 / coupling, 0.0)?)
}

impl Inner {
    fn h(&self) -> f64 {
        self.solver.time / self.solver.steps as f64
    }

    /// t_n = T·n/N (not n·h summed, so that t_N is T exactly).
    fn t(&self, n: usize) -> f64 {
        self.solver.time * n as f64 / self.solver.steps as f64
    }

    fn initial(&self, x: &Tensor) -> Vec<Tensor> {
        vec![x.clone(); self.solver.state_tensors()]
    }

    /// Ψ_h(t, y) = h·Σ_i b_i k_i with k_i = f(t + c_i h, y + h·Σ_j a_ij k_j): one step's increment
    /// of the base tableau (h may be negative). Stages no later stage and no weight reads are
    /// skipped (the FSAL stage of an embedded pair).
    fn increment(&self, params: &[Tensor], t: f64, h: f64, y: &Tensor) -> Result<Tensor> {
        let tab = &self.solver.tableau;
        let s = tab.stages();
        let mut ks: Vec<Option<Tensor>> = Vec::with_capacity(s);
        for i in 0..s {
            let needed = tab.b[i] != 0.0 || (i + 1..s).any(|j| tab.a[j][i] != 0.0);
            if !needed {
                ks.push(None);
                continue;
            }
            let mut yi = y.clone();
            for (j, k) in ks.iter().enumerate() {
                if let (Some(k), a) = (k, tab.a[i][j]) {
                    if a != 0.0 {
                        yi = (yi + k.affine(h * a, 0.0)?)?;
                    }
                }
            }
            ks.push(Some(self.dynamics.eval(params, t + tab.c[i] * h, &yi)?));
        }
        let mut out: Option<Tensor> = None;
        for (k, &b) in ks.iter().zip(&tab.b) {
            if let (Some(k), true) = (k, b != 0.0) {
                let term = k.affine(h * b, 0.0)?;
                out = Some(match out {
                    None => term,
                    Some(o) => (o + term)?,
                });
            }
        }
        out.ok_or_else(|| Error::model(format!("tableau {} has no nonzero weight", tab.name)))
    }

    /// One forward step n → n + 1 of the scheme.
    fn step(&self, params: &[Tensor], n: usize, state: &[Tensor]) -> Result<Vec<Tensor>> {
        let h = self.h();
        match self.solver.method {
            Method::Reversible { coupling } | Method::ReversibleBackprop { coupling } => {
                let (y, z) = (&state[0], &state[1]);
                let mut y1 = (y.affine(coupling, 0.0)? + self.increment(params, self.t(n), h, z)?)?;
                if coupling != 1.0 {
                    y1 = (y1 + z.affine(1.0 - coupling, 0.0)?)?;
                }
                let z1 = (z - self.increment(params, self.t(n + 1), -h, &y1)?)?;
                Ok(vec![y1, z1])
            }
            _ => Ok(vec![(&state[0] + self.increment(params, self.t(n), h, &state[0])?)?]),
        }
    }

    /// `step` from state `s` at step `from` to step `to`, without a graph.
    fn advance(&self, params: &[Tensor], mut s: Vec<Tensor>, from: usize, to: usize) -> Result<Vec<Tensor>> {
        for n in from..to {
            s = self.step(params, n, &s)?;
        }
        Ok(s)
    }

    /// The forward solve on detached tensors for the custom-op methods: y_N, and what the
    /// backward pass starts from — the checkpoint schedule's first chain of stored states, or the
    /// reversible scheme's final pair.
    fn forward_saving(&self, params: &[Tensor], x: &Tensor) -> Result<(Tensor, Saved)> {
        let steps = self.solver.steps;
        let mut state = self.initial(x);
        let mut chain = Vec::new();
        if let (Method::Checkpoint { checkpoints }, Some(schedule)) = (self.solver.method, &self.schedule) {
            let (mut a, mut free) = (0, checkpoints);
            for n in 0..steps {
                // reverse(a, steps, free) stores the state at a + split(steps − a, free) first.
                if free > 0 && steps - a > 1 && n == a + schedule.split(steps - a, free) {
                    chain.push((n, state.clone()));
                    (a, free) = (n, free - 1);
                }
                state = self.step(params, n, &state)?;
            }
            return Ok((state[0].clone(), Saved::Chain(chain)));
        }
        state = self.advance(params, state, 0, steps)?;
        Ok((state[0].clone(), Saved::Terminal(state)))
    }

    /// The checkpointed reverse sweep over steps a..b: `state_a` is the state at step a, `adj`
    /// the gradient with respect to the state at b; returns the gradient with respect to the
    /// state at a and adds the parameters' gradient into `grads`. `free` states may be stored
    /// beside `state_a`; `chain` holds states the forward pass already stored for this call
    /// (the first at a + split(b − a, free), as `forward_saving` placed them).
    #[allow(clippy::too_many_arguments)]
    fn reverse_checkpointed(
        &self,
        params: &[Tensor],
        vjp: &mut Vjp,
        a: usize,
        b: usize,
        state_a: Vec<Tensor>,
        free: usize,
        chain: &[(usize, Vec<Tensor>)],
        mut adj: Vec<Tensor>,
    ) -> Result<Vec<Tensor>> {
        if b - a == 1 {
            return Ok(vjp.apply(&state_a, &adj, |p, s| self.step(p, a, s))?.1);
        }
        if free == 0 {
            for n in (a..b).rev() {
                let s = self.advance(params, state_a.clone(), a, n)?;
                adj = vjp.apply(&s, &adj, |p, s| self.step(p, n, s))?.1;
            }
            return Ok(adj);
        }
        let schedule = self.schedule.as_ref().ok_or_else(|| Error::internal("checkpoint sweep without a schedule"))?;
        let m = a + schedule.split(b - a, free);
        let (state_m, rest) = match chain.split_first() {
            Some(((at, s), rest)) if *at == m => (s.clone(), rest),
            _ => (self.advance(params, state_a.clone(), a, m)?, &[][..]),
        };
        let adj = self.reverse_checkpointed(params, vjp, m, b, state_m, free - 1, rest, adj)?;
        self.reverse_checkpointed(params, vjp, a, m, state_a, free, &[], adj)
    }

    /// The reversible scheme's backward pass (McCallum & Foster, Algorithm 1). Write one forward
    /// step as two maps,
    ///
    /// ```text
    /// y_{n+1} = λ·y_n + (1 − λ)·z_n + Ψ_h(t_n, z_n)        (A)
    /// z_{n+1} = z_n − Ψ_{−h}(t_{n+1}, y_{n+1})              (B)
    /// ```
    ///
    /// and let (ȳ, z̄) = ∂L/∂(y_{n+1}, z_{n+1}) with (y_{n+1}, z_{n+1}) taken as independent (the
    /// adjoint of the pair after step n). Undoing (B) first: z_{n+1} depends on y_{n+1}, so the
    /// total derivative with respect to y_{n+1} is
    ///
    /// ```text
    /// ŷ = ȳ − (∂Ψ_{−h}/∂y)(t_{n+1}, y_{n+1})ᵀ·z̄,      θ̄ −= (∂Ψ_{−h}/∂θ)ᵀ·z̄,
    /// ```
    ///
    /// and z_n = z_{n+1} + Ψ_{−h}(t_{n+1}, y_{n+1}) from the same evaluation of Ψ_{−h}. Then (A):
    ///
    /// ```text
    /// ȳ_n = λ·ŷ,   z̄_n = z̄ + (1 − λ)·ŷ + (∂Ψ_h/∂z)(t_n, z_n)ᵀ·ŷ,   θ̄ += (∂Ψ_h/∂θ)ᵀ·ŷ,
    /// ```
    ///
    /// and y_n = (y_{n+1} − (1 − λ)·z_n − Ψ_h(t_n, z_n)) / λ from the same evaluation of Ψ_h.
    /// Each of the two increments is evaluated once with a small graph that gives its value (to
    /// rebuild the state) and its vector–Jacobian product (to carry the adjoint), then dropped.
    /// Starting from (ȳ_N, z̄_N) = (∂L/∂y_N, 0), the input x = y_0 = z_0 gets ȳ_0 + z̄_0.
    /// Cost: 2 increments per step forward, 2 increments with their backward passes per step
    /// backward.
    fn reverse_reversible(&self, vjp: &mut Vjp, coupling: f64, terminal: &[Tensor], g: &Tensor) -> Result<Tensor> {
        let h = self.h();
        let (mut y, mut z) = (terminal[0].clone(), terminal[1].clone());
        let mut ybar = g.clone();
        let mut zbar: Option<Tensor> = None;
        for n in (0..self.solver.steps).rev() {
            let (t0, t1) = (self.t(n), self.t(n + 1));
            // (B): Ψ_{−h}(t_{n+1}, y_{n+1}), its VJP with −z̄.
            let (psi, yhat) = match &zbar {
                None => (self.increment(vjp.params(), t1, -h, &y)?, ybar.clone()),
                Some(zb) => {
                    let (out, din) = vjp.apply(std::slice::from_ref(&y), &[zb.neg()?], |p, s| {
                        Ok(vec![self.increment(p, t1, -h, &s[0])?])
                    })?;
                    (out[0].clone(), (&ybar + &din[0])?)
                }
            };
            let z_n = (&z + psi)?;
            // (A): Ψ_h(t_n, z_n), its VJP with ŷ.
            let (out, din) = vjp.apply(std::slice::from_ref(&z_n), std::slice::from_ref(&yhat), |p, s| {
                Ok(vec![self.increment(p, t0, h, &s[0])?])
            })?;
            let y_n = inverse_y(&y, &z_n, &out[0], coupling)?;
            let mut zb = (yhat.affine(1.0 - coupling, 0.0)? + &din[0])?;
            if let Some(old) = &zbar {
                zb = (zb + old)?;
            }
            zbar = Some(zb);
            ybar = yhat.affine(coupling, 0.0)?;
            (y, z) = (y_n, z_n);
        }
        Ok(match zbar {
            Some(zb) => (ybar + zb)?,
            None => ybar,
        })
    }
}

/// What the forward pass of a custom-op method leaves for its backward pass.
enum Saved {
    /// checkpoint: the states stored along the forward solve, (step, state).
    Chain(Vec<(usize, Vec<Tensor>)>),
    /// reversible: (y_N, z_N).
    Terminal(Vec<Tensor>),
}

/// Vector–Jacobian products of single steps, with the field's parameters as leaves made once per
/// backward pass, their gradients summed over every product.
struct Vjp {
    vars: Vec<Var>,
    /// The leaves as tensors (what the products' graphs are built from).
    leaves: Vec<Tensor>,
    /// The parameters without a graph (for evaluations whose gradient is not needed).
    plain: Vec<Tensor>,
    grads: Vec<Option<Tensor>>,
}

impl Vjp {
    fn new(params: &[Tensor]) -> Result<Self> {
        let plain: Vec<Tensor> = params.iter().map(Tensor::detach).collect();
        let vars = plain.iter().map(Var::from_tensor).collect::<candle_core::Result<Vec<_>>>()?;
        let leaves = vars.iter().map(|v| v.as_tensor().clone()).collect();
        Ok(Self { grads: vec![None; vars.len()], vars, leaves, plain })
    }

    /// The parameters without a graph.
    fn params(&self) -> &[Tensor] {
        &self.plain
    }

    /// F(inputs) for F = `f(params, inputs)` and the vector–Jacobian product with `cot`: returns
    /// (F's outputs, detached; Σ_i ⟨F_i, cot_i⟩ differentiated with respect to each input) and
    /// adds its derivative with respect to the parameters into the running sums. The graph lives
    /// only inside this call.
    fn apply(
        &mut self,
        inputs: &[Tensor],
        cot: &[Tensor],
        f: impl FnOnce(&[Tensor], &[Tensor]) -> Result<Vec<Tensor>>,
    ) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
        let vars = inputs.iter().map(Var::from_tensor).collect::<candle_core::Result<Vec<_>>>()?;
        let leaves: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let outs = f(&self.leaves, &leaves)?;
        let mut objective: Option<Tensor> = None;
        for (o, c) in outs.iter().zip(cot) {
            let term = (o * c)?.sum_all()?;
            objective = Some(match objective {
                None => term,
                Some(s) => (s + term)?,
            });
        }
        let objective = objective.ok_or_else(|| Error::internal("a vector-Jacobian product of nothing"))?;
        let grads = objective.backward()?;
        for (acc, var) in self.grads.iter_mut().zip(&self.vars) {
            if let Some(g) = grads.get(var) {
                *acc = Some(match acc.take() {
                    None => g.detach(),
                    Some(a) => (a + g.detach())?,
                });
            }
        }
        let din = vars
            .iter()
            .map(|v| match grads.get(v) {
                Some(g) => Ok(g.detach()),
                None => Ok(v.zeros_like()?),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((outs.iter().map(Tensor::detach).collect(), din))
    }
}

/// The backward pass of the checkpoint and reversible methods (through `layers::with_grads`,
/// whose forward pass copies the precomputed y_N): the reverse sweep, giving the gradients of x
/// and of the packed parameters.
struct Adjoint {
    inner: Arc<Inner>,
    shapes: Vec<Vec<usize>>,
    saved: Saved,
}

impl Adjoint {
    fn backward(&self, x: &Tensor, packed: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor)> {
        let packed = packed.detach();
        let mut params = Vec::with_capacity(self.shapes.len());
        let mut offset = 0;
        for shape in &self.shapes {
            let n: usize = shape.iter().product();
            params.push(packed.narrow(0, offset, n)?.reshape(shape.as_slice())?);
            offset += n;
        }
        let mut vjp = Vjp::new(&params)?;
        let dx = match (&self.saved, self.inner.solver.method) {
            (Saved::Terminal(terminal), Method::Reversible { coupling }) => {
                self.inner.reverse_reversible(&mut vjp, coupling, terminal, &g.detach())?
            }
            (Saved::Chain(chain), Method::Checkpoint { checkpoints }) => {
                let steps = self.inner.solver.steps;
                let adj = self.inner.reverse_checkpointed(
                    &params,
                    &mut vjp,
                    0,
                    steps,
                    self.inner.initial(&x.detach()),
                    checkpoints,
                    chain,
                    vec![g.detach()],
                )?;
                adj.into_iter().next().ok_or_else(|| Error::internal("checkpoint sweep returned no adjoint"))?
            }
            _ => return Err(Error::internal("ODE adjoint: saved state does not match the method")),
        };
        let flat = vjp
            .grads
            .into_iter()
            .zip(&params)
            .map(|(g, p)| match g {
                Some(g) => g.flatten_all(),
                None => p.zeros_like()?.flatten_all(),
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok((dx, Tensor::cat(&flat, 0)?))
    }
}

/// The binomial checkpoint schedule: for l steps to reverse with s states free to store (the
/// state at the start of the l steps is held besides them), `split(l, s)` is where to store the
/// next state so that the total number of recomputed forward steps is the least possible. By
/// dynamic programming over (l, s): reversing l > 1 steps by first advancing m steps, storing
/// that state, reversing the last l − m steps with s − 1 states and then the first m with s costs
///
/// ```text
/// R(l, s) = min_{1≤m<l} m + R(l − m, s − 1) + R(m, s),   R(1, s) = 0,   R(l, 0) = l(l − 1)/2
/// ```
///
/// recomputed steps (with no state to spare, step n is reached from the start again). This is
/// Griewank's `revolve`: R(l, s) equals his closed form t·l − β(s + 2, t − 1), β(s, t) =
/// C(s + t, s), with t the least integer such that β(s + 1, t) ≥ l (his s counts the start state;
/// tested). The forward solve already advances through the first chain of stores
/// (`Inner::forward_saving`), so the backward pass recomputes R(l, s) − (that chain's last
/// position) steps.
#[derive(Clone, Debug)]
pub struct Schedule {
    /// split[l][s] for 2 ≤ l ≤ steps, 1 ≤ s ≤ min(checkpoints, l − 1) (s is capped there: more
    /// states than steps − 1 are never used).
    split: Vec<Vec<u32>>,
    cost: Vec<Vec<u64>>,
}

impl Schedule {
    pub fn new(steps: usize, checkpoints: usize) -> Self {
        let smax = checkpoints.min(steps.saturating_sub(1));
        let mut cost = vec![vec![0u64; smax + 1]; steps + 1];
        let mut split = vec![vec![0u32; smax + 1]; steps + 1];
        for (l, row) in cost.iter_mut().enumerate().skip(1) {
            row[0] = (l * (l - 1) / 2) as u64;
        }
        for l in 2..=steps {
            for s in 1..=smax {
                let (mut best, mut at) = (u64::MAX, 1);
                for m in 1..l {
                    let c = m as u64 + cost[l - m][s - 1] + cost[m][s];
                    if c < best {
                        (best, at) = (c, m);
                    }
                }
                cost[l][s] = best;
                split[l][s] = at as u32;
            }
        }
        Self { split, cost }
    }

    fn cap(&self, s: usize) -> usize {
        s.min(self.cost[0].len() - 1)
    }

    /// Where to store the next state when reversing `l` ≥ 2 steps with `s` ≥ 1 free states.
    pub fn split(&self, l: usize, s: usize) -> usize {
        self.split[l][self.cap(s)] as usize
    }

    /// R(l, s): forward steps recomputed in reversing l steps with s free states.
    pub fn cost(&self, l: usize, s: usize) -> u64 {
        self.cost[l][self.cap(s)]
    }

    /// Steps recomputed after the forward solve of `steps` steps (its first chain of stores is
    /// already in place).
    pub fn recomputed(&self, steps: usize) -> u64 {
        let s = self.cost[0].len() - 1;
        let (mut a, mut free) = (0, s);
        while free > 0 && steps - a > 1 {
            a += self.split(steps - a, free);
            free -= 1;
        }
        self.cost(steps, s) - a as u64
    }
}

/// The ODE block's computations in f32 when the passes run in half precision (as batch norm and
/// LayerNorm do): the reconstruction of the reversible solver and the stage sums need the
/// precision.
pub(crate) fn widen(t: &Tensor) -> Result<Tensor> {
    Ok(if matches!(t.dtype(), DType::BF16 | DType::F16) { t.to_dtype(DType::F32)? } else { t.clone() })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Griewank's closed form of the least number of recomputed steps: l steps, `snaps` states
    /// counting the start state.
    fn griewank(l: u64, snaps: u64) -> u64 {
        let binom = |n: u64, k: u64| -> u64 {
            let mut r = 1u64;
            for i in 0..k {
                r = r * (n - i) / (i + 1);
            }
            r
        };
        let beta = |s: u64, t: u64| binom(s + t, s);
        let mut t = 0;
        while beta(snaps, t) < l {
            t += 1;
        }
        if t == 0 {
            return 0;
        }
        t * l - beta(snaps + 1, t - 1)
    }

    #[test]
    fn schedule_is_revolve() {
        for steps in [2usize, 3, 5, 8, 13, 32, 60, 100] {
            for c in 1..6 {
                let s = Schedule::new(steps, c);
                for l in 2..=steps {
                    let expect = griewank(l as u64, c.min(l - 1) as u64 + 1);
                    assert_eq!(s.cost(l, c), expect, "l {l}, {c} free states");
                }
            }
        }
        // Enough states: store every one, recompute nothing beyond the forward chain.
        let s = Schedule::new(8, 7);
        assert_eq!(s.cost(8, 7), 7);
        assert_eq!(s.recomputed(8), 0);
        assert_eq!(default_checkpoints(1), 1);
        assert_eq!(default_checkpoints(8), 3);
        assert_eq!(default_checkpoints(9), 4);
        assert_eq!(default_checkpoints(512), 9);
    }
}
