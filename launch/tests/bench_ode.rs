//! `kutta bench ode` end to end, on a block small enough for a debug build: the JSON rows, the
//! files in --out, and the one memory fact that must hold at any size — backprop keeps every
//! step's activations, the reversible solver and checkpointing do not, so at 64 steps backprop's
//! peak is the largest. Speed is never asserted (this machine is shared; sizes this small are
//! noise).

use std::path::Path;
use std::process::Command;

/// `kutta bench ode --batch 2 --width 4 --json --out OUT --min-seconds 0 --min-reps 1 ARGS…`:
/// the parsed JSON report.
fn bench_ode(out: &Path, args: &[&str]) -> serde_json::Value {
    let quick = ["bench", "ode", "--batch", "2", "--width", "4", "--json", "--min-seconds", "0", "--min-reps", "1"];
    let o = Command::new(env!("CARGO_BIN_EXE_kutta"))
        .args(quick)
        .args(["--out", out.to_str().unwrap()])
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run kutta");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "exit {:?}\nstderr: {err}", o.status);
    assert!(!err.contains("WARNING") && !err.contains("panicked"), "{err}");
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&o.stdout)))
}

fn rows(report: &serde_json::Value) -> &Vec<serde_json::Value> {
    report["rows"].as_array().expect("rows")
}

fn row<'a>(report: &'a serde_json::Value, method: &str, steps: u64) -> &'a serde_json::Value {
    rows(report).iter().find(|r| r["method"] == method && r["steps"] == steps).expect("a row per method and steps")
}

#[test]
fn rows_files_and_memory_growth() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("small");
    let report = bench_ode(&out, &["--steps", "2,4"]);
    assert_eq!(rows(&report).len(), 6, "{report:#}");
    for steps in [2, 4] {
        for method in ["backprop", "checkpoint", "reversible"] {
            let r = row(&report, method, steps);
            for key in ["seconds", "peak_mib"] {
                let v = r[key].as_f64().unwrap_or_else(|| panic!("{key}: {r}"));
                assert!(v > 0.0 && v.is_finite(), "{method} at {steps} steps: {key} = {v}");
            }
            assert!(r["reps"].as_u64().unwrap() >= 1);
        }
        // rk4: 4 evaluations a step; backprop evaluates the forward solve only, reversible two
        // increments a step forward and both again backward.
        assert_eq!(row(&report, "backprop", steps)["field_evals"], 4 * steps);
        assert_eq!(row(&report, "reversible", steps)["field_evals"], 16 * steps);
        // checkpoint: the forward solve, the schedule's recomputed steps, and each step again in
        // the backward sweep — the count the schedule predicts is the count the block makes.
        let ck = row(&report, "checkpoint", steps);
        assert_eq!(ck["field_evals"], 4 * (2 * steps + ck["recomputed_steps"].as_u64().unwrap()), "{ck}");
        let diff = row(&report, "checkpoint", steps)["rel_diff_vs_backprop"].as_f64().unwrap();
        assert!(diff <= 1e-4, "checkpoint's gradient differs from backprop's by {diff}");
    }
    assert_eq!(report["gradients_agree"], true);
    assert!(report["command"].as_str().unwrap().starts_with("kutta bench ode --width 4 --batch 2"));
    for f in ["ode.csv", "ode.svg", "ode.json"] {
        assert!(out.join(f).is_file(), "{f} missing from {}", out.display());
    }
    let csv = std::fs::read_to_string(out.join("ode.csv")).unwrap();
    assert_eq!(csv.lines().count(), 7, "{csv}");
    assert!(csv.starts_with("method,steps,"), "{csv}");
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("ode.json")).unwrap()).unwrap();
    assert_eq!(rows(&saved), rows(&report));

    // 64 steps: backprop's graph holds 256 field evaluations; the others one step's.
    let report = bench_ode(&dir.path().join("long"), &["--steps", "64"]);
    let peak = |m: &str| row(&report, m, 64)["peak_mib"].as_f64().unwrap();
    assert!(peak("backprop") > peak("reversible"), "{report:#}");
    assert!(peak("backprop") > peak("checkpoint"), "{report:#}");
}
