//! `kutta`: train with Runge-Kutta optimizers (on one process, or on every rank of an `mpirun` /
//! `srun` job), start a local multi-rank job, list the built-in tableaux, benchmark steps.
//!
//! Errors a user can cause (bad config keys, missing data, a missing checkpoint) print one
//! `error:` line naming the rank, the key or file, and exit with status 1; they never panic.
//! Failure never leaves peers waiting: an error on one rank aborts the whole job
//! (`Communicator::abort`), and every panic aborts the process (a panic hook here, and
//! `panic = "abort"` in release builds), which mpirun turns into the end of the job.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use bench::collectives::{self as bench_collectives, CollectivesOptions, Part, TimedComm, WorkerOptions};
use bench::gpu;
use bench::steps::{self as bench_steps, BenchOptions};
use bench::sweep::{self as bench_sweep, SweepOptions};
use kutta_trainer::config::Config;
use kutta_trainer::planner;
use kutta_trainer::stop;
use kutta_trainer::tableau::Tableau;
use kutta_trainer::train::{self, Progress};
use std::path::PathBuf;

mod bench;

#[derive(Parser)]
#[command(name = "kutta", version, about = "Data-parallel neural-network training with Runge-Kutta solvers of the gradient flow")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model (a new run from --config, or continue one with --resume DIR).
    Train {
        /// Workload TOML file (see configs/).
        #[arg(long, required_unless_present = "resume", conflicts_with = "resume")]
        config: Option<PathBuf>,
        /// Override a config key, e.g. --set optimizer.lr=0.001 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// Run folder (default: runs/<config name>-<unix time>). Must not exist or be empty.
        #[arg(long, conflicts_with = "resume")]
        out: Option<PathBuf>,
        /// Continue a run up to train.steps: from the newest checkpoint of the run folder DIR, or
        /// from one checkpoint file in a run folder (DIR/checkpoint-<step>.safetensors).
        #[arg(long, value_name = "DIR|FILE")]
        resume: Option<PathBuf>,
        /// Progress display: auto (bar on a terminal, log lines otherwise), bar, lines.
        #[arg(long, default_value = "auto", value_parser = ["auto", "bar", "lines"])]
        progress: String,
        /// Abort the whole job when one collective waits longer than this (seconds).
        #[arg(long, default_value_t = 300.0)]
        collective_timeout: f64,
        /// Memory budget per rank (e.g. 2GiB): the planner picks micro-batches, the stage-buffer
        /// policy, activation recomputation and optimizer sharding to stay under it (`kutta plan`
        /// shows its choice); plan.json goes to the run folder.
        #[arg(long)]
        memory: Option<String>,
        /// GPU ordinal for this process with train.device = "cuda"/"auto" (the same as
        /// --set train.gpu=N); default: the launcher's local rank modulo the GPU count.
        #[arg(long)]
        gpu: Option<usize>,
    },
    /// Start a local data-parallel job: mpirun -np N kutta <ARGS>, returning its exit status.
    Launch {
        /// Number of ranks.
        #[arg(long)]
        nproc: usize,
        /// The mpirun to use.
        #[arg(long, default_value = "mpirun")]
        mpirun: String,
        /// The kutta command each rank runs, after `--`, e.g. -- train --config configs/x.toml
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        args: Vec<String>,
    },
    /// List the built-in Butcher tableaux with their verified orders and buffer needs.
    Tableaux {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Plan a run's memory per rank (SPEC §6): stage buffers, micro-batches, recomputation and
    /// sharding, with predicted peak and relative time; reads only the data set's headers.
    Plan {
        /// Workload TOML file (see configs/).
        #[arg(long)]
        config: PathBuf,
        /// Override a config key, e.g. --set train.batch_size=60000 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// Memory budget per rank, e.g. 2GiB, 512MiB, 1.5GB [default: available RAM / world size].
        #[arg(long)]
        memory: Option<String>,
        /// Number of data-parallel ranks to plan for.
        #[arg(long, default_value_t = 1)]
        world_size: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Time optimizer steps (sgd, adam, rk4, rk4 with all modifications) on the MLP; with
    /// --collectives, all-reduce bandwidth and the weak scaling of rk4 steps over MPI ranks; with
    /// --sweep batch, sgd/adam/rk4 against the batch size under a memory plan, with CSV and SVG;
    /// with --kernels / --nccl, the GPU self-checks (a --features cuda build).
    Bench {
        /// Batch sizes, comma-separated [default: 16,128,1024,8192; with --sweep 16,128,1024,8192,60000].
        #[arg(long, value_delimiter = ',', conflicts_with = "collectives")]
        batch_sizes: Option<Vec<usize>>,
        /// Minimum seconds spent timing each cell [default: 2; with --sweep 2 per batch size;
        /// with --collectives 0.5 per all-reduce size, 4 × this for each job's steps].
        #[arg(long)]
        min_seconds: Option<f64>,
        /// Minimum timed steps per cell (after one warm-up step) [default: 5; with --sweep 3].
        #[arg(long)]
        min_reps: Option<usize>,
        /// Config providing the model and data (default: the paper's MLP on Fashion-MNIST).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override a key of that config, e.g. --set data.dir=DIR --set train.device=cuda (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE", conflicts_with = "collectives")]
        sets: Vec<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Check the RK kernels against their CPU references on the GPU, then time each against
        /// the copy bandwidth (goal ≥ 80 %); exit status 1 when a check fails (--features cuda).
        #[arg(long, conflicts_with_all = ["collectives", "sweep", "nccl"])]
        kernels: bool,
        /// Check the NCCL communicator (one GPU per rank; a world of one without mpirun) and time
        /// its all-reduce bus bandwidth; exit status 1 when a check fails (--features cuda).
        #[arg(long, conflicts_with_all = ["collectives", "sweep"])]
        nccl: bool,
        /// Benchmark all-reduce and data-parallel rk4 steps on 1..=--max-ranks ranks, through
        /// child `mpirun` jobs (needs a kutta built with --features mpi, and Open MPI).
        #[arg(long)]
        collectives: bool,
        /// --collectives: the largest number of ranks.
        #[arg(long, default_value_t = 2, requires = "collectives")]
        max_ranks: usize,
        /// --collectives: samples per rank in the weak-scaling steps (global batch = this × ranks).
        #[arg(long, default_value_t = 128, requires = "collectives")]
        per_rank_batch: usize,
        /// --collectives: the mpirun that starts the jobs.
        #[arg(long, default_value = "mpirun", requires = "collectives")]
        mpirun: String,
        /// Sweep a parameter: `batch` times sgd, adam and rk4 at each --batch-sizes entry, laid out
        /// by the memory planner under --memory, and writes sweep.csv and sweep.svg to --out.
        #[arg(long, value_parser = ["batch"], conflicts_with = "collectives")]
        sweep: Option<String>,
        /// --sweep: memory budget the planner lays each batch size out under, e.g. 2GiB, 512MiB [default: 2GiB].
        #[arg(long, requires = "sweep")]
        memory: Option<String>,
        /// --sweep: folder for sweep.csv and sweep.svg [default: runs/bench-sweep-<unix time>].
        #[arg(long, requires = "sweep")]
        out: Option<PathBuf>,
        /// Internal: one rank of a --collectives child job, timing these parts.
        #[arg(long, hide = true, value_delimiter = ',', value_parser = Part::NAMES, conflicts_with = "collectives")]
        collectives_worker: Option<Vec<String>>,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    match Cli::parse().command {
        Command::Train { config, mut sets, out, resume, progress, collective_timeout, memory, gpu } => {
            sets.extend(gpu.map(|g| format!("train.gpu={g}")));
            std::process::exit(train_on_every_rank(config, sets, out, resume, &progress, collective_timeout, memory))
        }
        Command::Bench { nccl: true, json, .. } => std::process::exit(gpu::bench_nccl(json)),
        Command::Bench { collectives_worker: Some(parts), per_rank_batch, min_seconds, min_reps, config, .. } => {
            let opts = WorkerOptions {
                parts: parts.iter().filter_map(|p| Part::parse(p)).collect(),
                per_rank_batch,
                min_seconds: min_seconds.unwrap_or(0.5),
                min_reps: min_reps.unwrap_or(5),
                config,
                ..Default::default()
            };
            std::process::exit(collectives_worker(&opts))
        }
        Command::Launch { nproc, mpirun, args } => match launch(nproc, &mpirun, &args) {
            Ok(code) => std::process::exit(code),
            Err(e) => {
                eprintln!("error: {e:#}");
                std::process::exit(1);
            }
        },
        command => {
            if let Err(e) = run(command) {
                eprintln!("error: {e:#}");
                std::process::exit(1);
            }
        }
    }
}

/// `kutta train` on this rank: join the job's world (one process when not launched by
/// mpirun/srun), train, and on any failure end the whole job with a message naming the rank.
fn train_on_every_rank(
    config: Option<PathBuf>,
    sets: Vec<String>,
    out: Option<PathBuf>,
    resume: Option<PathBuf>,
    progress: &str,
    collective_timeout: f64,
    memory: Option<String>,
) -> i32 {
    let timeout = (collective_timeout > 0.0).then(|| std::time::Duration::from_secs_f64(collective_timeout));
    let progress = match progress {
        "bar" => Progress::Bar,
        "lines" => Progress::Lines,
        _ => Progress::Auto,
    };
    on_every_rank(
        timeout,
        |c| c,
        |comm| {
            // After joining the MPI world: these handlers replace any the MPI library installed.
            kutta_trainer::stop::install()?;
            let (cfg, dir) = match &resume {
                Some(path) => {
                    let dir = kutta_trainer::checkpoint::run_folder(path);
                    (train::load_run_config(&dir, &sets)?, dir)
                }
                None => {
                    let path = config.expect("clap requires --config without --resume");
                    let cfg = Config::load(&path, &sets)?;
                    (cfg, out.unwrap_or_else(|| train::default_out_dir(&path)))
                }
            };
            let (cfg, plan) = match &memory {
                Some(m) => {
                    let (cfg, plan) = apply_memory_plan(cfg, m, comm.world_size())?;
                    (cfg, Some(plan))
                }
                None => (cfg, None),
            };
            let summary = match &resume {
                Some(path) => train::resume(&cfg, path, progress, comm.as_ref())?,
                None => train::train(&cfg, &dir, progress, comm.as_ref())?,
            };
            if let (Some(plan), true) = (&plan, comm.is_writer()) {
                std::fs::write(dir.join("plan.json"), serde_json::to_string_pretty(plan)? + "\n")?;
                tracing::info!(
                    "memory: predicted peak {:.0} MiB per rank, measured {} on rank 0",
                    plan.chosen.peak_bytes as f64 / (1u64 << 20) as f64,
                    summary.peak_rss_mib.map_or("n/a".into(), |m| format!("{m:.0} MiB"))
                );
            }
            Ok(summary)
        },
        serde_json::to_string_pretty,
        // An interrupted run exits as a shell expects of a process stopped by that signal.
        |s: &train::Summary| s.signal.as_deref().and_then(stop::number).map_or(0, stop::exit_status),
    )
}

/// Plan the run's memory under `budget` (SPEC §6) and apply the plan's settings to `cfg`: the
/// stage-buffer policy, micro-batches, recomputation and sharding, each where the config says
/// otherwise (`Plan::overrides`).
fn apply_memory_plan(cfg: Config, budget: &str, world_size: usize) -> Result<(Config, planner::Plan)> {
    let budget = planner::parse_bytes(budget)?;
    let plan = planner::plan_config(&cfg, world_size, budget)?;
    tracing::info!("memory plan: {}", plan.reason);
    if !plan.overrides.is_empty() {
        tracing::info!("memory plan applied: --set {}", plan.overrides.join(" --set "));
    }
    let cfg = Config::from_toml_str(&cfg.to_toml(), &plan.overrides)?;
    Ok((cfg, plan))
}

/// One rank of a `kutta bench --collectives` child job: join the job's world, time, and print
/// rank 0's `WorkerReport` as one JSON line on stdout. Failure ends the whole job, as in training.
fn collectives_worker(opts: &WorkerOptions) -> i32 {
    let timeout = std::time::Duration::from_secs_f64(bench_collectives::WORKER_COLLECTIVE_TIMEOUT_S);
    on_every_rank(Some(timeout), TimedComm::new, |comm| Ok(bench_collectives::worker(comm, opts)?), serde_json::to_string, |_| 0)
}

/// Run `body` on this rank of the job's world (one process when not launched by mpirun/srun),
/// print rank 0's result on stdout and return `status` of it (every rank has the same result).
/// A panic aborts this process at once (never unwinding into MPI_Finalize while peers wait;
/// mpirun then ends the job); an error on any rank of a multi-rank job aborts the whole job with
/// a message naming the rank.
fn on_every_rank<C: kutta_collectives::Communicator, T>(
    timeout: Option<std::time::Duration>,
    wrap: impl FnOnce(Box<dyn kutta_collectives::Communicator>) -> C,
    body: impl FnOnce(&C) -> Result<T>,
    show: impl FnOnce(&T) -> serde_json::Result<String>,
    status: impl FnOnce(&T) -> i32,
) -> i32 {
    let comm = match kutta_collectives::rendezvous::connect(timeout) {
        Ok(c) => wrap(c),
        Err(e) => {
            eprintln!("error: {e}");
            return 1;
        }
    };
    let (rank, size) = (comm.rank(), comm.world_size());
    std::panic::set_hook(Box::new(move |info| {
        eprintln!("rank {rank}: panic: {info}");
        std::process::abort();
    }));
    let _span = (size > 1).then(|| tracing::info_span!("rank", r = rank).entered());
    match body(&comm) {
        Ok(result) => {
            if comm.is_writer() {
                println!("{}", show(&result).expect("result serializes"));
            }
            status(&result)
        }
        Err(e) if size > 1 => {
            eprintln!("rank {rank}: error: {e:#}");
            comm.abort(1)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    }
}

/// `mpirun -np N [--oversubscribe] <this kutta> ARGS`, as `kutta launch` and `kutta bench
/// --collectives` run it.
fn mpirun_command(nproc: usize, mpirun: &str, args: &[String]) -> Result<std::process::Command> {
    anyhow::ensure!(nproc > 0, "--nproc must be at least 1");
    let exe = std::env::current_exe().context("cannot find the kutta executable")?;
    let mut cmd = std::process::Command::new(mpirun);
    cmd.arg("-np").arg(nproc.to_string());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    if nproc > cores {
        // More ranks than cores: Open MPI refuses unless told to oversubscribe.
        cmd.arg("--oversubscribe");
    }
    // Open MPI refuses to run as root without these; they change nothing for other users.
    cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    cmd.arg(&exe).args(args);
    Ok(cmd)
}

fn cannot_start(mpirun: &str) -> String {
    format!("cannot start `{mpirun}` (install Open MPI: apt-get install openmpi-bin libopenmpi-dev)")
}

/// `kutta launch --nproc N -- ARGS`: run `mpirun -np N <this kutta> ARGS` and return its status.
///
/// mpirun gets its own process group and no terminal input, so that Ctrl-C reaches this process
/// only: SIGINT, SIGTERM and SIGUSR1 here are passed to mpirun as SIGUSR1, which it forwards to
/// every rank (a graceful stop, `stop`); Open MPI would answer SIGINT or SIGTERM to mpirun itself
/// by killing the ranks. A job stopped that way exits as a process stopped by the signal this
/// launcher received (130 for Ctrl-C), not by the SIGUSR1 it was passed as.
fn launch(nproc: usize, mpirun: &str, args: &[String]) -> Result<i32> {
    use std::os::unix::process::CommandExt;
    let mut cmd = mpirun_command(nproc, mpirun, args)?;
    cmd.process_group(0).stdin(std::process::Stdio::null());
    let mut child = cmd.spawn().with_context(|| cannot_start(mpirun))?;
    stop::forward_to(child.id())?;
    let status = child.wait().with_context(|| format!("waiting for {mpirun}"))?;
    let Some(code) = status.code() else {
        eprintln!("error: {mpirun} was killed by a signal");
        return Ok(1);
    };
    Ok(stop::launcher_exit_status(code))
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Train { .. } | Command::Launch { .. } => unreachable!("handled in main"),
        Command::Tableaux { json } => print_tableaux(json)?,
        Command::Plan { config, sets, memory, world_size, json } => {
            let cfg = Config::load(&config, &sets)?;
            let budget = match &memory {
                Some(m) => planner::parse_bytes(m)?,
                // The ranks of a local job share this machine's memory.
                None => planner::default_budget() / world_size.max(1) as u64,
            };
            let plan = planner::plan_config(&cfg, world_size, budget)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&plan)?);
            } else {
                print!("{}", planner::format_plan(&plan));
            }
        }
        Command::Bench { kernels: true, json, .. } => gpu::bench_kernels(json)?,
        Command::Bench { collectives: true, max_ranks, per_rank_batch, mpirun, min_seconds, min_reps, config, json, .. } => {
            let opts = CollectivesOptions { max_ranks, per_rank_batch, min_seconds: min_seconds.unwrap_or(0.5), min_reps: min_reps.unwrap_or(5), config, mpirun };
            bench_collectives_driver(&opts, json)?
        }
        Command::Bench { sweep: Some(_), batch_sizes, min_seconds, min_reps, config, sets, json, memory, out, .. } => {
            bench_sweep_driver(batch_sizes, min_seconds, min_reps, config, sets, memory, out, json)?
        }
        Command::Bench { batch_sizes, min_seconds, min_reps, config, sets, json, .. } => {
            let batch_sizes = batch_sizes.unwrap_or_else(|| vec![16, 128, 1024, 8192]);
            let min_seconds = min_seconds.unwrap_or(2.0);
            let min_reps = min_reps.unwrap_or(5);
            let base = bench_base(config.as_ref(), &sets)?;
            if batch_sizes.contains(&0) {
                anyhow::bail!("--batch-sizes: batch sizes must be positive");
            }
            let opts = BenchOptions { batch_sizes, min_seconds, min_reps, base, ..Default::default() };
            let report = bench_steps::run(&opts, |r| {
                if !json {
                    eprintln!("  {:<18} batch {:>6}: {:>10.3} ms/step ({} steps)", r.optimizer, r.batch_size, r.median_step_ms, r.reps);
                }
            })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("{}", bench_steps::format_table(&report));
                let config_args: String = config.iter().map(|p| format!(" --config {}", p.display())).chain(sets.iter().map(|s| format!(" --set {s}"))).collect();
                println!(
                    "reproduce: kutta bench{config_args} --batch-sizes {} --min-seconds {min_seconds} --min-reps {min_reps}",
                    opts.batch_sizes.iter().map(|b| b.to_string()).collect::<Vec<_>>().join(",")
                );
            }
        }
    }
    Ok(())
}

