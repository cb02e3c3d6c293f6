"""GPU checks: the fast paths on CUDA agree with their naive twins (forward and gradients), and every model trains
a few bf16 steps through train.py on the GPU. Skipped where no CUDA device is present (CI has none)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import ecgan
import lggan
import sau

DEV = os.environ.get("CUDA_CHECK_DEVICE", "cuda")  # CUDA_CHECK_DEVICE=cpu runs the same checks on the CPU
pytestmark = pytest.mark.skipif(DEV == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")
ROOT = Path(__file__).resolve().parents[1]


def _grads(fn, *leaves):
    leaves = [x.detach().clone().requires_grad_(True) for x in leaves]
    out = fn(*leaves)
    out.backward(torch.randn_like(out) if out.dim() else None, retain_graph=False)
    return out.detach(), [x.grad for x in leaves]


@pytest.mark.parametrize("window", ["expanded", "input"])
def test_sau_lean_and_vectorized_equal_naive_on_cuda(window):
    torch.manual_seed(0)
    x = torch.randn(2, 8, 12, 16, device=DEV, dtype=torch.float64)
    k = torch.randn(2, 25, 24, 32, device=DEV, dtype=torch.float64).softmax(1)
    ref = None
    for impl in ("naive", "vectorized", "lean"):
        torch.manual_seed(1)
        out, grads = _grads(lambda a, b: sau.sau_upsample(a, b, 2, window, impl), x, k)
        if ref is None:
            ref = (out, grads)
            continue
        torch.testing.assert_close(out, ref[0])
        for g, r in zip(grads, ref[1]):
            torch.testing.assert_close(g, r)


def test_contrastive_and_similarity_fast_paths_on_cuda():
    torch.manual_seed(0)
    labels = torch.randint(0, 5, (60,), device=DEV)
    emb = torch.randn(60, 16, device=DEV, dtype=torch.float64)
    bank = F.normalize(torch.randn(20, 16, device=DEV, dtype=torch.float64), dim=1)
    bank_labels = torch.randint(0, 5, (20,), device=DEV)
    res = [_grads(lambda e: ecgan.pixel_contrastive_loss(e, labels, 0.1, impl, bank, bank_labels), emb)
           for impl in ("naive", "vectorized")]
    torch.testing.assert_close(res[0][0], res[1][0])
    torch.testing.assert_close(res[0][1][0], res[1][1][0])

    pred = torch.randn(2, 6, 8, 12, device=DEV, dtype=torch.float64).softmax(1)
    lab = torch.randint(0, 7, (2, 8, 12), device=DEV)  # id 6: unlabelled (all-zero target row)
    target = F.one_hot(lab, 7)[..., :6].permute(0, 3, 1, 2).to(torch.float64)
    res = [_grads(lambda p: ecgan.similarity_loss(p, target, impl, chunk=32), pred)
           for impl in ("naive", "chunked")]
    torch.testing.assert_close(res[0][0], res[1][0])
    torch.testing.assert_close(res[0][1][0], res[1][1][0])


def test_class_generators_fast_equal_naive_on_cuda():
    torch.manual_seed(0)
    N, C = 6, 8
    lab = torch.randint(0, 3, (2, 4, 6), device=DEV).repeat_interleave(4, 1).repeat_interleave(4, 2) * 2
    masks = F.one_hot(lab, N).permute(0, 3, 1, 2).float()
    feat = torch.randn(2, C, 16, 24, device=DEV)
    gen = lggan.ClassGenerator(N, C, "naive").to(DEV)
    ref = gen(feat, masks)[0]
    for impl in ("vectorized", "pixel"):
        gen.impl = impl
        out, idx, _ = gen(feat, masks)
        torch.testing.assert_close(out, ref[:, idx], atol=1e-5, rtol=1e-4)
    torch.manual_seed(0)
    spec = ecgan.ClassSpecificGenerator(N, C, 3, 8, impl="naive").to(DEV).eval()
    ref = spec(feat, masks)[0]
    spec.impl = "vectorized"
    out, idx = spec(feat, masks)[:2]
    torch.testing.assert_close(out, ref[:, idx], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("model", ["gaugan", "lggan", "ecgan"])
def test_bf16_training_steps_on_cuda(tmp_path, model):
    out = tmp_path / model
    cmd = [sys.executable, str(ROOT / "train.py"), "--model", model, "--device", DEV, "--amp", "bf16",
           "--steps", "4", "--height", "64", "--width", "128", "--batch_size", "2", "--sample_every", "4",
           "--ckpt_every", "4", "--out", str(out), "--progress", "false", "--segmenter_steps", "20"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = torch.load(out / "ckpt_latest.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["G"].values() if v.is_floating_point())
    assert json.loads((out / "config.json").read_text())["train"]["amp"] == "bf16"
