"""Tests for eval.py: Fréchet distance against closed forms, mIoU/Acc on hand-made labels, SSIM/PSNR, the FID
Inception's state-dict layout, the built-in segmenter, an end-to-end eval and its error messages."""

import importlib.util
import json
import math
import time

import pytest
import torch

import eval as evaluation
import fid
import figures
import metrics
import segmenter
import segmenter_train


def _has(module):
    return importlib.util.find_spec(module) is not None


# ---------------------------------------------------------------------------------------------------------------
# Fréchet distance

def test_frechet_distance_of_a_set_to_itself_is_zero():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(50, 64, generator=g)  # fewer samples than dims: rank-deficient covariance
    assert abs(fid.fid_from_features(f, f)) < 1e-6


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    g = torch.Generator().manual_seed(1)
    d = 8
    mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    v1 = torch.rand(d, generator=g, dtype=torch.float64) + 0.1
    v2 = torch.rand(d, generator=g, dtype=torch.float64) + 0.1
    expected = ((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * (v1 * v2).sqrt()).sum()
    got = fid.frechet_distance(mu1, torch.diag(v1), mu2, torch.diag(v2))
    assert got == pytest.approx(float(expected), rel=1e-9, abs=1e-9)


def test_frechet_distance_matches_closed_form_for_commuting_full_covariances():
    # S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T commute, so tr sqrt(S1 S2) = sum sqrt(a b)
    g = torch.Generator().manual_seed(2)
    d = 6
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    a, b = torch.rand(d, generator=g, dtype=torch.float64) + 0.1, torch.rand(d, generator=g, dtype=torch.float64)
    b[0] = 0  # rank-deficient S2
    s1, s2 = q @ torch.diag(a) @ q.T, q @ torch.diag(b) @ q.T
    mu = torch.zeros(d, dtype=torch.float64)
    expected = (a + b - 2 * (a * b).sqrt()).sum()
    # a zero eigenvalue carries ~1e-16 round-off whose square root is ~1e-8: that bounds the agreement
    assert fid.frechet_distance(mu, s1, mu, s2) == pytest.approx(float(expected), rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# mIoU / accuracy

def test_miou_and_accuracy_on_hand_made_labels():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 2, 2]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 2, 0, 2]])
    conf = metrics.confusion_matrix(pred, target, 3)
    s = metrics.segmentation_scores(conf)
    # class 0: tp 1, gt 2, pred 2 -> 1/3; class 1: tp 2, gt 2, pred 3 -> 2/3; class 2: tp 3, gt 4, pred 3 -> 3/4
    assert s["mIoU"] == pytest.approx((1 / 3 + 2 / 3 + 3 / 4) / 3)
    assert s["accuracy"] == pytest.approx(6 / 8)


def test_miou_ignores_labels_and_counts_out_of_range_predictions_as_wrong():
    target = torch.tensor([0, 0, 1, 1, 3, 3])  # 3 = dontcare id for num_classes=3
    pred = torch.tensor([0, 3, 1, 1, 0, 2])    # a dontcare prediction on a real pixel is wrong
    conf = metrics.confusion_matrix(pred, target, 3, ignore=(3,))
    assert int(conf.sum()) == 4  # the two dontcare pixels are not counted
    s = metrics.segmentation_scores(conf, ignore=(3,))
    # class 0: tp 1, gt 2, pred 1 -> 1/2; class 1: 1; class 2 absent everywhere counted -> not averaged
    assert s["mIoU"] == pytest.approx(0.75)
    assert s["accuracy"] == pytest.approx(3 / 4)
    # ignoring a real class drops its pixels and its IoU
    conf = metrics.confusion_matrix(pred, target, 3, ignore=(3, 1))
    s = metrics.segmentation_scores(conf, ignore=(3, 1))
    assert s["mIoU"] == pytest.approx(0.5) and s["accuracy"] == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------------------------
# Cross-view pixel and classifier metrics

def test_ssim_psnr_sharpness_of_identical_images():
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(metrics.ssim(x, x), torch.ones(2), atol=1e-6)
    assert torch.allclose(metrics.ssim(x * 255, x * 255, data_range=255), torch.ones(2), atol=1e-6)
    assert torch.all(metrics.psnr(x, x) == metrics.PSNR_CAP)
    assert torch.all(metrics.sharpness_difference(x, x) == metrics.PSNR_CAP)
    y = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    assert torch.all(metrics.ssim(x, y) < 0.99)
    mse = ((x - y) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(metrics.psnr(x, y), 10 * torch.log10(1 / mse), atol=1e-4)
    # the same images on the [0, 255] scale give the same PSNR
    assert torch.allclose(metrics.psnr(x * 255, y * 255, data_range=255), metrics.psnr(x, y), atol=1e-3)


def test_sharpness_difference_matches_naive_loops():
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(1, 1, 5, 6, generator=g), torch.rand(1, 1, 5, 6, generator=g)
    total = 0.0
    for i in range(1, 5):
        for j in range(1, 6):
            gx = abs(x[0, 0, i, j] - x[0, 0, i - 1, j]) + abs(x[0, 0, i, j] - x[0, 0, i, j - 1])
            gy = abs(y[0, 0, i, j] - y[0, 0, i - 1, j]) + abs(y[0, 0, i, j] - y[0, 0, i, j - 1])
            total += abs(float(gx - gy))
    expected = 10 * math.log10(1 / (total / 20))
    assert float(metrics.sharpness_difference(x, y)) == pytest.approx(expected, rel=1e-5)


def test_classifier_metrics():
    real = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 0.1]])
    fake = torch.tensor([[4.0, 0, 0], [0, 0, 5.0], [0, 0, 3.0]])
    assert metrics.topk_accuracy(fake, real, 1) == pytest.approx(2 / 3)
    assert metrics.topk_accuracy(fake, real, 1, min_conf=0.5) == pytest.approx(1 / 2)
    assert metrics.topk_accuracy(fake, real, 3) == 1.0
    assert metrics.kl_score(real, real) == pytest.approx(0.0, abs=1e-12)
    # confident, evenly spread predictions over N classes give an inception-style score close to N
    assert metrics.inception_style_score(torch.eye(3) * 50) == pytest.approx(3.0, rel=1e-6)
    assert metrics.inception_style_score(torch.zeros(4, 3)) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------------------------
# FID Inception

KNOWN_FID_SHAPES = {  # from pytorch-fid's pt_inception-2015-12-05-6726825d.pth (torchvision inception_v3 layout)
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_1a_3x3.bn.running_var": (32,),
    "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
    "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
    "Mixed_7b.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}


def test_fid_inception_accepts_the_weights_file_layout(tmp_path):
    t0 = time.time()
    model = fid.FIDInceptionV3()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for k, shape in KNOWN_FID_SHAPES.items():
        assert shapes[k] == shape, k
    assert not any(k.startswith("AuxLogits") for k in shapes)  # the FID weights file has no aux head
    assert sum(p.numel() for p in model.parameters()) == 23_850_960  # torchvision's no-aux count + 8 more fc rows
    # a random state dict with exactly those keys and shapes (num_batches_tracked dropped, as in older files)
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.rand(v.shape, generator=g) + 0.5) if "running_var" in k
             else torch.randn(v.shape, generator=g) * 0.05
             for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / fid.FID_WEIGHTS_FILE
    torch.save(state, path)
    net = fid.load_fid_inception(path)
    assert torch.equal(net.Mixed_7c.branch_pool.conv.weight, state["Mixed_7c.branch_pool.conv.weight"])
    feats = net(torch.rand(2, 3, 32, 64) * 2 - 1)  # resized to 299x299 inside
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all()
    assert time.time() - t0 < 10


