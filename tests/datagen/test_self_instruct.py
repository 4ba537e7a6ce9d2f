"""`posttrain data generate` (self-instruct): parsing, each filter and its counter, the dedupe
filter with planted near-duplicates, provenance, same seed → same file, resume after SIGTERM or
a torn write, bad inputs; on the tiny model's tokenizer with a scripted sampler, and one short
run through the real sampler."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import signal
from pathlib import Path

import pytest
from rouge_score.rouge_scorer import RougeScorer

from posttrain.cli import main
from posttrain.data import sft_messages
from posttrain.datagen import self_instruct
from posttrain.datagen.self_instruct import (BLOCKLIST, GenerateSettings, Task, check_candidate, generate_file,
                                             parse_task, render_prompt)
from posttrain.models.tiny import build_tiny_tokenizer
from posttrain.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread", "tiny_path")

GUIDELINES = "Write short, useful tasks for a text assistant."
SEEDS = [
    {"id": "s-sky", "instruction": "Explain why the sky is blue.", "output": "Air scatters blue light most."},
    {"id": "s-polite", "instruction": "Rewrite the sentence politely.", "input": "Give me that.",
     "output": "Could you pass me that, please?"},
    {"instruction": "List two ways to save water.", "output": "Shorter showers; fix leaks."},
    {"instruction": "Translate the word into French.", "input": "cat", "output": "chat"},
    {"instruction": "Add the two numbers together.", "input": "3 and 4", "output": "7"},
]
SETTINGS = GenerateSettings(examples=2, generated_examples=1, prompts_per_round=2, samples_per_prompt=2)
PARAMS = SamplingParams(max_new_tokens=40, temperature=0.7, seed=0)
WORDS = ("river apple engine violin garden pencil ladder marble cactus anchor lantern saddle comet velvet harbor "
         "tunnel meadow falcon pebble orchard cobalt glacier thimble walnut canyon beacon quartz ribbon sparrow "
         "timber").split()


def write_inputs(folder: Path, seeds: list = SEEDS, guidelines: str = GUIDELINES) -> tuple[Path, Path]:
    (folder / "guidelines.md").write_text(guidelines)
    (folder / "seeds.jsonl").write_text("".join(json.dumps(s) + "\n" for s in seeds))
    return folder / "guidelines.md", folder / "seeds.jsonl"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def scripted(texts):
    """A Complete returning `texts` in order (a text, or (text, finish reason)); records the prompts."""
    queue = list(texts)

    def complete(prompts, params):
        complete.prompts.append(prompts)
        out = [queue.pop(0) for _ in range(len(prompts) * params.n)]
        return [t if isinstance(t, tuple) else (t, "eos") for t in out]
    complete.prompts = []
    return complete


def hashed(kill_on_call: int | None = None):
    """A Complete whose every text is a function of (prompt tokens, sample, seed): a mix of novel
    tasks, near-duplicates of the prompt's first shown task, and each kind of bad output."""
    calls = []

    def complete(prompts, params):
        calls.append(1)
        if len(calls) == kill_on_call:
            os.kill(os.getpid(), signal.SIGTERM)  # the run must finish this round, then stop
        out = []
        for prompt in prompts:
            for j in range(params.n):
                key = hashlib.sha256(repr((prompt.input_ids, j, params.seed)).encode()).digest()
                rng = random.Random(key)
                kind = rng.random()
                words = " ".join(rng.sample(WORDS, 5))
                if kind < 0.55:
                    out.append((f" Describe {words} briefly.\nInput: <noinput>\nOutput: A {words}.", "eos"))
                elif kind < 0.7:
                    shown = build_tiny_tokenizer().decode(prompt.input_ids).split("Instruction: ")[1].split("\n")[0]
                    out.append((f" {shown.rstrip('.')} now.\nOutput: Done.", "eos"))
                elif kind < 0.8:
                    out.append((f" Describe {words}.\nOutput: cut", "length"))
                elif kind < 0.9:
                    out.append((f" Draw {words}.\nOutput: ok", "stop"))
                else:
                    out.append((f" {words}", "eos"))
        return out
    return complete


