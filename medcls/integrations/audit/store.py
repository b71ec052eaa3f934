"""The audit trail: every answer shown or exported, every export or PACS send, and the
clinician's verdict on an answer, in a real database through SQLAlchemy.

SQLite file by default (created on first use, WAL journal so readers never block the
writer, a busy timeout so concurrent writers wait instead of failing), PostgreSQL by URL
when several app servers share one trail (``postgresql://user:pw@host/db``).

No patient name, ID or date can go in: the tables have no such columns. An input is known
by the SHA-256 of its bytes, by its SOP Instance UID when it came from the PACS (which
already holds it), and, for folders on the server, by its path relative to the scan
folder (so that corrected cases can be found again for training).

The schema carries a version (table ``audit_schema``). A database written by a newer
medcls is refused with :class:`AuditSchemaError` instead of being written into. Any
database failure (locked, read-only, unreachable) is an :class:`AuditError` with a
sentence for a person; the pages show it and keep answering.
"""

from __future__ import annotations

import datetime as dt
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from medcls.core.errors import AuditError, AuditSchemaError
from medcls.core.settings import PROJECT_DIR, Settings, load_settings

SCHEMA_VERSION = 3  # 2: the region's size and method, the series' outcome; 3: why withheld
BUSY_TIMEOUT_S = 5.0  # how long a writer waits for a locked SQLite file before giving up
DEFAULT_DB = PROJECT_DIR / "var" / "audit.sqlite"

VERDICTS = ("agree", "disagree", "unsure")
SOURCES = ("upload", "server-folder", "pacs")

metadata = sa.MetaData()

