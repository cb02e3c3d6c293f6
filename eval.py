"""
eval.py: generate a validation set from a checkpoint, then measure it.

Metrics used by ECGAN ("Edge Guided GANs with Contrastive Learning for Semantic Image Synthesis", ICLR 2023)
and LGGAN / LGGAN++ ("Local and Global GANs with Semantic-Aware Upsampling for Image Generation", 2022, which
extends the CVPR 2020 LGGAN paper), all in one file:

  FID            InceptionV3 in pytorch-fid's 'FID' variant (FIDInceptionV3, load_fid_inception), pool3
                 2048-d features, Fréchet distance in float64 via eigenvalues (frechet_distance).
                 Without the weights file: "FID (segmenter features)", not comparable with published FIDs.
  mIoU / Acc     a segmenter on the generated images (confusion_matrix, segmentation_scores). The segmenter is
                 a TorchScript file the user exports (DRN / UperNet / DeepLab) or the built-in one (Segmenter,
                 train_segmenter, load_segmenter), trained on real training images (steps scaled to the data,
                 auto_segmenter_steps; ~10% held out, holdout_split, to report its own accuracy); its score on real
                 validation images is reported as the ceiling. Cityscapes is scored on the 19 train ids
                 (eval_classes, confusion_of: the papers' DRN protocol).
  cross-view     SSIM (Gaussian 11, sigma 1.5), PSNR, sharpness difference, and with a user-supplied TorchScript
                 scene classifier: top-1/top-5 accuracy, KL, inception-style score (classifier_metrics).
  evaluate/main  `python eval.py --ckpt RUN/ckpt_latest.pt [--inception PATH_OR_URL]` -> <RUN>/eval/{fake,real}/*.png,
                 grid.png, a printed table and metrics.json (each number with its protocol);
                 `python eval.py --train-segmenter --dataset NAME --out RUN` trains and caches the built-in segmenter.
  figures        `python eval.py --figures --ckpt RUN/ckpt_latest.pt` -> RUN/figures/*.png: LGGAN Fig. 12 (class-specific
                 feature maps), Fig. 13 / ECGAN Fig. 7 (the segmenter on generated images), ECGAN Fig. 6 (edges and
                 attention maps), SAU Fig. 5 (learned kernels at chosen locations), whichever the model has.

train, lggan and ecgan are imported inside functions only. The built-in segmenter's module and loader are
segmenter.py's (ecgan.py's G_l uses them too); this file trains it and wraps the loader's errors in EvalError.
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

import segmenter
from segmenter import Segmenter, freeze as _freeze

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
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


def default_ignore(info):
    """Ids the default protocol leaves out, in eval_classes' ids: the dontcare id where the dataset has one.
    (Cityscapes needs none here: ids without a train id map to 255, outside the 19 evaluated classes.)"""
    return [info.num_classes] if info.dontcare and info.name != "cityscapes" else []


def eval_classes(info):
    """(lut, n): the class ids mIoU and accuracy count. Cityscapes: the 19 train ids of the official label
    definitions (data.CITYSCAPES_TRAIN_IDS; the papers' DRN-D-105 protocol), lut (label id -> train id, 255 for
    every other id) a LongTensor. Every other dataset: its own num_classes ids, lut None."""
    import data
    if info.name != "cityscapes":
        return None, info.num_classes
    lut = torch.full((max(256, info.label_nc),), 255, dtype=torch.long)
    for k, v in data.CITYSCAPES_TRAIN_IDS.items():
        lut[k] = v
    return lut, len(data.CITYSCAPES_TRAIN_NAMES)


@torch.no_grad()
def confusion_of(seg, image, label, info, ignore=()):
    """Confusion matrix (n, n+1) of the segmenter on `image` against `label`, in eval_classes(info)'s ids. Where a
    lut applies, predictions over the dataset's label ids (the built-in segmenter) are mapped like the labels; a
    segmenter with exactly n outputs (a DRN exported over Cityscapes' 19 train ids) is read as predicting those."""
    lut, n = eval_classes(info)
    logits = seg(image)
    if logits.shape[-2:] != image.shape[-2:]:
        logits = F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
    pred = logits.argmax(1)
    if lut is not None:
        lut = lut.to(label.device)
        label = lut[label.clamp(0, len(lut) - 1)]
        if logits.shape[1] != n:
            pred = lut[pred.clamp(0, len(lut) - 1)]
    return confusion_matrix(pred, label, n, ignore)


def protocol_ids(info, ignore):
    """Words for the protocol column: which ids were counted."""
    _, n = eval_classes(info)
    what = ("19 Cityscapes train ids (label ids mapped as the official definitions; all other ids ignored)"
            if info.name == "cityscapes" else f"{n} classes")
    return what + (f", ignored ids {list(ignore)}" if ignore else ", no ignored ids")


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


# -----------------------------------------------------------------------------------------------------------------
# FID InceptionV3: pytorch-fid's 'FID' variant of torchvision's inception_v3 (same module names, so the weights file
# pt_inception-2015-12-05-6726825d.pth, ported from TensorFlow's 2015-12-05 graph, loads key for key).
# It differs from torchvision's ImageNet model in: 1008 fc classes, avg pools with count_include_pad=False in
# Mixed_5*, 6b-6e and 7b, and a max pool in Mixed_7c's pool branch (all as in the TF graph).

class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):  # Mixed_5b/5c/5d: 35x35
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):  # (B, cin, h, w) -> (B, 224 + pool_features, h, w)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool(x))], 1)


class InceptionB(nn.Module):  # Mixed_6a: 35x35 -> 17x17
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):  # (B, 288, 35, 35) -> (B, 768, 17, 17)
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):  # Mixed_6b-6e: 17x17, factorised 7x7 convs
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):  # (B, 768, 17, 17) -> same
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for i in range(1, 6):
            bd = getattr(self, f"branch7x7dbl_{i}")(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_avg_pool(x))], 1)


class InceptionD(nn.Module):  # Mixed_7a: 17x17 -> 8x8
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):  # (B, 768, 17, 17) -> (B, 1280, 8, 8)
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):  # Mixed_7b (avg pool, count_include_pad=False) / Mixed_7c (max pool): 8x8
    def __init__(self, cin, max_pool=False):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):  # (B, cin, 8, 8) -> (B, 2048, 8, 8)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """forward(images (B, 3, H, W) in [-1, 1]) -> pool3 features (B, 2048). Resized to 299x299 bilinearly first."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # unused for FID; present so the weights file loads strictly

    def forward(self, x):
        # pytorch-fid resizes [0, 1] images and then maps them to [-1, 1]; ours are already in [-1, 1] and the
        # affine map commutes with bilinear resizing.
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)  # (B, 3, 299, 299)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))             # (B, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)                                              # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))                                 # (B, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)                                              # (B, 192, 35, 35)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)                                     # -> (B, 2048, 8, 8)
        return x.mean(dim=(2, 3))                                                     # pool3: (B, 2048)


