"""A search's report, rebuilt from its study and trial folders: results.csv, summary.md (best trials and the
command that re-trains each), best/trial-NNNN.yaml, the parameter importances and the Pareto front."""

from __future__ import annotations

import csv
import io
import shlex
import shutil
from pathlib import Path
from typing import Any

from llmcli.experiments.search_space import (
    Objective,
    objectives_of,
    space_of,
    storage_url,
    trial_name,
    trial_values,
    yaml_text,
)
from llmcli.experiments.sweep_grid import point_status
from llmcli.experiments.sweep_report import fmt
from llmcli.files import atomic_write_bytes, atomic_write_text

MIN_FOR_IMPORTANCE = 5  # complete trials before parameter importances say anything (and >= 2 parameters)


def _states() -> Any:
    from optuna.trial import TrialState

    return TrialState


def best_trials(study: Any) -> list[Any]:
    """The best trial (one objective) or the Pareto front (several: Optuna's study.best_trials), by number."""
    states = _states()
    if not study.get_trials(deepcopy=False, states=(states.COMPLETE,)):
        return []
    best = study.best_trials if len(study.directions) > 1 else [study.best_trial]
    return sorted(best, key=lambda t: t.number)


def collect_rows(folder: Path, state: dict[str, Any], study: Any) -> list[dict[str, Any]]:
    """One row per trial of the study (waiting ones aside): number, state, parameters, objectives, test, wall."""
    goals, space = objectives_of(state), space_of(state)
    best = {t.number for t in best_trials(study)}
    rows = []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if t.state == _states().WAITING:
            continue
        pdir = folder / trial_name(t.number)
        status = point_status(pdir)
        done = t.state == _states().COMPLETE
        test = trial_values(pdir, goals, state["groups"], "test") if done else [None] * len(goals)
        rows.append({"number": t.number, "state": t.state.name, **{p.field: t.params.get(p.field) for p in space},
                     **{f"val:{o.key}": (t.values[i] if done else None) for i, o in enumerate(goals)},
                     **{f"test:{o.key}": v for o, v in zip(goals, test)},
                     "best": t.number in best if done else "", "pruned_at_step": status.get("step", "")
                     if t.state == _states().PRUNED else "", "wall_s": status.get("wall_s"),
                     "run": pdir.name if pdir.is_dir() else "", "retry_of": t.user_attrs.get("retry_of", ""),
                     "error": t.user_attrs.get("error", "") if t.state != _states().COMPLETE else ""})
    return rows


def columns(state: dict[str, Any]) -> list[str]:
    goals = objectives_of(state)
    return ["number", "state", *(p["field"] for p in state["params"]), *(f"val:{o.key}" for o in goals),
            *(f"test:{o.key}" for o in goals), "best", "pruned_at_step", "wall_s", "run", "retry_of", "error"]


def write_report(folder: Path, state: dict[str, Any], study: Any) -> list[dict[str, Any]]:
    """results.csv, best/*.yaml, importance.png, pareto.png (several objectives) and summary.md; the rows."""
    rows = collect_rows(folder, state, study)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns(state), extrasaction="ignore")
    writer.writeheader()
    fields = {p["field"] for p in state["params"]}
    for r in rows:  # parameters exactly (they re-train a trial), metrics to 6 significant digits
        writer.writerow({k: (yaml_text(v) if k in fields and v is not None else f"{v:.6g}" if isinstance(v, float)
                             else v) for k, v in r.items()})
    atomic_write_text(folder / "results.csv", buf.getvalue())
    best = best_trials(study)
    _best_configs(folder, best)
    importance = _importance(folder, state, study)
    pareto = _pareto_plot(folder, state, study, best) if len(state["objectives"]) > 1 and best else False
    atomic_write_text(folder / "summary.md", _summary(folder, state, study, rows, best, importance, pareto))
    return rows


def _best_configs(folder: Path, best: list[Any]) -> None:
    """best/trial-NNNN.yaml: each best trial's exact config (its run folder's config.yaml); stale ones removed."""
    out = folder / "best"
    keep = {f"{trial_name(t.number)}.yaml" for t in best}
    if out.is_dir():
        for f in out.glob("trial-*.yaml"):
            if f.name not in keep:
                f.unlink()
    for t in best:
        src = folder / trial_name(t.number) / "config.yaml"
        if src.is_file():
            out.mkdir(exist_ok=True)
            shutil.copyfile(src, out / f"{trial_name(t.number)}.yaml")


