"""A site's adapted models on disk: which is the site's default, discarding one, the folder of
confirmed cases (inside the scan folder) or an uploaded zip of them, and the background job the
Adapt page drives.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
from pathlib import Path

from medcls.core.errors import MedclsError, ModelPackageError
from medcls.learning.adapt import AdaptationRejectedError, AdaptConfig, adapt, is_adapted

log = logging.getLogger(__name__)


SITE_DEFAULT_FILE = "site_default.json"


def site_defaults(models_root: str | Path) -> dict[str, str]:
    """{task: model folder name} from the models folder's marker file."""
    path = Path(models_root) / SITE_DEFAULT_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def set_site_default(model_folder: str | Path) -> None:
    """Make a package its task's site default; refuses an adapted model whose adaptation was
    rejected (:class:`AdaptationRejectedError`)."""
    from medcls.models.package import read_card

    folder = Path(model_folder)
    card = read_card(folder)
    if is_adapted(card) and not card["adaptation"].get("accepted"):
        raise AdaptationRejectedError(
            f"{card.name} cannot become the site default: its adaptation was rejected ("
            + "; ".join(card["adaptation"].get("reasons", [])) + "). The parent stays the default.")
    defaults = site_defaults(folder.parent) | {card.task: folder.name}
    (folder.parent / SITE_DEFAULT_FILE).write_text(json.dumps(defaults, indent=2) + "\n")


def discard(model_folder: str | Path) -> None:
    """Delete a site-adapted package (never a model that is not one) and its default marker."""
    from medcls.models.package import read_card

    folder = Path(model_folder)
    card = read_card(folder)
    if not is_adapted(card):
        raise ModelPackageError(f"{card.name} is not a site-adapted model: it is not deleted here.")
    defaults = site_defaults(folder.parent)
    if defaults.get(card.task) == folder.name:
        del defaults[card.task]
        (folder.parent / SITE_DEFAULT_FILE).write_text(json.dumps(defaults, indent=2) + "\n")
    shutil.rmtree(folder)


def cases_folder(scan_root: str | Path, user_path: str | Path | None) -> Path:
    """A confirmed-cases folder inside the allowed scan folder (not the scan folder itself, whose
    subfolders are not classes), every file its labels.csv names inside it too
    (:class:`~medcls.core.errors.PathNotAllowedError` otherwise)."""
    import csv

    from medcls.core.errors import PathNotAllowedError
    from medcls.io.sources import resolve_inside

    if not str(user_path or "").strip():
        raise PathNotAllowedError("Name the folder of confirmed cases (inside the scan folder), "
                                  "or upload them as a .zip.")
    folder = resolve_inside(scan_root, str(user_path).strip())
    if folder == Path(scan_root).resolve():
        raise PathNotAllowedError("The scan folder itself is not a folder of confirmed cases: name "
                                  "the folder inside it that holds labels.csv or one folder per class.")
    if not folder.is_dir():
        raise PathNotAllowedError("That path is not a folder.")
    labels = folder / "labels.csv"
    if labels.is_file():
        with labels.open(newline="") as fh:
            for row in csv.DictReader(fh):
                path = (folder / (row.get("file") or "")).resolve()
                if folder not in path.parents:
                    raise PathNotAllowedError("labels.csv names a file outside its folder; the "
                                              "confirmed cases must lie inside the folder.")
    return folder


def unlabelled_folder(scan_root: str | Path, user_path: str | Path | None) -> str | None:
    """The folder of a site's unlabelled scans, checked inside the scan folder, as the path
    relative to it (None when not given)."""
    from medcls.core.errors import PathNotAllowedError
    from medcls.io.sources import resolve_inside

    if not str(user_path or "").strip():
        return None
    folder = resolve_inside(scan_root, str(user_path).strip())
    if not folder.is_dir():
        raise PathNotAllowedError("The unlabelled scans' path is not a folder.")
    return str(folder.relative_to(Path(scan_root).resolve())) or "."


def unpack_cases(data: bytes, dest: str | Path) -> Path:
    """An uploaded .zip of confirmed cases (checked like the review's uploads) expanded into
    ``dest``; returns the folder holding labels.csv (or the class folders)."""
    import io
    import zipfile
    from pathlib import PurePosixPath

    from medcls.io.sources import zip_sources

    dest = Path(dest)
    sources = zip_sources(data)  # names, sizes and ratios checked before anything is expanded
    with zipfile.ZipFile(io.BytesIO(data)) as zf:  # zip_sources leaves labels.csv out: add it
        members = [(i.filename, lambda i=i: zf.read(i)) for i in zf.infolist()
                   if PurePosixPath(i.filename).name == "labels.csv" and not i.is_dir()]
        for name, read in [(s.name, s.read) for s in sources] + members:
            path = dest / name
            path.parent.mkdir(parents=True, exist_ok=True)
            content = read()
            path.write_bytes(content if isinstance(content, bytes) else Path(content).read_bytes())
    subs = [p for p in dest.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))]
    return subs[0] if not (dest / "labels.csv").is_file() and len(subs) == 1 \
        and (subs[0] / "labels.csv").is_file() else dest


def new_package_folder(models_root: str | Path, parent_name: str) -> Path:
    """``<models>/<parent>-site`` (``-site-2``, ... when taken)."""
    root = Path(models_root)
    folder, i = root / f"{parent_name}-site", 1
    while folder.exists():
        i += 1
        folder = root / f"{parent_name}-site-{i}"
    return folder


class AdaptationJob:
    """One adaptation run in a background thread, polled by the page: ``stage``/``fraction``
    while it runs, then ``record`` (the result) or ``error`` (a :class:`MedclsError`)."""

    def __init__(self, cfg: AdaptConfig):
        self.cfg = cfg
        self.stage, self.fraction = "queued", 0.0
        self.record: dict | None = None
        self.error: MedclsError | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="medcls-adapt")

    def start(self) -> "AdaptationJob":
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _progress(self, stage: str, fraction: float) -> None:
        self.stage, self.fraction = stage, fraction

    def _run(self) -> None:
        try:
            self.record = adapt(self.cfg, command="admin page", on_progress=self._progress)
        except MedclsError as exc:
            self.error = exc
        except Exception as exc:  # noqa: BLE001 - the page shows a message, not a trace
            log.exception("adaptation failed")
            self.error = MedclsError(f"Adaptation failed ({type(exc).__name__}); see the server log.")
        finally:
            self.stage = "failed" if self.error else "done"
