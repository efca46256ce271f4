"""The command line: one subcommand per registered mode."""

import argparse
import json
import os
import sys
from typing import Optional, Sequence

import torch

from . import backbones, compile_mode, detectors, dmformer_branches, profiling, segmentation
from .registry import MODES, add_mode_parser
from .report import check_markers, write_report

MODULES = (detectors, segmentation, backbones, compile_mode, dmformer_branches, profiling)


def main(argv: Optional[Sequence[str]] = None, description: str = "") -> int:
    """Run the mode that ``argv`` (default: this process's arguments) names, or with
    ``--worker NAME`` the mode's worker for one model, which prints its result as JSON."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
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
