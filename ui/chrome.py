"""The frame of every page: the navigation (app.py first, then ``pages/`` by number), the header
with the sign-in guard, the laptop layout and keyboard steps.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

import streamlit as st

from medcls.core.access import User
from ui.common import APP_DIR, MAIN_PAGE_TITLE, NOT_A_DEVICE, PAGES_DIR
from ui.signin import guard

_navigating = threading.local()  # per session thread: inside the chosen page's run


def navigation() -> None:
    """The app's navigation: app.py first, titled :data:`MAIN_PAGE_TITLE` (not the file name),
    then every page of ``pages/`` in the order of its number prefix, titled from its file name
    as Streamlit does (``2_Batch_review.py`` -> "Batch review", URL ``/Batch_review``).

    Call it first thing in app.py: it runs the chosen page and ends the script run. When the
    chosen page is app.py itself, its nested run calls this again, which returns at once so
    the rest of app.py lays out the main page. Page files still run on their own (AppTest)."""
    if getattr(_navigating, "inside", False):
        return
    pages = [st.Page(APP_DIR / "app.py", title=MAIN_PAGE_TITLE, default=True)]
    pages += [st.Page(path) for path in sorted(PAGES_DIR.glob("*.py"), key=_page_order)]
    page = st.navigation(pages)
    _navigating.inside = True
    try:
        page.run()
    finally:
        _navigating.inside = False
    st.stop()


def _page_order(path: Path) -> tuple[float, str]:
    number = re.match(r"\d+", path.name)
    return (int(number.group()) if number else float("inf"), path.name)


def page_header(title: str, caption: str, icon: str = "🧠", tab_title: str | None = None,
                permission: str = "classify") -> User:
    """The page configuration, title and caption every page opens with, then the sign-in
    guard: the page goes on only for a user who holds ``permission``."""
    st.set_page_config(page_title=tab_title or f"{title} · MedCLS", page_icon=icon, layout="wide")

    laptop_layout()
    st.title(title)
    st.caption(f"{caption} {NOT_A_DEVICE}")
    return guard(permission)

LAPTOP_CSS = """
<style>
/* Laptop screens: the sidebar gives way to the scan (Streamlit's default is ~21rem). */
@media (max-width: 1200px) {
  section[data-testid="stSidebar"] { width: 15rem !important; min-width: 15rem !important; }
  section[data-testid="stSidebar"] > div { width: 15rem !important; }
  .block-container, [data-testid="stMainBlockContainer"] { padding-left: 1.5rem; padding-right: 1.5rem; padding-top: 2.5rem; }
  h1 { font-size: 1.8rem !important; padding-top: 0 !important; }
  h3 { font-size: 1.2rem !important; }
}
/* The verdict reads first and large. */
div[data-testid="stAlert"]:has(p strong.medcls-verdict) p { font-size: 1.1rem; }
</style>
"""


def laptop_layout() -> None:
    """Narrow-screen CSS (call once per page, after ``st.set_page_config``)."""
    st.markdown(LAPTOP_CSS, unsafe_allow_html=True)


def keyboard_steps(bindings: dict[str, str]) -> None:
    """Keys that click buttons: ``{"j": "Next ▶", "k": "◀ Previous"}`` (button labels). A tiny
    listener on the page (Streamlit has no key events); ignored while typing in a field."""
    import json

    # The listener is installed as a <script> of the page itself, so it outlives this iframe
    # (re-created on every rerun); the bindings are refreshed each time.
    listener = """
document.addEventListener("keydown", (e) => {
  const t = e.target;
  if (t && (t.tagName === "INPUT" || t.tagName === "TEXTAREA" || t.isContentEditable)) return;
  const label = (document.medclsKeys || {})[e.key];
  if (!label || e.ctrlKey || e.metaKey || e.altKey) return;
  const b = [...document.querySelectorAll("button")].find(x => x.innerText.trim() === label);
  if (b && !b.disabled) { e.preventDefault(); b.click(); }
});"""
    st.iframe(f"""<script>
const doc = window.parent.document;
doc.medclsKeys = {json.dumps(bindings)};
if (!doc.getElementById("medcls-keys")) {{
  const s = doc.createElement("script");
  s.id = "medcls-keys";
  s.textContent = {json.dumps(listener)};
  doc.head.appendChild(s);
}}
</script>""", height=1)
