"""`adarec-dual`: the authors' released ADARec code path (docs/method.md section 3).

Two complete ELCRec models, "e5" noising E^0 at schedule steps {3, 4} and "e10" at {8, 9}
(0-based steps of the 50-step linear schedule: noise std about .053/.068 and .124/.138). In each
expert a GRU + length-embedding controller gives plain softmax weights over its two noised
copies; their weighted sum is re-encoded by the same encoder. No denoiser, router or gate. The
engine trains the two as separate members (own optimizer, own early stopping) and tests the
mean of their score matrices.

Per expert: BCE(raw) + 0.5 BCE(noised) + 1e-4 masked-MSE(noised out, raw out detached)
+ 1e-4 (-entropy of the weights) + the ELCRec terms on the raw path. Scoring uses the raw path.

One deliberate difference from the released code (docs/method.md 3, "Causality"): the released
controller pools the whole input into one weight pair per user and mixes every position with it,
so the noised path's prediction at i reads the items after i. Here the weights are per position,
from the GRU states pooled over positions <= i (`LengthAwareGRU`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adarec.diffusion import linear_beta_schedule
from adarec.keyed_random import KeyedDraws, Streams
from adarec.parallel import global_mean

from .controller import LengthAwareGRU
from .elcrec import ELCRec, left_padded
from .encoder import masked_mean
from .losses import per_target_scaled
from .scoring import inner_product_scores

EXPERT_STEPS = {"e5": (3, 4), "e10": (8, 9)}
NOISED_REC_WEIGHT = 0.5
CONSISTENCY_WEIGHT = 1e-4
EXPLORATION_WEIGHT = 1e-4


class NoisedELCRec(ELCRec):
    """One expert of adarec-dual."""

    def __init__(self, cfg, num_items: int, max_len: int, steps: tuple[int, ...]):
        super().__init__(cfg, num_items, max_len)
        abar = torch.cumprod(1.0 - linear_beta_schedule(cfg.diffusion_steps), 0)[list(steps)]
        self.register_buffer("sqrt_abar", abar.sqrt().float(), persistent=False)
        self.register_buffer("sqrt_one_minus_abar", (1.0 - abar).sqrt().float(), persistent=False)
        # Each expert draws its own noise for a row (both see the same batches and row keys).
        self.noise_stream = (Streams.NOISED_COPIES << 16) | steps[0]
        self.copy_controller = LengthAwareGRU(cfg.hidden_size, max_len, len(steps))
        self.copy_controller.apply(self.encoder._init_weights)

    def paths(self, ids: torch.Tensor, row_keys: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The raw and noised encodings [B, W, D], the per-position copy weights [B, W, copies] and
        the raw path's reference representation [B, D] (the ELCRec terms').
        `row_keys` (training batches carry them) key the noise by row (adarec/keyed_random.py);
        without them it comes from torch's RNG."""
        # The raw path at the full width with the reference's padding attention, as ELCRec's
        # forward: its item outputs are the trimmed batch's, and its mean over all L positions is
        # the reference's sequence representation for the ELCRec terms (docs/method.md 2.5).
        width = ids.shape[1]
        full = self.encoder.embed(left_padded(ids, self.encoder.max_len))
        raw_full = self.encoder.encode(full, left_padded(ids, self.encoder.max_len), reference_padding=True)
        e0, raw = full[:, full.shape[1] - width:], raw_full[:, full.shape[1] - width:]
        weights = F.softmax(self.copy_controller(e0, ids), dim=-1)   # [B, L, copies]
        count = len(self.sqrt_abar)
        if row_keys is None:
            noise = torch.randn((count, *e0.shape), device=e0.device, dtype=e0.dtype)
        else:
            # Keyed by position from the right (a trimmed batch draws the same numbers).
            noise = KeyedDraws(row_keys, self.noise_stream).normal((e0.shape[1], count, e0.shape[2]), e0.dtype,
                                                                   align_right=True)
            noise = noise.permute(2, 0, 1, 3)                            # [copies, B, L, D]
        copies = self.sqrt_abar.to(e0.dtype)[:, None, None, None] * e0 + \
            self.sqrt_one_minus_abar.to(e0.dtype)[:, None, None, None] * noise   # [copies, B, L, D]
        mixed = torch.einsum("blc,cbld->bld", weights.to(e0.dtype), copies)
        return {"raw": raw, "noised": self.encoder.encode(mixed, ids), "weights": weights,
                "representation": raw_full.mean(1)}

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ids = batch["input_ids"]
        out = self.paths(ids, batch.get("row_key"))
        raw, noised, weights = out["raw"], out["noised"], out["weights"]
        valid = (ids > 0).unsqueeze(-1).float()
        # A mean over item positions: over the global batch's with several ranks (adarec/parallel.py).
        consistency = per_target_scaled(global_mean(((noised.float() - raw.detach().float()).pow(2) * valid).sum(),
                                                    valid.sum() * noised.shape[-1]), batch)
        # Entropy of the copy weights, averaged over item positions.
        entropy = masked_mean(-(weights * torch.log(weights.clamp_min(1e-12))).sum(-1, keepdim=True), ids).mean()
        terms = {
            "rec": self.rec_loss(raw, batch),
            "rec_noised": self.rec_loss(noised, batch),
            "consistency": consistency,
            "expl": -entropy,
        }
        terms.update(self.elcrec_terms(batch, out["representation"]))
        loss = (terms["rec"] + NOISED_REC_WEIGHT * terms["rec_noised"] + CONSISTENCY_WEIGHT * consistency
                + EXPLORATION_WEIGHT * terms["expl"] + self.weighted_elcrec(terms))
        return loss, {k: v.detach() for k, v in terms.items()}


def build_dual_experts(cfg, num_items: int, max_len: int) -> dict[str, NoisedELCRec]:
    return {name: NoisedELCRec(cfg, num_items, max_len, steps) for name, steps in EXPERT_STEPS.items()}


class ScoreAverage(nn.Module):
    """Scores of several trained members averaged (the dual model's test-time ensemble)."""

    def __init__(self, members: dict[str, nn.Module]):
        super().__init__()
        self.members = nn.ModuleDict(members)

    @property
    def never_rank(self):
        return next(iter(self.members.values())).never_rank

    @property
    def trims_batches(self) -> bool:
        return all(getattr(m, "trims_batches", True) for m in self.members.values())

    # The mean of the members' scores is one inner product of concatenated factors:
    # mean_m q_m . e_m = [q_1/M, ..., q_M/M] . [e_1, ..., e_M] (adarec/models/scoring.py).
    @torch.no_grad()
    def user_query(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.cat([m.user_query(input_ids) / len(self.members) for m in self.members.values()], dim=-1)

    def item_table(self) -> torch.Tensor:
        return torch.cat([m.item_table() for m in self.members.values()], dim=-1)

    @torch.no_grad()
    def score(self, input_ids: torch.Tensor) -> torch.Tensor:
        return inner_product_scores(self.user_query(input_ids), self.item_table())
