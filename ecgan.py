"""
ECGAN: "Edge Guided GANs with Contrastive Learning for Semantic Image Synthesis", Tang, Qi, Sun, Xu, Sebe,
Timofte, Van Gool, ICLR 2023.

The official repository holds no method code; this is a first implementation of the similarity loss, label
generator, pixel-wise contrastive loss, class-specific pixel generation and multi-modality discriminator.
Map of this file (Fig. 1 of the paper):

    attention_transfer        G_t: x * sigmoid(edge) + x, at feature level (Sec. 3.1) and content level (Eq. 1)
    edge_transfer_image       Eq. 1 on the images, with an optional range-preserving reading (eq1_range)
    semantic_reweight         Eq. 2: F_c' = F_c * sigmoid(AvgPool(F_c)) + F_c
    Branch                    G_e / G_i: n = 3 convs (C -> C/2 -> C/4 -> C/8), LeakyReLU before each, conv + tanh
    SemanticPreserving        G_s: concat(F, I', I_e', S) -> N-channel F_c -> Eq. 2 -> C+N+3+3 -> conv + tanh -> I''
    LabelGenerator            G_l: a frozen segmenter (segmenter.py's) that passes gradient to its input only
    ProjectionHead, sample_anchors, pixel_contrastive_loss   G_c: Eq. 5 on class-balanced pixels across the batch
                              (and across ranks: gather_anchors), against a per-class memory bank of earlier steps
    ClassSpecificGenerator    Eqs. 6, 7: several spectral-normed convs per class on the class-masked contrastively
                              learned feature F, summed (Eq. 7); lggan.masked_l1 is Eq. 6 (the form of LGGAN's Eq. 3)
    similarity_loss           Eq. 3: BCE between the M x M maps S^T S and S''^T S'' over labelled pixel pairs
                              (naive, and chunked with its gradient computed block by block)
    ECGANConfig, TABLE3       every hyperparameter, and the ablation rows of Table 3 as switches
    ECGANGenerator            E (GauGAN head + trunk) -> G_e, G_i, G_t -> G_s -> I''; G_l, G_c alongside
    model interface           Config, build, g_step (Eq. 10), d_step (Eqs. 8, 9 on one multi-modality D), sample;
                              needs_edges, needs_segmenter: what train.py must give it (real edges, a trained G_l)

Choices where the paper is silent (each is named again where it is made):
    - I_g (Eq. 7) is an auxiliary output: Eq. 6's L1 and Eq. 5 shape the shared feature F that G_e, G_i and G_s
      decode, but I_g itself enters no adversarial term and not I'' (Eq. 10 lists neither; G_s's input is
      F, I', I_e', S). `class_to_gs=True` also concatenates I_g into G_s's input, for comparison.
    - lambda_l: App. B lists five weights (c, s, l, f, p) and the text five losses (adversarial, similarity,
      contrastive, feature matching, perceptual); Eq. 10 omits the contrastive term, so lambda_l weighs Eq. 5.
      Eq. 6's L1 has no stated weight: lambda_l1 = 1 (LGGAN's).
    - Eq. 3 runs at 1/sim_stride = 1/4 of the image size (Cityscapes 256x512 -> 64x128, M = 8192): M^2 at full
      size is 1.7e10 per image. S' and S'' are area-pooled probabilities, S the nearest-downsampled one-hot.
    - Eq. 3 over the real classes: S without the dontcare channel, so an unlabelled pixel's row is zero and it
      takes part in no pair; S'' without the segmenter's dontcare channel (G_l is trained to ignore it). The
      mean runs over the pairs of labelled pixels of each image, then over the images that have any.
    - Eq. 5: temperature 0.1, projection head (two 1x1 convs) to 256-d, at most 1,024 anchors (100 per class)
      sampled across the batch, dontcare pixels excluded (the pixel-contrast-for-segmentation design,
      REFERENCE.md). Each positive's term has one positive and all negatives in its denominator, as written.
    - Eq. 5 across images (Sec. 3.3): under DDP every rank's anchors are gathered (the local part keeps its
      gradient); a memory bank keeps the last bank_per_class = 200 detached, L2-normalised anchor embeddings of
      each class from earlier G steps as extra positives and negatives, never anchors (FIFO, saved in the
      checkpoint; bank_per_class=0 turns it off). The paper gives no size; see ECGANGenerator.update_bank.
    - Learning rates: App. B gives Adam betas (0, 0.999) only; GauGAN's 1e-4 (G) and 4e-4 (D).
    - G_c's "several convolutional layers" per class: 3 (class_layers; App. B's n for G_i, G_e, G_s) 3x3 convs of
      width 16 (class_width: the first layer then costs what LGGAN's per-class 7x7 conv costs), spectral-normed
      per class; each class image is masked by M_c again, so absent classes give exactly zero.
    - Eq. 1's I' lies in [-2, 2]; eq1_range="half" or "tanh" keeps it in the images' [-1, 1] (default: as written).
    - edge_source="canny" (an oracle, not in the paper): the real Canny edges replace I_e' in Eq. 1 and G_s's input;
      the feature-level transfer keeps G_e's features F_e and G_e still trains against D (Eq. 8).
    - Hinge losses (GauGAN) for the log terms of Eqs. 8, 9; `gan_loss="log"` uses them as written. lambda_c
      weighs the adversarial term on both sides (Eq. 10 puts it on the min-max objective).
    - Eq. 10's L_sim(S, S'): the paper defines only S'' = G_l(I''); S' = G_l(I') here (sim_on_intermediate).

`python ecgan.py` prints the parameter table; bench.py times the fast paths against the naive ones and an ECGAN
step against a GauGAN step.

Where this file reads an ambiguous sentence of the paper, follows the public code instead of the text, or
departs on purpose, the README's "Departures from the papers" table says so and names the flag for the
other reading.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm
from torch.utils.checkpoint import checkpoint

import gaugan
import lggan  # lggan.masked_l1: ECGAN's Eq. 6 has the form of LGGAN's Eq. 3
import segmenter  # G_l's network: the built-in segmenter (or a user's TorchScript export)


def conv(cin, cout, k=3, spectral=True):
    """Size-preserving conv (App. B: 3x3, padding 1), spectral-normed (App. B: "all the layers")."""
    c = nn.Conv2d(cin, cout, k, padding=k // 2)
    return spectral_norm(c) if spectral else c


# ----------------------------------------------------------------------------- edge guided generation (Sec. 3.1)

def attention_transfer(edge, x):
    """G_t: x' = sigmoid(edge) * x + x. Feature level: F_i^j = sigmoid(F_e^j) * F_i^j + F_i^j. Content level
    (Eq. 1): I' = sigmoid(I_e') * I_i' + I_i'. The residual keeps what the attention multiplies away; note it
    lets I' range over [-2, 2]."""
    return torch.sigmoid(edge) * x + x


EQ1_RANGES = ("paper", "half", "tanh")
EDGE_SOURCES = ("generated", "canny")


def edge_transfer_image(edge_map, image, out_range="paper"):
    """Eq. 1, content level: I' = sigmoid(I_e') * I_i' + I_i'. I_i' is a tanh output in [-1, 1], so I' lies in
    [-2, 2], twice the range of real images, and the Table 3 rows without G_s output I' as the image (D and the
    metrics see it). out_range: "paper" Eq. 1 as written (default); "half" I' / 2, back in [-1, 1] with the same
    sign and relative contrast; "tanh" tanh(I'), in (-tanh 2, tanh 2) = (-0.96, 0.96). The feature-level transfer
    stays as written in every case: features have no range to keep (it can scale them by up to 2 per layer)."""
    x = attention_transfer(edge_map, image)  # Eq. 1
    if out_range == "half":
        return x / 2
    return torch.tanh(x) if out_range == "tanh" else x