def generate(folder: Path, output: Path, complete, *, n: int = 6, seed: int = 0, settings=SETTINGS, **kw):
    guidelines, seeds = write_inputs(folder)
    params = SamplingParams(**{**PARAMS.__dict__, "seed": seed})
    return generate_file("tiny-random", str(guidelines), str(seeds), str(output), n=n, params=params,
                         settings=settings, precision="fp32", complete=complete, **kw)


# --- parsing and the filters, one at a time ---------------------------------------------------

def test_parse_task_reads_the_three_sections():
    assert parse_task("Instruction: Fix it.\nInput: teh cat\nOutput: the cat") == ("Fix it.", "teh cat", "the cat")
    # No input section, <noinput>, multi-line output, lower-case labels, and the next task cut off.
    assert parse_task("Instruction: List two.\nOutput: 1. a\n2. b") == ("List two.", "", "1. a\n2. b")
    assert parse_task("instruction: Say hi.\ninput: <noinput>\noutput: Hi!\n\nTask 4\nInstruction: x\nOutput: y") \
        == ("Say hi.", "", "Hi!")
    # A labelled line after "Output:" starts another task, which is cut off.
    assert parse_task("Instruction: Quote.\nOutput: He said hi.\n\nOutput:") == ("Quote.", "", "He said hi.")
    assert parse_task("Instruction: A.\nOutput: B\nInstruction: C\nOutput: D") == ("A.", "", "B")
    for text in ("Instruction: no output here", "Output: no instruction", "just text", "Output: x\nInstruction: y"):
        assert parse_task(text) is None, text


def test_render_prompt_shows_the_tasks_and_begins_the_next():
    tasks = [Task("a", "Do one thing now.", "", "Done."), Task("b", "Fix the word.", "teh", "the")]
    user, prefill = render_prompt(GUIDELINES, tasks)
    assert user.startswith(GUIDELINES)
    assert "Task 1\nInstruction: Do one thing now.\nInput: <noinput>\nOutput: Done." in user
    assert "Task 2\nInstruction: Fix the word.\nInput: teh\nOutput: the" in user and "Write task 3" in user
    assert prefill == "Task 3\nInstruction:"


@pytest.mark.parametrize("text, reason, expected", [
    (" Say hi to a friend.\nOutput: Hi!", "eos", None),
    (" Say hi to a friend.\nOutput: Hi!", "stop", None),
    (" Say hi to a friend.", "eos", "unparsable"),
    ("\nOutput: Hi!", "eos", "empty field"),
    (" Say hi to a friend.\nInput: x\nOutput:   ", "eos", "empty field"),
    (" Say hi to a friend.\nOutput: Hi and then some more", "length", "cut off at max_new_tokens"),
    (" Say hi.\nOutput: Hi!", "eos", "instruction length"),                   # 2 words < 4
    (" " + "word " * 151 + "\nOutput: Hi!", "eos", "instruction length"),   # 151 words > 150
    (" Describe the Image in one line.\nOutput: A cat.", "eos", "blocklisted word"),
    (" Tell me how to go to the station.\nOutput: Walk.", "eos", "blocklisted word"),
    (" Imagine a filed plotting mapmaker.\nOutput: Ok.", "eos", None),       # whole words only
])
def test_check_candidate_applies_each_filter(text, reason, expected):
    fields, why = check_candidate(text, reason, GenerateSettings())
    assert why == expected and (fields is None) == (expected is not None)


def test_blocklist_default_is_the_self_instruct_list():
    assert {"image", "images", "graph", "picture", "file", "files", "map", "draw", "plot", "go to", "video"} \
        <= set(BLOCKLIST)


# --- the loop: counters, dedupe, provenance ---------------------------------------------------

