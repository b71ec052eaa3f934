"""What every page shares below the chrome: the app's settings, the one way a page shows an
error (``with user_errors(...)``: a typed error's message, never a trace), the one way text from
a file or the PACS is shown (:func:`plain`) and the audit-trail warning.
"""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import streamlit as st

from medcls import MedclsError
from medcls.core.settings import Settings, load_settings

log = logging.getLogger("medcls.app")


APP_DIR = Path(__file__).resolve().parents[1]  # the project folder: app.py and pages/
PAGES_DIR = APP_DIR / "pages"
MAIN_PAGE_TITLE = "Classify a scan"


NOT_A_DEVICE = "Research tool, not a diagnostic device."


def settings() -> Settings:
    """The app's settings: environment, then ``st.secrets``, then defaults (see
    :mod:`medcls.core.settings`). Read on every run: cheap, and a changed environment is seen."""
    with user_errors("The app's settings"):  # a bad value: its message, not a trace
        return load_settings(secrets=secrets_dict())


def secrets_dict() -> dict:
    try:  # no secrets.toml is normal: st.secrets raises then
        return st.secrets.to_dict()
    except Exception as exc:  # noqa: BLE001 - a missing or unreadable file means "no secrets"
        log.debug("no secrets.toml used (%s)", type(exc).__name__)
        return {}


#: Every character markdown, HTML or Streamlit's own directives (``:red[...]``,
#: ``:material/...:``, ``$math$``) could read as markup.
_AUTOLINK = re.compile(r":/|www\.|@.", re.IGNORECASE)
_MARKUP = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~$:&=^\"'])")


def plain(value) -> str:
    """Text from a file or the PACS (Modality, descriptions, patient fields, file names, finding
    text) made safe for any markdown-rendering call (``st.markdown``, ``caption``, ``info``,
    ``error``, ``subheader``, an expander's label...): shown exactly as written, never as
    markup. A DICOM description ``![x](http://...)`` must not make the browser fetch that URL
    (with the app's address as Referer), nor ``[result verified](http://...)`` or a bare URL
    become a link. Control characters become spaces."""
    text = "".join(c if c.isprintable() else " " for c in str(value))
    # Streamlit's markdown links bare URLs and addresses after escapes are read: a zero-width
    # space inside ":/", "www." and "@x" keeps them text
    text = _AUTOLINK.sub(lambda m: m.group(0)[:-1] + "\u200b" + m.group(0)[-1], text)
    return _MARKUP.sub(r"\\\1", text)


def models_root() -> Path:
    return settings().models_dir


def show_error(exc: BaseException, what: str = "This file") -> None:
    """A typed medcls error as its own message; anything else as a generic one (its type goes to
    the log; its text may quote file values, so it is not shown or logged)."""
    if isinstance(exc, MedclsError):
        st.error(f"{what} could not be used: {exc}")
    else:
        log.error("unexpected %s in the page", type(exc).__name__)
        st.error(f"{what} could not be processed because of an unexpected error "
                 f"({type(exc).__name__}). Please try another file; the app keeps working.")


class Outcome:
    """What :func:`user_errors` saw: ``failed`` after an error was shown."""

    failed = False


@contextmanager
def user_errors(what: str = "This file", stop: bool = True) -> Iterator[Outcome]:
    """Turn any failure in the block into a message (:func:`show_error`) and keep the session:
    never a traceback. ``stop``: end this run of the page after the message (else go on, and
    read ``outcome.failed``)::

        with user_errors("The model"):
            predictor = models.load_predictor(path)
    """
    outcome = Outcome()
    try:
        yield outcome
    except Exception as exc:  # noqa: BLE001 - st.stop/st.rerun are BaseExceptions: they pass
        outcome.failed = True
        show_error(exc, what)
        if stop:
            st.stop()


def audit_warning(exc: Exception) -> None:
    st.warning(f"Audit trail: {exc}", icon="⚠️")
