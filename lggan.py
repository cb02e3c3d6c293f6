"""
LGGAN and LGGAN++: "Local Class-Specific and Global Image-Level Generative Adversarial Networks for
Semantic-Guided Scene Generation" (Tang, Xu, Yan, Torr, Sebe; CVPR 2020) and its extension "Local and Global
GANs with Semantic-Aware Upsampling for Image Generation" (Tang, Shao, Torr, Sebe; TPAMI 2022).

Semantic image synthesis (Fig. 2, Sec. 3.3): a parameter-sharing encoder E (Sec. 3.1) feeds
    G_g  a global image-level generator (the GauGAN trunk of gaugan.py),
    G_l  a local class-specific generator: one 7x7 conv per class on the class-masked feature (Eq. 2),
         masked per-class L1 (Eq. 3), fusion by addition (Eq. 4) or by a conv (Eq. 5), and a classification
         module with void-class filtering (Eq. 6),
    G_w  a pixel-level weight map (Eq. 7) fusing the two results (Eq. 8),
judged by the semantic-guided discriminator D_s (Eq. 9) on the fused, global and local results.
Cross-view translation (Sec. 4.1.1, Table 4): a ResNet generator on concat(I_a, S_g) with global, local and
weight-map decoders, judged by D_s on concat(S_g, image) and D_i on concat(I_a, image) (Eq. 10).
LGGAN++ = LGGAN with semantic-aware upsampling (sau.py, Sec. 3.2): `upsample="sau"`; which layers become SAUs
is `sau_placement` (Upsampling, below).

Map of this file
    ResBlock, up_block, Encoder     building blocks; E of Sec. 3.1
    ClassGenerator                  per-class generation (Eq. 2): `naive` loop, `vectorized` grouped conv, or
                                    `pixel` (one conv's cost whatever the number of classes; the default)
    class_ce                        classification loss with void classes filtered (Eq. 6)
    LocalGenerator, WeightMap       G_l (Eqs. 2-6) and G_w (Eq. 7)
    LGGANConfig, TASK_DEFAULTS      every hyperparameter, with the Table 9 ablation switches; TABLE9 its rows
    LGGANGenerator                  semantic synthesis: E + G_g + G_l + G_w, fusion Eq. 8
    CrossViewGenerator              cross-view translation generator (Table 4: 12.19M)
    PatchGAN, CrossViewDiscriminator  70x70 PatchGAN; D_s + D_i (Table 4: 2.77M each)
    losses                          masked L1 (Eq. 3), total variation, vanilla GAN (Eqs. 9, 10)
    model interface                 Config, build, g_step, d_step, sample (train.py / eval.py)
    __main__                        parameter table (time and memory: bench.py)

Ablations of Table 9 (semantic synthesis, Cityscapes): one config field per component (local, conv_fusion,
cls_loss, weight_map), the rows B1-B5 as config overrides in TABLE9. `local=False` removes everything that
depends on the local branch (nothing of it is built).
Without the weight map (B2-B4) the final image is the mean of the global and local results (Eq. 8 with
W_g = W_l = 1/2): the paper does not say how B2-B4 combine them (`unweighted_fusion="local"`: the local
result alone, the global one still trained by its own D and losses).
Cross-view translation keeps the fixed structure of Sec. 4.1.1 (sum fusion, weight map, no class CE); the
switches are for Table 9.

Upsampling (`upsample`, `upsample_low_res`, `sau_placement`, `sau_window`). LGGAN (upsample="nearest", the
public code): the global trunk is GauGAN's (nearest x2 after head_0, [G_middle_0,] G_middle_1, up_0, up_1,
up_2); G_l and G_w (and the cross-view decoders) each have two up blocks, a 3x3 stride-2 transposed conv
(4ngf -> 2ngf -> ngf), IN, ReLU. LGGAN++ says only that SAU replaces "the upsampling layers" (Sec. 4.2) while
Sec. 3.1 / Fig. 2 put one SAU between E and the three branches, f' = SAU(f); both are built:
    sau_placement="upsamplers" (default): the trunk as GauGAN+SAU (gaugan.py: nearest, [nearest,] SAU x4, the
        low-resolution ones stay nearest as in Table 12's 93.4M; `upsample_low_res` makes them SAUs too), and
        every up block of G_l / G_w is a 3x3 conv THEN the SAU (on cout channels; conv first: it runs on a
        quarter of the pixels and the SAU on the narrower tensor, as the transposed conv changes channels
        while it upsamples). Any other upsample name is placed the same way; "deconv" keeps the transposed
        convs. The code the default reproduces: Cityscapes 111.40M (LGGAN 110.79M).
    sau_placement="encoder" (upsample="sau" only): f = E's H/4 map (4ngf, the map E hands G_l and G_w), and
        f' = SAU(f) (4ngf, H/2) is read by all three branches: G_l and G_w with their first up block at
        stride 1 (a 3x3 conv, the transposed conv's parameters), G_g through E's two deeper stride-2 convs
        (its path from E, now from f', to 16ngf at H/8, resized to the trunk's start). Everything else is
        LGGAN's (nearest trunk, transposed convs), so the count is LGGAN's plus one SAU at 4ngf channels.
        (f at H/4, f' at H/2: Fig. 4 doubles f; G_w's two stride-2 convs in Sec. 3.3 imply its input at H/4,
        which would put f at H/8 with 8ngf channels, a map no branch reads in the public code.)
`sau_window` ("expanded" | "input", sau.py's header) reaches every SAU built, in both placements.

Choices where the paper and the public code are silent or buggy (each is named where it is made):
    - each class image is multiplied by its mask again, tanh(conv_c(F_c)) * M_c: Eq. 3 trains it to zero
      outside M_c anyway, and it makes absent classes contribute exactly nothing, so the fast versions
      may skip them and still equal the naive loop;
    - every real class (info.num_classes) gets its own branch (the public ADE20K code shares one branch for
      classes 51-150); the dontcare channel gets none;
    - class CE is averaged over the (sample, class) pairs present, for any batch size (public: batch 1 only);
    - Eq. 6's "semantic-guided average pooling" averages F_c over its class's pixels (`cls_pool="class"`): the
      public code averages over all H*W (`cls_pool="image"`), so a class covering 1% of the image pools to 1% of
      its mean feature and its CE, meant for small classes above all, can barely reach its features;
    - the task (semantic | crossview) is the dataset's DataInfo.task; TASK_DEFAULTS holds the cross-view
      optimiser and loss weights.
Parameters (`python lggan.py`): Cityscapes G 110.79M. The public code's 111.1M also counts GauGAN's first
conv (36 -> 1024, 3x3: 0.33M), which it builds but never calls; E replaces it here. ADE20K G 114.64M
(public 115.1M: the same unused conv, 1.39M, and one shared branch for classes 51-150 instead of 99 more).

Where this file reads an ambiguous sentence of the paper, follows the public code instead of the text, or
departs on purpose, the README's "Departures from the papers" table says so and names the flag for the
other reading.
"""

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import gaugan


