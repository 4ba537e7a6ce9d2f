"""Shared by the annotation tests: data files, a loaded database, a Flask test client that
speaks for one annotator, and the real server run as `posttrain annotate serve` in a subprocess."""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from posttrain.annotate.app import create_app
from posttrain.annotate.items import items_from_records
from posttrain.annotate.storage import AnnotationDB

REPO = Path(__file__).resolve().parents[2]
HOSTILE = ['<script>window.__xss = 1</script>', '<img src=x onerror="window.__xss = 2">']


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def pair_records(n: int) -> list[dict]:
    return [{"prompt": f"question {i}", "chosen": f"good answer {i}", "rejected": f"bad answer {i}"} for i in range(n)]


def make_db(tmp_path: Path, records: list[dict], *, mode: str = "pair", names=("ann",),
            pairs_per_prompt: int = 0) -> tuple[AnnotationDB, dict[str, str]]:
    """A database at tmp_path/a.sqlite with the records' items and annotators; (db, name → token)."""
    db = AnnotationDB(tmp_path / "a.sqlite", create=True)
    items, _ = items_from_records(records, source="data.jsonl", mode=mode, pairs_per_prompt=pairs_per_prompt)
    db.add_items(items, mode)
    return db, {name: db.add_annotator(name) for name in names}


class Client:
    """One annotator's requests through Flask's test client (Bearer token, CSRF header)."""

    def __init__(self, app, db: AnnotationDB, token: str):
        self.http, self.token = app.test_client(), token
        self.csrf = db.csrf_token(db.annotator_for_token(token))

    def headers(self, **extra) -> dict:
        return {"Authorization": f"Bearer {self.token}", "X-CSRF-Token": self.csrf, **extra}

    def get(self, path: str):
        return self.http.get(path, headers=self.headers())

    def post(self, path: str, body=None, **headers):
        return self.http.post(path, json={} if body is None else body, headers=self.headers(**headers))

    def next(self) -> dict | None:
        response = self.post("/api/next")
        assert response.status_code == 200, response.get_json()
        return response.get_json()["item"]

    def label(self, item_id: int, choice: str, submit_id: str, comment: str = ""):
        return self.post("/api/label", {"submit_id": submit_id, "item_id": item_id, "choice": choice,
                                         "comment": comment})


def clients(db: AnnotationDB, tokens: dict[str, str], per_item: int = 1) -> dict[str, Client]:
    app = create_app(db, per_item=per_item)
    return {name: Client(app, db, token) for name, token in tokens.items()}


def start_server(db_path: Path, *args: str, timeout: float = 60.0) -> tuple[subprocess.Popen, int]:
    """`posttrain annotate serve --db DB --port 0 ARGS` in a subprocess; (process, port) once it
    says where it serves. Its stderr goes to the test's."""
    proc = subprocess.Popen([sys.executable, "-m", "posttrain.cli", "annotate", "serve", "--db", str(db_path),
                             "--port", "0", *args], stdout=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"server exited with {proc.wait()} before serving")
        match = re.search(r"at http://127\.0\.0\.1:(\d+)/", line)
        if match:
            return proc, int(match.group(1))
    proc.kill()
    raise AssertionError(f"server did not start within {timeout} s")


class HTTPClient:
    """One annotator's keep-alive connection to a real server."""

    def __init__(self, port: int, token: str, timeout: float = 30.0):
        self.con = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        self.auth = {"Authorization": f"Bearer {token}"}
        status, body = self.request("GET", "/api/session")
        assert status == 200, body
        self.csrf = body["csrf_token"]

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        headers = dict(self.auth)
        data = None
        if method == "POST":
            headers.update({"Content-Type": "application/json", "X-CSRF-Token": self.csrf})
            data = json.dumps(body or {})
        self.con.request(method, path, body=data, headers=headers)
        response = self.con.getresponse()
        return response.status, json.loads(response.read())

    def close(self) -> None:
        self.con.close()
