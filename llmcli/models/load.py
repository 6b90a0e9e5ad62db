"""Rebuild a trained model from nothing but its run folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmcli.errors import UserError
from llmcli.files import read_json_object


@dataclass
class Trained:
    """A run's config, model (eval mode), tokenizer, data manifest, checkpoint sidecar and which checkpoint it is."""

    cfg: Any
    model: Any
    tokenizer: Any
    manifest: dict[str, Any]
    checkpoint: dict[str, Any]
    which: str


def load_trained(run_dir: Path, which: str | None = None) -> Trained:
    """Load `checkpoints/<which>.safetensors` of a run into a freshly built model (None: `runs.choose_checkpoint`'s
    default, best if the run has it, else last; the one chosen is `Trained.which`)."""
    from llmcli.data.tokenizers import TextTokenizer
    from llmcli.models.checkpoint import load_checkpoint, restore_model
    from llmcli.models.formats import RECORD, restore_compressed
    from llmcli.models.model import build_model
    from llmcli.registry import registry
    from llmcli.runs import choose_checkpoint, load_run_config

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    for name in ("tokenizer.json", "data_manifest.json"):
        if not (run_dir / name).is_file():
            raise UserError(f"{run_dir}: run folder is incomplete (no {name})")
    manifest = read_json_object(run_dir / "data_manifest.json", "data manifest", ("vocab_size", "label_names"))
    which = choose_checkpoint(run_dir, which)  # after the folder's own checks: a missing folder is said as such
    path = run_dir / "checkpoints" / f"{which}.safetensors"
    tensors, side = load_checkpoint(path)
    model = build_model(cfg.model, vocab_size=manifest["vocab_size"], n_classes=len(manifest["label_names"]),
                        max_len=cfg.data.max_len)
    objective = registry("objective").build(cfg.objective)
    objective.wrap_model(model)  # e.g. the conditioned objective's FiLM layers (a no-op for the others)
    objective.prepare(model, None)
    if side.get(RECORD):  # written by `llmcli compress`: int8 layers are re-quantised as recorded
        restore_compressed(model, tensors, side[RECORD], path)
    else:
        restore_model(model, tensors, path)
    model.eval()
    try:
        tokenizer = TextTokenizer.load(run_dir / "tokenizer.json")
    except Exception as exc:  # the tokenizers library raises a bare Exception on a malformed file
        raise UserError(f"{run_dir / 'tokenizer.json'}: not a readable tokenizer ({exc})") from None
    return Trained(cfg, model, tokenizer, manifest, side, which)
