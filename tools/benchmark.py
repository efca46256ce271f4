#!/usr/bin/env python
"""Benchmarks (not tests): latency, training throughput, peak memory and profiles, one mode each.

    PYTHONPATH=. python tools/benchmark.py detectors          # detectors against R50 and Swin-T
    PYTHONPATH=. python tools/benchmark.py backbones          # backbones alone against Swin-T
    PYTHONPATH=. python tools/benchmark.py compile            # eager against torch.compile
    PYTHONPATH=. python tools/benchmark.py dmformer-branches  # DMFormer's dilated branches
    PYTHONPATH=. python tools/benchmark.py segmentation       # UperNet segmentors against R50
    PYTHONPATH=. python tools/benchmark.py profile            # torch.profiler by module group
    PYTHONPATH=. python tools/benchmark.py MODE --help        # what MODE measures, its options

This script is the entry point; the modes and their shared pieces are the package
``tools/benchmarking/`` (its docstring says how they fit together and how to add a mode). The
package is not named ``benchmark``: next to this script, ``import benchmark`` would then find the
package (Python looks for a package directory before a module file of the same name), so the
script and the package would shadow each other depending on how they are imported. Worker
processes (peak memory in a fresh interpreter) run this script too, with ``--worker NAME``.
"""

import warnings

warnings.filterwarnings(  # Detectron2's dependencies' torch.jit use, at import time
    "ignore", r"`torch\.jit\.(script|interface)` is deprecated", FutureWarning, r"torch\.jit\."
)

import os  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmarking import main, markers  # noqa: E402

__all__ = ["main", "markers"]

if __name__ == "__main__":
    sys.exit(main(description=__doc__))
