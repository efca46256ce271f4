"""Operator classes for the profile mode: which kind of kernel an ATen operator's time is spent
in, and the floating-point operations it performs, so that a profile tells what fraction of a
step runs in the operators whose speed PyTorch itself sets (matrix products, convolutions, fused
attention) and at how many GFLOP/s."""

import math
from typing import Optional, Sequence

GEMM = "matrix products"
ATTENTION = "fused attention (SDPA)"
DENSE_CONV = "dense convolutions"
DEPTHWISE_CONV = "depth-wise convolutions"
GROUPED_CONV = "grouped convolutions"
NORM = "normalisations"
MOVEMENT = "copies, concatenations, gathers, padding"
ELEMENTWISE = "element-wise and reductions"
OUTSIDE_OPERATORS = "outside operators (Python, autograd)"
# The order of the columns in the tables; the first five run at a FLOP rate.
CLASSES = (
    GEMM, ATTENTION, DENSE_CONV, DEPTHWISE_CONV, GROUPED_CONV, NORM, MOVEMENT, ELEMENTWISE,
    OUTSIDE_OPERATORS,
)  # fmt: skip
COMPUTE_CLASSES = CLASSES[:5]

GEMM_OPERATORS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul",
                  "aten::linear"}  # fmt: skip
MOVEMENT_OPERATORS = {
    "aten::copy_", "aten::clone", "aten::contiguous", "aten::cat", "aten::stack", "aten::to",
    "aten::_to_copy", "aten::index", "aten::index_select", "aten::gather", "aten::scatter",
    "aten::scatter_add_", "aten::index_put_", "aten::_index_put_impl_", "aten::index_add_",
    "aten::constant_pad_nd", "aten::pad", "aten::roll", "aten::im2col", "aten::col2im",
    "aten::unfold_backward", "aten::repeat", "aten::_unsafe_index", "aten::masked_select",
    "aten::masked_scatter", "aten::slice_backward", "aten::select_backward", "aten::flip",
}  # fmt: skip


def convolution_class(name: str, shapes: Sequence, concrete: Sequence) -> str:
    """Dense, depth-wise (one input channel per group, groups > 1) or grouped, from the
    input's channels and the weight's shape; ``aten::convolution``'s and its backward's
    ``transposed`` and ``groups`` arguments where they are recorded."""
    if name == "aten::convolution_backward":
        image, weight, transposed, groups = shapes[1], shapes[2], concrete[7], concrete[9]
    elif name == "aten::convolution":
        image, weight, transposed, groups = shapes[0], shapes[1], concrete[6], concrete[8]
    else:  # a wrapper (aten::conv2d, ...): its own time is negligible, its class from the shapes
        image, weight = shapes[0], shapes[1]
        transposed = "transpose" in name
        groups = concrete[6] if transposed else image[1] // max(weight[1], 1)
    in_channels = image[1] if len(image) == len(weight) else image[0]  # unbatched inputs
    if groups == 1:
        return DENSE_CONV
    if groups == in_channels and (transposed or weight[1] == 1):
        return DEPTHWISE_CONV
    return GROUPED_CONV


def operator_class(name: str, shapes: Sequence, concrete: Sequence) -> Optional[str]:
    """The class of an ATen operator by its own name (and shapes), or None for one whose class is
    its caller's (a wrapper's child) or, called from module code, element-wise."""
    if name in GEMM_OPERATORS:
        return GEMM
    if name.startswith(("aten::_scaled_dot_product_", "aten::scaled_dot_product_attention")):
        return ATTENTION
    if name.startswith(("aten::conv", "aten::_convolution_mode")) and len(shapes) > 1:
        if len(shapes[0]) >= 3 and len(shapes[1]) >= 3:
            return convolution_class(name, shapes, concrete)
    if "norm" in name:  # layer, batch, group norms, forward and backward
        return NORM
    if name in MOVEMENT_OPERATORS:
        return MOVEMENT
    return None


def _convolution_flops(image: Sequence[int], weight: Sequence[int], out_spatial: Sequence[int],
                       transposed: bool) -> int:  # fmt: skip
    """2 FLOPs per multiply-add of one convolution: every output element sums (C / groups) x
    kernel products (transposed: every input element scatters into (out / groups) x kernel)."""
    if transposed:
        return 2 * image[0] * math.prod(image[1:]) * math.prod(weight[1:])
    return 2 * image[0] * weight[0] * math.prod(out_spatial) * math.prod(weight[1:])


def operator_flops(name: str, shapes: Sequence, concrete: Sequence) -> int:
    """The floating-point operations (2 per multiply-add) of one call of a matrix product,
    convolution (``aten::convolution`` and ``aten::convolution_backward``: the gradients it
    computes) or fused attention (a fused kernel: forward, and backward as its four products);
    0 for any other operator, including the wrappers and SDPA's unfused math path, whose
    children (matrix products) carry the count."""
    try:
        if name == "aten::mm":
            (m, k), (_, n) = shapes[0], shapes[1]
            return 2 * m * k * n
        if name == "aten::addmm":
            (m, k), (_, n) = shapes[1], shapes[2]
            return 2 * m * k * n
        if name in ("aten::bmm", "aten::baddbmm"):
            first = 0 if name == "aten::bmm" else 1
            (b, m, k), (_, _, n) = shapes[first], shapes[first + 1]
            return 2 * b * m * k * n
        if name == "aten::convolution":
            image, weight = shapes[0], shapes[1]
            stride, padding, dilation, transposed = concrete[3:7]
            out = [
                (size + 2 * pad - dil * (k - 1) - 1) // s + 1
                for size, k, s, pad, dil in zip(image[2:], weight[2:], stride, padding, dilation)
            ]
            return _convolution_flops(image, weight, out, transposed)
        if name == "aten::convolution_backward":
            grad_out, image, weight, transposed, mask = (
                shapes[0], shapes[1], shapes[2], concrete[7], concrete[10]
            )  # fmt: skip
            once = _convolution_flops(image, weight, grad_out[2:], transposed)
            return once * (int(mask[0]) + int(mask[1]))
        if name.startswith("aten::_scaled_dot_product_") and "_math" not in name:
            # a fused kernel; the math path's matrix products count as themselves
            backward = name.endswith("_backward")
            query, key, value = shapes[1:4] if backward else shapes[0:3]
            # Q K^T and P V; the backward: the four products of their gradients
            once = 2 * math.prod(query[:-1]) * key[-2] * (query[-1] + value[-1])
            return 2 * once if backward else once
    except (IndexError, TypeError, ValueError):  # a call with shapes not recorded
        return 0
    return 0
