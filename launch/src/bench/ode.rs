//! `kutta bench ode`: what one gradient through a neural-ODE block (`model::ode`) costs with
//! each of its three gradient methods — backprop through every step, binomial checkpointing, the
//! McCallum–Foster reversible solver — as the number of steps grows: median seconds and the
//! heap's peak above what was live before the gradient.
//!
//! The block is ODE-Net's (`model::odenet::ConcatConvField`: two 3×3 concat-convs of `--width`
//! channels on `--size`×`--size` states, a batch of `--batch`), solved over [0, 1] with
//! `--tableau` in f32 on the CPU. One gradient is the forward solve and the backward pass of
//! L = Σ y_N ⊙ r (r a fixed random cotangent) to the input x and the field's four tensors, all
//! `Var`s: the same gradient a training step of an odenet takes through its middle segment.
//!
//! Memory is exact, not RSS: `kutta` counts every heap allocation (`memory::CountingAlloc`), so
//! the peak of one gradient is `heap_peak_bytes() − heap_live_bytes()` with the peak reset just
//! before it (inputs already allocated). RSS would also hold the pages the allocator keeps after
//! a free, which hide a method's smaller working set behind the previous method's larger one.
//!
//! Timing is interleaved as in the other benches: one gradient of each method per round, in
//! rotating order, so drift in the machine's speed falls on all three alike. The first round is
//! warm-up and also the check that checkpointing differentiates the same function as backprop
//! (the reversible solver is a different discretisation, so it is not compared). Outputs: a table
//! (or `--json`), and `ode.csv`, `ode.svg` (seconds and peak MiB against steps, log-log) and
//! `ode.json` in `--out`.

use super::steps::{machine_description, median};
use super::OdeArgs;
use anyhow::{anyhow, Context, Result};
use candle_core::{Device, Tensor, Var};
use kutta_trainer::memory::{self, mib};
use kutta_trainer::model::ode::{default_checkpoints, Dynamics, Method, OdeBlock, Solver, DEFAULT_TIME};
use kutta_trainer::model::odenet::ConcatConvField;
use kutta_trainer::tableau::Tableau;
use kutta_trainer::Error;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

/// The default `--width`: ODE-Net's block at half the odenet's default width, so that 512 steps
/// of backprop stay in seconds on a laptop.
pub const WIDTH: usize = 16;
/// The default `--batch`.
pub const BATCH: usize = 16;
/// The default `--size`: a 28×28 image after the odenet's two stride-2 convs.
pub const SIZE: usize = 7;
/// The default `--steps`: a factor of 4 apart, so the log-log slopes span two decades.
pub const STEPS: &str = "8,32,128,512";
/// The default `--min-reps`: timed gradients of each method per steps value.
pub const MIN_REPS: usize = 3;
/// The default `--min-seconds` per steps value: short, because at the larger steps values three
/// rounds take far longer than this anyway; the floor only adds repetitions where they are cheap.
pub const MIN_SECONDS: f64 = 1.0;
/// Checkpoint's gradient must equal backprop's to this relative difference (the same function,
/// the per-step products summed in another order; f32).
pub const CHECK_TOLERANCE: f64 = 1e-4;
/// The seed of x, the field's parameters and the cotangent r.
const SEED: u64 = 0x0DE_5EED;

/// The three gradient methods, in the order of the table.
pub const METHODS: [&str; 3] = ["backprop", "checkpoint", "reversible"];

#[derive(Clone, Debug, PartialEq)]
pub struct OdeOptions {
    pub width: usize,
    pub batch: usize,
    pub size: usize,
    pub tableau: String,
    pub steps: Vec<usize>,
    /// States checkpointing keeps; None: ⌈log₂ steps⌉ for each steps value (`default_checkpoints`).
    pub checkpoints: Option<usize>,
    pub coupling: f64,
    /// Keep timing each steps value for at least this many seconds (after the warm-up round)…
    pub min_seconds: f64,
    /// …and at least this many gradients of each method…
    pub min_reps: usize,
    /// …but never more than this many.
    pub max_reps: usize,
}

impl Default for OdeOptions {
    fn default() -> Self {
        Self {
            width: WIDTH,
            batch: BATCH,
            size: SIZE,
            tableau: "rk4".into(),
            steps: parse_steps(STEPS),
            checkpoints: None,
            coupling: kutta_trainer::model::ode::DEFAULT_COUPLING,
            min_seconds: MIN_SECONDS,
            min_reps: MIN_REPS,
            max_reps: 1000,
        }
    }
}