# ----------------------------------------------------------------------------- building blocks

class ResBlock(nn.Module):
    """pix2pixHD residual block: reflect pad, 3x3 conv, IN, ReLU, reflect pad, 3x3 conv, IN; + x."""

    def __init__(self, ch):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(ch, ch, 3), nn.InstanceNorm2d(ch), nn.ReLU(),
            nn.ReflectionPad2d(1), nn.Conv2d(ch, ch, 3), nn.InstanceNorm2d(ch))

    def forward(self, x):
        return x + self.body(x)


def up_block(cin, cout, upsample, window="expanded", scale=2):
    """x2 upsampling cin -> cout, then IN and ReLU: (B, cin, H, W) -> (B, cout, 2H, 2W).
    "nearest"/"deconv": the public code's 3x3 stride-2 transposed conv; else a 3x3 conv, THEN the named
    upsampler on its cout channels (conv first: it runs on a quarter of the pixels, and the upsampler on the
    narrower tensor; a transposed conv likewise changes channels as it upsamples). window: SAU's window.
    scale=1: the 3x3 conv alone, no upsampling (after the shared SAU of sau_placement="encoder")."""
    if scale == 1:
        layers = [nn.Conv2d(cin, cout, 3, padding=1)]   # the parameters of the transposed conv
    elif scale != 2:
        raise ValueError(f"lggan.py: up_block scale={scale!r}, expected 1 or 2")
    elif upsample in ("nearest", "deconv"):
        layers = [nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1)]
    else:
        layers = [nn.Conv2d(cin, cout, 3, padding=1), gaugan.make_upsampler(upsample, cout, scale=2, window=window)]
    return nn.Sequential(*layers, nn.InstanceNorm2d(cout), nn.ReLU())


def branch_up(ngf, upsample, window="expanded", pre_upsampled=False):
    """The two up blocks of G_l, G_w and the cross-view decoders: (B, 4ngf, h, w) -> (B, ngf, 4h, 4w), or
    (B, ngf, 2h, 2w) when the input is already f' = SAU(f) (pre_upsampled: the first block keeps the size)."""
    return nn.Sequential(up_block(4 * ngf, 2 * ngf, upsample, window, 1 if pre_upsampled else 2),
                         up_block(2 * ngf, ngf, upsample, window))


SAU_PLACEMENTS = ("upsamplers", "encoder")


def sau_placement(cfg):
    """(upsampler name of the trunk and branches, whether one SAU follows E); the header's Upsampling."""
    if cfg.sau_placement not in SAU_PLACEMENTS:
        raise ValueError(f"lggan.py: sau_placement={cfg.sau_placement!r}, expected one of {SAU_PLACEMENTS}")
    if cfg.sau_placement == "upsamplers":
        return cfg.upsample, False
    if cfg.upsample != "sau":
        raise ValueError(f"lggan.py: sau_placement='encoder' puts one SAU after E (Sec. 3.1) and needs "
                         f"upsample='sau', got upsample={cfg.upsample!r}")
    if cfg.upsample_low_res:
        raise ValueError("lggan.py: upsample_low_res replaces trunk upsamplers, which sau_placement='encoder' "
                         "leaves nearest; use sau_placement='upsamplers'")
    return "nearest", True


