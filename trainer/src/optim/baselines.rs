//! The Euler-type baselines: SGD, heavy-ball / Nesterov momentum, and the Adam family (Adam,
//! AdamW and NAdamW, one type [`Adam`]).
//!
//! Each takes exactly one gradient evaluation per step (`field.eval(θ_n, g)`) and works on flat
//! slices in the layout of θ. Scalar coefficients (bias corrections, β's) are computed in `f64`
//! and converted once per step; the elementwise arithmetic runs in `F`.
//!
//! Learning rate: every optimizer stores it in the public field `lr`; `set_lr`/`lr` are
//! provided as well. The trainer's schedule may change it between steps; each step reads it
//! once, at its start.
//!
//! Step counter: none is kept. The `step` argument of [`Optimizer::step`] (0-based, the number
//! of steps already committed) drives the bias corrections (t = step + 1), so a resumed run must
//! pass the same step numbers an uninterrupted run would.
//!
//! Non-finite handling (the contract of [`crate::optim`]):
//! - A non-finite loss or gradient at θ_n returns [`Error::NonFinite`] with θ and the state
//!   untouched: no smaller step can change g(θ_n).
//! - The new moment buffers and the update direction d (θ_{n+1} = θ_n − lr·d) do not depend on
//!   lr either; if they overflow, `NonFinite` is returned at once, again with nothing changed.
//! - Otherwise θ_{n+1} = θ_n − lr_k·d is formed with lr_k = lr·2^{−k}, k = 0, 1, …, `max_retries`,
//!   and the first all-finite candidate is committed (`StepReport::nonfinite_retries` = k,
//!   `StepReport::h` = lr_k). If none is finite, `NonFinite` is returned with nothing changed.
//!
//! All candidates are built in scratch buffers kept in the optimizer (allocated on the first
//! step, size `field.dim()`, reused afterwards: no allocation per step) and committed by a copy
//! into θ and a swap of the moment buffers.
//!
//! State: `state()` lists the moment buffers — `"momentum"` for [`Momentum`], `"adam.m"` and
//! `"adam.v"` for every [`Adam`] variant — or no buffers at all before the first step (and
//! always for [`Sgd`]), plus the scalar `"optimizer"` holding `name()`. `load_state`
//! rejects unknown, duplicated, missing, mismatched-length or non-finite buffers and a different
//! `"optimizer"` name with an [`Error::Optimizer`]; other scalars are ignored. A state with no
//! buffers resets the optimizer to "before the first step". Buffer lengths are checked against
//! `field.dim()` at the next step.

use crate::error::{Error, Result};
use crate::field::{any_nonfinite, VectorField};
use crate::optim::{Optimizer, OptimizerState, StepReport};
use crate::scalar::{all_finite, Scalar};

/// Default number of lr halvings tried when a step produces a non-finite θ.
pub const DEFAULT_MAX_RETRIES: u32 = 4;
/// Adam's default β1 (optax / PyTorch).
pub const ADAM_DEFAULT_BETA1: f64 = 0.9;
/// Adam's default β2 (optax / PyTorch).
pub const ADAM_DEFAULT_BETA2: f64 = 0.999;
/// Adam's default ε (optax / PyTorch).
pub const ADAM_DEFAULT_EPS: f64 = 1e-8;

const MOMENTUM_BUF: &str = "momentum";
const ADAM_M: &str = "adam.m";
const ADAM_V: &str = "adam.v";
const OPTIMIZER_KEY: &str = "optimizer";

// ---------------------------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------------------------

fn check_lr(name: &str, lr: f64) -> Result<()> {
    if lr.is_finite() && lr >= 0.0 {
        Ok(())
    } else {
        Err(Error::optimizer(format!("{name}: learning rate must be finite and >= 0, got {lr}")))
    }
}

/// Evaluate g(θ_n) into `grad` (resized to `field.dim()`), checking the dimension and that the
/// loss and gradient are finite.
fn eval_gradient<F: Scalar>(
    name: &str,
    step: u64,
    theta: &[F],
    field: &mut dyn VectorField<F>,
    grad: &mut Vec<F>,
) -> Result<f64> {
    let loss = eval_loss(name, step, theta, field, grad)?;
    // An OR first (it vectorises; a count does not), the count only when something is wrong.
    let any = grad.iter().fold(false, |bad, &g| bad | not_finite(g));
    check_gradient(name, step, any, grad, field)?;
    Ok(loss)
}

/// `eval_gradient` without the gradient's finiteness check (`check_gradient` does it, from a
/// flag its caller computed in a pass of its own).
fn eval_loss<F: Scalar>(
    name: &str,
    step: u64,
    theta: &[F],
    field: &mut dyn VectorField<F>,
    grad: &mut Vec<F>,
) -> Result<f64> {
    let dim = field.dim();
    if theta.len() != dim {
        return Err(Error::optimizer(format!(
            "{name}: θ has {} entries but the vector field has dimension {dim}",
            theta.len()
        )));
    }
    grad.resize(dim, F::zero());
    let loss = field.eval(theta, grad)?;
    if !loss.is_finite() {
        return Err(Error::NonFinite(format!("{name}: loss at step {step} is {loss}")));
    }
    Ok(loss)
}

/// The error for a gradient with non-finite entries on any shard (`any`: on this one), agreed
/// over every shard.
fn check_gradient<F: Scalar>(
    name: &str,
    step: u64,
    any: bool,
    grad: &[F],
    field: &mut dyn VectorField<F>,
) -> Result<()> {
    let bad = field.sum_shards(if any { grad.iter().filter(|g| !g.is_finite()).count() as f64 } else { 0.0 })?;
    if bad > 0.0 {
        return Err(Error::NonFinite(format!("{name}: gradient at step {step} has {bad} non-finite entries")));
    }
    Ok(())
}

