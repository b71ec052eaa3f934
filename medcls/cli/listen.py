"""`medcls listen`: run the DICOM node the PACS routes series to (C-STORE SCP), answering each
complete series and sending the SR and Secondary Capture back into the PACS."""

from __future__ import annotations

import argparse
import dataclasses
import signal

from medcls.core.settings import ae_title, ae_titles, load_settings, port_number


def add_listen_parser(sub) -> None:
    p = sub.add_parser("listen", help="receive series from the PACS (DICOM C-STORE) and answer "
                                      "each one back into the PACS")
    p.add_argument("--ae-title", type=ae_title, help="our AE title (default: [listener] ae_title)")
    p.add_argument("--port", type=port_number, help="DICOM port (default: [listener] port, 11112)")
    p.add_argument("--bind", help="address to listen on (default: [listener] bind, 127.0.0.1)")
    p.add_argument("--accept-from", type=ae_titles,
                   help="calling AE titles accepted, separated by commas")
    p.set_defaults(func=_cmd_listen)


def _cmd_listen(args: argparse.Namespace) -> int:
    from medcls.integrations.dicomnode.service import Listener

    settings = load_settings()
    changes = {k: v for k, v in (("ae_title", args.ae_title), ("port", args.port),
                                 ("bind", args.bind), ("accept_from", args.accept_from))
               if v is not None}
    if changes:
        settings = dataclasses.replace(settings,
                                       listener=dataclasses.replace(settings.listener, **changes))
    listener = Listener(settings)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: listener.request_stop())
    print(f"MedCLS listening as {settings.listener.ae_title} on {settings.listener.bind}:"
          f"{settings.listener.port} (Ctrl+C stops)", flush=True)
    listener.run()
    return 0
