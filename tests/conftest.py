"""Shared fixtures. The read-only data folder is $MEDCLS_DATA, else <project>/../shared/data."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from medcls.settings import load_settings

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("MEDCLS_DATA", PROJECT_ROOT.parent / "shared" / "data")).resolve()


def require(path: Path) -> Path:
    """``path`` if it exists, else skip the calling test (the data set is not on this machine)."""
    path = Path(path)
    if not path.exists():
        pytest.skip(f"test data not found: {path}")
    return path


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The read-only data folder (never write into it)."""
    return require(DATA_DIR)


# ----------------------------------------------------------------------------- model packages

MODELS_DIR = load_settings().models_dir.resolve()


def model_package(task: str) -> Path:
    """The model package folder for ``task`` under $MEDCLS_MODELS (default <project>/models),
    preferring a ``*-default`` package; skips the calling test when there is none (models are
    trained separately and land in models/)."""
    from medcls.package import MODEL_FILE, list_packages

    found = [(p, c) for p, c in list_packages(MODELS_DIR)
             if c["task"] == task and (p / MODEL_FILE).is_file()]
    if not found:
        pytest.skip(f"no model package with task {task!r} in {MODELS_DIR} (train one, or set "
                    "MEDCLS_MODELS)")
    found.sort(key=lambda pc: (not pc[1]["name"].endswith("-default"), pc[1]["name"]))
    return found[0][0]


@pytest.fixture(scope="session")
def brain_model_dir() -> Path:
    """Folder of the brain-mri model package (skips without one)."""
    return model_package("brain-mri")


@pytest.fixture(scope="module")
def brain_predictor(brain_model_dir):
    """A Predictor of the brain-mri package, loaded once per test module."""
    from medcls.inference import Predictor

    return Predictor.from_path(brain_model_dir)


# ----------------------------------------------------------------------------- PACS

@pytest.fixture(scope="session")
def orthanc():
    """A real Orthanc (DICOMweb plugin, authentication on) on free loopback ports, with its
    own temporary storage; stopped and removed after the session."""
    from orthanc import Orthanc

    server = Orthanc().start()
    yield server
    server.cleanup()


# ----------------------------------------------------------------------------- series

@dataclass
class BuiltSeries:
    """A brain MRI series built from brain-mri test images: normal slices around a run of
    tumour slices the default model answers confidently (chosen by the model, so the run is
    real), as 16-bit arrays in body order."""

    arrays: list  # (rows, cols) uint16, in body order
    tumour: range  # indices of the tumour slices
    tumour_class: str
    spacing_mm: float = 5.0

    def dicom(self, **kwargs) -> list[bytes]:
        from dicom_factory import series_files

        return series_files(self.arrays, self.spacing_mm, **kwargs)


def _brain_array(path: Path, size: int = 256):
    import cv2
    import numpy as np

    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    return (img.astype(np.uint16) * 16)  # 12-bit values, as an MR slice stores them


@pytest.fixture(scope="session")
def built_series(data_dir, brain_model_dir) -> BuiltSeries:
    """6 normal, 5 tumour (one class), 5 normal slices; each chosen because the default model
    answers it confidently and inside its training distribution."""
    import csv

    from medcls.findings import finding_probability
    from medcls.inference import Predictor
    from medcls.scan import scan_from_array

    predictor = Predictor.from_path(brain_model_dir)
    card, thr = predictor.card, float(predictor.card["low_confidence_threshold"])
    with open(data_dir / "brain-mri" / "labels.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "test"]

    def confident(label: str, want: int, tumour: bool) -> list:
        out = []
        for r in (r for r in rows if r["label"] == label):
            arr = _brain_array(data_dir / "brain-mri" / r["file"])
            p = predictor.predict(scan_from_array(arr))
            pf = float(finding_probability(p.probabilities, card))
            if not p.outside_training_distribution and (pf >= thr if tumour else pf <= 1 - thr) \
                    and (not tumour or p.label == label):
                out.append(arr)
                if len(out) == want:
                    return out
        pytest.fail(f"fewer than {want} confident {label} test images")

    normal = confident("no_tumor", 11, tumour=False)
    tumour = confident("meningioma", 5, tumour=True)
    return BuiltSeries(normal[:6] + tumour + normal[6:], range(6, 11), "meningioma")
