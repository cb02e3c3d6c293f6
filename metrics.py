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
  sharper metrics   boundary mIoU / accuracy in a band of d pixels around label boundaries (boundary_band), the IoU
                    of small classes (small_class_ids: pole, sign, person on the synthetic scenes), and class-
                    conditional realism: per class, the sliced Wasserstein distance between 7x7 patches of generated
                    and real images centred inside that class (ClassPatches, class_swd); no pretrained network.
  edge F-score      precision / recall / F1 of a generated edge map (ECGAN's I_e' at sigmoid > 0.5) against the
                    Canny edges of the real image, within a tolerance of t pixels (generated_edges,
                    edge_match_counts, edge_fscore).
  embeddings        ECGAN Sec. 3.3's "intra-class compactness and inter-class dispersion" of the contrastive
                    embeddings: mean intra- and inter-class cosine distance over pairs of distinct pixels and their
                    ratio (balanced_pixels, embedding_sums, structure_from_sums, embedding_structure).
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


def scored_label(label, info):
    """The label map in eval_classes(info)'s ids (Cityscapes: train ids, 255 for every other id)."""
    lut, _ = eval_classes(info)
    if lut is None:
        return label
    lut = lut.to(label.device)
    return lut[label.clamp(0, len(lut) - 1)]


@torch.no_grad()
def scored_prediction(seg, image, label, info):
    """(pred, label, n): the segmenter's prediction on `image` and the label, both in eval_classes(info)'s ids. Where a
    lut applies, predictions over the dataset's label ids (the built-in segmenter) are mapped like the labels; a
    segmenter with exactly n outputs (a DRN exported over Cityscapes' 19 train ids) is read as predicting those."""
    lut, n = eval_classes(info)
    logits = seg(image)
    if logits.shape[-2:] != image.shape[-2:]:
        logits = F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
    pred = logits.argmax(1)
    if lut is not None:
        label = scored_label(label, info)
        if logits.shape[1] != n:
            lut = lut.to(pred.device)
            pred = lut[pred.clamp(0, len(lut) - 1)]
    return pred, label, n


@torch.no_grad()
def confusion_of(seg, image, label, info, ignore=()):
    """Confusion matrix (n, n+1) of the segmenter on `image` against `label`, in eval_classes(info)'s ids
    (scored_prediction says how predictions are mapped)."""
    pred, label, n = scored_prediction(seg, image, label, info)
    return confusion_matrix(pred, label, n, ignore)


@torch.no_grad()
def confusions_of(seg, image, label, info, ignore=(), band_px=0):
    """{"all": confusion_of's matrix, "band": the same counted only inside boundary_band(label, band_px)} (no "band"
    when band_px is 0); one forward pass of the segmenter for both."""
    pred, label, n = scored_prediction(seg, image, label, info)
    out = {"all": confusion_matrix(pred, label, n, ignore)}
    if band_px:
        band = boundary_band(label, band_px, valid_mask(label, n, ignore))
        out["band"] = confusion_matrix(pred[band], label[band], n, ignore)
    return out


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
# Sharper metrics: boundary band, small objects, class-conditional patch realism

# Small classes whose IoU is reported apart (what class-specific generation, LGGAN Eqs. 2-5 / ECGAN Eqs. 6-7,
# claims to improve): the thin things of the synthetic scenes, and their Cityscapes train-id counterparts.
SMALL_CLASS_NAMES = {"synthetic": ["pole", "sign", "person"],
                     "cityscapes": ["pole", "traffic light", "traffic sign", "person", "rider"]}


def default_band_px(height):
    """The boundary band's half-width: 3 pixels at 64 pixels high, scaled with the height (at least 1)."""
    return max(1, round(3 * height / 64))


def valid_mask(label, n, ignore=()):
    """(B, H, W) bool: pixels whose label is scored (an id in [0, n) not in `ignore`)."""
    valid = (label >= 0) & (label < n)
    for i in ignore:
        valid &= label != i
    return valid


def boundary_band(label, d, valid=None):
    """(B, H, W) bool: valid pixels within d pixels (Chebyshev distance, so a (2d+1)^2 window) of a valid pixel of
    another class: a band d pixels wide on each side of every label boundary. Computed as max-pool != min-pool of
    the label over the window, with invalid (dontcare / ignored) pixels set so they never raise the max nor lower
    the min: a boundary against dontcare or the image border is not a boundary."""
    if d < 1:
        raise ValueError(f"boundary band of {d} pixels: expected d >= 1")
    valid = torch.ones_like(label, dtype=torch.bool) if valid is None else valid
    lab = label.float().unsqueeze(1)                                        # (B, 1, H, W)
    v = valid.unsqueeze(1)
    hi = torch.where(v, lab, torch.full_like(lab, -1.0))
    lo = torch.where(v, lab, torch.full_like(lab, float(2 ** 20)))
    k = 2 * d + 1
    mx = F.max_pool2d(hi, k, stride=1, padding=d)
    mn = -F.max_pool2d(-lo, k, stride=1, padding=d)
    return ((mx > mn) & v).squeeze(1)


