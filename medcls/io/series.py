"""A series: an ordered stack of slices (header values only; each slice decoded when asked
for), the study that holds series, and the typed findings about what was odd in them.

UIDs group files but never leave :mod:`medcls.io`: a series is named by its number,
modality, plane and size, and handled by a hash (:attr:`Series.key`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable

import numpy as np

from medcls.io.dicom_tags import read_dataset
from medcls.io.geometry import slice_normal
from medcls.io.load import load_scan
from medcls.io.scan import Scan, read_source

log = logging.getLogger(__name__)


#: Relative tolerance: neighbours further apart than this x the usual spacing leave a gap.
GAP_FACTOR = 1.5
#: Two slices closer than this (mm along the normal) are at the same position.
SAME_POSITION_MM = 0.01
#: Two slice normals with |cos| above this are one orientation.
SAME_ORIENTATION_COS = 0.999


#: Decoded slices kept per series (the page shows one at a time; the engine streams).
SCAN_CACHE = 8


PER_SLICE_ATTRIBUTES = ("InstanceNumber", "ImagePositionPatient", "SliceLocation",
                        "WindowCenter", "WindowWidth")


class FindingKind(str, Enum):
    SEVERAL_SERIES = "several_series"
    MIXED_ORIENTATION = "mixed_orientation"
    GAP = "gap"
    DUPLICATE = "duplicate"
    NO_POSITION = "no_position"  # ordered by InstanceNumber / frame number
    NO_ORDER = "no_order"  # ordered by file name
    UNEVEN_SIZE = "uneven_size"
    NOT_A_SERIES = "not_a_series"  # plain images (PNG, JPEG...): each is its own
    UNREADABLE = "unreadable"
    FIRST_VOLUME_ONLY = "first_volume_only"


@dataclass(frozen=True)
class Finding:
    """Something about the input a reader should know. ``slices`` are 0-based positions in the
    ordered series; ``files`` names inputs (shown on screen, never in reports)."""

    kind: FindingKind
    message: str
    slices: tuple[int, ...] = ()
    files: tuple[str, ...] = ()


@dataclass(frozen=True)
class SliceRef:
    """Where one slice comes from and its geometry (header values only, nothing decoded)."""

    name: str
    read: Callable[[], Any] = field(repr=False)
    frame: int = 0
    n_frames: int = 1
    position: tuple[float, float, float] | None = None  # ImagePositionPatient (mm, LPS)
    orientation: tuple[float, ...] | None = None  # ImageOrientationPatient (6 cosines)
    instance: int | None = None
    pixel_spacing: tuple[float, float] | None = None
    thickness: float | None = None
    spacing_between: float | None = None
    size: tuple[int, int] | None = None  # rows, columns
    uid_hash: str = ""  # hash of SOPInstanceUID + frame: duplicates, never the UID itself
    content_hash: str = ""

    @property
    def normal(self) -> np.ndarray | None:
        return None if self.orientation is None else slice_normal(self.orientation)


@dataclass(eq=False)
class Series:
    """One ordered stack of slices. ``positions`` are mm along the slice normal (None when the
    files carry no geometry); ``slice_spacing`` the usual distance between neighbours."""

    key: str
    label: str
    kind: str  # "dicom", "nifti" or "image"
    modality: str
    plane: str | None  # "axial", "coronal", "sagittal" (None without orientation)
    oblique: bool
    slices: list[SliceRef]
    positions: list[float] | None
    pixel_spacing: tuple[float, float] | None
    slice_thickness: float | None
    slice_spacing: float | None
    ordered_by: str  # "position", "instance number", "file name", "volume axis"
    findings: list[Finding] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    _make_scan: Callable[[int], Scan] | None = field(default=None, repr=False)
    _cache: "OrderedDict[int, Scan]" = field(default_factory=OrderedDict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _slim_files: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.slices)

    def __repr__(self) -> str:  # no file names (they may name a patient)
        return f"Series({self.label}, key={self.key})"

    @property
    def sha256(self) -> str:
        """One hash for the series' inputs: the content hashes of its slices, in order."""
        h = hashlib.sha256()
        for s in self.slices:
            h.update(f"{s.content_hash}:{s.frame};".encode())
        return h.hexdigest()

    def position_of(self, i: int) -> float:
        """Where slice ``i`` lies (mm along the normal), or its 1-based number without geometry."""
        return float(self.positions[i]) if self.positions is not None else float(i + 1)

    def scan(self, i: int) -> Scan:
        """Slice ``i`` decoded (a few are cached). Raises the scan module's typed errors."""
        if not 0 <= i < len(self.slices):
            raise IndexError(f"slice {i} of {len(self.slices)}")
        with self._lock:  # the engine decodes on worker threads
            if i in self._cache:
                self._cache.move_to_end(i)
                return self._cache[i]
        scan = self._make_scan(i) if self._make_scan is not None else self._dicom_scan(i)
        with self._lock:
            self._cache[i] = scan
            while len(self._cache) > SCAN_CACHE:
                self._cache.popitem(last=False)
        return scan

    def _dicom_scan(self, i: int) -> Scan:
        ref = self.slices[i]
        if ref.n_frames > 1:
            scan = load_scan(self._slim(ref), frame=ref.frame)
            scan = dataclasses.replace(scan, sha256=ref.content_hash)
        else:
            scan = load_scan(ref.read(), frame=ref.frame)
        spacing = ref.pixel_spacing or self.pixel_spacing
        if scan.pixel_spacing is None and spacing is not None:
            # enhanced DICOM: the spacing lives in the functional groups, read here
            scan = dataclasses.replace(scan, pixel_spacing=spacing)
        return scan

    def _slim(self, ref: SliceRef) -> bytes:
        """A multi-frame file without its functional groups (their geometry is in the
        SliceRefs already): parsing ~100 sequence items per frame decoded cost 0.1-0.4 s a
        frame; the slim copy is made once per file."""
        with self._lock:
            cached = self._slim_files.get(ref.content_hash)
        if cached is None:
            cached = _slim_multiframe(read_source(ref.read()))
            with self._lock:
                self._slim_files = {ref.content_hash: cached}  # one file at a time
        return cached


def _slim_multiframe(data: bytes) -> bytes:
    """``data`` without the functional-groups sequences (the original when that fails)."""
    try:
        ds = read_dataset(data)
        for keyword in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
            if keyword in ds:
                del ds[keyword]
        buf = io.BytesIO()
        ds.save_as(buf)
        return buf.getvalue()
    except Exception as exc:  # noqa: BLE001 - decoding the original is slower, not wrong
        log.debug("multi-frame copy failed: %s", type(exc).__name__)
        return data


@dataclass
class Study:
    """What an upload, a folder or a zip holds: its series and what was odd about it."""

    series: list[Series]
    findings: list[Finding] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.series)

    @property
    def all_findings(self) -> list[Finding]:
        return self.findings + [f for s in self.series for f in s.findings]


def uid_hash(*parts) -> str:
    return hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()[:16]
