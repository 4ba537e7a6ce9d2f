"""`posttrain data template`: every shipped template renders on a record of its task; slot,
syntax and sandbox errors name what they should; the same seed gives the same file; phrasings
spread evenly; sources from CSV and a `save_to_disk` folder with a ClassLabel column."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from posttrain.cli import main
from posttrain.data import sft_messages
from posttrain.datagen.templates import instruction_pairs, load_template_file, load_templates, parse_fields

pytestmark = pytest.mark.usefixtures("one_thread")

LIBRARY = load_templates()

# One record per shipped task, and the texts its prompt and completion must show.
RECORDS = {
    "translation": ({"source_language": "English", "target_language": "German", "source": "Germany",
                     "target": "Deutschland"}, "Germany", "Deutschland"),
    "summarization": ({"text": "The council met on Monday and voted to open the library on Sundays.",
                       "summary": "Library to open on Sundays."}, "voted to open", "Library to open on Sundays"),
    "qa": ({"context": "Marie Curie was born in Warsaw in 1867.", "question": "Where was Marie Curie born?",
            "answer": "Warsaw"}, "born in Warsaw in 1867", "Warsaw"),
    "closed_book_qa": ({"question": "What is the capital of France?", "answer": "Paris"}, "capital of France",
                       "Paris"),
    "sentiment": ({"text": "A dull, joyless film.", "label": "negative"}, "joyless", "negative"),
    "topic": ({"text": "The striker scored twice in the final.", "label": 1}, "scored twice", "Sports"),
    "entailment": ({"premise": "A man plays a guitar on stage.", "hypothesis": "A person makes music.",
                    "label": 0}, "plays a guitar", "entailment"),
    "paraphrase": ({"text": "The meeting was put off.", "paraphrase": "The meeting was postponed."},
                   "put off", "postponed"),
    # Already an instruction (Flan's and Aya's inputs/targets): written as it is, one way.
    "instruction": ({"instruction": "Name a prime number.", "response": "7"}, "Name a prime number.", "7"),
}
AS_IS = {"instruction"}
SHIPPED = [(task.name, t.id) for task in LIBRARY.values() for t in task.templates]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def template(tmp_path: Path, *flags: str) -> tuple[int, Path]:
    out = tmp_path / "pairs.jsonl"
    out.unlink(missing_ok=True)  # so that `not out.exists()` after a failed run means nothing was written
    return main(["data", "template", *flags, "--output", str(out)]), out


def test_the_library_covers_every_task_kind_with_five_phrasings_or_more():
    assert set(LIBRARY) == set(RECORDS)
    for task in LIBRARY.values():
        ids = [t.id for t in task.templates]
        if task.name in AS_IS:
            assert ids == ["as_is"]
            continue
        assert len(ids) >= 5, task.name
        # A short-answer and a full-sentence phrasing in every task.
        assert {"short_answer", "full_sentence"} <= set(ids), task.name
        if task.options:  # classification: some phrasing lists every option in the prompt
            record = RECORDS[task.name][0]
            prompts = [p["prompt"] for p in instruction_pairs([record], task, per_record=len(ids))]
            assert any(all(o in p for o in task.options) for p in prompts), task.name


@pytest.mark.parametrize("task_name, template_id", SHIPPED)
def test_every_shipped_template_renders_on_a_record_of_its_task(task_name, template_id):
    task = LIBRARY[task_name]
    record, shown, answer = RECORDS[task_name]
    (pair,) = [p for p in instruction_pairs([record], task, per_record=len(task.templates))
               if p["template"]["id"] == template_id]
    assert shown in pair["prompt"] and answer in pair["completion"]
    assert "{{" not in pair["prompt"] + pair["completion"] and "{%" not in pair["prompt"]
    assert pair["template"] == {"task": task_name, "id": template_id, "source_index": 0}
    # What `posttrain sft` reads: a user turn and the assistant's answer.
    assert sft_messages(pair, source="t", index=0) == [{"role": "user", "content": pair["prompt"]},
                                                       {"role": "assistant", "content": pair["completion"]}]


def test_the_same_seed_gives_the_same_file_and_another_seed_another(tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", [dict(RECORDS["closed_book_qa"][0], answer=str(i)) for i in range(50)])
    files = []
    for seed in ("3", "3", "4"):
        out = tmp_path / f"out{len(files)}.jsonl"
        assert main(["data", "template", "--source", str(data), "--task", "closed_book_qa", "--seed", seed,
                     "--output", str(out)]) == 0
        files.append(out.read_bytes())
    assert files[0] == files[1] and files[0] != files[2]


def test_phrasings_spread_evenly_over_records():
    task = LIBRARY["translation"]
    record = RECORDS["translation"][0]
    pairs = instruction_pairs([record] * 1400, task, seed=0)
    counts = {t.id: 0 for t in task.templates}
    for p in pairs:
        counts[p["template"]["id"]] += 1
    # 1400 draws over 7 phrasings: 200 each expected, sd ≈ √(1400·1/7·6/7) ≈ 13; ±30% is over 4 sd.
    assert all(140 <= n <= 260 for n in counts.values()), counts
    # --per-record 3: three different phrasings of each record, next to each other.
    triples = instruction_pairs([record] * 20, task, per_record=3, seed=0)
    assert len(triples) == 60
    for i in range(20):
        group = triples[3 * i: 3 * i + 3]
        assert {p["template"]["source_index"] for p in group} == {i}
        assert len({p["template"]["id"] for p in group}) == 3


def test_a_missing_slot_names_the_template_the_slot_and_the_record(tmp_path):
    records = [RECORDS["qa"][0], {"context": "c", "answer": "a"}]
    data = write_jsonl(tmp_path / "qa.jsonl", records)
    code, out = template(tmp_path, "--source", str(data), "--task", "qa")
    assert code == 2 and not out.exists()
    with pytest.raises(ValueError, match=r"qa.jsonl: record 2: template 'qa/\w+' needs slot 'question', which "
                                         r"the record lacks \(its fields: answer, context\); map a column"):
        instruction_pairs(records, LIBRARY["qa"], source=str(data))
    # An empty answer would be an empty completion, which `posttrain sft` refuses: caught here.
    with pytest.raises(ValueError, match=r"record 1: template 'qa/\w+': completion renders empty"):
        instruction_pairs([dict(RECORDS["qa"][0], answer=" ")], LIBRARY["qa"], per_record=6)


def test_fields_map_slots_to_columns_and_dotted_paths(tmp_path):
    squad = {"context": "Paris is in France.", "question": "Where is Paris?",
             "answers": {"text": ["France", "in France"], "answer_start": [12, 9]}}
    data = write_jsonl(tmp_path / "squad.jsonl", [squad])
    code, out = template(tmp_path, "--source", str(data), "--task", "qa", "--fields", "answer=answers.text.0")
    assert code == 0 and "France" in read_jsonl(out)[0]["completion"]
    # A mapping to a column the record lacks: one line, nothing written.
    code, out = template(tmp_path, "--source", str(data), "--task", "qa", "--fields", "answer=answer_text")
    assert code == 2 and not out.exists()
    with pytest.raises(ValueError, match=r"record 1: template 'qa/\w+' needs slot 'answer'.*--fields "
                                         r"answer=answer_text names no column of it"):
        instruction_pairs([squad], LIBRARY["qa"], fields={"answer": "answer_text"})
    with pytest.raises(ValueError, match="task 'qa' has no slot 'document'; its slots: answer, context, question"):
        instruction_pairs([squad], LIBRARY["qa"], fields={"document": "context"})
    with pytest.raises(ValueError, match="'answer' is not SLOT=COLUMN"):
        parse_fields("answer")


def test_an_unknown_task_lists_the_known_ones(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "x"}])
    code, out = template(tmp_path, "--source", str(data), "--task", "sentiments")
    assert code == 2 and not out.exists()
    err = capsys.readouterr().err
    assert "unknown task 'sentiments'" in err and "known tasks: closed_book_qa, entailment, instruction, paraphrase" in err
    assert len(err.strip().splitlines()) == 1


def test_an_empty_source_is_a_one_line_error(tmp_path, capsys):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    code, out = template(tmp_path, "--source", str(data), "--task", "sentiment")
    assert code == 2 and not out.exists()
    assert capsys.readouterr().err.strip().endswith("empty.jsonl: no records")


def test_a_template_syntax_error_names_the_file_and_line(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text('tasks:\n  greet:\n    templates:\n      - id: hello\n        prompt: |\n'
                    '          Say hello to {{ name }}\n          and to {{ friend | }}.\n          Bye.\n'
                    '        completion: "Hello {{ name }}"\n')
    # File line 7 holds the filter with no name: the block's second line.
    with pytest.raises(ValueError, match=r"mine.yaml: line 7: template 'greet/hello' prompt: Jinja2 syntax error: "
                                         r"expected token 'name'"):
        load_template_file(path)
    path.write_text('tasks:\n  greet:\n    templates:\n      - id: hello\n        prompt: "Hi {{ name }"\n'
                    '        completion: x\n')
    with pytest.raises(ValueError, match=r"mine.yaml: line 5 \(line 1 of the string\): template 'greet/hello' "
                                         r"prompt: Jinja2 syntax error"):
        load_template_file(path)
    path.write_text("tasks:\n  greet:\n    templates: [\n")
    with pytest.raises(ValueError, match=r"mine.yaml: line 4: not valid YAML"):
        load_template_file(path)
    path.write_text('tasks:\n  greet:\n    templates:\n      - {id: a, prompt: x, completion: y, answer: z}\n')
    with pytest.raises(ValueError, match=r"template 1: keys \['answer', 'completion', 'id', 'prompt'\]; expected"):
        load_template_file(path)


def test_a_user_template_file_renders_in_the_sandbox(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        "tasks:\n  greet:\n    templates:\n"
        "      - id: hello\n        prompt: 'Greet {{ name | upper }}.'\n        completion: 'Hello, {{ name }}!'\n"
        "  escape:\n    templates:\n"
        "      - id: mro\n        prompt: \"{{ name.__class__.__mro__ }}\"\n        completion: x\n")
    tasks = load_template_file(path)
    data = write_jsonl(tmp_path / "names.jsonl", [{"name": "Ada"}])
    code, out = template(tmp_path, "--source", str(data), "--task", "greet", "--templates", str(path))
    assert code == 0
    assert [(r["prompt"], r["completion"]) for r in read_jsonl(out)] == [("Greet ADA.", "Hello, Ada!")]
    # The sandbox refuses the dunder walk that reaches Python's internals; the error names template and record.
    with pytest.raises(ValueError, match=r"names.jsonl: record 1: template 'escape/mro': prompt \(.*mine.yaml: "
                                         r"line 10 \(line 1 of the string\)\): SecurityError"):
        instruction_pairs([{"name": "Ada"}], tasks["escape"], source=str(data))
    with pytest.raises(ValueError, match=r"--per-record 2: expected 1 to 1"):
        instruction_pairs([{"name": "Ada"}], tasks["greet"], per_record=2)
    # A task the user file lacks: the known tasks are the file's.
    code, out = template(tmp_path, "--source", str(data), "--task", "sentiment", "--templates", str(path))
    assert code == 2 and not out.exists()


def test_csv_and_a_saved_dataset_with_integer_class_labels(tmp_path):
    import datasets

    reviews = [("What a delight from start to end.", 1), ("Two hours I will never get back.", 0)] * 3
    features = datasets.Features({"review": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    datasets.Dataset.from_dict({"review": [r for r, _ in reviews], "label": [y for _, y in reviews]},
                               features=features).save_to_disk(str(tmp_path / "imdb_like"))
    code, out = template(tmp_path, "--source", str(tmp_path / "imdb_like"), "--task", "sentiment",
                         "--fields", "text=review", "--per-record", "2")
    assert code == 0
    rows = read_jsonl(out)
    assert len(rows) == 12
    for row in rows:
        text, label = reviews[row["template"]["source_index"]]
        assert text in row["prompt"] and ["negative", "positive"][label] in row["completion"]
        assert ["positive", "negative"][label] not in row["completion"]
    csv_file = tmp_path / "pairs.csv"
    csv_file.write_text("sentence,reworded\nThe meeting was put off.,The meeting was postponed.\n")
    code, out = template(tmp_path, "--source", str(csv_file), "--task", "paraphrase",
                         "--fields", "text=sentence,paraphrase=reworded")
    assert code == 0 and "postponed" in read_jsonl(out)[0]["completion"]
    with pytest.raises(ValueError, match=r"record 1: slot 'label': 2 is no index into the 2 options"):
        instruction_pairs([{"text": "x", "label": 2}], LIBRARY["sentiment"])



# --- fresh-user findings --------------------------------------------------------------------

def test_output_may_not_be_the_template_file(tmp_path, capsys):
    """`--templates ok3.yaml --output ok3.yaml` exited 0 and replaced the YAML."""
    yaml_text = 'tasks:\n  greet:\n    templates:\n      - {id: a, prompt: "Hi {{ name }}", completion: "Hello"}\n'
    (tmp_path / "ok3.yaml").write_text(yaml_text)
    data = write_jsonl(tmp_path / "names.jsonl", [{"name": "Ada"}])
    code = main(["data", "template", "--source", str(data), "--task", "greet",
                 "--templates", str(tmp_path / "ok3.yaml"), "--output", str(tmp_path / "." / "ok3.yaml")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.endswith(f"--output {tmp_path / '.' / 'ok3.yaml'} is the --templates file itself")
    assert (tmp_path / "ok3.yaml").read_text() == yaml_text


RUNTIME = [
    ("{{ 1/0 }}", r"ZeroDivisionError: division by zero"),
    ("{{ text + 1 }}", r"TypeError: can only concatenate str"),
    ("{% for i in range(100000000) %}{{ i }}{% endfor %}", r"SecurityError: the loops' ranges give more than 1000000"),
    # Each range is small, together they are 10^10 iterations.
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{{ text }}",
     r"SecurityError: the loops' ranges give more than 1000000"),
    ("{{ text * 100000000 }}", r"SecurityError: '\*' would make 200000000 items"),
    ("{{ 9 ** 100000000 }}", r"SecurityError: '\*\*' would make a number"),
    # Caught between chunks of output, outside the template's code: the template's entry (line 7) is named.
    ("{% for i in range(90000) %}{{ text }}{{ text }}{{ text }}{{ text }}{{ text }}{{ text }}{% endfor %}",
     r"line 7\): SecurityError: the text passes 1000000 characters"),
]


@pytest.mark.parametrize("prompt, message", RUNTIME)
def test_a_runtime_error_in_a_template_is_one_line_naming_file_line_template_and_record(tmp_path, capsys, prompt,
                                                                                         message):
    """{{ 1/0 }}, {{ text + 1 }} and a huge range were "internal error … (run again with --debug)", exit 1."""
    path = tmp_path / "bad.yaml"
    path.write_text("tasks:\n  t:\n    templates:\n      - id: ok\n        prompt: '{{ text }}'\n"
                    "        completion: x\n      - id: broken\n        prompt: |\n          Read this.\n"
                    f"          {prompt}\n        completion: x\n")
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, {"text": "hi"}])
    code, out = template(tmp_path, "--source", str(data), "--task", "t", "--templates", str(path), "--per-record", "2")
    err = capsys.readouterr().err.strip()
    assert code == 2 and not out.exists() and len(err.splitlines()) == 1
    # File line 10 is the block's second line, the one with the failing expression.
    if not message.startswith("line"):
        message = r"line 10\): " + message
    assert re.search(rf"d.jsonl: record 1: template 't/broken': prompt \(.*bad.yaml: {message}", err), err


def test_labels_outside_the_options_and_values_that_are_no_text_are_refused(tmp_path, capsys):
    """{"text":"ok","label":"neutral"} wrote completion "neutral"; "label": true wrote "True";
    "text": {"a": 1} wrote a Python repr."""
    sentiment = LIBRARY["sentiment"]
    cases = [({"text": "ok", "label": "neutral"},
              r"record 1: slot 'label': 'neutral' is not one of the 2 options \['negative', 'positive'\] nor an "
              r"index into them"),
             ({"text": "ok", "label": True}, r"record 1: slot 'label' \(column 'label'\): expected a string or a "
                                             r"number, got boolean True"),
             ({"text": {"a": 1}, "label": "positive"},
              r"record 1: slot 'text' \(column 'text'\): expected a string or a number, got object \{'a': 1\}"),
             ({"text": "ok", "label": 5}, r"record 1: slot 'label': 5 is no index into the 2 options")]
    for record, message in cases:
        data = write_jsonl(tmp_path / "s.jsonl", [record])
        code, out = template(tmp_path, "--source", str(data), "--task", "sentiment")
        err = capsys.readouterr().err.strip()
        assert code == 2 and not out.exists() and len(err.splitlines()) == 1
        assert re.search(message, err), err
    # The options' own names and integer indices still render.
    pairs = instruction_pairs([{"text": "ok", "label": "positive"}, {"text": "ok", "label": 0}], sentiment)
    assert "positive" in pairs[0]["completion"] and "negative" in pairs[1]["completion"]
    with pytest.raises(ValueError, match=r"slot 'options' \(column 'options'\): expected a non-empty list of strings"):
        instruction_pairs([{"text": "ok", "label": "a", "options": "a or b"}], sentiment)


def test_a_null_field_is_called_null_and_an_empty_fields_entry_is_an_error(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"record 1: template 'sentiment/\w+' needs slot 'text', but the record's "
                                         r"'text' is null; map a column"):
        instruction_pairs([{"text": None, "label": "positive"}], LIBRARY["sentiment"])
    data = write_jsonl(tmp_path / "r.jsonl", [{"review": "Fine.", "stars": "positive"}])
    code, out = template(tmp_path, "--source", str(data), "--task", "sentiment", "--fields", "text=review,,label=stars")
    err = capsys.readouterr().err.strip()
    assert code == 2 and not out.exists()
    assert err.endswith("--fields 'text=review,,label=stars': entry 2 is empty; expected SLOT=COLUMN,SLOT=COLUMN")
    with pytest.raises(ValueError, match="entry 2 is empty"):
        parse_fields("text=review,")
    assert parse_fields("") == {} and parse_fields(" text = review ") == {"text": "review"}


def test_the_summary_counts_in_the_singular(tmp_path, capsys):
    data = write_jsonl(tmp_path / "one.jsonl", [{"text": "Fine.", "label": "positive"}])
    code, out = template(tmp_path, "--source", str(data), "--task", "sentiment")
    assert code == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"read 1 record from {data}; wrote 1 instruction pair (task sentiment, 1 phrasing: ")
    # --output replaces an existing file.
    out.write_text("old\n")
    assert template(tmp_path, "--source", str(data), "--task", "sentiment")[0] == 0
    assert read_jsonl(out)[0]["template"]["source_index"] == 0
