"""The mode registry and each mode's command line."""

import argparse
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from .report import Report

Option = Tuple[Tuple[str, ...], Dict[str, Any]]
RunMode = Callable[[argparse.Namespace], Report]


def option(*flags: str, **kwargs: Any) -> Option:
    """An ``add_argument`` call of a mode's own option, for :func:`mode`."""
    return flags, kwargs


def models_option(models: Sequence[str], default: Optional[Sequence[str]] = None) -> Option:
    """``--models``: a subset of ``models``; ``default`` (all of them when None)."""
    return option("--models", nargs="+", choices=list(models), default=list(default or models))


@dataclass
class Mode:
    """A registered mode: its function, default image size (None: the mode chooses), warm-up and
    rounds, own options, the
    function a worker process runs (``--worker NAME``) and default outputs (``doc`` "-": print
    only; ``json_path``: a ``--json`` option)."""

    run: RunMode
    width: Optional[int]
    warmup: int
    height: Optional[int] = 800
    rounds: int = 5
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


def at_least_one(text: str) -> int:
    """``text`` as an integer of at least 1 (an argparse type)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: expected at least 1")
    return value


def add_mode_parser(subparsers: argparse._SubParsersAction, name: str, spec: Mode) -> None:
    """The subcommand ``name``: the shared options, then the mode's own; its help is the mode
    function's docstring."""
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
    add("--rounds", type=at_least_one, default=spec.rounds, help="timed rounds")
    for flags, kwargs in spec.options:
        add(*flags, **kwargs)
    add("--doc", default=spec.doc, help="markdown file to update (its markers), or - to print")
    if spec.json_path:
        add("--json", default=spec.json_path, help="JSON file of the run (written with --doc)")
    add("--note", default="", help="a remark on the run, shown in the report")
    if spec.worker:
        add("--worker", help=argparse.SUPPRESS)
        add("--memory", action="store_true", help=argparse.SUPPRESS)
