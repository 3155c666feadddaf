//! Running a study's runs: each one a child `kutta train` (or `kutta launch … -- train` for a
//! world size), at most `--jobs` at once with the cores split between them.
//!
//! Started again, a study looks at each run folder: a completed run is skipped, one with a
//! checkpoint is resumed (`kutta train --resume`), one that died before its first checkpoint is
//! started over. A run folder whose `config.toml` differs from what the study file now asks
//! for (beyond the keys a resume may change) is an error naming the folder and the key: the
//! study never mixes runs of two configurations in one cell, and never deletes a run that has
//! a checkpoint.
//!
//! SIGINT, SIGTERM and SIGUSR1 to the study are passed once to every running run (each in its
//! own process group, so that a terminal's Ctrl-C does not reach them twice): they stop
//! gracefully with a checkpoint, and the next `kutta study` resumes them.

use super::spec::{RunSpec, Study};
use anyhow::{bail, Context, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use kutta_trainer::checkpoint;
use kutta_trainer::config::{Config, RESUMABLE_KEYS};
use kutta_trainer::stop;
use kutta_trainer::train::{pct, MetricsLine, Summary, CONFIG_FILE, METRICS_FILE, SUMMARY_FILE};
use std::collections::VecDeque;
use std::io::{IsTerminal, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What a run folder holds.
#[derive(Debug, Clone, PartialEq)]
pub enum State {
    /// Completed with the steps the study asks for.
    Done,
    /// Stopped in this step with non-finite values (`Summary::diverged_in`): a result of its
    /// settings, kept as it is (starting it again would diverge again); delete the folder to retry.
    Diverged(u64),
    /// A checkpoint at this step: continue with `--resume`.
    Resume(u64),
    /// Nothing to continue from: start (the folder, if any, holds no checkpoint).
    Fresh,
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            State::Done => write!(f, "complete"),
            State::Diverged(step) => write!(f, "diverged@{step}"),
            State::Resume(step) => write!(f, "resume@{step}"),
            State::Fresh => write!(f, "start"),
        }
    }
}

/// The resolved config a run of the study trains with.
pub fn expected_config(study: &Study, run: &RunSpec) -> Result<Config> {
    Config::load(&study.base, &run.sets).with_context(|| format!("run {} ({})", run.name, run.sets.join(" ")))
}

/// What `inspect` would say, without starting anything over (`--dry-run`).
pub fn peek(dir: &Path, expected: &Config) -> Result<State> {
    inspect_with(dir, expected, false)
}

/// Look at a run folder against the config it should have; a folder without a checkpoint is
/// emptied, to be started over.
pub fn inspect(dir: &Path, expected: &Config) -> Result<State> {
    inspect_with(dir, expected, true)
}

fn inspect_with(dir: &Path, expected: &Config, clear: bool) -> Result<State> {
    if !dir.exists() || dir.read_dir().map(|mut d| d.next().is_none()).unwrap_or(false) {
        return Ok(State::Fresh);
    }
    let cfg_path = dir.join(CONFIG_FILE);
    if cfg_path.is_file() {
        let had = Config::load(&cfg_path, &[])?;
        let differ: Vec<String> =
            expected.changed_keys(&had).into_iter().filter(|k| !RESUMABLE_KEYS.contains(&k.as_str())).collect();
        if !differ.is_empty() {
            bail!(
                "run folder {}: its config differs from what the study asks for in `{}`; the study file changed \
                 since this run was made: move the folder away (or restore the study file) to go on",
                dir.display(),
                differ.join("`, `")
            );
        }
    }
    let summary: Option<Summary> =
        std::fs::read_to_string(dir.join(SUMMARY_FILE)).ok().and_then(|s| serde_json::from_str(&s).ok());
    if let Some(s) = &summary {
        if s.status == "completed"
            && s.steps == expected.train.steps
            && dir.join(kutta_trainer::train::MODEL_FILE).is_file()
        {
            return Ok(State::Done);
        }
        if let Some(step) = s.diverged_in() {
            return Ok(State::Diverged(step));
        }
    }
    let newest = checkpoint::list(dir)?.into_iter().filter_map(|p| checkpoint::step_of(&p)).max();
    match newest {
        Some(step) if step > expected.train.steps => bail!(
            "run folder {}: has a checkpoint at step {step}, beyond train.steps = {}",
            dir.display(),
            expected.train.steps
        ),
        Some(step) => Ok(State::Resume(step)),
        None => {
            // Died before its first checkpoint: nothing to keep but a partial log. Only files
            // the trainer makes are removed; anything else means the folder is not ours.
            for entry in std::fs::read_dir(dir).with_context(|| format!("run folder {}", dir.display()))? {
                let entry = entry?;
                let name = entry.file_name().to_string_lossy().into_owned();
                let ours = [CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, "plan.json"].contains(&name.as_str())
                    || name.starts_with("events.out.tfevents.")
                    || name.ends_with(".tmp");
                if !ours || !entry.file_type()?.is_file() {
                    bail!(
                        "run folder {}: holds {name:?}, which kutta train does not write, and no checkpoint: \
                         not starting it over; move it away",
                        dir.display()
                    );
                }
            }
            if clear {
                for entry in std::fs::read_dir(dir)? {
                    std::fs::remove_file(entry?.path())?;
                }
            }
            Ok(State::Fresh)
        }
    }
}

