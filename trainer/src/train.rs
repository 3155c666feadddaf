//! The training loop and the run folder.
//!
//! A run folder holds everything needed to understand, plot and resume a run:
//! - `config.toml`      the resolved configuration (every default written out);
//! - `metrics.jsonl`    one JSON object per logged step (see `MetricsLine`);
//! - `events.out.tfevents.*` the same lines as TensorBoard scalars (`tensorboard_scalars`), one
//!   file per process (`tensorboard`);
//! - `summary.json`     the headline numbers (see `Summary`), rewritten at every evaluation;
//! - `model.safetensors` the final weights, one tensor per layout entry;
//! - `checkpoint-<step>.safetensors` θ plus all optimizer state, for `kutta train --resume`: the
//!   last `train.keep_checkpoints`, each verified by checksums when loaded (`checkpoint`).
//!
//! A run stopped by SIGTERM, SIGINT or SIGUSR1 (`stop`) finishes its step, writes a checkpoint
//! and ends with `summary.json` saying "interrupted"; resuming it ends bit-identical to a run
//! that was never interrupted.
//!
//! Step numbering: `step` in metrics and checkpoints counts completed optimizer steps, so the
//! line with `step = 1` describes the first step; its `train_loss` is the mini-batch loss at the
//! parameters *before* that step (the first stage's loss, which every optimizer gets for free).

use crate::checkpoint::{self, Checkpoint, CheckpointMeta, ResumePoint};
use crate::config::{Config, OptimizerKind, PreconditionerKind, StepSizeKind};
use crate::data::{sampler::BatchSampler, Dataset};
use crate::distributed::{agree, rank_slice, shard_dataset, ParamSharding, ShardedField};
use crate::error::{Error, Result};
use crate::field::VectorField;
use crate::kernels::SolverKernels;
use crate::memory;
use crate::memory::mib;
use crate::model::{self, Model, ModelField};
use crate::optim::baselines::{Adam, Momentum, Sgd};
use crate::optim::rk::{Preconditioner, RkOptions, RkSolver, StepSize};
use crate::optim::{Optimizer, OptimizerState, StepReport};
use crate::stop;
use crate::tensorboard::EventWriter;
use kutta_collectives::Communicator;
use serde::{Deserialize, Serialize};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

pub const METRICS_FILE: &str = "metrics.jsonl";
pub const SUMMARY_FILE: &str = "summary.json";
pub const CONFIG_FILE: &str = "config.toml";
pub const MODEL_FILE: &str = "model.safetensors";

/// One line of `metrics.jsonl` (fields left out when zero or absent read back as such).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct MetricsLine {
    pub step: u64,
    /// Fractional epoch at the start of this step.
    pub epoch: f64,
    pub train_loss: f64,
    /// The step size of this step.
    pub h: f64,
    /// Gradient evaluations since the start of the run (probes and rejected attempts included).
    pub grad_evals: u64,
    /// Wall-clock seconds since the start of the run (across resumes, evaluation included).
    pub wall_s: f64,
    /// Training time since the start of the run (across resumes): the wall clock of the steps
    /// themselves, gathering their batches included, evaluation and checkpoint writes excluded —
    /// AlgoPerf's clock for time-to-target.
    #[serde(default)]
    pub train_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_accuracy: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dalr_v: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_estimate: Option<f64>,
    #[serde(skip_serializing_if = "is_zero")]
    pub rejected: u32,
    #[serde(skip_serializing_if = "is_zero")]
    pub nonfinite_retries: u32,
    /// Peak resident memory of this process (rank 0) so far, MiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_rss_mib: Option<f64>,
    /// The most bytes rank 0 had live on its heap so far, MiB (`memory::heap_peak_bytes`; in
    /// `kutta`, which counts its allocations).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_heap_mib: Option<f64>,
    /// GPU memory in use on rank 0's GPU, the most seen after a backward pass so far, MiB
    /// (`memory::device_used_bytes`); absent on the CPU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_device_mib: Option<f64>,
}

fn is_zero(x: &u32) -> bool {
    *x == 0
}

/// `summary.json`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Summary {
    /// "running", "completed", "interrupted" (by `signal`; continue with --resume) or
    /// "failed: <reason>".
    pub status: String,
    /// The signal an interrupted run stopped for ("SIGTERM", "SIGINT", "SIGUSR1").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    pub steps: u64,
    pub grad_evals: u64,
    pub wall_seconds: f64,
    /// Seconds spent in optimizer steps only (evaluation and I/O excluded), in this process.
    pub step_seconds: f64,
    /// Training time over the whole run, across resumes (`MetricsLine::train_s`).
    #[serde(default)]
    pub train_seconds: f64,
    pub final_test_accuracy: Option<f64>,
    pub final_test_loss: Option<f64>,
    pub best_test_accuracy: Option<f64>,
    /// Mean mini-batch training loss over the last (up to) 100 steps.
    pub final_train_loss: Option<f64>,
    pub optimizer: String,
    pub tableau: Option<String>,
    pub model: String,
    pub params: usize,
    pub batch_size: usize,
    pub train_samples: usize,
    pub test_samples: usize,
    /// Samples per forward/backward pass (`train.micro_batch`; the per-rank batch when 0).
    pub micro_batch: usize,
    /// Activations recomputed in the backward pass (`train.recompute`).
    #[serde(default)]
    pub recompute: bool,
    /// Where rank 0's model ran: "cpu" or "cuda:N".
    #[serde(default)]
    pub device: String,
    /// Where the optimizer's arithmetic and buffers were: "cpu" or "cuda:N" (`train.gpu_solver`).
    #[serde(default)]
    pub solver_device: String,
    /// Ranks the optimizer's buffers are split over (1 = not sharded).
    #[serde(default)]
    pub optimizer_shards: usize,
    /// Peak resident memory of rank 0's process over the run, MiB.
    pub peak_rss_mib: Option<f64>,
    /// The most bytes rank 0 had live on its heap over the run, MiB (absent where the binary does
    /// not count its allocations).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_heap_mib: Option<f64>,
    /// The most GPU memory rank 0's GPU was seen using, MiB (absent on the CPU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_device_mib: Option<f64>,
    /// The threads rank 0's CPU kernels ran on (`threads::current`; `kutta --threads`).
    #[serde(default)]
    pub compute_threads: usize,
}

