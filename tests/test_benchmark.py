"""tools/benchmark.py: each mode's command line runs at a tiny size and writes its report (rows
and columns) between its markers, and JSON where the mode has it; the detectors mode releases its
models before its memory workers run; the profile mode's groups cover the backward pass."""

import json
import sys
import weakref
from pathlib import Path
from typing import Dict, List, Sequence

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from conftest import REPO_ROOT, run_script

sys.path.insert(0, str(REPO_ROOT / "tools"))
import benchmark  # noqa: E402
import plot_model_zoo  # noqa: E402
from benchmarking import backbones, detectors, detectron, operator_classes, profiling  # noqa: E402

TINY = ["--height", "64", "--width", "96", "--warmup", "0", "--rounds", "1", "--threads", "1"]
R50, RESNET, R50_UPERNET = "R50 Mask R-CNN", "ResNet-50 (Detectron2)", "R50 UperNet"
MOBILENET = "MobileNetV3-Large (torchvision)"


def cells(text: str) -> List[List[str]]:
    """The cells of every markdown table row in ``text``."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.split("|")[1:-1]] for line in lines]


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
    return cells(text)


def test_detectors(tmp_path, monkeypatch):
    """The reference alone (a hybrid adds a model and a worker: seconds each), in this process:
    when the memory worker starts, the model and optimizer this process built are gone and the
    doc has the partial report of the timing stages."""
    held, seen = [], []
    build = detectron.Runner.__init__

    def build_and_watch(runner: detectron.Runner, *args, **kwargs) -> None:
        build(runner, *args, **kwargs)
        held.extend([weakref.ref(runner.model), weakref.ref(runner.optimizer)])

    def worker(args, name, memory):
        seen.append(([ref() is None for ref in held], doc.read_text(), results.read_text()))
        return run_worker(args, name, memory)

    run_worker = detectors.run_worker
    monkeypatch.setattr(detectron.Runner, "__init__", build_and_watch)
    monkeypatch.setattr(detectors, "run_worker", worker)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    results, doc = tmp_path / "results.json", tmp_path / "doc.md"
    doc.write_text("{}\nold table\n{}\n".format(*benchmark.markers("detectors")))
    threads = torch.get_num_threads()
    try:
        args = [*TINY, "--train-rounds", "1", "--models", R50, "--json", results, "--doc", doc]
        assert benchmark.main(["detectors", *map(str, args)]) == 0
    finally:
        torch.set_num_threads(threads)
    [(released, partial, partial_json)] = seen
    assert len(released) == 2 and all(released)
    assert "Partial results: written when the training steps on cpu ended" in partial
    partial_results = tmp_path / "partial.json"
    partial_results.write_text(partial_json)
    with pytest.raises(SystemExit, match="partial.json holds a partial run .written when the tr"):
        plot_model_zoo.main(
            ["--results", str(partial_results), "--output", str(tmp_path / "p.png")]
        )
    partial_row = next(row for row in cells(partial) if row[0] == R50)
    assert partial_row[5] == "1.00" and partial_row[6] != "-" and partial_row[7] == "-"
    text = doc.read_text()
    assert text.startswith(
        benchmark.markers("detectors")[0] + "\nCommand: `python tools/benchmark.py"
    )
    assert "Partial" not in text and "old table" not in text
    rows = cells(text)
    assert [row[0] for row in rows] == ["model", R50]
    assert rows[0][5] == "× R50 latency per GFLOP" and len(rows[1]) == 8
    assert rows[1][2] == rows[1][4] == rows[1][5] == "1.00"
    run = json.loads(results.read_text())  # as tools/plot_model_zoo.py reads it
    assert run["command"].startswith("python tools/benchmark.py detectors ")
    r50 = run["results"]["CPU, 1 threads, fp32"][R50]
    assert r50["paper_row"] == "ResNet-50" and r50["latency_s"]["median"] > 0
    assert r50["gflops"] > 0 and r50["inference_mib"] > 0 and r50["train_mib"] > 0


def test_detectors_cost_table_compares_per_gflop_with_swin_t():
    """Issue 25's comparison: time per GFLOP and training memory as multiples of Swin-T's, bold
    above 1, "-" for what a partial run has not measured."""

    def timed(median):
        return {"median": median, "min": median - 0.5, "max": median + 1}

    swin = {"gflops": 200, "latency_s": timed(4.0), "train_step_s": timed(20.0), "train_mib": 5000}
    results = {
        "R50 Mask R-CNN": {"gflops": 100, "latency_s": timed(1.0), "train_step_s": timed(8.0)},
        detectron.SWIN_T: swin,
        "Hybrid": {"gflops": 100, "latency_s": timed(2.2), "train_step_s": timed(9.0),
                   "train_mib": 6000},
    }  # fmt: skip
    table = detectors.cost_table("CPU", results)
    assert table.title == f"CPU: cost against {detectron.SWIN_T}"
    r50, swin_row, hybrid = table.rows
    assert swin_row[3] == swin_row[5] == swin_row[7] == "1.00"
    assert hybrid == [
        "Hybrid", "100", "2.20 (1.70–3.20)", "**1.10**", "9.00 (8.50–10.00)", "0.90",
        "6000", "**1.20**",
    ]  # fmt: skip
    assert r50[3:] == ["0.50", "8.00 (7.50–9.00)", "0.80", "-", "-"]
    assert detectors.cost_table("CPU", {"Hybrid": results["Hybrid"]}) is None


def test_plot_model_zoo_writes_the_plot_and_the_model_zoo_speed_table(tmp_path):
    """From a finished detectors run: docs/model_zoo.png and MODEL_ZOO.md's table against Swin-T,
    the prose around the markers kept."""

    def timed(median):
        return {"median": median, "min": median, "max": median}

    def row(key, gflops, latency, step, mib):
        return {"paper_row": key, "gflops": gflops, "latency_s": timed(latency),
                "train_step_s": timed(step), "inference_mib": 400, "train_mib": mib}  # fmt: skip

    setting = "CPU, 2 threads, fp32"
    run = {
        "command": "python tools/benchmark.py detectors", "machine": "vm", "date": "today",
        "settings": "800x1333", "note": "", "results": {setting: {
            R50: row("ResNet-50", 264, 3.0, 20.0, 2000),
            detectron.SWIN_T: row("Swin-T", 276, 5.0, 28.0, 6000),
            "MixFormer-B4 Mask R-CNN": row("mixformer_b4_mask_rcnn_1x", 252, 4.5, 27.0, 7000),
        }},
    }  # fmt: skip
    results, doc, png = tmp_path / "results.json", tmp_path / "zoo.md", tmp_path / "zoo.png"
    results.write_text(json.dumps(run))
    doc.write_text("intro\n{}\nold\n{}\nafter\n".format(*plot_model_zoo.MARKERS))
    args = ["--results", results, "--output", png, "--doc", doc]
    assert plot_model_zoo.main(list(map(str, args))) == 0
    assert png.stat().st_size > 10_000
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith("after\n") and "old" not in text
    assert f"Settings: {setting}, 800x1333" in text
    rows = {r[0]: r for r in cells(text)}
    mixformer = rows["MixFormer-B4 Mask R-CNN"]
    assert mixformer[3] == f"{(4.5 / 252) / (5.0 / 276):.2f}" == "0.99"
    assert mixformer[5] == f"**{(27.0 / 252) / (28.0 / 276):.2f}**" == "**1.06**"
    assert mixformer[7] == f"**{7000 / 6000:.2f}**"


def _linear_mlps() -> tuple:
    from hybrid_d2.layers import Mlp

    model = nn.Sequential(Mlp(8, 32), nn.LayerNorm(8), Mlp(8, 16))
    return model, torch.randn(5, 8), [(5, 16), (5, 32)]


def _conv_mlp() -> tuple:
    from hybrid_d2.backbones.dmformer import Mlp as ConvMlp

    return ConvMlp(8, 2), torch.randn(1, 8, 3, 5), [(1, 16, 3, 5)]


@pytest.mark.parametrize("example", [_linear_mlps, _conv_mlp])
def test_saved_gelu_variant_keeps_the_gelu_output_with_the_same_weights(example):
    """The "saved GELU" rows: the same model, its MLPs' GELU and fc2 as separate autograd
    operators, which keep the GELU output (one more hidden-width tensor per MLP) and give the
    same outputs."""
    torch.manual_seed(0)
    model, x, gelu_outputs = example()
    x.requires_grad_()
    builds = {"Mlp": lambda: model, "saved GELU": backbones.with_saved_gelu(lambda: model)}
    params = {p.data_ptr() for p in model.parameters()}
    saved = {}
    for name, build in builds.items():
        shapes = []  # of the activations kept for the backward

        def keep(t):
            if t.data_ptr() not in params:
                shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            out = build()(x)
        saved[name] = (out.detach(), sorted(shapes))
    assert torch.equal(saved["Mlp"][0], saved["saved GELU"][0])
    extra = list(saved["saved GELU"][1])
    for shape in saved["Mlp"][1]:
        extra.remove(shape)
    assert sorted(extra) == gelu_outputs


def test_3d_bias_variant_runs_the_math_path_with_the_same_outputs():
    """The "MixFormer-B4 3-D bias" row: the same model, its window attention's bias passed as a
    3-D mask, which runs SDPA's unfused math path in inference (the shipped 4-D mask: the fused
    kernel), with the same outputs within float32 round-off."""
    from hybrid_d2.backbones.mixformer import MixFormer

    torch.manual_seed(0)
    model = MixFormer(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(2, 2, 2, 2)).eval()
    x = torch.randn(1, 3, 64, 96)
    kernels, outputs = {}, {}
    for name, build in {"4-D": lambda: model, "3-D": backbones.with_3d_bias(lambda: model)}.items():
        net = build()
        with torch.no_grad(), torch.profiler.profile() as prof:
            outputs[name] = net(x)
        kernels[name] = {e.name for e in prof.events() if "_scaled_dot_product" in e.name}
    assert kernels == {
        "4-D": {"aten::_scaled_dot_product_flash_attention_for_cpu"},
        "3-D": {"aten::_scaled_dot_product_attention_math"},
    }
    for ours, before in zip(outputs["4-D"], outputs["3-D"]):
        assert torch.allclose(ours, before, rtol=1e-5, atol=1e-5)


def test_backbones(tmp_path):
    """DMF-XXS against MobileNetV3-Large, its reference (two memory workers of seconds each)."""
    rows = run_mode("backbones", ["--models", "DMF-XXS", MOBILENET], tmp_path)
    assert rows[0] == [
        "model", "params (M)", "GFLOPs", "reference", "inference s, median (min–max)",
        "inference per GFLOP, × reference", "training step s, median (min–max)",
        "training per GFLOP, × reference", "max RSS added, inference / training (MiB)",
    ]  # fmt: skip
    assert [row[0] for row in rows[1:]] == ["DMF-XXS", MOBILENET]
    dmf, mobilenet = rows[1], rows[2]
    assert dmf[3] == mobilenet[3] == MOBILENET and mobilenet[5] == mobilenet[7] == "1.00"
    assert float(dmf[5]) > 0 and float(dmf[7]) > 0 and float(mobilenet[1]) == 3.0
    for row in rows[1:]:
        inference, training = (float(v) for v in row[8].split(" / "))
        assert inference > 0 and training > 0


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
        "DMFormer-S branches=fused",
        "DMFormer-S branches=separate",
    ]
    assert len(rows) == 1 + 6 * 4 + 2


def test_doc_without_markers_is_refused_before_measuring(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(f"{benchmark.markers('backbones')[0]}\n")
    with pytest.raises(SystemExit, match="needs one '<!-- benchmark.py backbones: begin -->'"):
        benchmark.main(["backbones", "--models", "DMF-XXS", "--doc", str(doc)])
    missing = tmp_path / "missing.md"
    with pytest.raises(SystemExit, match=f"cannot read {missing} .No such file or directory.; it"):
        benchmark.main(["profile", "--doc", str(missing)])
    assert not missing.exists()


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


def tables(text: str) -> Dict[str, List[List[str]]]:
    """The rows of every table in ``text`` under its bold title."""
    found = {}
    for part in text.split("\n**")[1:]:
        title, body = part.split("**", 1)
        found[title] = cells(body)
    return found


def test_profile_groups_forward_and_backward_by_module(tmp_path):
    """A DMFormer-S backbone's training step: the groups' shares add up to the whole, and the
    backward of its blocks' depth-wise convolutions is attributed to their module group."""
    args = ["--target", "backbone", "--models", "DMFormer-S Mask R-CNN", "--row-limit", "40"]
    run_mode("profile", args, tmp_path)
    found = tables((tmp_path / "doc.md").read_text())
    name = "DMFormer-S Mask R-CNN, backbone"
    summaries = [
        title
        for phase in ("training step", "inference")
        for title in (
            f"Operator classes, {phase}: share of self CPU time · GFLOP/s",
            f"Operator classes, {phase}: self CPU time per GFLOP as × DMFormer-S Mask R-CNN's,"
            " by class",
        )
    ]
    assert list(found) == summaries + [
        f"{name}, {phase}: {table}"
        for phase in ("training step", "inference")
        for table in (
            "time by module group", "top operators by self CPU time",
            "top operators by memory left allocated", "time by operator class",
            "top FLOP-counted operators by CPU time",
        )
    ]  # fmt: skip
    for cost in summaries[1::2]:  # the only model is the reference: its classes add up to 1
        header, [row] = found[cost][0], found[cost][1:]
        assert row[0] == "DMFormer-S Mask R-CNN" and float(row[1]) > 0 and row[2] == "1.00"
        assert abs(float(row[3]) + float(row[4]) - 1) <= 0.01
        assert abs(sum(float(cell) for cell in row[5:]) - 1) <= 0.005 * len(row[5:])
    for summary in summaries[::2]:
        header, [row] = found[summary][0], found[summary][1:]
        assert row[0] == "DMFormer-S Mask R-CNN"
        shares = [float(cell.split("%")[0]) for cell in row[2:-1]]
        assert abs(sum(shares) - 100) <= 0.05 * len(shares) + 1e-9, dict(zip(header[2:], row[2:]))
        depthwise = row[header.index("depth-wise convolutions")]
        assert float(depthwise.split("%")[0]) > 5 and float(depthwise.split(" · ")[1]) > 0
    for phase in ("training step", "inference"):
        groups = {row[0]: row for row in found[f"{name}, {phase}: time by module group"][1:]}
        shares = {group: float(row[2].rstrip("%")) for group, row in groups.items()}
        # each share is rounded to 0.1%: the sum is 100 within half a step per group
        assert abs(sum(shares.values()) - 100) <= 0.05 * len(shares) + 1e-9, shares
        assert shares["DMFormerBlock.dma"] + shares.get("DepthwiseConv2d", 0) > 10
        assert shares.get("(outside modules)", 0) < 5
    training = {row[0]: row for row in found[f"{name}, training step: time by module group"][1:]}
    assert float(training["DepthwiseConv2d backward"][2].rstrip("%")) > 10
    assert (
        "(outside modules) backward" not in training
        or float(training["(outside modules) backward"][2].rstrip("%")) < 5
    )
    operators = found[f"{name}, training step: top operators by self CPU time"]
    assert operators[0] == [
        "operator", "module group", "input shapes", "calls", "self CPU ms", "share",
        "self CPU memory MiB",
    ]  # fmt: skip
    # the dilated 7x7 branches' backward (hybrid_d2.layers.depthwise: the output gradient
    # convolved with the turned kernel, and the kernel gradient), credited to the branch modules'
    # backward
    depthwise_backward = [
        row for row in operators[1:]
        if row[0] in ("`aten::mkldnn_convolution`", "`aten::convolution_backward`")
        and ", 1, 7, 7]" in row[2] and row[1].endswith("backward")
    ]  # fmt: skip
    assert depthwise_backward and {row[1] for row in depthwise_backward} == {
        "DepthwiseConv2d backward"
    }


