"""What the longer commands do once Typer has parsed their arguments: plain typed functions.

The Typer commands in cli.py only declare their options and call one function here (as spaCy's `cli/train.py`
calls `training/loop.py`); each cross-check between flags is a small named function that raises the UserError
the CLI turns into one line and exit 2. Heavy modules are imported inside the functions, so importing this
module costs no torch (`llmcli --help`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from llmcli.errors import UserError


def log(msg: str) -> None:
    """Log sink of every command: one line on stderr (stdout carries only results, e.g. a run folder)."""
    typer.echo(msg, err=True)


def quiet(msg: str) -> None:
    """Log sink of non-zero torchrun ranks."""


def config_from_flags(path: str, overrides: list[str], test_domains: str | None = None) -> Any:
    """The config at `path` with its `--set` overrides, and the `--test-domains` held out when given."""
    from llmcli.config import load_config

    cfg = load_config(Path(path), overrides)
    if test_domains is None:
        return cfg
    from llmcli.experiments.loo_table import hold_out, parse_list

    return hold_out(cfg, parse_list(test_domains, "--test-domains"))


def require_config_or_resume(command: str, folder: str, config: str | None, resume: str | None) -> None:
    """A command that starts from a CONFIG or continues a folder needs one of the two."""
    if resume is None and config is None:
        raise UserError(f"{command}: give a CONFIG, or --resume {folder}")


# ---------------------------------------------------------------- llmcli eval


def check_eval_baseline(baseline: str | None, *, classifying: bool, no_base: bool = False) -> None:
    """`--baseline` names a known baseline; it and `--no-base` go with scoring a run (not with --text / --file)."""
    from llmcli.evaluation.baseline import check_name

    check_name(baseline)
    if baseline is not None and classifying:
        raise UserError("eval: --baseline scores a run's split beside the run; drop it with --text / --file")
    if no_base and classifying:
        raise UserError("eval: --no-base skips scoring a run's base model beside its split; --text / --file "
                        "classify texts and score no base model: drop --no-base")


# ---------------------------------------------------------------- llmcli train


def check_train_flags(config: str | None, overrides: list[str], resume: str | None, test_domains: str | None,
                      loo: bool, methods: str | None, loo_dir: str | None) -> None:
    """The flag combinations `llmcli train` refuses, each message saying what to drop."""
    require_config_or_resume("train", "RUN_DIR", config, resume)
    if resume is not None and (config is not None or overrides or test_domains or loo):
        raise UserError("train: --resume continues a run with its own saved config; drop CONFIG, --set, "
                        "--test-domains and --loo")
    if not loo and (methods or loo_dir):
        raise UserError("train: --methods and --loo-dir go with --loo")
    if loo and test_domains:
        raise UserError("train: --loo holds out each domain in turn; drop --test-domains")


def train(config: str | None, overrides: list[str], *, resume: str | None, runs_dir: str, progress: bool,
          test_domains: str | None, loo: bool, methods: str | None, loo_dir: str | None) -> None:
    """`llmcli train`: one run (new or resumed) or, with `loo`, the leave-one-domain-out table; prints its folder."""
    check_train_flags(config, overrides, resume, test_domains, loo, methods, loo_dir)
    cfg = config_from_flags(config, overrides, test_domains) if config else None
    if loo:  # with a CONFIG: check_train_flags refuses --loo with --resume
        train_loo(cfg, config, overrides, methods=methods, loo_dir=loo_dir, runs_dir=runs_dir, progress=progress)
        return
    from llmcli.experiments.lodo_selection import train_and_select  # the engine, then LODO selection if asked

    main = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 alone talks to the user
    out = train_and_select(cfg, runs_dir=runs_dir, resume=resume, progress=progress and main,
                           log=log if main else quiet)
    if main:
        typer.echo(out)


def train_loo(cfg: Any, config: str | None, overrides: list[str], *, methods: str | None, loo_dir: str | None,
              runs_dir: str, progress: bool) -> None:
    """`llmcli train --loo`: one run per (method, held-out domain); on a stop, the exact command that continues."""
    from llmcli.experiments.loo_table import leave_one_out, parse_list
    from llmcli.experiments.sweep import SweepInterrupted

    names = parse_list(methods, "--methods") if methods else [cfg.dg.name]
    try:
        out = leave_one_out(cfg, names, runs_dir=runs_dir, out_dir=Path(loo_dir) if loo_dir else None,
                            progress=progress, log=log)
    except SweepInterrupted as exc:  # the command that continues the table, then exit 128 + signal
        log(f"loo: continue with: {loo_again(config, overrides, names, exc.folder)}")
        typer.echo(exc.folder)
        raise
    typer.echo((out / "loo.md").read_text(encoding="utf-8"), err=True)
    typer.echo(out)


def loo_again(config: str | None, overrides: list[str], methods: list[str], folder: Path) -> str:
    """The `llmcli train --loo` command line that finishes an interrupted table in its own folder."""
    import shlex

    return shlex.join(["llmcli", "train", str(config), *(a for s in overrides for a in ("--set", s)), "--loo",
                       "--methods", ",".join(methods), "--loo-dir", str(folder)])


# ---------------------------------------------------------------- llmcli sweep-alpha


@dataclass(frozen=True)
class SweepGrid:
    """The parsed `--alphas`, `--betas` and `--seeds` of `llmcli sweep-alpha` (None where not given)."""

    alphas: list[float] | None
    betas: list[float] | None
    seeds: list[int] | None


def parse_sweep_grid(alphas: str | None, betas: str | None, seeds: str | None) -> SweepGrid:
    """Parse the grid flags, in this order (so the first bad one is the one reported)."""
    from llmcli.experiments.sweep import parse_grid, parse_seeds

    return SweepGrid(alphas=parse_grid(alphas, "--alphas") if alphas is not None else None,
                     betas=parse_grid(betas, "--betas", 0.0, float("inf")) if betas is not None else None,
                     seeds=parse_seeds(seeds) if seeds is not None else None)


def check_sweep_flags(config: str | None, overrides: list[str], resume: str | None, grid: SweepGrid,
                      workers: int | None, mode: str, test_domains: str | None) -> None:
    """--workers at least 1; --resume takes the sweep's own grid and config, so nothing that would change them."""
    if workers is not None and workers < 1:
        raise UserError(f"--workers: must be >= 1, got {workers}")
    if resume is not None and (config is not None or overrides or grid.alphas or grid.betas or grid.seeds
                               or mode != "exact" or test_domains):
        raise UserError("sweep-alpha: --resume finishes a sweep with its own grid and config; drop the others")


