//! `kutta bench collectives`: what data parallelism costs on this machine, measured through the
//! same `mpirun` path and the same `Communicator` the trainer uses.
//!
//! 1. All-reduce latency and bandwidth against buffer size (f32 sums of 4 B … 64 MiB) on every
//!    multi-rank job: per size one untimed warm-up, then repetitions, each after a barrier, until
//!    at least `min_reps` and `min_seconds` (fewer repetitions only when one size is slow, see
//!    `SLOW_CELL_SECONDS`). A repetition's time is the mean over ranks of each rank's own time;
//!    the table shows the median over repetitions. Bandwidths follow the NCCL-tests convention
//!    (`bandwidths`): algorithm bandwidth = bytes / time, bus bandwidth = algbw · 2(n−1)/n.
//! 2. Weak scaling of rk4 steps: `per_rank_batch` samples per rank, global batch = that × ranks,
//!    one compute thread per rank, median step time on 1, 2, … ranks (each job times its steps
//!    for `STEP_SECONDS_FACTOR` × `min_seconds` and `min_reps`, after one warm-up step, with a
//!    barrier before each) and efficiency t₁ / t_N (1.0 is ideal). `TimedComm` adds up the time spent inside the all-reduces of
//!    `ShardedField` (the gradient buffer and the loss), so the table also shows the share of a
//!    step spent there — waiting for the slower rank included.
//!
//! The user's process is the driver (`run`): it never joins an MPI world itself; it starts child
//! jobs (`mpirun -np N kutta bench collectives --worker …`, through the binary's
//! `mpirun_command`), in the order 1, 2, …, max and back again (steps only on the way back), so a
//! slow drift of the machine's speed falls on every rank count alike. Each job's rank 0 prints one
//! JSON line (`WorkerReport`) on stdout; `run` pools the step times of both jobs of a rank count
//! and builds a `CollectivesReport`.
//!
//! Threads: candle-core 0.11 sizes its CPU thread pool and its gemm parallelism from
//! `RAYON_NUM_THREADS` (`candle_core::utils::get_num_threads`), and its barrier pool from
//! `CANDLE_NUM_THREADS` (falling back to the former); `CHILD_ENV` sets both (and
//! `OMP_NUM_THREADS`, for any BLAS) to 1 in the children, and each rank reports what candle
//! actually uses.

use super::steps::{bench_data, machine_description, median, variant_config};
use super::CollectivesArgs;
use anyhow::{anyhow, Context, Result};
use kutta_collectives::Communicator;
use kutta_trainer::config::Config;
use kutta_trainer::data::sampler::BatchSampler;
use kutta_trainer::distributed::ShardedField;
use kutta_trainer::field::VectorField;
use kutta_trainer::model::{self, ModelField};
use kutta_trainer::train::{build_model, build_optimizer};
use serde::{Deserialize, Serialize};
use std::cell::Cell;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// All-reduce buffer sizes in bytes (f32 buffers of a quarter as many elements).
pub const ALLREDUCE_BYTES: [usize; 6] = [4, 4 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20];

/// The environment of every child job: one compute thread per rank (see the module doc).
pub const CHILD_ENV: [(&str, &str); 3] =
    [("RAYON_NUM_THREADS", "1"), ("CANDLE_NUM_THREADS", "1"), ("OMP_NUM_THREADS", "1")];

/// A cell (one all-reduce size, or one rank count's steps) whose repetitions are slow stops
/// after this many seconds once it has at least 3 repetitions, even below `min_reps`.
pub const SLOW_CELL_SECONDS: f64 = 10.0;

/// Repetitions of one all-reduce size never exceed this (the 4 B cell reaches it first).
pub const MAX_REPS: usize = 1_000_000;

/// Each job times its rk4 steps for this many times `min_seconds` (a step takes tens of ms, an
/// all-reduce size is one cell of six; the weak-scaling medians deserve more samples).
pub const STEP_SECONDS_FACTOR: f64 = 4.0;

/// The seconds a collective may wait in a child job before its watchdog ends the job.
pub const WORKER_COLLECTIVE_TIMEOUT_S: f64 = 300.0;

/// The default `--max-ranks`.
pub const MAX_RANKS: usize = 2;
/// The default `--per-rank-batch`.
pub const PER_RANK_BATCH: usize = 128;
/// The default `--min-seconds` here: seconds per all-reduce size (each job's steps get
/// `STEP_SECONDS_FACTOR` times this), not per optimizer and batch size as in `steps` and `sweep`.
pub const MIN_SECONDS_PER_SIZE: f64 = 0.5;
/// The default `--min-reps`.
pub const MIN_REPS: usize = 5;

