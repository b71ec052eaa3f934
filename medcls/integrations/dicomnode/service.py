"""The listener as one running service: the receiver (:mod:`.receiver`), the completion of quiet
series, one worker that answers and sends (:mod:`.answer`) and the health heartbeat, all on the
durable queue (:mod:`.jobs`).

One worker: answering is CPU-bound and a series' slices already go through the model in
batches; a second worker would only compete for the same cores. The worker loads the site's
models before it takes its first job (the receiver accepts series meanwhile), so the first
answer does not wait for TensorFlow.
"""

from __future__ import annotations

import logging
import os
import resource
import threading
import time

from medcls.core.errors import ListenerError
from medcls.core.settings import Settings, load_settings
from medcls.integrations.dicomnode.answer import (
    USER_PREFIX,
    Predictors,
    Sender,
    answer_job,
    describe_error,
)
from medcls.integrations.dicomnode.jobs import FAILED, NOT_ANSWERED, SENDING, JobQueue, open_queue
from medcls.integrations.dicomnode.receiver import Receiver
from medcls.integrations.dicomnode.routing import Router, site_models
from medcls.integrations.dicomnode.spool import Spool
from medcls.integrations.pacs.client import handle

log = logging.getLogger(__name__)

TICK_S = 0.2  # how often quiet series are looked for and the worker looks for work
HEARTBEAT_S = 2.0


