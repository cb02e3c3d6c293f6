"""
One benchmark for the repo: step time and peak memory of GauGAN, LGGAN, LGGAN++ and ECGAN, and the
fast-vs-naive component pairs, all measured in one run on the machine it runs on.

    python bench.py                                   # CPU size: train.py's cpu preset, 64x128, batch 4
    python bench.py --quick                           # CI size (seconds): 32x64, batch 2, small components
    python bench.py --device cuda --size 256 512 --batch 4 --preset paper --ups more --amp bf16 --channels_last
    python bench.py --device cuda --size 256 512 --batch 4 --preset paper --ups more --amp bf16 --compile

Map of this file
    time_it, peak_memory  the two measurements (median seconds; peak bytes allocated, public APIs only)
    make_batch            a synthetic-streets batch through data.prepare_batch (what train.py feeds the models)
    model_configs         GauGAN, LGGAN, LGGAN++ (upsample="sau") and ECGAN at a train.py preset
    train_step            one G step + one D step as train.py does them (frozen D in the G step, Adam updates)
    bench_models          step time (median) and peak memory per model, ratio to GauGAN
    memory_scale          largest batch at 256x512 that fits a memory budget, from a measured per-sample peak
    component rows        every fast path beside its naive twin and a floor measured in the same run: SAU
                          (bench_sau, + Table 12's zoo with --sau_zoo), per-class generation (LGGAN's
                          ClassGenerator, ECGAN's ClassSpecificGenerator: bench_classes), contrastive Eq. 5
                          (bench_contrastive), similarity Eq. 3 (bench_similarity), ECGAN's memory bank (bench_bank)
    main                  prints the markdown tables (and writes them with --out)

Time: median of --reps runs after one warm-up. Peak memory: bytes allocated during one step beyond what was live
before it (CUDA: torch.cuda.max_memory_allocated; CPU: the allocation and free events of torch.profiler's trace).
Ratios ("x fast", "x floor") compare rows of this one run.
"""

import dataclasses
import json
import math
import os
import platform
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import data
import ecgan
import gaugan
import lggan
import sau
import train
from evalrun import device_problem

MODELS = ("gaugan", "lggan", "lggan++ (sau)", "ecgan")
TARGETS = {"lggan++ (sau)": 2.0, "ecgan": 2.5}  # step-time ratio targets to GauGAN at the same size
SAU_FLOOR_TARGET = 3.0  # SAU lean forward + backward within 3x of the floor that moves the same bytes once


# ----------------------------------------------------------------------------- measuring

