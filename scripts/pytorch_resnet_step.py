#!/usr/bin/env python3
"""Time one ResNet-18 training step in PyTorch, for comparison with kutta's `model.kind = "resnet18"`:
the CIFAR ResNet-18 of `scripts/torchvision_resnet.py` (torchvision's resnet18 with a 3x3 stride-1
stem, no max-pool, base width --width, 3 input channels, 10 classes), train mode (batch-norm
statistics over the batch), on random 3x32x32 inputs: one forward + backward (mean cross-entropy)
+ optimizer update, on CPU, with the given number of threads. Times plain SGD (lr 0.01, no
momentum) and Adam (default betas); prints median milliseconds per step for each batch size,
then one JSON line with all rows. The first --warmup (default 1) steps of each row are not counted.

Also prints the torch version, thread count and which CPU backends (oneDNN/mkldnn, MKL, BLAS)
this torch build has, so a reader knows which kernels PyTorch used.

    PY=~/.cache/kutta/torch-venv/bin/python   # torch + torchvision + safetensors
    $PY scripts/pytorch_resnet_step.py --batch-sizes 128 --width 64 --min-seconds 2
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def backends():
    lines = [
        f"torch {torch.__version__}, {torch.get_num_threads()} threads "
        f"(interop {torch.get_num_interop_threads()})",
        f"torch.backends.mkldnn.is_available() = {torch.backends.mkldnn.is_available()}, "
        f"enabled = {torch.backends.mkldnn.enabled}",
        f"torch.backends.mkl.is_available() = {torch.backends.mkl.is_available()}",
        f"torch.backends.openmp.is_available() = {torch.backends.openmp.is_available()}",
    ]
    try:
        cap = torch.backends.cpu.get_cpu_capability()
        lines.append(f"torch.backends.cpu.get_cpu_capability() = {cap}")
    except AttributeError:
        pass
    keys = ("blas", "onednn", "mkl-dnn", "mkldnn", "mkl", "lapack", "openmp", "cpu capability")
    wanted = ("BLAS_INFO", "LAPACK_INFO", "USE_MKL", "USE_MKLDNN", "USE_OPENMP", "USE_NNPACK", "TORCH_VERSION")
    for line in torch.__config__.show().splitlines():
        line = line.strip()
        if line.startswith("- Build settings:"):
            # one very long line; keep only the entries about CPU kernels
            items = [i.strip() for i in line[len("- Build settings:"):].split(",")]
            items = [i for i in items if i.split("=")[0] in wanted]
            lines.append("config: - Build settings: " + ", ".join(items))
        elif any(k in line.lower() for k in keys):
            lines.append("config: " + line)
    return lines


def make_opt(name, params):
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.01)
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-3)
    raise SystemExit(f"unknown optimizer {name!r} (sgd, adam)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-sizes", default="128")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--optimizers", default="sgd,adam")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--min-seconds", type=float, default=2.0)
    ap.add_argument("--min-reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1, help="uncounted steps before timing each row")
    args = ap.parse_args()
    # Here, not at the top: `backends()` is imported by pytorch_step_server.py, whose MLP needs
    # no torchvision.
    import torchvision_resnet

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    for line in backends():
        print(line)
    loss_fn = torch.nn.CrossEntropyLoss()
    rows = []
    for opt_name in args.optimizers.split(","):
        model = torchvision_resnet.build(args.width, 3, 10).train()
        opt = make_opt(opt_name, model.parameters())
        for bs in [int(b) for b in args.batch_sizes.split(",")]:
            x = torch.randn(bs, 3, 32, 32)
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
                if step >= args.warmup:
                    times.append(ms)
                step += 1
                if len(times) >= args.min_reps and time.perf_counter() - start >= args.min_seconds:
                    break
            rows.append({"optimizer": opt_name, "width": args.width, "batch_size": bs, "reps": len(times),
                         "median_step_ms": statistics.median(times), "min_step_ms": min(times),
                         "step_ms": [round(t, 1) for t in times],
                         "threads": args.threads, "torch": torch.__version__})
            print(f"pytorch {torch.__version__} resnet18 w{args.width} {opt_name} batch {bs:>6}: "
                  f"{rows[-1]['median_step_ms']:.1f} ms/step ({len(times)} steps, {args.threads} threads)")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
