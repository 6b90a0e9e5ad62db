"""PNG pictures of a run: confusion matrices, reliability diagrams (beside eval/<split>.json) and curves.png.

Every picture is drawn from data already on disk (the eval JSON, metrics.jsonl), so `eval` can redraw
them at any time; PNGs are written atomically.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

from llmcli.io import atomic_write_bytes


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 3)
    return math.ceil(n / cols), cols


def confusion_png(result: dict[str, Any], path: Path) -> Path:
    """One row-normalised confusion matrix per domain (rows = gold, columns = predicted)."""
    import numpy as np

    plt = _pyplot()
    names = result["label_names"]
    domains = list(result["confusion"])
    rows, cols = _grid(len(domains))
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 4.4 * rows), squeeze=False)
    for ax in axes.flat[len(domains):]:
        ax.axis("off")
    for ax, d in zip(axes.flat, domains):
        cm = np.asarray(result["confusion"][d], dtype=float)  # (C, C) counts
        norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        for i, j in zip(*np.nonzero(cm)):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=6,
                    color="white" if norm[i, j] > 0.5 else "black")
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
        ax.set_yticks(range(len(names)), names, fontsize=6)
        acc = result["domains"][d].get("acc", float("nan"))
        tag = " (in-domain)" if d in result["in_domain"] else ""
        ax.set_title(f"{d}{tag}: acc {acc:.3f}", fontsize=9)
        ax.set_xlabel("predicted", fontsize=7)
        ax.set_ylabel("gold", fontsize=7)
    fig.suptitle(f"confusion matrices, {result['split']} split (colour = row share, text = count)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def reliability_png(result: dict[str, Any], path: Path) -> Path:
    """Reliability diagram per domain: accuracy vs mean confidence of each non-empty bin, and the diagonal."""
    plt = _pyplot()
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(6, 7), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    for d, b in result["calibration"].items():
        pts = [(c, a, n) for c, a, n in zip(b["confidence"], b["accuracy"], b["count"]) if n]
        ece = result["domains"][d].get("ece", float("nan"))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=f"{d} (ECE {ece:.3f})")
        hist.plot([p[0] for p in pts], [p[2] for p in pts], marker=".", label=d)
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title(f"reliability, {result['split']} split (15 bins)", fontsize=10)
    hist.set_xlabel("confidence of the top class")
    hist.set_ylabel("examples / bin")
    fig.tight_layout()
    return _save(fig, path)


def curves_png(run_dir: Path) -> Path | None:
    """RUN_DIR/curves.png: train/val L and T per domain over steps, and grad_cosine; None without metrics."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return None
    recs = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    train = [r for r in recs if r.get("split") == "train"]
    val = [r for r in recs if r.get("split") == "val" and "lm_loss" in r]
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, key, title in ((axes[0], "lm_loss", "L: LM loss"), (axes[1], "task_loss", "T: task loss")):
        ax.plot([r["step"] for r in train], [r[key] for r in train], color="black", label="train")
        for d in dict.fromkeys(r["domain"] for r in val):
            pts = [(r["step"], r[key]) for r in val if r["domain"] == d and key in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=f"val {d}")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    cos = [(r["step"], r["grad_cosine"]) for r in train if "grad_cosine" in r]
    axes[2].axhline(0, color="grey", linewidth=1)
    axes[2].plot([p[0] for p in cos], [p[1] for p in cos], marker=".", color="tab:red")
    axes[2].set_ylim(-1, 1)
    axes[2].set_title("grad_cosine (∇L vs ∇T on shared weights)")
    axes[2].set_xlabel("step")
    fig.tight_layout()
    return _save(fig, Path(run_dir) / "curves.png")
