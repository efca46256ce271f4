"""UperNet, its auxiliary FCN head and Semantic FPN: mmsegmentation's sizes, shapes, losses."""
import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY, Backbone, build_model
from detectron2.modeling.backbone.fpn import FPN
from detectron2.utils.events import EventStorage
from fvcore.nn import parameter_count

from conftest import REPO_ROOT, load_config
from hybrid_d2.layers import FAMILIES
from hybrid_d2.segmentation import SemanticFPNHead, UperNetHead, sem_seg_loss

SWIN_T_CHANNELS = (96, 192, 384, 768)
RES = ("res2", "res3", "res4", "res5")
# mmsegmentation's heads for Swin-T channels and ADE20K's 150 classes, counted by building
# mmseg's modules (design note §5.5); Swin's upernet_swin_tiny total is 59.94M = 28.02M + these.
UPERNET_DECODE_PARAMS = 31_497_366
FCN_AUX_PARAMS = 923_798
SEMANTIC_FPN_NECK_AND_HEAD_PARAMS = 4_373_142


def _shapes(channels=SWIN_T_CHANNELS):
    return {name: ShapeSpec(channels=c, stride=4 * 2**i) for i, (name, c) in enumerate(zip(RES, channels))}


def _upernet(channels=SWIN_T_CHANNELS, num_classes=150, **kwargs):
    args = dict(in_features=RES, num_classes=num_classes, aux_in_feature="res4", norm="BN")
    return UperNetHead(_shapes(channels), **{**args, **kwargs})


def _features(batch, height, width, channels=SWIN_T_CHANNELS):
    return {
        name: torch.randn(batch, c, -(-height // (4 * 2**i)), -(-width // (4 * 2**i)))
        for i, (name, c) in enumerate(zip(RES, channels))
    }


class _PyramidOf(Backbone):
    """A bottom-up network with given pyramid channels (1x1 convs of the image), for the neck."""

    def __init__(self, channels):
        super().__init__()
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(3, c, 1) for c in channels)
        self._shapes = _shapes(channels)

    def forward(self, x):
        return {n: conv(F.avg_pool2d(x, s.stride)) for (n, s), conv in zip(self._shapes.items(), self.convs)}

    def output_shape(self):
        return self._shapes


def test_upernet_decode_and_auxiliary_heads_have_mmsegs_sizes():
    head = _upernet()
    counts = parameter_count(head)
    assert counts[""] - counts["aux_head"] == UPERNET_DECODE_PARAMS
    assert counts["aux_head"] == FCN_AUX_PARAMS
    assert counts["ppm"] == 4 * (768 * 512 + 2 * 512) + (768 + 4 * 512) * 512 * 9 + 2 * 512


def test_semantic_fpn_neck_and_head_have_mmsegs_size():
    cfg = load_config(REPO_ROOT / "configs/ade20k/dilateformer_b_semfpn_80k.yaml")
    neck = FPN(_PyramidOf(SWIN_T_CHANNELS), list(RES), out_channels=256, norm="", top_block=None)
    head = SEM_SEG_HEADS_REGISTRY.get("SemanticFPNHead")(cfg, neck.output_shape())
    total = parameter_count(neck)[""] - parameter_count(neck.bottom_up)[""] + parameter_count(head)[""]
    assert total == SEMANTIC_FPN_NECK_AND_HEAD_PARAMS
    assert isinstance(head, SemanticFPNHead) and head.dropout.p == 0.1


@pytest.mark.parametrize("size", [(32, 32), (64, 96), (96, 64)])
def test_upernet_inference_is_logits_at_the_input_size_without_the_aux_head(size):
    head = _upernet(num_classes=7).eval()
    called = []
    head.aux_head.register_forward_hook(lambda *args: called.append(True))
    with torch.no_grad():
        logits, losses = head(_features(2, *size))
    assert tuple(logits.shape) == (2, 7, *size) and losses == {}
    assert not called


def test_upernet_training_losses_include_the_weighted_aux_loss():
    torch.manual_seed(0)
    head = _upernet(num_classes=5, dropout=0.0).train()
    features = _features(2, 64, 96)
    targets = torch.randint(0, 5, (2, 64, 96))
    targets[:, :8] = 255
    _, losses = head(features, targets)
    assert set(losses) == {"loss_sem_seg", "loss_sem_seg_aux"}
    aux_logits = head.aux_head(features["res4"])
    assert torch.allclose(losses["loss_sem_seg_aux"], 0.4 * sem_seg_loss(aux_logits, targets, 255, False))
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in head.parameters())


