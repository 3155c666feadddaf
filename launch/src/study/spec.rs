//! The study file (`studies/NAME.toml`) and its expansion into runs.
//!
//! ```toml
//! description = "Table 1, Fashion-MNIST MLP"
//! base = "../configs/fashion_mnist_mlp.toml"   # relative to the study file
//! seeds = [0, 1, 2, 3, 4]                      # train.seed of each repetition
//! world_sizes = [1, 2]                         # optional: ranks, through `kutta launch`
//! set = { "train.eval_every" = 10 }            # overrides for every run
//! memory = "8GiB"                              # optional: `kutta train --memory` of every run
//!
//! [[axis]]                                     # an axis over one config key
//! key = "train.batch_size"
//! values = [16, 128]
//!
//! [[axis]]                                     # an axis of named settings of several keys
//! name = "optimizer"
//! values = [
//!   { label = "rk4 h=0.003", "optimizer.kind" = "rk", "optimizer.lr" = 0.003 },
//!   { label = "adam 0.001", group = "adam", "optimizer.kind" = "adam", "optimizer.lr" = 0.001 },
//! ]
//!
//! [[target]]
//! metric = "test_accuracy"                     # or test_loss / train_loss (lower is better)
//! value = 0.85
//!
//! [[paper]]                                    # the paper's numbers, shown beside matching cells
//! where = { optimizer = "rk4 h=0.003" }        # axis name → value label
//! best_test_accuracy = 0.8602
//! source = "Table 1"
//! ```
//!
//! A *cell* is one combination of axis values; a *run* is a cell with a seed (and a world size).
//! A value's `group` names the tuning group it belongs to: plots against the batch size or the
//! world size take, per group, the best member (Shallue et al.'s steps-to-target is the minimum
//! over the learning-rate grid at each batch size), and the learning curves show only the member
//! with the highest best test accuracy. Without `group` a value is its own group.

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct StudyFile {
    name: Option<String>,
    #[serde(default)]
    description: String,
    base: PathBuf,
    #[serde(default = "default_seeds")]
    seeds: Vec<u64>,
    #[serde(default)]
    world_sizes: Vec<usize>,
    memory: Option<String>,
    #[serde(default)]
    set: toml::Table,
    #[serde(default, rename = "axis")]
    axes: Vec<AxisFile>,
    #[serde(default, rename = "target")]
    targets: Vec<Target>,
    #[serde(default)]
    paper: Vec<PaperFile>,
}

