//! The memory planner (SPEC §6): how one optimizer step should use a rank's memory.
//!
//! Given the run (model, optimizer, tableau, global batch), the world size and a per-rank budget,
//! it predicts the peak resident bytes of every candidate layout and picks the fastest that fits:
//!
//! - **stage buffers**: all s stage gradients resident (s − 1 buffers besides the pinned k_1), or
//!   streaming (`Tableau::streaming_stage_buffers`, from the stages' liveness). Both perform the
//!   same floating-point operations and give bit-identical results (`optim::rk`), so they cost the
//!   same time;
//! - **micro-batches**: the per-rank batch is processed in micro-batches whose gradient sums are
//!   accumulated (`ModelField::set_micro_batch`, config `train.micro_batch`). The largest
//!   micro-batch that fits is used, split evenly: ⌈batch / size⌉ of them;
//! - **activation recomputation** (checkpointing; `ModelField::set_recompute`, config
//!   `train.recompute`): the forward pass runs without autograd keeping only each segment's
//!   output (`Model::segments`: an MLP layer, a conv block, the head), and the backward pass
//!   recomputes one segment at a time from its saved input. Bit-identical gradients, one more
//!   forward pass;
//! - **sharding** of the optimizer (config `train.shard_optimizer`, `distributed::ShardedField`):
//!   each rank keeps one block of ⌈P/N⌉ of every parameter-sized buffer of the optimizer (θ, the
//!   stage point, k_1, the accumulators, the stage buffers, G, m); each evaluation all-gathers the
//!   stage point into a whole θ_i for the model and reduce-scatters the whole local gradient into
//!   this rank's block. Only for N > 1 ranks.
//!
//! The plan's `overrides` set exactly the knobs it decides — `optimizer.streaming` (where the
//! tableau has a choice), `train.micro_batch`, `train.recompute`, `train.shard_optimizer` —
//! wherever the config says otherwise (also switching recomputation or sharding *off* when the
//! config has them on and the plan does not need them).
//!
//! # The memory model (bytes per rank, f32 everywhere)
//!
//! ```text
//! peak = fixed                                   data set in memory + runtime (passed in)
//!      + 4P · whole                               unsharded: θ, the stage point θ_i, the model's
//!                                                 own copy of the parameters, autograd's
//!                                                 parameter gradients; sharded: the field's
//!                                                 all-gathered θ_i and local gradient instead of
//!                                                 θ and θ_i
//!      + 4⌈P/N⌉ · blocks                          sharded: state + scratch + stage + θ, θ_i and
//!                                                 the field's reduce-scatter block (N = 1 and
//!                                                 state + scratch + stage when unsharded)
//!      + 4 · batch · batch_floats                 the gathered per-rank batch (inputs + one-hot):
//!                                                 `ModelField` gathers all micro-batches at once
//!      + 4 · max(micro_batch · train_floats,      activations of one micro-batch (fwd + bwd;
//!                eval_samples · eval_floats,      recompute_floats with recomputation)
//!                checkpoint)                      or, between steps, the evaluation pass
//!                                                 or the checkpoint being serialized
//! ```
//!
//! Activation floats come from the architecture, layer by layer (`activation_profile`). Each
//! layer has the floats per sample that candle's autograd graph *keeps* until the backward pass
//! (forward outputs and intermediates) and the *transient* floats it needs while that layer runs
//! (backward temporaries: the incoming gradient, ReLU's mask, its product, the accumulation of the
//! gradient into the store, the input gradient, convolution scratch). Without recomputation a
//! micro-batch needs Σ kept + max transient. With recomputation (`ModelField::recomputed_backward`)
//! segment k is back-propagated while the saved outputs of the segments before it are live (the
//! last of them copied into a `Var`, its input), together with the gradient arriving at its
//! output, the product out ⊙ upstream whose sum is back-propagated, and the gradient candle's
//! `Mul` backward computes for the (detached) upstream operand too — 3 per output value, plus 2
//! for heap fragmentation (`RECOMPUTE_UPSTREAM`; none for the last segment, which ends in the
//! cross-entropy): max over k of Σ_{j<k} output_j + 5·output_k + kept_k + transient_k, at the
//! cost of one more forward pass (+33 %). It pays for deep stacks of similar layers only: the
//! paper's MLP on candle's autograd needed 9 000 instead of 9 060 floats per sample (measured: no saving), the
//! paper's CNN, whose conv block 0 holds most of the activations, needs *more* (260 288 instead
//! of 213 308 floats) — so the planner does not choose it for them.
//!
//! The MLP runs on its own gradient code on the CPU (`model::native`), which keeps far less than
//! autograd: each layer's output, and while a layer is back-propagated the gradients at its
//! output and input (`activation::native_dense`): 1 510 + 1 000 floats per sample for the default
//! MLP, plus the gathered batch (794). Measured 12.3 KiB/sample between batch 1024 and 8192
//! (133.6 → 220.0 MiB), predicted 12.9 KiB. Whole process, full batch (60 000, eval chunk
//! 10 000, rk4, one step; predicted / measured): one pass 893 / 860 MiB, two micro-batches of
//! 30 000 606 / 572 MiB. Its buffers are freed before each evaluation pass
//! (`ModelField::release_workspace`), so the evaluation's working set does not add to them.
//! Recomputation saves nothing there, and the planner does not choose it.
//!
//! Factors per layer type for candle's autograd (per output value unless said otherwise):
//! - dense (linear + bias + ReLU): keeps 3 (the matmul, the bias sum, the ReLU); the input layer
//!   keeps 1 more (its custom op `input_linear` keeps the value next to its pass-through copy).
//!   Transient 6, plus 2 per input value for the input gradient and its accumulation (none for the
//!   input layer, which never differentiates with respect to the images);
//! - the logits layer with the cross-entropy: keeps 6 (matmul, bias, the shifted logits, exp,
//!   the one-hot product and their reductions); transient as a dense layer;
//! - conv 3×3 (same padding) + bias + ReLU: keeps 4 (the conv value held by the custom op, its
//!   copy, the bias sum, the ReLU); transient 7, plus 3 per input value (the NHWC copies candle's
//!   tiled conv makes, the input gradient), plus k²·H·W per concurrent weight-gradient column
//!   tile (candle computes the weight gradient as a conv over the batch axis, one k²·(B·H·W) tile
//!   per input channel in parallel: min(threads, C_in) at once).
//!
//! Calibration (peak RSS of `kutta train` on this 2-core machine, the marginal cost per sample):
//! the default MLP (784-500-500-500-10) on candle's autograd (before the native path) with rk4
//! measured 38.1 KiB/sample between batch 1024 and
//! 8192 and 38.4 KiB between 16 and 4096; the model predicts 9 854 floats = 38.5 KiB (the forward
//! activations alone are ≈ 3 000 floats: candle keeps pre- and post-activation tensors, the
//! input copy, the one-hot and the backward temporaries). The default CNN measured 827 KiB/sample
//! between batch 512 and 1024 and 943 KiB between 64 and 512; the model predicts 836 KiB.
//! Whole-process peaks checked against `kutta plan` (predicted / measured): MLP batch 8192
//! 602 / 582 MiB; the full-batch MLP (60 000, eval chunk 10 000) in 2 micro-batches of 30 000
//! 1512 / 1402 MiB; CNN batch 64 with eval chunk 64 324 / 312 MiB, with eval chunk 1000
//! 484 / 491 MiB (the evaluation pass is the peak there).
//!
//! The ResNets (conv + batch norm units, `activation::conv_bn`; ResNet-18 on Fashion-MNIST with
//! `configs/fashion_mnist_resnet18.toml`, momentum, 2 steps, eval chunk 16; predicted / measured
//! peak RSS in MiB):
//!
//! ```text
//! batch                 32           64           128          256        marginal per sample
//! width  8       193 / 150    268 / 222    419 / 367    721 / 657    2.36 / 2.27 MiB (+4 %)
//! width 16       280 / 238    429 / 380    727 / 665   1323 / 1239   4.66 / 4.48 MiB (+4 %)
//! ```
//!
//! The per-sample cost is 4 % high; the whole-process prediction is 7-29 % high, most of it the
//! fixed part (≈ 40 MiB: the runtime baseline was calibrated with the f32 data set of the MLP
//! runs; the images are u8 now). High is the safe side for a planner, so the factors stay.
//! (`kutta train --config configs/fashion_mnist_resnet18.toml --set model.width=W --set
//! train.batch_size=B --set train.steps=2 --set train.eval_chunk=16`, `peak_rss_mib` of
//! summary.json; predictions: `kutta plan` with the same `--set`s.)
//!
//! That table was measured with candle's conv and batch-norm ops. The CPU kernels of
//! `model::cpu_layers` (fused batch norm + ReLU, conv with its own backward) keep far less: at
//! width 16, batch 64 / 256 the same runs now peak at 183 / 458 MiB (predicted 429 / 1 331), a
//! marginal 1.44 MiB per sample against 4.66 predicted. The conv and batch-norm factors above
//! are not yet recalibrated for them: the planner over-predicts ResNets (and the CNN and WRN,
//! not re-measured) about 3×, which is safe but makes it pick micro-batches earlier than needed.
//!
//! Recomputation (`train.recompute = true`, rk4, one step; predicted / measured peak RSS, MiB):
//!
//! ```text
//!                                          recompute            without
//! MLP full-batch config, batch  4 096      447 /  442           448 /  433
//!                              16 384      906 /  912           910 /  903
//!                              30 000     1414 / 1295          1421 / 1310
//! CNN, batch 512, eval chunk 64            782 /  830           690 /  724
//! ```
//!
//! (`kutta train --config configs/fashion_mnist_mlp_fullbatch.toml --set train.steps=1
//! --set train.batch_size=B --set train.recompute=true|false`; the CNN with
//! `configs/fashion_mnist_cnn.toml --set train.batch_size=512 --set train.eval_chunk=64`;
//! predictions: the rows of `kutta plan` with the same `--set`s.) Recomputation saves the MLP nothing measurable and costs the CNN 15 %. With
//! `MALLOC_MMAP_THRESHOLD_=131072` (every large buffer mapped and unmapped at once, so that peak
//! RSS is the live bytes) the MLP at 16 384 measured 826 MiB with recomputation and 834 without,
//! the CNN 719 and 627: the live-byte count (3 per output value) predicts 843 and 720 for the
//! recomputed runs. The default allocator keeps up to ~100 MiB more of the repeated per-segment
//! passes' heap (tensors below glibc's 32 MiB mmap limit), hence the 2 per output value on top;
//! at 30 000 samples the tensors are mapped and the model over-predicts by 9 % (as it does
//! without recomputation: the calibration above is from batches ≤ 8 192, in the heap regime).
//!
//! Relative time: 1.0 = everything resident in one micro-batch; each micro-batch beyond the first
//! adds 2 % (smaller GEMMs, per-pass overhead), recomputation 33 % (one more forward pass), and
//! sharding 3 % — an estimate, not a measurement: per evaluation a copy of θ_i's block into the
//! send buffer, an all-gather and a reduce-scatter instead of one all-reduce (the same bytes on a
//! ring), the block copied out, and a scalar all-reduce per norm or finiteness check. The planner
//! chooses the fastest candidate that fits (ties: the configured stage policy, then the smaller
//! peak), so sharding is chosen only when it buys something: when no unsharded plan fits, or
//! when the unsharded ones need two or more extra micro-batches or recomputation.

