"""The settings of the app and the command line: one frozen :class:`Settings`.

Each value comes from, in order: its environment variable, then ``.streamlit/secrets.toml``
(the pages pass ``st.secrets``; elsewhere the file next to ``app.py`` is read), then its
default. Secrets keep sections as TOML tables::

    scan_root = "/data/scans"          # MEDCLS_SCAN_ROOT
    [pacs]
    url = "http://localhost:8042/dicom-web"   # MEDCLS_PACS_URL

**Adding a setting is one line**: a field declared with :func:`setting` (environment
variable, secrets key, default, parser) in :class:`Settings` or in a section class. A new
section is a frozen dataclass of such fields, added to :class:`Settings` with
:func:`section`. Nothing else changes: :func:`load_settings` walks the fields.

Relative paths are taken from the project folder (where ``app.py`` lives). An empty
environment variable counts as unset. A value that cannot be parsed raises
:class:`~medcls.core.errors.SettingsError` naming where it came from (never the value itself:
it may be a password).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

from medcls.core.errors import SettingsError

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # medcls/
PROJECT_DIR = PACKAGE_DIR.parent
SECRETS_FILE = PROJECT_DIR / ".streamlit" / "secrets.toml"


def setting(env: str, key: str, default: Any = None, parse: Callable[[Any], Any] = str,
            factory: Callable[[], Any] | None = None, secret: bool = False):
    """A field read from environment variable ``env``, else secrets ``key``, else ``default``
    (or ``factory()``); ``parse`` turns the text/TOML value into the field's type. A
    ``secret`` is left out of ``repr`` (logs, error pages)."""
    meta = {"env": env, "key": key, "parse": parse}
    if factory is not None:
        return field(default_factory=factory, metadata=meta, repr=not secret)
    return field(default=default, metadata=meta, repr=not secret)


def section(key: str, cls: type):
    """A group of settings under the secrets table ``[key]``."""
    return field(default_factory=cls, metadata={"section": key})


# ----------------------------------------------------------------------------- parsers

def project_path(value: Any) -> Path:
    """a folder path"""
    path = Path(str(value)).expanduser()
    return path if path.is_absolute() else PROJECT_DIR / path


def names(value: Any) -> tuple[str, ...]:
    """a list of names (a TOML array, or text separated by commas)"""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return tuple(str(v).strip() for v in items if str(v).strip())


def name_map(value: Any) -> dict[str, str]:
    """name=value pairs (a TOML table, or text like a=x,b=y)"""
    if isinstance(value, Mapping):
        return {str(k): str(v) for k, v in value.items()}
    pairs = [p.split("=", 1) for p in names(value)]
    if any(len(p) != 2 for p in pairs):
        raise ValueError("expected name=value pairs separated by commas")
    return {k.strip(): v.strip() for k, v in pairs}


def positive(value: Any) -> float:
    """a positive number"""
    number = float(value)
    if not number > 0:
        raise ValueError("must be positive")
    return number


# ----------------------------------------------------------------------------- the settings

@dataclass(frozen=True)
class PacsSettings:
    url: str | None = setting("MEDCLS_PACS_URL", "url")  # DICOMweb root
    user: str | None = setting("MEDCLS_PACS_USER", "user")
    password: str | None = setting("MEDCLS_PACS_PASSWORD", "password", secret=True)
    token: str | None = setting("MEDCLS_PACS_TOKEN", "token", secret=True)
    timeout: float = setting("MEDCLS_PACS_TIMEOUT", "timeout", 30.0, positive)  # seconds
    retries: int = setting("MEDCLS_PACS_RETRIES", "retries", 2, int)  # on transient failures


@dataclass(frozen=True)
class AuthSettings:
    """Who may use the app once signed in (medcls.core.access). They sit in secrets' ``[auth]``
    beside Streamlit's own sign-in keys (client_id, ...), which Streamlit reads itself."""

    allow: tuple[str, ...] = setting("MEDCLS_AUTH_ALLOW", "allow", (), names)  # addresses, @domains
    roles: dict[str, str] = setting("MEDCLS_AUTH_ROLES", "roles", parse=name_map, factory=dict)
    default_role: str = setting("MEDCLS_AUTH_DEFAULT_ROLE", "default_role", "clinician")
    session_hours: float = setting("MEDCLS_AUTH_SESSION_HOURS", "session_hours", 12.0, positive)


def at_least_one(value: Any) -> int:
    """a whole number of at least 1"""
    number = int(value)
    if number < 1:
        raise ValueError("must be at least 1")
    return number


@dataclass(frozen=True)
class DecodeSettings:  # memory and time limits of decoding one image (medcls.io.load)
    budget_mb: float = setting("MEDCLS_DECODE_BUDGET_MB", "budget_mb", 1024.0, positive)
    max_concurrent: int = setting("MEDCLS_MAX_DECODES", "max_concurrent", 2, at_least_one)
    timeout_s: float = setting("MEDCLS_DECODE_TIMEOUT_S", "timeout_s", 30.0, positive)


def port_number(value: Any) -> int:
    """a port number from 1 to 65535"""
    number = int(value)
    if not 1 <= number <= 65535:
        raise ValueError("out of range")
    return number


