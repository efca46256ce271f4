"""Mode ``profile``: where a training step's and an inference's time and memory go, by operator
and by the network module they belong to (torch.profiler)."""

import argparse
from collections import defaultdict
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import nn
from torch.autograd import DeviceType
from torch.autograd.profiler import record_function

from . import backbones as backbone_mode
from . import operator_classes as classes
from .detectron import DETECTORS, SWIN_T, Runner, detector_backbone, detector_config
from .registry import mode, models_option, option
from .report import Report, Table
from .timing import progress

SCOPE = "module::"  # the record_function ranges opened around module forwards
BACKWARD = "autograd::engine::evaluate_function: "  # the autograd engine's range per node
OUTSIDE = "(outside modules)"
ACCUMULATE = "(gradient accumulation)"  # autograd adding gradients into the parameters' .grad
DEFAULT_SIZE = {"backbone": (512, 768), "detector": (800, 1333)}


def module_groups(root: nn.Module, depth: int) -> Dict[nn.Module, str]:
    """The group of every module under ``root``: within a repeated block (the deepest module
    whose name ends with an index and whose class is not one of torch.nn's) the block's class and
    the child it is in, e.g. ``MixFormerBlock.attn``; elsewhere the first ``depth`` parts of
    its name with indices as ``*``, e.g. ``backbone.bottom_up.patch_embed``."""
    modules = dict(root.named_modules())
    groups = {}
    for name, module in modules.items():
        parts = name.split(".") if name else []
        group = ".".join("*" if p.isdigit() else p for p in parts[:depth]) or type(root).__name__
        for i in range(len(parts) - 1, -1, -1):
            block = modules[".".join(parts[: i + 1])]
            if parts[i].isdigit() and not type(block).__module__.startswith("torch.nn"):
                group = type(block).__name__ + (f".{parts[i + 1]}" if i + 1 < len(parts) else "")
                break
        groups.setdefault(module, group)
    return groups


class ModuleScopes:
    """Forward hooks that open a ``record_function`` range named after each module's group
    (:func:`module_groups`) for the duration of its forward; :meth:`remove` takes them off."""

    def __init__(self, root: nn.Module, depth: int):
        self.open: List[record_function] = []
        self.handles = []
        for module, group in module_groups(root, depth).items():
            self.handles.append(module.register_forward_pre_hook(partial(self._enter, group)))
            self.handles.append(module.register_forward_hook(self._exit))

    def _enter(self, group: str, module: nn.Module, inputs: tuple) -> None:
        scope = record_function(SCOPE + group)
        scope.__enter__()
        self.open.append(scope)

    def _exit(self, module: nn.Module, inputs: tuple, outputs: object) -> None:
        self.open.pop().__exit__(None, None, None)

    def remove(self) -> None:
        """Take the hooks off."""
        for handle in self.handles:
            handle.remove()


def is_scope(event: object) -> bool:
    """Whether ``event`` is a range that groups operators (module, autograd node, optimizer)."""
    return event.name.startswith((SCOPE, BACKWARD, "Optimizer."))


def event_groups(events: Sequence) -> List[Tuple[str, bool, object]]:
    """(group, called, event) for every profiled CPU event but the memory records (a device
    event counts in the CPU operator that launched it): a forward event belongs to the innermost
    module range around it; a backward event (under the autograd
    engine's range of a node) to the module whose forward op made that node (matched by the
    autograd sequence number), with " backward" added, or where the node accumulates a
    parameter's gradient to "(gradient accumulation)"; an optimizer step's to "optimizer".
    ``called``: the event is an operator called from module code (or the autograd node's
    function), not one that another operator called."""
    forward_group: Dict[int, str] = {}
    placed = []
    for event in sorted(events, key=lambda event: event.time_range.start):
        if event.name == "[memory]" or event.device_type != DeviceType.CPU:
            continue  # frees outside operators; kernels (counted in the operators that launched them)
        kind, group, node = "forward", OUTSIDE, None
        scope = event
        while scope is not None:
            if scope.name.startswith(SCOPE):
                group = scope.name[len(SCOPE) :]
                break
            if scope.name.startswith(BACKWARD):
                kind, node = "backward", scope.sequence_nr
                if scope.name.endswith("AccumulateGrad"):  # a leaf's node: no forward operator
                    kind, group = "gradients", ACCUMULATE
                break
            if scope.name.startswith("Optimizer."):
                kind, group = "optimizer", "optimizer"
                break
            scope = scope.cpu_parent
        if kind == "forward" and event.sequence_nr >= 0:
            # Every operator records the thread's next node number; the counter moves on when
            # an operator makes a node, so the last to record a number is the one that made it.
            forward_group[event.sequence_nr] = group
        parent = event.cpu_parent
        called = not is_scope(event) and (parent is None or is_scope(parent))
        placed.append((kind, group, node, called, event))
    result = []
    for kind, group, node, called, event in placed:
        if kind == "backward":
            group = forward_group.get(node, OUTSIDE) + " backward"
        result.append((group, called, event))
    return result


