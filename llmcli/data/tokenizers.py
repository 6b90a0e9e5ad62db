"""Tokenizers: byte-level BPE, characters, raw bytes (ids 0/1/2 = pad/bos/eos), and a pretrained model's own.

All are `tokenizers.Tokenizer` objects saved as one tokenizer.json, so a run folder loads any of them the same
way (`TextTokenizer.load`). `token_bytes()` gives the UTF-8 bytes each token stands for, which makes
bits-per-byte comparable across tokenizers.

A pretrained tokenizer (`build_pretrained`) is the model's tokenizer.json, never trained, with the model's own
BOS/EOS/PAD ids. Its saved tokenizer.json carries those ids in the file's own fields, so whoever loads it (eval,
generate, `eval --data`, `train.init_from`) gets the same ids from the file alone: the post-processor template
`[BOS] $A [EOS]` (exactly llmcli's record layout) and the padding id. A file without that template (the trained
tokenizers, whose files are left as they were) has the 0/1/2 convention.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llmcli.errors import UserError

if TYPE_CHECKING:
    import tokenizers

    from llmcli.config.schema import BPETokenizer, ByteTokenizer, CharTokenizer, PretrainedTokenizer

SPECIALS = ["<pad>", "<bos>", "<eos>"]
PAD, BOS, EOS = 0, 1, 2
UNK = "<unk>"  # the char tokenizer's unknown symbol (id 3)
_ANY_CHAR = r"[\s\S]"  # one piece per character, newlines included
FIELD = "data.tokenizer.path"
METASPACE = "\u2581"  # SentencePiece's word-boundary mark: one space byte
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece byte fallback: one raw byte
# The files of a model folder a pretrained tokenizer's ids and specials come from (the processed-data cache
# records each one's sha256, so a changed tokenizer rebuilds the data).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "config.json")


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


def _has_type(node: Any, name: str) -> bool:
    """Whether a tokenizer.json component (or one inside a Sequence of them) is of type `name`."""
    if not isinstance(node, dict):
        return False
    return node.get("type") == name or any(_has_type(x, name) for k in ("decoders", "pretokenizers", "normalizers")
                                           for x in node.get(k) or [])


def _unk_token(spec: dict[str, Any]) -> str | None:
    """The model's unknown-token string (WordPiece/BPE/WordLevel name it, Unigram gives its id)."""
    model = spec.get("model") or {}
    if model.get("type") == "Unigram" and model.get("unk_id") is not None:
        return model["vocab"][model["unk_id"]][0]
    return model.get("unk_token")


def _is_punctuation(piece: str) -> bool:
    return all(unicodedata.category(c)[0] in "PS" for c in piece)


