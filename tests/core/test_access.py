"""Who may use what (medcls.core.access): the allow-list, roles and permissions, and the settings
they are read from, without Streamlit."""

from __future__ import annotations

import pytest

from medcls.core.access import (
    LOCAL_USER,
    PERMISSIONS,
    AccessPolicy,
    User,
    login_provider,
    may,
    policy_from,
    require,
    sign_in_configured,
)
from medcls.core.errors import AccessDeniedError, MedclsError
from medcls.core.settings import load_settings
from medcls.integrations.audit.store import database_url

POLICY = AccessPolicy(allow=("@Hospital.test", "guest@partner.test"),
                      roles={"Head@hospital.test": "reviewer", "it@elsewhere.test": "admin"})


@pytest.mark.parametrize("email, role", [
    ("anna@hospital.test", "clinician"),         # domain on the allow-list
    ("ANNA@Hospital.Test", "clinician"),         # addresses are case-insensitive
    ("guest@partner.test", "clinician"),         # one address on the allow-list
    ("other@partner.test", None),                # ... not its whole domain
    ("head@hospital.test", "reviewer"),          # an explicit role
    ("it@elsewhere.test", "admin"),              # a role entry allows the user by itself
    ("anna@evilhospital.test", None),            # suffix of the domain is not the domain
    ("anna@hospital.test.evil.example", None),
    ("", None), (None, None), ("no-at-sign", None),
])
def test_role_of(email, role):
    assert POLICY.role_of(email) == role


def test_an_unverified_address_is_refused():
    assert POLICY.role_of("anna@hospital.test", verified=False) is None
    with pytest.raises(AccessDeniedError, match="not verified"):
        POLICY.user({"email": "anna@hospital.test", "email_verified": False})


def test_user_from_claims_and_refusal():
    assert POLICY.user({"email": "Head@Hospital.test", "email_verified": True}) == \
        User("head@hospital.test", "reviewer")
    with pytest.raises(AccessDeniedError, match="not allowed to use MedCLS"):
        POLICY.user({"email": "stranger@elsewhere.test"})


def test_permissions_follow_the_role_order():
    clinician, reviewer, admin = (User("x@h.test", r) for r in ("clinician", "reviewer", "admin"))
    for perm in ("classify", "batch", "verdict"):
        assert may(clinician, perm) and may(reviewer, perm) and may(admin, perm)
    for perm in ("server-folder", "pacs-send", "monitoring"):
        assert not may(clinician, perm) and may(reviewer, perm) and may(admin, perm)
    assert all(may(LOCAL_USER, p) for p in PERMISSIONS)  # no sign-in: one user, every page
    with pytest.raises(AccessDeniedError, match="needs the reviewer or admin role"):
        require(clinician, "server-folder")
    with pytest.raises(KeyError):
        may(admin, "no-such-permission")


def test_unknown_roles_are_refused_when_read():
    with pytest.raises(MedclsError, match="Unknown role"):
        AccessPolicy(roles={"a@h.test": "superuser"})


def test_access_and_database_from_the_settings():
    """The fields in medcls.core.settings: [auth] holds Streamlit's sign-in keys and ours."""
    secrets = {"database_url": "postgresql://db/audit",
               "auth": {"client_id": "medcls", "client_secret": "s", "redirect_uri": "x",
                        "cookie_secret": "c", "server_metadata_url": "y",
                        "allow": ["@hospital.test"], "roles": {"r@hospital.test": "reviewer"}}}
    s = load_settings({}, secrets)
    assert database_url(s) == "postgresql://db/audit" and sign_in_configured(secrets)
    policy = policy_from(s.auth)
    assert policy.role_of("r@hospital.test") == "reviewer"
    assert policy.role_of("a@hospital.test") == "clinician"
    env = {"MEDCLS_DATABASE_URL": "sqlite:////tmp/x.sqlite", "MEDCLS_AUTH_ALLOW": "@clinic.test",
           "MEDCLS_AUTH_ROLES": "boss@clinic.test=admin", "MEDCLS_AUTH_DEFAULT_ROLE": "reviewer"}
    s = load_settings(env, secrets)
    policy = policy_from(s.auth)
    assert database_url(s) == "sqlite:////tmp/x.sqlite"
    assert policy.role_of("r@hospital.test") is None  # the environment's lists replace them
    assert policy.role_of("boss@clinic.test") == "admin"
    assert policy.role_of("x@clinic.test") == "reviewer"
    d = load_settings({}, {})
    assert database_url(d).endswith("var/audit.sqlite") and not sign_in_configured({})
    assert policy_from(d.auth).role_of("anyone@anywhere.test") is None  # nobody by default
    # named providers ([auth.hospital]) count as configured too; a roles table is no provider
    named = {"auth": {"redirect_uri": "x", "roles": {"a@h.test": "admin"},
                      "hospital": {"client_id": "a"}}}
    assert sign_in_configured(named) and login_provider(named) == "hospital"
    assert login_provider(secrets) is None
    assert not sign_in_configured({"auth": {"redirect_uri": "x", "roles": {"a@h.test": "admin"}}})
