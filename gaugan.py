"""
GauGAN: "Semantic Image Synthesis with Spatially-Adaptive Normalization", Park, Liu, Wang, Zhu, CVPR 2019.

The shared backbone of ECGAN (its encoder E) and LGGAN/LGGAN++ (its global generator), and the
B1 baseline of their ablations. Map of this file:

    SPADE                  Eq. 1 of GauGAN: param-free norm, then a per-pixel gamma/beta from the label map
    SPADEResBlock          two SPADE-conv pairs + a (learned when fin != fout) shortcut, spectral norm
    GauGANConfig           every hyperparameter with the paper's default
    GauGANGenerator        head (conv on the resized label map, or fc from z) -> trunk (ResBlocks and
                           upsamplers from sau.make_upsampler) -> to_rgb
    StyleEncoder           GauGAN's image encoder (mu, logvar) for multi-modal synthesis
    PatchDiscriminator     one PatchGAN (pix2pixHD), returning every layer's features
    MultiscaleDiscriminator num_D PatchGANs on progressively average-pooled inputs
    losses                 hinge or log GAN (d_loss_term, g_loss_term), feature matching, KL, VGG19 perceptual
    shared D-side helpers  d_input, discriminate, gan_g_losses, gan_d_loss (reused by lggan.py, ecgan.py)
    init_weights           the public code's init (xavier, gain 0.02)
    model interface        Config, build, g_step, d_step, sample (called by train.py / eval.py)
    parameter table        count_params, dataset_info (data.DataInfo's fields without data.py), PAPER_DATASETS

`python gaugan.py` prints the parameter table (millions).

Where this file reads an ambiguous sentence of the paper, follows the public code instead of the text, or
departs on purpose, the README's "Departures from the papers" table says so and names the flag for the
other reading.
"""

import os
from dataclasses import dataclass, fields
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm

try:  # sau.py provides every upsampler of LGGAN++ Table 12; nearest works without it
    import sau
except ModuleNotFoundError as e:  # only a missing sau.py; an import error inside it still surfaces
    if e.name != "sau":
        raise
    sau = None


def make_upsampler(name, channels, scale=2, window="expanded"):
    """(B, C, H, W) -> (B, C, sH, sW). sau.make_upsampler when sau.py exists; window is SAU's window rule
    ("expanded" | "input", sau.py's header), which the other upsamplers ignore."""
    if sau is not None:
        return sau.make_upsampler(name, channels, scale=scale, window=window)
    if window not in ("expanded", "input"):
        raise ValueError(f"gaugan.py: sau_window={window!r}, expected 'expanded' or 'input'")
    if name == "nearest":
        return nn.Upsample(scale_factor=scale, mode="nearest")
    raise ValueError(f"upsample={name!r} needs sau.py, which could not be imported; only 'nearest' works without it")


def param_free_norm(norm, channels):
    if norm == "instance":
        return nn.InstanceNorm2d(channels, affine=False)
    if norm == "batch":  # the paper uses synchronized batch norm; plain batch norm per process here
        return nn.BatchNorm2d(channels, affine=False)
    raise ValueError(f"norm={norm!r}: expected 'instance' or 'batch'")


# ----------------------------------------------------------------------------- building blocks

class SPADE(nn.Module):
    """out = norm(x) * (1 + gamma(seg)) + beta(seg), gamma/beta per pixel (GauGAN Eq. 1)."""

    def __init__(self, norm_nc, label_nc, hidden=128, norm="instance"):
        super().__init__()
        self.norm = param_free_norm(norm, norm_nc)
        self.shared = nn.Sequential(nn.Conv2d(label_nc, hidden, 3, padding=1), nn.ReLU())
        self.gamma = nn.Conv2d(hidden, norm_nc, 3, padding=1)
        self.beta = nn.Conv2d(hidden, norm_nc, 3, padding=1)

    def forward(self, x, seg):
        seg = F.interpolate(seg, size=x.shape[2:], mode="nearest")  # (B, L, H', W') -> (B, L, H, W)
        h = self.shared(seg)
        # 1 + gamma: a zero-initialised gamma leaves the normalised activations unscaled
        return self.norm(x) * (1 + self.gamma(h)) + self.beta(h)


