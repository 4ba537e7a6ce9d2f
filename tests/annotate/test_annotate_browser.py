"""The page in headless Chromium (Selenium): log in by the personal link, label one item by
clicking and one by keyboard, undo the second, and find exactly that in the database; hostile
model text shows as text and runs nothing; a screenshot goes to test-artifacts/annotate.png."""

from __future__ import annotations

import threading

import pytest
import waitress
from annotate_helpers import HOSTILE, make_db

from posttrain.annotate.app import create_app

LONG = "\n\n".join(f"Paragraph {i}: " + "a fairly long sentence that wraps across the column " * 4 for i in range(12))
RECORDS = [
    {"prompt": "Explain what a list comprehension is.",
     "chosen": "A list comprehension builds a list from an iterable in one expression.\n\n"
               "It reads like set-builder notation:\n\n```python\nsquares = [x * x for x in range(10)]\n```\n\n"
               "Use `if` at the end to filter.",
     "rejected": "It is a loop."},
    {"prompt": "Reply with some HTML. " + HOSTILE[0],
     "chosen": HOSTILE[0] + "\n\nAnd an image: " + HOSTILE[1] + "\n\n```html\n<b>not bold</b>\n```",
     "rejected": LONG},
    {"prompt": "third", "chosen": "yes", "rejected": "no"},
]


@pytest.fixture
def served(tmp_path):
    """The app on a free loopback port, served by waitress in a thread."""
    db, tokens = make_db(tmp_path, RECORDS, names=("ann",))
    server = waitress.create_server(create_app(db, per_item=1), host="127.0.0.1", port=0, threads=4)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    yield db, f"http://127.0.0.1:{server.effective_port}/?token={tokens['ann']}"
    server.close()   # stops listening; the daemon thread idles on Chromium's kept-alive connection


def test_label_by_click_and_by_keyboard_then_undo(served, browser, artifacts_dir):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    db, link = served
    wait = WebDriverWait(browser, 15)
    shown = lambda: browser.find_element(By.TAG_NAME, "body").get_attribute("data-item")  # noqa: E731
    browser.get(link)
    wait.until(lambda _: shown() == "1")
    assert "token" not in browser.current_url            # the link's token left the address bar
    assert browser.get_cookie("posttrain_annotate")["httpOnly"] is True

    # Item 1: readable rendering — paragraphs, a code block in <pre>, inline code.
    replies = {side: browser.find_element(By.ID, f"reply-{side}") for side in ("left", "right")}
    good_side = "left" if "list from an iterable" in replies["left"].text else "right"
    good = replies[good_side]
    assert len(good.find_elements(By.TAG_NAME, "p")) == 3
    assert good.find_element(By.CSS_SELECTOR, "pre code").text == "squares = [x * x for x in range(10)]"
    assert good.find_element(By.CSS_SELECTOR, "p code").text == "if"

    # Label item 1 by clicking: pick the good reply, then save.
    browser.find_element(By.CSS_SELECTOR, f'#choices button[data-choice="{good_side}"]').click()
    assert browser.find_element(By.CSS_SELECTOR, f'button[data-choice="{good_side}"]').get_attribute(
        "aria-pressed") == "true"
    browser.find_element(By.ID, "submit").click()
    wait.until(lambda _: shown() == "2")
    assert "Saved item 1." in browser.find_element(By.ID, "status").text

    # Item 2 holds hostile text: it shows as text, creates no element and runs nothing.
    page_text = browser.find_element(By.ID, "replies").text + browser.find_element(By.ID, "prompt").text
    assert HOSTILE[0] in page_text and HOSTILE[1] in page_text
    assert browser.execute_script("return document.querySelectorAll('main img, main script').length") == 0
    assert browser.execute_script("return window.__xss === undefined")
    long_reply = browser.find_element(By.CSS_SELECTOR, ".reply:not(:empty)")
    scrollable = browser.execute_script(
        "const r = [...document.querySelectorAll('.reply')].find(e => e.textContent.includes('Paragraph 11'));"
        "return [r.scrollHeight > r.clientHeight, getComputedStyle(r).overflowY];")
    assert scrollable == [True, "auto"] and long_reply is not None

    # Label item 2 by keyboard: 2 (the right-hand reply), then Enter.
    body = browser.find_element(By.TAG_NAME, "body")
    body.send_keys("2")
    assert browser.find_element(By.CSS_SELECTOR, 'button[data-choice="right"]').get_attribute("aria-pressed") == "true"
    body.send_keys(Keys.ENTER)
    wait.until(lambda _: shown() == "3")

    # Undo: item 2 comes back with its choice picked again.
    browser.find_element(By.ID, "undo").click()
    wait.until(lambda _: shown() == "2")
    assert "Undid your label of item 2" in browser.find_element(By.ID, "status").text
    assert browser.find_element(By.CSS_SELECTOR, 'button[data-choice="right"]').get_attribute("aria-pressed") == "true"
    browser.save_screenshot(str(artifacts_dir / "annotate.png"))
    logs = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"
            and "favicon" not in entry["message"]]
    assert not logs, logs          # no CSP violation, no script error
    browser.execute_script("const s = document.createElement('script'); s.textContent = 'window.__inline = 1';"
                           "document.body.appendChild(s);")
    assert browser.execute_script("return window.__inline === undefined")   # the CSP refuses inline script
    assert any("Content Security Policy" in entry["message"] for entry in browser.get_log("browser"))

    rows = db.read().execute("SELECT item_id, left_reply, choice, undone FROM judgements ORDER BY id").fetchall()
    assert [(r["item_id"], r["choice"], r["undone"] is None) for r in rows] == [
        (1, "first", True),                                              # the good reply is replies[0]
        (2, "first" if rows[1]["left_reply"] == 1 else "second", False)]  # "right" mapped through the stored side
    assert db.read().execute("SELECT item_id FROM assignments").fetchall()[0][0] == 2
