"""Every route of the annotation app and every error it answers, through Flask's test client:
auth, CSRF and origin checks, body limits and validation, the assignment rule, idempotent
submits, undo, sides, single mode, headers, assets, and hostile model text."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from annotate_helpers import HOSTILE, clients, make_db, pair_records

from posttrain.annotate import storage
from posttrain.annotate.app import MAX_BODY_BYTES, SECURITY_HEADERS, create_app

SID = "submit-0001"


def live_judgements(db) -> list:
    return db.read().execute("SELECT * FROM judgements WHERE undone IS NULL ORDER BY id").fetchall()


def all_judgements(db) -> int:
    return db.read().execute("SELECT COUNT(*) FROM judgements").fetchone()[0]


@pytest.fixture
def setup(tmp_path):
    db, tokens = make_db(tmp_path, pair_records(6), names=("ann", "bob", "cat"))
    return db, tokens, clients(db, tokens, per_item=2)


ROUTES = [("/", "GET"), ("/assets/app.js", "GET"), ("/api/session", "GET"), ("/api/next", "POST"),
          ("/api/label", "POST"), ("/api/undo", "POST"), ("/no-such-page", "GET")]


def test_every_route_needs_a_valid_token_and_401_says_nothing(setup):
    db, tokens, c = setup
    client = c["ann"].http
    for path, method in ROUTES:
        for auth in (None, "Bearer wrong-token", "Bearer ", "Basic YTpi", f"Bearer {tokens['ann']}x"):
            response = client.open(path, method=method, headers={"Authorization": auth} if auth else {}, json={})
            assert response.status_code == 401, (path, auth)
            assert response.get_data(as_text=True) == "Unauthorized\n"
            assert "WWW-Authenticate" not in response.headers
            for name, value in SECURITY_HEADERS.items():
                assert response.headers[name] == value
    assert all_judgements(db) == 0 and db.read().execute("SELECT COUNT(*) FROM assignments").fetchone()[0] == 0


def test_a_wrong_cookie_or_query_token_is_refused_too(setup):
    db, tokens, c = setup
    client = c["ann"].http
    client.set_cookie("posttrain_annotate", "not-a-token")
    assert client.get("/").status_code == 401
    assert client.get("/?token=nope").status_code == 401
    assert client.get(f"/api/session?token={tokens['ann']}").status_code == 401  # ?token= only logs in on /


def test_the_personal_link_sets_a_strict_httponly_cookie_that_then_authenticates(setup):
    db, tokens, c = setup
    client = c["ann"].http
    response = client.get(f"/?token={tokens['ann']}")
    assert response.status_code == 200
    cookie = response.headers["Set-Cookie"]
    assert cookie.startswith(f"posttrain_annotate={tokens['ann']};")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    page = response.get_data(as_text=True)
    assert f'<meta name="csrf-token" content="{c["ann"].csrf}">' in page
    assert "<script src=\"/assets/app.js\" defer></script>" in page
    assert "<script>" not in page  # no inline script anywhere (the CSP would refuse it)
    session = client.get("/api/session").get_json()   # the cookie alone now authenticates
    assert session["annotator"] == "ann" and session["csrf_token"] == c["ann"].csrf


def test_security_headers_on_every_answer(setup):
    db, tokens, c = setup
    for response in (c["ann"].get("/"), c["ann"].get("/assets/app.css"), c["ann"].get("/api/session"),
                     c["ann"].post("/api/next"), c["ann"].get("/nope"), c["ann"].post("/api/label", {})):
        for name, value in SECURITY_HEADERS.items():
            assert response.headers[name] == value
    csp = SECURITY_HEADERS["Content-Security-Policy"]
    assert "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp and "script-src 'self'" in csp


def test_only_the_apps_own_assets_are_served(setup):
    db, tokens, c = setup
    js, css = c["ann"].get("/assets/app.js"), c["ann"].get("/assets/app.css")
    assert js.status_code == 200 and js.mimetype == "text/javascript" and b"textContent" in js.data
    assert css.status_code == 200 and css.mimetype == "text/css"
    for path in ("/assets/index.html", "/assets/../app.py", "/assets/%2e%2e%2fapp.py", "/assets/", "/static/app.js",
                 "/assets/..%2Fstorage.py", "/a.sqlite", "/favicon.ico"):
        response = c["ann"].get(path)
        assert response.status_code == 404, path
        assert response.get_json() == {"error": "no such page"}


@pytest.mark.parametrize("headers, message", [
    ({"X-CSRF-Token": ""}, "X-CSRF-Token"),
    ({"X-CSRF-Token": "0" * 64}, "X-CSRF-Token"),
    ({"Origin": "http://evil.example"}, "cross-origin request from 'http://evil.example' refused"),
    ({"Origin": "null"}, "cross-origin"),
    ({"Sec-Fetch-Site": "cross-site"}, "cross-site request refused"),
])
def test_writes_need_the_csrf_token_and_a_same_origin(setup, headers, message):
    db, tokens, c = setup
    item = c["ann"].next()
    response = c["ann"].post("/api/label", {"submit_id": SID, "item_id": item["id"], "choice": "left"}, **headers)
    assert response.status_code == 403 and message in response.get_json()["error"]
    assert all_judgements(db) == 0
    # Another annotator's CSRF token is no good either.
    response = c["ann"].post("/api/next", **{"X-CSRF-Token": c["bob"].csrf})
    assert response.status_code == 403
    same_origin = c["ann"].post("/api/label", {"submit_id": SID, "item_id": item["id"], "choice": "left"},
                                Origin="http://localhost", **{"Sec-Fetch-Site": "same-origin"})
    assert same_origin.status_code == 200


@pytest.mark.parametrize("body, status, message", [
    ("not json", 400, "malformed body: not JSON"),
    ("[1, 2]", 400, "expected a JSON object, got list"),
    ('{"submit_id": "abcdefgh", "choice": "left"}', 400, "missing field 'item_id'"),
    ('{"submit_id": "abcdefgh", "item_id": "1", "choice": "left"}', 400, "field 'item_id' has the wrong type (str)"),
    ('{"submit_id": "abcdefgh", "item_id": true, "choice": "left"}', 400, "field 'item_id' has the wrong type (bool)"),
    ('{"submit_id": "abc", "item_id": 1, "choice": "left"}', 400, "field 'submit_id' must be 8-64"),
    ('{"submit_id": "abcdefgh", "item_id": 1, "choice": "good"}', 400, "field 'choice' must be one of"),
    ('{"submit_id": "abcdefgh", "item_id": 1, "choice": "left", "x": 1}', 400, "unexpected field 'x'"),
    # Past SQLite's 64-bit integers (the fresh-user finding: a 500 with an OverflowError traceback).
    ('{"submit_id": "abcdefgh9", "item_id": 99999999999999999999999, "choice": "left"}', 400,
     "malformed body: field 'item_id' out of range: expected 1 to 9223372036854775807, got 99999999999999999999999"),
    ('{"submit_id": "abcdefgh9", "item_id": 9223372036854775808, "choice": "left"}', 400, "'item_id' out of range"),
    ('{"submit_id": "abcdefgh9", "item_id": 0, "choice": "left"}', 400, "'item_id' out of range"),
    ('{"submit_id": "abcdefgh", "item_id": 1, "choice": "left", "comment": "' + "c" * 2001 + '"}', 400,
     "field 'comment' is 2001 characters"),
    ('{"submit_id": "abcdefgh", "item_id": 1, "choice": "left", "comment": "\\ud800"}', 400, "lone surrogate"),
    ('{"submit_id": "abcdefgh", "item_id": 1, "choice": "left", "comment": "' + "c" * MAX_BODY_BYTES + '"}',
     413, f"request body over {MAX_BODY_BYTES} bytes"),
])
def test_a_bad_label_body_is_refused_with_a_clear_message_and_nothing_written(setup, body, status, message):
    db, tokens, c = setup
    c["ann"].next()
    response = c["ann"].http.post("/api/label", data=body, headers=c["ann"].headers(**{"Content-Type":
                                                                                     "application/json"}))
    assert response.status_code == status and message in response.get_json()["error"]
    assert all_judgements(db) == 0


def test_wrong_content_type_and_wrong_method(setup):
    db, tokens, c = setup
    response = c["ann"].http.post("/api/next", data="{}", headers=c["ann"].headers(**{"Content-Type": "text/plain"}))
    assert response.status_code == 415 and "application/json" in response.get_json()["error"]
    response = c["ann"].get("/api/label")
    assert response.status_code == 405 and response.get_json() == {"error": "method GET not allowed here"}
    assert c["ann"].post("/api/next", {"x": 1}).status_code == 400


def test_a_label_for_an_item_not_assigned_is_refused(setup):
    db, tokens, c = setup
    item = c["ann"].next()
    response = c["ann"].label(item["id"] + 1, "left", SID)
    assert response.status_code == 409
    assert response.get_json()["error"] == (f"item {item['id'] + 1} is not assigned to you (your open item is "
                                            f"{item['id']}); reload for your next item")
    assert c["bob"].label(item["id"], "left", SID).status_code == 409   # bob has no open item
    assert c["ann"].label(999, "left", SID).status_code == 409
    assert all_judgements(db) == 0
    assert c["ann"].label(item["id"], "left", SID).status_code == 200
    again = c["ann"].label(item["id"], "right", "submit-0002")          # a second label from another tab
    assert again.status_code == 409 and "you already labelled it" in again.get_json()["error"]
    assert len(live_judgements(db)) == 1


def test_a_repeated_submit_is_stored_once(setup):
    db, tokens, c = setup
    item = c["ann"].next()
    first = c["ann"].label(item["id"], "tie", SID, "hmm")
    again = c["ann"].label(item["id"], "tie", SID, "hmm")
    assert first.get_json()["repeated"] is False and again.get_json()["repeated"] is True
    assert first.get_json()["progress"]["labelled"] == again.get_json()["progress"]["labelled"] == 1
    assert len(live_judgements(db)) == 1
    # The same submit_id with another label, or from another annotator, is a conflict, not a replay.
    assert c["ann"].label(item["id"], "left", SID, "hmm").status_code == 409
    c["bob"].next()
    assert c["bob"].label(item["id"], "tie", SID, "hmm").status_code == 409
    assert len(live_judgements(db)) == 1


def test_each_item_until_n_labels_never_twice_to_one_annotator(setup):
    db, tokens, c = setup    # 6 items, 2 labels each, 3 annotators
    seen = {name: [] for name in c}
    for round_ in range(6):
        for name, client in c.items():
            item = client.next()
            if item is None:
                continue
            seen[name].append(item["id"])
            assert client.label(item["id"], "left", f"{name}-{round_}-xxxx").status_code == 200
    for name, ids in seen.items():
        assert len(ids) == len(set(ids)), f"{name} saw an item twice: {ids}"
    per_item = Counter(row["item_id"] for row in live_judgements(db))
    assert per_item == {i: 2 for i in range(1, 7)}
    assert all(client.next() is None for client in c.values())
    assert c["ann"].post("/api/next").get_json()["progress"] == {"items": 6, "complete": 6, "labelled": 4,
                                                                 "remaining": 0}


def test_open_items_hold_a_slot_and_the_open_item_comes_back(setup):
    db, tokens, c = setup
    first = c["ann"].next()
    assert c["ann"].next()["id"] == first["id"]            # reloading shows the same item, same sides
    assert c["ann"].next() == first
    assert c["bob"].next()["id"] == first["id"]            # 2 slots: bob gets it too
    assert c["cat"].next()["id"] != first["id"]            # both slots are taken: cat gets the next one


def test_an_item_left_open_too_long_is_released_and_its_late_label_refused(setup, monkeypatch):
    db, tokens, c = setup
    one = clients(db, tokens, per_item=1)
    monkeypatch.setattr(storage, "ASSIGNMENT_TTL_S", -1)   # items opened now expire at once
    item = one["ann"].next()
    monkeypatch.setattr(storage, "ASSIGNMENT_TTL_S", 3600)
    assert one["bob"].next()["id"] == item["id"]           # released to bob, ann's reservation gone
    late = one["ann"].label(item["id"], "left", SID)
    assert late.status_code == 409 and "you have no open item" in late.get_json()["error"]
    assert one["bob"].label(item["id"], "left", "submit-0002").status_code == 200
    assert len(live_judgements(db)) == 1


def test_sides_are_random_per_item_and_annotator_stored_and_mapped_back(tmp_path):
    db, tokens = make_db(tmp_path, pair_records(40), names=("ann", "bob"))
    c = clients(db, tokens, per_item=2)
    lefts = {"ann": [], "bob": []}
    for n in range(40):
        for name in ("ann", "bob"):
            item = c[name].next()
            good_on_left = item["left"][0]["content"].startswith("good")
            lefts[name].append(good_on_left)
            # Everyone picks the good answer, whichever side it is on.
            response = c[name].label(item["id"], "left" if good_on_left else "right", f"{name}-{n:04d}")
            assert response.status_code == 200
    for name in lefts:                       # both sides used: P(all 40 on one side) = 2^-39
        assert 5 < sum(lefts[name]) < 35
    assert lefts["ann"] != lefts["bob"]     # the side depends on the annotator too
    rows = live_judgements(db)
    assert {row["choice"] for row in rows} == {"first"}   # "good answer" is replies[0] (the file's chosen)
    assert Counter(row["left_reply"] for row in rows).keys() == {0, 1}


def test_undo_reopens_the_last_label_and_a_stale_undo_is_refused(setup):
    db, tokens, c = setup
    a = c["ann"]
    one = a.next()
    assert a.label(one["id"], "right", "submit-0001", "first try").status_code == 200
    two = a.next()
    assert a.label(two["id"], "both_bad", "submit-0002").status_code == 200
    three = a.next()
    response = a.post("/api/undo", {"item_id": three["id"]})
    assert response.status_code == 200
    body = response.get_json()
    assert body["undone"] == {"item_id": two["id"], "choice": "both_bad", "comment": ""}
    assert body["item"] == two                     # the undone item again, same sides
    assert body["progress"]["labelled"] == 1
    stale = a.post("/api/undo", {"item_id": three["id"]})   # a double click: the page still says item three
    assert stale.status_code == 409 and "reload the page" in stale.get_json()["error"]
    body = a.post("/api/undo", {"item_id": two["id"]}).get_json()   # undo again: the label before
    assert body["undone"] == {"item_id": one["id"], "choice": "right", "comment": "first try"}
    nothing = a.post("/api/undo", {"item_id": one["id"]})
    assert nothing.status_code == 409 and nothing.get_json()["error"] == "nothing to undo: you have no label left"
    assert live_judgements(db) == [] and all_judgements(db) == 2   # undone labels are kept, marked
    assert a.label(one["id"], "left", "submit-0003").status_code == 200   # relabel
    assert [r["choice"] for r in live_judgements(db)] == [
        "first" if one["left"][0]["content"].startswith("good") else "second"]
    assert a.post("/api/undo", {"item_id": "x"}).status_code == 400
    assert a.post("/api/undo", {}).status_code == 400


def test_an_undo_with_an_item_id_out_of_range_is_a_400_and_changes_nothing(setup):
    db, tokens, c = setup
    item = c["ann"].next()
    assert c["ann"].label(item["id"], "left", SID).status_code == 200
    for item_id in (99999999999999999999999, -(2**63) - 1, 0):
        response = c["ann"].http.post("/api/undo", data=f'{{"item_id": {item_id}}}',
                                      headers=c["ann"].headers(**{"Content-Type": "application/json"}))
        assert response.status_code == 400 and "field 'item_id' out of range" in response.get_json()["error"]
    assert len(live_judgements(db)) == 1


def test_undo_with_no_open_item_and_slots_stay_within_n(tmp_path):
    db, tokens = make_db(tmp_path, pair_records(1), names=("ann", "bob"))
    c = clients(db, tokens, per_item=1)
    item = c["ann"].next()
    assert c["ann"].label(item["id"], "left", SID).status_code == 200
    assert c["ann"].next() is None and c["bob"].next() is None
    body = c["ann"].post("/api/undo", {"item_id": None}).get_json()
    assert body["item"]["id"] == item["id"]
    assert c["bob"].next() is None          # the reopened item still holds ann's slot


def test_single_mode_good_or_bad(tmp_path):
    records = [{"prompt": "p", "responses": ["r1", "r2", " "]}, {"prompt": "q", "responses": ["c"]}]
    db, tokens = make_db(tmp_path, records, mode="single")
    a = clients(db, tokens)["ann"]
    assert a.get("/api/session").get_json()["mode"] == "single"
    item = a.next()
    assert set(item) == {"id", "prompt", "response"} and item["response"] == [{"role": "assistant", "content": "r1"}]
    bad = a.label(item["id"], "left", SID)
    assert bad.status_code == 400 and "['good', 'bad'] in single mode" in bad.get_json()["error"]
    assert a.label(item["id"], "bad", SID).status_code == 200
    assert [r["choice"] for r in live_judgements(db)] == ["bad"]
    page = a.get("/").get_data(as_text=True)
    assert 'data-choice="good"' in page and 'data-choice="left"' not in page


def test_model_text_never_reaches_the_html_and_names_are_escaped(tmp_path):
    records = [{"prompt": HOSTILE[0], "chosen": HOSTILE[1], "rejected": "</textarea><script>x()</script>"}]
    db, tokens = make_db(tmp_path, records, names=("<b>eve</b>",))
    a = clients(db, tokens)["<b>eve</b>"]
    item = a.next()
    assert {item["left"][0]["content"], item["right"][0]["content"]} == {HOSTILE[1], "</textarea><script>x()</script>"}
    response = a.post("/api/next")
    assert response.mimetype == "application/json"      # text travels as JSON only, never HTML
    page = a.get("/").get_data(as_text=True)
    assert "onerror" not in page and "__xss" not in page and "x()" not in page
    assert "<b>eve</b>" not in page and "&lt;b&gt;eve&lt;/b&gt;" in page


def test_app_refuses_a_bad_per_item_and_a_database_without_items(tmp_path):
    db, tokens = make_db(tmp_path, pair_records(1))
    with pytest.raises(ValueError, match="--per-item 0: expected ≥ 1"):
        create_app(db, per_item=0)
    empty = storage.AnnotationDB(tmp_path / "empty.sqlite", create=True)
    with pytest.raises(ValueError, match="holds no items yet"):
        create_app(empty, per_item=1)
    assert json.loads(json.dumps(db.progress(1, 1))) == {"items": 1, "complete": 0, "labelled": 0, "remaining": 1}
