"""`llmcli sweep` (the Optuna search) and the trackers against what a user would run without them, in one run.

Usage: python bench/search.py [--trials 4] [--steps N] [--parts search,trackers]   (one JSON line per figure)
  search_wall_per_trial:        a grid search over optim.lr, one worker on all cores, wall / trials
  search_trial_own_wall:        the median trial's own wall (status.json wall_s: train + val + test eval in its worker)
  search_share_per_trial:       (search wall - the trials' own walls) / trials: worker start, Optuna, study, report
  plain_train_wall:             the median `llmcli train` of the same values, as commands one after the other
  plain_train_eval_wall:        the median `llmcli train` + `eval --split val` + `eval` (what a trial does), as commands
  search_vs_plain_train_eval:   search wall per trial / plain train + evals
  trackers_ms_per_step:         (train wall with train.loggers=[tensorboard, mlflow] - without) / steps, in-process,
                                the two interleaved (needs `make setup-track`)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import ROOT, emit  # noqa: E402

TINY = ROOT / "configs" / "tiny.yaml"


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Wall seconds of one command (it must succeed) and its last stdout line."""
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return time.perf_counter() - t, out.stdout.strip().splitlines()[-1]


def search_part(tmp: Path, sets: list[str], trials: int, threads: int) -> None:
    """The search and the same runs as plain commands, one after the other on the same cores."""
    llmcli = [sys.executable, "-m", "llmcli"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    values = [f"{0.001 * (i + 1):g}" for i in range(trials)]
    flags = [a for s in [*sets, f"train.threads={threads}"] for a in ("--set", s)]
    wall, folder = timed([*llmcli, "sweep", str(TINY), *flags, "--param", f"optim.lr=grid:{','.join(values)}",
                          "--objective", "in_domain.acc:max", "--sampler", "grid", "--workers", "1",
                          "--runs-dir", str(tmp / "search")], env)
    own = [json.loads(p.read_text())["wall_s"] for p in sorted(Path(folder).glob("trial-*/status.json"))]
    train, whole = [], []
    for v in values:
        t_train, run = timed([*llmcli, "train", str(TINY), *flags, "--set", f"optim.lr={v}", "--no-progress",
                              "--runs-dir", str(tmp / "plain")], env)
        t_val, _ = timed([*llmcli, "eval", run, "--split", "val", "--no-write"], env)
        t_test, _ = timed([*llmcli, "eval", run], env)
        train.append(t_train)
        whole.append(t_train + t_val + t_test)
    common = {"trials": trials, "threads": threads, "config": "configs/tiny.yaml", "sets": sets}
    emit("search_wall_per_trial", wall / trials, "s", **common)
    emit("search_trial_own_wall", statistics.median(own), "s", **common)
    emit("search_share_per_trial", (wall - sum(own)) / trials, "s", **common)
    emit("plain_train_wall", statistics.median(train), "s", **common)
    emit("plain_train_eval_wall", statistics.median(whole), "s", **common)
    emit("search_vs_plain_train_eval", (wall / trials) / statistics.median(whole), "x", **common)


def trackers_part(tmp: Path, sets: list[str], repeats: int) -> None:
    """Training with both trackers against none, interleaved, in this process (torch imported once)."""
    from llmcli.config import load_config
    from llmcli.training.engine import train

    # llmcli's own store: sqlite + artifacts beside the (temporary) runs folder. A tracking URI set here would put
    # MLflow's artifacts in ./mlruns of the working directory.
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    quiet = {"progress": False, "log": lambda m: None}
    walls: dict[str, list[float]] = {"none": [], "both": []}
    steps = load_config(TINY, sets).train.steps
    for i in range(repeats + 1):  # the first pair warms up (imports, the processed data, MLflow's schema)
        for side, loggers in (("none", "[]"), ("both", "[tensorboard, mlflow]")):
            cfg = load_config(TINY, [*sets, f"train.loggers={loggers}"])
            t = time.perf_counter()
            train(cfg, runs_dir=tmp / f"trackers-{side}", **quiet)
            if i:
                walls[side].append(time.perf_counter() - t)
    none, both = statistics.median(walls["none"]), statistics.median(walls["both"])
    emit("trackers_ms_per_step", 1000 * (both - none) / steps, "ms", repeats=repeats, steps=steps,
         wall_none_s=round(none, 3), wall_both_s=round(both, 3))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--steps", type=int, default=None, help="override train.steps (quick checks)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=5, help="tracker runs per side")
    ap.add_argument("--parts", default="search,trackers")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        sets = [f"data.processed_dir={ROOT / 'data' / 'processed'}"]
        if args.steps:
            sets += [f"train.steps={args.steps}", f"train.eval_every={args.steps}", f"train.log_every={args.steps}"]
        from llmcli.config import load_config
        from llmcli.data.preprocess import preprocess

        preprocess(load_config(TINY, sets).data, log=lambda m: None)  # not part of any timing
        if "search" in parts and installed("search", "optuna"):
            search_part(Path(tmp), sets, args.trials, args.threads)
        if "trackers" in parts and installed("track", "tensorboard", "mlflow"):
            trackers_part(Path(tmp), sets, args.repeats)


def installed(extra: str, *modules: str) -> bool:
    """Whether an optional extra's modules are there; if not, one line on stderr and that part is skipped."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        print(f"# skipped: {', '.join(missing)} not installed (make setup-{extra})", file=sys.stderr)
    return not missing


if __name__ == "__main__":
    main()