/// What the user asked for (`kutta bench collectives …`).
#[derive(Clone, Debug)]
pub struct CollectivesOptions {
    /// Rank counts 1, 2, 4, … up to this (and this itself).
    pub max_ranks: usize,
    pub per_rank_batch: usize,
    /// Seconds each all-reduce size is timed at least; each job's steps get
    /// `STEP_SECONDS_FACTOR` times this.
    pub min_seconds: f64,
    pub min_reps: usize,
    /// Config providing the model and data (default: the paper's MLP on Fashion-MNIST).
    pub config: Option<PathBuf>,
    /// The `mpirun` the binary starts the jobs with (only shown in the reproduce line).
    pub mpirun: String,
}

impl Default for CollectivesOptions {
    fn default() -> Self {
        Self {
            max_ranks: MAX_RANKS,
            per_rank_batch: PER_RANK_BATCH,
            min_seconds: MIN_SECONDS_PER_SIZE,
            min_reps: MIN_REPS,
            config: None,
            mpirun: "mpirun".into(),
        }
    }
}

/// What a child job measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    AllReduce,
    Steps,
}

impl Part {
    pub const NAMES: [&'static str; 2] = ["allreduce", "steps"];

    pub fn name(self) -> &'static str {
        match self {
            Part::AllReduce => "allreduce",
            Part::Steps => "steps",
        }
    }

    pub fn parse(s: &str) -> Option<Part> {
        match s {
            "allreduce" => Some(Part::AllReduce),
            "steps" => Some(Part::Steps),
            _ => None,
        }
    }
}

impl CollectivesOptions {
    /// 1, 2, 4, … ≤ max_ranks, and max_ranks itself.
    pub fn rank_counts(&self) -> Vec<usize> {
        let mut v: Vec<usize> =
            std::iter::successors(Some(1usize), |n| n.checked_mul(2)).take_while(|&n| n <= self.max_ranks).collect();
        if v.last() != Some(&self.max_ranks) && self.max_ranks > 0 {
            v.push(self.max_ranks);
        }
        v
    }

    /// The jobs in order: (ranks, parts). Up through the rank counts with everything, then back
    /// down with steps only, so drift hits every rank count alike.
    pub fn schedule(&self) -> Vec<(usize, Vec<Part>)> {
        let counts = self.rank_counts();
        let mut jobs: Vec<(usize, Vec<Part>)> = counts
            .iter()
            .map(|&n| (n, if n > 1 { vec![Part::Steps, Part::AllReduce] } else { vec![Part::Steps] }))
            .collect();
        if counts.len() > 1 {
            jobs.extend(counts.iter().rev().map(|&n| (n, vec![Part::Steps])));
        }
        jobs
    }

    /// The kutta arguments of one child job's ranks (after `mpirun -np N kutta`).
    pub fn worker_args(&self, parts: &[Part]) -> Vec<String> {
        let mut a = vec![
            "bench".to_string(),
            "collectives".into(),
            "--worker".into(),
            parts.iter().map(|p| p.name()).collect::<Vec<_>>().join(","),
            "--per-rank-batch".into(),
            self.per_rank_batch.to_string(),
            "--min-seconds".into(),
            self.min_seconds.to_string(),
            "--min-reps".into(),
            self.min_reps.to_string(),
        ];
        if let Some(c) = &self.config {
            a.push("--config".into());
            a.push(c.display().to_string());
        }
        a
    }

    /// The command that reproduces this run.
    pub fn command_line(&self) -> String {
        let mut s = format!(
            "kutta bench collectives --max-ranks {} --per-rank-batch {} --min-seconds {} --min-reps {}",
            self.max_ranks, self.per_rank_batch, self.min_seconds, self.min_reps
        );
        if let Some(c) = &self.config {
            s += &format!(" --config {}", c.display());
        }
        if self.mpirun != "mpirun" {
            s += &format!(" --mpirun {}", self.mpirun);
        }
        s
    }

    fn validate(&self) -> Result<()> {
        let bad = |msg: &str| Err(anyhow!("{msg}"));
        if self.max_ranks == 0 {
            return bad("--max-ranks must be at least 1");
        }
        if self.per_rank_batch == 0 {
            return bad("--per-rank-batch must be positive");
        }
        if !(self.min_seconds >= 0.0 && self.min_seconds.is_finite()) {
            return bad("--min-seconds must be a non-negative number");
        }
        if self.min_reps == 0 {
            return bad("--min-reps must be at least 1");
        }
        Ok(())
    }
}

/// (algorithm bandwidth, bus bandwidth) in bytes per second of an all-reduce of `bytes` per rank
/// over `ranks` ranks that took `seconds`. NCCL-tests' convention: algbw = bytes / time; busbw =
/// algbw · 2(n−1)/n, the traffic through each rank's busiest link in a ring all-reduce (each rank
/// sends and receives 2(n−1)/n of the buffer), comparable with the hardware's link bandwidth
/// whatever n is. One rank moves nothing over a link: busbw 0.
pub fn bandwidths(bytes: usize, seconds: f64, ranks: usize) -> (f64, f64) {
    let algbw = bytes as f64 / seconds;
    let n = ranks.max(1) as f64;
    (algbw, algbw * 2.0 * (n - 1.0) / n)
}

