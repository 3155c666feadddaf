//! A study's numbers: per run from its metrics.jsonl, per row (a cell at one world size) over
//! the seeds.
//!
//! Definitions (the report repeats them):
//! - best / final test accuracy: the highest and the last of the run's evaluations
//!   (`train.eval_every`); mean ± standard error (sample standard deviation / √n) over seeds;
//! - time-to-target (AlgoPerf, Dahl et al. 2023): the training time (`train_s`: the steps'
//!   wall clock, evaluation excluded) at the first evaluation that reaches the target; infinite
//!   when no evaluation does;
//! - steps-to-target (Shallue et al. 2019): the optimizer steps to that first evaluation;
//! - gradient evaluations to target: the same point counted in gradient evaluations (RK4: 4 per
//!   step, plus probes and rejected attempts);
//! - per row the three are medians over the seeds (infinite when more than half never reach
//!   the target, as AlgoPerf counts a workload not reached), with how many reached it;
//! - median step time: each run's median over its logged intervals of Δtrain_s / Δstep, then
//!   the median over seeds.
//!
//! Only completed runs enter a row; the report says how many of the seeds that is.

use super::spec::{Cell, RunSpec, Study, Target};
use crate::plot::{read_metrics, smooth};
use anyhow::Result;
use kutta_trainer::config::Config;
use kutta_trainer::train::{MetricsLine, Summary, CONFIG_FILE, SUMMARY_FILE};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

/// Where a run first reached a target.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Reach {
    pub step: u64,
    pub train_s: f64,
    pub grad_evals: u64,
}

#[derive(Debug, Clone)]
pub struct RunData {
    pub spec: RunSpec,
    pub lines: Vec<MetricsLine>,
    pub complete: bool,
    /// What the Runs table says of the run: "completed", "failed at step N: <what>" (the first
    /// clause of summary.json's reason, e.g. non-finite values after the step-halving retries),
    /// or the last step logged.
    pub status: String,
    pub batch_size: usize,
    pub best: Option<f64>,
    pub last: Option<f64>,
    pub reach: Vec<Option<Reach>>,
    pub median_step_s: Option<f64>,
}

impl RunData {
    pub fn read(dir: &Path, spec: &RunSpec, targets: &[Target]) -> Result<Option<RunData>> {
        if !dir.join(CONFIG_FILE).is_file() {
            return Ok(None);
        }
        let cfg = Config::load(&dir.join(CONFIG_FILE), &[])?;
        let lines = if dir.join(kutta_trainer::train::METRICS_FILE).is_file() { read_metrics(dir)? } else { vec![] };
        let summary: Option<Summary> =
            std::fs::read_to_string(dir.join(SUMMARY_FILE)).ok().and_then(|s| serde_json::from_str(&s).ok());
        let complete = summary.as_ref().is_some_and(|s| s.status == "completed" && s.steps == cfg.train.steps);
        let last_step = lines.last().map_or(0, |l| l.step);
        let status = run_status(complete, summary.as_ref().map(|s| s.status.as_str()), last_step);
        let evals: Vec<f64> = lines.iter().filter_map(|l| l.test_accuracy).collect();
        Ok(Some(RunData {
            spec: spec.clone(),
            complete,
            status,
            batch_size: cfg.train.batch_size,
            best: evals.iter().copied().reduce(f64::max),
            last: evals.last().copied(),
            reach: targets.iter().map(|t| reach(&lines, t)).collect(),
            median_step_s: median_step(&lines),
            lines,
        }))
    }
}

/// `RunData::status`: summary.json's status cut to its first clause when the run failed.
fn run_status(complete: bool, summary_status: Option<&str>, last_step: u64) -> String {
    match summary_status {
        _ if complete => "completed".into(),
        Some(s) if s.starts_with("failed") => s.splitn(3, ": ").take(2).collect::<Vec<_>>().join(": "),
        _ => format!("at step {last_step}"),
    }
}

/// The first logged point at which the run attains the target.
pub fn reach(lines: &[MetricsLine], t: &Target) -> Option<Reach> {
    lines
        .iter()
        .find(|l| {
            let v = match t.metric.as_str() {
                "test_accuracy" => l.test_accuracy,
                "test_loss" => l.test_loss,
                _ => Some(l.train_loss),
            };
            v.is_some_and(|v| t.reached(v))
        })
        .map(|l| Reach { step: l.step, train_s: l.train_s, grad_evals: l.grad_evals })
}

