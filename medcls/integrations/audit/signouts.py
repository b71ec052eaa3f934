"""Sign-outs every app server sharing the audit database knows of: a sign-in ended with "Sign
out" is recorded by a hash of the sign-in itself (:func:`medcls.core.access.signin_key`: the
ID token's issuer, subject, issue time and nonce), so a copy of its cookie replayed later, on
this server or another, is refused.

Its own table (``signouts``) beside the audit tables, created on first use; it holds the
hash, the time and the user's name, never the cookie or a token.
"""

from __future__ import annotations

import threading

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from medcls.core.errors import AuditError
from medcls.integrations.audit.store import AuditStore, now

metadata = sa.MetaData()

signouts = sa.Table(
    "signouts", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("signin_sha256", sa.String(64), nullable=False, unique=True),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("user", sa.String(254), nullable=False),
)

_ready: set[str] = set()
_lock = threading.Lock()


def _failure(store: AuditStore, exc: Exception) -> AuditError:
    return AuditError(f"The audit database ({store.where}) could not record or check sign-outs "
                      f"({type(getattr(exc, 'orig', exc)).__name__}).")


def _table(store: AuditStore) -> None:
    with _lock:
        if store.url in _ready:
            return
        try:
            metadata.create_all(store.engine, checkfirst=True)
        except sa_exc.IntegrityError:
            pass  # another server created it a moment ago
        except (sa_exc.SQLAlchemyError, OSError) as exc:
            raise _failure(store, exc) from None
        _ready.add(store.url)


def record_signout(store: AuditStore, key: str, user: str) -> None:
    """Remember that the sign-in ``key`` ended (idempotent)."""
    _table(store)
    try:
        with store.engine.begin() as conn:
            if conn.execute(sa.select(signouts.c.id).where(
                    signouts.c.signin_sha256 == key)).first() is None:
                conn.execute(sa.insert(signouts).values(signin_sha256=key, at=now(),
                                                        user=user[:254]))
    except sa_exc.IntegrityError:
        pass  # recorded by another request at the same moment
    except (sa_exc.SQLAlchemyError, OSError) as exc:
        raise _failure(store, exc) from None


def signed_out(store: AuditStore, key: str) -> bool:
    """Whether the sign-in ``key`` was ended with "Sign out"."""
    _table(store)
    try:
        with store.engine.connect() as conn:
            return conn.execute(sa.select(signouts.c.id).where(
                signouts.c.signin_sha256 == key)).first() is not None
    except (sa_exc.SQLAlchemyError, OSError) as exc:
        raise _failure(store, exc) from None
