"""DilateFormer backbone: MSDA against the official unfold form, stage-3 attention modes,
parameter/FLOP counts and shapes (design note §8), Detectron2 use."""

import copy
import functools
import math

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from timm.layers import DropPath
from torch import nn

from conftest import randomize_batchnorms
from dilateformer_reference import unfold_dilated_attention, use_unfold_attention
from hybrid_d2.backbones import D2DilateFormer, build_hybrid_fpn_backbone
from hybrid_d2.backbones.dilateformer import (
    VARIANTS,
    Attention,
    DilateFormer,
    MultiDilateAttention,
    stage3_pattern,
)
from hybrid_d2.config import add_hybrid_config
from hybrid_d2.layers import dilated_attention, flop_count_analysis, window_attention_mask
from hybrid_d2.layers.window_masks import MASKED
from hybrid_d2.solver.build import backbone_layer_id

FEATURES = ("res2", "res3", "res4", "res5")
STRIDES = (4, 8, 16, 32)

# Design note §8 #2 (backbone: stem + stages + downsamplers) and #3 (+ 4 output LayerNorms).
BACKBONE_PARAMS = {"tiny": 16_660_592, "small": 23_479_352, "base": 46_661_840}
OUTPUT_NORM_PARAMS = {"tiny": 2_160, "small": 2_160, "base": 2_880}
# §8 #5: GFLOPs at 224 of the classification model (our backbone lacks only norm + head).
GFLOPS_224 = {"tiny": 3.177, "small": 4.613, "base": 9.962}


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@functools.lru_cache(maxsize=None)
def global_backbone(variant: str) -> D2DilateFormer:
    """One shared eval-mode instance per variant (BN, global stage 3); tests must not modify it."""
    torch.manual_seed(0)
    backbone = D2DilateFormer(variant, stage3_attention="global", norm="BN").eval()
    randomize_batchnorms(backbone)
    return backbone


# --- MSDA ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "channels, heads, size", [(72, 3, (13, 17)), (72, 3, (14, 14)), (144, 6, (9, 11))]
)
def test_dilated_attention_matches_unfold_reference(channels, heads, size):
    """§8 #9, forward and gradients (float64 keeps the gradient comparison tight)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, channels, *size, requires_grad=True) for _ in range(3))
    ours, weights = dilated_attention(q, k, v, heads, (1, 2, 3))
    reference = unfold_dilated_attention(q, k, v, heads, (1, 2, 3)).permute(0, 3, 1, 2)
    assert (ours - reference).abs().max() <= 1e-5
    assert weights.shape == (2, heads, 9, *size)
    torch.testing.assert_close(weights.sum(2), torch.ones(2, heads, *size))

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    grad = torch.randn(2, channels, *size, dtype=torch.float64)
    ours = torch.autograd.grad(
        dilated_attention(q64, k64, v64, heads, (1, 2, 3))[0], (q64, k64, v64), grad
    )
    reference = unfold_dilated_attention(q64, k64, v64, heads, (1, 2, 3)).permute(0, 3, 1, 2)
    reference = torch.autograd.grad(reference, (q64, k64, v64), grad)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_zero_padded_keys_take_part_in_the_softmax():
    """§8 #10: k = 0, v = 1 gives (#in-map keys) / 9: 4/9 within r of two borders, 6/9 of one."""
    height, width = 9, 10
    q = torch.randn(1, 6, height, width)
    out, weights = dilated_attention(q, torch.zeros_like(q), torch.ones_like(q), 3, (1, 2, 3))
    torch.testing.assert_close(weights, torch.full_like(weights, 1 / 9))  # logit 0 everywhere
    for group, r in enumerate((1, 2, 3)):
        group_out = out[0, 2 * group : 2 * group + 2]
        rows = torch.tensor(
            [sum(0 <= i + a * r < height for a in (-1, 0, 1)) for i in range(height)]
        )
        cols = torch.tensor([sum(0 <= j + a * r < width for a in (-1, 0, 1)) for j in range(width)])
        expected = (rows[:, None] * cols[None, :]).float() / 9
        torch.testing.assert_close(group_out, expected.expand_as(group_out), atol=1e-6, rtol=0)
        assert group_out[:, 0, 0].tolist() == pytest.approx([4 / 9] * 2, abs=1e-6)
        assert group_out[:, r - 1, 5].tolist() == pytest.approx([6 / 9] * 2, abs=1e-6)
        assert group_out[:, r, r].tolist() == pytest.approx([1.0] * 2, abs=1e-6)


