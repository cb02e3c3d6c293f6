"""
One training script for every model in this repo: GauGAN (the shared backbone), LGGAN / LGGAN++ and ECGAN.

    python train.py --model lggan                       # one CPU or GPU, built-in synthetic scenes
    torchrun --nproc_per_node=8 train.py --model ecgan --dataset cityscapes --dataroot /data/cityscapes

Every model file (gaugan.py, lggan.py, ecgan.py) exposes the same five names, so this loop knows nothing about
any one model:  Config (a dataclass), build(cfg, info) -> (G, D), g_step, d_step, sample. What a model needs
beyond them it says through optional names in its file (absent: nothing): needs_edges(cfg) (real Canny edges in
the batch), needs_segmenter(cfg) (a frozen segmenter read from cfg.segmenter; "" and this script trains one on the
real images first) and TASK_DEFAULTS ({task: {field: value}}, the paper's settings for a task).
Command-line flags are generated from TrainConfig and from the chosen model's Config: a new dataclass field is a
new flag. The resolved configuration is written to <out>/config.json.

Order of one iteration (as in GauGAN): a generator step, then a discriminator step; TTUR learning rates from the
model config; linear decay to zero over the last part of training.
"""
import argparse
import dataclasses
import inspect
import json
import math
import os
import pickle
import random
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, asdict, fields

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

import data
import gaugan

MODELS = {"gaugan": gaugan}
try:  # the model files land one by one; train.py works with whichever are present
    import lggan
    MODELS["lggan"] = lggan
except ImportError as e:  # pragma: no cover - only while lggan.py is missing
    if "lggan" not in str(e):
        raise
try:
    import ecgan
    MODELS["ecgan"] = ecgan
except ImportError as e:  # pragma: no cover
    if "ecgan" not in str(e):
        raise


class CheckpointError(RuntimeError):
    pass


class ConfigError(ValueError):
    pass


@dataclass
class TrainConfig:
    model: str = "lggan"          # gaugan | lggan | ecgan
    dataset: str = "synthetic"    # synthetic (built in, no download) or a data.py loader name
    dataroot: str = ""            # root folder of a real dataset
    label_dir: str = ""           # deepfashion / celebamask / custom: folder of label PNGs
    image_dir: str = ""           # ... and of the matching images
    num_classes: int = 0          # custom: number of classes
    task: str = "semantic"        # semantic | crossview (LGGAN Sec. 4.1.1)
    height: int = 0               # 0: the dataset's default (cpu preset: 64 high at the dataset's aspect, e.g.
    width: int = 0                # synthetic 64x128, COCO 64x64; paper preset: 256x256, Cityscapes 256x512)
    preset: str = "cpu"           # cpu: narrow networks that train in minutes on a CPU; paper: the papers' widths
    batch_size: int = 4           # per process; the global batch is batch_size * world size
    steps: int = 2000             # optimiser steps (G and D once each)
    decay_from: float = 0.5       # linear decay of both learning rates to 0 starting at this fraction of steps
    workers: int = 1
    out: str = ""                 # run folder, default runs/<model>
    overwrite: bool = False       # allow writing into an existing run folder without --resume
    resume: bool = False          # continue from <out>/ckpt_latest.pt (or ckpt_prev.pt if the latest is broken)
    stop_after: int = 0           # end this process after N steps in total, for time-sliced jobs (0: run to --steps)
    sample_every: int = 200
    ckpt_every: int = 500
    num_samples: int = 8          # rows in the sample grid (a fixed validation batch)
    seed: int = 0
    device: str = "auto"          # auto | cpu | cuda
    amp: str = "auto"             # auto (bf16 on GPU, off on CPU) | bf16 | fp16 | none
    compile: bool = False         # torch.compile G and D
    vgg: str = ""                 # VGG19 weights (torchvision layout): a path or URL; "" or off: no perceptual loss
    vgg_input: str = "imagenet"   # VGG input: "imagenet" statistics (ours) | "raw" [-1, 1] (GauGAN's public code)
    segmenter_steps: int = 600    # a model's own segmenter (ECGAN's G_l), when none is given: its training steps
    cache_dir: str = ""           # ... and where it is cached, keyed by data, size and steps ("": <out>/../cache)
    max_bad_steps: int = 10       # stop after this many non-finite losses in a row
    progress: bool = True         # tqdm bar


# Narrow networks for CPU runs: a field here applies only where the model config has it and the user did not
# set it on the command line. lr_g = lr_d: at these widths, and with no VGG weights offline, the papers' TTUR G
# rate (1e-4) still gave noisy texture after 900 LGGAN steps, while 4e-4 gave recognisable scenes (cars,
# trees, road, buildings) after 400-450 steps of GauGAN and LGGAN (one seed each, 64x128).
PRESETS = {
    "cpu": dict(ngf=16, ndf=16, spade_hidden=32, n_res=3, proj_dim=32, z_dim=32, enc_nf=16, lr_g=4e-4),
    "paper": dict(),
}


# ----------------------------------------------------------------------------------------------------------------
# command line from dataclasses

def _str2bool(s):
    if s.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if s.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {s!r}")


