"""
eval.py: generate a validation set from a checkpoint, then measure it.

    python eval.py --ckpt RUN/ckpt_latest.pt [--inception PATH_OR_URL] [--segmenter FILE] [--classifier FILE]
        -> RUN/eval/{fake,real}/*.png, grid.png, a printed table and metrics.json (each number with its protocol)
    python eval.py --figures --ckpt RUN/ckpt_latest.pt          -> RUN/figures/*.png (figures.py)
    python eval.py --train_segmenter --dataset NAME --out DIR   -> trains and caches the built-in segmenter only

The metrics of ECGAN ("Edge Guided GANs with Contrastive Learning for Semantic Image Synthesis", ICLR 2023) and
LGGAN / LGGAN++ ("Local and Global GANs with Semantic-Aware Upsampling for Image Generation", 2022, which extends
the CVPR 2020 LGGAN paper), one file per piece a reader looks for:

  evalrun.py          load_run: a checkpoint, its generator and its validation set (shared with figures, tables)
  fid.py              FID: pytorch-fid's InceptionV3 (--inception), pool3 features, Fréchet distance in float64.
                      Without the weights file: "FID (segmenter features)", not comparable with published FIDs.
  metrics.py          mIoU / pixel accuracy of a segmenter on the generated images (Cityscapes on its 19 train
                      ids), the same in a band of --band_px pixels around label boundaries, the IoU of the
                      --small_classes, and class-conditional realism (sliced Wasserstein distance of 7x7 patches
                      inside each class, generated vs real, no pretrained network), for ECGAN the edge F-score
                      of its generated edges against Canny of the real image (1 px tolerance) and the structure
                      of its contrastive embeddings (intra- / inter-class cosine distance); cross-view SSIM, PSNR,
                      sharpness difference and, with a scene classifier (--classifier), top-k accuracy, KL and
                      inception-style scores
  segmenter_train.py  the built-in segmenter (when no --segmenter is given): trained on real training images with
                      ~10% held out, cached, its score on real validation images reported as the ceiling
  figures.py          the papers' explanatory figures (--figures)
This file: the command line and `evaluate`, in four steps: load the run, pick the measuring networks, generate
and accumulate, measure and report. Flags are spelled with underscores; the old dashed spellings
(--train-segmenter, --batch-size, --seg-steps, --no-images) still work.
"""

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import data
from evalrun import EvalError, device_problem, load_run, one_line, pick_device
from fid import FID_WEIGHTS_URL, fid_from_features, load_fid_inception
from figures import make_figures
from metrics import (PSNR_CAP, ClassPatches, class_names_of, class_swd, classifier_metrics, confusions_of,
                     balanced_pixels, default_band_px, default_ignore, edge_fscore, edge_match_counts,
                     embedding_sums, eval_classes, finite, structure_from_sums,
                     generated_edges, load_classifier, protocol_ids, psnr,
                     scored_label, segmentation_scores, sharpness_difference, small_class_ids, small_object_iou,
                     ssim, to_unit)
from segmenter_train import SEG_EPOCHS, SEG_STEPS_MAX, SEG_STEPS_MIN, find_segmenter, train_segmenter_cli


@dataclass
class Measurers:
    """The networks that measure a run's images; None where not given or not available."""
    seg: object = None          # the segmenter of mIoU / accuracy
    seg_desc: str = None
    features: object = None     # images -> features for FID: the Inception, or the built-in segmenter's
    fid_key: str = None         # "FID", or "FID (segmenter features)"
    fid_desc: str = None
    clf: object = None          # the user's scene classifier (cross-view)
    clf_path: str = None


