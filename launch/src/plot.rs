//! Line charts as SVG text (plotters' SVG back end: no fonts, no bitmaps), for `kutta plot` and
//! the study reports; PNG through resvg when a file name asks for it.
//!
//! A series is a line with optional markers and an optional band (mean ± standard error over
//! seeds). Points that are not finite, or not positive on a log axis, are left out (a run that
//! never reached a target has an infinite steps-to-target: it has no point, and the legend says
//! so if the caller adds it to the name).

use anyhow::{anyhow, bail, Context, Result};
use kutta_trainer::train::{MetricsLine, METRICS_FILE};
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Default)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// (x, low, high): a shaded band around the line.
    pub band: Vec<(f64, f64, f64)>,
    pub markers: bool,
}

#[derive(Debug, Clone, Default)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub log_x: bool,
    pub log_y: bool,
    /// Tick positions on a log x axis (e.g. the batch sizes or world sizes measured); default
    /// 1-2-5 per decade.
    pub x_ticks: Option<Vec<f64>>,
    /// The y axis starts here (above the data's minimum) when given: lines below are cut off.
    pub y_min: Option<f64>,
    pub series: Vec<Series>,
}

/// matplotlib's tab10, which people read without a legend lookup table.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

pub const WIDTH: u32 = 1000;
pub const HEIGHT: u32 = 520;
/// Where the legend's first entry sits, and the distance between entries (px).
const LEGEND_TOP: i32 = 60;
const LEGEND_ROW: i32 = 20;

impl Chart {
    fn usable(&self, (x, y): (f64, f64)) -> bool {
        x.is_finite() && y.is_finite() && (!self.log_x || x > 0.0) && (!self.log_y || y > 0.0)
    }

    /// The data's extent over lines and bands, padded; None when nothing can be drawn.
    fn extent(&self) -> Option<((f64, f64), (f64, f64))> {
        let mut xs = Vec::new();
        let mut ys = Vec::new();
        for s in &self.series {
            for &p in s.points.iter().filter(|&&p| self.usable(p)) {
                xs.push(p.0);
                ys.push(p.1);
            }
            for &(x, lo, hi) in &s.band {
                for y in [lo, hi] {
                    if self.usable((x, y)) {
                        xs.push(x);
                        ys.push(y);
                    }
                }
            }
        }
        let range = |v: &[f64], log: bool| {
            let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            if log {
                let (lo, hi) = if hi / lo < 1.5 { (lo / 1.3, hi * 1.3) } else { (lo, hi) };
                (lo / 1.15, hi * 1.15)
            } else {
                let pad = if hi > lo { 0.04 * (hi - lo) } else { 0.5 * lo.abs().max(1e-3) };
                (lo - pad, hi + pad)
            }
        };
        if let Some(m) = self.y_min {
            ys.retain(|&y| y >= m);
            ys.push(m);
        }
        (!xs.is_empty()).then(|| (range(&xs, self.log_x), range(&ys, self.log_y)))
    }

    /// HEIGHT, or taller when the legend column needs it (every name is shown, none cut off).
    pub fn height(&self) -> u32 {
        HEIGHT.max(LEGEND_TOP as u32 + LEGEND_ROW as u32 * self.series.len() as u32 + 20)
    }

