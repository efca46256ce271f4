"""DMFormer backbone (Wei et al., "DMFormer: Closing the Gap Between CNN and Vision Transformers",
ICASSP 2023, arXiv 2209.07738) for Detectron2.

The paper publishes no code and no weights, and its text leaves the stem widths, the inter-stage
downsampling, the MLP's contents and the gate's width open. Each is resolved by reproducing the
paper's parameter and FLOP counts (docs/dmformer.md has the derivation):

* stem (§2.2): 7x7 s2 -> 3x3 s1 -> 2x2 s2 convs, 64 channels throughout, BN (+ ReLU on the first
  two);
* downsampling before stages 2-4: 3x3 stride-2 conv + BN (as VAN's OverlapPatchEmbed);
* MLP (Eq. 6): fc1 -> depth-wise 3x3 -> GELU -> fc2 (the text names only the two FCs; every
  reported count needs the depth-wise conv, as in VAN); training keeps the GELU's input, not
  its output, for fc2's backward (recomputed: hybrid_d2.layers.gelu_linear);
* gate (Eq. 2): FC(C -> C) -> ReLU -> FC(C -> C) -> sigmoid, from GAP of the DMA input.

Additions for detection:

* Every BatchNorm is built from ``norm`` (Detectron2's names: "SyncBN" by default in the configs,
  "BN", "FrozenBN"); frozen stages get FrozenBatchNorm2d.
* The 2x2 stride-2 stem conv zero-pads an odd map on the bottom/right, so that res2 ... res5 are
  ceil(H / stride) like every backbone of this package (the paper's stem drops the last row).
* The three dilated depth-wise branches can run as three convs ("separate") or as one depth-wise
  conv whose 19x19 kernel is the sum of the three dilated kernels ("fused"); both compute the same
  function of the same parameters. The default "auto" takes whichever measured faster on CPU
  (docs/dmformer.md): fused for CPU inference; separate for training (each a
  ``DepthwiseConv2d``, whose CPU path turns the dilation into undilated convs over sub-grids and
  runs a faster backward: hybrid_d2.layers.depthwise), on CUDA and under FLOP tracing.
* On CPU the blocks run on channels-last maps, in training and inference: their 1x1 convs run
  as GEMMs over the (B, H, W, C) view (``Pointwise``) and oneDNN's depth-wise kernels are faster
  there. The stem runs channels-first when it is trained (oneDNN's backward of its dense convs
  is slower channels-last), channels-last otherwise; the outputs come back in the caller's
  layout (docs/dmformer.md, "Layout").

``DMFormerClassifier`` is the ImageNet model (the trunk plus LayerNorm, average pool and Linear:
the paper describes no head; VAN's gives its parameter counts), registered with timm as
``hybrid_dmformer_<variant>`` (docs/pretraining.md).
"""

from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import nn

from ..layers import (
    BackboneFamily,
    Option,
    register_family,
    ClassifierMixin,
    DepthwiseConv2d,
    SmallMapSafeConv2d,
    Stage,
    channel_norm,
    gelu_linear,
    get_norm,
    inference_affine,
    pointwise_linear,
)

__all__ = [
    "FAMILY",
    "BRANCH_MODES",
    "VARIANTS",
    "D2DMFormer",
    "DMFormer",
    "DMFormerClassifier",
    "build_dmformer_backbone",
    "variant_config",
]

# Paper Table 2. drop_path_rate is our detection default (the paper never mentions drop path).
VARIANTS = {
    "s": dict(depths=(2, 2, 6, 2), drop_path_rate=0.1),
    "l": dict(depths=(3, 3, 12, 3), drop_path_rate=0.2),
}
DIMS = (64, 128, 320, 512)  # Table 2: C1 ... C4, both variants
MLP_RATIOS = (8, 8, 4, 4)  # Table 2: ER
DMA_RATIO = 4  # Table 2: r
KERNELS = (3, 5, 7)  # §2.1: "3x3, 5x5, 7x7 depth-wise convolution"
DILATIONS = (
    1,
    2,
    3,
)  # §2.1: "for branches with kernel size 5x5 and 7x7 ... dilated rates 2, 3"
BRANCH_MODES = ("auto", "separate", "fused")


