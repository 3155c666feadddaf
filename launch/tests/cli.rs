//! End-to-end tests of the real `kutta` binary: training on the real Fashion-MNIST files,
//! bit-identical resume, and the errors a user sees for bad input (no panics, nothing lost).

use std::path::Path;
use std::process::{Command, Output};

mod common;

const FASHION: &str = "/usr/share/datasets/fashion-mnist";

fn kutta(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kutta")).args(args).env("RUST_LOG", "warn").output().expect("run kutta")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn config(root: &Path) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join(root).to_string_lossy().into_owned()
}

/// The real data set must be installed (`.ci/run` installs it); fail loudly, never skip.
fn require_fashion_mnist() {
    assert!(
        Path::new(FASHION).join("train-images-idx3-ubyte.gz").is_file(),
        "Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist"
    );
}

fn summary(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap()
}

fn assert_clean_error(o: &Output, needle: &str) {
    let e = stderr(o);
    assert_eq!(o.status.code(), Some(1), "expected exit 1, stderr: {e}");
    assert!(e.contains(needle), "stderr should mention {needle:?}: {e}");
    assert!(!e.contains("panicked"), "a user error must not panic: {e}");
}

#[test]
fn rk4_trains_the_mlp_on_real_fashion_mnist() {
    require_fashion_mnist();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let o = kutta(&[
        "train",
        "--config",
        &config(Path::new("configs/fashion_mnist_mlp.toml")),
        "--out",
        out.to_str().unwrap(),
        "--set",
        "train.steps=400",
        "--set",
        "train.batch_size=64",
        "--set",
        "optimizer.lr=0.2",
        "--set",
        "train.eval_every=200",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = summary(&out);
    let acc = s["final_test_accuracy"].as_f64().unwrap();
    assert!(acc >= 0.75, "test accuracy {acc} < 0.75");
    assert_eq!(s["status"], "completed");
    assert_eq!(s["steps"], 400);
    assert_eq!(s["grad_evals"], 1600, "RK4: four gradient evaluations per step");
    assert_eq!(s["optimizer"], "rk(rk4)");
    assert_eq!(s["tableau"], "rk4");
    for f in ["config.toml", "metrics.jsonl", "model.safetensors", "checkpoint-00000400.safetensors"] {
        assert!(out.join(f).is_file(), "{f} missing from the run folder");
    }
    // metrics.jsonl: one object per logged step with the documented fields.
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 40, "log_every = 10 over 400 steps");
    for key in ["step", "epoch", "train_loss", "h", "grad_evals", "wall_s"] {
        assert!(lines[0].get(key).is_some(), "metrics line lacks {key}");
    }
    let evaluated: Vec<u64> =
        lines.iter().filter(|l| l.get("test_accuracy").is_some()).map(|l| l["step"].as_u64().unwrap()).collect();
    assert_eq!(evaluated, vec![200, 400]);
    // The resolved config round-trips through the binary's parser.
    let resolved = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(resolved.contains("lr = 0.2"), "{resolved}");
}

fn small_run(out: &Path, steps: u64, extra: &[&str]) -> Output {
    let sets = [
        "data.train_subset=512",
        "model.hidden=[64, 32]",
        "train.batch_size=24",
        "train.eval_every=0",
        "train.checkpoint_every=3",
        "train.log_every=1",
    ];
    let args = common::train_args(out, steps, &sets, extra);
    Command::new(env!("CARGO_BIN_EXE_kutta")).args(&args).env("RUST_LOG", "warn").output().unwrap()
}

fn resume_is_bit_identical(extra: &[&str]) {
    require_fashion_mnist();
    let dir = tempfile::tempdir().unwrap();
    let (full, half) = (dir.path().join("full"), dir.path().join("half"));
    let o = small_run(&full, 20, extra);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = small_run(&half, 10, extra);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = kutta(&["train", "--resume", half.to_str().unwrap(), "--set", "train.steps=20"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let a = std::fs::read(full.join("model.safetensors")).unwrap();
    let b = std::fs::read(half.join("model.safetensors")).unwrap();
    assert!(a == b, "resumed weights differ from the uninterrupted run ({extra:?})");
    let (sa, sb) = (summary(&full), summary(&half));
    assert_eq!(sa["grad_evals"], sb["grad_evals"]);
    assert_eq!(sa["steps"], 20);
    // The metrics log continues without gaps or duplicates.
    let steps: Vec<u64> = std::fs::read_to_string(half.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=20).collect::<Vec<u64>>());
}

#[test]
fn resume_rk4_with_all_modifications_is_bit_identical() {
    resume_is_bit_identical(&[
        "optimizer.preconditioner=modified-adagrad",
        "optimizer.momentum=0.9",
        "optimizer.step_size=dalr",
        "optimizer.lr=0.5",
    ]);
}

#[test]
fn resume_adam_is_bit_identical() {
    resume_is_bit_identical(&["optimizer.kind=adam", "optimizer.lr=0.001"]);
}

#[test]
fn resume_error_controlled_dopri54_is_bit_identical() {
    resume_is_bit_identical(&[
        "optimizer.tableau=dopri54",
        "optimizer.step_size=error-controlled",
        "optimizer.lr=0.05",
    ]);
}

#[test]
fn resume_refuses_trajectory_changes_and_missing_checkpoints() {
    require_fashion_mnist();
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    assert!(small_run(&run, 4, &[]).status.success());
    let o = kutta(&["train", "--resume", run.to_str().unwrap(), "--set", "optimizer.lr=0.5", "--set", "train.steps=8"]);
    assert_clean_error(&o, "trajectory");
    // The error names the key that may not change, and only that one.
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("`optimizer.lr`") && !err.contains("`train.steps`"), "{err}");
    let o = kutta(&["train", "--resume", run.to_str().unwrap()]);
    assert_clean_error(&o, "train.steps");
    let o = kutta(&["train", "--resume", dir.path().join("nope").to_str().unwrap()]);
    assert_clean_error(&o, "config.toml");
    for ck in kutta_trainer::checkpoint::list(&run).unwrap() {
        std::fs::remove_file(ck).unwrap();
    }
    let o = kutta(&["train", "--resume", run.to_str().unwrap(), "--set", "train.steps=8"]);
    assert_clean_error(&o, "no checkpoint");
}

#[test]
fn existing_run_folder_is_never_overwritten() {
    require_fashion_mnist();
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(run.join("notes.txt"), "mine").unwrap();
    let o = small_run(&run, 2, &[]);
    assert_clean_error(&o, "already exists");
    assert_eq!(std::fs::read_to_string(run.join("notes.txt")).unwrap(), "mine");
}

#[test]
fn config_errors_name_the_key() {
    let cfg = config(Path::new("configs/fashion_mnist_mlp.toml"));
    let o = kutta(&["train", "--config", &cfg, "--set", "optimizer.lrr=0.1"]);
    assert_clean_error(&o, "lrr");
    let o = kutta(&["train", "--config", &cfg, "--set", "optimizer.tableau=rk9"]);
    assert_clean_error(&o, "optimizer.tableau");
    let o = kutta(&["train", "--config", "/nonexistent/x.toml"]);
    assert_clean_error(&o, "/nonexistent/x.toml");
}

#[test]
fn every_shipped_config_is_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join("configs");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            kutta_trainer::config::Config::load(&p, &[]).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            n += 1;
        }
    }
    assert!(n >= 6, "expected the paper's workloads in configs/, found {n}");
}

