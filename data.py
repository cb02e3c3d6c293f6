"""Data for semantic image synthesis: synthetic street scenes, GauGAN-layout loaders, Canny edges.

Serves both papers of this repo:
  "Edge Guided GANs with Contrastive Learning for Semantic Image Synthesis" (ECGAN, Tang et al., 2023)
  "Local and Global GANs with Semantic-Aware Upsampling for Image Generation" (LGGAN/LGGAN++, Tang et al., 2022)

Map of the file:
  DataInfo, DatasetError          what a model needs to know about a dataset; the one error bad data raises
  colorize, instance_boundaries   label -> colour map; instance ids -> boundary channel (GauGAN's edge map)
  canny                           batched torch Canny (ECGAN's ground-truth edges), any device
  prepare_batch                   batch -> device, one-hot (+dontcare), instance channel, edges
  save_grid                       one row per sample PNG, atomic write
  SyntheticStreets                the embedded default: procedural street scenes, any size, no download;
                                  also the two-view "synthetic_crossview" mode
  FolderDataset, CrossViewPanels  Cityscapes, ADE20K, COCO-Stuff, Facades, DeepFashion, CelebAMask-HQ,
                                  custom folders; the 6-panel cross-view format (Dayton, CVUSA, SVA)
  load_size, default_size         GauGAN's preprocessing (training: resize to size x 286/256, random crop, flip;
                                  validation: resize; Cityscapes: resize only), each dataset's default size
  CITYSCAPES_TRAIN_IDS            label id -> the 19 train ids the papers' Cityscapes evaluation counts
  make_dataset                    name -> dataset (with .info)
  ArgumentParser                  argparse with one-line errors, for every script
  python data.py                  writes a PNG grid: image | colour label | Canny edges
"""
import argparse
import functools
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

# -----------------------------------------------------------------------------
# what models see


@dataclass
class DataInfo:
    name: str
    num_classes: int        # real classes; label ids are 0..num_classes-1
    dontcare: bool          # id == num_classes marks dontcare pixels and gets its own one-hot channel
    has_instance: bool      # an instance-boundary channel is appended to the label input
    height: int
    width: int
    task: str = "semantic"  # "semantic" | "crossview"
    class_names: list = field(default_factory=list)

    @property
    def label_nc(self):
        return self.num_classes + int(self.dontcare)

    @property
    def input_nc(self):
        return self.label_nc + int(self.has_instance)


