#!/usr/bin/env python
"""Benchmarks (not tests): inference latency, training throughput and peak memory, one mode each.

    PYTHONPATH=. python tools/benchmark.py detectors          # detectors against R50 and Swin-T
    PYTHONPATH=. python tools/benchmark.py backbones          # backbones alone against ResNet-50
    PYTHONPATH=. python tools/benchmark.py compile            # eager against torch.compile
    PYTHONPATH=. python tools/benchmark.py dmformer-branches  # DMFormer's dilated branches
    PYTHONPATH=. python tools/benchmark.py segmentation       # UperNet segmentors against R50
    PYTHONPATH=. python tools/benchmark.py MODE --help        # what MODE measures, its options

Every mode shares:

* the options ``--threads`` (torch's and OpenMP's threads, also for Inductor's kernels, which
  take ``torch.get_num_threads()``), ``--height``/``--width``, ``--warmup``, ``--rounds``,
  ``--doc`` and ``--note``;
* one timing loop, :func:`alternate`: untimed warm-up rounds, then timed rounds; in every round
  each measured call runs once, in turn (round-robin), so that drift of the machine reaches all
  alike. Reports give the median and the range (min-max) over the rounds;
* one memory measurement, :func:`peak_memory`: on CPU the peak resident set size (VmHWM, reset
  through ``/proc/self/clear_refs``) over the RSS before, on CUDA ``max_memory_allocated`` over
  the allocated memory before; on CPU in a fresh interpreter, :func:`run_worker` (this command
  line plus ``--worker NAME``), with ``MALLOC_MMAP_THRESHOLD_=65536`` where it measures memory,
  so that glibc returns freed blocks and the peak follows the live tensors;
* one report writer, :func:`write_report`: a header (command, machine, date, settings, note) and
  markdown tables, printed, and with ``--doc FILE`` written between the lines
  ``<!-- benchmark.py MODE: begin -->`` and ``<!-- benchmark.py MODE: end -->`` of FILE (and,
  for a mode registered with ``json_path=``, as JSON to ``--json``).

Adding a mode: one function that measures with the pieces above and returns a :class:`Report`,
and its registration (:class:`Mode`'s fields: default size and warm-up, own options, ``doc=`` and
``json_path=`` for default outputs, ``worker=`` for what ``--worker NAME`` measures in a fresh
process). Its docstring is the mode's ``--help``, its first line the summary. For example, the
segmentation mode, abridged:

    @mode("segmentation", height=512, width=512, warmup=1, options=[models_option(SEGMENTORS)])
    def segmentation(args: argparse.Namespace) -> Report:
        '''UperNet segmentors against Detectron2's ResNet-50 with the same UperNet head.

        What it measures, how (shown by ``segmentation --help``).'''
        runners = {name: Runner(segmentor_config(name, "cpu"), args, False, train=False) ...}
        times = alternate({name: r.infer for name, r in runners.items()}, args.warmup, ...)
        return Report(settings=f"{args.height}x{args.width}, ...", tables=[Table(columns, rows)])

The pieces for Detectron2 models (detectors, segmentation): :class:`Runner` (inference, a
training step on synthetic instances, GFLOPs, memory), :func:`latency_cells` (GFLOPs and latency
with their ratios to a reference, latency per GFLOP) and :func:`detector_table`.
"""

import warnings

warnings.filterwarnings(  # Detectron2's dependencies' torch.jit use, at import time
    "ignore", r"`torch\.jit\.(script|interface)` is deprecated", FutureWarning, r"torch\.jit\."
)

import argparse
import copy
import datetime
import importlib.util
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from detectron2 import model_zoo as d2_model_zoo
from detectron2.config import CfgNode, get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, build_model
from detectron2.modeling.backbone import FPN
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.backbone.resnet import build_resnet_backbone
from detectron2.modeling.backbone.swin import SwinTransformer
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage
from torch import nn

from hybrid_d2 import get_config
from hybrid_d2.backbones import D2DilateFormer, D2DMFormer, D2DualFormer, D2DynamicMobileFormer
from hybrid_d2.backbones import D2MixFormer
from hybrid_d2.backbones.dmformer import DIMS, DMA_RATIO, DilatedBranches
from hybrid_d2.layers import flop_count_analysis, flop_totals
from hybrid_d2.utils import atomic_output

TOOLS = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TOOLS)
sys.path.insert(0, TOOLS)
from model_zoo import DummyForward, padded  # noqa: E402

DOC = os.path.join(REPO_ROOT, "docs", "benchmarks.md")
RESULTS = os.path.join(REPO_ROOT, "docs", "benchmark_results.json")


# ---- shared: timing, memory, workers, report -------------------------------------------------


def progress(text: str) -> None:
    """A progress line on stderr (the report goes to stdout)."""
    print(text, file=sys.stderr, flush=True)


def no_sync() -> None:
    pass


def synchronizer(device: str) -> Callable[[], None]:
    """What makes a timed call wait for ``device``'s queued work."""
    return torch.cuda.synchronize if device.startswith("cuda") else no_sync


def alternate(
    calls: Dict[str, Callable[[], object]],
    warmup: int,
    rounds: int,
    sync: Callable[[], None] = no_sync,
    label: str = "run",
) -> Dict[str, List[float]]:
    """Seconds per call of each of ``calls``: ``warmup`` untimed rounds, then ``rounds`` timed
    ones; every round runs each call once, in turn."""
    times: Dict[str, List[float]] = {name: [] for name in calls}
    for r in range(-warmup, rounds):
        for name, call in calls.items():
            sync()
            start = time.perf_counter()
            call()
            sync()
            if r >= 0:
                times[name].append(time.perf_counter() - start)
                progress(f"  {label} round {r + 1}/{rounds}: {name} {times[name][-1]:.3f} s")
    return times


def inference(model: nn.Module, image: torch.Tensor) -> Callable[[], Any]:
    """A call of ``model`` on ``image`` under ``torch.no_grad``."""

    def call() -> Any:
        with torch.no_grad():
            return model(image)

    return call