/// NaN or ±∞: |v| is not below ∞. An OR-fold of this one comparison compiles to wide vector
/// code; the count of `!is_finite` entries it replaces ran two 64-bit lanes at a time.
#[inline(always)]
#[allow(clippy::neg_cmp_op_on_partial_ord)]
fn not_finite<F: Scalar>(v: F) -> bool {
    !(v.abs() < F::infinity())
}

/// Ready the moment buffer `buf` for a step: once a step has committed it (`started`), check
/// that its length matches the field's dimension; before that, zero it (a zeroed buffer is not
/// part of the observable state until the step commits and sets `started`).
fn prepare_buffer<F: Scalar>(name: &str, buf_name: &str, buf: &mut Vec<F>, started: bool, dim: usize) -> Result<()> {
    if !started {
        buf.clear();
        buf.resize(dim, F::zero());
    } else if buf.len() != dim {
        return Err(Error::optimizer(format!(
            "{name}: state buffer `{buf_name}` has {} entries but the vector field has dimension {dim}",
            buf.len()
        )));
    }
    Ok(())
}

/// lr_k = lr·2^{−k}, k = 0..=max_retries: the first for which every entry of θ − lr_k·d is
/// finite (agreed over every shard of θ, `VectorField::sum_shards`). Returns (lr_k, k), or `None`
/// when every candidate is non-finite. Reads θ and d only: the candidate is not stored.
/// `first_bad`, when given, is this shard's answer for lr itself, already computed.
fn finite_step<F: Scalar>(
    theta: &[F],
    dir: &[F],
    lr: f64,
    max_retries: u32,
    field: &mut dyn VectorField<F>,
    first_bad: Option<bool>,
) -> Result<Option<(f64, u32)>> {
    let mut h = lr;
    for k in 0..=max_retries {
        let hf = F::from_f64(h);
        // An OR over the entries (no count: it vectorises).
        let bad = match first_bad {
            Some(bad) if k == 0 => bad,
            _ => theta.iter().zip(dir).fold(false, |bad, (&x, &d)| bad | not_finite(x - hf * d)),
        };
        if field.sum_shards(f64::from(u8::from(bad)))? == 0.0 {
            return Ok(Some((h, k)));
        }
        h *= 0.5;
    }
    Ok(None)
}

/// The end of every step: θ ← θ − lr_k·`dir` in place, with lr_k from [`finite_step`] (the same
/// expression, so the same values as the candidate it checked). Returns (lr_k, k); if every
/// candidate is non-finite, `NonFinite` with θ untouched. Two passes over θ and d and no copy:
/// at batch 16 the MLP's SGD update is a fifth of the step, its memory traffic the cost.
/// `first_bad`: this shard's answer for the first candidate when a caller already has it
/// (`finite_step`).
fn descend_and_commit<F: Scalar>(
    (name, step): (&str, u64),
    theta: &mut [F],
    dir: &[F],
    lr: f64,
    max_retries: u32,
    field: &mut dyn VectorField<F>,
    first_bad: Option<bool>,
) -> Result<(f64, u32)> {
    let (h, k) = finite_step(theta, dir, lr, max_retries, field, first_bad)?.ok_or_else(|| {
        Error::NonFinite(format!(
            "{name}: step {step} gives a non-finite θ for lr = {lr} and {max_retries} halvings of it"
        ))
    })?;
    let hf = F::from_f64(h);
    for (x, &d) in theta.iter_mut().zip(dir) {
        *x = *x - hf * d;
    }
    Ok((h, k))
}

/// The state of optimizer `name`: the scalar `"optimizer"` = `name`, and the named `buffers`
/// once a step has committed them (`started`), none before.
fn snapshot<F: Scalar>(name: &str, started: bool, buffers: &[(&str, &Vec<F>)]) -> OptimizerState<F> {
    let buffers = if started { buffers.iter().map(|&(n, b)| (n.to_string(), b.clone())).collect() } else { Vec::new() };
    let mut scalars = serde_json::Map::new();
    scalars.insert(OPTIMIZER_KEY.to_string(), serde_json::Value::String(name.to_string()));
    OptimizerState { buffers, scalars }
}

/// Validate `state` against the buffer names `expected`. Returns `None` for a state without
/// buffers (fresh optimizer) or the buffers in the order of `expected`.
fn validate_state<'a, F: Scalar>(
    name: &str,
    state: &'a OptimizerState<F>,
    expected: &[&str],
) -> Result<Option<Vec<&'a Vec<F>>>> {
    let err = |msg: String| Error::optimizer(format!("optimizer state for `{name}`: {msg}"));
    if let Some(v) = state.scalars.get(OPTIMIZER_KEY) {
        match v.as_str() {
            Some(s) if s == name => {}
            _ => return Err(err(format!("it was saved by optimizer {v}, not `{name}`"))),
        }
    }
    for (i, (n, _)) in state.buffers.iter().enumerate() {
        if !expected.contains(&n.as_str()) {
            return Err(err(format!(
                "unknown buffer `{n}` (expected {})",
                if expected.is_empty() { "none".to_string() } else { expected.join(", ") }
            )));
        }
        if state.buffers[..i].iter().any(|(m, _)| m == n) {
            return Err(err(format!("buffer `{n}` appears twice")));
        }
    }
    if state.buffers.is_empty() {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(expected.len());
    for &e in expected {
        let b = state.buffer(e).ok_or_else(|| err(format!("missing buffer `{e}`")))?;
        if let Some(first) = out.first() {
            let first: &&Vec<F> = first;
            if b.len() != first.len() {
                return Err(err(format!(
                    "buffer `{e}` has {} entries but `{}` has {}",
                    b.len(),
                    expected[0],
                    first.len()
                )));
            }
        }
        if !all_finite(b) {
            return Err(err(format!("buffer `{e}` holds non-finite values")));
        }
        out.push(b);
    }
    Ok(Some(out))
}

