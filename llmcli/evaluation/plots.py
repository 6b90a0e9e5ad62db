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

from llmcli.files import atomic_write_bytes
from llmcli.runs import read_metrics


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path, tight: bool = False) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, **({"bbox_inches": "tight", "pad_inches": 0.15} if tight else {}))
    _pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 3)
    return math.ceil(n / cols), cols


def confusion_png(result: dict[str, Any], path: Path) -> Path:
    """eval/<stem>-confusion.png: one row-normalised confusion matrix per domain."""
    return _save(confusion_figure(result), path, tight=True)  # cropped to what is drawn


def confusion_figure(result: dict[str, Any]) -> Any:
    """One row-normalised confusion matrix per domain (rows = gold, columns = predicted), in a row of panels.

    The panels share the class names on the y axis (printed once, on the left) and one colour bar, and are
    sized from the number of classes, so the cells and their counts stay readable and little is left blank.
    """
    import numpy as np

    plt = _pyplot()
    names, domains = result["label_names"], list(result["confusion"])
    rows, cols = _grid(len(domains))
    side = max(2.5, 0.42 * len(names))  # inches per matrix: ~0.42 in per cell keeps a 3-digit count inside it
    fig, axes = plt.subplots(rows, cols, figsize=(side * cols + 2.4, side * rows + 2.0), squeeze=False,
                             sharey=True, layout="constrained")
    font = 9 if len(names) <= 12 else 7
    image = None
    for ax in axes.flat[len(domains):]:
        ax.axis("off")
    for k, (ax, d) in enumerate(zip(axes.flat, domains)):
        cm = np.asarray(result["confusion"][d], dtype=float)  # (C, C) counts
        norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)  # (C, C) row shares
        image = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        for i, j in zip(*np.nonzero(cm)):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=font,
                    color="white" if norm[i, j] > 0.5 else "black")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", rotation_mode="anchor", fontsize=font)
        ax.set_yticks(range(len(names)), names, fontsize=font)
        acc = result["domains"][d].get("acc", float("nan"))
        tag = " (in-domain)" if d in result["in_domain"] else ""
        ax.set_title(f"{d}{tag}: acc {acc:.3f}", fontsize=11)
        ax.set_xlabel("predicted", fontsize=10)
        if k % cols == 0:
            ax.set_ylabel("gold", fontsize=10)
    fig.colorbar(image, ax=axes, shrink=0.8, label="share of the gold row")
    _title_above(fig, [ax for ax in axes.flat if ax.images],
                 f"confusion matrices, {result['split']} split of {Path(result['run']).name} "
                 "(colour = row share, number = count)")
    return fig


def _title_above(fig: Any, panels: list[Any], text: str) -> None:
    """The figure's title just above its panels: square panels leave a blank band at the top of a laid-out canvas,
    which the tight crop in _save cuts away once nothing is drawn in it."""
    fig.canvas.draw()  # constrained layout places the panels (aspect applied)
    fig.set_layout_engine("none")  # freeze it: the title must not move the panels again
    boxes = [ax.title.get_window_extent() for ax in panels]
    x = (min(ax.get_window_extent().x0 for ax in panels) + max(ax.get_window_extent().x1 for ax in panels)) / 2
    fig.text(x / fig.bbox.width, max(b.y1 for b in boxes) / fig.bbox.height + 0.015, text, ha="center", va="bottom",
             fontsize=12)


MIN_BIN = 10  # a reliability bin with fewer examples is drawn hollow and not joined to its neighbours


def reliability_png(result: dict[str, Any], path: Path) -> Path:
    """eval/<stem>-reliability.png: the reliability diagram of every domain."""
    return _save(reliability_figure(result), path)


