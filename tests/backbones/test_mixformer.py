"""MixFormer backbone: architecture, parameter counts (design note §3.2, §8), Detectron2 use."""

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from timm.layers import DropPath
from torch import nn

from conftest import randomize_batchnorms
from hybrid_d2.backbones import D2MixFormer, build_hybrid_fpn_backbone
from hybrid_d2.backbones.mixformer import VARIANTS, MixingBlock
from hybrid_d2.config import add_hybrid_config
from hybrid_d2.layers import (
    FrozenStatsBatchNorm2d,
    get_norm,
    pad_to_multiple,
    window_partition,
    window_reverse,
)

FEATURES = ("res2", "res3", "res4", "res5")
STRIDES = (4, 8, 16, 32)

# Design note §8 tests 2 and 3: backbone only (stem + stages + merges), and with 4 output LNs.
BACKBONE_PARAMS = {
    "b0": 3_570_343,
    "b1": 6_277_405,
    "b2": 8_284_376,
    "b3": 14_973_240,
    "b4": 32_858_908,
    "b5": 59_425_547,
    "b6": 117_238_198,
}
WITH_OUTPUT_NORMS = {
    "b0": 3_571_063,
    "b1": 6_278_365,
    "b2": 8_285_336,
    "b3": 14_974_680,
    "b4": 32_860_828,
    "b5": 59_428_427,
    "b6": 117_241_078,
}


@functools.lru_cache(maxsize=None)
def eval_backbone(variant: str) -> D2MixFormer:
    """One shared eval-mode instance per small variant; tests using it must not modify it."""
    torch.manual_seed(0)
    return D2MixFormer(variant).eval()


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    "variant, channels", [("b1", (32, 64, 128, 256)), ("b4", (64, 128, 256, 512))]
)
def test_output_shapes_at_224(variant, channels):
    backbone = eval_backbone(variant)
    with torch.no_grad():
        outputs = backbone(torch.randn(1, 3, 224, 224))
    assert list(outputs) == list(FEATURES)
    for name, c, size in zip(FEATURES, channels, (56, 28, 14, 7)):
        assert outputs[name].shape == (1, c, size, size)
    assert {name: s.channels for name, s in backbone.output_shape().items()} == dict(
        zip(FEATURES, channels)
    )
    assert {name: s.stride for name, s in backbone.output_shape().items()} == dict(
        zip(FEATURES, STRIDES)
    )


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_parameter_counts_and_any_input_size(variant):
    backbone = D2MixFormer(variant).train()
    assert count(backbone.net) == BACKBONE_PARAMS[variant]
    assert count(backbone) == WITH_OUTPUT_NORMS[variant]
    # batch 1 in train mode (default norms); odd sizes give ceil(size / stride), e.g. 97x131 ->
    # 25x33, 13x17, 7x9, 4x5; the big variants run at a smaller odd size to keep the test fast
    height, width = (33, 47) if variant in ("b5", "b6") else (97, 131)
    outputs = backbone(torch.randn(1, 3, height, width))
    sum(o.mean() for o in outputs.values()).backward()
    channels = [VARIANTS[variant]["embed_dim"] * 2**i for i in range(4)]
    for name, stride, c in zip(FEATURES, STRIDES, channels):
        assert outputs[name].shape == (1, c, math.ceil(height / stride), math.ceil(width / stride))
        assert torch.isfinite(outputs[name]).all()
    assert all(torch.isfinite(p.grad).all() for p in backbone.parameters())


def test_interaction_maps_and_window_padding():
    """Channel interaction (B, dim/2, 1, 1); spatial interaction (B, 1, Hp, Wp), padded to 7s."""
    backbone = eval_backbone("b0")
    shapes = []
    hooks = []
    for stage in backbone.net.layers:
        attn = stage.blocks[0].attn
        for module in (attn.channel_interaction, attn.spatial_interaction):
            hooks.append(module.register_forward_hook(lambda m, i, o: shapes.append(o.shape)))
    try:
        with torch.no_grad():
            backbone(torch.randn(2, 3, 97, 131))  # stage sizes 25x33, 13x17, 7x9, 4x5
            backbone(torch.randn(2, 3, 224, 224))  # 56, 28, 14, 7: no padding
    finally:
        for hook in hooks:
            hook.remove()
    dims = (24, 48, 96, 192)
    padded = ((28, 35), (14, 21), (7, 14), (7, 7), (56, 56), (28, 28), (14, 14), (7, 7))
    expected = []
    for i, size in enumerate(padded):
        expected += [(2, dims[i % 4] // 2, 1, 1), (2, 1, *size)]
    assert shapes == expected


def test_train_mode_batch_one_forward_backward_with_default_norms():
    torch.manual_seed(0)
    backbone = D2MixFormer("b0").train()
    outputs = backbone(torch.randn(1, 3, 64, 64))
    sum(o.square().mean() for o in outputs.values()).backward()
    no_grad = [n for n, p in backbone.named_parameters() if p.grad is None]
    assert not no_grad


def test_train_mode_bn_on_pooled_map_fails_at_batch_one():
    # why pooled_norm defaults to FrozenStatsBN (design note §6 #5)
    backbone = D2MixFormer("b0", pooled_norm="BN").train()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        backbone(torch.randn(1, 3, 64, 64))


def test_relative_position_bias_tables():
    backbone = eval_backbone("b4")
    for stage, heads in zip(backbone.net.layers, VARIANTS["b4"]["num_heads"]):
        for block in stage.blocks:
            assert block.attn.relative_position_bias_table.shape == (169, heads)
    assert not [k for k in backbone.state_dict() if "relative_position_index" in k]


def test_drop_path_schedule_b4():
    backbone = D2MixFormer("b4")
    rates = [
        block.drop_path.drop_prob if isinstance(block.drop_path, DropPath) else 0.0
        for stage in backbone.net.layers
        for block in stage.blocks
    ]
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.2, 20))


