"""Tiny randomly initialised Hugging Face models, built by transformers and saved with their own tokenizer.

Each builder writes a complete model folder (config.json, model.safetensors, tokenizer.json + tokenizer_config.json)
into `path`, as a real checkpoint from a hub would look, with a tokenizer trained on a few hundred KJV verses so
the built-in corpus tokenizes into real pieces. No network. The three shapes the pretrained code must handle:
- GPT-2: byte-level BPE, bos = eos = <|endoftext|>, no pad token, LM head tied to the embeddings;
- Llama: <unk>/<s>/</s> = 0/1/2, no pad token, an untied LM head, rotary positions;
- BERT: uncased WordPiece, [PAD]=0 [UNK] [CLS] [SEP] [MASK], with or without an MLM head of its own.
"""

from __future__ import annotations

import functools
from pathlib import Path

GPT2_SPECIALS = ["<|endoftext|>"]
LLAMA_SPECIALS = ["<unk>", "<s>", "</s>"]
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@functools.cache
def corpus(n: int = 400) -> tuple[str, ...]:
    """The first `n` KJV verses (what the tokenizers are trained on)."""
    from llmcli.data.bible import iter_verses

    out = []
    for v in iter_verses("kjv"):
        out.append(v.text)
        if len(out) == n:
            break
    return tuple(out)


def _byte_bpe(specials: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer=trainer)
    return tok


def _save_fast(tok, path: Path, **special) -> None:
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=tok, **special).save_pretrained(str(path))


def tiny_gpt2(path: Path, seed: int = 0, n_positions: int = 128) -> Path:
    """A 2-layer GPT-2 (d=32) with a byte-level BPE of 400 tokens; bos = eos = <|endoftext|> (id 0), no pad."""
    import torch
    import transformers

    tok = _byte_bpe(GPT2_SPECIALS, 400)
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=tok.get_vocab_size(),
                                  n_positions=n_positions, bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(str(path))
    _save_fast(tok, path, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    return Path(path)


def tiny_llama(path: Path, seed: int = 0) -> Path:
    """A 2-layer Llama (d=32, rotary, untied LM head) with a byte-level BPE of 400 tokens; <unk>/<s>/</s> = 0/1/2."""
    import torch
    import transformers

    tok = _byte_bpe(LLAMA_SPECIALS, 400)
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, hidden_size=32,
                                   intermediate_size=64, vocab_size=tok.get_vocab_size(), max_position_embeddings=128,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=None, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(path))
    _save_fast(tok, path, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    return Path(path)


def _wordpiece(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=BERT_SPECIALS, show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tok


def tiny_bert(path: Path, seed: int = 0, mlm_head: bool = True) -> Path:
    """A 2-layer BERT (d=32) with an uncased WordPiece of 500 tokens; with `mlm_head` a BertForMaskedLM (its own
    MLM head), else a bare BertModel, as sentence encoders such as all-MiniLM-L6-v2 ship."""
    import torch
    import transformers

    tok = _wordpiece(500)
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(num_hidden_layers=2, num_attention_heads=2, hidden_size=32, intermediate_size=64,
                                  vocab_size=tok.get_vocab_size(), max_position_embeddings=128, pad_token_id=0)
    model = transformers.BertForMaskedLM(cfg) if mlm_head else transformers.BertModel(cfg)
    model.save_pretrained(str(path))
    _save_fast(tok, path, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
               mask_token="[MASK]")
    return Path(path)


BUILDERS = {"gpt2": tiny_gpt2, "llama": tiny_llama, "bert": tiny_bert,
            "bert_bare": functools.partial(tiny_bert, mlm_head=False)}