Key = Tuple[str, str, str]  # operator, group, input shapes


@dataclass
class Totals:
    """Self CPU time (us), device time (us), allocated self CPU memory (bytes), calls and
    floating-point operations (:func:`operator_classes.operator_flops`)."""

    cpu_us: float = 0.0
    device_us: float = 0.0
    memory_bytes: float = 0.0
    calls: int = 0
    flops: float = 0.0

    def add(self, event: object, inclusive_memory: bool = False) -> None:
        """Count ``event``'s self figures in; memory: what it allocated itself, or with
        ``inclusive_memory`` what it and the operators it called left allocated."""
        self.cpu_us += event.self_cpu_time_total
        self.device_us += getattr(event, "self_device_time_total", 0.0)
        if inclusive_memory:
            self.memory_bytes += event.cpu_memory_usage
        else:
            self.memory_bytes += max(event.self_cpu_memory_usage, 0)
        self.calls += 1


@dataclass
class Profile:
    """One profiled phase: totals per group, per (operator, group, input shapes) and per the
    same of the operators called from module code, with the memory they left allocated; per
    operator class (self time and FLOPs) and per FLOP-counted operator (``computing``: time with
    the operators it called, the time its FLOPs took)."""

    groups: Dict[str, Totals] = field(default_factory=lambda: defaultdict(Totals))
    operators: Dict[Key, Totals] = field(default_factory=lambda: defaultdict(Totals))
    called: Dict[Key, Totals] = field(default_factory=lambda: defaultdict(Totals))
    classes: Dict[str, Totals] = field(default_factory=lambda: defaultdict(Totals))
    computing: Dict[Key, Totals] = field(default_factory=lambda: defaultdict(Totals))

    @property
    def cpu_us(self) -> float:
        """All self CPU time."""
        return sum(t.cpu_us for t in self.groups.values())

    def class_totals(self, kinds: Sequence[str]) -> Totals:
        """Self CPU time and FLOPs of the operator classes ``kinds`` together."""
        total = Totals()
        for kind in kinds:
            if kind in self.classes:
                total.cpu_us += self.classes[kind].cpu_us
                total.flops += self.classes[kind].flops
        return total


def event_class(event: object) -> str:
    """The operator class of a profiled event: an ATen operator's own
    (:func:`operator_classes.operator_class`; a copy is a copy wherever it runs), else that of
    the nearest ATen operator above it that has one (a wrapper's children: a convolution's
    buffers, a linear layer's transposed view), else element-wise; every other range (module
    code, autograd nodes, the optimizer) is outside operators."""
    if not event.name.startswith("aten::"):
        return classes.OUTSIDE_OPERATORS
    while event is not None and event.name.startswith("aten::"):
        found = classes.operator_class(event.name, event.input_shapes, event.concrete_inputs)
        if found:
            return found
        event = event.cpu_parent
    return classes.ELEMENTWISE


