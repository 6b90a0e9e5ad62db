"""Training-time augmentation: known answers per augmentation, determinism per (seed, step), exact resume."""

from __future__ import annotations

import json

import numpy as np
import torch

from llmcli.config import SpanDelete, SwapAdjacent, TokenDropout
from llmcli.data.augment import augment_batch, span_delete, swap_adjacent, token_dropout
from llmcli.data.dataset import Batch


def batch() -> Batch:
    rows = [[1, 10, 11, 12, 13, 14, 2], [1, 20, 21, 2, 0, 0, 0]]
    return Batch(torch.tensor(rows), torch.tensor([7, 4]), torch.tensor([3, -1]), torch.tensor([0, 1]))


def test_swap_adjacent_with_p_1_swaps_disjoint_pairs():
    got = swap_adjacent(np.array([1, 2, 3, 4, 5]), SwapAdjacent(p=1.0), np.random.default_rng(0))
    assert got.tolist() == [2, 1, 4, 3, 5]


def test_token_dropout_deletes_about_p_of_the_tokens_and_keeps_order():
    body = np.arange(10_000)
    got = token_dropout(body, TokenDropout(p=0.3), np.random.default_rng(0))
    assert 0.28 < 1 - len(got) / len(body) < 0.32 and (np.diff(got) > 0).all()
    assert token_dropout(body, TokenDropout(p=0.0), np.random.default_rng(0)).tolist() == body.tolist()


def test_span_delete_removes_one_contiguous_span():
    body = np.arange(20)
    got = span_delete(body, SpanDelete(p=1.0, max_span=4), np.random.default_rng(1)).tolist()
    removed = sorted(set(body.tolist()) - set(got))
    assert 1 <= len(removed) <= 4 and removed == list(range(removed[0], removed[-1] + 1))
    assert span_delete(body, SpanDelete(p=0.0), np.random.default_rng(1)).tolist() == body.tolist()


def test_batch_keeps_bos_eos_labels_and_is_deterministic_per_seed_and_step():
    augs = [TokenDropout(p=0.3), SwapAdjacent(p=0.5)]
    a = augment_batch(batch(), augs, seed=0, step=5, pad_id=0)
    assert torch.equal(a.tokens, augment_batch(batch(), augs, seed=0, step=5, pad_id=0).tokens)
    outs = {tuple(augment_batch(batch(), augs, seed=0, step=s, pad_id=0).tokens.flatten().tolist()) for s in range(8)}
    assert len(outs) > 1  # other steps draw differently
    for r in range(2):
        n = int(a.lengths[r])
        assert a.tokens[r, 0] == 1 and a.tokens[r, n - 1] == 2 and (a.tokens[r, n:] == 0).all()
    assert torch.equal(a.labels, batch().labels) and torch.equal(a.domains, batch().domains)


def test_training_with_augmentation_changes_training_only_and_resumes_exactly(tiny, tmp_path):
    from llmcli.training.engine import train

    quiet = {"progress": False, "log": lambda m: None}
    aug = ["data.augment=[{name: token_dropout, p: 0.2}, {name: swap_adjacent, p: 0.1}]", "train.steps=10",
           "train.eval_every=10"]
    plain = train(tiny("train.steps=10", "train.eval_every=10"), runs_dir=tmp_path / "plain", **quiet)
    full = train(tiny(*aug), runs_dir=tmp_path / "full", **quiet)
    part = train(tiny(*aug), runs_dir=tmp_path / "part", stop_after=4, **quiet)
    train(None, resume=part, **quiet)

    def recs(run):
        return [{k: v for k, v in json.loads(ln).items() if k != "tokens_per_s"}
                for ln in (run / "metrics.jsonl").read_text().splitlines()]

    assert recs(part) == recs(full)
    train_loss = [r["lm_loss"] for r in recs(full) if r["split"] == "train"]
    assert train_loss != [r["lm_loss"] for r in recs(plain) if r["split"] == "train"]
    # the processed data is shared: augmentation does not enter the data hash
    assert json.loads((full / "meta.json").read_text())["data"] == json.loads((plain / "meta.json").read_text())["data"]
