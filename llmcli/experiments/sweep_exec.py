"""Running a sweep's points: each in a spawned worker process (`run_local`) or as a Ray task (`run_ray`), the cores
split by the thread plan; signals passed on to the workers once, every cut point resumable from its checkpoint."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmcli.errors import Interrupted, UserError
from llmcli.experiments.sweep_grid import point_config, point_name, point_status, thread_plan
from llmcli.experiments.sweep_report import fmt
from llmcli.files import atomic_write_json
from llmcli.runs import meta_status, move_aside, resumable_run


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


class SweepInterrupted(Interrupted):
    """SIGINT / SIGTERM stopped a sweep (or a --loo table): every cut run kept a checkpoint; `folder` resumes it."""

    def __init__(self, signum: int, message: str, folder: Path) -> None:
        super().__init__(signum, message)
        self.folder = folder


def run_point(cfg_json: dict[str, Any], point: str, sweep_dir: str, resume: bool = False) -> None:
    """Train and evaluate one point in this process; write status.json either way (the worker body).

    resume: continue the point's run from its last checkpoint (exact resume), or only evaluate it when its
    training had completed. SIGINT / SIGTERM leave status `interrupted` and exit 128 + signal: resumable.
    """
    from llmcli.config import validate_config
    from llmcli.evaluation.evaluate import evaluate
    from llmcli.experiments.lodo_selection import (
        train_and_select as train,  # the engine, then LODO selection if select_by asks
    )

    pdir = Path(sweep_dir) / point
    before = float(point_status(pdir).get("wall_s") or 0) if resume else 0.0  # an interrupted attempt's wall counts
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


def _resumable(pdir: Path) -> bool:
    """Whether an unfinished point was cut from outside (its worker or the sweep killed, or SIGINT / SIGTERM)
    and left a checkpoint: then it continues from there. A point that failed by itself (an exception,
    a NaN) would fail the same way again from its checkpoint, so it starts over instead."""
    status = point_status(pdir) if (pdir / "status.json").exists() else {}
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


def run_local(cfg: Any, state: dict[str, Any], sweep_dir: Path, todo: list[tuple[float, int]], workers: int,
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
    info = point_status(pdir)
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


def check_ray() -> None:
    try:
        import ray  # noqa: F401
    except ImportError:
        raise UserError("--backend: ray is not installed; pip install 'llmcli[ray]'") from None


def run_ray(cfg: Any, state: dict[str, Any], sweep_dir: Path, todo: list[tuple[float, int]], workers: int,
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
    log(f"sweep: {pdir.name}: {point_status(pdir).get('status', 'failed')}")


def _ray_point(cfg_json: dict[str, Any], point: str, sweep_dir: str, resume: bool) -> None:
    try:
        run_point(cfg_json, point, sweep_dir, resume)
    except SystemExit:
        pass  # the failure is in status.json
