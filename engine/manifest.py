"""A checkpoint folder's manifest: every file with its size and sha256, the commit marker.

Written last, after every rank has saved (engine/checkpoint.py); a folder whose manifest is
missing, unreadable, or disagrees with a file (truncated, a byte flipped, missing) is not a
checkpoint. Files the manifest does not list are ignored, as are the dot-named temp files an
interrupted atomic write may leave.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .atomic_io import atomic_write_json, os_error_text

MANIFEST = "manifest.json"
_HASH_CHUNK = 1 << 20


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
