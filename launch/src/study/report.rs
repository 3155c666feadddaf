//! A study's report: `report.md` (tables, the figures as SVG files beside it), `report.html`
//! (the same Markdown rendered by pulldown-cmark, every figure inlined as SVG: one file that
//! opens offline), and `cells.csv` / `runs.csv` for other tools.

use super::aggregate::{mean_curve, median, MeanSe, Row, StudyData};
use super::spec::Study;
use crate::plot::{Chart, Series, XAxis, YAxis};
use anyhow::{Context, Result};
use kutta_trainer::train::pct;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The files written.
pub struct Written {
    pub markdown: PathBuf,
    pub html: PathBuf,
    pub figures: Vec<PathBuf>,
}

fn ms(x: &MeanSe, scale: f64, unit: &str) -> String {
    match x.se {
        Some(se) => format!("{:.2} ± {:.2}{unit}", scale * x.mean, scale * se),
        None => format!("{:.2}{unit}", scale * x.mean),
    }
}

fn finite(x: f64, f: impl Fn(f64) -> String) -> String {
    if x.is_finite() {
        f(x)
    } else {
        "∞".into()
    }
}

/// Write the report of whatever runs exist now.
pub fn write(study: &Study, out: &Path, data: &StudyData, command: &str) -> Result<Written> {
    let figs = figures(study, data);
    let mut md = String::new();
    let complete = data.runs.iter().filter(|r| r.complete).count();
    let total = study.runs()?.len();
    writeln!(md, "# Study `{}`\n", study.name)?;
    if !study.description.trim().is_empty() {
        writeln!(md, "{}\n", study.description.trim())?;
    }
    writeln!(
        md,
        "Base config `{}` (relative to the study file); {} cells × {} seeds ({:?}){}: {total} runs, {complete} completed. \
         Reproduce: `{command}` (finished runs are skipped, interrupted ones resumed).\n",
        study.base_as_written,
        study.cells().len(),
        study.seeds.len(),
        study.seeds,
        if study.world_sizes.is_empty() { String::new() } else { format!(" × world sizes {:?}", study.world_sizes) },
    )?;
    if !study.sets.is_empty() {
        writeln!(md, "Every run: `--set {}`.\n", study.sets.join("` `--set "))?;
    }
    if let Some(m) = &study.memory {
        writeln!(md, "Every run under the memory planner: `--memory {m}` per rank.\n")?;
    }
    for a in &study.axes {
        let vals: Vec<String> = a
            .values
            .iter()
            .map(|v| {
                let g = v.group.as_ref().map_or(String::new(), |g| format!(" (group {g})"));
                format!("**{}**{g}: `{}`", v.label, v.sets.join(" "))
            })
            .collect();
        writeln!(md, "- axis *{}*: {}", a.name, vals.join("; "))?;
    }
    writeln!(md)?;

    writeln!(md, "## Results\n")?;
    if !study.targets.is_empty() {
        let t: Vec<String> = study.targets.iter().map(|t| t.describe()).collect();
        writeln!(md, "Target{}: {}.\n", if t.len() > 1 { "s" } else { "" }, t.join("; "))?;
    }
    let has_paper = data.rows.iter().any(|r| r.paper_best.is_some() || r.paper_final.is_some());
    let mut head = vec!["cell", "runs", "best test acc.", "final test acc."];
    if has_paper {
        head.extend(["paper (best / final)"]);
    }
    let target_heads: Vec<String> = study
        .targets
        .iter()
        .flat_map(|t| {
            let d = t.short();
            [format!("reached {d}"), format!("steps to {d}"), format!("time to {d} (s)"), format!("grad. evals to {d}")]
        })
        .collect();
    let mut header: Vec<String> = head.iter().map(|s| s.to_string()).collect();
    header.extend(target_heads);
    header.push("median step (ms)".into());
    writeln!(md, "| {} |", header.join(" | "))?;
    writeln!(md, "|{}", "---|".repeat(header.len()))?;
    for r in &data.rows {
        let mut cells = vec![
            r.label.clone(),
            format!("{}/{}", r.completed, r.seeds),
            r.best.as_ref().map_or("–".into(), |m| ms(m, 100.0, " %")),
            r.last.as_ref().map_or("–".into(), |m| ms(m, 100.0, " %")),
        ];
        if has_paper {
            let p = |x: Option<f64>| x.map_or("–".into(), |v| format!("{:.2} %", 100.0 * v));
            cells.push(match (&r.paper_best, &r.paper_final) {
                (None, None) => "–".into(),
                (b, f) => format!(
                    "{} / {}{}",
                    p(*b),
                    p(*f),
                    r.paper_source.as_ref().filter(|s| !s.is_empty()).map_or(String::new(), |s| format!(" ({s})"))
                ),
            });
        }
        for t in &r.targets {
            cells.push(format!("{}/{}", t.reached, t.runs));
            cells.push(finite(t.steps, |x| format!("{x:.0}")));
            cells.push(finite(t.train_s, |x| format!("{x:.1}")));
            cells.push(finite(t.grad_evals, |x| format!("{x:.0}")));
        }
        cells.push(r.median_step_s.map_or("–".into(), |s| format!("{:.2}", 1e3 * s)));
        writeln!(md, "| {} |", cells.join(" | "))?;
    }
    writeln!(
        md,
        "\nMean ± standard error over the completed seeds (the \"runs\" column; a run that failed, e.g. diverged, \
         is left out, and the Runs table below says why). Best: the highest of a run's \
         evaluations; final: its last. *Time to target* is AlgoPerf's: the training time (the steps' wall clock, \
         evaluation excluded) at the first evaluation that reaches the target; *steps to target* is Shallue et al.'s \
         (2019) count of optimizer steps to that evaluation; gradient evaluations count every stage, probe and \
         rejected attempt. The three are medians over seeds, ∞ when more than half never reach the target. Median \
         step: each run's median training time per step over its logged intervals, then the median over seeds.\n"
    )?;

    writeln!(md, "## Figures\n")?;
    let mut written = Vec::new();
    for (file, chart) in &figs {
        let path = out.join(file);
        std::fs::write(&path, chart.svg()?).with_context(|| format!("writing {}", path.display()))?;
        writeln!(md, "![{}]({file})\n", chart.title)?;
        written.push(path);
    }

    writeln!(md, "## Runs\n")?;
    let mut rh = vec!["run".to_string(), "status".into(), "best".into(), "final".into()];
    rh.extend(study.targets.iter().map(|t| format!("steps to {}", t.short())));
    rh.push("median step (ms)".into());
    writeln!(md, "| {} |\n|{}", rh.join(" | "), "---|".repeat(rh.len()))?;
    for r in &data.runs {
        let mut c = vec![format!("`{}`", r.spec.name), r.status.clone(), pct(r.best), pct(r.last)];
        c.extend(r.reach.iter().map(|x| x.map_or("∞".into(), |x| x.step.to_string())));
        c.push(r.median_step_s.map_or("–".into(), |s| format!("{:.2}", 1e3 * s)));
        writeln!(md, "| {} |", c.join(" | "))?;
    }
    writeln!(
        md,
        "\nRun folders: `runs/<run>/` (config.toml, metrics.jsonl, summary.json, model.safetensors); logs: `logs/`."
    )?;

    let markdown = out.join("report.md");
    std::fs::write(&markdown, &md).with_context(|| format!("writing {}", markdown.display()))?;
    let html = out.join("report.html");
    let svgs: BTreeMap<String, String> = figs.iter().map(|(f, c)| Ok((f.clone(), c.svg()?))).collect::<Result<_>>()?;
    std::fs::write(&html, to_html(&study.name, &md, &svgs)).with_context(|| format!("writing {}", html.display()))?;
    write_csv(study, out, data)?;
    Ok(Written { markdown, html, figures: written })
}

