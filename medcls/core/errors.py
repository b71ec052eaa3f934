"""Typed errors of medcls.

Every failure a user can cause (a bad file, a broken model folder, a path outside
the allowed root) raises a subclass of :class:`MedclsError` whose message is written
for the person in front of the screen. Messages never carry values read from the
file (no patient names, ids or dates): only what went wrong and what to do.
"""


class MedclsError(Exception):
    """Base class of every error medcls raises on purpose."""


class UnreadableScanError(MedclsError):
    """The input is not an image or DICOM file medcls can read."""


class ScanTooLargeError(UnreadableScanError):
    """The image declares more pixels or frames than medcls will decode."""


class ModelPackageError(MedclsError):
    """A model folder is missing its card or the card disagrees with the model."""


class DatasetError(MedclsError):
    """A dataset folder or labels file cannot be used."""


class PathNotAllowedError(MedclsError):
    """A folder or archive member lies outside the allowed root."""


class ArchiveRejectedError(MedclsError):
    """A .zip that medcls refuses to expand (unsafe names, too large, a zip bomb)."""


class IncompatibleModelsError(MedclsError, ValueError):
    """The models of one comparison do not share the task or the class list (or are too few)."""


class UnknownChoiceError(MedclsError, ValueError):
    """A name looked up in a registry (architecture, saliency method) is not in it."""


class SettingsError(MedclsError):
    """A setting (environment variable or secrets.toml entry) has a value medcls cannot use."""


class WrongModalityError(MedclsError):
    """A DICOM scan of another modality than the model was trained on (a CT given to an MR model)."""


class DecodeBudgetError(ScanTooLargeError):
    """Decoding the image (its pixels and the working copies preprocessing makes) would need
    more memory than the decode budget, even at the smallest resolution the format allows."""


class DecoderFailedError(UnreadableScanError):
    """The image decoder crashed, hung or ran out of its memory limit on this file (it runs in
    a separate process, so the server keeps running)."""


class PacsError(MedclsError):
    """A PACS (DICOMweb) request failed. Messages name no patient, study or URL query."""


class PacsUnreachableError(PacsError):
    """The PACS did not answer (down, wrong address, or too slow)."""


class PacsAuthError(PacsError):
    """The PACS refused the credentials (HTTP 401/403)."""


class StudyNotFoundError(PacsError):
    """The PACS holds no study (or series) with the requested UID."""


class NotAnImageError(PacsError):
    """A DICOM object of a series holds no image (a report, a presentation state ...)."""


class ClusterError(MedclsError):
    """The Ray cluster cannot be reached or a job on it failed."""


class AuditError(MedclsError):
    """The audit database cannot record or read: unreachable, locked or read-only."""


class AuditSchemaError(AuditError):
    """The audit database holds a schema this version of medcls does not know."""


class AccessDeniedError(MedclsError):
    """The signed-in user may not use this page or action."""


class PretrainedWeightsError(ModelPackageError):
    """A pretrained weights file (an ImageNet backbone) is malformed, refused (a pickle naming
    anything but tensors) or does not match the network it is loaded into."""


class OutputWriteError(MedclsError):
    """An output file (a worklist, an export) could not be written, e.g. the disk is full;
    nothing partial is left in its place."""


class ListenerError(MedclsError):
    """The DICOM listener (medcls.integrations.dicomnode) cannot start or cannot do what was
    asked of it (a port in use, no calling AE title accepted, a job that cannot be retried)."""
