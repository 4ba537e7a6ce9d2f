// The annotation page. Model text is only ever put on the page with textContent /
// createTextNode, never as HTML, so a reply holding <script> or <img onerror> shows as text.
"use strict";

(() => {
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const mode = document.querySelector('meta[name="annotate-mode"]').content;
  const $ = (id) => document.getElementById(id);
  const choiceButtons = Array.from(document.querySelectorAll("#choices button"));
  let item = null;      // the item on screen, as /api/next gave it
  let choice = null;    // the picked choice ("left", "right", "tie", "both_bad" / "good", "bad")
  let busy = false;     // a request is in flight: ignore further keys and clicks
  let pending = null;   // the last unsaved submit, resent with the same submit_id on retry

  // The personal link carries the token in ?token=; the server has set the cookie, so drop it
  // from the address bar and history.
  if (location.search) history.replaceState(null, "", location.pathname);

  function newSubmitId() {
    const bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);  // unlike randomUUID, also there outside secure contexts
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  async function api(path, body) {
    const response = await fetch(path, {
      method: "POST", credentials: "same-origin", cache: "no-store",
      headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf},
      body: JSON.stringify(body || {}),
    });
    let data = null;
    try { data = await response.json(); } catch (e) { data = null; }
    if (!response.ok) throw new Error((data && data.error) || `HTTP ${response.status}`);
    return data;
  }

  // Text with ``` fences: fenced lines go in <pre><code>, the rest in paragraphs split at blank
  // lines (single line breaks kept by CSS), `inline code` in <code>.
  function appendInline(parent, text) {
    text.split(/(`[^`\n]+`)/).forEach((part, i) => {
      if (i % 2 === 1) {
        const code = document.createElement("code");
        code.textContent = part.slice(1, -1);
        parent.appendChild(code);
      } else if (part) {
        parent.appendChild(document.createTextNode(part));
      }
    });
  }

  function renderText(container, text) {
    let paragraph = [], code = null;
    const flush = () => {
      if (paragraph.length) {
        const p = document.createElement("p");
        appendInline(p, paragraph.join("\n"));
        container.appendChild(p);
      }
      paragraph = [];
    };
    for (const line of text.split("\n")) {
      if (line.trimStart().startsWith("```")) {
        if (code === null) {
          flush();
          code = [];
        } else {
          const pre = document.createElement("pre"), inner = document.createElement("code");
          inner.textContent = code.join("\n");
          pre.appendChild(inner);
          container.appendChild(pre);
          code = null;
        }
      } else if (code !== null) {
        code.push(line);
      } else if (line.trim() === "") {
        flush();
      } else {
        paragraph.push(line);
      }
    }
    if (code !== null) {  // an unclosed fence (a reply cut off mid-block) still shows as code
      const pre = document.createElement("pre"), inner = document.createElement("code");
      inner.textContent = code.join("\n");
      pre.appendChild(inner);
      container.appendChild(pre);
    }
    flush();
  }

  function renderMessages(container, messages, withRoles) {
    container.replaceChildren();
    for (const message of messages) {
      const turn = document.createElement("div");
      turn.className = `turn ${message.role}`;
      if (withRoles) {
        const role = document.createElement("div");
        role.className = "role";
        role.textContent = message.role;
        turn.appendChild(role);
      }
      renderText(turn, message.content);
      container.appendChild(turn);
    }
  }

  function setStatus(text, isError) {
    $("status").textContent = text;
    $("status").className = isError ? "error" : "";
  }

  function showProgress(p) {
    $("progress").textContent =
      `${p.labelled} labelled by you · ${p.remaining} left for you · ${p.complete}/${p.items} items complete`;
  }

  function pick(value) {
    choice = value;
    for (const b of choiceButtons) b.setAttribute("aria-pressed", String(b.dataset.choice === value));
    $("submit").disabled = !(item && choice);
  }

  function show(data, previous) {
    item = data.item;
    showProgress(data.progress);
    const none = item === null;
    for (const id of ["prompt-box", "replies", "choices", "comment", "submit"]) $(id).hidden = none;
    $("done").hidden = !none;  // undo stays reachable after the last item
    $("comment").value = previous ? previous.comment : "";
    pick(previous ? previous.choice : null);
    if (none) return;
    const roles = item.prompt.length > 1;
    renderMessages($("prompt"), item.prompt, roles);
    if (mode === "pair") {
      renderMessages($("reply-left"), item.left, item.left.length > 1);
      renderMessages($("reply-right"), item.right, item.right.length > 1);
      $("reply-left").scrollTop = 0;
      $("reply-right").scrollTop = 0;
    } else {
      renderMessages($("reply-single"), item.response, item.response.length > 1);
      $("reply-single").scrollTop = 0;
    }
    document.body.dataset.item = String(item.id);  // for tests and screen readers' context
  }

  async function run(task) {
    if (busy) return;
    busy = true;
    document.body.classList.add("busy");
    try { await task(); } finally {
      busy = false;
      document.body.classList.remove("busy");
    }
  }

  const loadNext = () => run(async () => {
    try { show(await api("/api/next")); } catch (e) { setStatus(`Could not load the next item: ${e.message}`, true); }
  });

  const submit = () => run(async () => {
    if (!item || !choice) return;
    const comment = $("comment").value;
    const same = pending && pending.item_id === item.id && pending.choice === choice && pending.comment === comment;
    const body = same ? pending : {submit_id: newSubmitId(), item_id: item.id, choice, comment};
    pending = body;
    setStatus("Saving…");
    try {
      await api("/api/label", body);
    } catch (e) {
      setStatus(`Not saved: ${e.message}. Press Enter to retry.`, true);
      return;
    }
    pending = null;
    setStatus(`Saved item ${body.item_id}.`);
    try { show(await api("/api/next")); } catch (e) { setStatus(`Saved; could not load the next item: ${e.message}`, true); }
  });

  const undo = () => run(async () => {
    try {
      const data = await api("/api/undo", {item_id: item ? item.id : null});
      pending = null;
      show(data, data.undone);
      setStatus(`Undid your label of item ${data.undone.item_id}; label it again.`);
    } catch (e) {
      setStatus(`Could not undo: ${e.message}`, true);
    }
  });

  for (const b of choiceButtons) b.addEventListener("click", () => pick(b.dataset.choice));
  $("submit").addEventListener("click", submit);
  $("undo").addEventListener("click", undo);
  document.addEventListener("keydown", (event) => {
    if (event.altKey || event.metaKey || event.isComposing) return;
    const inText = event.target instanceof HTMLTextAreaElement;
    if (event.key === "Enter" && !event.repeat && (!inText || event.ctrlKey)) {
      event.preventDefault();
      submit();
      return;
    }
    if (inText || event.ctrlKey) return;
    const button = choiceButtons.find((b) => b.dataset.key === event.key);
    if (button && item) {
      event.preventDefault();
      pick(button.dataset.choice);
    } else if (event.key === "u" || event.key === "U") {
      event.preventDefault();
      undo();
    }
  });

  loadNext();
})();
