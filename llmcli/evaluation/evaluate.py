"""`llmcli eval`: score a run on every domain of its data, report the in-domain vs OOD gap.

eval/<split>.json holds, besides the per-domain metrics and gaps, each domain's confusion matrix and
reliability bins (the pictures beside it are drawn from them) and the sanity warnings.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from llmcli.errors import UserError
from llmcli.evaluation.baseline import check_name as check_baseline
from llmcli.evaluation.baseline import table_cells, table_columns, tfidf_baseline
from llmcli.evaluation.forgetting import caption as forgetting_caption
from llmcli.evaluation.forgetting import comparison_cells, comparison_columns
from llmcli.evaluation.forgetting import table_cells as forgetting_cells
from llmcli.evaluation.forgetting import table_columns as forgetting_columns
from llmcli.files import atomic_write_json

SPLITS = ("val", "test")
MIN_EXAMPLES = 100  # below this a split's score is not evidence
NEAR_LN_C = 0.95  # task loss above this share of ln(C) means the classifier is still near uniform


# A model hook: called on the loaded model before scoring (e.g. to set a conditioned run's FiLM alpha); what it
# returns (e.g. {"alpha": 0.25}) is recorded as the result's `condition`.
Prepare = Callable[[Any], dict[str, Any] | None]


def evaluate(run_dir: str | Path, *, split: str = "test", checkpoint: str | None = None,
             data_config: str | Path | None = None, plots: bool = True, write: bool = True,
             log: Any = print, prepare: Prepare | None = None, stem: str | None = None,
             baseline: str | None = None, base: bool = True) -> dict[str, Any]:
    """Per-domain metrics, gaps and warnings for one split; written to RUN_DIR/eval/<split>.json and returned.

    data_config: score on another data config's split instead (through the run's own tokenizer); the result
    then goes to RUN_DIR/eval/<split>-<config stem>.json. write=False: only return it (nothing in RUN_DIR changes).
    prepare: a model hook (see Prepare); stem: the output file's stem instead (e.g. test-alpha-0.25).
    baseline: also fit and score this reference (`tfidf`, llmcli/evaluation/baseline.py): the result's `baseline`.
    base: for a run from pretrained weights, also score its base model (llmcli/evaluation/forgetting.py): the
    result's `forgetting`.
    """
    result = score_run(run_dir, split=split, checkpoint=checkpoint, data_config=data_config, log=log, prepare=prepare,
                       baseline=baseline, base=base)
    if write:
        from llmcli.tracking import log_eval_artifacts

        written = write_result(Path(run_dir), result, stem or eval_stem(split, data_config), plots=plots)
        log_eval_artifacts(Path(run_dir), written, log)  # train.loggers has mlflow: to the run's MLflow run
    return result


def score_run(run_dir: str | Path, *, split: str = "test", checkpoint: str | None = None,
              data_config: str | Path | None = None, log: Any = print,
              prepare: Prepare | None = None, baseline: str | None = None, base: bool = True) -> dict[str, Any]:
    """The eval result of one run and split, computed without writing anything into the run folder (base: with
    the base model's LM figures beside the run's, for a run from pretrained weights)."""
    import torch

    from llmcli.evaluation.forgetting import measure
    from llmcli.models.load import load_trained

    if split not in SPLITS:
        raise UserError(f"--split: {split!r} is not a split (allowed: {', '.join(SPLITS)})")
    check_baseline(baseline)
    run_dir = Path(run_dir)
    t = load_trained(run_dir, checkpoint)  # runs.choose_checkpoint: None = best if the run has it, else last
    which = t.which
    condition = prepare(t.model) if prepare else None
    torch.set_num_threads(t.cfg.train.threads or torch.get_num_threads())
    data, leaks = _data(run_dir, t, data_config, split, log)
    scored, task_loss = scored_indices(t.cfg, data, split), eval_task_loss(t.cfg, data)
    per_domain, details, seconds = _score_domains(t, data, scored, task_loss, log)
    judged = _judged(t, data, split, per_domain, details, leaks)
    forgetting = measure(t, data, scored, per_domain, judged["in_domain"], task_loss, data_config=data_config,
                         log=log) if base else None
    return {
        "run": str(run_dir),
        "split": split,
        "data": str(data_config) if data_config else "run",
        "checkpoint": which,
        "lm": t.model.lm_kind(),  # "masked": an encoder's lm_loss / ppl / bpb are masked-LM figures
        "step": t.checkpoint["step"],
        **({"condition": condition} if condition else {}),
        **selection(t.cfg, which),
        **judged,
        **({"baseline": tfidf_baseline(t.cfg, t.manifest, data, scored, judged["in_domain"], run_dir=run_dir,
                                       data_config=data_config, log=log)} if baseline else {}),
        **({"forgetting": forgetting} if forgetting else {}),
        "seconds": round(seconds, 2),
        "ms_per_example": round(1000 * seconds / max(sum(m["n"] for m in per_domain.values()), 1), 4),
    }


def scored_indices(cfg: Any, data: Any, split: str) -> dict[str, np.ndarray]:
    """The records eval scores per domain of `split` (at most eval.max_examples, a seeded draw in file order; the
    same records for every run on the same data; domains without any left out)."""
    from llmcli.data.dataset import EVAL_SEED, capped

    out = {}
    for d in data.domains:
        idx = capped(data.indices(split, [d]), cfg.eval.max_examples, EVAL_SEED)
        if len(idx):
            out[d] = idx
    return out


def eval_task_loss(cfg: Any, data: Any) -> Any:
    """The run's task loss, built as training built it (class counts of its training split)."""
    from llmcli.registry import registry
    from llmcli.training.losses import class_counts

    n_classes = len(data.label_names)
    counts = class_counts(data.labels[data.indices("train", data.train_domains + data.lm_only_domains)], n_classes)
    return registry("task_loss").build(cfg.task_loss, n_classes=n_classes, class_counts=counts)


