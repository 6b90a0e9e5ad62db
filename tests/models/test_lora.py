"""LoRA (train.lora) on tiny pretrained GPT-2 and Llama models: only the adapters and heads train, the run folder
holds only them and names its base model, and it loads, evaluates, generates, resumes exactly and compresses."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from llmcli.errors import UserError  # noqa: E402
from llmcli.models.load import load_trained  # noqa: E402
from llmcli.models.lora import adapter_state, is_lora, merge_lora, resolve_targets  # noqa: E402
from llmcli.training.engine import Session, train  # noqa: E402
from tests.conftest import ROOT, TINY  # noqa: E402
from tests.hf_models import BUILDERS  # noqa: E402
from tests.training.test_resume import last_step, same_weights  # noqa: E402
from tests.training.test_train import QUIET, metric_values  # noqa: E402

ARCHS = ("gpt2", "llama")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny GPT-2 and Llama folders (built once for this module)."""
    return {a: BUILDERS[a](tmp_path_factory.mktemp(f"tiny-{a}")) for a in ARCHS}


def hf_sets(model_dir: Path, lora: str = "{r: 4}") -> list[str]:
    """--set overrides: the tiny config on a pretrained causal model with its own tokenizer, LoRA on."""
    return [f"model={{name: hf_causal, path: '{model_dir}'}}", "data.tokenizer={name: pretrained}", f"train.lora={lora}"]


@pytest.fixture(scope="module")
def lora_runs(tiny, model_dirs, tmp_path_factory) -> dict[str, Path]:
    """One finished 6-step LoRA run per architecture (read-only for the tests)."""
    out = tmp_path_factory.mktemp("lora-runs")
    return {a: train(tiny(*hf_sets(d), "train.steps=6", "train.eval_every=3", "train.log_every=3"), runs_dir=out / a,
                     **QUIET) for a, d in model_dirs.items()}


def hf_of(model) -> torch.nn.Module:
    return model.backbone.hf_module()


