"""Builders of synthetic DICOM datasets shared by the loader, fuzz and page tests."""

from __future__ import annotations

import io

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
MULTIFRAME_WORD_SC = "1.2.840.10008.5.1.4.1.1.7.3"  # multi-frame grayscale word secondary capture


def new_dataset(syntax=ExplicitVRLittleEndian, sop_class: str = SECONDARY_CAPTURE,
                modality: str = "OT") -> Dataset:
    """An empty image dataset with its file meta: transfer syntax, SOP class and fresh UIDs."""
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = syntax
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    return ds


def grayscale16(ds: Dataset, rows: int, cols: int, frames: int = 1, bits_stored: int = 16) -> Dataset:
    """Set the pixel module of an unsigned 16-bit MONOCHROME2 image (frames > 1: multi-frame)."""
    ds.Rows, ds.Columns = rows, cols
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    return ds


def to_bytes(ds: Dataset, file_format: bool = True) -> bytes:
    """The dataset as a DICOM Part 10 file; ``file_format=False`` writes it as it stands (a
    dataset read with dcmread and then damaged keeps its own preamble and file meta)."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=file_format)
    return buf.getvalue()


MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"


def mr_slice(pixels, position=None, orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
             spacing=(1.0, 1.0), thickness: float | None = 5.0, instance: int | None = None,
             study_uid: str | None = None, series_uid: str | None = None,
             series_number: int = 1) -> Dataset:
    """One MR slice of a series: 16-bit ``pixels`` (rows, cols) at ``position`` (LPS, mm) with
    ``orientation`` (row then column direction cosines). ``None`` leaves an attribute out."""
    import numpy as np

    pixels = np.ascontiguousarray(pixels, dtype=np.uint16)
    ds = grayscale16(new_dataset(sop_class=MR_IMAGE, modality="MR"), *pixels.shape)
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.SeriesNumber = series_number
    if instance is not None:
        ds.InstanceNumber = instance
    if position is not None:
        ds.ImagePositionPatient = [float(v) for v in position]
    if orientation is not None:
        ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = [float(v) for v in spacing]
    if thickness is not None:
        ds.SliceThickness = thickness
    ds.PixelData = pixels.tobytes()
    return ds


def series_files(slices, spacing_mm: float = 5.0, orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
                 instance_numbers: bool = True, positions: bool = True,
                 series_number: int = 1) -> list[bytes]:
    """One DICOM file per 2-D array of ``slices``, in order along the slice normal of
    ``orientation``, ``spacing_mm`` apart, all in one new study and series."""
    import numpy as np

    study, series = generate_uid(), generate_uid()
    row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    normal = np.cross(row, col)
    out = []
    for i, pixels in enumerate(slices):
        pos = (np.array([-100.0, -100.0, -40.0]) + i * spacing_mm * normal) if positions else None
        out.append(to_bytes(mr_slice(pixels, pos, orientation, instance=i + 1 if instance_numbers
                                     else None, study_uid=study, series_uid=series,
                                     series_number=series_number, thickness=spacing_mm)))
    return out

def synthetic_dicom(syntax=ExplicitVRLittleEndian, rows: int = 16, cols: int = 16,
                    frames: int = 1, pixel_data: bytes | None = None, **attrs) -> bytes:
    """A 16-bit grayscale DICOM file with ``attrs`` set as written (DS values as raw text, even
    "nan"), random pixels unless given, encapsulated for a compressed ``syntax``."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    ds = grayscale16(new_dataset(syntax), rows, cols, frames)
    for k, v in attrs.items():
        if isinstance(v, str) and k in ("RescaleSlope", "RescaleIntercept", "WindowCenter",
                                        "WindowWidth"):  # as written in the file, even "nan"
            raw = v.encode() + b" " * (len(v) % 2)
            ds[Tag(k)] = RawDataElement(Tag(k), "DS", len(raw), raw, 0, False, True)
        else:
            setattr(ds, k, v)
    if pixel_data is None:
        n = rows * cols * frames * ds.SamplesPerPixel * (ds.BitsAllocated // 8)
        pixel_data = np.random.default_rng(0).integers(0, 256, n, np.uint8).tobytes()
    if syntax.is_compressed:
        item = b"\xfe\xff\x00\xe0"
        pixel_data = (item + b"\x00" * 4 + item + len(pixel_data).to_bytes(4, "little")
                      + pixel_data + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00")
        ds.PixelData = pixel_data
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    else:
        ds.PixelData = pixel_data
    return to_bytes(ds)


def copy_series(files, study: str | None = None) -> list:
    """The instances of ``files`` as a new series (new Series and SOP Instance UIDs; a new study
    unless ``study`` is given), patient tags kept: one real series sent again and again."""
    import pydicom

    study, series = study or generate_uid(), generate_uid()
    out = []
    for f in files:
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        out.append(ds)
    return out
