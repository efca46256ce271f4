#!/usr/bin/env python
"""Size and FLOPs of every experiment config against the papers, written into docs/MODEL_ZOO.md.

    python tools/model_zoo.py                       # all configs/*.yaml, rewrites docs/MODEL_ZOO.md
    python tools/model_zoo.py --configs "configs/mixformer_*" --height 64 --width 96 --output -
    python tools/model_zoo.py --check               # backbone params against the recorded counts
    python tools/model_zoo.py --section ade20k      # configs/ade20k/*.yaml, the ADE20K table

FLOP protocol (mmdetection's ``forward_dummy``, behind the papers' ``get_flops`` numbers): one
image of the paper's size (Mask R-CNN and Cascade 800x1280, RetinaNet and DMF's rows 800x1333;
padded to a multiple of 32 as Detectron2 pads it), through backbone and FPN, the dense heads
(RPN or RetinaNet), the box head on NUM_BOXES fixed boxes (every stage of a cascade) and the mask
or keypoint head on the first NUM_MASKS of them. Counted in two conventions
(``hybrid_d2.layers.flops``): fvcore's, and mmcv's (no attention products, no dynamic kernels).
Segmentation (mmseg's ``forward_dummy``): one 512x2048 image through the backbone and the decode
head, without UperNet's auxiliary head (its parameters are counted, as mmseg's get_flops does).
Only the text between the BEGIN and END markers of the section (coco or ade20k) is rewritten.
"""

import warnings

warnings.filterwarnings(  # Detectron2's dependencies' torch.jit use, at import time
    "ignore", r"`torch\.jit\.(script|interface)` is deprecated", FutureWarning, r"torch\.jit\."
)

import argparse
import glob
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, build_model
from detectron2.modeling.meta_arch import RetinaNet, SemanticSegmentor
from detectron2.structures import Boxes
from fvcore.nn import parameter_count
from torch import nn
from tqdm import tqdm

from hybrid_d2 import get_config
from hybrid_d2.layers import FAMILIES as REGISTERED_FAMILIES
from hybrid_d2.layers import flop_totals

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from doc_markers import replace_between, write_between  # noqa: E402
from model_zoo_data import BACKBONE_PARAMS, PAPER_ROWS, PaperRow  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(REPO_ROOT, "docs", "MODEL_ZOO.md")
BEGIN, END = "<!-- model_zoo.py: begin -->", "<!-- model_zoo.py: end -->"
# section: (begin marker, end marker, default config glob)
SECTIONS = {
    "coco": (BEGIN, END, os.path.join(REPO_ROOT, "configs", "*.yaml")),
    "ade20k": (
        "<!-- model_zoo.py ade20k: begin -->",
        "<!-- model_zoo.py ade20k: end -->",
        os.path.join(REPO_ROOT, "configs", "ade20k", "*.yaml"),
    ),
}
NUM_BOXES, NUM_MASKS = 1000, 100  # mmdetection's forward_dummy
PARAMS_TOLERANCE, FLOPS_TOLERANCE = 0.03, 0.05
# family: (config node, variant table, BottomUp builder) for --check, of every registered family
FAMILIES = {
    name: (family.config_key, family.variants, family.builder_name)
    for name, family in REGISTERED_FAMILIES.items()
}


def load_config(path: str, opts: Sequence[str] = ()) -> CfgNode:
    return get_config(path, ["MODEL.DEVICE", "cpu", *opts])


def experiment_configs(patterns: Sequence[str]) -> List[str]:
    """The experiment configs matching ``patterns`` (globs), without the Base-* files."""
    paths = sorted({p for pattern in patterns for p in glob.glob(pattern)})
    paths = [
        p for p in paths if p.endswith(".yaml") and not os.path.basename(p).startswith("Base-")
    ]
    if not paths:
        raise SystemExit(f"model_zoo: no experiment config matches {list(patterns)}")
    return paths


def backbone_network_params(family: str, variant: str) -> int:
    """Parameters of ``D2<Family>.net`` of ``variant`` with trainable BatchNorms (no output norms)."""
    node, _, builder = FAMILIES[family]
    cfg = get_config(
        os.path.join(REPO_ROOT, "configs", "Base-Hybrid.yaml"),
        [
            "MODEL.DEVICE",
            "cpu",
            f"MODEL.{node}.VARIANT",
            variant,
            f"MODEL.{node}.NORM",
            "BN",
            "MODEL.BACKBONE.FREEZE_AT",
            "0",
        ],
    )
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        backbone = BACKBONE_REGISTRY.get(builder)(cfg, ShapeSpec(channels=3))
    return parameter_count(backbone.net)[""]


def check(families: Sequence[str] = tuple(FAMILIES)) -> List[str]:
    """One line per family variant whose backbone parameters differ from BACKBONE_PARAMS."""
    errors = []
    for family in families:
        variants = FAMILIES[family][1]
        recorded = BACKBONE_PARAMS[family]
        for variant in sorted(variants):
            if variant not in recorded:
                errors.append(f"{family} {variant}: no recorded count in tools/model_zoo_data.py")
                continue
            got = backbone_network_params(family, variant)
            if got != recorded[variant]:
                errors.append(
                    f"{family} {variant}: expected {recorded[variant]:,} params, got {got:,}"
                )
    return errors


