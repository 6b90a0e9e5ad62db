"""LoRA (`train.lora`): low-rank adapters on a pretrained backbone, injected with peft, the base weights frozen.

The adapters go into the backbone's transformers model (`Backbone.hf_module()`) in place
(`peft.inject_adapter_in_model`), so parameter names stay those of the plain model plus peft's `lora_*` ones.
Trainable are the adapters and every weight llmcli added beside the transformers model (the task head, a head
llmcli created new such as hf_encoder's MLM head, an objective's layers); all of the pretrained model is frozen.
`hf_blocks` finds a transformers model's blocks (LoRA's fallback targets, and `train.freeze` layer ranges).

A LoRA run's checkpoints hold only what is not the base model (`adapter_state`: adapters and heads) and name the
base (`Backbone.pretrained_record()`: path + sha256) in their sidecar; loading rebuilds the base from its path,
checks the sha256, re-injects the adapters and loads them (`restore_lora`).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from llmcli.errors import UserError

if TYPE_CHECKING:
    from pathlib import Path

    import torch
    from torch import nn

    from llmcli.config import LoRAConfig

BASE_KEY = "base_model"  # the checkpoint sidecar's field naming the base model of a LoRA run
ADAPTER_PREFIX = "lora_"  # peft's prefix of adapter parameter names (LoraModel.prefix)


def is_lora(model: nn.Module) -> bool:
    """Whether peft adapters are injected anywhere in `model` (peft not yet imported: none can be)."""
    if "peft" not in sys.modules:
        return False
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def _linear_like() -> tuple[type, ...]:
    """The layer types peft's LoRA adapts as a matrix: torch Linear and transformers' Conv1D (GPT-2)."""
    from torch import nn

    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return (nn.Linear,)
    return nn.Linear, Conv1D


def hf_blocks(hf: nn.Module, field: str = "train.freeze") -> nn.ModuleList:
    """The transformer blocks of a transformers model, bottom first: the shallowest list of layers of one class
    (with `config.num_hidden_layers` entries where the config has it), e.g. `model.layers` (Llama, Qwen),
    `transformer.h` (GPT-2), `encoder.layer` (BERT), with or without the task wrapper around them. Both layer
    ranges (`train.freeze`) and LoRA's fallback targets use it."""
    from torch import nn

    n = getattr(getattr(hf, "config", None), "num_hidden_layers", None)
    found = [(name.count("."), name, m) for name, m in hf.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) and len({type(b) for b in m}) == 1 and n in (None, len(m))]
    if not found:
        raise UserError(f"{field}: cannot find the blocks of this {type(hf).__name__} (no list of "
                        f"{n if n is not None else 'identical'} layers in it)")
    return min(found, key=lambda x: x[:2])[2]


def block_linears(hf: nn.Module) -> list[str]:
    """Full names of the Linear (and Conv1D) layers inside the transformer blocks of `hf`, in order."""
    kinds = _linear_like()
    where = {id(m): n for n, m in hf.named_modules()}
    blocks = hf_blocks(hf, "train.lora.target_modules")
    return [f"{where[id(block)]}.{n}" for block in blocks for n, m in block.named_modules() if isinstance(m, kinds)]


