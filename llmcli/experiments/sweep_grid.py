"""The points of a sweep: the grid and seed lists a user gives, each point's name, config and status file,
the sweep state (sweep.json) and the thread plan that spreads the cores over the points. Pure bookkeeping:
nothing here trains, starts a process or writes a report."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from llmcli.errors import UserError
from llmcli.runs import timestamp

VARIABLES = {"alpha": "--alphas", "beta": "--betas"}


# Runs in one sweep (values x seeds). Each point is a whole training run (seconds on the tiny config, minutes on
# the default one), so a grid beyond this is a typo (linspace:0:1:100000), not a plan: split it into sweeps.
MAX_POINTS = 1000


def parse_grid(text: str, flag: str = "--alphas", lo: float = 0.0, hi: float = 1.0) -> list[float]:
    """'0,0.25,1' or 'linspace:0:1:9' -> sorted-as-given floats in [lo, hi], no duplicates, at most MAX_POINTS."""
    text = text.strip()
    values = _linspace(text, flag) if text.startswith("linspace:") else _number_list(text, flag)
    if len(values) > MAX_POINTS:
        raise UserError(f"{flag}: {len(values)} values; a sweep runs at most {MAX_POINTS} points (values x seeds)")
    bad = [v for v in values if not lo <= v <= hi]
    if bad:
        raise UserError(f"{flag}: every value must be in [{lo:g}, {hi:g}], got {bad}")
    if len(set(values)) != len(values):
        raise UserError(f"{flag}: {text!r} repeats a value")
    return values


def _linspace(text: str, flag: str) -> list[float]:
    parts = text.split(":")[1:]
    try:
        start, stop, num = float(parts[0]), float(parts[1]), int(parts[2])
        if len(parts) != 3 or num < 1:
            raise ValueError
    except (ValueError, IndexError):
        raise UserError(f"{flag}: {text!r} is not linspace:START:STOP:N with N >= 1, e.g. linspace:0:1:9") from None
    if num > MAX_POINTS:  # refused before building the list: linspace:0:1:1e9 must not eat the memory first
        raise UserError(f"{flag}: {text!r} asks for {num} values; a sweep runs at most {MAX_POINTS} points "
                        "(values x seeds)")
    values = [start + (stop - start) * i / max(num - 1, 1) for i in range(num)] if num > 1 else [start]
    return [round(v, 10) for v in values]


def _number_list(text: str, flag: str) -> list[float]:
    parts = [p.strip() for p in text.split(",")]
    if not text or any(not p for p in parts):
        raise UserError(f"{flag}: {text!r} is not a comma-separated list of numbers, e.g. 0,0.5,1")
    try:
        return [float(p) for p in parts]
    except ValueError:
        raise UserError(f"{flag}: {text!r} holds a value that is not a number") from None


def parse_alphas(text: str) -> list[float]:
    """The alpha grid."""
    return parse_grid(text, "--alphas")


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]; each seed in the config's range [0, SEED_MAX]."""
    try:
        seeds = [int(p) for p in text.split(",")]
    except ValueError:
        raise UserError(f"--seeds: {text!r} is not a comma-separated list of integers, e.g. 0,1,2") from None
    check_seeds(seeds)
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds: {text!r} repeats a seed")
    return seeds


def check_seeds(seeds: list[int]) -> None:
    """Every seed in [0, SEED_MAX] (the range the config's `seed` takes), at most MAX_POINTS of them."""
    from llmcli.config import SEED_MAX

    bad = [s for s in seeds if not 0 <= s <= SEED_MAX]
    if bad:
        raise UserError(f"--seeds: every seed must be an integer in [0, 2**63 - 1] (as the config's seed), got {bad}")
    if len(seeds) > MAX_POINTS:
        raise UserError(f"--seeds: {len(seeds)} seeds; a sweep runs at most {MAX_POINTS} points (values x seeds)")


def point_name(variable: str, value: float, seed: int) -> str:
    """Folder name of one point."""
    return f"{variable}-{value:g}-seed{seed}"


