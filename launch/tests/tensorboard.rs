//! TensorBoard's own reader on a real run folder: a short Fashion-MNIST training through the real
//! binary, resumed from an older checkpoint (so the first process's events past it are orphans
//! that TensorBoard must forget), read with the `tensorboard` Python package's
//! `EventAccumulator` (its own TFRecord reader and CRC checks, its protobuf classes, its purge on
//! the SessionLog START). Every scalar must equal `metrics.jsonl`'s line at the same step, in f32,
//! and no step may come twice. The Python part needs the PyTorch venv of the README with
//! `tensorboard` installed; without it that part says SKIPPED.

mod common;

use common::{require_fashion_mnist, torch_python_with};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

const KUTTA: &str = env!("CARGO_BIN_EXE_kutta");

/// The run's scalars as TensorBoard's Python loader sees them: file version and, per tag,
/// [step, value, wall_time] in order.
const READ_EVENTS: &str = r#"
import json, sys
from tensorboard.backend.event_processing import event_accumulator as ea
acc = ea.EventAccumulator(sys.argv[1], size_guidance={ea.SCALARS: 0}, purge_orphaned_data=True)
acc.Reload()
scalars = {t: [[e.step, e.value, e.wall_time] for e in acc.Scalars(t)] for t in acc.Tags()[ea.SCALARS]}
print(json.dumps({"file_version": acc.file_version, "scalars": scalars}))
"#;

/// The metrics.jsonl key behind each TensorBoard tag (the README's table).
const TAGS: [(&str, &str); 13] = [
    ("train/loss", "train_loss"),
    ("train/h", "h"),
    ("train/grad_evals", "grad_evals"),
    ("train/epoch", "epoch"),
    ("time/wall_s", "wall_s"),
    ("time/train_s", "train_s"),
    ("test/accuracy", "test_accuracy"),
    ("test/loss", "test_loss"),
    ("dalr/v", "dalr_v"),
    ("error_control/estimate", "error_estimate"),
    ("memory/peak_rss_mib", "peak_rss_mib"),
    ("memory/peak_heap_mib", "peak_heap_mib"),
    ("memory/peak_device_mib", "peak_device_mib"),
];

fn kutta(args: &[String]) {
    let o = Command::new(KUTTA).args(args).env("RUST_LOG", "warn").output().unwrap();
    assert!(o.status.success(), "kutta {args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

fn metrics(run: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn event_files(run: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(run)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with("events.out.tfevents."))
        .collect();
    files.sort();
    files
}

/// metrics.jsonl as TensorBoard should show it: per tag, (step, value in f32).
fn expected(lines: &[serde_json::Value]) -> BTreeMap<String, Vec<(i64, f32)>> {
    let mut out: BTreeMap<String, Vec<(i64, f32)>> = BTreeMap::new();
    for l in lines {
        for (tag, key) in TAGS {
            if let Some(x) = l.get(key).and_then(|x| x.as_f64()) {
                out.entry(tag.into()).or_default().push((l["step"].as_i64().unwrap(), x as f32));
            }
        }
    }
    out
}

#[test]
fn tensorboard_reads_the_run_as_metrics_jsonl_across_a_resume() {
    require_fashion_mnist();
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let sets = [
        "model.hidden=[32]",
        "train.eval_every=20",
        "train.log_every=1",
        "train.checkpoint_every=20",
        "train.keep_checkpoints=5",
    ];
    let t0 = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    kutta(&common::train_args(&run, 60, &sets, &[]));
    let first = metrics(&run);
    assert_eq!(first.len(), 60);
    let files = event_files(&run);
    assert_eq!(files.len(), 1, "{files:?}");
    let name = files[0].file_name().unwrap().to_str().unwrap().to_string();
    assert!(name.ends_with(".kutta") && name.split('.').count() >= 7, "{name}");

    // Continue from step 40 to 100: the first process's steps 41..60 are orphans.
    let ck = run.join("checkpoint-00000040.safetensors");
    kutta(&["train".into(), "--resume".into(), ck.display().to_string(), "--set".into(), "train.steps=100".into()]);
    let lines = metrics(&run);
    let steps: Vec<i64> = lines.iter().map(|l| l["step"].as_i64().unwrap()).collect();
    assert_eq!(steps, (1..=100).collect::<Vec<_>>());
    assert_eq!(event_files(&run).len(), 2, "one event file per process");
    // The orphans differ from what replaced them (the clock), so a loader that kept them would fail.
    let wall = |ls: &[serde_json::Value], s: usize| ls[s - 1]["wall_s"].as_f64().unwrap() as f32;
    assert!((41..=60).any(|s| wall(&first, s) != wall(&lines, s)), "the test cannot tell orphans apart");

    let Some(python) = torch_python_with(&["tensorboard"]) else {
        eprintln!(
            "SKIPPED: reading the event files with TensorBoard needs its Python package \
             (~/.cache/kutta/torch-venv/bin/pip install tensorboard, or KUTTA_TORCH_PYTHON)"
        );
        return;
    };
    let o = Command::new(&python).args(["-c", READ_EVENTS]).arg(&run).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let seen: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(seen["file_version"].as_f64(), Some(2.0));
    let t1 = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let mut got: BTreeMap<String, Vec<(i64, f32)>> = BTreeMap::new();
    for (tag, points) in seen["scalars"].as_object().unwrap() {
        for p in points.as_array().unwrap() {
            let wall_time = p[2].as_f64().unwrap();
            assert!((t0 - 1.0..=t1 + 1.0).contains(&wall_time), "{tag}: wall time {wall_time} not in [{t0}, {t1}]");
            got.entry(tag.clone()).or_default().push((p[0].as_i64().unwrap(), p[1].as_f64().unwrap() as f32));
        }
    }
    let want = expected(&lines);
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>());
    for (tag, points) in &want {
        assert_eq!(&got[tag], points, "{tag}");
    }
    assert_eq!(got["test/accuracy"].iter().map(|p| p.0).collect::<Vec<_>>(), [20, 40, 60, 80, 100]);
    eprintln!(
        "TensorBoard read {} tags, {} points, equal to metrics.jsonl after the resume",
        got.len(),
        got.values().map(Vec::len).sum::<usize>()
    );
}
