"""
Miniature ablation tables: every row trained with the same step budget through train.main, measured with
eval.evaluate, mean and spread over seeds, printed and written as markdown.

    python tables.py lggan9   --budget_steps 2000 --seeds 0 1    # LGGAN Table 9, rows B1-B5 (lggan.TABLE9)
    python tables.py gaugan12 --budget_steps 2000 --seeds 0 1    # LGGAN++ Table 12 subset + LGGAN++
    python tables.py ecgan3   --budget_steps 2000 --seeds 0 1    # ECGAN Table 3 (ecgan.TABLE3)
    python tables.py lggan9 --budget_steps 20 --seeds 0 1 --height 32 --width 64   # a smoke run
Flags tables.py does not know go to every train.py run (e.g. `--ngf 8 --batch_size 8`).

Protocol: each (row, seed) trains from scratch for --budget_steps steps into <out>/<table>/<row>/seed<k>; every row
is measured by ONE built-in segmenter (trained once on real training images, seed 1, cached in <out>) on the first
--num validation images: mIoU and pixel accuracy of its predictions on generated images, and the Fréchet distance of
its pooled features ("FID (segmenter features)": not comparable with published FIDs). ECGAN rows with G_l share one
label generator trained separately (seed 0), so the measuring segmenter is never the one G was trained to agree with.
Wall time is the training time of one seed (mean over seeds) on this machine.
"""
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch

import ecgan
import eval as evaluation
import lggan
import segmenter_train
from evalrun import EvalError, one_line, pick_device

TABLES = {  # table -> (model, [(row name, {config field: value})]); None: the rows of the model file's table
    "lggan9": ("lggan", None),  # rows from lggan.TABLE9
    "gaugan12": (None, [  # model per row: GauGAN with Table 12's upsamplers, then LGGAN++
        ("GauGAN nearest (baseline)", dict(model="gaugan", upsample="nearest")),
        ("GauGAN bilinear", dict(model="gaugan", upsample="bilinear")),
        ("GauGAN deconv", dict(model="gaugan", upsample="deconv")),
        ("GauGAN + SAU", dict(model="gaugan", upsample="sau")),
        ("LGGAN++ (lggan, SAU)", dict(model="lggan", upsample="sau")),
    ]),
    "ecgan3": ("ecgan", None),  # rows from ecgan.TABLE3
}

# The papers' numbers for each row on Cityscapes (mIoU, Acc, FID; None where not reported), printed beside ours
# so that the ordering can be compared. LGGAN Table 9 gives no Acc; LGGAN++ is Table 5's "LGGAN + SAU".
# Table 12's nearest row (62.8 / 58.7) and Table 5's GauGAN row (62.3 / 71.8) disagree in the paper itself.
PAPER = {
    "lggan9": [(62.3, None, 71.8), (64.6, None, 66.1), (65.8, None, 65.6), (67.0, None, 61.3), (68.4, None, 57.7)],
    "gaugan12": [(62.8, 81.5, 58.7), (63.9, 81.9, 52.9), (63.8, 82.2, 54.0), (65.5, 82.5, 48.3), (67.7, 82.9, 48.1)],
    "ecgan3": [(58.6, 81.4, 65.7), (60.2, 81.7, 61.0), (61.5, 82.0, 59.0), (64.5, 82.5, 57.1), (66.8, 82.7, 52.2),
               (72.2, 83.1, 44.5)],
}


def table_rows(name):
    model, rows = TABLES[name]
    if rows is None:
        rows = list({"lggan9": lggan.TABLE9, "ecgan3": ecgan.TABLE3}[name].items())
    return [(row, dict(model=model, **over) if model else dict(over)) for row, over in rows]


def flags(over):
    out = []
    for k, v in over.items():
        out += [f"--{k}", str(v).lower() if isinstance(v, bool) else str(v)]
    return out


def slug(row):
    return re.sub(r"[^A-Za-z0-9+]+", "_", row).strip("_")


