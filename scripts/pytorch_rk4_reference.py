#!/usr/bin/env python3
"""An independent float64 reference of kutta's RK4 trajectory: the Fashion-MNIST MLP trained by
classical RK4 on a fixed full batch (the first --subset training images, pixels / 255), written
with PyTorch autograd in float64 — nothing shared with kutta but the weights file format.

1. `--write-init FILE`: PyTorch's default nn.Linear initialisation (seed --seed), rounded to
   float32, saved as safetensors with kutta's (= PyTorch's) tensor names `layers.{i}.weight` /
   `layers.{i}.bias`. kutta starts from it with `--set model.init=FILE`.
2. `--init FILE --out FILE`: --steps RK4 steps of size --lr on
   L(θ) = mean over the batch of cross-entropy, θ' = θ + h/6 (k1 + 2 k2 + 2 k3 + k4),
   k_i = −∇L(θ + h a_i k_{i−1}), from the float32 weights of FILE, in float64; the final weights
   are saved (float64) to --out.

    PY=~/.cache/kutta/torch-venv/bin/python
    $PY scripts/pytorch_rk4_reference.py --write-init /tmp/init.safetensors
    kutta train --config configs/fashion_mnist_mlp.toml --set model.init=/tmp/init.safetensors \\
        --set data.train_subset=64 --set train.batch_size=64 --set data.shuffle=false \\
        --set train.steps=5 --set optimizer.lr=0.05 --out /tmp/k
    $PY scripts/pytorch_rk4_reference.py --init /tmp/init.safetensors --steps 5 --lr 0.05 \\
        --subset 64 --out /tmp/torch.safetensors --compare /tmp/k/model.safetensors

`launch/tests/pytorch_reference.rs` runs exactly this (skipping loudly without torch).
"""
import argparse
import gzip
import json
import os
import struct

import torch
from safetensors.torch import load_file, save_file

WIDTHS = [784, 500, 500, 500, 10]


def read_idx(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return torch.frombuffer(bytearray(data[4 + 4 * ndim :]), dtype=torch.uint8).reshape(dims)


def find(directory, stem):
    for name in (stem, stem + ".gz"):
        p = os.path.join(directory, name)
        if os.path.exists(p):
            return p
    raise SystemExit(f"{stem}(.gz) not found in {directory}")


def loss_and_grad(params, x, y):
    h = x
    for i in range(len(WIDTHS) - 1):
        h = h @ params[2 * i].T + params[2 * i + 1]
        if i + 1 < len(WIDTHS) - 1:
            h = torch.relu(h)
    loss = torch.nn.functional.cross_entropy(h, y)
    grads = torch.autograd.grad(loss, params)
    return loss.item(), grads


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--subset", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write-init")
    ap.add_argument("--init")
    ap.add_argument("--out")
    ap.add_argument("--compare", help="kutta's model.safetensors: print the relative differences as JSON")
    args = ap.parse_args()
    names = [f"layers.{i}.{k}" for i in range(len(WIDTHS) - 1) for k in ("weight", "bias")]

    if args.write_init:
        torch.manual_seed(args.seed)
        layers = [torch.nn.Linear(WIDTHS[i], WIDTHS[i + 1]) for i in range(len(WIDTHS) - 1)]
        tensors = {}
        for i, layer in enumerate(layers):
            tensors[f"layers.{i}.weight"] = layer.weight.detach().float().contiguous()
            tensors[f"layers.{i}.bias"] = layer.bias.detach().float().contiguous()
        save_file(tensors, args.write_init)
        return

    init = load_file(args.init)
    theta0 = [init[n].double() for n in names]
    images = read_idx(find(args.data, "train-images-idx3-ubyte"))[: args.subset]
    labels = read_idx(find(args.data, "train-labels-idx1-ubyte"))[: args.subset].long()
    x = images.reshape(args.subset, -1).double() / 255.0
    h = args.lr
    theta = [t.clone().requires_grad_(True) for t in theta0]
    losses = []
    for _ in range(args.steps):
        def k_at(offset):
            point = [(t + h * o).detach().requires_grad_(True) for t, o in zip(theta, offset)] if offset else theta
            loss, g = loss_and_grad(point, x, labels)
            return loss, [-gi for gi in g]

        loss, k1 = k_at(None)
        _, k2 = k_at([0.5 * k for k in k1])
        _, k3 = k_at([0.5 * k for k in k2])
        _, k4 = k_at(k3)
        losses.append(loss)
        theta = [
            (t + h / 6.0 * (a + 2.0 * b + 2.0 * c + d)).detach().requires_grad_(True)
            for t, a, b, c, d in zip(theta, k1, k2, k3, k4)
        ]
    final = {n: t.detach().contiguous() for n, t in zip(names, theta)}
    if args.out:
        save_file(final, args.out)
    if args.compare:
        kutta = load_file(args.compare)
        diff = sum(((kutta[n].double() - final[n]) ** 2).sum().item() for n in names) ** 0.5
        moved = sum(((final[n] - t0) ** 2).sum().item() for n, t0 in zip(names, theta0)) ** 0.5
        norm = sum((final[n] ** 2).sum().item() for n in names) ** 0.5
        worst = max((kutta[n].double() - final[n]).abs().max().item() for n in names)
        print(json.dumps({
            "losses": losses,
            "diff_over_motion": diff / moved,
            "diff_over_norm": diff / norm,
            "max_abs_diff": worst,
            "motion": moved,
        }))


if __name__ == "__main__":
    main()
