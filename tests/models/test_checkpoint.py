"""Checkpoint integrity: every damaged or foreign file is one clear error; saves survive a crash."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from llmcli.errors import UserError
from llmcli.files import sha256_file
from llmcli.models.checkpoint import load_checkpoint, previous, restore_model, save_checkpoint, sidecar


@pytest.fixture
def ckpt(tiny_run, tmp_path):
    """A copy of a real checkpoint pair."""
    for name in ("last.safetensors", "last.json"):
        shutil.copy(tiny_run / "checkpoints" / name, tmp_path / name)
    return tmp_path / "last.safetensors"


def one_line(exc) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_a_good_checkpoint_loads(ckpt):
    tensors, side = load_checkpoint(ckpt)
    assert side["step"] == 20 and "rng.torch" in tensors and any(k.startswith("model.") for k in tensors)


def test_truncated(ckpt):
    ckpt.write_bytes(ckpt.read_bytes()[:-100])
    with pytest.raises(UserError) as e:
        load_checkpoint(ckpt)
    assert one_line(e).startswith(str(ckpt)) and "corrupt or truncated" in one_line(e)


def test_a_flipped_byte_fails_the_sha256(ckpt):
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    with pytest.raises(UserError, match="sha256 does not match"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("matching_sidecar", [True, False])
def test_a_pickle_file_is_refused_without_unpickling(ckpt, matching_sidecar):
    torch.save({"w": torch.zeros(2)}, ckpt)  # torch.save: a zip of pickles
    if matching_sidecar:  # even with a sidecar that vouches for it
        side = json.loads(sidecar(ckpt).read_text())
        sidecar(ckpt).write_text(json.dumps({**side, "sha256": sha256_file(ckpt)}))
    with pytest.raises(UserError, match="pickle / torch.save file, not safetensors"):
        load_checkpoint(ckpt)


def test_a_raw_pickle_is_refused(ckpt):
    import pickle

    ckpt.write_bytes(pickle.dumps({"w": [1, 2]}, protocol=4))
    with pytest.raises(UserError, match="pickle"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize(("text", "fragment"), [(None, "sidecar not found"), ("{not json", "not valid JSON"),
                                                 ("[1]", "expected a JSON object"),
                                                 ('{"sha256": "x"}', "field 'step' is missing or not an integer$"),
                                                 ('{"sha256": 1, "step": 1}', "'sha256' is missing or not a string$")])
def test_bad_sidecars(ckpt, text, fragment):
    if text is None:
        sidecar(ckpt).unlink()
    else:
        sidecar(ckpt).write_text(text)
    with pytest.raises(UserError, match=fragment):
        load_checkpoint(ckpt)


def test_shape_mismatch_names_the_weight_and_both_shapes(ckpt, tiny):
    from llmcli.models.model import build_model

    tensors, _ = load_checkpoint(ckpt)
    cfg = tiny("model.d_model=48")
    model = build_model(cfg.model, vocab_size=512, n_classes=10, max_len=48)
    with pytest.raises(UserError, match=r"weight '.*' has shape \(\d+, 32\), the model expects \(\d+, 48\)"):
        restore_model(model, tensors, ckpt)


def test_a_save_cut_before_its_sidecar_loads_the_previous_pair(tmp_path):
    from safetensors.torch import save

    from llmcli.config import AdamWConfig, ConstantSchedule
    from llmcli.training.optim import build_adamw, build_constant

    model = torch.nn.Linear(3, 2)
    opt = build_adamw(AdamWConfig(), decay=[model.weight], no_decay=[model.bias])
    sched = build_constant(ConstantSchedule(), optimizer=opt, total_steps=10)
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, model, opt, sched, {"step": 1})
    assert not previous(path).exists()  # only present while a save is under way
    old, saved_weight = path.read_bytes(), model.weight.detach().clone()
    shutil.copy(path, previous(path))  # the state a crash leaves: previous tensors kept, ...
    path.write_bytes(save({"model.weight": saved_weight + 1, "model.bias": model.bias.detach().clone()}))
    tensors, side = load_checkpoint(path)  # ... new tensors written, sidecar still the old one
    assert side["step"] == 1 and torch.equal(tensors["model.weight"], saved_weight)
    load_checkpoint(path, repair=True)
    assert path.read_bytes() == old and not previous(path).exists()


# ---------------------------------------------------------------- LoRA checkpoints (llmcli/models/lora.py)


@pytest.fixture(scope="module")
def lora_session(tiny, tmp_path_factory):
    """A LoRA session on a tiny Llama (adapters injected, nothing trained)."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from llmcli.training.engine import Session
    from tests.hf_models import tiny_llama

    path = tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
    return Session(tiny(f"model={{name: hf_causal, path: '{path}'}}", "data.tokenizer={name: pretrained}",
                        "train.lora={r: 2}"), log=lambda m: None)


def test_a_lora_checkpoint_holds_only_adapters_and_heads_and_restores_into_adapters_only(lora_session, tmp_path):
    from llmcli.models.lora import BASE_KEY
    from llmcli.models.model import build_model

    sess = lora_session
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, sess.model, sess.optimizer, sess.scheduler, {"step": 0})
    tensors, side = load_checkpoint(path)
    keys = {k.removeprefix("model.") for k in tensors if k.startswith("model.")}
    assert keys and all("lora_" in k or k.startswith("cls_head.") for k in keys)
    assert side["adapters_only"] and side[BASE_KEY] == sess.model.backbone.pretrained_record()
    restore_model(sess.model, tensors, path)  # a LoRA model takes it back
    plain = build_model(sess.cfg.model, vocab_size=sess.data.manifest["vocab_size"], n_classes=len(sess.data.label_names),
                        max_len=sess.cfg.data.max_len)
    with pytest.raises(UserError, match=r"last.safetensors: checkpoint lacks weight '.*'"):
        restore_model(plain, tensors, path)  # a model without adapters needs its whole weights


@pytest.mark.parametrize(("side", "lora", "fragment"), [
    ({"step": 0}, True, "field 'base_model' (the base model a LoRA run needs) is missing"),
    ({"step": 0, "base_model": {"path": "x", "sha256": "0" * 64}}, None, "holds LoRA adapters but the run's config.yaml"),
    ({"step": 0, "base_model": {"path": "x", "sha256": "0" * 64}}, True, "the base model x changed since this LoRA run"),
])
def test_a_lora_sidecar_that_does_not_fit_is_one_line(lora_session, tmp_path, side, lora, fragment):
    from llmcli.models.lora import restore_lora
    from llmcli.models.model import build_model

    sess = lora_session
    model = build_model(sess.cfg.model, vocab_size=sess.data.manifest["vocab_size"], n_classes=len(sess.data.label_names),
                        max_len=sess.cfg.data.max_len)
    with pytest.raises(UserError) as exc:
        restore_lora(model, sess.cfg.train.lora if lora else None, side, tmp_path / "last.safetensors")
    assert fragment in one_line(exc)
