#!/usr/bin/env python3
"""PyTorch's side of `kutta bench vs-pytorch`: a persistent child that times training steps on
request, so that kutta can alternate turns with it (drift in the machine's speed then falls on
both alike).

One training step is what `kutta bench vs-pytorch` times in kutta: forward + backward (mean
cross-entropy) + plain SGD update (lr 0.01, no momentum), on CPU, with --threads threads:

- `mlp`: the MLP 784-500-500-500-10 with ReLU (as scripts/pytorch_mlp_step.py), on random inputs
  in [0, 1) (kutta uses Fashion-MNIST: step time does not depend on pixel values);
- `resnet`: the CIFAR ResNet-18 of scripts/torchvision_resnet.py (torchvision's resnet18, 3x3
  stride-1 stem, no max-pool, base width --width, 10 classes) in train mode (batch-norm
  statistics over the whole batch), on random 3x32x32 inputs;
- `vit`: ViT-S/16 (timm's VisionTransformer: 224x224, patch 16, dim 384, depth 12, 6 heads,
  1000 classes; its attention is torch's fused scaled_dot_product_attention), random inputs.

Protocol (one line per request on stdin, one JSON line per answer on stdout):

    start-up   -> {"ready": true, "torch": "2.x", "threads": N, "interop_threads": M,
                   "python": PATH, "backends": [lines]}
                  or, when torch cannot be imported, {"ready": false, "error": "...", "python": PATH}
                  and exit status 3
    mlp 128 5 [W]     -> W (default 1) untimed warm-up steps, then 5 timed:
                         {"model": "mlp", "batch_size": 128, "step_ms": [5 floats]}
    resnet 128 2 [W]  -> the same for the ResNet-18 (vit 32 2: ViT-S/16)
    quit (or EOF)     -> exit 0
    anything else     -> {"error": "..."} (the server stays up)

Models, optimizers and inputs are built once per (model, batch size) and kept, so every turn
continues the same training run. The `backends` lines say which CPU kernels torch uses (oneDNN,
MKL, BLAS, the CPU capability), as scripts/pytorch_resnet_step.py prints them.

    ~/.cache/kutta/torch-venv/bin/python scripts/pytorch_step_server.py --threads 2
"""
import argparse
import json
import os
import sys
import time


def reply(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--width", type=int, default=64, help="ResNet-18 base width")
    args = ap.parse_args()
    try:
        import torch

        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import pytorch_resnet_step  # noqa: E402  (backends())
    except Exception as e:  # ImportError, or a broken install
        reply({"ready": False, "error": f"{type(e).__name__}: {e}", "python": sys.executable})
        sys.exit(3)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    loss_fn = torch.nn.CrossEntropyLoss()

    def build(kind, bs):
        if kind == "mlp":
            widths = [784, 500, 500, 500, 10]
            layers = []
            for i in range(4):
                layers.append(torch.nn.Linear(widths[i], widths[i + 1]))
                if i < 3:
                    layers.append(torch.nn.ReLU())
            model = torch.nn.Sequential(*layers)
            x = torch.rand(bs, 784)
        elif kind == "resnet":
            import torchvision_resnet  # torchvision: only the ResNet needs it

            model = torchvision_resnet.build(args.width, 3, 10).train()
            x = torch.randn(bs, 3, 32, 32)
        elif kind == "vit":
            from timm.models.vision_transformer import VisionTransformer  # only the ViT needs timm

            model = VisionTransformer(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6,
                                      num_classes=1000).train()
            x = torch.randn(bs, 3, 224, 224)
        else:
            raise ValueError(f"unknown model {kind!r} (mlp, resnet, vit)")
        y = torch.randint(0, 10, (bs,))
        return model, torch.optim.SGD(model.parameters(), lr=0.01), x, y

    cells = {}

    def step(cell):
        model, opt, x, y = cell
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return (time.perf_counter() - t) * 1e3

    reply({
        "ready": True,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "python": sys.executable,
        "backends": pytorch_resnet_step.backends(),
    })
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "quit":
            break
        try:
            if len(words) not in (3, 4):
                raise ValueError("expected: <mlp|resnet|vit> <batch size> <timed steps> [warm-up steps]")
            kind, bs, reps = words[0], int(words[1]), int(words[2])
            warmup = int(words[3]) if len(words) == 4 else 1
            if bs <= 0 or reps < 0 or warmup < 0:
                raise ValueError("batch size must be positive, step counts not negative")
            if (kind, bs) not in cells:
                cells[(kind, bs)] = build(kind, bs)
            cell = cells[(kind, bs)]
            for _ in range(warmup):
                step(cell)
            times = [step(cell) for _ in range(reps)]
            reply({"model": kind, "batch_size": bs, "step_ms": times})
        except Exception as e:
            reply({"error": f"{type(e).__name__}: {e}", "request": line.strip()})


if __name__ == "__main__":
    main()
