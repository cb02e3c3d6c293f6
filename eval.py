"""
eval.py: generate a validation set from a checkpoint, then measure it.

Metrics used by ECGAN ("Edge Guided GANs with Contrastive Learning for Semantic Image Synthesis", ICLR 2023)
and LGGAN / LGGAN++ ("Local Class-Specific and Global Image-Level Generative Adversarial Networks for
Semantic-Guided Scene Generation", CVPR 2020; journal version with SAU, 2022), all in one file:

  FID            InceptionV3 in pytorch-fid's 'FID' variant (FIDInceptionV3, load_fid_inception), pool3
                 2048-d features, Fréchet distance in float64 via eigenvalues (frechet_distance).
                 Without the weights file: "FID (segmenter features)", not comparable with published FIDs.
  mIoU / Acc     a segmenter on the generated images (confusion_matrix, segmentation_scores). The segmenter is
                 a TorchScript file the user exports (DRN / UperNet / DeepLab) or the built-in one (Segmenter,
                 train_segmenter, load_segmenter), trained on real training images; its score on real validation
                 images is reported as the ceiling.
  cross-view     SSIM (Gaussian 11, sigma 1.5), PSNR, sharpness difference, and with a user-supplied TorchScript
                 scene classifier: top-1/top-5 accuracy, KL, inception-style score (classifier_metrics).
  main           `python eval.py --ckpt RUN/ckpt_latest.pt` -> PNGs, a grid, a printed table and metrics.json;
                 `python eval.py --train-segmenter --dataset NAME` trains and caches the built-in segmenter.

train, lggan and ecgan are imported inside functions only: ecgan.py imports this file for the segmenter.
"""

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
PSNR_CAP = 100.0  # dB returned for identical images (MSE = 0), so means over a set stay finite


class EvalError(RuntimeError):
    """A bad input to eval.py (missing file, wrong checkpoint, wrong weights); the message names the file."""


# -----------------------------------------------------------------------------------------------------------------
# Fréchet distance

def feature_stats(feats):
    """(N, D) features -> mean (D,) and unbiased covariance (D, D), both float64."""
    f = feats.detach().to(torch.float64).cpu()
    if f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {f.shape[0]}")
    mu = f.mean(0)
    fc = f - mu
    return mu, fc.T @ fc / (f.shape[0] - 1)


def _psd_sqrt(s):
    # symmetric square root of a PSD matrix; tiny negative eigenvalues from round-off are clamped to 0
    w, v = torch.linalg.eigh(s)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(mu1, s1, mu2, s2):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64.

    tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of S1 S2, which equal those of the symmetric
    PSD matrix S1^(1/2) S2 S1^(1/2); we take eigvalsh of that matrix and clamp round-off negatives to 0.
    Not Newton-Schulz (nor scipy's sqrtm): with fewer images than feature dimensions (< 2048 for Inception) the
    covariances are rank-deficient, Newton-Schulz then converges slowly or not at all, and sqrtm returns complex
    round-off that must be discarded; the eigenvalue route is exact up to float64 round-off.
    """
    mu1, mu2, s1, s2 = (torch.as_tensor(t).to(torch.float64).cpu() for t in (mu1, mu2, s1, s2))
    r1 = _psd_sqrt((s1 + s1.T) / 2)
    m = r1 @ s2 @ r1
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    d = ((mu1 - mu2) ** 2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * tr_sqrt
    return float(d.clamp_min(0))


def fid_from_features(f1, f2):
    return frechet_distance(*feature_stats(f1), *feature_stats(f2))


# -----------------------------------------------------------------------------------------------------------------
# mIoU / pixel accuracy

def confusion_matrix(pred, target, num_classes, ignore=()):
    """(C, C+1) counts: rows = target class, columns = predicted class; the last column counts predictions outside
    [0, C) (e.g. a dontcare channel), which are always wrong. Pixels whose target is in `ignore` or outside [0, C)
    are not counted."""
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    keep = (target >= 0) & (target < num_classes)
    for i in ignore:
        keep &= target != i
    pred, target = pred[keep], target[keep]
    pred = torch.where((pred >= 0) & (pred < num_classes), pred, torch.full_like(pred, num_classes))
    idx = target * (num_classes + 1) + pred
    return torch.bincount(idx.cpu(), minlength=num_classes * (num_classes + 1)).reshape(num_classes, num_classes + 1)


def segmentation_scores(conf, ignore=()):
    """mIoU over the classes that are not ignored and appear in the target or the prediction; pixel accuracy over
    all counted pixels; also per-class IoU (NaN for absent classes)."""
    conf = conf.to(torch.float64)
    c = conf.shape[0]
    tp = conf[:, :c].diagonal()
    union = conf.sum(1) + conf[:, :c].sum(0) - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
    valid = union > 0
    for i in ignore:
        if 0 <= i < c:
            valid[i] = False
    total = conf.sum()
    return {
        "mIoU": float(iou[valid].mean()) if valid.any() else float("nan"),
        "accuracy": float(tp.sum() / total) if total > 0 else float("nan"),
        "iou": iou.tolist(),
    }


# Cityscapes label ids whose trainId is 255 (void): the 19-class protocol ignores them.
CITYSCAPES_VOID_IDS = (0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30)


def default_ignore(info):
    """Labels the default protocol ignores: the dontcare id where the dataset has one; Cityscapes' void ids."""
    ignore = [info.num_classes] if info.dontcare else []
    if info.name == "cityscapes":
        ignore += list(CITYSCAPES_VOID_IDS)
    return sorted(set(ignore))


# -----------------------------------------------------------------------------------------------------------------
# Cross-view pixel metrics. Images (B, C, H, W) in [0, data_range]: data_range=1 for [0, 1], 255 for [0, 255].
# Repo tensors live in [-1, 1]: pass to_unit(x) with data_range=1.

def to_unit(x):
    return ((x + 1) / 2).clamp(0, 1)


def _gaussian_window(size=11, sigma=1.5, device=None, dtype=torch.float32):
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).to(device=device, dtype=dtype)


