"""Atomic file writes and small file helpers: a reader never sees a half-written file.

Temporary files and folders are created with mode 0666 / 0777 and the kernel applies the umask (and any
default ACL), as ordinary tools do: `tempfile.mkstemp` / `mkdtemp` would make them 0600 / 0700 whatever the
umask, and once renamed into place colleagues on a shared machine could not read a run or reuse a data cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from llmcli.errors import UserError

_TRIES = 100  # random names tried before giving up (a clash is a 1 in 2**48 event)


def _temp_name(folder: Path, prefix: str, suffix: str) -> Path:
    # os.urandom, not secrets: tests patch secrets.token_hex to force run-folder name clashes
    return folder / f"{prefix}{os.urandom(6).hex()}{suffix}"


def create_temp_file(folder: Path, prefix: str, suffix: str = ".tmp") -> tuple[int, Path]:
    """A new, exclusively created file in `folder` (mode 0666 & ~umask); returns its descriptor and path."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(_TRIES):
        path = _temp_name(Path(folder), prefix, suffix)
        try:
            return os.open(path, flags, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(f"{folder}: no free temporary file name")


def create_temp_dir(folder: Path, prefix: str) -> Path:
    """A new, exclusively created folder in `folder` (mode 0777 & ~umask), to fill and rename into place."""
    for _ in range(_TRIES):
        path = _temp_name(Path(folder), prefix, "")
        try:
            path.mkdir(0o777)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{folder}: no free temporary folder name")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path` (mode 0666 & ~umask)."""
    path = Path(path)
    try:
        fd, tmp = create_temp_file(path.parent, f".{path.name}.")
    except OSError as exc:
        raise UserError(f"{path.parent}: cannot write here ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise UserError(f"{path}: write failed ({exc.strerror or exc})") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Atomically write UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    """Atomically write pretty JSON."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line and flush it to disk (a crash loses at most the line being written)."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise UserError(f"{path}: write failed ({exc.strerror or exc})") from None


def read_json(path: Path, what: str = "file") -> Any:
    """Read JSON; a missing or malformed file is a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: {what} is not valid JSON ({exc})") from None


def read_json_object(path: Path, what: str = "file", keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a JSON object holding `keys`; anything else is a UserError naming the file and what is missing."""
    obj = read_json(path, what)
    if not isinstance(obj, dict):
        raise UserError(f"{path}: {what} must be a JSON object, got {type(obj).__name__}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise UserError(f"{path}: {what} lacks {', '.join(repr(k) for k in missing)}")
    return obj


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hex sha256 of an object's canonical JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
