"""The user's path for official ImageNet weights, walked as a user walks it: the file exactly as the
official code writes it -> tools/convert_pretrained.py -> MODEL.WEIGHTS of a shipped config with
its default settings, through the loader train_net.py and demo/demo.py use. Nothing of the
ImageNet network may be reported missing or unexpected, and the loaded trunk must compute what the
official network computes."""

import functools
import re
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT, load_as_train_net_does, randomize_batchnorms, run_script
from hybrid_d2.backbones import DilateFormer, DynamicMobileFormer, MixFormer
from hybrid_d2.backbones.dilateformer import variant_config as dilateformer_variant
from hybrid_d2.backbones.dmf import DynamicResidualConv2d
from hybrid_d2.backbones.dmf import variant_config as dmf_variant
from hybrid_d2.backbones.mixformer import variant_config as mixformer_variant
from official_formats import (
    dilateformer_official_state,
    dmf_classifier_tail,
    mixformer_paddle_state,
    write_deit_checkpoint,
    write_pdparams,
)

# The DMF classifier tail's input and width per variant (paper Table 1).
_DMF_TAILS = {"xxs": dict(last_channels=120, conv_channels=960)}
IMAGE = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
NET_PREFIX = "backbone.bottom_up.net."
# The variant name each family's configs use -> the converter's --variant.
CONFIG_VARIANTS = {
    "mixformer": {f"b{i}": f"b{i}" for i in range(7)},
    "dilateformer": {"t": "tiny", "s": "small", "b": "base"},
    "dmf": {"xxs": "xxs", "xs": "xs", "s": "s"},
}
# On shapes, at a small size: only what a shipped config cannot run here is overridden.
SHAPES_EVAL = [
    "DATASETS.TEST", "('shapes_val',)",
    "MODEL.ROI_HEADS.NUM_CLASSES", 5,
    "MODEL.RETINANET.NUM_CLASSES", 5,
    "INPUT.MIN_SIZE_TEST", 64,
    "INPUT.MAX_SIZE_TEST", 96,
    "TEST.DETECTIONS_PER_IMAGE", 5,
    "MODEL.DEVICE", "cpu",
]



def _network(family: str, variant: str) -> torch.nn.Module:
    """The official network: random weights, BatchNorms with statistics moved off their init."""
    torch.manual_seed(0)
    if family == "mixformer":
        config = mixformer_variant(variant)
        config.pop("drop_path_rate")
        network = MixFormer(**config)
    elif family == "dilateformer":
        config = dilateformer_variant(variant)
        network = DilateFormer(
            config["embed_dim"], config["depths"], config["num_heads"], norm="BN"
        )
    else:
        network = DynamicMobileFormer(**dmf_variant(variant), norm="BN", pooled_norm="BN")
        for conv in network.modules():  # dynamic kernels start at zero: they would test nothing
            if isinstance(conv, DynamicResidualConv2d):
                conv.weight.data.normal_(0, 0.05)
    randomize_batchnorms(network)
    return network.eval()


def _write_official(family: str, variant: str, network, path: Path) -> Path:
    """MixFormer: a .pdparams as numpy >= 2 writes it. DilateFormer, DMF: a DeiT-style training
    checkpoint whose EMA weights are the network (the README converts with --ema)."""
    if family == "mixformer":
        path = path / f"MixFormer_{variant.upper()}_pretrained.pdparams"
        write_pdparams(path, mixformer_paddle_state(network, variant), numpy2=True)
        return path
    if family == "dilateformer":
        state = dilateformer_official_state(network)
    else:
        state = {**network.state_dict(), **dmf_classifier_tail(**_DMF_TAILS[variant])}
    path = path / "checkpoint.pth"
    zeros = {k: torch.zeros_like(v) for k, v in state.items()}
    write_deit_checkpoint(path, model=zeros, model_ema=state)
    return path


