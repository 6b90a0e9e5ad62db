"""A frozen prefix computed once (`train.prefix_cache`): the states below block k, cached beside the processed data.

When a run freezes the embeddings and the bottom k blocks of a backbone (`train.freeze: [bottom:24]`, or LoRA only on
the top blocks) and nothing else runs below block k, the output of block k-1 for a record is a pure function of
(those weights, the model's config, the record's tokens): it is computed once, stored memory-mapped in
`<processed>/prefix-<key>/`, and every run, sweep point and evaluation with that prefix reads it, so only blocks
k.. and the heads run. The key names its parts in the folder's manifest.json (the prefix's own tensors by sha256,
the model's config, the pretrained weights' sha256, the tokenizer's and the processed data's sha256, k, max_len,
the storage dtype, torch and transformers versions): a change in any of them is another folder, never a reuse.

How the top runs from given states, for any architecture (`Prefix.run`): the backbone's own `states` runs, with
blocks 0..k-2 swapped for pass-throughs and block k-1 for a module that returns the cached states, so the model's
own masks, positions (GPT-2's absolute ones are added below block 0 and are in the cache; rotary embeddings are
computed from the position ids for every block), final norm and heads are used. Opening a cache checks this on two
records against the model's full forward (else the run goes on without the cache, saying why).

The cached states are those of the prefix in eval mode (no dropout): the cache applies to rows that read it;
`prefix_cache: off` keeps today's path, where a frozen block's dropout still runs in train mode.

Storage: `chunk-NNNN-<hash>/` folders, each `records.npy` (record indices), `offsets.npy` (row offsets) and
`states.npy` ((tokens, D) float32 or float16), built under a file lock in a temporary folder and renamed into
place: a half-written chunk is never read. A run adds the records it needs that are not there yet.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from llmcli.errors import UserError
from llmcli.files import atomic_write_json, create_temp_dir, read_json_object, sha256_file, sha256_json

if TYPE_CHECKING:
    from llmcli.data.dataset import ProcessedData

FORMAT = 1
STORAGE = {"fp32": np.float32, "fp16": np.float16}
CHECK_RTOL = 1e-4  # the self-check: top-from-states vs the full forward, relative to the states' largest value
CHECK_RECORDS = 2
LOG_EVERY_S = 15.0  # a progress line at most this often while the prefix is computed
NOTE = "prefix cache"


def _blocks(k: int) -> str:
    return "block 0" if k == 1 else f"blocks 0-{k - 1}"


# ---------------------------------------------------------------- running the top blocks from given states


class _Skip(nn.Module):
    """Stands in for a cached block below k-1: passes the hidden states on (they are replaced at block k-1)."""

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The hidden states it was given."""
        return args[0] if args else kwargs["hidden_states"]


class _Given(nn.Module):
    """Stands in for block k-1: returns the cached output of the blocks below k."""

    def __init__(self, states: torch.Tensor) -> None:
        super().__init__()
        self.states = states  # (B, T, D), a plain attribute (not a buffer)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The cached states, checked against the shape of the hidden states the model passes."""
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape != self.states.shape:
            raise RuntimeError(f"prefix cache: states of shape {tuple(self.states.shape)} given for hidden states "
                               f"of shape {tuple(hidden.shape)}")
        return self.states.to(hidden.dtype)


@contextmanager
def _given(blocks: nn.ModuleList, k: int, states: torch.Tensor) -> Iterator[None]:
    """Within: blocks 0..k-2 pass their input on and block k-1 returns `states`; the real blocks are put back after."""
    saved = [blocks[i] for i in range(k)]
    skip = _Skip()
    try:
        for i in range(k - 1):
            blocks[i] = skip
        blocks[k - 1] = _Given(states)
        yield
    finally:
        for i, block in enumerate(saved):
            blocks[i] = block