def test_loss_averages_over_every_pixel_as_mmseg_or_over_labelled_ones():
    logits = torch.randn(1, 3, 4, 4)
    targets = torch.randint(0, 3, (1, 4, 4))
    targets[:, :2] = 255  # half the pixels unlabelled
    labelled = F.cross_entropy(logits, targets, ignore_index=255)
    assert torch.allclose(sem_seg_loss(logits, targets, 255, avg_non_ignore=True), labelled)
    assert torch.allclose(sem_seg_loss(logits, targets, 255, avg_non_ignore=False), labelled / 2)
    assert sem_seg_loss(logits, torch.full_like(targets, 255), 255, False) == 0


def test_missing_input_feature_is_named():
    cfg = load_config(REPO_ROOT / "configs/ade20k/mixformer_b1_upernet_160k.yaml", ["MODEL.SEM_SEG_HEAD.AUX.IN_FEATURE", "res6"])
    with pytest.raises(ValueError, match=r"MODEL.SEM_SEG_HEAD.AUX.IN_FEATURE=\['res6'\]: the backbone has no"):
        SEM_SEG_HEADS_REGISTRY.get("UperNetHead")(cfg, _shapes())


# Both heads over every family's smallest variant, as a config that swaps MODEL.FPN.BOTTOM_UP
# builds them (DMF has no ADE20K paper row); heads narrowed to 64/32 channels for speed.
HEAD_CONFIGS = {"upernet": "dmformer_s_upernet_160k.yaml", "semfpn": "dmformer_s_semfpn_40k.yaml"}
NARROW = [
    "MODEL.SEM_SEG_HEAD.NUM_CLASSES", 5,
    "MODEL.SEM_SEG_HEAD.UPERNET.CHANNELS", 64,
    "MODEL.SEM_SEG_HEAD.AUX.CHANNELS", 32,
    "MODEL.SEM_SEG_HEAD.CONVS_DIM", 32,
    "MODEL.FPN.OUT_CHANNELS", 64,
]  # fmt: skip


@pytest.mark.parametrize("head", sorted(HEAD_CONFIGS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_both_heads_train_and_infer_over_every_family(family, head):
    variant = next(iter(FAMILIES[family].variants))
    swap = ["MODEL.FPN.BOTTOM_UP", f"build_{family}_backbone", f"MODEL.{family.upper()}.VARIANT", variant]
    torch.manual_seed(0)
    model = build_model(load_config(REPO_ROOT / "configs/ade20k" / HEAD_CONFIGS[head], NARROW + swap))
    images = [
        {"image": torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8), "sem_seg": torch.randint(0, 5, (64, 96))}
        for _ in range(2)
    ]
    with EventStorage():
        losses = model.train()(images)
    assert set(losses) == ({"loss_sem_seg", "loss_sem_seg_aux"} if head == "upernet" else {"loss_sem_seg"})
    assert all(torch.isfinite(loss) for loss in losses.values())
    sum(losses.values()).backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    with torch.no_grad():
        (output,) = model.eval()([{"image": images[0]["image"], "height": 128, "width": 192}])
    assert output["sem_seg"].shape == (5, 128, 192) and torch.isfinite(output["sem_seg"]).all()
