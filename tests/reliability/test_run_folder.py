"""Run folders (issue 15 §2 and §3): a finished or different run is never replaced unasked, a
run that fails before training leaves its folder as it was, the final model is written whole
or not at all (its trained state kept as a checkpoint when the save fails), and --resume
accepts only a checkpoint of the same run, then drops the metric rows logged after it."""

from __future__ import annotations

import errno
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from posttrain.config import (DPOConfig, GRPOConfig, KTOConfig, PPOConfig, RMConfig, SFTConfig, build_config,
                              to_yaml)
from posttrain.recipes import run_recipe
from posttrain.trainers import dpo, grpo, kto, ppo, reward, sft
from posttrain.trainers.run_folder import (FINAL_TMP, FINGERPRINT, FINISHED, config_differences, data_fingerprint,
                                           run_config, trim_rows)

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[2]


def lowercase(prompts, responses):
    """Toy reward for the RL trainers: share of lowercase characters."""
    return [sum(c.islower() for c in r) / max(len(r), 1) for r in responses]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def words(n: int) -> list[str]:
    g = torch.Generator().manual_seed(0)
    return ["".join(chr(97 + int(c)) for c in torch.randint(0, 26, (int(k),), generator=g))
            for k in torch.randint(2, 8, (n,), generator=g)]


def sft_config(tmp_path: Path, name: str = "run", data: Path | None = None, **kw) -> SFTConfig:
    data = data or write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"reverse {w}", "completion": w[::-1]}
                                                     for w in words(16)])
    base = dict(model="tiny-random", data=str(data), output_dir=str(tmp_path / name), precision="fp32", lr=1e-3,
                warmup_ratio=0.0, lr_scheduler="constant", max_length=64, max_steps=3, batch_size=4)
    base.update(kw)
    return build_config(SFTConfig, None, base)


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- §2: a finished run is not replaced unasked


def test_the_same_sft_run_twice_is_refused_and_overwrite_replaces_it(tmp_path):
    # Issue 15 §2: the same `posttrain sft … --output-dir o` twice (save_steps 0) replaced the
    # first model, metrics and config silently.
    out = sft.train(sft_config(tmp_path))
    before = snapshot(out)
    assert json.loads((out / FINISHED).read_text())["step"] == 3
    with pytest.raises(ValueError, match="already holds a finished run; pass --overwrite"):
        sft.train(sft_config(tmp_path))
    assert snapshot(out) == before
    again = sft.train(sft_config(tmp_path, lr=1e-2, overwrite=True))
    assert [r["step"] for r in metrics(again)] == [1, 2, 3]            # the old rows are gone
    assert load_file(str(again / "model.safetensors")).keys() == load_file(str(tmp_path / "run" / "model.safetensors")).keys()
    assert yaml.safe_load((again / "config.yaml").read_text())["lr"] == 1e-2
    # The saved config switches nothing destructive on when it is used again with --config.
    assert yaml.safe_load((again / "config.yaml").read_text())["overwrite"] is False


