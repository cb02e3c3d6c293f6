"""Tests for ecgan.py: losses (naive == fast), Eqs. 1 and 2 on hand-set tensors, shapes, Table 3 switches."""
import math

import pytest
import torch
import torch.nn.functional as F

import ecgan


# ----------------------------------------------------------------------------- contrastive loss (Eq. 5)

LAYOUTS = {
    "three_classes": [0, 0, 0, 1, 1, 2, 2, 2, 2, 1],
    "singleton_class": [0, 0, 1, 2, 2, 2, 3],  # classes 1 and 3 have one sample: anchors without positives
    "one_class": [4, 4, 4, 4, 4],  # no negatives: every term is -log(1) = 0
    "all_singletons": [0, 1, 2, 3],  # no anchor has a positive: loss 0, no NaN
    "empty": [],  # all-dontcare batch: no anchors sampled
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_contrastive_naive_equals_vectorized(name):
    labels = torch.tensor(LAYOUTS[name], dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(len(labels), 5, generator=g, dtype=torch.float64)
    out = {}
    for impl in ("naive", "vectorized"):
        e = emb.clone().requires_grad_(True)
        loss = ecgan.pixel_contrastive_loss(e, labels, temperature=0.1, impl=impl)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(e.grad).all()
        out[impl] = (loss.detach(), e.grad)
    torch.testing.assert_close(out["naive"][0], out["vectorized"][0])
    torch.testing.assert_close(out["naive"][1], out["vectorized"][1])
    if name in ("one_class", "all_singletons", "empty"):
        assert out["vectorized"][0].item() == pytest.approx(0.0, abs=1e-12)


def test_contrastive_closed_form():
    # two classes, two samples each, orthogonal unit embeddings within/between classes:
    # each anchor has s_pos = 1 (identical) and two negatives with s = 0.
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    t = 0.5
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 2 * math.exp(0)))
    for impl in ("naive", "vectorized"):
        assert ecgan.pixel_contrastive_loss(emb, labels, t, impl).item() == pytest.approx(expected)


def test_contrastive_bad_impl_names_file():
    with pytest.raises(ValueError, match="ecgan.pixel_contrastive_loss"):
        ecgan.pixel_contrastive_loss(torch.randn(3, 2), torch.tensor([0, 0, 1]), impl="fast")


BANKS = {  # (anchor labels, bank labels)
    "bank_adds_positives": ([0, 0, 1, 2, 2], [0, 1, 1, 2, 3]),  # class 1's anchor has positives only in the bank
    "bank_only_negatives": ([0, 0, 0], [5, 6, 6]),  # the anchors' negatives are all bank rows
    "no_positive_anywhere": ([0, 1], [2, 3]),  # bank rows are never anchors: loss 0
}


@pytest.mark.parametrize("name", list(BANKS))
def test_contrastive_bank_naive_equals_vectorized(name):
    labels, bank_labels = (torch.tensor(x) for x in BANKS[name])
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(len(labels), 5, generator=g, dtype=torch.float64)
    bank = torch.randn(len(bank_labels), 5, generator=g, dtype=torch.float64)
    out = {}
    for impl in ("naive", "vectorized"):
        e, b = emb.clone().requires_grad_(True), bank.clone().requires_grad_(True)
        loss = ecgan.pixel_contrastive_loss(e, labels, 0.1, impl, b, bank_labels)
        loss.backward()
        out[impl] = (loss.detach(), e.grad, b.grad)
    for a, v in zip(out["naive"], out["vectorized"]):
        torch.testing.assert_close(a, v)
    if name == "no_positive_anywhere":
        assert out["vectorized"][0].item() == 0
    else:  # the bank changes the loss
        assert out["vectorized"][0].item() != pytest.approx(ecgan.pixel_contrastive_loss(emb, labels, 0.1).item())


