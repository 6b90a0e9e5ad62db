"""Batch sampling: the balanced sampler's shares and its purity in (seed, step)."""

from __future__ import annotations

import numpy as np

from llmcli.data.dataset import balanced_stream, epoch_stream


def test_balanced_stream_splits_each_batch_equally_and_rotates_the_remainder():
    sizes = [100, 7, 30]
    counts = np.zeros(3, int)
    for m in range(6):
        pos = balanced_stream(sizes, 0, m, 10)
        shares = [len(p) for p in pos]
        assert sum(shares) == 10 and max(shares) - min(shares) <= 1
        assert all((p < n).all() for p, n in zip(pos, sizes))
        counts += shares
    assert counts.tolist() == [20, 20, 20]  # six steps of 10: the remainder row went round twice


def test_balanced_stream_is_each_domains_own_epoch_stream_read_in_order():
    sizes = [5, 3]
    got = [np.concatenate([balanced_stream(sizes, 4, m, 3)[g] for m in range(8)]) for g in range(2)]
    for g, n in enumerate(sizes):
        expected = epoch_stream(n, 4 * 1_000_003 + g + 1, 0, len(got[g]))
        assert got[g].tolist() == expected.tolist()  # no row skipped or repeated within an epoch
    assert [x.tolist() for x in balanced_stream(sizes, 4, 5, 3)] == [x.tolist() for x in balanced_stream(sizes, 4, 5, 3)]