def resolve_targets(hf: nn.Module, asked: str | list[str]) -> tuple[list[str], str]:
    """The modules to adapt and how they were chosen: the names given (each must match a Linear layer), or for
    `auto` peft's default for the architecture where peft has one, else every Linear layer inside the blocks."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    model_type = getattr(hf.config, "model_type", None)
    if asked == "auto" and model_type in DEFAULTS:
        return list(DEFAULTS[model_type]), f"peft's default for {model_type}"
    if asked == "auto":
        return block_linears(hf), f"every Linear layer inside the blocks (peft has no default for {model_type})"
    kinds = _linear_like()
    linears = [n for n, m in hf.named_modules() if isinstance(m, kinds)]
    for target in asked:
        if not any(n == target or n.endswith("." + target) for n in linears):
            leaves = sorted({n.rsplit(".", 1)[-1] for n in linears})
            raise UserError(f"train.lora.target_modules: {target!r} names no Linear layer of this model "
                            f"({model_type}); its Linear layers: {', '.join(leaves)}")
    return list(asked), "as given"


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> str:
    """Inject adapters into `model.backbone`'s transformers model and freeze its base weights; what was adapted.

    Refused (UserError) for a backbone trained from scratch: there is no base model to adapt or to name."""
    backbone = model.backbone
    hf = backbone.hf_module()
    if hf is None or backbone.pretrained_record() is None:
        raise UserError("train.lora: LoRA adapts a pretrained backbone, and this model is trained from scratch "
                        "(use model.name hf_causal or hf_encoder with model.path, or set train.lora=null)")
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise UserError("train.lora: needs the peft package: pip install 'llmcli[pretrained]'") from None
    targets, how = resolve_targets(hf, cfg.target_modules)
    kinds = _linear_like()
    conv1d = any(isinstance(m, kinds[1:]) for n, m in hf.named_modules()
                 if any(n == t or n.endswith("." + t) for t in targets))
    peft_cfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                          bias="none", fan_in_fan_out=conv1d)  # Conv1D stores its weight transposed
    try:
        inject_adapter_in_model(peft_cfg, hf)
    except ValueError as exc:
        raise UserError(f"train.lora: peft cannot adapt {targets} ({str(exc).splitlines()[0]})") from None
    for name, p in hf.named_parameters():  # what peft does for bias="none", stated here: only adapters train
        p.requires_grad_(ADAPTER_PREFIX in name)
    return f"train: LoRA r={cfg.r} alpha={cfg.alpha:g} on {', '.join(targets)} ({how})"


def trainable_summary(model: nn.Module) -> str:
    """How many of the model's (distinct) parameters train."""
    unique = list({id(p): p for p in model.parameters()}.values())
    trainable = sum(p.numel() for p in unique if p.requires_grad)
    return f"{trainable:,} of {sum(p.numel() for p in unique):,} parameters trainable"


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state a LoRA run saves: every entry of `model.state_dict()` that is not a base-model tensor (the
    adapters, the heads and any other layer llmcli added); a tied head that is a base matrix is left out."""
    hf = model.backbone.hf_module()
    base = {id(t) for n, t in (*hf.named_parameters(remove_duplicate=False), *hf.named_buffers(remove_duplicate=False))
            if ADAPTER_PREFIX not in n}
    return {k: v for k, v in model.state_dict(keep_vars=True).items() if id(v) not in base}


def sidecar_fields(model: nn.Module) -> dict[str, Any]:
    """What a LoRA checkpoint's sidecar adds: the base model it needs (path + sha256); nothing for other runs."""
    if not is_lora(model):
        return {}
    return {BASE_KEY: model.backbone.pretrained_record(), "adapters_only": True}


def _saved_base(cfg: LoRAConfig | None, side: dict[str, Any], path: Path) -> dict[str, Any] | None:
    """The base model a checkpoint's sidecar names (None for a run without LoRA), checked against the config."""
    saved = side.get(BASE_KEY)
    if cfg is None:
        if saved:
            raise UserError(f"{path}: holds LoRA adapters but the run's config.yaml has train.lora=null "
                            "(the config was edited?)")
        return None
    if not isinstance(saved, dict) or not all(isinstance(saved.get(k), str) for k in ("path", "sha256")):
        raise UserError(f"{path.with_suffix('.json')}: field {BASE_KEY!r} (the base model a LoRA run needs) "
                        "is missing or not an object with a path and a sha256")
    return saved


def _same_base(saved: dict[str, Any], now: dict[str, Any] | None, path: Path) -> None:
    if now is None or now["sha256"] != saved["sha256"]:
        found = now["sha256"][:16] + "..." if now else "no pretrained model"
        raise UserError(f"{path}: the base model {saved['path']} changed since this LoRA run was trained "
                        f"(sha256 {found}, the run needs {saved['sha256'][:16]}...); restore that model file")


def check_base(cfg: LoRAConfig | None, side: dict[str, Any], path: Path) -> None:
    """Before the model is built: the base model a LoRA checkpoint names still has its sha256 (else one line)."""
    from llmcli.models.pretrained import resolve

    saved = _saved_base(cfg, side, path)
    if saved is not None:
        _same_base(saved, resolve(saved["path"], f"{path.with_suffix('.json')}: {BASE_KEY}.path").record(), path)


def restore_lora(model: nn.Module, cfg: LoRAConfig | None, side: dict[str, Any], path: Path) -> None:
    """Before a LoRA checkpoint is loaded into the rebuilt model: check that its base is the one the run was
    trained on, then inject the adapters (as training did) so that the tensors have somewhere to go."""
    saved = _saved_base(cfg, side, path)
    if saved is not None:
        _same_base(saved, model.backbone.pretrained_record(), path)
        apply_lora(model, cfg)


def merge_lora(model: nn.Module) -> int:
    """Merge every adapter into its base layer and drop the adapter (peft's per-layer `merge` + `get_base_layer`,
    as `merge_and_unload` does); the model is then the plain architecture. Returns the layers merged."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    hf = model.backbone.hf_module()
    layers = [(n, m) for n, m in hf.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, layer in layers:
        layer.merge()
        parent, _, leaf = name.rpartition(".")
        setattr(hf.get_submodule(parent), leaf, layer.get_base_layer())
    return len(layers)
