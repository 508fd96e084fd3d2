"""`adarec export`: the run's item table and its faiss index, written beside the run.

Files (docs/serving.md):

* items.npy: float32 [N, D], row i = item i + 1 (the model's item_table rows 1..N);
* items.faiss: an inner-product index over those rows (flat = exact, or ivf);
* export.json: what was exported and from which weights. It is written last and removed first,
  so a crash in the middle of an export leaves no export rather than a mixed one.

Every file is written atomically (complete or absent). A stale export (the best weights changed
since) is detected by the weights' size and modification time, and, when the time differs,
by their sha256, so that a copied run directory (new times, same bytes) still serves.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import faiss
import numpy as np

from adarec import faiss_index
from adarec.engine.atomic_io import atomic_write, atomic_write_json
from adarec.engine.run_model import run_files
from adarec.errors import AdarecError

from .served_run import ServedRun, load_served_run

ITEMS_FILE = "items.npy"
INDEX_FILE = "items.faiss"
MANIFEST_FILE = "export.json"
FORMAT = 1


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_fingerprint(path: Path) -> dict:
    stat = path.stat()
    return {"file": path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": file_sha256(path)}


def weights_unchanged(recorded: dict, path: Path) -> bool:
    """Whether `path` holds the weights `recorded` describes (the hash only when the time moved)."""
    stat = path.stat()
    if recorded.get("file") != path.name or recorded.get("size") != stat.st_size:
        return False
    return recorded.get("mtime_ns") == stat.st_mtime_ns or recorded.get("sha256") == file_sha256(path)


def export_run(run_dir, index: str = "flat", nlist: int | None = None, nprobe: int | None = None,
               device: str = "auto") -> dict:
    """Write items.npy, items.faiss and export.json into `run_dir`; returns export.json's record."""
    run_dir = Path(run_dir)
    if index not in faiss_index.INDEX_KINDS:
        raise AdarecError(f"--index must be one of {', '.join(faiss_index.INDEX_KINDS)}, got {index!r}")
    # The fingerprint is taken before the weights are read: weights replaced in between make the
    # export look stale (exported again), never fresh.
    _, weights_path = run_files(run_dir, "export")
    fingerprint = weights_fingerprint(weights_path)
    served = load_served_run(run_dir, device, action="export")
    start = time.perf_counter()
    items = served.item_vectors()
    built = faiss_index.build_index(items, index, nlist, nprobe)
    (run_dir / MANIFEST_FILE).unlink(missing_ok=True)
    atomic_write(run_dir / ITEMS_FILE, lambda f: np.save(f, items))
    faiss_index.write_index(built, run_dir / INDEX_FILE)
    record = {
        "format": FORMAT,
        "model": served.cfg.model.name,
        "num_items": int(items.shape[0]),
        "dim": int(items.shape[1]),
        "index": index,
        "metric": "inner_product",
        "nlist": int(built.nlist) if index == "ivf" else None,
        "nprobe": int(built.nprobe) if index == "ivf" else None,
        "items_file": ITEMS_FILE,
        "index_file": INDEX_FILE,
        "weights": fingerprint,
        "best_epoch": served.best_epoch,
        "faiss_version": faiss.__version__,
        "faiss_gpus": faiss.get_num_gpus(),
        "seconds": round(time.perf_counter() - start, 3),
    }
    atomic_write_json(run_dir / MANIFEST_FILE, record)
    return record


def read_export(served: ServedRun) -> tuple[dict, faiss.Index]:
    """export.json and the CPU index of a run, checked against its current weights and catalog;
    an AdarecError says how to (re)build a missing, stale or inconsistent export."""
    run_dir = served.run_dir
    again = f"run `adarec export --run {run_dir}`"
    manifest_path, index_path = run_dir / MANIFEST_FILE, run_dir / INDEX_FILE
    for path in (manifest_path, index_path):
        if not path.is_file():
            raise AdarecError(f"{run_dir}: no export ({path.name} is missing); {again}")
    try:
        record = json.loads(manifest_path.read_text())
        recorded_weights = record["weights"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise AdarecError(f"{manifest_path}: unreadable export record ({err}); {again}") from None
    if record.get("format") != FORMAT:
        raise AdarecError(f"{manifest_path}: export format {record.get('format')!r}, this version reads "
                          f"{FORMAT}; {again}")
    if not weights_unchanged(recorded_weights, served.weights_path):
        raise AdarecError(f"{run_dir}: the export is stale ({served.weights_path.name} changed since it was "
                          f"exported); {again}")
    if record.get("num_items") != served.num_items or record.get("model") != served.cfg.model.name:
        raise AdarecError(f"{run_dir}: the export holds {record.get('num_items')} items of model "
                          f"{record.get('model')}, the run {served.num_items} of {served.cfg.model.name}; {again}")
    built = faiss_index.read_index(index_path)
    if (built.ntotal, faiss_index.index_kind(built)) != (served.num_items, record.get("index")):
        raise AdarecError(f"{index_path}: a {faiss_index.index_kind(built)} index of {built.ntotal} items, "
                          f"export.json records a {record.get('index')} index of {served.num_items}; {again}")
    return record, built
