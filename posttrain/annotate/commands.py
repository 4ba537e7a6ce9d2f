"""`posttrain annotate serve | add-annotator | status | export`.

Only the standard library is imported at the top, so `posttrain --help` stays instant; each
action imports what it needs (Flask and waitress for serve, the data layer to load a file).
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import re
import socket
import sys
import urllib.parse
from pathlib import Path

from posttrain.annotate import MODES, plural

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
MAX_WAITRESS_BODY = 1024 * 1024
"""waitress refuses bodies past this before the app sees them; the app's own limit is smaller."""


def add_annotate_parser(sub) -> None:
    """The `annotate` command and its four actions, added to the CLI's subparsers `sub`."""
    from posttrain.cli import OneDefaultHelpFormatter as fmt  # one true default per flag; cli.py is loaded by now

    parser = sub.add_parser("annotate", help="Human preference annotation: a web app, annotators, status, export.",
                            formatter_class=fmt)
    # Not required here: parse_command_line asks for it after naming any unrecognized argument.
    actions = parser.add_subparsers(dest="annotate_command", required=False, metavar="ACTION")

    serve = actions.add_parser("serve", help="Load a data file (idempotently) and serve the annotation page.",
                               formatter_class=fmt)
    serve.add_argument("--db", required=True,
                       help="SQLite database; created on first use (a new one's name ends in .sqlite, .sqlite3 "
                            "or .db)")
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
    add.add_argument("--db", required=True,
                     help="SQLite database; created if it does not exist (a new one's name ends in .sqlite, "
                          ".sqlite3 or .db)")
    add.add_argument("--url", default=f"http://{DEFAULT_HOST}:{DEFAULT_PORT}",
                     help="the server's address as annotators reach it, for the link: http(s)://HOST[:PORT]")
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
                        help="JSONL for `posttrain rm` / `dpo` (pair mode) or `posttrain kto` (single mode); an "
                             "existing file is replaced (atomically: written aside, then renamed)")
    export.add_argument("--min-votes", type=int, default=1,
                        help="leave out items with fewer labels; the default exports an item as soon as it has "
                             "one, even if serve's --per-item wants more (pass the --per-item value to export "
                             "complete items only)")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to `host`:`port` (the first address `host` resolves to) for waitress to
    listen on, so that a bad host or a taken port is found before the database is touched.
    ValueError naming the host and port otherwise."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as err:
        raise ValueError(f"--host {host}: not an address this machine can resolve ({err.strerror})") from None
    sock = socket.socket(family, kind, proto)
    try:
        if os.name == "posix":  # as waitress does: a restart may rebind while old connections linger in TIME_WAIT
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as err:
        sock.close()
        hint = "; pick another --port (0: any free one)" if err.errno == errno.EADDRINUSE else ""
        raise ValueError(f"--host {host} --port {port}: cannot listen there ({err.strerror}){hint}") from None
    return sock


def _items_to_load(path: Path, existing, data: str | None, mode: str | None,
                   pairs_per_prompt: int) -> tuple[str, list, object]:
    """(mode, items, load summary or None) for `serve`: the data file's items, checked against the
    existing database (or None) at `path`; writes nothing. ValueError if they would leave the
    database empty or mix modes."""
    mode = mode or (existing.mode if existing else None) or "pair"
    if existing is not None and existing.mode not in (None, mode):
        raise ValueError(f"--db {path}: holds {existing.mode}-mode items; this run asked for --mode {mode} "
                         "(use another --db)")
    items, summary = [], None
    if data is not None:
        from posttrain.annotate.items import items_from_records
        from posttrain.data import read_records

        items, summary = items_from_records(read_records(data), source=str(data), mode=mode,
                                            pairs_per_prompt=pairs_per_prompt)
    if not items and (existing is None or existing.item_count() == 0):
        raise ValueError(f"--db {path}: no items to annotate" + (f" ({data} formed none)" if data else ""))
    return mode, items, summary


def _store(path: Path, existing, items: list, mode: str, per_item: int | None):
    """(database, items added): `items` and the per-item target stored in one transaction, in
    `existing` or in a database created at `path`, which is removed again if the load fails."""
    from posttrain.annotate.storage import AnnotationDB

    db = existing or AnnotationDB(path, create=True)
    try:
        return db, db.add_items(items, mode, per_item=per_item or db.per_item or 1)
    except BaseException:
        db.close()
        if existing is None:
            for leftover in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
                leftover.unlink(missing_ok=True)
        raise


