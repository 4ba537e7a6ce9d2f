"""PPO's KL coefficient β as state: fixed, or adapted towards a target KL. Checkpointed with the run.

They are not formulas of tensors (they hold state across iterations), so they live beside the
trainers rather than in losses/.
"""

import math


class FixedKLController:
    """A constant KL coefficient β. ``update`` is a no-op so trainers treat both alike."""

    def __init__(self, value: float):
        if value < 0:
            raise ValueError(f"FixedKLController: value={value} must be >= 0")
        self.value = float(value)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to adapt."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional controller steering the measured KL towards ``target``.

    Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", Sec. 2.2:
    e = clip(KL/target − 1, −0.2, 0.2), β ← β·(1 + K_β·e). As in their released code, the
    gain is K_β = n_steps/horizon, n_steps being the samples seen since the last update.
    """

    def __init__(self, init: float, target: float, horizon: float):
        if init < 0 or target <= 0 or horizon <= 0:
            raise ValueError(
                f"AdaptiveKLController: need init >= 0, target > 0, horizon > 0; "
                f"got init={init}, target={target}, horizon={horizon}"
            )
        self.value, self.target, self.horizon = float(init), float(target), float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move β given the KL measured over the last ``n_steps`` samples."""
        if not math.isfinite(current_kl):
            raise ValueError(f"AdaptiveKLController.update: current_kl={current_kl} is not finite")
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value, self.target, self.horizon = float(state["value"]), float(state["target"]), float(state["horizon"])
