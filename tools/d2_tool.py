#!/usr/bin/env python
"""Run one of Detectron2's own tools with hybrid_d2's config keys and backbones.

    python tools/d2_tool.py analyze_model --config-file configs/mixformer_b1_mask_rcnn_1x.yaml \\
        --tasks parameter
    python tools/d2_tool.py visualize_data --config-file CFG --source annotation --output-dir out/
    python tools/d2_tool.py path/to/detectron2/tools/benchmark.py --config-file CFG --task eval

Detectron2's tools build their config with ``get_cfg()``, which knows none of hybrid_d2's keys, so
a hybrid_d2 config fails there with "Non-existent config key". This wrapper imports hybrid_d2
(registering its backbones and the shapes datasets), makes ``detectron2.config.get_cfg`` add
hybrid_d2's keys, and runs the tool as ``__main__`` with the remaining arguments. A tool is named
by its module in Detectron2's installed ``tools`` package (the wheel ships analyze_model,
benchmark, visualize_data, visualize_json_results, ...) or by a path.
"""

import warnings

warnings.filterwarnings(  # Detectron2's dependencies' torch.jit use, at import time
    "ignore", r"`torch\.jit\.(script|interface)` is deprecated", FutureWarning, r"torch\.jit\."
)

import importlib.util
import os
import runpy
import sys
from typing import Callable, List, Optional

import detectron2.config
from detectron2.config import CfgNode

import hybrid_d2


def _with_hybrid_keys(get_cfg: Callable[[], CfgNode]) -> Callable[[], CfgNode]:
    def get_cfg_with_hybrid_keys() -> CfgNode:
        cfg = get_cfg()
        hybrid_d2.add_hybrid_config(cfg)
        return cfg

    return get_cfg_with_hybrid_keys


def tool_path(name: str) -> str:
    """The file of a Detectron2 tool given by path or by module name (``analyze_model``)."""
    if os.path.isfile(name):
        return name
    spec = importlib.util.find_spec(f"tools.{name}") if name.isidentifier() else None
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"no Detectron2 tool {name!r}: give a path, or a module of Detectron2's installed "
            "tools package (analyze_model, benchmark, visualize_data, visualize_json_results)"
        )
    return spec.origin


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    try:
        path = tool_path(argv[0])
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    detectron2.config.get_cfg = _with_hybrid_keys(detectron2.config.get_cfg)
    sys.argv = [path, *argv[1:]]
    runpy.run_path(path, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
