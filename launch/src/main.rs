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
use kutta_trainer::bench::{self, BenchOptions};
use kutta_trainer::config::Config;
use kutta_trainer::tableau::Tableau;
use kutta_trainer::train::{self, Progress};
use std::path::PathBuf;

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
        /// Continue the run in this folder from its checkpoint up to train.steps.
        #[arg(long, value_name = "DIR")]
        resume: Option<PathBuf>,
        /// Progress display: auto (bar on a terminal, log lines otherwise), bar, lines.
        #[arg(long, default_value = "auto", value_parser = ["auto", "bar", "lines"])]
        progress: String,
        /// Abort the whole job when one collective waits longer than this (seconds).
        #[arg(long, default_value_t = 300.0)]
        collective_timeout: f64,
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
    /// Time optimizer steps (sgd, adam, rk4, rk4 with all modifications) on the MLP.
    Bench {
        /// Batch sizes, comma-separated.
        #[arg(long, value_delimiter = ',', default_values_t = vec![16usize, 128, 1024, 8192])]
        batch_sizes: Vec<usize>,
        /// Minimum seconds spent timing each (optimizer, batch size) cell.
        #[arg(long, default_value_t = 2.0)]
        min_seconds: f64,
        /// Minimum timed steps per cell (after one warm-up step).
        #[arg(long, default_value_t = 5)]
        min_reps: usize,
        /// Config providing the model and data (default: the paper's MLP on Fashion-MNIST).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    match Cli::parse().command {
        Command::Train { config, sets, out, resume, progress, collective_timeout } => {
            std::process::exit(train_on_every_rank(config, sets, out, resume, &progress, collective_timeout))
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
) -> i32 {
    let timeout = (collective_timeout > 0.0).then(|| std::time::Duration::from_secs_f64(collective_timeout));
    let comm = match kutta_collectives::rendezvous::connect(timeout) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return 1;
        }
    };
    let (rank, size) = (comm.rank(), comm.world_size());
    // A panic anywhere aborts this process at once (never unwinding into MPI_Finalize while
    // peers wait); mpirun then ends the job.
    std::panic::set_hook(Box::new(move |info| {
        eprintln!("rank {rank}: panic: {info}");
        std::process::abort();
    }));
    let _span = (size > 1).then(|| tracing::info_span!("rank", r = rank).entered());
    let progress = match progress {
        "bar" => Progress::Bar,
        "lines" => Progress::Lines,
        _ => Progress::Auto,
    };
    let result = (|| -> Result<_> {
        Ok(match resume {
            Some(dir) => {
                let cfg = train::load_run_config(&dir, &sets)?;
                train::resume(&cfg, &dir, progress, comm.as_ref())?
            }
            None => {
                let path = config.expect("clap requires --config without --resume");
                let cfg = Config::load(&path, &sets)?;
                let out = out.unwrap_or_else(|| train::default_out_dir(&path));
                train::train(&cfg, &out, progress, comm.as_ref())?
            }
        })
    })();
    match result {
        Ok(summary) => {
            if comm.is_writer() {
                println!("{}", serde_json::to_string_pretty(&summary).expect("summary serializes"));
            }
            0
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

/// `kutta launch --nproc N -- ARGS`: run `mpirun -np N <this kutta> ARGS` and return its status.
fn launch(nproc: usize, mpirun: &str, args: &[String]) -> Result<i32> {
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
    let status = cmd.status().with_context(|| format!("cannot start `{mpirun}` (install Open MPI: apt-get install openmpi-bin libopenmpi-dev)"))?;
    Ok(status.code().unwrap_or_else(|| {
        eprintln!("error: {mpirun} was killed by a signal");
        1
    }))
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Train { .. } | Command::Launch { .. } => unreachable!("handled in main"),
        Command::Tableaux { json } => print_tableaux(json)?,
        Command::Bench { batch_sizes, min_seconds, min_reps, config, json } => {
            let base = match &config {
                Some(p) => Config::load(p, &[])?,
                None => Config::default(),
            };
            if batch_sizes.contains(&0) {
                anyhow::bail!("--batch-sizes: batch sizes must be positive");
            }
            let opts = BenchOptions { batch_sizes, min_seconds, min_reps, base, ..Default::default() };
            let report = bench::run(&opts, |r| {
                if !json {
                    eprintln!("  {:<18} batch {:>6}: {:>10.3} ms/step ({} steps)", r.optimizer, r.batch_size, r.median_step_ms, r.reps);
                }
            })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("{}", bench::format_table(&report));
                println!("reproduce: kutta bench --batch-sizes {} --min-seconds {min_seconds} --min-reps {min_reps}", opts.batch_sizes.iter().map(|b| b.to_string()).collect::<Vec<_>>().join(","));
            }
        }
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
