"""Tests for eval.py: Fréchet distance against closed forms, mIoU/Acc on hand-made labels, SSIM/PSNR, the FID
Inception's state-dict layout, the built-in segmenter, an end-to-end eval and its error messages."""

import importlib.util
import json
import math
import time

import pytest
import torch

import eval as evaluation


def _has(module):
    return importlib.util.find_spec(module) is not None


# ---------------------------------------------------------------------------------------------------------------
# Fréchet distance

def test_frechet_distance_of_a_set_to_itself_is_zero():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(50, 64, generator=g)  # fewer samples than dims: rank-deficient covariance
    assert abs(evaluation.fid_from_features(f, f)) < 1e-6


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    g = torch.Generator().manual_seed(1)
    d = 8
    mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    v1 = torch.rand(d, generator=g, dtype=torch.float64) + 0.1
    v2 = torch.rand(d, generator=g, dtype=torch.float64) + 0.1
    expected = ((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * (v1 * v2).sqrt()).sum()
    got = evaluation.frechet_distance(mu1, torch.diag(v1), mu2, torch.diag(v2))
    assert got == pytest.approx(float(expected), rel=1e-9, abs=1e-9)


def test_frechet_distance_matches_closed_form_for_commuting_full_covariances():
    # S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T commute, so tr sqrt(S1 S2) = sum sqrt(a b)
    g = torch.Generator().manual_seed(2)
    d = 6
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    a, b = torch.rand(d, generator=g, dtype=torch.float64) + 0.1, torch.rand(d, generator=g, dtype=torch.float64)
    b[0] = 0  # rank-deficient S2
    s1, s2 = q @ torch.diag(a) @ q.T, q @ torch.diag(b) @ q.T
    mu = torch.zeros(d, dtype=torch.float64)
    expected = (a + b - 2 * (a * b).sqrt()).sum()
    # a zero eigenvalue carries ~1e-16 round-off whose square root is ~1e-8: that bounds the agreement
    assert evaluation.frechet_distance(mu, s1, mu, s2) == pytest.approx(float(expected), rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# mIoU / accuracy

def test_miou_and_accuracy_on_hand_made_labels():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 2, 2]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 2, 0, 2]])
    conf = evaluation.confusion_matrix(pred, target, 3)
    s = evaluation.segmentation_scores(conf)
    # class 0: tp 1, gt 2, pred 2 -> 1/3; class 1: tp 2, gt 2, pred 3 -> 2/3; class 2: tp 3, gt 4, pred 3 -> 3/4
    assert s["mIoU"] == pytest.approx((1 / 3 + 2 / 3 + 3 / 4) / 3)
    assert s["accuracy"] == pytest.approx(6 / 8)


def test_miou_ignores_labels_and_counts_out_of_range_predictions_as_wrong():
    target = torch.tensor([0, 0, 1, 1, 3, 3])  # 3 = dontcare id for num_classes=3
    pred = torch.tensor([0, 3, 1, 1, 0, 2])    # a dontcare prediction on a real pixel is wrong
    conf = evaluation.confusion_matrix(pred, target, 3, ignore=(3,))
    assert int(conf.sum()) == 4  # the two dontcare pixels are not counted
    s = evaluation.segmentation_scores(conf, ignore=(3,))
    # class 0: tp 1, gt 2, pred 1 -> 1/2; class 1: 1; class 2 absent everywhere counted -> not averaged
    assert s["mIoU"] == pytest.approx(0.75)
    assert s["accuracy"] == pytest.approx(3 / 4)
    # ignoring a real class drops its pixels and its IoU
    conf = evaluation.confusion_matrix(pred, target, 3, ignore=(3, 1))
    s = evaluation.segmentation_scores(conf, ignore=(3, 1))
    assert s["mIoU"] == pytest.approx(0.5) and s["accuracy"] == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------------------------
# Cross-view pixel and classifier metrics

