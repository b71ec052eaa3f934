"""Load any scan (DICOM, PNG, JPEG, TIFF, BMP) into a :class:`~medcls.io.scan.Scan`.

One entry point, :func:`load_scan`, takes a path or the bytes of an upload. The format is
recognised by content; DICOM is decoded by :mod:`medcls.io.dicom`, raster images by
:mod:`medcls.io.raster`, each within the decode budget (:mod:`medcls.io.budget`) and one of the
process's decode slots. Error messages never quote values from the file.
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np

from medcls.core.errors import ScanTooLargeError, UnreadableScanError
from medcls.io.budget import MAX_PIXELS, decode_slot
from medcls.io.dicom import load_dicom
from medcls.io.display import percentile_window
from medcls.io.raster import load_raster
from medcls.io.scan import Scan, ScanInput, read_source, sniff_format

log = logging.getLogger(__name__)


def load_scan(src: ScanInput, frame: int = 0) -> Scan:
    """Load a scan from a path, bytes or a binary file object.

    ``frame`` selects one frame of a multi-frame DICOM; only that frame is decoded.
    Raises :class:`UnreadableScanError` (or :class:`ScanTooLargeError`) with a
    reason a doctor understands for anything that is not a readable scan.
    """
    data = read_source(src)
    fmt = sniff_format(data)
    digest = hashlib.sha256(data).hexdigest()
    if fmt is None:
        raise UnreadableScanError("This file is not an image or DICOM file medcls can read "
                                  "(supported: DICOM, PNG, JPEG, TIFF, BMP).")
    with decode_slot():
        if fmt == "dicom":
            scan = load_dicom(data, frame, digest)
        else:
            scan = load_raster(data, fmt, digest)
    log.debug("loaded %r", scan)
    return scan


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
    center, width = percentile_window(values)
    bits = 16 if arr.dtype == np.uint16 else 8 if arr.dtype == np.uint8 else 32
    photometric = "RGB" if arr.ndim == 3 else "MONOCHROME2"
    return Scan(
        pixels=arr, values=values, source_format="array", modality=modality,
        photometric=photometric, bits_stored=bits, pixel_spacing=pixel_spacing,
        window_center=center, window_width=width, window_source="percentile", n_frames=1,
        frame=0, metadata={"Format": "array", "Rows": arr.shape[0], "Columns": arr.shape[1]},
        sha256=hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest(),
    )
