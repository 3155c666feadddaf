#!/usr/bin/env python3
"""Reference check of kutta's `model.kind = "resnet18"` (CIFAR ResNet-18) against torchvision.

The reference model is torchvision's own `resnet18` with the usual CIFAR changes: conv1 is a
3x3 stride-1 padding-1 conv without bias on C input channels, no max-pool, and (for a base width
w != 64) bn1 and layer1..layer4 rebuilt with torchvision's `_make_layer(BasicBlock, ...)` at
widths w, 2w, 4w, 8w and fc = Linear(8w, K). kutta's `model.safetensors` uses exactly the
state_dict names and shapes of this model, so it loads with `load_state_dict(strict=True)`.

Modes (run with the venv that has torch + torchvision + safetensors):

    PY=~/.cache/kutta/torch-venv/bin/python

    # eval-mode logits: io.safetensors holds x [n,C,H,W] f32 and logits [n,K] f32 (kutta's output)
    $PY scripts/torchvision_resnet.py check --weights model.safetensors --inputs io.safetensors \
        [--width W] [--tol 1e-4]

    # additionally train-mode gradients: io.safetensors also holds y [n] (int64 or f32);
    # grad.safetensors holds kutta's gradient of mean cross-entropy (batch-norm statistics over
    # the whole batch) for every parameter name; `logits` in io.safetensors is optional here
    $PY scripts/torchvision_resnet.py train-grad --weights model.safetensors \
        --inputs io.safetensors --grads grad.safetensors [--tol 1e-4] [--grad-tol 1e-4]

    # write a fixture made by torch (weights with non-trivial batch-norm statistics, inputs,
    # labels, eval logits, train-mode gradients) for testing kutta's loader and kernels
    $PY scripts/torchvision_resnet.py make-fixture --out-dir /tmp/fx --width 8 \
        --in-channels 1 --classes 10 --n 4 --size 28

Torch runs in float64 (model.double()). `check` compares max |delta logit| relative to max
|torch logit| with --tol, and the argmax of every sample (a disagreement where torch's top two
logits lie within tol*max|logit| of each other counts as a tie and is not a failure).
`train-grad` compares each parameter's gradient, max |delta| relative to that tensor's max
|torch grad|, with --grad-tol and names the worst tensor. Each mode prints one line of JSON and
exits 0 on success, 1 (with a message on stderr) on failure. Extra safetensors metadata
(e.g. checksums) is ignored.

Importable: `build(width, in_channels, num_classes)` returns the torch module.
"""
import argparse
import json
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torchvision.models import resnet18
from torchvision.models.resnet import BasicBlock


def build(width=64, in_channels=3, num_classes=10):
    """torchvision resnet18 in its CIFAR form (3x3 stem, no max-pool), base width `width`."""
    w = int(width)
    m = resnet18(num_classes=num_classes)
    m.conv1 = nn.Conv2d(in_channels, w, kernel_size=3, stride=1, padding=1, bias=False)
    m.maxpool = nn.Identity()
    if w != 64:
        m.bn1 = m._norm_layer(w)
        m.inplanes = w
        m.layer1 = m._make_layer(BasicBlock, w, 2)
        m.layer2 = m._make_layer(BasicBlock, 2 * w, 2, stride=2)
        m.layer3 = m._make_layer(BasicBlock, 4 * w, 2, stride=2)
        m.layer4 = m._make_layer(BasicBlock, 8 * w, 2, stride=2)
        m.fc = nn.Linear(8 * w, num_classes)
    # the same initialisation torchvision's ResNet.__init__ applies to its own modules
    for mod in m.modules():
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
    return m


def infer_shape(state):
    """(in_channels C, classes K, width w) from a state_dict's shapes."""
    conv1 = state["conv1.weight"]
    fc = state["fc.weight"]
    w, c = int(conv1.shape[0]), int(conv1.shape[1])
    k = int(fc.shape[0])
    if tuple(conv1.shape[2:]) != (3, 3):
        raise ValueError(f"conv1.weight has shape {list(conv1.shape)}; the CIFAR stem is [w, C, 3, 3]")
    if int(fc.shape[1]) != 8 * w:
        raise ValueError(f"fc.weight has shape {list(fc.shape)}; expected [K, 8*{w}] for width {w}")
    return c, k, w


def load_weights(path, width=None):
    """Build the model for the weights file and load it strictly; returns (model, C, K, w)."""
    state = load_file(path)
    for key in ("conv1.weight", "fc.weight"):
        if key not in state:
            raise ValueError(f"{path}: no tensor named {key!r} (found {len(state)} tensors)")
    c, k, w = infer_shape(state)
    if width is not None and int(width) != w:
        raise ValueError(f"--width {width} but conv1.weight has {w} output channels")
    fixed = {}
    for name, t in state.items():
        if name.endswith("num_batches_tracked"):
            fixed[name] = t.to(torch.int64).reshape(())
        else:
            fixed[name] = t.to(torch.float32)
    model = build(w, c, k)
    model.load_state_dict(fixed, strict=True)
    return model, c, k, w


