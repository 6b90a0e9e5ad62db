"""Shared fixtures: the tiny config (trains in seconds) with a session-wide data cache and one trained run."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from llmcli.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="session")
def processed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One preprocessed-data cache for the whole session."""
    return tmp_path_factory.mktemp("processed")


@pytest.fixture(autouse=True)
def base_lm_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """eval's cache of base-model LM figures (llmcli/evaluation/forgetting.py) lives in the session's temp folder,
    never in the user's ~/.cache (the GGUF conversions of `$LLMCLI_CACHE` stay shared)."""
    import llmcli.evaluation.forgetting as forgetting

    folder = tmp_path_factory.getbasetemp() / "base_lm"
    monkeypatch.setattr(forgetting, "cache_root_base_lm", lambda: folder)
    return folder


@pytest.fixture(scope="session")
def tiny(processed_dir: Path):
    """Build the tiny config with extra --set overrides."""

    def make(*overrides: str):
        return load_config(TINY, [f"data.processed_dir={processed_dir}", *overrides])

    return make


@pytest.fixture(scope="session")
def tiny_run(tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny training run (shared, read-only for tests)."""
    from llmcli.training.engine import train

    return train(tiny(), runs_dir=tmp_path_factory.mktemp("runs"), progress=False, log=lambda m: None)


def refuse_writes_under(monkeypatch, root: Path) -> None:
    """Refuse every file or folder creation under `root` as a read-only folder would (simulated, so that it
    also holds as root): llmcli's atomic writes create their temp file with os.open, folders with mkdir."""
    import errno
    import os

    real_open, real_mkdir = os.open, Path.mkdir
    creating = os.O_CREAT | os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_TRUNC

    def inside(p) -> bool:
        return Path(p).resolve().is_relative_to(Path(root).resolve())

    def guarded_open(path, flags, *args, **kwargs):
        if flags & creating and inside(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    def guarded_mkdir(self, *args, **kwargs):
        if inside(self):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded_open)
    monkeypatch.setattr(Path, "mkdir", guarded_mkdir)


@contextlib.contextmanager
def read_only_tree(root: Path):
    """Make every folder under `root` read-only (0555) for the block, then writable again (non-root only)."""
    dirs = [root, *[p for p in root.rglob("*") if p.is_dir()]]
    for d in dirs:
        d.chmod(0o555)
    try:
        yield root
    finally:
        for d in dirs:
            d.chmod(0o755)


def wait_for(predicate, timeout: float = 300):
    """Poll `predicate` every 0.1 s until it gives something truthy, and return that; fail after `timeout` s."""
    import time

    t = time.time()
    while time.time() - t < timeout:
        found = predicate()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s")


def checkpoint_at(root: Path, pattern: str, step: int) -> Path | None:
    """The first checkpoint sidecar under `root` matching the glob whose step is >= `step`, else None."""
    import json

    for f in root.glob(pattern):
        try:
            if json.loads(f.read_text())["step"] >= step:
                return f
        except (OSError, ValueError, KeyError):
            pass
    return None