@dataclass
class Prefix:
    """One batch's cached output of block k-1 (pads zero): what `TwoHeadModel.forward` runs blocks k.. from."""

    states: torch.Tensor  # (B, T, D)
    k: int

    def run(self, backbone: Any, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, T, D) states of the whole backbone, blocks 0..k-1 read from the cache."""
        with _given(backbone.prefix_blocks(), self.k, self.states):
            return backbone.states(tokens, lengths)


class _Stop(Exception):
    """Raised by the capture hook once block k-1 has run: nothing above it is computed."""


def capture(backbone: Any, k: int, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, T, D) output of block k-1: the backbone's own `states` run up to it (and no further)."""
    got: dict[str, torch.Tensor] = {}

    def hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
        got["h"] = out
        raise _Stop

    handle = backbone.prefix_blocks()[k - 1].register_forward_hook(hook)
    try:
        backbone.states(tokens, lengths)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not isinstance(got.get("h"), torch.Tensor):
        raise RuntimeError(f"block {k - 1} did not run, or returned no single tensor")
    return got["h"]


# ---------------------------------------------------------------- does the cache apply


def _frozen_ids(model: nn.Module, freeze: list[str]) -> set[int]:
    """Parameters that do not train: requires_grad off (training, after apply_transfer) or named by train.freeze
    (a run rebuilt for evaluation has every requires_grad on)."""
    from llmcli.models.transfer import layer_range, model_parts

    ids = {id(p) for p in model.parameters() if not p.requires_grad}
    parts = model_parts(model)
    for item in freeze:
        ids |= {id(p) for p in (layer_range(model, item) if ":" in item else parts.get(item, []))}
    return ids


def _below(backbone: nn.Module, blocks: nn.ModuleList) -> list[nn.Module]:
    """Every module of the backbone registered before its blocks that is not one of their ancestors (the
    embeddings: GPT-2's wte + wpe + dropout, BERT's embeddings, Llama's embed_tokens)."""
    names = dict((id(m), n) for n, m in backbone.named_modules())
    where = names[id(blocks)]
    out = []
    for name, module in backbone.named_modules():
        if name == where:
            break
        if not (name == "" or where.startswith(name + ".")):
            out.append(module)
    return out


def depth(model: nn.Module, freeze: list[str]) -> int:
    """k: how many bottom blocks, with every weight below them, are frozen (0: none, or no blocks to cache)."""
    blocks = model.backbone.prefix_blocks()
    if blocks is None:
        return 0
    frozen = _frozen_ids(model, freeze)
    if not all(id(p) in frozen for m in _below(model.backbone, blocks) for p in m.parameters(recurse=False)):
        return 0
    k = 0
    while k < len(blocks) and all(id(p) in frozen for p in blocks[k].parameters()):
        k += 1
    return k


def _prefix_modules(backbone: nn.Module, k: int) -> list[nn.Module]:
    """The modules whose computation the cache stands for: the embeddings and every module inside blocks 0..k-1."""
    blocks = backbone.prefix_blocks()
    return [*_below(backbone, blocks), *(m for b in list(blocks)[:k] for m in b.modules())]


def refusal(model: nn.Module, k: int, compiled: bool) -> str | None:
    """Why the cache cannot stand for the frozen prefix of depth k, or None: something else runs in it."""
    from llmcli.models.lora import is_lora

    mods = _prefix_modules(model.backbone, k)
    if any(is_lora(m) for m in mods):
        return "LoRA adapters sit inside the frozen blocks (their dropout and weights run there)"
    if any(m._forward_hooks or m._forward_pre_hooks for m in mods):  # noqa: SLF001 (torch keeps hooks there)
        return "a layer hooks into the frozen blocks or the embeddings (e.g. the conditioned objective's FiLM)"
    if compiled:
        return "train.compile compiles the backbone's own forward"
    return None


# ---------------------------------------------------------------- the key


