"""DMFormer backbone: architecture, parameter and MAC counts (docs/dmformer.md), Detectron2 use."""

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d, NaiveSyncBatchNorm, ShapeSpec
from timm.layers import DropPath
from torch import nn

from conftest import randomize_batchnorms
from hybrid_d2.backbones import D2DMFormer, DMFormer, DMFormerClassifier, build_hybrid_fpn_backbone
from hybrid_d2.backbones.dmformer import (
    DilatedBranches,
    DMFormerBlock,
    Pointwise,
    uses_fused_branches,
)
from hybrid_d2.config import add_hybrid_config
from hybrid_d2.layers import DepthwiseConv2d, flop_count_analysis, inference_affine

FEATURES = ("res2", "res3", "res4", "res5")
STRIDES = (4, 8, 16, 32)
CHANNELS = (64, 128, 320, 512)
DEPTHS = {"s": (2, 2, 6, 2), "l": (3, 3, 12, 3)}

# Exact counts of the resolved architecture (docs/dmformer.md, "Parameters and MACs").
BLOCK_PARAMS = (139_584, 500_352, 2_076_480, 5_190_144)
BLOCK_PARAMS_NO_MLP_DWCONV = (134_464, 490_112, 2_063_680, 5_169_664)
STEM_PARAMS = 63_232
DOWNSAMPLE_PARAMS = (74_112, 369_600, 1_476_096)
BACKBONE_PARAMS = {"s": 26_102_080, "l": 44_391_040}
BACKBONE_PARAMS_NO_MLP_DWCONV = {"s": 25_953_600, "l": 44_129_920}
OUTPUT_NORM_PARAMS = 2 * sum(CHANNELS)  # 2,048
HEAD_PARAMS = 514_024  # DMFormerClassifier: LayerNorm(512) + Linear(512, 1000)
CLASSIFIER_PARAMS = {"s": 26_616_104, "l": 44_905_064}
PAPER_PARAMS = {"s": 26.7e6, "l": 45.0e6}  # Table 2
# conv + linear multiply-accumulates of the classification network at 224x224 (paper: 5.0 / 8.7G)
CLASSIFIER_GMACS = {"s": 5.006, "l": 8.185}


