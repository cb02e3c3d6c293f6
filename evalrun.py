"""
evalrun.py: open a training run for measuring: its checkpoint, its generator and its validation set.

One way for every script that measures a run: eval.py's metrics, figures.py's figures and tables.py's rows (through
eval.evaluate) call load_run, which checks the checkpoint file, rebuilds the model with train.py's checkpoint
loader and opens the validation split of the dataset the run was trained on, at the run's resolution and without
jitter. A bad input raises EvalError naming the file or dataset; the scripts print it as one line.
"""

import os
import zipfile
from dataclasses import dataclass

import torch

import data


class EvalError(RuntimeError):
    """A bad input to eval.py (missing file, wrong checkpoint, wrong weights); the message names the file."""


def pick_device(name):
    """'auto' (or None): CUDA where visible, else the CPU; any other name as torch.device reads it."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def device_problem(spec, allow_auto=True):
    """What is wrong with a --device value (cpu | cuda | cuda:N, and auto where allowed) for a CLI's one-line
    error, or None."""
    expected = ("auto, " if allow_auto else "") + "cpu, cuda or cuda:N"
    try:
        dev = torch.device("cpu" if allow_auto and spec == "auto" else spec)  # auto is always usable
    except RuntimeError:
        return f"{spec!r}: expected {expected}"
    if dev.type not in ("cpu", "cuda"):
        return f"{spec!r}: expected {expected}"
    if dev.type == "cuda" and not torch.cuda.is_available():
        return f"{spec!r}: no CUDA device is visible"
    return None


def one_line(e):
    """The line of an error message that names the problem (from a DataLoader worker: the re-raised error's)."""
    lines = str(e).strip().splitlines() or [type(e).__name__]
    return lines[-1].split(": ", 1)[-1] if lines[0].startswith("Caught ") else lines[0]


def open_checkpoint(ckpt_path, device):
    """(ckpt, module, cfg, info, G in eval mode) from a training checkpoint, or an EvalError naming the file."""
    import train  # not at top: under `python train.py` (which imports segmenter_train, and so this file) it
                  # would load train.py a second time
    if not os.path.isfile(ckpt_path):
        raise EvalError(f"checkpoint not found: {ckpt_path}" + (" (a folder; give its ckpt_latest.pt)"
                                                                if os.path.isdir(ckpt_path) else ""))
    if not zipfile.is_zipfile(ckpt_path):  # torch.save writes a zip archive; anything else is another file
        raise EvalError(f"{ckpt_path}: not a training checkpoint of this repo (not a torch.save file); expected "
                        f"<run>/ckpt_latest.pt")
    try:
        ckpt = train.load_checkpoint(ckpt_path)
        module, cfg, info, G, D = train.build_from_checkpoint(ckpt, device)
    except (train.CheckpointError, KeyError, TypeError, ValueError) as e:
        msg = str(e)
        raise EvalError(msg if ckpt_path in msg else f"{ckpt_path}: {msg}") from None
    del D
    return ckpt, module, cfg, info, G


def val_set(name, dataroot, info, from_ckpt=False):
    """(dataset, name, split): the validation split at the checkpoint's resolution (the training split, unjittered,
    where a dataset has none). from_ckpt: the dataroot came from the checkpoint's training config (said when it is
    not found)."""
    if info.task == "crossview" and name == "synthetic":
        name = "synthetic_crossview"  # as train.py names it
    kw = dict(dataroot=dataroot or None, size=(info.height, info.width), flip=False, crop=False)  # never jitter
    try:
        try:
            return data.make_dataset(name, split="val", **kw), name, "val"
        except data.DatasetError:
            return data.make_dataset(name, split="train", **kw), name, "train (no validation split)"
    except data.DatasetError as e:
        hint = " (the checkpoint's --dataroot; give --dataroot to read the data elsewhere)" if from_ckpt else ""
        raise EvalError(f"{e}{hint}") from None


@dataclass
class Run:
    """A training run opened for measuring (load_run)."""
    path: str                       # the checkpoint file, as given
    ckpt: dict                      # train.py's checkpoint dict
    module: object                  # the model file (gaugan, lggan, ecgan) and its 5-name interface
    cfg: object                     # the model's Config
    info: data.DataInfo             # the data the run was trained on (its resolution, its classes)
    G: torch.nn.Module              # the generator, in eval mode
    device: torch.device
    val: torch.utils.data.Dataset   # the validation images at info's resolution, never jittered
    dataset: str                    # its name, as data.make_dataset reads it
    split: str                      # "val", or "train (no validation split)"
    dataroot: str | None

    @property
    def model(self):
        return self.ckpt["model"]

    def prepare(self, batch):
        """A DataLoader batch of `val` as the model's sample() reads it, on the run's device."""
        import train  # inside, as in open_checkpoint
        return data.prepare_batch(batch, self.info, self.device,
                                  edges=train.model_needs(self.module, "needs_edges", self.cfg))


def load_run(ckpt_path, device, dataset=None, dataroot=None):
    """Open a run: the checkpoint (EvalError naming it if it is not one of this repo's), then the validation set of
    `dataset` (default: the one it was trained on) under `dataroot` (default: the checkpoint's), which must have
    the label and input channels the run was trained with."""
    ckpt_path = str(ckpt_path)
    ckpt, module, cfg, info, G = open_checkpoint(ckpt_path, device)
    root = dataroot or ckpt.get("train_cfg", {}).get("dataroot")
    val, name, split = val_set(dataset or ckpt.get("train_cfg", {}).get("dataset", "synthetic"), root, info,
                               from_ckpt=not dataroot and bool(root))
    vi = val.info
    if (vi.label_nc, vi.input_nc, vi.task) != (info.label_nc, info.input_nc, info.task):
        raise EvalError(f"{ckpt_path}: trained on {info.name!r} (label_nc {info.label_nc}, input_nc {info.input_nc}, "
                        f"{info.task}), but dataset {name!r} has label_nc {vi.label_nc}, input_nc {vi.input_nc}, "
                        f"{vi.task}")
    if len(val) == 0:
        raise EvalError(f"dataset {name!r} ({split}) has no images")
    return Run(ckpt_path, ckpt, module, cfg, info, G, torch.device(device), val, name, split, root)
