"""hybrid_d2.layers.biased_attention: the attention of SDPA with a learnable additive bias, the
probabilities recomputed in the backward instead of kept."""

import pytest
import torch
import torch.nn.functional as F

from hybrid_d2.layers import biased_attention


def inputs(dtype: torch.dtype, windows: int = 6, heads: int = 3, tokens: int = 49, dim: int = 8):
    torch.manual_seed(0)
    q, k, v = (torch.randn(windows, heads, tokens, dim, dtype=dtype) for _ in range(3))
    bias = torch.randn(1, heads, tokens, tokens, dtype=dtype)
    return [t.requires_grad_() for t in (q, k, v, bias)]


def explicit(q, k, v, bias):
    return torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5 + bias, dim=-1) @ v


def test_values_and_gradients_are_the_plain_attention_s():
    """float64: output and the gradients of q, k, v and the bias as the step-by-step formula
    gives them (1e-12 relative), the bias's summed over the windows."""
    tensors = inputs(torch.float64)
    weights = torch.randn(6, 3, 49, 8, dtype=torch.float64)
    ours = biased_attention(*tensors)
    grads = torch.autograd.grad((ours * weights).sum(), tensors)
    reference = explicit(*tensors)
    expected = torch.autograd.grad((reference * weights).sum(), tensors)
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    for found, wanted in zip(grads, expected):
        torch.testing.assert_close(found, wanted, rtol=1e-10, atol=1e-12)


def test_keeps_no_probabilities_for_the_backward():
    """The plain SDPA call with a bias that needs a gradient keeps a (windows, heads, L, L)
    tensor; ours keeps q, k, v, the bias and the output only."""
    tensors = inputs(torch.float32)

    def kept(attention) -> list:
        shapes = []

        def keep(t):
            shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            attention(*tensors)
        return shapes

    plain = kept(lambda q, k, v, b: F.scaled_dot_product_attention(q, k, v, attn_mask=b))
    assert (6, 3, 49, 49) in plain
    assert sorted(kept(biased_attention)) == sorted(
        [(6, 3, 49, 8)] * 4 + [(1, 3, 49, 49)]
    )


def test_inference_and_traced_graphs_run_the_fused_kernel():
    q, k, v, bias = (t.detach() for t in inputs(torch.float32))
    with torch.no_grad(), torch.profiler.profile() as prof:
        out = biased_attention(q, k, v, bias)
    names = {e.name for e in prof.events() if e.name.startswith("aten::_scaled_dot_product")}
    assert names == {"aten::_scaled_dot_product_flash_attention_for_cpu"}
    torch.testing.assert_close(out, explicit(q, k, v, bias), rtol=1e-5, atol=1e-5)


def test_under_bfloat16_autocast_gradients_follow_the_math_path():
    """CPU autocast: the output and gradients (cast back to each input's float32) as autocast's
    own SDPA gives them, within bfloat16 precision."""
    tensors = inputs(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = biased_attention(*tensors)
        reference = F.scaled_dot_product_attention(*tensors[:3], attn_mask=tensors[3])
    assert ours.dtype == reference.dtype == torch.bfloat16
    weights = torch.randn_like(ours, dtype=torch.float32)
    grads = torch.autograd.grad((ours.float() * weights).sum(), tensors)
    expected = torch.autograd.grad((reference.float() * weights).sum(), tensors)
    torch.testing.assert_close(ours.float(), reference.float(), rtol=0.02, atol=0.02)
    for found, wanted in zip(grads, expected):
        assert found.dtype == torch.float32
        torch.testing.assert_close(found, wanted, rtol=0.05, atol=0.05)


def test_a_bias_per_window_is_refused():
    q, k, v, bias = inputs(torch.float32)
    with pytest.raises(ValueError, match=r"bias of shape \(1, heads, L, S\) expected, got \(6, 3"):
        biased_attention(q, k, v, bias.detach().expand(6, -1, -1, -1))
