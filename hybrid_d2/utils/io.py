"""Writing outputs so that a crash never leaves a half-written file behind."""
import contextlib
import os
import tempfile
from typing import Iterator


@contextlib.contextmanager
def atomic_output(path: str) -> Iterator[str]:
    """Yield a temporary path next to ``path`` to write to; on success fsync it and rename it to
    ``path``, on error remove it. The temporary name keeps ``path``'s extension, so writers that
    pick the format from it (``cv2.imwrite``, ``cv2.VideoWriter``) work unchanged."""
    directory, name = os.path.split(os.path.abspath(path))
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=os.path.splitext(name)[1])
    os.close(fd)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes it owner-only; give it a normal file's mode
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
