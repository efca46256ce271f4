"""torch.compile and TorchScript export of every backbone family: one graph without recompiles,
Inductor's outputs, and Detectron2's tracing export of a Mask R-CNN, each equal to eager."""
import pytest
import torch
import torch._dynamo
from detectron2.export import TracingAdapter
from detectron2.modeling import build_model
from torch._dynamo.testing import CompileCounterWithBackend

from conftest import REPO_ROOT, load_config
from hybrid_d2.backbones import D2DilateFormer, D2MixFormer, dilateformer, mixformer

SHAPES_MASK_RCNN = REPO_ROOT / "configs/shapes/mixformer_b1_mask_rcnn_shapes.yaml"
# Shallow variants of B0 and Tiny: every kind of block once, so that a cold Inductor compile
# takes seconds rather than minutes (its time grows with the number of blocks it unrolls).
# Stage 3 "mixed" has one window, one shifted-window and one global block, stages 1-2 MSDA;
# window 3 at 64x96 gives stage-3 maps of 4x6, so windows are padded and masked and the shifted
# ones really shift.
SHALLOW_VARIANTS = [
    (mixformer.VARIANTS, dict(mixformer.VARIANTS["b0"], depths=(1, 1, 1, 1))),
    (
        dilateformer.VARIANTS,
        dict(
            dilateformer.VARIANTS["tiny"],
            depths=(1, 1, 3, 1),
            stage3_mixed=("window", "shifted", "global"),
        ),
    ),
]
BACKBONES = {
    "mixformer": lambda: D2MixFormer("shallow", drop_path_rate=0.0),
    "dilateformer mixed": lambda: D2DilateFormer(
        "shallow", stage3_attention="mixed", window_size=3, drop_path_rate=0.0
    ),
}
TOLERANCE = 1e-4


@pytest.fixture(autouse=True)
def fresh_dynamo(monkeypatch):
    """Every test starts without compiled code (the families share PyramidBackbone.forward),
    with the shallow variants registered."""
    for variants, config in SHALLOW_VARIANTS:
        monkeypatch.setitem(variants, "shallow", config)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _assert_equal(outputs: dict, expected: dict) -> None:
    assert outputs.keys() == expected.keys()
    for name in expected:
        difference = (outputs[name] - expected[name]).abs().max().item()
        assert difference <= TOLERANCE, f"{name}: largest difference {difference:.2e}"


def _compile_and_run(model, backend: str, images, training: bool):
    """The compiled model's outputs (and gradients) on each image, asserting one graph in all."""
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    results = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for image in images:
            results.append(_run(compiled, image, training))
    assert counter.frame_count == 1, f"{counter.frame_count} graphs compiled"
    return results


def _run(model, image, training: bool):
    """Outputs, and in training the parameter gradients of their sum."""
    model.zero_grad()
    with torch.set_grad_enabled(training):
        outputs = model(image)
    if not training:
        return outputs, {}
    sum(out.sum() for out in outputs.values()).backward()
    params = getattr(model, "_orig_mod", model).named_parameters()  # the compiled model's own
    grads = {n: p.grad.clone() for n, p in params if p.grad is not None}
    return outputs, grads


def test_inductor_compiled_backbone_equals_eager():
    """torch.compile(fullgraph=True) with Inductor at a fixed size, eval mode: one graph for all
    blocks and both calls, eager's outputs, for DilateFormer's mixed variant (MSDA, window,
    shifted-window and global attention). A cold Inductor compile takes minutes on 2 cores, so
    MixFormer's graph is checked with AOTAutograd only (test_compiled_training_step_equals_eager)."""
    torch.manual_seed(0)
    model = BACKBONES["dilateformer mixed"]().eval()
    images = [torch.randn(1, 3, 64, 96) for _ in range(2)]
    with torch.no_grad():
        expected = [model(image) for image in images]
        results = _compile_and_run(model, "inductor", images, training=False)
    for (outputs, _), expected_outputs in zip(results, expected):
        _assert_equal(outputs, expected_outputs)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_compiled_training_step_equals_eager(name):
    """In train mode Dynamo captures the forward as one graph and AOTAutograd its backward
    (MSDA's hand-written one included): eager's outputs and parameter gradients."""
    torch.manual_seed(0)
    model = BACKBONES[name]().train()
    images = [torch.randn(2, 3, 64, 96) for _ in range(2)]
    expected = [_run(model, image, training=True) for image in images]
    results = _compile_and_run(model, "aot_eager", images, training=True)
    for (outputs, grads), (expected_outputs, expected_grads) in zip(results, expected):
        _assert_equal(outputs, expected_outputs)
        assert grads.keys() == expected_grads.keys()
        _assert_equal(grads, expected_grads)


def _detections(instances) -> dict:
    return {
        "boxes": instances.pred_boxes.tensor,
        "scores": instances.scores,
        "classes": instances.pred_classes.float(),
        "masks": instances.pred_masks,
    }


@pytest.mark.parametrize(
    "bottom_up, variant_key, variant",
    [
        ("build_mixformer_backbone", "MODEL.MIXFORMER.VARIANT", "b0"),
        ("build_dilateformer_backbone", "MODEL.DILATEFORMER.VARIANT", "tiny"),
    ],
)
def test_tracing_export_of_mask_rcnn_equals_eager(bottom_up, variant_key, variant, tmp_path):
    """Detectron2's TorchScript tracing export (tools/deploy/export_model.py --export-method
    tracing), saved and loaded back, gives eager's detections and mask probabilities."""
    cfg = load_config(SHAPES_MASK_RCNN, ["MODEL.FPN.BOTTOM_UP", bottom_up, variant_key, variant])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    image = torch.rand(3, 64, 96) * 255

    def inference(model, inputs):  # as Detectron2's export_model.py: no resizing to the input
        return [{"instances": model.inference(inputs, do_postprocess=False)[0]}]

    adapter = TracingAdapter(model, [{"image": image}], inference)
    with torch.no_grad():
        traced = torch.jit.trace(adapter, (image,))
        traced.save(str(tmp_path / "model.ts"))
        loaded = torch.jit.load(str(tmp_path / "model.ts"))
        exported = adapter.outputs_schema(loaded(image))[0]["instances"]
        expected = inference(model, [{"image": image}])[0]["instances"]
    assert len(expected) > 0
    assert len(exported) == len(expected)
    _assert_equal(_detections(exported), _detections(expected))