def test_fid_inception_rejects_wrong_weights_with_the_file_name(tmp_path):
    state = fid.FIDInceptionV3().state_dict()
    bad = dict(state)
    bad["fc.weight"] = torch.zeros(1000, 2048)  # torchvision's ImageNet head
    del bad["Mixed_7c.branch_pool.conv.weight"]
    path = tmp_path / "imagenet_inception.pth"
    torch.save(bad, path)
    with pytest.raises(evaluation.EvalError, match="imagenet_inception.pth.*missing.*Mixed_7c.*fc.weight"):
        fid.load_fid_inception(path)
    with pytest.raises(evaluation.EvalError, match="not found: .*nowhere.pth"):
        fid.load_fid_inception(tmp_path / "nowhere.pth")


# ---------------------------------------------------------------------------------------------------------------
# Built-in segmenter

import data  # noqa: E402


def _synthetic(split, n, crossview=False):
    """n samples of the built-in synthetic scenes at 32x64 (a list: rendered once) and their DataInfo."""
    if hasattr(data, "make_dataset"):
        ds = data.make_dataset("synthetic_crossview" if crossview else "synthetic", split=split, size=(32, 64))
    else:  # data.make_dataset not landed yet: the synthetic class it wraps
        ds = data.SyntheticStreets(split, (32, 64), length=n, crossview=crossview)
    return [ds[i] for i in range(n)], ds.info


@pytest.mark.parametrize("steps", [1, 2, 9, 10, 11])
def test_segmenter_trains_any_number_of_steps(steps):
    """The one-cycle schedule needs a warm-up of at least one step: 10 steps (10% = 1) divided by zero once."""
    train_items, info = _synthetic("train", 8)
    seg = segmenter_train.train_segmenter(train_items, info, steps=steps, batch_size=4, width=4, progress=False)
    assert all(torch.isfinite(p).all() for p in seg.parameters())


@pytest.mark.slow
def test_segmenter_trains_on_synthetic_scenes_and_beats_chance(tmp_path):
    train_items, info = _synthetic("train", 64)
    val_items, _ = _synthetic("val", 16)
    path = tmp_path / "seg.pt"
    torch.manual_seed(0)
    rng_before = torch.get_rng_state()
    seg = segmenter_train.train_segmenter(train_items, info, steps=40, batch_size=8, width=8, out_path=path,
                                     progress=False)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's random stream is untouched
    image = torch.stack([v["image"] for v in val_items])
    label = torch.stack([v["label"] for v in val_items])
    s = metrics.segmentation_scores(metrics.confusion_matrix(metrics.segment(seg, image), label,
                                                                   info.num_classes))
    majority = torch.bincount(label.flatten()).max().item() / label.numel()  # always predicting the commonest class
    assert s["accuracy"] > majority + 0.15, (s, majority)
    assert s["mIoU"] > majority / info.num_classes + 0.05, s  # the majority predictor's mIoU is <= majority / C
    # the cached checkpoint and a TorchScript export load back to the same predictions
    logits = seg(image)
    assert torch.allclose(segmenter_train.load_segmenter(path, info)(image), logits)
    torch.jit.save(torch.jit.script(seg), tmp_path / "seg_ts.pt")
    assert torch.allclose(segmenter_train.load_segmenter(tmp_path / "seg_ts.pt")(image), logits, atol=1e-5)


def test_load_segmenter_errors_name_the_file(tmp_path):
    info = data.DataInfo("synthetic", 10, False, True, 32, 64)
    with pytest.raises(evaluation.EvalError, match="not found: .*missing_seg.pt"):
        segmenter_train.load_segmenter(tmp_path / "missing_seg.pt")
    seg = segmenter.Segmenter(5, width=4)
    torch.save({"kind": "segmenter", "label_nc": 5, "width": 4, "state": seg.state_dict()}, tmp_path / "five.pt")
    with pytest.raises(evaluation.EvalError, match="five.pt: segmenter predicts 5 labels.*10"):
        segmenter_train.load_segmenter(tmp_path / "five.pt", info)
    state = seg.state_dict()
    state["classify.weight"] = torch.zeros(6, 4, 1, 1)
    torch.save({"kind": "segmenter", "label_nc": 5, "width": 4, "state": state}, tmp_path / "bad.pt")
    with pytest.raises(evaluation.EvalError, match=r"bad.pt does not match the built-in Segmenter.*classify.weight"):
        segmenter_train.load_segmenter(tmp_path / "bad.pt")
    torch.save({"G": {}}, tmp_path / "other.pt")
    with pytest.raises(evaluation.EvalError, match="other.pt: not a built-in segmenter"):
        segmenter_train.load_segmenter(tmp_path / "other.pt")


# ---------------------------------------------------------------------------------------------------------------
# End to end, and checkpoint errors

TINY = ["--model", "gaugan", "--height", "32", "--width", "64", "--ngf", "4", "--ndf", "4", "--n_layers_D", "2",
        "--workers", "0", "--progress", "false", "--num_samples", "2"]


def _tiny_gaugan_checkpoint(path, info=None, ngf=4, model="gaugan"):
    """A checkpoint dict in train.py's format, built without training (for the error tests)."""
    import dataclasses
    import gaugan
    info = info or data.DataInfo("synthetic", 10, False, True, 32, 64, class_names=list(data.SYNTH_CLASSES))
    cfg = gaugan.GauGANConfig(ngf=ngf, ndf=4, n_layers_D=2)
    G, D = gaugan.build(cfg, info)
    ckpt = {"model": model, "model_cfg": dataclasses.asdict(cfg), "train_cfg": {"dataset": "synthetic"},
            "info": dataclasses.asdict(info), "G": G.state_dict(), "D": D.state_dict(), "opt_G": {}, "opt_D": {},
            "scaler": None, "step": 1, "rng": []}
    torch.save(ckpt, path)
    return ckpt


@pytest.mark.slow
def test_end_to_end_eval_of_a_tiny_checkpoint_writes_metrics_json(tmp_path):
    if not hasattr(data, "make_dataset"):
        pytest.skip("data.make_dataset not available yet (train.py needs it to make a checkpoint)")
    import train
    run = tmp_path / "run"
    train.main(TINY + ["--out", str(run), "--steps", "1", "--batch_size", "2"])
    out = tmp_path / "eval"
    evaluation.main(["--ckpt", str(run / "ckpt_latest.pt"), "--out", str(out), "--num", "5", "--batch_size", "2",
                     "--seg_steps", "2", "--device", "cpu"])
    res = json.loads((out / "metrics.json").read_text())
    m = res["metrics"]
    assert res["model"] == "gaugan" and res["num_images"] == 5 and res["resolution"] == "32x64"
    assert "FID" not in m and m["FID (segmenter features)"] >= 0  # no Inception weights: clearly labelled stand-in
    assert 0 <= m["mIoU"] <= 1 and 0 <= m["pixel accuracy"] <= 1
    assert 0 <= m["mIoU (real images: segmenter ceiling)"] <= 1
    assert "ignored" in res["protocol"]["mIoU"] and "32x64" in res["protocol"]["mIoU"]
    assert len(list((out / "fake").glob("*.png"))) == 5 and len(list((out / "real").glob("*.png"))) == 5
    assert (out / "grid.png").stat().st_size > 0
    assert (out / "segmenter_synthetic_32x64.pt").is_file()  # cached for the next evaluation


