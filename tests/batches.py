"""Synthetic batches shared by the model tests."""

import torch


def synthetic_batch(num_items=30, b=5, length=8, seed=0):
    """Left-padded ids with ragged lengths (length, 1, 3, 5, 2), targets, negatives and two views."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, num_items + 1, (b, length), generator=g)
    lengths = torch.tensor([length, 1, 3, 5, 2][:b])
    cols = torch.arange(length)
    ids = torch.where(cols[None] >= length - lengths[:, None], ids, 0)
    target = torch.where(ids > 0, torch.randint(1, num_items + 1, (b, length), generator=g), 0)
    neg = torch.where(ids > 0, torch.randint(1, num_items + 1, (b, length), generator=g), 0)
    return {"input_ids": ids, "target_pos": target, "target_neg": neg, "user": torch.arange(b),
            "view1": ids.roll(1, 0), "view2": ids.roll(2, 0)}
