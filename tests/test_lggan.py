"""lggan.py: shapes, Eq. 7 weights, Eq. 6 void filtering, naive == vectorized, Table 9 switches, cross-view,
Table 4 parameter counts, DDP without find_unused_parameters."""
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F

import data
import gaugan
import lggan

H, W = 32, 64
TINY = dict(ngf=4, ndf=4, n_res=1)


def semantic_info(num_classes=5, dontcare=False):
    return data.DataInfo("t", num_classes, dontcare, True, H, W)


def crossview_info(num_classes=6):
    return data.DataInfo("cv", num_classes, False, False, H, W, "crossview")


def semantic_batch(info, label):
    B = label.shape[0]
    g = torch.Generator().manual_seed(1)
    raw = {"image": torch.rand(B, 3, H, W, generator=g) * 2 - 1, "label": label,
           "instance": torch.zeros_like(label)}
    return data.prepare_batch(raw, info, "cpu")


def crossview_batch(info, label):
    B = label.shape[0]
    g = torch.Generator().manual_seed(2)
    raw = {k: torch.rand(B, 3, H, W, generator=g) * 2 - 1 for k in ("image_a", "image", "seg_a", "seg")}
    raw.update(label=label, label_a=label.flip(2))
    return data.prepare_batch(raw, info, "cpu")


