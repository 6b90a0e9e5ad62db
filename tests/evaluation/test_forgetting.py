"""Forgetting, measured (llmcli/evaluation/forgetting.py): eval scores a pretrained run's base model beside it.

Tiny random GPT-2 / Llama / BERT of tests/hf_models.py; every test points LLMCLI_CACHE at its own folder, so the
base-model cache starts empty.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")

import llmcli.evaluation.forgetting as forgetting  # noqa: E402
from llmcli.evaluation.evaluate import evaluate, render_comparison, render_table, score_run  # noqa: E402
from llmcli.training.engine import train  # noqa: E402
from tests.hf_models import BUILDERS  # noqa: E402

QUIET = {"progress": False, "log": lambda m: None}
EVAL = {"write": False, "plots": False, "log": lambda m: None}
FAST = ("train.eval_every=4", "train.log_every=4", "train.val_max_examples=8", "eval.max_examples=24",
        "eval.batch_size=8")


CACHE_FOLDER = forgetting.cache_root_base_lm  # the real one (tests/conftest.py points it at a temp folder)


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch) -> Path:
    """An empty base-model cache per test: what $LLMCLI_CACHE/base_lm is for a fresh LLMCLI_CACHE."""
    monkeypatch.setenv("LLMCLI_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(forgetting, "cache_root_base_lm", CACHE_FOLDER)
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("forgetting-models")
    return {name: BUILDERS[name](root / name) for name in ("gpt2", "bert", "bert_bare")}


def sets(folders, name: str, *more: str) -> list[str]:
    kind = "hf_encoder" if name.startswith("bert") else "hf_causal"
    return [f"model={{name: {kind}, path: '{folders[name]}'}}", "data.tokenizer={name: pretrained}", *FAST, *more]


@pytest.fixture(scope="module")
def runs(tiny, folders, tmp_path_factory) -> dict[str, Path]:
    """Finished tiny runs (read-only): frozen GPT-2 / BERT, GPT-2 trained on the LM only, a bare BERT."""
    out = tmp_path_factory.mktemp("forgetting-runs")
    frozen = ("train.steps=2", "train.freeze=[backbone]")
    made = {f"frozen-{n}": train(tiny(*sets(folders, n, *frozen)), runs_dir=out / n, **QUIET)
            for n in ("gpt2", "bert")}
    made["lm-gpt2"] = train(tiny(*sets(folders, "gpt2", "train.steps=12", "objective.alpha=1.0")),
                            runs_dir=out / "lm", **QUIET)
    # the bare BERT's tokenizer is the same WordPiece as the one with a head: named by that folder, its processed
    # data is the frozen BERT run's (one preprocess less)
    made["bare"] = train(tiny(*sets(folders, "bert_bare", "train.steps=2", "eval.base_head_steps=40",
                                    "eval.base_head_lr=0.01", f"data.tokenizer.path='{folders['bert']}'")),
                         runs_dir=out / "bare", **QUIET)
    return made


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_a_frozen_run_has_ratio_one_on_every_domain(runs, name):
    result = evaluate(runs[f"frozen-{name}"], **EVAL)
    f = result["forgetting"]
    assert f["before"] == "zero-shot" and set(f["domains"]) == set(result["domains"]) == {"kjv", "web", "wyc"}
    for d, row in f["domains"].items():
        assert row["ppl_after"] == result["domains"][d]["ppl"]
        assert row["ppl_ratio"] == pytest.approx(1.0, abs=1e-6) and row["bpb_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert f["mean"]["in_domain"]["ppl_ratio"] == pytest.approx(1.0, abs=1e-6)


def test_a_run_trained_on_the_lm_lowers_ppl_below_the_base_on_its_train_domain(runs):
    f = evaluate(runs["lm-gpt2"], **EVAL)["forgetting"]
    kjv = f["domains"]["kjv"]
    assert kjv["ppl_after"] < 0.9 * kjv["ppl_before"] and kjv["ppl_ratio"] < 0.9
    assert f["mean"]["in_domain"]["ppl_ratio"] == pytest.approx(kjv["ppl_ratio"])


@pytest.mark.parametrize("name", ["frozen-gpt2", "lm-gpt2"])
def test_the_before_figures_are_metrics_score_of_the_freshly_loaded_base(runs, folders, name):
    from llmcli.config import HFCausalConfig
    from llmcli.data.dataset import ProcessedData
    from llmcli.data.preprocess import preprocess
    from llmcli.evaluation.evaluate import eval_task_loss, scored_indices
    from llmcli.evaluation.metrics import score
    from llmcli.models.load import load_trained
    from llmcli.models.model import build_model

    result = evaluate(runs[name], **EVAL)
    t = load_trained(runs[name])
    data = ProcessedData(preprocess(t.cfg.data, log=lambda m: None))
    base = build_model(HFCausalConfig(path=str(t.cfg.model.path)), vocab_size=t.manifest["vocab_size"],
                       n_classes=len(data.label_names), max_len=t.cfg.data.max_len)
    for d, row in result["forgetting"]["domains"].items():
        m = score(base, data, scored_indices(t.cfg, data, "test")[d], 8, eval_task_loss(t.cfg, data))
        assert (row["lm_loss_before"], row["ppl_before"], row["bpb_before"]) == (m["lm_loss"], m["ppl"], m["bpb"])


def test_the_base_figures_read_the_runs_frozen_prefix_cache_where_the_run_has_one(runs):
    from llmcli.data.dataset import ProcessedData
    from llmcli.data.preprocess import preprocess
    from llmcli.models.load import load_trained
    from llmcli.models.prefix_cache import for_eval

    quiet = lambda m: None  # noqa: E731
    frozen, lm = load_trained(runs["frozen-gpt2"]), load_trained(runs["lm-gpt2"])
    data = ProcessedData(preprocess(frozen.cfg.data, log=quiet))
    run_cache = for_eval(frozen, data, quiet)
    base_cache = forgetting.base_prefix(forgetting.build_base(frozen), frozen, data, quiet)
    assert run_cache is not None and base_cache is not None and base_cache.root == run_cache.root  # the same states
    assert forgetting.base_prefix(forgetting.build_base(lm), lm, data, quiet) is None  # nothing frozen: all runs


def test_the_base_figures_are_cached_and_reused_and_a_changed_key_recomputes(runs, monkeypatch, own_cache):
    calls = []
    real = forgetting.base_figures
    monkeypatch.setattr(forgetting, "base_figures", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = evaluate(runs["frozen-gpt2"], **EVAL)["forgetting"]
    assert calls == [1] and first["cache"]["hit"] is False
    files = list((own_cache / "base_lm").glob("*.json"))
    assert [Path(first["cache"]["file"])] == files
    again = evaluate(runs["frozen-gpt2"], **EVAL)["forgetting"]  # a second eval on the same base: no recompute
    assert calls == [1] and again["cache"]["hit"] is True and again["domains"] == first["domains"]
    val = evaluate(runs["frozen-gpt2"], split="val", **EVAL)["forgetting"]  # another split: another key
    assert calls == [1, 1] and val["cache"]["file"] != first["cache"]["file"]
    lm = evaluate(runs["lm-gpt2"], **EVAL)["forgetting"]  # another run, the same base and records: reused
    assert calls == [1, 1] and lm["cache"]["hit"] and [r["ppl_before"] for r in lm["domains"].values()] == \
        [r["ppl_before"] for r in first["domains"].values()]


def test_a_damaged_or_foreign_cache_file_is_recomputed_never_trusted(runs, monkeypatch):
    first = evaluate(runs["frozen-gpt2"], **EVAL)["forgetting"]
    path = Path(first["cache"]["file"])
    stored = json.loads(path.read_text())
    logged, calls = [], []
    real = forgetting.base_figures
    monkeypatch.setattr(forgetting, "base_figures", lambda *a, **k: calls.append(1) or real(*a, **k))
    for damaged in ("{not json", json.dumps({**stored, "key": {**stored["key"], "base_sha256": "0" * 64}}),
                    json.dumps({**stored, "figures": {d: {**v, "ppl": "NaN"} for d, v in stored["figures"].items()}}),
                    json.dumps({**stored, "figures": {"kjv": stored["figures"]["kjv"]}})):
        path.write_text(damaged)
        calls.clear()
        got = evaluate(runs["frozen-gpt2"], write=False, plots=False, log=logged.append)["forgetting"]
        assert calls == [1] and got["cache"]["hit"] is False and got["domains"] == first["domains"]
        assert json.loads(path.read_text()) == stored  # rewritten whole
    assert sum("recomputing" in m for m in logged) == 4


def test_a_changed_base_model_file_is_not_served_from_the_cache(tiny, folders, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    base = tmp_path / "base"
    shutil.copytree(folders["gpt2"], base)
    # the tokenizer named by the original folder: the processed data of the module's GPT-2 runs is reused
    tokenizer = f"data.tokenizer={{name: pretrained, path: '{folders['gpt2']}'}}"
    cfg = tiny(f"model={{name: hf_causal, path: '{base}'}}", tokenizer, *FAST, "train.steps=2", "train.freeze=[backbone]")
    run = train(cfg, runs_dir=tmp_path / "runs", **QUIET)
    before = evaluate(run, **EVAL)["forgetting"]
    tensors = load_file(base / "model.safetensors")
    name = next(k for k in tensors if k.endswith("wpe.weight"))
    tensors[name] = tensors[name] * 3.0  # other positions: another model
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    after = evaluate(run, **EVAL)["forgetting"]
    assert after["cache"]["hit"] is False and after["cache"]["file"] != before["cache"]["file"]
    assert after["base_model"]["sha256"] != before["base_model"]["sha256"]
    assert after["domains"]["kjv"]["ppl_before"] != before["domains"]["kjv"]["ppl_before"]


def test_an_encoder_without_an_lm_head_has_its_head_fitted_first_and_says_so(runs, folders):
    from llmcli.data.dataset import ProcessedData
    from llmcli.data.preprocess import preprocess
    from llmcli.evaluation.evaluate import eval_task_loss, scored_indices
    from llmcli.evaluation.forgetting import build_base
    from llmcli.evaluation.metrics import score
    from llmcli.models.load import load_trained

    result = evaluate(runs["bare"], **EVAL)
    f = result["forgetting"]
    assert f["before"] == "fitted head" and f["lm"] == "masked"
    assert "ships no MLM head" in f["how"] and "40 steps" in f["how"]
    assert f["head_fit"]["steps"] == 40 and f["head_fit"]["domains"] == ["kjv"] and f["head_fit"]["records"] > 0
    assert f["head_fit"]["last_loss"] < f["head_fit"]["first_loss"]
    assert "ships no MLM head" in str(render_table(result).caption)
    t = load_trained(runs["bare"])
    data = ProcessedData(preprocess(t.cfg.data, log=lambda m: None))
    unfitted = build_base(t)  # the same base with its new head as initialised
    assert unfitted.backbone.fresh_head
    for d, row in f["domains"].items():
        m = score(unfitted, data, scored_indices(t.cfg, data, "test")[d], 8, eval_task_loss(t.cfg, data))
        assert row["ppl_before"] < m["ppl"]  # fitting the head made "before" a real masked-LM figure
    again = evaluate(runs["bare"], **EVAL)["forgetting"]  # deterministic; and the second one comes from the cache
    assert again["cache"]["hit"] and again["domains"] == f["domains"] and again["head_fit"] == f["head_fit"]


def test_an_encoder_run_that_never_trained_its_new_head_is_scored_after_the_same_head_fit(runs, tiny, folders,
                                                                                         tmp_path):
    # frozen encoder, alpha 0: the new MLM head is never trained, so the run's own LM figures are a random head's;
    # "after" fits it as "before" was, from the same start: the same encoder gives the same figures, ratio 1
    probe = train(tiny(*sets(folders, "bert_bare", "train.steps=2", "eval.base_head_steps=40", "eval.base_head_lr=0.01",
                             f"data.tokenizer.path='{folders['bert']}'", "objective.alpha=0",
                             "train.freeze=[backbone]")), runs_dir=tmp_path, **QUIET)
    result = evaluate(probe, **EVAL)
    f = result["forgetting"]
    assert f["before"] == f["after"] == "fitted head" and "the run never trained it" in f["how"]
    assert f["after_head_fit"] == {k: f["head_fit"][k] for k in ("first_loss", "last_loss")}
    for d, row in f["domains"].items():
        assert row["ppl_ratio"] == pytest.approx(1.0, abs=1e-6), d
        assert result["domains"][d]["ppl"] > row["ppl_after"]  # the run's own (random) head is worse
    trained = evaluate(runs["bare"], **EVAL)["forgetting"]  # alpha 0.5 trained its head: scored as it is
    assert trained["after"] == "as trained" and "after_head_fit" not in trained


def test_a_from_scratch_run_and_no_base_have_no_forgetting(tiny_run, runs):
    assert "forgetting" not in evaluate(tiny_run, **EVAL)
    assert "forgetting" not in score_run(runs["frozen-gpt2"], base=False, log=lambda m: None)


def test_the_tables_show_ppl_before_and_the_ratio(runs, tiny_run):
    from rich.console import Console

    frozen, lm = (evaluate(runs[n], **EVAL) for n in ("frozen-gpt2", "lm-gpt2"))
    console = Console(width=400, record=True)
    console.print(render_table(lm))
    text = console.export_text()
    assert "ppl before" in text and "ppl ratio" in text and "zero-shot" in text
    kjv = next(line for line in text.splitlines() if line.lstrip("│ ").startswith("kjv (in-domain)"))
    assert f"{lm['forgetting']['domains']['kjv']['ppl_ratio']:.4f}" in kjv
    console.print(render_comparison([frozen, lm, evaluate(tiny_run, **EVAL)]))
    text = console.export_text()
    assert "in ppl ratio" in text and "ood ppl ratio" in text
    row = next(line for line in text.splitlines() if Path(lm["run"]).name in line and "ppl" not in line)
    assert f"{lm['forgetting']['mean']['out_of_domain']['ppl_ratio']:.4f}" in row


def test_the_eval_cli_prints_forgetting_and_skips_it_with_no_base(runs):
    from typer.testing import CliRunner

    from llmcli.cli import app

    run = str(runs["frozen-gpt2"])
    res = CliRunner().invoke(app, ["eval", run, "--no-write"], env={"COLUMNS": "400"})
    assert res.exit_code == 0, res.output
    assert "ppl before" in res.stdout and "ppl ratio" in res.stdout and "1.0000" in res.stdout
    res = CliRunner().invoke(app, ["eval", run, "--no-write", "--no-base"], env={"COLUMNS": "400"})
    assert res.exit_code == 0, res.output
    assert "ppl ratio" not in res.stdout and "ppl before" not in res.stdout and "kjv (in-domain)" in res.stdout
    res = CliRunner().invoke(app, ["eval", run, "--no-base", "--text", "In the beginning"])
    assert res.exit_code == 2 and "--no-base" in res.output and "--text" in res.output and "Traceback" not in res.output


def test_the_sweep_report_carries_the_ppl_ratio_where_the_points_have_it(tmp_path):
    import csv

    import matplotlib.pyplot as plt

    from llmcli.experiments.sweep_report import aggregate, pareto_figure, write_results
    from tests.experiments.test_sweep import DISAGREE, STATE

    with_ratio = [dict(r, ppl_ratio_in=r["ppl_in"] / 150.0, ppl_ratio_ood=1.1, ppl_before_in=150.0,
                       ppl_before_ood=180.0) for r in DISAGREE]
    write_results(tmp_path, STATE, with_ratio)
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [float(r["ppl_ratio_in"]) for r in rows] == pytest.approx([100 / 150, 200 / 150, 300 / 150], rel=1e-5)
    summary = (tmp_path / "summary.md").read_text()
    assert "ppl ratio in" in summary and "| 0.5 | 1 |" in summary and "1.333" in summary
    fig = pareto_figure("t", STATE, aggregate(with_ratio), None)
    assert [line.get_xdata()[0] for line in fig.axes[0].lines if line.get_label() == "base model (before)"] == [150.0]
    plt.close(fig)
    write_results(tmp_path, STATE, [dict(r) for r in DISAGREE])  # from-scratch points: no ratio column
    assert "ppl ratio" not in (tmp_path / "summary.md").read_text()
