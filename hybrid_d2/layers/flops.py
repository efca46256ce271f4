"""fvcore FLOP counting that also sees the attention ops fvcore has no handle for.

Convention as fvcore's and the papers' tables: one multiply-add = one FLOP; softmax, GELU and
other element-wise ops are not counted.

Two conventions (``flop_count_analysis(..., convention=...)``):

- ``"fvcore"``: every product, attention included.
- ``"mmcv"``: what mmcv's ``get_model_complexity_info`` (the counter behind most papers' detection
  tables) sees, which counts layers, not functional ops: no attention products (SDPA, dilated
  attention, and any matmul / bmm / einsum / baddbmm whose operands all depend on the input) and
  no convolution whose kernel depends on the input (dynamic kernels). A product with one operand
  computed from parameters alone is a linear layer written functionally and is counted.
"""

import contextlib
from collections import Counter
from typing import Any, Callable, Dict, Iterator, List

import torch
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.flop_count import _DEFAULT_SUPPORTED_OPS  # fvcore's own handles
from fvcore.nn.jit_handles import (
    Handle,
    bmm_flop_jit,
    conv_flop_jit,
    einsum_flop_jit,
    get_shape,
    matmul_flop_jit,
)
from torch import nn

from .dilated_attention import FLOP_OP_NAME as DILATED_ATTENTION_OP
from .dilated_attention import traced_as_one_node

__all__ = [
    "CONVENTIONS",
    "FLOP_HANDLES",
    "MMCV_FLOP_HANDLES",
    "flop_count_analysis",
    "flop_totals",
]


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
    unpack = next(
        use.user for use in value.uses() if use.user.kind() == "prim::TupleUnpack"
    )
    return list(unpack.outputs())


