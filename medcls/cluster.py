"""Review and training on a Ray cluster, for archives and retraining runs that outgrow one machine.

Integrations layer: nothing here runs unless asked (``medcls review --engine ray``, ``medcls
train --workers N``, the batch page's cluster option when ``ray_address`` is set in
:mod:`medcls.settings`), and ``ray`` is imported inside the
functions, so ``import medcls`` (and this module) never imports ray. The single-machine engine
(:mod:`medcls.review`) stays the default and is reused, not copied:

Review (Ray Data)
    sources (a server folder or a list file of paths, as :class:`medcls.review.Source`) ->
    ``from_items`` (index, path) -> ``map_batches(_decode)``: tasks that read each file's bytes
    and decode and preprocess them with :func:`medcls.inference.load_stream_item` (the local
    engine's own function: same reader, same :mod:`medcls.preprocess`, same error messages) ->
    ``map_batches(_Classifier)``: a pool of actors, each loading the model package once (its
    files travel through Ray's object store, so workers need no copy of ``models/``) ->
    the driver turns the outputs into :class:`medcls.review.ReviewRow` with the local engine's
    row code, in input order. Files are read by path: on a real cluster the scans must sit on
    storage every node mounts at the same path (NFS, a PACS export share).

    A list file may also name PACS series (a line holding a SeriesInstanceUID,
    :func:`cluster_sources`): the decoding task retrieves the series itself
    (:mod:`medcls.pacs`, QIDO-RS to find its study, then WADO-RS) with the PACS settings of this
    process (:func:`medcls.pacs.pacs_settings`, passed to the tasks: the nodes need no PACS
    configuration), and gives one row per instance, named by a hash of the UID.

Review by series (``--by-series``)
    The files are gathered into series here (:func:`medcls.study.gather`: header reads, as
    locally); each series, with any series it shares a file with, is one unit of work for a
    pool of actors that gather the unit's files again and answer it with
    :func:`medcls.series_answer.answer_series` (the local engine's function: slices in batches,
    the study summary, the run's regions and volume), returning its by-series and slice
    records. A PACS series is a unit retrieved and gathered by the actor.

    Fault tolerance is Ray's: a decoding task whose process dies is re-run, a model actor that
    dies is restarted and its batch re-submitted (Ray Data's defaults ``max_restarts=-1``,
    ``max_task_retries=-1``); a re-run batch replaces the lost one, so every input still gives
    exactly one row (``tests/test_cluster.py`` kills a worker mid-run to check).

Training (Ray Train)
    :func:`train_on_ray` runs :func:`medcls.train.train` in every worker of a
    ``TensorflowTrainer`` (which sets ``TF_CONFIG``) under a ``MultiWorkerMirroredStrategy``:
    the same ``tf.data`` pipeline, auto-sharded so each worker reads its share of every batch.
    Worker 0's output, a normal model package, is reported as the Ray checkpoint and copied to
    ``--out``: checkpoint and package are the same format as local training.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator, Sequence

import numpy as np

from .errors import ClusterError, MedclsError, ModelPackageError
from .inference import Prediction, Predictor, StreamItem, check_modality, load_stream_item
from .package import CARD_FILE, GATE_FILE, MODEL_FILE, read_card
from .calibration import InputGate
from .preprocess import PreprocessSpec, preprocess
from .review import Progress, ReviewRow, Source, cli_sources, row_from_item
from .settings import load_settings

log = logging.getLogger(__name__)

#: CPU share Ray reserves for one model actor and for one decoding task: a one-CPU node runs an
#: actor and two decoding tasks side by side (TensorFlow and OpenCV use the node's cores whatever
#: Ray reserves; this only decides how many run at once). The two differ on purpose: equal
#: resources would let Ray Data fuse decoding into the actors, serialising it behind the model.
ACTOR_CPUS = 0.5
TASK_CPUS = 0.25
#: Environment of Ray's worker processes (TensorFlow's C++ log chatter off).
WORKER_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONWARNINGS": "ignore::DeprecationWarning"}


# ----------------------------------------------------------------------------- connection

def runtime_env() -> dict:
    """What every worker of our jobs gets: this ``medcls`` package (shipped by Ray, so remote
    nodes need only the same Python environment) and quiet TensorFlow."""
    return {"py_modules": [str(Path(__file__).resolve().parent)], "env_vars": dict(WORKER_ENV)}


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


# ----------------------------------------------------------------------------- review

#: A DICOM UID (digits and dots, at most 64 characters): a list file's line naming a PACS series.
_UID = re.compile(r"^[0-9]+(\.[0-9]+)+$")


@dataclass(frozen=True)
class PacsSeries:
    """What the source of a PACS series UID reads to: the UID, retrieved by the cluster's tasks
    (:func:`_pacs_instances`), never by this process."""

    series_uid: str = field(repr=False)

    def __repr__(self) -> str:  # no UIDs in logs
        from .pacs import handle

        return f"PacsSeries({handle(self.series_uid)})"


def is_series_uid(text: str) -> bool:
    return len(text) <= 64 and _UID.match(text) is not None


def pacs_source_name(series_uid: str) -> str:
    """The worklist's name of a PACS series: a short hash of its UID (no UIDs in outputs)."""
    from .pacs import handle

    return f"pacs series {handle(series_uid)}"


