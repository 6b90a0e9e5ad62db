"""`llmcli generate`: sample text from a run, streamed as it is produced (KV-cached for gpt)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmcli.errors import UserError


def check_sampling(temperature: float, top_k: int | None, top_p: float, max_new_tokens: int) -> None:
    """Reject sampling settings outside their ranges (one line each)."""
    if temperature < 0:
        raise UserError(f"--temperature: must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise UserError(f"--top-k: must be >= 1, got {top_k}")
    if not 0 < top_p <= 1:
        raise UserError(f"--top-p: must be in (0, 1], got {top_p}")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens: must be >= 1, got {max_new_tokens}")


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


def generate(run_dir: str | Path, prompt: str, *, max_new_tokens: int | None = None,
             temperature: float | None = None, top_k: int | None = -1, top_p: float | None = None,
             seed: int | None = None, checkpoint: str = "best") -> Iterator[str]:
    """Yield text pieces continuing `prompt` until EOS or max_new_tokens (settings default to the config)."""
    import torch

    from llmcli.models.load import load_trained

    run_dir = Path(run_dir)
    which = checkpoint if (run_dir / "checkpoints" / f"{checkpoint}.safetensors").is_file() else "last"
    t = load_trained(run_dir, which)
    g = t.cfg.generate
    max_new_tokens = g.max_new_tokens if max_new_tokens is None else max_new_tokens
    temperature = g.temperature if temperature is None else temperature
    top_k = g.top_k if top_k == -1 else top_k
    top_p = g.top_p if top_p is None else top_p
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    gen = torch.Generator().manual_seed(g.seed if seed is None else seed)
    tok, backbone = t.tokenizer, t.model.backbone
    ids = [tok.bos_id, *tok.encode_batch([prompt])[0]] if prompt else [tok.bos_id]
    block = backbone.block_size
    ids = ids[-block:]
    out: list[int] = []
    shown = ""
    with torch.inference_mode():
        h, cache = backbone(torch.tensor([ids]))  # prefill: the prompt is processed once
        for _ in range(max_new_tokens):
            nxt = int(sample_next(t.model.lm_head(h[:, -1]), temperature, top_k, top_p, gen)[0])
            if nxt == tok.eos_id:
                break
            out.append(nxt)
            text = tok.decode(out)
            if not text.endswith("\ufffd"):  # wait until a multi-byte character is complete
                yield text[len(shown):]
                shown = text
            if len(ids) + len(out) >= block:  # context full: re-encode the most recent half-block
                window = (ids + out)[-(block // 2):]
                h, cache = backbone(torch.tensor([window]))
            else:
                h, cache = backbone(torch.tensor([[nxt]]), cache)  # one new token, cached past
    if tok.decode(out) != shown:
        yield tok.decode(out)[len(shown):]
