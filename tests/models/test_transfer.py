"""Transfer: init_from a run's backbone + LM head, freeze parts, lm_only_domains feeding L only."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from llmcli.errors import UserError
from llmcli.training.engine import Session, _accumulate, train

QUIET = {"progress": False, "log": lambda m: None}


def test_init_from_loads_backbone_and_lm_head_but_not_the_task_head(tiny, tiny_run):
    sess = Session(tiny(f"train.init_from={tiny_run}"), log=lambda m: None)
    saved = load_file(tiny_run / "checkpoints" / "best.safetensors")
    state = sess.model.state_dict()
    assert all(torch.equal(state[k], saved[f"model.{k}"]) for k in state if k.startswith(("backbone.", "lm_head.")))
    assert not torch.equal(state["cls_head.weight"], saved["model.cls_head.weight"])


def test_freeze_keeps_parts_fixed_while_the_rest_trains(tiny, tiny_run, tmp_path):
    run = train(tiny(f"train.init_from={tiny_run}", "train.freeze=[backbone]", "objective.alpha=0.0"),
                runs_dir=tmp_path, **QUIET)
    before = load_file(tiny_run / "checkpoints" / "best.safetensors")
    after = load_file(run / "checkpoints" / "last.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in after if k.startswith("model.backbone."))
    assert not torch.equal(before["model.cls_head.weight"], after["model.cls_head.weight"])


@pytest.mark.parametrize(
    ("sets", "fragment"),
    [
        (["model.d_model=48", "model.n_head=2"], "train.init_from: weight 'backbone.embed.weight' has shape"),
        (["model={name: lstm, d_model: 32}"], "train.init_from:"),
        (["data.tokenizer.vocab_size=600"], "train.init_from: "),
    ],
)
def test_mismatched_init_from_is_one_line(tiny, tiny_run, sets, fragment):
    with pytest.raises(UserError) as err:
        Session(tiny(f"train.init_from={tiny_run}", *sets), log=lambda m: None)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_init_from_needs_a_run_folder(tiny, tmp_path):
    with pytest.raises(UserError, match="train.init_from: .* is not a run folder"):
        Session(tiny(f"train.init_from={tmp_path}"), log=lambda m: None)


def test_freeze_of_a_missing_part_names_the_field(tiny):
    with pytest.raises(UserError, match=r"train.freeze: this model has no part 'decoder' \(parts: backbone, "):
        Session(tiny("train.freeze=[decoder]"), log=lambda m: None)


def test_lm_only_domain_text_reaches_l_but_never_its_labels(tiny):
    sess = Session(tiny("data.lm_only_domains=[wyc]"), log=lambda m: None)
    data, wyc = sess.data, sess.data.domains.index("wyc")
    rows = sess.lm_only_idx  # the LM-only stream (tests/training/test_lm_only.py); the labeled one is kjv's alone
    assert len(rows) > 0 and (data.domain_ids[rows] == wyc).all() and (data.labels[rows] == -1).all()
    assert not (data.domain_ids[sess.train_idx] == wyc).any()  # its training text is in, its labels are not
    assert (data.labels[data.indices("test", ["wyc"])] >= 0).all()  # still scored out-of-domain
    batches, seen = [], []
    real_batch, real_loss = data.batch, sess.task_loss
    data.batch = lambda idx: batches.append(real_batch(idx)) or batches[-1]
    sess.task_loss = lambda logits, labels: seen.append(labels.clone()) or real_loss(logits, labels)
    for step in range(10):  # the training loop's own batches
        sess.optimizer.zero_grad(set_to_none=True)
        _accumulate(sess, step, sess.model.shared_parameters())
    domains, labels = torch.cat([b.domains for b in batches]), torch.cat(seen)
    assert (domains == wyc).sum() > 0 and (labels[domains == wyc] == -1).all()
    assert (labels[domains != wyc] >= 0).all()
    assert data.manifest["lm_only_domains"] == ["wyc"] and data.train_domains == ["kjv"]


def test_lm_only_domain_must_exist_and_not_be_a_train_domain(tiny):
    with pytest.raises(UserError, match=r"data.lm_only_domains: \['kjv'\] are also in data.train_domains"):
        Session(tiny("data.lm_only_domains=[kjv]"), log=lambda m: None)
    with pytest.raises(UserError, match=r"data.lm_only_domains: \['klingon'\] not in the data"):
        Session(tiny("data.lm_only_domains=[klingon]"), log=lambda m: None)


def test_pretrain_finetune_configs_chain(tmp_path, processed_dir):
    """configs/pretrain.yaml then configs/finetune.yaml (init_from the pretrain run), shortened."""
    from llmcli.config import load_config
    from tests.conftest import ROOT

    short = [f"data.processed_dir={processed_dir}", "train.steps=4", "train.eval_every=4", "train.log_every=2",
             "data.source.max_chapters_per_book=2", "data.source.versions=[kjv, web, wyc]",
             "data.tokenizer.vocab_size=512", "data.split={val: 0.15, test: 0.15, seed: 0}", "data.max_len=48",
             "model={name: gpt, n_layer: 1, n_head: 2, d_model: 32, block_size: 64}", "train.val_max_examples=32"]
    pre = train(load_config(ROOT / "configs" / "pretrain.yaml", short), runs_dir=tmp_path, **QUIET)
    fine = train(load_config(ROOT / "configs" / "finetune.yaml", [*short, f"train.init_from={pre}"]),
                 runs_dir=tmp_path, **QUIET)
    cfg = json.loads(json.dumps(load_config(fine / "config.yaml").model_dump(mode="json")))
    assert cfg["objective"]["alpha"] == 0.0 and cfg["train"]["init_from"] == str(pre)
    assert np.isfinite([json.loads(x)["step"] for x in (fine / "metrics.jsonl").read_text().splitlines()]).all()


def test_a_finetune_resumes_without_its_source_run(tiny, tiny_run, tmp_path):
    import shutil

    source = tmp_path / "source"
    shutil.copytree(tiny_run, source)
    part = train(tiny(f"train.init_from={source}", "train.freeze=[embedding]"), runs_dir=tmp_path / "runs",
                 stop_after=7, **QUIET)
    shutil.rmtree(source)
    train(None, resume=part, **QUIET)
    assert json.loads((part / "meta.json").read_text())["status"] == "completed"


# ---------------------------------------------------------------- layer ranges (train.freeze: blocks:A-B, bottom:K)


@pytest.mark.parametrize(("arch", "auto", "where", "in_base"), [
    ("gpt2", "AutoModelForCausalLM", "transformer.h", "h"), ("llama", "AutoModelForCausalLM", "model.layers", "layers"),
    ("bert", "AutoModelForMaskedLM", "bert.encoder.layer", "encoder.layer"),
    ("bert_bare", "AutoModel", "encoder.layer", "encoder.layer"),
])
def test_hf_blocks_finds_the_layer_list_of_each_architecture(tmp_path, arch, auto, where, in_base):
    transformers = pytest.importorskip("transformers")
    from llmcli.models.lora import hf_blocks
    from tests.hf_models import BUILDERS

    model = getattr(transformers, auto).from_pretrained(str(BUILDERS[arch](tmp_path)), local_files_only=True)
    assert hf_blocks(model) is model.get_submodule(where) and len(hf_blocks(model)) == 2
    assert hf_blocks(model.base_model) is model.base_model.get_submodule(in_base)  # with or without the task wrapper


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    from tests.hf_models import tiny_llama

    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def llama_session(tiny, llama_dir, *sets):
    return Session(tiny(f"model={{name: hf_causal, path: '{llama_dir}'}}", "data.tokenizer={name: pretrained}", *sets),
                   log=lambda m: None)


def frozen_names(model) -> set[str]:
    return {n for n, p in model.backbone.hf_module().named_parameters() if not p.requires_grad}


def test_freeze_bottom_k_freezes_the_embeddings_and_the_bottom_blocks(tiny, llama_dir):
    model = llama_session(tiny, llama_dir, "train.freeze=[bottom:1]").model
    frozen = frozen_names(model)
    names = {n for n, _ in model.backbone.hf_module().named_parameters()}
    assert any("embed_tokens" in n for n in frozen) and all("layers.0." in n or "embed_tokens" in n for n in frozen)
    assert {n for n in names if "layers.0." in n} <= frozen
    assert not any("layers.1." in n or n.endswith("norm.weight") and "layers" not in n for n in frozen)  # top trains
    assert model.cls_head.weight.requires_grad


def test_freeze_blocks_a_b_freezes_exactly_those_blocks(tiny, llama_dir):
    model = llama_session(tiny, llama_dir, "train.freeze=[blocks:1-1]").model
    names = {n for n, _ in model.backbone.hf_module().named_parameters()}
    assert frozen_names(model) == {n for n in names if "layers.1." in n}


def test_a_range_with_lora_freezes_the_adapters_of_those_blocks(tiny, llama_dir):
    model = llama_session(tiny, llama_dir, "train.lora={r: 2}", "train.freeze=[blocks:0-0]").model
    trainable = {n for n, p in model.backbone.hf_module().named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and "layers.1." in n for n in trainable)


def test_a_range_beyond_the_blocks_names_how_many_there_are(tiny, llama_dir):
    with pytest.raises(UserError, match=r"train.freeze: 'blocks:0-2' goes beyond the model's blocks: it has 2 "):
        llama_session(tiny, llama_dir, "train.freeze=[blocks:0-2]")
    with pytest.raises(UserError, match=r"train.freeze: 'bottom:3' goes beyond the model's blocks: it has 2 "):
        llama_session(tiny, llama_dir, "train.freeze=[bottom:3]")


def test_ranges_also_cover_the_from_scratch_gpt_and_refuse_a_model_without_blocks(tiny):
    model = Session(tiny("model.n_layer=2", "train.freeze=[bottom:1]"), log=lambda m: None).model
    b = model.backbone
    assert not b.embed.weight.requires_grad and not b.pos.weight.requires_grad
    assert not any(p.requires_grad for p in b.blocks[0].parameters())
    assert all(p.requires_grad for p in b.blocks[1].parameters())
    with pytest.raises(UserError, match=r"train.freeze: 'blocks:0-0': this backbone \(\w+\) has no blocks"):
        Session(tiny("model={name: lstm, d_model: 32}", "train.freeze=[blocks:0-0]"), log=lambda m: None)


@pytest.mark.parametrize("item", ["blocks:3", "blocks:2-1", "top:4", "bottom:-1", "blocks:a-b"])
def test_a_malformed_range_is_refused_when_the_config_is_read(tiny, item):
    with pytest.raises(UserError, match=rf"train.freeze.0: '{item}' is not a layer range \(allowed: blocks:A-B"):
        tiny(f"train.freeze=['{item}']")
