"""timm's backbone conventions on the 19 hybrid_* models: ``features_only=True`` gives the
Detectron2 backbone's four maps with ``feature_info``; ``num_classes=0, global_pool=''`` and
``reset_classifier(0, '')`` give the unpooled map; the pretrained config names real modules."""

import re

import pytest
import timm
import torch
from torch import nn

import hybrid_d2.backbones
from conftest import REPO_ROOT
from hybrid_d2.layers import FAMILIES

NAMES = [f"hybrid_{name}_{v}" for name, family in FAMILIES.items() for v in family.variants]
# The smallest variant of each family, for the comparisons that run the networks.
SMALLEST = {
    "mixformer": "b0",
    "dilateformer": "tiny",
    "dmf": "xxs",
    "dmformer": "s",
    "dualformer": "tiny",
}
# The classifiers' network settings (their NETWORK_DEFAULTS) as the backbones' options.
CLASSIFIER_SETTINGS = {
    "mixformer": dict(norm="BN", pooled_norm="BN"),
    "dmf": dict(norm="BN", pooled_norm="BN", kernel_temperature=1.0),
}
IMAGE = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))


def _backbone(family: str, variant: str) -> nn.Module:
    """The family's Detectron2 backbone without its output norms (the trunk's maps), with the
    classifier's network settings."""
    backbone = getattr(hybrid_d2.backbones, FAMILIES[family].backbone_name)
    settings = CLASSIFIER_SETTINGS.get(family, dict(norm="BN"))
    return backbone(variant=variant, output_norm=False, **settings)


@pytest.mark.parametrize("name", NAMES)
def test_features_only_describes_the_detectron2_maps(name):
    family, variant = next(
        (f, v)
        for f, declaration in FAMILIES.items()
        for v in declaration.variants
        if name == f"hybrid_{f}_{v}"
    )
    with torch.device("meta"):  # shapes and names only
        model = timm.create_model(name, features_only=True, out_indices=(1, 3))
    expected = _backbone_shapes(family, variant)
    assert model.feature_info.channels() == [expected[1].channels, expected[3].channels]
    assert model.feature_info.reduction() == [8, 32]
    for module in model.feature_info.module_name():
        model.model.get_submodule(module)  # names a module of the network
    tail = FAMILIES[family].classifier.TAIL  # pruned: no classification parameters
    assert not [n for n, _ in model.model.named_parameters() if n.split(".")[0] in tail]


def _backbone_shapes(family: str, variant: str):
    with torch.device("meta"):
        backbone = _backbone(family, variant)
    shapes = backbone.output_shape()
    return [shapes[name] for name in ("res2", "res3", "res4", "res5")]


@pytest.mark.parametrize("family", sorted(SMALLEST))
def test_features_only_returns_the_detectron2_backbones_maps(family):
    """One network: the backbone's trunk weights load into the features model (same keys), and
    both return the same four maps; out_indices picks among them."""
    variant = SMALLEST[family]
    torch.manual_seed(0)
    backbone = _backbone(family, variant).eval()
    model = timm.create_model(f"hybrid_{family}_{variant}", features_only=True).eval()
    model.model.load_state_dict(backbone.net.state_dict())  # strict: the same modules
    with torch.no_grad():
        expected = list(backbone(IMAGE).values())
        maps = model(IMAGE)
    assert len(maps) == 4
    for got, want in zip(maps, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    picked = timm.create_model(f"hybrid_{family}_{variant}", features_only=True, out_indices=(-1,))
    picked.model.load_state_dict(backbone.net.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(picked.eval()(IMAGE)[0], expected[-1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", sorted(SMALLEST))
def test_unpooled_model_returns_the_map_of_forward_features(family):
    name = f"hybrid_{family}_{SMALLEST[family]}"
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=0, global_pool="").eval()
    with torch.no_grad():
        out = model(IMAGE)
        assert out.shape == (1, model.num_features, 2, 3)
        torch.testing.assert_close(out, model.forward_features(IMAGE))
        model.reset_classifier(4, "avg")
        assert model(IMAGE).shape == (1, 4)
        model.reset_classifier(0, "")
        assert model(IMAGE).shape == (1, model.num_features, 2, 3)
        model.reset_classifier(0)  # keeps '' (timm: None keeps the pooling)
        assert model(IMAGE).ndim == 4
        model.reset_classifier(0, "avg")
        assert model(IMAGE).shape == (1, model.head_hidden_size)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(global_pool="max"), r"pool by average \('avg'\) or not at all"),
        (dict(global_pool=""), "an unpooled model has no classifier"),
    ],
)
def test_unsupported_pooling_is_refused_by_name(kwargs, message):
    with torch.device("meta"), pytest.raises(ValueError, match=message):
        timm.create_model("hybrid_mixformer_b0", **kwargs)


@pytest.mark.parametrize("name", NAMES)
def test_pretrained_cfg_names_the_first_conv_and_the_classifier(name):
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=7)
    cfg = model.pretrained_cfg
    first = model.get_submodule(cfg["first_conv"])
    assert isinstance(first, nn.Conv2d) and first.in_channels == 3
    classifier = model.get_submodule(cfg["classifier"])
    assert isinstance(classifier, nn.Linear) and classifier.out_features == 7
    assert classifier.in_features == model.head_hidden_size
    assert classifier is model.get_classifier()
    _, height, width = cfg["input_size"]  # the map is at stride 32 (num_features: unpooled test)
    assert cfg["pool_size"] == (height // 32, width // 32)


def test_forward_intermediates_is_the_feature_getter():
    torch.manual_seed(0)
    model = timm.create_model("hybrid_dmf_xxs").eval()
    with torch.no_grad():
        maps = model.forward_intermediates(IMAGE, intermediates_only=True)
        assert [m.shape[1] for m in maps] == [f["num_chs"] for f in model.feature_info]
        last_two = model.forward_intermediates(IMAGE, indices=2, intermediates_only=True)
        for got, want in zip(last_two, maps[2:]):
            assert torch.equal(got, want)
    with pytest.raises(ValueError, match="intermediates_only=True"):
        model.forward_intermediates(IMAGE)


def test_readme_example_runs_as_written():
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## Using the backbones outside Detectron2", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace = {}
    with torch.no_grad():
        exec(code, namespace)
    assert [m.shape[-1] for m in namespace["maps"]] == [56, 28, 14, 7]
    assert namespace["trunk"].eval()(torch.randn(1, 3, 64, 64)).ndim == 4
