"""Another data config's records, tokenized with a run's own tokenizer: scoring a model on a corpus it never saw."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmcli.errors import UserError


def tokenized_with_run(config: Path, run_dir: Path, trained: Any, *, log: Any = print) -> tuple[Any, dict[str, int]]:
    """ProcessedData of `config`'s data through RUN_DIR/tokenizer.json, cut to the run's max_len, and per split
    (val, test) the number of its groups that the run's own split put into training.

    The label set must be the run's (same names, same order): the classification head knows no other.
    """
    from llmcli.config import load_config
    from llmcli.data.dataset import ProcessedData
    from llmcli.data.preprocess import preprocess, source_configs
    from llmcli.registry import registry

    other = load_config(Path(config))
    data_cfg = other.data.model_copy(update={"max_len": trained.cfg.data.max_len})
    sources = [registry("source").build(s) for s in source_configs(data_cfg)]
    names = label_names(sources)
    want = trained.manifest["label_names"]
    if names != list(want):  # checked before anything is written
        raise UserError(f"{config}: data.source gives labels {names}, but the run "
                        f"{run_dir} was trained on {want}; --data needs the same label set")
    data = ProcessedData(preprocess(data_cfg, log=log, tokenizer_path=Path(run_dir) / "tokenizer.json"))
    records = (r for src in sources for r in src.records())
    return data, trained_on(records, data_cfg.split, trained.cfg.data.split)


def label_names(sources: list[Any]) -> list[str]:
    """The class names preprocess would give these sources (declared order, then sorted extras; or 0..max)."""
    seen = {r.label for src in sources for r in src.records() if r.label is not None}
    if any(isinstance(x, int) for x in seen):
        return [str(i) for i in range(max(int(x) for x in seen) + 1)]
    declared = next((list(src.label_names) for src in sources if src.label_names), [])
    return declared + sorted(seen - set(declared))


def trained_on(records: Any, split: Any, run_split: Any) -> dict[str, int]:
    """Per split of `split` (val, test): its groups that `run_split` assigns to train (the run has seen them)."""
    from llmcli.data.preprocess import split_of_group

    groups = {r.group for r in records}
    out = {"val": set(), "test": set()}
    for g in groups:
        mine = split_of_group(g, split.seed, split.val, split.test)
        if mine and split_of_group(g, run_split.seed, run_split.val, run_split.test) == 0:
            out[("val", "test")[mine - 1]].add(g)
    return {k: len(v) for k, v in out.items()}