def test_head_to_dilation_map():
    """§8 #11: stage 2 (6 heads): heads {0,1} -> 1, {2,3} -> 2, {4,5} -> 3, contiguous blocks."""
    assert VARIANTS["small"]["num_heads"][1] == 6
    heads, size, centre = 6, 11, 5
    q = torch.zeros(1, 6 * heads, size, size)  # uniform weights over the 9 keys
    v = torch.zeros_like(q)
    v[..., centre, centre] = 1.0
    out, _ = dilated_attention(q, torch.zeros_like(q), v, heads, (1, 2, 3))
    per_head = out[0].unflatten(0, (heads, -1))[:, 0]  # (heads, H, W)
    dilation_of_head = []
    for head in range(heads):
        # the value at the centre is among the keys of query (c - r, c - r) only for dilation r
        seen = [r for r in (1, 2, 3) if per_head[head, centre - r, centre - r] > 0]
        dilation_of_head.append(seen)
    assert dilation_of_head == [[1], [1], [2], [2], [3], [3]]


def test_msda_block_matches_unfold_reference():
    torch.manual_seed(0)
    attention = MultiDilateAttention(dim=144, num_heads=6)
    x = torch.randn(2, 13, 17, 144)
    with torch.no_grad():
        ours = attention(x)
        qkv = attention.qkv(x.permute(0, 3, 1, 2))
        reference = attention.proj(unfold_dilated_attention(*qkv.chunk(3, dim=1), 6, (1, 2, 3)))
    assert (ours - reference).abs().max() <= 1e-5


def test_whole_network_matches_unfold_msda():
    torch.manual_seed(0)
    network = D2DilateFormer("tiny", stage3_attention="mixed", norm="BN").net.eval()
    randomize_batchnorms(network)
    reference = use_unfold_attention(copy.deepcopy(network))
    image = torch.randn(1, 3, 97, 131)
    with torch.no_grad():
        for ours, theirs in zip(network(image), reference(image)):
            assert (ours - theirs).abs().max() <= 1e-4


# --- stage-3 attention -----------------------------------------------------------------------


def test_stage3_patterns():
    assert stage3_pattern("small", "mixed") == ("window", "shifted", "window", "global") * 2
    assert (
        stage3_pattern("base", "mixed") == ("window", "shifted", "window", "shifted", "global") * 2
    )
    assert stage3_pattern("tiny", "mixed") == ("window", "shifted", "global") * 2
    assert stage3_pattern("base", "window") == ("window",) * 10
    assert stage3_pattern("tiny", "global") == ("global",) * 6
    backbone = D2DilateFormer("small", stage3_attention="mixed", window_size=14)
    kinds = [block.attn.kind for block in backbone.net.stages[2].blocks]
    assert kinds == list(stage3_pattern("small", "mixed"))
    assert all(block.attn.window_size == 14 for block in backbone.net.stages[2].blocks)
    assert all(block.attn.kind == "global" for block in backbone.net.stages[3].blocks)
    assert all(
        isinstance(b.attn, MultiDilateAttention) for s in backbone.net.stages[:2] for b in s.blocks
    )


@pytest.mark.parametrize("mode", ["window", "mixed"])
def test_windows_covering_the_map_are_global_attention(mode):
    """At 224 stage 3 is 14x14: with 14x14 windows every mode is the classification model; with
    16x16 windows (padded, padding masked) too. §8 #4: no mode adds parameters."""
    image = torch.randn(1, 3, 224, 224)
    reference = global_backbone("tiny")
    with torch.no_grad():
        expected = reference(image)
        for window_size in (14, 16):
            backbone = D2DilateFormer(
                "tiny", stage3_attention=mode, window_size=window_size, norm="BN"
            )
            backbone.load_state_dict(reference.state_dict())
            outputs = backbone.eval()(image)
            for name in FEATURES:
                assert (outputs[name] - expected[name]).abs().max() <= 1e-5, (
                    mode,
                    window_size,
                    name,
                )
    assert count(backbone) == count(reference)


def crop_attention(attn: Attention, x: torch.Tensor, rows, cols) -> torch.Tensor:
    """Global attention with the same weights on every (rows x cols) cell of x, reassembled."""
    global_attn = Attention(x.shape[-1], attn.num_heads, "global", attn.window_size)
    global_attn.load_state_dict(attn.state_dict())
    out = torch.empty_like(x)
    for r0, r1 in zip(rows[:-1], rows[1:]):
        for c0, c1 in zip(cols[:-1], cols[1:]):
            out[:, r0:r1, c0:c1] = global_attn(x[:, r0:r1, c0:c1])
    return out


