"""DICOM headers: parsing (pydicom, values never echoed), the allow-list of technical
attributes that is a scan's metadata, the identifying attributes shown only on request,
pixel spacing, and the words for a codec that cannot decode.

Patient data: the returned metadata is built from an allow-list of technical attributes, so
nothing of the DICOM PS3.15 basic profile (names, ids, dates, institutions, UIDs, free-text
descriptions) is ever in it. :func:`identifying_attributes` reads the identifying tags only
when a caller asks for them deliberately.
"""

from __future__ import annotations

import io
import logging
import warnings
from typing import Any

from medcls.core.errors import UnreadableScanError
from medcls.io.scan import ScanInput, read_source, sniff_format

log = logging.getLogger(__name__)


# Technical DICOM attributes safe to show (none is in the PS3.15 basic profile's
# list of attributes to remove or replace). Anything not listed is left out.
SAFE_DICOM_ATTRIBUTES = (
    "Modality", "BodyPartExamined", "ImageType", "Manufacturer", "ManufacturerModelName",
    "MagneticFieldStrength", "ScanningSequence", "SequenceVariant", "MRAcquisitionType",
    "SequenceName", "ScanOptions", "PulseSequenceName", "EchoPulseSequence",
    "RepetitionTime", "EchoTime", "InversionTime", "FlipAngle", "KVP", "ExposureTime",
    "SliceThickness", "SpacingBetweenSlices", "PixelSpacing", "ImagerPixelSpacing",
    "Rows", "Columns", "NumberOfFrames", "BitsAllocated", "BitsStored", "HighBit",
    "PixelRepresentation", "SamplesPerPixel", "PhotometricInterpretation",
    "RescaleSlope", "RescaleIntercept", "RescaleType", "WindowCenter", "WindowWidth",
    "SeriesNumber", "InstanceNumber", "AcquisitionNumber", "ImagePositionPatient",
    "ImageOrientationPatient", "SliceLocation", "PatientPosition", "ViewPosition",
    "ContrastBolusAgent", "LossyImageCompression",
)


# Identifying attributes (PS3.15 Annex E basic profile: patient, person, institution,
# date and identifier attributes). Shown only on explicit request, never stored.
IDENTIFYING_ATTRIBUTES = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime", "PatientSex",
    "PatientAge", "PatientWeight", "PatientSize", "PatientAddress", "PatientTelephoneNumbers",
    "OtherPatientIDs", "OtherPatientNames", "PatientMotherBirthName", "EthnicGroup",
    "MilitaryRank", "Occupation", "AdditionalPatientHistory", "PatientComments",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "StationName",
    "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName",
    "NameOfPhysiciansReadingStudy", "PhysiciansOfRecord", "RequestingPhysician",
    "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "StudyTime", "SeriesTime",
    "AcquisitionTime", "ContentTime", "AccessionNumber", "StudyID", "StudyDescription",
    "SeriesDescription", "ProtocolName", "DeviceSerialNumber", "StudyInstanceUID",
    "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID",
)


def configure_pydicom() -> None:
    import pydicom.config

    # pydicom's validation warnings and decoder error logs can quote element values
    # (names, dates): medcls reports its own typed error instead, so they are silenced.
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)


def read_dataset(data: bytes, stop_before_pixels: bool = False):
    import pydicom

    configure_pydicom()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(io.BytesIO(data), force=True,
                                   stop_before_pixels=stop_before_pixels)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types; never echo values
        log.debug("DICOM parse failed: %s", type(exc).__name__)
        raise UnreadableScanError("The DICOM file is damaged and cannot be read.") from None


def first_value(value: Any) -> Any:
    if value is None:
        return None
    try:
        from pydicom.multival import MultiValue

        if isinstance(value, (MultiValue, list, tuple)):
            return value[0] if len(value) else None
    except ImportError:  # pragma: no cover
        pass
    return value


def to_python(value: Any) -> Any:
    from pydicom.multival import MultiValue
    from pydicom.valuerep import IS, DSfloat

    if isinstance(value, (MultiValue, list, tuple)):
        return [to_python(v) for v in value]
    if isinstance(value, DSfloat):
        return float(value)
    if isinstance(value, IS):
        return int(value)
    if isinstance(value, (int, float, str)):
        return value
    return str(value)


def safe_metadata(ds) -> dict[str, Any]:
    meta: dict[str, Any] = {"Format": "DICOM"}
    for keyword in SAFE_DICOM_ATTRIBUTES:
        try:
            if keyword in ds:
                value = ds[keyword].value
                if value is not None and value != "":
                    meta[keyword] = to_python(value)
        except Exception:  # noqa: BLE001 - a malformed element is left out
            continue
    try:
        meta["TransferSyntax"] = ds.file_meta.TransferSyntaxUID.name
    except Exception:  # noqa: BLE001
        pass
    try:
        meta["SOPClass"] = ds.SOPClassUID.name
    except Exception:  # noqa: BLE001
        pass
    return meta


def identifying_attributes(src: ScanInput) -> dict[str, str]:
    """The identifying DICOM attributes of a file, for a deliberate "show identifying tags" view.

    Callers must not log, store or export the result. Plain images have none.
    """
    data = read_source(src)
    if sniff_format(data) != "dicom":
        return {}
    ds = read_dataset(data, stop_before_pixels=True)
    out: dict[str, str] = {}
    for keyword in IDENTIFYING_ATTRIBUTES:
        try:
            if keyword in ds and ds[keyword].value not in (None, ""):
                out[keyword] = str(ds[keyword].value)
        except Exception:  # noqa: BLE001
            continue
    return out


def transfer_syntax_of(ds):
    try:
        return ds.file_meta.TransferSyntaxUID
    except Exception:  # noqa: BLE001
        return None


