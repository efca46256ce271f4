"""Where the benchmark tool and its default outputs live."""

import os
import sys

TOOLS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_ROOT = os.path.dirname(TOOLS)
ENTRY = os.path.join(TOOLS, "benchmark.py")  # what worker processes run
DOC = os.path.join(REPO_ROOT, "docs", "benchmarks.md")
RESULTS = os.path.join(REPO_ROOT, "docs", "benchmark_results.json")

if TOOLS not in sys.path:  # model_zoo and doc_markers are modules of tools/
    sys.path.insert(0, TOOLS)