def ae_title(value: Any) -> str:
    """an AE title of 1 to 16 characters (letters, digits, space, _ - .), not all spaces"""
    text = str(value).strip()
    if not 1 <= len(text) <= 16 or not all(c.isalnum() or c in " _-." for c in text) \
            or not text.isascii():
        raise ValueError("not an AE title")
    return text


def ae_titles(value: Any) -> tuple[str, ...]:
    """a list of AE titles (a TOML array, or text separated by commas)"""
    return tuple(ae_title(v) for v in names(value))


@dataclass(frozen=True)
class ListenerSettings:  # the DICOM node the PACS routes series to (medcls.integrations.dicomnode)
    ae_title: str = setting("MEDCLS_LISTENER_AE_TITLE", "ae_title", "MEDCLS", ae_title)
    port: int = setting("MEDCLS_LISTENER_PORT", "port", 11112, port_number)
    bind: str = setting("MEDCLS_LISTENER_BIND", "bind", "127.0.0.1")  # address to listen on
    accept_from: tuple[str, ...] = setting("MEDCLS_LISTENER_ACCEPT_FROM", "accept_from", (), ae_titles)
    # calling AE titles whose association release ends the series it carried (whole series per association)
    whole_series_from: tuple[str, ...] = setting("MEDCLS_LISTENER_WHOLE_SERIES_FROM",
                                                 "whole_series_from", (), ae_titles)
    quiet_s: float = setting("MEDCLS_LISTENER_QUIET_S", "quiet_s", 5.0, positive)  # series complete after
    spool_dir: Path = setting("MEDCLS_LISTENER_SPOOL", "spool_dir", PROJECT_DIR / "var" / "listener-spool",
                              project_path)
    spool_budget_mb: float = setting("MEDCLS_LISTENER_SPOOL_MB", "spool_budget_mb", 2048.0, positive)
    models: tuple[str, ...] = setting("MEDCLS_LISTENER_MODELS", "models", (), names)  # () : the site's choice per task
    send_retries: int = setting("MEDCLS_LISTENER_SEND_RETRIES", "send_retries", 5, int)
    backoff_s: float = setting("MEDCLS_LISTENER_BACKOFF_S", "backoff_s", 2.0, positive)  # doubles per retry
    store_ae: str | None = setting("MEDCLS_LISTENER_STORE_AE", "store_ae")  # AET@host:port: C-STORE, not STOW-RS


@dataclass(frozen=True)
class Settings:
    models_dir: Path = setting("MEDCLS_MODELS", "models_dir", PROJECT_DIR / "models", project_path)
    scan_root: Path = setting("MEDCLS_SCAN_ROOT", "scan_root", PROJECT_DIR / "scans", project_path)
    database_url: str | None = setting("MEDCLS_DATABASE_URL", "database_url")  # None: var/audit.sqlite
    ray_address: str | None = setting("MEDCLS_RAY_ADDRESS", "ray_address")  # None: local engine
    pacs: PacsSettings = section("pacs", PacsSettings)
    auth: AuthSettings = section("auth", AuthSettings)
    decode: DecodeSettings = section("decode", DecodeSettings)
    listener: ListenerSettings = section("listener", ListenerSettings)


def read_secrets_file(path: str | Path = SECRETS_FILE) -> dict[str, Any]:
    """The TOML secrets file as a dict ({} when there is none)."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError(f"{path.name} could not be read ({type(exc).__name__}).") from None


def load_settings(env: Mapping[str, str] | None = None,
                  secrets: Mapping[str, Any] | None = None) -> Settings:
    """The settings from ``env`` (default ``os.environ``), then ``secrets`` (default: the
    project's ``.streamlit/secrets.toml``), then the defaults. Cheap: call it where needed
    rather than keeping a copy, so a changed environment is seen."""
    env = os.environ if env is None else env
    secrets = read_secrets_file() if secrets is None else secrets
    return _build(Settings, env, secrets, "")


def _build(cls: type, env: Mapping[str, str], secrets: Mapping[str, Any], prefix: str):
    values = {}
    for f in fields(cls):
        if "section" in f.metadata:
            table = secrets.get(f.metadata["section"]) if isinstance(secrets, Mapping) else None
            values[f.name] = _build(f.default_factory, env, table if isinstance(table, Mapping)
                                    else {}, f"{prefix}{f.metadata['section']}.")
            continue
        name, key = f.metadata["env"], f.metadata["key"]
        if env.get(name):
            raw, where = env[name], f"environment variable {name}"
        elif key in secrets and secrets[key] not in (None, ""):
            raw, where = secrets[key], f"'{prefix}{key}' in secrets.toml"
        else:
            continue  # the default
        try:
            values[f.name] = f.metadata["parse"](raw)
        except (TypeError, ValueError):  # the message never quotes the value: it may be a secret
            raise SettingsError(f"The setting {where} must be {_expects(f.metadata['parse'])}.") from None
    return cls(**values)


def _expects(parse: Callable) -> str:
    """What a parser accepts, for messages: its docstring, or its type's name."""
    return {str: "text", int: "a whole number", float: "a number"}.get(
        parse, (parse.__doc__ or getattr(parse, "__name__", "valid")).strip())
