"""The recipe of docs/adding_a_family.md: one module declares a family and every piece of the
library serves it (builder, config keys, FPN, Mask R-CNN, RetinaNet, timm, and the backbone
contract of tests/backbones/test_contract.py), with no other file touched; the five shipped families are exactly the registered ones; and the shipped
configs and timm models build what they built before the families shared one wrapper."""

import hashlib
import json
import os
import re
import subprocess
import sys

import pytest
import timm
import torch
from detectron2.modeling import build_backbone
from timm.layers import DropPath
from torch import nn

from conftest import REPO_ROOT, load_config
from hybrid_d2.backbones import D2MixFormer
from hybrid_d2.layers import FAMILIES, PyramidBackbone

# The toy family is the code of docs/adding_a_family.md, its python blocks in order.
RECIPE = (REPO_ROOT / "docs/adding_a_family.md").read_text()
TOY_MODULE = "\n".join(re.findall(r"```python\n(.*?)```", RECIPE, flags=re.DOTALL))

MASK_RCNN_YAML = f"""
_BASE_: "{REPO_ROOT}/configs/shapes/Base-Shapes-RCNN.yaml"
MODEL:
  MASK_ON: True
  FPN:
    BOTTOM_UP: "build_toy_backbone"
  TOY:
    VARIANT: "small"
    ACTIVATION: "gelu"
  BACKBONE:
    FREEZE_AT: 2
"""

RETINANET_YAML = f"""
_BASE_: "{REPO_ROOT}/configs/shapes/Base-Shapes-RetinaNet.yaml"
MODEL:
  FPN:
    BOTTOM_UP: "build_toy_backbone"
  TOY:
    OUT_FEATURES: ["res3", "res4", "res5"]
"""

CHECKS = """
import sys
import timm
import torch
from detectron2.modeling import BACKBONE_REGISTRY, build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

import toy_family
from hybrid_d2.config import get_config

assert "build_toy_backbone" in BACKBONE_REGISTRY
mask_rcnn_yaml, retinanet_yaml = sys.argv[1:3]

cfg = get_config(mask_rcnn_yaml)
assert cfg.MODEL.TOY.ACTIVATION == "gelu" and cfg.MODEL.TOY.DROP_PATH_RATE is None
torch.manual_seed(0)
model = build_model(cfg).train()
bottom_up = model.backbone.bottom_up
assert type(bottom_up) is toy_family.D2Toy
assert isinstance(bottom_up.net.stages[0].blocks[0][1], torch.nn.GELU)
assert bottom_up.output_shape()["res5"].stride == 32

def instances(height, width):
    target = Instances((height, width))
    target.gt_boxes = Boxes(torch.tensor([[8.0, 8.0, 60.0, 50.0]]))
    target.gt_classes = torch.tensor([1])
    mask = torch.zeros(1, height, width, dtype=torch.bool)
    mask[:, 8:50, 8:60] = True
    target.gt_masks = BitMasks(mask)
    return target

batch = [{"image": torch.rand(3, 96, 128) * 255, "instances": instances(96, 128)}]
with EventStorage():
    losses = model(batch)
sum(losses.values()).backward()
assert {"loss_mask", "loss_box_reg", "loss_rpn_cls"} <= set(losses)
assert bottom_up.net.stages[3].blocks[0][0].weight.grad is not None

cfg = get_config(retinanet_yaml)
model = build_model(cfg).eval()
with torch.no_grad():
    (result,) = model([{"image": torch.rand(3, 96, 128) * 255}])
assert result["instances"].image_size == (96, 128)
assert sorted(model.backbone.bottom_up.output_shape()) == ["res3", "res4", "res5"]

assert timm.list_models("hybrid_toy_*") == ["hybrid_toy_small", "hybrid_toy_tiny"]
classifier = timm.create_model("hybrid_toy_tiny", num_classes=7).eval()
assert classifier(torch.rand(2, 3, 64, 64)).shape == (2, 7)
print("toy family ok")
"""


