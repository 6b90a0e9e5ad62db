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
  results.csv       one row per point and seed
  pareto.png        in-domain and out-of-domain fronts; both modes overlaid when both exist
  summary.md        what the front shows, the best value per goal, the hypervolume
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from pathlib import Path
from typing import Any

from llmcli.errors import UserError
from llmcli.io import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json, read_json_object

COLUMNS = ("mode", "variable", "value", "seed", "status", "acc_in", "macro_f1_in", "acc_ood", "macro_f1_ood",
           "gap_acc", "ppl_in", "ppl_ood", "lm_loss_in", "task_loss_in", "grad_cosine", "pareto", "wall_s",
           "run", "error")
VARIABLES = {"alpha": "--alphas", "beta": "--betas"}


# ---------------------------------------------------------------- grids


def parse_grid(text: str, flag: str = "--alphas", lo: float = 0.0, hi: float = 1.0) -> list[float]:
    """'0,0.25,1' or 'linspace:0:1:9' -> sorted-as-given floats in [lo, hi], no duplicates."""
    text = text.strip()
    if text.startswith("linspace:"):
        parts = text.split(":")[1:]
        try:
            start, stop, num = float(parts[0]), float(parts[1]), int(parts[2])
            if len(parts) != 3 or num < 1:
                raise ValueError
        except (ValueError, IndexError):
            raise UserError(f"{flag}: {text!r} is not linspace:START:STOP:N with N >= 1, e.g. linspace:0:1:9") from None
        values = [start + (stop - start) * i / max(num - 1, 1) for i in range(num)] if num > 1 else [start]
        values = [round(v, 10) for v in values]
    else:
        parts = [p.strip() for p in text.split(",")]
        if not text or any(not p for p in parts):
            raise UserError(f"{flag}: {text!r} is not a comma-separated list of numbers, e.g. 0,0.5,1")
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise UserError(f"{flag}: {text!r} holds a value that is not a number") from None
    bad = [v for v in values if not lo <= v <= hi]
    if bad:
        raise UserError(f"{flag}: every value must be in [{lo:g}, {hi:g}], got {bad}")
    if len(set(values)) != len(values):
        raise UserError(f"{flag}: {text!r} repeats a value")
    return values


def parse_alphas(text: str) -> list[float]:
    """The alpha grid."""
    return parse_grid(text, "--alphas")


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]."""
    try:
        seeds = [int(p) for p in text.split(",")]
    except ValueError:
        raise UserError(f"--seeds: {text!r} is not a comma-separated list of integers, e.g. 0,1,2") from None
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds: {text!r} repeats a seed")
    return seeds


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

    Raises UserError (exit 2) for bad input and SweepFailed (exit 1) when some point failed.
    """
    from llmcli.config import validate_config
    from llmcli.runs import create_run_dir

    if resume is not None:
        sweep_dir = Path(resume)
        state = read_json_object(sweep_dir / "sweep.json", "sweep state (is this a sweep folder?)",
                                 ("config", "variable", "grid", "seeds", "mode"))
        cfg = validate_config(state["config"], str(sweep_dir / "sweep.json"))
    else:
        state = _new_state(cfg, alphas, betas, seeds, mode)
        if compare is not None:
            if not (Path(compare) / "sweep.json").is_file():
                raise UserError(f"--compare: {compare} is not a sweep folder (no sweep.json)")
            state["compare_with"] = str(compare)
        sweep_dir = create_run_dir(Path(runs_dir), cfg.name, prefix="sweep-")
        atomic_write_json(sweep_dir / "sweep.json", state)
    if backend not in ("local", "ray"):
        raise UserError(f"--backend: {backend!r} is not allowed (local or ray)")
    if backend == "ray":
        _check_ray()
    if state["mode"] == "conditioned":
        from llmcli.conditioned import run_conditioned

        run_conditioned(cfg, state, sweep_dir, progress=progress, log=log)
    else:
        points = [(v, s) for v in state["grid"] for s in state["seeds"]]
        todo = [p for p in points if not _finished(sweep_dir / point_name(state["variable"], *p))]
        for p in points:
            if p not in todo:
                log(f"sweep: {point_name(state['variable'], *p)} already finished, skipped")
        n = workers or default_workers(len(todo))
        if n < 1:
            raise UserError(f"--workers: must be >= 1, got {n}")
        if todo:
            runner = _run_ray if backend == "ray" else _run_local
            runner(cfg, state, sweep_dir, todo, n, log, ray_address)
    rows = collect_rows(sweep_dir, state)
    write_results(sweep_dir, state, rows)
    failed = [r for r in rows if r["status"] != "completed"]
    log(f"sweep: {len(rows) - len(failed)}/{len(rows)} points completed: {sweep_dir}")
    if failed:
        raise SweepFailed(sweep_dir, failed)
    return sweep_dir


