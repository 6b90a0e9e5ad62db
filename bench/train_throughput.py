"""Training throughput against the machine's limit: fp32 matmul peak, tokens/s, achieved FLOP/s and the ratio.

Shape (the issue's): n_layer 4, n_head 4, d_model 128, block 128, batch 32, vocabulary 8192, fp32, weighted
objective, on synthetic full-length rows written as a real processed folder (memmap and all), trained by
llmcli's own step (`_accumulate`, clip, optimiser and schedule step, as `train._loop` does).

FLOPs per token (PaLM appendix B): 6 * N + 12 * L * H * Q * T, N = parameters that take part in matmuls
(the tied embedding counted once as the LM head; the position table and LayerNorms are lookups/elementwise,
left out), Q = head size, T = sequence length.

Usage: python bench/train_throughput.py [--steps 30] [--warmup 5] [--rounds 3] [--device cpu|cuda|auto]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import ROOT, emit  # noqa: E402

SHAPE = {"vocab": 8192, "n_layer": 4, "n_head": 4, "d_model": 128, "block": 128, "batch": 32}


def matmul_peak(device: str, n: int = 2048, reps: int = 10, warmup_s: float = 1.0) -> float:
    """Best FLOP/s of an (n x n) @ (n x n) fp32 torch.mm (bf16 on CUDA, the dtype training uses there).

    The cores clock up under load: a second of warm-up, then the best of `reps` (a low peak flatters the ratio).
    """
    import torch

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    start = time.perf_counter()
    while time.perf_counter() - start < warmup_s:
        torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def synthetic_processed(path: Path, vocab: int, rows: int, length: int, seed: int = 0) -> Path:
    """A processed folder (the layout preprocess writes) of `rows` full-length random records."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    rng.integers(3, vocab, rows * length, dtype=np.uint16).tofile(path / "tokens.bin")
    np.save(path / "offsets.npy", np.arange(rows + 1, dtype=np.int64) * length)
    np.save(path / "labels.npy", rng.integers(0, 4, rows).astype(np.int64))
    np.save(path / "domains.npy", np.zeros(rows, dtype=np.int64))
    np.save(path / "splits.npy", np.zeros(rows, dtype=np.int64))
    np.save(path / "token_bytes.npy", np.full(vocab, 3, dtype=np.int64))
    manifest = {"domains": ["synthetic"], "train_domains": ["synthetic"], "label_names": ["a", "b", "c", "d"],
                "pad_id": 0, "vocab_size": vocab}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def session(data_dir: Path, device: str, overrides: list[str]) -> SimpleNamespace:
    """The pieces `train.Session` holds, built by llmcli's own builders on the synthetic folder."""
    import torch

    from llmcli.config import load_config
    from llmcli.data.dataset import ProcessedData
    from llmcli.device import keep_freed_memory, resolve_device
    from llmcli.models.model import build_model
    from llmcli.registry import registry
    from llmcli.training.distributed import Dist

    s = SHAPE
    cfg = load_config(ROOT / "configs" / "default.yaml", [
        f"model.n_layer={s['n_layer']}", f"model.n_head={s['n_head']}", f"model.d_model={s['d_model']}",
        f"model.block_size={s['block']}", "model.dropout=0.0", f"train.batch_size={s['batch']}",
        f"data.max_len={s['block']}", f"train.device={device}", "objective.log_grad_every=0", *overrides])
    data = ProcessedData(data_dir)
    torch.manual_seed(cfg.seed)
    dev = resolve_device(cfg.train)
    keep_freed_memory()  # as train.Session does
    model = build_model(cfg.model, vocab_size=s["vocab"], n_classes=4, max_len=s["block"]).to(dev)
    if cfg.train.compile:  # as train.Session does
        model.backbone.compile(dynamic=True)
    idx = data.indices("train")
    decay, no_decay = model.decay_groups()
    opt = registry("optimizer").build(cfg.optim, decay=decay, no_decay=no_decay)
    return SimpleNamespace(
        cfg=cfg, data=data, model=model, device=dev, train_idx=idx, optimizer=opt,
        lm_only_rows=0, prefix_states=lambda idx: None,  # no LM-only stream, no frozen-prefix cache
        scheduler=registry("schedule").build(cfg.schedule, optimizer=opt, total_steps=cfg.train.steps),
        task_loss=registry("task_loss").build(cfg.task_loss, n_classes=4, class_counts=np.ones(4, dtype=np.int64)),
        objective=registry("objective").build(cfg.objective), dist=Dist(),
        dg=registry("dg").build(cfg.dg, domains=list(range(len(data.domains))), names=list(data.domains),
                                d_model=model.cls_head.in_features, stream_domains=list(range(len(data.domains)))))


