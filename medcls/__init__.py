"""MedCLS: deep-learning classification of medical images.

The library behind the Streamlit app: loading (:mod:`medcls.scan`), one preprocessing
contract (:mod:`medcls.preprocess`), datasets (:mod:`medcls.data`), networks
(:mod:`medcls.architectures`), training, evaluation, calibration, saliency and
inference. It never imports streamlit.
"""

from .errors import (DatasetError, MedclsError, ModelPackageError, PathNotAllowedError,
                     ScanTooLargeError, UnreadableScanError)
from .scan import Scan, display_image, identifying_attributes, load_scan

__version__ = "0.1.0"

__all__ = [
    "DatasetError", "MedclsError", "ModelPackageError", "PathNotAllowedError", "Scan",
    "ScanTooLargeError", "UnreadableScanError", "display_image", "identifying_attributes",
    "load_scan", "__version__",
]