/// The Markdown as one HTML page, each `![…](file.svg)` replaced by the SVG itself.
pub fn to_html(title: &str, md: &str, svgs: &BTreeMap<String, String>) -> String {
    use pulldown_cmark::{html, Event, Options, Parser, Tag, TagEnd};
    // A figure is a paragraph holding only the image: the paragraph goes too (a <figure>
    // inside a <p> is not valid HTML).
    let parsed: Vec<Event> = Parser::new_ext(md, Options::ENABLE_TABLES).collect();
    let mut events = Vec::new();
    let mut i = 0;
    while i < parsed.len() {
        if let (Event::Start(Tag::Paragraph), Some(Event::Start(Tag::Image { dest_url, .. }))) =
            (&parsed[i], parsed.get(i + 1))
        {
            if let Some(svg) = svgs.get(dest_url.as_ref()) {
                let end_image = (i + 1..parsed.len()).find(|&j| matches!(parsed[j], Event::End(TagEnd::Image)));
                if let Some(j) = end_image.filter(|&j| matches!(parsed.get(j + 1), Some(Event::End(TagEnd::Paragraph))))
                {
                    events.push(Event::Html(format!("<figure>{svg}</figure>\n").into()));
                    i = j + 2;
                    continue;
                }
            }
        }
        events.push(parsed[i].clone());
        i += 1;
    }
    let mut body = String::new();
    html::push_html(&mut body, events.into_iter());
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>kutta study {}</title>\n<style>\n\
         body {{ font-family: sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }}\n\
         table {{ border-collapse: collapse; font-size: 0.9em; margin: 1em 0; }}\n\
         th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }}\n\
         th:first-child, td:first-child {{ text-align: left; }}\n\
         tr:nth-child(even) {{ background: #f6f6f6; }}\n\
         figure {{ margin: 1em 0; }} figure svg {{ max-width: 100%; height: auto; }}\n\
         code {{ background: #f2f2f2; padding: 0 0.2em; }}\n</style>\n</head>\n<body>\n{body}</body>\n</html>\n",
        escape(title)
    )
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// `cells.csv` (one line per row) and `runs.csv` (one per run).
fn write_csv(study: &Study, out: &Path, data: &StudyData) -> Result<()> {
    let q = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    let opt = |x: Option<f64>| x.map_or(String::new(), |v| v.to_string());
    let mut cells =
        String::from("cell,world_size,batch_size,completed,seeds,best_mean,best_se,final_mean,final_se,median_step_s");
    for (i, _) in study.targets.iter().enumerate() {
        write!(cells, ",target{i}_reached,target{i}_steps,target{i}_train_s,target{i}_grad_evals")?;
    }
    cells.push('\n');
    for r in &data.rows {
        write!(
            cells,
            "{},{},{},{},{},{},{},{},{},{}",
            q(&r.label),
            r.world_size.map_or(String::new(), |w| w.to_string()),
            r.batch_size,
            r.completed,
            r.seeds,
            opt(r.best.map(|m| m.mean)),
            opt(r.best.and_then(|m| m.se)),
            opt(r.last.map(|m| m.mean)),
            opt(r.last.and_then(|m| m.se)),
            opt(r.median_step_s)
        )?;
        for t in &r.targets {
            write!(cells, ",{},{},{},{}", t.reached, t.steps, t.train_s, t.grad_evals)?;
        }
        cells.push('\n');
    }
    std::fs::write(out.join("cells.csv"), cells)?;
    let mut runs = String::from("run,cell,seed,world_size,completed,best,final,median_step_s");
    for (i, _) in study.targets.iter().enumerate() {
        write!(runs, ",target{i}_step,target{i}_train_s,target{i}_grad_evals")?;
    }
    runs.push('\n');
    for r in &data.runs {
        write!(
            runs,
            "{},{},{},{},{},{},{},{}",
            q(&r.spec.name),
            q(&study.cell_label(&r.spec.cell)),
            r.spec.seed,
            r.spec.world_size.map_or(String::new(), |w| w.to_string()),
            r.complete,
            opt(r.best),
            opt(r.last),
            opt(r.median_step_s)
        )?;
        for x in &r.reach {
            match x {
                Some(x) => write!(runs, ",{},{},{}", x.step, x.train_s, x.grad_evals)?,
                None => runs.push_str(",,,"),
            }
        }
        runs.push('\n');
    }
    std::fs::write(out.join("runs.csv"), runs)?;
    Ok(())
}

/// The rows the learning curves show: all of them, except that of the members of a tuning group
/// (axis values with the same `group`, e.g. a learning-rate grid) with the same other values only
/// the one with the highest mean best test accuracy stays. The bool: whether any row was left out.
fn curve_rows<'a>(study: &Study, rows: &[&'a Row]) -> (Vec<&'a Row>, bool) {
    let key = |r: &Row| -> (Vec<String>, Option<usize>) {
        let parts = study
            .axes
            .iter()
            .zip(&r.cell)
            .map(|(a, &i)| a.values[i].group.clone().unwrap_or_else(|| format!("value {i}")))
            .collect();
        (parts, r.world_size)
    };
    let best = |r: &Row| r.best.as_ref().map_or(f64::NEG_INFINITY, |b| b.mean);
    let mut kept: Vec<&'a Row> = Vec::new();
    for &r in rows {
        match kept.iter_mut().find(|k| key(k) == key(r)) {
            Some(k) if best(r) > best(k) => *k = r,
            Some(_) => {}
            None => kept.push(r),
        }
    }
    let reduced = kept.len() < rows.len();
    (kept, reduced)
}

/// The report's figures, by file name.
fn figures(study: &Study, data: &StudyData) -> Vec<(String, Chart)> {
    let mut figs = Vec::new();
    let rows: Vec<&Row> = data.rows.iter().filter(|r| r.completed > 0).collect();
    let (curves, reduced) = curve_rows(study, &rows);
    for y in [YAxis::TestAccuracy, YAxis::TrainLoss] {
        for x in [XAxis::Step, XAxis::Train, XAxis::GradEvals] {
            let series: Vec<Series> = curves
                .iter()
                .map(|r| {
                    let runs = data.runs_of(r);
                    let c = mean_curve(&runs, |l| x.of(l), |l| y.of(l), y.smoothed());
                    Series {
                        name: format!("{} (n={})", r.label, runs.len()),
                        points: c.x.iter().copied().zip(c.y.iter().copied()).collect(),
                        band: (0..c.x.len()).map(|i| (c.x[i], c.y[i] - c.se[i], c.y[i] + c.se[i])).collect(),
                        markers: false,
                    }
                })
                .collect();
            let name = match y {
                YAxis::TestAccuracy => "test_accuracy",
                _ => "train_loss",
            };
            // Accuracy: the axis starts a little below the lowest value of the runs' last 80 %,
            // so that the plateau where cells differ is not squeezed by the first steps' rise.
            let y_min = (y == YAxis::TestAccuracy)
                .then(|| {
                    series
                        .iter()
                        .flat_map(|s| s.points[s.points.len() / 5..].iter().map(|p| p.1))
                        .fold(f64::INFINITY, f64::min)
                        - 0.02
                })
                .filter(|m| m.is_finite());
            let xname = match x {
                XAxis::Step => "steps",
                XAxis::Train | XAxis::Wall => "time",
                XAxis::GradEvals => "grad_evals",
            };
            let title = format!(
                "{} against {} ({}mean ± s.e. over seeds)",
                y.label(),
                x.short(),
                if reduced { "best of each group, " } else { "" }
            );
            figs.push((
                format!("curve_{name}_{xname}.svg"),
                Chart {
                    title,
                    x_label: x.label().into(),
                    y_label: if y.smoothed() { format!("{} (running mean)", y.label()) } else { y.label().into() },
                    log_x: false,
                    log_y: y.log(),
                    x_ticks: None,
                    y_min,
                    series,
                },
            ));
        }
    }
    // Against the batch size: one series per combination of the other axes, the members of a
    // tuning group reduced to the best (steps) or the median (step time).
    let batches: Vec<usize> = {
        let mut b: Vec<usize> = rows.iter().map(|r| r.batch_size).collect();
        b.sort();
        b.dedup();
        b
    };
    let batch_axes: Vec<bool> = study
        .axes
        .iter()
        // An axis of batch sizes: its values set the batch (and maybe steps, evaluation), not the
        // optimizer — an axis pairing each optimizer with its own batch is not a batch sweep.
        .map(|a| {
            a.values.iter().all(|v| v.sets.iter().any(|s| s.starts_with("train.batch_size=")))
                && !a.values.iter().any(|v| v.sets.iter().any(|s| s.starts_with("optimizer.")))
        })
        .collect();
    let series_key = |r: &Row| -> String {
        let mut parts: Vec<String> = study
            .axes
            .iter()
            .zip(&r.cell)
            .zip(&batch_axes)
            .filter(|(_, &b)| !b)
            .map(|((a, &i), _)| a.values[i].group.clone().unwrap_or_else(|| a.values[i].label.clone()))
            .collect();
        if let Some(w) = r.world_size {
            parts.push(format!("{w} rank{}", if w == 1 { "" } else { "s" }));
        }
        if parts.is_empty() {
            study.name.clone()
        } else {
            parts.join(" · ")
        }
    };
    let mut groups: BTreeMap<String, BTreeMap<usize, Vec<&Row>>> = BTreeMap::new();
    for r in &rows {
        groups.entry(series_key(r)).or_default().entry(r.batch_size).or_default().push(r);
    }
    // Against the batch size only when some line has two batch sizes or more.
    if batches.len() >= 2 && groups.values().any(|by| by.len() >= 2) {
        for (ti, t) in study.targets.iter().enumerate() {
            let series = groups
                .iter()
                .map(|(name, by)| {
                    let points: Vec<(f64, f64)> = by
                        .iter()
                        .map(|(&b, rs)| {
                            (b as f64, rs.iter().map(|r| r.targets[ti].steps).fold(f64::INFINITY, f64::min))
                        })
                        .collect();
                    let missed = points.iter().filter(|p| !p.1.is_finite()).count();
                    let name =
                        if missed > 0 { format!("{name} ({missed} batch sizes never reached)") } else { name.clone() };
                    Series { name, points, band: vec![], markers: true }
                })
                .collect();
            figs.push((
                format!("steps_to_target_{ti}.svg"),
                Chart {
                    title: format!("steps to {} against batch size (best of each group)", t.describe()),
                    x_label: "batch size".into(),
                    y_label: "steps to target".into(),
                    log_x: true,
                    log_y: true,
                    x_ticks: Some(batches.iter().map(|&b| b as f64).collect()),
                    y_min: None,
                    series,
                },
            ));
        }
        let series = groups
            .iter()
            .map(|(name, by)| Series {
                name: name.clone(),
                points: by
                    .iter()
                    .filter_map(|(&b, rs)| {
                        median(&rs.iter().filter_map(|r| r.median_step_s).collect::<Vec<_>>())
                            .map(|s| (b as f64, 1e3 * s))
                    })
                    .collect(),
                band: vec![],
                markers: true,
            })
            .collect();
        figs.push((
            "step_time_batch.svg".into(),
            Chart {
                title: "median step time against batch size".into(),
                x_label: "batch size".into(),
                y_label: "median step time (ms)".into(),
                log_x: true,
                log_y: true,
                x_ticks: Some(batches.iter().map(|&b| b as f64).collect()),
                y_min: None,
                series,
            },
        ));
    }
    if study.world_sizes.len() >= 2 {
        // Strong scaling (the global batch is the config's at every world size): efficiency
        // t_1 / (W · t_W) against the smallest world size measured, scaled to it.
        let mut by_cell: BTreeMap<String, Vec<(usize, f64)>> = BTreeMap::new();
        for r in &rows {
            if let (Some(w), Some(t)) = (r.world_size, r.median_step_s) {
                by_cell.entry(study.cell_label(&r.cell)).or_default().push((w, t));
            }
        }
        let eff = by_cell
            .iter()
            .map(|(name, pts)| {
                let (w0, t0) = pts.iter().copied().min_by_key(|p| p.0).expect("not empty");
                Series {
                    name: name.clone(),
                    points: pts.iter().map(|&(w, t)| (w as f64, (w0 as f64 * t0) / (w as f64 * t))).collect(),
                    band: vec![],
                    markers: true,
                }
            })
            .collect();
        figs.push((
            "scaling_efficiency.svg".into(),
            Chart {
                title: "scaling efficiency against world size (same global batch)".into(),
                x_label: "ranks".into(),
                y_label: "efficiency w₀·t(w₀) / (w·t(w))".into(),
                log_x: true,
                log_y: false,
                x_ticks: Some(study.world_sizes.iter().map(|&w| w as f64).collect()),
                y_min: None,
                series: eff,
            },
        ));
        let times = by_cell
            .iter()
            .map(|(name, pts)| Series {
                name: name.clone(),
                points: pts.iter().map(|&(w, t)| (w as f64, 1e3 * t)).collect(),
                band: vec![],
                markers: true,
            })
            .collect();
        figs.push((
            "step_time_world.svg".into(),
            Chart {
                title: "median step time against world size".into(),
                x_label: "ranks".into(),
                y_label: "median step time (ms)".into(),
                log_x: true,
                log_y: false,
                x_ticks: Some(study.world_sizes.iter().map(|&w| w as f64).collect()),
                y_min: None,
                series: times,
            },
        ));
    }
    figs
}
