//! `kutta bench vs-pytorch`: one training step — forward + backward (mean cross-entropy) + plain
//! SGD update (lr 0.01) — timed in kutta and in PyTorch side by side, in one run, on the same
//! CPU threads: the MLP 784-500-500-500-10 at several batch sizes and the CIFAR ResNet-18 (width
//! 64, train-mode batch norm over the whole batch) at batch 128.
//!
//! PyTorch runs as a persistent child process, `scripts/pytorch_step_server.py` (embedded in the
//! binary with the two scripts it imports, written to a temporary folder at start, so `kutta`
//! runs it from anywhere), which builds each model once and answers line requests
//! (`mlp 128 5 1`: one warm-up step, five timed, the times as JSON). The two take turns at each
//! batch size — a few steps of kutta, the same number of PyTorch, the order alternating every
//! round — so drift in the machine's speed (other load, frequency scaling) falls on both alike.
//! A turn is about `TURN_SECONDS` of the slower side's steps; while steps are short each turn
//! starts with one untimed step (the other side has just evicted the caches), as a standalone
//! benchmark loop would have them warm.
//!
//! kutta's step is the `sgd` variant of `kutta bench steps` (`variant_config`), on Fashion-MNIST
//! for the MLP (random inputs when the files are missing) and random CIFAR-shaped images for the
//! ResNet (`bench_data`; `model.bn_group` = the batch, as PyTorch's `BatchNorm2d` in train
//! mode); PyTorch's MLP inputs are random (step time does not depend on pixel values).
//!
//! Without PyTorch (the python is missing or cannot import torch) the bench says so loudly on
//! stderr and in the report, with the command that installs it, and still measures kutta's
//! column: the exit status is 0. A PyTorch failure later in the run (the server dies, torchvision
//! is missing for the ResNet) leaves the PyTorch cells empty with the reason, likewise.

use super::steps::{bench_data, machine_description, median, variant_config};
use super::VsPytorchArgs;
use anyhow::{anyhow, bail, Context, Result};
use kutta_trainer::config::Config;
use kutta_trainer::data::{sampler::BatchSampler, Dataset};
use kutta_trainer::model::{self, ModelField};
use kutta_trainer::optim::Optimizer;
use kutta_trainer::threads::Choice;
use kutta_trainer::train::{build_model, build_optimizer_on};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Instant;

/// The default `--batch-sizes` (the MLP).
pub const BATCH_SIZES: &str = "16,128,1024,8192";
/// The default `--resnet-batch-sizes`.
pub const RESNET_BATCH_SIZES: &str = "128";
/// The default `--min-reps`.
pub const MIN_REPS: usize = 5;
/// Timed steps of each side at one batch size never exceed this.
pub const MAX_REPS: usize = 200;
/// A turn is about this long (the slower side's steps), at least one step, at most `MAX_TURN`.
pub const TURN_SECONDS: f64 = 0.25;
const MAX_TURN: usize = 50;
/// Steps shorter than this get one untimed step at the start of every turn.
const WARM_TURN_BELOW_S: f64 = 0.1;
/// The ViT-S/16 workload's images (ImageNet at 224 pixels).
const VIT_IMAGE: [usize; 3] = [3, 224, 224];
/// The ResNet-18's base width (`model.width`, the server's `--width`).
pub const RESNET_WIDTH: usize = 64;

/// The PyTorch side's scripts, embedded (the server imports the other two from its folder).
const SCRIPTS: [(&str, &str); 3] = [
    ("pytorch_step_server.py", include_str!("../../../scripts/pytorch_step_server.py")),
    ("pytorch_resnet_step.py", include_str!("../../../scripts/pytorch_resnet_step.py")),
    ("torchvision_resnet.py", include_str!("../../../scripts/torchvision_resnet.py")),
];

/// Where the torch venv lives by default (`scripts/` and the README use the same path).
pub const TORCH_VENV_PYTHON: &str = ".cache/kutta/torch-venv/bin/python";

/// The python that runs PyTorch: `--python`, else `$KUTTA_TORCH_PYTHON`, else
/// `~/.cache/kutta/torch-venv/bin/python` when it exists, else `python3`.
pub fn default_python(flag: Option<&Path>) -> PathBuf {
    if let Some(p) = flag {
        return p.to_path_buf();
    }
    if let Some(p) = std::env::var_os("KUTTA_TORCH_PYTHON").filter(|p| !p.is_empty()) {
        return p.into();
    }
    if let Some(venv) = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(TORCH_VENV_PYTHON)) {
        if venv.exists() {
            return venv;
        }
    }
    "python3".into()
}

