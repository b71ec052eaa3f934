"""Running a page under Streamlit's AppTest, one way for every page test.

AppTest cannot drive ``st.file_uploader``; the pages read the open scan from
``st.session_state["scan_bytes"]`` (where an upload lands, see ``ui.scans.current_scan_bytes``), so
:func:`run_page` puts a file's bytes there. One timeout for every run: the first run of a
test process loads TensorFlow and a model on a shared CPU.
"""

from __future__ import annotations

from pathlib import Path

from conftest import PROJECT_ROOT

APP = PROJECT_ROOT / "app.py"
COMPARE_PAGE = PROJECT_ROOT / "pages" / "1_Compare_models.py"
BATCH_PAGE = PROJECT_ROOT / "pages" / "2_Batch_review.py"
TIMEOUT = 300  # seconds, any one run

TEXT_ELEMENTS = ("title", "subheader", "error", "warning", "info", "success", "markdown",
                 "caption")


def run_page(page: Path = APP, scan_bytes: bytes | None = None, at=None, **state):
    """Run ``page`` (a new AppTest, or ``at`` again) with ``scan_bytes`` as the open scan and
    ``state`` put into its session state first; returns the AppTest."""
    from streamlit.testing.v1 import AppTest

    if at is None:
        at = AppTest.from_file(str(page), default_timeout=TIMEOUT)
    if scan_bytes is not None:
        at.session_state["scan_bytes"] = scan_bytes
    for key, value in state.items():
        at.session_state[key] = value
    return at.run()


def page_text(at) -> str:
    """Every text the page shows (titles, messages, markdown, captions), one per line."""
    return "\n".join(str(e.value) for kind in TEXT_ELEMENTS for e in getattr(at, kind))


def assert_no_exception(at) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert "Traceback" not in page_text(at)


def verdicts(at) -> list[str]:
    """The one-line verdict under the uploader (class and calibrated probability, or
    "Answer withheld"), as shown (bold markdown)."""
    return [a.value for kind in (at.success, at.warning, at.error) for a in kind
            if a.value.startswith("**") and ("calibrated probability" in a.value
                                              or "Answer withheld" in a.value)]


def verdict(at) -> str:
    """The page's one verdict line."""
    found = verdicts(at)
    assert len(found) == 1, page_text(at)
    return found[0]


def chart_json(at, key: str) -> str:
    """A plotly chart's figure as JSON text (unescaped, so titles and labels read as shown)."""
    import json

    spec = next(c for c in at.get("plotly_chart") if c.key == key).proto.spec
    return json.dumps(json.loads(spec), ensure_ascii=False, separators=(",", ":"))


def assert_prediction(at) -> str:
    """No exception, no error but the withheld-answer ones, and one verdict line; returns it."""
    assert_no_exception(at)
    assert not at.error or all("Outside what this model was trained on" in e.value
                               or "withheld" in e.value for e in at.error), [e.value for e in at.error]
    return verdict(at)
