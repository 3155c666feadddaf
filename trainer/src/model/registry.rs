//! The model registry: every kind `model.kind` can name, with the keys it reads, their defaults,
//! its validation and its builder — the one place a new model kind is added (plus its own file).
//! `config` validates through it, `train` and `planner` build through it; nothing else matches on
//! the kind's name.

use super::{cnn, mlp, ode::OdeConfig, odenet, resnet, vit, wrn, Model};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// `[model]`: the kind and its keys. Each kind reads only its own keys (`model::registry`
/// lists them; a key another kind reads is an error naming it) and fills in its defaults when
/// the config is loaded, so `config.toml` in a run folder shows every value used.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// `mlp`, `cnn` (the paper's simple CNN), `resnet18` (CIFAR ResNet-18), `wrn` (Wide-ResNet),
    /// `vit`, `odenet` (a neural-ODE block); `kutta models` lists them with their keys.
    pub kind: String,
    /// mlp: hidden widths (default [500, 500, 500]); cnn: the two filter counts ([20, 10]).
    pub hidden: Option<Vec<usize>>,
    /// resnet18: base width (64: torchvision's resnet18). odenet: the channels of the stem and
    /// the ODE block (32).
    pub width: Option<usize>,
    /// wrn: depth (28; 6n + 4). vit: the number of encoder blocks (12).
    pub depth: Option<usize>,
    /// wrn: widening factor (10).
    pub widen: Option<usize>,
    /// Batch norm: samples per ghost batch whose statistics normalise it in training (32). The
    /// per-rank micro-batch must be a multiple of it; then the trajectory does not depend on the
    /// number of ranks or micro-batches.
    pub bn_group: Option<usize>,
    /// Batch norm: the running statistics' update weight (PyTorch's momentum, 0.1).
    pub bn_momentum: Option<f64>,
    /// vit: a preset that sets patch, dim, depth, heads and mlp_ratio (`vit-ti16`, `vit-s16`,
    /// `vit-b16`); keys given beside it override it.
    pub preset: Option<String>,
    /// vit: the patch size (16): the patch embedding is a conv with kernel = stride = patch.
    pub patch: Option<usize>,
    /// vit: the embedding width (192 = ViT-Ti).
    pub dim: Option<usize>,
    /// vit: attention heads (3); dim must be a multiple.
    pub heads: Option<usize>,
    /// vit: the MLP's hidden width over dim (4.0).
    pub mlp_ratio: Option<f64>,
    /// odenet: `[model.ode]`, the ODE block's solver and gradient (`model::ode::OdeConfig`).
    pub ode: Option<OdeConfig>,
    /// Initial weights from a safetensors file instead of the seed.
    pub init: Option<PathBuf>,
    /// The precision of the forward and backward passes: `f32` (default) or `bf16` (mixed
    /// precision: θ, the gradients, every optimizer's arithmetic and the all-reduces stay f32;
    /// the parameters and inputs are cast to bf16 for the passes, normalisations and the loss
    /// run in f32). For a GPU; it runs on the CPU too, slowly, so that it is tested there.
    pub dtype: ComputeDtype,
}

/// `model.dtype`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDtype {
    #[default]
    F32,
    Bf16,
}

impl ComputeDtype {
    /// The candle dtype of the passes.
    pub fn dtype(self) -> candle_core::DType {
        match self {
            ComputeDtype::F32 => candle_core::DType::F32,
            ComputeDtype::Bf16 => candle_core::DType::BF16,
        }
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            kind: "mlp".into(),
            hidden: None,
            width: None,
            depth: None,
            widen: None,
            bn_group: None,
            bn_momentum: None,
            preset: None,
            patch: None,
            dim: None,
            heads: None,
            mlp_ratio: None,
            ode: None,
            init: None,
            dtype: ComputeDtype::F32,
        }
    }
}

/// A kind's builder: the model for images of shape (C, H, W) and a number of classes.
pub type Builder = fn(&ModelConfig, [usize; 3], usize) -> Result<Box<dyn Model>>;

/// One model kind.
pub struct Kind {
    /// The value of `model.kind`.
    pub name: &'static str,
    /// One line for `kutta models` and error messages.
    pub about: &'static str,
    /// The `model.*` keys this kind reads (besides `kind` and `init`).
    pub keys: &'static [&'static str],
    /// Fill in the defaults of the kind's keys left out, so that `config.toml` shows them.
    pub defaults: fn(&mut ModelConfig),
    /// Check the kind's keys (errors name the key); called after `defaults`.
    pub validate: fn(&ModelConfig) -> Result<()>,
    /// Build the model for images of shape (C, H, W) and `classes` classes (a validated config).
    pub build: Builder,
}

/// Every kind, in the order `kutta models` lists them.
pub const KINDS: &[Kind] = &[mlp::KIND, cnn::KIND, resnet::KIND, wrn::KIND, vit::KIND, odenet::KIND];

/// One kind as `kutta models` shows it: its name, its description and its keys with their
/// defaults.
#[derive(Clone, Debug, Serialize)]
pub struct KindSummary {
    pub name: &'static str,
    pub about: &'static str,
    pub defaults: serde_json::Map<String, serde_json::Value>,
}

/// Every kind with its keys' defaults, in `KINDS` order.
pub fn summaries() -> Vec<KindSummary> {
    KINDS
        .iter()
        .map(|k| {
            let mut cfg = ModelConfig { kind: k.name.into(), ..Default::default() };
            (k.defaults)(&mut cfg);
            let values = serde_json::to_value(&cfg).unwrap_or_default();
            let defaults = k
                .keys
                .iter()
                .map(|key| (key.to_string(), values.get(*key).cloned().unwrap_or(serde_json::Value::Null)))
                .collect();
            KindSummary { name: k.name, about: k.about, defaults }
        })
        .collect()
}