def test_flags_use_underscores_and_the_old_dashed_spelling_parses_the_same():
    common = ["--ckpt", "run/ckpt_latest.pt", "--device", "cpu"]
    p, new = evaluation.parse_args(common + ["--train_segmenter", "--batch_size", "3", "--seg_steps", "5",
                                             "--no_images"])
    _, old = evaluation.parse_args(common + ["--train-segmenter", "--batch-size", "3", "--seg-steps", "5",
                                             "--no-images"])
    assert vars(new) == vars(old)
    assert (new.train_segmenter, new.batch_size, new.seg_steps, new.no_images) == (True, 3, 5, True)
    _, default = evaluation.parse_args(common)  # the hidden aliases leave the defaults alone
    assert (default.train_segmenter, default.batch_size, default.seg_steps, default.no_images) == (False, 8, None,
                                                                                                    False)
    shown = p.format_help()
    assert "--seg_steps" in shown and "--batch_size" in shown and "--seg-steps" not in shown


def test_eval_errors_name_the_checkpoint(tmp_path, capsys):
    with pytest.raises(evaluation.EvalError, match="checkpoint not found: .*nope.pt"):
        evaluation.evaluate(tmp_path / "nope.pt")
    with pytest.raises(SystemExit) as e:
        evaluation.main(["--ckpt", str(tmp_path / "nope.pt")])
    assert e.value.code == 2 and "nope.pt" in capsys.readouterr().err
    # a checkpoint of a model this repo does not know
    _tiny_gaugan_checkpoint(tmp_path / "pix2pixhd.pt", model="pix2pixhd")
    with pytest.raises(evaluation.EvalError, match="pix2pixhd.pt.*'pix2pixhd'"):
        evaluation.evaluate(tmp_path / "pix2pixhd.pt")
    # weights of another architecture under a known model name
    ckpt = _tiny_gaugan_checkpoint(tmp_path / "mismatch.pt")
    ckpt["G"] = _tiny_gaugan_checkpoint(tmp_path / "wide.pt", ngf=8)["G"]
    torch.save(ckpt, tmp_path / "mismatch.pt")
    with pytest.raises(evaluation.EvalError, match="mismatch.pt.*G weights"):
        evaluation.evaluate(tmp_path / "mismatch.pt")
    # a segmenter (or any other file) given as --ckpt
    torch.save({"kind": "segmenter", "state": {}}, tmp_path / "segmenter.pt")
    with pytest.raises(evaluation.EvalError, match="segmenter.pt.*not a training checkpoint"):
        evaluation.evaluate(tmp_path / "segmenter.pt")


@pytest.mark.slow
def test_end_to_end_crossview_eval_with_a_torchscript_classifier(tmp_path):
    if not _has("lggan"):
        pytest.skip("lggan.py not available")
    import dataclasses
    import lggan
    _, info = _synthetic("train", 1, crossview=True)
    small = {"task": "crossview", "ngf": 4, "ndf": 4, "n_res": 1}  # tiny widths; only fields lggan.Config has
    names = {f.name for f in dataclasses.fields(lggan.Config)}
    cfg = lggan.Config(**{k: v for k, v in small.items() if k in names})
    G, D = lggan.build(cfg, info)
    ckpt = {"model": "lggan", "model_cfg": dataclasses.asdict(cfg), "train_cfg": {"dataset": "synthetic"},
            "info": dataclasses.asdict(info), "G": G.state_dict(), "D": D.state_dict(), "opt_G": {}, "opt_D": {},
            "scaler": None, "step": 1, "rng": []}
    torch.save(ckpt, tmp_path / "ckpt.pt")

    class SceneClassifier(torch.nn.Module):  # stands in for a user's Places365 export
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 6)

        def forward(self, x):
            return self.fc(x.mean(dim=(2, 3))) * 5

    torch.jit.save(torch.jit.script(SceneClassifier()), tmp_path / "places.pt")
    res = evaluation.evaluate(tmp_path / "ckpt.pt", out=tmp_path / "eval", num=3, batch_size=2, seg_steps=2,
                              classifier=str(tmp_path / "places.pt"), progress=False)
    m = res["metrics"]
    assert -1 <= m["SSIM"] <= 1 and 0 < m["PSNR"] <= metrics.PSNR_CAP and m["sharpness difference"] > 0
    assert 0 <= m["top-1 accuracy"] <= m["top-5 accuracy"] <= 1 and m["KL"] >= 0
    assert 1 <= m["inception-style score (all)"] <= 6
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"] == m


@pytest.mark.slow
def test_figures_of_a_tiny_lggan_plus_plus_checkpoint(tmp_path):
    """--figures writes LGGAN Figs. 12, 13 and SAU Fig. 5 for an LGGAN++ checkpoint (training a segmenter when
    none is cached); a plain GauGAN checkpoint gets its semantic maps and no SAU figure."""
    import train
    t0 = time.time()
    run = tmp_path / "run"
    lg = [a if a != "gaugan" else "lggan" for a in TINY]
    train.main(lg + ["--upsample", "sau", "--out", str(run), "--steps", "1", "--batch_size", "2"])
    written = evaluation.main(["--figures", "--ckpt", str(run / "ckpt_latest.pt"), "--num", "2", "--seg_steps", "2",
                               "--device", "cpu"])
    names = {"lggan_fig12_class_features.png", "lggan_fig13_semantic_maps.png", "sau_fig5_kernels.png"}
    assert {p.name for p in written.values()} == names
    for name in names:
        assert (run / "figures" / name).stat().st_size > 0
    gg = tmp_path / "gaugan"
    train.main(TINY + ["--out", str(gg), "--steps", "1", "--batch_size", "2"])
    written = figures.make_figures(gg / "ckpt_latest.pt", out=tmp_path / "gfig", num=2, device="cpu",
                                      segmenter=str(run / "figures" / "segmenter_synthetic_32x64.pt"))
    assert [p.name for p in written.values()] == ["gaugan_semantic_maps.png"]
    assert time.time() - t0 < 60


# ---------------------------------------------------------------------------------------------------------------
# Cityscapes on the 19 train ids; the built-in segmenter's cost said up front, scaled to the data, held out

def test_cityscapes_scored_on_19_train_ids():
    info = data.DataInfo("cityscapes", 35, False, True, 4, 4)
    label = torch.tensor([[[7, 7, 26, 26], [0, 0, 34, 24], [7, 8, 26, 26], [3, 3, 24, 24]]])  # 0, 3, 34: void

    class Fixed(torch.nn.Module):  # logits that predict a given id map
        def __init__(self, pred, n):
            super().__init__()
            self.pred, self.n = pred, n

        def forward(self, image):
            return torch.nn.functional.one_hot(self.pred, self.n).permute(0, 3, 1, 2).float()

    image = torch.zeros(1, 3, 4, 4)
    conf = metrics.confusion_of(Fixed(label, 35), image, label, info)
    assert conf.shape == (19, 20) and conf.sum() == 11  # the 5 void / license-plate pixels are not counted
    s = metrics.segmentation_scores(conf)
    assert s["mIoU"] == 1.0 and s["accuracy"] == 1.0
    wrong = label.clone()
    wrong[0, 0, 0] = 34  # a road pixel predicted as license plate (no train id): wrong, not ignored
    s = metrics.segmentation_scores(metrics.confusion_of(Fixed(wrong, 35), image, label, info))
    assert s["accuracy"] == 10 / 11
    # a segmenter over the 19 train ids (a DRN export) is read directly
    train_ids = data.cityscapes_train_ids(label)
    conf19 = metrics.confusion_of(Fixed(train_ids.clamp(max=18), 19), image, label, info)
    assert torch.equal(conf19, conf)


