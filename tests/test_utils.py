"""atomic_output: a failed write leaves neither a partial file nor a temporary one."""
import os

import pytest

from hybrid_d2.utils import atomic_output


def test_atomic_output_renames_on_success(tmp_path):
    target = tmp_path / "out.png"
    with atomic_output(str(target)) as tmp:
        assert tmp.endswith(".png") and tmp != str(target)
        open(tmp, "wb").write(b"data")
        assert not target.exists()
    assert target.read_bytes() == b"data"
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_atomic_output_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "model.pth"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_output(str(target)) as tmp:
            open(tmp, "wb").write(b"half")
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pth"]