class Encoder(nn.Module):
    """Parameter-sharing encoder E (Sec. 3.1): reflect-pad 7x7 conv -> ngf, four stride-2 3x3 convs
    -> 2, 4, 8, 16 ngf (64 ... 1024 at ngf=64, public code), IN without affine, ReLU."""

    def __init__(self, input_nc, ngf):
        super().__init__()
        w = [ngf, 2 * ngf, 4 * ngf, 8 * ngf, 16 * ngf]
        self.stem = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(input_nc, w[0], 7), nn.InstanceNorm2d(w[0]),
                                  nn.ReLU())
        self.down = nn.ModuleList(
            nn.Sequential(nn.Conv2d(a, b, 3, stride=2, padding=1), nn.InstanceNorm2d(b), nn.ReLU())
            for a, b in zip(w[:-1], w[1:]))

    def forward(self, x, sau=None):
        x = self.stem(x)                      # (B, L, H, W) -> (B, ngf, H, W)
        feats = []
        for i, down in enumerate(self.down):
            x = down(x)
            if i == 1 and sau is not None:    # sau_placement="encoder" (Sec. 3.1): f' = SAU(f), f the H/4 map;
                x = sau(x)                    # (B, 4ngf, H/4, W/4) -> (B, 4ngf, H/2, W/2), then H/8 for G_g
            feats.append(x)
        return feats[1], feats[3]             # (B, 4ngf, H/4, W/4) for G_l and G_w; (B, 16ngf, H/16, W/16) for G_g


# ----------------------------------------------------------------------------- G_l: per-class generation

IMPLS = ("naive", "vectorized", "pixel")
POOLS = ("class", "image")   # Eq. 6 pooling: divide by the class's area | by H*W (public code)


class ClassGenerator(nn.Module):
    """Class c's image: tanh(conv7x7_c(F * M_c)) * M_c (Eq. 2 and the per-class conv of Fig. 6).

    ONE 7x7 conv per class, no spectral norm: the public code's design (the paper says "several convolutional
    layers"; ECGAN's G_c, ecgan.ClassSpecificGenerator, is the multi-layer, spectral-normed version).
    One weight tensor (N, 3, C, 7, 7) and bias (N, 3) serve every implementation, so their state dicts are
    interchangeable. Absent classes output exactly zero (masked output), so skipping them changes nothing:
      naive       one conv per dataset class in a Python loop (as the public code): cost ~ N convs.
      vectorized  gathers the weights of the K classes present anywhere in the batch and runs ONE grouped conv
                  (groups=K) over the K masked copies of F: time and memory ~ K, not N (ADE20K: N=150, K~10).
      pixel       cost ~ ONE conv whatever N and K. Output pixel p (class k = s(p)) only sees tap q's
                  neighbour p+q when that neighbour is also of class k (F * M_k is zero elsewhere), so map
                  every pixel once with its own class's weights, Z(p') = W_s(p') F(p') (C -> 3*49; one matmul
                  per present class over its pixels), then sum the 49 shifted taps where s(p+q) == s(p).
    Indexing self.weight[idx] still gives the whole Parameter a gradient (zero rows for absent classes), so
    under DDP without find_unused_parameters every parameter is reduced every step.
    Returns images (B, K, 3, H, W), idx (K,) the class ids, pooled (B, K, C) the "semantic-guided average
    pooling" of each F_c (Eq. 6): pool="class" divides the sum over F_c by the class's area in that sample (the
    mean feature of the class; 0 where the class is absent), pool="image" by H*W (the public code's
    nn.AdaptiveAvgPool2d over F_c = f' * M_c, which shrinks a class's pooled feature with its area).
    """

    def __init__(self, num_classes, channels, impl="pixel", pool="class"):
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"lggan.py: impl={impl!r}, expected one of {IMPLS}")
        if pool not in POOLS:
            raise ValueError(f"lggan.py: cls_pool={pool!r}, expected one of {POOLS}")
        self.num_classes, self.impl, self.pool = num_classes, impl, pool
        self.weight = nn.Parameter(torch.empty(num_classes, 3, channels, 7, 7))
        self.bias = nn.Parameter(torch.zeros(num_classes, 3))
        # the public code's xavier-normal init (gain 0.02) of each per-class nn.Conv2d
        fan_in, fan_out = channels * 49, 3 * 49
        nn.init.normal_(self.weight, 0.0, 0.02 * math.sqrt(2.0 / (fan_in + fan_out)))

    def forward(self, feat, masks):
        B, C, H, W = feat.shape                                      # masks (B, N, H, W) one-hot of real classes
        if self.impl == "naive":
            images, pooled = [], []
            for c in range(self.num_classes):
                m = masks[:, c:c + 1]
                f_c = feat * m                                       # Eq. 2
                pooled.append(self._pool(f_c.sum((2, 3)), m[:, 0]))   # Eq. 6 pooling
                y = F.conv2d(F.pad(f_c, (3, 3, 3, 3), mode="reflect"), self.weight[c], self.bias[c])
                images.append(torch.tanh(y) * m)                     # (B, 3, H, W)
            idx = torch.arange(self.num_classes, device=feat.device)
            return torch.stack(images, 1), idx, torch.stack(pooled, 1)
        # classes present anywhere in the batch (one host sync); never empty, so every parameter stays in the
        # graph even for an all-dontcare batch
        idx = (masks.amax((0, 2, 3)) > 0).nonzero().squeeze(1)
        if idx.numel() == 0:
            idx = torch.zeros(1, dtype=torch.long, device=feat.device)
        m = masks[:, idx]                                            # (B, K, H, W)
        pooled = self._pool(torch.einsum("bchw,bkhw->bkc", feat, m), m)  # Eq. 6 pooling without K copies of F
        if self.impl == "vectorized":
            K = idx.numel()
            x = (feat.unsqueeze(1) * m.unsqueeze(2)).flatten(1, 2)   # Eq. 2: (B, K*C, H, W), F_c stacked
            w = self.weight[idx].flatten(0, 1)                       # (K*3, C, 7, 7)
            y = F.conv2d(F.pad(x, (3, 3, 3, 3), mode="reflect"), w, self.bias[idx].flatten(), groups=K)
            images = torch.tanh(y).unflatten(1, (K, 3)) * m.unsqueeze(2)  # (B, K*3, H, W) -> (B, K, 3, H, W)
        else:
            images = torch.tanh(self._pixel_conv(feat, masks, idx)).unsqueeze(1) * m.unsqueeze(2)
        return images, idx, pooled

    def _pool(self, sums, m):
        """sum of F_c over its pixels (B, [K,] C) -> semantic-guided average pooling (Eq. 6); m (B, [K,] H, W)."""
        if self.pool == "image":
            return sums / (m.shape[-2] * m.shape[-1])
        return sums / m.sum((-2, -1)).clamp(min=1).unsqueeze(-1)  # absent class: 0 / 1

    def _pixel_conv(self, feat, masks, idx):
        """conv7x7_s(p)(F * M_s(p))(p) at every pixel p, s(p) its class: (B, C, H, W) -> (B, 3, H, W)."""
        B, C, H, W = feat.shape
        N = self.num_classes
        lab = torch.where(masks.sum(1) > 0, masks.argmax(1), N).flatten()  # (BHW,); N: no real class (dontcare)
        order = lab.argsort(stable=True)                             # pixels grouped by class, in idx order
        counts = torch.bincount(lab, minlength=N + 1)[torch.cat([idx, idx.new_tensor([N])])].tolist()
        segs = feat.permute(0, 2, 3, 1).reshape(-1, C)[order].split(counts)     # (BHW, C) by class
        wmat = self.weight[idx].permute(0, 1, 3, 4, 2).flatten(1, 3)            # (K, 3*49, C), rows (o, dy, dx)
        parts = [seg @ w.T for seg, w in zip(segs, wmat)]                      # (P_k, C) -> (P_k, 3*49)
        # Z in class order; dontcare pixels and one extra row are zero (the extra row: taps of another class)
        z = torch.cat(parts + [parts[0].new_zeros(counts[-1] + 1, 3 * 49)]).view(-1, 3, 49)
        # tap q of pixel p reads row nbr[p, q] = p + q (reflect padding, as F.pad(mode="reflect")), kept only
        # where that neighbour has p's class: one gather, whose backward is one scatter into a Z-sized buffer
        # (49 shifted slices of a padded Z cost a padded-Z-sized gradient each); taps summed in the bias dtype
        nbr = _reflect_neighbours(B, H, W, 7, feat.device)           # (BHW, 49) flat pixel ids
        same = lab[nbr] == lab[:, None]                              # (BHW, 49): s(p+q) == s(p)
        rows = torch.where(same, order.argsort()[nbr], z.shape[0] - 1)  # row of Z in class order, or the zero row
        out = z.gather(0, rows[:, None, :].expand(-1, 3, -1))          # (BHW, 3, 49)
        out = out.sum(2, dtype=self.bias.dtype)                     # -> (BHW, 3)
        out = out + torch.cat([self.bias, self.bias.new_zeros(1, 3)])[lab]  # + b_s(p)
        return out.view(B, H, W, 3).permute(0, 3, 1, 2)              # (B, 3, H, W)


