"""The chunked LM-head cross-entropy equals the plain (logits, then F.cross_entropy) path, value and gradients."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmcli.models.fused_ce import linear_cross_entropy


def _inputs(n: int = 37, d: int = 8, v: int = 50):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(v, d, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, v, (n,), generator=g)
    weight = torch.rand(n, generator=g, dtype=torch.float64) * (torch.arange(n) % 5 != 0)  # some positions masked
    return h, w, t, weight


def test_value_and_gradients_match_the_plain_path_across_chunk_boundaries():
    h, w, t, weight = _inputs()
    ref = (F.cross_entropy(h @ w.t(), t, reduction="none") * weight).sum()
    g_ref = torch.autograd.grad(ref, (h, w))
    for chunk in (1, 10, 37, 1000):  # uneven last chunk, exactly one chunk, one larger than N
        out = linear_cross_entropy(h, w, t, weight.float(), chunk=chunk)
        g = torch.autograd.grad(out, (h, w))
        assert torch.allclose(out.double(), ref, rtol=1e-5), chunk
        assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(g, g_ref)), chunk


def test_gradients_scale_with_the_upstream_gradient_and_survive_repeated_backward():
    h, w, t, weight = _inputs()
    out = linear_cross_entropy(h, w, t, weight.float(), chunk=8)
    once = torch.autograd.grad(out, (h,), retain_graph=True)[0]
    (3.0 * out).backward()  # a second pass through the same graph, as objectives do after grad_cosine
    assert torch.allclose(h.grad, 3 * once)


def test_training_model_loss_equals_the_evaluation_path():
    from llmcli.config import validate_config
    from llmcli.models.model import build_model

    cfg = validate_config({"model": {"name": "gpt", "n_layer": 1, "n_head": 2, "d_model": 16, "block_size": 16},
                           "data": {"max_len": 16}})
    torch.manual_seed(0)
    m = build_model(cfg.model, vocab_size=40, n_classes=2, max_len=16).eval()
    toks, lens = torch.randint(3, 40, (3, 12)), torch.tensor([12, 7, 2])
    h = m(toks)  # grad enabled: the fused path
    fused = m.lm_loss(h, toks, lens)
    with torch.no_grad():
        plain = m.lm_loss(m(toks), toks, lens)
    nll, mask = m.lm_nll(h.detach(), toks, lens)
    assert torch.allclose(fused, plain, rtol=1e-5) and torch.allclose(plain, nll.sum() / mask.sum(), rtol=1e-6)


def test_under_bf16_autocast_the_loss_and_gradients_stay_close_to_fp32():
    h, w, t, weight = (x.float() if x.is_floating_point() else x for x in _inputs(v=300))
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    ref = linear_cross_entropy(h, w, t, weight, chunk=16)
    g_ref = torch.autograd.grad(ref, (h, w))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the CUDA path's code, on CPU
        out = linear_cross_entropy(h, w, t, weight, chunk=16)
    g = torch.autograd.grad(out, (h, w))
    assert out.dtype == torch.float32 and torch.allclose(out, ref, rtol=2e-2)
    assert all(g_.dtype == torch.float32 and torch.allclose(a, b, atol=3e-2 * b.abs().max()) for a, b, g_ in
               zip(g, g_ref, g))
