//! SPEC §5's test: N ranks with global batch B follow the same trajectory as one process with
//! batch B, up to floating-point summation order. Ranks are threads here (`LocalGroup`); the
//! same training code runs under mpirun with the MPI communicator.

use kutta_collectives::{Communicator, LocalGroup, SingleProcess};
use kutta_trainer::config::Config;
use kutta_trainer::train::{self, Progress};
use std::path::Path;

mod common;

use common::{max_rel_diff, run};

fn config(sets: &[&str]) -> Config {
    let base = [
        "data.train_subset=600",
        "model.hidden=[48, 24]",
        "train.steps=12",
        "train.eval_every=6",
        "train.checkpoint_every=6",
        "train.log_every=1",
    ];
    common::config(&base, sets)
}

fn weights(dir: &Path) -> Vec<f32> {
    common::checkpoint_tensor(dir, "theta")
}

fn equivalent(sets: &[&str], ranks: usize) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(sets);
    let one = run(&cfg, &dir.path().join("one"), 0);
    let many = run(&cfg, &dir.path().join("many"), ranks);
    assert_eq!(one.grad_evals, many.grad_evals);
    let d = max_rel_diff(&weights(&dir.path().join("one")), &weights(&dir.path().join("many")));
    assert!(d <= 1e-5, "{sets:?} on {ranks} ranks: largest relative difference {d:e} > 1e-5");
    let acc = (one.final_test_accuracy.unwrap() - many.final_test_accuracy.unwrap()).abs();
    assert!(acc <= 2e-4, "test accuracy differs by {acc} (sharded evaluation)");
    d
}

#[test]
fn two_ranks_match_one_process_sgd() {
    eprintln!("sgd: {:e}", equivalent(&["optimizer.kind=sgd", "optimizer.lr=0.05", "train.batch_size=32"], 2));
}

#[test]
fn two_ranks_match_one_process_adam() {
    eprintln!("adam: {:e}", equivalent(&["optimizer.kind=adam", "optimizer.lr=0.001", "train.batch_size=32"], 2));
}

#[test]
fn two_ranks_match_one_process_rk4_with_all_modifications() {
    let d = equivalent(
        &[
            "optimizer.preconditioner=modified-adagrad",
            "optimizer.momentum=0.9",
            "optimizer.step_size=dalr",
            "optimizer.lr=0.5",
            "train.batch_size=32",
        ],
        2,
    );
    eprintln!("rk4+modified-adagrad+momentum+dalr: {d:e}");
}

#[test]
fn uneven_global_batch_is_the_exact_mean() {
    // 25 samples over 2 ranks (13 + 12) and over 3 ranks (9 + 8 + 8).
    for ranks in [2, 3] {
        eprintln!(
            "uneven batch, {ranks} ranks: {:e}",
            equivalent(&["optimizer.kind=sgd", "optimizer.lr=0.05", "train.batch_size=25"], ranks)
        );
    }
}

/// The sharded optimizer (each rank keeps a block of θ and of every optimizer buffer;
/// reduce-scatter, local update, all-gather) follows the unsharded trajectory: 3 ranks, so the
/// blocks are uneven (P = 39 106 = 3 × 13 036 − 2), with every RK modification (its norms and
/// finiteness checks are all-reduced), error control (its error norm and rejections), and Adam.
#[test]
fn sharded_optimizer_matches_one_process() {
    let cases: [&[&str]; 3] = [
        &[
            "optimizer.preconditioner=modified-adagrad",
            "optimizer.momentum=0.9",
            "optimizer.step_size=dalr",
            "optimizer.lr=0.5",
        ],
        &["optimizer.tableau=dopri54", "optimizer.step_size=error-controlled", "optimizer.lr=0.5"],
        &["optimizer.kind=adam", "optimizer.lr=0.001"],
    ];
    for sets in cases {
        let mut all = sets.to_vec();
        all.extend(["train.batch_size=32", "train.shard_optimizer=true"]);
        eprintln!("sharded {sets:?}: {:e}", equivalent(&all, 3));
    }
}

#[test]
fn checkpoints_resume_across_world_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let sets = [
        "optimizer.momentum=0.9",
        "optimizer.preconditioner=modified-adagrad",
        "optimizer.lr=0.2",
        "train.batch_size=30",
    ];
    let cfg = config(&sets);
    let straight = dir.path().join("straight");
    run(&cfg, &straight, 0);
    // 6 steps on 2 ranks, resumed on 1 process; 6 on 1, resumed on 3 ranks; and the same with
    // a sharded optimizer on the multi-rank side (the checkpoint holds whole buffers).
    for (first, second, shard, name) in
        [(2, 0, false, "2to1"), (0, 3, false, "1to3"), (2, 0, true, "2to1-sharded"), (0, 3, true, "1to3-sharded")]
    {
        let out = dir.path().join(name);
        let mut half = cfg.clone();
        half.train.steps = 6;
        half.train.shard_optimizer = shard && first > 1;
        run(&half, &out, first);
        let sets = vec!["train.steps=12".to_string(), format!("train.shard_optimizer={}", shard && second > 1)];
        let resumed = train::load_run_config(&out, &sets).unwrap();
        if second == 0 {
            train::resume(&resumed, &out, Progress::Off, &SingleProcess).unwrap();
        } else {
            std::thread::scope(|s| {
                let hs: Vec<_> = LocalGroup::new(second)
                    .into_iter()
                    .map(|c| {
                        let (r, o) = (&resumed, &out);
                        s.spawn(move || train::resume(r, o, Progress::Off, &c as &dyn Communicator).map(|_| ()))
                    })
                    .collect();
                hs.into_iter().for_each(|h| h.join().unwrap().unwrap());
            });
        }
        let d = max_rel_diff(&weights(&straight), &weights(&out));
        assert!(d <= 1e-5, "{name}: resumed across world sizes differs by {d:e}");
        eprintln!("resume {name}: {d:e}");
    }
}
