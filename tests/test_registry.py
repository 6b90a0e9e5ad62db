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


class Thing:
    """A component whose class is its own builder."""

    def __init__(self, cfg, *, size: int) -> None:
        self.cfg, self.size = cfg, size


def test_an_entry_may_name_a_class_which_is_called_like_a_builder():
    from types import SimpleNamespace

    r = Registry("thing")
    r.register("a", dict, "tests.test_registry:Thing")
    cfg = SimpleNamespace(name="a")
    built = r.build(cfg, size=3)
    assert type(built) is Thing and built.cfg is cfg and built.size == 3


def test_every_entry_names_an_importable_callable_and_the_dg_ones_are_classes():
    import pkgutil

    from llmcli.contracts import DGMethod, Objective
    from llmcli.registry import REGISTRIES

    for kind, reg in REGISTRIES.items():
        for name in reg.names():
            assert callable(pkgutil.resolve_name(reg.get(name).builder)), f"{kind}/{name}"
    for name in registry("dg").names():  # no builder that only forwards its arguments
        assert issubclass(pkgutil.resolve_name(registry("dg").get(name).builder), DGMethod), name
    for name in registry("objective").names():
        target = pkgutil.resolve_name(registry("objective").get(name).builder)
        assert isinstance(target, type) and issubclass(target, Objective), name


def test_a_minimal_objective_gets_every_optional_hook_as_a_no_op():
    from llmcli.contracts import Objective

    class Half(Objective):
        """Only what the contract requires."""

        def backward(self, lm_loss, task_loss, shared, step):
            return {"loss": 0.0}

        def score(self, lm_loss, task_loss):
            return 0.5 * (lm_loss + task_loss)

    obj = Half()
    assert obj.parameters() == [] and obj.state_dict() == {}
    assert obj.wrap_model(None) is None and obj.prepare(None, 0) is None and obj.set_probe(lambda s: {}) is None
    obj.load_state_dict({})
    assert obj.score(1.0, 3.0) == 2.0
    with pytest.raises(TypeError, match="score"):
        type("NoScore", (Objective,), {"backward": Half.backward})()


def test_the_contracts_and_the_registry_import_without_torch():
    import subprocess
    import sys

    code = "import sys, llmcli.contracts, llmcli.registry, llmcli.config; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
