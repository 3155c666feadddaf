//! What the binary's end-to-end tests share: the real data set, the shipped config, and the
//! argument list of a small `kutta train` run.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub const FASHION: &str = "/usr/share/datasets/fashion-mnist";

/// The real data set must be installed (`.ci/run` installs it); fail loudly, never skip.
pub fn require_fashion_mnist() {
    assert!(
        Path::new(FASHION).join("train-images-idx3-ubyte.gz").is_file(),
        "Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist"
    );
}

/// A path under the repository root (e.g. `configs/fashion_mnist_mlp.toml`), as a string.
pub fn repo_path(rel: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join(rel).to_string_lossy().into_owned()
}

/// `train --config configs/fashion_mnist_mlp.toml --out OUT` with `--set train.steps=STEPS`, then
/// `--set` for each of `sets` and `extra` (later ones win).
pub fn train_args(out: &Path, steps: u64, sets: &[&str], extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "train".to_string(),
        "--config".into(),
        repo_path("configs/fashion_mnist_mlp.toml"),
        "--out".into(),
        out.to_string_lossy().into_owned(),
        "--set".into(),
        format!("train.steps={steps}"),
    ];
    for s in sets.iter().chain(extra) {
        args.push("--set".into());
        args.push(s.to_string());
    }
    args
}

/// The PyTorch interpreter of the README (`KUTTA_TORCH_PYTHON`, else
/// `~/.cache/kutta/torch-venv/bin/python`), if it exists. Tests that compare with PyTorch say
/// SKIPPED without it.
pub fn torch_python() -> Option<PathBuf> {
    let p = std::env::var_os("KUTTA_TORCH_PYTHON")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/kutta/torch-venv/bin/python")))?;
    p.is_file().then_some(p)
}
