//! The odenet end to end through the real binary, on real images: `configs/fashion_mnist_odenet.toml`
//! (rk4 in depth, reversible gradients) trains to a stated test accuracy; its peak heap is below
//! backprop's at the same number of ODE steps; and the `model.safetensors` it writes loads with
//! `load_state_dict(strict=True)` into an independent PyTorch version of the model
//! (`scripts/torch_odenet.py`), which gives kutta's logits and — differentiating its own
//! reversible solve by plain autograd in float64 — kutta's reconstructed gradient (when the
//! PyTorch venv of the README exists; otherwise that part says SKIPPED).

mod common;

use common::{
    load_trained, reference_check, require_fashion_mnist, torch_python_with, train_shipped, write_f32_tensors,
};
use kutta_trainer::tableau::Tableau;

/// The smaller run the test trains: width 16, batch 64, Adam 0.01 with the config's cosine
/// schedule over 300 steps (30 warm-up), rk4 with 4 steps in the block, reversible gradients.
const RUN: [&str; 9] = [
    "model.width=16",
    "train.batch_size=64",
    "optimizer.lr=0.01",
    "train.steps=300",
    "optimizer.warmup_steps=30",
    "train.eval_every=0",
    "train.checkpoint_every=0",
    "train.eval_chunk=500",
    "train.log_every=50",
];

/// The test-set accuracy the run must reach: measured 69.14 % (0.32 epoch; deterministic for a
/// given build), far above chance (10 %).
const MIN_ACCURACY: f64 = 0.64;

#[test]
fn odenet_trains_with_reversible_gradients_in_less_memory_and_matches_pytorch() {
    require_fashion_mnist();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let (summary, secs) = train_shipped("configs/fashion_mnist_odenet.toml", &out, &RUN);
    let acc = summary["final_test_accuracy"].as_f64().unwrap();
    eprintln!("odenet (width 16, rk4 × 4 steps, reversible), 300 Adam steps of batch 64: test accuracy {:.2} % in {secs:.0} s", acc * 100.0);
    assert!(acc >= MIN_ACCURACY, "test accuracy {acc} < {MIN_ACCURACY}");
    let described = summary["model"].as_str().unwrap();
    assert!(described.contains("rk4, 4 steps over [0, 1], reversible (λ 0.999)"), "{described}");

    // Peak heap of 3 training steps and the final evaluation, reversible against backprop at the
    // same 4 ODE steps (measured: 105 MiB against 130; at 16 steps backprop needs 230).
    let peak = |gradient: &str| {
        let o = dir.path().join(gradient);
        let g = format!("model.ode.gradient={gradient}");
        let mut sets: Vec<&str> = RUN.to_vec();
        sets.extend(["train.steps=3", "optimizer.warmup_steps=1", "train.eval_chunk=100"]);
        let mut plain = sets.clone();
        if gradient != "reversible" {
            plain.push(&g);
        }
        let (s, _) = train_shipped("configs/fashion_mnist_odenet.toml", &o, &plain);
        s["peak_heap_mib"].as_f64().expect("kutta counts its heap")
    };
    let (rev, bp) = (peak("reversible"), peak("backprop"));
    eprintln!("peak heap at 4 ODE steps: reversible {rev:.1} MiB, backprop {bp:.1} MiB");
    assert!(bp - rev >= 10.0, "reversible {rev:.1} MiB is not clearly below backprop's {bp:.1} MiB");

    // kutta's eval logits on 16 test images and its gradient on 8, for the PyTorch check.
    let trained = load_trained(&out);
    let (x, logits) = trained.eval_logits(16);
    let (x8, labels, grads) = trained.train_gradient(8);
    let Some(python) = torch_python_with(&["torch", "safetensors"]) else {
        eprintln!("SKIPPED: the PyTorch comparison needs ~/.cache/kutta/torch-venv (pip install torch safetensors) or KUTTA_TORCH_PYTHON");
        return;
    };
    let rk4 = Tableau::builtin("rk4").unwrap();
    let tableau = serde_json::json!({ "a": rk4.a, "b": rk4.b }).to_string();
    let solver = ["--tableau", &tableau, "--steps", "4", "--time", "1", "--coupling", "0.999"];
    let weights = out.join("model.safetensors");
    let (io, io8, gpath) =
        (dir.path().join("io.safetensors"), dir.path().join("io8.safetensors"), dir.path().join("grads.safetensors"));
    write_f32_tensors(&io, &[("x".into(), vec![16, 1, 28, 28], x), ("logits".into(), vec![16, 10], logits)]);
    write_f32_tensors(&io8, &[("x".into(), vec![8, 1, 28, 28], x8), ("y".into(), vec![8], labels)]);
    write_f32_tensors(&gpath, &grads);
    let (weights, io, io8, gpath) =
        (weights.to_str().unwrap(), io.to_str().unwrap(), io8.to_str().unwrap(), gpath.to_str().unwrap());
    let check: Vec<&str> = ["--weights", weights, "--inputs", io].into_iter().chain(solver).collect();
    reference_check(&python, "torch_odenet.py", "check", &check);
    let grad: Vec<&str> = ["--weights", weights, "--inputs", io8, "--grads", gpath].into_iter().chain(solver).collect();
    reference_check(&python, "torch_odenet.py", "train-grad", &grad);
}
