"""Tokenizers. Every record becomes [BOS] text [EOS]; PAD fills batches. Ids 0/1/2 = pad/bos/eos."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

SPECIALS = ["<pad>", "<bos>", "<eos>"]
PAD, BOS, EOS = 0, 1, 2


class TextTokenizer:
    """A thin wrapper over a `tokenizers.Tokenizer` that also knows each token's byte length."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self.vocab_size = tok.get_vocab_size()
        self.pad_id, self.bos_id, self.eos_id = PAD, BOS, EOS

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (no specials)."""
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        """Text of a token sequence (specials dropped)."""
        return self.tok.decode(ids, skip_special_tokens=True)

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each token stands for (0 for specials): the denominator of bits-per-byte."""
        # Byte-level BPE writes each byte as one printable character, so a token's length in
        # characters is its length in bytes.
        out = np.zeros(self.vocab_size, dtype=np.int32)
        for i in range(self.vocab_size):
            out[i] = 0 if i < len(SPECIALS) else len(self.tok.id_to_token(i))
        return out

    def save(self, path: Path) -> None:
        """Write tokenizer.json."""
        Path(path).write_text(self.tok.to_str(), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> TextTokenizer:
        """Read tokenizer.json."""
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)))


def build_bpe(cfg: Any, texts: Iterable[str]) -> TextTokenizer:
    """Train a byte-level BPE on the given (training) texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return TextTokenizer(tok)
