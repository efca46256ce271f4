"""Dynamic Mobile-Former: architecture and parameter targets, the dynamic residual convolution,
1-image training, freezing, and the detectors' parameter and FLOP counts against the paper's."""

import functools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from timm.layers import DropPath
from torch import nn

from conftest import load_config, randomize_batchnorms
from dmf_reference import per_sample_loop
from hybrid_d2.backbones import D2DynamicMobileFormer, DynamicMobileFormer
from hybrid_d2.backbones.dmf import (
    BLOCK_STRIDES,
    GRN,
    VARIANTS,
    DynamicResidualConv2d,
    variant_config,
)
from hybrid_d2.layers import flop_count_analysis

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
FEATURES = ("res2", "res3", "res4", "res5")

# Backbone-only parameters (no end_*, channel_conv, bn, head), counted from the official layer
# shapes; the paper's 25.1 / 19.8 / 15.1M include the classifier.
BACKBONE_PARAMS = {"s": 16.502e6, "xs": 12.995e6, "xxs": 10.187e6}
BLOCK_PARAMS_S = (0.525, 0.524, 0.640, 0.656, 0.946, 1.115, 1.546, 2.020, 2.321, 3.102, 3.102)
OUTPUT_CHANNELS = {
    "s": (40, 72, 176, 240),
    "xs": (30, 54, 132, 180),
    "xxs": (20, 36, 88, 120),
}
# Detectors with blocks 0-3 frozen (the shipped COCO configs): trainable / total parameters in
# millions, totals counting the frozen BatchNorms' affines. The trainable counts are the paper's
# Table 4 / 5 figures (23.6 / 20.2 / 17.4 / 34.2M).
DETECTOR_PARAMS = {
    "dmf_s_retinanet_1x": (23.66, 26.01),
    "dmf_xs_retinanet_1x": (20.18, 22.33),
    "dmf_xxs_retinanet_1x": (17.37, 19.35),
    "dmf_s_mask_rcnn_1x": (34.20, 36.54),
}
# RetinaNet GFLOPs at 800x1333, fvcore convention (functional convs and attention matmuls
# counted; the paper's 165 / 161 / 160G come from MMCV's counter, which skips them).
RETINANET_GFLOPS = {"s": 167.2, "xs": 162.7, "xxs": 160.8}


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@functools.lru_cache(maxsize=None)
def eval_backbone(variant: str) -> D2DynamicMobileFormer:
    """One shared eval-mode instance per variant; tests using it must not modify it."""
    torch.manual_seed(0)
    return D2DynamicMobileFormer(variant).eval()


def official_keys(variant: str) -> set:
    """The state-dict keys of the official classification model without its classifier (the
    official code's module names: stem, lite_bottleneck, blocks.{i}.{mobile2former, former,
    dynamic_mobile, norm, ffn}, tokens)."""

    def bn(prefix):
        stats = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
        return {f"{prefix}.{s}" for s in stats}

    convs = ("pw_conv1", "dw_conv", "pw_conv2")
    keys = {"tokens", "stem.conv.weight", "stem.conv.bias"} | bn("stem.bn")
    for i, conv in enumerate(convs, 1):
        keys |= {f"lite_bottleneck.{conv}.weight"} | bn(f"lite_bottleneck.bn{i}")
    for i, stride in enumerate(BLOCK_STRIDES):
        block = f"blocks.{i}"
        keys |= {f"{block}.mobile2former.{n}" for n in ("norm.weight", "norm.bias", "q.weight")}
        keys |= {f"{block}.mobile2former.fc.weight", f"{block}.norm.weight", f"{block}.norm.bias"}
        keys |= {f"{block}.former.token_attention.{n}" for n in ("qkv.weight", "proj.weight")}
        keys |= {f"{block}.former.token_attention.proj.bias"}
        keys |= {f"{block}.former.{n}.{p}" for n in ("norm1", "norm2") for p in ("weight", "bias")}
        keys |= {f"{block}.former.mlp.fc1.weight", f"{block}.former.mlp.fc2.weight"}
        mobile = f"{block}.dynamic_mobile"
        if stride == 2:
            keys |= {f"{mobile}.downsample.0.weight", f"{mobile}.downsample.0.bias"}
            keys |= bn(f"{mobile}.downsample.1")
        for j, conv in enumerate(convs, 1):
            attention = f"{mobile}.{conv}.Kernel_Attention"
            keys |= {f"{mobile}.{conv}.static_weight", f"{mobile}.{conv}.weight"}
            keys |= {f"{attention}.net1.weight", f"{attention}.net2.weight"} | bn(f"{attention}.bn")
            keys |= bn(f"{mobile}.bn{j}")
        ffn = f"{block}.ffn"
        keys |= {f"{ffn}.{n}.weight" for n in convs} | bn(f"{ffn}.bn1") | bn(f"{ffn}.bn3")
        keys |= {f"{ffn}.grn.gamma", f"{ffn}.grn.beta"}
    return keys


