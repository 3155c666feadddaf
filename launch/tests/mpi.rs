//! The data-parallel trainer under a real `mpirun` (SPEC §5, issue 3): 2 ranks and 1 process
//! with the same global batch end with the same weights; checkpoints resume across world sizes;
//! a killed rank ends the job quickly; a config error ends it at once. Needs the `mpi` feature
//! (`cargo test --workspace --features mpi`, as `.ci/run` does) and Open MPI.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const FASHION: &str = "/usr/share/datasets/fashion-mnist";

fn enabled() -> bool {
    if !cfg!(feature = "mpi") {
        eprintln!("SKIPPED: kutta was built without the `mpi` feature; run cargo test --workspace --features mpi");
        return false;
    }
    assert!(
        Path::new(FASHION).join("train-images-idx3-ubyte.gz").is_file(),
        "Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist"
    );
    true
}

fn kutta() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kutta"));
    c.env("RUST_LOG", "warn").env("RAYON_NUM_THREADS", "1");
    c
}

fn config() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("configs/fashion_mnist_mlp.toml")
        .to_string_lossy()
        .into_owned()
}

fn small(steps: u64, extra: &[&str]) -> Vec<String> {
    let mut v = vec![];
    for s in [
        format!("train.steps={steps}"),
        "data.train_subset=600".into(),
        "model.hidden=[48, 24]".into(),
        "train.batch_size=25".into(),
        "train.eval_every=0".into(),
        "train.checkpoint_every=4".into(),
        "train.log_every=1".into(),
    ]
    .into_iter()
    .chain(extra.iter().map(|s| s.to_string()))
    {
        v.push("--set".into());
        v.push(s);
    }
    v
}

fn train(ranks: usize, out: &Path, steps: u64, extra: &[&str]) -> Output {
    let mut c = kutta();
    if ranks > 0 {
        c.args(["launch", "--nproc", &ranks.to_string(), "--"]);
    }
    c.args(["train", "--config", &config(), "--out", out.to_str().unwrap()]).args(small(steps, extra));
    c.output().unwrap()
}

fn resume(ranks: usize, out: &Path, steps: u64) -> Output {
    let mut c = kutta();
    if ranks > 0 {
        c.args(["launch", "--nproc", &ranks.to_string(), "--"]);
    }
    c.args(["train", "--resume", out.to_str().unwrap(), "--set", &format!("train.steps={steps}")]);
    c.output().unwrap()
}

fn ok(o: &Output) {
    assert!(o.status.success(), "exit {:?}\nstderr: {}", o.status, String::from_utf8_lossy(&o.stderr));
}

fn theta(dir: &Path) -> Vec<f32> {
    let newest = kutta_trainer::checkpoint::list(dir).unwrap().remove(0);
    let bytes = std::fs::read(newest).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensor("theta").unwrap().data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn rel_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = a.iter().map(|x| x.abs() as f64).fold(0.0, f64::max);
    a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).abs()).fold(0.0, f64::max) / scale
}

#[test]
fn two_ranks_under_mpirun_match_one_process() {
    if !enabled() {
        return;
    }
    // Global batch 25: an uneven split (13 + 12) on 2 ranks.
    for (name, extra) in [
        ("sgd", vec!["optimizer.kind=sgd", "optimizer.lr=0.05"]),
        ("adam", vec!["optimizer.kind=adam", "optimizer.lr=0.001"]),
        (
            "rk4+modified-adagrad+momentum+dalr",
            vec![
                "optimizer.preconditioner=modified-adagrad",
                "optimizer.momentum=0.9",
                "optimizer.step_size=dalr",
                "optimizer.lr=0.5",
            ],
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (one, two) = (dir.path().join("one"), dir.path().join("two"));
        ok(&train(0, &one, 8, &extra));
        ok(&train(2, &two, 8, &extra));
        let d = rel_diff(&theta(&one), &theta(&two));
        eprintln!("{name}: largest relative difference 1 vs 2 ranks after 8 steps: {d:e}");
        assert!(d <= 1e-5, "{name}: {d:e} > 1e-5");
        let s: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(two.join("summary.json")).unwrap()).unwrap();
        assert_eq!(s["status"], "completed");
    }
}

