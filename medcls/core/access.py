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

An address counts only when the provider says it verified it (``email_verified`` is the JSON
value ``true``: a missing claim, ``false`` or the string ``"false"`` are refused) and when it
parses as one address (:func:`parse_address`: exactly one ``@``, a real host name after it), so
``evil@elsewhere.test@hospital.test`` is not a hospital address. A ``roles`` key may also name
the provider's subject, ``"<issuer>#<sub>"`` (see :func:`subject_of`): the account itself,
whatever address it shows, which no e-mail change at the provider can take over.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from email.errors import HeaderParseError
from email.headerregistry import Address
from typing import Mapping

from medcls.core.errors import AccessDeniedError, MedclsError

ROLES = ("clinician", "reviewer", "admin")

# The least role each permission needs. Pages and actions name a permission, never a role.
PERMISSIONS = {
    "classify": "clinician",       # main page, series view, model comparison
    "batch": "clinician",          # batch review of uploaded files
    "verdict": "clinician",        # agree / disagree with an answer
    "server-folder": "reviewer",   # batch review of folders on the server
    "pacs-open": "clinician",      # open a PACS study by its accession number
    "pacs-search": "reviewer",     # search the PACS freely, list its patients
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
    "pacs-open": "open a PACS study by its accession number",
    "pacs-search": "search the PACS or list its patients",
    "pacs-send": "send results to the PACS",
    "monitoring": "open the monitoring page",
    "incoming": "open the incoming series page",
    "adapt": "adapt models to this site",
}


@dataclass(frozen=True)
class User:
    """The person using the app: their e-mail (or ``local``), role and, when signed in, the
    provider's account (``"<issuer>#<sub>"``, :func:`subject_of`)."""

    email: str
    role: str
    local: bool = False
    subject: str | None = None

    @property
    def name(self) -> str:
        """What the audit trail records as the user."""
        return self.email


LOCAL_USER = User("local", "admin", local=True)


def _norm(address: str) -> str:
    return address.strip().lower()


_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def parse_address(address) -> tuple[str, str] | None:
    """``(local part, domain)`` of one e-mail address, lower case, or None when it is not one.

    Parsed by the standard library's RFC 5322 parser (``email.headerregistry.Address``), then
    held to what a sign-in provider's address is: exactly one ``@`` (so no quoted local part
    hides a second one), no spaces or control characters, and a host name after the ``@``
    (labels of letters, digits and inner hyphens, at least two of them; an internationalised
    name is compared in its ASCII form), never an address literal."""
    if not isinstance(address, str):
        return None
    text = address  # as the provider sent it: no trimming
    if text.count("@") != 1 or any(c.isspace() or ord(c) < 32 for c in text) or len(text) > 254:
        return None
    try:
        parsed = Address(addr_spec=text)
    except (HeaderParseError, ValueError, IndexError):
        return None
    local, domain = parsed.username, parsed.domain
    if not local or not domain or f"{local}@{domain}" != text:
        return None
    try:
        domain = domain.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return None
    labels = domain.split(".")
    if len(labels) < 2 or len(domain) > 253 or not all(_LABEL.match(x) for x in labels):
        return None
    return local.lower(), domain


def email_verified(claims: Mapping) -> bool:
    """Whether the provider vouches for the claims' address: only the JSON value ``true``."""
    return claims.get("email_verified") is True


def signin_key(claims: Mapping) -> str | None:
    """One sign-in, as a hash: the ID token's issuer, subject, issue time and nonce (a new
    sign-in of the same person is another key; a copied cookie is the same one). None when the
    claims lack the issuer, subject or issue time."""
    import hashlib

    subject, iat = subject_of(claims), claims.get("iat")
    if subject is None or not isinstance(iat, (int, float)) or isinstance(iat, bool):
        return None
    text = f"{subject}|{int(iat)}|{claims.get('nonce') or ''}"
    return hashlib.sha256(text.encode()).hexdigest()


def signin_expired(claims: Mapping, hours: float, now: float | None = None) -> bool:
    """Whether the sign-in is older than ``hours`` (from the ID token's issue time): the
    cookie lives 30 days, a sign-in here only as long as the settings say."""
    import time

    iat = claims.get("iat")
    if not isinstance(iat, (int, float)) or isinstance(iat, bool):
        return True
    age = (time.time() if now is None else now) - float(iat)
    return age > hours * 3600 or age < -300  # issued in the future: a clock or a forgery


def subject_of(claims: Mapping) -> str | None:
    """The account at the provider, ``"<issuer>#<sub>"`` (the pair OpenID Connect promises is
    unique and never reassigned), or None when the claims lack either."""
    iss, sub = claims.get("iss"), claims.get("sub")
    if not isinstance(iss, str) or not isinstance(sub, str) or not iss or not sub:
        return None
    return f"{iss.rstrip('/')}#{sub}"


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
        # e-mail keys lower case; subject keys ("<issuer>#<sub>") as written: sub is case-exact
        object.__setattr__(self, "roles", {(k.strip() if "#" in k else _norm(k)): v
                                           for k, v in self.roles.items()})

    def _allowed(self, local: str, domain: str) -> bool:
        """Whether ``allow`` names this address or its whole domain (an entry is compared as
        it parses: ``@hospital.example`` is the domain, never a suffix of another one)."""
        for entry in self.allow:
            if entry.startswith("@"):
                if (parse_address("x" + entry) or ("", ""))[1] == domain:
                    return True
            elif parse_address(entry) == (local, domain):
                return True
        return False

    def role_of(self, email: str | None, verified: bool = True) -> str | None:
        """The role of the owner of ``email``, or None when they may not use the app.

        ``verified`` must be True (the provider checked the address: anyone could claim an
        unverified one), and ``email`` one well-formed address (:func:`parse_address`)."""
        parsed = parse_address(email) if verified is True else None
        if parsed is None:
            return None
        email = "@".join(parsed)
        if email in self.roles:
            return self.roles[email]
        return self.default_role if self._allowed(*parsed) else None

    def user(self, claims: Mapping) -> User:
        """The :class:`User` for an OpenID Connect claim set; refused with
        :class:`AccessDeniedError` when neither its account (``roles`` keyed by
        :func:`subject_of`) nor its verified address is allowed."""
        subject = subject_of(claims)
        verified = email_verified(claims)
        parsed = parse_address(claims.get("email")) if verified else None
        if subject is not None and subject in self.roles:
            return User("@".join(parsed) if parsed else subject, self.roles[subject],
                        subject=subject)
        role = self.role_of(claims.get("email"), verified)
        if role is None:
            raise AccessDeniedError(
                "This account is not allowed to use MedCLS here"
                + ("" if verified else
                   " (its e-mail address is not verified by the sign-in provider)")
                + ". Ask the administrator to add it to the allow-list, or sign out and use "
                  "another account.")
        return User("@".join(parsed), role, subject=subject)


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
