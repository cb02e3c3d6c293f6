"""
Miniature ablation tables: every row trained with the same step budget through train.main, measured with
eval.evaluate, mean and spread over seeds, printed and written as markdown.

    python tables.py lggan9   --budget_steps 2000 --seeds 0 1    # LGGAN Table 9, rows B1-B5 (lggan.TABLE9)
    python tables.py gaugan12 --budget_steps 2000 --seeds 0 1    # LGGAN++ Table 12 subset + LGGAN++
    python tables.py ecgan3   --budget_steps 2000 --seeds 0 1    # ECGAN Table 3 (ecgan.TABLE3)
    python tables.py lggan9 --budget_steps 20 --seeds 0 1 --height 32 --width 64   # a smoke run
    python tables.py sanity --ckpt RUN/ckpt_latest.pt    # do the metrics rank real < trained < untrained < noise?
    python tables.py sau_mech --budget_steps 2000            # mechanism tables (MECHANISMS), one claim each, 3 seeds:
    python tables.py edges_mech --budget_steps 2000          #   sau_mech, edges_mech, contrast_mech, classgen_mech;
    python tables.py contrast_mech --budget_steps 2000       #   each prints its purpose (claim, metric to read)
    python tables.py classgen_mech --budget_steps 2000       #   above its table; no paper column
    python tables.py sau_fig5                                # SAU Fig. 5's kernel statistic of sau_mech's runs
Flags tables.py does not know go to every train.py run (e.g. `--ngf 8 --batch_size 8`).

Resumable and shared: each (configuration, seed) trains into <out>/runs/<model>_<flags>/seed<k> and writes its
result.json there (atomically) when it has been trained and measured; a rerun with the same settings skips it (and says
so), so a table can be built over several sittings and a crash loses only the unfinished run. Rows of different tables
that train the same configuration (flags equal to the defaults are dropped) share that run. Several tables.py
processes may run at once, e.g. one per core with OMP_NUM_THREADS=1: each run is claimed by the process training it,
and the others do other runs first, then wait for it. A table is rendered from its results once all are present.

Protocol: each (row, seed) trains from scratch for --budget_steps steps into <out>/<table>/<row>/seed<k>; every row
is measured by ONE built-in segmenter (trained once on real training images, seed 1, cached in <out>) on the first
--num validation images: mIoU and pixel accuracy of its predictions on generated images, and the Fréchet distance of
its pooled features ("FID (segmenter features)": not comparable with published FIDs), boundary mIoU (a band of
eval.py's --band_px around label boundaries), small-object IoU and the class patch SWD (eval.py's metrics, each
beside its segmenter ceiling / real-vs-real floor in the header). ECGAN rows with G_l share one
label generator trained separately (seed 0), so the measuring segmenter is never the one G was trained to agree with.
Wall time is the training time of one seed (mean over seeds) on this machine. Values are mean ± half the range
over seeds; a row whose range overlaps the best row's range is tied with it (the last column names, per metric,
where a row is best or tied).
"""
import json
import os
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

