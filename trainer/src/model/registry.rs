//! The model registry: every kind `model.kind` can name, with the keys it reads, their defaults,
//! its validation and its builder — the one place a new model kind is added (plus its own file).
//! `config` validates through it, `train` and `planner` build through it; nothing else matches on
//! the kind's name.

use super::{cnn, mlp, resnet, wrn, Model};
use crate::config::ModelConfig;
use crate::error::{Error, Result};

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
    pub build: fn(&ModelConfig, [usize; 3], usize) -> Result<Box<dyn Model>>,
}

/// Every kind, in the order `kutta models` lists them.
pub const KINDS: &[Kind] = &[mlp::KIND, cnn::KIND, resnet::KIND, wrn::KIND];

/// The kind `cfg.kind` names.
pub fn kind(name: &str) -> Result<&'static Kind> {
    KINDS.iter().find(|k| k.name == name).ok_or_else(|| {
        let names: Vec<String> = KINDS.iter().map(|k| format!("{:?}", k.name)).collect();
        Error::config("model.kind", format!("unknown model {name:?}; expected one of {}", names.join(", ")))
    })
}

/// Every optional key of `[model]` with whether it is set, so that keys another kind reads are
/// refused rather than silently ignored.
fn set_keys(cfg: &ModelConfig) -> [(&'static str, bool); 6] {
    [
        ("hidden", cfg.hidden.is_some()),
        ("width", cfg.width.is_some()),
        ("depth", cfg.depth.is_some()),
        ("widen", cfg.widen.is_some()),
        ("bn_group", cfg.bn_group.is_some()),
        ("bn_momentum", cfg.bn_momentum.is_some()),
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
        return Err(Error::Other(format!(
            "model: cannot build a model for images of shape {image_shape:?} and {classes} classes"
        )));
    }
    let k = kind(&cfg.kind)?;
    let mut cfg = cfg.clone();
    check_keys(k, &cfg)?;
    (k.defaults)(&mut cfg);
    (k.validate)(&cfg)?;
    (k.build)(&cfg, image_shape, classes)
}

/// A model config for tests and benches: `kind` with `sets` applied as `--set model.…` would.
pub fn config(kind: &str, sets: &[&str]) -> Result<ModelConfig> {
    let mut all = vec![format!("model.kind={kind}")];
    all.extend(sets.iter().map(|s| format!("model.{s}")));
    Ok(crate::config::Config::from_toml_str("", &all)?.model)
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

    #[test]
    fn every_kind_builds_with_its_defaults() {
        for k in KINDS {
            let cfg = config(k.name, &[]).unwrap();
            let m = build(&cfg, [3, 32, 32], 10).unwrap();
            assert!(m.layout().len() > 0, "{}", k.name);
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
