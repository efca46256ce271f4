#!/usr/bin/env python
"""Draw a model's predictions on images, a video file or a webcam: a detector's instances, or a
semantic segmentation model's label map (single-scale, in the classes' colours).

    python demo/demo.py --config-file CFG --input a.jpg b.png 'dir/*.jpg' --output out/ \\
        --opts MODEL.WEIGHTS model_final.pth
    python demo/demo.py --config-file CFG --video-input clip.mp4 --output clip_pred.mp4 --opts ...
    python demo/demo.py --config-file CFG --webcam --opts ...

Without --output, predictions are shown in a window (Esc quits). Exit status: 0 when every input
was processed, 1 when some input failed (the others are still processed), 2 on a usage or setup
error.
"""

import warnings

warnings.filterwarnings(  # Detectron2's dependencies' torch.jit use, at import time
    "ignore", r"`torch\.jit\.(script|interface)` is deprecated", FutureWarning, r"torch\.jit\."
)

import argparse
import glob
import os
import sys
import time
from typing import Iterator, List, Optional, Tuple

import cv2
import numpy as np
import torch
import tqdm
from detectron2.config import CfgNode

from hybrid_d2 import get_config
from hybrid_d2.engine import USER_ERRORS, UsageError, untrained_warning
from hybrid_d2.utils import atomic_output
from predictor import IMAGE_EXTENSIONS, InputError, VisualizationPredictor, display_problem, read_image

WINDOW_NAME = "hybrid_d2 predictions"
ESC_KEY = 27
VIDEO_CODEC = "mp4v"
DEFAULT_FPS = 30.0


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The command line; --max-frames only goes with --video-input, --output not with --webcam."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="images, folders of images or glob patterns ('dir/*.jpg')")
    source.add_argument("--video-input", metavar="VIDEO", help="a video file")
    source.add_argument("--webcam", action="store_true", help="the first webcam, shown live")
    parser.add_argument(
        "--output",
        help="images: a folder, or an image file for a single input\n"
        "video: the output video (codec mp4v; <video name>.mp4 if a folder)\n"
        "without it: show a window",
    )
    parser.add_argument(
        "--confidence-threshold", type=float, default=0.5, help="minimum score drawn (detectors)"
    )
    parser.add_argument("--max-frames", type=int, help="stop a video after this many frames")
    parser.add_argument(
        "--opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ..."
    )
    args = parser.parse_args(argv)
    if args.max_frames is not None and (args.video_input is None or args.max_frames < 1):
        parser.error("--max-frames takes a positive number and goes with --video-input")
    if args.webcam and args.output:
        parser.error("--output is not supported with --webcam")
    return args


def setup_cfg(args: argparse.Namespace) -> CfgNode:
    """Config from the defaults, hybrid_d2's keys, the yaml, --opts and --confidence-threshold."""
    cfg = get_config(args.config_file, args.opts)
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = args.confidence_threshold
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = args.confidence_threshold
    cfg.MODEL.PANOPTIC_FPN.COMBINE.INSTANCES_CONFIDENCE_THRESH = args.confidence_threshold
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(
            f"MODEL.DEVICE={cfg.MODEL.DEVICE!r} but CUDA is not available; use --opts MODEL.DEVICE cpu"
        )
    weights = cfg.MODEL.WEIGHTS
    if weights and "://" not in weights and not os.path.isfile(weights):
        raise UsageError(f"MODEL.WEIGHTS file not found: {weights}")
    cfg.freeze()
    return cfg


# ---------------------------------------------------------------- images


def expand_inputs(items: List[str]) -> Tuple[List[str], List[str]]:
    """Files, the images of folders and the matches of glob patterns, in order; and an error for
    each folder or pattern that gives no image. Other paths are kept, to be reported when read."""
    paths, errors = [], []
    for item in map(os.path.expanduser, items):
        if os.path.isdir(item):
            found = sorted(
                os.path.join(item, name)
                for name in os.listdir(item)
                if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
            )
            if not found:
                errors.append(f"{item}: folder holds no images ({' '.join(IMAGE_EXTENSIONS)})")
        elif any(c in item for c in "*?["):
            found = sorted(glob.glob(item))
            if not found:
                errors.append(f"{item}: no file matches this pattern")
        else:
            found = [item]
        paths.extend(found)
    return paths, errors


