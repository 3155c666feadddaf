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
use kutta_trainer::config::Config;
use kutta_trainer::planner;
use kutta_trainer::stop;
use kutta_trainer::tableau::Tableau;
use kutta_trainer::train::{self, Progress};
use std::path::PathBuf;

/// Counts heap bytes live and their peak (`memory::CountingAlloc`): `summary.json`'s
/// `peak_heap_mib` and `kutta bench ode`'s memory column.
#[global_allocator]
static ALLOC: kutta_trainer::memory::CountingAlloc = kutta_trainer::memory::CountingAlloc;

mod bench;
mod plot;
mod study;

#[derive(Parser)]
#[command(
    name = "kutta",
    version,
    about = "Data-parallel neural-network training with Runge-Kutta solvers of the gradient flow"
)]
struct Cli {
    /// Compute threads of this process (candle's CPU kernels and rayon's pool) [default:
    /// RAYON_NUM_THREADS, else Slurm's --cpus-per-task, else the cores / the ranks on this node].
    #[arg(long, global = true, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    threads: Option<u64>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model (a new run from --config, or continue one with --resume DIR).
    Train {
        /// Workload TOML file (see configs/ and the README's key table; data.format = idx,
        /// cifar10, cifar100, imagefolder (ImageNet folders, with data.image_size, data.workers,
        /// data.prefetch_mib) or imagenet64).
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
    ///
    /// Threads per rank: each rank takes the cores of this machine divided by the ranks on it
    /// (one thread each for 2 ranks on 2 cores; mpirun's OMPI_COMM_WORLD_LOCAL_SIZE says how many
    /// share the node). `kutta --threads T launch …` or RAYON_NUM_THREADS=T gives every rank T
    /// threads; under Slurm, --cpus-per-task does (SLURM_CPUS_PER_TASK).
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
    /// List the model kinds (`model.kind`) with the keys each reads and their defaults.
    Models {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
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
    /// Benchmarks: optimizer steps, a batch-size sweep, collectives, the GPU self-checks.
    ///
    /// `kutta bench` alone is `kutta bench steps`.
    Bench(Box<bench::BenchArgs>),
    /// Run a study: a grid of runs over config keys, seeds and world sizes, aggregated into
    /// report.md and report.html (resumable: finished runs are skipped).
    Study(study::StudyArgs),
    /// Plot runs' metrics: one line per run folder (SVG, or PNG when --out ends in .png).
    Plot {
        /// Run folders (each with a metrics.jsonl).
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        /// The x axis.
        #[arg(long, value_enum, default_value = "step")]
        x: plot::XAxis,
        /// The y axis.
        #[arg(long, value_enum, default_value = "test-accuracy")]
        y: plot::YAxis,
        /// Output file (.svg or .png).
        #[arg(long, default_value = "plot.svg")]
        out: PathBuf,
    },
}

fn main() {
    let cli = Cli::parse();
    let flag = cli.threads.map(|n| n as usize);
    // The launcher computes nothing: its ranks decide for themselves (`launch` passes --threads on).
    let threads = (!matches!(cli.command, Command::Launch { .. } | Command::Study(_)))
        .then(|| kutta_trainer::threads::init(flag));
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    if let (Some(t), Command::Train { .. } | Command::Plan { .. }) = (&threads, &cli.command) {
        tracing::info!("compute threads: {} ({})", t.threads, t.reason);
    }
    match cli.command {
        Command::Train { config, mut sets, out, resume, progress, collective_timeout, memory, gpu } => {
            sets.extend(gpu.map(|g| format!("train.gpu={g}")));
            std::process::exit(train_on_every_rank(config, sets, out, resume, &progress, collective_timeout, memory))
        }
        Command::Bench(args) => {
            std::process::exit(bench::main(*args, threads.expect("decided for every command but launch")))
        }
        Command::Study(args) => match study::main(args, flag) {
            Ok(code) => std::process::exit(code),
            Err(e) => {
                eprintln!("error: {e:#}");
                std::process::exit(1);
            }
        },
        Command::Launch { nproc, mpirun, args } => match launch(nproc, &mpirun, &args, flag) {
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
/// collectives` run it.
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
///
/// `threads` (`kutta --threads T launch …`) reaches every rank as RAYON_NUM_THREADS=T, which
/// mpirun passes on to local ranks; without it each rank decides (`threads::decide`).
fn launch(nproc: usize, mpirun: &str, args: &[String], threads: Option<usize>) -> Result<i32> {
    use std::os::unix::process::CommandExt;
    let mut cmd = mpirun_command(nproc, mpirun, args)?;
    if let Some(t) = threads {
        cmd.env("RAYON_NUM_THREADS", t.to_string());
    }
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
        Command::Train { .. } | Command::Launch { .. } | Command::Bench(_) | Command::Study(_) => {
            unreachable!("handled in main")
        }
        Command::Plot { runs, x, y, out } => plot::plot_runs(&runs, x, y, &out)?,
        Command::Tableaux { json } => print_tableaux(json)?,
        Command::Models { json } => print_models(json)?,
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
    }
    Ok(())
}

/// `kutta models`: every model kind, what it is, its keys and their defaults.
fn print_models(json: bool) -> Result<()> {
    let kinds = kutta_trainer::model::registry::summaries();
    if json {
        println!("{}", serde_json::to_string_pretty(&kinds)?);
        return Ok(());
    }
    for k in &kinds {
        let keys: Vec<String> = k.defaults.iter().map(|(key, v)| format!("model.{key} = {v}")).collect();
        println!("{:<9} {}", k.name, k.about);
        println!("{:<9} {}", "", if keys.is_empty() { "(no keys)".to_string() } else { keys.join(", ") });
    }
    println!("(set with --set model.kind=<kind> --set model.<key>=<value>, or in the config's [model] table)");
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
    println!(
        "{:<10} {:>6} {:>6} {:>9} {:>5} {:>9} {:>10}",
        "method", "stages", "order", "embedded", "fsal", "resident", "streaming"
    );
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
