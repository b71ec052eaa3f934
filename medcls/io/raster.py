"""PNG, JPEG, TIFF and BMP: sized from the header alone (Pillow, or the TIFF directory read
directly), planned within the decode budget, decoded by OpenCV.
"""

from __future__ import annotations

import io
import logging
import warnings

import numpy as np

from medcls.core.errors import DecodeBudgetError, ScanTooLargeError, UnreadableScanError
from medcls.io.budget import MAX_PIXELS, DecodePlan, plan_decode, reduction_note
from medcls.io.display import finite_values, is_gray, percentile_window
from medcls.io.scan import Scan

log = logging.getLogger(__name__)


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


def load_raster(data: bytes, fmt: str, digest: str) -> Scan:
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
        if img.ndim == 3 and is_gray(img):
            img = np.ascontiguousarray(img[:, :, 0])
    photometric = "RGB" if img.ndim == 3 else "MONOCHROME2"
    bits = 16 if img.dtype == np.uint16 else 8 if img.dtype == np.uint8 else 32
    values = finite_values(img.astype(np.float32))
    center, width_ = percentile_window(values)
    metadata = {"Format": fmt.upper(), "Rows": height, "Columns": width, "BitsStored": bits,
                "PhotometricInterpretation": photometric, **reduction_note(full_shape, img)}
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
