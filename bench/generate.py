"""Generation speed on the default model: tokens/s for 500 new tokens with and without the KV cache.

Usage: python bench/generate.py [--run RUN_DIR] [--steps N] [--new-tokens 500] [--set model.d_model=256 ...]
Without --run it trains configs/default.yaml for --steps steps in a temporary folder (the weights do not
matter for speed, only the architecture). EOS is suppressed so every timing covers exactly --new-tokens.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import ROOT, emit  # noqa: E402

QUIET = {"log": lambda m: None}


def tokens_per_s(t, new_tokens: int, use_cache: bool, repeats: int) -> float:
    """Best of `repeats` runs: new tokens per second for one greedy continuation of a short prompt."""
    from llmcli.evaluation.generate import Sampling, complete

    s = Sampling(max_new_tokens=new_tokens, min_new_tokens=new_tokens, temperature=0)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        *_, rows = complete(t, ["In the beginning"], s, use_cache=use_cache)
        best = min(best, time.perf_counter() - start)
        assert len(rows[0].tokens) == new_tokens
    return new_tokens / best


def measure(run: Path, new_tokens: int, repeats: int, threads: int) -> None:
    import torch

    from llmcli.models.load import load_trained

    t = load_trained(run, "best" if (run / "checkpoints" / "best.safetensors").is_file() else "last")
    torch.set_num_threads(threads)  # one-token steps are tiny: extra threads mostly wait (worse when shared)
    cached = tokens_per_s(t, new_tokens, True, repeats)
    uncached = tokens_per_s(t, new_tokens, False, repeats)
    shape = {"new_tokens": new_tokens, "block_size": t.model.backbone.block_size, "model": t.cfg.model.name,
             "threads": torch.get_num_threads()}
    emit("generate_tokens_per_s_cached", cached, "tokens/s", **shape)
    emit("generate_tokens_per_s_uncached", uncached, "tokens/s", **shape)
    emit("generate_kv_cache_speedup", cached / uncached, "x", **shape)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, help="a run folder (default: train configs/default.yaml briefly)")
    p.add_argument("--steps", type=int, default=50, help="training steps when no --run is given")
    p.add_argument("--new-tokens", type=int, default=500)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads for both timings")
    p.add_argument("--set", dest="sets", action="append", default=[],
                   help="config override for the trained model, e.g. model.d_model=256 (repeatable)")
    a = p.parse_args()
    if a.run:
        measure(a.run, a.new_tokens, a.repeats, a.threads)
        return
    from llmcli.config import load_config
    from llmcli.training.engine import train

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(ROOT / "configs" / "default.yaml",
                          [f"data.processed_dir={tmp}/processed", f"train.steps={a.steps}", f"train.eval_every={a.steps}",
                           *a.sets])
        measure(train(cfg, runs_dir=f"{tmp}/runs", progress=False, **QUIET), a.new_tokens, a.repeats, a.threads)


if __name__ == "__main__":
    main()
