//! `kutta bench steps`: median wall-clock time of one optimizer step and of one gradient evaluation
//! for sgd, adam, rk4 and rk4 with all three of the paper's modifications, on the MLP, at several
//! batch sizes — all measured in one run, so the ratios compare like with like. `kutta bench` with
//! no subcommand runs this bench too.

use super::StepsArgs;
use anyhow::{anyhow, Result};
use kutta_trainer::config::Config;
use kutta_trainer::data::{sampler::BatchSampler, Dataset};
use kutta_trainer::kernels::SolverKernels;
use kutta_trainer::model::{self, ModelField};
use kutta_trainer::train::{build_model, build_optimizer_on, load_data, solver_kernels};
use kutta_trainer::Error;
use serde::Serialize;
use std::time::Instant;

/// The default `--batch-sizes` (`BenchOptions::default`'s).
pub const BATCH_SIZES: &str = "16,128,1024,8192";
/// The default `--min-reps`.
pub const MIN_REPS: usize = 5;

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub batch_sizes: Vec<usize>,
    /// Keep timing each batch size until (this many seconds × variants) have passed…
    pub min_seconds: f64,
    /// …and at least this many steps (after one warm-up step)…
    pub min_reps: usize,
    /// …but never more than this many.
    pub max_reps: usize,
    /// Config whose model and data are used (defaults: the paper's MLP on Fashion-MNIST).
    pub base: Config,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            batch_sizes: vec![16, 128, 1024, 8192],
            min_seconds: super::MIN_SECONDS,
            min_reps: MIN_REPS,
            max_reps: 200,
            base: Config::default(),
        }
    }
}

/// The optimizers compared: (label, config overrides).
pub fn variants() -> Vec<(&'static str, Vec<&'static str>)> {
    vec![
        ("sgd", vec!["optimizer.kind=sgd", "optimizer.lr=0.01"]),
        ("adam", vec!["optimizer.kind=adam", "optimizer.lr=0.001"]),
        ("rk4", vec!["optimizer.kind=rk", "optimizer.tableau=rk4", "optimizer.lr=0.003"]),
        (
            "rk4+pre+dalr+mom",
            vec![
                "optimizer.kind=rk",
                "optimizer.tableau=rk4",
                "optimizer.lr=1.0",
                "optimizer.preconditioner=modified-adagrad",
                "optimizer.step_size=dalr",
                "optimizer.momentum=0.95",
            ],
        ),
    ]
}

/// The config of optimizer variant `label` (`variants`) at `batch_size`: the model, data and
/// training keys of `base`, and a fresh `[optimizer]` table with the variant's overrides (so that
/// a base config's own optimizer keys, e.g. `momentum` for `kind = "momentum"`, do not clash).
pub fn variant_config(base: &Config, label: &str, batch_size: usize) -> Result<Config> {
    let (_, sets) = variants()
        .into_iter()
        .find(|(l, _)| *l == label)
        .ok_or_else(|| anyhow!("bench: no optimizer variant {label:?}"))?;
    let mut fresh = base.clone();
    fresh.optimizer = Default::default();
    let sets: Vec<String> =
        sets.iter().map(|s| s.to_string()).chain([format!("train.batch_size={batch_size}")]).collect();
    Ok(Config::from_toml_str(&fresh.to_toml(), &sets)?)
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchRow {
    pub optimizer: String,
    pub batch_size: usize,
    pub reps: usize,
    pub median_step_ms: f64,
    pub median_grad_eval_ms: f64,
    pub grad_evals_per_step: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub machine: String,
    pub threads: usize,
    pub model: String,
    pub data: String,
    pub rows: Vec<BenchRow>,
    /// (batch size, median rk4 step / median sgd step) — 4.0 is the arithmetic floor.
    pub rk4_over_sgd: Vec<(usize, f64)>,
}

pub fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    let n = xs.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        0.5 * (xs[n / 2 - 1] + xs[n / 2])
    }
}