    /// The chart as a complete SVG document.
    pub fn svg(&self) -> Result<String> {
        let mut out = String::new();
        let height = self.height();
        {
            let root = SVGBackend::with_string(&mut out, (WIDTH, height)).into_drawing_area();
            root.fill(&WHITE).map_err(|e| anyhow!("plot {:?}: {e}", self.title))?;
            match self.extent() {
                None => {
                    root.titled(&self.title, ("sans-serif", 20))
                        .map_err(|e| anyhow!("{e}"))?
                        .draw_text(
                            "no data to plot",
                            &("sans-serif", 16).into_text_style(&root),
                            (WIDTH as i32 / 2 - 60, height as i32 / 2),
                        )
                        .map_err(|e| anyhow!("{e}"))?;
                }
                Some(((x0, x1), (y0, y1))) => {
                    // plotters' own log ticks are sparse (none inside one decade): ours are named.
                    let xt = self.x_ticks.clone().unwrap_or_else(|| log_ticks(x0, x1));
                    let xt: Vec<f64> = xt.into_iter().filter(|t| (x0..=x1).contains(t)).collect();
                    let yt = log_ticks(y0, y1);
                    let yl = (y0..y1).log_scale().with_key_points(yt);
                    let xl = (x0..x1).log_scale().with_key_points(xt);
                    match (self.log_x, self.log_y) {
                        (false, false) => self.draw(&root, x0..x1, y0..y1)?,
                        (true, false) => self.draw(&root, xl, y0..y1)?,
                        (false, true) => self.draw(&root, x0..x1, yl)?,
                        (true, true) => self.draw(&root, xl, yl)?,
                    }
                }
            }
            root.present().map_err(|e| anyhow!("plot {:?}: {e}", self.title))?;
        }
        Ok(out)
    }

    /// The legend, beside the plot (never over the data): a line of the series' colour and its name.
    fn legend(&self, area: &DrawingArea<SVGBackend, Shift>) -> Result<()> {
        let style = ("sans-serif", 13).into_text_style(area);
        for (i, s) in self.series.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            let y = LEGEND_TOP + LEGEND_ROW * i as i32;
            area.draw(&PathElement::new(vec![(4, y), (24, y)], color.stroke_width(3))).map_err(|e| anyhow!("{e}"))?;
            area.draw_text(&s.name, &style, (30, y - 7)).map_err(|e| anyhow!("{e}"))?;
        }
        Ok(())
    }

    /// Width of the legend column: about 7 px per character of the longest name, capped.
    fn legend_width(&self) -> u32 {
        let chars = self.series.iter().map(|s| s.name.chars().count()).max().unwrap_or(0);
        if chars == 0 {
            0
        } else {
            (40 + 6 * chars as u32).min(WIDTH / 2)
        }
    }

    fn draw<X, Y>(&self, root: &DrawingArea<SVGBackend, Shift>, xr: X, yr: Y) -> Result<()>
    where
        X: AsRangedCoord<Value = f64>,
        Y: AsRangedCoord<Value = f64>,
        X::CoordDescType: ValueFormatter<f64>,
        Y::CoordDescType: ValueFormatter<f64>,
    {
        let err = |e: &dyn std::fmt::Display| anyhow!("plot {:?}: {e}", self.title);
        let (plot_area, legend_area) = root.split_horizontally(WIDTH - self.legend_width());
        self.legend(&legend_area)?;
        let mut chart = ChartBuilder::on(&plot_area)
            .caption(&self.title, ("sans-serif", 20))
            .margin(14)
            .x_label_area_size(46)
            .y_label_area_size(70)
            .build_cartesian_2d(xr, yr)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc(&self.x_label)
            .y_desc(&self.y_label)
            .x_label_formatter(&|x| tick(*x))
            .y_label_formatter(&|y| tick(*y))
            .light_line_style(RGBColor(235, 235, 235))
            .label_style(("sans-serif", 13))
            .axis_desc_style(("sans-serif", 15))
            .draw()
            .map_err(|e| err(&e))?;
        for (i, s) in self.series.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            let band: Vec<(f64, f64, f64)> = thin(
                s.band.iter().copied().filter(|&(x, lo, hi)| self.usable((x, lo)) && self.usable((x, hi))).collect(),
            );
            if band.len() >= 2 {
                let mut poly: Vec<(f64, f64)> = band.iter().map(|&(x, lo, _)| (x, lo)).collect();
                poly.extend(band.iter().rev().map(|&(x, _, hi)| (x, hi)));
                chart
                    .draw_series(std::iter::once(Polygon::new(poly, color.mix(0.18).filled())))
                    .map_err(|e| err(&e))?;
            }
            let pts: Vec<(f64, f64)> = thin(s.points.iter().copied().filter(|&p| self.usable(p)).collect());
            chart.draw_series(LineSeries::new(pts.clone(), color.stroke_width(2))).map_err(|e| err(&e))?;
            if s.markers || pts.len() == 1 {
                chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled()))).map_err(|e| err(&e))?;
            }
        }
        Ok(())
    }
}