def _score_domains(t: Any, data: Any, scored: dict[str, np.ndarray], task_loss: Any,
                   log: Any = print) -> tuple[dict[str, Any], dict[str, Any], float]:
    """metrics.score per domain on its scored records; the probabilities/golds; seconds taken (computing a frozen
    prefix not cached yet included: `llmcli.models.prefix_cache`, read as the run's training read it)."""
    from llmcli.evaluation.metrics import score
    from llmcli.models.prefix_cache import for_eval

    t0 = time.perf_counter()
    prefix = for_eval(t, data, log)
    per_domain, details = {}, {}
    for d, idx in scored.items():
        details[d] = {}
        per_domain[d] = score(t.model, data, idx, t.cfg.eval.batch_size, task_loss, details=details[d],
                              prefix=prefix)
    return per_domain, details, time.perf_counter() - t0


def _judged(t: Any, data: Any, split: str, per_domain: dict[str, Any], details: dict[str, Any],
            leaks: int) -> dict[str, Any]:
    """In-domain / OOD / held-out domains, the gaps, warnings, confusion matrices and reliability bins."""
    from llmcli.evaluation.metrics import gaps, reliability_bins

    # in-domain = what the run trained on (less excluded domains), also when scoring another config's data
    in_dom = [d for d in t.manifest["train_domains"] if d in per_domain and d not in t.cfg.train.exclude_domains]
    labeled = {d: x for d, x in details.items() if "golds" in x}
    return {
        "in_domain": in_dom,
        "out_of_domain": [d for d in per_domain if d not in in_dom],
        # held out entirely (--test-domains / data.split.holdout_domains): never trained on, never validated on
        "held_out": [d for d in per_domain if d in data.manifest.get("holdout_domains", [])],
        "label_names": data.label_names,
        "domains": per_domain,
        "gap": gaps(per_domain, in_dom) if in_dom else {},  # no in-domain data: nothing to measure a gap from
        "warnings": sanity_warnings(split, per_domain, labeled, data.label_names, leaks),
        "confusion": {d: _confusion(x, len(data.label_names)) for d, x in labeled.items()},
        "calibration": {d: reliability_bins(x["probs"], x["golds"]) for d, x in labeled.items()},
    }


