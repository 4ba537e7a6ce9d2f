"""`posttrain annotate serve | add-annotator | status | export`.

Only the standard library is imported at the top, so `posttrain --help` stays instant; each
action imports what it needs (Flask and waitress for serve, the data layer to load a file).
"""

from __future__ import annotations

import ipaddress
import json
import sys
from pathlib import Path

from posttrain.annotate import MODES

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
MAX_WAITRESS_BODY = 1024 * 1024
"""waitress refuses bodies past this before the app sees them; the app's own limit is smaller."""


def add_annotate_parser(sub) -> None:
    """The `annotate` command and its four actions, added to the CLI's subparsers `sub`."""
    from posttrain.cli import OneDefaultHelpFormatter as fmt  # one true default per flag; cli.py is loaded by now

    parser = sub.add_parser("annotate", help="Human preference annotation: a web app, annotators, status, export.",
                            formatter_class=fmt)
    actions = parser.add_subparsers(dest="annotate_command", required=True, metavar="ACTION")

    serve = actions.add_parser("serve", help="Load a data file (idempotently) and serve the annotation page.",
                               formatter_class=fmt)
    serve.add_argument("--db", required=True, help="SQLite database; created on first use")
    serve.add_argument("--data", default=None,
                       help="samples JSONL (`posttrain sample`) or {prompt, chosen, rejected} pairs to verify; "
                            "items already in --db are not added twice (default: serve --db's items)")
    serve.add_argument("--mode", choices=MODES, default=None,
                       help="pair: which of two replies is better; single: is one reply good or bad (KTO's "
                            "feedback) (default: the database's mode, else pair)")
    serve.add_argument("--per-item", type=int, default=None,
                       help="labels wanted per item, each from a different annotator (default: the last "
                            "serve's, else 1)")
    serve.add_argument("--pairs-per-prompt", type=int, default=0,
                       help="pair mode, samples file: this many pairs per prompt, drawn by a generator seeded "
                            "from the prompt (0: every pair of its responses)")
    serve.add_argument("--host", default=DEFAULT_HOST,
                       help="address to listen on; any but a loopback address is warned of")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to listen on (0: any free one)")
    serve.add_argument("--threads", type=int, default=8, help="request threads")

    add = actions.add_parser("add-annotator", help="Add an annotator and print their personal link.",
                             formatter_class=fmt)
    add.add_argument("name", help="the annotator's name, as status and export show it")
    add.add_argument("--db", required=True, help="SQLite database; created if it does not exist")
    add.add_argument("--url", default=f"http://{DEFAULT_HOST}:{DEFAULT_PORT}",
                     help="the server's address as annotators reach it, for the link")
    add.add_argument("--new-token", action="store_true",
                     help="give an existing annotator a new link; the old one stops working")

    status = actions.add_parser("status", help="Progress, labels per annotator, agreement, ties and both-bad.",
                                formatter_class=fmt)
    status.add_argument("--db", required=True, help="SQLite database")
    status.add_argument("--json", action="store_true", help="print the status as one JSON object")

    export = actions.add_parser("export", help="Majority-vote preference (pair) or labelled (single) records.",
                                formatter_class=fmt)
    export.add_argument("--db", required=True, help="SQLite database")
    export.add_argument("--output", required=True,
                        help="JSONL for `posttrain rm` / `dpo` (pair mode) or `posttrain kto` (single mode)")
    export.add_argument("--min-votes", type=int, default=1, help="leave out items with fewer labels")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def serve(db_path: str, *, data: str | None = None, mode: str | None = None, per_item: int | None = None,
          pairs_per_prompt: int = 0, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, threads: int = 8) -> None:
    """Load `data` into the database (if given), then serve until interrupted. Everything is
    validated before the database is created or changed."""
    import waitress

    from posttrain.annotate.app import MAX_BODY_BYTES, create_app
    from posttrain.annotate.storage import AnnotationDB

    if per_item is not None and per_item < 1:
        raise ValueError(f"--per-item {per_item}: expected ≥ 1")
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port}: expected 0-65535")
    if threads < 1:
        raise ValueError(f"--threads {threads}: expected ≥ 1")
    existing = AnnotationDB(db_path) if Path(db_path).is_file() else None
    mode = mode or (existing.mode if existing else None) or "pair"
    if data is None:
        if existing is None:
            raise FileNotFoundError(f"--db {db_path}: no such file; pass --data to create it")
        db = existing
    else:
        from posttrain.annotate.items import items_from_records
        from posttrain.data import read_records

        items, summary = items_from_records(read_records(data), source=str(data), mode=mode,
                                            pairs_per_prompt=pairs_per_prompt)
        db = existing or AnnotationDB(db_path, create=True)
        summary.added = db.add_items(items, mode)
        print(summary.line(data), flush=True)
    if db.mode is not None and db.mode != mode:
        raise ValueError(f"--db {db_path}: holds {db.mode}-mode items; this run asked for --mode {mode}")
    if db.item_count() == 0:
        raise ValueError(f"--db {db_path}: no items to annotate" + (f" ({data} formed none)" if data else ""))
    per_item = per_item or db.per_item or 1
    db.set_per_item(per_item)
    app = create_app(db, per_item=per_item)
    if not is_loopback(host):
        print(f"warning: --host {host} is not a loopback address: anyone who can reach this machine can reach the "
              "app, and tokens cross the network unencrypted (plain HTTP); prefer an SSH tunnel or an HTTPS proxy",
              file=sys.stderr, flush=True)
    server = waitress.create_server(app, host=host, port=port, threads=threads, ident="posttrain",
                                    max_request_body_size=max(MAX_WAITRESS_BODY, MAX_BODY_BYTES),
                                    clear_untrusted_proxy_headers=True)
    shown = f"[{host}]" if ":" in host else host
    names = db.annotators()
    print(f"serving {db.item_count()} {mode}-mode items, {per_item} label(s) each, at "
          f"http://{shown}:{server.effective_port}/ for {len(names)} annotator(s); Ctrl-C stops", flush=True)
    if not names:
        print(f"no annotators yet: add one with `posttrain annotate add-annotator NAME --db {db_path}`", flush=True)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


