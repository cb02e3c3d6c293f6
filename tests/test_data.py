"""data.py: synthetic scenes, folder loaders, Canny, batches, and the errors bad data raises."""
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
from data import DatasetError, make_dataset


def collate(items):
    return torch.utils.data.default_collate(items)


# -----------------------------------------------------------------------------
# synthetic street scenes


def test_synthetic_deterministic_shapes_and_range():
    ds = make_dataset("synthetic", size=(32, 64))
    assert ds.info.num_classes == 10 and ds.info.input_nc == 11 and len(ds) == 2000
    a, b = ds[3], make_dataset("synthetic", size=(32, 64))[3]
    for k in ("image", "label", "instance"):
        assert torch.equal(a[k], b[k]), k
    assert a["image"].shape == (3, 32, 64) and a["image"].dtype == torch.float32
    assert a["label"].shape == (32, 64) and a["label"].dtype == torch.int64
    assert a["image"].min() >= -1 and a["image"].max() <= 1
    assert 0 <= a["label"].min() and a["label"].max() < 10
    assert not torch.equal(ds[4]["image"], a["image"])
    val = make_dataset("synthetic", split="val", size=(32, 64))
    assert len(val) == 200 and not torch.equal(val[3]["image"], a["image"])  # distinct streams
    assert len(make_dataset("synthetic", size=(32, 64), length=7)) == 7


def test_synthetic_any_resolution_same_scene():
    lo = make_dataset("synthetic", size=(32, 64))[5]["label"].numpy()
    hi = make_dataset("synthetic", size=(96, 192))[5]["label"].numpy()
    # pixel centres of the 32x64 grid are the centres of 3x3 blocks of the 96x192 grid
    assert (hi[1::3, 1::3] == lo).mean() > 0.97


