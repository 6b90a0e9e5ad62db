"""`llmcli reproduce`: passes on a fresh run, fails naming the first differing record on an edited one."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from llmcli.cli import app
from llmcli.experiments.reproduce import compare, reproduce

runner = CliRunner()


def test_a_fresh_run_reproduces_exactly(tiny_run):
    out = runner.invoke(app, ["reproduce", str(tiny_run)])
    assert out.exit_code == 0, out.output
    assert "OK, 12 records over 20 steps identical" in out.stdout  # 4 train + 2 evals x (3 domains + in_domain)


def edit_line(run, lineno: int, key: str, delta: float) -> None:
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines()
    rec = json.loads(lines[lineno - 1])
    rec[key] += delta
    lines[lineno - 1] = json.dumps(rec)
    path.write_text("\n".join(lines) + "\n")


def test_an_edited_metrics_file_fails_naming_the_first_differing_record(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    first_val = next(i for i, ln in enumerate(lines, 1) if '"split": "val"' in ln and '"kjv"' in ln)
    edit_line(run, first_val, "acc", 0.01)
    edit_line(run, len(lines) - 1, "lm_loss", 1.0)  # a later difference must not be the one reported
    out = runner.invoke(app, ["reproduce", str(run)])
    assert out.exit_code == 1
    assert f"metrics.jsonl:{first_val} (step 10, split val, domain kjv): acc: recorded" in out.stdout


def test_atol_tolerates_small_differences_only(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    edit_line(run, 1, "lm_loss", 1e-9)
    assert not reproduce(run, steps=5, log=lambda m: None).ok
    assert reproduce(run, steps=5, atol=1e-6, log=lambda m: None).ok
    assert runner.invoke(app, ["reproduce", str(run), "--steps", "5", "--atol", "1e-6"]).exit_code == 0


def test_first_k_steps_compare_only_those_records(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    edit_line(run, len(lines), "objective", 0.5)  # the step-20 record: outside the first 10 steps
    result = reproduce(run, steps=10, log=lambda m: None)
    assert result.ok and result.steps == 10 and result.n_records == 6


def test_missing_and_extra_records_are_differences():
    recorded = [(1, {"step": 5, "split": "train", "lm_loss": 1.0})]
    assert "re-run has no such record" in compare(recorded, [], 0.0)
    assert "missing from" in compare([], [{"step": 5, "split": "train"}], 0.0)
    assert compare(recorded, [{"step": 5, "split": "train", "lm_loss": 1.0, "tokens_per_s": 9.0}], 0.0) is None
    assert "lm_loss: recorded 1.0, re-run nan" in compare(recorded, [{"step": 5, "split": "train",
                                                                      "lm_loss": float("nan")}], 0.0)


@pytest.mark.parametrize("args", [["--steps", "0"], ["--steps", "21"], ["--atol", "-1"]])
def test_bad_arguments_exit_2(tiny_run, args):
    out = runner.invoke(app, ["reproduce", str(tiny_run), *args])
    assert out.exit_code == 2 and len(out.stderr.strip().splitlines()) == 1


def test_a_partial_reproduce_does_not_advise_resuming_its_deleted_folder(tiny_run):
    out = runner.invoke(app, ["reproduce", str(tiny_run), "--steps", "5"])
    assert out.exit_code == 0, out.output
    assert "--resume" not in out.stderr, out.stderr  # training's own advice: that folder is deleted
    assert "temporary folder (deleted after)" in out.stderr


@pytest.mark.parametrize("atol", ["nan", "inf"])
def test_a_non_finite_atol_exits_2(tiny_run, atol):
    out = runner.invoke(app, ["reproduce", str(tiny_run), "--atol", atol])
    assert out.exit_code == 2 and "--atol: must be a finite number >= 0" in out.stderr
