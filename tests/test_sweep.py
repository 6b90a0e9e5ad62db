"""`sweep-alpha`: one run per alpha, results, plot, summary, resume."""

from __future__ import annotations

import csv
import json

import pytest

from llmcli.errors import UserError
from llmcli.sweep import pareto_mask, parse_alphas, sweep_alpha

QUIET = {"progress": False, "log": lambda m: None}


def rows(sweep_dir):
    with open(sweep_dir / "results.csv") as f:
        return list(csv.DictReader(f))


def test_sweep_writes_one_run_per_alpha_and_the_summary(tiny, tmp_path):
    sweep = sweep_alpha(tiny("train.steps=10", "train.eval_every=10"), [0.0, 0.5, 1.0], runs_dir=tmp_path, **QUIET)
    assert sweep.name.startswith("sweep-")
    table = rows(sweep)
    assert [float(r["alpha"]) for r in table] == [0.0, 0.5, 1.0]
    assert all(r["status"] == "completed" for r in table)
    for r in table:
        point = sweep / r["run"]
        assert (point / "eval" / "test.json").is_file()
        cfg_alpha = json.loads(json.dumps(__import__("yaml").safe_load((point / "config.yaml").read_text())))
        assert cfg_alpha["objective"]["alpha"] == float(r["alpha"])
        assert 0 <= float(r["acc_in"]) <= 1 and float(r["ppl_in"]) > 1
    assert (sweep / "pareto.png").stat().st_size > 1000
    summary = (sweep / "summary.md").read_text()
    assert "best α" in summary and "α=0.5" in summary


def test_resume_skips_finished_points(tiny, tmp_path):
    cfg = tiny("train.steps=10", "train.eval_every=10")
    sweep = sweep_alpha(cfg, [0.0, 1.0], runs_dir=tmp_path, **QUIET)
    done = sweep / "alpha-0" / "checkpoints" / "last.safetensors"
    stamp = done.stat().st_mtime_ns
    # the second point is lost (as if the sweep had been killed while running it)
    import shutil

    shutil.rmtree(sweep / "alpha-1" / "eval")
    said = []
    sweep_alpha(None, resume=sweep, progress=False, log=said.append)
    assert done.stat().st_mtime_ns == stamp
    assert any("alpha=0 already finished" in s for s in said)
    assert [r["status"] for r in rows(sweep)] == ["completed", "completed"]
    assert (sweep / "alpha-1.attempt1").is_dir()  # the unfinished attempt is kept aside, not deleted


@pytest.mark.parametrize("bad", ["", "0,,1", "0,x", "0,1.5", "-0.1", "0.5,0.5"])
def test_bad_alpha_grids(bad):
    with pytest.raises(UserError, match="--alphas"):
        parse_alphas(bad)


def test_parse_alphas():
    assert parse_alphas("0, 0.25,1") == [0.0, 0.25, 1.0]


def test_resume_of_a_folder_that_is_not_a_sweep(tmp_path):
    with pytest.raises(UserError, match="sweep"):
        sweep_alpha(None, resume=tmp_path, **QUIET)


def test_pareto_mask_keeps_the_non_dominated_points():
    assert pareto_mask([(1, 5), (2, 2), (3, 3), (5, 1)]) == [True, True, False, True]


def test_an_interrupted_point_resumes_exactly_where_it_stopped(tiny, tmp_path, monkeypatch):
    import os
    import signal

    from llmcli.errors import Interrupted
    from llmcli.models.model import TwoHeadModel
    from llmcli.train import TIMING_KEYS, train

    real, calls = TwoHeadModel.losses, [0]

    def losses(self, batch, task_loss):  # SIGINT during the 7th training step of the second point
        calls[0] += 1
        if calls[0] == 10 + 7:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, batch, task_loss)

    monkeypatch.setattr(TwoHeadModel, "losses", losses)
    cfg = tiny("train.steps=10", "train.eval_every=10")
    with pytest.raises(Interrupted):
        sweep_alpha(cfg, [0.0, 1.0], runs_dir=tmp_path, **QUIET)
    monkeypatch.undo()
    sweep = next(tmp_path.iterdir())
    assert json.loads((sweep / "alpha-1" / "meta.json").read_text())["status"] == "interrupted"
    sweep_alpha(None, resume=sweep, **QUIET)
    assert [r["status"] for r in rows(sweep)] == ["completed", "completed"]
    assert json.loads((sweep / "alpha-1" / "meta.json").read_text())["resumed_at_step"] == 7
    assert not list(sweep.glob("*.attempt*"))
    fresh = train(tiny("train.steps=10", "train.eval_every=10", "objective.alpha=1.0", "name=tiny-a1"),
                  runs_dir=tmp_path / "fresh", **QUIET)

    def values(run):
        recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in recs]

    assert values(sweep / "alpha-1") == values(fresh)
