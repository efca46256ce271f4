"""The modes of tools/benchmark.py and the pieces they share.

Shared pieces, one module each:

* ``timing``: one timing loop, :func:`~.timing.alternate`: untimed warm-up rounds, then timed
  rounds; in every round each measured call runs once, in turn (round-robin), so that drift of
  the machine reaches all alike. Reports give the median and the range (min-max) over the rounds;
* ``memory``: one memory measurement, :func:`~.memory.peak_memory`: on CPU the peak resident
  set size (VmHWM, reset through ``/proc/self/clear_refs``) over the RSS before, on CUDA
  ``max_memory_allocated`` over the allocated memory before; on CPU in a fresh interpreter,
  :func:`~.memory.run_worker` (the command line plus ``--worker NAME``), with
  ``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc returns freed blocks and the peak follows the
  live tensors. Before its workers run, a mode drops its models and calls
  :func:`~.memory.release_memory` (garbage collection, glibc's ``malloc_trim``), so that the
  parent does not hold them while a worker trains another;
* ``report``: one report writer, :func:`~.report.write_report`: a header (command, machine,
  date, settings, note) and markdown tables, printed, and with ``--doc FILE`` written between the
  lines ``<!-- benchmark.py MODE: begin -->`` and ``<!-- benchmark.py MODE: end -->`` of FILE
  (tools/doc_markers.py, shared with tools/model_zoo.py), and for a mode registered with
  ``json_path=`` as JSON to ``--json``. A mode with long stages writes a partial report after
  each (``partial=``), so that a run stopped later leaves what it measured;
* ``registry``: :func:`~.registry.mode` registers a mode; the shared options ``--threads``
  (torch's and OpenMP's threads, also for Inductor's kernels), ``--height``/``--width``,
  ``--warmup``, ``--rounds``, ``--doc`` and ``--note``;
* ``detectron``: the Detectron2 models: the benchmarked detectors' configs (with Detectron2's
  Swin-T under an FPN), their backbones alone, :class:`~.detectron.Runner` (inference, a
  training step on synthetic instances, GFLOPs, memory) and the latency cells of their tables.

Modes, one module each: ``detectors``, ``segmentation``, ``backbones``, ``compile_mode``
(``compile``), ``dmformer_branches`` (``dmformer-branches``) and ``profiling`` (``profile``).

Adding a mode: a module with one function that measures with the pieces above and returns a
:class:`~.report.Report`, registered with :func:`~.registry.mode` (:class:`~.registry.Mode`'s
fields: default size, warm-up and rounds, own options, ``doc=`` and ``json_path=`` for default
outputs, ``worker=`` for what ``--worker NAME`` measures in a fresh process), and its import in
``cli.py``. Its docstring is the mode's ``--help``, its first line the summary. For example, the
segmentation mode, abridged:

    @mode("segmentation", height=512, width=512, warmup=1, options=[models_option(SEGMENTORS)])
    def segmentation(args: argparse.Namespace) -> Report:
        '''UperNet segmentors against Detectron2's ResNet-50 with the same UperNet head.

        What it measures, how (shown by ``segmentation --help``).'''
        runners = {name: Runner(segmentor_config(name, "cpu"), args, False, train=False) ...}
        times = alternate({name: r.infer for name, r in runners.items()}, args.warmup, ...)
        return Report(settings=f"{args.height}x{args.width}, ...", tables=[Table(columns, rows)])
"""

from . import paths  # noqa: F401  (puts tools/ on sys.path for model_zoo and doc_markers)
from .cli import main
from .report import markers

__all__ = ["main", "markers"]
