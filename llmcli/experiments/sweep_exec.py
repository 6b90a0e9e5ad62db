"""Running a sweep's jobs: each in a spawned worker process (`run_local`) or as a Ray task (`run_ray`), the cores
split by the thread plan; signals passed on to the workers once, every cut job resumable from its checkpoint.

The runner is generic: it takes its jobs (a folder name, a validated config, its threads) from a `JobSource`, which
hands out the next job when a slot frees, is polled for each running job (a True answer stops that worker, as
SIGTERM does: the search's pruning) and is told when a job ends. `sweep-alpha` gives a fixed list of points
(`sweep.PointSource`); `llmcli sweep` asks Optuna for a trial each time a slot frees (`search.TrialSource`)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmcli.errors import Interrupted, UserError
from llmcli.experiments.sweep_grid import point_name, point_status, thread_plan
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


class JobsFailed(Exception):
    """Some runs of a sweep or search failed; the others ended and the report is written; `folder` resumes it."""

    def __init__(self, folder: Path, message: str) -> None:
        super().__init__(message)
        self.folder = folder


class SweepInterrupted(Interrupted):
    """SIGINT / SIGTERM stopped a sweep (or a --loo table): every cut run kept a checkpoint; `folder` resumes it."""

    def __init__(self, signum: int, message: str, folder: Path) -> None:
        super().__init__(signum, message)
        self.folder = folder


def run_point(cfg_json: dict[str, Any], point: str, sweep_dir: str, resume: bool = False,
              splits: tuple[str, ...] = ("test",)) -> None:
    """Train and evaluate one point in this process; write status.json either way (the worker body).

    resume: continue the point's run from its last checkpoint (exact resume), or only evaluate it when its
    training had completed. splits: the eval/<split>.json files written (a search adds `val`, its objective; only
    test gets the pictures). SIGINT / SIGTERM leave status `interrupted` and exit 128 + signal: resumable.
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
        for split in splits:
            evaluate(pdir, split=split, plots=split == "test", log=lambda m: None)
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


def _child(cfg_json: dict[str, Any], point: str, sweep_dir: str, resume: bool, splits: tuple[str, ...]) -> None:
    _die_with_parent()
    # Its own process group: a Ctrl-C in the terminal reaches the sweep alone, which passes it on exactly once
    # (a worker that got it from the terminal AND from the sweep would take the second as "stop now").
    os.setpgid(0, 0)
    signal.signal(signal.SIGTERM, raise_interrupted)  # outside training (evaluation) SIGTERM stops as SIGINT does
    signal.signal(signal.SIGINT, raise_interrupted)
    run_point(cfg_json, point, sweep_dir, resume, splits)


