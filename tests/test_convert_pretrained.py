"""Official PaddleClas MixFormer checkpoints -> Detectron2 checkpoints: loading, conversion, CLI."""

import importlib.util
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from torch import nn

from conftest import randomize_batchnorms
from official_formats import mixformer_paddle_state
from hybrid_d2.backbones import D2MixFormer, MixFormer, build_hybrid_fpn_backbone
from hybrid_d2.backbones.mixformer import VARIANTS
from hybrid_d2.checkpoint import convert_mixformer, load_checkpoint_file
from hybrid_d2.layers import FAMILIES
from hybrid_d2.config import add_hybrid_config

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / "tools" / "convert_pretrained.py"
SPEC = importlib.util.spec_from_file_location("convert_pretrained", CLI)
convert_cli = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(convert_cli)

VARIANT = "b0"
IMAGE = torch.randn(1, 3, 45, 61, generator=torch.Generator().manual_seed(0))


def make_network() -> MixFormer:
    """A b0 network with random weights and BatchNorm statistics."""
    torch.manual_seed(0)
    config = dict(VARIANTS[VARIANT])
    config.pop("drop_path_rate")
    network = MixFormer(**config).eval()
    randomize_batchnorms(network)
    return network


def to_paddle(network: MixFormer) -> dict:
    """The network's weights under the official Paddle names and layouts."""
    return mixformer_paddle_state(network, VARIANT)


@pytest.fixture(scope="module")
def network():
    return make_network()


@pytest.fixture(scope="module")
def official(network):
    return to_paddle(network)


@pytest.fixture(scope="module")
def expected_outputs(network):
    with torch.no_grad():
        return network(IMAGE)


@pytest.fixture(scope="module")
def pdparams(official, tmp_path_factory):
    """What paddle.save writes: a pickle of numpy arrays plus Paddle's name table."""
    path = tmp_path_factory.mktemp("paddle") / "MixFormer_B0.pdparams"
    table = {name: f"param_{i}" for i, name in enumerate(official)}
    with open(path, "wb") as f:
        pickle.dump({**official, "StructuredToParameterName@@": table}, f, protocol=4)
    return path


@pytest.fixture(scope="module")
def torch_file(official, tmp_path_factory):
    path = tmp_path_factory.mktemp("torch") / "mixformer_b0.pth"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in official.items()}, "epoch": 3}, path)
    return path


def backbone_outputs(state_dict: dict):
    """Load a converted state dict into D2MixFormer (strictly) and run it on IMAGE."""
    backbone = D2MixFormer(VARIANT, output_norm=False).eval()
    prefix = "backbone.bottom_up."
    backbone.load_state_dict({k[len(prefix) :]: v for k, v in state_dict.items()}, strict=True)
    with torch.no_grad():
        return list(backbone(IMAGE).values())


def assert_equal_outputs(outputs, expected):
    assert len(outputs) == len(expected) == 4
    for ours, theirs in zip(outputs, expected):
        assert torch.equal(ours, theirs)


