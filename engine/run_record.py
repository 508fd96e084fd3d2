"""run.json: what produced a run (package versions, source commit, device, command line, times).

Written by rank 0 when the run's setup has succeeded (beside config.yaml) and rewritten, always
atomically (engine/atomic_io.py), when the run ends: end_time and status ("completed", "failed"
with the error, "interrupted"). A `--resume` keeps the record of the first start (start_time,
argv, versions...) and appends one entry to "resumes" per resume: its time, command line, world
size and device, plus its versions and commit where they differ from the first start's.

Nothing here may fail a run: a package that is not installed is null, a source tree that is not a
git checkout (or a machine without git) gives the commit from the environment variable
ADAREC_COMMIT, or null.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path

RUN_RECORD = "run.json"
COMMIT_ENV = "ADAREC_COMMIT"
GIT_TIMEOUT_S = 5.0
# Distribution names per package, first installed one wins (faiss ships under several names).
_DISTRIBUTIONS = {
    "torch": ("torch",),
    "triton": ("triton", "pytorch-triton"),
    "deepspeed": ("deepspeed",),
    "numpy": ("numpy",),
    "faiss": ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss-gpu-cu11", "faiss"),
}

log = logging.getLogger("adarec.train")


def utc_now() -> str:
    """The current time as UTC ISO 8601, to the second (2026-01-31T12:00:00+00:00)."""
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


def _distribution_version(names: tuple[str, ...]) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        except Exception:       # a broken metadata folder must not end a run
            continue
    return None


def package_versions() -> dict[str, str | None]:
    """{adarec, torch, triton, deepspeed, numpy, faiss, python: version or None}. Read from the
    installed distributions' metadata, so nothing is imported (faiss stays unloaded)."""
    from adarec import __version__

    out: dict[str, str | None] = {"adarec": __version__}
    for package, names in _DISTRIBUTIONS.items():
        module = sys.modules.get(package)
        version = getattr(module, "__version__", None) if module is not None else None
        out[package] = str(version) if version is not None else _distribution_version(names)
    out["python"] = platform.python_version()
    return out


def versions_line(versions: dict[str, str | None] | None = None) -> str:
    """'adarec 0.1.0, torch 2.4.1, ..., python 3.11.9' (missing packages: 'not installed')."""
    versions = package_versions() if versions is None else versions
    return ", ".join(f"{name} {version or 'not installed'}" for name, version in versions.items())


def source_dir() -> Path:
    """The folder holding the adarec package's sources (the repository root of an editable install)."""
    import adarec

    return Path(adarec.__file__).resolve().parent


def _git(args: list[str], cwd: Path) -> str | None:
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0", GIT_TERMINAL_PROMPT="0", LC_ALL="C")
    try:
        proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=GIT_TIMEOUT_S,
                              env=env, stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.SubprocessError):     # no git, no such folder, timed out
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def source_commit(where: Path | None = None) -> dict:
    """{"commit", "dirty", "source"} of the adarec sources.

    source "git": `git rev-parse HEAD` in the package's source folder, whose __init__.py must be a
    file that repository tracks (an installed copy in a virtual environment inside some other
    repository is not that repository's checkout); dirty: tracked files modified
    (`git status --porcelain --untracked-files=no`, without taking git's index lock), None when
    that could not be read. Otherwise source "env": the ADAREC_COMMIT environment variable (set
    it when installing from a tarball or in a container), dirty None. Neither: all None.
    """
    folder = source_dir() if where is None else Path(where)
    tracked = folder.is_dir() and _git(["ls-files", "--error-unmatch", "--", "__init__.py"], folder) is not None
    commit = _git(["rev-parse", "HEAD"], folder) if tracked else None
    if commit:
        status = _git(["status", "--porcelain", "--untracked-files=no"], folder)
        return {"commit": commit, "dirty": None if status is None else bool(status), "source": "git"}
    env = os.environ.get(COMMIT_ENV, "").strip()
    if env:
        return {"commit": env, "dirty": None, "source": "env"}
    return {"commit": None, "dirty": None, "source": None}


def cpu_name() -> str:
    """The CPU model (/proc/cpuinfo's model name on Linux, else platform's processor name)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    name = line.split(":", 1)[1].strip()
                    if name:
                        return name
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_record(device) -> dict:
    """{"device", "device_name", "cuda"}: the torch device the run trains on, its name (the GPU's,
    or the CPU model) and the CUDA version torch was built with (None on a CPU build)."""
    import torch

    name = None
    if getattr(device, "type", str(device)) == "cuda":
        try:
            name = torch.cuda.get_device_name(device)
        except Exception:
            name = None
    return {"device": str(device), "device_name": name or cpu_name(), "cpu": cpu_name(),
            "cuda": torch.version.cuda}


def read_record(run_dir: Path) -> dict | None:
    path = Path(run_dir) / RUN_RECORD
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _write(run_dir: Path, record: dict) -> None:
    from .atomic_io import atomic_write_json  # imports torch: not needed by `adarec --version`

    try:
        atomic_write_json(Path(run_dir) / RUN_RECORD, record)
    except OSError as err:
        # The record describes the run; it must not end one (a full disk ends it at the checkpoint).
        log.warning("could not write %s: %s", Path(run_dir) / RUN_RECORD, err)


def start_record(run_dir: Path, *, start_time: str, resume: bool, device, precision: str, world_size: int,
                 versions: dict | None = None, git: dict | None = None, argv: list[str] | None = None) -> dict:
    """Write run.json for a run that starts (or resumes) now, and return it."""
    versions = package_versions() if versions is None else versions
    git = source_commit() if git is None else git
    argv = list(sys.argv if argv is None else argv)
    here = {"device": device_record(device), "precision": precision, "world_size": int(world_size)}
    previous = read_record(run_dir) if resume else None
    if previous is not None:
        entry = {"time": start_time, "argv": argv, **here}
        if previous.get("versions") != versions:
            entry["versions"] = versions
        if previous.get("git") != git:
            entry["git"] = git
        record = {**previous, "resumes": [*previous.get("resumes", []), entry],
                  "status": "running", "end_time": None}
    else:
        record = {"start_time": start_time, "end_time": None, "status": "running", "argv": argv,
                  "versions": versions, "git": git, "commit": git["commit"], **here, "resumes": []}
        if resume:
            # Resuming a run written before run.json existed: what started it is not known.
            record["start_time"] = None
            record["resumes"] = [{"time": start_time, "argv": argv, **here}]
    _write(run_dir, record)
    return record


def end_record(run_dir: Path, status: str, error: str | None = None) -> None:
    """Set end_time and status (and the error that ended the run) in run.json."""
    record = read_record(run_dir)
    if record is None:
        return
    record.update(end_time=utc_now(), status=status)
    if error is not None:
        record["error"] = error
    else:
        record.pop("error", None)
    _write(run_dir, record)