def _labels(y, n):
    y = y.reshape(-1)
    if y.is_floating_point():
        if not torch.equal(y, y.round()):
            raise ValueError("y holds non-integer values")
    y = y.to(torch.int64)
    if y.numel() != n:
        raise ValueError(f"y has {y.numel()} labels for {n} samples")
    return y


def compare_logits(model, x, logits, tol):
    """Eval-mode float64 comparison; returns (result dict, failure message or None)."""
    model = model.double().eval()
    with torch.no_grad():
        ref = model(x.double())
    got = logits.double()
    if got.shape != ref.shape:
        return {"mode": "check", "ok": False}, f"logits shape {list(got.shape)} but torch gives {list(ref.shape)}"
    scale = ref.abs().max().item()
    max_abs = (got - ref).abs().max().item()
    rel = max_abs / scale if scale > 0 else max_abs
    a_got = got.argmax(dim=1)
    a_ref = ref.argmax(dim=1)
    agree = (a_got == a_ref)
    # a disagreement is a tie when torch's logits at both indices are within tol*scale
    gap = (ref.gather(1, a_ref[:, None]) - ref.gather(1, a_got[:, None]))[:, 0].abs()
    ties = (~agree) & (gap <= tol * max(scale, 1e-30))
    bad = int(((~agree) & ~ties).sum())
    n = int(ref.shape[0])
    res = {
        "mode": "check", "n": n, "classes": int(ref.shape[1]),
        "max_abs_logit": scale, "max_abs_diff": max_abs, "rel_err": rel, "tol": tol,
        "argmax_agree": float(agree.double().mean()) if n else 1.0,
        "argmax_ties": int(ties.sum()), "argmax_disagree": bad,
    }
    msgs = []
    if not rel <= tol:
        msgs.append(f"logits differ: max |delta| {max_abs:.3e} = {rel:.3e} of max |logit| {scale:.3e} > tol {tol:g}")
    if bad:
        msgs.append(f"argmax differs on {bad} of {n} samples")
    res["ok"] = not msgs
    return res, ("; ".join(msgs) or None)


def train_grads(model, x, y):
    """Torch's float64 train-mode gradient of mean cross-entropy: (loss, {name: grad})."""
    model = model.double().train()
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x.double()), y)
    loss.backward()
    return loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def compare_grads(model, x, y, grads, tol, kutta_loss=None):
    loss, ref = train_grads(model, x, y)
    per = {}
    msgs = []
    for name, g_ref in ref.items():
        if name not in grads:
            msgs.append(f"no gradient for {name}")
            continue
        g = grads[name].double()
        if g.shape != g_ref.shape:
            msgs.append(f"{name}: gradient shape {list(g.shape)} but parameter is {list(g_ref.shape)}")
            continue
        scale = g_ref.abs().max().item()
        d = (g - g_ref).abs().max().item()
        per[name] = (d / scale if scale > 0 else d, d, scale)
    extra = sorted(set(grads) - set(ref) - {"loss"})
    worst = max(per, key=lambda n: per[n][0]) if per else None
    res = {
        "mode": "train-grad", "loss": loss, "tensors": len(per), "grad_tol": tol,
        "worst_tensor": worst,
        "worst_rel_err": per[worst][0] if worst else None,
        "worst_max_abs_diff": per[worst][1] if worst else None,
        "worst_max_abs_grad": per[worst][2] if worst else None,
        "failing_tensors": sorted(n for n in per if not per[n][0] <= tol),
        "ignored_extra_names": extra,
    }
    if kutta_loss is not None:
        res["kutta_loss"] = kutta_loss
        res["loss_rel_err"] = abs(kutta_loss - loss) / max(abs(loss), 1e-30)
        if not res["loss_rel_err"] <= tol:
            msgs.append(f"loss {kutta_loss!r} but torch gives {loss!r}")
    if res["failing_tensors"]:
        msgs.append(f"{len(res['failing_tensors'])} gradient tensors differ; worst {worst}: "
                    f"{per[worst][0]:.3e} of its max |grad| > tol {tol:g}")
    res["ok"] = not msgs
    return res, ("; ".join(msgs) or None)


def _load_io(path, c):
    io = load_file(path)
    if "x" not in io:
        raise ValueError(f"{path}: no tensor named 'x'")
    x = io["x"]
    if x.dim() != 4 or int(x.shape[1]) != c:
        raise ValueError(f"x has shape {list(x.shape)}; expected [n, {c}, H, W]")
    return io, x


def _finish(results, msgs):
    ok = all(r.get("ok") for r in results)
    out = results[0] if len(results) == 1 else {"ok": ok, **{r["mode"]: r for r in results}}
    print(json.dumps(out))
    if not ok:
        print("FAIL: " + "; ".join(m for m in msgs if m), file=sys.stderr)
        return 1
    return 0