/// How to start the children.
pub struct Launch {
    pub exe: PathBuf,
    pub jobs: usize,
    /// Compute threads of each rank of each run.
    pub threads_per_rank: Option<usize>,
    pub mpirun: String,
}

impl Launch {
    /// `--jobs` runs at once share the cores: each rank gets cores / (jobs × its run's ranks).
    pub fn threads_for(&self, world: usize) -> usize {
        self.threads_per_rank.unwrap_or_else(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            (cores / (self.jobs * world).max(1)).max(1)
        })
    }

    fn command(&self, study: &Study, run: &RunSpec, dir: &Path, state: &State) -> Command {
        let mut c = Command::new(&self.exe);
        // The logs are files: no colour codes in them.
        c.env("NO_COLOR", "1");
        let world = run.world_size.unwrap_or(1);
        c.arg("--threads").arg(self.threads_for(world).to_string());
        if let Some(w) = run.world_size {
            c.args(["launch", "--nproc", &w.to_string(), "--mpirun", &self.mpirun, "--"]);
        }
        c.arg("train");
        match state {
            State::Resume(_) => {
                c.arg("--resume").arg(dir);
                // The keys a resume may change take the study's values (e.g. more steps).
                for s in &run.sets {
                    let key = s.split_once('=').map_or(s.as_str(), |(k, _)| k);
                    if RESUMABLE_KEYS.contains(&key) {
                        c.arg("--set").arg(s);
                    }
                }
            }
            _ => {
                c.arg("--config").arg(&study.base).arg("--out").arg(dir);
                for s in &run.sets {
                    c.arg("--set").arg(s);
                }
            }
        }
        if let Some(m) = &study.memory {
            c.args(["--memory", m]);
        }
        c.args(["--progress", "lines"]);
        c
    }
}

struct Running {
    index: usize,
    run: RunSpec,
    dir: PathBuf,
    child: Child,
    started: Instant,
    bar: Option<ProgressBar>,
    steps: u64,
    last_report: Instant,
}

/// What happened to the runs.
#[derive(Debug, Default)]
pub struct Outcome {
    pub done: usize,
    pub skipped: usize,
    /// Runs that stopped with non-finite values, now or before (not failures: results).
    pub diverged: Vec<String>,
    pub failed: Vec<String>,
    /// The signal the study was stopped by.
    pub stopped: Option<i32>,
}

