"""Slice planes: the one rule that names a slice axial, coronal or sagittal (or oblique) from
its ImageOrientationPatient, for single scans, series and the model card's scope alike.
"""

from __future__ import annotations

import numpy as np

from medcls.io.scan import Scan

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
    for planes: single scans (:func:`scan_plane`, the card's scope) and series (medcls.io.gather)
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