def profile_calls(call: Callable[[], object], calls: int, device: str) -> Profile:
    """``calls`` calls of ``call`` under torch.profiler (CPU, and CUDA on a CUDA ``device``;
    shapes and memory recorded), summed by group and by operator."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(
        activities=activities, record_shapes=True, profile_memory=True
    ) as prof:
        for _ in range(calls):
            call()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
    profile = Profile()
    for group, called, event in event_groups(prof.events()):
        profile.groups[group].add(event)
        flops = classes.operator_flops(event.name, event.input_shapes, event.concrete_inputs)
        kind = profile.classes[event_class(event)]
        kind.add(event)
        kind.flops += flops
        if not event.name.startswith(SCOPE):  # a range's own time is its module's Python code
            key = (event.name, group, str(event.input_shapes))
            profile.operators[key].add(event)
            if called:
                profile.called[key].add(event, inclusive_memory=True)
            if flops:
                computing = profile.computing[key]
                computing.cpu_us += event.cpu_time_total
                computing.calls += 1
                computing.flops += flops
    return profile


def ms(us: float) -> str:
    """Microseconds as milliseconds, 1 decimal."""
    return f"{us / 1e3:.1f}"


def share(part: float, whole: float) -> str:
    """``part`` of ``whole`` in percent, 1 decimal."""
    return f"{100 * part / whole:.1f}%" if whole else "-"


def mib(count: float) -> str:
    """Bytes as MiB, 1 decimal."""
    return f"{count / 2**20:.1f}"


def group_table(title: str, profile: Profile, limit: int, device: bool) -> Table:
    """The ``limit`` groups with the most self CPU time, then one row for the rest."""
    columns = ["module group", "self CPU ms", "share", "op calls", "self CPU memory MiB"]
    table = Table(columns + (["self device ms"] if device else []), title=title)
    ranked = sorted(profile.groups.items(), key=lambda item: -item[1].cpu_us)
    rest = Totals()
    for group, totals in ranked[limit:]:
        for name in ("cpu_us", "device_us", "memory_bytes", "calls"):
            setattr(rest, name, getattr(rest, name) + getattr(totals, name))
    rows = ranked[:limit] + (
        [(f"({len(ranked) - limit} other groups)", rest)] if rest.calls else []
    )
    for group, t in rows:
        cells = [group, ms(t.cpu_us), share(t.cpu_us, profile.cpu_us), str(t.calls)]
        table.rows.append(cells + [mib(t.memory_bytes)] + ([ms(t.device_us)] if device else []))
    return table


def operator_table(title: str, profile: Profile, limit: int, by_memory: bool) -> Table:
    """The ``limit`` (operator, group, input shapes) with the most self CPU time, or with
    ``by_memory`` of the operators called from module code those that left the most memory
    allocated (with what they called)."""
    memory = "CPU memory left allocated MiB" if by_memory else "self CPU memory MiB"
    table = Table(
        ["operator", "module group", "input shapes", "calls", "self CPU ms", "share", memory],
        title=title,
    )
    totals = profile.called if by_memory else profile.operators
    key = (lambda t: -t.memory_bytes) if by_memory else (lambda t: -t.cpu_us)
    for (name, group, shapes), t in sorted(totals.items(), key=lambda item: key(item[1]))[:limit]:
        table.rows.append([
            f"`{name}`", group, shapes, str(t.calls), ms(t.cpu_us), share(t.cpu_us, profile.cpu_us),
            mib(t.memory_bytes),
        ])  # fmt: skip
    return table


def rate(flops: float, us: float) -> str:
    """GFLOP/s, no decimals from 10 up, one below; "-" without FLOPs."""
    if not (flops and us):
        return "-"
    value = flops / us / 1e3
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def class_table(title: str, profile: Profile) -> Table:
    """Self CPU time, share, GFLOP and GFLOP/s per operator class, in the classes' order."""
    table = Table(
        ["operator class", "self CPU ms", "share", "op calls", "GFLOP", "GFLOP/s"], title=title
    )
    for name in classes.CLASSES:
        if name not in profile.classes:
            continue
        t = profile.classes[name]
        table.rows.append([
            name, ms(t.cpu_us), share(t.cpu_us, profile.cpu_us), str(t.calls),
            f"{t.flops / 1e9:.1f}" if t.flops else "-", rate(t.flops, t.cpu_us),
        ])  # fmt: skip
    return table


def computing_table(title: str, profile: Profile, limit: int) -> Table:
    """The ``limit`` FLOP-counted (operator, group, input shapes) with the most CPU time (with
    the operators they called), and their GFLOP/s."""
    table = Table(
        ["operator", "module group", "input shapes", "calls", "CPU ms", "share", "GFLOP/s"],
        title=title,
    )
    ranked = sorted(profile.computing.items(), key=lambda item: -item[1].cpu_us)
    for (name, group, shapes), t in ranked[:limit]:
        table.rows.append([
            f"`{name}`", group, shapes, str(t.calls), ms(t.cpu_us),
            share(t.cpu_us, profile.cpu_us), rate(t.flops, t.cpu_us),
        ])  # fmt: skip
    return table


