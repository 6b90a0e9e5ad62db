"""Run folders: creation with a unique name, meta.json, and reading a run back."""

from __future__ import annotations

import json
import os
import platform
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from llmcli.errors import UserError
from llmcli.io import atomic_write_json, atomic_write_text, read_json_object


def create_run_dir(runs_dir: Path, name: str, prefix: str = "") -> Path:
    """runs/<prefix><YYYYmmdd-HHMMSS>-<name>-<4 hex>, created exclusively (two runs never share one)."""
    runs_dir = Path(runs_dir)
    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{runs_dir}: cannot create the runs folder ({exc.strerror})") from None
    for _ in range(100):
        path = runs_dir / f"{prefix}{time.strftime('%Y%m%d-%H%M%S')}-{name}-{secrets.token_hex(2)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
        except OSError as exc:
            raise UserError(f"{runs_dir}: cannot create a run folder here ({exc.strerror})") from None
    raise UserError(f"{runs_dir}: could not find a free run folder name")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def new_meta(seed: int, extra: dict[str, Any]) -> dict[str, Any]:
    """meta.json for a new run: versions, host, seed, command line, status, times."""
    import torch

    from llmcli import __version__

    return {
        "status": "running",
        "llmcli": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "git_commit": _git_commit(),
        "seed": seed,
        "command": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    }


def update_meta(run_dir: Path, **changes: Any) -> dict[str, Any]:
    """Merge changes into meta.json (atomically)."""
    path = Path(run_dir) / "meta.json"
    meta = read_json_object(path, "run meta") if path.exists() else {}
    meta.update(changes)
    atomic_write_json(path, meta)
    return meta


def load_run_config(run_dir: Path) -> Any:
    """The resolved config of a run folder; a missing folder or config is a UserError."""
    from llmcli.config import load_config

    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir}: is a file, not a run folder")
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: run folder not found")
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir}: not a run folder (no config.yaml)")
    return load_config(run_dir / "config.yaml")


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the records up to `step` (see `kept_metrics`)."""
    atomic_write_text(path, kept_metrics(path, step))


def kept_metrics(path: Path, step: int) -> str:
    """The records up to `step`: a last line cut by a crash mid-write is dropped, other bad lines are errors."""
    if not path.is_file():
        raise UserError(f"{path}: not found; the run folder is incomplete")
    lines = path.read_bytes().split(b"\n")
    kept = []
    for lineno, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            if lineno == len(lines):  # no newline after it: the append a crash interrupted
                break
            raise UserError(f"{path}:{lineno}: not a JSON record (the metrics file is damaged)") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            raise UserError(f"{path}:{lineno}: a metrics record must be an object with an integer 'step'")
        if rec["step"] <= step:
            kept.append(raw.decode("utf-8") + "\n")
    return "".join(kept)


def meta_status(pdir: Path) -> str | None:
    """The status in a run folder's meta.json (None when it is missing or unreadable)."""
    try:
        return json.loads((pdir / "meta.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def resumable_run(run: Path) -> str | None:
    """How an unfinished run folder continues: "resume" (train --resume from its last checkpoint), "evaluate"
    (its training completed: only the evaluation is left) or None (no checkpoint, or it failed by itself)."""
    if not (run / "checkpoints" / "last.safetensors").is_file():
        return None
    status = meta_status(run)
    if status == "completed":
        return "evaluate"
    return "resume" if status in ("running", "interrupted", "stopped") else None


def move_aside(run: Path) -> Path:
    """Rename an unfinished attempt to <name>.attemptN (kept, never deleted); returns the new path."""
    n = 1
    while run.with_name(f"{run.name}.attempt{n}").exists():
        n += 1
    return run.rename(run.with_name(f"{run.name}.attempt{n}"))
