//! End-to-end tests of `data.format = "imagefolder"` through the real binary, on a tiny folder of
//! JPEGs the test writes: training with the prefetching decode pool, bit-identical resume (and
//! the same weights whatever `data.workers`), and the errors a user sees for bad folders and
//! files — named, exit status 1, never a panic.

use std::path::Path;
use std::process::{Command, Output};

fn kutta(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kutta")).args(args).env("RUST_LOG", "warn").output().expect("run kutta")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_clean_error(o: &Output, needle: &str) {
    let e = stderr(o);
    assert_eq!(o.status.code(), Some(1), "expected exit 1, stderr: {e}");
    assert!(e.contains(needle), "stderr should mention {needle:?}: {e}");
    assert!(!e.contains("panicked"), "a user error must not panic: {e}");
}

/// A config for a small MLP on 16×16 crops of `data`, rrc-flip, rk4.
fn write_config(dir: &Path, data: &Path) -> String {
    let path = dir.join("folder.toml");
    let text = format!(
        r#"
[model]
kind = "mlp"
hidden = [32]

[data]
format = "imagefolder"
dir = "{}"
image_size = 16
augment = "rrc-flip"
prefetch_mib = 1

[train]
steps = 8
batch_size = 6
seed = 3
eval_every = 4
checkpoint_every = 2
log_every = 1

[optimizer]
kind = "rk"
tableau = "rk4"
lr = 0.05
"#,
        data.display()
    );
    std::fs::write(&path, text).unwrap();
    path.to_string_lossy().into_owned()
}

fn train(config: &str, out: &Path, sets: &[&str]) -> Output {
    let mut args = vec!["train", "--config", config, "--out", out.to_str().unwrap()];
    for s in sets {
        args.extend(["--set", s]);
    }
    kutta(&args)
}

#[test]
fn trains_and_resumes_bit_identically_with_any_worker_count() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    kutta_trainer::data::imagefolder::write_synthetic(&data, 3, 6, 2, 28, 21, 1).unwrap();
    let config = write_config(dir.path(), &data);
    let (full, half) = (dir.path().join("full"), dir.path().join("half"));
    let o = train(&config, &full, &["data.workers=3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = train(&config, &half, &["data.workers=1", "train.steps=4"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = kutta(&["train", "--resume", half.to_str().unwrap(), "--set", "train.steps=8", "--set", "data.workers=2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let a = std::fs::read(full.join("model.safetensors")).unwrap();
    let b = std::fs::read(half.join("model.safetensors")).unwrap();
    assert!(a == b, "resumed weights (1, then 2 workers) differ from the uninterrupted run (3 workers)");
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(full.join("summary.json")).unwrap()).unwrap();
    assert_eq!(s["steps"], 8);
    assert!(s["final_test_accuracy"].as_f64().is_some(), "{s}");
    // The resolved config records the new keys and the ImageNet normalisation default.
    let resolved = std::fs::read_to_string(full.join("config.toml")).unwrap();
    assert!(resolved.contains("normalize = \"imagenet\"") && resolved.contains("image_size = 16"), "{resolved}");
}

#[test]
fn bad_folders_and_files_stop_cleanly_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    kutta_trainer::data::imagefolder::write_synthetic(&data, 2, 6, 1, 20, 20, 2).unwrap();
    let config = write_config(dir.path(), &data);
    // A corrupt JPEG: found when a batch first needs it, and the run stops with its name.
    let bad = data.join("train/n00000001/train_1_00003.JPEG");
    let good = std::fs::read(&bad).unwrap();
    std::fs::write(&bad, &good[..good.len() / 3]).unwrap();
    let o = train(&config, &dir.path().join("r1"), &["train.steps=6"]);
    assert_clean_error(&o, "train_1_00003.JPEG");
    std::fs::write(&bad, &good).unwrap();
    // An empty class folder, before training.
    std::fs::create_dir_all(data.join("train/n00000009")).unwrap();
    let o = train(&config, &dir.path().join("r2"), &[]);
    assert_clean_error(&o, "n00000009");
    std::fs::remove_dir(data.join("train/n00000009")).unwrap();
    // Keys: standardize is refused for folders, and a CIFAR image size must be CIFAR's.
    let o = train(&config, &dir.path().join("r3"), &["data.normalize=standardize"]);
    assert_clean_error(&o, "data.normalize");
    let o = train(&config, &dir.path().join("r4"), &["data.format=cifar10", "data.augment=none"]);
    assert_clean_error(&o, "data.image_size");
    // No val/.
    std::fs::rename(data.join("val"), data.join("valid")).unwrap();
    let o = train(&config, &dir.path().join("r5"), &[]);
    assert_clean_error(&o, "val");
}

