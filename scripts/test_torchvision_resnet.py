#!/usr/bin/env python3
"""Self-test of scripts/torchvision_resnet.py (the torchvision reference for kutta's resnet18).

Checks that the CIFAR ResNet-18 built by `build()` has exactly torchvision's resnet18 state_dict
names (and shapes scaled by the width); that the `check` CLI accepts a width-8, 1-channel,
10-class model saved as float32 safetensors (num_batches_tracked int64, extra metadata) together
with torch's own eval-mode logits, and rejects it after one weight is perturbed; that `train-grad`
accepts torch's own train-mode gradients and rejects a perturbed one; and that width inference,
a wrong --width and a float num_batches_tracked are handled.

    ~/.cache/kutta/torch-venv/bin/python scripts/test_torchvision_resnet.py
(or with pytest from that venv.)
"""
import json
import os
import subprocess
import sys
import tempfile
import unittest

import torch
from safetensors.torch import load_file, save_file
from torchvision.models import resnet18

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import torchvision_resnet as tr  # noqa: E402

SCRIPT = os.path.join(HERE, "torchvision_resnet.py")


def run_cli(*args):
    p = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True)
    lines = [l for l in p.stdout.splitlines() if l.strip()]
    out = json.loads(lines[-1]) if lines else None
    return p.returncode, out, p.stderr


class TorchvisionResnetTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        torch.set_num_threads(1)
        cls.tmp = tempfile.TemporaryDirectory()
        cls.dir = cls.tmp.name
        # width 8, 1 input channel (Fashion-MNIST), 10 classes, 4 samples of 28x28
        tr.make_fixture(cls.dir, width=8, in_channels=1, classes=10, n=4, size=28, seed=0)
        cls.weights = os.path.join(cls.dir, "model.safetensors")
        cls.io = os.path.join(cls.dir, "io.safetensors")
        cls.grads = os.path.join(cls.dir, "grad.safetensors")

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_names_match_torchvision(self):
        ref = resnet18(num_classes=10).state_dict()
        m64 = tr.build(64, 3, 10).state_dict()
        self.assertEqual(list(m64), list(ref))
        for k in ref:
            if k != "conv1.weight":
                self.assertEqual(m64[k].shape, ref[k].shape, k)
        self.assertEqual(tuple(m64["conv1.weight"].shape), (64, 3, 3, 3))
        m8 = tr.build(8, 1, 10).state_dict()
        self.assertEqual(list(m8), list(ref))
        for k in ref:
            if k in ("conv1.weight", "fc.bias") or k.endswith("num_batches_tracked"):
                continue
            # every other shape is torchvision's divided by 8 in the channel dimensions
            want = [s // 8 if s >= 64 else s for s in ref[k].shape]
            self.assertEqual(list(m8[k].shape), want, k)
        self.assertEqual(tuple(m8["conv1.weight"].shape), (8, 1, 3, 3))
        self.assertEqual(tuple(m8["fc.weight"].shape), (10, 64))
        self.assertIn("layer2.0.downsample.0.weight", m8)
        self.assertNotIn("layer1.0.downsample.0.weight", m8)

    def test_fixture_file_format(self):
        st = load_file(self.weights)
        self.assertEqual(st["bn1.num_batches_tracked"].dtype, torch.int64)
        self.assertEqual(tuple(st["bn1.num_batches_tracked"].shape), ())
        self.assertTrue(all(v.dtype == torch.float32 for k, v in st.items() if not k.endswith("num_batches_tracked")))
        self.assertEqual(len(st), len(resnet18().state_dict()))

    def test_check_passes(self):
        for extra in ([], ["--width", "8"]):
            rc, out, err = run_cli("check", "--weights", self.weights, "--inputs", self.io, *extra)
            print("check (unperturbed):", json.dumps(out))
            self.assertEqual(rc, 0, err)
            self.assertTrue(out["ok"])
            self.assertLess(out["rel_err"], 1e-6)
            self.assertEqual(out["argmax_agree"], 1.0)
            self.assertEqual(out["width"], 8)
            self.assertEqual(out["in_channels"], 1)

    def test_check_fails_on_perturbed_weight(self):
        st = load_file(self.weights)
        st["layer3.1.conv1.weight"][0, 0, 1, 1] += 0.05
        bad = os.path.join(self.dir, "perturbed.safetensors")
        save_file(st, bad)
        rc, out, err = run_cli("check", "--weights", bad, "--inputs", self.io)
        print("check (perturbed layer3.1.conv1.weight[0,0,1,1] += 0.05):", json.dumps(out), err.strip())
        self.assertEqual(rc, 1)
        self.assertFalse(out["ok"])
        self.assertGreater(out["rel_err"], 1e-4)

    def test_check_fails_on_perturbed_running_var(self):
        st = load_file(self.weights)
        st["layer4.0.bn2.running_var"][3] *= 1.5
        bad = os.path.join(self.dir, "perturbed_bn.safetensors")
        save_file(st, bad)
        rc, out, _ = run_cli("check", "--weights", bad, "--inputs", self.io)
        self.assertEqual(rc, 1)

    def test_float_num_batches_tracked_and_wrong_width(self):
        st = load_file(self.weights)
        st = {k: (v.float() if k.endswith("num_batches_tracked") else v) for k, v in st.items()}
        alt = os.path.join(self.dir, "float_nbt.safetensors")
        save_file(st, alt, metadata={"sha256": "0" * 64})
        rc, out, err = run_cli("check", "--weights", alt, "--inputs", self.io)
        self.assertEqual(rc, 0, err)
        rc, out, err = run_cli("check", "--weights", self.weights, "--inputs", self.io, "--width", "16")
        self.assertEqual(rc, 1)
        self.assertIn("width", out["error"])

    def test_missing_tensor_fails(self):
        st = load_file(self.weights)
        del st["layer2.0.downsample.1.running_mean"]
        bad = os.path.join(self.dir, "missing.safetensors")
        save_file(st, bad)
        rc, out, err = run_cli("check", "--weights", bad, "--inputs", self.io)
        self.assertEqual(rc, 1)
        self.assertIn("running_mean", err)

    def test_train_grad(self):
        rc, out, err = run_cli("train-grad", "--weights", self.weights, "--inputs", self.io, "--grads", self.grads)
        print("train-grad (unperturbed):", json.dumps(out))
        self.assertEqual(rc, 0, err)
        self.assertTrue(out["ok"])
        self.assertEqual(out["train-grad"]["tensors"], 62)
        self.assertLess(out["train-grad"]["worst_rel_err"], 1e-5)
        g = load_file(self.grads)
        g["layer1.0.bn2.weight"][2] += 0.01 * g["layer1.0.bn2.weight"].abs().max()
        bad = os.path.join(self.dir, "grad_perturbed.safetensors")
        save_file(g, bad)
        rc, out, err = run_cli("train-grad", "--weights", self.weights, "--inputs", self.io, "--grads", bad)
        print("train-grad (perturbed layer1.0.bn2.weight grad by 1%):", json.dumps(out["train-grad"]), err.strip())
        self.assertEqual(rc, 1)
        self.assertEqual(out["train-grad"]["worst_tensor"], "layer1.0.bn2.weight")


if __name__ == "__main__":
    unittest.main(verbosity=2)