def _reflect_neighbours(B, H, W, k, device):
    """(B*H*W, k*k) flat index of pixel (y + dy - k//2, x + dx - k//2) of the same image, reflected at the
    borders like F.pad(mode="reflect") (no edge repeat); taps in row-major (dy, dx) order."""
    r = k // 2
    if r >= H or r >= W:
        raise ValueError(f"lggan.py: a {k}x{k} reflect-padded conv needs H, W > {r}, got {H}x{W}")
    reflect = lambda i, n: torch.where(i < 0, -i, torch.where(i >= n, 2 * n - 2 - i, i))
    d = torch.arange(-r, r + 1, device=device)
    ys = reflect(torch.arange(H, device=device)[:, None] + d, H)   # (H, k)
    xs = reflect(torch.arange(W, device=device)[:, None] + d, W)   # (W, k)
    hw = (ys[:, None, :, None] * W + xs[None, :, None, :]).reshape(H * W, k * k)  # (HW, k*k)
    return (torch.arange(B, device=device)[:, None, None] * (H * W) + hw).reshape(-1, k * k)


def class_ce(logits, idx, present):
    """Eq. 6: cross-entropy of each F_c's prediction against its class c, only where class c is present in
    that sample (H_c = 1), averaged over the counted (sample, class) pairs. logits (B, K, N), idx (K,),
    present (B, K) in {0, 1}. Correct for any batch size (the public code is for batch 1)."""
    B, K, N = logits.shape
    ce = F.cross_entropy(logits.reshape(B * K, N), idx.repeat(B), reduction="none").view(B, K)
    return (ce * present).sum() / present.sum().clamp(min=1)


