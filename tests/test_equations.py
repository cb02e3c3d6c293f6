"""Every numbered equation of the two papers, computed independently of the code's version (closed forms,
hand-built inputs, hand loops, stub discriminators) so that the WIRING is pinned, not only the operators:
which tensor is weighted by what, which pair a loss sees, which nonlinearity follows which layer.

ECGAN (ICLR 2023): Eq. 1 and the feature-level G_t, Eq. 2 / G_s, Eq. 3 (default settings), Eqs. 4-5,
Eqs. 8-9 (D side, lambda + 1 on the real image, hinge form), Eq. 10 (every weight, every pair; VGG through a
fake feature extractor), Canny ground-truth edges.
LGGAN / LGGAN++ (TPAMI 2022): SAU (SAKG softmax over k^2, SAFU Eq. 1) on a 2x2 input, Eqs. 2-8 of the local
and weight-map generators, Eq. 9 (D_s) and Eq. 10 (D_s + D_i, L1 x100, TV) with stub discriminators.
GauGAN's SPADE; the evaluation metrics (mIoU / accuracy, FID, SSIM, PSNR).
Where another test file already pins an operator (e.g. test_ecgan's Eq. 2 hand set), this file pins where
the model calls it.
"""
import dataclasses
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import ecgan
import fid
import gaugan
import lggan
import metrics
import sau

H, W = 32, 64


