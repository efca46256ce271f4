"""Mode ``backbones``: backbones alone, training and inference, per GFLOP against Detectron2's
Swin-T (DMF against torchvision's MobileNetV3-Large)."""

import argparse
import importlib.util
import os
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
import torchvision
from detectron2.modeling.backbone.swin import SwinTransformer
from torch import nn

from hybrid_d2.backbones import D2DilateFormer, D2DualFormer, dmformer, mixformer
from hybrid_d2.layers import DepthwiseConv2d, Mlp, flop_count_analysis

from .detectron import DETECTOR_REFERENCE, SWIN_T, config_backbone, detector_backbone
from .memory import peak_memory, release_memory, run_worker
from .paths import REPO_ROOT
from .registry import mode, models_option, option
from .report import Report, Table, write_report
from .timing import alternate, progress, spread, synchronizer

SWIN = "Swin-T (Detectron2)"
RESNET50 = "ResNet-50 (Detectron2)"
MOBILENET = "MobileNetV3-Large (torchvision)"


@dataclass
class Backbone:
    """How to build a benchmarked backbone, and the model its per-GFLOP ratios are to."""

    build: Callable[[], nn.Module]
    reference: str


def resnet50() -> nn.Module:
    """Detectron2's ResNet-50 as its R50-FPN Mask R-CNN config builds it (FrozenBN), outputs
    res2-res5, nothing frozen."""
    return detector_backbone(DETECTOR_REFERENCE)


def swin_t() -> SwinTransformer:
    """Detectron2's Swin-T, as the detectors mode's Swin-T Mask R-CNN builds it."""
    return detector_backbone(SWIN_T)


def mobilenet_v3_large() -> nn.Module:
    """torchvision's MobileNetV3-Large feature extractor (``.features``), random weights."""
    torch.manual_seed(0)
    return torchvision.models.mobilenet_v3_large().features


def dilateformer_s(stage3_attention: str) -> nn.Module:
    """DilateFormer-S (window 7) with stage-3 attention ``stage3_attention``."""
    return D2DilateFormer("small", stage3_attention=stage3_attention, window_size=7)


def dualformer_s(intra_mode: str) -> nn.Module:
    """DualFormer-S (FrozenBN, as ResNet-50) with intra-partition mode ``intra_mode``."""
    return D2DualFormer("small", norm="FrozenBN", intra_mode=intra_mode)


def with_reference(
    build: Callable[[], nn.Module], module: str, swap: str
) -> Callable[[], nn.Module]:
    """``build`` whose network gets ``swap`` of tests/backbones/``module``.py applied (the
    official formulation of one operation, same weights)."""

    def build_swapped() -> nn.Module:
        path = os.path.join(REPO_ROOT, "tests", "backbones", f"{module}.py")
        spec = importlib.util.spec_from_file_location(module, path)
        reference = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(reference)
        backbone = build()
        getattr(reference, swap)(backbone.net)
        return backbone

    return build_swapped