class LocalGenerator(nn.Module):
    """G_l: residual blocks on E's H/4 feature, two up blocks (branch_up: x4; x2 on the shared SAU's f' at
    H/2 with sau_placement="encoder") to a ngf-channel full-resolution f',
    per-class generation, fusion (Eq. 4 sum or Eq. 5 conv + tanh), classification module (Eq. 6)."""

    def __init__(self, num_classes, ngf, n_res, upsample, conv_fusion, cls_loss, impl, cls_pool="class",
                 window="expanded", pre_upsampled=False):
        super().__init__()
        self.num_classes = num_classes
        self.res = nn.Sequential(*[ResBlock(4 * ngf) for _ in range(n_res)])
        self.up = branch_up(ngf, upsample, window, pre_upsampled)
        self.classes = ClassGenerator(num_classes, ngf, impl, cls_pool)
        self.fuse = nn.Conv2d(3 * num_classes, 3, 3, padding=1) if conv_fusion else None     # Eq. 5
        self.classifier = nn.Linear(ngf, num_classes) if cls_loss else None                 # Eq. 6's f(.)

    def forward(self, f4, masks):
        feat = self.up(self.res(f4))                       # (B, 4ngf, H/4, W/4) -> (B, ngf, H, W) = f'
        images, idx, pooled = self.classes(feat, masks)
        if self.fuse is None:
            local = images.sum(1)                          # Eq. 4: (B, K, 3, H, W) -> (B, 3, H, W)
        else:                                              # Eq. 5 over the present classes' input channels only:
            N = self.num_classes                           # absent classes' channels are all zero
            w = self.fuse.weight.view(3, N, 3, 3, 3)[:, idx].flatten(1, 2)
            local = torch.tanh(F.conv2d(images.flatten(1, 2), w, self.fuse.bias, padding=1))
        out = {"local": local, "class_images": images, "class_idx": idx}
        if self.classifier is not None:
            present = masks[:, idx].amax((2, 3))           # (B, K): H of Eq. 6 per sample
            out["cls_loss"] = class_ce(self.classifier(pooled), idx, present)
        return out


class WeightMap(nn.Module):
    """G_w (Eq. 7): two up blocks (-> 2ngf, ngf; branch_up) on E's H/4 feature, 1x1 conv -> 2, channel softmax.
    The paper's text puts IN + ReLU after the 2-channel conv too (`norm=True`); the public code, and our
    default, feed the raw logits to the softmax (after a ReLU the weights could not go below 1/(1 + e^x))."""

    def __init__(self, ngf, upsample, norm=False, window="expanded", pre_upsampled=False):
        super().__init__()
        self.up = branch_up(ngf, upsample, window, pre_upsampled)
        self.conv = nn.Conv2d(ngf, 2, 1)
        self.norm = nn.Sequential(nn.InstanceNorm2d(2), nn.ReLU()) if norm else nn.Identity()

    def forward(self, f4):
        logits = self.norm(self.conv(self.up(f4)))
        return torch.softmax(logits, 1)                   # (B, 4ngf, H/4, W/4) -> (B, 2, H, W), sums to 1


# ----------------------------------------------------------------------------- config

@dataclass
class LGGANConfig:
    ngf: int = 64                         # width: GauGAN nf; E is ngf..16ngf = 64..1024 (public code)
    ndf: int = 64                         # discriminator width (public code, pix2pix)
    num_upsampling_layers: str = "normal"  # GauGAN trunk: "normal" | "more" (Cityscapes, public code)
    upsample: str = "nearest"             # sau.make_upsampler name; "sau" = LGGAN++ (Sec. 3.2, Table 12)
    upsample_low_res: bool = False        # GauGAN trunk: also its low-resolution upsamplers (gaugan.py)
    sau_placement: str = "upsamplers"     # with upsample="sau": "upsamplers" | "encoder" (Fig. 2: f' = SAU(f)) (header)
    sau_window: str = "expanded"          # SAU window: "expanded" (SAFU text) | "input" (Z(l, k)) (sau.py)
    norm: str = "instance"                # SPADE param-free norm of the trunk (GauGAN)
    spade_hidden: int = 128               # SPADE's shared conv width (GauGAN)
    n_res: int = 9                        # residual blocks of G_l / the cross-view generator (public code)
    impl: str = "pixel"                   # per-class generation: "naive" (public loop) | "vectorized" | "pixel"
    local: bool = True                    # Table 9 B2+: local class-specific generator G_l
    conv_fusion: bool = True              # Table 9 B3+: Eq. 5 conv fusion (False: Eq. 4 addition)
    cls_loss: bool = True                 # Table 9 B4+: classification-based feature learning (Eq. 6)
    cls_pool: str = "class"               # Eq. 6 pooling: / class area | "image": / H*W (public code); see ClassGenerator
    weight_map: bool = True               # Table 9 B5: weight-map fusion G_w (Eqs. 7, 8)
    weight_map_norm: bool = False         # G_w's last conv followed by IN + ReLU (paper text) or not (public code)
    unweighted_fusion: str = "mean"       # B2-B4 (no G_w): "mean" of global and local (ours) | "local" only
    num_D: int = 2                        # D_s scales (GauGAN multiscale D, semantic synthesis)
    n_layers_D: int = 4                   # D_s PatchGAN depth (GauGAN convention, public code)
    gan_loss: str = "hinge"               # semantic D_s: "hinge" (public code) | "log" (Eq. 9 as written)
    lambda_feat: float = 10.0             # feature matching, each of the 3 outputs (public code)
    lambda_vgg: float = 10.0              # VGG19 perceptual, each output (public code; cross-view too)
    lambda_local_l1: float = 1.0          # Eq. 3 masked per-class L1 (public code: 1 semantic, 100 cross-view)
    lambda_cls: float = 1.0               # Eq. 6 class CE (public code)
    lambda_l1: float = 100.0              # cross-view: L1 on the three outputs (public cross-view code)
    lambda_tv: float = 1e-6               # cross-view: total variation of the final image (public code)
    lr_g: float = 1e-4                    # semantic: GauGAN TTUR; cross-view 2e-4 (TASK_DEFAULTS)
    lr_d: float = 4e-4                    # semantic: GauGAN TTUR; cross-view 2e-4
    beta1: float = 0.0                    # semantic: GauGAN; cross-view 0.5
    beta2: float = 0.9                    # semantic: GauGAN; cross-view 0.999

    @classmethod
    def for_task(cls, task, **kw):
        """The paper's defaults for a task ("semantic" | "crossview"); keyword arguments override them."""
        return cls(**{**TASK_DEFAULTS[task], **kw})


