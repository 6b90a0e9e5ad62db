"""Tokenizers: bpe, char (with <unk>), byte; specials 0/1/2; token_bytes makes bits-per-byte comparable."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llmcli.config import validate_config
from llmcli.data.dataset import ProcessedData
from llmcli.data.preprocess import preprocess
from llmcli.data.tokenizers import SPECIALS, UNK, TextTokenizer
from llmcli.registry import registry

TEXTS = ["In the beginning was the Word.", "Grüße, naïve café — 日本 😀", "", "line one\nline two", "aaaa bbbb"]


def tok(name: str, texts=TEXTS, **cfg):
    data = validate_config({"data": {"tokenizer": {"name": name, **cfg}}}).data
    return registry("tokenizer").build(data.tokenizer, texts=iter(texts))


@pytest.fixture(params=["bpe", "char", "byte"])
def any_tok(request):
    return tok(request.param, **({"vocab_size": 300} if request.param == "bpe" else {}))


def test_specials_have_the_same_ids_in_every_tokenizer(any_tok):
    assert [any_tok.tok.token_to_id(s) for s in SPECIALS] == [0, 1, 2]
    assert (any_tok.pad_id, any_tok.bos_id, any_tok.eos_id) == (0, 1, 2)


def test_round_trip_of_unicode_and_empty_text(any_tok, tmp_path):
    for text in TEXTS:
        ids = any_tok.encode_batch([text])[0]
        assert any_tok.decode([1, *ids, 2]) == text
    any_tok.save(tmp_path / "tokenizer.json")
    again = TextTokenizer.load(tmp_path / "tokenizer.json")
    assert again.encode_batch(TEXTS) == any_tok.encode_batch(TEXTS)


def test_streamed_decoding_adds_up_to_the_full_decode_and_holds_back_split_characters(any_tok):
    for text in TEXTS:
        ids = [1, *any_tok.encode_batch([text])[0], 2]
        step = any_tok.stream()
        chunks = [step(i) for i in ids]
        assert "".join(c for c in chunks if c) == text
        assert all("\ufffd" not in c for c in chunks if c)
    if any_tok.byte_level:  # a 4-byte emoji arrives one byte token at a time: nothing until its last byte
        step = any_tok.stream()
        emoji = any_tok.encode_batch(["😀"])[0]
        assert [step(i) for i in emoji][-1] == "😀"


def test_token_bytes_add_up_to_the_utf8_length_for_every_tokenizer(any_tok):
    tb = any_tok.token_bytes()
    assert (tb[:3] == 0).all()
    for text in TEXTS:
        assert int(tb[any_tok.encode_batch([text])[0]].sum()) == len(text.encode("utf-8"))


def test_byte_tokenizer_is_256_bytes_plus_specials():
    t = tok("byte")
    assert t.vocab_size == 259
    assert t.encode_batch(["é"])[0] == [3 + 0xC3, 3 + 0xA9]
    assert t.fallback_mask()[[3 + 0xC3, 3 + ord("a")]].tolist() == [True, False]  # half a character / whole


def test_char_tokenizer_maps_unseen_characters_to_unk_weighted_by_the_dropped_bytes():
    t = tok("char", texts=["aaabb", "a€"], vocab_size=6)  # room for 2 characters: a, b; € is dropped
    assert t.tok.token_to_id(UNK) == 3 and t.unk_id == 3
    assert t.encode_batch(["abé?"])[0] == [4, 5, 3, 3]
    assert t.decode([4, 3]) == "a" + UNK
    assert t.unk_bytes == 3  # the dropped training characters (€) are 3 bytes long
    assert t.fallback_mask()[3] and not t.fallback_mask()[4]


def test_char_min_frequency_drops_rare_characters():
    t = tok("char", texts=["aab"], min_frequency=2)
    assert t.encode_batch(["ab"])[0] == [4, 3]


@pytest.mark.parametrize("name", ["bpe", "char", "byte"])
def test_preprocessed_token_bytes_equal_the_text_bytes_so_bpb_is_comparable(tmp_path, name):
    f = tmp_path / "d.jsonl"
    lines = [json.dumps({"text": f"{w} número {i} ✓", "group": str(i)}) for i, w in enumerate(["x", "yé", "zz"] * 10)]
    f.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    cfg = validate_config({"data": {"source": {"name": "jsonl", "path": str(f)}, "split": {"val": 0.0, "test": 0.2},
                                    "tokenizer": {"name": name, **({"vocab_size": 300} if name == "bpe" else {})},
                                    "train_domains": ["d"], "max_len": 200, "processed_dir": str(tmp_path / "p")}})
    data = ProcessedData(preprocess(cfg.data, log=lambda m: None))
    stats = json.loads((data.path / "stats.json").read_text())
    tokens, tb = np.asarray(data.tokens), data.token_bytes.numpy()
    for split, doms in stats["splits"].items():
        idx = data.indices(split)
        got = sum(int(tb[tokens[data.offsets[i] : data.offsets[i + 1]]].sum()) for i in idx)
        assert got == doms["d"]["text_bytes"]
    assert stats["splits"]["train"]["d"]["text_bytes"] + stats["splits"]["test"]["d"]["text_bytes"] == sum(
        len(json.loads(ln)["text"].encode()) for ln in lines)