use std::path::Path;

use serde::Serialize;

use crate::config::{Config, DataConfig, DataFormat, OptimizerKind, PreconditionerKind, StepSizeKind};
use crate::data::cifar::{self, CifarKind};
use crate::data::{idx, mnist};
use crate::error::{Error, Result};
use crate::model::{LayerActivation, Model};

/// Bytes per value: every buffer and activation is f32.
const F32_BYTES: u64 = 4;
/// The process's own memory besides the data set and the buffers the planner counts: the
/// executable, the allocator's arenas, candle's and rayon's thread pools. With the measured
/// 286 MiB at batch 16, of which 210 MiB is the data set, the rest is ≈ 50 MiB plus buffers;
/// 60 MiB leaves a little headroom.
pub const RUNTIME_BASELINE_BYTES: u64 = 60 << 20;
/// Relative cost of each micro-batch beyond the first.
pub const MICRO_BATCH_OVERHEAD: f64 = 0.02;
/// Relative cost of recomputing the activations (one more forward pass ≈ 1/3 of fwd + bwd).
pub const RECOMPUTE_OVERHEAD: f64 = 0.33;
/// Relative cost of sharding the optimizer, an estimate: a reduce-scatter + an all-gather move the
/// bytes of one all-reduce, plus a copy of θ_i's block and of the gradient's block and a few
/// scalar all-reduces per evaluation. Small but positive, so that sharding is chosen only when
/// it saves a micro-batch or more.
pub const SHARD_OVERHEAD: f64 = 0.03;
/// Threads the calibration ran with (this machine's cores); `activation_floats_per_sample` uses it.
pub const CALIBRATION_THREADS: usize = 2;
/// The budget when /proc/meminfo cannot be read.
pub const FALLBACK_BUDGET: u64 = 8 << 30;

/// Per output value of a recomputed segment other than the last: the gradient arriving from the
/// segment after it, the product out ⊙ upstream that autograd keeps, and the gradient candle's
/// `Mul` backward also computes (and stores) for the detached upstream operand (3, live bytes);
/// plus 2 for the heap the repeated per-segment passes leave fragmented (peak RSS above the live
/// bytes; see the calibration in the module doc).
const RECOMPUTE_UPSTREAM: usize = 3 + 2;
// ---------------------------------------------------------------------------------------------
// Activations, per layer
// ---------------------------------------------------------------------------------------------

/// A model's activation memory per sample (f32 values), layer by layer and in total.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ActivationProfile {
    pub layers: Vec<LayerActivation>,
    /// The gathered input and one-hot label: held for the whole per-rank batch, whatever the
    /// micro-batch size (`ModelField` gathers every micro-batch when the batch is set).
    pub batch_floats: usize,
    /// One micro-batch sample's forward + backward: Σ kept + max transient.
    pub train_floats: usize,
    /// The same with recomputation (`ModelField::recomputed_backward`): max over segments k of
    /// Σ_{j<k} output_j (the saved boundaries) + 5·output_k (`RECOMPUTE_UPSTREAM`; none for the
    /// last segment) + kept_k + transient_k. Equal to `train_floats` for a model
    /// of one segment, which the trainer never recomputes.
    pub recompute_floats: usize,
    /// One evaluation sample: its input copy + the largest layer's forward working set.
    pub eval_floats: usize,
}

impl ActivationProfile {
    fn from_layers(layers: Vec<LayerActivation>, input: usize, classes: usize) -> Self {
        let kept: usize = layers.iter().map(|l| l.kept).sum();
        let transient = layers.iter().map(|l| l.transient).max().unwrap_or(0);
        let last = layers.len().saturating_sub(1);
        let mut saved = 0; // Σ_{j<k} output_j
        let mut recompute = 0;
        for (k, l) in layers.iter().enumerate() {
            let upstream = if k < last { RECOMPUTE_UPSTREAM * l.output } else { 0 };
            // The backward of segment k, and the plain forward pass reaching it.
            recompute = recompute.max(saved + upstream + l.kept + l.transient).max(saved + l.eval);
            saved += l.output;
        }
        let eval = layers.iter().map(|l| l.eval).max().unwrap_or(0);
        Self {
            batch_floats: input + classes,
            train_floats: kept + transient,
            recompute_floats: if layers.len() > 1 { recompute } else { kept + transient },
            eval_floats: input + eval,
            layers,
        }
    }
}

/// The activation memory of `model` (its `Model::activations`, one entry per segment) for
/// inputs of `image_shape` and `classes` logits; `threads` = the threads candle's CPU kernels use
/// (rayon's pool), which sets how many convolution weight-gradient tiles are live at once.
pub fn activation_profile(
    model: &dyn Model,
    image_shape: [usize; 3],
    classes: usize,
    threads: usize,
) -> ActivationProfile {
    let input: usize = image_shape.iter().product();
    ActivationProfile::from_layers(model.activations(threads), input, classes)
}

/// f32 values of activation memory one training sample costs when the whole batch is one
/// micro-batch (gathered input and one-hot included), at the calibration's thread count: the
/// marginal bytes per sample of a training run are 4× this.
pub fn activation_floats_per_sample(model: &dyn Model, image_shape: [usize; 3], classes: usize) -> usize {
    let p = activation_profile(model, image_shape, classes, CALIBRATION_THREADS);
    p.batch_floats + p.train_floats
}

/// The threads candle's CPU kernels run on (`threads::current`: what `threads::init` chose at
/// start, `--threads`, `RAYON_NUM_THREADS` or cores per rank on this node; candle's default
/// without `init`).
fn compute_threads() -> usize {
    crate::threads::current()
}

// ---------------------------------------------------------------------------------------------
// Input
// ---------------------------------------------------------------------------------------------

/// Everything the plan depends on. Buffer counts are in units of P f32 values.
#[derive(Clone, Debug, Serialize)]
pub struct PlanInput {
    /// The model, e.g. "mlp 784-500-500-500-10 (ReLU), 898510 params".
    pub model: String,
    /// P: parameters.
    pub params: usize,
    pub activations: ActivationProfile,
    pub global_batch: usize,
    pub world_size: usize,
    /// The largest rank's slice of the global batch, ⌈global / N⌉.
    pub per_rank_batch: usize,
    /// e.g. "rk(rk4)", "adam".
    pub optimizer: String,
    /// s: gradient evaluations per step (1 for the baselines).
    pub stages: usize,
    /// Stage buffers besides the pinned k_1 with every stage kept: s − 1.
    pub resident_stage_buffers: usize,
    /// Stage buffers besides k_1 live at once when streaming (the tableau's liveness).
    pub streaming_stage_buffers: usize,
    /// `optimizer.streaming` as configured.
    pub streaming_configured: bool,
    /// `train.micro_batch` as configured (0 = the whole per-rank batch in one pass).
    pub micro_batch_configured: usize,
    /// Micro-batches are multiples of this (batch norm's ghost batch, `Model::batch_multiple`).
    pub batch_multiple: usize,
    /// `train.recompute` as configured.
    pub recompute_configured: bool,
    /// `train.shard_optimizer` as configured.
    pub shard_configured: bool,
    /// Whole on every rank without sharding: θ, the stage point, the model's parameter copy,
    /// autograd's gradients.
    pub replicated_buffers: usize,
    /// Of those, the optimizer's own (θ, and the stage point for rk): blocks of ⌈P/N⌉ when
    /// sharded, where the field's whole all-gathered θ_i and local gradient take their place.
    pub owned_buffers: usize,
    /// Persistent optimizer state: G (preconditioner) and m (momentum) for rk; Adam's m and v;
    /// the momentum buffer.
    pub state_buffers: usize,
    /// Solver scratch besides the stage buffers: k_1, the b·k accumulator, D, the error
    /// accumulator for rk; the baselines' gradient and candidate buffers.
    pub scratch_buffers: usize,
    /// Samples per evaluation pass: `train.eval_chunk`, at most the rank's share of the test set.
    pub eval_samples: usize,
    /// Data set in memory + runtime baseline.
    pub fixed_bytes: u64,
    /// Per-rank budget.
    pub budget: u64,
}