def test_synthetic_all_classes_small_classes_and_instances():
    ds = make_dataset("synthetic", size=(32, 64))
    counts = np.zeros(10)
    present = np.zeros(10)
    n = 300
    for i in range(n):
        d = ds[i]
        lab, inst = d["label"].numpy(), d["instance"].numpy()
        c = np.bincount(lab.ravel(), minlength=10)
        counts += c
        present += c > 0
        things = inst >= 1000  # countable classes carry class * 1000 + k, stuff carries its class id
        assert (inst[things] // 1000 == lab[things]).all()
        assert (inst[~things] == lab[~things]).all()
    frac = counts / counts.sum()
    assert (present > 0).all(), dict(zip(data.SYNTH_CLASSES, present))
    for k in (data.POLE, data.SIGN, data.PERSON):  # small objects: in most scenes, few pixels
        assert present[k] >= 0.8 * n and frac[k] < 0.03, (data.SYNTH_CLASSES[k], present[k], frac[k])
    assert frac[[data.SKY, data.BUILDING, data.ROAD]].sum() > 0.5  # class imbalance


def test_synthetic_structure_inside_regions():
    """Image edges inside building and road regions, away from every label boundary (windows, lane marks)."""
    ds = make_dataset("synthetic", size=(64, 128))
    b = collate([ds[i] for i in range(4)])
    edge = data.canny(b["image"])[:, 0]
    near = torch.nn.functional.max_pool2d(data.instance_boundaries(b["label"]), 5, 1, 2)[:, 0] > 0
    for k in (data.BUILDING, data.ROAD):
        inner = edge.bool() & ~near & (b["label"] == k)
        assert (inner.flatten(1).sum(1) > 5).all(), data.SYNTH_CLASSES[k]


def test_synthetic_crossview_overlap_agrees():
    H, W = 48, 96
    ds = make_dataset("synthetic_crossview", size=(H, W))
    assert ds.info.task == "crossview" and not ds.info.has_instance
    agree, diff, overlap = [], [], []
    for i in range(6):
        d = ds[i]
        assert set(d) == {"image_a", "image", "seg_a", "seg", "label_a", "label", "path"}
        assert torch.equal(d["seg"], data.colorize(d["label"][None], 10)[0])
        _, ((xa0, xa1, ya0, ya1), (xg0, xg1, yg0, yg1)) = ds.views(i)
        assert (xa0, ya0) != (xg0, yg0)
        # scene coords of view g's pixel centres -> nearest pixel of view a
        xs = xg0 + (np.arange(W) + 0.5) * (xg1 - xg0) / W
        ys = yg0 + (np.arange(H) + 0.5) * (yg1 - yg0) / H
        ca = np.floor((xs - xa0) / (xa1 - xa0) * W).astype(int)
        ra = np.floor((ys - ya0) / (ya1 - ya0) * H).astype(int)
        cm, rm = (ca >= 0) & (ca < W), (ra >= 0) & (ra < H)
        overlap.append(cm.mean() * rm.mean())
        la = d["label_a"].numpy()[ra[rm]][:, ca[cm]]
        lg = d["label"].numpy()[rm][:, cm]
        agree.append((la == lg).mean())
        ia = d["image_a"].numpy()[:, ra[rm]][:, :, ca[cm]]
        ig = d["image"].numpy()[:, rm][:, :, cm]
        diff.append(np.median(np.abs(ia - ig)))
    assert min(overlap) > 0.2
    assert min(agree) > 0.9, agree
    assert max(diff) < 0.1, diff


# -----------------------------------------------------------------------------
# Canny


def test_canny_flat_image_has_no_edges():
    for v in (-1.0, 0.3, 1.0):
        assert data.canny(torch.full((2, 3, 24, 40), v)).sum() == 0


def test_canny_rectangle_gives_thin_closed_outline():
    img = torch.full((1, 3, 40, 56), -1.0)
    r0, r1, c0, c1 = 10, 30, 12, 44  # filled rows r0..r1-1, cols c0..c1-1
    img[:, :, r0:r1, c0:c1] = 1.0
    e = data.canny(img)[0, 0].numpy() > 0
    ys, xs = np.nonzero(e)
    assert len(ys) > 0
    # every edge pixel lies within 2 px of the rectangle's border
    dy = np.minimum(np.abs(ys - r0 + 0.5), np.abs(ys - r1 + 0.5))
    dx = np.minimum(np.abs(xs - c0 + 0.5), np.abs(xs - c1 + 0.5))
    in_x, in_y = (xs >= c0 - 2) & (xs < c1 + 2), (ys >= r0 - 2) & (ys < r1 + 2)
    assert (((dy <= 2) & in_x) | ((dx <= 2) & in_y)).all()
    # closed: every row/column along each side has an edge pixel next to that side (corners aside)
    for r in range(r0 + 3, r1 - 3):
        assert e[r, c0 - 2:c0 + 2].any() and e[r, c1 - 2:c1 + 2].any(), r
    for c in range(c0 + 3, c1 - 3):
        assert e[r0 - 2:r0 + 2, c].any() and e[r1 - 2:r1 + 2, c].any(), c
    # thin: one pixel across on the straight parts
    assert e[r0 + 5:r1 - 5, c0 - 3:c0 + 3].sum(1).max() == 1
    assert e[r0 - 3:r0 + 3, c0 + 5:c1 - 5].sum(0).max() == 1


def test_canny_batched_equals_one_by_one():
    ds = make_dataset("synthetic", size=(32, 64))
    imgs = torch.stack([ds[i]["image"] for i in range(4)])
    imgs[1] = imgs[1] * 0.2  # a low-contrast image: thresholds are per image
    batched = data.canny(imgs)
    single = torch.cat([data.canny(imgs[i:i + 1]) for i in range(4)])
    assert torch.equal(batched, single)
    assert set(batched.unique().tolist()) <= {0.0, 1.0} and batched.sum() > 0


# -----------------------------------------------------------------------------
# batches and helpers


def test_instance_boundaries_matches_naive():
    g = torch.Generator().manual_seed(0)
    inst = torch.randint(0, 3, (2, 7, 9), generator=g)
    got = data.instance_boundaries(inst)[:, 0]
    want = torch.zeros_like(got)
    for b in range(2):
        for y in range(7):
            for x in range(9):
                for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < 7 and 0 <= xx < 9 and inst[b, yy, xx] != inst[b, y, x]:
                        want[b, y, x] = 1
    assert torch.equal(got, want)


def test_prepare_batch_semantic_and_crossview():
    ds = make_dataset("synthetic", size=(32, 64))
    b = data.prepare_batch(collate([ds[i] for i in range(3)]), ds.info, "cpu", edges=True)
    assert b["onehot"].shape == (3, 10, 32, 64) and torch.equal(b["onehot"].sum(1), torch.ones(3, 32, 64))
    assert torch.equal(b["onehot"].argmax(1), b["label"])
    assert b["input"].shape == (3, ds.info.input_nc, 32, 64) and b["input"][:, -1].sum() > 0
    assert b["edge"].shape == (3, 1, 32, 64)
    cv = make_dataset("synthetic_crossview", size=(32, 64))
    b = data.prepare_batch(collate([cv[0], cv[1]]), cv.info, "cpu")
    assert b["input"].shape == (2, 6, 32, 64) and torch.equal(b["input"][:, 3:], b["seg"])
    bad = {"label": torch.full((1, 4, 4), 10), "image": torch.zeros(1, 3, 4, 4), "instance": torch.zeros(1, 4, 4)}
    with pytest.raises(DatasetError, match="10"):
        data.prepare_batch(bad, ds.info, "cpu")


def test_colorize_and_save_grid(tmp_path):
    lab = torch.tensor([[[0, 1], [2, 3]]])
    c = data.colorize(lab, 3)  # id 3 == dontcare -> black
    assert c.shape == (1, 3, 2, 2) and torch.equal(c[0, :, 1, 1], -torch.ones(3))
    assert torch.allclose((c[0, :, 0, 0] + 1) * 127.5, torch.tensor([70.0, 130, 180]))
    out = tmp_path / "g" / "grid.png"
    data.save_grid([torch.zeros(2, 3, 8, 12), torch.ones(2, 1, 8, 12)], out, titles=["a", "b"])
    im = Image.open(out)
    assert im.size == (2 * (12 + 2) + 2, 14 + 2 * (8 + 2) + 2)
    assert [p.name for p in out.parent.iterdir()] == ["grid.png"]  # no temp file left


def test_cli_writes_grid(tmp_path, monkeypatch):
    out = tmp_path / "s.png"
    monkeypatch.setattr(sys, "argv", ["data.py", "--size", "32", "64", "--n", "2", "--out", str(out)])
    runpy.run_path(str(Path(data.__file__)), run_name="__main__")
    assert Image.open(out).size[0] > 4 * 64


# -----------------------------------------------------------------------------
# real layouts


def test_coco_sample(coco_sample):
    ds = make_dataset("coco", coco_sample, "val", (64, 64), flip=False)
    assert (ds.info.num_classes, ds.info.label_nc, ds.info.input_nc) == (182, 183, 184)
    i = next(i for i, (_, lp) in enumerate(ds.items) if (np.asarray(Image.open(lp)) == 255).any())
    raw = np.asarray(Image.open(ds.items[i][1]))
    b = data.prepare_batch(collate([ds[i]]), ds.info, "cpu")
    lab = b["label"][0].numpy()
    assert lab.max() <= 182 and (lab == 182).any()
    assert set(np.unique(lab)) - {182} <= set(np.unique(raw).tolist())
    assert torch.equal(b["onehot"][0, 182] > 0, b["label"][0] == 182)
    assert b["input"][0, -1].sum() > 0  # instance boundaries
    assert ds[i]["path"].endswith(".jpg")
    assert len(make_dataset("coco", coco_sample, "train", (32, 32))) == 13


def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr)).save(path)