@pytest.mark.parametrize("arch", ARCHS)
def test_only_the_adapters_and_the_task_head_are_trainable(tiny, model_dirs, arch):
    model = Session(tiny(*hf_sets(model_dirs[arch])), log=lambda m: None).model
    hf = hf_of(model)
    inside = {id(p) for p in hf.parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapters = {n for n, p in hf.named_parameters() if "lora_" in n}
    assert adapters and all(dict(hf.named_parameters())[n].requires_grad for n in adapters)
    assert all(not p.requires_grad for n, p in hf.named_parameters() if "lora_" not in n)  # the base is frozen
    outside = {n for n, p in model.named_parameters() if id(p) not in inside}
    assert {"cls_head.weight", "cls_head.bias"} <= outside <= trainable  # llmcli's own head trains
    assert len(trainable) == len(adapters) + len(outside)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_lora_run_folder_holds_adapters_and_heads_and_names_its_base(lora_runs, model_dirs, arch):
    from llmcli.models.pretrained import sha256_of

    run, base_file = lora_runs[arch], model_dirs[arch] / "model.safetensors"
    ckpt = run / "checkpoints" / "last.safetensors"
    saved = [k.removeprefix("model.") for k in load_file(ckpt) if k.startswith("model.")]
    assert saved and all("lora_" in k or k.startswith("cls_head.") for k in saved), saved
    assert any(k.startswith("cls_head.") for k in saved)
    # adapters, task head, their AdamW moments and the RNG state: a fraction of the base weights alone
    assert ckpt.stat().st_size < base_file.stat().st_size / 4, (ckpt.stat().st_size, base_file.stat().st_size)
    side = json.loads((run / "checkpoints" / "last.json").read_text())
    assert side["adapters_only"] is True
    assert side["base_model"]["sha256"] == sha256_of(base_file)
    assert side["base_model"]["path"] == str(model_dirs[arch])


@pytest.mark.parametrize("arch", ARCHS)
def test_training_leaves_the_base_weights_untouched_and_moves_the_adapters(lora_runs, model_dirs, arch):
    t = load_trained(lora_runs[arch], "last")
    base = load_file(model_dirs[arch] / "model.safetensors")
    hf = hf_of(t.model)
    own = {n.replace(".base_layer", ""): p for n, p in hf.named_parameters() if "lora_" not in n}
    for n, p in own.items():  # the file names them with or without the task wrapper's prefix (transformer., model.)
        key = next(k for k in base if k == n or k.endswith("." + n) or n.endswith("." + k))
        assert torch.equal(p.detach(), base[key]), n
    lora_b = [p for n, p in hf.named_parameters() if "lora_B" in n]
    assert lora_b and any(bool(p.abs().sum() > 0) for p in lora_b)  # B starts at zero: it was trained


@pytest.mark.parametrize("arch", ARCHS)
def test_a_loaded_lora_run_gives_its_validation_metrics_back(lora_runs, arch):
    from llmcli.evaluation.metrics import score
    from llmcli.runs import load_run_config

    run = lora_runs[arch]
    t = load_trained(run, "last")
    assert is_lora(t.model)
    saved = load_file(run / "checkpoints" / "last.safetensors")
    state = adapter_state(t.model)
    assert all(torch.equal(v.detach(), saved[f"model.{k}"]) for k, v in state.items())
    sess = Session(load_run_config(run), log=lambda m: None)
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rec = next(r for r in recs if (r["step"], r["split"], r.get("domain")) == (6, "val", "kjv"))
    got = score(t.model, sess.data, sess.val_idx["kjv"], 64, sess.task_loss, "cpu")
    assert got["lm_loss"] == pytest.approx(rec["lm_loss"], rel=1e-5)
    assert got["acc"] == pytest.approx(rec["acc"])


def test_eval_and_generate_work_on_a_lora_run(lora_runs):
    from llmcli.evaluation.evaluate import score_run
    from llmcli.evaluation.generate import generate

    run = lora_runs["llama"]
    res = score_run(run, split="test", log=lambda m: None)
    assert set(res["domains"]) >= {"kjv", "web", "wyc"} and 0 <= res["domains"]["kjv"]["acc"] <= 1
    texts = ["".join(generate(run, "In the beginning", max_new_tokens=6, temperature=0.0)) for _ in range(2)]
    assert texts[0] == texts[1] and texts[0]


def test_merging_the_adapters_keeps_the_model_outputs(lora_runs):
    t = load_trained(lora_runs["gpt2"], "last")
    tokens = torch.tensor([[1, 5, 9, 40, 7, 3, 2]])
    with torch.no_grad():
        before = t.model(tokens)  # (1, T, D)
        assert merge_lora(t.model) == 2  # c_attn in each of the two blocks
        after = t.model(tokens)
    assert not is_lora(t.model)
    assert torch.allclose(before, after, atol=1e-5)


def test_compress_merges_a_lora_run_into_a_plain_model(lora_runs, tmp_path):
    from llmcli.experiments.compress import compress

    out = compress(lora_runs["llama"], quantize="int8", runs_dir=tmp_path, log=lambda m: None)
    side = json.loads((out / "checkpoints" / "best.json").read_text())
    assert side["compression"]["merged_lora_layers"] == 4  # q_proj and v_proj of two blocks
    assert not any("lora_" in k for k in load_file(out / "checkpoints" / "best.safetensors"))
    assert not is_lora(load_trained(out).model)


def test_a_changed_base_model_is_refused_in_one_line(tiny, tmp_path):
    base = BUILDERS["gpt2"](tmp_path / "base")
    run = train(tiny(*hf_sets(base), "train.steps=2", "train.eval_every=2"), runs_dir=tmp_path / "runs", **QUIET)
    shutil.rmtree(base)
    BUILDERS["gpt2"](base, seed=1)  # the same architecture, other weights
    with pytest.raises(UserError, match=r"the base model .* changed since this LoRA run was trained") as exc:
        load_trained(run)
    assert "\n" not in str(exc.value)


def test_lora_on_a_from_scratch_backbone_is_refused_before_any_folder(tiny, tmp_path):
    with pytest.raises(UserError, match="train.lora: LoRA adapts a pretrained backbone"):
        train(tiny("train.lora={r: 4}"), runs_dir=tmp_path, **QUIET)
    assert not any(tmp_path.iterdir())


def test_auto_targets_are_peft_defaults_else_every_linear_layer_in_the_blocks(tiny, model_dirs, monkeypatch):
    from peft.utils import constants

    plain = [s for s in hf_sets(model_dirs["llama"]) if not s.startswith("train.lora")]
    hf = hf_of(Session(tiny(*plain), log=lambda m: None).model)
    assert resolve_targets(hf, "auto") == (["q_proj", "v_proj"], "peft's default for llama")
    monkeypatch.delitem(constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, "llama")
    names, how = resolve_targets(hf, "auto")
    assert how.startswith("every Linear layer inside the blocks")
    assert len(names) == 2 * 7 and all("layers." in n for n in names)  # q, k, v, o, gate, up, down per block
    with pytest.raises(UserError, match=r"train.lora.target_modules: 'qkv' names no Linear layer .*: down_proj"):
        resolve_targets(hf, ["qkv"])


def test_explicit_target_modules_adapt_just_those_and_train_says_so(tiny, model_dirs):
    lines: list[str] = []
    model = Session(tiny(*hf_sets(model_dirs["llama"], "{r: 2, target_modules: [o_proj, down_proj]}")),
                    log=lines.append).model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert f"train: LoRA r=2 alpha=16 on o_proj, down_proj (as given): {trainable:,} of " in "\n".join(lines)
    wrapped = [n for n, p in hf_of(model).named_parameters() if "lora_A" in n]
    assert len(wrapped) == 4 and all(("o_proj" in n) or ("down_proj" in n) for n in wrapped)


def test_init_from_a_lora_run_is_refused(tiny, lora_runs, model_dirs):
    sets = [s for s in hf_sets(model_dirs["gpt2"]) if not s.startswith("train.lora")]
    with pytest.raises(UserError, match=r"train.init_from: .* is a LoRA run \(adapters only"):
        Session(tiny(*sets, f"train.init_from={lora_runs['gpt2']}"), log=lambda m: None)


def test_a_lora_run_killed_with_sigkill_resumes_to_the_uninterrupted_metrics(tiny, processed_dir, model_dirs, tmp_path):
    settings = [*hf_sets(model_dirs["gpt2"], "{r: 4, dropout: 0.1}"), "train.steps=12", "train.log_every=1",
                "train.checkpoint_every=3", "train.eval_every=6", "train.threads=1"]
    reference = train(tiny(*settings), runs_dir=tmp_path / "reference", **QUIET)
    seed = random.randrange(1 << 30)
    kill_at = random.Random(seed).randint(1, 11)
    sets = [a for s in [f"data.processed_dir={processed_dir}", *settings] for a in ("--set", s)]
    runs = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "llmcli", "train", str(TINY), *sets, "--runs-dir", str(runs),
                             "--no-progress"], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        found = list(runs.iterdir()) if runs.is_dir() else []
        if found and last_step(found[0] / "metrics.jsonl") >= kill_at:
            break
        time.sleep(0.002)
    assert proc.poll() is None, f"the run ended before step {kill_at}: {proc.stderr.read().decode()[-500:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run = next(runs.iterdir())
    train(None, resume=run, **QUIET)
    msg = f"seed {seed}: killed at step {kill_at}"
    assert json.loads((run / "meta.json").read_text())["status"] == "completed", msg
    assert metric_values(run) == metric_values(reference), msg
    assert same_weights(run, reference), msg