impl Summary {
    /// When the run stopped because its values became NaN/Inf and the step-halving retries did
    /// not help (a result of its settings, a step too large, which running it again reproduces):
    /// the step it stopped in, 1-based as `status` says it.
    pub fn diverged_in(&self) -> Option<u64> {
        let diverged = self.status.starts_with("failed at step ")
            && self.status.contains(&format!(": {}", Error::NonFinite(String::new())));
        diverged.then_some(self.steps + 1)
    }
}

/// How `train` reports progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// A progress bar on a terminal, plain log lines otherwise.
    Auto,
    Bar,
    Lines,
    /// Nothing (ranks other than 0).
    Off,
}

/// The RK solver's options from a config's `[optimizer]` table.
pub fn rk_options(cfg: &Config) -> Result<RkOptions> {
    let o = &cfg.optimizer;
    let lr = o.lr;
    let step_size = match o.step_size {
        StepSizeKind::Constant => StepSize::Constant { lr },
        StepSizeKind::Cosine => {
            StepSize::Cosine { lr, warmup: o.warmup_steps, total: cfg.train.steps, min_fraction: o.min_lr_fraction }
        }
        StepSizeKind::Dalr => StepSize::Dalr { c: lr, p: o.dalr.p, estimator: o.dalr.estimator, fd_eps: o.dalr.fd_eps },
        StepSizeKind::ErrorControlled => StepSize::ErrorControlled { h0: lr, control: o.error_control },
    };
    let preconditioner = match o.preconditioner {
        PreconditionerKind::None => Preconditioner::None,
        PreconditionerKind::Adagrad => Preconditioner::Adagrad { eps: o.adagrad_eps },
        PreconditionerKind::ModifiedAdagrad => Preconditioner::ModifiedAdagrad,
    };
    Ok(RkOptions {
        tableau: cfg.tableau()?,
        preconditioner,
        step_size,
        momentum: o.momentum,
        streaming: o.streaming,
        nonfinite_retries: o.nonfinite_retries,
    })
}

/// Build the optimizer a config asks for (on the host; `gpu_solver` moves RK onto a GPU).
pub fn build_optimizer(cfg: &Config) -> Result<Box<dyn Optimizer<f32>>> {
    let o = &cfg.optimizer;
    let lr = o.lr;
    Ok(match o.kind {
        OptimizerKind::Rk => Box::new(RkSolver::<f32>::new(rk_options(cfg)?)?),
        kind => {
            let base: Box<dyn Optimizer<f32>> = match kind {
                OptimizerKind::Sgd => Box::new(Sgd::new(lr)),
                OptimizerKind::Momentum => Box::new(Momentum::new(lr, o.momentum, o.nesterov)),
                OptimizerKind::Adam => Box::new(Adam::new(lr, o.beta1, o.beta2, o.eps)),
                OptimizerKind::Adamw => Box::new(Adam::adamw(lr, o.beta1, o.beta2, o.eps, o.weight_decay)),
                OptimizerKind::Nadamw => Box::new(Adam::nadamw(lr, o.beta1, o.beta2, o.eps, o.weight_decay)),
                OptimizerKind::Rk => unreachable!(),
            };
            if o.step_size == StepSizeKind::Cosine {
                Box::new(Scheduled {
                    inner: base,
                    lr,
                    warmup: o.warmup_steps,
                    total: cfg.train.steps,
                    min_fraction: o.min_lr_fraction,
                })
            } else {
                base
            }
        }
    })
}

/// A baseline under a cosine schedule: sets the learning rate before each step.
struct Scheduled {
    inner: Box<dyn Optimizer<f32>>,
    lr: f64,
    warmup: u64,
    total: u64,
    min_fraction: f64,
}

impl Optimizer<f32> for Scheduled {
    fn name(&self) -> String {
        format!("{}+cosine", self.inner.name())
    }
    fn step(&mut self, step: u64, theta: &mut [f32], field: &mut dyn VectorField<f32>) -> Result<StepReport> {
        self.inner.set_lr(crate::optim::step_size::cosine(
            self.lr,
            step,
            self.warmup,
            self.total,
            self.min_fraction,
        ))?;
        self.inner.step(step, theta, field)
    }
    fn state(&self) -> Result<OptimizerState<f32>> {
        self.inner.state()
    }
    fn load_state(&mut self, state: &OptimizerState<f32>) -> Result<()> {
        self.inner.load_state(state)
    }
    fn set_lr(&mut self, lr: f64) -> Result<()> {
        self.lr = lr;
        Ok(())
    }
}

/// The RK kernels on the model's stream when the solver should run on the GPU: the model is on a
/// CUDA device, `train.gpu_solver` is on and the optimizer is not sharded (`why_not` says which
/// did not hold otherwise, for the log). Fails when the kernels do not load.
pub fn solver_kernels(
    cfg: &Config,
    device: &candle_core::Device,
    sharded: bool,
) -> Result<(SolverKernels, Option<&'static str>)> {
    if !device.is_cuda() {
        return Ok((None, None));
    }
    if !cfg.train.gpu_solver {
        return Ok((None, Some("train.gpu_solver = false")));
    }
    if sharded {
        return Ok((None, Some("the sharded optimizer keeps its blocks on the host")));
    }
    let k = crate::kernels::cuda::RkKernels::for_candle(device)?;
    Ok((Some(std::sync::Arc::new(k)), None))
}

/// `build_optimizer`, with RK on the GPU (`optim::gpu::GpuRk`) when `kernels` holds some.
pub fn build_optimizer_on(cfg: &Config, kernels: &SolverKernels) -> Result<Box<dyn Optimizer<f32>>> {
    if let (Some(k), OptimizerKind::Rk) = (kernels, cfg.optimizer.kind) {
        return Ok(Box::new(crate::optim::gpu::GpuRk::new(rk_options(cfg)?, k.clone())?));
    }
    build_optimizer(cfg)
}

/// The GPU solver's parts for a training run (see `solver_kernels`; the baselines keep their
/// arithmetic on the host): the kernels and, with more than one rank, an NCCL communicator
/// joined over `comm` on the model's stream for the gradient all-reduce. Logs which way it went.
fn gpu_solver(
    cfg: &Config,
    device: &candle_core::Device,
    sharded: bool,
    comm: &dyn Communicator,
) -> Result<Option<crate::distributed::GpuParts>> {
    if !device.is_cuda() {
        return Ok(None);
    }
    let (kernels, why_not) = if cfg.optimizer.kind != OptimizerKind::Rk {
        (None, Some("the baselines' arithmetic runs on the host"))
    } else {
        agree(comm, "loading the RK kernels", solver_kernels(cfg, device, sharded))?
    };
    let Some(kernels) = kernels else {
        if comm.is_writer() {
            tracing::info!(
                "model on the GPU, optimizer on the host ({}): θ and each gradient cross to the GPU and back at every evaluation",
                why_not.unwrap_or("?")
            );
        }
        return Ok(None);
    };
    let nccl = if comm.world_size() > 1 {
        let stream = kernels.stream().clone();
        Some(kutta_collectives::NcclComm::joined(comm, stream, comm.collective_timeout())?)
    } else {
        None
    };
    if comm.is_writer() {
        tracing::info!(
            "RK solver on the GPU: θ, stage gradients and optimizer state stay on the device; fused kernels{}",
            if nccl.is_some() { ", NCCL all-reduce" } else { "" }
        );
    }
    Ok(Some(crate::distributed::GpuParts { kernels, nccl }))
}

