"""DilateFormer backbone (Jiao et al., "DilateFormer: Multi-Scale Dilated Transformer for Visual
Recognition", IEEE TMM 2023), ported from the official classification model for Detectron2.

Sources, derivations and decisions: docs/dilateformer.md. Module names mirror the state-dict keys
of the official ``models/dilateformer.py`` (JIAOJIAYUASD/dilateformer), so converting official
weights is a prefix only (hybrid_d2.checkpoint.dilateformer).

Stages 1-2 use Multi-Scale Dilated Attention (MSDA, 3x3 windows with dilations 1/2/3 per head
group), stages 3-4 plain multi-head self-attention; every block starts with a depth-wise 3x3
conditional position embedding (CPE). Departures from the official code, all for detection:

* No classification tail (``norm``, ``head``) and no 224x224 assert; the four stage outputs are read
  before each stage's downsampler, optionally through a fresh LayerNorm each (Swin/NAT convention).
* Stage 3 attention is configurable (``stage3_attention``; docs/dilateformer.md, "Stage-3
  attention for detection"): "global" as in the classification model; "window": non-overlapping
  windows; "mixed": the paper's detection setting (paper §IV-B: "a combination of local window
  attention, local window attention with shifted operation and global attention in stage3"),
  whose exact mix the paper does not give. Our pattern: two equal halves that alternate window /
  shifted window and end with a global block: T W,SW,G,W,SW,G; S W,SW,W,G,W,SW,W,G;
  B W,SW,W,SW,G,W,SW,W,SW,G. Window blocks reuse the global blocks' ``qkv``/``proj``; no relative
  position bias (none in the checkpoint; the CPE gives position).
* Window and shifted-window blocks zero-pad the map to multiples of the window and mask the padded
  keys (Swin does not mask them; masking makes a window that covers the whole map exactly global
  attention). Shifted windows use Swin's region mask, shift = window_size // 2, and no shift when
  the map fits in one window.
* MSDA runs without ``nn.Unfold`` (hybrid_d2.layers.dilated_attention), with the same
  zero-padding semantics as the official code: out-of-map keys take part in the softmax with logit
  0 and value 0 (paper §III-A: "zero padding"), which the pretrained weights rely on.
* Stem and downsampler BatchNorms are built from ``norm``, "FrozenBN" by default (2 images per
  GPU make batch statistics noisy).

``DilateFormerClassifier`` is the official ImageNet model (the trunk plus ``norm`` and ``head``),
registered with timm as ``hybrid_dilateformer_<variant>`` (docs/pretraining.md).

Internally the blocks keep a channels-last (B, H, W, C) residual stream; MSDA's qkv projection
writes channels-first maps directly (one GEMM) because its shifted slices are fastest there.
"""

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import nn

from ..layers import (
    BackboneFamily,
    Option,
    register_family,
    ClassifierMixin,
    Mlp,
    channel_norm,
    SmallMapSafeConv2d,
    Stage,
    dilated_attention,
    get_norm,
    pad_to_multiple,
    to_channels_first,
    to_channels_last,
    window_attention_mask,
    window_partition,
    window_reverse,
)

__all__ = [
    "FAMILY",
    "STAGE3_MODES",
    "VARIANTS",
    "D2DilateFormer",
    "DilateFormer",
    "DilateFormerClassifier",
    "build_dilateformer_backbone",
    "stage3_pattern",
    "variant_config",
]

_W, _SW, _G = "window", "shifted", "global"

# Paper Table II and the official code. drop_path_rate is the detection default (ImageNet used
# 0.1; docs/dilateformer.md, "Decisions and deviations"); stage3_mixed is the "mixed" stage-3
# pattern (docs/dilateformer.md, "Stage-3 attention for detection").
VARIANTS = {
    "tiny": dict(
        embed_dim=72,
        depths=(2, 2, 6, 2),
        num_heads=(3, 6, 12, 24),
        drop_path_rate=0.2,
        stage3_mixed=(_W, _SW, _G) * 2,
    ),
    "small": dict(
        embed_dim=72,
        depths=(3, 5, 8, 3),
        num_heads=(3, 6, 12, 24),
        drop_path_rate=0.2,
        stage3_mixed=(_W, _SW, _W, _G) * 2,
    ),
    "base": dict(
        embed_dim=96,
        depths=(4, 8, 10, 3),
        num_heads=(3, 6, 12, 24),
        drop_path_rate=0.3,
        stage3_mixed=(_W, _SW, _W, _SW, _G) * 2,
    ),
}