/// The steps of a comma-separated default.
pub fn parse_steps(s: &str) -> Vec<usize> {
    s.split(',').map(|n| n.parse().expect("a default number of steps")).collect()
}

impl OdeOptions {
    /// The tableau, after checking every option; errors name the flag.
    pub fn validate(&self) -> Result<Tableau> {
        let positive = [("--width", self.width), ("--batch", self.batch), ("--size", self.size)];
        if let Some((flag, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(Error::config(*flag, "must be at least 1").into());
        }
        if self.steps.is_empty() || self.steps.contains(&0) {
            return Err(Error::config("--steps", "give one or more positive numbers of steps, e.g. 8,32,128").into());
        }
        if !(self.coupling > 0.0 && self.coupling <= 1.0) {
            return Err(Error::config("--coupling", format!("must be in (0, 1], got {}", self.coupling)).into());
        }
        if !(self.min_seconds.is_finite() && self.min_seconds >= 0.0) {
            return Err(Error::config("--min-seconds", format!("must be ≥ 0, got {}", self.min_seconds)).into());
        }
        if self.min_reps == 0 {
            return Err(Error::config("--min-reps", "must be at least 1").into());
        }
        Ok(Tableau::builtin(&self.tableau).map_err(|e| Error::config("--tableau", e.to_string()))?)
    }

    /// The stored states of checkpointing at `steps`.
    pub fn checkpoints_at(&self, steps: usize) -> usize {
        self.checkpoints.unwrap_or_else(|| default_checkpoints(steps))
    }

    fn method(&self, name: &str, steps: usize) -> Method {
        match name {
            "checkpoint" => Method::Checkpoint { checkpoints: self.checkpoints_at(steps) },
            "reversible" => Method::Reversible { coupling: self.coupling },
            _ => Method::Backprop,
        }
    }

    /// `kutta bench ode …` with every setting, the line that reproduces the run.
    pub fn command(&self) -> String {
        let steps: Vec<String> = self.steps.iter().map(|s| s.to_string()).collect();
        let checkpoints = self.checkpoints.map_or(String::new(), |c| format!(" --checkpoints {c}"));
        format!(
            "kutta bench ode --width {} --batch {} --size {} --tableau {} --steps {}{checkpoints} --coupling {} \
             --min-seconds {} --min-reps {}",
            self.width,
            self.batch,
            self.size,
            self.tableau,
            steps.join(","),
            self.coupling,
            self.min_seconds,
            self.min_reps
        )
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OdeRow {
    pub method: String,
    pub steps: usize,
    /// checkpoint: the states stored besides the input; None for the other methods.
    pub checkpoints: Option<usize>,
    pub batch: usize,
    pub width: usize,
    pub size: usize,
    /// Timed gradients (after one warm-up gradient).
    pub reps: usize,
    /// Median seconds of one gradient (forward solve, loss, backward pass).
    pub seconds: f64,
    /// The largest heap peak of one gradient over the repetitions, above the bytes live before
    /// it, in MiB.
    pub peak_mib: f64,
    /// Evaluations f(t, y) of the vector field per gradient: the forward solve's, the
    /// checkpoint schedule's recomputation and the backward sweep's (each step a custom backward
    /// pass differentiates is evaluated again to build its small graph). Autograd's backward
    /// passes through them are not counted.
    pub field_evals: u64,
    /// checkpoint: forward steps recomputed by the schedule (`OdeBlock::recomputed_steps`).
    pub recomputed_steps: Option<u64>,
    /// checkpoint: the largest relative difference of its gradients (x and each parameter tensor,
    /// ‖g − g_backprop‖ / ‖g_backprop‖) from backprop's.
    pub rel_diff_vs_backprop: Option<f64>,
}

/// At one steps value: how the methods compare (ratios of the medians and of the peaks).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OdeRatios {
    pub steps: usize,
    /// checkpoint seconds / reversible seconds (> 1: reversible is faster).
    pub time_checkpoint_over_reversible: f64,
    /// checkpoint peak / reversible peak (> 1: reversible needs less).
    pub memory_checkpoint_over_reversible: f64,
    /// reversible seconds / backprop seconds.
    pub time_reversible_over_backprop: f64,
    /// reversible peak / backprop peak.
    pub memory_reversible_over_backprop: f64,
}

/// How a method's cost grows with the steps: the least-squares slope of log(cost) against
/// log(steps) (1: linear, 0: flat). None with fewer than two steps values.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OdeGrowth {
    pub method: String,
    pub time_slope: Option<f64>,
    pub memory_slope: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct OdeReport {
    pub machine: String,
    pub threads: usize,
    /// The block, the state and the loss, in words.
    pub block: String,
    /// The field's parameter count.
    pub params: usize,
    pub rows: Vec<OdeRow>,
    pub ratios: Vec<OdeRatios>,
    pub growth: Vec<OdeGrowth>,
    /// Whether checkpoint's gradient matched backprop's within `tolerance` at every steps value.
    pub gradients_agree: bool,
    pub tolerance: f64,
    /// The command that reproduces the run (filled in by the caller).
    pub command: String,
    /// Where `write_outputs` put ode.csv, ode.svg and ode.json.
    pub csv: Option<PathBuf>,
    pub svg: Option<PathBuf>,
    pub json: Option<PathBuf>,
}

/// ConcatConvField counting its evaluations (the only way to see the recomputation and the
/// backward sweep's evaluations from outside the block).
struct Counted {
    field: ConcatConvField,
    evals: AtomicU64,
}

impl Dynamics for Counted {
    fn eval(&self, params: &[Tensor], t: f64, y: &Tensor) -> kutta_trainer::Result<Tensor> {
        self.evals.fetch_add(1, Relaxed);
        self.field.eval(params, t, y)
    }
}

/// The leaves one gradient differentiates and the fixed cotangent.
struct Problem {
    /// The state x [batch, width, size, size].
    x: Var,
    /// conv₁ weight [W, W + 1, 3, 3], bias [W], conv₂ weight, bias.
    params: Vec<Var>,
    /// r, the cotangent of y_N: L = Σ y_N ⊙ r.
    r: Tensor,
}

/// xorshift64: the bench's inputs depend on nothing but `SEED`.
struct Rng(u64);

impl Rng {
    /// Uniform in [−bound, bound).
    fn uniform(&mut self, n: usize, bound: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                ((self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * bound
            })
            .collect()
    }
}

impl Problem {
    /// x and r uniform in [−1, 1); the parameters as PyTorch's `nn.Conv2d` initialises them
    /// (U(±1/√fan_in), fan_in = (W + 1)·9), as the odenet does.
    fn new(opts: &OdeOptions) -> Result<Self> {
        let (w, b, s) = (opts.width, opts.batch, opts.size);
        let mut rng = Rng(SEED);
        let mut tensor = |shape: &[usize], bound: f32| -> Result<Tensor> {
            let n = shape.iter().product();
            Ok(Tensor::from_vec(rng.uniform(n, bound), shape, &Device::Cpu)?)
        };
        let x = Var::from_tensor(&tensor(&[b, w, s, s], 1.0)?)?;
        let bound = 1.0 / ((w + 1) as f32 * 9.0).sqrt();
        let mut params = Vec::new();
        for _ in 0..2 {
            params.push(Var::from_tensor(&tensor(&[w, w + 1, 3, 3], bound)?)?);
            params.push(Var::from_tensor(&tensor(&[w], bound)?)?);
        }
        let r = tensor(&[b, w, s, s], 1.0)?;
        Ok(Self { x, params, r })
    }

    fn param_count(&self) -> usize {
        self.params.iter().map(|p| p.elem_count()).sum()
    }
}

/// One measured gradient.
struct Measured {
    seconds: f64,
    peak_bytes: u64,
    field_evals: u64,
    /// The gradients of x and the four parameter tensors (kept only when asked for).
    grads: Option<Vec<Vec<f32>>>,
}

/// One gradient of L = Σ solve(x)·r with respect to x and the parameters: its wall time, the
/// heap's peak above the bytes live when it starts, and the field evaluations it made.
fn gradient(block: &OdeBlock, field: &Counted, p: &Problem, keep: bool) -> Result<Measured> {
    let params: Vec<Tensor> = p.params.iter().map(|v| v.as_tensor().clone()).collect();
    let leaves: Vec<&Var> = std::iter::once(&p.x).chain(&p.params).collect();
    let evals = field.evals.load(Relaxed);
    memory::reset_heap_peak();
    let live = memory::heap_live_bytes()
        .ok_or_else(|| anyhow!("kutta bench ode needs the counting allocator (memory::CountingAlloc) of `kutta`"))?;
    let t = Instant::now();
    let y = block.solve(&params, p.x.as_tensor())?;
    let loss = (y * &p.r)?.sum_all()?;
    let store = loss.backward()?;
    let grads = leaves
        .iter()
        .map(|v| {
            store.get(v).cloned().ok_or_else(|| anyhow!("{}: no gradient reached a leaf", block.solver().describe()))
        })
        .collect::<Result<Vec<_>>>()?;
    let seconds = t.elapsed().as_secs_f64();
    let peak_bytes = memory::heap_peak_bytes().unwrap_or(live).saturating_sub(live);
    let field_evals = field.evals.load(Relaxed) - evals;
    drop((store, loss));
    let grads = if keep {
        Some(grads.iter().map(|g| g.flatten_all()?.to_vec1::<f32>()).collect::<candle_core::Result<Vec<_>>>()?)
    } else {
        None
    };
    Ok(Measured { seconds, peak_bytes, field_evals, grads })
}

/// The largest relative difference ‖a_i − b_i‖ / ‖b_i‖ over the tensors (b the reference).
pub fn max_rel_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(a, b)| {
            let (mut diff, mut norm) = (0.0f64, 0.0f64);
            for (&x, &y) in a.iter().zip(b) {
                diff += (x as f64 - y as f64).powi(2);
                norm += (y as f64).powi(2);
            }
            if a.len() != b.len() {
                return f64::INFINITY;
            }
            if norm == 0.0 {
                if diff == 0.0 {
                    0.0
                } else {
                    f64::INFINITY
                }
            } else {
                (diff / norm).sqrt()
            }
        })
        .fold(0.0, f64::max)
}