class Anchors(nn.Module):
    """Operators that make no autograd node (as Detectron2's anchor generator)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.arange(x.shape[-1], dtype=x.dtype) * 2 + 1


class TwoParts(nn.Module):
    def __init__(self):
        super().__init__()
        self.anchors, self.conv = Anchors(), nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        anchors = self.anchors(x).sum()
        return self.conv(x).sum() + anchors


def test_profile_backward_goes_to_the_module_that_made_the_node():
    """Operators that make no node record the number of the next node made: the convolution's
    backward belongs to the convolution, not to the module that ran just before it."""
    model, image = TwoParts(), torch.randn(1, 3, 8, 8)
    scopes = profiling.ModuleScopes(model, depth=1)
    profile = profiling.profile_calls(lambda: model(image).backward(), 1, "cpu")
    scopes.remove()
    backward_ops = {
        group
        for (name, group, _), _ in profile.operators.items()
        if name == "aten::convolution_backward"
    }
    assert backward_ops == {"conv backward"}
    assert "anchors" in profile.groups and "anchors backward" not in profile.groups
    assert abs(sum(t.cpu_us for t in profile.groups.values()) - profile.cpu_us) < 1e-6


class EveryKernel(nn.Module):
    """A dense convolution (stride, padding, dilation), a depth-wise and a grouped one, a
    transposed one, a linear layer on a 3-D input, a batched product and fused attention."""

    def __init__(self):
        super().__init__()
        self.dense = nn.Conv2d(3, 8, 3, stride=2, padding=2, dilation=2)
        self.depthwise = nn.Conv2d(8, 8, 5, padding=1, groups=8)
        self.grouped = nn.Conv2d(8, 12, 3, groups=4)
        self.up = nn.ConvTranspose2d(12, 6, 2, stride=2)
        self.linear = nn.Linear(6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.up(self.grouped(self.depthwise(self.dense(x))))
        tokens = self.linear(x.flatten(2).transpose(1, 2))  # [B, N, 10]
        gram = torch.bmm(tokens.transpose(1, 2), tokens)
        heads = tokens.reshape(tokens.shape[0], tokens.shape[1], 2, 5).transpose(1, 2)
        attended = nn.functional.scaled_dot_product_attention(heads, heads, heads)
        return gram.sum() + attended.sum()


def test_operator_classes_count_the_flops_fvcore_counts():
    """Inference: each class's FLOPs are twice fvcore's multiply-adds for the same layers
    (fvcore counts one per multiply-add; the profile two); the training step adds the backward's
    gradients: twice the forward for every layer but the first (no input gradient) and the
    attention's four products."""
    from fvcore.nn import FlopCountAnalysis

    torch.manual_seed(0)
    model, image = EveryKernel(), torch.randn(2, 3, 20, 24)
    counts = FlopCountAnalysis(model, image)
    counts.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    by_module = counts.by_module()
    with torch.no_grad():
        inference = profiling.profile_calls(lambda: model(image), 1, "cpu")
    expected = {
        operator_classes.DENSE_CONV: by_module["dense"] + by_module["up"],
        operator_classes.DEPTHWISE_CONV: by_module["depthwise"],
        operator_classes.GROUPED_CONV: by_module["grouped"],
    }
    found = {kind: inference.classes[kind].flops / 2 for kind in expected}
    assert found == expected
    # 20x24 -> dense 10x12 -> depth-wise 8x10 -> grouped 6x8 -> up 12x16: 192 tokens of 10
    gram = 2 * 10 * 192 * 10  # multiply-adds of [2, 10, 192] @ [2, 192, 10]
    matrix_products = by_module["linear"] + gram
    assert by_module["linear"] == 2 * 192 * 6 * 10
    assert inference.classes[operator_classes.GEMM].flops / 2 == matrix_products
    attention = 2 * 2 * 2 * 192 * 192 * (5 + 5)  # Q K^T and P V: B=2, H=2, L=S=192, E=5
    assert inference.classes[operator_classes.ATTENTION].flops == attention
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):  # the unfused path: its products count
        unfused = profiling.profile_calls(lambda: model(image), 1, "cpu")
    assert unfused.classes[operator_classes.ATTENTION].flops == 0
    found = unfused.classes[operator_classes.GEMM].flops
    assert found == inference.classes[operator_classes.GEMM].flops + attention
    training = profiling.profile_calls(lambda: model(image).backward(), 1, "cpu")
    convolutions = sum(expected.values())
    found = sum(training.classes[kind].flops / 2 for kind in expected)
    assert found == convolutions + 2 * convolutions - by_module["dense"]
    assert training.classes[operator_classes.ATTENTION].flops == 3 * attention
    assert training.classes[operator_classes.GEMM].flops / 2 == 3 * matrix_products