def eval_stem(split: str, data_config: str | Path | None = None) -> str:
    """The file stem of an eval result: <split>, or <split>-<config stem> when scored on another config's data."""
    return split if not data_config else f"{split}-{Path(data_config).stem}"


NO_WRITE_HINT = "`llmcli eval --no-write` prints the scores without writing"


def write_result(run_dir: Path, result: dict[str, Any], stem: str, *, plots: bool = True) -> list[Path]:
    """Write eval/<stem>.json and, with plots, its pictures and curves.png; returns the files written."""
    out = Path(run_dir) / "eval" / f"{stem}.json"
    try:
        out.parent.mkdir(exist_ok=True)
    except OSError as exc:
        raise UserError(f"{out.parent}: cannot write the eval result here ({exc.strerror}); {NO_WRITE_HINT}") from None
    try:
        atomic_write_json(out, result)
        return [out, *(draw(Path(run_dir), result, stem) if plots else [])]
    except UserError as exc:  # e.g. a read-only eval/ folder: say how to get the scores anyway
        raise UserError(f"{exc}; {NO_WRITE_HINT}") from None


def draw(run_dir: Path, result: dict[str, Any], stem: str) -> list[Path]:
    """The pictures of an eval result: eval/<stem>-confusion.png, eval/<stem>-reliability.png, curves.png."""
    from llmcli.evaluation.plots import confusion_png, curves_png, reliability_png

    out = []
    if result["confusion"]:
        out.append(confusion_png(result, run_dir / "eval" / f"{stem}-confusion.png"))
        out.append(reliability_png(result, run_dir / "eval" / f"{stem}-reliability.png"))
    curves = curves_png(run_dir)
    return out + ([curves] if curves else [])


def _data(run_dir: Path, t: Any, data_config: str | Path | None, split: str, log: Any) -> tuple[Any, int]:
    """The data to score on (the run's own, or another config's through the run's tokenizer) and the number
    of groups of `split` the run trained on."""
    from llmcli.data.dataset import ProcessedData
    from llmcli.data.preprocess import preprocess

    if data_config is not None:
        from llmcli.data.rescore import tokenized_with_run

        data, seen = tokenized_with_run(Path(data_config), run_dir, t, log=log)
        return data, seen[split]
    data = ProcessedData(preprocess(t.cfg.data, log=log))  # rebuilt from the saved config if the cache is gone
    tok_sha = hashlib.sha256((run_dir / "tokenizer.json").read_bytes()).hexdigest()
    if data.manifest["tokenizer_sha256"] != tok_sha:
        raise UserError(f"{run_dir}: the processed data at {data.path} was tokenized differently from this run")
    return data, _group_leaks(data, split)


def _confusion(x: dict[str, np.ndarray], n_classes: int) -> list[list[int]]:
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(x["golds"], x["probs"].argmax(-1), labels=list(range(n_classes))).tolist()


def _group_leaks(data: Any, split: str) -> int:
    """Groups (e.g. chapters) of `split` that also occur in the train split: leaked evidence."""
    path = Path(data.path) / "groups.npy"
    if not path.is_file():
        return 0
    groups = np.load(path)
    train = set(groups[data.indices("train")].tolist())
    return len(set(groups[data.indices(split)].tolist()) & train)