def default_workers(n_points: int, threads: int | None = None) -> int:
    """Every core busy, none oversubscribed: one worker per core (per `threads` cores where the base config sets
    train.threads), at most one per point."""
    return max(1, min(n_points, (os.cpu_count() or 1) // (threads or 1)))


def thread_plan(n_points: int, workers: int, cores: int, threads: int | None = None) -> list[int]:
    """Torch threads of each point, in start order.

    `threads`: the base config's train.threads, where the user set it: every point runs on that many (the
    user's choice, e.g. to leave cores to other work, beats the plan below).

    Points run `workers` at a time on cores // workers threads each. The n_points % workers points that
    would make a last, part-empty round go first instead and share every core among them: on 2 cores,
    5 points cost one point on 2 threads + 2 rounds on 1 thread (~4.3 one-run walls) instead of 3 rounds on
    1 thread (~5), since a point on one thread costs ~1.65x one on two (docs/sweeps.md).
    """
    if threads:
        return [threads] * n_points
    workers = max(1, min(workers, n_points))
    base = max(1, cores // workers)
    lead = n_points % workers
    return [max(base, cores // lead)] * lead + [base] * (n_points - lead) if lead else [base] * n_points


def point_config(cfg: Any, variable: str, value: float, seed: int, threads: int | None) -> Any:
    """The base config with this point's alpha/beta, seed and thread count."""
    objective = cfg.objective.model_copy(update={variable: value})
    train = cfg.train.model_copy(update={"threads": threads}) if threads else cfg.train
    return cfg.model_copy(update={"objective": objective, "train": train, "seed": seed,
                                  "name": f"{cfg.name}-{variable[0]}{value:g}-s{seed}"})


def new_state(cfg: Any, alphas: list[float] | None, betas: list[float] | None, seeds: list[int] | None,
               mode: str, compare: str | Path | None = None) -> dict[str, Any]:
    """A new sweep's sweep.json: mode, variable, grid, seeds, base config; every input checked before any folder."""
    if mode not in ("exact", "conditioned"):
        raise UserError(f"--mode: {mode!r} is not allowed (exact or conditioned)")
    variable, grid = _variable(cfg, alphas, betas, mode)
    seeds = seeds or [cfg.seed]
    check_seeds(seeds)
    if len(grid) * len(seeds) > MAX_POINTS:
        raise UserError(f"{VARIABLES[variable]}: {len(grid)} values x {len(seeds)} seeds = {len(grid) * len(seeds)} "
                        f"points; a sweep runs at most {MAX_POINTS} (split it into several sweeps)")
    _check_point_configs(cfg, variable, grid, seeds, mode)
    state = {"mode": mode, "variable": variable, "grid": grid, "seeds": seeds,
             "config": cfg.model_dump(mode="json"), "created": timestamp()}
    if compare is not None:
        if not (Path(compare) / "sweep.json").is_file():
            raise UserError(f"--compare: {compare} is not a sweep folder (no sweep.json)")
        state["compare_with"] = str(compare)
    return state


def _variable(cfg: Any, alphas: list[float] | None, betas: list[float] | None, mode: str) -> tuple[str, list[float]]:
    fields = type(cfg.objective).model_fields
    if betas is not None:
        if alphas is not None:
            raise UserError("--betas: sweep alpha or beta, not both")
        if "beta" not in fields:
            raise UserError(f"objective.name: --betas sweeps the bound of the constrained objective, "
                            f"not {cfg.objective.name!r}")
        if mode == "conditioned":
            raise UserError("--mode: conditioned mode sweeps alpha, not beta")
        return "beta", betas
    if "alpha" not in fields:
        raise UserError(f"objective.name: sweep-alpha needs an objective with an alpha (weighted), "
                        f"not {cfg.objective.name!r}")
    return "alpha", alphas if alphas is not None else list(cfg.sweep.alphas)


def _check_point_configs(cfg: Any, variable: str, grid: list[float], seeds: list[int], mode: str) -> None:
    """Validate the config every point (or the conditioned run) will train with, so a bad one fails up front."""
    from llmcli.config import validate_config

    if mode == "conditioned":
        from llmcli.experiments.conditioned_sweep import conditioned_config

        conditioned_config(cfg)
        return
    for value in grid:  # the seed only replaces an integer already checked: one seed per value suffices
        validate_config(point_config(cfg, variable, value, seeds[0], None).model_dump(mode="json"),
                        f"{VARIABLES[variable]} {value:g}")


def point_status(pdir: Path) -> dict[str, Any]:
    """A point's status.json ({} when missing or unreadable)."""
    try:
        status = json.loads((pdir / "status.json").read_text())
    except (OSError, ValueError):
        return {}
    return status if isinstance(status, dict) else {}
