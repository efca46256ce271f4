"""Generated sections of markdown files: the text between a begin and an end marker line.

Shared by tools/model_zoo.py and tools/benchmark.py, which rewrite their tables in docs/ and leave
the prose around them alone.
"""

from typing import Tuple

from hybrid_d2.utils import atomic_output


def checked_text(text: str, path: str, markers: Tuple[str, str], tool: str) -> str:
    """``text`` (of file ``path``); exits naming ``tool`` unless it has one begin marker line
    before one end marker line."""
    begin, end = markers
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise SystemExit(f"{tool}: {path} needs one '{begin}' line before one '{end}' line")
    return text


def check_file(path: str, markers: Tuple[str, str], tool: str) -> None:
    """Exit unless file ``path`` exists and has the ``markers`` (:func:`checked_text`)."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as error:
        begin, end = markers
        raise SystemExit(
            f"{tool}: cannot read {path} ({error.strerror}); it needs one '{begin}' line before"
            f" one '{end}' line"
        ) from None
    checked_text(text, path, markers, tool)


def replace_between(
    text: str, generated: str, path: str, markers: Tuple[str, str], tool: str
) -> str:
    """``text`` with the part between its ``markers`` lines replaced by ``generated``."""
    begin, end = markers
    head, rest = checked_text(text, path, markers, tool).split(begin)
    return f"{head}{begin}\n{generated}{end}{rest.split(end, 1)[1]}"


def write_between(path: str, generated: str, markers: Tuple[str, str], tool: str) -> None:
    """Replace the part of file ``path`` between its ``markers`` lines with ``generated``
    (atomically: a reader sees the old file or the new one)."""
    with open(path) as f:
        text = replace_between(f.read(), generated, path, markers, tool)
    with atomic_output(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
