"""`sweep-alpha`: grids, seeds, parallel points, fault isolation, resume, results, the conditioned mode."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from llmcli.errors import UserError
from llmcli.sweep import (
    SweepFailed,
    hypervolume,
    pareto_mask,
    parse_grid,
    parse_seeds,
    point_name,
    run_point,
    sweep_alpha,
    thread_plan,
)

from .conftest import TINY

QUIET = {"progress": False, "log": lambda m: None}
FAST = ("train.steps=10", "train.eval_every=10", "train.log_every=5")


def rows(sweep_dir):
    with open(sweep_dir / "results.csv") as f:
        return list(csv.DictReader(f))


def test_exact_sweep_writes_one_run_per_point_and_the_summary(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr("llmcli.sweep.os.cpu_count", lambda: 2)
    sweep = sweep_alpha(tiny(*FAST), [0.0, 0.5, 1.0], runs_dir=tmp_path, workers=2, **QUIET)
    assert sweep.name.startswith("sweep-")
    table = rows(sweep)
    assert [float(r["value"]) for r in table] == [0.0, 0.5, 1.0]
    assert all(r["status"] == "completed" and r["variable"] == "alpha" for r in table)
    for r in table:
        point = sweep / r["run"]
        cfg = yaml.safe_load((point / "config.yaml").read_text())
        # 3 points on 2 workers x 1 core: the odd one out goes first, alone on both cores
        assert cfg["objective"]["alpha"] == float(r["value"])
        assert cfg["train"]["threads"] == (2 if float(r["value"]) == 0.0 else 1)
        assert (point / "eval" / "test.json").is_file()
        assert 0 <= float(r["acc_in"]) <= 1 and float(r["ppl_in"]) > 1 and r["pareto"] in ("True", "False")
    assert (sweep / "pareto.png").stat().st_size > 1000
    summary = (sweep / "summary.md").read_text()
    assert "Hypervolume" in summary and "reference point" in summary and "smallest OOD gap" in summary
    # the lead point had both cores to itself: the others started after it had finished
    lead_done = int((sweep / "alpha-0-seed0" / "status.json").stat().st_mtime)
    for other in ("alpha-0.5-seed0", "alpha-1-seed0"):
        started = json.loads((sweep / other / "meta.json").read_text())["started"]
        assert datetime.strptime(started, "%Y-%m-%dT%H:%M:%S%z").timestamp() >= lead_done


def test_seeds_give_a_row_per_point_and_seed_and_mean_std_in_the_summary(tiny, tmp_path):
    sweep = sweep_alpha(tiny(*FAST), [0.0, 1.0], seeds=[0, 1], runs_dir=tmp_path, **QUIET)
    table = rows(sweep)
    assert [(float(r["value"]), int(r["seed"])) for r in table] == [(0.0, 0), (0.0, 1), (1.0, 0), (1.0, 1)]
    assert (sweep / point_name("alpha", 1.0, 1)).is_dir()
    assert "±" in (sweep / "summary.md").read_text()


def test_a_point_that_raises_is_recorded_and_does_not_stop_the_sweep(tiny, tmp_path):
    (tmp_path / "bad").mkdir()
    with pytest.raises(SystemExit):
        run_point({"model": {"name": "gpt", "n_head": 3, "d_model": 32}}, "bad", str(tmp_path))
    status = json.loads((tmp_path / "bad" / "status.json").read_text())
    assert status["status"] == "failed" and "divisible" in status["error"]


def test_diverging_points_fail_with_their_error_and_the_sweep_reports_them(tiny, tmp_path):
    cfg = tiny(*FAST, "optim.name=sgd", "optim.lr=1e12", "train.grad_clip=null")
    with pytest.raises(SweepFailed) as e:
        sweep_alpha(cfg, [0.5], runs_dir=tmp_path, workers=1, **QUIET)
    table = rows(e.value.sweep_dir)
    assert table[0]["status"] == "failed" and "NaN" in table[0]["error"]
    assert "failed" in str(e.value) and "--resume" in str(e.value)


def _spawn_sweep(tmp_path, processed_dir, *extra):
    cmd = [sys.executable, "-m", "llmcli", "sweep-alpha", str(TINY), "--set", f"data.processed_dir={processed_dir}",
           *[a for f in FAST for a in ("--set", f)], "--runs-dir", str(tmp_path), "--no-progress", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, timeout=120):
    t = time.time()
    while time.time() - t < timeout:
        found = predicate()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError("timed out")


def _sweep_dir(tmp_path):
    return _wait_for(lambda: next(iter(tmp_path.glob("sweep-*")), None))


def test_killed_worker_fails_its_point_only_and_resume_reruns_just_that_point(tmp_path, processed_dir):
    proc = _spawn_sweep(tmp_path, processed_dir, "--alphas", "0,0.5,1", "--workers", "1")
    sweep = _sweep_dir(tmp_path)
    meta = sweep / point_name("alpha", 0.5, 0) / "meta.json"
    pid = _wait_for(lambda: meta.is_file() and json.loads(meta.read_text()).get("pid"))
    os.kill(pid, signal.SIGKILL)  # the worker of the second point dies (as under the OOM killer)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 1 and "1 point(s) failed" in err
    table = rows(sweep)
    assert [r["status"] for r in table] == ["completed", "failed", "completed"]
    assert "killed by signal 9" in table[1]["error"]
    first = sweep / point_name("alpha", 0.0, 0) / "checkpoints" / "last.safetensors"
    stamp = first.stat().st_mtime_ns
    from typer.testing import CliRunner

    from llmcli.cli import app

    again = CliRunner().invoke(app, ["sweep-alpha", "--resume", str(sweep), "--no-progress"])
    assert again.exit_code == 0, again.output
    assert [r["status"] for r in rows(sweep)] == ["completed"] * 3
    assert first.stat().st_mtime_ns == stamp  # finished points are not re-run


def test_sigkilled_sweep_resumes_without_rerunning_finished_points(tmp_path, processed_dir):
    proc = _spawn_sweep(tmp_path, processed_dir, "--alphas", "0,1", "--workers", "1")
    sweep = _sweep_dir(tmp_path)
    status = sweep / point_name("alpha", 0.0, 0) / "status.json"
    _wait_for(lambda: status.is_file())
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    first_ckpt = sweep / point_name("alpha", 0.0, 0) / "checkpoints" / "last.safetensors"
    stamp = first_ckpt.stat().st_mtime_ns
    said = []
    sweep_alpha(None, resume=sweep, progress=False, log=said.append)
    assert first_ckpt.stat().st_mtime_ns == stamp
    assert any("alpha-0-seed0 already finished" in s for s in said)
    table = rows(sweep)
    assert sorted(float(r["value"]) for r in table) == [0.0, 1.0]
    assert all(r["status"] == "completed" for r in table)


def test_a_point_cut_off_mid_run_continues_from_its_checkpoint_and_ends_as_if_uninterrupted(tiny, tmp_path):
    import shutil

    from llmcli.runs import load_run_config
    from llmcli.train import train

    from .test_resume import same_weights
    from .test_train import metric_values

    name = point_name("alpha", 0.5, 0)
    whole = sweep_alpha(tiny(*FAST, "train.checkpoint_every=5"), [0.5], workers=1, runs_dir=tmp_path / "a", **QUIET)
    cut = tmp_path / "b" / "sweep-cut"  # the same sweep, its worker killed after step 5 of 10 (checkpoint kept)
    (cut / name).mkdir(parents=True)
    shutil.copy(whole / "sweep.json", cut / "sweep.json")
    train(load_run_config(whole / name), run_dir=cut / name, stop_after=5, **QUIET)
    (cut / name / "status.json").write_text(json.dumps({"status": "failed", "error": "worker killed by signal 9"}))
    said = []
    sweep_alpha(None, resume=cut, progress=False, log=said.append)
    assert any(f"{name} was cut off mid-run; continuing it" in s for s in said)
    assert json.loads((cut / name / "meta.json").read_text())["resumed_at_step"] == 5
    assert json.loads((cut / name / "status.json").read_text())["resumed"] is True
    assert metric_values(cut / name) == metric_values(whole / name) and same_weights(cut / name, whole / name)
    assert [r["status"] for r in rows(cut)] == ["completed"] and not list(cut.glob("*.attempt*"))


def test_a_point_that_failed_by_itself_starts_over_and_its_attempt_is_kept(tiny, tmp_path):
    sweep = sweep_alpha(tiny(*FAST), [0.5], workers=1, runs_dir=tmp_path, **QUIET)
    point = sweep / point_name("alpha", 0.5, 0)
    (point / "status.json").write_text(json.dumps({"status": "failed", "error": "FloatingPointError: NaN at step 7"}))
    sweep_alpha(None, resume=sweep, **QUIET)
    assert (sweep / f"{point.name}.attempt1" / "checkpoints" / "last.safetensors").is_file()
    assert json.loads((point / "meta.json").read_text())["resumed_at_step"] is None
    assert [r["status"] for r in rows(sweep)] == ["completed"]


def test_conditioned_mode_trains_one_run_and_scores_every_alpha(tiny, tmp_path):
    sweep = sweep_alpha(tiny("train.steps=30", "train.eval_every=30"), [0.0, 0.5, 1.0], mode="conditioned",
                        runs_dir=tmp_path, **QUIET)
    table = rows(sweep)
    assert [r["mode"] for r in table] == ["conditioned"] * 3 and all(r["status"] == "completed" for r in table)
    run = sweep / "conditioned"
    assert yaml.safe_load((run / "config.yaml").read_text())["objective"]["name"] == "conditioned"
    evals = [json.loads((run / "eval" / f"test-alpha-{a:g}.json").read_text()) for a in (0.0, 0.5, 1.0)]
    # alpha reaches the model: the same weights score differently at different alphas
    assert evals[0]["domains"]["kjv"]["lm_loss"] != evals[2]["domains"]["kjv"]["lm_loss"]
    assert not list(tmp_path.glob("sweep-*/alpha-*"))  # no per-point runs


def test_compare_overlays_the_other_front_and_reports_the_hypervolume_share(tiny, tmp_path):
    exact = sweep_alpha(tiny(*FAST), [0.0, 1.0], runs_dir=tmp_path, **QUIET)
    cond = sweep_alpha(tiny(*FAST), [0.0, 1.0], mode="conditioned", compare=exact, runs_dir=tmp_path, **QUIET)
    assert "conditioned / exact =" in (cond / "summary.md").read_text()


@pytest.mark.parametrize("bad", ["", "0,,1", "0,x", "0,1.5", "-0.1", "0.5,0.5", "linspace:0:1", "linspace:0:2:3"])
def test_bad_alpha_grids(bad):
    with pytest.raises(UserError, match="--alphas"):
        parse_grid(bad, "--alphas")


def test_grids_and_seeds_parse():
    assert parse_grid("0, 0.25,1") == [0.0, 0.25, 1.0]
    assert parse_grid("linspace:0:1:5") == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert parse_seeds("0,1,2") == [0, 1, 2]
    with pytest.raises(UserError, match="--seeds"):
        parse_seeds("0,a")


def test_bad_sweep_requests(tiny, tmp_path):
    with pytest.raises(UserError, match="sweep state"):
        sweep_alpha(None, resume=tmp_path, **QUIET)
    with pytest.raises(UserError, match="--betas"):
        sweep_alpha(tiny(), betas=[0.5], runs_dir=tmp_path, **QUIET)
    with pytest.raises(UserError, match="--mode"):
        sweep_alpha(tiny(), [0.5], mode="fast", runs_dir=tmp_path, **QUIET)
    with pytest.raises(UserError, match="--compare"):
        sweep_alpha(tiny(), [0.5], compare=tmp_path, runs_dir=tmp_path, **QUIET)


def test_ray_backend_without_ray_is_a_user_error(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(UserError, match="ray is not installed"):
        sweep_alpha(tiny(), [0.5], backend="ray", runs_dir=tmp_path, **QUIET)


def test_thread_plan_runs_the_points_of_a_part_empty_round_first_on_every_core():
    assert thread_plan(8, 2, 2) == [1] * 8
    assert thread_plan(5, 2, 2) == [2, 1, 1, 1, 1]
    assert thread_plan(9, 2, 2) == [2] + [1] * 8
    assert thread_plan(20, 16, 16) == [4] * 4 + [1] * 16
    assert thread_plan(23, 16, 16) == [2] * 7 + [1] * 16  # 14 cores for the lead: 2 points start beside them
    assert thread_plan(3, 1, 2) == [2, 2, 2]
    assert thread_plan(1, 2, 2) == [2]
    assert thread_plan(3, 4, 2) == [1, 1, 1]  # more workers than cores: oversubscribed, as asked


def test_a_resumed_point_is_counted_with_the_threads_it_started_with(tmp_path):
    from llmcli.sweep import point_threads

    state = {"variable": "alpha"}
    cut = tmp_path / "alpha-0.5-seed0"  # cut off mid-run, started on 1 thread, with a checkpoint
    (cut / "checkpoints").mkdir(parents=True)
    (cut / "checkpoints" / "last.safetensors").write_bytes(b"x")
    (cut / "meta.json").write_text(json.dumps({"status": "running"}))
    (cut / "config.yaml").write_text(yaml.safe_dump({"train": {"threads": 1}}))
    (tmp_path / "alpha-1-seed0").mkdir()  # failed by itself: starts over, on the plan's threads
    (tmp_path / "alpha-1-seed0" / "config.yaml").write_text(yaml.safe_dump({"train": {"threads": 1}}))
    todo = [(0.0, 0), (0.5, 0), (1.0, 0)]
    assert point_threads(tmp_path, state, todo, [2, 2, 2]) == [((0.0, 0), 2), ((0.5, 0), 1), ((1.0, 0), 2)]
    (cut / "config.yaml").write_text("train: [unclosed")  # unreadable: the plan's threads
    assert point_threads(tmp_path, state, todo, [2, 2, 2])[1] == ((0.5, 0), 2)


def test_pareto_mask_and_hypervolume_known_answers():
    assert pareto_mask([(1, 5), (2, 2), (3, 3), (5, 1)]) == [True, True, False, True]
    # two boxes against (3, 3): [1,3]x[2,3] and [2,3]x[1,3] overlap in [2,3]x[2,3] -> 2 + 2 - 1
    assert hypervolume([(1, 2), (2, 1)], (3, 3)) == pytest.approx(3.0)
    assert hypervolume([(4, 4)], (3, 3)) == 0.0


def test_cli_bad_input_exit_2(tmp_path):
    from typer.testing import CliRunner

    from llmcli.cli import app

    r = CliRunner()
    for args in (["--alphas", "0,2"], ["--alphas", "linspace:0:1"], ["--workers", "0"], ["--seeds", "x"]):
        res = r.invoke(app, ["sweep-alpha", str(TINY), *args])
        assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1, args
    assert r.invoke(app, ["sweep-alpha", "--resume", str(tmp_path)]).exit_code == 2
    assert Path(TINY).is_file()


def test_ray_backend_runs_points_and_resumes_like_local_workers(tiny, tmp_path):
    pytest.importorskip("ray")
    import ray

    try:
        sweep = sweep_alpha(tiny(*FAST), [0.0, 1.0], backend="ray", workers=2, runs_dir=tmp_path, **QUIET)
        assert [r["status"] for r in rows(sweep)] == ["completed", "completed"]
        stamp = (sweep / "alpha-0-seed0" / "status.json").stat().st_mtime_ns
        sweep_alpha(None, resume=sweep, backend="ray", **QUIET)
        assert (sweep / "alpha-0-seed0" / "status.json").stat().st_mtime_ns == stamp
    finally:
        ray.shutdown()
