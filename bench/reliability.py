"""Reliability figures: what a checkpoint costs (save, load + sha256 verify, size) at two model sizes,
and the wall time of `llmcli reproduce` on a tiny run.

Usage: python bench/reliability.py   (one JSON line per figure)
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import ROOT, emit  # noqa: E402

from llmcli.config import load_config  # noqa: E402

SIZES = {"default": [], "gpt-8x512": ["model.n_layer=8", "model.d_model=512", "model.n_head=8"]}


def checkpoint_costs(name: str, overrides: list[str], tmp: Path, repeats: int = 5) -> None:
    import torch

    from llmcli.models.checkpoint import load_checkpoint, save_checkpoint
    from llmcli.models.model import build_model, n_params
    from llmcli.registry import registry

    cfg = load_config(ROOT / "configs" / "default.yaml", overrides)
    model = build_model(cfg.model, vocab_size=cfg.data.tokenizer.vocab_size, n_classes=10, max_len=cfg.data.max_len)
    decay, no_decay = model.decay_groups()
    opt = registry("optimizer").build(cfg.optim, decay=decay, no_decay=no_decay)
    sched = registry("schedule").build(cfg.schedule, optimizer=opt, total_steps=10)
    model(torch.zeros(2, 8, dtype=torch.long)).sum().backward()
    opt.step()  # optimiser state (two moments per weight) exists, as in a real checkpoint
    path = tmp / f"{name}.safetensors"
    saves, loads = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        save_checkpoint(path, model, opt, sched, {"step": 1})
        saves.append(time.perf_counter() - t)
        t = time.perf_counter()
        load_checkpoint(path)
        loads.append(time.perf_counter() - t)
    extra = {"model": name, "params": n_params(model)}
    emit("checkpoint_save_ms", 1000 * min(saves), "ms", **extra)
    emit("checkpoint_load_verify_ms", 1000 * min(loads), "ms", **extra)
    emit("checkpoint_size_mb", path.stat().st_size / 2**20, "MiB", **extra)


def reproduce_wall(tmp: Path) -> None:
    from llmcli.experiments.reproduce import reproduce
    from llmcli.training.engine import train

    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"data.processed_dir={tmp / 'processed'}"])
    run = train(cfg, runs_dir=tmp / "runs", progress=False, log=lambda m: None)
    t = time.perf_counter()
    ok = reproduce(run, log=lambda m: None).ok
    emit("reproduce_tiny_wall_s", time.perf_counter() - t, "s", identical=ok)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in SIZES.items():
            checkpoint_costs(name, overrides, Path(tmp))
        reproduce_wall(Path(tmp))


if __name__ == "__main__":
    main()