def reliability_figure(result: dict[str, Any]) -> Any:
    """Accuracy vs mean confidence per non-empty bin and domain, marker area ~ the bin's examples, and the diagonal.

    A line joins only neighbouring bins that both hold >= MIN_BIN examples: a bin of one or two examples is an
    accuracy of 0 or 1 by chance, and a line through it reads as a trend it does not show.
    """
    import numpy as np

    plt = _pyplot()
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(6.4, 7.2), gridspec_kw={"height_ratios": [3, 1]}, sharex=True,
                                   layout="constrained")
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    calibration = result["calibration"]
    largest = max((max(b["count"]) for b in calibration.values()), default=1) or 1
    width = 0.8 / max(len(calibration) * _n_bins(calibration), 1)  # the domains' bars side by side in a bin
    for k, (d, b) in enumerate(calibration.items()):
        conf, acc, count = (np.asarray(b[key], dtype=float) for key in ("confidence", "accuracy", "count"))
        seen, dense = count > 0, count >= MIN_BIN
        ece = result["domains"][d].get("ece", float("nan"))
        tag = " (in-domain)" if d in result["in_domain"] else ""
        (line,) = ax.plot(conf[seen], np.where(dense, acc, np.nan)[seen], linewidth=1.5, label=f"{d}{tag} (ECE {ece:.3f})")
        area = 12 + 250 * count / largest  # points^2, proportional to the bin's examples
        ax.scatter(conf[dense], acc[dense], s=area[dense], color=line.get_color(), alpha=0.8, zorder=3)
        ax.scatter(conf[seen & ~dense], acc[seen & ~dense], s=area[seen & ~dense], facecolors="none",
                   edgecolors=line.get_color(), zorder=3)
        centres = (np.arange(len(count)) + 0.5) / len(count)
        hist.bar(centres + (k - (len(calibration) - 1) / 2) * width, count, width=width, color=line.get_color(), label=d)
    ax.set_ylabel("accuracy of the bin")
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.03, 1.03)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(f"reliability, {result['split']} split of {Path(result['run']).name} ({_n_bins(calibration)} bins)\n"
                 f"marker area ~ examples in the bin; hollow, unjoined: < {MIN_BIN} examples", fontsize=10)
    hist.set_xlabel("confidence of the top class")
    hist.set_ylabel("examples / bin")
    return fig


def _n_bins(calibration: dict[str, Any]) -> int:
    return len(next(iter(calibration.values()))["count"]) if calibration else 0


def curves_png(run_dir: Path) -> Path | None:
    """RUN_DIR/curves.png: train/val L and T per domain over steps, and grad_cosine; None without metrics."""
    fig = curves_figure(run_dir)
    return None if fig is None else _save(fig, Path(run_dir) / "curves.png")


def curves_figure(run_dir: Path) -> Any:
    """The figure of curves.png (None without metrics.jsonl): L and T, train and val per domain, and grad_cosine.

    The title names the run and its in-domain (train) domains; each val line says whether its domain is in-domain.
    """
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    recs = read_metrics(path)  # a damaged line is a UserError naming it; a crash-cut last line is dropped
    train = [r for r in recs if r.get("split") == "train"]
    val = [r for r in recs if r.get("split") == "val" and "lm_loss" in r]
    in_dom = _train_domains(run_dir)
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), layout="constrained")
    for ax, key, title, ylabel in ((axes[0], "lm_loss", "L: LM loss", "L (nats / token)"),
                                   (axes[1], "task_loss", "T: task loss", "T (task loss per example)")):
        _loss_panel(ax, train, val, key, in_dom)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
    _cosine_panel(axes[2], train)
    where = f"in-domain: {', '.join(in_dom)}" if in_dom else "in-domain: unknown (no data_manifest.json)"
    fig.suptitle(f"{run_dir.name}  ({where}; every other val domain is out-of-domain)")
    return fig


def _train_domains(run_dir: Path) -> list[str]:
    """The run's in-domain (train) domains from its data manifest; [] when it cannot be read."""
    try:
        return list(json.loads((run_dir / "data_manifest.json").read_text(encoding="utf-8"))["train_domains"])
    except (OSError, ValueError, KeyError, TypeError):  # the picture still draws without the label
        return []


def _loss_panel(ax: Any, train: list[dict[str, Any]], val: list[dict[str, Any]], key: str, in_dom: list[str]) -> None:
    """One loss over steps: the train window means in black, one val line per domain."""
    ax.plot([r["step"] for r in train if key in r], [r[key] for r in train if key in r], color="black", label="train")
    for d in dict.fromkeys(r["domain"] for r in val):
        pts = [(r["step"], r[key]) for r in val if r["domain"] == d and key in r]
        tag = " (in-domain)" if d in in_dom else " (OOD)"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=f"val {d}{tag}",
                linewidth=2 if d in in_dom else 1.2)
    ax.set_xlabel("step")
    ax.legend(fontsize=8)


def _cosine_panel(ax: Any, train: list[dict[str, Any]]) -> None:
    """grad_cosine over steps, on [-1, 1] with the zero line (below it, L and T pull apart)."""
    cos = [(r["step"], r["grad_cosine"]) for r in train if "grad_cosine" in r]
    ax.axhline(0, color="grey", linewidth=1)
    ax.plot([p[0] for p in cos], [p[1] for p in cos], marker=".", color="tab:red")
    ax.set_ylim(-1, 1)
    ax.set_title("grad_cosine (∇L vs ∇T on shared weights)")
    ax.set_xlabel("step")
    ax.set_ylabel("cosine(∇L, ∇T)")