def labels(B=2, classes=(0, 1, 3), seed=0):
    """Blocky labels (8x8 cells) drawn from `classes`; sample 1 never holds classes[-1]."""
    g = torch.Generator().manual_seed(seed)
    cells = torch.randint(0, len(classes), (B, H // 8, W // 8), generator=g)
    cells[0, 0, :len(classes)] = torch.arange(len(classes))
    cells[1:][cells[1:] == len(classes) - 1] = 0
    cells[1, 0, :len(classes) - 1] = torch.arange(len(classes) - 1)
    out = torch.tensor(classes)[cells]
    return out.repeat_interleave(8, 1).repeat_interleave(8, 2)


def build(cfg, info, seed=0):
    torch.manual_seed(seed)
    return lggan.build(cfg, info)


def grads_ok(module):
    missing = [n for n, p in module.named_parameters() if p.grad is None]
    assert not missing, f"parameters without a gradient (DDP would fail): {missing}"


def test_semantic_shapes_and_sample_columns():
    info = semantic_info()
    G, D = build(lggan.Config(**TINY), info)
    batch = semantic_batch(info, labels())
    out = G(batch["input"], batch["onehot"])
    B = 2
    for k in ("fake", "global", "local"):
        assert out[k].shape == (B, 3, H, W), k
        assert out[k].abs().max() <= 1
    assert out["weights"].shape == (B, 2, H, W)
    assert out["class_idx"].tolist() == [0, 1, 3]              # vectorized: classes present in the batch
    assert out["class_images"].shape == (B, 3, 3, H, W)
    assert out["cls_loss"].dim() == 0
    cols = lggan.sample(G, batch)
    assert list(cols) == ["fake", "global", "local", "w_global", "w_local"]
    assert cols["w_global"].shape == (B, 1, H, W) and cols["w_global"].min() >= -1 and cols["w_global"].max() <= 1
    assert G.global_gen.fc is None                             # E replaces GauGAN's first conv


def test_weight_maps_sum_to_one():
    info = semantic_info()
    for cfg, inf in ((lggan.Config(**TINY), info), (lggan.Config.for_task("crossview", **TINY), crossview_info())):
        G, _ = build(cfg, inf)
        batch = (semantic_batch if inf.task == "semantic" else crossview_batch)(inf, labels())
        w = G(batch["input"], batch["onehot"])["weights"]
        assert torch.allclose(w.sum(1), torch.ones(2, H, W), atol=1e-6)   # Eq. 7
        assert (w >= 0).all()


@pytest.mark.parametrize("impl", lggan.IMPLS)
def test_class_ce_counts_only_classes_present_in_each_sample(impl):
    """Eq. 6 by hand: class 3 is in sample 0 only, class 2 nowhere; absent pairs add nothing."""
    torch.manual_seed(0)
    N, C = 4, 5
    local = lggan.LocalGenerator(N, C, n_res=0, upsample="nearest", conv_fusion=True, cls_loss=True, impl=impl,
                                 cls_pool="image")      # the H*W average below; "class" in test_eq6_pooling_*
    with torch.no_grad():
        local.classifier.bias.normal_()   # absent classes then get a nonzero CE that must not count
    feat = torch.randn(2, C, H, W)
    masks = F.one_hot(labels(classes=(0, 1, 3)), N).permute(0, 3, 1, 2).float()
    _, idx, pooled = local.classes(feat, masks)
    logits = local.classifier(pooled)
    got = lggan.class_ce(logits, idx, masks[:, idx].amax((2, 3)))
    terms = []
    for b, present in ((0, (0, 1, 3)), (1, (0, 1))):
        for c in present:
            f_c = (feat[b] * masks[b, c]).mean((1, 2))             # GAP of F_c (Eq. 2)
            terms.append(-torch.log_softmax(local.classifier(f_c), 0)[c])
    assert torch.allclose(got, torch.stack(terms).mean(), atol=1e-6)
    # a batch of one gives that sample's own mean (the public code's batch-1 case)
    got0 = lggan.class_ce(logits[:1], idx, masks[:1, idx].amax((2, 3)))
    assert torch.allclose(got0, torch.stack(terms[:3]).mean(), atol=1e-6)


@pytest.mark.parametrize("impl", ["vectorized", "pixel"])
@pytest.mark.parametrize("task", ["semantic", "crossview"])
def test_fast_per_class_generation_equals_naive_forward_and_grads(task, impl):
    """Same weights, same outputs, losses and gradients as the naive loop; absent classes (2, 4) get zero
    gradient rows and the fast versions only compute the classes present (0, 1, 3)."""
    if task == "semantic":
        info, make = semantic_info(num_classes=5, dontcare=True), semantic_batch
        label = labels(classes=(0, 1, 3, 5))                   # 5 = dontcare: no class branch
    else:
        info, make = crossview_info(num_classes=5), crossview_batch
        label = labels(classes=(0, 1, 3))
    cfgs = [lggan.Config.for_task(task, impl=i, **TINY) for i in ("naive", impl)]
    pairs = [build(cfg, info) for cfg in cfgs]
    for net_v, net_n in zip(pairs[1], pairs[0]):                # one parameter layout for both; copied before
        net_v.load_state_dict(net_n.state_dict())               # any forward moves spectral norm's vectors
    nets, results = [], []
    for cfg, (G, D) in zip(cfgs, pairs):
        G.double(), D.double()
        batch = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v)
                 for k, v in make(info, label).items()}
        loss, logs = lggan.g_step(G, D, batch, cfg)
        loss.backward()
        out = G(batch["input"], batch["onehot"])
        nets.append(G)
        results.append((loss, logs, out))
    (l_n, logs_n, o_n), (l_v, logs_v, o_v) = results
    assert o_n["class_idx"].tolist() == [0, 1, 2, 3, 4] and o_v["class_idx"].tolist() == [0, 1, 3]
    for k in ("fake", "global", "local", "weights"):
        assert torch.allclose(o_n[k], o_v[k], atol=1e-10), k
    assert torch.allclose(o_n["class_images"][:, [0, 1, 3]], o_v["class_images"], atol=1e-10)
    assert (o_n["class_images"][:, [2, 4]] == 0).all()
    for k in logs_n:
        assert torch.allclose(logs_n[k], logs_v[k], atol=1e-10), k
    grads_v = dict(nets[1].named_parameters())
    for n, p in nets[0].named_parameters():
        assert torch.allclose(p.grad, grads_v[n].grad, atol=1e-10), n
    cls = nets[1].local_gen.classes if task == "semantic" else nets[1].classes
    assert (cls.weight.grad[[2, 4]] == 0).all() and cls.weight.grad[[0, 1, 3]].abs().sum() > 0


