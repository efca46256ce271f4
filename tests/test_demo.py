"""demo/demo.py: images, folders, videos and webcam; bad inputs are reported by file and skipped.

Models are randomly initialised (MODEL.WEIGHTS "") and run at a small input size; confidence
threshold 0 and 3 detections per image make sure that something is drawn. Most runs call
main(argv) in-process and share one built Mask R-CNN, to keep the file fast.
"""

import importlib.util
import os
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import REPO_ROOT, SHAPES_CONFIG, run_script

SHAPES_CONFIGS = REPO_ROOT / "configs/shapes"
# Random weights, 3 detections per image, small inputs.
# fmt: off
FAST_OPTS = [
    "MODEL.WEIGHTS", "", "TEST.DETECTIONS_PER_IMAGE", "3",
    "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "128",
]
# fmt: on
VIDEO_FPS, VIDEO_FRAMES, VIDEO_SIZE = 12.0, 8, (96, 64)  # size: width, height


@pytest.fixture(scope="module")
def demo():
    """demo/demo.py as a module (it imports demo/predictor.py as ``predictor``, like a script)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(REPO_ROOT / "demo"))
        spec = importlib.util.spec_from_file_location("hybrid_d2_demo", REPO_ROOT / "demo/demo.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def predictor_module(demo):
    """demo/predictor.py, as demo.py imported it."""
    return sys.modules["predictor"]


def demo_args(config: Path = SHAPES_CONFIG, opts=()) -> list:
    return ["--config-file", str(config), "--confidence-threshold", "0.0", "--opts", *FAST_OPTS, *opts]


def build_predictor(demo, config: Path = SHAPES_CONFIG, opts=()):
    return demo.VisualizationPredictor(
        demo.setup_cfg(demo.parse_args(["--input", "x", *demo_args(config, opts)]))
    )


@pytest.fixture(scope="module")
def mask_rcnn(demo):
    return build_predictor(demo)


@pytest.fixture
def run_demo(demo, mask_rcnn, monkeypatch, capsys):
    """Run main(argv + the Mask R-CNN args) with the shared model; returns (status, stdout, stderr)."""
    monkeypatch.setattr(demo, "VisualizationPredictor", lambda cfg: mask_rcnn)

    def run(*argv):
        status = demo.main([*map(str, argv), *demo_args()])
        out, err = capsys.readouterr()
        return status, out, err

    return run


def shapes_image(height: int = 120, width: int = 160) -> np.ndarray:
    image = np.full((height, width, 3), 40, np.uint8)
    cv2.circle(image, (width // 3, height // 2), height // 4, (60, 20, 220), -1)
    cv2.rectangle(image, (width // 2, height // 4), (width - 10, 3 * height // 4), (200, 130, 0), -1)
    return image


def write_video(path: Path, frames: int) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), VIDEO_FPS, VIDEO_SIZE)
    for i in range(frames):
        frame = np.full((VIDEO_SIZE[1], VIDEO_SIZE[0], 3), 30, np.uint8)
        cv2.circle(frame, (20 + 7 * i, 32), 14, (60, 20, 220), -1)
        writer.write(frame)
    writer.release()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Good, awkward and bad images and videos."""
    root = tmp_path_factory.mktemp("demo_inputs")
    image = shapes_image()
    cv2.imwrite(str(root / "color.png"), image)
    cv2.imwrite(str(root / "color.jpg"), image)
    cv2.imwrite(str(root / "gray.png"), cv2.cvtColor(image, cv2.COLOR_BGR2GRAY))
    cv2.imwrite(str(root / "rgba.png"), np.dstack([image, np.full(image.shape[:2], 128, np.uint8)]))
    cv2.imwrite(str(root / "deep16.png"), image.astype(np.uint16) * 257)
    cv2.imwrite(str(root / "tiny.png"), image[:1, :1])
    cv2.imwrite(str(root / "wide.png"), cv2.resize(image, (4000, 20)))
    cv2.imwrite(str(root / "sliver.png"), cv2.resize(image, (4000, 3)))
    (root / "empty.png").write_bytes(b"")
    (root / "corrupt.jpg").write_bytes(b"not a jpeg at all" * 20)
    write_video(root / "clip.mp4", VIDEO_FRAMES)
    write_video(root / "no_frames.mp4", 0)
    (root / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)
    return root


def image_size(path: Path) -> tuple:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, path
    return image.shape[:2]


