"""A sweep's report, rebuilt from its folders on disk: one row per point, the seed means, the Pareto fronts and
hypervolume, results.csv, pareto.png and summary.md."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from llmcli.experiments.sweep_grid import point_name, point_status
from llmcli.files import atomic_write_bytes, atomic_write_text, read_json
from llmcli.runs import read_metrics

COLUMNS = ("mode", "variable", "value", "seed", "status", "acc_in", "macro_f1_in", "acc_ood", "macro_f1_ood",
           "gap_acc", "ppl_in", "ppl_ood", "gap_ppl", "lm_loss_in", "task_loss_in", "grad_cosine", "pareto",
           "pareto_ood", "wall_s", "ppl_ratio_in", "ppl_ratio_ood", "ppl_before_in", "ppl_before_ood", "run", "error")


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
            "task_loss_in": mean(ind, "task_loss"), **_forgetting(result)}


def _forgetting(result: dict[str, Any]) -> dict[str, float | None]:
    """A point from pretrained weights: its mean ppl ratio (ppl / the base model's ppl) and the base's mean ppl,
    in-domain and OOD (eval's `forgetting`); nothing for a from-scratch point."""
    import numpy as np

    f = result.get("forgetting")
    if not f:
        return {}
    out: dict[str, float | None] = {}
    for where, domains in (("in", result["in_domain"]), ("ood", result["out_of_domain"])):
        rows = [f["domains"][d] for d in domains if d in f["domains"]]
        out[f"ppl_ratio_{where}"] = float(np.mean([r["ppl_ratio"] for r in rows])) if rows else None
        out[f"ppl_before_{where}"] = float(np.mean([r["ppl_before"] for r in rows])) if rows else None
    return out


def _mean_grad_cosine(run: Path) -> float | None:
    vals = [r["grad_cosine"] for r in read_metrics(run / "metrics.jsonl") if "grad_cosine" in r]
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
            status = point_status(pdir) if (pdir / "status.json").is_file() else None
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
                         "grad_cosine": _mean_grad_cosine(run), "wall_s": point_status(run).get("wall_s")})
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
              "grad_cosine", "wall_s", "ppl_ratio_in", "ppl_ratio_ood", "ppl_before_in", "ppl_before_ood")


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
        _draw_base(ax, agg, where)
        _style_axis(ax, panel, spans)
    axes[0].set_ylabel("task accuracy (higher is better)")
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle(f"L vs T trade-off over {var}: {title}\ncoloured = Pareto front of the panel "
                 "(perplexity ↓, accuracy ↑; results.csv pareto / pareto_ood), grey = dominated", fontsize=9)
    fig.tight_layout()
    return fig


def _draw_base(ax: Any, agg: list[dict[str, Any]], where: str) -> None:
    """A sweep on pretrained weights: the base model's perplexity (before any training) as a dashed line, so the
    points left of it retained (or gained) LM quality and those right of it forgot."""
    before = [a[f"ppl_before_{where}"] for a in agg if a.get(f"ppl_before_{where}")]
    if before:
        ax.axvline(before[0], color="0.4", ls="--", lw=1, label="base model (before)")


def _spans(rows: list[dict[str, Any]], where: str) -> tuple[float, float, float, float]:
    """(log10 x min, log10 x max, y min, y max) of a panel's points, every series together."""
    import math

    pts = [(math.log10(a[f"ppl_{where}"]), a[f"acc_{where}"]) for a in rows
           if a.get(f"ppl_{where}") and a.get(f"acc_{where}") is not None]
    # the base model's perplexity (a pretrained sweep's dashed line) stays inside the panel too
    before = [math.log10(a[f"ppl_before_{where}"]) for a in rows if a.get(f"ppl_before_{where}")]
    xs, ys = [p[0] for p in pts] + before or [0.0], [p[1] for p in pts] or [0.0]
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
_FORMATS = (("ppl_ratio", ".3f"), ("gap_ppl", "+.1f"), ("gap_", "+.3f"), ("acc", ".3f"), ("macro_f1", ".3f"),
            ("ppl", ".1f"), ("loss", ".3f"), ("grad_cosine", "+.3f"), ("wall_s", ".1f"), ("hypervolume", ".4f"))


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
    ratio = any(a.get("ppl_ratio_in") is not None for a in agg)  # points from pretrained weights
    keys = ("acc_in", "acc_ood", "gap_acc", "ppl_in", "ppl_ood", "gap_ppl", "grad_cosine", "wall_s",
            *(("ppl_ratio_in", "ppl_ratio_ood") if ratio else ()))
    lines = [f"| {var} | seeds | acc in | acc OOD | gap acc (in − OOD)¹ | ppl in | ppl OOD | gap ppl (in − OOD)¹ "
             "| grad_cosine | wall s² |" + (" ppl ratio in³ | ppl ratio OOD³ |" if ratio else ""),
             "|" + " --- |" * (len(keys) + 2)]
    for a in agg:
        cells = " | ".join(fmt(k, a[k], a[f"{k}_std"]) for k in keys)
        lines.append(f"| {a['value']:g} | {a['n']} | {cells} |")
    return lines + ["", "¹ gap = in-domain − out-of-domain (the mean over the OOD domains). For acc a positive gap "
                    "means OOD is less accurate (worse); for ppl a positive gap means OOD has the lower perplexity "
                    "(better) and a negative one that OOD is worse. ± = std over seeds.",
                    "² a point's training + evaluation wall time (mean over seeds; a conditioned sweep repeats its one "
                    "run's training time in every row).",
                    *(["³ ppl / the base model's ppl on the same records (eval's `forgetting`; the mean over the "
                       "in-domain / OOD domains): > 1 means the point lost LM quality, < 1 that it gained; the dashed "
                       "line of pareto.png is the base model's ppl."] if ratio else [])]
