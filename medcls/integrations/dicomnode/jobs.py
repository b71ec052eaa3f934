"""The listener's durable queue: one job per received series and answering model version, kept in
the audit trail's database (SQLite by default, PostgreSQL where configured), and the listener's
health.

A job goes ``receiving`` (instances arriving) -> ``ready`` (complete: quiet for the quiet time, or
ended at once by the sender's association release) -> ``answering`` -> ``sending`` (results built,
audit rows written) -> ``sent``; or ``not_answered`` (no model of the site may answer it, with the
reason) or ``failed`` (with the reason; a person may retry it). A send that fails waits in
``sending`` with a back-off before its next attempt.

Exactly once: a job is unique by (Series Instance UID, model version). Instances of a series that
is already being answered or done are counted as repeats and never answered again; the audit rows
of an answer are written in the same transaction that moves its job to ``sending``, and the built
results are kept on disk, so a restart resumes each job where it stood: ``answering`` is answered
again from the spool (nothing of it was recorded), ``sending`` sends the very objects that were
built (the PACS keeps one copy of a SOP Instance UID).

No patient data: a series is known by its UIDs (the PACS holds them; the audit trail keeps SOP
Instance UIDs too), its modality, number and instance counts, never a name, ID, date or
description.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import asdict
from typing import Iterator, Sequence

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from medcls.core.errors import AuditError, ListenerError

RECEIVING, READY, ANSWERING, SENDING = "receiving", "ready", "answering", "sending"
SENT, NOT_ANSWERED, FAILED = "sent", "not_answered", "failed"
STATES = (RECEIVING, READY, ANSWERING, SENDING, SENT, NOT_ANSWERED, FAILED)
OPEN = (RECEIVING, READY)  # instances may still join
NO_MODEL = "none"  # the model key of a series no model of the site answers

metadata = sa.MetaData()

jobs = sa.Table(
    "listener_jobs", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("listener", sa.String(16), nullable=False, index=True),  # our AE title
    sa.Column("series_uid", sa.String(64), nullable=False),
    sa.Column("study_uid", sa.String(64), nullable=False),
    sa.Column("model_key", sa.String(200), nullable=False),  # name version sha256-..., or "none"
    sa.Column("model_folder", sa.String(255)),
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("modality", sa.String(16)),
    sa.Column("series_number", sa.Integer),
    sa.Column("calling_ae", sa.String(16)),
    sa.Column("n_instances", sa.Integer, nullable=False, default=0),
    sa.Column("n_refused", sa.Integer, nullable=False, default=0),  # spool full
    sa.Column("n_repeats", sa.Integer, nullable=False, default=0),  # arrived after it was answered
    sa.Column("first_instance_at", sa.Float),  # Unix seconds
    sa.Column("last_instance_at", sa.Float),
    sa.Column("ready_at", sa.Float),
    sa.Column("answered_at", sa.Float),
    sa.Column("sent_at", sa.Float),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),  # sends tried
    sa.Column("next_attempt_at", sa.Float),
    sa.Column("reason", sa.Text),  # not answered / failed / waiting to retry: why
    sa.Column("outcome", sa.String(16)),  # the series' outcome: suspected / not_seen / cannot_answer
    sa.Column("answer_label", sa.String(80)),
    sa.Column("answer_probability", sa.Float),
    sa.Column("answer_state", sa.String(16)),
    sa.Column("n_answered", sa.Integer),  # instances (frames) answered and audited
    sa.Column("result_uids", sa.Text),  # the SR's and captures' SOP Instance UIDs
    sa.UniqueConstraint("series_uid", "model_key", name="uq_listener_series_model"),
)

health = sa.Table(
    "listener_health", metadata,
    sa.Column("listener", sa.String(16), primary_key=True),
    sa.Column("address", sa.String(80)),
    sa.Column("pid", sa.Integer),
    sa.Column("started_at", sa.Float),
    sa.Column("heartbeat_at", sa.Float),
    sa.Column("stopped_at", sa.Float),
    sa.Column("last_association_at", sa.Float),
    sa.Column("last_calling_ae", sa.String(16)),
    sa.Column("associations", sa.Integer),
    sa.Column("rejected", sa.Integer),
    sa.Column("spool_bytes", sa.BigInteger),
    sa.Column("spool_budget", sa.BigInteger),
    sa.Column("peak_rss_bytes", sa.BigInteger),
    sa.Column("models", sa.Text),
)


def model_key(card) -> str:
    """What makes an answer the same answer: the model's name, version and hash."""
    return f"{card['name']} {card['version']} sha256-{card['model_sha256'][:16]}"[:200]


