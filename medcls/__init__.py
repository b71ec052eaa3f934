"""MedCLS: deep-learning classification of medical images.

The library behind the Streamlit app: loading (:mod:`medcls.io.load`), one preprocessing
contract (:mod:`medcls.io.preprocess`), datasets (:mod:`medcls.learning.data`), networks
(:mod:`medcls.models.architectures`), training, evaluation, calibration, saliency and
inference. It never imports streamlit.
"""

from medcls.core.errors import (
    DatasetError,
    MedclsError,
    ModelPackageError,
    PathNotAllowedError,
    ScanTooLargeError,
    UnreadableScanError,
)
from medcls.io.dicom_tags import identifying_attributes
from medcls.io.display import display_image
from medcls.io.load import load_scan
from medcls.io.scan import Scan

__version__ = "0.1.0"

__all__ = [
    "DatasetError", "MedclsError", "ModelPackageError", "PathNotAllowedError", "Scan",
    "ScanTooLargeError", "UnreadableScanError", "display_image", "identifying_attributes",
    "load_scan", "__version__",
]
