"""Rebuild a trained model from nothing but its run folder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmcli.errors import UserError
from llmcli.io import read_json_object


def _what_it_has(run_dir: Path) -> str:
    """The end of a missing-checkpoint message: the checkpoints the run does have, or why it has none."""
    have = sorted(p.name.removesuffix(".safetensors") for p in (run_dir / "checkpoints").glob("*.safetensors")
                  if not p.name.endswith(".prev.safetensors"))
    try:  # a compressed run (written by `llmcli compress`) has only the checkpoint it was made into
        compressed = "compression" in json.loads((run_dir / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        compressed = False
    listed = ", ".join(have)
    if compressed:
        return f"a compressed run has only the checkpoint(s) it was written with: {listed or 'none'}"
    return f"the run has only: {listed}" if have else "has it trained?"


@dataclass
class Trained:
    """A run's config, model (eval mode), tokenizer, data manifest and checkpoint sidecar."""

    cfg: Any
    model: Any
    tokenizer: Any
    manifest: dict[str, Any]
    checkpoint: dict[str, Any]


def load_trained(run_dir: Path, which: str = "best") -> Trained:
    """Load `checkpoints/<which>.safetensors` of a run into a freshly built model."""
    from llmcli.checkpoint import load_checkpoint, restore_model
    from llmcli.data.tokenizers import TextTokenizer
    from llmcli.models.model import build_model
    from llmcli.registry import registry
    from llmcli.runs import load_run_config

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    for name in ("tokenizer.json", "data_manifest.json"):
        if not (run_dir / name).is_file():
            raise UserError(f"{run_dir}: run folder is incomplete (no {name})")
    manifest = read_json_object(run_dir / "data_manifest.json", "data manifest", ("vocab_size", "label_names"))
    path = run_dir / "checkpoints" / f"{which}.safetensors"
    if not path.is_file():
        raise UserError(f"{run_dir}: no {which} checkpoint (checkpoints/{which}.safetensors); {_what_it_has(run_dir)}")
    tensors, side = load_checkpoint(path)
    model = build_model(cfg.model, vocab_size=manifest["vocab_size"], n_classes=len(manifest["label_names"]),
                        max_len=cfg.data.max_len)
    objective = registry("objective").build(cfg.objective)
    if hasattr(objective, "wrap_model"):  # e.g. the conditioned objective's FiLM layers
        objective.wrap_model(model)
        objective.prepare(model, None)
    if side.get("compression"):  # written by `llmcli compress`: int8 layers are re-quantised as recorded
        from llmcli.compress import restore_compressed

        restore_compressed(model, tensors, side["compression"], path)
    else:
        restore_model(model, tensors, path)
    model.eval()
    try:
        tokenizer = TextTokenizer.load(run_dir / "tokenizer.json")
    except Exception as exc:  # the tokenizers library raises a bare Exception on a malformed file
        raise UserError(f"{run_dir / 'tokenizer.json'}: not a readable tokenizer ({exc})") from None
    return Trained(cfg, model, tokenizer, manifest, side)