class SPADEResBlock(nn.Module):
    """SPADE -> LeakyReLU -> conv3x3, twice; shortcut SPADE -> conv1x1 (no bias) when fin != fout."""

    def __init__(self, fin, fout, label_nc, norm="instance", spectral=True, hidden=128):
        super().__init__()
        sn = spectral_norm if spectral else (lambda m: m)
        middle = min(fin, fout)
        self.learned_shortcut = fin != fout
        self.norm_0 = SPADE(fin, label_nc, hidden, norm=norm)
        self.conv_0 = sn(nn.Conv2d(fin, middle, 3, padding=1))
        self.norm_1 = SPADE(middle, label_nc, hidden, norm=norm)
        self.conv_1 = sn(nn.Conv2d(middle, fout, 3, padding=1))
        if self.learned_shortcut:
            self.norm_s = SPADE(fin, label_nc, hidden, norm=norm)
            self.conv_s = sn(nn.Conv2d(fin, fout, 1, bias=False))

    def forward(self, x, seg):
        x_s = self.conv_s(self.norm_s(x, seg)) if self.learned_shortcut else x
        dx = self.conv_0(F.leaky_relu(self.norm_0(x, seg), 0.2))
        dx = self.conv_1(F.leaky_relu(self.norm_1(dx, seg), 0.2))
        return x_s + dx  # (B, fin, H, W) -> (B, fout, H, W)


# ----------------------------------------------------------------------------- config

@dataclass
class GauGANConfig:
    ngf: int = 64                         # generator width nf (GauGAN Sec. 4 / public code)
    ndf: int = 64                         # discriminator width (public code)
    num_upsampling_layers: str = "normal"  # "normal" (5 ups) | "more" (6 ups, Cityscapes) (public code)
    upsample: str = "nearest"             # any sau.make_upsampler name; "sau" = GauGAN+SAU (LGGAN++ Table 12)
    upsample_low_res: bool = False        # also the upsamplers after head_0 / G_middle_0 (Table 12: nearest)
    sau_window: str = "expanded"          # SAU window: "expanded" (SAFU text) | "input" (Z(l, k)) (sau.py header)
    norm: str = "instance"                # SPADE's param-free norm: "instance" | "batch" (paper: sync batch norm)
    spade_hidden: int = 128               # SPADE's shared conv width (public code)
    use_vae: bool = False                 # style encoder + KL for multi-modal synthesis (GauGAN Sec. 3.3)
    z_dim: int = 256                      # style vector size (public code)
    num_D: int = 2                        # discriminator scales (GauGAN Sec. 3.2, pix2pixHD)
    n_layers_D: int = 4                   # PatchGAN depth (public code)
    gan_loss: str = "hinge"               # "hinge" (GauGAN Sec. 4) | "log" (the cross-entropy form) (gaugan.GAN_LOSSES)
    lambda_feat: float = 10.0             # feature matching weight (GauGAN Sec. 4)
    lambda_vgg: float = 10.0              # VGG perceptual weight (GauGAN Sec. 4)
    lambda_kld: float = 0.05              # KL weight (GauGAN Sec. 3.3 / supp.)
    lr_g: float = 1e-4                    # TTUR: G lr (GauGAN Sec. 4)
    lr_d: float = 4e-4                    # TTUR: D lr (GauGAN Sec. 4)
    beta1: float = 0.0                    # Adam beta1 (GauGAN Sec. 4)
    beta2: float = 0.9                    # Adam beta2 (GauGAN Sec. 4)


def backbone_config(cfg):
    """The GauGANConfig inside another model's config: every field the two share, by name."""
    return GauGANConfig(**{f.name: getattr(cfg, f.name) for f in fields(GauGANConfig) if hasattr(cfg, f.name)})


NUM_UPSAMPLES = {"normal": 5, "more": 6}


# ----------------------------------------------------------------------------- generator