def test_each_filter_is_counted_and_planted_near_duplicates_are_dropped(tmp_path, capsys):
    planted = " Explain why the sky is blue today.\nOutput: Sunlight scatters."   # seed s-sky, one word added
    texts = [" Name three colours of the rainbow.\nOutput: Red, green, blue.",       # accepted: gen-0
             planted,                                                             # near-duplicate of a seed
             " Name three colors of the rainbow.\nOutput: Red.",                  # near-duplicate of gen-0, same round
             " Words without sections",                                           # unparsable
             (" Write a long story about a dragon.\nOutput: Once upon", "length"),  # cut off
             " Hi.\nOutput: Hello.",                                              # too short
             " Describe this picture of a dog.\nOutput: A dog.",                  # blocklisted
             "\nOutput: nothing asked",                                           # empty instruction
             " Suggest a name for a pet goldfish.\nOutput: Bubbles.",             # accepted: gen-1
             " Give one tip for learning to swim.\nOutput: Start in shallow water.",  # accepted: gen-2
             " Never looked at.\nOutput: unused", " Nor this one.\nOutput: unused"]
    out = tmp_path / "gen.jsonl"
    fake = scripted(texts)
    summary, stopped = generate(tmp_path, out, fake, n=3)
    assert stopped is None
    records = read_jsonl(out)
    assert [r["instruction"] for r in records] == ["Name three colours of the rainbow.",
                                                   "Suggest a name for a pet goldfish.",
                                                   "Give one tip for learning to swim."]
    assert summary.sampled == 12 and summary.accepted == 3 and summary.unused == 2 and summary.total == 3
    assert dict(summary.dropped) == {"near-duplicate": 2, "unparsable": 1, "cut off at max_new_tokens": 1,
                                     "instruction length": 1, "blocklisted word": 1, "empty field": 1}
    # The planted near-duplicates are above the threshold by rouge-score itself.
    scorer = RougeScorer(["rougeL"])
    assert scorer.score("Explain why the sky is blue.", "Explain why the sky is blue today.")["rougeL"].fmeasure >= 0.7
    assert scorer.score(records[0]["instruction"], "Name three colors of the rainbow.")["rougeL"].fmeasure >= 0.7
    assert all(r["self_instruct"]["rouge_l"] < 0.7 for r in records)
    err = capsys.readouterr().err
    assert "sampled 12 candidates" in err and "accepted 3" in err and "2 near-duplicate (20%)" in err
    assert "1 unparsable (10%)" in err and "2 of the last round unused" in err


def test_records_are_sft_records_with_provenance(tmp_path):
    out = tmp_path / "gen.jsonl"
    fake = hashed()
    generate(tmp_path, out, fake, n=6)
    records = read_jsonl(out)
    assert len(records) == 6
    seed_ids = {"s-sky", "s-polite", "seed-3", "seed-4", "seed-5"}
    for i, record in enumerate(records):
        assert sft_messages(record, source="gen.jsonl", index=i)[0]["role"] == "user"
        made = record["self_instruct"]
        assert made["id"] == f"gen-{i}" and made["model"] == "tiny-random" and made["template"] == "self-instruct-v1"
        assert made["sampling"] == {"n": 2, "max_new_tokens": 40, "temperature": 0.7, "top_p": 1.0, "top_k": 0,
                                    "stop_strings": ["\nTask 4"], "seed": 0, "precision": "fp32"}
        assert made["settings"]["rouge_threshold"] == 0.7 and len(made["guidelines_sha256"]) == 64
        # Shown: 2 distinct tasks, at most one generated, and only ones in the pool before this record.
        shown = made["shown"]
        assert len(set(shown)) == 2 and sum(s.startswith("gen-") for s in shown) <= 1
        assert all(s in seed_ids or int(s[4:]) < i for s in shown)
    assert any(s.startswith("gen-") for r in records[2:] for s in r["self_instruct"]["shown"])


