"""
figures.py: the papers' explanatory figures, drawn from a checkpoint:
`python eval.py --figures --ckpt RUN/ckpt_latest.pt` writes RUN/figures/*.png, whichever apply to the run's model.

  LGGAN Fig. 12     class-specific feature maps F_c = f' * M_c (Eq. 2) and the per-class images I_c of the local
                    generator (figure_lggan_class_features)
  LGGAN Fig. 13     semantic maps of generated images, i.e. the segmenter on them; ECGAN Fig. 7 the same with
                    I' and I'' (figure_semantic_maps)
  ECGAN Fig. 6      generated edge maps I_e' and attention maps sigmoid(I_e') (Eq. 1) (figure_ecgan_edges)
  SAU Fig. 5        learned SAU kernels (k x k) at chosen locations, beside the label window they weigh
                    (figure_sau_kernels); over every boundary location of many images: sau_kernel_statistic
The run and its validation images come from evalrun.load_run, the segmenter from segmenter_train.find_segmenter
(the same as eval.py's).
"""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import data
import sau
from evalrun import EvalError, load_run, pick_device
from metrics import segment
from segmenter_train import find_segmenter


def _seg_columns(seg, images, num_classes):
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


def _finest_sau_kernels(G, module, b):
    """Sample G on batch b and read the kernels of its SAU with the finest output (ties: the first in module
    order, the global generator's trunk). None without an SAU; else (fake, layer, its name, its input, its output
    size (oh, ow), kernels (B, k*k, oh, ow))."""
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
    layer = max(saus, key=lambda m: (inputs[m][1][0] * inputs[m][1][1], -saus.index(m)))
    name = next(n for n, m in g.named_modules() if m is layer)
    x_in, out_size = inputs[layer]
    with torch.no_grad():
        kern = layer.kernels(x_in).float().cpu()                 # (B, k*k, sH, sW)
    return fake, layer, name, x_in, out_size, kern


