"""Run folders: creation with a unique name, meta.json, and reading a run back (its checkpoint choice, its
metrics.jsonl): every command that reads a run goes through the one helper here for each of these."""

from __future__ import annotations

import json
import os
import platform
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmcli.errors import UserError
from llmcli.files import atomic_write_json, atomic_write_text, read_json_object
from llmcli.models.formats import RECORD

TIMESTAMP = "%Y-%m-%dT%H:%M:%S%z"  # meta.json's started / ended, sweep.json's created, train.log's lines


def timestamp() -> str:
    """The local time now, as every llmcli record writes it (e.g. 2026-01-31T14:05:09+0100)."""
    return time.strftime(TIMESTAMP)


def create_run_dir(runs_dir: Path, name: str, prefix: str = "") -> Path:
    """runs/<prefix><YYYYmmdd-HHMMSS>-<name>-<4 hex>, created exclusively (two runs never share one)."""
    return _reserve(Path(runs_dir), lambda: f"{prefix}{time.strftime('%Y%m%d-%H%M%S')}-{name}-{secrets.token_hex(2)}",
                    "run folder name")


def _reserve(root: Path, name: Callable[[], str], what: str) -> Path:
    """root/<name()>, created exclusively (root first, if missing); a failure is one line naming root."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{root}: cannot create the runs folder ({exc.strerror})") from None
    try:
        path = new_folder(root, name)
    except OSError as exc:
        raise UserError(f"{root}: cannot create a run folder here ({exc.strerror})") from None
    if path is None:
        raise UserError(f"{root}: could not find a free {what}")
    return path


def new_folder(root: Path, name: Callable[[], str], tries: int = 100) -> Path | None:
    """root/<name()>, created exclusively by mkdir (so the umask applies), a fresh name on a clash; None when
    `tries` names were all taken. Other OSErrors propagate (the caller names the folder in its message)."""
    for _ in range(tries):
        path = root / name()
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    return None


def staging_dir(root: Path, kind: str) -> Path:
    """A new hidden folder `root/.<kind>-<hex>.tmp` to build a derived run in (created with the umask's mode, as run
    folders are); `publish_run` then gives it its run folder name at once."""
    return _reserve(Path(root), lambda: f".{kind}-{secrets.token_hex(4)}.tmp", "temporary folder name")


def publish_run(staging: Path, root: Path, name: str, last: Callable[[Path], None] | None = None) -> Path:
    """Move a finished staging folder to a fresh run folder name (reserved empty by create_run_dir, then replaced),
    so the run appears complete at once; `last(out)` first writes what must name the final folder."""
    import contextlib

    out = create_run_dir(root, name)
    try:
        if last is not None:
            last(out)
        os.replace(staging, out)  # rename(2) onto the empty reserved folder
    except BaseException:
        with contextlib.suppress(OSError):
            out.rmdir()
        raise
    return out


DERIVED_FILES = ("config.yaml", "tokenizer.json", "data_manifest.json")  # what a derived run copies from its parent


def write_derived_run(out: Path, parent: Path, tensors: dict[str, Any], record_key: str, record: dict[str, Any], *,
                      step: int, seed: int, name: str, meta: dict[str, Any] | None = None) -> None:
    """A run made from other runs' weights (compress, soup) in folder `out`: the parent's config, tokenizer and data
    manifest, `tensors` as checkpoints/best (its sidecar: step, sha256 and the `record_key` record that says how the
    weights were made) and a completed meta.json. No metrics and no optimiser state: it cannot be resumed."""
    import shutil

    from safetensors.torch import save

    from llmcli.files import atomic_write_bytes, sha256_file

    try:
        for file in DERIVED_FILES:
            shutil.copy2(parent / file, out / file)
        (out / "checkpoints").mkdir()
    except OSError as exc:
        raise UserError(f"{out}: cannot write the new run ({exc.strerror})") from None
    ck = out / "checkpoints" / "best.safetensors"
    atomic_write_bytes(ck, save(tensors))
    atomic_write_json(ck.with_suffix(".json"), {"step": step, record_key: record, "sha256": sha256_file(ck)})
    info = new_meta(seed, {"name": name, **(meta or {}), record_key: record, "step": step, "device": "cpu"})
    atomic_write_json(out / "meta.json", {**info, "status": "completed", "ended": timestamp()})


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
        "started": timestamp(),
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


def checkpoint_names(run_dir: Path) -> list[str]:
    """The checkpoints a run folder holds (best, last, step-N), sorted; a rotated-out `.prev` copy is not one."""
    return sorted(p.name.removesuffix(".safetensors") for p in (Path(run_dir) / "checkpoints").glob("*.safetensors")
                  if not p.name.endswith(".prev.safetensors"))


def what_it_has(run_dir: Path) -> str:
    """The end of a missing-checkpoint message: the checkpoints the run does have, or why it has none."""
    have = ", ".join(checkpoint_names(run_dir))
    try:  # a compressed run (written by `llmcli compress`) has only the checkpoint it was made into
        compressed = RECORD in json.loads((Path(run_dir) / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        compressed = False
    if compressed:
        return f"a compressed run has only the checkpoint(s) it was written with: {have or 'none'}"
    return f"the run has only: {have}" if have else "has it trained?"


def choose_checkpoint(run_dir: Path, asked: str | None) -> str:
    """The checkpoint a command reads: `asked`, or when None `best` if the run has one, else `last`.

    The one place this is decided (eval, classify, compress, generate, train.init_from). The chosen checkpoint
    must exist: a run without it is a UserError naming what the run has (never a silent fall-back to another).
    """
    run_dir = Path(run_dir)
    which = asked or ("best" if (run_dir / "checkpoints" / "best.safetensors").is_file() else "last")
    if not (run_dir / "checkpoints" / f"{which}.safetensors").is_file():
        raise UserError(f"{run_dir}: no {which} checkpoint (checkpoints/{which}.safetensors); {what_it_has(run_dir)}")
    return which


def metric_lines(path: Path, *, upto_step: int | None = None) -> list[tuple[int, str, dict[str, Any]]]:
    """(line number, line, record) of every record of a metrics.jsonl, those up to `upto_step` when given.

    The one tolerance rule for every reader: a last line without its newline that does not parse is the append a
    crash interrupted, and is dropped; any other bad line is a UserError naming path:line. Blank lines are skipped.
    """
    if not path.is_file():
        raise UserError(f"{path}: not found; the run folder is incomplete")
    lines = path.read_bytes().split(b"\n")
    out = []
    for lineno, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        parsed = _metric_record(path, lineno, raw, cut=lineno == len(lines))  # no newline after it
        if parsed is None:
            break
        if upto_step is None or parsed[1]["step"] <= upto_step:
            out.append((lineno, *parsed))
    return out


def _metric_record(path: Path, lineno: int, raw: bytes, *, cut: bool) -> tuple[str, dict[str, Any]] | None:
    """One line of a metrics.jsonl as (text, record); None for a cut last line."""
    try:
        text = raw.decode("utf-8")
        rec = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        if cut:
            return None
        why = f"invalid JSON ({exc.msg})" if isinstance(exc, json.JSONDecodeError) else "not UTF-8 text"
        raise UserError(f"{path}:{lineno}: {why}; the metrics file is damaged") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
        raise UserError(f"{path}:{lineno}: a metrics record must be an object with an integer 'step'")
    return text, rec


def read_metrics(path: Path, *, upto_step: int | None = None) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (up to `upto_step`), read by `metric_lines`' one tolerance rule."""
    return [rec for _, _, rec in metric_lines(path, upto_step=upto_step)]


def kept_metrics(path: Path, step: int) -> str:
    """The text of the records up to `step`, each line as written (what a resumed run keeps)."""
    return "".join(f"{text}\n" for _, text, _ in metric_lines(path, upto_step=step))


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the records up to `step` (see `kept_metrics`)."""
    atomic_write_text(path, kept_metrics(path, step))


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