def spread(values: Sequence[float], scale: float = 1.0) -> Dict[str, float]:
    """Median, min and max of ``values`` times ``scale``."""
    values = [v * scale for v in values]
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


@dataclass
class Memory:
    """MiB before a measured block (``base``) and at its high-water mark (``peak``)."""

    base: float = 0.0
    peak: float = 0.0

    @property
    def added(self) -> float:
        return self.peak - self.base


def _status_mib(field_name: str) -> float:
    """VmRSS (current) or VmHWM (peak since the last reset) of this process, Linux."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field_name + ":"))
    return int(line.split()[1]) / 1024


@contextmanager
def peak_memory(device: str) -> Iterator[Memory]:
    """Memory of the block within: on CPU RSS before and peak RSS within (writing 5 to
    /proc/self/clear_refs resets the peak to the current RSS, so that what ran before does not
    mask it); on CUDA the allocated memory before and its maximum within."""
    memory = Memory()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        memory.base = torch.cuda.memory_allocated() / 2**20
        yield memory
        torch.cuda.synchronize()
        memory.peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        memory.base = _status_mib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        yield memory
        memory.peak = _status_mib("VmHWM")


def run_worker(args: argparse.Namespace, name: str, memory: bool) -> dict:
    """The JSON that ``args.mode``'s worker prints for model ``name`` in a fresh interpreter (so
    that peak memory is its own). With ``memory``, glibc serves every block >= 64 KiB by mmap and
    unmaps it when freed, so the RSS high-water mark follows the live tensors instead of what the
    heap kept; the page faults this costs would distort latency."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, env.get("PYTHONPATH")]))
    command = [sys.executable, __file__, *args.argv, "--worker", name]
    if memory:
        env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
        command.append("--memory")
    progress(f"  {'memory' if memory else 'latency'} worker: {name}")
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{name}: benchmark worker failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


@dataclass
class Table:
    """A markdown table of preformatted cells, with a bold title above it when one is given."""

    columns: List[str]
    rows: List[List[str]] = field(default_factory=list)
    title: str = ""

    def render(self) -> List[str]:
        lines = [f"\n**{self.title}**\n"] if self.title else []
        lines += [
            "| " + " | ".join(self.columns) + " |",
            "|" + "---|" * len(self.columns),
        ]
        return lines + ["| " + " | ".join(row) + " |" for row in self.rows]


@dataclass
class Report:
    """What a mode measured: its settings, remarks and tables, and the results for JSON."""

    settings: str
    tables: List[Table]
    remarks: List[str] = field(default_factory=list)
    results: dict = field(default_factory=dict)


def machine() -> str:
    """Host, CPU, core count, torch version and GPU, for the report header."""
    cpu = platform.processor() or platform.machine()
    text = f"{platform.node()}, {cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    if torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name()}"
    return text


def render(run: dict, tables: Sequence[Table], remarks: Sequence[str] = ()) -> str:
    """The markdown of one run: header, note, remarks, tables."""
    lines = [
        f"Command: `{run['command']}`  \nMachine: {run['machine']}  \nDate: {run['date']}  \n"
        f"Settings: {run['settings']}\n"
    ]
    if run["note"]:
        lines.append(f"\n**Note: {run['note']}**\n")
    if remarks:
        lines.append("  \n".join(remarks) + "\n")
    for table in tables:
        lines += table.render()
    return "\n".join(lines) + "\n"


def markers(mode_name: str) -> Tuple[str, str]:
    """The lines between which ``--doc`` gets the mode's report."""
    return f"<!-- benchmark.py {mode_name}: begin -->", f"<!-- benchmark.py {mode_name}: end -->"


def check_markers(path: str, mode_name: str) -> str:
    """``path``'s text; exits unless it has one begin line before one end line of the mode."""
    begin, end = markers(mode_name)
    with open(path) as f:
        text = f.read()
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise SystemExit(f"benchmark: {path} needs one '{begin}' line before one '{end}' line")
    return text


def write_report(report: Report, args: argparse.Namespace) -> None:
    """Print the report; with ``--doc FILE`` write it between the mode's markers of FILE and,
    where the mode has ``--json``, the run as JSON."""
    run = {
        "command": "python tools/benchmark.py " + " ".join(args.argv),
        "machine": machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "settings": report.settings,
        "note": args.note,
        "results": report.results,
    }
    text = render(run, report.tables, report.remarks)
    print(text)
    if args.doc == "-":
        return
    if getattr(args, "json", None):
        with atomic_output(args.json) as tmp:
            with open(tmp, "w") as f:
                json.dump(run, f, indent=1)
    begin, end = markers(args.mode)
    head, rest = check_markers(args.doc, args.mode).split(begin)
    with atomic_output(args.doc) as tmp:
        with open(tmp, "w") as f:
            f.write(f"{head}{begin}\n{text}{end}{rest.split(end, 1)[1]}")


# ---- the mode registry ----------------------------------------------------------------------

Option = Tuple[Tuple[str, ...], Dict[str, Any]]


def option(*flags: str, **kwargs: Any) -> Option:
    """An ``add_argument`` call of a mode's own option, for :func:`mode`."""
    return flags, kwargs


def models_option(models: Sequence[str]) -> Option:
    """``--models``: a subset of ``models``, all by default."""
    return option("--models", nargs="+", choices=list(models), default=list(models))


RunMode = Callable[[argparse.Namespace], Report]


@dataclass
class Mode:
    """A registered mode: its function, default image size and warm-up, own options, the
    function a worker process runs (``--worker NAME``) and default outputs (``doc`` "-": print
    only; ``json_path``: a ``--json`` option)."""

    run: RunMode
    width: int
    warmup: int
    height: int = 800
    options: Sequence[Option] = ()
    worker: Optional[Callable[[argparse.Namespace], dict]] = None
    doc: str = "-"
    json_path: Optional[str] = None


