//! `kutta study` end to end through the binary on real data (Fashion-MNIST): a study of 2 seeds ×
//! 2 optimizers is stopped by SIGTERM halfway, started again (the interrupted run resumes, the
//! others start, nothing runs twice), started a third time (nothing to do); its aggregates are
//! recomputed here from the runs' metrics.jsonl; the report's HTML parses without an error and
//! every SVG, as a file and inlined in the HTML, is well-formed XML. `kutta plot` writes SVG and
//! PNG.

mod common;

use common::{repo_path, require_fashion_mnist};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn kutta() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kutta"))
}

const STUDY: &str = r#"
description = "A test study: two optimizers, two seeds."
base = "BASE"
seeds = [3, 4]
set = { "train.steps" = 400, "train.eval_every" = 50, "train.checkpoint_every" = 50, "train.log_every" = 10, "model.hidden" = [128] }

[[axis]]
name = "optimizer"
values = [
  { label = "rk4 h=0.01", "optimizer.kind" = "rk", "optimizer.lr" = 0.01 },
  { label = "adam", "optimizer.kind" = "adam", "optimizer.lr" = 0.001 },
]

[[target]]
metric = "test_accuracy"
value = 0.7

[[paper]]
where = { optimizer = "adam" }
best_test_accuracy = 0.856
source = "Table 1"
"#;

fn write_study(dir: &Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("tiny.toml");
    std::fs::write(&path, text.replace("BASE", &repo_path("configs/fashion_mnist_mlp.toml"))).unwrap();
    path
}

fn json_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn csv(path: &Path) -> Vec<std::collections::BTreeMap<String, String>> {
    // Our CSV quotes only the text columns, which hold no commas here.
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    let head: Vec<String> = lines.next().unwrap().split(',').map(String::from).collect();
    lines.map(|l| head.iter().cloned().zip(l.split(',').map(|v| v.trim_matches('"').to_string())).collect()).collect()
}

fn close(a: f64, b: &str) -> bool {
    let b: f64 = b.parse().unwrap();
    (a - b).abs() <= 1e-12 * a.abs().max(1.0)
}

