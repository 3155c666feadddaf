//! `kutta bench`: the benchmarks, one subcommand each.
//!
//! - `steps` (`steps.rs`, also plain `kutta bench`): sgd, adam, rk4 and rk4 with all three
//!   modifications timed side by side at several batch sizes.
//! - `sweep` (`sweep.rs`): sgd, adam and rk4 against the batch size under a memory plan, with
//!   sweep.csv and sweep.svg.
//! - `collectives` (`collectives.rs`): all-reduce bandwidth and the weak scaling of rk4 steps over
//!   MPI ranks, through child `mpirun` jobs (which run `kutta bench collectives --worker …`).
//! - `vs-pytorch` (`vs_pytorch.rs`, also `steps --vs-pytorch`): one SGD training step of the MLP
//!   and the CIFAR ResNet-18 in kutta and in PyTorch (a child process), in alternating turns.
//! - `kernels`, `nccl` (`gpu.rs`): the GPU self-checks of a `--features cuda` build.
//! - `data` (`data.rs`): decoded and augmented images per second against what the model's step
//!   consumes (`--synthetic DIR` writes a folder of photo-sized JPEGs to measure).
//! - `ode` (`ode.rs`): one gradient through a neural-ODE block by backprop, checkpointing and the
//!   reversible solver against the number of steps: seconds and peak heap, with ode.csv, ode.svg
//!   and ode.json.
//!
//! Before the subcommands, `kutta bench` took all of their flags at once and chose the bench by
//! which were given (`--sweep batch`, `--collectives`, `--kernels`, `--nccl`, `--ode`, `--data
//! <config>`, none: steps). Those flags (`LegacyArgs`, hidden from the help) still work for one
//! release: `LegacyArgs::resolve` turns them into the subcommand they meant, and a note on stderr
//! names it.

pub mod collectives;
pub mod data;
pub mod gpu;
pub mod ode;
pub mod steps;
pub mod sweep;
pub mod vs_pytorch;

use anyhow::Result;
use clap::{Args, Subcommand};
use collectives::Part;
use kutta_trainer::config::Config;
use kutta_trainer::threads::Choice;
use std::path::PathBuf;

/// The default of `--min-seconds` for the benches that time optimizer steps (`steps`, `sweep`).
/// `collectives` has its own (`collectives::MIN_SECONDS_PER_SIZE`): there the flag is the time
/// per all-reduce size, a different knob.
pub const MIN_SECONDS: f64 = 2.0;

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub command: Option<BenchCommand>,
    /// The flags of `kutta bench` before the subcommands (hidden; for one release).
    #[command(flatten)]
    pub legacy: LegacyArgs,
}

#[derive(Subcommand, Debug, Clone, PartialEq)]
pub enum BenchCommand {
    /// Time optimizer steps of sgd, adam, rk4 and rk4 with all modifications (plain `kutta bench`).
    ///
    /// The four are interleaved step by step at each batch size; the table gives median step
    /// times, the time per gradient evaluation and rk4 / sgd.
    Steps(StepsArgs),
    /// Time sgd, adam and rk4 against the batch size under a memory plan; sweep.csv, sweep.svg.
    ///
    /// Each batch size is laid out by the memory planner under --memory (micro-batches,
    /// recomputation, rk4's stage buffers); the table gives rk4 / (4 × sgd) and the predicted and
    /// measured peak memory.
    Sweep(SweepArgs),
    /// One training step (forward, backward, SGD update) in kutta and in PyTorch, side by side.
    ///
    /// The MLP 784-500-500-500-10 at --batch-sizes and the CIFAR ResNet-18 (width 64, batch norm
    /// over the whole batch) at --resnet-batch-sizes, on the same threads (`kutta --threads N`).
    /// PyTorch runs as a child process (scripts/pytorch_step_server.py, built into kutta) and
    /// takes turns with kutta, so drift in the machine's speed hits both alike. Without PyTorch
    /// it says so, with the pip command, and still times kutta (exit status 0).
    VsPytorch(VsPytorchArgs),
    /// All-reduce bandwidth and rk4 weak scaling over MPI ranks (a --features mpi build).
    ///
    /// Runs child `mpirun` jobs on 1, 2, 4, … ranks up to --max-ranks (needs Open MPI).
    Collectives(CollectivesArgs),
    /// GPU: check the RK kernels against their CPU references and time them (--features cuda).
    ///
    /// Each kernel is timed against the device-to-device copy bandwidth (goal ≥ 80 %); exit
    /// status 1 when a check fails.
    Kernels(GpuArgs),
    /// GPU: check the NCCL communicator and time its all-reduce (--features cuda).
    ///
    /// One GPU per rank (a world of one without mpirun); the bus bandwidth of 256 MiB
    /// all-reduces; exit status 1 when a check fails.
    Nccl(GpuArgs),
    /// Decoded and augmented training images per second, against the model's consumption.
    ///
    /// With one decode worker and with data.workers (default: the cores per rank); then sgd's and rk4's
    /// training step at the config's per-rank batch, and whether the pipeline keeps up
    /// (images/s needed = batch / step time). --synthetic DIR writes photo-sized JPEGs first.
    Data(DataArgs),
    /// One gradient through a neural-ODE block by backprop, checkpoint and reversible, against steps.
    ///
    /// ODE-Net's conv vector field (--width channels on --size² states, batch --batch, --tableau
    /// over [0, 1], f32 on the CPU); per method and --steps value the median seconds of one
    /// gradient (forward solve + backward to x and the parameters) and its exact peak heap, the
    /// ratios reversible vs checkpoint and vs backprop, and how time and memory grow with the
    /// steps (log-log slopes); checks that checkpoint's gradient equals backprop's. Writes
    /// ode.csv, ode.svg and ode.json to --out.
    Ode(OdeArgs),
}