def test_pixel_conv_matches_per_class_conv_at_borders_and_dontcare():
    """The pixel-wise rewrite against the definition, with random weights (not the tiny init), labels touching
    every border, a class present in one sample only, and dontcare pixels."""
    torch.manual_seed(0)
    N, C = 7, 3
    gen = lggan.ClassGenerator(N, C).double()
    with torch.no_grad():
        gen.weight.normal_(), gen.bias.normal_()
    lab = torch.randint(0, 4, (2, 12, 20))
    lab[0, :3] = 6
    lab[1, 5:9] = N                                            # dontcare
    masks = F.one_hot(lab, N + 1)[..., :N].permute(0, 3, 1, 2).double()
    feat = torch.randn(2, C, 12, 20, dtype=torch.double)
    gen.impl = "pixel"
    images, idx, _ = gen(feat, masks)
    assert idx.tolist() == [0, 1, 2, 3, 6]
    for j, c in enumerate(idx.tolist()):
        x = F.pad(feat * masks[:, c:c + 1], (3, 3, 3, 3), mode="reflect")
        want = torch.tanh(F.conv2d(x, gen.weight[c], gen.bias[c])) * masks[:, c:c + 1]
        assert torch.allclose(images[:, j], want, atol=1e-12), c


def test_masked_l1_is_the_sum_of_per_class_l1_losses():
    """Eq. 3 closed form: sum_c nn.L1Loss(I_g * M_c, I_c) over the classes given."""
    torch.manual_seed(0)
    onehot = F.one_hot(labels(classes=(0, 2, 3)), 4).permute(0, 3, 1, 2).float()
    real = torch.rand(2, 3, H, W) * 2 - 1
    idx = torch.tensor([0, 2, 3])
    images = torch.rand(2, 3, 3, H, W) * onehot[:, idx].unsqueeze(2)
    want = sum(F.l1_loss(real * onehot[:, c:c + 1], images[:, j]) for j, c in enumerate(idx.tolist()))
    assert torch.allclose(lggan.masked_l1(images, idx, onehot, real), want)


def test_branch_upsampling_rule():
    """'nearest' keeps the public code's transposed convs in G_l and G_w; other names put a 3x3 conv of the same
    size before the named upsampler, so a parameter-free upsampler leaves the count unchanged."""
    info = semantic_info()
    nets = {u: build(lggan.Config(upsample=u, **TINY), info)[0] for u in ("nearest", "bilinear")}
    for part in (nets["nearest"].local_gen.up, nets["nearest"].weight_map.up):
        assert sum(isinstance(m, torch.nn.ConvTranspose2d) for m in part.modules()) == 2
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in nets["bilinear"].modules())
    assert gaugan.count_params(nets["nearest"]) == gaugan.count_params(nets["bilinear"])


ABLATIONS = {  # Table 9
    "B1": dict(local=False),
    "B2": dict(conv_fusion=False, cls_loss=False, weight_map=False),
    "B3": dict(cls_loss=False, weight_map=False),
    "B4": dict(weight_map=False),
    "B5": dict(),
}


