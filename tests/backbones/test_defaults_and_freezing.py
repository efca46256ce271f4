"""Variant defaults reach a config that names only the variant, and frozen stages stay frozen in
train mode (every family, built from a config as train_net.py builds it)."""

import glob
from pathlib import Path

import pytest
import torch
from detectron2.modeling import build_backbone
from timm.layers import DropPath

from conftest import REPO_ROOT, load_config
from hybrid_d2.backbones import (
    DILATEFORMER_VARIANTS,
    DMF_VARIANTS,
    DMFORMER_VARIANTS,
    DUALFORMER_VARIANTS,
    MIXFORMER_VARIANTS,
)

# config namespace -> (BACKBONE_REGISTRY name, variant table)
FAMILIES = {
    "MIXFORMER": ("build_mixformer_backbone", MIXFORMER_VARIANTS),
    "DILATEFORMER": ("build_dilateformer_backbone", DILATEFORMER_VARIANTS),
    "DUALFORMER": ("build_dualformer_backbone", DUALFORMER_VARIANTS),
    "DMF": ("build_dmf_backbone", DMF_VARIANTS),
    "DMFORMER": ("build_dmformer_backbone", DMFORMER_VARIANTS),
}
SMALLEST = {"MIXFORMER": "b0", "DILATEFORMER": "tiny", "DUALFORMER": "tiny", "DMF": "xxs",
            "DMFORMER": "s"}  # fmt: skip
VARIANT_CASES = [(family, v) for family, (_, table) in FAMILIES.items() for v in table]


def variant_only_config(tmp_path: Path, family: str, variant: str, opts=()):
    """A user's yaml that names the backbone and its variant and nothing else."""
    path = tmp_path / f"{family.lower()}_{variant}.yaml"
    path.write_text(
        f"MODEL:\n  BACKBONE:\n    NAME: {FAMILIES[family][0]}\n  {family}:\n"
        f"    VARIANT: {variant}\n"
    )
    return load_config(path, opts)


def drop_path_rates(model: torch.nn.Module) -> list:
    return [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]


@pytest.mark.parametrize("family, variant", VARIANT_CASES)
def test_a_config_naming_only_the_variant_gets_its_drop_path_rate(family, variant, tmp_path):
    cfg = variant_only_config(tmp_path, family, variant)
    assert cfg.MODEL[family].DROP_PATH_RATE is None
    expected_rate = FAMILIES[family][1][variant]["drop_path_rate"]
    key = f"MODEL.{family}.DROP_PATH_RATE"
    explicit = variant_only_config(tmp_path, family, variant, [key, expected_rate])
    other = variant_only_config(tmp_path, family, variant, [key, expected_rate + 0.05])
    with torch.device("meta"):
        rates = drop_path_rates(build_backbone(cfg))
        assert rates == drop_path_rates(build_backbone(explicit))
        assert rates != drop_path_rates(build_backbone(other))
    if expected_rate > 0:
        assert rates and max(rates) > 0


def _family_of(cfg) -> str:
    name = cfg.MODEL.BACKBONE.NAME
    if name.startswith("build_hybrid_"):
        name = cfg.MODEL.FPN.BOTTOM_UP
    (family,) = [f for f, (builder, _) in FAMILIES.items() if builder == name]
    return family


@pytest.mark.parametrize(
    "config",
    sorted(p for p in glob.glob(str(REPO_ROOT / "configs/*.yaml"))
           if not Path(p).name.startswith("Base")),  # fmt: skip
    ids=lambda p: Path(p).name,
)
def test_paper_configs_set_the_papers_drop_path_rate_explicitly(config):
    """The experiment configs (configs/*.yaml) write their rate; the shapes quick configs
    (configs/shapes/) take their variant's."""
    cfg = load_config(config)
    assert cfg.MODEL[_family_of(cfg)].DROP_PATH_RATE is not None


def frozen_backbone(tmp_path: Path, family: str, freeze_at: int):
    cfg = variant_only_config(
        tmp_path, family, SMALLEST[family],
        ["MODEL.BACKBONE.FREEZE_AT", freeze_at, f"MODEL.{family}.DROP_PATH_RATE", 0.5,
         f"MODEL.{family}.NORM", "BN"],
    )  # fmt: skip
    torch.manual_seed(0)
    return build_backbone(cfg)


@pytest.mark.parametrize("freeze_at", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_frozen_stages_stay_in_eval_mode_in_train_mode(family, freeze_at, tmp_path):
    backbone = frozen_backbone(tmp_path, family, freeze_at).eval().train()
    frozen = backbone.frozen_modules(freeze_at)
    assert frozen
    inside = {id(m) for module in frozen for m in module.modules()}
    params_inside = {id(p) for module in frozen for p in module.parameters()}
    for name, module in backbone.named_modules():
        assert module.training == (id(module) not in inside), name
    for name, param in backbone.named_parameters():
        if name != "net.tokens":  # DMF's learnable tokens freeze with its stem
            assert param.requires_grad == (id(param) not in params_inside), name
    if freeze_at >= 3:  # the rate rises from 0 at the first block; res3's blocks all drop
        assert any(isinstance(m, DropPath) for module in frozen for m in module.modules())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_fully_frozen_backbone_is_deterministic_in_train_mode(family, tmp_path):
    """Drop path (rate 0.5 here) acts on trainable stages only: with everything frozen, two
    training-mode forwards agree bitwise; with nothing frozen they differ."""
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    for freeze_at, same in ((5, True), (0, False)):
        backbone = frozen_backbone(tmp_path, family, freeze_at).train()
        with torch.no_grad():
            first, second = backbone(x), backbone(x)
        agree = all(torch.equal(first[k], second[k]) for k in first)
        assert agree == same, f"FREEZE_AT {freeze_at}"
