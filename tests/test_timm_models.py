"""The ImageNet classifiers registered with timm (issue #14): every name builds, trains a step
and has the design notes' size; official weights reach them with their head; a timm training
checkpoint becomes detection weights that load into a shipped config."""

import argparse
import importlib.util
from pathlib import Path

import pytest
import timm
import torch
from fvcore.nn import parameter_count
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, resolve_data_config
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import CheckpointSaver, ModelEmaV3

from conftest import REPO_ROOT, load_as_train_net_does, randomize_batchnorms, run_script
from official_formats import (
    dilateformer_official_state,
    mixformer_paddle_state,
    write_deit_checkpoint,
    write_pdparams,
)
from hybrid_d2.backbones.dmf import DynamicResidualConv2d
from hybrid_d2.checkpoint import convert_timm_checkpoint
from hybrid_d2.layers import FAMILIES
from hybrid_d2.layers import ClassifierMixin

NAMES = [f"hybrid_{name}_{v}" for name, family in FAMILIES.items() for v in family.variants]
# Classification parameters with the 1000-class head: exact where the design notes derive an
# exact count, else (count, relative tolerance) of the notes' analytic count.
PARAMS = {
    "hybrid_mixformer_b0": 5_098_767,
    "hybrid_mixformer_b1": 7_887_877,
    "hybrid_mixformer_b2": 9_894_848,
    "hybrid_mixformer_b3": 16_747_808,
    "hybrid_mixformer_b4": 34_797_572,
    "hybrid_mixformer_b5": 61_692_403,
    "hybrid_mixformer_b6": 119_505_054,
    "hybrid_dilateformer_tiny": 17_238_744,
    "hybrid_dilateformer_small": 24_057_504,
    "hybrid_dilateformer_base": 47_432_376,
    "hybrid_dmformer_s": 26_616_104,
    "hybrid_dmformer_l": 44_905_064,
    "hybrid_dmf_s": (25.145e6, 0.005 / 25.145),  # notes: +-0.005M
    "hybrid_dmf_xs": (19.806e6, 0.005 / 19.806),
    "hybrid_dmf_xxs": (15.075e6, 0.005 / 15.075),
    # no official code: our count with PVTv2's per-stage FFN ratios (docs/dualformer.md)
    "hybrid_dualformer_tiny": 5_699_760,
    "hybrid_dualformer_xsmall": 10_868_022,
    "hybrid_dualformer_small": 22_064_226,
    "hybrid_dualformer_base": 73_822_263,
}
# DualFormer Table 1 (params in M, GFLOPs at 224) and the agreement our reading reaches: T, XS
# and S within 4% on both; B within 1% params and 12% FLOPs (docs/dualformer.md).
DUALFORMER_TABLE_1 = {
    "hybrid_dualformer_tiny": (5.5, 1.3, 0.04, 0.04),
    "hybrid_dualformer_xsmall": (10.5, 2.3, 0.04, 0.04),
    "hybrid_dualformer_small": (22.6, 4.4, 0.04, 0.04),
    "hybrid_dualformer_base": (74.0, 15.8, 0.01, 0.12),
}
# Multiply-adds at 224 of convolutions, linears and attention (the MixFormer notes' convention,
# tail included) against the notes' derived count, +-1%; tools/classifier_stats.py gives all.
GMACS = {"hybrid_mixformer_b1": 0.699}
# Each family's smallest variant with a shipped config: (timm name, config).
DETECTION = {
    "mixformer": ("hybrid_mixformer_b1", "mixformer_b1_mask_rcnn_1x.yaml"),
    "dilateformer": ("hybrid_dilateformer_tiny", "dilateformer_t_mask_rcnn_1x.yaml"),
    "dmf": ("hybrid_dmf_xxs", "dmf_xxs_retinanet_1x.yaml"),
    "dualformer": ("hybrid_dualformer_tiny", "dualformer_t_mask_rcnn_1x.yaml"),
    "dmformer": ("hybrid_dmformer_s", "dmformer_s_retinanet_1x.yaml"),
}
# Small enough to be fast, and stage 3 fits in one 7x7 window: DilateFormer's "mixed" detection
# attention then computes what the classifier's global attention computes.
IMAGE = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))

_SPEC = importlib.util.spec_from_file_location(
    "convert_pretrained", REPO_ROOT / "tools" / "convert_pretrained.py"
)
convert_cli = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(convert_cli)
_SPEC = importlib.util.spec_from_file_location(
    "classifier_stats", REPO_ROOT / "tools" / "classifier_stats.py"
)
classifier_stats = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(classifier_stats)


def test_every_variant_is_registered_under_our_prefix():
    assert sorted(timm.list_models("hybrid_*")) == sorted(NAMES)
    for name in NAMES:
        assert timm.models.get_pretrained_cfg(name).mean == IMAGENET_DEFAULT_MEAN
        assert timm.models.model_entrypoint(name).__module__.startswith("hybrid_d2.backbones.")


