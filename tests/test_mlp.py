"""The shared Transformer MLP (hybrid_d2.layers.Mlp): the function of fc2(GELU(fc1(x))), with a
backward that keeps the input and the hidden pre-activation but not the GELU output."""
import pytest
import torch
import torch.nn.functional as F

from hybrid_d2.backbones import dmformer, dualformer
from hybrid_d2.layers import Mlp


def _plain(mlp: Mlp, x: torch.Tensor) -> torch.Tensor:
    return mlp.fc2(F.gelu(mlp.fc1(x)))


def _output_and_grads(forward, mlp: Mlp, x: torch.Tensor):
    mlp.zero_grad()
    x.grad = None
    out = forward(mlp, x)
    (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    grads = [x.grad] + [p.grad for p in mlp.parameters() if p.requires_grad]
    return [out.detach()] + [g for g in grads if g is not None]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("frozen", [False, True])
def test_mlp_computes_what_the_plain_layers_compute(bias, frozen):
    torch.manual_seed(0)
    mlp = Mlp(12, 40, bias=bias).double().requires_grad_(not frozen)
    x = torch.randn(2, 5, 7, 12, dtype=torch.float64, requires_grad=True)
    expected = _output_and_grads(_plain, mlp, x)
    got = _output_and_grads(Mlp.forward, mlp, x)
    assert len(got) == len(expected) == (2 if frozen else 4 + 2 * bias)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_mlp_under_autocast_computes_what_autocast_computes():
    torch.manual_seed(0)
    mlp, x = Mlp(16, 64), torch.randn(3, 16, requires_grad=True)
    results = []
    for forward in (_plain, Mlp.forward):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(_output_and_grads(forward, mlp, x))
    for got, expected in zip(*results[::-1]):
        assert got.dtype == expected.dtype
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def _saved_activations(forward, mlp: Mlp, x: torch.Tensor) -> list:
    """Shapes of the non-parameter tensors autograd keeps for the backward."""
    params = {p.data_ptr() for p in mlp.parameters()}
    shapes = []

    def pack(t):
        if t.data_ptr() not in params:
            shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward(mlp, x)
    return shapes


def test_mlp_keeps_input_and_pre_activation_only():
    mlp, x = Mlp(8, 32), torch.randn(4, 8, requires_grad=True)
    assert sorted(_saved_activations(_plain, mlp, x)) == [(4, 8), (4, 32), (4, 32)]
    assert sorted(_saved_activations(Mlp.forward, mlp, x)) == [(4, 8), (4, 32)]


def test_traced_mlp_is_the_plain_operators():
    """Export and fvcore's FLOP counts see linear, gelu, linear."""
    mlp, x = Mlp(8, 32), torch.randn(4, 8, requires_grad=True)
    graph = torch.jit.trace(mlp, x).inlined_graph
    kinds = [node.kind() for node in graph.nodes() if node.kind().startswith("aten::")]
    assert kinds == ["aten::linear", "aten::gelu", "aten::linear"]


def test_dualformer_loads_checkpoints_with_the_sequential_ffn_names():
    """Checkpoints written before the shared Mlp named DualFormer's FFN layers mlp.0 / mlp.2."""
    torch.manual_seed(0)
    model = dualformer.DualFormer(**dualformer.VARIANTS["tiny"]).eval()
    old = {
        k.replace(".mlp.fc1.", ".mlp.0.").replace(".mlp.fc2.", ".mlp.2."): v.clone() + 1
        for k, v in model.state_dict().items()
    }
    assert any(".mlp.0." in k for k in old)
    fresh = dualformer.DualFormer(**dualformer.VARIANTS["tiny"])
    fresh.load_state_dict(old)  # strict: every key found
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, model.state_dict()[k] + 1), k


def _plain_conv_mlp(mlp: dmformer.Mlp, x: torch.Tensor) -> torch.Tensor:
    return mlp.fc2(F.gelu(mlp.dwconv(mlp.fc1(x))))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("frozen", [False, True])
def test_conv_mlp_computes_what_the_plain_layers_compute(channels_last, frozen):
    """DMFormer's MLP (1x1 -> depth-wise 3x3 -> GELU -> 1x1), NCHW in training, channels-last
    when its branches run fused."""
    torch.manual_seed(0)
    mlp = dmformer.Mlp(6, 4).double().requires_grad_(not frozen)
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    expected = _output_and_grads(_plain_conv_mlp, mlp, x)
    got = _output_and_grads(dmformer.Mlp.forward, mlp, x)
    assert len(got) == (2 if frozen else 8)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_conv_mlp_keeps_no_gelu_output():
    mlp, x = dmformer.Mlp(4, 8), torch.randn(2, 4, 3, 5, requires_grad=True)
    hidden = (2, 32, 3, 5)
    plain = _saved_activations(_plain_conv_mlp, mlp, x)
    assert plain.count(hidden) == 3  # fc1 out (dwconv's input), dwconv out (GELU's), GELU out
    assert _saved_activations(dmformer.Mlp.forward, mlp, x).count(hidden) == 2


def test_conv_mlp_under_autocast_computes_what_autocast_computes():
    torch.manual_seed(0)
    mlp, x = dmformer.Mlp(8, 4), torch.randn(2, 8, 4, 4, requires_grad=True)
    results = []
    for forward in (_plain_conv_mlp, dmformer.Mlp.forward):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(_output_and_grads(forward, mlp, x))
    for got, expected in zip(*results[::-1]):
        assert got.dtype == expected.dtype
        torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2)
