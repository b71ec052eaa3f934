"""Batch review: a worklist of many scans, shared by the batch page and ``medcls review``.

Sources come from :mod:`medcls.io.sources` (a folder under an allowed root, uploads, the
members of a zip within its limits). Every file becomes one row; a file that cannot be read is
a row with its error and the run goes on. Rows stream out as batches finish, so memory stays
bounded. :class:`ReviewJob` runs a review in the background for the batch page.
"""
from __future__ import annotations

import contextlib
import csv
import io
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

from medcls.core.csvsafe import atomic_output, escape_header, escape_row
from medcls.engine.inference import Predictor, StreamItem
from medcls.engine.reading import read_row, tally
from medcls.io.load import load_scan
from medcls.io.sources import Source


@dataclass
class ReviewRow:
    file: str
    predicted: str | None
    confidence: float | None
    probabilities: dict[str, float]
    low_confidence: bool
    outside_distribution: bool
    gate_score: float | None
    error: str | None
    modality: str | None = None
    series_number: int | None = None
    instance_number: int | None = None
    sha256: str | None = None  # of the file's bytes: the audit trail's name for the input
    scope_note: str | None = None  # why the scan lies outside the card's validated scope

    @property
    def needs_attention(self) -> bool:
        return bool(self.error or self.low_confidence or self.outside_distribution)

    @property
    def flags(self) -> str:
        return ", ".join(f for f, on in (("unreadable", self.error is not None),
                                         ("outside training distribution", self.outside_distribution),
                                         ("low confidence", self.low_confidence)) if on)

    def reading(self, card: Mapping | None = None):
        """This row's :class:`medcls.engine.reading.Reading` (the one answer object)."""
        from medcls.engine.reading import read_row

        return read_row(self, card if card is not None else {"classes": list(self.probabilities)})

    def as_record(self, classes: Sequence[str], card: Mapping | None = None) -> dict:
        """The row for a table or the CSV: the answer as the screen says it (``predicted`` is the
        class given, blank for a withheld or unreadable scan; ``answer`` its name or "Withheld";
        ``withheld_reason``), then the model's raw output for the record (``top_class``, its
        calibrated probabilities) and the flags."""
        r = read_row(self, card if card is not None else {"classes": list(classes)})
        rec = {"file": self.file, "predicted": r.label, "answer": r.name,
               "confidence": r.probability, "state": r.state if self.error is None else "unreadable",
               "withheld_reason": r.reason if self.error is None else None,
               "top_class": self.predicted}
        for c in classes:
            rec[f"p_{c}"] = self.probabilities.get(c)
        rec.update({"low_confidence": self.low_confidence,
                    "outside_distribution": self.outside_distribution,
                    "gate_score": self.gate_score, "needs_attention": self.needs_attention,
                    "flags": self.flags, "error": self.error, "modality": self.modality,
                    "series_number": self.series_number, "instance_number": self.instance_number})
        return rec


@dataclass
class Progress:
    done: int
    total: int
    elapsed_s: float

    @property
    def rate(self) -> float:
        return self.done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def remaining_s(self) -> float | None:
        return (self.total - self.done) / self.rate if self.rate > 0 else None


def _load(source: Source):
    target = source.read()
    return load_scan(target)


def row_from_item(item: StreamItem) -> ReviewRow:
    src: Source = item.source
    p = item.prediction
    info = item.info or {}
    if p is None:
        return ReviewRow(src.name, None, None, {}, False, False, None, item.error or "unreadable",
                         info.get("modality"))
    return ReviewRow(src.name, p.label, p.confidence,
                     dict(zip(p.classes, map(float, p.probabilities))), p.low_confidence,
                     p.outside_training_distribution, p.gate_score, None, info.get("modality"),
                     info.get("series_number"), info.get("instance_number"), info.get("sha256"),
                     p.scope_note)