def _field_comments(cls):
    """The `# comment` after each dataclass field becomes its --help text."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s+(\w+)\s*:[^#\n]*#(.*)$", src, re.M)}


def _add_fields(parser, cls, group_title):
    group = parser.add_argument_group(group_title)
    comments = _field_comments(cls)
    for f in fields(cls):
        default = _default(f)
        flag = "--" + f.name
        text = f"{comments.get(f.name, '')} (default: {default!r})".strip().replace("%", "%%")
        if isinstance(default, bool):
            group.add_argument(flag, type=_str2bool, nargs="?", const=True, default=default, metavar="BOOL",
                               help=text)
        elif isinstance(default, (int, float, str)):
            group.add_argument(flag, type=type(default), default=default, help=text)
        elif isinstance(default, (tuple, list)):
            kind = type(default[0]) if len(default) else str
            group.add_argument(flag, type=kind, nargs="*", default=list(default), help=text)
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: unsupported field type for the command line")


def parse_args(argv=None):
    """Two passes: --model picks which model dataclass the remaining flags come from."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model", default=TrainConfig.model)
    known, _ = pre.parse_known_args(argv)
    if known.model not in MODELS:
        raise ConfigError(f"unknown model {known.model!r}; choose one of {sorted(MODELS)}")
    module = MODELS[known.model]
    parser = data.ArgumentParser(description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_fields(parser, TrainConfig, "training")
    clash = {f.name for f in fields(TrainConfig)} & {f.name for f in fields(module.Config)}
    if clash:
        raise ConfigError(f"{module.__name__}.Config fields clash with TrainConfig: {sorted(clash)}")
    _add_fields(parser, module.Config, f"model ({known.model}.Config)")
    args = parser.parse_args(argv)
    given = {a.split("=")[0][2:] for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
    tcfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    mcfg = module.Config(**{f.name: _restore_type(getattr(args, f.name), f)
                            for f in fields(module.Config)})
    if tcfg.preset not in PRESETS:
        raise ConfigError(f"unknown preset {tcfg.preset!r}; choose one of {sorted(PRESETS)}")
    for name, value in PRESETS[tcfg.preset].items():
        if hasattr(mcfg, name) and name not in given:
            setattr(mcfg, name, value)
    # GauGAN's and ECGAN's Eq. 10 losses carry a weight-10 VGG19 term: the paper preset does not drop it silently
    if tcfg.preset == "paper" and not tcfg.vgg:
        raise ConfigError(f"--preset paper needs --vgg: the papers' loss has a weight-10 VGG19 perceptual term; "
                          f"give torchvision's VGG19 weights as a path or URL (e.g. --vgg {gaugan.VGG19_URL}), or "
                          f"--vgg off to train without it")
    if tcfg.vgg == "off":  # said on purpose: off, like no --vgg under the cpu preset
        tcfg.vgg = ""
    if tcfg.task not in ("semantic", "crossview"):
        raise ConfigError(f"unknown task {tcfg.task!r}; choose semantic or crossview")
    if tcfg.dataset not in data.NAMES:
        raise ConfigError(f"unknown dataset {tcfg.dataset!r}; choose one of {', '.join(data.NAMES)}")
    check_ranges(tcfg, mcfg)
    name = "synthetic_crossview" if tcfg.task == "crossview" and tcfg.dataset == "synthetic" else tcfg.dataset
    tcfg.height, tcfg.width = data.default_size(name, tcfg.height, tcfg.width, small=tcfg.preset == "cpu")
    # a task may come with its own paper defaults (LGGAN cross-view: Adam 2e-4, betas (0.5, 0.999), ...)
    for name, value in getattr(module, "TASK_DEFAULTS", {}).get(tcfg.task, {}).items():
        if name not in given:
            setattr(mcfg, name, value)
    return tcfg, mcfg


# Model config fields with a lower bound (> 0 or >= 0); strings are checked by a dry build (validate_run).
_POSITIVE = ("ngf", "ndf", "spade_hidden", "z_dim", "num_D", "n_layers_D", "n_layers", "proj_dim", "sim_stride",
             "sim_chunk", "max_anchors", "max_per_class", "temperature", "lr_g", "lr_d", "enc_nf")


def check_ranges(tcfg, mcfg):
    """A ConfigError naming the flag, its value and what is expected, before anything is read or written."""
    def need(ok, name, expected):
        if not ok:
            value = getattr(tcfg, name) if hasattr(tcfg, name) else getattr(mcfg, name)
            raise ConfigError(f"--{name} {value!r}: expected {expected}")
    for name in ("height", "width"):
        need(getattr(tcfg, name) >= 0, name, "a positive size in pixels (0: the dataset's default)")
    for name in ("steps", "batch_size", "sample_every", "ckpt_every", "num_samples", "segmenter_steps",
                 "max_bad_steps"):
        need(getattr(tcfg, name) >= 1, name, "an integer >= 1")
    for name in ("workers", "stop_after", "seed", "num_classes"):
        need(getattr(tcfg, name) >= 0, name, "an integer >= 0")
    need(0 <= tcfg.decay_from <= 1, "decay_from", "a fraction of the steps in [0, 1]")
    need(tcfg.device in ("auto", "cpu", "cuda"), "device", "auto, cpu or cuda")
    need(tcfg.device != "cuda" or torch.cuda.is_available(), "device", "a visible CUDA device (none found)")
    need(tcfg.amp in ("auto", "bf16", "fp16", "none"), "amp", "auto, bf16, fp16 or none")
    for f in fields(mcfg):
        v = getattr(mcfg, f.name)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if f.name in _POSITIVE:
            need(math.isfinite(v) and v > 0, f.name, "a number > 0")
        elif f.name.startswith("lambda") or f.name == "lam":
            need(math.isfinite(v) and v >= 0, f.name, "a loss weight >= 0")
        elif f.name in ("beta1", "beta2"):
            need(0 <= v < 1, f.name, "an Adam beta in [0, 1)")
        elif isinstance(v, int):
            need(v >= 0, f.name, "an integer >= 0")


def validate_run(tcfg, mcfg, module, info):
    """Before anything is written: the model builds at this size and with these settings (a dry build on the meta
    device, no memory), the VGG file loads, a given ECGAN --segmenter file loads. Returns the VGG (or None)."""
    import warnings
    dry = mcfg
    if model_needs(module, "needs_segmenter", mcfg):
        own = not mcfg.segmenter or _own_segmenter_path(mcfg, tcfg)  # trained by the run when absent
        if not own or os.path.exists(mcfg.segmenter):
            import segmenter_train
            try:
                segmenter_train.load_segmenter(mcfg.segmenter, info)
            except segmenter_train.EvalError as e:
                raise ConfigError(f"--segmenter: {e}") from None
        dry = dataclasses.replace(mcfg, segmenter="")  # an untrained one: the file is loaded (or trained) later
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            module.build(dry, info)
    except (ValueError, TypeError, KeyError, NotImplementedError, RuntimeError, ZeroDivisionError) as e:
        raise ConfigError(f"{tcfg.model} cannot be built for {info.name} at {info.height}x{info.width} with these "
                          f"settings: {_first_line(e)}") from None
    if tcfg.vgg_input not in gaugan.VGG_INPUTS:
        raise ConfigError(f"--vgg_input {tcfg.vgg_input!r}: expected one of {', '.join(gaugan.VGG_INPUTS)}")
    if not tcfg.vgg:
        return None
    try:
        return gaugan.load_vgg19(tcfg.vgg, tcfg.vgg_input)
    except (OSError, ValueError, RuntimeError) as e:
        raise ConfigError(f"--vgg {tcfg.vgg}: {_first_line(e)} (expected torchvision's vgg19 weights, a path or "
                          f"URL)") from None


def _own_segmenter_path(mcfg, tcfg):
    """True where ECGAN trains its own G_l into the run folder (no --segmenter given)."""
    out = tcfg.out or os.path.join("runs", tcfg.model)
    return mcfg.segmenter == os.path.join(out, "segmenter.pt")


def _restore_type(value, f):
    return tuple(value) if isinstance(_default(f), tuple) else value


# ----------------------------------------------------------------------------------------------------------------
# checkpoints

def _write_synced(obj, path):
    with open(path, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())


def _write_temp(obj, tmp):
    """_write_synced, removing the half-written file if the write fails (full disk, an exception raised into it)."""
    try:
        _write_synced(obj, tmp)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_save(obj, path):
    """Write to a temporary file in the same folder, flush to disk, then rename: a reader (or a crash) only ever
    sees the old file or the complete new one."""
    tmp = f"{path}.tmp{os.getpid()}"
    _write_temp(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(state, out):
    """Atomic, keeping the last two: ckpt_latest.pt and ckpt_prev.pt. A kill between the two renames leaves
    ckpt_prev.pt (and the finished temp file), which find_resume_checkpoint falls back to."""
    latest, prev = os.path.join(out, "ckpt_latest.pt"), os.path.join(out, "ckpt_prev.pt")
    tmp = f"{latest}.tmp{os.getpid()}"
    _write_temp(state, tmp)
    if os.path.exists(latest):
        os.replace(latest, prev)
    os.replace(tmp, latest)
    for name in os.listdir(out):  # half-written files of a writer that was killed (another pid): never complete
        if name.startswith("ckpt_latest.pt.tmp"):
            os.remove(os.path.join(out, name))


CKPT_KEYS = ("model", "model_cfg", "train_cfg", "info", "G", "D", "step")


def load_checkpoint(path, map_location="cpu"):
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise CheckpointError(f"{path}: cannot read checkpoint, it is truncated, corrupt or not a checkpoint "
                                  f"of this repo (UnpicklingError: {_first_line(e)})") from None
        # weights_only refuses pickled objects: loading them could run code
        why = next((line.strip().split(". ")[0] for line in str(e).splitlines() if "WeightsUnpickler" in line), "")
        raise CheckpointError(f"{path}: refused, the checkpoint holds pickled Python objects that loading with "
                              f"weights_only=True does not run ({why[:200]})") from None
    except Exception as e:  # truncated zip, wrong format...
        raise CheckpointError(f"{path}: cannot read checkpoint, it is truncated, corrupt or not a checkpoint of "
                              f"this repo ({type(e).__name__}: {_first_line(e)})") from None
    missing = [k for k in CKPT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: not a training checkpoint of this repo (missing {missing})")
    if ckpt["model"] not in MODELS:
        raise CheckpointError(f"{path}: checkpoint of model {ckpt['model']!r}, which this repo does not know")
    return ckpt


def _first_line(e):
    return (str(e).splitlines() or [""])[0][:200]  # an empty file raises EOFError with no message


def find_resume_checkpoint(out, say=print):
    """The newest loadable checkpoint in a run folder, falling back to the previous one."""
    errors = []
    for name in ("ckpt_latest.pt", "ckpt_prev.pt"):
        path = os.path.join(out, name)
        if os.path.exists(path):
            try:
                ckpt = load_checkpoint(path)
            except CheckpointError as e:
                errors.append(str(e))
                continue
            for err in errors:  # the user should know why steps are redone
                say(f"skipping {err}")
            return ckpt, path
    if errors:
        raise CheckpointError("no loadable checkpoint: " + "; ".join(errors))
    return None, None


def config_from_dict(cls, d, what):
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise CheckpointError(f"{what}: fields {unknown} are not in {cls.__name__}")
    f_types = {f.name: f for f in fields(cls)}
    return cls(**{k: _restore_type(v, f_types[k]) for k, v in d.items()})


def _default(f):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def info_from_dict(d):
    return data.DataInfo(**d)


def build_from_checkpoint(ckpt, device="cpu"):
    """Rebuild (module, model cfg, DataInfo, G, D) from a checkpoint dict, weights loaded, in eval mode."""
    module = MODELS[ckpt["model"]]
    cfg = config_from_dict(module.Config, ckpt["model_cfg"], f"checkpoint of {ckpt['model']}")
    info = info_from_dict(ckpt["info"])
    G, D = module.build(cfg, info)
    for net, key in ((G, "G"), (D, "D")):
        try:
            net.load_state_dict(ckpt[key])
        except RuntimeError as e:
            raise CheckpointError(f"checkpoint {key} weights do not fit {ckpt['model']}.build(config): "
                                  f"{str(e).splitlines()[0][:300]}") from None
    return module, cfg, info, G.to(device).eval(), D.to(device).eval()


def config_differences(a: dict, b: dict):
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def describe_differences(ckpt_dict: dict, now: dict):
    return ", ".join(f"{k}: checkpoint {ckpt_dict.get(k)!r}, now {now.get(k)!r}"
                     for k in config_differences(ckpt_dict, now))


# ----------------------------------------------------------------------------------------------------------------
# random state, for bit-exact resume

def get_rng_state():
    """Plain lists and numbers only, so the state both pickles across ranks and loads with weights_only=True."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state().tolist(), "python": random.getstate(),
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state):
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    random.setstate(_tuplify(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


# ----------------------------------------------------------------------------------------------------------------
# stops: `timeout`, scancel, systemd and torchrun send SIGTERM, a terminal's Ctrl-C sends SIGINT, each to the whole
# process group, so the DataLoader workers get it too. Only the main process acts: it finishes the step, saves and
# exits 0. torch's own worker SIGTERM handler dies on any signal not sent by the parent, and the main process then
# failed mid-step ("DataLoader worker (pid N) is killed by signal: Terminated") with nothing saved.

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _worker_ignores_stops(worker_id):
    """worker_init_fn: a worker leaves the stops sent to the group to the main process. It keeps them blocked and one
    thread takes them: a SIGTERM from the main process itself (the DataLoader, or exit, ending a worker that did not
    finish by itself) still ends it, as torch's own handler does; any other stop is dropped."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # already blocked since birth (_start_workers)
    parent = os.getppid()

    def take_stops():
        while True:
            info = signal.sigwaitinfo(STOP_SIGNALS)
            if info.si_signo == signal.SIGTERM and info.si_pid == parent:
                os._exit(0)
    threading.Thread(target=take_stops, name="stop-filter", daemon=True).start()


def _start_workers(loader):
    """iter(loader) with the stop signals blocked: workers are born blocking them (before torch installs its worker
    handlers) and keep them blocked (_worker_ignores_stops); the main process gets any pending stop when the old
    mask returns."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _error_text(e):
    """An error's message; one re-raised from a DataLoader worker ("Caught X in DataLoader worker ...\\n<traceback>")
    carries the original as the traceback's last line."""
    msg = str(e).strip()
    if msg.startswith("Caught "):
        msg = msg.splitlines()[-1].split(": ", 1)[-1]
    return msg


# ----------------------------------------------------------------------------------------------------------------

def all_finite(loss, world):
    """True on every rank iff the loss is finite on every rank (ranks must skip an update together)."""
    ok = torch.isfinite(loss.detach()).all().float().reshape(1)
    if world > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def lr_factor(step, tcfg):
    """Constant, then linear decay to 0 over the last (1 - decay_from) of training (GauGAN: 100 + 100 epochs)."""
    start = int(tcfg.steps * tcfg.decay_from)
    if step < start:
        return 1.0
    return max(0.0, (tcfg.steps - step) / max(1, tcfg.steps - start))


def label_generator_cache(tcfg, info, n_images):
    """Where ECGAN's own G_l is cached: one file per dataset (name, root, folders), size, image count and steps,
    so every run on the same data (each Table 3 row) trains it once."""
    import hashlib
    key = {"dataset": info.name, "task": info.task, "height": info.height, "width": info.width,
           "steps": tcfg.segmenter_steps, "images": n_images, "num_classes": info.num_classes, "seed": 0,
           "roots": [os.path.abspath(p) if p else "" for p in (tcfg.dataroot, tcfg.label_dir, tcfg.image_dir)]}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    out = os.path.abspath(tcfg.out or os.path.join("runs", tcfg.model))
    folder = tcfg.cache_dir or os.path.join(os.path.dirname(out), "cache")
    return os.path.join(folder, f"G_l_{info.name}_{info.height}x{info.width}_{tcfg.segmenter_steps}steps_{digest}.pt")


def own_label_generator(tcfg, info, train_set, device, dest, say=print):
    """ECGAN without --segmenter: G_l is the built-in segmenter trained on the real training images (never on
    generated ones), taken from the cache when a run on the same data trained it before; copied into the run
    folder (dest) so that the run keeps its own G_l."""
    import shutil
    import segmenter_train
    cache = label_generator_cache(tcfg, info, len(train_set))
    try:
        segmenter_train.load_segmenter(cache, info)
        say(f"G_l: the built-in segmenter cached at {cache} ({tcfg.segmenter_steps} steps on these images)")
    except segmenter_train.EvalError:  # absent (or damaged): train it
        say(f"G_l: training the built-in segmenter on {len(train_set)} real {info.name} images for "
            f"{tcfg.segmenter_steps} steps before step 1 (once: cached at {cache} for the next run on this data; "
            f"--segmenter FILE skips it)")
        t0 = time.time()
        segmenter_train.train_segmenter(train_set, info, steps=tcfg.segmenter_steps, device=device, out_path=cache,
                                        progress=tcfg.progress, say=say)
        say(f"G_l trained in {time.time() - t0:.0f}s")
    tmp = f"{dest}.tmp{os.getpid()}"
    shutil.copyfile(cache, tmp)
    os.replace(tmp, dest)  # atomic: a run folder never holds half a G_l


def make_datasets(tcfg):
    name = tcfg.dataset
    if tcfg.task == "crossview" and name == "synthetic":
        name = "synthetic_crossview"
    kw = dict(dataroot=tcfg.dataroot or None, size=(tcfg.height, tcfg.width))
    if tcfg.label_dir or tcfg.image_dir:  # folder pairs: one folder, no validation split of its own
        kw.update(label_dir=tcfg.label_dir or None, image_dir=tcfg.image_dir or None,
                  num_classes=tcfg.num_classes or None)
    # training jitter (random crop, flip) drawn from (seed, epoch, index): see data.LOAD_RATIO
    train_set = data.make_dataset(name, split="train", jitter_seed=tcfg.seed, **kw)
    if tcfg.label_dir or tcfg.image_dir:
        return train_set, data.make_dataset(name, split="train", crop=False, flip=False, **kw)
    try:
        val_set = data.make_dataset(name, split="val", **kw)
    except data.DatasetError:  # datasets without a validation split: sample from training images, as tested
        val_set = data.make_dataset(name, split="train", crop=False, flip=False, **kw)
    return train_set, val_set


# ----------------------------------------------------------------------------------------------------------------
# one training process: set-up, one step, checkpoints and samples; train() below is the loop

@dataclass
class Run:
    """What one training process holds between steps; the functions below read it and train() advances it."""
    tcfg: TrainConfig
    mcfg: object
    module: object               # the model file (gaugan | lggan | ecgan): its five names do the model's work
    out: str                     # run folder
    rank: int
    world: int
    device: torch.device
    info: data.DataInfo
    train_set: object
    sampler: DistributedSampler
    per_epoch: int               # batches per epoch and process
    fixed: dict                  # the fixed validation batch of the sample grid (dcgan's fixed noise)
    G: torch.nn.Module           # G and D as trained: compiled and DDP-wrapped where asked
    D: torch.nn.Module
    G_raw: torch.nn.Module       # unwrapped references: checkpoints carry no module./_orig_mod. prefixes
    D_raw: torch.nn.Module
    D_for_g: torch.nn.Module     # the D that G's loss goes through (see build_models)
    opt_G: torch.optim.Optimizer
    opt_D: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp_dtype: object            # torch.bfloat16 | torch.float16 | None
    vgg: object                  # VGG19 features for the perceptual loss, or None
    step: int = 0                # optimiser steps done
    saved_step: int = -1         # the step of the last checkpoint this process wrote (or resumed from)
    bad_in_a_row: int = 0        # non-finite losses in a row
    skipped: int = 0             # non-finite losses in all
    loss_terms: list = dataclasses.field(default_factory=list)  # the G and D loss terms, from the first step

    @property
    def master(self):
        return self.rank == 0

    def say(self, *args, **kw):  # rank 0 alone prints
        if self.master:
            print(*args, **kw)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)


def model_needs(module, what, mcfg):
    """A model's optional hook needs_edges(cfg) / needs_segmenter(cfg); a model without one needs neither."""
    return getattr(module, what, lambda cfg: False)(mcfg)


def start_processes(tcfg):
    """(rank, world size, device). torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; plain `python train.py` is a world
    of one."""
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    use_cuda = tcfg.device == "cuda" or (tcfg.device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if world > 1:
        if use_cuda:
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            # torchrun keeps its store across elastic restarts: without a prefix per attempt a restarted rank can
            # read the address a dead rank published and fail to connect ("connectFullMesh ... refused").
            store, _, _ = next(dist.rendezvous("env://"))
            store = dist.PrefixStore(f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}/", store)
            dist.init_process_group(backend="nccl" if use_cuda else "gloo", store=store, rank=rank, world_size=world)
    if world > 1 and not use_cuda:  # CPU processes share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    return rank, world, device


def open_run_folder(tcfg, mcfg, out, say):
    """(checkpoint, its path) to resume from, or (None, None); refuses a folder that holds another run."""
    if not tcfg.resume:
        # config.json too: a run killed before its first checkpoint still owns its folder
        if (os.path.isdir(out) and any(n.startswith("ckpt") or n == "config.json" for n in os.listdir(out))
                and not tcfg.overwrite):
            raise ConfigError(f"{out} already holds a run; pass --resume to continue it or --overwrite to replace it")
        return None, None
    ckpt, path = find_resume_checkpoint(out, say)
    if ckpt is None:
        say(f"--resume: no checkpoint in {out}, starting from scratch")
        return None, None
    say(f"resuming from {path} at step {ckpt['step']}")
    if ckpt["model"] != tcfg.model:
        raise CheckpointError(f"{path}: checkpoint is of model {ckpt['model']!r}, not {tcfg.model!r}")
    if config_differences(ckpt["model_cfg"], asdict(mcfg)):
        raise CheckpointError(f"{path}: model config differs from the command line in "
                              f"{describe_differences(ckpt['model_cfg'], asdict(mcfg))}")
    return ckpt, path


def build_models(tcfg, mcfg, module, info, device, world, ckpt):
    """G, D (as trained), their raw references, the D that G's loss goes through, optimisers, AMP, and the step,
    weights and optimiser states loaded from the checkpoint when resuming."""
    G, D = module.build(mcfg, info)
    G.to(device), D.to(device)
    opt_G = torch.optim.Adam([p for p in G.parameters() if p.requires_grad], lr=mcfg.lr_g,
                             betas=(mcfg.beta1, mcfg.beta2))
    opt_D = torch.optim.Adam(D.parameters(), lr=mcfg.lr_d, betas=(mcfg.beta1, mcfg.beta2))
    amp = tcfg.amp if tcfg.amp != "auto" else ("bf16" if device.type == "cuda" else "none")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    step = 0
    if ckpt is not None:
        G.load_state_dict(ckpt["G"]), D.load_state_dict(ckpt["D"])
        opt_G.load_state_dict(ckpt["opt_G"]), opt_D.load_state_dict(ckpt["opt_D"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        step = ckpt["step"]
    G_raw, D_raw = G, D
    if tcfg.compile:
        G, D = torch.compile(G), torch.compile(D)
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        G, D = DDP(G, device_ids=ids), DDP(D, device_ids=ids)
    # G's loss is computed through D_raw (no DDP): D's gradients from the G step are never used, so they are not
    # all-reduced; D's parameters are frozen during that step to skip computing them.
    D_for_g = D_raw if not tcfg.compile else D
    return dict(G=G, D=D, G_raw=G_raw, D_raw=D_raw, D_for_g=D_for_g, opt_G=opt_G, opt_D=opt_D, scaler=scaler,
                amp_dtype=amp_dtype, step=step)


def setup(tcfg: TrainConfig, mcfg):
    """Everything before step 1: processes, run folder, seeds, data, checks, G_l, models, optimisers, resume. The
    order is the random stream's: a resumed run draws exactly what a straight one does."""
    rank, world, device = start_processes(tcfg)
    say = print if rank == 0 else (lambda *a, **k: None)
    out = tcfg.out or os.path.join("runs", tcfg.model)
    module = MODELS[tcfg.model]
    # A model with a frozen segmenter and none given (ECGAN's G_l): the run trains one into its folder (below);
    # the path is set first, so that a resumed run's config matches the checkpoint's
    own_segmenter = model_needs(module, "needs_segmenter", mcfg) and not mcfg.segmenter
    if own_segmenter:
        mcfg.segmenter = os.path.join(out, "segmenter.pt")
    ckpt, path = open_run_folder(tcfg, mcfg, out, say)

    torch.manual_seed(tcfg.seed + rank)
    np.random.seed(tcfg.seed + rank)
    random.seed(tcfg.seed + rank)

    train_set, val_set = make_datasets(tcfg)
    info = train_set.info
    # Another dataset or size can have the same weight shapes (or not): either way it is not this run any more.
    if ckpt is not None and config_differences(ckpt["info"], asdict(info)):
        raise CheckpointError(f"{path}: dataset differs from the checkpoint's in "
                              f"{describe_differences(ckpt['info'], asdict(info))}")
    vgg = validate_run(tcfg, mcfg, module, info)  # bad settings and files fail here, before anything is written
    if rank == 0:
        os.makedirs(os.path.join(out, "samples"), exist_ok=True)
    # The segmenter is trained on real images only (never on generated ones), then frozen inside G.
    if own_segmenter:
        if rank == 0 and not os.path.exists(mcfg.segmenter):
            own_label_generator(tcfg, info, train_set, device, mcfg.segmenter, say)
        if world > 1:
            dist.barrier()

    models = build_models(tcfg, mcfg, module, info, device, world, ckpt)
    if vgg is None:
        say("VGG19 weights not given (--vgg PATH_OR_URL): the VGG perceptual term (weight 10 in GauGAN, "
            "ECGAN's Eq. 10 and LGGAN's public code) is not in the loss")
    else:
        vgg.to(device)
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=tcfg.seed,
                                 drop_last=True)
    run = Run(tcfg, mcfg, module, out, rank, world, device, info, train_set, sampler,
              per_epoch=len(sampler) // tcfg.batch_size, fixed=None, vgg=vgg, **models)
    run.saved_step = run.step if ckpt is not None else -1
    write_config(run)

    # A fixed batch of validation labels for the sample grid (dcgan's fixed noise).
    n = min(tcfg.num_samples, len(val_set))
    run.fixed = data.prepare_batch(next(iter(DataLoader(val_set, batch_size=n, shuffle=False))), info, device,
                                   edges=model_needs(module, "needs_edges", mcfg))
    if run.per_epoch == 0:
        raise ConfigError(f"dataset has {len(train_set)} samples, fewer than one batch of {tcfg.batch_size} "
                          f"per process")
    if ckpt is not None:  # only now: building the fixed batch above draws from the random stream
        set_rng_state(ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0])
    return run


def write_config(run):
    """<out>/config.json: the resolved configuration; loss_terms: the loss terms as the first step reports them
    (G_vgg only with --vgg)."""
    if run.master:
        with open(os.path.join(run.out, "config.json"), "w") as fh:
            json.dump({"train": asdict(run.tcfg), "model": asdict(run.mcfg), "info": asdict(run.info),
                       "world_size": run.world, "loss_terms": run.loss_terms or None}, fh, indent=2)


def epoch_batches(run, stops):
    """The batches of the epoch the run is in, from where it stands (a resumed run skips what the epoch already
    consumed), as (batch, failure): failure names a file that could not be read. A stop that killed a DataLoader
    worker (a signal torch's handlers let through) gives (None, None): the loop's next agree() stops."""
    tcfg = run.tcfg
    epoch, offset = divmod(run.step, run.per_epoch)
    run.sampler.set_epoch(epoch)
    run.train_set.set_epoch(epoch)  # crops and flips from (seed, epoch, index): workers and resumes agree
    indices = list(run.sampler)[offset * tcfg.batch_size:]  # skip what this epoch already consumed
    loader = DataLoader(run.train_set, batch_size=tcfg.batch_size, sampler=indices, drop_last=True,
                        num_workers=tcfg.workers, persistent_workers=False, pin_memory=run.device.type == "cuda",
                        # its own generator: a worker seed drawn from the global stream at every new loader would
                        # shift that stream on resume (mid-epoch) against a straight run
                        generator=torch.Generator().manual_seed((tcfg.seed * 1000 + run.rank) * 1000 + epoch),
                        worker_init_fn=_worker_ignores_stops)
    batches = _start_workers(loader)
    while True:
        try:
            batch, failure = next(batches), None
        except StopIteration:
            return
        except data.DatasetError as e:  # a file that cannot be read: the loop saves the state reached, then fails
            batch, failure = None, _error_text(e)
        except RuntimeError as e:
            if stops.signal is None or "DataLoader worker" not in str(e):
                raise
            batch, failure = None, None
        yield batch, failure


def agree(run, *flags):
    """Each flag OR-ed over the ranks, so that all of them stop (or fail) at the same step."""
    if run.world == 1:
        return [bool(f) for f in flags]
    t = torch.tensor([float(bool(f)) for f in flags], device=run.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def train_step(run, batch):
    """A generator step, then the discriminator step on the updated G (GauGAN's order). Returns the logs, or None
    when a loss was non-finite (what was not applied is said and counted; too many in a row save and fail)."""
    for opt in (run.opt_G, run.opt_D):
        for g in opt.param_groups:
            g["lr"] = g.setdefault("initial_lr", g["lr"]) * lr_factor(run.step, run.tcfg)
    run.D_raw.requires_grad_(False)
    with run.autocast():
        loss_g, logs = run.module.g_step(run.G, run.D_for_g, batch, run.mcfg, run.vgg)
    run.D_raw.requires_grad_(True)
    ok_g = update(run, loss_g, run.opt_G)
    loss_d, ok_d = None, False
    # D is not updated when G's update was skipped: the step is taken again with the next batch, and D would get
    # two updates against one of G's (and one against a G that did not move)
    if ok_g:
        with run.autocast():
            loss_d, logs_d = run.module.d_step(run.G, run.D, batch, run.mcfg)
        logs.update(logs_d)
        ok_d = update(run, loss_d, run.opt_D)
        run.scaler.update()  # at least G's step ran (GradScaler needs one before update)
    if ok_g and ok_d:
        run.bad_in_a_row = 0
        return logs
    # The non-finite part was not applied; a run of them means training has diverged.
    run.bad_in_a_row += 1
    run.skipped += 1
    d_text = f"{loss_d.item():.4g}" if loss_d is not None else "not computed"
    # G steps first (GauGAN's order): after a bad D loss, undoing G's update would need a copy of G and its
    # optimiser at every step, so it stands
    what = "neither G nor D updated" if not ok_g else "D not updated (G's update stands)"
    run.say(f"\nstep {run.step}: non-finite loss (G {loss_g.item():.4g}, D {d_text}): {what}; the step is taken "
            f"again with the next batch ({run.bad_in_a_row} in a row)")
    if run.bad_in_a_row >= run.tcfg.max_bad_steps:
        checkpoint(run)
        raise FloatingPointError(f"{run.bad_in_a_row} non-finite losses in a row at step {run.step}; the last good "
                                 f"state is saved in {run.out}/ckpt_latest.pt")
    return None


def update(run, loss, opt):
    """Backward and step, unless the loss is non-finite on some rank; returns whether it stepped."""
    if not all_finite(loss, run.world):
        return False
    opt.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(opt)
    return True


def checkpoint(run):
    """Save the state reached (every rank takes part: the random streams are gathered; rank 0 writes)."""
    if run.saved_step == run.step:  # a second save of one step would push the previous step out of ckpt_prev.pt
        return
    run.saved_step = run.step
    rng = [get_rng_state()]
    if run.world > 1:  # every rank's random stream
        rng = [None] * run.world
        dist.all_gather_object(rng, get_rng_state())
    if run.master:
        save_checkpoint({"model": run.tcfg.model, "model_cfg": asdict(run.mcfg), "train_cfg": asdict(run.tcfg),
                         "info": asdict(run.info), "G": run.G_raw.state_dict(), "D": run.D_raw.state_dict(),
                         "opt_G": run.opt_G.state_dict(), "opt_D": run.opt_D.state_dict(),
                         "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
                         "step": run.step, "rng": rng}, run.out)


def write_samples(run):
    """samples/step_NNNNNN.png: the fixed batch's inputs, the model's columns and the real images."""
    fixed = run.fixed
    run.G_raw.eval()
    with torch.no_grad(), run.autocast():
        cols = run.module.sample(run.G_raw, fixed)
    run.G_raw.train()
    inputs = [("label", data.colorize(fixed["label"], run.info.num_classes))]
    if "image_a" in fixed:  # cross-view: the other view is the generator's input too
        inputs.insert(0, ("I_a", fixed["image_a"]))
    columns = [c for _, c in inputs] + [c.float() for c in cols.values()] + [fixed["image"]]
    data.save_grid(columns, os.path.join(run.out, "samples", f"step_{run.step:06d}.png"),
                   titles=[t for t, _ in inputs] + [*cols.keys(), "real"])


def report(run, logs, log, bar):
    """Rank 0, after each step: the log line, the loss terms in config.json (once), the bar, the sample grid."""
    logs = {k: float(v) for k, v in logs.items()}
    log.write(json.dumps({"step": run.step, **logs}) + "\n")
    if not run.loss_terms:  # what the loss really holds, from the first step of this process
        run.loss_terms.extend(logs)
        write_config(run)
    if bar is not None:
        bar.update(1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in list(logs.items())[:4]})
    if run.step % run.tcfg.sample_every == 0 or run.step == run.tcfg.steps:
        write_samples(run)


class StopSignals:
    """SIGTERM and SIGINT only set a flag: the loop saves between two steps, where the state is whole."""

    def __init__(self):
        self.signal = None
        self.old = {s: signal.signal(s, self.on_signal) for s in STOP_SIGNALS}

    def on_signal(self, signum, frame):
        self.signal = signum

    def restore(self):
        for s, h in self.old.items():
            # After a stop the process is on its way out and a second signal must not cut that short: ignored
            # (SIG_IGN holds through interpreter shutdown), unless the caller had its own handler (a notebook's).
            default = h in (signal.SIG_DFL, signal.default_int_handler)
            signal.signal(s, signal.SIG_IGN if self.signal is not None and default else h)


def fail_on_bad_file(run, failure):
    """A file that cannot be read (on any rank): save the state reached, then raise naming the file."""
    texts = [failure]
    if run.world > 1:  # rank 0 names the file another rank found
        texts = [None] * run.world
        dist.all_gather_object(texts, failure)
    checkpoint(run)
    raise data.DatasetError(f"{next(t for t in texts if t)} (stopped before step {run.step + 1}; the state is saved "
                            f"in {run.out}/ckpt_latest.pt: fix the file and --resume)")


def train(tcfg: TrainConfig, mcfg):
    run = setup(tcfg, mcfg)
    edges = model_needs(run.module, "needs_edges", mcfg)
    bar = None
    if run.master and tcfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=tcfg.steps, initial=run.step, dynamic_ncols=True)
    log = open(os.path.join(run.out, "log.jsonl"), "a") if run.master else None
    stops = StopSignals()
    t0 = time.time()
    run.G.train(), run.D.train()
    try:
        while run.step < tcfg.steps:
            for batch, failure in epoch_batches(run, stops):
                # Stops and bad files are acted on here, between two steps, where the state is whole and all
                # ranks agree on the step (one all_reduce per step).
                stop_now, bad_data = agree(run, stops.signal is not None, failure is not None)
                if bad_data:
                    fail_on_bad_file(run, failure)
                if stop_now:
                    checkpoint(run)
                    run.say(f"\nstopped by signal at step {run.step}; checkpoint saved in {run.out}")
                    return run.out
                logs = train_step(run, data.prepare_batch(batch, run.info, run.device, edges=edges))
                if logs is None:  # a non-finite loss: nothing counted, the step is taken again
                    continue
                run.step += 1
                if run.master:
                    report(run, logs, log, bar)
                if run.step % tcfg.ckpt_every == 0 or run.step == tcfg.steps:
                    checkpoint(run)
                if tcfg.stop_after and tcfg.stop_after <= run.step < tcfg.steps:
                    checkpoint(run)
                    run.say(f"\n--stop_after {tcfg.stop_after}: checkpoint saved in {run.out}; continue with "
                            f"--resume")
                    return run.out
                if run.step >= tcfg.steps:
                    break
    finally:
        stops.restore()
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
    run.say(f"done: {run.step} steps in {time.time() - t0:.0f}s ({run.skipped} skipped); samples in "
            f"{run.out}/samples, checkpoint {run.out}/ckpt_latest.pt")
    return run.out


def main(argv=None):
    try:
        tcfg, mcfg = parse_args(argv)
        train(tcfg, mcfg)
        if dist.is_initialized():
            # no rank closes its connections while another still reads the last collective (rank 0 its share of
            # the final checkpoint's all_gather): a socket closed with data unread resets the peer's connection
            dist.barrier()
    except (ConfigError, CheckpointError, data.DatasetError, FloatingPointError) as e:
        print(f"train.py: error: {_error_text(e)}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