/// Load the training and test sets a config names, with `train_subset` and `test_subset` applied.
pub fn load_data(cfg: &Config) -> Result<(Dataset, Dataset)> {
    let (mut train, mut test) = crate::data::load(&cfg.data)?;
    if let Some(n) = cfg.data.test_subset {
        if n > test.len() {
            return Err(Error::config(
                "data.test_subset",
                format!("{n} is more than the {} test samples in {}", test.len(), cfg.data.dir.display()),
            ));
        }
        test.truncate(n);
    }
    if let Some(n) = cfg.data.train_subset {
        if n > train.len() {
            return Err(Error::config(
                "data.train_subset",
                format!("{n} is more than the {} training samples in {}", train.len(), cfg.data.dir.display()),
            ));
        }
        train.truncate(n);
    }
    Ok((train, test))
}

pub fn build_model(cfg: &Config, data: &Dataset) -> Result<Box<dyn Model>> {
    model::build(&cfg.model, data.image_shape, data.num_classes)
}

/// The run folder's default location: `runs/<config name>-<unix time>`.
pub fn default_out_dir(config_path: &Path) -> PathBuf {
    let stem = config_path.file_stem().and_then(|s| s.to_str()).unwrap_or("run");
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    PathBuf::from("runs").join(format!("{stem}-{t}"))
}

/// Train from scratch into a new (or empty) run folder `out`. Every rank of `comm` calls this;
/// rank 0 alone writes the run folder.
pub fn train(cfg: &Config, out: &Path, progress: Progress, comm: &dyn Communicator) -> Result<Summary> {
    let prepared = if comm.is_writer() { prepare_run_folder(out) } else { Ok(()) };
    agree(comm, "preparing the run folder", prepared)?;
    Runner { cfg, out: out.to_path_buf(), resume_from: None, comm }.run(progress)
}

fn prepare_run_folder(out: &Path) -> Result<()> {
    if out.exists() && std::fs::read_dir(out).map_err(|e| Error::io(out, e))?.next().is_some() {
        return Err(Error::RunFolder {
            path: out.to_path_buf(),
            msg: format!(
                "already exists and is not empty; pick another --out, or continue it with --resume {}",
                out.display()
            ),
        });
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))
}

/// Continue a run up to `cfg.train.steps` from `path`: a run folder (its newest checkpoint,
/// which must be intact) or one checkpoint file in it (`checkpoint::ResumePoint`).
/// `cfg` is the run's `config.toml` with any `--set` overrides applied; keys that change the
/// trajectory (model, data, batch, seed, optimizer) must match the checkpoint.
/// Every rank reads and verifies the checkpoint (a shared file system, as on any cluster); θ is
/// then broadcast from rank 0 so that all ranks start bit-identical whatever they read.
pub fn resume(cfg: &Config, path: &Path, progress: Progress, comm: &dyn Communicator) -> Result<Summary> {
    let point = agree(comm, "loading the checkpoint", ResumePoint::find(path))?;
    Runner { cfg, out: point.dir.clone(), resume_from: Some(point), comm }.run(progress)
}

/// Read `config.toml` of a run folder and apply overrides.
pub fn load_run_config(dir: &Path, overrides: &[String]) -> Result<Config> {
    let path = dir.join(CONFIG_FILE);
    if !path.is_file() {
        return Err(Error::checkpoint(&path, format!("not found: {} is not a kutta run folder", dir.display())));
    }
    let old = Config::load(&path, &[])?;
    let new = Config::load(&path, overrides)?;
    let fixed: Vec<String> =
        new.changed_keys(&old).into_iter().filter(|k| !crate::config::RESUMABLE_KEYS.contains(&k.as_str())).collect();
    if !fixed.is_empty() {
        return Err(Error::config(
            fixed.join("`, `"),
            format!(
                "cannot change when a run is resumed: it would change the trajectory (--set on resume may change only {}; \
                 start a new run with --config {} instead)",
                crate::config::RESUMABLE_KEYS.join(", "),
                path.display()
            ),
        ));
    }
    Ok(new)
}

struct Runner<'c> {
    cfg: &'c Config,
    out: PathBuf,
    resume_from: Option<ResumePoint>,
    comm: &'c dyn Communicator,
}

