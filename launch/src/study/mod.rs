//! `kutta study --config studies/NAME.toml [--jobs N] [--out DIR]`: a grid of runs over config
//! keys, seeds and world sizes, run (and resumed) as child processes, aggregated per cell and
//! reported in `report.md` and a self-contained `report.html`.
//!
//! - `spec.rs`: the study file and its expansion into runs (folder names, `--set`s);
//! - `runner.rs`: the runs as children, `--jobs` at once, skip / resume / start over;
//! - `aggregate.rs`: per run and per cell numbers (best/final accuracy, time-, steps- and
//!   gradient-evaluations-to-target, median step time), learning curves over seeds;
//! - `report.rs`: report.md, report.html, the SVG figures, cells.csv and runs.csv.

pub mod aggregate;
pub mod report;
pub mod runner;
pub mod spec;

use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct StudyArgs {
    /// The study file (see studies/ and the README's Studies section).
    #[arg(long)]
    pub config: PathBuf,
    /// Runs at once; the cores are split between them (and their ranks).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub jobs: u64,
    /// The study folder [default: runs/studies/<study name>].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Only (re)write the report from the runs that exist; start nothing.
    #[arg(long)]
    pub report_only: bool,
    /// List the runs with their overrides and what their folders hold, checking every run's
    /// config; start nothing.
    #[arg(long, conflicts_with = "report_only")]
    pub dry_run: bool,
    /// The mpirun for studies with world_sizes.
    #[arg(long, default_value = "mpirun")]
    pub mpirun: String,
}

/// Run the study and write its report; the exit status: 0 when every run completed or diverged
/// (non-finite values: a result, shown in the report), 1 when one failed otherwise, 128 + the
/// signal when stopped by one.
pub fn main(args: StudyArgs, threads_flag: Option<usize>) -> Result<i32> {
    let study = spec::Study::load(&args.config)?;
    let out = args.out.clone().unwrap_or_else(|| PathBuf::from("runs").join("studies").join(&study.name));
    let mut command = format!("kutta study --config {}", args.config.display());
    if args.jobs > 1 {
        command.push_str(&format!(" --jobs {}", args.jobs));
    }
    let mut code = 0;
    if args.dry_run {
        for run in study.runs()? {
            let cfg = runner::expected_config(&study, &run)?;
            let dir = out.join("runs").join(&run.name);
            let state = if dir.exists() { runner::peek(&dir, &cfg)?.to_string() } else { "new".into() };
            println!("{:<48} {:<10} --set {}", run.name, state, run.sets.join(" --set "));
        }
        return Ok(0);
    }
    if !args.report_only {
        std::fs::create_dir_all(&out)?;
        std::fs::copy(&args.config, out.join("study.toml"))?;
        let launch = runner::Launch {
            exe: std::env::current_exe()?,
            jobs: args.jobs as usize,
            threads_per_rank: threads_flag,
            mpirun: args.mpirun.clone(),
        };
        let outcome = runner::run_all(&study, &out, &launch)?;
        eprintln!(
            "study {}: {} runs finished now, {} were complete before, {} diverged (now or before), {} failed{}",
            study.name,
            outcome.done,
            outcome.skipped,
            outcome.diverged.len(),
            outcome.failed.len(),
            outcome.stopped.map_or(String::new(), |s| format!(
                "; stopped by {} (run the same command to resume)",
                kutta_trainer::stop::name(s)
            ))
        );
        if !outcome.diverged.is_empty() {
            eprintln!(
                "diverged (kept as results; delete a run's folder to run it again): {}",
                outcome.diverged.join(", ")
            );
        }
        if let Some(sig) = outcome.stopped {
            code = kutta_trainer::stop::exit_status(sig);
        } else if !outcome.failed.is_empty() {
            eprintln!("failed: {}", outcome.failed.join(", "));
            code = 1;
        }
    } else if !out.is_dir() {
        bail!("--report-only: no study folder {}", out.display());
    }
    let data = aggregate::StudyData::read(&study, &out)?;
    let w = report::write(&study, &out, &data, &command)?;
    eprintln!("report: {} and {} ({} figures)", w.markdown.display(), w.html.display(), w.figures.len());
    Ok(code)
}