@pytest.mark.parametrize("row", sorted(ABLATIONS))
def test_ablation_switch_builds_and_trains_a_step(row):
    info = semantic_info()
    cfg = lggan.Config(**TINY, **ABLATIONS[row])
    G, D = build(cfg, info)
    built = {"local": G.local_gen is not None, "weight_map": G.weight_map is not None,
             "conv_fusion": G.local_gen is not None and G.local_gen.fuse is not None,
             "cls_loss": G.local_gen is not None and G.local_gen.classifier is not None}
    assert built == {k: cfg.local and getattr(cfg, k) for k in built}   # disabled modules are not built
    opt_G, opt_D = torch.optim.Adam(G.parameters(), 1e-4), torch.optim.Adam(D.parameters(), 4e-4)
    batch = semantic_batch(info, labels())
    loss, logs = lggan.g_step(G, D, batch, cfg)
    loss.backward()
    grads_ok(G)
    opt_G.step()
    assert ("G_cls" in logs) == (row in ("B4", "B5")) and ("G_l1_local" in logs) == (row != "B1")
    d_loss, _ = lggan.d_step(G, D, batch, cfg)
    opt_D.zero_grad()
    d_loss.backward()
    grads_ok(D)
    opt_D.step()
    assert torch.isfinite(loss) and torch.isfinite(d_loss)
    cols = lggan.sample(G, batch)
    assert ("w_local" in cols) == (row == "B5") and ("local" in cols) == (row != "B1")


def test_lggan_plus_plus_uses_sau_everywhere():
    import sau
    info = semantic_info()
    cfg = lggan.Config(upsample="sau", **TINY)
    G, D = build(cfg, info)
    for part in (G.global_gen.ups, G.local_gen.up, G.weight_map.up):
        assert any(isinstance(m, sau.SAU) for m in part.modules())
        assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in part.modules())
    loss, _ = lggan.g_step(G, D, semantic_batch(info, labels()), cfg)
    loss.backward()
    grads_ok(G)


def test_crossview_trains_a_step():
    info = crossview_info()
    cfg = lggan.Config.for_task("crossview", **TINY)
    assert (cfg.lr_g, cfg.lr_d, cfg.beta1, cfg.beta2, cfg.lambda_local_l1) == (2e-4, 2e-4, 0.5, 0.999, 100.0)
    G, D = build(cfg, info)
    batch = crossview_batch(info, labels(classes=(0, 2, 5)))
    out = G(batch["input"], batch["onehot"])
    assert batch["input"].shape[1] == 6
    for k in ("fake", "global", "local"):
        assert out[k].shape == (2, 3, H, W)
    assert [p.shape for p in D(batch["seg"], batch["image_a"], out["fake"])] == [(2, 1, 2, 6)] * 2
    opt_G = torch.optim.Adam(G.parameters(), cfg.lr_g, betas=(cfg.beta1, cfg.beta2))
    loss, logs = lggan.g_step(G, D, batch, cfg)
    assert set(logs) == {"G_gan", "G_l1", "G_tv", "G_l1_local"}
    loss.backward()
    grads_ok(G)
    opt_G.step()
    d_loss, _ = lggan.d_step(G, D, batch, cfg)
    d_loss.backward()
    grads_ok(D)
    assert list(lggan.sample(G, batch)) == ["fake", "global", "local", "w_global", "w_local"]


def test_parameter_counts_table4_and_cityscapes():
    rows = {}
    for name, cfg, info in lggan.table_infos():
        if name not in ("crossview", "cityscapes"):
            continue
        with torch.device("meta"):
            G, D = lggan.build(cfg, info)
        rows[name] = G, D
    G, D = rows["crossview"]
    assert abs(gaugan.count_params(G) / 12.1913e6 - 1) < 0.01          # Table 4: G 12.1913M
    for d in (D.D_s, D.D_i):
        assert abs(gaugan.count_params(d) / 2.7678e6 - 1) < 0.01      # Table 4: D 2.7678M each
    # public code 111.1M = ours + GauGAN's first conv, which it builds but never uses (36*9*1024 + 1024)
    G, _ = rows["cityscapes"]
    assert gaugan.count_params(G) + 36 * 9 * 1024 + 1024 == pytest.approx(111.12e6, rel=1e-3)


def test_errors_name_the_file_and_value():
    with pytest.raises(ValueError, match="lggan.py.*task='depth'"):
        lggan.build(lggan.Config(**TINY), data.DataInfo("d", 3, False, False, H, W, "depth"))
    with pytest.raises(ValueError, match="lggan.py.*impl='loop'"):
        lggan.build(lggan.Config(impl="loop", **TINY), semantic_info())


