"""`llmcli sweep-alpha`: one run per alpha under one sweep folder, then the trade-off they map.

sweep-<ts>-<name>-<hex>/
  sweep.json        the grid and the base config
  alpha-0.25/       a complete run folder per point (config, metrics, checkpoints, eval/test.json)
  results.csv       one row per point
  pareto.png        in-domain and out-of-domain fronts
  summary.md        what the front shows
"""

from __future__ import annotations

import csv
import io
import time
import traceback
from pathlib import Path
from typing import Any

from llmcli.errors import UserError
from llmcli.io import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json, read_json_object

COLUMNS = ("alpha", "status", "acc_in", "macro_f1_in", "acc_ood", "macro_f1_ood", "gap_acc", "ppl_in",
           "lm_loss_in", "task_loss_in", "ppl_ood", "pareto", "wall_s", "run", "error")


def parse_alphas(text: str) -> list[float]:
    """'0,0.25,1' -> [0.0, 0.25, 1.0]; every value must be a number in [0, 1], no duplicates."""
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or any(not p for p in parts):
        raise UserError(f"--alphas: {text!r} is not a comma-separated list of numbers, e.g. 0,0.5,1")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise UserError(f"--alphas: {text!r} holds a value that is not a number") from None
    bad = [v for v in values if not 0.0 <= v <= 1.0]
    if bad:
        raise UserError(f"--alphas: every alpha must be in [0, 1], got {bad}")
    if len(set(values)) != len(values):
        raise UserError(f"--alphas: {text!r} repeats a value")
    return values


def point_name(alpha: float) -> str:
    """Folder name of one point."""
    return f"alpha-{alpha:g}"