def test_a_toy_family_declared_in_one_module_runs_everywhere(tmp_path):
    (tmp_path / "toy_family.py").write_text(TOY_MODULE)
    (tmp_path / "toy_mask_rcnn.yaml").write_text(MASK_RCNN_YAML)
    (tmp_path / "toy_retinanet.yaml").write_text(RETINANET_YAML)
    (tmp_path / "checks.py").write_text(CHECKS)
    result = subprocess.run(
        [sys.executable, "checks.py", "toy_mask_rcnn.yaml", "toy_retinanet.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "toy family ok" in result.stdout


def test_the_toy_family_meets_the_backbone_contract(tmp_path):
    """tests/backbones/test_contract.py, run for the toy family in a process of its own."""
    (tmp_path / "toy_family.py").write_text(TOY_MODULE)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/backbones/test_contract.py"],
        cwd=REPO_ROOT,
        env={**os.environ, "HYBRID_D2_TOY_FAMILY": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:]  # 5: no test ran
    assert " passed" in result.stdout and "skipped" not in result.stdout


def test_every_family_module_is_registered():
    modules = {path.stem for path in (REPO_ROOT / "hybrid_d2/backbones").glob("*.py")}
    assert set(FAMILIES) == modules - {"__init__", "fpn"}
    for family in FAMILIES.values():
        assert family.backbone_name.startswith("D2")


def test_backbone_options_are_checked():
    assert issubclass(D2MixFormer, PyramidBackbone)
    backbone = D2MixFormer("b0", pooled_norm="BN")
    assert backbone.options == {"norm": "BN", "pooled_norm": "BN"}
    with pytest.raises(TypeError, match=r"D2MixFormer: unknown option\(s\) \['pooled_nrom'\]"):
        D2MixFormer("b0", pooled_nrom="BN")


# Recorded with the per-family wrappers (D2MixFormer, ... as five hand-written classes) before they
# became one PyramidBackbone: the same configs must build the same modules with the same outputs.
BEFORE = json.loads((REPO_ROOT / "tests/data/family_outputs_before_refactor.json").read_text())
FAMILY_CONFIGS = {
    "mixformer": "configs/mixformer_b1_mask_rcnn_1x.yaml",
    "dilateformer": "configs/dilateformer_t_mask_rcnn_1x.yaml",
    "dualformer": "configs/dualformer_t_mask_rcnn_1x.yaml",
    "dmf": "configs/dmf_s_retinanet_1x.yaml",
    "dmformer": "configs/dmformer_s_mask_rcnn_1x.yaml",
}
CLASSIFIERS = [name for name in BEFORE if name.startswith("hybrid_")]


def _fingerprint(model: nn.Module, x: torch.Tensor) -> dict:
    state = model.state_dict()
    keys = "\n".join(f"{k}:{tuple(v.shape)}:{v.dtype}" for k, v in state.items())
    drop_path = [round(float(m.drop_prob), 6) for m in model.modules() if isinstance(m, DropPath)]
    with torch.no_grad():
        outputs = model.eval()(x)
    outputs = outputs if isinstance(outputs, dict) else {"logits": outputs}
    return {
        "state_dict_keys_sha256": hashlib.sha256(keys.encode()).hexdigest()[:16],
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "drop_path": drop_path,
        "outputs": {k: v.double() for k, v in outputs.items()},
    }


def _assert_as_before(got: dict, before: dict) -> None:
    for field in ("state_dict_keys_sha256", "parameters", "trainable", "drop_path"):
        assert got[field] == before[field], field
    assert sorted(got["outputs"]) == sorted(before["outputs"])
    for name, output in got["outputs"].items():
        expected = before["outputs"][name]
        assert list(output.shape) == expected["shape"], name
        abs_sum = float(output.abs().sum())  # fp32 rounding may differ between CPUs
        assert abs_sum == pytest.approx(expected["abs_sum"], rel=1e-4), name
        assert float(output.sum()) == pytest.approx(expected["sum"], abs=1e-4 * abs_sum), name


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_shipped_configs_build_the_backbones_recorded_before_the_refactor(family):
    cfg = load_config(REPO_ROOT / FAMILY_CONFIGS[family], ["MODEL.DEVICE", "cpu"])
    torch.manual_seed(0)
    backbone = build_backbone(cfg)
    x = torch.randn(1, 3, 224, 288, generator=torch.Generator().manual_seed(1))
    _assert_as_before(_fingerprint(backbone, x), BEFORE[family])


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_timm_classifiers_are_those_recorded_before_the_refactor(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    _assert_as_before(_fingerprint(model, x), BEFORE[name])
