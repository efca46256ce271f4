"""The backbone contract, for every registered family: built from a config that names only the
builder and the variant (the smallest), it freezes what ``MODEL.BACKBONE.FREEZE_AT`` says and
keeps it in eval mode after ``train()``, gives the ``OUT_FEATURES`` asked for, refuses unknown
settings, trains, and computes the same with activation checkpointing.

``tests/test_backbone_family.py`` runs this file again in a process of its own for the toy
family of docs/adding_a_family.md (``HYBRID_D2_TOY_FAMILY``: the folder of its module), so that the
toy's registration does not reach the other tests."""

import math
import os
import sys
from pathlib import Path
from typing import Sequence

import pytest
import torch
from detectron2.modeling import build_backbone
from torch import nn

from conftest import load_config, randomize_batchnorms, smallest_variant
from hybrid_d2.config import ConfigError
from hybrid_d2.layers import FAMILIES, FEATURE_NAMES

TOY_FAMILY_DIR = os.environ.get("HYBRID_D2_TOY_FAMILY")
if TOY_FAMILY_DIR:
    sys.path.insert(0, TOY_FAMILY_DIR)
    import toy_family  # noqa: F401  (registers the family "toy")

NAMES = ["toy"] if TOY_FAMILY_DIR else sorted(set(FAMILIES) - {"toy"})


def build(tmp_path: Path, name: str, opts: Sequence = ()) -> nn.Module:
    """The family's backbone from a user's yaml naming the builder and the smallest variant."""
    family = FAMILIES[name]
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"MODEL:\n  BACKBONE:\n    NAME: {family.builder_name}\n  {family.config_key}:\n"
        f"    VARIANT: {smallest_variant(name)}\n"
    )
    torch.manual_seed(0)
    return build_backbone(load_config(path, opts))


def image(batch: int = 2, height: int = 64, width: int = 64) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", NAMES)
def test_a_config_builds_the_familys_backbone_with_its_settings(name, tmp_path):
    family = FAMILIES[name]
    backbone = build(tmp_path, name)
    assert type(backbone).__name__ == family.backbone_name and backbone.family is family
    shapes = backbone.output_shape()
    assert list(shapes) == list(FEATURE_NAMES)
    assert [shapes[f].stride for f in FEATURE_NAMES] == [4, 8, 16, 32]
    assert [shapes[f].channels for f in FEATURE_NAMES] == list(backbone.net.channels)
    assert backbone.size_divisibility == 32
    plain = {o.name for o in family.options if not o.norm}
    assert {k: backbone.options[k] for k in plain} == {k: family.config_defaults[k] for k in plain}


@pytest.mark.parametrize("name", NAMES)
def test_unknown_settings_are_refused_by_name(name, tmp_path):
    family = FAMILIES[name]
    backbone_class = type(build(tmp_path, name))
    variant = smallest_variant(name)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['not_an_option'\]"):
        backbone_class(variant, not_an_option=1)
    with pytest.raises(ValueError, match=rf"'not_a_variant'.*{sorted(family.variants)}"):
        backbone_class("not_a_variant")
    with pytest.raises(ValueError, match="res6"):
        backbone_class(variant, out_features=("res2", "res6"))
    with pytest.raises(ValueError, match="freeze_at=6"):
        backbone_class(variant, freeze_at=6)
    with pytest.raises(ConfigError, match=f"MODEL.{family.config_key}.NOT_A_KEY"):
        build(tmp_path, name, [f"MODEL.{family.config_key}.NOT_A_KEY", 1])


@pytest.mark.parametrize("freeze_at", range(6))
@pytest.mark.parametrize("name", NAMES)
def test_freeze_at_freezes_the_stem_and_stages_and_keeps_them_in_eval_mode(
    name, freeze_at, tmp_path
):
    backbone = build(tmp_path, name, ["MODEL.BACKBONE.FREEZE_AT", freeze_at]).eval().train()
    outputs = backbone.net(image())
    # res_k (k = 2 ... 5) is computed by frozen modules only when FREEZE_AT >= k
    assert [o.requires_grad for o in outputs] == [freeze_at < k for k in range(2, 6)]
    for module_name, module in backbone.net.named_modules():
        params = list(module.parameters())
        # frozen parts stay in eval mode, whole stages too (a ModuleList has no forward)
        if params and module is not backbone.net and not isinstance(module, nn.ModuleList):
            assert module.training == any(p.requires_grad for p in params), module_name
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            assert module.weight.requires_grad, f"{module_name}: frozen BatchNorm not converted"
    frozen = sum(p.numel() for p in backbone.parameters() if not p.requires_grad)
    assert (frozen > 0) == (freeze_at > 0)


@pytest.mark.parametrize("out_features", [("res2",), ("res3", "res5"), FEATURE_NAMES])
@pytest.mark.parametrize("name", NAMES)
def test_out_features_are_the_requested_maps(name, out_features, tmp_path):
    key = f"MODEL.{FAMILIES[name].config_key}.OUT_FEATURES"
    backbone = build(tmp_path, name, [key, list(out_features)]).eval()
    x = image(1, 64, 96)
    with torch.no_grad():
        outputs = backbone(x)
    assert list(outputs) == list(out_features) == list(backbone.output_shape())
    for feature, output in outputs.items():
        shape = backbone.output_shape()[feature]
        size = [math.ceil(side / shape.stride) for side in x.shape[-2:]]
        assert list(output.shape) == [1, shape.channels, *size], feature


@pytest.mark.parametrize("name", NAMES)
def test_a_training_step_reaches_every_trainable_parameter(name, tmp_path):
    backbone = build(tmp_path, name).train()
    x = image()
    loss = sum(o.square().mean() for o in backbone(x).values())
    loss.backward()
    missing = [n for n, p in backbone.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in backbone.parameters() if p.grad is not None)
    with torch.no_grad():
        for p in backbone.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
        assert sum(o.square().mean() for o in backbone(x).values()) != loss


@pytest.mark.parametrize("name", NAMES)
def test_activation_checkpointing_computes_the_same(name, tmp_path):
    """Same outputs, gradients and BatchNorm statistics (the recomputation does not update them a
    second time), drop path included."""
    key = f"MODEL.{FAMILIES[name].config_key}"
    opts = [f"{key}.DROP_PATH_RATE", 0.2]
    plain = build(tmp_path, name, opts).train()
    randomize_batchnorms(plain)
    checkpointed = build(tmp_path, name, [*opts, f"{key}.USE_CHECKPOINT", True]).train()
    checkpointed.load_state_dict(plain.state_dict())
    outputs = []
    for model in (plain, checkpointed):
        torch.manual_seed(1)  # the same drop-path masks
        out = model(image())
        sum((o * o.flip(-1)).mean() for o in out.values()).backward()
        outputs.append(out)
    for feature in FEATURE_NAMES:
        torch.testing.assert_close(outputs[1][feature], outputs[0][feature])
    for (param_name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=param_name)
    for (buffer_name, b), c in zip(plain.named_buffers(), checkpointed.buffers()):
        torch.testing.assert_close(c, b, msg=buffer_name)
