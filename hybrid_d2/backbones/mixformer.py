"""MixFormer backbone (Chen et al., "MixFormer: Mixing Features across Windows and Dimensions",
CVPR 2022), ported from the official PaddleClas classification model for Detectron2.

Sources, derivations and decisions: docs/mixformer.md. Module names mirror the parameter names of
PaddleClas's ``ppcls/arch/backbone/model_zoo/mixformer.py``, so converting official weights is a
transpose/rename only (hybrid_d2.checkpoint.mixformer).

Departures from the official code, all for detection:

* The classification tail (``norm``, ``last_proj``, ``head``) is dropped; the four stage outputs are
  read after the last block of each stage, before its ConvMerging, optionally through a fresh
  LayerNorm each (``D2MixFormer(output_norm=True)``).
* The channel interaction's BatchNorm sees a 1x1 pooled map, so in train mode its statistics come
  from the per-device batch alone: with 1 image per device it raises "Expected more than 1 value
  per channel", with 2 it is mostly noise (docs/mixformer.md, "Decisions"). It is built from
  ``pooled_norm``, by default ``FrozenStatsBN``: running statistics always (ImageNet ones once
  weights are loaded), trainable affine, same parameters and state dict as BatchNorm.
  ``pooled_norm="BN"`` or ``"SyncBN"`` reproduces the official train-mode behaviour. Every other
  BatchNorm is built from ``norm``.
* ConvMerging zero-pads odd maps on the bottom/right before its 2x2 stride-2 conv (Swin-style), so
  any input size works; the official code asserts even sizes.

``MixFormerClassifier`` is the official ImageNet model (the trunk plus ``norm``, ``last_proj`` and
``head``), registered with timm as ``hybrid_mixformer_<variant>`` (docs/pretraining.md).

Kept from the official code: the stem is the code's (three 3x3 convs, then a 2x2 stride-2 projection
and a LayerNorm; the paper mentions only the convs), and windows are zero-padded after ``norm1``
with padded tokens left unmasked in attention and included in the channel interaction's average
pool (docs/mixformer.md, "Decisions").
"""

from typing import List, Sequence, Set

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
    SmallMapSafeConv2d,
    Stage,
    get_norm,
    pad_to_multiple,
    relative_position_index,
    to_channels_first,
    to_channels_last,
    window_partition,
    window_reverse,
)

__all__ = [
    "FAMILY",
    "VARIANTS",
    "D2MixFormer",
    "MixFormer",
    "MixFormerClassifier",
    "build_mixformer_backbone",
    "variant_config",
]

# Paper Table 2 (B1-B4) and the official code (B0, B5, B6); drop_path_rate is the official
# ImageNet value, used as the detection default (docs/mixformer.md, "Variants").
VARIANTS = {
    "b0": dict(
        embed_dim=24, depths=(1, 2, 6, 6), num_heads=(3, 6, 12, 24), drop_path_rate=0.0
    ),
    "b1": dict(
        embed_dim=32, depths=(1, 2, 6, 6), num_heads=(2, 4, 8, 16), drop_path_rate=0.0
    ),
    "b2": dict(
        embed_dim=32, depths=(2, 2, 8, 8), num_heads=(2, 4, 8, 16), drop_path_rate=0.05
    ),
    "b3": dict(
        embed_dim=48, depths=(2, 2, 8, 6), num_heads=(3, 6, 12, 24), drop_path_rate=0.1
    ),
    "b4": dict(
        embed_dim=64, depths=(2, 2, 8, 8), num_heads=(4, 8, 16, 32), drop_path_rate=0.2
    ),
    "b5": dict(
        embed_dim=96, depths=(1, 2, 8, 6), num_heads=(6, 12, 24, 48), drop_path_rate=0.3
    ),
    "b6": dict(
        embed_dim=96,
        depths=(2, 4, 16, 12),
        num_heads=(6, 12, 24, 48),
        drop_path_rate=0.5,
    ),
}
# paper §3.2: the projection layer "increases the feature's channels to 1280"
PROJECTION_DIM = 1280


