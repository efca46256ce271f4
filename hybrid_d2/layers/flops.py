"""fvcore FLOP counting that also sees the attention ops fvcore has no handle for.

Convention as fvcore's and the papers' tables: one multiply-add = one FLOP; softmax, GELU and
other element-wise ops are not counted.
"""

from typing import Any, Dict, List

import torch
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import Handle, get_shape
from torch import nn

from .dilated_attention import FLOP_OP_NAME as DILATED_ATTENTION_OP
from .dilated_attention import traced_as_one_node

__all__ = ["FLOP_HANDLES", "flop_count_analysis"]


def _prod(shape: List[int]) -> int:
    result = 1
    for size in shape:
        result *= size
    return result


def _sdpa_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """scaled_dot_product_attention: q.k^T and weights.v, (batch) * L * S * (E + Ev)."""
    q, k, v = (get_shape(x) for x in inputs[:3])
    return _prod(q[:-1]) * k[-2] * (q[-1] + v[-1])


def _baddbmm_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """baddbmm(bias, a, b): the (B, n, k) @ (B, k, m) product, B * n * k * m."""
    a, b = get_shape(inputs[1]), get_shape(inputs[2])
    return _prod(a) * b[-1]


def _tuple_items(value: Any) -> List[Any]:
    """The traced values of a tuple output, read from the prim::TupleUnpack that consumes it."""
    unpack = next(use.user for use in value.uses() if use.user.kind() == "prim::TupleUnpack")
    return list(unpack.outputs())


def _dilated_attention_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """hybrid_d2.layers.dilated_attention: q.k and weights.v per query and key, that is
    2 * numel(weights) * head_dim, what fvcore counts for the official unfold + matmul form."""
    out, weights = (get_shape(v) for v in _tuple_items(outputs[0]))
    return 2 * _prod(weights) * (out[1] // weights[1])


FLOP_HANDLES: Dict[str, Handle] = {
    "aten::scaled_dot_product_attention": _sdpa_flop_jit,
    "aten::baddbmm": _baddbmm_flop_jit,
    DILATED_ATTENTION_OP: _dilated_attention_flop_jit,
}


class _FlopCountAnalysis(FlopCountAnalysis):
    """Traces dilated attention as the one node that its FLOP handle reads."""

    def _analyze(self):
        with traced_as_one_node():
            return super()._analyze()


def flop_count_analysis(model: nn.Module, inputs: Any) -> FlopCountAnalysis:
    """``fvcore.nn.FlopCountAnalysis`` with ``FLOP_HANDLES`` added, which also counts dilated
    attention (a plain ``FlopCountAnalysis`` traces it as element-wise ops that fvcore skips)."""
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    return _FlopCountAnalysis(model, inputs).set_op_handle(**FLOP_HANDLES)