/// At most about `MAX_POINTS` points of a line (every k-th and the last): a chart 860 px wide
/// shows no more, and a report with six charts of 6 cells × 1 000 points stays small.
fn thin<T: Copy>(v: Vec<T>) -> Vec<T> {
    const MAX_POINTS: usize = 500;
    if v.len() <= MAX_POINTS {
        return v;
    }
    let k = v.len().div_ceil(MAX_POINTS);
    let mut out: Vec<T> = v.iter().copied().step_by(k).collect();
    if !(v.len() - 1).is_multiple_of(k) {
        out.push(v[v.len() - 1]);
    }
    out
}

/// Ticks of a log axis over [lo, hi]: 1, 2, 5 × 10^k, or every integer multiple of 10^k when
/// that gives fewer than three, or the ends when even that does.
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let within = |mults: &[f64]| -> Vec<f64> {
        let (k0, k1) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
        (k0..=k1).flat_map(|k| mults.iter().map(move |m| m * 10f64.powi(k))).filter(|t| (lo..=hi).contains(t)).collect()
    };
    let t = within(&[1.0, 2.0, 5.0]);
    if t.len() >= 3 {
        return t;
    }
    let t = within(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]);
    if t.len() >= 2 {
        return t;
    }
    let mid = (lo * hi).sqrt();
    vec![lo, mid, hi].into_iter().map(|v| round_sig(v, 2)).collect()
}

fn round_sig(v: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits - 1 - v.abs().log10().floor() as i32);
    (v * scale).round() / scale
}

/// Tick labels: integers as integers, otherwise three significant digits.
fn tick(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let a = v.abs();
    if (1e-3..1e6).contains(&a) {
        if (v - v.round()).abs() < 1e-9 * a.max(1.0) {
            format!("{}", v.round() as i64)
        } else {
            let digits = (2 - a.log10().floor() as i32).max(0) as usize;
            let t = format!("{v:.digits$}");
            if t.contains('.') {
                t.trim_end_matches('0').trim_end_matches('.').to_string()
            } else {
                t
            }
        }
    } else {
        format!("{v:.1e}")
    }
}

/// Write a chart: SVG, or PNG when the name ends in .png (rendered with resvg and the system's
/// fonts; without any installed, the text is missing and a warning says so).
pub fn write(chart: &Chart, path: &Path) -> Result<()> {
    let svg = chart.svg()?;
    let is_png = path.extension().and_then(|e| e.to_str()).is_some_and(|e| e.eq_ignore_ascii_case("png"));
    if is_png {
        std::fs::write(path, svg_to_png(&svg)?).with_context(|| format!("writing {}", path.display()))
    } else {
        std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))
    }
}

/// Rasterise an SVG at twice its size (crisp on high-density screens).
pub fn svg_to_png(svg: &str) -> Result<Vec<u8>> {
    let mut opt = resvg::usvg::Options::default();
    opt.fontdb_mut().load_system_fonts();
    if opt.fontdb.is_empty() {
        tracing::warn!("no system fonts found: the PNG has no text (install fonts-dejavu-core, or write .svg)");
    }
    let tree = resvg::usvg::Tree::from_str(svg, &opt).map_err(|e| anyhow!("rendering the chart: {e}"))?;
    let size = tree.size().to_int_size().scale_by(2.0).ok_or_else(|| anyhow!("chart size"))?;
    let mut pixmap = resvg::tiny_skia::Pixmap::new(size.width(), size.height()).ok_or_else(|| anyhow!("chart size"))?;
    resvg::render(&tree, resvg::tiny_skia::Transform::from_scale(2.0, 2.0), &mut pixmap.as_mut());
    pixmap.encode_png().map_err(|e| anyhow!("encoding the PNG: {e}"))
}