def test_contrastive_bank_rows_are_never_anchors_closed_form():
    # anchors a0 = a1 = (1, 0) of class 0; bank b0 = (0, 1) of class 0, b1 = (0, 1) of class 1. Each anchor has
    # positives a_other (logit 1/t) and b0 (logit 0), and one negative b1 (logit 0):
    # Eq. 5 = (-log(e^{1/t} / (e^{1/t} + 1)) - log(1 / (1 + 1))) / 2. Were b0 an anchor, its positives (logit 0
    # against a negative at 1/t) would add a term near 1/t.
    t = 0.5
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    bank = torch.tensor([[0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    expected = (-math.log(math.exp(1 / t) / (math.exp(1 / t) + 1)) + math.log(2)) / 2
    for impl in ("naive", "vectorized"):
        loss = ecgan.pixel_contrastive_loss(emb, torch.tensor([0, 0]), t, impl, bank, torch.tensor([0, 1]))
        assert loss.item() == pytest.approx(expected)


def test_contrastive_small_temperature_float32():
    # at t = 0.01 exp(i . i+ / t) reaches e^100, past float32's range: both impls work in log space
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    g = torch.Generator().manual_seed(0)
    emb, bank = torch.randn(8, 6, generator=g), torch.randn(5, 6, generator=g)
    emb[1] = emb[0] + 0.01 * emb[1]  # a near-duplicate positive: logit close to 1/t
    bank_labels = torch.tensor([0, 1, 2, 3, 3])
    out = {}
    for impl in ("naive", "vectorized"):
        e = emb.clone().requires_grad_(True)
        loss = ecgan.pixel_contrastive_loss(e, labels, 0.01, impl, bank, bank_labels)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(e.grad).all(), impl
        out[impl] = (loss.detach(), e.grad)
    torch.testing.assert_close(out["naive"][0], out["vectorized"][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["naive"][1], out["vectorized"][1], rtol=1e-3, atol=1e-3)
    ref = ecgan.pixel_contrastive_loss(emb.double(), labels, 0.01, "naive", bank.double(), bank_labels)
    assert out["vectorized"][0].item() == pytest.approx(ref.item(), rel=1e-4)


def test_contrastive_bank_shape_errors():
    emb, labels = torch.randn(3, 4), torch.tensor([0, 0, 1])
    with pytest.raises(ValueError, match="both bank_emb and bank_labels"):
        ecgan.pixel_contrastive_loss(emb, labels, bank_emb=torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"bank_emb must be \(K, 4\)"):
        ecgan.pixel_contrastive_loss(emb, labels, bank_emb=torch.randn(2, 5), bank_labels=torch.tensor([0, 1]))


def test_concat_ranks_order_values_and_gradient_scale():
    """gather_anchors' assembly with a fake gather: rank 1 of 3, pieces of 2, 3 and 1 rows in rank order; the
    local rows keep their values and receive world x the gradient (DDP then averages over the 3 ranks)."""
    g = torch.Generator().manual_seed(0)
    pieces = [torch.randn(k, 4, generator=g) for k in (2, 3, 1)]
    labs = [torch.tensor([0, 1]), torch.tensor([1, 1, 2]), torch.tensor([0])]
    local = pieces[1].clone().requires_grad_(True)
    emb, labels = ecgan.concat_ranks(local, labs[1], [p.clone() for p in pieces], labs, rank=1)
    torch.testing.assert_close(emb, torch.cat(pieces), rtol=0, atol=0)
    assert labels.tolist() == [0, 1, 1, 1, 2, 0]
    w = torch.randn(6, 4, generator=g)
    (emb * w).sum().backward()
    torch.testing.assert_close(local.grad, 3 * w[2:5])
    assert ecgan.gather_anchors(local, labs[1])[0] is local  # one process: a no-op


def _gather_worker(rank, world, init_file, out_file):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 6)  # the same weights on both ranks, as DDP keeps them
    x, labels = _gather_inputs()[rank]
    emb, lab = ecgan.gather_anchors(lin(x), labels)
    loss = ecgan.pixel_contrastive_loss(emb, lab, 0.5)
    loss.backward()
    grad = lin.weight.grad.clone()
    dist.all_reduce(grad)  # what DDP does: the mean of the ranks' gradients
    grad /= world
    torch.save({"loss": loss.detach(), "grad": grad, "labels": lab}, f"{out_file}.{rank}")
    dist.destroy_process_group()


def _gather_inputs():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(5, 4, generator=g), torch.tensor([0, 0, 1, 2, 2])),  # rank 0: 5 anchors
            (torch.randn(3, 4, generator=g), torch.tensor([1, 2, 0]))]  # rank 1: 3 anchors


@pytest.mark.slow
def test_gather_anchors_two_gloo_processes_equal_one_process(tmp_path):
    """Two CPU processes (gloo) with different anchor counts: each rank's Eq. 5 over the gathered anchors equals
    one process's over the concatenated batch, and the rank-averaged gradient equals its gradient."""
    import torch.multiprocessing as mp
    mp.spawn(_gather_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2)
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 6)
    x = torch.cat([x for x, _ in _gather_inputs()])
    labels = torch.cat([lab for _, lab in _gather_inputs()])
    loss = ecgan.pixel_contrastive_loss(lin(x), labels, 0.5)
    loss.backward()
    for rank in range(2):
        res = torch.load(tmp_path / f"out.{rank}", weights_only=True)
        assert res["labels"].tolist() == labels.tolist()
        torch.testing.assert_close(res["loss"], loss.detach())
        torch.testing.assert_close(res["grad"], lin.weight.grad)


# ----------------------------------------------------------------------------- similarity loss (Eq. 3)

