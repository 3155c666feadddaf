//! Compute threads per rank (`trainer::threads`): under a real `mpirun` each rank of a 2-rank
//! job on this node takes its share of the cores, says so once at start, and records it in
//! `summary.json`; `kutta --threads N launch …` gives every rank N. Needs the `mpi` feature and
//! Open MPI (`cargo test --workspace --features mpi`); without them it says SKIPPED.

use std::path::Path;
use std::process::{Command, Output};

mod common;

fn enabled() -> bool {
    if !cfg!(feature = "mpi") {
        eprintln!("SKIPPED: kutta was built without the `mpi` feature; run cargo test --workspace --features mpi");
        return false;
    }
    if Command::new("mpirun").arg("--version").output().is_err() {
        eprintln!("SKIPPED: no mpirun (apt-get install openmpi-bin libopenmpi-dev)");
        return false;
    }
    common::require_fashion_mnist();
    true
}

const SMALL: [&str; 5] =
    ["train.steps=2", "data.train_subset=600", "model.hidden=[48, 24]", "train.batch_size=20", "train.eval_every=0"];

/// `kutta [PRE…] launch --nproc 2 -- train …` with no thread setting inherited from the test.
fn launch2(pre: &[&str], out: &Path) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kutta"));
    c.env("RUST_LOG", "info").env_remove("RAYON_NUM_THREADS").env_remove("SLURM_CPUS_PER_TASK");
    c.args(pre).args(["launch", "--nproc", "2", "--"]).args(common::train_args(out, 2, &SMALL, &[]));
    let o = c.output().unwrap();
    assert!(o.status.success(), "exit {:?}\nstderr: {}", o.status, String::from_utf8_lossy(&o.stderr));
    o
}

/// The thread count of every "compute threads: N (reason)" line, with the reason.
fn logged(o: &Output) -> Vec<(usize, String)> {
    let err = String::from_utf8_lossy(&o.stderr);
    err.lines()
        .filter_map(|l| l.split_once("compute threads: ").map(|(_, rest)| rest.to_string()))
        .map(|rest| {
            let (n, reason) = rest.split_once(' ').unwrap_or((&rest, ""));
            (n.parse().unwrap_or_else(|_| panic!("not a count: {rest:?}")), reason.to_string())
        })
        .collect()
}

fn summary_threads(out: &Path) -> u64 {
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    s["compute_threads"].as_u64().expect("summary.json has compute_threads")
}

#[test]
fn two_ranks_share_the_cores_of_this_node() {
    if !enabled() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let o = launch2(&[], &out);
    let lines = logged(&o);
    assert_eq!(lines.len(), 2, "one line per rank: {lines:?}\n{}", String::from_utf8_lossy(&o.stderr));
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for (n, reason) in &lines {
        // candle counts physical cores, at most the logical CPUs: cores / 2 or fewer, at least 1.
        assert!(*n >= 1 && *n <= (cores / 2).max(1), "{n} threads on {cores} cores: {reason}");
        assert!(reason.contains("/ 2 ranks on this node (OMPI_COMM_WORLD_LOCAL_SIZE)"), "{reason}");
        assert!(reason.contains("--threads to override"), "{reason}");
    }
    if cores == 2 {
        assert!(lines.iter().all(|(n, r)| *n == 1 && r.contains("2 cores / 2 ranks")), "{lines:?}");
    }
    assert_eq!(summary_threads(&out), lines[0].0 as u64);

    // An explicit count reaches every rank and wins.
    let out = dir.path().join("run3");
    let lines = logged(&launch2(&["--threads", "3"], &out));
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines.iter().all(|(n, r)| *n == 3 && r.contains("RAYON_NUM_THREADS=3")), "{lines:?}");
    assert_eq!(summary_threads(&out), 3);
}