/// Median over logged intervals of the training time per step.
pub fn median_step(lines: &[MetricsLine]) -> Option<f64> {
    let per: Vec<f64> = lines
        .windows(2)
        .filter(|w| w[1].step > w[0].step && w[1].train_s >= w[0].train_s)
        .map(|w| (w[1].train_s - w[0].train_s) / (w[1].step - w[0].step) as f64)
        .collect();
    median(&per)
}

/// The median (`bench::steps::median`: the mean of the middle two for an even count; infinities
/// sort last); None for no values.
pub fn median(xs: &[f64]) -> Option<f64> {
    (!xs.is_empty()).then(|| crate::bench::steps::median(&mut xs.to_vec()))
}

/// Mean and standard error (None with fewer than two values).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MeanSe {
    pub mean: f64,
    pub se: Option<f64>,
    pub n: usize,
}

pub fn mean_se(xs: &[f64]) -> Option<MeanSe> {
    let n = xs.len();
    if n == 0 {
        return None;
    }
    let mean = xs.iter().sum::<f64>() / n as f64;
    let se = (n > 1).then(|| {
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        (var / n as f64).sqrt()
    });
    Some(MeanSe { mean, se, n })
}

/// A target over a row's seeds.
#[derive(Debug, Clone, Serialize)]
pub struct TargetRow {
    pub reached: usize,
    pub runs: usize,
    /// Medians over seeds; infinite when more than half did not reach it.
    pub steps: f64,
    pub train_s: f64,
    pub grad_evals: f64,
}

/// A cell at one world size, over its completed seeds.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub label: String,
    #[serde(skip)]
    pub cell: Cell,
    pub world_size: Option<usize>,
    pub batch_size: usize,
    pub seeds: usize,
    pub completed: usize,
    pub best: Option<MeanSe>,
    pub last: Option<MeanSe>,
    pub targets: Vec<TargetRow>,
    pub median_step_s: Option<f64>,
    pub paper_best: Option<f64>,
    pub paper_final: Option<f64>,
    pub paper_source: Option<String>,
}

/// Everything the report needs.
pub struct StudyData {
    pub runs: Vec<RunData>,
    pub rows: Vec<Row>,
}