def test_segmenter_steps_scale_with_the_data_and_a_part_is_held_out():
    steps = [segmenter_train.auto_segmenter_steps(n) for n in (1, 11, 100, 400, 1800, 3000)]
    assert steps[0] == steps[1] == segmenter_train.SEG_STEPS_MIN and steps[-1] == segmenter_train.SEG_STEPS_MAX
    assert steps[3] == segmenter_train.SEG_EPOCHS * 400 // 8 and steps == sorted(steps)
    for n in (3, 4, 13, 2000):
        fit, held = segmenter_train.holdout_split(n)
        assert sorted(fit + held) == list(range(n)) and not set(fit) & set(held)
        assert len(held) == (0 if n < 4 else 1 if n < 10 else max(2, round(0.1 * n)))
    assert segmenter_train.holdout_split(13) == segmenter_train.holdout_split(13)


@pytest.mark.slow
def test_eval_says_what_the_segmenter_costs_holds_out_and_reuses_the_cache(tmp_path, capsys, monkeypatch):
    ckpt = tmp_path / "run" / "ckpt.pt"
    ckpt.parent.mkdir()
    _tiny_gaugan_checkpoint(ckpt)
    out = tmp_path / "eval"
    res = evaluation.evaluate(ckpt, out=out, num=2, batch_size=4, seg_steps=4, save_images=False, progress=False,
                              device="cpu")
    lines = capsys.readouterr().out.splitlines()
    first = lines[0]
    assert "4 steps" in first and "--segmenter FILE" in first and "--seg_steps 0" in first and "cached at" in first
    assert any("s/step measured" in line for line in lines[1:3])
    held = res["metrics"]["mIoU (segmenter on held-out training images)"]
    assert held is not None and 0 <= held <= 1
    assert "200 real training images held out" in res["protocol"]["mIoU (segmenter on held-out training images)"]
    # the second evaluation trains nothing and still reports the held-out score stored with the segmenter
    monkeypatch.setattr(segmenter_train, "train_segmenter", lambda *a, **k: pytest.fail("segmenter trained again"))
    res2 = evaluation.evaluate(ckpt, out=out, num=2, batch_size=4, save_images=False, progress=False, device="cpu")
    assert res2["metrics"]["mIoU (segmenter on held-out training images)"] == held
    assert "no --segmenter given" not in capsys.readouterr().out


@pytest.mark.slow
def test_ecgan_label_generator_is_cached_and_progress_false_is_silent(tmp_path, capsys, monkeypatch):
    import train
    argv = [a if a != "gaugan" else "ecgan" for a in TINY] + [
        "--steps", "1", "--batch_size", "2", "--segmenter_steps", "3", "--proj_dim", "8",
        "--cache_dir", str(tmp_path / "cache")]
    train.main(argv + ["--out", str(tmp_path / "a")])
    cap = capsys.readouterr()
    assert "\r" not in cap.err + cap.out  # --progress false: no bar, the segmenter's included
    cached = list((tmp_path / "cache").glob("G_l_synthetic_32x64_3steps_*.pt"))
    assert len(cached) == 1 and (tmp_path / "a" / "segmenter.pt").read_bytes() == cached[0].read_bytes()
    monkeypatch.setattr(segmenter_train, "train_segmenter", lambda *a, **k: pytest.fail("G_l trained again"))
    train.main(argv + ["--out", str(tmp_path / "b")])  # a new run (another Table 3 row) on the same data
    assert (tmp_path / "b" / "segmenter.pt").read_bytes() == cached[0].read_bytes()
    assert "cached at" in capsys.readouterr().out
    assert not [p for p in (tmp_path / "cache").iterdir() if ".tmp" in p.name]
    # other steps: another cache entry
    monkeypatch.undo()
    train.main(argv[:-2] + ["--cache_dir", str(tmp_path / "cache"), "--segmenter_steps", "4", "--out",
                            str(tmp_path / "c")])
    assert len(list((tmp_path / "cache").glob("G_l_*.pt"))) == 2


@pytest.mark.slow
def test_eval_and_resume_bad_input_gets_one_line(tmp_path):
    """eval.py and train.py --resume given the wrong files: one line naming the file, nothing written."""
    from test_data import run_cli
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ckpt = run_dir / "ckpt_latest.pt"
    _tiny_gaugan_checkpoint(ckpt)
    (tmp_path / "notes.txt").write_text("not weights")
    out = tmp_path / "out"
    cases = [
        (["--ckpt", tmp_path / "missing.pt"], r"checkpoint not found: .*missing\.pt"),
        (["--ckpt", tmp_path / "notes.txt"], r"notes\.txt: not a training checkpoint"),
        (["--ckpt", ckpt, "--segmenter", ckpt], r"ckpt_latest\.pt: not a built-in segmenter"),
        (["--ckpt", ckpt, "--inception", tmp_path / "notes.txt"], r"notes\.txt"),  # before any segmenter training
        (["--ckpt", ckpt, "--classifier", tmp_path / "notes.txt"], r"notes\.txt: not a TorchScript"),
        (["--ckpt", ckpt, "--num", "0"], r"--num 0: expected"),
        (["--ckpt", ckpt, "--dataset", "coco", "--dataroot", tmp_path / "missing"], r"missing: dataset root not found"),
    ]
    for args, pattern in cases:
        run_cli("eval.py", [*args, "--out", out], out, pattern)
    # a checkpoint of another model in the run folder: --resume says so and leaves the folder as it was
    before = sorted(p.name for p in run_dir.iterdir())
    run_cli("train.py", ["--model", "lggan", "--height", "32", "--width", "64", "--out", run_dir, "--resume",
                         "--progress", "false"], out, r"ckpt_latest\.pt: checkpoint is of model 'gaugan', not 'lggan'")
    assert sorted(p.name for p in run_dir.iterdir()) == before


# ---------------------------------------------------------------------------------------------------------------
# Sharper metrics: boundary band, small objects, class-conditional patch realism

def _naive_band(label, d, valid):
    B, H, W = label.shape
    out = torch.zeros_like(valid)
    for b in range(B):
        for y in range(H):
            for x in range(W):
                if not valid[b, y, x]:
                    continue
                for yy in range(max(0, y - d), min(H, y + d + 1)):
                    for xx in range(max(0, x - d), min(W, x + d + 1)):
                        if valid[b, yy, xx] and label[b, yy, xx] != label[b, y, x]:
                            out[b, y, x] = True
    return out