/// Install what [`validate_state`] returned into `targets` (in the order of its `expected`), or
/// clear them all for a state without buffers. Returns the new `started`: whether buffers were
/// loaded.
fn restore<F: Scalar, const N: usize>(loaded: Option<Vec<&Vec<F>>>, targets: [&mut Vec<F>; N]) -> bool {
    match loaded {
        None => {
            for t in targets {
                t.clear();
            }
            false
        }
        Some(bufs) => {
            for (t, b) in targets.into_iter().zip(bufs) {
                t.clear();
                t.extend_from_slice(b);
            }
            true
        }
    }
}

// ---------------------------------------------------------------------------------------------
// SGD
// ---------------------------------------------------------------------------------------------

/// Plain gradient descent (explicit Euler on the gradient flow): θ ← θ − lr·g.
#[derive(Clone, Debug)]
pub struct Sgd<F: Scalar = f32> {
    /// Learning rate (step size h); may be changed between steps.
    pub lr: f64,
    /// How many times a step halves lr when θ_{n+1} is non-finite (default 4).
    pub max_retries: u32,
    grad: Vec<F>,
}

impl<F: Scalar> Sgd<F> {
    /// `lr`: learning rate.
    pub fn new(lr: f64) -> Self {
        Self { lr, max_retries: DEFAULT_MAX_RETRIES, grad: Vec::new() }
    }
    pub fn lr(&self) -> f64 {
        self.lr
    }
}

impl<F: Scalar> Optimizer<F> for Sgd<F> {
    fn set_lr(&mut self, lr: f64) -> Result<()> {
        self.lr = lr;
        Ok(())
    }
    fn name(&self) -> String {
        "sgd".to_string()
    }

    fn step(&mut self, step: u64, theta: &mut [F], field: &mut dyn VectorField<F>) -> Result<StepReport> {
        let name = "sgd";
        check_lr(name, self.lr)?;
        let loss = eval_loss(name, step, theta, field, &mut self.grad)?;
        // The direction is the gradient: one pass answers both finiteness checks (the gradient's,
        // and θ − lr·g's), read while θ and g are in cache; at batch 16 the checks and the
        // update, three passes over θ and g before, were a third of the MLP's step.
        let hf = F::from_f64(self.lr);
        let (grad_bad, first_bad) = theta
            .iter()
            .zip(&self.grad)
            .fold((false, false), |(gb, cb), (&x, &g)| (gb | not_finite(g), cb | not_finite(x - hf * g)));
        check_gradient(name, step, grad_bad, &self.grad, field)?;
        let (h, k) =
            descend_and_commit((name, step), theta, &self.grad, self.lr, self.max_retries, field, Some(first_bad))?;
        Ok(StepReport { loss, h, grad_evals: 1, nonfinite_retries: k, ..Default::default() })
    }

    fn state(&self) -> Result<OptimizerState<F>> {
        Ok(snapshot("sgd", false, &[]))
    }

    fn load_state(&mut self, state: &OptimizerState<F>) -> Result<()> {
        validate_state("sgd", state, &[])?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Momentum (heavy ball / Nesterov)
// ---------------------------------------------------------------------------------------------

/// SGD with momentum, PyTorch convention with dampening 0: buf ← β·buf + g (buf starts at 0, so
/// the first step has buf = g). Heavy ball: θ ← θ − lr·buf; Nesterov: θ ← θ − lr·(g + β·buf).
#[derive(Clone, Debug)]
pub struct Momentum<F: Scalar = f32> {
    /// Learning rate; may be changed between steps.
    pub lr: f64,
    /// Momentum coefficient β.
    pub beta: f64,
    /// Nesterov's variant instead of heavy ball.
    pub nesterov: bool,
    /// How many times a step halves lr when θ_{n+1} is non-finite (default 4).
    pub max_retries: u32,
    started: bool,
    buf: Vec<F>,
    buf_new: Vec<F>,
    grad: Vec<F>,
    dir: Vec<F>,
}

impl<F: Scalar> Momentum<F> {
    /// `lr`: learning rate; `beta`: momentum coefficient β (e.g. 0.9); `nesterov`: use the
    /// Nesterov update θ ← θ − lr·(g + β·buf) instead of heavy ball θ ← θ − lr·buf.
    pub fn new(lr: f64, beta: f64, nesterov: bool) -> Self {
        Self {
            lr,
            beta,
            nesterov,
            max_retries: DEFAULT_MAX_RETRIES,
            started: false,
            buf: Vec::new(),
            buf_new: Vec::new(),
            grad: Vec::new(),
            dir: Vec::new(),
        }
    }
    pub fn lr(&self) -> f64 {
        self.lr
    }
    fn name_str(&self) -> &'static str {
        if self.nesterov {
            "nesterov"
        } else {
            "momentum"
        }
    }
}

impl<F: Scalar> Optimizer<F> for Momentum<F> {
    fn set_lr(&mut self, lr: f64) -> Result<()> {
        self.lr = lr;
        Ok(())
    }
    fn name(&self) -> String {
        self.name_str().to_string()
    }

