"""The annotation web app: a Flask app (served by waitress, see commands.py) over AnnotationDB.

Routes (every one needs a valid annotator token, else 401 with no detail):

    GET  /                 the page; `/?token=T` (the personal link) also sets the session cookie
    GET  /assets/<name>    the page's own script and style sheet, nothing else
    GET  /api/session      {annotator, mode, per_item, csrf_token, progress}
    POST /api/next         {item, progress}: the annotator's open item, or a new one (item null: none left)
    POST /api/label        {submit_id, item_id, choice, comment?} → {saved, repeated, progress}
    POST /api/undo         {item_id: the item the page shows, or null} → {undone, item, progress}

Safety, in the order a request meets it:

* The token comes from the `posttrain_annotate` cookie (HttpOnly, SameSite=Strict), from
  `?token=` on `/` only, or from `Authorization: Bearer T` (scripts); unknown → 401.
* Every POST needs `X-CSRF-Token` (an HMAC of the annotator's token, put in the page and in
  /api/session), an `Origin`, if sent, equal to the server's own, no cross-site
  `Sec-Fetch-Site`, and a JSON body (Content-Type application/json) of at most
  MAX_BODY_BYTES; otherwise 403 / 415 / 413 / 400 with a message, and nothing is written.
* Model text travels only as JSON and is put on the page with `textContent` (assets/app.js);
  the HTML template holds no model text and Jinja escapes what it holds.
* Every answer carries a Content-Security-Policy allowing only the app's own script and style
  (no inline script), `frame-ancestors 'none'`, `X-Content-Type-Options: nosniff`,
  `Referrer-Policy: no-referrer` and `Cache-Control: no-store`.
"""

from __future__ import annotations

import hmac
import json
import re
from pathlib import Path
from typing import Any

from flask import Flask, Response, g, jsonify, render_template, request, send_file
from werkzeug.exceptions import HTTPException, UnsupportedMediaType

from posttrain.annotate.storage import SCREEN_CHOICES, AnnotationDB, Assignment, Conflict

ASSETS = Path(__file__).resolve().parent / "assets"
SERVED_ASSETS = {"app.js": "text/javascript", "app.css": "text/css"}
"""The only files served: name → MIME type."""
COOKIE = "posttrain_annotate"
MAX_BODY_BYTES = 16 * 1024
"""Largest request body: a label with a MAX_COMMENT_CHARS comment fits with room to spare."""
MAX_COMMENT_CHARS = 2000
SUBMIT_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
MAX_ITEM_ID = 2**63 - 1
"""SQLite's largest integer: an item id past it cannot even be looked up (Python's sqlite3 raises
OverflowError), so it is refused as out of range."""
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class BadRequest(ValueError):
    """A malformed request body (answered 400); the message says what is wrong."""


def _token() -> str | None:
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        return header[len("Bearer "):].strip()
    if request.path == "/" and request.args.get("token"):
        return request.args["token"]
    return request.cookies.get(COOKIE)


def _json_body(fields: dict[str, type | tuple[type, ...]], required: tuple[str, ...]) -> dict[str, Any]:
    """The request's JSON object, checked against `fields` (name → allowed types)."""
    if request.mimetype != "application/json":
        raise UnsupportedMediaType(f"expected Content-Type application/json, got {request.mimetype or 'none'!r}")
    raw = request.get_data(cache=False)  # raises 413 past MAX_CONTENT_LENGTH
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise BadRequest(f"malformed body: not JSON ({err})") from None
    if not isinstance(body, dict):
        raise BadRequest(f"malformed body: expected a JSON object, got {type(body).__name__}")
    for name in body:
        if name not in fields:
            raise BadRequest(f"malformed body: unexpected field {name!r} (expected {sorted(fields)})")
    for name in required:
        if name not in body:
            raise BadRequest(f"malformed body: missing field {name!r}")
    for name, value in body.items():
        kinds = fields[name] if isinstance(fields[name], tuple) else (fields[name],)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            raise BadRequest(f"malformed body: field {name!r} has the wrong type ({type(value).__name__})")
    return body


def _item_id(body: dict[str, Any]) -> int | None:
    """The body's "item_id" (an int or None, as _json_body checked), refused unless it is an item
    id SQLite can hold: 1 to MAX_ITEM_ID."""
    item_id = body["item_id"]
    if item_id is not None and not 1 <= item_id <= MAX_ITEM_ID:
        text = str(item_id)
        raise BadRequest(f"malformed body: field 'item_id' out of range: expected 1 to {MAX_ITEM_ID}, got "
                         f"{text if len(text) <= 40 else text[:37] + '...'}")
    return item_id


def _item_json(mode: str, a: Assignment | None) -> dict[str, Any] | None:
    """What the page shows: replies by screen side, never which one is first."""
    if a is None:
        return None
    if mode == "single":
        return {"id": a.item_id, "prompt": a.prompt, "response": a.replies[0]}
    return {"id": a.item_id, "prompt": a.prompt, "left": a.replies[a.left_reply], "right": a.replies[1 - a.left_reply]}