/// What the PyTorch server says about itself at start.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TorchInfo {
    pub torch: String,
    pub threads: usize,
    pub interop_threads: usize,
    pub python: String,
    /// Which CPU kernels torch uses (oneDNN, MKL, BLAS, the CPU capability).
    pub backends: Vec<String>,
}

/// The PyTorch child process (`scripts/pytorch_step_server.py`).
pub struct Torch {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub info: TorchInfo,
    /// The temporary folder holding the scripts, removed on drop.
    dir: PathBuf,
}

impl Torch {
    /// Start the server with `python` on `threads` threads; `Err` says why PyTorch is not
    /// available (the python cannot start, torch cannot be imported, the server misbehaves).
    pub fn start(python: &Path, threads: usize, width: usize) -> Result<Torch, String> {
        let dir = std::env::temp_dir().join(format!("kutta-vs-pytorch-{}", std::process::id()));
        let written = std::fs::create_dir_all(&dir)
            .and_then(|()| SCRIPTS.iter().try_for_each(|(name, text)| std::fs::write(dir.join(name), text)));
        if let Err(e) = written {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(format!("cannot write the PyTorch scripts to {}: {e}", dir.display()));
        }
        let n = threads.to_string();
        let spawned = Command::new(python)
            .arg(dir.join(SCRIPTS[0].0))
            .args(["--threads", &n, "--width", &width.to_string()])
            // torch.set_num_threads sets the intra-op pool; these cover MKL and OpenMP themselves.
            .envs([("OMP_NUM_THREADS", &n), ("MKL_NUM_THREADS", &n)])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(format!("cannot start `{}`: {e}", python.display()));
            }
        };
        let (stdin, stdout) = (child.stdin.take().expect("piped"), child.stdout.take().expect("piped"));
        let mut stdout = BufReader::new(stdout);
        let mut line = String::new();
        let ready = stdout.read_line(&mut line).map_err(|e| e.to_string()).and_then(|_| {
            let v: serde_json::Value = serde_json::from_str(&line).map_err(|_| {
                format!("`{}` did not start the PyTorch server (it said {:?})", python.display(), line.trim())
            })?;
            if v["ready"] != true {
                let error = v["error"].as_str().unwrap_or("the server did not say why");
                return Err(format!("`{}` cannot import torch ({error})", python.display()));
            }
            serde_json::from_value::<TorchInfo>(v).map_err(|e| format!("the PyTorch server's greeting: {e}"))
        });
        match ready {
            Ok(info) => Ok(Torch { child, stdin, stdout, info, dir }),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    /// `warmup` untimed and `reps` timed training steps of `model` ("mlp", "resnet") at
    /// `batch_size`: the timed steps' milliseconds.
    pub fn steps(&mut self, model: &str, batch_size: usize, reps: usize, warmup: usize) -> Result<Vec<f64>> {
        writeln!(self.stdin, "{model} {batch_size} {reps} {warmup}")
            .and_then(|()| self.stdin.flush())
            .context("the PyTorch server is gone")?;
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("the PyTorch server exited (its stderr is above)");
        }
        let v: serde_json::Value = serde_json::from_str(&line).with_context(|| format!("PyTorch server: {line:?}"))?;
        if let Some(e) = v["error"].as_str() {
            bail!("PyTorch: {e}");
        }
        let times: Vec<f64> = serde_json::from_value(v["step_ms"].clone()).context("PyTorch server: step_ms")?;
        anyhow::ensure!(times.len() == reps, "PyTorch server: {} times for {reps} steps", times.len());
        Ok(times)
    }
}

impl Drop for Torch {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit").and_then(|()| self.stdin.flush());
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// kutta's side of one (model, batch size): one SGD training run, continued turn after turn.
struct KuttaSide<'a> {
    opt: Box<dyn Optimizer<f32>>,
    theta: Vec<f32>,
    field: ModelField<'a>,
    sampler: BatchSampler,
    step: u64,
    batch_size: usize,
}

