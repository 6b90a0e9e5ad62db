"""Shared fixtures: the tiny config (trains in seconds) with a session-wide data cache and one trained run."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmcli.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="session")
def processed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One preprocessed-data cache for the whole session."""
    return tmp_path_factory.mktemp("processed")


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