def cluster_sources(source: str | Path) -> list[Source]:
    """``medcls review SOURCE --engine ray``: a folder tree, or a list file whose lines are paths
    or PACS series (a SeriesInstanceUID: a line of digits and dots that names no file). Paths are
    the local engine's :func:`medcls.review.cli_sources`."""
    path = Path(source)
    sources = cli_sources(path)
    if not path.is_file():
        return sources
    out = []
    for s in sources:
        if is_series_uid(s.name) and not Path(os.fspath(s.read())).exists():
            out.append(Source(pacs_source_name(s.name), lambda u=s.name: PacsSeries(u)))
        else:
            out.append(s)
    return out


def _target(src: Source):
    """A source's path or PACS series; uploads (bytes) are refused: the cluster reads itself."""
    target = src.read()
    if not isinstance(target, (str, os.PathLike, PacsSeries)):
        raise ClusterError("The Ray engine reads scans by path or from the PACS (a server folder "
                           "or a list file); uploaded files are reviewed on this server.")
    return target


def path_items(sources: Sequence[Source]) -> list[dict]:
    """The sources as rows for Ray Data: index, path or PACS series UID, and the refusal of a
    source that may not be read (a link out of the allowed folder) as its error."""
    items = []
    for i, src in enumerate(sources):
        try:
            target = _target(src)
        except ClusterError:
            raise
        except MedclsError as exc:
            items.append({"index": i, "path": "", "pacs": "", "error": str(exc)})
            continue
        if isinstance(target, PacsSeries):
            items.append({"index": i, "path": "", "pacs": target.series_uid, "error": ""})
        else:
            items.append({"index": i, "path": os.fspath(target), "pacs": "", "error": ""})
    return items


def _pacs_for(items: Sequence[dict]):
    """The PACS connection settings when ``items`` name PACS series (they travel to the tasks,
    which retrieve the series themselves), else None."""
    if not any(it.get("pacs") for it in items):
        return None
    from .pacs import pacs_settings

    settings = pacs_settings()
    if settings is None:
        raise ClusterError("The list names PACS series but no PACS is configured (set "
                           "MEDCLS_PACS_URL, or [pacs] url in .streamlit/secrets.toml).")
    return settings


def _pacs_instances(series_uid: str, settings) -> list[tuple[str, bytes]]:
    """Inside a task: the series' instances retrieved from the PACS (WADO-RS) with the settings'
    credentials, named ``pacs series <hash> · <n>`` in InstanceNumber order."""
    import pydicom

    from .pacs import PacsClient

    client = PacsClient(settings)
    info = client.find_series(series_uid)

    def order(inst):
        try:
            ds = pydicom.dcmread(io.BytesIO(inst.data), stop_before_pixels=True, force=True)
            number = int(ds.get("InstanceNumber"))
        except Exception:  # noqa: BLE001 - no number: after the numbered ones
            number = 1 << 30
        return number, inst.sop_instance_uid

    instances = sorted(client.iter_series(info.study_uid, series_uid), key=order)
    name = pacs_source_name(series_uid)
    return [(f"{name} · {k}", inst.data) for k, inst in enumerate(instances, start=1)]


