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
/// `torch_python()` when it can import every one of `modules` (e.g. "torchvision", "timm"): a
/// venv made for one comparison may lack another's packages, which must then say SKIPPED, not fail.
pub fn torch_python_with(modules: &[&str]) -> Option<PathBuf> {
    let python = torch_python()?;
    let import = format!("import {}", modules.join(", "));
    let ok = std::process::Command::new(&python).args(["-c", &import]).output().map(|o| o.status.success());
    ok.unwrap_or(false).then_some(python)
}

pub fn torch_python() -> Option<PathBuf> {
    let p = std::env::var_os("KUTTA_TORCH_PYTHON")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/kutta/torch-venv/bin/python")))?;
    p.is_file().then_some(p)
}

/// `kutta train --config configs/CONFIG --out OUT --set …` through the binary (RUST_LOG=warn),
/// asserting success: the run's `summary.json` and its wall time in seconds.
pub fn train_shipped(config: &str, out: &Path, sets: &[&str]) -> (serde_json::Value, f64) {
    let t0 = std::time::Instant::now();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_kutta"));
    cmd.args(["train", "--config", &repo_path(config), "--out", out.to_str().unwrap()]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    let o = cmd.env("RUST_LOG", "warn").output().unwrap();
    let secs = t0.elapsed().as_secs_f64();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary = serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    (summary, secs)
}

/// A finished run's model, its `model.safetensors` (θ, state) as CPU tensors, and the test set.
pub struct TrainedRun {
    pub model: Box<dyn kutta_trainer::model::Model>,
    pub theta: Vec<f32>,
    pub state: kutta_trainer::model::ModelState,
    pub params: Vec<candle_core::Tensor>,
    pub test: kutta_trainer::data::Dataset,
}

/// Load the run in `out` (its `config.toml` and `model.safetensors`).
pub fn load_trained(out: &Path) -> TrainedRun {
    use kutta_trainer::model;
    let cfg = kutta_trainer::config::Config::load(&out.join("config.toml"), &[]).unwrap();
    let (_, test) = kutta_trainer::data::load(&cfg.data).unwrap();
    let m = model::build(&cfg.model, test.image_shape, test.num_classes).unwrap();
    let (theta, state) = model::load_safetensors(m.as_ref(), &out.join("model.safetensors")).unwrap();
    let params = m
        .layout()
        .params
        .iter()
        .map(|s| {
            candle_core::Tensor::from_slice(&theta[s.range()], s.shape.as_slice(), &candle_core::Device::Cpu).unwrap()
        })
        .collect();
    TrainedRun { model: m, theta, state, params, test }
}

/// An f32 tensor for a safetensors file: (name, shape, values).
pub type NamedTensor = (String, Vec<usize>, Vec<f32>);

impl TrainedRun {
    /// The first `n` test images (flat, [n, C·H·W]) and the model's evaluation-mode logits on them.
    pub fn eval_logits(&self, n: usize) -> (Vec<f32>, Vec<f32>) {
        use kutta_trainer::model::Pass;
        let dev = candle_core::Device::Cpu;
        let mut x = Vec::new();
        self.test.extend_images(0..n, &mut x).unwrap();
        let xt = candle_core::Tensor::from_slice(&x, (n, x.len() / n), &dev).unwrap();
        let state = self.state.tensors(self.model.as_ref(), &dev).unwrap();
        let logits = self.model.forward(&self.params, &xt, &mut Pass::eval(&state)).unwrap();
        (x, logits.flatten_all().unwrap().to_vec1::<f32>().unwrap())
    }

    /// The first `n` test images and their labels (as f32), and kutta's gradient of the mean
    /// cross-entropy on them (`ModelField`, training mode) as (name, shape, values) per tensor,
    /// followed by ("loss", [1], [loss]).
    pub fn train_gradient(&self, n: usize) -> (Vec<f32>, Vec<f32>, Vec<NamedTensor>) {
        use kutta_trainer::field::VectorField;
        let batch = self.test.slice(0..n);
        let mut field = kutta_trainer::model::ModelField::new(self.model.as_ref(), &batch);
        field.set_batch(&(0..n).collect::<Vec<_>>(), n);
        let mut grad = vec![0.0f32; self.theta.len()];
        let loss = field.eval(&self.theta, &mut grad).unwrap();
        let mut grads: Vec<NamedTensor> = self
            .model
            .layout()
            .params
            .iter()
            .map(|s| (s.name.clone(), s.shape.clone(), grad[s.range()].to_vec()))
            .collect();
        grads.push(("loss".into(), vec![1], vec![loss as f32]));
        let mut x = Vec::new();
        batch.extend_images(0..n, &mut x).unwrap();
        (x, batch.labels.iter().map(|&l| l as f32).collect(), grads)
    }
}

/// Write f32 tensors (name, shape, values) to a safetensors file, for the reference scripts.
pub fn write_f32_tensors(path: &Path, tensors: &[NamedTensor]) {
    let bytes: Vec<Vec<u8>> =
        tensors.iter().map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
    let views: Vec<_> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| {
            (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap())
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// Run the reference script `scripts/SCRIPT MODE ARGS…` with `python`, asserting that it agrees
/// (exit 0); its report (one JSON line).
pub fn reference_check(python: &Path, script: &str, mode: &str, args: &[&str]) -> String {
    let o = std::process::Command::new(python)
        .arg(repo_path(&format!("scripts/{script}")))
        .arg(mode)
        .args(args)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&o.stdout).into_owned();
    eprintln!("{script} {mode}: {report}");
    assert!(o.status.success(), "{script} {mode} disagrees: {report}{}", String::from_utf8_lossy(&o.stderr));
    report
}