def class_summary_table(phase: str, profiles: Dict[str, Profile]) -> Table:
    """One row per model: each operator class's share of the phase's self CPU time, with the
    GFLOP/s of the classes that count FLOPs, and the whole of those classes."""
    table = Table(
        ["model", "self CPU ms"] + list(classes.CLASSES) + ["FLOP-counted classes"],
        title=f"Operator classes, {phase}: share of self CPU time · GFLOP/s",
    )
    for name, p in profiles.items():
        cells = [name, ms(p.cpu_us)]
        for kind in classes.CLASSES:
            t = p.class_totals([kind])
            cell = share(t.cpu_us, p.cpu_us)
            if kind in classes.COMPUTE_CLASSES and t.cpu_us:
                cell += f" · {rate(t.flops, t.cpu_us)}"
            cells.append(cell)
        computed = p.class_totals(classes.COMPUTE_CLASSES)
        overall = rate(computed.flops, computed.cpu_us)
        cells.append(f"{share(computed.cpu_us, p.cpu_us)} · {overall}")
        table.rows.append(cells)
    return table


def cost_table(phase: str, profiles: Dict[str, Profile], gflops: Dict[str, float]) -> Table:
    """Each model's self CPU time per GFLOP as a multiple of the reference's (Swin-T where it
    is in the run, else the first model), and what each operator class adds to that multiple."""
    reference = SWIN_T if SWIN_T in profiles else next(iter(profiles))
    reference_cost = profiles[reference].cpu_us / gflops[reference]
    table = Table(
        ["model", "GFLOPs", f"× {reference} per GFLOP", "FLOP-counted classes", "the rest"]
        + list(classes.CLASSES),
        title=f"Operator classes, {phase}: self CPU time per GFLOP as × {reference}'s, by class",
    )
    for name, p in profiles.items():
        unit = gflops[name] * reference_cost
        counted = p.class_totals(classes.COMPUTE_CLASSES).cpu_us
        table.rows.append(
            [name, f"{gflops[name]:.2f}", f"{p.cpu_us / unit:.2f}", f"{counted / unit:.2f}",
             f"{(p.cpu_us - counted) / unit:.2f}"]
            + [f"{p.class_totals([kind]).cpu_us / unit:.2f}" for kind in classes.CLASSES]
        )  # fmt: skip
    return table


def phases(
    name: str, args: argparse.Namespace
) -> Tuple[nn.Module, Dict[str, Callable[[], None]], int, float]:
    """The model profiled for detector ``name`` (the detector, or its backbone with
    ``--target backbone``), its calls per phase, the group depth outside repeated blocks and its
    fvcore GFLOPs (one image: the detectors mode's or the backbones mode's count)."""
    if args.target == "detector":
        cfg = detector_config(name, args.device)
        runner = Runner(cfg, args, amp=False)
        calls = {"training step": runner.train_step, "inference": runner.infer}
        return runner.model, calls, 4, runner.gflops()
    model = detector_backbone(name).to(args.device)
    image = backbone_mode.image_batch(args)
    calls = {
        "training step": partial(backbone_mode.train_step, model, image),
        "inference": partial(backbone_mode.infer, model, image),
    }
    return model, calls, 2, backbone_mode.gflops(model, image)


