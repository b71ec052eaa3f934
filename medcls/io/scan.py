"""The scan: one decoded frame with its de-identified description, and how an input's
bytes are read and its format recognised (by content, never by file name).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Union

import numpy as np

from medcls.core.errors import ScanTooLargeError, UnreadableScanError

log = logging.getLogger(__name__)


#: Largest input file, in bytes.
MAX_FILE_BYTES = 1 << 30


ScanInput = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]  # what load_scan reads


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


def read_source(src: ScanInput) -> bytes:
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
