"""
The built-in segmenter: a small fully convolutional net (an FCN / DeepLab in miniature), trained on REAL training
images only (segmenter_train.train_segmenter). It stands in for the papers' DRN-D-105 / UperNet-101 / DeepLab-v2
when eval.py measures mIoU (its numbers are not comparable with theirs), and ECGAN's label generator G_l
(ecgan.py) wraps it.
Imports torch only, so that ecgan.py can be copied out with it and nothing else.

    Segmenter          image (B, 3, H, W) in [-1, 1] -> logits (B, label_nc, H, W)
    load_segmenter     the built-in Segmenter from its checkpoint, or a user's TorchScript / torch.export file
    check_state_dict   keys and shapes of a state dict against a model, naming the file on a mismatch

Bad files raise FileNotFoundError or ValueError naming the file (eval.py turns them into its EvalError).
"""

import os
import zipfile

import torch
import torch.nn as nn
import torch.nn.functional as F


def _conv_bn_relu(cin, cout, stride=1, dilation=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Segmenter(nn.Module):
    """image (B, 3, H, W) in [-1, 1] -> logits (B, label_nc, H, W). Stride-4 encoder with dilated context convs,
    bilinear upsampling and a full-resolution skip (an FCN / DeepLab in miniature)."""

    def __init__(self, label_nc, width=32):
        super().__init__()
        self.label_nc, self.width = label_nc, width
        self.stem = _conv_bn_relu(3, width)                                  # (B, w, H, W)
        self.down = nn.Sequential(_conv_bn_relu(width, 2 * width, stride=2),
                                  _conv_bn_relu(2 * width, 4 * width, stride=2))  # (B, 4w, H/4, W/4)
        self.context = nn.Sequential(_conv_bn_relu(4 * width, 4 * width, dilation=2),
                                     _conv_bn_relu(4 * width, 4 * width, dilation=4))
        self.fuse = _conv_bn_relu(5 * width, width)
        self.classify = nn.Conv2d(width, label_nc, 1)

    def encode(self, image):
        skip = self.stem(image)
        return skip, self.context(self.down(skip))

    def features(self, image):
        """Global-average-pooled context features (B, 4w): the stand-in FID feature space."""
        return self.encode(image)[1].mean(dim=(2, 3))

    def forward(self, image):
        skip, ctx = self.encode(image)
        ctx = F.interpolate(ctx, size=skip.shape[-2:], mode="bilinear", align_corners=False)  # (B, 4w, H, W)
        return self.classify(self.fuse(torch.cat([skip, ctx], 1)))


def check_state_dict(model, state, src, what):
    """Raise ValueError naming `src` unless `state` has exactly the model's keys and shapes (BatchNorm's
    num_batches_tracked counters may be absent: older files have none)."""
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    got = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    missing = sorted(set(own) - set(got))
    unexpected = sorted(set(got) - set(own))
    shapes = [f"{k}: {tuple(got[k].shape)} != {tuple(own[k].shape)}" for k in own
              if k in got and tuple(got[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {shapes[:3]})")
        raise ValueError(f"{src} does not match {what}: " + "; ".join(parts))


def is_torchscript(path):
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())
    except zipfile.BadZipFile:
        return False


def freeze(model):
    for p in model.parameters():  # ScriptModules have no requires_grad_()
        p.requires_grad_(False)
    return model


def _first_line(e):
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:150]}"


def load_segmenter(path, info=None, device="cpu"):
    """The built-in Segmenter from its checkpoint, or a TorchScript file (or a torch.export .pt2 file): a user's
    DRN / UperNet / DeepLab export mapping images (B, 3, H, W) in [-1, 1] to logits over the dataset's label ids
    (any resolution: logits are resized to the labels'). In eval mode, frozen. info: anything with label_nc and
    name (data.DataInfo), to check the number of labels."""
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"segmenter file not found: {path}")
    try:
        if is_torchscript(path):
            return freeze(torch.jit.load(path, map_location=device).eval())
        if path.endswith(".pt2"):  # a torch.export program (TorchScript's successor)
            return freeze(torch.export.load(path).module().to(device))
    except Exception as e:  # a damaged export: RuntimeError from the TorchScript / export loaders
        raise ValueError(f"{path}: cannot load this TorchScript / .pt2 segmenter ({_first_line(e)})") from None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a built-in segmenter checkpoint nor a TorchScript file "
                         f"({_first_line(e)})") from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "segmenter":
        raise ValueError(f"{path}: not a built-in segmenter checkpoint (no kind='segmenter'; a training "
                         f"checkpoint goes to --ckpt) nor a TorchScript file")
    missing = [k for k in ("label_nc", "width", "state") if k not in ckpt]
    if missing:
        raise ValueError(f"{path}: built-in segmenter checkpoint without {missing} (truncated or hand-made)")
    if info is not None and ckpt["label_nc"] != info.label_nc:
        raise ValueError(f"{path}: segmenter predicts {ckpt['label_nc']} labels, dataset {info.name!r} has "
                         f"{info.label_nc}")
    model = Segmenter(ckpt["label_nc"], ckpt["width"])
    check_state_dict(model, ckpt["state"], path, "the built-in Segmenter")
    model.load_state_dict(ckpt["state"])
    model.holdout = ckpt.get("holdout")  # its own scores on held-out training images, when it has them
    return model.to(device).eval().requires_grad_(False)
