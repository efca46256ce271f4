"""Input sizes: every height/width from 32 up gives res2 ... res5 of size ceil(side / stride),
finite, in fp32 and under CPU bf16 autocast, in eval and train mode; smaller or malformed inputs
are refused by name (PyramidBackbone.forward). Hypothesis draws the same examples on every run
(the "deterministic" profile of tests/conftest.py)."""

import functools
import math

import pytest
import torch
from detectron2.layers import FrozenBatchNorm2d
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import CPU_MAY_USE_AMX_BF16, randomize_batchnorms
from hybrid_d2.backbones import (
    D2DilateFormer,
    D2DMFormer,
    D2DualFormer,
    D2DynamicMobileFormer,
    D2MixFormer,
)
from hybrid_d2.layers.backbone import MIN_INPUT_SIZE

STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
SIDES = st.integers(MIN_INPUT_SIZE, 100)
# window 7 covers the whole stage-3 map (at most 7x7 at 100 px); window 3 makes the window and
# shifted-window blocks pad, roll and mask
DILATE_CONFIGS = [("global", 7), ("window", 7), ("mixed", 7), ("window", 3), ("mixed", 3)]


def randomize_frozen_batchnorms(model: torch.nn.Module) -> None:
    """Move every FrozenBatchNorm2d's statistics and affine off their init."""
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.normal_(1, 0.2)
            m.bias.normal_(0, 0.2)


@functools.lru_cache(maxsize=None)
def backbone(family: str, mode: str = "", window_size: int = 7):
    """One shared instance per configuration with its default norms (MixFormer BN, DilateFormer
    FrozenBN, as in the configs), moved off their init; callers set train/eval mode.

    (DilateFormer and DMF with norm="BN" cannot train on one image of at most 32x32: the
    BatchNorm after the res5 downsampler then sees one value per channel, which PyTorch refuses;
    DMF runs with FrozenBN here and its default pooled norm, FrozenStatsBN.)
    """
    torch.manual_seed(0)
    if family == "mixformer":
        model = D2MixFormer("b0", drop_path_rate=0.0)
    elif family == "dualformer":  # FrozenBN for the same reason as DilateFormer's BN note above
        model = D2DualFormer("tiny", norm="FrozenBN", intra_mode=mode, drop_path_rate=0.0)
    elif family == "dmf":
        model = D2DynamicMobileFormer("xxs", drop_path_rate=0.0, norm="FrozenBN")
    elif family == "dmformer":  # SyncBN in the configs: naiveSyncBN on CPU, BN in one process
        model = D2DMFormer("s", drop_path_rate=0.0, norm="naiveSyncBN")
    else:
        model = D2DilateFormer(
            "tiny", stage3_attention=mode, window_size=window_size, drop_path_rate=0.0
        )
    randomize_batchnorms(model)
    randomize_frozen_batchnorms(model)
    return model


def check_outputs(model, batch: int, height: int, width: int, train: bool, seed: int) -> None:
    """Run fp32 and bf16-autocast forwards and check every output's shape and finiteness."""
    model.train(train)
    x = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))
    buffers = [b.clone() for b in model.buffers()]  # train mode updates BatchNorm statistics
    for bf16 in (False, True):
        # train mode keeps autograd on (the training path), eval mode runs under no_grad
        with torch.set_grad_enabled(train), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            outputs = model(x)
        with torch.no_grad():
            for buffer, saved in zip(model.buffers(), buffers):
                buffer.copy_(saved)
        assert list(outputs) == list(STRIDES)
        for name, out in outputs.items():
            stride = STRIDES[name]
            expected = (
                batch,
                model.output_shape()[name].channels,
                math.ceil(height / stride),
                math.ceil(width / stride),
            )
            context = f"{name} at {height}x{width}, batch {batch}, train={train}, bf16={bf16}"
            assert tuple(out.shape) == expected, context
            if not (bf16 and upstream_bf16_bug_may_hit(outputs["res5"])):
                assert torch.isfinite(out).all(), f"non-finite values in {context}"


def upstream_bf16_bug_may_hit(res5: torch.Tensor) -> bool:
    """CPU bfloat16 on AMX may give NaN where res5 has a side of 1 (PyTorch's bug, reproduced in
    tests/test_upstream_bf16.py; docs/known_issues.md). Finiteness is checked everywhere else,
    and everywhere on CPUs without AMX-BF16 in use."""
    return CPU_MAY_USE_AMX_BF16 and min(res5.shape[-2:]) == 1


@settings(max_examples=30, deadline=None)
@given(
    height=SIDES,
    width=SIDES,
    batch=st.integers(1, 2),
    train=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_mixformer_output_sizes(height, width, batch, train, seed):
    check_outputs(backbone("mixformer"), batch, height, width, train, seed)


@settings(max_examples=25, deadline=None)  # five configurations
@given(
    config=st.sampled_from(DILATE_CONFIGS),
    height=SIDES,
    width=SIDES,
    batch=st.integers(1, 2),
    train=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_dilateformer_output_sizes(config, height, width, batch, train, seed):
    mode, window_size = config
    check_outputs(backbone("dilateformer", mode, window_size), batch, height, width, train, seed)


@settings(max_examples=30, deadline=None)
@given(
    intra_mode=st.sampled_from(["pool", "token"]),
    height=SIDES,
    width=SIDES,
    batch=st.integers(1, 2),
    train=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_dualformer_output_sizes(intra_mode, height, width, batch, train, seed):
    check_outputs(backbone("dualformer", intra_mode), batch, height, width, train, seed)


@settings(max_examples=30, deadline=None)
@given(
    height=SIDES,
    width=SIDES,
    batch=st.integers(1, 2),
    train=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_dmf_output_sizes(height, width, batch, train, seed):
    check_outputs(backbone("dmf"), batch, height, width, train, seed)


@settings(max_examples=15, deadline=None)  # the slowest family at these sizes
@given(
    height=SIDES,
    width=SIDES,
    batch=st.integers(1, 2),
    train=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_dmformer_output_sizes(height, width, batch, train, seed):
    model = backbone("dmformer")
    if train and batch == 1 and height <= 32 and width <= 32:
        # a 1x1 res5 map of one image has no batch statistics (SyncBN pools them over devices)
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            check_outputs(model, batch, height, width, train, seed)
    else:
        check_outputs(model, batch, height, width, train, seed)


@pytest.mark.parametrize(
    "family, mode",
    [
        ("mixformer", ""),
        ("dilateformer", "mixed"),
        ("dualformer", "pool"),
        ("dmf", ""),
        ("dmformer", ""),
    ],
)
@pytest.mark.parametrize("height, width", [(31, 64), (64, 31), (31, 31), (0, 64), (64, 0)])
def test_too_small_inputs_are_refused(family, mode, height, width):
    model = backbone(family, mode).eval()
    message = rf"size {height}x{width} \(HxW\).*at least {MIN_INPUT_SIZE}"
    with pytest.raises(ValueError, match=message), torch.no_grad():
        model(torch.zeros(1, 3, height, width))


@pytest.mark.parametrize(
    "shape, message",
    [
        ((3, 64, 64), r"\(N, 3, H, W\) batch, got a 3-D tensor of shape \(3, 64, 64\)"),
        ((1, 1, 3, 64, 64), "got a 5-D tensor"),
        ((1, 1, 64, 64), r"3 channels.*\(1, 1, 64, 64\)"),
    ],
)
def test_malformed_inputs_are_refused(shape, message):
    with pytest.raises(ValueError, match=message), torch.no_grad():
        backbone("mixformer").eval()(torch.zeros(shape))
