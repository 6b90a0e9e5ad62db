"""Trackers (train.loggers): TensorBoard events and MLflow runs hold exactly what metrics.jsonl holds; a resume
continues them without duplicates; a failing tracker never stops training; sweeps nest; eval logs artifacts.

One MLflow store (a module-wide runs folder) serves every test: creating a store and importing mlflow are the slow
parts, so the tracked run is trained once and shared."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from llmcli.tracking import INSTALL, metric_tags
from llmcli.training.engine import TIMING_KEYS, train
from tests.conftest import TINY

needs_tb = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                              reason=f"tensorboard is not installed ({INSTALL})")
needs_mlflow = pytest.mark.skipif(importlib.util.find_spec("mlflow") is None,
                                  reason=f"mlflow is not installed ({INSTALL})")
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")  # mlflow's
BOTH = "train.loggers=[tensorboard, mlflow]"
SHORT = ("train.steps=4", "train.eval_every=4", "train.log_every=2", "train.val_max_examples=16")


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def expected(run: Path, timing: bool = True) -> dict[str, dict[int, float]]:
    """tag -> step -> value, from metrics.jsonl (timing keys left out when `timing` is false)."""
    out: dict[str, dict[int, float]] = {}
    for rec in records(run):
        kept = {k: v for k, v in rec.items() if timing or k not in TIMING_KEYS}
        for tag, v in metric_tags(kept).items():
            assert rec["step"] not in out.setdefault(tag, {}), (tag, rec["step"])
            out[tag][rec["step"]] = v
    return out


def assert_same(got: dict[str, list[tuple[int, float]]], want: dict[str, dict[int, float]]) -> None:
    """Every tag, every step once, every value within 1e-6 (relative: TensorBoard keeps float32)."""
    assert set(got) >= set(want), sorted(set(want) - set(got))
    for tag, points in want.items():
        steps = [s for s, _ in got[tag]]
        assert sorted(steps) == sorted(points), (tag, steps)  # each step once: no duplicate
        for step, value in got[tag]:
            assert value == pytest.approx(points[step], rel=1e-6, abs=1e-9), (tag, step)


def tensorboard_points(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def mlflow_points(run: Path) -> dict[str, list[tuple[int, float]]]:
    mc, run_id = client(run)
    keys = mc.get_run(run_id).data.metrics
    return {k: [(m.step, m.value) for m in mc.get_metric_history(run_id, k)] for k in keys}


def client(folder: Path):
    """The MlflowClient and run id recorded in a run (or sweep) folder's tracking.json."""
    from mlflow.tracking import MlflowClient

    entry = json.loads((folder / "tracking.json").read_text())["mlflow"]
    return MlflowClient(entry["tracking_uri"]), entry["run_id"]


def collect() -> tuple[list[str], dict]:
    lines: list[str] = []
    return lines, {"progress": False, "log": lines.append}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The module's runs folder: its mlflow.db is the one default store every test here uses."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield tmp_path_factory.mktemp("tracked-runs")


@pytest.fixture(scope="module")
def tracked_run(tiny, runs) -> Path:
    """A tiny run (20 steps) with both trackers (its eval capped: the test only needs eval's files)."""
    return train(tiny(BOTH, "eval.max_examples=32"), runs_dir=runs, progress=False, log=lambda m: None)


@needs_tb
@needs_mlflow
def test_tensorboard_events_equal_metrics_jsonl(tracked_run):
    assert list((tracked_run / "tb").glob("events.out.tfevents.*"))  # in the run folder: --logdir runs finds it
    want = expected(tracked_run)
    assert {"train/lm_loss", "train/task_loss", "train/grad_cosine", "train/lr", "val/kjv/acc",
            "val/wyc/lm_loss", "val/in_domain/objective"} <= set(want)
    assert_same(tensorboard_points(tracked_run), want)


@needs_tb
@needs_mlflow
def test_mlflow_run_holds_every_metric_its_config_and_tags(tracked_run, runs):
    from mlflow.tracking import MlflowClient

    assert_same(mlflow_points(tracked_run), expected(tracked_run))
    mc, run_id = client(tracked_run)
    assert mc.tracking_uri == f"sqlite:///{runs.resolve() / 'mlflow.db'}"  # the default store, beside the runs
    run = mc.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == tracked_run.name
    assert MlflowClient(mc.tracking_uri).get_experiment(run.info.experiment_id).name == "tiny"
    assert run.data.tags["run_dir"] == str(tracked_run.resolve()) and run.data.tags["seed"] == "0"
    assert "mlflow.parentRunId" not in run.data.tags
    params = run.data.params
    assert params["train.steps"] == "20" and params["model.d_model"] == "32" and params["optim.lr"] == "0.003"
    assert json.loads(params["train.loggers"]) == ["tensorboard", "mlflow"]
    assert {a.path for a in mc.list_artifacts(run_id)} >= {"config.yaml", "curves.png"}
    assert (runs / "mlartifacts").is_dir()


