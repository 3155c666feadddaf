#!/usr/bin/env python3
"""Reference check of kutta's `model.kind = "vit"` against timm's `VisionTransformer`.

kutta's `model.safetensors` for a ViT uses timm's state_dict names and shapes, so it loads with
`load_state_dict(strict=True)` into `timm.models.vision_transformer.VisionTransformer` built with
the same hyper-parameters. The hyper-parameters are read from the tensor shapes (patch size,
width, depth, MLP width, image size from the position embedding and the inputs, channels,
classes) except the number of heads, which no shape shows: pass --heads.

Modes (run with the venv that has torch + timm + safetensors):

    PY=~/.cache/kutta/torch-venv/bin/python

    # eval-mode logits: io.safetensors holds x [n,C,H,W] f32 and logits [n,K] f32 (kutta's)
    $PY scripts/timm_vit.py check --weights model.safetensors --inputs io.safetensors --heads 3

    # also gradients: io.safetensors holds y [n]; grads.safetensors holds kutta's gradient of
    # the mean cross-entropy for every parameter name
    $PY scripts/timm_vit.py train-grad --weights w.safetensors --inputs io.safetensors \
        --grads grads.safetensors --heads 3

    # initialisers: kutta's fresh weights against a freshly initialised timm model, per tensor
    # (mean and standard deviation; exact for constant tensors)
    $PY scripts/timm_vit.py init --weights init.safetensors --heads 3 --image-size 28

Torch runs in float64. Each mode prints one line of JSON and exits 0 on success, 1 (with a
message on stderr) on failure.
"""
import argparse
import json
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer


def build(state, heads, image_size=None):
    """The timm ViT for kutta's weights `state`; image_size defaults to the square image whose
    patch grid matches pos_embed."""
    w = state["patch_embed.proj.weight"]
    dim, chans, patch = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    hidden = int(state["blocks.0.mlp.fc1.weight"].shape[0])
    classes = int(state["head.weight"].shape[0])
    tokens = int(state["pos_embed"].shape[1]) - 1
    if image_size is None:
        side = round(tokens ** 0.5)
        if side * side != tokens:
            raise ValueError(f"pos_embed has {tokens} patch positions, not a square grid: pass the image size")
        image_size = side * patch
    model = VisionTransformer(
        img_size=image_size, patch_size=patch, in_chans=chans, num_classes=classes, embed_dim=dim,
        depth=depth, num_heads=heads, mlp_ratio=hidden / dim, qkv_bias=True,
    )
    return model


def load(path, heads, image_size=None):
    state = {k: v.to(torch.float32) for k, v in load_file(path).items()}
    model = build(state, heads, image_size)
    model.load_state_dict(state, strict=True)
    return model.double().eval()


def rel(a, b):
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def check(args):
    io = load_file(args.inputs)
    x = io["x"].double()
    model = load(args.weights, args.heads, x.shape[-1])
    with torch.no_grad():
        ref = model(x)
    got = io["logits"].double()
    err = rel(got, ref)
    agree = float((got.argmax(1) == ref.argmax(1)).double().mean())
    res = {"mode": "check", "n": int(x.shape[0]), "rel_err": err, "tol": args.tol, "argmax_agree": agree}
    res["ok"] = err <= args.tol and agree == 1.0
    return res, None if res["ok"] else f"logits differ by {err:.3e} of max |logit| (tol {args.tol}); argmax agree {agree}"


def train_grad(args):
    io = load_file(args.inputs)
    x = io["x"].double()
    y = io["y"].reshape(-1).to(torch.int64)
    model = load(args.weights, args.heads, x.shape[-1])
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    grads = load_file(args.grads)
    per = {}
    for name, p in model.named_parameters():
        per[name] = rel(grads[name].double(), p.grad)
    worst = max(per, key=per.get)
    res = {"mode": "train-grad", "loss": loss.item(), "tensors": len(per), "worst_tensor": worst,
           "worst_rel_err": per[worst], "tol": args.tol}
    if "loss" in grads:
        res["kutta_loss"] = grads["loss"].item()
        res["loss_rel_err"] = abs(res["kutta_loss"] - loss.item()) / abs(loss.item())
    res["ok"] = per[worst] <= args.tol and res.get("loss_rel_err", 0.0) <= args.tol
    return res, None if res["ok"] else f"gradient of {worst} differs by {per[worst]:.3e} (tol {args.tol})"


def init(args):
    kutta = load_file(args.weights)
    torch.manual_seed(0)
    model = build({k: v for k, v in kutta.items()}, args.heads, args.image_size)
    ref = dict(model.named_parameters())
    bad, rows = [], {}
    for name, t in kutta.items():
        r = ref[name].detach().double()
        t = t.double()
        if r.numel() < 2 or r.std() == 0:
            ok = torch.equal(t, r) or (r.numel() == 1 and abs(t.item()) < 1e-4)
            rows[name] = {"const": r.flatten()[0].item(), "ok": ok}
        else:
            # the standard deviations agree within sampling error (a few % at these sizes)
            n = r.numel()
            tol = max(0.05, 6.0 / n ** 0.5)
            ok = abs(t.std().item() / r.std().item() - 1.0) <= tol and abs(t.mean().item()) <= 6 * r.std().item() / n ** 0.5
            rows[name] = {"kutta_std": t.std().item(), "timm_std": r.std().item(), "ok": ok}
        if not rows[name]["ok"]:
            bad.append(name)
    res = {"mode": "init", "tensors": len(rows), "bad": bad, "ok": not bad,
           "examples": {k: rows[k] for k in list(rows)[:6]}}
    return res, None if not bad else f"{len(bad)} tensors are initialised differently: {bad[:5]}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    for name in ("check", "train-grad", "init"):
        s = sub.add_parser(name)
        s.add_argument("--weights", required=True)
        s.add_argument("--heads", type=int, required=True)
        s.add_argument("--tol", type=float, default=1e-4)
        if name != "init":
            s.add_argument("--inputs", required=True)
        else:
            s.add_argument("--image-size", type=int, default=None)
        if name == "train-grad":
            s.add_argument("--grads", required=True)
    args = p.parse_args()
    res, err = {"check": check, "train-grad": train_grad, "init": init}[args.mode](args)
    print(json.dumps(res))
    if err:
        print(err, file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
