#!/usr/bin/env python3
"""How much a run's "best test accuracy" depends on how often it is evaluated.

The paper's Table 1 takes the maximum over evaluations at every step; kutta's studies evaluate
every N steps. From the evaluations a study made, this subsamples each run's curve to every
k·N steps and prints, per cell (runs grouped by folder name without `_seed<s>`), the mean best
accuracy for each interval: the maximum of a noisy curve grows with the number of samples.

    python3 scripts/best_vs_eval_interval.py runs/studies/table1_fmnist_mlp [--intervals 10,50,100,500]
"""
import argparse
import json
import pathlib
import re
import statistics
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("study")
    ap.add_argument("--intervals", default="10,50,100,500")
    a = ap.parse_args()
    intervals = [int(x) for x in a.intervals.split(",")]
    cells = {}
    for run in sorted(pathlib.Path(a.study, "runs").iterdir()):
        summary = run / "summary.json"
        if not summary.is_file() or json.loads(summary.read_text()).get("status") != "completed":
            continue
        evals = []
        for line in (run / "metrics.jsonl").read_text().splitlines():
            r = json.loads(line)
            if "test_accuracy" in r:
                evals.append((r["step"], r["test_accuracy"]))
        cell = re.sub(r"_seed\d+.*$", "", run.name)
        cells.setdefault(cell, []).append(evals)
    if not cells:
        sys.exit(f"no completed runs under {a.study}/runs")
    print("cell".ljust(36) + "".join(f"every {k:>4}".rjust(14) for k in intervals) + "   runs")
    for cell, runs in cells.items():
        row = []
        for k in intervals:
            bests = [max(acc for step, acc in ev if step % k == 0) for ev in runs if any(s % k == 0 for s, _ in ev)]
            row.append(f"{100 * statistics.mean(bests):.2f} %" if bests else "-")
        print(cell.ljust(36) + "".join(v.rjust(14) for v in row) + f"   {len(runs)}")


if __name__ == "__main__":
    main()