/// The least-squares slope of ln y against ln x; None with fewer than two distinct x or a
/// non-positive value.
pub fn loglog_slope(points: &[(f64, f64)]) -> Option<f64> {
    if points.iter().any(|&(x, y)| !(x > 0.0 && y > 0.0 && x.is_finite() && y.is_finite())) {
        return None;
    }
    let n = points.len() as f64;
    let (lx, ly): (Vec<f64>, Vec<f64>) = points.iter().map(|&(x, y)| (x.ln(), y.ln())).unzip();
    let (mx, my) = (lx.iter().sum::<f64>() / n, ly.iter().sum::<f64>() / n);
    let sxx: f64 = lx.iter().map(|x| (x - mx).powi(2)).sum();
    if points.len() < 2 || sxx < 1e-12 {
        return None;
    }
    let sxy: f64 = lx.iter().zip(&ly).map(|(x, y)| (x - mx) * (y - my)).sum();
    Some(sxy / sxx)
}

/// Ratios and growth from the rows.
fn summarise(rows: &[OdeRow], steps: &[usize]) -> (Vec<OdeRatios>, Vec<OdeGrowth>) {
    let find = |m: &str, s: usize| rows.iter().find(|r| r.method == m && r.steps == s);
    let ratios = steps
        .iter()
        .filter_map(|&s| {
            let (bp, ck, rv) = (find("backprop", s)?, find("checkpoint", s)?, find("reversible", s)?);
            Some(OdeRatios {
                steps: s,
                time_checkpoint_over_reversible: ck.seconds / rv.seconds,
                memory_checkpoint_over_reversible: ck.peak_mib / rv.peak_mib,
                time_reversible_over_backprop: rv.seconds / bp.seconds,
                memory_reversible_over_backprop: rv.peak_mib / bp.peak_mib,
            })
        })
        .collect();
    let growth = METHODS
        .iter()
        .map(|&m| {
            let of = |f: fn(&OdeRow) -> f64| -> Vec<(f64, f64)> {
                rows.iter().filter(|r| r.method == m).map(|r| (r.steps as f64, f(r))).collect()
            };
            OdeGrowth {
                method: m.into(),
                time_slope: loglog_slope(&of(|r| r.seconds)),
                memory_slope: loglog_slope(&of(|r| r.peak_mib)),
            }
        })
        .collect();
    (ratios, growth)
}

