"""Sliding-window dilated attention (DilateFormer's SWDA/MSDA, Jiao et al. 2023, Eq. 1-5).

Every query attends to the k x k keys around it, spaced by its head group's dilation rate r. Keys
and values outside the map are zeros that still take part in the softmax (logit 0, value 0), as in
the official ``nn.Unfold`` implementation (paper §III-A: "we simply use the zero padding
strategy").

Instead of unfolding k*k copies of the keys and values, the k*k offsets are visited one after the
other as strided views of a single zero-padded K and V (one view covers every head group); the
attention logits/weights (B, heads, k*k, H, W) are the only k*k-sized tensors. Forward and
backward are written out (``_DilatedAttention``), so that training stores only q, the padded k and
v, and the attention weights. ``torch.jit`` tracing (TorchScript and ONNX export) records the
forward's plain ops instead, except inside ``traced_as_one_node`` (FLOP counting).
"""

import contextlib
from typing import Iterator, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["FLOP_OP_NAME", "dilated_attention", "traced_as_one_node"]


def _shifted_views(
    padded: torch.Tensor,
    num_heads: int,
    dilations: Sequence[int],
    kernel_size: int,
    pad: int,
) -> Iterator[torch.Tensor]:
    """The k*k shifted (B, groups, heads/groups, head_dim, H, W) views of a (B, C, H + 2*pad,
    W + 2*pad) map, in row-major window order (that of ``nn.Unfold``), Eq. (3): key
    (i + p*r, j + q*r) for query (i, j), r the dilation of the query's head.

    ``padded`` must be a freshly allocated contiguous map (storage offset 0, as ``F.pad`` and
    ``zeros_like`` return): the offsets are absolute, which torch.compile needs (Dynamo cannot
    trace ``storage_offset()``).

    Head groups are contiguous channel blocks; group g has dilation r_g = r_0 + g * step. Its
    window start moves linearly with g, so one strided view covers all groups at once.
    """
    batch, channels, padded_h, padded_w = padded.shape
    groups = len(dilations)
    height, width = padded_h - 2 * pad, padded_w - 2 * pad
    step = dilations[1] - dilations[0] if groups > 1 else 0
    plane = padded_h * padded_w
    sizes = (batch, groups, num_heads // groups, channels // num_heads, height, width)
    for p in range(-(kernel_size // 2), kernel_size // 2 + 1):
        for q in range(-(kernel_size // 2), kernel_size // 2 + 1):
            start = (pad + p * dilations[0]) * padded_w + pad + q * dilations[0]
            strides = (
                channels * plane,
                channels // groups * plane + p * step * padded_w + q * step,
                channels // num_heads * plane,
                plane,
                padded_w,
                1,
            )
            yield padded.as_strided(sizes, strides, start)


def _heads(q: torch.Tensor, groups: int, num_heads: int) -> Tuple[int, ...]:
    """(B, C, H, W) -> the (B, groups, heads per group, head_dim, H, W) shape of the head view."""
    batch, channels, height, width = q.shape
    return (batch, groups, num_heads // groups, channels // num_heads, height, width)


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_heads: int,
    dilations: Tuple[int, ...],
    kernel_size: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, float]:
    """The forward pass in differentiable ops: (out (B, G, heads/G, head_dim, H, W),
    attn (B, G, heads/G, k*k, H, W), k_pad, v_pad, pad, scale)."""
    channels = q.shape[1]
    scale = (channels // num_heads) ** -0.5  # Eq. (2): 1 / sqrt(d_k)
    pad = max(dilations) * (kernel_size // 2)
    k_pad = F.pad(k, (pad, pad, pad, pad))
    v_pad = F.pad(v, (pad, pad, pad, pad))
    heads = _heads(q, len(dilations), num_heads)  # (B, G, heads/G, head_dim, H, W)
    q_heads = q.unflatten(1, heads[1:4])
    # the k*k logits stacked, not written with out= into slices, which Dynamo cannot trace
    logits = torch.stack(
        [
            (q_heads * k_j).sum(3)
            for k_j in _shifted_views(k_pad, num_heads, dilations, kernel_size, pad)
        ],
        dim=3,
    )
    attn = torch.softmax(logits.mul_(scale), dim=3)  # Eq. (2), over the k*k keys
    v_views = _shifted_views(v_pad, num_heads, dilations, kernel_size, pad)
    out = attn[:, :, :, :1] * next(v_views)
    for j, v_j in enumerate(v_views, start=1):
        out.addcmul_(attn[:, :, :, j : j + 1], v_j)
    return out, attn, k_pad, v_pad, pad, scale


class _DilatedAttention(torch.autograd.Function):
    """out, attn = SWDA per head group; attn is returned for inspection and FLOP counting."""

    @staticmethod
    def forward(ctx, q, k, v, num_heads, dilations, kernel_size):
        out, attn, k_pad, v_pad, pad, scale = _attend(
            q, k, v, num_heads, dilations, kernel_size
        )
        ctx.save_for_backward(q, k_pad, v_pad, attn)
        ctx.config = (num_heads, tuple(dilations), kernel_size, pad, scale)
        attn = attn.flatten(1, 2)
        ctx.mark_non_differentiable(attn)
        return out.view(q.shape), attn

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, _grad_attn):
        q, k_pad, v_pad, attn = ctx.saved_tensors
        num_heads, dilations, kernel_size, pad, scale = ctx.config
        height, width = q.shape[-2:]
        heads = _heads(q, len(dilations), num_heads)
        grad_out = grad_out.contiguous().view(heads)
        grad_v_pad = torch.zeros_like(v_pad)
        grad_attn = []
        views = zip(
            _shifted_views(v_pad, num_heads, dilations, kernel_size, pad),
            _shifted_views(grad_v_pad, num_heads, dilations, kernel_size, pad),
        )
        for j, (v_j, grad_v_j) in enumerate(views):
            grad_attn.append((grad_out * v_j).sum(3))
            grad_v_j.addcmul_(attn[:, :, :, j : j + 1], grad_out)
        grad_attn = torch.stack(grad_attn, dim=3)
        # softmax backward, then the 1/sqrt(d) scale
        grad_logits = (
            grad_attn.sub_((attn * grad_attn).sum(3, keepdim=True))
            .mul_(attn)
            .mul_(scale)
        )
        q_heads = q.unflatten(1, heads[1:4])
        grad_q = torch.zeros(heads, dtype=q.dtype, device=q.device)
        grad_k_pad = torch.zeros_like(k_pad)
        views = zip(
            _shifted_views(k_pad, num_heads, dilations, kernel_size, pad),
            _shifted_views(grad_k_pad, num_heads, dilations, kernel_size, pad),
        )
        for j, (k_j, grad_k_j) in enumerate(views):
            grad_q.addcmul_(grad_logits[:, :, :, j : j + 1], k_j)
            grad_k_j.addcmul_(grad_logits[:, :, :, j : j + 1], q_heads)
        interior = (Ellipsis, slice(pad, pad + height), slice(pad, pad + width))
        return (
            grad_q.view(q.shape),
            grad_k_pad[interior],
            grad_v_pad[interior],
            None,
            None,
            None,
        )


def dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_heads: int,
    dilations: Sequence[int],
    kernel_size: int = 3,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Multi-scale sliding-window dilated attention, before the output projection (Eq. 4).

    Args:
        q, k, v: (B, C, H, W) maps; channel c belongs to head c // (C / num_heads).
        num_heads: heads; a multiple of ``len(dilations)``.
        dilations: one dilation rate per contiguous group of num_heads / len(dilations) heads,
            in arithmetic progression (all the paper's settings are: 1,2,3; 2,3,4; 1,2,3,4; ...).
        kernel_size: odd window side k; each query sees k*k keys.

    Returns:
        the (B, C, H, W) concatenated head outputs (Eq. 5 before its Linear) and the attention
        weights (B, num_heads, k*k, H, W), keys in row-major window order (not differentiable).
    """
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"q, k, v must be (B, C, H, W) maps of one shape, got {list(q.shape)}, "
            f"{list(k.shape)}, {list(v.shape)}"
        )
    channels = q.shape[1]
    if channels % num_heads or num_heads % len(dilations):
        raise ValueError(
            f"{channels} channels, {num_heads} heads, {len(dilations)} dilations: the channels "
            "must split into equal heads and the heads into equal dilation groups"
        )
    steps = {b - a for a, b in zip(dilations, dilations[1:])}
    if kernel_size < 1 or kernel_size % 2 == 0 or min(dilations) < 1 or len(steps) > 1:
        raise ValueError(
            f"kernel_size={kernel_size}, dilations={list(dilations)}: expected an odd kernel size "
            "and positive dilations in arithmetic progression (e.g. 1, 2, 3)"
        )
    if torch.jit.is_tracing() and not _TRACE_AS_ONE_NODE[0]:
        # TorchScript / ONNX export: an autograd Function would be an unexportable Python call
        out, attn = _attend(q, k, v, num_heads, tuple(dilations), kernel_size)[:2]
        return out.view(q.shape), attn.flatten(1, 2).detach()
    return _DilatedAttention.apply(q, k, v, num_heads, tuple(dilations), kernel_size)


# Inside ``traced_as_one_node`` a traced dilated_attention is one node of this kind (the autograd
# Function), which FLOP counting reads (hybrid_d2.layers.flops); elsewhere it is traced as its ops.
FLOP_OP_NAME = "prim::PythonOp." + _DilatedAttention.__name__
_TRACE_AS_ONE_NODE = [False]


@contextlib.contextmanager
def traced_as_one_node() -> Iterator[None]:
    """Within it, ``torch.jit`` tracing records dilated_attention as one ``FLOP_OP_NAME`` node."""
    saved = _TRACE_AS_ONE_NODE[0]
    _TRACE_AS_ONE_NODE[0] = True
    try:
        yield
    finally:
        _TRACE_AS_ONE_NODE[0] = saved
