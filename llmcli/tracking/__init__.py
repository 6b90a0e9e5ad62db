"""Trackers (`train.loggers`): every record the engine appends to a run's metrics.jsonl also goes to TensorBoard
and/or MLflow, under one tag naming (`metric_tags`). docs/tracking.md has the rules.

The run folder stays the source of truth: a tracker never changes a metric, and one that fails (package missing,
store unwritable, an exception while logging) is disabled with one warning line; training goes on without it.
Nothing here imports tensorboard or mlflow at module level (`llmcli --help` and config loading stay light).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmcli.tracking.base import INSTALL, TRACKING_FILE, Tracker, metric_tags, read_tracking, write_tracking

__all__ = ["INSTALL", "TRACKERS", "TRACKING_FILE", "Tracker", "Trackers", "log_eval_artifacts", "metric_tags",
           "open_trackers", "read_tracking", "sweep_parent", "write_tracking"]

Log = Callable[[str], None]

# the trackers by `train.loggers` name: module:class, imported only when a run names it
TRACKERS = {"tensorboard": "llmcli.tracking.tensorboard:TensorBoardTracker",
            "mlflow": "llmcli.tracking.mlflow:MLflowTracker"}


class Trackers:
    """The fan-out the engine calls: each call goes to every live tracker; one that raises is disabled for good."""

    def __init__(self, trackers: list[Tracker], log: Log) -> None:
        self.log = log
        self.held: dict[Tracker, int] = {t: -1 for t in trackers}  # live trackers -> the last step each holds

    def _guard(self, tracker: Tracker, what: str, call: Callable[[], Any]) -> Any:
        """`call()`, or None after disabling `tracker` with one warning line when it raises."""
        try:
            return call()
        except Exception as exc:  # never stops training: the run folder has everything already
            self.held.pop(tracker, None)
            self.log(warning(tracker.name, f"{what} failed: {_first_line(exc)}" if not isinstance(exc, ImportError)
                             else missing_package(exc)))
            return None

    def start(self, config: dict[str, Any], resumed_at: int | None) -> None:
        """Start every tracker; those that cannot start are dropped."""
        for t in list(self.held):
            held = self._guard(t, "start", lambda t=t: t.start(config, resumed_at))
            if held is not None:
                self.held[t] = held

    def log_metrics(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl record to every tracker that does not hold its step yet."""
        values = metric_tags(record)
        for t, held in list(self.held.items()):
            if record["step"] > held and values:
                self._guard(t, "log", lambda t=t: t.log_metrics(record["step"], values))

    def log_artifacts(self, paths: list[Path]) -> None:
        """Files of the run folder to every tracker that keeps files."""
        for t in list(self.held):
            self._guard(t, "log_artifacts", lambda t=t: t.log_artifacts(paths))

    def close(self, status: str) -> None:
        """Close every tracker (once: a closed fan-out holds none)."""
        for t in list(self.held):
            self._guard(t, "close", lambda t=t: t.close(status))
        self.held.clear()


def open_trackers(names: list[str], run_dir: Path, cfg: Any, log: Log, resumed_at: int | None = None) -> Trackers:
    """The started trackers of a run (train.loggers); resuming, the records metrics.jsonl kept are sent to each
    tracker that lacks them (one whose first attempt could not start gets the whole history)."""
    built = []
    for name in names:
        module, _, cls = TRACKERS[name].partition(":")
        built.append(getattr(importlib.import_module(module), cls)(Path(run_dir), cfg))
    fan = Trackers(built, log)
    if not built:
        return fan
    fan.start(cfg.model_dump(mode="json"), resumed_at)
    if resumed_at is not None and fan.held:
        from llmcli.runs import read_metrics

        for rec in read_metrics(Path(run_dir) / "metrics.jsonl"):
            fan.log_metrics(rec)
    return fan


def warning(name: str, why: str) -> str:
    """The one line a failing tracker leaves in the log and train.log."""
    return f"train: warning: tracker {name} disabled ({why}); training goes on, the run folder keeps every metric"


def missing_package(exc: ImportError) -> str:
    """Why a tracker could not start for want of its package, with the command that installs it."""
    return f"cannot import {exc.name}: {INSTALL}" if exc.name else f"{_first_line(exc)}: {INSTALL}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def sweep_parent(sweep_dir: Path, cfg: Any, log: Log = print) -> None:
    """With mlflow in cfg.train.loggers: the sweep's parent MLflow run, created (or on resume reused) and recorded in
    <sweep_dir>/tracking.json; its points' runs nest under it. A failure is one warning line, never an error."""
    if "mlflow" not in cfg.train.loggers:
        return
    try:
        from llmcli.tracking.mlflow import open_parent

        open_parent(Path(sweep_dir), cfg)
    except Exception as exc:
        log(warning("mlflow", missing_package(exc) if isinstance(exc, ImportError) else
                    f"sweep parent run failed: {_first_line(exc)}").replace("train: ", "sweep: ", 1))


def log_eval_artifacts(run_dir: Path, paths: list[Path], log: Log = print) -> None:
    """After `llmcli eval` wrote them: the eval JSON and pictures to the run's MLflow run (when its config names
    mlflow in train.loggers and tracking.json holds the run's id). A failure is one warning line, never an error."""
    from llmcli.runs import load_run_config

    try:
        if "mlflow" not in load_run_config(Path(run_dir)).train.loggers or not paths:
            return
        from llmcli.tracking.mlflow import log_to_recorded_run

        log_to_recorded_run(Path(run_dir), paths)
    except Exception as exc:
        log(f"eval: warning: the eval files were not logged to MLflow ("
            f"{missing_package(exc) if isinstance(exc, ImportError) else _first_line(exc)}); they are in {run_dir}")
