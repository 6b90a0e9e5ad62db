"""sweep-alpha figures on the default config: exact sweep wall vs one run, and the conditioned mode.

Usage: python bench/sweep.py [--points 8] [--steps N]   (one JSON line per figure)
  sweep_vs_one_run:      wall of an exact sweep with the default workers / wall of one point alone
  sweep_point_vs_one_run: a sweep point's median wall (on its share of the cores) / one point alone (all cores)
  sweep_floor_vs_one_run: the points' core-seconds (wall x threads, summed) / cores / one point alone: the
                          ratio of a sweep packed perfectly onto the cores with no overhead of its own;
                          what the sweep measures above it is its scheduling and process cost
  conditioned_vs_one_run: wall of the conditioned (YOTO) run's training / wall of one point alone
  conditioned_hv_share:  hypervolume of the conditioned front / the exact front's (same reference point)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import ROOT, emit  # noqa: E402


def main() -> None:
    import yaml

    from llmcli.config import load_config
    from llmcli.experiments import sweep as sw

    ap = argparse.ArgumentParser()
    ap.add_argument("--points", type=int, default=8)
    ap.add_argument("--steps", type=int, default=None, help="override train.steps (quick checks)")
    args = ap.parse_args()
    quiet = {"progress": False, "log": lambda m: None}
    grid = [round(i / (args.points - 1), 6) for i in range(args.points)]
    with tempfile.TemporaryDirectory() as tmp:
        sets = [f"data.processed_dir={ROOT / 'data' / 'processed'}"]
        if args.steps:
            sets += [f"train.steps={args.steps}", f"train.eval_every={args.steps}"]
        cfg = load_config(ROOT / "configs" / "default.yaml", sets)
        from llmcli.data.preprocess import preprocess

        preprocess(cfg.data, log=lambda m: None)  # not part of any timing

        t = time.perf_counter()
        one_dir = sw.sweep_alpha(cfg, [0.5], workers=1, runs_dir=f"{tmp}/one", **quiet)
        one = time.perf_counter() - t
        one_train = json.loads((one_dir / "alpha-0.5-seed0" / "status.json").read_text())["train_wall_s"]
        emit("sweep_one_point_wall", one, "s", steps=cfg.train.steps, train_wall_s=one_train)

        t = time.perf_counter()
        exact = sw.sweep_alpha(cfg, grid, runs_dir=f"{tmp}/exact", **quiet)
        wall = time.perf_counter() - t
        emit("sweep_exact_wall", wall, "s", points=len(grid), workers=sw.default_workers(len(grid)))
        emit("sweep_vs_one_run", wall / one, "x", points=len(grid), target=4.5)
        state = json.loads((exact / "sweep.json").read_text())
        walls, core_s = [], 0.0
        for a in state["grid"]:
            for seed in state["seeds"]:
                pdir = exact / sw.point_name("alpha", a, seed)
                w = json.loads((pdir / "status.json").read_text())["wall_s"]
                walls.append(w)
                core_s += w * yaml.safe_load((pdir / "config.yaml").read_text())["train"]["threads"]
        point = statistics.median(walls)
        plan = sw.thread_plan(len(walls), sw.default_workers(len(walls)), os.cpu_count() or 1)
        emit("sweep_point_vs_one_run", point / one, "x", point_wall_s=round(point, 2), threads=sorted(set(plan)))
        emit("sweep_floor_vs_one_run", core_s / (os.cpu_count() or 1) / one, "x", core_s=round(core_s, 1))

        cond = sw.sweep_alpha(cfg, grid, mode="conditioned", compare=exact, runs_dir=f"{tmp}/cond", **quiet)
        status = json.loads((cond / "conditioned" / "status.json").read_text())
        emit("conditioned_train_wall", status["wall_s"], "s")
        emit("conditioned_train_vs_one_run_train", status["wall_s"] / one_train, "x", target=1.3)
        emit("conditioned_eval_wall", status["eval_wall_s"], "s", points=len(grid))
        emit("conditioned_total_vs_one_run", (status["wall_s"] + status["eval_wall_s"]) / one, "x")

        fronts = []
        for d in (exact, cond):
            agg = sw.aggregate(sw.collect_rows(d, json.loads((d / "sweep.json").read_text())))
            fronts.append(agg)
        ref = sw.reference_point(fronts)
        hv = []
        for agg in fronts:
            pts = [(a["lm_loss_in"], a["task_loss_in"]) for a in agg]
            hv.append(sw.hypervolume([p for p, f in zip(pts, sw.pareto_mask(pts)) if f], ref))
        emit("exact_hypervolume", hv[0], "", ref=list(ref))
        emit("conditioned_hypervolume", hv[1], "", ref=list(ref))
        emit("conditioned_hv_share", hv[1] / hv[0] if hv[0] else 0.0, "fraction", target=0.95)
        for d in (exact, cond):
            print((d / "summary.md").read_text(), file=sys.stderr)


if __name__ == "__main__":
    main()
