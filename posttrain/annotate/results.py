"""From labels to numbers and records: agreement (raw and Cohen's κ), the status summary, and
the majority-vote export.

Export, per item with at least `min_votes` labels: the label with strictly the most votes
wins (a plurality; a shared top count is a split vote). In pair mode a winning reply gives
`{prompt, chosen, rejected}`, the record `posttrain rm` and `posttrain dpo` read; a winning
"tie" or "both bad" gives no record — neither says which reply is better, and a pair of two
bad replies would teach the reward model a preference nobody expressed — and is counted. In
single mode a winning good / bad gives `{prompt, completion, label}`, what `posttrain kto`
reads. A split vote gives nothing and is counted. Every record carries
`annotation: {item, votes, comments, source}`, which the trainers ignore.

No `margin` is written: the trainers read a margin as a gap in reward units (Touvron et al.
2023 §3.2.2 took it from the annotators' own "significantly / slightly better" rating), and a
vote share measures how sure the annotators are, not how much better a reply is; anyone who
wants one can derive it from `annotation.votes`.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

from posttrain.annotate import plural
from posttrain.annotate.storage import PAIR_CHOICES, SINGLE_CHOICES, AnnotationDB

EXPORT_VOTE_NAMES = {"first": "chosen", "second": "rejected"}


def plurality(votes: Counter) -> str | None:
    """The label with strictly the most votes; None for no votes or a shared top count."""
    ranked = votes.most_common(2)
    if not ranked or (len(ranked) == 2 and ranked[0][1] == ranked[1][1]):
        return None
    return ranked[0][0]


def cohens_kappa(pairs: list[tuple[str, str]]) -> float:
    """Cohen's κ of two raters from their labels of the same items, `pairs` = [(rater 1's
    label, rater 2's label), ...] (Cohen 1960, "A coefficient of agreement for nominal
    scales", Eq. 1):

        κ = (p_o − p_e) / (1 − p_e),   p_o = (1/n) Σ_i [a_i = b_i],   p_e = Σ_k p_a(k) · p_b(k)

    p_o is the share of items labelled alike; p_e the share expected by chance when each rater
    labels independently with their own label frequencies p_a(k), p_b(k). NaN when p_e = 1 (both
    raters used one and the same label throughout: chance explains all agreement, κ is
    undefined); ValueError for no pairs."""
    if not pairs:
        raise ValueError("cohens_kappa: no labelled items")
    n = len(pairs)
    p_o = sum(a == b for a, b in pairs) / n
    first, second = Counter(a for a, _ in pairs), Counter(b for _, b in pairs)
    p_e = sum(first[k] * second[k] for k in first) / (n * n)
    return math.nan if p_e == 1.0 else (p_o - p_e) / (1.0 - p_e)


def agreement(labels_by_item: dict[int, dict[str, str]]) -> dict[str, Any]:
    """Agreement on the items labelled more than once; labels_by_item: item → {annotator: label}.

    raw: the share of label pairs on the same item (every two annotators of an item) that
    agree. kappa: Cohen's κ of every two annotators over the items both labelled, averaged
    over those annotator pairs weighted by their shared items — Light's (1971) mean of pairwise
    κ, weighted because here each pair shares a different number of items. A pair whose κ is
    undefined (NaN: one label throughout) is left out of the mean and counted. None where
    nothing was labelled twice."""
    multi = {item: labels for item, labels in labels_by_item.items() if len(labels) > 1}
    same = total = 0
    shared: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    for labels in multi.values():
        for a, b in combinations(sorted(labels), 2):
            same += labels[a] == labels[b]
            total += 1
            shared[(a, b)].append((labels[a], labels[b]))
    kappas = {pair: cohens_kappa(rows) for pair, rows in shared.items()}
    defined = {pair: k for pair, k in kappas.items() if not math.isnan(k)}
    weight = sum(len(shared[pair]) for pair in defined)
    return {
        "items": len(multi),
        "label_pairs": total,
        "raw": same / total if total else None,
        "kappa": sum(k * len(shared[pair]) for pair, k in defined.items()) / weight if weight else None,
        "annotator_pairs": len(defined),
        "annotator_pairs_undefined": len(kappas) - len(defined),
    }


def _votes(db: AnnotationDB) -> tuple[dict[int, dict[str, str]], dict[int, list[str]]]:
    """item → {annotator name: choice}, item → non-empty comments."""
    labels: dict[int, dict[str, str]] = defaultdict(dict)
    comments: dict[int, list[str]] = defaultdict(list)
    for row in db.live_judgements():
        labels[row["item_id"]][row["name"]] = row["choice"]
        if row["comment"].strip():
            comments[row["item_id"]].append(row["comment"])
    return labels, comments


def status(db: AnnotationDB) -> dict[str, Any]:
    """Progress, labels per annotator, agreement and the share of each choice, as plain data.
    mode is None (and choices empty) while the database holds no items."""
    mode, per_item = db.mode, db.per_item or 1
    labels, _ = _votes(db)
    items = db.items()
    counts = [len(labels.get(row["id"], {})) for row in items]
    per_annotator = Counter(name for item_labels in labels.values() for name in item_labels)
    choices = Counter(choice for item_labels in labels.values() for choice in item_labels.values())
    n_labels = sum(choices.values())
    summary = {
        "db": str(db.path), "mode": mode, "per_item": per_item, "items": len(items),
        "complete": sum(c >= per_item for c in counts), "started": sum(0 < c < per_item for c in counts),
        "unlabelled": sum(c == 0 for c in counts), "labels": n_labels,
        "annotators": {name: per_annotator.get(name, 0) for name in db.annotators()},
        "choices": {c: choices.get(c, 0) for c in {"pair": PAIR_CHOICES, "single": SINGLE_CHOICES, None: ()}[mode]},
        "agreement": agreement(labels),
    }
    if mode == "pair":
        summary["tie_share"] = choices["tie"] / n_labels if n_labels else None
        summary["both_bad_share"] = choices["both_bad"] / n_labels if n_labels else None
        given = [row["id"] for row in items if json.loads(row["source"]).get("given") == "first"]
        decided = [plurality(Counter(labels[i].values())) for i in given if i in labels]
        summary["verified"] = {"pairs": len(given), "decided": sum(d in ("first", "second") for d in decided),
                               "agree": sum(d == "first" for d in decided)}
    return summary


def format_status(s: dict[str, Any]) -> str:
    """The status as the lines `posttrain annotate status` prints."""
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    if s["mode"] is None:
        return (f"{s['db']}: no items yet (`posttrain annotate serve --db {s['db']} --data FILE` loads them)\n"
                "annotators: " + (", ".join(s["annotators"]) or "none yet"))
    lines = [f"{s['db']}: {s['mode']} mode, {plural(s['per_item'], 'label')} wanted per item",
             f"items: {s['items']} — {s['complete']} complete, {s['started']} started, {s['unlabelled']} unlabelled",
             f"labels: {s['labels']} — " + ", ".join(f"{c} {n}" for c, n in s["choices"].items())]
    if s["mode"] == "pair":
        lines.append(f"share of ties: {pct(s['tie_share'])}, of both bad: {pct(s['both_bad_share'])}")
    lines.append("per annotator: " + (", ".join(f"{name} {n}" for name, n in s["annotators"].items()) or "none yet"))
    a = s["agreement"]
    if a["items"]:
        kappa = "n/a" if a["kappa"] is None else f"{a['kappa']:.3f}"
        lines.append(f"agreement on {plural(a['items'], 'item')} labelled more than once: raw {pct(a['raw'])} of "
                     f"{plural(a['label_pairs'], 'label pair')}; Cohen's kappa {kappa} (mean over "
                     f"{plural(a['annotator_pairs'], 'annotator pair')}, weighted by shared items; "
                     f"{a['annotator_pairs_undefined']} undefined)")
    else:
        lines.append("agreement: no item labelled more than once yet")
    v = s.get("verified")
    if v and v["pairs"]:
        lines.append(f"pairs from a preference file: {v['pairs']}; the majority picked a reply on {v['decided']}, "
                     f"the file's chosen one on {v['agree']}")
    return "\n".join(lines)


LEFT_OUT_SINGULAR = {"split votes": "split vote", "ties by majority": "tie by majority"}
"""ExportSummary.left_out's reasons that read differently after a count of 1."""


