"""Inner-product faiss indexes over an item table: build, move to the search device, save, load.

Two kinds (docs/serving.md):

* ``flat``: `IndexFlatIP`, exact, every query is compared with every item;
* ``ivf``: `IndexIVFFlat` with METRIC_INNER_PRODUCT, the items clustered into `nlist` lists by
  k-means on the items themselves; a query scans the `nprobe` lists whose centroids score
  highest. nprobe = nlist scans every list and is exact again.

Index rows are 0-based: row i holds item i + 1 (row 0 of the model's table is padding and is
never indexed). Saved indexes are always CPU indexes; when faiss sees a GPU the index is copied
there for training and search (`to_search_device`) and copied back before it is written.
"""

from __future__ import annotations

import math
from pathlib import Path

import faiss
import numpy as np

from adarec.engine.atomic_io import atomic_write
from adarec.errors import AdarecError

INDEX_KINDS = ("flat", "ivf")


def default_nlist(num_items: int) -> int:
    """About 4 * sqrt(N) lists (faiss' rule of thumb), at least 1 and at most N."""
    return max(1, min(num_items, round(4 * math.sqrt(num_items))))


def default_nprobe(nlist: int) -> int:
    """Lists scanned per query when none is asked for: 1/8 of them (at least 1). On the quickstart
    Beauty run (12,101 items, 440 lists, 55 probed) this found 99.8% of the exact top 20
    (docs/serving.md)."""
    return max(1, math.ceil(nlist / 8))


def check_ivf_sizes(num_items: int, nlist: int, nprobe: int) -> None:
    if not 1 <= nlist <= num_items:
        raise AdarecError(f"--nlist must lie in 1..{num_items} (the number of items), got {nlist}")
    if not 1 <= nprobe <= nlist:
        raise AdarecError(f"--nprobe must lie in 1..{nlist} (--nlist), got {nprobe}")


def to_search_device(index: faiss.Index) -> faiss.Index:
    """The index on faiss' first GPU when faiss has one (a GPU build of faiss), else itself.

    The CPU branch is the one a faiss-cpu install takes."""
    if faiss.get_num_gpus() > 0:
        # The GPU index shares the ownership of the resources this creates.
        return faiss.index_cpu_to_all_gpus(index, ngpu=1)
    return index


def to_cpu(index: faiss.Index) -> faiss.Index:
    """A CPU copy of a GPU index (the only kind faiss can write), or the CPU index itself."""
    if hasattr(faiss, "GpuIndex") and isinstance(index, faiss.GpuIndex):
        return faiss.index_gpu_to_cpu(index)
    return index


def build_index(items: np.ndarray, kind: str = "flat", nlist: int | None = None,
                nprobe: int | None = None) -> faiss.Index:
    """A CPU index of `items` (float32 [N, D], row i = item i + 1); an ivf index is trained on
    the items (on the GPU when faiss has one) and remembers nprobe."""
    items = np.ascontiguousarray(items, dtype=np.float32)
    num_items, dim = items.shape
    if kind == "flat":
        if nlist is not None or nprobe is not None:
            raise AdarecError("--nlist and --nprobe apply to --index ivf only")
        index = faiss.IndexFlatIP(dim)
        index.add(items)
        return index
    if kind != "ivf":
        raise AdarecError(f"--index must be one of {', '.join(INDEX_KINDS)}, got {kind!r}")
    nlist = default_nlist(num_items) if nlist is None else int(nlist)
    nprobe = default_nprobe(nlist) if nprobe is None else int(nprobe)
    check_ivf_sizes(num_items, nlist, nprobe)
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    # The catalog is all there is to train on: no warning that fewer than 39 points per list were given.
    index.cp.min_points_per_centroid = 1
    work = to_search_device(index)
    work.train(items)
    work.add(items)
    index = to_cpu(work)
    index.nprobe = nprobe
    return index


def index_kind(index: faiss.Index) -> str:
    return "ivf" if isinstance(index, faiss.IndexIVF) else "flat"


def write_index(index: faiss.Index, path: Path) -> None:
    """Write a CPU index atomically (complete or absent, never half written)."""
    data = faiss.serialize_index(to_cpu(index))
    atomic_write(path, lambda f: f.write(data.tobytes()))


def read_index(path: Path) -> faiss.Index:
    """The CPU index saved at `path` (faiss returns it as its own class: an ivf one keeps nprobe)."""
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as err:
        message = str(err).strip().splitlines()[-1]
        raise AdarecError(f"{path}: not a faiss index ({message})") from None
    return index


def search(index: faiss.Index, queries: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores [B, count] float32, item ids [B, count] int64) best first; id 0 marks an empty
    slot (an ivf search whose probed lists hold fewer than `count` items)."""
    scores, rows = index.search(np.ascontiguousarray(queries, dtype=np.float32), count)
    return scores, rows + 1