def test_the_prompt_holds_guidelines_and_the_shown_tasks(tmp_path):
    fake = scripted([" Suggest a name for a pet goldfish.\nOutput: Bubbles."] + [" x"] * 3)
    generate(tmp_path, tmp_path / "gen.jsonl", fake, n=1)
    text = build_tiny_tokenizer().decode(fake.prompts[0][0].input_ids)
    assert text.startswith("<|im_start|>user\n" + GUIDELINES)
    assert text.endswith("<|im_start|>assistant\nTask 3\nInstruction:")
    shown = json.loads((tmp_path / "gen.jsonl").read_text())["self_instruct"]["shown"]
    by_id = {s.get("id", f"seed-{i}"): s for i, s in enumerate(SEEDS, start=1)}
    assert all(f"Instruction: {by_id[s]['instruction']}\n" in text for s in shown)


def test_same_seed_same_file_other_seed_other_file(tmp_path):
    paths = [tmp_path / name for name in ("a.jsonl", "b.jsonl", "c.jsonl")]
    for path, seed in zip(paths, (0, 0, 1)):
        generate(tmp_path, path, hashed(), n=6, seed=seed)
    assert paths[0].read_bytes() == paths[1].read_bytes() != paths[2].read_bytes()


# --- resuming ---------------------------------------------------------------------------------

def test_sigterm_then_rerun_gives_the_uninterrupted_file(tmp_path):
    whole, resumed = tmp_path / "whole.jsonl", tmp_path / "resumed.jsonl"
    generate(tmp_path, whole, hashed(), n=8)
    summary, stopped = generate(tmp_path, resumed, hashed(kill_on_call=3), n=8)
    assert stopped == signal.SIGTERM and summary.sampled == 3 * 4     # the third round still finished
    partial = read_jsonl(resumed)
    assert 0 < len(partial) < 8 and resumed.read_text() == whole.read_text()[: len(resumed.read_text())]
    summary, stopped = generate(tmp_path, resumed, hashed(), n=8)
    assert stopped is None and resumed.read_bytes() == whole.read_bytes()
    # Done: a third run changes nothing; nor does one allowed fewer attempts than the file used.
    summary, _ = generate(tmp_path, resumed, hashed(), n=8)
    assert summary.sampled == 0 and resumed.read_bytes() == whole.read_bytes()
    assert read_jsonl(whole)[-1]["self_instruct"]["round"] >= 1
    summary, _ = generate(tmp_path, resumed, hashed(), n=20, max_attempts=4)
    assert summary.sampled == 0 and resumed.read_bytes() == whole.read_bytes()


@pytest.mark.parametrize("cut", ["mid-line", "mid-round", "first-line"])
def test_a_torn_write_is_redone(tmp_path, cut):
    whole = tmp_path / "whole.jsonl"
    generate(tmp_path, whole, hashed(), n=8)
    lines = whole.read_text().splitlines(keepends=True)
    rounds = [json.loads(line)["self_instruct"]["round"] for line in lines]
    assert len(set(rounds)) >= 3
    if cut == "mid-line":
        text = "".join(lines[:-2]) + lines[-2][:17]
    elif cut == "mid-round":     # the last round present loses some lines but not all
        last = max(r for r in set(rounds) if rounds.count(r) >= 2)
        text = "".join(line for line, r in zip(lines, rounds) if r < last or line == lines[rounds.index(last)])
    else:
        text = lines[0][:5]
    resumed = tmp_path / "resumed.jsonl"
    resumed.write_text(text)
    generate(tmp_path, resumed, hashed(), n=8)
    assert resumed.read_bytes() == whole.read_bytes()


def test_more_records_later_continue_the_same_file(tmp_path):
    whole, grown = tmp_path / "whole.jsonl", tmp_path / "grown.jsonl"
    generate(tmp_path, whole, hashed(), n=9)
    generate(tmp_path, grown, hashed(), n=4)
    generate(tmp_path, grown, hashed(), n=9)
    assert grown.read_bytes() == whole.read_bytes()


