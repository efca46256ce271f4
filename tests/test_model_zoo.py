"""tools/model_zoo.py: its counts equal fvcore's direct ones, it rewrites only its part of the doc,
and --check catches a changed variant table."""

import sys

import pytest
import torch
from fvcore.nn import parameter_count
from detectron2.modeling import build_model

from conftest import REPO_ROOT, load_config
from hybrid_d2.layers import FAMILIES, flop_count_analysis, flop_totals

sys.path.insert(0, str(REPO_ROOT / "tools"))
import model_zoo  # noqa: E402

CONFIGS = ("mixformer_b1_mask_rcnn_1x", "dmf_xxs_retinanet_1x")
SIZE = (64, 96)


def test_table_counts_equal_direct_fvcore_counts(tmp_path):
    doc = tmp_path / "zoo.md"
    doc.write_text(f"prose before\n{model_zoo.BEGIN}\nold table\n{model_zoo.END}\nprose after\n")
    paths = [str(REPO_ROOT / "configs" / f"{name}.yaml") for name in CONFIGS]
    args = [
        "--configs",
        *paths,
        "--height",
        str(SIZE[0]),
        "--width",
        str(SIZE[1]),
        "--output",
        str(doc),
    ]
    assert model_zoo.main(args) == 0
    text = doc.read_text()
    assert text.startswith("prose before\n") and text.endswith(f"{model_zoo.END}\nprose after\n")
    assert "old table" not in text
    for name in CONFIGS:
        torch.manual_seed(0)
        model = build_model(load_config(REPO_ROOT / "configs" / f"{name}.yaml")).eval()
        image = torch.zeros(1, 3, *SIZE)
        with torch.no_grad():
            fvcore = flop_count_analysis(model_zoo.DummyForward(model, SIZE), image).total()
        params = parameter_count(model)[""]
        row = next(line for line in text.splitlines() if line.startswith(f"| `{name}`"))
        cells = [c.strip() for c in row.split("|")]
        assert cells[3].startswith(f"{params / 1e6:.2f}")
        assert cells[5] == f"{fvcore / 1e9:.1f}"
        assert float(cells[6]) <= float(cells[5])  # mmcv's convention leaves products out


def test_flop_totals_equal_one_analysis_per_convention():
    model = build_model(load_config(REPO_ROOT / "configs" / "dmf_xxs_retinanet_1x.yaml")).eval()
    image = torch.zeros(1, 3, *SIZE)
    with torch.no_grad():
        totals = flop_totals(model.backbone.bottom_up, image)
        for convention in ("fvcore", "mmcv"):
            analysis = flop_count_analysis(model.backbone.bottom_up, image, convention)
            assert totals[convention] == analysis.total()
    # mmcv's counter skips DMF's dynamic convolutions (and its token attention)
    assert totals["mmcv"] < totals["fvcore"]


def test_missing_markers_fail_clearly(tmp_path, capsys):
    doc = tmp_path / "zoo.md"
    doc.write_text("no markers\n")
    with pytest.raises(SystemExit, match="needs one '<!-- model_zoo.py: begin -->' line"):
        model_zoo.replace_generated(doc.read_text(), "table", str(doc))


def test_check_passes_on_the_real_tables_and_names_a_changed_variant(monkeypatch, capsys):
    assert model_zoo.main(["--check"]) == 0
    variants = FAMILIES["mixformer"].variants
    monkeypatch.setitem(variants, "b1", dict(variants["b1"], depths=(1, 2, 6, 7)))
    assert model_zoo.main(["--check", "--families", "mixformer", "dmf"]) == 1
    errors = capsys.readouterr().err
    assert "mixformer b1: expected 6,277,405 params, got " in errors
    assert errors.count("expected") == 1


def test_segmentation_rows_count_the_decode_head_without_the_aux_head(tmp_path):
    """ADE20K section: parameters include UperNet's auxiliary head, FLOPs do not (mmseg)."""
    doc = tmp_path / "zoo.md"
    begin, end, _ = model_zoo.SECTIONS["ade20k"]
    doc.write_text(f"{model_zoo.BEGIN}\ncoco\n{model_zoo.END}\n{begin}\nold\n{end}\n")
    name = "mixformer_b1_upernet_160k"
    config = REPO_ROOT / "configs" / "ade20k" / f"{name}.yaml"
    args = ["--section", "ade20k", "--configs", str(config), "--height", "64", "--width", "96", "--output", str(doc)]
    assert model_zoo.main(args) == 0
    text = doc.read_text()
    assert text.startswith(f"{model_zoo.BEGIN}\ncoco\n")  # the detection table is left alone
    row = next(line for line in text.splitlines() if line.startswith(f"| `{name}`"))
    cells = [c.strip() for c in row.split("|")]
    torch.manual_seed(0)
    model = build_model(load_config(config)).eval()
    assert cells[3] == f"{parameter_count(model)[''] / 1e6:.2f}" and "mIoU 42.0 / 43.5" in row
    image = torch.zeros(1, 3, 64, 96)
    aux_calls = []
    model.sem_seg_head.aux_head.register_forward_hook(lambda *args: aux_calls.append(1))
    with torch.no_grad():
        decode = flop_count_analysis(model_zoo.DummyForward(model, (64, 96)), image).total()
    assert cells[5] == f"{decode / 1e9:.1f}" and decode > 1e9 and aux_calls == []
