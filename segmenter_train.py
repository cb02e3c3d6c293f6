"""
segmenter_train.py: the built-in segmenter that measures mIoU / accuracy when the user has no DRN / UperNet /
DeepLab export: trained, cached, held out and scored here; its network and loader are segmenter.py's.

It stands in for the papers' DRN-D-105 (Cityscapes), UperNet-101 (ADE20K) and DeepLab-v2 (COCO-Stuff), so its
numbers are not comparable with theirs. It is trained on REAL training images only (train_segmenter), for a number
of steps scaled to the data (auto_segmenter_steps), with flip / scale-crop / colour-jitter augmentation (augment),
with ~10% of them held out (holdout_split) to report its own accuracy; its mIoU on real validation images is the
ceiling for generated ones. A cached segmenter of another recipe (SEG_RECIPE) is not reused. find_segmenter picks the user's
file, else a cached one, else trains one; `python eval.py --train_segmenter` runs train_segmenter_cli. ECGAN's
label generator G_l is the same network, trained by train.py with train_segmenter.
"""

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import segmenter
from evalrun import EvalError, pick_device, val_set
from metrics import confusion_of, default_ignore, finite, protocol_ids, segmentation_scores
from segmenter import Segmenter

SEG_STEPS_MAX, SEG_STEPS_MIN, SEG_EPOCHS = 3000, 100, 12
# The measuring segmenter's recipe, stored with it: a cached one of another recipe is retrained, never reused.
SEG_RECIPE = f"augment flip+scale-crop+colour, {SEG_EPOCHS} epochs, {SEG_STEPS_MIN}..{SEG_STEPS_MAX} steps, v2"


def _forever(loader, dataset):
    epoch = 0
    while True:
        if hasattr(dataset, "set_epoch"):  # a new crop and flip of every image per pass (data.LOAD_RATIO)
            dataset.set_epoch(epoch)
        yield from loader
        epoch += 1


def auto_segmenter_steps(n_images, batch_size=8):
    """Steps of the built-in segmenter scaled to the data: SEG_EPOCHS passes over the images it fits, at least
    SEG_STEPS_MIN, at most SEG_STEPS_MAX (2700 on the 1800 synthetic scenes it fits; 100 on a 13-image sample, where 1500
    steps would be ~1000 epochs of memorising it)."""
    per_epoch = max(1, n_images // max(1, min(batch_size, n_images)))
    return int(min(SEG_STEPS_MAX, max(SEG_STEPS_MIN, SEG_EPOCHS * per_epoch)))


def holdout_split(n, seed=0):
    """(fit indices, held-out indices) of n training images: ~10% (at least 2 from 10 images, 1 from 4) held out,
    chosen by a fixed permutation, to measure the segmenter on real images it never saw."""
    h = max(2, round(0.1 * n)) if n >= 10 else (1 if n >= 4 else 0)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[h:]), sorted(perm[:h])


@torch.no_grad()
def segmenter_scores(seg, dataset, info, batch_size=8, device="cpu", ignore=None, num=None):
    """mIoU and pixel accuracy of the segmenter on a dataset's real images (eval_classes' ids)."""
    ignore = default_ignore(info) if ignore is None else ignore
    conf, n = 0, min(num or len(dataset), len(dataset))
    for i0 in range(0, n, batch_size):
        items = [dataset[i] for i in range(i0, min(i0 + batch_size, n))]
        image = torch.stack([it["image"] for it in items]).to(device)
        label = torch.stack([it["label"] for it in items]).to(device)
        conf = conf + confusion_of(seg, image, label, info, ignore)
    s = segmentation_scores(conf, ignore)
    return {"mIoU": finite(s["mIoU"]), "accuracy": finite(s["accuracy"]), "num_images": n}


def augment(image, label, gen, min_scale=0.6, jitter=0.2):
    """Training jitter of the measuring segmenter, per image, drawn from `gen`: a horizontal flip (p = 0.5); a crop of
    a random fraction in [min_scale, 1] of each side at a random place, resized back (image bilinear, label nearest);
    brightness + U(-j, j), contrast and saturation x U(1 - j, 1 + j) around the image mean / the pixel's grey.
    image (B, 3, H, W) in [-1, 1], label (B, H, W); returns both, the image clamped to [-1, 1]."""
    B, _, H, W = image.shape
    images, labels = [], []
    for i in range(B):
        u = torch.rand(7, generator=gen).tolist()
        im, lab = image[i:i + 1], label[i:i + 1, None].float()
        if u[0] < 0.5:
            im, lab = im.flip(-1), lab.flip(-1)
        sc = min_scale + (1 - min_scale) * u[1]
        h, w = max(1, round(H * sc)), max(1, round(W * sc))
        y, x = round((H - h) * u[2]), round((W - w) * u[3])
        im = F.interpolate(im[..., y:y + h, x:x + w], size=(H, W), mode="bilinear", align_corners=False)
        lab = F.interpolate(lab[..., y:y + h, x:x + w], size=(H, W), mode="nearest")
        grey = im.mean(1, keepdim=True)
        im = grey + (im - grey) * (1 - jitter + 2 * jitter * u[4])                  # saturation
        im = im.mean() + (im - im.mean()) * (1 - jitter + 2 * jitter * u[5])        # contrast
        im = im + jitter * (2 * u[6] - 1)                                           # brightness
        images.append(im.clamp(-1, 1))
        labels.append(lab[:, 0].long())
    return torch.cat(images), torch.cat(labels)


