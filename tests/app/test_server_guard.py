"""The server's doors under sign-in, with real HTTP against a real app server (``streamlit
run``), a real OpenID Connect provider and Chromium (ui.serverguard, ui.signin):

- an upload (``PUT /_stcore/upload_file/<session>/<file>``) from a visitor who has not signed in
  is refused before its body is kept (it was 204, and 3 sessions held 796 MB); a signed-in
  session's upload is taken, and freed once the session is gone;
- a report's ``/media/...`` URL is refused without the signed-in session's cookie (it was 200,
  the full PDF, with no cookie), and with a copy of that cookie once signed out;
- a copy of the sign-in cookie replayed after "Sign out" opens nothing (it worked for 30 days).
"""

from __future__ import annotations

import re
import time

import pytest
import requests
from appserver import OUTPUT, PROJECT_ROOT, free_port, wait_for
from conftest import require
from oidcserver import browser_sign_in, oidc_provider, secrets_toml

pytestmark = pytest.mark.browser
TIMEOUT = 180_000
ACCESS = 'allow = ["@hospital.test"]\n'
UPLOAD = 4 << 20  # bytes per refused upload: enough to see, small enough for socket buffers


@pytest.fixture(scope="module")
def guarded_app(tmp_path_factory, app_server):
    require(PROJECT_ROOT / "models" / "brain-mri-default")
    port = free_port()
    app_url = f"http://127.0.0.1:{port}"
    with oidc_provider(f"{app_url}/oauth2callback") as issuer:
        secrets = tmp_path_factory.mktemp("guard-secrets") / "secrets.toml"
        secrets.write_text(secrets_toml(app_url, issuer, ACCESS))
        srv = app_server(args=["--secrets.files", str(secrets),
                               "--server.disconnectedSessionTTL", "3"], port=port)
        yield srv, issuer


class Sessions:
    """The session ids the server gives a page (the websocket's ``new_session`` message)."""

    def __init__(self, page):
        self.ids: list[str] = []
        page.on("websocket", lambda ws: ws.on("framereceived", self._frame))

    def _frame(self, payload) -> None:
        from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

        if isinstance(payload, (bytes, bytearray)):
            msg = ForwardMsg()
            try:
                msg.ParseFromString(bytes(payload))
            except Exception:  # noqa: BLE001 - not a ForwardMsg
                return
            if msg.WhichOneof("type") == "new_session":
                sid = msg.new_session.initialize.session_id
                if sid and sid not in self.ids:
                    self.ids.append(sid)

    def latest(self, timeout: float = 60) -> str:
        deadline = time.time() + timeout
        while not self.ids and time.time() < deadline:
            time.sleep(0.2)
        assert self.ids, "no new_session message seen"
        return self.ids[-1]


def cookies_of(ctx) -> dict[str, str]:
    return {c["name"]: c["value"] for c in ctx.cookies()}


def put_upload(url: str, session_id: str, cookies: dict[str, str], size: int = UPLOAD):
    """An upload as the browser sends it (multipart, the XSRF cookie and header); its status,
    or "reset" when the server closed the connection before reading the body."""
    xsrf = cookies.get("_streamlit_xsrf", "")
    try:
        r = requests.put(f"{url}/_stcore/upload_file/{session_id}/medcls-test-file",
                         files={"file": ("scan.dcm", b"\0" * size, "application/octet-stream")},
                         headers={"X-Xsrftoken": xsrf}, cookies=cookies, timeout=60)
    except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError):
        return "reset"  # closed before the body was read, or mid-answer (status line only)
    return r.status_code


METRICS_TTL_S = 5.5  # Streamlit's metrics endpoint caches the memory figures for 5 s


def uploaded_bytes(url: str) -> int:
    """Bytes the server's upload manager holds (its own metrics endpoint, up to 5 s old)."""
    text = requests.get(f"{url}/_stcore/metrics", timeout=30).text
    total = 0
    for line in text.splitlines():
        if line.startswith("cache_memory_bytes") and "UploadedFileManager" in line:
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


