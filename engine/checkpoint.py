"""The training state that travels with DeepSpeed checkpoints, and which checkpoint to trust.

A checkpoint is one tag folder (`epochN`) per member under `checkpoints/<member>/`: DeepSpeed's
files, one `rng_rank{r}.pt` per rank, and `manifest.json` (engine/manifest.py), written last by
rank 0 once every rank has finished. The manifest is the commit marker: a tag folder without a
valid manifest is not a checkpoint. `--resume` loads the newest tag that verifies for every
member and falls back past any that does not; older tags are pruned only once a newer one is
committed.
"""

from __future__ import annotations

import pickle
import random
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from adarec.errors import AdarecError

from .atomic_io import os_error_text
from .manifest import has_manifest, manifest_problem, write_manifest
from .output_dir import free_bytes_text

KEEP_TAGS = 2
"""Verified tags kept per member; older ones are pruned once a newer tag is committed."""
_TAG = re.compile(r"epoch(\d+)")


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
        reason = (f"a write came up short, as on a full disk ({free_bytes_text(ckpt_root)}; torch said: "
                  f"{str(err).strip().splitlines()[0]})")
    last = f"the last good checkpoint {kept} is kept" if kept else "there is no earlier checkpoint"
    return f"checkpoint {tag} could not be written to {ckpt_root}: {reason}; {last}"
