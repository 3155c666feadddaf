//! Models: architectures over the one flat parameter buffer θ.
//!
//! A model owns only its `ParamLayout` (name, shape, offset and initialiser of each tensor inside
//! θ) and its architecture; weights never live in it. Every call gets the weights as candle
//! tensors built from slices of θ, in layout order: `ModelField` makes them `Var`s to get a
//! gradient, `evaluate` makes them plain tensors. That keeps θ, the stage gradients, G and m in one
//! layout the optimizers can treat as flat slices (STYLE.md habit 1).
//!
//! State outside θ — batch norm's running statistics — has its own layout (`Model::state_layout`)
//! and lives in a `ModelState` the trainer owns: it is read in evaluation mode (`Mode::Eval`),
//! and updated once per accepted optimizer step from the batch statistics the first gradient
//! evaluation of the step records (`BatchStats`, `ModelField::take_batch_stats`).
//!
//! Adding a model kind: its own file (the `Model` impl and a `registry::Kind` entry) plus one line
//! in `registry::KINDS`. This module also holds what every model shares: fresh weights
//! (`init_params`), weights files (`load_safetensors` / `save_safetensors`), and batch norm's
//! bookkeeping (`Bn`); the layers are in `layers`.

pub mod activation;
pub mod cnn;
mod cpu_layers;
pub mod field;
pub mod layers;
pub mod mlp;
pub mod native;
pub mod ode;
pub mod odenet;
pub mod registry;
pub mod resnet;
pub mod transformer;
pub mod vit;
pub mod wrn;

pub use activation::LayerActivation;
pub use field::{evaluate, evaluate_in, evaluate_on, ModelField};
pub use registry::{build, ComputeDtype};

use std::path::Path;

use candle_core::{Storage, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::error::{Error, Result};
use crate::layout::{Init, ParamLayout};

/// Training mode (batch norm normalises with ghost-batch statistics) or evaluation mode (with
/// the running statistics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Train,
    Eval,
}

/// What a forward pass needs besides the parameters and the input.
pub struct Pass<'a> {
    pub mode: Mode,
    /// Eval mode: the model state as tensors in `state_layout` order (empty without state).
    pub state: &'a [Tensor],
    /// Train mode: where batch norm records its batch statistics, when this pass is the one
    /// that feeds the running statistics (the first evaluation of an optimizer step).
    pub stats: Option<&'a mut BatchStats>,
}

impl Pass<'_> {
    /// Training mode, recording nothing.
    pub fn train() -> Pass<'static> {
        Pass { mode: Mode::Train, state: &[], stats: None }
    }
    /// Evaluation mode with the state tensors.
    pub fn eval(state: &[Tensor]) -> Pass<'_> {
        Pass { mode: Mode::Eval, state, stats: None }
    }
}

/// Sums of batch statistics over ghost batches, in `state_layout` order (each batch norm's mean
/// of the group means, then of the groups' unbiased variances), and the number of groups summed.
/// Sums, so that ranks and micro-batches add theirs; `ModelState::update` divides.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BatchStats {
    pub sums: Vec<f64>,
    pub groups: u64,
}

/// State outside θ: batch norm's running means and variances (`Model::state_layout`), and how
/// many updates they have had (PyTorch's `num_batches_tracked`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelState {
    pub values: Vec<f32>,
    pub updates: u64,
}

impl ModelState {
    /// The initial state: zeros for running means, ones for running variances (PyTorch's).
    pub fn initial(model: &dyn Model) -> Self {
        let layout = model.state_layout();
        let mut values = vec![0.0f32; layout.len()];
        for spec in &layout.params {
            if spec.init == Init::Ones {
                values[spec.range()].fill(1.0);
            }
        }
        Self { values, updates: 0 }
    }

    /// One update of the running statistics with `stats` summed over every rank: each entry
    /// moves to (1 − momentum)·old + momentum·(sum / groups), PyTorch's rule. Nothing when no
    /// group was seen (a model without batch norm).
    pub fn update(&mut self, stats: &BatchStats, momentum: f64) -> Result<()> {
        if self.values.is_empty() {
            return Ok(());
        }
        if stats.sums.len() != self.values.len() || stats.groups == 0 {
            return Err(Error::model(format!(
                "model state: batch statistics of {} values over {} groups for a state of {}",
                stats.sums.len(),
                stats.groups,
                self.values.len()
            )));
        }
        let n = stats.groups as f64;
        for (v, s) in self.values.iter_mut().zip(&stats.sums) {
            *v = ((1.0 - momentum) * *v as f64 + momentum * (s / n)) as f32;
        }
        self.updates += 1;
        Ok(())
    }

