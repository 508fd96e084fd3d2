"""Atomic writes, the training state that travels with DeepSpeed checkpoints, and the checks
that make a checkpoint trustworthy.

A checkpoint is one tag folder (`epochN`) per member under `checkpoints/<member>/`: DeepSpeed's
files, one `rng_rank{r}.pt` per rank, and `manifest.json`, written last by rank 0 once every rank
has finished. The manifest lists every file of the folder with its size and sha256; it is the
commit marker: a tag folder without a valid manifest is not a checkpoint. `--resume` loads the
newest tag that verifies for every member and falls back past any that does not.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from adarec.errors import AdarecError

MANIFEST = "manifest.json"
KEEP_TAGS = 2
"""Verified tags kept per member; older ones are pruned once a newer tag is committed."""
_TAG = re.compile(r"epoch(\d+)")
_HASH_CHUNK = 1 << 20
SPACE_MARGIN_BYTES = 64 << 20
"""Room left for logs, TensorBoard events and the temp files of atomic writes."""


def _atomic(path: Path, write) -> None:
    """Write through a temp file in the same folder, fsync, then rename over the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text: str) -> None:
    _atomic(path, lambda f: f.write(text.encode()))


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_torch_save(path, obj) -> None:
    _atomic(path, lambda f: torch.save(obj, f))


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag named in DeepSpeed's `latest` file (used only for runs saved before manifests)."""
    latest = Path(ckpt_dir) / "latest"
    return latest.read_text().strip() if latest.exists() else None


# -- tags ------------------------------------------------------------------------------------
def tag_name(epoch: int) -> str:
    return f"epoch{epoch}"


def tag_epoch(tag: str) -> int:
    return int(_TAG.fullmatch(tag).group(1))


def epoch_tags(ckpt_dir: Path) -> list[str]:
    """The epoch tag folders of one member, newest first (by epoch number, not by name)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if p.is_dir() and _TAG.fullmatch(p.name)]
    return sorted(tags, key=tag_epoch, reverse=True)


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


LOAD_ERRORS = (RuntimeError, OSError, EOFError, ValueError, KeyError, AssertionError, pickle.UnpicklingError)
"""What loading a damaged or mismatched checkpoint raises (torch.load, DeepSpeed, load_state_dict)."""


def describe_load_failure(err: BaseException, path: Path) -> str:
    lines = str(err).strip().splitlines()
    return f"checkpoint {path} could not be loaded: {type(err).__name__}: {lines[0] if lines else '(no message)'}"


def load_rank_rng(tag_dir: Path, rank: int, fallback: dict) -> dict:
    """This rank's RNG state from the tag folder; `fallback` (rank 0's state in DeepSpeed's client
    state) where the folder has none: a checkpoint written before each rank saved its own, or a
    rank the run did not have when it was saved."""
    path = Path(tag_dir) / rng_file(rank)
    if not path.exists():
        return fallback
    try:
        # weights_only=False: the state holds numpy arrays; the file is the run's own.
        return torch.load(path, weights_only=False)
    except LOAD_ERRORS as err:
        raise AdarecError(describe_load_failure(err, path)) from err


# -- manifests -------------------------------------------------------------------------------
def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _tag_files(tag_dir: Path) -> list[str]:
    """Every file of a tag folder, relative; not the manifest, nor the dot-named temp files an
    interrupted atomic write may leave."""
    return sorted(p.relative_to(tag_dir).as_posix() for p in tag_dir.rglob("*")
                  if p.is_file() and p.name != MANIFEST and not p.name.startswith("."))


def write_manifest(tag_dir: Path) -> None:
    """Record every file of tag_dir with its size and sha256, atomically: the commit marker."""
    tag_dir = Path(tag_dir)
    files = {name: {"size": (tag_dir / name).stat().st_size, "sha256": sha256_of(tag_dir / name)}
             for name in _tag_files(tag_dir)}
    atomic_write_json(tag_dir / MANIFEST, {"format": 1, "files": files})


def has_manifest(tag_dir: Path) -> bool:
    return (Path(tag_dir) / MANIFEST).is_file()


def _read_manifest(manifest: Path) -> list[tuple[str, int, str]]:
    files = json.loads(manifest.read_text())["files"]
    return [(str(name), int(entry["size"]), str(entry["sha256"])) for name, entry in files.items()]


def manifest_problem(tag_dir: Path) -> str | None:
    """None when tag_dir is a complete checkpoint: its manifest parses and lists files, and every
    file it lists is there with the recorded size and sha256. Otherwise one line, '<path>: <what
    is wrong>'. Files the manifest does not list are ignored."""
    tag_dir = Path(tag_dir)
    manifest = tag_dir / MANIFEST
    if not tag_dir.is_dir():
        return f"{tag_dir}: missing"
    if not manifest.is_file():
        return f"{tag_dir}: no manifest (incomplete save)"
    try:
        entries = _read_manifest(manifest)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"{manifest}: unreadable manifest ({type(err).__name__}: {err})"
    if not entries:
        return f"{manifest}: lists no files"
    for name, size, digest in entries:
        path = tag_dir / name
        if not path.is_file():
            return f"{path}: missing (listed in the manifest)"
        actual = path.stat().st_size
        if actual != size:
            return f"{path}: {actual} bytes, the manifest records {size} (file truncated or overwritten)"
        try:
            if sha256_of(path) != digest:
                return f"{path}: sha256 mismatch (file corrupted or truncated)"
        except OSError as err:
            return f"{path}: unreadable ({os_error_text(err)})"
    return None


