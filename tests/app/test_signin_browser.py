"""Sign-in in a real browser: the app (``streamlit run``) with Streamlit's OpenID Connect
sign-in against a real provider (``oidc-provider`` on Node, tests/oidc), in headless
Chromium. The app reads a temporary secrets.toml (``--secrets.files``), never the repo's."""

from __future__ import annotations

import csv
import datetime as dt
import re

import pytest
from appserver import OUTPUT, PROJECT_ROOT, free_port
from conftest import require
from oidcserver import browser_sign_in, oidc_provider, secrets_toml

pytestmark = pytest.mark.browser
TIMEOUT = 180_000
ACCESS = """allow = ["@hospital.test"]
[auth.roles]
"reviewer@hospital.test" = "reviewer"
"""  # goes on in the [auth] table


@pytest.fixture(scope="module")
def monitoring_trail(tmp_path_factory, data_dir, brain_model_dir):
    """A trail with a few weeks of real answers for the Monitoring page: the default model on
    brain test images, the clinicians' verdicts taken from the images' true labels."""
    from medcls import load_scan
    from medcls.engine.inference import Predictor
    from medcls.integrations.audit.store import Answer, AuditStore

    url = f"sqlite:///{tmp_path_factory.mktemp('signin') / 'audit.sqlite'}"
    store = AuditStore(url)
    predictor = Predictor.from_path(brain_model_dir)
    with open(data_dir / "brain-mri" / "labels.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "test"][::8][:72]
    today = dt.datetime.now(dt.timezone.utc)
    for i, r in enumerate(rows):
        path = data_dir / "brain-mri" / r["file"]
        pred = predictor.predict_file(path)
        a = Answer.of(pred, predictor.card, "clinician@hospital.test", "main",
                      input_sha256=load_scan(path).sha256, heatmap_method="gradcam")
        a = Answer(**{**a.__dict__, "at": today - dt.timedelta(days=11 - i // 6, hours=i % 6)})
        aid = store.record_answer(a)
        if i % 5 == 4:
            continue  # no verdict given
        if pred.label == r["label"]:
            store.record_verdict(aid, "reviewer@hospital.test", "agree")
        else:
            store.record_verdict(aid, "reviewer@hospital.test", "disagree", r["label"])
    store.dispose()
    return url


@pytest.fixture(scope="module")
def signed_app(tmp_path_factory, monitoring_trail, app_server):
    require(PROJECT_ROOT / "models" / "brain-mri-default")
    port = free_port()
    app_url = f"http://127.0.0.1:{port}"
    with oidc_provider(f"{app_url}/oauth2callback") as issuer:
        secrets = tmp_path_factory.mktemp("secrets") / "secrets.toml"
        secrets.write_text(secrets_toml(app_url, issuer, ACCESS))
        srv = app_server(args=["--secrets.files", str(secrets)], port=port,
                         MEDCLS_DATABASE_URL=monitoring_trail)
        yield srv, issuer


def test_sign_in_roles_refusal_and_sign_out(signed_app, chromium):
    srv, issuer = signed_app
    ctx = chromium.new_context(viewport={"width": 1400, "height": 2000})
    ctx.route(re.compile(r"https?://fonts\.googleapis\.com/.*"), lambda route: route.abort())
    page = ctx.new_page()

    # an unauthenticated visit sees the sign-in prompt, not the app; a page's own URL too
    page.goto(srv.url + "/Batch_review", timeout=TIMEOUT)
    page.get_by_text("Sign in to use MedCLS").wait_for(timeout=TIMEOUT)
    assert page.locator('[data-testid="stFileUploader"]').count() == 0

    # a test clinician signs in and can use the main page
    browser_sign_in(page, srv.url, issuer, "clinician")
    page.get_by_text("Signed in as clinician@hospital.test (clinician)").wait_for(timeout=TIMEOUT)
    page.locator('[data-testid="stFileUploader"]').first.wait_for(timeout=TIMEOUT)

    # ... but not review folders on the server, nor open the monitoring page
    page.goto(srv.url + "/Batch_review", timeout=TIMEOUT)
    page.get_by_text("may not review folders on the server").wait_for(timeout=TIMEOUT)
    assert page.get_by_role("button", name="Review this folder").is_disabled()
    page.goto(srv.url + "/Monitoring", timeout=TIMEOUT)
    page.get_by_text("may not open the monitoring page").wait_for(timeout=TIMEOUT)
    assert page.get_by_role("heading", name="Agreement with the clinicians").count() == 0

    # sign-out ends the session at the provider too: the app asks for sign-in again
    page.get_by_role("button", name="Sign out").click()
    page.get_by_text("Sign in to use MedCLS").wait_for(timeout=TIMEOUT)

    # a user off the allow-list is refused with a clear page
    browser_sign_in(page, srv.url, issuer, "stranger")
    page.get_by_text("Access refused").wait_for(timeout=TIMEOUT)
    page.get_by_text("not allowed to use MedCLS").wait_for(timeout=TIMEOUT)
    assert page.locator('[data-testid="stFileUploader"]').count() == 0
    OUTPUT.mkdir(exist_ok=True)
    page.screenshot(path=str(OUTPUT / "signin-refused.png"))
    page.get_by_role("button", name="Sign out").click()
    page.get_by_text("Sign in to use MedCLS").wait_for(timeout=TIMEOUT)

    # a reviewer opens the monitoring page: the screenshot in the README
    browser_sign_in(page, srv.url, issuer, "reviewer")
    page.goto(srv.url + "/Monitoring", timeout=TIMEOUT)
    page.get_by_role("heading", name="Agreement with the clinicians").wait_for(timeout=TIMEOUT)
    page.get_by_text("Disagreements").first.wait_for(timeout=TIMEOUT)
    page.locator(".js-plotly-plot").nth(2).wait_for(timeout=TIMEOUT)  # confusion matrix drawn
    page.wait_for_timeout(1500)
    page.screenshot(path=str(OUTPUT / "monitoring.png"), full_page=True)
    ctx.close()
