"""tools/benchmark.py: each mode's command line runs at a tiny size and writes its report (rows
and columns) between its markers, and JSON where the mode has it."""

import json
import sys
from pathlib import Path
from typing import List, Sequence

import pytest

from conftest import REPO_ROOT, run_script

sys.path.insert(0, str(REPO_ROOT / "tools"))
import benchmark  # noqa: E402

TINY = ["--height", "64", "--width", "96", "--warmup", "0", "--rounds", "1", "--threads", "1"]
R50, RESNET, R50_UPERNET = "R50 Mask R-CNN", "ResNet-50 (Detectron2)", "R50 UperNet"


def run_mode(mode: str, args: Sequence[str], tmp_path: Path) -> List[List[str]]:
    """The table rows (cells) that ``mode`` wrote between its markers of a doc in ``tmp_path``;
    checks that the text around the markers is kept."""
    begin, end = benchmark.markers(mode)
    doc = tmp_path / "doc.md"
    doc.write_text(f"before\n{begin}\nold table\n{end}\nafter\n")
    result = run_script("tools/benchmark.py", [mode, *TINY, *args, "--doc", doc], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    text = doc.read_text()
    assert text.startswith(f"before\n{begin}\nCommand: `python tools/benchmark.py {mode} ")
    assert text.endswith(f"{end}\nafter\n") and "old table" not in text
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.split("|")[1:-1]] for line in lines]


def test_detectors(tmp_path):
    """The reference alone (a hybrid adds a model and a worker: seconds each)."""
    results = tmp_path / "results.json"
    args = ["--train-rounds", "1", "--models", R50, "--json", results]
    rows = run_mode("detectors", args, tmp_path)
    assert [row[0] for row in rows] == ["model", R50]
    assert rows[0][5] == "× R50 latency per GFLOP" and len(rows[1]) == 8
    assert rows[1][2] == rows[1][4] == rows[1][5] == "1.00"
    run = json.loads(results.read_text())  # as tools/plot_model_zoo.py reads it
    assert run["command"].startswith("python tools/benchmark.py detectors ")
    r50 = run["results"]["CPU, 1 threads, fp32"][R50]
    assert r50["paper_row"] == "ResNet-50" and r50["latency_s"]["median"] > 0
    assert r50["gflops"] > 0 and r50["inference_mib"] > 0 and r50["train_mib"] > 0


def test_backbones(tmp_path):
    """One model (two workers of seconds each); without ResNet-50 it has no ratios."""
    rows = run_mode("backbones", ["--batch", "2", "--models", "DMF-XXS"], tmp_path)
    assert [row[0] for row in rows] == ["model", "DMF-XXS"]
    assert rows[0][4] == f"x {RESNET} (median)" and rows[0][7].startswith("max RSS")
    assert len(rows[1]) == 8 and rows[1][4] == rows[1][6] == "-"
    base, peak, added = (float(v) for v in rows[1][7].split(" / "))
    assert added > 0 and abs(peak - base - added) <= 1


def test_compile_eager(tmp_path):
    """Eager only: compiling takes minutes here."""
    rows = run_mode("compile", ["--variants", "eager", "--models", RESNET], tmp_path)
    assert rows[0] == [
        "model", "variant", "median ms", "min-max ms", "x eager", "x compiled ResNet-50",
        "compile s",
    ]  # fmt: skip
    assert rows[1][:2] == [RESNET, "eager"] and rows[1][4:] == ["1.00", "-", "-"]


def test_dmformer_branches(tmp_path):
    rows = run_mode("dmformer-branches", [], tmp_path)
    assert rows[0] == ["measurement", "variant", "median ms", "min-max ms"]
    assert list(dict.fromkeys(row[0] for row in rows[1:])) == [
        "inference, stage 1 (256x16x24)", "inference, stage 2 (512x8x12)",
        "inference, stage 3 (1280x4x6)", "inference, stage 4 (2048x2x3)",
        "training, stage 1 (2x256x8x12)", "training, stage 3 (2x1280x2x3)",
        "inference, whole backbone",
    ]  # fmt: skip
    assert [row[1] for row in rows[1:5]] == [
        "separate NCHW",
        "fused NCHW",
        "separate NHWC",
        "fused NHWC",
    ]
    assert [row[1] for row in rows[-2:]] == [
        "DMFormer-S branches=auto",
        "DMFormer-S branches=separate",
    ]
    assert len(rows) == 1 + 6 * 4 + 2


def test_doc_without_markers_is_refused_before_measuring(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(f"{benchmark.markers('backbones')[0]}\n")
    with pytest.raises(SystemExit, match="needs one '<!-- benchmark.py backbones: begin -->'"):
        benchmark.main(["backbones", "--models", "DMF-XXS", "--doc", str(doc)])


def test_segmentation(tmp_path):
    """The R50 reference and one family (building a segmentor takes seconds)."""
    rows = run_mode("segmentation", ["--models", "MixFormer-B1 UperNet", R50_UPERNET], tmp_path)
    assert rows[0] == [
        "model", "config", "params (M)", "GFLOPs", "× R50 FLOPs", "latency s, median (min–max)",
        "× R50 latency", "× R50 latency per GFLOP",
    ]  # fmt: skip
    assert [row[0] for row in rows[1:]] == [R50_UPERNET, "MixFormer-B1 UperNet"]  # reference first
    reference, mixformer = rows[1], rows[2]
    assert reference[1] == "`mixformer_b1_upernet_160k.yaml` with build_resnet_backbone"
    assert reference[4] == reference[6] == reference[7] == "1.00"
    assert mixformer[1] == "`mixformer_b1_upernet_160k.yaml`" and mixformer[2] == "34.5"
    # the same UperNet head: the segmentors differ by their backbones' sizes
    assert float(reference[2]) > float(mixformer[2]) > 28 and float(mixformer[4]) > 0


def test_segmentation_needs_the_reference(tmp_path):
    with pytest.raises(SystemExit, match="--models must include 'R50 UperNet'"):
        benchmark.main(["segmentation", *TINY, "--models", "MixFormer-B1 UperNet", "--doc", "-"])