def calibrate_batchnorms(backbone: nn.Module) -> nn.Module:
    """Set every BatchNorm's running statistics to those of one random batch, as training would
    (at initialisation eval-mode BatchNorms are identities and the residual stream grows without
    bound), and return the backbone in eval mode."""
    norms = [m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.momentum = 1.0
    with torch.no_grad():
        backbone.train()(torch.randn(2, 3, 96, 128))
    for m in norms:
        m.momentum = 0.1
    return backbone.eval()


@functools.lru_cache(maxsize=None)
def eval_backbone(variant: str = "s") -> D2DMFormer:
    """One shared eval-mode instance per variant; tests using it must not modify it."""
    torch.manual_seed(0)
    return calibrate_batchnorms(D2DMFormer(variant))


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def conv_linear_gmacs(model: nn.Module, height: int, width: int) -> float:
    """fvcore's conv and linear multiply-accumulates (the papers' convention) in G."""
    with torch.no_grad():
        analysis = flop_count_analysis(model.eval(), torch.zeros(1, 3, height, width))
        by_operator = analysis.unsupported_ops_warnings(False).by_operator()
    return (by_operator["conv"] + by_operator["linear"]) / 1e9


# --- shapes ----------------------------------------------------------------------------------------


def test_output_shapes_at_224():
    backbone = eval_backbone()
    with torch.no_grad():
        outputs = backbone(torch.randn(1, 3, 224, 224))
    assert list(outputs) == list(FEATURES)
    for name, c, size in zip(FEATURES, CHANNELS, (56, 28, 14, 7)):
        assert outputs[name].shape == (1, c, size, size)
        assert torch.isfinite(outputs[name]).all()
    shapes = backbone.output_shape()
    assert {n: s.channels for n, s in shapes.items()} == dict(zip(FEATURES, CHANNELS))
    assert {n: s.stride for n, s in shapes.items()} == dict(zip(FEATURES, STRIDES))


@pytest.mark.parametrize(
    "height, width, sizes",
    [
        (256, 320, ((64, 80), (32, 40), (16, 20), (8, 10))),
        # odd: 7x7 s2 -> 113, 3x3 -> 113, padded to 114, 2x2 s2 -> 57 = ceil(225 / 4)
        (225, 225, ((57, 57), (29, 29), (15, 15), (8, 8))),
        (97, 131, ((25, 33), (13, 17), (7, 9), (4, 5))),
    ],
)
def test_non_square_and_odd_input_sizes(height, width, sizes):
    with torch.no_grad():
        outputs = eval_backbone()(torch.randn(1, 3, height, width))
    assert [tuple(o.shape[-2:]) for o in outputs.values()] == list(sizes)
    for (h, w), stride in zip(sizes, STRIDES):
        assert (h, w) == (math.ceil(height / stride), math.ceil(width / stride))


# --- DMA -------------------------------------------------------------------------------------------


def reference_dma(dma, x):
    """Eq. (1)-(3) written out, each dilated branch as its own F.conv2d call."""
    xe = F.conv2d(x, dma.expand.weight, dma.expand.bias)  # Conv_exp, C -> rC
    branches = [
        F.conv2d(xe, c.weight, c.bias, padding=c.dilation[0] * (c.kernel_size[0] - 1) // 2,
                 dilation=c.dilation, groups=xe.shape[1])
        for c in dma.branches.branches
    ]  # fmt: skip
    xp = F.relu(dma.norm(branches[0] + branches[1] + branches[2]))
    x_ = x + F.conv2d(xp, dma.reduce.weight, dma.reduce.bias)
    fc1, _, fc2, _ = dma.gate
    attn = torch.sigmoid(F.linear(F.relu(F.linear(x.mean(dim=(2, 3)), fc1.weight, fc1.bias)),
                                  fc2.weight, fc2.bias))  # fmt: skip
    return attn[:, :, None, None] * F.conv2d(x_, dma.proj.weight, dma.proj.bias), branches, attn


@pytest.mark.parametrize("mode", ["separate", "fused"])
def test_dma_matches_the_paper_equations(mode):
    torch.manual_seed(0)
    block = DMFormerBlock(32, 8, True, 0.0, "BN", ratio=4, kernels=(3, 5, 7), dilations=(1, 2, 3),
                          branches=mode, gate=True).eval()  # fmt: skip
    randomize_batchnorms(block)
    x = torch.randn(2, 32, 13, 18)
    with torch.no_grad():
        expected, branches, attn = reference_dma(block.dma, block.norm1(x))
        torch.testing.assert_close(block.dma(block.norm1(x)), expected, rtol=1e-5, atol=1e-5)
        gate = block.dma.channel_attention(block.norm1(x))
    # note §8 #15-16: the gate is (N, C, 1, 1); every branch keeps H x W on 4C channels
    assert gate.shape == (2, 32, 1, 1)
    torch.testing.assert_close(gate.flatten(1), attn)
    assert [tuple(b.shape) for b in branches] == [(2, 128, 13, 18)] * 3
    dilated = [(c.kernel_size, c.dilation) for c in block.dma.branches.branches]
    assert dilated == [((3, 3), (1, 1)), ((5, 5), (2, 2)), ((7, 7), (3, 3))]


def test_every_block_gates_each_image_by_its_own_content():
    # train mode: the BatchNorms normalise with batch statistics, as in training (in eval mode at
    # initialisation they are identities and the un-normalised residual stream saturates the gate)
    torch.manual_seed(0)
    backbone = D2DMFormer("s", drop_path_rate=0.0).train()
    gates = []
    hooks = [
        block.dma.gate.register_forward_hook(lambda m, i, o: gates.append(o))
        for stage in backbone.net.stages
        for block in stage.blocks
    ]
    try:
        with torch.no_grad():
            backbone(torch.randn(2, 3, 64, 96))
    finally:
        for hook in hooks:
            hook.remove()
    assert [g.shape for g in gates] == [
        (2, c) for c, d in zip(CHANNELS, DEPTHS["s"]) for _ in range(d)
    ]
    # each image gets its own gate, which weighs its channels differently (at initialisation the
    # gates sit near 0.5 and differ by 1e-4 to 5e-2)
    assert all((g[0] - g[1]).abs().max() > 1e-5 and (g.std(1) > 1e-5).all() for g in gates)


# --- fused vs separate dilated branches ------------------------------------------------------------


def test_fused_branches_equal_separate_forward_and_backward():
    torch.manual_seed(0)
    separate = DilatedBranches(24, (3, 5, 7), (1, 2, 3), "separate")
    fused = DilatedBranches(24, (3, 5, 7), (1, 2, 3), "fused")
    fused.load_state_dict(separate.state_dict())
    weight, bias = fused.fused_kernel()
    assert weight.shape == (24, 1, 19, 19)  # 2 * 9 + 1: the 7x7 kernel at dilation 3
    assert (weight[0, 0] != 0).sum() == 9 + 25 + 49 - 2  # the three kernels share the centre tap
    torch.testing.assert_close(bias, sum(c.bias for c in separate.branches))
    x = torch.randn(2, 24, 23, 30)
    outputs, grads = [], []
    for module in (separate, fused):
        inp = x.clone().requires_grad_()
        out = module(inp)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outputs.append(out)
        grads.append([inp.grad] + [p.grad for p in module.parameters()])
    assert (outputs[0] - outputs[1]).abs().max() <= 1e-5
    for a, b in zip(*grads):
        assert (a - b).abs().max() <= 1e-5 * max(1.0, a.abs().max().item())


def test_auto_fuses_for_cpu_inference_only():
    x = torch.zeros(1, 3, 8, 8)
    assert uses_fused_branches("fused", x) and not uses_fused_branches("separate", x)
    assert not uses_fused_branches("auto", x)  # autograd on: training takes the separate convs
    with torch.no_grad():
        assert uses_fused_branches("auto", x)
        assert not uses_fused_branches("separate", x)
    branches = D2DMFormer("s").net.stages[0].blocks[0].dma.branches.branches
    assert all(isinstance(conv, DepthwiseConv2d) for conv in branches)


@pytest.mark.parametrize("norm", ["BN", "FrozenBN", "FrozenStatsBN", "BN train"])
def test_fused_branches_fold_a_running_statistics_batchnorm(norm):
    """In fused mode the DMA's BN is folded into the kernel when it uses running statistics;
    a training-mode BN (batch statistics) is applied after the branches."""
    torch.manual_seed(0)
    block = DMFormerBlock(16, 4, True, 0.0, norm.split()[0], ratio=4, kernels=(3, 5, 7),
                          dilations=(1, 2, 3), branches="fused")  # fmt: skip
    randomize_batchnorms(block)
    block.train(norm.endswith("train"))
    dma, x = block.dma, torch.randn(2, 16, 11, 14)
    expected = F.relu(dma.norm(dma.branches(dma.expand(x))))
    with torch.no_grad():
        torch.testing.assert_close(dma.multi_level(x), expected, rtol=1e-5, atol=1e-5)
    assert (inference_affine(dma.norm) is None) == norm.endswith("train")


def test_auto_inference_path_equals_separate_convs():
    """CPU inference ("auto": fused kernels on channels-last maps) vs the three-conv form."""
    torch.manual_seed(0)
    separate = calibrate_batchnorms(D2DMFormer("s", branches="separate", output_norm=False))
    auto = D2DMFormer("s", output_norm=False).eval()
    auto.load_state_dict(separate.state_dict())
    x = torch.randn(1, 3, 97, 64)
    with torch.no_grad():
        expected, got = separate(x), auto(x)
    assert all(got[name].is_contiguous() for name in FEATURES)  # the caller's layout
    for name in FEATURES:  # fp32 rounding of a 12-block network, relative to each map's scale
        scale = expected[name].abs().max()
        torch.testing.assert_close(got[name] / scale, expected[name] / scale, rtol=0, atol=1e-5)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_outputs_come_back_in_the_callers_layout(memory_format):
    """The blocks run on channels-last maps on CPU; the FPN and heads get the caller's layout
    (on channels-last maps a DMFormer-S Mask R-CNN training step took 15% longer)."""
    torch.manual_seed(0)
    network = DMFormer(depths=(1, 1, 1, 1)).train()
    x = torch.randn(2, 3, 64, 96).contiguous(memory_format=memory_format).requires_grad_()
    outputs = network(x)
    sum(out.sum() for out in outputs).backward()
    assert all(out.is_contiguous(memory_format=memory_format) for out in outputs)
    assert x.grad.is_contiguous(memory_format=memory_format)


def _layouts_seen(model: nn.Module, x: torch.Tensor) -> dict:
    """Whether the stem's and the first block's inputs were channels-last in ``model(x)``
    (a DMFormer, or the D2DMFormer around one)."""
    network = model.net if isinstance(model, D2DMFormer) else model
    seen = {}

    def record(name):
        def hook(module, inputs):
            seen[name] = inputs[0].is_contiguous(memory_format=torch.channels_last)

        return hook

    handles = [
        network.stem.conv1.register_forward_pre_hook(record("stem")),
        network.stages[0].blocks[0].register_forward_pre_hook(record("blocks")),
    ]
    model(x)
    for handle in handles:
        handle.remove()
    return seen


def test_the_stem_runs_channels_first_only_when_it_is_trained():
    """oneDNN's backward of the stem's 3x3 conv is 2x slower channels-last, its forward faster
    (docs/dmformer.md, "Layout"): a trained stem runs channels-first; a stem under no_grad or
    frozen runs channels-last; the blocks run channels-last either way."""
    torch.manual_seed(0)
    network = DMFormer(depths=(1, 1, 1, 1)).train()
    x = torch.randn(1, 3, 64, 96)
    assert _layouts_seen(network, x) == {"stem": False, "blocks": True}
    with torch.no_grad():
        assert _layouts_seen(network, x) == {"stem": True, "blocks": True}
    network.stem.requires_grad_(False)
    assert _layouts_seen(network, x) == {"stem": True, "blocks": True}
    assert _layouts_seen(network, x.requires_grad_()) == {"stem": False, "blocks": True}


@pytest.mark.parametrize("freeze_at, stem_channels_last", [(0, False), (1, True)])
def test_the_stem_layout_follows_the_configs_freeze_at(freeze_at, stem_channels_last):
    """Through the config a user writes: the shipped FREEZE_AT 0 trains the stem channels-first;
    FREEZE_AT 1 freezes it, and it runs channels-last."""
    torch.manual_seed(0)
    backbone = build_from_config("MODEL.BACKBONE.FREEZE_AT", freeze_at).train()
    seen = _layouts_seen(backbone, torch.randn(1, 3, 64, 96))
    assert seen == {"stem": stem_channels_last, "blocks": True}


def test_pointwise_conv_on_channels_last_maps():
    torch.manual_seed(0)
    conv = Pointwise(16, 40)
    x = torch.randn(2, 16, 7, 9)
    with torch.no_grad():
        torch.testing.assert_close(
            conv(x.contiguous(memory_format=torch.channels_last)), conv(x), rtol=1e-5, atol=1e-5
        )


# --- parameter and MAC counts ----------------------------------------------------------------------


def test_block_stem_and_downsampler_parameter_counts():
    net = DMFormer(DEPTHS["s"])
    assert [count(stage.blocks[0]) for stage in net.stages] == list(BLOCK_PARAMS)
    assert count(net.stem) == STEM_PARAMS
    assert [count(stage.downsample) for stage in net.stages[:3]] == list(DOWNSAMPLE_PARAMS)
    assert net.stages[3].downsample is None
    literal = DMFormer(DEPTHS["s"], mlp_dwconv=False)
    assert [count(stage.blocks[0]) for stage in literal.stages] == list(BLOCK_PARAMS_NO_MLP_DWCONV)


@pytest.mark.parametrize("variant", ["s", "l"])
def test_variant_parameter_counts(variant):
    backbone = D2DMFormer(variant)
    assert count(backbone.net) == BACKBONE_PARAMS[variant]
    assert count(backbone) == BACKBONE_PARAMS[variant] + OUTPUT_NORM_PARAMS
    classifier = DMFormerClassifier(variant)
    assert count(classifier) - count(backbone.net) == HEAD_PARAMS
    assert count(classifier) == CLASSIFIER_PARAMS[variant]
    assert abs(count(classifier) - PAPER_PARAMS[variant]) <= 0.15e6
    literal = DMFormer(DEPTHS[variant], mlp_dwconv=False)
    assert count(literal) == BACKBONE_PARAMS_NO_MLP_DWCONV[variant]


@pytest.mark.parametrize(
    "depths, options, exact, paper",
    [
        ((2, 2, 12, 2), dict(dma_ratio=1), 26_909_480, 26.9e6),  # "w/o expansion rate r"
        ((2, 2, 6, 2), dict(kernels=(7,), dilations=(3,)), 26_136_872, 26.2e6),  # single 7x7
        ((2, 2, 7, 2), dict(gate=False), 26_121_192, 26.2e6),  # "w/o gating mechanism"
    ],
)
def test_ablation_parameter_counts_match_table_5(depths, options, exact, paper):
    total = count(DMFormer(depths, **options)) + HEAD_PARAMS
    assert total == exact
    assert abs(total - paper) <= 0.15e6


@pytest.mark.parametrize("variant", ["s", "l"])
def test_classifier_macs_at_224(variant):
    torch.manual_seed(0)
    # FLOP counting traces the model: "auto" then runs the three convs the paper counts
    gmacs = conv_linear_gmacs(DMFormerClassifier(variant), 224, 224)
    assert gmacs == pytest.approx(CLASSIFIER_GMACS[variant], rel=0.01)


# --- Detectron2 behaviour --------------------------------------------------------------------------


def test_train_mode_batch_one_with_drop_path_odd_size():
    torch.manual_seed(0)
    backbone = D2DMFormer("s", drop_path_rate=0.3).train()
    outputs = backbone(torch.randn(1, 3, 65, 97))
    sum(o.square().mean() for o in outputs.values()).backward()
    assert [p for p, q in backbone.named_parameters() if q.grad is None] == []
    assert all(torch.isfinite(p.grad).all() for p in backbone.parameters())


def test_drop_path_schedule():
    for variant, rate in (("s", 0.1), ("l", 0.2)):
        backbone = D2DMFormer(variant)
        rates = [
            block.drop_path.drop_prob if isinstance(block.drop_path, DropPath) else 0.0
            for stage in backbone.net.stages
            for block in stage.blocks
        ]
        torch.testing.assert_close(
            torch.tensor(rates), torch.linspace(0, rate, sum(DEPTHS[variant]))
        )
    assert (
        D2DMFormer("s", drop_path_rate=0.0).net.stages[3].blocks[-1].drop_path.__class__
        is nn.Identity
    )


def test_drop_path_is_active_in_training_only():
    torch.manual_seed(0)
    backbone = D2DMFormer("s", drop_path_rate=0.9).train()
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        first, second = backbone(x)["res5"], backbone(x)["res5"]
        assert not torch.allclose(first, second)  # different random depths per call
        backbone.eval()
        torch.testing.assert_close(backbone(x)["res5"], backbone(x)["res5"])


def build_from_config(*opts) -> D2DMFormer:
    cfg = get_cfg()
    add_hybrid_config(cfg)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.FPN.BOTTOM_UP", "build_dmformer_backbone",
                         "MODEL.FPN.IN_FEATURES", list(FEATURES), "MODEL.BACKBONE.FREEZE_AT", 0,
                         *opts])  # fmt: skip
    return build_hybrid_fpn_backbone(cfg, ShapeSpec(channels=3)).bottom_up