def generated_edges(edge_map):
    """ECGAN's generated edge map I_e' (B, 3, H, W), a tanh output in [-1, 1] (its real target is the Canny map in
    {-1, 1}, ecgan.edge_to_image) -> (B, 1, H, W) bool edges: channel mean > 0, i.e. sigmoid(I_e') > 0.5, the
    threshold where Eq. 1's attention passes more than half of I_i'."""
    return edge_map.float().mean(1, keepdim=True) > 0


def edge_match_counts(pred, true, tol=1):
    """Counts for the edge F-score of binary edge maps pred, true (B, 1, H, W): a predicted edge pixel is correct if
    a true edge pixel lies within tol pixels (Chebyshev distance: a (2 tol + 1)^2 window, by max-pool dilation of
    the true map), and a true edge pixel is found if a predicted one lies within tol (the same, the other way).
    No one-to-one matching (unlike BSDS's): a thick prediction along a thin true edge scores full precision.
    Returns a (4,) float64 tensor [correct predicted, predicted, found true, true]; sum it over batches."""
    if tol < 0:
        raise ValueError(f"edge tolerance of {tol} pixels: expected tol >= 0")
    if pred.shape != true.shape or pred.dim() != 4 or pred.shape[1] != 1:
        raise ValueError(f"edge maps must both be (B, 1, H, W), got {tuple(pred.shape)} and {tuple(true.shape)}")
    p, t = pred.float() > 0.5, true.float() > 0.5
    grow = lambda x: F.max_pool2d(x.float(), 2 * tol + 1, stride=1, padding=tol) > 0  # dilation by tol px
    return torch.tensor([(p & grow(t)).sum().item(), p.sum().item(), (t & grow(p)).sum().item(), t.sum().item()],
                        dtype=torch.float64)


def edge_fscore(counts):
    """(precision, recall, F1) from summed edge_match_counts. Precision is NaN without predicted edges, recall NaN
    without true ones; F1 = 2PR / (P + R), 0 when P + R = 0 or when only one side has edges, NaN when neither has."""
    cp, n_p, ft, n_t = (float(c) for c in counts)
    prec = cp / n_p if n_p else float("nan")
    rec = ft / n_t if n_t else float("nan")
    if not n_p and not n_t:
        return prec, rec, float("nan")
    if not n_p or not n_t or prec + rec == 0:
        return prec, rec, 0.0
    return prec, rec, 2 * prec * rec / (prec + rec)


def balanced_pixels(labels, per_class, gen, ignore=()):
    """Indices of at most per_class pixels of each class in labels (M,), drawn without replacement with the
    torch.Generator gen (seeded by the caller), classes in `ignore` left out: the class-balanced sample that
    embedding_structure expects (as ecgan.sample_anchors draws Eq. 5's anchors, but seeded)."""
    labels = labels.cpu()
    picks = [labels.new_zeros(0)]
    for c in labels.unique().tolist():
        if c in ignore:
            continue
        idx = (labels == c).nonzero().squeeze(1)
        picks.append(idx[torch.randperm(len(idx), generator=gen)[:per_class]])
    return torch.cat(picks)


