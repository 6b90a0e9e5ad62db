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
    if not side.get(RECORD):
        from llmcli.models.lora import check_base

        check_base(cfg.train.lora, side, path)  # a LoRA run's base model: its sha256, before it is loaded
    model = build_model(cfg.model, vocab_size=manifest["vocab_size"], n_classes=len(manifest["label_names"]),
                        max_len=cfg.data.max_len)
    objective = registry("objective").build(cfg.objective)
    objective.wrap_model(model)  # e.g. the conditioned objective's FiLM layers (a no-op for the others)
    objective.prepare(model, None)
    if side.get(RECORD):  # written by `llmcli compress`: int8 layers are re-quantised as recorded
        restore_compressed(model, tensors, side[RECORD], path)
    else:
        from llmcli.models.lora import restore_lora

        restore_lora(model, cfg.train.lora, side, path)  # a LoRA run: the rebuilt base checked, adapters injected
        restore_model(model, tensors, path)
    model.eval()
    return Trained(cfg, model, run_tokenizer(run_dir, manifest), manifest, side, which)


def run_tokenizer(run_dir: Path, manifest: dict[str, Any]) -> Any:
    """The run's tokenizer.json with its special ids (`TextTokenizer.load`), checked against the ids the data
    was written with (data_manifest.json): a pretrained model's own ids, or 0/1/2 for a trained tokenizer."""
    from llmcli.data.tokenizers import TextTokenizer

    path = Path(run_dir) / "tokenizer.json"
    try:
        tok = TextTokenizer.load(path)
    except Exception as exc:  # the tokenizers library raises a bare Exception on a malformed file
        raise UserError(f"{path}: not a readable tokenizer ({exc})") from None
    ids = {"pad_id": tok.pad_id, "bos_id": tok.bos_id, "eos_id": tok.eos_id, "vocab_size": tok.vocab_size}
    differ = [f"{k} {manifest[k]} vs {v}" for k, v in ids.items() if k in manifest and manifest[k] != v]
    if differ:
        raise UserError(f"{path}: does not match the run's data_manifest.json ({', '.join(differ)}); the run folder "
                        "was put together from different runs")
    return tok
