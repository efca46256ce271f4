#!/usr/bin/env python
"""docs/model_zoo.png: the papers' COCO box AP against detector parameters (the papers' counts)
and against our measured CPU latency (docs/benchmark_results.json from
``tools/benchmark.py detectors``), one marker per model, with ResNet-50 and Swin-T Mask R-CNN for
reference.

    python tools/plot_model_zoo.py [--results docs/benchmark_results.json] [--output docs/model_zoo.png]
"""

import warnings

warnings.filterwarnings(  # Detectron2's dependencies' torch.jit use, at import time
    "ignore", r"`torch\.jit\.(script|interface)` is deprecated", FutureWarning, r"torch\.jit\."
)

import argparse
import json
import os
import sys
import textwrap
from typing import Dict, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from hybrid_d2.utils import atomic_output  # noqa: E402

TOOLS = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TOOLS)
sys.path.insert(0, TOOLS)
from model_zoo_data import PAPER_ROWS, REFERENCE_ROWS, PaperRow  # noqa: E402

FAMILIES = {
    "mixformer": ("MixFormer", "tab:blue"),
    "dilateformer": ("DilateFormer", "tab:orange"),
    "dualformer": ("DualFormer", "tab:green"),
    "dmf": ("DMF", "tab:red"),
    "reference": ("reference", "black"),
}
NOTE = (
    "Box AP: the papers' COCO val2017 numbers (1x schedule; ResNet-50 and Swin-T as Swin's table gives "
    "them); none is ours (no detector was trained on COCO).\nDMFormer has no COCO result (its paper "
    "reports ADE20K only), so it is not plotted. Latency: tools/benchmark.py (batch 1, median over rounds)."
)


def _family(key: str) -> str:
    return key.split("_")[0] if key in PAPER_ROWS else "reference"


def _label(key: str) -> str:
    if key in REFERENCE_ROWS:
        return f"{key} Mask R-CNN"
    family, variant, *framework = key.split("_")
    kind = "RetinaNet" if "retinanet" in framework else "Mask R-CNN"
    return f"{FAMILIES[family][0]}-{variant.upper()} {kind}"


def _point(ax, key: str, row: PaperRow, x: float) -> None:
    name, color = FAMILIES[_family(key)]
    marker = "^" if "retinanet" in key else ("s" if key in REFERENCE_ROWS else "o")
    ax.scatter(x, row.box_ap, color=color, marker=marker, s=40, label=name)
    ax.annotate(_label(key), (x, row.box_ap), fontsize=6, xytext=(3, 3), textcoords="offset points")


def _dedup_legend(ax) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=7, loc="lower right")


def plot(results: Optional[Dict[str, dict]], setting: str, note: str, output: str) -> None:
    """Write the figure; without ``results`` the latency panel says that none exist."""
    fig, (by_params, by_latency) = plt.subplots(1, 2, figsize=(11, 4.8))
    one_x = {k: r for k, r in PAPER_ROWS.items() if k.endswith("_1x") and r.box_ap is not None}
    for key, row in {**one_x, **REFERENCE_ROWS}.items():
        _point(by_params, key, row, row.params_m)
    by_params.set(
        xlabel="detector parameters (M, papers' counts)",
        ylabel="COCO box AP (paper)",
        title="Box AP against size",
    )
    if results:
        for name, r in results.items():
            key = r["paper_row"]
            row = REFERENCE_ROWS.get(key) or PAPER_ROWS.get(key)
            if row is not None and row.box_ap is not None:
                _point(by_latency, key, row, r["latency_s"]["median"])
        by_latency.set(
            xlabel=f"measured latency per image (s)\n{textwrap.fill(setting, 70)}",
            title="Box AP against latency" + (f"\n{note}" if note else ""),
        )
    else:
        by_latency.text(
            0.5, 0.5, "no benchmark results yet", ha="center", transform=by_latency.transAxes
        )
    for ax in (by_params, by_latency):
        ax.grid(alpha=0.3)
        _dedup_legend(ax)
    fig.text(0.01, 0.01, NOTE, fontsize=7)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    with atomic_output(output) as tmp:
        fig.savefig(tmp, dpi=130)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--results", default=os.path.join(REPO_ROOT, "docs", "benchmark_results.json")
    )
    parser.add_argument("--setting", help="which setting of the results (default: the first, CPU)")
    parser.add_argument("--output", default=os.path.join(REPO_ROOT, "docs", "model_zoo.png"))
    args = parser.parse_args(argv)
    results, setting, note = None, "", ""
    if os.path.exists(args.results):
        with open(args.results) as f:
            run = json.load(f)
        if run.get("partial"):
            raise SystemExit(
                f"plot_model_zoo: {args.results} holds a partial run (written when "
                f"{run['partial']} ended); plot from a finished tools/benchmark.py detectors run"
            )
        setting = args.setting or next(iter(run["results"]))
        if setting not in run["results"]:
            raise SystemExit(
                f"plot_model_zoo: no setting {setting!r} in {args.results}; has {list(run['results'])}"
            )
        results, note = run["results"][setting], run.get("note", "")
        setting = f"{setting}, {run['settings']}"
    plot(results, setting, note, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
