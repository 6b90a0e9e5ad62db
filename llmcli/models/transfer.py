"""Transfer learning: start from another run's backbone and LM head (`train.init_from`), freeze parts (`train.freeze`)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from llmcli.errors import UserError

if TYPE_CHECKING:
    from llmcli.config import TrainConfig
    from llmcli.data.dataset import ProcessedData

TRANSFERRED = ("backbone.", "lm_head.")  # the classification head always starts fresh


def model_parts(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Freezable parts by name."""
    parts = {"backbone": list(model.backbone.parameters()), "lm_head": list(model.lm_head.parameters()),
             "cls_head": list(model.cls_head.parameters())}
    parts["embedding"] = list(model.backbone.embed.parameters())  # every backbone has one (llmcli.contracts.Backbone)
    return parts


def freeze(model: nn.Module, names: list[str]) -> None:
    """Stop gradients into the named parts (a tied LM head freezes with the embedding: one matrix)."""
    parts = model_parts(model)
    for name in names:
        if name not in parts:
            raise UserError(f"train.freeze: this model has no part {name!r} (parts: {', '.join(sorted(parts))})")
        for p in parts[name]:
            p.requires_grad_(False)


def _checkpoint(run: Path) -> Path:
    """The run's default checkpoint (best if it has one, else last), as every command chooses it."""
    from llmcli.runs import choose_checkpoint

    try:
        return run / "checkpoints" / f"{choose_checkpoint(run, None)}.safetensors"
    except UserError as exc:
        raise UserError(f"train.init_from: {exc}") from None


def init_from(model: nn.Module, run_dir: str | Path, data: ProcessedData) -> Path:
    """Load backbone + LM head weights of `run_dir` into `model`; tokenizer and shapes must match."""
    from llmcli.models.checkpoint import load_checkpoint

    run = Path(run_dir)
    tok = run / "tokenizer.json"
    if not tok.is_file():
        raise UserError(f"train.init_from: {run} is not a run folder (no tokenizer.json)")
    if hashlib.sha256(tok.read_bytes()).hexdigest() != data.manifest["tokenizer_sha256"]:
        raise UserError(f"train.init_from: {run} was trained with a different tokenizer than this run's data "
                        "(use the same data.source/tokenizer/split/train_domains/lm_only_domains)")
    path = _checkpoint(run)
    tensors, _ = load_checkpoint(path)
    theirs = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    ours = {k: v for k, v in model.state_dict().items() if k.startswith(TRANSFERRED)}
    for key, val in ours.items():
        if key not in theirs:
            raise UserError(f"train.init_from: {path} lacks weight {key!r} (a different model: compare its config.yaml)")
        if theirs[key].shape != val.shape:
            raise UserError(f"train.init_from: weight {key!r} has shape {tuple(theirs[key].shape)} in {path}, "
                            f"this model expects {tuple(val.shape)}")
    extra = sorted(k for k in theirs if k.startswith(TRANSFERRED) and k not in ours)
    if extra:
        raise UserError(f"train.init_from: {path} has weights this model lacks ({', '.join(extra[:3])})")
    model.load_state_dict({k: theirs[k] for k in ours}, strict=False)
    return path


def apply_transfer(model: nn.Module, train_cfg: TrainConfig, data: ProcessedData, load: bool = True) -> None:
    """init_from (unless `load` is False, as on resume) then freeze, before the optimiser is built."""
    if train_cfg.init_from and load:
        init_from(model, train_cfg.init_from, data)
    if train_cfg.freeze:
        freeze(model, train_cfg.freeze)