impl KuttaSide<'_> {
    /// `warmup` untimed and `reps` timed steps: the timed steps' milliseconds. Gathering each
    /// batch is outside the timed step, as in training.
    fn steps(&mut self, reps: usize, warmup: usize) -> Result<Vec<f64>> {
        let mut times = Vec::with_capacity(reps);
        for i in 0..warmup + reps {
            self.field.set_batch(&self.sampler.batch(self.step), self.batch_size);
            let t = Instant::now();
            self.opt.step(self.step, &mut self.theta, &mut self.field)?;
            self.field.synchronize()?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            if i >= warmup {
                times.push(ms);
            }
            self.step += 1;
        }
        Ok(times)
    }
}

/// One model's row at one batch size.
#[derive(Clone, Debug, Serialize)]
pub struct VsRow {
    /// "mlp" or "resnet18".
    pub model: String,
    pub batch_size: usize,
    /// Timed steps of kutta, and of PyTorch when it ran (the same number).
    pub reps: usize,
    pub kutta_median_ms: f64,
    pub pytorch_median_ms: Option<f64>,
    pub kutta_over_pytorch: Option<f64>,
    /// Why the PyTorch cell is empty.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pytorch_error: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ModelInfo {
    pub name: String,
    /// kutta's description of the model (`Model::describe`).
    pub model: String,
    /// kutta's data; PyTorch's inputs are random of the same shape.
    pub data: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct VsReport {
    /// CPU model name (/proc/cpuinfo).
    pub machine: String,
    /// CPUs this process may run on.
    pub cores: usize,
    pub kutta_threads: usize,
    pub kutta_threads_reason: String,
    pub step: String,
    /// PyTorch's version, threads and CPU kernels; absent without PyTorch.
    pub pytorch: Option<TorchInfo>,
    /// Why PyTorch was not measured (`missing_message` adds the install command).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pytorch_missing: Option<String>,
    pub models: Vec<ModelInfo>,
    pub rows: Vec<VsRow>,
    pub reproduce: String,
}

const STEP: &str = "forward + backward (mean cross-entropy) + plain SGD update (lr 0.01), one process, CPU";

/// A model timed: its name in the table, its name for the server, its config, its batch sizes.
struct Workload {
    name: &'static str,
    server_model: &'static str,
    base: Config,
    batch_sizes: Vec<usize>,
}

/// The MLP and (unless `--no-resnet`) the ResNet-18.
fn workloads(args: &VsPytorchArgs) -> Result<Vec<Workload>> {
    let cpu = ["train.device=cpu".to_string()];
    let mlp = Config::from_toml_str("", &cpu)?;
    let mut out = vec![Workload { name: "MLP", server_model: "mlp", base: mlp, batch_sizes: args.batch_sizes.clone() }];
    if !args.no_resnet && !args.resnet_batch_sizes.is_empty() {
        let sets = ["model.kind=resnet18".into(), format!("model.width={RESNET_WIDTH}"), "data.format=cifar10".into()];
        let resnet = Config::from_toml_str("", &[&cpu[..], &sets[..]].concat())?;
        let batch_sizes = args.resnet_batch_sizes.clone();
        out.push(Workload { name: "ResNet-18", server_model: "resnet", base: resnet, batch_sizes });
    }
    if !args.vit_batch_sizes.is_empty() {
        let sets = ["model.kind=vit".to_string(), "model.preset=vit-s16".into()];
        let vit = Config::from_toml_str("", &[&cpu[..], &sets[..]].concat())?;
        out.push(Workload {
            name: "ViT-S/16",
            server_model: "vit",
            base: vit,
            batch_sizes: args.vit_batch_sizes.clone(),
        });
    }
    Ok(out)
}

/// Time every (model, batch size), kutta and PyTorch (when `torch` is there) in alternating
/// turns. `on_row` sees each row as it is done.
pub fn run(
    args: &VsPytorchArgs,
    threads: &Choice,
    mut torch: Option<Torch>,
    pytorch_missing: Option<String>,
    mut on_row: impl FnMut(&VsRow),
) -> Result<VsReport> {
    let mut models = Vec::new();
    let mut rows = Vec::new();
    for Workload { name, server_model, base, batch_sizes } in workloads(args)? {
        let (data, data_desc) = if server_model == "vit" {
            // ImageNet's shape: random images (step time does not depend on pixel values).
            let (shape, classes) = (VIT_IMAGE, 1000);
            let n = batch_sizes.iter().copied().max().unwrap_or(1);
            (Dataset::random(n, shape, classes, 0), format!("random images of {}×{}×{}", shape[0], shape[1], shape[2]))
        } else {
            bench_data(&base)
        };
        // Random images are expected here for the ResNet: keep the description, not the reason.
        let data_desc = match data_desc.split_once(" (") {
            Some((random, _)) if random.starts_with("random images") => random.to_string(),
            _ => data_desc,
        };
        let mut described = None;
        for &bs in &batch_sizes {
            // Batch norm over the whole batch (PyTorch's train mode): one ghost batch of bs.
            let base = if server_model == "resnet" {
                Config::from_toml_str(&base.to_toml(), &[format!("model.bn_group={bs}")])?
            } else {
                base.clone()
            };
            let model = build_model(&base, &data)?;
            described.get_or_insert_with(|| model.describe());
            let row = time_pair(name, server_model, &base, model.as_ref(), &data, bs, args, &mut torch)?;
            on_row(&row);
            rows.push(row);
        }
        models.push(ModelInfo { name: name.into(), model: described.unwrap_or_default(), data: data_desc });
    }
    let pytorch = torch.as_ref().map(|t| t.info.clone());
    Ok(VsReport {
        machine: machine_description(),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        kutta_threads: kutta_trainer::threads::current(),
        kutta_threads_reason: threads.reason.clone(),
        step: STEP.into(),
        pytorch,
        pytorch_missing,
        models,
        rows,
        reproduce: reproduce(args, threads),
    })
}

/// One (model, batch size): kutta and PyTorch in alternating turns until each has `min_reps`
/// timed steps and `2 × min_seconds` have passed (or `MAX_REPS`).
#[allow(clippy::too_many_arguments)]
fn time_pair(
    name: &str,
    server_model: &str,
    base: &Config,
    model: &dyn model::Model,
    data: &Dataset,
    bs: usize,
    args: &VsPytorchArgs,
    torch: &mut Option<Torch>,
) -> Result<VsRow> {
    let cfg = variant_config(base, "sgd", bs)?;
    let mut field = ModelField::new(model, data);
    field.set_device(candle_core::Device::Cpu);
    let mut kutta = KuttaSide {
        opt: build_optimizer_on(&cfg, &None)?,
        theta: model::init_params(model, 0),
        field,
        sampler: BatchSampler::new(data.len(), bs, 0, true),
        step: 0,
        batch_size: bs,
    };
    let mut pytorch_error = None;
    let mut torch_turn = |reps: usize, warmup: usize, torch: &mut Option<Torch>| -> Option<Vec<f64>> {
        let t = torch.as_mut()?;
        match t.steps(server_model, bs, reps, warmup) {
            Ok(times) => Some(times),
            Err(e) => {
                eprintln!("warning: {name} batch {bs}: {e:#}; PyTorch's column stays empty");
                pytorch_error = Some(format!("{e:#}"));
                None
            }
        }
    };
    // The first turn: one warm-up step each and one timed step, which sizes the turns.
    let (mut k_ms, mut t_ms) = (kutta.steps(1, 1)?, Vec::new());
    let mut torch_ok = torch.is_some();
    match torch_turn(1, 1, torch) {
        Some(times) => t_ms = times,
        None => torch_ok = false,
    }
    let start = Instant::now();
    for round in 1.. {
        let reps = k_ms.len();
        let enough = reps >= args.min_reps && start.elapsed().as_secs_f64() >= 2.0 * args.min_seconds;
        if reps >= MAX_REPS || enough {
            break;
        }
        let slower_s = k_ms.iter().chain(&t_ms).fold(0.0f64, |m, &x| m.max(x)) / 1e3;
        let per_turn = ((TURN_SECONDS / slower_s.max(1e-6)) as usize).clamp(1, MAX_TURN).min(MAX_REPS - reps);
        let warmup = usize::from(slower_s < WARM_TURN_BELOW_S);
        let mut torch_side = |t_ms: &mut Vec<f64>| {
            if torch_ok {
                match torch_turn(per_turn, warmup, torch) {
                    Some(times) => t_ms.extend(times),
                    None => torch_ok = false,
                }
            }
        };
        if round % 2 == 0 {
            torch_side(&mut t_ms);
            k_ms.extend(kutta.steps(per_turn, warmup)?);
        } else {
            k_ms.extend(kutta.steps(per_turn, warmup)?);
            torch_side(&mut t_ms);
        }
    }
    let reps = k_ms.len();
    let kutta_median_ms = median(&mut k_ms);
    let pytorch_median_ms = (torch_ok && t_ms.len() == reps).then(|| median(&mut t_ms));
    if pytorch_median_ms.is_none() && torch.is_some() && pytorch_error.is_none() {
        pytorch_error = Some("PyTorch stopped answering".into());
    }
    Ok(VsRow {
        model: row_model(server_model).into(),
        batch_size: bs,
        reps,
        kutta_median_ms,
        pytorch_median_ms,
        kutta_over_pytorch: pytorch_median_ms.map(|p| kutta_median_ms / p),
        pytorch_error,
    })
}

/// The `model` of a row: the server's name for the model, as kutta names it.
fn row_model(server_model: &str) -> &'static str {
    match server_model {
        "resnet" => "resnet18",
        "vit" => "vit-s16",
        _ => "mlp",
    }
}

