//! Batch norm keeps kutta's invariants (issue: real vision workloads): with ghost batches of
//! `model.bn_group` samples, N thread-ranks follow the one-process trajectory (θ and the running
//! statistics), micro-batches change only the summation order, recomputation is bit-identical,
//! and a resumed run ends bit-identical to an uninterrupted one. On real Fashion-MNIST images,
//! with a small CIFAR ResNet-18.

use kutta_collectives::{Communicator, LocalGroup, SingleProcess};
use kutta_trainer::config::Config;
use kutta_trainer::train::{self, Progress};
use std::path::Path;

mod common;

use common::{bits, checkpoint_tensor, max_rel_diff, run};

fn config(sets: &[&str]) -> Config {
    let base = [
        "model.kind=resnet18",
        "model.width=4",
        "model.bn_group=4",
        "data.train_subset=240",
        "train.batch_size=24",
        "train.steps=4",
        "train.eval_every=2",
        "train.eval_chunk=500",
        "train.checkpoint_every=2",
        "train.log_every=1",
        "optimizer.lr=0.05",
    ];
    common::config(&base, sets)
}

/// θ and the model state of the newest checkpoint in `dir`.
fn weights(dir: &Path) -> (Vec<f32>, Vec<f32>) {
    (checkpoint_tensor(dir, "theta"), checkpoint_tensor(dir, "model_state"))
}

/// 1, 2 and 3 thread-ranks (per-rank batches 24, 12, 8: whole groups of 4) and micro-batches of
/// 8 follow one trajectory, θ and running statistics alike, ≤ 1e-5 relative; recomputation is
/// bit-identical. One RK4 step (4 chained gradient evaluations): batch norm
/// divides by the spread of each channel over its group, and at width 4 some channels are nearly
/// constant over 4 images, so summation-order differences (2e-8 after one SGD step) grow about
/// 10× per step afterwards (measured: 1.1e-5 after two RK4 steps, 3e-5 after four SGD steps) —
/// as they would between PyTorch runs on 1 and 2 GPUs.
#[test]
fn ranks_and_micro_batches_follow_one_trajectory_with_batch_norm() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&["optimizer.kind=rk", "train.steps=1"]);
    let one = run(&cfg, &dir.path().join("one"), 0);
    let (theta, state) = weights(&dir.path().join("one"));
    assert_eq!(one.grad_evals, 4);
    // The running statistics moved away from (0, 1).
    assert!(state.iter().any(|&v| v != 0.0 && v != 1.0));
    for ranks in [2, 3] {
        let out = dir.path().join(format!("ranks{ranks}"));
        let many = run(&cfg, &out, ranks);
        assert_eq!(many.grad_evals, one.grad_evals);
        let (t, s) = weights(&out);
        let (dt, ds) = (max_rel_diff(&theta, &t), max_rel_diff(&state, &s));
        eprintln!("{ranks} ranks: θ {dt:e}, running statistics {ds:e}");
        assert!(dt <= 1e-5 && ds <= 1e-5, "{ranks} ranks: θ differs by {dt:e}, the running statistics by {ds:e}");
    }
    let micro = config(&["optimizer.kind=rk", "train.steps=1", "train.micro_batch=8"]);
    run(&micro, &dir.path().join("micro"), 0);
    let (t, s) = weights(&dir.path().join("micro"));
    let (dt, ds) = (max_rel_diff(&theta, &t), max_rel_diff(&state, &s));
    eprintln!("micro-batches of 8: θ {dt:e}, running statistics {ds:e}");
    assert!(dt <= 1e-5 && ds <= 1e-5, "micro-batches: θ differs by {dt:e}, the running statistics by {ds:e}");
    let re = config(&["optimizer.kind=rk", "train.steps=1", "train.recompute=true"]);
    run(&re, &dir.path().join("recompute"), 0);
    let (t, s) = weights(&dir.path().join("recompute"));
    assert_eq!(bits(&theta), bits(&t), "recomputation changed θ");
    assert_eq!(bits(&state), bits(&s), "recomputation changed the running statistics");
}

/// A run of 4 steps and a run of 2 steps resumed for 2 more end bit-identical, running
/// statistics included; so does model.safetensors.
#[test]
fn resume_with_batch_norm_is_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&["optimizer.kind=momentum", "optimizer.momentum=0.9", "data.augment=crop-flip"]);
    run(&cfg, &dir.path().join("whole"), 0);
    let mut short = cfg.clone();
    short.train.steps = 2;
    run(&short, &dir.path().join("resumed"), 0);
    let again = train::load_run_config(&dir.path().join("resumed"), &["train.steps=4".into()]).unwrap();
    train::resume(&again, &dir.path().join("resumed"), Progress::Off, &SingleProcess).unwrap();
    let (a, b) = (weights(&dir.path().join("whole")), weights(&dir.path().join("resumed")));
    assert_eq!(bits(&a.0), bits(&b.0), "θ");
    assert_eq!(bits(&a.1), bits(&b.1), "running statistics");
    let model = |d: &str| std::fs::read(dir.path().join(d).join("model.safetensors")).unwrap();
    assert_eq!(model("whole"), model("resumed"));
}

/// Batch sizes that are not whole groups are errors naming the key and sizes that would work.
#[test]
fn group_sizes_that_do_not_divide_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&["train.batch_size=26"]);
    let err = train::train(&cfg, &dir.path().join("a"), Progress::Off, &SingleProcess).unwrap_err().to_string();
    assert!(err.contains("model.bn_group") && err.contains("24 or 28"), "{err}");
    let cfg = config(&["train.micro_batch=6"]);
    let err = train::train(&cfg, &dir.path().join("b"), Progress::Off, &SingleProcess).unwrap_err().to_string();
    assert!(err.contains("train.micro_batch") && err.contains("4 or 8"), "{err}");
    // 24 over 5 ranks: not whole groups of 4 on every rank.
    let cfg = config(&[]);
    let out = dir.path().join("c");
    let (out, cfg) = (&out, &cfg);
    let errs: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = LocalGroup::new(5)
            .into_iter()
            .map(|c| {
                s.spawn(move || train::train(cfg, out, Progress::Off, &c as &dyn Communicator).unwrap_err().to_string())
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(errs[0].contains("over 5 ranks") && errs[0].contains("multiple of 20"), "{}", errs[0]);
}
