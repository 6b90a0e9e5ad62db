"""`llmcli eval`: score a run on every domain of its data, report the in-domain vs OOD gap."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

from llmcli.errors import UserError
from llmcli.io import atomic_write_json

SPLITS = ("val", "test")


def evaluate(run_dir: str | Path, *, split: str = "test", checkpoint: str | None = None,
             log: Any = print) -> dict[str, Any]:
    """Per-domain metrics and gaps for one split; written to RUN_DIR/eval/<split>.json and returned."""
    import torch

    from llmcli.data.dataset import ProcessedData
    from llmcli.data.preprocess import preprocess
    from llmcli.losses import class_counts
    from llmcli.metrics import gaps, score
    from llmcli.models.load import load_trained
    from llmcli.registry import registry

    if split not in SPLITS:
        raise UserError(f"--split: {split!r} is not a split (allowed: {', '.join(SPLITS)})")
    run_dir = Path(run_dir)
    t = load_trained(run_dir, checkpoint or _default_checkpoint(run_dir))
    cfg = t.cfg
    torch.set_num_threads(cfg.train.threads or torch.get_num_threads())
    data = ProcessedData(preprocess(cfg.data, log=log))  # rebuilt from the saved config if the cache is gone
    tok_sha = hashlib.sha256((run_dir / "tokenizer.json").read_bytes()).hexdigest()
    if data.manifest["tokenizer_sha256"] != tok_sha:
        raise UserError(f"{run_dir}: the processed data at {data.path} was tokenized differently from this run")
    n_classes = len(data.label_names)
    counts = class_counts(data.labels[data.indices("train", data.train_domains + data.lm_only_domains)], n_classes)
    task_loss = registry("task_loss").build(cfg.task_loss, n_classes=n_classes, class_counts=counts)
    t0 = time.perf_counter()
    per_domain = {}
    for d in data.domains:
        idx = data.indices(split, [d])
        if cfg.eval.max_examples:
            idx = idx[: cfg.eval.max_examples]
        if len(idx):
            per_domain[d] = score(t.model, data, idx, cfg.eval.batch_size, task_loss)
    ind = [d for d in data.train_domains if d not in cfg.train.exclude_domains]
    result = {
        "run": str(run_dir),
        "split": split,
        "checkpoint": checkpoint or _default_checkpoint(run_dir),
        "step": t.checkpoint["step"],
        **selection(cfg, checkpoint or _default_checkpoint(run_dir)),
        "in_domain": ind,
        "out_of_domain": [d for d in per_domain if d not in ind],
        # held out entirely (--test-domains / data.split.holdout_domains): never trained on, never validated on
        "held_out": [d for d in per_domain if d in data.manifest.get("holdout_domains", [])],
        "domains": per_domain,
        "gap": gaps(per_domain, ind),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    (run_dir / "eval").mkdir(exist_ok=True)
    atomic_write_json(run_dir / "eval" / f"{split}.json", result)
    return result


def selection(cfg: Any, checkpoint: str) -> dict[str, Any]:
    """How the evaluated checkpoint was chosen: train.select_by for `best`; `oracle` is an upper bound."""
    select_by = cfg.train.select_by if checkpoint == "best" else "last step"
    return {"select_by": select_by, "upper_bound": select_by == "oracle"}


def _default_checkpoint(run_dir: Path) -> str:
    return "best" if (run_dir / "checkpoints" / "best.safetensors").is_file() else "last"


def render_table(result: dict[str, Any]) -> Any:
    """A rich table: one row per domain, the gap to the in-domain score beside acc."""
    from rich.markup import escape
    from rich.table import Table

    chosen = result.get("select_by", "train_domain_val")
    chosen += " - an upper bound, not a headline" if result.get("upper_bound") else ""
    # escaped: rich would read "[test split, ...]" as a markup tag and drop it
    table = Table(title=escape(f"{result['run']}  [{result['split']} split, {result['checkpoint']} checkpoint, "
                               f"step {result['step']}, selected by {chosen}]"))
    cols = ("n", "lm_loss", "ppl", "bpb", "task_loss", "acc", "macro_f1", "gap_acc")
    table.add_column("domain")
    for c in cols:
        table.add_column(c, justify="right")
    for d, m in result["domains"].items():
        gap = result["gap"].get(d, {}).get("gap_acc")
        name = f"{d} (in-domain)" if d in result["in_domain"] else d
        name += " (held out)" if d in result.get("held_out", []) else ""
        cells = [_fmt(m.get(c)) for c in cols[:-1]] + [_fmt(gap)]
        table.add_row(name, *cells)
    if "mean" in result["gap"]:
        table.add_row("mean OOD gap", *[""] * 6, "", _fmt(result["gap"]["mean"].get("gap_acc")))
    return table


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, int):
        return str(x)
    return f"{x:.4f}" if abs(x) < 100 else f"{x:.1f}"
