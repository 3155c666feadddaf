//! The run configuration: TOML → typed serde structs with defaults, `deny_unknown_fields`, and a
//! `validate()` that names the offending key. `--set key=value` overrides are applied to the TOML
//! tree before deserializing, so an override is checked exactly like a value in the file.
//!
//! Keys that scripts, docs and configs rely on (do not rename): `model.kind`, `model.init`,
//! `data.dir`, `data.train_subset`, `data.shuffle`, `train.steps`, `train.batch_size`,
//! `train.seed`, `train.eval_every`, `train.checkpoint_every`, `optimizer.kind`,
//! `optimizer.tableau`, `optimizer.lr`, `optimizer.momentum`, `optimizer.preconditioner`.

use crate::data::augment::Augment;
use crate::data::Normalize;
use crate::error::{Error, Result};
use crate::optim::step_size::{DalrEstimator, ErrorControl};
use crate::tableau::{CustomTableau, Tableau};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub model: ModelConfig,
    pub data: DataConfig,
    pub train: TrainConfig,
    pub optimizer: OptimizerConfig,
}

pub use crate::data::{DataConfig, DataFormat};
pub use crate::model::registry::ModelConfig;

/// `train.device`: where each rank's model runs (`device::select`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceKind {
    Cpu,
    Cuda,
    #[default]
    Auto,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub steps: u64,
    pub batch_size: usize,
    pub seed: u64,
    /// Evaluate on the test set every N steps (and after the last step); 0 = only at the end.
    pub eval_every: u64,
    /// Write a checkpoint every N steps (and after the last step); 0 = only at the end.
    pub checkpoint_every: u64,
    /// Keep the last K checkpoints (`checkpoint-<step>.safetensors`), removing older ones; at
    /// least 1. More than one lets a run continue from an earlier checkpoint when the newest is
    /// damaged.
    pub keep_checkpoints: usize,
    /// Append a line to metrics.jsonl every N steps.
    pub log_every: u64,
    /// Samples per forward pass during evaluation.
    pub eval_chunk: usize,
    /// At most this many samples per forward/backward pass; the per-rank batch is processed in
    /// micro-batches whose gradient sums are accumulated (SPEC §6). 0: the whole per-rank batch.
    pub micro_batch: usize,
    /// Activation recomputation: keep only each layer's (or conv block's) output through the
    /// backward pass and recompute the rest; bit-identical gradients, one more forward pass.
    pub recompute: bool,
    /// Shard the optimizer over the ranks (ZeRO-style): each rank keeps 1/N of the stage
    /// buffers and optimizer state, reduce-scatters each stage gradient, updates its block and
    /// all-gathers the next stage point. No effect on one rank.
    pub shard_optimizer: bool,
    /// Label smoothing ε of the training loss: the target is (1 − ε)·onehot + ε/K.
    pub label_smoothing: f64,
    /// Where the model runs: "cpu", "cuda" (needs a build with `--features cuda` and a GPU), or
    /// "auto" (the GPU when there is one, else the CPU).
    pub device: DeviceKind,
    /// The GPU ordinal for this process (`kutta train --gpu N`); default: the launcher's local
    /// rank modulo the number of GPUs.
    pub gpu: Option<usize>,
    /// With the model on a GPU, run the RK solver there too (default): θ, the stage gradients
    /// and the optimizer state stay on the device, the fused kernels do the stage arithmetic and
    /// NCCL all-reduces the gradients. false keeps the solver on the host (θ and each gradient
    /// cross PCIe at every evaluation), for comparison.
    pub gpu_solver: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 10_000,
            batch_size: 16,
            seed: 0,
            eval_every: 500,
            checkpoint_every: 1000,
            keep_checkpoints: 2,
            log_every: 10,
            eval_chunk: 1000,
            micro_batch: 0,
            recompute: false,
            shard_optimizer: false,
            label_smoothing: 0.0,
            device: Default::default(),
            gpu: None,
            gpu_solver: true,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OptimizerKind {
    Rk,
    Sgd,
    Momentum,
    Adam,
    Adamw,
    Nadamw,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PreconditionerKind {
    None,
    Adagrad,
    ModifiedAdagrad,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepSizeKind {
    Constant,
    Cosine,
    Dalr,
    ErrorControlled,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimizerConfig {
    pub kind: OptimizerKind,
    /// A built-in tableau name (`kutta tableaux` lists them) or `custom` (then `custom_tableau`).
    pub tableau: String,
    pub custom_tableau: Option<CustomTableau>,
    /// The step size h: constant value, cosine peak, DALR's cap c, or error control's first h.
    pub lr: f64,
    /// β: momentum on the RK gradient for `rk`, the heavy-ball/Nesterov coefficient for `momentum`.
    pub momentum: f64,
    /// Nesterov's variant for `kind = "momentum"`.
    pub nesterov: bool,
    pub preconditioner: PreconditionerKind,
    /// ε of plain `adagrad` (modified-adagrad uses 1, as the paper).
    pub adagrad_eps: f64,
    pub step_size: StepSizeKind,
    /// Cosine: linear warm-up steps, and the final fraction of lr.
    pub warmup_steps: u64,
    pub min_lr_fraction: f64,
    pub dalr: DalrConfig,
    pub error_control: ErrorControl,
    /// Stream stage gradients (accumulate and free them early) instead of keeping all s.
    pub streaming: bool,
    /// Retries with h halved when a value becomes NaN/Inf before the run stops.
    pub nonfinite_retries: u32,
    /// Adam family.
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// λ of an L2 penalty in the loss: L + ½·λ·Σ θ_i² over the weights of rank ≥ 2 (conv kernels,
    /// linear weights; not biases or batch-norm scales) — init2winit's `l2_decay_factor` with
    /// `l2_decay_rank_threshold = 2`. Part of the vector field, so RK optimizers see it in every
    /// stage; for every optimizer.
    pub l2: f64,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self {
            kind: OptimizerKind::Rk,
            tableau: "rk4".into(),
            custom_tableau: None,
            lr: 0.003,
            momentum: 0.0,
            nesterov: false,
            preconditioner: PreconditionerKind::None,
            adagrad_eps: 1e-8,
            step_size: StepSizeKind::Constant,
            warmup_steps: 0,
            min_lr_fraction: 0.0,
            dalr: DalrConfig::default(),
            error_control: ErrorControl::default(),
            streaming: true,
            nonfinite_retries: 4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            l2: 0.0,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DalrConfig {
    /// The exponent p of DAL-p (the paper: 0.8). The cap c is `optimizer.lr`.
    pub p: f64,
    pub estimator: DalrEstimator,
    /// ε of the finite-difference probe (a distance in parameter space).
    pub fd_eps: f64,
}

impl Default for DalrConfig {
    fn default() -> Self {
        Self { p: 0.8, estimator: DalrEstimator::Stage, fd_eps: 1e-2 }
    }
}

impl Config {
    /// Parse a TOML file, apply `key=value` overrides, and validate.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_toml_str(&text, overrides).map_err(|e| e.context(path.display().to_string()))
    }

    pub fn from_toml_str(text: &str, overrides: &[String]) -> Result<Config> {
        let mut tree: toml::Table =
            text.parse().map_err(|e: toml::de::Error| Error::ConfigFile(format!("invalid TOML: {e}")))?;
        for o in overrides {
            apply_override(&mut tree, o)?;
        }
        // serde_path_to_error keeps the dotted path of the offending key for the message.
        let mut cfg: Config = serde_path_to_error::deserialize(toml::Value::Table(tree)).map_err(|e| {
            let path = e.path().to_string();
            let msg = e.inner().message().trim().to_string();
            if path.is_empty() || path == "." {
                Error::ConfigFile(format!("invalid config: {msg}"))
            } else {
                Error::config(path, msg)
            }
        })?;
        crate::model::registry::fill_defaults(&mut cfg.model)?;
        cfg.data.normalize.get_or_insert(cfg.data.default_normalize());
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serializes")
    }

    /// The tableau this config names (built-in or custom), validated.
    pub fn tableau(&self) -> Result<Tableau> {
        let o = &self.optimizer;
        if o.tableau == "custom" {
            let spec = o.custom_tableau.as_ref().ok_or_else(|| {
                Error::config(
                    "optimizer.custom_tableau",
                    "optimizer.tableau = \"custom\" needs an [optimizer.custom_tableau] table with a and b",
                )
            })?;
            Tableau::custom(spec)
        } else {
            if o.custom_tableau.is_some() {
                return Err(Error::config(
                    "optimizer.custom_tableau",
                    format!(
                        "given, but optimizer.tableau = {:?}; set optimizer.tableau = \"custom\" to use it",
                        o.tableau
                    ),
                ));
            }
            Tableau::builtin(&o.tableau).map_err(|e| Error::config("optimizer.tableau", e.to_string()))
        }
    }

    pub fn validate(&self) -> Result<()> {
        let positive = |key: &str, v: f64| -> Result<()> {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(Error::config(key, format!("must be a positive number, got {v}")))
            }
        };
        let unit = |key: &str, v: f64| -> Result<()> {
            if (0.0..1.0).contains(&v) {
                Ok(())
            } else {
                Err(Error::config(key, format!("must be in [0, 1), got {v}")))
            }
        };
        crate::model::registry::validate(&self.model)?;
        if let Some(p) = &self.model.init {
            if !p.is_file() {
                return Err(Error::config("model.init", format!("{} does not exist", p.display())));
            }
        }
        if self.data.coarse_labels && self.data.format != DataFormat::Cifar100 {
            return Err(Error::config(
                "data.coarse_labels",
                "only CIFAR-100 has coarse labels (data.format = \"cifar100\")",
            ));
        }
        let d = &self.data;
        if let Some(size) = d.image_size {
            if size == 0 {
                return Err(Error::config("data.image_size", "must be at least 1"));
            }
            match (d.format, d.native_size()) {
                (DataFormat::Imagenet64, _) if size != 32 && size != 64 => {
                    return Err(Error::config(
                        "data.image_size",
                        format!("{size}: Downsampled ImageNet comes at 32 or 64 (the files' own size)"),
                    ));
                }
                (_, Some(native)) if size != native => {
                    return Err(Error::config(
                        "data.image_size",
                        format!("{size}, but {:?} images are {native}×{native} and are not resized", d.format),
                    ));
                }
                _ => {}
            }
        }
        if d.format == DataFormat::Imagefolder {
            if d.normalize == Some(Normalize::Standardize) {
                return Err(Error::config(
                    "data.normalize",
                    "\"standardize\" needs a pass over every training image, too slow for an image folder; use \"imagenet\" (the default) or \"unit\"",
                ));
            }
            if d.augment == Augment::CropFlip {
                return Err(Error::config(
                    "data.augment",
                    "\"crop-flip\" is the 32×32 CIFAR recipe; image folders take \"rrc-flip\" or \"none\"",
                ));
            }
        }
        if d.normalize == Some(Normalize::Imagenet) && matches!(d.format, DataFormat::Idx) {
            return Err(Error::config("data.normalize", "\"imagenet\" is for RGB images; IDX images have one channel"));
        }
        if self.data.augment != Augment::None && self.data.format == DataFormat::Idx {
            // Works (the crop is taken from the padded image as for CIFAR), but say what it does.
            tracing::debug!("data.augment on IDX images: pad 4, crop, flip as for CIFAR");
        }
        if !(0.0..1.0).contains(&self.train.label_smoothing) {
            return Err(Error::config(
                "train.label_smoothing",
                format!("must be in [0, 1), got {}", self.train.label_smoothing),
            ));
        }
        if !(self.optimizer.l2 >= 0.0 && self.optimizer.l2.is_finite()) {
            return Err(Error::config(
                "optimizer.l2",
                format!("must be a finite number ≥ 0, got {}", self.optimizer.l2),
            ));
        }
        if self.data.train_subset == Some(0) {
            return Err(Error::config("data.train_subset", "must be at least 1"));
        }
        if self.data.test_subset == Some(0) {
            return Err(Error::config("data.test_subset", "must be at least 1"));
        }
        let t = &self.train;
        if t.steps == 0 {
            return Err(Error::config("train.steps", "must be at least 1"));
        }
        if t.batch_size == 0 {
            return Err(Error::config("train.batch_size", "must be at least 1"));
        }
        if let Some(n) = self.data.train_subset {
            if t.batch_size > n {
                // Allowed by the sampler (batches straddle epochs), but almost always a mistake.
                return Err(Error::config(
                    "train.batch_size",
                    format!("{} is larger than data.train_subset = {n}", t.batch_size),
                ));
            }
        }
        if t.keep_checkpoints == 0 {
            return Err(Error::config(
                "train.keep_checkpoints",
                "must be at least 1 (the checkpoint a run stops with is always kept)",
            ));
        }
        if t.log_every == 0 {
            return Err(Error::config("train.log_every", "must be at least 1"));
        }
        if t.eval_chunk == 0 {
            return Err(Error::config("train.eval_chunk", "must be at least 1"));
        }
        let o = &self.optimizer;
        positive("optimizer.lr", o.lr)?;
        match o.kind {
            OptimizerKind::Rk => {
                self.tableau()?;
                unit("optimizer.momentum", o.momentum)?;
                if o.preconditioner == PreconditionerKind::Adagrad {
                    positive("optimizer.adagrad_eps", o.adagrad_eps)?;
                }
                if o.step_size == StepSizeKind::Dalr {
                    positive("optimizer.dalr.p", o.dalr.p)?;
                    positive("optimizer.dalr.fd_eps", o.dalr.fd_eps)?;
                }
                if o.step_size == StepSizeKind::ErrorControlled {
                    let ec = &o.error_control;
                    if !(ec.atol >= 0.0 && ec.rtol >= 0.0 && ec.atol + ec.rtol > 0.0) {
                        return Err(Error::config(
                            "optimizer.error_control.atol",
                            "atol and rtol must be ≥ 0 and not both 0",
                        ));
                    }
                    positive("optimizer.error_control.safety", ec.safety)?;
                    positive("optimizer.error_control.h_max", ec.h_max)?;
                    if !(ec.fmin > 0.0 && ec.fmin < 1.0) {
                        return Err(Error::config(
                            "optimizer.error_control.fmin",
                            format!("must be in (0, 1), got {}", ec.fmin),
                        ));
                    }
                    if ec.fmax <= 1.0 {
                        return Err(Error::config(
                            "optimizer.error_control.fmax",
                            format!("must be > 1, got {}", ec.fmax),
                        ));
                    }
                    if !self.tableau()?.is_embedded() {
                        return Err(Error::config(
                            "optimizer.step_size",
                            format!("error-controlled needs an embedded pair (bs32, dopri54, or a custom tableau with b_hat); `{}` has none", o.tableau),
                        ));
                    }
                }
            }
            kind => {
                let only_rk = [
                    (o.preconditioner != PreconditionerKind::None, "optimizer.preconditioner"),
                    (!matches!(o.step_size, StepSizeKind::Constant | StepSizeKind::Cosine), "optimizer.step_size"),
                    (o.custom_tableau.is_some(), "optimizer.custom_tableau"),
                ];
                for (set, key) in only_rk {
                    if set {
                        return Err(Error::config(
                            key,
                            format!("applies to optimizer.kind = \"rk\" only, not {kind:?}"),
                        ));
                    }
                }
                if kind == OptimizerKind::Momentum {
                    unit("optimizer.momentum", o.momentum)?;
                } else if o.momentum != 0.0 {
                    return Err(Error::config(
                        "optimizer.momentum",
                        format!("is not used by {kind:?}; use beta1 for the Adam family or kind = \"momentum\""),
                    ));
                }
                if matches!(kind, OptimizerKind::Adam | OptimizerKind::Adamw | OptimizerKind::Nadamw) {
                    unit("optimizer.beta1", o.beta1)?;
                    unit("optimizer.beta2", o.beta2)?;
                    positive("optimizer.eps", o.eps)?;
                }
                if o.weight_decay != 0.0 && !matches!(kind, OptimizerKind::Adamw | OptimizerKind::Nadamw) {
                    return Err(Error::config(
                        "optimizer.weight_decay",
                        format!("{kind:?} has no decoupled weight decay; use adamw or nadamw"),
                    ));
                }
            }
        }
        if o.weight_decay < 0.0 {
            return Err(Error::config("optimizer.weight_decay", "must be ≥ 0"));
        }
        if o.step_size == StepSizeKind::Cosine && o.warmup_steps >= t.steps {
            return Err(Error::config(
                "optimizer.warmup_steps",
                format!("{} leaves no steps after warm-up (train.steps = {})", o.warmup_steps, t.steps),
            ));
        }
        if !(0.0..=1.0).contains(&o.min_lr_fraction) {
            return Err(Error::config("optimizer.min_lr_fraction", "must be in [0, 1]"));
        }
        Ok(())
    }
}

/// Apply one `a.b.c=value` override to the TOML tree. The value is parsed as TOML (numbers,
/// booleans, arrays, quoted strings); anything that does not parse is taken as a bare string,
/// so `--set optimizer.kind=adam` works without quotes.
pub fn apply_override(tree: &mut toml::Table, spec: &str) -> Result<()> {
    let (key, raw) = spec
        .split_once('=')
        .ok_or_else(|| Error::config("--set", format!("{spec:?}: expected key=value, e.g. --set optimizer.lr=0.01")))?;
    let key = key.trim();
    if key.is_empty() || key.split('.').any(|p| p.is_empty()) {
        return Err(Error::config("--set", format!("{spec:?}: bad key {key:?}")));
    }
    let value = parse_value(raw.trim());
    let parts: Vec<&str> = key.split('.').collect();
    let mut table = tree;
    for (i, part) in parts[..parts.len() - 1].iter().enumerate() {
        let entry = table.entry(part.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry.as_table_mut().ok_or_else(|| {
            Error::config(parts[..=i].join("."), "is a value, not a table; cannot set a key inside it")
        })?;
    }
    table.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

fn parse_value(raw: &str) -> toml::Value {
    let doc = format!("v = {raw}");
    match doc.parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").unwrap_or(toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.into()),
    }
}

/// The keys `--set` may change when a run is resumed: its length and bookkeeping, the memory
/// knobs (they change only the summation order of the gradient; a checkpoint holds whole buffers
/// whether or not the optimizer was sharded) and where it runs (the same arithmetic up to the
/// device's rounding), and the image decoders' threads. Every other key would change the
/// trajectory.
pub const RESUMABLE_KEYS: &[&str] = &[
    "train.steps",
    "train.eval_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.log_every",
    "train.eval_chunk",
    "train.micro_batch",
    "train.recompute",
    "train.shard_optimizer",
    "train.device",
    "train.gpu",
    "train.gpu_solver",
    // Decode threads and the prefetch budget: a sample's bytes do not depend on them.
    "data.workers",
    "data.prefetch_mib",
];

impl Config {
    /// The dotted keys whose values differ between `self` and `other` (a key set in one and left
    /// out of the other counts), sorted.
    pub fn changed_keys(&self, other: &Config) -> Vec<String> {
        fn flatten(prefix: &str, v: &toml::Value, out: &mut std::collections::BTreeMap<String, toml::Value>) {
            match v {
                toml::Value::Table(t) => {
                    for (k, v) in t {
                        let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                        flatten(&key, v, out);
                    }
                }
                v => {
                    out.insert(prefix.to_string(), v.clone());
                }
            }
        }
        let keys = |c: &Config| {
            let mut out = std::collections::BTreeMap::new();
            // A config always serializes (plain data); an error would leave the map empty.
            if let Ok(v) = toml::Value::try_from(c) {
                flatten("", &v, &mut out);
            }
            out
        };
        let (a, b) = (keys(self), keys(other));
        let mut changed: Vec<String> = a.keys().chain(b.keys()).filter(|k| a.get(*k) != b.get(*k)).cloned().collect();
        changed.sort();
        changed.dedup();
        changed
    }
}

/// A model config for tests and benches: `kind` with `sets` applied as `--set model.…` would
/// (defaults filled in, validated).
pub fn model_config(kind: &str, sets: &[&str]) -> Result<ModelConfig> {
    let mut all = vec![format!("model.kind={kind}")];
    all.extend(sets.iter().map(|s| format!("model.{s}")));
    Ok(Config::from_toml_str("", &all)?.model)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str, sets: &[&str]) -> String {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        Config::from_toml_str(text, &sets).unwrap_err().to_string()
    }

    #[test]
    fn changed_keys_names_every_differing_key_and_only_those() {
        let a = Config::from_toml_str("", &[]).unwrap();
        assert!(a.changed_keys(&a.clone()).is_empty());
        let b = Config::from_toml_str(
            "",
            &["optimizer.lr=0.5".into(), "train.steps=7".into(), "data.shuffle=false".into()],
        )
        .unwrap();
        assert_eq!(a.changed_keys(&b), ["data.shuffle", "optimizer.lr", "train.steps"]);
        assert_eq!(b.changed_keys(&a), a.changed_keys(&b));
        // Every resumable key is a real key: changing it shows up under that name.
        for key in RESUMABLE_KEYS {
            let value = match *key {
                "train.recompute" | "train.shard_optimizer" => "true".to_string(),
                "train.gpu_solver" => "false".to_string(),
                "train.device" => "\"cpu\"".to_string(),
                _ => "3".to_string(),
            };
            let c = Config::from_toml_str("", &[format!("{key}={value}")]).unwrap();
            let changed = a.changed_keys(&c);
            assert_eq!(changed, [key.to_string()], "{key}");
        }
    }

    #[test]
    fn defaults_are_the_papers_mlp_with_rk4() {
        let c = Config::from_toml_str("", &[]).unwrap();
        assert_eq!(c.model.kind, "mlp");
        assert_eq!(c.model.hidden, Some(vec![500, 500, 500]));
        let cnn = Config::from_toml_str("[model]\nkind = \"cnn\"\n", &[]).unwrap();
        assert_eq!(cnn.model.hidden, Some(vec![20, 10]));
        assert_eq!(c.optimizer.kind, OptimizerKind::Rk);
        assert_eq!(c.optimizer.tableau, "rk4");
        assert_eq!(c.optimizer.lr, 0.003);
        assert_eq!(c.train.batch_size, 16);
        assert_eq!(c.data.normalize, Some(Normalize::Unit));
        assert!(c.data.shuffle);
    }

    #[test]
    fn overrides_apply_and_are_typed() {
        let sets: Vec<String> = [
            "optimizer.kind=adam",
            "optimizer.lr=0.001",
            "train.steps=7",
            "data.shuffle=false",
            "model.hidden=[32, 16]",
            "optimizer.dalr.estimator=finite-difference",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let c = Config::from_toml_str("[train]\nsteps = 100\n", &sets).unwrap();
        assert_eq!(c.optimizer.kind, OptimizerKind::Adam);
        assert_eq!(c.optimizer.lr, 0.001);
        assert_eq!(c.train.steps, 7);
        assert!(!c.data.shuffle);
        assert_eq!(c.model.hidden, Some(vec![32, 16]));
        assert_eq!(c.optimizer.dalr.estimator, DalrEstimator::FiniteDifference);
    }

    #[test]
    fn unknown_keys_are_named() {
        assert!(err("[train]\nstepz = 3\n", &[]).contains("stepz"));
        assert!(err("", &["optimizer.lrr=0.1"]).contains("lrr"));
        assert!(err("[modle]\n", &[]).contains("modle"));
    }

    #[test]
    fn bad_values_name_their_key() {
        assert!(err("", &["optimizer.lr=-1"]).contains("optimizer.lr"));
        assert!(err("", &["train.batch_size=0"]).contains("train.batch_size"));
        assert!(err("", &["optimizer.tableau=rk5"]).contains("optimizer.tableau"));
        assert!(err("", &["optimizer.kind=lbfgs"]).contains("lbfgs"));
        assert!(err("", &["model.kind=resnet"]).contains("model.kind"));
        assert!(err("", &["optimizer.momentum=1.5"]).contains("optimizer.momentum"));
        assert!(
            err("", &["optimizer.kind=adam", "optimizer.preconditioner=adagrad"]).contains("optimizer.preconditioner")
        );
        assert!(err("", &["optimizer.step_size=error-controlled"]).contains("embedded"));
        assert!(err("", &["model.init=/nonexistent/w.safetensors"]).contains("model.init"));
        assert!(err("", &["optimizer.tableau=custom"]).contains("optimizer.custom_tableau"));
        assert!(err("", &["nonsense"]).contains("key=value"));
        assert!(err("train = 3\n", &["train.steps=3"]).contains("train"));
    }

    #[test]
    fn image_data_keys() {
        let ok = |sets: &[&str]| {
            let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
            Config::from_toml_str("", &sets).unwrap()
        };
        let c = ok(&["data.format=\"imagefolder\"", "data.augment=\"rrc-flip\""]);
        assert_eq!(c.data.normalize, Some(Normalize::Imagenet));
        assert_eq!(c.data.image_shape_and_classes().0, [3, 224, 224]);
        assert_eq!(c.data.prefetch_mib, crate::data::DEFAULT_PREFETCH_MIB);
        assert!(c.data.worker_threads() >= 1);
        assert_eq!(ok(&["data.format=\"imagenet64\"", "data.image_size=32"]).data.normalize, Some(Normalize::Imagenet));
        ok(&["data.format=\"cifar10\"", "data.image_size=32", "data.augment=\"rrc-flip\""]);
        ok(&["data.format=\"imagefolder\"", "data.normalize=\"unit\""]);
        let folder = "data.format=\"imagefolder\"";
        assert!(err("", &[folder, "data.normalize=\"standardize\""]).contains("data.normalize"));
        assert!(err("", &[folder, "data.augment=\"crop-flip\""]).contains("data.augment"));
        assert!(err("", &[folder, "data.image_size=0"]).contains("data.image_size"));
        assert!(err("", &["data.format=\"imagenet64\"", "data.image_size=48"]).contains("data.image_size"));
        assert!(err("", &["data.format=\"cifar10\"", "data.image_size=64"]).contains("data.image_size"));
        assert!(err("", &["data.image_size=32"]).contains("data.image_size"));
        assert!(err("", &["data.normalize=\"imagenet\""]).contains("data.normalize"));
    }

    #[test]
    fn custom_tableau_from_toml() {
        let text = "[optimizer]\ntableau = \"custom\"\n[optimizer.custom_tableau]\nname = \"my-heun\"\na = [[0.0, 0.0], [1.0, 0.0]]\nb = [0.5, 0.5]\n";
        let c = Config::from_toml_str(text, &[]).unwrap();
        assert_eq!(c.tableau().unwrap().order(), 2);
        let bad = "[optimizer]\ntableau = \"custom\"\n[optimizer.custom_tableau]\na = [[0.0, 0.0], [1.0, 0.0]]\nb = [0.5, 0.6]\n";
        assert!(err(bad, &[]).contains("b"));
    }

    #[test]
    fn resolved_config_round_trips() {
        let c =
            Config::from_toml_str("", &["optimizer.kind=adamw".into(), "optimizer.weight_decay=0.01".into()]).unwrap();
        let again = Config::from_toml_str(&c.to_toml(), &[]).unwrap();
        assert_eq!(c, again);
    }
}