# -- choosing the checkpoint to resume -------------------------------------------------------
@dataclass(frozen=True)
class ResumePoint:
    tag: str | None
    """The tag to load (None: nothing can be resumed)."""
    verified: bool
    """False only for a run saved before manifests existed, loaded as DeepSpeed's `latest`."""
    rejected: tuple[str, ...] = ()
    """'<path>: <problem>' for every tag newer than `tag` (every tag when `tag` is None)."""


def find_resume_point(member_dirs: Sequence[Path]) -> ResumePoint:
    """The newest tag whose manifest verifies in every member's folder.

    A tag missing from some member, without a manifest (an interrupted save) or failing its
    checksums is rejected, and the next older one is tried. A run saved before manifests existed
    (no tag of any member has one) falls back to the tag DeepSpeed's `latest` names, unverified.
    """
    member_dirs = [Path(d) for d in member_dirs]
    tags = sorted({t for d in member_dirs for t in epoch_tags(d)}, key=tag_epoch, reverse=True)
    rejected = []
    for tag in tags:
        problem = next((p for d in member_dirs if (p := manifest_problem(d / tag))), None)
        if problem is None:
            return ResumePoint(tag, verified=True, rejected=tuple(rejected))
        rejected.append(problem)
    legacy = _pre_manifest_tag(member_dirs)
    if legacy is not None:
        return ResumePoint(legacy, verified=False)
    return ResumePoint(None, verified=False, rejected=tuple(rejected))


def _pre_manifest_tag(member_dirs: Sequence[Path]) -> str | None:
    """DeepSpeed's `latest` tag of a run none of whose tags has a manifest, when every member has
    that tag (DeepSpeed writes `latest` only after a save has finished)."""
    if any(has_manifest(d / t) for d in member_dirs for t in epoch_tags(d)):
        return None
    latest = {latest_tag(d) for d in member_dirs}
    if len(latest) != 1:
        return None
    (tag,) = latest
    if tag is None or not all((d / tag).is_dir() for d in member_dirs):
        return None
    return tag


def describe_unresumable(ckpt_root: Path, point: ResumePoint) -> str:
    """The error of a resume that has no checkpoint to load, naming every rejected tag's problem."""
    if not point.rejected:
        return f"{Path(ckpt_root).parent}: nothing to resume (no checkpoint in {ckpt_root})"
    return (f"{ckpt_root}: no checkpoint can be resumed, every saved epoch failed verification: "
            f"{'; '.join(point.rejected)}. Restore these files from a copy, or start the run again "
            f"without --resume in a new --output-dir.")


# -- committing and pruning ------------------------------------------------------------------
def commit_tag(member_dirs: Iterable[Path], tag: str, keep: int = KEEP_TAGS) -> None:
    """Write the manifest of `tag` in every member's folder, then prune each folder. Rank 0 only,
    after every rank has written its files. Nothing is deleted before all manifests exist."""
    member_dirs = [Path(d) for d in member_dirs]
    for ckpt_dir in member_dirs:
        write_manifest(ckpt_dir / tag)
    for ckpt_dir in member_dirs:
        prune_checkpoints(ckpt_dir, tag, keep)