/// The model and data a bench times.
#[derive(Args, Debug, Clone, PartialEq, Default)]
pub struct ModelArgs {
    /// Config providing the model and data [default: the paper's MLP on Fashion-MNIST].
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override a key of that config, e.g. --set data.dir=DIR --set train.device=cuda (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
}

impl ModelArgs {
    /// The config: `--config` (default: the built-in defaults, the paper's MLP on Fashion-MNIST)
    /// with its `--set` overrides.
    pub fn base(&self) -> Result<Config> {
        Ok(match &self.config {
            Some(p) => Config::load(p, &self.sets)?,
            None if self.sets.is_empty() => Config::default(),
            None => Config::from_toml_str("", &self.sets)?,
        })
    }

    /// ` --config FILE --set K=V …` for a reproduce line.
    pub fn reproduce_args(&self) -> String {
        let config = self.config.iter().map(|p| format!(" --config {}", p.display()));
        config.chain(self.sets.iter().map(|s| format!(" --set {s}"))).collect()
    }
}

#[derive(Args, Debug, Clone, PartialEq)]
pub struct StepsArgs {
    /// Batch sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = steps::BATCH_SIZES)]
    pub batch_sizes: Vec<usize>,
    /// Minimum seconds spent timing each optimizer at each batch size.
    #[arg(long, default_value_t = MIN_SECONDS)]
    pub min_seconds: f64,
    /// Minimum timed steps of each optimizer at each batch size (after one warm-up step).
    #[arg(long, default_value_t = steps::MIN_REPS)]
    pub min_reps: usize,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Run `kutta bench vs-pytorch` instead, with these batch sizes, --min-seconds, --min-reps
    /// and --json (and its defaults for the rest: the ResNet-18 at batch 128 too).
    #[arg(long, conflicts_with_all = ["config", "sets"])]
    pub vs_pytorch: bool,
}

impl StepsArgs {
    /// `steps --vs-pytorch` as the `vs-pytorch` it stands for.
    pub fn as_vs_pytorch(&self) -> VsPytorchArgs {
        VsPytorchArgs {
            batch_sizes: self.batch_sizes.clone(),
            min_seconds: self.min_seconds,
            min_reps: self.min_reps,
            json: self.json,
            ..VsPytorchArgs::default()
        }
    }
}

#[derive(Args, Debug, Clone, PartialEq)]
pub struct VsPytorchArgs {
    /// MLP batch sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = vs_pytorch::BATCH_SIZES)]
    pub batch_sizes: Vec<usize>,
    /// ResNet-18 batch sizes, comma-separated (one ResNet step takes seconds on a CPU).
    #[arg(long, value_delimiter = ',', default_value = vs_pytorch::RESNET_BATCH_SIZES)]
    pub resnet_batch_sizes: Vec<usize>,
    /// Skip the ResNet-18.
    #[arg(long)]
    pub no_resnet: bool,
    /// ViT-S/16 batch sizes (224×224 images, 1000 classes; PyTorch runs timm's
    /// VisionTransformer), comma-separated; none by default (a step takes seconds).
    #[arg(long, value_delimiter = ',')]
    pub vit_batch_sizes: Vec<usize>,
    /// Minimum seconds spent timing each batch size (kutta and PyTorch together: 2 × this).
    #[arg(long, default_value_t = MIN_SECONDS)]
    pub min_seconds: f64,
    /// Minimum timed steps of each side at each batch size (after one warm-up step).
    #[arg(long, default_value_t = vs_pytorch::MIN_REPS)]
    pub min_reps: usize,
    /// The python that runs PyTorch [default: $KUTTA_TORCH_PYTHON, else
    /// ~/.cache/kutta/torch-venv/bin/python if it exists, else python3].
    #[arg(long, value_name = "PATH")]
    pub python: Option<PathBuf>,
    /// Also write the rows to this CSV file.
    #[arg(long, value_name = "FILE")]
    pub csv: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl Default for VsPytorchArgs {
    fn default() -> Self {
        let sizes = |s: &str| s.split(',').map(|b| b.parse().expect("a default batch size")).collect();
        Self {
            batch_sizes: sizes(vs_pytorch::BATCH_SIZES),
            resnet_batch_sizes: sizes(vs_pytorch::RESNET_BATCH_SIZES),
            no_resnet: false,
            vit_batch_sizes: Vec::new(),
            min_seconds: MIN_SECONDS,
            min_reps: vs_pytorch::MIN_REPS,
            python: None,
            csv: None,
            json: false,
        }
    }
}

#[derive(Args, Debug, Clone, PartialEq)]
pub struct SweepArgs {
    /// Batch sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = sweep::BATCH_SIZES)]
    pub batch_sizes: Vec<usize>,
    /// Memory budget the planner lays each batch size out under, e.g. 2GiB, 512MiB.
    #[arg(long, default_value = sweep::MEMORY)]
    pub memory: String,
    /// Folder for sweep.csv and sweep.svg [default: runs/bench-sweep-<unix time>].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Minimum seconds spent timing each batch size (the three optimizers interleaved).
    #[arg(long, default_value_t = MIN_SECONDS)]
    pub min_seconds: f64,
    /// Minimum timed steps of each optimizer at each batch size (after one warm-up step).
    #[arg(long, default_value_t = sweep::MIN_REPS)]
    pub min_reps: usize,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone, PartialEq)]
pub struct CollectivesArgs {
    /// The largest number of ranks (jobs on 1, 2, 4, … ranks and this many).
    #[arg(long, default_value_t = collectives::MAX_RANKS)]
    pub max_ranks: usize,
    /// Samples per rank in the weak-scaling steps (global batch = this × ranks).
    #[arg(long, default_value_t = collectives::PER_RANK_BATCH)]
    pub per_rank_batch: usize,
    /// Minimum seconds spent timing each all-reduce size; each job times its steps for
    /// 4 × this.
    #[arg(long, default_value_t = collectives::MIN_SECONDS_PER_SIZE)]
    pub min_seconds: f64,
    /// Minimum repetitions of each all-reduce size and of each job's steps.
    #[arg(long, default_value_t = collectives::MIN_REPS)]
    pub min_reps: usize,
    /// Config providing the model and data [default: the paper's MLP on Fashion-MNIST].
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The mpirun that starts the jobs.
    #[arg(long, default_value = "mpirun")]
    pub mpirun: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Internal: one rank of a child job, timing these parts.
    #[arg(long, hide = true, value_delimiter = ',', value_parser = Part::NAMES)]
    pub worker: Option<Vec<String>>,
}

#[derive(Args, Debug, Clone, PartialEq)]
pub struct DataArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Write an image folder of synthetic photo-like JPEGs to DIR first (unless DIR/train exists)
    /// and bench it (sets data.format = "imagefolder", data.dir = DIR before the --set keys).
    #[arg(long, value_name = "DIR")]
    pub synthetic: Option<PathBuf>,
    /// How many training JPEGs --synthetic writes (10 classes).
    #[arg(long, default_value_t = 200)]
    pub synthetic_images: usize,
    /// Width of the --synthetic JPEGs.
    #[arg(long, default_value_t = 500)]
    pub width: u32,
    /// Height of the --synthetic JPEGs.
    #[arg(long, default_value_t = 375)]
    pub height: u32,
    /// Ranks train.batch_size is split over: the per-rank batch each process decodes and steps.
    #[arg(long, default_value_t = 1)]
    pub ranks: usize,
    /// Minimum seconds of each decode measurement (twice that for the step timing).
    #[arg(long, default_value_t = MIN_SECONDS)]
    pub min_seconds: f64,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl Default for DataArgs {
    /// The flags' defaults, as clap gives them to `kutta bench data` with no flags.
    fn default() -> Self {
        #[derive(clap::Parser)]
        struct Only {
            #[command(flatten)]
            data: DataArgs,
        }
        <Only as clap::Parser>::parse_from(["data"]).data
    }
}

#[derive(Args, Debug, Clone, PartialEq)]
pub struct OdeArgs {
    /// Channels of the block's state (the field's convs are width + 1 → width, 3×3).
    #[arg(long, default_value_t = ode::WIDTH)]
    pub width: usize,
    /// States per gradient.
    #[arg(long, default_value_t = ode::BATCH)]
    pub batch: usize,
    /// Pixels per side of a state (7: a 28×28 image after the odenet's stem).
    #[arg(long, default_value_t = ode::SIZE)]
    pub size: usize,
    /// The block's Runge–Kutta method (`kutta tableaux`).
    #[arg(long, default_value = "rk4")]
    pub tableau: String,
    /// Steps over [0, 1], comma-separated.
    #[arg(long, value_delimiter = ',', default_value = ode::STEPS)]
    pub steps: Vec<usize>,
    /// checkpoint: states stored besides the input [default: ⌈log₂ steps⌉ at each steps value].
    #[arg(long)]
    pub checkpoints: Option<usize>,
    /// reversible: the coupling λ ∈ (0, 1].
    #[arg(long, default_value_t = kutta_trainer::model::ode::DEFAULT_COUPLING)]
    pub coupling: f64,
    /// Minimum seconds spent timing each steps value (the three methods interleaved).
    #[arg(long, default_value_t = ode::MIN_SECONDS)]
    pub min_seconds: f64,
    /// Minimum timed gradients of each method at each steps value (after one warm-up gradient).
    #[arg(long, visible_alias = "repeats", default_value_t = ode::MIN_REPS)]
    pub min_reps: usize,
    /// Folder for ode.csv, ode.svg and ode.json [default: runs/bench-ode-<unix time>].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl Default for OdeArgs {
    fn default() -> Self {
        let d = ode::OdeOptions::default();
        Self {
            width: d.width,
            batch: d.batch,
            size: d.size,
            tableau: d.tableau,
            steps: d.steps,
            checkpoints: d.checkpoints,
            coupling: d.coupling,
            min_seconds: d.min_seconds,
            min_reps: d.min_reps,
            out: None,
            json: false,
        }
    }
}

#[derive(Args, Debug, Clone, PartialEq)]
pub struct GpuArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// The flags `kutta bench` took before the subcommands, with their old rules (which go
/// together, which need which), all hidden from the help.
#[derive(Args, Debug, Clone, PartialEq)]
pub struct LegacyArgs {
    /// Old form: batch sizes of `steps` or `sweep`.
    #[arg(long, hide = true, value_delimiter = ',', conflicts_with = "collectives")]
    batch_sizes: Option<Vec<usize>>,
    /// Old form: --min-seconds of any bench.
    #[arg(long, hide = true)]
    min_seconds: Option<f64>,
    /// Old form: --min-reps of any bench.
    #[arg(long, hide = true)]
    min_reps: Option<usize>,
    /// Old form: --config of any bench.
    #[arg(long, hide = true)]
    config: Option<PathBuf>,
    /// Old form: --set of `steps` or `sweep`.
    #[arg(long = "set", hide = true, value_name = "KEY=VALUE", conflicts_with = "collectives")]
    sets: Vec<String>,
    /// Old form: --json of any bench.
    #[arg(long, hide = true)]
    json: bool,
    /// Old form of `kutta bench kernels`.
    #[arg(long, hide = true, conflicts_with_all = ["collectives", "sweep", "nccl"])]
    kernels: bool,
    /// Old form of `kutta bench nccl`.
    #[arg(long, hide = true, conflicts_with_all = ["collectives", "sweep"])]
    nccl: bool,
    /// Old form of `kutta bench collectives`.
    #[arg(long, hide = true)]
    collectives: bool,
    /// Old form: --max-ranks of `collectives`.
    #[arg(long, hide = true, default_value_t = collectives::MAX_RANKS, requires = "collectives")]
    max_ranks: usize,
    /// Old form: --per-rank-batch of `collectives`.
    #[arg(long, hide = true, default_value_t = collectives::PER_RANK_BATCH, requires = "collectives")]
    per_rank_batch: usize,
    /// Old form: --mpirun of `collectives`.
    #[arg(long, hide = true, default_value = "mpirun", requires = "collectives")]
    mpirun: String,
    /// Old form of `kutta bench sweep` (`--sweep batch`).
    #[arg(long, hide = true, value_parser = ["batch"], conflicts_with = "collectives")]
    sweep: Option<String>,
    /// Old form: --memory of `sweep`.
    #[arg(long, hide = true, requires = "sweep")]
    memory: Option<String>,
    /// Old form: --out of `sweep`.
    #[arg(long, hide = true, requires = "sweep")]
    out: Option<PathBuf>,
    /// Old form of `kutta bench ode` (the issue's `kutta bench --ode [--json]`).
    #[arg(
        long,
        hide = true,
        conflicts_with_all = ["collectives", "sweep", "kernels", "nccl", "batch_sizes", "config", "sets", "collectives_worker"]
    )]
    ode: bool,
    /// The issue's `kutta bench --data <config>`: `kutta bench data --config <config>` (with
    /// --set, --min-seconds and --json).
    #[arg(
        long,
        hide = true,
        value_name = "CONFIG",
        conflicts_with_all = ["collectives", "sweep", "kernels", "nccl", "ode", "batch_sizes", "config", "min_reps", "collectives_worker"]
    )]
    data: Option<PathBuf>,
    /// Old form of `kutta bench collectives --worker` (one rank of a child job).
    #[arg(long, hide = true, value_delimiter = ',', value_parser = Part::NAMES, conflicts_with = "collectives")]
    collectives_worker: Option<Vec<String>>,
}

