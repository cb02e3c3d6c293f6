"""The switches of the README's "Departures from the papers" table: each reading the code offers besides its
default is computed independently here (closed forms, constant discriminators), so a switch that silently does
nothing, or does the wrong thing, fails."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import ecgan
import gaugan
import lggan

INFO = data.DataInfo(name="synthetic", num_classes=4, dontcare=False, has_instance=False, height=32, width=64)


def _batch(edges=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, 4, (2, 4, 8), generator=g).repeat_interleave(8, 1).repeat_interleave(8, 2)
    raw = {"image": torch.rand(2, 3, 32, 64, generator=g) * 2 - 1, "label": label}
    return data.prepare_batch(raw, INFO, "cpu", edges=edges)


class ConstD(nn.Module):
    """A discriminator whose every logit is c, on two scales, with one feature map per scale."""

    def __init__(self, c):
        super().__init__()
        self.c = nn.Parameter(torch.tensor(float(c)))

    def forward(self, x):
        logits = x[:, :1, :4, :4] * 0 + self.c
        return [[x[:, :1, :4, :4], logits], [x[:, :1, :2, :2], logits[..., :2, :2]]]


# ----------------------------------------------------------------------------- GAN loss: hinge (ours) vs log (papers)

def test_log_gan_terms_are_the_papers_cross_entropy():
    x = torch.tensor([[-2.0, 0.3], [1.5, 4.0]])
    preds = [[x.view(1, 1, 2, 2)]]
    sig = torch.sigmoid(x)
    assert gaugan.d_loss_term(preds, True, "log").item() == pytest.approx(-sig.log().mean().item(), rel=1e-6)
    assert gaugan.d_loss_term(preds, False, "log").item() == pytest.approx(-(1 - sig).log().mean().item(), rel=1e-6)
    assert gaugan.g_loss_term(preds, "log").item() == pytest.approx(-sig.log().mean().item(), rel=1e-6)
    # the hinge forms, for contrast
    assert gaugan.d_loss_term(preds, True, "hinge").item() == pytest.approx(F.relu(1 - x).mean().item())
    assert gaugan.d_loss_term(preds, False, "hinge").item() == pytest.approx(F.relu(1 + x).mean().item())
    assert gaugan.g_loss_term(preds, "hinge").item() == pytest.approx(-x.mean().item())
    with pytest.raises(ValueError, match="gan_loss"):
        gaugan.d_loss_term(preds, True, "wgan")


def test_misspelt_gan_loss_fails_when_the_model_is_built():
    """train.py's dry build then refuses the flag before a run folder is written (not at the first loss)."""
    for module, cfg in ((gaugan, gaugan.GauGANConfig(ngf=4, gan_loss="wgan")),
                        (lggan, lggan.LGGANConfig(ngf=2, n_res=1, gan_loss="wgan")),
                        (ecgan, ecgan.ECGANConfig(ngf=8, gan_loss="wgan", use_label_gen=False))):
        with pytest.raises(ValueError, match="gan_loss"):
            module.build(cfg, INFO)


@pytest.mark.parametrize("mode", ["hinge", "log"])
def test_gan_loss_switch_reaches_every_model_d_step(mode):
    """With every logit c, each D loss is a weighted count of real and fake terms; the weights are the
    papers' (LGGAN: one real term per judged output; ECGAN Eq. 9: real weight lambda + 1, plus Eq. 8's edges)."""
    c = 0.7
    real_t = math.log1p(math.exp(-c)) if mode == "log" else max(0.0, 1 - c)
    fake_t = math.log1p(math.exp(c)) if mode == "log" else max(0.0, 1 + c)
    torch.manual_seed(0)
    g_cfg = gaugan.GauGANConfig(ngf=4, ndf=4, gan_loss=mode)
    G, _ = gaugan.build(g_cfg, INFO)
    loss, _ = gaugan.d_step(G, ConstD(c), _batch(), g_cfg)
    assert loss.item() == pytest.approx(real_t + fake_t, rel=1e-5)

    l_cfg = lggan.LGGANConfig(ngf=2, ndf=4, n_res=1, gan_loss=mode)
    G, _ = lggan.build(l_cfg, INFO)
    loss, _ = lggan.d_step(G, ConstD(c), _batch(), l_cfg)
    assert loss.item() == pytest.approx(3 * (real_t + fake_t), rel=1e-5)  # fused, global, local

    e_cfg = ecgan.ECGANConfig(ngf=8, ndf=4, gan_loss=mode, use_label_gen=False, use_contrast=False)
    G, _ = ecgan.build(e_cfg, INFO)
    loss, _ = ecgan.d_step(G, ConstD(c), _batch(edges=True), e_cfg)
    w = 1 + 1 + e_cfg.lam  # (I_e', I_e), (I', I), lambda (I'', I)
    assert loss.item() == pytest.approx(w * (real_t + fake_t), rel=1e-5)