def load_fid_inception(path_or_url=FID_WEIGHTS_URL, device="cpu"):
    """FIDInceptionV3 with pytorch-fid's weights, from a local path or a URL (downloaded once into torch.hub's
    checkpoint cache, ~/.cache/torch/hub/checkpoints). Raises EvalError naming the file if it is missing or its keys
    or shapes differ from the FID Inception's."""
    model = FIDInceptionV3()
    src = str(path_or_url)
    try:
        if src.startswith(("http://", "https://")):
            state = torch.hub.load_state_dict_from_url(src, map_location="cpu", progress=True, weights_only=True)
        else:
            if not Path(src).is_file():
                raise EvalError(f"Inception weights file not found: {src} (expected pytorch-fid's {FID_WEIGHTS_FILE}, "
                                f"from {FID_WEIGHTS_URL})")
            state = torch.load(src, map_location="cpu", weights_only=True)
    except EvalError:
        raise
    except Exception as e:
        raise EvalError(f"{src}: cannot load Inception weights (expected pytorch-fid's {FID_WEIGHTS_FILE}; "
                        f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:150]})") from None
    if not isinstance(state, dict):
        raise EvalError(f"{src} is not a state dict (expected pytorch-fid's {FID_WEIGHTS_FILE})")
    check_state_dict(model, state, src, f"pytorch-fid's {FID_WEIGHTS_FILE}")
    model.load_state_dict(state, strict=False)  # strict except BatchNorm's num_batches_tracked counters
    return model.to(device).eval().requires_grad_(False)


def check_state_dict(model, state, src, what):
    """Raise EvalError naming `src` unless `state` has exactly the model's keys and shapes (segmenter.py's check)."""
    try:
        segmenter.check_state_dict(model, state, src, what)
    except ValueError as e:
        raise EvalError(str(e)) from None


# -----------------------------------------------------------------------------------------------------------------
# Built-in segmenter: a small fully convolutional net trained on REAL training images only. It stands in for the
# papers' DRN-D-105 / UperNet-101 / DeepLab-v2 (its numbers are not comparable with theirs); ECGAN's label
# generator G_l uses it too. Its mIoU on real validation images is the ceiling for generated ones. The module and
# its loader live in segmenter.py (torch only), which ecgan.py imports; training it stays here.

def _forever(loader, dataset):
    epoch = 0
    while True:
        if hasattr(dataset, "set_epoch"):  # a new crop and flip of every image per pass (data.LOAD_RATIO)
            dataset.set_epoch(epoch)
        yield from loader
        epoch += 1


SEG_STEPS_MAX, SEG_STEPS_MIN, SEG_EPOCHS = 2000, 100, 8


def auto_segmenter_steps(n_images, batch_size=8):
    """Steps of the built-in segmenter scaled to the data: SEG_EPOCHS passes over the images it fits, at least
    SEG_STEPS_MIN, at most SEG_STEPS_MAX (2000 on the 2000 synthetic scenes; 100 on a 13-image sample, where 2000
    steps would be ~1500 epochs of memorising it)."""
    per_epoch = max(1, n_images // max(1, min(batch_size, n_images)))
    return int(min(SEG_STEPS_MAX, max(SEG_STEPS_MIN, SEG_EPOCHS * per_epoch)))


def holdout_split(n, seed=0):
    """(fit indices, held-out indices) of n training images: ~10% (at least 2 from 10 images, 1 from 4) held out,
    chosen by a fixed permutation, to measure the segmenter on real images it never saw."""
    h = max(2, round(0.1 * n)) if n >= 10 else (1 if n >= 4 else 0)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[h:]), sorted(perm[:h])


@torch.no_grad()
def segmenter_scores(seg, dataset, info, batch_size=8, device="cpu", ignore=None, num=None):
    """mIoU and pixel accuracy of the segmenter on a dataset's real images (eval_classes' ids)."""
    ignore = default_ignore(info) if ignore is None else ignore
    conf, n = 0, min(num or len(dataset), len(dataset))
    for i0 in range(0, n, batch_size):
        items = [dataset[i] for i in range(i0, min(i0 + batch_size, n))]
        image = torch.stack([it["image"] for it in items]).to(device)
        label = torch.stack([it["label"] for it in items]).to(device)
        conf = conf + confusion_of(seg, image, label, info, ignore)
    s = segmentation_scores(conf, ignore)
    return {"mIoU": _finite(s["mIoU"]), "accuracy": _finite(s["accuracy"]), "num_images": n}


