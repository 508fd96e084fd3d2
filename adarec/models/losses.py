"""Losses shared by the recommenders (reference math, plain PyTorch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bce_next_item_loss(hidden, item_embeddings, target_pos, target_neg) -> torch.Tensor:
    """SASRec's BCE with one sampled negative per position, averaged over real targets."""
    pos = (hidden * item_embeddings(target_pos)).sum(-1).float()
    neg = (hidden * item_embeddings(target_neg)).sum(-1).float()
    is_target = (target_pos > 0).float()
    per_position = -(F.logsigmoid(pos) + F.logsigmoid(-neg)) * is_target
    return per_position.sum() / is_target.sum().clamp_min(1.0)


def ce_next_item_loss(hidden, item_weight, target_pos) -> torch.Tensor:
    """Full-softmax cross-entropy over items 1..N at every position with a target.

    Only positions with a target are scored (boolean selection costs one host sync but avoids
    scoring the padding, which is most of a Beauty batch).
    """
    valid = target_pos > 0
    logits = (hidden[valid] @ item_weight[1:-1].t()).float()
    return F.cross_entropy(logits, target_pos[valid] - 1)


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float = 1.0,
            groups: torch.Tensor | None = None) -> torch.Tensor:
    """SimCLR NT-Xent between paired rows of a and b with dot-product logits.

    Row i of a and row i of b are positives; all other rows of both are negatives. With groups
    (e.g. intent ids), rows of the same group are removed from each other's negatives, as ICLRec
    does for intent contrast.
    """
    a, b = a.float(), b.float()
    n = a.shape[0]
    sim_aa = a @ a.t() / temperature
    sim_bb = b @ b.t() / temperature
    sim_ab = a @ b.t() / temperature
    eye = torch.eye(n, dtype=torch.bool, device=a.device)
    if groups is None:
        same, same_cross = eye, torch.zeros_like(eye)
    else:
        same = groups.view(-1, 1) == groups.view(1, -1)
        same_cross = same & ~eye
    neg_inf = float("-inf")
    sim_aa = sim_aa.masked_fill(same, neg_inf)
    sim_bb = sim_bb.masked_fill(same, neg_inf)
    sim_ab = sim_ab.masked_fill(same_cross, neg_inf)
    logits = torch.cat([torch.cat([sim_ab, sim_aa], 1), torch.cat([sim_bb, sim_ab.t()], 1)], 0)
    # Row i's positive is sim_ab[i, i] (column i); row n+i's is sim_ab.t()[i, i] (column n+i).
    labels = torch.arange(2 * n, device=a.device)
    return F.cross_entropy(logits, labels)


def cluster_loss(samples: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """ELCRec's cluster term on unit vectors: mean sample-centre squared distance minus mean
    centre-centre squared distance, both over all pairs (the reference code's K x K mean keeps
    the zero diagonal).

    For unit vectors ||x - y||^2 = 2 - 2 x.y, so both means reduce to dot products with the sum
    of the centres: O((B + K) D) instead of building the B x K and K x K distance matrices.
    """
    k = centers.shape[0]
    center_sum = centers.sum(0)
    sample_center = 2.0 - 2.0 * (samples @ center_sum) / k
    center_center = 2.0 - 2.0 * center_sum.pow(2).sum() / (k * k)
    return sample_center.mean() - center_center