# --- architecture -------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_backbone_parameter_counts(variant):
    assert abs(count(eval_backbone(variant)) - BACKBONE_PARAMS[variant]) <= 5e3


def test_dmf_s_per_block_parameter_counts():
    blocks = eval_backbone("s").net.blocks
    for i, (block, expected) in enumerate(zip(blocks, BLOCK_PARAMS_S)):
        assert abs(count(block) / 1e6 - expected) <= 1e-3, f"block {i}"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_output_shapes_strides_and_channels(variant):
    backbone = eval_backbone(variant)
    channels = OUTPUT_CHANNELS[variant]
    with torch.no_grad():
        at_224 = backbone(torch.randn(1, 3, 224, 224))
        odd = backbone(torch.randn(1, 3, 250, 333))
    assert list(at_224) == list(FEATURES)
    for name, c, side in zip(FEATURES, channels, (56, 28, 14, 7)):
        assert at_224[name].shape == (1, c, side, side)
    # every stride-2 op is a 3x3 conv with padding 1: ceil(side / 2) each time
    for name, size in zip(FEATURES, ((63, 84), (32, 42), (16, 21), (8, 11))):
        assert odd[name].shape[-2:] == size
    shapes = backbone.output_shape()
    assert {n: (s.channels, s.stride) for n, s in shapes.items()} == {
        n: (c, 2 ** (i + 2)) for i, (n, c) in enumerate(zip(FEATURES, channels))
    }


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_state_dict_keys_are_the_official_ones(variant):
    torch.manual_seed(0)
    state = DynamicMobileFormer(**variant_config(variant), norm="BN", pooled_norm="BN").state_dict()
    assert set(state) == official_keys(variant)
    config = VARIANTS[variant]
    assert state["tokens"].shape == (1, 6, 192)
    assert state["stem.conv.weight"].shape == (config["stem"], 3, 3, 3)
    last, groups = config["channels"][-2], config["groups"]
    hidden = config["expansions"][-1]
    mobile = "blocks.10.dynamic_mobile"
    assert state[f"{mobile}.pw_conv1.weight"].shape == (8, hidden, last // groups, 1, 1)
    assert state[f"{mobile}.pw_conv1.static_weight"].shape == (hidden, last // groups, 1, 1)
    assert state[f"{mobile}.dw_conv.weight"].shape == (8, hidden, 1, 3, 3)
    attention = f"{mobile}.dw_conv.Kernel_Attention"
    assert state[f"{attention}.net1.weight"].shape == (192, 192 + hidden, 1, 1)
    assert state[f"{mobile}.pw_conv2.Kernel_Attention.net2.weight"].shape == (8, 192, 1, 1)


def test_tokens_are_a_parameter_and_not_an_output():
    backbone = eval_backbone("xxs")
    assert isinstance(backbone.net.tokens, nn.Parameter)
    with torch.no_grad():
        outputs = backbone(torch.randn(2, 3, 64, 64))
    assert all(out.dim() == 4 for out in outputs.values())


def test_block_order():
    """Mobile2Former on the pre-downsample input, Former, DY-Mobile fed token 0, then the
    pre-GroupNorm IRFFN with residual; the block returns the updated tokens."""
    torch.manual_seed(0)
    network = DynamicMobileFormer(**variant_config("xxs")).eval()
    for conv in network.modules():
        if isinstance(conv, DynamicResidualConv2d):
            conv.weight.data.normal_(0, 0.1)  # otherwise the tokens have no effect at init
    block = network.blocks[0]  # stride 2, 12 -> 20 channels
    x, tokens = torch.randn(2, 12, 16, 16), torch.randn(2, 6, 192)
    with torch.no_grad():
        expected_tokens = block.former(block.mobile2former(x, tokens))
        y = block.dynamic_mobile(x, expected_tokens[:, 0])
        out, new_tokens = block(x, tokens)
        changed_token = block.dynamic_mobile(x, expected_tokens[:, 0] + 1)
    torch.testing.assert_close(new_tokens, expected_tokens)
    torch.testing.assert_close(out, y + block.ffn(block.norm(y)))
    assert out.shape == (2, 20, 8, 8)
    assert not torch.allclose(changed_token, y)


def test_grn_dmf_code_is_affine_and_convnextv2_normalises_over_channels():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 5, 7)
    gamma, beta = torch.randn(1, 8, 1, 1), torch.randn(1, 8, 1, 1)
    for mode in ("dmf_code", "convnextv2"):
        grn = GRN(8, mode)
        grn.gamma.data.copy_(gamma)
        grn.beta.data.copy_(beta)
        out = grn(x)
        if mode == "dmf_code":
            torch.testing.assert_close(out, x * (1 + gamma) + beta, rtol=1e-5, atol=1e-5)
        else:
            norms = x.pow(2).sum((2, 3), keepdim=True).sqrt()
            expected = gamma * x * norms / (norms.mean(1, keepdim=True) + 1e-6) + beta + x
            torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="unknown GRN mode 'ln'"):
        GRN(8, "ln")