def test_no_upload_before_sign_in_and_uploads_of_closed_sessions_freed(guarded_app, chromium):
    srv, issuer = guarded_app
    ctx = chromium.new_context()
    page = ctx.new_page()
    sessions = Sessions(page)
    page.goto(srv.url, timeout=TIMEOUT)
    page.get_by_text("Sign in to use MedCLS").wait_for(timeout=TIMEOUT)
    visitor = sessions.latest()
    cookies = cookies_of(ctx)
    assert "_streamlit_xsrf" in cookies and "_streamlit_user" not in cookies
    base = uploaded_bytes(srv.url)
    for _ in range(3):  # the report's three sessions, here three uploads into one
        assert put_upload(srv.url, visitor, cookies) in (403, "reset")
    time.sleep(METRICS_TTL_S)
    assert uploaded_bytes(srv.url) == base  # nothing kept
    r = requests.put(f"{srv.url}/_stcore/upload_file/{visitor}/x", data=b"--x--",
                     headers={"X-Xsrftoken": cookies["_streamlit_xsrf"]}, cookies=cookies,
                     timeout=30)
    assert r.status_code == 403 and "Sign in" in r.text

    # signed in, the session's own upload is taken; without the sign-in cookie it is not
    browser_sign_in(page, srv.url, issuer, "clinician")
    page.get_by_text("Signed in as clinician@hospital.test (clinician)").wait_for(timeout=TIMEOUT)
    signed = sessions.latest()
    assert signed != visitor
    cookies = cookies_of(ctx)
    assert "_streamlit_user" in cookies
    no_signin = {k: v for k, v in cookies.items() if not k.startswith("_streamlit_user")}
    assert put_upload(srv.url, signed, no_signin) in (403, "reset")
    assert put_upload(srv.url, visitor, cookies) in (403, "reset")  # not that session's sign-in
    assert put_upload(srv.url, signed, cookies, size=1 << 20) == 204
    wait_for(lambda: uploaded_bytes(srv.url) >= base + (1 << 20), 30, "the upload counted")

    # the browser goes away: its uploads are freed once the session is gone (TTL 3 s here)
    ctx.close()
    wait_for(lambda: uploaded_bytes(srv.url) <= base, 60, "the closed session's upload freed")


def test_media_need_the_session_and_sign_out_ends_the_sign_in(guarded_app, chromium, data_dir):
    srv, issuer = guarded_app
    jpeg = sorted(require(data_dir / "brain-mri" / "glioma").glob("*.jpg"))[0]
    ctx = chromium.new_context(viewport={"width": 1400, "height": 1800}, accept_downloads=True)
    # (no font route: the app ships its fonts)
    page = ctx.new_page()
    browser_sign_in(page, srv.url, issuer, "clinician")
    page.get_by_text("Signed in as clinician@hospital.test (clinician)").wait_for(timeout=TIMEOUT)
    page.locator('[data-testid="stFileUploader"] input[type="file"]').first.set_input_files(str(jpeg))
    button = page.get_by_role("button", name="Download report (PDF)")
    button.wait_for(timeout=TIMEOUT)
    with page.expect_request(re.compile(r".*/media/\w+\.pdf$"), timeout=TIMEOUT) as asked:
        button.click()  # the report is built on click, then the browser asks for its URL
    url = asked.value.url
    signed = cookies_of(ctx)

    # the report with the session's cookie; without it, or with another visitor's, refused
    r = requests.get(url, cookies=signed, timeout=60)
    assert r.status_code == 200 and r.content[:4] == b"%PDF"
    r = requests.get(url, timeout=60)
    assert r.status_code == 403 and b"%PDF" not in r.content
    stranger = chromium.new_context()
    stranger.new_page().goto(srv.url, timeout=TIMEOUT)
    assert requests.get(url, cookies=cookies_of(stranger), timeout=60).status_code == 403
    stranger.close()

    # "Sign out" ends the sign-in on the server: its cookie, replayed, opens nothing
    page.get_by_role("button", name="Sign out").click()
    page.get_by_text("Sign in to use MedCLS").wait_for(timeout=TIMEOUT)
    assert requests.get(url, cookies=signed, timeout=60).status_code == 403
    replay = chromium.new_context()
    replay.add_cookies([{"name": k, "value": v, "url": srv.url} for k, v in signed.items()])
    again = replay.new_page()
    sessions = Sessions(again)
    again.goto(srv.url, timeout=TIMEOUT)
    again.get_by_text("Your sign-in has ended").wait_for(timeout=TIMEOUT)
    assert again.locator('[data-testid="stFileUploader"]').count() == 0
    assert put_upload(srv.url, sessions.latest(), cookies_of(replay)) in (403, "reset")
    OUTPUT.mkdir(exist_ok=True)
    again.screenshot(path=str(OUTPUT / "signin-ended.png"))
    replay.close()
    ctx.close()
