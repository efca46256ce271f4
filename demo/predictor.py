"""Reading inputs for the demo and drawing a model's predictions on them (used by demo/demo.py)."""

import os
import re
import sys
import time
from typing import Optional, Tuple, Union

import cv2
import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.catalog import Metadata
from detectron2.structures import Instances
from detectron2.utils.visualizer import ColorMode, Visualizer

from hybrid_d2.engine import SafePredictor

IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")


class InputError(Exception):
    """An input (image, video or webcam) that cannot be used; the message names it."""


def read_image(path: str) -> np.ndarray:
    """Read an image file as 3-channel 8-bit BGR, with its EXIF orientation applied.

    Grayscale, RGBA (alpha dropped) and 16-bit images are converted; missing, empty and
    undecodable files raise InputError naming the file.
    """
    if not os.path.exists(path):
        raise InputError(f"{path}: file not found")
    if not os.path.isfile(path):
        raise InputError(f"{path}: not a file")
    if os.path.getsize(path) == 0:
        raise InputError(f"{path}: empty file (0 bytes)")
    # imdecode of the bytes, not imread: it also reads paths that are not ASCII.
    image = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_ANYCOLOR | cv2.IMREAD_ANYDEPTH)
    if image is None:
        raise InputError(f"{path}: cannot decode the image (corrupt, truncated or not an image)")
    return to_bgr8(image, path)


def to_bgr8(image: np.ndarray, name: str) -> np.ndarray:
    """Convert a gray (H, W) or (H, W, 1), BGR or BGRA image of 8 or 16 bits, or of floats in
    [0, 1], to 3-channel 8-bit BGR."""
    image = _to_uint8(image, name)
    channels = 1 if image.ndim == 2 else image.shape[2]
    if channels == 1:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if channels == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if channels == 3:
        return image
    raise InputError(f"{name}: unsupported image with {channels} channels")


def _to_uint8(image: np.ndarray, name: str) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        return (image >> 8).astype(np.uint8)  # 0..65535 -> 0..255
    if np.issubdtype(image.dtype, np.floating):
        return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    raise InputError(f"{name}: unsupported pixel type {image.dtype}")


def display_problem(build_information: Optional[str] = None) -> Optional[str]:
    """Why OpenCV cannot show a window here (no GUI backend, no display), or None if it can.

    Checked before any window is opened: without a display, OpenCV's Qt backend aborts the
    whole process instead of raising an error.
    """
    info = cv2.getBuildInformation() if build_information is None else build_information
    match = re.search(r"^\s*GUI:\s*(\S+)", info, flags=re.MULTILINE)
    if match is None or match.group(1).upper() == "NONE":
        return "this OpenCV build has no GUI (e.g. opencv-python-headless)"
    if sys.platform.startswith("linux") and not (
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    ):
        return "no display is available (DISPLAY and WAYLAND_DISPLAY are not set)"
    return None


# A detector's instances, or a semantic segmentor's label map (H, W) at the input's size.
Prediction = Union[Instances, torch.Tensor]


def sem_seg_metadata(metadata: Metadata, num_classes: int) -> Metadata:
    """``metadata``'s class names and colours for drawing label maps of ``num_classes`` classes:
    names ``class <i>`` where it has none, and where it has no colours (Detectron2's ADE20K has
    none, and the Visualizer would then draw every region in a new random colour, which flickers
    in a video) one fixed colour per class."""
    names = list(getattr(metadata, "stuff_classes", None) or [])
    names += [f"class {i}" for i in range(len(names), num_classes)]
    colors = list(getattr(metadata, "stuff_colors", None) or [])
    if len(colors) < len(names):
        palette = np.random.default_rng(0).integers(0, 256, (len(names), 3))
        colors += [list(map(int, c)) for c in palette[len(colors) :]]
    return Metadata(name=metadata.name, stuff_classes=names, stuff_colors=colors)


class VisualizationPredictor:
    """A predictor whose predictions come back drawn on the input with the Visualizer, in the
    class colours of the metadata of cfg.DATASETS.TEST[0]: a detector's instances, or a
    semantic segmentor's label map (``Visualizer.draw_sem_seg``, single-scale). The weights load
    as in train_net.py (SafePredictor): a checkpoint that does not fit the config is refused."""

    def __init__(self, cfg: CfgNode):
        self.predictor = SafePredictor(cfg)
        self.metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "__unused")
        self.min_size, self.max_size = cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST
        self.semantic = cfg.MODEL.META_ARCHITECTURE == "SemanticSegmentor"
        if self.semantic:
            self.metadata = sem_seg_metadata(self.metadata, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)

    def __call__(
        self, image_bgr: np.ndarray, name: str, jitter_colors: bool = True
    ) -> Tuple[Prediction, np.ndarray, float]:
        """Predict on a 3-channel 8-bit BGR image; return the prediction (on the CPU: instances,
        or the label map of a semantic segmentor), the drawing (BGR, the input's size) and the
        prediction time in seconds.

        jitter_colors: vary the colour of instances of one class (images); off for stable colours
        from frame to frame (videos). Label maps always take the classes' colours.
        """
        self._check_resized_size(image_bgr.shape[:2], name)
        start = time.perf_counter()
        outputs = self.predictor(image_bgr)
        seconds = time.perf_counter() - start
        visualizer = Visualizer(image_bgr[:, :, ::-1], self.metadata, instance_mode=ColorMode.SEGMENTATION)
        if self.semantic:
            prediction = outputs["sem_seg"].argmax(dim=0).to("cpu")
            drawing = visualizer.draw_sem_seg(prediction).get_image()
        else:
            prediction = outputs["instances"].to("cpu")
            drawing = visualizer.draw_instance_predictions(prediction, jittering=jitter_colors).get_image()
        return prediction, np.ascontiguousarray(drawing[:, :, ::-1]), seconds

    def describe(self, prediction: Prediction) -> str:
        """One line about a prediction: the number of detections, or the classes of a label map
        by their share of the pixels."""
        if isinstance(prediction, Instances):
            return f"{len(prediction)} detection{'' if len(prediction) == 1 else 's'}"
        labels, counts = torch.unique(prediction, return_counts=True)
        shares = sorted(zip(counts.tolist(), labels.tolist()), reverse=True)
        names = self.metadata.stuff_classes
        return "segmentation: " + ", ".join(f"{names[c]} {100 * n / prediction.numel():.0f}%" for n, c in shares)

    def _check_resized_size(self, size: Tuple[int, int], name: str) -> None:
        """The predictor resizes the short side to INPUT.MIN_SIZE_TEST, unless the long side would
        exceed INPUT.MAX_SIZE_TEST: a very elongated image can end up less than a pixel thin."""
        height, width = size
        new_h, new_w = T.ResizeShortestEdge.get_output_shape(height, width, self.min_size, self.max_size)
        if min(new_h, new_w) < 1:
            raise InputError(
                f"{name}: image of {width}x{height} pixels is too elongated: at most "
                f"INPUT.MAX_SIZE_TEST={self.max_size} pixels long, it would be {new_w}x{new_h}"
            )