def _tensors_sha256(modules: list[nn.Module]) -> str:
    """sha256 of every parameter and buffer of `modules` (each once, in order, with its name, shape and dtype)."""
    h, seen = hashlib.sha256(), set()
    for i, m in enumerate(modules):
        for name, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
            if id(t) in seen:
                continue
            seen.add(id(t))
            h.update(f"{i}.{name}:{tuple(t.shape)}:{t.dtype};".encode())
            h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _config_sha256(backbone: Any) -> str | None:
    """sha256 of the transformers model's config (what sets positions, rotary, norms), less bookkeeping fields."""
    hf = backbone.hf_module()
    if hf is None:
        return None
    conf = {k: v for k, v in hf.config.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
    return hashlib.sha256(repr(sorted(conf.items(), key=lambda kv: kv[0])).encode()).hexdigest()


def key_parts(model: nn.Module, k: int, data: ProcessedData, storage: str) -> dict[str, Any]:
    """What the cached states are a function of; the folder is named by their hash."""
    import transformers

    backbone = model.backbone
    return {
        "format": FORMAT,
        "backbone": type(backbone).__name__,
        "pretrained": backbone.pretrained_record(),  # path, weight file and its sha256
        "model_config_sha256": _config_sha256(backbone),
        "prefix_tensors_sha256": _tensors_sha256(_prefix_modules(backbone, k)),  # the weights actually used
        "k": k,
        "tokenizer_sha256": data.manifest["tokenizer_sha256"],
        "data": data.path.name,
        "data_manifest_sha256": sha256_file(data.path / "manifest.json"),
        "max_len": data.manifest["data_config"]["max_len"],
        "storage": storage,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


# ---------------------------------------------------------------- the cache


class PrefixCache:
    """The cached prefix of one (model, data, k, storage): `ensure(idx)` computes what is missing, `states(idx)` reads."""

    def __init__(self, root: Path, model: nn.Module, k: int, data: ProcessedData, storage: str, batch_size: int,
                 device: str, log: Any) -> None:
        self.root, self.model, self.k, self.data, self.storage = root, model, k, data, storage
        self.batch_size, self.device, self.log = batch_size, device, log
        self.batches = True  # training batches read it (False with data.augment: their tokens change)
        self.d = int(model.backbone.d_model)
        n = len(data.offsets) - 1
        self._chunk_of = np.full(n, -1, dtype=np.int32)  # record -> chunk holding it
        self._row_of = np.zeros(n, dtype=np.int64)  # record -> its first row in that chunk's states
        self._chunks: list[np.ndarray] = []
        self._names: list[str] = []
        self._said = False

    def describe(self) -> dict[str, Any]:
        """What an eval result records about the cache it read."""
        return {"dir": str(self.root), "k": self.k, "storage": self.storage}

    def _refresh(self) -> None:
        """Read the chunks other processes (or this one) have renamed into place since the last look."""
        for path in sorted(self.root.glob("chunk-*")):
            if path.name in self._names:
                continue
            try:
                records = np.load(path / "records.npy")
                offsets = np.load(path / "offsets.npy")
                states = np.load(path / "states.npy", mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise UserError(f"{path}: the prefix cache is damaged ({exc}); delete {self.root} and run again") from None
            self._chunk_of[records] = len(self._chunks)
            self._row_of[records] = offsets[:-1]
            self._chunks.append(states)
            self._names.append(path.name)

    def _missing(self, idx: np.ndarray) -> np.ndarray:
        return np.unique(idx[self._chunk_of[idx] < 0])

    def ensure(self, idx: np.ndarray) -> None:
        """Make every record of `idx` readable: the missing ones are computed (under the folder's lock) and added."""
        from filelock import FileLock, Timeout

        idx = np.asarray(idx, dtype=np.int64)
        if not len(self._missing(idx)):
            return
        self._refresh()
        if len(self._missing(idx)):
            lock = FileLock(str(self.root / ".lock"))
            try:
                lock.acquire(timeout=0)
            except Timeout:
                self.log(f"{NOTE}: waiting for another process computing {self.root}")
                lock.acquire()
            try:
                self._refresh()
                missing = self._missing(idx)
                if len(missing):
                    self._build(missing)
                    self._refresh()
            finally:
                lock.release()
        if not self._said:
            n = int((self._chunk_of >= 0).sum())
            self.log(f"{NOTE}: {_blocks(self.k)} read from {self.root} ({n:,} records cached)")
            self._said = True

    def states(self, idx: np.ndarray, device: str) -> Prefix:
        """The batch's cached output of block k-1, right-padded with zeros as `ProcessedData.batch` pads tokens."""
        idx = np.asarray(idx, dtype=np.int64)
        lens = self.data.lengths(idx)
        width = int(lens.max())
        chunk = self._chunk_of[idx]
        if (chunk < 0).any():
            raise RuntimeError(f"{NOTE}: {int((chunk < 0).sum())} records are not cached (ensure() them first)")
        cols = np.arange(width)
        real = cols[None, :] < lens[:, None]  # (B, T)
        out = np.zeros((len(idx), width, self.d), dtype=np.float32)  # (B, T, D)
        for c in np.unique(chunk):
            rows = np.flatnonzero(chunk == c)
            pos = self._row_of[idx[rows]][:, None] + cols[None, :]  # (b, T) rows of the chunk's states
            part = np.zeros((len(rows), width, self.d), dtype=np.float32)
            part[real[rows]] = self._chunks[c][pos[real[rows]]]
            out[rows] = part
        return Prefix(torch.from_numpy(out).to(device), self.k)

    @torch.inference_mode()
    def _build(self, missing: np.ndarray) -> None:
        """Compute blocks 0..k-1 (eval mode) for `missing` into a new chunk, renamed into place when complete."""
        for stale in self.root.glob(".chunk-*"):  # a build killed midway (we hold the lock: nobody is writing it)
            shutil.rmtree(stale, ignore_errors=True)
        order = missing[np.argsort(self.data.lengths(missing), kind="stable")]  # similar lengths: less padding
        lens = self.data.lengths(order)
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        n_tok = int(offsets[-1])
        self.log(f"{NOTE}: computing the embeddings + {_blocks(self.k)} for {len(order):,} records "
                 f"({n_tok:,} tokens, {self.storage}) into {self.root}")
        tmp = create_temp_dir(self.root, ".chunk-")
        t0 = was = None
        try:
            t0, was = time.perf_counter(), self.model.training
            self.model.eval()
            states = np.lib.format.open_memmap(tmp / "states.npy", mode="w+", dtype=STORAGE[self.storage],
                                               shape=(n_tok, self.d))
            self._fill(states, order, offsets, t0)
            states.flush()
            del states
            np.save(tmp / "records.npy", order)
            np.save(tmp / "offsets.npy", offsets)
            _fsync_files(tmp)
            name = f"chunk-{len(self._names):04d}-{hashlib.sha256(order.tobytes()).hexdigest()[:8]}"
            tmp.rename(self.root / name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            if was is not None:
                self.model.train(was)
        mb = n_tok * self.d * np.dtype(STORAGE[self.storage]).itemsize / 1e6
        self.log(f"{NOTE}: {len(order):,} records ({n_tok:,} tokens, {mb:,.1f} MB) computed in "
                 f"{time.perf_counter() - t0:.1f} s")

    def _fill(self, states: np.ndarray, order: np.ndarray, offsets: np.ndarray, t0: float) -> None:
        """Write each batch's real positions into `states`, with a progress line every LOG_EVERY_S seconds."""
        last, done = t0, 0
        limit = float(np.finfo(STORAGE[self.storage]).max)
        for start in range(0, len(order), self.batch_size):
            b = self.data.batch(order[start : start + self.batch_size])
            tokens, lengths = b.tokens.to(self.device), b.lengths.to(self.device)
            h = capture(self.model.backbone, self.k, tokens, lengths).float().cpu().numpy()  # (B, T, D)
            real = np.arange(h.shape[1])[None, :] < b.lengths.numpy()[:, None]  # (B, T)
            if np.abs(h[real]).max(initial=0.0) > limit:
                raise UserError(f"train.prefix_cache_dtype: block {self.k - 1}'s states exceed what "
                                f"{self.storage} holds ({limit:g}); use fp32")
            pos = offsets[start : start + len(b.lengths)][:, None] + np.arange(h.shape[1])[None, :]  # (B, T)
            states[pos[real]] = h[real]
            done += int(b.lengths.sum())
            if time.perf_counter() - last > LOG_EVERY_S:
                last = time.perf_counter()
                self.log(f"{NOTE}: {start + len(b.lengths):,}/{len(order):,} records, "
                         f"{done / (last - t0):,.0f} tok/s, {last - t0:.0f} s")


def _fsync_files(folder: Path) -> None:
    """Flush a chunk's files to disk before it is renamed into place (a crash then leaves all of it or none)."""
    for path in folder.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ---------------------------------------------------------------- opening one


@torch.inference_mode()
def _self_check(model: nn.Module, k: int, data: ProcessedData, device: str) -> str | None:
    """Why running blocks k.. from given states does not reproduce the full forward on this architecture, or None."""
    backbone = model.backbone
    was = model.training
    model.eval()
    try:
        b = data.batch(np.arange(min(CHECK_RECORDS, len(data.offsets) - 1)))
        tokens, lengths = b.tokens.to(device), b.lengths.to(device)
        full = backbone.states(tokens, lengths)  # (B, T, D)
        part = Prefix(capture(backbone, k, tokens, lengths), k).run(backbone, tokens, lengths)
    except (RuntimeError, TypeError, KeyError, IndexError) as exc:
        return f"running blocks {k}.. from given states fails on this model ({str(exc).splitlines()[0]})"
    finally:
        model.train(was)
    real = (torch.arange(full.shape[1], device=full.device)[None, :] < lengths[:, None])  # (B, T)
    diff = float((full - part)[real].abs().max())
    scale = max(float(full[real].abs().max()), 1.0)
    if not diff <= CHECK_RTOL * scale:
        return f"running blocks {k}.. from given states differs from the full forward by {diff:.3g}"
    return None


def _open_root(processed: Path, parts: dict[str, Any]) -> Path:
    """`<processed>/prefix-<key>/` with its manifest.json, created atomically if new (OSError: cannot write there)."""
    root = processed / f"prefix-{sha256_json(parts)[:16]}"
    if not root.is_dir():
        tmp = create_temp_dir(processed, ".prefix-")
        try:
            atomic_write_json(tmp / "manifest.json", parts)
            tmp.rename(root)
        except OSError:
            if not root.is_dir():  # not another process creating it at the same time
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    saved = read_json_object(root / "manifest.json", "prefix cache manifest")
    if saved != parts:
        raise UserError(f"{root / 'manifest.json'}: names other key parts than this run's; delete {root}")
    return root


def open_cache(model: nn.Module, freeze: list[str], data: ProcessedData, *, storage: str, batch_size: int,
               device: str, compiled: bool = False, log: Any = print) -> tuple[PrefixCache | None, list[str]]:
    """The prefix cache for this model and data, or None; the notes to show (why not, or what it means)."""
    k = depth(model, freeze)
    if k == 0:
        return None, []
    why = refusal(model, k, compiled) or _self_check(model, k, data, device)
    if why:
        return None, [f"{NOTE}: not used: {why}; the whole model runs"]
    parts = key_parts(model, k, data, storage)
    try:
        root = _open_root(data.path, parts)
    except OSError as exc:
        return None, [f"{NOTE}: not used: cannot write in {data.path} ({exc.strerror or exc}); the whole model runs"]
    notes = [f"{NOTE}: the embeddings and {_blocks(k)} are frozen: their states come from {root} "
             f"(computed once, in eval mode: no dropout below block {k})"]
    if model.backbone.task_reads_masked():
        notes.append(f"{NOTE}: model.task_input is masked: training runs one forward of the masked input through the "
                     "whole model; validation and evaluation read the cache")
    elif not model.backbone.causal():
        notes.append(f"{NOTE}: an encoder's masked-LM loss reads a masked input, so its forward runs the whole "
                     "model; the task head's (unmasked) forward reads the cache")
    return PrefixCache(root, model, k, data, storage, batch_size, device, log), notes


def for_training(model: nn.Module, cfg: Any, data: ProcessedData,
                 device: str) -> tuple[PrefixCache | None, list[str]]:
    """A training run's prefix cache (train.prefix_cache auto), or None; its notes for train.log."""
    if cfg.train.prefix_cache == "off":
        return None, []
    cache, notes = open_cache(model, cfg.train.freeze, data, storage=cfg.train.prefix_cache_dtype,
                              batch_size=cfg.eval.batch_size, device=device, compiled=cfg.train.compile)
    if cache is not None and model.backbone.task_reads_masked():
        cache.batches = False  # nothing in a training step reads unmasked states (the note above says so)
    elif cache is not None and cfg.data.augment:
        cache.batches = False
        notes.append(f"{NOTE}: data.augment changes the training batches' tokens: they run the whole model; "
                     "validation reads the cache")
    return cache, notes


def for_eval(trained: Any, data: ProcessedData, log: Any) -> PrefixCache | None:
    """The prefix cache an evaluation of a trained run reads (as its training did), or None."""
    cfg = trained.cfg
    if cfg.train.prefix_cache == "off":
        return None
    device = str(next(trained.model.parameters()).device)
    cache, notes = open_cache(trained.model, cfg.train.freeze, data, storage=cfg.train.prefix_cache_dtype,
                              batch_size=cfg.eval.batch_size, device=device, log=log)
    for note in notes[1:] if cache is not None else notes:
        log(note)
    return cache