def _rand_probs_and_onehot(B=2, N=4, H=6, W=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(B, N, H, W, generator=g, dtype=torch.float64).softmax(1)
    target = F.one_hot(torch.randint(0, N, (B, H, W), generator=g), N).permute(0, 3, 1, 2).double()
    return pred, target


@pytest.mark.parametrize("chunk", [1, 7, 30, 1000])
def test_similarity_naive_equals_chunked(chunk):
    pred, target = _rand_probs_and_onehot()
    out = {}
    for impl in ("naive", "chunked"):
        p = pred.clone().requires_grad_(True)
        loss = ecgan.similarity_loss(p, target, impl=impl, chunk=chunk)
        loss.backward()
        out[impl] = (loss.detach(), p.grad)
    torch.testing.assert_close(out["naive"][0], out["chunked"][0])
    torch.testing.assert_close(out["naive"][1], out["chunked"][1])


def test_similarity_matches_eq3_by_hand():
    pred, target = _rand_probs_and_onehot(B=1, N=3, H=2, W=2)
    S, P = target[0].reshape(3, -1), pred[0].reshape(3, -1)
    M = S.shape[1]
    total = 0.0
    for i in range(M):
        for j in range(M):
            a, q = float(S[:, i] @ S[:, j]), float(P[:, i] @ P[:, j])
            total += -(a * math.log(q) + (1 - a) * math.log(1 - q))
    assert ecgan.similarity_loss(pred, target, impl="naive").item() == pytest.approx(total / M**2)


def test_similarity_zero_for_confident_equal_prediction():
    _, target = _rand_probs_and_onehot()
    grads = {}
    for impl in ecgan.SIM_IMPLS:
        p = target.clone().requires_grad_(True)
        loss = ecgan.similarity_loss(p, target, impl=impl)
        loss.backward()
        assert loss.item() < 1e-5
        grads[impl] = p.grad
    # q = 0 or 1 everywhere: the clamp to [eps, 1 - eps] holds every term, and stops every gradient (as torch's)
    for impl in ("chunked", "checkpoint"):
        torch.testing.assert_close(grads[impl], grads["naive"])
    pred, _ = _rand_probs_and_onehot(seed=1)
    assert ecgan.similarity_loss(pred, target).item() > 0.1


def _with_dontcare(pred, target, seed=2):
    """Zero the target rows of some pixels (dontcare) and make image 1 of a batch of 3 all dontcare."""
    g = torch.Generator().manual_seed(seed)
    target = target.clone()
    dc = torch.rand(target.shape[0], *target.shape[2:], generator=g) < 0.3
    if target.shape[0] > 2:
        dc[1] = True
    return target * ~dc[:, None], dc


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_similarity_impls_agree_with_dontcare_pixels(chunk):
    pred, target = _rand_probs_and_onehot(B=3)
    target, dc = _with_dontcare(pred, target)
    out = {}
    for impl in ecgan.SIM_IMPLS:
        p = pred.clone().requires_grad_(True)
        loss = ecgan.similarity_loss(p, target, impl=impl, chunk=chunk)
        loss.backward()
        out[impl] = (loss.detach(), p.grad)
    for impl in ("chunked", "checkpoint"):
        torch.testing.assert_close(out[impl][0], out["naive"][0])
        torch.testing.assert_close(out[impl][1], out["naive"][1])
    for impl, (_, grad) in out.items():  # a dontcare pixel takes part in no pair: its prediction gets no gradient
        assert (grad.permute(0, 2, 3, 1)[dc] == 0).all() and (grad.permute(0, 2, 3, 1)[~dc] != 0).any(), impl


def test_similarity_dontcare_closed_form():
    """Hand-built 2x2 images, 2 classes. Image 0: classes (0, 0 / 1, dontcare): its 3 labelled pixels make 9
    ordered pairs. Image 1: all four labelled, 16 pairs. Image 2: all dontcare, no pair. Eq. 3 per image, then
    the mean over the images that have pairs: (L_0 + L_1) / 2."""
    probs = [[(0.9, 0.1), (0.6, 0.4), (0.3, 0.7), (0.5, 0.5)],
             [(0.8, 0.2), (0.2, 0.8), (0.7, 0.3), (0.4, 0.6)],
             [(0.1, 0.9), (0.5, 0.5), (0.9, 0.1), (0.3, 0.7)]]
    classes = [[0, 0, 1, None], [0, 1, 0, 1], [None] * 4]

    def image_loss(ps, cs):
        lab = [(p, c) for p, c in zip(ps, cs) if c is not None]
        terms = []
        for pi, ci in lab:
            for pj, cj in lab:
                q = pi[0] * pj[0] + pi[1] * pj[1]
                terms.append(-math.log(q) if ci == cj else -math.log(1 - q))
        return sum(terms) / len(terms)

    expected = (image_loss(probs[0], classes[0]) + image_loss(probs[1], classes[1])) / 2
    pred = torch.tensor(probs, dtype=torch.float64).permute(0, 2, 1).reshape(3, 2, 2, 2)
    target = torch.tensor([[[float(c == k) if c is not None else 0.0 for k in (0, 1)] for c in cs]
                           for cs in classes], dtype=torch.float64).permute(0, 2, 1).reshape(3, 2, 2, 2)
    for impl in ecgan.SIM_IMPLS:
        assert ecgan.similarity_loss(pred, target, impl=impl, chunk=2).item() == pytest.approx(expected, rel=1e-9)
    # an all-dontcare batch: zero, and still a graph to call backward on
    p = pred.clone().requires_grad_(True)
    loss = ecgan.similarity_loss(p, torch.zeros_like(target))
    loss.backward()
    assert loss.item() == 0 and (p.grad == 0).all()


def test_similarity_rejects_non_onehot_target():
    pred, target = _rand_probs_and_onehot()
    with pytest.raises(ValueError, match="one-hot"):
        ecgan.similarity_loss(pred, target * 0.5)


# ----------------------------------------------------------------------------- generator pieces

def test_eq1_attention_transfer_hand_set():
    edge = torch.tensor([0.0, 100.0, -100.0])  # sigmoid: 0.5, 1, 0
    x = torch.tensor([2.0, 2.0, 2.0])
    # I' = sigmoid(I_e') * I_i' + I_i'
    torch.testing.assert_close(ecgan.attention_transfer(edge, x), torch.tensor([3.0, 4.0, 2.0]))


def test_eq2_semantic_reweight_hand_set():
    fc = torch.zeros(1, 2, 2, 2)
    fc[0, 0] = torch.tensor([[1.0, 3.0], [0.0, 0.0]])  # mean 1 -> gamma = sigmoid(1)
    fc[0, 1] = torch.tensor([[-2.0, -2.0], [-2.0, -2.0]])  # mean -2 -> gamma = sigmoid(-2)
    g0, g1 = 1 / (1 + math.exp(-1)), 1 / (1 + math.exp(2))
    expected = torch.stack([fc[0, 0] * (1 + g0), fc[0, 1] * (1 + g1)])[None]
    torch.testing.assert_close(ecgan.semantic_reweight(fc), expected)


def test_sample_anchors_balanced_across_images():
    labels = torch.cat([torch.zeros(500), torch.ones(30), torch.full((200,), 2.0), torch.full((70,), 9.0)]).long()
    idx = ecgan.sample_anchors(labels, max_anchors=120, max_per_class=50, ignore_index=9)
    counts = torch.bincount(labels[idx], minlength=10)
    assert counts[:3].tolist() == [40, 30, 40] and counts[9] == 0  # 120 // 3 classes; class 1 has only 30
    assert len(idx.unique()) == len(idx)
    # labels flattened over (B, H, W): a class in two images draws anchors from both
    two = torch.tensor([0] * 8 + [1] * 8 + [0] * 8 + [2] * 8)  # image 0: pixels 0-15, image 1: 16-31
    picked = ecgan.sample_anchors(two, max_anchors=64, max_per_class=16)
    zeros = picked[two[picked] == 0]
    assert (zeros < 16).any() and (zeros >= 16).any()


# ----------------------------------------------------------------------------- model: shapes, switches, G_l

def tiny(**kw):
    from data import DataInfo
    info = DataInfo(name="tiny", num_classes=4, dontcare=True, has_instance=True, height=32, width=64)
    cfg = ecgan.ECGANConfig(ngf=8, ndf=8, proj_dim=16, max_anchors=64, max_per_class=16, num_D=2, n_layers_D=3,
                            z_dim=8, sim_chunk=64, **kw)
    return cfg, info


def tiny_batch(info, B=2, seed=0):
    import data
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, info.label_nc, (B, info.height // 8, info.width // 8), generator=g)
    label = label.repeat_interleave(8, 1).repeat_interleave(8, 2)  # blocky layout: every class has many pixels
    batch = {"image": torch.rand(B, 3, info.height, info.width, generator=g) * 2 - 1, "label": label,
             "instance": label.clone()}
    return data.prepare_batch(batch, info, "cpu", edges=True)


def test_shapes_full_model():
    torch.manual_seed(0)
    cfg, info = tiny()
    G, D = ecgan.build(cfg, info)
    batch = tiny_batch(info)
    out = G(batch["input"])
    for k in ("fake", "intermediate", "edge", "class"):
        assert out[k].shape == (2, 3, 32, 64), k
    assert out["fake"].abs().max() <= 1 and out["intermediate"].abs().max() <= 2  # I' in [-2, 2] (Eq. 1)
    # Eq. 3 over the real classes: S and S'' without the dontcare channel
    assert out["seg_1"].shape == out["seg_2"].shape == out["seg_target"].shape == (2, info.num_classes, 8, 16)
    dontcare = F.interpolate(batch["onehot"][:, -1:], size=(8, 16), mode="nearest")[:, 0] > 0
    assert dontcare.any() and (out["seg_target"].sum(1)[dontcare] == 0).all()
    assert out["emb"].shape[1] == cfg.proj_dim and (out["emb_labels"] < info.num_classes).all()  # no dontcare
    cols = ecgan.sample(G, batch)
    assert list(cols) == ["fake", "intermediate", "edge", "attention", "class"]
    for v in cols.values():
        assert v.shape == (2, 3, 32, 64) and v.min() >= -1 and v.max() <= 1


@pytest.mark.slow
@pytest.mark.parametrize("row", list(ecgan.TABLE3) + ["vae", "class_to_gs"])
def test_table3_switch_trains_one_step(row):
    torch.manual_seed(0)
    cfg, info = tiny(**ecgan.TABLE3.get(row, {row if row != "vae" else "use_vae": True}))
    G, D = ecgan.build(cfg, info)
    batch = tiny_batch(info)
    names = {n for n, _ in G.named_parameters()}
    assert any(n.startswith("edge_branch") for n in names) == cfg.use_edge
    assert any(n.startswith("semantic") for n in names) == cfg.use_semantic
    assert any(n.startswith("label_generator") for n in names) == cfg.use_label_gen
    assert any(n.startswith("projection") for n in names) == cfg.use_contrast
    opt_g = torch.optim.Adam([p for p in G.parameters() if p.requires_grad], lr=cfg.lr_g, betas=(cfg.beta1, cfg.beta2))
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.lr_d, betas=(cfg.beta1, cfg.beta2))
    loss, logs = ecgan.g_step(G, D, batch, cfg)
    expected = {"G_gan", "G_feat"} | ({"G_sim"} if cfg.use_label_gen else set())
    expected |= ({"G_contrast", "G_l1"} if cfg.use_contrast else set()) | ({"G_kld"} if cfg.use_vae else set())
    assert set(logs) == expected
    opt_g.zero_grad()
    loss.backward()
    for n, p in G.named_parameters():  # every trainable parameter is used (DDP without find_unused_parameters)
        assert (p.grad is not None) == p.requires_grad, n
    before = [p.detach().clone() for p in G.parameters()]
    opt_g.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, G.parameters()))
    loss_d, logs_d = ecgan.d_step(G, D, batch, cfg)
    opt_d.zero_grad()
    loss_d.backward()
    assert all(p.grad is not None for p in D.parameters())
    opt_d.step()
    assert torch.isfinite(loss) and torch.isfinite(loss_d)