def is_encapsulated(ds) -> bool:
    """True for compressed (encapsulated) pixel data: undefined length, split into fragments."""
    try:
        return "PixelData" in ds and bool(ds["PixelData"].is_undefined_length)
    except Exception:  # noqa: BLE001
        return False


def dicom_pixel_spacing(ds) -> tuple[float, float] | None:
    """(row, column) spacing in mm from PixelSpacing, else ImagerPixelSpacing; None when absent."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            sp = ds.get(keyword)
            if sp is not None and len(sp) == 2 and float(sp[0]) > 0 and float(sp[1]) > 0:
                return float(sp[0]), float(sp[1])
        except Exception:  # noqa: BLE001
            continue
    return None


#: RLE Lossless: the one compressed transfer syntax that allows 32 and 64 bits allocated (the
#: JPEG family, JPEG-LS and JPEG 2000 carry 8 or 16); decoded by pydicom and pylibjpeg-rle only.
_RLE = "1.2.840.10008.1.2.5"


def check_compressed_pixel_attributes(ds, syntax) -> None:
    """Refuse compressed pixel data whose image description no codec can honour, before any
    decoder sees it, with a message that says so. GDCM (a fallback decoder) aborts its process
    (C++ terminate) on, e.g., JPEG data declaring 1 or 32 bits allocated; the decoding worker
    process (:mod:`medcls.io.decoder`) is what keeps such an abort, or any other, from stopping
    the server: this check only names the cause for the cases fuzzing found."""
    if not is_encapsulated(ds):
        return

    def number(keyword: str, default: int | None = None) -> int | None:
        try:
            value = ds.get(keyword)
            return default if value is None or value == "" else int(value)
        except Exception:  # noqa: BLE001
            return -1  # present but not a number: invalid

    bits = number("BitsAllocated")
    stored = number("BitsStored", bits)
    samples = number("SamplesPerPixel", 1)
    representation = number("PixelRepresentation", 0)
    planar = number("PlanarConfiguration", 0)
    allowed_bits = (8, 16, 32, 64) if str(syntax or "") == _RLE else (8, 16)
    if (bits not in allowed_bits or stored is None or not 1 <= stored <= bits
            or samples not in (1, 3) or representation not in (0, 1)
            or (samples == 3 and planar not in (0, 1))):
        raise UnreadableScanError("The DICOM image description (bits allocated, bits stored, "
                                  "samples per pixel) is invalid for its compressed pixel data.")


def is_cut_short(ds) -> bool:
    """True when the last element read declares more bytes than the file held (a truncated file:
    pydicom keeps the short value silently)."""
    try:
        tags = list(ds.keys())
        if not tags:
            return False
        raw = ds.get_item(tags[-1])
        length = int(getattr(raw, "length", 0) or 0)
        value = getattr(raw, "value", None)
        return (isinstance(value, (bytes, bytearray)) and length != 0xFFFFFFFF
                and len(value) < length)
    except Exception:  # noqa: BLE001
        return False


def infer_transfer_syntax(ds) -> None:
    """A data set without file meta information (no preamble, no group 0002) has no Transfer
    Syntax UID, which pixel decoding needs. Native (uncompressed) pixel data is then in the
    encoding pydicom detected while parsing; encapsulated pixel data cannot be guessed."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    try:
        if "TransferSyntaxUID" in getattr(ds, "file_meta", {}):
            return
        if "PixelData" in ds and ds["PixelData"].is_undefined_length:
            return  # encapsulated (compressed): the codec is unknown
        implicit, little = ds.original_encoding
        if implicit is None or little is None:
            return
        syntax = (ImplicitVRLittleEndian if implicit else
                  ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        if getattr(ds, "file_meta", None) is None:
            ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = syntax
    except Exception:  # noqa: BLE001 - left as is; decoding then reports a typed error
        return


def is_unsupported_codec(exc: Exception) -> bool:
    """True when the decoders refused the compression itself (no codec for it, or not for this
    precision), False when they tried and found the data damaged. pydicom wraps every plugin's
    failure in "Unable to decode as exceptions were raised by all available plugins": that
    preamble says nothing about which case it is, so only the plugins' own reasons count."""
    text = str(exc).lower().replace("unable to decode as exceptions were raised by all "
                                    "available plugins", "")
    return any(k in text for k in ("no pixel data decoders", "not supported", "unsupported",
                                   "does not support", "cannot decode", "precision",
                                   "missing dependenc", "no plugin"))


def codec_message(syntax) -> str:
    """Why the pixel data cannot be decoded. Names only transfer syntaxes of the DICOM standard:
    an unknown UID is text from the file (never quoted in a message)."""
    if syntax is not None and str(syntax) == "1.2.840.10008.1.2.4.51":
        return ("This DICOM uses 12-bit lossy JPEG compression (JPEG Extended), which cannot be "
                "decoded here. Export it uncompressed or losslessly compressed and try again.")
    try:
        known = bool(syntax is not None and syntax.is_transfer_syntax)
        compressed = known and bool(syntax.is_compressed)
    except Exception:  # noqa: BLE001 - a private or malformed UID
        known = compressed = False
    if compressed:
        return f"This DICOM is compressed with {syntax.name}, which cannot be decoded here."
    if syntax is None:  # a bare data set (no file meta) with compressed pixel data
        return ("This DICOM does not say how its image is compressed (no transfer syntax), so "
                "it cannot be decoded.")
    if syntax is not None and not known:
        return ("This DICOM declares an encoding (transfer syntax) that medcls does not know, so "
                "its image cannot be decoded.")
    return ("This DICOM stores its pixels in a layout that cannot be decoded here (bits "
            "allocated, samples per pixel or photometric interpretation).")
