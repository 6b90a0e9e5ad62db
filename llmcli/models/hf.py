"""Pretrained Hugging Face backbones (`pip install 'llmcli[pretrained]'`): `hf_causal` and `hf_encoder`.

`model.path` is resolved by `llmcli.models.pretrained.resolve` (a local folder, a .gguf converted once, or
builtin:NAME) and loaded with `local_files_only=True`: nothing is downloaded. The model keeps its own vocabulary
(no embedding resize: the run's tokenizer is the model's own, `data.tokenizer: pretrained`) and its own LM head:

- `hf_causal`: an AutoModelForCausalLM; its transformer body gives the states, its LM head (tied to the
  embeddings or not, as the model is) gives L, next-token prediction.
- `hf_encoder`: a BERT-style encoder; L is the masked-LM loss (`BertMasking`: BERT's 80/10/10 masking of 15 % of
  the real tokens, a pure function of the record and the training step). Its own MLM head where the folder's
  weights hold one (AutoModelForMaskedLM), else a new one as BERT's: dense + GELU + LayerNorm, then a decoder
  tied to the word embeddings with a zero bias. The task head reads the unmasked input, mean-pooled (or [CLS]);
  with `task_input: masked`, in training it reads L's masked input instead (one forward serves both losses).
"""

from __future__ import annotations

import hashlib
import inspect
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from llmcli.contracts import Backbone
from llmcli.errors import UserError
from llmcli.models.lora import hf_blocks
from llmcli.models.model import LMHead

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from llmcli.config import HFCausalConfig, HFEncoderConfig
    from llmcli.models.pretrained import Pretrained

NO_LIMIT = 1 << 30  # a model without learned positions (rotary) has no fixed limit