impl Runner<'_> {
    fn run(self, progress: Progress) -> Result<Summary> {
        let cfg = self.cfg;
        let out = &self.out;
        let comm = self.comm;
        let writer = comm.is_writer();
        // Data errors are found on every rank before training starts.
        let (train, test) = agree(comm, "loading the data", load_data(cfg))?;
        let model = agree(comm, "building the model", build_model(cfg, &train))?;
        let device = agree(comm, "opening the device", crate::device::for_config(cfg))?;
        let layout = model.layout().clone();
        // The sharded optimizer (SPEC §6): each rank keeps one block of θ and of every optimizer
        // buffer. Nothing to split on one rank.
        let sharding = (cfg.train.shard_optimizer && comm.world_size() > 1)
            .then(|| ParamSharding::new(layout.len(), comm.rank(), comm.world_size()));
        let gpu = gpu_solver(cfg, &device, sharding.is_some(), comm)?;
        let mut opt = build_optimizer_on(cfg, &gpu.as_ref().map(|g| g.kernels.clone()))?;
        let tableau = (cfg.optimizer.kind == OptimizerKind::Rk).then(|| cfg.tableau().map(|t| t.name)).transpose()?;

        let mut summary = Summary {
            status: "running".into(),
            optimizer: opt.name(),
            tableau,
            model: model.describe(),
            params: layout.len(),
            batch_size: cfg.train.batch_size,
            micro_batch: if cfg.train.micro_batch == 0 { cfg.train.batch_size } else { cfg.train.micro_batch },
            recompute: cfg.train.recompute,
            device: crate::device::describe(&device),
            solver_device: if gpu.is_some() { crate::device::describe(&device) } else { "cpu".into() },
            optimizer_shards: sharding.as_ref().map_or(1, |s| s.world),
            train_samples: train.len(),
            test_samples: test.len(),
            compute_threads: crate::threads::current(),
            ..Default::default()
        };

        // θ and the counters: from the checkpoint, the init file, or the seed.
        let (mut theta, mut model_state, start, mut grad_evals, (wall_before, train_before), mut best) = match &self
            .resume_from
        {
            Some(point) => {
                let ck = &point.checkpoint;
                let m = &ck.meta;
                let ckpath = point.file.clone();
                let mismatch = |what: &str, was: String, now: String| {
                    Error::checkpoint(&ckpath, format!("was written with {what} = {was}, the config now says {now}"))
                };
                if m.param_count != layout.len() {
                    return Err(mismatch("a model of P", m.param_count.to_string(), layout.len().to_string()));
                }
                if m.batch_size != cfg.train.batch_size {
                    return Err(mismatch(
                        "train.batch_size",
                        m.batch_size.to_string(),
                        cfg.train.batch_size.to_string(),
                    ));
                }
                if m.seed != cfg.train.seed || m.shuffle != cfg.data.shuffle || m.train_samples != train.len() {
                    return Err(mismatch(
                        "(seed, shuffle, training samples)",
                        format!("({}, {}, {})", m.seed, m.shuffle, m.train_samples),
                        format!("({}, {}, {})", cfg.train.seed, cfg.data.shuffle, train.len()),
                    ));
                }
                if m.optimizer != opt.name() {
                    return Err(mismatch("optimizer", m.optimizer.clone(), opt.name()));
                }
                if m.step >= cfg.train.steps {
                    return Err(Error::RunFolder {
                        path: out.clone(),
                        msg: format!(
                            "the run already has {} of train.steps = {} steps; raise it with --set train.steps=N",
                            m.step, cfg.train.steps
                        ),
                    });
                }
                let state = match &sharding {
                    Some(s) => s.slice_state(&ck.optimizer),
                    None => Ok(ck.optimizer.clone()),
                };
                state.and_then(|st| opt.load_state(&st)).map_err(|e| Error::checkpoint(&ckpath, e.to_string()))?;
                let model_state = ck.model_state();
                if model_state.values.len() != model.state_layout().len() {
                    return Err(mismatch(
                        "a model state of",
                        model_state.values.len().to_string(),
                        model.state_layout().len().to_string(),
                    ));
                }
                (
                    ck.theta.clone(),
                    model_state,
                    m.step,
                    m.grad_evals,
                    (m.wall_seconds, m.train_seconds),
                    m.best_test_accuracy,
                )
            }
            None => {
                let (theta, state) = match &cfg.model.init {
                    Some(p) => agree(comm, "reading model.init", model::load_safetensors(model.as_ref(), p))?,
                    None => {
                        (model::init_params(model.as_ref(), cfg.train.seed), model::ModelState::initial(model.as_ref()))
                    }
                };
                (theta, state, 0, 0, (0.0, 0.0), None)
            }
        };
        // Identical start: rank 0's θ and model state everywhere.
        comm.broadcast(&mut theta, 0)?;
        if !model_state.values.is_empty() {
            comm.broadcast(&mut model_state.values, 0)?;
        }
        if let Some(point) = &self.resume_from {
            let tidied = if writer { tidy_for_resume(point) } else { Ok(()) };
            agree(comm, "tidying the run folder", tidied)?;
        }

        let resumed_from = self.resume_from.as_ref().map(|p| p.file.as_path());
        let files = if writer { Some(open_run_files(cfg, out, start, resumed_from)) } else { None };
        let mut files = agree(comm, "opening the run files", files.transpose())?;
        let test_shard = shard_dataset(&test, comm.rank(), comm.world_size());

        if writer {
            tracing::info!(
                "{} | {} | {} | {} train / {} test samples | batch {} | steps {}..{} | run folder {}",
                summary.model,
                summary.optimizer,
                summary.device,
                train.len(),
                test.len(),
                cfg.train.batch_size,
                start,
                cfg.train.steps,
                out.display()
            );
            if comm.world_size() > 1 {
                tracing::info!("data parallel over {} ranks ({} back end)", comm.world_size(), comm.name());
            }
        }

        check_batch_groups(model.as_ref(), cfg, comm.world_size())?;
        let mut sampler = BatchSampler::new(train.len(), cfg.train.batch_size, cfg.train.seed, cfg.data.shuffle);
        let mut inner = ModelField::new(model.as_ref(), &train);
        inner.set_micro_batch(cfg.train.micro_batch);
        inner.set_recompute(cfg.train.recompute);
        inner.set_label_smoothing(cfg.train.label_smoothing);
        inner.set_dtype(cfg.model.dtype.dtype());
        inner.set_augment(cfg.data.augment, cfg.train.seed);
        inner.set_device(device.clone());
        // Image folders: this rank's samples of the coming steps are decoded ahead on the
        // folder's worker threads (`data::prefetch`), planned with the sampler and the rank's
        // slice exactly as the loop below gathers them. Stops when dropped (end of `run`).
        let (rank, world) = (comm.rank(), comm.world_size());
        let mut plan_sampler = sampler.clone();
        let plan = Box::new(move |step| rank_slice(&plan_sampler.batch(step), rank, world).to_vec());
        let _prefetch = train.start_prefetch(plan, start, cfg.train.steps, cfg.data.augment, cfg.train.seed);
        let mut field = ShardedField::new(inner, comm);
        field.set_l2(cfg.optimizer.l2, &layout)?;
        if let Some(g) = gpu {
            field.use_gpu(g)?;
        }
        // With a sharded optimizer the optimizer's θ is this rank's block; the field keeps the
        // whole vector the model needs.
        let mut theta = match &sharding {
            None => theta,
            Some(s) => {
                if writer {
                    tracing::info!(
                        "optimizer sharded over {} ranks: {} of {} parameters per rank",
                        s.world,
                        s.block,
                        s.params
                    );
                }
                field.shard_optimizer(s.clone());
                theta[s.own()].to_vec()
            }
        };
        let t0 = Instant::now();
        let mut step_seconds = 0.0;
        let mut train_seconds = train_before;
        let mut recent_losses: std::collections::VecDeque<f64> = Default::default();
        let bar = ProgressReporter::new(if writer { progress } else { Progress::Off }, start, cfg.train.steps);
        let tc = &cfg.train;

        for step in start..tc.steps {
            let done = step + 1;
            let tb = Instant::now();
            let batch = sampler.batch(step);
            // Gathering (and, for image folders, waiting for decodes) stays outside the step time.
            let gathered = field.set_global_batch(step, &batch);
            let ts = Instant::now();
            let report = match gathered.and_then(|()| opt.step(step, &mut theta, &mut field)) {
                Ok(r) => r,
                Err(e) => {
                    bar.finish();
                    summary.status = format!("failed at step {done}: {e}");
                    summary.steps = step;
                    summary.grad_evals = grad_evals;
                    summary.wall_seconds = wall_before + t0.elapsed().as_secs_f64();
                    if writer {
                        write_json(&out.join(SUMMARY_FILE), &summary)?;
                    }
                    return Err(e.advise(format!("; the run stopped ({})", last_checkpoint_note(out))));
                }
            };
            // The running statistics take the accepted step's batch statistics (recorded by its
            // first evaluation, at θ_n), summed over the ranks: once per step.
            field.update_model_state(&mut model_state, model.state_momentum())?;
            step_seconds += ts.elapsed().as_secs_f64();
            train_seconds += tb.elapsed().as_secs_f64();
            // A stop signal on any rank stops every rank after this same step (`stop::agree`).
            // A signal during the last step changes nothing: the run is complete.
            let stop_for = stop::agree(comm)?.filter(|_| done < tc.steps);
            grad_evals += report.grad_evals;
            recent_losses.push_back(report.loss);
            if recent_losses.len() > 100 {
                recent_losses.pop_front();
            }

            let last = done == tc.steps;
            let eval_now = last || (tc.eval_every > 0 && done % tc.eval_every == 0);
            let checkpoint_now =
                last || stop_for.is_some() || (tc.checkpoint_every > 0 && done.is_multiple_of(tc.checkpoint_every));
            if eval_now || checkpoint_now {
                // θ (and the state) to the host, for a solver that keeps them on a GPU.
                opt.sync_theta(&mut theta)?;
            }
            let mut line = MetricsLine {
                step: done,
                epoch: sampler.epoch(step),
                train_loss: report.loss,
                h: report.h,
                grad_evals,
                wall_s: 0.0,
                train_s: train_seconds,
                dalr_v: report.dalr_v,
                error_estimate: report.error_estimate,
                rejected: report.rejected,
                nonfinite_retries: report.nonfinite_retries,
                ..Default::default()
            };
            if eval_now {
                // The native path's activation buffers are not needed until the next step: the
                // evaluation pass gets their memory (the planner counts them apart).
                field.release_workspace();
                let full = field.full_params(&theta)?;
                let (loss, acc) = evaluate_sharded(
                    model.as_ref(),
                    full,
                    &model_state,
                    &test_shard,
                    test.len(),
                    tc.eval_chunk,
                    (&device, cfg.model.dtype.dtype()),
                    comm,
                )?;
                line.test_loss = Some(loss);
                line.test_accuracy = Some(acc);
                best = Some(best.map_or(acc, |b: f64| b.max(acc)));
                summary.final_test_accuracy = Some(acc);
                summary.final_test_loss = Some(loss);
            }
            line.wall_s = wall_before + t0.elapsed().as_secs_f64();
            line.peak_rss_mib = memory::peak_rss_bytes().map(mib);
            summary.peak_rss_mib = line.peak_rss_mib;
            line.peak_heap_mib = memory::heap_peak_bytes().map(mib);
            summary.peak_heap_mib = line.peak_heap_mib;
            line.peak_device_mib = Some(field.peak_device_bytes()).filter(|&b| b > 0).map(mib);
            summary.peak_device_mib = line.peak_device_mib;
            if let Some(files) = files.as_mut().filter(|_| {
                eval_now
                    || last
                    || done.is_multiple_of(tc.log_every)
                    || report.rejected > 0
                    || report.nonfinite_retries > 0
            }) {
                files.log(&line)?;
            }
            bar.update(&line, eval_now);

            summary.steps = done;
            summary.grad_evals = grad_evals;
            summary.wall_seconds = line.wall_s;
            summary.step_seconds = step_seconds;
            summary.train_seconds = train_seconds;
            summary.best_test_accuracy = best;
            summary.final_train_loss = Some(recent_losses.iter().sum::<f64>() / recent_losses.len() as f64);
            if last {
                summary.status = "completed".into();
            }
            // A sharded optimizer's θ and state are gathered on every rank; rank 0 writes them.
            let gathered = match &sharding {
                Some(s) if checkpoint_now => {
                    Some((field.full_params(&theta)?.to_vec(), s.gather_state(comm, opt.state()?)?))
                }
                _ => None,
            };
            if let Some(sig) = stop_for {
                summary.status = "interrupted".into();
                summary.signal = Some(stop::name(sig).into());
            }
            let Some(files) = files.as_mut() else {
                match stop_for {
                    Some(_) => break,
                    None => continue,
                }
            };
            if eval_now {
                files.flush()?;
                write_json(&out.join(SUMMARY_FILE), &summary)?;
            }
            if checkpoint_now {
                files.sync()?;
                let meta = CheckpointMeta {
                    format_version: 0,
                    step: done,
                    grad_evals,
                    wall_seconds: line.wall_s,
                    train_seconds,
                    best_test_accuracy: best,
                    optimizer: opt.name(),
                    param_count: layout.len(),
                    seed: tc.seed,
                    batch_size: tc.batch_size,
                    shuffle: cfg.data.shuffle,
                    train_samples: train.len(),
                    optimizer_scalars: Default::default(),
                    model_state_updates: 0,
                };
                let (full, state) = match gathered {
                    Some(g) => g,
                    None => (theta.clone(), opt.state()?),
                };
                let path = out.join(checkpoint::file_name(done));
                if let Err(e) = Checkpoint::new(meta, full, state).with_model_state(&model_state).save(&path) {
                    bar.finish();
                    let e = e
                        .context(format!("checkpoint of step {done} not written"))
                        .advise(format!("; the run stopped ({})", last_checkpoint_note(out)));
                    summary.status = format!("failed: {e}");
                    // Best effort: the disk may be what failed.
                    let _ = write_json(&out.join(SUMMARY_FILE), &summary);
                    return Err(e);
                }
                for old in checkpoint::prune(out, tc.keep_checkpoints)? {
                    tracing::debug!("removed {} (train.keep_checkpoints = {})", old.display(), tc.keep_checkpoints);
                }
            }
            if let Some(sig) = stop_for {
                bar.finish();
                files.flush()?;
                write_json(&out.join(SUMMARY_FILE), &summary)?;
                tracing::info!(
                    "interrupted by {} after step {done} of {}: checkpoint {} written; continue with: kutta train --resume {}{}",
                    stop::name(sig),
                    tc.steps,
                    out.join(checkpoint::file_name(done)).display(),
                    out.display(),
                    if comm.world_size() > 1 { " (on any number of ranks)" } else { "" }
                );
                break;
            }
        }
        bar.finish();
        if summary.status == "interrupted" {
            // No rank leaves before rank 0 has written the checkpoint: a launcher that sees one
            // rank exit with a non-zero status (128 + signal) ends the others at once.
            comm.barrier()?;
            return Ok(summary);
        }
        opt.sync_theta(&mut theta)?;
        let theta = field.full_params(&theta)?;
        if !writer {
            return Ok(summary);
        }
        model::save_safetensors(model.as_ref(), theta, &model_state, &out.join(MODEL_FILE))?;
        write_json(&out.join(SUMMARY_FILE), &summary)?;
        tracing::info!(
            "done: {} steps, {} gradient evaluations, {:.1} s; test accuracy {} (best {}); results in {}",
            summary.steps,
            summary.grad_evals,
            summary.wall_seconds,
            pct(summary.final_test_accuracy),
            pct(summary.best_test_accuracy),
            out.display()
        );
        Ok(summary)
    }
}