MODES: Dict[str, Mode] = {}


def mode(name: str, **settings: Any) -> Callable[[RunMode], RunMode]:
    """Register the decorated function as mode ``name``; ``settings``: :class:`Mode`'s fields."""

    def register(run: RunMode) -> RunMode:
        MODES[name] = Mode(run, **settings)
        return run

    return register


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: expected at least 1")
    return value


def add_mode_parser(subparsers: argparse._SubParsersAction, name: str, spec: Mode) -> None:
    doc = inspect.getdoc(spec.run)
    parser = subparsers.add_parser(
        name,
        help=doc.splitlines()[0],
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--threads", type=int, default=2, help="CPU threads (torch and OpenMP)")
    add("--height", type=int, default=spec.height)
    add("--width", type=int, default=spec.width)
    add("--warmup", type=int, default=spec.warmup, help="untimed warm-up rounds")
    add("--rounds", type=_at_least_one, default=5, help="timed rounds")
    for flags, kwargs in spec.options:
        add(*flags, **kwargs)
    add("--doc", default=spec.doc, help="markdown file to update (its markers), or - to print")
    if spec.json_path:
        add("--json", default=spec.json_path, help="JSON file of the run (written with --doc)")
    add("--note", default="", help="a remark on the run, shown in the report")
    if spec.worker:
        add("--worker", help=argparse.SUPPRESS)
        add("--memory", action="store_true", help=argparse.SUPPRESS)


# ---- detectors: end to end against R50 and Swin-T Mask R-CNN --------------------------------

DETECTOR_REFERENCE = "R50 Mask R-CNN"
D2_R50 = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"
# name: hybrid_d2 config, or None for the Detectron2 references built below
DETECTORS: Dict[str, Optional[str]] = {
    DETECTOR_REFERENCE: None,
    "Swin-T Mask R-CNN": None,
    "MixFormer-B4 Mask R-CNN": "configs/mixformer_b4_mask_rcnn_1x.yaml",
    "DilateFormer-S Mask R-CNN": "configs/dilateformer_s_mask_rcnn_1x.yaml",
    "DualFormer-S Mask R-CNN": "configs/dualformer_s_mask_rcnn_1x.yaml",
    "DMF-S RetinaNet": "configs/dmf_s_retinanet_1x.yaml",
    "DMFormer-S Mask R-CNN": "configs/dmformer_s_mask_rcnn_1x.yaml",
}


@BACKBONE_REGISTRY.register()
def build_swin_t_fpn_backbone(cfg: CfgNode, input_shape) -> FPN:
    """Detectron2's Swin-T (``detectron2.modeling.backbone.swin``, drop path 0.2) under an FPN
    on its four stages, as ViTDet's and Mask2Former's Swin configs build it."""
    bottom_up = SwinTransformer(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
    return FPN(
        bottom_up=bottom_up,
        in_features=["p0", "p1", "p2", "p3"],
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        top_block=LastLevelMaxPool(),
    )


def _without_sync_bn(cfg: CfgNode) -> None:
    """One process trains: SyncBN is BatchNorm (and CUDA's SyncBatchNorm needs a process group)."""
    for key, value in cfg.items():
        if isinstance(value, CfgNode):
            _without_sync_bn(value)
        elif value == "SyncBN":
            cfg[key] = "BN"


def detector_config(name: str, device: str) -> CfgNode:
    """The config of a benchmarked detector with score thresholds 0 (``detectors --help``)."""
    path = DETECTORS[name]
    if path is None:
        cfg = get_cfg()
        cfg.merge_from_file(d2_model_zoo.get_config_file(D2_R50))
        if name != DETECTOR_REFERENCE:
            cfg.MODEL.BACKBONE.NAME = "build_swin_t_fpn_backbone"
            cfg.MODEL.PIXEL_MEAN = [123.675, 116.28, 103.53]
            cfg.MODEL.PIXEL_STD = [58.395, 57.12, 57.375]
            cfg.INPUT.FORMAT = "RGB"
    else:
        cfg = get_config(os.path.join(REPO_ROOT, path))
    cfg.MODEL.DEVICE = device
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0
    _without_sync_bn(cfg)
    return cfg


def synthetic_batch(images: int, height: int, width: int, device: str, train: bool) -> List[dict]:
    """``images`` noise images; with ``train``, 5 instances each (boxes, classes, masks)."""
    generator = torch.Generator().manual_seed(0)
    batch = []
    for _ in range(images):
        image = torch.randint(0, 256, (3, height, width), generator=generator).float()
        item = {"image": image.to(device), "height": height, "width": width}
        if train:
            corner = torch.rand(5, 2, generator=generator) * torch.tensor([width, height]) * 0.6
            boxes = torch.cat([corner, corner + torch.tensor([width, height]) * 0.3], 1)
            masks = torch.zeros(5, height, width, dtype=torch.bool)
            for mask, (x0, y0, x1, y1) in zip(masks, boxes.round().long().tolist()):
                mask[y0:y1, x0:x1] = True
            instances = Instances(
                (height, width),
                gt_boxes=Boxes(boxes),
                gt_classes=torch.randint(0, 80, (5,), generator=generator),
                gt_masks=BitMasks(masks),
            )
            item["instances"] = instances.to(device)
        batch.append(item)
    return batch


class Runner:
    """One Detectron2 model with its inputs: ``infer`` (batch 1) and, with ``train``,
    ``train_step`` (batch 2 of a detector's synthetic instances)."""

    def __init__(self, cfg: CfgNode, args: argparse.Namespace, amp: bool, train: bool = True):
        torch.manual_seed(0)
        self.model = build_model(cfg)
        self.device, self.amp = cfg.MODEL.DEVICE, amp
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-5, momentum=0.9)
        self.image = synthetic_batch(1, args.height, args.width, self.device, train=False)
        self.train_batch = (
            synthetic_batch(2, args.height, args.width, self.device, train=True) if train else None
        )

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.split(":")[0], dtype=torch.float16, enabled=self.amp)

    def infer(self) -> None:
        self.model.eval()
        with torch.no_grad(), self._autocast():
            self.model(self.image)

    def train_step(self) -> None:
        self.model.train()
        with EventStorage(), self._autocast():
            losses = self.model(self.train_batch)
        self.optimizer.zero_grad()
        sum(losses.values()).backward()
        self.optimizer.step()

    def gflops(self) -> float:
        """fvcore GFLOPs with tools/model_zoo.py's protocol at the input size."""
        height, width = self.image[0]["height"], self.image[0]["width"]
        self.model.eval()
        with torch.no_grad():
            image = torch.zeros(1, 3, *padded((height, width)), device=self.device)
            return flop_totals(DummyForward(self.model, (height, width)), image)["fvcore"] / 1e9

    def memory(self) -> Dict[str, float]:
        """MiB before, and added at the peak of one inference and one training step."""
        with peak_memory(self.device) as inference:
            self.infer()
        with peak_memory(self.device) as train:
            self.train_step()
        return {
            "base_mib": inference.base,
            "inference_mib": inference.added,
            "train_mib": train.added,
        }