def peak_rss_bytes() -> int:
    """This process's peak resident memory (Linux reports kilobytes)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class Listener:
    """``Listener(settings).start()``, then ``stop()``; or ``run()`` until stopped."""

    def __init__(self, settings: Settings | None = None, database_url: str | None = None):
        from medcls.integrations.audit.store import database_url as default_url

        self.settings = settings or load_settings()
        cfg = self.settings.listener
        if not cfg.accept_from:
            raise ListenerError("The listener accepts no sender: name the PACS's AE title(s) in "
                                "the [listener] accept_from setting (MEDCLS_LISTENER_ACCEPT_FROM).")
        self.cfg = cfg
        self.spool = Spool(cfg.spool_dir, int(cfg.spool_budget_mb * 1024 * 1024))
        self.queue: JobQueue = open_queue(database_url or default_url(self.settings), cfg.ae_title)
        self.router = Router(site_models(self.settings.models_dir, cfg.models))
        if not self.router.describe():
            raise ListenerError("None of the site's models names the modality it answers, so the "
                                "listener could answer nothing; check the models folder or the "
                                "[listener] models setting.")
        self.sender = Sender(self.settings, cfg.ae_title)
        self.predictors = Predictors()
        self.receiver = Receiver(cfg.ae_title, cfg.accept_from, cfg.whole_series_from, self.spool,
                                 self.queue, self.router, on_complete=self._completed)
        self.user = f"{USER_PREFIX} {cfg.ae_title}"
        self.started_at: float | None = None
        self.warm = threading.Event()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._server = None

    def __repr__(self) -> str:
        return f"Listener({self.cfg.ae_title} on {self.cfg.bind}:{self.cfg.port})"

    # ------------------------------------------------------------------ life
    def start(self) -> "Listener":
        self.queue.ensure()
        resumed = self.queue.resume()
        try:
            self._server = self.receiver.start(self.cfg.bind, self.cfg.port)
        except OSError as exc:
            raise ListenerError(f"The listener cannot listen on {self.cfg.bind}:{self.cfg.port} "
                                f"({exc.strerror or type(exc).__name__}); choose another port or "
                                "bind address in the [listener] settings.") from None
        self.started_at = time.time()
        self._beat()
        for name, target in (("completion", self._complete_loop), ("worker", self._work_loop),
                             ("heartbeat", self._heartbeat_loop)):
            t = threading.Thread(target=target, name=f"listener-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        log.info("listener %s on %s:%d; accepts %s; models %s; results by %s; %d job(s) resumed",
                 self.cfg.ae_title, self.cfg.bind, self.cfg.port, ", ".join(self.cfg.accept_from),
                 "; ".join(self.router.describe()), self._target(), resumed)
        return self

    def _target(self) -> str:
        try:
            return self.sender.target
        except ListenerError as exc:
            log.warning("%s", exc)
            return "nowhere (no PACS configured)"

    def request_stop(self) -> None:
        """Ask :meth:`run` to end (safe from a signal handler)."""
        self._stop.set()
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        for t in self._threads:
            t.join(timeout=30)
        try:
            self.queue.beat(stopped_at=time.time(), heartbeat_at=time.time())
        except ListenerError:
            pass

    def run(self) -> None:
        """Start and serve until :meth:`stop` (from a signal handler or another thread)."""
        self.start()
        try:
            while not self._stop.wait(1.0):
                pass
        finally:
            self.stop()

    # ------------------------------------------------------------------ loops
    def _complete_loop(self) -> None:
        while not self._stop.wait(TICK_S):
            try:
                self._completed(self.queue.complete_quiet(self.cfg.quiet_s))
            except ListenerError as exc:
                log.warning("%s", exc)
                self._stop.wait(2.0)

    def _completed(self, done: list[tuple[int, str, str]]) -> None:
        """Series just complete: the worker wakes for the ready ones; the instances of one that
        will not be answered (no model, or incomplete) leave the spool now."""
        for job_id, state, series_uid in done:
            if state in (FAILED, NOT_ANSWERED):
                self.spool.remove(series_uid)
            log.info("job %d (series %s) complete: %s", job_id, handle(series_uid), state)
        if done:
            self._wake.set()

    def _warm_up(self) -> None:
        for model in self.router.models:
            if model.modality:
                try:
                    self.predictors.get(model)
                except Exception as exc:  # noqa: BLE001 - the job that needs it will say so
                    log.warning("model %s could not be loaded: %s", model.name, describe_error(exc))
        log.info("listener %s: %d model(s) ready", self.cfg.ae_title, len(self.predictors))
        self.warm.set()

    def _work_loop(self) -> None:
        self._warm_up()
        while not self._stop.is_set():
            try:
                job = self.queue.claim()
            except ListenerError as exc:
                log.warning("%s", exc)
                self._stop.wait(2.0)
                continue
            if job is None:
                self._wake.wait(TICK_S)
                self._wake.clear()
                continue
            try:
                self.work(job)
            except Exception as exc:  # noqa: BLE001 - e.g. the database went away mid-job
                reason = describe_error(exc)
                log.warning("job %d stopped: %s", job["id"], reason)
                try:
                    self.queue.failed(job["id"], reason)
                except ListenerError:
                    pass  # still answering in the queue: taken up again at the next start
                self._stop.wait(1.0)

    def work(self, job: dict) -> None:
        """Answer a claimed job (unless its results are built already) and send them."""
        jid, series = job["id"], handle(job["series_uid"])
        if job["state"] != SENDING:
            try:
                outcome = answer_job(job, self.spool, self.router, self.predictors, self.user)
            except Exception as exc:  # noqa: BLE001 - one series never stops the listener
                reason = describe_error(exc)
                log.warning("job %d (series %s) failed while answering: %s", jid, series, reason)
                self.queue.failed(jid, reason)
                return
            if not outcome.answered:
                log.info("job %d (series %s) not answered: %s", jid, series, outcome.reason)
                self.queue.not_answered(jid, outcome.reason)
                self.spool.remove(job["series_uid"])
                return
            self.spool.save_results(jid, outcome.datasets)
            uids = [str(ds.SOPInstanceUID) for ds in outcome.datasets]
            self.queue.answered(jid, outcome.answers, uids, outcome.outcome, outcome.label,
                                outcome.probability, outcome.state)
            log.info("job %d (series %s) answered: %s, %d instance(s) audited", jid, series,
                     outcome.outcome, len(outcome.answers))
            datasets, n_answered = outcome.datasets, len(outcome.answers)
        else:
            n_answered = int(job.get("n_answered") or 0)
            datasets = self.spool.load_results(jid)
            if not datasets:
                self.queue.failed(jid, "The built results of this series were lost from the spool; "
                                  "have the PACS send the series again.")
                return
        self._send(job, datasets, n_answered)

    def _send(self, job: dict, datasets: list, n_answered: int) -> None:
        jid = job["id"]
        try:
            stored = self.sender.send(datasets)
        except Exception as exc:  # noqa: BLE001 - retried with back-off, then failed
            reason = describe_error(exc)
            again = self.queue.send_failed(jid, reason, self.cfg.send_retries, self.cfg.backoff_s)
            log.warning("job %d: sending failed (%s)%s", jid, reason,
                        "; will retry" if again else "; given up")
            return
        self.queue.sent(jid)
        try:
            self.queue.store.record_export(self.user, "listener", "pacs-send",
                                           n_answers=n_answered, target=" ".join(stored)[:1024])
        except Exception as exc:  # noqa: BLE001 - the send happened; the trail says what it can
            log.warning("job %d: the send could not be recorded: %s", jid, describe_error(exc))
        self.spool.remove(job["series_uid"])
        self.spool.remove_results(jid)
        log.info("job %d sent: %d object(s)", jid, len(stored))

    # ------------------------------------------------------------------ health
    def _beat(self) -> None:
        r = self.receiver
        self.queue.beat(address=f"{self.cfg.bind}:{self.cfg.port}", pid=os.getpid(),
                        started_at=self.started_at, heartbeat_at=time.time(), stopped_at=None,
                        last_association_at=r.last_association_at,
                        last_calling_ae=r.last_calling_ae, associations=r.associations,
                        rejected=r.rejected, spool_bytes=self.spool.used,
                        spool_budget=self.spool.budget, peak_rss_bytes=peak_rss_bytes(),
                        models="; ".join(self.router.describe()))

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._beat()
            except ListenerError as exc:
                log.warning("%s", exc)
