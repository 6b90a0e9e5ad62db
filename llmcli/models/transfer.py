"""Transfer learning: start from another run's backbone and LM head (`train.init_from`), LoRA adapters on a
pretrained backbone (`train.lora`, llmcli/models/lora.py), freeze parts or layer ranges (`train.freeze`)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

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


def _blocks(backbone: nn.Module, item: str) -> tuple[nn.Module, list[nn.Module]]:
    """(the module owning the blocks, the blocks): the transformers model's layer list, else the backbone's own."""
    from llmcli.models.lora import hf_blocks

    hf = backbone.hf_module()
    if hf is not None:
        return hf, list(hf_blocks(hf))
    blocks = list(backbone.residual_blocks())
    if not blocks:
        raise UserError(f"train.freeze: {item!r}: this backbone ({type(backbone).__name__}) has no blocks to freeze "
                        "by range (layer ranges need hf_causal, hf_encoder or gpt)")
    return backbone, blocks


def layer_range(model: nn.Module, item: str) -> list[nn.Parameter]:
    """Parameters of a layer range: `blocks:A-B` (0-based, inclusive), or `bottom:K` (the embeddings, i.e. every
    weight registered below the first block, and blocks 0..K-1: only the top blocks then train)."""
    owner, blocks = _blocks(model.backbone, item)
    kind, _, rest = item.partition(":")
    lo, hi = (int(x) for x in rest.split("-")) if kind == "blocks" else (0, int(rest) - 1)
    if hi >= len(blocks):
        raise UserError(f"train.freeze: {item!r} goes beyond the model's blocks: it has {len(blocks)} "
                        f"(blocks:0-{len(blocks) - 1}, bottom:0 to bottom:{len(blocks)})")
    params = [p for b in blocks[lo : hi + 1] for p in b.parameters()]
    if kind == "bottom":
        first = next(blocks[0].parameters(), None)
        for p in owner.parameters():  # registration order: the embeddings come before the blocks
            if p is first:
                break
            params.append(p)
    return params


def freeze(model: nn.Module, names: list[str]) -> None:
    """Stop gradients into the named parts or layer ranges (a tied LM head freezes with the embedding: one matrix)."""
    parts = model_parts(model)
    for name in names:
        params = layer_range(model, name) if ":" in name else parts.get(name)
        if params is None:
            raise UserError(f"train.freeze: this model has no part {name!r} (parts: {', '.join(sorted(parts))}; "
                            "layer ranges: blocks:A-B, bottom:K)")
        for p in params:
            p.requires_grad_(False)


def _checkpoint(run: Path) -> Path:
    """The run's default checkpoint (best if it has one, else last), as every command chooses it."""
    from llmcli.runs import choose_checkpoint

    try:
        return run / "checkpoints" / f"{choose_checkpoint(run, None)}.safetensors"
    except UserError as exc:
        raise UserError(f"train.init_from: {exc}") from None


def _source_weights(run: Path) -> tuple[Path, dict[str, Any]]:
    """The default checkpoint of `run` and its model tensors; a LoRA run (adapters only) cannot be a source."""
    from llmcli.models.checkpoint import load_checkpoint

    path = _checkpoint(run)
    tensors, side = load_checkpoint(path)
    if side.get("adapters_only"):
        base = side.get("base_model")
        over = base.get("path") if isinstance(base, dict) else None
        raise UserError(f"train.init_from: {run} is a LoRA run (adapters only, over {over or 'a base model'}): "
                        "start from that base model (model.path) instead")
    return path, {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}


def init_from(model: nn.Module, run_dir: str | Path, data: ProcessedData) -> Path:
    """Load backbone + LM head weights of `run_dir` into `model`; tokenizer and shapes must match."""
    run = Path(run_dir)
    tok = run / "tokenizer.json"
    if not tok.is_file():
        raise UserError(f"train.init_from: {run} is not a run folder (no tokenizer.json)")
    if hashlib.sha256(tok.read_bytes()).hexdigest() != data.manifest["tokenizer_sha256"]:
        raise UserError(f"train.init_from: {run} was trained with a different tokenizer than this run's data "
                        "(use the same data.source/tokenizer/split/train_domains/lm_only_domains)")
    path, theirs = _source_weights(run)
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


def apply_transfer(model: nn.Module, train_cfg: TrainConfig, data: ProcessedData, load: bool = True) -> str | None:
    """init_from (unless `load` is False, as on resume), LoRA, then freeze, before the optimiser is built; the
    LoRA summary line (what was adapted, how many parameters train), if any."""
    from llmcli.models.lora import apply_lora, trainable_summary

    if train_cfg.init_from and load:
        init_from(model, train_cfg.init_from, data)
    note = apply_lora(model, train_cfg.lora) if train_cfg.lora is not None else None
    if train_cfg.freeze:  # after LoRA: a range then freezes its blocks' adapters too
        freeze(model, train_cfg.freeze)
    return f"{note}: {trainable_summary(model)}" if note else None
