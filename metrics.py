"""
metrics.py: the numbers eval.py reports besides FID, each with the protocol it follows.

  mIoU / accuracy   a segmenter on generated images against the input labels (confusion_matrix,
                    segmentation_scores, confusion_of), as ECGAN (ICLR 2023) and LGGAN / LGGAN++ (2022) measure
                    semantic image synthesis. Cityscapes is scored on the 19 train ids of the official label
                    definitions (eval_classes: the papers' DRN-D-105 protocol); other datasets on their own classes,
                    the dontcare id left out (default_ignore).
  cross-view        SSIM (Wang et al. 2004: Gaussian 11, sigma 1.5), PSNR and sharpness difference (Mathieu et al.
                    2016), as LGGAN's cross-view tables report them; with the user's TorchScript scene classifier
                    (load_classifier, e.g. Places365): top-1/top-5 accuracy, KL and inception-style scores
                    (classifier_metrics).
Pure functions of tensors, except load_classifier (a file) and eval_classes (data.py's Cityscapes ids).
"""

import math
import os

import torch
import torch.nn.functional as F

import data
from evalrun import EvalError
from segmenter import freeze

PSNR_CAP = 100.0  # dB returned for identical images (MSE = 0), so means over a set stay finite


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


@torch.no_grad()
def segment(seg, image):
    """Predicted label ids (B, H, W) at the image's resolution."""
    logits = seg(image)
    if logits.shape[-2:] != image.shape[-2:]:
        logits = F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
    return logits.argmax(1)


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


def load_classifier(path, device):
    """A user's TorchScript (or torch.export .pt2) scene classifier, frozen; EvalError naming the file otherwise."""
    if not os.path.isfile(path):
        raise EvalError(f"classifier file not found: {path}")
    try:
        if str(path).endswith(".pt2"):
            return freeze(torch.export.load(path).module().to(device))
        return freeze(torch.jit.load(path, map_location=device).eval())
    except Exception as e:  # TorchScript raises RuntimeError on a file of another kind
        raise EvalError(f"{path}: not a TorchScript (or .pt2) scene classifier ({type(e).__name__}: "
                        f"{(str(e).splitlines() or [''])[0][:150]})") from None


def finite(x):
    """None for a NaN or infinite float (JSON has neither), else x."""
    return None if isinstance(x, float) and not math.isfinite(x) else x
