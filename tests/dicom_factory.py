"""Builders of synthetic DICOM datasets shared by the loader, fuzz and page tests."""

from __future__ import annotations

import io

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