def test_operator_classes_take_their_callers_class():
    """The operators a convolution or a matrix product calls (buffers, reshapes) are counted in
    its class; module code and autograd nodes are outside operators; shares cover the whole."""
    model, image = EveryKernel(), torch.randn(1, 3, 16, 16)
    profile = profiling.profile_calls(lambda: model(image).backward(), 1, "cpu")
    assert set(profile.classes) <= set(operator_classes.CLASSES)
    assert abs(sum(t.cpu_us for t in profile.classes.values()) - profile.cpu_us) < 1e-6
    mkldnn = [key for key in profile.operators if key[0] == "aten::mkldnn_convolution"]
    assert mkldnn, "the convolutions ran elsewhere than oneDNN"
    assert profile.classes[operator_classes.OUTSIDE_OPERATORS].calls > 0
    assert operator_classes.operator_class("aten::mkldnn_convolution", [], []) is None


def test_profile_cost_table_splits_the_cost_per_gflop_by_class():
    """Against Swin-T, whichever order: a model with twice the matrix product time and as much of
    the rest for half the GFLOPs costs (2 x 3 + 1) / (3 + 1) x 2 = 3.5 times as much per GFLOP."""
    def profile(gemm_us: float, rest_us: float) -> profiling.Profile:
        p = profiling.Profile()
        p.classes[operator_classes.GEMM].cpu_us = gemm_us
        p.classes[operator_classes.ELEMENTWISE].cpu_us = rest_us
        p.groups["all"].cpu_us = gemm_us + rest_us
        return p

    swin = detectron.SWIN_T
    profiles = {"hybrid": profile(6.0, 1.0), swin: profile(3.0, 1.0)}
    table = profiling.cost_table("training step", profiles, {"hybrid": 5.0, swin: 10.0})
    assert table.title.endswith(f"× {swin}'s, by class")
    rows = {row[0]: dict(zip(table.columns, row)) for row in table.rows}
    hybrid = rows["hybrid"]
    assert hybrid[f"× {swin} per GFLOP"] == "3.50"
    assert (hybrid["FLOP-counted classes"], hybrid["the rest"]) == ("3.00", "0.50")
    assert (hybrid[operator_classes.GEMM], hybrid[operator_classes.ELEMENTWISE]) == ("3.00", "0.50")
    assert rows[swin][f"× {swin} per GFLOP"] == "1.00" and rows[swin]["the rest"] == "0.25"
