#!/usr/bin/env python
"""Inference latency and peak memory of backbones at detection resolution (not a test).

    PYTHONPATH=. python tools/benchmark_backbones.py                     # CPU, 2 threads, 800x1216
    PYTHONPATH=. python tools/benchmark_backbones.py --device cuda       # GPU, when there is one

Models: DilateFormer-S with each stage-3 attention mode (window 7), DilateFormer-S "mixed" with
its MSDA computed the official way (nn.Unfold; tests/backbones/dilateformer_reference.py),
DMFormer-S with its default dilated branches ("auto": fused on CPU) and with three separate
convs, DualFormer-S (FrozenBN, as ResNet-50) with each intra-partition mode, DMF-XXS/XS/S (FrozenBN;
dynamic convs as one grouped convolution over the batch) and DMF-S with its dynamic convs run one
sample at a time (tests/backbones/dmf_reference.py), and Detectron2's ResNet-50
(``build_resnet_backbone``, default config with outputs res2-res5). ``--batch`` images (default 1)
per forward, ``torch.no_grad``, eval mode; the backbone alone, without FPN or heads. GFLOPs:
fvcore with hybrid_d2's handles (``hybrid_d2.layers.flop_count_analysis``; one multiply-add = one
FLOP), counted after the timed runs; "ms / GFLOP" is the median latency per GFLOP.
(Tracing runs DMFormer's branches as the three convs the paper counts.)

Every model runs in fresh subprocesses. Latency: median (and min) wall time per image over the
timed repeats, after warm-up runs, with the default allocator. Peak memory on CPU, in a second
subprocess: the process's maximum resident set size (``resource.getrusage(...).ru_maxrss``), once
after building the model and the input ("base") and once after one warm-up and one run ("peak");
their difference is what inference added (activations and workspaces). That worker runs with
``MALLOC_MMAP_THRESHOLD_=65536``, so that glibc returns every freed tensor to the system and the
high-water mark follows the live tensors; the page faults this costs would distort latency, hence
the separate run.
On CUDA: ``torch.cuda.max_memory_allocated`` after the runs, and its increase over the weights and
input.
"""

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from hybrid_d2.layers import flop_count_analysis

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "tests" / "backbones" / "dilateformer_reference.py"
DMF_REFERENCE = REPO / "tests" / "backbones" / "dmf_reference.py"


def _dilateformer(mode: str, unfold: bool = False) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from hybrid_d2.backbones import D2DilateFormer

        backbone = D2DilateFormer("small", stage3_attention=mode, window_size=7)
        if unfold:
            spec = importlib.util.spec_from_file_location("dilateformer_reference", REFERENCE)
            reference = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(reference)
            reference.use_unfold_attention(backbone.net)
        return backbone

    return build


