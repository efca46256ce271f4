"""The numbers tools/model_zoo.py and tools/plot_model_zoo.py compare against: the papers' COCO
rows and each backbone's recorded parameter count. Every value names its source."""

from typing import Dict, NamedTuple, Optional, Tuple


class PaperRow(NamedTuple):
    """One row of a paper's COCO table (whole detector) or ADE20K table (whole segmentor, the
    auxiliary head included in the parameters, not in the FLOPs, as mmseg's get_flops)."""

    source: str  # paper and table
    params_m: Optional[float]  # millions, as printed
    gflops: Optional[float]  # as printed
    flop_convention: str  # the counter the paper used: "mmcv" or "fvcore"
    size: Tuple[int, int]  # (H, W) of the paper's FLOP count
    box_ap: Optional[float]
    mask_ap: Optional[float] = None
    trainable_params: bool = False  # the paper counted trainable parameters only
    note: str = ""  # a known reason why our model's size differs from the paper's
    miou: Optional[str] = None  # ADE20K mIoU as printed: "ss / ms", or "ss" alone


MMDET_CASCADE = (
    "Detectron2's standard cascade heads (3x 2fc) against mmdetection's 4conv1fc heads of the "
    "paper (about 11M more parameters)"
)
DMF_SIZE = (800, 1333)  # DMF Tables 4-5: "FLOPs(G) are measured at resolution 800x1333"
SWIN_SIZE = (800, 1280)  # Swin's convention, which MixFormer, DilateFormer and DualFormer follow

# Keyed by config name without ".yaml". Mask R-CNN 1x rows give the 1x AP, 3x rows the 3x+MS AP.
PAPER_ROWS: Dict[str, PaperRow] = {}


def _mask_rcnn(prefix: str, source: str, params, gflops, ap_1x, ap_3x, convention, **kw) -> None:
    size = kw.pop("size", SWIN_SIZE)
    for schedule, (box, mask) in (("1x", ap_1x), ("3x", ap_3x)):
        PAPER_ROWS[f"{prefix}_mask_rcnn_{schedule}"] = PaperRow(
            source, params, gflops, convention, size, box, mask, **kw
        )


for _v, _p, _f, _ap1, _ap3 in (
    ("b1", 26, 183, (40.6, 37.5), (43.9, 40.0)),
    ("b2", 28, 187, (41.5, 38.3), (45.1, 40.8)),
    ("b3", 35, 207, (42.8, 39.3), (46.2, 41.9)),
    ("b4", 53, 243, (45.1, 41.2), (47.6, 43.0)),
):
    _mask_rcnn(f"mixformer_{_v}", "MixFormer Table 4", _p, _f, _ap1, _ap3, "mmcv")
PAPER_ROWS["mixformer_b4_cascade_mask_rcnn_3x"] = PaperRow(
    "MixFormer Table 5", 91, 721, "mmcv", SWIN_SIZE, 51.6, 44.9, note=MMDET_CASCADE
)
for _v, _p, _f, _ap1, _ap3 in (
    ("s", 44, 262, (45.8, 41.7), (49.0, 43.7)),
    ("b", 67, 370, (47.6, 43.4), (49.9, 44.5)),
):
    _mask_rcnn(f"dilateformer_{_v}", "DilateFormer Table IV", _p, _f, _ap1, _ap3, "mmcv")
PAPER_ROWS["dilateformer_s_cascade_mask_rcnn_3x"] = PaperRow(
    "DilateFormer Table V", 82, 740, "mmcv", SWIN_SIZE, 52.4, 45.2, note=MMDET_CASCADE
)
PAPER_ROWS["dilateformer_b_cascade_mask_rcnn_3x"] = PaperRow(
    "DilateFormer Table V", 105, 849, "mmcv", SWIN_SIZE, 53.5, 46.1, note=MMDET_CASCADE
)
_DUALFORMER_NOTE = (
    "no official code: our reading (MHPA design, PVTv2's FFN ratios) reproduces Table 1's "
    "classifier params within 4% and FLOPs within 4% (B: 11% under) (docs/dualformer.md); the "
    "paper's detector counts come from MPViT's Detectron2 code"
)
for _v, _p, _f, _ap1, _ap3 in (
    ("t", 25, 208, (42.4, 39.2), (45.1, 41.2)),
    ("xs", 29, 219, (44.6, 40.8), (47.0, 42.5)),
    ("s", 43, 258, (46.8, 42.6), (48.6, 44.0)),
    ("b", 95, 495, (48.5, 43.6), (49.6, 44.6)),
):
    _mask_rcnn(
        f"dualformer_{_v}",
        "DualFormer Table 3",
        _p,
        _f,
        _ap1,
        _ap3,
        "fvcore",
        note=_DUALFORMER_NOTE,
    )
