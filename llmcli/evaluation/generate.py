"""`llmcli generate`: sample text from a run, batched over prompts and samples, streamed for one prompt.

Any backbone works through `forward(idx, cache=None) -> (h, cache)`: the prompt is processed once, then one
token per step continues the cache (gpt: keys/values; recurrent backbones: their state). Prompts of different
lengths share one batch when the backbone's forward takes `pad` (left padding with per-row positions, gpt);
other backbones get one batch per prompt (its samples all have the same length).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmcli.config import MAX_BATCH, MAX_NEW_TOKENS, MAX_TEMPERATURE, MAX_TOP_K, SEED_MAX
from llmcli.errors import UserError, too_big

Log = Callable[[str], None]


@dataclass
class Sampling:
    """How to pick tokens and when to stop."""

    max_new_tokens: int = 100
    temperature: float = 0.8
    top_k: int | None = 50
    top_p: float = 1.0
    min_new_tokens: int = 0  # EOS is forbidden before this many tokens (benchmarks: = max_new_tokens)
    stop: tuple[str, ...] = ()

    def check(self) -> None:
        """Reject settings outside their ranges (one line each)."""
        check_sampling(self.temperature, self.top_k, self.top_p, self.max_new_tokens)
        if self.min_new_tokens < 0:
            raise UserError(f"min_new_tokens: must be >= 0, got {self.min_new_tokens}")
        if any(not s for s in self.stop):
            raise UserError("--stop: an empty stop string would stop at once; give non-empty strings")


@dataclass
class Completion:
    """One generated continuation: the prompt it continues, its text and why it ended (eos, stop, length).

    `sample` is the 0-based index among the prompt's num_samples; what a person or script reads (the text
    headers and `--json`) counts from 1.
    """

    prompt: str
    sample: int
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish: str | None = None
    _stream: Any = field(default=None, repr=False, compare=False)  # the tokenizer's incremental decoder

    def as_json(self) -> dict[str, Any]:
        """The JSON-able record `--json` prints."""
        return {"prompt": self.prompt, "sample": self.sample + 1, "text": self.text, "finish": self.finish,
                "n_tokens": len(self.tokens)}


def in_range(flag: str, value: float | None, low: float, high: float, note: str = "") -> None:
    """Reject a flag's value outside [low, high] (NaN included: it fails every comparison)."""
    if value is not None and not low <= value <= high:
        bounds = ", ".join(str(x) if isinstance(x, int) else f"{x:g}" for x in (low, high))
        raise UserError(f"--{flag}: must be in [{bounds}]{note}, got {value}")


def check_sampling(temperature: float, top_k: int | None, top_p: float, max_new_tokens: int) -> None:
    """Reject sampling settings outside their ranges (one line each)."""
    in_range("temperature", temperature, 0, MAX_TEMPERATURE, " (0 = greedy)")
    in_range("top-k", top_k, 1, MAX_TOP_K)
    if not 0 < top_p <= 1:
        raise UserError(f"--top-p: must be in (0, 1], got {top_p}")
    in_range("max-new-tokens", max_new_tokens, 1, MAX_NEW_TOKENS)


def check_options(*, num_samples: int = 1, max_new_tokens: int | None = None, temperature: float | None = None,
                  top_k: int | None = None, top_p: float | None = None, show_probs: int | None = None,
                  seed: int | None = None) -> None:
    """`llmcli generate`'s numbers, checked before anything is loaded or printed (None = the run's config)."""
    in_range("num-samples", num_samples, 1, MAX_BATCH)
    in_range("max-new-tokens", max_new_tokens, 1, MAX_NEW_TOKENS)
    in_range("temperature", temperature, 0, MAX_TEMPERATURE, " (0 = greedy)")
    in_range("top-k", top_k, 1, MAX_TOP_K)
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"--top-p: must be in (0, 1], got {top_p}")
    in_range("show-probs", show_probs, 1, MAX_TOP_K)
    in_range("seed", seed, 0, SEED_MAX)


def sample_next(logits: Any, temperature: float, top_k: int | None, top_p: float, gen: Any) -> Any:
    """One token id per row from (B, V) logits: greedy at temperature 0, else top-k / nucleus sampling."""
    import torch

    if temperature == 0:
        return logits.argmax(-1)  # (B,)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=gen).squeeze(-1)


def takes_padding(backbone: Any) -> bool:
    """Whether the backbone's forward accepts `pad` (left-padded rows of different lengths)."""
    return "pad" in inspect.signature(backbone.forward).parameters


