"""
One benchmark for the repo: step time and peak memory of GauGAN, LGGAN, LGGAN++ and ECGAN, and the
fast-vs-naive component pairs, all measured in one run on the machine it runs on.

    python bench.py                                   # CPU size: train.py's cpu preset, 64x128, batch 4
    python bench.py --quick                           # CI size (seconds): 32x64, batch 2, small components
    python bench.py --device cuda --size 256 512 --batch 4 --preset paper --ups more --amp bf16 --channels_last
    python bench.py --device cuda --size 256 512 --batch 4 --preset paper --ups more --amp bf16 --compile

Map of this file
    make_batch            a synthetic-streets batch through data.prepare_batch (what train.py feeds the models)
    model_configs         GauGAN, LGGAN, LGGAN++ (upsample="sau") and ECGAN at a train.py preset
    train_step            one G step + one D step as train.py does them (frozen D in the G step, Adam updates)
    bench_models          step time (median) and peak memory per model, ratio to GauGAN
    memory_scale          largest batch at 256x512 that fits a memory budget, from a measured per-sample peak
    component rows        SAU (sau.benchmark), per-class generation (lggan.bench_classes), contrastive and
                          similarity (ecgan.bench_contrastive, ecgan.bench_similarity)
    main                  prints the markdown tables (and writes them with --out)

Time: median of --reps runs after one warm-up. Peak memory: sau.peak_memory (CUDA allocator peak; on CPU the
profiler's allocation events), bytes allocated during one step beyond what was live before it.
"""

import dataclasses
import math
import os
import platform
import sys
import time

import torch

import data
import ecgan
import gaugan
import lggan
import sau
import train

MODELS = ("gaugan", "lggan", "lggan++ (sau)", "ecgan")
TARGETS = {"lggan++ (sau)": 2.0, "ecgan": 2.5}  # step-time ratio targets to GauGAN at the same size


def load():
    try:
        return "load average {:.2f} {:.2f} {:.2f} (1, 5, 15 min)".format(*os.getloadavg())
    except OSError:
        return "load average unavailable"


def make_batch(B, H, W, device, edges, num_classes=None):
    """B synthetic-streets samples (10 classes + instance boundaries), prepared as train.py prepares them;
    num_classes widens the label space (e.g. Cityscapes' 35) while the labels keep using ids 0..9."""
    ds = data.make_dataset("synthetic", size=(H, W))
    info = dataclasses.replace(ds.info, num_classes=num_classes or ds.info.num_classes)
    batch = torch.utils.data.default_collate([ds[i] for i in range(B)])
    return info, data.prepare_batch(batch, info, device, edges=edges)


def model_configs(preset, num_upsampling_layers="normal"):
    """(name, module, cfg) per model; the preset's fields apply where the config has them (as in train.py)."""
    out = []
    for name, module, extra in (("gaugan", gaugan, {}), ("lggan", lggan, {}),
                                ("lggan++ (sau)", lggan, {"upsample": "sau"}), ("ecgan", ecgan, {})):
        cfg = module.Config(num_upsampling_layers=num_upsampling_layers, **extra)
        for k, v in train.PRESETS[preset].items():
            if hasattr(cfg, k):
                setattr(cfg, k, v)
        out.append((name, module, cfg))
    return out


def build(module, cfg, info, device, channels_last=False, compile=""):
    torch.manual_seed(0)
    G, D = module.build(cfg, info)
    G.to(device).train(), D.to(device).train()
    if channels_last:  # 4-D weights only (Module.to(memory_format=...) refuses ClassGenerator's 5-D weight)
        for t in [*G.parameters(), *D.parameters()]:
            if t.dim() == 4:
                t.data = t.data.contiguous(memory_format=torch.channels_last)
    opt_G = torch.optim.Adam([p for p in G.parameters() if p.requires_grad], lr=cfg.lr_g, betas=(cfg.beta1, cfg.beta2))
    opt_D = torch.optim.Adam(D.parameters(), lr=cfg.lr_d, betas=(cfg.beta1, cfg.beta2))
    G_run, D_run = (torch.compile(G, backend=compile), torch.compile(D, backend=compile)) if compile else (G, D)
    return G, D, G_run, D_run, opt_G, opt_D