class GauGANGenerator(nn.Module):
    """head -> head_0, G_middle_0, G_middle_1, up_0..up_3 with x2 upsamplers between -> to_rgb.
    self.ups, in forward order: after head_0, [after G_middle_0 ('more' only),] after G_middle_1, up_0, up_1,
    up_2. With upsample=NAME: nearest, [nearest,] NAME x4; with upsample_low_res: NAME x5 (x6 in 'more')."""

    def __init__(self, cfg, input_nc, height, width, head=True):
        super().__init__()
        if cfg.num_upsampling_layers not in NUM_UPSAMPLES:
            raise ValueError(f"num_upsampling_layers={cfg.num_upsampling_layers!r}: "
                             f"expected one of {list(NUM_UPSAMPLES)}")
        self.more = cfg.num_upsampling_layers == "more"
        n_up = NUM_UPSAMPLES[cfg.num_upsampling_layers]
        if height % 2**n_up or width % 2**n_up:
            raise ValueError(f"image size {height}x{width} must be divisible by 2^{n_up}={2**n_up} "
                             f"for num_upsampling_layers={cfg.num_upsampling_layers!r}")
        self.sh, self.sw = height // 2**n_up, width // 2**n_up  # start resolution (Cityscapes 'more': 4 x 8)
        if self.sh * self.sw == 1 and cfg.norm == "instance":  # instance norm of a 1x1 map is undefined
            raise ValueError(f"image size {height}x{width} gives a 1x1 start resolution with "
                             f"num_upsampling_layers={cfg.num_upsampling_layers!r}; instance norm needs more "
                             f"than one pixel: use a larger size, 'normal' upsampling or norm='batch'")
        self.use_vae, self.z_dim = cfg.use_vae, cfg.z_dim
        nf = cfg.ngf
        if head and cfg.use_vae:
            self.fc = nn.Linear(cfg.z_dim, 16 * nf * self.sh * self.sw)
        elif head:
            self.fc = nn.Conv2d(input_nc, 16 * nf, 3, padding=1)
        else:
            self.fc = None
        block = lambda fin, fout: SPADEResBlock(fin, fout, input_nc, norm=cfg.norm, hidden=cfg.spade_hidden)
        self.head_0 = block(16 * nf, 16 * nf)
        self.G_middle_0 = block(16 * nf, 16 * nf)
        self.G_middle_1 = block(16 * nf, 16 * nf)
        self.up_0 = block(16 * nf, 8 * nf)
        self.up_1 = block(8 * nf, 4 * nf)
        self.up_2 = block(4 * nf, 2 * nf)
        self.up_3 = block(2 * nf, nf)
        # One upsampler per position, built for the channels of the tensor it sees. LGGAN++ says SAU replaces
        # "the upsampling layers" without saying which; Table 12's parameter counts (deconv 98.6M, pixel shuffle
        # 143.2M, attention 97.4M, SAU 93.4M) fit exactly when the four decoder upsamplers (16nf after
        # G_middle_1, then 8nf, 4nf, 2nf) are replaced and the low-resolution ones (after head_0, and after
        # G_middle_0 in 'more') stay nearest, so that is the default; upsample_low_res replaces those too.
        low = [16 * nf] + [16 * nf] * self.more
        low_name = cfg.upsample if cfg.upsample_low_res else "nearest"
        up = lambda name, c: make_upsampler(name, c, scale=2, window=cfg.sau_window)
        self.ups = nn.ModuleList([up(low_name, c) for c in low] +
                                 [up(cfg.upsample, c) for c in (16 * nf, 8 * nf, 4 * nf, 2 * nf)])
        self.conv_img = nn.Conv2d(nf, 3, 3, padding=1)

    def head(self, seg, z=None):
        if self.fc is None:
            raise RuntimeError("this GauGANGenerator was built with head=False; feed trunk() your own features")
        if self.use_vae:
            if z is None:  # sample the prior: multi-modal synthesis without a style image
                z = torch.randn(seg.shape[0], self.z_dim, device=seg.device, dtype=seg.dtype)
            return self.fc(z).view(-1, self.fc.out_features // (self.sh * self.sw), self.sh, self.sw)
        seg = F.interpolate(seg, size=(self.sh, self.sw), mode="nearest")
        return self.fc(seg)  # (B, L, sh, sw) -> (B, 16nf, sh, sw)

    def trunk(self, x, seg):
        ups = iter(self.ups)
        x = next(ups)(self.head_0(x, seg))      # (B, 16nf, sh, sw) -> (B, 16nf, 2sh, 2sw)
        x = self.G_middle_0(x, seg)
        if self.more:
            x = next(ups)(x)
        x = next(ups)(self.G_middle_1(x, seg))
        x = next(ups)(self.up_0(x, seg))        # -> 8nf
        x = next(ups)(self.up_1(x, seg))        # -> 4nf
        x = next(ups)(self.up_2(x, seg))        # -> 2nf
        return self.up_3(x, seg)                # (B, nf, H, W)

    def to_rgb(self, feat):
        return torch.tanh(self.conv_img(F.leaky_relu(feat, 0.2)))  # (B, nf, H, W) -> (B, 3, H, W)

    def forward(self, seg, z=None):
        return self.to_rgb(self.trunk(self.head(seg, z), seg))


class StyleEncoder(nn.Module):
    """GauGAN's ConvEncoder: 6 stride-2 3x3 convs (spectral + instance norm) -> mu, logvar."""

    def __init__(self, ngf=64, z_dim=256):
        super().__init__()
        widths = [3, ngf, 2 * ngf, 4 * ngf, 8 * ngf, 8 * ngf, 8 * ngf]
        self.convs = nn.ModuleList(
            nn.Sequential(spectral_norm(nn.Conv2d(a, b, 3, stride=2, padding=1, bias=False)),
                          nn.InstanceNorm2d(b, affine=False))
            for a, b in zip(widths[:-1], widths[1:]))
        self.fc_mu = nn.Linear(8 * ngf * 4 * 4, z_dim)
        self.fc_var = nn.Linear(8 * ngf * 4 * 4, z_dim)

    def forward(self, image):
        # the public code resizes every style image to 256x256, so 6 halvings end at 4x4
        if image.shape[2:] != (256, 256):
            image = F.interpolate(image, size=(256, 256), mode="bilinear", align_corners=False)
        x = image
        for i, conv in enumerate(self.convs):
            x = conv(x if i == 0 else F.leaky_relu(x, 0.2))
        x = F.leaky_relu(x, 0.2).flatten(1)       # (B, 8ngf, 4, 4) -> (B, 128ngf)
        return self.fc_mu(x), self.fc_var(x)


def reparameterize(mu, logvar):
    return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)