impl LegacyArgs {
    /// The subcommand these flags meant, with the same settings (a flag not given takes that
    /// subcommand's default), and the note that names it: none for plain `kutta bench` (which
    /// stays `steps`) and for a child job's worker flags (no person typed them).
    pub fn resolve(self) -> (BenchCommand, Option<String>) {
        let note = |old: &str, new: &str| {
            Some(format!("`kutta bench {old}` is now `kutta bench {new}`; the old flags go away in the next release"))
        };
        let model = ModelArgs { config: self.config, sets: self.sets };
        if self.nccl {
            (BenchCommand::Nccl(GpuArgs { json: self.json }), note("--nccl", "nccl"))
        } else if self.kernels {
            (BenchCommand::Kernels(GpuArgs { json: self.json }), note("--kernels", "kernels"))
        } else if self.collectives || self.collectives_worker.is_some() {
            let note = if self.collectives { note("--collectives", "collectives") } else { None };
            let args = CollectivesArgs {
                max_ranks: self.max_ranks,
                per_rank_batch: self.per_rank_batch,
                min_seconds: self.min_seconds.unwrap_or(collectives::MIN_SECONDS_PER_SIZE),
                min_reps: self.min_reps.unwrap_or(collectives::MIN_REPS),
                config: model.config,
                mpirun: self.mpirun,
                json: self.json,
                worker: self.collectives_worker,
            };
            (BenchCommand::Collectives(args), note)
        } else if self.ode {
            let defaults = OdeArgs::default();
            let args = OdeArgs {
                min_seconds: self.min_seconds.unwrap_or(defaults.min_seconds),
                min_reps: self.min_reps.unwrap_or(defaults.min_reps),
                json: self.json,
                ..defaults
            };
            (BenchCommand::Ode(args), note("--ode", "ode"))
        } else if let Some(config) = self.data {
            let defaults = DataArgs::default();
            let args = DataArgs {
                model: ModelArgs { config: Some(config), ..model },
                min_seconds: self.min_seconds.unwrap_or(defaults.min_seconds),
                json: self.json,
                ..defaults
            };
            (BenchCommand::Data(args), note("--data <config>", "data --config <config>"))
        } else if self.sweep.is_some() {
            let defaults = sweep::SweepOptions::default();
            let args = SweepArgs {
                batch_sizes: self.batch_sizes.unwrap_or(defaults.batch_sizes),
                memory: self.memory.unwrap_or_else(|| sweep::MEMORY.into()),
                out: self.out,
                min_seconds: self.min_seconds.unwrap_or(defaults.min_seconds),
                min_reps: self.min_reps.unwrap_or(defaults.min_reps),
                model,
                json: self.json,
            };
            (BenchCommand::Sweep(args), note("--sweep batch", "sweep"))
        } else {
            let plain = self.batch_sizes.is_none()
                && self.min_seconds.is_none()
                && self.min_reps.is_none()
                && model == ModelArgs::default()
                && !self.json;
            let defaults = steps::BenchOptions::default();
            let args = StepsArgs {
                batch_sizes: self.batch_sizes.unwrap_or(defaults.batch_sizes),
                min_seconds: self.min_seconds.unwrap_or(defaults.min_seconds),
                min_reps: self.min_reps.unwrap_or(defaults.min_reps),
                model,
                json: self.json,
                vs_pytorch: false,
            };
            (BenchCommand::Steps(args), if plain { None } else { note("<flags>", "steps <flags>") })
        }
    }
}

