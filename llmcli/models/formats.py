"""The checkpoint format of a compressed run (pruned and/or int8-quantised), written by `llmcli compress`.

The checkpoint stays safetensors: a quantised layer is stored as its int8 weight, scale, zero point and float bias
(`qlinear.<module>.*`), everything else as float `model.*`; the sidecar's `compression` record says which layers
to re-quantise at load, where the stored int8 weights are put back unchanged. Pruned weights are plain float
weights with zeros in them: nothing to restore. Quantisation is torch's dynamic int8 quantisation of Linear layers
on CPU (torch.ao.quantization.quantize_dynamic; weights int8, activations quantised on the fly).

This module sits with the models so that the loader (models/load.py) needs nothing of the `compress` command;
torch is imported inside the functions, so run-folder code can read the constants without it.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmcli.errors import UserError

if TYPE_CHECKING:
    import torch
    from torch import nn

QUANTIZE = ("int8",)  # the quantisations a compressed checkpoint can hold
RECORD = "compression"  # the key of the compression record in a compressed run's sidecar and meta.json
FLOAT_PREFIX = "model."  # float tensors, by their state-dict name
QLINEAR_PREFIX = "qlinear."  # int8 layers: qlinear.<module>.weight / .scale / .zero_point / .bias


def quantize_int8(model: nn.Module, names: list[str]) -> nn.Module:
    """Dynamic int8 quantisation of the named Linear layers, in place."""
    import torch
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():  # torch marks this path deprecated in favour of torchao; it still works
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {n: default_dynamic_qconfig for n in names}, dtype=torch.qint8, inplace=True)


def _qlinears(model: nn.Module) -> dict[str, Any]:
    from torch.ao.nn.quantized.dynamic import Linear as QLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, QLinear)}


def compressed_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """safetensors-ready tensors of a (possibly quantised) model: float `model.*`, int8 `qlinear.*`."""
    import torch

    out = {}
    q = _qlinears(model)
    for n, m in q.items():
        w = m.weight()  # per-tensor affine qint8
        out[f"{QLINEAR_PREFIX}{n}.weight"] = w.int_repr().contiguous()
        out[f"{QLINEAR_PREFIX}{n}.scale"] = torch.tensor([w.q_scale()], dtype=torch.float64)
        out[f"{QLINEAR_PREFIX}{n}.zero_point"] = torch.tensor([w.q_zero_point()], dtype=torch.int64)
        if m.bias() is not None:
            out[f"{QLINEAR_PREFIX}{n}.bias"] = m.bias().detach().contiguous().clone()
    for k, v in float_state(model, list(q)).items():
        out[f"{FLOAT_PREFIX}{k}"] = v.detach().cpu().contiguous().clone()
    return out


def float_state(model: nn.Module, quantized: list[str]) -> dict[str, torch.Tensor]:
    """Float tensors of the state dict outside the quantised layers, a tied matrix once (its first name)."""
    import torch

    out, seen = {}, set()
    for k, v in model.state_dict().items():
        if not isinstance(v, torch.Tensor) or v.is_quantized or any(k.startswith(f"{n}.") for n in quantized):
            continue
        if v.data_ptr() in seen:  # e.g. lm_head.weight is the embedding: loading one restores both
            continue
        seen.add(v.data_ptr())
        out[k] = v
    return out


def restore_compressed(model: nn.Module, tensors: dict[str, torch.Tensor], record: dict[str, Any], path: Path) -> nn.Module:
    """Rebuild a compressed checkpoint into a freshly built float model (re-quantising what was quantised)."""
    import torch

    names = record.get("quantized", [])
    floats = {k.removeprefix(FLOAT_PREFIX): v for k, v in tensors.items() if k.startswith(FLOAT_PREFIX)}
    missing = sorted(set(float_state(model, names)) - set(floats))
    if missing or any(f"{QLINEAR_PREFIX}{n}.weight" not in tensors for n in names):
        raise UserError(f"{path}: compressed checkpoint lacks weights ({', '.join(missing[:3]) or 'qlinear'})")
    model.load_state_dict(floats, strict=False)
    if record.get("quantize") == "int8":
        quantize_int8(model, names)
        q = _qlinears(model)
        for n in names:
            w = torch._make_per_tensor_quantized_tensor(tensors[f"{QLINEAR_PREFIX}{n}.weight"],
                                                        float(tensors[f"{QLINEAR_PREFIX}{n}.scale"]),
                                                        int(tensors[f"{QLINEAR_PREFIX}{n}.zero_point"]))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                q[n].set_weight_bias(w, tensors.get(f"{QLINEAR_PREFIX}{n}.bias"))
    return model.eval()