def measurers(run, out, inception, segmenter, classifier, seg_steps, batch_size, notes, progress=True):
    """The given files first (a wrong one fails at once), the built-in segmenter last (it may have to train)."""
    m = Measurers(clf_path=classifier)
    inception_net = load_fid_inception(inception, run.device) if inception else None
    m.clf = load_classifier(classifier, run.device) if classifier else None
    if m.clf is None and run.info.task == "crossview":
        notes.append("top-k accuracy / KL / inception-style score skipped: no scene classifier (--classifier "
                     "TorchScript file)")
    m.seg, m.seg_desc = find_segmenter(segmenter, [out, Path(run.path).parent], run.dataset, run.info,
                                       run.dataroot, seg_steps, batch_size, run.device, notes, progress)
    if m.seg is None:
        notes.append("mIoU / accuracy skipped: no segmenter (--segmenter PATH or --seg_steps > 0)")
    if inception_net is not None:
        m.features = inception_net
        m.fid_key, m.fid_desc = "FID", f"InceptionV3 pool3 (pytorch-fid weights {inception}), 299x299 bilinear"
    elif m.seg is not None and hasattr(m.seg, "features"):
        m.features = m.seg.features
        m.fid_key = "FID (segmenter features)"
        m.fid_desc = ("Fréchet distance of the segmenter's pooled features: NOT comparable with published FIDs "
                      "(pass --inception pt_inception-2015-12-05-6726825d.pth or its URL for real FID)")
        notes.append("Inception weights not given (--inception PATH_OR_URL): FID uses segmenter features")
    else:
        notes.append("FID skipped: no Inception weights (--inception) and no built-in segmenter features")
    return m


def _save_png(image, path):
    from PIL import Image
    arr = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte()
    arr = arr.expand(3, -1, -1) if arr.shape[0] == 1 else arr
    Image.fromarray(arr.permute(1, 2, 0).numpy()).save(path)


def _grow_grid(grid, b, cols, real, info, rows):
    """The sample grid (columns, titles) with this batch's rows added, until it has `rows` rows."""
    if grid is not None and grid[0][0].shape[0] >= rows:
        return grid
    crossview = info.task == "crossview"
    first = [b["image_a"], b["seg"]] if crossview else [data.colorize(b["label"], info.num_classes)]
    named = [(c if c.shape[1] in (1, 3) else c[:, :1]).float() for c in cols.values()]
    new = [c[:rows].cpu() for c in first + [real] + named]
    titles = (["input", "seg"] if crossview else ["label"]) + ["real"] + list(cols)
    if grid is None:
        return new, titles
    return [torch.cat([a, c], 0)[:rows] for a, c in zip(grid[0], new)], titles


def _accumulate(acc, nets, fake, real, label, info, ignore, band_px=0):
    """Add one batch's features, confusion matrices (whole image and boundary band), class patches, pixel scores and
    classifier logits to acc."""
    if nets.features is not None:
        acc["feats"]["fake"].append(nets.features(fake).float().cpu())
        acc["feats"]["real"].append(nets.features(real).float().cpu())
    if nets.seg is not None:
        for key, img in (("fake", fake), ("real", real)):
            c = confusions_of(nets.seg, img, label, info, ignore, band_px)
            acc["conf"][key] = acc["conf"][key] + c["all"]
            if band_px:
                acc["band"][key] = acc["band"][key] + c["band"]
    if info.task != "crossview":  # class masks: the input label map is the generated image's layout
        lab = scored_label(label, info)
        acc["patches"].add(lab, fake=fake, real=real)  # the same centres in both: they differ only by pixels
        for half, sl in (("a", slice(0, None, 2)), ("b", slice(1, None, 2))):  # real vs real: the floor
            if len(lab[sl]):
                acc["floor"][half].add(lab[sl], real=real[sl])
    if info.task == "crossview":
        uf, ur = to_unit(fake), to_unit(real)
        acc["pix"]["SSIM"].append(ssim(uf, ur).cpu())
        acc["pix"]["PSNR"].append(psnr(uf, ur).cpu())
        acc["pix"]["sharpness difference"].append(sharpness_difference(uf, ur).cpu())
    if nets.clf is not None:
        acc["logits"]["fake"].append(nets.clf(fake).float().cpu())
        acc["logits"]["real"].append(nets.clf(real).float().cpu())