# The task is DataInfo.task (the dataset decides; no config field, so no clash with train.py's --task).
# Fields whose paper value depends on the task (public cross-view code: Adam 2e-4, betas (0.5, 0.999),
# masked L1 x100): apply them for flags not given on the command line, like train.py's PRESETS.
TASK_DEFAULTS = {
    "semantic": {},
    "crossview": dict(lr_g=2e-4, lr_d=2e-4, beta1=0.5, beta2=0.999, lambda_local_l1=100.0),
}
Config = LGGANConfig

TABLE9 = {  # Table 9 rows (Cityscapes ablation) as config overrides; train.py flags, e.g. --local false
    "B1 global only": dict(local=False),                                                  # G_g alone
    "B2 + local, addition (Eq. 4)": dict(conv_fusion=False, cls_loss=False, weight_map=False),
    "B3 + local, conv (Eq. 5)": dict(cls_loss=False, weight_map=False),
    "B4 + classification loss (Eq. 6)": dict(weight_map=False),
    "B5 + weight map (full LGGAN)": dict(),                                               # Eqs. 7, 8: the full model
}


# ----------------------------------------------------------------------------- generators

class LGGANGenerator(nn.Module):
    """Semantic image synthesis: E -> G_g (global), G_l (local), G_w (weights) -> Eq. 8."""

    def __init__(self, cfg, info):
        super().__init__()
        self.num_classes = info.num_classes
        if cfg.unweighted_fusion not in ("mean", "local"):
            raise ValueError(f"lggan.py: unweighted_fusion={cfg.unweighted_fusion!r}, expected 'mean' or 'local'")
        self.unweighted_fusion = cfg.unweighted_fusion
        up, shared = sau_placement(cfg)  # the header's Upsampling
        self.encoder = Encoder(info.input_nc, cfg.ngf)
        self.shared_sau = gaugan.make_upsampler("sau", 4 * cfg.ngf, 2, cfg.sau_window) if shared else None
        # GauGAN trunk without its first conv: E's 16ngf feature replaces it (widths match at any ngf)
        gcfg = gaugan.backbone_config(cfg)
        gcfg.upsample = up
        self.global_gen = gaugan.GauGANGenerator(gcfg, info.input_nc, info.height, info.width, head=False)
        self.local_gen = (LocalGenerator(info.num_classes, cfg.ngf, cfg.n_res, up, cfg.conv_fusion,
                                         cfg.cls_loss, cfg.impl, cfg.cls_pool, window=cfg.sau_window,
                                         pre_upsampled=shared) if cfg.local else None)
        self.weight_map = (WeightMap(cfg.ngf, up, cfg.weight_map_norm, window=cfg.sau_window, pre_upsampled=shared)
                           if cfg.local and cfg.weight_map else None)

    def forward(self, input, onehot):
        """input (B, input_nc, H, W) label map (+ instance edges); onehot (B, label_nc, H, W).
        Returns a dict: fake, global [, local, class_images, class_idx, cls_loss, weights (B, 2, H, W)]."""
        f4, f16 = self.encoder(input, self.shared_sau)              # sau_placement="encoder": f4 = f' at H/2
        gg = self.global_gen
        # (B, 16ngf, H/16, W/16) -> (B, 16ngf, sh, sw), nearest like GauGAN's resize of the label map
        x = F.interpolate(f16, size=(gg.sh, gg.sw), mode="nearest")
        out = {"global": gg.to_rgb(gg.trunk(x, input))}
        if self.local_gen is None:                                   # B1
            out["fake"] = out["global"]
            return out
        out.update(self.local_gen(f4, onehot[:, :self.num_classes]))
        if self.weight_map is None:                                  # B2-B4: the paper does not say
            out["fake"] = (0.5 * (out["global"] + out["local"]) if self.unweighted_fusion == "mean"
                           else out["local"])
        else:
            w = self.weight_map(f4)                                  # Eq. 7
            out["weights"] = w
            out["fake"] = out["global"] * w[:, :1] + out["local"] * w[:, 1:]   # Eq. 8
        return out