for _v, _p, _f, _ap in (("xxs", 17.4, 160, 35.3), ("xs", 20.2, 161, 37.3), ("s", 23.6, 165, 39.0)):
    PAPER_ROWS[f"dmf_{_v}_retinanet_1x"] = PaperRow(
        "DMF Table 4", _p, _f, "mmcv", DMF_SIZE, _ap, trainable_params=True
    )
_mask_rcnn(
    "dmf_s",
    "DMF Table 5",
    34.2,
    181,
    (39.8, 37.1),
    (42.4, 39.0),
    "mmcv",
    size=DMF_SIZE,
    trainable_params=True,
)

# ADE20K rows (512x2048 FLOPs, mmseg get_flops = mmcv's counter). Keyed by configs/ade20k names.
ADE_SIZE = (512, 2048)
_DUALFORMER_ADE_NOTE = (
    "the paper's DualFormer-S total (48M) is below its own backbone (Table 1: 22.6M with the "
    "classifier) plus mmseg's UperNet heads for its channels (30.5M); DualFormer has no official "
    "code (docs/segmentation.md)"
)
for _name, _source, _p, _f, _miou in (
    ("mixformer_b1_upernet_160k", "MixFormer Table 6", 35, 854, "42.0 / 43.5"),
    ("mixformer_b2_upernet_160k", "MixFormer Table 6", 37, 859, "43.1 / 43.9"),
    ("mixformer_b3_upernet_160k", "MixFormer Table 6", 44, 880, "44.5 / 45.5"),
    ("mixformer_b4_upernet_160k", "MixFormer Table 6", 63, 918, "46.8 / 48.0"),
    ("dilateformer_s_upernet_160k", "DilateFormer Table VI", 54, 935, "47.1 / 47.6"),
    ("dilateformer_b_upernet_160k", "DilateFormer Table VI", 79, 1046, "50.8 / 51.1"),
    ("dilateformer_s_semfpn_80k", "DilateFormer Table VI", 28, 178, "47.1"),
    ("dilateformer_b_semfpn_80k", "DilateFormer Table VI", 51, 288, "48.8"),
    ("dualformer_s_upernet_80k", "DualFormer Table 4", 48, 922, "48.6"),
    ("dualformer_b_upernet_80k", "DualFormer Table 4", 104, 1150, "50.5"),
    ("dmformer_s_semfpn_40k", "DMFormer Table 4", 30.4, None, "47.2"),
    ("dmformer_s_upernet_160k", "DMFormer Table 4", 56.6, None, "47.6 (ss or ms not stated)"),
):
    PAPER_ROWS[_name] = PaperRow(
        _source, _p, _f, "mmcv", ADE_SIZE, None, miou=_miou,
        note=_DUALFORMER_ADE_NOTE if _name.startswith("dualformer") else "",
    )

# Reference detectors (Swin's Table 3 numbers, as MixFormer Table 4 and DilateFormer Table IV
# print them): Mask R-CNN FPN 1x.
REFERENCE_ROWS: Dict[str, PaperRow] = {
    "ResNet-50": PaperRow("MixFormer Table 4 (from Swin)", 44, 260, "mmcv", SWIN_SIZE, 38.0, 34.4),
    "Swin-T": PaperRow("MixFormer Table 4 (from Swin)", 48, 264, "mmcv", SWIN_SIZE, 42.2, 39.1),
}

# Parameters of each backbone network (``D2<Family>.net``: stem, stages and downsamplers; no
# output norms, no classifier; BatchNorm affines counted, i.e. built with NORM "BN"), per variant.
# Sources: the design notes' exact counts of the official architecture (MixFormer "backbone only
# (stem + stages + merges)", DilateFormer "Backbone-only params", DMFormer "Backbone-only params
# (no classifier, no output norms)"); DMF's note gives 16.502M / 12.995M / 10.187M (its
# classification network without end_*, channel_conv, bn, head) and DualFormer's has no official
# code, so those two record our count at the time this table was written, which matches the
# notes' rounded values.
BACKBONE_PARAMS: Dict[str, Dict[str, int]] = {
    "mixformer": {
        "b0": 3_570_343,
        "b1": 6_277_405,
        "b2": 8_284_376,
        "b3": 14_973_240,
        "b4": 32_858_908,
        "b5": 59_425_547,
        "b6": 117_238_198,
    },
    "dilateformer": {"tiny": 16_660_592, "small": 23_479_352, "base": 46_661_840},
    "dualformer": {
        "tiny": 5_378_120,
        "xsmall": 10_498_286,
        "small": 21_550_202,
        "base": 73_260_143,
    },
    "dmf": {"xxs": 10_186_528, "xs": 12_994_852, "s": 16_502_332},
    "dmformer": {"s": 26_102_080, "l": 44_391_040},
}