def with_plain_depthwise(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """``build`` whose ``DepthwiseConv2d`` modules run ``nn.Conv2d``'s own forward (PyTorch's
    depth-wise convolution and its backward, as before issue 25), same weights."""

    def build_plain() -> nn.Module:
        backbone = build()
        for module in backbone.modules():
            if isinstance(module, DepthwiseConv2d):
                module.forward = partial(nn.Conv2d.forward, module)
        return backbone

    return build_plain


def with_saved_gelu(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """``build`` whose MLPs (``Mlp``, DMFormer's convolutional one) run GELU and fc2 as separate
    autograd operators, which keep the GELU output for the backward (as before issue 25's
    ``gelu_linear``), same weights."""

    def build_plain() -> nn.Module:
        backbone = build()
        for module in backbone.modules():
            if isinstance(module, Mlp):
                module.forward = partial(_three_operators, module)
            elif isinstance(module, dmformer.Mlp):
                module.forward = partial(_conv_operators, module)
        return backbone

    return build_plain


def _three_operators(mlp: Mlp, x: torch.Tensor) -> torch.Tensor:
    return mlp.fc2(F.gelu(mlp.fc1(x)))


def _conv_operators(mlp: "dmformer.Mlp", x: torch.Tensor) -> torch.Tensor:
    return mlp.fc2(F.gelu(mlp.dwconv(mlp.fc1(x))))


def with_3d_bias(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """``build`` whose MixFormer window attention gets its relative position bias as a
    (heads, L, L) mask, which runs PyTorch's unfused math path in inference too (as before
    issue 25), same weights."""

    def build_3d_bias() -> nn.Module:
        backbone = build()
        for module in backbone.modules():
            if isinstance(module, mixformer.MixingAttention):
                module.relative_position_bias = partial(_bias_3d, module)
        return backbone

    return build_3d_bias


def _bias_3d(attn: "mixformer.MixingAttention") -> torch.Tensor:
    return mixformer.MixingAttention.relative_position_bias(attn)[0]


def shipped(name: str, reference: str = SWIN) -> Backbone:
    """The backbone of the detectors mode's detector ``name`` (its shipped config)."""
    return Backbone(partial(detector_backbone, name), reference)


DMF_S = shipped("DMF-S RetinaNet", MOBILENET)
DUALFORMER_B = "configs/dualformer_b_mask_rcnn_3x.yaml"
DMFORMER_S = "configs/dmformer_s_mask_rcnn_1x.yaml"
# The comparison of issue 25: each family's backbone as its shipped config builds it.
BACKBONES: Dict[str, Backbone] = {
    SWIN: Backbone(swin_t, SWIN),
    "MixFormer-B4": shipped("MixFormer-B4 Mask R-CNN"),
    "DilateFormer-S": shipped("DilateFormer-S Mask R-CNN"),
    "DualFormer-S": shipped("DualFormer-S Mask R-CNN"),
    "DMFormer-S": shipped("DMFormer-S Mask R-CNN"),
    RESNET50: Backbone(resnet50, SWIN),
    MOBILENET: Backbone(mobilenet_v3_large, MOBILENET),
    "DMF-S": DMF_S,
}
DEFAULT_MODELS = list(BACKBONES)
# Variants, on request (--models): one operation done another way, same weights where it says.
BACKBONES.update({
    "DilateFormer-S stage3=global": Backbone(partial(dilateformer_s, "global"), SWIN),
    "DilateFormer-S stage3=window": Backbone(partial(dilateformer_s, "window"), SWIN),
    "DilateFormer-S stage3=mixed": Backbone(partial(dilateformer_s, "mixed"), SWIN),
    "DilateFormer-S stage3=mixed, unfold MSDA": Backbone(with_reference(
        partial(dilateformer_s, "mixed"), "dilateformer_reference", "use_unfold_attention"
    ), SWIN),
    "DualFormer-S intra=pool": Backbone(partial(dualformer_s, "pool"), SWIN),
    "DualFormer-S intra=token": Backbone(partial(dualformer_s, "token"), SWIN),
    "DMF-XXS": Backbone(partial(config_backbone, "configs/dmf_xxs_retinanet_1x.yaml"), MOBILENET),
    "DMF-XS": Backbone(partial(config_backbone, "configs/dmf_xs_retinanet_1x.yaml"), MOBILENET),
    "DMF-S, per-sample-loop dynamic conv": Backbone(
        with_reference(DMF_S.build, "dmf_reference", "use_per_sample_loop"), MOBILENET
    ),
    "DMFormer-S branches=fused": Backbone(
        partial(config_backbone, DMFORMER_S, ["MODEL.DMFORMER.BRANCHES", "fused"]), SWIN
    ),
    "DMFormer-S nn.Conv2d branches": Backbone(
        with_plain_depthwise(partial(detector_backbone, "DMFormer-S Mask R-CNN")), SWIN
    ),
    **{
        f"{name} saved GELU": Backbone(with_saved_gelu(BACKBONES[name].build), SWIN)
        for name in ("MixFormer-B4", "DilateFormer-S", "DualFormer-S", "DMFormer-S")
    },
    "MixFormer-B4 3-D bias": Backbone(with_3d_bias(BACKBONES["MixFormer-B4"].build), SWIN),
    "DualFormer-B": Backbone(partial(config_backbone, DUALFORMER_B), SWIN),
    "DualFormer-B USE_CHECKPOINT": Backbone(
        partial(config_backbone, DUALFORMER_B, ["MODEL.DUALFORMER.USE_CHECKPOINT", True]), SWIN
    ),
})  # fmt: skip


def features(outputs: object) -> List[torch.Tensor]:
    """The output maps of a backbone (a dict of them, or one tensor)."""
    return list(outputs.values()) if isinstance(outputs, dict) else [outputs]


def infer(model: nn.Module, image: torch.Tensor) -> None:
    """One forward in eval mode under torch.no_grad."""
    model.eval()
    with torch.no_grad():
        model(image)


def train_step(model: nn.Module, image: torch.Tensor) -> None:
    """Forward and backward (of the sum of every output's mean) in train mode; the gradients
    are dropped after, so that they do not stay allocated while other models run."""
    model.train()
    sum(f.mean() for f in features(model(image))).backward()
    model.zero_grad(set_to_none=True)


def gflops(model: nn.Module, image: torch.Tensor) -> float:
    """fvcore GFLOPs of one image (hybrid_d2's handles; one multiply-add = one FLOP)."""
    model.eval()
    with torch.no_grad():
        analysis = flop_count_analysis(model, image[:1]).unsupported_ops_warnings(False)
        return analysis.uncalled_modules_warnings(False).total() / 1e9


def step_memory(model: nn.Module, image: torch.Tensor, device: str) -> Dict[str, float]:
    """MiB before, and added at the peak of an inference (after a warm-up one) and then of a
    training step."""
    infer(model, image)
    with peak_memory(device) as inference:
        infer(model, image)
    with peak_memory(device) as train:
        train_step(model, image)
    return {"base_mib": inference.base, "inference_mib": inference.added, "train_mib": train.added}


def built(name: str, args: argparse.Namespace) -> nn.Module:
    """Backbone ``name`` on ``args.device``."""
    torch.manual_seed(0)
    return BACKBONES[name].build().to(args.device)


def image_batch(args: argparse.Namespace) -> torch.Tensor:
    """The ``--batch`` noise images every model runs on."""
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(args.batch, 3, args.height, args.width, generator=generator)
    return image.to(args.device)


def backbone_worker(args: argparse.Namespace) -> dict:
    """Peak memory of backbone ``--worker NAME`` in this process (:func:`step_memory`)."""
    return step_memory(built(args.worker, args), image_batch(args), args.device)


def ratio(results: Dict[str, dict], name: str, key: str) -> str:
    """Median ``key`` time per GFLOP of ``name`` over its reference's, or "-" without it."""
    r, ref = results[name], results.get(BACKBONES[name].reference)
    if key not in r or not ref or key not in ref:
        return "-"
    return f"{(r[key]['median'] / r['gflops']) / (ref[key]['median'] / ref['gflops']):.2f}"


def backbone_table(results: Dict[str, dict], memory: str) -> Table:
    """Size, times and their per-GFLOP ratios to each row's reference, memory ("-" where a
    partial run has not measured it yet)."""
    table = Table([
        "model", "params (M)", "GFLOPs", "reference", "inference s, median (min–max)",
        "inference per GFLOP, × reference", "training step s, median (min–max)",
        "training per GFLOP, × reference", f"{memory} added, inference / training (MiB)",
    ])  # fmt: skip
    for name, r in results.items():
        times = [
            f"{r[k]['median']:.3f} ({r[k]['min']:.3f}–{r[k]['max']:.3f})" if k in r else "-"
            for k in ("inference_s", "train_s")
        ]
        mem = f"{r['inference_mib']:.0f} / {r['train_mib']:.0f}" if "train_mib" in r else "-"
        table.rows.append([
            name, f"{r['params_m']:.1f}", f"{r['gflops']:.2f}", BACKBONES[name].reference,
            times[0], ratio(results, name, "inference_s"), times[1],
            ratio(results, name, "train_s"), mem,
        ])  # fmt: skip
    return table


def time_backbones(
    args: argparse.Namespace, results: Dict[str, dict], stage: Callable[[str], None]
) -> Dict[str, nn.Module]:
    """The models, their size and GFLOPs, then their inference and training times (alternating
    rounds) into ``results``; ``stage`` is called after each timing stage."""
    models = {name: built(name, args) for name in args.models}
    image = image_batch(args)
    for name, model in models.items():
        params = sum(p.numel() for p in model.parameters()) / 1e6
        results[name] = {"params_m": params, "gflops": gflops(model, image)}
    sync = synchronizer(args.device)
    for key, call in (("inference_s", infer), ("train_s", train_step)):
        calls = {name: partial(call, model, image) for name, model in models.items()}
        for name, times in alternate(calls, args.warmup, args.rounds, sync, key).items():
            results[name][key] = spread(times)
        stage("the inference rounds" if key == "inference_s" else "the training rounds")
    return models


@mode(
    "backbones",
    height=512,
    width=768,
    warmup=1,
    worker=backbone_worker,
    options=[
        option("--device", default="cpu", help="cpu or cuda"),
        option("--batch", type=int, default=2, help="images per forward"),
        models_option(BACKBONES, DEFAULT_MODELS),
    ],
)
def backbones(args: argparse.Namespace) -> Report:
    """Backbones alone, training and inference, per GFLOP against Swin-T or MobileNetV3-Large.

    Each family's backbone as the detectors mode's detector builds it from its shipped config
    (MixFormer-B4, DilateFormer-S, DualFormer-S, DMFormer-S, DMF-S; the bottom-up network without
    FPN, MODEL.BACKBONE.FREEZE_AT 0, DMF's FROZEN_BLOCKS 0, SyncBN as BatchNorm), Detectron2's
    Swin-T (detectron2.modeling.backbone.swin, as the detectors mode's Swin-T Mask R-CNN) and
    ResNet-50 (its R50-FPN config's, FrozenBN), and torchvision's MobileNetV3-Large (.features,
    random weights), the peer of the mobile DMF. Ratios per GFLOP are to the row's reference:
    Swin-T, MobileNetV3-Large for DMF. Variants on request (--models): DilateFormer-S with each
    stage-3 attention mode and with the official nn.Unfold MSDA, DualFormer-S with each
    intra-partition mode, DMF-XXS/XS, DMF-S with its dynamic convs one sample at a time, DMFormer-S
    with its branches fused and with PyTorch's depth-wise convolution in them, MixFormer-B4,
    DilateFormer-S and DualFormer-S with MLPs that keep the GELU output ("saved GELU"),
    MixFormer-B4 with its attention bias as a 3-D mask (SDPA's math path in inference), and
    DualFormer-B with and without activation checkpointing.

    All models are built in this process; --batch noise images (default 2) at --height x --width.
    Inference: eval mode, torch.no_grad. Training step: train mode, forward + backward of the sum
    of the output maps' means (no optimizer). --warmup untimed and --rounds timed rounds of
    inference, then of training steps; every round runs each model once, in turn. Tables: median
    and range (min-max) in seconds per batch, and "per GFLOP, x reference" = (median / GFLOPs)
    over the reference's. GFLOPs: fvcore with hybrid_d2's handles, one image, one multiply-add =
    one FLOP. Peak memory: after this process has released the models, on CPU a fresh worker per
    model (glibc returning freed blocks): the RSS that an inference (after a warm-up one) and then
    a training step added at their peak; on CUDA torch.cuda.max_memory_allocated over the
    allocated base. With --doc the report is written after each stage, so that a stopped run
    leaves what it measured.
    """
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    memory = "CUDA max allocated" if cuda else "max RSS"
    results: Dict[str, dict] = {}

    def report() -> Report:
        return Report(
            settings=f"{args.device}, {args.threads} threads, {args.batch}x3x{args.height}x"
            f"{args.width}, {args.warmup} warm-up + {args.rounds} rounds of inference, then of "
            "training steps",
            tables=[backbone_table(results, memory)],
            results=results,
        )

    def stage(name: str) -> None:
        if args.doc != "-":
            write_report(report(), args, partial=name)

    models = time_backbones(args, results, stage)
    if cuda:
        image = image_batch(args)
        for name, model in models.items():
            results[name].update(step_memory(model, image, args.device))
    else:
        del models  # the only reference left
        progress(f"  released the models: {release_memory():.0f} MiB resident")
        for name in results:
            results[name].update(run_worker(args, name, memory=True))
    return report()