def train_step(module, cfg, nets, batch, amp_dtype, device):
    """One iteration of train.py's loop: G step (D frozen), Adam on G; D step, Adam on D."""
    G, D, G_run, D_run, opt_G, opt_D = nets
    dev = torch.device(device).type
    D.requires_grad_(False)
    with torch.autocast(dev, dtype=amp_dtype, enabled=amp_dtype is not None):
        loss_g, _ = module.g_step(G_run, D_run, batch, cfg)
    D.requires_grad_(True)
    opt_G.zero_grad(set_to_none=True)
    loss_g.backward()
    opt_G.step()
    with torch.autocast(dev, dtype=amp_dtype, enabled=amp_dtype is not None):
        loss_d, _ = module.d_step(G_run, D_run, batch, cfg)
    opt_D.zero_grad(set_to_none=True)
    loss_d.backward()
    opt_D.step()
    return loss_g.item(), loss_d.item()


def count(module):
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def bench_models(args, amp_dtype):
    """Rows: (name, seconds per step, peak bytes, G params)."""
    H, W = args.size
    rows = []
    for name, module, cfg in model_configs(args.preset, args.ups):
        info, batch = make_batch(args.batch, H, W, args.device, edges=module is ecgan)
        if args.channels_last:
            batch = {k: (v.contiguous(memory_format=torch.channels_last) if torch.is_tensor(v) and v.dim() == 4
                         else v) for k, v in batch.items()}
        nets = build(module, cfg, info, args.device, args.channels_last, args.compile)
        step = lambda: train_step(module, cfg, nets, batch, amp_dtype, args.device)
        t = sau.time_it(step, args.device, args.reps)  # warm-up first: Adam state exists before the peak
        rows.append((name, t, sau.peak_memory(step, args.device), count(nets[0])))
        print(f"  measured {name}", file=sys.stderr, flush=True)
    return rows


