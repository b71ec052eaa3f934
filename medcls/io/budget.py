"""The decode budget: every decode is planned in bytes from the header first (full, reduced
resolution, or refused), and a process-wide semaphore caps concurrent decodes.

The pixel limit alone does not bound memory: a 570 KB PNG of 7999x7999 RGB at 16 bits is under
it but decodes to 384 MB, and its float32 working copies made it peak at 3.4 GB. The limits are
settings (:mod:`medcls.core.settings`, section ``[decode]``).
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import numpy as np

from medcls.core.errors import DecodeBudgetError

#: Largest image medcls decodes, in pixels per frame (a 30000x30000 PNG is refused).
MAX_PIXELS = 64_000_000


def _decode_settings():
    from medcls.core.settings import load_settings

    return load_settings().decode


def decode_budget() -> int:
    """Bytes one decode may use: the decoded pixels plus the working copies preprocessing makes
    (setting ``MEDCLS_DECODE_BUDGET_MB`` / ``[decode] budget_mb``, default 1024)."""
    return int(_decode_settings().budget_mb * (1 << 20))


def max_concurrent_decodes() -> int:
    """Decodes one server process runs at once; more wait (``MEDCLS_MAX_DECODES``, default 2)."""
    return _decode_settings().max_concurrent


def decode_timeout() -> float:
    """Seconds a compressed DICOM frame may take to decode (``MEDCLS_DECODE_TIMEOUT_S``, 30)."""
    return _decode_settings().timeout_s


_slots_lock = threading.Lock()
_slots: threading.BoundedSemaphore | None = None


@contextlib.contextmanager
def decode_slot():
    """Hold one of the server's concurrent decode slots (a process-wide semaphore): with the
    per-decode budget, it bounds the memory decoding can take however many users upload."""
    global _slots
    with _slots_lock:
        if _slots is None:
            _slots = threading.BoundedSemaphore(max_concurrent_decodes())
        slots = _slots
    with slots:
        yield


def working_bytes(width: int, height: int, samples: int, bytes_per_sample: int,
                  extra_per_sample: int = 0) -> int:
    """Peak bytes of decoding one frame and preprocessing it: the decoded pixels; per sample the
    float32 modality values and the two float32 copies windowing holds at once (plus
    ``extra_per_sample``, e.g. a float64 rescale); per pixel the float32 grayscale image, the
    int32 component labels and uint8 masks of the foreground step."""
    per_sample = bytes_per_sample + 3 * 4 + extra_per_sample
    return int(width) * int(height) * (int(samples) * per_sample + 12)


@dataclass(frozen=True)
class DecodePlan:
    factor: int  # 1: full resolution; 2, 4, 8: each side divided by it
    samples: int  # samples per pixel to decode (1 when a colour image is decoded as gray)
    need: int  # bytes, as :func:`working_bytes` counts them


REDUCTIONS = (2, 4, 8)


def plan_decode(width: int, height: int, samples: int, bytes_per_sample: int,
                reduce: str | None = "after", gray_ok: bool = False, extra_per_sample: int = 0,
                budget: int | None = None) -> DecodePlan:
    """How to decode an image within the budget. ``reduce``: "decoder" when the decoder itself
    decodes at a reduced size (JPEG's DCT scaling: no full-size buffer), "after" when the frame
    is decoded at full size then downsampled before any float copy (PNG, TIFF, BMP through
    OpenCV; DICOM), None when it cannot be reduced. ``gray_ok``: the decoder can give one
    sample instead of three. Colour is kept before resolution. Raises :class:`DecodeBudgetError`
    naming the budget when nothing fits."""
    budget = decode_budget() if budget is None else budget
    full = working_bytes(width, height, samples, bytes_per_sample, extra_per_sample)
    if full <= budget:
        return DecodePlan(1, samples, full)
    for out_samples in ((samples, 1) if gray_ok and samples > 1 else (samples,)):
        first = width * height * out_samples * bytes_per_sample if reduce == "after" else 0
        for factor in REDUCTIONS if reduce else ():
            need = first + working_bytes(width // factor, height // factor, out_samples,
                                         bytes_per_sample, extra_per_sample)
            if need <= budget:
                return DecodePlan(factor, out_samples, need)
    raise DecodeBudgetError(
        f"Decoding this image ({width}x{height} pixels, {samples} x {8 * bytes_per_sample} bits) "
        f"would need about {full / 2**30:.1f} GB of memory, more than the decode budget of "
        f"{budget / 2**30:.2g} GB (MEDCLS_DECODE_BUDGET_MB)"
        + (", even at reduced resolution" if reduce else "") + "; it was not opened.")


def volume_bytes(shape: tuple[int, int, int], stored_itemsize: int, held_bytes: int,
                 scaled: bool) -> tuple[int, int]:
    """Peak bytes of opening a volume (a NIfTI) and of showing one slice of it:
    ``held_bytes`` (the expanded file, held while the voxels are copied out of it), the volume
    kept for the series (float32 when a scale slope or intercept applies, else its stored
    type) and one slice's working copies (:func:`working_bytes`). Returns (need, kept)."""
    rows, cols, slices = (int(n) for n in shape)
    kept = rows * cols * slices * (4 if scaled else int(stored_itemsize))
    one_slice = working_bytes(cols, rows, 1, 4 if scaled else int(stored_itemsize))
    return int(held_bytes) + kept + one_slice, kept


def check_volume(shape: tuple[int, int, int], stored_itemsize: int, held_bytes: int,
                 scaled: bool, what: str = "volume", budget: int | None = None) -> int:
    """The bytes a volume keeps once open (:func:`volume_bytes`), or
    :class:`DecodeBudgetError` naming the budget when its peak would not fit: checked from the
    header, before the file is expanded or any voxel array allocated."""
    budget = decode_budget() if budget is None else budget
    need, kept = volume_bytes(shape, stored_itemsize, held_bytes, scaled)
    if need > budget:
        rows, cols, slices = shape
        raise DecodeBudgetError(
            f"Opening this {what} ({cols}x{rows} pixels x {slices} slices) would need about "
            f"{need / 2**30:.1f} GB of memory, more than the decode budget of "
            f"{budget / 2**30:.2g} GB (MEDCLS_DECODE_BUDGET_MB); it was not opened.")
    return kept


def rescaled_spacing(spacing: tuple[float, float] | None, full_shape: tuple[int, int] | None,
                      shape: tuple[int, int]) -> tuple[float, float] | None:
    """Pixel spacing of a frame decoded at reduced size: each decoded pixel covers
    full/decoded original pixels per axis, so lengths and areas in mm stay right."""
    if spacing is None or full_shape is None:
        return spacing
    return (spacing[0] * full_shape[0] / shape[0], spacing[1] * full_shape[1] / shape[1])


def reduction_note(full_shape: tuple[int, int] | None, pixels: np.ndarray) -> dict[str, str]:
    if full_shape is None:
        return {}
    return {"DecodedSize": f"{pixels.shape[1]}x{pixels.shape[0]} of {full_shape[1]}x"
                           f"{full_shape[0]} (reduced to stay within the decode budget)"}
