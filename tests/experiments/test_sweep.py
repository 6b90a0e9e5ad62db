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
from llmcli.experiments.sweep import (
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
from tests.conftest import TINY, checkpoint_at, wait_for

QUIET = {"progress": False, "log": lambda m: None}
FAST = ("train.steps=10", "train.eval_every=10", "train.log_every=5")


def rows(sweep_dir):
    with open(sweep_dir / "results.csv") as f:
        return list(csv.DictReader(f))


def test_exact_sweep_writes_one_run_per_point_and_the_summary(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    # threads left to the plan (tiny.yaml names train.threads: 1, which every point would then run on)
    sweep = sweep_alpha(tiny(*FAST, "train.threads=null"), [0.0, 0.5, 1.0], runs_dir=tmp_path, workers=2, **QUIET)
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
    table = rows(e.value.folder)
    assert table[0]["status"] == "failed" and "NaN" in table[0]["error"]
    assert "failed" in str(e.value) and "--resume" in str(e.value)


def _spawn_sweep(tmp_path, processed_dir, *extra, session=False):
    cmd = [sys.executable, "-m", "llmcli", "sweep-alpha", str(TINY), "--set", f"data.processed_dir={processed_dir}",
           *[a for f in FAST for a in ("--set", f)], "--runs-dir", str(tmp_path), "--no-progress", *extra]
    # session: its own process group, as a command typed in a terminal is (Ctrl-C goes to the whole group)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=session)


def _sweep_dir(tmp_path):
    return wait_for(lambda: next(iter(tmp_path.glob("sweep-*")), None))


def test_killed_worker_fails_its_point_only_and_resume_reruns_just_that_point(tmp_path, processed_dir):
    proc = _spawn_sweep(tmp_path, processed_dir, "--alphas", "0,0.5,1", "--workers", "1")
    sweep = _sweep_dir(tmp_path)
    meta = sweep / point_name("alpha", 0.5, 0) / "meta.json"
    pid = wait_for(lambda: meta.is_file() and json.loads(meta.read_text()).get("pid"))
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
    wait_for(lambda: status.is_file())
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


def test_a_point_cut_off_mid_run_continues_from_its_checkpoint_and_ends_as_if_uninterrupted(tiny, tmp_path, monkeypatch):
    import shutil

    from llmcli.runs import load_run_config
    from llmcli.training.engine import train
    from tests.training.test_resume import same_weights
    from tests.training.test_train import metric_values

    name = point_name("alpha", 0.5, 0)
    # one core, so one thread per point: on two, torch's CPU kernels differ run to run in the last bits now and
    # then (docs/reliability.md), and this compares two separately trained runs
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
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


# Long enough that a signal lands mid-run; a checkpoint every 3 steps, so the cut point has one past step 0.
# Two points on two workers: one thread each (on two threads, torch's CPU kernels differ run to run in the last
# bits now and then, docs/reliability.md, and the test compares the cut point with a separately trained one).
CUT = ("--alphas", "0.5,1", "--workers", "2", "--set", "train.steps=30", "--set", "train.eval_every=30",
       "--set", "train.checkpoint_every=3")


def test_ctrl_c_on_a_real_sweep_leaves_the_resume_command_and_resume_continues_the_cut_point(tmp_path, processed_dir):
    from llmcli.runs import load_run_config
    from llmcli.training.engine import train
    from tests.training.test_resume import same_weights
    from tests.training.test_train import metric_values

    proc = _spawn_sweep(tmp_path, processed_dir, *CUT, session=True)
    sweep = _sweep_dir(tmp_path)
    name = point_name("alpha", 0.5, 0)
    wait_for(lambda: checkpoint_at(sweep, f"{name}/checkpoints/last.json", 3))
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: SIGINT to the sweep's whole process group
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert f"Continue with: llmcli sweep-alpha --resume {sweep}" in err and out.strip() == str(sweep)
    status = json.loads((sweep / name / "status.json").read_text())
    meta = json.loads((sweep / name / "meta.json").read_text())
    assert status["status"] == "interrupted" and meta["status"] == "interrupted" and 3 <= meta["step"] < 30
    said = []
    sweep_alpha(None, resume=sweep, progress=False, log=said.append)
    assert any(f"{name} was cut off mid-run; continuing it from its last checkpoint" in s for s in said)
    meta = json.loads((sweep / name / "meta.json").read_text())
    assert meta["resumed_at_step"] >= 3 and meta["status"] == "completed" and not list(sweep.glob(f"{name}.attempt*"))
    assert json.loads((sweep / name / "status.json").read_text())["resumed"] is True
    whole = train(load_run_config(sweep / name), run_dir=tmp_path / "whole", **QUIET)  # the same point, uncut
    assert metric_values(sweep / name) == metric_values(whole) and same_weights(sweep / name, whole)


def test_sigterm_to_the_sweep_alone_is_passed_on_to_its_workers(tmp_path, processed_dir):
    proc = _spawn_sweep(tmp_path, processed_dir, *CUT, session=True)
    sweep = _sweep_dir(tmp_path)
    name = point_name("alpha", 0.5, 0)
    wait_for(lambda: checkpoint_at(sweep, f"{name}/checkpoints/last.json", 3))
    proc.send_signal(signal.SIGTERM)  # the parent only (as `kill PID` or a scheduler does), not its group
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    meta = json.loads((sweep / name / "meta.json").read_text())
    assert meta["status"] == "interrupted" and meta["signal"] == "SIGTERM" and meta["step"] < 30
    assert json.loads((sweep / name / "status.json").read_text())["status"] == "interrupted"
    assert "--resume" in err and out.strip() == str(sweep)


def test_a_point_cut_during_its_evaluation_is_only_evaluated_again(tiny, tiny_run, tmp_path):
    import shutil

    from llmcli.experiments.sweep_grid import new_state

    sweep = tmp_path / "sweep-cut"  # a sweep whose one point trained to the end, then was cut while being scored
    sweep.mkdir()
    (sweep / "sweep.json").write_text(json.dumps(new_state(tiny(), [0.5], None, None, "exact")))
    point = sweep / point_name("alpha", 0.5, 0)  # tiny() is alpha 0.5, seed 0: the shared run is this point
    shutil.copytree(tiny_run, point)
    shutil.rmtree(point / "eval", ignore_errors=True)
    (point / "status.json").write_text(json.dumps({"status": "interrupted", "signal": "SIGINT", "wall_s": 3.0}))
    stamp = (point / "checkpoints" / "last.safetensors").stat().st_mtime_ns
    sweep_alpha(None, resume=sweep, **QUIET)
    assert (point / "checkpoints" / "last.safetensors").stat().st_mtime_ns == stamp  # not retrained
    assert (point / "eval" / "test.json").is_file() and not list(sweep.glob("*.attempt*"))
    status = json.loads((point / "status.json").read_text())
    assert status["status"] == "completed" and status["resumed"] is True and status["wall_s"] >= 3.0


def _signal_self_when(found, signum=signal.SIGINT):
    """A watcher thread: once `found()` is truthy, send `signum` to this process (the main thread handles it)."""
    import threading

    done = threading.Event()

    def watch():
        while not done.is_set():
            if found():
                os.kill(os.getpid(), signum)
                return
            time.sleep(0.02)

    threading.Thread(target=watch, daemon=True).start()
    return done


def test_an_interrupted_conditioned_run_continues_from_its_checkpoint(tiny, tmp_path):
    from llmcli.experiments.sweep import SweepInterrupted

    cfg = tiny("train.steps=30", "train.eval_every=30", "train.checkpoint_every=3")
    done = _signal_self_when(lambda: checkpoint_at(tmp_path, "sweep-*/conditioned/checkpoints/last.json", 3),
                             signal.SIGTERM)
    said = []
    try:
        with pytest.raises(SweepInterrupted) as e:
            sweep_alpha(cfg, [0.0, 1.0], mode="conditioned", runs_dir=tmp_path, progress=False, log=said.append)
    finally:
        done.set()
    sweep, run = e.value.folder, e.value.folder / "conditioned"
    assert e.value.signum == signal.SIGTERM and f"llmcli sweep-alpha --resume {sweep}" in said[-1]
    assert json.loads((run / "status.json").read_text())["status"] == "interrupted"
    sweep_alpha(None, resume=sweep, **QUIET)
    assert json.loads((run / "meta.json").read_text())["resumed_at_step"] >= 3
    assert not list(sweep.glob("conditioned.attempt*"))
    assert [r["status"] for r in rows(sweep)] == ["completed", "completed"]


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


def test_a_base_config_that_sets_train_threads_runs_every_point_on_them(tiny, tmp_path, monkeypatch):
    from llmcli.experiments.sweep import PointSource, default_workers, new_state
    from llmcli.experiments.sweep_exec import _Pool, _start_line

    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    todo = [(0.0, 0), (0.5, 0), (1.0, 0)]
    free = tiny("train.threads=null")  # threads left to the plan (tiny.yaml names 1)
    planned = PointSource(free, new_state(free, [0.0, 0.5, 1.0], None, None, "exact"), tmp_path, todo, print)
    assert default_workers(3) == 3 and _Pool(planned, 2, print).plan == [4, 2, 2]  # the plan: the odd point first
    cfg = tiny("train.threads=2")  # e.g. to leave cores to other work: the user's threads win over the plan
    source = PointSource(cfg, new_state(cfg, [0.0, 0.5, 1.0], None, None, "exact"), tmp_path, todo, print)
    workers = default_workers(3, cfg.train.threads)
    assert workers == 2  # 4 cores // 2 threads: not oversubscribed
    pool = _Pool(source, workers, print)
    assert pool.plan == [2, 2, 2]
    assert "2 worker(s) x 2 thread(s) (train.threads of the config)" in _start_line(source, workers, pool.plan)
    assert source.next_job(pool.planned()).config["train"]["threads"] == 2


def test_a_resumed_point_is_counted_with_the_threads_it_started_with(tmp_path):
    from llmcli.experiments.sweep import point_threads

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


# ---------------------------------------------------------------- results: one front, numbers, pictures


def _row(value, ppl, acc, lm, task, **extra):
    return {"mode": "exact", "variable": "alpha", "value": value, "seed": 0, "status": "completed",
            "run": f"alpha-{value:g}-seed0", "acc_in": acc, "acc_ood": acc - 0.05, "gap_acc": 0.05, "ppl_in": ppl,
            "ppl_ood": ppl * 1.2, "gap_ppl": -ppl * 0.2, "lm_loss_in": lm, "task_loss_in": task,
            "grad_cosine": 0.1, "wall_s": 16.123, **extra}


# alpha 0.5 is on the (ppl, acc) front but dominated in (lm_loss, task_loss) by alpha 0; alpha 1 the reverse:
# the two definitions the sweep used to mix disagree on both.
DISAGREE = [_row(0.0, 100.0, 0.5, 4.6, 1.0), _row(0.5, 200.0, 0.6, 5.3, 1.2), _row(1.0, 300.0, 0.4, 5.7, 0.9)]
STATE = {"mode": "exact", "variable": "alpha", "grid": [0.0, 0.5, 1.0], "seeds": [0]}


def _coloured_x(ax):
    """x of the points drawn in a series colour (not the grey of dominated points) in one panel."""
    from matplotlib.colors import to_hex

    return sorted(float(line.get_xdata()[0]) for line in ax.lines
                  if line.get_marker() not in (None, "None", "") and len(line.get_xdata()) == 1
                  and to_hex(line.get_markerfacecolor()) != to_hex("0.75"))


def test_results_csv_summary_and_the_plot_mark_the_same_pareto_points(tmp_path):
    import matplotlib.pyplot as plt

    from llmcli.experiments.sweep import aggregate, pareto_figure, write_results

    write_results(tmp_path, STATE, [dict(r) for r in DISAGREE])
    marked = {float(r["value"]): r["pareto"] for r in rows(tmp_path)}
    assert marked == {0.0: "True", 0.5: "True", 1.0: "False"}
    summary = (tmp_path / "summary.md").read_text()
    assert "non-dominated on in-domain perplexity (lower is better) and task accuracy (higher is better): " \
           "alpha=0, alpha=0.5." in summary
    assert "Hypervolume of the seed means on (in-domain lm_loss, task_loss)" in summary  # its own axes, named
    fig = pareto_figure("t", STATE, aggregate([dict(r) for r in DISAGREE]), None)
    assert _coloured_x(fig.axes[0]) == [100.0, 200.0]  # exactly the rows results.csv marks
    ood = {float(r["value"]): r["pareto_ood"] for r in rows(tmp_path)}
    assert _coloured_x(fig.axes[1]) == sorted(1.2 * p for p, v in ((100.0, 0.0), (200.0, 0.5), (300.0, 1.0))
                                              if ood[v] == "True")
    plt.close(fig)


def test_summary_prints_each_metric_at_its_own_precision_and_says_what_the_gap_sign_means(tmp_path):
    from llmcli.experiments.sweep import fmt, write_results

    assert (fmt("ppl_in", 506.8055), fmt("gap_acc", -0.0003394), fmt("acc_in", 0.31805), fmt("wall_s", 16.12),
            fmt("gap_ppl", -37.1954), fmt("acc_in", 0.5, 0.01234), fmt("ppl_in", None)) == \
        ("506.8", "-0.000", "0.318", "16.1", "-37.2", "0.500 ± 0.012", "-")
    write_results(tmp_path, STATE, [dict(r, ppl_in=506.8055, gap_acc=-0.0003394) for r in DISAGREE])
    summary = (tmp_path / "summary.md").read_text()
    table = [x for x in summary.splitlines() if x.startswith("| 0 |")][0]
    assert table == "| 0 | 1 | 0.500 | 0.450 | -0.000 | 506.8 | 120.0 | -20.0 | +0.100 | 16.1 |"
    assert "gap acc (in − OOD)¹" in summary and "gap ppl (in − OOD)¹" in summary
    assert "For acc a positive gap means OOD is less accurate (worse); for ppl a positive gap means OOD has the " \
           "lower perplexity (better)" in summary


def test_pareto_png_keeps_every_point_and_label_inside_and_labels_the_compared_front(tmp_path):
    import matplotlib.pyplot as plt

    from llmcli.experiments.sweep import aggregate, pareto_figure
    from llmcli.experiments.sweep_report import _label_groups

    other = aggregate([_row(v, 150.0 + v, 0.45, 5.0, 1.1) for v in (0.0, 0.5, 1.0)])  # a tight cluster
    fig = pareto_figure("t", STATE, aggregate([dict(r) for r in DISAGREE]), other)
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    assert lo < 100.0 * 0.97 and hi > 300.0 * 1.03  # alpha = 0 (and the other end) off the frame
    texts = [t.get_text() for t in ax.texts]
    assert {"α=0", "α=0.5", "α=1"} <= set(texts) and "α=0, 0.5, 1" in texts  # compared front: one label, not 3
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_xticklabels(minor=True) if t.get_text()]
    assert labels == [] and all("10^" not in t.get_text() for t in ax.get_xticklabels())  # plain, no minor labels
    plt.close(fig)
    assert _label_groups([(100.0, 0.5, 0.0), (101.0, 0.5, 0.5), (300.0, 0.2, 1.0)], (2.0, 2.5, 0.2, 0.5)) == \
        [(100.0, 0.5, "0, 0.5"), (300.0, 0.2, "1")]
