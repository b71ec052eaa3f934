"""How a slice was acquired, read from its own DICOM tags: the plane and, for MR, the sequence
(T1, T2, FLAIR, T2*, PD, STIR, diffusion/EPI) and whether a contrast agent was given.

A model card names the planes and sequences its model was validated on; a scan outside them is
withheld with that reason (:meth:`medcls.models.card.ModelCard.scope_note`). The sequence rule
reads the physics first (scanning sequence, TR, TE, TI: an inversion time over 1500 ms nulls
fluid, so FLAIR; a gradient echo with TE of 10 ms or more is T2*-weighted; a spin echo with TR
under 1000 ms and TE under 30 ms is T1-weighted ...), then, when timing is missing, the vendor's
sequence name (Siemens ``*tfl3d`` MPRAGE, ``*tir2d`` inversion recovery, ``*fl`` FLASH,
``*se``/``*tse`` spin echo, ``*ep`` EPI). Plain images carry none of this: their plane and
sequence are unknown, and only the input gate and the confidence threshold judge them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from medcls.io.geometry import plane_of_normal, slice_normal

T1, T2, FLAIR, T2_STAR, PD, STIR, DIFFUSION = "T1", "T2", "FLAIR", "T2*", "PD", "STIR", "DWI/EPI"
SEQUENCE_NAMES = {T1: "T1-weighted", T2: "T2-weighted", FLAIR: "FLAIR (T2 with fluid suppressed)",
                  T2_STAR: "T2*-weighted gradient echo", PD: "proton-density-weighted",
                  STIR: "STIR (short-tau inversion recovery)", DIFFUSION: "diffusion-weighted or EPI"}


@dataclass(frozen=True)
class Acquisition:
    """What the file says about how the slice was acquired; ``None`` where it says nothing."""

    plane: str | None = None  # axial, coronal, sagittal
    oblique: bool = False
    sequence: str | None = None  # one of SEQUENCE_NAMES' keys (MR only)
    contrast: bool | None = None  # a contrast agent is named (None: the file does not say)
    sequence_why: str = ""  # the tags that decided the sequence, for a tooltip or a log

    @property
    def sequence_text(self) -> str:
        """The sequence in words, with contrast: "T1-weighted with contrast"."""
        if self.sequence is None:
            return "an unrecognised sequence"
        text = SEQUENCE_NAMES.get(self.sequence, self.sequence)
        return text + (" with contrast" if self.contrast else "")


def _strings(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v).upper() for v in value]
    return [s for s in re.split(r"[\\/ ,]+", str(value).upper()) if s]


def _number(meta: Mapping, key: str) -> float | None:
    value = meta.get(key)
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def mr_sequence(meta: Mapping) -> tuple[str | None, str]:
    """(sequence, why) from a slice's technical DICOM attributes (the scan's metadata)."""
    scanning = set(_strings(meta.get("ScanningSequence")))
    options = set(_strings(meta.get("ScanOptions")))
    name = str(meta.get("SequenceName") or meta.get("PulseSequenceName") or "").lower().lstrip("*")
    tr, te, ti = (_number(meta, k) for k in ("RepetitionTime", "EchoTime", "InversionTime"))
    timing = f"TR {tr:g} ms, TE {te:g} ms" if tr and te else ""
    if "EP" in scanning or name.startswith("ep"):
        return DIFFUSION, "echo-planar scanning sequence"
    if "IR" in scanning or "IR" in options or name.startswith(("tir", "ir")):
        if ti is not None:
            if ti >= 1500:
                return FLAIR, f"inversion recovery with TI {ti:g} ms (fluid nulled)"
            if ti < 300:
                return STIR, f"inversion recovery with TI {ti:g} ms (fat nulled)"
            return T1, f"inversion recovery with TI {ti:g} ms (T1 contrast)"
        if name.startswith("tfl"):
            return T1, "magnetisation-prepared gradient echo (MPRAGE)"
        return None, "inversion recovery without an inversion time"
    if "GR" in scanning or name.startswith(("fl", "tfl", "fi", "gre", "me")):
        if name.startswith("tfl"):
            return T1, "magnetisation-prepared gradient echo (MPRAGE)"
        if te is not None:
            if te >= 10:
                return T2_STAR, f"gradient echo with TE {te:g} ms"
            return T1, f"spoiled gradient echo with TE {te:g} ms" + (f", TR {tr:g} ms" if tr else "")
        return None, "gradient echo without an echo time"
    if "SE" in scanning or name.startswith(("se", "tse", "fse")):
        if tr is None or te is None:
            return None, "spin echo without TR and TE"
        if tr < 1000 and te < 30:
            return T1, f"spin echo, {timing}"
        if tr >= 1500 and te >= 60:
            return T2, f"spin echo, {timing}"
        if tr >= 1500 and te < 40:
            return PD, f"spin echo, {timing}"
        return None, f"spin echo of intermediate weighting, {timing}"
    return None, "no scanning sequence in the file"


def acquisition_of(meta: Mapping, modality: str | None = None) -> Acquisition:
    """The acquisition of a slice from its metadata (a :class:`~medcls.io.scan.Scan`'s
    ``metadata``, the technical allow-list only)."""
    plane, oblique = plane_of_normal(slice_normal(meta.get("ImageOrientationPatient")))
    sequence, why = (None, "")
    if (modality or meta.get("Modality")) == "MR" and meta.get("Format") == "DICOM":
        sequence, why = mr_sequence(meta)
    agent = meta.get("ContrastBolusAgent")
    contrast = None if agent is None else bool(str(agent).strip()) and str(agent).strip().upper() not in ("NONE", "NO")
    return Acquisition(plane=plane, oblique=oblique, sequence=sequence, contrast=contrast,
                       sequence_why=why)
