"""Helpers for benchmark scripts: the JSON line format and a quiet default config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def emit(bench: str, value: float, unit: str, **extra: Any) -> None:
    """Print one figure as the design's JSON line."""
    print(json.dumps({"bench": bench, "value": round(float(value), 4), "unit": unit, **extra}), flush=True)
