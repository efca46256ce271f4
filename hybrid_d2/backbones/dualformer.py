"""DualFormer backbone (Jiang et al., "Dual Path Transformer with Partition Attention",
arXiv:2305.14768, 2023) for Detectron2.

No official code or weights exist: this is our reading of the paper, with every choice the paper
leaves open written down here and in docs/dualformer.md.

Architecture (paper §3, Fig. 3):

* Stem: two overlapped 3x3 stride-2 convs, 3 -> D1/2 (BN, GELU) -> D1 (BN) ("two successive
  overlapped convolutional token embedding layers"; the middle width D1/2 is ours, as MPViT).
* Four stages at strides 4/8/16/32 of Dual Attention Blocks; between stages a 3x3 stride-2 conv +
  BN (the paper's "patch embeddings"; kernel and norm are ours, by analogy with the stem).
* Dual Attention Block (§3.3), pre-norm, on channels C::

      y      = LN(x);  y_local, y_global = split(y, [C/2, C/2])
      x      = x + DropPath(Proj_{C->C}(concat(MBConv(y_local), MHPA(y_global))))
      x      = x + DropPath(FFN(LN(x)))                  # Linear C->rC, GELU, Linear rC->C

  The 1:1 split, the fusing projection, LayerNorm and GELU are ours; the FFN ratio r is per stage
  as in PVTv2 [48], which the paper builds on: (8, 8, 4, 4), halved to (4, 4, 2, 2) for T.
  MBConv (MobileNetV2): 1x1 expand x4 -> BN -> GELU -> DW 3x3 -> BN -> GELU -> 1x1 -> BN; no SE,
  no inner residual (the block's residual covers it).
* MHPA (§3.2) on c = C/2 channels, heads h = (1, 2, 4, 8) per stage, b = 2 hash bits (K = 4
  partitions per head, the paper's Eq. 5 example), downsample rate k = (4, 2, 1, 1) per stage
  ("as early stage"):

  1. resolution reduction: DW k x k stride-k conv + BN (zero-pad right/bottom to multiples of k);
  2. tokens t = LN(s); values v = Linear(t) (the "additional lightweight linear layer");
  3. partition generator (Eq. 4-5): SimHash per head with b fixed random hyperplanes,
     code = sum_r 2^r [<t_head, beta_r> >= 0]. beta is a persistent buffer drawn from N(0, 1) with a
     fixed seed (``hash_seed`` + block index): saved in checkpoints, never trained, identical for
     the same seed. No gradient flows through the hash; partitions move as the features learn;
  4. intra-partition attention (Eq. 6-7, which do not type-check as printed): one logit per token
     and head (Linear c->h), softmax inside each partition, and the weighted mean of v gives one
     proxy per partition ("pool", default); ``intra_mode="token"`` keeps each token's own weighted
     value instead (the literal per-token reading of Eq. 7, mixes no tokens);
  5. inter-partition attention (Eq. 8-9): mean of v per partition (Eq. 8), squeezed to a scalar
     (Linear hd->1), SE-style excitation across partitions (Linear K->K, ReLU, Linear K->K), then
     a softmax over the non-empty partitions, so the importances sum to 1 (Eq. 9's stated intent)
     and an empty partition gets 0; x_inter = m_k * mean_k;
  6. global-to-local aggregation: both per-partition features are scattered back to their tokens,
     concatenated (per head: intra | inter) and fused by a Linear 2c -> c (the "simple
     convolution layer", a 1x1 conv);
  7. channel to spatial: Linear c -> c k^2 and pixel shuffle back to the input resolution (cropped
     after padding), plus the skip connection with the MHPA input.

  No dot-product attention (paper §3.2: "completely discards the dot-product attention"). There is
  no loop over partitions: segment sums and the scatter are one-hot matmuls (deterministic on CUDA,
  unlike scatter_add_/index_add_), so the cost is linear in the number of tokens. Hashing, the
  exponentials, the segment sums and the scatter run in float32 with autocast off.
* Outputs res2..res5 are the stage outputs before each downsampler, each through a fresh
  LayerNorm (as Swin / PVT detection backbones).

``DualFormerClassifier`` is the ImageNet model (the trunk plus a final LayerNorm, average pool and
Linear; the norm is ours), registered with timm as ``hybrid_dualformer_<variant>``
(docs/pretraining.md).

Internally the residual stream is channels-last (B, H, W, C); convolutions see channels-last
NCHW views.
"""

from typing import Dict, List, Sequence, Tuple

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
    channel_norm,
    get_norm,
    to_channels_first,
    to_channels_last,
)