@needs_tb
@needs_mlflow
def test_eval_logs_its_json_and_pictures_to_the_run(tracked_run):
    from llmcli.evaluation.evaluate import evaluate

    evaluate(tracked_run, log=lambda m: None)
    mc, run_id = client(tracked_run)
    logged = {a.path for a in mc.list_artifacts(run_id, "eval")}
    assert logged == {"eval/test.json", "eval/test-confusion.png", "eval/test-reliability.png"}
    copy = Path(mc.download_artifacts(run_id, "eval/test.json"))
    assert json.loads(copy.read_text()) == json.loads((tracked_run / "eval" / "test.json").read_text())


@needs_tb
@needs_mlflow
def test_resume_continues_the_same_event_dir_and_mlflow_run_without_duplicates(tiny, runs, monkeypatch):
    """An attempt that dies after logging past its checkpoint (step 15 logged, checkpoint at 10): the resumed
    run's TensorBoard curves and MLflow history hold each step once, equal to metrics.jsonl."""
    from llmcli.training.engine import Loop

    real = Loop.validate_and_checkpoint

    def dies_at_15(self):
        if self.state.step == 15:
            raise RuntimeError("simulated crash")
        return real(self)

    monkeypatch.setattr(Loop, "validate_and_checkpoint", dies_at_15)
    before = set(runs.iterdir())
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny(BOTH), runs_dir=runs, progress=False, log=lambda m: None)
    monkeypatch.setattr(Loop, "validate_and_checkpoint", real)
    (part,) = set(runs.iterdir()) - before
    first = json.loads((part / "tracking.json").read_text())
    mc, run_id = client(part)
    assert mc.get_run(run_id).info.status == "FAILED"
    assert 15 in [m.step for m in mc.get_metric_history(run_id, "train/lm_loss")]  # logged past the checkpoint

    train(None, resume=part, progress=False, log=lambda m: None)
    assert json.loads((part / "tracking.json").read_text()) == first  # the same MLflow run continued
    assert mc.get_run(run_id).info.status == "FINISHED"
    assert len(mc.search_runs([first["mlflow"]["experiment_id"]],
                              f"tags.run_dir = '{part.resolve()}'")) == 1
    assert len(list((part / "tb").glob("events.out.tfevents.*"))) == 2  # one event dir, one file per attempt
    steady = expected(part, timing=False)  # timing keys: step 15's is the first attempt's own
    for got in (tensorboard_points(part), mlflow_points(part)):
        assert_same({k: v for k, v in got.items() if k.rsplit("/", 1)[-1] not in TIMING_KEYS}, steady)
        assert sorted(s for s, _ in got["train/tokens_per_s"]) == [5, 10, 15, 20]