def _decode(batch: dict, spec: dict, modality: str | None, model_name: str, pacs=None) -> dict:
    """Ray Data task: read, decode and preprocess a block of files with the local engine's
    loader and :meth:`Predictor.preprocess`'s steps (the card's modality check, then the spec).
    A PACS series is retrieved here and gives one row per instance (``name`` says which)."""
    spec_ = PreprocessSpec.from_dict(spec)
    shape = (spec_.input_size, spec_.input_size, spec_.channels)

    def prepare(scan):
        check_modality(scan, modality, model_name)
        return preprocess(scan, spec_)
    indices, names, xs, errors, infos = [], [], [], [], []

    def add(index, name, target, error):
        pre, info = None, {}
        if not error:
            item, pre = load_stream_item(target, prepare)
            error, info = item.error or "", item.info
        indices.append(index)
        names.append(name)
        xs.append(pre.array.astype(np.float32) if pre is not None else np.zeros(shape, np.float32))
        errors.append(error)
        infos.append(json.dumps({k: info.get(k) for k in ("modality", "series_number", "instance_number",
                                                          "plane")}))
    for index, path, uid, error in zip(batch["index"], batch["path"], batch["pacs"], batch["error"]):
        if uid and not error:
            try:
                instances = _pacs_instances(str(uid), pacs)
            except MedclsError as exc:  # the series is one row with the PACS's reason
                add(index, "", None, str(exc))
                continue
            for name, data in instances:
                add(index, name, data, "")
            if not instances:
                add(index, "", None, "The PACS sent no instance of this series.")
        else:
            add(index, "", str(path), error)
    return {"index": np.array(indices, dtype=np.int64), "name": np.array(names, dtype=object),
            "x": np.stack(xs) if xs else np.zeros((0, *shape), np.float32),
            "error": np.array(errors, dtype=object), "info": np.array(infos, dtype=object)}


def _predictor_from_files(package_files: dict[str, bytes]):
    """A :class:`Predictor` from a package's files (received through Ray's object store)."""
    from .inference import Predictor

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


class _Classifier:
    """Ray Data actor: loads the model package once, classifies preprocessed batches."""

    def __init__(self, package_files: dict[str, bytes]):
        self.predictor = _predictor_from_files(package_files)

    def __call__(self, batch: dict) -> dict:
        n, k = len(batch["index"]), len(self.predictor.classes)
        ok = np.array([not e for e in batch["error"]], dtype=bool)
        logits = np.full((n, k), np.nan)
        probs = np.full((n, k), np.nan)
        gate = np.full(n, np.nan)
        if ok.any():
            for j, p in zip(np.nonzero(ok)[0], self.predictor.predict_arrays(batch["x"][ok])):
                logits[j], probs[j] = p.logits, p.probabilities
                gate[j] = np.nan if p.gate_score is None else p.gate_score
        return {"index": batch["index"], "name": batch["name"], "probabilities": probs,
                "logits": logits, "gate_score": gate, "error": batch["error"], "info": batch["info"]}


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


def _data_context():
    from ray import data

    logging.getLogger("ray.data").setLevel(logging.ERROR)  # the terminal shows our progress only
    ctx = data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # rows in input order, as the local engine
    ctx.enable_progress_bars = False  # progress is ours (terminal or page)
    return data