def paper_row_key(name: str) -> str:
    """The key of ``name``'s row in tools/model_zoo_data.py (PAPER_ROWS or REFERENCE_ROWS)."""
    if DETECTORS[name] is None:
        return "ResNet-50" if name == DETECTOR_REFERENCE else "Swin-T"
    return os.path.splitext(os.path.basename(DETECTORS[name]))[0]


def detector_memory_worker(args: argparse.Namespace) -> dict:
    """CPU memory of the detector ``--worker NAME`` (:meth:`Runner.memory`)."""
    return Runner(detector_config(args.worker, "cpu"), args, amp=False).memory()


def measure_detectors(args: argparse.Namespace, device: str, amp: bool) -> Dict[str, dict]:
    """Latency, training throughput, memory and GFLOPs of every detector on ``device``."""
    runners = {name: Runner(detector_config(name, device), args, amp) for name in args.models}
    sync, cpu = synchronizer(device), not device.startswith("cuda")
    infer = {name: runner.infer for name, runner in runners.items()}
    infer = alternate(infer, args.warmup, args.rounds, sync, "infer")
    train = {name: runner.train_step for name, runner in runners.items()}
    train = alternate(train, 1, args.train_rounds, sync, "train_step")
    results = {}
    for name, runner in runners.items():
        results[name] = {
            "latency_s": spread(infer[name]),
            "train_images_per_s": spread([2 / t for t in train[name]]),
        }
        results[name].update(run_worker(args, name, memory=True) if cpu else runner.memory())
        results[name]["gflops"] = runner.gflops()
        results[name]["paper_row"] = paper_row_key(name)
    return results


LATENCY_COLUMNS = [
    "GFLOPs", "× R50 FLOPs", "latency s, median (min–max)", "× R50 latency",
    "× R50 latency per GFLOP",
]  # fmt: skip


def latency_cells(result: dict, reference: dict) -> List[str]:
    """The :data:`LATENCY_COLUMNS` cells of ``result``: GFLOPs, latency and their ratios to
    ``reference``'s (latency per GFLOP above 1.3 in bold)."""
    lat, ref_lat = result["latency_s"], reference["latency_s"]
    per_gflop = (lat["median"] / result["gflops"]) / (ref_lat["median"] / reference["gflops"])
    bold = "**" if per_gflop > 1.3 else ""
    return [
        f"{result['gflops']:.0f}", f"{result['gflops'] / reference['gflops']:.2f}",
        f"{lat['median']:.2f} ({lat['min']:.2f}–{lat['max']:.2f})",
        f"{lat['median'] / ref_lat['median']:.2f}", f"{bold}{per_gflop:.2f}{bold}",
    ]  # fmt: skip


def detector_table(setting: str, results: Dict[str, dict], reference: str) -> Table:
    """Latency, FLOPs and their ratios to ``reference``'s, training throughput and memory."""
    table = Table(
        [
            "model", *LATENCY_COLUMNS, "train images/s, median (min–max)",
            "peak memory added, inference / training (MiB)",
        ],
        title=setting,
    )  # fmt: skip
    for name, r in results.items():
        thr = r["train_images_per_s"]
        table.rows.append([
            name, *latency_cells(r, results[reference]),
            f"{thr['median']:.2f} ({thr['min']:.2f}–{thr['max']:.2f})",
            f"{r['inference_mib']:.0f} / {r['train_mib']:.0f}",
        ])  # fmt: skip
    return table


@mode(
    "detectors",
    width=1333,
    warmup=1,
    worker=detector_memory_worker,
    doc=DOC,
    json_path=RESULTS,
    options=[
        option("--train-rounds", type=_at_least_one, default=2, help="timed training steps"),
        models_option(DETECTORS),
        option("--no-cuda", action="store_true", help="CPU only even with a GPU"),
    ],
)
def detectors(args: argparse.Namespace) -> Report:
    """Detectors end to end against Detectron2's R50-FPN and Swin-T Mask R-CNN.

    Per-image inference latency, training throughput and peak memory of each family's detector.
    Inference: eval mode, torch.no_grad, batch 1, one 800x1333 image through Detectron2's whole
    inference (preprocessing, RPN, NMS, heads, postprocessing). Score thresholds are 0, so every
    image gives the maximum 100 detections and the mask head runs on them (random weights would
    give none and skip it). Training: train mode, 2 images per batch with 5 synthetic instances
    each (boxes, classes, rectangle masks), forward + backward + SGD step, after 1 warm-up step.
    Models alternate within each round (round-robin); the tables give the median and the range
    (min-max) over the rounds. GFLOPs: fvcore convention of tools/model_zoo.py's protocol at the
    benchmark size. CPU peak memory: a worker process per model (peak RSS added by one
    inference, then by one training step, the peak reset in between; glibc returns freed
    blocks). CUDA: torch.cuda.max_memory_allocated, fp32 and AMP (float16 autocast). Writes
    docs/benchmark_results.json (read by tools/plot_model_zoo.py) and docs/benchmarks.md.
    """
    if DETECTOR_REFERENCE not in args.models:
        raise SystemExit(f"--models must include {DETECTOR_REFERENCE!r} (the ratios are to it)")
    args.models = [DETECTOR_REFERENCE] + [m for m in args.models if m != DETECTOR_REFERENCE]
    settings = {f"CPU, {args.threads} threads, fp32": ("cpu", False)}
    if torch.cuda.is_available() and not args.no_cuda:
        settings.update({"CUDA fp32": ("cuda", False), "CUDA AMP (float16)": ("cuda", True)})
    results = {}
    for setting, (device, amp) in settings.items():
        progress(f"{setting}:")
        results[setting] = measure_detectors(args, device, amp)
    return Report(
        settings=f"{args.height}x{args.width}, {args.warmup} warm-up + {args.rounds} inference "
        f"rounds, 1 + {args.train_rounds} training steps of 2 images",
        tables=[detector_table(s, r, DETECTOR_REFERENCE) for s, r in results.items()],
        results=results,
    )


