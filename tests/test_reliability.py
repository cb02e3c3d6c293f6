"""Reliability: every fault here is injected for real (SIGKILL, SIGTERM, a dying torchrun rank, NaN losses, broken
files, hostile checkpoints) and the test checks what the user is promised: the run resumes where it was, a bad file
is named, nothing written is lost. Tiny GauGAN configs on CPU; the subprocess tests are marked slow."""
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import data
import train
from data import DatasetError, make_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "gaugan", "--height", "32", "--width", "64", "--ngf", "4", "--ndf", "4", "--n_layers_D", "2",
        "--workers", "0", "--progress", "false", "--num_samples", "2", "--batch_size", "2",
        "--use_vae", "true"]  # the VAE draws noise every step: a resume that lost the random state would show
N = 6  # steps of every run here
gaugan = train.MODELS["gaugan"]


def run(out, *extra):
    train.main(TINY + ["--out", str(out), "--steps", str(N), *extra])


def ckpt_of(out, name="ckpt_latest.pt"):
    return torch.load(os.path.join(out, name), map_location="cpu", weights_only=True)


def assert_same_nets(a, b):
    for net in ("G", "D"):
        assert a[net].keys() == b[net].keys()
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), (net, k)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An undisturbed N-step run: what every interrupted run must end up equal to."""
    out = tmp_path_factory.mktemp("straight")
    run(out)
    return ckpt_of(out)


# ----------------------------------------------------------------------------------------------------------------
# a wrapper around train.py that injects faults in a child process (env vars pick which)

WRAPPER = """
import io, os, sys, time
sys.path.insert(0, {root!r})
import torch
import train
gaugan = train.MODELS["gaugan"]
env = os.environ.get
calls = 0
g_step = gaugan.g_step

def g_step_with_faults(*a, **k):
    global calls
    calls += 1
    if env("FAULT_MARK"):  # one file per generator step started, so the test knows where the run is
        open(os.path.join(env("FAULT_MARK"), "g%d" % calls), "w").close()
    if (calls == int(env("FAULT_DIE_AT", "0")) and env("RANK") == "1"
            and env("TORCHELASTIC_RESTART_COUNT") == "0"):
        os._exit(1)  # rank 1 dies mid-step, on the first attempt only
    time.sleep(float(env("FAULT_STEP_SLEEP", "0")))
    return g_step(*a, **k)
gaugan.g_step = g_step_with_faults

if env("FAULT_SLOW_WRITE"):  # checkpoint bytes trickle out, so a kill lands inside a write
    def slow_write(obj, path):
        buf = io.BytesIO()
        torch.save(obj, buf)
        b = buf.getvalue()
        n = len(b) // 10 + 1
        with open(path, "wb") as fh:
            for i in range(0, len(b), n):
                fh.write(b[i:i + n])
                fh.flush()
                time.sleep(float(env("FAULT_SLOW_WRITE")))
            os.fsync(fh.fileno())
    train._write_synced = slow_write

if env("FAULT_RENAME_PAUSE"):  # a pause between 'latest -> prev' and 'tmp -> latest'
    real_replace = os.replace
    def replace(src, dst):
        real_replace(src, dst)
        if str(dst).endswith("ckpt_prev.pt"):
            time.sleep(float(env("FAULT_RENAME_PAUSE")))
    os.replace = replace

sys.argv = ["train.py"] + sys.argv[1:]
code = "exception"
try:
    train.main()
    code = 0
except SystemExit as e:
    code = e.code
    raise
finally:  # how this rank's train.py ended (no file: killed by a signal)
    if env("FAULT_MARK"):
        open(os.path.join(env("FAULT_MARK"), "exit_rank%s" % env("RANK", "0")), "w").write(str(code))