def run_review(model_dir: str | Path, sources: Sequence[Source], address: str | None = None,
               batch_size: int = 32, actors: int | None = None,
               stop: threading.Event | None = None,
               on_progress: Callable[[Progress], None] | None = None) -> Iterator[ReviewRow]:
    """:func:`medcls.review.run_review` on a Ray cluster: rows for ``sources`` in input order as
    batches finish (a PACS series gives one row per instance). ``actors`` model actors (default:
    one per node). Set ``stop`` to end early."""
    card = read_card(model_dir)
    classes = tuple(card["classes"])
    gate_threshold = (InputGate.load(Path(model_dir) / GATE_FILE).threshold
                      if (Path(model_dir) / GATE_FILE).is_file() else None)
    low = float(card["low_confidence_threshold"])
    scope = SimpleNamespace(card=card, name=card["name"])  # what Predictor.within_scope reads
    files = package_files(model_dir)
    items = path_items(sources)
    pacs = _pacs_for(items)
    t0 = time.perf_counter()
    if not items:
        return
    connect(address)
    data = _data_context()
    blocks = max(1, math.ceil(len(items) / batch_size))
    ds = (data.from_items(items, override_num_blocks=blocks)
          .map_batches(_decode, fn_kwargs={"spec": card["preprocessing"], "modality": card.get("modality"),
                                           "model_name": card["name"], "pacs": pacs}, batch_size=None,
                       num_cpus=TASK_CPUS)
          .map_batches(_Classifier, fn_constructor_kwargs={"package_files": files},
                       batch_size=batch_size, num_cpus=ACTOR_CPUS,
                       compute=data.ActorPoolStrategy(size=min(actors or cluster_nodes(), blocks))))
    batches = ds.iter_batches(batch_size=None, batch_format="numpy")
    try:
        for b in batches:
            for j in range(len(b["index"])):
                i = int(b["index"][j])
                error = b["error"][j] or None
                info = json.loads(b["info"][j])
                pred = None if error else Prediction(
                    classes, b["probabilities"][j], b["logits"][j],
                    None if np.isnan(b["gate_score"][j]) else float(b["gate_score"][j]),
                    gate_threshold, low)
                if pred is not None:  # the local engine's scope note (plane outside the card's)
                    pred = Predictor.within_scope(scope, pred, info.get("plane"))
                source = sources[i] if not b["name"][j] else Source(str(b["name"][j]), sources[i].read)
                yield row_from_item(StreamItem(source, pred, error, info))
            if on_progress is not None and len(b["index"]):  # inputs done (a PACS series: once whole)
                on_progress(Progress(int(b["index"][-1]) + 1, len(items), time.perf_counter() - t0))
            if stop is not None and stop.is_set():
                return
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()  # stops the streaming executor when the caller stops early


# ----------------------------------------------------------------------------- review by series

class _SeriesAnswerer:
    """Ray Data actor: loads the model package once; for each unit of sources (files that
    :func:`medcls.study.gather` puts into the same series, or one PACS series it retrieves)
    gathers them and answers every wanted series with :func:`medcls.series_answer.answer_series`,
    the local engine's own function (slices in batches, summary, the run's regions and volume)."""

    def __init__(self, package_files: dict[str, bytes], pacs=None, min_run: int | None = None):
        self.predictor = _predictor_from_files(package_files)
        self.pacs, self.min_run = pacs, min_run

    def __call__(self, batch: dict) -> dict:
        import pickle

        out = [pickle.dumps(self.answer(json.loads(u))) for u in batch["unit"]]
        return {"index": batch["index"], "result": np.array(out, dtype=object)}

    def answer(self, unit: dict) -> dict:
        from .series_answer import MIN_RUN, answer_series
        from .study import bytes_source, gather

        try:
            if unit["pacs"]:
                sources = [bytes_source(n, d) for n, d in _pacs_instances(unit["pacs"], self.pacs)]
            else:
                sources = [Source(n, lambda p=p: p) for n, p in unit["files"]]
            study = gather(sources)
        except MedclsError as exc:
            return {"error": str(exc), "findings": [], "series": []}
        wanted = unit["keys"]
        answers = [answer_series(self.predictor, s, min_run=self.min_run or MIN_RUN)
                   for s in study.series if wanted is None or s.key in wanted]
        return {"error": None, "findings": [f.message for f in study.findings],
                "series": [(a.series.key, a.as_record(), a.slice_records()) for a in answers]}