__all__ = [
    "FAMILY",
    "INTRA_MODES",
    "VARIANTS",
    "D2DualFormer",
    "DualFormer",
    "DualFormerClassifier",
    "MultiHeadPartitionAttention",
    "build_dualformer_backbone",
    "hash_codes",
    "partition_importance",
    "pixel_shuffle_channels_last",
    "variant_config",
]

# Paper Table 1 (depths, channels); heads, downsample rates and drop path (COCO value) are our
# choices. FFN ratios per stage follow PVTv2 [48], which the paper builds on (8, 8, 4, 4; halved
# for T): parameters and FLOPs at 224 within 4% of Table 1 for T/XS/S (docs/dualformer.md).
VARIANTS = {
    "tiny": dict(
        depths=(2, 2, 4, 2), channels=(64, 128, 256, 320), mlp_ratios=(4, 4, 2, 2),
        drop_path_rate=0.1,
    ),
    "xsmall": dict(
        depths=(2, 2, 4, 2), channels=(64, 128, 320, 368), mlp_ratios=(8, 8, 4, 4),
        drop_path_rate=0.1,
    ),
    "small": dict(
        depths=(4, 4, 7, 3), channels=(64, 128, 320, 512), mlp_ratios=(8, 8, 4, 4),
        drop_path_rate=0.2,
    ),
    "base": dict(
        depths=(6, 12, 25, 7), channels=(64, 128, 368, 560), mlp_ratios=(8, 8, 4, 4),
        drop_path_rate=0.4,
    ),
}  # fmt: skip
NUM_HEADS = (1, 2, 4, 8)  # MHPA heads per stage
DOWNSAMPLE_RATES = (4, 2, 1, 1)  # MHPA resolution reduction k per stage
HASH_BITS = 2  # K = 2^b partitions per head (Eq. 5)
MBCONV_EXPANSION = 4
INTRA_MODES = ("pool", "token")
_EPS = 1e-6

# ImageNet stochastic depth, ours (docs/dualformer.md)
IMAGENET_DROP_PATH = {"tiny": 0.0, "xsmall": 0.1, "small": 0.1, "base": 0.3}


def hash_codes(x: torch.Tensor, hyperplanes: torch.Tensor) -> torch.Tensor:
    """SimHash partition ids (Eq. 4-5): (B, h, n, hd) features, (h, hd, b) hyperplanes -> (B, h, n)
    int64 codes in [0, 2^b), code = sum_r 2^r [<x, beta_r> >= 0]."""
    bits = torch.einsum("bhnd,hdr->bhnr", x, hyperplanes) >= 0
    powers = 2 ** torch.arange(hyperplanes.shape[-1], device=x.device)
    return (bits.long() * powers).sum(-1)


