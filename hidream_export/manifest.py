"""`manifest.json`: what an engine folder holds and how it was made. Torch-free (the runtime reads it).

One manifest per output folder. Top level: format version, variant recipe, and `components` (transformer,
text encoders, VAE, engines), each with its files and their SHA-256, inputs/outputs, dtype and how it
was produced. Every write is atomic (temp file + rename), so a crash leaves the previous manifest intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
_CHUNK = 16 * 2**20


class ManifestError(ValueError):
    """A folder whose manifest is missing, unreadable, from a newer format, or does not match its files."""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_files(paths: list[Path], root: Path | None = None) -> str:
    """One hash over several files: names (relative to root) and contents, in sorted order."""
    h = hashlib.sha256()
    for p in sorted(paths):
        name = str(p.relative_to(root)) if root else p.name
        h.update(name.encode() + b"\0" + sha256_file(p).encode() + b"\n")
    return h.hexdigest()


def write_json_atomic(path: str | Path, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=False)
            fh.write("\n")
        # mkstemp creates 0600; a manifest is as readable as any file the user writes.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_manifest(folder: str | Path, required: bool = True) -> dict | None:
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.exists():
        if required:
            raise ManifestError(f"{folder}: no {MANIFEST_NAME}; build the folder with `hidream-export build` or `export`")
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: unreadable manifest ({exc})") from None
    version = data.get("format_version")
    if not isinstance(version, int):
        raise ManifestError(f"{path}: no integer format_version")
    if version > FORMAT_VERSION:
        raise ManifestError(
            f"{path}: manifest format {version} is newer than this hidream-export understands ({FORMAT_VERSION}); "
            f"upgrade hidream-export")
    return data


def new_manifest(variant: dict) -> dict:
    return {"format_version": FORMAT_VERSION, "variant": variant, "components": {}}


def file_hashes(folder: Path, files: list[str]) -> dict[str, dict]:
    return {f: {"sha256": sha256_file(folder / f), "bytes": (folder / f).stat().st_size} for f in files}


def verify_component(folder: str | Path, manifest: dict, name: str, check_hashes: bool = True) -> dict:
    """Check one component's files exist with their recorded sizes and (unless check_hashes is False)
    SHA-256; return its entry. Skipping hashes is for fast loads of very large folders."""
    folder = Path(folder)
    comp = manifest.get("components", {}).get(name)
    if comp is None:
        raise ManifestError(f"{folder / MANIFEST_NAME}: no component {name!r} (has {sorted(manifest.get('components', {}))})")
    for rel, info in comp.get("files", {}).items():
        path = folder / rel
        if not path.exists():
            raise ManifestError(f"{path}: missing (listed in {folder / MANIFEST_NAME} for component {name!r})")
        if path.stat().st_size != info["bytes"] or (check_hashes and sha256_file(path) != info["sha256"]):
            raise ManifestError(
                f"{path}: does not match the {'hash' if check_hashes else 'size'} recorded in "
                f"{folder / MANIFEST_NAME} (component {name!r}); the folder was modified or partially copied")
    return comp
