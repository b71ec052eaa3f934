"""``medcls pacs search`` and ``medcls pacs review [--send]``.
"""

from __future__ import annotations

import argparse
import sys

from medcls.core.errors import MedclsError, PacsError
from medcls.core.settings import load_settings
from medcls.integrations.pacs.client import PacsClient, pacs_settings
from medcls.integrations.pacs.records import StudyReview
from medcls.integrations.pacs.review import record_review, review_study, send_results
from medcls.integrations.pacs.workspace import series_rows, study_rows


def add_pacs_parser(sub) -> None:
    p = sub.add_parser("pacs", help="search a PACS (DICOMweb), review a study, send results back")
    ps = p.add_subparsers(dest="pacs_command", required=True)
    s = ps.add_parser("search", help="search studies (QIDO-RS)")
    s.add_argument("--patient-id")
    s.add_argument("--from", dest="date_from", help="first study date, YYYY-MM-DD or YYYYMMDD")
    s.add_argument("--to", dest="date_to", help="last study date")
    s.add_argument("--modality")
    s.add_argument("--description", help="part of the study description")
    s.add_argument("--limit", type=int, default=100)
    s.add_argument("--show-patient", action="store_true",
                   help="also print patient names and ids (on screen only)")
    s.set_defaults(func=_cmd_search)
    r = ps.add_parser("review", help="classify a study's series; --send stores SR + captures")
    r.add_argument("--study", required=True, help="Study Instance UID")
    r.add_argument("--model", help="model folder (default: brain-mri-default in the models "
                                    "folder, MEDCLS_MODELS)")
    r.add_argument("--send", action="store_true", help="store the results in the PACS")
    r.set_defaults(func=_cmd_review)


def _client() -> PacsClient:
    settings = pacs_settings()
    if settings is None:
        raise PacsError("No PACS is configured: set MEDCLS_PACS_URL (and MEDCLS_PACS_USER / "
                        "MEDCLS_PACS_PASSWORD or MEDCLS_PACS_TOKEN), or a [pacs] section in "
                        ".streamlit/secrets.toml.")
    return PacsClient(settings)


def _print_table(rows: list[dict]) -> None:
    if not rows:
        print("(none)")
        return
    keys = list(rows[0])
    width = {k: max(len(k), *(len(str(r[k] if r[k] is not None else "")) for r in rows)) for k in keys}
    print("  ".join(k.ljust(width[k]) for k in keys))
    for r in rows:
        print("  ".join(str(r[k] if r[k] is not None else "").ljust(width[k]) for k in keys))


def _cmd_search(args: argparse.Namespace) -> int:
    studies = _client().search_studies(args.patient_id, args.date_from, args.date_to,
                                       args.modality, args.description, args.limit)
    rows = study_rows(studies)
    if not args.show_patient:
        for r in rows:
            del r["patient id"], r["patient"]
    _print_table(rows)
    return 0


CLI_PAGE = "pacs-cli"


def _cli_audit(review: StudyReview, predictor):
    """Record the review's answers in the audit trail (the settings' database) as the user of
    this command line; a failure is reported and the command goes on. (store, user)."""
    import getpass

    from medcls.integrations.audit.store import open_store

    user = f"{getpass.getuser()} (command line)"
    try:
        store = open_store()
        record_review(store, review, predictor, user, CLI_PAGE)
        return store, user
    except MedclsError as exc:
        print(f"Audit trail: {exc}", file=sys.stderr)
        return None, user


def _cmd_review(args: argparse.Namespace) -> int:
    from medcls.engine.inference import Predictor

    client = _client()
    predictor = Predictor.from_path(args.model or load_settings().models_dir / "brain-mri-default")
    review = review_study(client, predictor, args.study)
    _print_table(series_rows(review))
    for k in review.skipped:
        print(f"skipped (series {k.series_number}, {k.sop_class}): {k.reason}")
    store, user = _cli_audit(review, predictor)
    if args.send:
        outcome = send_results(client, review)
        print(outcome.message)
        if outcome.sent and store is not None:
            try:
                store.record_export(user, CLI_PAGE, "pacs-send", n_answers=len(review.answer_ids),
                                    target=" ".join(outcome.sop_instance_uids)[:1024])
            except MedclsError as exc:
                print(f"Audit trail: {exc}", file=sys.stderr)
        for uid in outcome.sop_instance_uids:
            print(f"stored {uid}")
        for uid in outcome.series_uids:
            print(f"series {uid}")
    elif review.already_sent:
        print("Results of this model version are already in the PACS for this study.")
    return 0