@dataclass
class ExportSummary:
    items: int = 0
    written: int = 0
    left_out: Counter = field(default_factory=Counter)

    def left_out_text(self) -> str:
        if not self.left_out:
            return "no items"
        return "left out " + ", ".join(f"{n} {LEFT_OUT_SINGULAR.get(why, why) if n == 1 else why}"
                                       for why, n in self.left_out.most_common())

    def line(self, output: str) -> str:
        text = (f"wrote {plural(self.written, 'record')} to {output} from {plural(self.items, 'item')} "
                "(majority vote)")
        return text + (f"; {self.left_out_text()}" if self.left_out else "")


def _prompt_value(messages: list[dict[str, str]]) -> str | list[dict[str, str]]:
    """A lone user turn as its text, as most preference files write it; else the conversation."""
    return messages[0]["content"] if len(messages) == 1 else messages


def _reply_value(messages: list[dict[str, str]]) -> str | list[dict[str, str]]:
    return messages[0]["content"] if len(messages) == 1 else messages


def export_records(db: AnnotationDB, *, min_votes: int = 1) -> tuple[list[dict], ExportSummary]:
    """The records the labels give (module docstring), in item order, and the summary."""
    if min_votes < 1:
        raise ValueError(f"--min-votes {min_votes}: expected ≥ 1")
    mode = db.mode
    labels, comments = _votes(db)
    out, summary = [], ExportSummary()
    for row in db.items():
        summary.items += 1
        votes = Counter(labels.get(row["id"], {}).values())
        n = sum(votes.values())
        if n == 0:
            summary.left_out["unlabelled"] += 1
            continue
        if n < min_votes:
            summary.left_out[f"with fewer than {min_votes} votes"] += 1
            continue
        winner = plurality(votes)
        if winner is None:
            summary.left_out["split votes"] += 1
            continue
        if winner in ("tie", "both_bad"):
            summary.left_out[f"{'ties' if winner == 'tie' else 'both bad'} by majority"] += 1
            continue
        prompt, replies = json.loads(row["prompt"]), json.loads(row["replies"])
        annotation = {"item": row["id"], "votes": None, "comments": comments.get(row["id"], []),
                      "source": json.loads(row["source"])}
        if mode == "pair":
            chosen = PAIR_CHOICES.index(winner)
            annotation["votes"] = {EXPORT_VOTE_NAMES["first"]: votes[winner],
                                   EXPORT_VOTE_NAMES["second"]: votes[PAIR_CHOICES[1 - chosen]],
                                   "tie": votes["tie"], "both_bad": votes["both_bad"]}
            out.append({"prompt": _prompt_value(prompt), "chosen": _reply_value(replies[chosen]),
                        "rejected": _reply_value(replies[1 - chosen]), "annotation": annotation})
        else:
            annotation["votes"] = {"good": votes["good"], "bad": votes["bad"]}
            out.append({"prompt": _prompt_value(prompt), "completion": _reply_value(replies[0]),
                        "label": winner == "good", "annotation": annotation})
    summary.written = len(out)
    return out, summary