def test_ssim_psnr_sharpness_of_identical_images():
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(evaluation.ssim(x, x), torch.ones(2), atol=1e-6)
    assert torch.allclose(evaluation.ssim(x * 255, x * 255, data_range=255), torch.ones(2), atol=1e-6)
    assert torch.all(evaluation.psnr(x, x) == evaluation.PSNR_CAP)
    assert torch.all(evaluation.sharpness_difference(x, x) == evaluation.PSNR_CAP)
    y = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    assert torch.all(evaluation.ssim(x, y) < 0.99)
    mse = ((x - y) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(evaluation.psnr(x, y), 10 * torch.log10(1 / mse), atol=1e-4)
    # the same images on the [0, 255] scale give the same PSNR
    assert torch.allclose(evaluation.psnr(x * 255, y * 255, data_range=255), evaluation.psnr(x, y), atol=1e-3)


def test_sharpness_difference_matches_naive_loops():
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(1, 1, 5, 6, generator=g), torch.rand(1, 1, 5, 6, generator=g)
    total = 0.0
    for i in range(1, 5):
        for j in range(1, 6):
            gx = abs(x[0, 0, i, j] - x[0, 0, i - 1, j]) + abs(x[0, 0, i, j] - x[0, 0, i, j - 1])
            gy = abs(y[0, 0, i, j] - y[0, 0, i - 1, j]) + abs(y[0, 0, i, j] - y[0, 0, i, j - 1])
            total += abs(float(gx - gy))
    expected = 10 * math.log10(1 / (total / 20))
    assert float(evaluation.sharpness_difference(x, y)) == pytest.approx(expected, rel=1e-5)


def test_classifier_metrics():
    real = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 0.1]])
    fake = torch.tensor([[4.0, 0, 0], [0, 0, 5.0], [0, 0, 3.0]])
    assert evaluation.topk_accuracy(fake, real, 1) == pytest.approx(2 / 3)
    assert evaluation.topk_accuracy(fake, real, 1, min_conf=0.5) == pytest.approx(1 / 2)
    assert evaluation.topk_accuracy(fake, real, 3) == 1.0
    assert evaluation.kl_score(real, real) == pytest.approx(0.0, abs=1e-12)
    # confident, evenly spread predictions over N classes give an inception-style score close to N
    assert evaluation.inception_style_score(torch.eye(3) * 50) == pytest.approx(3.0, rel=1e-6)
    assert evaluation.inception_style_score(torch.zeros(4, 3)) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------------------------
# FID Inception

KNOWN_FID_SHAPES = {  # from pytorch-fid's pt_inception-2015-12-05-6726825d.pth (torchvision inception_v3 layout)
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_1a_3x3.bn.running_var": (32,),
    "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
    "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
    "Mixed_7b.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}


def test_fid_inception_accepts_the_weights_file_layout(tmp_path):
    t0 = time.time()
    model = evaluation.FIDInceptionV3()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for k, shape in KNOWN_FID_SHAPES.items():
        assert shapes[k] == shape, k
    assert not any(k.startswith("AuxLogits") for k in shapes)  # the FID weights file has no aux head
    assert sum(p.numel() for p in model.parameters()) == 23_850_960  # torchvision's no-aux count + 8 more fc rows
    # a random state dict with exactly those keys and shapes (num_batches_tracked dropped, as in older files)
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.rand(v.shape, generator=g) + 0.5) if "running_var" in k else torch.randn(v.shape, generator=g) * 0.05
             for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / evaluation.FID_WEIGHTS_FILE
    torch.save(state, path)
    net = evaluation.load_fid_inception(path)
    assert torch.equal(net.Mixed_7c.branch_pool.conv.weight, state["Mixed_7c.branch_pool.conv.weight"])
    feats = net(torch.rand(2, 3, 32, 64) * 2 - 1)  # resized to 299x299 inside
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all()
    assert time.time() - t0 < 10


def test_fid_inception_rejects_wrong_weights_with_the_file_name(tmp_path):
    state = evaluation.FIDInceptionV3().state_dict()
    bad = dict(state)
    bad["fc.weight"] = torch.zeros(1000, 2048)  # torchvision's ImageNet head
    del bad["Mixed_7c.branch_pool.conv.weight"]
    path = tmp_path / "imagenet_inception.pth"
    torch.save(bad, path)
    with pytest.raises(evaluation.EvalError, match="imagenet_inception.pth.*missing.*Mixed_7c.*fc.weight"):
        evaluation.load_fid_inception(path)
    with pytest.raises(evaluation.EvalError, match="not found: .*nowhere.pth"):
        evaluation.load_fid_inception(tmp_path / "nowhere.pth")