class CrossViewGenerator(nn.Module):
    """Sec. 4.1.1 / Table 4: concat(I_a, S_g) (6 ch) -> 7x7 conv, two stride-2 3x3 convs (pix2pix ResNet
    generator) -> n_res residual blocks -> three decoders of two x2 up blocks each: global image (7x7 conv,
    tanh), local (per-class 7x7 convs on the class-masked feature, summed, Eq. 4), weight map (1x1 conv ->
    2, softmax, Eq. 7); final image by Eq. 8."""

    def __init__(self, cfg, info, in_channels=6):
        super().__init__()
        ngf = cfg.ngf
        up, shared = sau_placement(cfg)  # "encoder": f' = SAU(encoder output), read by the three decoders
        self.num_classes = info.num_classes
        self.encoder = nn.Sequential(
            nn.ReflectionPad2d(3), nn.Conv2d(in_channels, ngf, 7), nn.InstanceNorm2d(ngf), nn.ReLU(),
            nn.Conv2d(ngf, 2 * ngf, 3, stride=2, padding=1), nn.InstanceNorm2d(2 * ngf), nn.ReLU(),
            nn.Conv2d(2 * ngf, 4 * ngf, 3, stride=2, padding=1), nn.InstanceNorm2d(4 * ngf), nn.ReLU(),
            *[ResBlock(4 * ngf) for _ in range(cfg.n_res)])
        self.shared_sau = gaugan.make_upsampler("sau", 4 * ngf, 2, cfg.sau_window) if shared else None
        decoder = lambda: branch_up(ngf, up, cfg.sau_window, shared)
        self.global_dec = nn.Sequential(decoder(), nn.ReflectionPad2d(3), nn.Conv2d(ngf, 3, 7), nn.Tanh())
        self.local_dec = decoder()
        self.classes = ClassGenerator(info.num_classes, ngf, cfg.impl)
        self.weight_dec = nn.Sequential(decoder(), nn.Conv2d(ngf, 2, 1))

    def forward(self, input, onehot):
        x = self.encoder(input)                            # (B, 6, H, W) -> (B, 4ngf, H/4, W/4)
        if self.shared_sau is not None:
            x = self.shared_sau(x)                         # f' (B, 4ngf, H/2, W/2)
        images, idx, _ = self.classes(self.local_dec(x), onehot[:, :self.num_classes])
        w = torch.softmax(self.weight_dec(x), 1)           # Eq. 7
        out = {"global": self.global_dec(x), "local": images.sum(1), "class_images": images, "class_idx": idx,
               "weights": w}
        out["fake"] = out["global"] * w[:, :1] + out["local"] * w[:, 1:]   # Eq. 8
        return out


# ----------------------------------------------------------------------------- discriminators

class PatchGAN(nn.Module):
    """pix2pix 70x70 PatchGAN (n_layers=3): 4x4 convs 64 (s2, no norm), 128 (s2), 256 (s2), 512 (s1), 1 (s1),
    instance norm, LeakyReLU 0.2. 2.7678M parameters on 6 input channels (Table 4)."""

    def __init__(self, in_channels, ndf=64, n_layers=3):
        super().__init__()
        layers, nf = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2)], ndf
        for n in range(1, n_layers + 1):
            nf_prev, nf = nf, ndf * min(2 ** n, 8)
            layers += [nn.Conv2d(nf_prev, nf, 4, stride=2 if n < n_layers else 1, padding=1),
                       nn.InstanceNorm2d(nf), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(nf, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)                                 # (B, C, H, W) -> (B, 1, ~H/8, ~W/8) logits


class CrossViewDiscriminator(nn.Module):
    """D_s judges concat(S_g, image) (Eq. 9), D_i judges concat(I_a, image) (Eq. 10)."""

    def __init__(self, ndf=64):
        super().__init__()
        self.D_s, self.D_i = PatchGAN(6, ndf), PatchGAN(6, ndf)

    def forward(self, seg, image_a, images):
        return self.D_s(torch.cat([seg, images], 1)), self.D_i(torch.cat([image_a, images], 1))


# ----------------------------------------------------------------------------- losses

def masked_l1(class_images, idx, onehot, real):
    """Eq. 3: sum over classes of E||I_g * M_c - I_c||_1 (mean over B, 3, H, W, as nn.L1Loss)."""
    m = onehot[:, idx].unsqueeze(2)                        # (B, K, 1, H, W)
    return (real.unsqueeze(1) * m - class_images).abs().sum(1).mean()


def tv_loss(x):
    """Total variation: summed absolute neighbour differences (public cross-view code), mean over the batch."""
    return ((x[:, :, 1:] - x[:, :, :-1]).abs().sum() + (x[..., 1:] - x[..., :-1]).abs().sum()) / x.shape[0]


def bce(logits, target_real):
    """Vanilla GAN (the log terms of Eqs. 9, 10), non-saturating for G."""
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, float(target_real)))


def outputs_of(out):
    """The images every loss judges: fused, global and local (only fused for B1)."""
    return [out["fake"]] + ([out["global"], out["local"]] if "local" in out else [])


def split_preds(preds, n):
    """D output of a batch of n equal chunks -> n D outputs (num_D lists of features each)."""
    return [[[f.chunk(n)[i] for f in scale] for scale in preds] for i in range(n)]


# ----------------------------------------------------------------------------- model interface

def build(cfg, info):
    """Semantic synthesis or cross-view translation, as info.task says."""
    gaugan.check_gan_loss(cfg.gan_loss)
    if cfg.impl not in IMPLS:
        raise ValueError(f"lggan.py: impl={cfg.impl!r}, expected one of {IMPLS}")
    if info.task == "crossview":
        if (cfg.lr_g, cfg.beta1) == (Config.lr_g, Config.beta1):
            warnings.warn("lggan.py: cross-view run with the semantic-synthesis optimiser settings; the paper's are "
                          f"{TASK_DEFAULTS['crossview']} (LGGANConfig.for_task('crossview'))")
        G, D = CrossViewGenerator(cfg, info), CrossViewDiscriminator(cfg.ndf)
    elif info.task == "semantic":
        G = LGGANGenerator(cfg, info)
        D = gaugan.MultiscaleDiscriminator(info.input_nc + 3, cfg.ndf, cfg.n_layers_D, cfg.num_D)
    else:
        raise ValueError(f"lggan.py: dataset {info.name!r} has task={info.task!r}, expected 'semantic' or 'crossview'")
    return gaugan.init_weights(G), gaugan.init_weights(D)


