"""`generate`: sampling settings, seeds, streaming."""

from __future__ import annotations

import pytest
import torch

from llmcli.errors import UserError
from llmcli.evaluation.generate import generate, sample_next


def text(run, prompt="In the beginning", **kw):
    return "".join(generate(run, prompt, **kw))


def test_same_seed_same_text_and_greedy_is_deterministic(tiny_run):
    assert text(tiny_run, seed=1, temperature=1.0) == text(tiny_run, seed=1, temperature=1.0)
    assert text(tiny_run, seed=1, temperature=1.0) != text(tiny_run, seed=2, temperature=1.0)
    assert text(tiny_run, temperature=0, seed=1) == text(tiny_run, temperature=0, seed=2)


def test_max_new_tokens_bounds_the_output(tiny_run):
    from llmcli.data.tokenizers import TextTokenizer

    tok = TextTokenizer.load(tiny_run / "tokenizer.json")
    out = text(tiny_run, max_new_tokens=5, temperature=1.0, top_k=None, seed=0)
    assert len(tok.encode_batch([out])[0]) <= 6


def test_generation_continues_past_the_block_size(tiny_run):
    out = text(tiny_run, max_new_tokens=150, temperature=0)  # block_size is 64 in tiny.yaml
    assert len(out) > 0


def test_top_k_one_is_greedy_and_top_p_keeps_the_nucleus():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9]])
    g = torch.Generator().manual_seed(0)
    assert all(int(sample_next(logits, 1.0, 1, 1.0, g)[0]) == 1 for _ in range(20))
    # probabilities ~ [.02, .48, .07, .43]: top_p=0.4 keeps only the first; 0.8 keeps the top two
    assert all(int(sample_next(logits, 1.0, None, 0.4, g)[0]) == 1 for _ in range(20))
    assert {int(sample_next(logits, 1.0, None, 0.8, g)[0]) for _ in range(200)} == {1, 3}


@pytest.mark.parametrize(("kw", "flag"), [({"top_p": 0.0}, "--top-p"), ({"temperature": -1.0}, "--temperature"),
                                          ({"max_new_tokens": 0}, "--max-new-tokens"), ({"top_k": 0}, "--top-k")])
def test_bad_sampling_settings(tiny_run, kw, flag):
    with pytest.raises(UserError, match=flag):
        text(tiny_run, **kw)


def _greedy_by_hand(run, prompt, n):
    """Reference: re-run the whole sequence through the model for every token, no cache, no batching."""
    from llmcli.models.load import load_trained

    t = load_trained(run, "best")
    ids = [t.tokenizer.bos_id, *t.tokenizer.encode_batch([prompt])[0]]
    out = []
    with torch.inference_mode():
        for _ in range(n):
            h, _ = t.model.backbone(torch.tensor([ids + out]))  # (1, T, D)
            logits = t.model.lm_head(h[:, -1])  # (1, V)
            logits[:, t.tokenizer.eos_id] = float("-inf")
            out.append(int(logits.argmax(-1)))
    return out


def test_cached_generation_gives_exactly_the_tokens_of_uncached_greedy_decoding(tiny_run):
    from llmcli.evaluation.generate import generate_all

    kw = {"temperature": 0, "max_new_tokens": 40, "min_new_tokens": 40}
    cached = generate_all(tiny_run, ["In the beginning"], **kw)[0]
    uncached = generate_all(tiny_run, ["In the beginning"], use_cache=False, **kw)[0]
    assert len(cached.tokens) == 40 and cached.finish == "length"
    assert cached.tokens == uncached.tokens == _greedy_by_hand(tiny_run, "In the beginning", 40)
    # past the block size (64) both re-encode the same window, so they still agree
    kw = {"temperature": 0, "max_new_tokens": 120, "min_new_tokens": 120}
    assert generate_all(tiny_run, [""], **kw)[0].tokens == generate_all(tiny_run, [""], use_cache=False, **kw)[0].tokens