schema_info = sa.Table(
    "audit_schema", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

answers = sa.Table(
    "answers", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("user", sa.String(254), nullable=False),
    sa.Column("page", sa.String(40), nullable=False),
    sa.Column("model_name", sa.String(120), nullable=False),
    sa.Column("model_version", sa.String(40), nullable=False),
    sa.Column("model_sha256", sa.String(64), nullable=False),
    sa.Column("task", sa.String(80)),
    sa.Column("input_sha256", sa.String(64), index=True),
    sa.Column("sop_instance_uid", sa.String(64)),
    sa.Column("input_source", sa.String(16), nullable=False),
    sa.Column("input_path", sa.String(1024)),  # server folder: relative to the scan folder
    sa.Column("frame", sa.Integer),
    sa.Column("predicted", sa.String(80), nullable=False),
    sa.Column("confidence", sa.Float, nullable=False),
    sa.Column("probabilities", sa.JSON, nullable=False),  # {class: calibrated probability}
    sa.Column("low_confidence", sa.Boolean, nullable=False),
    sa.Column("withheld", sa.Boolean, nullable=False),  # input gate or card scope: no answer given
    sa.Column("gate_score", sa.Float),
    sa.Column("heatmap_method", sa.String(40)),
    # schema 2: the tumour region's size on this input and how it was measured ("segmentation"
    # or "Grad-CAM region"); None for a no-tumour or withheld answer, which carries no region
    sa.Column("region_method", sa.String(40)),
    sa.Column("region_area_mm2", sa.Float),
    sa.Column("region_diameter_mm", sa.Float),
    # schema 2: a series' outcome (suspected / not_seen / cannot_answer) for its slices' answers
    sa.Column("series_outcome", sa.String(16)),
    # schema 3: why a withheld answer gives no class (the card's scope, the input gate), in the
    # words the screen and the report use
    sa.Column("withheld_reason", sa.String(400)),
)

#: Columns each schema version added to existing tables: (version, table, column). An older
#: database gets them by ALTER TABLE ADD COLUMN (create_all adds tables, never columns).
ADDED_COLUMNS = [(2, "answers", c) for c in ("region_method", "region_area_mm2",
                                            "region_diameter_mm", "series_outcome")] + \
    [(3, "answers", "withheld_reason")]

exports = sa.Table(
    "exports", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("user", sa.String(254), nullable=False),
    sa.Column("page", sa.String(40), nullable=False),
    sa.Column("kind", sa.String(40), nullable=False),  # report-pdf, worklist-csv, pacs-send, ...
    sa.Column("answer_id", sa.Integer, sa.ForeignKey("answers.id")),
    sa.Column("n_answers", sa.Integer, nullable=False, default=1),
    sa.Column("target", sa.String(1024)),  # e.g. the stored objects' UIDs of a PACS send
)

verdicts = sa.Table(
    "verdicts", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("answer_id", sa.Integer, sa.ForeignKey("answers.id"), nullable=False, index=True),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("user", sa.String(254), nullable=False),
    sa.Column("verdict", sa.String(16), nullable=False),
    sa.Column("corrected_class", sa.String(80)),
    sa.Column("note", sa.Text),
)


def _migrate(conn: sa.Connection, version: int) -> None:
    """ALTER TABLE ADD COLUMN for each column added after ``version`` (and not there yet)."""
    have = {t: {c["name"] for c in sa.inspect(conn).get_columns(t)}
            for t in {t for _, t, _ in ADDED_COLUMNS}}
    for added_in, table, name in ADDED_COLUMNS:
        if added_in > version and name not in have[table]:
            col = metadata.tables[table].c[name]
            kind = col.type.compile(dialect=conn.dialect)
            prep = conn.dialect.identifier_preparer
            conn.execute(sa.text(f"ALTER TABLE {prep.quote(table)} ADD COLUMN "
                                 f"{prep.quote(name)} {kind}"))


# ----------------------------------------------------------------------------- settings

def database_url(settings: Settings | None = None) -> str:
    """The settings' ``database_url``, else the embedded SQLite file ``var/audit.sqlite``."""
    settings = settings or load_settings()
    return settings.database_url or f"sqlite:///{DEFAULT_DB}"


# ----------------------------------------------------------------------------- records

def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass(frozen=True)
class Answer:
    """One answer shown (or exported) to a user: what model said what about which input."""

    user: str
    page: str
    model_name: str
    model_version: str
    model_sha256: str
    predicted: str
    confidence: float
    probabilities: dict[str, float]
    low_confidence: bool
    withheld: bool
    input_source: str = "upload"
    input_sha256: str | None = None
    sop_instance_uid: str | None = None
    input_path: str | None = None
    frame: int | None = None
    gate_score: float | None = None
    heatmap_method: str | None = None
    task: str | None = None
    region_method: str | None = None  # "segmentation" or "Grad-CAM region"
    region_area_mm2: float | None = None
    region_diameter_mm: float | None = None
    series_outcome: str | None = None
    withheld_reason: str | None = None
    at: dt.datetime = field(default_factory=now)

    def __post_init__(self):
        if self.input_source not in SOURCES:
            raise ValueError(f"input_source must be one of {SOURCES}")
        if not (self.input_sha256 or self.sop_instance_uid or self.input_path):
            raise ValueError("an answer needs its input's SHA-256, SOP Instance UID or path")
        if self.withheld and (self.region_method or self.region_area_mm2 is not None):
            raise ValueError("a withheld answer carries no region")

    @classmethod
    def of(cls, answer, card: Mapping, user: str, page: str, region=None,
           region_method: str | None = None, **input_and_method) -> "Answer":
        """The one audit record of an answer, from every page and from the PACS: ``answer`` a
        :class:`medcls.engine.inference.Prediction`, a worklist row
        (:class:`medcls.engine.review.ReviewRow`) or a :class:`medcls.engine.reading.Reading`, read
        through :func:`medcls.engine.reading.read` with the answering model's card, so the row says
        what the screen and the report say: the model's top class and probabilities, whether the
        answer is withheld and why, and the region's size and method (``region``: a segmentation,
        a PACS Roi or a heatmap region) for a finding answer only."""
        from medcls.engine.reading import read

        reading = read(answer, card, region, region_method)
        probs = reading.probabilities
        top = reading.top_label
        if top is None:
            raise ValueError("an unreadable input has no answer to record")
        m = reading.measure
        fields = dict(withheld_reason=reading.reason)
        if m is not None and reading.is_finding:
            fields.update(region_method=m.method, region_area_mm2=m.area_mm2,
                          region_diameter_mm=m.diameter_mm)
        gate = getattr(answer, "gate_score", None)
        low = bool(getattr(answer, "low_confidence", reading.state == "uncertain"))
        return cls(user=user, page=page, model_name=card["name"],
                   model_version=str(card["version"]), model_sha256=card["model_sha256"],
                   task=card.get("task"), predicted=top, confidence=float(probs.get(top, 0.0)),
                   probabilities=dict(probs), low_confidence=low, withheld=reading.withheld,
                   gate_score=None if gate is None else float(gate),
                   **{**fields, **input_and_method})


# ----------------------------------------------------------------------------- store

def _engine(url: str) -> sa.Engine:
    u = sa.make_url(url)
    if u.get_backend_name() == "sqlite":
        if u.database and u.database != ":memory:" and not u.database.startswith("file:"):
            Path(u.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(u, connect_args={"timeout": BUSY_TIMEOUT_S})

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            cur.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            cur.execute("PRAGMA foreign_keys = ON")
            try:  # WAL: readers do not block the writer; a read-only file keeps its journal
                cur.execute("PRAGMA journal_mode = WAL")
            except Exception:  # noqa: BLE001 - the first write then reports the real problem
                pass
            cur.close()
        return engine
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    return sa.create_engine(u, pool_pre_ping=True, connect_args={"connect_timeout": 5})


def _describe(exc: Exception, where: str) -> AuditError:
    """A sentence for a person from a database failure (never the SQL or its values)."""
    text = str(getattr(exc, "orig", exc) or "").lower()
    if "locked" in text or "busy" in text:
        msg = (f"The audit database ({where}) is locked by another program and did not free up "
               f"within {BUSY_TIMEOUT_S:.0f} s.")
    elif "readonly" in text or "read-only" in text or "read only" in text:
        msg = f"The audit database ({where}) is read-only: MedCLS cannot write to it."
    elif "unable to open" in text or "permission denied" in text:
        msg = f"The audit database ({where}) cannot be opened or created (check the path and permissions)."
    elif "password" in text or "authentication" in text:
        msg = f"The audit database ({where}) refused the login (check the user and password in database_url)."
    elif "connect" in text or "connection" in text or "timeout" in text:
        msg = f"The audit database ({where}) cannot be reached."
    else:
        msg = f"The audit database ({where}) failed ({type(getattr(exc, 'orig', exc)).__name__})."
    return AuditError(msg + " The answer is shown, but it was not recorded in the audit trail.")


class AuditStore:
    """Write and read the audit trail. One per database URL and process; thread-safe."""

    def __init__(self, url: str):
        self.url = url
        self.engine = _engine(url)
        self._ready = False
        self._lock = threading.Lock()

    @property
    def where(self) -> str:
        u = self.engine.url
        # the file's name only: its absolute path tells anyone how the server is laid out
        return (f"SQLite file {Path(u.database or ':memory:').name}" if u.get_backend_name() == "sqlite"
                else f"PostgreSQL {u.host or 'localhost'}:{u.port or 5432}/{u.database}")

    def __repr__(self) -> str:
        return f"AuditStore({self.where})"

    @contextmanager
    def _begin(self) -> Iterator[sa.Connection]:
        """One transaction; every database failure becomes an :class:`AuditError`."""
        try:
            if not self._ready:
                self.ensure_schema()
            with self.engine.begin() as conn:
                yield conn
        except AuditError:
            raise
        except (sa_exc.SQLAlchemyError, OSError) as exc:
            raise _describe(exc, self.where) from None

    def ensure_schema(self) -> None:
        """Create the tables on first use and check the schema version (idempotent and safe
        when several processes start at once)."""
        with self._lock:
            if self._ready:
                return
            for attempt in range(5):
                try:
                    self._create_or_check()
                    break
                except AuditError:
                    raise
                except (sa_exc.IntegrityError, sa_exc.OperationalError, sa_exc.ProgrammingError) as exc:
                    # another process created the same table or version row a moment ago
                    if attempt == 4:
                        raise _describe(exc, self.where) from None
                except (sa_exc.SQLAlchemyError, OSError) as exc:
                    raise _describe(exc, self.where) from None
            self._ready = True

    def _create_or_check(self) -> None:
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":  # one creator at a time across servers
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(4242020)"))
            if sa.inspect(conn).has_table("audit_schema"):
                version = conn.execute(sa.select(sa.func.max(schema_info.c.version))).scalar()
                if version is not None and version > SCHEMA_VERSION:
                    raise AuditSchemaError(
                        f"The audit database ({self.where}) has schema version {version}, newer "
                        f"than this MedCLS understands ({SCHEMA_VERSION}). Nothing was written. "
                        "Update MedCLS, or point database_url at another database.")
                if version == SCHEMA_VERSION:
                    return
            else:
                version = None
            metadata.create_all(conn)  # adds the tables an older schema lacks; never drops
            if version is None:
                conn.execute(sa.insert(schema_info).values(id=1, version=SCHEMA_VERSION,
                                                           created_at=now()))
            else:  # an older schema: add the columns of the versions after it
                _migrate(conn, version)
                conn.execute(sa.update(schema_info).values(version=SCHEMA_VERSION))

    # ------------------------------------------------------------------ writes

    def record_answers(self, items: Sequence[Answer]) -> list[int]:
        """Store answers in one transaction; their ids, in order."""
        if not items:
            return []
        with self._begin() as conn:
            return [conn.execute(sa.insert(answers).values(**asdict(a))).inserted_primary_key[0]
                    for a in items]

    def record_answer(self, answer: Answer) -> int:
        return self.record_answers([answer])[0]

    def record_verdict(self, answer_id: int, user: str, verdict: str,
                       corrected_class: str | None = None, note: str | None = None) -> int:
        """The clinician's verdict on an answer. ``disagree`` needs the corrected class."""
        if verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}")
        if verdict == "disagree" and not corrected_class:
            raise AuditError("A disagreement needs the class you think is right.")
        with self._begin() as conn:
            row = conn.execute(sa.select(answers.c.predicted, answers.c.withheld)
                               .where(answers.c.id == answer_id)).first()
            predicted = None if row is None else (None if row.withheld else row.predicted)
            if row is None:
                raise AuditError("That answer is not in the audit trail, so no verdict can be "
                                 "attached to it.")
            if verdict == "disagree" and predicted is not None and corrected_class == predicted:
                raise AuditError("The corrected class is the one the model gave: choose "
                                 "'agree', or another class.")
            return conn.execute(sa.insert(verdicts).values(
                answer_id=answer_id, at=now(), user=user, verdict=verdict,
                corrected_class=corrected_class if verdict == "disagree" else None,
                note=(note or "").strip() or None)).inserted_primary_key[0]

    def record_export(self, user: str, page: str, kind: str, answer_id: int | None = None,
                      n_answers: int = 1, target: str | None = None) -> int:
        """An export (report, CSV) or a PACS send of one or several answers."""
        with self._begin() as conn:
            return conn.execute(sa.insert(exports).values(
                at=now(), user=user, page=page, kind=kind, answer_id=answer_id,
                n_answers=n_answers, target=target)).inserted_primary_key[0]

    # ------------------------------------------------------------------ reads

    def rows(self, table: str | sa.Table, since: dt.datetime | None = None) -> list[dict]:
        """Every row of one table (oldest first), as dicts."""
        t = metadata.tables[table] if isinstance(table, str) else table
        q = sa.select(t).order_by(t.c.id)
        if since is not None and "at" in t.c:
            q = q.where(t.c.at >= since)
        with self._begin() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def answers_with_verdicts(self, since: dt.datetime | None = None,
                              until: dt.datetime | None = None) -> list[dict]:
        """Answers joined with their latest verdict (verdict columns are None without one)."""
        latest = (sa.select(verdicts.c.answer_id, sa.func.max(verdicts.c.id).label("vid"))
                  .group_by(verdicts.c.answer_id).subquery())
        q = (sa.select(answers,
                       verdicts.c.verdict, verdicts.c.corrected_class, verdicts.c.note,
                       verdicts.c.user.label("verdict_user"), verdicts.c.at.label("verdict_at"))
             .select_from(answers.outerjoin(latest, latest.c.answer_id == answers.c.id)
                          .outerjoin(verdicts, verdicts.c.id == latest.c.vid))
             .order_by(answers.c.id))
        if since is not None:
            q = q.where(answers.c.at >= since)
        if until is not None:
            q = q.where(answers.c.at < until)
        with self._begin() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def latest_verdict(self, answer_id: int) -> dict | None:
        """The latest verdict on an answer (verdict, corrected_class, note, user, at), or None."""
        q = (sa.select(verdicts.c.verdict, verdicts.c.corrected_class, verdicts.c.note,
                       verdicts.c.user, verdicts.c.at)
             .where(verdicts.c.answer_id == answer_id).order_by(verdicts.c.id.desc()).limit(1))
        with self._begin() as conn:
            row = conn.execute(q).first()
        return dict(row._mapping) if row is not None else None

    def table_names(self) -> list[str]:
        return sorted(metadata.tables)

    def dispose(self) -> None:
        self.engine.dispose()


_STORES: dict[str, AuditStore] = {}
_STORES_LOCK = threading.Lock()


def open_store(url: str | None = None) -> AuditStore:
    """The process's store for ``url`` (default: the settings' database URL)."""
    url = url or database_url()
    with _STORES_LOCK:
        if url not in _STORES:
            _STORES[url] = AuditStore(url)
        return _STORES[url]