def test_window_and_shifted_window_attention_on_padded_maps():
    """A 10x12 map, window 7 (padded to 14x14): windows = global attention on each cell of the
    grid cut at multiples of 7; shifted windows (shift 3) = cells cut at 3 + multiples of 7."""
    torch.manual_seed(0)
    x = torch.randn(2, 10, 12, 48)
    window = Attention(48, 4, "window", 7)
    shifted = Attention(48, 4, "shifted", 7)
    shifted.load_state_dict(window.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(window(x), crop_attention(window, x, (0, 7, 10), (0, 7, 12)))
        torch.testing.assert_close(
            shifted(x), crop_attention(shifted, x, (0, 3, 10), (0, 3, 10, 12)), atol=1e-5, rtol=1e-5
        )
        small = torch.randn(1, 5, 6, 48)  # fits in one window: no shift, plain global attention
        torch.testing.assert_close(shifted(small), crop_attention(shifted, small, (0, 5), (0, 6)))


def test_window_attention_mask():
    assert window_attention_mask((14, 21), 7) is None
    mask = window_attention_mask((10, 12), 7)  # padding only
    assert mask.shape == (4, 49, 49)
    assert (mask[0] == 0).all()  # window 0 is all real tokens
    padded_cols = torch.tensor(
        [j >= 5 for i in range(7) for j in range(7)]
    )  # window 1: cols 12, 13
    assert (mask[1][:, padded_cols] == MASKED).all() and (mask[1][:, ~padded_cols] == 0).all()

    # shifted: key j is visible from query i iff j is real and no wrap-around separates them,
    # i.e. their offset in the rolled map equals their offset in the original map
    size, ws, shift = (10, 12), 7, 3
    mask = window_attention_mask(size, ws, shift)
    hp, wp = 14, 14
    coords = torch.stack(torch.meshgrid(torch.arange(hp), torch.arange(wp), indexing="ij"), -1)
    original = (coords + shift) % torch.tensor([hp, wp])  # rolled position -> original position
    windows = coords.view(2, ws, 2, ws, 2).permute(0, 2, 1, 3, 4).reshape(4, ws * ws, 2)
    origin = original.view(2, ws, 2, ws, 2).permute(0, 2, 1, 3, 4).reshape(4, ws * ws, 2)
    same_offset = (
        (windows[:, :, None] - windows[:, None, :]) == (origin[:, :, None] - origin[:, None, :])
    ).all(-1)
    real_key = ((origin[..., 0] < size[0]) & (origin[..., 1] < size[1]))[:, None, :]
    torch.testing.assert_close(mask == 0, same_offset & real_key)


# --- shapes, counts ----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["tiny", "small", "base"])
def test_shapes_at_224_parameters_and_flops(variant):
    """§8 #1-3, #5, #7."""
    backbone = global_backbone(variant)
    channels = [VARIANTS[variant]["embed_dim"] * 2**i for i in range(4)]
    with torch.no_grad():
        outputs = backbone(torch.randn(1, 3, 224, 224))
    assert list(outputs) == list(FEATURES)
    for name, c, size in zip(FEATURES, channels, (56, 28, 14, 7)):
        assert outputs[name].shape == (1, c, size, size)
    assert {n: (s.channels, s.stride) for n, s in backbone.output_shape().items()} == dict(
        zip(FEATURES, zip(channels, STRIDES))
    )
    assert count(backbone.net) == BACKBONE_PARAMS[variant]
    assert count(backbone) == BACKBONE_PARAMS[variant] + OUTPUT_NORM_PARAMS[variant]
    analysis = flop_count_analysis(backbone.net, torch.zeros(1, 3, 224, 224))
    gflops = analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).total() / 1e9
    assert math.isclose(gflops, GFLOPS_224[variant], rel_tol=0.01), gflops
    assert analysis.by_operator()["PythonOp._DilatedAttention"] > 0  # MSDA products counted


def test_odd_input_size():
    """§8 #8: ceil at every stride-2 conv."""
    with torch.no_grad():
        outputs = global_backbone("tiny")(torch.randn(1, 3, 225, 301))
    expected = {"res2": (57, 76), "res3": (29, 38), "res4": (15, 19), "res5": (8, 10)}
    assert {name: tuple(o.shape[-2:]) for name, o in outputs.items()} == expected


