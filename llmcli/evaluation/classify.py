"""`llmcli eval --text/--file`: classify given texts with a run's model: the label and its top-k probabilities."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmcli.errors import UserError


def classify(run_dir: str | Path, texts: list[str], *, k: int = 3, checkpoint: str | None = None) -> list[dict[str, Any]]:
    """Per text: the predicted label and the k most probable labels with their probabilities."""
    import torch

    from llmcli.models.load import load_trained

    if not texts:
        raise UserError("eval: no texts to classify")
    run_dir = Path(run_dir)
    t = load_trained(run_dir, checkpoint)  # runs.choose_checkpoint: None = best if the run has it, else last
    tok, names = t.tokenizer, t.manifest["label_names"]
    body = t.cfg.data.max_len - 2  # as in training: [BOS] text [EOS], cut to max_len
    seqs = [[tok.bos_id, *ids[:body], tok.eos_id] for ids in tok.encode_batch(texts)]
    lengths = torch.tensor([len(s) for s in seqs])  # (B,)
    tokens = torch.full((len(seqs), int(lengths.max())), tok.pad_id, dtype=torch.long)  # (B, T) right-padded
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s)
    with torch.inference_mode():
        h = t.model(tokens)  # (B, T, D)
        probs = t.model.cls_head(t.model.pool(h, lengths)).float().softmax(-1)  # (B, C)
    p, i = torch.topk(probs, min(k, probs.shape[1]), dim=-1)  # (B, k)
    return [{"text": text, "label": names[int(ii[0])], "top": [(names[int(c)], float(q)) for q, c in zip(pp, ii)]}
            for text, pp, ii in zip(texts, p, i)]


def read_texts(path: str | Path) -> list[str]:
    """Texts to classify, one per line (blank lines skipped); a missing or empty file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: texts file not found")
    try:
        texts = [x for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    except UnicodeDecodeError:
        raise UserError(f"{path}: texts file is not UTF-8 text") from None
    if not texts:
        raise UserError(f"{path}: texts file is empty (one text per line expected)")
    return texts