def run_cli(*args):
    return subprocess.run(
        [sys.executable, str(CLI), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def test_cli_converts_pdparams_for_a_detectron2_fpn_model(pdparams, tmp_path, expected_outputs):
    output = tmp_path / "b0.pth"
    result = run_cli("--family", "mixformer", "--variant", VARIANT, pdparams, output)
    assert result.returncode == 0, result.stderr
    assert "dropped" in result.stdout and str(output) in result.stdout

    checkpoint = torch.load(output, weights_only=True)
    assert checkpoint["__author__"] == "hybrid_d2" and checkpoint["matching_heuristics"] is False
    assert all(k.startswith("backbone.bottom_up.net.") for k in checkpoint["model"])

    # what MODEL.WEIGHTS does: DetectionCheckpointer into a model with the FPN backbone
    cfg = get_cfg()
    add_hybrid_config(cfg)
    cfg.MODEL.MIXFORMER.VARIANT = VARIANT
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    model = nn.Module()
    model.backbone = build_hybrid_fpn_backbone(cfg, ShapeSpec(channels=3))
    DetectionCheckpointer(model).load(str(output))
    net = model.backbone.bottom_up.net.eval()
    with torch.no_grad():
        assert_equal_outputs(net(IMAGE), expected_outputs)


@pytest.mark.parametrize("protocol", [2, 4])
def test_pdparams_loader_reads_numpy_pickles(official, tmp_path, protocol):
    path = tmp_path / "weights.pdparams"
    with open(path, "wb") as f:
        pickle.dump(official, f, protocol=protocol)
    loaded = load_checkpoint_file(str(path))
    assert sorted(loaded) == sorted(official)
    for name, array in official.items():
        assert torch.equal(loaded[name], torch.from_numpy(array))


def test_convert_torch_file_reproduces_the_network(torch_file, official, expected_outputs):
    state_dict, dropped = FAMILIES["mixformer"].convert_official(
        load_checkpoint_file(str(torch_file)), VARIANT
    )
    assert_equal_outputs(backbone_outputs(state_dict), expected_outputs)
    tail = {
        "norm.weight",
        "norm.bias",
        "last_proj.weight",
        "last_proj.bias",
        "head.weight",
        "head.bias",
    }
    index_keys = {k for k in official if k.endswith("relative_position_index")}
    assert set(dropped) == tail | index_keys
    nbt = [k for k in state_dict if k.endswith("num_batches_tracked")]
    assert nbt and all(state_dict[k].item() == 0 for k in nbt)


def test_model_ema_is_used_when_asked(official, tmp_path, expected_outputs):
    weights = {k: torch.from_numpy(v) for k, v in official.items()}
    zeros = {k: torch.zeros_like(v) for k, v in weights.items()}
    path, plain = tmp_path / "ema.pth", tmp_path / "plain.pth"
    torch.save({"model": zeros, "model_ema": weights}, path)
    torch.save(weights, plain)
    state_dict, _ = convert_mixformer(load_checkpoint_file(str(path), use_ema=True), VARIANT)
    assert_equal_outputs(backbone_outputs(state_dict), expected_outputs)
    with pytest.raises(KeyError, match="no 'model_ema' entry"):
        load_checkpoint_file(str(plain), use_ema=True)


def test_wrong_variant_reports_every_mismatch(official):
    state = {k: torch.from_numpy(v) for k, v in official.items()}
    with pytest.raises(ValueError) as shapes:
        convert_mixformer(state, "b1")  # same depths, wider channels
    message = str(shapes.value)
    assert "shape mismatches" in message
    assert "patch_embed.proj.weight: expected [32, 16, 2, 2], got [24, 12, 2, 2]" in message
    assert "does the checkpoint match variant 'b1'?" in message

    with pytest.raises(ValueError) as keys:
        convert_mixformer({**state, "extra.weight": torch.zeros(1)}, "b2")  # deeper stages
    message = str(keys.value)
    assert "missing keys" in message and "layers.0.blocks.1.attn.qkv.weight" in message
    assert "unexpected keys (1):\n  extra.weight" in message


def test_unknown_variant():
    with pytest.raises(ValueError, match="'b7'"):
        convert_mixformer({}, "b7")


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("suffix", [".pdparams", ".pth"])
def test_pickles_that_run_code_are_refused(tmp_path, suffix):
    path = tmp_path / f"evil{suffix}"
    if suffix == ".pdparams":
        with open(path, "wb") as f:
            pickle.dump({"layers.0.weight": RunsCode()}, f)
    else:
        torch.save({"model": {"w": torch.zeros(1)}, "hook": RunsCode()}, path)
    with pytest.raises(pickle.UnpicklingError, match=f"{path}: refusing to") as error:
        load_checkpoint_file(str(path))
    assert "system" in str(error.value)


def test_missing_input_is_an_error_and_writes_nothing(tmp_path, capsys):
    output = tmp_path / "out.pth"
    missing = tmp_path / "nope.pdparams"
    with pytest.raises(FileNotFoundError, match="nope.pdparams"):
        load_checkpoint_file(str(missing))
    assert (
        convert_cli.main(["--family", "mixformer", "--variant", VARIANT, str(missing), str(output)])
        == 1
    )
    assert "nope.pdparams" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cli_failures_leave_no_output(pdparams, tmp_path, monkeypatch, capsys):
    output = tmp_path / "out.pth"
    args = ["--family", "mixformer", "--variant", "b3", str(pdparams), str(output)]
    assert convert_cli.main(args) == 1  # wrong variant
    assert "does the checkpoint match variant 'b3'?" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []

    def fail_mid_write(obj, path):
        with open(path, "wb") as f:
            f.write(b"half a checkpoint")
        raise OSError("disk full")

    output.write_bytes(b"previous")
    monkeypatch.setattr(convert_cli.torch, "save", fail_mid_write)
    args[3] = VARIANT
    assert convert_cli.main(args) == 1
    assert "disk full" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [output] and output.read_bytes() == b"previous"


def test_cli_subprocess_reports_errors(tmp_path):
    output = tmp_path / "out.pth"
    result = run_cli("--family", "mixformer", "--variant", VARIANT, tmp_path / "none.pth", output)
    assert result.returncode != 0
    assert "checkpoint file not found" in result.stderr and "none.pth" in result.stderr
    assert not output.exists()