impl StudyData {
    pub fn read(study: &Study, out: &Path) -> Result<StudyData> {
        let mut runs = Vec::new();
        for spec in study.runs()? {
            if let Some(r) = RunData::read(&out.join("runs").join(&spec.name), &spec, &study.targets)? {
                runs.push(r);
            }
        }
        let mut keys: Vec<(Cell, Option<usize>)> = Vec::new();
        for spec in study.runs()? {
            let k = (spec.cell.clone(), spec.world_size);
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
        let rows = keys.into_iter().map(|(cell, w)| row(study, &runs, &cell, w)).collect();
        Ok(StudyData { runs, rows })
    }

    /// The completed runs of a row.
    pub fn runs_of(&self, row: &Row) -> Vec<&RunData> {
        self.runs
            .iter()
            .filter(|r| r.complete && r.spec.cell == row.cell && r.spec.world_size == row.world_size)
            .collect()
    }
}

fn row(study: &Study, runs: &[RunData], cell: &Cell, world: Option<usize>) -> Row {
    let all: Vec<&RunData> = runs.iter().filter(|r| &r.spec.cell == cell && r.spec.world_size == world).collect();
    let done: Vec<&RunData> = all.iter().copied().filter(|r| r.complete).collect();
    let targets = (0..study.targets.len())
        .map(|t| {
            let reaches: Vec<Option<Reach>> = done.iter().map(|r| r.reach[t]).collect();
            let med = |f: fn(&Reach) -> f64| {
                median(&reaches.iter().map(|r| r.as_ref().map_or(f64::INFINITY, f)).collect::<Vec<_>>())
                    .unwrap_or(f64::INFINITY)
            };
            TargetRow {
                reached: reaches.iter().flatten().count(),
                runs: reaches.len(),
                steps: med(|r| r.step as f64),
                train_s: med(|r| r.train_s),
                grad_evals: med(|r| r.grad_evals as f64),
            }
        })
        .collect();
    let paper = study.paper_for(cell);
    let mut label = study.cell_label(cell);
    if let Some(w) = world {
        label.push_str(&format!(" · {w} rank{}", if w == 1 { "" } else { "s" }));
    }
    Row {
        label,
        cell: cell.clone(),
        world_size: world,
        batch_size: all.first().map_or(0, |r| r.batch_size),
        seeds: study.seeds.len(),
        completed: done.len(),
        best: mean_se(&done.iter().filter_map(|r| r.best).collect::<Vec<_>>()),
        last: mean_se(&done.iter().filter_map(|r| r.last).collect::<Vec<_>>()),
        targets,
        median_step_s: median(&done.iter().filter_map(|r| r.median_step_s).collect::<Vec<_>>()),
        paper_best: paper.and_then(|p| p.best_test_accuracy),
        paper_final: paper.and_then(|p| p.final_test_accuracy),
        paper_source: paper.map(|p| p.source.clone()),
    }
}

/// A learning curve of a row: at each step all its completed seeds logged, the mean of x and
/// of y, and y's standard error.
#[derive(Debug, Clone, Default)]
pub struct Curve {
    pub x: Vec<f64>,
    pub y: Vec<f64>,
    pub se: Vec<f64>,
}

/// Mean curve of `y` against `x` over runs (each run's train loss smoothed first), on the steps
/// that every run logged.
pub fn mean_curve(
    runs: &[&RunData],
    x: impl Fn(&MetricsLine) -> f64,
    y: impl Fn(&MetricsLine) -> Option<f64>,
    smoothed: bool,
) -> Curve {
    let mut at: BTreeMap<u64, Vec<(f64, f64)>> = BTreeMap::new();
    for r in runs {
        let pts: Vec<(u64, f64, f64)> = r.lines.iter().filter_map(|l| y(l).map(|v| (l.step, x(l), v))).collect();
        let ys: Vec<(f64, f64)> = pts.iter().map(|p| (p.1, p.2)).collect();
        let ys = if smoothed { smooth(&ys) } else { ys };
        for (p, (xv, yv)) in pts.iter().zip(ys) {
            at.entry(p.0).or_default().push((xv, yv));
        }
    }
    let mut c = Curve::default();
    for v in at.values().filter(|v| v.len() == runs.len()) {
        let xs: Vec<f64> = v.iter().map(|p| p.0).collect();
        let ys: Vec<f64> = v.iter().map(|p| p.1).collect();
        let m = mean_se(&ys).expect("not empty");
        c.x.push(xs.iter().sum::<f64>() / xs.len() as f64);
        c.y.push(m.mean);
        c.se.push(m.se.unwrap_or(0.0));
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_run_says_why_in_one_clause() {
        let failed = "failed at step 3180: non-finite values: step 3179: a stage gradient became NaN/Inf";
        assert_eq!(run_status(false, Some(failed), 3170), "failed at step 3180: non-finite values");
        assert_eq!(run_status(true, Some("completed"), 6000), "completed");
        assert_eq!(run_status(false, Some("interrupted"), 40), "at step 40");
        assert_eq!(run_status(false, None, 0), "at step 0");
    }

    #[test]
    fn medians_and_standard_errors() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[1.0, f64::INFINITY, f64::INFINITY]), Some(f64::INFINITY));
        assert_eq!(median(&[1.0, 2.0, f64::INFINITY]), Some(2.0));
        let m = mean_se(&[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert_eq!(m.mean, 2.5);
        // sd = sqrt(5/3), se = sd / 2
        assert!((m.se.unwrap() - (5.0f64 / 3.0).sqrt() / 2.0).abs() < 1e-15);
        assert_eq!(mean_se(&[7.0]).unwrap().se, None);
    }

    #[test]
    fn reach_and_step_time() {
        let line = |step, train_s, acc: Option<f64>| MetricsLine {
            step,
            train_s,
            grad_evals: 4 * step,
            test_accuracy: acc,
            train_loss: 1.0 / step as f64,
            ..Default::default()
        };
        let lines =
            vec![line(10, 1.0, Some(0.5)), line(20, 2.0, None), line(30, 3.5, Some(0.86)), line(40, 4.5, Some(0.9))];
        let t = Target { metric: "test_accuracy".into(), value: 0.85 };
        assert_eq!(reach(&lines, &t), Some(Reach { step: 30, train_s: 3.5, grad_evals: 120 }));
        let t = Target { metric: "train_loss".into(), value: 0.04 };
        assert_eq!(reach(&lines, &t).map(|r| r.step), Some(30));
        assert_eq!(reach(&lines, &Target { metric: "test_accuracy".into(), value: 0.95 }), None);
        // Intervals: 0.1, 0.15, 0.1 s per step.
        assert_eq!(median_step(&lines), Some(0.1));
    }
}