STAGE3_MODES = ("global", "window", "mixed")
DILATIONS = (1, 2, 3)  # Fig. 4: "3 x 3 kernel size with dilation rates r = 1, 2 and 3"
KERNEL_SIZE = 3
MSDA_STAGES = 2  # paper §III-C: "the first two stages ... use MSDA"
LN_EPS = 1e-6  # official code; the paper says "Norm"
IMAGENET_DROP_PATH = 0.1  # official main.py default and dist_train.sh


def stage3_pattern(variant: str, mode: str) -> Tuple[str, ...]:
    """Per-block stage-3 attention ("window", "shifted" or "global") for a STAGE3_MODES mode."""
    config = FAMILY.variant_config(variant)
    depth = config["depths"][2]
    if mode == "global":
        return (_G,) * depth
    if mode == "window":
        return (_W,) * depth
    if mode == "mixed":
        return config["stage3_mixed"]
    raise ValueError(
        f"unknown stage-3 attention mode {mode!r}; expected one of {STAGE3_MODES}"
    )


class PatchEmbed(nn.Module):
    """Overlapping tokenizer (paper §III-C; layers as the official ``PatchEmbed``): 3x3 convs with
    strides 1, 2, 1, 2."""

    def __init__(self, embed_dim: int, norm: str, hidden_dim: int = 16):
        super().__init__()
        layers: List[nn.Module] = []
        in_channels = 3
        for i, stride in enumerate((1, 2, 1)):
            out_channels = hidden_dim * 2**i
            layers += [
                nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False),
                get_norm(norm, out_channels),
                nn.GELU(),
            ]
            in_channels = out_channels
        layers.append(nn.Conv2d(in_channels, embed_dim, 3, 2, padding=1, bias=False))
        self.proj = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, H', W', C) channels-last, H' = ceil(ceil(H / 2) / 2)."""
        return to_channels_last(self.proj(x)).contiguous()


