"""Sequential recommenders, built by name from the model config."""

import importlib

from adarec.config import CE_ITEM_CHUNK

from .adarec import ADARec
from .dual import NoisedELCRec, ScoreAverage, build_dual_experts
from .elcrec import ELCRec
from .losses import ItemCrossEntropy
from .sasrec import SASRec

MODELS = {"sasrec": SASRec, "elcrec": ELCRec, "adarec": ADARec}
# The peers (docs/peers.md), imported when first built: a run of another model never loads them.
PEERS = {"diffurec": "adarec.models.diffurec:DiffuRec", "adrec": "adarec.models.adrec:ADRec",
         "diffuasr": "adarec.models.diffuasr:DiffuASR"}


def model_class(name: str):
    """The class of model.name's network (adarec-dual: the class of its two experts)."""
    if name == "adarec-dual":
        return NoisedELCRec
    if name in PEERS:
        module, _, attr = PEERS[name].partition(":")
        return getattr(importlib.import_module(module), attr)
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join([*MODELS, 'adarec-dual', *PEERS])}") from None


def build_model(cfg, num_items: int, max_len: int, kernel_backend: str = "auto",
                ce_item_chunk: int = CE_ITEM_CHUNK):
    """Instantiate a single-network model.name with its config section; kernel_backend
    (kernels.backend) picks fused or eager ops in the models that have them, and with
    ce_item_chunk (kernels.ce_item_chunk) the implementation of the full-softmax CE."""
    cls = model_class(cfg.name)
    if cls is ADARec:
        model = cls(cfg, num_items, max_len, kernel_backend=kernel_backend)
    else:
        model = cls(cfg, num_items, max_len)
    model.item_ce = ItemCrossEntropy(kernel_backend, ce_item_chunk)
    return model


def build_members(cfg, num_items: int, max_len: int, kernel_backend: str = "auto",
                  ce_item_chunk: int = CE_ITEM_CHUNK) -> dict:
    """The separately optimised networks of a model: {"model": net} for the single-network
    models, the two experts {"e5", "e10"} for adarec-dual (each with its own optimizer and
    early stopping; their scores are averaged at test time)."""
    if cfg.name == "adarec-dual":
        experts = build_dual_experts(cfg, num_items, max_len)
        for expert in experts.values():
            expert.item_ce = ItemCrossEntropy(kernel_backend, ce_item_chunk)
        return experts
    return {"model": build_model(cfg, num_items, max_len, kernel_backend, ce_item_chunk)}


def scorer(members: dict):
    """The object evaluation ranks with: the single network, or the average of the experts."""
    return next(iter(members.values())) if len(members) == 1 else ScoreAverage(members)


__all__ = ["MODELS", "PEERS", "ADARec", "ELCRec", "NoisedELCRec", "SASRec", "ScoreAverage", "build_members",
           "build_model", "model_class", "scorer"]