/// Issue 16: the odenet (rk4 in depth with reversible gradients, under RK4 in time) on 2 ranks
/// under mpirun follows the one-process trajectory.
#[test]
fn odenet_with_reversible_gradients_under_mpirun_matches_one_process() {
    if !enabled() {
        return;
    }
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join("configs/fashion_mnist_odenet.toml");
    let run = |ranks: usize, out: &Path| {
        let mut c = kutta();
        if ranks > 0 {
            c.args(["launch", "--nproc", &ranks.to_string(), "--"]);
        }
        c.args(["train", "--config", config.to_str().unwrap(), "--out", out.to_str().unwrap()]);
        for s in [
            "model.width=6",
            "model.ode.steps=3",
            "data.train_subset=600",
            "train.batch_size=25",
            "train.steps=4",
            "train.eval_every=0",
            "train.checkpoint_every=4",
            "optimizer.kind=rk",
            "optimizer.step_size=constant",
            "optimizer.lr=0.05",
        ] {
            c.args(["--set", s]);
        }
        c.output().unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    ok(&run(0, &one));
    ok(&run(2, &two));
    let d = rel_diff(&theta(&one), &theta(&two));
    eprintln!("odenet, reversible gradients, rk4 optimizer: 1 vs 2 ranks after 4 steps {d:e}");
    assert!(d <= 1e-5, "odenet: {d:e} > 1e-5");
}

/// Issue 4: the sharded optimizer (reduce-scatter of each stage gradient, update of the local
/// block, all-gather of the next stage point; MPI_Reduce_scatter_block and MPI_Allgather) follows
/// the unsharded trajectory under mpirun, on 2 ranks and on 3 (uneven blocks of θ).
#[test]
fn sharded_optimizer_under_mpirun_matches_unsharded() {
    if !enabled() {
        return;
    }
    for (name, extra) in [
        (
            "rk4+modified-adagrad+momentum+dalr",
            vec![
                "optimizer.preconditioner=modified-adagrad",
                "optimizer.momentum=0.9",
                "optimizer.step_size=dalr",
                "optimizer.lr=0.5",
            ],
        ),
        (
            "dopri54 error-controlled",
            vec!["optimizer.tableau=dopri54", "optimizer.step_size=error-controlled", "optimizer.lr=0.5"],
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let one = dir.path().join("one");
        ok(&train(0, &one, 6, &extra));
        for ranks in [2, 3] {
            let (plain, sharded) =
                (dir.path().join(format!("plain{ranks}")), dir.path().join(format!("sharded{ranks}")));
            ok(&train(ranks, &plain, 6, &extra));
            let mut with_shard = extra.clone();
            with_shard.push("train.shard_optimizer=true");
            ok(&train(ranks, &sharded, 6, &with_shard));
            let s: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(sharded.join("summary.json")).unwrap()).unwrap();
            assert_eq!(s["optimizer_shards"], ranks, "{name}: the run was not sharded");
            let d_plain = rel_diff(&theta(&plain), &theta(&sharded));
            let d_one = rel_diff(&theta(&one), &theta(&sharded));
            eprintln!("{name}, {ranks} ranks: sharded vs unsharded {d_plain:e}, vs one process {d_one:e}");
            assert!(d_plain <= 1e-5 && d_one <= 1e-5, "{name} on {ranks} ranks: {d_plain:e} / {d_one:e} > 1e-5");
        }
    }
}

#[test]
fn checkpoints_resume_across_world_sizes_under_mpirun() {
    if !enabled() {
        return;
    }
    let extra = ["optimizer.momentum=0.9", "optimizer.preconditioner=modified-adagrad", "optimizer.lr=0.2"];
    let dir = tempfile::tempdir().unwrap();
    let straight = dir.path().join("straight");
    ok(&train(0, &straight, 8, &extra));
    for (first, second, name) in [(2, 0, "2-then-1"), (0, 2, "1-then-2")] {
        let out = dir.path().join(name);
        ok(&train(first, &out, 4, &extra));
        ok(&resume(second, &out, 8));
        let d = rel_diff(&theta(&straight), &theta(&out));
        eprintln!("resume {name}: {d:e}");
        assert!(d <= 1e-5, "{name}: {d:e}");
    }
}

/// The environment of a process, from /proc.
fn environ(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', "\n"))
        .unwrap_or_default()
}

/// The pid of rank `rank` of the job whose command line mentions `run` (its run folder's name).
fn rank_pid(run: &str, rank: usize) -> u32 {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|&pid| {
            let cmd = String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default())
                .into_owned();
            cmd.contains(run)
                && !cmd.contains("launch")
                && environ(pid).contains(&format!("OMPI_COMM_WORLD_RANK={rank}\n"))
        })
        .unwrap_or_else(|| panic!("rank {rank} process of {run}"))
}

