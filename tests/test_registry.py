"""The closed component registry."""

from __future__ import annotations

import pytest

from llmcli.errors import UserError
from llmcli.registry import Registry, registry


def test_every_builtin_kind_has_components():
    for kind, name in [("model", "gpt"), ("objective", "weighted"), ("optimizer", "sgd"), ("schedule", "cosine"),
                       ("source", "bible"), ("tokenizer", "bpe"), ("task_loss", "cross_entropy")]:
        assert name in registry(kind).names()


def test_unknown_name_lists_valid_ones():
    with pytest.raises(UserError, match=r"unknown schedule 'step' \(valid: constant, cosine, linear\)"):
        registry("schedule").get("step")


def test_a_name_registers_once():
    r = Registry("thing")
    r.register("a", dict, "x:y")
    with pytest.raises(ValueError):
        r.register("a", dict, "x:y")


def test_build_passes_only_the_sub_config_and_runtime_args():
    from llmcli.config import validate_config

    cfg = validate_config({"task_loss": {"name": "cross_entropy", "label_smoothing": 0.1}})
    loss = registry("task_loss").build(cfg.task_loss, n_classes=3)
    import torch

    value = loss(torch.zeros(2, 3), torch.tensor([0, -1]))
    assert value.item() == pytest.approx(torch.log(torch.tensor(3.0)).item())
