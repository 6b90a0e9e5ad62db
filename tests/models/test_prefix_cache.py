"""The frozen prefix cache (llmcli/models/prefix_cache.py): computed once, exact, keyed, shared, never half-read.

Tiny random GPT-2 (absolute positions added below block 0, dropout), Llama (rotary positions, no dropout) and a
bare BERT (attention mask) of tests/hf_models.py, with the bottom block (of 2) or both blocks frozen. All three read
the tiny GPT-2's tokenizer (400 ids fit each model's embeddings), so the tests share one processed folder: what
is tested is the models' forward, which any ids exercise.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil

import numpy as np
import pytest

pytest.importorskip("transformers")
import torch  # noqa: E402

from llmcli.data.dataset import ProcessedData  # noqa: E402
from llmcli.data.preprocess import preprocess  # noqa: E402
from llmcli.models import prefix_cache as pc  # noqa: E402
from llmcli.models.model import build_model  # noqa: E402
from llmcli.models.transfer import apply_transfer  # noqa: E402
from tests.hf_models import BUILDERS  # noqa: E402

LOGIT_ATOL = 1e-5  # fp32 storage: the bound (measured: 0 to ~1e-6)
FP16_ATOL = 5e-3  # fp16 storage on these tiny models (measured: 1e-4 to 4e-4); docs/pretrained.md has SmolLM2's


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix-models")
    return {name: BUILDERS[name](root / name) for name in ("gpt2", "llama", "bert_bare")}


def overrides(folders, name, *more):
    kind = "hf_encoder" if name.startswith("bert") else "hf_causal"
    return [f"model={{name: {kind}, path: '{folders[name]}'}}",
            f"data.tokenizer={{name: pretrained, path: '{folders['gpt2']}'}}", *more]


def hf_cfg(tiny, folders, name, *more):
    return tiny(*overrides(folders, name, *more))


def session_model(cfg):
    """(model with train.freeze applied, its processed data), as Session sets them up."""
    data = ProcessedData(preprocess(cfg.data, log=lambda m: None))
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, vocab_size=data.manifest["vocab_size"], n_classes=len(data.label_names),
                        max_len=cfg.data.max_len)
    apply_transfer(model, cfg.train, data)
    return model, data


def opened(cfg, model, data, storage=None, log=lambda m: None):
    cache, notes = pc.open_cache(model, cfg.train.freeze, data, storage=storage or cfg.train.prefix_cache_dtype,
                                 batch_size=16, device="cpu", log=log)
    return cache, notes


def logits(model, tokens, lengths, prefix=None):
    """(LM logits (B, T, V), task logits (B, C)) of the full model, or of the top blocks run from `prefix`."""
    h = model(tokens, lengths) if prefix is None else model(tokens, lengths, prefix)
    return model.lm_head(h), model.cls_head(model.pool(h, lengths))


@pytest.mark.parametrize(("name", "k"), [("gpt2", 1), ("llama", 1), ("bert_bare", 1), ("gpt2", 2), ("llama", 2)])
def test_top_blocks_run_from_cached_states_give_the_full_models_logits(tiny, folders, name, k):
    cfg = hf_cfg(tiny, folders, name, f"train.freeze=[bottom:{k}]")
    model, data = session_model(cfg)
    idx = data.indices("val", ["kjv"])[:24]
    cache, _ = opened(cfg, model, data)
    assert cache is not None and cache.k == k
    cache.ensure(idx)
    calls = []
    hook = model.backbone.prefix_blocks()[0].register_forward_hook(lambda m, a, o: calls.append(1))
    model.eval()
    b = data.batch(idx)
    real = torch.arange(b.tokens.shape[1])[None] < b.lengths[:, None]  # (B, T)
    with torch.no_grad():
        lm_full, cls_full = logits(model, b.tokens, b.lengths)
        assert len(calls) == 1
        given = cache.states(idx, "cpu")
        lm, cls = logits(model, b.tokens, b.lengths, given)
        noisy = pc.Prefix(given.states + torch.randn_like(given.states), k)
        lm_noisy, _ = logits(model, b.tokens, b.lengths, noisy)
    hook.remove()
    assert len(calls) == 1  # the cached blocks did not run
    assert float((lm - lm_full)[real].abs().max()) < LOGIT_ATOL
    assert float((cls - cls_full).abs().max()) < LOGIT_ATOL
    assert float((lm_noisy - lm_full)[real].abs().max()) > 1e-2  # the cached states are what the top reads


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert_bare"])
def test_fp16_storage_stays_within_its_stated_tolerance(tiny, folders, name):
    cfg = hf_cfg(tiny, folders, name, "train.freeze=[bottom:1]", "train.prefix_cache_dtype=fp16")
    model, data = session_model(cfg)
    idx = data.indices("val", ["web"])[:24]
    cache, _ = opened(cfg, model, data)
    cache.ensure(idx)
    assert np.load(next(cache.root.glob("chunk-*")) / "states.npy", mmap_mode="r").dtype == np.float16
    model.eval()
    b = data.batch(idx)
    real = torch.arange(b.tokens.shape[1])[None] < b.lengths[:, None]
    with torch.no_grad():
        lm_full, cls_full = logits(model, b.tokens, b.lengths)
        lm, cls = logits(model, b.tokens, b.lengths, cache.states(idx, "cpu"))
    diff = max(float((lm - lm_full)[real].abs().max()), float((cls - cls_full).abs().max()))
    assert 0 < diff < FP16_ATOL


def _edited_copy(data, folder, **changes):
    """The processed folder copied with manifest fields changed (another tokenizer's or another build's records)."""
    copy = folder / data.path.name
    shutil.copytree(data.path, copy, ignore=shutil.ignore_patterns("prefix-*"))
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, **changes}))
    return ProcessedData(copy)


def test_each_key_part_gives_another_cache(tiny, folders, tmp_path):
    """Model weights, data, tokenizer, k, max_len and storage each name the folder: a change never reuses one."""
    freeze = "train.freeze=[bottom:1]"
    base = hf_cfg(tiny, folders, "gpt2", freeze)
    model, data = session_model(base)
    root = opened(base, model, data)[0].root
    other = BUILDERS["gpt2"](tmp_path / "gpt2-seed1", seed=1)  # the same architecture, other weights
    max_len = {**data.manifest["data_config"], "max_len": 40}
    variants = {
        "prefix_tensors_sha256": session_model(tiny(*overrides({"gpt2": folders["gpt2"], "x": other}, "x", freeze))),
        "k": session_model(hf_cfg(tiny, folders, "gpt2", "train.freeze=[bottom:2]")),
        # the processed data as the manifest names it: its tokenizer, its max_len, and its build
        "tokenizer_sha256": (model, _edited_copy(data, tmp_path / "tok", tokenizer_sha256="0" * 64)),
        "max_len": (model, _edited_copy(data, tmp_path / "len", data_config=max_len)),
        "data_manifest_sha256": (model, _edited_copy(data, tmp_path / "rebuilt", seconds=-1.0)),
    }
    assert variants["prefix_tensors_sha256"][1].path == data.path
    want = pc.key_parts(model, 1, data, "fp32")
    roots = {root}
    for part, (m, d) in variants.items():
        cache = opened(base, m, d)[0]
        assert cache.root not in roots, part
        assert json.loads((cache.root / "manifest.json").read_text())[part] != want[part], part
        roots.add(cache.root)
    assert opened(base, model, data, storage="fp16")[0].root not in roots
    assert opened(base, model, data)[0].root == root  # the same parts: the same folder, reused


def test_a_run_reads_the_cache_and_trains_as_the_whole_model_does(tiny, folders, tmp_path):
    """Llama has no dropout, so the cached run's losses equal the uncached run's; train.log shows the build once."""
    from llmcli.training.engine import train

    args = ("train.freeze=[bottom:1]", "train.steps=4", "train.eval_every=2", "train.log_every=2",
            "train.val_max_examples=16")
    runs = {pc_: train(hf_cfg(tiny, folders, "llama", *args, f"train.prefix_cache={pc_}"), runs_dir=tmp_path / pc_,
                       progress=False, log=lambda m: None) for pc_ in ("auto", "off")}
    again = train(hf_cfg(tiny, folders, "llama", *args, "objective.alpha=0.9"), runs_dir=tmp_path / "again",
                  progress=False, log=lambda m: None)
    recs = {k: [json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()] for k, r in runs.items()}
    assert len(recs["auto"]) == len(recs["off"]) > 0
    for a, b in zip(recs["auto"], recs["off"]):
        for key in ("lm_loss", "task_loss", "loss", "acc", "ppl"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (key, a, b)
    log = (runs["auto"] / "train.log").read_text()
    assert "prefix cache: computing the embeddings + block 0 for" in log and "computed in" in log
    assert "prefix cache: block 0 read from" in log
    later = (again / "train.log").read_text()  # another point of a sweep: reads, computes nothing
    assert "read from" in later and "computing" not in later
    assert "prefix cache" not in (runs["off"] / "train.log").read_text()


def test_eval_reads_the_cache_and_scores_as_the_whole_model(tiny, folders, tmp_path):
    from llmcli.evaluation.evaluate import eval_task_loss
    from llmcli.evaluation.metrics import score
    from llmcli.models.load import load_trained
    from llmcli.training.engine import train

    cfg = hf_cfg(tiny, folders, "bert_bare", "train.freeze=[bottom:1]", "train.steps=2", "train.eval_every=2",
                 "train.val_max_examples=8")
    run = train(cfg, runs_dir=tmp_path, progress=False, log=lambda m: None)
    t = load_trained(run)
    data = ProcessedData(preprocess(t.cfg.data, log=lambda m: None))
    lines = []
    cache = pc.for_eval(t, data, lines.append)
    assert cache is not None and cache.k == 1
    idx = data.indices("test", ["wyc"])[:20]
    loss = eval_task_loss(t.cfg, data)
    with_cache = score(t.model, data, idx, 8, loss, prefix=cache)
    whole = score(t.model, data, idx, 8, loss)
    for key in ("task_loss", "acc", "lm_loss"):
        assert with_cache[key] == pytest.approx(whole[key], rel=1e-5), key
    assert any("computing the embeddings + block 0 for 20 records" in x for x in lines)


@pytest.mark.parametrize(("extra", "why"), [
    (("train.lora={r: 2, target_modules: [c_attn]}", "train.freeze=[bottom:1]"), "LoRA adapters sit inside"),
    (("objective={name: conditioned}", "train.freeze=[bottom:1]"), "hooks into the frozen blocks"),
    (("train.freeze=[bottom:1]", "train.compile=true"), "train.compile"),
    (("train.freeze=[bottom:1]", "train.prefix_cache=off"), None),
    (("train.freeze=[blocks:1-1]",), None),  # the embeddings train: nothing below a block is frozen
    (("train.freeze=[bottom:0]",), None),
])
def test_no_cache_where_something_else_runs_below_block_k(tiny, folders, extra, why):
    from llmcli.registry import registry

    cfg = hf_cfg(tiny, folders, "gpt2", *extra)
    data = ProcessedData(preprocess(cfg.data, log=lambda m: None))
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size=data.manifest["vocab_size"], n_classes=len(data.label_names),
                        max_len=cfg.data.max_len)
    registry("objective").build(cfg.objective).wrap_model(model)  # the conditioned objective's FiLM hooks
    apply_transfer(model, cfg.train, data)
    cache, notes = pc.for_training(model, cfg, data, "cpu")
    assert cache is None
    assert (why is None and not notes) or (why is not None and why in notes[0] and "whole model runs" in notes[0])


def test_augmented_batches_and_encoders_say_what_reads_the_cache(tiny, folders):
    cfg = hf_cfg(tiny, folders, "bert_bare", "train.freeze=[bottom:1]", "data.augment=[{name: token_dropout, p: 0.1}]")
    model, data = session_model(cfg)
    cache, notes = pc.for_training(model, cfg, data, "cpu")
    assert cache is not None and not cache.batches  # augmented tokens: training batches run the whole model
    text = " ".join(notes)
    assert "masked-LM loss reads a masked input" in text and "data.augment" in text and "in eval mode" in text
    one = hf_cfg(tiny, folders, "bert_bare", "train.freeze=[bottom:1]", "model.task_input=masked")
    model, data = session_model(one)
    cache, notes = pc.for_training(model, one, data, "cpu")
    assert cache is not None and not cache.batches  # one masked forward per step: only validation reads it
    assert "model.task_input is masked" in " ".join(notes) and "masked-LM loss reads" not in " ".join(notes)


def _fill(args):
    """One sweep worker (a process of its own): open the cache and make the same records readable."""
    from llmcli.config import load_config
    from tests.conftest import TINY

    sets, idx = args
    cfg = load_config(TINY, sets)
    torch.set_num_threads(1)
    model, data = session_model(cfg)
    cache, _ = opened(cfg, model, data)
    lines = []
    cache.log = lines.append
    cache.ensure(idx)
    return cache.root, [x for x in lines if "computing the embeddings" in x], cache.states(idx, "cpu").states.numpy()


def test_concurrent_workers_compute_the_prefix_once(tiny, folders, processed_dir):
    sets = [f"data.processed_dir={processed_dir}",
            *overrides(folders, "gpt2", "train.freeze=[bottom:1]", "train.prefix_cache_dtype=fp16")]
    cfg = tiny(*sets)
    model, data = session_model(cfg)
    root = opened(cfg, model, data)[0].root
    before = len(list(root.glob("chunk-*")))
    idx = data.indices("train", ["kjv"])[:100]  # records no other test caches under this key
    with multiprocessing.get_context("spawn").Pool(2) as pool:  # spawn: fresh processes, as sweep workers are
        results = pool.map(_fill, [(sets, idx), (sets, idx)])
    assert results[0][0] == results[1][0] == root
    assert sum(len(r[1]) for r in results) == 1  # one of the two computed it, the other waited and read it
    assert len(list(root.glob("chunk-*"))) == before + 1
    np.testing.assert_array_equal(results[0][2], results[1][2])


def test_a_half_written_chunk_is_never_read(tiny, folders, monkeypatch):
    cfg = hf_cfg(tiny, folders, "llama", "train.freeze=[bottom:1]")
    model, data = session_model(cfg)
    idx = data.indices("test", ["wyc"])[:40]  # records no other test caches under this key
    cache, _ = opened(cfg, model, data)
    before = sorted(cache.root.glob("chunk-*"))
    real_capture, calls = pc.capture, []

    def dies_on_the_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_capture(*args, **kwargs)

    monkeypatch.setattr(pc, "capture", dies_on_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        cache.ensure(idx)
    assert sorted(cache.root.glob("chunk-*")) == before and not list(cache.root.glob(".chunk-*"))
    (cache.root / ".chunk-killed").mkdir()  # what a SIGKILL mid-build leaves: a temporary folder
    (cache.root / ".chunk-killed" / "states.npy").write_bytes(b"half")
    monkeypatch.setattr(pc, "capture", real_capture)
    fresh, _ = opened(cfg, model, data)
    fresh.ensure(idx)
    assert not (cache.root / ".chunk-killed").exists() and len(list(cache.root.glob("chunk-*"))) == len(before) + 1
    model.eval()
    b = data.batch(idx)
    with torch.no_grad():
        full = model(b.tokens, b.lengths)
        part = model(b.tokens, b.lengths, fresh.states(idx, "cpu"))
    real = torch.arange(b.tokens.shape[1])[None] < b.lengths[:, None]
    assert float((full - part)[real].abs().max()) < LOGIT_ATOL