/// Times the three methods at each steps value. `on_progress` gets one line per event (the
/// gradient check, a steps value timed); a failed check is also a line starting "WARNING".
pub fn run(opts: &OdeOptions, mut on_progress: impl FnMut(&str)) -> Result<OdeReport> {
    let tableau = opts.validate()?;
    let problem = Problem::new(opts)?;
    let field = Arc::new(Counted { field: ConcatConvField { width: opts.width }, evals: AtomicU64::new(0) });
    let mut rows = Vec::new();
    let mut agree = true;
    for &steps in &opts.steps {
        let blocks = METHODS
            .iter()
            .map(|&m| {
                let solver = Solver::new(tableau.clone(), steps, DEFAULT_TIME, opts.method(m, steps))?;
                Ok(OdeBlock::new(solver, field.clone()))
            })
            .collect::<Result<Vec<_>>>()?;
        // Round 0: warm-up, and the check that checkpointing differentiates backprop's function.
        let warm = blocks.iter().map(|b| gradient(b, &field, &problem, true)).collect::<Result<Vec<_>>>()?;
        let grads = |i: usize| warm[i].grads.as_deref().unwrap_or_default();
        let diff = max_rel_diff(grads(1), grads(0));
        if diff <= CHECK_TOLERANCE {
            on_progress(&format!("steps {steps:>4}: checkpoint's gradient = backprop's (max rel. diff {diff:.1e})"));
        } else {
            agree = false;
            on_progress(&format!(
                "WARNING: steps {steps}: checkpoint's gradient differs from backprop's by {diff:.2e} (relative, \
                 tolerance {CHECK_TOLERANCE:.0e}): the two should differentiate the same solve"
            ));
        }
        let mut seconds = vec![Vec::new(); blocks.len()];
        let mut peaks = vec![0u64; blocks.len()];
        let since = Instant::now();
        for round in 0.. {
            for c in 0..blocks.len() {
                let i = (c + round) % blocks.len();
                let m = gradient(&blocks[i], &field, &problem, false)?;
                seconds[i].push(m.seconds);
                peaks[i] = peaks[i].max(m.peak_bytes);
            }
            let reps = round + 1;
            if reps >= opts.max_reps || (reps >= opts.min_reps && since.elapsed().as_secs_f64() >= opts.min_seconds) {
                break;
            }
        }
        let mut line = format!("steps {steps:>4}:");
        for (i, &m) in METHODS.iter().enumerate() {
            let checkpoint = m == "checkpoint";
            let row = OdeRow {
                method: m.into(),
                steps,
                checkpoints: checkpoint.then(|| opts.checkpoints_at(steps)),
                batch: opts.batch,
                width: opts.width,
                size: opts.size,
                reps: seconds[i].len(),
                seconds: median(&mut seconds[i]),
                peak_mib: mib(peaks[i]),
                field_evals: warm[i].field_evals,
                recomputed_steps: checkpoint.then(|| blocks[i].recomputed_steps()),
                rel_diff_vs_backprop: checkpoint.then_some(diff),
            };
            line += &format!(" {m} {:.4} s {:.2} MiB;", row.seconds, row.peak_mib);
            rows.push(row);
        }
        on_progress(line.trim_end_matches(';'));
    }
    let (ratios, growth) = summarise(&rows, &opts.steps);
    let (w, s) = (opts.width, opts.size);
    Ok(OdeReport {
        machine: format!("{}, f32 on the cpu", machine_description()),
        threads: kutta_trainer::threads::current(),
        block: format!(
            "ConcatConvField width {w} (f(t, y) = conv([t, tanh(conv([t, y]) + b1)]) + b2, 3×3 convs {}→{w}) on \
             states {}×{w}×{s}×{s}, {} over [0, {DEFAULT_TIME}]; one gradient = forward solve + backward of \
             L = Σ y_N ⊙ r to x and the field's 4 tensors",
            w + 1,
            opts.batch,
            tableau.name
        ),
        params: problem.param_count(),
        rows,
        ratios,
        growth,
        gradients_agree: agree,
        tolerance: CHECK_TOLERANCE,
        command: String::new(),
        csv: None,
        svg: None,
        json: None,
    })
}