def ssim(x, y, data_range=1.0, size=11, sigma=1.5, k1=0.01, k2=0.03):
    """SSIM of Wang et al. 2004 per image (B,): Gaussian window 11 / sigma 1.5, C1 = (0.01 L)^2, C2 = (0.03 L)^2,
    'valid' filtering (no padding), averaged over channels and positions. Images need H, W >= size."""
    x, y = x.to(torch.float64), y.to(torch.float64)
    c = x.shape[1]
    w = _gaussian_window(size, sigma, x.device, x.dtype).expand(c, 1, size, size)
    filt = lambda t: F.conv2d(t, w, groups=c)
    mx, my = filt(x), filt(y)
    sxx = filt(x * x) - mx ** 2
    syy = filt(y * y) - my ** 2
    sxy = filt(x * y) - mx * my
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))
    return s.mean(dim=(1, 2, 3)).float()


def psnr(x, y, data_range=1.0):
    """10 log10(L^2 / MSE) per image (B,), capped at PSNR_CAP dB (identical images give PSNR_CAP, not inf).

    Note: the evaluation scripts the cross-view papers inherited (from Mathieu et al.'s video-prediction code, as
    far as we can tell) compute PSNR and sharpness difference on images in [-1, 1] with a peak of 1, i.e. a range
    of 2 treated as 1; those numbers sit 10 log10(4) = 6.02 dB below this standard definition. Calling
    psnr(x, y, data_range=1) on [-1, 1] tensors reproduces that scale.
    """
    mse = ((x.to(torch.float64) - y.to(torch.float64)) ** 2).mean(dim=(1, 2, 3))
    out = 10 * torch.log10(data_range ** 2 / mse.clamp_min(1e-300))
    return out.clamp(max=PSNR_CAP).float()


def sharpness_difference(x, y, data_range=1.0):
    """Sharpness difference (Mathieu et al. 2016, used by the cross-view papers) per image (B,):
    10 log10(L^2 / mean |(grad_i Y + grad_j Y) - (grad_i X + grad_j X)|), grad_i Y = |Y[i,j] - Y[i-1,j]|,
    grad_j Y = |Y[i,j] - Y[i,j-1]|, over the (H-1, W-1) positions where both exist. Capped like PSNR."""
    def grads(t):
        t = t.to(torch.float64)
        gi = (t[:, :, 1:, 1:] - t[:, :, :-1, 1:]).abs()
        gj = (t[:, :, 1:, 1:] - t[:, :, 1:, :-1]).abs()
        return gi + gj
    d = (grads(x) - grads(y)).abs().mean(dim=(1, 2, 3))
    return (10 * torch.log10(data_range ** 2 / d.clamp_min(1e-300))).clamp(max=PSNR_CAP).float()


# -----------------------------------------------------------------------------------------------------------------
# Classifier-based cross-view metrics (the classifier is the user's TorchScript scene classifier, e.g. Places365)

def topk_accuracy(fake_logits, real_logits, k=1, min_conf=None):
    """Fraction of generated images whose top-k classes contain the real image's top-1 class (the real image's
    prediction is the ground truth). min_conf: count only pairs whose real top-1 probability exceeds it (the papers'
    second accuracy column uses 0.5)."""
    p_real = real_logits.softmax(1)
    conf, gt = p_real.max(1)
    hit = (fake_logits.topk(k, dim=1).indices == gt[:, None]).any(1).float()
    if min_conf is not None:
        keep = conf > min_conf
        return float(hit[keep].mean()) if keep.any() else float("nan")
    return float(hit.mean())


def kl_score(fake_logits, real_logits):
    """Mean over images of KL(p_real || p_fake) between the classifier's class distributions."""
    lp_real, lp_fake = real_logits.double().log_softmax(1), fake_logits.double().log_softmax(1)
    return float((lp_real.exp() * (lp_real - lp_fake)).sum(1).mean())


def inception_style_score(logits, topk=None):
    """exp(E_x KL(p(y|x) || p(y))) from a classifier's logits. topk: keep each image's k most likely classes and
    renormalise (our reading of the papers' 'Top-1' / 'Top-5' inception-score columns)."""
    p = logits.double().softmax(1)
    if topk is not None:
        vals, idx = p.topk(topk, dim=1)
        p = torch.zeros_like(p).scatter_(1, idx, vals)
        p = p / p.sum(1, keepdim=True)
    py = p.mean(0, keepdim=True)
    kl = (p * (p.clamp_min(1e-30).log() - py.clamp_min(1e-30).log())).sum(1)
    return float(kl.mean().exp())


def classifier_metrics(fake_logits, real_logits):
    return {
        "top-1 accuracy": topk_accuracy(fake_logits, real_logits, 1),
        "top-1 accuracy (real conf > 0.5)": topk_accuracy(fake_logits, real_logits, 1, 0.5),
        "top-5 accuracy": topk_accuracy(fake_logits, real_logits, min(5, fake_logits.shape[1])),
        "top-5 accuracy (real conf > 0.5)": topk_accuracy(fake_logits, real_logits, min(5, fake_logits.shape[1]), 0.5),
        "KL": kl_score(fake_logits, real_logits),
        "inception-style score (all)": inception_style_score(fake_logits),
        "inception-style score (top-1)": inception_style_score(fake_logits, 1),
        "inception-style score (top-5)": inception_style_score(fake_logits, min(5, fake_logits.shape[1])),
        "inception-style score (real, all)": inception_style_score(real_logits),
    }
