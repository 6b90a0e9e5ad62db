"""Tokenizers: byte-level BPE, characters, raw bytes. Ids 0/1/2 = pad/bos/eos in all three.

All three are `tokenizers.Tokenizer` objects saved as one tokenizer.json, so a run folder loads
any of them the same way. `token_bytes()` gives the UTF-8 bytes each token stands for, which makes
bits-per-byte comparable across tokenizers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import tokenizers

    from llmcli.config import BPETokenizer, ByteTokenizer, CharTokenizer

SPECIALS = ["<pad>", "<bos>", "<eos>"]
PAD, BOS, EOS = 0, 1, 2
UNK = "<unk>"  # the char tokenizer's unknown symbol (id 3)
_ANY_CHAR = r"[\s\S]"  # one piece per character, newlines included


@cache
def byte_to_char() -> dict[int, str]:
    """The byte-level alphabet (GPT-2's): each byte as one printable character."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


@cache
def char_to_byte() -> dict[str, int]:
    """The inverse of `byte_to_char`."""
    return {c: b for b, c in byte_to_char().items()}


class TextTokenizer:
    """A thin wrapper over a `tokenizers.Tokenizer` that also knows each token's byte length."""

    def __init__(self, tok: tokenizers.Tokenizer, unk_bytes: int = 1) -> None:
        from tokenizers import decoders

        self.tok = tok
        self.vocab_size = tok.get_vocab_size()
        self.pad_id, self.bos_id, self.eos_id = PAD, BOS, EOS
        self.byte_level = isinstance(tok.decoder, decoders.ByteLevel)  # bpe and byte; char is not
        self.unk_id = tok.token_to_id(UNK) if not self.byte_level else None
        self.unk_bytes = unk_bytes  # bytes an unknown character is taken to stand for (char only)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (no specials); the batch is encoded in parallel threads."""
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        """Text of a token sequence (specials dropped)."""
        return self.tok.decode(ids, skip_special_tokens=True)

    def stream(self) -> Callable[[int], str | None]:
        """An incremental decoder: feed one id at a time, get the text it adds (None while a character is unfinished).

        Decoding the whole sequence again at every generated token would make a long generation quadratic.
        """
        from tokenizers.decoders import DecodeStream

        ds = DecodeStream(skip_special_tokens=True)
        return lambda i: ds.step(self.tok, i)

    def _raw(self, i: int) -> bytes | None:
        """The bytes token i stands for; None for specials and <unk>."""
        if i < len(SPECIALS) or i == self.unk_id:
            return None
        piece = self.tok.id_to_token(i)
        if self.byte_level:
            return bytes(char_to_byte()[c] for c in piece)
        return piece.encode("utf-8")

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each token stands for (0 for specials): the denominator of bits-per-byte."""
        out = np.zeros(self.vocab_size, dtype=np.int32)
        for i in range(self.vocab_size):
            raw = self._raw(i)
            out[i] = len(raw) if raw is not None else (self.unk_bytes if i == self.unk_id else 0)
        return out

    def fallback_mask(self) -> np.ndarray:
        """True for tokens that are not a whole text piece: <unk>, or bytes that are part of a character."""
        out = np.zeros(self.vocab_size, dtype=bool)
        for i in range(self.vocab_size):
            raw = self._raw(i)
            if raw is None:
                out[i] = i == self.unk_id
                continue
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                out[i] = True
        return out

    def save(self, path: Path) -> None:
        """Write tokenizer.json."""
        Path(path).write_text(self.tok.to_str(), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> TextTokenizer:
        """Read tokenizer.json."""
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)))


def build_bpe(cfg: BPETokenizer, texts: Iterable[str]) -> TextTokenizer:
    """Train a byte-level BPE on the given (training) texts, streamed from an iterator."""
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


def build_char(cfg: CharTokenizer, texts: Iterable[str]) -> TextTokenizer:
    """The most frequent characters of the training texts (count >= min_frequency), plus <unk>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    counts: Counter[str] = Counter()
    for t in texts:
        counts.update(t)
    ranked = sorted((c for c, n in counts.items() if n >= cfg.min_frequency), key=lambda c: (-counts[c], c))
    kept = ranked[: cfg.vocab_size - len(SPECIALS) - 1]
    vocab = {s: i for i, s in enumerate([*SPECIALS, UNK, *kept])}
    dropped = [(len(c.encode("utf-8")), n) for c, n in counts.items() if c not in vocab]
    # an unknown character counts as the mean byte length of the characters left out of the vocabulary
    unk_bytes = max(1, round(sum(b * n for b, n in dropped) / sum(n for _, n in dropped))) if dropped else 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(_ANY_CHAR), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    return TextTokenizer(tok, unk_bytes=unk_bytes)


def build_byte(cfg: ByteTokenizer, texts: Iterable[str] = ()) -> TextTokenizer:
    """One token per byte: id = 3 + byte value. Nothing to learn, so `texts` is not read."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {s: i for i, s in enumerate(SPECIALS)}
    vocab.update({c: len(SPECIALS) + b for b, c in byte_to_char().items()})
    tok = Tokenizer(models.WordLevel(vocab, unk_token=SPECIALS[PAD]))  # never used: every byte is in the vocab
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        pre_tokenizers.Split(Regex(_ANY_CHAR), behavior="isolated"),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return TextTokenizer(tok)
