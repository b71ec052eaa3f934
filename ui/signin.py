"""Sign-in on every page: who is using it (one local user without ``[auth]``), and whether that
user's role holds a permission (:mod:`medcls.core.access` decides; this module only shows).
"""

from __future__ import annotations

import streamlit as st

from medcls.core.access import LOCAL_USER, User, login_provider, may, policy_from, require, sign_in_configured
from medcls.core.errors import AccessDeniedError
from ui.common import audit_warning, secrets_dict, settings


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
        if not getattr(st.user, "is_logged_in", False):
            st.info("Sign in to use MedCLS. Your organisation's account decides what you may do.")
            provider = login_provider(secrets)
            st.button("Sign in", type="primary", key="_sign_in",
                      on_click=(lambda: st.login(provider)) if provider else st.login)
            st.stop()
        try:
            user = policy_from(settings().auth).user(st.user.to_dict())
        except AccessDeniedError as exc:
            st.error(f"Access refused. {exc}")
            st.caption(f"Signed in as {st.user.get('email') or 'an account without an e-mail address'}.")
            st.button("Sign out", key="_sign_out_refused", on_click=st.logout)
            st.stop()
        with st.sidebar:
            st.caption(f"Signed in as **{user.email}** ({user.role})")
            st.button("Sign out", key="_sign_out", on_click=st.logout)
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
