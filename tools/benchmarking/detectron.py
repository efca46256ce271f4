"""Detectron2 models for the modes that run them: the benchmarked detectors' configs (with
Detectron2's Swin-T under an FPN), their backbones alone, synthetic inputs, :class:`Runner`
(inference, a training step, GFLOPs, memory) and the latency cells of their tables."""

import argparse
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2 import model_zoo as d2_model_zoo
from detectron2.config import CfgNode, get_cfg
from detectron2.modeling import BACKBONE_REGISTRY, build_backbone, build_model
from detectron2.modeling.backbone import FPN
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.backbone.swin import SwinTransformer
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage
from model_zoo import DummyForward, padded
from torch import nn

from hybrid_d2 import get_config
from hybrid_d2.layers import flop_totals

from .memory import peak_memory
from .paths import REPO_ROOT

DETECTOR_REFERENCE = "R50 Mask R-CNN"
SWIN_T = "Swin-T Mask R-CNN"
D2_R50 = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"
# name: hybrid_d2 config, or None for the Detectron2 references built below
DETECTORS: Dict[str, Optional[str]] = {
    DETECTOR_REFERENCE: None,
    SWIN_T: None,
    "MixFormer-B4 Mask R-CNN": "configs/mixformer_b4_mask_rcnn_1x.yaml",
    "DilateFormer-S Mask R-CNN": "configs/dilateformer_s_mask_rcnn_1x.yaml",
    "DualFormer-S Mask R-CNN": "configs/dualformer_s_mask_rcnn_1x.yaml",
    "DMF-S RetinaNet": "configs/dmf_s_retinanet_1x.yaml",
    "DMFormer-S Mask R-CNN": "configs/dmformer_s_mask_rcnn_1x.yaml",
}


@BACKBONE_REGISTRY.register()
def build_swin_t_fpn_backbone(cfg: CfgNode, input_shape) -> FPN:
    """Detectron2's Swin-T (``detectron2.modeling.backbone.swin``, drop path 0.2) under an FPN
    on its four stages, as ViTDet's and Mask2Former's Swin configs build it."""
    bottom_up = SwinTransformer(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
    return FPN(
        bottom_up=bottom_up,
        in_features=["p0", "p1", "p2", "p3"],
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        top_block=LastLevelMaxPool(),
    )


def without_sync_bn(cfg: CfgNode) -> None:
    """One process trains: SyncBN is BatchNorm (and CUDA's SyncBatchNorm needs a process group)."""
    for key, value in cfg.items():
        if isinstance(value, CfgNode):
            without_sync_bn(value)
        elif value == "SyncBN":
            cfg[key] = "BN"


def detector_config(name: str, device: str) -> CfgNode:
    """The config of a benchmarked detector with score thresholds 0 (``detectors --help``)."""
    path = DETECTORS[name]
    if path is None:
        cfg = get_cfg()
        cfg.merge_from_file(d2_model_zoo.get_config_file(D2_R50))
        if name != DETECTOR_REFERENCE:
            cfg.MODEL.BACKBONE.NAME = "build_swin_t_fpn_backbone"
            cfg.MODEL.PIXEL_MEAN = [123.675, 116.28, 103.53]
            cfg.MODEL.PIXEL_STD = [58.395, 57.12, 57.375]
            cfg.INPUT.FORMAT = "RGB"
    else:
        cfg = get_config(os.path.join(REPO_ROOT, path))
    cfg.MODEL.DEVICE = device
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0
    without_sync_bn(cfg)
    return cfg


def bottom_up(cfg: CfgNode) -> nn.Module:
    """The bottom-up network (no FPN) that ``cfg`` builds, with nothing frozen:
    ``MODEL.BACKBONE.FREEZE_AT`` 0 (and DMF's ``FROZEN_BLOCKS`` 0)."""
    cfg = cfg.clone()
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    if "DMF" in cfg.MODEL:
        cfg.MODEL.DMF.FROZEN_BLOCKS = 0
    torch.manual_seed(0)
    return build_backbone(cfg).bottom_up


def detector_backbone(name: str) -> nn.Module:
    """The bottom-up network of benchmarked detector ``name`` (:func:`bottom_up`)."""
    return bottom_up(detector_config(name, "cpu"))


def config_backbone(path: str, overrides: Sequence[object] = ()) -> nn.Module:
    """The bottom-up network of hybrid_d2 config ``path`` with ``overrides`` (KEY VALUE ...;
    :func:`bottom_up`), one-process norms."""
    cfg = get_config(os.path.join(REPO_ROOT, path))
    cfg.merge_from_list(list(overrides))
    without_sync_bn(cfg)
    return bottom_up(cfg)


def synthetic_batch(images: int, height: int, width: int, device: str, train: bool) -> List[dict]:
    """``images`` noise images; with ``train``, 5 instances each (boxes, classes, masks)."""
    generator = torch.Generator().manual_seed(0)
    batch = []
    for _ in range(images):
        image = torch.randint(0, 256, (3, height, width), generator=generator).float()
        item = {"image": image.to(device), "height": height, "width": width}
        if train:
            corner = torch.rand(5, 2, generator=generator) * torch.tensor([width, height]) * 0.6
            boxes = torch.cat([corner, corner + torch.tensor([width, height]) * 0.3], 1)
            masks = torch.zeros(5, height, width, dtype=torch.bool)
            for mask, (x0, y0, x1, y1) in zip(masks, boxes.round().long().tolist()):
                mask[y0:y1, x0:x1] = True
            instances = Instances(
                (height, width),
                gt_boxes=Boxes(boxes),
                gt_classes=torch.randint(0, 80, (5,), generator=generator),
                gt_masks=BitMasks(masks),
            )
            item["instances"] = instances.to(device)
        batch.append(item)
    return batch


class Runner:
    """One Detectron2 model with its inputs: ``infer`` (batch 1) and, with ``train``,
    ``train_step`` (batch 2 of a detector's synthetic instances)."""

    def __init__(self, cfg: CfgNode, args: argparse.Namespace, amp: bool, train: bool = True):
        torch.manual_seed(0)
        self.model = build_model(cfg)
        self.device, self.amp = cfg.MODEL.DEVICE, amp
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-5, momentum=0.9)
        self.image = synthetic_batch(1, args.height, args.width, self.device, train=False)
        self.train_batch = (
            synthetic_batch(2, args.height, args.width, self.device, train=True) if train else None
        )

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.split(":")[0], dtype=torch.float16, enabled=self.amp)

    def infer(self) -> None:
        """One inference of the batch-1 image, eval mode, no_grad."""
        self.model.eval()
        with torch.no_grad(), self._autocast():
            self.model(self.image)

    def train_step(self) -> None:
        """Forward, backward and an SGD step on the training batch; the gradients are dropped
        after the step, so that they do not stay allocated while other models run."""
        self.model.train()
        with EventStorage(), self._autocast():
            losses = self.model(self.train_batch)
        sum(losses.values()).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def gflops(self) -> float:
        """fvcore GFLOPs with tools/model_zoo.py's protocol at the input size."""
        height, width = self.image[0]["height"], self.image[0]["width"]
        self.model.eval()
        with torch.no_grad():
            image = torch.zeros(1, 3, *padded((height, width)), device=self.device)
            return flop_totals(DummyForward(self.model, (height, width)), image)["fvcore"] / 1e9

    def memory(self) -> Dict[str, float]:
        """MiB before, and added at the peak of one inference and one training step."""
        with peak_memory(self.device) as inference:
            self.infer()
        with peak_memory(self.device) as train:
            self.train_step()
        return {
            "base_mib": inference.base,
            "inference_mib": inference.added,
            "train_mib": train.added,
        }


