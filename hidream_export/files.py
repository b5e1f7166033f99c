"""Writing files and folders safely: the one helper every writer in the toolchain uses. Torch-free.

- `atomic_write` / `atomic_write_json` / `atomic_open`: a fresh, unpredictable temporary file in the
  target's folder (created exclusively, so a planted link is never followed), fsynced, given the mode a
  plain `open()` would give it (0666 minus the umask: mkstemp's own 0600 would make engine files
  readable by their owner alone), then renamed over the target. Readers see the old file or the new one.
- `staged_dir` / `swap_dir`: a folder is built under a temporary name next to its destination (mode
  0777 minus the umask, not mkdtemp's 0700) and swapped in whole; the old one is moved aside first and
  removed last, so the destination is always a complete old or new folder.
- `sha256_file`, `sha256_files`, `file_record`, `verify_file`: content hashes and their checks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

from hidream_export.errors import FolderLocked, ManifestError

_CHUNK = 16 * 2**20
_UMASK_LOCK = threading.Lock()


def umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux), else set and restored
    under a lock (os.umask has no read-only form)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """What `open(path, "w")` would give a new file: 0666 minus the umask (0644 under umask 022)."""
    return 0o666 & ~umask()


def dir_mode() -> int:
    """What `mkdir` would give a new folder: 0777 minus the umask (0755 under umask 022)."""
    return 0o777 & ~umask()


# ---- files ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb", *, suffix: str = "") -> Iterator[Any]:
    """Open a temporary file beside `path` for writing; on a clean exit it is fsynced, given normal
    permissions and renamed to `path`; on an error it is removed and `path` is untouched. `suffix` keeps
    an extension for writers that choose a format by name."""
    if "w" not in mode:
        raise ValueError(f"atomic_open writes; mode {mode!r} has no 'w'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
            os.fchmod(fh.fileno(), file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write `data` (bytes, or text as UTF-8) to `path` atomically with normal permissions."""
    with atomic_open(path, "wb") as fh:
        fh.write(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def atomic_write_json(path: str | Path, data: Any, *, sort_keys: bool = False) -> Path:
    """`data` as indented JSON plus a newline, atomically (see atomic_write)."""
    return atomic_write(path, json.dumps(data, indent=2, sort_keys=sort_keys) + "\n")


def replace_file(src: str | Path, dst: str | Path) -> None:
    """Rename a finished file over `dst` after flushing it to disk, so a crash leaves the old or the new
    content, never an empty file."""
    with open(src, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(src, dst)


# ---- folders -------------------------------------------------------------------------------------

def staged_dir(parent: str | Path, name: str) -> Path:
    """A new empty folder `.NAME.*.tmp` in `parent` (created if needed), with normal permissions."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=parent))
    os.chmod(tmp, dir_mode())
    return tmp


def swap_dir(src: str | Path, dst: str | Path) -> None:
    """Put the finished folder `src` at `dst`. An existing `dst` (folder or link) is moved aside first and
    removed last, so `dst` is always either the old or the new complete folder."""
    src, dst = Path(src), Path(dst)
    old = None
    if dst.is_symlink() or dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".old", dir=dst.parent))
        os.replace(dst, old / "x")
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_tree(path: str | Path) -> None:
    """Remove a folder we wrote, or a link in its place (never what a link points to)."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def read_json_object(path: str | Path, what: str, error: type[Exception] = ManifestError) -> dict:
    """A JSON file that must hold an object; `error` naming the file and `what` it is otherwise."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise error(f"{path}: unreadable {what} ({exc})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: {what} is not a JSON object")
    return data


# ---- hashes --------------------------------------------------------------------------------------

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


def file_record(path: str | Path) -> dict:
    """{"sha256", "bytes"} of one file, as manifests record it."""
    path = Path(path)
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def verify_file(path: str | Path, sha256: str, size: int, *, check_hash: bool = True, what: str = "") -> None:
    """Raise ManifestError unless `path` is a regular file of `size` bytes (and, with check_hash, of
    SHA-256 `sha256`). Special files (FIFOs, devices) are refused before they are opened."""
    path = Path(path)
    where = f" ({what})" if what else ""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ManifestError(f"{path}: missing{where}") from None
    except OSError as exc:
        raise ManifestError(f"{path}: cannot be read{where}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ManifestError(f"{path}: not a regular file{where}")
    if st.st_size != size:
        raise ManifestError(f"{path}: {st.st_size} bytes, the manifest records {size}{where}; the folder was "
                            f"modified or partially copied")
    if check_hash and sha256_file(path) != sha256:
        raise ManifestError(f"{path}: does not match the SHA-256 the manifest records{where}; the folder was "
                            f"modified or partially copied")


# ---- one writer per output folder ----------------------------------------------------------------

LOCK_NAME = ".hidream-export.lock"
_HELD: dict[str, int] = {}  # folder -> thread holding its lock in this process
_HELD_LOCK = threading.Lock()


@contextlib.contextmanager
def folder_lock(folder: str | Path, what: str = "--out") -> Iterator[None]:
    """Hold an advisory lock on `folder` (created if needed) while a run writes into it. A second run on
    the same folder fails at once with one line naming the holder's pid, instead of both runs tripping
    over each other's temporary files. The lock dies with its process (kill -9 included)."""
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    key = os.path.realpath(folder)
    me = threading.get_ident()
    with _HELD_LOCK:
        holder = _HELD.get(key)
        if holder is None:
            _HELD[key] = me
    if holder == me:  # this thread already holds it (build -> export): flock would conflict with ourselves
        yield
        return
    if holder is not None:
        raise FolderLocked(f"{what} {folder}: another thread of this process is writing this folder")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, file_mode())
    except BaseException:
        with _HELD_LOCK:
            _HELD.pop(key, None)
        raise
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            raise FolderLocked(f"{what} {folder}: another hidream-export run (pid {holder}) is writing this folder; "
                              f"wait for it to finish or use another {what}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
        with _HELD_LOCK:
            _HELD.pop(key, None)
