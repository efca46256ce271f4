"""Dynamic Mobile-Former backbone (Yun & Ro, "Dynamic Mobile-Former: Strengthening Dynamic
Convolution with Attention and Residual Connection in Kernel Space", arXiv:2304.07254; IEEE Access
2024), DMF-XXS / XS / S for Detectron2.

Architecture as the official classification model ``ysj9909/DMF`` (commit 929ae6db0e91, whose
layer shapes reproduce the paper's 25.1 / 19.8 / 15.1M parameters and 499 / 285 / 198M FLOPs): a
3x3 stem, the lite bottleneck (stage 1), then 11 DMF blocks that thread 6 learnable tokens of
dimension 192 (§3.1). Each block runs (code order; Fig. 2 is not in the text):

    Z <- Mobile2Former(X, Z)  # tokens attend to the block input X, no K/V projections (Eq. 3-5)
    Z <- Former(Z)            # pre-LN transformer block on the tokens, MLP ratio 2 (§3.4)
    X <- DYMobile(X, Z[:, 0]) # (stride-2 DW conv,) then dynamic residual pw / dw / pw convs (§3.3)
    X <- X + DropPath(IRFFN(GroupNorm(X)))  # IRFFN with GRN (Eq. 6-7)

Outputs res2 ... res5 are read after blocks 1, 3, 7, 10 (strides 4 / 8 / 16 / 32); the tokens are
not output. Module names mirror the official state-dict keys, so converting weights only drops
the classifier (hybrid_d2.checkpoint.dmf). Decisions (docs/dmf.md has the reasons):

* The official mmdet backbone hard-codes the XS architecture for all three names; each variant
  here follows paper Table 1 (``VARIANTS``).
* Dynamic convs run as one grouped convolution over the batch (exact; see
  ``DynamicResidualConv2d``); the 0.1 scale on the dynamic kernels is the official code's.
* The kernel attention's BatchNorm sees one pooled vector per image. It is built from
  ``pooled_norm``, by default "FrozenStatsBN" (running statistics, trainable affine): it works
  with one image per device. A batch-statistics norm there with one image raises a ValueError.
* ``frozen_blocks`` freezes leading DMF blocks only (parameters and eval mode), leaving the stem,
  the lite bottleneck and the tokens trainable: 4 is the official detection setting
  (``frozen_stages=1``), which the paper's detection parameter counts imply.
* GRN: "dmf_code" (default) is the official channels-first port, whose normaliser is ~1;
  "convnextv2" normalises over channels as ConvNeXt-V2. Same parameters either way.
* Dropout is 0 in detection and omitted; no classifier tail (end_*, channel_conv, bn, head).

``DMFClassifier`` is the ImageNet model (the trunk plus the official tail), registered with timm
as ``hybrid_dmf_<variant>`` (docs/pretraining.md).
"""

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.layers import FrozenBatchNorm2d
from detectron2.layers.batch_norm import NaiveSyncBatchNorm
from detectron2.utils import comm
from timm.layers import DropPath, trunc_normal_
from torch import nn

from ..layers import (
    BackboneFamily,
    Option,
    register_family,
    ClassifierMixin,
    Mlp,
    FrozenStatsBatchNorm2d,
    checkpointed,
    get_norm,
)

__all__ = [
    "FAMILY",
    "GRN_MODES",
    "VARIANTS",
    "CLASSIFIER_WIDTHS",
    "D2DynamicMobileFormer",
    "DMFClassifier",
    "DynamicMobileFormer",
    "DynamicResidualConv2d",
    "build_dmf_backbone",
    "variant_config",
]