def test_boundary_band_matches_naive_loops_and_ignores_dontcare():
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, 3, (2, 3, 4), generator=g).repeat_interleave(3, 1).repeat_interleave(3, 2)  # blocks
    label[0, :2, :] = 3  # a dontcare strip
    for d in (1, 2, 3):
        valid = metrics.valid_mask(label, 3)
        assert torch.equal(metrics.boundary_band(label, d, valid), _naive_band(label, d, valid)), d
    # two halves: a band of d columns on each side; a dontcare gap between them is no boundary
    halves = torch.tensor([0] * 4 + [1] * 4).repeat(1, 6, 1)
    assert metrics.boundary_band(halves, 2)[0, 0].tolist() == [False] * 2 + [True] * 4 + [False] * 2
    gap = torch.tensor([0, 0, 0, 9, 9, 1, 1, 1]).repeat(1, 5, 1)
    valid = metrics.valid_mask(gap, 2)
    assert not metrics.boundary_band(gap, 2, valid).any()  # the nearest other class is 3 columns away
    assert metrics.boundary_band(gap, 3, valid)[0, 0].tolist() == [False, False, True, False, False, True, False, False]


def test_boundary_confusion_counts_only_band_pixels():
    info = data.DataInfo("synthetic", 2, False, True, 4, 8, class_names=["a", "b"])
    label = torch.tensor([0] * 4 + [1] * 4).repeat(1, 4, 1)
    pred = label.clone()
    pred[:, :, 0] = 1  # wrong far from the boundary: not counted in a band of 1
    pred[:, :, 4] = 0  # wrong inside the band

    class Fixed(torch.nn.Module):
        def forward(self, image):
            return torch.nn.functional.one_hot(pred, 2).permute(0, 3, 1, 2).float()

    c = metrics.confusions_of(Fixed(), torch.zeros(1, 3, 4, 8), label, info, band_px=1)
    assert c["band"].sum() == 8 and c["all"].sum() == 32
    band = metrics.segmentation_scores(c["band"])
    assert band["accuracy"] == 0.5 and band["iou"] == [1 / 2, 0.0]  # class 0: tp 4, union 8; class 1: tp 0


def test_small_class_ids_of_synthetic_and_cityscapes_and_bad_names():
    syn = data.DataInfo("synthetic", 10, False, True, 4, 4, class_names=list(data.SYNTH_CLASSES))
    assert [data.SYNTH_CLASSES[i] for i in metrics.small_class_ids(syn)] == ["pole", "sign", "person"]
    assert metrics.small_class_ids(syn, ["car", "3"]) == [3, data.SYNTH_CLASSES.index("car")]
    city = data.DataInfo("cityscapes", 35, False, True, 4, 4)
    assert [data.CITYSCAPES_TRAIN_NAMES[i] for i in metrics.small_class_ids(city)] == [
        "pole", "traffic light", "traffic sign", "person", "rider"]
    with pytest.raises(ValueError, match="'lamp': not a class of synthetic"):
        metrics.small_class_ids(syn, ["lamp"])
    with pytest.raises(ValueError, match="'10': expected an id in 0..9"):
        metrics.small_class_ids(syn, ["10"])
    assert metrics.small_object_iou([0.5, float("nan"), 0.1, 0.9], [1, 2, 3]) == pytest.approx(0.5)


def test_sliced_wasserstein_closed_forms():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 1, generator=g)
    assert metrics.sliced_wasserstein(a, a + 0.3) == pytest.approx(0.3)  # 1-D: directions are +-1, W1 of a shift
    a = torch.randn(300, 5, generator=g)
    assert metrics.sliced_wasserstein(a, a[torch.randperm(300, generator=g)]) == 0  # a set, not a sequence
    v = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0])
    dirs = torch.randn(5, 64, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    assert metrics.sliced_wasserstein(a, a + v, num_proj=64, seed=7) == pytest.approx(
        float((v.double() @ dirs).abs().mean()))  # a shift by v moves each projection by v . theta


def test_class_patch_swd_sanity_on_tiny_scenes():
    """Identical sets: 0; a slightly perturbed set is nearer than noise; patches sit where their class is."""
    g = torch.Generator().manual_seed(0)
    label = torch.zeros(4, 16, 24, dtype=torch.long)
    label[:, :, 12:] = 1
    label[:, 6:10, 4:8] = 2  # a small class, 16 centre pixels per image
    palette = torch.tensor([[0.8, 0.0, -0.8], [0.0, 0.0, 0.0], [-0.5, 0.0, 0.5]])
    image = palette[label].permute(0, 3, 1, 2)  # a colour per class
    image = image + 0.1 * torch.randn(image.shape, generator=g)
    def sample(**imgs):
        cp = metrics.ClassPatches(3, names=tuple(imgs), cap=128, k=3, seed=0, ignore=[1])
        for i in range(0, 4, 2):  # two batches through the reservoir
            cp.add(label[i:i + 2], **{k: v[i:i + 2] for k, v in imgs.items()})
        return cp
    cp = sample(real=image, same=image.clone(), near=image + 0.05 * torch.randn(image.shape, generator=g),
                noise=torch.rand(image.shape, generator=g) * 2 - 1)
    real = cp.patches("real")
    assert sorted(real) == [0, 2] and len(real[2]) == 64 and len(real[0]) == 128  # class 1 ignored; all of class 2
    centre = real[2].view(-1, 3, 3, 3)[:, :, 1, 1]
    assert torch.allclose(centre.mean(0), torch.tensor([-0.5, 0.0, 0.5]), atol=0.05)  # class 2's colour
    per, mean = metrics.class_swd(real, cp.patches("same"), min_patches=8)
    assert mean == 0 and sorted(per) == [0, 2]
    near = metrics.class_swd(real, cp.patches("near"), min_patches=8)[1]
    noise = metrics.class_swd(real, cp.patches("noise"), min_patches=8)[1]
    assert 0 < near < noise / 3
    assert sorted(metrics.class_swd(real, cp.patches("noise"), min_patches=100)[0]) == [0]  # class 2: 64 patches
    again = sample(real=image, same=image)
    assert all(torch.equal(again.patches("real")[c], real[c]) for c in real)  # seeded: the same sample


@pytest.mark.slow
def test_eval_reports_boundary_small_object_and_patch_metrics_beside_their_ceilings(tmp_path):
    ckpt = tmp_path / "run" / "ckpt.pt"
    ckpt.parent.mkdir()
    _tiny_gaugan_checkpoint(ckpt)
    res = evaluation.evaluate(ckpt, out=tmp_path / "eval", num=6, batch_size=3, seg_steps=3, save_images=False,
                              progress=False, device="cpu", patches_per_class=64)
    m, proto = res["metrics"], res["protocol"]
    for key in ("boundary mIoU", "boundary pixel accuracy", "small-object IoU"):
        assert 0 <= m[key] <= 1 and 0 <= m[f"{key} (real images: segmenter ceiling)"] <= 1
    assert "within 2 px (a 5x5 window)" in proto["boundary mIoU"]  # 3 px at 64 high, round(1.5) = 2 at 32
    assert "pole, sign, person" in proto["small-object IoU"]
    assert m["class patch SWD"] > m["class patch SWD (real vs real: floor)"] > 0  # an untrained G is far from real
    assert set(res["per_class"]["IoU [generated, real]"]) == set(data.SYNTH_CLASSES)
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"] == m
    with pytest.raises(evaluation.EvalError, match="--small_classes: small class 'lamp': not a class of synthetic"):
        evaluation.evaluate(ckpt, out=tmp_path / "eval", num=2, small_classes=["lamp"], seg_steps=0)


def test_cached_segmenter_of_another_recipe_is_not_reused(tmp_path):
    info = data.DataInfo("synthetic", 10, False, True, 32, 64, class_names=list(data.SYNTH_CLASSES))
    seg = segmenter.Segmenter(info.label_nc, width=4)
    path = segmenter_train.cache_path(tmp_path, "synthetic", info)
    segmenter_train.save_segmenter(seg, info, 5, path)  # an older file: no recipe
    notes = []
    found = segmenter_train.find_segmenter(None, [tmp_path], "synthetic", info, None, 0, 8, "cpu", notes)
    assert found == (None, None) and "ignored cached segmenter" in notes[0] and "None" in notes[0]
    segmenter_train.save_segmenter(seg, info, 5, path, recipe=segmenter_train.SEG_RECIPE)
    found, desc = segmenter_train.find_segmenter(None, [tmp_path], "synthetic", info, None, 0, 8, "cpu", [])
    assert found is not None and str(path) in desc


def test_segmenter_augment_moves_image_and_label_together():
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, 4, (6, 2, 4)).repeat_interleave(8, 1).repeat_interleave(8, 2)  # 16x32, 8px blocks
    palette = torch.tensor([[-1.0, -1.0, -1.0], [1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]]) * 0.5
    image = palette[label].permute(0, 3, 1, 2)
    img, lab = segmenter_train.augment(image, label, g)
    assert img.shape == image.shape and lab.shape == label.shape and img.abs().max() <= 1
    assert not torch.equal(lab, label)  # something moved
    # colour jitter is affine per image and keeps the class order along the dominant channel: the brightest red
    # pixels are class 1 wherever the label says class 1 (up to the resampled borders)
    for i in range(6):
        inside = lab[i] == 1
        if inside.any():
            red = img[i, 0]
            assert red[inside].median() > red[~inside].median()