def video_properties(path: Path) -> tuple:
    """(frames actually read, fps, (width, height))."""
    capture = cv2.VideoCapture(str(path))
    assert capture.isOpened(), path
    frames = 0
    while capture.read()[0]:
        frames += 1
    size = (int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    fps = capture.get(cv2.CAP_PROP_FPS)
    capture.release()
    return frames, fps, size


# ---------------------------------------------------------------- reading and helpers


def test_read_image_converts_gray_rgba_and_16_bit(demo, predictor_module, inputs):
    color = cv2.imread(str(inputs / "color.png"))
    gray = cv2.imread(str(inputs / "gray.png"), cv2.IMREAD_GRAYSCALE)
    np.testing.assert_array_equal(demo.read_image(str(inputs / "deep16.png")), color)
    np.testing.assert_array_equal(demo.read_image(str(inputs / "rgba.png")), color)  # alpha dropped
    np.testing.assert_array_equal(demo.read_image(str(inputs / "gray.png")), np.dstack([gray] * 3))
    floats = color.astype(np.float32) / 255
    np.testing.assert_array_equal(predictor_module.to_bgr8(floats, "f"), color)
    with pytest.raises(demo.InputError, match="two.png: unsupported image with 2 channels"):
        predictor_module.to_bgr8(color[:, :, :2], "two.png")


def test_image_output_paths(demo, tmp_path):
    assert demo.image_output_paths(["a/x.jpg"], "out/y.png") == ["out/y.png"]
    assert demo.image_output_paths(["a/x.jpg"], "out") == [os.path.join("out", "x.jpg")]
    (tmp_path / "dir.png").mkdir()
    assert demo.image_output_paths(["a/x.jpg"], str(tmp_path / "dir.png")) == [
        str(tmp_path / "dir.png/x.jpg")
    ]
    assert demo.image_output_paths(["a/x.jpg", "b/x.jpg", "y.png"], "o.png") == [
        os.path.join("o.png", n) for n in ("x.jpg", "x_2.jpg", "y.png")
    ]


def test_display_problem(demo, monkeypatch):
    assert "no GUI" in demo.display_problem("  GUI:   NONE\n")
    assert "no GUI" in demo.display_problem("Video I/O:\n  FFMPEG: YES\n")
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert "no display" in demo.display_problem("  GUI:   QT5\n")
    monkeypatch.setenv("DISPLAY", ":0")
    assert demo.display_problem("  GUI:   QT5\n") is None


# ---------------------------------------------------------------- command line


def test_no_display_gives_a_clear_message(demo, inputs, monkeypatch, capsys):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    for source in (["--input", str(inputs / "color.png")], ["--webcam"]):
        assert demo.main([*source, *demo_args()]) == 2
        err = capsys.readouterr().err
        assert "cannot show a window" in err and "use --output" in err, err


@pytest.mark.parametrize(
    "opts, message",
    [
        (["MODEL.DEVICE", "cuda"], "CUDA is not available; use --opts MODEL.DEVICE cpu"),
        (["MODEL.WEIGHTS", "/no/such/model.pth"], "MODEL.WEIGHTS file not found: /no/such/model.pth"),
        (["MODEL.ROI_HEADS.SCORE_THRESH", "0.1"], "unknown config key MODEL.ROI_HEADS.SCORE_THRESH"),
    ],
)
def test_setup_errors(demo, inputs, tmp_path, monkeypatch, capsys, opts, message):
    monkeypatch.setattr(demo.torch.cuda, "is_available", lambda: False)
    argv = ["--input", str(inputs / "color.png"), "--output", str(tmp_path), *demo_args(opts=opts)]
    assert demo.main(argv) == 2
    assert message in capsys.readouterr().err


def test_weights_load_as_train_net_loads_them(demo, inputs, tmp_path, capsys):
    """The demo's loader is train_net.py's: a DilateFormer checkpoint into the MixFormer config
    and a file that is not a checkpoint are refused in one line, exit status 2, nothing drawn."""
    import torch
    from detectron2.modeling import build_model

    from conftest import load_config

    other = load_config(
        SHAPES_CONFIG,
        ["MODEL.FPN.BOTTOM_UP", "build_dilateformer_backbone", "MODEL.DILATEFORMER.VARIANT", "tiny"],
    )
    dilateformer = tmp_path / "dilateformer.pth"
    torch.save({"model": build_model(other).state_dict()}, dilateformer)
    text = tmp_path / "weights.txt"
    text.write_text("not a checkpoint")
    for weights, message in [
        (dilateformer, f"error: {dilateformer}: the checkpoint does not fit the model"),
        (text, f"error: {text}: not a PyTorch checkpoint"),
    ]:
        output = tmp_path / "out"
        argv = ["--input", str(inputs / "color.png"), "--output", str(output)]
        assert demo.main([*argv, *demo_args(opts=["MODEL.WEIGHTS", str(weights)])]) == 2
        err = capsys.readouterr().err
        assert err.startswith(message), err[-2000:]
        assert not output.exists()


def test_untrained_model_is_said_only_without_weights(demo, run_demo, inputs, tmp_path, capsys):
    argv = ["--input", str(inputs / "color.png"), "--output", str(tmp_path / "out.png")]
    status, _, err = run_demo(*argv)  # demo_args: MODEL.WEIGHTS ""
    assert status == 0 and "the model is untrained" in err, err
    weights = tmp_path / "model.pth"  # run_demo's model is built already: only the name counts
    weights.touch()
    assert demo.main([*argv, *demo_args(opts=["MODEL.WEIGHTS", str(weights)])]) == 0
    err = capsys.readouterr().err
    assert "untrained" not in err, err


def test_images_good_awkward_and_bad(run_demo, inputs, tmp_path):
    out = tmp_path / "out"  # no extension: a folder, created
    bad = ["empty.png", "corrupt.jpg", "missing.png", "sliver.png"]
    good = ["color.png", "color.jpg", "gray.png", "rgba.png", "deep16.png", "tiny.png", "wide.png"]
    args = (
        [inputs / n for n in bad[:2]] + [str(inputs / "nomatch*.png")] + [inputs / n for n in bad[2:] + good]
    )
    status, stdout, stderr = run_demo("--input", *args, "--output", out)

    assert status == 1
    assert f"{inputs / 'empty.png'}: empty file (0 bytes)" in stderr
    assert f"{inputs / 'corrupt.jpg'}: cannot decode the image" in stderr
    assert f"{inputs / 'missing.png'}: file not found" in stderr
    assert f"{inputs / 'sliver.png'}: image of 4000x3 pixels is too elongated" in stderr
    assert f"{inputs / 'nomatch*.png'}: no file matches this pattern" in stderr
    assert "7 of 12 inputs done, 5 failed" in stdout
    assert sorted(os.listdir(out)) == sorted(good)  # nothing else: no temporary files
    for name in good:
        assert f"{inputs / name}: 3 detections in " in stdout
        expected = (1, 1) if name == "tiny.png" else (20, 4000) if name == "wide.png" else (120, 160)
        assert image_size(out / name) == expected, name
    drawn = np.abs(cv2.imread(str(out / "color.png")).astype(int) - shapes_image()).max(axis=2)
    assert (drawn > 30).mean() > 0.01  # predictions were drawn


def test_folder_input(run_demo, inputs, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a.png", "b.jpg"):
        (folder / name).write_bytes((inputs / f"color{Path(name).suffix}").read_bytes())
    (folder / "notes.txt").write_text("not an image")
    status, stdout, _ = run_demo("--input", folder, "--output", tmp_path / "out")
    assert status == 0 and "2 of 2 inputs done, 0 failed" in stdout
    assert sorted(os.listdir(tmp_path / "out")) == ["a.png", "b.jpg"]
    status, _, stderr = run_demo("--input", folder / "a.png", "--output", folder)
    assert status == 1 and f"{folder / 'a.png'}: the output would overwrite the input" in stderr


def test_video(run_demo, inputs, tmp_path):
    status, stdout, stderr = run_demo("--video-input", inputs / "clip.mp4", "--output", tmp_path)
    assert status == 0, stderr
    assert f"{VIDEO_FRAMES}/{VIDEO_FRAMES}" in stderr and "frame" in stderr  # progress bar
    assert f"{VIDEO_FRAMES} frames in" in stdout and f"-> {tmp_path / 'clip.mp4'}" in stdout
    assert os.listdir(tmp_path) == ["clip.mp4"]
    assert video_properties(tmp_path / "clip.mp4") == (VIDEO_FRAMES, pytest.approx(VIDEO_FPS), VIDEO_SIZE)


def test_video_max_frames_into_the_given_container(run_demo, inputs, tmp_path):
    output = tmp_path / "sub" / "short.avi"
    status, _, stderr = run_demo("--video-input", inputs / "clip.mp4", "--output", output, "--max-frames", 3)
    assert status == 0, stderr
    assert os.listdir(output.parent) == ["short.avi"]
    assert video_properties(output) == (3, pytest.approx(VIDEO_FPS), VIDEO_SIZE)


@pytest.mark.parametrize(
    "name, message",
    [
        ("no_frames.mp4", ": cannot open the video"),
        ("corrupt.mp4", ": cannot open the video"),
        ("corrupt.jpg", ": no frame can be read"),  # opened by OpenCV's image-sequence reader
        ("missing.mp4", ": file not found"),
    ],
)
def test_bad_videos(run_demo, inputs, tmp_path, name, message):
    status, _, stderr = run_demo("--video-input", inputs / name, "--output", tmp_path / "out.mp4")
    assert status == 1
    assert f"error: {inputs / name}{message}" in stderr
    assert os.listdir(tmp_path) == []


def test_video_output_must_not_overwrite_the_input(run_demo, inputs):
    before = (inputs / "clip.mp4").read_bytes()
    status, _, stderr = run_demo("--video-input", inputs / "clip.mp4", "--output", inputs / "clip.mp4")
    assert status == 1 and f"{inputs / 'clip.mp4'}: the output would overwrite the input" in stderr
    assert (inputs / "clip.mp4").read_bytes() == before


def test_failure_mid_video_leaves_no_file(run_demo, mask_rcnn, inputs, tmp_path, monkeypatch):
    calls, predict = [], type(mask_rcnn).__call__

    def fail_on_third_frame(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated failure")
        return predict(self, *args, **kwargs)

    monkeypatch.setattr(type(mask_rcnn), "__call__", fail_on_third_frame)
    status, _, stderr = run_demo("--video-input", inputs / "clip.mp4", "--output", tmp_path)
    assert len(calls) == 3 and status == 1
    assert f"error: {inputs / 'clip.mp4'}: RuntimeError: simulated failure" in stderr
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- frameworks and the script


@pytest.mark.parametrize(
    "config, dataset, fields, absent",
    [
        (
            "mixformer_b1_retinanet_shapes.yaml",
            "shapes_val",
            ["pred_boxes"],
            ["pred_masks", "pred_keypoints"],
        ),
        (
            "mixformer_b1_keypoint_rcnn_shapes.yaml",
            "shapes_keypoints_val",
            ["pred_keypoints"],
            ["pred_masks"],
        ),
        (
            "dmf_s_retinanet_shapes.yaml",
            "shapes_val",
            ["pred_boxes"],
            ["pred_masks", "pred_keypoints"],
        ),
    ],
)
def test_frameworks(demo, inputs, config, dataset, fields, absent):
    predictor = build_predictor(demo, SHAPES_CONFIGS / config, ["MODEL.RETINANET.TOPK_CANDIDATES_TEST", "20"])
    assert predictor.metadata.name == dataset
    image = demo.read_image(str(inputs / "color.png"))
    instances, drawing, _ = predictor(image, "color.png")
    assert len(instances) == 3
    assert all(instances.has(f) for f in fields) and not any(instances.has(f) for f in absent)
    assert drawing.shape == image.shape and drawing.dtype == np.uint8
    assert (np.abs(drawing.astype(int) - image).max(axis=2) > 30).mean() > 0.01


def test_script_writes_one_image_file(inputs, tmp_path, datasets_root):
    """Also: the untrained model (MODEL.WEIGHTS "") is said so in one line, and none of the
    torch.jit FutureWarnings that Detectron2's dependencies raise at import time is printed."""
    output = tmp_path / "pred.png"
    result = run_script(
        "demo/demo.py", ["--input", inputs / "color.jpg", "--output", output, *demo_args()], datasets_root
    )
    assert result.returncode == 0, result.stderr
    untrained = [line for line in result.stderr.splitlines() if "model is untrained" in line]
    assert untrained == [
        "warning: MODEL.WEIGHTS is empty: the model is untrained (random weights) and its "
        "predictions are meaningless; add MODEL.WEIGHTS <checkpoint>"
    ], result.stderr
    assert "FutureWarning" not in result.stderr, result.stderr
    assert f"{inputs / 'color.jpg'}: 3 detections in " in result.stdout
    assert os.listdir(tmp_path) == ["pred.png"] and image_size(output) == (120, 160)


# ---------------------------------------------------------------- semantic segmentation

UPERNET_SHAPES = SHAPES_CONFIGS / "mixformer_b1_upernet_shapes.yaml"


@pytest.fixture(scope="module")
def upernet(demo):
    """The UperNet shapes_sem_seg model with random weights."""
    import torch

    torch.manual_seed(0)
    return build_predictor(demo, UPERNET_SHAPES)


@pytest.fixture
def run_sem_seg_demo(demo, upernet, monkeypatch, capsys):
    """Run main(argv + the UperNet args) with the shared model; returns (status, stdout, stderr)."""
    monkeypatch.setattr(demo, "VisualizationPredictor", lambda cfg: upernet)

    def run(*argv):
        status = demo.main([*map(str, argv), *demo_args(UPERNET_SHAPES)])
        out, err = capsys.readouterr()
        return status, out, err

    return run


def test_sem_seg_image_draws_the_label_map_in_the_class_colours(run_sem_seg_demo, upernet, inputs, tmp_path):
    import torch

    from hybrid_d2.data.shapes import SEM_SEG_CLASSES, SEM_SEG_COLORS

    image = cv2.imread(str(inputs / "color.png"))
    labels, _, _ = upernet(image, "color.png")
    with torch.no_grad():  # the model's own output, argmax over the classes
        expected = upernet.predictor(image)["sem_seg"].argmax(dim=0)
    assert labels.shape == image.shape[:2] and labels.dtype == torch.int64
    assert torch.equal(labels, expected) and set(labels.unique().tolist()) <= set(range(6))

    status, stdout, stderr = run_sem_seg_demo("--input", inputs / "color.png", "--output", tmp_path)
    assert status == 0, stderr
    label, count = max(zip(*torch.unique(labels, return_counts=True)), key=lambda lc: lc[1])
    share = f"{SEM_SEG_CLASSES[label]} {100 * count / labels.numel():.0f}%"
    assert f"{inputs / 'color.png'}: segmentation: {share}" in stdout  # the largest class first
    drawing = cv2.imread(str(tmp_path / "color.png"))
    assert drawing.shape == image.shape
    # the largest region is tinted towards its class colour (Visualizer alpha 0.8, BGR file)
    region = labels.numpy() == int(label)
    colour = np.array(SEM_SEG_COLORS[label][::-1], float)
    before = np.abs(image[region].astype(float) - colour).mean()
    after = np.abs(drawing[region].astype(float) - colour).mean()
    assert after < 0.5 * before, (before, after)


def test_sem_seg_video_keeps_the_colours_from_frame_to_frame(run_sem_seg_demo, tmp_path):
    """A still video: every drawn frame is the same drawing (the classes' fixed colours)."""
    clip = tmp_path / "still.mp4"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"mp4v"), VIDEO_FPS, VIDEO_SIZE)
    for _ in range(4):
        writer.write(shapes_image(VIDEO_SIZE[1], VIDEO_SIZE[0]))
    writer.release()
    output = tmp_path / "out" / "still_pred.mp4"
    status, stdout, stderr = run_sem_seg_demo("--video-input", clip, "--output", output)
    assert status == 0, stderr
    assert f"{clip}: 4 frames in" in stdout
    assert video_properties(output) == (4, pytest.approx(VIDEO_FPS), VIDEO_SIZE)
    capture = cv2.VideoCapture(str(output))
    frames = [capture.read()[1].astype(int) for _ in range(4)]
    capture.release()
    assert max(np.abs(f - frames[0]).mean() for f in frames) < 2  # codec noise only
    assert np.abs(frames[0] - shapes_image(VIDEO_SIZE[1], VIDEO_SIZE[0])).mean() > 10  # drawn


def test_sem_seg_metadata_without_names_or_colours_gets_fixed_ones(predictor_module):
    from detectron2.data.catalog import Metadata

    metadata = predictor_module.sem_seg_metadata(Metadata(name="x", stuff_classes=["a", "b"]), 4)
    assert metadata.stuff_classes == ["a", "b", "class 2", "class 3"]
    assert len(metadata.stuff_colors) == 4 and all(len(c) == 3 for c in metadata.stuff_colors)
    again = predictor_module.sem_seg_metadata(Metadata(name="x"), 4)
    assert again.stuff_colors == metadata.stuff_colors  # the same on every call: no flicker
    kept = predictor_module.sem_seg_metadata(Metadata(name="x", stuff_colors=[[1, 2, 3]]), 2)
    assert kept.stuff_colors[0] == [1, 2, 3] and kept.stuff_colors[1] == metadata.stuff_colors[1]