def norms_of(backbone):
    return {
        type(m) for m in backbone.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))
    }


def test_default_config_norm_trains_one_image_per_device():
    # SyncBN by default, Detectron2's naiveSyncBN off CUDA (tests/test_multiprocess.py: 2 processes
    # with 1 image each compute the gradients of 1 process with both images)
    torch.manual_seed(0)
    backbone = build_from_config()
    assert norms_of(backbone) == {NaiveSyncBatchNorm}
    assert backbone.net.branches == "auto"
    outputs = backbone.train()(torch.randn(1, 3, 64, 64))
    sum(o.square().mean() for o in outputs.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in backbone.parameters())


@pytest.mark.parametrize(
    "norm, expected", [("BN", nn.BatchNorm2d), ("FrozenBN", FrozenBatchNorm2d)]
)
def test_norm_chosen_by_config(norm, expected):
    backbone = build_from_config("MODEL.DMFORMER.NORM", norm)
    assert {t for t in norms_of(backbone)} == {expected}
    if norm == "FrozenBN":  # statistics and affine are buffers: no BatchNorm parameters left
        assert count(backbone) == BACKBONE_PARAMS["s"] + OUTPUT_NORM_PARAMS - sum(
            m.num_features * 2 for m in backbone.modules() if isinstance(m, FrozenBatchNorm2d)
        )


