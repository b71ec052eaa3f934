"""The NIfTI expansion bomb: a 261 KB .nii.gz declaring 512x512x1024 int8 with a scale slope
(1 GB of float32 once scaled; 5.3-5.6 GB in the server before) is refused by the one decode
budget from its header, before it is expanded or any voxel array allocated, in the loader, the
series page and ``medcls review --by-series``; memory is given back. NIfTI volumes that fit
still open, scaled in float32."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import tracemalloc
import zlib

import numpy as np
import pytest
from apptest import page_text
from conftest import PROJECT_ROOT

from medcls.core.errors import DecodeBudgetError
from medcls.io.gather import gather
from medcls.io.nifti import load_nifti_volume
from medcls.io.sources import bytes_source

SHAPE = (512, 512, 1024)


def nifti_bytes(shape, dtype=np.int8, slope=2.0, inter=0.0, voxels: bytes | None = None,
                gz: bool = True) -> bytes:
    """A single-file NIfTI-1 (zeros unless ``voxels``), gzipped in chunks so the test never
    holds the expanded volume."""
    import nibabel as nib

    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr.set_slope_inter(slope, inter)
    hdr.set_qform(np.diag([0.5, 0.5, 1.0, 1.0]), code=1)
    hdr["magic"] = b"n+1"
    hdr["vox_offset"] = 352
    head = hdr.binaryblock + b"\0" * 4
    if voxels is None:
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if not gz:
            return head + b"\0" * n
        z = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        out = [z.compress(head)]
        chunk = b"\0" * (1 << 24)
        for start in range(0, n, len(chunk)):
            out.append(z.compress(chunk[: n - start]))
        return b"".join(out + [z.flush()])
    return gzip.compress(head + voxels) if gz else head + voxels


@pytest.fixture(scope="module")
def nifti_bomb() -> bytes:
    data = nifti_bytes(SHAPE)
    assert len(data) < 300_000  # the report's 261 KB file
    return data


def test_the_bomb_is_refused_before_any_allocation(nifti_bomb):
    tracemalloc.start()
    try:
        with pytest.raises(DecodeBudgetError, match=r"512x512 pixels x 1024 slices.*decode budget"):
            load_nifti_volume(nifti_bomb)
        study = gather([bytes_source("bomb.nii.gz", nifti_bomb)])
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # numpy's and zlib's buffers are traced: nothing near the 256 MB of expanded voxels
    assert peak < 16 << 20, peak
    assert current < 4 << 20, current
    assert study.series == [] and any("decode budget" in f.message for f in study.findings)
    assert all("bomb" not in f.message for f in study.findings)  # the file is named apart


def test_a_scaled_volume_that_fits_opens_in_float32_within_its_plan():
    rng = np.random.default_rng(0)
    shape = (64, 48, 12)
    raw = rng.integers(-100, 100, size=shape, dtype=np.int16)
    data = nifti_bytes(shape, np.int16, slope=0.5, inter=10.0,
                       voxels=raw.tobytes(order="F"))
    tracemalloc.start()
    try:
        vol, lps, plane, findings = load_nifti_volume(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert vol.dtype == np.float32 and vol.flags.c_contiguous and plane == "axial"
    assert sorted(vol.ravel().tolist()) == sorted((raw * 0.5 + 10.0).ravel().tolist())
    n = raw.size
    # the expanded file, the raw view and one float32 copy (no float64, no second copy)
    assert peak < 2 * n + 4 * n + (2 << 20), peak
    unscaled, *_ = load_nifti_volume(nifti_bytes(shape, np.int16, slope=1.0, gz=False,
                                                 voxels=raw.tobytes(order="F")))
    assert unscaled.dtype == np.int16 and sorted(unscaled.ravel()) == sorted(raw.ravel())


def test_a_smaller_budget_refuses_a_normal_volume(monkeypatch):
    data = nifti_bytes((256, 256, 64), np.int16, slope=1.0)
    load_nifti_volume(data)
    monkeypatch.setenv("MEDCLS_DECODE_BUDGET_MB", "16")
    with pytest.raises(DecodeBudgetError, match="0.016 GB"):
        load_nifti_volume(data)


def test_a_cut_short_volume_is_a_typed_refusal():
    data = nifti_bytes((64, 64, 8), np.int16, slope=1.0, gz=False)
    from medcls.core.errors import UnreadableScanError

    with pytest.raises(UnreadableScanError, match="cut short"):
        load_nifti_volume(data[:-100])
    with pytest.raises(UnreadableScanError, match="cut short"):
        load_nifti_volume(gzip.compress(data[:-100]))


def test_the_series_page_refuses_the_bomb_within_the_budget(nifti_bomb):
    from streamlit.testing.v1 import AppTest

    tracemalloc.start()
    try:
        at = AppTest.from_file(str(PROJECT_ROOT / "app.py"), default_timeout=300)
        at.session_state["open_mode"] = "A series"
        at.session_state["series_files"] = [("bomb.nii.gz", nifti_bomb)]
        at.run()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not at.exception
    text = page_text(at)
    assert "decode budget" in text and "No series could be read" in text
    assert peak < 700 << 20, peak  # the page and its model, not the 1-5 GB of the volume


def _child_peak_rss_mb(args: list[str], **kwargs):
    wrapper = ("import resource, subprocess, sys\n"
               "p = subprocess.run(sys.argv[1:])\n"
               "print('PEAK_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
               "sys.exit(p.returncode)\n")
    proc = subprocess.run([sys.executable, "-c", wrapper, *args], capture_output=True, text=True,
                          **kwargs)
    peak = [int(x.split()[1]) for x in proc.stdout.splitlines() if x.startswith("PEAK_KB")]
    return proc, peak[0] / 1024


def test_review_by_series_refuses_the_bomb_within_the_budget(nifti_bomb, brain_model_dir, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "bomb.nii.gz").write_bytes(nifti_bomb)
    (folder / "small.nii.gz").write_bytes(nifti_bytes((64, 64, 4), np.int16, slope=1.0))
    out = tmp_path / "series.csv"
    proc, peak_mb = _child_peak_rss_mb(
        [sys.executable, "-m", "medcls", "review", str(folder), "--model", str(brain_model_dir),
         "--out", str(out), "--by-series"], cwd=PROJECT_ROOT, timeout=600,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "decode budget" in proc.stdout
    assert out.read_text().count("\n") == 2  # the header and the small volume's row
    # TensorFlow and the model take about 1 GB here; the bomb took 5.4 GB before
    assert peak_mb < 1.6 * 1024, peak_mb