def decode_steps(model: Any, rows: Sequence[Sequence[int]], s: Sampling, gen: Any, *, pad_id: int, eos_id: int,
                 use_cache: bool = True) -> Iterator[Any]:
    """Yield the next token of every row (B,) per step, for s.max_new_tokens steps (the caller may stop early).

    Rows of different lengths are left-padded (the backbone must take `pad`). Without the cache every step
    re-runs the whole context: slower, the same tokens (the reference the cache is tested against).
    When the context fills the block, the most recent half-block is re-encoded and generation goes on.
    """
    import torch
    from torch import nn

    backbone = model.backbone
    lens = [len(r) for r in rows]
    width = max(lens)
    ctx = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T) left-padded
    for i, r in enumerate(rows):
        ctx[i, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
    pad = torch.tensor([width - n for n in lens])  # (B,)
    padded = bool(pad.any())  # checked once per encode, not per step: a cached step is only ~0.2 ms
    if padded and not takes_padding(backbone):
        raise ValueError(f"{type(backbone).__name__} cannot batch rows of different lengths; decode them apart")

    def run(x: Any, cache: Any = None) -> tuple[Any, Any]:
        return backbone(x, cache, pad=pad) if padded else backbone(x, cache)

    block = backbone.block_size
    head = model.lm_head
    with torch.inference_mode():
        # (D, V) contiguous copy of a plain head: (B, D) @ (D, V) is ~1.5x faster than the (V, D) GEMV per token
        head_t = head.weight.t().contiguous() if type(head) is nn.Linear and head.bias is None else None
        h, cache = run(ctx)  # prefill: the prompt is processed once
        for step in range(s.max_new_tokens):
            logits = (h[:, -1] @ head_t if head_t is not None else head(h[:, -1])).float()  # (B, V)
            if step < s.min_new_tokens:
                logits.select(1, eos_id).fill_(float("-inf"))
            nxt = sample_next(logits, s.temperature, s.top_k, s.top_p, gen)  # (B,)
            yield nxt
            ctx = torch.cat([ctx, nxt[:, None]], dim=1)  # (B, T+1)
            if ctx.shape[1] >= block:  # context full: re-encode the most recent half-block
                cut = ctx.shape[1] - block // 2
                ctx, pad = ctx[:, cut:], (pad - cut).clamp(min=0)
                padded = bool(pad.any())
                h, cache = run(ctx)
            elif use_cache:
                h, cache = run(nxt[:, None], cache)  # one new token, cached past
            else:
                h, _ = run(ctx)


def _add(c: Completion, t: int, tok: Any, s: Sampling) -> None:
    """Append one generated token to a completion; set `finish` on EOS, a stop string or the length limit."""
    if t == tok.eos_id:
        c.text, c.finish = tok.decode(c.tokens), "eos"
        return
    if c._stream is None:
        c._stream = tok.stream()
    c.tokens.append(t)
    c.text += c._stream(t) or ""  # incremental: an unfinished multi-byte character waits for its next token
    if len(c.tokens) >= s.max_new_tokens:
        c.text = tok.decode(c.tokens)  # the last step decodes everything once, unfinished character included
    hits = [i for i in (c.text.find(x) for x in s.stop) if i >= 0]
    if hits:
        c.text, c.finish = c.text[: min(hits)], "stop"
    elif len(c.tokens) >= s.max_new_tokens:
        c.finish = "length"


def visible(c: Completion, s: Sampling) -> str:
    """Text of a completion that can be printed now: complete characters, no possible stop-string prefix."""
    if c.finish:
        return c.text
    hold = max((len(x) for x in s.stop), default=1) - 1  # a stop string may still be forming
    text = c.text[: len(c.text) - hold] if hold else c.text
    return text[:-1] if text.endswith("\ufffd") else text  # wait until a multi-byte character is complete


def _prompt_ids(tok: Any, prompt: str, block: int, log: Log | None = None) -> list[int]:
    """BOS + the prompt's tokens, cut to the last `block` (the model sees no more); `log` hears of a cut."""
    ids = [tok.bos_id, *tok.encode_batch([prompt])[0]] if prompt else [tok.bos_id]
    if len(ids) > block and log is not None:
        log(f"warning: prompt {prompt[:30]!r}{'...' * (len(prompt) > 30)} is {len(ids)} tokens (BOS included); "
            f"the model sees only its last {block} (model.block_size)")
    return ids[-block:]


def _load(run_dir: str | Path, checkpoint: str | None) -> Any:
    """The run's model; checkpoint None = best if the run has it, else last; an asked one must exist."""
    from llmcli.models.load import load_trained

    with too_big(f"{run_dir}: its model (model.* in config.yaml)"):
        t = load_trained(Path(run_dir), checkpoint)
    if not t.model.backbone.causal():
        raise UserError(f"generate needs a causal model; {run_dir} is an {t.cfg.model.name} (a masked-LM encoder)")
    return t


def settings(cfg: Any, *, max_new_tokens: int | None = None, temperature: float | None = None, top_k: int | None = -1,
             top_p: float | None = None, min_new_tokens: int = 0, stop: Sequence[str] = ()) -> Sampling:
    """The run's generate defaults with the given overrides (top_k=-1: the config's), validated."""
    g = cfg.generate
    s = Sampling(max_new_tokens=g.max_new_tokens if max_new_tokens is None else max_new_tokens,
                 temperature=g.temperature if temperature is None else temperature,
                 top_k=g.top_k if top_k == -1 else top_k, top_p=g.top_p if top_p is None else top_p,
                 min_new_tokens=min_new_tokens, stop=tuple(stop))
    s.check()
    return s


def complete(t: Any, prompts: Sequence[str], s: Sampling, *, num_samples: int = 1, seed: int = 0,
             use_cache: bool = True, log: Log | None = None) -> Iterator[list[Completion]]:
    """Generate for a loaded run; yields the completions of one batch at a time, filled in step by step.

    The same list is yielded after every step (streaming reads it); each batch ends when every row finished.
    `log` is told when a prompt is longer than the model's context.
    """
    import torch

    check_options(num_samples=num_samples, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    tok, model = t.tokenizer, t.model
    jobs = [(p, k) for p in prompts for k in range(num_samples)]
    # one batch for all prompts when the backbone takes left padding; otherwise one batch per prompt
    per_prompt = [jobs[i:i + num_samples] for i in range(0, len(jobs), num_samples)]
    batches = [jobs] if takes_padding(model.backbone) else per_prompt
    encoded: dict[str, list[int]] = {}  # each distinct prompt encoded (and warned about) once
    for batch in batches:
        rows = [Completion(p, k) for p, k in batch]
        for p, _ in batch:
            if p not in encoded:
                encoded[p] = _prompt_ids(tok, p, model.backbone.block_size, log)
        ids = [encoded[p] for p, _ in batch]
        steps = decode_steps(model, ids, s, gen, pad_id=tok.pad_id, eos_id=tok.eos_id, use_cache=use_cache)
        with too_big(f"--num-samples {num_samples} x {len(prompts)} prompt(s) ({len(rows)} rows in one batch)"):
            for nxt in steps:
                for c, x in zip(rows, nxt.tolist()):
                    if not c.finish:
                        _add(c, x, tok, s)
                yield rows
                if all(c.finish for c in rows):
                    break


def generate_all(run_dir: str | Path, prompts: Sequence[str], *, num_samples: int = 1, seed: int | None = None,
                 checkpoint: str | None = None, use_cache: bool = True, log: Log | None = None,
                 **overrides: Any) -> list[Completion]:
    """Every completion of every prompt (num_samples each), generated in batches."""
    if not prompts:
        raise UserError("generate: no prompts given")
    t = _load(run_dir, checkpoint)
    s = settings(t.cfg, **overrides)
    out: list[Completion] = []
    last: list[Completion] = []
    for rows in complete(t, prompts, s, num_samples=num_samples, seed=t.cfg.generate.seed if seed is None else seed,
                         use_cache=use_cache, log=log):
        if rows is not last:  # a new batch began: the previous one is done
            out += last
            last = rows
    return out + last


def generate(run_dir: str | Path, prompt: str, *, seed: int | None = None, checkpoint: str | None = None,
             use_cache: bool = True, log: Log | None = None, **overrides: Any) -> Iterator[str]:
    """Text pieces continuing `prompt` until EOS, a stop string or max_new_tokens (settings default to the config).

    The run is loaded and the settings checked now, so a bad run or value fails before the caller prints anything.
    """
    t = _load(run_dir, checkpoint)
    s = settings(t.cfg, **overrides)
    rows = complete(t, [prompt], s, seed=t.cfg.generate.seed if seed is None else seed, use_cache=use_cache, log=log)
    return _pieces(rows, s)


def _pieces(rows: Iterator[list[Completion]], s: Sampling) -> Iterator[str]:
    """The newly visible text of a one-row generation, step by step."""
    shown = ""
    for (c,) in rows:
        text = visible(c, s)
        if len(text) > len(shown):
            yield text[len(shown):]
            shown = text


def top_next(run_dir: str | Path, prompts: Sequence[str], k: int, *,
             checkpoint: str | None = None) -> dict[str, list[tuple[str, float]]]:
    """Per prompt: the k most probable next tokens (temperature 1) with their probabilities."""
    import torch

    check_options(show_probs=k)
    t = _load(run_dir, checkpoint)
    out = {}
    for prompt in prompts:
        ids = _prompt_ids(t.tokenizer, prompt, t.model.backbone.block_size)  # generation itself warns of a cut
        with torch.inference_mode():
            h, _ = t.model.backbone(torch.tensor([ids]))  # (1, T, D)
            probs = t.model.lm_head(h[:, -1]).float().softmax(-1)[0]  # (V,)
        p, i = torch.topk(probs, min(k, probs.numel()))
        out[prompt] = [(t.tokenizer.decode([int(j)]), float(q)) for q, j in zip(p, i)]
    return out


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a file, one per line (blank lines skipped); a missing or empty file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: prompts file not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{path}: prompts file is not UTF-8 text") from None
    prompts = [x for x in lines if x.strip()]
    if not prompts:
        raise UserError(f"{path}: prompts file is empty (one prompt per line expected)")
    return prompts
