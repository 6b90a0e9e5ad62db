"""Training-time augmentation of token batches: token dropout, span deletion, adjacent swaps.

Only the body of each record (between BOS and EOS) changes; labels never do. The random draws come
from a generator seeded with (run seed, step), so the augmented batch of a step is the same in an
uninterrupted and in a resumed run. Evaluation never calls this.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from llmcli.config import SpanDelete, SwapAdjacent, TokenDropout

_STREAM = 0xA5  # keeps these draws apart from other users of (seed, step)


def token_dropout(body: np.ndarray, cfg: TokenDropout, rng: np.random.Generator) -> np.ndarray:
    """Delete each token with probability p."""
    return body[rng.random(len(body)) >= cfg.p]


def span_delete(body: np.ndarray, cfg: SpanDelete, rng: np.random.Generator) -> np.ndarray:
    """With probability p, delete one span of 1..max_span tokens (at least one token stays)."""
    if len(body) < 2 or rng.random() >= cfg.p:
        return body
    span = int(rng.integers(1, min(cfg.max_span, len(body) - 1) + 1))
    start = int(rng.integers(0, len(body) - span + 1))
    return np.concatenate([body[:start], body[start + span :]])


def swap_adjacent(body: np.ndarray, cfg: SwapAdjacent, rng: np.random.Generator) -> np.ndarray:
    """Swap neighbours (i, i+1) with probability p, left to right; a swapped token does not move again."""
    out = body.copy()
    draws = rng.random(max(len(body) - 1, 0)) < cfg.p
    i = 0
    while i < len(out) - 1:
        if draws[i]:
            out[i], out[i + 1] = out[i + 1], out[i]
            i += 2
        else:
            i += 1
    return out


AUGMENTS = {"token_dropout": token_dropout, "span_delete": span_delete, "swap_adjacent": swap_adjacent}


def augment_batch(batch: Any, augments: list[Any], seed: int, step: int, pad_id: int) -> Any:
    """A new Batch with each row's body augmented in order; deterministic per (seed, step)."""
    import torch

    from llmcli.data.dataset import Batch

    rng = np.random.default_rng([seed, step, _STREAM])
    tokens, lengths = batch.tokens.numpy(), batch.lengths.tolist()  # (B, T), (B,)
    rows = []
    for r, n in enumerate(lengths):
        body = tokens[r, 1 : n - 1]
        for a in augments:
            body = AUGMENTS[a.name](body, a, rng)
        rows.append(np.concatenate([tokens[r, :1], body, tokens[r, n - 1 : n]]))
    new_len = np.array([len(x) for x in rows], dtype=np.int64)
    out = np.full((len(rows), int(new_len.max())), pad_id, dtype=np.int64)  # (B, T') right-padded
    for r, x in enumerate(rows):
        out[r, : len(x)] = x
    return Batch(torch.from_numpy(out), torch.from_numpy(new_len), batch.labels, batch.domains)