def sweep_alpha(config: str | None, overrides: list[str], *, alphas: str | None, betas: str | None,
                seeds: str | None, workers: int | None, mode: str, compare: str | None, backend: str,
                ray_address: str | None, resume: str | None, runs_dir: str, progress: bool,
                test_domains: str | None) -> None:
    """`llmcli sweep-alpha`: the sweep folder on stdout, also when a point failed (exit 1) or on a stop."""
    from llmcli.experiments.sweep import sweep_alpha as run

    require_config_or_resume("sweep-alpha", "SWEEP_DIR", config, resume)
    grid = parse_sweep_grid(alphas, betas, seeds)
    check_sweep_flags(config, overrides, resume, grid, workers, mode, test_domains)
    cfg = config_from_flags(config, overrides, test_domains) if config else None
    folder_on_stdout(lambda: run(cfg, grid.alphas, betas=grid.betas, seeds=grid.seeds, workers=workers, mode=mode,
                                 backend=backend, ray_address=ray_address, compare=compare, runs_dir=runs_dir,
                                 resume=resume, progress=progress, log=log))


def folder_on_stdout(start: Callable[[], Path]) -> None:
    """Run a sweep or search and print its folder, also when some of its runs failed (exit 1) or on a stop (the
    resume command is on stderr already)."""
    from llmcli.experiments.sweep_exec import JobsFailed, SweepInterrupted

    try:
        out = start()
    except JobsFailed as exc:
        typer.echo(f"error: {exc}", err=True)
        typer.echo(exc.folder)
        raise typer.Exit(1) from None
    except SweepInterrupted as exc:
        typer.echo(exc.folder)
        raise
    typer.echo(out)


# ---------------------------------------------------------------- llmcli sweep (the Optuna search)


def check_search_flags(config: str | None, overrides: list[str], resume: str | None, params: list[str],
                       objectives: list[str], changed: list[str]) -> None:
    """A search starts from a CONFIG with --param / --objective, or continues one with --resume alone."""
    require_config_or_resume("sweep", "SEARCH_DIR", config, resume)
    if resume is not None and (config is not None or overrides or params or objectives or changed):
        raise UserError("sweep: --resume finishes a search with its own space, objectives, sampler and config; drop "
                        + ", ".join(["CONFIG"] * (config is not None) + ["--set"] * bool(overrides)
                                    + ["--param"] * bool(params) + ["--objective"] * bool(objectives) + changed))


def sweep(config: str | None, overrides: list[str], *, params: list[str], objectives: list[str], sampler: str,
          pruner: str, trials: int | None, seed: int | None, workers: int | None, backend: str,
          ray_address: str | None, resume: str | None, runs_dir: str, test_domains: str | None) -> None:
    """`llmcli sweep`: the search folder on stdout, also when a trial failed (exit 1) or on a stop."""
    from llmcli.experiments.search_space import require_optuna

    require_optuna()  # before anything else: the one line that says how to get it
    from llmcli.experiments.search import search

    changed = [flag for flag, given in (("--sampler", sampler != "tpe"), ("--pruner", pruner != "none"),
                                        ("--trials", trials is not None), ("--seed", seed is not None),
                                        ("--test-domains", test_domains is not None)) if given]
    check_search_flags(config, overrides, resume, params, objectives, changed)
    cfg = config_from_flags(config, overrides, test_domains) if config else None
    folder_on_stdout(lambda: search(cfg, params, objectives, sampler=sampler, pruner=pruner, trials=trials, seed=seed,
                                    workers=workers, backend=backend, ray_address=ray_address, resume=resume,
                                    runs_dir=runs_dir, log=log))