class DummyForward(nn.Module):
    """The detector's layers as mmdetection's ``forward_dummy`` runs them (module docstring)."""

    def __init__(self, model: nn.Module, size: Tuple[int, int]):
        super().__init__()
        self.model = model
        generator = torch.Generator().manual_seed(0)
        height, width = size
        corner = torch.rand(NUM_BOXES, 2, generator=generator) * torch.tensor([width, height]) * 0.8
        extent = (
            16 + torch.rand(NUM_BOXES, 2, generator=generator) * torch.tensor([width, height]) * 0.2
        )
        self.register_buffer("boxes", torch.cat([corner, corner + extent], 1), persistent=False)

    def forward(self, image: torch.Tensor) -> List[torch.Tensor]:
        model = self.model
        features = model.backbone(image)
        if isinstance(model, SemanticSegmentor):  # decode head only (no auxiliary head)
            return [model.sem_seg_head.layers(features)]
        if isinstance(model, RetinaNet):
            return _flatten(model.head([features[f] for f in model.head_in_features]))
        rpn, heads = model.proposal_generator, model.roi_heads
        outputs = _flatten(rpn.rpn_head([features[f] for f in rpn.in_features]))
        pooled = heads.box_pooler([features[f] for f in heads.box_in_features], [Boxes(self.boxes)])
        box_heads = (
            heads.box_head if isinstance(heads.box_head, nn.ModuleList) else [heads.box_head]
        )
        predictors = heads.box_predictor
        predictors = predictors if isinstance(predictors, nn.ModuleList) else [predictors]
        for box_head, predictor in zip(box_heads, predictors):
            outputs += _flatten(predictor(box_head(pooled)))
        some = [Boxes(self.boxes[:NUM_MASKS])]
        for on, name in ((heads.mask_on, "mask"), (heads.keypoint_on, "keypoint")):
            if on:
                pooler = getattr(heads, f"{name}_pooler")
                in_features = getattr(heads, f"{name}_in_features")
                outputs.append(
                    getattr(heads, f"{name}_head").layers(
                        pooler([features[f] for f in in_features], some)
                    )
                )
        return outputs