@mode(
    "profile",
    height=None,
    width=None,
    warmup=1,
    rounds=1,
    options=[
        models_option(DETECTORS, ["DMFormer-S Mask R-CNN"]),
        option("--target", choices=["detector", "backbone"], default="detector"),
        option("--device", default="cpu", help="cpu or cuda"),
        option("--batch", type=int, default=2, help="images per backbone forward"),
        option("--row-limit", type=int, default=15, help="rows per table"),
    ],
)
def profile(args: argparse.Namespace) -> Report:
    """Where the time and memory go: torch.profiler by operator and by module group.

    For each of --models (the detectors mode's detectors), its detector (--target detector,
    default 800x1333) or the backbone alone (--target backbone: the bottom-up network as the
    backbones mode builds it, nothing frozen, --batch noise images, default 512x768): --warmup
    untimed calls, then --rounds calls profiled (torch.profiler; CPU activities, and CUDA with
    --device cuda; shapes and memory recorded) of one training step (the detector: forward,
    backward and SGD step on 2 images with synthetic instances, as the detectors mode; the
    backbone: forward and backward of the sum of its output maps' means) and then of one
    inference (eval mode, no_grad; the detector on 1 image).

    Groups: every module's forward runs inside a record_function range named after its group:
    within a repeated block (the deepest module whose name ends with an index and whose class is
    not torch.nn's) the block's class and the child it is in (e.g. "MixFormerBlock.attn",
    "BottleneckBlock.conv1"), elsewhere the module's name cut to 4 parts for a detector and 2 for
    a backbone (e.g. "roi_heads.box_head.fc1", "net.patch_embed"). An operator belongs to the
    innermost range around it; a backward operator to the group of the forward operator that made
    its autograd node (the profiler's sequence numbers), with " backward" added; gradient accumulation
    into the parameters to "(gradient accumulation)"; the optimizer's to "optimizer"; the rest to
    "(outside modules)". Self times: the time in an operator not
    spent in the operators it calls, so the groups' self times add up to all the profiled time
    on the calling thread (shares of it; a range's own self time is its module's Python code).
    Self CPU memory: what an operator allocated itself (frees not subtracted); memory left
    allocated: what an operator called from module code (or an autograd node's function) and the
    operators it called allocated minus what they freed (its outputs, what it saved).

    Tables per model and phase: module groups by self CPU time (--row-limit rows, the rest in one
    row; with self CPU memory allocated), then the top operators (name, group, input shapes) by
    self CPU time, the top operators called from module code by memory left allocated, the time
    by operator class (tools/benchmarking/operator_classes.py: matrix products, fused attention,
    dense / depth-wise / grouped convolutions, norms, copies, element-wise, outside operators)
    with the GFLOP/s of the classes that count FLOPs (2 per multiply-add), and the top
    FLOP-counted operators by CPU time with their GFLOP/s. Before them, per phase, two tables
    of all the models side by side: each operator class's share of the self CPU time, and the
    self CPU time per GFLOP (fvcore, one image: the detectors or backbones mode's count) as a
    multiple of the reference's (Swin-T Mask R-CNN's where it is in --models, else the first
    model's), split into what each class adds.
    """
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    default_height, default_width = DEFAULT_SIZE[args.target]
    args.height, args.width = args.height or default_height, args.width or default_width
    device = args.device.startswith("cuda")
    tables, results, by_phase, gflops = [], {}, {}, {}
    for name in args.models:
        model, calls, depth, gflops[name] = phases(name, args)
        scopes = ModuleScopes(model, depth)
        for phase, call in calls.items():
            for _ in range(args.warmup):
                call()
            progress(f"  profiling {name}, {phase}")
            p = profile_calls(call, args.rounds, args.device)
            title = f"{name}, {args.target}, {phase}"
            tables.append(group_table(f"{title}: time by module group", p, args.row_limit, device))
            tables.append(
                operator_table(
                    f"{title}: top operators by self CPU time", p, args.row_limit, by_memory=False
                )
            )
            tables.append(operator_table(f"{title}: top operators by memory left allocated", p,
                                         args.row_limit, by_memory=True))  # fmt: skip
            tables.append(class_table(f"{title}: time by operator class", p))
            tables.append(computing_table(
                f"{title}: top FLOP-counted operators by CPU time", p, args.row_limit
            ))  # fmt: skip
            by_phase.setdefault(phase, {})[name] = p
            results.setdefault(name, {})[phase] = {
                "gflops": gflops[name],
                "self_cpu_ms": p.cpu_us / 1e3,
                "groups_ms": {g: t.cpu_us / 1e3 for g, t in p.groups.items()},
                "classes": {
                    c: {"self_cpu_ms": t.cpu_us / 1e3, "gflop": t.flops / 1e9}
                    for c, t in p.classes.items()
                },
            }
        scopes.remove()
        del model, calls, scopes
    summaries = [
        table
        for phase, profiles in by_phase.items()
        for table in (class_summary_table(phase, profiles), cost_table(phase, profiles, gflops))
    ]
    return Report(
        settings=f"{args.device}, {args.threads} threads, {args.target} at {args.height}x"
        f"{args.width}, {args.warmup} warm-up + {args.rounds} profiled call(s) per phase",
        tables=summaries + tables,
        results=results,
    )
