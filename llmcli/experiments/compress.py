"""`llmcli compress`: a pruned and/or int8-quantised copy of a run, as a new self-describing run folder.

Pruning: torch.nn.utils.prune (L1, unstructured, per Linear layer; made permanent). Quantisation: torch's
dynamic int8 quantisation of Linear layers on CPU. The tied LM head shares the embedding matrix and stays float.
How the compressed checkpoint is stored and loaded back is the models' business: llmcli/models/formats.py.
A LoRA run is merged first (each adapter into its base layer, llmcli/models/lora.py): the compressed run then
holds the whole merged model, as a run without adapters does.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmcli.errors import UserError
from llmcli.files import atomic_write_json
from llmcli.models.formats import (
    FLOAT_PREFIX,
    QLINEAR_PREFIX,
    QUANTIZE,
    RECORD,
    compressed_tensors,
    float_state,
    quantize_int8,
)
from llmcli.runs import publish_run, staging_dir, write_derived_run


def check_options(quantize: str | None, prune: float | None) -> None:
    """At least one of --quantize / --prune, each in its range."""
    if quantize is None and prune is None:
        raise UserError("compress: give --quantize int8, --prune FRACTION, or both")
    if quantize is not None and quantize not in QUANTIZE:
        raise UserError(f"--quantize: {quantize!r} is not supported (allowed: {', '.join(QUANTIZE)})")
    if prune is not None and not 0 < prune < 1:
        raise UserError(f"--prune: must be a fraction in (0, 1), got {prune}")


def compressible(model: nn.Module) -> list[str]:
    """Names of the Linear layers to prune/quantise: all but one sharing its weight with an embedding."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and id(m.weight) not in embeddings]


def prune_linear(model: nn.Module, names: list[str], amount: float) -> float:
    """Zero the `amount` smallest-|w| share of each named Linear weight (permanently); returns the sparsity."""
    from torch.nn.utils import prune

    mods = dict(model.named_modules())
    zeros = total = 0
    for n in names:
        prune.l1_unstructured(mods[n], "weight", amount=amount)
        prune.remove(mods[n], "weight")  # bake the mask into the weight: a plain Linear again
        zeros += int((mods[n].weight == 0).sum())
        total += mods[n].weight.numel()
    return zeros / max(total, 1)


def compress(run_dir: str | Path, *, quantize: str | None = None, prune: float | None = None,
             runs_dir: str | Path | None = None, checkpoint: str | None = None, split: str = "test",
             log: Any = print) -> Path:
    """Write a compressed copy of a run and its side-by-side report (compress.json) as a new run folder; return it.

    The parent is only read (its eval is computed, not written). The child is built in a hidden temp folder beside
    its target and renamed into place once complete, so a failure or Ctrl-C leaves no run folder behind.
    """
    from llmcli.evaluation.evaluate import SPLITS
    from llmcli.models.load import load_trained

    check_options(quantize, prune)
    if split not in SPLITS:
        raise UserError(f"--split: {split!r} is not a split (allowed: {', '.join(SPLITS)})")
    parent = Path(run_dir)
    t = load_trained(parent, checkpoint)
    which = t.which
    if t.checkpoint.get(RECORD):
        raise UserError(f"{parent}: already a compressed run; compress its parent {t.checkpoint[RECORD]['parent']}")
    model, record = _compressed_model(t, parent, which, quantize, prune)
    root = Path(runs_dir) if runs_dir else parent.parent
    staging = staging_dir(root, "compress")
    try:
        _write_child(staging, parent, t, model, record)
        report = side_by_side(parent, staging, split=split, parent_checkpoint=which, log=log)
        tag = "-".join(x for x in (quantize, f"p{round(prune * 100)}" if prune else None) if x)
        out = publish_run(staging, root, f"{t.cfg.name}-{tag}",
                          lambda out: atomic_write_json(staging / "compress.json", {**report, "compressed": str(out)}))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # nothing half-written
        raise
    log(f"compress: wrote {out}")
    return out