class JobQueue:
    """The jobs of one listener (its AE title) in the audit store's database. ``lock`` orders
    an instance's arrival against the worker's claim inside one process."""

    def __init__(self, store, listener: str):
        self.store = store  # medcls.integrations.audit.store.AuditStore: same database
        self.engine = store.engine
        self.listener = listener
        self.lock = threading.RLock()
        self._ready = False

    def __repr__(self) -> str:
        return f"JobQueue({self.listener}, {self.store.where})"

    @contextmanager
    def _begin(self) -> Iterator[sa.Connection]:
        try:
            if not self._ready:
                self.ensure()
            with self.engine.begin() as conn:
                yield conn
        except (ListenerError, AuditError):
            raise
        except (sa_exc.SQLAlchemyError, OSError) as exc:
            raise ListenerError(f"The listener's queue ({self.store.where}) could not be read or "
                                f"written ({type(getattr(exc, 'orig', exc)).__name__}).") from None

    def ensure(self) -> None:
        """The audit trail's tables and the queue's (idempotent)."""
        self.store.ensure_schema()
        try:
            with self.engine.begin() as conn:
                if conn.dialect.name == "postgresql":
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(4242030)"))
                metadata.create_all(conn)
        except (sa_exc.SQLAlchemyError, OSError) as exc:
            raise ListenerError(f"The listener's queue ({self.store.where}) cannot be created "
                                f"({type(getattr(exc, 'orig', exc)).__name__}).") from None
        self._ready = True

    # ------------------------------------------------------------------ arrivals
    def open_job(self, series_uid: str, study_uid: str, key: str, folder: str | None,
                 modality: str | None, number: int | None, calling_ae: str,
                 reason: str | None = None) -> tuple[int, bool]:
        """The job an arriving instance belongs to, and whether it may join it (False: the
        series is already being answered or done for this model version: a repeat). Opens a
        new job, or reopens a failed one that was never answered. Call under :attr:`lock`."""
        now = time.time()
        with self._begin() as conn:
            row = conn.execute(sa.select(jobs.c.id, jobs.c.state, jobs.c.result_uids).where(
                jobs.c.series_uid == series_uid, jobs.c.model_key == key)).first()
            if row is None:
                new = conn.execute(sa.insert(jobs).values(
                    listener=self.listener, series_uid=series_uid, study_uid=study_uid,
                    model_key=key, model_folder=folder, state=RECEIVING, modality=modality,
                    series_number=number, calling_ae=calling_ae, n_instances=0, n_refused=0,
                    n_repeats=0, attempts=0, first_instance_at=now, last_instance_at=now,
                    reason=reason))
                return int(new.inserted_primary_key[0]), True
            job_id, state, results = row
            if state in OPEN or (state == FAILED and not results):
                conn.execute(sa.update(jobs).where(jobs.c.id == job_id).values(
                    state=RECEIVING, ready_at=None, calling_ae=calling_ae,
                    **({"n_refused": 0, "n_instances": 0, "reason": reason}
                       if state == FAILED else {})))
                return int(job_id), True
            conn.execute(sa.update(jobs).where(jobs.c.id == job_id)
                         .values(n_repeats=jobs.c.n_repeats + 1))
            return int(job_id), False

    def count(self, job_id: int, stored: bool) -> None:
        """An instance joined its job (``stored``) or was refused for lack of room."""
        col = jobs.c.n_instances if stored else jobs.c.n_refused
        with self._begin() as conn:
            conn.execute(sa.update(jobs).where(jobs.c.id == job_id).values(
                {col: col + 1, "last_instance_at": time.time()}))

    # ------------------------------------------------------------------ completion
    def _complete(self, conn, where) -> list[tuple[int, str, str]]:
        """Move complete ``receiving`` jobs on: to ``ready``; a series with refused instances to
        ``failed`` (incomplete); a series no model answers to ``not_answered``. (id, new state,
        series UID) of each."""
        now = time.time()
        rows = conn.execute(sa.select(jobs.c.id, jobs.c.model_key, jobs.c.n_refused,
                                      jobs.c.n_instances, jobs.c.series_uid)
                            .where(jobs.c.listener == self.listener, jobs.c.state == RECEIVING,
                                   where)).all()
        done = []
        for job_id, key, refused, n, series_uid in rows:
            if key == NO_MODEL:
                values = {"state": NOT_ANSWERED}
            elif refused:
                values = {"state": FAILED, "reason": (
                    f"Incomplete: {refused} of {refused + n} instance(s) were refused because the "
                    "spool was full. Free room (answer or retry the waiting series) and have the "
                    "PACS send the series again.")}
            else:
                values = {"state": READY}
            conn.execute(sa.update(jobs).where(jobs.c.id == job_id, jobs.c.state == RECEIVING)
                         .values(ready_at=now, **values))
            done.append((int(job_id), values["state"], series_uid))
        return done

    def complete_quiet(self, quiet_s: float) -> list[tuple[int, str, str]]:
        """Series with no instance for ``quiet_s`` seconds are complete."""
        with self.lock, self._begin() as conn:
            return self._complete(conn, jobs.c.last_instance_at <= time.time() - quiet_s)

    def complete(self, job_ids: Sequence[int]) -> list[tuple[int, str, str]]:
        """The sender ended these series (its association was released): complete at once."""
        if not job_ids:
            return []
        with self.lock, self._begin() as conn:
            return self._complete(conn, jobs.c.id.in_(list(job_ids)))

    # ------------------------------------------------------------------ the worker
    def resume(self) -> int:
        """After a restart: a job caught while answering is answered again (nothing of it was
        recorded); ``sending`` jobs send their kept results at their next attempt. The number
        of jobs taken up again."""
        mine = jobs.c.listener == self.listener
        with self._begin() as conn:
            conn.execute(sa.update(jobs).where(mine, jobs.c.state == ANSWERING)
                         .values(state=READY))
            # a send the stopped process had claimed is due now
            conn.execute(sa.update(jobs).where(mine, jobs.c.state == SENDING)
                         .values(next_attempt_at=None))
            n = conn.execute(sa.select(sa.func.count()).select_from(jobs).where(
                mine, jobs.c.state.in_((READY, SENDING)))).scalar()
        return int(n or 0)

    def claim(self) -> dict | None:
        """The next job to work on, taken atomically: the oldest ``ready`` one (now
        ``answering``), else a ``sending`` one whose next attempt is due."""
        now = time.time()
        with self.lock, self._begin() as conn:
            row = conn.execute(sa.select(jobs).where(
                jobs.c.listener == self.listener, jobs.c.state == READY)
                .order_by(jobs.c.ready_at, jobs.c.id).limit(1)).first()
            if row is not None:
                done = conn.execute(sa.update(jobs).where(jobs.c.id == row.id,
                                                          jobs.c.state == READY)
                                    .values(state=ANSWERING)).rowcount
                return {**row._mapping, "state": ANSWERING} if done == 1 else None
            row = conn.execute(sa.select(jobs).where(
                jobs.c.listener == self.listener, jobs.c.state == SENDING,
                sa.or_(jobs.c.next_attempt_at.is_(None), jobs.c.next_attempt_at <= now))
                .order_by(jobs.c.next_attempt_at, jobs.c.id).limit(1)).first()
            if row is None:
                return None
            conn.execute(sa.update(jobs).where(jobs.c.id == row.id)
                         .values(next_attempt_at=now + 3600))  # ours while we send
            return dict(row._mapping)

    def answered(self, job_id: int, answers: Sequence, result_uids: Sequence[str], outcome: str,
                 label: str | None, probability: float | None, state: str) -> list[int]:
        """The answer is built: its audit rows (:class:`medcls.integrations.audit.store.Answer`)
        and the job's move to ``sending`` in one transaction. The audit rows' ids."""
        from medcls.integrations.audit.store import answers as answers_table

        with self._begin() as conn:
            ids = [conn.execute(sa.insert(answers_table).values(**asdict(a)))
                   .inserted_primary_key[0] for a in answers]
            conn.execute(sa.update(jobs).where(jobs.c.id == job_id).values(
                state=SENDING, answered_at=time.time(), next_attempt_at=None, reason=None,
                result_uids=" ".join(result_uids), outcome=outcome, answer_label=label,
                answer_probability=probability, answer_state=state, n_answered=len(answers)))
        return ids

    def sent(self, job_id: int) -> None:
        with self._begin() as conn:
            conn.execute(sa.update(jobs).where(jobs.c.id == job_id).values(
                state=SENT, sent_at=time.time(), reason=None, next_attempt_at=None,
                attempts=jobs.c.attempts + 1))

    def not_answered(self, job_id: int, reason: str) -> None:
        with self._begin() as conn:
            conn.execute(sa.update(jobs).where(jobs.c.id == job_id).values(
                state=NOT_ANSWERED, reason=reason, answered_at=time.time()))

    def failed(self, job_id: int, reason: str) -> None:
        with self._begin() as conn:
            conn.execute(sa.update(jobs).where(jobs.c.id == job_id).values(
                state=FAILED, reason=reason, next_attempt_at=None))

    def send_failed(self, job_id: int, reason: str, retries: int, backoff_s: float) -> bool:
        """A send attempt failed: wait ``backoff_s`` x 2^(attempts-1) (at most 5 minutes) before
        the next one, or fail the job after ``retries`` retries. True when it will be tried
        again."""
        with self._begin() as conn:
            attempts = int(conn.execute(sa.select(jobs.c.attempts)
                                        .where(jobs.c.id == job_id)).scalar() or 0) + 1
            if attempts > retries:
                conn.execute(sa.update(jobs).where(jobs.c.id == job_id).values(
                    state=FAILED, attempts=attempts, next_attempt_at=None,
                    reason=f"Not sent after {attempts} attempt(s): {reason}"))
                return False
            wait = min(300.0, backoff_s * 2 ** (attempts - 1))
            conn.execute(sa.update(jobs).where(jobs.c.id == job_id).values(
                attempts=attempts, next_attempt_at=time.time() + wait,
                reason=f"Attempt {attempts} failed ({reason}); next attempt in {wait:.0f} s."))
            return True

    def retry(self, job_id: int) -> str:
        """A person retries a failed job: answered again from the spool, or, when its results
        were built, sent again. The state it goes to."""
        with self._begin() as conn:
            row = conn.execute(sa.select(jobs.c.state, jobs.c.result_uids, jobs.c.n_refused)
                               .where(jobs.c.id == job_id)).first()
            if row is None or row.state != FAILED:
                raise ListenerError("Only a failed series can be retried (this one is not, or no "
                                    "longer, failed).")
            if row.n_refused and not row.result_uids:
                raise ListenerError("This series is incomplete (the spool was full when it "
                                    "arrived): have the PACS send it again; it is then answered.")
            state = SENDING if row.result_uids else READY
            conn.execute(sa.update(jobs).where(jobs.c.id == job_id, jobs.c.state == FAILED)
                         .values(state=state, attempts=0, next_attempt_at=None, ready_at=time.time(),
                                 reason=None))
            return state

    # ------------------------------------------------------------------ reads
    def rows(self, listener: str | None = None, limit: int = 500) -> list[dict]:
        """The most recent jobs (newest first), as dicts."""
        q = sa.select(jobs).order_by(jobs.c.id.desc()).limit(limit)
        if listener:
            q = q.where(jobs.c.listener == listener)
        with self._begin() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def job(self, job_id: int) -> dict | None:
        with self._begin() as conn:
            row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).first()
        return None if row is None else dict(row._mapping)

    # ------------------------------------------------------------------ health
    def beat(self, **values) -> None:
        """The listener's health row (one per AE title), created or updated."""
        with self._begin() as conn:
            done = conn.execute(sa.update(health).where(health.c.listener == self.listener)
                                .values(**values)).rowcount
            if not done:
                conn.execute(sa.insert(health).values(listener=self.listener, **values))

    def health(self, listener: str | None = None) -> list[dict]:
        q = sa.select(health).order_by(health.c.listener)
        if listener:
            q = q.where(health.c.listener == listener)
        with self._begin() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]


def open_queue(url: str | None = None, listener: str = "") -> JobQueue:
    """The queue in the audit trail's database (``url``, default the settings')."""
    from medcls.integrations.audit.store import open_store

    return JobQueue(open_store(url), listener)