    /// The state as tensors in layout order, on `device`.
    pub fn tensors(&self, model: &dyn Model, device: &candle_core::Device) -> Result<Vec<Tensor>> {
        Ok(model
            .state_layout()
            .params
            .iter()
            .map(|s| Tensor::from_slice(&self.values[s.range()], s.shape.as_slice(), device))
            .collect::<candle_core::Result<Vec<_>>>()?)
    }
}

static NO_STATE: ParamLayout = ParamLayout { params: Vec::new() };

pub trait Model: Send + Sync {
    fn layout(&self) -> &ParamLayout;
    /// The state outside θ (batch norm's running statistics), empty by default.
    fn state_layout(&self) -> &ParamLayout {
        &NO_STATE
    }
    /// The batch-norm update weight of the running statistics (`model.bn_momentum`).
    fn state_momentum(&self) -> f64 {
        0.0
    }
    /// The per-rank micro-batch must be a multiple of this: batch norm's ghost-batch size
    /// (`model.bn_group`); 1 for models without batch norm.
    fn batch_multiple(&self) -> usize {
        1
    }
    /// Logits [batch, num_classes] from params (candle tensors in layout order, shapes as in the
    /// layout) and input x [batch, C*H*W] (f32). The input never receives a gradient.
    /// It is the chain of the model's segments, the unit of activation recomputation.
    fn forward(&self, params: &[Tensor], x: &Tensor, pass: &mut Pass) -> Result<Tensor> {
        check_params(self.layout(), params)?;
        let mut h = x.clone();
        for k in 0..self.segments() {
            h = self.forward_segment(params, k, &h, pass)?;
        }
        Ok(h)
    }
    /// How many segments the forward pass is cut into (a layer, a conv block, a residual block).
    /// With activation recomputation only the segment boundaries are kept through the backward
    /// pass (`ModelField::set_recompute`).
    fn segments(&self) -> usize;
    /// Segment `k` applied to `h` (the input x for k = 0, else segment k − 1's output). `params`
    /// is the whole list (checked by `forward`); segment 0 checks its input's shape.
    fn forward_segment(&self, params: &[Tensor], k: usize, h: &Tensor, pass: &mut Pass) -> Result<Tensor>;
    /// One line for logs, e.g. "mlp 784-500-500-500-10 (ReLU), 898510 params".
    fn describe(&self) -> String;
    /// The activation memory of each segment, per sample (`planner`), with `threads` = the
    /// threads candle's CPU kernels use.
    fn activations(&self, threads: usize) -> Vec<LayerActivation>;
    /// The model's own loss gradient on host buffers (`native`), which `ModelField` uses on the
    /// CPU instead of candle's autograd; None (the default) for models built from candle ops only.
    fn native(&self) -> Option<&dyn native::NativeGrad> {
        None
    }
}

/// Batch norm's place in a model: the indices of its γ (β follows) in the parameter layout, of
/// its running mean (the variance follows) in the state layout, and the offset of that running
/// mean in the flat state.
#[derive(Clone, Debug)]
pub(crate) struct Bn {
    param: usize,
    state: usize,
    state_offset: usize,
    channels: usize,
}

impl Bn {
    /// Declare `{prefix}.weight`, `{prefix}.bias` (θ, ones and zeros) and `{prefix}.running_mean`,
    /// `{prefix}.running_var` (state, zeros and ones), PyTorch's names for a `BatchNorm2d`.
    pub(crate) fn declare(layout: &mut ParamLayout, state: &mut ParamLayout, prefix: &str, channels: usize) -> Bn {
        let bn = Bn { param: layout.params.len(), state: state.params.len(), state_offset: state.len(), channels };
        layout.push_init(format!("{prefix}.weight"), &[channels], Init::Ones);
        layout.push_init(format!("{prefix}.bias"), &[channels], Init::Zeros);
        state.push_init(format!("{prefix}.running_mean"), &[channels], Init::Zeros);
        state.push_init(format!("{prefix}.running_var"), &[channels], Init::Ones);
        bn
    }

    /// Batch norm of x [B, C, H, W] in the pass's mode: over ghost batches of `group` samples in
    /// training (recording their statistics when the pass asks), with the running statistics in
    /// evaluation.
    pub(crate) fn forward(&self, params: &[Tensor], x: &Tensor, group: usize, pass: &mut Pass) -> Result<Tensor> {
        self.forward_act(params, x, group, pass, false)
    }