def retrain_command(folder: Path, state: dict[str, Any], trial: Any) -> str:
    """The `llmcli train` line that re-trains a trial: the base config with its values (and its thread count when
    the plan changed it: the same threads give the same numbers bit for bit)."""
    import yaml

    sets = [f"{k}={yaml_text(v)}" for k, v in trial.params.items()]
    cfg_file = folder / trial_name(trial.number) / "config.yaml"
    try:
        threads = yaml.safe_load(cfg_file.read_text())["train"]["threads"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        threads = None
    if threads is not None and threads != state["config"]["train"].get("threads"):
        sets.append(f"train.threads={threads}")
    return shlex.join(["llmcli", "train", str(folder / "base.yaml"), *(a for s in sets for a in ("--set", s))])


# ---------------------------------------------------------------- figures


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _importance(folder: Path, state: dict[str, Any], study: Any) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Optuna's parameter importances per objective (fANOVA, seeded with the search's seed: it needs no quantile
    split of the trials, which Optuna's default PED-ANOVA cannot make on a few trials), drawn into importance.png;
    and why any objective has none."""
    import optuna

    complete = len(study.get_trials(deepcopy=False, states=(_states().COMPLETE,)))
    if len(state["params"]) < 2 or complete < MIN_FOR_IMPORTANCE:
        (folder / "importance.png").unlink(missing_ok=True)
        return {}, [f"Not computed: parameter importances need at least 2 parameters and {MIN_FOR_IMPORTANCE} "
                    f"complete trials (this search: {len(state['params'])} parameter(s), {complete} complete)."]
    out, why = {}, []
    for i, o in enumerate(objectives_of(state)):
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=state["seed"])
        try:
            out[o.key] = optuna.importance.get_param_importances(study, evaluator=evaluator,
                                                                 target=lambda t, i=i: t.values[i])
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:  # e.g. an objective that never varied
            why.append(f"Not computed for {o.key}: Optuna could not estimate them ({exc}).")
    if out:
        _importance_plot(folder, out)
    else:
        (folder / "importance.png").unlink(missing_ok=True)
    return out, why


def _importance_plot(folder: Path, importance: dict[str, dict[str, float]]) -> None:
    """importance.png: one bar per parameter and objective."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    params = sorted({p for imp in importance.values() for p in imp})
    fig, ax = plt.subplots(figsize=(6.5, 0.6 + 0.5 * len(params) * len(importance)))
    height = 0.8 / len(importance)
    for k, (key, imp) in enumerate(importance.items()):
        ax.barh(np.arange(len(params)) + k * height, [imp.get(p, 0.0) for p in params], height=height, label=key)
    ax.set_yticks(np.arange(len(params)) + height * (len(importance) - 1) / 2, params)
    ax.set_xlabel("importance (fANOVA share of the objective's variance)")
    ax.set_title(f"{folder.name}: parameter importances", fontsize=9)
    ax.legend(fontsize=8)
    _save(fig, folder / "importance.png")


def _label(o: Objective) -> str:
    return f"{o.key} (val, {'higher' if o.direction == 'maximize' else 'lower'} is better)"


def _pareto_plot(folder: Path, state: dict[str, Any], study: Any, best: list[Any]) -> bool:
    """pareto.png: every complete trial (grey) and the front (coloured, numbered); one panel per pair of objectives."""
    import itertools

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    goals = objectives_of(state)
    pairs = list(itertools.combinations(range(len(goals)), 2))
    fig, axes = plt.subplots(1, len(pairs), figsize=(5.5 * len(pairs), 4.5), squeeze=False)
    done = study.get_trials(deepcopy=False, states=(_states().COMPLETE,))
    front = {t.number for t in best}
    for ax, (i, j) in zip(axes[0], pairs):
        others = [t for t in done if t.number not in front]
        ax.scatter([t.values[i] for t in others], [t.values[j] for t in others], color="0.7", label="dominated")
        on = sorted((t for t in done if t.number in front), key=lambda t: t.values[i])
        ax.plot([t.values[i] for t in on], [t.values[j] for t in on], "o-", color="C0", label="Pareto front")
        for t in done:
            ax.annotate(str(t.number), (t.values[i], t.values[j]), textcoords="offset points", xytext=(5, 4),
                        fontsize=8, color="C0" if t.number in front else "0.5")
        ax.set_xlabel(_label(goals[i]))
        ax.set_ylabel(_label(goals[j]))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{folder.name}: {len(done)} complete trials, front = study.best_trials (numbers: trial)", fontsize=9)
    _save(fig, folder / "pareto.png")
    return True


# ---------------------------------------------------------------- hypervolume


def hypervolume_of(state: dict[str, Any], study: Any) -> tuple[float, list[float]] | None:
    """pymoo's hypervolume of the complete trials, every objective turned into a minimised one (a maximised one
    negated), against a reference 10 % of each objective's range beyond its worst value; None if < 1 trial."""
    import numpy as np
    from pymoo.indicators.hv import HV

    goals = objectives_of(state)
    done = study.get_trials(deepcopy=False, states=(_states().COMPLETE,))
    if not done:
        return None
    pts = np.array([[(-v if o.direction == "maximize" else v) for o, v in zip(goals, t.values)] for t in done])
    worst, span = pts.max(axis=0), pts.max(axis=0) - pts.min(axis=0)
    ref = worst + 0.1 * np.where(span > 0, span, np.maximum(np.abs(worst), 1e-9))
    # round: a reference of -1e-12 would print as -0.000
    return float(HV(ref_point=ref)(pts)), [round(float(-r if o.direction == "maximize" else r), 9) + 0.0
                                           for o, r in zip(goals, ref)]


# ---------------------------------------------------------------- summary.md


def _summary(folder: Path, state: dict[str, Any], study: Any, rows: list[dict[str, Any]], best: list[Any],
             importance: tuple[dict[str, dict[str, float]], list[str]], pareto: bool) -> str:
    goals = objectives_of(state)
    lines = _head_lines(folder, state, rows, goals) + _best_lines(folder, state, best, goals)
    if len(goals) > 1:
        hv = hypervolume_of(state, study)
        if hv:
            ref = ", ".join(f"{o.key} = {fmt(o.metric, r)}" for o, r in zip(goals, hv[1]))
            lines += ["", f"Hypervolume of the complete trials (pymoo; maximised objectives negated): "
                      f"**{fmt('hypervolume', hv[0])}**, reference point {ref} (10 % of each objective's range "
                      "beyond its worst value)."]
        lines += ["", "![Pareto front](pareto.png)"] if pareto else []
    lines += ["", "## Parameter importance", "", *_importance_lines(importance)]
    bad = [r for r in rows if r["state"] in ("FAIL", "RUNNING")]
    if bad:
        lines += ["", "## Failed or cut-off trials", ""]
        lines += [f"- {trial_name(r['number'])}: {r['state']}: {r['error'] or 'cut off; --resume continues it'}"
                  for r in bad]
    return "\n".join(lines) + "\n"


def _head_lines(folder: Path, state: dict[str, Any], rows: list[dict[str, Any]], goals: list[Objective]) -> list[str]:
    """What was searched, how the trials ended, where the study is."""
    count = {s: sum(r["state"] == s for r in rows) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
    pruner = state["pruner"]["name"] + "".join(f" {k}={v}" for k, v in state["pruner"]["kwargs"].items())
    url = storage_url(folder)
    return [f"# Search {folder.name}", "",
             f"{state['trials']} trials asked ({state['sampler']} sampler, seed {state['seed']}; pruner {pruner}): "
             f"{count['COMPLETE']} complete, {count['PRUNED']} pruned, {count['FAIL']} failed, {count['RUNNING']} cut "
             "off (`--resume` continues them).", "",
             "Parameters: " + "; ".join(f"`{p.text}`" for p in space_of(state)) + ".", "",
             "Objectives, on the **validation** split (eval/val.json, the best checkpoint; `in_domain` / `ood` = the "
             "mean over the trained-on / the other validated domains): " + ", ".join(_label(o) for o in goals)
             + ". The test split (eval/test.json) is reported beside them and never used to choose.", "",
             f"Study: `optuna.load_study(study_name={state['study_name']!r}, storage={url!r})`; "
             f"`optuna-dashboard {url}`.", ""]


def _best_lines(folder: Path, state: dict[str, Any], best: list[Any], goals: list[Objective]) -> list[str]:
    if not best:
        return ["No trial completed yet."]
    title = "## Best trial" if len(goals) == 1 else f"## Pareto front ({len(best)} trial(s), study.best_trials)"
    head = [p["field"] for p in state["params"]]
    lines = [title, "", "| trial | " + " | ".join(head) + " | " + " | ".join(f"{o.key} (val)" for o in goals)
             + " | " + " | ".join(f"{o.key} (test)" for o in goals) + " |",
             "|" + " --- |" * (1 + len(head) + 2 * len(goals))]
    for t in best:
        test = trial_values(folder / trial_name(t.number), goals, state["groups"], "test")
        cells = [yaml_text(t.params[h]) for h in head] + [fmt(o.metric, v) for o, v in zip(goals, t.values)] \
            + [fmt(o.metric, v) for o, v in zip(goals, test)]
        lines.append(f"| {t.number} | " + " | ".join(cells) + " |")
    lines += ["", "Re-train (the exact config: `llmcli train best/trial-NNNN.yaml`; or the base config with the values):",
              ""]
    lines += [f"- trial {t.number}: `{retrain_command(folder, state, t)}`" for t in best]
    return lines


def _importance_lines(importance: tuple[dict[str, dict[str, float]], list[str]]) -> list[str]:
    done, notes = importance
    if not done:
        return notes
    params = sorted({p for imp in done.values() for p in imp})
    lines = ["Optuna's `get_param_importances` (fANOVA: the share of each objective's variance):", "",
             "| parameter | " + " | ".join(done) + " |", "|" + " --- |" * (1 + len(done))]
    lines += [f"| {p} | " + " | ".join(f"{imp.get(p, 0.0):.3f}" for imp in done.values()) + " |" for p in params]
    return lines + ["", *notes, *([""] if notes else []), "![Parameter importance](importance.png)"]