/// Run every run of the study that is not complete, `launch.jobs` at once.
pub fn run_all(study: &Study, out: &Path, launch: &Launch) -> Result<Outcome> {
    let runs = study.runs()?;
    if !cfg!(feature = "mpi") && runs.iter().any(|r| r.world_size.is_some_and(|w| w > 1)) {
        bail!(
            "world_sizes: runs on more than one rank need a kutta built with MPI: cargo build --release --features mpi"
        );
    }
    let runs_dir = out.join("runs");
    let logs = out.join("logs");
    std::fs::create_dir_all(&runs_dir).with_context(|| format!("study folder {}", runs_dir.display()))?;
    std::fs::create_dir_all(&logs).with_context(|| format!("study folder {}", logs.display()))?;
    // Every run is checked before any starts: a changed study file stops here, not halfway.
    let mut todo = VecDeque::new();
    let mut outcome = Outcome::default();
    let total = runs.len();
    for (i, run) in runs.iter().enumerate() {
        let cfg = expected_config(study, run)?;
        let dir = runs_dir.join(&run.name);
        match inspect(&dir, &cfg)? {
            State::Done => outcome.skipped += 1,
            State::Diverged(_) => {
                outcome.skipped += 1;
                outcome.diverged.push(run.name.clone());
            }
            state => todo.push_back((i, run.clone(), state, cfg.train.steps)),
        }
    }
    let terminal = std::io::stderr().is_terminal();
    let multi = terminal.then(MultiProgress::new);
    let overall = multi.as_ref().map(|m| {
        let b = m.add(ProgressBar::new(total as u64));
        b.set_style(
            ProgressStyle::with_template("study {msg} [{bar:30}] {pos}/{len} runs, {elapsed} elapsed").unwrap(),
        );
        b.set_position(outcome.skipped as u64);
        b.set_message(study.name.clone());
        b
    });
    let say = |line: String| match &multi {
        Some(m) => m.println(line).unwrap_or(()),
        None => eprintln!("{line}"),
    };
    say(format!(
        "study {}: {total} runs ({} cells × {} seeds{}), {} complete, {} to run, {} at once, {} compute threads per rank; folder {}",
        study.name,
        study.cells().len(),
        study.seeds.len(),
        if study.world_sizes.is_empty() { String::new() } else { format!(" × world sizes {:?}", study.world_sizes) },
        outcome.skipped,
        todo.len(),
        launch.jobs,
        launch.threads_for(1),
        out.display()
    ));
    stop::install()?;
    let t0 = Instant::now();
    let mut running: Vec<Running> = Vec::new();
    let mut forwarded = false;
    let mut last_study_line = Instant::now();
    loop {
        if let (Some(sig), false) = (stop::pending(), forwarded) {
            forwarded = true;
            outcome.stopped = Some(sig);
            say(format!(
                "study: {} received: stopping {} running run(s) after their step in progress (each writes a checkpoint); \
                 `kutta study` again resumes them",
                stop::name(sig),
                running.len()
            ));
            for r in &running {
                // SAFETY: kill(2) on our own child.
                unsafe { libc::kill(r.child.id() as libc::pid_t, sig) };
            }
        }
        while running.len() < launch.jobs && outcome.stopped.is_none() {
            let Some((index, run, state, steps)) = todo.pop_front() else { break };
            let dir = runs_dir.join(&run.name);
            let log_path = logs.join(format!("{}.log", run.name));
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .with_context(|| format!("log file {}", log_path.display()))?;
            let mut cmd = launch.command(study, &run, &dir, &state);
            {
                use std::os::unix::process::CommandExt;
                cmd.process_group(0);
            }
            cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
            let child = cmd.spawn().with_context(|| format!("starting {}", launch.exe.display()))?;
            let how = match state {
                State::Resume(s) => format!("resuming from step {s}"),
                _ => "starting".into(),
            };
            say(format!("[{}/{total}] {} {how} (log {})", index + 1, run.name, log_path.display()));
            let bar = multi.as_ref().map(|m| {
                let b = m.add(ProgressBar::new(steps));
                b.set_style(ProgressStyle::with_template("  {prefix:40} [{bar:25}] {pos}/{len} steps {msg}").unwrap());
                b.set_prefix(run.name.clone());
                b
            });
            running.push(Running {
                index,
                run,
                dir,
                child,
                started: Instant::now(),
                bar,
                steps,
                last_report: Instant::now(),
            });
        }
        if running.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
        let mut i = 0;
        while i < running.len() {
            let r = &mut running[i];
            let progress = last_metrics(&r.dir.join(METRICS_FILE));
            if let (Some(b), Some(p)) = (&r.bar, &progress) {
                b.set_position(p.step);
                b.set_message(p.describe());
            }
            if multi.is_none() && r.last_report.elapsed() > Duration::from_secs(60) {
                r.last_report = Instant::now();
                if let Some(p) = &progress {
                    say(format!("  {}: step {}/{} {}", r.run.name, p.step, r.steps, p.describe()));
                }
            }
            let Some(status) = r.child.try_wait()? else {
                i += 1;
                continue;
            };
            let r = running.remove(i);
            if let Some(b) = &r.bar {
                b.finish_and_clear();
            }
            let secs = r.started.elapsed().as_secs_f64();
            let code = status.code().unwrap_or(1);
            let summary: Option<Summary> =
                std::fs::read_to_string(r.dir.join(SUMMARY_FILE)).ok().and_then(|s| serde_json::from_str(&s).ok());
            if code == 0 {
                outcome.done += 1;
                if let Some(b) = &overall {
                    b.inc(1);
                }
                let acc = summary.as_ref().map_or(String::new(), |s| {
                    format!(": best test accuracy {}, final {}", pct(s.best_test_accuracy), pct(s.final_test_accuracy))
                });
                say(format!("[{}/{total}] {} done in {secs:.0} s{acc}", r.index + 1, r.run.name));
            } else if let Some(step) = summary.as_ref().and_then(Summary::diverged_in) {
                outcome.done += 1;
                if let Some(b) = &overall {
                    b.inc(1);
                }
                say(format!(
                    "[{}/{total}] {} diverged at step {step} after {secs:.0} s (non-finite values; left out of its cell)",
                    r.index + 1,
                    r.run.name,
                ));
                outcome.diverged.push(r.run.name.clone());
            } else if outcome.stopped.is_some() && code > 128 {
                say(format!("[{}/{total}] {} stopped (exit {code}); resumable", r.index + 1, r.run.name));
            } else {
                let log = logs.join(format!("{}.log", r.run.name));
                let tail = last_lines(&log, 3);
                say(format!(
                    "[{}/{total}] {} FAILED (exit {code}) after {secs:.0} s; log {}:\n{tail}",
                    r.index + 1,
                    r.run.name,
                    log.display()
                ));
                outcome.failed.push(r.run.name.clone());
            }
        }
        if multi.is_none() && last_study_line.elapsed() > Duration::from_secs(60) && !running.is_empty() {
            last_study_line = Instant::now();
            let finished = outcome.done + outcome.skipped;
            let left = todo.len() + running.len();
            let eta = if outcome.done > 0 {
                let per = t0.elapsed().as_secs_f64() / outcome.done as f64;
                format!(", about {:.0} min left", per * left as f64 / launch.jobs as f64 / 60.0)
            } else {
                String::new()
            };
            say(format!(
                "study {}: {finished}/{total} runs complete, {} running, {} failed, {:.0} min elapsed{eta}",
                study.name,
                running.len(),
                outcome.failed.len(),
                t0.elapsed().as_secs_f64() / 60.0
            ));
        }
    }
    if let Some(b) = &overall {
        b.finish_and_clear();
    }
    Ok(outcome)
}

/// Where a running run is: the last complete line of its metrics.jsonl, with the last test
/// accuracy seen near it.
struct Progress {
    step: u64,
    test_accuracy: Option<f64>,
}

impl Progress {
    fn describe(&self) -> String {
        self.test_accuracy.map_or(String::new(), |a| format!("test acc {:.2} %", 100.0 * a))
    }
}

fn last_metrics(path: &Path) -> Option<Progress> {
    let mut f = std::fs::File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(8192))).ok()?;
    let mut s = String::new();
    f.read_to_string(&mut s).ok()?;
    let lines: Vec<MetricsLine> =
        s.lines().filter(|l| l.ends_with('}')).filter_map(|l| serde_json::from_str(l).ok()).collect();
    let last = lines.last()?;
    Some(Progress { step: last.step, test_accuracy: lines.iter().rev().find_map(|l| l.test_accuracy) })
}

fn last_lines(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].iter().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n")
}