def pixel_shuffle_channels_last(x: torch.Tensor, factor: int) -> torch.Tensor:
    """``F.pixel_shuffle`` on a channels-last (B, H, W, C r^2) map -> (B, H r, W r, C)."""
    batch, height, width, channels = x.shape
    x = x.view(batch, height, width, channels // factor**2, factor, factor)
    return x.permute(0, 1, 4, 2, 5, 3).reshape(
        batch, height * factor, width * factor, -1
    )


def partition_importance(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Eq. 9's normalised importances: softmax of (..., K) scores over the partitions with
    counts > 0; empty partitions get exactly 0. At least one partition must be non-empty.
    """
    return scores.masked_fill(counts == 0, float("-inf")).softmax(-1)


class MultiHeadPartitionAttention(nn.Module):
    """MHPA (§3.2, Fig. 3) on a channels-last (B, H, W, dim) map; output has the input's shape."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        downsample: int,
        hash_bits: int = HASH_BITS,
        hash_seed: int = 0,
        intra_mode: str = "pool",
        norm: str = "BN",
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(
                f"MHPA: {dim} channels do not split into {num_heads} heads"
            )
        if intra_mode not in INTRA_MODES:
            raise ValueError(
                f"unknown intra_mode {intra_mode!r}; expected one of {INTRA_MODES}"
            )
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.num_partitions = 2**hash_bits
        self.downsample = downsample
        self.intra_mode = intra_mode
        if downsample > 1:  # "depth-wise stride convolution"
            self.reduce = nn.Sequential(
                nn.Conv2d(dim, dim, downsample, downsample, groups=dim, bias=False),
                get_norm(norm, dim),
            )
            self.restore = nn.Linear(
                dim, dim * downsample**2
            )  # 1x1 conv before pixel shuffle
        self.norm = nn.LayerNorm(dim)
        self.value = nn.Linear(
            dim, dim
        )  # x~, the "additional lightweight linear layer"
        self.pool_logits = nn.Linear(
            dim, num_heads
        )  # one intra-partition logit per head
        self.squeeze = nn.Linear(
            self.head_dim, 1
        )  # partition descriptor -> scalar (SENet)
        self.excite = nn.Sequential(
            nn.Linear(self.num_partitions, self.num_partitions),
            nn.ReLU(inplace=True),
            nn.Linear(self.num_partitions, self.num_partitions),
        )
        self.aggregate = nn.Linear(
            2 * dim, dim
        )  # concat(intra, inter) -> dim, a 1x1 conv
        generator = torch.Generator().manual_seed(hash_seed)
        hyperplanes = torch.randn(
            num_heads, self.head_dim, hash_bits, generator=generator
        )
        self.register_buffer(
            "hyperplanes", hyperplanes, persistent=True
        )  # beta, never trained

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, dim = x.shape
        k = self.downsample
        if k > 1:  # zero-pad right / bottom to multiples of k
            reduced = F.pad(x, (0, 0, 0, -width % k, 0, -height % k))
            reduced = to_channels_last(self.reduce(to_channels_first(reduced)))
        else:
            reduced = x
        grid = reduced.shape[1:3]
        tokens = self.norm(reduced.reshape(batch, grid[0] * grid[1], dim))
        mixed, _ = self.partition_attention(tokens)
        out = self.aggregate(mixed)
        if k > 1:  # channel to spatial: (h, w, c k^2) -> (h k, w k, c), then crop
            out = pixel_shuffle_channels_last(
                self.restore(out).view(batch, *grid, -1), k
            )
            out = out[:, :height, :width]
        return x + out.reshape(
            batch, height, width, dim
        )  # skip with the original input

    def partition_attention(
        self, tokens: torch.Tensor
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Partitions, intra- and inter-partition attention and the scatter back (Eq. 4-9).

        Args:
            tokens: (B, n, dim) normalised tokens.
        Returns:
            (B, n, 2 dim) features of the tokens' dtype (computed in float32, or float64 for
            float64 tokens), per head [intra | inter], and the bookkeeping:
            ``codes`` (B, h, n), ``one_hot`` (B, h, n, K), ``counts`` (B, h, K) and
            ``importance`` (B, h, K).
        """
        batch, n, dim = tokens.shape
        heads, head_dim = self.num_heads, self.head_dim
        values = self.value(tokens)
        logits = self.pool_logits(tokens)
        dtype = torch.promote_types(tokens.dtype, torch.float32)  # float32, or float64
        with torch.autocast(tokens.device.type, enabled=False):
            split = (batch, n, heads, head_dim)
            t = tokens.to(dtype).view(split).transpose(1, 2)  # (B, h, n, hd)
            v = values.to(dtype).view(split).transpose(1, 2)
            a = logits.to(dtype).transpose(1, 2)  # (B, h, n)
            codes = hash_codes(t, self.hyperplanes.to(dtype))
            one_hot = F.one_hot(codes, self.num_partitions).to(dtype)  # (B, h, n, K)
            counts = one_hot.sum(2)  # (B, h, K)
            with torch.no_grad():  # each partition's max logit: an exact softmax shift
                masked = torch.where(one_hot.bool(), a.unsqueeze(-1), float("-inf"))
                shift = masked.amax(2).gather(-1, codes)  # (B, h, n)
            e = torch.exp(a - shift).unsqueeze(
                -1
            )  # <= 1, and 1 at each partition's max
            # segment sums over the tokens of each partition, one matmul: (B, h, K, 2 hd + 1)
            sums = one_hot.transpose(2, 3) @ torch.cat([e * v, v, e], -1)
            weighted, value_sum, weight_sum = sums.split([head_dim, head_dim, 1], -1)
            means = value_sum / counts.clamp_min(1).unsqueeze(-1)  # Eq. 8
            # SE-style scores in the parameters' dtype (the module may have been cast)
            descriptors = self.squeeze(means.to(self.squeeze.weight.dtype)).squeeze(-1)
            present = (counts > 0).to(
                descriptors.dtype
            )  # empty partitions: zero descriptor
            scores = self.excite(descriptors * present).to(dtype)
            importance = partition_importance(scores, counts)  # Eq. 9
            inter = importance.unsqueeze(-1) * means
            if self.intra_mode == "pool":  # one proxy per partition (Eq. 6-7, pooled)
                proxies = weighted / weight_sum.clamp_min(_EPS)
                scattered = one_hot @ torch.cat([proxies, inter], -1)  # (B, h, n, 2 hd)
            else:  # each token's softmax weight within its partition times its value
                token_weight_sum = one_hot @ weight_sum  # (B, h, n, 1), >= 1
                scattered = torch.cat([e * v / token_weight_sum, one_hot @ inter], -1)
            mixed = (
                scattered.transpose(1, 2).reshape(batch, n, 2 * dim).to(tokens.dtype)
            )
        details = dict(
            codes=codes, one_hot=one_hot, counts=counts, importance=importance
        )
        return mixed, details


class MBConv(nn.Module):
    """Local branch (§3.3, MobileNetV2 inverted residual without its residual) on (B, H, W, dim).

    The 1x1 convolutions are Linear layers on the channels-last map (the same operation); the
    BatchNorms and the depth-wise conv see channels-last NCHW views.
    """

    def __init__(self, dim: int, expansion: int, norm: str):
        super().__init__()
        hidden = dim * expansion
        self.expand = nn.Linear(dim, hidden, bias=False)
        self.norm1 = get_norm(norm, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False)
        self.norm2 = get_norm(norm, hidden)
        self.project = nn.Linear(hidden, dim, bias=False)
        self.norm3 = get_norm(norm, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(to_channels_first(self.expand(x))))
        x = F.gelu(self.norm2(self.dwconv(x)))
        return to_channels_last(
            self.norm3(to_channels_first(self.project(to_channels_last(x))))
        )


class DualBlock(nn.Module):
    """Dual Attention Block (§3.3): MBConv || MHPA on a channel split, fused, then the FFN."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        downsample: int,
        mlp_ratio: float,
        drop_path: float,
        norm: str,
        hash_seed: int,
        intra_mode: str,
    ):
        super().__init__()
        self.split = dim // 2
        self.norm1 = nn.LayerNorm(dim)
        self.local = MBConv(self.split, MBCONV_EXPANSION, norm)
        self.attn = MultiHeadPartitionAttention(
            dim - self.split,
            num_heads,
            downsample,
            hash_seed=hash_seed,
            intra_mode=intra_mode,
            norm=norm,
        )
        self.proj = nn.Linear(dim, dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = Mlp(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        mixed = torch.cat(
            [self.local(y[..., : self.split]), self.attn(y[..., self.split :])], -1
        )
        x = x + self.drop_path(self.proj(mixed))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before the shared Mlp name the FFN's layers mlp.0 / mlp.2
        for old, new in (("mlp.0.", "mlp.fc1."), ("mlp.2.", "mlp.fc2.")):
            for key in [k for k in state_dict if k.startswith(prefix + old)]:
                state_dict[prefix + new + key[len(prefix + old) :]] = state_dict.pop(
                    key
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class Stem(nn.Module):
    """Two overlapped 3x3 stride-2 conv embeddings (§3.1): (B, 3, H, W) -> (B, H/4, W/4, C)."""

    def __init__(self, dim: int, norm: str):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(3, dim // 2, 3, 2, padding=1, bias=False),
            get_norm(norm, dim // 2),
            nn.GELU(),
            nn.Conv2d(dim // 2, dim, 3, 2, padding=1, bias=False),
            get_norm(norm, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return to_channels_last(self.proj(x)).contiguous()


class Downsample(nn.Module):
    """Patch embedding between stages: 3x3 stride-2 conv + BN, (B, H, W, C) -> (B, H/2, W/2, C')."""

    def __init__(self, in_dim: int, out_dim: int, norm: str):
        super().__init__()
        self.proj = nn.Sequential(
            SmallMapSafeConv2d(in_dim, out_dim, 3, 2, padding=1, bias=False),
            get_norm(norm, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return to_channels_last(self.proj(to_channels_first(x)))


class DualFormer(nn.Module):
    """DualFormer feature extractor: stem and four stages, no classifier.

    ``forward`` returns the four stage outputs (NCHW, strides 4/8/16/32, ``channels``), each
    read after the stage's last block and before its downsampler.
    """

    def __init__(
        self,
        depths: Sequence[int],
        channels: Sequence[int],
        mlp_ratios: Sequence[float],
        num_heads: Sequence[int] = NUM_HEADS,
        downsample_rates: Sequence[int] = DOWNSAMPLE_RATES,
        drop_path_rate: float = 0.0,
        norm: str = "BN",
        hash_seed: int = 0,
        intra_mode: str = "pool",
        use_checkpoint: bool = False,
    ):
        """
        Args:
            mlp_ratios: FFN hidden width over C per stage (PVTv2's convention).
            num_heads, downsample_rates: MHPA heads and resolution reduction k per stage.
            norm: norm of every BatchNorm (stem, downsamplers, MBConv, MHPA reduction).
            hash_seed: seed of the first block's LSH hyperplanes; block i uses hash_seed + i.
            intra_mode: "pool" (one proxy per partition) or "token" (see the module docstring).
        """
        super().__init__()
        stage_args = dict(depths=depths, channels=channels, mlp_ratios=mlp_ratios,
                          num_heads=num_heads, downsample_rates=downsample_rates)  # fmt: skip
        for name, value in stage_args.items():
            if len(value) != 4:
                raise ValueError(f"{name}={tuple(value)}: expected 4 stages")
        self.channels = list(channels)
        self.stem = Stem(channels[0], norm)
        # stochastic depth rises linearly over all blocks
        drop_paths = torch.linspace(
            0, drop_path_rate, sum(depths), device="cpu"
        ).tolist()
        self.stages = nn.ModuleList()
        index = 0
        for i, depth in enumerate(depths):
            blocks = []
            for _ in range(depth):
                blocks.append(
                    DualBlock(channels[i], num_heads[i], downsample_rates[i], mlp_ratios[i],
                              drop_paths[index], norm, hash_seed + index, intra_mode)
                )  # fmt: skip
                index += 1
            downsample = (
                Downsample(channels[i], channels[i + 1], norm) if i < 3 else None
            )
            self.stages.append(Stage(blocks, downsample, use_checkpoint))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):  # 1x1 convolutions included
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        x = self.stem(x)
        outputs = []
        for stage in self.stages:
            out, x = stage(x)
            outputs.append(to_channels_first(out).contiguous())
        return outputs


class DualFormerClassifier(ClassifierMixin, DualFormer):
    """ImageNet classifier: the trunk, then LayerNorm(C4) -> global average pool -> Linear.

    The paper gives "global average pooling of the last stage -> head"; the final LayerNorm is
    ours (the residual stream is pre-norm, as Swin / PVT, which normalise it before pooling).
    Registered with timm as ``hybrid_dualformer_{tiny,xsmall,small,base}``.
    """

    TAIL = ("norm", "head")  # the modules the trunk does not have

    def _init_tail(self, variant: str, drop_path_rate: float, settings: dict) -> int:
        self.norm = nn.LayerNorm(self.channels[-1])
        return self.channels[-1]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> the normalised last stage, (B, C4, H/32, W/32)."""
        return channel_norm(self.norm, DualFormer.forward(self, x)[-1])


FAMILY = BackboneFamily(
    name="dualformer",
    title="DualFormer",
    backbone_name="D2DualFormer",
    network=DualFormer,
    variants=VARIANTS,
    default_variant="small",
    classifier=DualFormerClassifier,
    timm_cfg=dict(first_conv="stem.proj.0"),
    options=(
        Option(
            "norm",
            'every BatchNorm (stem, downsamplers, MBConv, MHPA reduction): "SyncBN", "BN" or '
            '"FrozenBN"; no ImageNet statistics exist, so the configs train them ("SyncBN")',
            norm=True,
            config_default="SyncBN",
        ),
        Option(
            "downsample_rates",
            "MHPA resolution reduction k per stage: (4, 2, 1, 1) (default) or (8, 4, 2, 1)",
        ),
        Option(
            "intra_mode",
            'intra-partition attention: "pool" (one softmax-pooled proxy per partition, '
            'scattered back) or "token" (each token\'s softmax weight within its partition '
            "times its value)",
        ),
        Option(
            "hash_seed",
            "seed of the fixed LSH hyperplanes (buffers, saved in checkpoints); block i uses "
            "hash_seed + i",
        ),
    ),
    imagenet_drop_path=IMAGENET_DROP_PATH,
    network_options=lambda variant, options: dict(
        options, downsample_rates=tuple(options["downsample_rates"])
    ),
    stem_and_stages=lambda net: (net.stem, net.stages),
)

variant_config = FAMILY.variant_config  # a copy of a variant's table entry, checked


# Made here by register_family (hybrid_d2.layers.registration): the Detectron2 backbone
# D2DualFormer, its builder build_dualformer_backbone and the timm models hybrid_dualformer_tiny,
# hybrid_dualformer_xsmall, hybrid_dualformer_small, hybrid_dualformer_base.
D2DualFormer, build_dualformer_backbone = register_family(FAMILY, __name__)
