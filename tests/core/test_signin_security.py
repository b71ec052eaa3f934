"""Sign-in trusts only what it should (medcls.core.access): one parsed address with a real host
name, a provider-verified address (``email_verified`` exactly true), roles keyed on the
provider's account (issuer and subject) as well as on the address."""

from __future__ import annotations

import pytest

from medcls.core.access import AccessPolicy, parse_address, subject_of
from medcls.core.errors import AccessDeniedError

POLICY = AccessPolicy(allow=("@hospital.test",),
                      roles={"head@hospital.test": "reviewer",
                             "https://login.hospital.test#U-42": "admin"})
ISS = "https://login.hospital.test"


def claims(email, verified=True, sub="u-1", iss=ISS, **more):
    out = {"iss": iss, "sub": sub, "email": email, **more}
    if verified is not ...:
        out["email_verified"] = verified
    return out


@pytest.mark.parametrize("email", [
    "evil@elsewhere.test@hospital.test",      # the domain was read after the last @
    '"evil@elsewhere.test"@hospital.test',    # a quoted local part hiding a second @
    "anna@hospital.test ", " anna @hospital.test", "anna@hospital.test\n",
    "anna@hospital..test", "anna@-hospital.test", "anna@hospital.test-", "anna@hospital",
    "anna@[10.0.0.1]", "anna@hospital.test,b@hospital.test", "@hospital.test", "anna@",
    "anna@hospital.test>", "<anna@hospital.test>", 42, None,
])
def test_only_one_wellformed_address_counts(email):
    assert parse_address(email) is None
    assert POLICY.role_of(email) is None
    with pytest.raises(AccessDeniedError):
        POLICY.user(claims(email))


def test_the_three_sign_in_cases_of_the_report_are_refused():
    with pytest.raises(AccessDeniedError, match="not verified"):
        POLICY.user(claims("anna@hospital.test", verified=...))      # no email_verified claim
    with pytest.raises(AccessDeniedError, match="not verified"):
        POLICY.user(claims("anna@hospital.test", verified="false"))  # a string, not false
    for odd in ("true", 1, "yes", None):                              # only the JSON true
        with pytest.raises(AccessDeniedError):
            POLICY.user(claims("anna@hospital.test", verified=odd))
    with pytest.raises(AccessDeniedError, match="not allowed"):
        POLICY.user(claims("evil@elsewhere.test@hospital.test"))
    assert POLICY.user(claims("Anna@Hospital.TEST")).email == "anna@hospital.test"


def test_roles_may_be_keyed_on_the_providers_account():
    # the account U-42 at this issuer is an admin whatever address it shows, verified or not
    u = POLICY.user(claims("someone@elsewhere.test", verified=False, sub="U-42"))
    assert (u.role, u.email, u.subject) == ("admin", "https://login.hospital.test#U-42", u.subject)
    assert POLICY.user(claims("boss@hospital.test", sub="U-42")).email == "boss@hospital.test"
    # the same subject at another issuer, or another case of it, is another account
    with pytest.raises(AccessDeniedError):
        POLICY.user(claims("x@elsewhere.test", sub="U-42", iss="https://evil.test"))
    with pytest.raises(AccessDeniedError):
        POLICY.user(claims("x@elsewhere.test", sub="u-42"))
    assert subject_of({"iss": ISS + "/", "sub": "a"}) == ISS + "#a"
    assert subject_of({"sub": "a"}) is None and subject_of({"iss": ISS, "sub": 3}) is None
    # an address-keyed role still needs the verified address
    assert POLICY.user(claims("head@hospital.test")).role == "reviewer"
    with pytest.raises(AccessDeniedError):
        POLICY.user(claims("head@hospital.test", verified="true"))


def test_allow_entries_are_parsed_too():
    p = AccessPolicy(allow=("@hospital.test", "guest@partner.test", "@bücher.test"))
    assert p.role_of("guest@partner.test") == "clinician"
    assert p.role_of("guest@partner.test@hospital.test") is None
    assert p.role_of("x@xn--bcher-kva.test") == "clinician"  # IDN compared in ASCII form
    assert p.role_of("x@sub.hospital.test") is None