/// Batch norm normalises over ghost batches of `model.bn_group` samples (`Model::batch_multiple`):
/// every rank's slice of the global batch, and its micro-batches, must be whole groups, so that
/// the trajectory does not depend on the number of ranks or micro-batches. An error otherwise,
/// naming the sizes that would work.
pub fn check_batch_groups(model: &dyn Model, cfg: &Config, world: usize) -> Result<()> {
    let g = model.batch_multiple();
    if g <= 1 {
        return Ok(());
    }
    let (batch, micro) = (cfg.train.batch_size, cfg.train.micro_batch);
    let ranks = if world > 1 { format!(" over {world} ranks") } else { String::new() };
    if batch % (g * world) != 0 {
        let lower = batch / (g * world) * g * world;
        let sizes = [lower, lower + g * world]
            .iter()
            .filter(|&&b| b > 0)
            .map(|b| b.to_string())
            .collect::<Vec<_>>()
            .join(" or ");
        let groups: Vec<String> = (1..=g.min(batch / world.max(1)).max(1))
            .filter(|d| batch % (d * world) == 0)
            .map(|d| d.to_string())
            .collect();
        return Err(Error::config(
            "model.bn_group",
            format!(
                "batch norm normalises over groups of {g} samples, so train.batch_size{ranks} must be a multiple of {}                  ({batch} is not; {sizes} would work), or set model.bn_group to a divisor of the per-rank batch ({} would work)",
                g * world,
                groups.join(", ")
            ),
        ));
    }
    if micro > 0 && micro < batch / world && micro % g != 0 {
        let lower = (micro / g).max(1) * g;
        return Err(Error::config(
            "train.micro_batch",
            format!(
                "{micro} is not a multiple of model.bn_group = {g} (batch norm's group); {lower} or {} would work",
                lower + g
            ),
        ));
    }
    Ok(())
}

