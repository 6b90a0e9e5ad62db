"""Preprocessing: splits by group, the tokenizer trained on train only, arrays, manifest, no-op re-runs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llmcli.config import validate_config
from llmcli.data.dataset import ProcessedData, epoch_stream
from llmcli.data.preprocess import preprocess, processed_path, split_of_group
from llmcli.errors import UserError


def jsonl_cfg(tmp_path, lines, **data):
    src = tmp_path / "d.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return validate_config({"data": {"source": {"name": "jsonl", "path": str(src)},
                                     "tokenizer": {"name": "bpe", "vocab_size": 300},
                                     "split": {"val": 0.2, "test": 0.2}, "processed_dir": str(tmp_path / "p"),
                                     **data}})


def records(n=60):
    return [json.dumps({"text": f"record number {i} says héllo", "label": "ab"[i % 2], "domain": "xy"[i % 3 == 0],
                        "group": f"g{i // 3}"}) for i in range(n)]


def test_groups_never_cross_splits_and_every_version_shares_the_chapter_split(tiny):
    data = ProcessedData(preprocess(tiny().data, log=lambda m: None))
    groups = np.load(data.path / "groups.npy")
    for g in np.unique(groups):
        assert len(np.unique(data.splits[groups == g])) == 1
    assert data.manifest["groups_crossing_splits"] == 0
    counts = data.manifest["counts"]
    # the same chapters are held out in every version (WYC lacks a few verses, so <=)
    assert counts["test/web"] == counts["test/kjv"] and 0 < counts["test/wyc"] <= counts["test/kjv"]


def test_split_assignment_is_a_pure_function_of_seed_and_group():
    assert split_of_group("01.002", 0, 0.1, 0.1) == split_of_group("01.002", 0, 0.1, 0.1)
    shares = np.bincount([split_of_group(f"g{i}", 0, 0.1, 0.2) for i in range(5000)], minlength=3) / 5000
    assert shares == pytest.approx([0.7, 0.1, 0.2], abs=0.03)


def test_second_preprocess_does_no_work(tiny):
    cfg = tiny().data
    first = preprocess(cfg, log=lambda m: None)
    stamp = (first / "tokens.bin").stat().st_mtime_ns
    said = []
    assert preprocess(cfg, log=said.append) == first
    assert (first / "tokens.bin").stat().st_mtime_ns == stamp and "up to date" in said[0]


def test_jsonl_arrays_round_trip_and_specials_frame_each_record(tmp_path):
    cfg = jsonl_cfg(tmp_path, records())
    data = ProcessedData(preprocess(cfg.data, log=lambda m: None))
    assert data.manifest["label_names"] == ["a", "b"] and sorted(data.domains) == ["x", "y"]
    b = data.batch(np.arange(3))
    assert (b.tokens[:, 0] == data.manifest["bos_id"]).all()
    assert all(b.tokens[i, b.lengths[i] - 1] == data.manifest["eos_id"] for i in range(3))
    from llmcli.data.tokenizers import TextTokenizer

    tok = TextTokenizer.load(data.path / "tokenizer.json")
    assert tok.decode(b.tokens[0, 1 : b.lengths[0] - 1].tolist()) == "record number 0 says héllo"


def test_tokenizer_sees_only_the_training_split(tmp_path):
    lines = records(60) + [json.dumps({"text": "zqzqzq " * 50, "label": "a", "group": "held"})]
    cfg = jsonl_cfg(tmp_path, lines, split={"val": 0.0, "test": 0.5, "seed": 0})
    from llmcli.data.preprocess import split_of_group as s

    if s("held", 0, 0.0, 0.5) != 2:  # choose a seed that puts the odd group in test
        cfg = jsonl_cfg(tmp_path, lines, split={"val": 0.0, "test": 0.5, "seed": next(
            k for k in range(100) if s("held", k, 0.0, 0.5) == 2)})
    data = ProcessedData(preprocess(cfg.data, log=lambda m: None))
    vocab = json.loads((data.path / "tokenizer.json").read_text())["model"]["vocab"]
    assert not any("zqzq" in t for t in vocab)


def test_bad_jsonl_line_is_named(tmp_path):
    cfg = jsonl_cfg(tmp_path, [*records(5), "{not json"])
    with pytest.raises(UserError, match=r"d\.jsonl:6: invalid JSON"):
        preprocess(cfg.data, log=lambda m: None)
    assert not processed_path(cfg.data).exists()


def test_unknown_train_domain_is_a_user_error(tmp_path):
    cfg = jsonl_cfg(tmp_path, records(), train_domains=["zz"])
    with pytest.raises(UserError, match=r"data\.train_domains: \['zz'\] not in the data"):
        preprocess(cfg.data, log=lambda m: None)


def test_epoch_stream_is_a_permutation_per_epoch_and_resumable():
    whole = epoch_stream(10, seed=1, start=0, count=30)
    for e in range(3):
        assert sorted(whole[e * 10 : (e + 1) * 10]) == list(range(10))
    assert (epoch_stream(10, 1, 7, 11) == whole[7:18]).all()


def test_two_concurrent_preprocess_runs_build_the_cache_once(tmp_path):
    import os
    import subprocess
    import sys

    from .conftest import ROOT, TINY

    cache = tmp_path / "processed"
    cmd = [sys.executable, "-m", "llmcli", "preprocess", str(TINY), "--set", f"data.processed_dir={cache}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert outs[0][0] == outs[1][0]  # both print the same folder
    built = [p for p in cache.iterdir() if p.is_dir()]
    assert len(built) == 1 and (built[0] / "manifest.json").is_file()  # no second copy, no leftover temp folder
    manifest = json.loads((built[0] / "manifest.json").read_text())
    assert (built[0] / "tokens.bin").stat().st_size == 2 * manifest["n_tokens"]


@pytest.mark.parametrize("damage", ["manifest.json", "tokens.bin", "labels.npy"])
def test_a_damaged_cache_is_one_clear_error(tiny, tmp_path, damage):
    import shutil

    from llmcli.errors import UserError

    src = preprocess(tiny().data, log=lambda m: None)
    copy = shutil.copytree(src, tmp_path / "copy")
    if damage == "tokens.bin":
        (copy / damage).unlink()
    else:
        (copy / damage).write_text("{")
    with pytest.raises(UserError, match=r"processed data is damaged .*run llmcli preprocess again") as e:
        ProcessedData(copy)
    assert str(e.value).startswith(str(copy)) and "\n" not in str(e.value)
