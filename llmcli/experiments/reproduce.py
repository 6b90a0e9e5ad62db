"""`llmcli reproduce`: re-run a run's resolved config in a temporary folder and compare its metrics,
record by record, with the recorded ones (what a CI reproducibility job runs)."""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmcli.errors import UserError
from llmcli.files import read_json_object
from llmcli.runs import load_run_config, metric_lines, read_metrics


@dataclass
class Comparison:
    """The outcome: records compared, the steps covered, and the first difference (None when identical)."""

    n_records: int
    steps: int
    difference: str | None

    @property
    def ok(self) -> bool:
        """True when every record matched."""
        return self.difference is None


def _same(a: Any, b: Any, atol: float) -> bool:
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b or abs(a - b) <= atol
    return a == b


def _describe(rec: dict[str, Any]) -> str:
    return ", ".join(f"{k} {rec[k]}" for k in ("step", "split", "domain") if k in rec)


def compare(recorded: list[tuple[int, dict[str, Any]]], rerun: list[dict[str, Any]], atol: float,
            source: str = "metrics.jsonl") -> str | None:
    """The first difference between recorded and re-run records (timing keys ignored), or None."""
    from llmcli.training.engine import TIMING_KEYS

    for i in range(max(len(recorded), len(rerun))):
        if i >= len(rerun):
            lineno, rec = recorded[i]
            return f"{source}:{lineno} ({_describe(rec)}): recorded, but the re-run has no such record"
        if i >= len(recorded):
            return f"record {i + 1} ({_describe(rerun[i])}): produced by the re-run, missing from {source}"
        lineno, a = recorded[i]
        b = rerun[i]
        for key in sorted((set(a) | set(b)) - set(TIMING_KEYS)):
            if key not in a or key not in b or not _same(a[key], b[key], atol):
                return (f"{source}:{lineno} ({_describe(a)}): {key}: recorded {a.get(key, '<missing>')!r}, "
                        f"re-run {b.get(key, '<missing>')!r}")
    return None


def _no_resume_advice(log: Any, tmp: str) -> Any:
    """`log`, minus training's "continue with --resume <dir>" advice about the temporary re-run, which is deleted."""

    def filtered(msg: str) -> None:
        if tmp in msg and "--resume" in msg:
            return  # the folder named there is gone when reproduce returns; the user's own run is untouched
        log(msg)

    return filtered


def reproduce(run_dir: str | Path, *, steps: int | None = None, atol: float = 0.0, log: Any = print) -> Comparison:
    """Re-run RUN_DIR's config for its first `steps` steps (default: as far as the run got) and compare."""
    from llmcli.experiments.lodo_selection import (
        train_and_select as train,  # the engine, then LODO selection if select_by asks
    )

    run_dir = Path(run_dir)
    if not (atol >= 0 and math.isfinite(atol)):
        raise UserError(f"--atol: must be a finite number >= 0, got {atol}")
    cfg = load_run_config(run_dir)
    # the re-run is a check, not an experiment: it must not add a run to the user's MLflow store or TensorBoard
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"loggers": []})})
    metrics = run_dir / "metrics.jsonl"
    recorded = [(lineno, rec) for lineno, _, rec in metric_lines(metrics)]  # numbered: a difference names its line
    meta = read_json_object(run_dir / "meta.json", "run meta")
    reached = int(meta["step"] if isinstance(meta.get("step"), int) else max((r["step"] for _, r in recorded), default=0))
    if steps is not None and not 1 <= steps <= reached:
        raise UserError(f"--steps: must be between 1 and {reached} (the step {run_dir} reached), got {steps}")
    k = steps or reached
    if k < 1:
        raise UserError(f"{run_dir}: the run recorded no step to reproduce")
    log(f"reproduce: re-running {run_dir} for {k} of {cfg.train.steps} steps in a temporary folder (deleted after)")
    with tempfile.TemporaryDirectory(prefix="llmcli-reproduce-") as tmp:
        rerun = train(cfg, runs_dir=tmp, progress=False, log=_no_resume_advice(log, tmp),
                      stop_after=k if k < cfg.train.steps else None)
        fresh = read_metrics(rerun / "metrics.jsonl")
    mine = [(n, r) for n, r in recorded if r["step"] <= k]
    return Comparison(len(mine), k, compare(mine, fresh, atol, str(metrics)))
