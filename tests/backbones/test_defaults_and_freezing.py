"""Variant defaults reach a config that names only the variant, and drop path acts on trainable
stages only (every registered family, built from a config as train_net.py builds it)."""

import glob
from pathlib import Path

import pytest
import torch
from detectron2.modeling import build_backbone
from timm.layers import DropPath

from conftest import REPO_ROOT, load_config, smallest_variant
from hybrid_d2.layers import FAMILIES

VARIANT_CASES = [(name, v) for name, family in FAMILIES.items() for v in family.variants]


def variant_only_config(tmp_path: Path, name: str, variant: str, opts=()):
    """A user's yaml that names the backbone and its variant and nothing else."""
    family = FAMILIES[name]
    path = tmp_path / f"{name}_{variant}.yaml"
    path.write_text(
        f"MODEL:\n  BACKBONE:\n    NAME: {family.builder_name}\n  {family.config_key}:\n"
        f"    VARIANT: {variant}\n"
    )
    return load_config(path, opts)


def drop_path_rates(model: torch.nn.Module) -> list:
    return [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]


@pytest.mark.parametrize("name, variant", VARIANT_CASES)
def test_a_config_naming_only_the_variant_gets_its_drop_path_rate(name, variant, tmp_path):
    key = f"MODEL.{FAMILIES[name].config_key}.DROP_PATH_RATE"
    cfg = variant_only_config(tmp_path, name, variant)
    assert cfg.MODEL[FAMILIES[name].config_key].DROP_PATH_RATE is None
    expected_rate = FAMILIES[name].variants[variant]["drop_path_rate"]
    explicit = variant_only_config(tmp_path, name, variant, [key, expected_rate])
    other = variant_only_config(tmp_path, name, variant, [key, expected_rate + 0.05])
    with torch.device("meta"):
        rates = drop_path_rates(build_backbone(cfg))
        assert rates == drop_path_rates(build_backbone(explicit))
        assert rates != drop_path_rates(build_backbone(other))
    if expected_rate > 0:
        assert rates and max(rates) > 0


def _family_of(cfg) -> str:
    builder = cfg.MODEL.BACKBONE.NAME
    if builder.startswith("build_hybrid_"):
        builder = cfg.MODEL.FPN.BOTTOM_UP
    (family,) = [f for f in FAMILIES.values() if f.builder_name == builder]
    return family.config_key


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


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_a_fully_frozen_backbone_is_deterministic_in_train_mode(name, tmp_path):
    """Drop path (rate 0.5 here) acts on trainable stages only: with everything frozen, two
    training-mode forwards agree bitwise; with nothing frozen they differ."""
    key = f"MODEL.{FAMILIES[name].config_key}"
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    for freeze_at, same in ((5, True), (0, False)):
        opts = ["MODEL.BACKBONE.FREEZE_AT", freeze_at, f"{key}.DROP_PATH_RATE", 0.5,
                f"{key}.NORM", "BN"]  # fmt: skip
        cfg = variant_only_config(tmp_path, name, smallest_variant(name), opts)
        torch.manual_seed(0)
        backbone = build_backbone(cfg).train()
        with torch.no_grad():
            first, second = backbone(x), backbone(x)
        agree = all(torch.equal(first[k], second[k]) for k in first)
        assert agree == same, f"FREEZE_AT {freeze_at}"