    /// `forward` followed by a ReLU (fused into the batch norm in training mode on the CPU).
    pub(crate) fn forward_relu(&self, params: &[Tensor], x: &Tensor, group: usize, pass: &mut Pass) -> Result<Tensor> {
        self.forward_act(params, x, group, pass, true)
    }

    fn forward_act(&self, params: &[Tensor], x: &Tensor, group: usize, pass: &mut Pass, relu: bool) -> Result<Tensor> {
        let (gamma, beta) = (&params[self.param], &params[self.param + 1]);
        let dtype = x.dtype();
        if matches!(dtype, candle_core::DType::BF16 | candle_core::DType::F16) {
            // Mixed precision: batch norm runs in f32 (as under PyTorch's autocast).
            let f32 = candle_core::DType::F32;
            let y =
                self.normalize(&x.to_dtype(f32)?, &gamma.to_dtype(f32)?, &beta.to_dtype(f32)?, group, pass, relu)?;
            return Ok(y.to_dtype(dtype)?);
        }
        self.normalize(x, gamma, beta, group, pass, relu)
    }

    fn normalize(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        group: usize,
        pass: &mut Pass,
        relu: bool,
    ) -> Result<Tensor> {
        match pass.mode {
            Mode::Eval => {
                let (Some(mean), Some(var)) = (pass.state.get(self.state), pass.state.get(self.state + 1)) else {
                    return Err(Error::model(format!(
                        "evaluation-mode batch norm without its running statistics ({} state tensors)",
                        pass.state.len()
                    )));
                };
                let y = layers::batch_norm_eval(x, gamma, beta, mean, var)?;
                Ok(if relu { y.relu()? } else { y })
            }
            Mode::Train => {
                let (y, mean, var) = layers::batch_norm_train(x, gamma, beta, group, relu)?;
                if let Some(stats) = pass.stats.as_deref_mut() {
                    let (_, _, h, w) = x.dims4()?;
                    let n = (group * h * w) as f64;
                    // PyTorch's running_var holds the unbiased variance: n / (n − 1) times.
                    let unbias = if n > 1.0 { n / (n - 1.0) } else { 1.0 };
                    let c = self.channels;
                    let f64s = |t: Tensor| t.sum(0)?.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>();
                    let (means, vars) = (f64s(mean)?, f64s(var)?);
                    if stats.sums.len() < self.state_offset + 2 * c {
                        return Err(Error::model("batch statistics buffer shorter than the state"));
                    }
                    let (m_out, v_out) = stats.sums[self.state_offset..self.state_offset + 2 * c].split_at_mut(c);
                    for (o, &v) in m_out.iter_mut().zip(&means) {
                        *o += v;
                    }
                    for (o, &v) in v_out.iter_mut().zip(&vars) {
                        *o += v * unbias;
                    }
                }
                Ok(y)
            }
        }
    }
}

/// Declare a conv kernel [c_out, c_in, k, k] (no bias) with He normal (fan_out) initialisation,
/// torchvision's for ResNets; returns its index in the layout.
pub(crate) fn conv_weight(layout: &mut ParamLayout, name: String, c_out: usize, c_in: usize, k: usize) -> usize {
    let i = layout.params.len();
    layout.push_init(name, &[c_out, c_in, k, k], Init::HeNormalFanOut);
    i
}

/// The spatial size (H, W) of `image_shape` after 3×3 (padding 1) or 1×1 convolutions with these
/// strides: ⌈H / s⌉ each.
pub(crate) fn spatial_after(image_shape: [usize; 3], strides: impl Iterator<Item = usize>) -> (usize, usize) {
    let [_, mut h, mut w] = image_shape;
    for s in strides {
        h = (h - 1) / s + 1;
        w = (w - 1) / s + 1;
    }
    (h, w)
}

/// jax.nn.initializers.truncated_normal's correction: the standard deviation of a standard normal
/// truncated to [−2, 2]. Dividing by it makes the truncated draw's variance exactly 1.
const TRUNCATED_NORMAL_STD: f64 = 0.879_625_661_034_239_8;