/// Weak-scaling efficiency t₁ / t_N: 1.0 when N ranks do N times the work in the same time.
pub fn weak_scaling_efficiency(t1: f64, tn: f64) -> f64 {
    t1 / tn
}

/// Whether a cell has been timed long enough: `min_reps` and `min_seconds`, or — when its
/// repetitions are slow — at least 3 (or `min_reps` if fewer) after `SLOW_CELL_SECONDS`.
pub fn enough(reps: usize, elapsed_s: f64, min_reps: usize, min_seconds: f64) -> bool {
    (reps >= min_reps && elapsed_s >= min_seconds)
        || (reps >= min_reps.min(3) && elapsed_s >= SLOW_CELL_SECONDS)
        || reps >= MAX_REPS
}

/// A communicator that adds up the wall time spent inside `all_reduce_sum` and
/// `all_reduce_sum_f64` (the two calls `ShardedField::eval` makes) and passes everything to the
/// communicator it wraps.
pub struct TimedComm {
    inner: Box<dyn Communicator>,
    all_reduce: Cell<Duration>,
}

impl TimedComm {
    pub fn new(inner: Box<dyn Communicator>) -> Self {
        Self { inner, all_reduce: Cell::new(Duration::ZERO) }
    }

    /// Total time spent in all-reduces since `new`.
    pub fn all_reduce_time(&self) -> Duration {
        self.all_reduce.get()
    }

    fn timed<T>(&self, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let r = f();
        self.all_reduce.set(self.all_reduce.get() + t.elapsed());
        r
    }
}

impl Communicator for TimedComm {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> kutta_collectives::Result<()> {
        self.timed(|| self.inner.all_reduce_sum(buf))
    }
    fn all_reduce_sum_f64(&self, x: f64) -> kutta_collectives::Result<f64> {
        self.timed(|| self.inner.all_reduce_sum_f64(x))
    }
    fn broadcast(&self, buf: &mut [f32], root: usize) -> kutta_collectives::Result<()> {
        self.inner.broadcast(buf, root)
    }
    fn barrier(&self) -> kutta_collectives::Result<()> {
        self.inner.barrier()
    }
    fn is_writer(&self) -> bool {
        self.inner.is_writer()
    }
    fn abort(&self, code: i32) -> ! {
        self.inner.abort(code)
    }
    fn name(&self) -> &'static str {
        self.inner.name()
    }
}

/// What one rank of a child job is told to do.
#[derive(Clone, Debug)]
pub struct WorkerOptions {
    pub parts: Vec<Part>,
    pub per_rank_batch: usize,
    pub min_seconds: f64,
    pub min_reps: usize,
    pub config: Option<PathBuf>,
    /// All-reduce sizes in bytes (`ALLREDUCE_BYTES`; tests pass small ones).
    pub sizes: Vec<usize>,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        Self {
            parts: vec![Part::Steps, Part::AllReduce],
            per_rank_batch: PER_RANK_BATCH,
            min_seconds: MIN_SECONDS_PER_SIZE,
            min_reps: MIN_REPS,
            config: None,
            sizes: ALLREDUCE_BYTES.to_vec(),
        }
    }
}

/// One all-reduce size on one rank count.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AllReduceRow {
    pub bytes: usize,
    pub elements: usize,
    pub reps: usize,
    pub median_us: f64,
    /// bytes / median time, GB/s (10⁹ B/s).
    pub algbw_gbs: f64,
    /// algbw · 2(n−1)/n, GB/s (NCCL-tests convention).
    pub busbw_gbs: f64,
}

/// The rk4 step times of one job (every timed step, for pooling across jobs).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StepSamples {
    pub model: String,
    pub data: String,
    pub params: usize,
    pub per_rank_batch: usize,
    pub global_batch: usize,
    /// Per step: the mean over ranks of each rank's step time, ms.
    pub step_ms: Vec<f64>,
    /// Per step: the mean over ranks of each rank's time inside all-reduces, ms.
    pub allreduce_ms: Vec<f64>,
}

/// What rank 0 of a child job prints: one JSON line on stdout.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkerReport {
    pub ranks: usize,
    /// The communicator's back end ("mpi").
    pub backend: String,
    /// candle's CPU thread count on rank 0 (`candle_core::utils::get_num_threads`).
    pub threads_per_rank: usize,
    /// CPUs rank 0 may run on (its affinity mask: 1 when mpirun binds ranks to cores).
    pub cpus_per_rank: usize,
    pub allreduce: Vec<AllReduceRow>,
    pub steps: Option<StepSamples>,
}