def add_annotator(db_path: str, name: str, *, url: str, new_token: bool = False) -> str:
    """Add annotator `name` (or with new_token replace their token); print and return their link."""
    from posttrain.annotate.storage import AnnotationDB

    db = AnnotationDB(db_path, create=True)
    link = f"{url.rstrip('/')}/?token={db.add_annotator(name, new_token=new_token)}"
    print(f"{name}: {link}")
    print("(the link is the password: send it privately; it is shown only now)", file=sys.stderr)
    return link


def export(db_path: str, output: str, *, min_votes: int = 1):
    """Write the majority-vote records to `output` (results.py); print and return the summary."""
    from posttrain.annotate.results import export_records
    from posttrain.annotate.storage import AnnotationDB
    from posttrain.scoring.files import check_output, write_jsonl_atomic

    check_output(output, db_path)
    records, summary = export_records(AnnotationDB(db_path), min_votes=min_votes)
    if not records:
        raise ValueError(f"--db {db_path}: no record to export ({summary.left_out_text()}); "
                         f"{output} not written")
    write_jsonl_atomic(output, records)
    print(summary.line(output))
    return summary


def run(args) -> int:
    """Dispatch `posttrain annotate ACTION` (cli.main turns ValueError into exit code 2)."""
    if args.annotate_command == "serve":
        serve(args.db, data=args.data, mode=args.mode, per_item=args.per_item, pairs_per_prompt=args.pairs_per_prompt,
              host=args.host, port=args.port, threads=args.threads)
    elif args.annotate_command == "add-annotator":
        add_annotator(args.db, args.name, url=args.url, new_token=args.new_token)
    elif args.annotate_command == "status":
        from posttrain.annotate.results import format_status, status
        from posttrain.annotate.storage import AnnotationDB

        summary = status(AnnotationDB(args.db))
        print(json.dumps(summary) if args.json else format_status(summary))
    else:
        export(args.db, args.output, min_votes=args.min_votes)
    return 0