def test_continuing_with_other_settings_is_refused(tmp_path):
    out = tmp_path / "gen.jsonl"
    generate(tmp_path, out, hashed(), n=3)
    with pytest.raises(ValueError, match=r"gen.jsonl: line 1: field 'self_instruct.sampling' .* use the same settings"):
        generate(tmp_path, out, hashed(), n=6, seed=1)
    with pytest.raises(ValueError, match=r"line 1: field 'self_instruct.settings'"):
        generate(tmp_path, out, hashed(), n=6, settings=dataclasses.replace(SETTINGS, rouge_threshold=0.5))
    out.write_text('{"prompt": "x", "completion": "y"}\n')
    with pytest.raises(ValueError, match="line 1: no string fields 'instruction'"):
        generate(tmp_path, out, hashed(), n=6)
    out.write_text("some notes without a newline")
    with pytest.raises(ValueError, match="last line is not the start of a record"):
        generate(tmp_path, out, hashed(), n=6)
    assert out.read_text() == "some notes without a newline"


# --- the command ------------------------------------------------------------------------------

def cli(tmp_path: Path, *flags: str, seeds: list = SEEDS, guidelines: str = GUIDELINES) -> list[str]:
    g, s = write_inputs(tmp_path, seeds, guidelines)
    return ["data", "generate", "--model", "tiny-random", "--guidelines", str(g), "--seed-tasks", str(s),
            "--output", str(tmp_path / "gen.jsonl"), "--examples", "2", "--prompts-per-round", "2",
            "--samples-per-prompt", "2", "--max-new-tokens", "40", "--precision", "fp32", *flags]


