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
from medcls.io.display import window_presets
from medcls.io.geometry import PLANES, plane_of_normal
from medcls.io.load import scan_from_array
from medcls.io.scan import MAX_FILE_BYTES, Scan
from medcls.io.series import Finding, FindingKind, Series, SliceRef, uid_hash

#: Largest NIfTI volume medcls expands (voxels).
MAX_VOXELS = 512 * 512 * 1024


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
    from nibabel.orientations import (
        apply_orientation,
        axcodes2ornt,
        inv_ornt_aff,
        io_orientation,
        ornt_transform,
    )

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