def test_the_incrementally_decoded_text_is_the_decode_of_the_tokens(tiny_run):
    from llmcli.data.tokenizers import TextTokenizer
    from llmcli.evaluation.generate import generate_all

    tok = TextTokenizer.load(tiny_run / "tokenizer.json")
    hot = generate_all(tiny_run, ["In the beginning"] * 4, num_samples=2, temperature=2.0, top_k=None,
                       max_new_tokens=60, seed=3)  # hot sampling: odd byte sequences, EOS and length endings
    assert all(c.text == tok.decode(c.tokens) for c in hot) and {c.finish for c in hot} <= {"eos", "length"}


def test_left_padded_batch_gives_each_prompt_its_own_greedy_tokens(tiny_run):
    from llmcli.evaluation.generate import generate_all

    prompts = ["In the beginning God created", "And", "The LORD is my shepherd; I shall not"]
    kw = {"temperature": 0, "max_new_tokens": 30, "min_new_tokens": 30}
    batched = generate_all(tiny_run, prompts, **kw)
    assert [c.prompt for c in batched] == prompts
    for c in batched:
        assert c.tokens == generate_all(tiny_run, [c.prompt], **kw)[0].tokens


def test_padding_mask_and_positions_leave_real_states_unchanged():
    from types import SimpleNamespace

    from llmcli.models.gpt import GPT

    torch.manual_seed(0)
    m = GPT(SimpleNamespace(d_model=16, n_head=2, n_layer=2, dropout=0.0, bias=True), 50, 32).eval()
    row = torch.randint(3, 50, (1, 5))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), row], 1)  # (1, 8): 3 pads on the left
    alone, _ = m(row)
    h, cache = m(padded, pad=torch.tensor([3]))
    assert torch.allclose(h[:, 3:], alone, atol=1e-5) and not torch.isnan(h).any()
    nxt = torch.tensor([[7]])
    step, _ = m(nxt, cache, pad=torch.tensor([3]))
    full, _ = m(torch.cat([row, nxt], 1))
    assert torch.allclose(step[:, -1], full[:, -1], atol=1e-5)