@pytest.mark.parametrize("name", NAMES)
def test_classification_params_match_the_design_notes(name):
    with torch.device("meta"):
        count = parameter_count(timm.create_model(name))[""]
    expected = PARAMS[name]
    if isinstance(expected, int):
        assert count == expected
    else:
        assert count == pytest.approx(expected[0], rel=expected[1])


@pytest.mark.parametrize("name", sorted(GMACS))
def test_multiply_adds_at_224_match_the_design_notes(name):
    assert classifier_stats.classifier_stats(name)["gmacs"] == pytest.approx(GMACS[name], rel=0.01)


@pytest.mark.parametrize("name", sorted(DUALFORMER_TABLE_1))
def test_dualformer_params_and_flops_match_table_1(name):
    params, gflops, params_tolerance, flops_tolerance = DUALFORMER_TABLE_1[name]
    stats = classifier_stats.classifier_stats(name)
    assert stats["params"] / 1e6 == pytest.approx(params, rel=params_tolerance)
    assert stats["gflops"] == pytest.approx(gflops, rel=flops_tolerance)


def _forward_backward(model: torch.nn.Module, x: torch.Tensor) -> None:
    model.zero_grad()
    features = model.forward_features(x)
    assert features.shape[-2:] == (-(-x.shape[2] // 32), -(-x.shape[3] // 32))
    logits = model.forward_head(features)
    assert logits.shape == (x.shape[0], 5)
    assert model.forward_head(features, pre_logits=True).shape[1] == model.head_hidden_size
    logits.logsumexp(1).sum().backward()
    assert model.get_classifier().weight.grad.abs().sum() > 0
    first = model.get_submodule(model.pretrained_cfg["first_conv"])
    assert torch.isfinite(first.weight.grad).all() and first.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_at_224_and_non_square(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, drop_path_rate=0.1)
    assert resolve_data_config({}, model=model)["input_size"] == (3, 224, 224)
    assert model.pretrained_cfg["std"] == IMAGENET_DEFAULT_STD
    _forward_backward(model.eval(), torch.randn(1, 3, 224, 224))
    # train mode (drop path, batch statistics; batch 2: MixFormer's and DMF's BatchNorms on
    # pooled vectors need two samples)
    _forward_backward(model.train(), torch.randn(2, 3, 64, 96))


def test_reset_classifier_gives_pooled_features():
    model = timm.create_model("hybrid_dmf_xxs", num_classes=0).eval()
    with torch.no_grad():
        assert model(IMAGE).shape == (1, model.head_hidden_size)
    model.reset_classifier(3)
    with torch.no_grad():
        assert model(IMAGE).shape == (1, 3)


# --- item 3: official checkpoints -> timm classifiers, head kept --------------------------------


def _official_classifier(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name)
    for conv in model.modules():  # DMF's dynamic kernels start at zero: they would test nothing
        if isinstance(conv, DynamicResidualConv2d):
            conv.weight.data.normal_(0, 0.05)
    randomize_batchnorms(model)
    return model.eval()


def _write_official(family: str, variant: str, model, folder: Path) -> Path:
    """The classifier as the official code saves it (module docstrings of the converters)."""
    if family == "mixformer":
        path = folder / f"MixFormer_{variant.upper()}_pretrained.pdparams"
        write_pdparams(path, mixformer_paddle_state(model, variant), numpy2=True)
        return path
    state = dilateformer_official_state(model) if family == "dilateformer" else model.state_dict()
    path = folder / "checkpoint.pth"
    write_deit_checkpoint(path, model={k: torch.zeros_like(v) for k, v in state.items()},
                          model_ema=state)  # fmt: skip
    return path


@pytest.mark.parametrize(
    "family, variant", [("mixformer", "b1"), ("dilateformer", "tiny"), ("dmf", "xxs")]
)
def test_official_weights_evaluate_in_timm_with_their_head(family, variant, tmp_path, capsys):
    name = f"hybrid_{family}_{variant}"
    official = _official_classifier(name)
    source = _write_official(family, variant, official, tmp_path)
    output = tmp_path / f"{name}.pth"
    ema = ["--ema"] if family != "mixformer" else []
    argv = ["--family", family, "--variant", variant, "--keep-head", *ema, str(source), str(output)]
    assert convert_cli.main(argv) == 0, capsys.readouterr().err
    # what timm's validate.py does with --checkpoint, and timm's pretrained-file route
    by_path = timm.create_model(name, checkpoint_path=str(output)).eval()
    overlay = dict(file=str(output))
    by_cfg = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay).eval()
    with torch.no_grad():
        expected = official(IMAGE)
        torch.testing.assert_close(by_path(IMAGE), expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(by_cfg(IMAGE), expected, atol=1e-4, rtol=1e-4)


# --- item 4: timm training -> detection weights -> a shipped config ---------------------------


def _train_with_timm(name: str, folder: Path) -> torch.nn.Module:
    """Two steps of timm's own optimizer, scheduler and EMA, then timm's checkpoint saver, as
    train.py runs them; returns the EMA model whose weights the checkpoint's 'state_dict_ema'
    holds."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=4, drop_path_rate=0.1)
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    scheduler, _ = create_scheduler_v2(optimizer, "cosine", num_epochs=2, warmup_epochs=1)
    ema = ModelEmaV3(model, decay=0.5)
    model.train()
    for epoch in range(2):
        loss = model(torch.randn(2, 3, 64, 64)).logsumexp(1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update(model, step=epoch)
        scheduler.step(epoch + 1)
    args = argparse.Namespace(model=name, opt="adamw", lr=1e-3, epochs=2, drop_path=0.1)
    saver = CheckpointSaver(model, optimizer, args=args, model_ema=ema, checkpoint_dir=str(folder))
    saver.save_checkpoint(epoch, metric=-loss.item())
    return ema.module.eval()


@pytest.mark.parametrize("family", sorted(DETECTION))
def test_timm_checkpoint_to_shipped_detector(family, tmp_path, monkeypatch, capsys):
    name, config = DETECTION[family]
    trained = _train_with_timm(name, tmp_path)
    weights = tmp_path / "d2.pth"
    argv = ["--family", family, "--from", "timm", "--ema", str(tmp_path / "last.pth.tar"),
            str(weights)]  # fmt: skip
    assert convert_cli.main(argv) == 0, capsys.readouterr().err

    detector, incompatible = load_as_train_net_does(
        REPO_ROOT / "configs" / config, weights, monkeypatch
    )
    assert incompatible.unexpected_keys == [] and incompatible.incorrect_shapes == []
    assert not [k for k in incompatible.missing_keys if k.startswith("backbone.bottom_up.net.")]
    with torch.no_grad():
        expected = super(ClassifierMixin, trained).forward(IMAGE)  # the trunk's four maps
        outputs = detector.backbone.bottom_up.net.eval()(IMAGE)
    for ours, theirs in zip(outputs, expected, strict=True):
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)


def test_timm_checkpoint_of_another_family_or_variant_is_refused(tmp_path):
    checkpoint = {"arch": "hybrid_dmf_xs", "state_dict": {}, "args": None}
    with pytest.raises(ValueError, match=r"ckpt: 'arch' is 'hybrid_dmf_xs', expected one of"):
        convert_timm_checkpoint(checkpoint, "ckpt", "mixformer")
    with pytest.raises(ValueError, match=r"expected 'hybrid_dmf_s' \(--variant s\)"):
        convert_timm_checkpoint(checkpoint, "ckpt", "dmf", variant="s")
    with torch.device("meta"):
        state = timm.create_model("hybrid_dmf_xxs").state_dict()
    checkpoint = {"arch": "hybrid_dmf_xs", "state_dict": state}
    with pytest.raises(ValueError, match="does not fit"):
        convert_timm_checkpoint(checkpoint, "ckpt", "dmf")
    with pytest.raises(KeyError, match="no 'state_dict_ema' entry"):
        convert_timm_checkpoint(checkpoint, "ckpt", "dmf", use_ema=True)


def test_timm_scripts_see_the_registered_models(tmp_path):
    """tools/timm_script.py runs a timm script (here a stand-in for validate.py) as __main__ with
    its arguments, after registering the classifiers."""
    script = tmp_path / "validate.py"
    script.write_text(
        "import sys, timm\n"
        "model = timm.create_model(sys.argv[sys.argv.index('--model') + 1], num_classes=3)\n"
        "print(__name__, type(model).__name__, model.num_classes)\n"
    )
    result = run_script("tools/timm_script.py", [script, "--model", "hybrid_dmf_xxs"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-3:] == ["__main__", "DMFClassifier", "3"]
    result = run_script("tools/timm_script.py", ["train.py"], tmp_path)
    assert result.returncode != 0
    assert "expected the path of a timm script (e.g. train.py) first, got train.py" in result.stderr


def test_cli_refuses_what_it_cannot_convert(tmp_path, capsys):
    output = tmp_path / "out.pth"
    argv = ["--family", "dualformer", "--variant", "small", str(tmp_path / "in.pth"), str(output)]
    assert convert_cli.main(argv) == 1
    assert "--family dualformer: no official weights exist" in capsys.readouterr().err
    argv = ["--family", "dmf", "--from", "timm", "--keep-head", str(tmp_path), str(output)]
    assert convert_cli.main(argv) == 1
    assert "a timm checkpoint loads into timm as it is" in capsys.readouterr().err
    assert not output.exists()