@pytest.mark.parametrize("mode", ["hinge", "log"])
def test_gan_loss_switch_reaches_every_model_g_step(mode):
    c = -0.4
    g_t = math.log1p(math.exp(-c)) if mode == "log" else -c
    torch.manual_seed(0)
    g_cfg = gaugan.GauGANConfig(ngf=4, ndf=4, gan_loss=mode)
    G, _ = gaugan.build(g_cfg, INFO)
    _, logs = gaugan.g_step(G, ConstD(c), _batch(), g_cfg)
    assert logs["G_gan"].item() == pytest.approx(g_t, rel=1e-5)
    l_cfg = lggan.LGGANConfig(ngf=2, ndf=4, n_res=1, gan_loss=mode)
    G, _ = lggan.build(l_cfg, INFO)
    _, logs = lggan.g_step(G, ConstD(c), _batch(), l_cfg)
    assert logs["G_gan"].item() == pytest.approx(3 * g_t, rel=1e-5)
    e_cfg = ecgan.ECGANConfig(ngf=8, ndf=4, gan_loss=mode, use_label_gen=False, use_contrast=False)
    G, _ = ecgan.build(e_cfg, INFO)
    _, logs = ecgan.g_step(G, ConstD(c), _batch(edges=True), e_cfg)
    assert logs["G_gan"].item() == pytest.approx((2 + e_cfg.lam) * e_cfg.lambda_c * g_t, rel=1e-5)


# ----------------------------------------------------------------------------- VGG input: ImageNet statistics vs raw

def test_vgg_input_norm_switch():
    torch.manual_seed(0)
    ours, raw = gaugan.VGG19Features("imagenet"), gaugan.VGG19Features("raw")
    raw.load_state_dict(ours.state_dict())
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    for a, b in zip(ours(x), raw(((x + 1) / 2 - mean) / std)):
        torch.testing.assert_close(a, b)
    for a, b in zip(raw(x), ours(x)):
        assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="input_norm"):
        gaugan.VGG19Features("caffe")


# ----------------------------------------------------------------------------- LGGAN: G_w's last block, B2-B4 fusion

def test_weight_map_norm_is_instance_norm_and_relu_before_softmax():
    torch.manual_seed(0)
    plain, normed = lggan.WeightMap(2, "nearest"), lggan.WeightMap(2, "nearest", norm=True)
    normed.load_state_dict(plain.state_dict())
    f4 = torch.randn(1, 8, 4, 4)
    logits = plain.conv(plain.up(f4))
    torch.testing.assert_close(plain(f4), logits.softmax(1))
    mu, var = logits.mean((2, 3), keepdim=True), logits.var((2, 3), unbiased=False, keepdim=True)
    torch.testing.assert_close(normed(f4), F.relu((logits - mu) / torch.sqrt(var + 1e-5)).softmax(1))


def test_unweighted_fusion_switch():
    torch.manual_seed(0)
    cfg = lggan.LGGANConfig(ngf=2, n_res=1, weight_map=False)
    G, _ = lggan.build(cfg, INFO)
    b = _batch()
    out = G(b["input"], b["onehot"])
    torch.testing.assert_close(out["fake"], 0.5 * (out["global"] + out["local"]))
    G.unweighted_fusion = "local"
    out = G(b["input"], b["onehot"])
    torch.testing.assert_close(out["fake"], out["local"])
    with pytest.raises(ValueError, match="unweighted_fusion"):
        lggan.build(lggan.LGGANConfig(ngf=2, n_res=1, unweighted_fusion="max"), INFO)


# ----------------------------------------------------------------------------- ECGAN: lambda_c on D, S' = G_l(I')

def test_ecgan_lambda_c_weighs_the_discriminator_side_too():
    torch.manual_seed(0)
    losses = []
    for lam_c in (1.0, 3.0):
        cfg = ecgan.ECGANConfig(ngf=8, ndf=4, lambda_c=lam_c, use_label_gen=False, use_contrast=False)
        torch.manual_seed(0)
        G, _ = ecgan.build(cfg, INFO)
        losses.append(ecgan.d_step(G, ConstD(0.3), _batch(edges=True), cfg)[0].item())
    assert losses[1] == pytest.approx(3 * losses[0], rel=1e-6)


class RecordingSegmenter(nn.Module):
    """Stands in for G_l: records the images it is shown, predicts a fixed distribution."""

    def __init__(self):
        super().__init__()
        self.seen = []
        self.w = nn.Parameter(torch.zeros(1), requires_grad=False)

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return torch.zeros(x.shape[0], INFO.label_nc, *x.shape[2:]) + self.w


@pytest.mark.parametrize("on", [True, False])
def test_sim_on_intermediate_chooses_which_images_g_l_segments(on):
    torch.manual_seed(0)
    cfg = ecgan.ECGANConfig(ngf=8, ndf=4, use_contrast=False, sim_on_intermediate=on)
    G, _ = ecgan.build(cfg, INFO)
    seg = RecordingSegmenter()
    G.label_generator = ecgan.LabelGenerator(seg)
    b = _batch(edges=True)
    out = G(b["input"], b["image"])
    shown = seg.seen[0]
    if on:  # S' = G_l(I') and S'' = G_l(I''), one forward on both
        torch.testing.assert_close(shown, torch.cat([out["intermediate"], out["fake"]]).float())
        assert "seg_2" in out
    else:
        torch.testing.assert_close(shown, out["fake"].float())
        assert "seg_1" in out and "seg_2" not in out