def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_it(fn, device, reps):
    """Median seconds of fn() over reps runs after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def peak_memory(fn, device):
    """Peak bytes of tensors allocated while fn() runs, over what was live before it.
    CUDA: the allocator's max_memory_allocated. CPU: torch.profiler with profile_memory=True records every
    allocation and free ("[memory]" events of its exported trace, in time order); the running sum of their sizes
    peaks at the answer. Blocks allocated before fn and freed in it are left out, so they cannot lower the peak
    (the profiler's "Memory block of unknown size" warning is about them)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as fh:
            events = json.load(fh)["traceEvents"]
    sizes = [(float(e["ts"]), e["args"]["Bytes"]) for e in events if e.get("name") == "[memory]"]
    cur = peak = 0
    for _, size in sorted(sizes, key=lambda t: t[0]):  # stable: events of one timestamp keep their order
        cur += size
        peak = max(peak, cur)
    return peak


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


def bench_models(args, amp_dtype):
    """Rows: (name, seconds per step, peak bytes, G params)."""
    H, W = args.size
    rows = []
    for name, module, cfg in model_configs(args.preset, args.ups):
        info, batch = make_batch(args.batch, H, W, args.device, edges=train.model_needs(module, "needs_edges", cfg))
        if args.channels_last:
            batch = {k: (v.contiguous(memory_format=torch.channels_last) if torch.is_tensor(v) and v.dim() == 4
                         else v) for k, v in batch.items()}
        nets = build(module, cfg, info, args.device, args.channels_last, args.compile)
        step = lambda: train_step(module, cfg, nets, batch, amp_dtype, args.device)
        t = time_it(step, args.device, args.reps)  # warm-up first: Adam state exists before the peak
        rows.append((name, t, peak_memory(step, args.device), gaugan.count_params(nets[0], trainable=True)))
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
            info, batch = make_batch(B, h, w, args.device, edges=train.model_needs(module, "needs_edges", cfg), num_classes=35)  # Cityscapes
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
            peaks.append(peak_memory(passes, args.device))
            # fp32 weights, grads, exp_avg, exp_avg_sq of what trains
            persistent = 16 * (gaugan.count_params(G, trainable=True) + gaugan.count_params(D, trainable=True))
            persistent += 4 * gaugan.count_params(G, trainable=False)  # ECGAN's frozen G_l
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


# ----------------------------------------------------------------------------- component pairs
#
# Each bench_* returns rows (group, impl, seconds, peak bytes or None, note, role): role "fast" is the path the
# models use, "floor" a lower bound measured in the same run (the same bytes or the same matmuls with nothing
# else), None the rest (naive twins, older paths). format_components turns them into "x fast" / "x floor" columns.


class _ReadWriteFloor(torch.autograd.Function):
    """The traffic SAU cannot avoid, with no arithmetic: forward reads x and the kernels once (a sum) and writes
    an output-sized tensor once; backward reads the output's gradient, x and the kernels and writes their two
    gradients once."""

    @staticmethod
    def forward(ctx, x, kernels, out_shape):
        ctx.save_for_backward(x, kernels)
        x.sum(), kernels.sum()
        return x.new_zeros(out_shape)

    @staticmethod
    def backward(ctx, grad):
        x, kernels = ctx.saved_tensors
        grad.sum(), x.sum(), kernels.sum()
        return torch.zeros_like(x), torch.zeros_like(kernels), None


def bench_sau(B, C, H, W, device, reps, zoo=("nearest",), k=5, scale=2, naive_hw=(4, 8)):
    """SAU's Eq. 1 per window: lean (the models' path), lean through plain autograd, vectorized (the paper's
    unfold pipeline), naive (Eq. 1's loops, timed on a naive_hw crop and scaled by the pixel count) and the
    read-write floor; then the Table 12 upsamplers named in zoo at the same size, forward + backward."""
    torch.manual_seed(0)
    x = torch.randn(B, C, H, W, device=device, requires_grad=True)
    kern = torch.softmax(torch.randn(B, k * k, scale * H, scale * W, device=device), 1).requires_grad_()
    g = torch.randn(B, C, scale * H, scale * W, device=device)

    def measure(f, xs=x, ks=kern, gs=g, reps=reps, memory=True):
        def step():
            xs.grad = ks.grad = None
            f(xs, ks).backward(gs)
        t, m = time_it(step, device, reps), peak_memory(step, device) if memory else None
        xs.grad = ks.grad = None
        return t, m

    floor = measure(lambda a, b: _ReadWriteFloor.apply(a, b, g.shape))
    h, w = min(H, naive_hw[0]), min(W, naive_hw[1])
    xc = x.detach()[:, :, :h, :w].clone().requires_grad_()
    kc = kern.detach()[:, :, :scale * h, :scale * w].clone().requires_grad_()
    rows = []
    for window in sau.WINDOWS:
        group = f"SAU layer ({window} window) B={B} C={C} {H}x{W}->{scale * H}x{scale * W}"
        rows.append((group, "floor: read x, kernels; write output (fwd and bwd)", *floor, "same bytes, no math",
                     "floor"))
        for name, impl, role in (("lean", "lean", "fast"), ("vectorized", "vectorized", None)):
            t, m = measure(lambda a, b: sau.sau_upsample(a, b, scale, window, impl))
            rows.append((group, f"sau_upsample {name}", t, m, "", role))
        t, m = measure(lambda a, b: sau._sau_lean(a, b, scale, k, window, autograd_function=False))
        rows.append((group, "sau_upsample lean, plain autograd", t, m, "no hand-written backward", None))
        t, _ = measure(lambda a, b: sau.sau_upsample(a, b, scale, window, "naive"), xc, kc,
                       g[:, :, :scale * h, :scale * w], reps=1, memory=False)
        rows.append((group, "sau_upsample naive", t * (H * W) / (h * w), None,
                     f"extrapolated x(HW/hw) from {h}x{w}", None))
    group = f"Table 12 upsamplers B={B} C={C} {H}x{W}->{scale * H}x{scale * W}"
    rows.append((group, "floor: read x, kernels; write output (fwd and bwd)", *floor, "", "floor"))
    for name in zoo:
        m = sau.make_upsampler(name, C, scale).to(device)
        t, mem = measure(lambda a, b: m(a))
        rows.append((group, f"zoo {name}", t, mem, f"{gaugan.count_params(m):,} params",
                     "fast" if name == "nearest" else None))
    return rows


def label_map(B, H, W, num_classes, present, block=8, seed=0):
    """A blocky label map (B, H, W) using `present` of the num_classes classes (each appears at least once)."""
    g = torch.Generator().manual_seed(seed)
    classes = torch.randperm(num_classes, generator=g)[:present]
    cells = torch.randint(0, present, (B, H // block, W // block), generator=g)
    cells.view(-1)[:present] = torch.arange(present)
    return classes[cells].repeat_interleave(block, 1).repeat_interleave(block, 2)


def bench_classes(B, C, H, W, device, reps, settings=((35, 10), (150, 10))):
    """Per-class generation, forward + backward, for each (classes N, present K): LGGAN's ClassGenerator (Eq. 2:
    naive loop over N, vectorized grouped conv over K, pixel) and ECGAN's ClassSpecificGenerator (Eqs. 6, 7:
    naive loop, vectorized over K), each beside one class's convs on F (what 'pixel' costs at best, and the
    per-class unit that 'vectorized' pays K times)."""
    rows = []
    for N, K in settings:
        torch.manual_seed(0)
        feat = torch.randn(B, C, H, W, device=device, requires_grad=True)
        masks = F.one_hot(label_map(B, H, W, N, K), N).permute(0, 3, 1, 2).float().to(device)

        def measure(f):
            def step():
                feat.grad = None
                f().sum().backward()
            return time_it(step, device, reps), peak_memory(step, device)

        lg = lggan.ClassGenerator(N, C).to(device)
        group = f"per-class generation, LGGAN G_l B={B} C={C} {H}x{W}, {N} classes, {K} present"
        pad = lambda: F.pad(feat, (3, 3, 3, 3), mode="reflect")
        rows.append((group, "floor: one class's 7x7 conv", *measure(lambda: F.conv2d(pad(), lg.weight[0], lg.bias[0])),
                     "", "floor"))
        for impl in lggan.IMPLS:
            lg.impl = impl
            rows.append((group, impl, *measure(lambda: lg(feat, masks)[0]), "", "fast" if impl == "pixel" else None))
        ec = ecgan.ClassSpecificGenerator(N, C).to(device)
        group = f"per-class generation, ECGAN G_c B={B} C={C} {H}x{W}, {N} classes, {K} present"

        def one_class():
            x, i = feat, torch.zeros(1, dtype=torch.long, device=device)
            for j in range(len(ec.weight)):
                w, b = ec.layer(j, i)
                x = F.conv2d(F.leaky_relu(x, 0.2), w[0], b[0], padding=1)
            return x
        rows.append((group, "floor: one class's conv stack", *measure(one_class), "", "floor"))
        for impl in ecgan.CLASS_IMPLS:
            ec.impl = impl
            rows.append((group, impl, *measure(lambda: ec(feat, masks)[0]), "",
                         "fast" if impl == "vectorized" else None))
    return rows


def bench_contrastive(device, reps, anchors=1024, naive_anchors=256, dim=256, classes=20):
    """Eq. 5 forward + backward at `anchors` anchors: vectorized, naive (its ~anchors^2 Python steps timed on
    naive_anchors anchors of the same class mix, scaled by (anchors / naive_anchors)^2) and the floor, the
    anchors x anchors similarity matmul alone."""
    torch.manual_seed(0)
    labels = torch.arange(classes, device=device).repeat_interleave(-(-anchors // classes))[:anchors]
    emb = torch.randn(anchors, dim, device=device, requires_grad=True)
    group = f"contrastive Eq. 5, {anchors} anchors, {dim}-d"

    def step(f):
        def run():
            emb.grad = None
            f().backward()
        return run
    vec = step(lambda: ecgan.pixel_contrastive_loss(emb, labels, 0.1, "vectorized"))
    floor = step(lambda: (emb @ emb.t()).sum())
    m = min(naive_anchors, anchors)
    sub = labels if m == anchors else labels[torch.linspace(0, anchors - 1, m).long()]
    naive = step(lambda: ecgan.pixel_contrastive_loss(emb[:m], sub, 0.1, "naive"))
    return [(group, "floor: anchors x anchors matmul", time_it(floor, device, reps), peak_memory(floor, device), "",
             "floor"),
            (group, "vectorized", time_it(vec, device, reps), peak_memory(vec, device), "", "fast"),
            (group, "naive", time_it(naive, device, 1) * (anchors / m) ** 2, None,
             f"extrapolated x(anchors/{m})^2 from {m} anchors" if m != anchors else "", None)]


def bench_similarity(device, reps, sizes, N=35, chunk=1024, full=False):
    """Eq. 3 forward + backward per ((B, H, W), impls): naive (M x M maps), checkpoint (the previous chunked path),
    chunked (gradient block by block) and the floor, the two matmuls per block the chunked path cannot avoid
    (A'' rows and their gradient) with no elementwise work. full: one 256x512 image (M = 131,072) through the
    chunked code for two of its row blocks, time scaled to all of them."""
    torch.manual_seed(0)
    rows = []
    for (B, H, W), impls in sizes:
        probs = torch.randn(B, N, H, W, device=device).softmax(1).requires_grad_()
        target = F.one_hot(torch.randint(0, N, (B, H, W), device=device), N).permute(0, 3, 1, 2).float()
        group = f"similarity Eq. 3, B={B} {H}x{W} (M={H * W}), {N} classes"
        p = probs.detach().flatten(2)  # (B, N, M)

        def floor():
            for pb in p:
                for r in range(0, pb.shape[1], chunk):
                    q = pb[:, r:r + chunk].t() @ pb     # (chunk, M) rows of A''
                    pb @ q.t()                          # their gradient's matmul
        rows.append((group, "floor: two matmuls per row block", time_it(floor, device, reps),
                     peak_memory(floor, device), "no elementwise work", "floor"))
        for impl in impls:
            def fn(impl=impl):
                probs.grad = None
                ecgan.similarity_loss(probs, target, impl, chunk=chunk).backward()
            # medians of 5 where cheap: the ratios move with a shared machine's load
            r = max(reps, 5) if H * W <= 4096 else reps
            rows.append((group, impl, time_it(fn, device, r), peak_memory(fn, device), "",
                         "fast" if impl == "chunked" else None))
    if full:
        M = 256 * 512
        p = torch.randn(N, M, device=device).softmax(0)
        lab = torch.randint(0, N, (M,), device=device)
        fn = lambda: ecgan._sim_blocks(p, lab, 1e-6, (0, chunk), chunk, need_grad=True)
        t = time_it(fn, device, 1) * (M // chunk) / 2
        rows.append((f"similarity Eq. 3, B=1 256x512 (M={M}), {N} classes", "chunked", t, peak_memory(fn, device),
                     f"extrapolated from 2/{M // chunk} row blocks; naive: {M * M * 4 / 2**30:.0f} GiB per M x M "
                     f"float32 map", "fast"))
    return rows


def bench_bank(args, amp_dtype, rounds=5):
    """ECGAN's training step (train_step) with its memory bank full (the steady state) and without one
    (bank_per_class=0), timed in turn for `rounds` rounds, medians, so that a shared machine's load falls on
    both alike."""
    (_, module, cfg), = [c for c in model_configs(args.preset, args.ups) if c[0] == "ecgan"]
    H, W = args.size
    info, batch = make_batch(args.batch, H, W, args.device, edges=True)
    runs = {}
    for name, c in ((f"with bank ({cfg.bank_per_class}/class, full)", cfg),
                    ("without bank", dataclasses.replace(cfg, bank_per_class=0))):
        nets = build(module, c, info, args.device)
        G = nets[0]
        if c.bank_per_class > 0:
            G.bank_emb.copy_(F.normalize(torch.randn_like(G.bank_emb), dim=2))
            G.bank_count.fill_(c.bank_per_class)
        step = lambda c=c, nets=nets: train_step(module, c, nets, batch, amp_dtype, args.device)
        step()  # warm-up
        runs[name] = (step, [])
    for _ in range(rounds):
        for step, times in runs.values():
            _sync(args.device)
            t0 = time.perf_counter()
            step()
            _sync(args.device)
            times.append(time.perf_counter() - t0)
    group = f"ECGAN step, memory bank, preset {args.preset} {H}x{W} batch {args.batch}"
    return [(group, name, sorted(times)[len(times) // 2], None, f"G+D step, median of {rounds}",
             "fast" if name == "without bank" else None) for name, (_, times) in runs.items()]


def bench_data(args):
    """What train.py does per step outside the models (DataLoader workers overlap the first part); forward only."""
    B, (H, W), dev = args.batch, args.size, args.device
    ds = data.make_dataset("synthetic", size=(H, W))
    load = lambda: torch.utils.data.default_collate([ds[i] for i in range(B)])
    raw = load()
    return [(f"data B={B} {H}x{W}", name, time_it(fn, dev, args.reps), None, "forward only", None)
            for name, fn in ((f"{B} synthetic samples + collate", load),
                             ("prepare_batch (one-hot, instance edges)", lambda: data.prepare_batch(raw, ds.info, dev)),
                             ("prepare_batch, edges=True (+ Canny, ECGAN)",
                              lambda: data.prepare_batch(raw, ds.info, dev, edges=True)))]


def component_rows(args, amp_dtype=None):
    """Every component group at the sizes args asks for: rows (group, impl, seconds, bytes, note, role)."""
    q, dev, reps = args.quick, args.device, args.reps
    B, C, H, W = args.sau_size
    zoo = sau.UPSAMPLERS if args.sau_zoo else ("nearest",)
    rows = bench_sau(B, C, H, W, dev, reps, zoo=zoo)
    B, C, H, W = (2, 8, 32, 64) if q else (args.batch, train.PRESETS["cpu"]["ngf"], *args.size)
    rows += bench_classes(B, C, H, W, dev, reps)
    rows += bench_contrastive(dev, reps, *((128, 32) if q else (1024, 256)))
    sizes = ((((2, 16, 32), ("naive", "checkpoint", "chunked")),) if q else
             (((2, 32, 64), ("naive", "checkpoint", "chunked")), ((2, 64, 128), ("checkpoint", "chunked"))))
    rows += bench_similarity(dev, reps, sizes, chunk=256 if q else 1024, full=not q)
    rows += bench_bank(args, amp_dtype, rounds=reps if q else max(reps, 5))
    rows += bench_data(args)
    return rows


def format_components(rows):
    """Markdown lines: each row's time and peak, its ratio to its group's fast path and floor, and its note."""
    fast = {g: t for g, _, t, _, _, role in rows if role == "fast"}
    floor = {g: t for g, _, t, _, _, role in rows if role == "floor"}
    ratio = lambda t, base: f"{t / base:.2f}" if base else "-"
    return [f"| {g} | {impl} | {t * 1e3:.1f} | {'-' if m is None else f'{m / 2**20:.1f}'} | "
            f"{ratio(t, fast.get(g))} | {ratio(t, floor.get(g))} | {note} |" for g, impl, t, m, note, _ in rows]


def sau_floor_lines(rows):
    """The SAU target: lean forward + backward within SAU_FLOOR_TARGET x its floor, per window."""
    out = []
    for g, impl, t, _, _, role in rows:
        if g.startswith("SAU layer") and role == "fast":
            floor = next(t2 for g2, _, t2, _, _, r2 in rows if g2 == g and r2 == "floor")
            met = "met" if t / floor <= SAU_FLOOR_TARGET else "MISSED"
            out.append(f"{g}: lean forward+backward = {t / floor:.1f}x the read-write floor "
                       f"(target <= {SAU_FLOOR_TARGET:g}x: {met})")
    return out


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
    problem = device_problem(args.device, allow_auto=False)
    if problem:
        ap.error(f"--device {problem}")
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
                    help="SAU layer input (default 4 32 32 64; on CUDA 4 256 64 128; quick 2 8 16 32)")
    ap.add_argument("--sau_zoo", action="store_true", help="also time every Table 12 upsampler at --sau_size "
                    "(default: nearest only; 'attention' holds a (HW)^2 map)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: PyTorch's default; on a shared "
                    "machine use 1: the SAU lean path's many small ops stall on oversubscribed threads)")
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
        rows = component_rows(args, amp_dtype)
        emit("", "| component | impl | fwd+bwd ms | peak MiB | x fast | x floor | note |",
             "|---|---|---|---|---|---|---|")
        emit(*format_components(rows))
        emit("", *sau_floor_lines(rows))

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