def run_review(predictor: Predictor, sources: Sequence[Source], batch_size: int = 32,
               workers: int = 2, stop: threading.Event | None = None,
               on_progress: Callable[[Progress], None] | None = None) -> Iterator[ReviewRow]:
    """Rows for ``sources`` in order, as batches finish. Set ``stop`` to end early."""
    t0 = time.perf_counter()
    total = len(sources)

    def gen():
        for s in sources:
            if stop is not None and stop.is_set():
                return
            yield s

    done = 0
    for item in predictor.predict_stream(gen(), batch_size=batch_size, workers=workers, loader=_load):
        done += 1
        yield row_from_item(item)
        if on_progress is not None and (done % batch_size == 0 or done == total):
            on_progress(Progress(done, total, time.perf_counter() - t0))


def summary(rows: Sequence[ReviewRow], classes: Sequence[str], card: Mapping | None = None) -> dict:
    """The worklist's counts (the class tiles): per class only the scans given that class;
    withheld and unreadable scans apart (:func:`medcls.engine.reading.tally`)."""
    card = card if card is not None else {"classes": list(classes)}
    t = tally((read_row(r, card) for r in rows), classes)
    return {
        "total": len(rows),
        "per_class": t["per_class"],
        "withheld": t["withheld"],
        "unreadable": sum(r.error is not None for r in rows),
        "low_confidence": sum(r.low_confidence for r in rows),
        "outside_distribution": sum(r.outside_distribution for r in rows),
        "needs_attention": sum(r.needs_attention for r in rows),
    }


def write_csv(rows: Sequence[ReviewRow], classes: Sequence[str], out, card: Mapping | None = None) -> None:
    """The worklist as CSV (a path or a text stream). Holds no DICOM tag values but the modality:
    file names, answers (a withheld scan says "Withheld" and why, never a class), probabilities,
    flags and series/instance numbers. Every cell (header included) goes through
    :func:`medcls.core.csvsafe.escape_cell`, so no text runs as a spreadsheet formula."""
    fields = list(rows[0].as_record(classes, card)) if rows else list(
        ReviewRow("", None, None, {}, False, False, None, None).as_record(classes, card))
    own = isinstance(out, (str, Path))
    with atomic_output(out, newline="") if own else contextlib.nullcontext(out) as fh:
        w = csv.DictWriter(fh, fieldnames=escape_header(fields))
        w.writeheader()
        for r in rows:
            w.writerow(escape_row(r.as_record(classes, card)))


