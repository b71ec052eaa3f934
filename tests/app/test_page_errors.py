"""The main page (app.py) under bad and unusual input, through Streamlit's AppTest.

AppTest cannot drive st.file_uploader; the page reads the open scan from
``st.session_state["scan_bytes"]`` (ui.scans.current_scan_bytes), so each case is handed over there.
Every bad file must end in a clear message (a typed medcls error, shown with st.error: no
traceback, no exception element), and the same session must then classify a good scan. The
unusual-but-valid files (4-channel PNG, 16-bit TIFF, 1x1 image, 300-frame DICOM) must classify.

Uses the model packages of ``models/`` ($MEDCLS_MODELS overrides); skips without a brain-MRI
package. The predictor is cached by st.cache_resource for the whole test process, so the model
loads once.
"""

from __future__ import annotations

import struct
import tomllib
import zlib
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from apptest import assert_no_exception, assert_prediction, page_text, run_page, verdicts
from conftest import PROJECT_ROOT, require
from dicom_factory import MULTIFRAME_WORD_SC, grayscale16, new_dataset, to_bytes

# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def good_jpeg(brain_test_jpeg: Path) -> bytes:
    return brain_test_jpeg.read_bytes()


@pytest.fixture(scope="module")
def warm(app_env, good_jpeg):
    """One full run, so the model and TensorFlow are loaded before the timed cases."""
    at = run_page(scan_bytes=good_jpeg)
    assert_prediction(at)
    return True


def image_captions(at) -> str:
    """Captions of the images, and the viewer's caption (the scan and overlay are one chart)."""
    return "\n".join([c for im in at.image for c in im.captions] + [c.value for c in at.caption])


def assert_clear_error(at, *expected: str) -> str:
    """One st.error holding a typed medcls error's message (not the 'unexpected error' text)."""
    assert_no_exception(at)
    errors = [e.value for e in at.error]
    assert len(errors) == 1, page_text(at)
    msg = errors[0]
    assert msg.startswith("This file could not be used: "), msg  # a MedclsError, see ui.common.show_error
    assert "unexpected error" not in msg and "Traceback" not in msg and 'File "' not in msg
    assert " object at 0x" not in msg
    low = msg.lower()
    assert any(e in low for e in expected), (expected, msg)
    assert not verdicts(at)
    return msg


# ----------------------------------------------------------------------------- bad inputs

def _pdf() -> bytes:
    return (b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog /Pages 2 0 R >>\nendobj\n2 0 obj\n"
            b"<< /Type /Pages /Kids [] /Count 0 >>\nendobj\ntrailer\n<< /Root 1 0 R >>\n%%EOF\n")


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (struct.pack(">I", len(payload)) + kind + payload
            + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))


def _bomb_png() -> bytes:
    """A valid PNG header declaring 30000x30000 8-bit gray pixels (900 megapixels)."""
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 30001)) + _png_chunk(b"IEND", b""))



def _series_file(d: Path) -> Path:
    return require(d / "dicom" / "mprage-series" / "100.dcm")


def _no_pixels(d: Path) -> bytes:
    ds = pydicom.dcmread(_series_file(d))
    del ds.PixelData
    return to_bytes(ds, file_format=False)


def _with(d: Path, **attrs) -> bytes:
    ds = pydicom.dcmread(_series_file(d))
    for k, v in attrs.items():
        setattr(ds, k, v)
    return to_bytes(ds, file_format=False)


def _pydicom_file(name: str) -> bytes:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} not installed")
    return Path(path).read_bytes()


# name -> (bytes from the data folder, words the message must hold (any of them))
BAD = {
    "zero_bytes": (lambda d: b"", ("empty",)),
    "random_bytes": (lambda d: np.random.default_rng(1).integers(0, 256, 20_000, np.uint8).tobytes(),
                     ("not an image",)),
    "text_renamed": (lambda d: b"Patient notes: follow-up in 3 months.\n" * 100, ("not an image",)),
    "pdf": (lambda d: _pdf(), ("not an image",)),
    "truncated_dicom": (lambda d: (lambda r: r[: int(0.8 * len(r))])(_series_file(d).read_bytes()),
                        ("damaged", "incomplete")),
    "truncated_compressed_dicom": (
        lambda d: (lambda r: r[: int(0.8 * len(r))])(
            require(d / "dicom" / "transfer-syntaxes" / "9.dcm").read_bytes()),
        ("incomplete",)),
    "dicom_without_pixels": (_no_pixels, ("no pixel data",)),
    "structured_report": (lambda d: _pydicom_file("reportsi.dcm"), ("no pixel data",)),
    "dicomdir": (lambda d: _pydicom_file("DICOMDIR"), ("no pixel data",)),
    "rows_inconsistent": (lambda d: _with(d, Rows=300), ("does not match",)),
    "columns_inconsistent": (lambda d: _with(d, Columns=100), ("does not match",)),
    "bits_allocated_inconsistent": (lambda d: _with(d, BitsAllocated=8, BitsStored=8, HighBit=7),
                                    ("does not match",)),
    "jpeg12_lossy_dicom": (lambda d: require(d / "dicom" / "wg04" / "MR1_JPLY.dcm").read_bytes(),
                           ("12-bit lossy jpeg",)),
    "png_30000x30000": (lambda d: _bomb_png(), ("30000x30000",)),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_gives_a_clear_message_and_the_session_goes_on(name, data_dir, good_jpeg, warm):
    make, expected = BAD[name]
    data = make(data_dir)
    if name == "jpeg12_lossy_dicom":
        from medcls import load_scan
        from medcls.core.errors import UnreadableScanError

        try:
            load_scan(data)
            pytest.skip("this machine decodes 12-bit lossy JPEG: it is not a bad input here")
        except UnreadableScanError:
            pass
    at = run_page(scan_bytes=data)
    assert_clear_error(at, *expected)
    # the same session, a good scan: classified
    run_page(scan_bytes=good_jpeg, at=at)
    assert_prediction(at)
    # and a bad one again after the good one: the error, not the previous result
    run_page(scan_bytes=data, at=at)
    assert_clear_error(at, *expected)


# ----------------------------------------------------------------------------- unusual, valid

def _brain_gray(good_jpeg: bytes) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(good_jpeg, np.uint8), cv2.IMREAD_GRAYSCALE)
    assert img is not None
    return img


