"""What `posttrain eval` writes and `posttrain report` reads, kept apart from both so the report
can be rendered without importing the eval run's model code."""

import html
import os
from pathlib import Path

FORMAT = "posttrain-eval/1"
"""eval.json's "format"; `posttrain report` refuses a file of another."""

SHOWCASE_PROMPT = "Explain the moon landing to a 6 year old in a few sentences."
"""The notes' example prompt: every evaluated model answers it too, and the report opens with the answers."""


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder renamed into place, so a
    reader never sees half a file and a failed write leaves the old one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _interval(pair) -> str:
    return f"[{pair[0]:.2f}, {pair[1]:.2f}]"


def markdown_table(result: dict) -> str:
    """The console table of an eval.json dict."""
    judge = result["judge"]
    used = ("TOOK PART in building the training data or rewards: not independent evidence"
            if judge["used_in_training"] else "took no part in training")
    decoding = ("greedy" if result["sampling"]["temperature"] == 0
                else f"temperature {result['sampling']['temperature']:g}")
    lines = [f"judge {judge['spec']} ({used}); {result['prompts']} prompts × {result['n_samples']} "
             f"answer{'s' if result['n_samples'] > 1 else ''}, {decoding}; intervals: {result['intervals']}", "",
             f"| model | win rate vs {cell(result['baseline']['label'])} | LC win rate | W / T / L | mean score | "
             f"KL(model‖{cell(result['baseline']['label'])}) | length (tokens) | EOS rate |",
             "|---|---|---|---|---|---|---|---|"]
    for row in [*result["models"], result["baseline"]]:
        c = row["vs_baseline"]
        if c is None:
            cells = [f"{cell(row['label'])} (baseline)", "—", "—", "—"]
            kl = "—"
        else:
            cells = [cell(row["label"]), f"{c['win_rate']:.2f} {_interval(c['win_interval'])}",
                     f"{c['lc_win_rate']:.2f} {_interval(c['lc_interval'])}",
                     f"{c['wins']} / {c['ties']} / {c['losses']}"]
            kl = "—" if c["kl"] is None else f"{c['kl']:.3g} ± {c['kl_standard_error']:.2g}"
        cells += ["—" if row["mean_score"] is None else f"{row['mean_score']:.3g}", kl,
                  f"{row['mean_length_tokens']:.1f}", f"{row['eos_rate']:.0%}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cell(text: str) -> str:
    """Text as one markdown table cell. Markdown viewers render inline HTML: a model's "<script>"
    (or a label's) must stay text, and a "|" must not end the cell."""
    escaped = html.escape(text, quote=False).replace("|", "\\|").replace("\n", "<br>")
    return escaped or "(empty)"


def side_by_side(result: dict) -> str:
    """A markdown table: each prompt, then each model's first answer (the baseline's first)."""
    labels = [result["baseline"]["label"], *(m["label"] for m in result["models"])]
    lines = ["| prompt | " + " | ".join(map(cell, labels)) + " |", "|---" * (len(labels) + 1) + "|"]
    for row in result["samples"]:
        lines.append(f"| {cell(row['prompt'])} | " + " | ".join(cell(row["answers"][l][0]) for l in labels) + " |")
    return "\n".join(lines)