def _file_units(study, file_sources: Sequence[Source]) -> list[dict]:
    """The gathered series as units of work: series that share an input file (the stacks of a
    series mixing orientations, a duplicate's copy) go together, with every source naming their
    files, in input order (a file listed twice, twice), so gathering a unit's sources again gives
    these series with the same keys and findings."""
    names = [{r.name for r in s.slices} | {f for x in s.findings for f in x.files}
             for s in study.series]
    parent = list(range(len(names)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i
    owner: dict[str, int] = {}
    for i, ns in enumerate(names):
        for n in ns:
            if n in owner:
                parent[root(i)] = root(owner[n])
            else:
                owner[n] = i
    units: dict[int, dict] = {}
    for i in range(len(names)):
        units.setdefault(root(i), {"files": [], "pacs": "", "keys": []})["keys"].append(
            study.series[i].key)
    for src in file_sources:
        if src.name in owner:
            units[root(owner[src.name])]["files"].append((src.name, os.fspath(_target(src))))
    return list(units.values())


@dataclass
class SeriesResults:
    """What :func:`review_by_series` gives: the study's findings (messages) and one answer per
    series in the local engine's order (``record``: :meth:`SeriesAnswer.as_record`, ``slices``:
    :meth:`SeriesAnswer.slice_records`)."""

    findings: list[str]
    answers: list[dict]


def review_by_series(model_dir: str | Path, sources: Sequence[Source], address: str | None = None,
                     actors: int | None = None, min_run: int | None = None,
                     on_progress: Callable[[Progress], None] | None = None) -> SeriesResults:
    """:func:`medcls.series_answer.review_by_series` on a Ray cluster. Files are gathered into
    series here (header reads, as locally); each series (with the files it shares) is answered
    by a model actor. PACS series are retrieved and gathered by the actors; their series follow
    the files' series, in list order."""
    from .study import gather

    card = read_card(model_dir)
    files = package_files(model_dir, companion=True)
    items = path_items(sources)
    pacs = _pacs_for(items)
    file_sources = [s for s, it in zip(sources, items) if not it["pacs"]]
    study = gather(file_sources)
    units = _file_units(study, file_sources) + [{"files": [], "pacs": it["pacs"], "keys": None}
                                           for it in items if it["pacs"]]
    findings = [f.message for f in study.findings]
    if not units:
        return SeriesResults(findings, [])
    t0 = time.perf_counter()
    connect(address)
    data = _data_context()
    ds = data.from_items([{"index": k, "unit": json.dumps(u)} for k, u in enumerate(units)],
                         override_num_blocks=len(units)).map_batches(
        _SeriesAnswerer, fn_constructor_kwargs={"package_files": files, "pacs": pacs,
                                                "min_run": min_run},
        batch_size=1, num_cpus=ACTOR_CPUS,
        compute=data.ActorPoolStrategy(size=min(actors or cluster_nodes(), len(units))))
    import pickle

    results: dict[int, dict] = {}
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for k, r in zip(b["index"], b["result"]):
            results[int(k)] = pickle.loads(r)
        if on_progress is not None:
            on_progress(Progress(len(results), len(units), time.perf_counter() - t0))
    answered = {}
    for k, u in enumerate(units):
        if u["pacs"]:
            continue
        for key, record, slices in results[k]["series"]:
            answered[key] = {"record": record, "slices": slices}
    answers = []
    for s in study.series:
        if s.key not in answered:
            raise ClusterError("A series gathered on this machine was not found again on the "
                               "cluster: do all nodes see the same files at the same paths?")
        answers.append(answered[s.key])
    for k, u in enumerate(units):
        if not u["pacs"]:
            continue
        r = results[k]
        name = pacs_source_name(u["pacs"])
        if r["error"]:
            findings.append(f"{name}: {r['error']}")
        findings.extend(f"{name}: {m}" for m in r["findings"])
        answers.extend({"record": record, "slices": slices} for _, record, slices in r["series"])
    log.info("%d series answered on the cluster (card %s)", len(answers), card["name"])
    return SeriesResults(findings, answers)


def review_stream(model_path: str | Path, sources: Sequence[Source], predictor, address: str | None,
                  batch_size: int = 32, workers: int = 2,
                  stop: threading.Event | None = None) -> Iterator[ReviewRow]:
    """The batch page's one generator of rows: on this server with ``predictor`` (``address``
    None), or on the Ray cluster at ``address``. Same rows, same order, same stop event."""
    if address:
        return run_review(model_path, sources, address, batch_size=batch_size, stop=stop)
    from .review import run_review as run_here

    return run_here(predictor, sources, batch_size=batch_size, workers=workers, stop=stop)


def write_parquet(rows: Sequence[ReviewRow], classes: Sequence[str], out: str | Path) -> None:
    """The worklist as Parquet: the CSV's columns (:meth:`ReviewRow.as_record`), typed, with
    the CSV's escaping of text cells (a Parquet file can be opened in a spreadsheet too)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .export import escape_cell

    fields = [("file", pa.string()), ("predicted", pa.string()), ("confidence", pa.float64()),
              *[(f"p_{c}", pa.float64()) for c in classes],
              ("low_confidence", pa.bool_()), ("outside_distribution", pa.bool_()),
              ("gate_score", pa.float64()), ("needs_attention", pa.bool_()), ("flags", pa.string()),
              ("error", pa.string()), ("modality", pa.string()), ("series_number", pa.int64()),
              ("instance_number", pa.int64())]
    schema = pa.schema(fields)
    records = [{k: escape_cell(v) for k, v in r.as_record(classes).items()} for r in rows]
    if records and list(records[0]) != schema.names:  # the CSV's columns changed: follow them
        schema = pa.schema([f for f in fields if f[0] in records[0]])
    pq.write_table(pa.Table.from_pylist(records, schema=schema), out)


# ----------------------------------------------------------------------------- CLI: review

def add_review_options(parser) -> None:
    """``--engine``/``--address``/``--actors`` on ``medcls review``."""
    parser.add_argument("--engine", choices=("local", "ray"), default="local",
                        help="local (default): this machine; ray: a Ray cluster (Ray Data)")
    parser.add_argument("--address", help="Ray cluster: auto, HOST:PORT or ray://HOST:10001 "
                                          "(default: $RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--actors", type=int, help="model actors on the cluster (default: one per node)")


def cmd_review(args) -> int:
    """``medcls review SOURCE --engine ray``: CSV at ``--out`` and Parquet beside it; with
    ``--by-series`` the local engine's by-series CSV (and ``--slices``)."""
    from tqdm import tqdm

    from .review import summary, write_csv

    sources = cluster_sources(args.folder)
    if args.by_series:
        return _cmd_review_by_series(args, sources)
    classes = tuple(read_card(args.model)["classes"])
    rows: list[ReviewRow] = []
    with tqdm(total=len(sources), unit="scan", desc="review (ray)") as bar:
        for row in run_review(args.model, sources, args.address, args.batch_size, args.actors,
                              on_progress=lambda p: bar.update(p.done - bar.n)):
            rows.append(row)
    out = Path(args.out)
    write_csv(rows, classes, out)
    parquet = out.with_suffix(".parquet")
    write_parquet(rows, classes, parquet)
    s = summary(rows, classes)
    print(f"{s['total']} scans -> {out}, {parquet}: "
          + ", ".join(f"{k} {v}" for k, v in s["per_class"].items())
          + f"; unreadable {s['unreadable']}, low confidence {s['low_confidence']}, "
            f"outside distribution {s['outside_distribution']}")
    return 0


def _cmd_review_by_series(args, sources) -> int:
    """The local ``--by-series`` output (same CSV columns, same printed lines) from the cluster."""
    from tqdm import tqdm

    from .series_answer import write_records_csv

    with tqdm(unit="series", desc="review by series (ray)") as bar:
        def progress(p: Progress) -> None:
            bar.total = p.total
            bar.update(p.done - bar.n)
        result = review_by_series(args.model, sources, args.address, args.actors,
                                  on_progress=progress)
    write_records_csv([a["record"] for a in result.answers], args.out)
    if args.slices:
        write_records_csv([r for a in result.answers for r in a["slices"]], args.slices)
    for message in result.findings:
        print(message)
    for a in result.answers:
        print(f"{a['record']['series']}: {a['record']['summary']}")
    print(f"{len(result.answers)} series -> {args.out}")
    return 0


# ----------------------------------------------------------------------------- training

def _keras_multiworker_fix() -> None:
    """Two Keras 3.15 bugs under MultiWorkerMirroredStrategy, fixed in Ray Train workers only:

    - ``fit`` averages the first distributed batch across replicas only to learn its shapes
      (``_maybe_symbolic_build``), and that eager reduce fails ("Attempt to convert a value
      (PerReplica...) to a Tensor"): the local replica's batch has the same shapes, build from it;
    - the per-step logs (scalar loss and metrics) are averaged with ``axis=0``, which a scalar
      does not have ("Invalid reduction dimension 0"): average them across replicas, no axis.
    """
    import tensorflow as tf
    from keras.src import tree
    from keras.src.backend.tensorflow import trainer as tf_trainer
    from keras.src.backend.tensorflow.trainer import TensorFlowTrainer

    original = TensorFlowTrainer._maybe_symbolic_build
    if getattr(original, "_medcls_fix", False):
        return
    reduce_original = tf_trainer.reduce_per_replica

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and tf_trainer._collective_all_reduce_multi_worker(strategy):
            return tree.map_structure(
                lambda v: (strategy.reduce("MEAN", v, axis=None)
                           if isinstance(v, tf.distribute.DistributedValues) else v), values)
        return reduce_original(values, strategy, reduction)

    def build(self, iterator=None, data_batch=None):
        if iterator is not None and self._distribute_strategy is not None:
            for _, _, it in iterator:
                data_batch = tree.map_structure(
                    lambda v: (self.distribute_strategy.experimental_local_results(v)[0]
                               if isinstance(v, tf.distribute.DistributedValues) else v), next(it))
                break
        return original(self, iterator=None, data_batch=data_batch)

    build._medcls_fix = True
    TensorFlowTrainer._maybe_symbolic_build = build
    tf_trainer.reduce_per_replica = reduce_per_replica


def _train_worker(config: dict) -> None:
    """Ray Train worker: :func:`medcls.train.train` under MultiWorkerMirroredStrategy. Worker 0
    writes the package and reports it as the checkpoint; the others write a scratch copy."""
    import ray.train
    import tensorflow as tf

    from .train import TrainConfig, train

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    _keras_multiworker_fix()
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    cfg = TrainConfig(**config["cfg"])
    scratch = Path(tempfile.mkdtemp(prefix=f"medcls-train-{rank}-"))
    cfg.out = str(scratch / "package")
    if cfg.cache_dir:  # one cache per worker: two writers never race on one file
        cfg.cache_dir = str(Path(cfg.cache_dir) / f"ray-worker-{rank}")
    out = train(cfg, command=config["command"], strategy=strategy)
    checkpoint = ray.train.Checkpoint.from_directory(str(out)) if rank == 0 else None
    card = json.loads((Path(out) / CARD_FILE).read_text())
    ray.train.report({"test_accuracy": card["metrics"]["test"]["accuracy"],
                      "epochs_run": card["training"]["epochs_run"]}, checkpoint=checkpoint)
    shutil.rmtree(scratch, ignore_errors=True)


def train_on_ray(cfg, workers: int, address: str | None = None, command: str | None = None,
                 storage: str | Path | None = None) -> Path:
    """Train ``cfg`` with ``workers`` Ray Train workers (one CPU each); the package lands in
    ``cfg.out`` as with local training. ``storage`` holds Ray's run records and checkpoints
    (default: a ``.ray-train`` folder beside ``cfg.out``; on a multi-machine cluster it must be
    storage every node can write, e.g. NFS or S3)."""
    from dataclasses import asdict

    connect(address)
    from ray.train import RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    out = Path(cfg.out).resolve()

    def absolute(path):  # workers do not run in this folder: paths are resolved here
        return str(Path(path).resolve()) if path else path

    paths = {"data": [absolute(d) for d in cfg.folders], "cache_dir": absolute(cfg.cache_dir),
             "init": absolute(cfg.init), "weights": absolute(cfg.weights)}
    storage = Path(storage) if storage else out.parent / ".ray-train"
    storage.mkdir(parents=True, exist_ok=True)
    config = {"cfg": asdict(cfg) | paths, "command": command or ""}
    trainer = TensorflowTrainer(
        _train_worker, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=f"{out.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                             storage_path=str(storage.resolve())))
    try:
        result = trainer.fit()
    except Exception as exc:  # noqa: BLE001 - Ray wraps the worker's error
        raise ClusterError(f"Training on the Ray cluster failed: {exc}") from exc
    if result.checkpoint is None:
        raise ClusterError("Training on the Ray cluster finished without a model package.")
    if out.exists():
        shutil.rmtree(out)
    result.checkpoint.to_directory(str(out))
    log.info("model package from Ray Train worker 0 -> %s (metrics %s)", out, result.metrics)
    return out