def uses_fused_branches(mode: str, x: torch.Tensor) -> bool:
    """Whether the dilated branches run fused: always for "fused", never for "separate"; for
    "auto" in CPU inference only (no autograd, not traced), where it is the faster form
    (docs/dmformer.md). Training and FLOP counting see the three convs of the paper, each a
    ``DepthwiseConv2d`` (hybrid_d2.layers.depthwise)."""
    if mode == "auto":
        return (
            x.device.type == "cpu"
            and not torch.is_grad_enabled()
            and not torch.jit.is_tracing()
        )
    return mode == "fused"


# ImageNet stochastic depth: ours, as VAN-B1 / B2 (the paper gives none)
IMAGENET_DROP_PATH = {"s": 0.1, "l": 0.2}


class Pointwise(nn.Conv2d):
    """1x1 conv. On a channels-last map it runs as one GEMM over the (B, H, W, C) view, without a
    layout copy; PyTorch's conv dispatch sends 1x1 convs to its slower im2col path on one thread.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._over_channels(pointwise_linear, x)

    def after_gelu(self, x: torch.Tensor) -> torch.Tensor:
        """``forward(GELU(x))``; training keeps x, not GELU(x) (hybrid_d2.layers.gelu_linear)."""
        return self._over_channels(gelu_linear, x)

    def _over_channels(self, linear: Callable, x: torch.Tensor) -> torch.Tensor:
        """``linear(x, weight, bias)``: over the (B, H, W, C) view of a channels-last map, as a
        1x1 conv otherwise."""
        if x.is_contiguous(memory_format=torch.channels_last):
            out = linear(x.permute(0, 2, 3, 1), self.weight.flatten(1), self.bias)
            return out.permute(0, 3, 1, 2)
        return linear(x, self.weight, self.bias)


class ConvStem(nn.Module):
    """§2.2 Eq. (4): 7x7 s2 -> 3x3 s1 -> non-overlapping 2x2 s2 conv; (B, 3, H, W) -> stride 4."""

    def __init__(self, dim: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(3, dim, 7, stride=2, padding=3)
        self.norm1 = get_norm(norm, dim)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1)
        self.norm2 = get_norm(norm, dim)
        self.conv3 = nn.Conv2d(dim, dim, 2, stride=2)
        self.norm3 = get_norm(norm, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """-> (B, C, ceil(H / 4), ceil(W / 4)); an odd stride-2 map is zero-padded bottom/right."""
        x = F.relu(self.norm1(self.conv1(x)))
        x = F.relu(self.norm2(self.conv2(x)))
        height, width = x.shape[-2:]
        x = F.pad(x, (0, width % 2, 0, height % 2))
        return self.norm3(self.conv3(x))


class Downsample(nn.Module):
    """Between stages: 3x3 stride-2 conv C_in -> C_out, then BN; (H, W) -> ceil((H, W) / 2)."""

    def __init__(self, in_dim: int, out_dim: int, norm: str):
        super().__init__()
        self.conv = SmallMapSafeConv2d(in_dim, out_dim, 3, stride=2, padding=1)
        self.norm = get_norm(norm, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class DilatedBranches(nn.Module):
    """Eq. (1) X1 + X2 + X3: parallel depth-wise convs with kernels k_i and dilations d_i, summed.

    "separate" runs one conv per branch; "fused" one depth-wise conv whose kernel (side
    max d_i (k_i - 1) + 1, 19 for 3/5/7 with 1/2/3) is the sum of the dilated branch kernels, with
    the summed biases. Both compute the same function of the same parameters.
    """

    def __init__(
        self, channels: int, kernels: Sequence[int], dilations: Sequence[int], mode: str
    ):
        super().__init__()
        if mode not in BRANCH_MODES:
            raise ValueError(
                f"unknown branch mode {mode!r}; expected one of {BRANCH_MODES}"
            )
        if len(kernels) != len(dilations) or any(k % 2 == 0 for k in kernels):
            raise ValueError(
                f"kernels {tuple(kernels)} and dilations {tuple(dilations)}: expected odd kernels, "
                "one dilation each"
            )
        self.mode = mode
        # depth-wise convs with a fast CPU backward (hybrid_d2.layers.depthwise)
        self.branches = nn.ModuleList(
            DepthwiseConv2d(channels, k, dilation=d) for k, d in zip(kernels, dilations)
        )

    def fused_kernel(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The (C, 1, S, S) kernel and (C,) bias of the single equivalent depth-wise conv."""
        span = max(
            conv.dilation[0] * (conv.kernel_size[0] - 1) + 1 for conv in self.branches
        )
        first = self.branches[0].weight
        weight = first.new_zeros(first.shape[0], 1, span, span)
        for conv in self.branches:
            d, k = conv.dilation[0], conv.kernel_size[0]
            start = (span - d * (k - 1) - 1) // 2
            taps = slice(start, start + d * (k - 1) + 1, d)
            weight[:, :, taps, taps] += conv.weight
        bias = sum(conv.bias for conv in self.branches)
        return weight, bias

    def forward(
        self,
        x: torch.Tensor,
        affine: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> torch.Tensor:
        """X1 + X2 + X3; in fused mode ``affine`` = (scale, shift) per channel may be folded into
        the kernel, giving scale * (X1 + X2 + X3) + shift in the same pass."""
        if uses_fused_branches(self.mode, x):
            weight, bias = self.fused_kernel()
            if affine is not None:
                scale, shift = affine
                weight, bias = weight * scale[:, None, None, None], bias * scale + shift
            return F.conv2d(
                x, weight, bias, padding=weight.shape[-1] // 2, groups=x.shape[1]
            )
        if affine is not None:
            raise ValueError("an affine map folds into the fused branches only")
        out = self.branches[0](x)
        for conv in self.branches[1:]:
            out = out + conv(x)
        return out


class DynamicMultilevelAttention(nn.Module):
    """DMA, §2.1 Eq. (1)-(3), on the block's BN-normalised (B, C, H, W) input X.

    XE = expand(X) (C -> rC, no activation); XP = ReLU(BN(X1 + X2 + X3)); X' = X + reduce(XP);
    output = sigmoid(FC(ReLU(FC(GAP(X))))) * proj(X'). ``gate=False`` drops the gate (output =
    proj(X')), the paper's "w/o gating" ablation.
    """

    def __init__(
        self,
        dim: int,
        ratio: int,
        kernels: Sequence[int],
        dilations: Sequence[int],
        norm: str,
        branches: str,
        gate: bool = True,
    ):
        super().__init__()
        hidden = dim * ratio
        self.expand = Pointwise(dim, hidden)
        self.branches = DilatedBranches(hidden, kernels, dilations, branches)
        self.norm = get_norm(norm, hidden)
        self.reduce = Pointwise(hidden, dim)
        self.proj = Pointwise(dim, dim)  # Eq. (3): a second 1x1 conv, on X'
        # Eq. (2): two FCs of width C (a reduction would miss the paper's parameter counts)
        self.gate = (
            nn.Sequential(
                nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.Sigmoid()
            )
            if gate
            else None
        )

    def channel_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Eq. (2): the (B, C, 1, 1) attention vector Attn in (0, 1) from GAP(X)."""
        return self.gate(x.mean(dim=(2, 3)))[:, :, None, None]

    def multi_level(self, x: torch.Tensor) -> torch.Tensor:
        """Eq. (1) XP = ReLU(BN(X1 + X2 + X3)) of XE = expand(X). When the branches run fused and
        the BN uses running statistics, the BN is folded into the fused kernel: one pass over
        the rC-channel map instead of two."""
        expanded = self.expand(x)
        affine = (
            inference_affine(self.norm)
            if uses_fused_branches(self.branches.mode, x)
            else None
        )
        if affine is not None:
            return F.relu_(self.branches(expanded, affine))
        return F.relu(self.norm(self.branches(expanded)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        multi_level = self.multi_level(x)
        out = self.proj(x + self.reduce(multi_level))  # Eq. (1) X', Eq. (3) Conv1x1(X')
        return out if self.gate is None else self.channel_attention(x) * out  # Eq. (3)


class Mlp(nn.Module):
    """Eq. (6) on (B, C, H, W): fc1 (1x1) -> depth-wise 3x3 (``dwconv``) -> GELU -> fc2 (1x1)."""

    def __init__(self, dim: int, ratio: int, dwconv: bool = True):
        super().__init__()
        hidden = dim * ratio
        self.fc1 = Pointwise(dim, hidden)
        self.dwconv = (
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
            if dwconv
            else nn.Identity()
        )
        self.fc2 = Pointwise(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2.after_gelu(self.dwconv(self.fc1(x)))


class DMFormerBlock(nn.Module):
    """Eq. (5)-(6): Y = X + DMA(BN(X)), Z = Y + MLP(BN(Y)), drop path on both residual branches."""

    def __init__(
        self,
        dim: int,
        mlp_ratio: int,
        mlp_dwconv: bool,
        drop_path: float,
        norm: str,
        **dma_args,
    ):
        """``dma_args``: the DynamicMultilevelAttention arguments other than dim and norm."""
        super().__init__()
        self.norm1 = get_norm(norm, dim)
        self.dma = DynamicMultilevelAttention(dim, norm=norm, **dma_args)
        self.norm2 = get_norm(norm, dim)
        self.mlp = Mlp(dim, mlp_ratio, mlp_dwconv)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.dma(self.norm1(x)))  # Eq. (5)
        return x + self.drop_path(self.mlp(self.norm2(x)))  # Eq. (6)


class DMFormer(nn.Module):
    """DMFormer feature extractor: conv stem and four stages, without the classification head.

    ``forward`` returns the four stage outputs (NCHW, strides 4/8/16/32, channels ``dims``), each
    taken after the stage's last block and before the downsampler that feeds the next stage.
    """

    def __init__(
        self,
        depths: Sequence[int],
        dims: Sequence[int] = DIMS,
        mlp_ratios: Sequence[int] = MLP_RATIOS,
        dma_ratio: int = DMA_RATIO,
        kernels: Sequence[int] = KERNELS,
        dilations: Sequence[int] = DILATIONS,
        gate: bool = True,
        mlp_dwconv: bool = True,
        drop_path_rate: float = 0.0,
        norm: str = "BN",
        branches: str = "auto",
        use_checkpoint: bool = False,
    ):
        """
        Args:
            depths, dims, mlp_ratios, dma_ratio: Table 2's N_i, C_i, ER and r.
            kernels, dilations: the DMA's depth-wise branches (§2.1).
            gate, mlp_dwconv: the resolved architecture when True; False gives the paper's
                "w/o gating" ablation and the text-literal MLP (two FCs only).
            norm: every BatchNorm ("BN", "SyncBN", "FrozenBN", ...).
            branches: "auto", "separate" or "fused" dilated depth-wise convs (module
                docstring; same function).
        """
        super().__init__()
        if not len(depths) == len(dims) == len(mlp_ratios) == 4:
            raise ValueError(
                f"depths {tuple(depths)}, dims {tuple(dims)}, mlp_ratios {tuple(mlp_ratios)}: "
                "expected 4 stages each"
            )
        self.channels = list(dims)
        self.branches = branches
        self.stem = ConvStem(dims[0], norm)
        # stochastic depth rises linearly over all blocks (timm / VAN rule)
        drop_paths = torch.linspace(
            0, drop_path_rate, sum(depths), device="cpu"
        ).tolist()
        dma_args = dict(
            ratio=dma_ratio,
            kernels=kernels,
            dilations=dilations,
            branches=branches,
            gate=gate,
        )
        self.stages = nn.ModuleList()
        for i, (dim, depth, ratio) in enumerate(zip(dims, depths, mlp_ratios)):
            first = sum(depths[:i])
            blocks = [
                DMFormerBlock(dim, ratio, mlp_dwconv, rate, norm, **dma_args)
                for rate in drop_paths[first : first + depth]
            ]
            downsample = Downsample(dim, dims[i + 1], norm) if i < 3 else None
            self.stages.append(Stage(blocks, downsample, use_checkpoint))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # VAN's initialisation (the paper states none); BatchNorms keep weight 1, bias 0
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            fan_out = (
                module.kernel_size[0] * module.kernel_size[1] * module.out_channels
            )
            nn.init.normal_(module.weight, 0.0, (2.0 * module.groups / fan_out) ** 0.5)
            nn.init.zeros_(module.bias)

    def _stem_layout(self, x: torch.Tensor) -> torch.memory_format:
        """The layout the stem runs in on CPU: channels-first when it will be differentiated
        (oneDNN's backward of its dense 3x3 conv at 64 channels is 2x slower channels-last),
        channels-last otherwise (its forward is 1.4x faster there; docs/dmformer.md, "Layout")."""
        trains = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.stem.parameters())
        )
        return torch.contiguous_format if trains else torch.channels_last

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        # On CPU the blocks run on channels-last maps: oneDNN's depth-wise kernels are fast there
        # and the 1x1 convs run as GEMMs (Pointwise). The outputs go back to the caller's layout,
        # since the FPN and heads after them train 15% slower on channels-last maps
        # (docs/dmformer.md, "Layout").
        caller_channels_last = x.is_contiguous(memory_format=torch.channels_last)
        if x.device.type == "cpu":
            x = self.stem(x.contiguous(memory_format=self._stem_layout(x)))
            x = x.contiguous(memory_format=torch.channels_last)
        else:
            x = self.stem(x)
        outputs = []
        for stage in self.stages:
            out, x = stage(x)
            outputs.append(out)
        if not caller_channels_last:
            outputs = [out.contiguous() for out in outputs]
        return outputs


class DMFormerClassifier(ClassifierMixin, DMFormer):
    """ImageNet classifier: the trunk, then LayerNorm(512) -> global average pool -> Linear.

    The paper does not describe its head; this one (VAN's) gives its parameter counts up to a
    0.08M offset (docs/dmformer.md). Registered with timm as ``hybrid_dmformer_{s,l}``.
    """

    TAIL = ("norm", "head")  # the modules the trunk does not have

    def _init_tail(self, variant: str, drop_path_rate: float, settings: dict) -> int:
        self.norm = nn.LayerNorm(self.channels[-1], eps=1e-6)
        return self.channels[-1]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> the normalised last stage, (B, C4, H/32, W/32)."""
        return channel_norm(self.norm, DMFormer.forward(self, x)[-1])


FAMILY = BackboneFamily(
    name="dmformer",
    title="DMFormer",
    backbone_name="D2DMFormer",
    network=DMFormer,
    variants=VARIANTS,
    default_variant="s",
    classifier=DMFormerClassifier,
    timm_cfg=dict(first_conv="stem.conv1"),
    options=(
        Option(
            "norm",
            'every BatchNorm: "SyncBN" (batch statistics over all devices, so that 1 image per '
            'device trains; Detectron2\'s naiveSyncBN off CUDA), "BN" (per-device statistics) '
            'or "FrozenBN" (fixed statistics, e.g. fine-tuning from ImageNet weights)',
            norm=True,
            config_default="SyncBN",
        ),
        Option(
            "branches",
            'the DMA\'s three dilated depth-wise convs: "separate" (three convs), "fused" (one '
            'depth-wise conv with the summed 19x19 kernel; same function) or "auto": fused for '
            "CPU inference, separate otherwise, the faster form of each as measured "
            "(docs/dmformer.md)",
        ),
    ),
    imagenet_drop_path=IMAGENET_DROP_PATH,
    stem_and_stages=lambda net: (net.stem, net.stages),
)

variant_config = FAMILY.variant_config  # a copy of a variant's table entry, checked


# Made here by register_family (hybrid_d2.layers.registration): the Detectron2 backbone D2DMFormer,
# its builder build_dmformer_backbone and the timm models hybrid_dmformer_s, hybrid_dmformer_l.
D2DMFormer, build_dmformer_backbone = register_family(FAMILY, __name__)