impl PlanInput {
    /// The input for a validated config. `params` = P of the config's model, `image_shape` and
    /// `classes` those of its data set; `fixed_bytes` = data set + runtime (`fixed_bytes`).
    pub fn from_config(
        cfg: &Config,
        world_size: usize,
        budget: u64,
        fixed_bytes: u64,
        model: &dyn Model,
        image_shape: [usize; 3],
        classes: usize,
    ) -> Result<PlanInput> {
        let params = model.layout().len();
        if world_size == 0 {
            return Err(Error::config("--world-size", "must be at least 1"));
        }
        if budget == 0 {
            return Err(Error::config("--memory", "the budget must be positive"));
        }
        if params == 0 {
            return Err(Error::model("the planner got a model without parameters"));
        }
        let activations = activation_profile(model, image_shape, classes, compute_threads());
        let batch_multiple = model.batch_multiple();
        let model = model.describe();
        let o = &cfg.optimizer;
        let global_batch = cfg.train.batch_size;
        let mut input = PlanInput {
            model,
            params,
            activations,
            global_batch,
            world_size,
            per_rank_batch: global_batch.div_ceil(world_size),
            optimizer: String::new(),
            stages: 1,
            resident_stage_buffers: 0,
            streaming_stage_buffers: 0,
            streaming_configured: o.streaming,
            micro_batch_configured: cfg.train.micro_batch,
            batch_multiple,
            recompute_configured: cfg.train.recompute,
            shard_configured: cfg.train.shard_optimizer,
            replicated_buffers: 3, // θ, the model's parameter copy, autograd's gradients
            owned_buffers: 1,      // θ
            state_buffers: 0,
            scratch_buffers: 0,
            eval_samples: cfg.train.eval_chunk.max(1),
            fixed_bytes,
            budget,
        };
        // Counted from the buffers `optim::rk` and `optim::baselines` allocate.
        match o.kind {
            OptimizerKind::Rk => {
                let t = cfg.tableau()?;
                let s = t.stages();
                let pre = o.preconditioner != PreconditionerKind::None;
                input.optimizer = format!("rk({})", t.name);
                input.stages = s;
                input.replicated_buffers += 1; // the stage point x = θ_i
                input.owned_buffers += 1;
                input.state_buffers = usize::from(pre) + usize::from(o.momentum != 0.0);
                input.scratch_buffers = 2 + usize::from(pre) + usize::from(t.is_embedded()); // k_1, acc, D, err_acc
                                                                                             // The bound counts k_1 when a later stage still needs it; at most s − 1 besides it.
                let streaming = t.streaming_stage_buffers().min(s - 1);
                // DALR's finite-difference probe borrows a pooled stage buffer (a fresh one if s = 1).
                let probe = usize::from(o.step_size == StepSizeKind::Dalr);
                input.resident_stage_buffers = (s - 1).max(probe);
                input.streaming_stage_buffers = streaming.max(probe);
            }
            OptimizerKind::Sgd => {
                input.optimizer = "sgd".into();
                input.scratch_buffers = 2; // grad, θ candidate
            }
            OptimizerKind::Momentum => {
                input.optimizer = if o.nesterov { "nesterov".into() } else { "momentum".into() };
                input.state_buffers = 1;
                input.scratch_buffers = 3 + usize::from(o.nesterov); // new buffer, grad, θ candidate, direction
            }
            kind @ (OptimizerKind::Adam | OptimizerKind::Adamw | OptimizerKind::Nadamw) => {
                input.optimizer = format!("{kind:?}").to_lowercase();
                input.state_buffers = 2;
                input.scratch_buffers = 5; // new m, new v, grad, direction, θ candidate
            }
        }
        Ok(input)
    }

    fn has_stage_choice(&self) -> bool {
        self.resident_stage_buffers != self.streaming_stage_buffers
    }

    fn configured_policy(&self) -> StagePolicy {
        if self.stages < 2 && self.resident_stage_buffers == 0 {
            StagePolicy::None
        } else if self.streaming_configured {
            StagePolicy::Streaming
        } else {
            StagePolicy::Resident
        }
    }

    fn stage_count(&self, policy: StagePolicy) -> usize {
        match policy {
            StagePolicy::Resident => self.resident_stage_buffers,
            StagePolicy::Streaming => self.streaming_stage_buffers,
            StagePolicy::None => 0,
        }
    }

    fn param_bytes(&self) -> u64 {
        self.params as u64 * F32_BYTES
    }
}

// ---------------------------------------------------------------------------------------------
// Candidates and the plan
// ---------------------------------------------------------------------------------------------

/// What happens to the stage gradients k_2..k_s.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StagePolicy {
    /// All kept until the step combines them.
    Resident,
    /// Accumulated as they appear and freed after their last use.
    Streaming,
    /// The optimizer has no stage gradients (the Euler-type baselines).
    None,
}

impl StagePolicy {
    fn label(self) -> &'static str {
        match self {
            StagePolicy::Resident => "resident",
            StagePolicy::Streaming => "streaming",
            StagePolicy::None => "-",
        }
    }
}

/// Where a candidate's bytes go (per rank).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PeakBreakdown {
    /// Data set + runtime.
    pub fixed: u64,
    /// Parameter-sized buffers every rank holds whole.
    pub replicated: u64,
    /// Optimizer state, solver scratch and stage buffers (when sharded: blocks of ⌈P/N⌉, with θ's,
    /// the stage point's and the field's).
    pub optimizer: u64,
    /// The gathered per-rank batch (inputs + one-hot).
    pub batch_inputs: u64,
    /// One micro-batch's activations during the step.
    pub activations: u64,
    /// Between steps: evaluation pass or checkpoint serialization, whichever is larger.
    pub between_steps: u64,
}

impl PeakBreakdown {
    pub fn peak(&self) -> u64 {
        self.fixed + self.replicated + self.optimizer + self.batch_inputs + self.activations.max(self.between_steps)
    }
}

/// One way to lay out a step, with its predicted cost.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Candidate {
    pub stage_buffers: StagePolicy,
    /// Stage buffers (P values each) besides k_1 at the peak.
    pub stage_buffer_count: usize,
    /// Samples per forward/backward pass.
    pub micro_batch: usize,
    /// ⌈per-rank batch / micro_batch⌉.
    pub micro_batches: usize,
    /// Activation recomputation (`train.recompute`).
    pub recompute: bool,
    /// The optimizer's buffers sharded over the ranks (`train.shard_optimizer`).
    pub shard: bool,
    /// Predicted peak resident bytes per rank.
    pub peak_bytes: u64,
    /// 1.0 = everything resident, one micro-batch.
    pub relative_time: f64,
    /// peak_bytes ≤ budget.
    pub fits: bool,
    pub breakdown: PeakBreakdown,
}

#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub chosen: Candidate,
    /// The best candidate of every (stage policy, recompute, shard) combination.
    pub candidates: Vec<Candidate>,
    pub reason: String,
    /// Config overrides that run the chosen plan (`--set` form): each knob the plan decides
    /// (`optimizer.streaming`, `train.micro_batch`, `train.recompute`, `train.shard_optimizer`)
    /// where the config says otherwise; empty when the config already runs it.
    pub overrides: Vec<String>,
    pub input: PlanInput,
}

/// The predicted per-rank bytes of one layout for `input.per_rank_batch`.
pub fn predict(
    input: &PlanInput,
    policy: StagePolicy,
    micro_batch: usize,
    recompute: bool,
    shard: bool,
) -> PeakBreakdown {
    let pb = input.param_bytes();
    let shard = shard && input.world_size > 1;
    let owners = if shard { input.world_size as u64 } else { 1 };
    let optimizer = input.state_buffers + input.scratch_buffers + input.stage_count(policy);
    // Sharded, θ and the stage point become blocks too, the field holds the whole θ_i and local
    // gradient (`distributed::ShardedField`) and one block for the reduce-scatter's result.
    let (replicated, sharded) = if shard {
        (input.replicated_buffers - input.owned_buffers + 2, optimizer + input.owned_buffers + 1)
    } else {
        (input.replicated_buffers, optimizer)
    };
    let a = &input.activations;
    let batch = input.per_rank_batch as u64;
    let m = micro_batch.clamp(1, input.per_rank_batch.max(1)) as u64;
    let per_sample = if recompute { a.recompute_floats } else { a.train_floats } as u64;
    let eval = input.eval_samples as u64 * a.eval_floats as u64 * F32_BYTES;
    // Checkpoint: θ and the state cloned, converted to bytes, and serialized.
    let checkpoint = 3 * (1 + input.state_buffers as u64) * pb;
    PeakBreakdown {
        fixed: input.fixed_bytes,
        replicated: replicated as u64 * pb,
        optimizer: sharded as u64 * (input.params as u64).div_ceil(owners) * F32_BYTES,
        batch_inputs: batch * a.batch_floats as u64 * F32_BYTES,
        activations: m * per_sample * F32_BYTES,
        between_steps: eval.max(checkpoint),
    }
}