# ---- segmentation: UperNet segmentors against R50 UperNet ------------------------------------

SEGMENTOR_REFERENCE = "R50 UperNet"
# The ADE20K config whose head (UperNet + auxiliary FCN, 150 classes) every segmentor shares.
UPERNET_CONFIG = "configs/ade20k/mixformer_b1_upernet_160k.yaml"
# name: (config, overrides). Each family's smallest UperNet paper row; DMF has no ADE20K row, so
# DMF-S gets the same UperNet over its bottom-up network; R50 is Detectron2's ResNet-50.
SEGMENTORS: Dict[str, Tuple[str, Tuple[Any, ...]]] = {
    SEGMENTOR_REFERENCE: (
        UPERNET_CONFIG,
        ("MODEL.BACKBONE.NAME", "build_resnet_backbone", "MODEL.RESNETS.DEPTH", 50,
         "MODEL.RESNETS.OUT_FEATURES", ["res2", "res3", "res4", "res5"]),
    ),  # fmt: skip
    "MixFormer-B1 UperNet": (UPERNET_CONFIG, ()),
    "DilateFormer-S UperNet": ("configs/ade20k/dilateformer_s_upernet_160k.yaml", ()),
    "DualFormer-S UperNet": ("configs/ade20k/dualformer_s_upernet_80k.yaml", ()),
    "DMF-S UperNet": (
        "configs/ade20k/dmformer_s_upernet_160k.yaml",
        ("MODEL.FPN.BOTTOM_UP", "build_dmf_backbone", "MODEL.DMF.VARIANT", "s"),
    ),
    "DMFormer-S UperNet": ("configs/ade20k/dmformer_s_upernet_160k.yaml", ()),
}


def segmentor_config(name: str, device: str) -> CfgNode:
    """The config of a benchmarked segmentor (``segmentation --help``), one-process norms."""
    path, overrides = SEGMENTORS[name]
    cfg = get_config(os.path.join(REPO_ROOT, path), [str(v) for v in overrides])
    cfg.MODEL.DEVICE = device
    cfg.MODEL.WEIGHTS = ""
    _without_sync_bn(cfg)
    return cfg


def measure_segmentors(args: argparse.Namespace, device: str, amp: bool) -> Dict[str, dict]:
    """Inference latency, parameters and GFLOPs of every segmentor on ``device``."""
    runners = {
        name: Runner(segmentor_config(name, device), args, amp, train=False) for name in args.models
    }
    infer = {name: runner.infer for name, runner in runners.items()}
    times = alternate(infer, args.warmup, args.rounds, synchronizer(device), "infer")
    return {
        name: {
            "config": SEGMENTORS[name][0],
            "params_m": sum(p.numel() for p in runner.model.parameters()) / 1e6,
            "latency_s": spread(times[name]),
            "gflops": runner.gflops(),
        }
        for name, runner in runners.items()
    }


def segmentor_table(setting: str, results: Dict[str, dict], reference: str) -> Table:
    """Size, latency, FLOPs and their ratios to ``reference``'s."""
    table = Table(["model", "config", "params (M)", *LATENCY_COLUMNS], title=setting)
    for name, r in results.items():
        overrides = SEGMENTORS[name][1]  # the first names the backbone builder
        config = f"`{os.path.basename(r['config'])}`" + (
            f" with {overrides[1]}" if overrides else ""
        )
        row = [name, config, f"{r['params_m']:.1f}", *latency_cells(r, results[reference])]
        table.rows.append(row)
    return table