def _flatten(outputs) -> List[torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    return [t for item in outputs for t in _flatten(item)]


def flop_size(cfg: CfgNode, paper: Optional[PaperRow]) -> Tuple[int, int]:
    """The paper's (H, W) for this row; else 512x2048 for segmentors, 800x1333 for RetinaNet,
    800x1280 otherwise."""
    if paper is not None:
        return paper.size
    if cfg.MODEL.META_ARCHITECTURE == "SemanticSegmentor":
        return (512, 2048)
    return (800, 1333) if cfg.MODEL.META_ARCHITECTURE == "RetinaNet" else (800, 1280)


def padded(size: Tuple[int, int], divisibility: int = 32) -> Tuple[int, int]:
    return tuple(-(-side // divisibility) * divisibility for side in size)


def detector_stats(cfg: CfgNode, size: Tuple[int, int]) -> Dict[str, float]:
    """Parameters (all, trainable, backbone) and FLOPs (fvcore, mmcv) of the detector at ``size``."""
    model = build_model(cfg).eval()
    bottom_up = getattr(model.backbone, "bottom_up", model.backbone)
    with torch.no_grad():
        flops = flop_totals(DummyForward(model, size), torch.zeros(1, 3, *padded(size)))
    return {
        "params": parameter_count(model)[""],
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "backbone_params": parameter_count(bottom_up)[""],
        "gflops_fvcore": flops["fvcore"] / 1e9,
        "gflops_mmcv": flops["mmcv"] / 1e9,
    }


def _relative(ours: float, paper: Optional[float]) -> Optional[float]:
    return None if paper is None else ours / paper - 1


def _percent(value: Optional[float]) -> str:
    return "—" if value is None else f"{100 * value:+.1f}%"


def table_rows(
    stats: Dict[str, Dict[str, float]], sizes: Dict[str, Tuple[int, int]]
) -> Tuple[List[str], List[str]]:
    """Markdown rows and footnotes (one per row outside tolerance)."""
    rows, notes = [], []
    for name, s in stats.items():
        paper = PAPER_ROWS.get(name)
        params = s["trainable"] if paper and paper.trainable_params else s["params"]
        d_params = _relative(params / 1e6, paper.params_m if paper else None)
        ours_flops = s[f"gflops_{paper.flop_convention}"] if paper else None
        comparable = paper and paper.gflops and sizes[name] == paper.size
        d_flops = _relative(ours_flops, paper.gflops) if comparable else None
        out = [
            k
            for k, d, tol in (
                ("params", d_params, PARAMS_TOLERANCE),
                ("FLOPs", d_flops, FLOPS_TOLERANCE),
            )
            if d is not None and abs(d) > tol
        ]
        flag = ""
        if out:
            notes.append(
                f"{' and '.join(out)} of `{name}` outside tolerance: "
                + (paper.note or "no known reason; unexplained")
                + "."
            )
            flag = f" [{len(notes)}]"
        counted = f"{s['params'] / 1e6:.2f}" + (
            f" ({s['trainable'] / 1e6:.2f} trainable)" if s["trainable"] != s["params"] else ""
        )
        ap = "—"
        if paper and paper.miou is not None:
            ap = f"mIoU {paper.miou}"
        elif paper and paper.box_ap is not None:
            ap = f"{paper.box_ap}" + (f" / {paper.mask_ap}" if paper.mask_ap is not None else "")
        paper_size = (
            f"{paper.params_m}M, {paper.gflops or '—'}G ({paper.flop_convention}), {paper.source}"
            if paper
            else "—"
        )
        h, w = sizes[name]
        rows.append(
            f"| `{name}`{flag} | {s['backbone_params'] / 1e6:.2f} | {counted} | {h}×{w} | "
            f"{s['gflops_fvcore']:.1f} | {s['gflops_mmcv']:.1f} | {paper_size} | {ap} | "
            f"{_percent(d_params)} | {_percent(d_flops)} |"
        )
    return rows, notes


def render(
    stats: Dict[str, Dict[str, float]],
    sizes: Dict[str, Tuple[int, int]],
    command: str,
    section: str = "coco",
) -> str:
    rows, notes = table_rows(stats, sizes)
    model, metric = ("segmentor", "mIoU") if section == "ade20k" else ("detector", "box / mask AP")
    header = (
        f"| config | backbone params (M) | {model} params (M) | FLOP size | GFLOPs fvcore | "
        f"GFLOPs mmcv | paper params, GFLOPs (convention), source | paper {metric} | "
        "Δ params | Δ FLOPs |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    footnotes = "".join(f"\n{i}. {note}" for i, note in enumerate(notes, 1))
    return (
        f"Generated by `{command}`.\n\n{header}\n"
        + "\n".join(rows)
        + "\n"
        + (
            f"\nRows outside tolerance (params ±{PARAMS_TOLERANCE:.0%}, FLOPs ±{FLOPS_TOLERANCE:.0%} in "
            f"the paper's convention):\n{footnotes}\n"
            if notes
            else "\nAll rows within tolerance.\n"
        )
    )


def replace_generated(
    text: str, generated: str, path: str, begin: str = BEGIN, end: str = END
) -> str:
    """``text`` with the part between ``begin`` and ``end`` replaced by ``generated``."""
    return replace_between(text, generated, path, (begin, end), "model_zoo")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--section",
        choices=list(SECTIONS),
        default="coco",
        help="table to write: coco (detection, configs/*.yaml) or ade20k (configs/ade20k/*.yaml)",
    )
    parser.add_argument(
        "--configs",
        nargs="+",
        help="config globs (default: every experiment config of the section)",
    )
    parser.add_argument("--height", type=int, help="FLOP input height instead of the paper's")
    parser.add_argument("--width", type=int, help="FLOP input width instead of the paper's")
    parser.add_argument("--output", default=DOC, help="markdown file to update, or - for stdout")
    parser.add_argument(
        "--check", action="store_true", help="only compare backbone params with the recorded counts"
    )
    parser.add_argument(
        "--families",
        nargs="+",
        choices=list(FAMILIES),
        default=list(FAMILIES),
        help="families for --check (default: all)",
    )
    args = parser.parse_args(argv)
    if args.check:
        errors = check(args.families)
        for error in errors:
            print(f"model_zoo --check: {error}", file=sys.stderr)
        print(f"model_zoo --check: {'FAILED' if errors else 'ok'}", file=sys.stderr)
        return 1 if errors else 0
    if (args.height is None) != (args.width is None):
        parser.error("--height and --width go together")
    begin, end, default_configs = SECTIONS[args.section]
    stats, sizes, counted = {}, {}, {}
    for path in tqdm(
        experiment_configs(args.configs or [default_configs]), desc="model_zoo", unit="config"
    ):
        name = os.path.splitext(os.path.basename(path))[0]
        cfg = load_config(path)
        sizes[name] = (
            (args.height, args.width) if args.height else flop_size(cfg, PAPER_ROWS.get(name))
        )
        key = (cfg.MODEL.dump(), sizes[name])  # 1x and 3x configs share their model
        if key not in counted:
            counted[key] = detector_stats(cfg, sizes[name])
        stats[name] = counted[key]
    command = "python tools/model_zoo.py " + " ".join(argv if argv is not None else sys.argv[1:])
    generated = render(stats, sizes, command.strip(), args.section)
    if args.output == "-":
        print(generated)
        return 0
    write_between(args.output, generated, (begin, end), "model_zoo")
    return 0


if __name__ == "__main__":
    sys.exit(main())