def _compressed_model(t: Any, parent: Path, which: str, quantize: str | None,
                      prune: float | None) -> tuple[nn.Module, dict[str, Any]]:
    """The parent's model (a LoRA run's adapters merged) pruned and/or quantised (in memory) and the sidecar's
    `compression` record."""
    from llmcli.models.lora import is_lora, merge_lora

    model = t.model.cpu().eval()
    merged = merge_lora(model) if is_lora(model) else 0
    names = compressible(model)
    record: dict[str, Any] = {"parent": str(parent), "parent_checkpoint": which, "quantize": quantize, "prune": prune,
                              "quantized": names if quantize else [], "pruned": names if prune else [],
                              "merged_lora_layers": merged}
    if prune:
        record["sparsity"] = prune_linear(model, names, prune)
    if quantize:
        quantize_int8(model, names)
    return model, record


def _write_child(out: Path, parent: Path, t: Any, model: nn.Module, record: dict[str, Any]) -> None:
    """The compressed run's files: the parent's config, tokenizer and data manifest, the checkpoint, meta.json."""
    write_derived_run(out, parent, compressed_tensors(model), RECORD, record, step=t.checkpoint["step"],
                      seed=t.cfg.seed, name=t.cfg.name, meta={"parent": str(parent)})


def weight_bytes(run_dir: Path, which: str) -> int:
    """Bytes of a run's model weights: distinct float tensors (a tied matrix once) plus stored int8 layers."""
    from safetensors.torch import load_file

    from llmcli.models.load import load_trained

    t = load_trained(run_dir, which)
    if t.checkpoint.get(RECORD):  # saved without duplicates: every model tensor in the file counts
        tensors = load_file(str(Path(run_dir) / "checkpoints" / f"{which}.safetensors"))
        return sum(v.numel() * v.element_size() for k, v in tensors.items() if k.startswith((FLOAT_PREFIX, QLINEAR_PREFIX)))
    return sum(v.numel() * v.element_size() for v in float_state(t.model, []).values())


REPEATS = 5  # timed passes per model; the report keeps the median
TIMED_EXAMPLES = 512  # examples per timed pass, spread over the split


def side_by_side(parent: Path, child: Path, *, split: str = "test", parent_checkpoint: str | None = None,
                 log: Any = print) -> dict[str, Any]:
    """Score parent and compressed run (writing into neither); sizes, forward latency, every metric with its delta."""
    from llmcli.evaluation.evaluate import score_run

    a = score_run(parent, split=split, checkpoint=parent_checkpoint, log=log)
    b = score_run(child, split=split, checkpoint="best", log=log)
    files = {r: r / "checkpoints" / f"{res['checkpoint']}.safetensors" for r, res in ((parent, a), (child, b))}
    timing = forward_latency({"parent": (parent, a["checkpoint"]), "compressed": (child, "best")}, split, log=log)
    return {
        "parent": str(parent), "parent_checkpoint": a["checkpoint"], "compressed": str(child), "split": split,
        "weight_bytes": {"parent": weight_bytes(parent, a["checkpoint"]), "compressed": weight_bytes(child, "best")},
        # the parent's file also holds the optimiser state (AdamW: two moments per weight): no ratio is made of it
        "checkpoint_bytes": {"parent": files[parent].stat().st_size, "compressed": files[child].stat().st_size},
        "ms_per_example": timing.pop("ms_per_example"),
        "timing": timing,
        "domains": {d: {m: {"parent": v, "compressed": b["domains"][d].get(m), "delta": _delta(b["domains"][d].get(m), v)}
                        for m, v in a["domains"][d].items()} for d in a["domains"] if d in b["domains"]},
    }