def g_step(G, D, batch, cfg, vgg=None):
    real, onehot = batch["image"], batch["onehot"]
    out = G(batch["input"], onehot)                        # the one G call
    fakes = outputs_of(out)
    n = len(fakes)
    logs = {}
    if "image_a" in batch:                                 # cross-view batch (data.py keys)
        # both D judge the three outputs, one forward each on their concatenation along the batch
        p_s, p_i = D(batch["seg"].repeat(n, 1, 1, 1), batch["image_a"].repeat(n, 1, 1, 1), torch.cat(fakes))
        logs["G_gan"] = n * (bce(p_s, 1) + bce(p_i, 1))    # summed over the outputs (Eqs. 9, 10)
        logs["G_l1"] = cfg.lambda_l1 * sum(F.l1_loss(f, real) for f in fakes)
        logs["G_tv"] = cfg.lambda_tv * tv_loss(out["fake"])
    else:
        # D_s (Eq. 9) on the n outputs and the real image in one forward (real features for feature matching)
        x = gaugan.d_input(batch["input"].repeat(n + 1, 1, 1, 1), torch.cat(fakes + [real]))
        *fake_preds, real_preds = split_preds(D(x), n + 1)
        logs["G_gan"] = sum(gaugan.g_loss_term(p, cfg.gan_loss) for p in fake_preds)
        logs["G_feat"] = cfg.lambda_feat * sum(gaugan.feature_matching_loss(p, real_preds) for p in fake_preds)
        if "cls_loss" in out:
            logs["G_cls"] = cfg.lambda_cls * out["cls_loss"]   # Eq. 6
    if vgg is not None:  # one VGG forward; the mean over n equal chunks times n = the sum over outputs
        logs["G_vgg"] = cfg.lambda_vgg * n * gaugan.vgg_loss(vgg, torch.cat(fakes), real.repeat(n, 1, 1, 1))
    if "class_images" in out:
        logs["G_l1_local"] = cfg.lambda_local_l1 * masked_l1(out["class_images"], out["class_idx"], onehot, real)
    loss = sum(logs.values())
    return loss, {k: v.detach() for k, v in logs.items()}


def d_step(G, D, batch, cfg):
    real = batch["image"]
    with torch.no_grad():
        fakes = outputs_of(G(batch["input"], batch["onehot"]))
    n = len(fakes)
    images = torch.cat([real] + fakes)                     # real and every fake in ONE D forward
    if "image_a" in batch:
        p_s, p_i = D(batch["seg"].repeat(n + 1, 1, 1, 1), batch["image_a"].repeat(n + 1, 1, 1, 1), images)
        l_real = n * sum(0.5 * bce(p.chunk(n + 1)[0], 1) for p in (p_s, p_i))       # pix2pix's 0.5 * (real + fake)
        l_fake = sum(0.5 * bce(c, 0) for p in (p_s, p_i) for c in p.chunk(n + 1)[1:])
    else:
        preds = split_preds(D(gaugan.d_input(batch["input"].repeat(n + 1, 1, 1, 1), images)), n + 1)
        # the public code adds one D loss per output, so the real term counts n times
        l_real = n * gaugan.d_loss_term(preds[0], True, cfg.gan_loss)
        l_fake = sum(gaugan.d_loss_term(p, False, cfg.gan_loss) for p in preds[1:])
    return l_real + l_fake, {"D_real": l_real.detach(), "D_fake": l_fake.detach()}


@torch.no_grad()
def sample(G, batch):
    out = G(batch["input"], batch["onehot"])
    cols = {"fake": out["fake"]}
    if "local" in out:
        cols["global"], cols["local"] = out["global"], out["local"]
    if "weights" in out:  # weight maps (B, 1, H, W) in [0, 1] -> [-1, 1] for the grid
        cols["w_global"], cols["w_local"] = 2 * out["weights"][:, :1] - 1, 2 * out["weights"][:, 1:] - 1
    return cols


# ----------------------------------------------------------------------------- parameter table

def table_infos():
    """(row name, config, DataInfo-like) of the parameter table: the public code's settings."""
    city, _ = gaugan.paper_dataset("cityscapes")
    ade, _ = gaugan.paper_dataset("ade20k")
    cv = gaugan.dataset_info("crossview", 6, False, False, 256, 256, "crossview")  # 6 grouped classes (Dayton)
    return [("cityscapes", Config(num_upsampling_layers="more"), city),
            ("cityscapes sau", Config(num_upsampling_layers="more", upsample="sau"), city),
            ("ade20k", Config(), ade),
            ("crossview", Config.for_task("crossview"), cv)]


if __name__ == "__main__":
    for name, cfg, info in table_infos():
        with torch.device("meta"):  # shapes only: counting 111M parameters without allocating them
            G, D = build(cfg, info)
        D = D.D_s if info.task == "crossview" else D   # cross-view: one of its two discriminators (Table 4)
        print(f"| {name} | generator | {gaugan.count_params(G) / 1e6:.2f} |")
        print(f"| {name} | discriminator | {gaugan.count_params(D) / 1e6:.2f} |")
