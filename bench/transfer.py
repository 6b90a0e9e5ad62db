"""Transfer figures: pretrain -> finetune vs from-scratch alpha = 0, and data.lm_only_domains [wyc] vs without.

Usage: python bench/transfer.py [--steps N]   (N shortens every training; default: the configs' own lengths)
Prints JSON lines `transfer.<variant>.<metric>` (test split, best checkpoint) and a table on stderr.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import ROOT, emit  # noqa: E402


def _train_eval(config: str, sets: list[str], steps: int | None, runs: Path) -> tuple[Path, dict[str, float]]:
    import numpy as np

    from llmcli.config import load_config
    from llmcli.evaluation.evaluate import evaluate
    from llmcli.training.engine import train

    sets = [f"data.processed_dir={ROOT / 'data' / 'processed'}", *sets]
    if steps:
        sets += [f"train.steps={steps}", f"train.eval_every={steps}", f"train.log_every={min(steps, 25)}",
                 f"schedule.warmup_steps={min(steps // 10, 100)}"]
    t = time.perf_counter()
    run = train(load_config(ROOT / "configs" / config, sets), runs_dir=runs, progress=False, log=lambda m: None)
    wall = time.perf_counter() - t
    res = evaluate(run, log=lambda m: None)
    dom, ind, ood = res["domains"], res["in_domain"], res["out_of_domain"]
    return run, {
        "acc_in": float(np.mean([dom[d]["acc"] for d in ind])),
        "acc_ood": float(np.mean([dom[d]["acc"] for d in ood])),
        "gap_acc": res["gap"]["mean"]["gap_acc"],
        "acc_wyc": dom["wyc"]["acc"],
        "gap_acc_wyc": res["gap"]["wyc"]["gap_acc"],
        "ppl_in": float(np.mean([dom[d]["ppl"] for d in ind])),
        "wall_s": wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=None, help="train steps of every run (default: the configs')")
    args = ap.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp)
        pre, rows["pretrain_alpha1"] = _train_eval("pretrain.yaml", [], args.steps, runs)
        _, rows["finetune_alpha0"] = _train_eval("finetune.yaml", [f"train.init_from={pre}"], args.steps, runs)
        _, rows["scratch_alpha0"] = _train_eval("finetune.yaml", [], args.steps, runs)
        _, rows["default"] = _train_eval("default.yaml", [], args.steps, runs)
        _, rows["default_lm_only_wyc"] = _train_eval("default.yaml", ["data.lm_only_domains=[wyc]"], args.steps, runs)
    for name, r in rows.items():
        for metric, value in r.items():
            unit = {"ppl_in": "ppl", "wall_s": "s"}.get(metric, "acc")
            emit(f"transfer.{name}.{metric}", value, unit, steps=args.steps or "config")
    cols = list(next(iter(rows.values())))
    print(f"{'variant':<22}" + "".join(f"{c:>12}" for c in cols), file=sys.stderr)
    for name, r in rows.items():
        print(f"{name:<22}" + "".join(f"{r[c]:12.3f}" for c in cols), file=sys.stderr)


if __name__ == "__main__":
    main()