_FULL, _EDGES = ecgan.TABLE3["E+G_i+G_e+G_t+G_s+G_l+G_c"], ecgan.TABLE3["E+G_i+G_e+G_t"]
EDGE_F1 = ("edge F1", "edge F1 ↑", True, "edgeF1")  # eval.py's edge F-score of G_e's I_e' vs Canny of the real image
# eval.py's intra- over inter-class cosine distance of G_c's projected pixels (ECGAN with use_contrast only)
EMB_RATIO = ("embedding intra/inter ratio", "embedding intra/inter ↓", False, "emb")
# the same of the shared feature F itself (no projection head), which every ECGAN has: with vs without Eq. 5
FEAT_RATIO = ("feature F intra/inter ratio", "F intra/inter ↓", False, "F")
# Mechanism tables: each isolates one claim of the papers at equal budget; no paper numbers (no such experiment
# there). table -> dict(purpose: the claim and the metric to read, printed above the table; model: None when each
# row names its own; rows: [(row name, {config field: value})]; columns: extra metric columns (eval.py keys);
# read: the metric the claim is read on, compared seed by seed (paired_lines); pairs: (row, its reference row),
# default every row against the first)
MECHANISMS = {
    "sau_mech": dict(
        purpose="LGGAN++ (SAU): semantic-aware upsampling keeps class boundaries sharper than nearest / bilinear; "
                "read boundary mIoU (upsampling matters at 64x128 and above, the default size here)",
        model="gaugan", read="boundary mIoU", rows=[
            ("GauGAN nearest", dict(upsample="nearest")),
            ("GauGAN bilinear", dict(upsample="bilinear")),
            ("GauGAN SAU, expanded window", dict(upsample="sau", sau_window="expanded")),
            ("GauGAN SAU, input window", dict(upsample="sau", sau_window="input")),
        ]),
    "edges_mech": dict(
        purpose="ECGAN Eq. 1: does edge guidance help once edges are good (the canny rows feed the real Canny edges "
                "to Eq. 1 and G_s; F_e stays generated), and does I' leaving [-1, 1] hurt (eq1_range half)? Read "
                "mIoU / boundary mIoU against E+G_i, and edge F1 (is G_e learning edges at all?)",
        model="ecgan", columns=[EDGE_F1], read="mIoU", rows=[
            ("E+G_i (reference)", dict(ecgan.TABLE3["E+G_i"])),
            ("E+G_i+G_e+G_t, generated edges, Eq. 1 as written", dict(_EDGES, edge_source="generated",
                                                                       eq1_range="paper")),
            ("E+G_i+G_e+G_t, generated edges, I' halved", dict(_EDGES, edge_source="generated", eq1_range="half")),
            ("E+G_i+G_e+G_t, Canny edges (oracle), Eq. 1 as written", dict(_EDGES, edge_source="canny",
                                                                            eq1_range="paper")),
            ("E+G_i+G_e+G_t, Canny edges (oracle), I' halved", dict(_EDGES, edge_source="canny", eq1_range="half")),
        ]),
    "contrast_mech": dict(
        purpose="ECGAN Sec. 3.3 claim (ii): the pixel-wise contrastive loss (Eq. 5), and its memory bank across "
                "images, give a better-structured embedding space and better class-conditional images; read the "
                "intra- over inter-class cosine distance of the shared feature F (every row) and of its projection "
                "(rows with G_c), mIoU and patch SWD",
        model="ecgan", columns=[FEAT_RATIO, EMB_RATIO], read="feature F intra/inter ratio", rows=[
            ("ECGAN full", dict(_FULL)),
            ("ECGAN full, no memory bank", dict(_FULL, bank_per_class=0)),
            ("ECGAN without contrast (G_c off)", dict(_FULL, use_contrast=False)),
            ("ECGAN full, Eq. 5 off (G_c's class images kept)", dict(_FULL, lambda_l=0.0)),  # the loss alone
        ]),
    "classgen_mech": dict(
        purpose="Class-specific generation (LGGAN Eqs. 2-5, ECGAN Eqs. 6-7) claims better small objects; read "
                "small-object IoU, each model against its own row without it",
        model=None, read="small-object IoU", pairs=[(1, 0), (2, 3)], rows=[
            ("LGGAN B1, global only", dict(model="lggan", **lggan.TABLE9["B1 global only"])),
            ("LGGAN B2, + local (addition)", dict(model="lggan", **lggan.TABLE9["B2 + local, addition (Eq. 4)"])),
            ("ECGAN full (G_c on)", dict(model="ecgan", **_FULL)),
            ("ECGAN without G_c", dict(model="ecgan", **dict(_FULL, use_contrast=False))),
        ]),
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
    if name in MECHANISMS:
        model, rows = MECHANISMS[name]["model"], MECHANISMS[name]["rows"]
    else:
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
    xs = [x for x in xs if x is not None and x == x]  # None: not measured; NaN: undefined (eval.py says why)
    if not xs:
        return "n/a"
    m = statistics.fmean(xs)
    return f"{m:.3f} ± {(max(xs) - min(xs)) / 2:.3f}" if len(xs) > 1 else f"{m:.3f}"


def train_and_measure(argv, run, seg_path, num, device, segmenter_ready=lambda: None):
    """One (row, seed): train.main(argv) into `run` (resuming a checkpoint an earlier sitting left there), then
    eval.evaluate its checkpoint with the table's segmenter (segmenter_ready() first: it makes sure it exists).
    Returns {"train_s" (this sitting's training seconds), "metrics"}."""
    import train
    t0 = time.time()
    train.main(argv)
    t_train = time.time() - t0
    segmenter_ready()
    return {"train_s": t_train, "metrics": measure(run, seg_path, num, device)}


def measure(run, seg_path, num, device):
    """eval.evaluate's metrics of a run's checkpoint with the table's segmenter."""
    return evaluation.evaluate(run / "ckpt_latest.pt", out=run / "eval", num=num, segmenter=str(seg_path),
                               save_images=False, progress=False, device=device)["metrics"]


def _write_json(path, obj):
    """Write JSON atomically: a crash leaves the old file or none, never half of one."""
    tmp = Path(f"{path}.tmp{os.getpid()}")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def _done(path, settings):
    """The saved result of a finished (row, seed) run, or None if it has not finished. A result saved under other
    settings (steps, size, flags) is an error naming the file: the table would mix two protocols."""
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # written atomically, so only a hand-edited file; run it again
    if saved.get("settings") != settings:
        diff = sorted(k for k in set(settings) | set(saved.get("settings", {}))
                      if settings.get(k) != saved.get("settings", {}).get(k))
        raise ValueError(f"{path}: saved with other settings ({', '.join(diff)}); use another --out or delete it")
    return saved


def minimal_over(model, over, base_argv):
    """The row's switches that change what train.py would build: a flag equal to the value it would have anyway
    (a Config default, or the preset's) is dropped. Rows of different tables that train the same configuration then
    share one run (e.g. sau_mech's "SAU, expanded window" is gaugan12's "GauGAN + SAU")."""
    import train
    base = train.parse_args(["--model", model, *base_argv])
    keep = {}
    for k, v in over.items():
        full = train.parse_args(["--model", model, *flags({k: v}), *base_argv])
        if any(getattr(a, k, None) != getattr(b, k, None) for a, b in zip(full, base)):
            keep[k] = v
    return keep


def run_dir(out, model, over):
    """Where a configuration's seeds train, shared by every table that has it: <out>/runs/<model>_<its flags>."""
    name = slug(" ".join(flags(over))) or "defaults"
    return Path(out) / "runs" / f"{model}_{name}"


def _claim(path):
    """Take the claim file of one run (so two tables.py processes never train the same one), or None if a live
    process holds it. A claim left by a dead process (a stopped sitting) is taken over. The file appears with the
    holder's pid already in it (written aside, then hard-linked into place, which fails if the name exists), so a
    reader never sees an empty claim."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mine = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    mine.write_text(str(os.getpid()))
    try:
        for _ in range(2):
            try:
                os.link(mine, path)
                return path
            except FileExistsError:
                try:
                    os.kill(int(path.read_text()), 0)
                    return None  # alive: its holder trains it
                except (ProcessLookupError, ValueError, FileNotFoundError):
                    path.unlink(missing_ok=True)  # stale (its holder died), or released while we looked: retry
                except PermissionError:
                    return None  # alive, another user's
        return None
    finally:
        mine.unlink(missing_ok=True)


def _once(path, make):
    """make(path) unless the file exists, with a claim so that parallel tables.py processes make it once."""
    claim = Path(f"{path}.claim")
    while not path.is_file():
        if _claim(claim):
            try:
                if not path.is_file():
                    make(path)  # may make nothing (e.g. no segmenter with --seg_steps 0): not retried
                return
            finally:
                claim.unlink(missing_ok=True)
        time.sleep(5)


def run_table(name, budget_steps, seeds, out, train_args=(), height=64, width=128, dataset="synthetic", num=64,
              seg_steps=None, gl_steps=300, device="auto", dataroot=None, poll_s=10, wait=True, remeasure=False):
    """Train and measure every (row, seed) of one table that has no result yet, then render the table. Runs live in
    <out>/runs/<model>_<flags>/seed<k> (run_dir), shared across tables; several tables.py processes can work at once
    (each run is claimed), and one that finds a run claimed by a live process does others first, then waits for it
    (wait=False: returns None instead, so that the caller can do other tables first). remeasure: measure the
    finished runs' checkpoints again (metrics added to eval.py since), keeping their training and train_s."""
    import data
    import train
    out = Path(out)
    size = (height, width)
    device = pick_device(device)
    train_set = data.make_dataset(dataset, dataroot, split="train", size=size)
    info = train_set.info
    data_flags = ["--dataroot", str(dataroot)] if dataroot else []
    where = ["--dataset", dataset, *data_flags, "--height", str(height), "--width", str(width)]
    base = [*where, *train_args]
    rows = []
    for k, (row, over) in enumerate(table_rows(name)):  # every row's command is valid before the first one trains
        over = dict(over)
        model = over.pop("model")
        tcfg, mcfg = train.parse_args(["--model", model, *flags(over), *base])
        if k:
            tcfg.vgg = ""  # the VGG file is the same for every row: loaded once
        train.validate_run(tcfg, mcfg, train.MODELS[model], info)
        rows.append((row, model, minimal_over(model, over, base)))
    seg_path = segmenter_train.cache_path(out, dataset, info)
    measurer = lambda: segmenter_train.find_segmenter(None, [out], dataset, info, dataroot, seg_steps, 8, device, [])
    gl_path = out / f"label_generator_{dataset}_{height}x{width}.pt"  # ECGAN's G_l, seed 0 (not the measurer)
    jobs = []
    for row, model, over in rows:
        extra = []
        module = train.MODELS[model]
        row_cfg = module.Config(**{k: v for k, v in over.items() if k in module.Config.__dataclass_fields__})
        if train.model_needs(module, "needs_segmenter", row_cfg):  # e.g. ECGAN's G_l: one for every row
            _once(gl_path, lambda p: segmenter_train.train_segmenter(train_set, info, steps=gl_steps, device=device,
                                                                     out_path=p, seed=0))
            extra = ["--segmenter", str(gl_path)]
        for seed in seeds:
            run = run_dir(out, model, over) / f"seed{seed}"
            settings = {"dataset": dataset, "dataroot": str(dataroot) if dataroot else None, "height": height,
                        "width": width, "budget_steps": budget_steps, "num": num, "row_flags": flags(over),
                        "train_args": list(train_args)}
            argv = ["--model", model, *where, "--steps", str(budget_steps),
                    "--seed", str(seed), "--out", str(run), "--resume", "--progress", "false",
                    "--sample_every", str(budget_steps), "--ckpt_every", str(budget_steps),
                    *flags(over), *extra, *train_args]
            jobs.append((row, seed, run, settings, argv))
    ready = lambda: _once(seg_path, lambda p: measurer())  # trained (or found cached) by the first run to need it
    found = _collect(name, jobs, seg_path, num, device, ready, poll_s, wait, remeasure)
    if found is None:
        return None
    ready()
    seg_desc = measurer()[1]
    results = [{"row": row, "model": model, "flags": " ".join(flags(over)),
                "runs": [found[row, seed] for seed in seeds]} for row, model, over in rows]
    return write_table(name, results, out, budget_steps, seeds, seg_desc, info, num, train_args)


def _collect(name, jobs, seg_path, num, device, segmenter_ready, poll_s, wait, remeasure):
    """{(row, seed): result} of every job (row, seed, run folder, settings, train.py argv): read when saved, else
    claimed, trained and measured (or measured again with remeasure); a job another process holds is waited for
    (None instead with wait=False, once nothing else is left to do)."""
    found, waiting = {}, False
    while len(found) < len(jobs):
        progressed = False
        for row, seed, run, settings, argv in jobs:
            if (row, seed) in found:
                continue
            done = _done(run / "result.json", settings)
            if done is not None and not remeasure:
                print(f"[{name}] {row}, seed {seed}: done ({run / 'result.json'}), skipped", flush=True)
                found[row, seed] = done["result"]
                continue
            claim = _claim(run.parent / f"seed{seed}.claim")
            if claim is None:
                continue  # another tables.py process trains it now
            try:
                done = _done(run / "result.json", settings)  # it may have finished since the check above
                if done is None:
                    print(f"[{name}] {row}, seed {seed}: python train.py {' '.join(argv)}", flush=True)
                    result = {"seed": seed, **train_and_measure(argv, run, seg_path, num, device, segmenter_ready)}
                elif remeasure:
                    print(f"[{name}] {row}, seed {seed}: measuring {run / 'ckpt_latest.pt'} again", flush=True)
                    segmenter_ready()
                    result = {**done["result"], "metrics": measure(run, seg_path, num, device)}
                else:
                    result = done["result"]
                if done is None or remeasure:
                    _write_json(run / "result.json", {"settings": settings, "result": result})
                    progressed = True
                found[row, seed] = result
            finally:
                claim.unlink(missing_ok=True)
        if len(found) < len(jobs) and not progressed:
            if not wait:
                return None
            if not waiting:
                print(f"[{name}] waiting for {len(jobs) - len(found)} run(s) another tables.py process is training",
                      flush=True)
            waiting = True
            time.sleep(poll_s)
    return found


# The new metrics, after the papers' columns: (metric key in eval's metrics.json, column, higher is better, short)
NEW_COLUMNS = [("boundary mIoU", "boundary mIoU ↑", True, "bnd"),
               ("small-object IoU", "small-object IoU ↑", True, "small"),
               ("class patch SWD", "patch SWD ↓", False, "SWD")]


def tied_for_best(rows, higher=True):
    """Indices of the rows tied for best in one metric: the row with the best mean and every row whose range over
    seeds [min, max] overlaps that row's range. rows: one list of values (None: not measured) per row."""
    spans = [(min(v), max(v), statistics.fmean(v)) if v else None
             for v in ([x for x in xs if x is not None and x == x] for xs in rows)]
    live = [i for i, sp in enumerate(spans) if sp is not None]
    if not live:
        return []
    best = (max if higher else min)(live, key=lambda i: spans[i][2])
    lo, hi = spans[best][:2]
    return [i for i in live if spans[i][0] <= hi and spans[i][1] >= lo]


def paired_lines(results, key, pairs=None):
    """Each row against its reference row on one metric, seed by seed (rows of one seed share the data order and
    the measurement): the differences, and in how many seeds the row is higher. pairs: [(row, reference row)],
    default every other row against the first. Seeds missing in either row are left out."""
    pairs = pairs if pairs is not None else [(i, 0) for i in range(1, len(results))]
    lines = ["", f"Paired by seed, {key} (row minus its reference; seeds where the row is higher):"]
    for i, ref in pairs:
        by_seed = lambda r: {s["seed"]: s["metrics"].get(key) for s in r["runs"]}
        a, b = by_seed(results[i]), by_seed(results[ref])
        d = [(seed, a[seed] - b[seed]) for seed in sorted(a) if seed in b and None not in (a[seed], b[seed])
             and a[seed] == a[seed] and b[seed] == b[seed]]  # NaN: undefined, left out
        diffs = ", ".join(f"seed {seed}: {v:+.3f}" for seed, v in d) or "n/a"
        lines.append(f"- {results[i]['row']} vs {results[ref]['row']}: {diffs} "
                     f"(higher in {sum(v > 0 for _, v in d)} of {len(d)})")
    return lines


def write_table(name, results, out, budget_steps, seeds, seg_desc, info, num, train_args):
    fid_key = "FID (segmenter features)"
    first = results[0]["runs"][0]["metrics"]
    if "FID" in first:
        fid_key = "FID"
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"
    ceiling = first.get("mIoU (real images: segmenter ceiling)")
    mech = MECHANISMS.get(name, {})
    columns = NEW_COLUMNS + mech.get("columns", [])  # a mechanism table adds the metric its claim is read on
    papers = PAPER.get(name)  # mechanism tables: no paper column (the papers ran no such experiment)
    edge_base = next((s["metrics"].get("edge F1 (every pixel an edge: baseline)") for r in results for s in r["runs"]
                      if s["metrics"].get("edge F1 (every pixel an edge: baseline)") is not None), None)
    lines = [f"{name}: {budget_steps} steps per run, seeds {list(seeds)}, {info.name} {info.height}x{info.width}, "
             f"{num} validation images, extra train.py flags: {' '.join(train_args) or 'none'}",
             f"measured by the {seg_desc}; its mIoU on real images (ceiling): "
             f"{fmt(ceiling)}, boundary mIoU {fmt(first.get('boundary mIoU (real images: segmenter ceiling)'))}, "
             f"small-object IoU {fmt(first.get('small-object IoU (real images: segmenter ceiling)'))}; "
             f"patch SWD of real vs real images (floor): {fmt(first.get('class patch SWD (real vs real: floor)'))}; "
             f"values are mean ± (max - min) / 2 over seeds"] + ([f"purpose: {mech['purpose']}"] if mech else []) + (
             [f"edge F1 of an edge map marking every pixel (baseline): {fmt(edge_base)}"] if edge_base else []) + [
             "",
             f"| row | flags | mIoU ↑ | Acc ↑ | {fid_key} ↓ | train s / seed | "
             + ("paper, Cityscapes: mIoU / Acc / FID | " if papers else "")
             + " | ".join(col for _, col, _, _ in columns) + " | best or tied (ranges overlap) |",
             "|---|---|---|---|---|---|" + "---|" * (len(columns) + 1 + bool(papers))]
    scored = [("mIoU", True, "mIoU"), ("pixel accuracy", True, "Acc"), (fid_key, False, "FID")] + [
        (k, hi, short) for k, _, hi, short in columns]
    values = lambda r, k: [s["metrics"].get(k) for s in r["runs"]]
    ties = {short: tied_for_best([values(r, k) for r in results], hi) for k, hi, short in scored}
    for i, (r, paper) in enumerate(zip(results, papers or [None] * len(results), strict=True)):
        get = lambda k: values(r, k)
        t = statistics.fmean(s["train_s"] for s in r["runs"])
        cmd = f"--model {r['model']} {r['flags']}".strip()
        paper = f"{' / '.join('-' if v is None else str(v) for v in paper)} | " if papers else ""
        best = ", ".join(short for _, _, short in scored if i in ties[short]) or "-"
        lines.append(f"| {r['row']} | `{cmd}` | "
                     f"{mean_spread(get('mIoU'))} | {mean_spread(get('pixel accuracy'))} | "
                     f"{mean_spread(get(fid_key))} | {t:.0f} | {paper}"
                     + " | ".join(mean_spread(get(k)) for k, _, _, _ in columns) + f" | {best} |")
    lines += paired_lines(results, mech.get("read", "mIoU"), mech.get("pairs"))
    lines += ["", "Ties (the best row and every row whose range over seeds overlaps it): " + "; ".join(
        f"{short}: {', '.join(results[i]['row'] for i in ties[short]) or 'n/a'}" for _, _, short in scored)]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    out = Path(out)
    (out / f"table_{name}.md").write_text(text)
    (out / f"table_{name}.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {out / f'table_{name}.md'} and table_{name}.json")
    return results


def _sanity_batch(run, untrained, batch, n, seen, ref, cand, seg, conf, gen, ignore, band_px):
    """metric_sanity's step: images [0, n) of the stream feed the reference, images [n, 2n) the four candidate sets
    (patches at shared centres; confusions when there is a segmenter). Returns the images seen so far."""
    import metrics as M
    info = run.info
    b = run.prepare(batch)
    k = len(b["label"])
    real, lab = b["image"].float(), M.scored_label(b["label"], info)
    first = max(0, min(k, n - seen))  # images [0, n): the reference; [n, 2n): the candidates' layouts
    if first:
        ref.add(lab[:first], reference=real[:first])
    if first < k:
        sl = slice(first, k)
        cb = {key: (v[sl] if torch.is_tensor(v) and len(v) == k else v) for key, v in b.items()}
        sets = {"real": real[sl],
                "trained": run.module.sample(run.G, cb)["fake"].float().clamp(-1, 1),
                "untrained": run.module.sample(untrained, cb)["fake"].float().clamp(-1, 1),
                "noise": torch.rand(real[sl].shape, generator=gen).to(real.device) * 2 - 1}
        cand.add(lab[sl], **sets)
        if seg is not None:
            for key, img in sets.items():
                c = M.confusions_of(seg, img, b["label"][sl], info, ignore, band_px)
                conf[key]["all"] = conf[key]["all"] + c["all"]
                conf[key]["band"] = conf[key]["band"] + c["band"]
    seen += k
    return seen


def metric_sanity(ckpt, out, num=64, device="auto", batch_size=8, seed=0, seg_steps=None):
    """Do the metrics rank what they should? The reference is the real images of the first `num` validation images;
    four candidate sets are drawn on the layouts of the next `num`: real images, the trained checkpoint's, the same
    generator freshly initialised (seed 0, untrained), and uniform noise in [-1, 1]. Class patch SWD (every candidate
    cut at the same seeded centres; the reference at its own) should rank real < trained < untrained < noise; the
    segmenter's mIoU / boundary mIoU / small-object IoU the other way (real = its ceiling). Writes
    <out>/metric_sanity.{md,json}."""
    import metrics as M
    from evalrun import load_run
    run = load_run(ckpt, pick_device(device))
    info, val = run.info, run.val
    n = min(num, len(val) // 2)
    if n < 2:
        raise EvalError(f"{run.dataset} ({run.split}) has {len(val)} images: the sanity check needs at least 4")
    notes = []
    seg, seg_desc = segmenter_train.find_segmenter(None, [Path(out)], run.dataset, info, run.dataroot, seg_steps,
                                                   batch_size, run.device, notes)  # seg_steps 0: none, SWD only
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        untrained = run.module.build(run.cfg, info)[0].to(run.device).eval()
    ignore = M.default_ignore(info)
    n_cls = M.eval_classes(info)[1]
    band_px = M.default_band_px(info.height)
    small = M.small_class_ids(info)
    names = ("real", "trained", "untrained", "noise")
    ref = M.ClassPatches(n_cls, ("reference",), seed=seed, ignore=ignore)
    cand = M.ClassPatches(n_cls, names, seed=seed + 1, ignore=ignore)
    conf = {k: {"all": 0, "band": 0} for k in names}
    gen = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(val, range(2 * n)), batch_size=batch_size)
    seen = 0
    for batch in loader:
        with torch.no_grad():
            seen = _sanity_batch(run, untrained, batch, n, seen, ref, cand, seg, conf, gen, ignore, band_px)
    rows = {}
    for key in names:
        per, mean = M.class_swd(ref.patches("reference"), cand.patches(key))
        row = {"class patch SWD": mean,
               "per class": {M.class_names_of(info)[c]: v for c, v in per.items()}}
        if seg is not None:
            a, bd = M.segmentation_scores(conf[key]["all"], ignore), M.segmentation_scores(conf[key]["band"], ignore)
            row.update({"mIoU": a["mIoU"], "boundary mIoU": bd["mIoU"],
                        "small-object IoU": M.small_object_iou(a["iou"], small)})
        rows[key] = row
    swd = [rows[k]["class patch SWD"] for k in names]
    ok = all(x < y for x, y in zip(swd, swd[1:]))
    cols = ["class patch SWD"] + (["mIoU", "boundary mIoU", "small-object IoU"] if seg is not None else [])
    fmt = lambda v: "n/a" if v is None or v != v else f"{v:.4f}"
    lines = [f"Metric sanity: {run.dataset} {info.height}x{info.width}, reference = real images of {run.split} "
             f"images 0..{n - 1}; every candidate set is drawn on the layouts of images {n}..{2 * n - 1}. "
             f"Trained: {ckpt} ({run.model}, step {int(run.ckpt.get('step', 0))}); untrained: the same generator "
             f"freshly initialised (seed {seed}); noise: uniform in [-1, 1].",
             f"Class patch SWD: 7x7 patches centred in each class, at most 1024 per class (seeded), sliced "
             f"Wasserstein-1 over 128 seeded directions, mean over classes with >= 64 patches in both sets. "
             + (f"mIoU / boundary mIoU (band {band_px} px) / small-object IoU "
                f"({', '.join(M.class_names_of(info)[i] for i in small)}): {seg_desc}; on real images it is the "
                f"segmenter's ceiling." if seg is not None else "No segmenter: SWD only."),
             "", "| candidate set | " + " | ".join(c + (" ↓" if "SWD" in c else " ↑") for c in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for key in names:
        lines.append(f"| {key} | " + " | ".join(fmt(rows[key].get(c)) for c in cols) + " |")
    lines += ["", f"SWD ranks real < trained < untrained < noise: {'yes' if ok else 'NO'}"]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metric_sanity.md").write_text(text)
    _write_json(out / "metric_sanity.json", {"rows": rows, "ranks_as_expected": ok, "num": n, "checkpoint": str(ckpt),
                                             "notes": notes})
    print(f"wrote {out / 'metric_sanity.md'} and metric_sanity.json")
    return rows, ok


def sau_kernel_table(out, num=64, device="auto", batch_size=8):
    """SAU Fig. 5 over many locations, for sau_mech's SAU rows and gaugan12's LGGAN++: figures.sau_kernel_statistic
    of every finished seed's checkpoint (and of the same generator untrained, seed 0) on the first `num` validation
    images, pooled over the SAU layers and at the finest one. Writes <out>/table_sau_fig5.{md,json}."""
    import figures
    from evalrun import load_run
    out = Path(out)
    device = pick_device(device)
    lines, rows, seen = [], [], set()
    for row, over in table_rows("sau_mech") + table_rows("gaugan12"):  # and gaugan12's LGGAN++ row
        over = dict(over)
        model = over.pop("model")
        folder = run_dir(out, model, minimal_over(model, over, []))
        if over.get("upsample") != "sau" or folder in seen:
            continue
        seen.add(folder)
        ckpts = sorted(folder.glob("seed*/ckpt_latest.pt"))
        stats, untrained = [], None
        for ckpt in ckpts:
            run = load_run(ckpt, device)
            loader = torch.utils.data.DataLoader(torch.utils.data.Subset(run.val, range(min(num, len(run.val)))),
                                                 batch_size=batch_size)
            stats.append(figures.sau_kernel_statistic(run.G, run.module, loader, run.prepare))
            if untrained is None:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(0)
                    G0 = run.module.build(run.cfg, run.info)[0].to(run.device).eval()
                untrained = figures.sau_kernel_statistic(G0, run.module, loader, run.prepare)
        if stats:
            rows.append({"row": row, "checkpoints": [str(c) for c in ckpts], "trained": stats,
                         "untrained": untrained})
    if not rows:
        raise EvalError(f"{out}/runs: no checkpoint of sau_mech's SAU rows; build it first (python tables.py sau_mech "
                        f"--budget_steps N --out {out})")
    keys = ["share of window", "average-kernel mass", "own-class mass", "excess"]
    lines = [f"SAU Fig. 5 over many locations: every output pixel of every SAU layer whose k x k window reaches "
             f"another class, on the first {num} validation images; values pooled over the layers, mean ± half the "
             f"range over seeds. own-class mass: the kernel's weight on taps of the pixel's own class; share: what a "
             f"uniform kernel puts there; average-kernel mass: what the layer's mean kernel (same position prior, "
             f"no semantics) puts there; excess = own-class mass - average-kernel mass (> 0: the kernels follow the "
             f"label map).", "",
             "| row | seeds | locations / seed | " + " | ".join(keys) + " | excess, untrained (seed 0) | "
             "excess at the finest SAU (per seed) |",
             "|---|---|---|" + "---|" * (len(keys) + 2)]
    for r in rows:
        alls = [s_["all"] for s_ in r["trained"]]
        # the finest layer: the most locations (several at one resolution, as in LGGAN++'s branches: the first)
        finest = lambda st: max((v for k, v in st.items() if k != "all"), key=lambda v: v["locations"])
        lines.append(f"| {r['row']} | {len(alls)} | {statistics.fmean(a['locations'] for a in alls):.0f} | "
                     + " | ".join(mean_spread([a[k] for a in alls]) for k in keys)
                     + f" | {r['untrained']['all']['excess']:.3f} | "
                     + ", ".join(f"{finest(st)['excess']:+.3f}" for st in r["trained"]) + " |")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    (out / "table_sau_fig5.md").write_text(text)
    _write_json(out / "table_sau_fig5.json", rows)
    print(f"wrote {out / 'table_sau_fig5.md'} and table_sau_fig5.json")
    return rows


def main(argv=None):
    import data
    import train
    p = data.ArgumentParser(description=__doc__.split("\n\n")[0],
                            epilog="Unknown flags are passed to every train.py run.")
    p.add_argument("table", nargs="+", choices=sorted(TABLES) + sorted(MECHANISMS) + ["sanity", "sau_fig5"],
                   help="one or more tables, built in this order; or sanity (alone); or sau_fig5 (alone: SAU Fig. 5's "
                        "kernel statistic of sau_mech's finished runs)")
    p.add_argument("--budget_steps", type=int, default=None, help="training steps of every run (required for a table)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--ckpt", default=None, help="sanity: the trained checkpoint to rank")
    p.add_argument("--out", default="runs/tables")
    p.add_argument("--height", type=int, default=0, help="0: the dataset's default (synthetic 64x128, COCO 64x64)")
    p.add_argument("--width", type=int, default=0)
    p.add_argument("--dataset", default="synthetic", choices=data.NAMES)
    p.add_argument("--dataroot", default=None, help="root folder of a real dataset")
    p.add_argument("--num", type=int, default=64, help="validation images per evaluation")
    p.add_argument("--seg_steps", type=int, default=None,
                   help="steps of the measuring segmenter (trained once; default: scaled to the data)")
    p.add_argument("--gl_steps", type=int, default=300, help="steps of ECGAN's label generator G_l (trained once)")
    p.add_argument("--device", default="auto")
    p.add_argument("--remeasure", action="store_true",
                   help="measure the finished runs' checkpoints again (e.g. for a metric eval.py gained since), "
                        "keeping their training; runs not yet finished are trained as usual")
    args, train_args = p.parse_known_args(argv)
    alone = {"sanity": "python tables.py sanity --ckpt RUN/ckpt_latest.pt",
             "sau_fig5": "python tables.py sau_fig5 --out DIR (after sau_mech)"}
    for name, usage in alone.items():
        if name in args.table and args.table != [name]:
            p.error(f"{name} runs alone: {usage}")
    if args.table == ["sanity"]:
        if not args.ckpt:
            p.error("sanity: --ckpt RUN/ckpt_latest.pt (a trained checkpoint) is required")
        return _or_exit(lambda: metric_sanity(args.ckpt, args.out, args.num, args.device, seg_steps=args.seg_steps))
    if args.table == ["sau_fig5"]:
        return _or_exit(lambda: sau_kernel_table(args.out, args.num, args.device))
    if args.budget_steps is None:
        p.error(f"{' '.join(args.table)}: --budget_steps N is required")
    for name in ("budget_steps", "num", "seg_steps", "gl_steps"):
        if getattr(args, name) is not None and getattr(args, name) < (0 if name == "seg_steps" else 1):
            p.error(f"--{name} {getattr(args, name)}: expected an integer >= 1")
    if min(args.seeds) < 0 or len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds {' '.join(map(str, args.seeds))}: expected distinct integers >= 0")
    if args.height < 0 or args.width < 0:
        p.error(f"--height {args.height} --width {args.width}: expected positive sizes (0: the dataset's default)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device is visible")
    height, width = data.default_size(args.dataset, args.height, args.width, small=True)
    build = lambda name, wait: run_table(name, args.budget_steps, args.seeds, args.out, train_args, height, width,
                                         args.dataset, args.num, args.seg_steps, args.gl_steps, args.device,
                                         args.dataroot, wait=wait, remeasure=args.remeasure)

    def build_all():  # first every table's unclaimed runs (another process may hold some), then each one complete
        first = {name: build(name, wait=False) for name in args.table}
        return [first[name] if first[name] is not None else build(name, wait=True) for name in args.table]
    return _or_exit(build_all, train.ConfigError, train.CheckpointError)


def _or_exit(job, *errors):
    """job()'s value; a bad input it finds (EvalError, ValueError or one of `errors`) is one line and exit code 2."""
    try:
        return job()
    except (EvalError, ValueError, *errors) as e:
        print(f"tables.py: error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
