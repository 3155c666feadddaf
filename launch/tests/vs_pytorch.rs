//! `kutta bench vs-pytorch` end to end: without PyTorch it still measures kutta's column, says
//! loudly that PyTorch is missing with the pip command, and exits 0; with the torch venv
//! (`~/.cache/kutta/torch-venv`, else SKIPPED) both columns are numbers. Speed is never asserted.

use std::process::{Command, Output};

mod common;

const QUICK: [&str; 8] =
    ["bench", "vs-pytorch", "--batch-sizes", "16", "--no-resnet", "--min-seconds", "0", "--min-reps"];

fn vs_pytorch(python: &str, extra: &[&str]) -> Output {
    let o = Command::new(env!("CARGO_BIN_EXE_kutta"))
        .args(QUICK)
        .args(["2", "--python", python])
        .args(extra)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run kutta");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "exit {:?}\nstderr: {err}", o.status);
    assert!(!err.contains("panicked"), "{err}");
    o
}

/// The one MLP row of the table: (kutta ms, PyTorch cell).
fn table_row(o: &Output) -> (f64, String) {
    let out = String::from_utf8_lossy(&o.stdout);
    let row =
        out.lines().find(|l| l.split_whitespace().next() == Some("16")).unwrap_or_else(|| panic!("no row: {out}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    (cells[1].parse().unwrap_or_else(|_| panic!("kutta's cell: {row}")), cells[2].to_string())
}

#[test]
fn without_torch_kutta_is_still_measured_and_the_message_is_loud() {
    common::require_fashion_mnist();
    for python in ["/nonexistent/python3", "/bin/true"] {
        let o = vs_pytorch(python, &[]);
        let (kutta_ms, pytorch) = table_row(&o);
        assert!(kutta_ms > 0.0 && pytorch == "—", "{kutta_ms} {pytorch}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("warning: PyTorch is NOT AVAILABLE"), "{err}");
        assert!(err.contains("pip install torch"), "{err}");
        assert!(String::from_utf8_lossy(&o.stdout).contains("pytorch: NOT AVAILABLE"));
    }
    // JSON and CSV say the same.
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("vs.csv");
    let o = vs_pytorch("/nonexistent/python3", &["--json", "--csv", csv.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("--json prints JSON");
    assert!(v["pytorch"].is_null() && v["pytorch_missing"].as_str().unwrap().contains("/nonexistent/python3"));
    assert!(v["rows"][0]["kutta_median_ms"].as_f64().unwrap() > 0.0);
    assert!(v["rows"][0]["pytorch_median_ms"].is_null());
    assert!(v["reproduce"].as_str().unwrap().starts_with("kutta --threads "));
    let text = std::fs::read_to_string(&csv).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[0].starts_with("model,batch_size,reps,kutta_median_ms,pytorch_median_ms"));
    assert!(lines[1].starts_with("mlp,16,"), "{text}");
}

#[test]
fn with_the_torch_venv_both_columns_are_numbers() {
    let Some(python) = common::torch_python() else {
        eprintln!("SKIPPED: no PyTorch venv at ~/.cache/kutta/torch-venv (see `kutta bench vs-pytorch --help`)");
        return;
    };
    common::require_fashion_mnist();
    let o = vs_pytorch(python.to_str().unwrap(), &["--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("--json prints JSON");
    let row = &v["rows"][0];
    assert!(row["kutta_median_ms"].as_f64().unwrap() > 0.0, "{row}");
    assert!(row["pytorch_median_ms"].as_f64().unwrap() > 0.0, "{row}");
    assert!(row["kutta_over_pytorch"].as_f64().unwrap() > 0.0, "{row}");
    assert_eq!(v["pytorch"]["threads"].as_u64(), v["kutta_threads"].as_u64(), "the same threads by default");
    assert!(v["pytorch"]["backends"].as_array().unwrap().iter().any(|l| l.as_str().unwrap().contains("mkldnn")));
    // The table too.
    let o = vs_pytorch(python.to_str().unwrap(), &[]);
    let (_, pytorch) = table_row(&o);
    assert!(pytorch.parse::<f64>().unwrap() > 0.0, "{pytorch}");
}