def forward_latency(runs: dict[str, tuple[Path, str]], split: str, *, repeats: int = REPEATS,
                    examples: int = TIMED_EXAMPLES, log: Any = print) -> dict[str, Any]:
    """Median ms per example of eval's forward (backbone, LM loss, task head) for each (run, checkpoint), timed alike.

    Every model gets one untimed warm-up pass first (the first call in a process pays one-time costs), then
    `repeats` timed passes over the same prepared batches, the models' order alternating from pass to pass.
    """
    import statistics

    import numpy as np

    from llmcli.data.dataset import ProcessedData
    from llmcli.data.preprocess import preprocess
    from llmcli.models.load import load_trained

    loaded = {k: load_trained(run, which) for k, (run, which) in runs.items()}
    cfg = next(iter(loaded.values())).cfg
    torch.set_num_threads(cfg.train.threads or torch.get_num_threads())
    data = ProcessedData(preprocess(cfg.data, log=log))
    idx = data.indices(split)
    idx = idx[np.linspace(0, len(idx) - 1, min(examples, len(idx))).astype(int)] if len(idx) else idx
    idx = idx[np.argsort(data.lengths(idx), kind="stable")]  # as eval batches them: similar lengths together
    batches = [data.batch(idx[i : i + cfg.eval.batch_size]) for i in range(0, len(idx), cfg.eval.batch_size)]
    seconds: dict[str, list[float]] = {k: [] for k in loaded}
    for t in loaded.values():
        _forward(t.model, batches)
    for r in range(repeats):
        for k in (list(loaded) if r % 2 == 0 else list(loaded)[::-1]):
            t0 = time.perf_counter()
            _forward(loaded[k].model, batches)
            seconds[k].append(time.perf_counter() - t0)
    return {"ms_per_example": {k: round(1000 * statistics.median(v) / max(len(idx), 1), 4) for k, v in seconds.items()},
            "examples": int(len(idx)), "repeats": repeats, "threads": torch.get_num_threads(),
            "method": "median of the timed passes after one warm-up pass per model, models alternating"}


@torch.inference_mode()
def _forward(model: nn.Module, batches: list[Any]) -> None:
    """What eval computes per batch, without the bookkeeping: hidden states, LM NLL, task logits."""
    for b in batches:
        h = model(b.tokens)  # (B, T, D)
        model.lm_nll(h, b.tokens, b.lengths)
        model.cls_head(model.pool(h, b.lengths))  # (B, C)


def _delta(new: float | None, old: float) -> float | None:
    return None if new is None else new - old


def render_report(report: dict[str, Any]) -> Any:
    """Rich tables: weight size and latency (with ratios), checkpoint files, then every metric per domain."""
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table

    timing = report["timing"]
    head = Table(title=escape(f"{report['compressed']}  vs parent {report['parent']}"),
                 caption=f"latency: median of {timing['repeats']} timed passes over {timing['examples']} {report['split']} "
                         f"examples after a warm-up pass, {timing['threads']} thread(s); the parent's checkpoint "
                         "file also holds its optimiser state, so only the weights are compared")
    for c in ("", "parent", "compressed", "ratio"):
        head.add_column(c, justify="right")
    for key, label, ratio in (("weight_bytes", "model weights (bytes)", True),
                              ("ms_per_example", "forward latency (ms/example)", True),
                              ("checkpoint_bytes", "checkpoint file (bytes)", False)):
        p, c = report[key]["parent"], report[key]["compressed"]
        head.add_row(label, _num(p), _num(c), f"{c / p:.3f}" if ratio and p else "-")
    return Group(head, _metrics_table(report))


def _num(x: float) -> str:
    return f"{x:,}" if isinstance(x, int) else f"{x:.4f}"


def _metrics_table(report: dict[str, Any]) -> Any:
    """Every metric per domain: parent, compressed and their delta."""
    from rich.table import Table

    metrics = Table(title=f"metrics per domain [{report['split']} split]")
    metrics.add_column("domain")
    metrics.add_column("metric")
    for c in ("parent", "compressed", "delta"):
        metrics.add_column(c, justify="right")
    for d, ms in report["domains"].items():
        for m, v in ms.items():
            if m == "n":
                continue
            metrics.add_row(d, m, *(f"{x:+.4f}" if k == "delta" and x is not None else "-" if x is None else f"{x:.4f}"
                                    for k, x in v.items()))
    return metrics
