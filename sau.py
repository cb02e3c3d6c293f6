"""
Semantic-Aware Upsampling (SAU), from "Local and Global GANs with Semantic-Aware Upsampling for
Image Generation" (Tang, Shao, Torr, Sebe; IEEE TPAMI 2022, the LGGAN++ paper), Sec. 3.2, Eq. 1,
Fig. 4, plus the upsampler zoo of its Table 12. Imports torch only, so this file can be copied
into another project on its own.

Map of the file
    sau_upsample(x, kernels, ...)   SAFU (Sec. 3.2.2, Eq. 1): weighted sum of a k x k window per
                                    output pixel, three implementations that give the same numbers:
        _sau_naive                  explicit loops that read like Eq. 1 (tests, teaching)
        _sau_vectorized             the paper's pipeline: expand, F.unfold, reshape, weighted sum
        _sau_lean                   no k^2-sized intermediate: shift-and-accumulate per output phase
        _ShiftAccumulate            the lean core as an autograd.Function with a hand-written backward
    SAU(nn.Module)                  SAKG (Sec. 3.2.1: compress, kernel conv, shuffle, softmax) + SAFU
    PositionAttention, DANetHead    "spatial attention" baseline of Table 12 (DANet's PAM head)
    Involution                      involution baseline of Table 12
    make_upsampler(name, C, s)      the Table 12 zoo behind one (B, C, H, W) -> (B, C, sH, sW) interface
    TABLE12_PARAMS, table12_check   Table 12's parameter counts, the paper's beside ours
    impl_check / __main__           `python sau.py`: the table and naive vs vectorized vs lean (bench.py times them)

Two windows (the paper gives both; `window`, the models' `sau_window` config field, picks one).
    "expanded" (default): the SAFU text (Sec. 3.2.2) nearest-expands f to (sH, sW) and takes the k x k block
        of the *expanded* map around each output pixel. The expanded map repeats each input pixel s x s
        times, so at k=5, s=2 the 25 taps fall on only 3 x 3 distinct input pixels: a 5x5 kernel over a
        3x3 input window (weights of taps on the same pixel add up).
    "input": the definition of Z(l, k) (Sec. 3.2), the k x k block of the *input* around l = floor(l'/s)
        (CARAFE's rule): a true 5 x 5 window of input pixels, 25 distinct taps.
Kernels are (B, k*k, sH, sW) with the k*k taps in row-major order of the offsets (p, q), p, q in
-k//2..k//2, the channel order F.unfold uses.

Where SAU goes (the paper says it replaces "the upsampling layers"; what is built):
    GauGAN+SAU (Table 12, gaugan.py, upsample="sau"): the four decoder upsamplers (after G_middle_1, up_0,
        up_1, up_2: 16nf, 8nf, 4nf, 2nf channels) are SAUs; the low-resolution one(s) after head_0 (and
        after G_middle_0 in 'more') stay nearest: nearest, [nearest,] SAU x4. That is the count that
        reproduces Table 12's 93.4M (see SAU.__init__); upsample_low_res=True makes those SAUs too.
    LGGAN++ (lggan.py, upsample="sau"): sau_placement="upsamplers" (default) as above in the global trunk
        and, in G_l / G_w, a 3x3 conv then an SAU in place of each transposed conv; sau_placement="encoder"
        (Sec. 3.1 / Fig. 2, f' = SAU(f)) one SAU on the encoder's output, shared by the three branches.

Where this file reads an ambiguous sentence of the paper, follows the public code instead of the text, or
departs on purpose, the README's "Departures from the papers" table says so and names the flag for the
other reading.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

WINDOWS = ("expanded", "input")
IMPLS = ("naive", "vectorized", "lean")


def _check(x, kernels, scale, window, impl):
    if window not in WINDOWS:
        raise ValueError(f"sau.py: window={window!r}, expected one of {WINDOWS}")
    if impl not in IMPLS:
        raise ValueError(f"sau.py: impl={impl!r}, expected one of {IMPLS}")
    if x.dim() != 4 or kernels.dim() != 4:
        raise ValueError(f"sau.py: x {tuple(x.shape)} and kernels {tuple(kernels.shape)} must be 4-D")
    B, C, H, W = x.shape
    k = math.isqrt(kernels.shape[1])
    if k * k != kernels.shape[1] or k % 2 == 0:
        raise ValueError(f"sau.py: kernels has {kernels.shape[1]} channels, expected k*k with k odd")
    if tuple(kernels.shape) != (B, k * k, scale * H, scale * W):
        raise ValueError(f"sau.py: kernels {tuple(kernels.shape)} do not match x {tuple(x.shape)} at "
                         f"scale={scale}: expected {(B, k * k, scale * H, scale * W)}")
    return k


def sau_upsample(x, kernels, scale=2, window="expanded", impl="lean"):
    """SAFU, Eq. 1. x (B, C, H, W), kernels (B, k*k, sH, sW) already normalised -> (B, C, sH, sW)."""
    k = _check(x, kernels, scale, window, impl)
    if impl == "naive":
        return _sau_naive(x, kernels, scale, k, window)
    if impl == "vectorized":
        return _sau_vectorized(x, kernels, scale, k, window)
    return _sau_lean(x, kernels, scale, k, window)


# ----------------------------------------------------------------------------------------------
# naive: Eq. 1 pixel by pixel


def _sau_naive(x, kernels, s, k, window):
    B, C, H, W = x.shape
    r = k // 2
    e = x.repeat_interleave(s, 2).repeat_interleave(s, 3)  # feature spatial expansion (B, C, sH, sW)
    rows = []
    for i2 in range(s * H):          # output location l' = (i2, j2)
        row = []
        for j2 in range(s * W):
            i, j = i2 // s, j2 // s  # source location l = floor(l' / s)
            acc = x.new_zeros(B, C)
            for p in range(-r, r + 1):
                for q in range(-r, r + 1):
                    w = kernels[:, (p + r) * k + (q + r), i2, j2, None]  # f_n(p, q), (B, 1)
                    if window == "expanded":  # block of the expanded map around l'
                        a, b, src, hh, ww = i2 + p, j2 + q, e, s * H, s * W
                    else:                     # Z(l, k): block of the input around l
                        a, b, src, hh, ww = i + p, j + q, x, H, W
                    if 0 <= a < hh and 0 <= b < ww:  # zero padding outside
                        acc = acc + src[:, :, a, b] * w  # Eq. 1
            row.append(acc)
        rows.append(torch.stack(row, -1))
    return torch.stack(rows, -2)  # (B, C, sH, sW)


# ----------------------------------------------------------------------------------------------
# vectorized: the paper's SAFU pipeline (expansion, sliding block extraction, reshape, weighted sum)


def _sau_vectorized(x, kernels, s, k, window):
    B, C, H, W = x.shape
    if window == "expanded":
        e = F.interpolate(x, scale_factor=s, mode="nearest")          # (B, C, sH, sW)
        f_l = F.unfold(e, k, padding=k // 2)                           # (B, C k^2, sH sW)
    else:
        f_l = F.unfold(x, k, padding=k // 2).view(B, C * k * k, H, W)  # blocks around l
        f_l = F.interpolate(f_l, scale_factor=s, mode="nearest")       # l = floor(l'/s): (B, C k^2, sH, sW)
    f_r = f_l.view(B, C, k * k, s * H, s * W)                          # feature reshape
    return (f_r * kernels.unsqueeze(1)).sum(2)                         # Eq. 1, (B, C, sH, sW)


# ----------------------------------------------------------------------------------------------
# lean: shift-and-accumulate on the input map, one output phase (a, b) = (i' mod s, j' mod s) at a time
#
# Output pixel (s*i + a, s*j + b) reads input pixel (i + u, j + v) with weight w[a, b, u, v](i, j).
# window="input":    u = p, v = q, so every phase has the k*k taps of the kernel itself.
# window="expanded": the expanded map at row s*i + a + p holds input row i + floor((a + p) / s), so the
#                    k*k taps fall on only a few distinct input pixels (3 x 3 for k=5, s=2) and their
#                    weights can be summed first: a (U x V)-tap filter on the input map per phase.


def _tap_groups(a, s, k):
    """For phase a: {input offset u: range of kernel rows (p + k//2) whose expanded tap lands on u}."""
    r = k // 2
    groups = {}
    for p in range(-r, r + 1):
        groups.setdefault((a + p) // s, []).append(p + r)
    return {u: (ps[0], ps[-1] + 1) for u, ps in groups.items()}  # contiguous: (a + p) // s is monotone


def _expanded_weights(kernels, s, k):
    """Aggregate kernels (B, k*k, sH, sW) into (B, s, s, U, U, H, W) weights on input taps."""
    B, _, sH, sW = kernels.shape
    H, W = sH // s, sW // s
    lo = (-(k // 2)) // s                  # most negative input offset over all phases
    U = (s - 1 + k // 2) // s - lo + 1     # offsets lo .. lo + U - 1
    A = kernels.new_zeros(s, U, k)          # A[a, u, p] = 1 where kernel row p of phase a lands on u
    for a in range(s):
        for u, (p0, p1) in _tap_groups(a, s, k).items():
            A[a, u - lo, p0:p1] = 1
    kr = kernels.view(B, k, k, H, s, W, s)  # (B, p, q, i, a, j, b)
    return torch.einsum("aup,bvq,npqiajb->nabuvij", A, A, kr), lo  # small: no channel dimension


def _phase_taps(s, k, window):
    """Per phase a: the (start, stop) indices of the taps that carry weight."""
    if window == "input":
        return [(0, k)] * s
    lo = (-(k // 2)) // s
    return [(min(g) - lo, max(g) - lo + 1) for g in (_tap_groups(a, s, k) for a in range(s))]


_CHUNK_BYTES = 1 << 20


def _channel_chunk(x):
    """Channels per chunk: on CPU ~_CHUNK_BYTES of x, so one chunk and its accumulator stay in cache while
    all the taps pass over it (about 4x faster than whole-tensor passes at B=4, C=256, 64x128)."""
    B, C, H, W = x.shape
    return C if x.device.type != "cpu" else max(1, _CHUNK_BYTES // (B * H * W * x.element_size()))


def _shift_accumulate(x, w, lo, taps):
    """x (B, C, H, W), w (B, s, s, U, V, H, W): y[s i + a, s j + b] = sum_uv x[i+lo+u, j+lo+v] w[a,b,u,v,i,j]."""
    B, C, H, W = x.shape
    s, pad = w.shape[1], max(-lo, lo + w.shape[3] - 1)
    xp = F.pad(x, (pad, pad, pad, pad))  # zero padding of the window
    y = x.new_empty(B, C, H, s, W, s)
    cb = _channel_chunk(x)
    for c0 in range(0, C, cb):
        xc = xp[:, c0:c0 + cb]
        for a in range(s):
            for b in range(s):
                acc = None
                for u in range(*taps[a]):
                    for v in range(*taps[b]):
                        oy, ox = pad + lo + u, pad + lo + v
                        xs = xc[:, :, oy:oy + H, ox:ox + W]           # shifted view, no copy
                        wt = w[:, a, b, u, v].unsqueeze(1)            # (B, 1, H, W), broadcast over C
                        acc = xs * wt if acc is None else acc.addcmul_(xs, wt)
                y[:, c0:c0 + cb, :, a, :, b] = acc
    return y.view(B, C, s * H, s * W)  # (B, C, sH, sW)


class _ShiftAccumulate(torch.autograd.Function):
    """_shift_accumulate with a hand-written backward. Plain autograd through the loop above keeps
    only views, but each tap's slice backward materialises a zero-filled padded-input-sized gradient,
    so its backward pays k^2 s^2 extra full passes over C x H x W (measured by `python bench.py`,
    row "lean plain autograd"). Here the taps write into one gradient buffer instead.
    Once differentiable: no double backward (no gradient penalty goes through the generator)."""

    @staticmethod
    def forward(ctx, x, w, lo, taps):
        ctx.save_for_backward(x, w)
        ctx.lo, ctx.taps = lo, taps
        return _shift_accumulate(x, w, lo, taps)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        lo, taps = ctx.lo, ctx.taps
        B, C, H, W = x.shape
        s, pad = w.shape[1], max(-lo, lo + w.shape[3] - 1)
        g = grad.reshape(B, C, H, s, W, s)
        xp = F.pad(x, (pad, pad, pad, pad))
        gxp = torch.zeros_like(xp) if ctx.needs_input_grad[0] else None
        gw = torch.zeros_like(w) if ctx.needs_input_grad[1] else None
        cb = _channel_chunk(x)
        for c0 in range(0, C, cb):
            xc = xp[:, c0:c0 + cb]
            for a in range(s):
                for b in range(s):
                    gab = g[:, c0:c0 + cb, :, a, :, b].contiguous()  # gradient of this phase and chunk
                    for u in range(*taps[a]):
                        for v in range(*taps[b]):
                            oy, ox = pad + lo + u, pad + lo + v
                            if gxp is not None:
                                wt = w[:, a, b, u, v].unsqueeze(1)
                                gxp[:, c0:c0 + cb, oy:oy + H, ox:ox + W].addcmul_(gab, wt)
                            if gw is not None:
                                gw[:, a, b, u, v] += (gab * xc[:, :, oy:oy + H, ox:ox + W]).sum(1)
        gx = gxp[:, :, pad:pad + H, pad:pad + W] if gxp is not None else None
        return gx, gw, None, None


def _lean_weights(kernels, s, k, window):
    if window == "expanded":
        return _expanded_weights(kernels, s, k)
    B, _, sH, sW = kernels.shape
    kr = kernels.view(B, k, k, sH // s, s, sW // s, s)
    # (B, a, b, p, q, i, j): a phase-major copy of the kernels (no channel dimension, the kernels'
    # own size) so that each tap's weight plane is contiguous; strided planes ran ~2x slower
    return kr.permute(0, 4, 6, 1, 2, 3, 5).contiguous(), -(k // 2)


def _sau_lean(x, kernels, s, k, window, autograd_function=True):
    w, lo = _lean_weights(kernels, s, k, window)
    taps = _phase_taps(s, k, window)
    if autograd_function:
        return _ShiftAccumulate.apply(x, w, lo, taps)
    return _shift_accumulate(x, w, lo, taps)


# ----------------------------------------------------------------------------------------------
# SAU module: SAKG (Sec. 3.2.1) + SAFU (Sec. 3.2.2)


class SAU(nn.Module):
    """Semantic-aware upsampling, Fig. 4. (B, C, H, W) -> (B, C, sH, sW). window: "expanded" (SAFU text: a
    k x k kernel over fewer distinct input pixels, 3 x 3 at k=5, s=2) or "input" (Z(l, k): k x k input pixels)."""

    def __init__(self, channels, scale=2, k=5, compressed=64, window="expanded", impl="lean"):
        super().__init__()
        if window not in WINDOWS:
            raise ValueError(f"sau.py: window={window!r}, expected one of {WINDOWS}")
        self.scale, self.k, self.window, self.impl = scale, k, window, impl
        # feature channel compression: 1x1, C -> C' (Sec. 3.2.1, C' = 64). It never expands: a narrow layer
        # (C < 64, e.g. train.py's cpu preset) keeps C' = C; at the papers' widths (C >= 128) C' = 64.
        compressed = min(compressed, channels)
        self.compress = nn.Conv2d(channels, compressed, 1)
        # semantic kernel generation, C' -> k^2 s^2. The paper does not give its size. 3x3 (CARAFE's
        # encoder) over 1x1 (the third-party port) because 3x3 reproduces Table 12: GauGAN on
        # Cityscapes is 93.05M; Table 12's deconv (98.6M, a 2x2 stride-2 deconv) and pixel shuffle
        # (143.2M, a 3x3 conv to s^2 C) both fit four replaced upsamplers at widths 1024, 512, 256,
        # 128, and at those widths 3x3 gives 93.05 + 0.35 = 93.40M (Table 12: 93.4M) while 1x1 gives
        # 93.20M. (At all six 'more' widths 1024x3, 512, 256, 128: 1x1 93.34M, 3x3 93.65M.)
        # `python sau.py` prints this check.
        self.encoder = nn.Conv2d(compressed, k * k * scale * scale, 3, padding=1)

    def kernels(self, x):
        """Normalised kernels (B, k*k, sH, sW); kernels(x)[b, :, i', j'].view(k, k) is Fig. 5's map."""
        f_k = self.encoder(self.compress(x))        # (B, k^2 s^2, H, W)
        f_s = F.pixel_shuffle(f_k, self.scale)      # feature shuffle: (B, k^2, sH, sW)
        return torch.softmax(f_s, dim=1)            # channel-wise normalisation: sums to 1 over k^2

    def forward(self, x):
        return sau_upsample(x, self.kernels(x), self.scale, self.window, self.impl)  # (B, C, sH, sW)


# ----------------------------------------------------------------------------------------------
# Table 12 baselines that are more than one torch layer


class PositionAttention(nn.Module):
    """DANet's position attention module (Fu et al., CVPR 2019): every pixel attends to every pixel.
    Memory O((HW)^2): the (B, HW, HW) attention map is 1 GB in fp32 at B=4, 64x128."""

    def __init__(self, channels):
        super().__init__()
        self.query = nn.Conv2d(channels, max(channels // 8, 1), 1)
        self.key = nn.Conv2d(channels, max(channels // 8, 1), 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))  # DANet starts as identity

    def forward(self, x):
        B, C, H, W = x.shape
        q = self.query(x).flatten(2).transpose(1, 2)           # (B, HW, C/8)
        k = self.key(x).flatten(2)                             # (B, C/8, HW)
        attn = torch.softmax(torch.bmm(q, k), dim=-1)          # (B, HW, HW)
        v = self.value(x).flatten(2)                           # (B, C, HW)
        out = torch.bmm(v, attn.transpose(1, 2)).view(B, C, H, W)
        return self.gamma * out + x


class DANetHead(nn.Module):
    """DANet's position-attention branch: 3x3 conv to C/4, PAM, 3x3 conv, 1x1 conv back to C.
    With it Table 12's 97.4M is reproduced (four layers at 1024..128 add 4.37M to 93.05M);
    the bare PAM would add 1.74M. Residual, so the generator's features pass through unchanged too."""

    def __init__(self, channels):
        super().__init__()
        inter = max(channels // 4, 1)
        self.conv_in = nn.Sequential(nn.Conv2d(channels, inter, 3, padding=1, bias=False),
                                     nn.BatchNorm2d(inter), nn.ReLU())
        self.pam = PositionAttention(inter)
        self.conv_mid = nn.Sequential(nn.Conv2d(inter, inter, 3, padding=1, bias=False),
                                      nn.BatchNorm2d(inter), nn.ReLU())
        self.conv_out = nn.Conv2d(inter, channels, 1)

    def forward(self, x):
        return x + self.conv_out(self.conv_mid(self.pam(self.conv_in(x))))


class Involution(nn.Module):
    """Involution (Li et al., CVPR 2021): a K x K kernel generated per pixel from that pixel, shared by
    the channels of a group. Paper defaults K = 7, 16 channels per group, reduction 4. Computed by
    shift-and-accumulate (the unfold version would hold a 49 C H W intermediate)."""

    def __init__(self, channels, kernel_size=7, group_channels=16, reduction=4):
        super().__init__()
        self.k = kernel_size
        self.groups = max(channels // group_channels, 1)
        mid = max(channels // reduction, 1)
        self.reduce = nn.Sequential(nn.Conv2d(channels, mid, 1), nn.BatchNorm2d(mid), nn.ReLU())
        self.span = nn.Conv2d(mid, kernel_size * kernel_size * self.groups, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        G, k, r = self.groups, self.k, self.k // 2
        w = self.span(self.reduce(x)).view(B, G, 1, k * k, H, W)  # per-pixel kernels
        xp = F.pad(x, (r, r, r, r)).view(B, G, C // G, H + 2 * r, W + 2 * r)
        out = 0
        for t in range(k * k):
            p, q = divmod(t, k)
            out = out + xp[..., p:p + H, q:q + W] * w[:, :, :, t]
        return out.view(B, C, H, W)


# ----------------------------------------------------------------------------------------------
# the zoo

UPSAMPLERS = ("nearest", "bilinear", "bicubic", "deconv", "pixelshuffle", "attention", "involution", "sau")
# LGGAN++ Table 12: parameters (M) of GauGAN's Cityscapes generator with each upsampler, the paper's numbers
TABLE12_PARAMS = dict(nearest=93.0, bilinear=93.0, bicubic=93.0, deconv=98.6, pixelshuffle=143.2, attention=97.4,
                      involution=93.1, sau=93.4)


def make_upsampler(name, channels, scale=2, window="expanded"):
    """Table 12's upsamplers B1-B8, each (B, C, H, W) -> (B, C, sH, sW). window: SAU's window rule (header);
    the other upsamplers have none, but a wrong value is an error whatever the name."""
    if window not in WINDOWS:
        raise ValueError(f"sau.py: window={window!r}, expected one of {WINDOWS}")
    up = nn.Upsample(scale_factor=scale, mode="nearest")
    if name == "nearest":                                                           # B1
        return up
    if name in ("bilinear", "bicubic"):                                            # B2, B3
        return nn.Upsample(scale_factor=scale, mode=name, align_corners=False)
    if name == "deconv":  # B4: s x s stride-s (2x2 for s=2: 98.6M in Table 12)
        return nn.ConvTranspose2d(channels, channels, scale, stride=scale)
    if name == "pixelshuffle":  # B5: 3x3 conv to s^2 C then shuffle (143.2M in Table 12)
        return nn.Sequential(nn.Conv2d(channels, channels * scale * scale, 3, padding=1),
                             nn.PixelShuffle(scale))
    if name == "attention":  # B6: O((HW)^2) memory at the input resolution, then nearest
        return nn.Sequential(DANetHead(channels), up)
    if name == "involution":                                                       # B7
        return nn.Sequential(Involution(channels), up)
    if name == "sau":                                                              # B8
        return SAU(channels, scale, window=window)
    raise ValueError(f"sau.py: unknown upsampler {name!r}, expected one of {UPSAMPLERS}")


# ----------------------------------------------------------------------------------------------
# `python sau.py`: Table 12's parameter counts and the three implementations against each other
# (time and memory: bench.py)


def table12_check():
    """GauGAN (Cityscapes) generator parameters with each upsampler, against Table 12."""
    gaugan = 93_048_003  # GauGAN 'more', 36 label channels, counted from its layer list (REFERENCE.md)
    lines = ["| upsampler | Table 12 | 4 layers (1024, 512, 256, 128) | 6 layers (1024 x3, 512, 256, 128) |",
             "|---|---|---|---|"]
    with torch.device("meta"):
        for name in UPSAMPLERS:
            n = {c: sum(p.numel() for p in make_upsampler(name, c).parameters()) for c in (1024, 512, 256, 128)}
            four, six = sum(n.values()), sum(n.values()) + 2 * n[1024]
            lines.append(f"| {name} | {TABLE12_PARAMS[name]:.1f}M | {(gaugan + four) / 1e6:.2f}M | "
                         f"{(gaugan + six) / 1e6:.2f}M |")
    return "\n".join(lines)


def impl_check(B=2, C=3, H=5, W=6, k=5, scale=2):
    """Largest |difference| of output and of both gradients between naive and each fast impl, per window (float64)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    kern = torch.softmax(torch.randn(B, k * k, scale * H, scale * W, generator=g, dtype=torch.float64), 1)
    up = torch.randn(B, C, scale * H, scale * W, generator=g, dtype=torch.float64)
    rows = []
    for window in WINDOWS:
        res = {}
        for impl in IMPLS:
            xi, ki = x.clone().requires_grad_(), kern.clone().requires_grad_()
            y = sau_upsample(xi, ki, scale, window, impl)
            y.backward(up)
            res[impl] = (y.detach(), xi.grad, ki.grad)
        for impl in ("vectorized", "lean"):
            rows.append((window, impl, max((a - b).abs().max().item() for a, b in zip(res[impl], res["naive"]))))
    return rows


if __name__ == "__main__":
    print("Table 12 check: GauGAN (93.05M) + the upsampler's parameters at GauGAN's widths")
    print(table12_check())
    print("\nnaive vs fast, float64, B=2 C=3 5x6 -> 10x12, k=5: max |difference| of output, dx and dkernels")
    for window, impl, err in impl_check():
        print(f"| {window} | {impl} | {err:.1e} |")