def _scene(h=8, w=12, n=5, seed=0):
    """A label map and an image whose grey value encodes the label (to check image/label alignment)."""
    lab = np.random.default_rng(seed).integers(0, n, (h, w)).astype(np.uint8)
    img = np.repeat((lab.astype(np.int64) * 255 // (n - 1))[..., None], 3, 2).astype(np.uint8)
    return lab, img


def test_cityscapes_layout(tmp_path):
    for k, city in enumerate(["aachen", "bonn"]):
        lab, img = _scene(seed=k, n=35)
        _png(tmp_path / f"leftImg8bit/train/{city}/{city}_0_{k}_leftImg8bit.png", img)
        _png(tmp_path / f"gtFine/train/{city}/{city}_0_{k}_gtFine_labelIds.png", lab)
        inst = np.where(lab > 20, 26000 + lab.astype(np.uint16), lab).astype(np.uint16)  # 16-bit PNG, like Cityscapes
        _png(tmp_path / f"gtFine/train/{city}/{city}_0_{k}_gtFine_instanceIds.png", inst)
    ds = make_dataset("cityscapes", tmp_path, size=(8, 12), flip=False)
    assert len(ds) == 2 and ds.info.input_nc == 36 and not ds.info.dontcare
    d = ds[1]
    lab, _ = _scene(seed=1, n=35)
    assert torch.equal(d["label"], torch.from_numpy(lab).long())
    assert torch.equal(d["instance"], torch.from_numpy(np.where(lab > 20, 26000 + lab.astype(np.int64), lab)))
    assert "bonn" in d["path"]
    assert ds[0]["image"].shape == (3, 8, 12)
    # a missing instance map is named
    (tmp_path / "gtFine/train/bonn/bonn_0_1_gtFine_instanceIds.png").unlink()
    with pytest.raises(DatasetError, match="bonn_0_1_gtFine_labelIds.png"):
        make_dataset("cityscapes", tmp_path)


def test_ade20k_layout_shift_and_dontcare(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    raw = np.array([[0, 1, 150], [5, 0, 2]], np.uint8)
    _png(root / "images/validation/ADE_val_1.jpg", np.zeros((2, 3, 3), np.uint8))
    _png(root / "annotations/validation/ADE_val_1.png", raw)
    ds = make_dataset("ade20k", tmp_path, "val", size=(2, 3))  # parent of ADEChallengeData2016 is fine too
    assert ds.info.label_nc == 151 and not ds.info.has_instance
    assert ds[0]["label"].tolist() == [[150, 0, 149], [4, 150, 1]]
    _png(root / "annotations/validation/ADE_val_1.png", np.array([[151, 1, 1], [1, 1, 1]], np.uint8))
    with pytest.raises(DatasetError, match=r"ADE_val_1\.png.*151"):
        make_dataset("ade20k", root, "val", size=(2, 3))[0]


def test_facades_resize_and_flip(tmp_path):
    lab, img = _scene(16, 24, n=13, seed=3)
    _png(tmp_path / "train_label/f1.png", lab)
    _png(tmp_path / "train_img/f1.png", img)
    ds = make_dataset("facades", tmp_path, size=(8, 12), flip=False, crop=False)
    d = ds[0]
    assert ds.info.num_classes == 13 and d["label"].shape == (8, 12)
    assert torch.equal(d["label"], torch.from_numpy(lab[1::2, 1::2]).long())  # nearest: exact ids survive
    assert torch.equal(ds[0]["image"], d["image"])  # deterministic without flip
    flips = make_dataset("facades", tmp_path, size=(16, 24), flip=True, crop=False)
    seen = set()
    for epoch in range(20):
        flips.set_epoch(epoch)
        d = flips[0]
        grey = ((d["image"][0] + 1) * 127.5).round().long()
        assert torch.equal(grey, d["label"] * 255 // 12)  # image and label flipped together
        seen.add(bool(torch.equal(d["label"], torch.from_numpy(lab).long())))
    assert seen == {True, False}


def test_custom_and_label_dir_layouts(tmp_path):
    lab, img = _scene(n=7)
    lab[0, 0] = 255
    _png(tmp_path / "labels/a.png", lab)
    _png(tmp_path / "imgs/a.jpg", img)
    ds = make_dataset("custom", size=(8, 12), label_dir=tmp_path / "labels", image_dir=tmp_path / "imgs",
                      num_classes=7, dontcare_value=255, flip=False, crop=False)
    assert ds.info.label_nc == 8 and ds[0]["label"][0, 0] == 7
    lab[0, 0] = 3
    _png(tmp_path / "labels/a.png", lab)
    ds = make_dataset("deepfashion", split="val", size=(8, 12), label_dir=tmp_path / "labels", image_dir=tmp_path / "imgs")
    assert ds.info.num_classes == 20 and torch.equal(ds[0]["label"], torch.from_numpy(lab).long())
    assert make_dataset("celebamask", label_dir=tmp_path / "labels", image_dir=tmp_path / "imgs").info.num_classes == 19


def _panel_file(path, h=8, w=10, seed=0, grey_a=None):
    g = np.random.default_rng(seed)
    la, lg = g.integers(0, 6, (h, w)), g.integers(0, 6, (h, w))
    panels = [g.integers(0, 255, (h, w, 3)), g.integers(0, 255, (h, w, 3)),
              np.repeat((la * 40)[..., None], 3, 2), np.repeat((lg * 40)[..., None], 3, 2),
              np.repeat(((la + 1) * 10 if grey_a is None else grey_a)[..., None], 3, 2),
              np.repeat(((lg + 1) * 10)[..., None], 3, 2)]
    _png(path, np.concatenate(panels, 1).astype(np.uint8))
    return la, lg


def test_crossview_panels(tmp_path):
    la, lg = _panel_file(tmp_path / "train/x.png")
    ds = make_dataset("crossview", tmp_path, size=(4, 5), flip=False)
    assert ds.info.task == "crossview" and ds.info.num_classes == 6
    d = ds[0]
    assert d["image_a"].shape == d["seg"].shape == (3, 4, 5)
    assert torch.equal(d["label_a"], torch.from_numpy(la[1::2, 1::2]))
    assert torch.equal(d["label"], torch.from_numpy(lg[1::2, 1::2]))
    b = data.prepare_batch(collate([d]), ds.info, "cpu")
    assert b["input"].shape == (1, 6, 4, 5) and b["onehot"].shape == (1, 6, 4, 5)


# -----------------------------------------------------------------------------
# bad input: DatasetError naming the file and the value or the layout


def _facades(root, n=2, size=(8, 12)):
    for k in range(n):
        lab, img = _scene(*size, n=13, seed=k)
        _png(root / f"train_label/f{k}.png", lab)
        _png(root / f"train_img/f{k}.png", img)
    return root


def test_bad_label_value(tmp_path):
    _facades(tmp_path)
    lab = np.zeros((8, 12), np.uint8)
    lab[2, 3] = 20
    _png(tmp_path / "train_label/f1.png", lab)
    ds = make_dataset("facades", tmp_path)
    ds[0]
    with pytest.raises(DatasetError, match=r"f1\.png.*value 20"):
        ds[1]


def test_bad_coco_value_but_255_is_dontcare(tmp_path):
    (tmp_path / "val_inst").mkdir()
    lab = np.full((4, 4), 255, np.uint8)
    _png(tmp_path / "val_img/c.jpg", np.zeros((4, 4, 3), np.uint8))
    _png(tmp_path / "val_inst/c.png", np.zeros((4, 4), np.uint8))
    _png(tmp_path / "val_label/c.png", lab)
    assert (make_dataset("coco", tmp_path, "val", (4, 4))[0]["label"] == 182).all()
    lab[0, 0] = 200
    _png(tmp_path / "val_label/c.png", lab)
    with pytest.raises(DatasetError, match=r"c\.png.*value 200.*dontcare value 255"):
        make_dataset("coco", tmp_path, "val", (4, 4))[0]


def test_bad_size_mismatch(tmp_path):
    _facades(tmp_path)
    _png(tmp_path / "train_label/f0.png", np.zeros((9, 12), np.uint8))
    with pytest.raises(DatasetError, match=r"f0\.png.*12x9.*12x8"):
        make_dataset("facades", tmp_path)[0]


def test_bad_pairing(tmp_path):
    _facades(tmp_path)
    _png(tmp_path / "train_img/extra.png", np.zeros((8, 12, 3), np.uint8))
    with pytest.raises(DatasetError, match=r"extra\.png: image without a label"):
        make_dataset("facades", tmp_path)
    (tmp_path / "train_img/extra.png").unlink()
    (tmp_path / "train_img/f1.png").unlink()
    with pytest.raises(DatasetError, match=r"f1\.png: label without an image.*counts 1 vs 2"):
        make_dataset("facades", tmp_path)


def test_bad_root_and_layout(tmp_path):
    with pytest.raises(DatasetError, match=r"nowhere: dataset root not found"):
        make_dataset("coco", tmp_path / "nowhere")
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetError, match=r"leftImg8bit.*expected layout.*_labelIds\.png"):
        make_dataset("cityscapes", tmp_path)
    with pytest.raises(DatasetError, match=r"train_img.*expected layout"):
        make_dataset("facades", tmp_path)
    with pytest.raises(DatasetError, match="train: folder not found"):
        make_dataset("crossview", tmp_path)
    with pytest.raises(ValueError, match="unknown dataset"):
        make_dataset("cityscape", tmp_path)


def test_bad_corrupt_file(tmp_path):
    _facades(tmp_path)
    (tmp_path / "train_img/f1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    ds = make_dataset("facades", tmp_path)
    with pytest.raises(DatasetError, match=r"f1\.png: cannot read image"):
        ds[1]


def test_bad_colour_label_and_panel_layout(tmp_path):
    _facades(tmp_path)
    _png(tmp_path / "train_label/f0.png", np.random.default_rng(0).integers(0, 13, (8, 12, 3)).astype(np.uint8))
    with pytest.raises(DatasetError, match=r"f0\.png: label maps must hold class ids in one channel"):
        make_dataset("facades", tmp_path)[0]
    _png(tmp_path / "cv/train/p.png", np.zeros((8, 61, 3), np.uint8))
    with pytest.raises(DatasetError, match=r"p\.png: width 61 is not 6 equal panels"):
        make_dataset("crossview", tmp_path / "cv")[0]
    _panel_file(tmp_path / "cv/train/p.png", grey_a=np.full((8, 10), 200))
    with pytest.raises(DatasetError, match=r"p\.png: L_a panel value 200"):
        make_dataset("crossview", tmp_path / "cv")[0]


# -----------------------------------------------------------------------------
# GauGAN's preprocessing: training jitter (resize to size x 286/256, random crop, flip), plain resize in validation


def test_load_size_is_286_at_256():
    assert data.load_size(256, 256) == (286, 286) and data.load_size(256, 512) == (286, 572)
    assert data.load_size(64, 64) == (72, 72)  # 71.5 rounds half up


def _aligned_folder(root, H, W, n=3, classes=13):
    """Facades-layout files already at the load size of (H, W): the crop is then a plain window of the file, and
    the image's grey value encodes the label, so every window position can be checked."""
    lh, lw = data.load_size(H, W)
    labs = []
    for k in range(n):
        lab, img = _scene(lh, lw, n=classes, seed=10 + k)
        _png(root / f"train_label/a{k}.png", lab)
        _png(root / f"train_img/a{k}.png", img)
        _png(root / f"val_label/a{k}.png", lab)
        _png(root / f"val_img/a{k}.png", img)
        labs.append(lab.astype(np.int64))
    return labs


def _window(full, crop):
    """All (y, x) where crop (h, w) equals full[y:y+h, x:x+w]."""
    h, w = crop.shape
    return [(y, x) for y in range(full.shape[0] - h + 1) for x in range(full.shape[1] - w + 1)
            if np.array_equal(full[y:y + h, x:x + w], crop)]


def test_train_crop_shapes_alignment_and_reproducible(tmp_path):
    H, W = 16, 24
    labs = _aligned_folder(tmp_path, H, W)
    ds = make_dataset("facades", tmp_path, "train", (H, W), flip=False, jitter_seed=5)
    assert ds.crop and not make_dataset("facades", tmp_path, "val", (H, W)).crop
    offsets = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            d = ds[i]
            assert d["image"].shape == (3, H, W) and d["label"].shape == d["instance"].shape == (H, W)
            grey = ((d["image"][0] + 1) * 127.5).round().long()
            assert torch.equal(grey, d["label"] * 255 // 12)  # image and label cut at one position
            where = _window(labs[i], d["label"].numpy())
            assert where, "the label is not a window of the file's label"
            offsets.add(where[0])
    assert len(offsets) > 3  # the position is random...
    again = make_dataset("facades", tmp_path, "train", (H, W), flip=False, jitter_seed=5)
    other = make_dataset("facades", tmp_path, "train", (H, W), flip=False, jitter_seed=6)
    ds.set_epoch(3), again.set_epoch(3), other.set_epoch(3)
    assert all(torch.equal(ds[i]["image"], again[i]["image"]) for i in range(3))  # ...and a function of (seed,
    assert not all(torch.equal(ds[i]["label"], other[i]["label"]) for i in range(3))  # epoch, index)


def test_validation_and_fixed_have_no_crop(tmp_path):
    H, W = 16, 24
    labs = _aligned_folder(tmp_path, H, W)
    lh, lw = data.load_size(H, W)
    val = make_dataset("facades", tmp_path, "val", (H, W))
    for e in range(3):
        val.set_epoch(e)
        # the whole file resized to (H, W) by pixel-centre nearest sampling, never a window
        r = ((np.arange(H) + 0.5) * lh / H).astype(int)
        c = ((np.arange(W) + 0.5) * lw / W).astype(int)
        assert np.array_equal(val[0]["label"].numpy(), labs[0][r][:, c])
    # Cityscapes ("fixed"): the training split is resized, not cropped, and only flipped
    for k, city in enumerate(["aachen", "bonn"]):
        lab, img = _scene(H, W, seed=k, n=35)
        _png(tmp_path / f"cs/leftImg8bit/train/{city}/{city}_0_{k}_leftImg8bit.png", img)
        _png(tmp_path / f"cs/gtFine/train/{city}/{city}_0_{k}_gtFine_labelIds.png", lab)
        _png(tmp_path / f"cs/gtFine/train/{city}/{city}_0_{k}_gtFine_instanceIds.png", lab)
    cs = make_dataset("cityscapes", tmp_path / "cs", "train", (H, W))
    assert not cs.crop and cs.flip
    seen = set()
    for e in range(12):
        cs.set_epoch(e)
        lab = torch.from_numpy(_scene(H, W, seed=1, n=35)[0]).long()
        got = cs[1]["label"]
        assert torch.equal(got, lab) or torch.equal(got, lab.flip(-1))
        seen.add(torch.equal(got, lab))
    assert seen == {True, False}


def test_coco_sample_train_crop_and_val_resize(coco_sample):
    train_ds = make_dataset("coco", coco_sample, "train", (64, 64), flip=False)
    val = make_dataset("coco", coco_sample, "val", (64, 64))
    assert (train_ds.crop, val.crop, val.flip) == (True, False, False)
    lh, lw = data.load_size(64, 64)
    for i in (0, 5):
        d = train_ds[i]
        assert d["image"].shape == (3, 64, 64) and d["label"].shape == d["instance"].shape == (64, 64)
        ipath, lpath = train_ds.items[i]
        raw = np.asarray(Image.open(lpath)).astype(np.int64)
        full = data._resize_nearest(np.where(raw == 255, 182, raw), lh, lw)
        where = _window(full, d["label"].numpy())
        assert where
        y, x = where[0]  # the image and the instance map were cut at the label's position
        img = data._image_tensor(Image.open(ipath), lh, lw)[:, y:y + 64, x:x + 64]
        assert torch.equal(d["image"], img)
        inst = data._resize_nearest(np.asarray(Image.open(train_ds.instances[i])).astype(np.int64), lh, lw)
        assert np.array_equal(d["instance"].numpy(), inst[y:y + 64, x:x + 64])
    d = val[0]
    raw = np.asarray(Image.open(val.items[0][1])).astype(np.int64)
    assert np.array_equal(d["label"].numpy(), data._resize_nearest(np.where(raw == 255, 182, raw), 64, 64))


@pytest.mark.slow
def test_crops_and_flips_are_the_same_in_workers(tmp_path):
    """What a DataLoader worker loads for (epoch, index) is what the main process loads: a mid-epoch resume (which
    hands the remaining indices to fresh workers) sees the same crops and flips as an undisturbed run."""
    _aligned_folder(tmp_path, 16, 24, n=6)
    ds = make_dataset("facades", tmp_path, "train", (16, 24), jitter_seed=3)
    ds.set_epoch(2)
    order = [4, 1, 5, 0, 2, 3]
    inline = [ds[i]["image"] for i in order]
    loader = torch.utils.data.DataLoader(ds, batch_size=1, sampler=order[2:], num_workers=2)
    assert all(torch.equal(b["image"][0], inline[2 + k]) for k, b in enumerate(loader))


def test_cityscapes_train_ids_follow_the_official_table():
    # REFERENCE.md, "Preprocessing": label id -> train id; every other id is ignored (255)
    table = "7 0, 8 1, 11 2, 12 3, 13 4, 17 5, 19 6, 20 7, 21 8, 22 9, 23 10, 24 11, 25 12, 26 13, 27 14, 28 15, " \
            "31 16, 32 17, 33 18"
    want = torch.full((256,), 255)
    for pair in table.split(", "):
        k, v = map(int, pair.split())
        want[k] = v
    assert torch.equal(data.cityscapes_train_ids(torch.arange(256)), want)
    assert len(data.CITYSCAPES_TRAIN_NAMES) == 19


def test_each_dataset_has_its_own_default_size():
    assert data.default_size("coco") == (64, 64) and data.default_size("coco", small=False) == (256, 256)
    assert data.default_size("cityscapes") == (64, 128) and data.default_size("cityscapes", small=False) == (256, 512)
    assert data.default_size("ade20k", height=128) == (128, 128)
    assert data.default_size("cityscapes", width=256) == (128, 256)
    assert data.default_size("synthetic") == (64, 128) and data.default_size("coco", 32, 96) == (32, 96)
    import train
    tcfg, _ = train.parse_args(["--model", "gaugan", "--dataset", "coco", "--dataroot", "x"])
    assert (tcfg.height, tcfg.width) == (64, 64)  # not the synthetic scenes' 1:2
    tcfg, _ = train.parse_args(["--model", "gaugan", "--dataset", "cityscapes", "--preset", "paper", "--vgg", "off"])
    assert (tcfg.height, tcfg.width) == (256, 512)


# -----------------------------------------------------------------------------
# bad input from the user's side, through the command line: one line naming the thing, no traceback, exit != 0,
# nothing written. Used by the CLI tests of every script (test_eval, test_tables, test_bench).

ROOT = Path(data.__file__).resolve().parent


def run_cli(script, args, out, pattern, timeout=300):
    """Run `python script args` (cwd: the repo) and check its answer to bad input; `out` must stay empty."""
    import os
    import re
    import subprocess
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
    err = p.stderr.strip()
    assert p.returncode != 0, (script, args, p.stdout[-500:])
    assert "Traceback" not in p.stderr and len(err.splitlines()) == 1, (script, args, p.stderr[-2000:])
    assert re.search(pattern, err), (script, args, err)
    assert not Path(out).exists() or not any(Path(out).iterdir()), sorted(Path(out).rglob("*"))
    return err


def _cli_tree(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "noimg/train_img").mkdir(parents=True)
    (tmp_path / "noimg/train_label").mkdir()
    (tmp_path / "notes.txt").write_text("not weights")
    return tmp_path


@pytest.mark.slow
@pytest.mark.parametrize("script,args,pattern", [
    ("data.py", ["--dataset", "coco", "--dataroot", "{t}/missing"], r"missing: dataset root not found"),
    ("data.py", ["--dataset", "facades", "--dataroot", "{t}/empty"], r"empty/train_img: folder not found"),
    ("data.py", ["--n", "0"], r"--n 0: expected"),
    ("train.py", ["--dataset", "coco", "--dataroot", "{t}/missing"], r"missing: dataset root not found"),
    ("train.py", ["--dataset", "facades", "--dataroot", "{t}/noimg"], r"noimg/train_img: no images"),
    ("train.py", ["--steps", "-1"], r"--steps -1: expected an integer >= 1"),
    ("train.py", ["--batch_size", "0"], r"--batch_size 0: expected an integer >= 1"),
    ("train.py", ["--height", "48"], r"48x96 .*divisible by"),
    ("train.py", ["--vgg", "{t}/notes.txt"], r"--vgg .*notes\.txt"),
    ("train.py", ["--model", "ecgan", "--segmenter", "{t}/notes.txt"], r"--segmenter: .*notes\.txt"),
])
def test_cli_bad_input_gets_one_line(tmp_path, script, args, pattern):
    t = _cli_tree(tmp_path)
    out = t / "out"
    args = [a.format(t=t) for a in args]
    args += ["--out", str(out / "grid.png")] if script == "data.py" else ["--out", str(out), "--progress", "false"]
    run_cli(script, args, out, pattern)
