"""Property-based fuzzing of the loader (medcls.io.load.load_scan) and preprocessing.

The property, for every input: ``load_scan`` either returns a Scan or raises a
:class:`medcls.core.errors.MedclsError` with a one-line message; when it returns a Scan,
``preprocess(scan, PreprocessSpec())`` succeeds (or raises MedclsError) and gives a finite
model input of the right shape. Nothing else (no ValueError, cv2.error, IndexError, ...) may
escape. Inputs that are valid images of a supported kind must load.

Strategies:

- random bytes, alone or behind the magic bytes of each supported format;
- real DICOM files (../shared/data/dicom, and pydicom's own test files: more codecs, layouts
  and non-images), brain-MRI JPEGs and PNG/TIFF encodings of them, with random byte flips,
  overwrites, truncation, insertions, deletions and duplications (mutations are biased towards
  the header, where they change the structure rather than pixel values);
- DICOM data sets built with pydicom from random Rows/Columns/BitsAllocated/SamplesPerPixel/
  PhotometricInterpretation/NumberOfFrames, in random transfer syntaxes, with pixel data whose
  length matches or not, random rescale/window/VOI LUT attributes, then tampered attributes;
- PNG/TIFF/JPEG/BMP files from cv2.imencode of random arrays of random dtype and channels.

Examples per Hypothesis test: $MEDCLS_FUZZ_EXAMPLES (the long run: ``make fuzz``, 10,000),
else 300 with a derandomized (reproducible) search for CI. ``--hypothesis-show-statistics``
reports the cases run and what became of them (loaded, or which error).

Found and fixed in medcls/scan.py (regression tests in tests/test_scan.py): GDCM aborting the
process on JPEG data declaring 1 or 32 bits allocated; pylibjpeg-rle's Rust panic (a
BaseException) escaping; non-finite windows/values from NaN/inf rescale, window or float pixel
data; valid TIFFs Pillow cannot open called damaged; truncated compressed DICOM called "no
pixel data"; damaged compressed data called "compression that cannot be decoded".
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import warnings
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pydicom.config
import pytest
from conftest import DATA_DIR
from dicom_factory import new_dataset
from hypothesis import HealthCheck, assume, event, given, note, settings
from hypothesis import strategies as st
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from medcls.core.errors import MedclsError
from medcls.io.load import load_scan
from medcls.io.preprocess import PreprocessSpec, preprocess

_ENV = os.environ.get("MEDCLS_FUZZ_EXAMPLES")
MAX_EXAMPLES = int(_ENV) if _ENV else 300

FUZZ = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=_ENV is None,  # CI: the same examples every run
    database=None if _ENV is None else settings.default.database,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much],
)

SPEC = PreprocessSpec()
try:  # OpenCV's own warnings on odd files are noise here: behaviour is what is checked
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
except AttributeError:  # pragma: no cover - other OpenCV builds
    pass


# ----------------------------------------------------------------------------- the property

def _check_message(exc: MedclsError) -> None:
    msg = str(exc)
    assert msg.strip(), f"{type(exc).__name__} with an empty message"
    assert "Traceback" not in msg and "\n" not in msg, msg
    assert " object at 0x" not in msg, msg


def _note(text: str, outcome: str | None = None) -> None:
    """Note for a failing example, and the outcome as a statistics event (shown with
    --hypothesis-show-statistics: which share of inputs loaded, which errors the rest got)."""
    try:
        note(text)
        if outcome:
            event(outcome)
    except Exception:  # noqa: BLE001 - outside a Hypothesis test (the corpus control)
        pass


class Case(bytes):
    """Input bytes with a short description as repr (Hypothesis prints it on failure)."""

    def __new__(cls, data: bytes, description: str = ""):
        obj = super().__new__(cls, data)
        obj.description = description
        return obj

    def __repr__(self) -> str:
        digest = hashlib.sha256(self).hexdigest()[:12]
        return f"Case({self.description!r}, {len(self)} bytes, sha256={digest})"


#: Set to a file path to keep the input being tested there: a crash in a native decoder kills
#: the interpreter before Hypothesis can report, and the file is then the reproducer.
LAST_INPUT = os.environ.get("MEDCLS_FUZZ_LAST")


def check(data: bytes, frame: int = 0, must_load: bool = False):
    """Load and preprocess ``data``; only MedclsError may escape. Returns the Scan or None."""
    if LAST_INPUT:
        Path(LAST_INPUT).write_bytes(bytes(data))
    try:
        scan = load_scan(data, frame=frame)
    except MedclsError as exc:
        _check_message(exc)
        _note(str(exc), f"refused: {type(exc).__name__}: {re.sub(r'[0-9]+', 'N', str(exc))[:60]}")
        if must_load:
            raise AssertionError(f"a valid image was refused: {exc}") from exc
        return None
    _note(repr(scan), f"loaded: {scan.source_format}")
    assert scan.pixels.ndim in (2, 3) and scan.pixels.shape[0] >= 1 and scan.pixels.shape[1] >= 1
    assert scan.values.shape[:2] == scan.pixels.shape[:2]
    assert np.isfinite(scan.window_center) and np.isfinite(scan.window_width)
    try:
        pre = preprocess(scan, SPEC)
    except MedclsError as exc:
        _check_message(exc)
        if must_load:
            raise
        return None
    assert pre.array.shape == (SPEC.input_size, SPEC.input_size, SPEC.channels)
    assert pre.array.dtype == np.float32
    assert np.isfinite(pre.array).all(), "non-finite model input"
    return scan


# ----------------------------------------------------------------------------- random bytes

MAGIC = [b"", b"\x00" * 128 + b"DICM", b"\x00" * 128 + b"DICM\x02\x00\x10\x00UI",
         b"\x89PNG\r\n\x1a\n", b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR", b"\xff\xd8\xff",
         b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", b"II*\x00", b"MM\x00*", b"BM", b"\x08\x00\x05\x00",
         b"\x08\x00\x05\x00CS", b"\x02\x00\x00\x00UL\x04\x00", b"%PDF-1.4\n", b"PK\x03\x04"]


@FUZZ
@given(prefix=st.sampled_from(MAGIC), body=st.binary(max_size=4096))
def test_random_bytes(prefix: bytes, body: bytes) -> None:
    check(prefix + body)


# ----------------------------------------------------------------------------- mutated real files

def _pydicom_test_files() -> list[Path]:
    """Small DICOM files shipped inside pydicom: more codecs and layouts than ../shared/data
    (RLE 32-bit, YBR 4:2:2, palette colour, deflate, big endian, 1-bit segmentation, multi-frame
    RT dose) and non-images (structured reports, DICOMDIR, RT plan, waveform)."""
    folder = Path(pydicom.__file__).parent / "data" / "test_files"
    return sorted(p for p in (*folder.glob("*.dcm"), *folder.glob("dicomdirtests/DICOMDIR*"))
                  if p.stat().st_size < 400_000)


PYDICOM_FILES = _pydicom_test_files()
#: The ones the mutation strategy also starts from (one of each kind, all small).
PYDICOM_SEEDS = {"693_J2KI.dcm", "CT_small.dcm", "JPEG-lossy.dcm", "JPGExtended.dcm",
                 "JPEGLSNearLossless_16.dcm", "MR_small_RLE.dcm", "MR_small_bigendian.dcm",
                 "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "SC_rgb_jpeg_gdcm.dcm",
                 "SC_rgb_rle_32bit_2frame.dcm", "SC_ybr_full_422_uncompressed.dcm", "image_dfl.dcm",
                 "liver_1frame.dcm", "rtdose.dcm", "reportsi.dcm", "DICOMDIR", "examples_palette.dcm"}


def _corpus() -> list[tuple[str, bytes, int]]:
    """(name, bytes, header length) of real files to mutate; header length bounds the biased
    mutation positions (the bytes before the pixel data for DICOM, 512 for images)."""
    out: list[tuple[str, bytes, int]] = []
    dicom = DATA_DIR / "dicom"
    paths = sorted((dicom / "transfer-syntaxes").glob("*.dcm")) + sorted((dicom / "wg04").glob("*.dcm"))
    paths += sorted((dicom / "mprage-series").glob("*.dcm"))[:2]
    for p in paths:
        raw = p.read_bytes()
        pix = raw.rfind(b"\xe0\x7f\x10\x00")
        out.append((f"dicom/{p.parent.name}/{p.name}", raw, (pix + 16) if pix > 0 else 2048))
    for p in (p for p in PYDICOM_FILES if p.name in PYDICOM_SEEDS):
        raw = p.read_bytes()
        pix = raw.rfind(b"\xe0\x7f\x10\x00")
        out.append((f"pydicom/{p.name}", raw, (pix + 16) if pix > 0 else 2048))
    brain = DATA_DIR / "brain-mri"
    for cls in ("glioma", "no_tumor"):
        jpgs = sorted((brain / cls).glob("*.jpg"))[:1]
        for p in jpgs:
            raw = p.read_bytes()
            out.append((f"brain-mri/{cls}/{p.name}", raw, 1024))
            img = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_UNCHANGED)
            small = cv2.resize(img, (96, 96), interpolation=cv2.INTER_AREA)
            for ext, arr in ((".png", small), (".tiff", small),
                             (".png", (small.astype(np.uint16) * 257)),
                             (".tiff", (small.astype(np.uint16) * 257))):
                ok, buf = cv2.imencode(ext, arr)
                assert ok
                out.append((f"{p.stem}-{arr.dtype}{ext}", buf.tobytes(), 256))
    return out


CORPUS = _corpus() if (DATA_DIR / "dicom").is_dir() else []


@st.composite
def mutations(draw):
    name, raw, header = draw(st.sampled_from(CORPUS))
    data = bytearray(raw)
    ops = draw(st.lists(st.sampled_from(["flip", "flip", "set", "set", "insert", "delete", "dup",
                                         "truncate"]), min_size=1, max_size=8))

    start = 132 if raw[128:132] == b"DICM" else 8  # past the magic bytes, mostly

    def pos(n: int) -> int:
        if n <= 0:
            return 0
        where = draw(st.sampled_from(["header"] * 6 + ["anywhere"] * 3 + ["end"] * 2 + ["magic"]))
        if where == "header":  # the structure: element headers, lengths, image attributes
            return draw(st.integers(min(start, n - 1), max(min(start, n - 1), min(header, n) - 1)))
        if where == "end":
            return max(0, n - 1 - draw(st.integers(0, min(n - 1, 4096))))
        if where == "magic":
            return draw(st.integers(0, min(start, n) - 1))
        return draw(st.integers(0, n - 1))

    for op in ops:
        n = len(data)
        if op == "flip" and n:
            i = pos(n)
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and n:
            i = pos(n)
            value = draw(st.sampled_from([b"\x00", b"\xff", b"\xff\xff", b"\x00\x00\x00\x00",
                                          b"\xff\xff\xff\xff", b"\x7f", b"\x80", b"\x01\x00"])
                         | st.binary(min_size=1, max_size=4))
            data[i:i + len(value)] = value
        elif op == "truncate":
            del data[pos(n):]
        elif op == "insert":
            i = pos(n)
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete" and n:
            i = pos(n)
            del data[i:i + draw(st.integers(1, 64))]
        elif op == "dup" and n:
            i = pos(n)
            data[i:i] = data[i:i + draw(st.integers(1, 256))]
    return Case(bytes(data), f"{name}: {ops}")


@pytest.mark.skipif(not CORPUS, reason=f"test data not found: {DATA_DIR / 'dicom'}")
@FUZZ
@given(data=mutations(), frame=st.sampled_from([0, 0, 0, 1]))
def test_mutated_real_files(data: bytes, frame: int) -> None:
    check(data, frame)


@pytest.mark.skipif(not CORPUS, reason=f"test data not found: {DATA_DIR / 'dicom'}")
def test_unmutated_corpus_loads() -> None:
    """Control: the corpus itself loads, but for the 12-bit lossy JPEGs (unless decoded) and the
    non-images (a structured report, a DICOMDIR)."""
    not_images = ("MR1_JPLY", "JPEG-lossy", "reportsi", "DICOMDIR")
    for name, raw, _ in CORPUS:
        check(raw, must_load=not any(k in name for k in not_images))


@pytest.mark.parametrize("path", PYDICOM_FILES, ids=lambda p: p.name)
def test_pydicom_test_files(path: Path) -> None:
    """Every DICOM file pydicom ships for its own tests loads and preprocesses, or gets a typed
    error (reports, directories, deliberately broken files)."""
    check(path.read_bytes())


# ----------------------------------------------------------------------------- built DICOM

NATIVE = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian,
          DeflatedExplicitVRLittleEndian]
ENCAPSULATED = [RLELossless, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLosslessSV1, JPEGLSLossless,
                JPEG2000Lossless]
PHOTOMETRIC = ["MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422", "PALETTE COLOR",
               "YBR_RCT", "YBR_ICT", "ARGB", "", "garbage"]
DS_VALUES = ["1", "0", "-1", "0.5", "1000", "-1024", "1e30", "-1e30", "1e-30", "nan", "inf",
             "-inf", "abc", "", "1\\2", "40\\400\\80"]
TAMPER = {
    "Rows": st.sampled_from([0, 1, 2, 7, 64, 255, 512, 4096, 65535]),
    "Columns": st.sampled_from([0, 1, 2, 7, 64, 255, 512, 4096, 65535]),
    "BitsAllocated": st.sampled_from([0, 1, 7, 8, 12, 16, 24, 32, 64, 65535]),
    "BitsStored": st.sampled_from([0, 1, 8, 12, 16, 32, 64, 65535]),
    "HighBit": st.sampled_from([0, 7, 11, 15, 31, 63, 65535]),
    "SamplesPerPixel": st.sampled_from([0, 1, 2, 3, 4, 65535]),
    "PixelRepresentation": st.sampled_from([0, 1, 2]),
    "PlanarConfiguration": st.sampled_from([0, 1, 2]),
    "PhotometricInterpretation": st.sampled_from(PHOTOMETRIC),
    "NumberOfFrames": st.sampled_from(["0", "1", "2", "3", "300", "100000", "-1", "abc", ""]),
}


def _raw(ds: Dataset, keyword: str, vr: str, text: str) -> None:
    """Set ``keyword`` to ``text`` as it would be in the file, even if it is not a valid value
    (pydicom would refuse "abc" as a DS or IS when set normally)."""
    value = text.encode("ascii")
    value += b" " * (len(value) % 2)
    tag = Tag(keyword)
    ds[tag] = RawDataElement(tag, vr, len(value), value, 0, True, True)


def _encapsulate(frames: list[bytes]) -> bytes:
    """Encapsulated pixel data: an empty basic offset table, one item per frame (odd lengths
    left as they are), the sequence delimiter."""
    item = b"\xfe\xff\x00\xe0"
    out = [item + b"\x00\x00\x00\x00"]
    for f in frames:
        out.append(item + len(f).to_bytes(4, "little") + f)
    out.append(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00")
    return b"".join(out)


def _frame_bytes(rows: int, cols: int, samples: int, bits: int, photometric: str) -> int:
    if bits == 1:
        return (rows * cols * samples + 7) // 8
    n = rows * cols * samples * (bits // 8)
    if photometric == "YBR_FULL_422" and samples == 3:
        n = n * 2 // 3
    return n


@st.composite
def built_dicom(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    frames = draw(st.sampled_from([1, 1, 1, 2, 3]) | st.integers(1, 400))
    limit = 64 if frames < 10 else 16
    rows, cols = draw(st.integers(1, limit)), draw(st.integers(1, limit))
    samples = draw(st.sampled_from([1, 1, 3]))
    floating = draw(st.sampled_from([None] * 8 + ["FloatPixelData", "DoubleFloatPixelData"]))
    bits = (32 if floating == "FloatPixelData" else 64 if floating else
            draw(st.sampled_from([8, 16, 16, 1, 32, 64])))
    stored = bits if floating else draw(st.integers(1, bits))
    mono = ["MONOCHROME1", "MONOCHROME2", "MONOCHROME2", "PALETTE COLOR"]
    color = ["RGB", "RGB", "YBR_FULL", "YBR_FULL_422"]
    photometric = draw(st.sampled_from(mono if samples == 1 else color))
    syntax = draw(st.sampled_from(NATIVE * 2 + ENCAPSULATED)) if not floating else \
        draw(st.sampled_from(NATIVE))

    ds = new_dataset(syntax, modality=draw(st.sampled_from(["MR", "CT", "CR", "OT", "US", ""])))
    ds.Rows, ds.Columns = rows, cols
    if frames > 1 or draw(st.booleans()):
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = bits
    if not floating:
        ds.BitsStored, ds.HighBit = stored, stored - 1
        ds.PixelRepresentation = draw(st.sampled_from([0, 1]))
    if samples == 3:
        ds.PlanarConfiguration = draw(st.sampled_from([0, 1]))
    if photometric == "PALETTE COLOR" and draw(st.booleans()):
        n_lut = draw(st.sampled_from([0, 1, 16, 256]))
        lut = rng.integers(0, 65536, max(n_lut, 1), dtype=np.uint16)
        for c in ("Red", "Green", "Blue"):
            setattr(ds, f"{c}PaletteColorLookupTableDescriptor", [n_lut, 0, 16])
            setattr(ds, f"{c}PaletteColorLookupTableData", lut.tobytes())
    extras = {}
    for kw in ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth"):
        if draw(st.booleans()):
            extras[kw] = draw(st.sampled_from(DS_VALUES))
            _raw(ds, kw, "DS", extras[kw])
    if draw(st.integers(0, 5)) == 0:
        _raw(ds, "PixelSpacing", "DS", draw(st.sampled_from(["1\\1", "0\\0", "-1\\2", "nan\\1",
                                                             "x", "0.5", "1e400\\1"])))
    if draw(st.integers(0, 7)) == 0:
        item = Dataset()
        n_lut = draw(st.sampled_from([0, 1, 2, 256, 4096]))
        item.LUTDescriptor = [n_lut, draw(st.sampled_from([0, -100, 100])), draw(st.sampled_from([8, 16, 0]))]
        item.LUTData = rng.integers(0, 4096, max(1, min(n_lut, 4096)), dtype=np.uint16).tolist()
        ds.VOILUTSequence = [item]
    if draw(st.integers(0, 9)) == 0:
        item = Dataset()
        item.LUTDescriptor = [draw(st.sampled_from([0, 1, 256])), 0, 16]
        item.ModalityLUTType = "HU"
        item.LUTData = rng.integers(0, 4096, 256, dtype=np.uint16).tolist()
        ds.ModalityLUTSequence = [item]

    per_frame = _frame_bytes(rows, cols, samples, bits, photometric)
    if syntax in ENCAPSULATED:
        frag = draw(st.sampled_from(["random", "empty", "short"]))
        size = {"random": per_frame, "empty": 0, "short": max(1, per_frame // 4)}[frag]
        payloads = [rng.integers(0, 256, size, dtype=np.uint8).tobytes() for _ in range(frames)]
        if syntax == RLELossless and frag == "random" and draw(st.booleans()):
            # an RLE header with one segment at offset 64, then random run-length codes
            head = (1).to_bytes(4, "little") + (64).to_bytes(4, "little") + b"\x00" * 56
            payloads = [head + p for p in payloads]
        ds.PixelData = _encapsulate(payloads)
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    else:
        total = per_frame * frames
        delta = draw(st.sampled_from([0, 0, 0, 0, 1, -1, 2, -2, "half", "double", "none"]))
        n = {"half": total // 2, "double": total * 2, "none": 0}.get(delta, None)
        n = max(0, total + delta) if n is None else n
        n += n % 2  # even length, as DICOM requires
        pixels = rng.integers(0, 256, n, dtype=np.uint8)
        if floating:
            as_float = pixels[: n - n % (bits // 8)].view(np.float32 if bits == 32 else np.float64).copy()
            special = draw(st.sampled_from(["plain", "plain", "nan", "inf", "huge"]))
            as_float = np.nan_to_num(as_float, nan=0.0, posinf=1.0, neginf=-1.0)
            as_float = np.clip(as_float, -1e6, 1e6) if special == "plain" else as_float
            if special in ("nan", "inf") and as_float.size:
                as_float[rng.integers(0, as_float.size)] = np.nan if special == "nan" else np.inf
            if special == "huge" and as_float.size:
                as_float[rng.integers(0, as_float.size)] = np.finfo(as_float.dtype).max
            setattr(ds, floating, as_float.tobytes())
        else:
            ds.PixelData = pixels.tobytes()
            ds["PixelData"].VR = "OB" if bits <= 8 else "OW"

    # attributes made inconsistent with the pixel data after it was written
    tampered = []
    for kw in draw(st.lists(st.sampled_from(sorted(TAMPER)), max_size=3, unique=True)):
        if draw(st.integers(0, 4)) == 0:
            tampered.append(f"-{kw}")
            if kw in ds:
                del ds[kw]
        else:
            value = draw(TAMPER[kw])
            tampered.append(f"{kw}={value!r}")
            if kw == "NumberOfFrames":
                _raw(ds, kw, "IS", value)
            else:
                setattr(ds, kw, value)

    preamble = draw(st.sampled_from(["file", "file", "file", "bare"]))
    buf = io.BytesIO()
    old = pydicom.config.settings.writing_validation_mode
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if preamble == "file":
                ds.save_as(buf, enforce_file_format=True)
            else:  # no preamble, no file meta: a bare data set
                ds.save_as(buf, implicit_vr=syntax == ImplicitVRLittleEndian,
                           little_endian=syntax != ExplicitVRBigEndian)
    except Exception as exc:  # noqa: BLE001 - a combination pydicom itself cannot write
        note(f"pydicom cannot write it: {type(exc).__name__}: {exc}")
        assume(False)
    finally:
        pydicom.config.settings.writing_validation_mode = old
    frame = draw(st.sampled_from([0, 0, 0, 1]) | st.integers(0, frames))
    return Case(buf.getvalue(), f"{syntax.name} {rows}x{cols}x{frames} spp={samples} "
                f"bits={bits}/{stored} {photometric} float={floating} {preamble} {extras} {tampered}"), frame


@FUZZ
@given(case=built_dicom())
def test_built_dicom(case: tuple[bytes, int]) -> None:
    data, frame = case
    check(data, frame)


# ----------------------------------------------------------------------------- encoded rasters

#: (extension, dtype, channels) that a supported image format stores losslessly: these must load.
SUPPORTED = {(".png", d, c) for d in ("uint8", "uint16") for c in (1, 3, 4)} | \
            {(".tiff", d, c) for d in ("uint8", "uint16", "int8", "int16", "int32", "float32",
                                       "float64") for c in (1, 3, 4)} | \
            {(".jpg", "uint8", c) for c in (1, 3)} | {(".bmp", "uint8", c) for c in (1, 3, 4)}


@st.composite
def rasters(draw):
    ext = draw(st.sampled_from([".png", ".png", ".tiff", ".tiff", ".jpg", ".bmp"]))
    dtype = draw(st.sampled_from(["uint8", "uint8", "uint16", "uint16", "int8", "int16", "int32",
                                  "float32", "float64"]))
    channels = draw(st.sampled_from([1, 1, 2, 3, 3, 4]))
    shape = draw(st.sampled_from(["small", "small", "line", "tall", "one"]))
    h, w = {"small": (draw(st.integers(1, 64)), draw(st.integers(1, 64))),
            "line": (1, draw(st.integers(1, 2000))), "tall": (draw(st.integers(1, 2000)), 1),
            "one": (1, 1)}[shape]
    fill = draw(st.sampled_from(["random", "constant", "gradient", "extremes", "special"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    dt = np.dtype(dtype)
    lo, hi = ((np.iinfo(dt).min, np.iinfo(dt).max) if dt.kind in "iu" else (-1e6, 1e6))
    size = (h, w, channels)
    if fill == "random":
        arr = rng.uniform(lo, hi, size)
    elif fill == "constant":
        arr = np.full(size, rng.uniform(lo, hi))
    elif fill == "gradient":
        arr = np.broadcast_to(np.linspace(lo, hi, w)[None, :, None], size).copy()
    elif fill == "extremes":
        arr = rng.choice([lo, hi], size)
    else:
        arr = rng.uniform(0, 1, size)
        if dt.kind == "f":
            arr.flat[rng.integers(0, arr.size)] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    arr = arr.astype(dt) if dt.kind == "f" else np.clip(arr, lo, hi).astype(dt)
    if channels == 1:
        arr = arr[:, :, 0]
    try:
        ok, buf = cv2.imencode(ext, arr)
    except cv2.error:
        ok = False
    assume(ok)
    # the combination is stored as such (not converted by the encoder) and has no NaN/inf
    must = ((ext, dtype, channels) in SUPPORTED and np.isfinite(arr).all()
            and not (ext == ".bmp" and channels == 4))
    return Case(buf.tobytes(), f"{ext} {dtype} {channels}ch {h}x{w} {fill}"), must


@FUZZ
@given(case=rasters())
def test_encoded_rasters(case: tuple[bytes, bool]) -> None:
    data, must_load = case
    check(data, must_load=must_load)


def test_examples_setting() -> None:
    """The run size is what the environment asks for (the long run must really be long)."""
    assert FUZZ.max_examples == (int(_ENV) if _ENV else 300)
    assert FUZZ.derandomize == (_ENV is None)
    assert FUZZ.deadline is None