# Paper Table 1: stem width, lite bottleneck (#exp, #out), per-block #exp, #out and cross-attention
# heads H, point-wise groups G and IRFFN ratio R; drop_path_rate is the paper's and the official
# detection configs' stochastic depth (§4.2).
VARIANTS = {
    "s": dict(
        stem=24,
        lite=(48, 24),
        expansions=(144, 120, 240, 216, 432, 512, 768, 1056, 1056, 1440, 1440),
        channels=(40, 40, 72, 72, 128, 128, 176, 176, 240, 240, 240),
        heads=(2, 2, 2, 2, 2, 4, 4, 4, 4, 8, 8),
        groups=4,
        ffn_ratio=2.7,
        drop_path_rate=0.1,
    ),
    "xs": dict(
        stem=16,
        lite=(32, 18),
        expansions=(108, 90, 180, 162, 324, 384, 576, 792, 792, 1080, 1080),
        channels=(30, 30, 54, 54, 96, 96, 132, 132, 180, 180, 180),
        heads=(2, 2, 2, 2, 2, 3, 3, 4, 4, 6, 6),
        groups=3,
        ffn_ratio=2.0,
        drop_path_rate=0.1,
    ),
    "xxs": dict(
        stem=12,
        lite=(24, 12),
        expansions=(72, 60, 120, 108, 216, 256, 384, 528, 528, 720, 720),
        channels=(20, 20, 36, 36, 64, 64, 88, 88, 120, 120, 120),
        heads=(2, 2, 2, 2, 2, 2, 2, 4, 4, 4, 4),
        groups=2,
        ffn_ratio=3.0,
        drop_path_rate=0.1,
    ),
}

BLOCK_STRIDES = (
    2,
    1,
    2,
    1,
    2,
    1,
    1,
    1,
    2,
    1,
    1,
)  # Table 1: downsampling before stages 2-5
OUTPUT_BLOCKS = (1, 3, 7, 10)  # last block of stages 2-5: res2 ... res5
NUM_TOKENS, TOKEN_DIM = 6, 192  # §3.6: "six global tokens with a dimension of 192"
FORMER_HEADS = 6  # official code: 192 // 32 (Table 1 prints "(8)")
FORMER_MLP_RATIO = 2  # §3.4: "An expansion ratio of 2 is utilized for FFN"
NUM_KERNELS = 8  # Table 1: "All dynamic residual convolutions ... use 8 static kernels"
DYNAMIC_SCALE = (
    0.1  # official code: W = W_agnostic + 0.1 * sum_k pi_k W_k (not in the paper)
)
# Drop path rises linearly over 13 slots as in the official code (11 blocks + the classifier's
# end_mobile2former and end_former); block i uses slot i.
DROP_PATH_SLOTS = 13
GRN_MODES = ("dmf_code", "convnextv2")
# Classifier tail (official dmf_final.py): channel_conv width and head.fc1 width per variant.
CLASSIFIER_WIDTHS = {"s": (1440, 1920), "xs": (1152, 1920), "xxs": (960, 1600)}


def _uses_statistics_of_one_sample(norm: nn.Module, batch: int) -> bool:
    """Whether a train-mode ``norm`` would compute batch statistics over a single sample."""
    if not norm.training or batch > 1 or isinstance(norm, FrozenStatsBatchNorm2d):
        return False
    if isinstance(norm, (nn.SyncBatchNorm, NaiveSyncBatchNorm)):
        return comm.get_world_size() == 1
    return isinstance(norm, nn.modules.batchnorm._BatchNorm)