class TextTokenizer:
    """A thin wrapper over a `tokenizers.Tokenizer` that also knows each token's byte length and its special ids."""

    def __init__(self, tok: tokenizers.Tokenizer, unk_bytes: int = 1, *, pad_id: int = PAD, bos_id: int = BOS,
                 eos_id: int = EOS) -> None:
        spec = json.loads(tok.to_str())
        self.tok = tok
        added = tok.get_added_tokens_decoder()
        self.vocab_size = max(tok.get_vocab_size(), max(tok.get_vocab().values(), default=-1) + 1)
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        self.byte_level = _has_type(spec.get("decoder"), "ByteLevel")  # bpe, byte, GPT-2-style; not char, BERT, SP
        self.unk_id = None if self.byte_level else tok.token_to_id(_unk_token(spec) or UNK)
        self.unk_bytes = unk_bytes  # bytes an unknown piece is taken to stand for
        self.special_ids = frozenset(i for i, t in added.items() if t.special)
        self.added = {i: t.content for i, t in added.items() if not t.special}  # literal text, matched before the model
        model = spec.get("model") or {}
        self.wordpiece_prefix = model.get("continuing_subword_prefix", "##") if model.get("type") == "WordPiece" else None
        self.metaspace = any(METASPACE in json.dumps(spec.get(k), ensure_ascii=False)
                             for k in ("normalizer", "pre_tokenizer", "decoder"))
        self.byte_fallback = bool(model.get("byte_fallback"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (no specials: the tokenizer's own post-processor is not applied); encoded in
        parallel threads."""
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
        """The bytes token i stands for; None for specials, <unk> and unused ids.

        Byte-level pieces are exact. The others: a SentencePiece "▁" is one space byte and a byte-fallback piece
        "<0xNN>" one byte (exact, but for the space SentencePiece adds before a text's first word). WordPiece
        drops the spaces between words, so a word-initial piece counts one preceding space (a continuation "##x"
        counts x; a punctuation piece no space): about one byte per text too many (the first word's space), and
        lower-casing or accent stripping changes a few more (+0.8 to +1.1 % on the five built-in Englishes).
        """
        if i in self.special_ids or i == self.unk_id:
            return None
        if i in self.added:
            return self.added[i].encode("utf-8")
        piece = self.tok.id_to_token(i)
        if piece is None:
            return None
        if self.byte_level:
            table = char_to_byte()
            return b"".join(bytes([table[c]]) if c in table else c.encode("utf-8") for c in piece)
        if self.wordpiece_prefix is not None:
            if piece.startswith(self.wordpiece_prefix):
                return piece[len(self.wordpiece_prefix):].encode("utf-8")
            return piece.encode("utf-8") if _is_punctuation(piece) else b" " + piece.encode("utf-8")
        byte = _BYTE_PIECE.fullmatch(piece) if self.byte_fallback else None
        if byte:
            return bytes([int(byte.group(1), 16)])
        return (piece.replace(METASPACE, " ") if self.metaspace else piece).encode("utf-8")

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

    def to_json(self) -> str:
        """The tokenizer.json text; ids other than llmcli's 0/1/2 are written into its template and padding."""
        if (self.pad_id, self.bos_id, self.eos_id) == (PAD, BOS, EOS):
            return self.tok.to_str()
        spec = json.loads(self.tok.to_str())
        bos, eos, pad = (self.tok.id_to_token(i) for i in (self.bos_id, self.eos_id, self.pad_id))
        special = [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                   {"SpecialToken": {"id": eos, "type_id": 0}}]
        pair = [*special, {"Sequence": {"id": "B", "type_id": 1}}, {"SpecialToken": {"id": eos, "type_id": 1}}]
        spec["post_processor"] = {"type": "TemplateProcessing", "single": special, "pair": pair, "special_tokens": {
            t: {"id": t, "ids": [i], "tokens": [t]} for t, i in ((bos, self.bos_id), (eos, self.eos_id))}}
        spec["padding"] = {"strategy": "BatchLongest", "direction": "Right", "pad_to_multiple_of": None,
                           "pad_id": self.pad_id, "pad_type_id": 0, "pad_token": pad}
        spec["truncation"] = None
        return json.dumps(spec, ensure_ascii=False)

    def save(self, path: Path) -> None:
        """Write tokenizer.json (with the special ids, see `to_json`)."""
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> TextTokenizer:
        """Read tokenizer.json, with the special ids it records (the 0/1/2 convention where it records none)."""
        from tokenizers import Tokenizer

        text = Path(path).read_text(encoding="utf-8")
        tok = Tokenizer.from_str(text)
        pad, bos, eos = recorded_specials(json.loads(text))
        tok.no_padding()  # llmcli pads and cuts records itself
        tok.no_truncation()
        return cls(tok, pad_id=pad, bos_id=bos, eos_id=eos)


def recorded_specials(spec: dict[str, Any]) -> tuple[int, int, int]:
    """(pad, bos, eos) a tokenizer.json records: a `[BOS] $A [EOS]` template and its padding id; else 0/1/2."""
    pp = spec.get("post_processor") or {}
    single = pp.get("single") or [] if pp.get("type") == "TemplateProcessing" else []
    kinds = [next(iter(x), None) if isinstance(x, dict) else None for x in single]
    if kinds != ["SpecialToken", "Sequence", "SpecialToken"]:
        return PAD, BOS, EOS
    bos, eos = (pp["special_tokens"][single[k]["SpecialToken"]["id"]]["ids"][0] for k in (0, 2))
    return int((spec.get("padding") or {}).get("pad_id", eos)), int(bos), int(eos)


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


# ---------------------------------------------------------------- a pretrained model's own tokenizer


def build_pretrained(cfg: PretrainedTokenizer, texts: Iterable[str] = ()) -> TextTokenizer:
    """The tokenizer of the model `cfg.path` names, with its own special ids; never trained, so `texts` is not read."""
    from llmcli.models.pretrained import resolve

    if cfg.path is None:  # the config loader fills it from model.path; a direct caller must name the model
        raise UserError(f"{FIELD}: null (the model's own tokenizer) needs a pretrained model.path; name the model")
    return from_model_dir(resolve(cfg.path, FIELD).dir)


def tokenizer_inputs(cfg: Any) -> list[Path]:
    """The files a tokenizer config reads (its ids depend on each): a pretrained model's tokenizer files; none for a
    tokenizer trained on the data (the data itself is its input)."""
    if cfg.name != "pretrained" or cfg.path is None:
        return []
    from llmcli.models.pretrained import resolve

    folder = resolve(cfg.path, FIELD).dir
    return [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]


def from_model_dir(folder: Path, field: str = FIELD) -> TextTokenizer:
    """A model folder's tokenizer: its tokenizer.json through `tokenizers` (where it has none, the one
    transformers builds from its other files), BOS/EOS/PAD from its tokenizer config."""
    folder = Path(folder)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES if name != "config.json"):
        raise UserError(f"{field}: {folder} has no tokenizer (no {', '.join(TOKENIZER_FILES[:-1])}); "
                        "name a model folder that ships its tokenizer")
    shipped = folder / "tokenizer.json"
    tok = _read_tokenizer_json(shipped, field) if shipped.is_file() else None  # read first: its errors are clearer
    auto = _auto_tokenizer(folder, field)
    tok = tok or _backend(folder, auto, field)
    tok.no_padding()  # some models ship a padded, truncated tokenizer.json (all-MiniLM-L6-v2: 128); llmcli does both
    tok.no_truncation()
    pad, bos, eos = model_specials(auto, folder, field)
    out = TextTokenizer(tok, pad_id=pad, bos_id=bos, eos_id=eos)
    bad = [i for i in (pad, bos, eos) if not 0 <= i < out.vocab_size]
    if bad:
        raise UserError(f"{field}: {folder}: special token id {bad[0]} is outside its vocabulary of {out.vocab_size}")
    return out


def _auto_tokenizer(folder: Path, field: str) -> Any:
    """transformers' tokenizer of a model folder (what names the specials), offline."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise UserError(f"{field}: a pretrained tokenizer needs transformers: pip install 'llmcli[hf]'") from None
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds (OSError, ValueError, KeyError, ...)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{field}: {folder}: transformers cannot read its tokenizer ({first})") from None


def _read_tokenizer_json(path: Path, field: str) -> tokenizers.Tokenizer:
    """A model's tokenizer.json as it ships."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - the tokenizers library raises a bare Exception on a bad file
        raise UserError(f"{field}: {path}: not a readable tokenizer.json ({exc})") from None


def _backend(folder: Path, auto: Any, field: str) -> tokenizers.Tokenizer:
    """The tokenizer transformers builds for a folder without tokenizer.json (a copy of its backend)."""
    from tokenizers import Tokenizer

    backend = getattr(auto, "backend_tokenizer", None)  # a transformers object: slow tokenizers have none
    if backend is None:
        raise UserError(f"{field}: {folder} has no tokenizer.json and its {type(auto).__name__} has no fast "
                        "(tokenizers) form; llmcli needs a tokenizer.json")
    return Tokenizer.from_str(backend.to_str())


def model_specials(auto: Any, folder: Path, field: str = FIELD) -> tuple[int, int, int]:
    """(pad, bos, eos) of a model: BERT-style (CLS and SEP) frame a record [CLS] ... [SEP]; others BOS ... EOS
    (one of the two stands for both where a model names only one: GPT-2's <|endoftext|>, Qwen's missing BOS);
    no pad token: the EOS id (padding is masked by the records' lengths, so it is never a target)."""
    config = _json(folder / "config.json")  # ids the tokenizer files leave out (older checkpoints)

    def token_id(name: str) -> int | None:
        value = getattr(auto, f"{name}_token_id", None)
        if value is None:
            value = config.get(f"{name}_token_id")
            value = (value or [None])[0] if isinstance(value, list) else value  # Llama-3 lists several EOS ids
        return value

    cls, sep = token_id("cls"), token_id("sep")
    bos, eos = (cls, sep) if cls is not None and sep is not None else (token_id("bos"), token_id("eos"))
    bos, eos = (bos if bos is not None else eos), (eos if eos is not None else bos)
    if bos is None or eos is None:
        raise UserError(f"{field}: the tokenizer of {folder} names no BOS/EOS (or CLS/SEP) token; llmcli frames "
                        "every record with them")
    pad = token_id("pad")
    return (eos if pad is None else int(pad)), int(bos), int(eos)


def _json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
