"""Review on a Ray cluster, for archives that outgrow one machine; the single-machine engine
(:mod:`medcls.engine.review`) stays the default and is reused, not copied.

Review (Ray Data)
    sources (a server folder or a list file of paths, as :class:`medcls.io.sources.Source`) ->
    ``from_items`` (index, path) -> ``map_batches(_decode)``: tasks that read each file's bytes
    and decode and preprocess them with :func:`medcls.engine.inference.load_stream_item` (the
    local engine's own function: same reader, same preprocessing, same error messages) ->
    ``map_batches(_Classifier)``: a pool of actors, each loading the model package once ->
    the driver turns the outputs into :class:`medcls.engine.review.ReviewRow` with the local
    engine's row code, in input order. Files are read by path: on a real cluster the scans must
    sit on storage every node mounts at the same path (NFS, a PACS export share).

    A list file may also name PACS series (a line holding a SeriesInstanceUID,
    :func:`cluster_sources`): the decoding task retrieves the series itself
    (:mod:`medcls.integrations.pacs`) with the PACS settings of this process (passed to the
    tasks: the nodes need no PACS configuration), and gives one row per instance, named by a
    hash of the UID.

Review by series (``--by-series``)
    The files are gathered into series here (:func:`medcls.io.gather.gather`: header reads, as
    locally); each series, with any series it shares a file with, is one unit of work for a
    pool of actors that gather the unit's files again and answer it with
    :func:`medcls.engine.series.answer_series`, returning its by-series and slice records. A
    PACS series is a unit retrieved and gathered by the actor.

    Fault tolerance is Ray's: a decoding task whose process dies is re-run, a model actor that
    dies is restarted and its batch re-submitted (Ray Data's defaults ``max_restarts=-1``,
    ``max_task_retries=-1``); a re-run batch replaces the lost one, so every input still gives
    exactly one row (the cluster tests kill a worker mid-run to check).
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator, Sequence

import numpy as np

from medcls.core.errors import ClusterError, MedclsError
from medcls.engine.inference import (
    Prediction,
    Predictor,
    StreamItem,
    acquisition_from_info,
    check_modality,
    load_stream_item,
)
from medcls.engine.review import Progress, ReviewRow, row_from_item
from medcls.integrations.ray.cluster import (
    ACTOR_CPUS,
    TASK_CPUS,
    cluster_nodes,
    connect,
    data_context,
    package_files,
    predictor_from_files,
)
from medcls.io.preprocess import PreprocessSpec, preprocess
from medcls.io.sources import Source, cli_sources
from medcls.models.calibration import InputGate
from medcls.models.package import GATE_FILE, read_card

log = logging.getLogger(__name__)


#: A DICOM UID (digits and dots, at most 64 characters): a list file's line naming a PACS series.
_UID = re.compile(r"^[0-9]+(\.[0-9]+)+$")


@dataclass(frozen=True)
class PacsSeries:
    """What the source of a PACS series UID reads to: the UID, retrieved by the cluster's tasks
    (:func:`_pacs_instances`), never by this process."""

    series_uid: str = field(repr=False)

    def __repr__(self) -> str:  # no UIDs in logs
        from medcls.integrations.pacs.client import handle

        return f"PacsSeries({handle(self.series_uid)})"


def is_series_uid(text: str) -> bool:
    return len(text) <= 64 and _UID.match(text) is not None


def pacs_source_name(series_uid: str) -> str:
    """The worklist's name of a PACS series: a short hash of its UID (no UIDs in outputs)."""
    from medcls.integrations.pacs.client import handle

    return f"pacs series {handle(series_uid)}"


def cluster_sources(source: str | Path) -> list[Source]:
    """``medcls review SOURCE --engine ray``: a folder tree, or a list file whose lines are paths
    or PACS series (a SeriesInstanceUID: a line of digits and dots that names no file). Paths are
    the local engine's :func:`medcls.io.sources.cli_sources`."""
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
    from medcls.integrations.pacs.client import pacs_settings

    settings = pacs_settings()
    if settings is None:
        raise ClusterError("The list names PACS series but no PACS is configured (set "
                           "MEDCLS_PACS_URL, or [pacs] url in .streamlit/secrets.toml).")
    return settings