/// Where the run can continue from, for the message of a run that stopped on an error.
fn last_checkpoint_note(out: &Path) -> String {
    match checkpoint::list(out).ok().and_then(|l| l.into_iter().next()) {
        Some(p) => format!("the last good checkpoint {} is intact", p.display()),
        None => "no checkpoint had been written yet".to_string(),
    }
}

/// Before a resumed run writes anything: remove the temporary files a killed process left, and
/// set aside the checkpoints newer than the one it continues from (the run will write its own
/// for those steps), renamed `<name>.damaged` or `<name>.superseded` (`.1`, `.2`, … after that
/// when the name is taken), never deleted or written over.
fn tidy_for_resume(point: &ResumePoint) -> Result<()> {
    for p in checkpoint::remove_partial_writes(&point.dir) {
        tracing::info!("removed {}, a partial write left by a process that was killed while writing it", p.display());
    }
    for p in &point.newer {
        let why = if Checkpoint::load(p).is_ok() { "superseded" } else { "damaged" };
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("checkpoint");
        let aside = std::iter::once(format!("{name}.{why}"))
            .chain((1..).map(|k| format!("{name}.{why}.{k}")))
            .map(|n| p.with_file_name(n))
            .find(|q| !q.exists())
            .expect("an unbounded sequence of names");
        std::fs::rename(p, &aside).map_err(|e| Error::io(p, e))?;
        tracing::warn!(
            "{} is newer than the checkpoint this run continues from; set aside as {}",
            p.display(),
            aside.display()
        );
    }
    Ok(())
}

/// Rank 0's run files: the resolved config (written here), metrics.jsonl opened for appending (cut
/// back to the checkpoint's step when resuming) and a new TensorBoard event file.
fn open_run_files(cfg: &Config, out: &Path, start: u64, resumed_from: Option<&Path>) -> Result<RunFiles> {
    std::fs::write(out.join(CONFIG_FILE), cfg.to_toml()).map_err(|e| Error::io(out.join(CONFIG_FILE), e))?;
    let metrics_path = out.join(METRICS_FILE);
    if start > 0 {
        truncate_metrics(&metrics_path, start)?;
    }
    let metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .map_err(|e| Error::io(&metrics_path, e))?;
    let mut events = EventWriter::create(out)?;
    // At the first step this process runs: TensorBoard keeps the earlier files' events before it
    // (the checkpoint's step included, as metrics.jsonl does) and forgets those from it on.
    let msg = match resumed_from {
        Some(p) => format!("kutta train --resume: continues after step {start} from {}", p.display()),
        None => "kutta train".to_string(),
    };
    events.session_start(start + 1, resumed_from, &msg)?;
    events.flush()?;
    Ok(RunFiles { metrics, metrics_path, events })
}

/// Rank 0's logs of the steps: `metrics.jsonl` and the TensorBoard event file.
struct RunFiles {
    metrics: std::fs::File,
    metrics_path: PathBuf,
    events: EventWriter,
}

impl RunFiles {
    /// A metrics line (written through) and its scalars (buffered until `flush`).
    fn log(&mut self, line: &MetricsLine) -> Result<()> {
        let s = serde_json::to_string(line).expect("metrics serialize");
        writeln!(self.metrics, "{s}").map_err(|e| Error::io(&self.metrics_path, e))?;
        self.events.scalars(line.step, &tensorboard_scalars(line))
    }