def test_a_folder_holding_any_model_or_the_start_of_another_run_is_refused(tmp_path, tiny_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}] * 4)
    model = shutil.copytree(tiny_path, tmp_path / "model")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"already holds a model \(config.json\); pass --overwrite"):
        sft.train(sft_config(tmp_path, data=data, output_dir=str(model)))
    with pytest.raises(ValueError, match="is the folder of the model it trains"):
        sft.train(sft_config(tmp_path, data=data, model=str(model), output_dir=str(model), overwrite=True))
    assert snapshot(model) == before
    started = tmp_path / "started"        # killed before its first checkpoint: config and a few rows
    started.mkdir()
    (started / "config.yaml").write_text(to_yaml(run_config(sft_config(tmp_path, "started", data=data, lr=5e-4))))
    write_jsonl(started / "metrics.jsonl", [{"step": 0, "eval/loss": 9.0}, {"step": 1, "loss/train": 9.0}])
    with pytest.raises(ValueError, match=r"holds the start of another run \(it differs in lr \(0.0005 → 0.001\)\)"):
        sft.train(sft_config(tmp_path, "started", data=data))
    # The same run started again (no checkpoint to resume) is simply restarted.
    (started / "config.yaml").write_text(to_yaml(run_config(sft_config(tmp_path, "started", data=data))))
    write_jsonl(started / "metrics.jsonl", [{"step": 1, "loss/train": 9.0}, {"step": 2, "loss/train": 9.0}])
    assert [r["step"] for r in metrics(sft.train(sft_config(tmp_path, "started", data=data)))] == [1, 2, 3]
    # One that failed before its first step (a reward function's error, say) holds nothing to keep:
    # the corrected run replaces it.
    failed = tmp_path / "failed"
    failed.mkdir()
    (failed / "config.yaml").write_text(to_yaml(run_config(sft_config(tmp_path, "failed", data=data, lr=5e-4))))
    write_jsonl(failed / "metrics.jsonl", [{"step": 0, "eval/loss": 9.0}])
    assert [r["step"] for r in metrics(sft.train(sft_config(tmp_path, "failed", data=data)))] == [1, 2, 3]
    assert yaml.safe_load((failed / "config.yaml").read_text())["lr"] == 1e-3


def test_a_folder_of_other_files_is_trained_into_with_a_note_and_they_stay(tmp_path, capsys):
    # a fresh user's finding: `--output-dir ~/notes` put a model among their files without a word
    out = tmp_path / "notes"
    out.mkdir()
    for name in ("a.txt", "b.txt", "c.txt", "d.txt"):
        (out / name).write_text(name)
    sft.train(sft_config(tmp_path, "notes"))
    assert (f"note: {out} already holds 4 file(s) or folder(s) no posttrain run wrote (a.txt, b.txt, c.txt and 1 "
            "more); this run's files go beside them") in capsys.readouterr().out
    assert (out / "a.txt").read_text() == "a.txt" and (out / FINISHED).is_file()
    sft.train(sft_config(tmp_path, "notes", overwrite=True))      # a run folder now: no note again
    assert "no posttrain run wrote" not in capsys.readouterr().out
    # Names a run writes, held by a folder no run wrote, are the user's: refused, nothing touched
    # (a fresh user's finding: clear_run deleted their checkpoints/ and samples.jsonl).
    theirs = tmp_path / "theirs"
    (theirs / "checkpoints").mkdir(parents=True)
    (theirs / "checkpoints" / "my_model.pt").write_text("precious")
    (theirs / "samples.jsonl").write_text('{"mine": 1}\n')
    (theirs / "tokenizer.json").write_text("{}")
    before = snapshot(theirs)
    with pytest.raises(ValueError, match=r"holds checkpoints, samples.jsonl, tokenizer.json, which no posttrain run "
                                         r"wrote and this run would replace; pass --overwrite"):
        sft.train(sft_config(tmp_path, "theirs"))
    assert snapshot(theirs) == before


def test_an_output_dir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        sft.train(sft_config(tmp_path, "file"))


# ---------------------------------------------------------------- §2: nothing is touched before everything is checked


def trainer_cases(tmp_path: Path):
    """(train, config) for every trainer, each with LoRA on modules the model lacks: it fails
    after data, judges and the base model have loaded, when the adapters are added."""
    ws = words(8)
    sft_data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": w, "completion": w[::-1]} for w in ws])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": w, "chosen": w[::-1], "rejected": w + w} for w in ws])
    labelled = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": w, "completion": w[::-1], "label": i % 2 == 0}
                                                    for i, w in enumerate(ws)])
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": w} for w in ws])
    common = dict(model="tiny-random", precision="fp32", max_steps=1, batch_size=2, lora_r=4,
                  lora_target_modules="no_such_module")
    rl = dict(max_new_tokens=4, rollout_batch_size=2, max_length=32)
    return {
        "sft": (sft.train, SFTConfig, dict(data=str(sft_data), max_length=64)),
        "rm": (reward.train, RMConfig, dict(data=str(pairs), max_length=64)),
        "dpo": (dpo.train, DPOConfig, dict(data=str(pairs), max_length=64)),
        "kto": (kto.train, KTOConfig, dict(data=str(labelled), max_length=64)),
        "ppo": (ppo.train, PPOConfig, dict(data=str(prompts), reward_fn=f"{__name__}:lowercase", **rl)),
        "grpo": (grpo.train, GRPOConfig, dict(data=str(prompts), judges=f"fn:{__name__}:lowercase",
                                              num_generations=2, **rl)),
    }, common