/// The kind `cfg.kind` names.
pub fn kind(name: &str) -> Result<&'static Kind> {
    KINDS.iter().find(|k| k.name == name).ok_or_else(|| {
        let names: Vec<String> = KINDS.iter().map(|k| format!("{:?}", k.name)).collect();
        Error::config("model.kind", format!("unknown model {name:?}; expected one of {}", names.join(", ")))
    })
}

/// Every optional key of `[model]` with whether it is set, so that keys another kind reads are
/// refused rather than silently ignored.
fn set_keys(cfg: &ModelConfig) -> [(&'static str, bool); 12] {
    [
        ("hidden", cfg.hidden.is_some()),
        ("width", cfg.width.is_some()),
        ("depth", cfg.depth.is_some()),
        ("widen", cfg.widen.is_some()),
        ("bn_group", cfg.bn_group.is_some()),
        ("bn_momentum", cfg.bn_momentum.is_some()),
        ("preset", cfg.preset.is_some()),
        ("patch", cfg.patch.is_some()),
        ("dim", cfg.dim.is_some()),
        ("heads", cfg.heads.is_some()),
        ("mlp_ratio", cfg.mlp_ratio.is_some()),
        ("ode", cfg.ode.is_some()),
    ]
}

/// Fill in the kind's defaults (config loading); errors on an unknown kind or a key the kind does
/// not read.
pub fn fill_defaults(cfg: &mut ModelConfig) -> Result<()> {
    let k = kind(&cfg.kind)?;
    check_keys(k, cfg)?;
    (k.defaults)(cfg);
    Ok(())
}

fn check_keys(k: &Kind, cfg: &ModelConfig) -> Result<()> {
    for (key, set) in set_keys(cfg) {
        if set && !k.keys.contains(&key) {
            let reads = if k.keys.is_empty() { "no other keys".to_string() } else { k.keys.join(", ") };
            return Err(Error::config(
                format!("model.{key}"),
                format!("not a key of model.kind = {:?} (it reads {reads})", k.name),
            ));
        }
    }
    Ok(())
}

/// Validate the `[model]` table.
pub fn validate(cfg: &ModelConfig) -> Result<()> {
    let k = kind(&cfg.kind)?;
    check_keys(k, cfg)?;
    (k.validate)(cfg)
}

/// Build the model a validated config names for images of shape (C, H, W) and `classes` classes.
pub fn build(cfg: &ModelConfig, image_shape: [usize; 3], classes: usize) -> Result<Box<dyn Model>> {
    if image_shape.contains(&0) || classes == 0 {
        return Err(Error::model(format!(
            "cannot build a model for images of shape {image_shape:?} and {classes} classes"
        )));
    }
    let k = kind(&cfg.kind)?;
    let mut cfg = cfg.clone();
    check_keys(k, &cfg)?;
    (k.defaults)(&mut cfg);
    (k.validate)(&cfg)?;
    (k.build)(&cfg, image_shape, classes)
}

/// Batch norm's keys, shared by the kinds that have it: (`model.bn_group`, `model.bn_momentum`),
/// checked.
pub(crate) fn bn_keys(cfg: &ModelConfig) -> Result<(usize, f64)> {
    let group = cfg.bn_group.unwrap_or(DEFAULT_BN_GROUP);
    let momentum = cfg.bn_momentum.unwrap_or(DEFAULT_BN_MOMENTUM);
    if group == 0 {
        return Err(Error::config("model.bn_group", "must be at least 1"));
    }
    if !(momentum > 0.0 && momentum <= 1.0) {
        return Err(Error::config("model.bn_momentum", format!("must be in (0, 1], got {momentum}")));
    }
    Ok((group, momentum))
}

/// Ghost-batch size by default: divides the per-rank batch of every power-of-two batch ≥ 32 on
/// up to batch / 32 ranks.
pub const DEFAULT_BN_GROUP: usize = 32;
/// PyTorch's `BatchNorm2d(momentum=0.1)`.
pub const DEFAULT_BN_MOMENTUM: f64 = 0.1;

pub(crate) fn bn_defaults(cfg: &mut ModelConfig) {
    cfg.bn_group.get_or_insert(DEFAULT_BN_GROUP);
    cfg.bn_momentum.get_or_insert(DEFAULT_BN_MOMENTUM);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::model_config as config;

    #[test]
    fn every_kind_builds_with_its_defaults() {
        for k in KINDS {
            let cfg = config(k.name, &[]).unwrap();
            let m = build(&cfg, [3, 32, 32], 10).unwrap();
            assert!(!m.layout().is_empty(), "{}", k.name);
            assert_eq!(m.activations(2).len(), m.segments(), "{}: one activation entry per segment", k.name);
        }
    }

    #[test]
    fn keys_of_another_kind_are_refused() {
        let err = config("mlp", &["width=8"]).unwrap_err().to_string();
        assert!(err.contains("model.width") && err.contains("mlp"), "{err}");
        let err = config("resnet18", &["hidden=[3]"]).unwrap_err().to_string();
        assert!(err.contains("model.hidden") && err.contains("width"), "{err}");
        let err = config("nope", &[]).unwrap_err().to_string();
        assert!(err.contains("model.kind") && err.contains("resnet18"), "{err}");
        let err = config("resnet18", &["bn_group=0"]).unwrap_err().to_string();
        assert!(err.contains("model.bn_group"), "{err}");
        let err = config("wrn", &["depth=27"]).unwrap_err().to_string();
        assert!(err.contains("model.depth") && err.contains("6n + 4"), "{err}");
    }
}
