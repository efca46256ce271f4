"""Mode ``detectors``: each family's detector end to end against Detectron2's R50-FPN and Swin-T
Mask R-CNN."""

import argparse
import os
from typing import Callable, Dict, List, Optional

from .detectron import (
    DETECTOR_REFERENCE,
    DETECTORS,
    LATENCY_COLUMNS,
    SWIN_T,
    Runner,
    cost_per_gflop,
    detector_config,
    device_settings,
    latency_cells,
    reference_first,
)
from .memory import release_memory, run_worker, status_mib
from .paths import DOC, RESULTS
from .registry import at_least_one, mode, models_option, option
from .report import Report, Table, write_report
from .timing import alternate, progress, spread, synchronizer

# called with the stage that ended, after every stage (writes the partial report)
StageEnded = Callable[[str], None]


def paper_row_key(name: str) -> str:
    """The key of ``name``'s row in tools/model_zoo_data.py (PAPER_ROWS or REFERENCE_ROWS)."""
    if DETECTORS[name] is None:
        return "ResNet-50" if name == DETECTOR_REFERENCE else "Swin-T"
    return os.path.splitext(os.path.basename(DETECTORS[name]))[0]


def detector_memory_worker(args: argparse.Namespace) -> dict:
    """CPU memory of the detector ``--worker NAME`` (:meth:`Runner.memory`)."""
    return Runner(detector_config(args.worker, "cpu"), args, amp=False).memory()


def time_detectors(
    args: argparse.Namespace, device: str, amp: bool, results: Dict[str, dict], stage: StageEnded
) -> Dict[str, Runner]:
    """The models on ``device``, their GFLOPs, then their latency and training throughput
    (alternating rounds) into ``results``; ``stage`` is called after each timing stage."""
    runners = {name: Runner(detector_config(name, device), args, amp) for name in args.models}
    for name, runner in runners.items():
        results[name] = {"paper_row": paper_row_key(name), "gflops": runner.gflops()}
    sync = synchronizer(device)
    infer = {name: runner.infer for name, runner in runners.items()}
    for name, times in alternate(infer, args.warmup, args.rounds, sync, "infer").items():
        results[name]["latency_s"] = spread(times)
    stage(f"the inference rounds on {device}")
    train = {name: runner.train_step for name, runner in runners.items()}
    for name, times in alternate(train, 1, args.train_rounds, sync, "train_step").items():
        results[name]["train_step_s"] = spread(times)
        results[name]["train_images_per_s"] = spread([2 / t for t in times])
    stage(f"the training steps on {device}")
    return runners


def measure_detectors(
    args: argparse.Namespace, device: str, amp: bool, results: Dict[str, dict], stage: StageEnded
) -> None:
    """GFLOPs, latency, training throughput and memory of every detector on ``device`` into
    ``results``, stage by stage (``stage`` is called after each). On CPU the models are released
    before the memory workers run, so that this process does not hold them (weights, optimizer
    state) while a worker trains another."""
    runners = time_detectors(args, device, amp, results, stage)
    if device.startswith("cuda"):
        for name, runner in runners.items():
            results[name].update(runner.memory())
    else:
        del runners  # the only reference left
        progress(f"  released the models: {release_memory():.0f} MiB resident")
        for name in results:
            results[name].update(run_worker(args, name, memory=True))
    stage(f"the memory measurements on {device}")


def tables(setting: str, results: Dict[str, dict]) -> List[Table]:
    """The tables of one device setting: against R50, and against Swin-T when it ran."""
    against_swin = cost_table(setting, results)
    return [detector_table(setting, results, DETECTOR_REFERENCE)] + (
        [against_swin] if against_swin else []
    )


