"""Sequential recommenders, built by name from the model config."""

from .adarec import ADARec
from .elcrec import ELCRec
from .sasrec import SASRec

MODELS = {"sasrec": SASRec, "elcrec": ELCRec, "adarec": ADARec}


def build_model(cfg, num_items: int, max_len: int):
    """Instantiate model.name with its config section."""
    try:
        cls = MODELS[cfg.name]
    except KeyError:
        raise ValueError(f"unknown model {cfg.name!r}; available: {', '.join(MODELS)}") from None
    return cls(cfg, num_items, max_len)


__all__ = ["MODELS", "ELCRec", "SASRec", "build_model"]