@pytest.mark.parametrize("kind", ["sft", "rm", "dpo", "kto", "ppo", "grpo"])
def test_a_run_that_fails_before_training_leaves_its_folder_as_it_was(tmp_path, kind):
    # Issue 15 §2: PPO checked data, reward function and models only after preparing the folder
    # (old metrics.jsonl deleted, config.yaml rewritten). Every trainer now writes nothing
    # before its models are built.
    cases, common = trainer_cases(tmp_path)
    train, cls, values = cases[kind]
    cfg = build_config(cls, None, {**common, **values, "output_dir": str(tmp_path / kind)})
    out = Path(cfg.output_dir)
    out.mkdir()
    (out / "config.yaml").write_text(to_yaml(run_config(cfg)))          # the start of this same run
    (out / FINGERPRINT).write_text(json.dumps(data_fingerprint(cfg)))
    write_jsonl(out / "metrics.jsonl", [{"step": 1, "loss/train": 1.0}])
    before = snapshot(out)
    with pytest.raises(ValueError, match="no_such_module|No modules were targeted"):
        train(cfg)
    assert snapshot(out) == before


@pytest.mark.parametrize("change, message", [
    ({"reward_fn": "no_such_module_here:score"}, "no_such_module_here"),
    # --judges' spelling is read too, not doubled into "fn:fn:..." (a fresh user's finding).
    ({"reward_fn": "fn:no_such_module_here:score"}, r"^fn:no_such_module_here:score: cannot import 'no_such_module_here'"),
    ({"data": "missing.jsonl"}, "missing.jsonl"),
])
def test_ppo_with_a_bad_judge_or_data_leaves_its_folder_as_it_was(tmp_path, change, message):
    cases, common = trainer_cases(tmp_path)
    _, cls, values = cases["ppo"]
    cfg = build_config(cls, None, {**common, **values, "lora_r": 0, "output_dir": str(tmp_path / "ppo"), **change})
    out = Path(cfg.output_dir)
    out.mkdir()
    write_jsonl(out / "metrics.jsonl", [{"step": 1}])
    (out / "config.yaml").write_text("old: config\n")
    before = snapshot(out)
    with pytest.raises((ValueError, FileNotFoundError, ImportError), match=message):
        ppo.train(cfg)
    assert snapshot(out) == before


# ---------------------------------------------------------------- §2: the final save


def test_a_full_disk_during_the_final_save_keeps_the_trained_state_and_resume_finishes(tmp_path, monkeypatch):
    # Issue 15 §2: a full disk during the final save lost every trained step and left a folder
    # with a config and no weights. Now: no partial model in the folder, a checkpoint of step 3,
    # and the resumed run saves exactly the weights the uninterrupted run saves.
    whole = sft.train(sft_config(tmp_path, "whole"))
    real_save = sft.save_model

    def full_disk(model, tokenizer, out, **kw):
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "model.safetensors").write_bytes(b"half a model")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sft, "save_model", full_disk)
    cfg = sft_config(tmp_path, "cut")
    with pytest.raises(ValueError, match=r"saving the final model failed \(\[Errno 28\] No space left on device\); "
                                         r"the trained state of step 3 is kept in .*checkpoint-0000003\. "
                                         r"Finish with: posttrain sft --config .*config.yaml --resume"):
        sft.train(cfg)
    out = Path(cfg.output_dir)
    assert not (out / "model.safetensors").exists() and not (out / FINISHED).exists()
    assert not (out / FINAL_TMP).exists()
    assert (out / "checkpoints" / "checkpoint-0000003" / "trainer_state.json").is_file()
    monkeypatch.setattr(sft, "save_model", real_save)
    resumed = sft.train(build_config(SFTConfig, str(out / "config.yaml"), {"resume": True}))
    assert [r["step"] for r in metrics(resumed)] == [1, 2, 3]
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- §3: --resume checks what it is given