@mode(
    "segmentation",
    height=512,
    width=512,
    warmup=1,
    options=[
        models_option(SEGMENTORS),
        option("--no-cuda", action="store_true", help="CPU only even with a GPU"),
    ],
)
def segmentation(args: argparse.Namespace) -> Report:
    """UperNet segmentors against Detectron2's ResNet-50 with the same UperNet head.

    Per-image inference latency of each family's UperNet segmentor: MixFormer-B1, DilateFormer-S,
    DualFormer-S and DMFormer-S as their smallest ADE20K paper configs build them
    (configs/ade20k/; UperNet of 512 channels with its auxiliary FCN head, 150 classes), DMF-S
    (no ADE20K row in its paper) with the DMFormer-S config's UperNet over its bottom-up network,
    and the reference: Detectron2's ResNet-50 (build_resnet_backbone, outputs res2-res5) under the
    MixFormer-B1 config's UperNet. Random weights; SyncBN becomes BatchNorm (one process).
    Inference: eval mode, torch.no_grad, batch 1, one 512x512 noise image through
    SemanticSegmentor's whole inference (normalisation, padding, backbone, decode head, resizing
    of the logits to the image); the auxiliary head does not run. Models alternate within each
    round (round-robin); the tables give the median and the range (min-max) over the rounds.
    GFLOPs: fvcore convention of tools/model_zoo.py's segmentation protocol (backbone + decode
    head) at the benchmark size; "× R50 latency per GFLOP" = (latency / GFLOPs) over R50's
    (bold above 1.3). CUDA (fp32 and AMP float16) runs too when a GPU is present.
    """
    if SEGMENTOR_REFERENCE not in args.models:
        raise SystemExit(f"--models must include {SEGMENTOR_REFERENCE!r} (the ratios are to it)")
    args.models = [SEGMENTOR_REFERENCE] + [m for m in args.models if m != SEGMENTOR_REFERENCE]
    settings = {f"CPU, {args.threads} threads, fp32": ("cpu", False)}
    if torch.cuda.is_available() and not args.no_cuda:
        settings.update({"CUDA fp32": ("cuda", False), "CUDA AMP (float16)": ("cuda", True)})
    results = {}
    for setting, (device, amp) in settings.items():
        progress(f"{setting}:")
        results[setting] = measure_segmentors(args, device, amp)
    return Report(
        settings=f"{args.height}x{args.width}, batch 1, {args.warmup} warm-up + {args.rounds} "
        "inference rounds",
        tables=[segmentor_table(s, r, SEGMENTOR_REFERENCE) for s, r in results.items()],
        results=results,
    )


# ---- backbones: alone, against ResNet-50 -----------------------------------------------------

BACKBONE_REFERENCE = "ResNet-50 (Detectron2)"


def resnet50() -> nn.Module:
    """Detectron2's ResNet-50: default config (FrozenBN, stem frozen), outputs res2-res5."""
    cfg = get_cfg()
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    return build_resnet_backbone(cfg, ShapeSpec(channels=3))


def dilateformer_s(stage3_attention: str) -> nn.Module:
    return D2DilateFormer("small", stage3_attention=stage3_attention, window_size=7)


def with_reference(
    build: Callable[[], nn.Module], module: str, swap: str
) -> Callable[[], nn.Module]:
    """``build`` whose network gets ``swap`` of tests/backbones/``module``.py applied (the
    official formulation of one operation, same weights)."""

    def build_swapped() -> nn.Module:
        path = os.path.join(REPO_ROOT, "tests", "backbones", f"{module}.py")
        spec = importlib.util.spec_from_file_location(module, path)
        reference = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(reference)
        backbone = build()
        getattr(reference, swap)(backbone.net)
        return backbone

    return build_swapped


BACKBONES: Dict[str, Callable[[], nn.Module]] = {
    "DilateFormer-S stage3=global": partial(dilateformer_s, "global"),
    "DilateFormer-S stage3=window": partial(dilateformer_s, "window"),
    "DilateFormer-S stage3=mixed": partial(dilateformer_s, "mixed"),
    "DilateFormer-S stage3=mixed, unfold MSDA": with_reference(
        partial(dilateformer_s, "mixed"), "dilateformer_reference", "use_unfold_attention"
    ),
    "DualFormer-S intra=pool": partial(D2DualFormer, "small", norm="FrozenBN", intra_mode="pool"),
    "DualFormer-S intra=token": partial(D2DualFormer, "small", norm="FrozenBN", intra_mode="token"),
    "DMF-XXS": partial(D2DynamicMobileFormer, "xxs", norm="FrozenBN"),
    "DMF-XS": partial(D2DynamicMobileFormer, "xs", norm="FrozenBN"),
    "DMF-S": partial(D2DynamicMobileFormer, "s", norm="FrozenBN"),
    "DMF-S, per-sample-loop dynamic conv": with_reference(
        partial(D2DynamicMobileFormer, "s", norm="FrozenBN"), "dmf_reference", "use_per_sample_loop"
    ),
    "DMFormer-S": partial(D2DMFormer, "s", branches="auto"),
    "DMFormer-S branches=separate": partial(D2DMFormer, "s", branches="separate"),
    BACKBONE_REFERENCE: resnet50,
}


def backbone_worker(args: argparse.Namespace) -> dict:
    """One backbone in this process: with ``--memory`` its peak memory over 1 warm-up + 1 run;
    else latency per image, parameters, GFLOPs (and on CUDA memory)."""
    torch.manual_seed(0)
    model = BACKBONES[args.worker]().eval().to(args.device)
    image = torch.randn(args.batch, 3, args.height, args.width, device=args.device)
    calls, sync = {args.worker: inference(model, image)}, synchronizer(args.device)
    warmup, rounds = (1, 1) if args.memory else (args.warmup, args.rounds)
    with peak_memory(args.device) as memory:
        times = alternate(calls, warmup, rounds, sync, "infer")[args.worker]
    result = {"base_mib": memory.base, "peak_mib": memory.peak}
    if args.memory:
        return result
    with torch.no_grad():
        analysis = flop_count_analysis(model, image).unsupported_ops_warnings(False)
        gflops = analysis.uncalled_modules_warnings(False).total() / 1e9 / args.batch
    return dict(
        result,
        params_m=sum(p.numel() for p in model.parameters()) / 1e6,
        gflops=gflops,
        ms=spread(times, 1e3 / args.batch),
    )


