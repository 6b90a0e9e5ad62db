"""`llmcli sweep-alpha`: map the L-vs-T trade-off over a grid of alpha (or beta) values.

Exact mode trains one run per (value, seed), each in its own child process (a crash, NaN or a killed
worker fails that point only), `--workers` at a time with the cores split between them (the points that
would leave a last round part-empty go first and share every core: `thread_plan`). Conditioned
mode trains ONE network with alpha drawn per batch and fed to the model (llmcli/conditioned.py), then
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
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shlex
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmcli.errors import Interrupted, UserError
from llmcli.io import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json, read_json_object
from llmcli.runs import meta_status, move_aside, resumable_run

COLUMNS = ("mode", "variable", "value", "seed", "status", "acc_in", "macro_f1_in", "acc_ood", "macro_f1_ood",
           "gap_acc", "ppl_in", "ppl_ood", "gap_ppl", "lm_loss_in", "task_loss_in", "grad_cosine", "pareto",
           "pareto_ood", "wall_s", "run", "error")
VARIABLES = {"alpha": "--alphas", "beta": "--betas"}


# ---------------------------------------------------------------- grids

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


def default_workers(n_points: int) -> int:
    """Every core busy, none oversubscribed: one worker per core, at most one per point."""
    return max(1, min(n_points, os.cpu_count() or 1))


def thread_plan(n_points: int, workers: int, cores: int) -> list[int]:
    """Torch threads of each point, in start order.

    Points run `workers` at a time on cores // workers threads each. The n_points % workers points that
    would make a last, part-empty round go first instead and share every core among them: on 2 cores,
    5 points cost one point on 2 threads + 2 rounds on 1 thread (~4.3 one-run walls) instead of 3 rounds on
    1 thread (~5), since a point on one thread costs ~1.65x one on two (docs/sweeps.md).
    """
    workers = max(1, min(workers, n_points))
    base = max(1, cores // workers)
    lead = n_points % workers
    return [max(base, cores // lead)] * lead + [base] * (n_points - lead) if lead else [base] * n_points


# ---------------------------------------------------------------- the sweep


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

    _check_runner(backend, workers)
    if resume is not None:
        sweep_dir = Path(resume)
        state = read_json_object(sweep_dir / "sweep.json", "sweep state (is this a sweep folder?)",
                                 ("config", "variable", "grid", "seeds", "mode"))
        cfg = validate_config(state["config"], str(sweep_dir / "sweep.json"))
    else:
        state = _new_state(cfg, alphas, betas, seeds, mode, compare)  # every check before the folder exists
        sweep_dir = create_run_dir(Path(runs_dir), cfg.name, prefix="sweep-")
        atomic_write_json(sweep_dir / "sweep.json", state)
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


def _check_runner(backend: str, workers: int | None) -> None:
    if backend not in ("local", "ray"):
        raise UserError(f"--backend: {backend!r} is not allowed (local or ray)")
    if backend == "ray":
        _check_ray()
    if workers is not None and workers < 1:
        raise UserError(f"--workers: must be >= 1, got {workers}")


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
        from llmcli.conditioned import run_conditioned

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
    runner = _run_ray if backend == "ray" else _run_local
    return runner(cfg, state, sweep_dir, todo, workers or default_workers(len(todo)), log, ray_address)


class SweepFailed(Exception):
    """Some points failed; the others completed and the results are written."""

    def __init__(self, sweep_dir: Path, failed: list[dict[str, Any]]) -> None:
        self.sweep_dir = sweep_dir
        lines = "; ".join(f"{r['run']}: {r['error']}" for r in failed)
        super().__init__(f"sweep: {len(failed)} point(s) failed ({lines}); re-run them with --resume {sweep_dir}")


class SweepInterrupted(Interrupted):
    """SIGINT / SIGTERM stopped a sweep (or a --loo table): every cut run kept a checkpoint; `folder` resumes it."""

    def __init__(self, signum: int, message: str, folder: Path) -> None:
        super().__init__(signum, message)
        self.folder = folder


def _interrupted(sweep_dir: Path, signum: int, log: Any) -> SweepInterrupted:
    msg = (f"sweep: stopped by {signal.Signals(signum).name}; finished points are kept and cut ones continue from "
           f"their last checkpoint. Sweep folder: {sweep_dir}. Continue with: "
           f"llmcli sweep-alpha --resume {shlex.quote(str(sweep_dir))}")
    log(msg)
    return SweepInterrupted(signum, msg, sweep_dir)


# ---------------------------------------------------------------- signals


@contextlib.contextmanager
def signals_to(handler: Any) -> Iterator[None]:
    """While active, SIGINT and SIGTERM call `handler(signum, frame)` (main thread only: Python's rule)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def raise_interrupted(signum: int, frame: Any) -> None:
    """A signal handler: SIGTERM stops like Ctrl-C does (an Interrupted exception naming the signal)."""
    raise Interrupted(signum, signal.Signals(signum).name)


class SignalCounter:
    """A signal handler that records the last signal and how many came, then calls `then(signum)`."""

    def __init__(self, then: Any = None) -> None:
        self.signum: int | None = None
        self.count = 0
        self.then = then

    def __call__(self, signum: int, frame: Any) -> None:
        self.signum, self.count = signum, self.count + 1
        if self.then is not None:
            self.then(signum)


def _new_state(cfg: Any, alphas: list[float] | None, betas: list[float] | None, seeds: list[int] | None,
               mode: str, compare: str | Path | None = None) -> dict[str, Any]:
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
             "config": cfg.model_dump(mode="json"), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
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
        from llmcli.conditioned import conditioned_config

        conditioned_config(cfg)
        return
    for value in grid:  # the seed only replaces an integer already checked: one seed per value suffices
        validate_config(point_config(cfg, variable, value, seeds[0], None).model_dump(mode="json"),
                        f"{VARIABLES[variable]} {value:g}")


def _finished(point: Path) -> bool:
    status = point / "status.json"
    return status.is_file() and _status(point).get("status") == "completed" and (point / "eval" / "test.json").is_file()


def point_config(cfg: Any, variable: str, value: float, seed: int, threads: int | None) -> Any:
    """The base config with this point's alpha/beta, seed and thread count."""
    objective = cfg.objective.model_copy(update={variable: value})
    train = cfg.train.model_copy(update={"threads": threads}) if threads else cfg.train
    return cfg.model_copy(update={"objective": objective, "train": train, "seed": seed,
                                  "name": f"{cfg.name}-{variable[0]}{value:g}-s{seed}"})


def run_point(cfg_json: dict[str, Any], point: str, sweep_dir: str, resume: bool = False) -> None:
    """Train and evaluate one point in this process; write status.json either way (the worker body).

    resume: continue the point's run from its last checkpoint (exact resume), or only evaluate it when its
    training had completed. SIGINT / SIGTERM leave status `interrupted` and exit 128 + signal: resumable.
    """
    from llmcli.config import validate_config
    from llmcli.evaluate import evaluate
    from llmcli.selection import train_and_select as train  # the engine, then LODO selection if select_by asks

    pdir = Path(sweep_dir) / point
    before = float(_status(pdir).get("wall_s") or 0) if resume else 0.0  # an interrupted attempt's wall counts
    t0 = time.perf_counter()

    def wall() -> float:
        return round(before + time.perf_counter() - t0, 2)

    try:
        cfg = validate_config(cfg_json, point)
        if not resume:
            train(cfg, run_dir=pdir, progress=False, log=lambda m: None)
        elif meta_status(pdir) != "completed":  # a completed run was cut during its evaluation: only evaluate
            train(None, resume=pdir, progress=False, log=lambda m: None)
        train_wall = wall()
        evaluate(pdir, split="test", log=lambda m: None)
    except KeyboardInterrupt as exc:  # SIGINT / SIGTERM (the train loop checkpointed first): resumable
        signum = getattr(exc, "signum", signal.SIGINT)
        atomic_write_json(pdir / "status.json", {"status": "interrupted", "signal": signal.Signals(signum).name,
                                                 "wall_s": wall()})
        raise SystemExit(128 + signum) from None
    except BaseException as exc:  # the point fails; the sweep goes on
        last = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        atomic_write_json(pdir / "status.json", {"status": "failed", "error": f"{type(exc).__name__}: {last}",
                                                 "wall_s": wall()})
        raise SystemExit(1) from None
    atomic_write_json(pdir / "status.json", {"status": "completed", "wall_s": wall(), "train_wall_s": train_wall,
                                             "resumed": resume})


def _child(cfg_json: dict[str, Any], point: str, sweep_dir: str, resume: bool) -> None:
    _die_with_parent()
    # Its own process group: a Ctrl-C in the terminal reaches the sweep alone, which passes it on exactly once
    # (a worker that got it from the terminal AND from the sweep would take the second as "stop now").
    os.setpgid(0, 0)
    signal.signal(signal.SIGTERM, raise_interrupted)  # outside training (evaluation) SIGTERM stops as SIGINT does
    signal.signal(signal.SIGINT, raise_interrupted)
    run_point(cfg_json, point, sweep_dir, resume)


def _die_with_parent() -> None:
    """Linux: if the sweep process is killed, its workers die too (no orphan writing into a point)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _status(pdir: Path) -> dict[str, Any]:
    """A point's status.json ({} when missing or unreadable)."""
    try:
        status = json.loads((pdir / "status.json").read_text())
    except (OSError, ValueError):
        return {}
    return status if isinstance(status, dict) else {}


def _resumable(pdir: Path) -> bool:
    """Whether an unfinished point was cut from outside (its worker or the sweep killed, or SIGINT / SIGTERM)
    and left a checkpoint: then it continues from there. A point that failed by itself (an exception,
    a NaN) would fail the same way again from its checkpoint, so it starts over instead."""
    status = _status(pdir) if (pdir / "status.json").exists() else {}
    if (pdir / "status.json").exists() and not status:
        return False  # unreadable: start over (the folder is kept aside)
    cut = not status or status.get("status") in ("interrupted", "completed") \
        or str(status.get("error", "")).startswith("worker killed")
    return cut and resumable_run(pdir) is not None


def _prepare_point(sweep_dir: Path, name: str, log: Any = print) -> bool:
    """Get a point's folder ready; True when it continues an earlier attempt from its last checkpoint.

    Otherwise the point gets a fresh folder and an unfinished earlier attempt is kept aside, never deleted.
    """
    pdir = sweep_dir / name
    if _resumable(pdir):
        step = _checkpoint_step(pdir)
        log(f"sweep: {name} was cut off mid-run; continuing it from its last checkpoint"
            + (f" (step {step})" if step is not None else ""))
        return True
    if pdir.is_dir() and not any(pdir.iterdir()):
        return False  # an empty folder (cut before it started): nothing to keep aside
    if pdir.exists():
        move_aside(pdir)
    pdir.mkdir()
    return False


def _checkpoint_step(run: Path) -> int | None:
    try:
        return int(json.loads((run / "checkpoints" / "last.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _run_local(cfg: Any, state: dict[str, Any], sweep_dir: Path, todo: list[tuple[float, int]], workers: int,
               log: Any, _address: str | None) -> int | None:
    """Run the points in spawned workers; the signal number if SIGINT / SIGTERM stopped the sweep, else None.

    A signal is passed on to every running worker (each stops after its current step with a checkpoint,
    as `train` does), no new point starts, and the sweep waits for the workers to exit.
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    cores = os.cpu_count() or 1
    plan = thread_plan(len(todo), workers, cores)
    base = plan[-1]
    capacity = max(cores, min(workers, len(todo)) * base)  # more workers than cores: oversubscribed, as asked
    lead = len(todo) - plan.count(base)
    log(f"sweep: {len(todo)} point(s) to run, {workers} worker(s) x {base} thread(s)"
        + (f"; first {lead} point(s) on {plan[0]} thread(s) each, so that no round runs part-empty" if lead else ""))
    queue = point_threads(sweep_dir, state, todo, plan)
    running: dict[str, tuple[Any, int]] = {}  # point -> (process, its threads)
    stop = SignalCounter(lambda signum: _forward(signum, running))
    done = 0
    with signals_to(stop):
        while running or (queue and stop.signum is None):
            while stop.signum is None and queue and len(running) < workers:
                (value, seed), threads = queue[0]
                if running and sum(t for _, t in running.values()) + threads > capacity:
                    break  # wait for cores to free up
                queue.pop(0)
                name = point_name(state["variable"], value, seed)
                resume = _prepare_point(sweep_dir, name, log)
                pcfg = point_config(cfg, state["variable"], value, seed, threads).model_dump(mode="json")
                proc = ctx.Process(target=_child, args=(pcfg, name, str(sweep_dir), resume), daemon=False)
                proc.start()
                running[name] = (proc, threads)
            time.sleep(0.2)
            for name in [n for n, (p, _) in running.items() if not p.is_alive()]:
                proc = running.pop(name)[0]
                proc.join()
                done += 1
                log(f"sweep: [{done}/{len(todo)}] {name}: " + _point_outcome(sweep_dir / name, proc.exitcode))
    return stop.signum


def _forward(signum: int, running: dict[str, tuple[Any, int]]) -> None:
    """Pass a signal the sweep got on to its workers (their own process groups do not get the terminal's)."""
    for proc, _ in list(running.values()):
        try:
            os.kill(proc.pid, signum)
        except (OSError, TypeError):  # already gone, or not started yet (pid None)
            pass


def _point_outcome(pdir: Path, exitcode: int | None) -> str:
    """Record how a worker ended when it could not say so itself; one phrase for the log."""
    status = pdir / "status.json"
    if exitcode and exitcode < 0 and not status.is_file():
        atomic_write_json(status, {"status": "failed", "error": f"worker killed by signal {-exitcode}"})
    elif not status.is_file():  # e.g. stopped by a signal before its run began: no checkpoint, it starts afresh
        atomic_write_json(status, {"status": "failed", "error": f"worker exited ({exitcode}) before its run began"})
    info = _status(pdir)
    if info.get("status") == "completed":
        return f"completed in {fmt('wall_s', info.get('wall_s'))} s"
    if info.get("status") == "interrupted":
        step = _checkpoint_step(pdir)
        return f"interrupted ({info.get('signal')}), checkpoint kept" + (f" at step {step}" if step is not None else "")
    return f"{info.get('status', 'failed')} ({info.get('error')})"


def point_threads(sweep_dir: Path, state: dict[str, Any], todo: list[tuple[float, int]],
                  plan: list[int]) -> list[tuple[tuple[float, int], int]]:
    """Each point to run with its threads: the plan's, or for a point that continues from its checkpoint the
    threads it started with (its run folder's config decides them, so the core budget must count those)."""
    out = []
    for point, threads in zip(todo, plan):
        pdir = sweep_dir / point_name(state["variable"], *point)
        out.append((point, _saved_threads(pdir, threads) if _resumable(pdir) else threads))
    return out


def _saved_threads(pdir: Path, default: int) -> int:
    """The torch threads a point's run folder was started with (its config.yaml), else `default`."""
    import yaml

    try:
        threads = yaml.safe_load((pdir / "config.yaml").read_text())["train"]["threads"]
    except (OSError, ValueError, TypeError, KeyError, yaml.YAMLError):
        return default
    return threads if isinstance(threads, int) and threads >= 1 else default


def _check_ray() -> None:
    try:
        import ray  # noqa: F401
    except ImportError:
        raise UserError("--backend: ray is not installed; pip install 'llmcli[ray]'") from None


def _run_ray(cfg: Any, state: dict[str, Any], sweep_dir: Path, todo: list[tuple[float, int]], workers: int,
             log: Any, address: str | None) -> int | None:
    """The points as Ray tasks; on SIGINT / SIGTERM the tasks are cancelled (a KeyboardInterrupt in each,
    which `train` turns into meta `interrupted` after its last checkpoint) and the signal number returned."""
    import ray

    import llmcli

    # A local instance gets this process's llmcli on its workers' path; a cluster's nodes must have
    # llmcli installed (pip install 'llmcli[ray]') and see the sweep folder (shared storage).
    local_env = {"env_vars": {"PYTHONPATH": str(Path(llmcli.__file__).resolve().parents[1])}}
    ray.init(address=address, num_cpus=None if address else (os.cpu_count() or 1), include_dashboard=False,
             ignore_reinit_error=True, log_to_driver=False, runtime_env=None if address else local_env)
    plan = thread_plan(len(todo), workers, max(1, int(ray.available_resources().get("CPU", 1))))
    remote = ray.remote(max_retries=0)(_ray_point)
    refs = {}
    for (value, seed), cpus in zip(todo, plan):  # Ray starts each task when its CPUs are free
        name = point_name(state["variable"], value, seed)
        resume = _prepare_point(sweep_dir, name, log)
        pcfg = point_config(cfg, state["variable"], value, seed, cpus).model_dump(mode="json")
        refs[remote.options(num_cpus=cpus).remote(pcfg, name, str(sweep_dir), resume)] = name
    pending, stop, cancelled = list(refs), SignalCounter(), False
    with signals_to(stop):
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=0.5)
            if stop.signum is not None and not cancelled:
                for ref in pending:
                    ray.cancel(ref, force=False)
                cancelled = True
            for ref in ready:
                _ray_outcome(ref, sweep_dir / refs[ref], stop.signum, log)
    return stop.signum


def _ray_outcome(ref: Any, pdir: Path, signum: int | None, log: Any) -> None:
    import ray

    try:
        ray.get(ref)
    except Exception as exc:  # a task that died (or was cancelled) without writing its status
        if not (pdir / "status.json").is_file():
            info = {"status": "interrupted", "signal": signal.Signals(signum).name} if signum is not None \
                else {"status": "failed", "error": str(exc).strip().splitlines()[-1]}
            atomic_write_json(pdir / "status.json", info)
    log(f"sweep: {pdir.name}: {_status(pdir).get('status', 'failed')}")


def _ray_point(cfg_json: dict[str, Any], point: str, sweep_dir: str, resume: bool) -> None:
    try:
        run_point(cfg_json, point, sweep_dir, resume)
    except SystemExit:
        pass  # the failure is in status.json


# ---------------------------------------------------------------- results


def _summarise_eval(result: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    dom = result["domains"]
    ind = [dom[d] for d in result["in_domain"] if d in dom]
    ood = [dom[d] for d in result["out_of_domain"]]

    def mean(rows: list[dict[str, float]], key: str) -> float | None:
        vals = [r[key] for r in rows if key in r]
        return float(np.mean(vals)) if vals else None

    gap = result["gap"].get("mean", {})
    return {"acc_in": mean(ind, "acc"), "macro_f1_in": mean(ind, "macro_f1"), "acc_ood": mean(ood, "acc"),
            "macro_f1_ood": mean(ood, "macro_f1"), "gap_acc": gap.get("gap_acc"), "gap_ppl": gap.get("gap_ppl"),
            "ppl_in": mean(ind, "ppl"), "ppl_ood": mean(ood, "ppl"), "lm_loss_in": mean(ind, "lm_loss"),
            "task_loss_in": mean(ind, "task_loss")}


def _mean_grad_cosine(run: Path) -> float | None:
    vals = [r["grad_cosine"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "grad_cosine" in r]
    return sum(vals) / len(vals) if vals else None


def collect_rows(sweep_dir: Path, state: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per point (exact) or grid value (conditioned), rebuilt from the folders on disk."""
    if state["mode"] == "conditioned":
        return _conditioned_rows(sweep_dir, state)
    var = state["variable"]
    rows = []
    for v in state["grid"]:
        for s in state["seeds"]:
            name = point_name(var, v, s)
            pdir = sweep_dir / name
            base = {"mode": "exact", "variable": var, "value": v, "seed": s, "run": name}
            status = _status(pdir) if (pdir / "status.json").is_file() else None
            if status and status.get("status") == "completed":
                rows.append({**base, "status": "completed", **_summarise_eval(read_json(pdir / "eval" / "test.json")),
                             "grad_cosine": _mean_grad_cosine(pdir), "wall_s": status.get("wall_s"), "error": ""})
            elif status and status.get("status") == "interrupted":
                rows.append({**base, "status": "interrupted", "error": f"stopped by {status.get('signal')}; "
                             "--resume continues it from its checkpoint"})
            else:
                rows.append({**base, "status": status.get("status", "failed") if status else "missing",
                             "error": status.get("error", "") if status else "never ran or was interrupted"})
    return rows


def _conditioned_rows(sweep_dir: Path, state: dict[str, Any]) -> list[dict[str, Any]]:
    run = sweep_dir / "conditioned"
    rows = []
    for v in state["grid"]:
        f = run / "eval" / f"test-alpha-{v:g}.json"
        base = {"mode": "conditioned", "variable": state["variable"], "value": v, "seed": state["seeds"][0],
                "run": run.name}
        if f.is_file():
            rows.append({**base, "status": "completed", **_summarise_eval(read_json(f)),
                         "grad_cosine": _mean_grad_cosine(run), "wall_s": _status(run).get("wall_s")})
        else:
            rows.append({**base, "status": "missing", "error": "not evaluated"})
    return rows


def pareto_mask(points: list[tuple[float, float]]) -> list[bool]:
    """Non-dominated points when both coordinates are minimised."""
    return [not any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in points) for p in points]


FRONT_AXES = {"in": "in-domain perplexity (lower is better) and task accuracy (higher is better)",
              "ood": "out-of-domain perplexity and accuracy (means over the OOD domains)"}


def front_flags(agg: list[dict[str, Any]], where: str = "in") -> dict[float, bool]:
    """value -> on the Pareto front: seed means non-dominated on (ppl_<where> minimised, acc_<where> maximised).

    The one definition: results.csv's `pareto` (where="in") and `pareto_ood` columns, summary.md's front and
    the coloured points of pareto.png all come from here. Values without both metrics are left out.
    """
    rows = [a for a in agg if a.get(f"ppl_{where}") is not None and a.get(f"acc_{where}") is not None]
    mask = pareto_mask([(a[f"ppl_{where}"], -a[f"acc_{where}"]) for a in rows])
    return {a["value"]: f for a, f in zip(rows, mask)}


AGGREGATED = ("acc_in", "acc_ood", "gap_acc", "ppl_in", "ppl_ood", "gap_ppl", "lm_loss_in", "task_loss_in",
              "grad_cosine", "wall_s")


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std over seeds per value (completed rows only)."""
    import numpy as np

    out = []
    for v in dict.fromkeys(r["value"] for r in rows):
        group = [r for r in rows if r["value"] == v and r["status"] == "completed"]
        if not group:
            continue
        agg: dict[str, Any] = {"value": v, "n": len(group)}
        for k in AGGREGATED:
            vals = [r[k] for r in group if r.get(k) is not None]
            agg[k] = float(np.mean(vals)) if vals else None
            agg[f"{k}_std"] = float(np.std(vals)) if len(vals) > 1 else 0.0
        out.append(agg)
    return out


def hypervolume(points: list[tuple[float, float]], ref: tuple[float, float]) -> float:
    """Area dominated by the points (both minimised) up to the reference point (pymoo).

    Dominated points add nothing, so the hypervolume of all points is that of their non-dominated subset.
    """
    import numpy as np
    from pymoo.indicators.hv import HV

    inside = [p for p in points if p[0] < ref[0] and p[1] < ref[1]]
    return float(HV(ref_point=np.array(ref))(np.array(inside))) if inside else 0.0


def _loss_points(agg: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """The (in-domain lm_loss, task_loss) seed means the hypervolume is measured on."""
    return [(a["lm_loss_in"], a["task_loss_in"]) for a in agg
            if a.get("lm_loss_in") is not None and a.get("task_loss_in") is not None]


def reference_point(aggs: list[list[dict[str, Any]]]) -> tuple[float, float]:
    """10 % beyond the worst lm_loss and task_loss seen in any of the fronts compared."""
    pts = [p for agg in aggs for p in _loss_points(agg)]
    return (max(p[0] for p in pts) * 1.1, max(p[1] for p in pts) * 1.1)


def write_results(sweep_dir: Path, state: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """results.csv, pareto.png and summary.md from the rows (and the other mode's rows, if present)."""
    agg = aggregate(rows)
    front_in, front_ood = front_flags(agg, "in"), front_flags(agg, "ood")
    for r in rows:
        done = r["status"] == "completed"
        r["pareto"] = front_in.get(r["value"], "") if done else ""
        r["pareto_ood"] = front_ood.get(r["value"], "") if done else ""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(sweep_dir / "results.csv", buf.getvalue())
    if not agg:
        return
    other = _other_mode(sweep_dir, state)
    _plot(sweep_dir, state, agg, other)
    atomic_write_text(sweep_dir / "summary.md", _summary(sweep_dir, state, rows, agg, other))


def _other_mode(sweep_dir: Path, state: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The conditioned front beside an exact sweep, or the reverse, when `compare_with` names one."""
    other = state.get("compare_with")
    if not other or not (Path(other) / "sweep.json").is_file():
        return None
    ostate = read_json(Path(other) / "sweep.json")
    return aggregate(collect_rows(Path(other), ostate)) or None


# ---------------------------------------------------------------- pareto.png


def _plot(sweep_dir: Path, state: dict[str, Any], agg: list[dict[str, Any]], other: list[dict[str, Any]] | None) -> None:
    import matplotlib.pyplot as plt

    fig = pareto_figure(sweep_dir.name, state, agg, other)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(sweep_dir / "pareto.png", buf.getvalue())


def pareto_figure(title: str, state: dict[str, Any], agg: list[dict[str, Any]],
                  other: list[dict[str, Any]] | None) -> Any:
    """The figure of pareto.png: in-domain and OOD panels, this sweep's front and the compared one's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    var = "α" if state["variable"] == "alpha" else "β"
    other_mode = "conditioned" if state["mode"] == "exact" else "exact"
    # (rows, name, colour, marker, label offset in points): the compared front is labelled below its points
    series = [(agg, state["mode"], "C0", "o", (6, 5))] + ([(other, other_mode, "C3", "s", (6, -12))] if other else [])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), sharey=True)
    for ax, where, panel in zip(axes, ("in", "ood"), ("in-domain", "out-of-domain (mean)")):
        spans = _spans([a for data, *_ in series for a in data], where)
        for data, name, color, marker, offset in series:
            _draw_front(ax, data, where, (name, color, marker, offset), var, spans)
        _style_axis(ax, panel, spans)
    axes[0].set_ylabel("task accuracy (higher is better)")
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle(f"L vs T trade-off over {var}: {title}\ncoloured = Pareto front of the panel "
                 "(perplexity ↓, accuracy ↑; results.csv pareto / pareto_ood), grey = dominated", fontsize=9)
    fig.tight_layout()
    return fig


def _spans(rows: list[dict[str, Any]], where: str) -> tuple[float, float, float, float]:
    """(log10 x min, log10 x max, y min, y max) of a panel's points, every series together."""
    import math

    pts = [(math.log10(a[f"ppl_{where}"]), a[f"acc_{where}"]) for a in rows
           if a.get(f"ppl_{where}") and a.get(f"acc_{where}") is not None]
    xs, ys = [p[0] for p in pts] or [0.0], [p[1] for p in pts] or [0.0]
    return min(xs), max(xs), min(ys), max(ys)


def _draw_front(ax: Any, data: list[dict[str, Any]], where: str, look: tuple[str, str, str, tuple[int, int]],
                var: str, spans: tuple[float, float, float, float]) -> None:
    """One series: its points (coloured on the front, grey edged in its colour off it), the front line, labels."""
    name, color, marker, offset = look
    acc, ppl = f"acc_{where}", f"ppl_{where}"
    flags = front_flags(data, where)
    rows = [a for a in data if a["value"] in flags]
    for a in rows:
        on = flags[a["value"]]
        ax.errorbar(a[ppl], a[acc], xerr=a[f"{ppl}_std"] or None, yerr=a[f"{acc}_std"] or None, fmt=marker,
                    color=color if on else "0.75", mec=color, ecolor=color if on else "0.75", zorder=4 if on else 3,
                    ms=6, capsize=3)  # front points on top: a cluster of dominated ones never hides them
    front = sorted((a for a in rows if flags[a["value"]]), key=lambda a: a[ppl])
    ax.plot([a[ppl] for a in front], [a[acc] for a in front], color=color, lw=1.5, marker=marker, ms=0,
            label=f"{name} front")
    for x, y, text in _label_groups([(a[ppl], a[acc], a["value"]) for a in rows], spans):
        ax.annotate(f"{var}={text}", (x, y), textcoords="offset points", xytext=offset, fontsize=8, color=color,
                    annotation_clip=False)


def _label_groups(points: list[tuple[float, float, float]],
                  spans: tuple[float, float, float, float]) -> list[tuple[float, float, str]]:
    """(x, y, value) points close enough for their labels to print over each other share one label ("0.5, 0.75")."""
    import math

    x_unit = max(spans[1] - spans[0], 1e-9) * 0.07  # 7 % of the panel's width (log x) / 5 % of its height
    y_unit = max(spans[3] - spans[2], 1e-9) * 0.05
    groups: list[tuple[float, float, list[float]]] = []
    for x, y, value in sorted(points, key=lambda p: (p[0], -p[1])):
        near = next((g for g in groups if abs(math.log10(x) - math.log10(g[0])) < x_unit and abs(y - g[1]) < y_unit),
                    None)
        if near:
            near[2].append(value)
        else:
            groups.append((x, y, [value]))
    out = []
    for x, y, values in groups:
        vs = [f"{v:g}" for v in sorted(values)]
        out.append((x, y, ", ".join(vs) if len(vs) <= 3 else f"{vs[0]} … {vs[-1]} ({len(vs)} values)"))
    return out


def _style_axis(ax: Any, title: str, spans: tuple[float, float, float, float]) -> None:
    """Log x with plain tick labels (no overlapping 2×10²-style minor labels) and room for every point's label."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    lo, hi, ylo, yhi = spans
    pad = max(hi - lo, 0.05) * 0.08  # in decades: a point never sits on the frame
    ax.set_xscale("log")
    ax.set_xlim(10 ** (lo - pad), 10 ** (hi + 3 * pad))  # the labels print to the right of their points
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ypad = max(yhi - ylo, 0.02) * 0.12
    ax.set_ylim(min(ax.get_ylim()[0], ylo - ypad), max(ax.get_ylim()[1], yhi + ypad))
    ax.set_xlabel("perplexity (lower is better, log scale)")
    ax.set_title(title)
    ax.grid(alpha=0.3)


# ---------------------------------------------------------------- summary.md

# How each metric is printed for a person (results.csv keeps 6 significant digits for machines).
_FORMATS = (("gap_ppl", "+.1f"), ("gap_", "+.3f"), ("acc", ".3f"), ("macro_f1", ".3f"), ("ppl", ".1f"), ("loss", ".3f"),
            ("grad_cosine", "+.3f"), ("wall_s", ".1f"), ("hypervolume", ".4f"))


def fmt(key: str, x: Any, std: Any = None) -> str:
    """A metric as summary.md and the log print it: acc 3 decimals, ppl 1, gaps signed (acc 3, ppl 1), seconds 1."""
    if x is None:
        return "-"
    spec = next((f for k, f in _FORMATS if k in key), ".4g")
    return format(x, spec) + (f" ± {format(std, spec.lstrip('+'))}" if std else "")


def _summary(sweep_dir: Path, state: dict[str, Any], rows: list[dict[str, Any]], agg: list[dict[str, Any]],
             other: list[dict[str, Any]] | None) -> str:
    var = state["variable"]
    ok = sum(r["status"] == "completed" for r in rows)
    front = front_flags(agg, "in")
    lines = [f"# Sweep {sweep_dir.name}", "",
             f"Mode: {state['mode']}; {var} grid: {', '.join(f'{v:g}' for v in state['grid'])}; "
             f"seeds: {', '.join(map(str, state['seeds']))}. {ok}/{len(rows)} points completed.", "",
             f"Pareto front (results.csv `pareto`, the coloured points of pareto.png's in-domain panel): the seed means "
             f"non-dominated on {FRONT_AXES['in']}: " + ", ".join(f"{var}={v:g}" for v, f in front.items() if f) + ".",
             *_hypervolume_lines(state, agg, other), "", *_best_table(var, agg), "", *_metric_table(var, agg)]
    failed = [r for r in rows if r["status"] != "completed"]
    if failed:
        lines += ["", "Failed, interrupted or missing points (re-run with `--resume`):", ""]
        lines += [f"- {r['run']}: {r['status']}: {r.get('error', '')}" for r in failed]
    lines += ["", "![Pareto front](pareto.png)", ""]
    return "\n".join(lines)


def _hypervolume_lines(state: dict[str, Any], agg: list[dict[str, Any]], other: list[dict[str, Any]] | None) -> list[str]:
    ref = reference_point([agg] + ([other] if other else []))
    hv = hypervolume(_loss_points(agg), ref)
    lines = [f"Hypervolume of the seed means on (in-domain lm_loss, task_loss), both minimised (the two losses the "
             f"objective weighs, not the plot's axes): **{fmt('hypervolume', hv)}** (pymoo, reference point lm_loss = "
             f"{fmt('loss', ref[0])}, task_loss = {fmt('loss', ref[1])}: 10 % beyond the worst value seen)."]
    if other:
        ohv = hypervolume(_loss_points(other), ref)
        other_mode = "conditioned" if state["mode"] == "exact" else "exact"
        share = hv / ohv if state["mode"] == "conditioned" and ohv else (ohv / hv if hv else 0.0)
        lines += ["", f"The {other_mode} front of {state['compare_with']} has hypervolume {fmt('hypervolume', ohv)} "
                  f"against the same reference point; conditioned / exact = **{share:.1%}**."]
    return lines


def _best_table(var: str, agg: list[dict[str, Any]]) -> list[str]:
    def best(key: str, pick: Any) -> str:
        cand = [a for a in agg if a.get(key) is not None]
        if not cand:
            return "-"
        a = pick(cand)
        return f"{var}={a['value']:g} ({key} = {fmt(key, a[key])})"

    return ["| goal | best |", "| --- | --- |",
            f"| in-domain accuracy | {best('acc_in', lambda c: max(c, key=lambda a: a['acc_in']))} |",
            f"| out-of-domain accuracy | {best('acc_ood', lambda c: max(c, key=lambda a: a['acc_ood']))} |",
            f"| in-domain perplexity | {best('ppl_in', lambda c: min(c, key=lambda a: a['ppl_in']))} |",
            f"| smallest OOD gap (acc, by size) | {best('gap_acc', lambda c: min(c, key=lambda a: abs(a['gap_acc'])))} |"]


def _metric_table(var: str, agg: list[dict[str, Any]]) -> list[str]:
    keys = ("acc_in", "acc_ood", "gap_acc", "ppl_in", "ppl_ood", "gap_ppl", "grad_cosine", "wall_s")
    lines = [f"| {var} | seeds | acc in | acc OOD | gap acc (in − OOD)¹ | ppl in | ppl OOD | gap ppl (in − OOD)¹ "
             "| grad_cosine | wall s² |", "|" + " --- |" * 10]
    for a in agg:
        cells = " | ".join(fmt(k, a[k], a[f"{k}_std"]) for k in keys)
        lines.append(f"| {a['value']:g} | {a['n']} | {cells} |")
    return lines + ["", "¹ gap = in-domain − out-of-domain (the mean over the OOD domains). For acc a positive gap "
                    "means OOD is less accurate (worse); for ppl a positive gap means OOD has the lower perplexity "
                    "(better) and a negative one that OOD is worse. ± = std over seeds.",
                    "² a point's training + evaluation wall time (mean over seeds; a conditioned sweep repeats its one "
                    "run's training time in every row)."]