def _vline(col, H=8, W=8, extra=()):
    m = torch.zeros(1, 1, H, W)
    m[..., col] = 1
    for y, x in extra:
        m[0, 0, y, x] = 1
    return m


def test_edge_fscore_closed_forms_on_hand_made_maps():
    true = _vline(4)                                             # 8 true edge pixels in column 4
    pred = _vline(5, extra=[(0, 0)])                             # column 5 (1 px off) + a stray pixel far away
    c = metrics.edge_match_counts(pred, true, tol=1)
    assert c.tolist() == [8, 9, 8, 8]                            # 8 of 9 predicted correct, all 8 true found
    p, r, f = metrics.edge_fscore(c)
    assert (p, r) == (8 / 9, 1.0) and f == pytest.approx(2 * (8 / 9) / (8 / 9 + 1))
    assert metrics.edge_match_counts(pred, true, tol=0).tolist() == [0, 9, 0, 8]   # exact: nothing matches
    assert metrics.edge_fscore(metrics.edge_match_counts(pred, true, tol=0))[2] == 0.0
    assert metrics.edge_match_counts(_vline(6), true, tol=1).tolist() == [0, 8, 0, 8]  # 2 px off
    assert metrics.edge_match_counts(_vline(6), true, tol=2).tolist() == [8, 8, 8, 8]
    assert metrics.edge_match_counts(true, pred, tol=1).tolist() == [8, 8, 8, 9]   # swapped: P and R swap
    diag = torch.zeros(1, 1, 8, 8)
    diag[0, 0, 3, 3] = 1
    shifted = torch.zeros(1, 1, 8, 8)
    shifted[0, 0, 4, 4] = 1
    assert metrics.edge_match_counts(shifted, diag, tol=1).tolist() == [1, 1, 1, 1]  # Chebyshev: diagonal is 1 px
    thick = _vline(3) + _vline(4) + _vline(5)                     # thick prediction over a thin edge: no 1-to-1
    assert metrics.edge_fscore(metrics.edge_match_counts(thick, true, tol=1))[:2] == (1.0, 1.0)
    empty = torch.zeros(1, 1, 8, 8)
    p, r, f = metrics.edge_fscore(metrics.edge_match_counts(empty, true))
    assert math.isnan(p) and r == 0.0 and f == 0.0
    assert math.isnan(metrics.edge_fscore(metrics.edge_match_counts(empty, empty))[2])
    with pytest.raises(ValueError, match="tolerance of -1"):
        metrics.edge_match_counts(pred, true, tol=-1)


def test_generated_edges_threshold_at_sigmoid_one_half():
    e = torch.tensor([-0.9, -0.01, 0.0, 0.01, 0.9]).view(1, 1, 1, 5).expand(2, 3, 1, 5)
    assert metrics.generated_edges(e).tolist() == [[[[False, False, False, True, True]]]] * 2
    assert metrics.generated_edges(data.canny(torch.zeros(1, 3, 8, 8)) * 2 - 1).sum() == 0


def _untrained_ecgan_checkpoint(tmp_path, cfg, info):
    """A checkpoint of a freshly built ECGAN (seed 0) in train.py's layout, for end-to-end eval tests."""
    import dataclasses
    import ecgan
    torch.manual_seed(0)
    G, D = ecgan.build(cfg, info)
    ckpt = tmp_path / "run" / "ckpt.pt"
    ckpt.parent.mkdir()
    torch.save({"model": "ecgan", "model_cfg": dataclasses.asdict(cfg), "train_cfg": {"dataset": "synthetic"},
                "info": dataclasses.asdict(info), "G": G.state_dict(), "D": D.state_dict(), "opt_G": {},
                "opt_D": {}, "scaler": None, "step": 1, "rng": []}, ckpt)
    return ckpt


def test_eval_reports_edge_fscore_for_ecgan_only(tmp_path, monkeypatch):
    """ECGAN's sample() has an "edge" column: eval reports the edge F-score of it against Canny of the real image,
    and it equals the F-score recomputed from the same samples; a GauGAN run has no edge column and no F-score."""
    import ecgan
    samples, info = _synthetic("val", 4)
    cfg = ecgan.ECGANConfig(ngf=8, ndf=4, n_layers_D=2, proj_dim=8, use_label_gen=False, use_contrast=False)
    ckpt = _untrained_ecgan_checkpoint(tmp_path, cfg, info)
    res = evaluation.evaluate(ckpt, out=tmp_path / "eval", num=4, batch_size=2, seg_steps=0, save_images=False,
                              progress=False, device="cpu", patches_per_class=16)
    m = res["metrics"]
    from evalrun import load_run
    run = load_run(ckpt, torch.device("cpu"))
    b = run.prepare(torch.utils.data.default_collate([run.val[i] for i in range(4)]))
    edge = ecgan.sample(run.G, b)["edge"]
    want = metrics.edge_fscore(metrics.edge_match_counts(metrics.generated_edges(edge), data.canny(b["image"])))
    for key, v in zip(("edge precision", "edge recall", "edge F1"), want):
        assert (m[key] is None and math.isnan(v)) or m[key] == pytest.approx(v), key
    assert "within 1 px" in res["protocol"]["edge F1"]
    true = data.canny(b["image"])
    base = metrics.edge_fscore(metrics.edge_match_counts(torch.ones_like(true), true))[2]
    assert m["edge F1 (every pixel an edge: baseline)"] == pytest.approx(base)
    near = (torch.nn.functional.max_pool2d(true, 3, 1, 1) > 0).float().mean().item()  # precision; recall is 1
    assert base == pytest.approx(2 * near / (near + 1))
    ckpt2 = tmp_path / "run2" / "ckpt.pt"
    ckpt2.parent.mkdir()
    _tiny_gaugan_checkpoint(ckpt2)
    res2 = evaluation.evaluate(ckpt2, out=tmp_path / "eval2", num=2, batch_size=2, seg_steps=0, save_images=False,
                               progress=False, device="cpu", patches_per_class=16)
    assert "edge F1" not in res2["metrics"]