def test_fpn_built_from_config():
    cfg_opts = ("MODEL.DMFORMER.VARIANT", "l", "MODEL.DMFORMER.DROP_PATH_RATE", 0.05,
                "MODEL.DMFORMER.BRANCHES", "fused", "MODEL.BACKBONE.FREEZE_AT", 1)  # fmt: skip
    bottom_up = build_from_config(*cfg_opts)
    assert isinstance(bottom_up, D2DMFormer) and bottom_up.depths == DEPTHS["l"]
    assert not any(p.requires_grad for p in bottom_up.net.stem.parameters())
    assert bottom_up.net.stages[3].blocks[-1].drop_path.drop_prob == pytest.approx(0.05)
    assert bottom_up.net.stages[0].blocks[0].dma.branches.mode == "fused"
    with pytest.raises(ValueError, match="3 input channels"):
        cfg = get_cfg()
        add_hybrid_config(cfg)
        from hybrid_d2.backbones import build_dmformer_backbone

        build_dmformer_backbone(cfg, ShapeSpec(channels=1))


def test_invalid_arguments_are_named():
    with pytest.raises(ValueError, match=r"'both'.*auto.*separate.*fused"):
        D2DMFormer("s", branches="both")
    with pytest.raises(ValueError, match="kernels .* dilations"):
        DilatedBranches(8, (3, 4), (1, 2), "separate")


@pytest.mark.parametrize("variant", ["s", "l"])
def test_mask_rcnn_parameter_count(variant):
    """The backbone under Detectron2's standard Mask R-CNN FPN heads (80 classes), which add
    19,904,240 + 256 * sum(C) + 1,024 parameters, plus our four output LayerNorms."""
    from detectron2.modeling import build_model

    from conftest import REPO_ROOT, load_config

    model = build_model(load_config(REPO_ROOT / f"configs/dmformer_{variant}_mask_rcnn_1x.yaml"))
    assert count(model) == {"s": 46_269_488, "l": 64_558_448}[variant] + OUTPUT_NORM_PARAMS
