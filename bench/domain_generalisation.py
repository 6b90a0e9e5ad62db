"""The leave-one-domain-out table on a reduced default config: test accuracy on each held-out Bible version.

Usage: python bench/domain_generalisation.py [--steps 300] [--methods erm,group_dro,coral,mldg] [--out DIR]
                                             [--set data.source.max_chapters_per_book=2 ...]
One run per (method, held-out version), trained on the other four with balanced per-domain batches; the
`best` checkpoint is chosen on the train domains' validation split (never on the held-out version).
Prints one JSON line per cell (bench "dg.<method>.<held-out>") and per method average ("dg.<method>.avg"),
the wall time of the whole table, and loo.md on stderr. A re-run with the same --out keeps finished cells.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import ROOT, emit  # noqa: E402

METHODS = "erm,group_dro,coral,mldg"


def reduced(steps: int) -> list[str]:
    """The default config, shortened: `steps` steps, two evaluations, balanced batches over the train domains."""
    return [f"train.steps={steps}", f"train.eval_every={max(steps // 2, 1)}", f"train.log_every={min(steps, 25)}",
            f"schedule.warmup_steps={min(steps // 10, 100)}", "train.sampler=balanced", "train.val_max_examples=256",
            f"data.processed_dir={ROOT / 'data' / 'processed'}"]


def main() -> None:
    """Run the table and print its figures."""
    from llmcli.config import load_config
    from llmcli.experiments.loo_table import leave_one_out, read_table

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300, help="training steps per cell (default 300)")
    ap.add_argument("--methods", default=METHODS, help=f"DG methods (default {METHODS})")
    ap.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    ap.add_argument("--out", default=None, help="table folder (default: a temporary one)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra config override")
    args = ap.parse_args()
    cfg = load_config(Path(args.config), reduced(args.steps) + args.sets)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp) / "loo"
        t = time.perf_counter()
        leave_one_out(cfg, methods, out_dir=out, log=lambda m: print(m, file=sys.stderr, flush=True))
        wall = time.perf_counter() - t
        for row in read_table(out):
            for col, val in row.items():
                if col != "method":
                    emit(f"dg.{row['method']}.{col}", float(val), "acc", steps=args.steps)
        emit("dg.table_wall", wall, "s", steps=args.steps, cells=len(methods) * (len(row) - 2))
        print((out / "loo.md").read_text(encoding="utf-8"), file=sys.stderr)


if __name__ == "__main__":
    main()
