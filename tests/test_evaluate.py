"""`eval`: per-domain metrics, the gap, and the JSON it writes."""

from __future__ import annotations

import json
import math
import shutil

import pytest

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
