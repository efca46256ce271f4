#!/usr/bin/env python
"""End-to-end detector benchmark (not a test): per-image inference latency, training throughput
and peak memory of each family's detector next to Detectron2's R50-FPN and Swin-T Mask R-CNN.

    PYTHONPATH=. python tools/benchmark.py                       # CPU 2 threads (+ CUDA if present)
    PYTHONPATH=. python tools/benchmark.py --rounds 1 --train-rounds 1 --height 320 --width 512

Inference: eval mode, ``torch.no_grad``, batch 1, one 800x1333 image through Detectron2's whole
inference (preprocessing, RPN, NMS, heads, postprocessing). Score thresholds are 0, so every
image gives the maximum 100 detections and the mask head runs on them (random weights would give
none and skip it). Training: train mode, 2 images per batch with 5 synthetic instances each
(boxes, classes, rectangle masks), forward + backward + SGD step. Models alternate within each
round (round-robin), so that drift of the machine hits all alike; the tables give the median and
the range (min-max) over the rounds. GFLOPs: fvcore convention of tools/model_zoo.py's protocol
at the benchmark size. CPU peak memory: a subprocess per model (peak RSS added by one inference, then
by one training step, the peak reset in between; glibc returns freed blocks, as in
tools/benchmark_backbones.py). CUDA:
``torch.cuda.max_memory_allocated``, fp32 and AMP (float16 autocast).
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
from detectron2 import model_zoo as d2_model_zoo
from detectron2.config import CfgNode, get_cfg
from detectron2.modeling import BACKBONE_REGISTRY, build_model
from detectron2.modeling.backbone import FPN
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.backbone.swin import SwinTransformer
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage
from torch import nn

from hybrid_d2 import get_config
from hybrid_d2.layers import flop_totals
from hybrid_d2.utils import atomic_output

TOOLS = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TOOLS)
sys.path.insert(0, TOOLS)
from model_zoo import DummyForward, padded  # noqa: E402

REFERENCE = "R50 Mask R-CNN"
D2_R50 = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"
# name: hybrid_d2 config, or None for the Detectron2 references built below
MODELS: Dict[str, Optional[str]] = {
    REFERENCE: None,
    "Swin-T Mask R-CNN": None,
    "MixFormer-B4 Mask R-CNN": "configs/mixformer_b4_mask_rcnn_1x.yaml",
    "DilateFormer-S Mask R-CNN": "configs/dilateformer_s_mask_rcnn_1x.yaml",
    "DualFormer-S Mask R-CNN": "configs/dualformer_s_mask_rcnn_1x.yaml",
    "DMF-S RetinaNet": "configs/dmf_s_retinanet_1x.yaml",
    "DMFormer-S Mask R-CNN": "configs/dmformer_s_mask_rcnn_1x.yaml",
}
RESULTS = os.path.join(REPO_ROOT, "docs", "benchmark_results.json")
DOC = os.path.join(REPO_ROOT, "docs", "benchmarks.md")
BEGIN, END = "<!-- benchmark.py: begin -->", "<!-- benchmark.py: end -->"


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


def model_config(name: str, device: str) -> CfgNode:
    """The config of a benchmarked model with score thresholds 0 (module docstring)."""
    path = MODELS[name]
    if path is None:
        cfg = get_cfg()
        cfg.merge_from_file(d2_model_zoo.get_config_file(D2_R50))
        if name != REFERENCE:
            cfg.MODEL.BACKBONE.NAME = "build_swin_t_fpn_backbone"
            cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD = [123.675, 116.28, 103.53], [
                58.395,
                57.12,
                57.375,
            ]
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
    """One model with its inputs; ``infer`` and ``train_step`` return the seconds they took."""

    def __init__(self, name: str, args: argparse.Namespace, device: str, amp: bool):
        torch.manual_seed(0)
        self.model = build_model(model_config(name, device))
        self.device, self.amp = device, amp
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-5, momentum=0.9)
        self.image = synthetic_batch(1, args.height, args.width, device, train=False)
        self.train_batch = synthetic_batch(2, args.height, args.width, device, train=True)

    def _timed(self, step: Callable[[], None]) -> float:
        cuda = self.device.startswith("cuda")
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(self.device.split(":")[0], dtype=torch.float16, enabled=self.amp):
            step()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def infer(self) -> float:
        self.model.eval()
        with torch.no_grad():
            return self._timed(lambda: self.model(self.image))

    def train_step(self) -> float:
        def step() -> None:
            with EventStorage():
                losses = self.model(self.train_batch)
            self.optimizer.zero_grad()
            sum(losses.values()).backward()
            self.optimizer.step()

        self.model.train()
        return self._timed(step)

    def gflops(self, height: int, width: int) -> float:
        self.model.eval()
        with torch.no_grad():
            image = torch.zeros(1, 3, *padded((height, width)), device=self.device)
            return flop_totals(DummyForward(self.model, (height, width)), image)["fvcore"] / 1e9


def round_robin(
    runners: Dict[str, Runner], method: str, warmup: int, rounds: int
) -> Dict[str, List[float]]:
    """Seconds per call of ``method`` for each runner, the runners alternating in each round."""
    for runner in runners.values():
        for _ in range(warmup):
            getattr(runner, method)()
    times = {name: [] for name in runners}
    for r in range(rounds):
        for name, runner in runners.items():
            times[name].append(getattr(runner, method)())
            print(
                f"  {method} round {r + 1}/{rounds}: {name} {times[name][-1]:.2f} s",
                file=sys.stderr,
                flush=True,
            )
    return times


def memory_worker(name: str, args: argparse.Namespace) -> Dict[str, float]:
    """CPU max RSS of one model in a fresh process: base, after one inference, after one training step."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MALLOC_MMAP_THRESHOLD_=str(64 * 1024))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, env.get("PYTHONPATH")]))
    command = [
        sys.executable,
        __file__,
        "--memory-worker",
        name,
        "--threads",
        str(args.threads),
        "--height",
        str(args.height),
        "--width",
        str(args.width),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{name}: memory worker failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _rss_mib(field: str) -> float:
    """VmRSS (current) or VmHWM (peak since the last reset) of this process, Linux."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def _peak_added_mib(step: Callable[[], float]) -> float:
    """Peak RSS during ``step`` over the RSS before it: writing 5 to /proc/self/clear_refs resets
    the peak (VmHWM) to the current RSS, so that building the model does not mask it."""
    base = _rss_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    step()
    return _rss_mib("VmHWM") - base


def run_memory_worker(name: str, args: argparse.Namespace) -> Dict[str, float]:
    runner = Runner(name, args, "cpu", amp=False)
    return {
        "base_mib": _rss_mib("VmRSS"),
        "inference_mib": _peak_added_mib(runner.infer),
        "train_mib": _peak_added_mib(runner.train_step),
    }


def summary(times: List[float]) -> Dict[str, float]:
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def benchmark(args: argparse.Namespace, device: str, amp: bool) -> Dict[str, dict]:
    """Latency, training throughput and memory of every model on ``device``."""
    runners = {name: Runner(name, args, device, amp) for name in args.models}
    results = {name: {} for name in runners}
    for name, times in round_robin(runners, "infer", args.warmup, args.rounds).items():
        results[name]["latency_s"] = summary(times)
    for name, times in round_robin(runners, "train_step", 1, args.train_rounds).items():
        results[name]["train_images_per_s"] = summary([2 / t for t in times])
    for name, runner in runners.items():
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            runner.infer()
            results[name]["inference_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
            torch.cuda.reset_peak_memory_stats()
            runner.train_step()
            results[name]["train_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            results[name].update(memory_worker(name, args))
        results[name]["gflops"] = runner.gflops(args.height, args.width)
        results[name]["paper_row"] = paper_row_key(name)
    return results


def paper_row_key(name: str) -> str:
    """The key of ``name``'s row in tools/model_zoo_data.py (PAPER_ROWS or REFERENCE_ROWS)."""
    if MODELS[name] is None:
        return "ResNet-50" if name == REFERENCE else "Swin-T"
    return os.path.splitext(os.path.basename(MODELS[name]))[0]


def render(run: dict) -> str:
    """Markdown tables of one benchmark run (every setting it measured)."""
    lines = [
        f"Command: `{run['command']}`  \nMachine: {run['machine']}  \nDate: {run['date']}  \n"
        f"Settings: {run['settings']}\n"
    ]
    if run["note"]:
        lines.append(f"\n**Note: {run['note']}**\n")
    for setting, results in run["results"].items():
        ref = results[REFERENCE]
        ref_per_gflop = ref["latency_s"]["median"] / ref["gflops"]
        lines += [
            f"\n**{setting}**\n",
            "| model | GFLOPs | × R50 FLOPs | latency s, median (min–max) | × R50 latency | "
            "× R50 latency per GFLOP | train images/s, median (min–max) | peak memory added, "
            "inference / training (MiB) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, r in results.items():
            lat, thr = r["latency_s"], r["train_images_per_s"]
            per_gflop = lat["median"] / r["gflops"] / ref_per_gflop
            lines.append(
                f"| {name} | {r['gflops']:.0f} | {r['gflops'] / ref['gflops']:.2f} | "
                f"{lat['median']:.2f} ({lat['min']:.2f}–{lat['max']:.2f}) | "
                f"{lat['median'] / ref['latency_s']['median']:.2f} | "
                f"{'**' if per_gflop > 1.3 else ''}{per_gflop:.2f}{'**' if per_gflop > 1.3 else ''} | "
                f"{thr['median']:.2f} ({thr['min']:.2f}–{thr['max']:.2f}) | "
                f"{r['inference_mib']:.0f} / {r['train_mib']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    text = f"{platform.node()}, {cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    if torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name()}"
    return text


def write_outputs(run: dict, json_path: str, doc_path: str) -> None:
    with atomic_output(json_path) as tmp:
        with open(tmp, "w") as f:
            json.dump(run, f, indent=1)
    with open(doc_path) as f:
        text = f.read()
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise SystemExit(f"benchmark: {doc_path} needs one '{BEGIN}' and one '{END}' line")
    head, rest = text.split(BEGIN)
    with atomic_output(doc_path) as tmp:
        with open(tmp, "w") as f:
            f.write(f"{head}{BEGIN}\n{render(run)}{END}{rest.split(END, 1)[1]}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch and OpenMP)")
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1333)
    parser.add_argument("--warmup", type=int, default=1, help="untimed inference runs per model")
    parser.add_argument("--rounds", type=int, default=5, help="timed inference rounds")
    parser.add_argument(
        "--train-rounds", type=int, default=2, help="timed training steps (after 1 warm-up)"
    )
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--no-cuda", action="store_true", help="CPU only even with a GPU")
    parser.add_argument("--json", default=RESULTS)
    parser.add_argument("--doc", default=DOC, help="markdown file to update, or - for stdout")
    parser.add_argument(
        "--note", default="", help="a remark on the run, shown in the doc and the plot"
    )
    parser.add_argument("--memory-worker", choices=list(MODELS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_worker:
        print(json.dumps(run_memory_worker(args.memory_worker, args)))
        return 0
    if REFERENCE not in args.models:
        parser.error(f"--models must include {REFERENCE!r} (the ratios are to it)")
    args.models = [REFERENCE] + [m for m in args.models if m != REFERENCE]
    settings = {f"CPU, {args.threads} threads, fp32": ("cpu", False)}
    if torch.cuda.is_available() and not args.no_cuda:
        settings.update({"CUDA fp32": ("cuda", False), "CUDA AMP (float16)": ("cuda", True)})
    run = {
        "command": "python tools/benchmark.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "settings": f"{args.height}x{args.width}, {args.warmup} warm-up + {args.rounds} inference "
        f"rounds, 1 + {args.train_rounds} training steps of 2 images",
        "note": args.note,
        "results": {},
    }
    for setting, (device, amp) in settings.items():
        print(f"{setting}:", file=sys.stderr, flush=True)
        run["results"][setting] = benchmark(args, device, amp)
    print(render(run))
    if args.doc != "-":
        write_outputs(run, args.json, args.doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
