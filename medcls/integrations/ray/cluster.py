"""A Ray cluster for MedCLS's jobs: connecting (a given address, ``$RAY_ADDRESS`` or a local
Ray), the runtime environment every worker gets (this ``medcls`` package, shipped by Ray, and
quiet TensorFlow), and a model package's files sent through the object store so workers need
no copy of ``models/``.

Nothing here runs unless asked (``medcls review --engine ray``, ``medcls train --workers N``,
the batch page's cluster option when ``ray_address`` is set in :mod:`medcls.core.settings`);
``ray`` is imported inside the functions, so importing this module never imports ray.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from medcls.core.errors import ClusterError, ModelPackageError
from medcls.core.settings import PACKAGE_DIR, load_settings
from medcls.engine.inference import Predictor
from medcls.models.package import CARD_FILE, GATE_FILE, MODEL_FILE, read_card

log = logging.getLogger(__name__)


#: CPU share Ray reserves for one model actor and for one decoding task: a one-CPU node runs an
#: actor and two decoding tasks side by side (TensorFlow and OpenCV use the node's cores whatever
#: Ray reserves; this only decides how many run at once). The two differ on purpose: equal
#: resources would let Ray Data fuse decoding into the actors, serialising it behind the model.
ACTOR_CPUS = 0.5
TASK_CPUS = 0.25
#: Environment of Ray's worker processes (TensorFlow's C++ log chatter off).
WORKER_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONWARNINGS": "ignore::DeprecationWarning"}


def runtime_env() -> dict:
    """What every worker of our jobs gets: this ``medcls`` package (shipped by Ray, so remote
    nodes need only the same Python environment) and quiet TensorFlow."""
    return {"py_modules": [str(PACKAGE_DIR)], "env_vars": dict(WORKER_ENV)}


def connect(address: str | None = None):
    """Connect this process to the cluster at ``address`` (``auto``, ``host:port``,
    ``ray://host:10001``; None: the ``ray_address`` setting, else ``$RAY_ADDRESS``, else a new
    local Ray). Once per process."""
    try:
        import ray
    except ImportError:
        raise ClusterError("Ray is not installed: `pip install -r requirements-ray.txt` (on this "
                           "machine and every node of the cluster).") from None
    if ray.is_initialized():
        return ray
    address = address or load_settings().ray_address  # None: $RAY_ADDRESS, else a local Ray
    try:
        ray.init(address=address, runtime_env=runtime_env(), log_to_driver=False,
                 logging_level=logging.WARNING, include_dashboard=False if address is None else None)
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as exc:
        raise ClusterError(f"Could not connect to the Ray cluster at {address or 'auto'}: "
                           f"{type(exc).__name__}. Is it running (`ray status`)?") from None
    return ray


def cluster_nodes() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))


def predictor_from_files(package_files: dict[str, bytes]):
    """A :class:`Predictor` from a package's files (received through Ray's object store)."""

    root = Path(tempfile.mkdtemp(prefix="medcls-model-"))
    folder = root / "package"
    try:
        for name, content in package_files.items():  # "../<companion>/..." lands beside it
            path = (folder / name).resolve()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        predictor = Predictor.from_path(folder)
        if any(name.startswith("../") for name in package_files):
            predictor.segmenter  # the companion shipped with it, loaded while its files exist
        return predictor
    finally:
        shutil.rmtree(root, ignore_errors=True)  # the models are in memory now


def package_files(model_dir: str | Path, companion: bool = False) -> dict[str, bytes]:
    """The files a model package is loaded from (what actors receive through Ray); with
    ``companion``, also the segmentation package its card names (series answers measure the
    tumour's volume with it; per-file review never loads it)."""
    folder = Path(model_dir)
    card = read_card(folder)  # a broken package is refused here, before any cluster work
    files = {name: (folder / name).read_bytes() for name in (MODEL_FILE, CARD_FILE, GATE_FILE)
             if (folder / name).is_file()}
    companion = companion and card.get("segmentation")  # its folder name, beside the package
    if companion and not (folder.parent / companion).is_dir():
        raise ModelPackageError(f"Model {card.get('name')!r} names the segmentation package "
                                f"{companion!r}, which is not in the models folder.")
    if companion:
        files.update({f"../{companion}/{name}": (folder.parent / companion / name).read_bytes()
                      for name in (MODEL_FILE, CARD_FILE)
                      if (folder.parent / companion / name).is_file()})
    return files


def data_context():
    from ray import data

    logging.getLogger("ray.data").setLevel(logging.ERROR)  # the terminal shows our progress only
    ctx = data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # rows in input order, as the local engine
    ctx.enable_progress_bars = False  # progress is ours (terminal or page)
    return data