fn default_seeds() -> Vec<u64> {
    vec![0]
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct AxisFile {
    name: Option<String>,
    key: Option<String>,
    values: Vec<toml::Value>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct PaperFile {
    #[serde(rename = "where", default)]
    matches: BTreeMap<String, String>,
    best_test_accuracy: Option<f64>,
    final_test_accuracy: Option<f64>,
    #[serde(default)]
    source: String,
}

/// A goal a run reaches at the first evaluation (or logged step, for `train_loss`) that attains it.
#[derive(Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Target {
    pub metric: String,
    pub value: f64,
}

impl Target {
    /// Accuracy must rise to the value; losses must fall to it.
    pub fn higher_is_better(&self) -> bool {
        self.metric == "test_accuracy"
    }

    pub fn reached(&self, x: f64) -> bool {
        if self.higher_is_better() {
            x >= self.value
        } else {
            x <= self.value
        }
    }

    /// For table headers: "85 %" or "train_loss ≤ 0.3".
    pub fn short(&self) -> String {
        if self.metric == "test_accuracy" {
            format!("{} %", trim_float(100.0 * self.value))
        } else {
            format!("{} ≤ {}", self.metric, self.value)
        }
    }

    pub fn describe(&self) -> String {
        if self.metric == "test_accuracy" {
            format!("test accuracy ≥ {:.2} %", 100.0 * self.value)
        } else {
            format!("{} ≤ {}", self.metric, self.value)
        }
    }
}

/// One value of an axis: what it sets and how it is shown.
#[derive(Debug, Clone, PartialEq)]
pub struct AxisValue {
    pub label: String,
    pub group: Option<String>,
    /// `key=value` overrides, values in TOML syntax (as `--set` takes them).
    pub sets: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Axis {
    pub name: String,
    pub values: Vec<AxisValue>,
}

/// The paper's numbers for the cells whose axis labels match `matches`.
#[derive(Debug, Clone, PartialEq)]
pub struct PaperRow {
    pub matches: BTreeMap<String, String>,
    pub best_test_accuracy: Option<f64>,
    pub final_test_accuracy: Option<f64>,
    pub source: String,
}

#[derive(Debug, Clone)]
pub struct Study {
    pub name: String,
    pub description: String,
    /// The base config (resolved against the study file's folder), and as the file wrote it.
    pub base: PathBuf,
    pub base_as_written: String,
    pub seeds: Vec<u64>,
    /// Empty: every run is one process (`kutta train`); else each cell runs at each world size.
    pub world_sizes: Vec<usize>,
    /// `kutta train --memory` of every run: the planner lays each run out under this budget
    /// per rank (micro-batches, stage buffers, recomputation).
    pub memory: Option<String>,
    pub sets: Vec<String>,
    pub axes: Vec<Axis>,
    pub targets: Vec<Target>,
    pub paper: Vec<PaperRow>,
}

/// One combination of axis values: the index of its value on each axis.
pub type Cell = Vec<usize>;

#[derive(Debug, Clone, PartialEq)]
pub struct RunSpec {
    pub cell: Cell,
    pub seed: u64,
    pub world_size: Option<usize>,
    /// The run folder's name inside the study's `runs/`.
    pub name: String,
    /// Every override, in order: the study's `set`, the axis values', then `train.seed`.
    pub sets: Vec<String>,
}

impl Study {
    pub fn load(path: &Path) -> Result<Study> {
        let text = std::fs::read_to_string(path).with_context(|| format!("study file {}", path.display()))?;
        Self::parse(&text, path).with_context(|| format!("study file {}", path.display()))
    }

    pub fn parse(text: &str, path: &Path) -> Result<Study> {
        let f: StudyFile = toml::from_str(text)?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let base = dir.join(&f.base);
        if !base.is_file() {
            bail!("base: config {} not found (relative to the study file's folder)", base.display());
        }
        let name =
            f.name.clone().unwrap_or_else(|| path.file_stem().and_then(|s| s.to_str()).unwrap_or("study").to_string());
        if let Some(m) = &f.memory {
            kutta_trainer::planner::parse_bytes(m).with_context(|| format!("memory = {m:?}"))?;
        }
        if f.seeds.is_empty() {
            bail!("seeds: give at least one seed");
        }
        if has_duplicates(&f.seeds) {
            bail!("seeds: {:?} repeats a seed", f.seeds);
        }
        if f.world_sizes.contains(&0) || has_duplicates(&f.world_sizes) {
            bail!("world_sizes: {:?} must be distinct numbers ≥ 1", f.world_sizes);
        }
        let mut sets = Vec::new();
        flatten("", &f.set, &mut sets);
        if sets.iter().any(|s| s.starts_with("train.seed=")) {
            bail!("set: train.seed is the study's `seeds`, not a fixed override");
        }
        let mut axes = Vec::new();
        for (i, a) in f.axes.iter().enumerate() {
            let axis = parse_axis(a).with_context(|| format!("axis {} ({})", i + 1, axis_title(a)))?;
            if axes.iter().any(|b: &Axis| b.name == axis.name) {
                bail!("axis {}: a second axis named {:?}", i + 1, axis.name);
            }
            axes.push(axis);
        }
        for t in &f.targets {
            if !["test_accuracy", "test_loss", "train_loss"].contains(&t.metric.as_str()) {
                bail!("target.metric: {:?} is not one of test_accuracy, test_loss, train_loss", t.metric);
            }
        }
        let mut paper = Vec::new();
        for p in f.paper {
            for (axis, label) in &p.matches {
                let Some(a) = axes.iter().find(|a| &a.name == axis) else {
                    bail!("paper.where: no axis named {axis:?}");
                };
                if !a.values.iter().any(|v| &v.label == label) {
                    bail!("paper.where: axis {axis:?} has no value labelled {label:?}");
                }
            }
            paper.push(PaperRow {
                matches: p.matches,
                best_test_accuracy: p.best_test_accuracy,
                final_test_accuracy: p.final_test_accuracy,
                source: p.source,
            });
        }
        Ok(Study {
            name,
            description: f.description,
            base,
            base_as_written: f.base.display().to_string(),
            seeds: f.seeds,
            world_sizes: f.world_sizes,
            memory: f.memory,
            sets,
            axes,
            targets: f.targets,
            paper,
        })
    }

    /// Every combination of axis values, the first axis varying slowest.
    pub fn cells(&self) -> Vec<Cell> {
        let mut cells: Vec<Cell> = vec![vec![]];
        for a in &self.axes {
            cells = cells
                .into_iter()
                .flat_map(|c| (0..a.values.len()).map(move |i| [c.clone(), vec![i]].concat()))
                .collect();
        }
        cells
    }

    /// The cell's axis labels, e.g. "unit · rk4 h=0.003" (the study's name when it has no axes).
    pub fn cell_label(&self, cell: &Cell) -> String {
        if self.axes.is_empty() {
            return self.name.clone();
        }
        self.axes.iter().zip(cell).map(|(a, &i)| a.values[i].label.clone()).collect::<Vec<_>>().join(" · ")
    }

    /// A cell's name as a folder name: its labels, sanitized, joined by `_`.
    pub fn cell_slug(&self, cell: &Cell) -> String {
        if self.axes.is_empty() {
            return "run".into();
        }
        self.axes.iter().zip(cell).map(|(a, &i)| slug(&a.values[i].label)).collect::<Vec<_>>().join("_")
    }

    /// Every run: each seed × cell × world size, seed-major, so that a study stopped halfway
    /// has every cell at its first seeds rather than some cells complete and others missing.
    pub fn runs(&self) -> Result<Vec<RunSpec>> {
        let worlds: Vec<Option<usize>> =
            if self.world_sizes.is_empty() { vec![None] } else { self.world_sizes.iter().map(|&w| Some(w)).collect() };
        let mut runs = Vec::new();
        let mut names = BTreeSet::new();
        for &seed in &self.seeds {
            for cell in self.cells() {
                for &w in &worlds {
                    let mut name = format!("{}_seed{seed}", self.cell_slug(&cell));
                    if let Some(w) = w {
                        name.push_str(&format!("_np{w}"));
                    }
                    if !names.insert(name.clone()) {
                        bail!("two runs would share the folder {name:?}: give the axis values distinct labels");
                    }
                    let mut sets = self.sets.clone();
                    for (a, &i) in self.axes.iter().zip(&cell) {
                        sets.extend(a.values[i].sets.iter().cloned());
                    }
                    sets.push(format!("train.seed={seed}"));
                    runs.push(RunSpec { cell: cell.clone(), seed, world_size: w, name, sets });
                }
            }
        }
        Ok(runs)
    }

    /// The paper's row for a cell, if one matches all of its `where` labels.
    pub fn paper_for(&self, cell: &Cell) -> Option<&PaperRow> {
        self.paper.iter().find(|p| {
            p.matches.iter().all(|(axis, label)| {
                self.axes.iter().zip(cell).any(|(a, &i)| &a.name == axis && &a.values[i].label == label)
            })
        })
    }
}

fn axis_title(a: &AxisFile) -> String {
    a.name.clone().or_else(|| a.key.clone()).unwrap_or_else(|| "unnamed".into())
}

fn parse_axis(a: &AxisFile) -> Result<Axis> {
    if a.values.is_empty() {
        bail!("values: empty");
    }
    let mut values = Vec::new();
    let name = match (&a.key, &a.name) {
        (Some(key), name) => {
            for v in &a.values {
                if v.is_table() {
                    bail!("values: an axis over the key {key} takes plain values; use `name` for tables of settings");
                }
                values.push(AxisValue { label: show(v), group: None, sets: vec![format!("{key}={v}")] });
            }
            name.clone().unwrap_or_else(|| key.clone())
        }
        (None, Some(name)) => {
            for (j, v) in a.values.iter().enumerate() {
                let Some(t) = v.as_table() else {
                    bail!(
                        "values[{j}]: an axis without `key` takes tables {{ label = \"…\", \"some.key\" = value, … }}"
                    );
                };
                let mut t = t.clone();
                let label = match t.remove("label") {
                    Some(toml::Value::String(s)) => s,
                    Some(_) => bail!("values[{j}].label: must be a string"),
                    None => bail!("values[{j}]: needs a label"),
                };
                let group = match t.remove("group") {
                    Some(toml::Value::String(s)) => Some(s),
                    Some(_) => bail!("values[{j}].group: must be a string"),
                    None => None,
                };
                let mut sets = Vec::new();
                flatten("", &t, &mut sets);
                values.push(AxisValue { label, group, sets });
            }
            name.clone()
        }
        (None, None) => bail!("needs `key` (one config key) or `name` (tables of settings)"),
    };
    let mut labels = BTreeSet::new();
    for v in &values {
        if !labels.insert(slug(&v.label)) {
            bail!("values: two values share the label {:?} (as a folder name)", v.label);
        }
        if v.sets.iter().any(|s| s.starts_with("train.seed=")) {
            bail!("values: train.seed is the study's `seeds`, not an axis");
        }
    }
    Ok(Axis { name, values })
}

/// `{ "a.b" = 1, c = { d = 2 } }` → `a.b=1`, `c.d=2` (TOML values, as `--set` takes them).
fn flatten(prefix: &str, t: &toml::Table, out: &mut Vec<String>) {
    for (k, v) in t {
        let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        match v {
            toml::Value::Table(inner) => flatten(&key, inner, out),
            v => out.push(format!("{key}={v}")),
        }
    }
}

fn trim_float(x: f64) -> String {
    let t = format!("{x:.4}");
    t.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// A value as a label: strings without quotes.
fn show(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

/// Letters, digits, `.`, `-` and `=` kept; any run of other characters becomes one `-`.
pub fn slug(s: &str) -> String {
    let mut t = String::new();
    for c in s.chars() {
        if c.is_ascii_alphanumeric() || ".=".contains(c) {
            t.push(c);
        } else if !t.ends_with('-') {
            t.push('-');
        }
    }
    t.trim_matches('-').to_string()
}

fn has_duplicates<T: Ord>(xs: &[T]) -> bool {
    xs.iter().collect::<BTreeSet<_>>().len() != xs.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn study(text: &str) -> Result<Study> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("base.toml"), "[train]\nsteps = 10\n").unwrap();
        let path = dir.path().join("s.toml");
        Study::parse(&format!("base = \"base.toml\"\n{text}"), &path)
    }

    #[test]
    fn expands_axes_seeds_and_world_sizes() {
        let s = study(
            r#"
seeds = [1, 2]
world_sizes = [1, 2]
set = { "train.eval_every" = 5, optimizer = { momentum = 0.9 } }
[[axis]]
key = "train.batch_size"
values = [16, 128]
[[axis]]
name = "opt"
values = [{ label = "rk4 h=0.003", "optimizer.kind" = "rk", "optimizer.lr" = 0.003 },
          { label = "adam", group = "a", "optimizer.kind" = "adam" }]
"#,
        )
        .unwrap();
        let runs = s.runs().unwrap();
        assert_eq!(runs.len(), 2 * 2 * 2 * 2);
        assert_eq!(runs[0].name, "16_rk4-h=0.003_seed1_np1");
        assert_eq!(runs[1].name, "16_rk4-h=0.003_seed1_np2");
        assert_eq!(runs[2].name, "16_adam_seed1_np1");
        assert_eq!(
            runs[0].sets,
            vec![
                "optimizer.momentum=0.9",
                "train.eval_every=5",
                "train.batch_size=16",
                "optimizer.kind=\"rk\"",
                "optimizer.lr=0.003",
                "train.seed=1"
            ]
        );
        assert_eq!(runs.last().unwrap().name, "128_adam_seed2_np2");
        assert_eq!(s.cell_label(&vec![1, 1]), "128 · adam");
        assert_eq!(s.axes[1].values[1].group.as_deref(), Some("a"));
        assert_eq!(slug("rk4 + dalr p=0.8, c=1"), "rk4-dalr-p=0.8-c=1");
    }

    #[test]
    fn mistakes_name_the_key() {
        let e = |t: &str| format!("{:#}", study(t).unwrap_err());
        assert!(e("[[axis]]\nkey = \"a.b\"\nvalues = []").contains("values: empty"));
        assert!(e("[[axis]]\nname = \"x\"\nvalues = [1]").contains("values[0]"));
        assert!(e("[[axis]]\nname = \"x\"\nvalues = [{ \"a.b\" = 1 }]").contains("needs a label"));
        assert!(e("seeds = [1, 1]").contains("seeds"));
        assert!(e("bogus = 1").contains("bogus"));
        assert!(e("[[target]]\nmetric = \"acc\"\nvalue = 1").contains("target.metric"));
        assert!(e("[[paper]]\nwhere = { opt = \"x\" }").contains("no axis named"));
        assert!(e("set = { \"train.seed\" = 3 }").contains("train.seed"));
        let dir = tempfile::tempdir().unwrap();
        let err = Study::parse("base = \"missing.toml\"", &dir.path().join("s.toml")).unwrap_err();
        assert!(format!("{err:#}").contains("missing.toml"));
    }
}
