"""Writing outputs so that a crash never leaves a half-written file behind."""

import contextlib
import fnmatch
import os
import re
import tempfile
from typing import Iterator, List

# atomic_output's temporary names: "." + final name + "." + mkstemp's 8 random characters +
# the final name's extension, e.g. ".model_final.pth.k2j4_9xz.pth".
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}(?P<ext>\.[^.]*)?$")


@contextlib.contextmanager
def atomic_output(path: str) -> Iterator[str]:
    """Yield a temporary path next to ``path`` to write to; on success fsync it, rename it to
    ``path`` and fsync the directory (so that the rename itself survives a power loss); on error
    remove it. The temporary name keeps ``path``'s extension, so writers that pick the format
    from it (``cv2.imwrite``, ``cv2.VideoWriter``) work unchanged. A process killed while writing
    leaves the temporary file behind; :func:`stale_temp_files` finds it."""
    directory, name = os.path.split(os.path.abspath(path))
    fd, tmp_path = tempfile.mkstemp(
        dir=directory, prefix=f".{name}.", suffix=os.path.splitext(name)[1]
    )
    os.close(fd)
    os.chmod(
        tmp_path, 0o666 & ~_umask()
    )  # mkstemp makes it owner-only; give it a normal file's mode
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        raise
    fsync_directory(directory)


def fsync_directory(directory: str) -> None:
    """Flush a directory's entries (renames, new files) to disk; a no-op where directories cannot
    be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def stale_temp_files(directory: str, name_pattern: str = "*") -> List[str]:
    """The temporary files that :func:`atomic_output` left in ``directory`` when its process was
    killed while writing an output whose name matches the glob ``name_pattern``. Only call this
    where no other process is writing such outputs into the directory right now."""
    if not os.path.isdir(directory):
        return []
    found = []
    for entry in sorted(os.listdir(directory)):
        match = _TEMP_NAME.match(entry)
        if (
            match
            and fnmatch.fnmatchcase(match["name"], name_pattern)
            and (match["ext"] or "") == os.path.splitext(match["name"])[1]
            and os.path.isfile(os.path.join(directory, entry))
        ):
            found.append(os.path.join(directory, entry))
    return found


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