# ----------------------------------------------------------------------------- discriminator

class PatchDiscriminator(nn.Module):
    """4x4 convs 64 (s2, no norm), 128 (s2), 256 (s2), 512 (s1), then 4x4 -> 1. Returns every feature."""

    def __init__(self, in_channels, ndf=64, n_layers=4):
        super().__init__()
        layers = [nn.Sequential(nn.Conv2d(in_channels, ndf, 4, stride=2, padding=2), nn.LeakyReLU(0.2))]
        nf = ndf
        for n in range(1, n_layers):
            nf_prev, nf = nf, min(nf * 2, 512)
            stride = 1 if n == n_layers - 1 else 2
            layers.append(nn.Sequential(  # no bias: instance norm would cancel it
                spectral_norm(nn.Conv2d(nf_prev, nf, 4, stride=stride, padding=2, bias=False)),
                nn.InstanceNorm2d(nf, affine=False), nn.LeakyReLU(0.2)))
        layers.append(nn.Conv2d(nf, 1, 4, stride=1, padding=2))
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        feats = []
        for layer in self.layers:
            x = layer(x)
            feats.append(x)
        return feats  # n_layers + 1 maps; feats[-1] is the (B, 1, h, w) patch prediction


class MultiscaleDiscriminator(nn.Module):
    def __init__(self, in_channels, ndf=64, n_layers=4, num_D=2):
        super().__init__()
        self.discriminators = nn.ModuleList(PatchDiscriminator(in_channels, ndf, n_layers) for _ in range(num_D))

    def forward(self, x):
        out = []
        for i, D in enumerate(self.discriminators):
            if i > 0:  # (B, C, H, W) -> (B, C, H/2, W/2)
                x = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
            out.append(D(x))
        return out  # num_D lists of n_layers + 1 feature maps


# ----------------------------------------------------------------------------- losses

GAN_LOSSES = ("hinge", "log")


def check_gan_loss(mode):
    """Every model's build calls this, so a misspelt gan_loss fails before training, not at its first loss."""
    if mode not in GAN_LOSSES:
        raise ValueError(f"gaugan.py: gan_loss must be one of {GAN_LOSSES}, got {mode!r}")


def d_loss_term(preds, real, mode="hinge"):
    """One side of the D loss, averaged over the num_D scales (preds: num_D lists of features, logits last).
    hinge (GauGAN's public code, our default): E[relu(1 - D)] on real, E[relu(1 + D)] on fake.
    log (the papers' Eq. 9 of LGGAN, Eqs. 8, 9 of ECGAN as written): -log sigmoid(D) = softplus(-D) on real,
    -log(1 - sigmoid(D)) = softplus(D) on fake."""
    check_gan_loss(mode)
    sign = -1.0 if real else 1.0
    if mode == "hinge":
        term = lambda x: F.relu(1 + sign * x).mean()
    else:
        term = lambda x: F.softplus(sign * x).mean()
    return sum(term(p[-1]) for p in preds) / len(preds)