def test_fpn_built_from_config():
    cfg = get_cfg()
    add_hybrid_config(cfg)
    cfg.MODEL.MIXFORMER.VARIANT = "b0"
    cfg.MODEL.MIXFORMER.DROP_PATH_RATE = 0.1
    cfg.MODEL.BACKBONE.FREEZE_AT = 1
    cfg.MODEL.FPN.BOTTOM_UP = "build_mixformer_backbone"
    cfg.MODEL.FPN.IN_FEATURES = list(FEATURES)
    fpn = build_hybrid_fpn_backbone(cfg, ShapeSpec(channels=3))
    bottom_up = fpn.bottom_up
    assert isinstance(bottom_up, D2MixFormer)
    assert not any(p.requires_grad for p in bottom_up.net.patch_embed.parameters())
    assert bottom_up.net.layers[3].blocks[-1].drop_path.drop_prob == pytest.approx(0.1)
    with torch.no_grad():
        outputs = fpn.eval()(torch.randn(1, 3, 64, 96))
    assert {k: tuple(v.shape[-2:]) for k, v in outputs.items()} == {
        "p2": (16, 24),
        "p3": (8, 12),
        "p4": (4, 6),
        "p5": (2, 3),
        "p6": (1, 2),
    }
    with pytest.raises(ValueError, match="3 input channels"):
        build_hybrid_fpn_backbone(cfg, ShapeSpec(channels=1))


# --- Mixing Block against a literal transcription of design note §2.4 -------------------------


def reference_windows(x, ws):
    """(B, Hp, Wp, C) -> (B * nW, ws*ws, C), written out with loops."""
    batch, height, width, _ = x.shape
    return torch.cat(
        [
            x[b, i : i + ws, j : j + ws].reshape(1, ws * ws, -1)
            for b in range(batch)
            for i in range(0, height, ws)
            for j in range(0, width, ws)
        ]
    )


def reference_map(windows, batch, height, width, ws):
    out = windows.new_zeros(batch, height, width, windows.shape[-1])
    n = 0
    for b in range(batch):
        for i in range(0, height, ws):
            for j in range(0, width, ws):
                out[b, i : i + ws, j : j + ws] = windows[n].view(ws, ws, -1)
                n += 1
    return out


