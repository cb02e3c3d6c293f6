"""GauGAN backbone: shapes, SPADE's closed form, D features, losses, VGG loading, one train step, size."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import gaugan
from gaugan import GauGANConfig, GauGANGenerator


def tiny_cfg(**kw):
    return GauGANConfig(ngf=8, ndf=8, z_dim=16, **kw)


def onehot(b, c, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.one_hot(torch.randint(0, c, (b, h, w), generator=g), c).permute(0, 3, 1, 2).float()


# ----------------------------------------------------------------------------- generator

@pytest.mark.parametrize("ups,h,w,sh,sw", [("normal", 32, 64, 1, 2), ("more", 64, 128, 1, 2)])
def test_generator_shapes(ups, h, w, sh, sw):
    torch.manual_seed(0)
    G = GauGANGenerator(tiny_cfg(num_upsampling_layers=ups), 5, h, w)
    assert (G.sh, G.sw) == (sh, sw)
    assert len(G.ups) == {"normal": 5, "more": 6}[ups]
    seg = onehot(2, 5, h, w)
    x = G.head(seg)
    assert x.shape == (2, 16 * 8, sh, sw)
    feat = G.trunk(x, seg)
    assert feat.shape == (2, 8, h, w)
    img = G.forward(seg)
    assert img.shape == (2, 3, h, w) and img.abs().max() <= 1
    G.eval()  # spectral norm runs a power iteration per training forward; eval keeps the weights fixed
    torch.testing.assert_close(G(seg), G.to_rgb(G.trunk(G.head(seg), seg)))


def test_generator_rejects_indivisible_size():
    with pytest.raises(ValueError, match=r"48x64.*2\^5"):
        GauGANGenerator(tiny_cfg(), 5, 48, 64)
    with pytest.raises(ValueError, match="num_upsampling_layers"):
        GauGANGenerator(tiny_cfg(num_upsampling_layers="most"), 5, 64, 64)
    with pytest.raises(ValueError, match=r"32x32.*1x1"):
        GauGANGenerator(tiny_cfg(), 5, 32, 32)


def test_headless_generator_has_no_first_layer():
    G = GauGANGenerator(tiny_cfg(), 5, 32, 64, head=False)
    assert G.fc is None
    with pytest.raises(RuntimeError, match="head=False"):
        G.head(onehot(1, 5, 32, 64))
    assert G.trunk(torch.randn(1, 128, 1, 2), onehot(1, 5, 32, 64)).shape == (1, 8, 32, 64)


def test_upsamplers_come_from_sau(monkeypatch):
    if gaugan.sau is not None:  # the layers are whatever sau.make_upsampler builds, per position's channels
        G = GauGANGenerator(tiny_cfg(), 5, 32, 64)
        assert type(G.ups[0]) is type(gaugan.sau.make_upsampler("nearest", 128, scale=2))
    monkeypatch.setattr(gaugan, "sau", None)
    assert isinstance(gaugan.make_upsampler("nearest", 4), torch.nn.Upsample)
    with pytest.raises(ValueError, match="sau.py"):
        gaugan.make_upsampler("sau", 4)


def test_spade_closed_form():
    """norm(x) * (1 + gamma) + beta with shared conv = identity on the one-hot map, gamma = A seg, beta = B seg."""
    torch.manual_seed(0)
    C, L = 3, 2
    spade = gaugan.SPADE(C, L, hidden=L)
    A, B = torch.randn(C, L), torch.randn(C, L)
    with torch.no_grad():
        for conv, M in [(spade.shared[0], torch.eye(L)), (spade.gamma, A), (spade.beta, B)]:
            conv.weight.zero_()
            conv.weight[:, :, 1, 1] = M  # centre tap only: a per-pixel linear map
            conv.bias.zero_()
    x = torch.randn(2, C, 8, 8) * 3 + 1
    seg = onehot(2, L, 4, 4)  # half resolution: SPADE resizes it (nearest)
    seg_up = seg.repeat_interleave(2, 2).repeat_interleave(2, 3)
    mean, var = x.mean((2, 3), keepdim=True), x.var((2, 3), unbiased=False, keepdim=True)
    normed = (x - mean) / torch.sqrt(var + 1e-5)
    gamma = torch.einsum("cl,blhw->bchw", A, seg_up)
    beta = torch.einsum("cl,blhw->bchw", B, seg_up)
    torch.testing.assert_close(spade(x, seg), normed * (1 + gamma) + beta)


def test_resblock_shortcut_and_spectral_norm():
    same = gaugan.SPADEResBlock(16, 16, 3)
    diff = gaugan.SPADEResBlock(16, 8, 3)
    assert not same.learned_shortcut and not hasattr(same, "conv_s")
    assert diff.learned_shortcut and diff.conv_0.out_channels == 8  # middle = min(fin, fout)
    assert hasattr(diff.conv_0, "parametrizations") and hasattr(diff.conv_s, "parametrizations")
    assert diff.conv_s.bias is None
    assert diff(torch.randn(2, 16, 8, 8), onehot(2, 3, 8, 8)).shape == (2, 8, 8, 8)


def test_style_encoder_and_vae_outputs_depend_on_z():
    torch.manual_seed(0)
    cfg = tiny_cfg(use_vae=True)
    enc = gaugan.StyleEncoder(cfg.ngf, cfg.z_dim)
    mu, logvar = enc(torch.rand(2, 3, 32, 64) * 2 - 1)
    assert mu.shape == logvar.shape == (2, 16)
    G = GauGANGenerator(cfg, 5, 32, 64).eval()
    seg = onehot(1, 5, 32, 64)
    z1, z2 = torch.randn(1, 16), torch.randn(1, 16)
    torch.testing.assert_close(G(seg, z1), G(seg, z1))
    assert (G(seg, z1) - G(seg, z2)).abs().max() > 1e-4


def test_kld_closed_form():
    assert gaugan.kld_loss(torch.zeros(4, 16), torch.zeros(4, 16)).item() == 0
    # KL(N(1, 1) || N(0, 1)) = 1/2 per dimension, summed over z, averaged over the batch
    assert gaugan.kld_loss(torch.ones(4, 16), torch.zeros(4, 16)).item() == pytest.approx(8.0)


# ----------------------------------------------------------------------------- discriminator and losses

def test_discriminator_returns_all_features():
    D = gaugan.MultiscaleDiscriminator(5 + 3, ndf=8, n_layers=4, num_D=3)
    out = D(torch.randn(2, 8, 64, 64))
    assert len(out) == 3 and all(len(f) == 5 for f in out)
    assert [f.shape[1] for f in out[0]] == [8, 16, 32, 64, 1]
    assert out[1][-1].shape[-1] < out[0][-1].shape[-1]  # second scale sees the pooled input


def test_discriminate_matches_separate_forwards():
    """One concatenated forward == D on fake and on real separately (eval: no power-iteration update)."""
    torch.manual_seed(0)
    D = gaugan.MultiscaleDiscriminator(5 + 3, ndf=8).eval()
    cond, fake, real = onehot(2, 5, 32, 32), torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    fake_preds, real_preds = gaugan.discriminate(D, cond, fake, real)
    for got, want in [(fake_preds, D(gaugan.d_input(cond, fake))), (real_preds, D(gaugan.d_input(cond, real)))]:
        for g, w in zip(got, want):
            for a, b in zip(g, w):
                torch.testing.assert_close(a, b)


def test_gan_d_loss_is_hinge_on_one_forward():
    torch.manual_seed(0)
    D = gaugan.MultiscaleDiscriminator(5 + 3, ndf=8).eval()
    cond, fake, real = onehot(2, 5, 32, 32), torch.randn(2, 3, 32, 32, requires_grad=True), torch.randn(2, 3, 32, 32)
    loss, logs = gaugan.gan_d_loss(D, cond, fake, real)
    fake_preds, real_preds = gaugan.discriminate(D, cond, fake, real)
    torch.testing.assert_close(loss, gaugan.hinge_d_loss(real_preds, fake_preds))
    torch.testing.assert_close(loss.detach(), logs["D_fake"] + logs["D_real"])
    loss.backward()
    assert fake.grad is None  # fake is detached inside


def test_hinge_losses_closed_form():
    real = [[torch.tensor([0.5, 2.0, -1.0])], [torch.tensor([1.0, 0.0])]]
    fake = [[torch.tensor([-2.0, 0.5, 0.0])], [torch.tensor([-0.5, 3.0])]]
    # scale 0: real relu(1-r) = (0.5, 0, 2) -> 2.5/3, fake relu(1+f) = (0, 1.5, 1) -> 2.5/3
    # scale 1: real (0, 1) -> 0.5, fake (0.5, 4) -> 2.25
    d = (2.5 / 3 + 2.5 / 3 + 0.5 + 2.25) / 2
    assert gaugan.hinge_d_loss(real, fake).item() == pytest.approx(d)
    assert gaugan.hinge_g_loss(fake).item() == pytest.approx((1.5 / 3 + -2.5 / 2) / 2)


def test_feature_matching():
    torch.manual_seed(0)
    real = [[torch.randn(2, 4, 8, 8) for _ in range(5)] for _ in range(2)]
    assert gaugan.feature_matching_loss(real, real).item() == 0
    shifted = [[f + 0.5 for f in scale[:-1]] + [scale[-1] + 100] for scale in real]  # prediction is ignored
    # 4 intermediate features per scale, each L1 = 0.5, summed per scale and averaged over 2 scales
    assert gaugan.feature_matching_loss(shifted, real).item() == pytest.approx(4 * 0.5)


# ----------------------------------------------------------------------------- VGG19

def torchvision_vgg19_state(seed=0):
    """Random tensors under torchvision's vgg19 `features.*` names and shapes (written out independently)."""
    g = torch.Generator().manual_seed(seed)
    convs = {0: (3, 64), 2: (64, 64), 5: (64, 128), 7: (128, 128), 10: (128, 256), 12: (256, 256), 14: (256, 256),
             16: (256, 256), 19: (256, 512), 21: (512, 512), 23: (512, 512), 25: (512, 512), 28: (512, 512),
             30: (512, 512), 32: (512, 512), 34: (512, 512)}
    state = {}
    for i, (cin, cout) in convs.items():
        state[f"features.{i}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * math.sqrt(2 / (9 * cin))
        state[f"features.{i}.bias"] = torch.zeros(cout)
    state["classifier.6.bias"] = torch.zeros(1000)  # extra keys of the full model are ignored
    return state


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("vgg") / "vgg19.pth"
    torch.save(torchvision_vgg19_state(), path)
    return path


def test_load_vgg19_accepts_torchvision_layout(vgg_file):
    vgg = gaugan.load_vgg19(str(vgg_file))
    state = torchvision_vgg19_state()
    torch.testing.assert_close(vgg.features[28].weight, state["features.28.weight"])
    assert not any(p.requires_grad for p in vgg.parameters()) and not vgg.training
    feats = vgg(torch.rand(1, 3, 32, 32) * 2 - 1)
    assert [f.shape[1:] for f in feats] == [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 2, 2)]
    assert gaugan.load_vgg19(None) is None and gaugan.load_vgg19("") is None


