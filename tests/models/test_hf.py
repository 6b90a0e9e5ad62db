"""hf_causal: a pretrained causal LM with its own tokenizer and LM head (tiny GPT-2 / Llama of tests/hf_models.py)."""

from __future__ import annotations

import json

import pytest

transformers = pytest.importorskip("transformers")

from llmcli.config import HFCausalConfig  # noqa: E402
from llmcli.errors import UserError  # noqa: E402
from llmcli.models.model import build_model  # noqa: E402
from llmcli.training.engine import train  # noqa: E402
from tests.hf_models import tiny_gpt2, tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def causal(path, vocab_size: int = 400, max_len: int = 48):
    return build_model(HFCausalConfig(path=str(path)), vocab_size=vocab_size, n_classes=3, max_len=max_len)


def test_hf_causal_trains_five_steps_with_its_own_tokenizer_and_generates(tiny, tmp_path, gpt2_dir):
    from llmcli.evaluation.generate import generate

    run = train(tiny(f"model={{name: hf_causal, path: '{gpt2_dir}'}}", "data.tokenizer={name: pretrained}",
                     "train.steps=5", "train.eval_every=5"), runs_dir=tmp_path, progress=False, log=lambda m: None)
    meta = json.loads((run / "meta.json").read_text())
    assert meta["status"] == "completed" and meta["n_params"] > 0
    assert json.loads((run / "data_manifest.json").read_text())["vocab_size"] == 400  # the model's own vocabulary
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r["split"] == "val" and "acc" in r for r in recs)
    texts = ["".join(generate(run, "In the beginning", max_new_tokens=6, temperature=0.0)) for _ in range(2)]
    assert texts[0] == texts[1]


def test_gpt2_keeps_its_tied_head_and_every_pretrained_weight(gpt2_dir):
    from safetensors.torch import load_file

    m = causal(gpt2_dir)
    hf = m.backbone.hf_module()
    assert m.lm_head is hf.get_output_embeddings() and m.lm_head.weight is m.backbone.embed.weight  # tied, as saved
    assert m.backbone.embed.weight.shape[0] == 400  # no resize
    saved = load_file(gpt2_dir / "model.safetensors")
    own = dict(hf.named_parameters())
    assert all((own[k] == v).all() for k, v in saved.items() if k in own) and "transformer.h.0.mlp.c_fc.weight" in own
    # the head lives once, inside the transformers model: no second copy under lm_head.* in a checkpoint
    assert not [k for k in m.state_dict() if k.startswith("lm_head.")]


def test_llama_keeps_its_untied_head(llama_dir):
    from safetensors.torch import load_file

    m = causal(llama_dir)
    assert m.lm_head.weight is not m.backbone.embed.weight
    assert (m.lm_head.weight == load_file(llama_dir / "model.safetensors")["lm_head.weight"]).all()
    assert m.backbone.pretrained_record()["sha256"] and m.backbone.pretrained_record()["path"] == str(llama_dir)


def test_a_tokenizer_larger_than_the_embedding_is_one_line(gpt2_dir):
    with pytest.raises(UserError, match=r"^data.tokenizer: the tokenizer's 512 tokens do not fit model .*'s 400 "
                                        r"embedding rows: use the model's own tokenizer$"):
        causal(gpt2_dir, vocab_size=512)


def test_records_longer_than_the_positions_are_one_line(tmp_path):
    path = tiny_gpt2(tmp_path / "short", n_positions=32)
    with pytest.raises(UserError, match=r"^data.max_len: 48 is more than the 32 positions model .* sees"):
        causal(path)


def test_a_folder_that_is_no_model_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"^model.path: .* is not a Hugging Face model folder \(no config.json\)"):
        causal(tmp_path)


def test_an_encoder_folder_is_not_a_causal_lm(tmp_path):
    from tests.hf_models import tiny_bert

    path = tiny_bert(tmp_path / "bert")
    with pytest.raises(UserError, match=r"^model.path: .* attends to later tokens, so it is no causal LM; use model.name "
                                        r"hf_encoder"):
        causal(path, vocab_size=500)


def test_a_gguf_of_an_unknown_architecture_is_one_line(tmp_path, monkeypatch):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    monkeypatch.setenv("LLMCLI_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "nonesuch.gguf"
    writer = gguf.GGUFWriter(str(path), "nonesuch")  # writes general.architecture = "nonesuch"
    writer.add_block_count(1)
    writer.add_context_length(16)
    writer.add_embedding_length(8)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError) as err:
        causal(path)
    msg = str(err.value)
    assert msg.startswith("model.path: cannot read ") and "nonesuch" in msg and "\n" not in msg
    assert not list((tmp_path / "cache").rglob("config.json"))  # nothing half-converted is left as a model


def test_hf_causal_cache_gives_the_same_states_as_a_full_forward(gpt2_dir, llama_dir):
    import torch

    from tests.models.test_model import assert_cache_matches_full_forward

    for path in (gpt2_dir, llama_dir):
        m = causal(path).eval()
        with torch.no_grad():
            assert_cache_matches_full_forward(m.backbone)