def test_cli_exit_codes_for_signal_and_too_few_attempts(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(self_instruct, "sampler_completions", lambda sampler: hashed(kill_on_call=1))
    assert main(cli(tmp_path, "--n", "50")) == 128 + signal.SIGTERM
    assert "stopped by signal 15" in capsys.readouterr().err
    monkeypatch.setattr(self_instruct, "sampler_completions", lambda sampler: hashed())
    assert main(cli(tmp_path, "--n", "50", "--max-attempts", "8")) == 1
    assert "stopped at --max-attempts=8 with" in capsys.readouterr().err
    assert main(cli(tmp_path, "--n", "2", "--max-attempts", "8")) == 0


@pytest.mark.parametrize("change, message", [
    ({"guidelines": "  \n"}, r"--guidelines .*guidelines.md: the file is empty"),
    ({"flags": ["--n", "0"]}, r"--n=0: expected at least 1 record"),
    ({"seeds": []}, r"seeds.jsonl: no records|seeds.jsonl.*empty"),
    ({"seeds": [SEEDS[0], {"instruction": "Say hi to me.", "input": "x"}]},
     r"seeds.jsonl: record 2: field 'output': missing"),
    ({"seeds": [SEEDS[0], {"instruction": 3, "output": "x"}]},
     r"seeds.jsonl: record 2: field 'instruction': expected a non-empty string"),
    ({"seeds": [SEEDS[0], {"instruction": "a", "output": "b", "id": "s-sky"}]},
     r"record 2: field 'id': 's-sky' is used twice"),
    ({"seeds": SEEDS[:1]}, r"--seed-tasks: 1 seed tasks; --examples=2 needs at least as many"),
    ({"flags": ["--rouge-threshold", "0"]}, r"--rouge-threshold=0.0 must be in \(0, 1\]"),
    ({"flags": ["--generated-examples", "3"]}, r"--generated-examples=3 must be in \[0, --examples=2\]"),
    ({"flags": ["--min-instruction-words", "10", "--max-instruction-words", "5"]},
     r"--max-instruction-words=5 must be ≥ --min-instruction-words=10$"),
    ({"flags": ["--blocklist", "/nonexistent/words.txt"]}, r"--blocklist /nonexistent/words.txt: no such file"),
    ({"flags": ["--max-new-tokens", "2000"]}, r"--max-new-tokens=2000: a prompt showing the 2 longest seed tasks"),
])
def test_bad_input_is_a_one_line_error_and_nothing_is_written(tmp_path, capsys, change, message):
    flags = ["--n", "3", *change.get("flags", [])]     # a later --n wins
    argv = cli(tmp_path, *flags, seeds=change.get("seeds", SEEDS), guidelines=change.get("guidelines", GUIDELINES))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert re.match(r"posttrain data( generate)?: error:", err) and len(err.splitlines()) == 1
    assert re.search(message, err), err
    assert not (tmp_path / "gen.jsonl").exists()


def test_invalid_json_seed_file_names_the_line(tmp_path, capsys):
    argv = cli(tmp_path, "--n", "3")
    (tmp_path / "seeds.jsonl").write_text(json.dumps(SEEDS[0]) + "\n{not json\n")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "seeds.jsonl" in err and "line 2" in err and not (tmp_path / "gen.jsonl").exists()


def test_an_empty_blocklist_file_is_refused(tmp_path, capsys):
    (tmp_path / "words.txt").write_text("# nothing\n\n")
    assert main(cli(tmp_path, "--n", "3", "--blocklist", str(tmp_path / "words.txt"))) == 2
    assert "no words in the file" in capsys.readouterr().err and not (tmp_path / "gen.jsonl").exists()


def test_a_real_run_through_the_sampler_on_the_tiny_model(tmp_path, capsys):
    """The tiny random model writes no parseable task, but every candidate goes through the real
    sampler, is counted, and the run stops after --max-attempts with exit code 1."""
    assert main(cli(tmp_path, "--n", "1", "--max-attempts", "4", "--max-new-tokens", "24")) == 1
    err = capsys.readouterr().err
    assert "sampled 4 candidates" in err and "dropped 4 unparsable (100%)" in err
    assert (tmp_path / "gen.jsonl").read_text() == ""


def test_the_shipped_seed_tasks_and_guidelines_pass_the_filters():
    """Every shipped seed task would itself be accepted: parseable, within the length limits, no
    blocklisted word, and no two instructions near-duplicates of each other."""
    root = Path(__file__).resolve().parents[2] / "examples" / "data"
    assert self_instruct.read_guidelines(str(root / "guidelines.md"))
    seeds = self_instruct.read_seed_tasks(str(root / "seed_tasks.jsonl"))
    assert len(seeds) >= 20 and len({t.id for t in seeds}) == len(seeds)
    settings = GenerateSettings()
    for task in seeds:
        text = f" {task.instruction}\nInput: {task.input or '<noinput>'}\nOutput: {task.output}"
        assert check_candidate(text, "eos", settings) == ((task.instruction, task.input, task.output), None), task.id
    scorer = RougeScorer(["rougeL"])
    for i, task in enumerate(seeds):
        score, _ = self_instruct.most_similar(task.instruction, seeds[:i], scorer)
        assert score < settings.rouge_threshold, task.id


# --- fresh-user findings --------------------------------------------------------------------

def test_max_attempts_is_an_exact_bound_and_a_larger_one_continues_to_the_same_file(tmp_path):
    """`--max-attempts 1` sampled a whole round (8 candidates) and 20 sampled 24: now the last
    round is cut to the attempts left, and its candidates are the first ones of the whole round."""
    summary, _ = generate(tmp_path, tmp_path / "one.jsonl", hashed(), n=50, max_attempts=1,
                          settings=GenerateSettings())
    assert summary.sampled == 1
    summary, _ = generate(tmp_path, tmp_path / "twenty.jsonl", hashed(), n=50, max_attempts=20,
                          settings=GenerateSettings())
    assert summary.sampled == 20  # 2 rounds of 2 prompts × 4 samples, then 4 of the third: its first prompt
    # SETTINGS: 4 candidates a round. 6 attempts = round 0 and half of round 1; a re-run with 12
    # ends with the file one run with 12 writes.
    whole, _ = generate(tmp_path, tmp_path / "whole.jsonl", hashed(), n=50, max_attempts=12)
    assert whole.sampled == 12
    cut, _ = generate(tmp_path, tmp_path / "resumed.jsonl", hashed(), n=50, max_attempts=6)
    assert cut.sampled == 6
    generate(tmp_path, tmp_path / "resumed.jsonl", hashed(), n=50, max_attempts=12)
    assert (tmp_path / "resumed.jsonl").read_bytes() == (tmp_path / "whole.jsonl").read_bytes()
    assert whole.accepted > 0


def test_a_cut_round_samples_the_first_prompts_whole_then_part_of_one(tmp_path):
    complete = scripted([" Name three rivers of Europe.\nOutput: Rhine, Danube, Seine.",
                         " Convert ten miles into kilometres.\nOutput: About 16 km.",
                         " Suggest a title for a cooking blog.\nOutput: Pan and Plate."])
    summary, _ = generate(tmp_path, tmp_path / "gen.jsonl", complete, n=50, max_attempts=3)
    # SETTINGS: 2 prompts × 2 samples; 3 attempts = prompt 1 whole, then 1 sample of prompt 2.
    assert [len(call) for call in complete.prompts] == [1, 1] and summary.sampled == 3
    assert complete.prompts[0][0].source_index == 0 and complete.prompts[1][0].source_index == 1
    assert [r["self_instruct"]["slot"] for r in read_jsonl(tmp_path / "gen.jsonl")] == [0, 1, 2]


def test_the_blocklist_file_is_not_overwritten_by_output(tmp_path, capsys):
    (tmp_path / "words.txt").write_text("banana\n")
    argv = cli(tmp_path, "--n", "3", "--blocklist", str(tmp_path / "words.txt"))
    argv[argv.index("--output") + 1] = str(tmp_path / "." / "words.txt")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"--output {tmp_path / '.' / 'words.txt'} is the --blocklist file itself")
    assert (tmp_path / "words.txt").read_text() == "banana\n"


