"""Data-parallel training across processes started by torchrun (gloo on CPU, nccl on CUDA).

Each rank trains on its slice of every global batch (the batch `train.batch_size` of a one-process run), and
the gradients are averaged across ranks before clipping and the optimiser step, so every rank holds the same
weights and optimiser state after every step. This is DistributedDataParallel's contract (mean of per-rank
gradients, parameters broadcast from rank 0 at the start), taken by one coalesced all-reduce per optimiser
step instead of the `nn.parallel.DistributedDataParallel` wrapper: the objectives call autograd.grad on the
losses several times per step (grad_cosine, PCGrad, MGDA) and some run more than one backward per forward,
which the wrapper's bucketed reducer does not support. Rank 0 alone writes the run folder; the other ranks run
the same loop against a scratch mirror of it, so every rank takes the same path through the loop.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: rank and world size (1 = a plain single-process run)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Whether this rank writes the run folder and talks to the user."""
        return self.rank == 0


def setup(device: str) -> Dist:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1), once per process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch
    import torch.distributed as dist

    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # "cuda" then means this rank's GPU
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size())


def shard(idx: np.ndarray, d: Dist) -> np.ndarray:
    """This rank's contiguous slice of a global batch's record indices (sizes differ by at most one)."""
    return np.array_split(idx, d.world)[d.rank] if d.world > 1 else idx


@contextmanager
def main_first(d: Dist) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. preprocess writes the cache), the others after it, reading it."""
    if d.world > 1 and not d.main:
        _barrier()
    yield
    if d.world > 1 and d.main:
        _barrier()


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def broadcast_object(obj: Any, d: Dist) -> Any:
    """Rank 0's value of a picklable object, on every rank."""
    if d.world == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_parameters(params: list, d: Dist) -> None:
    """Every rank starts from rank 0's weights (as DDP does at construction)."""
    if d.world == 1:
        return
    import torch.distributed as dist

    for p in params:
        dist.broadcast(p.data, src=0)


def average_gradients(params: list, d: Dist) -> None:
    """Mean of .grad across ranks, in one flat all-reduce; a gradient some rank lacks counts as zeros there."""
    if d.world == 1:
        return
    import torch
    import torch.distributed as dist

    present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
    dist.all_reduce(present, op=dist.ReduceOp.MAX)  # (P,): whether any rank has a gradient
    live = [p for p, has in zip(params, present.tolist()) if has]
    for p in live:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if not live:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in live])  # (sum numel,)
    dist.all_reduce(flat)
    flat.div_(d.world)
    for p, g in zip(live, flat.split([p.numel() for p in live])):
        p.grad.copy_(g.view_as(p.grad))


def all_reduce_floats(values: dict[str, float], d: Dist, *, mean: bool = True) -> dict[str, float]:
    """Mean (or sum) of each named scalar across ranks; every rank must pass the same keys in the same order."""
    if d.world == 1 or not values:
        return values
    import torch
    import torch.distributed as dist

    t = torch.tensor(list(values.values()), dtype=torch.float64)  # gloo reduces CPU tensors
    if _backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    if mean:
        t /= d.world
    return dict(zip(values, t.tolist()))


def _backend() -> str:
    import torch.distributed as dist

    return dist.get_backend()


def mirror(run_dir: Path) -> Path:
    """A scratch copy of the run folder's small files and last checkpoint, for a rank that must not write it."""
    scratch = Path(tempfile.mkdtemp(prefix="llmcli-rank-"))
    for name in ("config.yaml", "meta.json", "metrics.jsonl", "tokenizer.json", "data_manifest.json"):
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, scratch / name)
    (scratch / "checkpoints").mkdir()
    for f in (run_dir / "checkpoints").glob("last.*"):  # the tensors and their JSON sidecar
        shutil.copyfile(f, scratch / "checkpoints" / f.name)
    return scratch