def step_fn(sess: SimpleNamespace):
    """One optimiser step exactly as `train._loop` takes it."""
    import torch

    from llmcli.training.engine import _accumulate

    shared = sess.model.shared_parameters()

    def run(step: int) -> int:
        sess.optimizer.zero_grad(set_to_none=True)
        _, _, _, n_tokens = _accumulate(sess, step, shared)
        torch.nn.utils.clip_grad_norm_(sess.model.parameters(), sess.cfg.train.grad_clip)
        sess.optimizer.step()
        sess.scheduler.step()
        return n_tokens

    return run


def flops_per_token(model, block: int) -> float:
    """6 N + 12 L H Q T (attention scores and values, forward + backward)."""
    from llmcli.models.model import n_params

    n = n_params(model) - model.backbone.pos.weight.numel()
    s = SHAPE
    return 6 * n + 12 * s["n_layer"] * s["d_model"] * block


def measure(sess: SimpleNamespace, steps: int, warmup: int) -> float:
    """Training tokens/s over `steps` steps after `warmup` untimed ones."""
    run = step_fn(sess)
    sess.model.train()
    for i in range(warmup):
        run(i)
    _sync(sess.device)
    t, tokens = time.perf_counter(), 0
    for i in range(warmup, warmup + steps):
        tokens += run(i)
    _sync(sess.device)
    return tokens / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30, help="timed steps per round")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3,
                    help="peak, steps, peak again per round; the median round is reported (a shared host drifts)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--set", action="append", default=[], help="extra config overrides (key=value)")
    args = ap.parse_args()
    s = SHAPE
    shape = {k: s[k] for k in ("vocab", "n_layer", "d_model", "block", "batch")}
    with tempfile.TemporaryDirectory() as tmp:
        data = synthetic_processed(Path(tmp) / "processed", s["vocab"], 4096, s["block"])
        sess = session(data, args.device, args.set)
        dev = sess.device
        rounds = []  # (peak, tokens/s): the peak measured around each round's steps, the higher of the two
        for r in range(args.rounds):
            before = matmul_peak(dev)
            tps = measure(sess, args.steps, args.warmup if r == 0 else 1)
            rounds.append((max(before, matmul_peak(dev)), tps))
        per_token = flops_per_token(sess.model, s["block"])
        ratios = [tps * per_token / peak for peak, tps in rounds]
        peak, tps = rounds[sorted(range(len(rounds)), key=ratios.__getitem__)[len(rounds) // 2]]  # median round
        achieved = tps * per_token
        emit("matmul_peak", peak / 1e9, "GFLOP/s", device=dev, dtype="bf16" if dev == "cuda" else "fp32", **shape)
        emit("train_throughput_tokens_per_s", tps, "tokens/s", device=dev, steps=args.steps, **shape)
        emit("train_achieved_flops", achieved / 1e9, "GFLOP/s", device=dev, **shape)
        emit("train_flops_vs_peak", achieved / peak, "ratio", device=dev, rounds=[round(x, 4) for x in ratios],
             **shape)


if __name__ == "__main__":
    main()