@functools.lru_cache(maxsize=None)
def converted(family: str, variant: str, folder: Path):
    """(official file, converted file, the official network's outputs on IMAGE)."""
    network = _network(family, variant)
    official = _write_official(family, variant, network, folder)
    output = folder / f"{family}_{variant}_d2.pth"
    ema = ["--ema"] if family != "mixformer" else []
    result = run_script(
        "tools/convert_pretrained.py",
        ["--family", family, "--variant", variant, *ema, official, output],
        folder,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wrote" in result.stdout and str(output) in result.stdout
    with torch.no_grad():
        expected = [t.clone() for t in network(IMAGE)]
    return official, output, expected


# The variants whose shipped configs are loaded: DilateFormer-S has a config for every framework
# (RetinaNet without res2, Mask R-CNN 1x/3x, Cascade, keypoints, LVIS), MixFormer-B1 for
# RetinaNet and Mask R-CNN; the configs of other variants differ only in the variant, and the
# end-to-end test below walks MixFormer-B1, DilateFormer-T and DMF-XXS (RetinaNet).
LOADED_VARIANTS = ("mixformer_b1_", "dilateformer_s_", "dmf_xxs_")


def _shipped_configs():
    return sorted(
        p.name for p in (REPO_ROOT / "configs").glob("*.yaml") if p.name.startswith(LOADED_VARIANTS)
    )


def _family_and_variant(config: str):
    family, variant = config.split("_")[:2]
    return family, CONFIG_VARIANTS[family][variant]


@pytest.mark.parametrize("config", _shipped_configs())
def test_converted_weights_load_into_every_shipped_config(config, tmp_path_factory, monkeypatch):
    family, variant = _family_and_variant(config)
    folder = tmp_path_factory.getbasetemp() / f"official_{family}_{variant}"
    folder.mkdir(exist_ok=True)
    _, weights, expected = converted(family, variant, folder)

    model, incompatible = load_as_train_net_does(
        REPO_ROOT / "configs" / config, weights, monkeypatch
    )
    assert incompatible.unexpected_keys == []
    assert incompatible.incorrect_shapes == []
    assert not [k for k in incompatible.missing_keys if k.startswith(NET_PREFIX)]
    with torch.no_grad():
        outputs = model.backbone.bottom_up.net.eval()(IMAGE)
    for ours, theirs in zip(outputs, expected):
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)


def _checkpoint_report(log: str) -> str:
    """Detectron2's lines about keys missing from / unused in the checkpoint."""
    match = re.search(r"Some model parameters or buffers are not found.*?(?=\n\[|\Z)", log, re.S)
    return match.group(0) if match else ""


@pytest.mark.parametrize(
    "config",
    ["mixformer_b1_mask_rcnn_1x.yaml", "dilateformer_t_mask_rcnn_1x.yaml", "dmf_xxs_retinanet_1x.yaml"],
)
def test_official_file_to_eval_only_and_demo(config, datasets_root, tmp_path_factory):
    """The README's commands: convert, train_net.py --eval-only MODEL.WEIGHTS, demo.py."""
    family, variant = _family_and_variant(config)
    folder = tmp_path_factory.getbasetemp() / f"official_{family}_{variant}"
    folder.mkdir(exist_ok=True)
    _, weights, _ = converted(family, variant, folder)
    config_path = REPO_ROOT / "configs" / config
    out = tmp_path_factory.mktemp("eval_only")
    result = run_script(
        "train_net.py",
        ["--config-file", config_path, "--eval-only", "MODEL.WEIGHTS", weights,
         *SHAPES_EVAL, "OUTPUT_DIR", out],
        datasets_root,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "contains keys that are not used by the model" not in log
    assert "bottom_up.net" not in _checkpoint_report(log)
    assert "copypaste: Task: bbox" in log
    assert ("copypaste: Task: segm" in log) == ("mask_rcnn" in config)

    result = run_script(
        "demo/demo.py",
        ["--config-file", config_path, "--input", datasets_root / "shapes/val/000001.png",
         "--output", out / "demo.png", "--opts", "MODEL.WEIGHTS", weights, *SHAPES_EVAL],
        datasets_root,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "contains keys that are not used by the model" not in result.stdout + result.stderr
    assert (out / "demo.png").is_file()
