"""Checkpoints: tensors in safetensors (never pickle) plus a JSON sidecar with step, metrics,
scalar optimiser/schedule state and the sha256 of the tensor file, verified on load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from llmcli.errors import UserError
from llmcli.io import atomic_write_bytes, atomic_write_json, sha256_file


def sidecar(path: Path) -> Path:
    """The JSON sidecar of a checkpoint file."""
    return Path(path).with_suffix(".json")


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any, meta: dict[str, Any]) -> None:
    """Write `path` (.safetensors) and its sidecar atomically."""
    from safetensors.torch import save

    tensors = {f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    scalars: dict[str, dict[str, Any]] = {}
    opt = optimizer.state_dict()
    for idx, state in opt["state"].items():
        for key, val in state.items():
            if isinstance(val, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = val.detach().cpu().contiguous().clone()
            else:
                scalars.setdefault(str(idx), {})[key] = val
    tensors["rng.torch"] = torch.get_rng_state()
    atomic_write_bytes(path, save(tensors))
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    atomic_write_json(
        sidecar(path),
        {**meta, "sha256": sha256_file(path), "optim_groups": opt["param_groups"], "optim_scalars": scalars,
         "schedule": sched},
    )


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint and its sidecar; missing, corrupt or tampered files are a UserError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    if not sidecar(path).is_file():
        raise UserError(f"{sidecar(path)}: checkpoint sidecar not found")
    try:
        side = json.loads(sidecar(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{sidecar(path)}: not valid JSON ({exc})") from None
    if side.get("sha256") != sha256_file(path):
        raise UserError(f"{path}: checkpoint is corrupt or truncated (sha256 does not match its sidecar)")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable safetensors file ({exc})") from None
    return tensors, side


def restore_model(model: torch.nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Load the `model.*` tensors, naming any missing key or shape mismatch."""
    state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    own = model.state_dict()
    for key, val in own.items():
        if key not in state:
            raise UserError(f"{path}: checkpoint lacks weight {key!r} (saved from another model?)")
        if state[key].shape != val.shape:
            raise UserError(
                f"{path}: weight {key!r} has shape {tuple(state[key].shape)}, the model expects {tuple(val.shape)}"
            )
    extra = sorted(set(state) - set(own))
    if extra:
        raise UserError(f"{path}: checkpoint has weights the model lacks ({', '.join(extra[:3])})")
    model.load_state_dict(state)


def restore_training(optimizer: Any, scheduler: Any, tensors: dict[str, torch.Tensor], side: dict[str, Any]) -> None:
    """Restore optimiser, schedule and torch RNG state for an exact resume."""
    state: dict[int, dict[str, Any]] = {}
    for key, val in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = val
    for idx, scalars in side.get("optim_scalars", {}).items():
        state.setdefault(int(idx), {}).update(scalars)
    optimizer.load_state_dict({"state": state, "param_groups": side["optim_groups"]})
    scheduler.load_state_dict({**side["schedule"], "lr_lambdas": [None] * len(optimizer.param_groups)})
    torch.set_rng_state(tensors["rng.torch"])