def figure_sau_kernels(G, module, b, info, path, rows=2, cell=12):
    """SAU Fig. 5: per sample, the generated image and the label with three locations marked, then per location
    the learned k x k kernel (brightness = weight, normalised to its maximum) beside the label window it weighs.
    The title of each kernel gives its mass on taps of the location's own class against that class's share of
    the window (a kernel that follows semantics puts more mass there than the share)."""
    found = _finest_sau_kernels(G, module, b)
    if found is None:
        return None
    fake, layer, name, x_in, (oh, ow), kern = found
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
            win = _label_window(lab_in[r], y, x, k, s, layer.window)
            _draw_kernel(canvas, draw, kern[r, :, y, x].view(k, k), win, pal, col, x0, y0, ksz, pad)
            x0 += 2 * ksz + 3 * pad
    draw.text((pad, canvas.height - 13), "numbers: kernel mass on taps of the location's class vs their share",
              fill=(0, 0, 0))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def _draw_kernel(canvas, draw, w, win, pal, col, x0, y0, ksz, pad):
    """One location of Fig. 5 at (x0, y0): its kernel w (k, k) beside the label window win (k, k) it weighs,
    titled with the kernel's mass on taps of the centre's class against that class's share of the window."""
    k = w.shape[0]
    own = win[k // 2, k // 2]                                     # the class the centre tap reads
    mass, share = float(w[win == own].sum()), float((win == own).float().mean())
    kimg = (w / w.max().clamp_min(1e-12) * 255).round().byte().numpy()
    kimg = Image.fromarray(np.repeat(kimg[:, :, None], 3, 2)).resize((ksz, ksz), Image.NEAREST)
    wcol = torch.where(win[..., None] >= 0, pal[win.clamp(0)], torch.zeros(3))
    wimg = Image.fromarray(wcol.byte().numpy()).resize((ksz, ksz), Image.NEAREST)
    canvas.paste(kimg, (x0, y0 + 12))
    canvas.paste(wimg, (x0 + ksz + pad, y0 + 12))
    draw.rectangle([x0 - 1, y0 + 11, x0 + ksz, y0 + 12 + ksz], outline=col)
    draw.text((x0, y0), f"{mass:.2f} vs {share:.2f}", fill=col if col != (255, 220, 0) else (160, 130, 0))


def label_windows(lab_in, k, s, window):
    """Class ids (B, k*k, sH, sW) of the taps every output pixel's kernel weighs (the vectorised _label_window, same
    tap order as SAU.kernels); -1 outside the map."""
    r = k // 2
    lab = lab_in[:, None].float()
    if window == "expanded":  # k x k block of the nearest-expanded map around each output pixel
        up = F.interpolate(lab, scale_factor=s, mode="nearest")
        win = F.unfold(F.pad(up + 1, (r, r, r, r)), k)            # padding reads 0, i.e. -1 after the shift
        return (win - 1).long().view(lab.shape[0], k * k, *up.shape[-2:])
    win = F.unfold(F.pad(lab + 1, (r, r, r, r)), k).view(lab.shape[0], k * k, *lab.shape[-2:]) - 1
    return win.repeat_interleave(s, 2).repeat_interleave(s, 3).long()  # output pixel -> its input pixel's block


class KernelStatistic:
    """Fig. 5 over many locations: at every output pixel of an SAU whose window holds more than one class, the
    kernel's mass on taps of the centre's class (the class the pixel belongs to) against (a) that class's share of
    the window (what a uniform kernel puts there) and (b) the mass the layer's average kernel puts there (a kernel
    with the same position prior, e.g. peaked at the centre, that ignores semantics). A kernel that follows the
    label map (SAU's claim) puts more on its own class than (b)."""

    def __init__(self):
        self.sums = {}  # layer name -> dict of running sums

    def add(self, name, kern, win):
        """kern (B, k*k, H, W) softmax kernels; win (B, k*k, H, W) their taps' class ids (label_windows)."""
        kk = kern.shape[1]
        kern, win = kern.float().permute(0, 2, 3, 1).reshape(-1, kk), win.permute(0, 2, 3, 1).reshape(-1, kk)
        own = win[:, kk // 2:kk // 2 + 1]
        valid = win >= 0
        mixed = (own[:, 0] >= 0) & ((win != own) & valid).any(1)  # a boundary location: another class in reach
        ind = ((win == own) & valid)[mixed].float()               # (n, k*k): taps of the own class
        kern, valid = kern[mixed], valid[mixed].float()
        acc = self.sums.setdefault(name, dict(n=0, mass=0.0, share=0.0, ind=0.0, kern=0.0))
        acc["n"] += len(ind)
        acc["mass"] += float((kern * ind).sum())
        acc["share"] += float((ind.sum(1) / valid.sum(1)).sum())
        acc["ind"] = acc["ind"] + ind.sum(0)                      # sum of indicators: the average kernel's mass
        acc["kern"] = acc["kern"] + kern.sum(0)                   # is linear in them, so one pass is enough

    def result(self):
        """{layer: {"locations", "own-class mass", "share of window", "average-kernel mass", "excess"}}, excess =
        own-class mass - average-kernel mass; "all" pools the layers (weighted by locations)."""
        summary = lambda n, mass, share, avg: {"locations": n, "own-class mass": mass / n, "share of window": share / n,
                                               "average-kernel mass": avg / n, "excess": (mass - avg) / n}
        out, pooled = {}, [0, 0.0, 0.0, 0.0]  # sums over layers: locations, mass, share, average-kernel mass
        for name, a in self.sums.items():
            if a["n"] == 0:
                continue
            avg = float((a["kern"] / a["n"] * a["ind"]).sum())    # sum_loc <mean kernel, indicator_loc>
            sums = (a["n"], a["mass"], a["share"], avg)
            out[name] = summary(*sums)
            pooled = [x + y for x, y in zip(pooled, sums)]
        if pooled[0]:
            out["all"] = summary(*pooled)
        return out


def sau_kernel_statistic(G, module, batches, prepare):
    """KernelStatistic of every SAU layer of G over the batches (prepare(batch) -> the model's batch). None when
    G has no SAU."""
    g = getattr(G, "module", G)
    saus = {n: m for n, m in g.named_modules() if isinstance(m, sau.SAU)}
    if not saus:
        return None
    stat, seen = KernelStatistic(), {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, i[0])) for n, m in saus.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                b = prepare(batch)
                module.sample(G, b)
                lab = b["label"]
                for n, x_in in seen.items():
                    layer = saus[n]
                    lab_in = F.interpolate(lab[:, None].float(), size=x_in.shape[-2:], mode="nearest")[:, 0].long()
                    stat.add(n, layer.kernels(x_in).cpu(), label_windows(lab_in.cpu(), layer.k, layer.scale,
                                                                        layer.window))
                seen.clear()
    finally:
        for h in hooks:
            h.remove()
    return stat.result()


def make_figures(ckpt_path, out=None, num=4, device="auto", segmenter=None, seg_steps=300, dataset=None,
                 dataroot=None, batch_size=8, progress=True):
    """Write every figure that applies to the checkpoint's model into out (default <ckpt folder>/figures).
    Returns {figure name: path}; prints a line per figure (and why one is skipped)."""
    run = load_run(ckpt_path, pick_device(device), dataset, dataroot)
    G, module, cfg, info, model_name = run.G, run.module, run.cfg, run.info, run.model
    if info.task != "semantic":
        raise EvalError(f"{run.path}: --figures is for semantic image synthesis checkpoints, got {info.task!r}")
    out = Path(out) if out else Path(run.path).parent / "figures"
    batch = next(iter(torch.utils.data.DataLoader(run.val, batch_size=min(num, len(run.val)), shuffle=False)))
    b = run.prepare(batch)
    notes, written = [], {}
    seg, seg_desc = find_segmenter(segmenter, [out, Path(run.path).parent], run.dataset, info, run.dataroot,
                                   seg_steps, batch_size, run.device, notes, progress)
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
            notes.append(f"{fig} skipped: no segmenter (--segmenter PATH or --seg_steps > 0)")
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