fn opt_slope(s: Option<f64>) -> String {
    s.map_or("n/a".into(), |s| format!("{s:.2}"))
}

pub fn format_table(report: &OdeReport) -> String {
    let mut s = format!(
        "machine: {} ({} threads)\nblock:   {} ({} parameters)\n",
        report.machine, report.threads, report.block, report.params
    );
    if !report.command.is_empty() {
        s += &format!("command: {}\n", report.command);
    }
    s += &format!(
        "\n{:<11} {:>6} {:>6} {:>5} {:>14} {:>10} {:>12} {:>10}\n",
        "method", "steps", "ckpts", "reps", "seconds (med)", "peak MiB", "field evals", "recomputed"
    );
    let dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    for r in &report.rows {
        s += &format!(
            "{:<11} {:>6} {:>6} {:>5} {:>14.4} {:>10.3} {:>12} {:>10}\n",
            r.method,
            r.steps,
            dash(r.checkpoints.map(|c| c.to_string())),
            r.reps,
            r.seconds,
            r.peak_mib,
            r.field_evals,
            dash(r.recomputed_steps.map(|c| c.to_string())),
        );
    }
    s += &format!(
        "\n{:>6} {:>22} {:>22} {:>22} {:>22}\n",
        "steps", "time ckpt/reversible", "memory ckpt/reversible", "time reversible/bp", "memory reversible/bp"
    );
    for r in &report.ratios {
        s += &format!(
            "{:>6} {:>22.2} {:>22.2} {:>22.2} {:>22.3}\n",
            r.steps,
            r.time_checkpoint_over_reversible,
            r.memory_checkpoint_over_reversible,
            r.time_reversible_over_backprop,
            r.memory_reversible_over_backprop
        );
    }
    s += "\ngrowth with steps (log-log slope over the steps values; 1 = linear, 0 = flat):\n";
    s += &format!("{:<11} {:>6} {:>7}\n", "method", "time", "memory");
    for g in &report.growth {
        s += &format!("{:<11} {:>6} {:>7}\n", g.method, opt_slope(g.time_slope), opt_slope(g.memory_slope));
    }
    let worst = report.rows.iter().filter_map(|r| r.rel_diff_vs_backprop).fold(0.0, f64::max);
    s += &format!(
        "\nseconds: median of one gradient (forward solve + backward to x and the parameters), the methods\n\
         interleaved; peak MiB: the heap's largest peak during one gradient above what was live before it\n\
         (exact: kutta counts its allocations); field evals: f(t, y) evaluations per gradient (forward,\n\
         the checkpoint schedule's recomputation, and the backward sweep's re-evaluations to build each\n\
         step's graph); ckpts: stored states; recomputed: forward steps the schedule recomputes.\n\
         reversible is the McCallum-Foster scheme (a different discretisation), not compared with backprop.\n\
         gradient check: checkpoint vs backprop, largest relative difference {worst:.1e} (tolerance {:.0e}): {}\n",
        report.tolerance,
        if report.gradients_agree { "ok" } else { "FAILED (see the warnings above)" }
    );
    s
}

