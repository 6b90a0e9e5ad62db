"""Processed data on disk, read through memory maps, and the batches the model sees."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmcli.errors import UserError

TOKEN_DTYPES = ("uint16", "uint32")  # what preprocess writes tokens.bin as (`preprocess.token_dtype`)
EVAL_SEED = 0  # eval's cap draws with this seed, not the run's: every run on the same data scores the same records


def capped(idx: np.ndarray, cap: int | None, seed: int) -> np.ndarray:
    """At most `cap` of `idx`, drawn at random with `seed` and kept in file order.

    Why random: a split's records are in corpus order (a Bible runs Law, History, ..., Epistles), so its first N
    records are one or two genres; a seeded draw keeps the genres in their proportions.
    """
    if not cap or len(idx) <= cap:
        return idx
    return np.sort(np.random.default_rng(seed).choice(idx, cap, replace=False))


@dataclass
class Batch:
    """Right-padded token ids and per-record labels/domains."""

    tokens: torch.Tensor  # (B, T) int64, PAD after each record's EOS
    lengths: torch.Tensor  # (B,) real tokens per row (BOS and EOS included)
    labels: torch.Tensor  # (B,) class id, -1 = unlabeled
    domains: torch.Tensor  # (B,) domain index

    @property
    def n_tokens(self) -> int:
        """Real (non-pad) tokens in the batch."""
        return int(self.lengths.sum())


class ProcessedData:
    """A processed folder: token memmap, offsets, labels, domains, splits and the manifest."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self._open()
        except (OSError, ValueError, KeyError, TypeError) as exc:  # ValueError covers bad JSON and bad .npy
            raise UserError(f"{self.path}: processed data is damaged ({type(exc).__name__}: {exc}); "
                            "delete this folder and run llmcli preprocess again") from None

    def _open(self) -> None:
        self.manifest: dict[str, Any] = json.loads((self.path / "manifest.json").read_text(encoding="utf-8"))
        dtype = self.manifest.get("token_dtype", "uint16")  # uint32 for vocabularies over 65,536 tokens
        if dtype not in TOKEN_DTYPES:
            raise ValueError(f"manifest token_dtype {dtype!r} is not one of {', '.join(TOKEN_DTYPES)}")
        self.tokens = np.memmap(self.path / "tokens.bin", dtype=np.dtype(dtype), mode="r")
        self.offsets = np.load(self.path / "offsets.npy")
        self.labels = np.load(self.path / "labels.npy")
        self.domain_ids = np.load(self.path / "domains.npy")
        self.splits = np.load(self.path / "splits.npy")
        self.token_bytes = torch.from_numpy(np.load(self.path / "token_bytes.npy").astype(np.int64))
        self.domains: list[str] = self.manifest["domains"]
        self.train_domains: list[str] = self.manifest["train_domains"]
        self.lm_only_domains: list[str] = self.manifest.get("lm_only_domains", [])  # train text for L only
        self.label_names: list[str] = self.manifest["label_names"]
        self.pad_id: int = self.manifest["pad_id"]

    def indices(self, split: str, domains: list[str] | None = None) -> np.ndarray:
        """Record indices of one split, optionally restricted to some domains, in file order."""
        mask = self.splits == ("train", "val", "test").index(split)
        if domains is not None:
            mask &= np.isin(self.domain_ids, [self.domains.index(d) for d in domains])
        return np.flatnonzero(mask)

    def lengths(self, idx: np.ndarray) -> np.ndarray:
        """Token count of each record."""
        return self.offsets[idx + 1] - self.offsets[idx]

    def batch(self, idx: np.ndarray) -> Batch:
        """Gather records into a right-padded (B, T) batch, T = the longest record."""
        lens = self.lengths(idx)
        cols = np.arange(int(lens.max()))  # (T,)
        real = cols[None, :] < lens[:, None]  # (B, T)
        # one vectorised gather from the memmap (no per-row Python copies); padding positions read the record's
        # first token (always in range) and are overwritten with PAD
        pos = self.offsets[idx][:, None] + np.where(real, cols[None, :], 0)  # (B, T)
        out = np.where(real, self.tokens[pos], self.pad_id).astype(np.int64)  # (B, T)
        return Batch(
            torch.from_numpy(out),
            torch.from_numpy(lens.astype(np.int64)),
            torch.from_numpy(self.labels[idx].astype(np.int64)),
            torch.from_numpy(self.domain_ids[idx].astype(np.int64)),
        )


def epoch_stream(n: int, seed: int, start: int, count: int) -> np.ndarray:
    """Items [start, start+count) of an endless stream of per-epoch permutations of range(n).

    The position is a pure function of `start`, so a resumed run continues the exact data order.
    """
    out = np.empty(count, dtype=np.int64)
    filled = 0
    while filled < count:
        epoch, pos = divmod(start + filled, n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        take = min(count - filled, n - pos)
        out[filled : filled + take] = perm[pos : pos + take]
        filled += take
    return out


def balanced_stream(sizes: list[int], seed: int, micro_step: int, batch_size: int) -> list[np.ndarray]:
    """Positions, within each group, of one micro-batch split equally between the groups (e.g. domains).

    Group g gets batch_size // K rows, plus one of the remainder rows, which rotate with the micro-step; each
    group reads its own endless epoch stream, so the positions are a pure function of (seed, micro_step).
    """
    k = len(sizes)
    base, extra = divmod(batch_size, k)
    out = []
    for g, n in enumerate(sizes):
        # rows group g received in micro-steps [0, micro_step): base each, +1 when (g - m) mod k < extra
        full = micro_step // k
        start = micro_step * base + full * extra + sum((g - m) % k < extra for m in range(full * k, micro_step))
        count = base + int((g - micro_step) % k < extra)
        out.append(epoch_stream(n, seed * 1_000_003 + g + 1, start, count) if count else np.empty(0, np.int64))
    return out


def stream_seed(seed: int, name: str, *more: int) -> int:
    """A 32-bit seed for a named stream of its own (e.g. the LM-only rows), derived from (seed, name, *more).

    Its numbers never come out of the labeled stream's `[seed, epoch]` generators, so drawing from it leaves
    the labeled batches exactly as they are without it.
    """
    key = [seed, *name.encode(), *more]
    return int(np.random.SeedSequence(key).generate_state(1)[0])
