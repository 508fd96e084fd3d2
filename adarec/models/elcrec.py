"""ELCRec: SASRec + instance contrast + end-to-end learnable intent clustering (docs/method.md 2.5).

Loss = rec + cf_weight * instance NT-Xent over the two augmented views (flattened L*D encoder
outputs, dot products, temperature 1) + intent_cf_weight * NT-Xent between each view's pooled
output and its assigned intent centre (same-intent rows removed from the negatives)
+ trade_off * cluster term on the L2-normalised centres.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adarec.errors import ConfigError
from adarec.profiling import nvtx

from .losses import cluster_loss, nt_xent
from .sasrec import SASRec

log = logging.getLogger(__name__)


def left_padded(ids: torch.Tensor, length: int) -> torch.Tensor:
    """Left-padded ids [B, W] padded on the left to [B, length], in the same two launches (a fill
    and a copy) whatever W, so a step's launch count does not depend on its batch's width."""
    full = ids.new_zeros((ids.shape[0], length))
    full[:, length - ids.shape[1]:] = ids
    return full


class ELCRec(SASRec):
    needs_views = True

    def __init__(self, cfg, num_items: int, max_len: int):
        super().__init__(cfg, num_items, max_len)
        self.cf_weight = cfg.cf_weight
        self.intent_cf_weight = cfg.intent_cf_weight
        self.trade_off = cfg.trade_off
        self.temperature = cfg.cl_temperature
        self.prototype = cfg.prototype
        self.kmeans_init = cfg.kmeans_init
        self.intent_centers = nn.Parameter(torch.randn(cfg.num_intent_clusters, cfg.hidden_size) * 0.02)

    def elcrec_terms(self, batch: dict, representation: torch.Tensor) -> dict[str, torch.Tensor]:
        """The ELCRec losses for a batch whose main sequence's representation is `representation`
        [B, D], the same at any batch width (docs/method.md 2.5): for ELCRec and the dual model's
        experts the reference's mean over all max_len positions of the full-width outputs, padding
        outputs included (`full_width_outputs`; the item-position mean stalled ELCRec's validation
        NDCG@20 at .011 on Beauty); for ADARec the item-position mean of h or, with
        model.elcrec_pooling=reference, its full-width mean (`ADARec.reference_mean`).

        Kept separate from forward so that models built on this backbone (ADARec) reuse it.
        """
        centers = F.normalize(self.intent_centers.float(), dim=-1)
        pooled = F.normalize(representation.float(), dim=-1)
        terms = {"cluster": cluster_loss(pooled, centers)}
        # Intent of each user: its nearest centre (a hard, non-differentiable assignment).
        intent = (pooled.detach() @ centers.detach().t()).argmax(1)

        # The views are encoded at the full width with the reference code's padding attention
        # (a padding query attends to every key): their padding outputs pool the view, the
        # flattened outputs are dominated by those pools, and the instance contrast is the
        # reference's. Built from the trimmed views by padding them back on the left, so the terms
        # do not depend on the batch's width. On views cut to the batch width, or with padding
        # that carries nothing of the user, most views keep one or two item positions (a crop
        # keeps 20% of the items, a mask 30%), the contrast stays at chance and validation stops
        # improving early (measured, docs/method.md 2.5).
        views = torch.cat([batch["view1"], batch["view2"]])
        views = left_padded(views, self.encoder.max_len)
        view_out = self.encoder(views, reference_padding=True)
        n = batch["view1"].shape[0]
        flat = self.with_prototypes(view_out, centers).flatten(1)
        terms["instance_cl"] = nt_xent(flat[:n], flat[n:], self.temperature)
        view_pooled = view_out.mean(1)     # the reference's mean over all L positions
        own_center = F.embedding(intent, centers)
        terms["intent_cl"] = 0.5 * (
            nt_xent(own_center, view_pooled[:n], self.temperature, groups=intent)
            + nt_xent(own_center, view_pooled[n:], self.temperature, groups=intent)
        )
        return terms

    def initial_representation(self, ids: torch.Tensor) -> torch.Tensor:
        """The sequence representation the k-means of `prepare` clusters: the reference's mean over
        all L positions of the untrained backbone's full-width outputs."""
        return self.full_width_outputs(ids).mean(1)

    def with_prototypes(self, out: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
        """Intent-assisted instance contrast: add (shift) or append (concat) each position's
        nearest centre to the view outputs before they are flattened."""
        if self.prototype == "none":
            return out
        # F.embedding rather than centers[idx]: its CPU backward is deterministic, indexing's
        # accumulates with parallel atomics and breaks bit-exact resume.
        nearest = F.embedding((out.detach().float() @ centers.detach().t()).argmax(-1), centers).to(out.dtype)
        return out + nearest if self.prototype == "shift" else torch.cat([out, nearest], dim=-1)

    def weighted_elcrec(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        return (self.cf_weight * terms["instance_cl"] + self.intent_cf_weight * terms["intent_cl"]
                + self.trade_off * terms["cluster"])

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ids = batch["input_ids"]
        width = ids.shape[1]
        # The main sequence at the full width with the reference's padding attention: its item
        # outputs are those of the trimmed batch (an item query never reads padding), and the mean
        # over all L positions, padding outputs pooling the row, is the reference's sequence
        # representation (docs/method.md 2.5).
        full = self.full_width_outputs(ids)
        hidden = full[:, full.shape[1] - width:]
        with nvtx.phase("losses"):
            terms = {"rec": self.rec_loss(hidden, batch)}
            terms.update(self.elcrec_terms(batch, representation=full.mean(1)))
            loss = terms["rec"] + self.weighted_elcrec(terms)
        return loss, {k: v.detach() for k, v in terms.items()}

    def full_width_outputs(self, ids: torch.Tensor) -> torch.Tensor:
        """Encoder outputs [B, L, D] of a (possibly trimmed) batch padded back to the full width L,
        with the reference's padding attention: a padding query attends to every key."""
        return self.encoder(left_padded(ids, self.encoder.max_len), reference_padding=True)

    @torch.no_grad()
    def prepare(self, split, device, seed: int, batch_size: int = 1024) -> None:
        """Initialise the intent centres by spherical k-means (faiss) on the untrained model's
        pooled outputs of the training inputs."""
        if not self.kmeans_init:
            log.info("intent centres left at their random init (model.kmeans_init=false)")
            return
        import faiss

        was_training = self.training
        self.eval()
        pooled = []
        for start in range(0, split.train_input.shape[0], batch_size):
            ids = split.train_input[start:start + batch_size].to(device)
            pooled.append(F.normalize(self.initial_representation(ids).float(), dim=-1).cpu())
        x = np.ascontiguousarray(torch.cat(pooled).numpy(), dtype=np.float32)
        k = self.intent_centers.shape[0]
        if x.shape[0] < k:
            raise ConfigError(f"model.num_intent_clusters={k} needs at least {k} training users to seed its "
                              f"k-means, the data has {x.shape[0]} training users; lower "
                              "model.num_intent_clusters (or set model.kmeans_init=false)")
        kmeans = faiss.Kmeans(x.shape[1], k, niter=20, seed=seed, spherical=True, verbose=False)
        kmeans.train(x)
        self.intent_centers.data.copy_(torch.from_numpy(kmeans.centroids))
        log.info("intent centres initialised by k-means: %d clusters on %d sequences", k, x.shape[0])
        self.train(was_training)
