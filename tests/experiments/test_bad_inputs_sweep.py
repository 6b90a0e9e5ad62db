"""Bad sweep / --loo arguments: one line naming the flag, exit 2, no traceback and no folder created."""

from __future__ import annotations

import os
import subprocess

import pytest
from typer.testing import CliRunner

from llmcli.cli import app
from llmcli.errors import UserError
from llmcli.experiments.sweep import MAX_POINTS, parse_grid, parse_seeds, sweep_alpha
from tests.conftest import TINY

SWEEP_CASES = [  # (arguments after `sweep-alpha CONFIG`, the flag the one line must name)
    (["--seeds", "-1"], "--seeds"),
    (["--seeds", "0,9223372036854775808"], "--seeds"),  # 2**63: one past the config's seed range
    (["--seeds", str(2**64)], "--seeds"),
    (["--alphas", "linspace:0:1:100000"], "--alphas"),
    (["--alphas", f"linspace:0:1:{MAX_POINTS + 1}"], "--alphas"),
    (["--alphas", "linspace:0:1:500", "--seeds", "0,1,2"], "--alphas"),  # 1500 points
    (["--backend", "nope"], "--backend"),
    (["--backend", "ray"], "--backend"),  # ray is not installed in the test environment
    (["--workers", "0"], "--workers"),
    (["--mode", "fast"], "--mode"),
]


def _one_error_line(res):
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    return len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in res.stderr


@pytest.mark.parametrize(("args", "flag"), SWEEP_CASES, ids=[" ".join(a) for a, _ in SWEEP_CASES])
def test_bad_sweep_arguments_are_one_line_exit_2_and_create_no_folder(args, flag, tmp_path, processed_dir):
    if args[:2] == ["--backend", "ray"] and _has_ray():
        pytest.skip("the case needs ray to be absent")
    runs = tmp_path / "runs"
    res = CliRunner().invoke(app, ["sweep-alpha", str(TINY), "--set", f"data.processed_dir={processed_dir}",
                                   "--runs-dir", str(runs), "--no-progress", *args])
    assert res.exit_code == 2, (args, res.output)
    assert _one_error_line(res) and flag in res.stderr, (args, res.stderr)
    assert not runs.exists() or not list(runs.iterdir()), "a sweep folder was left behind"


def _has_ray() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None


def test_the_seed_range_is_the_configs():
    from llmcli.config import SEED_MAX

    assert parse_seeds(f"0,{SEED_MAX}") == [0, SEED_MAX]
    for bad in ("-1", str(SEED_MAX + 1)):
        with pytest.raises(UserError, match=r"--seeds: every seed must be an integer in \[0, 2\*\*63 - 1\]"):
            parse_seeds(bad)


def test_a_huge_grid_is_refused_before_it_is_built():
    with pytest.raises(UserError, match=f"at most {MAX_POINTS} points"):
        parse_grid("linspace:0:1:1000000000")  # would take minutes and gigabytes if built first
    assert len(parse_grid(f"linspace:0:1:{MAX_POINTS}")) == MAX_POINTS


def test_library_callers_get_the_same_checks_before_any_folder(tiny, tmp_path):
    for kw in ({"seeds": [-3]}, {"backend": "nope"}, {"workers": 0}):
        with pytest.raises(UserError):
            sweep_alpha(tiny(), [0.5], runs_dir=tmp_path / "runs", progress=False, log=lambda m: None, **kw)
    with pytest.raises(UserError, match="2 values x 600 seeds = 1200 points"):
        sweep_alpha(tiny(), [0.0, 1.0], seeds=list(range(600)), runs_dir=tmp_path / "runs", log=lambda m: None)
    assert not (tmp_path / "runs").exists()


def test_a_bad_point_config_is_refused_before_the_sweep_folder_exists(tiny, tmp_path):
    cfg = tiny("objective={name: constrained, beta: 0.5}")
    with pytest.raises(UserError, match="--betas"):
        sweep_alpha(cfg, betas=[-1.0], runs_dir=tmp_path / "runs", progress=False, log=lambda m: None)
    assert not (tmp_path / "runs").exists()


def _read_only(folder):
    """Make `folder` unwritable even for root (chattr +i), else by its mode; None when neither works."""
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o500)
        return lambda: folder.chmod(0o700)
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0:
        return lambda: subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
    return None


@pytest.mark.parametrize("case", ["file", "under_a_file", "read_only", "read_only_parent"])
def test_bad_loo_dir_is_one_line_exit_2_and_nothing_is_trained(case, tmp_path, processed_dir):
    undo = None
    if case in ("file", "under_a_file"):
        (tmp_path / "f").write_text("not a folder")
        loo_dir = tmp_path / "f" if case == "file" else tmp_path / "f" / "loo"
    else:
        undo = _read_only(tmp_path / "ro")
        if undo is None:
            pytest.skip("cannot make a read-only folder here")
        loo_dir = tmp_path / "ro" if case == "read_only" else tmp_path / "ro" / "new" / "loo"
    try:
        res = CliRunner().invoke(app, ["train", str(TINY), "--set", f"data.processed_dir={processed_dir}", "--loo",
                                       "--loo-dir", str(loo_dir), "--runs-dir", str(tmp_path / "runs"),
                                       "--no-progress"])
    finally:
        if undo:
            undo()
    assert res.exit_code == 2, res.output
    assert _one_error_line(res) and "--loo-dir" in res.stderr, res.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "ro" / "new").exists()  # nothing created