class Downsample(nn.Module):
    """Overlapping downsampler (paper §III-C): 3x3 stride-2 conv C -> 2C, then BatchNorm."""

    def __init__(self, dim: int, norm: str):
        super().__init__()
        self.proj = nn.Sequential(
            SmallMapSafeConv2d(dim, 2 * dim, 3, 2, padding=1), get_norm(norm, 2 * dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, ceil(H / 2), ceil(W / 2), 2C)."""
        return to_channels_last(self.proj(to_channels_first(x))).contiguous()


class MultiDilateAttention(nn.Module):
    """MSDA, Eq. (4)-(5): SWDA per head group with its own dilation, then a Linear."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        # the official 1x1 conv (3C, C, 1, 1), channels q|k|v, applied as one GEMM
        self.qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, dim = x.shape
        tokens = x.reshape(batch, height * width, dim)
        # W @ x^T writes the (B, 3C, H*W) channels-first map without a transpose copy
        qkv = torch.baddbmm(
            self.qkv.bias[:, None],
            self.qkv.weight.flatten(1).expand(batch, -1, -1),
            tokens.transpose(1, 2),
        )
        q, k, v = qkv.view(batch, 3 * dim, height, width).chunk(3, dim=1)
        out, _ = dilated_attention(q, k, v, self.num_heads, DILATIONS, KERNEL_SIZE)
        out = torch.baddbmm(  # Eq. (5) Linear, back to channels-last
            self.proj.bias,
            out.view(batch, dim, height * width).transpose(1, 2),
            self.proj.weight.t().expand(batch, -1, -1),
        )
        return out.view(batch, height, width, dim)


class Attention(nn.Module):
    """MHSA of stages 3-4 (global), or inside (shifted) windows: same parameters either way."""

    def __init__(self, dim: int, num_heads: int, kind: str, window_size: int):
        super().__init__()
        if kind not in (_G, _W, _SW):
            raise ValueError(
                f"unknown attention kind {kind!r}; expected {_G!r}, {_W!r} or {_SW!r}"
            )
        self.num_heads = num_heads
        self.kind = kind
        self.window_size = window_size
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def _heads(
        self, tokens: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, L, 3C) -> q, k, v of shape (N, heads, L, head_dim)."""
        n, length, _ = tokens.shape
        return (
            tokens.view(n, length, 3, self.num_heads, -1)
            .permute(2, 0, 3, 1, 4)
            .unbind(0)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, dim = x.shape
        qkv = self.qkv(x)
        if self.kind == _G:
            q, k, v = self._heads(qkv.view(batch, height * width, -1))
            out = F.scaled_dot_product_attention(q, k, v)  # scale head_dim**-0.5
            out = out.transpose(1, 2).reshape(batch, height, width, dim)
            return self.proj(out)

        ws = self.window_size
        fits = height <= ws and width <= ws
        shift = ws // 2 if self.kind == _SW and not fits else 0
        qkv = pad_to_multiple(qkv, ws)
        if shift:
            qkv = torch.roll(qkv, (-shift, -shift), dims=(1, 2))
        windows, padded_size = window_partition(qkv, ws)
        q, k, v = self._heads(windows)
        mask = window_attention_mask((height, width), ws, shift, x.device, q.dtype)
        if mask is not None:  # (nW, L, L) -> (B * nW, 1, L, L), windows batch-major
            mask = mask.repeat(batch, 1, 1).unsqueeze(1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(windows.shape[0], ws * ws, dim)
        out = window_reverse(out, ws, padded_size, padded_size)
        if shift:
            out = torch.roll(out, (shift, shift), dims=(1, 2))
        return self.proj(out[:, :height, :width])


class DilateBlock(nn.Module):
    """Eq. (6)-(8): CPE, then pre-LN attention (MSDA or MHSA) and MLP, on (B, H, W, C) maps."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        attention: str,
        window_size: int,
        mlp_ratio: float,
        drop_path: float,
    ):
        super().__init__()
        self.pos_embed = nn.Conv2d(
            dim, dim, 3, padding=1, groups=dim
        )  # CPE = DwConv, Eq. (6)
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        if attention == "dilated":
            self.attn = MultiDilateAttention(dim, num_heads)
        else:
            self.attn = Attention(dim, num_heads, attention, window_size)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + to_channels_last(
            self.pos_embed(to_channels_first(x))
        )  # Eq. (6), no drop path
        x = x + self.drop_path(self.attn(self.norm1(x)))  # Eq. (7)
        return x + self.drop_path(self.mlp(self.norm2(x)))  # Eq. (8)


class DilateFormer(nn.Module):
    """DilateFormer feature extractor: overlapping tokenizer and four stages, no classifier.

    ``forward`` returns the four stage outputs (NCHW, strides 4/8/16/32, channels C * (1, 2, 4, 8)),
    each taken after the stage's last block and before its downsampler.
    """

    def __init__(
        self,
        embed_dim: int,
        depths: Sequence[int],
        num_heads: Sequence[int],
        stage3_attention: Optional[Sequence[str]] = None,
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        norm: str = "FrozenBN",
        use_checkpoint: bool = False,
    ):
        """
        Args:
            stage3_attention: per-block "global" / "window" / "shifted" for stage 3; None means
                all global (the classification model).
            window_size: window side of the "window" and "shifted" blocks.
            norm: norm of the stem's and downsamplers' BatchNorms.
        """
        super().__init__()
        if len(depths) != 4 or len(num_heads) != 4:
            raise ValueError(
                f"depths {depths} and num_heads {num_heads}: expected 4 stages"
            )
        if stage3_attention is None:
            stage3_attention = (_G,) * depths[2]
        if len(stage3_attention) != depths[2]:
            raise ValueError(
                f"stage3_attention has {len(stage3_attention)} entries for {depths[2]} blocks"
            )
        attention = [
            ("dilated",) * depths[0],
            ("dilated",) * depths[1],
            tuple(stage3_attention),
            (_G,) * depths[3],
        ]
        self.channels = [embed_dim * 2**i for i in range(4)]
        self.patch_embed = PatchEmbed(embed_dim, norm)
        # stochastic depth rises linearly over all blocks, as the official code
        drop_paths = torch.linspace(
            0, drop_path_rate, sum(depths), device="cpu"
        ).tolist()
        self.stages = nn.ModuleList()
        for i, (dim, depth, heads) in enumerate(zip(self.channels, depths, num_heads)):
            first = sum(depths[:i])
            blocks = [
                DilateBlock(dim, heads, kind, window_size, mlp_ratio, rate)
                for kind, rate in zip(attention[i], drop_paths[first : first + depth])
            ]
            downsample = Downsample(dim, norm) if i < 3 else None
            self.stages.append(Stage(blocks, downsample, use_checkpoint))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # as the official code; convolutions (MSDA qkv included) and BatchNorms keep PyTorch's
        # defaults
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        x = self.patch_embed(x)
        outputs = []
        for stage in self.stages:
            out, x = stage(x)
            outputs.append(to_channels_first(out).contiguous())
        return outputs