def sanity_warnings(split: str, per_domain: dict[str, dict[str, float]], labeled: dict[str, dict[str, np.ndarray]],
                    label_names: list[str], group_leaks: int) -> list[str]:
    """Reasons not to trust a score: small split, chance-level accuracy, near-uniform loss, missing class, leak."""
    out = []
    n_classes = len(label_names)
    for d, m in per_domain.items():
        if m["n"] < MIN_EXAMPLES:
            out.append(f"{d}: the {split} split has {m['n']} examples (< {MIN_EXAMPLES}); its scores are not evidence")
        if d not in labeled:
            continue
        golds = labeled[d]["golds"]
        counts = np.bincount(golds, minlength=n_classes)
        chance = counts.max() / counts.sum()  # the majority-class rate: a constant guess scores this much
        if m["acc"] <= chance:
            out.append(f"{d}: acc {m['acc']:.3f} is not above chance (majority class {chance:.3f})")
        if n_classes > 1 and m["task_loss"] >= NEAR_LN_C * math.log(n_classes):
            out.append(f"{d}: task_loss {m['task_loss']:.3f} is not clearly below ln(C) = {math.log(n_classes):.3f}, "
                       f"the loss of a uniform guess over {n_classes} classes")
        missing = [label_names[c] for c in np.flatnonzero(counts == 0)]
        if missing:
            out.append(f"{d}: class(es) missing from the {split} split: {', '.join(missing)}")
    if group_leaks:
        out.append(f"{group_leaks} group(s) of the {split} split also appear in the run's train split (leak)")
    return out


def selection(cfg: Any, checkpoint: str) -> dict[str, Any]:
    """How the evaluated checkpoint was chosen: train.select_by for `best`; `oracle` is an upper bound."""
    select_by = cfg.train.select_by if checkpoint == "best" else "last step"
    return {"select_by": select_by, "upper_bound": select_by == "oracle"}


TABLE_COLS = ("n", "lm_loss", "ppl", "bpb", "task_loss", "acc", "macro_f1", "macro_recall", "ece")


GAP_HEADER = "gap_acc (in − OOD)"


def render_table(result: dict[str, Any]) -> Any:
    """A rich table: one row per domain, the gap to the in-domain score beside acc, the gap's sign explained."""
    from rich.markup import escape
    from rich.table import Table

    chosen = result.get("select_by", "train_domain_val")
    chosen += " - an upper bound, not a headline" if result.get("upper_bound") else ""
    # escaped: rich would read "[test split, ...]" as a markup tag and drop it
    table = Table(title=escape(f"{result['run']}  [{result['split']} split, {result['checkpoint']} checkpoint, "
                               f"step {result['step']}, selected by {chosen}]"),
                  caption=gap_caption(result) + forgetting_caption(result))
    table.add_column("domain")
    for c in (*TABLE_COLS, GAP_HEADER, *table_columns(result), *forgetting_columns(result)):
        table.add_column(c, justify="right")
    for d, m in result["domains"].items():
        gap = result["gap"].get(d, {}).get("gap_acc")
        name = f"{d} (in-domain)" if d in result["in_domain"] else d
        name += " (held out)" if d in result.get("held_out", []) else ""
        table.add_row(name, *[_fmt(m.get(c)) for c in TABLE_COLS], _fmt(gap), *map(_fmt, table_cells(result, d)),
                      *map(_fmt, forgetting_cells(result, d)))
    if "mean" in result["gap"]:
        mean = result["gap"]["mean"]
        table.add_row("mean OOD gap (in − OOD)", "", *[_fmt(mean.get(f"gap_{c}")) for c in TABLE_COLS[1:]],
                      _fmt(mean.get("gap_acc")), *map(_fmt, table_cells(result, None)),
                      *map(_fmt, forgetting_cells(result, None)))
        # the same sign means opposite things per metric: say which side is "OOD is worse" under each number
        table.add_row("  OOD is worse if", "", *[ood_worse_if(c) for c in TABLE_COLS[1:]], ood_worse_if("acc"),
                      *["> 0" for _ in table_columns(result)],  # the baseline's columns are acc, macro_f1, gap_acc
                      *["" for _ in forgetting_columns(result)])  # before / after, not in − OOD
    return table