def _ddp_worker(rank, world, init_file, result_file):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    info = semantic_info()
    cfg = lggan.Config(upsample="sau", **TINY)
    G, D = build(cfg, info)                                     # same seed: same weights on both ranks
    G = DDP(G)                                                  # find_unused_parameters=False (the default)
    opt = torch.optim.Adam(G.parameters(), 1e-4)
    # each rank sees different classes, so the vectorized branch gathers different weights per rank
    batch = semantic_batch(info, labels(classes=(0, 1, 3) if rank == 0 else (2, 4), seed=rank))
    for _ in range(2):  # an unused parameter makes the second iteration raise
        opt.zero_grad()
        loss, _ = lggan.g_step(G, D, batch, cfg)
        loss.backward()
        opt.step()
        lggan.d_step(G, D, batch, cfg)[0].backward()
    g = G.module.local_gen.classes.weight.grad
    torch.save(g, f"{result_file}.{rank}")
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_step_two_processes_without_unused_parameters():
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_ddp_worker, args=(2, os.path.join(tmp, "init"), os.path.join(tmp, "grad")), nprocs=2)
        g0, g1 = (torch.load(os.path.join(tmp, f"grad.{r}")) for r in range(2))
    assert torch.equal(g0, g1)                                  # all-reduced
    assert (g0.flatten(1).abs().sum(1) > 0).all()               # the union of both ranks' classes: all 5


@pytest.mark.parametrize("impl", lggan.IMPLS)
def test_eq6_pooling_by_class_area_or_by_image_area(impl):
    """Semantic-guided average pooling by hand: "class" is the mean of f' over the class's pixels of that sample,
    "image" (public code) the sum over them / (H*W); a class absent from one sample pools to 0 there (no NaN).
    The config default reaches the model."""
    torch.manual_seed(0)
    N, C = 4, 3
    lab = labels(classes=(0, 1, 3))                               # class 3 only in sample 0, class 2 nowhere
    lab[0, :8, :8] = 2                                            # one small 8x8 patch of class 2 in sample 0
    masks = F.one_hot(lab, N).permute(0, 3, 1, 2).float()
    feat = torch.randn(2, C, H, W)
    for pool in lggan.POOLS:
        _, idx, pooled = lggan.ClassGenerator(N, C, impl, pool)(feat, masks)
        for k, c in enumerate(idx.tolist()):
            for b in range(2):
                pix = feat[b][:, lab[b] == c]                     # (C, pixels of class c in sample b)
                if pix.shape[1] == 0:
                    want = torch.zeros(C)
                else:
                    want = pix.mean(1) if pool == "class" else pix.sum(1) / (H * W)
                assert torch.allclose(pooled[b, k], want, atol=1e-6), (pool, b, c)
    assert lggan.Config().cls_pool == "class"
    G, _ = build(lggan.Config(cls_pool="image", **TINY), semantic_info())
    assert G.local_gen.classes.pool == "image"
    with pytest.raises(ValueError, match="cls_pool='sum'"):
        build(lggan.Config(cls_pool="sum", **TINY), semantic_info())


# ----------------------------------------------------------------------------- where the upsamplers are

def upsampler_calls(G, info, B=1):
    """(type name, input channels) of every upsampling layer (nearest, transposed conv, SAU) in call order during
    one forward (E, [shared SAU,] G_g's trunk, G_l, G_w); asserts each one doubles the height and width."""
    import sau
    calls = []

    def hook(m, inp, out):
        assert out.shape[2:] == (2 * inp[0].shape[2], 2 * inp[0].shape[3]), type(m).__name__
        calls.append((type(m).__name__, inp[0].shape[1]))
    kinds = (torch.nn.Upsample, torch.nn.ConvTranspose2d, sau.SAU)
    hooks = [m.register_forward_hook(hook) for m in G.modules() if isinstance(m, kinds)]
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, info.num_classes, (B, info.height, info.width), generator=g)
    onehot = F.one_hot(label, info.label_nc).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        G(torch.cat([onehot, torch.zeros(B, info.input_nc - info.label_nc, info.height, info.width)], 1), onehot)
    for h in hooks:
        h.remove()
    return calls


