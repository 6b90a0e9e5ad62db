"""Checkpoints: tensors in safetensors (never pickle) plus a JSON sidecar with step, metrics,
scalar optimiser/schedule state and the sha256 of the tensor file, verified on load.

A LoRA run's checkpoint holds only the model state that is not its base model (adapters and heads,
`llmcli.models.lora.adapter_state`) and names the base in its sidecar (`base_model`: path + sha256).

The tensor file and its sidecar are two atomic writes. While a checkpoint is replaced, the old tensor
file stays reachable as `<name>.prev.safetensors` (a hard link), so a crash between the two writes
leaves a pair that still matches: the old sidecar and the `.prev` tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch

from llmcli.errors import UserError
from llmcli.files import atomic_write_bytes, atomic_write_json, sha256_file


def sidecar(path: Path) -> Path:
    """The JSON sidecar of a checkpoint file."""
    return Path(path).with_suffix(".json")


def previous(path: Path) -> Path:
    """Where the replaced tensor file stays while a new checkpoint is written."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _keep_previous(path: Path) -> None:
    """Make `previous(path)` a hard link to the current tensor file (a copy where links are not supported)."""
    if not path.is_file():
        return
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copyfile(path, tmp)
        os.replace(tmp, previous(path))
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise UserError(f"{path.parent}: cannot write a checkpoint here ({exc.strerror})") from None


def saved_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model state a checkpoint holds: all of it, or for a LoRA model what is not its base model."""
    from llmcli.models.lora import adapter_state, is_lora

    return adapter_state(model) if is_lora(model) else model.state_dict()


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any, meta: dict[str, Any]) -> None:
    """Write `path` (.safetensors) and its sidecar atomically, the pair consistent at every instant."""
    from safetensors.torch import save

    from llmcli.models.lora import sidecar_fields

    tensors = {f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in saved_state(model).items()}
    scalars: dict[str, dict[str, Any]] = {}
    opt = optimizer.state_dict()
    for idx, state in opt["state"].items():
        for key, val in state.items():
            if isinstance(val, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = val.detach().cpu().contiguous().clone()
            else:
                scalars.setdefault(str(idx), {})[key] = val
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    path = Path(path)
    data = save(tensors)
    _keep_previous(path)
    atomic_write_bytes(path, data)
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    atomic_write_json(
        sidecar(path),
        {**meta, **sidecar_fields(model), "sha256": hashlib.sha256(data).hexdigest(), "optim_groups": opt["param_groups"],
         "optim_scalars": scalars, "schedule": sched},
    )
    previous(path).unlink(missing_ok=True)  # the new pair is complete


def _check_format(path: Path) -> None:
    """Refuse pickle / torch.save files by their first bytes, before anything parses them."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04" or (len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5):
        raise UserError(f"{path}: is a pickle / torch.save file, not safetensors; llmcli never loads pickle "
                        "(convert it with safetensors.torch.save_file)")
    size = path.stat().st_size
    if len(head) < 9 or head[8:9] != b"{" or int.from_bytes(head[:8], "little") > size - 8:
        raise UserError(f"{path}: checkpoint is corrupt or truncated (no valid safetensors header)")


def _read_sidecar(path: Path) -> dict[str, Any]:
    side_path = sidecar(path)
    if not side_path.is_file():
        raise UserError(f"{side_path}: checkpoint sidecar not found")
    try:
        side = json.loads(side_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{side_path}: not valid JSON ({exc})") from None
    if not isinstance(side, dict):
        raise UserError(f"{side_path}: expected a JSON object, got {type(side).__name__}")
    for key, kind, what in (("sha256", str, "a string"), ("step", int, "an integer")):
        if not isinstance(side.get(key), kind):
            raise UserError(f"{side_path}: field {key!r} is missing or not {what}")
    return side


def load_checkpoint(path: Path, *, repair: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint and its sidecar; missing, corrupt or tampered files are a UserError.

    When a save was cut between its two writes, the sidecar matches `<name>.prev.safetensors`: that
    pair is loaded (and with `repair`, moved back into place).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    side = _read_sidecar(path)
    tensor_path = path
    if side["sha256"] != sha256_file(path):
        prev = previous(path)
        if not (prev.is_file() and side["sha256"] == sha256_file(prev)):
            _check_format(path)
            raise UserError(f"{path}: checkpoint is corrupt or truncated (sha256 does not match its sidecar)")
        tensor_path = prev  # an interrupted save: the sidecar still describes the previous tensors
        if repair:
            os.replace(prev, path)
            tensor_path = path
    _check_format(tensor_path)
    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable safetensors file ({exc})") from None
    return tensors, side


def restore_model(model: torch.nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Load the `model.*` tensors, naming any missing key or shape mismatch."""
    state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    own = saved_state(model)  # a LoRA model's base weights come from its base model, not from here
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
    model.load_state_dict(state, strict=len(own) == len(model.state_dict()))


def restore_training(optimizer: Any, scheduler: Any, tensors: dict[str, torch.Tensor], side: dict[str, Any],
                     path: Path | str = "checkpoint") -> None:
    """Restore optimiser, schedule and torch RNG state for an exact resume."""
    missing = [k for k in ("optim_groups", "schedule") if k not in side]
    if missing or "rng.torch" not in tensors:
        raise UserError(f"{path}: lacks training state ({', '.join(missing) or 'rng.torch'}); it cannot resume a run")
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
    keys = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    cuda = [tensors[k] for k in keys]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