def memory_scale(args, amp_dtype, budget=24 * 2**30, H=256, W=512):
    """Largest batch at H x W (the papers' Cityscapes setting: paper widths, 'more' upsampling, 35 classes) whose
    training step fits `budget`. Persistent: fp32 weights, gradients and Adam's two moments (16 bytes per
    parameter). Measured at args.mem_size, batch 1 and 2, with gradients already allocated: the peak of the G and D
    forward + backward passes; peak(batch 2) - peak(batch 1) is the per-sample part, scaled by the pixel count to
    H x W (activations grow with pixels); the rest of peak(batch 1) (spectral-norm weights, ...) is fixed.
    Rows: (name, per-sample bytes at H x W, fixed bytes, largest batch)."""
    h, w = args.mem_size
    dev = torch.device(args.device).type
    rows = []
    for name, module, cfg in model_configs(args.mem_preset, mem_ups(args)):
        peaks = []
        for B in (1, 2):
            info, batch = make_batch(B, h, w, args.device, edges=module is ecgan, num_classes=35)  # Cityscapes
            nets = build(module, cfg, info, args.device)
            G, D, G_run, D_run = nets[:4]

            def passes():  # train_step without the optimizers: gradients accumulate into the existing ones
                D.requires_grad_(False)
                with torch.autocast(dev, dtype=amp_dtype, enabled=amp_dtype is not None):
                    loss_g, _ = module.g_step(G_run, D_run, batch, cfg)
                D.requires_grad_(True)
                loss_g.backward()
                with torch.autocast(dev, dtype=amp_dtype, enabled=amp_dtype is not None):
                    loss_d, _ = module.d_step(G_run, D_run, batch, cfg)
                loss_d.backward()
            train_step(module, cfg, nets, batch, amp_dtype, args.device)  # Adam state and gradients allocated
            peaks.append(sau.peak_memory(passes, args.device))
            persistent = 16 * (count(G) + count(D))  # fp32 weights, grads, exp_avg, exp_avg_sq
            persistent += 4 * sum(p.numel() for p in G.parameters() if not p.requires_grad)  # ECGAN's frozen G_l
            del nets, G, D, G_run, D_run, passes
        per_sample = peaks[1] - peaks[0]
        fixed = persistent + peaks[0] - per_sample
        per_sample *= (H * W) / (h * w)
        rows.append((name, per_sample, fixed, max(0, int((budget - fixed) // per_sample))))
        print(f"  measured memory scale {name}", file=sys.stderr, flush=True)
    return rows


def mem_ups(args):
    """'more' (Cityscapes) where the measuring size allows it (multiples of 64), else 'normal'."""
    return "more" if args.mem_size[0] % 64 == 0 and args.mem_size[1] % 64 == 0 else "normal"


def component_rows(args):
    """Markdown rows of the fast-vs-naive pairs, from the model files' own benchmark functions."""
    q, dev, reps = args.quick, args.device, args.reps
    rows = []
    # SAU at the layer level (sau.benchmark: both windows, lean with and without its autograd.Function,
    # and nearest upsampling from the Table 12 zoo); --sau_size, default a cpu-preset layer (32 channels)
    B, C, H, W = args.sau_size
    sau_rows = sau.benchmark(B, C, H, W, device=dev, reps=reps, skip=[u for u in sau.UPSAMPLERS if u != "nearest"])
    near = next(t for name, t, _, _ in sau_rows if name == "zoo nearest")
    lean = next(t for name, t, _, _ in sau_rows if name == "sau_upsample lean, expanded")
    for name, t, m, _ in sau_rows:
        note = f"x nearest {t / near:.1f}" + (" (target on GPU: lean <= 2x nearest)" if t is lean else "")
        rows.append(f"| SAU layer B={B} C={C} {H}x{W}->{2 * H}x{2 * W} | {name} | {t * 1e3:.1f} | "
                    f"{m / 2**20:.1f} | {t / lean:.2f} | {note} |")
    # per-class generation (Eq. 2), naive loop vs grouped conv vs pixel, ~10 classes present
    B, C, H, W = (2, 8, 32, 64) if q else (args.batch, train.PRESETS["cpu"]["ngf"], *args.size)
    for setting, res in lggan.bench_classes(B, C, H, W, reps, settings=((35, 10), (150, 10)), device=dev):
        fast = res["pixel"][0]
        for impl, (t, m) in res.items():
            rows.append(f"| per-class generation B={B} C={C} {H}x{W}, {setting} | {impl} | {t * 1e3:.1f} | "
                        f"{m / 2**20:.1f} | {t / fast:.2f} | |")
    # pixel contrastive loss (Eq. 5)
    anchors, sub = (128, 32) if q else (1024, 256)
    res = ecgan.bench_contrastive(dev, anchors, sub)
    fast = res[0][1]
    for impl, t, m in res:
        note = f"extrapolated x(anchors/{m})^2 from {m} anchors" if m else ""
        rows.append(f"| contrastive Eq. 5, {anchors} anchors, 256-d | {impl} | {t * 1e3:.1f} | - | "
                    f"{t / fast:.1f} | {note} |")
    # data: what train.py does per step outside the models (DataLoader workers overlap the first part)
    B, (H, W) = args.batch, args.size
    ds = data.make_dataset("synthetic", size=(H, W))
    load = lambda: torch.utils.data.default_collate([ds[i] for i in range(B)])
    raw = load()
    for name, fn in ((f"{B} synthetic samples + collate", load),
                     ("prepare_batch (one-hot, instance edges)", lambda: data.prepare_batch(raw, ds.info, dev)),
                     ("prepare_batch, edges=True (+ Canny, ECGAN)",
                      lambda: data.prepare_batch(raw, ds.info, dev, edges=True))):
        rows.append(f"| data B={B} {H}x{W} | {name} | {sau.time_it(fn, dev, reps) * 1e3:.1f} | - | - | "
                    f"forward only |")
    # similarity loss (Eq. 3)
    sizes = (((2, 16, 32), ("naive", "chunked")),) if q else (((2, 32, 64), ("naive", "chunked")),)
    res = ecgan.bench_similarity(dev, sizes, chunk=256 if q else 1024)
    fast = next(t for _, impl, t, _ in res if impl == "chunked")
    for (B, H, W), impl, t, m in res:
        rows.append(f"| similarity Eq. 3, B={B} {H}x{W} (M={H * W}), 35 classes | {impl} | {t * 1e3:.1f} | "
                    f"{m / 2**20:.1f} | {t / fast:.2f} | |")
    return rows


def check_args(ap, args):
    """One line naming the flag (argparse's error, exit 2) for a value out of range, before anything runs."""
    mult = 2 ** gaugan.NUM_UPSAMPLES[args.ups]  # GauGAN's trunk starts at size / 2^(upsamplings)
    for name in ("size", "mem_size"):
        v = getattr(args, name)
        if v is not None and (min(v) < mult or v[0] % mult or v[1] % mult):
            ap.error(f"--{name} {v[0]} {v[1]}: expected a height and width that are positive multiples of {mult} "
                     f"(2^{gaugan.NUM_UPSAMPLES[args.ups]} for --ups {args.ups})")
    for name, low in (("batch", 1), ("reps", 1), ("threads", 0)):
        v = getattr(args, name)
        if v is not None and v < low:
            ap.error(f"--{name} {v}: expected an integer >= {low}")
    if args.sau_size is not None and min(args.sau_size) < 1:
        ap.error(f"--sau_size {' '.join(map(str, args.sau_size))}: expected four positive integers B C H W")
    try:
        dev = torch.device(args.device)
    except RuntimeError:
        ap.error(f"--device {args.device!r}: expected cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: no CUDA device is visible")
    if dev.type not in ("cpu", "cuda"):
        ap.error(f"--device {args.device!r}: expected cpu, cuda or cuda:N")
    if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        ap.error(f"--out {args.out}: its folder does not exist")


def main(argv=None):
    ap = data.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    ap.add_argument("--quick", action="store_true", help="CI size: 32x64, batch 2, small components (seconds)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None, help="default 64 128 (quick: 32 64)")
    ap.add_argument("--batch", type=int, default=None, help="default 4 (quick: 2)")
    ap.add_argument("--preset", default="cpu", choices=sorted(train.PRESETS), help="train.py's width preset")
    ap.add_argument("--ups", default="normal", choices=("normal", "more"), help="GauGAN num_upsampling_layers")
    ap.add_argument("--amp", default="none", choices=("none", "bf16"), help="autocast dtype of the model steps")
    ap.add_argument("--channels_last", action="store_true", help="models and batch in channels_last")
    ap.add_argument("--compile", nargs="?", const="inductor", default="",
                    help="torch.compile G and D (model steps only); optional backend, default inductor")
    ap.add_argument("--reps", type=int, default=3, help="timed runs per measurement (median)")
    ap.add_argument("--sau_size", type=int, nargs=4, metavar=("B", "C", "H", "W"), default=None,
                    help="SAU layer input (default 4 32 32 64; on CUDA 4 256 64 128, sau.py's size; quick 2 8 16 32)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: PyTorch's default)")
    ap.add_argument("--no_components", action="store_true", help="model steps only")
    ap.add_argument("--no_memory_scale", action="store_true", help="skip the 256x512 memory-scale table")
    ap.add_argument("--mem_size", type=int, nargs=2, metavar=("H", "W"), default=None,
                    help="size the memory-scale peak is measured at, batch 1, then scaled by pixels to 256x512 "
                         "(default 64 128, 256 512 on CUDA; quick: --size)")
    ap.add_argument("--mem_preset", default=None, choices=sorted(train.PRESETS),
                    help="widths of the memory-scale table (default paper; quick: cpu)")
    ap.add_argument("--out", default="", help="also write the tables as markdown to this file")
    args = ap.parse_args(argv)
    check_args(ap, args)
    args.size = tuple(args.size or ((32, 64) if args.quick else (64, 128)))
    args.batch = args.batch or (2 if args.quick else 4)
    args.mem_size = tuple(args.mem_size or (args.size if args.quick else
                                            (256, 512) if torch.device(args.device).type == "cuda" else (64, 128)))
    args.sau_size = tuple(args.sau_size or ((2, 8, 16, 32) if args.quick else (4, 256, 64, 128)
                                            if torch.device(args.device).type == "cuda" else (4, 32, 32, 64)))
    args.mem_preset = args.mem_preset or ("cpu" if args.quick else "paper")
    amp_dtype = {"none": None, "bf16": torch.bfloat16}[args.amp]
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    where = (torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({platform.processor() or 'cpu'}, "
             f"{torch.get_num_threads()} threads)")
    lines = [f"# bench.py: {where}, torch {torch.__version__}, {load()} at start",
             f"models: preset {args.preset}, {args.size[0]}x{args.size[1]}, batch {args.batch}, ups {args.ups}, "
             f"amp {args.amp}, channels_last {args.channels_last}, compile {args.compile or 'off'}; "
             f"median of {args.reps} after a warm-up", ""]

    def emit(*new):
        for line in new:
            print(line, flush=True)
            lines.append(line)
    print("\n".join(lines), flush=True)

    rows = bench_models(args, amp_dtype)
    base_t, base_m = rows[0][1], rows[0][2]
    emit("| model | step ms (G+D, fwd+bwd+Adam) | x GauGAN | target | peak MiB | x GauGAN | G params (M) |",
         "|---|---|---|---|---|---|---|")
    for name, t, m, n in rows:
        target = f"<= {TARGETS[name]}x {'met' if t / base_t <= TARGETS[name] else 'MISSED'}" if name in TARGETS else "-"
        emit(f"| {name} | {t * 1e3:.1f} | {t / base_t:.2f} | {target} | {m / 2**20:.1f} | {m / base_m:.2f} | "
             f"{n / 1e6:.2f} |")

    if not args.no_components:
        emit("", "| component | impl | fwd+bwd ms | peak MiB | x fast time | note |", "|---|---|---|---|---|---|")
        for line in component_rows(args):
            emit(line)

    if not args.no_memory_scale:
        rows = memory_scale(args, amp_dtype)
        h, w = args.mem_size
        how = (f"per-sample = peak(batch 2) - peak(batch 1) of the G and D forward+backward passes at {h}x{w}, preset {args.mem_preset}, "
               f"'{mem_ups(args)}' upsampling, 35 classes" +
               (f", scaled x{256 * 512 / (h * w):g} by pixel count" if (h, w) != (256, 512) else ""))
        mem = "GPU" if dev.type == "cuda" else "CPU"
        emit("", f"Memory scale: largest batch at 256x512 in 24 GiB of {mem} memory ({how}; fixed = fp32 weights, "
             f"grads, Adam moments and the batch-independent rest of peak(batch 1); amp {args.amp})",
             "| model | per-sample peak GiB | fixed GiB | largest batch in 24 GiB |", "|---|---|---|---|")
        for name, per, fixed, b in rows:
            emit(f"| {name} | {per / 2**30:.2f} | {fixed / 2**30:.2f} | {b} |")
    emit("", f"{load()} at end")
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("\n".join(lines) + "\n")
    return lines


if __name__ == "__main__":
    main()