@contextlib.contextmanager
def _shared_feature(G):
    """For ECGAN (a generator with a GauGAN trunk E feeding its branches): a list that receives F, the shared
    feature of each forward, via a forward hook on E's last block (ecgan.ECGANGenerator.forward: feat =
    self.encoder.trunk(...), whose last step is up_3); None for other generators. The hook returns nothing, so G's
    outputs are unchanged; it is removed on exit."""
    up_3 = getattr(getattr(G, "encoder", None), "up_3", None)
    if up_3 is None or not hasattr(G, "image_branch"):
        yield None
        return
    feats = []
    hook = up_3.register_forward_hook(lambda module, args, out: feats.append(out))
    try:
        yield feats
    finally:
        hook.remove()


def _contrast_embeddings(G, feat, seg, info, per_class, gen):
    """ECGAN's contrastive embeddings of one batch, as its forward makes Eq. 5's (ecgan.ECGANGenerator.forward):
    pixels of the shared feature F (B, C, H, W), labelled by the input one-hot's argmax, projected by G.projection;
    but at most per_class pixels per class drawn with the seeded gen (balanced_pixels), dontcare left out.
    Returns (embedding_sums of the projected pixels, or None without a projection head (no G_c); embedding_sums
    of the same pixels of F itself, which every ECGAN has: the with / without Eq. 5 comparison)."""
    labels = seg[:, :info.label_nc].argmax(1).flatten()  # (B*H*W,), dontcare = num_classes
    idx = balanced_pixels(labels, per_class, gen, ignore=(info.num_classes,) if info.dontcare else ())
    pixels = feat.permute(0, 2, 3, 1).reshape(-1, feat.shape[1])[idx.to(feat.device)]  # (K, C)
    head = getattr(G, "projection", None)
    proj = None if head is None else embedding_sums(head(pixels).float(), labels.cpu()[idx], info.num_classes)
    return proj, embedding_sums(pixels.float(), labels.cpu()[idx], info.num_classes)


