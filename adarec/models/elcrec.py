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

from .encoder import masked_mean
from .losses import cluster_loss, nt_xent
from .sasrec import SASRec

log = logging.getLogger(__name__)


def sequence_mean(hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """ELCRec's sequence representation: the mean of the outputs over the item positions.

    The reference averages all L positions, padding included, so its representation (and the
    cluster and intent terms built on it) depends on padding outputs, which depend on how much
    padding a batch has. Averaging the item positions only makes it a function of the items,
    the same in a batch trimmed to its longest row (docs/method.md 2.5 and "Deviations from the
    reference code", with the measured effect)."""
    return masked_mean(hidden, input_ids)


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

    def elcrec_terms(self, hidden: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        """The ELCRec losses for a batch whose main sequence encodes to `hidden`.

        Kept separate from forward so that models built on this backbone (ADARec) reuse it.
        """
        centers = F.normalize(self.intent_centers.float(), dim=-1)
        pooled = F.normalize(sequence_mean(hidden, batch["input_ids"]).float(), dim=-1)
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
        views = F.pad(views, (self.encoder.max_len - views.shape[1], 0))
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
        hidden = self.encoder(batch["input_ids"])
        with nvtx.phase("losses"):
            terms = {"rec": self.rec_loss(hidden, batch)}
            terms.update(self.elcrec_terms(hidden, batch))
            loss = terms["rec"] + self.weighted_elcrec(terms)
        return loss, {k: v.detach() for k, v in terms.items()}

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
            pooled.append(F.normalize(sequence_mean(self.encoder(ids), ids).float(), dim=-1).cpu())
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