"""


def wrapper(tmp_path):
    path = tmp_path / "train_with_faults.py"
    path.write_text(WRAPPER.format(root=ROOT))
    return str(path)


def start_in_own_group(tmp_path, out, *extra, **faults):
    """The run in a process group of its own, as `timeout`, a batch job or a systemd unit starts it, so that a
    stop can be sent to the whole group (os.killpg: the DataLoader workers get it too). Returns (process, marks)."""
    mark = tmp_path / "marks"
    mark.mkdir(exist_ok=True)
    cmd = [sys.executable, wrapper(tmp_path), *TINY, "--out", str(out), *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(FAULT_MARK=str(mark), **faults), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return proc, mark


def killpg(proc, sig):
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:  # the group has ended
        pass


def child_env(**faults):
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **faults)


def wait_for(cond, proc, timeout=60, what=""):
    t = time.time()
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before {what}: {proc.stdout.read()[-2000:]}")
        if time.time() - t > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def tmp_files(out):
    return [n for n in os.listdir(out) if ".tmp" in n]


# ----------------------------------------------------------------------------------------------------------------
# 1. kill and resume


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["random", "during_write", "between_renames", "before_first_checkpoint"])
def test_sigkill_then_resume_ends_equal_to_an_undisturbed_run(tmp_path, straight, moment):
    out = tmp_path / "run"
    mark = tmp_path / "marks"
    mark.mkdir()
    faults = {"FAULT_MARK": str(mark)}
    if moment == "random":
        faults["FAULT_STEP_SLEEP"] = "0.3"
    if moment == "during_write":
        faults["FAULT_SLOW_WRITE"] = "0.05"
    if moment == "between_renames":
        faults["FAULT_RENAME_PAUSE"] = "5"
    cmd = [sys.executable, wrapper(tmp_path), *TINY, "--out", str(out), "--steps", str(N), "--ckpt_every", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(**faults), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    latest, prev = out / "ckpt_latest.pt", out / "ckpt_prev.pt"
    try:
        if moment == "random":  # any step, any point in it (every step lasts > 0.3 s here)
            step, delay = random.randint(1, N), random.uniform(0, 0.3)
            wait_for(lambda: (mark / f"g{step}").exists(), proc, what=f"step {step}")
            time.sleep(delay)
        elif moment == "during_write":  # a second checkpoint being written, the first one complete
            wait_for(lambda: latest.exists() and any(os.path.getsize(out / n) > 0 for n in tmp_files(out)), proc,
                     what="a checkpoint write")
        elif moment == "between_renames":
            wait_for(lambda: prev.exists() and not latest.exists(), proc, what="the gap between the renames")
        else:
            wait_for(lambda: (mark / "g1").exists(), proc, what="the first step")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, f"process ended by itself before the kill ({moment})"
    print(f"killed at {moment}: {sorted(os.listdir(out))}")

    ckpt, path = train.find_resume_checkpoint(str(out))
    if moment == "during_write":
        assert tmp_files(out), "the kill should land inside a write"
        train.load_checkpoint(latest)  # atomic: the half-written file never takes the name ckpt_latest.pt
        assert path.endswith("ckpt_latest.pt")
    if moment == "between_renames":
        assert not latest.exists() and path.endswith("ckpt_prev.pt")  # the one good copy is the previous one
    if moment == "before_first_checkpoint":
        assert ckpt is None and not prev.exists()
    if ckpt is not None:
        assert 1 <= ckpt["step"] < N
    # --resume from whatever the kill left: continues (or starts over) and ends where the undisturbed run ends
    run(out, "--ckpt_every", "1", "--resume")
    final = ckpt_of(out)
    assert final["step"] == N
    assert_same_nets(final, straight)
    assert not tmp_files(out), "half-written checkpoint files left behind"


@pytest.mark.slow
def test_sigterm_saves_the_step_reached_and_exits_0(tmp_path):
    out, mark = tmp_path / "run", tmp_path / "marks"
    mark.mkdir()
    cmd = [sys.executable, wrapper(tmp_path), *TINY, "--out", str(out), "--steps", "1000", "--ckpt_every", "1000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(FAULT_MARK=str(mark)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: (mark / "g3").exists(), proc, what="step 3")
        proc.send_signal(signal.SIGTERM)  # lands inside step 3: it finishes, is saved, the process exits
        text = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    assert proc.returncode == 0, text[-2000:]
    reached = len([n for n in os.listdir(mark) if n.startswith("g")])  # generator steps started (the run stops
    # after the step in progress)
    ckpt = train.load_checkpoint(out / "ckpt_latest.pt")
    assert ckpt["step"] == reached >= 3
    assert len(open(out / "log.jsonl").readlines()) == reached
    assert "stopped by signal" in text and not (out / "ckpt_prev.pt").exists()  # no periodic checkpoint before


@pytest.mark.slow
@pytest.mark.parametrize("workers,sig", [("0", "SIGTERM"), ("1", "SIGTERM"), ("2", "SIGTERM"), ("2", "SIGINT")])
def test_stop_sent_to_the_whole_group_saves_the_step_reached_exits_0_and_resumes_exactly(tmp_path, straight, workers,
                                                                                       sig):
    """As `timeout`, scancel and systemd stop a run (SIGTERM), or a terminal's Ctrl-C (SIGINT): to every process of
    the group, the DataLoader workers too (which used to die and take the main process with them, nothing saved)."""
    out = tmp_path / "run"
    proc, mark = start_in_own_group(tmp_path, out, "--steps", str(N), "--ckpt_every", "1000", "--workers", workers,
                                    FAULT_STEP_SLEEP="0.3")
    try:
        wait_for(lambda: (mark / "g3").exists(), proc, what="step 3")
        killpg(proc, getattr(signal, sig))  # lands inside step 3
        text = proc.communicate(timeout=60)[0]
    finally:
        killpg(proc, signal.SIGKILL)
    assert proc.returncode == 0, text[-3000:]
    reached = len(open(out / "log.jsonl").readlines())
    assert f"stopped by signal at step {reached}" in text and 3 <= reached < N
    assert train.load_checkpoint(out / "ckpt_latest.pt")["step"] == reached
    assert not tmp_files(out)
    run(out, "--ckpt_every", "1000", "--workers", workers, "--resume")
    assert_same_nets(ckpt_of(out), straight)


@pytest.mark.slow
def test_more_signals_during_the_save_and_the_exit_change_nothing(tmp_path, straight):
    out = tmp_path / "run"
    proc, mark = start_in_own_group(tmp_path, out, "--steps", str(N), "--ckpt_every", "1000", "--workers", "1",
                                    FAULT_STEP_SLEEP="0.3", FAULT_SLOW_WRITE="0.05")  # the save lasts 0.5 s
    try:
        wait_for(lambda: (mark / "g3").exists(), proc, what="step 3")
        killpg(proc, signal.SIGTERM)
        wait_for(lambda: tmp_files(out), proc, what="the save")
        n = 0
        while proc.poll() is None:  # impatient: SIGTERM and SIGINT to the group until the process has ended
            killpg(proc, (signal.SIGTERM, signal.SIGINT)[n % 2])
            n += 1
            time.sleep(0.005)
        text = proc.communicate(timeout=60)[0]
    finally:
        killpg(proc, signal.SIGKILL)
    assert proc.returncode == 0 and n > 10, (n, text[-3000:])
    reached = len(open(out / "log.jsonl").readlines())
    assert train.load_checkpoint(out / "ckpt_latest.pt")["step"] == reached and not tmp_files(out)
    run(out, "--ckpt_every", "1000", "--workers", "1", "--resume")
    assert_same_nets(ckpt_of(out), straight)


def test_a_failed_checkpoint_write_leaves_the_old_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    train.save_checkpoint({"step": 1}, str(tmp_path))

    def write_half_then_fail(obj, path):
        with open(path, "wb") as fh:
            fh.write(b"PK\x03\x04 half")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(train, "_write_synced", write_half_then_fail)
    with pytest.raises(OSError, match="No space"):
        train.save_checkpoint({"step": 2}, str(tmp_path))
    with pytest.raises(OSError, match="No space"):
        train.atomic_save({"step": 2}, str(tmp_path / "other.pt"))
    assert sorted(os.listdir(tmp_path)) == ["ckpt_latest.pt"]
    assert torch.load(tmp_path / "ckpt_latest.pt", weights_only=True) == {"step": 1}


@pytest.mark.slow
def test_truncated_latest_names_the_file_and_resume_falls_back_to_prev(tmp_path, straight, capsys):
    run(tmp_path, "--ckpt_every", "1", "--stop_after", "2")
    latest, prev = tmp_path / "ckpt_latest.pt", tmp_path / "ckpt_prev.pt"
    good = latest.read_bytes()
    latest.write_bytes(good[: len(good) // 3])  # a disk that filled up, a copy cut short
    with pytest.raises(train.CheckpointError, match=r"ckpt_latest\.pt.*truncated"):
        train.load_checkpoint(latest)
    assert train.load_checkpoint(prev)["step"] == 1  # the one before is still there
    capsys.readouterr()
    run(tmp_path, "--ckpt_every", "1", "--resume")
    printed = capsys.readouterr().out
    assert f"{latest}: cannot read checkpoint, it is truncated" in printed  # the user hears why step 2 is redone
    assert f"resuming from {prev} at step 1" in printed
    assert_same_nets(ckpt_of(tmp_path), straight)
    # both copies broken: the error names both files
    latest.write_bytes(b"")
    prev.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "--resume")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "ckpt_latest.pt" in err and "ckpt_prev.pt" in err


# ----------------------------------------------------------------------------------------------------------------
# 2. elastic restart: torchrun --max-restarts=1, rank 1 dies mid-run on the first attempt


def torchrun_cmd(tmp_path, out, *extra):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
            "--monitor-interval=0.1", wrapper(tmp_path), *TINY, "--out", str(out), "--steps", str(N),
            "--ckpt_every", "1", "--resume", *extra]


def torchrun(tmp_path, out, *extra, **faults):
    res = subprocess.run(torchrun_cmd(tmp_path, out, *extra), cwd=ROOT, env=child_env(**faults), capture_output=True,
                         text=True, timeout=120)
    text = res.stdout + res.stderr
    # (without train.py's per-attempt store prefix, about 1 restart in 4 failed here in gloo's connectFullMesh)
    assert res.returncode == 0, text[-4000:]
    return text


@pytest.fixture(scope="module")
def straight_ddp(tmp_path_factory):
    """An undisturbed N-step 2-process run."""
    tmp = tmp_path_factory.mktemp("straight_ddp")
    torchrun(tmp, tmp / "run")
    return ckpt_of(tmp / "run")


def assert_same_ddp_runs(a, b):
    # Exact: both are 2-process runs summing gradients in the same order, and the resumed one restores every
    # rank's random state and data position, so not even the float noise of biases in front of a norm differs.
    assert a["step"] == b["step"] == N
    assert_same_nets(a, b)
    for opt in ("opt_G", "opt_D"):
        for i, s in a[opt]["state"].items():
            assert torch.equal(s["exp_avg"], b[opt]["state"][i]["exp_avg"]), (opt, i)


@pytest.mark.slow
def test_elastic_restart_resumes_by_itself_and_matches_an_undisturbed_run(tmp_path, straight_ddp):
    text = torchrun(tmp_path, tmp_path / "killed", FAULT_DIE_AT="4")  # dies in step 4, after 3 checkpoints
    assert "resuming from" in text and "at step 3" in text, text[-4000:]
    assert_same_ddp_runs(ckpt_of(tmp_path / "killed"), straight_ddp)


@pytest.mark.slow
def test_torchrun_stopped_by_sigterm_to_its_group_saves_on_every_rank_and_resumes_exactly(tmp_path, straight_ddp):
    """scancel / timeout on a torchrun job: torchrun gets SIGTERM and passes it to each rank's own process group
    (the rank and its DataLoader worker). The ranks agree on the step, rank 0 saves, both end with exit 0."""
    out, mark = tmp_path / "run", tmp_path / "marks"
    mark.mkdir()
    proc = subprocess.Popen(torchrun_cmd(tmp_path, out, "--ckpt_every", "1000", "--workers", "1"), cwd=ROOT,
                            env=child_env(FAULT_MARK=str(mark), FAULT_STEP_SLEEP="0.3"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for(lambda: (mark / "g3").exists(), proc, timeout=120, what="step 3")
        killpg(proc, signal.SIGTERM)
        text = proc.communicate(timeout=90)[0]
    finally:
        killpg(proc, signal.SIGKILL)
    # torchrun itself reports the signal it got (exit 1, its SignalException); the ranks' own exits are recorded
    assert [(mark / f"exit_rank{r}").read_text() for r in (0, 1)] == ["0", "0"], text[-4000:]
    reached = len(open(out / "log.jsonl").readlines())
    assert f"stopped by signal at step {reached}" in text and 3 <= reached < N, text[-4000:]
    assert train.load_checkpoint(out / "ckpt_latest.pt")["step"] == reached and not tmp_files(out)
    torchrun(tmp_path, out, "--workers", "1")
    assert_same_ddp_runs(ckpt_of(out), straight_ddp)


# ----------------------------------------------------------------------------------------------------------------
# 3. NaN / Inf losses


def faulty(fn, bad_calls, value, seen):
    """Wrap g_step/d_step (both take G, D first): on the chosen calls the loss becomes `value`; records the
    parameters of G and D at every call, so the test can check what a skipped update left behind."""
    def wrapped(*a, **k):
        seen.append({net: {n: p.detach().clone() for n, p in a[i].named_parameters()}
                     for i, net in enumerate(("G", "D"))})
        loss, logs = fn(*a, **k)
        if len(seen) in bad_calls:
            loss = loss * value  # a real non-finite loss: backpropagating it would poison every gradient
        return loss, logs
    return wrapped


@pytest.mark.slow
@pytest.mark.parametrize("which,value", [("g_step", float("nan")), ("d_step", float("inf"))])
def test_one_nonfinite_loss_is_skipped_and_counted(tmp_path, monkeypatch, capsys, which, value):
    seen = []
    monkeypatch.setattr(gaugan, which, faulty(getattr(gaugan, which), {3}, value, seen))
    run(tmp_path)
    out = capsys.readouterr().out
    assert "non-finite loss" in out and "(1 skipped)" in out
    assert len(seen) == N + 1  # the skipped step is taken again with the next batch
    # the call after the bad one sees the parameters the bad one saw: the network the loss updates did not move,
    # and after a non-finite G loss neither did D (its step is taken with G's, when the step is taken again)
    for net in ("G", "D") if which == "g_step" else ("D",):
        for k in seen[2][net]:
            assert torch.equal(seen[2][net][k], seen[3][net][k]), (net, k)
    ckpt = ckpt_of(tmp_path)
    assert ckpt["step"] == N and all(torch.isfinite(v).all() for v in ckpt["G"].values())
    assert len(open(tmp_path / "log.jsonl").readlines()) == N


@pytest.mark.slow
def test_nonfinite_losses_in_a_row_stop_with_the_last_good_state(tmp_path, monkeypatch, capsys):
    seen_g, seen_d = [], []
    bad = set(range(3, 100))  # from the third step on, every loss is NaN
    monkeypatch.setattr(gaugan, "g_step", faulty(gaugan.g_step, bad, float("nan"), seen_g))
    monkeypatch.setattr(gaugan, "d_step", faulty(gaugan.d_step, bad, float("nan"), seen_d))
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "--max_bad_steps", "3", "--ckpt_every", "100")
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert "3 non-finite losses in a row at step 2" in captured.err and "ckpt_latest.pt" in captured.err
    assert "Traceback" not in captured.err
    assert len(seen_g) == 2 + 3  # two good steps, then three bad ones and stop
    assert len(seen_d) == 2  # after a non-finite G loss, D's loss is not even computed
    ckpt = train.load_checkpoint(tmp_path / "ckpt_latest.pt")
    assert ckpt["step"] == 2
    for net in ("G", "D"):  # the state when the first bad loss came
        for k, v in seen_g[2][net].items():
            assert torch.equal(ckpt[net][k], v), (net, k)


# ----------------------------------------------------------------------------------------------------------------
# 4. bad data: each layout, one broken thing at a time; the error names the file and the problem

LAYOUTS = {  # name: image path, label path, instance path (or None), classes, an out-of-range raw value, kwargs
    "cityscapes": ("leftImg8bit/train/aachen/a_{k}_leftImg8bit.png", "gtFine/train/aachen/a_{k}_gtFine_labelIds.png",
                   "gtFine/train/aachen/a_{k}_gtFine_instanceIds.png", 35, 40, {}),
    "ade20k": ("images/training/ADE_train_{k}.jpg", "annotations/training/ADE_train_{k}.png", None, 150, 151, {}),
    "coco": ("train_img/{k}.jpg", "train_label/{k}.png", "train_inst/{k}.png", 182, 200, {}),
    "facades": ("train_img/cmp_{k}.jpg", "train_label/cmp_{k}.png", None, 13, 13, {}),
    "custom": ("imgs/{k}.png", "labels/{k}.png", None, 7, 9, {"num_classes": 7}),
}


def build_tree(root, name, n=2, h=8, w=12):
    img_p, lab_p, inst_p, classes, _, _ = LAYOUTS[name]
    rng = np.random.default_rng(0)
    offset = 1 if name == "ade20k" else 0
    for k in range(n):
        files = [(img_p, rng.integers(0, 255, (h, w, 3)).astype(np.uint8)),
                 (lab_p, (rng.integers(0, classes, (h, w)) + offset).astype(np.uint8))]
        if inst_p:
            files.append((inst_p, rng.integers(0, 3, (h, w)).astype(np.uint16)))
        for p, a in files:
            path = root / p.format(k=k)
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(a).save(path)


def open_all(root, name):
    kw = dict(LAYOUTS[name][5])
    if name == "custom":
        kw.update(label_dir=root / "labels", image_dir=root / "imgs")
    ds = make_dataset(name, None if name == "custom" else root, "train", (8, 12), flip=False, **kw)
    return [ds[i] for i in range(len(ds))]


def rewrite(path, array):
    Image.fromarray(array).save(path)


def truncate(path):
    b = path.read_bytes()
    path.write_bytes(b[: len(b) // 2])


# fault: (what to break: img | lab | inst | a folder, how, the problem the message must state)
FAULTS = {
    "truncated image": ("img", truncate, r"cannot read image"),
    "truncated label": ("lab", truncate, r"cannot read label map"),
    "colour label": ("lab", lambda p: rewrite(p, np.random.default_rng(1).integers(0, 9, (8, 12, 3), np.uint8)),
                     r"one channel.*colour RGB"),
    "two-channel label": ("lab", lambda p: Image.fromarray(np.ones((8, 12, 2), np.uint8), "LA").save(p),
                          r"one channel.*LA"),
    "label id out of range": ("lab", None, r"label value \d+ outside the class range"),
    "label size mismatch": ("lab", lambda p: rewrite(p, np.ones((9, 12), np.uint8)), r"label size 12x9 .*image.*12x8"),
    "image without label": ("lab", lambda p: p.unlink(), r"image without a label"),
    "label without image": ("img", lambda p: p.unlink(), r"label without an image"),
    "empty image folder": ("imgdir", None, r"no images"),
    "truncated instance map": ("inst", truncate, r"cannot read instance map"),
    "instance size mismatch": ("inst", lambda p: rewrite(p, np.ones((8, 13), np.uint16)),
                               r"instance map shape \(8, 13\) does not match"),
    "missing instance map": ("inst", lambda p: p.unlink(), r"no instance map"),
}
SEMANTIC_CASES = [(layout, fault) for layout in LAYOUTS for fault in FAULTS
                  if LAYOUTS[layout][2] or "instance" not in fault]


@pytest.mark.parametrize("layout,fault", SEMANTIC_CASES)
def test_bad_data_names_the_file_and_the_problem(tmp_path, layout, fault):
    build_tree(tmp_path, layout)
    open_all(tmp_path, layout)  # the intact tree loads
    img_p, lab_p, inst_p, classes, out_of_range, _ = LAYOUTS[layout]
    target, how, problem = FAULTS[fault]
    paths = {"img": img_p, "lab": lab_p, "inst": inst_p}
    if target == "imgdir":  # every image gone, the folder left empty
        folder = tmp_path / ("leftImg8bit/train" if layout == "cityscapes" else os.path.dirname(img_p))
        for p in folder.rglob("*.*"):
            p.unlink()
        named = str(folder)
    else:
        path = tmp_path / paths[target].format(k=1)
        if how is None:  # out of range: one pixel of the second label
            a = np.array(Image.open(path))
            a[3, 4] = out_of_range
            rewrite(path, a)
        else:
            how(path)
        # a lonely image or label is reported by its own name, the rest by the broken file
        named = str(tmp_path / (img_p if fault == "image without label" else
                                lab_p if fault in ("label without image", "missing instance map") else
                                paths[target]).format(k=1))
    with pytest.raises(DatasetError) as e:
        open_all(tmp_path, layout)
    msg = str(e.value)
    assert msg.startswith(named + ":"), msg
    assert re.search(problem, msg), msg


def panel(path, la=None, width=6 * 10):
    """I_a, I_g, S_a, S_g random colours; L_a, L_g grey class levels 10..60 (L_a replaced by `la` if given)."""
    rng = np.random.default_rng(0)
    w = width // 6
    colour = rng.integers(0, 255, (8, width - 2 * w, 3)).astype(np.uint8)
    grey = [np.repeat((rng.integers(1, 7, (8, w)) * 10).astype(np.uint8)[..., None], 3, 2) for _ in range(2)]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate([colour, grey[0] if la is None else la, grey[1]], 1)).save(path)


CROSSVIEW_FAULTS = {
    "truncated panel file": (lambda p: truncate(p), r"cannot read cross-view panel image"),
    "not 6 panels": (lambda p: panel(p, width=61), r"width 61 is not 6 equal panels"),
    "label grey out of range": (lambda p: panel(p, la=np.full((8, 10, 3), 200, np.uint8)),
                                r"L_a panel value 200 is not a class grey level"),
    "empty folder": (lambda p: p.unlink(), r"no images found"),
}


@pytest.mark.parametrize("fault", CROSSVIEW_FAULTS)
def test_bad_crossview_panels_name_the_file_and_the_problem(tmp_path, fault):
    path = tmp_path / "train" / "dayton_1.png"
    panel(path)
    ds = make_dataset("crossview", tmp_path, size=(8, 10), flip=False)
    assert ds[0]["label_a"].shape == (8, 10)
    how, problem = CROSSVIEW_FAULTS[fault]
    how(path)
    with pytest.raises(DatasetError, match=problem) as e:
        ds = make_dataset("crossview", tmp_path, size=(8, 10), flip=False)
        ds[0]
    named = str(path.parent) if fault == "empty folder" else str(path)
    assert str(e.value).startswith(named + ":"), e.value


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["0", "1"])  # 1: the error comes back from a loader worker process
def test_bad_file_in_a_training_run_exits_2_naming_it(tmp_path, capsys, workers):
    build_tree(tmp_path / "data", "facades", n=4, h=32, w=64)
    truncate(tmp_path / "data/train_label/cmp_2.png")
    with pytest.raises(SystemExit) as e:
        train.main(TINY + ["--dataset", "facades", "--dataroot", str(tmp_path / "data"), "--out",
                           str(tmp_path / "run"), "--steps", "4", "--workers", workers])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err
    assert err.startswith(f"train.py: error: {tmp_path / 'data/train_label/cmp_2.png'}: cannot read label map"), err
    # the state reached is saved before the error (here the step before the bad batch)
    reached = len(open(tmp_path / "run" / "log.jsonl").readlines())
    assert train.load_checkpoint(tmp_path / "run" / "ckpt_latest.pt")["step"] == reached
    assert f"saved in {tmp_path / 'run'}/ckpt_latest.pt" in err.splitlines()[0]


@pytest.mark.slow
def test_file_broken_mid_training_saves_the_state_first_and_resume_after_the_fix_is_exact(tmp_path, monkeypatch,
                                                                                        capsys):
    build_tree(tmp_path / "data", "facades", n=4, h=40, w=72)  # 2 batches an epoch
    args = TINY + ["--dataset", "facades", "--dataroot", str(tmp_path / "data"), "--workers", "1", "--steps", "6",
                   "--ckpt_every", "1000"]
    train.main(args + ["--out", str(tmp_path / "straight")])
    label = tmp_path / "data/train_label/cmp_2.png"
    good = label.read_bytes()
    g_step, calls = gaugan.g_step, []

    def breaks_a_file_in_step_2(*a, **k):  # the disk goes bad while epoch 0 ends: epoch 1 cannot read the file
        calls.append(1)
        if len(calls) == 2:
            truncate(label)
        return g_step(*a, **k)
    monkeypatch.setattr(gaugan, "g_step", breaks_a_file_in_step_2)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train.main(args + ["--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and err.startswith(f"train.py: error: {label}: "), err
    reached = len(open(out / "log.jsonl").readlines())
    assert train.load_checkpoint(out / "ckpt_latest.pt")["step"] == reached >= 2
    label.write_bytes(good)  # the user fixes the file and resumes: the run ends as if nothing had happened
    monkeypatch.setattr(gaugan, "g_step", g_step)
    train.main(args + ["--out", str(out), "--resume"])
    assert_same_nets(ckpt_of(out), ckpt_of(tmp_path / "straight"))


@pytest.mark.slow
def test_a_run_that_failed_with_its_workers_alive_still_lets_the_process_exit(tmp_path):
    """The failed loader's workers outlive train() while its error is kept (a traceback holds the iterator): at exit
    the main process ends them with SIGTERM, which the workers must obey although they drop the group's stops."""
    build_tree(tmp_path / "data", "facades", n=4, h=32, w=64)
    truncate(tmp_path / "data/train_label/cmp_2.png")
    argv = TINY + ["--dataset", "facades", "--dataroot", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
                   "--steps", "4", "--workers", "2"]
    script = (f"import sys; sys.path.insert(0, {ROOT!r}); import train\n"
              f"try:\n    train.main({argv!r})\nexcept SystemExit as e:\n    kept = e\nprint('exiting', flush=True)\n")
    res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=child_env(), capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "exiting" in res.stdout and "cannot read label map" in res.stderr, res.stderr


