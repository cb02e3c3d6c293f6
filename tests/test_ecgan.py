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
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_contrastive_naive_equals_vectorized(name):
    labels = torch.tensor(LAYOUTS[name])
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
    if name in ("one_class", "all_singletons"):
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
    for impl in ("naive", "chunked"):
        assert ecgan.similarity_loss(target.clone(), target, impl=impl).item() < 1e-5
    pred, _ = _rand_probs_and_onehot(seed=1)
    assert ecgan.similarity_loss(pred, target).item() > 0.1