def generate(run, nets, out, n_total, batch_size, ignore, grid_rows=8, save_images=True, progress=True, band_px=0,
             patches_per_class=1024, edge_tol=1, emb_per_class=100):
    """Sample G on the first n_total validation images, write them (<out>/{fake,real}/*.png and a grid of the first
    grid_rows) and accumulate what the metrics need. Returns {"done": images, "feats", "conf", "band", "patches",
    "floor", "pix", "logits"}. Patches: at most patches_per_class per class, seeded (ClassPatches); the floor
    compares the real images of even and odd index. A model whose sample() has an "edge" column (ECGAN's I_e') also
    gets edge F-score counts against the real images' Canny edges within edge_tol pixels ("edge": (2, 4), row 0
    for its edges, row 1 for an edge map marking every pixel, the baseline). ECGAN also gets the embedding_sums of
    at most emb_per_class pixels per class and batch of its shared feature F ("feat_emb") and, with a projection
    head (use_contrast), of the same pixels projected ("emb"); F is read by a forward hook on E's last block
    (_shared_feature): sample()'s own forward, no second pass, the same z."""
    n_cls = eval_classes(run.info)[1]
    patches = lambda names, seed: ClassPatches(n_cls, names, cap=patches_per_class, seed=seed, ignore=ignore)
    acc = {"done": 0, "feats": {"real": [], "fake": []}, "logits": {"real": [], "fake": []},
           "conf": {"real": 0, "fake": 0}, "band": {"real": 0, "fake": 0},
           "patches": patches(("fake", "real"), 0), "floor": {"a": patches(("real",), 1), "b": patches(("real",), 2)},
           "pix": {"SSIM": [], "PSNR": [], "sharpness difference": []}, "edge": None, "edge_tol": edge_tol,
           "emb": None, "emb_per_class": emb_per_class}
    grid = None
    G, gen = getattr(run.G, "module", run.G), torch.Generator().manual_seed(0)
    (out / "fake").mkdir(exist_ok=True), (out / "real").mkdir(exist_ok=True)
    loader = torch.utils.data.DataLoader(run.val, batch_size=batch_size, shuffle=False)
    with torch.no_grad(), _shared_feature(G) as feats:
        bar = tqdm(total=n_total, desc=f"eval {run.model}", unit="img", disable=not progress)
        for batch in loader:
            done = acc["done"]
            if done >= n_total:
                break
            k = min(len(batch["label"]), n_total - done)
            b = run.prepare({key: v[:k] for key, v in batch.items()})
            cols = run.module.sample(run.G, b)
            fake, real = cols["fake"].float().clamp(-1, 1), b["image"].float()
            if save_images:
                for i in range(k):
                    _save_png(fake[i], out / "fake" / f"{done + i:05d}.png")
                    _save_png(real[i], out / "real" / f"{done + i:05d}.png")
            grid = _grow_grid(grid, b, cols, real, run.info, grid_rows)
            _accumulate(acc, nets, fake, real, b["label"], run.info, ignore, band_px)
            if "edge" in cols:  # ECGAN's I_e' against Canny of the real image; and an every-pixel-edge map
                true = data.canny(real)
                c = torch.stack([edge_match_counts(generated_edges(cols["edge"]), true, edge_tol),
                                 edge_match_counts(torch.ones_like(true), true, edge_tol)])
                acc["edge"] = c if acc["edge"] is None else acc["edge"] + c
            if feats is not None:  # the first forward's F (use_vae's sample() runs G twice, the second with prior z)
                for key, e in zip(("emb", "feat_emb"), _contrast_embeddings(G, feats[0], b["input"], run.info,
                                                                             emb_per_class, gen)):
                    if e is not None:
                        acc[key] = e if acc.get(key) is None else tuple(x + y for x, y in zip(acc[key], e))
                feats.clear()
            acc["done"] += k
            bar.update(k)
        bar.close()
    if acc["done"] == 0:
        raise EvalError(f"dataset {run.dataset!r} ({run.split}) gave no images")
    if grid is not None:
        data.save_grid(grid[0], out / "grid.png", titles=grid[1])
    return acc


def _segmentation_metrics(nets, acc, ignore, info, hw, band_px=0, small_ids=()):
    """mIoU and pixel accuracy on generated images, on real ones (the ceiling) and, for the built-in segmenter, on
    the training images held out of its training; the same in the boundary band, and the small classes' IoU; with
    their protocol. Also per-class IoU (name -> [generated, real])."""
    sf, sr = segmentation_scores(acc["conf"]["fake"], ignore), segmentation_scores(acc["conf"]["real"], ignore)
    seg_proto = f"{nets.seg_desc}, labels at {hw}, {protocol_ids(info, ignore)}"
    metrics = {"mIoU": sf["mIoU"], "pixel accuracy": sf["accuracy"],
               "mIoU (real images: segmenter ceiling)": sr["mIoU"],
               "pixel accuracy (real images: segmenter ceiling)": sr["accuracy"]}
    extra = {}
    if band_px:
        bf, br = segmentation_scores(acc["band"]["fake"], ignore), segmentation_scores(acc["band"]["real"], ignore)
        metrics.update({"boundary mIoU": bf["mIoU"], "boundary pixel accuracy": bf["accuracy"],
                        "boundary mIoU (real images: segmenter ceiling)": br["mIoU"],
                        "boundary pixel accuracy (real images: segmenter ceiling)": br["accuracy"]})
        extra.update({k: f"pixels within {band_px} px (a {2 * band_px + 1}x{2 * band_px + 1} window) of a pixel of "
                         f"another scored class" for k in metrics if k.startswith("boundary")})
    if small_ids:
        names = class_names_of(info)
        metrics["small-object IoU"] = small_object_iou(sf["iou"], small_ids)
        metrics["small-object IoU (real images: segmenter ceiling)"] = small_object_iou(sr["iou"], small_ids)
        for k in ("small-object IoU", "small-object IoU (real images: segmenter ceiling)"):
            extra[k] = f"mean IoU of {', '.join(names[i] for i in small_ids)} (those present)"
    held = getattr(nets.seg, "holdout", None)
    if held:  # the segmenter's own accuracy on real training images it did not fit
        metrics["mIoU (segmenter on held-out training images)"] = held["mIoU"]
        metrics["pixel accuracy (segmenter on held-out training images)"] = held["accuracy"]
    protocol = {key: seg_proto + (f"; {held['num_images']} real training images held out of its training"
                                  if "held-out" in key else "") + (f"; {extra[key]}" if key in extra else "")
                for key in metrics}
    per_class = {name: [finite(f), finite(r)] for name, f, r in zip(class_names_of(info), sf["iou"], sr["iou"])}
    return metrics, protocol, per_class