def cmd_check(args):
    model, c, k, w = load_weights(args.weights, args.width)
    io, x = _load_io(args.inputs, c)
    if "logits" not in io:
        raise ValueError(f"{args.inputs}: no tensor named 'logits'")
    res, msg = compare_logits(model, x, io["logits"], args.tol)
    res.update(width=w, in_channels=c)
    return _finish([res], [msg])


def cmd_train_grad(args):
    model, c, k, w = load_weights(args.weights, args.width)
    io, x = _load_io(args.inputs, c)
    if "y" not in io:
        raise ValueError(f"{args.inputs}: no tensor named 'y'")
    y = _labels(io["y"], int(x.shape[0]))
    results, msgs = [], []
    if "logits" in io:
        res, msg = compare_logits(model, x, io["logits"], args.tol)
        res.update(width=w, in_channels=c)
        results.append(res)
        msgs.append(msg)
        model, _, _, _ = load_weights(args.weights, args.width)  # fresh buffers for train mode
    grads = load_file(args.grads)
    kutta_loss = float(grads["loss"].double().reshape(-1)[0]) if "loss" in grads else None
    gtol = args.tol if args.grad_tol is None else args.grad_tol
    res, msg = compare_grads(model, x, y, grads, gtol, kutta_loss)
    res.update(width=w, in_channels=c)
    results.append(res)
    msgs.append(msg)
    return _finish(results, msgs)


def randomize_batchnorm(model, gen):
    """Non-trivial affine parameters and running statistics, so eval-mode BN is exercised."""
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                f = mod.num_features
                mod.weight.copy_(0.5 + torch.rand(f, generator=gen))
                mod.bias.copy_(0.1 * torch.randn(f, generator=gen))
                mod.running_mean.copy_(0.1 * torch.randn(f, generator=gen))
                mod.running_var.copy_(0.5 + torch.rand(f, generator=gen))
                mod.num_batches_tracked.fill_(7)
        model.fc.bias.copy_(0.1 * torch.randn(model.fc.bias.shape, generator=gen))


def save_weights(model, path, metadata=None):
    state = {}
    for name, t in model.state_dict().items():
        t = t.detach().cpu()
        state[name] = t.to(torch.int64) if name.endswith("num_batches_tracked") else t.to(torch.float32)
        state[name] = state[name].contiguous()
    save_file(state, path, metadata=metadata)


def make_fixture(out_dir, width=8, in_channels=1, classes=10, n=4, size=28, seed=0):
    """Write model.safetensors, io.safetensors (x, y, logits) and grad.safetensors to out_dir.

    Torch's outputs are computed in float64 from the float32 weights and inputs that are saved,
    then stored as float32."""
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = build(width, in_channels, classes)
    randomize_batchnorm(model, gen)
    weights = os.path.join(out_dir, "model.safetensors")
    save_weights(model, weights, metadata={"sha256": "not-checked", "source": "torchvision_resnet.py make-fixture"})
    m, _, _, _ = load_weights(weights)  # exactly the float32 values that were saved
    x = torch.randn(n, in_channels, size, size, generator=gen)
    y = torch.randint(0, classes, (n,), generator=gen)
    with torch.no_grad():
        logits = m.double().eval()(x.double()).float()
    save_file({"x": x.contiguous(), "y": y, "logits": logits.contiguous()}, os.path.join(out_dir, "io.safetensors"))
    m, _, _, _ = load_weights(weights)
    loss, grads = train_grads(m, x, y)
    g = {k: v.float().contiguous() for k, v in grads.items()}
    g["loss"] = torch.tensor([loss], dtype=torch.float32)
    save_file(g, os.path.join(out_dir, "grad.safetensors"))
    return weights


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("check", "train-grad"):
        p = sub.add_parser(name)
        p.add_argument("--weights", required=True, help="kutta's model.safetensors")
        p.add_argument("--inputs", required=True, help="io.safetensors with x, logits (and y for train-grad)")
        p.add_argument("--width", type=int, default=None, help="base width w (default: from conv1.weight)")
        p.add_argument("--tol", type=float, default=1e-4, help="max |delta logit| / max |logit|")
        p.add_argument("--threads", type=int, default=None)
        if name == "train-grad":
            p.add_argument("--grads", required=True, help="grad.safetensors: kutta's gradient per parameter name")
            p.add_argument("--grad-tol", type=float, default=None, help="per-tensor relative tolerance (default --tol)")
    p = sub.add_parser("make-fixture")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--in-channels", type=int, default=1)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        if args.cmd == "check":
            return cmd_check(args)
        if args.cmd == "train-grad":
            return cmd_train_grad(args)
        make_fixture(args.out_dir, args.width, args.in_channels, args.classes, args.n, args.size, args.seed)
        print(json.dumps({"mode": "make-fixture", "out_dir": args.out_dir, "ok": True}))
        return 0
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        print(json.dumps({"mode": args.cmd, "ok": False, "error": str(e).splitlines()[0]}))
        print(f"FAIL: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
