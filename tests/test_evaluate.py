"""`eval`: per-domain metrics, the gap, and the JSON it writes."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import yaml

from llmcli.errors import UserError
from llmcli.evaluate import evaluate
from llmcli.metrics import gaps

QUIET = {"log": lambda m: None}


def test_eval_scores_every_domain_and_writes_test_json(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    result = evaluate(run, **QUIET)
    assert set(result["domains"]) == {"kjv", "web", "wyc"} and result["in_domain"] == ["kjv"]
    for m in result["domains"].values():
        assert {"n", "lm_loss", "ppl", "bpb", "task_loss", "acc", "macro_f1"} <= set(m)
        assert m["ppl"] == pytest.approx(math.exp(m["lm_loss"])) and 0 <= m["acc"] <= 1
    assert json.loads((run / "eval" / "test.json").read_text()) == json.loads(json.dumps(result))
    kjv, wyc = result["domains"]["kjv"], result["domains"]["wyc"]
    assert result["gap"]["wyc"]["gap_acc"] == pytest.approx(kjv["acc"] - wyc["acc"])
    assert set(result["gap"]) == {"web", "wyc", "mean"}


def test_eval_is_deterministic_and_the_val_split_differs(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    a, b = evaluate(run, **QUIET), evaluate(run, **QUIET)
    assert a["domains"] == b["domains"]
    assert evaluate(run, split="val", **QUIET)["domains"]["kjv"]["n"] != a["domains"]["kjv"]["n"]


def test_gap_is_in_domain_minus_each_ood_domain_and_their_mean():
    g = gaps({"a": {"acc": 0.9, "ppl": 10.0}, "b": {"acc": 0.7, "ppl": 20.0}, "c": {"acc": 0.5, "ppl": 40.0}}, ["a"])
    assert g["b"]["gap_acc"] == pytest.approx(0.2) and g["c"]["gap_ppl"] == pytest.approx(-30.0)
    assert g["mean"]["gap_acc"] == pytest.approx(0.3)


def test_bpb_is_nats_per_byte_in_bits(tiny_run, tmp_path):
    # bpb * ln2 * bytes == lm_loss * tokens; both ratios must agree with the per-token loss on this data
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    m = evaluate(run, **QUIET)["domains"]["kjv"]
    # byte-level BPE tokens average more than one byte, so bits per byte < bits per token
    assert 0 < m["bpb"] < m["lm_loss"] / math.log(2)


def test_eval_of_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(UserError, match="not a run folder"):
        evaluate(tmp_path, **QUIET)
    with pytest.raises(UserError, match="run folder not found"):
        evaluate(tmp_path / "missing", **QUIET)


def test_corrupt_checkpoint_is_reported(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    ck = run / "checkpoints" / "best.safetensors"
    ck.write_bytes(ck.read_bytes()[:100])
    with pytest.raises(UserError, match="corrupt or truncated"):
        evaluate(run, **QUIET)


def test_classification_metrics_known_answers():
    import numpy as np

    from llmcli.metrics import classification_metrics

    # confidences .9 (right), .6 (wrong), .8 (right): ECE = (.1 + .6 + .2) / 3 = .3
    probs = np.array([[0.9, 0.1, 0.0], [0.6, 0.4, 0.0], [0.2, 0.8, 0.0]], dtype=np.float32)
    m = classification_metrics(probs, np.array([0, 1, 1]))
    assert m["acc"] == pytest.approx(2 / 3) and m["ece"] == pytest.approx(0.3, abs=1e-6)
    # recall: class 0 = 1/1, class 1 = 1/2; class 2 never occurs and is not averaged
    assert m["macro_recall"] == pytest.approx(0.75)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3) / 2)


def test_reliability_bins_hold_confidence_accuracy_and_count():
    import numpy as np

    from llmcli.metrics import reliability_bins

    probs = np.array([[0.95, 0.05], [0.97, 0.03], [0.5, 0.5], [0.3, 0.7]])
    b = reliability_bins(probs, np.array([0, 1, 0, 1]), n_bins=10)
    assert b["count"] == [0, 0, 0, 0, 1, 0, 1, 0, 0, 2]
    assert b["confidence"][9] == pytest.approx(0.96) and b["accuracy"][9] == pytest.approx(0.5)
    assert b["accuracy"][6] == 1.0 and sum(b["count"]) == 4


def test_sanity_warnings_name_each_problem():
    import numpy as np

    from llmcli.evaluate import sanity_warnings

    labels = ["a", "b", "c"]
    golds = np.array([0] * 60 + [1] * 40)  # class c missing; majority rate .6
    per = {"good": {"n": 100, "acc": 0.9, "task_loss": 0.3}, "bad": {"n": 50, "acc": 0.6, "task_loss": 1.1}}
    w = sanity_warnings("test", per, {"good": {"golds": golds}, "bad": {"golds": golds[:50] * 0}}, labels, 2)
    text = "\n".join(w)
    assert "bad: the test split has 50 examples" in text and "good: the test split" not in text
    assert "bad: acc 0.600 is not above chance" in text and "good: acc" not in text
    assert "bad: task_loss 1.100 is not clearly below ln(C) = 1.099" in text
    assert "good: class(es) missing from the test split: c" in text and "bad: class(es) missing" in text
    assert "2 group(s) of the test split also appear in the run's train split" in text
    assert sanity_warnings("val", {"x": {"n": 100, "acc": 0.9, "task_loss": 0.1}},
                           {"x": {"golds": np.array([0, 1, 2] * 40)}}, labels, 0) == []


def test_eval_writes_new_metrics_warnings_and_pictures(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "curves.png").unlink()
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["eval"]["max_examples"] = 40  # a split too small to trust
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    result = evaluate(run, split="val", **QUIET)
    for m in result["domains"].values():
        assert 0 <= m["macro_recall"] <= 1 and 0 <= m["ece"] <= 1
    assert set(result["gap"]["mean"]) >= {"gap_macro_recall", "gap_ece", "gap_acc"}
    # the tiny split is small: the warning is in the JSON, not only on screen
    assert "kjv: the val split has 40 examples (< 100); its scores are not evidence" in result["warnings"]
    saved = json.loads((run / "eval" / "val.json").read_text())
    assert saved["warnings"] == result["warnings"]
    cm = saved["confusion"]["kjv"]
    assert sum(map(sum, cm)) == result["domains"]["kjv"]["n"] and len(cm) == len(saved["label_names"])
    assert sum(saved["calibration"]["kjv"]["count"]) == result["domains"]["kjv"]["n"]
    for png in ("eval/val-confusion.png", "eval/val-reliability.png", "curves.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_draws_curves(tiny_run):
    assert (tiny_run / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_group_leak_is_counted(tiny_run, tmp_path):
    import numpy as np

    from llmcli.data.dataset import ProcessedData
    from llmcli.evaluate import _group_leaks

    src = ProcessedData(json.loads((tiny_run / "meta.json").read_text())["data"])
    assert _group_leaks(src, "test") == 0
    copy = tmp_path / "data"
    shutil.copytree(src.path, copy)
    groups = np.load(copy / "groups.npy")
    test_idx, train_idx = src.indices("test"), src.indices("train")
    groups[test_idx[0]] = groups[train_idx[0]]  # one test record now shares a chapter with training
    np.save(copy / "groups.npy", groups)
    assert _group_leaks(ProcessedData(copy), "test") == 1


def test_eval_cli_prints_warnings_and_rejects_a_bad_split(tiny_run, tmp_path):
    from typer.testing import CliRunner

    from llmcli.cli import app

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    out = CliRunner().invoke(app, ["eval", str(run)])
    assert out.exit_code == 0 and "macro_recall" in out.stdout and "ece" in out.stdout
    saved = json.loads((run / "eval" / "test.json").read_text())
    assert all(f"warning: {run}: {w}" in out.stderr for w in saved["warnings"])
    bad = CliRunner().invoke(app, ["eval", str(run), "--split", "train"])
    assert bad.exit_code == 2 and bad.stderr.strip() == "error: --split: 'train' is not a split (allowed: val, test)"


def _other_config(tmp_path, processed_dir, **source):
    from .conftest import TINY

    cfg = yaml.safe_load(TINY.read_text())
    cfg["data"]["source"].update(source)
    cfg["data"]["processed_dir"] = str(processed_dir)
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_eval_on_another_data_config_scores_through_the_runs_tokenizer(tiny_run, tmp_path, processed_dir):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    own = evaluate(run, plots=False, **QUIET)
    other = _other_config(tmp_path, processed_dir, versions=["web", "kjv"])
    res = evaluate(run, data_config=other, plots=False, **QUIET)
    # the same chapters of the same versions through the same tokenizer: the same scores
    assert set(res["domains"]) == {"web", "kjv"} and res["in_domain"] == ["kjv"]
    for d in ("web", "kjv"):
        assert res["domains"][d] == pytest.approx(own["domains"][d])
    assert res["gap"]["web"]["gap_acc"] == pytest.approx(own["gap"]["web"]["gap_acc"])
    assert (run / "eval" / "test-other.json").is_file() and res["data"] == str(other)
    assert not any("leak" in w for w in res["warnings"])


def test_eval_on_another_split_seed_warns_that_the_run_trained_on_those_chapters(tiny_run, tmp_path, processed_dir):
    other = _other_config(tmp_path, processed_dir, versions=["kjv"])
    cfg = yaml.safe_load(other.read_text())
    cfg["data"]["split"]["seed"] = 1  # other chapters held out: many were in the run's training split
    other.write_text(yaml.safe_dump(cfg))
    res = evaluate(shutil.copytree(tiny_run, tmp_path / "run"), data_config=other, plots=False,
                   **QUIET)
    assert any("of the test split also appear in the run's train split (leak)" in w for w in res["warnings"])


def test_eval_on_a_config_with_another_label_set_is_a_clear_error(tiny_run, tmp_path, processed_dir):
    from typer.testing import CliRunner

    from llmcli.cli import app

    other = _other_config(tmp_path, processed_dir, label="testament")
    out = CliRunner().invoke(app, ["eval", str(tiny_run), "--data", str(other)])
    assert out.exit_code == 2 and len(out.stderr.strip().splitlines()) == 1
    assert f"error: {other}: data.source gives labels" in out.stderr and "--data needs the same label set" in out.stderr


def test_eval_of_several_runs_prints_one_comparison_table(tiny_run, tmp_path):
    from typer.testing import CliRunner

    from llmcli.cli import app
    from llmcli.evaluate import _side

    a, b = tmp_path / "run-a", tmp_path / "run-b"
    shutil.copytree(tiny_run, a)
    shutil.copytree(tiny_run, b)
    out = CliRunner().invoke(app, ["eval", str(a), str(b)])
    assert out.exit_code == 0, out.output
    assert "2 runs" in out.stdout and "run-a" in out.stdout and "run-b" in out.stdout and "ood acc" in out.stdout
    res = json.loads((a / "eval" / "test.json").read_text())
    ood = _side(res, res["out_of_domain"])
    assert ood[0] == pytest.approx((res["domains"]["web"]["acc"] + res["domains"]["wyc"]["acc"]) / 2)


def test_classify_texts_gives_top3_labels_independent_of_batch_padding(tiny_run, tmp_path):
    from llmcli.classify import classify, read_texts

    short, long = "And God said", "In the beginning God created the heaven and the earth " * 10
    both = classify(tiny_run, [short, long])
    alone = classify(tiny_run, [short])[0]
    assert both[0]["label"] == alone["label"]
    assert [p for _, p in both[0]["top"]] == pytest.approx([p for _, p in alone["top"]], abs=1e-5)
    for r in both:
        probs = [p for _, p in r["top"]]
        assert len(r["top"]) == 3 and r["label"] == r["top"][0][0] and probs == sorted(probs, reverse=True)
    f = tmp_path / "t.txt"
    f.write_text(f"{short}\n\n{long}\n")
    assert read_texts(f) == [short, long]
    f.write_text("")
    with pytest.raises(UserError, match="texts file is empty"):
        read_texts(f)
