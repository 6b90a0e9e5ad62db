"""Data figures: cold preprocess of the five built-in versions, and streaming preprocess of a synthetic jsonl.

Each preprocess runs as `llmcli preprocess` in a child process, so its peak RSS is the child's own.
Usage: python bench/data.py [--mb 1024] [--skip-bible]   (one JSON line per figure)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from _common import ROOT, emit  # noqa: E402

WORDS = 5000  # synthetic vocabulary size


def child_preprocess(config: Path, overrides: list[str]) -> tuple[float, float]:
    """Run `llmcli preprocess` in a child; (wall seconds, peak RSS of that child in MB)."""
    cmd = [sys.executable, "-m", "llmcli", "preprocess", str(config), *[x for o in overrides for x in ("--set", o)]]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.stderr.read() if proc.stderr else b""
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"preprocess failed: {err.decode(errors='replace')[-2000:]}")
    return wall, usage.ru_maxrss / 1024  # KiB on Linux


def synthetic_jsonl(path: Path, mb: int, seed: int = 0) -> int:
    """Write about `mb` MB of jsonl records (Zipf-ish words, some non-ASCII, labels, groups); returns records."""
    rng = np.random.default_rng(seed)
    letters = list("abcdefghijklmnopqrstuvwxyzéüøßñ")
    vocab = ["".join(rng.choice(letters, size=int(rng.integers(2, 9)))) for _ in range(WORDS)]
    weights = 1.0 / np.arange(1, WORDS + 1)
    weights /= weights.sum()
    target, written, n = mb * 1_000_000, 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            lens = rng.integers(10, 60, size=2000)
            words = rng.choice(WORDS, size=int(lens.sum()), p=weights)
            pos, lines = 0, []
            for k in lens.tolist():
                text = " ".join(vocab[w] for w in words[pos : pos + k])
                pos += k
                lines.append(json.dumps({"text": text, "label": f"c{n % 7}", "group": f"doc{n // 20}"},
                                        ensure_ascii=False))
                n += 1
            chunk = "\n".join(lines) + "\n"
            f.write(chunk)
            written += len(chunk.encode("utf-8"))
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=1024, help="size of the synthetic jsonl file in MB")
    ap.add_argument("--skip-bible", action="store_true", help="skip the built-in corpus figure")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_bible:
            wall, rss = child_preprocess(ROOT / "configs" / "default.yaml", [f"data.processed_dir={tmp}/p1"])
            emit("preprocess_bible5_cold", wall, "s", versions=5, peak_rss_mb=round(rss, 1))
        src = Path(tmp) / "synthetic.jsonl"
        t = time.perf_counter()
        n = synthetic_jsonl(src, args.mb)
        size_mb = src.stat().st_size / 1e6
        print(f"# generated {size_mb:.0f} MB, {n} records in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        cfg = Path(tmp) / "synthetic.yaml"
        cfg.write_text(yaml.safe_dump({"data": {"source": {"name": "jsonl", "path": str(src)},
                                                "tokenizer": {"name": "bpe", "vocab_size": 4096},
                                                "max_len": 128, "processed_dir": f"{tmp}/p2"}}))
        wall, rss = child_preprocess(cfg, [])
        emit("preprocess_stream_mb_per_s", size_mb / wall, "MB/s", mb=round(size_mb), records=n, wall_s=round(wall, 1))
        emit("preprocess_stream_peak_rss", rss, "MB", mb=round(size_mb), records=n)


if __name__ == "__main__":
    main()