def create_app(db: AnnotationDB, *, per_item: int) -> Flask:
    """The app over `db`, handing out each item until it has `per_item` labels."""
    if per_item < 1:
        raise ValueError(f"--per-item {per_item}: expected ≥ 1")
    mode = db.mode
    if mode is None:
        raise ValueError(f"--db {db.path}: holds no items yet; serve it with --data")
    app = Flask(__name__, static_folder=None, template_folder=str(ASSETS))
    app.config.update(MAX_CONTENT_LENGTH=MAX_BODY_BYTES)
    _add_guards(app, db)
    _add_routes(app, db, mode, per_item)
    return app


def _error(status: int, message: str) -> Response:
    response = jsonify(error=message)
    response.status_code = status
    return response


def _add_guards(app: Flask, db: AnnotationDB) -> None:
    """Authentication, CSRF and origin checks before every request; security headers on every
    answer; JSON errors."""

    @app.before_request
    def authenticate():
        token = _token()
        annotator = db.annotator_for_token(token) if token else None
        if annotator is None:
            return Response("Unauthorized\n", status=401, mimetype="text/plain")
        g.annotator, g.token = annotator, token
        if request.method not in ("GET", "HEAD"):
            sent = request.headers.get("X-CSRF-Token", "")
            if not hmac.compare_digest(sent, db.csrf_token(annotator)):
                return _error(403, "missing or wrong X-CSRF-Token header (reload the page)")
            origin = request.headers.get("Origin")
            if origin is not None and origin != f"{request.scheme}://{request.host}":
                return _error(403, f"cross-origin request from {origin!r} refused")
            if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
                return _error(403, "cross-site request refused")
        return None

    @app.after_request
    def secure(response: Response) -> Response:
        response.headers.update(SECURITY_HEADERS)
        return response

    @app.errorhandler(HTTPException)
    def http_error(err: HTTPException) -> Response:
        messages = {413: f"request body over {MAX_BODY_BYTES} bytes", 404: "no such page",
                    405: f"method {request.method} not allowed here"}
        return _error(err.code or 500, messages.get(err.code, err.description or err.name))

    @app.errorhandler(BadRequest)
    def bad_request(err: BadRequest) -> Response:
        return _error(400, str(err))

    @app.errorhandler(Conflict)
    def conflict(err: Conflict) -> Response:
        return _error(409, str(err))


def _add_routes(app: Flask, db: AnnotationDB, mode: str, per_item: int) -> None:
    """The page, its assets and the API (module docstring)."""

    def progress() -> dict[str, int]:
        return db.progress(g.annotator.id, per_item)

    @app.get("/")
    def page() -> Response:
        response = Response(render_template("index.html", mode=mode, name=g.annotator.name,
                                            csrf=db.csrf_token(g.annotator)))
        if request.args.get("token"):
            response.set_cookie(COOKIE, g.token, httponly=True, samesite="Strict", secure=request.is_secure, path="/")
        return response

    @app.get("/assets/<name>")
    def asset(name: str) -> Response:
        if name not in SERVED_ASSETS:
            return _error(404, "no such page")
        return send_file(ASSETS / name, mimetype=SERVED_ASSETS[name], max_age=0)

    @app.get("/api/session")
    def session() -> Response:
        return jsonify(annotator=g.annotator.name, mode=mode, per_item=per_item,
                       csrf_token=db.csrf_token(g.annotator), progress=progress())

    @app.post("/api/next")
    def next_item() -> Response:
        _json_body({}, ())
        return jsonify(item=_item_json(mode, db.next_item(g.annotator.id, per_item)), progress=progress())

    @app.post("/api/label")
    def label() -> Response:
        body = _json_body({"submit_id": str, "item_id": int, "choice": str, "comment": str},
                          ("submit_id", "item_id", "choice"))
        if not SUBMIT_ID.match(body["submit_id"]):
            raise BadRequest("malformed body: field 'submit_id' must be 8-64 letters, digits, '-' or '_', got "
                             f"{body['submit_id'][:80]!r}")
        if body["choice"] not in SCREEN_CHOICES[mode]:
            raise BadRequest(f"malformed body: field 'choice' must be one of {list(SCREEN_CHOICES[mode])} in "
                             f"{mode} mode, got {body['choice'][:80]!r}")
        comment = body.get("comment", "")
        if len(comment) > MAX_COMMENT_CHARS:
            raise BadRequest(f"malformed body: field 'comment' is {len(comment)} characters, "
                             f"at most {MAX_COMMENT_CHARS} allowed")
        try:
            comment.encode("utf-8")
        except UnicodeEncodeError as err:
            raise BadRequest(f"malformed body: field 'comment' holds a lone surrogate at character {err.start} "
                             "(not valid Unicode text)") from None
        stored = db.submit(g.annotator.id, submit_id=body["submit_id"], item_id=_item_id(body),
                           screen_choice=body["choice"], comment=comment)
        return jsonify(saved=True, repeated=not stored, progress=progress())

    @app.post("/api/undo")
    def undo() -> Response:
        body = _json_body({"item_id": (int, type(None))}, ("item_id",))
        undone = db.undo(g.annotator.id, shown_item_id=_item_id(body))
        return jsonify(undone=undone, item=_item_json(mode, db.next_item(g.annotator.id, per_item)),
                       progress=progress())