/// The config `kutta bench` times: `--config` (default: the built-in defaults, the paper's MLP on
/// Fashion-MNIST) with its `--set` overrides.
fn bench_base(config: Option<&PathBuf>, sets: &[String]) -> Result<Config> {
    Ok(match config {
        Some(p) => Config::load(p, sets)?,
        None if sets.is_empty() => Config::default(),
        None => Config::from_toml_str("", sets)?,
    })
}

/// `kutta bench --sweep batch`: plan, time, print the table, write sweep.csv and sweep.svg.
#[allow(clippy::too_many_arguments)]
fn bench_sweep_driver(
    batch_sizes: Option<Vec<usize>>,
    min_seconds: Option<f64>,
    min_reps: Option<usize>,
    config: Option<PathBuf>,
    sets: Vec<String>,
    memory: Option<String>,
    out: Option<PathBuf>,
    json: bool,
) -> Result<()> {
    let defaults = SweepOptions::default();
    let memory = memory.unwrap_or_else(|| "2GiB".into());
    let batch_sizes = batch_sizes.unwrap_or(defaults.batch_sizes.clone());
    anyhow::ensure!(!batch_sizes.is_empty() && !batch_sizes.contains(&0), "--batch-sizes: batch sizes must be positive");
    let opts = SweepOptions {
        batch_sizes,
        budget: planner::parse_bytes(&memory)?,
        min_seconds: min_seconds.unwrap_or(defaults.min_seconds),
        min_reps: min_reps.unwrap_or(defaults.min_reps),
        base: bench_base(config.as_ref(), &sets)?,
        ..defaults
    };
    let out = out.unwrap_or_else(bench_sweep::default_out_dir);
    let mut report = bench_sweep::run(&opts, |line| {
        if !json {
            eprintln!("  {line}");
        }
    })?;
    let sizes: Vec<String> = opts.batch_sizes.iter().map(|b| b.to_string()).collect();
    report.command = format!(
        "kutta bench --sweep batch --memory {memory} --batch-sizes {} --min-seconds {} --min-reps {}{}{}",
        sizes.join(","),
        opts.min_seconds,
        opts.min_reps,
        config.map_or(String::new(), |p| format!(" --config {}", p.display())),
        sets.iter().map(|s| format!(" --set {s}")).collect::<String>()
    );
    bench_sweep::write_outputs(&mut report, &out)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", bench_sweep::format_table(&report));
        println!("wrote {} and {}", out.join("sweep.csv").display(), out.join("sweep.svg").display());
    }
    Ok(())
}

