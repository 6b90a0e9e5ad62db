"""The preprocess report: counts per split x domain, label counts, tokenizer fallback rate, lengths.

Filled batch by batch while tokens are written (nothing per record is kept), then written as
stats.json and length_hist.png in the processed folder; `stats_table` renders it for the terminal.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from llmcli.files import atomic_write_json

SPLITS = ("train", "val", "test")


class Accumulator:
    """Running sums per (split, domain) and a token-length histogram per split."""

    def __init__(self, split: np.ndarray, domain: np.ndarray, labels: np.ndarray, fallback: np.ndarray,
                 n_domains: int, max_len: int) -> None:
        self.split, self.domain, self.labels, self.fallback = split, domain, labels, fallback
        shape = (len(SPLITS), n_domains)
        self.records = np.zeros(shape, np.int64)
        self.tokens = np.zeros(shape, np.int64)  # BOS and EOS included
        self.fallback_tokens = np.zeros(shape, np.int64)
        self.text_bytes = np.zeros(shape, np.int64)
        self.truncated = np.zeros(shape, np.int64)
        self.label_counts: dict[tuple[int, int], int] = {}  # (split, label id) -> records
        self.lengths = np.zeros((len(SPLITS), max_len + 1), np.int64)

    def add(self, idx: np.ndarray, lens: np.ndarray, flat: np.ndarray, truncated: np.ndarray,
            text_bytes: np.ndarray) -> None:
        """One written batch: record indices, token lengths, the tokens, truncation flags, UTF-8 bytes."""
        s, d = self.split[idx].astype(np.int64), self.domain[idx].astype(np.int64)
        starts = np.cumsum(lens) - lens
        fb = np.add.reduceat(self.fallback[flat].astype(np.int64), starts)  # (B,) fallback tokens per record
        for arr, val in ((self.records, 1), (self.tokens, lens), (self.fallback_tokens, fb),
                         (self.text_bytes, text_bytes), (self.truncated, truncated.astype(np.int64))):
            np.add.at(arr, (s, d), val)
        np.add.at(self.lengths, (s, lens), 1)
        pairs, counts = np.unique(np.stack([s, self.labels[idx]]), axis=1, return_counts=True)
        for (sp, lab), c in zip(pairs.T.tolist(), counts.tolist()):
            self.label_counts[(sp, lab)] = self.label_counts.get((sp, lab), 0) + c

    def stats(self, domains: list[str], label_names: list[str], tokenizer: str) -> dict[str, Any]:
        """The report as a JSON-able dict."""
        def cell(s: int, d: int) -> dict[str, Any]:
            n, t = int(self.records[s, d]), int(self.tokens[s, d])
            body = t - 2 * n
            return {"records": n, "tokens": t, "mean_tokens": round(t / n, 2) if n else 0.0,
                    "text_bytes": int(self.text_bytes[s, d]),
                    "bytes_per_token": round(int(self.text_bytes[s, d]) / body, 3) if body > 0 else 0.0,
                    "fallback_rate": round(int(self.fallback_tokens[s, d]) / body, 5) if body > 0 else 0.0,
                    "truncated": int(self.truncated[s, d])}

        names = [*label_names, "unlabeled"]
        body_all = int(self.tokens.sum() - 2 * self.records.sum())
        return {
            "splits": {sp: {dom: cell(s, d) for d, dom in enumerate(domains)} for s, sp in enumerate(SPLITS)},
            "labels": {sp: {names[lab]: c for (s2, lab), c in sorted(self.label_counts.items()) if s2 == s}
                       for s, sp in enumerate(SPLITS)},
            "tokenizer": {"name": tokenizer,
                          "fallback_rate": round(int(self.fallback_tokens.sum()) / body_all, 5) if body_all else 0.0},
            "length_histogram": {sp: self.lengths[s].tolist() for s, sp in enumerate(SPLITS)},
            "n_truncated": int(self.truncated.sum()),
        }


def write_report(folder: Path, acc: Accumulator, domains: list[str], label_names: list[str],
                 tokenizer: str) -> dict[str, Any]:
    """Write stats.json and length_hist.png into the (temporary) processed folder; returns the stats."""
    stats = acc.stats(domains, label_names, tokenizer)
    atomic_write_json(folder / "stats.json", stats)
    plot_lengths(stats["length_histogram"], folder / "length_hist.png")
    return stats


def plot_lengths(hist: dict[str, list[int]], path: Path) -> None:
    """One step histogram of record lengths (tokens, BOS/EOS included) per split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for sp, counts in hist.items():
        n = sum(counts)
        if n:  # shares, so that splits of different sizes compare
            ax.stairs(np.asarray(counts) / n, np.arange(len(counts) + 1) - 0.5, label=f"{sp} ({n:,} records)")
    ax.set_xlabel("tokens per record (BOS, EOS included; the last bin = cut to data.max_len)")
    ax.set_ylabel("share of the split's records")
    ax.set_title("record lengths per split")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def stats_table(stats: dict[str, Any]) -> Any:
    """A rich table: records, tokens, mean length, fallback rate per split x domain, and label counts."""
    from rich.table import Table

    table = Table(title=f"processed data ({stats['tokenizer']['name']} tokenizer, "
                        f"fallback rate {stats['tokenizer']['fallback_rate']:.2%})")
    for col in ("split", "domain", "records", "tokens", "mean len", "B/token", "fallback", "cut"):
        table.add_column(col, justify="left" if col in ("split", "domain") else "right")
    for sp, doms in stats["splits"].items():
        for dom, c in doms.items():
            if c["records"]:
                table.add_row(sp, dom, f"{c['records']:,}", f"{c['tokens']:,}", f"{c['mean_tokens']:.1f}",
                              f"{c['bytes_per_token']:.2f}", f"{c['fallback_rate']:.2%}", f"{c['truncated']:,}")
    labels = Table(title="labels per split")
    names = list(dict.fromkeys(n for counts in stats["labels"].values() for n in counts))
    labels.add_column("label")
    for sp in stats["labels"]:
        labels.add_column(sp, justify="right")
    for n in names:
        labels.add_row(n, *(f"{stats['labels'][sp].get(n, 0):,}" for sp in stats["labels"]))
    from rich.console import Group

    return Group(table, labels)


def print_report(folder: Path) -> None:
    """Print a processed folder's stats as rich tables on stderr (stdout keeps just the folder path)."""
    import json

    from rich.console import Console

    path = Path(folder) / "stats.json"
    if path.is_file():
        Console(stderr=True).print(stats_table(json.loads(path.read_text(encoding="utf-8"))))
