"""hf_causal: a tiny random GPT-2 saved to a temp dir trains 5 steps and generates (skipped without transformers)."""

from __future__ import annotations

import json

import pytest

transformers = pytest.importorskip("transformers")

from llmcli.errors import UserError  # noqa: E402
from llmcli.training.engine import Session, train  # noqa: E402


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    import torch

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-gpt2")
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=100, n_positions=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    return path


def test_hf_causal_trains_five_steps_and_generates(tiny, tmp_path, gpt2_dir):
    from llmcli.evaluation.generate import generate

    run = train(tiny(f"model={{name: hf_causal, path: '{gpt2_dir}'}}", "train.steps=5", "train.eval_every=5"),
                runs_dir=tmp_path, progress=False, log=lambda m: None)
    meta = json.loads((run / "meta.json").read_text())
    assert meta["status"] == "completed" and meta["n_params"] > 0
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r["split"] == "val" and "acc" in r for r in recs)
    texts = ["".join(generate(run, "In the beginning", max_new_tokens=6, temperature=0.0)) for _ in range(2)]
    assert texts[0] == texts[1]


def test_hf_causal_keeps_pretrained_blocks_and_ties_the_lm_head(tiny, gpt2_dir):
    from safetensors.torch import load_file

    sess = Session(tiny(f"model={{name: hf_causal, path: '{gpt2_dir}'}}"), log=lambda m: None)
    m = sess.model
    assert m.lm_head.weight is m.backbone.embed.weight and m.backbone.embed.weight.shape[0] == 512
    saved = load_file(gpt2_dir / "model.safetensors")
    key = next(k for k in saved if k.endswith("h.0.mlp.c_fc.weight"))
    own = dict(m.backbone.hf.named_parameters())["h.0.mlp.c_fc.weight"]
    assert (own == saved[key]).all()


def test_hf_causal_needs_a_model_directory(tiny, tmp_path):
    with pytest.raises(UserError, match="model.path: .* is not a Hugging Face model directory"):
        Session(tiny(f"model={{name: hf_causal, path: '{tmp_path}'}}"), log=lambda m: None)


def test_hf_causal_cache_gives_the_same_states_as_a_full_forward(tiny, gpt2_dir):
    import torch

    m = Session(tiny(f"model={{name: hf_causal, path: '{gpt2_dir}'}}"), log=lambda m: None).model.eval()
    from tests.models.test_model import assert_cache_matches_full_forward

    with torch.no_grad():
        assert_cache_matches_full_forward(m.backbone)