def _naive_structure(emb, labels):
    """Mean cosine distances by loops over pairs i != j: per class then over classes (intra), per class pair then
    over class pairs (inter); and over all pairs (pair)."""
    z = torch.nn.functional.normalize(emb.double(), dim=1)
    d = {}
    for i in range(len(z)):
        for j in range(len(z)):
            if i != j:
                d.setdefault((int(labels[i]), int(labels[j])), []).append(1 - float(z[i] @ z[j]))
    mean = lambda v: sum(v) / len(v)
    intra = mean([mean(v) for (a, b), v in d.items() if a == b])
    inter = mean([mean(v) for (a, b), v in d.items() if a < b])
    pair_intra = mean([x for (a, b), v in d.items() if a == b for x in v])
    pair_inter = mean([x for (a, b), v in d.items() if a != b for x in v])
    return intra, inter, pair_intra, pair_inter


def test_embedding_structure_closed_forms_and_naive_pairs():
    e0, e1 = torch.tensor([1.0, 0, 0]), torch.tensor([0, 2.0, 0])  # two tight orthogonal clusters (any norm)
    st = metrics.embedding_structure(torch.stack([e0, e0, e0, e1, e1]), torch.tensor([0, 0, 0, 1, 1]))
    assert st["intra"] == pytest.approx(0, abs=1e-12) and st["inter"] == pytest.approx(1)
    assert st["ratio"] == pytest.approx(0, abs=1e-12)
    st = metrics.embedding_structure(torch.stack([e0, -e0, e1, -e1]), torch.tensor([0, 0, 1, 1]))  # antipodal
    assert st["intra"] == pytest.approx(2) and st["inter"] == pytest.approx(1) and st["ratio"] == pytest.approx(2)
    same = metrics.embedding_structure(torch.ones(6, 4), torch.tensor([0, 0, 1, 1, 2, 2]))  # all identical: 0 / 0
    assert same["intra"] == pytest.approx(0, abs=1e-12) and same["inter"] == pytest.approx(0, abs=1e-12)
    assert math.isnan(same["ratio"])
    one = metrics.embedding_structure(torch.randn(5, 3), torch.zeros(5, dtype=torch.long))  # one class: no inter
    assert math.isnan(one["inter"]) and math.isnan(one["ratio"]) and 0 <= one["intra"] <= 2
    single = metrics.embedding_structure(torch.eye(3), torch.tensor([0, 1, 2]))  # one pixel a class: no intra
    assert math.isnan(single["intra"]) and single["inter"] == pytest.approx(1) and math.isnan(single["ratio"])
    torch.manual_seed(0)  # unequal classes: "class" and "pair" averages differ; both equal their loops
    emb, lab = torch.randn(23, 5), torch.tensor([0] * 12 + [1] * 3 + [3] * 8)
    intra, inter, p_intra, p_inter = _naive_structure(emb, lab)
    st, sp = metrics.embedding_structure(emb, lab), metrics.embedding_structure(emb, lab, average="pair")
    assert st["intra"] == pytest.approx(intra) and st["inter"] == pytest.approx(inter)
    assert sp["intra"] == pytest.approx(p_intra) and sp["inter"] == pytest.approx(p_inter)
    assert st["ratio"] == pytest.approx(intra / inter) and abs(st["intra"] - sp["intra"]) > 1e-3
    s1, s2 = metrics.embedding_sums(emb[:10], lab[:10], 4), metrics.embedding_sums(emb[10:], lab[10:], 4)
    summed = metrics.structure_from_sums(*(a + b for a, b in zip(s1, s2)))  # additive over batches
    assert summed["intra"] == pytest.approx(intra) and summed["inter"] == pytest.approx(inter)
    with pytest.raises(ValueError, match="average"):
        metrics.embedding_structure(emb, lab, average="mean")
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        metrics.embedding_sums(emb, lab, 2)


def test_balanced_pixels_caps_each_class_is_seeded_and_skips_ignored():
    lab = torch.tensor([0] * 50 + [1] * 3 + [2] * 20)
    idx = metrics.balanced_pixels(lab, 10, torch.Generator().manual_seed(0), ignore=(2,))
    assert torch.bincount(lab[idx], minlength=3).tolist() == [10, 3, 0] and len(set(idx.tolist())) == 13
    again = metrics.balanced_pixels(lab, 10, torch.Generator().manual_seed(0), ignore=(2,))
    assert torch.equal(idx, again)


def test_eval_reports_embedding_structure_for_ecgan_with_contrast_only(tmp_path):
    """An ECGAN with a projection head (use_contrast): eval reports intra / inter / ratio of its contrastive
    embeddings, equal to a recomputation that builds F through the encoder directly (not the eval hook), samples
    the same seeded pixels per batch and takes the pairs by loops; a GauGAN run reports none."""
    import ecgan
    samples, info = _synthetic("val", 4)
    cfg = ecgan.ECGANConfig(ngf=8, ndf=4, n_layers_D=2, proj_dim=8, use_label_gen=False, bank_per_class=0)
    ckpt = _untrained_ecgan_checkpoint(tmp_path, cfg, info)
    res = evaluation.evaluate(ckpt, out=tmp_path / "eval", num=4, batch_size=2, seg_steps=0, save_images=False,
                              progress=False, device="cpu", patches_per_class=16, emb_per_class=5)
    m = res["metrics"]
    from evalrun import load_run
    run = load_run(ckpt, torch.device("cpu"))
    gen, embs, raw, labs = torch.Generator().manual_seed(0), [], [], []
    with torch.no_grad():
        for i in (0, 2):
            b = run.prepare(torch.utils.data.default_collate([run.val[i], run.val[i + 1]]))
            enc = run.G.encoder
            feat = enc.trunk(enc.head(b["input"]), b["input"])  # F, as ECGANGenerator.forward makes it
            lab = b["input"][:, :info.label_nc].argmax(1).flatten()
            idx = metrics.balanced_pixels(lab, 5, gen, ignore=(info.num_classes,) if info.dontcare else ())
            assert torch.bincount(lab[idx]).max() <= 5 and len(lab[idx].unique()) >= 2
            raw.append(feat.permute(0, 2, 3, 1).reshape(-1, feat.shape[1])[idx])
            embs.append(run.G.projection(raw[-1]))
            labs.append(lab[idx])
    intra, inter, _, _ = _naive_structure(torch.cat(embs), torch.cat(labs))
    f_intra, f_inter, _, _ = _naive_structure(torch.cat(raw), torch.cat(labs))  # F itself, without G_c's head
    assert m["feature F intra/inter ratio"] == pytest.approx(f_intra / f_inter, rel=1e-5)
    assert m["feature F intra-class cosine distance"] == pytest.approx(f_intra, rel=1e-5)
    assert abs(m["feature F intra/inter ratio"] - m["embedding intra/inter ratio"]) > 1e-3  # two spaces
    assert m["embedding intra-class cosine distance"] == pytest.approx(intra, rel=1e-5)
    assert m["embedding inter-class cosine distance"] == pytest.approx(inter, rel=1e-5)
    assert m["embedding intra/inter ratio"] == pytest.approx(intra / inter, rel=1e-5)
    assert "at most 5 pixels per class and batch" in res["protocol"]["embedding intra/inter ratio"]
    assert f"{sum(len(x) for x in labs)} pixels" in res["protocol"]["embedding intra/inter ratio"]
    ckpt2 = tmp_path / "run2" / "ckpt.pt"
    ckpt2.parent.mkdir()
    _tiny_gaugan_checkpoint(ckpt2)
    res2 = evaluation.evaluate(ckpt2, out=tmp_path / "eval2", num=2, batch_size=2, seg_steps=0, save_images=False,
                               progress=False, device="cpu", patches_per_class=16)
    assert not any(k.startswith(("embedding", "feature F")) for k in res2["metrics"])
    # without G_c (no projection head, no Eq. 5) only F's own structure: the with / without comparison
    (tmp_path / "nogc").mkdir()
    ckpt3 = _untrained_ecgan_checkpoint(tmp_path / "nogc", ecgan.ECGANConfig(
        ngf=8, ndf=4, n_layers_D=2, use_label_gen=False, use_contrast=False), info)
    res3 = evaluation.evaluate(ckpt3, out=tmp_path / "eval3", num=4, batch_size=2, seg_steps=0, save_images=False,
                               progress=False, device="cpu", patches_per_class=16, emb_per_class=5)
    assert not any(k.startswith("embedding") for k in res3["metrics"])
    assert 0 < res3["metrics"]["feature F intra/inter ratio"] < 2