@mode(
    "backbones",
    width=1216,
    warmup=2,
    worker=backbone_worker,
    options=[
        option("--device", default="cpu", help="cpu or cuda"),
        option("--batch", type=int, default=1, help="images per forward"),
        models_option(BACKBONES),
    ],
)
def backbones(args: argparse.Namespace) -> Report:
    """Backbones alone against ResNet-50.

    Inference latency and peak memory of backbones at detection resolution. Models:
    DilateFormer-S with each stage-3 attention mode (window 7), DilateFormer-S "mixed" with its
    MSDA computed the official way (nn.Unfold; tests/backbones/dilateformer_reference.py),
    DMFormer-S with its default dilated branches ("auto": fused on CPU) and with three separate
    convs, DualFormer-S (FrozenBN, as ResNet-50) with each intra-partition mode, DMF-XXS/XS/S
    (FrozenBN; dynamic convs as one grouped convolution over the batch) and DMF-S with its dynamic
    convs run one sample at a time (tests/backbones/dmf_reference.py), and Detectron2's ResNet-50
    (build_resnet_backbone, default config with outputs res2-res5). --batch images (default 1)
    per forward, torch.no_grad, eval mode; the backbone alone, without FPN or heads. GFLOPs:
    fvcore with hybrid_d2's handles (hybrid_d2.layers.flop_count_analysis; one multiply-add = one
    FLOP), counted after the timed runs; "ms / GFLOP" is the median latency per GFLOP. (Tracing
    runs DMFormer's branches as the three convs the paper counts.)

    Every model runs in fresh worker processes, one after another. Latency: median (and min) wall
    time per image over the timed rounds, after the warm-up rounds, with the default allocator.
    Peak memory on CPU, in a second worker with glibc returning freed blocks: the resident set
    size after building the model and the input ("base") and its peak over one warm-up and one
    run ("peak"); their difference is what inference added (activations and workspaces). On
    CUDA: torch.cuda.max_memory_allocated over the runs, and its increase over the weights and
    input.
    """
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    memory = "CUDA max allocated" if cuda else "max RSS"
    table = Table([
        "model", "params (M)", "GFLOPs", "median ms (min)", f"x {BACKBONE_REFERENCE} (median)",
        "ms / GFLOP", f"x {BACKBONE_REFERENCE} (ms / GFLOP)",
        f"{memory}: base / peak / added (MiB)",
    ])  # fmt: skip
    reference = None
    # the reference first, so that every row can give its ratios
    for name in sorted(args.models, key=lambda name: name != BACKBONE_REFERENCE):
        r = run_worker(args, name, memory=False)
        if not cuda:
            r.update(run_worker(args, name, memory=True))
        reference = r if name == BACKBONE_REFERENCE else reference
        median, per_gflop = r["ms"]["median"], r["ms"]["median"] / r["gflops"]
        ratio, flop_ratio = "-", "-"
        if reference:
            ratio = f"{median / reference['ms']['median']:.2f}"
            flop_ratio = f"{per_gflop / (reference['ms']['median'] / reference['gflops']):.2f}"
        table.rows.append([
            name, f"{r['params_m']:.1f}", f"{r['gflops']:.1f}",
            f"{median:.0f} ({r['ms']['min']:.0f})", ratio, f"{per_gflop:.1f}", flop_ratio,
            f"{r['base_mib']:.0f} / {r['peak_mib']:.0f} / {r['peak_mib'] - r['base_mib']:.0f}",
        ])  # fmt: skip
    return Report(
        settings=f"{args.device}, {args.threads} threads, {args.batch}x3x{args.height}x"
        f"{args.width}, {args.warmup} warm-up + {args.rounds} timed runs",
        tables=[table],
    )


# ---- compile: eager against torch.compile ---------------------------------------------------

COMPILE_MODELS: Dict[str, Callable[[], nn.Module]] = {
    "MixFormer-B1": partial(D2MixFormer, "b1"),
    "DilateFormer-S mixed": partial(dilateformer_s, "mixed"),
    BACKBONE_REFERENCE: resnet50,
}
VARIANTS = ("eager", "compiled", "compiled, freezing")


def compiled(model: nn.Module, variant: str) -> nn.Module:
    """``model`` run the ``variant`` way; a copy per compiled variant, so that freezing's
    constants belong to one model."""
    if variant == "eager":
        return model
    options = {"freezing": True} if variant == "compiled, freezing" else None
    return torch.compile(copy.deepcopy(model), fullgraph=True, options=options)


def relative_difference(
    outputs: Dict[str, torch.Tensor], reference: Dict[str, torch.Tensor]
) -> float:
    """Largest absolute difference over the outputs, relative to the largest output."""
    return max(
        ((outputs[k] - reference[k]).abs().max() / reference[k].abs().max()).item()
        for k in reference
    )