def sweep_alpha(cfg: Any, alphas: list[float] | None = None, *, runs_dir: str | Path = "runs",
                resume: str | Path | None = None, progress: bool = True, log: Any = print) -> Path:
    """Run (or finish) an alpha sweep and write its results; returns the sweep folder."""
    from llmcli.config import validate_config
    from llmcli.runs import create_run_dir

    if resume is not None:
        sweep_dir = Path(resume)
        state = read_json_object(sweep_dir / "sweep.json", "sweep state (is this a sweep folder?)", ("config", "alphas"))
        cfg = validate_config(state["config"], str(sweep_dir / "sweep.json"))
        alphas = state["alphas"]
    else:
        if "alpha" not in type(cfg.objective).model_fields:
            raise UserError(f"objective.name: sweep-alpha needs an objective with an alpha (weighted), "
                            f"not {cfg.objective.name!r}")
        alphas = alphas if alphas is not None else list(cfg.sweep.alphas)
        sweep_dir = create_run_dir(Path(runs_dir), cfg.name, prefix="sweep-")
        atomic_write_json(sweep_dir / "sweep.json", {"alphas": alphas, "config": cfg.model_dump(mode="json"),
                                                     "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    rows = []
    for i, alpha in enumerate(alphas, 1):
        log(f"sweep: point {i}/{len(alphas)}: alpha={alpha:g}")
        rows.append(_run_point(cfg, alpha, sweep_dir, progress, log))
        _write_results(sweep_dir, rows)
    _write_results(sweep_dir, rows, final=True)
    failed = [r for r in rows if r["status"] != "completed"]
    log(f"sweep: {len(rows) - len(failed)}/{len(rows)} points completed: {sweep_dir}")
    if failed:
        raise UserError(f"sweep: {len(failed)} point(s) failed: "
                        + "; ".join(f"alpha={r['alpha']:g}: {r['error']}" for r in failed))
    return sweep_dir


def _run_point(cfg: Any, alpha: float, sweep_dir: Path, progress: bool, log: Any) -> dict[str, Any]:
    from llmcli.evaluate import evaluate
    from llmcli.train import train

    point = sweep_dir / point_name(alpha)
    done = point / "eval" / "test.json"
    meta = point / "meta.json"
    status = read_json_object(meta, "run meta").get("status") if meta.is_file() else None
    if done.is_file() and status == "completed":
        log(f"sweep: alpha={alpha:g} already finished, skipped")
        return _row(alpha, read_json(done), read_json_object(meta, "run meta").get("wall_s"), point)
    # a point stopped by a signal or a crash continues exactly where it was; a failed one starts over
    resumable = status in ("interrupted", "stopped", "running") and (point / "checkpoints" / "last.json").is_file()
    if point.exists() and not resumable:  # an unfinished attempt: keep it aside rather than delete it
        n = 1
        while point.with_name(f"{point.name}.attempt{n}").exists():
            n += 1
        point.rename(point.with_name(f"{point.name}.attempt{n}"))
    point_cfg = cfg.model_copy(update={"objective": cfg.objective.model_copy(update={"alpha": alpha}),
                                       "name": f"{cfg.name}-a{alpha:g}"})
    t0 = time.perf_counter()
    try:
        if resumable:
            log(f"sweep: alpha={alpha:g} was interrupted; resuming it")
            train(None, resume=point, progress=progress, log=log)
        else:
            point.mkdir(parents=True)
            train(point_cfg, run_dir=point, progress=progress, log=log)
        result = evaluate(point, split="test", log=log)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # one failed point must not stop the sweep
        last = str(exc).splitlines()[-1] if str(exc) else traceback.format_exc().splitlines()[-1]
        log(f"sweep: alpha={alpha:g} failed: {last}")
        return {"alpha": alpha, "status": "failed", "error": last, "run": point.name}
    wall = round(time.perf_counter() - t0, 2)
    from llmcli.runs import update_meta

    update_meta(point, wall_s=wall)
    return _row(alpha, result, wall, point)


def _row(alpha: float, result: dict[str, Any], wall: float | None, point: Path) -> dict[str, Any]:
    import numpy as np

    dom = result["domains"]
    ind = [dom[d] for d in result["in_domain"] if d in dom]
    ood = [dom[d] for d in result["out_of_domain"]]

    def mean(rows: list[dict[str, float]], key: str) -> float | None:
        vals = [r[key] for r in rows if key in r]
        return float(np.mean(vals)) if vals else None

    return {"alpha": alpha, "status": "completed", "acc_in": mean(ind, "acc"), "macro_f1_in": mean(ind, "macro_f1"),
            "acc_ood": mean(ood, "acc"), "macro_f1_ood": mean(ood, "macro_f1"),
            "gap_acc": result["gap"].get("mean", {}).get("gap_acc"), "ppl_in": mean(ind, "ppl"),
            "lm_loss_in": mean(ind, "lm_loss"), "task_loss_in": mean(ind, "task_loss"), "ppl_ood": mean(ood, "ppl"),
            "wall_s": wall, "run": point.name, "error": ""}


def pareto_mask(points: list[tuple[float, float]]) -> list[bool]:
    """Non-dominated points when both coordinates are minimised."""
    return [not any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in points) for p in points]


def _write_results(sweep_dir: Path, rows: list[dict[str, Any]], final: bool = False) -> None:
    ok = [r for r in rows if r["status"] == "completed"]
    front = pareto_mask([(r["lm_loss_in"], r["task_loss_in"]) for r in ok])
    for r, f in zip(ok, front):
        r["pareto"] = f
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(sweep_dir / "results.csv", buf.getvalue())
    if final and ok:
        _plot(sweep_dir, ok)
        atomic_write_text(sweep_dir / "summary.md", _summary(sweep_dir, rows, ok))


def _plot(sweep_dir: Path, ok: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    panels = (("acc_in", "ppl_in", "in-domain"), ("acc_ood", "ppl_ood", "out-of-domain (mean)"))
    for ax, (acc, ppl, title) in zip(axes, panels):
        pts = [(r[ppl], -r[acc]) for r in ok if r[acc] is not None]
        rows = [r for r in ok if r[acc] is not None]
        front = pareto_mask(pts)
        for r, f in zip(rows, front):
            ax.scatter(r[ppl], r[acc], color="C0" if f else "0.7", zorder=3, s=40)
            ax.annotate(f"α={r['alpha']:g}", (r[ppl], r[acc]), textcoords="offset points", xytext=(5, 5), fontsize=9)
        fr = sorted((r for r, f in zip(rows, front) if f), key=lambda r: r[ppl])
        ax.plot([r[ppl] for r in fr], [r[acc] for r in fr], color="C0", lw=1.5, label="Pareto front")
        ax.set_xscale("log")
        ax.set_xlabel("perplexity (lower is better)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("task accuracy (higher is better)")
    axes[0].legend()
    fig.suptitle(f"L vs T trade-off over α: {sweep_dir.name}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(sweep_dir / "pareto.png", buf.getvalue())


def _summary(sweep_dir: Path, rows: list[dict[str, Any]], ok: list[dict[str, Any]]) -> str:
    def best(key: str, high: bool) -> str:
        cand = [r for r in ok if r.get(key) is not None]
        if not cand:
            return "-"
        r = (max if high else min)(cand, key=lambda r: r[key])
        return f"α={r['alpha']:g} ({key} = {r[key]:.4g})"

    lines = [f"# Sweep {sweep_dir.name}", "",
             f"{len(ok)}/{len(rows)} points completed. Pareto front on (in-domain lm_loss, task_loss): "
             + ", ".join(f"α={r['alpha']:g}" for r in ok if r.get("pareto")) + ".", "",
             "| goal | best α |", "| --- | --- |",
             f"| in-domain accuracy | {best('acc_in', True)} |",
             f"| out-of-domain accuracy | {best('acc_ood', True)} |",
             f"| in-domain perplexity | {best('ppl_in', False)} |",
             f"| smallest OOD gap (acc) | {best('gap_acc', False)} |", "",
             "| α | status | acc in | acc OOD | gap_acc | ppl in | ppl OOD | Pareto |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["status"] == "completed":
            cells = " | ".join(_f(r.get(k)) for k in ("acc_in", "acc_ood", "gap_acc", "ppl_in", "ppl_ood"))
            lines.append(f"| {r['alpha']:g} | completed | {cells} | {'yes' if r.get('pareto') else ''} |")
        else:
            lines.append(f"| {r['alpha']:g} | failed: {r['error']} | | | | | | |")
    lines += ["", "![Pareto front](pareto.png)", ""]
    return "\n".join(lines)


def _f(x: Any) -> str:
    return "-" if x is None else f"{x:.4f}"
