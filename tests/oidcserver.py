"""A real OpenID Connect provider for the sign-in tests: ``tests/oidc/provider.mjs`` (the
certified npm package ``oidc-provider``) run by Node on a free loopback port, stopped after."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from appserver import OUTPUT, free_port

OIDC_DIR = Path(__file__).resolve().parent / "oidc"
CLIENT_ID, CLIENT_SECRET = "medcls", "medcls-test-secret"


@contextlib.contextmanager
def oidc_provider(redirect_uri: str):
    """Yields the provider's issuer URL; ``redirect_uri`` is the app's /oauth2callback."""
    node = shutil.which("node")
    if node is None or not (OIDC_DIR / "node_modules" / "oidc-provider").is_dir():
        pytest.fail("the test OIDC provider needs Node and `npm ci` in tests/oidc (.ci/run does both)")
    port = free_port()
    issuer = f"http://127.0.0.1:{port}"
    OUTPUT.mkdir(exist_ok=True)
    log = open(OUTPUT / f"oidc-{port}.log", "w")
    proc = subprocess.Popen([node, "provider.mjs", "--port", str(port), "--redirect", redirect_uri],
                            cwd=OIDC_DIR, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 30
        while True:
            try:
                with urllib.request.urlopen(issuer + "/.well-known/openid-configuration", timeout=2) as r:
                    assert json.load(r)["issuer"] == issuer
                    break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"the OIDC provider did not start; see {log.name}") from None
                time.sleep(0.2)
        yield issuer
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def secrets_toml(app_url: str, issuer: str, access: str) -> str:
    """A secrets.toml for the app: Streamlit's [auth] on the test provider, then ``access``
    (the allow-list and roles, which live in the same table)."""
    return f"""[auth]
redirect_uri = "{app_url}/oauth2callback"
cookie_secret = "medcls-browser-test-cookie-secret-not-for-production"
client_id = "{CLIENT_ID}"
client_secret = "{CLIENT_SECRET}"
server_metadata_url = "{issuer}/.well-known/openid-configuration"
client_kwargs = {{ prompt = "login" }}
{access}
"""


def browser_sign_in(page, app_url: str, issuer: str, login: str, timeout: int = 180_000) -> None:
    """Sign ``login`` in through the app's "Sign in" button and the provider's own form (any
    password), in a Playwright ``page``; returns once back on the app."""
    import re

    page.goto(app_url, timeout=timeout)
    page.get_by_text("Sign in to use MedCLS").wait_for(timeout=timeout)
    for attempt in range(3):  # under load a click during the page's first run can be lost
        if not page.url.startswith(issuer):
            page.get_by_role("button", name="Sign in").click()
        try:
            page.wait_for_url(re.compile(re.escape(issuer) + ".*"), timeout=40_000)
            break
        except Exception:  # noqa: BLE001
            if attempt == 2:
                raise
    page.locator('input[name="login"]').fill(login)
    page.locator('input[name="password"]').fill("any password")
    page.locator('button[type="submit"]').click()
    consent = page.get_by_role("button", name="Continue")
    try:  # the provider asks for consent the first time a user signs in to the client
        consent.wait_for(timeout=5_000)
        consent.click()
    except Exception:  # noqa: BLE001 - no consent page this time
        pass
    try:
        page.wait_for_url(re.compile(re.escape(app_url) + ".*"), timeout=60_000)
    except Exception:
        OUTPUT.mkdir(exist_ok=True)
        print("stuck at", page.url)
        page.screenshot(path=str(OUTPUT / f"signin-stuck-{login}.png"), timeout=5_000)
        raise