def g_loss_term(fake_preds, mode="hinge"):
    """G's adversarial term, averaged over scales. hinge: -E[D(fake)] (GauGAN); log: the non-saturating
    -log sigmoid(D(fake)), the usual way to minimise Eq. 9's log(1 - D(fake)) term (Goodfellow et al.)."""
    check_gan_loss(mode)
    if mode == "hinge":
        return sum(-f[-1].mean() for f in fake_preds) / len(fake_preds)
    return sum(F.softplus(-f[-1]).mean() for f in fake_preds) / len(fake_preds)


def hinge_d_loss(real_preds, fake_preds):
    """mean over scales of E[relu(1 - D(real))] + E[relu(1 + D(fake))]."""
    return d_loss_term(real_preds, True) + d_loss_term(fake_preds, False)


def hinge_g_loss(fake_preds):
    return g_loss_term(fake_preds, "hinge")


def feature_matching_loss(fake_preds, real_preds):
    """L1 between D features of fake and (detached) real, all but the prediction, summed per scale, / num_D."""
    loss = 0.0
    for f, r in zip(fake_preds, real_preds):
        for ff, rf in zip(f[:-1], r[:-1]):
            loss = loss + F.l1_loss(ff, rf.detach())
    return loss / len(fake_preds)


def kld_loss(mu, logvar):
    # KL(N(mu, sigma) || N(0, I)) summed over z and averaged over the batch (the public code sums over its
    # per-GPU batch of 1; the batch mean keeps the weight independent of batch size and GPU count)
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / mu.shape[0]


# torchvision's vgg19().features: 'M' = max pool; conv indices 0, 2, 5, ...; relu_k_1 at 1, 6, 11, 20, 29
VGG19_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]
VGG19_SLICES = [2, 7, 12, 21, 30]  # end index (exclusive) of relu1_1, relu2_1, relu3_1, relu4_1, relu5_1
VGG19_URL = "https://download.pytorch.org/models/vgg19-dcabf1b8.pth"
VGG_WEIGHTS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0)  # GauGAN / pix2pixHD perceptual loss weights


VGG_INPUTS = ("imagenet", "raw")


class VGG19Features(nn.Module):
    """torchvision vgg19 `features.N.*` layout up to relu5_1; forward returns [relu1_1, ..., relu5_1].
    input_norm: "imagenet" maps [-1, 1] images to the ImageNet statistics the weights were trained with (ours);
    "raw" feeds the [-1, 1] images unchanged, as the public GauGAN code does (its loss is about 2x smaller)."""

    def __init__(self, input_norm="imagenet"):
        super().__init__()
        if input_norm not in VGG_INPUTS:
            raise ValueError(f"gaugan.VGG19Features: input_norm must be one of {VGG_INPUTS}, got {input_norm!r}")
        self.input_norm = input_norm
        layers, c = [], 3
        for v in VGG19_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=False)]
                c = v
        self.features = nn.Sequential(*layers[:VGG19_SLICES[-1]])
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        if self.input_norm == "imagenet":  # inputs in [-1, 1] -> the statistics the weights were trained with
            x = ((x + 1) / 2 - self.mean) / self.std
        out, start = [], 0
        for end in VGG19_SLICES:
            x = self.features[start:end](x)
            out.append(x)
            start = end
        return out


def load_vgg19(path_or_url, input_norm="imagenet"):
    """A frozen VGG19Features from a torchvision-layout state dict (a file or a URL), or None when not given.
    input_norm: see VGG19Features ("imagenet" ours, "raw" the public GauGAN code)."""
    if not path_or_url:
        return None
    if path_or_url.startswith(("http://", "https://")):
        model_dir = os.path.join(torch.hub.get_dir(), "checkpoints")  # cached after the first download
        state = torch.hub.load_state_dict_from_url(path_or_url, model_dir=model_dir, map_location="cpu",
                                                   weights_only=True)
    else:
        if not os.path.isfile(path_or_url):
            raise FileNotFoundError(f"VGG19 weights file not found: {path_or_url}")
        try:
            state = torch.load(path_or_url, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"could not read VGG19 weights from {path_or_url}: {e}") from e
    if not isinstance(state, dict):
        raise ValueError(f"{path_or_url}: expected a state dict, got {type(state).__name__}")
    vgg = VGG19Features(input_norm)
    want = vgg.state_dict()
    # keep features.* keys we use; classifier.* and features.30+ (beyond relu5_1) are ignored
    got = {k: v for k, v in state.items() if k in want}
    missing = [k for k in want if k not in got]
    if missing:
        raise ValueError(f"{path_or_url}: not a torchvision vgg19 state dict, missing keys {missing[:4]}"
                         f"{' ...' if len(missing) > 4 else ''}")
    bad = [f"{k} {tuple(got[k].shape)} != {tuple(want[k].shape)}" for k in want if got[k].shape != want[k].shape]
    if bad:
        raise ValueError(f"{path_or_url}: shape mismatch with torchvision vgg19: {'; '.join(bad[:4])}")
    vgg.load_state_dict(got)
    vgg.eval().requires_grad_(False)
    return vgg