def test_a_backbone_without_padding_gets_one_batch_per_prompt(tiny_run):
    from llmcli.evaluation.generate import Sampling, complete, generate_all, takes_padding
    from llmcli.models.load import load_trained

    class NoPad(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.block_size = inner, inner.block_size

        def forward(self, idx, cache=None):
            return self.inner(idx, cache)

    t = load_trained(tiny_run, "best")
    t.model.backbone = NoPad(t.model.backbone)
    assert not takes_padding(t.model.backbone)
    prompts = ["In the beginning God created", "And"]
    s = Sampling(max_new_tokens=12, temperature=0, min_new_tokens=12)
    batches = []
    for rows in complete(t, prompts, s, num_samples=2):
        if not batches or rows is not batches[-1]:
            batches.append(rows)
    assert [[c.prompt for c in b] for b in batches] == [[prompts[0]] * 2, [prompts[1]] * 2]
    ref = generate_all(tiny_run, prompts, num_samples=2, temperature=0, max_new_tokens=12, min_new_tokens=12)
    assert [c.tokens for b in batches for c in b] == [c.tokens for c in ref]


def test_num_samples_are_distinct_and_reproducible(tiny_run):
    from llmcli.evaluation.generate import generate_all

    kw = {"num_samples": 3, "temperature": 1.0, "top_k": None, "max_new_tokens": 15, "seed": 4}
    a, b = generate_all(tiny_run, ["And"], **kw), generate_all(tiny_run, ["And"], **kw)
    assert [c.sample for c in a] == [0, 1, 2] and [c.text for c in a] == [c.text for c in b]
    assert len({c.text for c in a}) > 1


def test_stop_string_ends_the_text_before_it(tiny_run):
    from llmcli.evaluation.generate import generate_all

    kw = {"temperature": 0, "max_new_tokens": 30, "min_new_tokens": 30}
    full = generate_all(tiny_run, ["In the beginning"], **kw)[0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    c = generate_all(tiny_run, ["In the beginning"], stop=[stop], **kw)[0]
    assert c.finish == "stop" and c.text == full[: full.index(stop)]
    # streaming never shows any part of the stop string
    assert text(tiny_run, stop=[stop], **kw) == c.text


def test_show_probs_are_the_models_next_token_distribution(tiny_run):
    from llmcli.evaluation.generate import top_next

    top = top_next(tiny_run, ["And", "In the beginning"], 5)["In the beginning"]
    probs = [p for _, p in top]
    assert len(top) == 5 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    greedy = text(tiny_run, temperature=0, max_new_tokens=1, min_new_tokens=1)
    assert greedy == top[0][0]
    with pytest.raises(UserError, match=r"--show-probs: must be in \[1, 1000000\], got 0"):
        top_next(tiny_run, ["And"], 0)


def test_prompts_file(tmp_path):
    from llmcli.evaluation.generate import read_prompts

    f = tmp_path / "p.txt"
    f.write_text("first\n\n  \nsecond line\n")
    assert read_prompts(f) == ["first", "second line"]
    f.write_text("\n\n")
    with pytest.raises(UserError, match=r"p.txt: prompts file is empty"):
        read_prompts(f)
    with pytest.raises(UserError, match="prompts file not found"):
        read_prompts(tmp_path / "missing.txt")


def test_generate_cli_batches_prompts_as_json_and_rejects_bad_input(tiny_run, tmp_path):
    import json
    import shutil

    from typer.testing import CliRunner

    from llmcli.cli import app

    def run(*args):
        return CliRunner().invoke(app, ["generate", str(tiny_run), *args])

    f = tmp_path / "prompts.txt"
    f.write_text("And\nIn the beginning\n")
    out = run("-p", "The LORD", "--prompts-file", str(f), "--num-samples", "2", "-n", "5", "--json",
              "--show-probs", "3")
    assert out.exit_code == 0, out.output
    doc = json.loads(out.stdout)
    assert [(c["prompt"], c["sample"]) for c in doc["completions"]] == [
        (p, k) for p in ("The LORD", "And", "In the beginning") for k in (1, 2)]  # from 1, as the text headers
    assert all(c["n_tokens"] <= 5 for c in doc["completions"]) and len(doc["next_token_probs"]["And"]) == 3
    f.write_text("")
    bare = tmp_path / "bare"
    shutil.copytree(tiny_run, bare)
    shutil.rmtree(bare / "checkpoints")
    for args, msg in ((["--top-p", "0"], "--top-p: must be in (0, 1], got 0.0"),
                      (["-t", "-1"], "--temperature: must be in [0, 100] (0 = greedy), got -1.0"),
                      (["-n", "0"], "--max-new-tokens: must be in [1, 1000000], got 0"),
                      (["--prompts-file", str(f)], f"{f}: prompts file is empty (one prompt per line expected)")):
        bad = run(*args)
        assert bad.exit_code == 2 and bad.stderr.strip() == f"error: {msg}"
    bad = CliRunner().invoke(app, ["generate", str(bare)])
    assert bad.exit_code == 2 and len(bad.stderr.strip().splitlines()) == 1 and "no last checkpoint" in bad.stderr


def test_text_and_json_count_samples_alike(tiny_run):
    import json

    from typer.testing import CliRunner

    from llmcli.cli import app

    args = ["generate", str(tiny_run), "-p", "And", "--num-samples", "2", "-n", "3", "--seed", "1"]
    text_out, json_out = CliRunner().invoke(app, args), CliRunner().invoke(app, [*args, "--json"])
    headers = [ln for ln in text_out.stdout.splitlines() if ln.startswith("--- prompt")]
    assert [h.split(",")[1].split("(")[0].strip() for h in headers] == ["sample 1", "sample 2"]
    assert [c["sample"] for c in json.loads(json_out.stdout)["completions"]] == [1, 2]


def test_what_the_seed_help_says_is_true(tiny_run):
    from llmcli.evaluation.generate import generate_all

    kw = {"temperature": 1.0, "top_k": None, "max_new_tokens": 20, "seed": 7}
    alone = text(tiny_run, "And", **kw)
    assert alone == text(tiny_run, "And", **kw) == generate_all(tiny_run, ["And"], **kw)[0].text  # streamed = batch of 1
    pair = [c.text for c in generate_all(tiny_run, ["And", "And"], **kw)]
    assert pair == [c.text for c in generate_all(tiny_run, ["And"], num_samples=2, **kw)]  # the same batch: same text
    assert pair[0] != alone  # in a larger batch the same prompt and seed drew other text


@pytest.mark.parametrize(("args", "msg"), [
    (["-t", "nan"], "--temperature: must be in [0, 100] (0 = greedy), got nan"),
    (["-t", "inf"], "--temperature: must be in [0, 100] (0 = greedy), got inf"),
    (["--top-k", "-1"], "--top-k: must be in [1, 1000000], got -1"),
    (["--top-k", "-5"], "--top-k: must be in [1, 1000000], got -5"),
    (["--top-p", "nan"], "--top-p: must be in (0, 1], got nan"),
    (["-n", "0"], "--max-new-tokens: must be in [1, 1000000], got 0"),
    (["--num-samples", "0"], "--num-samples: must be in [1, 65536], got 0"),
    (["--show-probs", "0"], "--show-probs: must be in [1, 1000000], got 0"),
    (["--seed", "-1"], "--seed: must be in [0, 9223372036854775807], got -1"),
    (["--seed", "99999999999999999999999"], "--seed: must be in [0, 9223372036854775807]"),
    (["--checkpoint", "middle"], "--checkpoint: 'middle' is not allowed (best or last)"),
])
def test_bad_generate_options_print_nothing_but_one_line(tiny_run, args, msg):
    from typer.testing import CliRunner

    from llmcli.cli import app

    out = CliRunner().invoke(app, ["generate", str(tiny_run), "-p", "In the beginning", *args])
    assert out.exit_code == 2 and out.stdout == "", out.stdout  # the prompt is not echoed first
    assert out.stderr.strip().startswith(f"error: {msg}") and len(out.stderr.strip().splitlines()) == 1


def test_a_damaged_run_fails_before_the_prompt_is_printed(tiny_run, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from llmcli.cli import app

    run = shutil.copytree(tiny_run, tmp_path / "run")
    (run / "tokenizer.json").unlink()
    out = CliRunner().invoke(app, ["generate", str(run), "-p", "In the beginning"])
    assert out.exit_code == 2 and out.stdout == "" and "no tokenizer.json" in out.stderr


def test_a_prompt_longer_than_the_context_is_cut_with_one_warning(tiny_run):
    from typer.testing import CliRunner

    from llmcli.cli import app

    long = "And the earth was without form, and void; " * 20  # far beyond tiny's block_size of 64 tokens
    out = CliRunner().invoke(app, ["generate", str(tiny_run), "-p", long, "-n", "3"])
    assert out.exit_code == 0, out.output
    warnings = [ln for ln in out.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "the model sees only its last 64 (model.block_size)" in warnings[0], out.stderr
    short = CliRunner().invoke(app, ["generate", str(tiny_run), "-p", "And", "-n", "3"])
    assert "warning" not in short.stderr
    batched = CliRunner().invoke(app, ["generate", str(tiny_run), "-p", long, "--num-samples", "3", "-n", "3"])
    assert sum(ln.startswith("warning:") for ln in batched.stderr.splitlines()) == 1  # once per prompt


def test_running_out_of_memory_while_decoding_names_the_batch(tiny_run, monkeypatch):
    import llmcli.evaluation.generate as g
    from llmcli.evaluation.generate import generate_all

    def oom(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 68719476736 bytes.")
        yield

    monkeypatch.setattr(g, "decode_steps", oom)
    with pytest.raises(UserError, match=r"--num-samples 4 x 1 prompt\(s\) \(4 rows in one batch\): out of memory "
                                        r"\(an allocation of 64.0 GiB failed\)"):
        generate_all(tiny_run, ["And"], num_samples=4)


def test_an_asked_best_checkpoint_the_run_lacks_is_an_error_not_last(tiny_run, tmp_path):
    """generate, --show-probs and the library alike: `best` asked on a run without one fails; the default reads last."""
    import shutil

    from typer.testing import CliRunner

    from llmcli.cli import app
    from llmcli.evaluation.generate import generate_all, top_next

    run = tmp_path / "no-best"
    shutil.copytree(tiny_run, run)
    for f in (run / "checkpoints").glob("best.*"):
        f.unlink()
    for call in (lambda: generate_all(run, ["In"], checkpoint="best"), lambda: top_next(run, ["In"], 2, checkpoint="best"),
                 lambda: text(run, checkpoint="best")):
        with pytest.raises(UserError, match=r"no best checkpoint \(checkpoints/best\.safetensors\); the run has only: last"):
            call()
    bad = CliRunner().invoke(app, ["generate", str(run), "--checkpoint", "best", "-n", "3"])
    assert bad.exit_code == 2 and bad.stderr.strip() == (
        f"error: {run}: no best checkpoint (checkpoints/best.safetensors); the run has only: last")
    default = CliRunner().invoke(app, ["generate", str(run), "-p", "In", "-n", "4", "-t", "0"])
    last = CliRunner().invoke(app, ["generate", str(run), "-p", "In", "-n", "4", "-t", "0", "--checkpoint", "last"])
    assert default.exit_code == 0 and default.stdout == last.stdout
    assert text(run, temperature=0, max_new_tokens=4) == text(run, temperature=0, max_new_tokens=4, checkpoint="last")


# ---------------------------------------------------------------- a pretrained causal model (tests/hf_models.py)


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """Tiny GPT-2 and Llama folders with weights 10x transformers' init (std ~0.2): greedy text that varies, so
    equal tokens mean something (at std 0.02 both models repeat one token)."""
    transformers = pytest.importorskip("transformers")
    from tests.hf_models import tiny_gpt2, tiny_llama

    root = tmp_path_factory.mktemp("hf-generate")
    out = {}
    for name, build in (("gpt2", tiny_gpt2), ("llama", tiny_llama)):
        path = build(root / name)
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.mul_(10)
        model.save_pretrained(str(path))
        out[name] = path
    return out


def _pretrained(path):
    """llmcli's model of a causal folder and its own tokenizer, as a loaded run holds them."""
    from types import SimpleNamespace

    from llmcli.config import HFCausalConfig
    from llmcli.data.tokenizers import from_model_dir
    from llmcli.models.model import build_model

    tok = from_model_dir(path)
    model = build_model(HFCausalConfig(path=str(path)), vocab_size=tok.vocab_size, n_classes=3, max_len=48).eval()
    return SimpleNamespace(model=model, tokenizer=tok)


def _hf_greedy(path, tok, prompts, n):
    """transformers' own generate (greedy, its KV cache) from llmcli's prompt ids, left-padded as it expects."""
    import transformers

    from llmcli.evaluation.generate import _prompt_ids

    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True).eval()
    ids = [_prompt_ids(tok, p, 128) for p in prompts]
    width = max(len(i) for i in ids)
    x = torch.tensor([[tok.pad_id] * (width - len(i)) + i for i in ids])  # (B, T) left-padded
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    out = ref.generate(x, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                       pad_token_id=tok.pad_id, eos_token_id=tok.eos_id)
    return out[:, width:].tolist()


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_greedy_generation_on_a_pretrained_model_gives_transformers_generate_tokens(hf_folders, name):
    from llmcli.evaluation.generate import Sampling, complete

    t = _pretrained(hf_folders[name])
    s = Sampling(max_new_tokens=30, min_new_tokens=30, temperature=0)
    *_, rows = complete(t, ["In the beginning God created"], s)
    (want,) = _hf_greedy(hf_folders[name], t.tokenizer, ["In the beginning God created"], 30)
    assert rows[0].tokens == want and len(set(want)) > 5  # the same, varied tokens


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_prompts_of_different_lengths_share_one_left_padded_batch_on_a_pretrained_model(hf_folders, name):
    from llmcli.evaluation.generate import Sampling, complete, takes_padding

    t = _pretrained(hf_folders[name])
    prompts = ["In the beginning God created the heaven", "And", "The LORD is my shepherd"]
    s = Sampling(max_new_tokens=20, min_new_tokens=20, temperature=0)
    assert takes_padding(t.model.backbone)
    batches = []
    for rows in complete(t, prompts, s):
        if not batches or rows is not batches[-1]:
            batches.append(rows)
    assert len(batches) == 1  # one batch for all three prompts
    alone = [[*complete(t, [p], s)][-1][0].tokens for p in prompts]
    assert [c.tokens for c in batches[0]] == alone == _hf_greedy(hf_folders[name], t.tokenizer, prompts, 20)