def _dilated_attention_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """hybrid_d2.layers.dilated_attention: q.k and weights.v per query and key, that is
    2 * numel(weights) * head_dim, what fvcore counts for the official unfold + matmul form.
    """
    out, weights = (get_shape(v) for v in _tuple_items(outputs[0]))
    return 2 * _prod(weights) * (out[1] // weights[1])


FLOP_HANDLES: Dict[str, Handle] = {
    "aten::scaled_dot_product_attention": _sdpa_flop_jit,
    "aten::baddbmm": _baddbmm_flop_jit,
    DILATED_ATTENTION_OP: _dilated_attention_flop_jit,
}


# The traced graph's inputs are the model's flattened input tensors, then its parameters and
# buffers; _FlopCountAnalysis sets how many come first while it traces, and a memo of which traced
# values depend on them.
_traced: Dict[str, Any] = {"inputs": 0, "memo": {}}


@contextlib.contextmanager
def _tracing_inputs(inputs: Any) -> Iterator[None]:
    _traced.update(inputs=len(torch.jit._flatten(inputs)[0]), memo={})
    try:
        yield
    finally:
        _traced.update(inputs=0, memo={})


def _depends_on_input(value: Any) -> bool:
    """Whether a traced value is computed from the model's inputs (not from parameters, buffers
    and constants alone). Shapes (``aten::size``) do not count as values of the input.
    """
    memo, stack = _traced["memo"], [value]
    while stack:
        current = stack[-1]
        if current.unique() in memo:
            stack.pop()
            continue
        node = current.node()
        if node.kind() == "prim::Param":
            index = [v.unique() for v in node.outputs()].index(current.unique())
            memo[current.unique()] = index < _traced["inputs"]
        elif node.kind() == "aten::size":
            memo[current.unique()] = False
        else:
            pending = [v for v in node.inputs() if v.unique() not in memo]
            if pending:
                stack.extend(pending)
                continue
            memo[current.unique()] = any(memo[v.unique()] for v in node.inputs())
        stack.pop()
    return memo[value.unique()]


def _list_items(value: Any) -> List[Any]:
    node = value.node()
    return list(node.inputs()) if node.kind() == "prim::ListConstruct" else [value]


def _unless_all_dynamic(
    handle: Handle, operands: Callable[[List[Any]], List[Any]]
) -> Handle:
    """``handle`` for products with an operand computed from parameters alone (a linear layer),
    zero for products of input-dependent operands (attention)."""

    def counted(inputs: List[Any], outputs: List[Any]) -> Any:
        if all(_depends_on_input(x) for x in operands(inputs)):
            return 0
        return handle(inputs, outputs)

    return counted


def _static_kernel_conv_flop_jit(inputs: List[Any], outputs: List[Any]) -> Any:
    """A convolution counts unless its kernel is computed from the input (dynamic kernel)."""
    return 0 if _depends_on_input(inputs[1]) else conv_flop_jit(inputs, outputs)


def _no_flops(inputs: List[Any], outputs: List[Any]) -> int:
    return 0


MMCV_FLOP_HANDLES: Dict[str, Handle] = {
    "aten::scaled_dot_product_attention": _no_flops,
    DILATED_ATTENTION_OP: _no_flops,
    "aten::matmul": _unless_all_dynamic(matmul_flop_jit, lambda inputs: inputs[:2]),
    "aten::bmm": _unless_all_dynamic(bmm_flop_jit, lambda inputs: inputs[:2]),
    "aten::einsum": _unless_all_dynamic(
        einsum_flop_jit, lambda inputs: _list_items(inputs[1])
    ),
    "aten::baddbmm": _unless_all_dynamic(_baddbmm_flop_jit, lambda inputs: inputs[1:3]),
    "aten::_convolution": _static_kernel_conv_flop_jit,
}

CONVENTIONS: Dict[str, Dict[str, Handle]] = {
    "fvcore": FLOP_HANDLES,
    "mmcv": MMCV_FLOP_HANDLES,
}
_NOT_IN_MMCV = " (not in mmcv)"


def _number(count: Any) -> int:
    return sum(count.values()) if isinstance(count, Counter) else count


def _split_handle(op: str, handle: Handle, mmcv_handle: Handle) -> Handle:
    """A handle that files ``op``'s FLOPs under its name as far as mmcv counts them and under
    name + _NOT_IN_MMCV for the rest."""
    name = op.split("::")[-1]

    def split(inputs: List[Any], outputs: List[Any]) -> Counter:
        total, mmcv = _number(handle(inputs, outputs)), _number(
            mmcv_handle(inputs, outputs)
        )
        return Counter({name: mmcv, name + _NOT_IN_MMCV: total - mmcv})

    return split


class _FlopCountAnalysis(FlopCountAnalysis):
    """Traces dilated attention as the one node that its FLOP handle reads, and tells the mmcv
    handles which traced values are the model's inputs."""

    def _analyze(self):
        with traced_as_one_node(), _tracing_inputs(self._inputs):
            return super()._analyze()


def flop_count_analysis(
    model: nn.Module, inputs: Any, convention: str = "fvcore"
) -> FlopCountAnalysis:
    """``fvcore.nn.FlopCountAnalysis`` with the handles of ``convention`` (see the module
    docstring) added; ``"fvcore"`` also counts dilated attention (a plain ``FlopCountAnalysis``
    traces it as element-wise ops that fvcore skips)."""
    if convention not in CONVENTIONS:
        raise ValueError(
            f"unknown FLOP convention {convention!r}; expected one of {sorted(CONVENTIONS)}"
        )
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    return _FlopCountAnalysis(model, inputs).set_op_handle(**CONVENTIONS[convention])


def flop_totals(model: nn.Module, inputs: Any) -> Dict[str, int]:
    """Total FLOPs of ``model`` on ``inputs`` in each convention, {"fvcore": ..., "mmcv": ...},
    from one trace (each equals ``flop_count_analysis(model, inputs, convention).total()``).
    """
    handles = {**_DEFAULT_SUPPORTED_OPS, **FLOP_HANDLES}
    split = {
        op: _split_handle(op, handles[op], h) for op, h in MMCV_FLOP_HANDLES.items()
    }
    analysis = flop_count_analysis(model, inputs).set_op_handle(**split)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    by_operator = analysis.by_operator()
    not_in_mmcv = sum(n for op, n in by_operator.items() if op.endswith(_NOT_IN_MMCV))
    total = sum(by_operator.values())
    return {"fvcore": total, "mmcv": total - not_in_mmcv}