    fn step(&mut self, step: u64, theta: &mut [F], field: &mut dyn VectorField<F>) -> Result<StepReport> {
        let name = self.name_str();
        check_lr(name, self.lr)?;
        let loss = eval_gradient(name, step, theta, field, &mut self.grad)?;
        let dim = theta.len();
        prepare_buffer(name, MOMENTUM_BUF, &mut self.buf, self.started, dim)?;
        self.buf_new.resize(dim, F::zero());
        let beta = F::from_f64(self.beta);
        for ((bn, &b), &g) in self.buf_new.iter_mut().zip(&self.buf).zip(&self.grad) {
            *bn = beta * b + g;
        }
        let dir: &[F] = if self.nesterov {
            self.dir.resize(dim, F::zero());
            for ((d, &g), &b) in self.dir.iter_mut().zip(&self.grad).zip(&self.buf_new) {
                *d = g + beta * b;
            }
            &self.dir
        } else {
            &self.buf_new
        };
        if any_nonfinite(field, &[&self.buf_new, dir])? {
            return Err(Error::NonFinite(format!(
                "{name}: momentum buffer at step {step} overflowed (a smaller lr cannot help)"
            )));
        }
        let (h, k) = descend_and_commit((name, step), theta, dir, self.lr, self.max_retries, field, None)?;
        std::mem::swap(&mut self.buf, &mut self.buf_new);
        self.started = true;
        Ok(StepReport { loss, h, grad_evals: 1, nonfinite_retries: k, ..Default::default() })
    }

    fn state(&self) -> Result<OptimizerState<F>> {
        Ok(snapshot(self.name_str(), self.started, &[(MOMENTUM_BUF, &self.buf)]))
    }

    fn load_state(&mut self, state: &OptimizerState<F>) -> Result<()> {
        let loaded = validate_state(self.name_str(), state, &[MOMENTUM_BUF])?;
        self.started = restore(loaded, [&mut self.buf]);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Adam family
// ---------------------------------------------------------------------------------------------

/// Which member of the Adam family an [`Adam`] is.
#[derive(Clone, Copy, Debug, PartialEq)]
enum AdamVariant {
    /// Adam: no weight decay.
    Adam,
    /// AdamW: decoupled weight decay.
    AdamW { weight_decay: f64 },
    /// NAdamW: Nesterov first moment and decoupled weight decay.
    NAdamW { weight_decay: f64 },
}

impl AdamVariant {
    /// `name()` of the optimizer; saved states carry it.
    fn name(self) -> &'static str {
        match self {
            AdamVariant::Adam => "adam",
            AdamVariant::AdamW { .. } => "adamw",
            AdamVariant::NAdamW { .. } => "nadamw",
        }
    }
}

/// The Adam family: Adam, AdamW and NAdamW, one update rule (`name()` "adam", "adamw",
/// "nadamw"). With t = step + 1, each step does m ← β1·m + (1−β1)·g; v ← β2·v + (1−β2)·g²;
/// v̂ = v/(1−β2^t), and
/// - Adam (Kingma & Ba; optax `adam`, PyTorch `Adam` without weight decay), [`Adam::new`]:
///   m̂ = m/(1−β1^t); θ ← θ − lr·m̂/(√v̂ + ε).
/// - AdamW: Adam with decoupled weight decay (optax `adamw`, PyTorch `AdamW`), [`Adam::adamw`]:
///   m̂ as in Adam; θ ← θ − lr·(m̂/(√v̂ + ε) + wd·θ).
/// - NAdamW as optax `nadamw` (`scale_by_adam(nesterov=True)` + decoupled weight decay),
///   [`Adam::nadamw`]: m̂ = β1·m/(1−β1^(t+1)) + (1−β1)·g/(1−β1^t);
///   θ ← θ − lr·(m̂/(√v̂ + ε) + wd·θ).
///
/// The weight decay wd is multiplied by lr, as in optax / PyTorch; wd = 0 skips the term
/// entirely, so `adamw(.., 0.0)` steps exactly like `new` (only the name differs).
#[derive(Clone, Debug)]
pub struct Adam<F: Scalar = f32> {
    /// Learning rate; may be changed between steps.
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// How many times a step halves lr when θ_{n+1} is non-finite (default 4).
    pub max_retries: u32,
    variant: AdamVariant,
    started: bool,
    m: Vec<F>,
    v: Vec<F>,
    m_new: Vec<F>,
    v_new: Vec<F>,
    grad: Vec<F>,
    dir: Vec<F>,
}

impl<F: Scalar> Adam<F> {
    /// Adam. `lr`: learning rate; `beta1`, `beta2`: decay rates of the first and second moments
    /// (0.9, 0.999 usually); `eps`: added to √v̂ (1e-8 usually).
    pub fn new(lr: f64, beta1: f64, beta2: f64, eps: f64) -> Self {
        Self::with_variant(AdamVariant::Adam, lr, beta1, beta2, eps)
    }
    /// `new(lr, 0.9, 0.999, 1e-8)`.
    pub fn with_defaults(lr: f64) -> Self {
        Self::new(lr, ADAM_DEFAULT_BETA1, ADAM_DEFAULT_BETA2, ADAM_DEFAULT_EPS)
    }
    /// AdamW: the arguments of [`Adam::new`] and the decoupled weight-decay coefficient wd.
    pub fn adamw(lr: f64, beta1: f64, beta2: f64, eps: f64, weight_decay: f64) -> Self {
        Self::with_variant(AdamVariant::AdamW { weight_decay }, lr, beta1, beta2, eps)
    }
    /// NAdamW: the arguments of [`Adam::new`] and the decoupled weight-decay coefficient wd.
    pub fn nadamw(lr: f64, beta1: f64, beta2: f64, eps: f64, weight_decay: f64) -> Self {
        Self::with_variant(AdamVariant::NAdamW { weight_decay }, lr, beta1, beta2, eps)
    }
    fn with_variant(variant: AdamVariant, lr: f64, beta1: f64, beta2: f64, eps: f64) -> Self {
        Self {
            lr,
            beta1,
            beta2,
            eps,
            max_retries: DEFAULT_MAX_RETRIES,
            variant,
            started: false,
            m: Vec::new(),
            v: Vec::new(),
            m_new: Vec::new(),
            v_new: Vec::new(),
            grad: Vec::new(),
            dir: Vec::new(),
        }
    }
    pub fn lr(&self) -> f64 {
        self.lr
    }
}

impl<F: Scalar> Optimizer<F> for Adam<F> {
    fn set_lr(&mut self, lr: f64) -> Result<()> {
        self.lr = lr;
        Ok(())
    }
    fn name(&self) -> String {
        self.variant.name().to_string()
    }

