"""`adarec augment`: DiffuASR's augmented interaction file (docs/peers.md, "DiffuASR").

A trained generator (adarec/models/diffuasr.py) writes k = model.prefix_items generated items in
front of every user's real sequence, in the format of the data files (`user item item ...`,
oldest first), so that a downstream model trains on it with data.augmented_prefix = k.

- The guide of user s (n items) is s[:m] with m = min(n - 2, L - k): the items right after the
  generated block, as in training, where the guide is the rest of an L-item window after its
  first k items. It holds training items only, never the valid item s[-2] or the test item
  s[-1]: the public code guides with train + valid items, which would let the generated prefix
  carry the validation target into the inputs that model selection scores.
- The start noise is keyed by the guide and train.seed: the same run writes the same file.
- Rounding: the item (1..N) with the largest cosine with a generated vector, computed over
  blocks of rows and items with a running maximum (never a [rows, N, D] tensor).
- The file is written atomically; `<file>.json` next to it records its provenance.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from adarec.config import RunConfig, resolve_data_path
from adarec.data.io import UserSequences
from adarec.data.split import input_layout, right_aligned
from adarec.errors import AdarecError

__all__ = ["guide_rows", "round_to_items", "write_augmented"]

WEIGHTS = "best_model.pt"


def guide_rows(seqs: UserSequences, prefix_items: int, width: int) -> np.ndarray:
    """Each user's guide s[:min(n - 2, width - k)], left-padded to [U, width] (module docstring)."""
    items = np.asarray(seqs.items, dtype=np.int64)
    start = np.asarray(seqs.offsets[:-1], dtype=np.int64)
    count = np.minimum(seqs.lengths() - 2, width - prefix_items)
    return right_aligned(items, start + count, count, width)


def round_to_items(vectors: torch.Tensor, table: torch.Tensor, item_chunk: int = 4096,
                   row_chunk: int = 1024) -> torch.Tensor:
    """Item id in 1..N (table rows 1..N of [N+2, D]; row 0 and N+1 are not items) whose embedding has
    the largest cosine with each vector [R, D] -> [R] int64. Ties go to the smaller id."""
    num_items = table.shape[0] - 2
    table = F.normalize(table[1:num_items + 1].float(), dim=-1)
    out = []
    for r in range(0, vectors.shape[0], row_chunk):
        v = F.normalize(vectors[r:r + row_chunk].float(), dim=-1)
        best = torch.full((v.shape[0],), -torch.inf, device=v.device)
        arg = torch.zeros(v.shape[0], dtype=torch.int64, device=v.device)
        for c in range(0, num_items, item_chunk):
            block = v @ table[c:c + item_chunk].t()                        # [rows, chunk]
            value, index = block.max(dim=1)
            better = value > best                                          # strict: earlier chunk wins ties
            best = torch.where(better, value, best)
            arg = torch.where(better, index + c, arg)
        out.append(arg + 1)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64, device=vectors.device)


def load_generator(cfg: RunConfig, run_dir: Path, num_items: int, device: torch.device):
    """The run's best DiffuASR weights in float32 on device, in eval mode."""
    from adarec.models.diffuasr import DiffuASR

    if cfg.model.name != "diffuasr":
        raise AdarecError(f"{run_dir}: augment needs a diffuasr generator, but the config trains "
                          f"model.name={cfg.model.name!r}")
    path = Path(run_dir) / WEIGHTS
    if not path.exists():
        raise AdarecError(f"{run_dir}: no trained generator ({WEIGHTS} is missing); train it first with "
                          "adarec train --config configs/diffuasr_<data>.yaml")
    saved = torch.load(path, map_location="cpu", weights_only=True).get("members", {})
    if set(saved) != {"model"}:
        raise AdarecError(f"{path}: holds members {sorted(saved)}, a diffuasr run saves one ('model')")
    model = DiffuASR(cfg.model, num_items, input_layout(cfg.data.max_len, cfg.data.shorten_seq_to)[1])
    try:
        model.load_state_dict(saved["model"]["model"])
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise AdarecError(f"{path}: the weights do not fit the config (other data, model or max_len?): {first}") \
            from None
    model.prepare(None, device, cfg.train.seed)
    return model.to(device=device, dtype=torch.float32).eval(), int(saved["model"].get("epoch", 0))


@torch.no_grad()
def generate_prefixes(model, guides: np.ndarray, device: torch.device, batch_size: int = 256) -> np.ndarray:
    """k generated item ids per guide row [U, L] -> [U, k] (oldest first)."""
    out = []
    for start in range(0, guides.shape[0], batch_size):
        guide = torch.from_numpy(guides[start:start + batch_size]).to(device)
        x0 = model.generate(guide, model.start_noise(guide))
        ids = round_to_items(x0.reshape(-1, x0.shape[-1]), model.item_embeddings.weight)
        out.append(ids.reshape(x0.shape[0], x0.shape[1]).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.k), dtype=np.int64)


def write_augmented(cfg: RunConfig, run_dir, output_path, device: torch.device | str = "cpu",
                    batch_size: int = 256) -> dict:
    """Write the augmented file of cfg's data from the generator in run_dir; returns the sidecar's record."""
    from adarec.engine.atomic_io import atomic_write_json, atomic_write_text

    began = time.perf_counter()
    device = torch.device(device)
    run_dir, output_path = Path(run_dir), Path(output_path)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    source = resolve_data_path(cfg)
    if output_path.resolve() == source.resolve():
        raise AdarecError(f"{output_path}: is the source data file; choose another --output")
    from adarec.engine.data_setup import read_run_sequences

    # As the generator's run read it (data.max_users, then the data filters), so that its weights fit.
    seqs = read_run_sequences(cfg)
    model, epoch = load_generator(cfg, run_dir, int(seqs.num_items), device)
    k = model.k
    prefixes = generate_prefixes(model, guide_rows(seqs, k, model.max_len), device, batch_size)
    lines = []
    for u in range(len(seqs)):
        row = np.concatenate([prefixes[u], seqs.sequence(u)])
        lines.append(f"{int(seqs.user_ids[u])} " + " ".join(map(str, row.tolist())))
    atomic_write_text(output_path, "\n".join(lines) + "\n")
    record = {
        "source": str(source), "run": str(run_dir), "best_epoch": epoch, "prefix_items": k,
        "seed": int(cfg.train.seed), "users": len(seqs), "items": int(seqs.num_items),
        "real_interactions": len(seqs.items), "generated_interactions": int(prefixes.size),
        "distinct_generated_items": int(np.unique(prefixes).size), "guide_items_max": model.max_len - k,
        "sample_steps": int(cfg.model.sample_steps), "guidance_weight": float(cfg.model.guidance_weight),
        "seconds": round(time.perf_counter() - began, 2),
    }
    atomic_write_json(Path(f"{output_path}.json"), record)
    return record
