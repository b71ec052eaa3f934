"""Shared fixtures and helpers (test modules import this one, never each other).

The read-only data folder is $MEDCLS_DATA, else <project>/../shared/data. Model packages come
from the settings' models folder ($MEDCLS_MODELS, else <project>/models).
"""

from __future__ import annotations

import csv
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from medcls.core.settings import load_settings

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


_REAL_MAIN = sys.modules.get("__main__")  # pytest's own, read when the suite starts


@pytest.fixture(autouse=True)
def _main_module_kept():
    """Streamlit's AppTest runs a page as ``__main__`` and leaves it in ``sys.modules``; a
    process started later with multiprocessing's spawn (the audit's concurrent writers) would
    then run that page as its main module, fail, and be started again for ever (the pool
    hangs: CI stopped at its time limit in test_eight_concurrent_writers_lose_no_row). The
    suite's real main module is put back before and after every test, so a module-scoped
    fixture that ran a page (test_page_errors' warm-up) cannot leave it behind either."""
    if _REAL_MAIN is not None and sys.modules.get("__main__") is not _REAL_MAIN:
        sys.modules["__main__"] = _REAL_MAIN
    yield
    if _REAL_MAIN is not None and sys.modules.get("__main__") is not _REAL_MAIN:
        sys.modules["__main__"] = _REAL_MAIN


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


def pdf_text(pdf: bytes) -> str:
    """The text a PDF shows, as a reader extracts it (poppler's ``pdftotext``: what a person's
    search or copy finds), plus the file's raw bytes (document info and any uncompressed part).
    Fails if the PDF holds no extractable text, so a report drawn as glyph pictures fails."""
    import shutil
    import subprocess

    exe = shutil.which("pdftotext")
    if exe is None:
        pytest.fail("pdftotext is not installed (apt-get install poppler-utils; .ci/run does)")
    proc = subprocess.run([exe, "-enc", "UTF-8", "-", "-"], input=pdf, capture_output=True,
                          timeout=60, check=True)
    shown = proc.stdout.decode("utf-8")
    assert shown.strip(), "the PDF has no extractable text"
    return shown + "\n" + pdf.decode("latin-1")


def split_rows(data_dir: Path, task: str, split: str = "test", label: str | None = None) -> list[dict]:
    """The rows of ``<data>/<task>/labels.csv`` in ``split`` (and of ``label``), each with
    ``path``: the file's absolute path. Skips the calling test without the data set."""
    root = require(Path(data_dir) / task)
    with open(require(root / "labels.csv"), newline="") as fh:
        rows = [r for r in csv.DictReader(fh)
                if r.get("split") == split and (label is None or r["label"] == label)]
    for r in rows:
        r["path"] = root / r["file"]
    return rows


@pytest.fixture(scope="session")
def brain_test_jpeg(data_dir) -> Path:
    """The first test-split JPEG of the brain-MRI data set."""
    for row in split_rows(data_dir, "brain-mri"):
        if row["file"].lower().endswith((".jpg", ".jpeg")):
            return require(row["path"])
    pytest.skip("no test-split JPEG in brain-mri/labels.csv")


# ----------------------------------------------------------------------------- model packages

MODELS_DIR = load_settings().models_dir.resolve()


def model_package(task: str) -> Path:
    """The model package folder for ``task`` under $MEDCLS_MODELS (default <project>/models),
    preferring a ``*-default`` package; skips the calling test when there is none (models are
    trained separately and land in models/)."""
    from medcls.models.package import MODEL_FILE, list_packages

    found = [(p, c) for p, c in list_packages(MODELS_DIR)
             if c["task"] == task and (p / MODEL_FILE).is_file()]
    if not found:
        pytest.skip(f"no model package with task {task!r} in {MODELS_DIR} (train one, or set "
                    "MEDCLS_MODELS)")
    found.sort(key=lambda pc: (not pc[1]["name"].endswith("-default"), pc[1]["name"]))
    return found[0][0]


def model_packages(task: str, n: int) -> list[Path]:
    """The first ``n`` packages of ``task`` in the models folder (sorted by name), or skip."""
    from medcls.models.package import list_packages

    found = [p for p, card in list_packages(MODELS_DIR) if card.task == task]
    if len(found) < n:
        pytest.skip(f"needs {n} {task} model packages in {MODELS_DIR}, found {len(found)}")
    return found[:n]


@pytest.fixture(scope="session")
def brain_model_dir() -> Path:
    """Folder of the brain-mri model package (skips without one)."""
    return model_package("brain-mri")


@pytest.fixture(scope="module")
def brain_predictor(brain_model_dir):
    """A Predictor of the brain-mri package, loaded once per test module."""
    from medcls.engine.inference import Predictor

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