/// Under `mpirun` (a `--features mpi` build): 2 ranks with the global batch split 3 + 3 follow the
/// one-process trajectory (each rank decodes only its slice), and a corrupt JPEG that only one
/// rank's slice holds stops both ranks quickly, naming the file — no rank left waiting.
#[test]
fn two_ranks_match_one_process_and_stop_together_on_a_bad_file() {
    if !cfg!(feature = "mpi") {
        eprintln!("SKIPPED: kutta was built without the `mpi` feature; run cargo test --workspace --features mpi");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    kutta_trainer::data::imagefolder::write_synthetic(&data, 3, 6, 2, 28, 21, 4).unwrap();
    let config = write_config(dir.path(), &data);
    let run = |ranks: usize, out: &Path, sets: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kutta"));
        c.env("RUST_LOG", "warn").env("RAYON_NUM_THREADS", "1");
        if ranks > 1 {
            c.args(["launch", "--nproc", &ranks.to_string(), "--"]);
        }
        c.args(["train", "--config", &config, "--out", out.to_str().unwrap()]);
        for s in sets {
            c.args(["--set", s]);
        }
        c.output().unwrap()
    };
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    let sgd = ["optimizer.kind=sgd", "optimizer.lr=0.05"];
    let o = run(1, &one, &sgd);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(2, &two, &sgd);
    assert!(o.status.success(), "{}", stderr(&o));
    let weights = |d: &Path| {
        let bytes = std::fs::read(d.join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut v = Vec::new();
        let mut tensors = st.tensors();
        tensors.sort_by(|x, y| x.0.cmp(&y.0));
        for (_, t) in tensors {
            v.extend(t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64));
        }
        v
    };
    let (a, b) = (weights(&one), weights(&two));
    let scale = a.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let d = a.iter().zip(&b).fold(0.0f64, |m, (x, y)| m.max((x - y).abs())) / scale;
    assert!(d <= 1e-5, "1 vs 2 ranks: largest relative difference {d:e}");
    // Rank 1's half of step 2's batch (positions 3..6) holds the corrupt file.
    let mut sampler = kutta_trainer::data::sampler::BatchSampler::new(18, 6, 3, true);
    let (_, listing, _) = kutta_trainer::data::imagefolder::scan(&data).unwrap();
    let victim = &listing.files[sampler.batch(2)[4]];
    std::fs::write(victim, b"\xFF\xD8\xFF garbage").unwrap();
    let t0 = std::time::Instant::now();
    let o = run(2, &dir.path().join("bad"), &sgd);
    let name = victim.file_name().unwrap().to_string_lossy().into_owned();
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains(&name) && !e.contains("panicked"), "{e}");
    assert!(t0.elapsed() < std::time::Duration::from_secs(60), "took {:?}", t0.elapsed());
}

#[test]
fn bench_data_reports_decode_rates_and_whether_they_keep_up() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("photos");
    let o = kutta(&[
        "bench",
        "data",
        "--synthetic",
        data.to_str().unwrap(),
        "--synthetic-images",
        "20",
        "--width",
        "50",
        "--height",
        "40",
        "--min-seconds",
        "0.05",
        "--set",
        "model.hidden=[8]",
        "--set",
        "data.image_size=16",
        "--set",
        "data.augment=rrc-flip",
        "--set",
        "data.workers=2",
        "--set",
        "train.batch_size=4",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["per_rank_batch"], 4);
    let decode = r["decode"].as_array().unwrap();
    assert_eq!(decode.iter().map(|d| d["workers"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 2]);
    assert!(decode.iter().all(|d| d["images_per_s"].as_f64().unwrap() > 0.0), "{r}");
    let steps = r["steps"].as_array().unwrap();
    assert_eq!(steps.iter().map(|s| s["optimizer"].as_str().unwrap()).collect::<Vec<_>>(), ["sgd", "rk4"]);
    assert!(steps.iter().all(|s| s["keeps_up"].is_boolean() && s["images_per_s_needed"].as_f64().unwrap() > 0.0));
    assert!(r["machine"].as_str().is_some_and(|m| !m.is_empty()) && r["cores"].as_u64().unwrap() >= 1);
    assert_eq!(std::fs::read_dir(data.join("train")).unwrap().count(), 10);
}
