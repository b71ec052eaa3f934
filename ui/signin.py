"""Sign-in on every page: who is using it (one local user without ``[auth]``), and whether that
user's role holds a permission (:mod:`medcls.core.access` decides; this module only shows).
With sign-in, every run also checks that the sign-in was not signed out (the audit database's
sign-out list) nor is older than ``session_hours``, and tells the server's guard
(:mod:`ui.serverguard`) which sign-in the session holds.
"""

from __future__ import annotations

import streamlit as st

from medcls.core.access import (
    LOCAL_USER,
    User,
    login_provider,
    may,
    policy_from,
    require,
    sign_in_configured,
    signin_expired,
    signin_key,
)
from medcls.core.errors import AccessDeniedError, AuditError
from ui import serverguard
from ui.common import audit_warning, secrets_dict, settings


def _session_id() -> str | None:
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    ctx = get_script_run_ctx()
    return ctx.session_id if ctx is not None else None


def _store():
    from medcls.integrations.audit.store import database_url, open_store

    return open_store(database_url(settings()))


def _signed_out(key: str) -> bool:
    """Whether this sign-in was ended with "Sign out" (this server, or the audit database that
    every server shares; when it cannot be read, this server's own list, and a warning)."""
    if serverguard.ended(key):
        return True
    from medcls.integrations.audit.signouts import signed_out

    try:
        return signed_out(_store(), key)
    except AuditError as exc:
        audit_warning(exc)
        return False


def sign_out(key: str | None, user: str) -> None:
    """End this sign-in on the server (every session holding it, and the sign-out list of the
    audit database, so a copy of its cookie is refused), then at the provider."""
    if key:
        serverguard.end_signin(key)
        from medcls.integrations.audit.signouts import record_signout

        try:
            record_signout(_store(), key, user)
        except AuditError as exc:  # a callback cannot show: the next run does
            st.session_state["_audit_export_error"] = exc
    st.logout()


def _ask_to_sign_in(secrets, message: str) -> None:
    sid = _session_id()
    if sid:
        serverguard.dismiss(sid)
    st.info(message)
    provider = login_provider(secrets)
    st.button("Sign in", type="primary", key="_sign_in",
              on_click=(lambda: st.login(provider)) if provider else st.login)
    st.stop()


def guard(permission: str = "classify") -> User:
    """Who is using the page, checked against ``permission``; stops the page otherwise.

    Without ``[auth]`` in secrets.toml there is one local user who may do everything.
    With it, an unsigned visitor gets the sign-in button, a user off the allow-list a
    clear refusal, and a user whose role lacks ``permission`` a message naming the role.
    """
    secrets = secrets_dict()
    st.session_state.pop("_user", None)  # decided afresh on every run
    if not sign_in_configured(secrets):
        user = LOCAL_USER
        st.sidebar.caption("Sign-in is not configured: one local user, every page open "
                           "(see the README, “Sign-in”).")
    else:
        serverguard.install()  # the server's upload and media doors (once per process)
        if not getattr(st.user, "is_logged_in", False):
            _ask_to_sign_in(secrets, "Sign in to use MedCLS. Your organisation's account "
                                     "decides what you may do.")
        claims = st.user.to_dict()
        key = signin_key(claims)
        if key is None or signin_expired(claims, settings().auth.session_hours) \
                or _signed_out(key):
            _ask_to_sign_in(secrets, "Your sign-in has ended (signed out, or older than "
                                     f"{settings().auth.session_hours:g} hours). Sign in again "
                                     "to use MedCLS.")
        try:
            user = policy_from(settings().auth).user(claims)
        except AccessDeniedError as exc:
            if _session_id():
                serverguard.dismiss(_session_id())
            st.error(f"Access refused. {exc}")
            st.caption("Signed in as an account that is not allowed here.")
            st.button("Sign out", key="_sign_out_refused", on_click=sign_out, args=(key, "refused"))
            st.stop()
        if _session_id():
            serverguard.admit(_session_id(), key)
        with st.sidebar:
            st.caption(f"Signed in as **{user.email}** ({user.role})")
            st.button("Sign out", key="_sign_out", on_click=sign_out, args=(key, user.name))
    st.session_state["_user"] = user
    failed_export = st.session_state.pop("_audit_export_error", None)
    if failed_export:  # a download's callback could not record it (callbacks cannot show)
        audit_warning(failed_export)
    if not may(user, permission):
        show_refusal(user, permission)
        st.stop()
    return user


def current_user() -> User:
    """The user the guard admitted on this run (a page that skipped the guard runs it now)."""
    return st.session_state.get("_user") or guard("classify")


def show_refusal(user: User, permission: str) -> None:
    try:
        require(user, permission)
    except AccessDeniedError as exc:
        st.error(str(exc))


def permitted(permission: str, explain: bool = True) -> bool:
    """Whether the current user holds ``permission``; says why not when ``explain``."""
    user = current_user()
    if may(user, permission):
        return True
    if explain:
        show_refusal(user, permission)
    return False
