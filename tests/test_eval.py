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