def _png_rgba(good_jpeg: bytes) -> bytes:
    bgra = cv2.cvtColor(_brain_gray(good_jpeg), cv2.COLOR_GRAY2BGRA)
    bgra[..., 3] = 200  # a real alpha channel
    ok, buf = cv2.imencode(".png", bgra)
    assert ok and cv2.imdecode(buf, cv2.IMREAD_UNCHANGED).shape[2] == 4
    return buf.tobytes()


def _tiff16(good_jpeg: bytes) -> bytes:
    img16 = _brain_gray(good_jpeg).astype(np.uint16) * 257
    ok, buf = cv2.imencode(".tiff", img16)
    assert ok and cv2.imdecode(buf, cv2.IMREAD_UNCHANGED).dtype == np.uint16
    return buf.tobytes()


def _one_pixel(good_jpeg: bytes) -> bytes:
    ok, buf = cv2.imencode(".png", np.full((1, 1), 128, np.uint8))
    assert ok
    return buf.tobytes()


N_FRAMES = 300


def _multiframe(good_jpeg: bytes) -> bytes:
    """A 300-frame 16-bit DICOM: the brain image, shifted a little in each frame."""
    base = cv2.resize(_brain_gray(good_jpeg), (128, 128), interpolation=cv2.INTER_AREA)
    frames = np.stack([np.roll(base, k % 16, axis=1) for k in range(N_FRAMES)]).astype(np.uint16) * 16
    ds = grayscale16(new_dataset(sop_class=MULTIFRAME_WORD_SC, modality="MR"), 128, 128,
                     frames=N_FRAMES, bits_stored=12)
    ds.PixelData = frames.tobytes()
    return to_bytes(ds)


GOOD = {"png_4_channels": _png_rgba, "tiff_16_bit": _tiff16, "one_pixel": _one_pixel,
        "dicom_300_frames": _multiframe}


@pytest.mark.parametrize("name", list(GOOD))
def test_unusual_valid_files_are_classified(name, good_jpeg, warm):
    data = GOOD[name](good_jpeg)
    at = run_page(scan_bytes=data)
    assert_prediction(at)
    if name == "dicom_300_frames":
        slider = at.slider(key="frame")
        assert (slider.min, slider.max, slider.value) == (1, N_FRAMES, 1)
        assert f"frame 1/{N_FRAMES}" in image_captions(at)
        slider.set_value(N_FRAMES // 2)
        at.run()
        assert_prediction(at)
        assert f"frame {N_FRAMES // 2}/{N_FRAMES}" in image_captions(at)
        cache = at.session_state["_scan_cache"]
        # ui.scans.MAX_CACHED_SCAN_BYTES: a few decoded frames, never all 300
        assert sum(s.nbytes for s in cache.values()) <= 256 << 20 and len(cache) < N_FRAMES
        assert all(s.pixels.shape == (128, 128) for s in cache.values())
    else:
        assert not [s for s in at.slider if s.key == "frame"]


# ----------------------------------------------------------------------------- upload limit

def test_upload_size_limit_and_xsrf_are_configured() -> None:
    """Streamlit refuses uploads over server.maxUploadSize (MB) in the browser and the server;
    the limit must be set (and not above what medcls.io.load accepts), and XSRF protection on."""
    from medcls.io.scan import MAX_FILE_BYTES

    config = tomllib.loads((PROJECT_ROOT / ".streamlit" / "config.toml").read_text())
    server = config["server"]
    limit = server.get("maxUploadSize")
    assert isinstance(limit, int) and 0 < limit <= MAX_FILE_BYTES // 2**20, limit
    assert server.get("enableXsrfProtection") is True