@pytest.mark.slow
def test_mid_epoch_resume_with_random_crops_and_flips_in_workers_is_bit_exact(tmp_path):
    """A resumed epoch hands its remaining samples to fresh workers, each a different share than in the straight
    run: the random jitter of a sample must not depend on which worker loads it, nor on what it loaded before."""
    build_tree(tmp_path / "data", "facades", n=8, h=40, w=72)  # 4 batches an epoch
    args = TINY + ["--dataset", "facades", "--dataroot", str(tmp_path / "data"), "--workers", "2", "--steps", "4"]
    train.main(args + ["--out", str(tmp_path / "straight")])
    train.main(args + ["--out", str(tmp_path / "sliced"), "--stop_after", "1"])
    train.main(args + ["--out", str(tmp_path / "sliced"), "--resume"])
    assert_same_nets(ckpt_of(tmp_path / "sliced"), ckpt_of(tmp_path / "straight"))


# ----------------------------------------------------------------------------------------------------------------
# 5. checkpoint safety


class Payload:
    """Unpickling this runs code (creates a file): what a hostile checkpoint would do."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.slow
def test_checkpoint_with_pickled_code_is_refused_without_running_it(tmp_path, straight):
    marker = str(tmp_path / "code_ran")
    evil = dict(straight, rng=Payload(marker))  # otherwise a perfectly good checkpoint
    path = tmp_path / "ckpt_latest.pt"
    torch.save(evil, path)
    with pytest.raises(train.CheckpointError) as e:
        train.load_checkpoint(path)
    assert str(e.value).startswith(str(path)) and "weights_only" in str(e.value), e.value
    assert not os.path.exists(marker), "loading the checkpoint ran code from it"


@pytest.mark.slow
def test_checkpoint_of_another_model_or_config_is_refused_saying_what_differs(tmp_path, capsys):
    run(tmp_path, "--stop_after", "1")
    latest = tmp_path / "ckpt_latest.pt"
    good = latest.read_bytes()

    def refused(*argv):
        with pytest.raises(SystemExit) as e:
            train.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and "Traceback" not in err
        assert latest.read_bytes() == good  # nothing written over the checkpoint
        return err

    base = TINY + ["--out", str(tmp_path), "--steps", str(N), "--resume"]
    err = refused(*[a for a in base[2:] if a not in ("--use_vae", "true")], "--model", "lggan")
    assert "ckpt_latest.pt" in err and "'gaugan', not 'lggan'" in err
    err = refused(*base, "--ngf", "8")
    assert "ngf" in err and "4" in err and "8" in err
    err = refused(*base, "--height", "64")  # same weights shapes, another dataset geometry
    assert "height" in err and "32" in err and "64" in err
    # build_from_checkpoint: a config that does not fit the weights is refused by name too
    ckpt = train.load_checkpoint(latest)
    ckpt["model_cfg"]["ngf"] = 8
    with pytest.raises(train.CheckpointError, match="G weights do not fit gaugan"):
        train.build_from_checkpoint(ckpt)


@pytest.mark.slow
def test_existing_run_directory_is_not_overwritten_unless_asked(tmp_path, capsys):
    run(tmp_path, "--stop_after", "1")
    before = {n: (tmp_path / n).read_bytes() for n in ("ckpt_latest.pt", "config.json", "log.jsonl")}
    with pytest.raises(SystemExit) as e:
        run(tmp_path)
    assert e.value.code == 2 and "--resume" in capsys.readouterr().err
    assert {n: (tmp_path / n).read_bytes() for n in before} == before
    # a run killed before its first checkpoint still owns its folder
    young = tmp_path / "young"
    young.mkdir()
    (young / "config.json").write_text("{}")
    with pytest.raises(SystemExit):
        run(young, "--steps", "1")
    assert (young / "config.json").read_text() == "{}"
    run(tmp_path, "--overwrite", "--stop_after", "1")
    assert json.loads((tmp_path / "config.json").read_text())["train"]["overwrite"] is True


# ----------------------------------------------------------------------------------------------------------------
# 6. determinism


@pytest.mark.slow
def test_same_seed_same_parameters_on_cpu(tmp_path, straight):
    run(tmp_path / "again")
    again = ckpt_of(tmp_path / "again")
    assert_same_nets(again, straight)
    run(tmp_path / "other_seed", "--seed", "1")
    other = ckpt_of(tmp_path / "other_seed")
    assert any(not torch.equal(other["G"][k], straight["G"][k]) for k in other["G"])  # the test can see a change
