//! `kutta bench sweep`: sgd, adam and rk4 step times against the batch size, each batch
//! size run the way the memory planner lays it out under a budget (micro-batches, stage-buffer
//! policy, activation recomputation), with the planner's predicted peak next to the measured one.
//! The sweep is one process, so it plans for a world of one rank: sharding the optimizer has
//! nothing to split there.
//!
//! The headline number is rk4 / (4 × sgd): the ratio of an rk4 step to four sgd gradient
//! evaluations. An sgd step is one gradient evaluation plus a cheap update (θ − h·g), so four of
//! them are the floor for rk4's four stages; the ratio says how much rk4's own bookkeeping (stage
//! points, the b·k combination) adds on top. The goal is ≤ `GOAL` at every batch size.
//!
//! Timing is interleaved as in `bench`: one step of each optimizer per round, in rotating order,
//! so drift in the machine's speed falls on all three alike. Outputs: a table, `sweep.csv` and
//! `sweep.svg` (step time against batch size, both axes logarithmic).

use super::steps::{bench_data, median, placement, time_interleaved, variant_config};
use super::SweepArgs;
use anyhow::{anyhow, Context, Result};
use kutta_trainer::config::Config;
use kutta_trainer::data::Dataset;
use kutta_trainer::memory;
use kutta_trainer::memory::mib;
use kutta_trainer::model::{self, ModelField};
use kutta_trainer::planner::{self, Plan};
use kutta_trainer::train::{build_model, build_optimizer_on, solver_kernels};
use kutta_trainer::Error;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// The default `--batch-sizes` (`SweepOptions::default`'s).
pub const BATCH_SIZES: &str = "16,128,1024,8192,60000";
/// The default `--memory` (`SweepOptions::default`'s budget).
pub const MEMORY: &str = "2GiB";
/// The default `--min-reps`.
pub const MIN_REPS: usize = 3;

/// The goal for rk4 / (4 × sgd) at every batch size.
pub const GOAL: f64 = 1.10;

/// The optimizers compared, as in `bench::variants` (same learning rates).
pub const OPTIMIZERS: [&str; 3] = ["sgd", "adam", "rk4"];

#[derive(Clone, Debug)]
pub struct SweepOptions {
    pub batch_sizes: Vec<usize>,
    /// Memory budget for the planner, in bytes (one process).
    pub budget: u64,
    /// Keep timing each batch size for at least this many seconds (after the warm-up round)…
    pub min_seconds: f64,
    /// …and at least this many steps of each optimizer (after one warm-up step)…
    pub min_reps: usize,
    /// …but never more than this many.
    pub max_reps: usize,
    /// Config whose model and data are used (defaults: the paper's MLP on Fashion-MNIST).
    pub base: Config,
}

