"""Reports: markdown tables with a header, printed and written between a mode's markers."""

import argparse
import datetime
import json
import os
import platform
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
from doc_markers import check_file, write_between

from hybrid_d2.utils import atomic_output

from .timing import progress

TOOL = "benchmark"


@dataclass
class Table:
    """A markdown table of preformatted cells, with a bold title above it when one is given."""

    columns: List[str]
    rows: List[List[str]] = field(default_factory=list)
    title: str = ""

    def render(self) -> List[str]:
        """The table's markdown lines."""
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


def check_markers(path: str, mode_name: str) -> None:
    """Exit unless ``path`` has one begin line before one end line of the mode."""
    check_file(path, markers(mode_name), TOOL)


def write_report(report: Report, args: argparse.Namespace, partial: Optional[str] = None) -> None:
    """Print the report; with ``--doc FILE`` write it between the mode's markers of FILE and,
    where the mode has ``--json``, the run as JSON. ``partial``: the stage that just ended, for a
    report written while the run goes on (not printed; marked as partial in the files), so that a
    run that is killed later leaves what it measured."""
    run = {
        "command": "python tools/benchmark.py " + " ".join(args.argv),
        "machine": machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "settings": report.settings,
        "note": args.note,
        "results": report.results,
    }
    remarks = list(report.remarks)
    if partial:
        run["partial"] = partial
        remarks.insert(0, f"**Partial results: written when {partial} ended; the run went on.**")
    text = render(run, report.tables, remarks)
    if not partial:
        print(text)
    if args.doc == "-":
        return
    if getattr(args, "json", None):
        with atomic_output(args.json) as tmp:
            with open(tmp, "w") as f:
                json.dump(run, f, indent=1)
    write_between(args.doc, text, markers(args.mode), TOOL)
    if partial:
        progress(f"  partial report written to {args.doc} ({partial})")