/// Rank 0's decision, shared: every rank leaves a loop after the same repetition.
fn rank0_says(comm: &dyn Communicator, mine: bool) -> Result<bool> {
    let vote = if comm.rank() == 0 && mine { 1.0 } else { 0.0 };
    Ok(comm.all_reduce_sum_f64(vote)? > 0.0)
}

/// Per repetition, the mean over ranks of each rank's own time (every rank has the same number
/// of repetitions, since rank 0 decides when to stop).
fn mean_over_ranks(comm: &dyn Communicator, secs: &[f64]) -> Result<Vec<f64>> {
    // f64 through an f32 all-reduce: seconds → µs keeps 7 significant digits, plenty here.
    let mut buf: Vec<f32> = secs.iter().map(|s| (s * 1e6) as f32).collect();
    comm.all_reduce_sum(&mut buf)?;
    let n = comm.world_size() as f64;
    Ok(buf.iter().map(|&us| us as f64 / n * 1e-6).collect())
}

/// One rank of a child job: every rank of the job calls this; all return the same report (the
/// binary prints rank 0's).
pub fn worker(comm: &TimedComm, opts: &WorkerOptions) -> Result<WorkerReport> {
    let mut report = WorkerReport {
        ranks: comm.world_size(),
        backend: comm.name().to_string(),
        threads_per_rank: candle_core::utils::get_num_threads(),
        cpus_per_rank: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        allreduce: Vec::new(),
        steps: None,
    };
    for part in &opts.parts {
        match part {
            Part::Steps => report.steps = Some(time_steps(comm, opts)?),
            Part::AllReduce => report.allreduce = time_all_reduce(comm, opts)?,
        }
    }
    Ok(report)
}

fn time_all_reduce(comm: &TimedComm, opts: &WorkerOptions) -> Result<Vec<AllReduceRow>> {
    let mut rows = Vec::new();
    for &bytes in &opts.sizes {
        let elements = (bytes / 4).max(1);
        // Zeros stay zeros under repeated summing (ones would overflow to inf after 128 reps).
        let mut buf = vec![0.0f32; elements];
        comm.barrier()?;
        comm.all_reduce_sum(&mut buf)?; // warm-up: first touch, connection setup
        let mut secs = Vec::new();
        let start = Instant::now();
        loop {
            comm.barrier()?;
            let t = Instant::now();
            comm.all_reduce_sum(&mut buf)?;
            secs.push(t.elapsed().as_secs_f64());
            if rank0_says(comm, enough(secs.len(), start.elapsed().as_secs_f64(), opts.min_reps, opts.min_seconds))? {
                break;
            }
        }
        let mut secs = mean_over_ranks(comm, &secs)?;
        let reps = secs.len();
        let t = median(&mut secs);
        let (alg, bus) = bandwidths(elements * 4, t, comm.world_size());
        rows.push(AllReduceRow {
            bytes: elements * 4,
            elements,
            reps,
            median_us: t * 1e6,
            algbw_gbs: alg / 1e9,
            busbw_gbs: bus / 1e9,
        });
    }
    Ok(rows)
}

/// The rk4 variant of the step bench, with the global batch of this job.
fn rk4_config(base: &Config, global_batch: usize) -> Result<Config> {
    variant_config(base, "rk4", global_batch)
}

fn load_base(config: &Option<PathBuf>) -> Result<Config> {
    match config {
        Some(p) => Ok(Config::load(p, &[])?),
        None => Ok(Config::default()),
    }
}

fn time_steps(comm: &TimedComm, opts: &WorkerOptions) -> Result<StepSamples> {
    let base = load_base(&opts.config)?;
    let global = opts.per_rank_batch * comm.world_size();
    let cfg = rk4_config(&base, global)?;
    let (data, data_desc) = bench_data(&cfg);
    let model = build_model(&cfg, &data)?;
    let mut theta = model::init_params(model.as_ref(), 0);
    comm.broadcast(&mut theta, 0)?;
    let mut opt = build_optimizer(&cfg)?;
    let mut sampler = BatchSampler::new(data.len(), global, 0, true);
    let mut field = ShardedField::new(ModelField::new(model.as_ref(), &data), comm);
    let params = VectorField::<f32>::dim(&field);
    let (mut step_s, mut ar_s) = (Vec::new(), Vec::new());
    let mut start = Instant::now();
    for step in 0u64.. {
        field.set_global_batch(step, &sampler.batch(step))?;
        comm.barrier()?;
        let ar0 = comm.all_reduce_time();
        let t = Instant::now();
        opt.step(step, &mut theta, &mut field)?;
        let dt = t.elapsed().as_secs_f64();
        let ar = (comm.all_reduce_time() - ar0).as_secs_f64();
        if step == 0 {
            start = Instant::now(); // step 0 is warm-up (allocation, caches)
        } else {
            step_s.push(dt);
            ar_s.push(ar);
        }
        let done =
            enough(step_s.len(), start.elapsed().as_secs_f64(), opts.min_reps, STEP_SECONDS_FACTOR * opts.min_seconds);
        if rank0_says(comm, done)? {
            break;
        }
    }
    let to_ms = |v: Vec<f64>| v.into_iter().map(|s| s * 1e3).collect();
    Ok(StepSamples {
        model: model.describe(),
        data: data_desc,
        params,
        per_rank_batch: opts.per_rank_batch,
        global_batch: global,
        step_ms: to_ms(mean_over_ranks(comm, &step_s)?),
        allreduce_ms: to_ms(mean_over_ranks(comm, &ar_s)?),
    })
}

