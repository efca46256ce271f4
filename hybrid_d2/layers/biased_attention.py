"""Attention with a learnable additive bias (Swin's relative position bias), with a lighter
training step.

``F.scaled_dot_product_attention`` with a mask that needs a gradient runs PyTorch's unfused math
path, which keeps the attention probabilities, one (windows, heads, L, L) tensor per block, for
the backward. :func:`biased_attention` runs the fused kernel in the forward and recomputes the
probabilities from the queries, keys and bias in the backward: the same function and gradients
(``tests/test_biased_attention.py``), without that tensor.
"""
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .mlp import _is_traced

__all__ = ["biased_attention"]


def biased_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """``softmax(q kᵀ / sqrt(d) + bias) v`` for (N, heads, L, d) queries, keys and values and a
    (1, heads, L, L) bias (4-D: PyTorch's fused CPU kernel takes no other mask). When autograd
    records it in eager mode, the probabilities are recomputed in the backward, not kept; traced,
    scripted and compiled graphs see the plain operator."""
    if bias.dim() != 4 or bias.shape[0] != 1:
        raise ValueError(
            f"biased_attention: a bias of shape (1, heads, L, S) expected, got {tuple(bias.shape)}"
        )
    records_backward = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, bias))
    if not records_backward or _is_traced():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    return _BiasedAttention.apply(q, k, v, bias)


class _BiasedAttention(torch.autograd.Function):
    """Fused SDPA forward; the backward recomputes the probabilities (they are not saved)."""

    @staticmethod
    def forward(ctx, q, k, v, bias):
        # SDPA picks its kernel by requires_grad, not by grad mode: a mask that requires grad
        # would send it to the math path even here
        q, k, v, bias = (t.detach() for t in (q, k, v, bias))
        device = q.device.type
        if torch.is_autocast_enabled(device):  # the cast autocast makes for SDPA
            dtype = torch.get_autocast_dtype(device)
            q, k, v, bias = (t.to(dtype) for t in (q, k, v, bias))
        with torch.autocast(device, enabled=False):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        ctx.save_for_backward(q, k, v, bias, out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, bias, out = ctx.saved_tensors
        dtype = q.dtype
        exact = torch.promote_types(dtype, torch.float32)  # softmax as autocast runs it: fp32
        scale = q.shape[-1] ** -0.5
        grad_out = grad_out.to(dtype)
        logits = (q @ k.transpose(-2, -1)).to(exact) * scale + bias.to(exact)
        probs = torch.softmax(logits, dim=-1)  # recomputed: the tensor not kept
        del logits
        grad_v = probs.to(dtype).transpose(-2, -1) @ grad_out
        grad_probs = (grad_out @ v.transpose(-2, -1)).to(exact)
        # softmax backward: P * (dP - rowsum(P * dP)), where rowsum(P * dP) = rowsum(dO * O)
        row = (grad_out.to(exact) * out.to(exact)).sum(-1, keepdim=True)
        grad_logits = probs.mul_(grad_probs.sub_(row))
        grad_bias = grad_logits.sum(0, keepdim=True).to(bias.dtype)  # broadcast over windows
        grad_logits = grad_logits.to(dtype)
        grad_q = (grad_logits @ k) * scale
        grad_k = (grad_logits.transpose(-2, -1) @ q) * scale
        return grad_q, grad_k, grad_v, grad_bias