def detector_table(setting: str, results: Dict[str, dict], reference: str) -> Table:
    """Latency, FLOPs and their ratios to ``reference``'s, training throughput and memory ("-"
    where a partial run has not measured it yet)."""
    table = Table(
        [
            "model", *LATENCY_COLUMNS, "train images/s, median (min–max)",
            "peak memory added, inference / training (MiB)",
        ],
        title=setting,
    )  # fmt: skip
    for name, r in results.items():
        if "latency_s" in r:
            cells = latency_cells(r, results[reference])
        else:
            cells = [f"{r['gflops']:.0f}"] + ["-"] * (len(LATENCY_COLUMNS) - 1)
        thr = r.get("train_images_per_s")
        throughput = f"{thr['median']:.2f} ({thr['min']:.2f}–{thr['max']:.2f})" if thr else "-"
        memory = f"{r['inference_mib']:.0f} / {r['train_mib']:.0f}" if "train_mib" in r else "-"
        table.rows.append([name, *cells, throughput, memory])
    return table


@mode(
    "detectors",
    width=1333,
    warmup=1,
    worker=detector_memory_worker,
    doc=DOC,
    json_path=RESULTS,
    options=[
        option("--train-rounds", type=at_least_one, default=2, help="timed training steps"),
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
    blocks), run after this process has released its models. CUDA: torch.cuda.max_memory_allocated,
    fp32 and AMP (float16 autocast). Writes docs/benchmark_results.json (read by
    tools/plot_model_zoo.py) and docs/benchmarks.md, partially after every stage (GFLOPs and
    inference, training, memory) so that a run stopped later leaves what it measured.
    """
    args.models = reference_first(args.models, DETECTOR_REFERENCE)
    settings = device_settings(args)
    results: Dict[str, Dict[str, dict]] = {}

    def report() -> Report:
        return Report(
            settings=f"{args.height}x{args.width}, {args.warmup} warm-up + {args.rounds} "
            f"inference rounds, 1 + {args.train_rounds} training steps of 2 images",
            tables=[table for setting, r in results.items() for table in tables(setting, r)],
            results=results,
        )

    def stage_ended(stage: str) -> None:
        progress(f"  {stage} ended; this process: {status_mib('VmHWM'):.0f} MiB peak resident")
        write_report(report(), args, partial=stage)

    for setting, (device, amp) in settings.items():
        progress(f"{setting}:")
        results[setting] = {}
        measure_detectors(args, device, amp, results[setting], stage_ended)
    return report()


def cost_table(setting: str, results: Dict[str, dict], reference: str = SWIN_T) -> Optional[Table]:
    """Each detector's inference latency and training step per GFLOP and its training memory
    added, as multiples of ``reference``'s (bold above 1; "-" where not measured yet); None
    when ``reference`` is not in the run."""
    if reference not in results:
        return None
    ref = results[reference]
    table = Table(
        [
            "model", "GFLOPs", "inference s, median (min–max)", "× Swin-T inference per GFLOP",
            "training step s, median (min–max)", "× Swin-T training per GFLOP",
            "training memory added (MiB)", "× Swin-T training memory",
        ],
        title=f"{setting}: cost against {reference}",
    )  # fmt: skip
    for name, r in results.items():
        cells = [name, f"{r['gflops']:.0f}"]
        for key in ("latency_s", "train_step_s"):
            cells += _per_gflop_cells(r, ref, key)
        if "train_mib" in r:
            cells += [f"{r['train_mib']:.0f}", _ratio(r["train_mib"] / ref["train_mib"])]
        else:
            cells += ["-", "-"]
        table.rows.append(cells)
    return table


def _per_gflop_cells(result: dict, reference: dict, key: str) -> List[str]:
    """``key``'s median (range) and its time per GFLOP over ``reference``'s."""
    if key not in result or key not in reference:
        return ["-", "-"]
    t = result[key]
    ratio = cost_per_gflop(result, reference, key)
    return [f"{t['median']:.2f} ({t['min']:.2f}–{t['max']:.2f})", _ratio(ratio)]


def _ratio(value: float) -> str:
    return f"**{value:.2f}**" if value > 1.0 else f"{value:.2f}"