def test_class_pixels_eq7_sum_and_impls_agree():
    torch.manual_seed(0)
    cfg, info = tiny(class_impl="naive")
    G, _ = ecgan.build(cfg, info)
    G.eval()
    batch = tiny_batch(info)
    out = G(batch["input"], aux=False)
    G.cfg = ecgan.ECGANConfig(**{**vars(cfg), "class_impl": "vectorized"})
    G.class_generator.impl = "vectorized"
    out_v = G(batch["input"], aux=False)
    torch.testing.assert_close(out["class"], out_v["class"])
    dontcare = batch["label"] == info.num_classes
    assert dontcare.any() and (out["class"].permute(0, 2, 3, 1)[dontcare] == 0).all()  # no branch for dontcare
    # Eq. 7: each labelled pixel is produced by its own class's branch alone
    torch.testing.assert_close(out["class"], out["class_images"].sum(1))


def test_label_generator_frozen_but_passes_gradient():
    torch.manual_seed(0)
    cfg, info = tiny()
    G, D = ecgan.build(cfg, info)
    G.train()
    seg_net = G.label_generator.net
    assert not seg_net.training and not any(p.requires_grad for p in seg_net.parameters())
    batch = tiny_batch(info)
    out = G(batch["input"])
    loss = ecgan.similarity_loss(out["seg_2"], out["seg_target"])  # through G_l only
    loss.backward()
    assert all(p.grad is None for p in seg_net.parameters())
    grads = [p.grad for p in G.semantic.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    G.requires_grad_(True)  # a caller unfreezing G_l is an error, not a silent segmenter update
    with pytest.raises(RuntimeError, match="ecgan.LabelGenerator"):
        G(batch["input"])


def test_segmenter_path_missing_names_it(tmp_path):
    cfg, info = tiny(segmenter=str(tmp_path / "nope.pt"))
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        ecgan.build(cfg, info)


def test_transfer_without_edge_is_an_error():
    cfg, info = tiny(use_edge=False)
    with pytest.raises(ValueError, match="use_transfer"):
        ecgan.build(cfg, info)


def test_eq9_real_image_weight_is_lambda_plus_one():
    # a D that outputs a constant: hinge terms are known, so the D loss exposes the weights of Eq. 8 + Eq. 9
    cfg, info = tiny(lam=2.0)
    G, _ = ecgan.build(cfg, info)

    class ConstD(torch.nn.Module):
        def forward(self, x):
            return [[torch.zeros(x.shape[0], 1, 2, 2)]]

    _, logs = ecgan.d_step(G, ConstD(), tiny_batch(info), cfg)
    # fakes: edge (1) + I' (1) + I'' (lambda); reals: edge (1) + image (1 + lambda); each hinge term = 1
    assert logs["D_fake"].item() == pytest.approx(1 + 1 + cfg.lam)
    assert logs["D_real"].item() == pytest.approx(1 + 1 + cfg.lam)


def test_g_step_with_vgg_judges_edges_and_images():
    import gaugan
    torch.manual_seed(0)
    cfg, info = tiny()
    G, D = ecgan.build(cfg, info)
    vgg = gaugan.VGG19Features().eval().requires_grad_(False)
    loss, logs = ecgan.g_step(G, D, tiny_batch(info), cfg, vgg=vgg)
    assert "G_vgg" in logs and torch.isfinite(logs["G_vgg"]) and logs["G_vgg"] > 0
    loss.backward()
    assert G.edge_branch.out.parametrizations.weight.original.grad.abs().sum() > 0


def test_similarity_loss_in_bf16_autocast_stays_finite():
    pred, target = _rand_probs_and_onehot()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ecgan.similarity_loss(pred.bfloat16(), target)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert loss.item() == pytest.approx(ecgan.similarity_loss(pred, target).item(), rel=2e-2)


# ----------------------------------------------------------------------------- G_c class-specific generation (Eqs. 6, 7)

def _class_inputs(N=6, C=4, B=2, H=10, W=12, classes=(0, 2, 5), seed=0):
    """feat (B, C, H, W) and the real-class masks of a layout using `classes` and some dontcare (id N) pixels."""
    g = torch.Generator().manual_seed(seed)
    lab = torch.tensor(classes)[torch.randint(0, len(classes), (B, H, W), generator=g)]
    lab[0, :2] = N  # dontcare: no class's mask
    masks = F.one_hot(lab, N + 1)[..., :N].permute(0, 3, 1, 2).double()
    return torch.randn(B, C, H, W, generator=g, dtype=torch.double), masks


def test_class_generator_vectorized_equals_naive_forward_and_grad():
    """Same weights and spectral-norm state: the present classes' images, the gradients of every parameter and
    of F, and the power-iteration vectors after one training forward agree; absent classes (1, 3, 4) give zero
    images and zero gradient rows, and the vectorized path leaves their vectors untouched."""
    import copy
    torch.manual_seed(0)
    N = 6
    feat, masks = _class_inputs(N)
    gens = {"naive": ecgan.ClassSpecificGenerator(N, 4, layers=3, width=5, impl="naive").double()}
    gens["vectorized"] = copy.deepcopy(gens["naive"])
    gens["vectorized"].impl = "vectorized"
    before = {k: v.clone() for k, v in gens["naive"].state_dict().items()}
    res = {}
    for impl, gen in gens.items():
        f = feat.clone().requires_grad_(True)
        images, idx = gen(f, masks)
        target = torch.randn(images.shape[0], N, *images.shape[2:], generator=torch.Generator().manual_seed(1),
                             dtype=torch.double)[:, idx]
        ((images - target) ** 2).sum().backward()  # a loss that weighs every output pixel differently
        res[impl] = (images, idx, f.grad)
    (img_n, idx_n, gf_n), (img_v, idx_v, gf_v) = res["naive"], res["vectorized"]
    assert idx_n.tolist() == list(range(N)) and idx_v.tolist() == [0, 2, 5]
    torch.testing.assert_close(img_v, img_n[:, idx_v])
    assert (img_n[:, [1, 3, 4]] == 0).all() and img_v.abs().sum() > 0
    torch.testing.assert_close(gf_v, gf_n)
    params_v = dict(gens["vectorized"].named_parameters())
    for name, p in gens["naive"].named_parameters():
        torch.testing.assert_close(params_v[name].grad, p.grad, msg=name)
        assert (p.grad[[1, 3, 4]] == 0).all() and p.grad[[0, 2, 5]].abs().sum() > 0, name
    state_v = gens["vectorized"].state_dict()
    for name, t in gens["naive"].state_dict().items():
        if name[0] in "uv":  # present classes' vectors moved alike; absent ones untouched by the vectorized path
            torch.testing.assert_close(state_v[name][[0, 2, 5]], t[[0, 2, 5]], msg=name)
            assert not torch.equal(t[[0, 2, 5]], before[name][[0, 2, 5]])
            assert torch.equal(state_v[name][[1, 3, 4]], before[name][[1, 3, 4]])


def test_class_generator_cost_is_that_of_the_present_classes():
    """FLOPs (convs and spectral norm) of the vectorized path with 3 of 12 classes present == those of a 3-class
    generator, forward and backward: absent classes cost nothing. The naive loop's forward pays for all 12
    (exactly 4x; its backward is not compared: the counter books grouped-conv backward at twice the FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    def flops(gen, feat, masks, backward=True):
        with FlopCounterMode(display=False) as counter:
            out = gen(feat, masks)[0].sum()
            if backward:
                out.backward()
        return counter.get_total_flops()

    feat, masks = _class_inputs(12, classes=(1, 6, 11))
    feat.requires_grad_(True)
    big = ecgan.ClassSpecificGenerator(12, 4, layers=3, width=5).double()
    small = ecgan.ClassSpecificGenerator(3, 4, layers=3, width=5).double()
    assert flops(big, feat, masks) == flops(small, feat, masks[:, [1, 6, 11]]) > 0
    f_fast = flops(big, feat, masks, backward=False)
    big.impl = "naive"
    assert flops(big, feat, masks, backward=False) == 4 * f_fast


def test_class_generator_spectral_norm_on_every_conv():
    """App. B: once power iteration has converged, every class's every conv is its raw weight divided by that
    class's own largest singular value (W / sigma_max(W_c)); and the model builds G_c with the configured depth
    and width."""
    torch.manual_seed(0)
    N, C = 3, 4
    gen = ecgan.ClassSpecificGenerator(N, C, layers=3, width=5).double()
    feat, masks = _class_inputs(N, C, classes=(0, 1, 2))
    with torch.no_grad():
        for _ in range(50):  # one power iteration per forward in training mode
            gen(feat, masks)
    gen.eval()
    idx = torch.arange(N)
    shapes = []
    for j in range(3):
        w, _ = gen.layer(j, idx)
        shapes.append(tuple(w.shape))
        raw = gen.weight[j].detach()
        sigma = torch.linalg.matrix_norm(raw.flatten(2), ord=2)  # (N,) each class's largest singular value
        torch.testing.assert_close(w.detach(), raw / sigma.view(-1, 1, 1, 1, 1), rtol=1e-4, atol=0)
    assert shapes == [(N, 5, C, 3, 3), (N, 5, 5, 3, 3), (N, 3, 5, 3, 3)]
    assert (sigma - 1).abs().min() > 0.05  # the raw weights are far from normalised: SN did it
    cfg, info = tiny(class_layers=2, class_width=7)
    G, _ = ecgan.build(cfg, info)
    assert [tuple(w.shape) for w in G.class_generator.weight] == [(4, 7, 8, 3, 3), (4, 3, 7, 3, 3)]
    assert G.class_generator.spectral and hasattr(G.class_generator, "u1")


def test_class_generator_bad_impl_names_it():
    with pytest.raises(ValueError, match="class_impl='pixel'"):
        ecgan.build(*tiny(class_impl="pixel"))


# ----------------------------------------------------------------------------- Eq. 1 range readings

def test_eq1_range_readings_hand_set():
    edge = torch.tensor([0.0, 100.0, -100.0, 0.0])  # sigmoid: 0.5, 1, 0, 0.5
    img = torch.tensor([1.0, 1.0, -1.0, -0.5])  # I_i', a tanh output
    paper = torch.tensor([1.5, 2.0, -1.0, -0.75])  # sigmoid(I_e') * I_i' + I_i'
    torch.testing.assert_close(ecgan.edge_transfer_image(edge, img, "paper"), paper)
    torch.testing.assert_close(ecgan.edge_transfer_image(edge, img, "half"), paper / 2)
    torch.testing.assert_close(ecgan.edge_transfer_image(edge, img, "tanh"), torch.tanh(paper))


def test_eq1_range_half_keeps_the_model_output_in_image_range():
    """Without G_s I' is the output (Table 3 row E+G_i+G_e+G_t): with eq1_range="half" it is the paper's I' / 2,
    inside [-1, 1]; the paper's I' leaves it for these weights (edge branch pushed to sigmoid ~ 1)."""
    row = dict(ecgan.TABLE3["E+G_i+G_e+G_t"])
    outs = {}
    for mode in ("paper", "half"):
        torch.manual_seed(0)
        cfg, info = tiny(eq1_range=mode, **row)
        G, _ = ecgan.build(cfg, info)
        with torch.no_grad():  # I_i' = tanh(~5) ~ 1 and I_e' ~ 1, so I' ~ 1 + sigmoid(1) > 1.5
            G.image_branch.out.bias.fill_(5)
            G.edge_branch.out.bias.fill_(50)
        outs[mode] = G.eval()(tiny_batch(info)["input"], aux=False)
    paper, half = outs["paper"], outs["half"]
    torch.testing.assert_close(half["fake"], half["intermediate"])
    torch.testing.assert_close(half["intermediate"], paper["intermediate"] / 2)
    assert half["fake"].abs().max() <= 1 and paper["fake"].abs().max() > 1.5
    with pytest.raises(ValueError, match="eq1_range='clamp'"):
        ecgan.build(*tiny(eq1_range="clamp"))


# ----------------------------------------------------------------------------- memory bank (Sec. 3.3)

def test_memory_bank_fifo_per_class():
    cfg, info = tiny(bank_per_class=3)
    G, _ = ecgan.build(cfg, info)
    rows = F.normalize(torch.randn(10, cfg.proj_dim), dim=1)
    G.update_bank(rows[:2] * 5, torch.tensor([0, 0]))  # stored L2-normalised
    G.update_bank(rows[2:5], torch.tensor([0, 2, 0]))  # class 0: one free slot, then its oldest (rows[0]) goes
    torch.testing.assert_close(G.bank_emb[0], torch.stack([rows[4], rows[1], rows[2]]))
    torch.testing.assert_close(G.bank_emb[2, 0], rows[3])
    assert G.bank_count.tolist() == [3, 0, 1, 0] and G.bank_next.tolist() == [1, 0, 1, 0]
    G.update_bank(rows[5:10], torch.tensor([1] * 5))  # more new rows than slots: the first 3
    torch.testing.assert_close(G.bank_emb[1], rows[5:8])
    emb, labels = G.bank_contents()
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2]
    torch.testing.assert_close(emb[:3], G.bank_emb[0])


def test_memory_bank_updated_by_g_step_only_and_used_by_eq5():
    torch.manual_seed(0)
    cfg, info = tiny()
    G, D = ecgan.build(cfg, info)
    assert cfg.bank_per_class > 0 and not any("bank" in n for n, _ in G.named_parameters())  # buffers only
    batch = tiny_batch(info)
    ecgan.d_step(G, D, batch, cfg)
    ecgan.sample(G, batch)
    with torch.no_grad():
        G(batch["input"])  # an aux forward without grad (e.g. a validation loss)
    assert G.bank_count.sum() == 0
    _, logs = ecgan.g_step(G, D, batch, cfg)
    assert G.bank_count.sum() > 0
    # the next G step's Eq. 5 contrasts against the bank as it was before that step (eval mode: the bank and the
    # spectral-norm vectors stay put, so a seeded forward repeats the step's anchors)
    G.eval()
    torch.manual_seed(1)
    _, logs = ecgan.g_step(G, D, batch, cfg)
    torch.manual_seed(1)
    out = G(batch["input"])
    with_bank = ecgan.pixel_contrastive_loss(out["emb"], out["emb_labels"], cfg.temperature, "vectorized",
                                             out["bank_emb"], out["bank_labels"])
    torch.testing.assert_close(logs["G_contrast"], cfg.lambda_l * with_bank.detach())
    assert with_bank.item() != pytest.approx(
        ecgan.pixel_contrastive_loss(out["emb"], out["emb_labels"], cfg.temperature).item())


def test_memory_bank_state_dict_round_trip_resumes_exactly():
    torch.manual_seed(0)
    cfg, info = tiny()
    G, D = ecgan.build(cfg, info)
    batch = tiny_batch(info)
    for _ in range(2):
        ecgan.g_step(G, D, batch, cfg)
    state = G.state_dict()
    assert {"bank_emb", "bank_count", "bank_next"} <= set(state)
    G2, _ = ecgan.build(cfg, info)
    G2.load_state_dict(state)
    for name in ("bank_emb", "bank_count", "bank_next"):
        assert torch.equal(getattr(G2, name), getattr(G, name)), name
    logs = {}
    for k, g in (("saved", G), ("resumed", G2)):
        torch.manual_seed(3)
        logs[k] = ecgan.g_step(g, D, batch, cfg)[1]["G_contrast"]
    torch.testing.assert_close(logs["saved"], logs["resumed"], rtol=0, atol=0)
    assert torch.equal(G2.bank_emb, G.bank_emb)


# ----------------------------------------------------------------------------- edge oracle (edge_source="canny")

def test_edge_source_canny_is_eq1_with_the_real_edges():
    """Row E+G_i+G_e+G_t with the oracle: I' = sigmoid(E) * I_i' + I_i' with E = edge_to_image(Canny edges) computed
    by hand, for a constant I_i' = 0.7 (G_i's to_rgb replaced); G_e's own map is still output."""
    row = dict(ecgan.TABLE3["E+G_i+G_e+G_t"])
    cfg, info = tiny(edge_source="canny", **row)
    torch.manual_seed(0)
    G, _ = ecgan.build(cfg, info)
    batch = tiny_batch(info)
    G.image_branch.to_rgb = lambda x: torch.full((x.shape[0], 3, *x.shape[2:]), 0.7)  # I_i' = 0.7
    out = G.eval()(batch["input"], aux=False, edges=batch["edge"])
    e = batch["edge"].expand(-1, 3, -1, -1)
    assert 0 < e.mean() < 1  # the batch has edge and non-edge pixels
    ii = torch.full_like(out["intermediate"], 0.7)
    attn = torch.where(e > 0, torch.sigmoid(torch.tensor(1.0)), torch.sigmoid(torch.tensor(-1.0)))
    torch.testing.assert_close(out["intermediate"], attn * ii + ii)  # Eq. 1 by hand
    torch.testing.assert_close(out["fake"], out["intermediate"])  # no G_s: I' is the output
    assert out["edge"].shape == (2, 3, 32, 64)  # G_e's I_e' is still there, for D (Eq. 8)