/// Relative time of a layout (1.0 = everything resident, one micro-batch).
pub fn relative_time(micro_batches: usize, recompute: bool, shard: bool) -> f64 {
    let mut t = 1.0 + MICRO_BATCH_OVERHEAD * micro_batches.saturating_sub(1) as f64;
    if recompute {
        t *= 1.0 + RECOMPUTE_OVERHEAD;
    }
    if shard {
        t *= 1.0 + SHARD_OVERHEAD;
    }
    t
}

fn candidate(input: &PlanInput, policy: StagePolicy, micro_batch: usize, recompute: bool, shard: bool) -> Candidate {
    let b = input.per_rank_batch.max(1);
    let micro_batch = micro_batch.clamp(1, b);
    let micro_batches = b.div_ceil(micro_batch);
    let breakdown = predict(input, policy, micro_batch, recompute, shard);
    let peak_bytes = breakdown.peak();
    Candidate {
        stage_buffers: policy,
        stage_buffer_count: input.stage_count(policy),
        micro_batch,
        micro_batches,
        recompute,
        shard,
        peak_bytes,
        relative_time: relative_time(micro_batches, recompute, shard),
        fits: peak_bytes <= input.budget,
        breakdown,
    }
}

/// The fastest candidate of one combination: one micro-batch if it fits, else the largest
/// micro-batch that fits, split evenly; if not even micro-batches of 1 fit, that (unfit) one.
fn best_of_combination(input: &PlanInput, policy: StagePolicy, recompute: bool, shard: bool) -> Candidate {
    let b = input.per_rank_batch.max(1);
    let whole = candidate(input, policy, b, recompute, shard);
    if whole.fits {
        return whole;
    }
    // Micro-batches are whole ghost batches of g samples (g = 1 without batch norm).
    let g = input.batch_multiple.clamp(1, b);
    let units = b / g;
    let smallest = candidate(input, policy, g, recompute, shard);
    if !smallest.fits {
        return smallest;
    }
    // Peak grows with the micro-batch: the largest m = g·u with peak(m) ≤ budget has u in
    // [1, units).
    let (mut lo, mut hi) = (1usize, units); // fits(lo), !fits(hi)
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if candidate(input, policy, g * mid, recompute, shard).fits {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    // The same number of micro-batches, of even size (60000 = 4 × 15000, not 3 × 17000 + 9000).
    let count = units.div_ceil(lo);
    candidate(input, policy, g * units.div_ceil(count), recompute, shard)
}

fn policies(input: &PlanInput) -> Vec<StagePolicy> {
    let configured = input.configured_policy();
    match configured {
        StagePolicy::None => vec![StagePolicy::None],
        _ if !input.has_stage_choice() => vec![configured],
        StagePolicy::Streaming => vec![StagePolicy::Streaming, StagePolicy::Resident],
        StagePolicy::Resident => vec![StagePolicy::Resident, StagePolicy::Streaming],
    }
}

fn all_candidates(input: &PlanInput) -> Vec<Candidate> {
    let shards: &[bool] = if input.world_size > 1 { &[false, true] } else { &[false] };
    let mut out = Vec::new();
    for &shard in shards {
        for recompute in [false, true] {
            for &policy in &policies(input) {
                out.push(best_of_combination(input, policy, recompute, shard));
            }
        }
    }
    out
}

/// Times equal up to rounding count as equal.
fn time_key(t: f64) -> i64 {
    (t * 1e9).round() as i64
}

/// The chosen candidate: among those that fit, the fastest; then the configured stage policy;
/// then the smallest peak.
fn choose(input: &PlanInput, candidates: &[Candidate]) -> Option<Candidate> {
    let configured = input.configured_policy();
    candidates
        .iter()
        .filter(|c| c.fits)
        .min_by_key(|c| (time_key(c.relative_time), c.stage_buffers != configured, c.peak_bytes))
        .cloned()
}

/// The `--set` overrides that make a config with `input`'s settings run `chosen`: every knob the
/// plan decides, where the config says otherwise.
fn overrides(input: &PlanInput, chosen: &Candidate) -> Vec<String> {
    let mut out = Vec::new();
    if input.has_stage_choice() && chosen.stage_buffers != input.configured_policy() {
        out.push(format!("optimizer.streaming={}", chosen.stage_buffers == StagePolicy::Streaming));
    }
    // The configured micro-batch size as the trainer applies it: 0 or ≥ the batch = one pass.
    let b = input.per_rank_batch.max(1);
    let configured = match input.micro_batch_configured {
        m if m == 0 || m >= b => b,
        m => m,
    };
    if configured != chosen.micro_batch {
        let m = if chosen.micro_batches > 1 { chosen.micro_batch } else { 0 };
        out.push(format!("train.micro_batch={m}"));
    }
    if chosen.recompute != input.recompute_configured {
        out.push(format!("train.recompute={}", chosen.recompute));
    }
    if chosen.shard != input.shard_configured {
        out.push(format!("train.shard_optimizer={}", chosen.shard));
    }
    out
}

/// Plan the step: every candidate, the chosen one and why. A batch that fits under no plan is an
/// `Error::Plan` saying what would fit: the largest per-rank batch that fits the budget, and the
/// smallest budget for this batch.
pub fn plan(input: &PlanInput) -> Result<Plan> {
    if input.per_rank_batch == 0 || input.world_size == 0 || input.params == 0 {
        return Err(Error::Plan(format!(
            "nothing to plan (per-rank batch {}, world size {}, {} params)",
            input.per_rank_batch, input.world_size, input.params
        )));
    }
    let candidates = all_candidates(input);
    let Some(chosen) = choose(input, &candidates) else {
        return Err(Error::Plan(does_not_fit(input)));
    };
    let reason = explain(input, &chosen, &candidates);
    let overrides = overrides(input, &chosen);
    Ok(Plan { chosen, candidates, reason, overrides, input: input.clone() })
}

/// The smallest peak any layout reaches for `per_rank_batch` (micro-batches of one sample).
fn floor_for_batch(input: &PlanInput, per_rank_batch: usize) -> Candidate {
    let mut at = input.clone();
    at.per_rank_batch = per_rank_batch;
    let shards: &[bool] = if input.world_size > 1 { &[false, true] } else { &[false] };
    let mut best: Option<Candidate> = None;
    for &shard in shards {
        for recompute in [false, true] {
            for &policy in &policies(&at) {
                let c = candidate(&at, policy, 1, recompute, shard);
                let key = |c: &Candidate| (c.peak_bytes, time_key(c.relative_time));
                if best.as_ref().is_none_or(|b| key(&c) < key(b)) {
                    best = Some(c);
                }
            }
        }
    }
    best.expect("at least one combination")
}

fn describe_layout(c: &Candidate) -> String {
    let mut parts = Vec::new();
    if c.stage_buffers != StagePolicy::None {
        parts.push(format!("{} stage buffers", c.stage_buffers.label()));
    }
    parts.push(format!("micro-batches of {}", c.micro_batch));
    if c.recompute {
        parts.push("recomputation".into());
    }
    if c.shard {
        parts.push("sharding".into());
    }
    parts.join(", ")
}

/// When the pass between steps (evaluation or checkpoint) is larger than the step's activations,
/// what it is and the knob that shrinks it.
fn between_steps_note(input: &PlanInput, c: &Candidate) -> Option<String> {
    let b = &c.breakdown;
    if b.between_steps <= b.activations {
        return None;
    }
    let eval = input.eval_samples as u64 * input.activations.eval_floats as u64 * F32_BYTES;
    Some(if eval >= b.between_steps {
        format!(
            "between steps, evaluation in passes of {} samples needs {} (more than a micro-batch's {}; lower train.eval_chunk to save it)",
            input.eval_samples,
            fmt_bytes(eval),
            fmt_bytes(b.activations)
        )
    } else {
        format!(
            "between steps, serializing a checkpoint needs {} (more than a micro-batch's {})",
            fmt_bytes(b.between_steps),
            fmt_bytes(b.activations)
        )
    })
}

fn does_not_fit(input: &PlanInput) -> String {
    let b = input.per_rank_batch;
    let n = input.world_size;
    let floor = floor_for_batch(input, b);
    let ranks = if n > 1 { format!(" (global batch {} on {n} ranks)", input.global_batch) } else { String::new() };
    let mut msg = format!(
        "no plan fits per-rank batch {b}{ranks} in {}: the smallest predicted peak is {} ({}); \
         give --memory {} or more",
        fmt_bytes(input.budget),
        fmt_bytes(floor.peak_bytes),
        describe_layout(&floor),
        fmt_bytes_ceil(floor.peak_bytes),
    );
    if let Some(note) = between_steps_note(input, &floor) {
        msg.push_str(&format!("; {note}"));
    }
    // The largest per-rank batch that fits: the floor grows with the batch (its gathered inputs).
    if floor_for_batch(input, 1).peak_bytes > input.budget {
        let one = floor_for_batch(input, 1);
        msg.push_str(&format!(
            ". Not even a per-rank batch of 1 fits: it needs {} — the data set and runtime take {}, \
             the parameter-sized buffers {}",
            fmt_bytes(one.peak_bytes),
            fmt_bytes(one.breakdown.fixed),
            fmt_bytes(one.breakdown.replicated + one.breakdown.optimizer),
        ));
    } else {
        let (mut lo, mut hi) = (1usize, b); // fits(lo), !fits(hi)
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if floor_for_batch(input, mid).peak_bytes <= input.budget {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        let at = floor_for_batch(input, lo);
        let global = if n > 1 { format!(" (global batch {} on {n} ranks)", lo * n) } else { String::new() };
        msg.push_str(&format!(
            ". The largest per-rank batch that fits {} is {lo}{global}, with {}",
            fmt_bytes(input.budget),
            describe_layout(&at)
        ));
    }
    msg
}

fn explain(input: &PlanInput, chosen: &Candidate, candidates: &[Candidate]) -> String {
    let pb = input.param_bytes();
    let mut parts = Vec::new();
    let b = input.per_rank_batch;
    // Stage buffers.
    if input.has_stage_choice() {
        let (r, s) = (input.resident_stage_buffers, input.streaming_stage_buffers);
        let resident_fits = candidates.iter().any(|c| {
            c.fits
                && c.stage_buffers == StagePolicy::Resident
                && c.recompute == chosen.recompute
                && c.shard == chosen.shard
                && c.micro_batches == chosen.micro_batches
        });
        parts.push(match chosen.stage_buffers {
            StagePolicy::Resident => format!("resident stage buffers fit: {r}×{} besides k_1", fmt_bytes(pb)),
            StagePolicy::Streaming if resident_fits => format!(
                "streaming stage buffers ({s}×{} live instead of {r}×{}; same arithmetic, bit-identical results)",
                fmt_bytes(pb),
                fmt_bytes(pb)
            ),
            _ => format!(
                "resident stage buffers ({r}×{}) do not fit this way; streaming keeps {s}×{} live (bit-identical results)",
                fmt_bytes(pb),
                fmt_bytes(pb)
            ),
        });
    } else if chosen.stage_buffer_count > 0 {
        parts.push(format!("{}×{} stage buffers besides k_1", chosen.stage_buffer_count, fmt_bytes(pb)));
    }
    // Micro-batches.
    let per_sample = if chosen.recompute { input.activations.recompute_floats } else { input.activations.train_floats }
        as u64
        * F32_BYTES;
    let whole = b as u64 * per_sample;
    if chosen.micro_batches == 1 {
        parts.push(format!("per-rank batch {b} fits in one pass ({} of activations)", fmt_bytes(whole)));
    } else {
        parts.push(format!(
            "per-rank batch {b} needs {} of activations, so {} micro-batches of {} ({} each)",
            fmt_bytes(whole),
            chosen.micro_batches,
            chosen.micro_batch,
            fmt_bytes(chosen.breakdown.activations)
        ));
    }
    // Why recomputation or sharding: the best plan that fits without it.
    let without = |keep: &dyn Fn(&Candidate) -> bool, what: &str| -> String {
        match candidates.iter().filter(|c| c.fits && keep(c)).min_by_key(|c| time_key(c.relative_time)) {
            None => format!("no plan without {what} fits"),
            Some(c) => format!(
                "faster than the best plan without {what} ({}: time {:.2} instead of {:.2})",
                describe_layout(c),
                c.relative_time,
                chosen.relative_time
            ),
        }
    };
    if chosen.recompute {
        parts.push(format!(
            "activations recomputed segment by segment (train.recompute: the forward pass keeps only each segment's output; one more forward pass, +{:.0} % time) — {}",
            RECOMPUTE_OVERHEAD * 100.0,
            without(&|c| !c.recompute, "recomputation")
        ));
    }
    if chosen.shard {
        let n = input.world_size;
        let blocks = input.state_buffers + input.scratch_buffers + chosen.stage_buffer_count + input.owned_buffers + 1;
        parts.push(format!(
            "optimizer sharded over {n} ranks (train.shard_optimizer: {blocks} parameter-sized buffers kept as blocks of {} per rank; each evaluation all-gathers θ_i and reduce-scatters the gradient instead of one all-reduce, ≈ +{:.0} % time) — {}",
            fmt_bytes(input.params.div_ceil(n) as u64 * F32_BYTES),
            SHARD_OVERHEAD * 100.0,
            without(&|c| !c.shard, "sharding")
        ));
    }
    if let Some(note) = between_steps_note(input, chosen) {
        parts.push(note);
    }
    parts.push(format!("predicted peak {} of {} per rank", fmt_bytes(chosen.peak_bytes), fmt_bytes(input.budget)));
    let mut s = parts.join("; ");
    s.push('.');
    s
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

/// A readable table of the candidates (the chosen row marked `*`) and the reason.
pub fn format_plan(plan: &Plan) -> String {
    use std::fmt::Write;
    let i = &plan.input;
    let mut s = String::new();
    let _ = writeln!(s, "model      {} — {} per parameter-sized buffer", i.model, fmt_bytes(i.param_bytes()));
    if i.configured_policy() == StagePolicy::None {
        let _ = writeln!(s, "optimizer  {} (one gradient per step, no stage buffers)", i.optimizer);
    } else {
        let _ = writeln!(
            s,
            "optimizer  {} ({} stage{}; stage buffers besides k_1: {} resident, {} streaming)",
            i.optimizer,
            i.stages,
            if i.stages == 1 { "" } else { "s" },
            i.resident_stage_buffers,
            i.streaming_stage_buffers
        );
    }
    let _ = writeln!(
        s,
        "buffers    {} parameter-sized: {} replicated, {} optimizer state, {} solver scratch, + stage buffers",
        i.replicated_buffers + i.state_buffers + i.scratch_buffers,
        i.replicated_buffers,
        i.state_buffers,
        i.scratch_buffers
    );
    let ranks = if i.world_size > 1 {
        format!(" over {} ranks → {} per rank", i.world_size, i.per_rank_batch)
    } else {
        String::new()
    };
    let _ = writeln!(
        s,
        "batch      {}{ranks}; activations {} per sample in a micro-batch ({} recomputed), {} held for the whole batch",
        i.global_batch,
        fmt_bytes(i.activations.train_floats as u64 * F32_BYTES),
        fmt_bytes(i.activations.recompute_floats as u64 * F32_BYTES),
        fmt_bytes(i.activations.batch_floats as u64 * F32_BYTES)
    );
    let _ = writeln!(
        s,
        "memory     budget {} per rank; fixed {} (data set in memory + runtime)",
        fmt_bytes(i.budget),
        fmt_bytes(i.fixed_bytes)
    );
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "  {:<15} {:>18} {:>9} {:>6} {:>11} {:>6} {:>5}",
        "stage buffers", "micro-batches", "recompute", "shard", "peak/rank", "time", "fits"
    );
    let yn = |b: bool| if b { "yes" } else { "no" };
    for c in &plan.candidates {
        let mark = if *c == plan.chosen { '*' } else { ' ' };
        let stage = match c.stage_buffers {
            StagePolicy::None => "-".to_string(),
            p => format!("{} ({})", p.label(), c.stage_buffer_count),
        };
        let _ = writeln!(
            s,
            "{mark} {:<15} {:>18} {:>9} {:>6} {:>11} {:>6.2} {:>5}",
            stage,
            format!("{} × {}", c.micro_batches, c.micro_batch),
            yn(c.recompute),
            yn(c.shard),
            fmt_bytes(c.peak_bytes),
            c.relative_time,
            yn(c.fits)
        );
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "* chosen. time: 1.00 = everything resident in one micro-batch; +{:.0} % per extra micro-batch, +{:.0} % with recomputation, +{:.0} % with sharding (estimates).", MICRO_BATCH_OVERHEAD * 100.0, RECOMPUTE_OVERHEAD * 100.0, SHARD_OVERHEAD * 100.0);
    let _ = writeln!(s);
    let _ = writeln!(s, "reason: {}", plan.reason);
    if !plan.overrides.is_empty() {
        let sets: Vec<String> = plan.overrides.iter().map(|o| format!("--set {o}")).collect();
        let _ = writeln!(s, "run it with: {}", sets.join(" "));
    }
    s
}

/// 1536 → "1.5 KiB"; binary units, one decimal below 100.
pub fn fmt_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else if v >= 100.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A budget at least `b`, written so that `parse_bytes` reads it back (rounded up to 0.1 of the
/// unit, no space), for "give --memory X" messages.
fn fmt_bytes_ceil(b: u64) -> String {
    const UNITS: [(&str, u64); 3] = [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    for (name, size) in UNITS {
        if b >= size {
            let tenths = (b as u128 * 10).div_ceil(size as u128);
            if tenths >= 1000 {
                return format!("{}{name}", (b as u128).div_ceil(size as u128));
            }
            return if tenths.is_multiple_of(10) {
                format!("{}{name}", tenths / 10)
            } else {
                format!("{}.{}{name}", tenths / 10, tenths % 10)
            };
        }
    }
    format!("{b}")
}

// ---------------------------------------------------------------------------------------------
// Budget
// ---------------------------------------------------------------------------------------------

/// A byte count: a number with an optional unit, case-insensitive, optional space: "3000000",
/// "512MiB", "2GiB", "1.5GB", "64 kb". Binary units KiB, MiB, GiB, TiB (and the single letters
/// K, M, G, T); decimal units KB, MB, GB, TB; B. Anything else is a config error on `--memory`.
pub fn parse_bytes(s: &str) -> Result<u64> {
    let bad =
        |why: &str| Error::config("--memory", format!("{s:?}: {why}; expected e.g. 2GiB, 512MiB, 1.5GB or 3000000"));
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = (&t[..split], t[split..].trim());
    if num.is_empty() {
        return Err(bad("no number"));
    }
    let value: f64 = num.parse().map_err(|_| bad("not a number"))?;
    let scale: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return Err(bad("unknown unit")),
    };
    let bytes = value * scale as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(bad("too large"));
    }
    let bytes = bytes.round() as u64;
    if bytes == 0 {
        return Err(bad("the budget must be positive"));
    }
    Ok(bytes)
}

/// Memory available for a new process on this machine (the trainer runs on the CPU):
/// `MemAvailable` from /proc/meminfo, or 8 GiB where that cannot be read.
pub fn default_budget() -> u64 {
    std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| mem_available(&s)).unwrap_or(FALLBACK_BUDGET)
}

fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line["MemAvailable:".len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

// ---------------------------------------------------------------------------------------------
// Data set sizes from the IDX headers, and the plan of a config
// ---------------------------------------------------------------------------------------------

/// The sizes of an MNIST-format directory, from the image files' headers alone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DataSizes {
    pub train: usize,
    pub test: usize,
    /// (C, H, W) of one image.
    pub image_shape: [usize; 3],
    pub classes: usize,
    /// Image folders: bytes held per rank instead of the images (file paths and the prefetch
    /// budget; `Dataset::resident_bytes`). None: the images are in memory.
    pub files_resident: Option<u64>,
}

impl DataSizes {
    /// Bytes the trainer holds per rank: the whole training and test sets as bytes with u32
    /// labels (`data.train_subset` truncates without freeing), plus each rank's copy of its test
    /// shard.
    pub fn resident_bytes(&self, world_size: usize) -> u64 {
        if let Some(b) = self.files_resident {
            return b;
        }
        let per_sample = self.image_shape.iter().product::<usize>() as u64 + F32_BYTES;
        let shard = if world_size > 1 { self.test.div_ceil(world_size) as u64 } else { 0 };
        (self.train as u64 + self.test as u64 + shard) * per_sample
    }
}

/// Train/test sizes, image shape and classes of the data set a config names, through its format
/// (`data.format`), without loading it.
pub fn read_data_sizes(data: &DataConfig) -> Result<DataSizes> {
    let kind = match data.format {
        DataFormat::Idx => return read_idx_sizes(&data.dir),
        DataFormat::Cifar10 => CifarKind::Cifar10,
        DataFormat::Cifar100 => CifarKind::Cifar100 { coarse: data.coarse_labels },
        DataFormat::Imagefolder => {
            // Listing the folder is cheap: the data sets hold file names, no pixels.
            let (train, test) = crate::data::load(data)?;
            return Ok(DataSizes {
                train: train.len(),
                test: test.len(),
                image_shape: train.image_shape,
                classes: train.num_classes,
                files_resident: Some(train.resident_bytes() + test.resident_bytes()),
            });
        }
        DataFormat::Imagenet64 => {
            let (train, test, size) = crate::data::imagenet64::sizes(&data.dir)?;
            return Ok(DataSizes {
                train,
                test,
                image_shape: [3, size, size],
                classes: crate::data::imagenet64::NUM_CLASSES,
                files_resident: None,
            });
        }
    };
    let (train, test) = cifar::sizes(&data.dir, kind)?;
    Ok(DataSizes { train, test, image_shape: cifar::IMAGE_SHAPE, classes: kind.num_classes(), files_resident: None })
}

/// Train/test sizes and the image shape of an MNIST-format directory, without loading it.
fn read_idx_sizes(dir: &Path) -> Result<DataSizes> {
    if !dir.is_dir() {
        return Err(Error::data(dir, "data directory not found (data.dir)"));
    }
    let [train, rows, cols] = idx::read_image_dims(&mnist::find(dir, mnist::TRAIN_IMAGES)?)?;
    let [test, ..] = idx::read_image_dims(&mnist::find(dir, mnist::TEST_IMAGES)?)?;
    Ok(DataSizes { train, test, image_shape: [1, rows, cols], classes: mnist::NUM_CLASSES, files_resident: None })
}

/// The plan of a validated config on `world_size` ranks with `budget` bytes per rank: reads the
/// data set's headers, sizes the model, and plans.
pub fn plan_config(cfg: &Config, world_size: usize, budget: u64) -> Result<Plan> {
    let sizes = read_data_sizes(&cfg.data)?;
    let model = crate::model::build(&cfg.model, sizes.image_shape, sizes.classes)?;
    let fixed = sizes.resident_bytes(world_size.max(1)) + RUNTIME_BASELINE_BYTES;
    let mut input =
        PlanInput::from_config(cfg, world_size, budget, fixed, model.as_ref(), sizes.image_shape, sizes.classes)?;
    input.eval_samples = input.eval_samples.min(sizes.test.div_ceil(world_size)).max(1);
    plan(&input)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;
    /// Fashion-MNIST in memory: 60 000 + 10 000 images of 784 bytes and their u32 labels.
    const DATA: u64 = 70_000 * (784 + 4);

    fn cfg(sets: &[&str]) -> Config {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        Config::from_toml_str("", &sets).unwrap()
    }

    fn input(sets: &[&str], world: usize, budget: u64) -> PlanInput {
        let c = cfg(sets);
        let m = crate::model::build(&c.model, [1, 28, 28], 10).unwrap();
        let data =
            DataSizes { train: 60_000, test: 10_000, image_shape: [1, 28, 28], classes: 10, files_resident: None };
        let fixed = data.resident_bytes(world) + RUNTIME_BASELINE_BYTES;
        PlanInput::from_config(&c, world, budget, fixed, m.as_ref(), [1, 28, 28], 10).unwrap()
    }

    #[test]
    fn parse_bytes_units() {
        assert_eq!(parse_bytes("3000000").unwrap(), 3_000_000);
        assert_eq!(parse_bytes("2GiB").unwrap(), 2 * GIB);
        assert_eq!(parse_bytes("2gib").unwrap(), 2 * GIB);
        assert_eq!(parse_bytes("512MiB").unwrap(), 512 * MIB);
        assert_eq!(parse_bytes("512 mib").unwrap(), 512 * MIB);
        assert_eq!(parse_bytes("1.5GB").unwrap(), 1_500_000_000);
        assert_eq!(parse_bytes("1.5gb").unwrap(), 1_500_000_000);
        assert_eq!(parse_bytes("64KB").unwrap(), 64_000);
        assert_eq!(parse_bytes("64k").unwrap(), 65_536);
        assert_eq!(parse_bytes("1T").unwrap(), 1 << 40);
        assert_eq!(parse_bytes(" 100B ").unwrap(), 100);
        assert_eq!(parse_bytes("0.5GiB").unwrap(), GIB / 2);
        for junk in ["", "GiB", "two GiB", "2XB", "1.2.3GB", "-1GiB", "0", "1e3", "99999999999TiB", "2 Gi B"] {
            match parse_bytes(junk) {
                Err(Error::Config { key, .. }) => assert_eq!(key, "--memory", "{junk:?}"),
                other => panic!("{junk:?} → {other:?}"),
            }
        }
        // What `fmt_bytes_ceil` suggests parses back to at least the amount.
        for b in [1, 1023, 1024, 1_500_000, 2 * GIB + 1, 3 * GIB] {
            assert!(parse_bytes(&fmt_bytes_ceil(b)).unwrap() >= b, "{b}");
        }
    }

    #[test]
    fn mem_available_is_read() {
        let m = "MemTotal:       24683520 kB\nMemFree:        20238528 kB\nMemAvailable:   23448752 kB\n";
        assert_eq!(mem_available(m), Some(23_448_752 * 1024));
        assert_eq!(mem_available("MemTotal: 1 kB\n"), None);
        assert!(default_budget() > 0);
    }

    /// The calibration: peak RSS of the default MLP on its native path grew by ≈ 12.3 KiB per
    /// sample (batch 1024 → 8192: 133.6 → 220.0 MiB, sgd, 3 steps).
    #[test]
    fn mlp_activations_match_the_measured_marginal_cost() {
        let model = |kind: &str| {
            crate::model::build(&crate::config::model_config(kind, &[]).unwrap(), [1, 28, 28], 10).unwrap()
        };
        let floats = activation_floats_per_sample(model("mlp").as_ref(), [1, 28, 28], 10);
        let bytes = floats as f64 * 4.0;
        let measured = (220.0 - 133.64) * 1024.0 * 1024.0 / (8192.0 - 1024.0);
        assert!((bytes / measured - 1.0).abs() < 0.1, "{bytes} B/sample predicted, {measured} measured");
        // The saved outputs (1 510), the two gradient buffers (2 × 500) and the batch (794):
        // candle's autograd kept ≈ 9 850 (38.1 KiB measured).
        assert_eq!(floats, 1_510 + 1_000 + 794);
        // Per layer: 4 dense layers; the input layer has no input gradient.
        let p = activation_profile(model("mlp").as_ref(), [1, 28, 28], 10, 2);
        assert_eq!(p.layers.len(), 4);
        assert_eq!(p.batch_floats, 794);
        // Recomputation saves nothing on the native path (it keeps only the layers' outputs,
        // which recomputation would keep too): the planner never picks it for the MLP.
        assert!(p.recompute_floats >= p.train_floats, "{p:?}");
        assert!(p.eval_floats < p.train_floats + p.batch_floats);
        let c = activation_profile(model("cnn").as_ref(), [1, 28, 28], 10, 2);
        assert!(c.recompute_floats > c.train_floats, "{c:?}");
        // The default CNN: measured 827–943 KiB/sample.
        let cnn = activation_floats_per_sample(model("cnn").as_ref(), [1, 28, 28], 10) as f64 * 4.0 / 1024.0;
        assert!((800.0..1000.0).contains(&cnn), "{cnn} KiB/sample");
    }

    #[test]
    fn buffers_follow_the_optimizer() {
        let rk4 = input(&[], 1, GIB);
        assert_eq!((rk4.stages, rk4.resident_stage_buffers, rk4.streaming_stage_buffers), (4, 3, 1));
        assert_eq!((rk4.replicated_buffers, rk4.state_buffers, rk4.scratch_buffers), (4, 0, 2));
        let full = input(
            &["optimizer.preconditioner=modified-adagrad", "optimizer.momentum=0.9", "optimizer.tableau=dopri54"],
            1,
            GIB,
        );
        assert_eq!((full.state_buffers, full.scratch_buffers, full.resident_stage_buffers), (2, 4, 6));
        assert!(full.streaming_stage_buffers < 6);
        let adam = input(&["optimizer.kind=adam", "optimizer.lr=0.001"], 1, GIB);
        assert_eq!((adam.stages, adam.state_buffers, adam.scratch_buffers), (1, 2, 5));
        assert_eq!(plan(&adam).unwrap().chosen.stage_buffers, StagePolicy::None);
        let sgd = input(&["optimizer.kind=sgd"], 1, GIB);
        assert_eq!((sgd.state_buffers, sgd.replicated_buffers), (0, 3));
    }

    #[test]
    fn small_batch_is_one_resident_pass() {
        let i = input(&["optimizer.streaming=false"], 1, 2 * GIB);
        let p = plan(&i).unwrap();
        assert_eq!(p.chosen.stage_buffers, StagePolicy::Resident);
        assert_eq!((p.chosen.micro_batches, p.chosen.micro_batch), (1, 16));
        assert!(p.chosen.fits && !p.chosen.recompute && !p.chosen.shard);
        assert_eq!(p.chosen.relative_time, 1.0);
        assert!(p.overrides.is_empty(), "{:?}", p.overrides);
        assert!(p.reason.contains("resident stage buffers fit"), "{}", p.reason);
        // The default config streams (same arithmetic), also in one pass.
        let p = plan(&input(&[], 1, 2 * GIB)).unwrap();
        assert_eq!((p.chosen.stage_buffers, p.chosen.micro_batches), (StagePolicy::Streaming, 1));
        // The prediction is close to the measured 286 MB at batch 16 with f32 images in memory
        // (runtime baseline included), less the 157 MiB that bytes save: ≈ 129 MB.
        assert!((115 * MIB..170 * MIB).contains(&p.chosen.peak_bytes), "{}", fmt_bytes(p.chosen.peak_bytes));
        let table = format_plan(&p);
        assert!(table.contains("* streaming (1)"), "{table}");
        assert!(table.contains("reason:"), "{table}");
    }

    #[test]
    fn full_batch_in_768_mib_is_micro_batched() {
        let budget = 768 * MIB;
        let i = input(&["train.batch_size=60000"], 1, budget);
        let p = plan(&i).unwrap();
        let c = &p.chosen;
        assert!(c.micro_batches > 1, "{c:?}");
        assert!(c.peak_bytes <= budget);
        assert!(!c.recompute && !c.shard);
        assert_eq!(c.micro_batches, 60_000usize.div_ceil(c.micro_batch));
        // Even split: no micro-batch is much smaller than the others.
        assert!(c.micro_batch * c.micro_batches - 60_000 < c.micro_batches);
        // One pass would not fit.
        assert!(candidate(&i, c.stage_buffers, 60_000, false, false).peak_bytes > budget);
        assert!(p.reason.contains("micro-batches of"), "{}", p.reason);
        assert_eq!(p.overrides, vec![format!("train.micro_batch={}", c.micro_batch)]);
        assert!(format_plan(&p).contains("--set train.micro_batch="));
        // JSON serializes.
        let j = serde_json::to_value(&p).unwrap();
        assert_eq!(j["chosen"]["micro_batch"], c.micro_batch);
        assert_eq!(j["chosen"]["stage_buffers"], "streaming");
    }

    #[test]
    fn tiny_budget_says_what_would_fit() {
        // 250 MiB: the data set and runtime (≈ 113 MiB) leave room for a smaller batch only.
        let i = input(&["train.batch_size=60000"], 1, 250 * MIB);
        let msg = match plan(&i) {
            Err(Error::Plan(m)) => m,
            other => panic!("expected a does-not-fit error, got {:?}", other.map(|p| p.chosen)),
        };
        assert!(msg.contains("per-rank batch 60000"), "{msg}");
        assert!(msg.contains("largest per-rank batch that fits"), "{msg}");
        assert!(msg.contains("--memory"), "{msg}");
        // The suggested batch fits, and one more does not.
        let largest: usize = msg
            .split("fits 250 MiB is ")
            .nth(1)
            .unwrap()
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let mut at = i.clone();
        at.per_rank_batch = largest;
        assert!(plan(&at).is_ok());
        at.per_rank_batch = largest + 1;
        assert!(plan(&at).is_err());
        // The suggested budget fits the batch.
        let suggested = msg.split("give --memory ").nth(1).unwrap().split(' ').next().unwrap();
        let mut more = i.clone();
        more.budget = parse_bytes(suggested).unwrap();
        assert!(plan(&more).is_ok(), "{suggested}");
        // Below the data set itself nothing fits, whatever the batch.
        let msg = plan(&input(&[], 1, 100 * MIB)).unwrap_err().to_string();
        assert!(msg.contains("Not even a per-rank batch of 1 fits"), "{msg}");
    }

    #[test]
    fn only_sharding_fits_on_four_ranks() {
        // A wide MLP with the full RK4 (preconditioner, momentum, resident stages): 12
        // parameter-sized buffers unsharded; sharded, 4 whole and 11 blocks of P/4.
        let sets = [
            "model.hidden=[4000, 4000]",
            "optimizer.preconditioner=modified-adagrad",
            "optimizer.momentum=0.9",
            "optimizer.streaming=false",
            "train.batch_size=256",
        ];
        let probe = input(&sets, 4, GIB);
        let floor = |shard: bool| candidate(&probe, StagePolicy::Streaming, 1, true, shard).peak_bytes;
        let (unsharded, sharded) = (floor(false), floor(true));
        assert!(sharded + 100 * MIB < unsharded, "{} vs {}", fmt_bytes(sharded), fmt_bytes(unsharded));
        // What sharding keeps: 4 whole buffers + 11 blocks of ⌈P/4⌉ instead of 4 + 5 + 3.
        let pb = probe.param_bytes();
        let b = predict(&probe, StagePolicy::Resident, 1, false, true);
        assert_eq!(b.replicated, 4 * pb);
        assert_eq!(b.optimizer, 11 * (probe.params as u64).div_ceil(4) * F32_BYTES);
        let budget = (sharded + unsharded) / 2;
        let p = plan(&input(&sets, 4, budget)).unwrap();
        assert!(p.chosen.shard, "{:?}", p.chosen);
        assert!(p.chosen.peak_bytes <= budget);
        assert!(p.candidates.iter().filter(|c| !c.shard).all(|c| !c.fits));
        assert!(p.overrides.contains(&"train.shard_optimizer=true".to_string()), "{:?}", p.overrides);
        assert!(p.reason.contains("train.shard_optimizer"), "{}", p.reason);
        assert!(p.reason.contains("no plan without sharding fits"), "{}", p.reason);
        let table = format_plan(&p);
        assert!(table.contains("--set train.shard_optimizer=true"), "{table}");
        assert!(!table.contains("not yet executed"), "{table}");
        // With one rank there is nothing to shard: it does not fit.
        assert!(plan(&input(&sets, 1, budget)).is_err());
    }

    #[test]
    fn sharding_is_not_chosen_for_one_saved_micro_batch() {
        // Full batch on 4 ranks: the default rk4's buffers are small next to 15 000 samples'
        // activations. Where sharding just fits one pass, two unsharded micro-batches (1.02)
        // beat it (1.03): sharding costs a little time.
        let sets = ["train.batch_size=60000"];
        let probe = input(&sets, 4, GIB);
        let one_pass = |shard| candidate(&probe, StagePolicy::Streaming, 15_000, false, shard);
        let (unsharded, sharded) = (one_pass(false), one_pass(true));
        assert!(sharded.peak_bytes < unsharded.peak_bytes);
        let p = plan(&input(&sets, 4, sharded.peak_bytes)).unwrap();
        assert!(!p.chosen.shard, "{:?}", p.chosen);
        assert_eq!(p.chosen.micro_batches, 2);
        assert!(p.candidates.iter().any(|c| c.shard && c.fits && c.micro_batches == 1));
        assert_eq!(p.overrides, vec!["train.micro_batch=7500".to_string()]);
        // With a generous budget nothing is sharded, micro-batched or recomputed.
        let p = plan(&input(&sets, 4, 8 * GIB)).unwrap();
        assert!(!p.chosen.shard && !p.chosen.recompute && p.chosen.micro_batches == 1);
        assert!(p.overrides.is_empty(), "{:?}", p.overrides);
    }

    #[test]
    fn recomputation_is_chosen_when_only_it_fits() {
        // A deep stack of equal conv blocks (ten 16-channel 3×3 convs on 224×224), few
        // parameters: one sample's activations outweigh everything else, so micro-batches cannot
        // help, and keeping only the block outputs saves some 40 % of them.
        let layers: Vec<LayerActivation> =
            (0..10).map(|_| crate::model::activation::conv(16, 16, 3, 224 * 224, 224 * 224, 2)).collect();
        let mut probe = input(&["train.batch_size=4", "train.eval_chunk=1"], 1, GIB);
        probe.activations = ActivationProfile::from_layers(layers, 16 * 224 * 224, 10);
        let a = &probe.activations;
        assert!(5 * a.recompute_floats < 3 * a.train_floats, "{a:?}");
        let floor = |recompute| candidate(&probe, StagePolicy::Streaming, 1, recompute, false);
        let (plain, recomputed) = (floor(false), floor(true));
        assert!(recomputed.peak_bytes + 50 * MIB < plain.peak_bytes);
        let mut i = probe.clone();
        i.budget = (plain.peak_bytes + recomputed.peak_bytes) / 2;
        let p = plan(&i).unwrap();
        assert!(p.chosen.recompute && !p.chosen.shard, "{:?}", p.chosen);
        assert!(p.candidates.iter().filter(|c| !c.recompute).all(|c| !c.fits));
        assert!(p.overrides.contains(&"train.recompute=true".to_string()), "{:?}", p.overrides);
        assert!(p.reason.contains("train.recompute"), "{}", p.reason);
        assert!(p.reason.contains("no plan without recomputation fits"), "{}", p.reason);
        assert!(format_plan(&p).contains("--set train.recompute=true"));
        // A model of one segment is never recomputed: same floats, so never chosen.
        let one = ActivationProfile::from_layers(vec![crate::model::activation::dense(784, 10, true, true)], 784, 10);
        assert_eq!(one.recompute_floats, one.train_floats);
    }

    #[test]
    fn overrides_set_exactly_the_knobs_the_plan_decides() {
        // A config that turns everything on, where one resident pass fits: the plan turns the
        // knobs back.
        let on =
            ["optimizer.streaming=false", "train.micro_batch=4", "train.recompute=true", "train.shard_optimizer=true"];
        let p = plan(&input(&on, 1, 2 * GIB)).unwrap();
        assert_eq!((p.chosen.micro_batches, p.chosen.recompute, p.chosen.shard), (1, false, false));
        assert_eq!(p.overrides, ["train.micro_batch=0", "train.recompute=false", "train.shard_optimizer=false"]);
        // The overrides applied give a config the plan leaves alone.
        let sets: Vec<&str> = on.iter().copied().chain(p.overrides.iter().map(String::as_str)).collect();
        assert!(plan(&input(&sets, 1, 2 * GIB)).unwrap().overrides.is_empty());
        // A micro-batch at least the batch is one pass already.
        let p = plan(&input(&["train.micro_batch=64"], 1, 2 * GIB)).unwrap();
        assert!(p.overrides.is_empty(), "{:?}", p.overrides);
        // Micro-batches the config already asks for are not repeated.
        let full = plan(&input(&["train.batch_size=60000"], 1, 768 * MIB)).unwrap();
        assert!(full.chosen.micro_batches > 1);
        let m = format!("train.micro_batch={}", full.chosen.micro_batch);
        let again = plan(&input(&["train.batch_size=60000", &m], 1, 768 * MIB)).unwrap();
        assert!(again.overrides.is_empty(), "{:?}", again.overrides);
    }

    #[test]
    fn peak_grows_with_the_batch_at_a_fixed_plan() {
        let mut i = input(&["train.batch_size=60000"], 1, GIB);
        for &(policy, m, recompute) in &[
            (StagePolicy::Streaming, 1000, false),
            (StagePolicy::Resident, 60_000, false),
            (StagePolicy::Streaming, 50, true),
        ] {
            let mut last = 0;
            for b in [1, 2, 10, 100, 999, 1000, 1001, 5000, 60_000] {
                i.per_rank_batch = b;
                let peak = predict(&i, policy, m, recompute, false).peak();
                assert!(peak >= last, "{policy:?} m={m}: batch {b} → {peak} < {last}");
                last = peak;
            }
        }
        // And with the micro-batch at a fixed batch.
        i.per_rank_batch = 60_000;
        let peaks: Vec<u64> = [1, 10, 1000, 30_000, 60_000]
            .iter()
            .map(|&m| predict(&i, StagePolicy::Streaming, m, false, false).peak())
            .collect();
        assert!(peaks.windows(2).all(|w| w[0] <= w[1]), "{peaks:?}");
    }

    #[test]
    fn streaming_is_chosen_when_resident_does_not_fit() {
        // dopri54 keeps 6 stage buffers resident; streaming far fewer. Give a budget between.
        let sets = ["model.hidden=[4000, 4000]", "optimizer.tableau=dopri54", "optimizer.streaming=false"];
        let i = input(&sets, 1, GIB);
        let floor = |p| candidate(&i, p, 1, false, false).peak_bytes;
        let budget = (floor(StagePolicy::Streaming) + floor(StagePolicy::Resident)) / 2;
        let p = plan(&input(&sets, 1, budget)).unwrap();
        assert_eq!(p.chosen.stage_buffers, StagePolicy::Streaming);
        assert!(!p.chosen.recompute);
        assert!(p.overrides.contains(&"optimizer.streaming=true".to_string()), "{:?}", p.overrides);
    }

    #[test]
    fn data_sizes_from_headers() {
        let dir = tempfile::tempdir().unwrap();
        let header =
            |n: u32, r: u32, c: u32| [0x803u32, n, r, c].iter().flat_map(|w| w.to_be_bytes()).collect::<Vec<u8>>();
        // Train gzip-compressed with a (short) payload, test raw and header-only.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut gz, &header(60_000, 28, 28)).unwrap();
        std::io::Write::write_all(&mut gz, &[0u8; 100]).unwrap();
        std::fs::write(dir.path().join(format!("{}.gz", mnist::TRAIN_IMAGES)), gz.finish().unwrap()).unwrap();
        std::fs::write(dir.path().join(mnist::TEST_IMAGES), header(10_000, 28, 28)).unwrap();
        let s = read_idx_sizes(dir.path()).unwrap();
        assert_eq!(
            s,
            DataSizes { train: 60_000, test: 10_000, image_shape: [1, 28, 28], classes: 10, files_resident: None }
        );
        assert_eq!(s.resident_bytes(1), DATA);
        // A wrong magic and a missing directory are data errors naming the file.
        std::fs::write(dir.path().join(mnist::TEST_IMAGES), [0u8; 16]).unwrap();
        assert!(read_idx_sizes(dir.path()).unwrap_err().to_string().contains(mnist::TEST_IMAGES));
        assert!(read_idx_sizes(&dir.path().join("nope")).is_err());
    }

    #[test]
    fn real_fashion_mnist_plan_if_installed() {
        let c = cfg(&["train.batch_size=60000", "train.eval_chunk=10000"]);
        if !c.data.dir.is_dir() {
            eprintln!("SKIPPED: {} not installed", c.data.dir.display());
            return;
        }
        let p = plan_config(&c, 4, 2 * GIB).unwrap();
        assert_eq!((p.input.params, p.input.per_rank_batch), (898_510, 15_000));
        // One pass fits; sharding (a few MiB of 3.4 MiB buffers) buys nothing and is not chosen.
        assert!(p.chosen.fits && !p.chosen.recompute && !p.chosen.shard, "{:?}", p.chosen);
        assert_eq!(p.chosen.micro_batches, 1);
        assert!(p.overrides.is_empty(), "{:?}", p.overrides);
    }
}