#[test]
fn a_study_runs_resumes_aggregates_and_reports() {
    require_fashion_mnist();
    let tmp = tempfile::tempdir().unwrap();
    let file = write_study(tmp.path(), STUDY);
    let out = tmp.path().join("study");
    let runs = out.join("runs");
    let names = ["rk4-h=0.01_seed3", "adam_seed3", "rk4-h=0.01_seed4", "adam_seed4"];

    // 1. Stopped by SIGTERM once the first run has a checkpoint (one run at a time: the others
    // have not started).
    let child = kutta()
        .args(["study", "--config", file.to_str().unwrap(), "--out", out.to_str().unwrap(), "--jobs", "1"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let first = runs.join(names[0]);
    let t0 = Instant::now();
    while !std::fs::read_dir(&first)
        .map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().starts_with("checkpoint-")))
        .unwrap_or(false)
    {
        assert!(t0.elapsed() < Duration::from_secs(120), "no checkpoint in {}", first.display());
        std::thread::sleep(Duration::from_millis(20));
    }
    Command::new("kill").args(["-s", "TERM", &child.id().to_string()]).status().unwrap();
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(143), "{err}");
    assert!(err.contains("SIGTERM received: stopping 1 running run"), "{err}");
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(first.join("summary.json")).unwrap()).unwrap();
    assert_eq!(s["status"], "interrupted", "{s}");
    let stopped_at = s["steps"].as_u64().unwrap();
    assert!(stopped_at < 400);
    for n in &names[1..] {
        assert!(!runs.join(n).join("summary.json").exists(), "{n} ran before its turn");
    }

    // 2. Started again: the interrupted run resumes, the others start; all complete.
    let o = kutta()
        .args(["study", "--config", file.to_str().unwrap(), "--out", out.to_str().unwrap(), "--jobs", "2"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains(&format!("{} resuming from step {stopped_at}", names[0])), "{err}");
    assert_eq!(err.matches(" starting (log").count(), 3, "{err}");
    assert!(err.contains("4 runs finished now, 0 were complete before, 0 diverged (now or before), 0 failed"), "{err}");
    for n in names {
        let s: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(runs.join(n).join("summary.json")).unwrap()).unwrap();
        assert_eq!(s["status"], "completed", "{n}: {s}");
    }
    // The resumed run's metrics continue where it stopped: one line per logged step.
    let steps: Vec<u64> =
        json_lines(&first.join("metrics.jsonl")).iter().map(|l| l["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=40).map(|i| 10 * i).collect::<Vec<u64>>());

    // 3. A third time: nothing to do.
    let o =
        kutta().args(["study", "--config", file.to_str().unwrap(), "--out", out.to_str().unwrap()]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("4 complete, 0 to run"), "{err}");

    // Aggregates, recomputed from the metrics.
    let mut per_run = std::collections::BTreeMap::new();
    for n in names {
        let lines = json_lines(&runs.join(n).join("metrics.jsonl"));
        let evals: Vec<&serde_json::Value> = lines.iter().filter(|l| l.get("test_accuracy").is_some()).collect();
        let acc: Vec<f64> = evals.iter().map(|l| l["test_accuracy"].as_f64().unwrap()).collect();
        let best = acc.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let last = *acc.last().unwrap();
        let hit = evals.iter().find(|l| l["test_accuracy"].as_f64().unwrap() >= 0.7);
        let steps = hit.map_or(f64::INFINITY, |l| l["step"].as_f64().unwrap());
        let time = hit.map_or(f64::INFINITY, |l| l["train_s"].as_f64().unwrap());
        assert!(hit.is_some(), "{n}: never reached 70 %: {acc:?}");
        // AlgoPerf's clock excludes evaluation: less than the wall clock at the same line.
        assert!(time < hit.unwrap()["wall_s"].as_f64().unwrap());
        per_run.insert(n, (best, last, steps, time));
    }
    let cells = csv(&out.join("cells.csv"));
    assert_eq!(cells.len(), 2);
    for (cell, prefix) in cells.iter().zip(["rk4-h=0.01", "adam"]) {
        let rs: Vec<&(f64, f64, f64, f64)> =
            per_run.iter().filter(|(n, _)| n.starts_with(&format!("{prefix}_"))).map(|(_, v)| v).collect();
        assert_eq!(rs.len(), 2);
        let mean = |f: fn(&(f64, f64, f64, f64)) -> f64| (f(rs[0]) + f(rs[1])) / 2.0;
        // The standard error of two values: |a − b| / 2.
        let se = |f: fn(&(f64, f64, f64, f64)) -> f64| (f(rs[0]) - f(rs[1])).abs() / 2.0;
        assert!(close(mean(|r| r.0), &cell["best_mean"]), "{cell:?}");
        assert!(close(se(|r| r.0), &cell["best_se"]), "{cell:?}");
        assert!(close(mean(|r| r.1), &cell["final_mean"]), "{cell:?}");
        assert!(close(se(|r| r.1), &cell["final_se"]), "{cell:?}");
        // Medians of two values: their mean.
        assert!(close(mean(|r| r.2), &cell["target0_steps"]), "{cell:?}");
        assert!(close(mean(|r| r.3), &cell["target0_train_s"]), "{cell:?}");
        assert_eq!(cell["target0_reached"], "2");
        assert_eq!(cell["completed"], "2");
    }
    // RK4 counts four gradient evaluations per step.
    let rk = &cells[0];
    assert!(close(4.0 * rk["target0_steps"].parse::<f64>().unwrap(), &rk["target0_grad_evals"]), "{rk:?}");

    // The report: the table with the paper's number beside its cell, the figures, valid markup.
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("| adam | 2/2 |"), "{md}");
    assert!(md.contains("85.60 % / – (Table 1)"), "{md}");
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    let doc = scraper::Html::parse_document(&html);
    assert!(doc.errors.is_empty(), "report.html: {:?}", doc.errors);
    let svgs: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "svg"))
        .collect();
    assert_eq!(svgs.len(), 6, "{svgs:?}");
    for p in &svgs {
        let text = std::fs::read_to_string(p).unwrap();
        roxmltree::Document::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(md.contains(&format!("]({})", p.file_name().unwrap().to_string_lossy())));
    }
    let inline: Vec<&str> =
        html.match_indices("<svg").map(|(i, _)| &html[i..i + html[i..].find("</svg>").unwrap() + 6]).collect();
    assert_eq!(inline.len(), svgs.len());
    for s in inline {
        roxmltree::Document::parse(s).unwrap();
    }

    // kutta plot over the run folders: SVG and PNG.
    let dirs: Vec<String> = names.iter().map(|n| runs.join(n).to_string_lossy().into_owned()).collect();
    // The field names of metrics.jsonl are accepted as well as the flags' kebab-case.
    for (file, x, y) in [
        ("p.svg", "grad-evals", "test-accuracy"),
        ("p.png", "wall", "train-loss"),
        ("q.svg", "grad_evals", "train_loss"),
    ] {
        let target = tmp.path().join(file);
        let o = kutta()
            .arg("plot")
            .args(&dirs)
            .args(["--x", x, "--y", y, "--out", target.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let bytes = std::fs::read(&target).unwrap();
        if file.ends_with(".png") {
            assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        } else {
            let text = String::from_utf8(bytes).unwrap();
            roxmltree::Document::parse(&text).unwrap();
            assert!(text.contains("adam_seed4"));
        }
    }
}

#[test]
fn study_mistakes_are_errors_naming_the_key_or_folder() {
    require_fashion_mnist();
    let tmp = tempfile::tempdir().unwrap();
    let run = |text: &str| {
        let file = write_study(tmp.path(), text);
        let o = kutta()
            .args(["study", "--config", file.to_str().unwrap(), "--out", tmp.path().join("s").to_str().unwrap()])
            .output()
            .unwrap();
        (o.status.code(), String::from_utf8_lossy(&o.stderr).into_owned())
    };
    let (code, err) = run("base = \"BASE\"\nseeds = [0]\nbogus = 3\n");
    assert_eq!(code, Some(1));
    assert!(err.contains("error:") && err.contains("bogus") && err.contains("tiny.toml"), "{err}");
    // A config key the trainer does not know: named before any run starts.
    let (code, err) = run("base = \"BASE\"\n[[axis]]\nkey = \"optimizer.lrr\"\nvalues = [0.1]\n");
    assert_eq!(code, Some(1));
    assert!(err.contains("optimizer.lrr"), "{err}");
    assert!(!tmp.path().join("s/runs/0.1_seed0/config.toml").exists());
    // A run folder made by another version of the study file: an error naming it and the key.
    let folder = tmp.path().join("s/runs/run_seed0");
    std::fs::create_dir_all(&folder).unwrap();
    let o = kutta()
        .args(["train", "--config", &repo_path("configs/fashion_mnist_mlp.toml"), "--out", folder.to_str().unwrap()])
        .args(["--set", "train.steps=1", "--set", "train.eval_every=0", "--set", "model.hidden=[8]"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (code, err) = run("base = \"BASE\"\nset = { \"train.steps\" = 1, \"model.hidden\" = [16] }\n");
    assert_eq!(code, Some(1));
    assert!(err.contains("run_seed0") && err.contains("model.hidden"), "{err}");
}

/// A run whose step is far too large diverges (non-finite values after the step-halving
/// retries): the study still succeeds, the report says in which step the run stopped, and a study
/// started again keeps it instead of running it again.
#[test]
fn a_diverged_run_is_a_result_kept_on_restart() {
    require_fashion_mnist();
    let tmp = tempfile::tempdir().unwrap();
    let file = write_study(
        tmp.path(),
        r#"
base = "BASE"
seeds = [0]
set = { "train.steps" = 20, "train.eval_every" = 10, "train.checkpoint_every" = 10, "train.log_every" = 1, "model.hidden" = [32] }

[[axis]]
name = "optimizer"
values = [
  { label = "rk4 huge", "optimizer.kind" = "rk", "optimizer.lr" = 1e20 },
  { label = "rk4", "optimizer.kind" = "rk", "optimizer.lr" = 0.01 },
]
"#,
    );
    let out = tmp.path().join("s");
    let study = |extra: &[&str]| {
        let o = kutta()
            .args(["study", "--config", file.to_str().unwrap(), "--out", out.to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap();
        // Progress and summary lines go to stderr, the --dry-run listing to stdout.
        (o.status.code(), String::from_utf8_lossy(&o.stderr).into_owned() + &String::from_utf8_lossy(&o.stdout))
    };
    let (code, err) = study(&[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("rk4-huge_seed0 diverged at step "), "{err}");
    assert!(err.contains("1 diverged (now or before), 0 failed"), "{err}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("runs/rk4-huge_seed0/summary.json")).unwrap()).unwrap();
    let status = summary["status"].as_str().unwrap();
    assert!(status.contains(": non-finite values: "), "{status}");
    let step = status.trim_start_matches("failed at step ").split(':').next().unwrap().to_string();
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains(&format!("| `rk4-huge_seed0` | failed at step {step}: non-finite values |")), "{report}");
    assert!(report.contains("| `rk4_seed0` | completed |"), "{report}");

    let (code, listing) = study(&["--dry-run"]);
    assert_eq!(code, Some(0), "{listing}");
    assert!(
        listing.lines().any(|l| l.starts_with("rk4-huge_seed0") && l.contains(&format!("diverged@{step}"))),
        "{listing}"
    );
    let (code, err) = study(&[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("0 runs finished now, 2 were complete before, 1 diverged"), "{err}");
}