class HFCausal(nn.Module, Backbone):
    """(B, T) ids -> (B, T, D) states of the model's transformer body; the cache is the model's own."""

    def __init__(self, model: nn.Module, block_size: int, record: dict[str, Any]) -> None:
        super().__init__()
        self.hf = model  # the *ForCausalLM: body + LM head
        # the body without the head, not registered twice (its weights are the model's); LoRA changes it in place
        self._body = (model.base_model,)
        self.d_model = int(model.config.hidden_size)
        self.block_size = block_size
        self._record = record
        # transformers >= 5.x renamed `past_key_values` to `cache` (argument and output field)
        params = inspect.signature(model.base_model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    def hf_module(self) -> nn.Module:
        """The transformers model (what LoRA wraps)."""
        return self.hf

    def pretrained_record(self) -> dict[str, Any]:
        """The weights this backbone started from (path, weight file, sha256, built-in name)."""
        return self._record

    def lm_head(self) -> nn.Module:
        """The model's own LM head (an nn.Linear, tied to the input embeddings where the model ties them)."""
        return self.hf.get_output_embeddings()

    def prefix_blocks(self) -> nn.ModuleList:
        """The transformer blocks (`lora.hf_blocks`): a frozen bottom of them can be cached (prefix_cache)."""
        return hf_blocks(self.hf)

    @property
    def embed(self) -> nn.Embedding:
        """The input token embeddings."""
        return self.hf.get_input_embeddings()

    def forward(self, idx: torch.Tensor, cache: Any = None, pad: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
        """States for `idx`; with a cache, `idx` continues the cached sequence (right padding needs no mask:
        attention is causal, so no real position sees a pad). Training builds no cache. `pad` (B,): rows left-padded
        by that many tokens (batched generation): the pads are masked out of attention and each row's positions
        count from its first real token, as transformers' own generate does."""
        kw = {self._cache_arg: cache} if cache is not None else {}
        if pad is not None:
            past = cache.get_seq_length() if cache is not None else 0
            width = past + idx.shape[1]
            kw["attention_mask"] = (torch.arange(width, device=idx.device)[None, :] >= pad[:, None]).long()  # (B, W)
            positions = torch.arange(past, width, device=idx.device)[None, :] - pad[:, None]  # (B, T)
            kw["position_ids"] = positions.clamp(min=0)
        out = self._body[0](input_ids=idx, use_cache=cache is not None or not self.training, **kw)
        return out.last_hidden_state, out[self._cache_arg] if self._cache_arg in out else None  # (B, T, D), cache


class BertMasking:
    """BERT's masking: each real, non-special token is picked with probability p; of those, 80 % become the mask
    token, 10 % a random token of the vocabulary, 10 % stay. A row's draw is seeded by its own tokens and the
    training step (evaluation: no step), so it does not depend on batching, device or process: runs repeat,
    resumes are exact, and evaluation scores every record with the same mask every time."""

    def __init__(self, p: float, mask_id: int, special_ids: list[int], vocab_size: int) -> None:
        self.p, self.mask_id, self.vocab_size = p, mask_id, vocab_size
        self.special = np.asarray(sorted(special_ids), dtype=np.int64)

    def row(self, real: np.ndarray, step: int | None) -> tuple[np.ndarray, np.ndarray]:
        """(masked ids, picked) of one record's real tokens (n,)."""
        key = int.from_bytes(hashlib.blake2b(real.astype(np.int64).tobytes(), digest_size=8).digest(), "little")
        rng = np.random.default_rng([key, 0 if step is None else step + 1])
        u = rng.random((3, len(real)))  # (3, n)
        swap = rng.integers(self.vocab_size, size=len(real))  # (n,)
        picked = (u[0] < self.p) & ~np.isin(real, self.special)
        to_mask = picked & (u[1] < 0.8)
        to_random = picked & ~to_mask & (u[2] < 0.5)  # half of the remaining 20 %
        return np.where(to_mask, self.mask_id, np.where(to_random, swap, real)), picked

    def __call__(self, tokens: torch.Tensor, lengths: torch.Tensor,
                 step: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked input (B, T), picked positions (B, T) bool) of right-padded records."""
        rows, lens = tokens.cpu().numpy(), lengths.cpu().numpy()
        masked, picked = rows.copy(), np.zeros(rows.shape, dtype=bool)
        for i, n in enumerate(lens):
            masked[i, :n], picked[i, :n] = self.row(rows[i, :n], step)
        return torch.from_numpy(masked).to(tokens.device), torch.from_numpy(picked).to(tokens.device)


class HFEncoder(nn.Module, Backbone):
    """(B, T) ids -> (B, T, D) states of a bidirectional encoder, padding masked out of attention; L is masked LM."""

    def __init__(self, model: nn.Module, head: LMHead | None, block_size: int, record: dict[str, Any],
                 masking: BertMasking, pool: str, task_input: str = "unmasked") -> None:
        super().__init__()
        self.hf = model  # the *ForMaskedLM (own head) or the bare encoder
        self._body = (model.base_model,)
        self._own_head = head  # inside `hf` (not registered twice); None: `mlm_head` below is new
        self.mlm_head = None if head is not None else _new_mlm_head(model)
        self.fresh_head = head is None  # the MLM head starts untrained (the folder had none)
        self.d_model = int(model.config.hidden_size)
        self.block_size, self._record, self.masking, self._pool = block_size, record, masking, pool
        self._pad_id = model.config.pad_token_id
        self._task_input = task_input

    def hf_module(self) -> nn.Module:
        """The transformers model (what LoRA wraps)."""
        return self.hf

    def pretrained_record(self) -> dict[str, Any]:
        """The weights this backbone started from (path, weight file, sha256, built-in name)."""
        return self._record

    def lm_head(self) -> LMHead:
        """The MLM head: the model's own, or the new one tied to the word embeddings."""
        return self._own_head if self._own_head is not None else self.mlm_head

    def prefix_blocks(self) -> nn.ModuleList:
        """The transformer blocks (`lora.hf_blocks`): a frozen bottom of them can be cached (prefix_cache)."""
        return hf_blocks(self.hf)

    def causal(self) -> bool:
        """An encoder: L is the masked-LM loss."""
        return False

    def mask_tokens(self, tokens: torch.Tensor, lengths: torch.Tensor,
                    step: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """BERT's masking of the records (`BertMasking`)."""
        return self.masking(tokens, lengths, step)

    def task_reads_masked(self) -> bool:
        """`model.task_input: masked`: in training, T reads the masked-LM input's states (one forward)."""
        return self._task_input == "masked"

    @property
    def embed(self) -> nn.Embedding:
        """The word embeddings."""
        return self.hf.get_input_embeddings()

    def states(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, T, D) states; the attention mask comes from the lengths (right padding)."""
        mask = torch.arange(idx.shape[1], device=idx.device)[None, :] < lengths[:, None]  # (B, T)
        return self._body[0](input_ids=idx, attention_mask=mask.long()).last_hidden_state

    def forward(self, idx: torch.Tensor, cache: Any = None) -> tuple[torch.Tensor, None]:
        """States for `idx` without lengths: the model's pad id is masked out (an encoder keeps no cache)."""
        mask = (idx != self._pad_id).long() if self._pad_id is not None else None  # (B, T)
        return self._body[0](input_ids=idx, attention_mask=mask).last_hidden_state, None

    def pool(self, h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, D): the mean state over each record's real tokens, or its first ([CLS]) state."""
        if self._pool == "cls":
            return h[:, 0]
        real = (torch.arange(h.shape[1], device=h.device)[None, :] < lengths[:, None]).to(h.dtype)  # (B, T)
        return (h * real[..., None]).sum(1) / lengths[:, None].to(h.dtype)  # (B, D)


def _new_mlm_head(model: nn.Module) -> LMHead:
    """BERT's MLM head, new: dense + GELU + LayerNorm, then a decoder tied to the word embeddings (zero bias)."""
    c = model.config
    d, emb = int(c.hidden_size), model.get_input_embeddings()
    dense = nn.Linear(d, d)
    nn.init.normal_(dense.weight, std=float(getattr(c, "initializer_range", 0.02)))
    nn.init.zeros_(dense.bias)
    transform = nn.Sequential(dense, nn.GELU(), nn.LayerNorm(d, eps=float(getattr(c, "layer_norm_eps", 1e-12))))
    decoder = nn.Linear(d, emb.weight.shape[0])
    decoder.weight = emb.weight  # tied: the head writes tokens with the matrix that reads them
    nn.init.zeros_(decoder.bias)
    return LMHead(decoder, transform)


def _transformers(name: str) -> Any:
    try:
        import transformers
    except ImportError:
        raise UserError(f"model.name: {name} needs the optional extra: pip install 'llmcli[pretrained]'") from None
    return transformers


def _positions(config: PretrainedConfig) -> int:
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        if isinstance(getattr(config, key, None), int):
            return int(getattr(config, key))
    return NO_LIMIT


def _load(auto: Any, p: Pretrained, what: str, quiet: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """`auto.from_pretrained(p.dir)` in float32 from local files, with its loading info; bad folders are one line.
    `quiet`: no load report (the caller judges the missing weights itself)."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    if quiet:
        logging.set_verbosity_error()
    try:
        return auto.from_pretrained(str(p.dir), local_files_only=True, dtype=torch.float32, output_loading_info=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"model.path: cannot load {p.spec} as {what} ({str(exc).splitlines()[0]})") from None
    finally:
        logging.set_verbosity(level)


def _check_fit(model: nn.Module, spec: str, cap: int | None, vocab_size: int, max_len: int) -> int:
    """The block size (the model's positions, capped by model.block_size); the run's vocabulary and records fit."""
    rows = int(model.get_input_embeddings().weight.shape[0])
    if vocab_size > rows:
        raise UserError(f"data.tokenizer: the tokenizer's {vocab_size} tokens do not fit model {spec}'s {rows} "
                        "embedding rows: use the model's own tokenizer")
    block = min(_positions(model.config), cap or NO_LIMIT)
    if max_len > block:
        raise UserError(f"data.max_len: {max_len} is more than the {block} positions model {spec} sees "
                        f"(allowed: at most {block}{', model.block_size' if cap else ''})")
    return block


def build_hf_causal(cfg: HFCausalConfig, *, vocab_size: int, max_len: int) -> HFCausal:
    """Load the causal LM `cfg.path` names, with its own LM head and vocabulary."""
    from llmcli.models.pretrained import resolve

    transformers = _transformers(cfg.name)
    p = resolve(cfg.path)
    model, _ = _load(transformers.AutoModelForCausalLM, p, "a causal LM (AutoModelForCausalLM)")
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise UserError(f"model.path: {cfg.path}'s LM head is a {type(head).__name__}; hf_causal reads a linear head")
    block = _check_fit(model, cfg.path, cfg.block_size, vocab_size, max_len)
    _check_causal(model, cfg.path)
    return HFCausal(model, block, p.record())


@torch.no_grad()
def _check_causal(model: nn.Module, spec: str) -> None:
    """Refuse a model whose states see later tokens (transformers loads BERT as a 'causal LM' that is not)."""
    was = model.training
    model.eval()
    ids = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 5]]) % model.get_input_embeddings().weight.shape[0]  # (2, 4)
    h = model.base_model(input_ids=ids).last_hidden_state  # (2, 4, D)
    model.train(was)
    if not torch.allclose(h[0, :3], h[1, :3], atol=1e-5):
        raise UserError(f"model.path: {spec} ({type(model).__name__}) attends to later tokens, so it is no causal LM; "
                        "use model.name hf_encoder for a bidirectional encoder")


def _own_mlm_head(model: nn.Module, missing: list[str], spec: str) -> LMHead | None:
    """The BERT-style MLM head inside a *ForMaskedLM (a `transform` before its decoder) if the folder's weights
    held it; None if transformers had to initialise it (a bare encoder, as sentence encoders ship)."""
    decoder = model.get_output_embeddings()
    where = next((n for n, m in model.named_modules() if getattr(m, "decoder", None) is decoder), None)
    parent = model.get_submodule(where) if where is not None else None
    transform = getattr(parent, "transform", None)
    if not isinstance(transform, nn.Module) or not isinstance(decoder, nn.Linear):
        raise UserError(f"model.path: {spec} is a {type(model).__name__}: hf_encoder reads BERT-style masked-LM "
                        "heads (a transform, then a linear decoder)")
    head_keys = {f"{where}.{n}" for n, _ in parent.named_parameters(remove_duplicate=False)}  # tied names too
    body = sorted(set(missing) - head_keys)
    if body:  # a bare encoder misses only its head; anything else missing would start random
        raise UserError(f"model.path: {spec}'s weights lack {len(body)} tensor(s) of a {type(model).__name__} "
                        f"(e.g. {body[0]}): not a checkpoint of this encoder")
    return None if head_keys & set(missing) else LMHead(decoder, transform)


def _masking(p: Pretrained, cfg: HFEncoderConfig, vocab_size: int, transformers: Any) -> BertMasking:
    """The masking of the model's own tokenizer: its mask token and its special tokens (never masked)."""
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(p.dir), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"model.path: cannot read {cfg.path}'s tokenizer ({str(exc).splitlines()[0]})") from None
    if tok.mask_token_id is None:
        raise UserError(f"model.path: {cfg.path}'s tokenizer has no mask token; hf_encoder's masked-LM loss needs one")
    return BertMasking(cfg.mlm_probability, int(tok.mask_token_id), list(tok.all_special_ids), vocab_size)


def build_hf_encoder(cfg: HFEncoderConfig, *, vocab_size: int, max_len: int) -> HFEncoder:
    """Load the BERT-style encoder `cfg.path` names, with its own MLM head where its weights hold one."""
    from llmcli.models.pretrained import resolve

    transformers = _transformers(cfg.name)
    p = resolve(cfg.path)
    model, info = _load(transformers.AutoModelForMaskedLM, p, "a BERT-style encoder (AutoModelForMaskedLM)", quiet=True)
    head = _own_mlm_head(model, list(info.get("missing_keys", [])), cfg.path)
    block = _check_fit(model, cfg.path, cfg.block_size, vocab_size, max_len)
    masking = _masking(p, cfg, vocab_size, transformers)
    # no head of its own: keep the bare encoder (the head transformers initialised is dropped for llmcli's own)
    return HFEncoder(model if head is not None else model.base_model, head, block, p.record(), masking, cfg.pool,
                     cfg.task_input)