def mean_spread(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "n/a"
    m = statistics.fmean(xs)
    return f"{m:.3f} ± {(max(xs) - min(xs)) / 2:.3f}" if len(xs) > 1 else f"{m:.3f}"


def run_table(name, budget_steps, seeds, out, train_args=(), height=64, width=128, dataset="synthetic", num=64,
              seg_steps=300, gl_steps=300, device="auto", dataroot=None):
    import data
    import train
    out = Path(out)
    root = out / name
    size = (height, width)
    device = pick_device(device)
    train_set = data.make_dataset(dataset, dataroot, split="train", size=size)
    info = train_set.info
    data_flags = ["--dataroot", str(dataroot)] if dataroot else []
    for k, (row, over) in enumerate(table_rows(name)):  # every row's command is valid before the first one trains
        over = dict(over)
        model = over.pop("model")
        tcfg, mcfg = train.parse_args(["--model", model, "--dataset", dataset, *data_flags, "--height", str(height),
                                       "--width", str(width), *flags(over), *train_args])
        if k:
            tcfg.vgg = ""  # the VGG file is the same for every row: loaded once
        train.validate_run(tcfg, mcfg, train.MODELS[model], info)
    notes = []
    seg, seg_desc = segmenter_train.find_segmenter(None, [out], dataset, info, dataroot, seg_steps, 8, device, notes)
    seg_path = segmenter_train.cache_path(out, dataset, info)
    gl_path = out / f"label_generator_{dataset}_{height}x{width}.pt"  # ECGAN's G_l, seed 0 (not the measurer)
    results = []
    for row, over in table_rows(name):
        over = dict(over)
        model = over.pop("model")
        extra = []
        if model == "ecgan" and over.get("use_label_gen", True):
            if not gl_path.is_file():
                segmenter_train.train_segmenter(train_set, info, steps=gl_steps, device=device, out_path=gl_path,
                                                seed=0)
            extra = ["--segmenter", str(gl_path)]
        per_seed = []
        for seed in seeds:
            run = root / slug(row) / f"seed{seed}"
            argv = ["--model", model, "--dataset", dataset, *data_flags, "--height", str(height),
                    "--width", str(width),
                    "--steps", str(budget_steps), "--seed", str(seed), "--out", str(run), "--overwrite",
                    "--progress", "false", "--sample_every", str(budget_steps), "--ckpt_every", str(budget_steps),
                    *flags(over), *extra, *train_args]
            print(f"[{name}] {row}, seed {seed}: python train.py {' '.join(argv)}", flush=True)
            t0 = time.time()
            train.main(argv)
            t_train = time.time() - t0
            res = evaluation.evaluate(run / "ckpt_latest.pt", out=run / "eval", num=num, segmenter=str(seg_path),
                                      save_images=False, progress=False, device=device)
            per_seed.append({"seed": seed, "train_s": t_train, "metrics": res["metrics"]})
        results.append({"row": row, "model": model, "flags": " ".join(flags(over)), "runs": per_seed})
    return write_table(name, results, out, budget_steps, seeds, seg_desc, info, num, train_args)


def write_table(name, results, out, budget_steps, seeds, seg_desc, info, num, train_args):
    fid_key = "FID (segmenter features)"
    first = results[0]["runs"][0]["metrics"]
    if "FID" in first:
        fid_key = "FID"
    ceiling = first.get("mIoU (real images: segmenter ceiling)")
    lines = [f"{name}: {budget_steps} steps per run, seeds {list(seeds)}, {info.name} {info.height}x{info.width}, "
             f"{num} validation images, extra train.py flags: {' '.join(train_args) or 'none'}",
             f"measured by the {seg_desc}; its mIoU on real images (ceiling): "
             f"{'n/a' if ceiling is None else f'{ceiling:.3f}'}; values are mean ± (max - min) / 2 over seeds",
             "",
             f"| row | flags | mIoU ↑ | Acc ↑ | {fid_key} ↓ | train s / seed | paper, Cityscapes: mIoU / Acc / FID |",
             "|---|---|---|---|---|---|---|"]
    for r, paper in zip(results, PAPER[name], strict=True):
        get = lambda k: [s["metrics"].get(k) for s in r["runs"]]
        t = statistics.fmean(s["train_s"] for s in r["runs"])
        cmd = f"--model {r['model']} {r['flags']}".strip()
        paper = " / ".join("-" if v is None else str(v) for v in paper)
        lines.append(f"| {r['row']} | `{cmd}` | "
                     f"{mean_spread(get('mIoU'))} | {mean_spread(get('pixel accuracy'))} | "
                     f"{mean_spread(get(fid_key))} | {t:.0f} | {paper} |")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    out = Path(out)
    (out / f"table_{name}.md").write_text(text)
    (out / f"table_{name}.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {out / f'table_{name}.md'} and table_{name}.json")
    return results


def main(argv=None):
    import data
    import train
    p = data.ArgumentParser(description=__doc__.split("\n\n")[0],
                            epilog="Unknown flags are passed to every train.py run.")
    p.add_argument("table", choices=sorted(TABLES))
    p.add_argument("--budget_steps", type=int, required=True, help="training steps of every run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out", default="runs/tables")
    p.add_argument("--height", type=int, default=0, help="0: the dataset's default (synthetic 64x128, COCO 64x64)")
    p.add_argument("--width", type=int, default=0)
    p.add_argument("--dataset", default="synthetic", choices=data.NAMES)
    p.add_argument("--dataroot", default=None, help="root folder of a real dataset")
    p.add_argument("--num", type=int, default=64, help="validation images per evaluation")
    p.add_argument("--seg_steps", type=int, default=300, help="steps of the measuring segmenter (trained once)")
    p.add_argument("--gl_steps", type=int, default=300, help="steps of ECGAN's label generator G_l (trained once)")
    p.add_argument("--device", default="auto")
    args, train_args = p.parse_known_args(argv)
    for name in ("budget_steps", "num", "seg_steps", "gl_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} {getattr(args, name)}: expected an integer >= 1")
    if min(args.seeds) < 0 or len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds {' '.join(map(str, args.seeds))}: expected distinct integers >= 0")
    if args.height < 0 or args.width < 0:
        p.error(f"--height {args.height} --width {args.width}: expected positive sizes (0: the dataset's default)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device is visible")
    height, width = data.default_size(args.dataset, args.height, args.width, small=True)
    try:
        return run_table(args.table, args.budget_steps, args.seeds, args.out, train_args, height, width,
                         args.dataset, args.num, args.seg_steps, args.gl_steps, args.device, args.dataroot)
    except (EvalError, train.ConfigError, train.CheckpointError, ValueError) as e:
        print(f"tables.py: error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