/// What `kutta plot` puts on an axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XAxis {
    Step,
    /// Wall-clock seconds since the start (evaluation included).
    Wall,
    /// Training seconds (evaluation excluded; AlgoPerf's clock).
    Train,
    /// Gradient evaluations (also spelt as the metrics.jsonl field, `grad_evals`).
    #[value(alias = "grad_evals")]
    GradEvals,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum YAxis {
    /// Also spelt as the metrics.jsonl field (`test_accuracy`), as are the others.
    #[value(alias = "test_accuracy")]
    TestAccuracy,
    #[value(alias = "test_loss")]
    TestLoss,
    #[value(alias = "train_loss")]
    TrainLoss,
    H,
}

impl XAxis {
    pub fn of(self, l: &MetricsLine) -> f64 {
        match self {
            XAxis::Step => l.step as f64,
            XAxis::Wall => l.wall_s,
            XAxis::Train => l.train_s,
            XAxis::GradEvals => l.grad_evals as f64,
        }
    }

    /// For titles.
    pub fn short(self) -> &'static str {
        match self {
            XAxis::Step => "steps",
            XAxis::Wall => "wall-clock time",
            XAxis::Train => "training time",
            XAxis::GradEvals => "gradient evaluations",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            XAxis::Step => "optimizer steps",
            XAxis::Wall => "wall-clock time (s)",
            XAxis::Train => "training time (s, evaluation excluded)",
            XAxis::GradEvals => "gradient evaluations",
        }
    }
}

impl YAxis {
    pub fn of(self, l: &MetricsLine) -> Option<f64> {
        match self {
            YAxis::TestAccuracy => l.test_accuracy,
            YAxis::TestLoss => l.test_loss,
            YAxis::TrainLoss => Some(l.train_loss),
            YAxis::H => Some(l.h),
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            YAxis::TestAccuracy => "test accuracy",
            YAxis::TestLoss => "test loss",
            YAxis::TrainLoss => "training loss (mini-batch)",
            YAxis::H => "step size h",
        }
    }

    /// Losses and step sizes span decades.
    pub fn log(self) -> bool {
        matches!(self, YAxis::TrainLoss | YAxis::TestLoss | YAxis::H)
    }

    /// The mini-batch loss is noisy: its curves are running means.
    pub fn smoothed(self) -> bool {
        self == YAxis::TrainLoss
    }
}

/// A run folder's metrics.jsonl.
pub fn read_metrics(dir: &Path) -> Result<Vec<MetricsLine>> {
    let path = dir.join(METRICS_FILE);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: not a kutta run folder (no {METRICS_FILE})", dir.display()))?;
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        match serde_json::from_str(l) {
            Ok(m) => out.push(m),
            // A run killed mid-write leaves a partial last line (resume cuts it away).
            Err(_) if i + 1 == lines.len() && !text.ends_with('\n') => {}
            Err(_) if l.trim().is_empty() => {}
            Err(e) => bail!("{} line {}: {e}", path.display(), i + 1),
        }
    }
    Ok(out)
}

/// Running mean over a centred window of about 1/50 of the points (at least 1).
pub fn smooth(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let w = (points.len() / 50).max(1);
    let half = w / 2;
    (0..points.len())
        .map(|i| {
            let lo = i.saturating_sub(half);
            let hi = (i + half + 1).min(points.len());
            let ys = &points[lo..hi];
            (points[i].0, ys.iter().map(|p| p.1).sum::<f64>() / ys.len() as f64)
        })
        .collect()
}

