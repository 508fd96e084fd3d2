"""The scoring contract that lets evaluation and serving work on any catalog size.

Every model scores the items by an inner product: score(ids) = user_query(ids) @ item_table().T,
where user_query gives one float32 vector per sequence [B, D'] and item_table the float32 table
of every embedding row [N+2, D'] (row 0 padding, rows 1..N the items, row N+1 the mask id). A
model that ranks by cosine normalises both sides; an average of several models concatenates their
queries (each divided by the member count) and their tables. Keeping the two factors apart is
what lets the evaluator score items in chunks (no B x N matrix) and lets `adarec export` put the
table into a faiss index (docs/catalogs.md).
"""

from __future__ import annotations

import torch


def inner_product_scores(query: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """query [B, D] @ table [C, D].T in float32, also under autocast: bf16 scores tie, and ties
    count against the target (docs/method.md 4)."""
    with torch.autocast(query.device.type, enabled=False):
        return query.float() @ table.float().t()
