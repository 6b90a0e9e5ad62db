"""`generate`: sampling settings, seeds, streaming."""

from __future__ import annotations

import pytest
import torch

from llmcli.errors import UserError
from llmcli.generate import generate, sample_next


def text(run, prompt="In the beginning", **kw):
    return "".join(generate(run, prompt, **kw))


def test_same_seed_same_text_and_greedy_is_deterministic(tiny_run):
    assert text(tiny_run, seed=1, temperature=1.0) == text(tiny_run, seed=1, temperature=1.0)
    assert text(tiny_run, seed=1, temperature=1.0) != text(tiny_run, seed=2, temperature=1.0)
    assert text(tiny_run, temperature=0, seed=1) == text(tiny_run, temperature=0, seed=2)


def test_max_new_tokens_bounds_the_output(tiny_run):
    from llmcli.data.tokenizers import TextTokenizer

    tok = TextTokenizer.load(tiny_run / "tokenizer.json")
    out = text(tiny_run, max_new_tokens=5, temperature=1.0, top_k=None, seed=0)
    assert len(tok.encode_batch([out])[0]) <= 6


def test_generation_continues_past_the_block_size(tiny_run):
    out = text(tiny_run, max_new_tokens=150, temperature=0)  # block_size is 64 in tiny.yaml
    assert len(out) > 0


def test_top_k_one_is_greedy_and_top_p_keeps_the_nucleus():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9]])
    g = torch.Generator().manual_seed(0)
    assert all(int(sample_next(logits, 1.0, 1, 1.0, g)[0]) == 1 for _ in range(20))
    # probabilities ~ [.02, .48, .07, .43]: top_p=0.4 keeps only the first; 0.8 keeps the top two
    assert all(int(sample_next(logits, 1.0, None, 0.4, g)[0]) == 1 for _ in range(20))
    assert {int(sample_next(logits, 1.0, None, 0.8, g)[0]) for _ in range(200)} == {1, 3}


@pytest.mark.parametrize(("kw", "flag"), [({"top_p": 0.0}, "--top-p"), ({"temperature": -1.0}, "--temperature"),
                                          ({"max_new_tokens": 0}, "--max-new-tokens"), ({"top_k": 0}, "--top-k")])
def test_bad_sampling_settings(tiny_run, kw, flag):
    with pytest.raises(UserError, match=flag):
        text(tiny_run, **kw)