def test_resume_refuses_a_checkpoint_of_another_run_and_keeps_the_config(tmp_path):
    # Issue 15 §3: a changed --lr, another --data, another --batch-size or --max-steps below the
    # checkpoint's step were accepted (the lr silently ignored, step-3 weights saved as final).
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"reverse {w}", "completion": w[::-1]} for w in words(16)])
    out = sft.train(sft_config(tmp_path, data=data, max_steps=4, save_steps=3))
    (out / FINISHED).unlink()                                           # as if killed after step 3
    (out / "model.safetensors").unlink()
    saved = (out / "config.yaml").read_bytes()

    def resume(**kw):
        return sft.train(sft_config(tmp_path, **{"data": data, "max_steps": 4, "save_steps": 3, "resume": True, **kw}))

    with pytest.raises(ValueError, match=r"differs in lr \(0\.001 → 0\.01\)\. Resume with its settings"):
        resume(lr=1e-2)
    with pytest.raises(ValueError, match=r"differs in batch_size \(4 → 2\), lr \(0\.001 → 0\.01\)"):
        resume(lr=1e-2, batch_size=2)
    other = write_jsonl(tmp_path / "other.jsonl", [{"prompt": "x", "completion": "y"}] * 16)
    with pytest.raises(ValueError, match=r"differs in data \('.*other.jsonl': sha256:"):
        resume(data=other)
    with pytest.raises(ValueError, match=r"max_steps=2 is below the step of .*checkpoint-0000003 \(3\)"):
        resume(max_steps=2)
    with pytest.raises(ValueError, match=r"differs in max_steps \(4 → 0\)"):
        resume(max_steps=0, epochs=1.0)
    with pytest.raises(ValueError, match="--resume and --overwrite contradict"):
        resume(overwrite=True)
    assert (out / "config.yaml").read_bytes() == saved                  # a failed resume rewrites nothing
    # The same data moved elsewhere is the same run; more steps and other cadences are allowed.
    moved = tmp_path / "moved.jsonl"
    moved.write_bytes(data.read_bytes())
    done = resume(data=moved, max_steps=5, logging_steps=1, save_steps=2)
    assert [r["step"] for r in metrics(done)] == [1, 2, 3, 4, 5]
    assert yaml.safe_load((done / "config.yaml").read_text())["max_steps"] == 5


def test_resume_refuses_another_process_count(tmp_path):
    out = sft.train(sft_config(tmp_path, max_steps=2, save_steps=1))
    state_path = out / "checkpoints" / "checkpoint-0000001" / "trainer_state.json"
    state = json.loads(state_path.read_text())
    assert state["world_size"] == 1 and state["fingerprint"]["data"].startswith("sha256:")
    state_path.write_text(json.dumps({**state, "world_size": 2}))
    with pytest.raises(ValueError, match=r"differs in processes \(2 → 1\)"):
        sft.train(sft_config(tmp_path, max_steps=2, save_steps=1, resume=True))