@pytest.mark.parametrize("source", ["generated", "canny"])
def test_edge_source_canny_cuts_g_e_to_rgb_out_of_eq1_and_g_s(source):
    """Full model: changing G_e's to_rgb weights changes I_e' in both modes, but I' and I'' only with the generated
    edges (the oracle reads the real edges; the feature-level transfer uses F_e, before to_rgb)."""
    cfg, info = tiny(edge_source=source)
    torch.manual_seed(0)
    G, _ = ecgan.build(cfg, info)
    G.eval()
    batch = tiny_batch(info)
    run = lambda: G(batch["input"], aux=False, edges=batch["edge"] if source == "canny" else None)
    with torch.no_grad():
        before = run()
        G.edge_branch.out.bias.add_(3.0)
        after = run()
    assert not torch.allclose(before["edge"], after["edge"])
    same = lambda k: torch.allclose(before[k], after[k])
    assert same("intermediate") == same("fake") == (source == "canny")


def test_edge_source_canny_steps_and_sample_read_the_batch_edges():
    cfg, info = tiny(edge_source="canny")
    torch.manual_seed(0)
    G, D = ecgan.build(cfg, info)
    batch = tiny_batch(info)
    loss, _ = ecgan.g_step(G, D, batch, cfg)
    loss.backward()  # G_e still trains through its own D term (Eq. 8)
    assert G.edge_branch.out.parametrizations.weight.original.grad.abs().sum() > 0
    ecgan.d_step(G, D, batch, cfg)
    cols = ecgan.sample(G, batch)
    torch.manual_seed(1)
    flipped = dict(batch, edge=1 - batch["edge"])
    assert not torch.allclose(cols["fake"], ecgan.sample(G, flipped)["fake"])  # the oracle edges reach I''
    no_edge = {k: v for k, v in batch.items() if k != "edge"}
    with pytest.raises(KeyError, match="edge_source='canny'"):
        ecgan.sample(G, no_edge)
    with pytest.raises(ValueError, match="edge_source='canny' needs the real edges"):
        G(batch["input"], aux=False)


def test_edge_source_bad_value_names_the_field():
    with pytest.raises(ValueError, match="edge_source='sobel'"):
        ecgan.build(*tiny(edge_source="sobel"))
    with pytest.raises(ValueError, match="edge_source='canny'.*use_edge"):
        ecgan.build(*tiny(edge_source="canny", **ecgan.TABLE3["E+G_i"]))