fn join(xs: &[usize]) -> String {
    xs.iter().map(|b| b.to_string()).collect::<Vec<_>>().join(",")
}

/// The command that reproduces this run (with the thread count made explicit).
pub fn reproduce(args: &VsPytorchArgs, threads: &Choice) -> String {
    let mut s =
        format!("kutta --threads {} bench vs-pytorch --batch-sizes {}", threads.threads, join(&args.batch_sizes));
    if args.no_resnet || args.resnet_batch_sizes.is_empty() {
        s += " --no-resnet";
    } else {
        s += &format!(" --resnet-batch-sizes {}", join(&args.resnet_batch_sizes));
    }
    if !args.vit_batch_sizes.is_empty() {
        s += &format!(" --vit-batch-sizes {}", join(&args.vit_batch_sizes));
    }
    s += &format!(" --min-seconds {} --min-reps {}", args.min_seconds, args.min_reps);
    if let Some(p) = &args.python {
        s += &format!(" --python {}", p.display());
    }
    s
}

/// How to install PyTorch where `default_python` finds it.
pub const INSTALL: &str = "python3 -m venv ~/.cache/kutta/torch-venv && ~/.cache/kutta/torch-venv/bin/pip install torch torchvision safetensors";

/// The loud message when PyTorch is not there: why, and how to install it.
pub fn missing_message(reason: &str) -> String {
    format!(
        "PyTorch is NOT AVAILABLE: {reason}. Only kutta's column is measured.\n\
         Install it:  {INSTALL}\n\
         (that venv is found by itself; or pass --python PATH, or set KUTTA_TORCH_PYTHON)"
    )
}

