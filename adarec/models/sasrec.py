"""SASRec: the backbone alone, trained on next-item prediction (BCE or full-softmax CE)."""

from __future__ import annotations

import torch
from torch import nn

from adarec.profiling import nvtx

from .encoder import SequenceEncoder
from .losses import ItemCrossEntropy, bce_next_item_loss, ce_next_item_loss, per_target_scaled
from .scoring import inner_product_scores


class SASRec(nn.Module):
    """Next-item recommender; forward(batch) -> (loss, detached loss terms)."""

    needs_views = False
    # The CE implementation; build_model replaces it with one from the kernels config.
    item_ce = ItemCrossEntropy()

    def __init__(self, cfg, num_items: int, max_len: int):
        super().__init__()
        if cfg.rec_loss not in ("bce", "ce"):
            raise ValueError(f"rec_loss must be 'bce' or 'ce', got {cfg.rec_loss!r}")
        self.rec_loss_kind = cfg.rec_loss
        self.num_items = num_items
        self.encoder = SequenceEncoder(
            num_items, max_len, cfg.hidden_size, cfg.num_layers, cfg.num_heads,
            cfg.hidden_dropout, cfg.attn_dropout, cfg.initializer_range,
        )

    @property
    def never_rank(self) -> tuple[int, int]:
        """Embedding rows that are not items: padding (0) and the mask id (N+1)."""
        return (0, self.num_items + 1)

    def rec_loss(self, hidden: torch.Tensor, batch: dict) -> torch.Tensor:
        """The next-item loss, a mean over the batch's targets, times the batch's target share
        when batches are length-grouped (adarec/data/sampler.py, `_target_shares`)."""
        if self.rec_loss_kind == "ce":
            loss = ce_next_item_loss(hidden, self.encoder.item_embeddings.weight, batch["target_pos"],
                                     batch.get("target_rows"), self.item_ce)
        else:
            loss = bce_next_item_loss(hidden, self.encoder.item_embeddings, batch["target_pos"], batch["target_neg"])
        return per_target_scaled(loss, batch)

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        hidden = self.encoder(batch["input_ids"])
        with nvtx.phase("losses"):
            loss = self.rec_loss(hidden, batch)
        return loss, {"rec": loss.detach()}

    @torch.no_grad()
    def user_query(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The last position's output [B, D] (float32): the next item is scored by it."""
        return self.encoder(input_ids)[:, -1].float()

    def item_table(self) -> torch.Tensor:
        """Every embedding row [N+2, D] in float32 (tied output layer; adarec/models/scoring.py)."""
        return self.encoder.item_embeddings.weight.float()

    @torch.no_grad()
    def score(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Scores of every embedding row for the next item after each sequence: [B, N+2]."""
        return inner_product_scores(self.user_query(input_ids), self.item_table())

    def prepare(self, split, device, seed: int) -> None:
        """Data-dependent initialisation before training (none for SASRec)."""