/// Fresh weights from the seed, deterministic (`ChaCha8Rng::seed_from_u64(seed)`, tensors drawn in
/// layout order), each as its `Init` says (`layout::Init`).
///
/// The MLP and CNN use flax's default, since the paper's models are flax models: every weight (a
/// tensor of rank ≥ 2, shape [out, in, ...]) is LeCun normal with variance 1/fan_in, fan_in = the
/// product of all dims but the first (`in` for a linear layer, in_ch·kh·kw for a conv); biases are
/// 0. Like jax's `lecun_normal` (variance_scaling(1, "fan_in", "truncated_normal")), the normal is
/// truncated at ±2 standard deviations and rescaled so that the variance is still exactly
/// 1/fan_in: no weight exceeds 2/(0.8796·√fan_in). The ResNets use torchvision's: He normal
/// (fan_out) convs, batch norm γ = 1 and β = 0, and PyTorch's `nn.Linear` default for the head.
pub fn init_params(model: &dyn Model, seed: u64) -> Vec<f32> {
    let layout = model.layout();
    let mut theta = vec![0.0f32; layout.len()];
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let truncated = |rng: &mut ChaCha8Rng| loop {
        let z: f64 = StandardNormal.sample(rng);
        if z.abs() <= 2.0 {
            break z;
        }
    };
    for spec in &layout.params {
        let fan_in: usize = spec.shape.get(1..).map_or(1, |s| s.iter().product());
        let fan_out: usize =
            spec.shape.first().copied().unwrap_or(1) * spec.shape.get(2..).map_or(1, |s| s.iter().product::<usize>());
        let out = &mut theta[spec.range()];
        match spec.init {
            Init::Zeros => {}
            Init::Ones => out.fill(1.0),
            Init::LecunNormal => {
                let std = (1.0 / fan_in.max(1) as f64).sqrt() / TRUNCATED_NORMAL_STD;
                for w in out {
                    *w = (truncated(&mut rng) * std) as f32;
                }
            }
            Init::HeNormalFanOut => {
                let std = (2.0 / fan_out.max(1) as f64).sqrt();
                for w in out {
                    let z: f64 = StandardNormal.sample(&mut rng);
                    *w = (z * std) as f32;
                }
            }
            Init::Normal { std } => {
                for w in out {
                    let z: f64 = StandardNormal.sample(&mut rng);
                    *w = (z * std) as f32;
                }
            }
            Init::TruncatedNormal { std } => {
                for w in out {
                    *w = (truncated(&mut rng) * std) as f32;
                }
            }
            Init::TorchLinear { fan_in } => {
                let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
                for w in out {
                    *w = rng.random_range(-bound..bound) as f32;
                }
            }
        }
    }
    theta
}

/// The name of batch norm's update counter beside its running mean (`bn1.running_mean` →
/// `bn1.num_batches_tracked`), PyTorch's int64 scalar buffer.
fn counter_name(running_mean: &str) -> Option<String> {
    running_mean.strip_suffix(".running_mean").map(|p| format!("{p}.num_batches_tracked"))
}

/// Load initial weights (and the model state, e.g. batch norm's running statistics) from a
/// safetensors file, by tensor name. Every layout and state tensor must be present with the
/// layout's shape; F32 is taken as is, F64/F16/BF16 are converted to f32. Batch norm's
/// `num_batches_tracked` (PyTorch's int64 counter) may be present. Extra tensors are an error
/// (they mean the file is for another model), and so are non-finite values. A file kutta wrote is
/// verified against its checksums first (`integrity`): damage is an error naming the tensor or
/// the header; a file from another tool (no checksums) loads unverified.
pub fn load_safetensors(model: &dyn Model, path: &Path) -> Result<(Vec<f32>, ModelState)> {
    let layout = model.layout();
    let state_layout = model.state_layout();
    let bytes = std::fs::read(path).map_err(|e| Error::checkpoint(path, format!("cannot read weights file: {e}")))?;
    match crate::integrity::verify(&bytes).map_err(|msg| Error::checkpoint(path, msg))? {
        crate::integrity::Verified::Intact => {}
        crate::integrity::Verified::Unchecked => tracing::info!(
            "{}: no kutta checksums (written by another tool or an earlier kutta); loaded unverified",
            path.display()
        ),
    }
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::checkpoint(path, format!("not a valid safetensors file: {e}")))?;

    let specs = || layout.params.iter().chain(&state_layout.params);
    let counters: Vec<String> = state_layout.params.iter().filter_map(|p| counter_name(&p.name)).collect();
    let missing: Vec<&str> = specs().map(|p| p.name.as_str()).filter(|name| st.tensor(name).is_err()).collect();
    if !missing.is_empty() {
        return Err(Error::checkpoint(
            path,
            format!("missing tensor(s) {} needed by {}", quoted(&missing), model.describe()),
        ));
    }
    let mut extra: Vec<&str> = st
        .names()
        .into_iter()
        .filter(|name| {
            layout.get(name).is_none() && state_layout.get(name).is_none() && !counters.iter().any(|c| c == *name)
        })
        .collect();
    if !extra.is_empty() {
        extra.sort_unstable();
        return Err(Error::checkpoint(
            path,
            format!("unexpected tensor(s) {} that {} does not have", quoted(&extra), model.describe()),
        ));
    }

    let read = |spec: &crate::layout::ParamSpec, out: &mut [f32]| -> Result<()> {
        let view = st.tensor(&spec.name).map_err(|e| Error::checkpoint(path, e.to_string()))?;
        if view.shape() != spec.shape.as_slice() {
            return Err(Error::checkpoint(
                path,
                format!("tensor `{}` has shape {:?}, the model needs {:?}", spec.name, view.shape(), spec.shape),
            ));
        }
        decode_f32(view.dtype(), view.data(), out)
            .map_err(|msg| Error::checkpoint(path, format!("tensor `{}`: {msg}", spec.name)))?;
        if let Some(i) = out.iter().position(|v| !v.is_finite()) {
            return Err(Error::checkpoint(
                path,
                format!("tensor `{}` holds a non-finite value ({}) at flat index {i}", spec.name, out[i]),
            ));
        }
        Ok(())
    };
    let mut theta = vec![0.0f32; layout.len()];
    for spec in &layout.params {
        read(spec, &mut theta[spec.range()])?;
    }
    let mut state = ModelState { values: vec![0.0f32; state_layout.len()], updates: 0 };
    for spec in &state_layout.params {
        read(spec, &mut state.values[spec.range()])?;
    }
    // The counter of the first batch norm that has one (they are all equal in files kutta or
    // PyTorch writes after training).
    for name in &counters {
        if let Ok(view) = st.tensor(name) {
            let n = match (view.dtype(), view.data().len()) {
                (Dtype::I64, 8) => i64::from_le_bytes(view.data().try_into().expect("8 bytes")),
                (Dtype::I32, 4) => i32::from_le_bytes(view.data().try_into().expect("4 bytes")) as i64,
                _ => {
                    return Err(Error::checkpoint(
                        path,
                        format!(
                            "tensor `{name}` is not one integer (dtype {:?}, shape {:?})",
                            view.dtype(),
                            view.shape()
                        ),
                    ))
                }
            };
            state.updates = n.max(0) as u64;
            break;
        }
    }
    Ok((theta, state))
}