def _die_with_parent() -> None:
    """Linux: if the sweep process is killed, its workers die too (no orphan writing into a point)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def continues(pdir: Path) -> bool:
    """Whether an unfinished point was cut from outside (its worker or the sweep killed, or SIGINT / SIGTERM)
    and left a checkpoint: then it continues from there. A point that failed by itself (an exception,
    a NaN) would fail the same way again from its checkpoint, so it starts over instead."""
    status = point_status(pdir) if (pdir / "status.json").exists() else {}
    if (pdir / "status.json").exists() and not status:
        return False  # unreadable: start over (the folder is kept aside)
    cut = not status or status.get("status") in ("interrupted", "completed") \
        or str(status.get("error", "")).startswith("worker killed")
    return cut and resumable_run(pdir) is not None


def prepare_folder(sweep_dir: Path, name: str, log: Any = print, label: str = "sweep") -> bool:
    """Get a point's folder ready; True when it continues an earlier attempt from its last checkpoint.

    Otherwise the point gets a fresh folder and an unfinished earlier attempt is kept aside, never deleted.
    """
    pdir = sweep_dir / name
    if continues(pdir):
        step = _checkpoint_step(pdir)
        log(f"{label}: {name} was cut off mid-run; continuing it from its last checkpoint"
            + (f" (step {step})" if step is not None else ""))
        return True
    if pdir.is_dir() and not any(pdir.iterdir()):
        return False  # an empty folder (cut before it started): nothing to keep aside
    if pdir.exists():
        move_aside(pdir)
    pdir.mkdir()
    return False


def job_threads(pdir: Path, planned: int) -> int:
    """The threads a job runs on: the plan's, or for one that continues from its checkpoint the threads it started
    with (its run folder's config decides them, so the core budget must count those)."""
    return saved_threads(pdir, planned) if continues(pdir) else planned


def _checkpoint_step(run: Path) -> int | None:
    try:
        return int(json.loads((run / "checkpoints" / "last.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclass(frozen=True)
class Job:
    """One run of a sweep: its folder under the sweep folder, its validated config (threads set), whether it
    continues an earlier attempt from its checkpoint, and the splits it is scored on (eval/<split>.json)."""

    name: str
    config: dict[str, Any]
    threads: int
    resume: bool = False
    splits: tuple[str, ...] = ("test",)


class JobSource:
    """What a runner runs: the next job when a slot frees, whether to stop a running one, what to do when one ends.

    `total`: the jobs this run starts at most (the thread plan is made for them); `threads`: the base config's
    train.threads, where set (every job on that many, no plan); `label` / `noun`: the log's words.
    """

    label = "sweep"
    noun = "point"

    def __init__(self, sweep_dir: Path, total: int, threads: int | None = None) -> None:
        self.sweep_dir = sweep_dir
        self.total = total
        self.threads = threads

    def next_threads(self, planned: int) -> int | None:
        """The threads the next job needs (`planned`, or what a resumed job started with); None: no job left."""
        raise NotImplementedError

    def next_job(self, threads: int) -> Job | None:
        """The next job on these threads, its folder ready; None when it ended without running (and was recorded)."""
        raise NotImplementedError

    def poll(self, job: Job) -> bool:
        """Asked about every 0.2 s per running job: True stops its worker (SIGTERM locally, a cancel on Ray)."""
        return False

    def ended(self, job: Job, exitcode: int | None) -> str:
        """A job's worker exited: record its outcome; one phrase for the log."""
        return record_outcome(self.sweep_dir / job.name, exitcode)


def _start_line(source: JobSource, workers: int, plan: list[int]) -> str:
    base = plan[-1] if plan else 1
    lead = len(plan) - plan.count(base)
    return (f"{source.label}: {source.total} {source.noun}(s) to run, {workers} worker(s) x {base} thread(s)"
            + (" (train.threads of the config)" if source.threads else "")
            + (f"; first {lead} {source.noun}(s) on {plan[0]} thread(s) each, so that no round runs part-empty"
               if lead else ""))


class _Pool:
    """The local runner's state: the running workers, how many jobs started and ended, the core budget."""

    def __init__(self, source: JobSource, workers: int, log: Any) -> None:
        import multiprocessing as mp

        self.ctx = mp.get_context("spawn")
        self.source, self.workers, self.log = source, workers, log
        cores = os.cpu_count() or 1
        self.plan = thread_plan(max(source.total, 1), workers, cores, source.threads)
        # more workers than cores: oversubscribed, as asked
        self.capacity = max(cores, min(workers, source.total) * self.plan[-1])
        self.running: dict[str, tuple[Any, Job]] = {}  # job name -> (process, job)
        self.stopping: set[str] = set()
        self.started = self.done = 0

    def planned(self) -> int:
        return self.plan[min(self.started, len(self.plan) - 1)]

    def start(self) -> bool:
        """Start the jobs that fit (workers and cores); whether any job is left to start."""
        while len(self.running) < self.workers:
            threads = self.source.next_threads(self.planned())
            if threads is None:
                return False
            if self.running and sum(j.threads for _, j in self.running.values()) + threads > self.capacity:
                return True  # wait for cores to free up
            job = self.source.next_job(threads)
            self.started += 1
            if job is None:
                continue
            proc = self.ctx.Process(target=_child, args=(job.config, job.name, str(self.source.sweep_dir), job.resume,
                                                         job.splits), daemon=False)
            proc.start()
            self.running[job.name] = (proc, job)
        return self.source.next_threads(self.planned()) is not None

    def poll(self) -> None:
        """Stop (SIGTERM, once) each running job its source asks to stop."""
        for name, (proc, job) in list(self.running.items()):
            if name not in self.stopping and proc.is_alive() and self.source.poll(job):
                self.stopping.add(name)
                _signal(proc, signal.SIGTERM)

    def reap(self) -> None:
        for name in [n for n, (p, _) in self.running.items() if not p.is_alive()]:
            proc, job = self.running.pop(name)
            proc.join()
            self.done += 1
            self.log(f"{self.source.label}: [{self.done}/{self.source.total}] {name}: "
                     + self.source.ended(job, proc.exitcode))


def run_local(source: JobSource, workers: int, log: Any, _address: str | None = None) -> int | None:
    """Run the source's jobs in spawned workers; the signal number if SIGINT / SIGTERM stopped the sweep, else None.

    A signal is passed on to every running worker (each stops after its current step with a checkpoint,
    as `train` does), no new job starts, and the sweep waits for the workers to exit.
    """
    pool = _Pool(source, workers, log)
    log(_start_line(source, workers, pool.plan[:source.total]))
    stop = SignalCounter(lambda signum: _forward(signum, pool.running))
    with signals_to(stop):
        while True:
            more = stop.signum is None and pool.start()
            if not pool.running and not more:
                break
            time.sleep(0.2)
            pool.poll()
            pool.reap()
    return stop.signum


def _signal(proc: Any, signum: int) -> None:
    try:
        os.kill(proc.pid, signum)
    except (OSError, TypeError):  # already gone, or not started yet (pid None)
        pass


def _forward(signum: int, running: dict[str, tuple[Any, Job]]) -> None:
    """Pass a signal the sweep got on to its workers (their own process groups do not get the terminal's)."""
    for proc, _ in list(running.values()):
        _signal(proc, signum)


def record_outcome(pdir: Path, exitcode: int | None) -> str:
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
    """Each sweep-alpha point to run with its threads (`job_threads`)."""
    return [(point, job_threads(sweep_dir / point_name(state["variable"], *point), threads))
            for point, threads in zip(todo, plan)]


def saved_threads(pdir: Path, default: int) -> int:
    """The torch threads a point's run folder was started with (its config.yaml), else `default`."""
    import yaml

    try:
        threads = yaml.safe_load((pdir / "config.yaml").read_text())["train"]["threads"]
    except (OSError, ValueError, TypeError, KeyError, yaml.YAMLError):
        return default
    return threads if isinstance(threads, int) and threads >= 1 else default


def check_runner(backend: str, workers: int | None) -> None:
    """--backend is local or ray (installed), --workers at least 1: checked before any folder exists."""
    if backend not in ("local", "ray"):
        raise UserError(f"--backend: {backend!r} is not allowed (local or ray)")
    if backend == "ray":
        check_ray()
    if workers is not None and workers < 1:
        raise UserError(f"--workers: must be >= 1, got {workers}")


def check_ray() -> None:
    try:
        import ray  # noqa: F401
    except ImportError:
        raise UserError("--backend: ray is not installed; pip install 'llmcli[ray]'") from None


def run_ray(source: JobSource, workers: int, log: Any, address: str | None) -> int | None:
    """The source's jobs as Ray tasks, `workers` in flight; on SIGINT / SIGTERM the tasks are cancelled (a
    KeyboardInterrupt in each, which `train` turns into meta `interrupted` after its last checkpoint) and the
    signal number returned. A job the source asks to stop is cancelled the same way."""
    import ray

    import llmcli

    # A local instance gets this process's llmcli on its workers' path; a cluster's nodes must have
    # llmcli installed (pip install 'llmcli[ray]') and see the sweep folder (shared storage).
    local_env = {"env_vars": {"PYTHONPATH": str(Path(llmcli.__file__).resolve().parents[1])}}
    ray.init(address=address, num_cpus=None if address else (os.cpu_count() or 1), include_dashboard=False,
             ignore_reinit_error=True, log_to_driver=False, runtime_env=None if address else local_env)
    run = _RayRun(source, workers, log, max(1, int(ray.available_resources().get("CPU", 1))))
    log(_start_line(source, workers, run.plan[:source.total]))
    with signals_to(run.stop):
        while True:
            more = run.stop.signum is None and run.submit()
            if not run.refs and not more:
                break
            run.wait()
    return run.stop.signum


class _RayRun:
    """The Ray runner's state: the tasks in flight (at most `workers`), the plan, the stop signal."""

    def __init__(self, source: JobSource, workers: int, log: Any, cpus: int) -> None:
        import ray

        self.source, self.workers, self.log = source, workers, log
        self.plan = thread_plan(max(source.total, 1), workers, cpus, source.threads)
        self.remote = ray.remote(max_retries=0)(_ray_point)
        self.refs: dict[Any, Job] = {}
        self.cancelled: set[Any] = set()
        self.stop = SignalCounter()
        self.started = self.done = 0

    def submit(self) -> bool:
        """Submit jobs up to `workers` in flight (Ray starts each when its CPUs are free); whether any is left."""
        while len(self.refs) < self.workers:
            threads = self.source.next_threads(self.plan[min(self.started, len(self.plan) - 1)])
            if threads is None:
                return False
            job = self.source.next_job(threads)
            self.started += 1
            if job is not None:
                ref = self.remote.options(num_cpus=job.threads).remote(job.config, job.name, str(self.source.sweep_dir),
                                                                       job.resume, job.splits)
                self.refs[ref] = job
        return True

    def wait(self) -> None:
        import ray

        ready, _ = ray.wait(list(self.refs), num_returns=1, timeout=0.2)
        for ref, job in self.refs.items():
            stopping = self.stop.signum is not None or (ref not in ready and self.source.poll(job))
            if stopping and ref not in self.cancelled:
                ray.cancel(ref, force=False)
                self.cancelled.add(ref)
        for ref in ready:
            job = self.refs.pop(ref)
            _ray_outcome(ref, self.source.sweep_dir / job.name, self.stop.signum)
            self.done += 1
            self.log(f"{self.source.label}: [{self.done}/{self.source.total}] {job.name}: "
                     + self.source.ended(job, None))


def _ray_outcome(ref: Any, pdir: Path, signum: int | None) -> None:
    """A task that died (or was cancelled) without writing its status gets one."""
    import ray

    try:
        ray.get(ref)
    except Exception as exc:
        if not (pdir / "status.json").is_file():
            info = {"status": "interrupted", "signal": signal.Signals(signum or signal.SIGTERM).name} \
                if signum is not None or isinstance(exc, ray.exceptions.TaskCancelledError) \
                else {"status": "failed", "error": str(exc).strip().splitlines()[-1]}
            atomic_write_json(pdir / "status.json", info)


def _ray_point(cfg_json: dict[str, Any], point: str, sweep_dir: str, resume: bool, splits: tuple[str, ...]) -> None:
    try:
        run_point(cfg_json, point, sweep_dir, resume, splits)
    except SystemExit:
        pass  # the failure is in status.json
