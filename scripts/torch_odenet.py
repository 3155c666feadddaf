#!/usr/bin/env python3
"""Reference check of kutta's `model.kind = "odenet"` against an independent PyTorch version.

kutta's `model.safetensors` for an odenet uses PyTorch's names and shapes: `stem.0`, `stem.1`
(nn.Conv2d 3x3, stride 2, padding 1), `ode.conv1`, `ode.conv2` (nn.Conv2d 3x3, padding 1, with
the time as an extra input channel in front), `head` (nn.Linear). This script builds that model
in PyTorch, loads the file with `load_state_dict(strict=True)` and integrates the ODE block with
its own Runge-Kutta loop: the plain method (kutta's backprop and checkpoint gradients) or the
McCallum-Foster reversible scheme (kutta's reversible gradient),

    y_{n+1} = lam*y_n + (1 - lam)*z_n + Psi_h(t_n, z_n),   z_{n+1} = z_n - Psi_{-h}(t_{n+1}, y_{n+1}),

and differentiates it with plain autograd in float64 (backprop through every step): an
independent reference for kutta's reconstructed (reversible) or recomputed (checkpoint) gradients.

Modes (run with the venv that has torch + safetensors):

    PY=~/.cache/kutta/torch-venv/bin/python
    # eval-mode logits: io.safetensors holds x [n,C,H,W] f32 and logits [n,K] f32 (kutta's)
    $PY scripts/torch_odenet.py check --weights model.safetensors --inputs io.safetensors \
        --tableau '{"a": [[0,0],[1,0]], "b": [0.5,0.5]}' --steps 4 --time 1 [--coupling 0.999]
    # gradients: io.safetensors also holds y [n]; grads.safetensors holds kutta's gradient of the
    # mean cross-entropy for every parameter name (and "loss")
    $PY scripts/torch_odenet.py train-grad --weights w.safetensors --inputs io.safetensors \
        --grads grads.safetensors --tableau ... --steps 4 --time 1 [--coupling 0.999]

Without --coupling the plain method is used. Each mode prints one line of JSON and exits 0 on
success, 1 (with a message on stderr) on failure.
"""
import argparse
import json
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file


class Field(nn.Module):
    """f(t, y) = conv2([t, tanh(conv1([t, y]))]) with the time as a constant channel in front."""

    def __init__(self, width):
        super().__init__()
        self.conv1 = nn.Conv2d(width + 1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width + 1, width, 3, padding=1)

    def forward(self, t, y):
        tc = torch.full_like(y[:, :1], t)
        u = torch.tanh(self.conv1(torch.cat([tc, y], 1)))
        return self.conv2(torch.cat([tc, u], 1))


class ODENet(nn.Module):
    def __init__(self, channels, width, classes, tableau, steps, time, coupling):
        super().__init__()
        self.stem = nn.ModuleList([nn.Conv2d(channels, width, 3, stride=2, padding=1),
                                   nn.Conv2d(width, width, 3, stride=2, padding=1)])
        self.ode = Field(width)
        self.head = nn.Linear(width, classes)
        self.a, self.b = tableau["a"], tableau["b"]
        self.c = [sum(row) for row in self.a]
        self.steps, self.time, self.coupling = steps, time, coupling

    def increment(self, t, h, y):
        ks = []
        for i in range(len(self.b)):
            yi = y
            for j in range(i):
                if self.a[i][j] != 0:
                    yi = yi + h * self.a[i][j] * ks[j]
            ks.append(self.ode(t + self.c[i] * h, yi))
        return h * sum(bi * k for bi, k in zip(self.b, ks) if bi != 0)

    def solve(self, x):
        n, T = self.steps, self.time
        h = T / n
        if self.coupling is None:
            y = x
            for i in range(n):
                y = y + self.increment(T * i / n, h, y)
            return y
        lam, y, z = self.coupling, x, x
        for i in range(n):
            y = lam * y + (1 - lam) * z + self.increment(T * i / n, h, z)
            z = z - self.increment(T * (i + 1) / n, -h, y)
        return y

    def forward(self, x):
        s = F.relu(self.stem[1](F.relu(self.stem[0](x))))
        return self.head(self.solve(s).mean(dim=(2, 3)))


def load(args):
    state = {k: v.double() for k, v in load_file(args.weights).items()}
    width, channels = state["stem.0.weight"].shape[:2]
    classes = state["head.weight"].shape[0]
    model = ODENet(channels, width, classes, json.loads(args.tableau), args.steps, args.time, args.coupling).double()
    model.load_state_dict(state, strict=True)
    return model


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def check(args):
    io = load_file(args.inputs)
    model = load(args)
    with torch.no_grad():
        logits = model(io["x"].double())
    err = rel(io["logits"].double(), logits)
    same = (io["logits"].argmax(1) == logits.argmax(1)).float().mean().item()
    res = {"mode": "check", "logits_rel_err": err, "same_class": same, "tol": args.tol, "ok": err <= args.tol}
    return res, None if res["ok"] else f"logits differ by {err:.3e} (tol {args.tol})"


def train_grad(args):
    io = load_file(args.inputs)
    x = io["x"].double()
    y = io["y"].reshape(-1).to(torch.int64)
    model = load(args)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    grads = load_file(args.grads)
    per = {name: rel(grads[name].double(), p.grad) for name, p in model.named_parameters()}
    worst = max(per, key=per.get)
    res = {"mode": "train-grad", "loss": loss.item(), "tensors": len(per), "worst_tensor": worst,
           "worst_rel_err": per[worst], "tol": args.tol}
    if "loss" in grads:
        res["kutta_loss"] = grads["loss"].item()
        res["loss_rel_err"] = abs(res["kutta_loss"] - loss.item()) / abs(loss.item())
    res["ok"] = per[worst] <= args.tol and res.get("loss_rel_err", 0.0) <= args.tol
    return res, None if res["ok"] else f"gradient of {worst} differs by {per[worst]:.3e} (tol {args.tol})"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["check", "train-grad"])
    p.add_argument("--weights", required=True)
    p.add_argument("--inputs", required=True)
    p.add_argument("--grads")
    p.add_argument("--tableau", required=True, help='JSON {"a": [[...]], "b": [...]}')
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--time", type=float, default=1.0)
    p.add_argument("--coupling", type=float, default=None, help="the reversible scheme's lambda (else plain)")
    p.add_argument("--tol", type=float, default=1e-4)
    args = p.parse_args()
    torch.set_num_threads(1)
    res, err = (check if args.mode == "check" else train_grad)(args)
    print(json.dumps(res))
    if err:
        print(err, file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