def _realism_metrics(acc, info, hw, num_proj=128, min_patches=64):
    """Class-conditional realism: per class, the sliced Wasserstein distance between 7x7 patches of generated and real
    images centred inside the class, the mean over classes with enough patches in both; and the same between the
    real images of even and odd index (the floor a perfect generator would reach, up to its smaller sample)."""
    cp = acc["patches"]
    per, mean = class_swd(cp.patches("fake"), cp.patches("real"), min_patches, num_proj)
    fa, fb = acc["floor"]["a"].patches("real"), acc["floor"]["b"].patches("real")
    per_floor, mean_floor = class_swd(fa, fb, min_patches, num_proj)
    names = class_names_of(info)
    how = (f"{cp.k}x{cp.k} patches (RGB in [-1, 1]) centred inside each class's mask, at most {cp.cap} per class "
           f"(seeded), sliced Wasserstein-1 over {num_proj} seeded directions, classes with >= {min_patches} patches "
           f"in both sets; at {hw}")
    metrics = {"class patch SWD": mean, "class patch SWD (real vs real: floor)": mean_floor}
    protocol = {"class patch SWD": f"generated vs real images at the same centres, mean over {len(per)} classes; "
                                   + how,
                "class patch SWD (real vs real: floor)": f"real images of even vs odd index, mean over "
                                                         f"{len(per_floor)} classes; " + how}
    per_class = {names[c]: [per.get(c), per_floor.get(c)] for c in sorted(set(per) | set(per_floor))}
    return metrics, protocol, per_class


