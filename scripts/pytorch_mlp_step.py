#!/usr/bin/env python3
"""Time the same training step in PyTorch that `kutta bench steps` times: the MLP 784-500-500-500-10
(ReLU, cross-entropy, mean over the batch), one forward + backward + SGD update, on CPU, with the
same number of threads. Prints median milliseconds per step for each batch size.

    python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch
    /tmp/torchenv/bin/python scripts/pytorch_mlp_step.py --batch-sizes 16,128,1024,8192
Compare with: kutta bench steps --batch-sizes 16,128,1024,8192   (the `sgd` rows)
"""
import argparse
import json
import os
import statistics
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-sizes", default="16,128,1024,8192")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--min-seconds", type=float, default=2.0)
    ap.add_argument("--min-reps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layers = []
    widths = [784, 500, 500, 500, 10]
    for i in range(4):
        layers.append(torch.nn.Linear(widths[i], widths[i + 1]))
        if i < 3:
            layers.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*layers)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = torch.nn.CrossEntropyLoss()
    rows = []
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        x = torch.rand(bs, 784)
        y = torch.randint(0, 10, (bs,))
        times = []
        start = time.perf_counter()
        step = 0
        while True:
            t = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            ms = (time.perf_counter() - t) * 1e3
            if step > 0:  # warm-up
                times.append(ms)
            step += 1
            if len(times) >= args.min_reps and time.perf_counter() - start >= args.min_seconds:
                break
        rows.append({"batch_size": bs, "reps": len(times), "median_step_ms": statistics.median(times)})
        print(f"pytorch {torch.__version__} sgd batch {bs:>6}: {rows[-1]['median_step_ms']:.3f} ms/step ({len(times)} steps, {args.threads} threads)")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
