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
    rows = sess.train_idx[data.domain_ids[sess.train_idx] == wyc]
    assert len(rows) > 0 and (data.labels[rows] == -1).all()  # its training text is in, its labels are not
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