    fn step(&mut self, step: u64, theta: &mut [F], field: &mut dyn VectorField<F>) -> Result<StepReport> {
        let name = self.variant.name();
        let (weight_decay, nesterov) = match self.variant {
            AdamVariant::Adam => (0.0, false),
            AdamVariant::AdamW { weight_decay } => (weight_decay, false),
            AdamVariant::NAdamW { weight_decay } => (weight_decay, true),
        };
        check_lr(name, self.lr)?;
        let loss = eval_gradient(name, step, theta, field, &mut self.grad)?;
        let dim = theta.len();
        prepare_buffer(name, ADAM_M, &mut self.m, self.started, dim)?;
        prepare_buffer(name, ADAM_V, &mut self.v, self.started, dim)?;
        self.m_new.resize(dim, F::zero());
        self.v_new.resize(dim, F::zero());
        self.dir.resize(dim, F::zero());

        // Scalar factors in f64. t = step + 1.
        let t = step as f64 + 1.0;
        let bc1 = 1.0 - self.beta1.powf(t);
        let bc2 = 1.0 - self.beta2.powf(t);
        let bc1_next = 1.0 - self.beta1.powf(t + 1.0);
        let b1 = F::from_f64(self.beta1);
        let omb1 = F::from_f64(1.0 - self.beta1);
        let b2 = F::from_f64(self.beta2);
        let omb2 = F::from_f64(1.0 - self.beta2);
        let bc1f = F::from_f64(bc1);
        let bc2f = F::from_f64(bc2);
        let bc1_nextf = F::from_f64(bc1_next);
        let eps = F::from_f64(self.eps);
        let wd = F::from_f64(weight_decay);
        let decay = weight_decay != 0.0;

        let moments = self.m.iter().zip(&self.v).zip(self.m_new.iter_mut().zip(self.v_new.iter_mut()));
        for (((&g, &x), d), ((&m_old, &v_old), (m_out, v_out))) in
            self.grad.iter().zip(theta.iter()).zip(self.dir.iter_mut()).zip(moments)
        {
            let m = b1 * m_old + omb1 * g;
            let v = b2 * v_old + omb2 * (g * g);
            *m_out = m;
            *v_out = v;
            let m_hat = if nesterov { b1 * (m / bc1_nextf) + omb1 * (g / bc1f) } else { m / bc1f };
            let v_hat = v / bc2f;
            let mut u = m_hat / (v_hat.sqrt() + eps);
            if decay {
                u = u + wd * x;
            }
            *d = u;
        }
        if any_nonfinite(field, &[&self.m_new, &self.v_new, &self.dir])? {
            return Err(Error::NonFinite(format!(
                "{name}: moments or update direction at step {step} are non-finite (a smaller lr cannot help)"
            )));
        }
        let (h, k) = descend_and_commit((name, step), theta, &self.dir, self.lr, self.max_retries, field, None)?;
        std::mem::swap(&mut self.m, &mut self.m_new);
        std::mem::swap(&mut self.v, &mut self.v_new);
        self.started = true;
        Ok(StepReport { loss, h, grad_evals: 1, nonfinite_retries: k, ..Default::default() })
    }

    fn state(&self) -> Result<OptimizerState<F>> {
        Ok(snapshot(self.variant.name(), self.started, &[(ADAM_M, &self.m), (ADAM_V, &self.v)]))
    }

    fn load_state(&mut self, state: &OptimizerState<F>) -> Result<()> {
        let loaded = validate_state(self.variant.name(), state, &[ADAM_M, ADAM_V])?;
        self.started = restore(loaded, [&mut self.m, &mut self.v]);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use crate::field::DiagonalQuadratic;

    const LAMBDA: [f64; 3] = [1.0, 2.0, 4.0];
    const THETA0: [f64; 3] = [1.0, -1.0, 0.5];

    fn quad() -> DiagonalQuadratic {
        DiagonalQuadratic::new(LAMBDA.to_vec())
    }

    fn assert_close(a: &[f64], b: &[f64], tol: f64) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol, "entry {i}: {x} vs {y} (tol {tol}); {a:?} vs {b:?}");
        }
    }

    /// Run `n` steps from THETA0 and return θ after each step.
    fn run(opt: &mut dyn Optimizer<f64>, n: u64) -> Vec<Vec<f64>> {
        let mut f = quad();
        let mut th = THETA0.to_vec();
        let mut out = Vec::new();
        for s in 0..n {
            let r = opt.step(s, &mut th, &mut f).unwrap();
            assert_eq!(r.grad_evals, 1);
            assert_eq!(r.nonfinite_retries, 0);
            out.push(th.clone());
        }
        assert_eq!(f.evals as u64, n);
        out
    }

    /// Straightforward f64 reference for the Adam family.
    fn adam_reference(lr: f64, b1: f64, b2: f64, eps: f64, wd: f64, nesterov: bool, n: usize) -> Vec<Vec<f64>> {
        let mut th = THETA0.to_vec();
        let mut m = [0.0; 3];
        let mut v = [0.0; 3];
        let mut out = Vec::new();
        for s in 0..n {
            let t = (s + 1) as i32;
            let g: Vec<f64> = th.iter().zip(&LAMBDA).map(|(x, l)| l * x).collect();
            for i in 0..3 {
                m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                let mh = if nesterov {
                    b1 * m[i] / (1.0 - b1.powi(t + 1)) + (1.0 - b1) * g[i] / (1.0 - b1.powi(t))
                } else {
                    m[i] / (1.0 - b1.powi(t))
                };
                let vh = v[i] / (1.0 - b2.powi(t));
                th[i] -= lr * (mh / (vh.sqrt() + eps) + wd * th[i]);
            }
            out.push(th.clone());
        }
        out
    }