@pytest.mark.parametrize("ups", ["normal", "more"])
def test_upsamplers_in_order_per_placement(ups):
    """ngf = 4: the trunk's upsamplers see 16ngf = 64, 64, 32, 16, 8 channels (one more 64 in 'more'); G_l's and
    G_w's blocks go 4ngf = 16 -> 8 -> 4. The SAUs in the branches see the conv's output channels (8, 4): the
    conv comes first. sau_placement="encoder": one SAU on E's 16-channel H/4 map, then LGGAN's upsamplers, the
    branches' first block at stride 1 (no upsampler), so one transposed conv each."""
    h, w = (32, 64) if ups == "normal" else (64, 128)
    info = data.DataInfo("t", 5, False, True, h, w)
    trunk = [64] * (2 if ups == "more" else 1) + [64, 32, 16, 8]
    near = [("Upsample", c) for c in trunk]
    want = {
        ("nearest", "upsamplers"): near + [("ConvTranspose2d", 16), ("ConvTranspose2d", 8)] * 2,
        ("sau", "upsamplers"): near[:len(trunk) - 4] + [("SAU", c) for c in trunk[-4:]] + [("SAU", 8), ("SAU", 4)] * 2,
        ("sau", "encoder"): [("SAU", 16)] + near + [("ConvTranspose2d", 8)] * 2,
    }
    for (upsample, placement), calls in want.items():
        cfg = lggan.Config(upsample=upsample, sau_placement=placement, num_upsampling_layers=ups, **TINY)
        G = build(cfg, info)[0]
        assert upsampler_calls(G, info) == calls, (upsample, placement)


@pytest.mark.parametrize("placement", lggan.SAU_PLACEMENTS)
def test_sau_window_reaches_every_sau(placement):
    import sau
    for window in sau.WINDOWS:
        for info in (semantic_info(), crossview_info()):
            cfg = lggan.Config.for_task(info.task, upsample="sau", sau_placement=placement, sau_window=window,
                                        **TINY)
            gen = lggan.LGGANGenerator if info.task == "semantic" else lggan.CrossViewGenerator
            G = gen(cfg, info)
            saus = [m for m in G.modules() if isinstance(m, sau.SAU)]
            assert saus and all(m.window == window for m in saus), (placement, window, info.task)


def test_encoder_placement_adds_one_sau_and_runs():
    """f' = SAU(f) after E, shared: LGGAN's parameters plus one SAU on 4ngf channels; both tasks train a step."""
    import sau
    for info, batch in ((semantic_info(), None), (crossview_info(), None)):
        lg, pp = (lggan.Config.for_task(info.task, upsample=u, sau_placement=p, **TINY)
                  for u, p in (("nearest", "upsamplers"), ("sau", "encoder")))
        G0, G = build(lg, info)[0], build(pp, info)[0]
        assert gaugan.count_params(G) == gaugan.count_params(G0) + gaugan.count_params(sau.SAU(4 * TINY["ngf"]))
        make = semantic_batch if info.task == "semantic" else crossview_batch
        G, D = build(pp, info)
        loss, _ = lggan.g_step(G, D, make(info, labels()), pp)
        loss.backward()
        grads_ok(G)
        assert G.shared_sau.compress.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="sau_placement='encoder'.*upsample='nearest'"):
        build(lggan.Config(sau_placement="encoder", **TINY), semantic_info())
    with pytest.raises(ValueError, match="sau_placement='fig2'"):
        build(lggan.Config(upsample="sau", sau_placement="fig2", **TINY), semantic_info())
    with pytest.raises(ValueError, match="upsample_low_res"):
        build(lggan.Config(upsample="sau", sau_placement="encoder", upsample_low_res=True, **TINY), semantic_info())