def test_kill_9_then_resume_leaves_no_duplicate_metric_rows(tmp_path, spawn):
    # Issue 15 §3: after kill -9 and resume, metrics.jsonl held the rows between the checkpoint
    # and the kill twice.
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"reverse {w}", "completion": w[::-1]} for w in words(24)])
    steps = 40
    whole = sft.train(sft_config(tmp_path, "whole", data=data, max_steps=steps, batch_size=2, save_steps=4))
    out = tmp_path / "cut"
    cmd = [sys.executable, "-m", "posttrain.cli", "sft", "--model", "tiny-random", "--data", str(data),
           "--output-dir", str(out), "--precision", "fp32", "--lr", "1e-3", "--warmup-ratio", "0",
           "--lr-scheduler", "constant", "--max-length", "64", "--max-steps", str(steps), "--batch-size", "2",
           "--save-steps", "4"]
    proc = spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    log = out / "metrics.jsonl"
    deadline = time.time() + 120
    while not (log.is_file() and len(log.read_text().splitlines()) >= 6):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() else "timeout"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    logged = [json.loads(line)["step"] for line in log.read_text().splitlines() if line.endswith("}")]
    checkpoint = int(sorted((out / "checkpoints").glob("checkpoint-???????"))[-1].name.split("-")[1])
    assert logged[-1] < steps, "the run finished before the kill"
    resumed = sft.train(build_config(SFTConfig, str(out / "config.yaml"), {"resume": True}))
    rows = metrics(resumed)
    assert [r["step"] for r in rows] == list(range(1, steps + 1)), (logged, checkpoint)
    for x, y in zip(metrics(whole), rows):
        assert y["loss/train"] == pytest.approx(x["loss/train"], abs=1e-6), x["step"]


def test_trim_rows_keeps_rows_up_to_the_step_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "eval/x": 1}\n{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    assert trim_rows(path, 2) == 2                                     # step 3 and the torn step-4 line
    assert path.read_text() == '{"step": 0, "eval/x": 1}\n{"step": 1}\n{"step": 2}\n'
    assert trim_rows(path, 2) == 0 and trim_rows(tmp_path / "none.jsonl", 2) == 0


def test_config_differences_lists_what_changes_the_run_and_ignores_the_safe_keys():
    saved = {"lr": 1e-3, "data": "a.jsonl", "max_steps": 10, "save_steps": 5, "report_to": "none", "seed": 0}
    fp = {"data": "sha256:aa", "eval_data": ""}
    same_safe = {**saved, "max_steps": 20, "save_steps": 1, "report_to": "tensorboard", "data": "moved.jsonl"}
    assert config_differences(saved, same_safe, fp, fp) == []
    changed = {**saved, "lr": 2e-3, "seed": 1, "extra": True}
    assert config_differences(saved, changed, fp, {"data": "sha256:bb", "eval_data": ""}) == [
        "extra ('(absent)' → True)", "lr (0.001 → 0.002)", "seed (0 → 1)", "data ('a.jsonl': sha256:aa → sha256:bb)"]
    # Without a saved fingerprint (an older checkpoint) the data is compared by name.
    assert config_differences(saved, {**saved, "data": "b.jsonl"}, None, fp) == ["data ('a.jsonl' → 'b.jsonl')"]


# ---------------------------------------------------------------- recipes


def test_a_recipe_reruns_a_trainer_stage_that_has_no_checkpoint_and_no_done(tmp_path):
    # A stage killed before its first checkpoint (or after its model, before DONE) is run again:
    # the recipe replaces its partial run rather than tripping over it.
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": w, "completion": w[::-1]} for w in words(8)])
    raw = {"output_dir": str(tmp_path / "out"), "defaults": {"precision": "fp32", "batch_size": 2},
           "stages": [{"name": "sft", "kind": "sft", "model": "tiny-random", "data": str(data), "max_steps": 2}]}
    run_recipe(raw, echo=lambda line: None)
    folder = next((tmp_path / "out").glob("sft-*"))
    (folder / "DONE").unlink()
    lines: list[str] = []
    run_recipe(raw, echo=lines.append)
    assert "resumed in" in lines[0] and (folder / "DONE").is_file()
    assert [r["step"] for r in metrics(folder)] == [1, 2]
    assert (folder / "stage.yaml").is_file() and (folder / FINISHED).is_file()