/// Real training images when the data directory is readable, random ones of the format's shape
/// otherwise (step time does not depend on pixel values; CIFAR cannot be downloaded everywhere).
pub fn bench_data(base: &Config) -> (Dataset, String) {
    match load_data(base) {
        Ok((train, _)) => (train, format!("{:?} from {}", base.data.format, base.data.dir.display())),
        Err(e) => {
            let (shape, classes) = base.data.image_shape_and_classes();
            let n = 10_000;
            let d: usize = shape.iter().product();
            let mut state = 0x9E37_79B9_7F4A_7C15u64;
            let mut next = || {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state
            };
            let images = (0..n * d).map(|_| (next() >> 40) as f32 / (1u64 << 24) as f32).collect();
            let labels = (0..n).map(|_| (next() % classes as u64) as u32).collect();
            (
                Dataset::from_f32(images, labels, shape, classes),
                format!("random images of {}×{}×{} ({e})", shape[0], shape[1], shape[2]),
            )
        }
    }
}

/// Times every variant at each batch size. The variants are interleaved — one step of each per
/// round, in rotating order — so that drift in the machine's speed (other load, frequency
/// scaling) falls on all of them alike instead of on whichever ran last.
pub fn run(opts: &BenchOptions, mut on_row: impl FnMut(&BenchRow)) -> Result<BenchReport> {
    let (data, data_desc) = bench_data(&opts.base);
    let model = build_model(&opts.base, &data)?;
    // train.device of the base config: the GPU when there is one (`auto`), as in training.
    let device = kutta_trainer::device::for_config(&opts.base)?;
    // On a GPU the RK variants run the GPU solver (as training does); the baselines stay on the host.
    let (kernels, _) = solver_kernels(&opts.base, &device, false)?;
    let theta0 = model::init_params(model.as_ref(), 0);
    let group = model.batch_multiple();
    if let Some(bs) = opts.batch_sizes.iter().find(|&&bs| bs % group != 0) {
        return Err(Error::config(
            "--batch-sizes",
            format!("{bs} is not a multiple of model.bn_group = {group} (batch norm's ghost batch); pass batch sizes that are, or --set model.bn_group=N"),
        )
        .into());
    }
    let variants = variants();
    let mut rows = Vec::new();
    for &bs in &opts.batch_sizes {
        let mut opts_for_size = Vec::new();
        for (label, _) in &variants {
            opts_for_size.push(build_optimizer_on(&variant_config(&opts.base, label, bs)?, &kernels)?);
        }
        let mut field = ModelField::new(model.as_ref(), &data);
        field.set_device(device.clone());
        field.use_solver_kernels(&kernels);
        let n = opts_for_size.len();
        let cells = time_interleaved(opts_for_size, &theta0, &mut field, data.len(), bs, |reps, secs| {
            reps >= opts.max_reps || (reps >= opts.min_reps && secs >= opts.min_seconds * n as f64)
        })?;
        for ((label, _), mut cell) in variants.iter().zip(cells) {
            let reps = cell.step_ms.len();
            let row = BenchRow {
                optimizer: label.to_string(),
                batch_size: bs,
                reps,
                median_step_ms: median(&mut cell.step_ms),
                median_grad_eval_ms: median(&mut cell.eval_ms),
                grad_evals_per_step: cell.evals as f64 / reps as f64,
            };
            on_row(&row);
            rows.push(row);
        }
    }
    let find =
        |opt: &str, bs: usize| rows.iter().find(|r| r.optimizer == opt && r.batch_size == bs).map(|r| r.median_step_ms);
    let rk4_over_sgd =
        opts.batch_sizes.iter().filter_map(|&bs| Some((bs, find("rk4", bs)? / find("sgd", bs)?))).collect();
    Ok(BenchReport {
        machine: placement(&device, &kernels),
        threads: kutta_trainer::threads::current(),
        model: model.describe(),
        data: data_desc,
        rows,
        rk4_over_sgd,
    })
}

/// Step times of optimizers timed side by side.
pub struct Timed {
    pub step_ms: Vec<f64>,
    pub eval_ms: Vec<f64>,
    pub evals: u64,
}

