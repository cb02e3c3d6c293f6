"""
fid.py: FID as pytorch-fid computes it (Heusel et al. 2017), without pytorch-fid.

  FIDInceptionV3      pytorch-fid's 'FID' variant of torchvision's InceptionV3: 1008 classes, Mixed_5*, 6b-6e and 7b
                      avg pools with count_include_pad=False, Mixed_7c with a max pool; pool3 2048-d features of
                      images resized to 299x299 bilinearly
  load_fid_inception  its weights file pt_inception-2015-12-05-6726825d.pth (ported from TensorFlow's 2015-12-05
                      graph), from a path or URL, checked key for key
  frechet_distance    ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) of two feature sets in float64, via
                      eigenvalues (exact where covariances are rank-deficient, i.e. with < 2048 images)

Without the weights file eval.py reports the Fréchet distance of the built-in segmenter's features instead,
labelled as not comparable with published FIDs.
"""

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import segmenter
from evalrun import EvalError

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"


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
