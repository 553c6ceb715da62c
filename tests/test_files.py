"""qft.files: atomic writes and output checks."""

import pytest

from qft.errors import UserError
from qft.files import atomic_write, check_output, remove_stale_temporaries


def test_atomic_write_bytes_text_and_callback(tmp_path):
    assert atomic_write(tmp_path / "a" / "b.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    assert atomic_write(tmp_path / "t.txt", "λ").read_text(encoding="utf-8") == "λ"
    assert atomic_write(tmp_path / "c.bin", lambda f: f.write(b"xyz")).read_bytes() == b"xyz"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "c.bin", "t.txt"]


def test_atomic_write_failure_keeps_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "keep.bin"
    target.write_bytes(b"old")

    def fail(f):
        f.write(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(target, fail)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.bin"]


def test_remove_stale_temporaries(tmp_path):
    (tmp_path / ".ck.pth.abc123.tmp").write_bytes(b"x")
    (tmp_path / ".other.pth.abc.tmp").write_bytes(b"x")
    assert [p.name for p in remove_stale_temporaries(tmp_path / "ck.pth")] == [".ck.pth.abc123.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.pth.abc.tmp"]


def test_check_output(tmp_path):
    src = tmp_path / "in.png"
    src.write_bytes(b"x")
    assert check_output(tmp_path / "new.qft") == tmp_path / "new.qft"
    with pytest.raises(UserError, match="exists; pass --force"):
        check_output(src)
    with pytest.raises(UserError, match="the output is the input"):
        check_output(src, force=True, inputs=(src,))
    with pytest.raises(UserError, match="is a folder"):
        check_output(tmp_path, force=True)
    with pytest.raises(UserError, match="no such folder"):
        check_output(tmp_path / "missing" / "x.qft")
    assert check_output(src, force=True) == src