def measure(run, nets, acc, ignore, notes, band_px=0, small_ids=(), num_proj=128):
    """(metrics, protocol, per_class): every number that applies to the run, each with the words that say how it
    was taken; per class: IoU [generated, real] and patch SWD [generated vs real, floor]."""
    done, info, split = acc["done"], run.info, run.split
    hw = f"{info.height}x{info.width}"
    metrics, protocol, per_class = {}, {}, {}
    if nets.features is not None:
        if done >= 2:
            feats = acc["feats"]
            metrics[nets.fid_key] = fid_from_features(torch.cat(feats["fake"]), torch.cat(feats["real"]))
            protocol[nets.fid_key] = f"{nets.fid_desc}; {done} generated vs {done} real {split} images at {hw}"
        else:
            notes.append(f"{nets.fid_key} skipped: needs at least 2 images")
    if nets.seg is not None:
        m, p, per_class["IoU [generated, real]"] = _segmentation_metrics(nets, acc, ignore, info, hw, band_px,
                                                                         small_ids)
        metrics.update(m)
        protocol.update(p)
    if info.task != "crossview":
        m, p, per_class["patch SWD [generated vs real, real vs real]"] = _realism_metrics(acc, info, hw, num_proj)
        metrics.update(m)
        protocol.update(p)
    if acc.get("edge") is not None:
        tol = acc["edge_tol"]
        how = (f"generated edge map I_e' thresholded at sigmoid > 0.5 (channel mean > 0) vs data.canny of the real "
               f"image, a pixel matched within {tol} px (a {2 * tol + 1}x{2 * tol + 1} window), pixels summed over "
               f"{done} images at {hw}")
        for key, v in zip(("edge precision", "edge recall", "edge F1"), edge_fscore(acc["edge"][0])):
            metrics[key], protocol[key] = v, how
        key = "edge F1 (every pixel an edge: baseline)"  # Canny maps of small images are dense: what a useless
        metrics[key] = edge_fscore(acc["edge"][1])[2]     # edge map scores
        protocol[key] = "an edge map marking every pixel, scored as above"
    for acc_key, name, space in (("emb", "embedding", "through its projection head, L2-normalised (Eq. 4)"),
                                 ("feat_emb", "feature F", "itself (no projection: every ECGAN has it), L2-normalised")):
        if acc.get(acc_key) is None:  # ECGAN Sec. 3.3 (ii): intra-class compactness and inter-class dispersion
            continue
        st, n = structure_from_sums(*acc[acc_key]), acc[acc_key][2]
        how = (f"G's shared feature F at {hw} {space}: at most "
               f"{acc['emb_per_class']} pixels per class and batch (seeded, dontcare left out), {int(n.sum())} "
               f"pixels of {int((n > 0).sum())} classes over {done} images; cosine distance 1 - cos over pairs of "
               f"distinct pixels, mean per class then over classes (inter: over class pairs); ratio intra / inter, "
               f"lower: more compact and dispersed classes")
        for key, k in ((f"{name} intra-class cosine distance", "intra"),
                       (f"{name} inter-class cosine distance", "inter"), (f"{name} intra/inter ratio", "ratio")):
            metrics[key], protocol[key] = st[k], how
    if info.task == "crossview":
        for key, vals in acc["pix"].items():
            metrics[key] = float(torch.cat(vals).mean())
            protocol[key] = f"images in [0, 1] (data range 1), {hw}" + (
                f", per-image values capped at {PSNR_CAP} dB" if key != "SSIM" else ", Gaussian window 11, sigma 1.5")
    if nets.clf is not None:
        for key, v in classifier_metrics(torch.cat(acc["logits"]["fake"]), torch.cat(acc["logits"]["real"])).items():
            metrics[key] = v
            protocol[key] = f"classifier {nets.clf_path}" + (
                "; ground truth = its top-1 class on the real image" if "accuracy" in key else
                "; KL(p_real || p_fake)" if key == "KL" else "")
    return metrics, protocol, per_class


def evaluate(ckpt_path, dataset=None, dataroot=None, out=None, num=None, batch_size=8, device="auto",
             inception=None, segmenter=None, classifier=None, seg_steps=None, ignore=None, grid_rows=8,
             save_images=True, progress=True, band_px=None, small_classes=None, patches_per_class=1024,
             swd_projections=128, edge_tol=1, emb_per_class=100):
    """Generate the validation set from a training checkpoint, compute every metric that applies, print a table and
    write <out>/metrics.json. Returns the results dict. Every input file is checked before anything is written or
    trained. seg_steps None: the built-in segmenter's steps scale to the data (auto_segmenter_steps). band_px None:
    default_band_px of the run's height (0: no boundary metrics); small_classes None: the dataset's default list.
    edge_tol: the edge F-score's tolerance in pixels (models with a generated edge map, ECGAN). emb_per_class:
    pixels per class and batch for the embedding structure (generators with a projection head, ECGAN's G_c)."""
    run = load_run(ckpt_path, pick_device(device), dataset, dataroot)                           # 1. load
    out = Path(out) if out else Path(run.path).parent / "eval"
    notes = []
    band_px = default_band_px(run.info.height) if band_px is None else band_px
    try:
        small_ids = small_class_ids(run.info, small_classes)
    except ValueError as e:
        raise EvalError(f"--small_classes: {e}") from None
    if not small_ids and run.info.task != "crossview":
        notes.append(f"small-object IoU skipped: no small classes known for {run.info.name} (--small_classes)")
    nets = measurers(run, out, inception, segmenter, classifier, seg_steps, batch_size, notes, progress)
    ignore = sorted(set(default_ignore(run.info) if ignore is None else ignore))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    n_total = min(num or len(run.val), len(run.val))
    acc = generate(run, nets, out, n_total, batch_size, ignore, grid_rows, save_images, progress,  # 2. generate
                   band_px, patches_per_class, edge_tol, emb_per_class)
    metrics, protocol, per_class = measure(run, nets, acc, ignore, notes, band_px, small_ids,     # 3. measure
                                           swd_projections)
    info = run.info
    results = {                                                                                 # 4. report
        "checkpoint": run.path, "model": run.model, "step": int(run.ckpt.get("step", 0)), "dataset": run.dataset,
        "split": run.split, "num_images": acc["done"], "resolution": f"{info.height}x{info.width}",
        "seconds": round(time.time() - t0, 1),
        "metrics": {k: None if v is None else finite(float(v)) for k, v in metrics.items()}, "protocol": protocol,
        "per_class": per_class, "notes": notes,
        "images": {"fake": str(out / "fake"), "real": str(out / "real"), "grid": str(out / "grid.png")},
    }
    tmp = out / f"metrics.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, out / "metrics.json")
    print_table(results)
    return results


