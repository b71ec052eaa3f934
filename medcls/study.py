"""Studies, not single slices: gather DICOM files (or a NIfTI volume) into ordered series.

:func:`gather` takes *sources* (anything with a ``name`` and a ``read()`` returning bytes or a
path: the batch review's upload, zip and server-folder readers, or :func:`bytes_source`) and
returns a :class:`Study`: one :class:`Series` per StudyInstanceUID / SeriesInstanceUID (and per
slice orientation), with what was odd about it as typed :class:`Finding` s.

Order of the slices
    By position along the slice normal: ImagePositionPatient . (row x column direction of
    ImageOrientationPatient). Without positions, by InstanceNumber (then frame number); without
    either, by file name. Enhanced (multi-frame) DICOM keeps positions, orientation and pixel
    spacing per frame in its functional groups (per-frame first, then shared): they are read
    here, so its 96 frames are one series with spacing.
NIfTI (``.nii``, ``.nii.gz``)
    Read with nibabel; slices run along the acquisition axis (the header's slice dimension,
    else the third axis) and are turned to the orientation DICOM viewers show (axial: patient
    right on the image left, anterior up), so a NIfTI and the DICOM it came from give the same
    images. Spacing comes from the affine.

Only header values are read while gathering; each slice's :class:`~medcls.scan.Scan` is decoded
when asked for (:meth:`Series.scan`). UIDs group files but never leave this module: a series is
named by its number, modality, plane and size, and handled by a hash (:attr:`Series.key`).
Metadata is the scan module's allow-list of technical attributes; nothing identifying.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import logging
import re
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Iterable, Protocol, Sequence

import numpy as np

from .errors import MedclsError, ScanTooLargeError, UnreadableScanError
from .scan import (MAX_FILE_BYTES, MAX_PIXELS, PLANES, Scan, _read_dataset, _read_source,
                   _safe_metadata, _window_presets, load_scan, plane_of_normal, scan_from_array,
                   slice_normal, sniff_format)

log = logging.getLogger(__name__)

#: Relative tolerance: neighbours further apart than this x the usual spacing leave a gap.
GAP_FACTOR = 1.5
#: Two slices closer than this (mm along the normal) are at the same position.
SAME_POSITION_MM = 0.01
#: Two slice normals with |cos| above this are one orientation.
SAME_ORIENTATION_COS = 0.999
#: Largest NIfTI volume medcls expands (voxels).
MAX_VOXELS = 512 * 512 * 1024
#: Decoded slices kept per series (the page shows one at a time; the engine streams).
SCAN_CACHE = 8

PER_SLICE_ATTRIBUTES = ("InstanceNumber", "ImagePositionPatient", "SliceLocation",
                        "WindowCenter", "WindowWidth")


class SourceLike(Protocol):
    name: str

    def read(self) -> Any: ...


@dataclass(frozen=True)
class _Bytes:
    name: str
    data: bytes = field(repr=False)

    def read(self) -> bytes:
        return self.data


def bytes_source(name: str, data: bytes) -> SourceLike:
    """A source from a name and bytes (an upload held in memory)."""
    return _Bytes(name, data if isinstance(data, bytes) else bytes(data))


# ----------------------------------------------------------------------------- findings

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


# ----------------------------------------------------------------------------- slices

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


# ----------------------------------------------------------------------------- series

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
            cached = _slim_multiframe(_read_source(ref.read()))
            with self._lock:
                self._slim_files = {ref.content_hash: cached}  # one file at a time
        return cached


def _slim_multiframe(data: bytes) -> bytes:
    """``data`` without the functional-groups sequences (the original when that fails)."""
    try:
        ds = _read_dataset(data)
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


# ----------------------------------------------------------------------------- DICOM headers

def _floats(value, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except Exception:  # noqa: BLE001 - absent or malformed
        return None
    return out if len(out) == n and all(np.isfinite(out)) else None


def _positive(value) -> float | None:
    try:
        v = float(value)
    except Exception:  # noqa: BLE001
        return None
    return v if np.isfinite(v) and v > 0 else None


def _spacing(value) -> tuple[float, float] | None:
    sp = _floats(value, 2)
    return sp if sp is not None and sp[0] > 0 and sp[1] > 0 else None


def _group_item(group, item_seq: str):
    """The first item of ``item_seq`` inside a functional-groups item, or None."""
    try:
        seq = group.get(item_seq)
        return seq[0] if seq else None
    except Exception:  # noqa: BLE001
        return None


def frame_geometry(ds, frame: int) -> dict[str, Any]:
    """Geometry of one frame of an (enhanced) DICOM: position, orientation, pixel spacing,
    thickness and spacing between slices, from the per-frame functional group, else the shared
    one, else the top-level attributes (classic single-frame files)."""
    groups = []
    try:
        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        if per_frame is not None and frame < len(per_frame):
            groups.append(per_frame[frame])
    except Exception:  # noqa: BLE001
        pass
    try:
        shared = ds.get("SharedFunctionalGroupsSequence")
        if shared:
            groups.append(shared[0])
    except Exception:  # noqa: BLE001
        pass
    groups.append(None)  # the top level

    def find(seq: str, keyword: str, convert):
        for g in groups:
            item = ds if g is None else _group_item(g, seq)
            if item is None:
                continue
            try:
                value = convert(item.get(keyword))
            except Exception:  # noqa: BLE001
                value = None
            if value is not None:
                return value
        return None

    return {
        "position": find("PlanePositionSequence", "ImagePositionPatient", lambda v: _floats(v, 3)),
        "orientation": find("PlaneOrientationSequence", "ImageOrientationPatient",
                            lambda v: _floats(v, 6)),
        "pixel_spacing": find("PixelMeasuresSequence", "PixelSpacing", _spacing),
        "thickness": find("PixelMeasuresSequence", "SliceThickness", _positive),
        "spacing_between": find("PixelMeasuresSequence", "SpacingBetweenSlices", _positive),
    }


def _uid_hash(*parts) -> str:
    return hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()[:16]


def _dicom_refs(source: SourceLike, data: bytes) -> tuple[tuple, list[SliceRef], dict]:
    """(grouping key, one SliceRef per frame, header facts) of a DICOM file."""
    ds = _read_dataset(data, stop_before_pixels=True)
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    except Exception:  # noqa: BLE001
        raise UnreadableScanError("This DICOM file holds no image (no rows and columns): it may "
                                  "be a report or a directory.") from None
    if rows < 1 or cols < 1 or n_frames < 1 or rows * cols > MAX_PIXELS:
        raise UnreadableScanError("This DICOM file's image size attributes are invalid.")
    study = str(ds.get("StudyInstanceUID", "") or "")
    series = str(ds.get("SeriesInstanceUID", "") or "")
    sop = str(ds.get("SOPInstanceUID", "") or "")
    try:
        instance = int(ds.get("InstanceNumber")) if ds.get("InstanceNumber") not in (None, "") else None
    except Exception:  # noqa: BLE001
        instance = None
    content = hashlib.sha256(data).hexdigest()
    refs = []
    read = source.read
    for f in range(n_frames):
        g = frame_geometry(ds, f)
        refs.append(SliceRef(
            name=source.name, read=read, frame=f, n_frames=n_frames, position=g["position"],
            orientation=g["orientation"], instance=instance, pixel_spacing=g["pixel_spacing"],
            thickness=g["thickness"], spacing_between=g["spacing_between"], size=(rows, cols),
            uid_hash=_uid_hash(sop or content, f), content_hash=content))
    meta = {k: v for k, v in _safe_metadata(ds).items() if k not in PER_SLICE_ATTRIBUTES}
    key = ("dicom", _uid_hash(study), _uid_hash(series))
    return key, refs, meta


# ----------------------------------------------------------------------------- gather

def _is_nifti(name: str, data: bytes) -> bool:
    if data[:2] == b"\x1f\x8b":
        return name.lower().endswith((".nii.gz", ".nii.gzip")) or name.lower().endswith(".gz")
    if len(data) >= 348:
        magic = data[344:348]
        if magic in (b"n+1\x00", b"ni1\x00"):
            return True
        if len(data) >= 540 and data[4:8] in (b"n+2\x00", b"ni2\x00"):
            return True
    return False


def gather(sources: Iterable[SourceLike]) -> Study:
    """Read the headers of ``sources`` and build the study: series ordered along their slice
    normal, with gaps, duplicates, mixed orientations and unreadable files as findings."""
    groups: "OrderedDict[tuple, dict]" = OrderedDict()
    series: list[Series] = []
    findings: list[Finding] = []
    images: list[str] = []
    unreadable: list[str] = []
    for source in sources:
        try:
            data = _read_source(source.read())
            fmt = sniff_format(data)
            if _is_nifti(source.name, data):
                series.append(_nifti_series(source.name, data))
            elif fmt == "dicom":
                key, refs, meta = _dicom_refs(source, data)
                g = groups.setdefault(key, {"refs": [], "meta": meta})
                g["refs"].extend(refs)
            elif fmt is not None:
                images.append(source.name)
                series.append(_image_series(source))
            else:
                unreadable.append(source.name)
        except MedclsError as exc:
            log.debug("not gathered: %s", type(exc).__name__)
            unreadable.append(source.name)
    for key, g in groups.items():
        series.extend(_dicom_series(g["refs"], g["meta"]))
    if unreadable:
        findings.append(Finding(FindingKind.UNREADABLE,
                                f"{len(unreadable)} file(s) are not a readable scan and were left out.",
                                files=tuple(unreadable)))
    if images:
        findings.append(Finding(FindingKind.NOT_A_SERIES,
                                f"{len(images)} plain image(s) (PNG, JPEG, TIFF, BMP) carry no slice "
                                "position: each is answered on its own.", files=tuple(images)))
    n_stacks = sum(s.kind != "image" for s in series)
    if n_stacks > 1:
        findings.append(Finding(FindingKind.SEVERAL_SERIES,
                                f"The input holds {n_stacks} series; each is answered on its own."))
    return Study(series, findings)


def _image_series(source: SourceLike) -> Series:
    """A plain image (PNG, JPEG...): a series of one slice, decoded when asked for."""
    ref = SliceRef(name=source.name, read=source.read, uid_hash=_uid_hash(source.name))
    key = _uid_hash("image", source.name)[:12]
    s = Series(key=key, label="Image · 1 slice", kind="image", modality="OT", plane=None,
               oblique=False, slices=[ref], positions=None, pixel_spacing=None,
               slice_thickness=None, slice_spacing=None, ordered_by="file name")
    s._make_scan = lambda i: load_scan(ref.read())
    return s


def _orientation_groups(refs: list[SliceRef]) -> list[list[SliceRef]]:
    """Split slices by plane: slices whose normals differ cannot be ordered along one axis."""
    groups: list[tuple[np.ndarray | None, list[SliceRef]]] = []
    for r in refs:
        n = r.normal
        for gn, members in groups:
            if (n is None and gn is None) or (n is not None and gn is not None
                                              and abs(float(n @ gn)) > SAME_ORIENTATION_COS):
                members.append(r)
                break
        else:
            groups.append((n, [r]))
    # slices without orientation join the largest oriented group when there is one
    oriented = [g for g in groups if g[0] is not None]
    loose = [g for g in groups if g[0] is None]
    if oriented and loose:
        max(oriented, key=lambda g: len(g[1]))[1].extend(loose[0][1])
        groups = oriented
    return [members for _, members in sorted(groups, key=lambda g: -len(g[1]))]


def _natural(name: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _dicom_series(refs: list[SliceRef], meta: dict) -> list[Series]:
    stacks = _orientation_groups(refs)
    out = []
    for n_stack, stack in enumerate(stacks):
        s = _order_stack(stack, meta)
        if len(stacks) > 1:
            s.findings.insert(0, Finding(
                FindingKind.MIXED_ORIENTATION,
                f"This series mixes {len(stacks)} slice orientations (a localiser?): its "
                f"{len(stack)} {s.plane or 'unoriented'} slices are shown as a stack of their own."))
            s.key = f"{s.key}-{n_stack + 1}"
        out.append(s)
    return out


def _order_stack(stack: list[SliceRef], meta: dict) -> Series:
    findings: list[Finding] = []
    # duplicates: the same instance (and frame) twice, e.g. a file copied under another name
    seen: dict[str, SliceRef] = {}
    unique: list[SliceRef] = []
    dup_files: list[str] = []
    for r in stack:
        if r.uid_hash in seen:
            dup_files.append(r.name)
            continue
        seen[r.uid_hash] = r
        unique.append(r)
    normal = next((r.normal for r in unique if r.normal is not None), None)
    have_pos = normal is not None and all(r.position is not None for r in unique)
    if have_pos:
        ordered_by = "position"
        d = {id(r): float(np.asarray(r.position) @ normal) for r in unique}
        unique.sort(key=lambda r: (d[id(r)], r.instance or 0, r.frame, _natural(r.name)))
        positions = [d[id(r)] for r in unique]
        # two different instances at one position: keep the first, report the rest
        kept, pos_kept = [], []
        for r, p in zip(unique, positions):
            if pos_kept and abs(p - pos_kept[-1]) < SAME_POSITION_MM:
                dup_files.append(r.name)
                continue
            kept.append(r)
            pos_kept.append(p)
        unique, positions = kept, pos_kept
    elif all(r.instance is not None for r in unique) or len({r.frame for r in unique}) == len(unique):
        ordered_by = "instance number"
        unique.sort(key=lambda r: (r.instance or 0, r.frame, _natural(r.name)))
        positions = None
        findings.append(Finding(FindingKind.NO_POSITION,
                                "The slices carry no position: ordered by instance (and frame) "
                                "number, so distances between slices are unknown."))
    else:
        ordered_by = "file name"
        unique.sort(key=lambda r: (_natural(r.name), r.frame))
        positions = None
        findings.append(Finding(FindingKind.NO_ORDER,
                                "The slices carry neither position nor instance number: ordered "
                                "by file name, which may not be their order in the body."))
    if dup_files:
        findings.append(Finding(FindingKind.DUPLICATE,
                                f"{len(dup_files)} duplicate slice(s) (the same instance, or a "
                                "second slice at the same position) were left out.",
                                files=tuple(dup_files)))

    spacing = None
    if positions is not None and len(positions) > 1:
        steps = np.diff(positions)
        spacing = float(np.median(steps))
        for i in np.nonzero(steps > GAP_FACTOR * spacing)[0]:
            missing = int(round(steps[i] / spacing)) - 1
            findings.append(Finding(
                FindingKind.GAP,
                f"Gap between slices {i + 1} and {i + 2}: {steps[i]:.1f} mm apart where the "
                f"series steps {spacing:.1f} mm (about {max(missing, 1)} slice(s) missing).",
                slices=(int(i), int(i) + 1)))
    elif ordered_by == "instance number":
        numbers = [r.instance for r in unique if r.instance is not None and r.frame == 0]
        if len(set(numbers)) == len(numbers) > 1:
            for a, b in zip(numbers, numbers[1:]):
                if b - a > 1:
                    i = numbers.index(a)
                    findings.append(Finding(FindingKind.GAP,
                                            f"Instance numbers jump from {a} to {b}: "
                                            f"{b - a - 1} slice(s) missing?", slices=(i, i + 1)))
    if spacing is None:
        spacing = next((r.spacing_between for r in unique if r.spacing_between), None) or \
            next((r.thickness for r in unique if r.thickness), None)

    sizes = {r.size for r in unique}
    if len(sizes) > 1:
        findings.append(Finding(FindingKind.UNEVEN_SIZE,
                                f"The slices have {len(sizes)} different image sizes."))
    pixel = _most_common([r.pixel_spacing for r in unique if r.pixel_spacing])
    thickness = _most_common([r.thickness for r in unique if r.thickness])
    plane, oblique = plane_of_normal(normal)
    modality = str(meta.get("Modality", "OT"))
    number = meta.get("SeriesNumber")
    label = " · ".join(str(x) for x in (
        f"Series {number}" if number not in (None, "") else "Series", modality,
        (plane + (" (oblique)" if oblique else "")) if plane else None,
        f"{len(unique)} slice" + ("s" if len(unique) != 1 else "")) if x)
    key = hashlib.sha256("".join(r.uid_hash for r in unique).encode()).hexdigest()[:12]
    return Series(key=key, label=label, kind="dicom", modality=modality, plane=plane,
                  oblique=oblique, slices=unique, positions=positions, pixel_spacing=pixel,
                  slice_thickness=thickness, slice_spacing=spacing, ordered_by=ordered_by,
                  findings=findings, metadata=meta)


def _most_common(values: list):
    if not values:
        return None
    uniq, counts = np.unique(np.asarray(values, dtype=float), axis=0, return_counts=True)
    best = uniq[int(np.argmax(counts))]
    return tuple(float(v) for v in best) if np.ndim(best) else float(best)


# ----------------------------------------------------------------------------- NIfTI

# (row, column, slice) axis codes per plane: the orientation DICOM viewers show (row direction
# and column direction of a standard DICOM slice, slices ascending along its normal)
_DISPLAY_AXES = {"axial": ("P", "L", "S"), "coronal": ("I", "L", "P"), "sagittal": ("I", "P", "R")}


def _gunzip(data: bytes) -> bytes:
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(data, MAX_FILE_BYTES + 1)
    except zlib.error:
        raise UnreadableScanError("The .nii.gz file is damaged and cannot be expanded.") from None
    if len(out) > MAX_FILE_BYTES or d.unconsumed_tail:
        raise ScanTooLargeError("The NIfTI volume expands to more than the 1 GB medcls accepts.")
    return out


def _nifti_image(data: bytes):
    import nibabel as nib

    for cls in (nib.Nifti1Image, nib.Nifti2Image):
        try:
            return cls.from_bytes(data)
        except Exception:  # noqa: BLE001 - try the other version, then refuse
            continue
    raise UnreadableScanError("The NIfTI file is damaged or not a NIfTI-1/2 image.")


def load_nifti_volume(data: bytes) -> tuple[np.ndarray, np.ndarray, str, list[Finding]]:
    """(volume (rows, columns, slices), its LPS affine, plane, findings) of NIfTI bytes, turned
    to the display orientation of its plane with slices along the acquisition axis."""
    from nibabel.orientations import (apply_orientation, axcodes2ornt, inv_ornt_aff,
                                      io_orientation, ornt_transform)

    if data[:2] == b"\x1f\x8b":
        data = _gunzip(data)
    img = _nifti_image(data)
    shape = tuple(int(n) for n in img.shape)
    findings: list[Finding] = []
    if len(shape) < 2 or len(shape) > 4 or any(n < 1 for n in shape):
        raise UnreadableScanError("The NIfTI image is not a 2-D or 3-D volume.")
    if int(np.prod(shape[:3])) > MAX_VOXELS:
        raise ScanTooLargeError("The NIfTI volume holds more voxels than medcls decodes.")
    try:
        proxy = img.dataobj
        vol = np.asarray(proxy[..., 0] if len(shape) == 4 else proxy[...])
    except Exception:  # noqa: BLE001
        raise UnreadableScanError("The NIfTI image data is damaged or cut short.") from None
    if len(shape) == 4 and shape[3] > 1:
        findings.append(Finding(FindingKind.FIRST_VOLUME_ONLY,
                                f"A 4-D NIfTI ({shape[3]} volumes): only the first is shown."))
    if vol.ndim == 2:
        vol = vol[:, :, None]
    if vol.dtype.kind not in "iuf":
        raise UnreadableScanError("The NIfTI voxel type is not supported (expected numbers).")
    affine = np.asarray(img.affine, dtype=float)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        affine = np.diag([1.0, 1.0, 1.0, 1.0])
    dim_info = img.header.get_dim_info() if hasattr(img.header, "get_dim_info") else (None,) * 3
    slice_axis = dim_info[2] if dim_info[2] is not None and dim_info[2] < 3 else 2
    ornt = io_orientation(affine)
    plane = PLANES[int(ornt[slice_axis, 0])]
    transform = ornt_transform(ornt, axcodes2ornt(_DISPLAY_AXES[plane]))
    affine = affine @ inv_ornt_aff(transform, vol.shape)
    vol = apply_orientation(vol, transform)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    return np.ascontiguousarray(vol), lps, plane, findings


def _nifti_series(name: str, data: bytes) -> Series:
    vol, lps, plane, findings = load_nifti_volume(data)
    rows, cols, n = vol.shape
    col_step, row_step, slice_step = (lps[:3, i] for i in range(3))
    pixel = (float(np.linalg.norm(col_step)), float(np.linalg.norm(row_step)))
    # affine axis 0 runs down the rows (spacing between rows), axis 1 along a row
    spacing = float(np.linalg.norm(slice_step))
    normal = slice_step / spacing if spacing > 0 else np.array([0.0, 0.0, 1.0])
    positions = [float((lps @ [0, 0, k, 1])[:3] @ normal) for k in range(n)]
    content = hashlib.sha256(data).hexdigest()
    refs = [SliceRef(name=name, read=lambda: data, frame=k, size=(rows, cols),
                     pixel_spacing=pixel, thickness=spacing, uid_hash=_uid_hash(content, k),
                     content_hash=content) for k in range(n)]
    _, oblique = plane_of_normal(normal)
    meta = {"Format": "NIfTI", "Rows": rows, "Columns": cols, "Slices": n,
            "PixelSpacing": list(pixel), "SpacingBetweenSlices": spacing}

    def make(k: int) -> Scan:
        arr = vol[:, :, k]
        scan = scan_from_array(arr, modality="OT", pixel_spacing=pixel)
        return dataclasses.replace(
            scan, source_format="nifti", frame=k, n_frames=n, sha256=content,
            metadata={**meta, "Slice": k + 1}, window_presets=_window_presets("OT", scan.values))

    s = Series(key=content[:12], label=f"NIfTI · {plane} · {n} slices", kind="nifti",
               modality="OT", plane=plane, oblique=oblique, slices=refs, positions=positions,
               pixel_spacing=pixel, slice_thickness=spacing, slice_spacing=spacing,
               ordered_by="volume axis", findings=findings, metadata=meta)
    s._make_scan = make
    return s