def image_output_paths(inputs: List[str], output: str) -> List[str]:
    """One output path per input: ``output`` itself for a single input when it is an image file
    name, else the inputs' file names inside the folder ``output`` (made unique)."""
    is_image_name = os.path.splitext(output)[1].lower() in IMAGE_EXTENSIONS
    if len(inputs) == 1 and is_image_name and not os.path.isdir(output):
        return [output]
    paths, used = [], set()
    for path in inputs:
        stem, ext = os.path.splitext(os.path.basename(path))
        name, n = stem + ext, 1
        while name in used:
            n += 1
            name = f"{stem}_{n}{ext}"
        used.add(name)
        paths.append(os.path.join(output, name))
    return paths


def write_image(path: str, image_bgr: np.ndarray) -> None:
    """Write atomically; InputError naming the file if OpenCV cannot."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_output(path) as tmp_path:
        try:
            written = cv2.imwrite(tmp_path, image_bgr)
        except cv2.error as e:
            raise InputError(f"{path}: cannot write the image ({e.msg.strip()})") from None
        if not written:
            raise InputError(f"{path}: cannot write the image")


def show(image_bgr: np.ndarray, wait_ms: int) -> bool:
    """Show an image in the window; False when the user pressed Esc."""
    cv2.namedWindow(WINDOW_NAME, cv2.WINDOW_NORMAL)
    cv2.imshow(WINDOW_NAME, image_bgr)
    return cv2.waitKey(wait_ms) & 0xFF != ESC_KEY


def process_image(predictor: VisualizationPredictor, path: str, output: Optional[str]) -> bool:
    """Predict on one image, write or show the drawing, print a summary; False to stop."""
    if output is not None and os.path.abspath(output) == os.path.abspath(path):
        raise InputError(f"{path}: the output would overwrite the input; choose another --output")
    prediction, drawing, seconds = predictor(read_image(path), path)
    summary = predictor.describe(prediction)
    print(f"{path}: {summary} in {seconds:.2f}s" + (f" -> {output}" if output else ""))
    if output is None:
        return show(drawing, 0)
    write_image(output, drawing)
    return True


def report_failure(name: str, error: Exception) -> None:
    """Print why an input failed (an InputError's message names it already)."""
    message = str(error) if isinstance(error, InputError) else f"{name}: {type(error).__name__}: {error}"
    print(f"error: {message}", file=sys.stderr)


def run_images(predictor: VisualizationPredictor, items: List[str], output: Optional[str]) -> int:
    """Process every image; report failures by file and go on. Returns the exit status."""
    paths, errors = expand_inputs(items)
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    outputs = image_output_paths(paths, output) if output else [None] * len(paths)
    done, failed = 0, len(errors)
    for path, out in zip(paths, outputs):
        try:
            if not process_image(predictor, path, out):
                break
            done += 1
        except Exception as e:  # one bad input must not stop the others
            report_failure(path, e)
            failed += 1
    print(f"{done} of {len(paths) + len(errors)} inputs done, {failed} failed")
    return 1 if failed else 0


# ---------------------------------------------------------------- video and webcam


def video_output_path(video: str, output: str) -> str:
    """``output`` when it names a file (its extension picks the container), else
    ``output/<video name>.mp4``."""
    if os.path.isdir(output) or not os.path.splitext(output)[1]:
        output = os.path.join(output, os.path.splitext(os.path.basename(video))[0] + ".mp4")
    if os.path.abspath(output) == os.path.abspath(video):
        raise InputError(f"{video}: the output would overwrite the input; choose another --output")
    return output


def open_video(path: str) -> cv2.VideoCapture:
    """An opened VideoCapture, or InputError naming the file."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: file not found" if not os.path.exists(path) else f"{path}: not a file")
    capture = cv2.VideoCapture(path)
    if not capture.isOpened():
        raise InputError(f"{path}: cannot open the video (corrupt, empty or unsupported format)")
    return capture


def read_frames(capture: cv2.VideoCapture, max_frames: Optional[int], name: str) -> Iterator[np.ndarray]:
    """The frames of a capture, at most max_frames of them; InputError naming it if it has none."""
    count = 0
    while max_frames is None or count < max_frames:
        ok, frame = capture.read()
        if not ok:
            break
        count += 1
        yield frame
    if count == 0:
        raise InputError(f"{name}: no frame can be read (empty, corrupt or not a video)")


def progress(capture: cv2.VideoCapture, max_frames: Optional[int], name: str) -> tqdm.tqdm:
    """A progress bar over the frames the capture says it has (unknown when it does not)."""
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    total = total if total > 0 else None
    if max_frames is not None:
        total = min(total, max_frames) if total else max_frames
    return tqdm.tqdm(total=total, desc=os.path.basename(name), unit="frame", dynamic_ncols=True)


def predict_frames(
    predictor: VisualizationPredictor, capture: cv2.VideoCapture, max_frames: Optional[int], name: str
) -> Iterator[np.ndarray]:
    """The drawn frames of a capture, with a progress bar (frames, frames/s)."""
    with progress(capture, max_frames, name) as bar:
        for frame in read_frames(capture, max_frames, name):
            yield predictor(frame, name, jitter_colors=False)[1]
            bar.update()


def open_writer(path: str, output: str, fps: float, frame: np.ndarray) -> cv2.VideoWriter:
    """A VideoWriter to ``path`` for frames like ``frame``; InputError naming ``output`` if none."""
    height, width = frame.shape[:2]
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*VIDEO_CODEC), fps, (width, height))
    if not writer.isOpened():
        raise InputError(f"{output}: cannot write a {VIDEO_CODEC} video with this file extension")
    return writer


def write_video(
    predictor: VisualizationPredictor,
    capture: cv2.VideoCapture,
    name: str,
    output: str,
    max_frames: Optional[int],
) -> int:
    """Write the drawn frames with the input's fps and size; returns the frame count. The file
    appears only when complete: it is written to a temporary path, renamed at the end."""
    fps = capture.get(cv2.CAP_PROP_FPS)
    if not fps > 0:
        print(f"{name}: the video gives no frame rate; writing {DEFAULT_FPS:g} fps", file=sys.stderr)
        fps = DEFAULT_FPS
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    count, writer = 0, None
    with atomic_output(output) as tmp_path:
        try:
            for count, drawing in enumerate(predict_frames(predictor, capture, max_frames, name), 1):
                if writer is None:  # opened on the first frame, with its size
                    writer = open_writer(tmp_path, output, fps, drawing)
                writer.write(drawing)
        finally:
            if writer is not None:
                writer.release()
    return count


def show_frames(
    predictor: VisualizationPredictor, capture: cv2.VideoCapture, name: str, max_frames: Optional[int]
) -> int:
    """Show the drawn frames live until the end or Esc; returns the frame count."""
    count = 0
    for count, drawing in enumerate(predict_frames(predictor, capture, max_frames, name), 1):
        if not show(drawing, 1):
            break
    return count


def run_video(
    predictor: VisualizationPredictor, path: str, output: Optional[str], max_frames: Optional[int]
) -> int:
    """Process a video file into ``output`` (or a window). Returns the exit status."""
    start = time.perf_counter()
    try:
        out = video_output_path(path, output) if output else None
        capture = open_video(path)
        try:
            if out:
                count = write_video(predictor, capture, path, out, max_frames)
            else:
                count = show_frames(predictor, capture, path, max_frames)
        finally:
            capture.release()
    except Exception as e:  # report it by file name, like a failed image
        report_failure(path, e)
        return 1
    seconds = time.perf_counter() - start
    print(
        f"{path}: {count} frames in {seconds:.1f}s ({count / seconds:.2f} frames/s)"
        + (f" -> {out}" if out else "")
    )
    return 0


def run_webcam(predictor: VisualizationPredictor) -> int:
    """Show the first webcam's frames with predictions until Esc. Returns the exit status."""
    capture = cv2.VideoCapture(0)
    try:
        if not capture.isOpened():
            raise InputError("webcam: cannot open camera 0")
        show_frames(predictor, capture, "webcam", None)
    except Exception as e:
        report_failure("webcam", e)
        return 1
    finally:
        capture.release()
    return 0


# ---------------------------------------------------------------- main


def main(argv: Optional[List[str]] = None) -> int:
    """Run the demo; returns the exit status."""
    args = parse_args(argv)
    if args.output is None:
        problem = display_problem()
        if problem:
            print(
                f"error: cannot show a window: {problem}; use --output to write files instead",
                file=sys.stderr,
            )
            return 2
    try:
        cfg = setup_cfg(args)
        if warning := untrained_warning(cfg):
            print(warning, file=sys.stderr)
        predictor = VisualizationPredictor(cfg)
    except USER_ERRORS as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    try:
        if args.input:
            return run_images(predictor, args.input, args.output)
        if args.video_input:
            return run_video(predictor, args.video_input, args.output, args.max_frames)
        return run_webcam(predictor)
    finally:
        if args.output is None:
            cv2.destroyAllWindows()


if __name__ == "__main__":
    sys.exit(main())