    #[test]
    fn sgd_is_theta_minus_lr_lambda_theta() {
        let lr = 0.1;
        let mut opt = Sgd::<f64>::new(lr);
        assert_eq!(opt.name(), "sgd");
        let got = run(&mut opt, 3);
        let mut th = THETA0.to_vec();
        for step in &got {
            for (x, l) in th.iter_mut().zip(&LAMBDA) {
                *x -= lr * (l * *x);
            }
            assert_eq!(step, &th);
        }
        assert_close(&got[0], &[0.9, -0.8, 0.3], 1e-15);
        assert!(opt.state().unwrap().buffers.is_empty());
    }

    #[test]
    fn sgd_report_and_set_lr() {
        let mut opt = Sgd::<f64>::new(0.1);
        let mut f = quad();
        let mut th = THETA0.to_vec();
        let r = opt.step(0, &mut th, &mut f).unwrap();
        assert_eq!(r.h, 0.1);
        assert_eq!(r.loss, 0.5 * (1.0 + 2.0 + 4.0 * 0.25));
        opt.set_lr(0.05).unwrap();
        assert_eq!(opt.lr(), 0.05);
        let r = opt.step(1, &mut th, &mut f).unwrap();
        assert_eq!(r.h, 0.05);
    }

    #[test]
    fn momentum_heavy_ball_literal_values() {
        let mut opt = Momentum::<f64>::new(0.1, 0.9, false);
        assert_eq!(opt.name(), "momentum");
        assert!(opt.state().unwrap().buffers.is_empty());
        let got = run(&mut opt, 2);
        // Step 1: buf = g = [1, -2, 2]; θ = [0.9, -0.8, 0.3].
        assert_close(&got[0], &[0.9, -0.8, 0.3], 1e-14);
        // Step 2: g = [0.9, -1.6, 1.2]; buf = [1.8, -3.4, 3.0]; θ = [0.72, -0.46, 0.0].
        assert_close(&got[1], &[0.72, -0.46, 0.0], 1e-14);
        assert_close(opt.state().unwrap().buffer("momentum").unwrap(), &[1.8, -3.4, 3.0], 1e-14);
    }

    #[test]
    fn momentum_nesterov_literal_values() {
        let mut opt = Momentum::<f64>::new(0.1, 0.9, true);
        assert_eq!(opt.name(), "nesterov");
        let got = run(&mut opt, 2);
        // Step 1: buf = g = [1, -2, 2]; d = g + 0.9 buf = 1.9 g; θ = [0.81, -0.62, 0.12].
        assert_close(&got[0], &[0.81, -0.62, 0.12], 1e-14);
        // Step 2: g = [0.81, -1.24, 0.48]; buf = [1.71, -3.04, 2.28];
        // d = [2.349, -3.976, 2.532]; θ = [0.5751, -0.2224, -0.1332].
        assert_close(&got[1], &[0.5751, -0.2224, -0.1332], 1e-14);
        assert_close(opt.state().unwrap().buffer("momentum").unwrap(), &[1.71, -3.04, 2.28], 1e-14);
    }

    #[test]
    fn adam_first_step_is_lr_sign_g_and_matches_reference() {
        let lr = 0.01;
        let mut opt = Adam::<f64>::with_defaults(lr);
        assert_eq!(opt.name(), "adam");
        let got = run(&mut opt, 3);
        // g0 = [1, -2, 2]: m̂ = g, v̂ = g², so the step is lr·g/(|g|+ε) ≈ lr·sign(g).
        assert_close(&got[0], &[0.99, -0.99, 0.49], 1e-9);
        let want = adam_reference(lr, 0.9, 0.999, 1e-8, 0.0, false, 3);
        for (g, w) in got.iter().zip(&want) {
            assert_close(g, w, 1e-14);
        }
        let st = opt.state().unwrap();
        assert_eq!(st.buffers.len(), 2);
        assert_eq!(st.buffers[0].0, "adam.m");
        assert_eq!(st.buffers[1].0, "adam.v");
    }

    #[test]
    fn adamw_first_step_and_reference() {
        let (lr, wd) = (0.01, 0.1);
        let mut opt = Adam::<f64>::adamw(lr, 0.9, 0.999, 1e-8, wd);
        assert_eq!(opt.name(), "adamw");
        let got = run(&mut opt, 3);
        // θ1 = θ0 − lr·(sign(g) + wd·θ0).
        assert_close(&got[0], &[0.989, -0.989, 0.4895], 1e-9);
        let want = adam_reference(lr, 0.9, 0.999, 1e-8, wd, false, 3);
        for (g, w) in got.iter().zip(&want) {
            assert_close(g, w, 1e-14);
        }
    }

    #[test]
    fn nadamw_first_step_and_reference() {
        let (lr, wd) = (0.01, 0.1);
        let mut opt = Adam::<f64>::nadamw(lr, 0.9, 0.999, 1e-8, wd);
        assert_eq!(opt.name(), "nadamw");
        let got = run(&mut opt, 3);
        // t = 1: m = 0.1 g, m̂ = 0.9·0.1 g/(1 − 0.81) + 0.1 g/0.1 = (28/19) g, v̂ = g².
        let c = 28.0 / 19.0;
        let sign = [1.0, -1.0, 1.0];
        let want0: Vec<f64> = (0..3).map(|i| THETA0[i] - lr * (c * sign[i] + wd * THETA0[i])).collect();
        assert_close(&got[0], &want0, 1e-9);
        let want = adam_reference(lr, 0.9, 0.999, 1e-8, wd, true, 3);
        for (g, w) in got.iter().zip(&want) {
            assert_close(g, w, 1e-14);
        }
    }