class ConvEmbed(nn.Module):
    """Convolution stem (paper §3.2, Fig. 3; layers as the official ``ConvEmbed``): stride 4,
    3 -> C channels."""

    def __init__(self, embed_dim: int, norm: str):
        super().__init__()
        mid = embed_dim // 2
        layers = []
        for i in range(3):
            layers += [
                nn.Conv2d(
                    3 if i == 0 else mid, mid, 3, stride=2 if i == 0 else 1, padding=1
                ),
                get_norm(norm, mid),
                nn.GELU(),
            ]
        self.stem = nn.Sequential(*layers)
        self.proj = nn.Conv2d(mid, embed_dim, kernel_size=2, stride=2)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) image -> (B, ceil(H/4), ceil(W/4), C) channels-last map."""
        height, width = x.shape[-2:]
        x = F.pad(x, (0, -width % 4, 0, -height % 4))
        x = self.proj(self.stem(x))
        return self.norm(to_channels_last(x))


class MixingAttention(nn.Module):
    """The MIX function of Eq. (1): parallel window attention and depth-wise conv with the
    bi-directional interactions of paper §3.1 (exact computation: the official ``MixingAttention``;
    docs/mixformer.md, "Architecture").

    Operates on a channels-last (B, Hp, Wp, dim) map whose sides are multiples of the window size.
    The pointwise projections run on the whole map; only the attention itself runs on windows.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        norm: str,
        pooled_norm: str,
    ):
        super().__init__()
        attn_dim = (
            dim // 2
        )  # official code: the attention branch gets half the channels
        self.num_heads = num_heads
        self.window_size = window_size

        # "two linear projection layers and two norm layers" (paper §3.1, below Eq. (2))
        self.proj_attn = nn.Linear(dim, attn_dim)
        self.proj_attn_norm = nn.LayerNorm(attn_dim)
        self.proj_cnn = nn.Linear(dim, dim)
        self.proj_cnn_norm = nn.LayerNorm(dim)

        # paper §3.1 parallel design: 3x3 depth-wise conv branch
        self.dwconv3x3 = nn.Sequential(
            nn.Conv2d(dim, dim, 3, padding=1, groups=dim),
            get_norm(norm, dim),
            nn.GELU(),
        )
        # paper §3.1 channel interaction: (GAP), 1x1 conv, BN, GELU, 1x1 conv, (sigmoid)
        self.channel_interaction = nn.Sequential(
            nn.Conv2d(dim, dim // 8, 1),
            get_norm(pooled_norm, dim // 8),
            nn.GELU(),
            nn.Conv2d(dim // 8, attn_dim, 1),
        )
        self.projection = nn.Conv2d(dim, attn_dim, 1)
        self.conv_norm = get_norm(norm, attn_dim)

        # window attention branch with Swin's relative position bias
        self.qkv = nn.Linear(attn_dim, 3 * attn_dim)
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, num_heads)
        )
        self.register_buffer(
            "relative_position_index",
            relative_position_index(window_size),
            persistent=False,
        )
        # paper §3.1 spatial interaction: 1x1 conv, BN, GELU, 1x1 conv to one channel, (sigmoid)
        self.spatial_interaction = nn.Sequential(
            nn.Conv2d(attn_dim, dim // 16, 1),
            get_norm(norm, dim // 16),
            nn.GELU(),
            nn.Conv2d(dim // 16, 1, 1),
        )
        self.attn_norm = nn.LayerNorm(attn_dim)
        self.proj = nn.Linear(dim, dim)

    def relative_position_bias(self) -> torch.Tensor:
        """(1, num_heads, ws*ws, ws*ws) additive attention bias: PyTorch's fused CPU attention
        kernel takes a 4-D mask only (a 3-D one runs the unfused math path, 1.6-1.9x slower in
        inference in stages 1-2; docs/benchmarks.md)."""
        tokens = self.window_size**2
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(1, tokens, tokens, -1).permute(0, 3, 1, 2)

    def window_attention(self, qkv: torch.Tensor) -> torch.Tensor:
        """Self-attention in each window of a (B, Hp, Wp, 3*C') q|k|v map -> (B, Hp, Wp, C')."""
        size = qkv.shape[1:3]
        windows, padded_size = window_partition(qkv, self.window_size)
        num_windows, tokens = windows.shape[:2]
        q, k, v = windows.view(num_windows, tokens, 3, self.num_heads, -1).permute(
            2, 0, 3, 1, 4
        )
        bias = self.relative_position_bias().to(q.dtype)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias
        )  # scale = head_dim**-0.5
        out = out.transpose(1, 2).reshape(num_windows, tokens, -1)
        return window_reverse(out, self.window_size, padded_size, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_attn = self.proj_attn_norm(self.proj_attn(x))
        x_cnn = to_channels_first(self.proj_cnn_norm(self.proj_cnn(x)))

        x_cnn = self.dwconv3x3(x_cnn)
        channel_attn = self.channel_interaction(F.adaptive_avg_pool2d(x_cnn, 1))
        x_cnn = self.projection(x_cnn)

        q, k, v = self.qkv(x_attn).chunk(3, dim=-1)
        v = v * torch.sigmoid(
            to_channels_last(channel_attn)
        )  # channel interaction acts on v only
        x_attn = self.window_attention(torch.cat([q, k, v], dim=-1))

        spatial_attn = self.spatial_interaction(to_channels_first(x_attn))
        x_cnn = self.conv_norm(torch.sigmoid(spatial_attn) * x_cnn)

        # paper §3.1: "normalized by different normalization layers ... merged by concatenation"
        x = torch.cat([self.attn_norm(x_attn), to_channels_last(x_cnn)], dim=-1)
        return self.proj(x)


class MixingBlock(nn.Module):
    """Mixing Block, Eq. (1)-(2), on a channels-last (B, H, W, dim) map."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        drop_path: float,
        norm: str,
        pooled_norm: str,
    ):
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MixingAttention(dim, num_heads, window_size, norm, pooled_norm)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[1:3]
        # zero-pad after norm1, padded tokens unmasked, as the official MixingBlock
        mixed = self.attn(pad_to_multiple(self.norm1(x), self.window_size))
        x = x + self.drop_path(mixed[:, :height, :width])  # Eq. (1)
        return x + self.drop_path(self.mlp(self.norm2(x)))  # Eq. (2)


class ConvMerging(nn.Module):
    """Downsampling between stages (paper §3.2 "stride convolution"): BN, 2x2 s2 conv C -> 2C."""

    def __init__(self, dim: int, norm: str):
        super().__init__()
        self.norm = get_norm(norm, dim)
        self.reduction = SmallMapSafeConv2d(dim, 2 * dim, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C); odd sides are zero-padded bottom/right."""
        x = self.norm(to_channels_first(x))
        height, width = x.shape[-2:]
        x = F.pad(x, (0, width % 2, 0, height % 2))
        return to_channels_last(self.reduction(x))


class MixFormer(nn.Module):
    """MixFormer feature extractor: conv stem and four stages, without the classification tail.

    ``forward`` returns the four stage outputs (NCHW, strides 4/8/16/32, channels C * (1, 2, 4, 8)),
    each taken after the stage's last block and before its ConvMerging.
    """

    def __init__(
        self,
        embed_dim: int,
        depths: Sequence[int],
        num_heads: Sequence[int],
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        norm: str = "BN",
        pooled_norm: str = "FrozenStatsBN",
        use_checkpoint: bool = False,
    ):
        super().__init__()
        self.channels = [embed_dim * 2**i for i in range(len(depths))]
        self.patch_embed = ConvEmbed(embed_dim, norm)
        # stochastic depth rises linearly over all blocks, as the official code
        drop_paths = torch.linspace(
            0, drop_path_rate, sum(depths), device="cpu"
        ).tolist()
        self.layers = nn.ModuleList()
        for i, (dim, depth, heads) in enumerate(zip(self.channels, depths, num_heads)):
            first = sum(depths[:i])
            blocks = [
                MixingBlock(dim, heads, window_size, mlp_ratio, rate, norm, pooled_norm)
                for rate in drop_paths[first : first + depth]
            ]
            downsample = ConvMerging(dim, norm) if i < len(depths) - 1 else None
            self.layers.append(Stage(blocks, downsample, use_checkpoint))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # as the official code; convolutions and BatchNorms keep PyTorch's defaults
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, MixingAttention):
            trunc_normal_(module.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        x = self.patch_embed(x)
        outputs = []
        for stage in self.layers:
            out, x = stage(x)
            outputs.append(to_channels_first(out).contiguous())
        return outputs


class MixFormerClassifier(ClassifierMixin, MixFormer):
    """The official ImageNet model (paper Fig. 3): the trunk, then LayerNorm(8C) -> Linear(8C ->
    1280) -> GELU (projection layer) -> global average pool -> Linear (official ``norm``,
    ``last_proj``, ``head``). Registered with timm as ``hybrid_mixformer_b0`` ... ``b6``.

    Every BatchNorm, the channel interaction's included, uses batch statistics in training, as
    the official code (ImageNet batches are large).
    """

    TAIL = ("norm", "last_proj", "head")  # the modules the trunk does not have
    NETWORK_DEFAULTS = {"norm": "BN", "pooled_norm": "BN"}

    def _init_tail(self, variant: str, drop_path_rate: float, settings: dict) -> int:
        self.norm = nn.LayerNorm(self.channels[-1])
        self.last_proj = nn.Linear(self.channels[-1], PROJECTION_DIM)
        self.norm.apply(self._init_weights)
        self.last_proj.apply(self._init_weights)
        return PROJECTION_DIM

    def no_weight_decay(self) -> Set[str]:
        """Parameter names timm's optimizer factory keeps out of weight decay (official recipe)."""
        return {
            n
            for n, _ in self.named_parameters()
            if n.endswith("relative_position_bias_table")
        }

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> the projected last stage, (B, 1280, H/32, W/32)."""
        last = to_channels_last(MixFormer.forward(self, x)[-1])
        return to_channels_first(F.gelu(self.last_proj(self.norm(last))))


FAMILY = BackboneFamily(
    name="mixformer",
    title="MixFormer",
    backbone_name="D2MixFormer",
    network=MixFormer,
    variants=VARIANTS,
    default_variant="b1",
    classifier=MixFormerClassifier,
    timm_cfg=dict(first_conv="patch_embed.stem.0"),
    converter="hybrid_d2.checkpoint.mixformer:convert_mixformer",
    options=(
        Option(
            "norm",
            'every BatchNorm but the channel interaction\'s: "BN", "SyncBN" or "FrozenBN"',
            norm=True,
        ),
        Option(
            "pooled_norm",
            "the channel interaction's BatchNorm, which sees a 1x1 pooled map (docs/mixformer.md): "
            '"FrozenStatsBN" (running statistics always, trainable affine: works with 1 image per '
            'device), "BN" or "SyncBN" (batch statistics as in the official code; needs >= 2 '
            "images per norm group)",
            norm=True,
        ),
    ),
    stem_and_stages=lambda net: (net.patch_embed, net.layers),
)

variant_config = FAMILY.variant_config  # a copy of a variant's table entry, checked


# Made here by register_family (hybrid_d2.layers.registration): the Detectron2 backbone D2MixFormer,
# its builder build_mixformer_backbone and the timm models hybrid_mixformer_b0, hybrid_mixformer_b1,
# hybrid_mixformer_b2, hybrid_mixformer_b3, hybrid_mixformer_b4, hybrid_mixformer_b5,
# hybrid_mixformer_b6.
D2MixFormer, build_mixformer_backbone = register_family(FAMILY, __name__)