impl Default for SweepOptions {
    fn default() -> Self {
        Self {
            batch_sizes: vec![16, 128, 1024, 8192, 60000],
            budget: 2 << 30,
            min_seconds: super::MIN_SECONDS,
            min_reps: MIN_REPS,
            max_reps: 1000,
            base: Config::default(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SweepRow {
    pub batch_size: usize,
    /// Samples per forward/backward pass (the smallest the three optimizers' plans chose).
    pub micro_batch: usize,
    pub micro_batches: usize,
    /// Activation recomputation (`ModelField::set_recompute`): on when any of the three plans
    /// chose it (they share one gradient oracle).
    pub recompute: bool,
    /// rk4's stage-buffer policy from its plan: streaming (true) or resident.
    pub rk4_streaming: bool,
    /// Timed steps of each optimizer (after one warm-up step).
    pub reps: usize,
    pub sgd_ms: f64,
    pub adam_ms: f64,
    pub rk4_ms: f64,
    /// Gradient evaluations per rk4 step (4 for classical RK4).
    pub rk4_grad_evals: f64,
    /// rk4_ms / (4 × sgd_ms).
    pub rk4_over_4sgd: f64,
    /// rk4_over_4sgd ≤ GOAL.
    pub meets_goal: bool,
    /// The planner's predicted peak: the largest of the three optimizers' plans.
    pub predicted_peak_mib: f64,
    /// Peak RSS while timing this batch size (after resetting the peak); None where the
    /// platform has no /proc/self/status.
    pub measured_peak_mib: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct SweepReport {
    pub machine: String,
    pub threads: usize,
    pub model: String,
    pub data: String,
    pub budget_bytes: u64,
    pub goal: f64,
    pub rows: Vec<SweepRow>,
    /// The command that reproduces the sweep (filled in by the caller, which knows the flags).
    pub command: String,
    /// Where `write_outputs` put sweep.csv and sweep.svg.
    pub csv: Option<PathBuf>,
    pub svg: Option<PathBuf>,
}

/// rk4 step time over four sgd steps (each one gradient evaluation plus a cheap update).
pub fn rk4_over_4sgd(rk4_ms: f64, sgd_ms: f64) -> f64 {
    rk4_ms / (4.0 * sgd_ms)
}

/// The planner's plan for `cfg` on one process. Where the config's data directory is unreadable
/// (the bench then times random images), the plan is made for the data set actually in memory.
fn plan_for(cfg: &Config, budget: u64, data: &Dataset) -> Result<Plan> {
    if planner::read_data_sizes(&cfg.data).is_ok() {
        return Ok(planner::plan_config(cfg, 1, budget)?);
    }
    let model = build_model(cfg, data)?;
    let fixed = data.resident_bytes() + planner::RUNTIME_BASELINE_BYTES;
    let input =
        planner::PlanInput::from_config(cfg, 1, budget, fixed, model.as_ref(), data.image_shape, data.num_classes)?;
    Ok(planner::plan(&input)?)
}

/// What the sweep runs at one batch size: each optimizer's config with its plan applied, and the
/// micro-batch and recomputation setting the shared gradient oracle uses.
struct SizePlan {
    configs: Vec<Config>,
    micro_batch: usize,
    micro_batches: usize,
    recompute: bool,
    rk4_streaming: bool,
    predicted_peak: u64,
}

fn plan_size(base: &Config, budget: u64, bs: usize, data: &Dataset) -> Result<SizePlan> {
    let mut configs = Vec::new();
    let mut chosen = Vec::new();
    for label in OPTIMIZERS {
        let cfg = variant_config(base, label, bs)?;
        let plan = plan_for(&cfg, budget, data).with_context(|| format!("batch {bs}, {label}"))?;
        configs.push(Config::from_toml_str(&cfg.to_toml(), &plan.overrides)?);
        chosen.push(plan.chosen);
    }
    // One gradient oracle serves all three (regathering per optimizer would be timed), so it
    // takes the smallest micro-batch any plan asked for, and recomputes if any plan does: both
    // only lower the peak.
    let micro_batch = chosen.iter().map(|c| c.micro_batch).min().unwrap_or(bs);
    let recompute = chosen.iter().any(|c| c.recompute);
    let rk4 = OPTIMIZERS.iter().position(|l| *l == "rk4").expect("rk4 is swept");
    Ok(SizePlan {
        rk4_streaming: configs[rk4].optimizer.streaming,
        micro_batches: bs.div_ceil(micro_batch.max(1)),
        micro_batch,
        recompute,
        predicted_peak: chosen.iter().map(|c| c.peak_bytes).max().unwrap_or(0),
        configs,
    })
}

/// Plans every batch size (failing before any timing if one fits under no plan), then times
/// sgd, adam and rk4 at each. `on_progress` gets one line per event (planned, timed).
pub fn run(opts: &SweepOptions, mut on_progress: impl FnMut(&str)) -> Result<SweepReport> {
    if opts.batch_sizes.is_empty() || opts.batch_sizes.contains(&0) {
        return Err(Error::config("--batch-sizes", "give one or more positive batch sizes").into());
    }
    let (data, data_desc) = bench_data(&opts.base);
    let model = build_model(&opts.base, &data)?;
    // train.device of the base config: the GPU when there is one (`auto`), as in training.
    let device = kutta_trainer::device::for_config(&opts.base)?;
    // On a GPU rk4 runs the GPU solver (as training does); sgd and adam stay on the host.
    let (kernels, _) = solver_kernels(&opts.base, &device, false)?;
    let theta0 = model::init_params(model.as_ref(), 0);

    let mut plans = Vec::new();
    for &bs in &opts.batch_sizes {
        let p = plan_size(&opts.base, opts.budget, bs, &data)?;
        on_progress(&format!(
            "batch {bs:>6}: plan {} × {}{}, rk4 {} stage buffers, predicted peak {}",
            p.micro_batches,
            p.micro_batch,
            if p.recompute { " with recomputation" } else { "" },
            if p.rk4_streaming { "streaming" } else { "resident" },
            planner::fmt_bytes(p.predicted_peak)
        ));
        plans.push(p);
    }

    let mut rows = Vec::new();
    for (&bs, plan) in opts.batch_sizes.iter().zip(&plans) {
        // The previous size's optimizers and batch are dropped: its peak must not count here.
        let peak_reset = memory::reset_peak();
        let optimizers = plan.configs.iter().map(|c| build_optimizer_on(c, &kernels)).collect::<Result<Vec<_>, _>>()?;
        let mut field = ModelField::new(model.as_ref(), &data);
        field.set_device(device.clone());
        field.use_solver_kernels(&kernels);
        field.set_micro_batch(plan.micro_batch);
        field.set_recompute(plan.recompute);
        let mut cells = time_interleaved(optimizers, &theta0, &mut field, data.len(), bs, |reps, secs| {
            reps >= opts.max_reps || (reps >= opts.min_reps && secs >= opts.min_seconds)
        })?;
        let measured = if peak_reset { memory::peak_rss_bytes() } else { None };
        let reps = cells[0].step_ms.len();
        let mut ms = [0.0; 3];
        for (m, cell) in ms.iter_mut().zip(cells.iter_mut()) {
            *m = median(&mut cell.step_ms);
        }
        let [sgd_ms, adam_ms, rk4_ms] = ms;
        let ratio = rk4_over_4sgd(rk4_ms, sgd_ms);
        let row = SweepRow {
            batch_size: bs,
            micro_batch: plan.micro_batch,
            micro_batches: plan.micro_batches,
            recompute: plan.recompute,
            rk4_streaming: plan.rk4_streaming,
            reps,
            sgd_ms,
            adam_ms,
            rk4_ms,
            rk4_grad_evals: cells[2].evals as f64 / reps.max(1) as f64,
            rk4_over_4sgd: ratio,
            meets_goal: ratio <= GOAL,
            predicted_peak_mib: mib(plan.predicted_peak),
            measured_peak_mib: measured.map(mib),
        };
        on_progress(&format!(
            "batch {bs:>6}: sgd {sgd_ms:.3} ms, adam {adam_ms:.3} ms, rk4 {rk4_ms:.3} ms ({reps} steps each); rk4/(4×sgd) {ratio:.3}; peak RSS {}",
            row.measured_peak_mib.map_or("n/a".into(), |m| format!("{m:.0} MiB"))
        ));
        rows.push(row);
    }
    Ok(SweepReport {
        machine: placement(&device, &kernels),
        threads: kutta_trainer::threads::current(),
        model: model.describe(),
        data: data_desc,
        budget_bytes: opts.budget,
        goal: GOAL,
        rows,
        command: String::new(),
        csv: None,
        svg: None,
    })
}

pub fn format_table(report: &SweepReport) -> String {
    let mut s = format!(
        "machine: {} ({} threads)\nmodel:   {}\ndata:    {}\nmemory:  budget {}; micro-batches, recomputation and rk4's stage buffers as the planner lays them out\n\n",
        report.machine,
        report.threads,
        report.model,
        report.data,
        planner::fmt_bytes(report.budget_bytes)
    );
    s += &format!(
        "{:>7} {:>15} {:>9} {:>6} {:>11} {:>11} {:>11} {:>12} {:>6} {:>9} {:>9}\n",
        "batch",
        "micro-batches",
        "recompute",
        "steps",
        "sgd ms",
        "adam ms",
        "rk4 ms",
        "rk4/(4×sgd)",
        format!("≤{:.2}", report.goal),
        "pred MiB",
        "meas MiB"
    );
    for r in &report.rows {
        s += &format!(
            "{:>7} {:>15} {:>9} {:>6} {:>11.3} {:>11.3} {:>11.3} {:>12.3} {:>6} {:>9.0} {:>9}\n",
            r.batch_size,
            format!("{} × {}", r.micro_batches, r.micro_batch),
            if r.recompute { "yes" } else { "no" },
            r.reps,
            r.sgd_ms,
            r.adam_ms,
            r.rk4_ms,
            r.rk4_over_4sgd,
            if r.meets_goal { "yes" } else { "NO" },
            r.predicted_peak_mib,
            r.measured_peak_mib.map_or("n/a".into(), |m| format!("{m:.0}"))
        );
    }
    s += &format!(
        "\nms: median step time. rk4/(4×sgd): the ratio of an rk4 step to four sgd gradient evaluations — an sgd\n\
         step is one gradient evaluation plus a cheap update, so 4 × sgd is the floor for rk4's four stages and the\n\
         excess is rk4's own overhead; goal ≤ {:.2} at every batch size ({} of {} rows meet it).\n\
         pred MiB: the planner's predicted peak (the largest of the three optimizers' plans); meas MiB: peak RSS\n\
         while timing that batch size. The bench holds all three optimizers at once and runs no evaluation pass.\n",
        report.goal,
        report.rows.iter().filter(|r| r.meets_goal).count(),
        report.rows.len()
    );
    if !report.command.is_empty() {
        s += &format!("reproduce: {}\n", report.command);
    }
    s
}

/// `sweep.csv`: a header row and one row per batch size.
pub fn to_csv(report: &SweepReport) -> String {
    let mut s = String::from(
        "batch_size,micro_batch,micro_batches,recompute,rk4_streaming,reps,sgd_ms,adam_ms,rk4_ms,rk4_grad_evals,rk4_over_4sgd,meets_goal,predicted_peak_mib,measured_peak_mib\n",
    );
    for r in &report.rows {
        s += &format!(
            "{},{},{},{},{},{},{:.6},{:.6},{:.6},{:.2},{:.6},{},{:.1},{}\n",
            r.batch_size,
            r.micro_batch,
            r.micro_batches,
            r.recompute,
            r.rk4_streaming,
            r.reps,
            r.sgd_ms,
            r.adam_ms,
            r.rk4_ms,
            r.rk4_grad_evals,
            r.rk4_over_4sgd,
            r.meets_goal,
            r.predicted_peak_mib,
            r.measured_peak_mib.map_or(String::new(), |m| format!("{m:.1}"))
        );
    }
    s
}

/// `sweep.svg`: median step time (ms, log scale) against batch size (log scale) for sgd, adam
/// and rk4, with 4 × sgd dashed as rk4's floor.
pub fn render_svg(report: &SweepReport, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let err = |e: &dyn std::fmt::Display| anyhow!("plot {}: {e}", path.display());
    if report.rows.is_empty() {
        anyhow::bail!("plot: no rows");
    }
    // Log axes need positive values; a 0 ms median would only come from a broken clock.
    let pos = |v: f64| if v > 0.0 && v.is_finite() { v } else { 1e-6 };
    let xs: Vec<f64> = report.rows.iter().map(|r| r.batch_size as f64).collect();
    let series: [(&str, Vec<f64>, RGBColor); 3] = [
        ("sgd", report.rows.iter().map(|r| pos(r.sgd_ms)).collect(), RGBColor(31, 119, 180)),
        ("adam", report.rows.iter().map(|r| pos(r.adam_ms)).collect(), RGBColor(44, 160, 44)),
        ("rk4", report.rows.iter().map(|r| pos(r.rk4_ms)).collect(), RGBColor(214, 39, 40)),
    ];
    let floor: Vec<f64> = report.rows.iter().map(|r| pos(4.0 * r.sgd_ms)).collect();
    let all = series.iter().flat_map(|(_, ys, _)| ys.iter()).chain(&floor).copied();
    let (ymin, ymax) = all.fold((f64::INFINITY, 0.0f64), |(lo, hi), y| (lo.min(y), hi.max(y)));
    let (xmin, xmax) = xs.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), &x| (lo.min(x), hi.max(x)));

    let root = SVGBackend::new(path, (900, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "kutta step time vs batch size ({} budget, {} threads)",
                planner::fmt_bytes(report.budget_bytes),
                report.threads
            ),
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d((xmin / 1.6..xmax * 1.6).log_scale(), (ymin / 1.6..ymax * 1.6).log_scale())
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("batch size (samples per step)")
        .y_desc("median step time (ms)")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| if *y >= 1.0 { format!("{y:.0}") } else { format!("{y:.2}") })
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 16))
        .draw()
        .map_err(|e| err(&e))?;
    for (label, ys, color) in &series {
        let pts: Vec<(f64, f64)> = xs.iter().copied().zip(ys.iter().copied()).collect();
        let color = *color;
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(*label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled()))).map_err(|e| err(&e))?;
    }
    let grey = RGBColor(90, 90, 90);
    let floor_pts: Vec<(f64, f64)> = xs.iter().copied().zip(floor.iter().copied()).collect();
    chart
        .draw_series(DashedLineSeries::new(floor_pts, 8, 5, grey.stroke_width(2)))
        .map_err(|e| err(&e))?
        .label("4 × sgd (rk4's floor: 4 gradient evaluations)")
        .legend(move |(x, y)| {
            PathElement::new(vec![(x, y), (x + 8, y), (x + 12, y), (x + 20, y)], grey.stroke_width(2))
        });
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// Write `sweep.csv` and `sweep.svg` into `dir` (created if needed) and record their paths.
pub fn write_outputs(report: &mut SweepReport, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let csv = dir.join("sweep.csv");
    std::fs::write(&csv, to_csv(report)).map_err(|e| Error::io(&csv, e))?;
    let svg = dir.join("sweep.svg");
    render_svg(report, &svg)?;
    report.csv = Some(csv);
    report.svg = Some(svg);
    Ok(())
}

