"""`eval`: per-domain metrics, the gap, and the JSON it writes."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import yaml

from llmcli.errors import UserError
from llmcli.evaluation.evaluate import evaluate
from llmcli.evaluation.metrics import gaps
from tests.conftest import read_only_tree, refuse_writes_under

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

    from llmcli.evaluation.metrics import classification_metrics

    # confidences .9 (right), .6 (wrong), .8 (right): ECE = (.1 + .6 + .2) / 3 = .3
    probs = np.array([[0.9, 0.1, 0.0], [0.6, 0.4, 0.0], [0.2, 0.8, 0.0]], dtype=np.float32)
    m = classification_metrics(probs, np.array([0, 1, 1]))
    assert m["acc"] == pytest.approx(2 / 3) and m["ece"] == pytest.approx(0.3, abs=1e-6)
    # recall: class 0 = 1/1, class 1 = 1/2; class 2 never occurs and is not averaged
    assert m["macro_recall"] == pytest.approx(0.75)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3) / 2)


def test_reliability_bins_hold_confidence_accuracy_and_count():
    import numpy as np

    from llmcli.evaluation.metrics import reliability_bins

    probs = np.array([[0.95, 0.05], [0.97, 0.03], [0.5, 0.5], [0.3, 0.7]])
    b = reliability_bins(probs, np.array([0, 1, 0, 1]), n_bins=10)
    assert b["count"] == [0, 0, 0, 0, 1, 0, 1, 0, 0, 2]
    assert b["confidence"][9] == pytest.approx(0.96) and b["accuracy"][9] == pytest.approx(0.5)
    assert b["accuracy"][6] == 1.0 and sum(b["count"]) == 4


def test_sanity_warnings_name_each_problem():
    import numpy as np

    from llmcli.evaluation.evaluate import sanity_warnings

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
    from llmcli.evaluation.evaluate import _group_leaks

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
    from tests.conftest import TINY

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
    from llmcli.evaluation.evaluate import _side

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
    from llmcli.evaluation.classify import classify, read_texts

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


def _snapshot(root):
    """Every path under root with its size, modification time and (for files) sha256."""
    import hashlib

    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns,
                                       hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(root.rglob("*"))}


def test_eval_no_write_prints_the_scores_and_changes_no_file(tiny_run, tmp_path):
    from typer.testing import CliRunner

    from llmcli.cli import app

    run = shutil.copytree(tiny_run, tmp_path / "run")
    before = _snapshot(run)
    out = CliRunner().invoke(app, ["eval", str(run), "--no-write"])
    assert out.exit_code == 0, out.output
    assert "kjv (in-domain)" in out.stdout and "macro_recall" in out.stdout
    assert _snapshot(run) == before  # no eval/, no eval/test.json, no PNG, curves.png untouched
    assert f"eval: {run}: nothing written (--no-write)" in out.stderr


@pytest.mark.parametrize("has_eval_dir", [False, True])
def test_eval_of_a_run_folder_that_cannot_be_written(tiny_run, tmp_path, monkeypatch, has_eval_dir):
    from typer.testing import CliRunner

    from llmcli.cli import app

    run = shutil.copytree(tiny_run, tmp_path / "run")
    if has_eval_dir:
        (run / "eval").mkdir()
    refuse_writes_under(monkeypatch, run)
    out = CliRunner().invoke(app, ["eval", str(run)])
    lines = out.stderr.strip().splitlines()
    assert out.exit_code == 2 and "Traceback" not in out.output
    assert lines[-1].startswith(f"error: {run / 'eval'}") and "Permission denied" in lines[-1]
    assert lines[-1].endswith("`llmcli eval --no-write` prints the scores without writing")
    ok = CliRunner().invoke(app, ["eval", str(run), "--no-write"])
    assert ok.exit_code == 0 and "kjv (in-domain)" in ok.stdout


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions, so chmod cannot make the run read-only")
def test_eval_no_write_scores_a_read_only_run_folder(tiny_run, tmp_path):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    with read_only_tree(run):
        result = evaluate(run, write=False, **QUIET)
    assert result["in_domain"] == ["kjv"] and not (run / "eval").exists()


def test_eval_names_the_files_it_wrote(tiny_run, tmp_path):
    from typer.testing import CliRunner

    from llmcli.cli import app

    run = shutil.copytree(tiny_run, tmp_path / "run")
    out = CliRunner().invoke(app, ["eval", str(run), "--split", "val"])
    assert out.exit_code == 0, out.output
    (line,) = [x for x in out.stderr.splitlines() if x.startswith("eval: wrote ")]
    named = line.removeprefix("eval: wrote ").split(", ")
    assert named == [str(run / "eval" / "val.json"), str(run / "eval" / "val-confusion.png"),
                     str(run / "eval" / "val-reliability.png"), str(run / "curves.png")]
    assert all(os.path.isfile(p) for p in named) and "*" not in line


def test_classifying_with_several_runs_names_the_run_on_each_line(tiny_run, tmp_path):
    from typer.testing import CliRunner

    from llmcli.cli import app

    a, b = shutil.copytree(tiny_run, tmp_path / "a"), shutil.copytree(tiny_run, tmp_path / "b")
    out = CliRunner().invoke(app, ["eval", str(a), str(b), "--text", "And God said", "--text", "Paul an apostle"])
    assert out.exit_code == 0, out.output
    lines = out.stdout.strip().splitlines()
    assert [x.split("\t")[0] for x in lines] == [str(a), str(a), str(b), str(b)]
    assert [x.split("\t")[-1] for x in lines] == ["And God said", "Paul an apostle"] * 2
    one = CliRunner().invoke(app, ["eval", str(a), "--text", "And God said"])
    assert one.stdout.strip() == lines[0].removeprefix(f"{a}\t")  # one run: the line as before, no prefix


def test_the_eval_table_says_what_the_gap_is_and_which_sign_is_worse_per_metric(tiny_run, tmp_path):
    from rich.console import Console

    from llmcli.evaluation.evaluate import TABLE_COLS, render_comparison, render_table

    res = evaluate(shutil.copytree(tiny_run, tmp_path / "run"), **QUIET)
    console = Console(width=250, record=True)
    console.print(render_table(res))
    text = console.export_text()
    assert "gap = in-domain − OOD" in " ".join(text.split())
    rows = {ln.split("│")[1].strip(): [x.strip() for x in ln.split("│")[2:-1]] for ln in text.splitlines() if "│" in ln}
    worse = dict(zip((*TABLE_COLS, "gap_acc"), rows["OOD is worse if"]))
    assert worse["acc"] == worse["macro_f1"] == worse["gap_acc"] == "> 0"  # higher is better: OOD lower = gap > 0
    assert worse["ppl"] == worse["lm_loss"] == worse["ece"] == "< 0"  # lower is better: OOD higher = gap < 0
    assert rows["mean OOD gap (in − OOD)"][TABLE_COLS.index("acc")] == f"{res['gap']['mean']['gap_acc']:.4f}"
    console.print(render_comparison([res, res]))
    assert "gap_acc = in-domain − OOD acc (mean over OOD domains): > 0 means OOD is worse" in \
        " ".join(console.export_text().split())


def test_curves_name_the_run_the_in_domain_domain_and_every_axis(tiny_run):
    from llmcli.evaluation.plots import curves_figure

    fig = curves_figure(tiny_run)
    assert [ax.get_ylabel() for ax in fig.axes] == ["L (nats / token)", "T (task loss per example)", "cosine(∇L, ∇T)"]
    assert all(ax.get_xlabel() == "step" for ax in fig.axes)
    title = fig.get_suptitle()
    assert tiny_run.name in title and "in-domain: kjv" in title
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["train", "val kjv (in-domain)", "val web (OOD)", "val wyc (OOD)"]


def test_confusion_matrices_have_readable_text(tiny_run, tmp_path):
    from llmcli.evaluation.plots import confusion_figure

    res = evaluate(shutil.copytree(tiny_run, tmp_path / "run"), write=False, **QUIET)
    fig = confusion_figure(res)
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 3
    for ax in panels:
        assert min(t.get_fontsize() for t in ax.texts) >= 8  # the counts in the cells
        assert min(t.get_fontsize() for t in ax.get_xticklabels()) >= 8
    # the class names are printed once, left of the row (the panels share the y axis)
    assert [any(t.get_visible() and t.get_text() for t in ax.get_yticklabels()) for ax in panels] == [True, False, False]
    saved = fig.get_tightbbox()  # the PNG is cropped to it (inches)
    area = sum(ax.get_window_extent().width * ax.get_window_extent().height for ax in panels) / fig.dpi ** 2
    assert area / (saved.width * saved.height) > 0.5  # the matrices fill the picture (0.43 before: wide margins)


def test_reliability_markers_are_sized_by_count_and_sparse_bins_are_not_joined():
    import numpy as np

    from llmcli.evaluation.plots import MIN_BIN, reliability_figure

    counts = [0, 0, 40, 100, 2, 60, 1, 0, 0, 0]  # bins 4 and 6: too few examples to draw a trend through
    conf = [0.0, 0.0, 0.25, 0.35, 0.45, 0.55, 0.65, 0.0, 0.0, 0.0]
    acc = [0.0, 0.0, 0.2, 0.4, 1.0, 0.5, 0.0, 0.0, 0.0, 0.0]
    res = {"split": "test", "run": "runs/r", "in_domain": ["kjv"], "domains": {"kjv": {"ece": 0.1}},
           "calibration": {"kjv": {"confidence": conf, "accuracy": acc, "count": counts}}}
    fig = reliability_figure(res)
    ax = fig.axes[0]
    line = [ln for ln in ax.get_lines() if ln.get_label().startswith("kjv")][0]
    y = np.asarray(line.get_ydata(), dtype=float)
    assert list(line.get_xdata()) == [0.25, 0.35, 0.45, 0.55, 0.65]  # the non-empty bins
    assert np.isnan(y[[2, 4]]).all() and list(y[[0, 1, 3]]) == [0.2, 0.4, 0.5]  # broken at the sparse bins
    dense, sparse = ax.collections
    assert list(dense.get_offsets()[:, 0]) == [0.25, 0.35, 0.55] and list(sparse.get_offsets()[:, 0]) == [0.45, 0.65]
    sizes = dense.get_sizes()
    assert sizes[1] > sizes[2] > sizes[0]  # marker area grows with the bin's examples (100 > 60 > 40)
    assert all(c < MIN_BIN for c in (2, 1)) and "kjv (in-domain)" in line.get_label()


def test_a_model_hook_runs_on_the_loaded_model_and_the_result_goes_to_the_named_file(tiny_run, tmp_path):
    import torch

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    plain = evaluate(run, write=False, **QUIET)

    def uniform_classifier(model):  # all-zero class logits: the task loss of a uniform guess, ln(C)
        torch.nn.init.zeros_(model.cls_head.weight)
        torch.nn.init.zeros_(model.cls_head.bias)
        return {"cls_head": "zeroed"}

    result = evaluate(run, prepare=uniform_classifier, stem="test-uniform", plots=False, **QUIET)
    n_classes = len(result["label_names"])
    assert all(m["task_loss"] == pytest.approx(math.log(n_classes), rel=1e-5) for m in result["domains"].values())
    assert result["domains"]["kjv"]["lm_loss"] == plain["domains"]["kjv"]["lm_loss"]  # the LM side untouched
    assert result["condition"] == {"cls_head": "zeroed"} and "condition" not in plain
    assert json.loads((run / "eval" / "test-uniform.json").read_text()) == json.loads(json.dumps(result))
    assert not (run / "eval" / "test.json").exists()


def test_the_eval_cap_draws_across_the_split_the_same_records_for_every_run(tiny_run):
    # a split is in corpus order (Law first): a cap must not keep its first records, and it must not depend on
    # the run's seed, so runs of different seeds are scored on the same records
    from llmcli.data.dataset import ProcessedData
    from llmcli.data.preprocess import preprocess
    from llmcli.evaluation.evaluate import scored_indices
    from llmcli.models.load import load_trained

    cfg = load_trained(tiny_run).cfg
    data = ProcessedData(preprocess(cfg.data, log=lambda m: None))
    whole = data.indices("test", ["kjv"])
    cap = len(whole) // 3
    capped = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"max_examples": cap})})
    other_seed = capped.model_copy(update={"seed": cfg.seed + 1})
    idx = scored_indices(capped, data, "test")["kjv"]
    assert len(idx) == cap and set(idx) <= set(whole) and list(idx) == sorted(idx)
    assert idx.max() > whole[cap - 1]  # not the first `cap` records
    assert len(set(data.labels[idx])) > len(set(data.labels[whole[:cap]]))  # more genres than a prefix holds
    assert list(scored_indices(other_seed, data, "test")["kjv"]) == list(idx)
