"""train.py: a few steps train, resume is bit-exact, DDP equals one process, bad input gives clear errors."""
import dataclasses
import json
import os
import subprocess
import sys
import types

import pytest
import torch

import data
import gaugan
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "gaugan", "--height", "32", "--width", "64", "--ngf", "4", "--ndf", "4", "--n_layers_D", "2",
        "--workers", "0", "--progress", "false", "--num_samples", "2"]


def run(out, *extra):
    train.main(TINY + ["--out", str(out), *extra])


def load_G(path):
    return torch.load(path, map_location="cpu", weights_only=True)["G"]


def assert_same_params(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4, msg=k)


@pytest.mark.slow
def test_few_steps_write_samples_and_checkpoints(tmp_path):
    run(tmp_path, "--steps", "2", "--batch_size", "2", "--ckpt_every", "1", "--sample_every", "2")
    logs = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(v)) for r in logs for v in r.values())
    assert (tmp_path / "samples" / "step_000002.png").stat().st_size > 0
    cfg = json.load(open(tmp_path / "config.json"))
    assert cfg["model"]["ngf"] == 4 and cfg["train"]["steps"] == 2
    ckpt = train.load_checkpoint(tmp_path / "ckpt_latest.pt")
    assert ckpt["step"] == 2 and not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["G"])
    before, after = load_G(tmp_path / "ckpt_prev.pt"), ckpt["G"]  # step 1 vs step 2: parameters moved
    assert any(not torch.equal(before[k], after[k]) for k in after)
    # the checkpoint rebuilds the same networks
    module, cfg, info, G, D = train.build_from_checkpoint(ckpt)
    assert module.__name__ == "gaugan" and info.height == 32


@pytest.mark.slow
def test_resume_is_bit_exact(tmp_path):
    run(tmp_path / "straight", "--steps", "4", "--batch_size", "2")
    run(tmp_path / "sliced", "--steps", "4", "--batch_size", "2", "--stop_after", "2")
    assert train.load_checkpoint(tmp_path / "sliced" / "ckpt_latest.pt")["step"] == 2
    run(tmp_path / "sliced", "--steps", "4", "--batch_size", "2", "--resume")
    assert_same_params(load_G(tmp_path / "straight" / "ckpt_latest.pt"),
                       load_G(tmp_path / "sliced" / "ckpt_latest.pt"))


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py"), *TINY, "--steps", "2", "--batch_size", "2", "--out",
           str(tmp_path / "ddp")]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    run(tmp_path / "single", "--steps", "2", "--batch_size", "4")
    a = torch.load(tmp_path / "ddp" / "ckpt_latest.pt", weights_only=True)
    b = torch.load(tmp_path / "single" / "ckpt_latest.pt", weights_only=True)
    # Compare the gradients of the last step, which Adam with beta1 = 0 keeps as exp_avg. Parameters themselves
    # are not a fair test: conv biases in front of a norm layer have a zero true gradient, so both runs hold
    # float noise there and Adam turns any noise into a full lr-sized step in an arbitrary direction.
    # Those same biases carry gradients of pure float noise (~1e-6), so the absolute floor is set against the
    # whole gradient's norm; every tensor with a real gradient is held to 1e-3 relative.
    for opt in ("opt_G", "opt_D"):
        assert a[opt]["state"].keys() == b[opt]["state"].keys()
        total = torch.cat([s["exp_avg"].flatten() for s in b[opt]["state"].values()]).norm()
        for i in a[opt]["state"]:
            ga, gb = a[opt]["state"][i]["exp_avg"], b[opt]["state"][i]["exp_avg"]
            assert (ga - gb).norm() <= 1e-3 * gb.norm() + 1e-5 * total, (opt, i, (ga - gb).norm(), gb.norm(), total)
    # and the parameters, up to what noise-driven entries can reach: each of the two Adam steps moves an entry by
    # at most ~1.4 lr (beta1 = 0, beta2 = 0.9, bias-corrected), in either direction in either run
    lr = a["opt_G"]["param_groups"][0]["initial_lr"]
    assert_same_params(a["G"], b["G"], atol=5 * lr)


def expect_error(capsys, argv, *fragments):
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    for f in fragments:
        assert f in err, err
    assert "Traceback" not in err
    return err


def test_unknown_model_and_dataset_and_missing_root(tmp_path, capsys):
    expect_error(capsys, ["--model", "pix2pix"], "unknown model", "pix2pix")
    expect_error(capsys, TINY + ["--dataset", "imagenet", "--out", str(tmp_path / "a")], "imagenet")
    missing = str(tmp_path / "nowhere")
    expect_error(capsys, TINY + ["--dataset", "cityscapes", "--dataroot", missing, "--out", str(tmp_path / "b")],
                 missing)