#[test]
fn a_killed_rank_ends_the_job_within_30_seconds() {
    if !enabled() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("victim-run");
    let mut child = kutta()
        .args(["launch", "--nproc", "2", "--", "train", "--config", &config(), "--out", out.to_str().unwrap()])
        .args(small(100_000, &[]))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until training runs (metrics appear), then SIGKILL rank 1.
    let t0 = Instant::now();
    while !out.join("metrics.jsonl").is_file() || std::fs::metadata(out.join("metrics.jsonl")).unwrap().len() == 0 {
        assert!(t0.elapsed() < Duration::from_secs(60), "training did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let rank1 = rank_pid("victim-run", 1);
    let killed = Instant::now();
    Command::new("kill").args(["-9", &rank1.to_string()]).status().unwrap();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if killed.elapsed() > Duration::from_secs(30) {
            child.kill().ok();
            panic!("the job was still running 30 s after rank 1 was killed");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = killed.elapsed();
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    eprintln!("job ended {:.2} s after SIGKILL of rank 1 (exit {status:?})", took.as_secs_f64());
    assert!(!status.success());
    assert!(
        err.contains("rank 1") || err.contains("signal 9") || err.contains("Killed"),
        "no message naming the rank and cause: {err}"
    );
}

#[test]
fn config_errors_end_the_job_on_every_rank() {
    if !enabled() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    let o = train(2, &dir.path().join("x"), 4, &["optimizer.lrr=1"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("optimizer.lrr"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(30));
}

/// Issue 11: a stop signal sent to one rank only (rank 1, which writes nothing) stops every rank
/// after the same step: mpirun exits with 128 + the signal, rank 0 writes the checkpoint and
/// `summary.json` says "interrupted", and the run resumed on 2 ranks ends with weights
/// bit-identical to an uninterrupted 2-rank run. The same for SIGINT to `kutta launch` (Ctrl-C),
/// which passes it to every rank through mpirun and exits with 130.
#[test]
fn a_signal_to_one_rank_stops_every_rank_after_the_same_step() {
    if !enabled() {
        return;
    }
    const STEPS: u64 = 800;
    let dir = tempfile::tempdir().unwrap();
    let straight = dir.path().join("straight");
    ok(&train(2, &straight, STEPS, &["train.checkpoint_every=100"]));
    for (to_launcher, sig, status) in [(false, "TERM", 143), (false, "USR1", 138), (true, "INT", 130)] {
        let out = dir.path().join(format!("signalled-{sig}"));
        let child = kutta()
            .args(["launch", "--nproc", "2", "--", "train", "--config", &config(), "--out", out.to_str().unwrap()])
            .args(small(STEPS, &["train.checkpoint_every=100"]))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        while std::fs::read_to_string(out.join("metrics.jsonl")).map_or(0, |t| t.lines().count()) < 10 {
            assert!(t0.elapsed() < Duration::from_secs(60), "training did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        let name = out.file_name().unwrap().to_str().unwrap().to_string();
        let target = if to_launcher { child.id() } else { rank_pid(&name, 1) };
        Command::new("kill").args(["-s", sig, &target.to_string()]).status().unwrap();
        let o = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        let whom = if to_launcher { "kutta launch" } else { "rank 1" };
        assert_eq!(o.status.code(), Some(status), "SIG{sig} to {whom}: {err}");
        let s: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
        // The ranks got the launcher's signal as SIGUSR1 through mpirun.
        let seen = if to_launcher { "SIGUSR1".to_string() } else { format!("SIG{sig}") };
        assert_eq!((s["status"].as_str(), s["signal"].as_str()), (Some("interrupted"), Some(seen.as_str())), "{s}");
        let stopped = s["steps"].as_u64().unwrap();
        assert!(stopped < STEPS, "stopped after {stopped}");
        let newest = kutta_trainer::checkpoint::list(&out).unwrap().remove(0);
        assert_eq!(kutta_trainer::checkpoint::step_of(&newest), Some(stopped));
        ok(&resume(2, &out, STEPS));
        assert!(
            std::fs::read(out.join("model.safetensors")).unwrap()
                == std::fs::read(straight.join("model.safetensors")).unwrap(),
            "SIG{sig} to {whom} after step {stopped}: the resumed run differs from the uninterrupted one"
        );
        eprintln!("SIG{sig} to {whom}: exit {status}, every rank stopped after step {stopped}, resume bit-identical");
    }
}

/// `kutta study` with `world_sizes = [1, 2]`: each cell runs as one process and as 2 ranks under
/// mpirun (through `kutta launch`), both runs complete with the same global batch (their losses
/// agree as the data-parallel invariant says), and the report draws step time and scaling
/// efficiency against the world size.
#[test]
fn a_study_over_world_sizes_runs_under_mpirun() {
    if !enabled() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("ws.toml");
    std::fs::write(
        &file,
        format!(
            r#"
base = "{}"
seeds = [0]
world_sizes = [1, 2]
set = {{ "train.steps" = 12, "data.train_subset" = 600, "model.hidden" = [48, 24], "train.batch_size" = 24, "train.eval_every" = 6, "train.checkpoint_every" = 6, "train.log_every" = 1 }}

[[axis]]
name = "optimizer"
values = [{{ label = "rk4", "optimizer.kind" = "rk", "optimizer.lr" = 0.05 }}]
"#,
            config()
        ),
    )
    .unwrap();
    let out = tmp.path().join("s");
    let o =
        kutta().args(["study", "--config", file.to_str().unwrap(), "--out", out.to_str().unwrap()]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("2 runs finished now"), "{err}");
    let last_loss = |run: &str| -> f64 {
        let text = std::fs::read_to_string(out.join("runs").join(run).join("metrics.jsonl")).unwrap();
        let last = text.lines().rfind(|l| l.contains("\"train_loss\"")).unwrap().to_string();
        serde_json::from_str::<serde_json::Value>(&last).unwrap()["train_loss"].as_f64().unwrap()
    };
    let (one, two) = (last_loss("rk4_seed0_np1"), last_loss("rk4_seed0_np2"));
    assert!((one - two).abs() <= 1e-5 * one.abs(), "1 rank: loss {one}, 2 ranks: {two}");
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("scaling_efficiency") && report.contains("step_time_world"), "{report}");
    for svg in ["scaling_efficiency.svg", "step_time_world.svg"] {
        let text = std::fs::read_to_string(out.join(svg)).unwrap();
        assert!(text.starts_with("<svg") && text.contains("</svg>"), "{svg}");
    }
}