#[test]
fn corrupt_data_files_are_named() {
    require_fashion_mnist();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    for f in [
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ] {
        std::fs::copy(Path::new(FASHION).join(f), data.join(f)).unwrap();
    }
    // Truncate the raw (decompressed) label file: write it uncompressed and cut it short.
    std::fs::remove_file(data.join("t10k-labels-idx1-ubyte.gz")).unwrap();
    std::fs::write(data.join("t10k-labels-idx1-ubyte"), [0u8, 0, 8, 1, 0, 0, 39, 16, 1, 2, 3]).unwrap();
    let out = dir.path().join("run");
    let o = small_run(&out, 2, &[&format!("data.dir=\"{}\"", data.display())]);
    assert_clean_error(&o, "t10k-labels-idx1-ubyte");
}

#[test]
fn divergence_stops_cleanly() {
    require_fashion_mnist();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let o = small_run(&out, 5, &["optimizer.kind=sgd", "optimizer.lr=1e38"]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("non-finite") || e.contains("NaN"), "{e}");
    assert!(!e.contains("panicked"), "{e}");
    let s = summary(&out);
    assert!(s["status"].as_str().unwrap().starts_with("failed"), "{s}");
    assert!(!out.join("model.safetensors").exists(), "no final weights from a diverged run");
}

