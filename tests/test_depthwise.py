"""hybrid_d2.layers.DepthwiseConv2d computes nn.Conv2d's depth-wise convolution and its gradients
(space-to-batch for dilations, a backward made of forward convolutions), on any map size.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hybrid_d2.layers import DepthwiseConv2d, depthwise_conv2d
from hybrid_d2.layers.depthwise import uses_fast_path


def _reference(module: DepthwiseConv2d) -> nn.Conv2d:
    conv = nn.Conv2d(
        module.in_channels,
        module.out_channels,
        module.kernel_size,
        stride=module.stride,
        padding=module.padding,
        dilation=module.dilation,
        groups=module.groups,
        bias=module.bias is not None,
    ).double()
    conv.load_state_dict(module.state_dict())
    return conv


@settings(max_examples=25, deadline=None)
@given(
    kernel=st.sampled_from([3, 5, 7]),
    dilation=st.integers(1, 3),
    height=st.integers(1, 13),
    width=st.integers(1, 13),
    batch=st.integers(1, 3),
    channels=st.integers(1, 6),
    bias=st.booleans(),
    channels_last=st.booleans(),
)
def test_output_and_gradients_are_those_of_nn_conv2d(
    kernel, dilation, height, width, batch, channels, bias, channels_last
):
    torch.manual_seed(0)
    module = DepthwiseConv2d(channels, kernel, dilation=dilation, bias=bias).double()
    reference = _reference(module)
    x = torch.randn(batch, channels, height, width, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, expected = module(x_ours), reference(x_ref)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(expected)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        module.weight.grad, reference.weight.grad, rtol=1e-12, atol=1e-12
    )
    if bias:
        torch.testing.assert_close(
            module.bias.grad, reference.bias.grad, rtol=1e-12, atol=1e-12
        )


def test_float32_agrees_to_round_off_on_a_detection_sized_map():
    torch.manual_seed(0)
    module = DepthwiseConv2d(64, 7, dilation=3)
    reference = _reference(module).float()
    x = torch.randn(2, 64, 40, 56, requires_grad=True)
    out, expected = module(x), reference(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), (x, module.weight, module.bias))
    expected_grads = torch.autograd.grad(
        expected.square().sum(), (x, reference.weight, reference.bias)
    )
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(
            got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item()
        )


def test_the_module_is_an_nn_conv2d_with_its_state_dict():
    module = DepthwiseConv2d(8, 5, dilation=2)
    assert isinstance(module, nn.Conv2d)
    assert module.padding == (4, 4) and module.groups == 8
    assert sorted(module.state_dict()) == ["bias", "weight"]
    assert module.weight.shape == (8, 1, 5, 5)


def test_the_fast_path_is_taken_where_it_pays_and_nowhere_else():
    x = torch.randn(1, 4, 8, 8)
    weight = {k: torch.randn(4, 1, k, k) for k in (3, 5)}
    assert uses_fast_path(x, weight[5], (2, 2), (1, 1), (1, 1))
    assert uses_fast_path(x, weight[3], (2, 2), (2, 2), (1, 1))
    # oneDNN's own undilated 3x3 backward is faster; strided or non-"same" convs are not covered
    assert not uses_fast_path(x, weight[3], (1, 1), (1, 1), (1, 1))
    assert not uses_fast_path(x, weight[5], (2, 2), (1, 1), (2, 2))
    assert not uses_fast_path(x, weight[5], (0, 0), (1, 1), (1, 1))
    # on one-pixel sub-grids the layout copies cost more than oneDNN's own dilated kernel
    assert not uses_fast_path(
        torch.randn(1, 4, 3, 2), weight[3], (3, 3), (3, 3), (1, 1)
    )
    assert uses_fast_path(torch.randn(1, 4, 4, 2), weight[3], (3, 3), (3, 3), (1, 1))


def test_tracing_records_one_convolution_for_flop_counting():
    module = DepthwiseConv2d(4, 7, dilation=3).eval()
    traced = torch.jit.trace(module, torch.randn(1, 4, 16, 16))
    kinds = [node.kind() for node in traced.graph.nodes()]
    assert kinds.count("aten::_convolution") == 1
    assert not any(kind.startswith("prim::PythonOp") for kind in kinds)


@pytest.mark.parametrize("dilation", [1, 2, 3])
def test_the_function_form_matches_f_conv2d(dilation):
    x = torch.randn(2, 3, 9, 11, dtype=torch.float64)
    weight = torch.randn(3, 1, 7, 7, dtype=torch.float64)
    padding = (3 * dilation, 3 * dilation)
    expected = F.conv2d(x, weight, None, 1, padding, dilation, groups=3)
    torch.testing.assert_close(
        depthwise_conv2d(x, weight, None, padding, (dilation, dilation)), expected
    )


def test_training_keeps_the_input_and_kernel_only_as_nn_conv2d_does():
    """The sub-grids are rebuilt in the backward: autograd saves the input tensor itself."""
    module = DepthwiseConv2d(8, 7, dilation=3)
    x = torch.randn(2, 8, 20, 22, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t) or t, lambda t: t
    ):
        module(x)
    assert sorted(t.data_ptr() for t in saved) == sorted(
        [x.data_ptr(), module.weight.data_ptr()]
    )


@pytest.mark.parametrize(
    "memory_format", [torch.contiguous_format, torch.channels_last]
)
def test_the_output_and_input_gradient_keep_the_input_layout(memory_format):
    """A channels-last network (DMFormer on CPU) stays channels-last through the branches."""
    module = DepthwiseConv2d(8, 7, dilation=3)
    x = (
        torch.randn(2, 8, 12, 15)
        .contiguous(memory_format=memory_format)
        .requires_grad_()
    )
    out = module(x)
    out.backward(torch.randn_like(out))
    assert out.is_contiguous(memory_format=memory_format)
    assert x.grad.is_contiguous(memory_format=memory_format)