@mode(
    "compile",
    width=1216,
    warmup=1,
    options=[
        models_option(COMPILE_MODELS),
        option("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS)),
    ],
)
def compile_mode(args: argparse.Namespace) -> Report:
    """Eager against torch.compile.

    Inference latency of backbones at detection resolution. Models: MixFormer-B1
    (D2MixFormer("b1"), the shipped configs' defaults), DilateFormer-S with stage-3 "mixed"
    attention (window 7, FrozenBN) and Detectron2's ResNet-50 (build_resnet_backbone, default
    config, outputs res2-res5); the backbone alone, batch 1, eval mode, torch.no_grad.

    Ways of running each (--variants):

    * eager: plain eager PyTorch;
    * compiled: torch.compile(model, fullgraph=True), Inductor's defaults;
    * compiled, freezing: the same with options={"freezing": True}: the weights become graph
      constants, so Inductor folds BatchNorms into convolutions and runs Linear/conv through
      oneDNN with their pointwise epilogues (bias, GELU) in the same kernel.

    Every (model, variant) pair is built in this one process, compiled at the benchmark size (the
    first call, reported as compile time, then --warmup more calls), and checked against eager
    (largest absolute difference over the outputs, relative to the largest output). Then --rounds
    rounds each run every pair once, in turn, so that a change in the machine's load reaches every
    pair alike; the table gives the median per image, the spread (min-max) and ratios to the same
    model's eager median and to compiled ResNet-50's median. Recompilation during the timed rounds
    is an error.
    """
    torch.manual_seed(0)
    image = torch.randn(1, 3, args.height, args.width)
    calls, compile_s, remarks = {}, {}, []
    for name in args.models:
        model = COMPILE_MODELS[name]().eval()
        eager = None
        for variant in args.variants:
            run = inference(compiled(model, variant), image)
            start = time.perf_counter()
            outputs = run()  # compiles a compiled variant
            first_s = time.perf_counter() - start
            for _ in range(args.warmup):
                run()
            if eager is None:
                eager = inference(model, image)()
            if variant != "eager":
                compile_s[f"{name}, {variant}"] = first_s
            remarks.append(
                f"{name}, {variant}: first call {first_s:.1f} s, largest difference from eager "
                f"{relative_difference(outputs, eager):.1e} (relative to the largest output)"
            )
            progress(remarks[-1])
            calls[f"{name}, {variant}"] = run
    with torch._dynamo.config.patch(error_on_recompile=True):
        times = alternate(calls, 0, args.rounds, label="infer")
    ms = {key: spread(t, 1e3) for key, t in times.items()}
    reference = ms.get(f"{BACKBONE_REFERENCE}, compiled")
    table = Table([
        "model", "variant", "median ms", "min-max ms", "x eager", "x compiled ResNet-50",
        "compile s",
    ])  # fmt: skip
    for name in args.models:
        eager = ms.get(f"{name}, eager")
        for variant in args.variants:
            key, median = f"{name}, {variant}", ms[f"{name}, {variant}"]["median"]
            table.rows.append([
                name, variant, f"{median:.0f}", f"{ms[key]['min']:.0f}-{ms[key]['max']:.0f}",
                f"{median / eager['median']:.2f}" if eager else "-",
                f"{median / reference['median']:.2f}" if reference else "-",
                f"{compile_s[key]:.0f}" if key in compile_s else "-",
            ])  # fmt: skip
    return Report(
        settings=f"CPU, {args.threads} threads, 1x3x{args.height}x{args.width}, "
        f"{args.warmup} warm-up call(s) after compiling, {args.rounds} rounds",
        tables=[table],
        remarks=remarks,
    )


# ---- dmformer-branches: DMFormer's dilated branches, separate or fused ------------------------

LAYOUTS = {"NCHW": torch.contiguous_format, "NHWC": torch.channels_last}


def train_call(module: nn.Module, inp: torch.Tensor) -> None:
    module(inp.requires_grad_()).sum().backward()


def branch_calls(
    channels: int, size: Tuple[int, int], batch: int, train: bool
) -> Dict[str, Callable[[], object]]:
    """``DilatedBranches`` separate and fused (same weights) on each layout of one input."""
    torch.manual_seed(0)
    separate = DilatedBranches(channels, (3, 5, 7), (1, 2, 3), "separate")
    fused = DilatedBranches(channels, (3, 5, 7), (1, 2, 3), "fused")
    fused.load_state_dict(separate.state_dict())
    x = torch.randn(batch, channels, *size)
    calls = {}
    for layout, memory_format in LAYOUTS.items():
        inp = x.contiguous(memory_format=memory_format)
        for name, module in (("separate", separate), ("fused", fused)):
            call = partial(train_call, module, inp) if train else inference(module, inp)
            calls[f"{name} {layout}"] = call
    return calls


def branch_rows(
    title: str, calls: Dict[str, Callable[[], object]], args: argparse.Namespace
) -> List[List[str]]:
    """Table rows of ``calls`` alternating: median and min-max in ms."""
    rows = []
    for name, times in alternate(calls, args.warmup, args.rounds, label=title).items():
        ms = spread(times, 1e3)
        rows.append([title, name, f"{ms['median']:.1f}", f"{ms['min']:.1f}-{ms['max']:.1f}"])
    return rows


@mode("dmformer-branches", width=1216, warmup=1)
def dmformer_branches(args: argparse.Namespace) -> Report:
    """DMFormer's dilated branches, separate or fused.

    DMFormer's three dilated depth-wise branches: separate convs against one fused 19x19 conv.
    For the DMA input of the first block of each stage (r * C channels at stride 4 ... 32 of one
    image), times DilatedBranches in each form and memory format, in inference (no_grad) and in
    training (forward + backward, batch 2 at a quarter of the image area), and the whole
    DMFormer-S backbone in inference with branches="auto" against "separate". The variants of one
    measurement run alternately in one process, one call each per round, after the warm-up
    rounds; the table gives the median over the rounds and the spread (min-max) in ms.
    """
    table = Table(["measurement", "variant", "median ms", "min-max ms"])
    for stage, dim in enumerate(DIMS):
        stride = 2 ** (stage + 2)
        size = (-(-args.height // stride), -(-args.width // stride))
        title = f"inference, stage {stage + 1} ({DMA_RATIO * dim}x{size[0]}x{size[1]})"
        table.rows += branch_rows(title, branch_calls(DMA_RATIO * dim, size, 1, False), args)
    for stage in (0, 2):
        stride = 2 ** (stage + 3)  # a quarter of the area: batch 2 of half-size images
        size = (-(-args.height // stride), -(-args.width // stride))
        channels = DMA_RATIO * DIMS[stage]
        title = f"training, stage {stage + 1} (2x{channels}x{size[0]}x{size[1]})"
        table.rows += branch_rows(title, branch_calls(channels, size, 2, True), args)
    torch.manual_seed(0)
    models = {b: D2DMFormer("s", branches=b).eval() for b in ("auto", "separate")}
    models["separate"].load_state_dict(models["auto"].state_dict())
    image = torch.randn(1, 3, args.height, args.width)
    calls = {f"DMFormer-S branches={m}": inference(model, image) for m, model in models.items()}
    table.rows += branch_rows("inference, whole backbone", calls, args)
    return Report(
        settings=f"{args.threads} threads, image {args.height}x{args.width}, {args.warmup} "
        f"warm-up + {args.rounds} rounds",
        tables=[table],
    )


# ---- the command line -----------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    subparsers = parser.add_subparsers(dest="mode", required=True, metavar="MODE")
    for name, spec in MODES.items():
        add_mode_parser(subparsers, name, spec)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    spec = MODES[args.mode]
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    if spec.worker and args.worker:
        print(json.dumps(spec.worker(args)))
        return 0
    if args.doc != "-":
        check_markers(args.doc, args.mode)  # before a long run, not after it
    write_report(spec.run(args), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
