"""Core figures on the default config: CLI start-up, preprocess, training throughput, eval, generate.

Usage: python bench/core.py   (one JSON line per figure)
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import ROOT, emit  # noqa: E402

from llmcli.config import load_config  # noqa: E402

QUIET = {"log": lambda m: None}


def help_wall() -> None:
    best = min(_timed([sys.executable, "-m", "llmcli", "--help"]) for _ in range(3))
    emit("cli_help_wall", best, "s")


def _timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t


def main() -> None:
    from llmcli.data.preprocess import preprocess
    from llmcli.evaluation.evaluate import evaluate
    from llmcli.evaluation.generate import generate
    from llmcli.training.engine import train

    help_wall()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(ROOT / "configs" / "default.yaml",
                          [f"data.processed_dir={tmp}/processed", "train.steps=200", "train.eval_every=200"])
        t = time.perf_counter()
        preprocess(cfg.data, **QUIET)
        emit("preprocess_default_cold", time.perf_counter() - t, "s", versions=5)

        t = time.perf_counter()
        run = train(cfg, runs_dir=f"{tmp}/runs", progress=False, **QUIET)
        wall = time.perf_counter() - t
        import json

        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        tps = [r["tokens_per_s"] for r in recs if r["split"] == "train"][2:]  # skip warm-up windows
        emit("train_tokens_per_s", sum(tps) / len(tps), "tokens/s", steps=200, batch=cfg.train.batch_size,
             d_model=cfg.model.d_model, n_layer=cfg.model.n_layer, vocab=cfg.data.tokenizer.vocab_size)
        emit("train_200_steps_wall", wall, "s")

        t = time.perf_counter()
        res = evaluate(run, **QUIET)
        n = sum(m["n"] for m in res["domains"].values())
        emit("eval_examples_per_s", n / (time.perf_counter() - t), "examples/s", examples=n)

        t = time.perf_counter()
        toks = len(list(generate(run, "In the beginning", max_new_tokens=500, temperature=1.0, top_k=None)))
        emit("generate_pieces_per_s", toks / (time.perf_counter() - t), "pieces/s", max_new_tokens=500)


if __name__ == "__main__":
    main()
