"""Converted ImageNet weights in the shipped ADE20K configs, loaded as train_net.py loads
``MODEL.WEIGHTS``: MixFormer and DilateFormer from synthetic official files (written as the
official code writes them, converted by tools/convert_pretrained.py), DMFormer from a timm
train.py checkpoint. The backbone network holds exactly the file's tensors, none of its keys is
missing, and it computes what the source network computes."""

import pytest
import torch

from conftest import REPO_ROOT, load_as_train_net_does
from hybrid_d2.layers import ClassifierMixin
from test_official_checkpoints import IMAGE, NET_PREFIX, converted
from test_timm_models import _train_with_timm, convert_cli

ADE20K = REPO_ROOT / "configs" / "ade20k"


def _assert_backbone_is_the_file(config: str, weights, expected_outputs, monkeypatch) -> None:
    """Load ``weights`` into ``config``'s segmentor through train_net.py's steps and compare the
    backbone's tensors with the file's, bit for bit, and its outputs with the source network's."""
    model, incompatible = load_as_train_net_does(ADE20K / config, weights, monkeypatch)
    assert incompatible.unexpected_keys == [] and incompatible.incorrect_shapes == []
    # Missing: the heads, Semantic FPN's neck and the wrapper's output LayerNorms (new layers,
    # not in an ImageNet network, as for the detectors); nothing of the network itself.
    missing = [k for k in incompatible.missing_keys if k.startswith("backbone.bottom_up.")]
    output_norms = "backbone.bottom_up.output_norms."
    assert missing and all(k.startswith(output_norms) for k in missing), missing

    written = torch.load(weights, weights_only=True)["model"]
    state = model.state_dict()
    backbone_keys = {k for k in state if k.startswith(NET_PREFIX)}
    assert backbone_keys and backbone_keys <= set(written), sorted(backbone_keys - set(written))[:5]
    for key in sorted(backbone_keys):
        assert torch.equal(state[key], written[key].to(state[key].dtype)), key
    with torch.no_grad():
        outputs = model.backbone.bottom_up.net.eval()(IMAGE)
    for ours, theirs in zip(outputs, expected_outputs, strict=True):
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "config, family, variant",
    [
        ("mixformer_b1_upernet_160k.yaml", "mixformer", "b1"),  # Paddle .pdparams (numpy 2)
        ("dilateformer_s_semfpn_80k.yaml", "dilateformer", "small"),  # DeiT checkpoint, --ema
    ],
)
def test_official_weights_load_into_the_ade20k_config(
    config, family, variant, tmp_path_factory, monkeypatch
):
    folder = tmp_path_factory.getbasetemp() / f"official_{family}_{variant}"
    folder.mkdir(exist_ok=True)
    _, weights, expected = converted(family, variant, folder)
    _assert_backbone_is_the_file(config, weights, expected, monkeypatch)


def test_timm_checkpoint_loads_into_the_ade20k_config(tmp_path, monkeypatch, capsys):
    """DMFormer-S (no official weights): two steps of timm's train.py pieces, the EMA weights."""
    trained = _train_with_timm("hybrid_dmformer_s", tmp_path)
    weights = tmp_path / "dmformer_s_d2.pth"
    argv = ["--family", "dmformer", "--from", "timm", "--ema", str(tmp_path / "last.pth.tar"),
            str(weights)]  # fmt: skip
    assert convert_cli.main(argv) == 0, capsys.readouterr().err
    with torch.no_grad():
        expected = super(ClassifierMixin, trained).forward(IMAGE)  # the trunk's four maps
    _assert_backbone_is_the_file("dmformer_s_upernet_160k.yaml", weights, expected, monkeypatch)