def test_missing_packages_are_one_warning_each_and_training_goes_on(tiny, tmp_path, monkeypatch):
    for name in ("mlflow", "tensorboard", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now fails as if it were not installed
    lines, quiet = collect()
    run = train(tiny(BOTH, *SHORT), runs_dir=tmp_path, **quiet)
    warnings = [m for m in lines if "warning" in m]
    assert len(warnings) == 2 and all(INSTALL in m and "training goes on" in m for m in warnings), warnings
    assert sorted(m.split(" disabled")[0].rsplit(" ", 1)[-1] for m in warnings) == ["mlflow", "tensorboard"]
    log = (run / "train.log").read_text()
    assert all(m in log for m in warnings)
    assert json.loads((run / "meta.json").read_text())["status"] == "completed"
    assert [r["step"] for r in records(run) if r["split"] == "train"] == [2, 4]
    assert not (run / "tracking.json").exists() and not list(tmp_path.glob("mlflow.db"))


@needs_mlflow
def test_an_unwritable_store_is_one_warning_and_training_goes_on(tiny, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{blocker}/mlflow.db")  # its folder is a file
    lines, quiet = collect()
    run = train(tiny("train.loggers=[mlflow]", *SHORT), runs_dir=tmp_path / "runs", **quiet)
    warnings = [m for m in lines if "warning" in m]
    assert len(warnings) == 1 and "tracker mlflow disabled (start failed" in warnings[0], warnings
    assert warnings[0] in (run / "train.log").read_text()
    assert json.loads((run / "meta.json").read_text())["status"] == "completed"
    assert not (run / "tracking.json").exists()


@needs_tb
@needs_mlflow
def test_a_tracker_raising_while_logging_is_dropped_and_the_others_go_on(tiny, runs, monkeypatch):
    from llmcli.tracking.tensorboard import TensorBoardTracker

    def broken(self, step, values):
        raise OSError("disk full")

    monkeypatch.setattr(TensorBoardTracker, "log_metrics", broken)
    lines, quiet = collect()
    run = train(tiny(BOTH, *SHORT), runs_dir=runs, **quiet)
    warnings = [m for m in lines if "warning" in m]
    assert warnings == ["train: warning: tracker tensorboard disabled (log failed: OSError: disk full); training "
                        "goes on, the run folder keeps every metric"]
    assert json.loads((run / "meta.json").read_text())["status"] == "completed"
    assert_same(mlflow_points(run), expected(run))  # mlflow got everything all the same


def in_process(cfg, state, sweep_dir, *args, **kwargs) -> None:
    """The sweep's points run by the worker body itself (`run_point`), in this process: a spawned worker would pay
    ~10 s importing torch and mlflow again; its run folder, config and tracking are the same."""
    from llmcli.experiments.sweep import point_config, point_name, run_point

    for value in state["grid"]:
        for seed in state["seeds"]:
            pcfg = point_config(cfg, state["variable"], value, seed, 1).model_dump(mode="json")
            name = point_name(state["variable"], value, seed)
            (sweep_dir / name).mkdir()
            run_point(pcfg, name, str(sweep_dir))


@needs_mlflow
def test_sweep_points_are_nested_runs_under_one_parent(tiny, runs, monkeypatch):
    import llmcli.experiments.sweep as sweep_module
    from llmcli.tracking import sweep_parent

    monkeypatch.setattr(sweep_module, "_run_points", in_process)
    cfg = tiny("train.loggers=[mlflow]", *SHORT, "eval.max_examples=32")
    sweep = sweep_module.sweep_alpha(cfg, [0.0, 1.0], runs_dir=runs, progress=False, log=lambda m: None)
    mc, parent = client(sweep)
    assert mc.tracking_uri == f"sqlite:///{runs.resolve() / 'mlflow.db'}"  # the top runs folder's store
    assert not list(sweep.glob("mlflow.db"))
    exp = mc.get_run(parent).info.experiment_id
    children = mc.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'")
    points = sorted(p for p in sweep.iterdir() if p.name.startswith("alpha-"))
    assert len(points) == 2
    assert sorted(r.data.tags["run_dir"] for r in children) == [str(p.resolve()) for p in points]
    for r in children:
        assert r.info.status == "FINISHED" and r.data.params["objective.alpha"] in ("0.0", "1.0")
        assert "eval/test.json" in {a.path for a in mc.list_artifacts(r.info.run_id, "eval")}
    before = json.loads((sweep / "tracking.json").read_text())
    sweep_parent(sweep, cfg)  # what a resumed sweep calls: the recorded parent run is reused
    assert json.loads((sweep / "tracking.json").read_text()) == before
    assert len(mc.search_runs([exp], f"tags.run_dir = '{sweep.resolve()}'")) == 1


def test_an_unknown_logger_is_a_config_error(tmp_path, monkeypatch):
    from llmcli.config import load_config
    from llmcli.errors import UserError
    from tests.test_bad_inputs import assert_rejected

    monkeypatch.chdir(tmp_path)
    assert_rejected(tmp_path, ["train", str(TINY), "--set", "train.loggers=[tensorboard, wandb]", "--no-progress"],
                    "train.loggers.1", "'tensorboard' or 'mlflow'", "'wandb'")
    with pytest.raises(UserError, match=r"train\.loggers: name each logger at most once \(allowed: tensorboard, mlflow\)"):
        load_config(TINY, ["train.loggers=[mlflow, mlflow]"])


def test_help_imports_no_tracker():
    code = ("import sys; from llmcli.cli import app; from typer.testing import CliRunner; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0; "
            "print(sorted(m for m in ('mlflow', 'tensorboard') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