def test_batch_one_train_mode_forward_backward():
    """Default norms (FrozenBN) and mixed stage 3; 97x131 makes stage 3 7x9, so shifted windows
    and padding are active."""
    torch.manual_seed(0)
    backbone = D2DilateFormer("tiny", drop_path_rate=0.1).train()
    outputs = backbone(torch.randn(1, 3, 97, 131))
    assert tuple(outputs["res4"].shape) == (1, 288, 7, 9)
    sum(o.square().mean() for o in outputs.values()).backward()
    params = list(backbone.named_parameters())
    assert [n for n, p in params if p.grad is None] == []
    assert all(torch.isfinite(p.grad).all() for _, p in params)


def test_drop_path_schedule():
    """§8 #12: linspace(0, d, sum(depths)) over all blocks, the CPE residual excluded."""
    backbone = D2DilateFormer("base")
    rates = [
        block.drop_path.drop_prob if isinstance(block.drop_path, DropPath) else 0.0
        for stage in backbone.net.stages
        for block in stage.blocks
    ]
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.3, 25))


def frozen_prefixes(freeze_at):
    prefixes = ["net.patch_embed."] if freeze_at >= 1 else []
    for i in range(freeze_at - 1):
        prefixes.append(f"net.stages.{i}.blocks.")
        if i > 0:
            prefixes.append(f"net.stages.{i - 1}.downsample.")
    return tuple(prefixes)


def test_parameter_names_follow_the_layer_decay_convention():
    backbone = D2DilateFormer("small")
    depths = backbone.depths
    assert depths == (3, 5, 8, 3)
    ids = {
        name: backbone_layer_id(f"backbone.bottom_up.{name}", depths)
        for name, _ in backbone.named_parameters()
    }
    assert ids["net.patch_embed.proj.0.weight"] == 0
    assert ids["net.stages.0.blocks.0.pos_embed.weight"] == 1
    assert ids["net.stages.1.blocks.4.attn.qkv.weight"] == 1 + 3 + 4
    assert ids["net.stages.0.downsample.proj.0.weight"] == 1 + 3  # feeds stage 2
    assert ids["output_norms.res5.weight"] == sum(depths) + 1
    assert all(0 < i <= sum(depths) for n, i in ids.items() if n.startswith("net.stages."))


def test_invalid_arguments_are_named():
    with pytest.raises(ValueError, match=r"'swin'.*\('global', 'window', 'mixed'\)"):
        D2DilateFormer("tiny", stage3_attention="swin")
    with pytest.raises(ValueError, match="window_size=0"):
        D2DilateFormer("tiny", window_size=0)
    with pytest.raises(ValueError, match="5 entries for 6 blocks"):
        DilateFormer(72, (2, 2, 6, 2), (3, 6, 12, 24), stage3_attention=("global",) * 5)
    with pytest.raises(ValueError, match="unknown attention kind 'local'"):
        Attention(48, 4, "local", 7)
    q = torch.zeros(1, 12, 4, 4)
    with pytest.raises(ValueError, match="12 channels, 4 heads, 3 dilations"):
        dilated_attention(q, q, q, 4, (1, 2, 3))
    with pytest.raises(ValueError, match="kernel_size=4"):
        dilated_attention(q, q, q, 3, (1, 2, 3), kernel_size=4)


def test_fpn_built_from_config():
    cfg = get_cfg()
    add_hybrid_config(cfg)
    cfg.MODEL.DILATEFORMER.VARIANT = "tiny"
    cfg.MODEL.DILATEFORMER.STAGE3_ATTENTION = "window"
    cfg.MODEL.DILATEFORMER.WINDOW_SIZE = 14
    cfg.MODEL.BACKBONE.FREEZE_AT = 1
    cfg.MODEL.FPN.BOTTOM_UP = "build_dilateformer_backbone"
    cfg.MODEL.FPN.IN_FEATURES = list(FEATURES)
    fpn = build_hybrid_fpn_backbone(cfg, ShapeSpec(channels=3))
    bottom_up = fpn.bottom_up
    assert isinstance(bottom_up, D2DilateFormer)
    assert not any(p.requires_grad for p in bottom_up.net.patch_embed.parameters())
    assert bottom_up.net.stages[3].blocks[-1].drop_path.drop_prob == pytest.approx(0.2)
    assert {b.attn.kind for b in bottom_up.net.stages[2].blocks} == {"window"}
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