/// Write θ and the model state as a safetensors file, one F32 tensor per layout entry (names and
/// shapes from the layouts) and batch norm's `num_batches_tracked` as PyTorch's int64 scalars, so
/// that PyTorch's `load_state_dict(strict=True)` takes it; atomically: the bytes go to
/// `<path>.tmp`, are synced, and the file is renamed over `path`, so a crash never leaves a
/// half-written weights file under the real name. The file carries CRC32C checksums of its
/// header and tensors in its metadata (`integrity`).
pub fn save_safetensors(model: &dyn Model, theta: &[f32], state: &ModelState, path: &Path) -> Result<()> {
    let (layout, state_layout) = (model.layout(), model.state_layout());
    if theta.len() != layout.len() || state.values.len() != state_layout.len() {
        return Err(Error::checkpoint(
            path,
            format!(
                "θ has {} values and the state {}, but the layouts have {} and {}",
                theta.len(),
                state.values.len(),
                layout.len(),
                state_layout.len()
            ),
        ));
    }
    let bytes = crate::integrity::f32_to_bytes(theta);
    let state_bytes = crate::integrity::f32_to_bytes(&state.values);
    let counter = (state.updates as i64).to_le_bytes();
    let mut views = Vec::new();
    for (specs, bytes) in [(layout, &bytes), (state_layout, &state_bytes)] {
        for p in &specs.params {
            let data = &bytes[p.offset * 4..(p.offset + p.numel()) * 4];
            let view = TensorView::new(Dtype::F32, p.shape.clone(), data)
                .map_err(|e| Error::checkpoint(path, format!("tensor `{}`: {e}", p.name)))?;
            views.push((p.name.clone(), view));
            if let Some(name) = counter_name(&p.name) {
                let view = TensorView::new(Dtype::I64, vec![], &counter)
                    .map_err(|e| Error::checkpoint(path, format!("tensor `{name}`: {e}")))?;
                views.push((name, view));
            }
        }
    }
    let buffer = crate::integrity::serialize(views, Default::default())
        .map_err(|e| Error::checkpoint(path, format!("cannot serialize: {e}")))?;
    crate::integrity::write_atomic(path, &buffer)
}

fn quoted(names: &[&str]) -> String {
    names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
}

