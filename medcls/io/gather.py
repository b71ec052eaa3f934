"""Studies, not single slices: gather DICOM files (or a NIfTI volume) into ordered series.

:func:`gather` takes *sources* (anything with a ``name`` and a ``read()`` returning bytes or a
path, :mod:`medcls.io.sources`) and returns a :class:`~medcls.io.series.Study`: one series per
StudyInstanceUID / SeriesInstanceUID (and per slice orientation), with what was odd about it as
typed findings.

Order of the slices
    By position along the slice normal: ImagePositionPatient . (row x column direction of
    ImageOrientationPatient). Without positions, by InstanceNumber (then frame number); without
    either, by file name. Enhanced (multi-frame) DICOM keeps positions, orientation and pixel
    spacing per frame in its functional groups (per-frame first, then shared): they are read
    here, so its 96 frames are one series with spacing.

Only header values are read while gathering. Metadata is the allow-list of technical
attributes (:mod:`medcls.io.dicom_tags`); nothing identifying.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import OrderedDict
from typing import Any, Iterable

import numpy as np

from medcls.core.errors import MedclsError, ScanTooLargeError, UnreadableScanError
from medcls.io.budget import MAX_PIXELS
from medcls.io.dicom_tags import read_dataset, safe_metadata
from medcls.io.geometry import plane_of_normal
from medcls.io.load import load_scan
from medcls.io.nifti import nifti_series
from medcls.io.scan import read_source, sniff_format
from medcls.io.series import (
    GAP_FACTOR,
    PER_SLICE_ATTRIBUTES,
    SAME_ORIENTATION_COS,
    SAME_POSITION_MM,
    Finding,
    FindingKind,
    Series,
    SliceRef,
    Study,
    uid_hash,
)
from medcls.io.sources import SourceLike

log = logging.getLogger(__name__)


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


def _dicom_refs(source: SourceLike, data: bytes) -> tuple[tuple, list[SliceRef], dict]:
    """(grouping key, one SliceRef per frame, header facts) of a DICOM file."""
    ds = read_dataset(data, stop_before_pixels=True)
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
            uid_hash=uid_hash(sop or content, f), content_hash=content))
    meta = {k: v for k, v in safe_metadata(ds).items() if k not in PER_SLICE_ATTRIBUTES}
    key = ("dicom", uid_hash(study), uid_hash(series))
    return key, refs, meta


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
            data = read_source(source.read())
            fmt = sniff_format(data)
            if _is_nifti(source.name, data):
                series.append(nifti_series(source.name, data))
            elif fmt == "dicom":
                key, refs, meta = _dicom_refs(source, data)
                g = groups.setdefault(key, {"refs": [], "meta": meta})
                g["refs"].extend(refs)
            elif fmt is not None:
                images.append(source.name)
                series.append(_image_series(source))
            else:
                unreadable.append(source.name)
        except ScanTooLargeError as exc:  # over a limit or the decode budget: say which
            findings.append(Finding(FindingKind.UNREADABLE, str(exc), files=(source.name,)))
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
    ref = SliceRef(name=source.name, read=source.read, uid_hash=uid_hash(source.name))
    key = uid_hash("image", source.name)[:12]
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