def test_contrast_embeddings_leave_dontcare_out():
    from types import SimpleNamespace
    info = SimpleNamespace(label_nc=3, num_classes=2, dontcare=True)  # channel 2: dontcare
    lab = torch.tensor([[0, 0, 1, 2], [2, 2, 1, 0]]).view(1, 2, 4)
    seg = torch.nn.functional.one_hot(lab, 3).permute(0, 3, 1, 2).float()
    feat = torch.randn(1, 4, 2, 4)
    G = SimpleNamespace(projection=lambda x: x)
    (s, q, n), raw = evaluation._contrast_embeddings(G, feat, seg, info, 10, torch.Generator().manual_seed(0))
    assert n.tolist() == [3, 2]  # every pixel of classes 0 and 1, none of dontcare
    assert all(torch.equal(a, b) for a, b in zip(raw, (s, q, n)))  # identity head: F's sums are the same
    z = torch.nn.functional.normalize(feat.permute(0, 2, 3, 1).reshape(-1, 4).double(), dim=1)
    assert torch.allclose(s[1], z[lab.flatten() == 1].sum(0))


@pytest.mark.parametrize("window", ["expanded", "input"])
def test_label_windows_match_the_figure_window_at_every_pixel(window):
    """Fig. 5's statistic reads the same taps as the figure's per-location window (and as SAU's kernel order)."""
    torch.manual_seed(0)
    lab_in = torch.randint(0, 4, (2, 5, 6))
    k, s = 5, 2
    win = figures.label_windows(lab_in, k, s, window)
    assert win.shape == (2, k * k, 10, 12)
    for b in range(2):
        for y in range(10):
            for x in range(12):
                assert torch.equal(win[b, :, y, x].view(k, k), figures._label_window(lab_in[b], y, x, k, s, window))


def test_kernel_statistic_closed_forms():
    """Uniform kernels put the window share on the own class; a centre-only kernel (a position prior without
    semantics) has mass 1 but no excess over the average kernel; a kernel spread over the own class's taps has a
    positive excess; values match a loop over locations."""
    torch.manual_seed(1)
    lab_in = torch.randint(0, 3, (2, 4, 5))
    k, s = 3, 2
    win = figures.label_windows(lab_in, k, s, "expanded")
    B, kk, H, W = win.shape
    own = win[:, kk // 2:kk // 2 + 1]
    mixed = (((win != own) & (win >= 0)).any(1) & (own[:, 0] >= 0))
    uni = torch.full(win.shape, 1 / kk)
    st = figures.KernelStatistic()
    st.add("l", uni, win)
    r = st.result()["l"]
    # with no padded taps inside the mixed locations' windows, uniform mass == share
    shares = [((win[b, :, y, x] == own[b, 0, y, x]).float().sum() / (win[b, :, y, x] >= 0).float().sum()).item()
              for b, y, x in mixed.nonzero().tolist()]
    masses = [((win[b, :, y, x] == own[b, 0, y, x]).float().sum() / kk).item() for b, y, x in mixed.nonzero().tolist()]
    assert r["locations"] == len(shares) == int(mixed.sum())
    assert r["share of window"] == pytest.approx(sum(shares) / len(shares))
    assert r["own-class mass"] == pytest.approx(sum(masses) / len(masses))
    centre = torch.zeros(win.shape)
    centre[:, kk // 2] = 1
    st = figures.KernelStatistic()
    st.add("l", centre, win)
    r = st.result()["l"]
    assert r["own-class mass"] == pytest.approx(1) and r["excess"] == pytest.approx(0, abs=1e-6)
    sem = ((win == own) & (win >= 0)).float()
    sem = sem / sem.sum(1, keepdim=True)
    st = figures.KernelStatistic()
    st.add("a", sem, win)
    st.add("b", uni, win)
    res = st.result()
    assert res["a"]["own-class mass"] == pytest.approx(1) and res["a"]["excess"] > 0.2
    assert res["b"]["excess"] == pytest.approx(0, abs=1e-6)  # the average of uniform kernels is uniform
    assert res["all"]["locations"] == 2 * res["a"]["locations"]
    assert res["all"]["excess"] == pytest.approx((res["a"]["excess"] + res["b"]["excess"]) / 2)
    # the average-kernel mass against a loop: mean kernel over the mixed locations, applied at each of them
    m = sem.permute(0, 2, 3, 1)[mixed].mean(0)
    loop = [float((m * (win[b, :, y, x] == own[b, 0, y, x]).float()).sum()) for b, y, x in mixed.nonzero().tolist()]
    assert res["a"]["average-kernel mass"] == pytest.approx(sum(loop) / len(loop))


def test_sau_kernel_statistic_reads_every_sau_layer_of_a_tiny_gaugan():
    import gaugan
    info = data.make_dataset("synthetic", None, split="val", size=(32, 64)).info
    cfg = gaugan.Config(ngf=8, ndf=8, spade_hidden=8, upsample="sau")
    G = gaugan.build(cfg, info)[0].eval()
    ds = data.make_dataset("synthetic", None, split="val", size=(32, 64))
    batches = [next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))]
    prep = lambda b: data.prepare_batch(b, info, "cpu")
    res = figures.sau_kernel_statistic(G, gaugan, batches, prep)
    saus = [n for n, m in G.named_modules() if isinstance(m, figures.sau.SAU)]
    assert set(res) == set(saus) | {"all"} and len(saus) >= 2
    assert all(0 < r["share of window"] < 1 and 0 <= r["own-class mass"] <= 1 for r in res.values())
    cfg_n = gaugan.Config(ngf=8, ndf=8, spade_hidden=8, upsample="nearest")
    assert figures.sau_kernel_statistic(gaugan.build(cfg_n, info)[0], gaugan, batches, prep) is None
