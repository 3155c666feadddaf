//! The ViT keeps kutta's invariants (issue: real vision workloads II): N thread-ranks follow the
//! one-process trajectory, micro-batches change only the summation order, recomputation is
//! bit-identical, and a resumed run ends bit-identical to an uninterrupted one — in f32 and in
//! mixed precision (bf16 passes). On real Fashion-MNIST images, with a tiny ViT.

use kutta_collectives::SingleProcess;
use kutta_trainer::config::Config;
use kutta_trainer::train::{self, Progress};

mod common;

use common::{bits, checkpoint_tensor, max_rel_diff, run};

fn config(sets: &[&str]) -> Config {
    let base = [
        "model.kind=vit",
        "model.patch=7",
        "model.dim=16",
        "model.depth=2",
        "model.heads=2",
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

/// Two RK4 steps: 1, 2 and 3 thread-ranks and micro-batches of 8 agree to 1e-5 relative,
/// recomputation bit for bit (measured: 5e-9 on 2 ranks, 1.5e-8 on 3 and in micro-batches); the
/// same in bf16, whose passes round every activation to 8 bits of mantissa, so a different
/// summation order can round a value the other way: ranks agree to 1e-3 (measured 2.5e-4).
#[test]
fn ranks_micro_batches_and_recomputation_follow_one_trajectory() {
    for (dtype, tol) in [("f32", 1e-5), ("bf16", 1e-3)] {
        let dir = tempfile::tempdir().unwrap();
        let dt = format!("model.dtype={dtype}");
        let cfg = config(&["optimizer.kind=rk", "train.steps=2", &dt]);
        let one = run(&cfg, &dir.path().join("one"), 0);
        assert_eq!(one.grad_evals, 8);
        let theta = checkpoint_tensor(&dir.path().join("one"), "theta");
        for ranks in [2, 3] {
            let out = dir.path().join(format!("ranks{ranks}"));
            run(&cfg, &out, ranks);
            let d = max_rel_diff(&theta, &checkpoint_tensor(&out, "theta"));
            eprintln!("{dtype}, {ranks} ranks: θ {d:e}");
            assert!(d <= tol, "{dtype}, {ranks} ranks: θ differs by {d:e}");
        }
        let micro = config(&["optimizer.kind=rk", "train.steps=2", "train.micro_batch=8", &dt]);
        run(&micro, &dir.path().join("micro"), 0);
        let d = max_rel_diff(&theta, &checkpoint_tensor(&dir.path().join("micro"), "theta"));
        eprintln!("{dtype}, micro-batches of 8: θ {d:e}");
        assert!(d <= tol, "{dtype}, micro-batches: θ differs by {d:e}");
        let re = config(&["optimizer.kind=rk", "train.steps=2", "train.recompute=true", &dt]);
        run(&re, &dir.path().join("recompute"), 0);
        assert_eq!(bits(&theta), bits(&checkpoint_tensor(&dir.path().join("recompute"), "theta")), "{dtype}");
    }
}

/// A run of 4 steps and a run of 2 steps resumed for 2 more end bit-identical (θ and
/// model.safetensors), with AdamW.
#[test]
fn resume_is_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&["optimizer.kind=adamw", "optimizer.lr=0.001", "optimizer.weight_decay=0.05"]);
    run(&cfg, &dir.path().join("whole"), 0);
    let mut short = cfg.clone();
    short.train.steps = 2;
    run(&short, &dir.path().join("resumed"), 0);
    let again = train::load_run_config(&dir.path().join("resumed"), &["train.steps=4".into()]).unwrap();
    train::resume(&again, &dir.path().join("resumed"), Progress::Off, &SingleProcess).unwrap();
    let theta = |d: &str| bits(&checkpoint_tensor(&dir.path().join(d), "theta"));
    assert_eq!(theta("whole"), theta("resumed"));
    let model = |d: &str| std::fs::read(dir.path().join(d).join("model.safetensors")).unwrap();
    assert_eq!(model("whole"), model("resumed"));
}