class ReviewJob:
    """One review run that a page can drive across script reruns, and stop.

    How a run proceeds and how Stop really stops
    --------------------------------------------
    A page keeps the job in its session (``st.session_state``): its sources, the
    :func:`run_review` generator, the rows so far and a ``threading.Event``. Each script run
    calls :meth:`advance` for a few seconds (one batch at least), updating its progress bar
    after every batch (``on_batch``), then reruns the script. A click on any widget makes
    Streamlit interrupt the running chunk at its next Streamlit call (the progress update after
    the batch in progress) and rerun the script, so the page answers within about one batch;
    the new run picks the job up where it was.

    The Stop button's ``on_click`` callback calls :meth:`request_stop`, which only sets the
    Event. Callbacks run before the script on the next run, so that run's
    :meth:`close_if_stopped` sees the Event and closes the generator (which stops feeding files
    and shuts the decoding threads down); the rows done so far stay as the result. A click that
    arrives in the middle of a chunk interrupts the script at its next Streamlit call, but no
    row is lost: every row is appended to the job before ``on_batch`` runs, and the suspended
    generator simply resumes (or is closed) on the next run.

    Memory stays bounded: the job keeps the rows (a few numbers each) and the sources (paths,
    or the bytes the browser uploaded anyway), never decoded images; the stream holds at most
    two batches. A row's scan is reloaded on demand (:meth:`load`).
    """

    def __init__(self, predictor: Predictor, sources: Sequence[Source], origin: str = "",
                 model_path: str = "", batch_size: int = 16, workers: int = 2,
                 make_stream: Callable[[threading.Event], Iterator[ReviewRow]] | None = None):
        self.id = uuid.uuid4().hex[:8]
        self.origin, self.model_path = origin, model_path
        self.card = predictor.card
        self.classes = tuple(predictor.classes)
        self.sources = list(sources)
        self.batch_size = batch_size
        self.rows: list[ReviewRow] = []
        self.state = "running"  # then "done", "stopped" or "failed"
        self.error: Exception | None = None  # what ended a failed run
        self._stop = threading.Event()
        # the rows: this server's engine, or another one given the job's stop event (a cluster)
        self._gen: Iterator[ReviewRow] | None = make_stream(self._stop) if make_stream else run_review(
            predictor, self.sources, batch_size=batch_size, workers=workers, stop=self._stop)
        self._t0 = time.perf_counter()
        self._elapsed: float | None = None

    # ------------------------------------------------------------------ running
    @property
    def running(self) -> bool:
        return self.state == "running"

    def request_stop(self) -> None:
        """Ask the run to stop (safe from a widget callback: it only sets an Event)."""
        self._stop.set()

    def close_if_stopped(self) -> None:
        """Close a running job whose stop was requested, keeping its rows."""
        if self.running and self._stop.is_set():
            self.stop()

    def stop(self, state: str = "stopped") -> None:
        """End the run now (its stream and decoding threads); the rows done so far stay."""
        if self._gen is None:
            return
        self._stop.set()
        try:
            self._gen.close()
        except Exception:  # noqa: BLE001 - closing a stream never fails the caller
            pass
        self._gen = None
        self.state = state
        self._elapsed = time.perf_counter() - self._t0

    def advance(self, seconds: float, on_batch: Callable[[Progress], None] | None = None) -> None:
        """Pull rows for about ``seconds`` (a batch at least): each row is stored before
        ``on_batch`` (called after every batch) can be interrupted."""
        self.close_if_stopped()
        deadline = time.monotonic() + seconds
        while self._gen is not None and not self._stop.is_set():
            try:
                row = next(self._gen)
            except StopIteration:
                self.stop("done")
                return
            except Exception as exc:  # noqa: BLE001 - the engine failed: keep what is done
                self.stop("failed")
                self.error = exc
                return
            self.rows.append(row)
            if len(self.rows) % self.batch_size == 0:
                if on_batch is not None:
                    on_batch(self.progress)
                if time.monotonic() > deadline:
                    return
        self.close_if_stopped()

    # ------------------------------------------------------------------ reading
    @property
    def elapsed_s(self) -> float:
        return self._elapsed if self._elapsed is not None else time.perf_counter() - self._t0

    @property
    def progress(self) -> Progress:
        return Progress(len(self.rows), len(self.sources), self.elapsed_s)

    @property
    def not_reviewed(self) -> int:
        return len(self.sources) - len(self.rows)

    def summary(self) -> dict:
        return summary(self.rows, self.classes, self.card)

    def filter(self, attention_only: bool = False, classes: Iterable[str] = (),
               name_contains: str = "") -> list[int]:
        """Indices of the rows that pass: needing attention (if asked), predicted as one of
        ``classes`` (a withheld scan is not given its top class: ``"withheld"`` selects those,
        ``"unreadable"`` the unreadable files; none given: all), with ``name_contains`` in the
        file name (case-insensitive)."""
        wanted = set(classes)
        needle = name_contains.strip().lower()
        return [i for i, r in enumerate(self.rows)
                if (not attention_only or r.needs_attention)
                and (not wanted or (r.predicted in wanted and not r.outside_distribution)
                     or ("withheld" in wanted and r.outside_distribution and r.error is None)
                     or ("unreadable" in wanted and r.error is not None))
                and needle in r.file.lower()]

    def records(self, indices: Sequence[int] | None = None) -> list[dict]:
        """The rows (all, or ``indices``) as flat records for a table."""
        rows = self.rows if indices is None else [self.rows[i] for i in indices]
        return [r.as_record(self.classes, self.card) for r in rows]

    def csv(self, indices: Sequence[int] | None = None) -> str:
        """The worklist CSV of the rows (all, or ``indices``); no DICOM tag values."""
        buf = io.StringIO()
        write_csv(self.rows if indices is None else [self.rows[i] for i in indices],
                  self.classes, buf, self.card)
        return buf.getvalue()

    def load(self, index: int):
        """The scan of row ``index``, reloaded from its source."""
        return load_scan(self.sources[index].read())