def prune_checkpoints(ckpt_dir: Path, newest: str, keep: int = KEEP_TAGS) -> None:
    """Keep the newest `keep` committed tags (with a manifest) up to `newest`, the tag just
    committed. Removed: older committed tags, folders without a manifest older than `newest`
    (interrupted saves), and every folder newer than `newest`, left by an attempt the run has
    since resumed from an earlier tag. DeepSpeed's `latest` file is untouched."""
    ckpt_dir = Path(ckpt_dir)
    limit = tag_epoch(newest)
    tags = epoch_tags(ckpt_dir)
    committed = [t for t in tags if tag_epoch(t) <= limit and has_manifest(ckpt_dir / t)]
    doomed = set(committed[keep:]) | (set(tags) - set(committed))
    for tag in doomed:
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)


def discard_tag(member_dirs: Iterable[Path], tag: str) -> None:
    """Remove `tag` from every member's folder, best effort (a partial or stale save)."""
    for ckpt_dir in member_dirs:
        shutil.rmtree(Path(ckpt_dir) / tag, ignore_errors=True)


# -- write failures --------------------------------------------------------------------------
def os_error_text(err: OSError) -> str:
    """'[Errno 28] No space left on device', without the file name Python appends."""
    if err.errno is not None and err.strerror:
        return f"[Errno {err.errno}] {err.strerror}"
    return str(err)


def is_write_failure(err: BaseException) -> bool:
    """An error of the file system rather than of the program: an OSError, or the RuntimeError
    torch's zip writer raises when a write comes up short (a full disk under torch.save(path))."""
    if isinstance(err, OSError):
        return True
    return isinstance(err, RuntimeError) and any(s in str(err) for s in ("PytorchStreamWriter", "inline_container"))


def describe_write_failure(err: BaseException, tag: str, ckpt_root: Path, kept: str | None) -> str:
    ckpt_root = Path(ckpt_root)
    if isinstance(err, OSError):
        reason = os_error_text(err)
    else:
        reason = (f"a write came up short, as on a full disk ({_free_bytes_text(ckpt_root)}; torch said: "
                  f"{str(err).strip().splitlines()[0]})")
    last = f"the last good checkpoint {kept} is kept" if kept else "there is no earlier checkpoint"
    return f"checkpoint {tag} could not be written to {ckpt_root}: {reason}; {last}"


def _free_bytes_text(path: Path) -> str:
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    return f"{_size_text(shutil.disk_usage(existing).free)} free there"


# -- output directory checks -----------------------------------------------------------------
def probe_output_dir(run_dir: Path) -> None:
    """Create run_dir if needed and prove it takes a write: a small file is written, fsynced and
    removed. A run that cannot write its checkpoints should fail now, not after its first epoch."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=run_dir)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(b"\0" * 4096)
                f.flush()
                os.fsync(f.fileno())
        finally:
            os.unlink(probe)
    except OSError as err:
        raise AdarecError(f"output directory {run_dir} is not writable: {os_error_text(err)}") from err


def checkpoint_bytes_estimate(modules: Iterable[torch.nn.Module], keep: int = KEEP_TAGS) -> int:
    """Disk the checkpoints of these members can occupy at once: fp32 weights and Adam's two
    moments (12 bytes a parameter) in each of the `keep` kept tags and the one being written
    before the oldest is pruned, the best weights (4 bytes a parameter), and a fixed margin."""
    params = sum(p.numel() for module in modules for p in module.parameters())
    return params * (4 * 3 * (keep + 1) + 4) + SPACE_MARGIN_BYTES


def tree_bytes(path: Path) -> int:
    path = Path(path)
    if not path.exists():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def check_free_space(run_dir: Path, need_bytes: int) -> None:
    """Stop before training when run_dir's file system has less room than need_bytes."""
    free = shutil.disk_usage(run_dir).free
    if free < need_bytes:
        raise AdarecError(
            f"output directory {run_dir} has {_size_text(free)} ({free} bytes) free, but the checkpoints "
            f"need about {_size_text(need_bytes)} ({need_bytes} bytes: weights and Adam's moments for "
            f"{KEEP_TAGS} kept epochs and the one being written); free some space or choose another --output-dir")


def _size_text(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


# -- ranks -----------------------------------------------------------------------------------
def _several_ranks() -> bool:
    return torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def sync_ranks() -> None:
    """Wait until every rank gets here (nothing to wait for in a one-process run)."""
    if _several_ranks():
        torch.distributed.barrier()


def share_from_rank0(value):
    """Rank 0's value on every rank, so that all of them act on one decision."""
    if not _several_ranks():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