/// The default output folder: `runs/bench-sweep-<unix time>`.
pub fn default_out_dir() -> PathBuf {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    PathBuf::from("runs").join(format!("bench-sweep-{t}"))
}

/// `kutta bench sweep`: plan, time, print the table (or JSON), write sweep.csv and sweep.svg.
pub fn main(args: &SweepArgs) -> Result<()> {
    let SweepArgs { batch_sizes, memory, out, min_seconds, min_reps, model, json } = args;
    let ok = !batch_sizes.is_empty() && !batch_sizes.contains(&0);
    anyhow::ensure!(ok, "--batch-sizes: batch sizes must be positive");
    let opts = SweepOptions {
        batch_sizes: batch_sizes.clone(),
        budget: planner::parse_bytes(memory)?,
        min_seconds: *min_seconds,
        min_reps: *min_reps,
        base: model.base()?,
        ..Default::default()
    };
    let out = out.clone().unwrap_or_else(default_out_dir);
    let mut report = run(&opts, |line| {
        if !json {
            eprintln!("  {line}");
        }
    })?;
    let sizes: Vec<String> = opts.batch_sizes.iter().map(|b| b.to_string()).collect();
    report.command = format!(
        "kutta bench sweep --memory {memory} --batch-sizes {} --min-seconds {} --min-reps {}{}",
        sizes.join(","),
        opts.min_seconds,
        opts.min_reps,
        model.reproduce_args()
    );
    write_outputs(&mut report, &out)?;
    if *json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", format_table(&report));
        println!("wrote {} and {}", out.join("sweep.csv").display(), out.join("sweep.svg").display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(bs: usize, sgd: f64, rk4: f64, measured: Option<f64>) -> SweepRow {
        let ratio = rk4_over_4sgd(rk4, sgd);
        SweepRow {
            batch_size: bs,
            micro_batch: bs,
            micro_batches: 1,
            recompute: false,
            rk4_streaming: true,
            reps: 3,
            sgd_ms: sgd,
            adam_ms: 1.5 * sgd,
            rk4_ms: rk4,
            rk4_grad_evals: 4.0,
            rk4_over_4sgd: ratio,
            meets_goal: ratio <= GOAL,
            predicted_peak_mib: 600.0,
            measured_peak_mib: measured,
        }
    }

    fn report(rows: Vec<SweepRow>) -> SweepReport {
        SweepReport {
            machine: "test cpu".into(),
            threads: 2,
            model: "mlp".into(),
            data: "random".into(),
            budget_bytes: 2 << 30,
            goal: GOAL,
            rows,
            command: "kutta bench sweep".into(),
            csv: None,
            svg: None,
        }
    }

    #[test]
    fn ratio_csv_and_table() {
        assert_eq!(rk4_over_4sgd(4.4, 1.0), 1.1);
        assert!((rk4_over_4sgd(10.0, 2.0) - 1.25).abs() < 1e-12);
        let r = report(vec![row(16, 1.0, 4.2, Some(512.04)), row(60000, 2.0, 10.0, None)]);
        assert!(r.rows[0].meets_goal && !r.rows[1].meets_goal);
        let csv = to_csv(&r);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("batch_size,micro_batch,micro_batches,"));
        assert_eq!(lines[1], "16,16,1,false,true,3,1.000000,1.500000,4.200000,4.00,1.050000,true,600.0,512.0");
        assert_eq!(lines[2], "60000,60000,1,false,true,3,2.000000,3.000000,10.000000,4.00,1.250000,false,600.0,");
        let cols = lines[0].split(',').count();
        assert!(lines.iter().all(|l| l.split(',').count() == cols));
        let table = format_table(&r);
        assert!(table.contains("1.050") && table.contains("1.250"), "{table}");
        assert!(table.contains("≤1.10") && table.contains(" yes ") && table.contains(" NO "), "{table}");
        assert!(table.contains("1 of 2 rows meet it"), "{table}");
        assert!(table.contains("reproduce: kutta bench sweep"), "{table}");
    }

    #[test]
    fn tiny_sweep_writes_csv_and_svg() {
        let dir = tempfile::tempdir().unwrap();
        // No data there: the bench times random images and plans for them.
        let missing = dir.path().join("no-data");
        let base = Config::from_toml_str(
            "",
            &["model.hidden=[16]".to_string(), format!("data.dir={:?}", missing.display().to_string())],
        )
        .unwrap();
        let opts = SweepOptions { batch_sizes: vec![8, 16], min_seconds: 0.0, base, ..Default::default() };
        let mut lines = Vec::new();
        let mut report = run(&opts, |l| lines.push(l.to_string())).unwrap();
        assert_eq!(lines.len(), 4, "{lines:?}");
        assert!(report.data.starts_with("random images"), "{}", report.data);
        let out = dir.path().join("out");
        write_outputs(&mut report, &out).unwrap();

        let csv = std::fs::read_to_string(out.join("sweep.csv")).unwrap();
        let rows: Vec<Vec<&str>> = csv.lines().skip(1).map(|l| l.split(',').collect()).collect();
        assert_eq!(rows.len(), 2, "{csv}");
        for (r, bs) in rows.iter().zip(["8", "16"]) {
            assert_eq!(r[0], bs);
            assert_eq!(r[3], "false", "no recomputation at a small batch: {csv}");
            for ms in &r[6..9] {
                assert!(ms.parse::<f64>().unwrap() > 0.0, "{csv}");
            }
            assert_eq!(r[9], "4.00", "rk4 evaluates 4 gradients per step: {csv}");
        }
        let svg = std::fs::read_to_string(out.join("sweep.svg")).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
        assert!(svg.contains("batch size") && svg.contains("4 × sgd"));
        assert_eq!(report.svg.as_deref(), Some(out.join("sweep.svg").as_path()));
        assert!(report.rows.iter().all(|r| r.reps >= 3 && r.micro_batches == 1));
    }
}