    #[test]
    fn adam_with_zero_wd_matches_adamw_with_zero_wd() {
        let a = run(&mut Adam::<f64>::new(0.02, 0.8, 0.99, 1e-6), 3);
        let b = run(&mut Adam::<f64>::adamw(0.02, 0.8, 0.99, 1e-6, 0.0), 3);
        assert_eq!(a, b);
    }

    type Maker = Box<dyn Fn() -> Box<dyn Optimizer<f64>>>;

    fn all_optimizers() -> Vec<Maker> {
        vec![
            Box::new(|| Box::new(Sgd::<f64>::new(0.1))),
            Box::new(|| Box::new(Momentum::<f64>::new(0.1, 0.9, false))),
            Box::new(|| Box::new(Momentum::<f64>::new(0.1, 0.9, true))),
            Box::new(|| Box::new(Adam::<f64>::with_defaults(0.01))),
            Box::new(|| Box::new(Adam::<f64>::adamw(0.01, 0.9, 0.999, 1e-8, 0.1))),
            Box::new(|| Box::new(Adam::<f64>::nadamw(0.01, 0.9, 0.999, 1e-8, 0.1))),
        ]
    }

    #[test]
    fn state_round_trip_is_bit_identical() {
        for make in all_optimizers() {
            let mut a = make();
            let mut f = quad();
            let mut th = THETA0.to_vec();
            a.step(0, &mut th, &mut f).unwrap();
            a.step(1, &mut th, &mut f).unwrap();
            let saved = a.state().unwrap();
            let mut b = make();
            b.load_state(&saved).unwrap();
            assert_eq!(b.state().unwrap(), saved, "{}", a.name());
            let mut th_b = th.clone();
            a.step(2, &mut th, &mut f).unwrap();
            b.step(2, &mut th_b, &mut f).unwrap();
            assert_eq!(
                th.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                th_b.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                "{}",
                a.name()
            );
            assert_eq!(a.state().unwrap(), b.state().unwrap(), "{}", a.name());
        }
    }

    #[test]
    fn loading_an_empty_state_resets() {
        let mut a = Adam::<f64>::with_defaults(0.01);
        let fresh = a.state().unwrap();
        assert!(fresh.buffers.is_empty());
        let first = run(&mut a, 1);
        a.load_state(&fresh).unwrap();
        assert!(a.state().unwrap().buffers.is_empty());
        assert_eq!(run(&mut a, 1), first);
    }

    #[test]
    fn load_state_rejects_mismatches() {
        let mut a = Adam::<f64>::with_defaults(0.01);
        run(&mut a, 1);
        let good = a.state().unwrap();
        let mut fresh = Adam::<f64>::with_defaults(0.01);

        let mut s = good.clone();
        s.buffers[1].1.pop();
        let e = fresh.load_state(&s).unwrap_err().to_string();
        assert!(e.contains("adam.v"), "{e}");

        let mut s = good.clone();
        s.buffers.remove(1);
        let e = fresh.load_state(&s).unwrap_err().to_string();
        assert!(e.contains("missing buffer `adam.v`"), "{e}");

        let mut s = good.clone();
        s.buffers.push(("momentum".into(), vec![0.0; 3]));
        let e = fresh.load_state(&s).unwrap_err().to_string();
        assert!(e.contains("unknown buffer `momentum`"), "{e}");

        let mut s = good.clone();
        s.buffers.push(("adam.m".into(), vec![0.0; 3]));
        assert!(fresh.load_state(&s).is_err());

        let mut s = good.clone();
        s.buffers[0].1[0] = f64::NAN;
        assert!(fresh.load_state(&s).is_err());

        // Saved by another optimizer.
        let mut w = Adam::<f64>::adamw(0.01, 0.9, 0.999, 1e-8, 0.1);
        let e = w.load_state(&good).unwrap_err().to_string();
        assert!(e.contains("adamw"), "{e}");
        let mut sgd = Sgd::<f64>::new(0.1);
        assert!(sgd.load_state(&good).is_err());
        let mut nest = Momentum::<f64>::new(0.1, 0.9, true);
        let mut hb = Momentum::<f64>::new(0.1, 0.9, false);
        run(&mut hb, 1);
        assert!(nest.load_state(&hb.state().unwrap()).is_err());

        // The failed loads left `fresh` fresh; a good load still works.
        assert!(fresh.state().unwrap().buffers.is_empty());
        fresh.load_state(&good).unwrap();
        assert_eq!(fresh.state().unwrap(), good);

        // A state whose length does not match the field is caught at the next step.
        let mut s = good.clone();
        for (_, b) in &mut s.buffers {
            b.push(0.0);
        }
        let mut c = Adam::<f64>::with_defaults(0.01);
        c.load_state(&s).unwrap();
        let mut th = THETA0.to_vec();
        assert!(matches!(c.step(1, &mut th, &mut quad()), Err(Error::Optimizer(_))));
        assert_eq!(th, THETA0.to_vec());
    }

    #[test]
    fn dimension_mismatch_is_an_error() {
        let mut opt = Sgd::<f64>::new(0.1);
        let mut th = vec![1.0, 2.0];
        assert!(matches!(opt.step(0, &mut th, &mut quad()), Err(Error::Optimizer(_))));
    }

    /// Behaves like the quadratic for `good` evaluations, then returns a NaN gradient (or loss).
    struct Poisoned {
        inner: DiagonalQuadratic,
        good: usize,
        nan_loss: bool,
    }

    impl<F: Scalar> VectorField<F> for Poisoned {
        fn dim(&self) -> usize {
            self.inner.lambda.len()
        }
        fn eval(&mut self, theta: &[F], grad: &mut [F]) -> Result<f64> {
            let loss = VectorField::<F>::eval(&mut self.inner, theta, grad)?;
            if self.inner.evals > self.good {
                if self.nan_loss {
                    return Ok(f64::NAN);
                }
                grad[1] = F::nan();
            }
            Ok(loss)
        }
    }