/// `ode.csv`: a header row and one row per (method, steps).
pub fn to_csv(report: &OdeReport) -> String {
    let mut s = String::from(
        "method,steps,checkpoints,batch,width,size,reps,seconds,peak_mib,field_evals,recomputed_steps,rel_diff_vs_backprop\n",
    );
    let opt = |v: Option<String>| v.unwrap_or_default();
    for r in &report.rows {
        s += &format!(
            "{},{},{},{},{},{},{},{:.6},{:.4},{},{},{}\n",
            r.method,
            r.steps,
            opt(r.checkpoints.map(|c| c.to_string())),
            r.batch,
            r.width,
            r.size,
            r.reps,
            r.seconds,
            r.peak_mib,
            r.field_evals,
            opt(r.recomputed_steps.map(|c| c.to_string())),
            opt(r.rel_diff_vs_backprop.map(|d| format!("{d:.3e}"))),
        );
    }
    s
}

/// What a panel of `ode.svg` plots of a row.
type Metric = fn(&OdeRow) -> f64;

/// `ode.svg`: two panels, median seconds and peak MiB against steps, both log-log, one line per
/// method.
pub fn render_svg(report: &OdeReport, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let err = |e: &dyn std::fmt::Display| anyhow!("plot {}: {e}", path.display());
    if report.rows.is_empty() {
        anyhow::bail!("plot: no rows");
    }
    let colors = [RGBColor(31, 119, 180), RGBColor(44, 160, 44), RGBColor(214, 39, 40)];
    // Log axes need positive values; a 0 would only come from a broken clock or counter.
    let pos = |v: f64| if v > 0.0 && v.is_finite() { v } else { 1e-9 };
    let root = SVGBackend::new(path, (1300, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let title = format!("kutta: one gradient through a neural-ODE block ({} threads)", report.threads);
    let root = root.titled(&title, ("sans-serif", 22)).map_err(|e| err(&e))?;
    let panels = root.split_evenly((1, 2));
    let metrics: [(&str, Metric); 2] =
        [("median seconds per gradient", |r| r.seconds), ("peak heap MiB per gradient", |r| r.peak_mib)];
    for (area, (desc, metric)) in panels.iter().zip(metrics) {
        let xs = report.rows.iter().map(|r| r.steps as f64);
        let (xmin, xmax) = xs.fold((f64::INFINITY, 0.0f64), |(lo, hi), x| (lo.min(x), hi.max(x)));
        let ys = report.rows.iter().map(|r| pos(metric(r)));
        let (ymin, ymax) = ys.fold((f64::INFINITY, 0.0f64), |(lo, hi), y| (lo.min(y), hi.max(y)));
        let mut chart = ChartBuilder::on(area)
            .margin(15)
            .x_label_area_size(50)
            .y_label_area_size(80)
            .build_cartesian_2d((xmin / 1.5..xmax * 1.5).log_scale(), (ymin / 2.0..ymax * 2.0).log_scale())
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("steps")
            .y_desc(desc)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| if *y >= 1.0 { format!("{y:.0}") } else { format!("{y:.1e}") })
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 16))
            .draw()
            .map_err(|e| err(&e))?;
        for (method, color) in METHODS.iter().zip(colors) {
            let pts: Vec<(f64, f64)> =
                report.rows.iter().filter(|r| r.method == *method).map(|r| (r.steps as f64, pos(metric(r)))).collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(*method)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled()))).map_err(|e| err(&e))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 15))
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// Write `ode.csv`, `ode.svg` and `ode.json` (the report, rows and all: what `--json` prints)
/// into `dir` (created if needed) and record their paths.
pub fn write_outputs(report: &mut OdeReport, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let csv = dir.join("ode.csv");
    std::fs::write(&csv, to_csv(report)).map_err(|e| Error::io(&csv, e))?;
    let svg = dir.join("ode.svg");
    render_svg(report, &svg)?;
    let json = dir.join("ode.json");
    (report.csv, report.svg, report.json) = (Some(csv), Some(svg), Some(json.clone()));
    let text = serde_json::to_string_pretty(report).context("ode.json")?;
    std::fs::write(&json, text + "\n").map_err(|e| Error::io(&json, e))?;
    Ok(())
}

