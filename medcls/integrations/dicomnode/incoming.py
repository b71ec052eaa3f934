"""What the Incoming page says about the listener: its queue as rows (state in words, the time
from a series' last instance to its results in the PACS, the reason a series was not answered or
failed), the counts per state, and the listener's health (up since, last association, spool
use). Computed here from the queue's rows; the page only lays them out.

No patient data: a series is shown by a short hash of its UID, its modality, number and
instance count (the PACS shows the rest to those allowed to see it).
"""

from __future__ import annotations

import datetime as dt
import statistics
import time
from dataclasses import dataclass
from typing import Sequence

from medcls.integrations.dicomnode.jobs import (
    ANSWERING,
    FAILED,
    NOT_ANSWERED,
    READY,
    RECEIVING,
    SENDING,
    SENT,
    JobQueue,
)
from medcls.integrations.pacs.client import handle

#: The page's groups, in the order a series goes through them.
GROUPS = ("received", "answering", "sent", "not answered", "failed")
GROUP_OF = {RECEIVING: "received", READY: "received", ANSWERING: "answering",
            SENDING: "answering", SENT: "sent", NOT_ANSWERED: "not answered", FAILED: "failed"}
STATE_WORDS = {RECEIVING: "receiving instances", READY: "complete, waiting for the model",
               ANSWERING: "answering", SENDING: "sending to the PACS", SENT: "sent to the PACS",
               NOT_ANSWERED: "not answered", FAILED: "failed"}
MB = 1024 * 1024  # the spool budget's unit (spool_budget_mb)
#: A listener whose heartbeat is older than this is shown as down.
STALE_S = 15.0


def when(t: float | None, now: float | None = None) -> str:
    """A moment as people read it: "14:03:07 UTC (12 s ago)"."""
    if t is None:
        return "–"
    now = time.time() if now is None else now
    stamp = dt.datetime.fromtimestamp(t, dt.timezone.utc)
    return f"{stamp:%Y-%m-%d %H:%M:%S} UTC ({ago(now - t)})"


def ago(seconds: float) -> str:
    s = max(0.0, seconds)
    if s < 90:
        return f"{s:.0f} s ago"
    if s < 5400:
        return f"{s / 60:.0f} min ago"
    if s < 129600:
        return f"{s / 3600:.0f} h ago"
    return f"{s / 86400:.0f} days ago"


def latency_s(job: dict) -> float | None:
    """Seconds from the series' last instance reaching the listener to its results stored in
    the PACS (sent jobs only)."""
    if job.get("sent_at") is None or job.get("last_instance_at") is None:
        return None
    return max(0.0, job["sent_at"] - job["last_instance_at"])


def reason_text(job: dict) -> str:
    """"not answered: ...", "failed: ...", or a send waiting for its next attempt."""
    reason = job.get("reason") or ""
    if job["state"] == NOT_ANSWERED:
        return f"not answered: {reason}" if reason else "not answered"
    if job["state"] == FAILED:
        return f"failed: {reason}" if reason else "failed"
    if job["state"] == SENDING and reason:
        return reason
    if job.get("n_repeats"):
        return f"{job['n_repeats']} instance(s) arrived again after the answer (not answered twice)"
    return ""


def answer_text(job: dict) -> str:
    label, p, state = job.get("answer_label"), job.get("answer_probability"), job.get("answer_state")
    if job.get("outcome") is None:
        return ""
    from medcls.engine.present import fmt_prob

    if label is None:
        return f"no class ({state or 'withheld'})"
    return f"{label.replace('_', ' ')} {fmt_prob(p) if p is not None else ''} ({state})".replace("  ", " ")


def job_rows(jobs: Sequence[dict]) -> list[dict]:
    """One row per job, newest first, for the page's table."""
    rows = []
    for j in jobs:
        lat = latency_s(j)
        rows.append({
            "job": j["id"], "state": STATE_WORDS.get(j["state"], j["state"]),
            "answer": answer_text(j),
            "reason": (j.get("reason") or "") if j["state"] in (NOT_ANSWERED, FAILED) else reason_text(j),
            "last instance → in PACS (s)": None if lat is None else round(lat, 1),
            "received (UTC)": dt.datetime.fromtimestamp(j["first_instance_at"], dt.timezone.utc)
            .strftime("%Y-%m-%d %H:%M:%S") if j.get("first_instance_at") else None,
            "from": j.get("calling_ae"), "modality": j.get("modality"),
            "series no.": j.get("series_number"), "instances": j.get("n_instances"),
            "model": (j.get("model_key") or "").split(" sha256-")[0] if j.get("model_folder") else "–",
            "series": handle(j["series_uid"]), "attempts": j.get("attempts") or 0,
        })
    return rows


def counts(jobs: Sequence[dict]) -> dict[str, int]:
    """Jobs per group (:data:`GROUPS`)."""
    out = dict.fromkeys(GROUPS, 0)
    for j in jobs:
        out[GROUP_OF.get(j["state"], "failed")] += 1
    return out


@dataclass(frozen=True)
class Latency:
    n: int
    median_s: float | None
    worst_s: float | None
    last_s: float | None

    @property
    def text(self) -> str:
        if not self.n:
            return "No series has been sent yet."
        return (f"Last instance to results in the PACS: median {self.median_s:.1f} s over "
                f"{self.n} sent series (slowest {self.worst_s:.1f} s, latest {self.last_s:.1f} s).")


def latency(jobs: Sequence[dict]) -> Latency:
    sent = sorted((j for j in jobs if latency_s(j) is not None), key=lambda j: j["sent_at"])
    values = [latency_s(j) for j in sent]
    if not values:
        return Latency(0, None, None, None)
    return Latency(len(values), statistics.median(values), max(values), values[-1])


@dataclass(frozen=True)
class Health:
    """One listener's health, in words."""

    listener: str
    up: bool
    status: str
    last_association: str
    spool: str
    spool_fraction: float
    detail: str


def health_view(row: dict, now: float | None = None) -> Health:
    now = time.time() if now is None else now
    beat = row.get("heartbeat_at")
    up = row.get("stopped_at") is None and beat is not None and now - beat <= STALE_S
    if up:
        status = f"Up since {when(row.get('started_at'), now)}"
    elif row.get("stopped_at") is not None:
        status = f"Stopped {when(row['stopped_at'], now)}"
    else:
        status = f"Not answering: last heard from {when(beat, now)}"
    last = row.get("last_association_at")
    last_text = (f"{when(last, now)} from {row.get('last_calling_ae')}" if last is not None
                 else "none since it started")
    used, budget = int(row.get("spool_bytes") or 0), int(row.get("spool_budget") or 0)
    fraction = used / budget if budget else 0.0
    spool = f"{used / MB:.1f} of {budget / MB:.0f} MB ({fraction:.0%})"
    detail = (f"{row.get('listener')} on {row.get('address')}; {row.get('associations') or 0} "
              f"association(s), {row.get('rejected') or 0} rejected (AE title not accepted); models: "
              f"{row.get('models') or '–'}; peak memory {int(row.get('peak_rss_bytes') or 0) / MB:.0f} MB")
    return Health(str(row.get("listener")), up, status, last_text, spool, min(1.0, fraction), detail)


def retry(queue: JobQueue, job_id: int) -> str:
    """Retry a failed job; what the page says after it."""
    state = queue.retry(int(job_id))
    return ("Queued again: its results are sent at the listener's next attempt." if state == SENDING
            else "Queued again: the listener answers it from the spool and sends the results.")