def _dualformer(intra_mode: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from hybrid_d2.backbones import D2DualFormer

        return D2DualFormer("small", norm="FrozenBN", intra_mode=intra_mode)

    return build


def _dmf(variant: str, per_sample_loop: bool = False) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from hybrid_d2.backbones import D2DynamicMobileFormer

        backbone = D2DynamicMobileFormer(variant, norm="FrozenBN")
        if per_sample_loop:
            spec = importlib.util.spec_from_file_location("dmf_reference", DMF_REFERENCE)
            reference = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(reference)
            reference.use_per_sample_loop(backbone.net)
        return backbone

    return build


def _resnet50() -> nn.Module:
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone.resnet import build_resnet_backbone

    cfg = get_cfg()  # ResNet-50, FrozenBN, stem frozen; outputs as under an FPN
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    return build_resnet_backbone(cfg, ShapeSpec(channels=3))


def _dmformer(branches: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from hybrid_d2.backbones import D2DMFormer

        return D2DMFormer("s", branches=branches)

    return build


REFERENCE_MODEL = "ResNet-50 (Detectron2)"
MODELS: Dict[str, Callable[[], nn.Module]] = {
    "DilateFormer-S stage3=global": _dilateformer("global"),
    "DilateFormer-S stage3=window": _dilateformer("window"),
    "DilateFormer-S stage3=mixed": _dilateformer("mixed"),
    "DilateFormer-S stage3=mixed, unfold MSDA": _dilateformer("mixed", unfold=True),
    "DualFormer-S intra=pool": _dualformer("pool"),
    "DualFormer-S intra=token": _dualformer("token"),
    "DMF-XXS": _dmf("xxs"),
    "DMF-XS": _dmf("xs"),
    "DMF-S": _dmf("s"),
    "DMF-S, per-sample-loop dynamic conv": _dmf("s", per_sample_loop=True),
    "DMFormer-S": _dmformer("auto"),
    "DMFormer-S branches=separate": _dmformer("separate"),
    REFERENCE_MODEL: _resnet50,
}


def _max_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(
    name: str, device: str, batch: int, height: int, width: int, warmup: int, repeats: int
) -> dict:
    """Latency (per image) and memory of one model in this process."""
    torch.manual_seed(0)
    model = MODELS[name]().eval().to(device)
    image = torch.randn(batch, 3, height, width, device=device)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _max_rss_mib()
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            start = time.perf_counter()
            model(image)
            if cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                times.append((time.perf_counter() - start) / batch)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _max_rss_mib()
    with torch.no_grad():
        analysis = flop_count_analysis(model, image).unsupported_ops_warnings(False)
        gflops = analysis.uncalled_modules_warnings(False).total() / 1e9 / batch  # per image
    return {
        "model": name,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "gflops": gflops,
        "median_ms": statistics.median(times) * 1e3,
        "min_ms": min(times) * 1e3,
        "base_mib": base,
        "peak_mib": peak,
    }


def run_worker(name: str, args: argparse.Namespace, memory: bool) -> dict:
    """Measure one model in a fresh interpreter, so that peak memory is its own; ``memory``
    selects the allocator setting for peak memory (and a single timed run)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    if memory:
        # glibc then serves every block >= 64 KiB with mmap and unmaps it when freed, so the RSS
        # high-water mark follows the live tensors instead of what the heap kept after frees
        env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    warmup, repeats = (1, 1) if memory else (args.warmup, args.repeats)
    command = [
        sys.executable, __file__, "--worker", name, "--device", args.device,
        "--threads", str(args.threads), "--batch", str(args.batch),
        "--height", str(args.height), "--width", str(args.width),
        "--warmup", str(warmup), "--repeats", str(repeats),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{name}: benchmark worker failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure_model(name: str, args: argparse.Namespace) -> dict:
    """Latency from one worker and, on CPU, peak memory from another."""
    result = run_worker(name, args, memory=False)
    if not args.device.startswith("cuda"):
        memory = run_worker(name, args, memory=True)
        result.update(base_mib=memory["base_mib"], peak_mib=memory["peak_mib"])
    return result


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch and OpenMP)")
    parser.add_argument("--batch", type=int, default=1, help="images per forward")
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1216)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--worker", choices=sorted(MODELS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    torch.set_num_threads(args.threads)

    if args.worker:
        print(
            json.dumps(
                measure(
                    args.worker,
                    args.device,
                    args.batch,
                    args.height,
                    args.width,
                    args.warmup,
                    args.repeats,
                )
            )
        )
        return 0

    memory = "CUDA max allocated" if args.device.startswith("cuda") else "max RSS"
    print(
        f"{args.device}, {args.threads} threads, {args.batch}x3x{args.height}x{args.width}, "
        f"{args.warmup} warm-up + {args.repeats} timed runs, torch {torch.__version__}\n"
    )
    print(
        f"| model | params (M) | GFLOPs | median ms (min) | x {REFERENCE_MODEL} (median) "
        f"| ms / GFLOP | x {REFERENCE_MODEL} (ms / GFLOP) | {memory}: base / peak / added (MiB) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    # the reference first, so that every row can give its ratios
    names = sorted(args.models, key=lambda name: name != REFERENCE_MODEL)
    reference = None
    for name in names:
        r = measure_model(name, args)
        reference = r if name == REFERENCE_MODEL else reference
        per_gflop = r["median_ms"] / r["gflops"]
        ratio, flop_ratio = "-", "-"
        if reference:
            ratio = f"{r['median_ms'] / reference['median_ms']:.2f}"
            flop_ratio = f"{per_gflop / (reference['median_ms'] / reference['gflops']):.2f}"
        print(
            f"| {r['model']} | {r['params_m']:.1f} | {r['gflops']:.1f} | "
            f"{r['median_ms']:.0f} ({r['min_ms']:.0f}) | {ratio} | {per_gflop:.1f} | "
            f"{flop_ratio} | "
            f"{r['base_mib']:.0f} / {r['peak_mib']:.0f} / {r['peak_mib'] - r['base_mib']:.0f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
