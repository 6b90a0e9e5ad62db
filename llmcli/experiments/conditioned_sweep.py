"""The conditioned sweep mode: the whole front from one run ("You Only Train Once", Dosovitskiy & Djolonga, 2020).

One network is trained with the conditioned objective (llmcli/training/objectives.py: alpha drawn per batch and fed
to the model through FiLM layers, llmcli/models/film.py); then, with alpha set on the trained weights, one run
is scored at every value of the grid by `evaluate.evaluate` itself, as the exact points are.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmcli.files import atomic_write_json

# Scored on `last`: `best` is chosen on validation at the config's alpha only, so it is not the best weights
# at the other grid values, and the front must come from one set of weights (docs/sweeps.md).
CHECKPOINT = "last"


def conditioned_config(cfg: Any) -> Any:
    """The sweep's base config with its objective replaced by the conditioned one."""
    from llmcli.config import validate_config

    data = cfg.model_dump(mode="json")
    if cfg.objective.name != "conditioned":  # a conditioned objective given in the config is kept as it is
        data["objective"] = {"name": "conditioned", "alpha": 0.5,
                             "log_grad_every": getattr(cfg.objective, "log_grad_every", 50)}
    data["name"] = f"{cfg.name}-conditioned"
    return validate_config(data, "sweep (conditioned)")


def run_conditioned(cfg: Any, state: dict[str, Any], sweep_dir: Path, *, progress: bool, log: Any) -> None:
    """Train the conditioned run (unless trained) and score it at every alpha of the grid not yet scored.

    A run cut by SIGINT / SIGTERM / SIGKILL continues from its last checkpoint; one cut while being scored only
    scores the values left. Interrupted (or KeyboardInterrupt) propagates once status.json records the cut.
    """
    from llmcli.evaluation.evaluate import evaluate

    run = sweep_dir / "conditioned"
    info = _read_status(run)
    if info.get("status") not in ("trained", "completed"):
        info = _train(cfg, run, info, progress, log)
    t0 = time.perf_counter()
    for alpha in state["grid"]:
        stem = alpha_stem(alpha)
        if not (run / "eval" / f"{stem}.json").is_file():  # an atomic write: a cut evaluation leaves no file
            evaluate(run, split="test", checkpoint=CHECKPOINT, plots=False, log=lambda m: None,
                     prepare=at_alpha(alpha), stem=stem)
            log(f"sweep: conditioned run scored at alpha={alpha:g}")
    atomic_write_json(run / "status.json", {**info, "status": "completed",
                                            "eval_wall_s": round(time.perf_counter() - t0, 2)})


def alpha_stem(alpha: float) -> str:
    """The eval file stem of the conditioned run scored at one alpha: eval/test-alpha-<v>.json."""
    return f"test-alpha-{alpha:g}"


def at_alpha(alpha: float) -> Callable[[Any], dict[str, float]]:
    """An `evaluate` model hook: run the FiLM-conditioned model at this alpha (recorded as the result's condition)."""

    def prepare(model: Any) -> dict[str, float]:
        from llmcli.models.film import set_alpha

        set_alpha(model, alpha)
        return {"alpha": alpha}

    return prepare


def _read_status(run: Path) -> dict[str, Any]:
    try:
        info = json.loads((run / "status.json").read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _train(cfg: Any, run: Path, info: dict[str, Any], progress: bool, log: Any) -> dict[str, Any]:
    """Train (or continue) the conditioned run; status.json says `trained` after, `interrupted` if cut."""
    from llmcli.experiments.lodo_selection import (
        train_and_select as train,  # the engine, then LODO selection if select_by asks
    )
    from llmcli.runs import move_aside, resumable_run

    how = resumable_run(run) if run.exists() else None
    before = float(info.get("wall_s") or 0) if how else 0.0  # the cut attempt's training time counts
    if how is None:
        if run.exists():  # it failed by itself (or never checkpointed): kept aside, trained afresh
            move_aside(run)
        run.mkdir()
    elif how == "resume":
        log(f"sweep: {run} was cut off mid-run; continuing it from its last checkpoint")
    t0 = time.perf_counter()
    try:
        if how is None:
            train(conditioned_config(cfg), run_dir=run, progress=progress, log=log)
        elif how == "resume":
            train(None, resume=run, progress=progress, log=log)
    except KeyboardInterrupt:
        atomic_write_json(run / "status.json", {"status": "interrupted",
                                                "wall_s": round(before + time.perf_counter() - t0, 2)})
        raise
    info = {"status": "trained", "wall_s": round(before + time.perf_counter() - t0, 2)}
    atomic_write_json(run / "status.json", info)
    return info