@pytest.mark.slow
def test_corrupt_checkpoint_and_existing_run(tmp_path, capsys):
    run(tmp_path, "--steps", "1", "--batch_size", "2")
    latest = tmp_path / "ckpt_latest.pt"
    good = latest.read_bytes()
    # an existing run folder is not overwritten without --resume or --overwrite
    expect_error(capsys, TINY + ["--out", str(tmp_path), "--steps", "1"], "--resume", "--overwrite")
    assert latest.read_bytes() == good
    # a truncated checkpoint names the file; with no earlier one to fall back on, resume refuses
    latest.write_bytes(good[: len(good) // 2])
    err = expect_error(capsys, TINY + ["--out", str(tmp_path), "--steps", "2", "--resume"], "ckpt_latest.pt")
    assert "corrupt" in err or "truncated" in err
    # a checkpoint whose model config differs is refused, saying what differs
    latest.write_bytes(good)
    expect_error(capsys, TINY + ["--out", str(tmp_path), "--steps", "2", "--resume", "--ngf", "8"], "ngf")
    assert latest.read_bytes() == good
    with pytest.raises(train.CheckpointError, match="nothing.pt"):
        train.load_checkpoint(tmp_path / "nothing.pt")


@pytest.mark.slow
def test_ecgan_trains_its_own_label_generator_and_resumes(tmp_path):
    """Without --segmenter, ECGAN's run trains G_l into its folder first; --resume must accept that config."""
    argv = [a if a != "gaugan" else "ecgan" for a in TINY] + [
        "--out", str(tmp_path), "--steps", "2", "--batch_size", "2", "--segmenter_steps", "3", "--proj_dim", "8"]
    train.main(argv + ["--stop_after", "1"])
    assert (tmp_path / "segmenter.pt").is_file()
    seg_bytes = (tmp_path / "segmenter.pt").read_bytes()
    train.main(argv + ["--resume"])
    ckpt = train.load_checkpoint(tmp_path / "ckpt_latest.pt")
    assert ckpt["step"] == 2 and ckpt["model_cfg"]["segmenter"] == str(tmp_path / "segmenter.pt")
    assert (tmp_path / "segmenter.pt").read_bytes() == seg_bytes  # trained once, reused on resume


@dataclasses.dataclass
class HookedConfig(gaugan.GauGANConfig):
    segmenter: str = ""  # a frozen segmenter's file, read as ECGAN's G_l reads it


@pytest.mark.slow
def test_what_a_model_needs_comes_from_its_hooks_not_its_name(tmp_path, monkeypatch):
    """A model train.py does not know by name gets real edges and a segmenter trained for it when its file says so
    (needs_edges, needs_segmenter); GauGAN, without the hooks, gets neither."""
    seen, gaugan_g_step = [], gaugan.g_step

    def g_step(G, D, batch, cfg, vgg=None):
        seen.append(batch)
        return gaugan_g_step(G, D, batch, cfg, vgg)
    hooked = types.ModuleType("hooked")
    hooked.Config, hooked.build, hooked.g_step, hooked.d_step, hooked.sample = (
        HookedConfig, gaugan.build, g_step, gaugan.d_step, gaugan.sample)
    hooked.needs_edges = hooked.needs_segmenter = lambda cfg: True
    monkeypatch.setitem(train.MODELS, "hooked", hooked)
    more = ["--steps", "1", "--batch_size", "2", "--segmenter_steps", "2", "--cache_dir", str(tmp_path / "cache")]
    train.main([a if a != "gaugan" else "hooked" for a in TINY] + more + ["--out", str(tmp_path / "hooked")])
    assert torch.equal(seen[-1]["edge"], data.canny(seen[-1]["image"]))
    own = tmp_path / "hooked" / "segmenter.pt"
    assert own.is_file() and json.load(open(tmp_path / "hooked" / "config.json"))["model"]["segmenter"] == str(own)
    monkeypatch.setattr(gaugan, "g_step", g_step)
    run(tmp_path / "plain", *more)
    assert "edge" not in seen[-1] and not (tmp_path / "plain" / "segmenter.pt").exists()


def test_paper_preset_without_vgg_is_refused_naming_the_flag(tmp_path, capsys):
    """Without --vgg the weight-10 VGG term of GauGAN's and ECGAN's Eq. 10 losses would be silently missing."""
    out = tmp_path / "run"
    err = expect_error(capsys, TINY + ["--preset", "paper", "--steps", "1", "--out", str(out)],
                       "--preset paper needs --vgg", "--vgg off")
    assert len(err.strip().splitlines()) == 1 and not out.exists()
    tcfg, _ = train.parse_args(["--model", "gaugan", "--preset", "paper", "--vgg", "off"])  # off on purpose: allowed
    assert tcfg.vgg == ""


@pytest.mark.slow
def test_config_json_records_the_loss_terms_and_the_log_says_when_vgg_is_off(tmp_path, capsys):
    run(tmp_path / "off", "--steps", "1", "--batch_size", "2")
    printed = capsys.readouterr().out
    assert "VGG19 weights not given" in printed and "not in the loss" in printed
    terms = json.load(open(tmp_path / "off" / "config.json"))["loss_terms"]
    assert "G_gan" in terms and "G_feat" in terms and "G_vgg" not in terms
    weights = tmp_path / "vgg19.pth"  # torchvision's layout (random values: only which terms are active matters)
    torch.save(train.gaugan.VGG19Features().state_dict(), weights)
    run(tmp_path / "on", "--steps", "1", "--batch_size", "2", "--vgg", str(weights))
    assert "VGG19 weights not given" not in capsys.readouterr().out
    terms = json.load(open(tmp_path / "on" / "config.json"))["loss_terms"]
    assert "G_gan" in terms and "G_vgg" in terms