    fn flush(&mut self) -> Result<()> {
        self.metrics.flush().map_err(|e| Error::io(&self.metrics_path, e))?;
        self.events.flush()
    }

    /// `flush`, and both files' data to the disk (before a checkpoint is written).
    fn sync(&mut self) -> Result<()> {
        self.metrics.sync_data().map_err(|e| Error::io(&self.metrics_path, e))?;
        self.events.sync()
    }
}

/// A metrics line as TensorBoard scalars: tag and value, those of the optional fields present.
pub fn tensorboard_scalars(line: &MetricsLine) -> Vec<(&'static str, f64)> {
    let mut v = vec![
        ("train/loss", line.train_loss),
        ("train/h", line.h),
        ("train/grad_evals", line.grad_evals as f64),
        ("train/epoch", line.epoch),
        ("time/wall_s", line.wall_s),
        ("time/train_s", line.train_s),
    ];
    let optional = [
        ("test/accuracy", line.test_accuracy),
        ("test/loss", line.test_loss),
        ("dalr/v", line.dalr_v),
        ("error_control/estimate", line.error_estimate),
        ("memory/peak_rss_mib", line.peak_rss_mib),
        ("memory/peak_heap_mib", line.peak_heap_mib),
        ("memory/peak_device_mib", line.peak_device_mib),
    ];
    v.extend(optional.into_iter().filter_map(|(tag, x)| x.map(|x| (tag, x))));
    v
}

/// Test loss and accuracy over the whole test set, each rank evaluating its shard.
#[allow(clippy::too_many_arguments)]
fn evaluate_sharded(
    model: &dyn Model,
    theta: &[f32],
    state: &model::ModelState,
    shard: &Dataset,
    total: usize,
    chunk: usize,
    (device, dtype): (&candle_core::Device, candle_core::DType),
    comm: &dyn Communicator,
) -> Result<(f64, f64)> {
    let local = if shard.is_empty() {
        Ok((0.0, 0.0))
    } else {
        model::evaluate_in(model, theta, state, shard, chunk, device, dtype).map(|(loss, acc)| {
            let n = shard.len() as f64;
            (loss * n, (acc * n).round())
        })
    };
    // An error on one rank (an image file that does not decode) stops every rank here rather
    // than leaving the others in the sums below.
    let (loss_sum, correct) = agree(comm, "evaluating the test set", local)?;
    let loss_sum = comm.all_reduce_sum_f64(loss_sum)?;
    let correct = comm.all_reduce_sum_f64(correct)?;
    Ok((loss_sum / total as f64, correct / total as f64))
}

/// An accuracy as a percentage with two decimals, "n/a" when absent (logs, `kutta study`).
pub fn pct(x: Option<f64>) -> String {
    x.map_or("n/a".into(), |a| format!("{:.2} %", 100.0 * a))
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut s = serde_json::to_string_pretty(value).expect("serializes");
    s.push('\n');
    crate::integrity::write_atomic(path, s.as_bytes())
}

/// Drop metrics lines past the checkpoint's step: a run that died after its last checkpoint
/// logged steps that the resumed run will log again.
fn truncate_metrics(path: &Path, keep_through: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    let mut kept = String::new();
    for l in text.lines() {
        let step =
            serde_json::from_str::<serde_json::Value>(l).ok().and_then(|v| v.get("step").and_then(|s| s.as_u64()));
        if matches!(step, Some(s) if s <= keep_through) {
            kept.push_str(l);
            kept.push('\n');
        }
    }
    crate::integrity::write_atomic(path, kept.as_bytes())
}

/// A progress bar on a terminal, plain log lines (about 20 per run, plus evaluations) otherwise.
struct ProgressReporter {
    bar: Option<indicatif::ProgressBar>,
    every: u64,
    off: bool,
}

