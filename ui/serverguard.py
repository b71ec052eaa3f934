"""The server's own doors under sign-in: uploads only into the session of an admitted visitor
whose sign-in cookie comes with them, media (images, a report's PDF) only with the cookie of
the signed-in session that made them, and the uploads of sessions gone freed.

Why it is needed: Streamlit 1.67 checks sign-in in the script only. Its upload route
(``PUT /_stcore/upload_file/<session>/<file>``) stores up to ``server.maxUploadSize`` for any
live session id, and a visitor who never signed in has one (the sign-in page is a session):
three such sessions held 796 MB, never freed, since a disconnected session's uploads are only
dropped when Streamlit shuts the session down, which its session store's expiry never does.
Its media route (``/media/<file>``) serves any file to any request that names it.

How: :func:`install` (called by :func:`ui.signin.guard` when ``[auth]`` is configured, so on
the first script run of the server) puts one check in front of the server's ASGI application
(Starlette's ``__call__``, which every HTTP request of the process goes through). The check
only reads what the pages decided: :func:`admit` records, on every page run, which sign-in
(:func:`medcls.core.access.signin_key`, a hash of the ID token's issuer, subject, issue time
and nonce) the session was admitted with, after the allow-list, the roles, the sign-out list and
the sign-in's age were checked; :func:`dismiss` withdraws it. A request is refused with 403
before its body is read when:

- it uploads into a session that is not admitted, or without the cookie of that sign-in;
- it asks for a media file without the cookie of a sign-in admitted in a session that shows
  the file.

A sweeper (every :data:`SWEEP_S` seconds) frees the uploads of sessions that have had no
connection for ``server.disconnectedSessionTTL`` seconds and forgets their admission.
Without ``[auth]`` nothing is installed: the app has one local user, as before.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from typing import Callable, Mapping

from medcls.core.access import signin_key

log = logging.getLogger("medcls.app")

SWEEP_S = 5.0  # how often the uploads of sessions gone are looked for
_UPLOAD = re.compile(r"/_stcore/upload_file/([^/]+)/[^/]+/?$")
_MEDIA = re.compile(r"/media/([^/]+)$")

_lock = threading.RLock()
_admitted: dict[str, str] = {}  # session id -> the sign-in key it was admitted with
_ended: set[str] = set()  # sign-in keys signed out on this server
_installed = False


def admit(session_id: str, key: str) -> None:
    """This page run admitted ``session_id`` with the sign-in ``key``."""
    with _lock:
        if key not in _ended:
            _admitted[session_id] = key


def dismiss(session_id: str) -> None:
    """This page run did not admit ``session_id`` (signed out, refused, not signed in)."""
    with _lock:
        _admitted.pop(session_id, None)


def end_signin(key: str) -> None:
    """The sign-in ``key`` was signed out: every session admitted with it is dismissed."""
    with _lock:
        _ended.add(key)
        for sid in [s for s, k in _admitted.items() if k == key]:
            del _admitted[sid]


def ended(key: str) -> bool:
    with _lock:
        return key in _ended


def cookie_signin(cookies: Mapping[str, str]) -> str | None:
    """The sign-in key of a request's Streamlit sign-in cookie (checked against the cookie
    secret, reassembled from its chunks), or None when there is no valid one."""
    from streamlit.auth_util import get_cookie_with_chunks
    from streamlit.web.server.server_util import get_cookie_secret
    from streamlit.web.server.starlette.starlette_app_utils import decode_signed_value
    from streamlit.web.server.starlette.starlette_server_config import USER_COOKIE_NAME

    try:
        secret = get_cookie_secret()

        def one(name: str) -> bytes | None:
            raw = cookies.get(name)
            return None if raw is None else decode_signed_value(secret, name, raw.encode("latin-1"))

        value = get_cookie_with_chunks(one, USER_COOKIE_NAME)
        payload = json.loads(value) if value else None
    except Exception:  # noqa: BLE001 - a forged or damaged cookie is no sign-in
        return None
    if not isinstance(payload, dict) or payload.get("is_logged_in") is not True:
        return None
    return signin_key(payload)


def refusal(method: str, path: str, cookies: Mapping[str, str],
            media_sessions: Callable[[str], set[str]]) -> str | None:
    """Why this request is refused, or None to let it through (pure: the tests call it too).
    ``media_sessions(file)``: the sessions that show the media file."""
    upload = _UPLOAD.search(path)
    if upload and method == "PUT":
        with _lock:
            wanted = _admitted.get(upload.group(1))
        if wanted is None:
            return "Sign in before uploading."
        if cookie_signin(cookies) != wanted:
            return "This upload does not come with the session's sign-in."
        return None
    media = _MEDIA.search(path)
    if media and method in ("GET", "HEAD"):
        key = cookie_signin(cookies)
        if key is None:
            return "Sign in to see this file."
        shown_in = media_sessions(media.group(1).split(".", 1)[0])
        with _lock:
            if key in _ended or not any(_admitted.get(s) == key for s in shown_in):
                return "This file belongs to another sign-in."
    return None


_made_for: dict[str, str] = {}  # media file id -> session, for files a download built on click


def _media_sessions(runtime) -> Callable[[str], set[str]]:
    """Which sessions show a media file. Streamlit maps the files a page shows to its session
    (no public accessor in 1.67); a file a download button builds on click is left unmapped,
    so the session that asked for it is noted here when it is built."""
    mgr = runtime.media_file_mgr
    build = mgr.execute_deferred

    def execute_deferred(file_id: str) -> str:
        entry = getattr(mgr, "_deferred_callables", {}).get(file_id) or {}
        url = build(file_id)
        if entry.get("session_id"):
            with _lock:
                _made_for[url.rsplit("/", 1)[-1].split(".", 1)[0]] = entry["session_id"]
        return url

    mgr.execute_deferred = execute_deferred

    def sessions(file_id: str) -> set[str]:
        by_session = getattr(mgr, "_files_by_session_and_coord", None) or {}
        out = {sid for sid, files in list(by_session.items()) if file_id in files.values()}
        with _lock:
            if file_id in _made_for:
                out.add(_made_for[file_id])
        return out
    return sessions


async def _forbid(send, reason: str) -> None:
    body = reason.encode()
    await send({"type": "http.response.start", "status": 403,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def install() -> None:
    """Put the check in front of the server (once per process; no-op outside a server)."""
    global _installed
    from streamlit import runtime as st_runtime

    with _lock:
        if _installed or not st_runtime.exists():
            return
        _installed = True
    rt = st_runtime.get_instance()
    from starlette.applications import Starlette
    from starlette.requests import Request

    serve = Starlette.__call__
    sessions = _media_sessions(rt)

    async def guarded(app, scope, receive, send):
        if scope.get("type") == "http":
            why = refusal(scope.get("method", ""), scope.get("path", ""),
                          Request(scope).cookies, sessions)
            if why is not None:
                log.info("refused %s of %s: not signed in for it", scope.get("method"),
                         "an upload" if "upload_file" in scope.get("path", "") else "a file")
                await _forbid(send, why)
                return
        await serve(app, scope, receive, send)

    Starlette.__call__ = guarded
    threading.Thread(target=_sweep, args=(rt,), name="medcls-upload-sweeper", daemon=True).start()


def _sweep(rt) -> None:
    """Free the uploads of sessions without a connection for the disconnected-session TTL."""
    from streamlit import config

    gone_since: dict[str, float] = {}
    while True:
        time.sleep(SWEEP_S)
        try:
            ttl = float(config.get_option("server.disconnectedSessionTTL"))
            uploads = getattr(rt.uploaded_file_mgr, "file_storage", {})
            with _lock:
                known = set(uploads) | set(_admitted)
            now = time.monotonic()
            for sid in known:
                if rt.is_active_session(sid):
                    gone_since.pop(sid, None)
                    continue
                since = gone_since.setdefault(sid, now)
                if now - since >= ttl:
                    rt.uploaded_file_mgr.remove_session_files(sid)
                    dismiss(sid)
                    gone_since.pop(sid, None)
            for sid in [s for s in gone_since if s not in known]:
                del gone_since[sid]
            with _lock:  # downloads built for sessions that are gone
                for fid in [f for f, sid in _made_for.items() if sid not in _admitted]:
                    del _made_for[fid]
        except Exception as exc:  # noqa: BLE001 - the sweeper must outlive one odd pass
            log.warning("upload sweeper: %s", type(exc).__name__)