class Branch(nn.Module):
    """G_e or G_i: n size-preserving convs halving the width (64 -> 32 -> 16 -> 8 at C = 64), LeakyReLU 0.2 before
    each, and a final LeakyReLU, conv, tanh to 3 channels. The generator steps through `convs` itself so that G_t
    can refine the image features between layers. Widths stop at 8, the paper's narrowest: at the cpu preset's
    C = 16 plain halving gives 2 channels before RGB, and images came out as checkerboard (E + G_i, 32x64,
    800 steps, seeds 0 and 1: mIoU 0.18 and 0.33 without the floor, 0.40 and 0.49 with it)."""

    def __init__(self, nf, n=3, spectral=True):
        super().__init__()
        widths = [max(nf // 2**j, min(8, nf)) for j in range(n + 1)]
        self.convs = nn.ModuleList(conv(a, b, 3, spectral) for a, b in zip(widths[:-1], widths[1:]))
        self.out = conv(widths[-1], 3, 3, spectral)

    def to_rgb(self, x):
        return torch.tanh(self.out(F.leaky_relu(x, 0.2)))  # (B, C/8, H, W) -> (B, 3, H, W)


# ----------------------------------------------------------------------------- semantic preserving (Sec. 3.2)

def semantic_reweight(fc):
    """Eq. 2: gamma' = sigmoid(AvgPool(F_c)) per class channel (adaptive pooling, App. B); F_c' = F_c * gamma' + F_c."""
    return fc * torch.sigmoid(F.adaptive_avg_pool2d(fc, 1)) + fc


class SemanticPreserving(nn.Module):
    """G_s: the paper's three convs. concat(F, I', I_e', S) -> conv -> F_c (N = label_nc channels, one per class)
    -> Eq. 2 -> conv -> F' (C + N + 3 + 3 channels, the size of the input) -> LeakyReLU, conv, tanh -> I''."""

    def __init__(self, in_nc, label_nc, mid_nc, spectral=True):
        super().__init__()
        self.to_classes = conv(in_nc, label_nc, 3, spectral)
        self.expand = conv(label_nc, mid_nc, 3, spectral)
        self.out = conv(mid_nc, 3, 3, spectral)

    def forward(self, x):
        fc = semantic_reweight(self.to_classes(x))  # (B, in_nc, H, W) -> (B, N, H, W), Eq. 2
        return torch.tanh(self.out(F.leaky_relu(self.expand(fc), 0.2)))  # -> (B, C+N+6, H, W) -> (B, 3, H, W)


class LabelGenerator(nn.Module):
    """G_l: a pretrained segmenter (SegFormer in the paper; segmenter.py's built-in one or a TorchScript export here),
    frozen: no parameter of it requires grad and it stays in eval mode (its batch norm must not see generated
    images), yet gradient flows through it to the image it segments."""

    def __init__(self, net):
        super().__init__()
        self.net = net.eval()
        for p in self.net.parameters():  # ScriptModules have no requires_grad_()
            p.requires_grad_(False)

    def train(self, mode=True):
        return super().train(False)  # G.train() must not put the segmenter's batch norm in training mode

    def forward(self, image):
        if any(p.requires_grad for p in self.net.parameters()):
            raise RuntimeError("ecgan.LabelGenerator: the segmenter's parameters require grad; G_l must stay frozen "
                               "(something called requires_grad_(True) on G)")
        with torch.autocast(image.device.type, enabled=False):
            logits = self.net(image.float())
            if logits.shape[-2:] != image.shape[-2:]:  # user segmenters may predict at a lower resolution
                logits = F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
            return logits.softmax(1)  # (B, 3, H, W) -> (B, label_nc, H, W) probabilities S''


def make_label_generator(cfg, info):
    if cfg.segmenter:
        if not os.path.isfile(cfg.segmenter):
            raise FileNotFoundError(f"ecgan.py: ECGANConfig.segmenter={cfg.segmenter!r} does not exist (train one "
                                    f"with segmenter_train.train_segmenter, or leave it empty for an untrained one)")
        net = segmenter.load_segmenter(cfg.segmenter, info)
    else:
        # untrained: fine for tests and for loading a checkpoint (its weights are in G's state dict); train.py
        # trains one on real images and sets cfg.segmenter before building a model to train.
        net = segmenter.Segmenter(info.label_nc)
    return LabelGenerator(net)


# ----------------------------------------------------------------------------- contrastive learning (Sec. 3.3)

class ProjectionHead(nn.Module):
    """Pixel embedding for Eq. 5: 1x1 conv -> ReLU -> 1x1 conv to proj_dim (the pixel-contrast design). A 1x1 conv
    is a linear map per pixel, so it is applied only to the sampled pixels: (K, C) -> (K, proj_dim)."""

    def __init__(self, nf, proj_dim=256, spectral=True):
        super().__init__()
        sn = spectral_norm if spectral else (lambda m: m)
        self.fc1, self.fc2 = sn(nn.Linear(nf, nf)), sn(nn.Linear(nf, proj_dim))

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


def sample_anchors(labels, max_anchors=1024, max_per_class=100, ignore_index=None):
    """Class-balanced pixel sampling across the whole batch. labels (M,) flattened over (B, h, w), so one class's
    anchors come from every image holding it (Sec. 3.3: anchors, positives and negatives need not share an image).
    Takes min(count, max_per_class, max_anchors // classes) random pixels per class; returns their indices (K,)."""
    classes = labels.unique()
    if ignore_index is not None:
        classes = classes[classes != ignore_index]
    if len(classes) == 0:
        return labels.new_zeros(0)
    per_class = max(1, min(max_per_class, max_anchors // len(classes)))
    picks = []
    for c in classes:
        idx = (labels == c).nonzero().squeeze(1)
        picks.append(idx[torch.randperm(len(idx), device=idx.device)[:per_class]])
    return torch.cat(picks)


def pixel_contrastive_loss(emb, labels, temperature=0.1, impl="vectorized", bank_emb=None, bank_labels=None):
    """Eq. 5 over M anchor embeddings emb (M, D) with class ids labels (M,), optionally against a memory bank
    bank_emb (K, D), bank_labels (K,) of pixels from earlier batches.

    Every row of emb is an anchor i; its positives are the other rows of its class and its negatives the rows of
    other classes, among emb and the bank alike. Bank rows are positives and negatives only, never anchors (Sec.
    3.3: positives and negatives "not restricted to being from the same image"). Each (i, i+) term has ONE positive
    plus all negatives in the denominator (unlike SupCon, which puts all positives there). Terms are averaged
    over the positives of i, then over the anchors that have at least one positive. Returns a zero that keeps
    the graph if no anchor has a positive. Both impls work in log space (logsumexp): finite at any temperature.
    """
    if impl not in ("naive", "vectorized"):
        raise ValueError(f"ecgan.pixel_contrastive_loss: impl must be 'naive' or 'vectorized', got {impl!r}")
    if emb.dim() != 2 or labels.shape != emb.shape[:1]:
        raise ValueError(f"ecgan.pixel_contrastive_loss: emb must be (M, D) and labels (M,), got "
                         f"{tuple(emb.shape)} and {tuple(labels.shape)}")
    if (bank_emb is None) != (bank_labels is None):
        raise ValueError("ecgan.pixel_contrastive_loss: give both bank_emb and bank_labels, or neither")
    if bank_emb is None:
        bank_emb, bank_labels = emb.new_zeros(0, emb.shape[1]), labels.new_zeros(0)
    if bank_emb.dim() != 2 or bank_emb.shape[1] != emb.shape[1] or bank_labels.shape != bank_emb.shape[:1]:
        raise ValueError(f"ecgan.pixel_contrastive_loss: bank_emb must be (K, {emb.shape[1]}) and bank_labels (K,), "
                         f"got {tuple(bank_emb.shape)} and {tuple(bank_labels.shape)}")
    with torch.autocast(emb.device.type, enabled=False):  # exp/log of 1/t-scaled logits: keep float32
        lift = lambda x: x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        z, zb = F.normalize(lift(emb), dim=1), F.normalize(lift(bank_emb), dim=1).to(lift(emb).dtype)  # Eq. 4
        fn = _contrast_naive if impl == "naive" else _contrast_vectorized
        return fn(z, labels, temperature, zb, bank_labels)


def _contrast_naive(z, labels, t, zb, lb):
    # Loops over anchors and positives exactly as Eq. 5 is written, each term in log space:
    # -log(e^{l+} / (e^{l+} + sum_- e^{l-})) = logsumexp(l+, l-_1, l-_2, ...) - l+
    zc, lc = torch.cat([z, zb]), torch.cat([labels, lb])  # anchors' candidates: the anchors, then the bank
    per_anchor = []
    for i in range(len(z)):
        pos = [p for p in range(len(zc)) if p != i and lc[p] == labels[i]]
        if not pos:
            continue
        neg_logits = zc[lc != labels[i]] @ z[i] / t  # (n_neg,)
        terms = []
        for p in pos:
            l_pos = (z[i] @ zc[p] / t).reshape(1)
            terms.append(torch.logsumexp(torch.cat([l_pos, neg_logits]), 0) - l_pos[0])
        per_anchor.append(torch.stack(terms).mean())
    if not per_anchor:
        return z.sum() * 0.0 + zb.sum() * 0.0
    return torch.stack(per_anchor).mean()


def _contrast_vectorized(z, labels, t, zb, lb):
    M = len(z)
    zc, lc = torch.cat([z, zb]), torch.cat([labels, lb])  # (M + K, D): the anchors, then the bank
    logits = (z / t) @ zc.t()  # (M, M + K); 1/t on the (M, D) side: one pass less over the big matrix
    same = labels[:, None] == lc[None, :]
    pos = same.clone()
    pos[:, :M].fill_diagonal_(False)  # an anchor is not its own positive
    n_pos = pos.sum(dim=1)
    has_pos = n_pos > 0
    if not has_pos.any():  # also M = 0, e.g. an all-dontcare batch: nothing sampled
        return logits.sum() * 0.0 + z.sum() * 0.0 + zb.sum() * 0.0
    # log sum_- exp(l-) per anchor; a finite fill (not -inf) keeps the gradient finite when there is no negative
    lse_neg = torch.logsumexp(logits.masked_fill(same, torch.finfo(logits.dtype).min), dim=1, keepdim=True)
    terms = F.softplus(lse_neg - logits)  # = log(e^l + sum_- e^l-) - l = -log(e^l / (e^l + sum_- e^l-))
    return ((terms * pos).sum(dim=1)[has_pos] / n_pos[has_pos]).mean()


def gather_anchors(emb, labels):
    """Sec. 3.3 across processes: under torch.distributed (initialised, world > 1) the sampled anchors of every
    rank, concatenated in rank order, so each rank's Eq. 5 contrasts the anchors of the global batch (with batch
    1 per GPU, otherwise single-image contrast). Ranks may sample different counts: sizes are gathered first and
    the pieces padded to the largest. The other ranks' pieces are detached; the local one keeps its graph, with
    its gradient scaled by the world size: DDP averages the ranks' gradients, and rank r's loss reaches only
    rank r's rows, so the average is then exactly the gradient of Eq. 5 over the global anchors. A no-op in one
    process. emb (K, D), labels (K,) -> (sum K_r, D), (sum K_r,)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return emb, labels
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    if world == 1:
        return emb, labels
    dist = torch.distributed
    n = torch.tensor([len(emb)], device=emb.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    m = max(sizes)
    pad = lambda x: torch.cat([x, x.new_zeros(m - len(x), *x.shape[1:])])
    embs = [emb.new_empty(m, emb.shape[1]) for _ in range(world)]
    labs = [labels.new_empty(m) for _ in range(world)]
    dist.all_gather(embs, pad(emb.detach()))
    dist.all_gather(labs, pad(labels))
    return concat_ranks(emb, labels, [e[:k] for e, k in zip(embs, sizes)], [lab[:k] for lab, k in zip(labs, sizes)],
                        rank)


def concat_ranks(emb, labels, embs, labs, rank):
    """gather_anchors' assembly: the gathered pieces in rank order with rank `rank`'s replaced by the local emb,
    whose value is unchanged and whose gradient is multiplied by the world size (see gather_anchors)."""
    world = len(embs)
    local = emb + (world - 1) * (emb - emb.detach())  # value emb, gradient x world
    return (torch.cat([local if r == rank else e for r, e in enumerate(embs)]),
            torch.cat([labels if r == rank else lab for r, lab in enumerate(labs)]))


# ----------------------------------------------------------------------------- similarity loss (Sec. 3.2, Eq. 3)

SIM_IMPLS = ("naive", "chunked", "checkpoint")


def similarity_loss(pred, target, impl="chunked", chunk=1024, eps=1e-6):
    """Eq. 3: BCE between A = S^T S and A'' = S''^T S'' over the pairs of labelled pixels, per image, then
    averaged over the images.

    pred (B, N, H, W) class probabilities (S'', the label generator's softmax); target (B, N, H, W) one-hot (S),
    so A is 1 where two pixels share a class and 0 elsewhere. The paper writes S S^T with S reshaped to N x M;
    the M x M map it describes is S^T S in that layout. A target row of zeros marks an unlabelled (dontcare)
    pixel: it has no class, so it takes part in no pair (G_l is trained to ignore such pixels; counting them
    would make any two of them "the same class"). Image b's loss is the mean of Eq. 3's terms over its V_b^2
    ordered pairs of labelled pixels (i = j included, as in Eq. 3's M^2); the batch's the mean over the images
    with V_b > 0. An unlabelled image adds nothing; an unlabelled batch gives a zero that keeps the graph.
    impl: "naive" materialises the M x M maps (Eq. 3 as written, with a pair mask); "chunked" takes each image's
    labelled pixels `chunk` rows of the maps at a time and computes the gradient in the same pass
    (_SimilarityBCE), memory O(chunk * M); "checkpoint" the same rows under activation checkpointing (the
    previous implementation: it recomputes every chunk in backward; kept for the benchmark).
    """
    if impl not in SIM_IMPLS:
        raise ValueError(f"ecgan.similarity_loss: impl must be one of {SIM_IMPLS}, got {impl!r}")
    if pred.shape != target.shape or pred.dim() != 4:
        raise ValueError(f"ecgan.similarity_loss: pred and target must both be (B, N, H, W), got "
                         f"{tuple(pred.shape)} and {tuple(target.shape)}")
    B, N = pred.shape[:2]
    with torch.autocast(pred.device.type, enabled=False):  # 1 - eps rounds to 1 in bf16: keep float32
        dtype = torch.float32 if pred.dtype in (torch.float16, torch.bfloat16) else pred.dtype
        p = pred.reshape(B, N, -1).to(dtype)  # (B, N, M)
        s = target.reshape(B, N, -1).to(dtype)
        labelled = s.sum(1)  # (B, M): 1 labelled, 0 dontcare
        if not ((labelled == 0) | (labelled == 1)).all() or not ((s == 0) | (s == 1)).all():
            raise ValueError("ecgan.similarity_loss: target must be one-hot per pixel (or all zero for an "
                             "unlabelled pixel); got other values")
        n = labelled.sum(1)  # (B,) V_b
        if impl == "naive":  # Eq. 3 as written, over the pairs whose two ends are labelled
            a = s.transpose(1, 2) @ s  # (B, M, M), A in {0, 1}
            q = (p.transpose(1, 2) @ p).clamp(eps, 1 - eps)  # A''; <= 1 by Cauchy-Schwarz
            pairs = labelled[:, :, None] * labelled[:, None, :]  # (B, M, M)
            bce = -((a * q.log() + (1 - a) * (1 - q).log()) * pairs).sum((1, 2))
            has = n > 0
            return (bce[has] / n[has] ** 2).mean() if has.any() else p.sum() * 0.0
        # A is binary, so each BCE term is -log(q) or -log(1 - q): one log, and A's rows come from comparing
        # class ids instead of a matmul
        lab = s.argmax(1)  # (B, M)
        losses = []
        for b in range(B):
            keep = labelled[b].nonzero().squeeze(1)
            V = len(keep)
            if V == 0:
                continue
            pb, lb = (p[b], lab[b]) if V == p.shape[-1] else (p[b][:, keep], lab[b][keep])  # (N, V), (V,)
            if impl == "chunked":
                total = _SimilarityBCE.apply(pb, lb, chunk, eps)
            else:  # the (chunk, V) tiles are recomputed in backward instead of saved
                total = sum(checkpoint(_sim_bce_rows, pb[:, r:r + chunk], lb[r:r + chunk], pb, lb, eps,
                                       use_reentrant=False) for r in range(0, V, chunk))
            losses.append(total / V**2)
        return torch.stack(losses).mean() if losses else p.sum() * 0.0


def _sim_bce_rows(p_rows, lab_rows, p, lab, eps):
    """Sum of Eq. 3's terms over rows `p_rows` (N, r) of one image's maps against all its pixels p (N, V)."""
    q = (p_rows.t() @ p).clamp(eps, 1 - eps)  # (r, V) rows of A''
    same = lab_rows[:, None] == lab[None, :]  # (r, V) rows of A
    return -torch.where(same, q, 1 - q).log().sum()


def _sim_blocks(p, lab, eps, starts, chunk, need_grad):
    """Eq. 3's summed terms over the row blocks [r, r + chunk) of one image's V x V maps, and their gradient.
    With s = q - 1 for pairs of different classes and s = q for the same class, each term is -log|s| and its
    derivative in q is -1/s (zero where the clamp to [eps, 1 - eps] holds q, as torch's clamp). That matrix G is
    symmetric (q_ij = p_i . p_j = q_ji, A too), so dL/dp_i = sum_j G_ij p_j + sum_j G_ji p_j = 2 sum_j G_ij p_j:
    the rows of a block give their own pixels' gradient whole. Every block reuses the same (chunk, V) buffers.
    p (N, V), lab (V,) -> (sum, grad (N, V) or None)."""
    N, V = p.shape
    rows = min(chunk, V)
    q_buf, diff_buf = p.new_empty(rows, V), p.new_empty(rows, V)
    total = p.new_zeros(())
    grad = p.new_empty(N, V) if need_grad else None
    for r in starts:
        n = min(chunk, V - r)
        q, diff = q_buf[:n], diff_buf[:n]
        torch.matmul(p[:, r:r + n].t(), p, out=q)  # (n, V) rows of A''
        held = None  # where the clamp holds q: no gradient there; found only if some q is out of range
        if need_grad:
            lo, hi = torch.aminmax(q)
            held = (q < eps) | (q > 1 - eps) if lo < eps or hi > 1 - eps else None
        torch.ne(lab[r:r + n, None], lab[None, :], out=diff)  # (n, V) rows of 1 - A
        s = q.clamp_(eps, 1 - eps).sub_(diff)  # q (same class) or q - 1 (different)
        total = total - torch.abs(s, out=diff).log_().sum()  # Eq. 3's terms, -log|s| (diff's buffer reused)
        if need_grad:
            g = s.reciprocal_()  # -dL/dq
            if held is not None:
                g.masked_fill_(held, 0.0)
            torch.matmul(p, g.t(), out=grad[:, r:r + n])  # (N, V) @ (V, n) -> (N, n)
    return total, grad.mul_(-2) if need_grad else None


class _SimilarityBCE(torch.autograd.Function):
    """Eq. 3's summed terms over one image's labelled pixels p (N, V), lab (V,), block by block, with the gradient
    computed in the same pass (_sim_blocks): two matmuls per block where checkpointing runs four (forward,
    recomputed forward, two backward) plus autograd's elementwise work. Backward only scales the saved (N, V)
    gradient, so memory stays O(chunk * V + N * V). Not twice differentiable."""

    @staticmethod
    def forward(ctx, p, lab, chunk, eps):
        total, grad = _sim_blocks(p, lab, eps, range(0, p.shape[1], chunk), chunk, ctx.needs_input_grad[0])
        ctx.save_for_backward(grad if grad is not None else p.new_zeros(0))
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad_out * grad, None, None, None


def downsample_for_similarity(probs, onehot, stride):
    """The M x M maps cost O((HW)^2): Eq. 3 runs at 1/stride resolution (stride 4: 64x128 on Cityscapes, M = 8192).
    Probabilities are area-averaged (still distributions over their channels, every pixel keeps a gradient); the
    target is nearest-downsampled (still one-hot, and an unlabelled pixel's all-zero row stays all zero)."""
    if stride == 1:
        return probs, onehot
    size = (probs.shape[2] // stride, probs.shape[3] // stride)
    return F.adaptive_avg_pool2d(probs, size), F.interpolate(onehot, size=size, mode="nearest")


# ----------------------------------------------------------------------------- class-specific generation (Sec. 3.3)

CLASS_IMPLS = ("naive", "vectorized")


class ClassSpecificGenerator(nn.Module):
    """G_c's pixel generation (Eqs. 6, 7): "the feature map is fed into several convolutional layers for the
    corresponding semantic class". Class c's image I_gc = tanh(convs_c(F * M_c)) * M_c, where convs_c is `layers`
    3x3 convs of its own (App. B's kernel and padding), LeakyReLU 0.2 before each (as G_i, G_e), widths
    C -> width -> ... -> width -> 3, and spectral norm on every conv (App. B: "all the layers"), each class's
    conv divided by its own largest singular value (power iteration, as torch's spectral_norm, per class).
    The output is masked by M_c again (ours, as lggan.ClassGenerator): absent classes give exactly zero.

    Layer j's weights of all N classes are one tensor (N, out, in, 3, 3), so the two implementations share one
    state dict, and indexing it gives the whole Parameter a gradient (zero rows for absent classes: DDP needs no
    find_unused_parameters):
      naive       a Python loop over the N classes, one conv stack each: cost ~ N.
      vectorized  the K classes present anywhere in the batch only: their K masked copies of F go through ONE
                  grouped conv per layer (groups=K), and only their K weights are spectral-normed: cost ~ K.
    Returns images (B, K, 3, H, W) and idx (K,) the class ids (naive: all N)."""

    def __init__(self, num_classes, channels, layers=3, width=16, spectral=True, impl="vectorized"):
        super().__init__()
        if impl not in CLASS_IMPLS:
            raise ValueError(f"ecgan.py: class_impl={impl!r}, expected one of {CLASS_IMPLS}")
        if layers < 1 or width < 1:
            raise ValueError(f"ecgan.py: class_layers={layers} and class_width={width} must be >= 1")
        self.num_classes, self.impl, self.spectral = num_classes, impl, spectral
        widths = [channels] + [width] * (layers - 1) + [3]
        self.weight, self.bias = nn.ParameterList(), nn.ParameterList()
        for j, (cin, cout) in enumerate(zip(widths[:-1], widths[1:])):
            bound = 1 / (cin * 9) ** 0.5  # nn.Conv2d's default init per class (spectral-normed layers keep it)
            self.weight.append(nn.Parameter(torch.empty(num_classes, cout, cin, 3, 3).uniform_(-bound, bound)))
            self.bias.append(nn.Parameter(torch.empty(num_classes, cout).uniform_(-bound, bound)))
            if spectral:  # per-class power-iteration vectors, 15 iterations at init as torch's spectral_norm
                self.register_buffer(f"u{j}", F.normalize(torch.randn(num_classes, cout), dim=1))
                self.register_buffer(f"v{j}", F.normalize(torch.randn(num_classes, cin * 9), dim=1))
                with torch.no_grad():
                    for _ in range(15):
                        self._power_iteration(j, torch.arange(num_classes))

    def _power_iteration(self, j, idx):
        """One step of u, v towards the top singular vectors of the classes idx's (out, in*9) matrices."""
        w = self.weight[j][idx].detach().flatten(2)  # (K, out, in*9)
        u, v = getattr(self, f"u{j}"), getattr(self, f"v{j}")
        v[idx] = F.normalize(torch.bmm(w.transpose(1, 2), u[idx].unsqueeze(2)).squeeze(2), dim=1, eps=1e-12)
        u[idx] = F.normalize(torch.bmm(w, v[idx].unsqueeze(2)).squeeze(2), dim=1, eps=1e-12)

    def layer(self, j, idx):
        """Layer j's weights (K, out, in, 3, 3) and biases (K, out) of the classes idx, spectral-normed: one power
        iteration per call in training mode (torch's spectral_norm: one per forward), sigma = u^T W v."""
        w, b = self.weight[j][idx], self.bias[j][idx]
        if not self.spectral:
            return w, b
        with torch.autocast(w.device.type, enabled=False):  # sigma in the weights' precision
            if self.training:
                with torch.no_grad():
                    self._power_iteration(j, idx)
            u, v = getattr(self, f"u{j}")[idx], getattr(self, f"v{j}")[idx]  # copies: later updates leave them
            sigma = (u.unsqueeze(1) @ (w.flatten(2) @ v.unsqueeze(2))).view(-1, 1, 1, 1, 1)  # (K,) u^T W v
            return w / sigma, b

    def forward(self, feat, masks):
        """feat (B, C, H, W) = F; masks (B, N, H, W) one-hot of the real classes (dontcare pixels: all zero)."""
        B, C, H, W = feat.shape
        n_layers = len(self.weight)
        if self.impl == "naive":
            images = []
            for c in range(self.num_classes):
                m, i = masks[:, c:c + 1], torch.tensor([c], device=feat.device)
                x = feat * m  # F_c, the class-masked feature
                for j in range(n_layers):
                    w, b = self.layer(j, i)
                    x = F.conv2d(F.leaky_relu(x, 0.2), w[0], b[0], padding=1)
                images.append(torch.tanh(x) * m)  # (B, 3, H, W)
            return torch.stack(images, 1), torch.arange(self.num_classes, device=feat.device)
        # classes present anywhere in the batch (one host sync); never empty, so every parameter stays in the
        # graph even for an all-dontcare batch
        idx = (masks.amax((0, 2, 3)) > 0).nonzero().squeeze(1)
        if idx.numel() == 0:
            idx = torch.zeros(1, dtype=torch.long, device=feat.device)
        K, m = idx.numel(), masks[:, idx]  # (B, K, H, W)
        # LeakyReLU(F * M_c) = LeakyReLU(F) * M_c for a 0/1 mask: one activation, then the K copies
        x = (F.leaky_relu(feat, 0.2).unsqueeze(1) * m.unsqueeze(2)).flatten(1, 2)  # (B, K*C, H, W)
        for j in range(n_layers):
            w, b = self.layer(j, idx)
            if j:
                x = F.leaky_relu(x, 0.2)
            x = F.conv2d(x, w.flatten(0, 1), b.flatten(), padding=1, groups=K)  # (B, K*in, H, W) -> (B, K*out, H, W)
        return torch.tanh(x).unflatten(1, (K, 3)) * m.unsqueeze(2), idx  # (B, K, 3, H, W)


# ----------------------------------------------------------------------------- config

@dataclass
class ECGANConfig:
    # encoder E = GauGAN (Sec. 3.1, "we adopt GauGAN"); C = ngf = 64 (App. B)
    ngf: int = 64                         # C, channels of F (App. B)
    ndf: int = 64                         # discriminator width (GauGAN)
    num_upsampling_layers: str = "normal"  # GauGAN: "more" on Cityscapes
    upsample: str = "nearest"             # GauGAN trunk upsampler (any sau.make_upsampler name)
    upsample_low_res: bool = False        # GauGAN trunk: also its low-resolution upsamplers (gaugan.py)
    sau_window: str = "expanded"          # GauGAN trunk SAU window: "expanded" | "input" (sau.py header)
    norm: str = "instance"                # SPADE's param-free norm (GauGAN)
    spade_hidden: int = 128               # SPADE's shared conv width (GauGAN)
    n_layers: int = 3                     # n convs in G_e and G_i (App. B)
    spectral: bool = True                 # spectral norm on every new G layer (App. B)
    eq1_range: str = "paper"              # Eq. 1's I' as written, in [-2, 2] | "half": I'/2 | "tanh": tanh(I') (ours)
    edge_source: str = "generated"        # I_e' in Eq. 1 and G_s: G_e's | "canny": real edges (oracle, ours; F_e kept)
    # Table 3 ablation switches, cumulative in the paper (see TABLE3)
    use_edge: bool = True                 # G_e, edge generator (Sec. 3.1)
    use_transfer: bool = True             # G_t, attention guided edge transfer (Sec. 3.1, Eq. 1); needs use_edge
    use_semantic: bool = True             # G_s, semantic preserving module (Sec. 3.2, Eq. 2)
    use_label_gen: bool = True            # G_l + similarity loss (Sec. 3.2, Eq. 3)
    use_contrast: bool = True             # G_c: pixel contrast (Eq. 5) + class-specific generation (Eqs. 6, 7)
    # label generator and similarity loss
    segmenter: str = ""                   # G_l weights: built-in segmenter checkpoint or TorchScript; train.py fills it
    sim_on_intermediate: bool = True      # Eq. 10's L_sim(S, S') with S' = G_l(I') (ours; False: the S'' term alone)
    sim_stride: int = 4                   # Eq. 3 at 1/4 resolution (ours: M^2 at full res is 1.7e10 on Cityscapes)
    sim_impl: str = "chunked"             # "chunked" (O(chunk * M)) | "naive" (O(M^2)) | "checkpoint" (previous)
    sim_chunk: int = 1024                 # rows of the M x M maps per chunk
    # contrastive learning and class-specific generation
    proj_dim: int = 256                   # projection head width (pixel contrast literature, REFERENCE.md)
    temperature: float = 0.1              # tau in Eq. 5; pixel contrast for segmentation uses 0.07-0.1 (REFERENCE.md)
    max_anchors: int = 1024               # anchors per batch across images (pixel contrast literature)
    max_per_class: int = 100              # per-class anchor cap, class balance (pixel contrast literature)
    contrast_impl: str = "vectorized"     # "vectorized" | "naive" (loops like Eq. 5; tests only)
    bank_per_class: int = 200             # memory bank rows per class (ours; 0 = off); see ECGANGenerator.update_bank
    class_impl: str = "vectorized"        # G_c per-class convs: "vectorized" (present classes only) | "naive" (loop)
    class_layers: int = 3                 # convs per class: "several" (Sec. 3.3); 3 = App. B's n for G_i, G_e, G_s
    class_width: int = 16                 # their hidden width (ours: first layer's cost = LGGAN's 7x7 64->3 conv)
    class_to_gs: bool = False             # ours: also feed I_g into G_s (default: I_g is an auxiliary output)
    # multi-modal synthesis (App. C)
    use_vae: bool = False                 # style encoder + KL: different edges and images per layout (App. C)
    z_dim: int = 256                      # style vector (GauGAN)
    # discriminator: one multi-modality D for (S, edge) and (S, image) pairs (App. A)
    num_D: int = 2                        # scales (GauGAN)
    n_layers_D: int = 4                   # PatchGAN depth (GauGAN)
    # Eq. 9 / Eq. 10 weights (App. B)
    gan_loss: str = "hinge"               # "hinge" (GauGAN's, ours) | "log" (Eqs. 8, 9 as written)
    lam: float = 2.0                      # lambda on I'' in Eqs. 9 and 10 ("all lambda ... set to 2", App. B)
    lambda_c: float = 1.0                 # multi-modality adversarial loss (App. B)
    lambda_s: float = 1.0                 # similarity loss (App. B)
    lambda_l: float = 1.0                 # contrastive learning loss: the fifth loss of the text, absent from Eq. 10 (App. B)
    lambda_f: float = 10.0                # discriminator feature matching (App. B)
    lambda_p: float = 10.0                # VGG perceptual loss (App. B)
    lambda_l1: float = 1.0                # class-specific L1, Eq. 6 (no weight given; LGGAN's 1)
    lambda_kld: float = 0.05              # KL for multi-modal synthesis (App. C)
    # optimiser: App. B gives Adam betas (0, 0.999) but no learning rates; GauGAN's TTUR rates
    lr_g: float = 1e-4                    # GauGAN
    lr_d: float = 4e-4                    # GauGAN
    beta1: float = 0.0                    # App. B
    beta2: float = 0.999                  # App. B


Config = ECGANConfig

_OFF = dict(use_edge=False, use_transfer=False, use_semantic=False, use_label_gen=False, use_contrast=False)
TABLE3 = {  # Table 3 rows (Cityscapes ablation) as config overrides; train.py flags, e.g. --use_contrast false
    "E+G_i": dict(_OFF),
    "E+G_i+G_e": dict(_OFF, use_edge=True),
    "E+G_i+G_e+G_t": dict(_OFF, use_edge=True, use_transfer=True),
    "E+G_i+G_e+G_t+G_s": dict(_OFF, use_edge=True, use_transfer=True, use_semantic=True),
    "E+G_i+G_e+G_t+G_s+G_l": dict(_OFF, use_edge=True, use_transfer=True, use_semantic=True, use_label_gen=True),
    "E+G_i+G_e+G_t+G_s+G_l+G_c": {k: True for k in _OFF},  # the full model
}


# ----------------------------------------------------------------------------- generator

class ECGANGenerator(nn.Module):
    """Every generator-side module. Disabled Table 3 modules are not built (no unused parameters under DDP)."""

    def __init__(self, cfg, info):
        super().__init__()
        if cfg.eq1_range not in EQ1_RANGES:
            raise ValueError(f"ecgan.py: eq1_range={cfg.eq1_range!r}, expected one of {EQ1_RANGES}")
        if cfg.edge_source not in EDGE_SOURCES:
            raise ValueError(f"ecgan.py: edge_source={cfg.edge_source!r}, expected one of {EDGE_SOURCES}")
        if cfg.edge_source == "canny" and not cfg.use_edge:
            raise ValueError("ecgan.py: edge_source='canny' replaces G_e's edge map, so it needs use_edge (G_e)")
        if cfg.use_transfer and not cfg.use_edge:
            raise ValueError("ecgan.py: use_transfer (G_t) needs use_edge (G_e): it transfers the edge features")
        if info.task != "semantic":
            raise ValueError(f"ecgan.py: ECGAN is a semantic image synthesis model, got task={info.task!r}")
        self.cfg = cfg
        self.label_nc, self.num_classes, self.dontcare = info.label_nc, info.num_classes, info.dontcare
        nf = cfg.ngf
        gcfg = gaugan.backbone_config(cfg)
        # E: GauGAN's head + trunk give F (B, C, H, W); its own to_rgb is not part of ECGAN
        self.encoder = gaugan.GauGANGenerator(gcfg, info.input_nc, info.height, info.width)
        self.encoder.conv_img = None
        self.style_encoder = gaugan.StyleEncoder(cfg.ngf, cfg.z_dim) if cfg.use_vae else None
        self.image_branch = Branch(nf, cfg.n_layers, cfg.spectral)  # G_i
        self.edge_branch = Branch(nf, cfg.n_layers, cfg.spectral) if cfg.use_edge else None  # G_e
        if cfg.use_contrast:
            self.projection = ProjectionHead(nf, cfg.proj_dim, cfg.spectral)
            if cfg.bank_per_class > 0:  # Eq. 5's memory bank: buffers, so the checkpoint holds it and resume is exact
                self.register_buffer("bank_emb", torch.zeros(info.num_classes, cfg.bank_per_class, cfg.proj_dim))
                self.register_buffer("bank_count", torch.zeros(info.num_classes, dtype=torch.long))  # filled rows
                self.register_buffer("bank_next", torch.zeros(info.num_classes, dtype=torch.long))  # oldest row
            self.class_generator = ClassSpecificGenerator(info.num_classes, nf, cfg.class_layers, cfg.class_width,
                                                          cfg.spectral, cfg.class_impl)
        if cfg.use_semantic:  # G_s input: F, I', I_e', S (+ I_g with class_to_gs); F' has C + N + 3 + 3 channels
            in_nc = nf + 3 + 3 * cfg.use_edge + info.input_nc + 3 * (cfg.use_contrast and cfg.class_to_gs)
            self.semantic = SemanticPreserving(in_nc, info.label_nc, nf + info.input_nc + 6, cfg.spectral)
        gaugan.init_weights(self)
        # G_l last: its pretrained weights must not be re-initialised
        self.label_generator = make_label_generator(cfg, info) if cfg.use_label_gen else None

    def bank_contents(self):
        """The memory bank's filled rows (n, proj_dim) and their classes (n,): a copy, so this step's update
        leaves what Eq. 5 sees this step unchanged."""
        C, K = self.bank_emb.shape[:2]
        filled = torch.arange(K, device=self.bank_emb.device)[None, :] < self.bank_count[:, None]  # (C, K)
        classes = torch.arange(C, device=self.bank_emb.device)[:, None].expand(C, K)
        return self.bank_emb[filled], classes[filled]

    @torch.no_grad()
    def update_bank(self, emb, labels):
        """Sec. 3.3 asks for "the global context of the whole dataset"; a batch (1 image per GPU in the paper's
        runs) holds a few images. The bank keeps, per class, the bank_per_class most recent detached,
        L2-normalised anchor embeddings (FIFO: each class's new rows overwrite its oldest), every anchor of each
        G step (all ranks' under DDP, so every rank holds the same bank). The paper gives no size. Cross-image
        pixel contrast for segmentation keeps 5,000 per class, 10 pixels per class and image pushed per step
        (~30 steps of 16 images). 200 here: with 1,024 anchors over Cityscapes' 35 classes (~29 per class per
        step) it spans the last ~7 steps, a dozen images beyond the batch, and keeps the ECGAN step within 1.2x
        its bankless time at the cpu preset (bench.py: 500 measured 1.24x); 5,000 is one flag away."""
        C, K = self.bank_emb.shape[:2]
        z = F.normalize(emb.detach().float(), dim=1).to(self.bank_emb.dtype)
        order = torch.argsort(labels, stable=True)
        lab, z = labels[order], z[order]
        counts = torch.bincount(labels, minlength=C)
        rank = torch.arange(len(lab), device=lab.device) - (counts.cumsum(0) - counts)[lab]  # index within class
        keep = rank < K  # over K new rows of one class: its first K (rows are in random order, sample_anchors)
        lab, rank, z = lab[keep], rank[keep], z[keep]
        self.bank_emb[lab, (self.bank_next[lab] + rank) % K] = z
        pushed = counts.clamp(max=K)
        self.bank_next.copy_((self.bank_next + pushed) % K)
        self.bank_count.copy_((self.bank_count + pushed).clamp(max=K))

    def forward(self, seg, image=None, z=None, aux=True, edges=None):
        """seg (B, input_nc, H, W) = one-hot (+ instance boundaries); image: style image (use_vae only); edges: the
        real Canny edges (B, 1, H, W) in {0, 1}, required with edge_source="canny" (the oracle I_e' of Eq. 1, G_s).
        aux=False skips what only the G loss needs (label generator, contrastive sampling).
        Returns a dict of (B, ., H, W) tensors: fake (I''), intermediate (I'), edge (I_e'), class (I_g), the
        segmenter's probabilities seg_1, seg_2 (of I' and I''; only seg_1 = S'' with sim_on_intermediate=False,
        or without G_s, where I' is the output) over the real classes at the similarity
        resolution with their target seg_target, emb and emb_labels (the K sampled pixels, of every rank under
        DDP), bank_emb and bank_labels (the memory bank before this step's update), kld. A training-mode forward
        with aux and grad enabled (a G step) pushes the anchors into the bank."""
        cfg, out = self.cfg, {}
        if self.style_encoder is not None and image is not None and z is None:
            mu, logvar = self.style_encoder(image)
            z, out["kld"] = gaugan.reparameterize(mu, logvar), gaugan.kld_loss(mu, logvar)
        feat = self.encoder.trunk(self.encoder.head(seg, z), seg)  # F: (B, C, H, W)
        onehot = seg[:, :self.label_nc]
        masks = onehot[:, :self.num_classes]  # the real classes (dontcare excluded)

        # G_e, G_i with G_t between their layers (feature level), then Eq. 1 (content level)
        xi = xe = feat
        for j, conv_i in enumerate(self.image_branch.convs):
            xi = conv_i(F.leaky_relu(xi, 0.2))
            if self.edge_branch is not None:
                xe = self.edge_branch.convs[j](F.leaky_relu(xe, 0.2))
                if cfg.use_transfer:
                    xi = attention_transfer(xe, xi)  # F_i^j = sigmoid(F_e^j) * F_i^j + F_i^j
        img = self.image_branch.to_rgb(xi)  # I_i'
        guide = None  # the I_e' that Eq. 1 and G_s read
        if self.edge_branch is not None:
            out["edge"] = guide = self.edge_branch.to_rgb(xe)  # I_e' (B, 3, H, W), judged by D either way (Eq. 8)
            if cfg.edge_source == "canny":  # oracle: the real edges in I_e's range; G_e's to_rgb feeds D only
                if edges is None:
                    raise ValueError("ecgan.py: edge_source='canny' needs the real edges: G(..., edges=batch['edge']) "
                                     "(data.prepare_batch(..., edges=True))")
                guide = edge_to_image(edges).to(img.dtype)
            if cfg.use_transfer:
                img = edge_transfer_image(guide, img, cfg.eq1_range)  # Eq. 1 (+ the eq1_range reading)
        out["intermediate"] = img

        if cfg.use_contrast:  # G_c on the shared feature F: Eqs. 6, 7
            out["class_images"], out["class_idx"] = self.class_generator(feat, masks)  # (B, K, 3, H, W)
            out["class"] = out["class_images"].sum(1)  # Eq. 7: I_g = I_g1 + ... + I_gN (absent classes are 0)
            if aux:  # Eq. 5 inputs: class-balanced pixels from the whole batch (of every rank), projected, labelled
                labels = onehot.argmax(1).flatten()  # (B*H*W,), dontcare = num_classes
                idx = sample_anchors(labels, cfg.max_anchors, cfg.max_per_class,
                                     self.num_classes if self.dontcare else None)
                pixels = feat.permute(0, 2, 3, 1).reshape(-1, feat.shape[1])[idx]  # (K, C)
                out["emb"], out["emb_labels"] = gather_anchors(self.projection(pixels), labels[idx])
                if cfg.bank_per_class > 0:  # earlier steps' pixels: more positives and negatives, never anchors
                    out["bank_emb"], out["bank_labels"] = self.bank_contents()
                    if self.training and torch.is_grad_enabled():  # a G step; D steps and sampling leave it
                        self.update_bank(out["emb"], out["emb_labels"])

        if cfg.use_semantic:
            parts = [feat, img] + ([guide] if guide is not None else []) + [seg]
            if cfg.use_contrast and cfg.class_to_gs:
                parts.append(out["class"])
            out["fake"] = self.semantic(torch.cat(parts, 1))  # I''
        else:
            out["fake"] = img  # without G_s, I' is the output

        if self.label_generator is not None and aux:  # S' and S'' for Eq. 10's two similarity terms
            # S' = G_l(I') is our reading of Eq. 10's L_sim(S, S') (the paper defines only S'' = G_l(I''));
            # sim_on_intermediate=False keeps the S'' term alone. Without G_s, I' is the output and S'' = G_l(I').
            fakes = ([img] if cfg.sim_on_intermediate or not cfg.use_semantic else []) + \
                ([out["fake"]] if cfg.use_semantic else [])
            probs = self.label_generator(torch.cat(fakes, 0)).chunk(len(fakes))  # one segmenter forward
            # Eq. 3 over the real classes: the target without the dontcare channel (its pixels' rows are all zero,
            # so they take part in no pair) and the segmenter's probabilities without it too (G_l is trained to
            # ignore dontcare, so that channel carries no class); A'' = S''^T S'' then counts real-class agreement
            for k, p in enumerate(probs, 1):
                out[f"seg_{k}"], out["seg_target"] = downsample_for_similarity(
                    p[:, :self.num_classes], masks.float(), cfg.sim_stride)
        return out


# ----------------------------------------------------------------------------- discriminator (App. A, Eqs. 8, 9)

def edge_to_image(edge):
    """Real Canny edges (B, 1, H, W) in {0, 1} -> 3 channels in {-1, 1}, the range of the tanh edge map I_e'."""
    return (edge * 2 - 1).expand(-1, 3, -1, -1)


def judged_pairs(out, batch, cfg):
    """(fake, real, weight) triples the multi-modality D judges: (I_e', I_e, 1) (Eq. 8); (I', I, 1) and
    (I'', I, lambda) (Eq. 9). Without G_s, I' is the output: (I', I, 1)."""
    real = batch["image"]
    pairs = []
    if "edge" in out:
        if "edge" not in batch:
            raise KeyError("ecgan.py: batch has no 'edge'; call data.prepare_batch(..., edges=True) for ECGAN")
        pairs.append((out["edge"], edge_to_image(batch["edge"]), 1.0))
    pairs.append((out["intermediate"], real, 1.0))
    if cfg.use_semantic:
        pairs.append((out["fake"], real, cfg.lam))
    return pairs


def discriminate(D, cond, pairs):
    """One D forward on every fake and every distinct real, concatenated on the batch dim. Returns per pair
    (fake_preds, real_preds, weight)."""
    reals = []
    for _, r, _ in pairs:
        if not any(r is x for x in reals):
            reals.append(r)
    x = torch.cat([gaugan.d_input(cond, f) for f, _, _ in pairs] + [gaugan.d_input(cond, r) for r in reals], 0)
    preds = D(x)
    n = cond.shape[0]
    part = lambda k: [[f[k * n:(k + 1) * n] for f in scale] for scale in preds]
    fake_preds = [part(k) for k in range(len(pairs))]
    real_preds = [part(len(pairs) + next(i for i, x in enumerate(reals) if x is r)) for _, r, _ in pairs]
    return [(f, r, w) for f, r, (_, _, w) in zip(fake_preds, real_preds, pairs)]


# ----------------------------------------------------------------------------- model interface

def build(cfg, info):
    gaugan.check_gan_loss(cfg.gan_loss)
    G = ECGANGenerator(cfg, info)
    D = gaugan.init_weights(gaugan.MultiscaleDiscriminator(info.input_nc + 3, cfg.ndf, cfg.n_layers_D, cfg.num_D))
    return G, D


def g_step(G, D, batch, cfg, vgg=None):
    """Eq. 10, generator side: lambda_c * adversarial (hinge, or log with gan_loss) + lambda_f * feature
    matching + lambda_p * VGG on (I_e', I_e), (I', I), lambda * (I'', I); + lambda_s * similarity (S, S') +
    (S, S''); + lambda_l * Eq. 5; + lambda_l1 * Eq. 6; + lambda_kld * KL."""
    cond, real = batch["input"], batch["image"]
    out = G(cond, real, edges=oracle_edges(batch, cfg))
    logs = {"G_gan": 0.0, "G_feat": 0.0}
    for fake_p, real_p, w in discriminate(D, cond, judged_pairs(out, batch, cfg)):
        logs["G_gan"] = logs["G_gan"] + cfg.lambda_c * w * gaugan.g_loss_term(fake_p, cfg.gan_loss)
        logs["G_feat"] = logs["G_feat"] + cfg.lambda_f * w * gaugan.feature_matching_loss(fake_p, real_p)
    if vgg is not None:
        logs["G_vgg"] = sum(cfg.lambda_p * w * gaugan.vgg_loss(vgg, f, r) for f, r, w in judged_pairs(out, batch, cfg))
    if "seg_1" in out:
        sims = [similarity_loss(out[k], out["seg_target"], cfg.sim_impl, cfg.sim_chunk) for k in ("seg_1", "seg_2")
                if k in out]
        logs["G_sim"] = cfg.lambda_s * sum(sims)
    if "emb" in out:
        logs["G_contrast"] = cfg.lambda_l * pixel_contrastive_loss(out["emb"], out["emb_labels"], cfg.temperature,
                                                                   cfg.contrast_impl, out.get("bank_emb"),
                                                                   out.get("bank_labels"))
        logs["G_l1"] = cfg.lambda_l1 * lggan.masked_l1(out["class_images"], out["class_idx"], batch["onehot"], real)
    if "kld" in out:
        logs["G_kld"] = cfg.lambda_kld * out["kld"]
    loss = sum(logs.values())
    return loss, {k: v.detach() for k, v in logs.items()}


def d_step(G, D, batch, cfg):
    """Eqs. 8 + 9 in hinge form (as written with gan_loss="log"): E[relu(1 + D(S, I_e'))] + E[relu(1 - D(S, I_e))]
    for edges; for images each fake term is paired with a real term of its weight, so the real image carries
    weight lambda + 1 as in Eq. 9."""
    cond, real = batch["input"], batch["image"]
    with torch.no_grad():
        out = G(cond, real, aux=False, edges=oracle_edges(batch, cfg))
    l_fake, l_real = 0.0, 0.0
    pairs = [(f.detach(), r, w) for f, r, w in judged_pairs(out, batch, cfg)]
    for fake_p, real_p, w in discriminate(D, cond, pairs):  # lambda_c weighs the whole adversarial term (Eq. 10)
        l_fake = l_fake + cfg.lambda_c * w * gaugan.d_loss_term(fake_p, False, cfg.gan_loss)
        l_real = l_real + cfg.lambda_c * w * gaugan.d_loss_term(real_p, True, cfg.gan_loss)
    return l_fake + l_real, {"D_fake": l_fake.detach(), "D_real": l_real.detach()}


def oracle_edges(batch, cfg):
    """The real Canny edges G's forward reads with edge_source="canny" (None otherwise)."""
    if cfg.edge_source != "canny":
        return None
    if "edge" not in batch:
        raise KeyError("ecgan.py: edge_source='canny' needs the batch's real edges 'edge'; call "
                       "data.prepare_batch(..., edges=True)")
    return batch["edge"]


def needs_edges(cfg):
    """The batch must carry real Canny edges I_e (data.prepare_batch(..., edges=True)): G_e is judged against them
    (Eq. 8)."""
    return cfg.use_edge


def needs_segmenter(cfg):
    """G_l is a frozen segmenter trained on real images, read from cfg.segmenter; "" asks the training script to
    train one (train.py does, before step 1) (Sec. 3.2)."""
    return cfg.use_label_gen


def G_module(G):
    return getattr(G, "module", G)  # unwrap DistributedDataParallel


@torch.no_grad()
def sample(G, batch):
    """Columns for the sample grid, all (B, 3, H, W) in [-1, 1]."""
    edges = oracle_edges(batch, G_module(G).cfg)
    out = G(batch["input"], batch["image"], aux=False, edges=edges)
    cols = {"fake": out["fake"], "intermediate": out["intermediate"].clamp(-1, 1)}  # I' spans [-2, 2] (Eq. 1)
    if "edge" in out:
        cols["edge"] = out["edge"]
        cols["attention"] = torch.sigmoid(out["edge"]) * 2 - 1  # I_a' = sigmoid(I_e') (Eq. 1), mapped to [-1, 1]
    if "class" in out:
        cols["class"] = out["class"]  # I_g (Eq. 7); dontcare pixels are 0
    if G_module(G).style_encoder is not None:
        cols["fake_prior_z"] = G(batch["input"], aux=False, edges=edges)["fake"]
    return cols


# ----------------------------------------------------------------------------- parameter table

def parameter_table():
    for name in gaugan.PAPER_DATASETS:
        info, ups = gaugan.paper_dataset(name)
        with torch.device("meta"):  # shapes only
            G, D = build(ECGANConfig(num_upsampling_layers=ups), info)
        print(f"| {name} | generator | {gaugan.count_params(G, trainable=True) / 1e6:.2f} |")
        print(f"| {name} | label generator (frozen) | {gaugan.count_params(G, trainable=False) / 1e6:.2f} |")
        print(f"| {name} | discriminator | {gaugan.count_params(D) / 1e6:.2f} |")


if __name__ == "__main__":
    parameter_table()