#[test]
fn models_lists_every_kind_with_its_defaults() {
    let o = kutta(&["models"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    for needle in ["mlp", "cnn", "resnet18", "wrn", "model.width = 64", "model.depth = 28", "model.widen = 10"] {
        assert!(text.contains(needle), "`{needle}` missing from:\n{text}");
    }
    let o = kutta(&["models", "--json"]);
    let kinds: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let wrn = kinds.as_array().unwrap().iter().find(|k| k["name"] == "wrn").unwrap();
    assert_eq!(wrn["defaults"]["bn_group"], 32);
}

#[test]
fn tableaux_lists_verified_orders() {
    let o = kutta(&["tableaux", "--json"]);
    assert!(o.status.success());
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    let get = |n: &str| rows.iter().find(|r| r["name"] == n).unwrap_or_else(|| panic!("{n} missing")).clone();
    assert_eq!(get("rk4")["order"], 4);
    assert_eq!(get("rk4")["stage_buffers_streaming"], 1);
    assert_eq!(get("dopri54")["order"], 5);
    assert_eq!(get("dopri54")["embedded_order"], 4);
    assert_eq!(get("bs32")["embedded_order"], 2);
    assert_eq!(rows.len(), 10);
}

#[test]
fn bench_reports_every_optimizer_and_the_ratio() {
    let o = kutta(&["bench", "steps", "--batch-sizes", "8", "--min-seconds", "0", "--min-reps", "2", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let rows = r["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 4);
    for row in rows {
        assert!(row["median_step_ms"].as_f64().unwrap() > 0.0);
    }
    let rk4 = rows.iter().find(|x| x["optimizer"] == "rk4").unwrap();
    assert_eq!(rk4["grad_evals_per_step"], 4.0);
    assert!(r["rk4_over_sgd"][0][1].as_f64().unwrap() > 0.0);
}

/// A small model on random images (no data directory): fast benches.
const TINY: [&str; 4] = ["--set", "model.hidden=[16]", "--set", "data.dir=/nonexistent"];

/// The flags `kutta bench` took before its subcommands still run the step bench, with one note
/// naming `kutta bench steps`; the reproduce line names the subcommand.
#[test]
fn bench_old_flags_still_work_with_a_note() {
    let o = kutta(&[&["bench", "--batch-sizes", "8", "--min-seconds", "0", "--min-reps", "1"][..], &TINY].concat());
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert!(e.contains("note: `kutta bench <flags>` is now `kutta bench steps <flags>`"), "{e}");
    assert_eq!(e.matches("note:").count(), 1, "{e}");
    let out = String::from_utf8_lossy(&o.stdout);
    let reproduce = "reproduce: kutta bench steps --set model.hidden=[16] --set data.dir=/nonexistent --batch-sizes 8 \
                     --min-seconds 0 --min-reps 1";
    assert!(out.contains(reproduce), "{out}");
    assert_eq!(out.matches("rk4+pre+dalr+mom ").count(), 1, "{out}");
}

/// `kutta bench sweep` writes sweep.csv and sweep.svg and names itself in the reproduce line;
/// the old `kutta bench --sweep batch` does the same, with a note.
#[test]
fn bench_sweep_new_and_old() {
    let dir = tempfile::tempdir().unwrap();
    for (form, dir) in [(&["sweep"][..], dir.path().join("new")), (&["--sweep", "batch"][..], dir.path().join("old"))] {
        let args = ["--memory", "1GiB", "--batch-sizes", "8,16", "--min-seconds", "0", "--min-reps", "1"];
        let o = kutta(&[&["bench"][..], form, &args, &["--out", dir.to_str().unwrap()], &TINY].concat());
        let e = stderr(&o);
        assert!(o.status.success(), "{e}");
        assert_eq!(e.contains("note: `kutta bench --sweep batch` is now `kutta bench sweep`"), form.len() == 2, "{e}");
        let out = String::from_utf8_lossy(&o.stdout);
        let reproduce = "reproduce: kutta bench sweep --memory 1GiB --batch-sizes 8,16 --min-seconds 0 --min-reps 1 \
                         --set model.hidden=[16] --set data.dir=/nonexistent";
        assert!(out.contains(reproduce), "{out}");
        let csv = std::fs::read_to_string(dir.join("sweep.csv")).unwrap();
        assert_eq!(csv.lines().count(), 3, "{csv}");
        assert!(std::fs::read_to_string(dir.join("sweep.svg")).unwrap().starts_with("<svg"));
    }
}

fn theta(dir: &Path) -> Vec<f32> {
    let newest = kutta_trainer::checkpoint::list(dir).unwrap().remove(0);
    let bytes = std::fs::read(newest).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensor("theta").unwrap().data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

#[test]
fn micro_batching_gives_the_same_trajectory_and_memory_is_measured() {
    require_fashion_mnist();
    let dir = tempfile::tempdir().unwrap();
    let (whole, micro) = (dir.path().join("whole"), dir.path().join("micro"));
    let extra = ["optimizer.preconditioner=modified-adagrad", "optimizer.momentum=0.9", "optimizer.lr=0.2"];
    assert!(small_run(&whole, 6, &extra).status.success());
    let with_micro: Vec<&str> = extra.iter().copied().chain(["train.micro_batch=7"]).collect();
    let o = small_run(&micro, 6, &with_micro);
    assert!(o.status.success(), "{}", stderr(&o));
    let (a, b) = (theta(&whole), theta(&micro));
    let scale = a.iter().map(|x| x.abs()).fold(0.0f32, f32::max);
    let d = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max) / scale;
    assert!(d <= 1e-5, "24 samples in micro-batches of 7 vs one pass: relative difference {d:e}");
    let s = summary(&micro);
    assert_eq!(s["micro_batch"], 7);
    assert!(s["peak_rss_mib"].as_f64().unwrap() > 10.0, "{s}");
    let last = std::fs::read_to_string(micro.join("metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(last.lines().last().unwrap()).unwrap();
    assert!(last["peak_rss_mib"].as_f64().is_some());
}

/// Issue 4: activation recomputation through the binary gives the very same weights (bit for
/// bit) as keeping every activation, with and without micro-batches.
#[test]
fn recomputation_gives_bit_identical_weights() {
    require_fashion_mnist();
    let dir = tempfile::tempdir().unwrap();
    let extra = ["optimizer.preconditioner=modified-adagrad", "optimizer.momentum=0.9", "optimizer.lr=0.2"];
    for micro in ["train.micro_batch=0", "train.micro_batch=10"] {
        let (plain, re) = (dir.path().join(format!("plain-{micro}")), dir.path().join(format!("re-{micro}")));
        let base: Vec<&str> = extra.iter().copied().chain([micro]).collect();
        assert!(small_run(&plain, 4, &base).status.success());
        let with_re: Vec<&str> = base.iter().copied().chain(["train.recompute=true"]).collect();
        let o = small_run(&re, 4, &with_re);
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(summary(&re)["recompute"], true);
        let (a, b) = (theta(&plain), theta(&re));
        let differ = a.iter().zip(&b).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
        assert_eq!(differ, 0, "{micro}: {differ} of {} weights differ with recomputation", a.len());
    }
}

#[test]
fn plan_fits_full_batch_in_768mib_and_says_what_would_fit() {
    require_fashion_mnist();
    let cfg = config(Path::new("configs/fashion_mnist_mlp_fullbatch.toml"));
    let o = kutta(&["plan", "--config", &cfg, "--memory", "768MiB", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let p: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let chosen = &p["chosen"];
    assert!(chosen["micro_batches"].as_u64().unwrap() >= 2, "{chosen}");
    assert!(chosen["peak_bytes"].as_u64().unwrap() <= 768 << 20);
    // Two micro-batches beat recomputation and there is nothing to shard on one rank: the plan
    // sets the micro-batch only.
    assert_eq!((chosen["recompute"].as_bool(), chosen["shard"].as_bool()), (Some(false), Some(false)), "{chosen}");
    let m = chosen["micro_batch"].as_u64().unwrap();
    assert_eq!(p["overrides"], serde_json::json!([format!("train.micro_batch={m}")]));
    // A config with recomputation on gets it switched off again: the plan decides that knob.
    let o = kutta(&["plan", "--config", &cfg, "--memory", "768MiB", "--json", "--set", "train.recompute=true"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let p: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(p["overrides"], serde_json::json!([format!("train.micro_batch={m}"), "train.recompute=false"]));
    let o = kutta(&["plan", "--config", &cfg, "--memory", "100MiB"]);
    assert_clean_error(&o, "--memory");
    let o = kutta(&["plan", "--config", &cfg, "--memory", "lots"]);
    assert_clean_error(&o, "--memory");
}
