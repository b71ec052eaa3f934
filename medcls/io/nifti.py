"""NIfTI volumes (``.nii``, ``.nii.gz``) as a series.

Read with nibabel; slices run along the acquisition axis (the header's slice dimension, else
the third axis) and are turned to the orientation DICOM viewers show (axial: patient right on
the image left, anterior up), so a NIfTI and the DICOM it came from give the same images.
Spacing comes from the affine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import zlib

import numpy as np

from medcls.core.errors import ScanTooLargeError, UnreadableScanError
from medcls.io.budget import check_volume, decode_slot
from medcls.io.display import window_presets
from medcls.io.geometry import PLANES, plane_of_normal
from medcls.io.load import scan_from_array
from medcls.io.scan import Scan
from medcls.io.series import Finding, FindingKind, Series, SliceRef, uid_hash

#: Largest NIfTI volume medcls expands (voxels).
MAX_VOXELS = 512 * 512 * 1024


# (row, column, slice) axis codes per plane: the orientation DICOM viewers show (row direction
# and column direction of a standard DICOM slice, slices ascending along its normal)
_DISPLAY_AXES = {"axial": ("P", "L", "S"), "coronal": ("I", "L", "P"), "sagittal": ("I", "P", "R")}


_HEADER_BYTES = 540  # a NIfTI-2 header; NIfTI-1's is 348


def _gunzip(data: bytes, size: int) -> bytes:
    """The first ``size`` bytes of a gzip stream (never more: a bomb is not expanded)."""
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        return d.decompress(data, size)
    except zlib.error:
        raise UnreadableScanError("The .nii.gz file is damaged and cannot be expanded.") from None


def _nifti_header(head: bytes):
    """The NIfTI-1 or -2 header at the start of ``head`` (nibabel; no voxels read)."""
    import io

    import nibabel as nib

    for cls in (nib.Nifti1Header, nib.Nifti2Header):
        try:
            hdr = cls.from_fileobj(io.BytesIO(head), check=True)
        except Exception:  # noqa: BLE001 - try the other version, then refuse
            continue
        if hdr.get("magic", b"") in (b"n+1", b"n+2"):  # one file: the voxels follow the header
            return hdr
    raise UnreadableScanError("The NIfTI file is damaged or not a single-file NIfTI-1/2 image.")


@dataclasses.dataclass(frozen=True)
class _Plan:
    header: object
    shape: tuple  # the header's dimensions (2 to 4 of them)
    dtype: np.dtype  # stored voxel type, byte order included
    offset: int  # where the voxels start
    slope: float
    inter: float

    @property
    def scaled(self) -> bool:
        return (self.slope, self.inter) != (1.0, 0.0)

    @property
    def first_volume(self) -> tuple[int, int, int]:
        rows, cols = self.shape[0], self.shape[1]
        return rows, cols, self.shape[2] if len(self.shape) > 2 else 1

    @property
    def needed_bytes(self) -> int:
        """Bytes of the file up to the end of the first volume (the rest is never expanded)."""
        return self.offset + int(np.prod(self.first_volume)) * self.dtype.itemsize


def _plan(head: bytes) -> _Plan:
    """What the header declares, checked before anything is expanded or allocated."""
    hdr = _nifti_header(head)
    shape = tuple(int(n) for n in hdr.get_data_shape())
    if len(shape) < 2 or len(shape) > 4 or any(n < 1 for n in shape):
        raise UnreadableScanError("The NIfTI image is not a 2-D or 3-D volume.")
    try:
        dtype = np.dtype(hdr.get_data_dtype())
    except Exception:  # noqa: BLE001 - an unknown datatype code
        raise UnreadableScanError("The NIfTI voxel type is not supported (expected numbers).") from None
    if dtype.kind not in "iuf" or dtype.itemsize > 8:
        raise UnreadableScanError("The NIfTI voxel type is not supported (expected numbers).")
    slope, inter = hdr.get_slope_inter()
    slope = 1.0 if slope is None or not np.isfinite(slope) or slope == 0 else float(slope)
    inter = 0.0 if inter is None or not np.isfinite(inter) else float(inter)
    plan = _Plan(hdr, shape, dtype, int(hdr.get_data_offset()), slope, inter)
    if int(np.prod(plan.first_volume)) > MAX_VOXELS:
        raise ScanTooLargeError("The NIfTI volume holds more voxels than medcls decodes.")
    return plan


def load_nifti_volume(data: bytes) -> tuple[np.ndarray, np.ndarray, str, list[Finding]]:
    """(volume (rows, columns, slices), its LPS affine, plane, findings) of NIfTI bytes, turned
    to the display orientation of its plane with slices along the acquisition axis.

    Within the decode budget (:func:`medcls.io.budget.check_volume`), planned from the header
    alone before anything is expanded or allocated: the expanded file up to the end of the first
    volume, the volume kept (float32 when the header scales the values: a 261 KB .nii.gz of
    512x512x1024 int8 with a scale slope declares 1 GB of them) and one slice's working copies.
    The voxels are then read as a view of the expanded bytes and copied once, turned and scaled
    in that copy."""
    from nibabel.orientations import (
        apply_orientation,
        axcodes2ornt,
        inv_ornt_aff,
        io_orientation,
        ornt_transform,
    )

    gz = data[:2] == b"\x1f\x8b"
    plan = _plan(_gunzip(data, _HEADER_BYTES) if gz else data[:_HEADER_BYTES])
    check_volume(plan.first_volume, plan.dtype.itemsize,
                 plan.needed_bytes if gz else 0, plan.scaled, "NIfTI volume")
    findings: list[Finding] = []
    if len(plan.shape) == 4 and plan.shape[3] > 1:
        findings.append(Finding(FindingKind.FIRST_VOLUME_ONLY,
                                f"A 4-D NIfTI ({plan.shape[3]} volumes): only the first is shown."))
    with decode_slot():
        raw = _gunzip(data, plan.needed_bytes) if gz else data
        if len(raw) < plan.needed_bytes:
            raise UnreadableScanError("The NIfTI image data is damaged or cut short.")
        voxels = np.frombuffer(raw, plan.dtype, count=int(np.prod(plan.first_volume)),
                               offset=plan.offset).reshape(plan.first_volume, order="F")
        affine = np.asarray(plan.header.get_best_affine(), dtype=float)
        if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            affine = np.diag([1.0, 1.0, 1.0, 1.0])
        dim_info = plan.header.get_dim_info()
        slice_axis = dim_info[2] if dim_info[2] is not None and dim_info[2] < 3 else 2
        ornt = io_orientation(affine)
        plane = PLANES[int(ornt[slice_axis, 0])]
        transform = ornt_transform(ornt, axcodes2ornt(_DISPLAY_AXES[plane]))
        affine = affine @ inv_ornt_aff(transform, voxels.shape)
        view = apply_orientation(voxels, transform)  # flips and a transpose: still a view
        # the one copy: contiguous, in float32 when the header scales the values
        vol = np.array(view, dtype=np.float32 if plan.scaled else plan.dtype.newbyteorder("="),
                       order="C")
        del voxels, view, raw
        if plan.scaled:
            vol *= np.float32(plan.slope)
            vol += np.float32(plan.inter)
            if not np.isfinite(vol).all():
                raise UnreadableScanError("The NIfTI scale factors give values out of range.")
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    return vol, lps, plane, findings


def nifti_series(name: str, data: bytes) -> Series:
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
                     pixel_spacing=pixel, thickness=spacing, uid_hash=uid_hash(content, k),
                     content_hash=content) for k in range(n)]
    _, oblique = plane_of_normal(normal)
    meta = {"Format": "NIfTI", "Rows": rows, "Columns": cols, "Slices": n,
            "PixelSpacing": list(pixel), "SpacingBetweenSlices": spacing}

    def make(k: int) -> Scan:
        arr = vol[:, :, k]
        scan = scan_from_array(arr, modality="OT", pixel_spacing=pixel)
        return dataclasses.replace(
            scan, source_format="nifti", frame=k, n_frames=n, sha256=content,
            metadata={**meta, "Slice": k + 1}, window_presets=window_presets("OT", scan.values))

    s = Series(key=content[:12], label=f"NIfTI · {plane} · {n} slices", kind="nifti",
               modality="OT", plane=plane, oblique=oblique, slices=refs, positions=positions,
               pixel_spacing=pixel, slice_thickness=spacing, slice_spacing=spacing,
               ordered_by="volume axis", findings=findings, metadata=meta)
    s._make_scan = make
    return s