def embedding_sums(emb, labels, num_classes):
    """Per class, of the L2-normalised embeddings (Eq. 4) emb (M, D) with classes labels (M,) in [0, num_classes):
    (sum of the vectors (num_classes, D), sum of their squared norms (num_classes,), count (num_classes,)), float64.
    Additive over batches, so embedding_structure's numbers come from a stream in O(num_classes * D) memory."""
    if emb.dim() != 2 or labels.shape != emb.shape[:1]:
        raise ValueError(f"embeddings must be (M, D) with labels (M,), got {tuple(emb.shape)} and "
                         f"{tuple(labels.shape)}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"embedding labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    z = F.normalize(emb.detach().double(), dim=1)  # a zero vector stays zero: cosine 0 with everything
    lab = labels.long().to(z.device)
    s = z.new_zeros(num_classes, z.shape[1]).index_add_(0, lab, z)
    q = z.new_zeros(num_classes).index_add_(0, lab, (z * z).sum(1))
    n = z.new_zeros(num_classes).index_add_(0, lab, torch.ones_like(q[:1]).expand(len(lab)))
    return s.cpu(), q.cpu(), n.cpu()


def structure_from_sums(s, q, n, average="class"):
    """ECGAN Sec. 3.3 (ii), "intra-class compactness and inter-class dispersion", of an embedding space: cosine
    distance 1 - cos(z_i, z_j) over pairs of DISTINCT pixels i != j, from embedding_sums (s, q, n). Closed forms:
    the cosines summed over a class's ordered pairs are |s_c|^2 - q_c (the i == j terms removed), between classes
    c != d they are s_c . s_d. average="class" (our reading): the mean over each class's pairs, then over classes
    (intra, classes with >= 2 pixels) or over class pairs (inter, classes with >= 1), so a class counts once however
    many pixels it has; "pair": the mean over all same-class (intra) or different-class (inter) pixel pairs.
    Returns {"intra", "inter", "ratio"}: ratio = intra / inter, lower = better structured. NaN (JSON null) where
    undefined: intra without a class of 2 pixels, inter without 2 classes, the ratio when inter is NaN or < 1e-9
    (no spread between classes, e.g. every embedding the same: 0 / 0). Distances are clamped at 0 (rounding)."""
    if average not in ("class", "pair"):
        raise ValueError(f"embedding structure average={average!r}: expected 'class' or 'pair'")
    s, q, n = s.double(), q.double(), n.double()
    same = (s * s).sum(1) - q                      # (C,) cosines over ordered pairs i != j within each class
    cross = s @ s.T                                 # (C, C) cosines over pairs between classes (off-diagonal)
    pairs_same, pairs_cross = n * (n - 1), n[:, None] * n[None, :]
    off = ~torch.eye(len(n), dtype=torch.bool)
    nan = float("nan")
    if average == "class":
        has2, pres = n >= 2, (n[:, None] >= 1) & (n[None, :] >= 1) & off
        intra = float((1 - same[has2] / pairs_same[has2]).mean()) if has2.any() else nan
        inter = float((1 - cross[pres] / pairs_cross[pres]).mean()) if pres.any() else nan
    else:
        ps, pc = float(pairs_same.sum()), float(pairs_cross[off].sum())
        intra = 1 - float(same.sum()) / ps if ps else nan
        inter = 1 - float(cross[off].sum()) / pc if pc else nan
    intra, inter = (max(v, 0.0) if v == v else v for v in (intra, inter))
    ratio = intra / inter if inter == inter and inter >= 1e-9 else nan
    return {"intra": intra, "inter": inter, "ratio": ratio}


def embedding_structure(emb, labels, average="class"):
    """structure_from_sums of embeddings emb (M, D) with class ids labels (M,) (>= 0), all pairs in closed form
    (O(M D), no M x M matrix). Class-balanced sampling (balanced_pixels) is the caller's job."""
    return structure_from_sums(*embedding_sums(emb, labels, int(labels.max()) + 1 if len(labels) else 0),
                               average=average)


def small_class_ids(info, given=None):
    """Ids (eval_classes' ids) of the small classes: `given` (ids or class names, e.g. from --small_classes), else
    SMALL_CLASS_NAMES for the dataset, else []. ValueError naming a class that is not one."""
    _, n = eval_classes(info)
    names = data.CITYSCAPES_TRAIN_NAMES if info.name == "cityscapes" else list(info.class_names or [])
    wanted = given if given is not None else SMALL_CLASS_NAMES.get(info.name, [])
    ids = []
    for w in wanted:
        w = str(w)
        if w.lstrip("-").isdigit():
            i = int(w)
        elif w in names:
            i = names.index(w)
        else:
            raise ValueError(f"small class {w!r}: not a class of {info.name} "
                             f"({', '.join(names) if names else f'give ids 0..{n - 1}'})")
        if not 0 <= i < n:
            raise ValueError(f"small class {w!r}: expected an id in 0..{n - 1}")
        ids.append(i)
    return sorted(set(ids))


def class_names_of(info):
    """Name of each scored id (eval_classes' ids); the id as a string where the dataset names none."""
    _, n = eval_classes(info)
    names = data.CITYSCAPES_TRAIN_NAMES if info.name == "cityscapes" else list(info.class_names or [])
    return [names[i] if i < len(names) else str(i) for i in range(n)]


def small_object_iou(iou, ids):
    """Mean IoU over the small classes present (finite per-class IoU); NaN when none is."""
    vals = [iou[i] for i in ids if math.isfinite(iou[i])]
    return sum(vals) / len(vals) if vals else float("nan")


class ClassPatches:
    """A seeded uniform sample, without replacement, of at most `cap` k x k patches per class from a stream of image
    batches: the patches whose centre pixel has that class (centres at least k // 2 from the border, so every patch
    lies inside the image). Several image sets aligned to one label map (generated and real) are cut at the SAME
    sampled centres, so they differ only by their pixels. The sample is exact over the whole stream: every candidate
    centre gets a random key and the `cap` largest keys are kept (a reservoir), so memory is cap patches per class."""

    def __init__(self, num_classes, names=("fake", "real"), cap=1024, k=7, seed=0, ignore=()):
        if k < 1 or k % 2 == 0:
            raise ValueError(f"patch size {k}: expected an odd size >= 1")
        self.n, self.names, self.cap, self.k, self.ignore = num_classes, tuple(names), cap, k, set(ignore)
        self.gen = torch.Generator().manual_seed(seed)
        self.keys = {c: torch.empty(0) for c in range(num_classes)}
        self.store = {name: {c: None for c in range(num_classes)} for name in self.names}

    def add(self, label, **images):
        """label (B, H, W); images: name -> (B, C, H, W), one per name given at construction."""
        if set(images) != set(self.names):
            raise ValueError(f"ClassPatches.add: expected images {self.names}, got {tuple(images)}")
        k, r = self.k, self.k // 2
        label = label.cpu()
        images = {name: im.detach().float().cpu() for name, im in images.items()}
        B, H, W = label.shape
        if H < k or W < k:
            raise ValueError(f"images of {H}x{W}: too small for {k}x{k} patches")
        inner = label[:, r:H - r, r:W - r].reshape(-1)                   # centres whose patch lies inside
        h, w = H - 2 * r, W - 2 * r
        dy = torch.arange(k).view(1, k, 1)
        dx = torch.arange(k).view(1, 1, k)
        for c in range(self.n):
            if c in self.ignore:
                continue
            idx = (inner == c).nonzero().squeeze(1)
            if len(idx) == 0:
                continue
            keys = torch.rand(len(idx), generator=self.gen)
            if len(idx) > self.cap:  # only this batch's largest keys can be among the stream's largest
                keys, top = keys.topk(self.cap)
                idx = idx[top]
            b, y, x = idx // (h * w), (idx % (h * w)) // w, idx % w  # (y, x): the patch's top-left corner
            keys = torch.cat([self.keys[c], keys])
            keep = keys.argsort(descending=True)[:self.cap]             # the largest keys first
            self.keys[c] = keys[keep]
            for name, im in images.items():
                p = im[b.view(-1, 1, 1), :, y.view(-1, 1, 1) + dy, x.view(-1, 1, 1) + dx]  # (m, k, k, C)
                p = p.permute(0, 3, 1, 2).reshape(len(b), -1)                             # (m, C * k * k)
                old = self.store[name][c]
                p = p if old is None else torch.cat([old, p])
                self.store[name][c] = p[keep]

    def patches(self, name):
        """class -> (m, C * k * k) patches in random order (a prefix is a uniform subsample); absent classes left out."""
        return {c: p for c, p in self.store[name].items() if p is not None}


def sliced_wasserstein(a, b, num_proj=128, seed=0):
    """Sliced Wasserstein-1 distance between two equal-sized point sets (n, D): the mean over num_proj random unit
    directions (seeded: the same directions for every call with the same D) of the 1-D Wasserstein-1 distance of
    the projections, which for equal counts is the mean absolute difference of the sorted values."""
    if a.shape != b.shape or a.dim() != 2 or len(a) == 0:
        raise ValueError(f"sliced_wasserstein: expected two non-empty (n, D) sets of one shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], num_proj, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa = (a.double() @ dirs).sort(0).values
    pb = (b.double() @ dirs).sort(0).values
    return float((pa - pb).abs().mean())


def class_swd(patches_a, patches_b, min_patches=64, num_proj=128, seed=0):
    """(per class {class: distance}, mean over the classes present in both sets with at least min_patches patches
    each). Each class compares the first m patches of each set, m the smaller count (ClassPatches keeps them in
    random order, so this is a uniform subsample of the larger set)."""
    per = {}
    for c in sorted(set(patches_a) & set(patches_b)):
        m = min(len(patches_a[c]), len(patches_b[c]))
        if m >= min_patches:
            per[c] = sliced_wasserstein(patches_a[c][:m], patches_b[c][:m], num_proj, seed)
    return per, (sum(per.values()) / len(per) if per else float("nan"))


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