/// The `WorkerReport` among whatever a job printed on stdout: the last line that parses as one.
pub fn parse_worker_output(stdout: &str) -> Option<WorkerReport> {
    stdout.lines().rev().filter(|l| l.trim_start().starts_with('{')).find_map(|l| serde_json::from_str(l.trim()).ok())
}

/// One rank count's weak-scaling result (step times pooled over its jobs).
#[derive(Clone, Debug, Serialize)]
pub struct WeakScalingRow {
    pub ranks: usize,
    pub global_batch: usize,
    pub jobs: usize,
    pub reps: usize,
    pub median_step_ms: f64,
    /// Median per step of the time inside all-reduces (gradient buffer + loss), waiting for the
    /// slower rank included.
    pub median_allreduce_ms: f64,
    /// median_allreduce_ms / median_step_ms.
    pub allreduce_share: f64,
    /// t₁ / t_N.
    pub efficiency: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct AllReduceSweep {
    pub ranks: usize,
    pub rows: Vec<AllReduceRow>,
}

#[derive(Clone, Debug, Serialize)]
pub struct CollectivesReport {
    pub machine: String,
    pub cores: usize,
    /// `mpirun --version`'s first line.
    pub mpi: String,
    pub backend: String,
    /// candle's thread count per rank, as the ranks reported it.
    pub threads_per_rank: usize,
    /// CPUs each rank may run on (1 when mpirun binds ranks to cores).
    pub cpus_per_rank: usize,
    pub child_env: Vec<String>,
    pub model: String,
    pub data: String,
    pub params: usize,
    pub per_rank_batch: usize,
    pub allreduce: Vec<AllReduceSweep>,
    pub bandwidth_convention: String,
    pub weak_scaling: Vec<WeakScalingRow>,
    pub jobs: Vec<String>,
    pub notes: Vec<String>,
    pub command: String,
}

pub const BANDWIDTH_CONVENTION: &str =
    "algbw = bytes / time; busbw = algbw * 2(n-1)/n (NCCL-tests convention); GB/s = 1e9 B/s";

/// Drives the whole benchmark: runs each job of `opts.schedule()` through `job(ranks, args)`
/// (which starts `mpirun -np ranks kutta ARGS` with `CHILD_ENV` and returns its stdout, or an
/// error when it fails) and combines what their rank 0 printed. `mpi` describes the MPI (for the
/// report); `on_job` hears about each job before it starts.
pub fn run(
    opts: &CollectivesOptions,
    mpi: &str,
    mut job: impl FnMut(usize, &[String]) -> Result<String>,
    mut on_job: impl FnMut(usize, &[Part]),
) -> Result<CollectivesReport> {
    opts.validate()?;
    // Catch a bad --config here, before any job starts.
    rk4_config(&load_base(&opts.config)?, opts.per_rank_batch)?;
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let mut reports: Vec<WorkerReport> = Vec::new();
    let mut jobs = Vec::new();
    for (ranks, parts) in opts.schedule() {
        on_job(ranks, &parts);
        let args = opts.worker_args(&parts);
        jobs.push(format!("mpirun -np {ranks} kutta {}", args.join(" ")));
        let stdout = job(ranks, &args)?;
        let r = parse_worker_output(&stdout).ok_or_else(|| {
            anyhow!("the {ranks}-rank job printed no result line on stdout (it printed {} bytes)", stdout.len())
        })?;
        if r.ranks != ranks {
            anyhow::bail!(
                "the job started with {ranks} ranks ran as {} rank(s): is this kutta linked against the MPI of `{}`?",
                r.ranks,
                opts.mpirun
            );
        }
        reports.push(r);
    }
    combine(opts, mpi, cores, reports, jobs)
}

fn combine(
    opts: &CollectivesOptions,
    mpi: &str,
    cores: usize,
    reports: Vec<WorkerReport>,
    jobs: Vec<String>,
) -> Result<CollectivesReport> {
    let first_steps = reports.iter().find_map(|r| r.steps.as_ref()).ok_or_else(|| anyhow!("no job timed any steps"))?;
    let mut notes = Vec::new();
    let mut weak: Vec<WeakScalingRow> = Vec::new();
    for ranks in opts.rank_counts() {
        let samples: Vec<&StepSamples> =
            reports.iter().filter(|r| r.ranks == ranks).filter_map(|r| r.steps.as_ref()).collect();
        let mut step: Vec<f64> = samples.iter().flat_map(|s| s.step_ms.iter().copied()).collect();
        let mut ar: Vec<f64> = samples.iter().flat_map(|s| s.allreduce_ms.iter().copied()).collect();
        let reps = step.len();
        let (t, a) = (median(&mut step), median(&mut ar));
        weak.push(WeakScalingRow {
            ranks,
            global_batch: opts.per_rank_batch * ranks,
            jobs: samples.len(),
            reps,
            median_step_ms: t,
            median_allreduce_ms: a,
            allreduce_share: a / t,
            efficiency: f64::NAN,
        });
    }
    let t1 = weak.iter().find(|w| w.ranks == 1).map_or(f64::NAN, |w| w.median_step_ms);
    for w in &mut weak {
        w.efficiency = weak_scaling_efficiency(t1, w.median_step_ms);
    }
    let threads: Vec<usize> = reports.iter().map(|r| r.threads_per_rank).collect();
    let threads_per_rank = threads.iter().copied().max().unwrap_or(0);
    if threads.iter().any(|&t| t != 1) {
        notes.push(format!("some ranks ran candle with {threads_per_rank} threads despite RAYON_NUM_THREADS=1 (did mpirun pass the environment on?)"));
    }
    if opts.max_ranks > cores {
        notes.push(format!("{} ranks on {cores} cores: ranks share cores (mpirun --oversubscribe), so the multi-rank timings are not meaningful", opts.max_ranks));
    }
    let cpus_per_rank = reports.iter().map(|r| r.cpus_per_rank).max().unwrap_or(0);
    Ok(CollectivesReport {
        machine: machine_description(),
        cores,
        mpi: mpi.to_string(),
        backend: reports.first().map_or_else(String::new, |r| r.backend.clone()),
        threads_per_rank,
        cpus_per_rank,
        child_env: CHILD_ENV.iter().map(|(k, v)| format!("{k}={v}")).collect(),
        model: first_steps.model.clone(),
        data: first_steps.data.clone(),
        params: first_steps.params,
        per_rank_batch: opts.per_rank_batch,
        allreduce: reports
            .iter()
            .filter(|r| !r.allreduce.is_empty())
            .map(|r| AllReduceSweep { ranks: r.ranks, rows: r.allreduce.clone() })
            .collect(),
        bandwidth_convention: BANDWIDTH_CONVENTION.into(),
        weak_scaling: weak,
        jobs,
        notes,
        command: opts.command_line(),
    })
}

/// "4 B", "64 KiB", "16 MiB".
pub fn format_bytes(b: usize) -> String {
    if b >= 1 << 20 && b.is_multiple_of(1 << 20) {
        format!("{} MiB", b >> 20)
    } else if b >= 1 << 10 && b.is_multiple_of(1 << 10) {
        format!("{} KiB", b >> 10)
    } else {
        format!("{b} B")
    }
}

pub fn format_table(r: &CollectivesReport) -> String {
    let mut s = format!(
        "machine:  {} ({} cores)\nmpi:      {} (back end `{}`: kutta's MpiComm::all_reduce_sum, as the trainer calls it)\n\
         ranks:    {} (one process per rank, started by mpirun)\nthreads:  {} candle thread(s) per rank, {} CPU(s) visible to each rank ({})\n",
        r.machine,
        r.cores,
        r.mpi,
        r.backend,
        r.weak_scaling.iter().map(|w| w.ranks.to_string()).collect::<Vec<_>>().join(", "),
        r.threads_per_rank,
        r.cpus_per_rank,
        r.child_env.join(" "),
    );
    for sweep in &r.allreduce {
        s += &format!(
            "\nall-reduce, f32 sum, {} ranks (barrier before each rep; time = mean over ranks, median over reps)\n\
             {:>8} {:>10} {:>7} {:>12} {:>12} {:>12}\n",
            sweep.ranks, "size", "elements", "reps", "median µs", "algbw GB/s", "busbw GB/s"
        );
        for row in &sweep.rows {
            s += &format!(
                "{:>8} {:>10} {:>7} {:>12.1} {:>12.3} {:>12.3}\n",
                format_bytes(row.bytes),
                row.elements,
                row.reps,
                row.median_us,
                row.algbw_gbs,
                row.busbw_gbs
            );
        }
    }
    if !r.allreduce.is_empty() {
        s += &format!("{}\n", r.bandwidth_convention);
        s += &format!(
            "the model's gradient all-reduce is {} f32 = {:.2} MiB\n",
            r.params,
            r.params as f64 * 4.0 / (1 << 20) as f64
        );
    }
    s += &format!(
        "\nweak scaling, rk4 steps: {}\ndata: {}; {} samples per rank\n{:>5} {:>12} {:>6} {:>14} {:>18} {:>16} {:>11}\n",
        r.model, r.data, r.per_rank_batch, "ranks", "global batch", "reps", "step ms (med)", "all-reduce ms/step", "all-reduce share", "efficiency"
    );
    for w in &r.weak_scaling {
        s += &format!(
            "{:>5} {:>12} {:>6} {:>14.3} {:>18.3} {:>15.1}% {:>11.3}\n",
            w.ranks,
            w.global_batch,
            w.reps,
            w.median_step_ms,
            w.median_allreduce_ms,
            100.0 * w.allreduce_share,
            w.efficiency
        );
    }
    s += "efficiency = t(1 rank) / t(N ranks) at a fixed per-rank batch (1.0 = ideal); all-reduce time includes waiting for the slower rank;\n";
    if r.weak_scaling.iter().any(|w| w.jobs > 1) {
        s += "each rank count was timed in two jobs (1, 2, …, then back down) and its step times pooled.\n";
    }
    for n in &r.notes {
        s += &format!("note: {n}\n");
    }
    s += &format!("\nreproduce (with a kutta built with --features mpi):\n  {}\n", r.command);
    s
}

/// `kutta bench collectives`: run the child jobs through the binary's `mpirun_command` and print
/// the table (or JSON).
pub fn main(args: &CollectivesArgs) -> Result<()> {
    if !cfg!(feature = "mpi") {
        anyhow::bail!(
            "kutta bench collectives runs MPI jobs, but this kutta was built without the `mpi` feature: \
             cargo build --release --features mpi (needs libopenmpi-dev and libclang-dev)"
        );
    }
    let opts = CollectivesOptions {
        max_ranks: args.max_ranks,
        per_rank_batch: args.per_rank_batch,
        min_seconds: args.min_seconds,
        min_reps: args.min_reps,
        config: args.config.clone(),
        mpirun: args.mpirun.clone(),
    };
    let json = args.json;
    let mpirun = opts.mpirun.as_str();
    let version = std::process::Command::new(mpirun)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .with_context(|| crate::cannot_start(mpirun))?;
    let mpi = String::from_utf8_lossy(&version.stdout).lines().next().unwrap_or(mpirun).trim().to_string();
    let report = run(
        &opts,
        &mpi,
        |nproc, args| {
            let mut cmd = crate::mpirun_command(nproc, mpirun, args)?;
            cmd.envs(CHILD_ENV).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit());
            let out = cmd.output().with_context(|| crate::cannot_start(mpirun))?;
            if !out.status.success() {
                anyhow::bail!("the {nproc}-rank job failed ({}); its ranks' messages are above", out.status);
            }
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        },
        |nproc, parts| {
            if !json {
                let parts: Vec<&str> = parts.iter().map(|p| p.name()).collect();
                eprintln!("  job: {nproc} rank(s), timing {}", parts.join(" + "));
            }
        },
    )?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", format_table(&report));
    }
    Ok(())
}