def print_table(results):
    print(f"\n{results['model']} step {results['step']} on {results['dataset']} ({results['split']}), "
          f"{results['num_images']} images at {results['resolution']}")
    w = max([len(k) for k in results["metrics"]] + [6])
    print(f"| {'metric':<{w}} | {'value':>9} | protocol")
    print(f"|{'-' * (w + 2)}|{'-' * 11}|---------")
    for k, v in results["metrics"].items():
        val = "n/a" if v is None else f"{v:.4f}"
        print(f"| {k:<{w}} | {val:>9} | {results['protocol'].get(k, '')}")
    for n in results["notes"]:
        print(f"note: {n}")
    print(f"wrote {results['images']['grid']} and metrics.json beside it")


# -----------------------------------------------------------------------------------------------------------------
# Command line

def _flag(p, name, **kw):
    """--name_with_underscores, the documented spelling, and its older dashed spelling as a hidden alias."""
    p.add_argument(name, **kw)
    if "_" in name:
        alias = {k: v for k, v in kw.items() if k not in ("help", "default")}
        p.add_argument(name.replace("_", "-"), dest=name[2:], default=argparse.SUPPRESS, help=argparse.SUPPRESS,
                       **alias)


def parse_args(argv=None):
    """(parser, args) of eval.py's command line, values checked."""
    p = data.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    _flag(p, "--ckpt", help="training checkpoint (e.g. runs/lggan/ckpt_latest.pt)")
    _flag(p, "--train_segmenter", action="store_true", help="train and cache the built-in segmenter only")
    _flag(p, "--dataset", default=None, help="default: the checkpoint's dataset (synthetic for --train_segmenter)")
    _flag(p, "--dataroot", default=None)
    _flag(p, "--out", default=None, help="output folder (default: <ckpt folder>/eval)")
    _flag(p, "--num", type=int, default=None, help="evaluate the first N validation images (default: all)")
    _flag(p, "--batch_size", type=int, default=8)
    _flag(p, "--device", default="auto", help="auto | cpu | cuda | cuda:1 ...")
    _flag(p, "--inception", default=None, help=f"pytorch-fid weights: a path or URL (e.g. {FID_WEIGHTS_URL})")
    _flag(p, "--segmenter", default=None,
          help="TorchScript segmenter or built-in segmenter checkpoint; without it the built-in one is\n"
               "trained first (on real training images, ~10%% held out) and cached in --out")
    _flag(p, "--classifier", default=None, help="TorchScript scene classifier (cross-view top-k, KL, IS)")
    _flag(p, "--seg_steps", type=int, default=None,
          help=f"steps of the built-in segmenter when none is cached (default: {SEG_EPOCHS} passes over\n"
               f"its images, {SEG_STEPS_MIN}..{SEG_STEPS_MAX}; 0: no segmenter, no mIoU)")
    _flag(p, "--ignore", type=int, nargs="*", default=None,
          help="class ids left out of mIoU/accuracy (default: dontcare; Cityscapes is scored on its\n"
               "19 train ids, label ids mapped as the official definitions)")
    _flag(p, "--height", type=int, default=0,
          help="--train_segmenter only (else the checkpoint's); 0: the dataset's default")
    _flag(p, "--width", type=int, default=0, help="--train_segmenter only (else the checkpoint's)")
    _flag(p, "--band_px", type=int, default=None,
          help="boundary mIoU / accuracy: pixels within this distance of a label boundary (default: 3 at\n"
               "64 pixels high, scaled with the height; 0: no boundary metrics)")
    _flag(p, "--small_classes", nargs="*", default=None,
          help="class names or ids whose mean IoU is the small-object IoU (default: pole sign person on\n"
               "the synthetic scenes; Cityscapes: pole, traffic light, traffic sign, person, rider)")
    _flag(p, "--patches_per_class", type=int, default=1024,
          help="class patch SWD: at most this many 7x7 patches per class (a seeded sample)")
    _flag(p, "--swd_projections", type=int, default=128, help="class patch SWD: random directions (seeded)")
    _flag(p, "--no_images", action="store_true", help="do not write the per-image PNG files")
    _flag(p, "--figures", action="store_true",
          help="write the papers' explanatory figures for --ckpt (LGGAN Figs. 12, 13; ECGAN Figs. 6, 7;\n"
               "SAU Fig. 5) into --out (default <ckpt folder>/figures); --num rows (default 4)")
    args = p.parse_args(argv)
    _check_args(p, args)
    return p, args