def reference_first(models: List[str], reference: str) -> List[str]:
    """``models`` with ``reference`` first; exits if it is missing (the ratios are to it)."""
    if reference not in models:
        raise SystemExit(f"--models must include {reference!r} (the ratios are to it)")
    return [reference] + [m for m in models if m != reference]


def device_settings(args: argparse.Namespace) -> Dict[str, Tuple[str, bool]]:
    """Setting title: (device, AMP): CPU fp32, and with a GPU (unless ``--no-cuda``) CUDA fp32
    and AMP (float16 autocast)."""
    settings = {f"CPU, {args.threads} threads, fp32": ("cpu", False)}
    if torch.cuda.is_available() and not args.no_cuda:
        settings.update({"CUDA fp32": ("cuda", False), "CUDA AMP (float16)": ("cuda", True)})
    return settings


LATENCY_COLUMNS = [
    "GFLOPs", "× R50 FLOPs", "latency s, median (min–max)", "× R50 latency",
    "× R50 latency per GFLOP",
]  # fmt: skip


def cost_per_gflop(result: dict, reference: dict, key: str = "latency_s") -> float:
    """The median time ``key`` per GFLOP of ``result`` over that of ``reference``."""
    return (result[key]["median"] / result["gflops"]) / (
        reference[key]["median"] / reference["gflops"]
    )


def latency_cells(result: dict, reference: dict) -> List[str]:
    """The :data:`LATENCY_COLUMNS` cells of ``result``: GFLOPs, latency and their ratios to
    ``reference``'s (latency per GFLOP above 1.3 in bold)."""
    lat, ref_lat = result["latency_s"], reference["latency_s"]
    per_gflop = cost_per_gflop(result, reference)
    bold = "**" if per_gflop > 1.3 else ""
    return [
        f"{result['gflops']:.0f}", f"{result['gflops'] / reference['gflops']:.2f}",
        f"{lat['median']:.2f} ({lat['min']:.2f}–{lat['max']:.2f})",
        f"{lat['median'] / ref_lat['median']:.2f}", f"{bold}{per_gflop:.2f}{bold}",
    ]  # fmt: skip
