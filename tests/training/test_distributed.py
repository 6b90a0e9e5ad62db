"""torchrun-style data parallelism on CPU (gloo): two processes train like one process on the same global batch."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest

from llmcli.errors import UserError
from llmcli.training.distributed import Dist, shard

# Rows cut to full length (max_len 16) and every record labeled: the per-rank means then average to exactly the
# global means, so the two runs differ only by float summation order (measured up to 1.5e-5 relative; tolerance 1e-4).
OVERRIDES = ["data.max_len=16", "model.dropout=0.0", "train.steps=6", "train.log_every=1", "train.eval_every=6",
             "train.batch_size=16", "objective.log_grad_every=2"]
TOL = 1e-4


def test_shards_partition_the_global_batch_in_order():
    idx = np.arange(11) * 3
    parts = [shard(idx, Dist(r, 3)) for r in range(3)]
    assert [len(p) for p in parts] == [4, 4, 3]
    assert np.array_equal(np.concatenate(parts), idx)
    assert shard(idx, Dist()) is idx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, processed: str, runs_dir: str, resume: str | None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import torch.distributed as dist

    from llmcli.config import load_config
    from llmcli.training.engine import train
    from tests.conftest import TINY

    try:
        if resume:
            train(None, resume=resume, progress=False, log=lambda m: None)
        else:  # stop half-way with a resumable checkpoint, as an interrupted job would
            cfg = load_config(TINY, [f"data.processed_dir={processed}", *OVERRIDES])
            train(cfg, runs_dir=runs_dir, progress=False, log=lambda m: None, stop_after=3)
    finally:
        dist.destroy_process_group()


def _train_records(run: Path) -> list[dict]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["split"] == "train"]


def test_two_processes_match_one_process_on_the_same_global_batch_across_a_resume(tiny, processed_dir, tmp_path):
    import torch.multiprocessing as mp

    from llmcli.training.engine import train

    single = train(tiny(*OVERRIDES), runs_dir=tmp_path / "single", progress=False, log=lambda m: None)
    runs = tmp_path / "ddp"
    mp.spawn(_worker, args=(2, _free_port(), str(processed_dir), str(runs), None), nprocs=2, join=True)
    [run] = list(runs.iterdir())  # one run folder: rank 0 named it, rank 1 wrote nothing beside it
    assert json.loads((run / "meta.json").read_text())["status"] == "stopped"
    mp.spawn(_worker, args=(2, _free_port(), str(processed_dir), str(runs), str(run)), nprocs=2, join=True)
    a, b = _train_records(single), _train_records(run)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        for key in ("lm_loss", "task_loss", "loss"):
            assert rb[key] == pytest.approx(ra[key], rel=TOL), (ra["step"], key)
    assert b[-1]["lm_loss"] < b[0]["lm_loss"]  # it trains
    meta = json.loads((run / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["status"] == "completed"
    assert list(runs.iterdir()) == [run]

    with pytest.raises(UserError, match="world_size is 2"):  # a 2-process run resumes only with 2 processes
        train(None, resume=run, progress=False, log=lambda m: None)