def _check_args(p, args):
    """One clear line (argparse's error) for a value out of range, before anything is read or written."""
    for name in ("num", "batch_size", "patches_per_class", "swd_projections"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name} {v}: expected an integer >= 1")
    if args.band_px is not None and args.band_px < 0:
        p.error(f"--band_px {args.band_px}: expected an integer >= 0 (0: no boundary metrics)")
    if args.seg_steps is not None and args.seg_steps < 0:
        p.error(f"--seg_steps {args.seg_steps}: expected an integer >= 0 (0: no built-in segmenter)")
    for name in ("height", "width"):
        v = getattr(args, name)
        if v < 0:
            p.error(f"--{name} {v}: expected a positive size in pixels (0: the dataset's default)")
    problem = device_problem(args.device)
    if problem:
        p.error(f"--device {problem}")
    if args.ignore is not None and any(i < 0 for i in args.ignore):
        p.error(f"--ignore {args.ignore}: expected class ids >= 0")


def main(argv=None):
    p, args = parse_args(argv)
    try:
        if args.train_segmenter:
            args.dataset = args.dataset or "synthetic"
            return train_segmenter_cli(args)
        if not args.ckpt:
            p.error("--ckpt PATH is required (or --train_segmenter)")
        if args.figures:
            return make_figures(args.ckpt, out=args.out, num=args.num or 4, device=args.device,
                                segmenter=args.segmenter, seg_steps=args.seg_steps, dataset=args.dataset,
                                dataroot=args.dataroot, batch_size=args.batch_size)
        return evaluate(args.ckpt, dataset=args.dataset, dataroot=args.dataroot, out=args.out, num=args.num,
                        batch_size=args.batch_size, device=args.device, inception=args.inception,
                        segmenter=args.segmenter, classifier=args.classifier, seg_steps=args.seg_steps,
                        ignore=args.ignore, save_images=not args.no_images, band_px=args.band_px,
                        small_classes=args.small_classes, patches_per_class=args.patches_per_class,
                        swd_projections=args.swd_projections)
    except (EvalError, ValueError) as e:  # ValueError: data.DatasetError, unknown dataset names
        print(f"eval.py: error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
