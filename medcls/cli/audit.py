"""``medcls audit export``: the disagreements whose files are known, as a labelled data set for
retraining.
"""

from __future__ import annotations

from pathlib import Path

from medcls.integrations.audit.monitoring import export_corrections, parse_since
from medcls.integrations.audit.store import AuditStore


def add_audit_parser(sub) -> None:
    a = sub.add_parser("audit", help="the audit trail: export corrected cases for training")
    asub = a.add_subparsers(dest="audit_command", required=True)
    e = asub.add_parser("export", help="write the disagreements whose files are known as a "
                                       "labels.csv that `medcls train --data` reads")
    e.add_argument("--since", help="only answers from this date on (YYYY-MM-DD, UTC)")
    e.add_argument("--out", required=True, help="folder to write (labels.csv, files/, pacs.csv)")
    e.add_argument("--database-url", help="default: MEDCLS_DATABASE_URL, secrets.toml or var/audit.sqlite")
    e.add_argument("--scan-root", help="default: MEDCLS_SCAN_ROOT, secrets.toml or scans/")
    e.add_argument("--split", default="train", choices=["train", "val", "test"])
    e.set_defaults(func=_cmd_export)


def _cmd_export(args) -> int:
    from medcls.core.errors import MedclsError
    from medcls.core.settings import load_settings
    from medcls.integrations.audit.store import database_url

    settings = load_settings()
    try:
        since = parse_since(args.since)
    except ValueError:
        raise MedclsError(f"--since must be a date like 2026-01-31, not {args.since!r}.") from None
    store = AuditStore(args.database_url or database_url(settings))
    counts = export_corrections(store, args.out, args.scan_root or settings.scan_root, since,
                                args.split)
    print(f"{counts['written']} corrected server-folder cases -> {Path(args.out) / 'labels.csv'}"
          + (f"; {counts['pacs']} PACS instances -> pacs.csv" if counts["pacs"] else "")
          + f"; skipped: {counts['skipped_upload']} uploads (no file to find again), "
            f"{counts['skipped_missing']} missing, {counts['skipped_changed']} changed since")
    return 0