/// One rank of a `kutta bench collectives --worker PARTS` child job: join the job's world, time,
/// and print rank 0's `WorkerReport` as one JSON line on stdout; returns the exit status. Failure
/// ends the whole job, as in training.
pub fn worker_main(args: &CollectivesArgs) -> i32 {
    let opts = WorkerOptions {
        parts: args.worker.iter().flatten().filter_map(|p| Part::parse(p)).collect(),
        per_rank_batch: args.per_rank_batch,
        min_seconds: args.min_seconds,
        min_reps: args.min_reps,
        config: args.config.clone(),
        ..Default::default()
    };
    let timeout = Duration::from_secs_f64(WORKER_COLLECTIVE_TIMEOUT_S);
    crate::on_every_rank(Some(timeout), TimedComm::new, |comm| worker(comm, &opts), serde_json::to_string, |_| 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kutta_collectives::LocalGroup;

    #[test]
    fn bandwidth_arithmetic_follows_nccl_tests() {
        // 1 GB in 1 s on 2 ranks: algbw 1 GB/s, busbw = algbw · 2·1/2 = algbw.
        let (alg, bus) = bandwidths(1_000_000_000, 1.0, 2);
        assert_eq!((alg, bus), (1e9, 1e9));
        // 4 ranks: factor 2·3/4 = 1.5; 8 ranks: 2·7/8 = 1.75.
        assert_eq!(bandwidths(1_000_000_000, 1.0, 4), (1e9, 1.5e9));
        assert_eq!(bandwidths(1_000_000_000, 1.0, 8), (1e9, 1.75e9));
        // 64 MiB in 20 ms on 2 ranks.
        let (alg, bus) = bandwidths(64 << 20, 0.020, 2);
        assert!((alg - 3_355_443_200.0).abs() < 1e-3, "{alg}");
        assert_eq!(alg, bus);
        // One rank: nothing crosses a link.
        assert_eq!(bandwidths(4096, 1e-6, 1), (4096e6, 0.0));
        // Half the time, twice the bandwidth.
        assert_eq!(bandwidths(1 << 20, 0.5e-3, 2).0, 2.0 * bandwidths(1 << 20, 1e-3, 2).0);
        assert_eq!(weak_scaling_efficiency(10.0, 12.5), 0.8);
    }

    #[test]
    fn sizes_and_schedule() {
        assert_eq!(ALLREDUCE_BYTES.map(format_bytes), ["4 B", "4 KiB", "64 KiB", "1 MiB", "16 MiB", "64 MiB"]);
        let o = |max_ranks| CollectivesOptions { max_ranks, ..Default::default() };
        assert_eq!(o(1).rank_counts(), vec![1]);
        assert_eq!(o(2).rank_counts(), vec![1, 2]);
        assert_eq!(o(6).rank_counts(), vec![1, 2, 4, 6]);
        let sched: Vec<usize> = o(2).schedule().iter().map(|(n, _)| *n).collect();
        assert_eq!(sched, vec![1, 2, 2, 1]);
        assert_eq!(o(2).schedule()[1].1, vec![Part::Steps, Part::AllReduce]);
        assert_eq!(o(1).schedule(), vec![(1, vec![Part::Steps])]);
        let args = o(2).worker_args(&[Part::Steps, Part::AllReduce]);
        assert_eq!(args[..4], ["bench", "collectives", "--worker", "steps,allreduce"]);
        assert!(o(2).command_line().starts_with("kutta bench collectives --max-ranks 2 "));
        for p in Part::NAMES {
            assert_eq!(Part::parse(p).map(Part::name), Some(p));
        }
    }

    #[test]
    fn stopping_rule() {
        assert!(!enough(4, SLOW_CELL_SECONDS - 1.0, 5, 0.5));
        assert!(!enough(5, 0.4, 5, 0.5));
        assert!(enough(5, 0.5, 5, 0.5));
        // A slow size stops after SLOW_CELL_SECONDS with 3 reps.
        assert!(!enough(2, SLOW_CELL_SECONDS + 1.0, 5, 0.5));
        assert!(enough(3, SLOW_CELL_SECONDS, 5, 0.5));
        assert!(enough(MAX_REPS, 0.0, 5, 0.5));
    }

    #[test]
    fn result_line_is_found_among_other_output() {
        let r = WorkerReport {
            ranks: 2,
            backend: "mpi".into(),
            threads_per_rank: 1,
            cpus_per_rank: 1,
            allreduce: vec![],
            steps: None,
        };
        let out = format!("some launcher chatter\n{{not json\n{}\n", serde_json::to_string(&r).unwrap());
        assert_eq!(parse_worker_output(&out).map(|r| r.ranks), Some(2));
        assert!(parse_worker_output("nothing here\n").is_none());
    }

    /// The worker on two thread-ranks (no MPI): both ranks leave every loop together and agree.
    #[test]
    fn worker_on_two_thread_ranks() {
        let mut base = Config::default();
        base.data.dir = PathBuf::from("/nonexistent/kutta-bench-collectives"); // random data, fast
        let dir = tempfile::tempdir().unwrap();
        let cfg_path = dir.path().join("c.toml");
        std::fs::write(&cfg_path, base.to_toml()).unwrap();
        let opts = WorkerOptions {
            per_rank_batch: 4,
            min_seconds: 0.0,
            min_reps: 2,
            config: Some(cfg_path),
            sizes: vec![4, 4096],
            ..Default::default()
        };
        let reports: Vec<WorkerReport> = std::thread::scope(|s| {
            let handles: Vec<_> = LocalGroup::new(2)
                .into_iter()
                .map(|g| {
                    let opts = opts.clone();
                    s.spawn(move || worker(&TimedComm::new(Box::new(g)), &opts).unwrap())
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for r in &reports {
            assert_eq!((r.ranks, r.backend.as_str()), (2, "local"));
            assert_eq!(r.allreduce.iter().map(|a| a.bytes).collect::<Vec<_>>(), vec![4, 4096]);
            assert!(r.allreduce.iter().all(|a| a.reps >= 2 && a.median_us > 0.0 && a.busbw_gbs == a.algbw_gbs));
            let st = r.steps.as_ref().unwrap();
            assert_eq!((st.global_batch, st.step_ms.len()), (8, st.allreduce_ms.len()));
            assert!(st.step_ms.len() >= 2 && st.data.starts_with("random"));
            assert!(st.step_ms.iter().zip(&st.allreduce_ms).all(|(s, a)| *a > 0.0 && a < s));
        }
        // Same reps and the same rank-averaged times on both ranks.
        assert_eq!(reports[0].steps.as_ref().unwrap().step_ms, reports[1].steps.as_ref().unwrap().step_ms);
        assert_eq!(reports[0].allreduce[1].median_us, reports[1].allreduce[1].median_us);
    }
}
