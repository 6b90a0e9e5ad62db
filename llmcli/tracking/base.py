"""The tracker contract (`Tracker`), the one tag naming of metrics.jsonl records (`metric_tags`) and the
tracking.json record of a run or sweep folder; no tracker package is imported here."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from llmcli.files import atomic_write_json, read_json_object

INSTALL = "pip install 'llmcli[track]'"
TRACKING_FILE = "tracking.json"  # in a run folder (its MLflow run) and in a sweep folder (the parent run)
# metrics.jsonl keys that say where a record belongs, not what it measured: they form the tag, never a value
PLACE_KEYS = ("step", "split", "domain")


class Tracker(ABC):
    """One tracker of one run folder: started once per process, then fed every metrics record, then closed."""

    name: str

    def __init__(self, run_dir: Path, cfg: Any) -> None:
        self.run_dir, self.cfg = Path(run_dir), cfg

    @abstractmethod
    def start(self, config: dict[str, Any], resumed_at: int | None) -> int:
        """Open (or, resuming from the checkpoint of step `resumed_at`, reopen) the run's record in the tracker.

        Returns the last step it already holds (-1: none): records up to that step are not sent to it again.
        """

    @abstractmethod
    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        """One metrics.jsonl record, as tag -> value (`metric_tags`) at the record's step."""

    def log_artifacts(self, paths: list[Path]) -> None:  # noqa: B027 - optional: TensorBoard keeps no files
        """Files of the run folder (eval JSON, PNGs) to keep beside the metrics; by default not kept."""

    @abstractmethod
    def close(self, status: str) -> None:
        """Flush and close; status is the run's meta.json status (completed, failed, interrupted, stopped)."""


def metric_tags(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record as tracker tags: `train/<key>`, `val/<domain>/<key>`; numbers only (bools as 0/1)."""
    domain = record.get("domain")
    prefix = f"{record.get('split', 'train')}/" + (f"{domain}/" if domain is not None else "")
    return {_tag(prefix + k): float(v) for k, v in record.items()
            if k not in PLACE_KEYS and isinstance(v, (int, float))}


def _tag(name: str) -> str:
    # MLflow allows letters, digits, _ - . / space and colon in a metric key; one naming for both trackers
    return re.sub(r"[^\w\-./ :]", "_", name)


def read_tracking(folder: Path) -> dict[str, Any]:
    """A folder's tracking.json (what each tracker recorded there), {} when it has none or it is unreadable."""
    path = Path(folder) / TRACKING_FILE
    if not path.is_file():
        return {}
    try:
        return read_json_object(path, "tracking record")
    except Exception:  # a damaged record: the tracker starts afresh rather than stopping anything
        return {}


def write_tracking(folder: Path, name: str, entry: dict[str, Any]) -> None:
    """Record one tracker's entry in a folder's tracking.json (atomic; the other trackers' entries kept)."""
    atomic_write_json(Path(folder) / TRACKING_FILE, {**read_tracking(folder), name: entry})
