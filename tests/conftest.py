"""Shared fixtures. The read-only data folder is $MEDCLS_DATA, else <project>/../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from medcls.settings import load_settings

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("MEDCLS_DATA", PROJECT_ROOT.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session", autouse=True)
def _audit_database(tmp_path_factory):
    """Pages record every answer: in the tests they go to a temporary SQLite file (and the
    servers the tests start inherit it), never to the project's var/audit.sqlite."""
    if "MEDCLS_DATABASE_URL" not in os.environ:
        path = tmp_path_factory.mktemp("audit") / "audit.sqlite"
        os.environ["MEDCLS_DATABASE_URL"] = f"sqlite:///{path}"
    yield os.environ["MEDCLS_DATABASE_URL"]


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