def test_load_vgg19_rejects_bad_files(tmp_path):
    state = torchvision_vgg19_state()
    state["features.0.weight"] = torch.zeros(64, 3, 5, 5)
    bad = tmp_path / "wrong_shape.pth"
    torch.save(state, bad)
    with pytest.raises(ValueError, match=r"wrong_shape\.pth.*features\.0\.weight"):
        gaugan.load_vgg19(str(bad))
    missing = tmp_path / "missing_key.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, missing)
    with pytest.raises(ValueError, match=r"missing_key\.pth.*missing"):
        gaugan.load_vgg19(str(missing))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        gaugan.load_vgg19(str(tmp_path / "nope.pth"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"garbage\.pth"):
        gaugan.load_vgg19(str(garbage))


def test_vgg_loss(vgg_file):
    vgg = gaugan.load_vgg19(str(vgg_file))
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert gaugan.vgg_loss(vgg, x, x).item() == 0
    # == the naive weighted sum with separate forwards
    naive = sum(w * F.l1_loss(a, b) for w, a, b in zip(gaugan.VGG_WEIGHTS, vgg(x), vgg(y)))
    torch.testing.assert_close(gaugan.vgg_loss(vgg, x, y), naive)


# ----------------------------------------------------------------------------- model interface

@pytest.mark.parametrize("use_vae,upsample", [(False, "nearest"), (True, "nearest"), (False, "sau")])
def test_g_step_d_step(use_vae, upsample, vgg_file):
    if upsample != "nearest" and gaugan.sau is None:
        pytest.skip("sau.py not importable")
    torch.manual_seed(0)
    cfg = tiny_cfg(use_vae=use_vae, upsample=upsample)
    info = SimpleNamespace(input_nc=6, height=32, width=64)
    G, D = gaugan.build(cfg, info)
    vgg = gaugan.load_vgg19(str(vgg_file))
    batch = {"input": onehot(2, 6, 32, 64), "image": torch.rand(2, 3, 32, 64) * 2 - 1}

    loss, logs = gaugan.g_step(G, D, batch, cfg, vgg)
    assert torch.isfinite(loss) and set(logs) == {"G_gan", "G_feat", "G_vgg"} | ({"G_kld"} if use_vae else set())
    assert all(not v.requires_grad and v.dim() == 0 for v in logs.values())
    torch.testing.assert_close(loss.detach(), sum(logs.values()))
    loss.backward()
    missing = [n for n, p in G.named_parameters() if p.grad is None]
    assert not missing, f"G parameters without gradient: {missing}"

    G.zero_grad(set_to_none=True)
    D.zero_grad(set_to_none=True)
    loss, logs = gaugan.d_step(G, D, batch, cfg)
    assert torch.isfinite(loss) and set(logs) == {"D_fake", "D_real"}
    loss.backward()
    assert all(p.grad is None for p in G.parameters())  # fake made under no_grad
    assert all(p.grad is not None for p in D.parameters())

    cols = gaugan.sample(G, batch)
    assert list(cols)[0] == "fake" and all(v.shape == (2, 3, 32, 64) for v in cols.values())


def test_cityscapes_generator_size():
    """Published 93.0M (REFERENCE: the public code's 93.05M); counted on the meta device, no memory."""
    cfg = GauGANConfig(num_upsampling_layers="more")
    with torch.device("meta"):
        G = GauGANGenerator(cfg, 35 + 1, 256, 512)
    n = gaugan.count_params(G)
    assert (G.sh, G.sw) == (4, 8)
    assert all(p.is_meta for p in G.parameters())
    assert abs(n / 93.0e6 - 1) < 0.01, n


@pytest.mark.parametrize("name,paper", [("deconv", 98.6), ("pixelshuffle", 143.2), ("attention", 97.4),
                                        ("sau", 93.4), ("bilinear", 93.0)])
def test_table12_parameter_counts(name, paper):
    """LGGAN++ Table 12: GauGAN on Cityscapes with the four decoder upsamplers replaced, to 0.1M."""
    cfg = GauGANConfig(num_upsampling_layers="more", upsample=name)
    n = gaugan.count_generator(cfg, 35 + 1, 256, 512)
    assert abs(n / 1e6 - paper) < 0.1, (name, n)


# ----------------------------------------------------------------------------- where the upsamplers are

def upsampler_calls(model, *inputs):
    """(type name, input channels) of every upsampling layer (nearest, transposed conv, SAU) in call order during
    one forward; asserts each one doubles the height and width."""
    kinds = (torch.nn.Upsample, torch.nn.ConvTranspose2d) + ((gaugan.sau.SAU,) if gaugan.sau else ())
    calls = []

    def hook(m, inp, out):
        assert out.shape[2:] == (2 * inp[0].shape[2], 2 * inp[0].shape[3]), type(m).__name__
        calls.append((type(m).__name__, inp[0].shape[1]))
    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    with torch.no_grad():
        model(*inputs)
    for h in hooks:
        h.remove()
    return calls


@pytest.mark.parametrize("ups", ["normal", "more"])
def test_trunk_upsamplers_in_order(ups):
    """nearest x5 (x6 in 'more'); GauGAN+SAU: nearest, [nearest,] then SAUs on 16nf, 8nf, 4nf, 2nf channels
    (Table 12's 93.4M); with upsample_low_res SAUs only. nf = 8, so 16nf = 128."""
    if gaugan.sau is None:
        pytest.skip("sau.py not importable")
    h, w = (32, 64) if ups == "normal" else (64, 128)
    low = [128] * (2 if ups == "more" else 1)
    want = {("nearest", False): [("Upsample", c) for c in low + [128, 64, 32, 16]],
            ("sau", False): [("Upsample", c) for c in low] + [("SAU", c) for c in (128, 64, 32, 16)],
            ("sau", True): [("SAU", c) for c in low + [128, 64, 32, 16]]}
    for (name, low_res), calls in want.items():
        torch.manual_seed(0)
        G = GauGANGenerator(tiny_cfg(num_upsampling_layers=ups, upsample=name, upsample_low_res=low_res), 5, h, w)
        assert upsampler_calls(G, onehot(1, 5, h, w)) == calls, (name, low_res)


@pytest.mark.parametrize("window", ["expanded", "input"])
def test_sau_window_reaches_every_sau(window):
    """GauGANConfig.sau_window, and ECGAN's through gaugan.backbone_config, reach each SAU the trunk builds."""
    if gaugan.sau is None:
        pytest.skip("sau.py not importable")
    import data
    import ecgan
    G = GauGANGenerator(tiny_cfg(upsample="sau", upsample_low_res=True, sau_window=window), 5, 32, 64)
    saus = [m for m in G.modules() if isinstance(m, gaugan.sau.SAU)]
    assert len(saus) == 5 and all(m.window == window for m in saus)
    info = data.DataInfo("t", 4, False, True, 32, 64)
    E = ecgan.ECGANGenerator(ecgan.ECGANConfig(ngf=8, upsample="sau", sau_window=window), info)
    saus = [m for m in E.modules() if isinstance(m, gaugan.sau.SAU)]
    assert len(saus) == 4 and all(m.window == window for m in saus)
    with pytest.raises(ValueError, match="window='other'"):
        GauGANGenerator(tiny_cfg(upsample="sau", sau_window="other"), 5, 32, 64)