/// `kutta plot RUN_DIR… --x … --y … --out F`: one line per run.
pub fn plot_runs(dirs: &[PathBuf], x: XAxis, y: YAxis, out: &Path) -> Result<()> {
    if dirs.is_empty() {
        bail!("name at least one run folder");
    }
    let mut series = Vec::new();
    for d in dirs {
        let lines = read_metrics(d)?;
        let mut pts: Vec<(f64, f64)> = lines.iter().filter_map(|l| y.of(l).map(|v| (x.of(l), v))).collect();
        if y.smoothed() {
            pts = smooth(&pts);
        }
        let name = d.file_name().map_or_else(|| d.display().to_string(), |n| n.to_string_lossy().into_owned());
        if pts.is_empty() {
            tracing::warn!("{}: no {} in its metrics", d.display(), y.label());
        }
        series.push(Series { name, points: pts, ..Default::default() });
    }
    let chart = Chart {
        title: format!("{} against {}", y.label(), x.short()),
        x_label: x.label().into(),
        y_label: if y.smoothed() { format!("{} (running mean)", y.label()) } else { y.label().into() },
        log_x: false,
        log_y: y.log(),
        x_ticks: None,
        y_min: None,
        series,
    };
    write(&chart, out)?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svg_is_well_formed_with_bands_logs_and_gaps() {
        for (log_x, log_y) in [(false, false), (true, true), (true, false)] {
            let chart = Chart {
                title: "t <&> \"q\"".into(),
                x_label: "x".into(),
                y_label: "y".into(),
                log_x,
                log_y,
                x_ticks: None,
                y_min: None,
                series: vec![
                    Series {
                        name: "a & b".into(),
                        points: vec![(1.0, 2.0), (2.0, f64::INFINITY), (4.0, 3.0), (0.0, 1.0)],
                        band: vec![(1.0, 1.5, 2.5), (4.0, 2.5, 3.5)],
                        markers: true,
                    },
                    Series { name: "empty".into(), ..Default::default() },
                ],
            };
            let svg = chart.svg().unwrap();
            assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "{svg}");
            assert!(svg.contains("a &amp; b"));
        }
        let empty = Chart { title: "nothing".into(), ..Default::default() }.svg().unwrap();
        assert!(empty.contains("no data to plot"));
    }

    /// A long legend makes the chart taller, so the last name is inside the picture.
    #[test]
    fn every_legend_entry_is_inside_the_chart() {
        let series = |n: usize| -> Vec<Series> {
            (0..n)
                .map(|i| Series {
                    name: format!("line {i}"),
                    points: vec![(0.0, i as f64), (1.0, 1.0)],
                    ..Default::default()
                })
                .collect()
        };
        assert_eq!(Chart { series: series(3), ..Default::default() }.height(), HEIGHT);
        let chart = Chart { series: series(45), ..Default::default() };
        let svg = chart.svg().unwrap();
        let doc = roxmltree::Document::parse(&svg).unwrap();
        let height: f64 = doc.root_element().attribute("height").unwrap().parse().unwrap();
        assert_eq!(height, chart.height() as f64);
        let last =
            doc.descendants().find(|n| n.text().map(str::trim) == Some("line 44")).expect("the last legend entry");
        let y: f64 = last.attribute("y").unwrap().parse().unwrap();
        assert!(y < height - 10.0, "legend entry at y = {y} in a chart {height} high");
    }

    #[test]
    fn log_ticks_name_values_inside_a_decade() {
        assert_eq!(log_ticks(0.3, 30.0), vec![0.5, 1.0, 2.0, 5.0, 10.0, 20.0]);
        assert_eq!(log_ticks(17.0, 35.0), vec![20.0, 30.0]);
        assert_eq!(log_ticks(21.0, 29.0), vec![21.0, 25.0, 29.0]);
    }

    #[test]
    fn thinning_keeps_the_ends() {
        let v: Vec<usize> = (0..1001).collect();
        let t = thin(v);
        assert!(t.len() <= 501 && t[0] == 0 && *t.last().unwrap() == 1000);
        assert_eq!(thin(vec![1, 2, 3]), vec![1, 2, 3]);
    }

    #[test]
    fn ticks_read_well() {
        assert_eq!(tick(16.0), "16");
        assert_eq!(tick(0.85), "0.85");
        assert_eq!(tick(0.002), "0.002");
        assert_eq!(tick(12.5), "12.5");
        assert_eq!(tick(2.5e-5), "2.5e-5");
    }

    #[test]
    fn smoothing_keeps_a_constant_and_the_length() {
        let pts: Vec<(f64, f64)> = (0..500).map(|i| (i as f64, 2.0)).collect();
        let s = smooth(&pts);
        assert_eq!(s.len(), 500);
        assert!(s.iter().all(|p| (p.1 - 2.0).abs() < 1e-12));
    }
}