def ood_worse_if(metric: str) -> str:
    """The sign of gap_<metric> (in-domain − OOD) that means the OOD score is worse: > 0 for accuracies, < 0 for losses."""
    from llmcli.evaluation.metrics import HIGHER_IS_BETTER

    return "> 0" if metric in HIGHER_IS_BETTER else "< 0"


def gap_caption(result: dict[str, Any] | None = None) -> str:
    """What the gap numbers of the eval table are and which sign is bad, per kind of metric (and the baseline)."""
    tfidf = ("; tfidf: word 1-2-gram TF-IDF + logistic regression fitted on the run's training split, scored on the "
             "same records (--baseline)") if result and result.get("baseline") else ""
    return ("gap = in-domain − OOD: per OOD domain in the gap_acc column, their mean in the last rows; "
            "OOD is worse where a gap is > 0 for acc, macro_f1, macro_recall and < 0 for lm_loss, ppl, bpb, "
            "task_loss, ece" + tfidf + masked_lm_note(result))


def masked_lm_note(result: dict[str, Any] | None) -> str:
    """For an encoder: its LM columns are masked-LM figures, not next-token ones."""
    return ("; lm_loss / ppl / bpb: masked LM, the NLL of each record's masked tokens (BERT's 15 %, the same mask "
            "every eval) per token / per UTF-8 byte") if result and result.get("lm") == "masked" else ""


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, int):
        return str(x)
    return f"{x:.4f}" if abs(x) < 100 else f"{x:.1f}"


COMPARE_COLS = ("acc", "macro_f1", "ece", "ppl", "bpb")


def render_comparison(results: list[dict[str, Any]]) -> Any:
    """One table for several runs: rows = runs, columns = in-domain and mean out-of-domain metrics and gaps."""
    from rich.table import Table

    table = Table(title=f"{len(results)} runs  [{results[0]['split']} split]",
                  caption="in / ood: means over the in-domain / OOD domains; "
                          "gap_acc = in-domain − OOD acc (mean over OOD domains): > 0 means OOD is worse"
                          + ("; ppl ratio = ppl / the base model's ppl (mean over the domains): > 1 means the run "
                             "lost LM quality" if comparison_columns(results) else ""))
    table.add_column("run")
    for c in COMPARE_COLS:
        table.add_column(f"in {c}", justify="right")
    for c in COMPARE_COLS:
        table.add_column(f"ood {c}", justify="right")
    table.add_column(GAP_HEADER, justify="right")
    for c in comparison_columns(results):  # runs from pretrained weights: ppl / the base model's ppl
        table.add_column(c, justify="right")
    for r in results:
        table.add_row(Path(r["run"]).name, *[_fmt(v) for v in _side(r, r["in_domain"])],
                      *[_fmt(v) for v in _side(r, r["out_of_domain"])], _fmt(r["gap"].get("mean", {}).get("gap_acc")),
                      *map(_fmt, comparison_cells(r, results)))
        if "baseline" in r:  # the run's bag-of-words reference, on the same records, right under it
            b = r["baseline"]
            table.add_row(f"  {b['name']} (same data)", *[_fmt(v) for v in _side(b, r["in_domain"])],
                          *[_fmt(v) for v in _side(b, r["out_of_domain"])], _fmt(b["gap"].get("mean", {}).get("gap_acc")),
                          *["-" for _ in comparison_columns(results)])
    return table


def _side(result: dict[str, Any], domains: list[str]) -> list[float | None]:
    """Mean of each comparison metric over some domains (None when no domain has it)."""
    out = []
    for c in COMPARE_COLS:
        vals = [result["domains"][d][c] for d in domains if c in result["domains"].get(d, {})]
        out.append(float(np.mean(vals)) if vals else None)
    return out