/// The default output folder: `runs/bench-ode-<unix time>` (as `sweep`'s).
pub fn default_out_dir() -> PathBuf {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    PathBuf::from("runs").join(format!("bench-ode-{t}"))
}

impl From<&OdeArgs> for OdeOptions {
    fn from(a: &OdeArgs) -> Self {
        Self {
            width: a.width,
            batch: a.batch,
            size: a.size,
            tableau: a.tableau.clone(),
            steps: a.steps.clone(),
            checkpoints: a.checkpoints,
            coupling: a.coupling,
            min_seconds: a.min_seconds,
            min_reps: a.min_reps,
            ..Default::default()
        }
    }
}

/// `kutta bench ode`: time, print the table (or JSON), write ode.csv, ode.svg and ode.json.
pub fn main(args: &OdeArgs) -> Result<()> {
    let opts = OdeOptions::from(args);
    // A bad flag is said before the header.
    opts.validate()?;
    let command = opts.command();
    if !args.json {
        // The header first: the larger steps values take minutes.
        eprintln!(
            "kutta bench ode on {} ({} threads)\ncommand: {command}",
            machine_description(),
            kutta_trainer::threads::current()
        );
    }
    let mut report = run(&opts, |line| {
        // A failed check is said even under --json (on stderr: stdout stays JSON).
        if !args.json || line.starts_with("WARNING") {
            eprintln!("  {line}");
        }
    })?;
    report.command = command;
    let out = args.out.clone().unwrap_or_else(default_out_dir);
    write_outputs(&mut report, &out)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", format_table(&report));
        println!(
            "wrote {}, {} and {}",
            out.join("ode.csv").display(),
            out.join("ode.svg").display(),
            out.join("ode.json").display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(method: &str, steps: usize, seconds: f64, peak_mib: f64) -> OdeRow {
        let checkpoint = method == "checkpoint";
        OdeRow {
            method: method.into(),
            steps,
            checkpoints: checkpoint.then(|| default_checkpoints(steps)),
            batch: 2,
            width: 4,
            size: 7,
            reps: 3,
            seconds,
            peak_mib,
            field_evals: 4 * steps as u64,
            recomputed_steps: checkpoint.then_some(5),
            rel_diff_vs_backprop: checkpoint.then_some(1e-7),
        }
    }

    #[test]
    fn slopes_ratios_and_csv() {
        assert!((loglog_slope(&[(8.0, 1.0), (32.0, 4.0), (128.0, 16.0)]).unwrap() - 1.0).abs() < 1e-12);
        assert!(loglog_slope(&[(8.0, 3.0), (512.0, 3.0)]).unwrap().abs() < 1e-12);
        assert_eq!(loglog_slope(&[(8.0, 3.0)]), None);
        assert_eq!(loglog_slope(&[(8.0, 0.0), (16.0, 1.0)]), None);
        assert_eq!(max_rel_diff(&[vec![1.0, 2.0]], &[vec![1.0, 2.0]]), 0.0);
        assert!((max_rel_diff(&[vec![3.0], vec![1.1]], &[vec![3.0], vec![1.0]]) - 0.1).abs() < 1e-6);

        let rows: Vec<OdeRow> = [8, 32]
            .into_iter()
            .flat_map(|s| {
                let k = s as f64;
                [row("backprop", s, k, k), row("checkpoint", s, 2.0 * k, 2.0), row("reversible", s, 4.0 * k, 1.0)]
            })
            .collect();
        let (ratios, growth) = summarise(&rows, &[8, 32]);
        assert_eq!(ratios.len(), 2);
        assert_eq!(
            (ratios[1].time_checkpoint_over_reversible, ratios[1].memory_checkpoint_over_reversible),
            (0.5, 2.0)
        );
        assert_eq!((ratios[0].time_reversible_over_backprop, ratios[0].memory_reversible_over_backprop), (4.0, 0.125));
        let slope = |m: &str, f: fn(&OdeGrowth) -> Option<f64>| f(growth.iter().find(|g| g.method == m).unwrap());
        assert!((slope("backprop", |g| g.memory_slope).unwrap() - 1.0).abs() < 1e-12);
        assert!(slope("reversible", |g| g.memory_slope).unwrap().abs() < 1e-12);

        let report = OdeReport {
            machine: "test cpu".into(),
            threads: 2,
            block: "block".into(),
            params: 10,
            rows,
            ratios,
            growth,
            gradients_agree: true,
            tolerance: CHECK_TOLERANCE,
            command: "kutta bench ode".into(),
            csv: None,
            svg: None,
            json: None,
        };
        let csv = to_csv(&report);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines.len(), 7);
        assert_eq!(lines[2], "checkpoint,8,3,2,4,7,3,16.000000,2.0000,32,5,1.000e-7");
        assert_eq!(lines[1], "backprop,8,,2,4,7,3,8.000000,8.0000,32,,");
        let cols = lines[0].split(',').count();
        assert!(lines.iter().all(|l| l.split(',').count() == cols));
        let table = format_table(&report);
        assert!(table.contains("command: kutta bench ode") && table.contains(": ok"), "{table}");
        let dir = tempfile::tempdir().unwrap();
        let mut report = report;
        write_outputs(&mut report, dir.path()).unwrap();
        let svg = std::fs::read_to_string(dir.path().join("ode.svg")).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("peak heap MiB") && svg.contains("reversible"));
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("ode.json")).unwrap()).unwrap();
        assert_eq!(json["rows"].as_array().unwrap().len(), 6);
    }

    #[test]
    fn bad_options_name_the_flag() {
        let err = |o: OdeOptions| run(&o, |_| {}).unwrap_err().to_string();
        let d = OdeOptions::default();
        assert!(err(OdeOptions { steps: vec![8, 0], ..d.clone() }).contains("--steps"));
        assert!(err(OdeOptions { steps: vec![], ..d.clone() }).contains("--steps"));
        assert!(err(OdeOptions { width: 0, ..d.clone() }).contains("--width"));
        assert!(err(OdeOptions { coupling: 1.5, ..d.clone() }).contains("--coupling"));
        assert!(err(OdeOptions { tableau: "rk5".into(), ..d.clone() }).contains("--tableau"));
        assert!(err(OdeOptions { min_reps: 0, ..d }).contains("--min-reps"));
    }
}