fn ms(x: Option<f64>) -> String {
    x.map_or("—".into(), |v| format!("{v:.3}"))
}

pub fn format_table(r: &VsReport) -> String {
    let mut s = format!("machine: {}, {} cores\n", r.machine, r.cores);
    s += &format!("kutta:   {} compute threads ({})\n", r.kutta_threads, r.kutta_threads_reason);
    match (&r.pytorch, &r.pytorch_missing) {
        (Some(t), _) => {
            s += &format!(
                "pytorch: torch {}, {} threads (interop {}), {}\n",
                t.torch, t.threads, t.interop_threads, t.python
            );
            for line in t.backends.iter().skip(1) {
                s += &format!("         {line}\n");
            }
        }
        (None, Some(why)) => {
            s += &format!("pytorch: NOT AVAILABLE — {why}\n");
            s += &format!("         install: {INSTALL}\n");
        }
        (None, None) => s += "pytorch: not run\n",
    }
    s += &format!("step:    {} (median over reps; kutta and PyTorch in alternating turns)\n", r.step);
    for m in &r.models {
        s += &format!("\n{}: kutta {} on {}; PyTorch on random inputs of the same shape\n", m.name, m.model, m.data);
        s += &format!("{:>7} {:>12} {:>12} {:>14} {:>6}\n", "batch", "kutta ms", "pytorch ms", "kutta/pytorch", "reps");
        let key = match m.name.as_str() {
            "MLP" => "mlp",
            "ViT-S/16" => "vit-s16",
            _ => "resnet18",
        };
        for row in r.rows.iter().filter(|row| row.model == key) {
            s += &format!(
                "{:>7} {:>12.3} {:>12} {:>14} {:>6}\n",
                row.batch_size,
                row.kutta_median_ms,
                ms(row.pytorch_median_ms),
                row.kutta_over_pytorch.map_or("—".into(), |x| format!("{x:.2}")),
                row.reps
            );
            if let Some(e) = &row.pytorch_error {
                s += &format!("        (PyTorch: {e})\n");
            }
        }
    }
    s
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// One line per row: model, batch, reps, both medians, the ratio, both thread counts, torch's
/// version and the CPU.
pub fn csv(r: &VsReport) -> String {
    let mut s = String::from(
        "model,batch_size,reps,kutta_median_ms,pytorch_median_ms,kutta_over_pytorch,kutta_threads,pytorch_threads,torch,cpu\n",
    );
    let opt = |x: Option<f64>| x.map_or(String::new(), |v| format!("{v}"));
    for row in &r.rows {
        let fields = [
            row.model.clone(),
            row.batch_size.to_string(),
            row.reps.to_string(),
            format!("{}", row.kutta_median_ms),
            opt(row.pytorch_median_ms),
            opt(row.kutta_over_pytorch),
            r.kutta_threads.to_string(),
            r.pytorch.as_ref().map_or(String::new(), |t| t.threads.to_string()),
            r.pytorch.as_ref().map_or(String::new(), |t| t.torch.clone()),
            r.machine.clone(),
        ];
        s += &fields.iter().map(|f| csv_field(f)).collect::<Vec<_>>().join(",");
        s.push('\n');
    }
    s
}

/// `kutta bench vs-pytorch`: start PyTorch (or say loudly why not), time, print the table and
/// the reproduce line (or JSON), write the CSV.
pub fn main(args: &VsPytorchArgs, threads: &Choice) -> Result<()> {
    if args.batch_sizes.contains(&0) || args.resnet_batch_sizes.contains(&0) {
        bail!("--batch-sizes, --resnet-batch-sizes: batch sizes must be positive");
    }
    if args.min_seconds.is_nan() || args.min_seconds < 0.0 {
        bail!("--min-seconds must be a number ≥ 0");
    }
    let python = default_python(args.python.as_deref());
    let kutta_threads = kutta_trainer::threads::current();
    let (torch, missing) = match Torch::start(&python, kutta_threads, RESNET_WIDTH) {
        Ok(t) => (Some(t), None),
        Err(why) => {
            let msg = missing_message(&why);
            eprintln!("\n{}\n", msg.lines().map(|l| format!("warning: {l}")).collect::<Vec<_>>().join("\n"));
            (None, Some(why))
        }
    };
    let json = args.json;
    let report = run(args, threads, torch, missing, |r| {
        if !json {
            eprintln!(
                "  {:<8} batch {:>6}: kutta {:>10.3} ms, pytorch {:>10} ms ({} steps each)",
                r.model,
                r.batch_size,
                r.kutta_median_ms,
                ms(r.pytorch_median_ms),
                r.reps
            );
        }
    })?;
    if let Some(path) = &args.csv {
        std::fs::write(path, csv(&report)).with_context(|| format!("--csv {}", path.display()))?;
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{}", format_table(&report));
        if let Some(path) = &args.csv {
            println!("csv: {}", path.display());
        }
        println!("reproduce: {}", report.reproduce);
    }
    if report.rows.is_empty() {
        return Err(anyhow!("nothing to time: no batch sizes"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_fields_with_commas() {
        assert_eq!(csv_field("Intel(R) Xeon(R), 2.3GHz"), "\"Intel(R) Xeon(R), 2.3GHz\"");
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a\"b,"), "\"a\"\"b,\"");
    }

    #[test]
    fn the_python_flag_wins() {
        assert_eq!(default_python(Some(Path::new("/x/python"))), PathBuf::from("/x/python"));
    }

    #[test]
    fn a_missing_python_is_a_reason_not_a_panic() {
        let why = Torch::start(Path::new("/nonexistent/python"), 1, 8).err().unwrap();
        assert!(why.contains("cannot start `/nonexistent/python`"), "{why}");
        assert!(missing_message(&why).contains("pip install torch"));
    }
}