# --- dynamic residual convolution ---------------------------------------------------------------


def make_conv(kernel_size: int, groups: int, temperature: float = 1.0) -> DynamicResidualConv2d:
    """A DYR conv 12 -> 24 (depth-wise: 12 -> 12) with random dynamic kernels."""
    torch.manual_seed(0)
    out_channels = 12 if groups == 12 else 24
    conv = DynamicResidualConv2d(12, out_channels, kernel_size, groups, "BN", temperature)
    conv.weight.data.normal_(0, 0.2)
    randomize_batchnorms(conv)
    return conv.train()


@pytest.mark.parametrize("kernel_size, groups", [(1, 4), (1, 1), (3, 12)])
def test_grouped_batch_conv_equals_a_per_sample_loop(kernel_size, groups):
    conv = make_conv(kernel_size, groups)
    x = torch.randn(3, 12, 9, 11, requires_grad=True)
    token = torch.randn(3, 192, requires_grad=True)
    weight = torch.randn(3, conv.static_weight.shape[0], 9, 11)
    results = []
    for forward in (conv, functools.partial(per_sample_loop, conv)):
        out = forward(x, token)
        params = [x, token] + list(conv.parameters())
        grads = torch.autograd.grad((out * weight).sum(), params)
        results.append((out, grads))
    (batched, batched_grads), (looped, looped_grads) = results
    assert (batched - looped).abs().max() <= 1e-5
    for a, b in zip(batched_grads, looped_grads):
        assert (a - b).abs().max() <= 1e-5


def test_at_init_the_dynamic_conv_is_the_static_conv():
    torch.manual_seed(0)
    conv = DynamicResidualConv2d(12, 24, 3, 4, "FrozenStatsBN")
    assert not conv.weight.any()  # zero-initialised dynamic kernels (§3.3, Table 7)
    x, token = torch.randn(2, 12, 8, 8), torch.randn(2, 192)
    expected = F.conv2d(x, conv.static_weight, padding=1, groups=4)
    assert (conv(x, token) - expected).abs().max() <= 1e-6


def test_kernel_scores_are_sigmoids_of_logits_over_the_temperature():
    x, token = torch.randn(5, 12, 6, 6), torch.randn(5, 192)
    cold, hot = make_conv(1, 4).eval(), make_conv(1, 4, temperature=30.0).eval()
    with torch.no_grad():
        cold_scores = cold.Kernel_Attention(x, token)
        hot_scores = hot.Kernel_Attention(x, token)
    assert cold_scores.shape == (5, 8)
    assert ((cold_scores >= 0) & (cold_scores <= 1)).all()
    logits = torch.logit(cold_scores.double())
    torch.testing.assert_close(torch.logit(hot_scores.double()) * 30, logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="kernel temperature 0"):
        DynamicResidualConv2d(12, 24, 1, 4, "BN", temperature=0)


def test_temperature_config_key_reaches_every_kernel_attention():
    cfg = load_config(CONFIGS / "dmf_xxs_retinanet_1x.yaml", ["MODEL.DMF.KERNEL_TEMPERATURE", 30.0])
    assert load_config(CONFIGS / "dmf_xxs_retinanet_1x.yaml").MODEL.DMF.KERNEL_TEMPERATURE == 1.0
    model = build_model(cfg)
    temperatures = {
        m.Kernel_Attention.temperature
        for m in model.modules()
        if isinstance(m, DynamicResidualConv2d)
    }
    assert temperatures == {30.0}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_aggregation_stays_finite_and_full_precision_under_autocast(dtype):
    conv = make_conv(1, 4)
    x, token = torch.randn(2, 12, 5, 5), torch.randn(2, 192)
    with torch.autocast("cpu", dtype=dtype):
        out = conv(x, token)
    assert torch.isfinite(out.float()).all()
    conv.weight.data.mul_(5e5)  # dynamic kernels beyond the float16 range
    scores = conv.Kernel_Attention(x, token)
    with torch.autocast("cpu", dtype=dtype):
        kernels = conv.kernels(scores)
    assert torch.isfinite(kernels).all()
    assert torch.equal(kernels, conv.kernels(scores))  # as computed in fp32 without autocast


