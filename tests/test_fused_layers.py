"""The fused CPU inference kernels compute what the plain modules compute, and only run where no
gradient is needed."""
import pytest
import torch
from detectron2.layers import FrozenBatchNorm2d
from torch import nn

from hybrid_d2.backbones import D2DilateFormer
from hybrid_d2.layers import FusedMlp, conv_norm_act, linear_act
from hybrid_d2.layers.fused import _use_onednn


def _close(fast: torch.Tensor, plain: torch.Tensor) -> None:
    # the kernels differ in fp32 summation order only
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5 * plain.abs().max().item())


def _random_stats(norm: nn.Module) -> nn.Module:
    norm.running_mean.normal_(0, 0.5)
    norm.running_var.uniform_(0.5, 2.0)
    norm.weight.data.normal_(1, 0.2)
    norm.bias.data.normal_(0, 0.2)
    return norm


def test_fused_path_only_where_no_gradient_is_needed():
    layer = nn.Linear(8, 8)
    x = torch.randn(4, 8)
    assert not _use_onednn(x, layer)  # grad mode, parameters require grad: training
    with torch.no_grad():
        assert _use_onednn(x, layer)
        assert not _use_onednn(x.double(), layer)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not _use_onednn(x, layer)
    layer.requires_grad_(False)
    assert _use_onednn(x, layer)
    assert not _use_onednn(x.requires_grad_(), layer)


@pytest.mark.parametrize("gelu", [False, True])
def test_linear_act_matches_linear(gelu):
    torch.manual_seed(0)
    layer = nn.Linear(72, 216)
    x = torch.randn(2, 9, 11, 72)
    plain = layer(x)
    plain = nn.functional.gelu(plain) if gelu else plain
    with torch.no_grad():
        _close(linear_act(x, layer, gelu), plain.detach())
        _close(linear_act(x.transpose(1, 2), layer, gelu), plain.transpose(1, 2).detach())


@pytest.mark.parametrize("norm_kind", ["frozen", "eval_bn", "train_bn"])
@pytest.mark.parametrize("bias", [False, True])
def test_conv_norm_act_matches_conv_norm_gelu(norm_kind, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 7, 3, stride=2, padding=1, bias=bias)
    norm = _random_stats(FrozenBatchNorm2d(7) if norm_kind == "frozen" else nn.BatchNorm2d(7))
    norm.train(norm_kind == "train_bn")
    x = torch.randn(2, 5, 17, 23)
    with torch.no_grad():
        plain = nn.functional.gelu(norm(conv(x)))
        _close(conv_norm_act(x, conv, norm, gelu=True), plain)


def test_fused_mlp_keeps_timm_keys_and_function():
    torch.manual_seed(0)
    mlp = FusedMlp(16, hidden_features=48)
    assert sorted(mlp.state_dict()) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]
    x = torch.randn(3, 5, 16)
    plain = mlp(x)
    plain.sum().backward()  # the plain path is the training path
    assert mlp.fc1.weight.grad is not None
    with torch.no_grad():
        _close(mlp(x), plain.detach())


def test_dilateformer_inference_equals_training_path():
    torch.manual_seed(0)
    model = D2DilateFormer("tiny", stage3_attention="mixed").eval()
    for module in model.modules():
        if isinstance(module, FrozenBatchNorm2d):
            _random_stats(module)
    x = torch.randn(1, 3, 97, 131)
    plain = model(x)
    with torch.no_grad():
        fast = model(x)
    for name in plain:
        _close(fast[name], plain[name].detach())