def train_segmenter(dataset, info, steps=2000, batch_size=8, device="cpu", out_path=None, width=32, lr=2e-3,
                    seed=0, progress=True, say=None, extra=None, augmented=False):
    """Train the built-in Segmenter with cross-entropy on the dataset's real images (never generated ones).
    Dontcare pixels are not trained on. augmented: every batch goes through augment (the measuring segmenter;
    ECGAN's G_l trains without, as its cache key in train.py assumes). Saves {"kind": "segmenter", ...} (plus
    `extra`) atomically to out_path if given. say(line): after two timed steps, the measured time per step and the
    estimated total."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator().manual_seed(seed + 1)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
        torch.manual_seed(seed)
        seg = Segmenter(info.label_nc, width).to(device)
    loader = torch.utils.data.DataLoader(dataset, batch_size=min(batch_size, len(dataset)), shuffle=True,
                                         drop_last=True, generator=gen)
    opt = torch.optim.Adam(seg.parameters(), lr=lr)
    # warm up over 10% of the steps; OneCycleLR's phases end at pct * steps - 1 and steps - 1, and it divides by
    # their lengths: keep the first end at least 0.5 (10 steps gave 0, a division by zero); unchanged from 15 steps
    pct = max(0.1, 1.5 / steps) if steps >= 2 else 0.1
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=pct)
    ignore_index = info.num_classes if info.dontcare else -100
    seg.train()
    it = _forever(loader, dataset)
    bar = tqdm(range(steps), desc="segmenter", disable=not progress, leave=False)
    t1 = None
    for i in bar:
        if i == 1:
            t1 = time.time()  # step 0 is a warm-up
        if i == 3 and say is not None:
            per = (time.time() - t1) / 2
            say(f"segmenter: {per:.2f} s/step measured, about {_duration(per * (steps - 3))} for the remaining "
                f"{steps - 3} steps")
        batch = next(it)
        image, label = batch["image"], batch["label"]
        if augmented:
            image, label = augment(image, label, aug_gen)
        image, label = image.to(device), label.to(device)
        loss = F.cross_entropy(seg(image), label, ignore_index=ignore_index)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    seg.eval().requires_grad_(False)
    if out_path is not None:
        save_segmenter(seg, info, steps, out_path, **(extra or {}))
    return seg


def save_segmenter(seg, info, steps, path, **extra):
    """Write {"kind": "segmenter", ...} (what segmenter.load_segmenter reads, plus `extra`) atomically."""
    from train import atomic_save  # not at top: train.py imports this file inside its functions
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_save({"kind": "segmenter", "label_nc": info.label_nc, "width": seg.width, "steps": steps,
                 "info": asdict(info), "state": seg.state_dict(), **extra}, path)


def _duration(seconds):
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def load_segmenter(path, info=None, device="cpu"):
    """segmenter.load_segmenter (the built-in Segmenter's checkpoint, or a TorchScript / .pt2 export), with its
    errors as EvalError naming the file."""
    try:
        return segmenter.load_segmenter(path, info, device)
    except (FileNotFoundError, ValueError) as e:
        raise EvalError(str(e)) from None


def cache_path(folder, name, info):
    """Where find_segmenter caches the built-in segmenter for a dataset at a resolution."""
    return Path(folder) / f"segmenter_{name}_{info.height}x{info.width}.pt"


class _Subset(torch.utils.data.Subset):
    def set_epoch(self, epoch):
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


def find_segmenter(segmenter, folders, name, info, dataroot, seg_steps, batch_size, device, notes, progress=True):
    """(segmenter, description): the user's file if given, else the built-in one cached in the first of `folders`
    that has it, else a new built-in one trained on real training images and cached in folders[0]: ~10% of them
    are held out (holdout_split) and its scores there are printed, stored with it and noted. seg_steps None:
    auto_segmenter_steps of the images it fits. (None, None) when there is none and seg_steps is 0."""
    if segmenter:
        return load_segmenter(segmenter, info, device), f"user segmenter {segmenter}"
    # Not <run>/segmenter.pt: that is ECGAN's G_l, which the similarity loss (Eq. 3) trained G to agree
    # with; measuring with it would flatter ECGAN. Ours is trained separately (and with another seed).
    for cand in (cache_path(f, name, info) for f in folders):
        if cand.is_file():
            recipe = _recipe_of(cand)
            if recipe != SEG_RECIPE:
                notes.append(f"ignored cached segmenter {cand}: trained with recipe {recipe!r}, not {SEG_RECIPE!r}")
                print(f"note: {notes[-1]}", flush=True)
                continue
            try:
                seg = load_segmenter(cand, info, device)
            except EvalError as e:
                notes.append(f"ignored cached segmenter: {e}")
                continue
            _note_holdout(seg, notes)
            return seg, f"built-in segmenter {cand}"
    if seg_steps is not None and seg_steps <= 0:
        return None, None
    cache = cache_path(folders[0], name, info)
    size = (info.height, info.width)
    jittered = data.make_dataset(name, dataroot=dataroot or None, split="train", size=size)
    plain = data.make_dataset(name, dataroot=dataroot or None, split="train", size=size, crop=False, flip=False)
    fit, held = holdout_split(len(jittered))
    steps = auto_segmenter_steps(len(fit), batch_size) if seg_steps is None else seg_steps
    how = "scaled to the data" if seg_steps is None else "--seg_steps"
    print(f"no --segmenter given: training the built-in segmenter on {len(fit)} real {name} training images "
          f"({len(held)} held out to measure it) for {steps} steps ({how}; flip, scale-crop and colour "
          f"jitter) at {size[0]}x{size[1]}, cached at "
          f"{cache} for the next evaluation. To skip this: --segmenter FILE (your DRN / UperNet / DeepLab "
          f"TorchScript export, or a cached segmenter_*.pt) or --seg_steps 0 (no mIoU / accuracy).", flush=True)
    t0 = time.time()
    with torch.random.fork_rng(devices=[]):  # the scoring below must not move the caller's stream either
        seg = train_segmenter(_Subset(jittered, fit), info, steps=steps, batch_size=batch_size, device=device,
                              progress=progress, seed=1, say=lambda line: print(line, flush=True), augmented=True)
    holdout = None
    if held:
        holdout = segmenter_scores(seg, _Subset(plain, held), info, batch_size, device)
        holdout["fit"] = segmenter_scores(seg, _Subset(plain, fit), info, batch_size, device, num=64)
    save_segmenter(seg, info, steps, cache, holdout=holdout, num_fit=len(fit), recipe=SEG_RECIPE)
    seg.holdout = holdout
    print(f"segmenter trained in {_duration(time.time() - t0)}", flush=True)
    _note_holdout(seg, notes, say=True)
    return seg, f"built-in segmenter {cache} ({steps} steps on {len(fit)} images)"


def _recipe_of(path):
    """The recipe a cached built-in segmenter was trained with (None: an older file without one, or not readable)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None  # load_segmenter names the problem if the file is used
    return ckpt.get("recipe") if isinstance(ckpt, dict) else None


def _note_holdout(seg, notes, say=False):
    h = getattr(seg, "holdout", None)
    if not h:
        return
    f = h.get("fit") or {}
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"
    line = (f"built-in segmenter on {h['num_images']} held-out real training images: mIoU {fmt(h['mIoU'])}, "
            f"pixel accuracy {fmt(h['accuracy'])} (on {f.get('num_images', '?')} images it was fit on: mIoU "
            f"{fmt(f.get('mIoU'))}, accuracy {fmt(f.get('accuracy'))}; a large gap means it memorised a small set "
            f"and its mIoU on generated images says little)")
    notes.append(line)
    if say:
        print(line, flush=True)


def train_segmenter_cli(args):
    """--train_segmenter: train on real training images (some held out), cache it, report its mIoU on real
    validation images."""
    size = data.default_size(args.dataset, args.height, args.width, small=True)
    plain = data.make_dataset(args.dataset, dataroot=args.dataroot or None, split="train", size=size, crop=False,
                              flip=False)  # checks the data before anything is trained or written
    info = plain.info
    out = Path(args.out or os.path.join("runs", "segmenter"))
    device = pick_device(args.device)
    notes = []
    path = cache_path(out, args.dataset, info)
    if path.is_file():
        print(f"using the segmenter cached at {path} (delete it to train a new one)")
    seg, desc = find_segmenter(None, [out], args.dataset, info, args.dataroot, args.seg_steps, args.batch_size,
                               device, notes, progress=True)
    if seg is None:
        raise EvalError("--seg_steps 0: nothing to train")
    val, _, split = val_set(args.dataset, args.dataroot, info)
    ignore = default_ignore(info) if args.ignore is None else args.ignore
    s = segmenter_scores(seg, val, info, args.batch_size, device, ignore, num=args.num)
    result = {"segmenter": str(path), "dataset": args.dataset, "split": split, "num_images": s["num_images"],
              "resolution": f"{info.height}x{info.width}", "evaluated ids": protocol_ids(info, ignore),
              "mIoU (real images: ceiling)": s["mIoU"], "pixel accuracy (real images)": s["accuracy"],
              "held-out training images": getattr(seg, "holdout", None), "notes": notes}
    tmp = path.with_suffix(f".json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, path.with_suffix(".json"))
    print(json.dumps(result, indent=2))
    return result