def _network_options(variant: str, options: Dict[str, Any]) -> Dict[str, Any]:
    """The stage-3 mode as the variant's per-block pattern; the window side checked."""
    pattern = stage3_pattern(variant, options["stage3_attention"])
    if options["window_size"] < 1:
        raise ValueError(
            f"window_size={options['window_size']}: expected a positive window side"
        )
    return dict(options, stage3_attention=pattern)


class DilateFormerClassifier(ClassifierMixin, DilateFormer):
    """The official ImageNet model: the trunk with all-global stage 3, then the classification
    tail LayerNorm(8C) -> global average pool -> Linear (official ``norm``, ``head``).

    Registered with timm as ``hybrid_dilateformer_{tiny,small,base}``; state-dict keys equal the
    official checkpoints' (without the token-labeling ``aux_head``).
    """

    TAIL = ("norm", "head")  # the modules the trunk does not have

    def _init_tail(self, variant: str, drop_path_rate: float, settings: dict) -> int:
        self.norm = nn.LayerNorm(self.channels[-1], eps=LN_EPS)
        return self.channels[-1]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> the normalised last stage, (B, 8C, H/32, W/32)."""
        return channel_norm(self.norm, DilateFormer.forward(self, x)[-1])


FAMILY = BackboneFamily(
    name="dilateformer",
    title="DilateFormer",
    backbone_name="D2DilateFormer",
    network=DilateFormer,
    variants=VARIANTS,
    default_variant="small",
    classifier=DilateFormerClassifier,
    timm_cfg=dict(first_conv="patch_embed.proj.0"),
    converter="hybrid_d2.checkpoint.dilateformer:convert_dilateformer",
    options=(
        Option(
            "norm",
            "the stem's and downsamplers' BatchNorms: \"FrozenBN\" (ImageNet statistics; 2 images "
            'per GPU make batch statistics noisy), "BN" or "SyncBN"',
            norm=True,
        ),
        Option(
            "stage3_attention",
            'stage-3 attention (docs/dilateformer.md): "global" (the classification model), '
            '"window" (non-overlapping windows) or "mixed" (window / shifted window / global '
            "blocks, the paper's detection setting; pattern per variant in VARIANTS)",
            default="mixed",
        ),
        Option(
            "window_size",
            "window side of the stage-3 (shifted-)window blocks: 7 or 14",
        ),
    ),
    extra_variant_keys=("stage3_mixed",),
    imagenet_drop_path={variant: IMAGENET_DROP_PATH for variant in VARIANTS},
    network_options=_network_options,
    stem_and_stages=lambda net: (net.patch_embed, net.stages),
)

variant_config = FAMILY.variant_config  # a copy of a variant's table entry, checked


# Made here by register_family (hybrid_d2.layers.registration): the Detectron2 backbone
# D2DilateFormer, its builder build_dilateformer_backbone and the timm models
# hybrid_dilateformer_tiny, hybrid_dilateformer_small, hybrid_dilateformer_base.
D2DilateFormer, build_dilateformer_backbone = register_family(FAMILY, __name__)
