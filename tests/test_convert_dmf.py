"""Official Dynamic Mobile-Former ImageNet checkpoints -> Detectron2 checkpoints, on a synthetic
checkpoint in the official key naming and layout, loaded into detectors built from the shipped
configs with their default norms."""

import argparse
import importlib.util
from pathlib import Path

import pytest
import torch
from detectron2.modeling import build_model

from conftest import load_config, randomize_batchnorms
from official_formats import dmf_classifier_tail as classifier_tail
from hybrid_d2.backbones import DynamicMobileFormer
from hybrid_d2.backbones.dmf import DynamicResidualConv2d, variant_config
from hybrid_d2.checkpoint import SafeCheckpointer, convert_dmf, load_checkpoint_file
from hybrid_d2.layers import FAMILIES

REPO = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location(
    "convert_pretrained", REPO / "tools" / "convert_pretrained.py"
)
convert_cli = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(convert_cli)

VARIANT = "xxs"
CONFIG = REPO / "configs" / "dmf_xxs_retinanet_1x.yaml"  # SyncBN, blocks 0-3 frozen (FrozenBN)
IMAGE = torch.randn(1, 3, 61, 77, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def network() -> DynamicMobileFormer:
    """Random weights, BatchNorm statistics and dynamic kernels (zero at init: they would test
    nothing)."""
    torch.manual_seed(0)
    network = DynamicMobileFormer(**variant_config(VARIANT), norm="BN", pooled_norm="BN")
    randomize_batchnorms(network)
    for conv in network.modules():
        if isinstance(conv, DynamicResidualConv2d):
            conv.weight.data.normal_(0, 0.05)
    return network.eval()


@pytest.fixture(scope="module")
def expected_outputs(network):
    with torch.no_grad():
        return network(IMAGE)


@pytest.fixture(scope="module")
def official(network) -> dict:
    """The network's weights as the official classification model's state dict."""
    state = {k: v.clone() for k, v in network.state_dict().items()}
    state.update(classifier_tail())
    return state


def official_container(official: dict) -> dict:
    """What the official ``utils.save_model`` writes (``args`` is the argparse.Namespace)."""
    container = {
        "model": official,
        "model_ema": {k: torch.zeros_like(v) for k, v in official.items()},
        "optimizer": {"state": {}, "param_groups": [{"lr": 6e-3, "params": [0, 1]}]},
        "epoch": 466,
        "scaler": {"scale": 65536.0, "growth_factor": 2.0},
        "args": argparse.Namespace(model="dmf_198", input_size=224, temp_init=30.0),
    }
    return container


class RecordingCheckpointer(SafeCheckpointer):
    """train_net.py's checkpointer, keeping the keys it reports missing or unexpected."""

    def _load_model(self, checkpoint):
        self.incompatible = super()._load_model(checkpoint)
        return self.incompatible


def load_into_shipped_detector(path: Path):
    """Build the shipped config's detector (its default norms) and load ``path`` as train_net.py
    loads MODEL.WEIGHTS; returns the model and the backbone keys reported missing or unexpected."""
    model = build_model(load_config(CONFIG))
    checkpointer = RecordingCheckpointer(model)
    checkpointer.resume_or_load(str(path), resume=False)
    incompatible = checkpointer.incompatible
    prefix = "backbone.bottom_up."
    missing = [k for k in incompatible.missing_keys if k.startswith(prefix)]
    return model.eval(), missing + list(incompatible.unexpected_keys)


def test_converter_drops_the_classifier_and_reproduces_the_network(
    network, official, expected_outputs, tmp_path
):
    container = official_container(official)
    state_dict, dropped = FAMILIES["dmf"].convert_official(container["model"], VARIANT)
    assert sorted(dropped) == sorted(classifier_tail())
    assert all(k.startswith("backbone.bottom_up.net.") for k in state_dict)
    assert sorted(state_dict) == sorted("backbone.bottom_up.net." + k for k in network.state_dict())

    path = tmp_path / "dmf_xxs.pth"
    torch.save({"model": state_dict, "matching_heuristics": False}, path)
    model, problems = load_into_shipped_detector(path)
    assert problems == []
    with torch.no_grad():
        outputs = model.backbone.bottom_up.net(IMAGE)
    for ours, expected in zip(outputs, expected_outputs):
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ema", [False, True])
def test_cli_converts_a_training_checkpoint(official, expected_outputs, tmp_path, ema, capsys):
    """The CLI on the official container, ``args`` namespace included."""
    source = tmp_path / "checkpoint-467.pth"
    torch.save(official_container(official), source)
    output = tmp_path / "dmf_xxs.pth"
    argv = ["--family", "dmf", "--variant", VARIANT, str(source), str(output)]
    assert convert_cli.main(argv + (["--ema"] if ema else [])) == 0
    tail = len(classifier_tail())
    out = capsys.readouterr().out
    assert f"wrote {len(official) - tail} tensors" in out
    assert f"({len(official)} read, {tail} dropped" in out
    model, problems = load_into_shipped_detector(output)
    assert problems == []
    weights = load_checkpoint_file(str(output))
    if ema:
        assert not any(t.any() for t in weights.values())
    else:
        with torch.no_grad():
            outputs = model.backbone.bottom_up.net(IMAGE)
        for ours, expected in zip(outputs, expected_outputs):
            torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_every_problem_is_reported(official):
    broken = dict(official)
    del broken["blocks.3.dynamic_mobile.dw_conv.weight"]
    broken["blocks.0.dynamic_mobile.pw_conv1.weight"] = torch.zeros(72, 6, 1, 1)  # K = 1
    broken["blocks.11.norm.weight"] = torch.zeros(120)
    with pytest.raises(ValueError) as error:
        convert_dmf(broken, VARIANT)
    message = str(error.value)
    assert "DMF-XXS (1 missing keys, 1 unexpected keys, 1 shape mismatches)" in message
    assert "missing keys (1):\n  blocks.3.dynamic_mobile.dw_conv.weight" in message
    assert "unexpected keys (1):\n  blocks.11.norm.weight" in message
    assert (
        "blocks.0.dynamic_mobile.pw_conv1.weight: expected [8, 72, 6, 1, 1], got [72, 6, 1, 1]"
        in message
    )
    # the official mmdet backbone builds XS for every name: a wrong variant is named
    with pytest.raises(ValueError, match="does the checkpoint match variant 'xs'?"):
        convert_dmf(official, "xs")
    with pytest.raises(ValueError, match="unknown DMF variant 'm'"):
        convert_dmf(official, "m")