@pytest.fixture(scope="session")
def pg_url():
    """A real PostgreSQL on a free localhost port with temporary storage, for the whole run."""
    from pgserver import postgres_server

    with postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def audit_url(request, tmp_path):
    """An empty audit database: SQLite in a folder not yet created (created on first use), then
    the PostgreSQL server, its tables dropped after the test."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'sub' / 'audit.sqlite'}"
        return
    import sqlalchemy as sa

    from medcls.integrations.audit import store as audit

    base = request.getfixturevalue("pg_url")
    yield base
    engine = sa.create_engine(base.replace("postgresql://", "postgresql+psycopg://"))
    audit.metadata.drop_all(engine)  # the next test starts from an empty database
    engine.dispose()


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

    from medcls.engine.findings import finding_probability
    from medcls.engine.inference import Predictor
    from medcls.io.load import scan_from_array

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

# ----------------------------------------------------------------------------- the shipped models

SHIPPED = ["brain-mri-default", "brain-mri-fast", "brain-mri-compact-cnn", "brain-mri-seed-cnn", "chest-xray-default"]


def shipped_package(name: str) -> Path:
    """The folder of a shipped model in <project>/models (a missing one fails: they ship)."""
    path = PROJECT_ROOT / "models" / name
    if not (path / "card.json").is_file():
        pytest.fail(f"shipped model {name} is missing from models/")
    return path


@pytest.fixture(scope="module")
def predictors():
    """``predictors(name)``: a Predictor of a shipped model, loaded once per test module."""
    from medcls.engine.inference import Predictor

    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = Predictor.from_path(shipped_package(name))
        return cache[name]

    return get


# ----------------------------------------------------------------------------- the app

@pytest.fixture(scope="module")
def app_env(brain_model_dir: Path):
    """The app's environment for a test module: the models folder of the brain-MRI package,
    the project folder on sys.path (pages import ``ui``), the cached model list forgotten."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MEDCLS_MODELS", str(brain_model_dir.parent))
    mp.syspath_prepend(str(PROJECT_ROOT))  # app.py imports ui from the app folder
    _clear_model_list()
    yield brain_model_dir
    _clear_model_list()
    mp.undo()


def _clear_model_list() -> None:
    """The model list is cached per process (st.cache_data): forget it, so the page lists the
    packages of this module's MEDCLS_MODELS."""
    from ui import models

    for fn in (models.available_models, models._packages):
        if hasattr(fn, "clear"):
            fn.clear()


# ----------------------------------------------------------------------------- the clinician's screen

def unsure_agreement_case(data_dir: Path, model_dirs, limit: int = 120) -> Path | None:
    """A brain-MRI test image on which the models of ``model_dirs`` all give the same class,
    each below its own low-confidence threshold (issue 14's "agree, but every model is unsure"
    case), found with the library; ``None`` among the first ``limit`` test images."""
    from medcls.engine import present
    from medcls.engine.inference import Predictor
    from medcls.io.load import load_scan

    predictors = [Predictor.from_path(p) for p in model_dirs]
    for row in split_rows(data_dir, "brain-mri")[:limit]:
        scan = load_scan(row["path"])
        state = present.agreement_state([p.predict(scan) for p in predictors])
        if state.state == "agree_unsure" and "every model is unsure" in state.text:
            return row["path"]
    return None


# ----------------------------------------------------------------------------- servers and browser

@pytest.fixture(scope="module")
def app_server():
    """Factory of real app servers (``streamlit run app.py`` on a free loopback port, the shipped
    models): ``app_server(**env)`` starts one per distinct environment (and ``args=[...]`` of
    ``streamlit run``, ``port=`` when the caller needs it known first); all are stopped when the
    module ends."""
    from appserver import AppServer

    require(PROJECT_ROOT / "models" / "brain-mri-default")
    started: dict = {}

    def start(args: tuple | list = (), port: int | None = None, **env) -> "AppServer":
        key = (tuple(args), port, tuple(sorted(env.items())))
        if key not in started:
            started[key] = AppServer(env=env, args=list(args), port=port).start()
        return started[key]

    yield start
    for srv in started.values():
        srv.stop()


@pytest.fixture(scope="module")
def shipped_models() -> Path:
    """The shipped models folder; the module is skipped when the default model is not there."""
    require(PROJECT_ROOT / "models" / "brain-mri-default")
    return PROJECT_ROOT / "models"


@pytest.fixture(scope="module")
def chromium():
    """One headless Chromium (Debian's) per test module."""
    from appserver import browser

    with browser() as b:
        yield b


@pytest.fixture(scope="session")
def mprage_files(data_dir) -> list[Path]:
    """The 24 files of the MPRAGE sample series (with sample patient tags)."""
    files = sorted(require(data_dir / "dicom" / "mprage-series").glob("*.dcm"))
    assert len(files) == 24, "SOURCE.md documents 24 slices"
    return files