/// Time `optimizers` on the same batches, interleaved: each round takes one step of each, in
/// rotating order, so drift in the machine's speed falls on all alike. Round 0 is warm-up
/// (allocation, caches, DALR's first-step probe) and is not timed; `stop(timed rounds, seconds
/// since warm-up)` ends the loop. Gathering each batch is outside the timed steps, as in training.
pub fn time_interleaved(
    optimizers: Vec<Box<dyn kutta_trainer::optim::Optimizer<f32>>>,
    theta0: &[f32],
    field: &mut ModelField<'_>,
    samples: usize,
    batch_size: usize,
    stop: impl Fn(usize, f64) -> bool,
) -> Result<Vec<Timed>> {
    let n = optimizers.len();
    let mut cells: Vec<(_, Vec<f32>, Timed)> = optimizers
        .into_iter()
        .map(|o| (o, theta0.to_vec(), Timed { step_ms: vec![], eval_ms: vec![], evals: 0 }))
        .collect();
    let mut sampler = BatchSampler::new(samples, batch_size, 0, true);
    let mut timed_since = Instant::now();
    for step in 0u64.. {
        field.set_batch(&sampler.batch(step), batch_size);
        for c in 0..n {
            let (opt, theta, timed) = &mut cells[(c + step as usize) % n];
            let t = Instant::now();
            let r = opt.step(step, theta, field)?;
            // A GPU step may return with work still queued (the GPU solver's last copies):
            // finish it here so it is not charged to the next optimizer.
            field.synchronize()?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            if step > 0 {
                timed.step_ms.push(ms);
                timed.eval_ms.push(ms / r.grad_evals as f64);
                timed.evals += r.grad_evals;
            }
        }
        if step == 0 {
            timed_since = Instant::now();
        } else if stop(step as usize, timed_since.elapsed().as_secs_f64()) {
            break;
        }
    }
    Ok(cells.into_iter().map(|(_, _, t)| t).collect())
}

/// The machine line of a benchmark report: the CPU, where the model runs and where each
/// optimizer's buffer arithmetic runs. On a GPU only the RK solver has kernels; sgd and adam
/// download each gradient and upload θ, which their step times include.
pub fn placement(device: &candle_core::Device, kernels: &SolverKernels) -> String {
    let arith = match (device.is_cpu(), kernels.is_some()) {
        (true, _) => "",
        (false, true) => ", RK solver on the GPU, sgd/adam arithmetic on the host",
        (false, false) => ", optimizer arithmetic on the host",
    };
    format!("{}, model on {}{arith}", machine_description(), kutta_trainer::device::describe(device))
}

/// CPU model name from /proc/cpuinfo (Linux), or the architecture.
pub fn machine_description() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

pub fn format_table(report: &BenchReport) -> String {
    let mut s = format!(
        "machine: {} ({} threads)\nmodel:   {}\ndata:    {}\n\n{:<18} {:>7} {:>6} {:>14} {:>16} {:>11}\n",
        report.machine,
        report.threads,
        report.model,
        report.data,
        "optimizer",
        "batch",
        "reps",
        "step ms (med)",
        "grad-eval ms",
        "evals/step"
    );
    for r in &report.rows {
        s += &format!(
            "{:<18} {:>7} {:>6} {:>14.3} {:>16.3} {:>11.2}\n",
            r.optimizer, r.batch_size, r.reps, r.median_step_ms, r.median_grad_eval_ms, r.grad_evals_per_step
        );
    }
    s += "\nrk4 / sgd step time (4 gradient evaluations make 4.0 the floor):\n";
    for (bs, ratio) in &report.rk4_over_sgd {
        s += &format!("  batch {bs:>6}: {ratio:.2}\n");
    }
    s
}

/// `kutta bench steps`: time, then print the table and the line that reproduces the run (or JSON).
pub fn main(args: &StepsArgs) -> Result<()> {
    let StepsArgs { batch_sizes, min_seconds, min_reps, model, json, .. } = args;
    let base = model.base()?;
    if batch_sizes.contains(&0) {
        anyhow::bail!("--batch-sizes: batch sizes must be positive");
    }
    let (min_seconds, min_reps) = (*min_seconds, *min_reps);
    let opts = BenchOptions { batch_sizes: batch_sizes.clone(), min_seconds, min_reps, base, ..Default::default() };
    let report = run(&opts, |r| {
        if !json {
            let (opt, bs, ms) = (&r.optimizer, r.batch_size, r.median_step_ms);
            eprintln!("  {opt:<18} batch {bs:>6}: {ms:>10.3} ms/step ({} steps)", r.reps);
        }
    })?;
    if *json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{}", format_table(&report));
        println!(
            "reproduce: kutta bench steps{} --batch-sizes {} --min-seconds {min_seconds} --min-reps {min_reps}",
            model.reproduce_args(),
            opts.batch_sizes.iter().map(|b| b.to_string()).collect::<Vec<_>>().join(",")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&mut []).is_nan());
    }
}