def blocky_labels(B, classes, seed=0, block=8):
    """(B, H, W) labels of 8x8 cells drawn from `classes`, each class at least once in sample 0."""
    g = torch.Generator().manual_seed(seed)
    cells = torch.randint(0, len(classes), (B, H // block, W // block), generator=g)
    cells[0, 0, :len(classes)] = torch.arange(len(classes))
    return torch.tensor(classes)[cells].repeat_interleave(block, 1).repeat_interleave(block, 2)


def has_field(cfg_cls, name):
    return name in {f.name for f in dataclasses.fields(cfg_cls)}


# "hinge" (GauGAN's form of the log terms) and, where the code offers it, "log" (Eqs. 8, 9 / Eq. 9 as written)
GAN_MODES = ["hinge"] + (["log"] if has_field(ecgan.ECGANConfig, "gan_loss") else [])
LGGAN_GAN_MODES = ["hinge"] + (["log"] if has_field(lggan.LGGANConfig, "gan_loss") else [])
softplus = lambda t: torch.log1p(torch.exp(t))  # -log sigmoid(x) = softplus(-x), -log(1 - sigmoid(x)) = softplus(x)


def g_adv(preds, mode="hinge"):
    """G's adversarial term averaged over scales: hinge -E[D(fake)]; log the non-saturating -E[log sigmoid D]."""
    return sum(-p.mean() if mode == "hinge" else softplus(-p).mean() for p in preds) / len(preds)


def d_adv(preds, real, mode="hinge"):
    """One side of D's loss averaged over scales: hinge relu(1 -+ D); log -log sigmoid(D) / -log(1 - sigmoid(D))."""
    sign = -1.0 if real else 1.0
    return sum((F.relu(1 + sign * p) if mode == "hinge" else softplus(sign * p)).mean() for p in preds) / len(preds)


# ============================================================================= ECGAN

def ecgan_setup(seed=0, **kw):
    info = data.DataInfo(name="tiny", num_classes=3, dontcare=False, has_instance=True, height=H, width=W)
    base = dict(ngf=8, ndf=8, spade_hidden=8, proj_dim=8, max_anchors=32, max_per_class=8, sim_chunk=64,
                use_label_gen=False, use_contrast=False)
    cfg = ecgan.ECGANConfig(**{**base, **kw})
    torch.manual_seed(seed)
    G, D = ecgan.build(cfg, info)
    G.eval()  # spectral norm: no power iteration, so repeated forwards give the same outputs
    label = blocky_labels(2, (0, 1, 2), seed)
    g = torch.Generator().manual_seed(seed + 1)
    raw = {"image": torch.rand(2, 3, H, W, generator=g) * 2 - 1, "label": label, "instance": label.clone()}
    return cfg, info, G, D, data.prepare_batch(raw, info, "cpu", edges=True)


def test_ecgan_eq1_and_feature_level_transfer():
    """F_i^j = sigmoid(F_e^j) * F_i^j + F_i^j after every layer j, then Eq. 1 I' = sigmoid(I_e') * I_i' + I_i'."""
    cfg, info, G, _, batch = ecgan_setup()
    seg = batch["input"]
    with torch.no_grad():
        out = G(seg, aux=False)
        feat = G.encoder.trunk(G.encoder.head(seg), seg)  # F = E(S)
        xi = xe = feat
        for conv_i, conv_e in zip(G.image_branch.convs, G.edge_branch.convs):
            xi, xe = conv_i(F.leaky_relu(xi, 0.2)), conv_e(F.leaky_relu(xe, 0.2))
            xi = xi + xi * (1 / (1 + torch.exp(-xe)))
        img_i = torch.tanh(G.image_branch.out(F.leaky_relu(xi, 0.2)))  # I_i'
        edge = torch.tanh(G.edge_branch.out(F.leaky_relu(xe, 0.2)))  # I_e'
    assert len(G.image_branch.convs) == cfg.n_layers == 3  # n = 3 (App. B)
    torch.testing.assert_close(out["edge"], edge)
    torch.testing.assert_close(out["intermediate"], img_i + img_i / (1 + torch.exp(-edge)))


def test_ecgan_eq2_semantic_preserving_module():
    """G_s: its input is concat(F, I', I_e', S) (any order); F_c = conv(.) with N channels, Eq. 2
    F_c' = F_c * sigmoid(AvgPool(F_c)) + F_c, F' = conv(F_c') with C + N + 3 + 3 channels, I'' = tanh(conv(.))."""
    cfg, info, G, _, batch = ecgan_setup()
    seg = batch["input"]
    seen = {}
    G.semantic.register_forward_hook(lambda m, args, res: seen.update(x=args[0]))
    with torch.no_grad():
        out = G(seg, aux=False)
        feat = G.encoder.trunk(G.encoder.head(seg), seg)
    x = seen["x"]
    pieces = {"F": feat, "I'": out["intermediate"], "I_e'": out["edge"], "S": seg}
    assert x.shape[1] == sum(p.shape[1] for p in pieces.values())
    for name, p in pieces.items():  # each piece is one contiguous block of G_s's input
        c = p.shape[1]
        assert any(torch.equal(x[:, o:o + c], p) for o in range(x.shape[1] - c + 1)), name
    sp = G.semantic
    with torch.no_grad():
        fc = sp.to_classes(x)
        assert fc.shape[1] == info.label_nc  # one channel per class
        gamma = torch.sigmoid(fc.mean((2, 3), keepdim=True))  # gamma' = Sigmoid(AvgPool(F_c))
        f_prime = sp.expand(fc * gamma + fc)  # Eq. 2, then F'
        assert f_prime.shape[1] == cfg.ngf + info.input_nc + 3 + 3  # F' has the size of the input
        want = torch.tanh(sp.out(F.leaky_relu(f_prime, 0.2)))
    torch.testing.assert_close(out["fake"], want)


class LinearD(nn.Module):
    """A stand-in multiscale D: scale s returns features (s + 1) * image and prediction (s + 1) * a * mean_c(image);
    it records every input so the test can check what D was conditioned on."""

    def __init__(self, cond_nc, a=3.0, scales=2):
        super().__init__()
        self.cond_nc, self.a, self.scales, self.seen = cond_nc, a, scales, []

    def pred(self, img):
        return [(s + 1) * self.a * img.mean(1, keepdim=True) for s in range(self.scales)]

    def forward(self, x):
        self.seen.append(x.detach())
        img = x[:, self.cond_nc:]
        return [[(s + 1) * img, p] for s, p in enumerate(self.pred(img))]


class FakeVGG(nn.Module):
    """Five 'layers' k * x: the GauGAN VGG loss is then sum_k w_k * k * L1(fake, real)."""

    def forward(self, x):
        return [x * (k + 1) for k in range(5)]


VGG_WEIGHTS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0)  # relu1_1 .. relu5_1 (GauGAN / pix2pixHD)


def fm_linear(fake, real, scales=2):
    """Feature matching through LinearD: mean over scales of L1((s+1) fake, (s+1) real)."""
    return sum((s + 1) * (fake - real).abs().mean() for s in range(scales)) / scales


@pytest.mark.parametrize("mode", GAN_MODES)
def test_ecgan_eq10_generator_side_adversarial_feature_matching_and_vgg(mode):
    """Eq. 10, G side: lambda_c (adv(I_e') + adv(I') + lambda adv(I'')), lambda_f (L_f(I_e, I_e') + L_f(I, I')
    + lambda L_f(I, I'')), lambda_p (same pairs for VGG); D is conditioned on S; real edges are Canny in [-1, 1]."""
    kw = {"gan_loss": mode} if mode != "hinge" else {}
    cfg, info, G, _, batch = ecgan_setup(lam=3.0, lambda_c=1.5, lambda_f=7.0, lambda_p=5.0, **kw)
    D = LinearD(info.input_nc)
    with torch.no_grad():
        out = G(batch["input"], aux=False)
        loss, logs = ecgan.g_step(G, D, batch, cfg, vgg=FakeVGG())
    real, real_edge = batch["image"], (batch["edge"] * 2 - 1).expand(-1, 3, -1, -1)
    pairs = [(out["edge"], real_edge, 1.0), (out["intermediate"], real, 1.0), (out["fake"], real, cfg.lam)]
    gan = sum(w * g_adv(D.pred(f), mode) for f, _, w in pairs)
    feat = sum(w * fm_linear(f, r) for f, r, w in pairs)
    vgg = sum(w * sum(wk * (k + 1) for k, wk in enumerate(VGG_WEIGHTS)) * (f - r).abs().mean() for f, r, w in pairs)
    torch.testing.assert_close(logs["G_gan"], cfg.lambda_c * gan)
    torch.testing.assert_close(logs["G_feat"], cfg.lambda_f * feat)
    torch.testing.assert_close(logs["G_vgg"], cfg.lambda_p * vgg)
    assert set(logs) == {"G_gan", "G_feat", "G_vgg"}
    torch.testing.assert_close(loss, logs["G_gan"] + logs["G_feat"] + logs["G_vgg"])
    for x in D.seen:  # every D input is (S, image)
        n = x.shape[0] // batch["input"].shape[0]
        torch.testing.assert_close(x[:, :info.input_nc], batch["input"].repeat(n, 1, 1, 1))
    assert batch["edge"].sum() > 0


@pytest.mark.parametrize("mode", GAN_MODES)
def test_ecgan_eqs8_9_discriminator_side_with_lambda_plus_one_on_the_real_image(mode):
    """Eq. 8 (edges: real I_e, fake I_e') + Eq. 9 ((lambda + 1) real I, fake I', lambda fake I''), each log term
    in hinge form relu(1 - D(real)), relu(1 + D(fake)) (or as written, -log D, -log(1 - D)); D sees S and the
    image. LinearD's predictions reach +-3, so the relu clips some pixels and not others."""
    cfg, info, G, _, batch = ecgan_setup(lam=3.0, **({"gan_loss": mode} if mode != "hinge" else {}))
    D = LinearD(info.input_nc)
    with torch.no_grad():
        out = G(batch["input"], aux=False)
        _, logs = ecgan.d_step(G, D, batch, cfg)
    real, real_edge = batch["image"], (batch["edge"] * 2 - 1).expand(-1, 3, -1, -1)
    fake = sum(w * d_adv(D.pred(f), False, mode)
               for f, w in ((out["edge"], 1.0), (out["intermediate"], 1.0), (out["fake"], cfg.lam)))
    real_term = sum(w * d_adv(D.pred(r), True, mode) for r, w in ((real_edge, 1.0), (real, 1.0 + cfg.lam)))
    torch.testing.assert_close(logs["D_fake"], fake)
    torch.testing.assert_close(logs["D_real"], real_term)
    clipped = torch.cat([p.flatten() for p in D.pred(real)])
    assert (clipped > 1).any() and (clipped < 1).any()  # the hinge is active somewhere and clipped elsewhere
    for x in D.seen:
        n = x.shape[0] // batch["input"].shape[0]
        torch.testing.assert_close(x[:, :info.input_nc], batch["input"].repeat(n, 1, 1, 1))


def test_ecgan_eq10_similarity_contrastive_and_class_l1_weights(monkeypatch):
    """lambda_s (L_sim(S, S') + L_sim(S, S'')) with S' = G_l(I'), S'' = G_l(I'') at 1/sim_stride (area-pooled
    probabilities); lambda_l * Eq. 5; lambda_l1 * Eq. 6. The losses themselves are replaced by tagged constants
    (they are tested on their own): this pins which tensors reach them and their weights."""
    cfg, info, G, _, batch = ecgan_setup(use_label_gen=True, use_contrast=True, lambda_s=2.0, lambda_l=3.0,
                                         lambda_l1=5.0)
    sims, contrasts = [], []

    def fake_sim(pred, target, *a, **k):
        sims.append((pred.detach(), target.detach()))
        return pred.sum() * 0 + 10.0 ** (len(sims) - 1)  # 1 for the first call, 10 for the second

    def fake_contrast(emb, labels, *a, **k):
        contrasts.append((emb, labels))
        return emb.sum() * 0 + 7.0

    monkeypatch.setattr(ecgan, "similarity_loss", fake_sim)
    monkeypatch.setattr(ecgan, "pixel_contrastive_loss", fake_contrast)
    monkeypatch.setattr(lggan, "masked_l1", lambda *a, **k: torch.tensor(11.0))
    _, logs = ecgan.g_step(G, LinearD(info.input_nc), batch, cfg)
    assert logs["G_sim"].item() == pytest.approx(cfg.lambda_s * 11.0)
    assert logs["G_contrast"].item() == pytest.approx(cfg.lambda_l * 7.0)
    assert logs["G_l1"].item() == pytest.approx(cfg.lambda_l1 * 11.0)
    with torch.no_grad():
        out = G(batch["input"], aux=False)
        size = (H // cfg.sim_stride, W // cfg.sim_stride)
        for (pred, target), img in zip(sims, (out["intermediate"], out["fake"])):
            torch.testing.assert_close(pred, F.adaptive_avg_pool2d(G.label_generator(img), size))
            assert set(target.unique().tolist()) <= {0.0, 1.0} and target.shape[-2:] == size
    emb, labels = contrasts[0]
    assert emb.shape[1] == cfg.proj_dim and len(labels) == len(emb) > 0


def test_ecgan_eq3_similarity_default_settings_by_hand():
    """Eq. 3 through the default call on a fully labelled 2x2 case: per image the mean over the M^2 pairs of
    BCE(A, A''), A = S^T S, A'' = S''^T S''; then the batch mean."""
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64).softmax(1)
    lab = torch.tensor([[[0, 1], [1, 2]], [[2, 2], [0, 2]]])
    target = F.one_hot(lab, 3).permute(0, 3, 1, 2).double()
    per_image = []
    for b in range(2):
        S, P = target[b].reshape(3, 4), pred[b].reshape(3, 4)
        terms = []
        for i in range(4):
            for j in range(4):
                a = 1.0 if lab[b].flatten()[i] == lab[b].flatten()[j] else 0.0
                q = float(P[:, i] @ P[:, j])
                terms.append(-(a * math.log(q) + (1 - a) * math.log(1 - q)))
        per_image.append(sum(terms) / 16)
    assert ecgan.similarity_loss(pred, target).item() == pytest.approx(sum(per_image) / 2, rel=1e-9)


def test_ecgan_eqs4_5_contrastive_normalises_embeddings_three_points():
    """Eq. 5 on 3 pixels (two of class 0, one of class 1) with embeddings of very different norms: every dot
    product is taken between L2-normalised embeddings (the note under Eq. 4); the class-1 pixel has no positive
    and is no anchor."""
    emb = torch.tensor([[3.0, 0.0], [0.6, 0.8], [0.0, -0.25]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])
    t = 0.5
    u = [e / math.sqrt(float(e @ e)) for e in emb]
    s = lambda i, j: float(u[i] @ u[j]) / t
    term = lambda i, p, n: -math.log(math.exp(s(i, p)) / (math.exp(s(i, p)) + math.exp(s(i, n))))
    expected = (term(0, 1, 2) + term(1, 0, 2)) / 2
    for impl in ("naive", "vectorized"):
        got = ecgan.pixel_contrastive_loss(emb, labels, t, impl)
        assert got.item() == pytest.approx(expected, rel=1e-9), impl
        # scaling one embedding changes nothing
        got2 = ecgan.pixel_contrastive_loss(emb * torch.tensor([[5.0], [0.1], [2.0]], dtype=torch.float64),
                                            labels, t, impl)
        assert got2.item() == pytest.approx(expected, rel=1e-9), impl


# ----------------------------------------------------------------------------- Canny (ECGAN App. B)

def my_smoothed_magnitude(gray):
    """Reference gradient magnitude: /159 5x5 Gaussian then Sobel, replicate padding. gray (H, W) float64."""
    k = torch.tensor([[2, 4, 5, 4, 2], [4, 9, 12, 9, 4], [5, 12, 15, 12, 5], [4, 9, 12, 9, 4], [2, 4, 5, 4, 2]],
                     dtype=torch.float64) / 159
    sob = torch.tensor([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=torch.float64)
    x = F.pad(gray[None, None], (2, 2, 2, 2), mode="replicate")
    g = F.pad(F.conv2d(x, k[None, None]), (1, 1, 1, 1), mode="replicate")
    gx, gy = F.conv2d(g, sob[None, None]), F.conv2d(g, sob.t()[None, None])
    return (gx ** 2 + gy ** 2).sqrt()[0, 0]


def test_canny_thresholds_are_0075_and_0175_of_the_max_magnitude():
    """Vertical step edges 12 px apart (the 5x5 Gaussian + Sobel reach 3 px), constant along y: each edge's
    magnitude is its step height times one constant, so its ratio to the largest step (1) is the height ratio.
    Isolated steps of 0.185 (> 0.175: kept) and 0.165 (between: dropped, nothing strong to grow from) pin the
    high threshold; a step whose height ramps down along y from 0.4 (strong) to 0 is one 8-connected edge that
    hysteresis follows exactly down to the rows whose magnitude is 0.075 of the maximum (checked against a
    reference magnitude computed here: /159 Gaussian, Sobel), which pins the low threshold. A thin line pins
    the smoothing."""
    Hc, Wc = 64, 96
    steps = [(12, 1.0), (24, 0.185), (36, 0.165)]  # (column where the step starts, height)
    col = torch.zeros(Wc, dtype=torch.float64)
    for c, h in steps:
        col[c:] += h
    gray = col.expand(Hc, Wc).clone()
    # piecewise linear along y: 0.4 (strong) -> 0.1, then slowly (0.00125 per row) through 0.075 down to 0.05
    knots = [(0, 0.4), (8, 0.4), (16, 0.1), (56, 0.05), (60, 0.0), (Hc - 1, 0.0)]
    ramp = torch.zeros(Hc, dtype=torch.float64)
    for (y0, h0), (y1, h1) in zip(knots[:-1], knots[1:]):
        ys = torch.arange(y0, y1 + 1, dtype=torch.float64)
        ramp[y0:y1 + 1] = h0 + (h1 - h0) * (ys - y0) / (y1 - y0)
    gray[:, 72:] += ramp[:, None]
    # a 1 px line: the Gaussian spreads it, so its magnitude per unit height (c) is below a step's; at height
    # 0.165 / c it sits between the thresholds and, isolated, is dropped (unsmoothed, its ratio would be 0.165 / c)
    unit = lambda img: my_smoothed_magnitude(img).max()
    line, step = torch.zeros(Hc, Wc, dtype=torch.float64), torch.zeros(Hc, Wc, dtype=torch.float64)
    line[:, 48], step[:, 48:] = 1, 1
    c = float(unit(line) / unit(step))
    assert c < 0.5
    gray[:, 48] += 0.165 / c
    ref = my_smoothed_magnitude(gray)
    top = ref.max()
    for c, h in steps:
        assert float(ref[Hc // 2, c - 1:c + 1].max() / top) == pytest.approx(h, rel=1e-6)  # ratio = height ratio
    ratio = ref[:, 66:78].amax(1) / top  # the ramped edge, per row
    image = (gray * 2 - 1).float().expand(1, 3, Hc, Wc)  # equal RGB: the code's gray is this gray
    e = data.canny(image)[0, 0]
    near = lambda c: e[:, c - 2:c + 2].amax(1) > 0  # an edge pixel within 2 px of column c, per row
    assert near(12)[4:-4].all() and near(24)[4:-4].all()  # 1.0, 0.185
    assert float(ref[:, 44:53].max() / top) == pytest.approx(0.165, rel=1e-6)
    assert not near(36).any() and not near(48).any() and not near(50).any()  # 0.165 step and line, isolated
    strong, weak, below = ratio > 0.175, (ratio > 0.075 * 1.015) & (ratio < 0.175), ratio < 0.075 * 0.985
    assert strong.sum() > 5 and weak.sum() > 10 and below.sum() > 10
    ramp_edge = near(72)
    assert ramp_edge[strong | weak].all()
    assert not ramp_edge[below].any()


# ============================================================================= SAU (LGGAN++ Sec. 3.2)

def test_sau_sakg_softmax_over_k2_and_safu_weighted_sum_hand_loop():
    """SAKG: f_k = conv(compress(f)) with k^2 s^2 channels, feature shuffle to (k^2, sH, sW), softmax over the
    k^2 taps; SAFU (Eq. 1, default window = the nearest-expanded map): f'(l') = sum_{p,q} f_e(l' + (p, q)) *
    f_n(p, q)(l'), zero outside. By hand on a 2x2 input."""
    torch.manual_seed(0)
    C, k, s = 2, 5, 2
    up = sau.SAU(C, scale=s, k=k).double()
    x = torch.randn(1, C, 2, 2, dtype=torch.float64)
    with torch.no_grad():
        y = up(x)
        kern = up.kernels(x)
        fk = up.encoder(up.compress(x))[0]  # (k^2 s^2, 2, 2)
    assert fk.shape[0] == k * k * s * s
    r = k // 2
    for i2 in range(2 * s):
        for j2 in range(2 * s):
            i, j = i2 // s, j2 // s
            a, b = i2 % s, j2 % s
            logits = [float(fk[t * s * s + a * s + b, i, j]) for t in range(k * k)]  # feature shuffle
            z = sum(math.exp(v) for v in logits)
            fn = [math.exp(v) / z for v in logits]  # softmax over the k^2 taps
            for t in range(k * k):
                assert float(kern[0, t, i2, j2]) == pytest.approx(fn[t], rel=1e-9, abs=1e-12)
            for c in range(C):
                acc = 0.0
                for p in range(-r, r + 1):
                    for q in range(-r, r + 1):
                        yy, xx = i2 + p, j2 + q
                        if 0 <= yy < 2 * s and 0 <= xx < 2 * s:
                            acc += float(x[0, c, yy // s, xx // s]) * fn[(p + r) * k + (q + r)]
                assert float(y[0, c, i2, j2]) == pytest.approx(acc, rel=1e-9, abs=1e-12)


# ============================================================================= GauGAN SPADE

def test_spade_with_real_3x3_convs():
    """out = norm(x) * (1 + gamma) + beta, gamma = conv3x3(h), beta = conv3x3(h), h = ReLU(conv3x3(seg)) on the
    label map resized (nearest) to x; the norm is parameter-free instance norm."""
    torch.manual_seed(0)
    spade = gaugan.SPADE(3, 2, hidden=4).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64) * 2 + 1
    seg = F.one_hot(torch.randint(0, 2, (2, 4, 4)), 2).permute(0, 3, 1, 2).double()
    seg_up = seg.repeat_interleave(2, 2).repeat_interleave(2, 3)
    conv = lambda m, t: F.conv2d(t, m.weight, m.bias, padding=1)
    h = F.relu(conv(spade.shared[0], seg_up))
    normed = (x - x.mean((2, 3), keepdim=True)) / (x.var((2, 3), unbiased=False, keepdim=True) + 1e-5).sqrt()
    want = normed * (1 + conv(spade.gamma, h)) + conv(spade.beta, h)
    torch.testing.assert_close(spade(x, seg), want)


# ============================================================================= LGGAN semantic synthesis

def lggan_setup(seed=0, **kw):
    info = data.DataInfo("t", 4, False, True, H, W)
    cfg = lggan.Config(**{**dict(ngf=4, ndf=4, n_res=1, spade_hidden=8), **kw})
    torch.manual_seed(seed)
    G, D = lggan.build(cfg, info)
    label = blocky_labels(2, (0, 1, 3), seed)  # class 2 absent: its branch must contribute nothing
    g = torch.Generator().manual_seed(seed + 1)
    raw = {"image": torch.rand(2, 3, H, W, generator=g) * 2 - 1, "label": label,
           "instance": torch.zeros_like(label)}
    return cfg, info, G, D, data.prepare_batch(raw, info, "cpu")


def class_images_by_hand(feat, masks, weight, bias):
    """Eq. 2 F_c = M_c * f', then class c's conv (7x7, reflect padding) and tanh, masked: (B, N, 3, H, W)."""
    outs = []
    for c in range(masks.shape[1]):
        m = masks[:, c:c + 1]
        y = F.conv2d(F.pad(feat * m, (3, 3, 3, 3), mode="reflect"), weight[c], bias[c])
        outs.append(torch.tanh(y) * m)
    return torch.stack(outs, 1)


@pytest.mark.parametrize("pool", getattr(lggan, "POOLS", [None]))
@pytest.mark.parametrize("conv_fusion", [True, False])
def test_lggan_local_generator_eqs_2_4_5_6(conv_fusion, pool):
    """G_l: f' = up(res(f4)); Eq. 2 masking and per-class generation; Eq. 5 tanh(conv(concat over ALL N
    classes)) or Eq. 4 sum; Eq. 6 CE of classifier(GAP(F_c)) against c over the (sample, class) pairs with
    H_c = 1."""
    torch.manual_seed(0)
    N, C = 4, 3
    local = lggan.LocalGenerator(N, C, n_res=1, upsample="nearest", conv_fusion=conv_fusion, cls_loss=True,
                                 impl="pixel", **({"cls_pool": pool} if pool else {})).double()
    with torch.no_grad():
        local.classes.weight.normal_(0, 0.2), local.classes.bias.normal_()
    f4 = torch.randn(2, 4 * C, H // 4, W // 4, dtype=torch.float64)
    lab = blocky_labels(2, (0, 1, 3))
    lab[1][lab[1] == 3] = 0  # class 3 only in sample 0; class 2 nowhere
    masks = F.one_hot(lab, N).permute(0, 3, 1, 2).double()
    with torch.no_grad():
        out = local(f4, masks)
        feat = local.up(local.res(f4))
        imgs = class_images_by_hand(feat, masks, local.classes.weight, local.classes.bias)
        if conv_fusion:
            want = torch.tanh(F.conv2d(imgs.flatten(1, 2), local.fuse.weight, local.fuse.bias, padding=1))
        else:
            want = imgs.sum(1)
        torch.testing.assert_close(out["local"], want)
        torch.testing.assert_close(out["class_images"], imgs[:, out["class_idx"]])
        # semantic-guided average pooling: the mean of F_c over its class's pixels (cls_pool="class") or over the
        # whole image (cls_pool="image", the public code)
        pool = getattr(local.classes, "pool", "image")
        terms = []
        for b, present in ((0, (0, 1, 3)), (1, (0, 1))):
            for c in present:
                area = masks[b, c].sum() if pool == "class" else H * W
                pooled = (feat[b] * masks[b, c]).sum((1, 2)) / area
                terms.append(-torch.log_softmax(local.classifier(pooled), 0)[c])
        torch.testing.assert_close(out["cls_loss"], torch.stack(terms).mean())


def test_lggan_eq7_weight_map_is_a_channel_softmax():
    torch.manual_seed(0)
    wm = lggan.WeightMap(4, "nearest").double()
    f4 = torch.randn(2, 16, 8, 16, dtype=torch.float64)
    with torch.no_grad():
        logits = wm.conv(wm.up(f4))
        e = logits.exp()
        torch.testing.assert_close(wm(f4), e / e.sum(1, keepdim=True))


def test_lggan_eq8_fusion_weights_global_by_w_g_and_local_by_w_l():
    """I^C = I^G * W_g + I^L * W_l with W_g the weight map's channel 0 (shown as w_global by sample()), on a weight
    map made clearly asymmetric; the global result is the GauGAN trunk on E's H/16 feature; B2-B4 use 1/2, 1/2."""
    cfg, info, G, _, batch = lggan_setup()
    G.eval()
    with torch.no_grad():
        G.weight_map.conv.bias.copy_(torch.tensor([1.5, -1.0]))
        out = G(batch["input"], batch["onehot"])
        f4, f16 = G.encoder(batch["input"])
        gg = G.global_gen
        glob = gg.to_rgb(gg.trunk(F.interpolate(f16, size=(gg.sh, gg.sw), mode="nearest"), batch["input"]))
        w = G.weight_map(f4)
        cols = lggan.sample(G, batch)
    assert (w[:, 0] - w[:, 1]).abs().min() > 0.5
    torch.testing.assert_close(out["global"], glob)
    torch.testing.assert_close(out["weights"], w)
    torch.testing.assert_close(out["fake"], glob * w[:, :1] + out["local"] * w[:, 1:])
    torch.testing.assert_close(cols["w_global"], 2 * w[:, :1] - 1)
    _, _, G2, _, batch2 = lggan_setup(weight_map=False)
    with torch.no_grad():
        out2 = G2(batch2["input"], batch2["onehot"])
    torch.testing.assert_close(out2["fake"], (out2["global"] + out2["local"]) / 2)


@pytest.mark.parametrize("mode", LGGAN_GAN_MODES)
def test_lggan_eq9_and_losses_semantic_with_a_stub_discriminator(mode):
    """G side: hinge adversarial + lambda_feat FM + lambda_vgg VGG on each of (I^C, I^G, I^L), lambda_cls Eq. 6,
    lambda_local_l1 Eq. 3 = sum_c mean|I * M_c - I_c|. D side (Eq. 9, hinge form, one D loss per output as the
    public code): n * relu(1 - D(S, I)) + sum_outputs relu(1 + D(S, I_out)) (or the log form as written). D is
    conditioned on S."""
    kw = {"gan_loss": mode} if mode != "hinge" else {}
    cfg, info, G, _, batch = lggan_setup(lambda_feat=7.0, lambda_vgg=5.0, lambda_cls=3.0, lambda_local_l1=2.0, **kw)
    G.eval()
    D = LinearD(info.input_nc)
    with torch.no_grad():
        out = G(batch["input"], batch["onehot"])
        _, logs = lggan.g_step(G, D, batch, cfg, vgg=FakeVGG())
        _, dlogs = lggan.d_step(G, D, batch, cfg)
    real = batch["image"]
    fakes = [out["fake"], out["global"], out["local"]]
    vgg_w = sum(wk * (k + 1) for k, wk in enumerate(VGG_WEIGHTS))
    torch.testing.assert_close(logs["G_gan"], sum(g_adv(D.pred(f), mode) for f in fakes))
    torch.testing.assert_close(logs["G_feat"], cfg.lambda_feat * sum(fm_linear(f, real) for f in fakes))
    torch.testing.assert_close(logs["G_vgg"], cfg.lambda_vgg * sum(vgg_w * (f - real).abs().mean() for f in fakes))
    torch.testing.assert_close(logs["G_cls"], cfg.lambda_cls * out["cls_loss"])
    l1 = sum((real * batch["onehot"][:, c:c + 1] - out["class_images"][:, j]).abs().mean()
             for j, c in enumerate(out["class_idx"].tolist()))
    torch.testing.assert_close(logs["G_l1_local"], cfg.lambda_local_l1 * l1)
    torch.testing.assert_close(dlogs["D_real"], 3 * d_adv(D.pred(real), True, mode))
    torch.testing.assert_close(dlogs["D_fake"], sum(d_adv(D.pred(f), False, mode) for f in fakes))
    for x in D.seen:
        n = x.shape[0] // 2
        torch.testing.assert_close(x[:, :info.input_nc], batch["input"].repeat(n, 1, 1, 1))


# ============================================================================= LGGAN cross-view (Eq. 10)

class StubPatch(nn.Module):
    """Stands in for one PatchGAN: logits = a * mean_c(image part) + b * mean_c(condition part) per pixel."""

    def __init__(self, a, b):
        super().__init__()
        self.a, self.b, self.seen = a, b, []

    def forward(self, x):
        self.seen.append(x.detach())
        return self.logits(x[:, :3], x[:, 3:])

    def logits(self, cond, img):
        return self.a * img.mean(1, keepdim=True) + self.b * cond.mean(1, keepdim=True)


def test_lggan_eq10_crossview_dual_discriminator_l1_tv():
    """G side: sum over (I^C, I^G, I^L) of -log D_s(S_g, .) - log D_i(I_a, .) (non-saturating), L1 x100 on the
    three outputs, masked L1 x100 (Eq. 3), TV x1e-6 on I^C. D side: pix2pix's 0.5 (real + fake) per D and output.
    D_s sees the target semantic map S_g, D_i the input view I_a."""
    info = data.DataInfo("cv", 6, False, False, H, W, "crossview")
    cfg = lggan.Config.for_task("crossview", ngf=4, ndf=4, n_res=1)
    assert (cfg.lambda_l1, cfg.lambda_local_l1, cfg.lambda_tv) == (100.0, 100.0, 1e-6)
    torch.manual_seed(0)
    G, D = lggan.build(cfg, info)
    G.eval()
    D.D_s, D.D_i = StubPatch(2.0, 0.5), StubPatch(-1.5, 1.0)
    label = blocky_labels(2, (0, 2, 5))
    g = torch.Generator().manual_seed(2)
    raw = {k: torch.rand(2, 3, H, W, generator=g) * 2 - 1 for k in ("image_a", "image", "seg_a", "seg")}
    raw.update(label=label, label_a=label.flip(2))
    batch = data.prepare_batch(raw, info, "cpu")
    with torch.no_grad():
        out = G(batch["input"], batch["onehot"])
        _, logs = lggan.g_step(G, D, batch, cfg)
        _, dlogs = lggan.d_step(G, D, batch, cfg)
    real, seg, img_a = batch["image"], batch["seg"], batch["image_a"]
    fakes = [out["fake"], out["global"], out["local"]]
    sp = softplus
    Ds, Di = D.D_s.logits, D.D_i.logits
    gan = sum(sp(-Ds(seg, f)).mean() + sp(-Di(img_a, f)).mean() for f in fakes)
    torch.testing.assert_close(logs["G_gan"], gan)
    torch.testing.assert_close(logs["G_l1"], 100 * sum((f - real).abs().mean() for f in fakes))
    x = out["fake"]
    tv = sum(float((x[b, c, i + 1, j] - x[b, c, i, j]).abs()) for b in range(2) for c in range(3)
             for i in range(H - 1) for j in range(0, W, 9))  # sampled columns: a full loop is slow
    tv_cols = (x[:, :, 1:, ::9] - x[:, :, :-1, ::9]).abs().sum()
    assert float(tv_cols) == pytest.approx(tv, rel=1e-5)  # the vectorised TV below is the loop's sum
    tv_full = ((x[:, :, 1:] - x[:, :, :-1]).abs().sum() + (x[..., 1:] - x[..., :-1]).abs().sum()) / 2
    torch.testing.assert_close(logs["G_tv"], 1e-6 * tv_full)
    l1 = sum((real * batch["onehot"][:, c:c + 1] - out["class_images"][:, j]).abs().mean()
             for j, c in enumerate(out["class_idx"].tolist()))
    torch.testing.assert_close(logs["G_l1_local"], 100 * l1)
    d_real = 3 * 0.5 * (sp(-Ds(seg, real)).mean() + sp(-Di(img_a, real)).mean())
    d_fake = sum(0.5 * (sp(Ds(seg, f)).mean() + sp(Di(img_a, f)).mean()) for f in fakes)
    torch.testing.assert_close(dlogs["D_real"], d_real)
    torch.testing.assert_close(dlogs["D_fake"], d_fake)
    for stub, cond in ((D.D_s, seg), (D.D_i, img_a)):
        for x in stub.seen:
            n = x.shape[0] // 2
            torch.testing.assert_close(x[:, :3], cond.repeat(n, 1, 1, 1))
    # Eq. 8 in the cross-view generator: channel 0 of the softmax weighs the global image
    w = out["weights"]
    torch.testing.assert_close(out["fake"], out["global"] * w[:, :1] + out["local"] * w[:, 1:])


def test_tv_loss_by_hand():
    x = torch.tensor([[[[0.0, 1.0, 3.0], [2.0, 2.0, -1.0]]]]).repeat(2, 1, 1, 1)
    x[1] *= 2
    # image 0: horizontal |1| + |2| + |0| + |3| = 6, vertical |2| + |1| + |4| = 7 -> 13; image 1: 26
    assert lggan.tv_loss(x).item() == pytest.approx((13 + 26) / 2)


# ============================================================================= evaluation metrics

def test_ssim_of_two_different_images_by_hand():
    """SSIM with an 11x11 Gaussian window (sigma 1.5), C1 = (0.01 L)^2, C2 = (0.03 L)^2, valid positions, mean;
    dark images so the constants matter; the same images on a [0, 255] scale with data_range 255 agree."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, 12, 13, generator=g, dtype=torch.float64) * 0.05
    y = (x + torch.randn(1, 1, 12, 13, generator=g, dtype=torch.float64) * 0.02).clamp(0, 1)
    gauss = [math.exp(-((i - 5) ** 2) / (2 * 1.5 ** 2)) for i in range(11)]
    gauss = [v / sum(gauss) for v in gauss]
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    vals = []
    for oy in range(12 - 10):
        for ox in range(13 - 10):
            mx = my = sxx = syy = sxy = 0.0
            for i in range(11):
                for j in range(11):
                    wgt = gauss[i] * gauss[j]
                    a, b = float(x[0, 0, oy + i, ox + j]), float(y[0, 0, oy + i, ox + j])
                    mx, my = mx + wgt * a, my + wgt * b
                    sxx, syy, sxy = sxx + wgt * a * a, syy + wgt * b * b, sxy + wgt * a * b
            sxx, syy, sxy = sxx - mx * mx, syy - my * my, sxy - mx * my
            vals.append((2 * mx * my + c1) * (2 * sxy + c2) / ((mx * mx + my * my + c1) * (sxx + syy + c2)))
    want = sum(vals) / len(vals)
    assert want < 0.95
    assert float(metrics.ssim(x, y)[0]) == pytest.approx(want, rel=1e-6)
    assert float(metrics.ssim(x * 255, y * 255, data_range=255)[0]) == pytest.approx(want, rel=1e-6)


def test_psnr_closed_form():
    x = torch.zeros(1, 3, 4, 4)
    y = x.clone()
    y[0, 0, 0, 0] = 0.5  # MSE = 0.25 / 48
    assert float(metrics.psnr(x, y)[0]) == pytest.approx(10 * math.log10(48 / 0.25), rel=1e-6)
    assert float(metrics.psnr(x * 255, y * 255, data_range=255)[0]) == pytest.approx(10 * math.log10(48 / 0.25),
                                                                                         rel=1e-5)


def test_miou_counts_a_class_seen_only_in_the_prediction_and_skips_ignored_pixels():
    target = torch.tensor([0, 0, 0, 1, 1, 4, 4])  # 4 = ignored label
    pred = torch.tensor([0, 2, 0, 1, 2, 1, 0])  # class 2 never in the target: IoU 0, still averaged
    conf = metrics.confusion_matrix(pred, target, 3, ignore=(4,))
    s = metrics.segmentation_scores(conf, ignore=(4,))
    # class 0: tp 2, union 3 -> 2/3; class 1: tp 1, union 2 -> 1/2; class 2: 0
    assert s["mIoU"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert s["accuracy"] == pytest.approx(3 / 5)


def test_fid_from_features_of_two_constructed_gaussian_samples():
    """Samples built so their mean and unbiased covariance are exactly mu and diag(v) (columns orthogonal to the
    ones vector): FID = |mu1 - mu2|^2 + sum(v1 + v2 - 2 sqrt(v1 v2)); and a set against itself gives 0."""
    n, d = 10, 3
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.cat([torch.ones(n, 1, dtype=torch.float64),
                                      torch.randn(n, d, generator=g, dtype=torch.float64)], 1))
    basis = q[:, 1:] * math.sqrt(n - 1)  # (n, d): zero column means, X^T X = (n - 1) I

    def sample(mu, v):
        return mu + basis * v.sqrt()

    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64), torch.tensor([0.5, 1.0, 0.0], dtype=torch.float64)
    v1, v2 = torch.tensor([1.0, 4.0, 0.25], dtype=torch.float64), torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64)
    want = float(((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * (v1 * v2).sqrt()).sum())
    assert fid.fid_from_features(sample(mu1, v1), sample(mu2, v2)) == pytest.approx(want, rel=1e-9)
    assert abs(fid.fid_from_features(sample(mu1, v1), sample(mu1, v1))) < 1e-9