/// `kutta bench --collectives`: run the child jobs through `mpirun_command` and print the table.
fn bench_collectives_driver(opts: &CollectivesOptions, json: bool) -> Result<()> {
    if !cfg!(feature = "mpi") {
        anyhow::bail!(
            "kutta bench --collectives runs MPI jobs, but this kutta was built without the `mpi` feature: \
             cargo build --release --features mpi (needs libopenmpi-dev and libclang-dev)"
        );
    }
    let mpirun = opts.mpirun.as_str();
    let version = std::process::Command::new(mpirun).arg("--version").stdin(std::process::Stdio::null()).output().with_context(|| cannot_start(mpirun))?;
    let mpi = String::from_utf8_lossy(&version.stdout).lines().next().unwrap_or(mpirun).trim().to_string();
    let report = bench_collectives::run(
        opts,
        &mpi,
        |nproc, args| {
            let mut cmd = mpirun_command(nproc, mpirun, args)?;
            cmd.envs(bench_collectives::CHILD_ENV).stdin(std::process::Stdio::null()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::inherit());
            let out = cmd.output().with_context(|| cannot_start(mpirun))?;
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
        print!("{}", bench_collectives::format_table(&report));
    }
    Ok(())
}

fn print_tableaux(json: bool) -> Result<()> {
    let mut rows = Vec::new();
    for name in Tableau::builtin_names() {
        let t = Tableau::builtin(name).with_context(|| format!("built-in tableau {name}"))?;
        rows.push(serde_json::json!({
            "name": t.name,
            "stages": t.stages(),
            "order": t.order(),
            "embedded_order": t.embedded_order(),
            "fsal": t.fsal(),
            "stage_buffers_resident": t.stages(),
            "stage_buffers_streaming": t.streaming_stage_buffers(),
        }));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!("{:<10} {:>6} {:>6} {:>9} {:>5} {:>9} {:>10}", "method", "stages", "order", "embedded", "fsal", "resident", "streaming");
    for r in &rows {
        println!(
            "{:<10} {:>6} {:>6} {:>9} {:>5} {:>9} {:>10}",
            r["name"].as_str().unwrap_or(""),
            r["stages"].to_string(),
            r["order"].to_string(),
            r["embedded_order"].as_u64().map_or("-".to_string(), |o| o.to_string()),
            if r["fsal"].as_bool() == Some(true) { "yes" } else { "no" },
            r["stage_buffers_resident"].to_string(),
            r["stage_buffers_streaming"].to_string(),
        );
    }
    println!("\norder: the highest p ≤ 5 for which every order condition (rooted tree) holds, checked in exact arithmetic up to 1e-10.");
    println!("resident/streaming: stage-gradient buffers (of P floats each) live at once when all k_i are kept,");
    println!("or when each b_i·k_i is accumulated at once and k_i freed after its last use (SPEC §6).");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The arguments `kutta bench --collectives` gives its child jobs parse as a worker.
    #[test]
    fn collectives_worker_args_parse() {
        let opts = CollectivesOptions { config: Some("configs/x.toml".into()), ..Default::default() };
        let argv = std::iter::once("kutta".to_string()).chain(opts.worker_args(&[Part::Steps, Part::AllReduce]));
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Bench { collectives_worker: Some(parts), per_rank_batch, min_seconds, min_reps, config, collectives, .. } => {
                assert_eq!(parts, ["steps", "allreduce"]);
                assert_eq!((per_rank_batch, min_seconds, min_reps, collectives), (128, Some(0.5), Some(5), false));
                assert_eq!(config, Some(PathBuf::from("configs/x.toml")));
            }
            _ => panic!("not a worker"),
        }
        assert!(Cli::try_parse_from(["kutta", "bench", "--collectives", "--batch-sizes", "4"]).is_err());
        assert!(Cli::try_parse_from(["kutta", "bench", "--max-ranks", "4"]).is_err());
    }

    /// `--sweep batch` takes --memory and --out; those need --sweep, and it excludes --collectives.
    #[test]
    fn sweep_args_parse() {
        match Cli::try_parse_from(["kutta", "bench", "--sweep", "batch", "--memory", "1GiB", "--batch-sizes", "8,16", "--out", "x"]).unwrap().command {
            Command::Bench { sweep, memory, batch_sizes, out, min_reps, .. } => {
                assert_eq!(sweep.as_deref(), Some("batch"));
                assert_eq!(memory.as_deref(), Some("1GiB"));
                assert_eq!(batch_sizes, Some(vec![8, 16]));
                assert_eq!(out, Some(PathBuf::from("x")));
                assert_eq!(min_reps, None);
            }
            _ => panic!("not a bench"),
        }
        assert!(Cli::try_parse_from(["kutta", "bench", "--memory", "1GiB"]).is_err());
        assert!(Cli::try_parse_from(["kutta", "bench", "--out", "x"]).is_err());
        assert!(Cli::try_parse_from(["kutta", "bench", "--sweep", "lr"]).is_err());
        assert!(Cli::try_parse_from(["kutta", "bench", "--sweep", "batch", "--collectives"]).is_err());
    }

    /// `--kernels` and `--nccl` stand alone; `--set` goes with the bench and the sweep.
    #[test]
    fn gpu_check_args_parse() {
        match Cli::try_parse_from(["kutta", "bench", "--kernels", "--json"]).unwrap().command {
            Command::Bench { kernels, nccl, json, .. } => assert_eq!((kernels, nccl, json), (true, false, true)),
            _ => panic!("not a bench"),
        }
        assert!(matches!(Cli::try_parse_from(["kutta", "bench", "--nccl"]).unwrap().command, Command::Bench { nccl: true, kernels: false, .. }));
        assert!(Cli::try_parse_from(["kutta", "bench", "--kernels", "--nccl"]).is_err());
        assert!(Cli::try_parse_from(["kutta", "bench", "--kernels", "--sweep", "batch"]).is_err());
        assert!(Cli::try_parse_from(["kutta", "bench", "--nccl", "--collectives"]).is_err());
        match Cli::try_parse_from(["kutta", "bench", "--sweep", "batch", "--set", "data.dir=d", "--set", "train.device=cuda"]).unwrap().command {
            Command::Bench { sets, .. } => assert_eq!(sets, ["data.dir=d", "train.device=cuda"]),
            _ => panic!("not a bench"),
        }
        assert!(Cli::try_parse_from(["kutta", "bench", "--collectives", "--set", "x=1"]).is_err());
        let cfg = bench_base(None, &["data.dir=d".into(), "train.device=cpu".into()]).unwrap();
        assert_eq!(cfg.data.dir, PathBuf::from("d"));
        assert!(bench_base(None, &["no.such_key=1".into()]).is_err());
    }

    /// Without the `cuda` feature both GPU checks are errors that say what is missing.
    #[cfg(not(feature = "cuda"))]
    #[test]
    fn gpu_checks_need_the_cuda_feature() {
        let e = gpu::bench_kernels(false).unwrap_err().to_string();
        assert!(e.contains("--kernels") && e.contains("--features cuda"), "{e}");
        assert_eq!(gpu::bench_nccl(false), 1);
    }
}
