"""`llmcli sweep-alpha`: map the L-vs-T trade-off over a grid of alpha (or beta) values.

Exact mode trains one run per (value, seed), each in its own child process (a crash, NaN or a killed
worker fails that point only), `--workers` at a time with the cores split between them (the points that
would leave a last round part-empty go first and share every core: `thread_plan`). Conditioned
mode trains ONE network with alpha drawn per batch and fed to the model (llmcli/experiments/conditioned_sweep.py), then
scores it at every grid value.

sweep-<ts>-<name>-<hex>/
  sweep.json        mode, variable, grid, seeds, base config: what --resume needs
  alpha-0.25-seed0/ a complete run folder per point (config, metrics, checkpoints, eval/test.json, status.json)
  conditioned/      the conditioned run (conditioned mode), with eval/test-alpha-<v>.json per grid value
  results.csv       one row per point and seed (`pareto` / `pareto_ood`: on the (ppl, acc) front, `front_flags`)
  pareto.png        in-domain and out-of-domain fronts; both modes overlaid when both exist
  summary.md        what the front shows, the best value per goal, the hypervolume

SIGINT / SIGTERM: workers run in their own process groups; the sweep passes each signal on to them once, every
cut point keeps its checkpoint (status.json `interrupted`) and the sweep exits 128 + signal naming the
`--resume` command. Bad input is refused before the sweep folder is created.

This module is the orchestrator (`sweep_alpha`) and the sweep's public names; the work is done by three modules,
one job each: sweep_grid.py (grids, seeds, point names, configs and status, the thread plan), sweep_exec.py (the
workers, signals, Ray) and sweep_report.py (rows, fronts, hypervolume, results.csv, pareto.png, summary.md).
"""

from __future__ import annotations

import shlex
import signal
from pathlib import Path
from typing import Any

from llmcli.experiments.sweep_exec import (
    Job,
    JobsFailed,
    JobSource,
    SignalCounter,
    SweepInterrupted,
    check_runner,
    job_threads,
    point_threads,
    prepare_folder,
    raise_interrupted,
    run_local,
    run_point,
    run_ray,
    signals_to,
)
from llmcli.experiments.sweep_grid import (
    MAX_POINTS,
    VARIABLES,
    check_seeds,
    default_workers,
    new_state,
    parse_alphas,
    parse_grid,
    parse_seeds,
    point_config,
    point_name,
    point_status,
    thread_plan,
)
from llmcli.experiments.sweep_report import (
    COLUMNS,
    aggregate,
    collect_rows,
    fmt,
    front_flags,
    hypervolume,
    pareto_figure,
    pareto_mask,
    reference_point,
    write_results,
)
from llmcli.files import atomic_write_json, read_json_object
from llmcli.tracking import sweep_parent

# The public names of the sweep, wherever they live (the CLI, bench/ and tests import them from here).
__all__ = ["COLUMNS", "MAX_POINTS", "VARIABLES", "SignalCounter", "SweepFailed", "SweepInterrupted", "aggregate",
           "check_seeds", "collect_rows", "default_workers", "fmt", "front_flags", "hypervolume", "new_state",
           "pareto_figure", "pareto_mask", "parse_alphas", "parse_grid", "parse_seeds", "point_config", "point_name",
           "point_status", "point_threads", "raise_interrupted", "reference_point", "run_point", "signals_to", "sweep_alpha",
           "thread_plan", "write_results"]


def sweep_alpha(cfg: Any, alphas: list[float] | None = None, *, runs_dir: str | Path = "runs",
                resume: str | Path | None = None, seeds: list[int] | None = None, betas: list[float] | None = None,
                workers: int | None = None, mode: str = "exact", backend: str = "local", ray_address: str | None = None,
                compare: str | Path | None = None, progress: bool = True, log: Any = print) -> Path:
    """Run (or finish) a sweep and write its results; returns the sweep folder.

    Raises UserError (exit 2) for bad input, before any folder is created; SweepFailed (exit 1) when some point
    failed; SweepInterrupted (exit 128 + signal) on SIGINT / SIGTERM, every point resumable with `--resume`.
    """
    from llmcli.config import validate_config
    from llmcli.runs import create_run_dir

    check_runner(backend, workers)
    if resume is not None:
        sweep_dir = Path(resume)
        state = read_json_object(sweep_dir / "sweep.json", "sweep state (is this a sweep folder?)",
                                 ("config", "variable", "grid", "seeds", "mode"))
        cfg = validate_config(state["config"], str(sweep_dir / "sweep.json"))
    else:
        state = new_state(cfg, alphas, betas, seeds, mode, compare)  # every check before the folder exists
        sweep_dir = create_run_dir(Path(runs_dir), cfg.name, prefix="sweep-")
        atomic_write_json(sweep_dir / "sweep.json", state)
    sweep_parent(sweep_dir, cfg, log)  # train.loggers has mlflow: the parent run the points' runs nest under
    log(_starting_line(sweep_dir, state))
    signum = _run_points(cfg, state, sweep_dir, workers, backend, ray_address, progress, log)
    if signum is not None:
        raise _interrupted(sweep_dir, signum, log)
    rows = collect_rows(sweep_dir, state)
    write_results(sweep_dir, state, rows)
    failed = [r for r in rows if r["status"] != "completed"]
    log(f"sweep: {len(rows) - len(failed)}/{len(rows)} points completed: {sweep_dir}")
    if failed:
        raise SweepFailed(sweep_dir, failed)
    return sweep_dir