    #[test]
    fn nan_gradient_or_loss_leaves_theta_and_state_untouched() {
        for nan_loss in [false, true] {
            for make in all_optimizers() {
                let mut opt = make();
                let mut f = Poisoned { inner: quad(), good: 2, nan_loss };
                let mut th = THETA0.to_vec();
                opt.step(0, &mut th, &mut f).unwrap();
                opt.step(1, &mut th, &mut f).unwrap();
                let (th_before, st_before) = (th.clone(), opt.state().unwrap());
                let r = opt.step(2, &mut th, &mut f);
                assert!(matches!(r, Err(Error::NonFinite(_))), "{}: {r:?}", opt.name());
                assert_eq!(th, th_before, "{}", opt.name());
                assert_eq!(opt.state().unwrap(), st_before, "{}", opt.name());
                // Only one evaluation: no retries for a bad gradient.
                assert_eq!(f.inner.evals, 3);
            }
        }
        // Also on the very first step: the state stays empty.
        let mut opt = Adam::<f64>::with_defaults(0.01);
        let mut f = Poisoned { inner: quad(), good: 0, nan_loss: false };
        let mut th = THETA0.to_vec();
        assert!(matches!(opt.step(0, &mut th, &mut f), Err(Error::NonFinite(_))));
        assert!(opt.state().unwrap().buffers.is_empty());
        assert_eq!(th, THETA0.to_vec());
    }

    #[test]
    fn overflowing_step_is_retried_with_halved_lr_f32() {
        // g = 1e9; lr·g = 1e39 and 5e38 overflow f32, 2.5e38 does not: two retries.
        let lambda = vec![1e9, 1.0];
        let mut opt = Sgd::<f32>::new(1e30);
        let mut f = DiagonalQuadratic::new(lambda.clone());
        let mut th = vec![1.0f32, 1.0];
        let r = opt.step(0, &mut th, &mut f).unwrap();
        assert_eq!(r.nonfinite_retries, 2);
        assert_eq!(r.h, 0.25e30);
        assert_eq!(r.grad_evals, 1);
        assert_eq!(f.evals, 1);
        assert!(all_finite(&th));
        assert_eq!(th[1], 1.0f32 - 0.25e30f32);

        // With only one retry allowed, the step fails and θ is untouched.
        let mut opt = Sgd::<f32>::new(1e30);
        opt.max_retries = 1;
        let mut th = vec![1.0f32, 1.0];
        let r = opt.step(0, &mut th, &mut DiagonalQuadratic::new(lambda.clone()));
        assert!(matches!(r, Err(Error::NonFinite(_))), "{r:?}");
        assert_eq!(th, vec![1.0f32, 1.0]);
    }

    #[test]
    fn overflowing_adam_and_momentum_steps_retry_and_commit_only_finite_state() {
        // Adam's direction is ≈ sign(g); lr = 1e39 overflows f32 itself, 2.5e38 does not.
        let mut opt = Adam::<f32>::with_defaults(1e39);
        let mut f = DiagonalQuadratic::new(vec![1.0, 2.0]);
        let mut th = vec![1.0f32, -1.0];
        let r = opt.step(0, &mut th, &mut f).unwrap();
        assert_eq!(r.nonfinite_retries, 2);
        assert_eq!(r.h, 0.25e39);
        assert!(all_finite(&th));
        assert!(th[0] < -1e38 && th[1] > 1e38);

        // All retries fail: θ and the moments stay as they were.
        let mut opt = Adam::<f32>::with_defaults(0.1);
        let mut th = vec![1.0f32, -1.0];
        opt.step(0, &mut th, &mut f).unwrap();
        let (th_before, st_before) = (th.clone(), opt.state().unwrap());
        opt.set_lr(1e60).unwrap();
        let r = opt.step(1, &mut th, &mut f);
        assert!(matches!(r, Err(Error::NonFinite(_))), "{r:?}");
        assert_eq!(th, th_before);
        assert_eq!(opt.state().unwrap(), st_before);

        // Momentum: same story.
        let mut opt = Momentum::<f32>::new(1e30, 0.9, true);
        let mut th = vec![1.0f32, 1.0];
        let mut f = DiagonalQuadratic::new(vec![1e9, 1.0]);
        let r = opt.step(0, &mut th, &mut f).unwrap();
        // d = 1.9 g: lr·d = 1.9e39, 9.5e38, 4.75e38 overflow; 2.375e38 does not.
        assert_eq!(r.nonfinite_retries, 3);
        assert!(all_finite(&th));
        assert_eq!(opt.state().unwrap().buffer("momentum").unwrap(), &vec![1e9f32, 1.0]);
    }

    #[test]
    fn overflowing_moments_fail_without_retries() {
        // g² overflows f32 in v: no lr can fix that.
        let mut opt = Adam::<f32>::with_defaults(0.1);
        let mut f = DiagonalQuadratic::new(vec![1e20]);
        let mut th = vec![1.0f32];
        let r = opt.step(0, &mut th, &mut f);
        assert!(matches!(r, Err(Error::NonFinite(_))), "{r:?}");
        assert_eq!(th, vec![1.0f32]);
        assert!(opt.state().unwrap().buffers.is_empty());
        assert_eq!(f.evals, 1);
    }

    #[test]
    fn invalid_lr_is_rejected() {
        let mut opt = Sgd::<f64>::new(f64::NAN);
        let mut th = THETA0.to_vec();
        assert!(matches!(opt.step(0, &mut th, &mut quad()), Err(Error::Optimizer(_))));
        opt.lr = -1.0;
        assert!(opt.step(0, &mut th, &mut quad()).is_err());
        assert_eq!(th, THETA0.to_vec());
    }
}
