"""The protocol: --test-domains, model selection (train-domain val, oracle, leave-one-domain-out), the LOO table."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from llmcli.cli import app
from llmcli.errors import UserError
from llmcli.evaluation.evaluate import evaluate
from llmcli.experiments.lodo_selection import train_and_select
from llmcli.experiments.loo_table import hold_out, leave_one_out, read_table
from llmcli.training.engine import train

QUIET = {"progress": False, "log": lambda m: None}


def records(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_hold_out_puts_a_domain_in_the_test_split_only(tiny):
    cfg = hold_out(tiny(), ["wyc"])
    assert cfg.data.split.holdout_domains == ["wyc"] and cfg.data.train_domains == ["kjv"]
    with pytest.raises(UserError, match=r"--test-domains: \['kjv'\] are also in data.train_domains"):
        hold_out(tiny(), ["kjv"])
    with pytest.raises(UserError, match=r"--test-domains: \['nope'\] not in the data"):
        hold_out(tiny(), ["nope"])


def test_cli_bad_protocol_input_is_one_line_and_exit_2(processed_dir):
    from tests.conftest import TINY

    runner = CliRunner()
    base = ["train", str(TINY), "--set", f"data.processed_dir={processed_dir}"]
    cases = [
        (base + ["--test-domains", "kjv"], "--test-domains"),
        (base + ["--set", "data.train_domains=[kjv]", "--set", "dg.name=group_dro"], "dg.name"),
        (base + ["--set", "data.train_domains=[kjv,xyz]", "--no-progress"], "data.train_domains"),
        (base + ["--loo", "--methods", "erm,nope"], "--methods"),
        (base + ["--methods", "erm"], "--methods"),
        (["sweep-alpha", str(TINY), "--test-domains", "kjv"], "--test-domains"),
    ]
    for args, field in cases:
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        err = [x for x in res.stderr.splitlines() if x.startswith("error:")]  # progress lines may come first
        assert len(err) == 1 and field in err[0] and "Traceback" not in res.stderr, (args, res.stderr)


def test_a_held_out_domain_is_reported_separately_and_never_validated_on(tiny, tmp_path):
    run = train(hold_out(tiny("data.train_domains=[kjv,web]", "train.steps=10"), ["wyc"]), runs_dir=tmp_path, **QUIET)
    assert not [r for r in records(run) if r.get("domain") == "wyc"]  # held out: no validation records at all
    res = evaluate(run, log=lambda m: None)
    assert res["in_domain"] == ["kjv", "web"] and res["held_out"] == ["wyc"] and res["out_of_domain"] == ["wyc"]
    assert res["select_by"] == "train_domain_val" and res["upper_bound"] is False
    assert set(res["gap"]) == {"wyc", "mean"}


def test_oracle_selection_scores_the_held_out_domain_and_is_marked_an_upper_bound(tiny, tmp_path):
    cfg = hold_out(tiny("train.steps=10", "train.eval_every=5", "train.select_by=oracle"), ["wyc"])
    run = train(cfg, runs_dir=tmp_path, **QUIET)
    recs = records(run)
    sel = [r for r in recs if r.get("domain") == "in_domain"]
    wyc = {r["step"]: r for r in recs if r.get("domain") == "wyc"}  # the oracle peeks at the test domain
    assert set(wyc) == {5, 10} and all(r["select_by"] == "oracle" for r in sel)
    for r in sel:
        assert r["objective"] == pytest.approx(0.5 * wyc[r["step"]]["lm_loss"] + 0.5 * wyc[r["step"]]["task_loss"])
    res = evaluate(run, log=lambda m: None)
    assert res["select_by"] == "oracle" and res["upper_bound"] is True
    assert evaluate(run, checkpoint="last", log=lambda m: None)["upper_bound"] is False


def test_leave_one_domain_out_selection_picks_the_step_best_on_unseen_train_domains(tiny, tmp_path):
    cfg = tiny("data.train_domains=[kjv,web]", "train.steps=10", "train.eval_every=5",
               "train.select_by=leave_one_domain_out")
    run = train_and_select(cfg, runs_dir=tmp_path, **QUIET)
    means = {}
    for d in ("kjv", "web"):
        aux = run / "lodo" / d
        aux_cfg = json.loads(json.dumps(__import__("yaml").safe_load((aux / "config.yaml").read_text())))
        assert aux_cfg["train"]["exclude_domains"] == [d]
        for r in records(aux):
            if r.get("domain") == d and "lm_loss" in r:
                means.setdefault(r["step"], []).append(0.5 * r["lm_loss"] + 0.5 * r["task_loss"])
    chosen = min(means, key=lambda s: (sum(means[s]) / 2, s))
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    assert best["step"] == chosen and not list((run / "checkpoints").glob("step-*"))
    assert evaluate(run, log=lambda m: None)["select_by"] == "leave_one_domain_out"


def test_leave_one_domain_out_selection_needs_two_train_domains_before_training(tiny, tmp_path):
    with pytest.raises(UserError, match="train.select_by: 'leave_one_domain_out' needs at least two"):
        train_and_select(tiny("train.select_by=leave_one_domain_out"), runs_dir=tmp_path, **QUIET)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_the_engine_alone_keeps_step_checkpoints_for_a_selection_made_above_it(tiny, tmp_path):
    """The engine (llmcli.training.engine.train) knows no leave-one-domain-out: no auxiliary runs, no `best`,
    a checkpoint per eval step."""
    cfg = tiny("data.train_domains=[kjv,web]", "train.steps=10", "train.eval_every=5",
               "train.select_by=leave_one_domain_out")
    run = train(cfg, runs_dir=tmp_path, **QUIET)
    ckpt = run / "checkpoints"
    assert sorted(p.name for p in ckpt.glob("step-*.safetensors")) == ["step-10.safetensors", "step-5.safetensors"]
    assert not (ckpt / "best.safetensors").exists() and not (run / "lodo").exists()
    assert not [r for r in records(run) if r.get("best")]


def test_the_engine_does_not_import_the_selection_above_it():
    import ast
    from pathlib import Path

    import llmcli.training.engine

    tree = ast.parse(Path(llmcli.training.engine.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "llmcli.experiments.lodo_selection" not in imported and "llmcli.experiments.loo_table" not in imported


def test_leave_one_out_writes_the_method_by_held_out_domain_table(tiny, tmp_path):
    cfg = tiny("train.steps=6", "train.eval_every=6", "train.log_every=3")
    out = leave_one_out(cfg, ["erm", "coral"], out_dir=tmp_path / "loo", log=lambda m: None)
    rows = read_table(out)
    assert [r["method"] for r in rows] == ["erm", "coral"]
    assert list(rows[0]) == ["method", "kjv", "web", "wyc", "avg"]
    for r in rows:
        accs = [float(r[d]) for d in ("kjv", "web", "wyc")]
        assert float(r["avg"]) == pytest.approx(sum(accs) / 3, abs=1e-3)
    cell = json.loads((out / "erm" / "wyc" / "cell.json").read_text())
    res = json.loads((out / "erm" / "wyc" / "eval" / "test.json").read_text())
    assert res["held_out"] == ["wyc"] and sorted(res["in_domain"]) == ["kjv", "web"]
    assert cell["acc"] == pytest.approx(res["domains"]["wyc"]["acc"])
    md = (out / "loo.md").read_text()
    assert "| coral |" in md and "train_domain_val" in md
    before = (out / "erm" / "kjv" / "cell.json").stat().st_mtime_ns
    leave_one_out(cfg, ["erm", "coral"], out_dir=out, log=lambda m: None)  # a re-run keeps finished cells
    assert (out / "erm" / "kjv" / "cell.json").stat().st_mtime_ns == before


def test_the_eval_table_states_how_best_was_selected():
    from rich.console import Console

    from llmcli.evaluation.evaluate import render_table

    result = {"run": "r", "split": "test", "checkpoint": "best", "step": 5, "select_by": "oracle",
              "upper_bound": True, "in_domain": ["kjv"], "held_out": ["wyc"],
              "domains": {"kjv": {"acc": 0.5}, "wyc": {"acc": 0.4}}, "gap": {"wyc": {"gap_acc": 0.1}}}
    console = Console(width=200, record=True)
    console.print(render_table(result))
    text = " ".join(console.export_text().split())  # the title wraps to the table's width
    assert "selected by oracle - an upper bound, not a headline" in text and "wyc (held out)" in text


def test_an_interrupted_loo_table_resumes_its_cut_cell_from_the_checkpoint(tmp_path, processed_dir):
    import signal

    from tests.conftest import TINY, checkpoint_at
    from tests.experiments.test_sweep import _signal_self_when

    out = tmp_path / "loo"
    args = ["train", str(TINY), "--set", f"data.processed_dir={processed_dir}", "--set", "train.steps=15",
            "--set", "train.eval_every=15", "--set", "train.checkpoint_every=3", "--loo", "--methods", "erm",
            "--loo-dir", str(out), "--no-progress"]
    done = _signal_self_when(lambda: checkpoint_at(out, "erm/kjv/checkpoints/last.json", 3))
    try:
        res = CliRunner().invoke(app, args)
    finally:
        done.set()
    assert res.exit_code == 128 + signal.SIGINT, res.output
    assert f"continue with: llmcli train {TINY} --set" in res.stderr and f"--loo-dir {out}" in res.stderr
    cut = out / "erm" / "kjv"
    assert json.loads((cut / "meta.json").read_text())["status"] == "interrupted" and not (cut / "cell.json").exists()
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert json.loads((cut / "meta.json").read_text())["resumed_at_step"] >= 3  # continued, not retrained
    assert not list(out.glob("erm/*.attempt*")) and [r["method"] for r in read_table(out)] == ["erm"]


def test_loo_md_gives_the_gap_with_its_sign_explained(tiny, tmp_path):
    from llmcli.experiments.loo_table import write_table

    cells = {"erm": {"kjv": {"acc": 0.5, "acc_in": 0.6}, "wyc": {"acc": 0.3, "acc_in": 0.2}}}
    write_table(tmp_path, tiny(), ["erm"], ["kjv", "wyc"], cells)
    md = (tmp_path / "loo.md").read_text()
    assert "Accuracy gap, in-domain − held-out" in md and "| erm | +0.100 | -0.100 | +0.000 |" in md
    assert "A positive gap means the held-out domain is less accurate than the trained-on ones" in md