/// Decode little-endian `data` of type `dtype` into `out` (same element count, checked).
fn decode_f32(dtype: Dtype, data: &[u8], out: &mut [f32]) -> std::result::Result<(), String> {
    let width = match dtype {
        Dtype::F32 => 4,
        Dtype::F64 => 8,
        Dtype::F16 | Dtype::BF16 => 2,
        other => return Err(format!("dtype {other:?} is not a float type (F32, F64, F16, BF16)")),
    };
    if data.len() != out.len() * width {
        return Err(format!("{} bytes for {} values of {dtype:?}", data.len(), out.len()));
    }
    let chunks = data.chunks_exact(width);
    match dtype {
        Dtype::F32 => {
            for (o, c) in out.iter_mut().zip(chunks) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        Dtype::F64 => {
            for (o, c) in out.iter_mut().zip(chunks) {
                *o = f64::from_le_bytes(c.try_into().expect("8-byte chunk")) as f32;
            }
        }
        Dtype::F16 => {
            for (o, c) in out.iter_mut().zip(chunks) {
                *o = half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        Dtype::BF16 => {
            for (o, c) in out.iter_mut().zip(chunks) {
                // bf16 is the top half of an f32.
                *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
            }
        }
        _ => unreachable!("rejected above"),
    }
    Ok(())
}

/// Check that `params` match the layout: one tensor per entry, same shapes.
pub(crate) fn check_params(layout: &ParamLayout, params: &[Tensor]) -> Result<()> {
    if params.len() != layout.params.len() {
        return Err(Error::model(format!(
            "got {} parameter tensors, the layout has {}",
            params.len(),
            layout.params.len()
        )));
    }
    for (spec, t) in layout.params.iter().zip(params) {
        if t.dims() != spec.shape.as_slice() {
            return Err(Error::model(format!(
                "tensor `{}` has shape {:?}, the layout says {:?}",
                spec.name,
                t.dims(),
                spec.shape
            )));
        }
    }
    Ok(())
}

/// Copy (or, with `accumulate`, add) the f32 values of `t`, in row-major order, into `out`.
/// A contiguous CPU tensor is read in place, with no intermediate Vec.
pub(crate) fn tensor_into_slice(t: &Tensor, out: &mut [f32], accumulate: bool) -> Result<()> {
    if t.elem_count() != out.len() {
        return Err(Error::model(format!(
            "tensor of shape {:?} copied into a buffer of {} values",
            t.dims(),
            out.len()
        )));
    }
    let write = |src: &[f32], out: &mut [f32]| {
        if accumulate {
            out.iter_mut().zip(src).for_each(|(o, s)| *o += s);
        } else {
            out.copy_from_slice(src);
        }
    };
    {
        let (storage, layout) = t.storage_and_layout();
        if let (Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets()) {
            write(&cpu.as_slice::<f32>()?[start..end], out);
            return Ok(());
        }
    }
    let values = t.flatten_all()?.to_vec1::<f32>()?;
    write(&values, out);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig as ModelConfigForTest;
    use candle_core::Device;

    fn tmpdir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    #[test]
    fn build_default_models() {
        let cfg = |kind: &str, sets: &[&str]| crate::config::model_config(kind, sets);
        let mlp = build(&cfg("mlp", &[]).unwrap(), [1, 28, 28], 10).unwrap();
        assert_eq!(mlp.layout().len(), 898_510);
        assert_eq!(mlp.describe(), "mlp 784-500-500-500-10 (ReLU), 898510 params");
        let cnn = build(&cfg("cnn", &[]).unwrap(), [1, 28, 28], 10).unwrap();
        assert_eq!(cnn.layout().len(), 20 * 9 + 20 + 10 * 20 * 9 + 10 + 10 * 7840 + 10);
    }

    #[test]
    fn build_rejects_nonsense() {
        let c = ModelConfigForTest { kind: "resnet".into(), ..Default::default() };
        match build(&c, [1, 28, 28], 10) {
            Err(Error::Config { key, msg }) => {
                assert_eq!(key, "model.kind");
                assert!(msg.contains("resnet"), "{msg}");
            }
            other => panic!("expected a config error, got {:?}", other.map(|m| m.describe())),
        }
        for hidden in [vec![20usize, 10, 5], vec![20], vec![]] {
            let c = ModelConfigForTest { kind: "cnn".into(), hidden: Some(hidden), ..Default::default() };
            match build(&c, [1, 28, 28], 10) {
                Err(Error::Config { key, .. }) => assert_eq!(key, "model.hidden"),
                other => panic!("expected a config error, got {:?}", other.map(|m| m.describe())),
            }
        }
        let mlp = |h: Vec<usize>| ModelConfigForTest { kind: "mlp".into(), hidden: Some(h), ..Default::default() };
        assert!(matches!(build(&mlp(vec![500, 0]), [1, 28, 28], 10), Err(Error::Config { .. })));
        assert!(build(&mlp(vec![5]), [1, 28, 28], 0).is_err());
        // No hidden layer is a valid MLP: multinomial logistic regression.
        assert_eq!(build(&mlp(vec![]), [1, 2, 2], 3).unwrap().layout().len(), 4 * 3 + 3);
    }

    #[test]
    fn init_is_deterministic_and_lecun_scaled() {
        let model = mlp::Mlp::new(784, &mlp::DEFAULT_HIDDEN, 10);
        let a = init_params(&model, 7);
        assert_eq!(a, init_params(&model, 7));
        let b = init_params(&model, 8);
        assert_eq!(a.len(), b.len());
        assert!(a.iter().zip(&b).filter(|(x, y)| x != y).count() > a.len() / 2);
        for spec in &model.layout().params {
            let w = &a[spec.range()];
            if spec.shape.len() == 1 {
                assert!(w.iter().all(|&v| v == 0.0), "{} should be zero", spec.name);
                continue;
            }
            let fan_in = spec.shape[1] as f64;
            let n = w.len() as f64;
            let mean = w.iter().map(|&v| v as f64).sum::<f64>() / n;
            let var = w.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
            assert!(mean.abs() < 4.0 * (1.0 / fan_in / n).sqrt(), "{}: mean {mean}", spec.name);
            assert!((var * fan_in - 1.0).abs() < 0.05, "{}: var·fan_in = {}", spec.name, var * fan_in);
            let bound = 2.0 / TRUNCATED_NORMAL_STD / fan_in.sqrt();
            assert!(w.iter().all(|&v| (v as f64).abs() <= bound * (1.0 + 1e-6)), "{}", spec.name);
        }
        // Conv fan_in is in_ch·kh·kw.
        let cnn = cnn::Cnn::new([3, 8, 8], [16, 4], 10);
        let theta = init_params(&cnn, 1);
        let w = &theta[cnn.layout().get("conv.1.weight").unwrap().range()];
        let var = w.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / w.len() as f64;
        assert!((var * (16.0 * 9.0) - 1.0).abs() < 0.15, "var·fan_in = {}", var * 144.0);
    }

    #[test]
    fn safetensors_round_trip_is_bit_identical() {
        let dir = tmpdir();
        let path = dir.path().join("w.safetensors");
        let model = cnn::Cnn::new([1, 5, 5], [2, 3], 4);
        let mut theta = init_params(&model, 3);
        theta[0] = -0.0;
        theta[1] = f32::MIN_POSITIVE / 8.0; // subnormal
        theta[2] = f32::MAX;
        save_safetensors(&model, &theta, &ModelState::default(), &path).unwrap();
        assert!(!path.with_extension("safetensors.tmp").exists());
        let back = load_safetensors(&model, &path).unwrap().0;
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&theta), bits(&back));
        // Overwriting an existing file works too.
        save_safetensors(&model, &back, &ModelState::default(), &path).unwrap();
        assert_eq!(bits(&theta), bits(&load_safetensors(&model, &path).unwrap().0));
    }

    /// Write a safetensors file with the given (name, dtype, shape, bytes).
    fn write_raw(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
        let views: Vec<_> =
            tensors.iter().map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
        std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn checkpoint_msg<T: std::fmt::Debug>(r: Result<T>) -> String {
        match r {
            Err(Error::Checkpoint { msg, .. }) => msg,
            other => panic!("expected a checkpoint error, got {other:?}"),
        }
    }

    #[test]
    fn load_errors_name_the_tensor() {
        let dir = tmpdir();
        let path = dir.path().join("w.safetensors");
        // layers.0.weight [2, 3], layers.0.bias [2], layers.1.weight [2, 2], layers.1.bias [2]
        let model = mlp::Mlp::new(3, &[2], 2);
        let good = vec![
            ("layers.0.weight", Dtype::F32, vec![2, 3], f32_bytes(&[1.0; 6])),
            ("layers.0.bias", Dtype::F32, vec![2], f32_bytes(&[2.0; 2])),
            ("layers.1.weight", Dtype::F32, vec![2, 2], f32_bytes(&[3.0; 4])),
            ("layers.1.bias", Dtype::F32, vec![2], f32_bytes(&[4.0; 2])),
        ];
        write_raw(&path, &good);
        assert_eq!(
            load_safetensors(&model, &path).unwrap().0,
            [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 3.0, 3.0, 4.0, 4.0]
        );

        write_raw(&path, &good[..3]);
        let msg = checkpoint_msg(load_safetensors(&model, &path));
        assert!(msg.contains("missing") && msg.contains("`layers.1.bias`"), "{msg}");

        let mut bad = good.clone();
        bad[2] = ("layers.1.weight", Dtype::F32, vec![4, 1], f32_bytes(&[3.0; 4]));
        write_raw(&path, &bad);
        let msg = checkpoint_msg(load_safetensors(&model, &path));
        assert!(msg.contains("`layers.1.weight`") && msg.contains("[4, 1]"), "{msg}");

        let mut bad = good.clone();
        bad.push(("layers.2.weight", Dtype::F32, vec![1], f32_bytes(&[0.0])));
        bad.push(("extra", Dtype::F32, vec![1], f32_bytes(&[0.0])));
        write_raw(&path, &bad);
        let msg = checkpoint_msg(load_safetensors(&model, &path));
        assert!(msg.contains("unexpected") && msg.contains("`extra`, `layers.2.weight`"), "{msg}");

        let mut bad = good.clone();
        bad[1] = ("layers.0.bias", Dtype::I32, vec![2], vec![0; 8]);
        write_raw(&path, &bad);
        let msg = checkpoint_msg(load_safetensors(&model, &path));
        assert!(msg.contains("`layers.0.bias`") && msg.contains("I32"), "{msg}");

        let mut bad = good.clone();
        bad[1] = ("layers.0.bias", Dtype::F32, vec![2], f32_bytes(&[f32::NAN, 0.0]));
        write_raw(&path, &bad);
        let msg = checkpoint_msg(load_safetensors(&model, &path));
        assert!(msg.contains("`layers.0.bias`") && msg.contains("non-finite"), "{msg}");

        std::fs::write(&path, b"not a safetensors file").unwrap();
        checkpoint_msg(load_safetensors(&model, &path));

        let msg = checkpoint_msg(load_safetensors(&model, &dir.path().join("absent.safetensors")));
        assert!(msg.contains("cannot read"), "{msg}");
    }

    #[test]
    fn load_converts_f64_f16_bf16() {
        let dir = tmpdir();
        let path = dir.path().join("w.safetensors");
        let model = mlp::Mlp::new(2, &[], 2); // layers.0.weight [2,2], layers.0.bias [2]
        let w64: Vec<u8> = [0.5f64, -1.25, 3.0, 1e-3].iter().flat_map(|x| x.to_le_bytes()).collect();
        // f16: 1.0 = 0x3c00, -2.0 = 0xc000; bf16: 1.5 = 0x3fc0.
        let b16: Vec<u8> = [0x3c00u16, 0xc000].iter().flat_map(|x| x.to_le_bytes()).collect();
        write_raw(
            &path,
            &[("layers.0.weight", Dtype::F64, vec![2, 2], w64), ("layers.0.bias", Dtype::F16, vec![2], b16)],
        );
        assert_eq!(load_safetensors(&model, &path).unwrap().0, [0.5, -1.25, 3.0, 1e-3, 1.0, -2.0]);
        let bf: Vec<u8> = [0x3fc0u16, 0x8000].iter().flat_map(|x| x.to_le_bytes()).collect();
        write_raw(
            &path,
            &[
                ("layers.0.weight", Dtype::F32, vec![2, 2], f32_bytes(&[0.0; 4])),
                ("layers.0.bias", Dtype::BF16, vec![2], bf),
            ],
        );
        let theta = load_safetensors(&model, &path).unwrap().0;
        assert_eq!(theta[4], 1.5);
        assert!(theta[5] == 0.0 && theta[5].is_sign_negative());
    }

    #[test]
    fn save_rejects_wrong_length() {
        let dir = tmpdir();
        let model = mlp::Mlp::new(2, &[], 2);
        let err = save_safetensors(&model, &[0.0; 5], &ModelState::default(), &dir.path().join("w.safetensors"));
        assert!(matches!(err, Err(Error::Checkpoint { .. })));
    }

    #[test]
    fn tensor_into_slice_copies_and_accumulates() {
        let t = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], (2, 3), &Device::Cpu).unwrap();
        let mut out = [0.0f32; 6];
        tensor_into_slice(&t, &mut out, false).unwrap();
        assert_eq!(out, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        // A non-contiguous view goes through the fallback path.
        tensor_into_slice(&t.t().unwrap(), &mut out, true).unwrap();
        assert_eq!(out, [2.0, 6.0, 5.0, 9.0, 8.0, 12.0]);
        assert!(tensor_into_slice(&t, &mut [0.0; 5], false).is_err());
    }
}
