"""Load any scan (DICOM, PNG, JPEG, TIFF, BMP) into a :class:`Scan`.

One entry point, :func:`load_scan`, takes a path or the bytes of an upload. The
format is recognised by content, never by the file name. DICOM is decoded by
pydicom and its pixel handlers (pylibjpeg, GDCM; compressed data in a limited
worker process, :mod:`medcls.decoder`); raster images by OpenCV. The header is
read first and the decode planned within a memory budget in bytes (full, or
reduced resolution, or refused) before any pixel is decoded; a per-process
semaphore caps concurrent decodes.

Patient data: the returned metadata is built from an allow-list of technical
attributes, so nothing of the DICOM PS3.15 basic profile (names, ids, dates,
institutions, UIDs, free-text descriptions) is ever in it. Error messages never
quote values from the file. :func:`identifying_attributes` reads the identifying
tags only when a caller asks for them deliberately.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import io
import logging
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Union

import numpy as np

from .errors import DecodeBudgetError, DecoderFailedError, ScanTooLargeError, UnreadableScanError

log = logging.getLogger(__name__)

#: Largest image medcls decodes, in pixels per frame (a 30000x30000 PNG is refused).
MAX_PIXELS = 64_000_000
#: Largest input file, in bytes.
MAX_FILE_BYTES = 1 << 30


# ----------------------------------------------------------------------------- memory budget
# The pixel limit alone does not bound memory: a 570 KB PNG of 7999x7999 RGB at 16 bits is under
# it but decodes to 384 MB, and its float32 working copies made it peak at 3.4 GB. So every
# decode is planned in bytes from the header first: at full resolution when it fits the budget,
# else at 1/2, 1/4 or 1/8 resolution where the format allows (the model needs ~224 px), else
# refused. The limits are settings (medcls.settings, section [decode]).

def _decode_settings():
    from .settings import load_settings

    return load_settings().decode


def decode_budget() -> int:
    """Bytes one decode may use: the decoded pixels plus the working copies preprocessing makes
    (setting ``MEDCLS_DECODE_BUDGET_MB`` / ``[decode] budget_mb``, default 1024)."""
    return int(_decode_settings().budget_mb * (1 << 20))


def max_concurrent_decodes() -> int:
    """Decodes one server process runs at once; more wait (``MEDCLS_MAX_DECODES``, default 2)."""
    return _decode_settings().max_concurrent


def decode_timeout() -> float:
    """Seconds a compressed DICOM frame may take to decode (``MEDCLS_DECODE_TIMEOUT_S``, 30)."""
    return _decode_settings().timeout_s


_slots_lock = threading.Lock()
_slots: threading.BoundedSemaphore | None = None


@contextlib.contextmanager
def decode_slot():
    """Hold one of the server's concurrent decode slots (a process-wide semaphore): with the
    per-decode budget, it bounds the memory decoding can take however many users upload."""
    global _slots
    with _slots_lock:
        if _slots is None:
            _slots = threading.BoundedSemaphore(max_concurrent_decodes())
        slots = _slots
    with slots:
        yield


def working_bytes(width: int, height: int, samples: int, bytes_per_sample: int,
                  extra_per_sample: int = 0) -> int:
    """Peak bytes of decoding one frame and preprocessing it: the decoded pixels; per sample the
    float32 modality values and the two float32 copies windowing holds at once (plus
    ``extra_per_sample``, e.g. a float64 rescale); per pixel the float32 grayscale image, the
    int32 component labels and uint8 masks of the foreground step."""
    per_sample = bytes_per_sample + 3 * 4 + extra_per_sample
    return int(width) * int(height) * (int(samples) * per_sample + 12)


@dataclass(frozen=True)
class DecodePlan:
    factor: int  # 1: full resolution; 2, 4, 8: each side divided by it
    samples: int  # samples per pixel to decode (1 when a colour image is decoded as gray)
    need: int  # bytes, as :func:`working_bytes` counts them


REDUCTIONS = (2, 4, 8)


def plan_decode(width: int, height: int, samples: int, bytes_per_sample: int,
                reduce: str | None = "after", gray_ok: bool = False, extra_per_sample: int = 0,
                budget: int | None = None) -> DecodePlan:
    """How to decode an image within the budget. ``reduce``: "decoder" when the decoder itself
    decodes at a reduced size (JPEG's DCT scaling: no full-size buffer), "after" when the frame
    is decoded at full size then downsampled before any float copy (PNG, TIFF, BMP through
    OpenCV; DICOM), None when it cannot be reduced. ``gray_ok``: the decoder can give one
    sample instead of three. Colour is kept before resolution. Raises :class:`DecodeBudgetError`
    naming the budget when nothing fits."""
    budget = decode_budget() if budget is None else budget
    full = working_bytes(width, height, samples, bytes_per_sample, extra_per_sample)
    if full <= budget:
        return DecodePlan(1, samples, full)
    for out_samples in ((samples, 1) if gray_ok and samples > 1 else (samples,)):
        first = width * height * out_samples * bytes_per_sample if reduce == "after" else 0
        for factor in REDUCTIONS if reduce else ():
            need = first + working_bytes(width // factor, height // factor, out_samples,
                                         bytes_per_sample, extra_per_sample)
            if need <= budget:
                return DecodePlan(factor, out_samples, need)
    raise DecodeBudgetError(
        f"Decoding this image ({width}x{height} pixels, {samples} x {8 * bytes_per_sample} bits) "
        f"would need about {full / 2**30:.1f} GB of memory, more than the decode budget of "
        f"{budget / 2**30:.2g} GB (MEDCLS_DECODE_BUDGET_MB)"
        + (", even at reduced resolution" if reduce else "") + "; it was not opened.")


def _rescaled_spacing(spacing: tuple[float, float] | None, full_shape: tuple[int, int] | None,
                      shape: tuple[int, int]) -> tuple[float, float] | None:
    """Pixel spacing of a frame decoded at reduced size: each decoded pixel covers
    full/decoded original pixels per axis, so lengths and areas in mm stay right."""
    if spacing is None or full_shape is None:
        return spacing
    return (spacing[0] * full_shape[0] / shape[0], spacing[1] * full_shape[1] / shape[1])

ScanInput = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]  # what load_scan reads

# Technical DICOM attributes safe to show (none is in the PS3.15 basic profile's
# list of attributes to remove or replace). Anything not listed is left out.
SAFE_DICOM_ATTRIBUTES = (
    "Modality", "BodyPartExamined", "ImageType", "Manufacturer", "ManufacturerModelName",
    "MagneticFieldStrength", "ScanningSequence", "SequenceVariant", "MRAcquisitionType",
    "RepetitionTime", "EchoTime", "InversionTime", "FlipAngle", "KVP", "ExposureTime",
    "SliceThickness", "SpacingBetweenSlices", "PixelSpacing", "ImagerPixelSpacing",
    "Rows", "Columns", "NumberOfFrames", "BitsAllocated", "BitsStored", "HighBit",
    "PixelRepresentation", "SamplesPerPixel", "PhotometricInterpretation",
    "RescaleSlope", "RescaleIntercept", "RescaleType", "WindowCenter", "WindowWidth",
    "SeriesNumber", "InstanceNumber", "AcquisitionNumber", "ImagePositionPatient",
    "ImageOrientationPatient", "SliceLocation", "PatientPosition", "ViewPosition",
    "ContrastBolusAgent", "LossyImageCompression",
)

# Identifying attributes (PS3.15 Annex E basic profile: patient, person, institution,
# date and identifier attributes). Shown only on explicit request, never stored.
IDENTIFYING_ATTRIBUTES = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime", "PatientSex",
    "PatientAge", "PatientWeight", "PatientSize", "PatientAddress", "PatientTelephoneNumbers",
    "OtherPatientIDs", "OtherPatientNames", "PatientMotherBirthName", "EthnicGroup",
    "MilitaryRank", "Occupation", "AdditionalPatientHistory", "PatientComments",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "StationName",
    "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName",
    "NameOfPhysiciansReadingStudy", "PhysiciansOfRecord", "RequestingPhysician",
    "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "StudyTime", "SeriesTime",
    "AcquisitionTime", "ContentTime", "AccessionNumber", "StudyID", "StudyDescription",
    "SeriesDescription", "ProtocolName", "DeviceSerialNumber", "StudyInstanceUID",
    "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID",
)


@dataclass(frozen=True, eq=False)
class Scan:
    """One decoded frame of a scan with its de-identified description.

    ``pixels`` are the stored values of the chosen frame exactly as decoded (no
    rescale, no windowing): shape (H, W) for grayscale or (H, W, 3) for colour.
    ``values`` are the same after the modality LUT (rescale slope and intercept,
    e.g. Hounsfield units for CT), as float32.
    """

    pixels: np.ndarray
    values: np.ndarray = field(repr=False)
    source_format: str  # "dicom", "png", "jpeg", "tiff", "bmp"
    modality: str  # DICOM modality, "OT" for plain images
    photometric: str  # "MONOCHROME1", "MONOCHROME2", "RGB"
    bits_stored: int
    pixel_spacing: tuple[float, float] | None  # (row, column) in mm
    window_center: float
    window_width: float
    window_source: str  # "dicom" (from the file's VOI tags) or "percentile"
    n_frames: int
    frame: int
    metadata: dict[str, Any]
    sha256: str
    transfer_syntax: str | None = None
    window_presets: dict[str, tuple[float, float]] = field(default_factory=dict)
    # (H, W) of the file's frame when it was decoded at reduced resolution to stay within the
    # decode budget (pixel_spacing is then that of the decoded pixels); None at full resolution
    full_shape: tuple[int, int] | None = None
    _voi_lut_display: np.ndarray | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.pixels.shape[0]), int(self.pixels.shape[1])

    @property
    def is_color(self) -> bool:
        return self.pixels.ndim == 3

    @property
    def nbytes(self) -> int:
        """Memory the scan holds: pixels, modality values and a VOI LUT display copy."""
        extra = self._voi_lut_display.nbytes if self._voi_lut_display is not None else 0
        return int(self.pixels.nbytes + self.values.nbytes + extra)

    @property
    def short_id(self) -> str:
        """A non-identifying handle for logs: the first 12 hex digits of the content hash."""
        return self.sha256[:12]

    def __repr__(self) -> str:  # never print metadata values by accident
        return (f"Scan({self.source_format}, {self.modality}, {self.shape[1]}x{self.shape[0]}, "
                f"frame {self.frame + 1}/{self.n_frames}, sha256={self.short_id})")


# ----------------------------------------------------------------------------- plane

PLANES = ("sagittal", "coronal", "axial")  # the LPS axis (x, y, z) the slice normal follows
#: A slice whose normal's main axis carries less than this share (|cosine|) is oblique.
OBLIQUE_BELOW = 0.9


def slice_normal(orientation) -> np.ndarray | None:
    """The unit normal of a slice from its ImageOrientationPatient (row and column direction
    cosines, 6 values): their cross product; None when the values are missing or degenerate."""
    try:
        v = np.asarray([float(c) for c in orientation], np.float64)
    except (TypeError, ValueError):
        return None
    if v.shape != (6,):
        return None
    n = np.cross(v[:3], v[3:])
    norm = float(np.linalg.norm(n))
    if not np.isfinite(n).all() or norm < 1e-6:
        return None
    return n / norm


def plane_of_normal(normal) -> tuple[str | None, bool]:
    """(plane, oblique) of a slice normal: axial, coronal or sagittal by the normal's main
    axis, oblique when that axis carries less than :data:`OBLIQUE_BELOW` of it. The one rule
    for planes: single scans (:func:`scan_plane`, the card's scope) and series (medcls.study)
    both decide here."""
    if normal is None:
        return None, False
    n = np.asarray(normal, np.float64)
    norm = float(np.linalg.norm(n))
    if n.shape != (3,) or not np.isfinite(n).all() or norm < 1e-6:
        return None, False
    n = n / norm
    axis = int(np.argmax(np.abs(n)))
    return PLANES[axis], float(abs(n[axis])) < OBLIQUE_BELOW


def scan_plane(scan: "Scan") -> str | None:
    """Axial, coronal or sagittal from a DICOM's ImageOrientationPatient (the slice normal's
    main axis); None for plain images and DICOM without orientation."""
    return plane_of_normal(slice_normal(scan.metadata.get("ImageOrientationPatient")))[0]


# ----------------------------------------------------------------------------- input

def _read_source(src: ScanInput) -> bytes:
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
    elif isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.is_file():
            raise UnreadableScanError("The file does not exist or is not a regular file.")
        if path.stat().st_size > MAX_FILE_BYTES:
            raise ScanTooLargeError("The file is larger than the 1 GB medcls accepts.")
        data = path.read_bytes()
    elif hasattr(src, "read"):
        if hasattr(src, "seek"):
            src.seek(0)
        data = src.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            raise ScanTooLargeError("The file is larger than the 1 GB medcls accepts.")
    else:
        raise UnreadableScanError("Expected a file path or the bytes of a file.")
    if len(data) == 0:
        raise UnreadableScanError("The file is empty (0 bytes).")
    return data


def sniff_format(data: bytes) -> str | None:
    """Recognise the container by its first bytes: 'dicom', 'png', 'jpeg', 'tiff', 'bmp' or None."""
    head = data[:132]
    # The 128-byte DICOM preamble may itself hold a TIFF header (dual-format files), so the
    # DICM marker is checked first.
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head.startswith(b"BM") and len(data) > 26:
        return "bmp"
    # A DICOM data set without preamble starts with an element of group 0002 or 0008
    # (explicit or implicit VR little endian), as dcmtk recognises it.
    if len(data) >= 8 and data[0:2] in (b"\x02\x00", b"\x08\x00") and data[3:4] == b"\x00":
        return "dicom"
    return None


def load_scan(src: ScanInput, frame: int = 0) -> Scan:
    """Load a scan from a path, bytes or a binary file object.

    ``frame`` selects one frame of a multi-frame DICOM; only that frame is decoded.
    Raises :class:`UnreadableScanError` (or :class:`ScanTooLargeError`) with a
    reason a doctor understands for anything that is not a readable scan.
    """
    data = _read_source(src)
    fmt = sniff_format(data)
    digest = hashlib.sha256(data).hexdigest()
    if fmt is None:
        raise UnreadableScanError("This file is not an image or DICOM file medcls can read "
                                  "(supported: DICOM, PNG, JPEG, TIFF, BMP).")
    with decode_slot():
        if fmt == "dicom":
            scan = _load_dicom(data, frame, digest)
        else:
            scan = _load_raster(data, fmt, digest)
    log.debug("loaded %r", scan)
    return scan


# ----------------------------------------------------------------------------- raster

def _raster_size(data: bytes, fmt: str | None = None) -> tuple[int, int, int, int, int]:
    """Width, height, frame count, samples per pixel and bytes per sample from the header alone
    (Pillow reads no pixels here); samples and bytes are what OpenCV decodes to, at most.

    Pillow cannot open every TIFF OpenCV decodes (float64, or 3-4 samples of int16/float32):
    for those the first image directory is read directly (:func:`_tiff_size`)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Image.MAX_IMAGE_PIXELS = None  # our own limit applies, checked below
            with Image.open(io.BytesIO(data)) as im:
                return (int(im.size[0]), int(im.size[1]), int(getattr(im, "n_frames", 1)),
                        *_raster_layout(im, data, fmt))
    except (ScanTooLargeError, DecodeBudgetError):
        raise
    except Exception as exc:  # noqa: BLE001 - any failure means a damaged header
        log.debug("image header unreadable: %s", type(exc).__name__)
        size = _tiff_size(data) if fmt == "tiff" else None
        if size is not None:
            return size
        raise UnreadableScanError("The image file is damaged: its header cannot be read.") from None


# Samples per pixel and bytes per sample OpenCV decodes a Pillow mode to (palette -> BGR,
# gray+alpha -> BGRA); unknown modes count as the most a raster can hold.
_PIL_LAYOUT = {"1": (1, 1), "L": (1, 1), "P": (3, 1), "PA": (4, 1), "LA": (4, 1),
               "RGB": (3, 1), "RGBA": (4, 1), "RGBX": (4, 1), "CMYK": (4, 1), "YCbCr": (3, 1),
               "LAB": (3, 1), "HSV": (3, 1), "I": (1, 4), "F": (1, 4)}
_PNG_SAMPLES = {0: 1, 2: 3, 3: 3, 4: 4, 6: 4}  # by IHDR colour type


def _raster_layout(im, data: bytes, fmt: str | None) -> tuple[int, int]:
    if fmt == "png" and data[12:16] == b"IHDR" and len(data) > 25:
        # Pillow opens a 48-bit PNG as 8-bit "RGB": the IHDR says what the decoder will produce
        return _PNG_SAMPLES.get(data[25], 4), 2 if data[24] == 16 else 1
    if fmt == "tiff":
        tags = getattr(im, "tag_v2", {})
        bits = tags.get(258, 8)
        bits = max(bits) if isinstance(bits, tuple) else bits
        return max(1, int(tags.get(277, 1))), max(1, -(-int(bits) // 8))
    if im.mode.startswith("I;16"):
        return 1, 2
    return _PIL_LAYOUT.get(im.mode, (4, 4))


_TIFF_TYPES = {3: ("H", 2), 4: ("I", 4), 16: ("Q", 8)}  # SHORT, LONG, LONG8 (BigTIFF)


def _tiff_size(data: bytes) -> tuple[int, int, int, int, int] | None:
    """(width, height, 1, samples, bytes per sample) from the first image directory of a TIFF, or None when it is not
    readable. Refused (ScanTooLargeError) when the declared samples would decode to more bytes
    than the largest PNG medcls accepts (MAX_PIXELS of 4 samples of 16 bits)."""
    import struct

    try:
        order = {b"II": "<", b"MM": ">"}[data[:2]]
        magic = struct.unpack(order + "H", data[2:4])[0]
        if magic == 42:
            offset = struct.unpack(order + "I", data[4:8])[0]
            count_fmt, entry_size, value_size = "H", 12, 4
        elif magic == 43:  # BigTIFF
            offset = struct.unpack(order + "Q", data[8:16])[0]
            count_fmt, entry_size, value_size = "Q", 20, 8
        else:
            return None
        n_size = struct.calcsize(count_fmt)
        n = struct.unpack(order + count_fmt, data[offset:offset + n_size])[0]
        tags: dict[int, int] = {}
        for i in range(min(int(n), 4096)):
            e = offset + n_size + i * entry_size
            tag, typ = struct.unpack(order + "HH", data[e:e + 4])
            if tag in (256, 257, 258, 277) and typ in _TIFF_TYPES:
                code, size = _TIFF_TYPES[typ]
                count_size = value_size
                count = struct.unpack(order + ("I" if count_size == 4 else "Q"),
                                      data[e + 4:e + 4 + count_size])[0]
                value_at = e + 4 + count_size
                if count * size > value_size:  # stored elsewhere: the first value is enough
                    pointer = struct.unpack(order + ("I" if value_size == 4 else "Q"),
                                            data[value_at:value_at + value_size])[0]
                    value_at = pointer
                tags[tag] = struct.unpack(order + code, data[value_at:value_at + size])[0]
        width, height = int(tags[256]), int(tags[257])
    except (KeyError, struct.error, IndexError, ValueError, OverflowError):
        return None
    bits, samples = int(tags.get(258, 8)), int(tags.get(277, 1))
    if width * height * max(1, samples) * max(1, bits) > MAX_PIXELS * 4 * 16:
        raise ScanTooLargeError(f"The image declares {width}x{height} pixels of {samples} "
                                f"x {bits} bits, more than medcls decodes; it was not opened.")
    return width, height, 1, max(1, samples), max(1, -(-bits // 8))


def _load_raster(data: bytes, fmt: str, digest: str) -> Scan:
    import cv2

    width, height, _, samples, sample_bytes = _raster_size(data, fmt)
    if width * height > MAX_PIXELS:
        raise ScanTooLargeError(
            f"The image declares {width}x{height} pixels, more than medcls decodes "
            f"({MAX_PIXELS // 1_000_000} megapixels); it was not opened.")
    if width < 1 or height < 1:
        raise UnreadableScanError("The image has no pixels.")
    plan = plan_decode(width, height, samples, sample_bytes,
                       reduce="decoder" if fmt == "jpeg" else "after", gray_ok=True)
    img = _decode_raster(data, plan)
    if img is None or img.size == 0:
        raise UnreadableScanError("The image file is damaged and cannot be decoded.")
    full_shape = (height, width) if plan.factor > 1 else None
    if img.dtype not in (np.uint8, np.uint16):
        img = img.astype(np.float32)
    if img.ndim == 3:
        if img.shape[2] == 1:
            img = img[:, :, 0]
        elif img.shape[2] == 4:  # drop alpha, BGRA -> RGB
            img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
        else:
            img = cv2.cvtColor(img[:, :, :3], cv2.COLOR_BGR2RGB)
        if img.ndim == 3 and _is_gray(img):
            img = np.ascontiguousarray(img[:, :, 0])
    photometric = "RGB" if img.ndim == 3 else "MONOCHROME2"
    bits = 16 if img.dtype == np.uint16 else 8 if img.dtype == np.uint8 else 32
    values = _finite_values(img.astype(np.float32))
    center, width_ = _percentile_window(values)
    metadata = {"Format": fmt.upper(), "Rows": height, "Columns": width, "BitsStored": bits,
                "PhotometricInterpretation": photometric, **_reduction_note(full_shape, img)}
    return Scan(
        pixels=img, values=values, source_format=fmt, modality="OT", photometric=photometric,
        bits_stored=bits, pixel_spacing=None, window_center=center, window_width=width_,
        window_source="percentile", n_frames=1, frame=0, metadata=metadata, sha256=digest,
        full_shape=full_shape,
    )


def _decode_raster(data: bytes, plan: DecodePlan):
    """OpenCV decode at the plan's resolution. Reduced: ``IMREAD_REDUCED_*`` (libjpeg scales in
    the DCT; other formats are resized inside OpenCV, in the decoded depth), keeping 16 bits
    (``ANYDEPTH``) and the stored orientation like ``IMREAD_UNCHANGED`` does."""
    import cv2

    buf = np.frombuffer(data, dtype=np.uint8)
    if plan.factor == 1:
        return cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    kind = "COLOR" if plan.samples > 1 else "GRAYSCALE"
    flags = (getattr(cv2, f"IMREAD_REDUCED_{kind}_{plan.factor}") | cv2.IMREAD_ANYDEPTH
             | cv2.IMREAD_IGNORE_ORIENTATION)
    return cv2.imdecode(buf, flags)


def _reduction_note(full_shape: tuple[int, int] | None, pixels: np.ndarray) -> dict[str, str]:
    if full_shape is None:
        return {}
    return {"DecodedSize": f"{pixels.shape[1]}x{pixels.shape[0]} of {full_shape[1]}x"
                           f"{full_shape[0]} (reduced to stay within the decode budget)"}


#: Modality values are clamped to +-this: far beyond any real scan, and small enough that
#: windowing arithmetic in float32 cannot overflow to inf (and inf - inf to NaN).
_VALUE_LIMIT = 1e30


def _finite_values(values: np.ndarray) -> np.ndarray:
    """``values`` (float32) with NaN/inf replaced by the finite extremes and clamped to
    +-_VALUE_LIMIT, so windows and model inputs stay finite. A float image (TIFF, DICOM float
    pixel data) may hold NaN for masked pixels; a broken rescale may give inf. Refused when not
    one value is finite: there is no image to show."""
    finite = np.isfinite(values)
    if not finite.all():
        if not finite.any():
            raise UnreadableScanError("The image holds no valid pixel values (all are "
                                      "not-a-number or infinite).")
        lo, hi = float(values[finite].min()), float(values[finite].max())
        values = np.nan_to_num(values, nan=lo, posinf=hi, neginf=lo)
    if values.size and (float(values.min()) < -_VALUE_LIMIT or float(values.max()) > _VALUE_LIMIT):
        values = np.clip(values, -_VALUE_LIMIT, _VALUE_LIMIT)
    return np.ascontiguousarray(values, dtype=np.float32)


def _is_gray(rgb: np.ndarray) -> bool:
    """True when the three channels are (nearly) equal: a grayscale image stored as colour."""
    # float64: an int16 cast wrapped uint16 values above 32767 (and NaN of float images)
    sample = rgb[:: max(1, rgb.shape[0] // 64), :: max(1, rgb.shape[1] // 64)].astype(np.float64)
    return bool(np.abs(sample[..., 0] - sample[..., 1]).max() <= 2
                and np.abs(sample[..., 1] - sample[..., 2]).max() <= 2)


def _percentile_window(values: np.ndarray, lo: float = 0.5, hi: float = 99.5) -> tuple[float, float]:
    gray = values if values.ndim == 2 else values.mean(axis=2)
    sample = gray[:: max(1, gray.shape[0] // 256), :: max(1, gray.shape[1] // 256)]
    p_lo, p_hi = (float(p) for p in np.percentile(sample.astype(np.float64), [lo, hi]))
    if p_hi <= p_lo:
        p_lo, p_hi = float(gray.min()), float(gray.max())
    width = max(float(p_hi - p_lo), 1e-6)
    return float(p_lo + width / 2), width


# ----------------------------------------------------------------------------- DICOM

def _configure_pydicom() -> None:
    import pydicom.config

    # pydicom's validation warnings and decoder error logs can quote element values
    # (names, dates): medcls reports its own typed error instead, so they are silenced.
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)


def _read_dataset(data: bytes, stop_before_pixels: bool = False):
    import pydicom

    _configure_pydicom()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(io.BytesIO(data), force=True,
                                   stop_before_pixels=stop_before_pixels)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types; never echo values
        log.debug("DICOM parse failed: %s", type(exc).__name__)
        raise UnreadableScanError("The DICOM file is damaged and cannot be read.") from None


def _first(value: Any) -> Any:
    if value is None:
        return None
    try:
        from pydicom.multival import MultiValue

        if isinstance(value, (MultiValue, list, tuple)):
            return value[0] if len(value) else None
    except ImportError:  # pragma: no cover
        pass
    return value


def _to_python(value: Any) -> Any:
    from pydicom.multival import MultiValue
    from pydicom.valuerep import DSfloat, IS

    if isinstance(value, (MultiValue, list, tuple)):
        return [_to_python(v) for v in value]
    if isinstance(value, DSfloat):
        return float(value)
    if isinstance(value, IS):
        return int(value)
    if isinstance(value, (int, float, str)):
        return value
    return str(value)


def _safe_metadata(ds) -> dict[str, Any]:
    meta: dict[str, Any] = {"Format": "DICOM"}
    for keyword in SAFE_DICOM_ATTRIBUTES:
        try:
            if keyword in ds:
                value = ds[keyword].value
                if value is not None and value != "":
                    meta[keyword] = _to_python(value)
        except Exception:  # noqa: BLE001 - a malformed element is left out
            continue
    try:
        meta["TransferSyntax"] = ds.file_meta.TransferSyntaxUID.name
    except Exception:  # noqa: BLE001
        pass
    try:
        meta["SOPClass"] = ds.SOPClassUID.name
    except Exception:  # noqa: BLE001
        pass
    return meta


def identifying_attributes(src: ScanInput) -> dict[str, str]:
    """The identifying DICOM attributes of a file, for a deliberate "show identifying tags" view.

    Callers must not log, store or export the result. Plain images have none.
    """
    data = _read_source(src)
    if sniff_format(data) != "dicom":
        return {}
    ds = _read_dataset(data, stop_before_pixels=True)
    out: dict[str, str] = {}
    for keyword in IDENTIFYING_ATTRIBUTES:
        try:
            if keyword in ds and ds[keyword].value not in (None, ""):
                out[keyword] = str(ds[keyword].value)
        except Exception:  # noqa: BLE001
            continue
    return out


_MODALITY_PRESETS: dict[str, dict[str, tuple[float, float]]] = {
    "CT": {"Brain": (40, 80), "Subdural": (75, 215), "Stroke": (40, 40), "Bone": (400, 1800),
           "Lung": (-600, 1500), "Soft tissue": (50, 400), "Liver": (30, 150)},
}


def _window_presets(modality: str, values: np.ndarray) -> dict[str, tuple[float, float]]:
    presets = dict(_MODALITY_PRESETS.get(modality, {}))
    gray = values if values.ndim == 2 else values.mean(axis=2)
    for name, (lo, hi) in {"Full range": (0.0, 100.0), "Percentile 1-99": (1.0, 99.0),
                           "Percentile 0.5-99.5": (0.5, 99.5)}.items():
        c, w = _percentile_window(gray, lo, hi)
        presets[name] = (c, w)
    return presets


def _load_dicom(data: bytes, frame: int, digest: str) -> Scan:
    """One DICOM frame as a Scan, in steps: read the data set, check the declared size against
    the limits and plan the decode within the budget, decode the one frame (compressed data in a
    limited worker process), reduce it if the plan says so, apply the modality LUT, choose the
    default window and read the pixel spacing (rescaled with the frame)."""
    ds = _read_image_dataset(data)
    rows, cols, n_frames, samples, sample_bytes = _image_geometry(ds, frame)
    # a float64 rescale (apply_modality_lut) is the extra working copy per sample
    plan = plan_decode(cols, rows, samples, sample_bytes, reduce="after", extra_per_sample=8)
    syntax = _transfer_syntax(ds)
    arr = _checked_frame(_decode_frame(ds, data, frame, n_frames, syntax), rows, cols, n_frames,
                         frame)
    full_shape = None
    if plan.factor > 1:
        arr, full_shape = _reduce(arr, plan.factor), (rows, cols)
    photometric, values = _modality_values(ds, arr)
    center, width, window_source, voi_display = _default_window(ds, arr, values)
    spacing = _rescaled_spacing(_pixel_spacing(ds), full_shape, arr.shape[:2])
    try:
        bits = int(ds.BitsStored)
    except Exception:  # noqa: BLE001
        bits = int(arr.dtype.itemsize * 8)
    modality = str(getattr(ds, "Modality", "OT") or "OT")
    presets = _window_presets(modality, values)
    if window_source == "dicom" and voi_display is None:
        presets = {"DICOM default": (center, width), **presets}
    return Scan(
        pixels=arr, values=values, source_format="dicom", modality=modality,
        photometric=photometric, bits_stored=bits, pixel_spacing=spacing,
        window_center=float(center), window_width=float(width), window_source=window_source,
        n_frames=n_frames, frame=frame,
        metadata={**_safe_metadata(ds), **_reduction_note(full_shape, arr)}, sha256=digest,
        transfer_syntax=syntax.name if syntax is not None else None,
        window_presets=presets, full_shape=full_shape, _voi_lut_display=voi_display,
    )


def _read_image_dataset(data: bytes):
    """The parsed data set, refused unless it holds pixel data (with why: cut short, damaged, or
    not an image at all)."""
    ds = _read_dataset(data)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        if _is_cut_short(ds):
            raise UnreadableScanError("The DICOM file is incomplete: it ends before its image "
                                      "data (an interrupted copy or upload?). Copy it again.")
        if b"\xe0\x7f\x10\x00" in data or b"\x7f\xe0\x00\x10" in data:
            # the Pixel Data tag is there but pydicom could not read the element: compressed
            # (encapsulated) pixel data cut short, or its item structure damaged
            raise UnreadableScanError("The DICOM file is incomplete or damaged: its image data is "
                                      "cut short or unreadable (an interrupted copy or upload?). "
                                      "Copy it again.")
        raise UnreadableScanError("The DICOM file has no pixel data (it may be a report, "
                                  "a directory or a presentation state, not an image).")
    _infer_transfer_syntax(ds)
    return ds


def _image_geometry(ds, frame: int) -> tuple[int, int, int, int, int]:
    """Rows, columns, frame count, samples per pixel and bytes per sample as declared, checked
    against the pixel limit and the frame asked for. Samples and bytes only size the decode plan
    (an inconsistent declaration fails at decoding, with its own message)."""
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        n_frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    except Exception:  # noqa: BLE001
        raise UnreadableScanError("The DICOM image size attributes (Rows, Columns) are "
                                  "missing or invalid.") from None
    if rows < 1 or cols < 1 or n_frames < 1:
        raise UnreadableScanError("The DICOM image size attributes (Rows, Columns) are invalid.")
    if rows * cols > MAX_PIXELS:
        raise ScanTooLargeError(f"The DICOM image declares {cols}x{rows} pixels, more than "
                                f"medcls decodes ({MAX_PIXELS // 1_000_000} megapixels).")
    if not 0 <= frame < n_frames:
        raise UnreadableScanError(f"Frame {frame + 1} was asked for, but the file has "
                                  f"{n_frames} frame(s).")
    try:
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.get("BitsAllocated", 16) or 16)
    except Exception:  # noqa: BLE001
        samples, bits = 1, 16
    if "DoubleFloatPixelData" in ds:
        bits = 64
    elif "FloatPixelData" in ds:
        bits = 32
    sample_bytes = -(-bits // 8) if bits in (1, 8, 16, 32, 64) else 2
    return rows, cols, n_frames, samples if samples in (1, 3) else 1, sample_bytes


def _transfer_syntax(ds):
    try:
        return ds.file_meta.TransferSyntaxUID
    except Exception:  # noqa: BLE001
        return None


def _is_encapsulated(ds) -> bool:
    """True for compressed (encapsulated) pixel data: undefined length, split into fragments."""
    try:
        return "PixelData" in ds and bool(ds["PixelData"].is_undefined_length)
    except Exception:  # noqa: BLE001
        return False


_DAMAGED_PIXELS = ("The DICOM pixel data is damaged or does not match the image size it "
                   "declares (rows, columns, bits).")

_pool_lock = threading.Lock()
_pool = None


def _decoder_pool():
    global _pool
    with _pool_lock:
        if _pool is None:
            from .decoder import DecoderPool

            _pool = DecoderPool(max_concurrent_decodes())
            atexit.register(_pool.close)
        return _pool


def _decode_frame(ds, data: bytes, frame: int, n_frames: int, syntax) -> np.ndarray:
    """The stored values of one frame. Compressed (encapsulated) data is decoded by a worker
    process with a memory and time limit (:mod:`medcls.decoder`), so a decoder's crash, hang or
    runaway allocation is a :class:`DecoderFailedError`, not the end of the server; native
    (uncompressed) data is read here, where it is plain numpy."""
    from pydicom.pixels import pixel_array

    from .decoder import DecodeFailure

    _check_compressed_pixel_attributes(ds, syntax)
    compressed = syntax is not None and bool(getattr(syntax, "is_compressed", False))
    try:
        if _is_encapsulated(ds):
            return _decoder_pool().decode(data, frame, n_frames, decode_budget(),
                                          decode_timeout())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pixel_array(ds, index=frame) if n_frames > 1 else ds.pixel_array
    except DecoderFailedError:
        raise
    except DecodeFailure as exc:  # the worker's decoders refused the data
        if exc.kind == "notimplemented" or (exc.kind == "unsupported" and compressed):
            raise UnreadableScanError(_codec_message(syntax)) from None
        raise UnreadableScanError(_DAMAGED_PIXELS) from None
    except NotImplementedError:
        raise UnreadableScanError(_codec_message(syntax)) from None
    except Exception as exc:  # noqa: BLE001
        log.debug("DICOM pixel decode failed: %s", type(exc).__name__)
        if compressed and _is_unsupported_codec(exc):
            raise UnreadableScanError(_codec_message(syntax)) from None
        raise UnreadableScanError(_DAMAGED_PIXELS) from None
    except BaseException as exc:
        # A Rust decoder (pylibjpeg-rle) that panics on damaged data raises pyo3's
        # PanicException, a BaseException that `except Exception` lets through.
        if type(exc).__name__ != "PanicException":
            raise
        log.debug("DICOM pixel decoder panicked")
        raise UnreadableScanError(_DAMAGED_PIXELS) from None


def _checked_frame(arr: np.ndarray, rows: int, cols: int, n_frames: int, frame: int) -> np.ndarray:
    """The decoded frame in native byte order, refused unless it is (rows, cols) or (rows, cols, 3)."""
    if arr.ndim == 3 and n_frames > 1 and arr.shape[0] == n_frames:
        arr = arr[frame]
    if not arr.dtype.isnative:  # Explicit VR Big Endian decodes to '>u2': same values, native order
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.ndim not in (2, 3) or arr.size == 0 or arr.shape[0] != rows or arr.shape[1] != cols:
        raise UnreadableScanError("The DICOM pixel data does not match the image size it declares.")
    if arr.ndim == 3 and arr.shape[2] not in (3,):
        raise UnreadableScanError("The DICOM pixel layout is not supported (expected grayscale "
                                  "or RGB).")
    return arr


def _reduce(arr: np.ndarray, factor: int) -> np.ndarray:
    """A decoded frame with each side divided by ``factor``, before any float copy is made: the
    area average where OpenCV resizes the type, else every ``factor``-th pixel."""
    import cv2

    h, w = arr.shape[:2]
    size = (max(1, w // factor), max(1, h // factor))
    if arr.dtype in (np.uint8, np.uint16, np.int16, np.float32, np.float64):
        return cv2.resize(arr, size, interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(arr[::factor, ::factor][:size[1], :size[0]])


def _modality_values(ds, arr: np.ndarray) -> tuple[str, np.ndarray]:
    """Photometric interpretation and the modality values (rescale or modality LUT applied) as
    finite float32; a broken rescale falls back to the stored values."""
    from pydicom.pixels import apply_modality_lut

    rows, cols = arr.shape[:2]
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2")
    with np.errstate(over="ignore", invalid="ignore"):  # float64 data or a rescale beyond float32
        if arr.ndim == 3:
            photometric = "RGB"
            values = arr.astype(np.float32)
        else:
            try:
                values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
            except Exception:  # noqa: BLE001 - a broken rescale: use stored values
                values = arr.astype(np.float32)
        if values.shape[:2] != (rows, cols) or (arr.dtype.kind in "iu"
                                                and not np.isfinite(values).all()):
            values = arr.astype(np.float32)  # a rescale of NaN/inf: use stored values
    return photometric, _finite_values(values)


def _default_window(ds, arr: np.ndarray, values: np.ndarray):
    """(center, width, source, VOI LUT display): the file's own VOI (window tags, or a VOI LUT
    applied for display), else percentiles of the values."""
    from pydicom.pixels import apply_voi_lut

    voi_display = None
    center = width = None
    window_source = "percentile"
    if arr.ndim == 2:
        try:
            wc, ww = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
            if (wc is not None and ww is not None and float(ww) > 0
                    and abs(float(wc)) < _VALUE_LIMIT and float(ww) < _VALUE_LIMIT):
                center, width, window_source = float(wc), float(ww), "dicom"
            elif "VOILUTSequence" in ds:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    out = np.asarray(apply_voi_lut(arr, ds), dtype=np.float32)
                lo, hi = float(out.min()), float(out.max())
                if hi > lo:
                    voi_display = (out - lo) / (hi - lo)
                    window_source = "dicom"
        except Exception:  # noqa: BLE001
            center = width = None
    if center is None:
        center, width = _percentile_window(values)
    return center, width, window_source, voi_display


def _pixel_spacing(ds) -> tuple[float, float] | None:
    """(row, column) spacing in mm from PixelSpacing, else ImagerPixelSpacing; None when absent."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            sp = ds.get(keyword)
            if sp is not None and len(sp) == 2 and float(sp[0]) > 0 and float(sp[1]) > 0:
                return float(sp[0]), float(sp[1])
        except Exception:  # noqa: BLE001
            continue
    return None


#: RLE Lossless: the one compressed transfer syntax that allows 32 and 64 bits allocated (the
#: JPEG family, JPEG-LS and JPEG 2000 carry 8 or 16); decoded by pydicom and pylibjpeg-rle only.
_RLE = "1.2.840.10008.1.2.5"


def _check_compressed_pixel_attributes(ds, syntax) -> None:
    """Refuse compressed pixel data whose image description no codec can honour, before any
    decoder sees it, with a message that says so. GDCM (a fallback decoder) aborts its process
    (C++ terminate) on, e.g., JPEG data declaring 1 or 32 bits allocated; the decoding worker
    process (:mod:`medcls.decoder`) is what keeps such an abort, or any other, from stopping
    the server: this check only names the cause for the cases fuzzing found."""
    if not _is_encapsulated(ds):
        return

    def number(keyword: str, default: int | None = None) -> int | None:
        try:
            value = ds.get(keyword)
            return default if value is None or value == "" else int(value)
        except Exception:  # noqa: BLE001
            return -1  # present but not a number: invalid

    bits = number("BitsAllocated")
    stored = number("BitsStored", bits)
    samples = number("SamplesPerPixel", 1)
    representation = number("PixelRepresentation", 0)
    planar = number("PlanarConfiguration", 0)
    allowed_bits = (8, 16, 32, 64) if str(syntax or "") == _RLE else (8, 16)
    if (bits not in allowed_bits or stored is None or not 1 <= stored <= bits
            or samples not in (1, 3) or representation not in (0, 1)
            or (samples == 3 and planar not in (0, 1))):
        raise UnreadableScanError("The DICOM image description (bits allocated, bits stored, "
                                  "samples per pixel) is invalid for its compressed pixel data.")


def _is_cut_short(ds) -> bool:
    """True when the last element read declares more bytes than the file held (a truncated file:
    pydicom keeps the short value silently)."""
    try:
        tags = list(ds.keys())
        if not tags:
            return False
        raw = ds.get_item(tags[-1])
        length = int(getattr(raw, "length", 0) or 0)
        value = getattr(raw, "value", None)
        return (isinstance(value, (bytes, bytearray)) and length != 0xFFFFFFFF
                and len(value) < length)
    except Exception:  # noqa: BLE001
        return False


def _infer_transfer_syntax(ds) -> None:
    """A data set without file meta information (no preamble, no group 0002) has no Transfer
    Syntax UID, which pixel decoding needs. Native (uncompressed) pixel data is then in the
    encoding pydicom detected while parsing; encapsulated pixel data cannot be guessed."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    try:
        if "TransferSyntaxUID" in getattr(ds, "file_meta", {}):
            return
        if "PixelData" in ds and ds["PixelData"].is_undefined_length:
            return  # encapsulated (compressed): the codec is unknown
        implicit, little = ds.original_encoding
        if implicit is None or little is None:
            return
        syntax = (ImplicitVRLittleEndian if implicit else
                  ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        if getattr(ds, "file_meta", None) is None:
            ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = syntax
    except Exception:  # noqa: BLE001 - left as is; decoding then reports a typed error
        return


def _is_unsupported_codec(exc: Exception) -> bool:
    """True when the decoders refused the compression itself (no codec for it, or not for this
    precision), False when they tried and found the data damaged. pydicom wraps every plugin's
    failure in "Unable to decode as exceptions were raised by all available plugins": that
    preamble says nothing about which case it is, so only the plugins' own reasons count."""
    text = str(exc).lower().replace("unable to decode as exceptions were raised by all "
                                    "available plugins", "")
    return any(k in text for k in ("no pixel data decoders", "not supported", "unsupported",
                                   "does not support", "cannot decode", "precision",
                                   "missing dependenc", "no plugin"))


def _codec_message(syntax) -> str:
    """Why the pixel data cannot be decoded. Names only transfer syntaxes of the DICOM standard:
    an unknown UID is text from the file (never quoted in a message)."""
    if syntax is not None and str(syntax) == "1.2.840.10008.1.2.4.51":
        return ("This DICOM uses 12-bit lossy JPEG compression (JPEG Extended), which cannot be "
                "decoded here. Export it uncompressed or losslessly compressed and try again.")
    try:
        known = bool(syntax is not None and syntax.is_transfer_syntax)
        compressed = known and bool(syntax.is_compressed)
    except Exception:  # noqa: BLE001 - a private or malformed UID
        known = compressed = False
    if compressed:
        return f"This DICOM is compressed with {syntax.name}, which cannot be decoded here."
    if syntax is None:  # a bare data set (no file meta) with compressed pixel data
        return ("This DICOM does not say how its image is compressed (no transfer syntax), so "
                "it cannot be decoded.")
    if syntax is not None and not known:
        return ("This DICOM declares an encoding (transfer syntax) that medcls does not know, so "
                "its image cannot be decoded.")
    return ("This DICOM stores its pixels in a layout that cannot be decoded here (bits "
            "allocated, samples per pixel or photometric interpretation).")


# ----------------------------------------------------------------------------- display

def display_image(scan: Scan, center: float | None = None, width: float | None = None) -> np.ndarray:
    """The scan as a doctor expects to see it, as float32 in [0, 1].

    Applies the window (``center``/``width``; default: the file's own VOI or
    percentiles) to the modality values and inverts MONOCHROME1 so that, for
    example, bone is bright on a computed radiograph. Colour images are returned
    as (H, W, 3) scaled to [0, 1]; grayscale as (H, W).
    """
    if center is None and width is None and scan._voi_lut_display is not None:
        out = scan._voi_lut_display.astype(np.float32)
    else:
        c = scan.window_center if center is None else float(center)
        w = scan.window_width if width is None else float(width)
        w = max(w, 1e-6)
        lo = c - w / 2
        out = np.clip((scan.values - lo) / w, 0.0, 1.0).astype(np.float32)
    if scan.photometric == "MONOCHROME1":
        out = 1.0 - out
    return out


def to_uint8(img01: np.ndarray) -> np.ndarray:
    """Float image in [0, 1] to uint8 for display and export."""
    return np.clip(np.rint(img01 * 255.0), 0, 255).astype(np.uint8)


def scan_from_array(array: np.ndarray, modality: str = "OT",
                    pixel_spacing: tuple[float, float] | None = None) -> Scan:
    """Wrap an in-memory image (H, W) or (H, W, 3) as a Scan, e.g. a MedMNIST sample."""
    arr = np.asarray(array)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or arr.size == 0 or (arr.ndim == 3 and arr.shape[2] != 3):
        raise UnreadableScanError("Expected a 2-D grayscale or (H, W, 3) colour image array.")
    if arr.shape[0] * arr.shape[1] > MAX_PIXELS:
        raise ScanTooLargeError("The image array is larger than medcls decodes.")
    values = arr.astype(np.float32)
    center, width = _percentile_window(values)
    bits = 16 if arr.dtype == np.uint16 else 8 if arr.dtype == np.uint8 else 32
    photometric = "RGB" if arr.ndim == 3 else "MONOCHROME2"
    return Scan(
        pixels=arr, values=values, source_format="array", modality=modality,
        photometric=photometric, bits_stored=bits, pixel_spacing=pixel_spacing,
        window_center=center, window_width=width, window_source="percentile", n_frames=1,
        frame=0, metadata={"Format": "array", "Rows": arr.shape[0], "Columns": arr.shape[1]},
        sha256=hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest(),
    )
