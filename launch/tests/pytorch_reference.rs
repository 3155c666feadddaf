//! kutta's RK4 trajectory against an independent float64 reference written with PyTorch
//! autograd (`scripts/pytorch_rk4_reference.py`): the paper's Fashion-MNIST MLP, classical RK4,
//! five steps on a fixed full batch of 64 real images, from the same float32 initial weights
//! (PyTorch's nn.Linear initialisation, loaded by kutta through `model.init`). kutta computes in
//! float32 on its own gradient code (`model::native`), the reference in float64: they must agree
//! to float32 rounding. Says SKIPPED without the PyTorch venv of the README.

use std::process::Command;

mod common;

use common::{repo_path, require_fashion_mnist, torch_python, train_args};

#[test]
fn rk4_trajectory_matches_a_float64_pytorch_reference() {
    require_fashion_mnist();
    let Some(python) = torch_python() else {
        eprintln!("SKIPPED: the PyTorch reference needs PyTorch (python3 -m venv ~/.cache/kutta/torch-venv && ~/.cache/kutta/torch-venv/bin/pip install torch safetensors, or KUTTA_TORCH_PYTHON)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let init = dir.path().join("init.safetensors");
    let script = repo_path("scripts/pytorch_rk4_reference.py");
    let o = Command::new(&python).args([&script, "--write-init", init.to_str().unwrap()]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let out = dir.path().join("run");
    let sets = [
        format!("model.init={}", init.display()),
        "data.train_subset=64".into(),
        "train.batch_size=64".into(),
        "data.shuffle=false".into(),
        "optimizer.lr=0.05".into(),
        "train.eval_every=0".into(),
        "train.log_every=1".into(),
    ];
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let o = Command::new(env!("CARGO_BIN_EXE_kutta")).args(train_args(&out, 5, &sets, &[])).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let kutta_weights = out.join("model.safetensors");
    let o = Command::new(&python)
        .args([&script, "--init", init.to_str().unwrap(), "--steps", "5", "--lr", "0.05", "--subset", "64"])
        .args(["--compare", kutta_weights.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    eprintln!("kutta (float32) vs PyTorch (float64), 5 RK4 steps: {r}");
    // Measured: ‖Δθ‖ / ‖θ_T − θ_0‖ = 1.8e-5, ‖Δθ‖ / ‖θ_T‖ = 5.3e-8 (float32's unit roundoff
    // is 6e-8), losses equal to 1e-9.
    let rel_motion = r["diff_over_motion"].as_f64().unwrap();
    let rel_norm = r["diff_over_norm"].as_f64().unwrap();
    assert!(rel_motion < 2e-4, "‖θ_kutta − θ_torch‖ / ‖θ_torch − θ_0‖ = {rel_motion:e}");
    assert!(rel_norm < 5e-7, "‖θ_kutta − θ_torch‖ / ‖θ_torch‖ = {rel_norm:e}");
    // The same losses along the way (kutta logs the loss at θ_n of each step).
    let losses: Vec<f64> = r["losses"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let logged: Vec<f64> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["train_loss"].as_f64())
        .collect();
    assert_eq!(logged.len(), 5, "{metrics}");
    for (k, (a, b)) in logged.iter().zip(&losses).enumerate() {
        assert!((a - b).abs() < 1e-6, "step {k}: kutta loss {a}, PyTorch {b}");
    }
}