def vgg_loss(vgg, fake, real):
    """sum_k w_k * L1(phi_k(fake), phi_k(real)) over relu1_1..relu5_1; one VGG forward for both."""
    feats = vgg(torch.cat([fake, real], 0))
    n = fake.shape[0]
    return sum(w * F.l1_loss(f[:n], f[n:].detach()) for w, f in zip(VGG_WEIGHTS, feats))


# ----------------------------------------------------------------------------- shared D-side helpers

def d_input(onehot_or_input, image):
    return torch.cat([onehot_or_input, image], 1)  # (B, L, H, W) + (B, 3, H, W) -> (B, L+3, H, W)


def discriminate(D, cond, fake, real):
    """One D forward on cat([fake, real]) along the batch (spectral norm updates its vectors once, which
    keeps DDP happy); returns (fake_preds, real_preds), each num_D lists of features."""
    x = torch.cat([d_input(cond, fake), d_input(cond, real)], 0)
    preds = D(x)
    n = fake.shape[0]
    return [[f[:n] for f in scale] for scale in preds], [[f[n:] for f in scale] for scale in preds]


def gan_g_losses(D, cond, fake, real, cfg, vgg=None, prefix="G_"):
    """Weighted generator terms of GauGAN: hinge GAN, lambda_feat * feature matching, lambda_vgg * VGG.
    Returns {prefix+'gan', prefix+'feat'[, prefix+'vgg']}: sum the values for the loss."""
    fake_preds, real_preds = discriminate(D, cond, fake, real)
    out = {prefix + "gan": g_loss_term(fake_preds, cfg.gan_loss),
           prefix + "feat": cfg.lambda_feat * feature_matching_loss(fake_preds, real_preds)}
    if vgg is not None:
        out[prefix + "vgg"] = cfg.lambda_vgg * vgg_loss(vgg, fake, real)
    return out


def gan_d_loss(D, cond, fake, real, prefix="D_", mode="hinge"):
    """D loss (hinge or log, d_loss_term) with fake detached; returns (loss, {prefix+'fake', prefix+'real'})."""
    fake_preds, real_preds = discriminate(D, cond, fake.detach(), real)
    l_fake = d_loss_term(fake_preds, False, mode)
    l_real = d_loss_term(real_preds, True, mode)
    return l_fake + l_real, {prefix + "fake": l_fake.detach(), prefix + "real": l_real.detach()}