# --- 1 image per device -------------------------------------------------------------------------


def test_training_with_one_image_uses_frozen_statistics_on_pooled_vectors():
    torch.manual_seed(0)
    backbone = D2DynamicMobileFormer("xxs", norm="BN").train()  # pooled_norm default
    outputs = backbone(torch.randn(1, 3, 64, 96))
    sum(out.mean() for out in outputs.values()).backward()
    assert all(torch.isfinite(out).all() for out in outputs.values())


@pytest.mark.parametrize("pooled_norm", ["BN", "SyncBN", "naiveSyncBN"])
def test_batch_statistics_on_pooled_vectors_with_one_image_name_the_key(pooled_norm):
    torch.manual_seed(0)
    backbone = D2DynamicMobileFormer("xxs", pooled_norm=pooled_norm).train()
    with pytest.raises(ValueError, match=r"MODEL\.DMF\.POOLED_NORM.*1 image"):
        backbone(torch.randn(1, 3, 64, 64))
    backbone(torch.randn(2, 3, 64, 64))  # batch statistics over 2 images
    with torch.no_grad():
        backbone.eval()(torch.randn(1, 3, 64, 64))  # running statistics


# --- freezing -----------------------------------------------------------------------------------


def test_paper_freezing_freezes_blocks_0_to_3_only_and_keeps_them_in_eval_mode():
    torch.manual_seed(0)
    backbone = D2DynamicMobileFormer("xxs", norm="BN", frozen_blocks=4).train()
    net = backbone.net
    for i, block in enumerate(net.blocks):
        frozen = i < 4
        assert all(p.requires_grad != frozen for p in block.parameters()), i
        assert all(m.training != frozen for m in block.modules()), i
        assert any(isinstance(m, FrozenBatchNorm2d) for m in block.modules()) == frozen, i
    assert net.tokens.requires_grad
    assert all(p.requires_grad for p in net.stem.parameters())
    assert all(p.requires_grad for p in net.lite_bottleneck.parameters())
    assert net.stem.training and net.lite_bottleneck.training
    drop_paths = [m for m in net.blocks[:4].modules() if isinstance(m, DropPath)]
    assert drop_paths and not any(m.training for m in drop_paths)


@pytest.mark.parametrize(
    "freeze_at, frozen_blocks", [(0, 0), (1, 0), (2, 2), (3, 4), (4, 8), (5, 11)]
)
def test_freeze_at(freeze_at, frozen_blocks):
    torch.manual_seed(0)
    net = D2DynamicMobileFormer("xxs", freeze_at=freeze_at).train().net
    stem_frozen = freeze_at >= 1
    assert net.tokens.requires_grad != stem_frozen
    for part in (net.stem, net.lite_bottleneck):
        assert all(p.requires_grad != stem_frozen for p in part.parameters())
        assert part.training != stem_frozen
    assert [any(p.requires_grad for p in b.parameters()) for b in net.blocks] == [
        i >= frozen_blocks for i in range(11)
    ]
    with pytest.raises(ValueError, match="freeze_at=6"):
        D2DynamicMobileFormer("xxs", freeze_at=6)


def frozen_bn_affines(model: nn.Module) -> int:
    frozen = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    return sum(m.weight.numel() + m.bias.numel() for m in frozen)


@pytest.mark.parametrize("name", sorted(DETECTOR_PARAMS))
def test_detector_parameter_counts_match_the_paper(name):
    trainable, total = DETECTOR_PARAMS[name]
    model = build_model(load_config(CONFIGS / f"{name}.yaml"))
    counted = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert abs(counted / 1e6 - trainable) <= 0.05
    assert abs((count(model) + frozen_bn_affines(model)) / 1e6 - total) <= 0.05


class DenseRetinaNet(nn.Module):
    """RetinaNet's backbone (DMF + FPN + P6/P7) and head, without anchors and post-processing."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor):
        features = self.model.backbone(image)
        return self.model.head([features[f] for f in self.model.head_in_features])


@pytest.mark.parametrize("variant", sorted(RETINANET_GFLOPS))
def test_retinanet_flops_at_800x1333(variant):
    """fvcore FLOPs of the dense part of RetinaNet on the 800x1344 input Detectron2 runs for an
    800x1333 image (padded to a multiple of 32)."""
    model = build_model(load_config(CONFIGS / f"dmf_{variant}_retinanet_1x.yaml")).eval()
    image = torch.zeros(1, 3, 800, 1344)
    with torch.no_grad():
        analysis = flop_count_analysis(DenseRetinaNet(model), image)
        gflops = analysis.unsupported_ops_warnings(False).total() / 1e9
    assert math.isclose(gflops, RETINANET_GFLOPS[variant], rel_tol=0.01)