class SweepFailed(Exception):
    """Some points failed; the others completed and the results are written."""

    def __init__(self, sweep_dir: Path, failed: list[dict[str, Any]]) -> None:
        self.sweep_dir = sweep_dir
        lines = "; ".join(f"{r['run']}: {r['error']}" for r in failed)
        super().__init__(f"sweep: {len(failed)} point(s) failed ({lines}); re-run them with --resume {sweep_dir}")


def _new_state(cfg: Any, alphas: list[float] | None, betas: list[float] | None, seeds: list[int] | None,
               mode: str) -> dict[str, Any]:
    fields = type(cfg.objective).model_fields
    if mode not in ("exact", "conditioned"):
        raise UserError(f"--mode: {mode!r} is not allowed (exact or conditioned)")
    if betas is not None:
        if alphas is not None:
            raise UserError("--betas: sweep alpha or beta, not both")
        if "beta" not in fields:
            raise UserError(f"objective.name: --betas sweeps the bound of the constrained objective, "
                            f"not {cfg.objective.name!r}")
        if mode == "conditioned":
            raise UserError("--mode: conditioned mode sweeps alpha, not beta")
        variable, grid = "beta", betas
    else:
        if "alpha" not in fields:
            raise UserError(f"objective.name: sweep-alpha needs an objective with an alpha (weighted), "
                            f"not {cfg.objective.name!r}")
        variable, grid = "alpha", alphas if alphas is not None else list(cfg.sweep.alphas)
    return {"mode": mode, "variable": variable, "grid": grid, "seeds": seeds or [cfg.seed],
            "config": cfg.model_dump(mode="json"), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _finished(point: Path) -> bool:
    status = point / "status.json"
    return status.is_file() and json.loads(status.read_text()).get("status") == "completed" \
        and (point / "eval" / "test.json").is_file()


def point_config(cfg: Any, variable: str, value: float, seed: int, threads: int | None) -> Any:
    """The base config with this point's alpha/beta, seed and thread count."""
    objective = cfg.objective.model_copy(update={variable: value})
    train = cfg.train.model_copy(update={"threads": threads}) if threads else cfg.train
    return cfg.model_copy(update={"objective": objective, "train": train, "seed": seed,
                                  "name": f"{cfg.name}-{variable[0]}{value:g}-s{seed}"})


def run_point(cfg_json: dict[str, Any], point: str, sweep_dir: str, resume: bool = False) -> None:
    """Train and evaluate one point in this process; write status.json either way (the worker body).

    resume: continue the point's run from its last checkpoint (exact resume) instead of starting it.
    """
    from llmcli.config import validate_config
    from llmcli.evaluate import evaluate
    from llmcli.train import train

    pdir = Path(sweep_dir) / point
    t0 = time.perf_counter()
    try:
        cfg = validate_config(cfg_json, point)
        if not resume:
            train(cfg, run_dir=pdir, progress=False, log=lambda m: None)
        elif _meta_status(pdir) != "completed":  # a completed run was cut during its evaluation: only evaluate
            train(None, resume=pdir, progress=False, log=lambda m: None)
        train_wall = round(time.perf_counter() - t0, 2)
        evaluate(pdir, split="test", log=lambda m: None)
    except BaseException as exc:  # the point fails; the sweep goes on
        last = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        atomic_write_json(pdir / "status.json", {"status": "failed", "error": f"{type(exc).__name__}: {last}",
                                                 "wall_s": round(time.perf_counter() - t0, 2)})
        raise SystemExit(1) from None
    atomic_write_json(pdir / "status.json", {"status": "completed", "wall_s": round(time.perf_counter() - t0, 2),
                                             "train_wall_s": train_wall, "resumed": resume})


def _child(cfg_json: dict[str, Any], point: str, sweep_dir: str, resume: bool) -> None:
    _die_with_parent()
    run_point(cfg_json, point, sweep_dir, resume)


def _die_with_parent() -> None:
    """Linux: if the sweep process is killed, its workers die too (no orphan writing into a point)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _meta_status(pdir: Path) -> str | None:
    try:
        return json.loads((pdir / "meta.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def _resumable(pdir: Path) -> bool:
    """Whether an unfinished point was cut from outside (its worker or the sweep killed, or interrupted)
    and left a checkpoint: then it continues from there. A point that failed by itself (an exception,
    a NaN) would fail the same way again from its checkpoint, so it starts over instead."""
    if not (pdir / "checkpoints" / "last.safetensors").is_file():
        return False
    try:
        status = json.loads((pdir / "status.json").read_text()) if (pdir / "status.json").exists() else {}
    except (OSError, ValueError):
        return False
    if status and not str(status.get("error", "")).startswith("worker killed"):
        return False
    return _meta_status(pdir) in ("running", "interrupted", "stopped", "completed")


def _prepare_point(sweep_dir: Path, name: str, log: Any = print) -> bool:
    """Get a point's folder ready; True when it continues an earlier attempt from its last checkpoint.

    Otherwise the point gets a fresh folder and an unfinished earlier attempt is kept aside, never deleted.
    """
    pdir = sweep_dir / name
    if _resumable(pdir):
        log(f"sweep: {name} was cut off mid-run; continuing it from its last checkpoint")
        return True
    if pdir.exists():
        n = 1
        while pdir.with_name(f"{name}.attempt{n}").exists():
            n += 1
        pdir.rename(pdir.with_name(f"{name}.attempt{n}"))
    pdir.mkdir()
    return False


def _run_local(cfg: Any, state: dict[str, Any], sweep_dir: Path, todo: list[tuple[float, int]], workers: int,
               log: Any, _address: str | None) -> None:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    cores = os.cpu_count() or 1
    plan = thread_plan(len(todo), workers, cores)
    base = plan[-1]
    capacity = max(cores, min(workers, len(todo)) * base)  # more workers than cores: oversubscribed, as asked
    lead = len(todo) - plan.count(base)
    log(f"sweep: {len(todo)} point(s), {workers} worker(s) x {base} thread(s)"
        + (f"; first {lead} point(s) on {plan[0]} thread(s) each, so that no round runs part-empty" if lead else ""))
    queue = point_threads(sweep_dir, state, todo, plan)
    running: dict[str, tuple[Any, int]] = {}  # point -> (process, its threads)
    done = 0
    while queue or running:
        while queue and len(running) < workers:
            (value, seed), threads = queue[0]
            name = point_name(state["variable"], value, seed)
            if running and sum(t for _, t in running.values()) + threads > capacity:
                break  # wait for cores to free up
            queue.pop(0)
            resume = _prepare_point(sweep_dir, name, log)
            pcfg = point_config(cfg, state["variable"], value, seed, threads).model_dump(mode="json")
            proc = ctx.Process(target=_child, args=(pcfg, name, str(sweep_dir), resume), daemon=False)
            proc.start()
            running[name] = (proc, threads)
        time.sleep(0.2)
        for name, (proc, _) in list(running.items()):
            if proc.is_alive():
                continue
            proc.join()
            del running[name]
            done += 1
            status = sweep_dir / name / "status.json"
            if proc.exitcode and proc.exitcode < 0 and not status.is_file():
                atomic_write_json(status, {"status": "failed", "error": f"worker killed by signal {-proc.exitcode}"})
            info = json.loads(status.read_text()) if status.is_file() else {"status": "failed", "error": "no status"}
            log(f"sweep: [{done}/{len(todo)}] {name}: {info['status']}"
                + (f" ({info.get('error')})" if info["status"] != "completed" else f" in {info.get('wall_s')} s"))


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
             log: Any, address: str | None) -> None:
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
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        name = refs[ready[0]]
        try:
            ray.get(ready[0])
        except Exception as exc:  # a task that died without writing its status
            status = sweep_dir / name / "status.json"
            if not status.is_file():
                atomic_write_json(status, {"status": "failed", "error": str(exc).strip().splitlines()[-1]})
        log(f"sweep: {name}: {json.loads((sweep_dir / name / 'status.json').read_text())['status']}")


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

    return {"acc_in": mean(ind, "acc"), "macro_f1_in": mean(ind, "macro_f1"), "acc_ood": mean(ood, "acc"),
            "macro_f1_ood": mean(ood, "macro_f1"), "gap_acc": result["gap"].get("mean", {}).get("gap_acc"),
            "ppl_in": mean(ind, "ppl"), "ppl_ood": mean(ood, "ppl"), "lm_loss_in": mean(ind, "lm_loss"),
            "task_loss_in": mean(ind, "task_loss")}


def _mean_grad_cosine(run: Path) -> float | None:
    vals = [r["grad_cosine"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "grad_cosine" in r]
    return sum(vals) / len(vals) if vals else None


def collect_rows(sweep_dir: Path, state: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per point (exact) or grid value (conditioned), rebuilt from the folders on disk."""
    var = state["variable"]
    rows = []
    if state["mode"] == "conditioned":
        run = sweep_dir / "conditioned"
        for v in state["grid"]:
            f = run / "eval" / f"test-alpha-{v:g}.json"
            base = {"mode": "conditioned", "variable": var, "value": v, "seed": state["seeds"][0], "run": run.name}
            if f.is_file():
                rows.append({**base, "status": "completed", **_summarise_eval(read_json(f)),
                             "grad_cosine": _mean_grad_cosine(run), "wall_s": read_json(run / "status.json").get("wall_s")})
            else:
                rows.append({**base, "status": "missing", "error": "not evaluated"})
        return rows
    for v in state["grid"]:
        for s in state["seeds"]:
            name = point_name(var, v, s)
            pdir = sweep_dir / name
            base = {"mode": "exact", "variable": var, "value": v, "seed": s, "run": name}
            status = read_json(pdir / "status.json") if (pdir / "status.json").is_file() else None
            if status and status["status"] == "completed":
                rows.append({**base, "status": "completed", **_summarise_eval(read_json(pdir / "eval" / "test.json")),
                             "grad_cosine": _mean_grad_cosine(pdir), "wall_s": status.get("wall_s"), "error": ""})
            else:
                rows.append({**base, "status": status["status"] if status else "missing",
                             "error": status.get("error", "") if status else "never ran or was interrupted"})
    return rows


def pareto_mask(points: list[tuple[float, float]]) -> list[bool]:
    """Non-dominated points when both coordinates are minimised."""
    return [not any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in points) for p in points]


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std over seeds per value (completed rows only)."""
    import numpy as np

    out = []
    for v in dict.fromkeys(r["value"] for r in rows):
        group = [r for r in rows if r["value"] == v and r["status"] == "completed"]
        if not group:
            continue
        agg: dict[str, Any] = {"value": v, "n": len(group)}
        for k in ("acc_in", "acc_ood", "gap_acc", "ppl_in", "ppl_ood", "lm_loss_in", "task_loss_in", "grad_cosine"):
            vals = [r[k] for r in group if r.get(k) is not None]
            agg[k] = float(np.mean(vals)) if vals else None
            agg[f"{k}_std"] = float(np.std(vals)) if len(vals) > 1 else 0.0
        out.append(agg)
    return out


def hypervolume(points: list[tuple[float, float]], ref: tuple[float, float]) -> float:
    """Area dominated by the points (both minimised) up to the reference point (pymoo)."""
    import numpy as np
    from pymoo.indicators.hv import HV

    inside = [p for p in points if p[0] < ref[0] and p[1] < ref[1]]
    return float(HV(ref_point=np.array(ref))(np.array(inside))) if inside else 0.0


def reference_point(aggs: list[list[dict[str, Any]]]) -> tuple[float, float]:
    """10 % beyond the worst lm_loss and task_loss seen in any of the fronts compared."""
    pts = [(a["lm_loss_in"], a["task_loss_in"]) for agg in aggs for a in agg]
    return (max(p[0] for p in pts) * 1.1, max(p[1] for p in pts) * 1.1)


def write_results(sweep_dir: Path, state: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """results.csv, pareto.png and summary.md from the rows (and the other mode's rows, if present)."""
    agg = aggregate(rows)
    front = dict(zip([a["value"] for a in agg], pareto_mask([(a["lm_loss_in"], a["task_loss_in"]) for a in agg])))
    for r in rows:
        r["pareto"] = front.get(r["value"]) if r["status"] == "completed" else ""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(sweep_dir / "results.csv", buf.getvalue())
    if not agg:
        return
    other = _other_mode(sweep_dir, state)
    ref = reference_point([agg] + ([other] if other else []))
    _plot(sweep_dir, state, agg, other)
    atomic_write_text(sweep_dir / "summary.md", _summary(sweep_dir, state, rows, agg, ref, other))


def _other_mode(sweep_dir: Path, state: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The conditioned front beside an exact sweep, or the reverse, when `compare_with` names one."""
    other = state.get("compare_with")
    if not other or not (Path(other) / "sweep.json").is_file():
        return None
    ostate = read_json(Path(other) / "sweep.json")
    return aggregate(collect_rows(Path(other), ostate)) or None


def _plot(sweep_dir: Path, state: dict[str, Any], agg: list[dict[str, Any]], other: list[dict[str, Any]] | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    var = "α" if state["variable"] == "alpha" else "β"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    panels = (("acc_in", "ppl_in", "in-domain"), ("acc_ood", "ppl_ood", "out-of-domain (mean)"))
    series = [(agg, state["mode"], "C0")] + ([(other, "conditioned" if state["mode"] == "exact" else "exact", "C3")]
                                           if other else [])
    for ax, (acc, ppl, title) in zip(axes, panels):
        for data, label, color in series:
            rows = [a for a in data if a[acc] is not None]
            front = pareto_mask([(a[ppl], -a[acc]) for a in rows])
            for a, f in zip(rows, front):
                ax.errorbar(a[ppl], a[acc], xerr=a[f"{ppl}_std"] or None, yerr=a[f"{acc}_std"] or None,
                            fmt="o", color=color if f else "0.7", zorder=3, ms=6, capsize=3)
                if label == state["mode"]:
                    ax.annotate(f"{var}={a['value']:g}", (a[ppl], a[acc]), textcoords="offset points",
                                xytext=(5, 5), fontsize=8)
            fr = sorted((a for a, f in zip(rows, front) if f), key=lambda a: a[ppl])
            ax.plot([a[ppl] for a in fr], [a[acc] for a in fr], color=color, lw=1.5, label=f"{label} front")
        ax.set_xscale("log")
        ax.set_xlabel("perplexity (lower is better)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("task accuracy (higher is better)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"L vs T trade-off over {var} ({state['mode']}; grey = dominated): {sweep_dir.name}", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(sweep_dir / "pareto.png", buf.getvalue())


def _f(x: Any, std: Any = None) -> str:
    if x is None:
        return "-"
    return f"{x:.4f}" + (f" ± {std:.4f}" if std else "")


def _summary(sweep_dir: Path, state: dict[str, Any], rows: list[dict[str, Any]], agg: list[dict[str, Any]],
             ref: tuple[float, float], other: list[dict[str, Any]] | None) -> str:
    var = state["variable"]

    def best(key: str, high: bool) -> str:
        cand = [a for a in agg if a.get(key) is not None]
        if not cand:
            return "-"
        a = (max if high else min)(cand, key=lambda a: a[key])
        return f"{var}={a['value']:g} ({key} = {a[key]:.4g})"

    pts = [(a["lm_loss_in"], a["task_loss_in"]) for a in agg]
    front_pts = [p for p, f in zip(pts, pareto_mask(pts)) if f]
    hv = hypervolume(front_pts, ref)
    ok = sum(r["status"] == "completed" for r in rows)
    lines = [f"# Sweep {sweep_dir.name}", "",
             f"Mode: {state['mode']}; {var} grid: {', '.join(f'{v:g}' for v in state['grid'])}; "
             f"seeds: {', '.join(map(str, state['seeds']))}. {ok}/{len(rows)} points completed.", "",
             "Pareto front on (in-domain lm_loss, task_loss), both minimised, seed means: "
             + ", ".join(f"{var}={a['value']:g}" for a, p in zip(agg, pareto_mask(pts)) if p) + ".",
             f"Hypervolume of that front: **{hv:.4f}** (pymoo, reference point lm_loss = {ref[0]:.4f}, "
             f"task_loss = {ref[1]:.4f}: 10 % beyond the worst value seen).", ""]
    if other:
        opts = [(a["lm_loss_in"], a["task_loss_in"]) for a in other]
        ohv = hypervolume([p for p, f in zip(opts, pareto_mask(opts)) if f], ref)
        other_mode = "conditioned" if state["mode"] == "exact" else "exact"
        share = hv / ohv if state["mode"] == "conditioned" and ohv else (ohv / hv if hv else 0.0)
        lines += [f"The {other_mode} front of {state['compare_with']} has hypervolume {ohv:.4f} against the same "
                  f"reference point; conditioned / exact = **{share:.1%}**.", ""]
    lines += ["| goal | best |", "| --- | --- |",
              f"| in-domain accuracy | {best('acc_in', True)} |",
              f"| out-of-domain accuracy | {best('acc_ood', True)} |",
              f"| in-domain perplexity | {best('ppl_in', False)} |",
              f"| smallest OOD gap (acc) | {best('gap_acc', False)} |", "",
              f"| {var} | seeds | acc in | acc OOD | gap_acc | ppl in | ppl OOD | grad_cosine |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for a in agg:
        cells = " | ".join(_f(a[k], a[f"{k}_std"]) for k in ("acc_in", "acc_ood", "gap_acc", "ppl_in", "ppl_ood",
                                                              "grad_cosine"))
        lines.append(f"| {a['value']:g} | {a['n']} | {cells} |")
    failed = [r for r in rows if r["status"] != "completed"]
    if failed:
        lines += ["", "Failed or missing points (re-run with `--resume`):", ""]
        lines += [f"- {r['run']}: {r['status']}: {r.get('error', '')}" for r in failed]
    lines += ["", "![Pareto front](pareto.png)", ""]
    return "\n".join(lines)