def train_segmenter(dataset, info, steps=2000, batch_size=8, device="cpu", out_path=None, width=32, lr=2e-3,
                    seed=0, progress=True, say=None, extra=None):
    """Train the built-in Segmenter with cross-entropy on the dataset's real images (never generated ones).
    Dontcare pixels are not trained on. Saves {"kind": "segmenter", ...} (plus `extra`) atomically to out_path if
    given. say(line): after two timed steps, the measured time per step and the estimated total."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
        torch.manual_seed(seed)
        seg = Segmenter(info.label_nc, width).to(device)
    loader = torch.utils.data.DataLoader(dataset, batch_size=min(batch_size, len(dataset)), shuffle=True,
                                         drop_last=True, generator=gen)
    opt = torch.optim.Adam(seg.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    ignore_index = info.num_classes if info.dontcare else -100
    seg.train()
    it = _forever(loader, dataset)
    bar = tqdm(range(steps), desc="segmenter", disable=not progress, leave=False)
    t1 = None
    for i in bar:
        if i == 1:
            t1 = time.time()  # step 0 is a warm-up
        if i == 3 and say is not None:
            per = (time.time() - t1) / 2
            say(f"segmenter: {per:.2f} s/step measured, about {_duration(per * (steps - 3))} for the remaining "
                f"{steps - 3} steps")
        batch = next(it)
        image, label = batch["image"].to(device), batch["label"].to(device)
        loss = F.cross_entropy(seg(image), label, ignore_index=ignore_index)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    seg.eval().requires_grad_(False)
    if out_path is not None:
        from train import atomic_save  # inside: train.py imports this file's users (ecgan.py) at its top
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        atomic_save({"kind": "segmenter", "label_nc": info.label_nc, "width": width, "steps": steps,
                     "info": asdict(info), "state": seg.state_dict(), **(extra or {})}, out_path)
    return seg


def _duration(seconds):
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def load_segmenter(path, info=None, device="cpu"):
    """segmenter.load_segmenter (the built-in Segmenter's checkpoint, or a TorchScript / .pt2 export), with its
    errors as EvalError naming the file."""
    try:
        return segmenter.load_segmenter(path, info, device)
    except (FileNotFoundError, ValueError) as e:
        raise EvalError(str(e)) from None


@torch.no_grad()
def segment(seg, image):
    """Predicted label ids (B, H, W) at the image's resolution."""
    logits = seg(image)
    if logits.shape[-2:] != image.shape[-2:]:
        logits = F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
    return logits.argmax(1)


# -----------------------------------------------------------------------------------------------------------------
# Generate and measure

def _device(name):
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _save_png(image, path):
    from PIL import Image
    arr = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte()
    arr = arr.expand(3, -1, -1) if arr.shape[0] == 1 else arr
    Image.fromarray(arr.permute(1, 2, 0).numpy()).save(path)


def _val_set(data, name, dataroot, info, from_ckpt=False):
    """The validation split at the checkpoint's resolution (the training split, unjittered, where a dataset has
    none). from_ckpt: the dataroot came from the checkpoint's training config (said when it is not found)."""
    if info.task == "crossview" and name == "synthetic":
        name = "synthetic_crossview"  # as train.py names it
    kw = dict(dataroot=dataroot or None, size=(info.height, info.width), flip=False, crop=False)  # never jitter
    try:
        try:
            return data.make_dataset(name, split="val", **kw), name, "val"
        except data.DatasetError:
            return data.make_dataset(name, split="train", **kw), name, "train (no validation split)"
    except data.DatasetError as e:
        hint = " (the checkpoint's --dataroot; give --dataroot to read the data elsewhere)" if from_ckpt else ""
        raise EvalError(f"{e}{hint}") from None


def open_checkpoint(ckpt_path, device):
    """(ckpt, module, cfg, info, G in eval mode) from a training checkpoint, or an EvalError naming the file."""
    import zipfile
    import train  # not at top level: ecgan.py imports this file
    if not os.path.isfile(ckpt_path):
        raise EvalError(f"checkpoint not found: {ckpt_path}" + (" (a folder; give its ckpt_latest.pt)"
                                                                if os.path.isdir(ckpt_path) else ""))
    if not zipfile.is_zipfile(ckpt_path):  # torch.save writes a zip archive; anything else is another file
        raise EvalError(f"{ckpt_path}: not a training checkpoint of this repo (not a torch.save file); expected "
                        f"<run>/ckpt_latest.pt")
    try:
        ckpt = train.load_checkpoint(ckpt_path)
        module, cfg, info, G, D = train.build_from_checkpoint(ckpt, device)
    except (train.CheckpointError, KeyError, TypeError, ValueError) as e:
        msg = str(e)
        raise EvalError(msg if ckpt_path in msg else f"{ckpt_path}: {msg}") from None
    del D
    return ckpt, module, cfg, info, G


def load_classifier(path, device):
    """A user's TorchScript (or torch.export .pt2) scene classifier, frozen; EvalError naming the file otherwise."""
    if not os.path.isfile(path):
        raise EvalError(f"classifier file not found: {path}")
    try:
        if str(path).endswith(".pt2"):
            return _freeze(torch.export.load(path).module().to(device))
        return _freeze(torch.jit.load(path, map_location=device).eval())
    except Exception as e:  # TorchScript raises RuntimeError on a file of another kind
        raise EvalError(f"{path}: not a TorchScript (or .pt2) scene classifier ({type(e).__name__}: "
                        f"{(str(e).splitlines() or [''])[0][:150]})") from None


def _segmenter_cache_path(folder, name, info):
    return Path(folder) / f"segmenter_{name}_{info.height}x{info.width}.pt"


def _finite(x):
    return None if isinstance(x, float) and not math.isfinite(x) else x


class _Subset(torch.utils.data.Subset):
    def set_epoch(self, epoch):
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


def find_segmenter(segmenter, folders, name, info, dataroot, seg_steps, batch_size, device, notes, progress=True):
    """(segmenter, description): the user's file if given, else the built-in one cached in the first of `folders`
    that has it, else a new built-in one trained on real training images and cached in folders[0]: ~10% of them
    are held out (holdout_split) and its scores there are printed, stored with it and noted. seg_steps None:
    auto_segmenter_steps of the images it fits. (None, None) when there is none and seg_steps is 0."""
    import data
    if segmenter:
        return load_segmenter(segmenter, info, device), f"user segmenter {segmenter}"
    # Not <run>/segmenter.pt: that is ECGAN's G_l, which the similarity loss (Eq. 3) trained G to agree
    # with; measuring with it would flatter ECGAN. Ours is trained separately (and with another seed).
    for cand in (_segmenter_cache_path(f, name, info) for f in folders):
        if cand.is_file():
            try:
                seg = load_segmenter(cand, info, device)
            except EvalError as e:
                notes.append(f"ignored cached segmenter: {e}")
                continue
            _note_holdout(seg, notes)
            return seg, f"built-in segmenter {cand}"
    if seg_steps is not None and seg_steps <= 0:
        return None, None
    cache = _segmenter_cache_path(folders[0], name, info)
    size = (info.height, info.width)
    jittered = data.make_dataset(name, dataroot=dataroot or None, split="train", size=size)
    plain = data.make_dataset(name, dataroot=dataroot or None, split="train", size=size, crop=False, flip=False)
    fit, held = holdout_split(len(jittered))
    steps = auto_segmenter_steps(len(fit), batch_size) if seg_steps is None else seg_steps
    how = "scaled to the data" if seg_steps is None else "--seg-steps"
    print(f"no --segmenter given: training the built-in segmenter on {len(fit)} real {name} training images "
          f"({len(held)} held out to measure it) for {steps} steps ({how}) at {size[0]}x{size[1]}, cached at "
          f"{cache} for the next evaluation. To skip this: --segmenter FILE (your DRN / UperNet / DeepLab "
          f"TorchScript export, or a cached segmenter_*.pt) or --seg-steps 0 (no mIoU / accuracy).", flush=True)
    t0 = time.time()
    with torch.random.fork_rng(devices=[]):  # the scoring below must not move the caller's stream either
        seg = train_segmenter(_Subset(jittered, fit), info, steps=steps, batch_size=batch_size, device=device,
                              progress=progress, seed=1, say=lambda line: print(line, flush=True))
    holdout = None
    if held:
        holdout = segmenter_scores(seg, _Subset(plain, held), info, batch_size, device)
        holdout["fit"] = segmenter_scores(seg, _Subset(plain, fit), info, batch_size, device, num=64)
    from train import atomic_save
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_save({"kind": "segmenter", "label_nc": info.label_nc, "width": seg.width, "steps": steps,
                 "info": asdict(info), "state": seg.state_dict(), "holdout": holdout, "num_fit": len(fit)}, cache)
    seg.holdout = holdout
    print(f"segmenter trained in {_duration(time.time() - t0)}", flush=True)
    _note_holdout(seg, notes, say=True)
    return seg, f"built-in segmenter {cache} ({steps} steps on {len(fit)} images)"


def _note_holdout(seg, notes, say=False):
    h = getattr(seg, "holdout", None)
    if not h:
        return
    f = h.get("fit") or {}
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"
    line = (f"built-in segmenter on {h['num_images']} held-out real training images: mIoU {fmt(h['mIoU'])}, "
            f"pixel accuracy {fmt(h['accuracy'])} (on {f.get('num_images', '?')} images it was fit on: mIoU "
            f"{fmt(f.get('mIoU'))}, accuracy {fmt(f.get('accuracy'))}; a large gap means it memorised a small set "
            f"and its mIoU on generated images says little)")
    notes.append(line)
    if say:
        print(line, flush=True)


def evaluate(ckpt_path, dataset=None, dataroot=None, out=None, num=None, batch_size=8, device="auto",
             inception=None, segmenter=None, classifier=None, seg_steps=None, ignore=None, grid_rows=8,
             save_images=True, progress=True):
    """Generate the validation set from a training checkpoint, compute every metric that applies, print a table and
    write <out>/metrics.json. Returns the results dict. Every input file is checked before anything is written or
    trained. seg_steps None: the built-in segmenter's steps scale to the data (auto_segmenter_steps)."""
    import data

    ckpt_path = str(ckpt_path)
    device = _device(device)
    ckpt, module, cfg, info, G = open_checkpoint(ckpt_path, device)
    model_name, tcfg = ckpt["model"], ckpt.get("train_cfg", {})
    root = dataroot or tcfg.get("dataroot")
    val, name, split = _val_set(data, dataset or tcfg.get("dataset", "synthetic"), root, info,
                                from_ckpt=not dataroot and bool(root))
    vi = val.info
    if (vi.label_nc, vi.input_nc, vi.task) != (info.label_nc, info.input_nc, info.task):
        raise EvalError(f"{ckpt_path}: trained on {info.name!r} (label_nc {info.label_nc}, input_nc {info.input_nc}, "
                        f"{info.task}), but dataset {name!r} has label_nc {vi.label_nc}, input_nc {vi.input_nc}, "
                        f"{vi.task}")
    if len(val) == 0:
        raise EvalError(f"dataset {name!r} ({split}) has no images")
    out = Path(out) if out else Path(ckpt_path).parent / "eval"
    n_total = min(num or len(val), len(val))
    notes = []

    # --- the measuring networks: the given files first (a wrong one fails at once), the built-in segmenter last
    inception_net = load_fid_inception(inception, device) if inception else None
    clf = load_classifier(classifier, device) if classifier else None
    if clf is None and info.task == "crossview":
        notes.append("top-k accuracy / KL / inception-style score skipped: no scene classifier (--classifier "
                     "TorchScript file)")
    seg, seg_desc = find_segmenter(segmenter, [out, Path(ckpt_path).parent], name, info, root, seg_steps,
                                   batch_size, device, notes, progress)
    if seg is None:
        notes.append("mIoU / accuracy skipped: no segmenter (--segmenter PATH or --seg-steps > 0)")
    ignore = sorted(set(default_ignore(info) if ignore is None else ignore))

    if inception_net is not None:
        feat_net = inception_net
        fid_key, fid_desc = "FID", f"InceptionV3 pool3 (pytorch-fid weights {inception}), 299x299 bilinear"
    elif seg is not None and hasattr(seg, "features"):
        feat_net = seg.features
        fid_key = "FID (segmenter features)"
        fid_desc = ("Fréchet distance of the segmenter's pooled features: NOT comparable with published FIDs "
                    "(pass --inception pt_inception-2015-12-05-6726825d.pth or its URL for real FID)")
        notes.append("Inception weights not given (--inception PATH_OR_URL): FID uses segmenter features")
    else:
        feat_net, fid_key, fid_desc = None, None, None
        notes.append("FID skipped: no Inception weights (--inception) and no built-in segmenter features")
    out.mkdir(parents=True, exist_ok=True)

    # --- generate and accumulate
    loader = torch.utils.data.DataLoader(val, batch_size=batch_size, shuffle=False)
    feats = {"real": [], "fake": []}
    logits = {"real": [], "fake": []}
    conf = {"real": 0, "fake": 0}
    pix = {"SSIM": [], "PSNR": [], "sharpness difference": []}
    grid_cols, grid_titles = None, None
    (out / "fake").mkdir(exist_ok=True), (out / "real").mkdir(exist_ok=True)
    done = 0
    t0 = time.time()
    with torch.no_grad():
        bar = tqdm(total=n_total, desc=f"eval {model_name}", unit="img", disable=not progress)
        for batch in loader:
            if done >= n_total:
                break
            k = min(len(batch["label"]), n_total - done)
            batch = {key: v[:k] for key, v in batch.items()}
            b = data.prepare_batch(batch, info, device, edges=model_name == "ecgan")
            cols = module.sample(G, b)
            fake, real, label = cols["fake"].float().clamp(-1, 1), b["image"].float(), b["label"]
            if save_images:
                for i in range(k):
                    _save_png(fake[i], out / "fake" / f"{done + i:05d}.png")
                    _save_png(real[i], out / "real" / f"{done + i:05d}.png")
            if grid_cols is None or grid_cols[0].shape[0] < grid_rows:
                first = ([b["image_a"], b["seg"]] if info.task == "crossview" else
                         [data.colorize(label, info.num_classes)])
                named = [(c if c.shape[1] in (1, 3) else c[:, :1]).float() for c in cols.values()]
                new = [c[:grid_rows].cpu() for c in first + [real] + named]
                grid_titles = (["input", "seg"] if info.task == "crossview" else ["label"]) + ["real"] + list(cols)
                grid_cols = new if grid_cols is None else [torch.cat([a, c], 0)[:grid_rows]
                                                           for a, c in zip(grid_cols, new)]
            if feat_net is not None:
                feats["fake"].append(feat_net(fake).float().cpu())
                feats["real"].append(feat_net(real).float().cpu())
            if seg is not None:
                for key, img in (("fake", fake), ("real", real)):
                    conf[key] = conf[key] + confusion_of(seg, img, label, info, ignore)
            if info.task == "crossview":
                uf, ur = to_unit(fake), to_unit(real)
                pix["SSIM"].append(ssim(uf, ur).cpu())
                pix["PSNR"].append(psnr(uf, ur).cpu())
                pix["sharpness difference"].append(sharpness_difference(uf, ur).cpu())
            if clf is not None:
                logits["fake"].append(clf(fake).float().cpu())
                logits["real"].append(clf(real).float().cpu())
            done += k
            bar.update(k)
        bar.close()
    if done == 0:
        raise EvalError(f"dataset {name!r} ({split}) gave no images")
    if grid_cols is not None:
        data.save_grid(grid_cols, out / "grid.png", titles=grid_titles)

    # --- metrics
    res = Path(str(out))
    hw = f"{info.height}x{info.width}"
    metrics, protocol = {}, {}
    if feat_net is not None:
        if done >= 2:
            metrics[fid_key] = fid_from_features(torch.cat(feats["fake"]), torch.cat(feats["real"]))
            protocol[fid_key] = f"{fid_desc}; {done} generated vs {done} real {split} images at {hw}"
        else:
            notes.append(f"{fid_key} skipped: needs at least 2 images")
    if seg is not None:
        sf, sr = segmentation_scores(conf["fake"], ignore), segmentation_scores(conf["real"], ignore)
        seg_proto = f"{seg_desc}, labels at {hw}, {protocol_ids(info, ignore)}"
        metrics["mIoU"], metrics["pixel accuracy"] = sf["mIoU"], sf["accuracy"]
        metrics["mIoU (real images: segmenter ceiling)"] = sr["mIoU"]
        metrics["pixel accuracy (real images: segmenter ceiling)"] = sr["accuracy"]
        held = getattr(seg, "holdout", None)
        if held:  # the segmenter's own accuracy on real training images it did not fit
            metrics["mIoU (segmenter on held-out training images)"] = held["mIoU"]
            metrics["pixel accuracy (segmenter on held-out training images)"] = held["accuracy"]
        for key in metrics:
            if "mIoU" in key or "accuracy" in key:
                protocol[key] = seg_proto + (f"; {held['num_images']} real training images held out of its "
                                             f"training" if "held-out" in key else "")
    if info.task == "crossview":
        for key, vals in pix.items():
            metrics[key] = float(torch.cat(vals).mean())
            protocol[key] = f"images in [0, 1] (data range 1), {hw}" + (
                f", per-image values capped at {PSNR_CAP} dB" if key != "SSIM" else ", Gaussian window 11, sigma 1.5")
    if clf is not None:
        for key, v in classifier_metrics(torch.cat(logits["fake"]), torch.cat(logits["real"])).items():
            metrics[key] = v
            protocol[key] = f"classifier {classifier}" + (
                "; ground truth = its top-1 class on the real image" if "accuracy" in key else
                "; KL(p_real || p_fake)" if key == "KL" else "")
    results = {
        "checkpoint": ckpt_path, "model": model_name, "step": int(ckpt.get("step", 0)), "dataset": name,
        "split": split, "num_images": done, "resolution": hw, "seconds": round(time.time() - t0, 1),
        "metrics": {k: None if v is None else _finite(float(v)) for k, v in metrics.items()}, "protocol": protocol,
        "notes": notes,
        "images": {"fake": str(res / "fake"), "real": str(res / "real"), "grid": str(res / "grid.png")},
    }
    tmp = out / f"metrics.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, out / "metrics.json")
    print_table(results)
    return results


def print_table(results):
    print(f"\n{results['model']} step {results['step']} on {results['dataset']} ({results['split']}), "
          f"{results['num_images']} images at {results['resolution']}")
    w = max([len(k) for k in results["metrics"]] + [6])
    print(f"| {'metric':<{w}} | {'value':>9} | protocol")
    print(f"|{'-' * (w + 2)}|{'-' * 11}|---------")
    for k, v in results["metrics"].items():
        val = "n/a" if v is None else f"{v:.4f}"
        print(f"| {k:<{w}} | {val:>9} | {results['protocol'].get(k, '')}")
    for n in results["notes"]:
        print(f"note: {n}")
    print(f"wrote {results['images']['grid']} and metrics.json beside it")


# -----------------------------------------------------------------------------------------------------------------
# The papers' explanatory figures from a checkpoint: `python eval.py --figures --ckpt RUN/ckpt_latest.pt`
#   LGGAN Fig. 12  class-specific feature maps F_c = f' * M_c and per-class images of the local generator G_l
#   LGGAN Fig. 13  semantic maps of generated images (the segmenter on them), ECGAN Fig. 7 the same with I' and I''
#   ECGAN Fig. 6   generated edge maps I_e' and attention maps sigmoid(I_e') (Eq. 1)
#   SAU Fig. 5     learned SAU kernels (k x k) at chosen locations, beside the label window they weigh

def _seg_columns(seg, images, num_classes):
    import data
    return data.colorize(segment(seg, images.float().clamp(-1, 1)), num_classes)


def _pick_classes(label, info, n=3, prefer=("road", "tree", "car")):
    """Fig. 12 shows road, vegetation and cars; take those where present, then the largest other classes."""
    area = torch.bincount(label.flatten().cpu(), minlength=info.label_nc)[:info.num_classes]
    names = list(info.class_names) or [str(c) for c in range(info.num_classes)]
    chosen = [names.index(p) for p in prefer if p in names and area[names.index(p)] > 0][:n]
    for c in area.argsort(descending=True).tolist():
        if len(chosen) < n and area[c] > 0 and c not in chosen:
            chosen.append(c)
    return chosen, names


def _channel_image(x, m):
    """Feature channel (B, H, W) inside masks m (B, 1, H, W) -> (B, 1, H, W) in [-1, 1]: min to 99th percentile of
    the values inside the masks of the whole batch (rows stay comparable); white outside the masks."""
    inside = x[m[:, 0] > 0]
    if inside.numel() == 0:
        return torch.ones_like(m)
    lo, hi = inside.min(), torch.quantile(inside.float()[:100000], 0.99)
    v = ((x - lo) / (hi - lo).clamp_min(1e-8)).clamp(0, 1) * 2 - 1
    return torch.where(m > 0, v.unsqueeze(1), torch.ones_like(m))


def figure_lggan_class_features(G, b, info, path, n_channels=2):
    """Fig. 12: per chosen class c, the local generator's class image I_c and the n_channels channels of
    F_c = f' * M_c (Eq. 2) with the largest mean activation inside M_c; white outside M_c."""
    import data
    g = getattr(G, "module", G)
    feats = {}
    hook = g.local_gen.up.register_forward_hook(lambda m, i, o: feats.__setitem__("f", o))
    try:
        out = G(b["input"], b["onehot"])
    finally:
        hook.remove()
    f = feats["f"].float()                                        # f': (B, ngf, H, W)
    classes, names = _pick_classes(b["label"], info)
    idx = out["class_idx"].tolist()
    cols, titles = [data.colorize(b["label"], info.num_classes), out["local"], out["fake"]], ["label", "local", "fake"]
    for c in classes:
        m = b["onehot"][:, c:c + 1].float()                       # M_c: (B, 1, H, W)
        fc = f * m                                                # Eq. 2
        img = out["class_images"][:, idx.index(c)] if c in idx else torch.zeros_like(out["fake"])
        cols.append(torch.where(m > 0, img, torch.ones_like(img)))  # I_c, white outside M_c
        titles.append(f"I_{names[c]}")
        act = fc.sum((0, 2, 3)) / m.sum().clamp_min(1)
        for ch in act.argsort(descending=True)[:n_channels].tolist():
            cols.append(_channel_image(fc[:, ch], m))
            titles.append(f"F_{names[c]} ch{ch}")
    data.save_grid(cols, path, titles=titles)
    return path


def figure_semantic_maps(G, module, model_name, b, info, seg, path):
    """LGGAN Fig. 13 / ECGAN Fig. 7: label | generated | segmenter on generated | real | segmenter on real.
    ECGAN shows both I' ('Ours I') and I'' ('Ours II')."""
    import data
    cols = module.sample(G, b)
    out = [data.colorize(b["label"], info.num_classes)]
    titles = ["label"]
    shown = [("intermediate", "I'"), ("fake", "I''")] if model_name == "ecgan" and "intermediate" in cols else \
        [("fake", "fake")]
    for key, name in shown:
        out += [cols[key].float().clamp(-1, 1), _seg_columns(seg, cols[key], info.num_classes)]
        titles += [name, f"seg({name})"]
    out += [b["image"], _seg_columns(seg, b["image"], info.num_classes)]
    titles += ["real", "seg(real)"]
    data.save_grid(out, path, titles=titles)
    return path


def figure_ecgan_edges(G, module, b, info, path):
    """ECGAN Fig. 6: label | generated edge map I_e' | attention sigmoid(I_e') | fake | Canny edges of the real."""
    import data
    cols = module.sample(G, b)
    real_edge = b["edge"] * 2 - 1 if "edge" in b else data.canny(b["image"]) * 2 - 1
    data.save_grid([data.colorize(b["label"], info.num_classes), cols["edge"], cols["attention"], cols["fake"],
                    real_edge, b["image"]], path,
                   titles=["label", "edge I_e'", "attention", "fake", "real edges", "real"])
    return path


def _pick_locations(lab, k, s, n=3, seed=0):
    """n output pixels (y, x) on class boundaries (where a kernel can show that it follows semantics, Fig. 5),
    at least k*s from the borders so the whole window lies inside the map; random interior ones if too few."""
    H, W = lab.shape
    edge = torch.zeros_like(lab, dtype=torch.bool)
    edge[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    edge[1:, :] |= lab[1:, :] != lab[:-1, :]
    margin = k * s
    inside = torch.zeros_like(edge)
    inside[margin:H - margin, margin:W - margin] = True
    cand = (edge & inside).nonzero()
    if len(cand) < n:
        cand = inside.nonzero()
    gen = torch.Generator().manual_seed(seed)
    picks = []
    for i in torch.randperm(len(cand), generator=gen).tolist():  # spread out: at least W/8 apart
        y, x = cand[i].tolist()
        if all(abs(y - py) + abs(x - px) > W // 8 for py, px in picks):
            picks.append((y, x))
        if len(picks) == n:
            break
    return picks


def _label_window(lab_in, y, x, k, s, window):
    """Class ids (k, k) of the taps the kernel at output pixel (y, x) weighs (sau.py's two window rules);
    -1 outside the map (zero padding)."""
    r = k // 2
    d = torch.arange(-r, r + 1)
    if window == "expanded":  # block of the nearest-expanded map around (y, x)
        ys, xs = torch.div(y + d, s, rounding_mode="floor"), torch.div(x + d, s, rounding_mode="floor")
        ys = torch.where((y + d >= 0) & (y + d < lab_in.shape[0] * s), ys, -1)
        xs = torch.where((x + d >= 0) & (x + d < lab_in.shape[1] * s), xs, -1)
    else:                     # block of the input around floor((y, x) / s)
        ys, xs = y // s + d, x // s + d
    ok = (ys[:, None] >= 0) & (ys[:, None] < lab_in.shape[0]) & (xs[None] >= 0) & (xs[None] < lab_in.shape[1])
    out = lab_in[ys.clamp(0, lab_in.shape[0] - 1)][:, xs.clamp(0, lab_in.shape[1] - 1)]
    return torch.where(ok, out, -1)


def figure_sau_kernels(G, module, b, info, path, rows=2, cell=12):
    """SAU Fig. 5: per sample, the generated image and the label with three locations marked, then per location
    the learned k x k kernel (brightness = weight, normalised to its maximum) beside the label window it weighs.
    The title of each kernel gives its mass on taps of the location's own class against that class's share of
    the window (a kernel that follows semantics puts more mass there than the share)."""
    import numpy as np
    from PIL import Image, ImageDraw
    import data
    import sau
    g = getattr(G, "module", G)
    saus = [m for m in g.modules() if isinstance(m, sau.SAU)]
    if not saus:
        return None
    inputs = {}
    hooks = [m.register_forward_hook(lambda m, i, o: inputs.__setitem__(m, (i[0], o.shape[-2:]))) for m in saus]
    try:
        fake = module.sample(G, b)["fake"].float().clamp(-1, 1)
    finally:
        for h in hooks:
            h.remove()
    # the SAU with the finest output (ties: the first in module order, the global generator's trunk)
    layer = max(saus, key=lambda m: (inputs[m][1][0] * inputs[m][1][1], -saus.index(m)))
    name = next(n for n, m in g.named_modules() if m is layer)
    x_in, (oh, ow) = inputs[layer]
    with torch.no_grad():
        kern = layer.kernels(x_in).float().cpu()                 # (B, k*k, sH, sW)
    k, s = layer.k, layer.scale
    H, W = info.height, info.width
    lab = b["label"].cpu()
    lab_out = F.interpolate(lab[:, None].float(), size=(oh, ow), mode="nearest")[:, 0].long()
    lab_in = F.interpolate(lab[:, None].float(), size=x_in.shape[-2:], mode="nearest")[:, 0].long()
    to_np = lambda t: ((t.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    pal = ((data.colorize(torch.arange(info.label_nc)[None, None], info.num_classes)[0, :, 0].T + 1) * 127.5).round()
    colours = [(255, 0, 0), (0, 200, 255), (255, 220, 0)]
    ksz = k * cell
    pad, top = 4, 14
    rows = min(rows, fake.shape[0])
    width = 2 * (W + pad) + 3 * (2 * ksz + 3 * pad) + pad
    canvas = Image.new("RGB", (width, top + rows * (max(H, ksz + 12) + pad) + pad + 14), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 1), f"SAU kernels of {name} ({k}x{k}, x{s}, window={layer.window}): kernel | label window",
              fill=(0, 0, 0))
    for r in range(rows):
        y0 = top + pad + r * (max(H, ksz + 12) + pad)
        img = Image.fromarray(to_np(fake[r].cpu()))
        labimg = Image.fromarray(to_np(data.colorize(lab[r:r + 1], info.num_classes)[0]))
        locs = _pick_locations(lab_out[r], k, s, seed=r)
        for img_ in (img, labimg):
            d = ImageDraw.Draw(img_)
            for (y, x), col in zip(locs, colours):
                cy, cx = y * H // oh, x * W // ow                 # output pixel -> image pixel
                d.rectangle([cx - 2, cy - 2, cx + 2, cy + 2], outline=col)
        canvas.paste(img, (pad, y0))
        canvas.paste(labimg, (2 * pad + W, y0))
        x0 = 2 * (W + pad) + pad
        for (y, x), col in zip(locs, colours):
            w = kern[r, :, y, x].view(k, k)
            win = _label_window(lab_in[r], y, x, k, s, layer.window)
            own = win[k // 2, k // 2]                             # the class the centre tap reads
            mass, share = float(w[win == own].sum()), float((win == own).float().mean())
            kimg = (w / w.max().clamp_min(1e-12) * 255).round().byte().numpy()
            kimg = Image.fromarray(np.repeat(kimg[:, :, None], 3, 2)).resize((ksz, ksz), Image.NEAREST)
            wcol = torch.where(win[..., None] >= 0, pal[win.clamp(0)], torch.zeros(3))
            wimg = Image.fromarray(wcol.byte().numpy()).resize((ksz, ksz), Image.NEAREST)
            canvas.paste(kimg, (x0, y0 + 12))
            canvas.paste(wimg, (x0 + ksz + pad, y0 + 12))
            draw.rectangle([x0 - 1, y0 + 11, x0 + ksz, y0 + 12 + ksz], outline=col)
            draw.text((x0, y0), f"{mass:.2f} vs {share:.2f}", fill=col if col != (255, 220, 0) else (160, 130, 0))
            x0 += 2 * ksz + 3 * pad
    draw.text((pad, canvas.height - 13), "numbers: kernel mass on taps of the location's class vs their share",
              fill=(0, 0, 0))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def make_figures(ckpt_path, out=None, num=4, device="auto", segmenter=None, seg_steps=300, dataset=None,
                 dataroot=None, batch_size=8, progress=True):
    """Write every figure that applies to the checkpoint's model into out (default <ckpt folder>/figures).
    Returns {figure name: path}; prints a line per figure (and why one is skipped)."""
    import data
    ckpt_path = str(ckpt_path)
    device = _device(device)
    ckpt, module, cfg, info, G = open_checkpoint(ckpt_path, device)
    model_name, tcfg = ckpt["model"], ckpt.get("train_cfg", {})
    if info.task != "semantic":
        raise EvalError(f"{ckpt_path}: --figures is for semantic image synthesis checkpoints, got {info.task!r}")
    root = dataroot or tcfg.get("dataroot")
    val, name, _ = _val_set(data, dataset or tcfg.get("dataset", "synthetic"), root, info,
                            from_ckpt=not dataroot and bool(root))
    out = Path(out) if out else Path(ckpt_path).parent / "figures"
    batch = next(iter(torch.utils.data.DataLoader(val, batch_size=min(num, len(val)), shuffle=False)))
    b = data.prepare_batch(batch, info, device, edges=model_name == "ecgan")
    notes, written = [], {}
    seg, seg_desc = find_segmenter(segmenter, [out, Path(ckpt_path).parent], name, info, root, seg_steps,
                                   batch_size, device, notes, progress)
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        if model_name == "lggan":
            if getattr(G, "local_gen", None) is not None:
                written["lggan_fig12"] = figure_lggan_class_features(G, b, info, out / "lggan_fig12_class_features.png")
            else:
                notes.append("LGGAN Fig. 12 skipped: this checkpoint has no local generator (Table 9 B1)")
        if model_name == "ecgan":
            if cfg.use_edge:
                written["ecgan_fig6"] = figure_ecgan_edges(G, module, b, info, out / "ecgan_fig6_edges_attention.png")
            else:
                notes.append("ECGAN Fig. 6 skipped: this checkpoint has no edge generator (use_edge false)")
        fig = {"lggan": "lggan_fig13", "ecgan": "ecgan_fig7"}.get(model_name, model_name)  # gaugan: the baseline
        if seg is not None:
            written[fig] = figure_semantic_maps(G, module, model_name, b, info, seg, out / f"{fig}_semantic_maps.png")
            notes.append(f"semantic maps by the {seg_desc}")
        else:
            notes.append(f"{fig} skipped: no segmenter (--segmenter PATH or --seg-steps > 0)")
        path = figure_sau_kernels(G, module, b, info, out / "sau_fig5_kernels.png")
        if path is not None:
            written["sau_fig5"] = path
        else:
            notes.append(f"SAU Fig. 5 skipped: this {model_name} checkpoint has no SAU layer "
                         f"(upsample={getattr(cfg, 'upsample', 'nearest')!r}; train with --upsample sau)")
    for key, p in written.items():
        print(f"wrote {p}")
    for n in notes:
        print(f"note: {n}")
    return written


def train_segmenter_cli(args):
    """--train-segmenter: train on real training images (some held out), cache it, report its mIoU on real
    validation images."""
    import data
    size = data.default_size(args.dataset, args.height, args.width, small=True)
    plain = data.make_dataset(args.dataset, dataroot=args.dataroot or None, split="train", size=size, crop=False,
                              flip=False)  # checks the data before anything is trained or written
    info = plain.info
    out = Path(args.out or os.path.join("runs", "segmenter"))
    device = _device(args.device)
    notes = []
    path = _segmenter_cache_path(out, args.dataset, info)
    if path.is_file():
        print(f"using the segmenter cached at {path} (delete it to train a new one)")
    seg, desc = find_segmenter(None, [out], args.dataset, info, args.dataroot, args.seg_steps, args.batch_size,
                               device, notes, progress=True)
    if seg is None:
        raise EvalError("--seg-steps 0: nothing to train")
    val, _, split = _val_set(data, args.dataset, args.dataroot, info)
    ignore = default_ignore(info) if args.ignore is None else args.ignore
    s = segmenter_scores(seg, val, info, args.batch_size, device, ignore, num=args.num)
    result = {"segmenter": str(path), "dataset": args.dataset, "split": split, "num_images": s["num_images"],
              "resolution": f"{info.height}x{info.width}", "evaluated ids": protocol_ids(info, ignore),
              "mIoU (real images: ceiling)": s["mIoU"], "pixel accuracy (real images)": s["accuracy"],
              "held-out training images": getattr(seg, "holdout", None), "notes": notes}
    tmp = path.with_suffix(f".json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, path.with_suffix(".json"))
    print(json.dumps(result, indent=2))
    return result


def _check_args(p, args):
    """One clear line (argparse's error) for a value out of range, before anything is read or written."""
    for name in ("num", "batch_size"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')} {v}: expected an integer >= 1")
    if args.seg_steps is not None and args.seg_steps < 0:
        p.error(f"--seg-steps {args.seg_steps}: expected an integer >= 0 (0: no built-in segmenter)")
    for name in ("height", "width"):
        v = getattr(args, name)
        if v < 0:
            p.error(f"--{name} {v}: expected a positive size in pixels (0: the dataset's default)")
    try:
        dev = torch.device("cpu" if args.device == "auto" else args.device)
    except RuntimeError:
        p.error(f"--device {args.device!r}: expected auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device!r}: no CUDA device is visible")
    if dev.type not in ("cpu", "cuda"):
        p.error(f"--device {args.device!r}: expected auto, cpu, cuda or cuda:N")
    if args.ignore is not None and any(i < 0 for i in args.ignore):
        p.error(f"--ignore {args.ignore}: expected class ids >= 0")


def main(argv=None):
    import data
    p = data.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ckpt", help="training checkpoint (e.g. runs/lggan/ckpt_latest.pt)")
    p.add_argument("--train-segmenter", action="store_true", help="train and cache the built-in segmenter only")
    p.add_argument("--dataset", default=None,
                   help="default: the checkpoint's dataset (synthetic for --train-segmenter)")
    p.add_argument("--dataroot", default=None)
    p.add_argument("--out", default=None, help="output folder (default: <ckpt folder>/eval)")
    p.add_argument("--num", type=int, default=None, help="evaluate the first N validation images (default: all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 ...")
    p.add_argument("--inception", default=None,
                   help=f"pytorch-fid weights: a path or URL (e.g. {FID_WEIGHTS_URL})")
    p.add_argument("--segmenter", default=None,
                   help="TorchScript segmenter or built-in segmenter checkpoint; without it the built-in one is\n"
                        "trained first (on real training images, ~10%% held out) and cached in --out")
    p.add_argument("--classifier", default=None, help="TorchScript scene classifier (cross-view top-k, KL, IS)")
    p.add_argument("--seg-steps", type=int, default=None,
                   help=f"steps of the built-in segmenter when none is cached (default: {SEG_EPOCHS} passes over\n"
                        f"its images, {SEG_STEPS_MIN}..{SEG_STEPS_MAX}; 0: no segmenter, no mIoU)")
    p.add_argument("--ignore", type=int, nargs="*", default=None,
                   help="class ids left out of mIoU/accuracy (default: dontcare; Cityscapes is scored on its\n"
                        "19 train ids, label ids mapped as the official definitions)")
    p.add_argument("--height", type=int, default=0, help="--train-segmenter only (else the checkpoint's); 0: the "
                                                          "dataset's default")
    p.add_argument("--width", type=int, default=0, help="--train-segmenter only (else the checkpoint's)")
    p.add_argument("--no-images", action="store_true", help="do not write the per-image PNG files")
    p.add_argument("--figures", action="store_true",
                   help="write the papers' explanatory figures for --ckpt (LGGAN Figs. 12, 13; ECGAN Figs. 6, 7;\n"
                        "SAU Fig. 5) into --out (default <ckpt folder>/figures); --num rows (default 4)")
    args = p.parse_args(argv)
    _check_args(p, args)
    try:
        if args.train_segmenter:
            args.dataset = args.dataset or "synthetic"
            return train_segmenter_cli(args)
        if not args.ckpt:
            p.error("--ckpt PATH is required (or --train-segmenter)")
        if args.figures:
            return make_figures(args.ckpt, out=args.out, num=args.num or 4, device=args.device,
                                segmenter=args.segmenter, seg_steps=args.seg_steps, dataset=args.dataset,
                                dataroot=args.dataroot, batch_size=args.batch_size)
        return evaluate(args.ckpt, dataset=args.dataset, dataroot=args.dataroot, out=args.out, num=args.num,
                        batch_size=args.batch_size, device=args.device, inception=args.inception,
                        segmenter=args.segmenter, classifier=args.classifier, seg_steps=args.seg_steps,
                        ignore=args.ignore, save_images=not args.no_images)
    except (EvalError, ValueError) as e:  # ValueError: data.DatasetError, unknown dataset names
        print(f"eval.py: error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)


def one_line(e):
    """The line of an error message that names the problem (from a DataLoader worker: the re-raised error's)."""
    lines = str(e).strip().splitlines() or [type(e).__name__]
    return lines[-1].split(": ", 1)[-1] if lines[0].startswith("Caught ") else lines[0]


if __name__ == "__main__":
    main()
