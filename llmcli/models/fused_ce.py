"""LM-head cross-entropy in row chunks, gradients computed in the forward pass (as Liger's fused linear CE).

The plain path materialises (N, V) logits, their log-softmax and both of their gradients in fp32 at once:
for 4k tokens and V = 8192 that is four 134 MB tensors, written and read from memory several times. Here each
chunk of rows computes its logits, loss and d(loss)/d(logits) while they are in cache, and folds the last
straight into the gradients of the hidden states and of the head matrix; backward only scales them by the
incoming scalar gradient. The result is a scalar, so the saved gradients stay right under repeated backward
passes (objectives call autograd.grad on the LM loss several times with retain_graph).
"""

from __future__ import annotations

import torch

CHUNK_ROWS = 512  # (512, 8192) fp32 logits = 16 MB: big enough for efficient matmuls, small enough for cache


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor,
                chunk: int) -> torch.Tensor:
        # h (N, D), w (V, D), targets (N,), weight (N,): returns sum_i weight_i * nll_i
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty(h.shape, dtype=torch.float32, device=h.device) if need_h else None  # (N, D)
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None  # (V, D)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], chunk):
            hc, tc, wc = h[s : s + chunk], targets[s : s + chunk], weight[s : s + chunk].float()  # (c, D), (c,)
            logits = (hc @ w.t()).float()  # (c, V); bf16 matmul under CUDA autocast, fp32 softmax
            lse = torch.logsumexp(logits, dim=1)  # (c,)
            target_logit = logits.gather(1, tc[:, None]).squeeze(1)  # (c,)
            loss += ((lse - target_logit) * wc).sum()
            if need_h or need_w:
                g = logits.sub_(lse[:, None]).exp_()  # (c, V) softmax, in place
                g[torch.arange(len(tc), device=g.device), tc] -= 1.0  # d nll / d logits = softmax - onehot
                g.mul_(wc[:, None])
                g = g.to(h.dtype)  # the matmuls run in the activations' dtype
                if need_h:
                    grad_h[s : s + chunk] = g @ w.to(h.dtype)  # (c, D)
                if need_w:
                    grad_w += g.t() @ hc  # (V, D)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (h.dtype, w.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        gh = (grad_h * grad_out).to(ctx.dtypes[0]) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.dtypes[1]) if grad_w is not None else None
        return gh, gw, None, None, None


def linear_cross_entropy(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor,
                         chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """sum_i weight_i * CE(h_i @ w.T, targets_i) for h (N, D), w (V, D), targets (N,), weight (N,), chunked."""
    return _LinearCrossEntropy.apply(h, w, targets, weight, chunk)