/// `kutta bench …`: run the bench and return the process's exit status (1 after an error, which
/// is printed as one `error:` line). `threads`: what `threads::init` chose at start.
pub fn main(args: BenchArgs, threads: Choice) -> i32 {
    let command = match args.command {
        Some(command) => command,
        None => {
            let (command, note) = args.legacy.resolve();
            // Under mpirun (`--nccl`) every rank would say it: rank 0 does.
            let rank0 = kutta_collectives::rendezvous::launched_world().is_none_or(|(rank, _)| rank == 0);
            if let (Some(note), true) = (note, rank0) {
                eprintln!("note: {note}");
            }
            command
        }
    };
    let result = match command {
        BenchCommand::Nccl(GpuArgs { json }) => return gpu::bench_nccl(json),
        BenchCommand::Collectives(args) if args.worker.is_some() => return collectives::worker_main(&args),
        BenchCommand::Steps(args) if args.vs_pytorch => vs_pytorch::main(&args.as_vs_pytorch(), &threads),
        BenchCommand::Steps(args) => steps::main(&args),
        BenchCommand::VsPytorch(args) => vs_pytorch::main(&args, &threads),
        BenchCommand::Sweep(args) => sweep::main(&args),
        BenchCommand::Collectives(args) => collectives::main(&args),
        BenchCommand::Kernels(GpuArgs { json }) => gpu::bench_kernels(json),
        BenchCommand::Data(args) => data::main(&args),
        BenchCommand::Ode(args) => ode::main(&args),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Cli, Command};
    use clap::{CommandFactory, Parser};

    /// `kutta ARGS…` as the bench subcommand it resolves to, and the note it prints.
    fn bench(args: &[&str]) -> (BenchCommand, Option<String>) {
        let argv = ["kutta", "bench"].iter().chain(args).copied();
        let Command::Bench(b) = Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("{args:?}: {e}")).command else {
            panic!("not a bench")
        };
        match *b {
            BenchArgs { command: Some(c), legacy } => {
                assert_eq!(legacy.resolve(), bench(&[]), "no old flags beside a subcommand");
                (c, None)
            }
            BenchArgs { command: None, legacy } => legacy.resolve(),
        }
    }

    fn fails(args: &[&str]) -> bool {
        Cli::try_parse_from(["kutta", "bench"].iter().chain(args)).is_err()
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    /// One default per knob: the subcommands' defaults are the options' defaults, and plain
    /// `kutta bench` is `kutta bench steps` without a note.
    #[test]
    fn defaults_agree() {
        let (plain, note) = bench(&[]);
        assert_eq!(note, None);
        assert_eq!(plain, bench(&["steps"]).0);
        let BenchCommand::Steps(s) = plain else { panic!("not steps") };
        let d = steps::BenchOptions::default();
        assert_eq!((s.batch_sizes, s.min_seconds, s.min_reps), (d.batch_sizes, d.min_seconds, d.min_reps));
        assert_eq!(s.min_seconds, MIN_SECONDS);
        let BenchCommand::Sweep(s) = bench(&["sweep"]).0 else { panic!("not a sweep") };
        let d = sweep::SweepOptions::default();
        assert_eq!((s.batch_sizes, s.min_seconds, s.min_reps), (d.batch_sizes, d.min_seconds, d.min_reps));
        assert_eq!(kutta_trainer::planner::parse_bytes(&s.memory).unwrap(), d.budget);
        assert_eq!(s.min_seconds, MIN_SECONDS);
        let BenchCommand::Collectives(c) = bench(&["collectives"]).0 else { panic!("not collectives") };
        let d = collectives::CollectivesOptions::default();
        assert_eq!((c.max_ranks, c.per_rank_batch, c.min_seconds), (d.max_ranks, d.per_rank_batch, d.min_seconds));
        assert_eq!((c.min_reps, c.mpirun), (d.min_reps, d.mpirun));
        let w = collectives::WorkerOptions::default();
        assert_eq!((w.per_rank_batch, w.min_seconds, w.min_reps), (d.per_rank_batch, d.min_seconds, d.min_reps));
    }

    /// The old step-bench flags give what `steps` gives, with a note naming it.
    #[test]
    fn steps_new_and_old() {
        let new = ["steps", "--batch-sizes", "16", "--min-reps", "1", "--min-seconds", "0"];
        let new = [&new[..], &["--config", "c.toml", "--set", "a=1"][..]].concat();
        let (c, _) = bench(&new);
        let BenchCommand::Steps(s) = &c else { panic!("not steps") };
        assert_eq!((s.batch_sizes.as_slice(), s.min_seconds, s.min_reps, s.json), ([16].as_slice(), 0.0, 1, false));
        assert_eq!(s.model.reproduce_args(), " --config c.toml --set a=1");
        let (old, note) = bench(&new[1..]);
        assert_eq!(old, c);
        assert!(note.unwrap().contains("`kutta bench steps <flags>`"));
        let (c, note) = bench(&["--json"]);
        assert!(matches!(c, BenchCommand::Steps(StepsArgs { json: true, .. })) && note.is_some());
        assert!(fails(&["steps", "--memory", "1GiB"]));
        assert!(fails(&["--json", "steps"]), "old flags before a subcommand");
    }

    /// `sweep` takes --memory and --out; the old `--sweep batch` means the same. The old rules
    /// stay: --memory and --out need --sweep, which excludes --collectives.
    #[test]
    fn sweep_new_and_old() {
        let new = ["sweep", "--memory", "1GiB", "--batch-sizes", "8,16", "--out", "x", "--set", "data.dir=d"];
        let (c, _) = bench(&new);
        let BenchCommand::Sweep(s) = &c else { panic!("not a sweep") };
        assert_eq!((s.memory.as_str(), s.batch_sizes.as_slice()), ("1GiB", [8, 16].as_slice()));
        assert_eq!((s.out.as_deref(), s.min_reps), (Some(std::path::Path::new("x")), sweep::MIN_REPS));
        assert_eq!(s.model.sets, ["data.dir=d"]);
        let (old, note) = bench(&[&["--sweep", "batch"][..], &new[1..]].concat());
        assert_eq!(old, c);
        assert!(note.unwrap().contains("`kutta bench --sweep batch` is now `kutta bench sweep`"));
        assert_eq!(bench(&["--sweep", "batch"]).0, bench(&["sweep"]).0);
        assert!(fails(&["--memory", "1GiB"]));
        assert!(fails(&["--out", "x"]));
        assert!(fails(&["--sweep", "lr"]));
        assert!(fails(&["--sweep", "batch", "--collectives"]));
        assert!(fails(&["sweep", "--max-ranks", "2"]));
    }

    /// The arguments `kutta bench collectives` gives its child jobs parse as a worker, and so do
    /// the old worker flags; `--collectives` means `collectives`.
    #[test]
    fn collectives_new_old_and_worker() {
        let opts = collectives::CollectivesOptions { config: Some("configs/x.toml".into()), ..Default::default() };
        let args: Vec<String> = opts.worker_args(&[Part::Steps, Part::AllReduce]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (c, note) = bench(&args[1..]);
        assert_eq!(note, None);
        let BenchCommand::Collectives(w) = &c else { panic!("not collectives") };
        assert_eq!(w.worker.as_deref(), Some(["steps".to_string(), "allreduce".into()].as_slice()));
        assert_eq!((w.per_rank_batch, w.min_seconds, w.min_reps), (128, 0.5, 5));
        assert_eq!(w.config, Some(PathBuf::from("configs/x.toml")));
        let old = ["--collectives-worker", "steps,allreduce", "--per-rank-batch", "128", "--min-seconds", "0.5"];
        let (old, note) = bench(&[&old[..], &["--min-reps", "5", "--config", "configs/x.toml"][..]].concat());
        assert_eq!((old, note), (c, None));

        let new = ["collectives", "--max-ranks", "4", "--per-rank-batch", "8", "--min-seconds", "1", "--mpirun", "m"];
        let (c, _) = bench(&new);
        let (old, note) = bench(&[&["--collectives"][..], &new[1..]].concat());
        assert_eq!(old, c);
        assert!(note.unwrap().contains("`kutta bench collectives`"));
        assert!(fails(&["collectives", "--batch-sizes", "4"]));
        assert!(fails(&["collectives", "--set", "x=1"]));
        assert!(fails(&["--collectives", "--batch-sizes", "4"]));
        assert!(fails(&["--collectives", "--set", "x=1"]));
        assert!(fails(&["--max-ranks", "4"]));
    }

    /// `ode` takes its own flags (and --repeats for --min-reps); the old `--ode` means `ode`
    /// with --json, --min-seconds and --min-reps, and stands apart from the other old forms.
    #[test]
    fn ode_new_and_old() {
        assert_eq!(bench(&["ode"]).0, BenchCommand::Ode(OdeArgs::default()));
        assert_eq!(ode::OdeOptions::from(&OdeArgs::default()), ode::OdeOptions::default());
        let new = ["ode", "--steps", "2,4", "--width", "4", "--batch", "2", "--json", "--min-seconds", "0"];
        let (c, _) = bench(&[&new[..], &["--repeats", "1", "--checkpoints", "2", "--out", "o"][..]].concat());
        let BenchCommand::Ode(o) = &c else { panic!("not ode") };
        assert_eq!((o.steps.as_slice(), o.width, o.batch, o.min_reps), ([2, 4].as_slice(), 4, 2, 1));
        assert_eq!((o.checkpoints, o.out.as_deref(), o.json), (Some(2), Some(std::path::Path::new("o")), true));
        let (old, note) = bench(&["--ode", "--json", "--min-seconds", "0.5"]);
        let BenchCommand::Ode(old) = old else { panic!("--ode is not ode") };
        assert_eq!(old, OdeArgs { json: true, min_seconds: 0.5, ..OdeArgs::default() });
        assert!(note.unwrap().contains("`kutta bench --ode` is now `kutta bench ode`"));
        assert!(fails(&["--ode", "--sweep", "batch"]));
        assert!(fails(&["--ode", "--batch-sizes", "8"]));
        assert!(fails(&["--ode", "--kernels"]));
        assert!(fails(&["ode", "--batch-sizes", "8"]));
        assert!(fails(&["ode", "--memory", "1GiB"]));
    }

    /// The issue's `kutta bench --data <config>` means `kutta bench data --config <config>`,
    /// with --set, --min-seconds and --json; it stands apart from the other old forms.
    #[test]
    fn data_new_and_old() {
        assert_eq!(bench(&["data"]).0, BenchCommand::Data(DataArgs::default()));
        let new = ["data", "--config", "c.toml", "--set", "train.batch_size=32", "--min-seconds", "3", "--json"];
        let (c, _) = bench(&new);
        let BenchCommand::Data(d) = &c else { panic!("not data") };
        assert_eq!((d.ranks, d.synthetic.as_deref(), d.min_seconds), (1, None, 3.0));
        let (old, note) = bench(&["--data", "c.toml", "--set", "train.batch_size=32", "--min-seconds", "3", "--json"]);
        assert_eq!(old, c);
        assert!(note.unwrap().contains("`kutta bench --data <config>` is now `kutta bench data --config <config>`"));
        assert!(fails(&["--data"]));
        assert!(fails(&["--data", "c.toml", "--ode"]));
        assert!(fails(&["--data", "c.toml", "--config", "d.toml"]));
        assert!(fails(&["--data", "c.toml", "--sweep", "batch"]));
    }

    /// `kernels` and `nccl` take --json only; the old --kernels and --nccl stand alone.
    #[test]
    fn gpu_checks_new_and_old() {
        assert_eq!(bench(&["kernels", "--json"]).0, BenchCommand::Kernels(GpuArgs { json: true }));
        assert_eq!(bench(&["nccl"]).0, BenchCommand::Nccl(GpuArgs { json: false }));
        let (c, note) = bench(&["--kernels", "--json"]);
        assert_eq!(c, BenchCommand::Kernels(GpuArgs { json: true }));
        assert!(note.unwrap().contains("`kutta bench kernels`"));
        let (c, note) = bench(&["--nccl"]);
        assert_eq!(c, BenchCommand::Nccl(GpuArgs { json: false }));
        assert!(note.unwrap().contains("`kutta bench nccl`"));
        assert!(fails(&["kernels", "--batch-sizes", "8"]));
        assert!(fails(&["--kernels", "--nccl"]));
        assert!(fails(&["--kernels", "--sweep", "batch"]));
        assert!(fails(&["--nccl", "--collectives"]));
    }

    #[test]
    fn model_args_make_the_config() {
        let m = ModelArgs { config: None, sets: vec!["data.dir=d".into(), "train.device=cpu".into()] };
        assert_eq!(m.base().unwrap().data.dir, PathBuf::from("d"));
        assert!(ModelArgs { config: None, sets: vec!["no.such_key=1".into()] }.base().is_err());
        assert_eq!(ModelArgs::default().reproduce_args(), "");
    }

    /// Without the `cuda` feature both GPU checks are errors that say what is missing.
    #[cfg(not(feature = "cuda"))]
    #[test]
    fn gpu_checks_need_the_cuda_feature() {
        let e = gpu::bench_kernels(false).unwrap_err().to_string();
        assert!(e.contains("kutta bench kernels") && e.contains("--features cuda"), "{e}");
        assert_eq!(gpu::bench_nccl(false), 1);
    }
}