def _pacs_instances(series_uid: str, settings) -> list[tuple[str, bytes]]:
    """Inside a task: the series' instances retrieved from the PACS (WADO-RS) with the settings'
    credentials, named ``pacs series <hash> · <n>`` in InstanceNumber order."""
    import pydicom

    from medcls.integrations.pacs.client import PacsClient

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


class _Classifier:
    """Ray Data actor: loads the model package once, classifies preprocessed batches."""

    def __init__(self, package_files: dict[str, bytes]):
        self.predictor = predictor_from_files(package_files)

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


def run_review(model_dir: str | Path, sources: Sequence[Source], address: str | None = None,
               batch_size: int = 32, actors: int | None = None,
               stop: threading.Event | None = None,
               on_progress: Callable[[Progress], None] | None = None) -> Iterator[ReviewRow]:
    """:func:`medcls.engine.review.run_review` on a Ray cluster: rows for ``sources`` in input order as
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
    data = data_context()
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
                    pred = Predictor.within_scope(scope, pred, acquisition_from_info(info))
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


class _SeriesAnswerer:
    """Ray Data actor: loads the model package once; for each unit of sources (files that
    :func:`medcls.io.gather.gather` puts into the same series, or one PACS series it retrieves)
    gathers them and answers every wanted series with :func:`medcls.engine.series.answer_series`,
    the local engine's own function (slices in batches, summary, the run's regions and volume)."""

    def __init__(self, package_files: dict[str, bytes], pacs=None, min_run: int | None = None):
        self.predictor = predictor_from_files(package_files)
        self.pacs, self.min_run = pacs, min_run

    def __call__(self, batch: dict) -> dict:
        import pickle

        out = [pickle.dumps(self.answer(json.loads(u))) for u in batch["unit"]]
        return {"index": batch["index"], "result": np.array(out, dtype=object)}

    def answer(self, unit: dict) -> dict:
        from medcls.engine.series import MIN_RUN, answer_series
        from medcls.io.gather import gather
        from medcls.io.sources import bytes_source

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
    """:func:`medcls.engine.series.review_by_series` on a Ray cluster. Files are gathered into
    series here (header reads, as locally); each series (with the files it shares) is answered
    by a model actor. PACS series are retrieved and gathered by the actors; their series follow
    the files' series, in list order."""
    from medcls.io.gather import gather

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
    data = data_context()
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
    from medcls.engine.review import run_review as run_here

    return run_here(predictor, sources, batch_size=batch_size, workers=workers, stop=stop)


def write_parquet(rows: Sequence[ReviewRow], classes: Sequence[str], out: str | Path) -> None:
    """The worklist as Parquet: the CSV's columns (:meth:`ReviewRow.as_record`), typed, with
    the CSV's escaping of text cells (a Parquet file can be opened in a spreadsheet too)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from medcls.core.csvsafe import escape_cell

    types = {"confidence": pa.float64(), "gate_score": pa.float64(), "low_confidence": pa.bool_(),
             "outside_distribution": pa.bool_(), "needs_attention": pa.bool_(),
             "series_number": pa.int64(), "instance_number": pa.int64()}
    records = [{k: escape_cell(v) for k, v in r.as_record(classes).items()} for r in rows]
    names = list(records[0]) if records else ["file", "predicted", *[f"p_{c}" for c in classes]]
    # the CSV's columns, in its order (one source: ReviewRow.as_record); text unless typed above
    schema = pa.schema([(n, pa.float64() if n.startswith("p_") else types.get(n, pa.string()))
                        for n in names])
    pq.write_table(pa.Table.from_pylist(records, schema=schema), out)