class KernelAttention(nn.Module):
    """Kernel attention of a DYR conv (Fig. 3): concat(token 0, GAP(x)) -> 1x1 conv -> norm ->
    ReLU -> 1x1 conv -> sigmoid(logits / temperature), one score per kernel."""

    def __init__(
        self, in_channels: int, num_kernels: int, pooled_norm: str, temperature: float
    ):
        super().__init__()
        if temperature <= 0:
            raise ValueError(
                f"kernel temperature {temperature}: expected a positive number"
            )
        self.pooled_norm = pooled_norm
        self.temperature = temperature
        self.net1 = nn.Conv2d(TOKEN_DIM + in_channels, TOKEN_DIM, 1, bias=False)
        self.bn = get_norm(pooled_norm, TOKEN_DIM)
        self.net2 = nn.Conv2d(TOKEN_DIM, num_kernels, 1, bias=False)

    def forward(self, x: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) map and (B, 192) token 0 -> (B, K) scores in [0, 1]."""
        batch = x.shape[0]
        if _uses_statistics_of_one_sample(self.bn, batch):
            raise ValueError(
                f"pooled_norm={self.pooled_norm!r} (MODEL.DMF.POOLED_NORM): the kernel attention's "
                "BatchNorm sees one pooled vector per image, so training with 1 image per norm "
                "group has no batch statistics; set MODEL.DMF.POOLED_NORM to 'FrozenStatsBN' "
                "(the default) or 'FrozenBN', or train with >= 2 images per device"
            )
        pooled = F.adaptive_avg_pool2d(x, 1)
        # Fig. 3: "the global average pooled features of the input and the first global token
        # are concatenated" (token first, as the official code)
        features = torch.cat([token.to(pooled.dtype)[:, :, None, None], pooled], dim=1)
        logits = self.net2(F.relu(self.bn(self.net1(features))))
        return torch.sigmoid(logits.flatten(1) / self.temperature)


class DynamicResidualConv2d(nn.Module):
    """Dynamic residual convolution (Eq. 1-2): per sample b,
    W_b = static_weight + 0.1 * sum_k pi_{b,k} * weight[k], stride 1, "same" padding, no bias.

    ``static_weight`` is the input-agnostic kernel (random init), ``weight`` the K dynamic kernels
    (zero init, so the layer starts as a plain convolution). The batch runs as ONE grouped
    convolution: x as (1, B * C_in, H, W) with groups = groups * B and the B per-sample kernels
    stacked, which equals a loop of B plain convolutions.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        groups: int,
        pooled_norm: str,
        temperature: float = 1.0,
        num_kernels: int = NUM_KERNELS,
    ):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"channels {in_channels} -> {out_channels} not divisible by {groups}"
            )
        self.groups = groups
        self.padding = kernel_size // 2
        shape = (out_channels, in_channels // groups, kernel_size, kernel_size)
        self.static_weight = nn.Parameter(torch.empty(shape))
        self.weight = nn.Parameter(torch.zeros((num_kernels,) + shape))
        self.Kernel_Attention = KernelAttention(
            in_channels, num_kernels, pooled_norm, temperature
        )
        nn.init.kaiming_uniform_(
            self.static_weight
        )  # official init; dynamic kernels stay zero

    def kernels(self, scores: torch.Tensor) -> torch.Tensor:
        """(B, K) scores -> (B, C_out, C_in / groups, k, k) per-sample kernels (Eq. 1-2).

        Aggregated outside autocast in the parameters' precision, so that half-precision training
        cannot overflow or round the small dynamic terms away.
        """
        num_kernels = self.weight.shape[0]
        with torch.autocast(scores.device.type, enabled=False):
            dynamic = scores.to(self.weight.dtype) @ self.weight.view(num_kernels, -1)
            dynamic = dynamic.view((-1,) + self.static_weight.shape)
            return self.static_weight + DYNAMIC_SCALE * dynamic

    def forward(self, x: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        weights = self.kernels(self.Kernel_Attention(x, token))
        out = F.conv2d(
            x.reshape(1, batch * channels, height, width),
            weights.flatten(0, 1),
            padding=self.padding,
            groups=self.groups * batch,
        )
        return out.view(batch, -1, height, width)


class GRN(nn.Module):
    """Global response normalisation with residual, (1, C, 1, 1) ``gamma`` and ``beta``.

    "dmf_code": the official port, Nx = G / (mean of G over its size-1 last axis + 1e-6) ~ 1, so
    out ~ x * (1 + gamma) + beta. "convnextv2": Nx = G / (mean of G over channels + 1e-6).
    G is the L2 norm of x over (H, W), computed in at least fp32.
    """

    def __init__(self, channels: int, mode: str = "dmf_code"):
        super().__init__()
        if mode not in GRN_MODES:
            raise ValueError(f"unknown GRN mode {mode!r}; expected one of {GRN_MODES}")
        self.mode = mode
        self.gamma = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        response = torch.linalg.vector_norm(wide, dim=(2, 3), keepdim=True)
        mean_dim = -1 if self.mode == "dmf_code" else 1
        scale = (response / (response.mean(dim=mean_dim, keepdim=True) + 1e-6)).to(
            x.dtype
        )
        return self.gamma * (x * scale) + self.beta + x


class Bottleneck(nn.Module):
    """pw conv -> BN -> GELU -> 3x3 dw conv -> (BN | shortcut + GRN) -> GELU -> pw conv -> BN.

    Without ``grn``: the lite bottleneck of stage 1 (§3.6, no residual). With ``grn``: the IRFFN,
    Eq. (6)-(7): SC(X) = DWConv(X) + X, then GRN, and BN after both 1x1 convs (§3.5).
    """

    def __init__(
        self,
        in_channels: int,
        hidden: int,
        out_channels: int,
        norm: str,
        grn: Optional[str],
    ):
        super().__init__()
        self.pw_conv1 = nn.Conv2d(in_channels, hidden, 1, bias=False)
        self.bn1 = get_norm(norm, hidden)
        self.dw_conv = nn.Conv2d(
            hidden, hidden, 3, padding=1, groups=hidden, bias=False
        )
        if grn is None:
            self.bn2 = get_norm(norm, hidden)
        else:
            self.grn = GRN(hidden, grn)
        self.pw_conv2 = nn.Conv2d(hidden, out_channels, 1, bias=False)
        self.bn3 = get_norm(norm, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.bn1(self.pw_conv1(x)))
        if hasattr(self, "grn"):
            x = F.gelu(self.grn(self.dw_conv(x) + x))  # Eq. (7) shortcut, then GRN
        else:
            x = F.gelu(self.bn2(self.dw_conv(x)))
        return self.bn3(self.pw_conv2(x))


class Stem(nn.Module):
    """3x3 stride-2 conv with bias -> BN -> GELU (Table 1 "vanilla 3x3conv")."""

    def __init__(self, out_channels: int, norm: str):
        super().__init__()
        self.conv = nn.Conv2d(3, out_channels, 3, stride=2, padding=1)
        self.bn = get_norm(norm, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.bn(self.conv(x)))


class DynamicMobile(nn.Module):
    """DY-Mobile (§3.3): optional static stride-2 DW conv, then dynamic residual group pw conv,
    dw conv and group pw conv (linear bottleneck), GELU; no shortcut (official code)."""

    def __init__(
        self,
        in_channels: int,
        hidden: int,
        out_channels: int,
        stride: int,
        groups: int,
        norm: str,
        pooled_norm: str,
        temperature: float,
    ):
        super().__init__()
        if (
            stride == 2
        ):  # Table 1 "3x3 dwconv" downsampling, inside the stage's first block
            self.downsample = nn.Sequential(
                nn.Conv2d(
                    in_channels, in_channels, 3, 2, padding=1, groups=in_channels
                ),
                get_norm(norm, in_channels),
                nn.GELU(),
            )
        dynamic = dict(pooled_norm=pooled_norm, temperature=temperature)
        self.pw_conv1 = DynamicResidualConv2d(in_channels, hidden, 1, groups, **dynamic)
        self.bn1 = get_norm(norm, hidden)
        self.dw_conv = DynamicResidualConv2d(hidden, hidden, 3, hidden, **dynamic)
        self.bn2 = get_norm(norm, hidden)
        self.pw_conv2 = DynamicResidualConv2d(
            hidden, out_channels, 1, groups, **dynamic
        )
        self.bn3 = get_norm(norm, out_channels)

    def forward(self, x: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        x = F.gelu(self.bn1(self.pw_conv1(x, token)))
        x = F.gelu(self.bn2(self.dw_conv(x, token)))
        return self.bn3(self.pw_conv2(x, token))


class Mobile2Former(nn.Module):
    """Cross-attention from the local map to the tokens (Eq. 3-5) without K/V projections:
    q = W^Q LN(Z) in C_in channels split into H heads; K = V = X; Z' = LN(Z) + W^O(heads).
    """

    def __init__(self, channels: int, heads: int, drop_path: float):
        super().__init__()
        if channels % heads:
            raise ValueError(f"{channels} channels cannot be split into {heads} heads")
        self.heads = heads
        self.norm = nn.LayerNorm(TOKEN_DIM)
        self.q = nn.Linear(TOKEN_DIM, channels, bias=False)
        self.fc = nn.Linear(channels, TOKEN_DIM, bias=False)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        batch, channels = x.shape[:2]
        tokens = self.norm(tokens)
        q = self.q(tokens).view(batch, NUM_TOKENS, self.heads, -1).transpose(1, 2)
        # heads are contiguous channel groups of X; scale (C / H) ** -0.5
        kv = (
            x.flatten(2)
            .view(batch, self.heads, channels // self.heads, -1)
            .transpose(2, 3)
        )
        out = F.scaled_dot_product_attention(q, kv.to(q.dtype), kv.to(q.dtype))
        out = out.transpose(1, 2).reshape(batch, NUM_TOKENS, channels)
        return tokens + self.drop_path(
            self.fc(out)
        )  # residual on the normalised tokens (code)


class TokenAttention(nn.Module):
    """Multi-head self-attention on the tokens: qkv without bias, proj with bias."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, length, dim = tokens.shape
        qkv = (
            self.qkv(tokens)
            .view(batch, length, 3, self.heads, -1)
            .permute(2, 0, 3, 1, 4)
        )
        out = F.scaled_dot_product_attention(*qkv.unbind(0))
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class Former(nn.Module):
    """Pre-LN Transformer block on the tokens (§3.4)."""

    def __init__(self, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(TOKEN_DIM)
        self.token_attention = TokenAttention(TOKEN_DIM, FORMER_HEADS)
        self.norm2 = nn.LayerNorm(TOKEN_DIM)
        self.mlp = Mlp(
            TOKEN_DIM, FORMER_MLP_RATIO * TOKEN_DIM, bias=False
        )  # official: no biases
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens + self.drop_path(self.token_attention(self.norm1(tokens)))
        return tokens + self.drop_path(self.mlp(self.norm2(tokens)))


class DMFBlock(nn.Module):
    """Mobile2Former -> Former -> DY-Mobile(token 0) -> pre-GroupNorm IRFFN with residual."""

    def __init__(
        self,
        in_channels: int,
        hidden: int,
        out_channels: int,
        stride: int,
        heads: int,
        groups: int,
        ffn_ratio: float,
        drop_path: float,
        norm: str,
        pooled_norm: str,
        temperature: float,
        grn: str,
    ):
        super().__init__()
        self.mobile2former = Mobile2Former(in_channels, heads, drop_path)
        self.former = Former(drop_path)
        self.dynamic_mobile = DynamicMobile(
            in_channels,
            hidden,
            out_channels,
            stride,
            groups,
            norm,
            pooled_norm,
            temperature,
        )
        self.norm = nn.GroupNorm(1, out_channels)
        ffn_hidden = int(out_channels * ffn_ratio)
        self.ffn = Bottleneck(out_channels, ffn_hidden, out_channels, norm, grn=grn)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(
        self, x: torch.Tensor, tokens: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        tokens = self.former(
            self.mobile2former(x, tokens)
        )  # on the pre-downsample input
        x = self.dynamic_mobile(x, tokens[:, 0])
        return x + self.drop_path(self.ffn(self.norm(x))), tokens


class DynamicMobileFormer(nn.Module):
    """DMF feature extractor: stem, lite bottleneck, 11 DMF blocks and the 6 tokens; no classifier.

    ``forward`` returns the maps after blocks 1, 3, 7, 10 (NCHW, strides 4 / 8 / 16 / 32, channels
    ``self.channels``).
    """

    def __init__(
        self,
        stem: int,
        lite: Tuple[int, int],
        expansions: Sequence[int],
        channels: Sequence[int],
        heads: Sequence[int],
        groups: int,
        ffn_ratio: float,
        drop_path_rate: Optional[float] = None,
        norm: str = "BN",
        pooled_norm: str = "FrozenStatsBN",
        temperature: float = 1.0,
        grn: str = "dmf_code",
        use_checkpoint: bool = False,
    ):
        super().__init__()
        if not len(expansions) == len(channels) == len(heads) == len(BLOCK_STRIDES):
            raise ValueError(
                f"expected {len(BLOCK_STRIDES)} blocks of expansions/channels/heads"
            )
        self.use_checkpoint = use_checkpoint
        self.channels = [channels[i] for i in OUTPUT_BLOCKS]
        self.tokens = nn.Parameter(
            torch.randn(1, NUM_TOKENS, TOKEN_DIM)
        )  # N(0, 1), official
        self.stem = Stem(stem, norm)
        self.lite_bottleneck = Bottleneck(stem, lite[0], lite[1], norm, grn=None)
        drop_paths = torch.linspace(
            0, drop_path_rate, DROP_PATH_SLOTS, device="cpu"
        ).tolist()
        in_channels = [lite[1]] + list(channels[:-1])
        self.blocks = nn.ModuleList(
            DMFBlock(
                in_channels[i],
                expansions[i],
                channels[i],
                BLOCK_STRIDES[i],
                heads[i],
                groups,
                ffn_ratio,
                drop_paths[i],
                norm,
                pooled_norm,
                temperature,
                grn,
            )
            for i in range(len(BLOCK_STRIDES))
        )
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # official init; norms keep PyTorch's (1, 0), DYR convs and GRN their own
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out")
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return self.forward_with_tokens(x)[0]

    def forward_with_tokens(
        self, x: torch.Tensor
    ) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """The four outputs and the (B, 6, 192) tokens after the last block."""
        x = self.lite_bottleneck(self.stem(x))
        tokens = self.tokens.expand(x.shape[0], -1, -1)
        outputs = []
        for i, block in enumerate(self.blocks):
            if self.use_checkpoint and self.training:
                x, tokens = checkpointed(block, x, tokens)
            else:
                x, tokens = block(x, tokens)
            if i in OUTPUT_BLOCKS:
                outputs.append(x)
        return outputs, tokens


def _network_options(variant: str, options: Dict[str, Any]) -> Dict[str, Any]:
    """The network's names for the options (FROZEN_BLOCKS concerns only the freezing)."""
    options = dict(options, temperature=options["kernel_temperature"])
    del options["kernel_temperature"], options["frozen_blocks"]
    return options


def _frozen_modules(backbone: nn.Module, freeze_at: int) -> List[nn.Module]:
    """By ``freeze_at``: the stem, lite bottleneck and tokens (>= 1) and the blocks of res2 ...
    res_k (k >= 2); and the first ``frozen_blocks`` blocks whatever ``freeze_at``. DMF has no
    stage modules (11 blocks in one list), so freezing works on blocks."""
    frozen_blocks, net = backbone.options["frozen_blocks"], backbone.net
    if not 0 <= frozen_blocks <= len(BLOCK_STRIDES):
        raise ValueError(
            f"frozen_blocks={frozen_blocks}: expected 0 ... {len(BLOCK_STRIDES)}"
        )
    num_blocks = frozen_blocks
    if freeze_at >= 2:
        num_blocks = max(num_blocks, OUTPUT_BLOCKS[freeze_at - 2] + 1)
    frozen = list(net.blocks[:num_blocks])
    if freeze_at >= 1:
        frozen += [net.stem, net.lite_bottleneck]
        net.tokens.requires_grad = False
    return frozen


class DMFClassifier(ClassifierMixin, DynamicMobileFormer):
    """The official ImageNet model (paper §3.6; official ``dmf_final.py``): the trunk, then on the
    tokens a last Mobile2Former and Former (``end_mobile2former``, ``end_former``), a dynamic
    residual 1x1 conv to ``CLASSIFIER_WIDTHS[0]`` channels (``channel_conv``) with BatchNorm
    (``bn``) and GELU, and ``head``: concat(GAP(map), token 0) -> fc1 -> Hardswish -> dropout ->
    fc2. Registered with timm as ``hybrid_dmf_{xxs,xs,s}``.

    ``forward_features`` returns the map with token 0 broadcast over it as extra channels, so the
    shared average pool gives concat(GAP(map), token 0) exactly. ``drop_rate`` is the head's
    dropout (the official code also drops inside the trunk; ours has no dropout there). Every
    BatchNorm, the kernel attentions' included, uses batch statistics in training, as the
    official code (ImageNet batches are large).
    """

    # the modules the trunk does not have
    TAIL = ("end_mobile2former", "end_former", "channel_conv", "bn", "head")
    FEATURE_MODULES = tuple(f"blocks.{i}" for i in OUTPUT_BLOCKS)  # no stage modules

    NETWORK_DEFAULTS = {"norm": "BN", "pooled_norm": "BN", "temperature": 1.0}

    def _init_tail(self, variant: str, drop_path_rate: float, settings: dict) -> int:
        config = self.family.architecture(variant)
        width, hidden = CLASSIFIER_WIDTHS[variant]
        channels = config["channels"][-1]
        # drop path slots 11 and 12 (module docstring, DROP_PATH_SLOTS)
        end_rates = torch.linspace(0, drop_path_rate, DROP_PATH_SLOTS, device="cpu")[
            -2:
        ].tolist()
        self.end_mobile2former = Mobile2Former(
            channels, config["heads"][-1], end_rates[0]
        )
        self.end_former = Former(end_rates[1])
        self.channel_conv = DynamicResidualConv2d(
            channels,
            width,
            1,
            1,
            settings["pooled_norm"],
            temperature=settings["temperature"],
        )
        self.bn = get_norm(settings["norm"], width)
        tail = (self.end_mobile2former, self.end_former, self.channel_conv, self.bn)
        for module in tail:
            module.apply(self._init_weights)
        nn.init.kaiming_uniform_(
            self.channel_conv.static_weight
        )  # as DynamicResidualConv2d
        self.hidden = hidden
        return width + TOKEN_DIM

    def _init_head(self, num_features: int, num_classes: int, drop_rate: float) -> None:
        super()._init_head(num_features, num_classes, drop_rate)
        self.head_hidden_size = self.hidden

    def _new_classifier(self, num_classes: int) -> nn.Module:
        head = nn.Module()
        head.fc1 = nn.Linear(self.num_features, self.hidden)
        head.fc2 = (
            nn.Linear(self.hidden, num_classes) if num_classes > 0 else nn.Identity()
        )
        head.apply(self._init_weights)
        return head

    def reset_classifier(
        self, num_classes: int, global_pool: Optional[str] = None
    ) -> None:
        """A fresh ``head.fc2`` for ``num_classes`` (0: the fc1 features); fc1 is kept.
        ``global_pool`` as ClassifierMixin's."""
        self._set_global_pool(num_classes, global_pool)
        self.num_classes = num_classes
        fc2 = nn.Linear(self.hidden, num_classes) if num_classes > 0 else nn.Identity()
        self.head.fc2 = fc2.apply(self._init_weights)

    def get_classifier(self) -> nn.Module:
        return self.head.fc2

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, width + 192, H/32, W/32): the channel_conv map and token 0."""
        outputs, tokens = self.forward_with_tokens(x)
        x = outputs[-1]
        tokens = self.end_former(self.end_mobile2former(x, tokens))
        x = F.gelu(self.bn(self.channel_conv(x, tokens[:, 0])))
        token = tokens[:, 0, :, None, None].to(x.dtype).expand(-1, -1, *x.shape[-2:])
        return torch.cat([x, token], dim=1)  # §3.6: pooled local features, then token 0

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if not self.global_pool:  # the unpooled map (ClassifierMixin.forward_head)
            return x
        # §3.6: "two fully-connected layers with hard-swish in between"
        x = self.head_drop(F.hardswish(self.head.fc1(self.pool(x))))
        return x if pre_logits else self.head.fc2(x)


FAMILY = BackboneFamily(
    name="dmf",
    title="DMF",
    backbone_name="D2DynamicMobileFormer",
    network=DynamicMobileFormer,
    variants=VARIANTS,
    default_variant="s",
    classifier=DMFClassifier,
    # crop_pct: the official model's default config
    timm_cfg=dict(first_conv="stem.conv", crop_pct=0.9, classifier="head.fc2"),
    converter="hybrid_d2.checkpoint.dmf:convert_dmf",
    options=(
        Option(
            "norm",
            'the BatchNorms on feature maps: "BN", "SyncBN" (the paper\'s COCO runs) or "FrozenBN"',
            norm=True,
        ),
        Option(
            "pooled_norm",
            "the kernel attentions' BatchNorm, which sees one pooled vector per image "
            '(docs/dmf.md): "FrozenStatsBN" (running statistics, trainable affine: works with 1 '
            'image per device), "FrozenBN", or "BN" / "SyncBN" (batch statistics as in the '
            "official code; needs >= 2 images per norm group in training)",
            norm=True,
        ),
        Option(
            "kernel_temperature",
            "T in the kernel attention's sigmoid(logits / T); 1 in the official detection code",
            default=1.0,
        ),
        Option(
            "grn",
            'GRN of the IRFFN: "dmf_code" (the official code\'s, normaliser ~1) or "convnextv2"',
        ),
        Option(
            "frozen_blocks",
            "freeze DMF blocks 0 ... frozen_blocks - 1 (parameters and eval mode) and nothing "
            "else; 4 is the official detection setting (mmdet frozen_stages=1), which the paper's "
            "detection parameter counts imply. Applies on top of MODEL.BACKBONE.FREEZE_AT",
            default=0,
        ),
    ),
    output_norm=False,  # the official detection backbone has none
    network_options=_network_options,
    frozen_modules=_frozen_modules,
)

variant_config = FAMILY.variant_config  # a copy of a variant's table entry, checked


# Made here by register_family (hybrid_d2.layers.registration): the Detectron2 backbone
# D2DynamicMobileFormer, its builder build_dmf_backbone and the timm models hybrid_dmf_s,
# hybrid_dmf_xs, hybrid_dmf_xxs.
D2DynamicMobileFormer, build_dmf_backbone = register_family(FAMILY, __name__)
