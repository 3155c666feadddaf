//! `kutta`: train with Runge-Kutta optimizers, list the built-in tableaux, benchmark steps.
//!
//! Errors a user can cause (bad config keys, missing data, a missing checkpoint) print one
//! `error:` line naming the key or file and exit with status 1; they never panic. Release builds
//! abort on panic (Cargo.toml), so a bug can never leave peer ranks waiting in a collective.

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
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train { config, sets, out, resume, progress } => {
            let progress = match progress.as_str() {
                "bar" => Progress::Bar,
                "lines" => Progress::Lines,
                _ => Progress::Auto,
            };
            let summary = match resume {
                Some(dir) => {
                    let cfg = train::load_run_config(&dir, &sets)?;
                    train::resume(&cfg, &dir, progress, &kutta_collectives::SingleProcess)?
                }
                None => {
                    let path = config.expect("clap requires --config without --resume");
                    let cfg = Config::load(&path, &sets)?;
                    let out = out.unwrap_or_else(|| train::default_out_dir(&path));
                    train::train(&cfg, &out, progress, &kutta_collectives::SingleProcess)?
                }
            };
            println!("{}", serde_json::to_string_pretty(&summary)?);
        }
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