def reference_block(block, x, height, width):
    """Design note §2.4 step by step: tokens (B, H*W, dim) in, tokens out."""
    a, ws = block.attn, 7
    batch, _, dim = x.shape
    heads, head_dim = a.num_heads, dim // 2 // a.num_heads
    shortcut = x
    x = block.norm1(x).view(batch, height, width, dim)
    hp, wp = -(-height // ws) * ws, -(-width // ws) * ws
    x = F.pad(x, (0, 0, 0, wp - width, 0, hp - height))
    xw = reference_windows(x, ws)

    xa = a.proj_attn_norm(a.proj_attn(xw))
    xc = a.proj_cnn_norm(a.proj_cnn(xw))
    xc = reference_map(xc, batch, hp, wp, ws).permute(0, 3, 1, 2)
    xc = a.dwconv3x3(xc)
    ci = a.channel_interaction(xc.mean(dim=(2, 3), keepdim=True))  # (B, dim/2, 1, 1)
    xc = a.projection(xc)

    windows_per_image = xw.shape[0] // batch
    qkv = a.qkv(xa).view(-1, ws * ws, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    gate = torch.sigmoid(ci).view(batch, 1, heads, 1, head_dim)
    v = (v.view(batch, windows_per_image, heads, ws * ws, head_dim) * gate).flatten(0, 1)
    index = a.relative_position_index.view(-1)
    bias = a.relative_position_bias_table[index].view(ws * ws, ws * ws, heads).permute(2, 0, 1)
    attn = torch.softmax(q * head_dim**-0.5 @ k.transpose(-2, -1) + bias, dim=-1)
    xa = (attn @ v).transpose(1, 2).reshape(-1, ws * ws, dim // 2)

    si = a.spatial_interaction(reference_map(xa, batch, hp, wp, ws).permute(0, 3, 1, 2))
    xc = a.conv_norm(torch.sigmoid(si) * xc)
    xc = reference_windows(xc.permute(0, 2, 3, 1), ws)
    xa = a.attn_norm(xa)
    y = a.proj(torch.cat([xa, xc], dim=-1))

    y = reference_map(y, batch, hp, wp, ws)[:, :height, :width].reshape(batch, -1, dim)
    x = shortcut + y
    return x + block.mlp(block.norm2(x))


def randomize_norms_and_bias_tables(module):
    """Move every norm and position table off its identity/zero init so that no step is a no-op."""
    randomize_batchnorms(module)
    for name, p in module.named_parameters():
        if "norm" in name or "relative_position_bias_table" in name:
            p.data.normal_(1.0 if name.endswith("weight") else 0.0, 0.5)


def test_mixing_block_matches_design_note_computation():
    torch.manual_seed(0)
    block = MixingBlock(
        dim=32,
        num_heads=2,
        window_size=7,
        mlp_ratio=4.0,
        drop_path=0.0,
        norm="BN",
        pooled_norm="FrozenStatsBN",
    ).eval()
    randomize_norms_and_bias_tables(block)
    height, width = 10, 16  # padded to 14 x 21: 6 windows per image
    x = torch.randn(2, height, width, 32)
    with torch.no_grad():
        ours = block(x)
        reference = reference_block(block, x.flatten(1, 2), height, width)
    assert (ours.flatten(1, 2) - reference).abs().max() <= 1e-5


def sdpa_kernels(call) -> set:
    with torch.profiler.profile() as prof:
        call()
    return {e.name for e in prof.events() if e.name.startswith("aten::_scaled_dot_product")}


def test_window_attention_takes_the_fused_kernel_in_inference():
    """The relative position bias reaches SDPA as a (1, heads, L, L) mask, which PyTorch's fused
    CPU kernel takes in inference (a 3-D mask falls back to the unfused math path, 1.6-1.9x
    slower in stages 1-2); a training step, whose bias table needs its gradient, runs the math
    path. The design-note test above checks the values."""
    torch.manual_seed(0)
    block = MixingBlock(
        dim=32, num_heads=2, window_size=7, mlp_ratio=4.0, drop_path=0.0, norm="BN",
        pooled_norm="FrozenStatsBN",
    )  # fmt: skip
    x = torch.randn(2, 14, 14, 32)
    with torch.no_grad():
        assert sdpa_kernels(lambda: block.eval()(x)) == {
            "aten::_scaled_dot_product_flash_attention_for_cpu"
        }
    assert sdpa_kernels(lambda: block.train()(x).sum().backward()) == {
        "aten::_scaled_dot_product_attention_math"
    }
    assert block.attn.relative_position_bias_table.grad.abs().sum() > 0


# --- layers --------------------------------------------------------------------------------------


def test_window_partition_pads_and_reverse_crops():
    x = torch.randn(2, 10, 16, 3)
    windows, padded = window_partition(x, 7)
    assert padded == (14, 21) and windows.shape == (2 * 2 * 3, 49, 3)
    torch.testing.assert_close(windows, reference_windows(pad_to_multiple(x, 7), 7))
    assert torch.equal(window_reverse(windows, 7, padded, (10, 16)), x)
    assert pad_to_multiple(x, 7)[:, 10:].abs().sum() == 0


def test_frozen_stats_batchnorm_uses_running_stats_in_train_mode():
    torch.manual_seed(0)
    bn = FrozenStatsBatchNorm2d(4).train()
    randomize_batchnorms(bn)
    stats = (bn.running_mean.clone(), bn.running_var.clone())
    x = torch.randn(1, 4, 1, 1)  # one value per channel: train-mode BatchNorm2d would fail
    out = bn(x)
    expected = (x - stats[0].view(1, -1, 1, 1)) / torch.sqrt(stats[1].view(1, -1, 1, 1) + bn.eps)
    expected = expected * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert bn.weight.grad is not None and bn.bias.grad is not None
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert bn.num_batches_tracked.item() == 0


def test_get_norm():
    assert isinstance(get_norm("FrozenStatsBN", 8), FrozenStatsBatchNorm2d)
    assert type(get_norm("BN", 8)).forward is nn.BatchNorm2d.forward  # batch statistics
    assert isinstance(get_norm("FrozenBN", 8), FrozenBatchNorm2d)
    with pytest.raises(ValueError, match="'BatchNorm'.*FrozenStatsBN.*SyncBN"):
        get_norm("BatchNorm", 8)
