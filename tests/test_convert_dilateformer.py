"""Official DilateFormer ImageNet checkpoints -> Detectron2 checkpoints (design note §7.2, §8
#15), on a synthetic checkpoint in the official key naming and layout."""

import importlib.util
from pathlib import Path

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from torch import nn

from conftest import randomize_batchnorms
from hybrid_d2.backbones import D2DilateFormer, build_hybrid_fpn_backbone
from hybrid_d2.checkpoint import convert_dilateformer, load_checkpoint_file
from hybrid_d2.layers import FAMILIES
from hybrid_d2.config import add_hybrid_config

REPO = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location(
    "convert_pretrained", REPO / "tools" / "convert_pretrained.py"
)
convert_cli = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(convert_cli)

VARIANT = "tiny"
IMAGE = torch.randn(1, 3, 61, 77, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def backbone() -> D2DilateFormer:
    """Random weights and BatchNorm statistics; BN so that every statistic is in the state dict."""
    torch.manual_seed(0)
    backbone = D2DilateFormer(VARIANT, stage3_attention="global", norm="BN", output_norm=False)
    randomize_batchnorms(backbone)
    return backbone.eval()


@pytest.fixture(scope="module")
def expected_outputs(backbone):
    with torch.no_grad():
        return list(backbone(IMAGE).values())


@pytest.fixture(scope="module")
def official(backbone) -> dict:
    """The network's weights as the official model's state dict: same names, MSDA qkv as a
    (3C, C, 1, 1) conv in stages 0-1 and the MHSA qkv as a (3C, C) Linear in stages 2-3, plus the
    classifier (norm, head) that detection does not use."""
    state = {k: v.clone() for k, v in backbone.net.state_dict().items()}
    for i in range(4):
        ndim = state[f"stages.{i}.blocks.0.attn.qkv.weight"].dim()
        assert ndim == (4 if i < 2 else 2)
    state.update(
        {
            "norm.weight": torch.ones(576),
            "norm.bias": torch.zeros(576),
            "head.weight": torch.randn(1000, 576),
            "head.bias": torch.zeros(1000),
        }
    )
    assert len(state) == 212  # references.md §2.1: the official Tiny state dict has 212 keys
    return state


@pytest.fixture(scope="module")
def checkpoint_file(official, tmp_path_factory) -> Path:
    """A DeiT-style training checkpoint: model, model_ema (zeros here), optimizer state, epoch."""
    path = tmp_path_factory.mktemp("dilateformer") / "checkpoint.pth"
    ema = {k: torch.zeros_like(v) for k, v in official.items()}
    torch.save({"model": official, "model_ema": ema, "epoch": 299, "optimizer": {}}, path)
    return path


def load_into_backbone(state_dict: dict, **kwargs) -> D2DilateFormer:
    backbone = D2DilateFormer(VARIANT, norm="BN", output_norm=False, **kwargs).eval()
    prefix = "backbone.bottom_up."
    backbone.load_state_dict({k[len(prefix) :]: v for k, v in state_dict.items()}, strict=True)
    return backbone


def test_round_trip_reproduces_the_network_exactly(checkpoint_file, expected_outputs):
    official = load_checkpoint_file(str(checkpoint_file))
    state_dict, dropped = FAMILIES["dilateformer"].convert_official(official, VARIANT)
    assert sorted(dropped) == ["head.bias", "head.weight", "norm.bias", "norm.weight"]
    assert all(k.startswith("backbone.bottom_up.net.") for k in state_dict)
    with torch.no_grad():
        outputs = list(load_into_backbone(state_dict, stage3_attention="global")(IMAGE).values())
    for ours, expected in zip(outputs, expected_outputs):
        assert torch.equal(ours, expected)
    # the window blocks of the detection setting reuse the same keys
    load_into_backbone(state_dict, stage3_attention="mixed")


def test_ema_weights(checkpoint_file):
    state_dict, _ = convert_dilateformer(
        load_checkpoint_file(str(checkpoint_file), use_ema=True), VARIANT
    )
    assert all(not v.any() for k, v in state_dict.items())


def test_cli_output_loads_into_a_detectron2_fpn_model(checkpoint_file, tmp_path, expected_outputs):
    output = tmp_path / "dilateformer_t.pth"
    assert (
        convert_cli.main(
            ["--family", "dilateformer", "--variant", VARIANT, str(checkpoint_file), str(output)]
        )
        == 0
    )
    cfg = get_cfg()
    add_hybrid_config(cfg)
    cfg.MODEL.DILATEFORMER.VARIANT = VARIANT
    cfg.MODEL.DILATEFORMER.STAGE3_ATTENTION = "global"
    cfg.MODEL.DILATEFORMER.OUTPUT_NORM = False
    cfg.MODEL.DILATEFORMER.NORM = "FrozenBN"  # the detection default: statistics load as buffers
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.FPN.BOTTOM_UP = "build_dilateformer_backbone"
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    model = nn.Module()
    model.backbone = build_hybrid_fpn_backbone(cfg, ShapeSpec(channels=3))
    DetectionCheckpointer(model).load(str(output))
    with torch.no_grad():
        outputs = model.backbone.bottom_up.net.eval()(IMAGE)
    for ours, expected in zip(outputs, expected_outputs):
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_every_problem_is_reported(official):
    broken = dict(official)
    del broken["stages.1.blocks.0.attn.qkv.weight"]
    broken["stages.0.blocks.0.attn.qkv.weight"] = torch.zeros(216, 72)  # Linear instead of conv
    broken["aux_head.weight"] = torch.zeros(1000, 576)  # token labeling: dropped, not an error
    broken["dist_token"] = torch.zeros(1, 1, 576)
    with pytest.raises(ValueError) as error:
        convert_dilateformer(broken, VARIANT)
    message = str(error.value)
    assert "DilateFormer-tiny (1 missing keys, 1 unexpected keys, 1 shape mismatches)" in message
    assert "missing keys (1):\n  stages.1.blocks.0.attn.qkv.weight" in message
    assert "unexpected keys (1):\n  dist_token" in message
    assert "stages.0.blocks.0.attn.qkv.weight: expected [216, 72, 1, 1], got [216, 72]" in message

    with pytest.raises(ValueError, match="does the checkpoint match variant 'small'?"):
        convert_dilateformer(official, "small")  # deeper stages: missing blocks
    with pytest.raises(ValueError, match="'huge'"):
        convert_dilateformer(official, "huge")
