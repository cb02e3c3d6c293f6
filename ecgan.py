"""
ECGAN: Edge Guided GANs with Contrastive Learning for Semantic Image Synthesis (Tang et al., ICLR 2023).

Map of the file (Fig. 1 of the paper):
  pixel_contrastive_loss   Eq. 5, pixel-wise contrastive loss (naive and vectorized)
  similarity_loss          Eq. 3, BCE between M x M similarity maps (naive and chunked)
"""
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


# -----------------------------------------------------------------------------
# Pixel-wise contrastive loss (Sec. 3.3, Eq. 5)

def pixel_contrastive_loss(emb, labels, temperature=0.1, impl="vectorized"):
    """Eq. 5 over M pixel embeddings emb (M, D) with class ids labels (M,).

    Every sample is an anchor i; its positives are the other samples of its class and its negatives
    all samples of other classes. Each (i, i+) term has ONE positive plus all negatives in the
    denominator (unlike SupCon, which puts all positives there). Terms are averaged over the
    positives of i, then over the anchors that have at least one positive. Returns a zero that
    keeps the graph if no anchor has a positive.
    """
    if impl not in ("naive", "vectorized"):
        raise ValueError(f"ecgan.pixel_contrastive_loss: impl must be 'naive' or 'vectorized', got {impl!r}")
    if emb.dim() != 2 or labels.shape != emb.shape[:1]:
        raise ValueError(f"ecgan.pixel_contrastive_loss: emb must be (M, D) and labels (M,), got "
                         f"{tuple(emb.shape)} and {tuple(labels.shape)}")
    z = F.normalize(emb, dim=1)  # embeddings are L2-normalised (Eq. 4)
    fn = _contrast_naive if impl == "naive" else _contrast_vectorized
    return fn(z, labels, temperature)


def _contrast_naive(z, labels, t):
    # Loops over anchors and positives exactly as Eq. 5 is written.
    per_anchor = []
    for i in range(len(z)):
        pos = [p for p in range(len(z)) if p != i and labels[p] == labels[i]]
        if not pos:
            continue
        neg = labels != labels[i]
        neg_sum = torch.exp(z[neg] @ z[i] / t).sum()
        terms = []
        for p in pos:
            e_pos = torch.exp(z[i] @ z[p] / t)
            terms.append(-torch.log(e_pos / (e_pos + neg_sum)))
        per_anchor.append(torch.stack(terms).mean())
    if not per_anchor:
        return z.sum() * 0.0
    return torch.stack(per_anchor).mean()


def _contrast_vectorized(z, labels, t):
    M = len(z)
    logits = z @ z.t() / t  # (M, M)
    # Stable: subtract each row's max (the anchor itself, 1/t); the loss is shift-invariant per row.
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    same = labels[:, None] == labels[None, :]
    pos = same & ~torch.eye(M, dtype=torch.bool, device=z.device)
    neg = ~same
    e = logits.exp()
    neg_sum = (e * neg).sum(dim=1, keepdim=True)  # (M, 1): sum over i- of exp(i . i- / t)
    # -log(e_ip / (e_ip + neg_sum)) = log(e_ip + neg_sum) - logit_ip; e_ip > 0 so the log is finite
    terms = (torch.log(e + neg_sum) - logits) * pos  # (M, M), zero off the positives
    n_pos = pos.sum(dim=1)
    has_pos = n_pos > 0
    if not has_pos.any():
        return z.sum() * 0.0
    return (terms.sum(dim=1)[has_pos] / n_pos[has_pos]).mean()


# -----------------------------------------------------------------------------
# Similarity loss (Sec. 3.2, Eq. 3)

def similarity_loss(pred, target, impl="chunked", chunk=1024, eps=1e-6):
    """Eq. 3: mean BCE between A = S^T S and A'' = S''^T S'' (both M x M, M = H*W), batch-averaged.

    pred (B, N, H, W) class probabilities (S'', the label generator's softmax); target (B, N, H, W)
    one-hot (S), so A is 1 where two pixels share a class and 0 elsewhere. The paper writes S S^T with
    S reshaped to N x M; the M x M map it describes is S^T S in that layout. "naive" materialises the
    M x M maps; "chunked" computes `chunk` rows at a time under activation checkpointing, so neither the
    forward nor the saved-for-backward memory grows with M^2 (only O(chunk * M)).
    """
    if impl not in ("naive", "chunked"):
        raise ValueError(f"ecgan.similarity_loss: impl must be 'naive' or 'chunked', got {impl!r}")
    if pred.shape != target.shape or pred.dim() != 4:
        raise ValueError(f"ecgan.similarity_loss: pred and target must both be (B, N, H, W), got "
                         f"{tuple(pred.shape)} and {tuple(target.shape)}")
    B, N = pred.shape[:2]
    p = pred.reshape(B, N, -1)  # (B, N, M)
    s = target.reshape(B, N, -1).to(p.dtype)
    M = p.shape[-1]
    if impl == "naive":
        return _sim_bce_sum(p, s, p, s, eps) / (B * M * M)
    total = p.new_zeros(())
    for r0 in range(0, M, chunk):
        rows = slice(r0, r0 + chunk)
        # checkpoint: the (B, chunk, M) tiles are recomputed in backward instead of saved
        total = total + checkpoint(_sim_bce_sum, p[..., rows], s[..., rows], p, s, eps, use_reentrant=False)
    return total / (B * M * M)


def _sim_bce_sum(p_rows, s_rows, p, s, eps):
    a = s_rows.transpose(1, 2) @ s  # (B, r, M) rows of A, in {0, 1}
    q = (p_rows.transpose(1, 2) @ p).clamp(eps, 1 - eps)  # (B, r, M) rows of A''; <= 1 by Cauchy-Schwarz
    return -(a * q.log() + (1 - a) * (1 - q).log()).sum()
