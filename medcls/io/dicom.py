"""One DICOM frame as a :class:`~medcls.io.scan.Scan`: read the data set, check the declared
size and plan the decode within the budget, decode the one frame (compressed data in a limited
worker process, :mod:`medcls.io.decoder`), reduce it if planned, apply the modality LUT, choose
the default window, read the pixel spacing.
"""

from __future__ import annotations

import atexit
import logging
import threading
import warnings

import numpy as np

from medcls.core.errors import DecoderFailedError, ScanTooLargeError, UnreadableScanError
from medcls.io.budget import (
    MAX_PIXELS,
    decode_budget,
    decode_timeout,
    max_concurrent_decodes,
    plan_decode,
    reduction_note,
    rescaled_spacing,
)
from medcls.io.dicom_tags import (
    check_compressed_pixel_attributes,
    codec_message,
    dicom_pixel_spacing,
    first_value,
    infer_transfer_syntax,
    is_cut_short,
    is_encapsulated,
    is_unsupported_codec,
    read_dataset,
    safe_metadata,
    transfer_syntax_of,
)
from medcls.io.display import VALUE_LIMIT, finite_values, percentile_window, window_presets
from medcls.io.scan import Scan

log = logging.getLogger(__name__)


def load_dicom(data: bytes, frame: int, digest: str) -> Scan:
    """One DICOM frame as a Scan, in steps: read the data set, check the declared size against
    the limits and plan the decode within the budget, decode the one frame (compressed data in a
    limited worker process), reduce it if the plan says so, apply the modality LUT, choose the
    default window and read the pixel spacing (rescaled with the frame)."""
    ds = _read_image_dataset(data)
    rows, cols, n_frames, samples, sample_bytes = _image_geometry(ds, frame)
    # a float64 rescale (apply_modality_lut) is the extra working copy per sample
    plan = plan_decode(cols, rows, samples, sample_bytes, reduce="after", extra_per_sample=8)
    syntax = transfer_syntax_of(ds)
    arr = _checked_frame(_decode_frame(ds, data, frame, n_frames, syntax), rows, cols, n_frames,
                         frame)
    full_shape = None
    if plan.factor > 1:
        arr, full_shape = _reduce(arr, plan.factor), (rows, cols)
    photometric, values = _modality_values(ds, arr)
    center, width, window_source, voi_display = _default_window(ds, arr, values)
    spacing = rescaled_spacing(dicom_pixel_spacing(ds), full_shape, arr.shape[:2])
    try:
        bits = int(ds.BitsStored)
    except Exception:  # noqa: BLE001
        bits = int(arr.dtype.itemsize * 8)
    modality = str(getattr(ds, "Modality", "OT") or "OT")
    presets = window_presets(modality, values)
    if window_source == "dicom" and voi_display is None:
        presets = {"DICOM default": (center, width), **presets}
    return Scan(
        pixels=arr, values=values, source_format="dicom", modality=modality,
        photometric=photometric, bits_stored=bits, pixel_spacing=spacing,
        window_center=float(center), window_width=float(width), window_source=window_source,
        n_frames=n_frames, frame=frame,
        metadata={**safe_metadata(ds), **reduction_note(full_shape, arr)}, sha256=digest,
        transfer_syntax=syntax.name if syntax is not None else None,
        window_presets=presets, full_shape=full_shape, _voi_lut_display=voi_display,
    )


def _read_image_dataset(data: bytes):
    """The parsed data set, refused unless it holds pixel data (with why: cut short, damaged, or
    not an image at all)."""
    ds = read_dataset(data)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        if is_cut_short(ds):
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
    infer_transfer_syntax(ds)
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


_DAMAGED_PIXELS = ("The DICOM pixel data is damaged or does not match the image size it "
                   "declares (rows, columns, bits).")


_pool_lock = threading.Lock()
_pool = None


def _decoder_pool():
    global _pool
    with _pool_lock:
        if _pool is None:
            from medcls.io.decoder import DecoderPool

            _pool = DecoderPool(max_concurrent_decodes())
            atexit.register(_pool.close)
        return _pool


def _decode_frame(ds, data: bytes, frame: int, n_frames: int, syntax) -> np.ndarray:
    """The stored values of one frame. Compressed (encapsulated) data is decoded by a worker
    process with a memory and time limit (:mod:`medcls.io.decoder`), so a decoder's crash, hang or
    runaway allocation is a :class:`DecoderFailedError`, not the end of the server; native
    (uncompressed) data is read here, where it is plain numpy."""
    from pydicom.pixels import pixel_array

    from medcls.io.decoder import DecodeFailure

    check_compressed_pixel_attributes(ds, syntax)
    try:
        compressed = bool(syntax is not None and syntax.is_transfer_syntax and syntax.is_compressed)
    except Exception:  # noqa: BLE001 - a private or malformed UID ("UID is not a transfer syntax")
        compressed = False
    try:
        if is_encapsulated(ds):
            return _decoder_pool().decode(data, frame, n_frames, decode_budget(),
                                          decode_timeout())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pixel_array(ds, index=frame) if n_frames > 1 else ds.pixel_array
    except DecoderFailedError:
        raise
    except DecodeFailure as exc:  # the worker's decoders refused the data
        if exc.kind == "notimplemented" or (exc.kind == "unsupported" and compressed):
            raise UnreadableScanError(codec_message(syntax)) from None
        raise UnreadableScanError(_DAMAGED_PIXELS) from None
    except NotImplementedError:
        raise UnreadableScanError(codec_message(syntax)) from None
    except Exception as exc:  # noqa: BLE001
        log.debug("DICOM pixel decode failed: %s", type(exc).__name__)
        if compressed and is_unsupported_codec(exc):
            raise UnreadableScanError(codec_message(syntax)) from None
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
    return photometric, finite_values(values)


def _default_window(ds, arr: np.ndarray, values: np.ndarray):
    """(center, width, source, VOI LUT display): the file's own VOI (window tags, or a VOI LUT
    applied for display), else percentiles of the values."""
    from pydicom.pixels import apply_voi_lut

    voi_display = None
    center = width = None
    window_source = "percentile"
    if arr.ndim == 2:
        try:
            wc, ww = first_value(ds.get("WindowCenter")), first_value(ds.get("WindowWidth"))
            if (wc is not None and ww is not None and float(ww) > 0
                    and abs(float(wc)) < VALUE_LIMIT and float(ww) < VALUE_LIMIT):
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
        center, width = percentile_window(values)
    return center, width, window_source, voi_display
