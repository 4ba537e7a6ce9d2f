"""How a run ends: a signal (checkpoint, then exit 128+signal), an error (the last completed
step kept as a checkpoint), or its last step (the final model saved, or kept as a checkpoint
when that save fails)."""

from __future__ import annotations

import random
import shutil
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from posttrain.config import TrainConfig
from posttrain.trainers import sharding
from posttrain.trainers.common import RunLog, global_sum
from posttrain.trainers.run_folder import (CHECKPOINT_PREFIX, FINAL_TMP, checkpoints, save_checkpoint,
                                           save_final_model)


# ---------------------------------------------------------------- signals


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps, and keeps the last
    completed step for an error.

    On a signal the loop writes a checkpoint and exits with 128+signal, so a preempted job never
    loses more than the step in flight and a shell pipeline does not treat it as success. On an
    exception inside `installed()` (a reward function that raises at iteration 500, a record the
    collator cannot take), the state of the last step passed to `step_done` is saved as a checkpoint
    before the error goes on, so --resume continues from it once the cause is fixed; when
    save_steps already wrote it, it is named instead. Not when the optimizer has stepped since
    (an error between PPO's or GRPO's minibatch updates): the weights are then of no step. Nor on
    several processes: one process's error leaves the others inside a collective, where saving
    would hang.
    """

    def __init__(self, accelerator: Accelerator | None = None, cfg: TrainConfig | None = None, command: str = "",
                 optimizer=None):
        self.signum: int | None = None
        self.accelerator, self.cfg, self.command, self.optimizer = accelerator, cfg, command, optimizer
        self.done: tuple[int, float | None, dict | None] | None = None

    def _handler(self, signum, frame):
        if self.signum is not None:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.signum = signum

    def step_done(self, step: int, extra: dict | None = None) -> None:
        """Step `step` (1-based) has made its last update of the weights (`extra`: the trainer's
        own state a checkpoint of it keeps, as save_checkpoint takes it)."""
        self.done = (step, self._updates(), extra)
        # The random states as the step left them: a checkpoint written after a failure must
        # hold these, not what the failed step's draws (dropout) advanced them to.
        self.rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())

    def _updates(self) -> float | None:
        """The optimizer's update count (AdamW's `step` of its first parameter): every parameter
        it steps advances together, skipped non-finite updates (NonFiniteGuard) not at all."""
        state = next(iter(self.optimizer.state.values()), {}) if self.optimizer is not None else {}
        return float(state["step"]) if "step" in state else None

    @contextmanager
    def installed(self):
        previous = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        except Exception:
            self._keep_after_failure()
            raise
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _keep_after_failure(self) -> None:
        if self.accelerator is None or self.done is None or self.accelerator.num_processes > 1:
            return
        step, updates, extra = self.done
        out = Path(self.cfg.output_dir)
        if self._updates() != updates:
            tqdm.write(f"the run failed while updating the weights after step {step}: no checkpoint of it is "
                       "written", file=sys.stderr)
            return
        final = out / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:07d}"
        if not final.is_dir():
            random.setstate(self.rng[0])
            np.random.set_state(self.rng[1])
            torch.set_rng_state(self.rng[2])
            try:
                save_checkpoint(self.accelerator, self.cfg, step, extra)
            except Exception as err:  # the error that stopped the run is the one to report
                tqdm.write(f"the run failed after step {step}, and its checkpoint could not be written "
                           f"({type(err).__name__}: {err})", file=sys.stderr)
                return
        tqdm.write(f"the run failed after step {step}; its state is in {final}. Once the cause is fixed, "
                   f"resume with: posttrain {self.command} --config {out / 'config.yaml'} --resume", file=sys.stderr)


def stop_message(cfg: TrainConfig, step: int, command: str) -> str:
    return (f"stopped by signal at step {step}; checkpoint saved in {cfg.output_dir}/checkpoints. "
            f"Resume with: posttrain {command} --config {cfg.output_dir}/config.yaml --resume")


def keep_until_exit(accelerator: Accelerator) -> None:
    """Keep a multi-process run's accelerator alive until exit (sharding.KEPT_UNTIL_EXIT, which
    holds its DDP module since `sharding.prepare`)."""
    if accelerator.num_processes > 1:
        sharding.KEPT_UNTIL_EXIT.append(accelerator)


def checkpoint_and_exit(accelerator: Accelerator, cfg: TrainConfig, log: RunLog, step: int,
                        command: str, signum: int, extra: dict | None = None) -> NoReturn:
    """The end of a run stopped by SIGINT/SIGTERM: checkpoint, say how to resume, exit 128+signal."""
    save_checkpoint(accelerator, cfg, step, extra)
    log.close()
    accelerator.end_training()
    keep_until_exit(accelerator)
    accelerator.print(stop_message(cfg, step, command))
    sys.exit(128 + signum)


def finish_run(accelerator: Accelerator, cfg: TrainConfig, log: RunLog, save, what: str, *, step: int,
               command: str, extra: dict | None = None) -> Path:
    """The end of a completed run: the main process writes the model with `save(folder)` through
    save_final_model, all wait, and accelerate is shut down last (it ends the trackers and tears
    down the process group, so no collective may follow). Returns the output folder.

    If the final save fails (a full disk, say), the trained state of `step` (with the trainer's
    `extra` state) is kept as a checkpoint and the error names it and the command that finishes
    the run; `command` is the CLI command (sft, dpo, …)."""
    log.close()
    accelerator.wait_for_everyone()
    out = Path(cfg.output_dir)
    failure: Exception | None = None
    if accelerator.is_main_process:
        try:
            save_final_model(out, save, step)
        except Exception as err:  # whatever stopped the save, the trained weights must survive it
            failure = err
            shutil.rmtree(out / FINAL_TMP, ignore_errors=True)   # frees the space the partial model took
    if global_sum(accelerator, failure is not None):
        raise final_save_error(accelerator, cfg, what, step, command, extra, failure) from failure
    accelerator.print(f"saved the {what} to {out}")
    # A barrier right before the teardown, as before the failure check existed: without it a
    # two-process run intermittently deadlocked in the process group's teardown (both ranks
    # stuck in native code after train() returned), 1 run in 3 here.
    accelerator.wait_for_everyone()
    accelerator.end_training()
    keep_until_exit(accelerator)
    return out


def final_save_error(accelerator: Accelerator, cfg: TrainConfig, what: str, step: int, command: str,
                     extra: dict | None, failure: Exception | None) -> ValueError:
    """Checkpoint the trained state after a failed final save; the one-line error that says where."""
    cause = (" ".join(str(failure).split()) or type(failure).__name__) if failure else "on the main process"
    out = Path(cfg.output_dir)
    try:
        kept = save_checkpoint(accelerator, cfg, step, extra)
    except Exception as err:
        shutil.rmtree(out / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:07d}.tmp", ignore_errors=True)
        found = checkpoints(out)
        return ValueError(f"{out}: saving the final {what} failed ({cause}) and so did a checkpoint of step {step} "
                          f"({' '.join(str(err).split())}); the newest complete checkpoint is "
                          f"{found[-1] if found else 'none'}")
    return ValueError(f"{out}: saving the final {what} failed ({cause}); the trained state of step {step} is kept "
                      f"in {kept}. Finish with: posttrain {command} --config {out / 'config.yaml'} --resume")