def serve(db_path: str, *, data: str | None = None, mode: str | None = None, per_item: int | None = None,
          pairs_per_prompt: int = 0, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, threads: int = 8) -> None:
    """Load `data` into the database (if given), then serve until interrupted. Everything — the
    options, the database path, the data file, the host and port — is checked before the
    database is created or changed; the load is one transaction, and a database this call
    created is removed again if the load fails."""
    import waitress

    from posttrain.annotate.app import MAX_BODY_BYTES, create_app
    from posttrain.annotate.storage import AnnotationDB, check_db_path

    if per_item is not None and per_item < 1:
        raise ValueError(f"--per-item {per_item}: expected ≥ 1")
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port}: expected 0-65535")
    if threads < 1:
        raise ValueError(f"--threads {threads}: expected ≥ 1")
    path = Path(db_path)
    if data is None and not path.exists():
        raise FileNotFoundError(f"--db {db_path}: no such file; pass --data to create it")
    check_db_path(path, create=data is not None)
    existing = AnnotationDB(path) if path.is_file() else None
    try:
        mode, items, summary = _items_to_load(path, existing, data, mode, pairs_per_prompt)
        sock = bind(host, port)
    except BaseException:
        if existing is not None:
            existing.close()
        raise
    try:
        db, added = _store(path, existing, items, mode, per_item)
    except BaseException:
        sock.close()
        raise
    with db:
        per_item = db.per_item
        if summary is not None:
            summary.added = added
            print(summary.line(data), flush=True)
        try:
            server = waitress.create_server(create_app(db, per_item=per_item), sockets=[sock], threads=threads,
                                            ident="posttrain", clear_untrusted_proxy_headers=True,
                                            max_request_body_size=max(MAX_WAITRESS_BODY, MAX_BODY_BYTES))
        except BaseException:
            sock.close()
            raise
        if not is_loopback(host):
            print(f"warning: --host {host} is not a loopback address: anyone who can reach this machine can reach "
                  "the app, and tokens cross the network unencrypted (plain HTTP); prefer an SSH tunnel or an HTTPS "
                  "proxy", file=sys.stderr, flush=True)
        shown = f"[{host}]" if ":" in host else host
        names = db.annotators()
        print(f"serving {plural(db.item_count(), f'{mode}-mode item')}, {plural(per_item, 'label')} each, at "
              f"http://{shown}:{server.effective_port}/ for {plural(len(names), 'annotator')}; Ctrl-C stops",
              flush=True)
        if not names:
            print(f"no annotators yet: add one with `posttrain annotate add-annotator NAME --db {db_path}`", flush=True)
        try:
            server.run()
        except KeyboardInterrupt:
            pass
        finally:
            server.close()


def _is_ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False


def server_url(url: str) -> str:
    """`url` without a trailing slash if it is http(s)://HOST[:PORT] — the server's root, the only
    place the app is served from; ValueError otherwise (a link is sent to people, so no other
    scheme, no path, query, fragment or user name is allowed into it)."""
    expected = f"--url {url!r}: expected http://HOST[:PORT] or https://HOST[:PORT]"
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as err:  # a malformed [IPv6] host
        raise ValueError(f"{expected} ({err})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{expected} (the server's address as annotators reach it)")
    if not (re.fullmatch(r"[\w.-]+", parts.hostname) or _is_ipv6(parts.hostname)):
        raise ValueError(f"{expected}; {parts.hostname!r} is not a host name or address")
    try:
        parts.port  # noqa: B018 — urllib checks the port only when it is read
    except ValueError:
        raise ValueError(f"{expected}; the port is not a number from 0 to 65535") from None
    if parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc:
        raise ValueError(f"{expected}, with no path, query, fragment or user name (the app is served at the root)")
    return f"{parts.scheme}://{parts.netloc}"


def add_annotator(db_path: str, name: str, *, url: str, new_token: bool = False) -> str:
    """Add annotator `name` (or with new_token replace their token); print and return their link."""
    from posttrain.annotate.storage import AnnotationDB

    root = server_url(url)
    with AnnotationDB(db_path, create=True) as db:
        link = f"{root}/?token={db.add_annotator(name, new_token=new_token)}"
    print(f"{name}: {link}")
    print("(the link is the password: send it privately; it is shown only now)", file=sys.stderr)
    return link


def export(db_path: str, output: str, *, min_votes: int = 1):
    """Write the majority-vote records to `output` (results.py); print and return the summary."""
    from posttrain.annotate.results import export_records
    from posttrain.annotate.storage import AnnotationDB
    from posttrain.scoring.files import check_output, write_jsonl_atomic

    check_output(output, db_path)
    with AnnotationDB(db_path) as db:
        records, summary = export_records(db, min_votes=min_votes)
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

        with AnnotationDB(args.db) as db:
            summary = status(db)
        print(json.dumps(summary) if args.json else format_status(summary))
    else:
        export(args.db, args.output, min_votes=args.min_votes)
    return 0