def test_guidelines_in_latin1_or_a_folder_name_the_file(tmp_path, capsys):
    argv = cli(tmp_path, "--n", "3")
    (tmp_path / "l1gl.txt").write_bytes("caf\xe9 guidelines: write short tasks.".encode("latin-1"))  # 0xe9 at byte 3
    argv[argv.index("--guidelines") + 1] = str(tmp_path / "l1gl.txt")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert f"--guidelines {tmp_path / 'l1gl.txt'}: not UTF-8 text (invalid continuation byte at byte 3)" in err
    (tmp_path / "adir").mkdir()
    argv[argv.index("--guidelines") + 1] = str(tmp_path / "adir")
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().endswith(f"--guidelines {tmp_path / 'adir'}: is a folder; expected a "
                                                    "text file")
    assert not (tmp_path / "gen.jsonl").exists()


def test_a_prompt_past_the_model_is_one_line_without_the_transformers_warning(tmp_path, capfd, caplog):
    long_guidelines = " ".join(WORDS * 120)  # 3,600 words, past the tiny model's 2,048 positions
    assert main(cli(tmp_path, "--n", "3", guidelines=long_guidelines)) == 2
    err = capfd.readouterr().err.strip()
    # Under pytest the transformers logger's records land in caplog rather than on stderr.
    assert not [r for r in caplog.records if "Token indices sequence length" in r.getMessage()]
    assert "Token indices sequence length" not in err and len(err.splitlines()) == 1
    assert re.search(r"--max-new-tokens=40: a prompt showing the 2 longest seed tasks has \d+ tokens", err), err