class DatasetError(ValueError):
    """Bad data on disk: the message names the file and the value or the expected layout."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse for every script of the repo: a bad flag gets one line, `prog: error: ... (see --help)`, exit 2
    (argparse prints the whole usage block first, which buries the line that matters)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# -----------------------------------------------------------------------------
# label helpers

# Cityscapes-like colours for the 10 synthetic classes, then a fixed bit-interleaved palette for the rest.
SYNTH_CLASSES = ["sky", "building", "road", "sidewalk", "grass", "tree", "car", "pole", "sign", "person"]
_STREET = [(70, 130, 180), (70, 70, 70), (128, 64, 128), (244, 35, 232), (152, 251, 152),
           (107, 142, 35), (0, 0, 142), (153, 153, 153), (220, 220, 0), (220, 20, 60)]


@functools.lru_cache(maxsize=None)
def _palette(n):
    pal = list(_STREET)
    i = 1
    while len(pal) < n:  # spread the bits of i over the three channels, high bits first
        r = g = b = 0
        c, k = i, 7
        while c:
            r |= (c & 1) << k
            g |= ((c >> 1) & 1) << k
            b |= ((c >> 2) & 1) << k
            c, k = c >> 3, k - 1
        pal.append((r, g, b))
        i += 1
    return torch.tensor(pal[:n], dtype=torch.float32)


def colorize(label, num_classes):
    """(B, H, W) long -> (B, 3, H, W) in [-1, 1]; ids >= num_classes (dontcare) are black."""
    pal = torch.cat([_palette(num_classes), torch.zeros(1, 3)]).to(label.device) / 127.5 - 1
    idx = label.clamp(0, num_classes)
    return pal[idx].permute(0, 3, 1, 2).contiguous()  # (B, H, W, 3) -> (B, 3, H, W)


def instance_boundaries(instance):
    """(B, H, W) ids -> (B, 1, H, W) float, 1 where a 4-neighbour has another id (both sides marked)."""
    t = instance
    e = torch.zeros_like(t, dtype=torch.bool)
    dx = t[:, :, 1:] != t[:, :, :-1]
    dy = t[:, 1:, :] != t[:, :-1, :]
    e[:, :, 1:] |= dx
    e[:, :, :-1] |= dx
    e[:, 1:, :] |= dy
    e[:, :-1, :] |= dy
    return e.unsqueeze(1).float()


# -----------------------------------------------------------------------------
# Canny (ECGAN's ground-truth edges). Computed on the fly on the training device inside prepare_batch:
# a few convolutions per batch, cheaper than caching edge files for every dataset and every size.

_GAUSS = torch.tensor([[2, 4, 5, 4, 2], [4, 9, 12, 9, 4], [5, 12, 15, 12, 5],
                       [4, 9, 12, 9, 4], [2, 4, 5, 4, 2]], dtype=torch.float32) / 159  # classic 5x5, sigma 1.4
_SOBEL_X = torch.tensor([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=torch.float32)
_TAN22 = math.tan(math.pi / 8)


def canny(images, low=0.075, high=0.175):
    """(B, 3, H, W) in [-1, 1] -> (B, 1, H, W) float in {0, 1}. Thresholds are fractions of each image's max
    gradient magnitude (the ECGAN authors' settings). Every step is per image, so batched == one by one."""
    x = images.float()
    dev = x.device
    gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3] + 1) / 2  # (B, 1, H, W) in [0, 1]
    # replicate padding: the image border is not an edge
    g = F.conv2d(F.pad(gray, (2, 2, 2, 2), mode="replicate"), _GAUSS.to(dev)[None, None])
    gp = F.pad(g, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(gp, _SOBEL_X.to(dev)[None, None])
    gy = F.conv2d(gp, _SOBEL_X.t().to(dev)[None, None])
    mag = torch.sqrt(gx * gx + gy * gy)
    # non-maximum suppression along the gradient, quantised to 4 directions. Neighbour "before" must be
    # strictly smaller and "after" smaller or equal, so a symmetric ridge two pixels wide keeps one pixel.
    H, W = mag.shape[-2:]
    mp = F.pad(mag, (1, 1, 1, 1))  # zeros outside

    def nb(dy, dx):
        return mp[:, :, 1 + dy:1 + dy + H, 1 + dx:1 + dx + W]

    ax, ay = gx.abs(), gy.abs()
    horiz = ay <= _TAN22 * ax  # gradient ~ along x: compare left/right
    vert = ax <= _TAN22 * ay
    diag = (gx * gy) > 0  # y points down: gradient towards (+1, +1) or (-1, -1)
    before = torch.where(horiz, nb(0, -1), torch.where(vert, nb(-1, 0), torch.where(diag, nb(-1, -1), nb(-1, 1))))
    after = torch.where(horiz, nb(0, 1), torch.where(vert, nb(1, 0), torch.where(diag, nb(1, 1), nb(1, -1))))
    peak = (mag > before) & (mag >= after)
    # hysteresis: grow strong edges through weak ones (8-connected) until nothing changes.
    # The floor on the max keeps float noise on a flat image from becoming edges.
    top = mag.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-3)
    weak = peak & (mag > low * top)
    edge = (peak & (mag > high * top)).float()
    weak = weak.float()
    for _ in range(H * W // 8 + 1):  # bound: each round of 8 steps adds at least one pixel or stops
        prev = edge
        for _ in range(8):
            edge = F.max_pool2d(edge, 3, stride=1, padding=1) * weak
        if torch.equal(edge, prev):
            break
    return edge


# -----------------------------------------------------------------------------
# batches


def prepare_batch(batch, info, device, edges=False):
    """Moves a collated batch to `device` and adds "onehot", "input" and (edges=True) "edge"."""
    out = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
    label = out["label"]
    B, H, W = label.shape
    bad = (label < 0) | (label >= info.label_nc)
    if bad.any():  # loaders check each file; this catches hand-built batches before a device-side assert
        raise DatasetError(f"batch label value {int(label[bad][0])} outside 0..{info.label_nc - 1} ({info.name})")
    onehot = torch.zeros(B, info.label_nc, H, W, device=label.device)
    onehot.scatter_(1, label.unsqueeze(1), 1.0)  # (B, H, W) -> (B, label_nc, H, W)
    out["onehot"] = onehot
    if info.task == "crossview":
        out["input"] = torch.cat([out["image_a"], out["seg"]], 1)  # (B, 6, H, W)
    elif info.has_instance:
        out["input"] = torch.cat([onehot, instance_boundaries(out["instance"])], 1)
    else:
        out["input"] = onehot
    if edges:
        out["edge"] = canny(out["image"])
    return out


def save_grid(columns, path, titles=None, pad=2):
    """columns: list of (B, 3 or 1, H, W) in [-1, 1]; writes one row per sample, columns side by side."""
    cols = []
    H, W = columns[0].shape[-2:]
    for c in columns:
        c = c.detach().float().cpu()
        if c.shape[1] == 1:
            c = c.expand(-1, 3, -1, -1)
        if c.shape[-2:] != (H, W):
            c = F.interpolate(c, size=(H, W), mode="nearest")
        cols.append(((c.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
    B, n = cols[0].shape[0], len(cols)
    top = 14 if titles else 0
    grid = np.full((top + B * (H + pad) + pad, n * (W + pad) + pad, 3), 255, np.uint8)
    for j, c in enumerate(cols):
        for i in range(B):
            y, x = top + pad + i * (H + pad), pad + j * (W + pad)
            grid[y:y + H, x:x + W] = c[i]
    img = Image.fromarray(grid)
    if titles:
        d = ImageDraw.Draw(img)
        for j, t in enumerate(titles):
            d.text((pad + j * (W + pad) + 2, 1), str(t), fill=(0, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        img.save(tmp, format="PNG")
        os.replace(tmp, path)  # atomic: a reader never sees half a PNG
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# -----------------------------------------------------------------------------
# synthetic street scenes: the embedded default dataset
#
# A scene is seen from the side: sky, a row of building facades (or a park), a sidewalk, a two-lane road.
# Everything is drawn in continuous scene coordinates (x right, y down, the default view is x in [0, 2],
# y in [0, 1]) and rasterised at pixel centres, so any output size shows the same scene and two crops of
# one scene agree where they overlap. Each class carries structure the label map does not show (windows,
# doors, lane marks, paving joints, car windows and wheels) and texture from value noise fixed in scene
# coordinates. Thin things (poles, signs, persons) keep at least one pixel at any resolution.

SKY, BUILDING, ROAD, SIDEWALK, GRASS, TREE, CAR, POLE, SIGN, PERSON = range(10)
THINGS = {BUILDING, CAR, POLE, SIGN, PERSON}  # countable: instance id = class * 1000 + k (Cityscapes style)


def _rgb(*c):
    return np.array(c, np.float32) / 255


class _Canvas:
    """Pixel grid over the scene window [x0, x1] x [y0, y1]; label, instance and image layers."""

    def __init__(self, H, W, x0, x1, y0, y1, noise):
        self.H, self.W, self.x0, self.y0 = H, W, x0, y0
        self.px, self.py = (x1 - x0) / W, (y1 - y0) / H
        self.xs = (x0 + (np.arange(W) + 0.5) * self.px).astype(np.float32)
        self.ys = (y0 + (np.arange(H) + 0.5) * self.py).astype(np.float32)
        self.label = np.zeros((H, W), np.uint8)
        self.inst = np.zeros((H, W), np.int32)
        self.img = np.zeros((H, W, 3), np.float32)
        self.n1, self.n2 = (_sample_noise(lat, cpu, self.xs, self.ys) for lat, cpu in noise)  # coarse, fine

    def _span(self, a, b, o, p, n):
        i0 = max(int(math.ceil((a - o) / p - 0.5)), 0)
        i1 = min(int(math.ceil((b - o) / p - 0.5)), n)
        if i1 <= i0 and b > o and a < o + n * p:  # thinner than a pixel: keep the nearest pixel
            i0 = min(max(int((0.5 * (a + b) - o) / p), 0), n - 1)
            i1 = i0 + 1
        return i0, i1

    def box(self, xa, xb, ya, yb):
        """Pixel slice of [xa, xb) x [ya, yb) and its local coordinates X (1, w), Y (h, 1); None if empty."""
        c0, c1 = self._span(xa, xb, self.x0, self.px, self.W)
        r0, r1 = self._span(ya, yb, self.y0, self.py, self.H)
        if c1 <= c0 or r1 <= r0:
            return None
        return (slice(r0, r1), slice(c0, c1)), self.xs[None, c0:c1], self.ys[r0:r1, None]

    def ellipse(self, cx, cy, rx, ry, wobble=0.0):
        b = self.box(cx - rx * (1 + wobble), cx + rx * (1 + wobble), cy - ry * (1 + wobble), cy + ry * (1 + wobble))
        if b is None:
            return None
        sl, X, Y = b
        rx, ry = max(rx, 0.5 * self.px), max(ry, 0.5 * self.py)  # a tiny ellipse still covers its pixel
        d = ((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2
        return sl, X, Y, d < 1 + wobble * self.n2[sl]

    def put(self, sl, mask, cls, inst, colour):
        colour = np.broadcast_to(colour, self.img[sl].shape)
        if mask is None:
            self.label[sl], self.inst[sl], self.img[sl] = cls, inst, colour
        else:
            self.label[sl][mask], self.inst[sl][mask] = cls, inst
            self.img[sl][mask] = colour[mask]

    def blend(self, sl, alpha, colour):
        """Image-only detail: mix `colour` in with weight alpha (h, w); labels stay as they are."""
        a = alpha[..., None]
        self.img[sl] = self.img[sl] * (1 - a) + a * colour


def _sample_noise(lat, cpu, xs, ys):
    """Bilinear value noise: lattice (Ly, Lx) with `cpu` cells per scene unit, sampled at separable coords."""
    fy, fx = np.clip(ys * cpu, 0, lat.shape[0] - 1.001), np.clip((xs + 0.5) * cpu, 0, lat.shape[1] - 1.001)
    iy, ix = fy.astype(np.int64), fx.astype(np.int64)
    ty, tx = (fy - iy)[:, None], fx - ix
    rows = lat[iy] * (1 - ty) + lat[iy + 1] * ty  # (H, Lx)
    return rows[:, ix] * (1 - tx) + rows[:, ix + 1] * tx  # (H, W) in [-1, 1]


def _line_alpha(d, halfwidth, pix):
    """Anti-aliased coverage of a line at distance d (scene units): the same look at every resolution."""
    return np.clip((halfwidth + 0.5 * pix - np.abs(d)) / pix, 0, 1)


def _periodic_dist(u, period, phase=0.0):
    """Distance from u to the nearest of the lines phase + k * period."""
    t = (u - phase) / period
    return np.abs(t - np.round(t)) * period


def _hash(i, j, seed):
    """Per-cell random number in [0, 1) without a loop (which window is lit)."""
    return (np.sin(i * 12.9898 + j * 78.233 + seed) * 43758.5453) % 1.0


FACADES = [_rgb(150, 80, 60), _rgb(190, 170, 140), _rgb(120, 120, 125), _rgb(200, 190, 175),
           _rgb(170, 110, 80), _rgb(110, 100, 90), _rgb(215, 205, 185), _rgb(140, 150, 160)]
CARS = [_rgb(200, 30, 30), _rgb(30, 60, 170), _rgb(230, 230, 230), _rgb(30, 30, 35), _rgb(160, 165, 170),
        _rgb(40, 120, 60), _rgb(230, 180, 30), _rgb(90, 40, 110)]
SKIN = [_rgb(240, 200, 170), _rgb(200, 150, 110), _rgb(140, 95, 60), _rgb(90, 60, 40)]


def _sample_scene(rng, width):
    """All random choices of one scene (scene units, x in [0, width], y in [0, 1])."""
    u = rng.uniform
    s = {"width": width}
    s["y_b"] = u(0.50, 0.60)                 # facade bottom = sidewalk top
    s["y_c"] = s["y_b"] + u(0.08, 0.13)      # curb
    s["y_p"] = s["y_b"] - u(0.04, 0.10)      # far edge of a park lawn
    L = int(math.ceil((width + 1) * 4)) + 2
    s["noise"] = [(rng.uniform(-1, 1, (10, L * 2)).astype(np.float32), 8),      # coarse
                  (rng.uniform(-1, 1, (50, L * 12 + 2)).astype(np.float32), 48)]  # fine
    kind = rng.integers(3)  # clear, overcast, dusk
    s["sky"] = [(_rgb(60, 110, 200), _rgb(170, 205, 235)), (_rgb(140, 145, 155), _rgb(200, 200, 205)),
                (_rgb(70, 80, 150), _rgb(240, 170, 110))][kind]
    s["clouds"] = u(0.0, 0.9)
    s["tint"] = np.clip(1 + rng.normal(0, 0.06, 3), 0.85, 1.15).astype(np.float32)
    # facades and parks along x
    s["buildings"], s["parks"] = [], []
    x = -0.3
    while x < width + 0.3:
        if rng.random() < 0.15:  # a park: lawn + trees instead of buildings
            w = u(0.3, 0.7)
            s["parks"].append((x, x + w))
            x += w
            continue
        w = u(0.25, 0.6)
        nc = max(1, int(round((w - 0.06) / u(0.06, 0.10))))
        s["buildings"].append(dict(
            xa=x, xb=x + w, top=u(0.04, s["y_b"] - 0.18), colour=rng.choice(FACADES) * u(0.8, 1.15),
            ncol=nc, rowh=u(0.06, 0.09), fw=u(0.45, 0.65), fh=u(0.45, 0.65), seed=u(0, 100),
            glass=_rgb(50, 65, 90) * u(0.7, 1.3), door=x + u(0.1, 0.8) * (w - 0.05), doorw=u(0.035, 0.05),
            doorh=u(0.09, 0.12)))
        x += w
    s["joint"] = (u(0.05, 0.09), u(0, 1), u(-1.5, 1.5))  # paving period, phase, slant
    s["pave"] = _rgb(185, 180, 172) * u(0.85, 1.1)
    s["asphalt"] = _rgb(80, 80, 84) * u(0.75, 1.2)
    s["dash"] = (u(0.15, 0.3), u(0, 1), rng.random() < 0.3)  # period, phase, yellow centre line
    s["grass"] = _rgb(70, 140, 50) * u(0.8, 1.15)
    per = width / 2  # objects per default view
    in_park = [p for p in s["parks"] if p[1] - p[0] > 0.2]
    trees = [(u(0, width), u(s["y_b"] + 0.005, s["y_b"] + 0.03)) for _ in range(rng.poisson(1.0 * per))]
    for pa, pb in in_park:
        trees += [(u(pa + 0.05, pb - 0.05), u(s["y_p"] + 0.01, s["y_b"])) for _ in range(rng.integers(1, 4))]
    s["trees"] = sorted([dict(x=x, y=y, h=u(0.08, 0.16), tw=u(0.012, 0.022), rx=u(0.05, 0.11), ry=u(0.06, 0.12),
                              green=_rgb(50, 110, 40) * u(0.7, 1.2)) for x, y in trees], key=lambda t: t["y"])
    s["poles"] = []
    for i in range(1 + rng.poisson(0.8 * per)):
        s["poles"].append(dict(x=u(0.05, width - 0.05), y=u(s["y_b"] + 0.02, s["y_c"] - 0.015),
                               top=u(0.1, 0.32), w=u(0.010, 0.016), lamp=rng.random() < 0.5,
                               side=rng.choice([-1, 1]), sign=(i == 0 or rng.random() < 0.5),
                               sign_kind=rng.integers(3), sign_y=u(0.25, 0.6), sign_r=u(0.02, 0.03)))
    s["persons"] = sorted([dict(x=u(0.05, width - 0.05), y=u(s["y_b"] + 0.015, s["y_c"] - 0.003),
                                h=u(0.10, 0.14), skin=SKIN[rng.integers(4)], shirt=rng.uniform(0.1, 0.9, 3),
                                legs=rng.uniform(0.05, 0.4, 3)) for _ in range(1 + rng.poisson(1.3 * per))],
                          key=lambda p: p["y"])
    road = 1 - s["y_c"]
    s["lane_y"] = s["y_c"] + 0.55 * road
    cars = []
    for lane_y in (s["y_c"] + 0.45 * road, 0.985):  # far lane first: the near lane occludes it
        x = u(-0.4, 0.3)
        while x < width:
            Lc = u(0.30, 0.40)
            if rng.random() < 0.6:
                cars.append(dict(x=x, y=lane_y - u(0, 0.02), L=Lc, colour=rng.choice(CARS) * u(0.85, 1.1),
                                 dir=rng.choice([-1, 1])))
            x += Lc + u(0.05, 0.5)
    s["cars"] = cars
    return s


def _draw_trapezoid(X, Y, ya, yb, top, bottom):
    """Mask of the trapezoid with x-range `top` at y = ya and `bottom` at y = yb."""
    t = np.clip((Y - ya) / (yb - ya), 0, 1)
    lo = top[0] + (bottom[0] - top[0]) * t
    hi = top[1] + (bottom[1] - top[1]) * t
    return (X >= lo) & (X < hi) & (Y >= ya) & (Y < yb)


def _draw_sky(c, s):
    """Sky: a vertical gradient and clouds from coarse noise."""
    n1, n2 = c.n1, c.n2
    yb = s["y_b"]
    b = c.box(-1, s["width"] + 1, -1, yb)  # below yb the sidewalk and road cover everything
    if b:
        sl, X, Y = b
        t = np.clip(Y / yb, 0, 1)[..., None]
        sky = s["sky"][0] * (1 - t) + s["sky"][1] * t
        cloud = np.clip((0.7 * n1[sl] + 0.3 * n2[sl] - 0.6 + s["clouds"] * 0.6) * 2.5, 0, 1)[..., None] * s["clouds"]
        c.put(sl, None, SKY, SKY, sky * (1 - cloud) + 0.95 * cloud)


def _draw_parks(c, s):
    """Park lawns between buildings."""
    n1, n2 = c.n1, c.n2
    yb = s["y_b"]
    for pa, pb in s["parks"]:
        b = c.box(pa, pb, s["y_p"], yb)
        if b:
            sl, X, Y = b
            c.put(sl, None, GRASS, GRASS, s["grass"] * (0.85 + 0.15 * n2[sl] + 0.1 * n1[sl])[..., None])


def _draw_buildings(c, s):
    """Buildings: facade, cornice, window grid (some windows lit), door."""
    n1, n2 = c.n1, c.n2
    yb = s["y_b"]
    for k, bd in enumerate(s["buildings"]):
        b = c.box(bd["xa"], bd["xb"], bd["top"], yb)
        if b is None:
            continue
        sl, X, Y = b
        c.put(sl, None, BUILDING, 1000 + k, bd["colour"] * (1 + 0.06 * n1[sl] + 0.05 * n2[sl])[..., None])
        c.blend(sl, _line_alpha(Y - bd["top"] - 0.006, 0.006, c.py) + 0 * X, bd["colour"] * 0.6)
        m = 0.03
        w = (bd["xb"] - bd["xa"] - 2 * m) / bd["ncol"]
        u = (X - bd["xa"] - m) / w
        v = (Y - bd["top"] - m) / bd["rowh"]
        nrow = int((yb - bd["top"] - m - 0.13) / bd["rowh"])
        iu, iv = np.floor(u), np.floor(v)
        win = ((np.abs(u - iu - 0.5) < bd["fw"] / 2) & (np.abs(v - iv - 0.5) < bd["fh"] / 2)
               & (iu >= 0) & (iu < bd["ncol"]) & (iv >= 0) & (iv < nrow))
        lit = _hash(iu, iv, bd["seed"]) < 0.15
        glass = np.where(lit[..., None], _rgb(235, 210, 130), bd["glass"] * (0.8 + 0.5 * (v - iv))[..., None])
        c.img[sl][win] = glass[np.broadcast_to(win, glass.shape[:2])]
        db = c.box(bd["door"], bd["door"] + bd["doorw"], yb - bd["doorh"], yb)
        if db:
            c.img[db[0]] = bd["colour"] * 0.35


def _draw_ground(c, s):
    """Sidewalk with paving joints and a curb stone; road with asphalt grain and lane marks."""
    n1, n2 = c.n1, c.n2
    yb, yc = s["y_b"], s["y_c"]
    b = c.box(-1, s["width"] + 1, yb, yc)
    if b:
        sl, X, Y = b
        c.put(sl, None, SIDEWALK, SIDEWALK, s["pave"] * (1 + 0.04 * n1[sl] + 0.06 * n2[sl])[..., None])
        period, phase, slant = s["joint"]
        a = np.maximum(_line_alpha(_periodic_dist(X + slant * (Y - yb), period, phase), 0.002, c.px),
                       _line_alpha(_periodic_dist(Y - yb, (yc - yb) / 3), 0.002, c.py))
        c.blend(sl, a * (Y < yc - 0.015), s["pave"] * 0.6)
        c.blend(sl, _line_alpha(Y - (yc - 0.0075), 0.0075, c.py) + 0 * X, s["pave"] * 1.15)
    b = c.box(-1, s["width"] + 1, yc, 1.01)
    if b:
        sl, X, Y = b
        c.put(sl, None, ROAD, ROAD, s["asphalt"] * (1 + 0.05 * n1[sl] + 0.08 * n2[sl])[..., None])
        period, phase, yellow = s["dash"]
        dash = _periodic_dist(X, period, phase) > 0.22 * period
        col = _rgb(230, 190, 40) if yellow else _rgb(235, 235, 230)
        c.blend(sl, _line_alpha(Y - s["lane_y"], 0.006, c.py) * dash, col)
        c.blend(sl, _line_alpha(Y - (yc + 0.02), 0.003, c.py) + 0 * X, _rgb(225, 225, 220))


def _draw_trees(c, s):
    """Trees: trunk and a noisy crown."""
    n2 = c.n2
    for tr in s["trees"]:
        b = c.box(tr["x"] - tr["tw"] / 2, tr["x"] + tr["tw"] / 2, tr["y"] - tr["h"], tr["y"])
        if b:
            c.put(b[0], None, TREE, TREE, _rgb(90, 60, 35) * (0.8 + 0.2 * n2[b[0]])[..., None])
        cy = tr["y"] - tr["h"] - tr["ry"] * 0.6
        e = c.ellipse(tr["x"], cy, tr["rx"], tr["ry"], wobble=0.35)
        if e:
            sl, X, Y, m = e
            shade = (0.85 + 0.3 * n2[sl] - 0.25 * np.clip((Y - cy) / tr["ry"], -1, 1))[..., None]
            c.put(sl, m, TREE, TREE, tr["green"] * shade)


def _draw_poles(c, s):
    """Poles, lamps and signs (round, plate, diamond)."""
    for k, p in enumerate(s["poles"]):
        b = c.box(p["x"] - p["w"] / 2, p["x"] + p["w"] / 2, p["top"], p["y"])
        if b:
            sl, X, Y = b
            c.put(sl, None, POLE, 7000 + k, _rgb(120, 122, 128) * (1.2 - 0.6 * np.abs(X - p["x"]) / p["w"])[..., None])
        if p["lamp"]:
            xa, xb = sorted((p["x"], p["x"] + p["side"] * 0.07))
            b = c.box(xa, xb, p["top"], p["top"] + 0.008)
            if b:
                c.put(b[0], None, POLE, 7000 + k, _rgb(110, 112, 118))
            e = c.ellipse(p["x"] + p["side"] * 0.07, p["top"] + 0.012, 0.018, 0.008)
            if e:
                c.put(e[0], e[3], POLE, 7000 + k, _rgb(230, 225, 190))
        if p["sign"]:
            sy = p["top"] + p["sign_y"] * (p["y"] - p["top"]) * 0.5
            r, kind, inst = p["sign_r"], p["sign_kind"], 8000 + k
            if kind == 0:  # round: red ring, white inside
                e = c.ellipse(p["x"], sy, r, r)
                if e:
                    sl, X, Y, m = e
                    dd = np.sqrt((X - p["x"]) ** 2 + (Y - sy) ** 2)
                    c.put(sl, m, SIGN, inst, np.where((dd < 0.65 * r)[..., None], _rgb(240, 240, 240), _rgb(200, 20, 30)))
            elif kind == 1:  # blue plate with a white bar
                b = c.box(p["x"] - r, p["x"] + r, sy - 0.8 * r, sy + 0.8 * r)
                if b:
                    sl, X, Y = b
                    bar = (np.abs(Y - sy) < 0.2 * r) & (np.abs(X - p["x"]) < 0.6 * r)
                    c.put(sl, None, SIGN, inst, np.where(bar[..., None], _rgb(240, 240, 240), _rgb(20, 70, 170)))
            else:  # yellow diamond with a dark border
                b = c.box(p["x"] - r * 1.1, p["x"] + r * 1.1, sy - r * 1.1, sy + r * 1.1)
                if b:
                    sl, X, Y = b
                    dd = np.abs(X - p["x"]) + np.abs(Y - sy)
                    m = dd < max(r * 1.1, 0.7 * max(c.px, c.py))
                    c.put(sl, m, SIGN, inst, np.where((dd < 0.8 * r)[..., None], _rgb(245, 200, 30), _rgb(40, 40, 40)))


def _draw_persons(c, s):
    """Persons: head, shirt, legs; drawn far to near."""
    n2 = c.n2
    for k, p in enumerate(s["persons"]):
        h, x, y = p["h"], p["x"], p["y"]
        inst = 9000 + k
        b = c.box(x - 0.17 * h, x + 0.17 * h, y - h + 0.16 * h, y - 0.45 * h)
        if b:
            c.put(b[0], None, PERSON, inst, p["shirt"] * (0.9 + 0.1 * n2[b[0]])[..., None])
        for side in (-1, 1):
            b = c.box(x + side * 0.075 * h - 0.055 * h, x + side * 0.075 * h + 0.055 * h, y - 0.46 * h, y)
            if b:
                c.put(b[0], None, PERSON, inst, p["legs"])
        e = c.ellipse(x, y - h + 0.085 * h, 0.075 * h, 0.085 * h)
        if e:
            c.put(e[0], e[3], PERSON, inst, p["skin"])


def _draw_cars(c, s):
    """Cars: body, cabin with windows, wheels with rims, lights; far lane first."""
    for k, car in enumerate(s["cars"]):
        L, x, y, d = car["L"], car["x"], car["y"], car["dir"]
        inst, col = 6000 + k, car["colour"]
        r = 0.11 * L
        bot, btop = y - 0.55 * r, y - 0.55 * r - 0.24 * L
        ctop = btop - 0.19 * L

        def fx(a, b):  # car-relative x-range (0 = rear, 1 = front) -> scene x-range
            return (x + a * L, x + b * L) if d > 0 else (x + (1 - b) * L, x + (1 - a) * L)

        b = c.box(x, x + L, ctop, bot)
        if b:
            sl, X, Y = b
            body = (Y >= btop) & ((Y < bot - 0.03 * L) | ((X > x + 0.02 * L) & (X < x + 0.98 * L)))
            cab = _draw_trapezoid(X, Y, ctop, btop + 1e-4, fx(0.22, 0.62), fx(0.06, 0.85))
            shade = (1.15 - 0.45 * np.clip((Y - ctop) / (bot - ctop), 0, 1))[..., None] + 0 * X[..., None]
            c.put(sl, body | cab, CAR, inst, col * shade)
            glass = _draw_trapezoid(X, Y, ctop + 0.025 * L, btop, fx(0.25, 0.59), fx(0.12, 0.78))
            pillar = np.abs(X - (x + 0.45 * L)) < 0.012 * L
            c.img[sl][glass & ~pillar] = _rgb(60, 80, 100) * 0.9
            c.blend(sl, _line_alpha(X - (x + 0.45 * L), 0.004, c.px) * body * (Y < bot - 0.08 * L), col * 0.4)
            front = np.array(fx(0.95, 1.0)), np.array(fx(0.0, 0.04))
            for (la, lb), lc in zip(front, (_rgb(250, 245, 210), _rgb(200, 20, 20))):
                lm = (X >= la) & (X < lb) & (Y > btop + 0.03 * L) & (Y < btop + 0.08 * L)
                c.img[sl][lm & body] = lc
        for wx in (x + 0.16 * L, x + 0.84 * L):  # wheels
            e = c.ellipse(wx, y - r, r, r)
            if e:
                sl, X, Y, m = e
                dd = np.sqrt((X - wx) ** 2 + (Y - (y - r)) ** 2)
                c.put(sl, m, CAR, inst, np.where((dd < 0.55 * r)[..., None], _rgb(170, 170, 175), _rgb(25, 25, 28)))


def _render(s, H, W, x0, x1, y0, y1):
    """Draws scene s in the window (x0, x1, y0, y1) at H x W, back to front: (image, label, instance)."""
    c = _Canvas(H, W, x0, x1, y0, y1, s["noise"])
    for draw in (_draw_sky, _draw_parks, _draw_buildings, _draw_ground, _draw_trees, _draw_poles, _draw_persons,
                 _draw_cars):
        draw(c, s)
    img = np.clip(c.img * s["tint"], 0, 1)
    return img, c.label, c.inst


def _to_tensor_image(img):
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float() * 2 - 1  # (H, W, 3) -> (3, H, W)


class SyntheticStreets(torch.utils.data.Dataset):
    """Procedural street scenes. Sample i of a split is a pure function of (seed, split, i).
    crossview=True: two crops of one wider scene (different offset and scale) as (I_a, S_a) -> (I_g, S_g)."""

    def __init__(self, split="train", size=(64, 128), length=None, seed=0, crossview=False):
        self.H, self.W = size
        self.split_id = {"train": 0, "val": 1, "test": 2}[split]  # distinct random streams per split
        self.length = length if length is not None else (2000 if split == "train" else 200)
        self.seed, self.crossview = seed, crossview
        self.info = DataInfo("synthetic_crossview" if crossview else "synthetic", 10, False, not crossview,
                             self.H, self.W, "crossview" if crossview else "semantic", list(SYNTH_CLASSES))

    def __len__(self):
        return self.length

    def set_epoch(self, epoch):  # samples are pure functions of (seed, split, i): nothing to redraw per epoch
        pass

    def views(self, i):
        """Scene and view windows (x0, x1, y0, y1) of sample i."""
        rng = np.random.default_rng([self.seed, self.split_id, int(i)])
        if not self.crossview:
            return _sample_scene(rng, 2.0), [(0.0, 2.0, 0.0, 1.0)]
        width = 3.2
        s = _sample_scene(rng, width)
        sa, sg = rng.uniform(0.7, 1.0, 2)  # zoom of each view (1 = the whole height)
        xa = rng.uniform(0, width - 2 * sa)
        xg = float(np.clip(xa + rng.uniform(-0.7, 0.7), 0, width - 2 * sg))
        ya, yg = rng.uniform(0, 1 - sa), rng.uniform(0, 1 - sg)
        return s, [(xa, xa + 2 * sa, ya, ya + sa), (xg, xg + 2 * sg, yg, yg + sg)]

    def __getitem__(self, i):
        if not 0 <= i < self.length:
            raise IndexError(i)
        s, views = self.views(i)
        path = f"synthetic/{['train', 'val', 'test'][self.split_id]}/{i:06d}"
        out = [_render(s, self.H, self.W, *v) for v in views]
        if not self.crossview:
            img, lab, inst = out[0]
            return {"image": _to_tensor_image(img), "label": torch.from_numpy(lab.astype(np.int64)),
                    "instance": torch.from_numpy(inst.astype(np.int64)), "path": path}
        (ia, la, _), (ig, lg, _) = out
        la, lg = torch.from_numpy(la.astype(np.int64)), torch.from_numpy(lg.astype(np.int64))
        return {"image_a": _to_tensor_image(ia), "image": _to_tensor_image(ig),
                "seg_a": colorize(la[None], 10)[0], "seg": colorize(lg[None], 10)[0],
                "label_a": la, "label": lg, "path": path}


# -----------------------------------------------------------------------------
# real datasets in GauGAN's folder layouts

IMG_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def _open(path, what):
    """PIL image fully decoded, or a DatasetError naming the file."""
    try:
        im = Image.open(path)
        im.load()
        return im
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise DatasetError(f"{path}: cannot read {what} ({type(e).__name__}: {e})") from None


def _label_array(im, path):
    """Single-channel label image -> int64 array. RGB is accepted only when it is grey (R == G == B)."""
    if im.mode in ("RGB", "RGBA"):
        a = np.asarray(im.convert("RGB"))
        if not ((a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()):
            raise DatasetError(f"{path}: label maps must hold class ids in one channel (mode L, P or I); "
                               f"got a colour {im.mode} image")
        return a[..., 0].astype(np.int64)
    a = np.asarray(im)
    if a.ndim != 2:  # LA, CMYK...: otherwise reported later as a confusing size mismatch
        raise DatasetError(f"{path}: label maps must hold class ids in one channel (mode L, P or I); "
                           f"got a {im.mode} image with {a.shape[2]} channels")
    return a.astype(np.int64)


def _resize_nearest(a, H, W):
    """Nearest resize of an integer array (labels, instance ids) by pixel-centre sampling."""
    h, w = a.shape
    if (h, w) == (H, W):
        return a
    r = ((np.arange(H) + 0.5) * h / H).astype(np.int64)
    c = ((np.arange(W) + 0.5) * w / W).astype(np.int64)
    return a[r[:, None], c[None, :]]


def _image_tensor(im, H, W):
    im = im.convert("RGB")
    if im.size != (W, H):
        im = im.resize((W, H), Image.BICUBIC)
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 127.5 - 1  # (3, H, W)


def _need_dir(d, root, layout):
    if not Path(root).is_dir():
        raise DatasetError(f"{root}: dataset root not found; expected layout: {layout}")
    if not Path(d).is_dir():
        raise DatasetError(f"{d}: folder not found under {root}; expected layout: {layout}")


def _files(d, exts, suffix="", recursive=False):
    """{key: path} for files in d ending in suffix + one of exts; key = relative path without the suffix."""
    d = Path(d)
    out = {}
    for p in sorted(d.rglob("*") if recursive else d.iterdir()):
        name = p.name
        ext = p.suffix.lower()
        if p.is_file() and ext in exts and name[: -len(ext)].endswith(suffix):
            stem = name[: len(name) - len(ext) - len(suffix)]
            out[str(p.parent.relative_to(d) / stem)] = p
    return out


def _pair(images, labels, image_dir, label_dir, what="label"):
    """Match images and labels by name; any file without its partner is an error naming it."""
    if not images:
        raise DatasetError(f"{image_dir}: no images ({', '.join(IMG_EXT)}) found")
    lonely = sorted(set(images) - set(labels))
    if lonely:
        raise DatasetError(f"{images[lonely[0]]}: image without a {what} in {label_dir} "
                           f"({len(lonely)} of {len(images)} images unmatched)")
    lonely = sorted(set(labels) - set(images))
    if lonely:
        raise DatasetError(f"{labels[lonely[0]]}: {what} without an image in {image_dir} "
                           f"({len(lonely)} of {len(labels)} {what}s unmatched; counts {len(images)} vs {len(labels)})")
    return {k: (images[k], labels[k]) for k in sorted(images)}  # key -> (image path, label path)


# Preprocessing, as GauGAN's public code does it (REFERENCE.md "Preprocessing"), scaled to any size (H, W):
#   "resize_and_crop" (COCO-Stuff, ADE20K, Facades; also DeepFashion, CelebAMask-HQ, custom): training resizes to
#       load = size * 286/256 (286 x 286 at 256) and crops size at one random position shared by image, label and
#       instance map; validation resizes to size (GauGAN's load_size 256 = crop_size: no effective crop).
#   "fixed" (Cityscapes): resize to size (512 wide x 256 high in the papers), no crop.
# Then a random horizontal flip in training. The aspect ratio of the files is not preserved (as in GauGAN).
# Every random choice of sample i in epoch e is drawn from default_rng([seed, e, i]): a sample looks the same
# whichever worker loads it and however an epoch is resumed (set_epoch is called at the start of every epoch).
LOAD_RATIO = 286 / 256


def load_size(H, W):
    """Training resize before the random crop: size * 286/256, rounded half up (256 -> 286, 64 -> 72)."""
    return int(math.floor(H * LOAD_RATIO + 0.5)), int(math.floor(W * LOAD_RATIO + 0.5))


class _Jitter:
    """Per-sample random draws keyed by (seed, epoch, index)."""
    seed, epoch = 0, 0

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def _rng(self, i):
        return np.random.default_rng([int(self.seed), int(self.epoch), int(i)])


class FolderDataset(_Jitter, torch.utils.data.Dataset):
    """(image, label[, instance]) file triples. Raw label values v map to classes as:
    v == dontcare_value -> num_classes (the dontcare id); otherwise v - offset, which must lie in 0..num_classes-1.
    crop: GauGAN's training jitter (resize to load_size, random crop); flip: random horizontal flip."""

    def __init__(self, info, items, instances=None, offset=0, dontcare_value=None, flip=False, crop=False, seed=0):
        self.info, self.items, self.instances = info, items, instances
        self.offset, self.dontcare_value, self.flip, self.crop, self.seed = offset, dontcare_value, flip, crop, seed

    def __len__(self):
        return len(self.items)

    def _label(self, path):
        raw = _label_array(_open(path, "label map"), path)
        lab = raw - self.offset
        dc = raw == self.dontcare_value if self.dontcare_value is not None else np.zeros_like(raw, bool)
        bad = ((lab < 0) | (lab >= self.info.num_classes)) & ~dc
        if bad.any():
            v = int(raw[bad][0])
            ok = f"{self.offset}..{self.offset + self.info.num_classes - 1}"
            dcs = f" or the dontcare value {self.dontcare_value}" if self.dontcare_value is not None else ""
            raise DatasetError(f"{path}: label value {v} outside the class range {ok}{dcs} "
                               f"({self.info.name}, {int(bad.sum())} pixels)")
        lab[dc] = self.info.num_classes
        return lab

    def __getitem__(self, i):
        ipath, lpath = self.items[i]
        H, W = self.info.height, self.info.width
        im = _open(ipath, "image")
        lab = self._label(lpath)
        if lab.shape != (im.size[1], im.size[0]):
            raise DatasetError(f"{lpath}: label size {lab.shape[1]}x{lab.shape[0]} does not match image "
                               f"{ipath} size {im.size[0]}x{im.size[1]}")
        inst = None
        if self.instances is not None:
            inst = np.asarray(_open(self.instances[i], "instance map")).astype(np.int64)
            if inst.ndim != 2 or inst.shape != lab.shape:
                raise DatasetError(f"{self.instances[i]}: instance map shape {inst.shape} does not match label "
                                   f"{lpath} shape {lab.shape}")
        rng = self._rng(i)
        lh, lw, y, x = H, W, 0, 0
        if self.crop:  # one crop position for image, label and instance map
            lh, lw = load_size(H, W)
            y, x = int(rng.integers(0, lh - H + 1)), int(rng.integers(0, lw - W + 1))
        win = (slice(y, y + H), slice(x, x + W))
        out = {"image": _image_tensor(im, lh, lw)[:, win[0], win[1]].contiguous(),
               "label": torch.from_numpy(_resize_nearest(lab, lh, lw)[win].copy()),
               "instance": (torch.from_numpy(_resize_nearest(inst, lh, lw)[win].copy()) if inst is not None
                            else torch.zeros(H, W, dtype=torch.int64)),
               "path": str(ipath)}
        if self.flip and rng.random() < 0.5:  # one coin for image, label and instance
            for k in ("image", "label", "instance"):
                out[k] = out[k].flip(-1)
        return out


def _gaugan_pairs(root, split, inst=False):
    """{split}_img/, {split}_label/ (and {split}_inst/) as in GauGAN's COCO-Stuff and Facades folders."""
    root = Path(root)
    layout = f"{root}/{{train,val}}_img/*.jpg, {{train,val}}_label/*.png" + (", {train,val}_inst/*.png" if inst else "")
    idir, ldir = root / f"{split}_img", root / f"{split}_label"
    _need_dir(idir, root, layout)
    _need_dir(ldir, root, layout)
    pairs = _pair(_files(idir, IMG_EXT), _files(ldir, (".png",)), idir, ldir)
    if not inst:
        return list(pairs.values()), None
    ndir = root / f"{split}_inst"
    _need_dir(ndir, root, layout)
    return list(pairs.values()), _with_instances(pairs, _files(ndir, (".png",)), ndir)


def _with_instances(pairs, insts, inst_dir):
    """Instance paths in pair order; insts = {key: path} keyed like the pairs."""
    missing = [k for k in pairs if k not in insts]
    if missing:
        raise DatasetError(f"{pairs[missing[0]][1]}: no instance map for this label in {inst_dir} "
                           f"({len(missing)} of {len(pairs)} missing)")
    return [insts[k] for k in pairs]


def _cityscapes(root, split):
    root = Path(root)
    layout = (f"{root}/gtFine/{{train,val}}/<city>/*_gtFine_labelIds.png (+ *_gtFine_instanceIds.png), "
              f"{root}/leftImg8bit/{{train,val}}/<city>/*_leftImg8bit.png")
    idir, ldir = root / "leftImg8bit" / split, root / "gtFine" / split
    _need_dir(idir, root, layout)
    _need_dir(ldir, root, layout)
    pairs = _pair(_files(idir, (".png",), "_leftImg8bit", True), _files(ldir, (".png",), "_gtFine_labelIds", True),
                  idir, ldir)
    insts = _with_instances(pairs, _files(ldir, (".png",), "_gtFine_instanceIds", True), ldir)
    return list(pairs.values()), insts


def _ade20k(root, split):
    root = Path(root)
    if (root / "ADEChallengeData2016").is_dir():
        root = root / "ADEChallengeData2016"
    sub = {"train": "training", "val": "validation"}.get(split, split)
    layout = f"{root}/images/{{training,validation}}/*.jpg, {root}/annotations/{{training,validation}}/*.png"
    idir, ldir = root / "images" / sub, root / "annotations" / sub
    _need_dir(idir, root, layout)
    _need_dir(ldir, root, layout)
    return list(_pair(_files(idir, IMG_EXT), _files(ldir, (".png",)), idir, ldir).values()), None


def _dir_pairs(label_dir, image_dir, instance_dir=None):
    """DeepFashion / CelebAMask-HQ / custom: label_dir and image_dir with matching file names."""
    layout = "label_dir/<name>.png and image_dir/<name>.jpg|png with matching names"
    for d in (label_dir, image_dir):
        if d is None or not Path(d).is_dir():
            raise DatasetError(f"{d}: folder not found; expected {layout}")
    pairs = _pair(_files(image_dir, IMG_EXT), _files(label_dir, (".png",)), image_dir, label_dir)
    if instance_dir is None:
        return list(pairs.values()), None
    if not Path(instance_dir).is_dir():
        raise DatasetError(f"{instance_dir}: instance folder not found")
    return list(pairs.values()), _with_instances(pairs, _files(instance_dir, (".png",)), instance_dir)


# -----------------------------------------------------------------------------
# cross-view panels (LGGAN's Dayton / CVUSA / SVA files)

PANELS = ("I_a", "I_g", "S_a", "S_g", "L_a", "L_g")


class CrossViewPanels(_Jitter, torch.utils.data.Dataset):
    """Each file holds 6 equal panels side by side {I_a, I_g, S_a, S_g, L_a, L_g}. L_* are grey 10, 20, .., 60
    for 6 grouped classes -> ids 0..5. Label panels are resized with nearest, so their values stay exact."""

    def __init__(self, root, split="train", size=(256, 256), flip=False, seed=0):
        root = Path(root)
        layout = f"{root}/{{train,val}}/*.jpg|png, each 6 panels side by side {{{', '.join(PANELS)}}}"
        d = root / split
        _need_dir(d, root, layout)
        self.files = sorted(_files(d, IMG_EXT).values())
        if not self.files:
            raise DatasetError(f"{d}: no images found; expected layout: {layout}")
        self.flip, self.seed = flip, seed
        self.info = DataInfo("crossview", 6, False, False, size[0], size[1], "crossview",
                             ["class%d" % i for i in range(6)])

    def __len__(self):
        return len(self.files)

    def _grey_label(self, im, path, which):
        g = np.asarray(im.convert("L")).astype(np.int64)
        bad = (g < 5) | (g > 65)  # far from every 10..60 level (tolerates JPEG noise of a few levels)
        if bad.any():
            raise DatasetError(f"{path}: {which} panel value {int(g[bad][0])} is not a class grey level 10..60")
        return np.clip(np.rint(g / 10).astype(np.int64) - 1, 0, 5)

    def __getitem__(self, i):
        path = self.files[i]
        im = _open(path, "cross-view panel image")
        W6, h = im.size
        if W6 % 6:
            raise DatasetError(f"{path}: width {W6} is not 6 equal panels ({', '.join(PANELS)} side by side)")
        w = W6 // 6
        p = [im.crop((k * w, 0, (k + 1) * w, h)) for k in range(6)]
        H, W = self.info.height, self.info.width
        la = torch.from_numpy(_resize_nearest(self._grey_label(p[4], path, "L_a"), H, W))
        lg = torch.from_numpy(_resize_nearest(self._grey_label(p[5], path, "L_g"), H, W))
        out = {"image_a": _image_tensor(p[0], H, W), "image": _image_tensor(p[1], H, W),
               "seg_a": _image_tensor(p[2], H, W), "seg": _image_tensor(p[3], H, W),
               "label_a": la, "label": lg, "path": str(path)}
        if self.flip and self._rng(i).random() < 0.5:
            out = {k: (v.flip(-1) if torch.is_tensor(v) else v) for k, v in out.items()}
        return out


# -----------------------------------------------------------------------------
# name -> dataset

# name: (num_classes, dontcare, has_instance, the papers' size (H, W), preprocessing (see LOAD_RATIO above))
SPECS = {"cityscapes": (35, False, True, (256, 512), "fixed"),
         "ade20k": (150, True, False, (256, 256), "resize_and_crop"),
         "coco": (182, True, True, (256, 256), "resize_and_crop"),
         "facades": (13, False, False, (256, 256), "resize_and_crop"),
         "deepfashion": (20, False, False, (256, 256), "resize_and_crop"),
         "celebamask": (19, False, False, (256, 256), "resize_and_crop")}
NAMES = ("synthetic", "synthetic_crossview", *SPECS, "custom", "crossview")
CPU_HEIGHT = 64  # train.py's cpu preset: the dataset's aspect at this height (synthetic: 64x128, COCO: 64x64)

# Cityscapes evaluation (the papers' DRN-D-105 protocol): label id -> one of the 19 train ids of the official label
# definitions; every other id (void, license plate, ...) is left out (255).
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                        26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
CITYSCAPES_TRAIN_NAMES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                          "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
                          "motorcycle", "bicycle"]


def cityscapes_train_ids(label):
    """Label ids (any shape, int) -> train ids 0..18, 255 for every id the 19-class evaluation leaves out."""
    lut = torch.full((max(256, int(label.max()) + 1),), 255, dtype=torch.int64)
    for k, v in CITYSCAPES_TRAIN_IDS.items():
        lut[k] = v
    return lut.to(label.device)[label.long().clamp_min(0)]


def default_size(name, height=0, width=0, small=True):
    """(H, W) for a dataset: given values win; a missing one follows the dataset's aspect (COCO-Stuff, ADE20K,
    Facades square, Cityscapes and the synthetic scenes 1:2); with neither, small=True gives CPU_HEIGHT high (the
    cpu preset), small=False the papers' size (256x256, Cityscapes 256x512). Synthetic scenes default to 64x128."""
    if name in SPECS:
        paper = SPECS[name][3]
    elif name in ("synthetic", "synthetic_crossview"):
        paper = (64, 128)
    else:  # custom, crossview
        paper = (256, 256)
    aspect = paper[1] / paper[0]
    if height and width:
        return int(height), int(width)
    if height:
        return int(height), int(round(height * aspect))
    if width:
        return int(round(width / aspect)), int(width)
    if small and name not in ("synthetic", "synthetic_crossview"):
        return CPU_HEIGHT, int(round(CPU_HEIGHT * aspect))
    return paper


def make_dataset(name="synthetic", dataroot=None, split="train", size=None, **kw):
    """Dataset with .info. size = (H, W), default the papers' size. Real datasets: crop and flip (default: split ==
    "train") switch on GauGAN's training jitter (random crop where the dataset's preprocessing has one, random flip);
    jitter_seed seeds it. synthetic*: length, seed. deepfashion/celebamask: label_dir, image_dir (default
    <dataroot>/{split}_label, {split}_img). custom: label_dir, image_dir, num_classes, dontcare_value, instance_dir."""
    if name not in NAMES:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(NAMES)}")
    if name in ("synthetic", "synthetic_crossview"):
        for k in ("flip", "crop", "jitter_seed"):
            kw.pop(k, None)  # every sample is a fresh scene already
        return SyntheticStreets(split, tuple(size or (64, 128)), crossview=name == "synthetic_crossview", **kw)
    flip = kw.pop("flip", split == "train")
    crop = kw.pop("crop", split == "train")
    seed = kw.pop("jitter_seed", 0)
    if name == "crossview":
        if dataroot is None:
            raise DatasetError("crossview needs --dataroot")
        return CrossViewPanels(dataroot, split, tuple(size or (256, 256)), flip=flip, seed=seed)
    offset, dontcare_value, mode = 0, None, "resize_and_crop"
    if name == "custom":
        if kw.get("num_classes") is None:
            raise DatasetError("custom dataset needs num_classes")
        n, dontcare_value = int(kw["num_classes"]), kw.get("dontcare_value")
        if n < 1:
            raise DatasetError(f"custom dataset needs num_classes >= 1, got {n}")
        spec = (n, dontcare_value is not None, kw.get("instance_dir") is not None, (256, 256), mode)
        items, insts = _dir_pairs(kw.get("label_dir"), kw.get("image_dir"), kw.get("instance_dir"))
    else:
        spec = SPECS[name]
        mode = spec[4]
        if dataroot is None and name not in ("deepfashion", "celebamask"):
            raise DatasetError(f"{name} needs --dataroot")
        if name == "cityscapes":
            items, insts = _cityscapes(dataroot, split)
        elif name == "ade20k":
            items, insts = _ade20k(dataroot, split)
            offset, dontcare_value = 1, 0  # ADE20K: 0 = unlabelled, classes 1..150 -> ids 0..149
        elif name in ("coco", "facades"):
            items, insts = _gaugan_pairs(dataroot, split, inst=spec[2])
            if name == "coco":
                dontcare_value = 255
        else:  # deepfashion, celebamask
            root = Path(dataroot) if dataroot is not None else None
            ld = kw.get("label_dir") or (root / f"{split}_label" if root else None)
            idir = kw.get("image_dir") or (root / f"{split}_img" if root else None)
            items, insts = _dir_pairs(ld, idir)
    n, dontcare, has_inst, default = spec[:4]
    H, W = tuple(size or default)
    if H < 1 or W < 1:
        raise DatasetError(f"size {H}x{W}: height and width must be positive")
    info = DataInfo(name, n, dontcare, has_inst, H, W)
    return FolderDataset(info, items, insts, offset, dontcare_value, flip, crop and mode == "resize_and_crop", seed)


# -----------------------------------------------------------------------------
# look at it: python data.py [--dataset NAME --dataroot PATH] [--out samples_data.png]

def main(argv=None):
    ap = ArgumentParser(description="write a PNG grid: image | colour label | Canny edges")
    ap.add_argument("--dataset", default="synthetic", choices=NAMES)
    ap.add_argument("--dataroot", default=None)
    ap.add_argument("--split", default="train", choices=("train", "val"))
    ap.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"),
                    help="default 128 256 for the synthetic scenes, else the papers' size")
    ap.add_argument("--n", type=int, default=8, help="samples (rows)")
    ap.add_argument("--label_dir", default=None)
    ap.add_argument("--image_dir", default=None)
    ap.add_argument("--num_classes", type=int, default=None)
    ap.add_argument("--jitter", action="store_true", help="show the training jitter (random crop and flip)")
    ap.add_argument("--out", default="samples_data.png")
    args = ap.parse_args(argv)
    if args.n < 1:
        ap.error(f"--n {args.n}: expected an integer >= 1")
    if args.size and min(args.size) < 1:
        ap.error(f"--size {args.size[0]} {args.size[1]}: expected a positive height and width")
    kw = {k: getattr(args, k) for k in ("label_dir", "image_dir", "num_classes") if getattr(args, k) is not None}
    kw.update(flip=args.jitter, crop=args.jitter)
    size = tuple(args.size) if args.size else ((128, 256) if args.dataset.startswith("synthetic") else None)
    try:
        ds = make_dataset(args.dataset, args.dataroot, args.split, size, **kw)
        if len(ds) == 0:
            raise DatasetError(f"{args.dataset} ({args.split}): no samples")
        info = ds.info
        batch = torch.utils.data.default_collate([ds[i] for i in range(min(args.n, len(ds)))])
    except DatasetError as e:
        print(f"data.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    edge = canny(batch["image"]) * 2 - 1
    if info.task == "crossview":
        cols, titles = [batch["image_a"], batch["seg_a"], batch["image"], batch["seg"], edge], \
            ["I_a", "S_a", "I_g", "S_g", "Canny(I_g)"]
    else:
        cols = [batch["image"], colorize(batch["label"], info.num_classes), edge]
        titles = ["image", "label", "Canny"]
        if info.has_instance:
            cols.append(instance_boundaries(batch["instance"]) * 2 - 1)
            titles.append("instance boundaries")
    save_grid(cols, args.out, titles)
    print(f"{info.name} ({len(ds)} {args.split} samples, {info.num_classes} classes, {info.height}x{info.width}): "
          f"wrote {args.out}")


if __name__ == "__main__":
    main()