def init_weights(module, gain=0.02):
    """Public-code init: xavier normal (gain 0.02) on conv/linear weights, zero bias. Spectral-normed layers
    keep PyTorch's default: in the public code the init wrote to the recomputed `weight`, not `weight_orig`,
    so it never reached them."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and not parametrize.is_parametrized(m, "weight"):
            nn.init.xavier_normal_(m.weight, gain=gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


# ----------------------------------------------------------------------------- model interface

Config = GauGANConfig


class GauGAN(nn.Module):
    """Every generator-side module: the generator and, with use_vae, the style encoder."""

    def __init__(self, cfg, input_nc, height, width):
        super().__init__()
        self.generator = GauGANGenerator(cfg, input_nc, height, width)
        self.encoder = StyleEncoder(cfg.ngf, cfg.z_dim) if cfg.use_vae else None

    def forward(self, input, image=None):
        """input (B, L, H, W) label map; image (B, 3, H, W) style image (used only with the encoder).
        Returns (fake (B, 3, H, W), kld or None)."""
        z, kld = None, None
        if self.encoder is not None and image is not None:
            mu, logvar = self.encoder(image)
            z, kld = reparameterize(mu, logvar), kld_loss(mu, logvar)
        return self.generator(input, z), kld


def build(cfg, info):
    check_gan_loss(cfg.gan_loss)
    G = init_weights(GauGAN(cfg, info.input_nc, info.height, info.width))
    D = init_weights(MultiscaleDiscriminator(info.input_nc + 3, cfg.ndf, cfg.n_layers_D, cfg.num_D))
    return G, D


def g_step(G, D, batch, cfg, vgg=None):
    cond, real = batch["input"], batch["image"]
    fake, kld = G(cond, real)
    logs = gan_g_losses(D, cond, fake, real, cfg, vgg)
    if kld is not None:
        logs["G_kld"] = cfg.lambda_kld * kld
    loss = sum(logs.values())
    return loss, {k: v.detach() for k, v in logs.items()}


def d_step(G, D, batch, cfg):
    cond, real = batch["input"], batch["image"]
    with torch.no_grad():
        fake, _ = G(cond, real)
    return gan_d_loss(D, cond, fake, real, mode=cfg.gan_loss)


@torch.no_grad()
def sample(G, batch):
    out = {"fake": G(batch["input"], batch["image"])[0]}
    if getattr(G, "module", G).encoder is not None:  # style from the real image above, from the prior here
        out["fake_prior_z"] = G(batch["input"])[0]
    return out


# ----------------------------------------------------------------------------- parameter table

def count_params(module, trainable=None):
    """Parameters of module: all (trainable=None), those that require grad (True) or the frozen ones (False)."""
    return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)


def dataset_info(name, num_classes, dontcare, has_instance, height, width, task="semantic"):
    """The fields of data.DataInfo that the model files read, without data.py (the parameter tables build models
    from it): label_nc = classes + a dontcare channel, input_nc = label_nc + an instance-boundary channel."""
    label_nc = num_classes + int(dontcare)
    return SimpleNamespace(name=name, num_classes=num_classes, dontcare=dontcare, has_instance=has_instance,
                           height=height, width=width, task=task, label_nc=label_nc,
                           input_nc=label_nc + int(has_instance))


PAPER_DATASETS = {  # name: (num_classes, dontcare, instances, num_upsampling_layers, height, width), public GauGAN
    "cityscapes": (35, False, True, "more", 256, 512),   # 35 label ids + instance boundaries: 36 input channels
    "ade20k": (150, True, False, "normal", 256, 256),    # 150 classes + dontcare: 151
    "coco": (182, True, True, "normal", 256, 256),       # 182 classes + dontcare + instance boundaries: 184
}


def paper_dataset(name):
    """(DataInfo-like, num_upsampling_layers) of one of PAPER_DATASETS."""
    n, dontcare, instances, ups, h, w = PAPER_DATASETS[name]
    return dataset_info(name, n, dontcare, instances, h, w), ups


def count_generator(cfg, input_nc, height, width):
    """Parameters of the real architecture built on the meta device (shapes only, no memory, no init)."""
    try:
        with torch.device("meta"):
            return count_params(GauGANGenerator(cfg, input_nc, height, width))
    except (NotImplementedError, RuntimeError):  # an upsampler whose constructor computes on its weights
        return count_params(GauGANGenerator(cfg, input_nc, height, width))


if __name__ == "__main__":
    for name in PAPER_DATASETS:
        info, ups = paper_dataset(name)
        cfg = GauGANConfig(num_upsampling_layers=ups)
        with torch.device("meta"):
            D = MultiscaleDiscriminator(info.input_nc + 3, cfg.ndf, cfg.n_layers_D, cfg.num_D)
        print(f"| {name} | generator | {count_generator(cfg, info.input_nc, info.height, info.width) / 1e6:.2f} |")
        print(f"| {name} | discriminator | {count_params(D) / 1e6:.2f} |")
    if sau is not None:  # LGGAN++ Table 12: GauGAN on Cityscapes with each upsampler, the paper's count beside ours
        info, ups = paper_dataset("cityscapes")
        for name in sau.UPSAMPLERS:
            cfg = GauGANConfig(num_upsampling_layers=ups, upsample=name)
            n = count_generator(cfg, info.input_nc, info.height, info.width) / 1e6
            print(f"| cityscapes upsample={name} | generator | {n:.2f} | Table 12: {sau.TABLE12_PARAMS[name]:.1f} |")
