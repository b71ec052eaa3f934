"""Who may use what: the allow-list, a role per user and the permission each page needs.

Sign-in itself is Streamlit's OpenID Connect (``st.login``, configured in the ``[auth]``
section of ``.streamlit/secrets.toml``); this module only decides, from the signed-in
user's e-mail claims, whether they may use the app and in which role. It is plain Python so
that the rules are tested without Streamlit.

Roles are ordered: a reviewer may do everything a clinician may, an admin everything.
When sign-in is not configured the app has one local user, who holds every permission
(the app runs as it always did on one workstation).

Settings (:class:`medcls.core.settings.AuthSettings`: ``[auth]`` in secrets.toml, beside
Streamlit's own sign-in keys, or the environment)::

    [auth]
    # ... redirect_uri, cookie_secret, client_id, client_secret, server_metadata_url
    allow = ["@hospital.example", "visiting.expert@partner.example"]  # addresses or @domains
    default_role = "clinician"                                       # role of allowed users
    [auth.roles]
    "head.radiologist@hospital.example" = "reviewer"
    "it.admin@hospital.example" = "admin"

``MEDCLS_AUTH_ALLOW`` (comma-separated), ``MEDCLS_AUTH_ROLES`` (``addr=role,addr=role``) and
``MEDCLS_AUTH_DEFAULT_ROLE`` override them. A user listed under ``roles`` is allowed even if
``allow`` does not cover them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from medcls.core.errors import AccessDeniedError, MedclsError

ROLES = ("clinician", "reviewer", "admin")

# The least role each permission needs. Pages and actions name a permission, never a role.
PERMISSIONS = {
    "classify": "clinician",       # main page, series view, model comparison
    "batch": "clinician",          # batch review of uploaded files
    "verdict": "clinician",        # agree / disagree with an answer
    "server-folder": "reviewer",   # batch review of folders on the server
    "pacs-send": "reviewer",       # send results to the PACS
    "monitoring": "reviewer",      # the Monitoring page and its export
    "incoming": "reviewer",        # the Incoming page: the listener's queue, retrying a job
    "adapt": "admin",              # adapt a model to the site, set the site default
}

PERMISSION_WORDS = {
    "classify": "classify scans",
    "batch": "review a batch of uploaded scans",
    "verdict": "record a verdict",
    "server-folder": "review folders on the server",
    "pacs-send": "send results to the PACS",
    "monitoring": "open the monitoring page",
    "incoming": "open the incoming series page",
    "adapt": "adapt models to this site",
}


@dataclass(frozen=True)
class User:
    """The person using the app: their e-mail (or ``local``) and role."""

    email: str
    role: str
    local: bool = False

    @property
    def name(self) -> str:
        """What the audit trail records as the user."""
        return self.email


LOCAL_USER = User("local", "admin", local=True)


def _norm(address: str) -> str:
    return address.strip().lower()


@dataclass(frozen=True)
class AccessPolicy:
    """The allow-list and the roles: which signed-in e-mail may use the app, as what."""

    allow: tuple[str, ...] = ()
    roles: Mapping[str, str] = field(default_factory=dict)
    default_role: str = "clinician"

    def __post_init__(self):
        bad = {r for r in (*self.roles.values(), self.default_role) if r not in ROLES}
        if bad:
            raise MedclsError(f"Unknown role(s) {sorted(bad)} in the access settings; the roles are "
                              f"{', '.join(ROLES)}.")
        object.__setattr__(self, "allow", tuple(_norm(a) for a in self.allow if a.strip()))
        object.__setattr__(self, "roles", {_norm(k): v for k, v in self.roles.items()})

    def _allowed(self, email: str) -> bool:
        domain = email.rpartition("@")[2]
        for entry in self.allow:
            if entry == email or entry.lstrip("@") == domain and "@" not in entry.lstrip("@"):
                return True
        return False

    def role_of(self, email: str | None, verified: bool | None = True) -> str | None:
        """The role of a signed-in user, or None when they may not use the app.

        An address the provider marks as unverified is refused: anyone could claim it.
        """
        if not email or "@" not in email or verified is False:
            return None
        email = _norm(email)
        if email in self.roles:
            return self.roles[email]
        return self.default_role if self._allowed(email) else None

    def user(self, claims: Mapping) -> User:
        """The :class:`User` for an OpenID Connect claim set; refused with
        :class:`AccessDeniedError` when the allow-list does not cover them."""
        email = claims.get("email")
        role = self.role_of(email, claims.get("email_verified", True))
        if role is None:
            raise AccessDeniedError(
                "This account is not allowed to use MedCLS here"
                + (" (its e-mail address is not verified by the sign-in provider)"
                   if claims.get("email_verified") is False else "")
                + ". Ask the administrator to add it to the allow-list, or sign out and use "
                  "another account.")
        return User(_norm(email), role)


def may(user: User, permission: str) -> bool:
    """Whether ``user`` holds ``permission`` (see :data:`PERMISSIONS`)."""
    if permission not in PERMISSIONS:
        raise KeyError(f"unknown permission {permission!r}")
    return ROLES.index(user.role) >= ROLES.index(PERMISSIONS[permission])


def require(user: User, permission: str) -> None:
    """Raise :class:`AccessDeniedError` unless ``user`` holds ``permission``."""
    if not may(user, permission):
        needed = [r for r in ROLES if ROLES.index(r) >= ROLES.index(PERMISSIONS[permission])]
        raise AccessDeniedError(
            f"Your role ({user.role}) may not {PERMISSION_WORDS[permission]}; this needs the "
            f"{' or '.join(needed)} role. Ask the administrator if you need it.")


def policy_from(auth) -> AccessPolicy:
    """The access policy of :class:`medcls.core.settings.AuthSettings` (``settings.auth``)."""
    return AccessPolicy(tuple(auth.allow), dict(auth.roles), auth.default_role)


def login_provider(secrets: Mapping) -> str | None:
    """The provider ``st.login`` should use: None for one provider set up in ``[auth]``
    itself, else the first named ``[auth.NAME]`` provider table."""
    auth = secrets.get("auth") or {}
    if auth.get("client_id"):
        return None
    return next((k for k, v in auth.items() if isinstance(v, Mapping) and v.get("client_id")), None)


def sign_in_configured(secrets: Mapping) -> bool:
    """True when secrets.toml has Streamlit's ``[auth]`` section (OpenID Connect sign-in)."""
    auth = secrets.get("auth") or {}
    return bool(auth.get("client_id") or any(isinstance(v, Mapping) and v.get("client_id")
                                             for v in auth.values()))