def _starting_line(sweep_dir: Path, state: dict[str, Any]) -> str:
    """What is starting, said before the first point trains (a long sweep is never silent)."""
    nv, ns = len(state["grid"]), len(state["seeds"])
    if state["mode"] == "conditioned":
        return f"sweep: {sweep_dir}: one conditioned run, scored at {nv} {state['variable']} value(s)"
    return f"sweep: {sweep_dir}: {nv} {state['variable']} value(s) x {ns} seed(s) = {nv * ns} point(s)"


def _run_points(cfg: Any, state: dict[str, Any], sweep_dir: Path, workers: int | None, backend: str,
                ray_address: str | None, progress: bool, log: Any) -> int | None:
    """Train what is left; the signal number when SIGINT / SIGTERM cut it short, else None."""
    if state["mode"] == "conditioned":
        from llmcli.experiments.conditioned_sweep import run_conditioned

        try:
            with signals_to(raise_interrupted):  # training has its own handler; this covers the evaluations
                run_conditioned(cfg, state, sweep_dir, progress=progress, log=log)
        except KeyboardInterrupt as exc:
            return getattr(exc, "signum", signal.SIGINT)
        return None
    points = [(v, s) for v in state["grid"] for s in state["seeds"]]
    todo = [p for p in points if not _finished(sweep_dir / point_name(state["variable"], *p))]
    for p in points:
        if p not in todo:
            log(f"sweep: {point_name(state['variable'], *p)} already finished, skipped")
    if not todo:
        return None
    runner = run_ray if backend == "ray" else run_local
    workers = workers or default_workers(len(todo), cfg.train.threads)
    return runner(PointSource(cfg, state, sweep_dir, todo, log), workers, log, ray_address)


class PointSource(JobSource):
    """sweep-alpha's jobs: the points left, in grid order, each with its alpha (or beta), seed and threads."""

    def __init__(self, cfg: Any, state: dict[str, Any], sweep_dir: Path, todo: list[tuple[float, int]],
                 log: Any) -> None:
        super().__init__(sweep_dir, len(todo), cfg.train.threads)
        self.cfg, self.variable, self.todo, self.log = cfg, state["variable"], list(todo), log

    def next_threads(self, planned: int) -> int | None:
        if not self.todo:
            return None
        return job_threads(self.sweep_dir / point_name(self.variable, *self.todo[0]), planned)

    def next_job(self, threads: int) -> Job:
        value, seed = self.todo.pop(0)
        name = point_name(self.variable, value, seed)
        resume = prepare_folder(self.sweep_dir, name, self.log)
        pcfg = point_config(self.cfg, self.variable, value, seed, threads).model_dump(mode="json")
        return Job(name, pcfg, threads, resume)


class SweepFailed(JobsFailed):
    """Some points failed; the others completed and the results are written."""

    def __init__(self, sweep_dir: Path, failed: list[dict[str, Any]]) -> None:
        lines = "; ".join(f"{r['run']}: {r['error']}" for r in failed)
        super().__init__(sweep_dir, f"sweep: {len(failed)} point(s) failed ({lines}); re-run them with --resume {sweep_dir}")


def _interrupted(sweep_dir: Path, signum: int, log: Any) -> SweepInterrupted:
    msg = (f"sweep: stopped by {signal.Signals(signum).name}; finished points are kept and cut ones continue from "
           f"their last checkpoint. Sweep folder: {sweep_dir}. Continue with: "
           f"llmcli sweep-alpha --resume {shlex.quote(str(sweep_dir))}")
    log(msg)
    return SweepInterrupted(signum, msg, sweep_dir)


def _finished(point: Path) -> bool:
    status = point / "status.json"
    return status.is_file() and point_status(point).get("status") == "completed" and (point / "eval" / "test.json").is_file()