impl ProgressReporter {
    fn new(mode: Progress, start: u64, total: u64) -> Self {
        let use_bar = match mode {
            Progress::Bar => true,
            Progress::Lines | Progress::Off => false,
            Progress::Auto => std::io::stderr().is_terminal(),
        };
        let bar = use_bar.then(|| {
            let b = indicatif::ProgressBar::new(total);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} steps [{elapsed_precise}<{eta_precise}] {msg}",
                )
                .expect("valid template"),
            );
            b.set_position(start);
            b
        });
        Self { bar, every: ((total - start) / 20).max(1), off: mode == Progress::Off }
    }

    fn update(&self, line: &MetricsLine, evaluated: bool) {
        if self.off {
            return;
        }
        let acc = line.test_accuracy.map(|a| format!(" test_acc {:.2} %", 100.0 * a)).unwrap_or_default();
        match &self.bar {
            Some(b) => {
                b.set_position(line.step);
                if evaluated || line.step.is_multiple_of(10) {
                    b.set_message(format!("loss {:.4} h {:.3e}{acc}", line.train_loss, line.h));
                }
                if evaluated {
                    b.println(format!("step {} test_loss {:.4}{acc}", line.step, line.test_loss.unwrap_or(f64::NAN)));
                }
            }
            None => {
                if evaluated || line.step.is_multiple_of(self.every) {
                    tracing::info!(
                        "step {} epoch {:.2} loss {:.4} h {:.3e} grad_evals {} {:.1}s{}",
                        line.step,
                        line.epoch,
                        line.train_loss,
                        line.h,
                        line.grad_evals,
                        line.wall_s,
                        acc
                    );
                }
            }
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::field::DiagonalQuadratic;

    /// `optimizer.l2` = λ adds ½·λ·Σθ² over the tensors of rank ≥ 2 to the loss and λ·θ to their
    /// gradients, and leaves the biases (rank 1) alone: the evaluation with the penalty against
    /// the one without, on the same batch, for an MLP (weights and biases) and a ResNet (conv
    /// kernels of rank 4, batch-norm scales and shifts of rank 1).
    #[test]
    fn l2_penalty_is_on_tensors_of_rank_two_and_more() {
        use crate::field::VectorField;
        let data = Dataset::random(16, [1, 6, 6], 3, 1);
        let lambda = 0.1;
        for sets in [&["model.hidden=[8, 8]"][..], &["model.kind=resnet18", "model.width=2", "model.bn_group=4"]] {
            let c = cfg(&[sets, &["train.batch_size=8"]].concat());
            let model = build_model(&c, &data).unwrap();
            let theta = model::init_params(model.as_ref(), 0);
            let comm = kutta_collectives::SingleProcess;
            let eval = |l2: f64| {
                let mut field = ShardedField::new(ModelField::new(model.as_ref(), &data), &comm);
                field.set_l2(l2, model.layout()).unwrap();
                field.set_global_batch(0, &[0, 1, 2, 3, 4, 5, 6, 7]).unwrap();
                let mut g = vec![0.0; theta.len()];
                let loss = VectorField::<f32>::eval(&mut field, &theta, &mut g).unwrap();
                (loss, g)
            };
            let ((l0, g0), (l1, g1)) = (eval(0.0), eval(lambda));
            let (mut penalty, mut ranks) = (0.0, std::collections::BTreeSet::new());
            for p in &model.layout().params {
                let weight = p.shape.len() >= 2;
                ranks.insert(p.shape.len());
                for i in p.range() {
                    let want = if weight { lambda as f32 * theta[i] } else { 0.0 };
                    let got = g1[i] - g0[i];
                    assert!(
                        (got - want).abs() <= 1e-6 * (1.0 + want.abs()),
                        "{sets:?} {} [{i}]: {got} vs {want}",
                        p.name
                    );
                    if weight {
                        penalty += 0.5 * lambda * (theta[i] as f64).powi(2);
                    }
                }
            }
            assert!(ranks.contains(&1) && ranks.len() >= 2, "{sets:?}: tensors of ranks {ranks:?}");
            assert!(penalty > 1e-3, "{sets:?}");
            assert!((l1 - l0 - penalty).abs() <= 1e-9 * penalty.max(1.0), "{sets:?}: {} vs {penalty}", l1 - l0);
        }
    }

    /// `Summary::diverged_in` reads the status the training loop writes for a non-finite failure.
    #[test]
    fn a_non_finite_failure_is_a_divergence() {
        let status = |e: Error| format!("failed at step 12: {e}");
        let mut s = Summary { status: "completed".into(), steps: 11, ..Default::default() };
        assert_eq!(s.diverged_in(), None);
        s.status = status(Error::NonFinite("step 11: a stage gradient became NaN/Inf".into()));
        assert_eq!(s.diverged_in(), Some(12));
        s.status = status(Error::Internal("a bug".into()));
        assert_eq!(s.diverged_in(), None);
    }

    fn cfg(sets: &[&str]) -> Config {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        Config::from_toml_str("", &sets).unwrap()
    }

    #[test]
    fn every_optimizer_kind_builds_and_steps() {
        for kind in ["rk", "sgd", "momentum", "adam", "adamw", "nadamw"] {
            let mut opt = build_optimizer(&cfg(&[&format!("optimizer.kind={kind}")])).unwrap();
            let mut f = DiagonalQuadratic::new(vec![1.0, 2.0]);
            let mut th = vec![1.0f32, -1.0];
            let r = opt.step(0, &mut th, &mut f).unwrap();
            assert!(th[0] < 1.0 && th[1] > -1.0, "{kind} did not descend: {th:?}");
            assert_eq!(r.grad_evals, if kind == "rk" { 4 } else { 1 });
        }
    }

    #[test]
    fn cosine_schedule_drives_baselines_and_rk() {
        for kind in ["sgd", "rk"] {
            let c = cfg(&[
                &format!("optimizer.kind={kind}"),
                "optimizer.step_size=cosine",
                "optimizer.lr=0.1",
                "optimizer.warmup_steps=2",
                "train.steps=12",
            ]);
            let mut opt = build_optimizer(&c).unwrap();
            let mut f = DiagonalQuadratic::new(vec![1.0]);
            let mut th = vec![1.0f32];
            let hs: Vec<f64> = (0..12).map(|n| opt.step(n, &mut th, &mut f).unwrap().h).collect();
            for (n, h) in hs.iter().enumerate() {
                let want = crate::optim::step_size::cosine(0.1, n as u64, 2, 12, 0.0);
                assert!((h - want).abs() < 1e-12, "{kind} step {n}: h {h} vs {want}");
            }
        }
    }

    /// The running statistics are updated exactly once per accepted step, from the step's first
    /// evaluation, although the field is evaluated many times per step (RK stages, DALR probes,
    /// error-controlled rejections) — and the update equals the statistics of the batch at θ_n.
    #[test]
    fn model_state_is_updated_once_per_step_from_the_first_evaluation() {
        use crate::model::{BatchStats, ModelState};
        let data = Dataset::random(16, [1, 6, 6], 3, 1);
        let sets = ["model.kind=resnet18", "model.width=2", "model.bn_group=4", "train.batch_size=8"];
        for extra in [
            &["optimizer.kind=rk"][..],
            &["optimizer.step_size=dalr", "optimizer.dalr.estimator=finite-difference"],
            &["optimizer.tableau=dopri54", "optimizer.step_size=error-controlled", "optimizer.lr=2.0"],
            &["optimizer.kind=adam"],
        ] {
            let c = cfg(&[&sets[..], extra].concat());
            let model = build_model(&c, &data).unwrap();
            let mut theta = model::init_params(model.as_ref(), 0);
            let mut state = ModelState::initial(model.as_ref());
            let comm = kutta_collectives::SingleProcess;
            let mut inner = ModelField::new(model.as_ref(), &data);
            // What the first evaluation at θ_0 records, computed apart.
            inner.set_batch(&[0, 1, 2, 3, 4, 5, 6, 7], 8);
            let mut g = vec![0.0; theta.len()];
            inner.eval(&theta, &mut g).unwrap();
            let first: BatchStats = inner.take_batch_stats().unwrap();
            assert_eq!(first.groups, 2);
            let mut expect = state.clone();
            expect.update(&first, 0.1).unwrap();
            let before = inner.stat_captures();
            let mut field = ShardedField::new(inner, &comm);
            let mut opt = build_optimizer(&c).unwrap();
            let mut evals = 0;
            for step in 0..3u64 {
                field.set_global_batch(step, &[0, 1, 2, 3, 4, 5, 6, 7]).unwrap();
                evals += opt.step(step, &mut theta, &mut field).unwrap().grad_evals;
                field.update_model_state(&mut state, model.state_momentum()).unwrap();
                if step == 0 {
                    assert_eq!(state, expect, "{extra:?}: the first update is not from θ_0's statistics");
                }
            }
            assert_eq!(state.updates, 3, "{extra:?}");
            assert_eq!(field.stat_captures() - before, 3, "{extra:?}: {evals} evaluations");
            if extra[0] != "optimizer.kind=adam" {
                assert!(evals > 3 * 2, "{extra:?}: only {evals} evaluations");
            }
        }
    }
}
