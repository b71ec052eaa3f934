"""Exports are written whole or not at all (medcls.core.csvsafe.atomic_output): on a real full
disk (a 64 KB tmpfs, filled) `medcls review` says "disk full", prints no traceback and leaves
no 0-byte or partial CSV; an earlier file of the same name is kept as it was."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
from conftest import PROJECT_ROOT, require

from medcls.core.csvsafe import atomic_output
from medcls.core.errors import OutputWriteError


@pytest.fixture
def full_disk(tmp_path):
    """A real file system with no space left: a 64 KB tmpfs (root may mount one), filled."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({proc.stderr.strip()[:120]})")
    try:
        (mnt / "old.csv").write_text("kept,as,it,was\n")
        with contextlib.suppress(OSError), open(mnt / "filler", "wb") as fh:
            while True:
                fh.write(b"\0" * 4096)
                fh.flush()
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_is_a_typed_error_and_leaves_nothing(full_disk):
    with pytest.raises(OutputWriteError, match="disk is full: new.csv was not written"):
        with atomic_output(full_disk / "new.csv", newline="") as fh:
            fh.write("a,b\n" * 50_000)
    with pytest.raises(OutputWriteError, match="disk is full"):
        with atomic_output(full_disk / "old.csv") as fh:
            fh.write("x" * 200_000)
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler", "old.csv"]
    assert (full_disk / "old.csv").read_text() == "kept,as,it,was\n"
    assert str(full_disk) not in str(OutputWriteError)  # the message names the file only


def test_an_error_in_the_block_leaves_the_old_file(tmp_path):
    out = tmp_path / "w.csv"
    out.write_text("old\n")
    with pytest.raises(ZeroDivisionError), atomic_output(out) as fh:
        fh.write("new, half written")
        1 / 0
    assert out.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["w.csv"]
    with atomic_output(out) as fh:
        fh.write("new\n")
    assert out.read_text() == "new\n" and sorted(p.name for p in tmp_path.iterdir()) == ["w.csv"]


def test_review_on_a_full_disk_says_disk_full(full_disk, tmp_path, data_dir, brain_model_dir):
    jpeg = sorted(require(data_dir / "brain-mri" / "glioma").glob("*.jpg"))[0]
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "scan.jpg").write_bytes(jpeg.read_bytes())
    for extra in ([], ["--by-series"]):
        proc = subprocess.run(
            [sys.executable, "-m", "medcls", "review", str(folder), "--model", str(brain_model_dir),
             "--out", str(full_disk / "review.csv"), *extra], cwd=PROJECT_ROOT, timeout=600,
            capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "error: The disk is full: review.csv was not written" in proc.stderr
        assert "Traceback" not in proc.stderr + proc.stdout
        assert str(full_disk) not in proc.stderr
        assert sorted(p.name for p in full_disk.iterdir()) == ["filler", "old.csv"]
