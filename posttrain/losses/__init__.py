"""Pure loss functions of tensors: per-example (or per-token) values plus detached stats.

Torch only; the caller reduces, with ``posttrain.ops.aggregate`` for per-token losses.
"""

from posttrain.losses.cross_entropy import chunked_cross_entropy, chunked_logprobs, chunked_logprobs_and_entropy
from posttrain.losses.dpo import (
    DPO_LOSSES,
    DPOLoss,
    dpo_loss,
    hinge_loss,
    ipo_loss,
    orpo_loss,
    robust_dpo_loss,
    simpo_loss,
)
from posttrain.losses.kl import (
    KL_ESTIMATORS,
    kl_k1,
    kl_k2,
    kl_k3,
)
from posttrain.losses.kto import kto_loss, kto_reference_point
from posttrain.losses.grpo import grpo_loss
from posttrain.losses.ppo import ppo_policy_loss, value_loss
from posttrain.losses.reward import bradley_terry_loss

__all__ = [
    "DPO_LOSSES",
    "KL_ESTIMATORS",
    "DPOLoss",
    "bradley_terry_loss",
    "chunked_cross_entropy",
    "chunked_logprobs",
    "chunked_logprobs_and_entropy",
    "dpo_loss",
    "grpo_loss",
    "hinge_loss",
    "ipo_loss",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kto_loss",
    "kto_reference_point",
    "orpo_loss",
    "ppo_policy_loss",
    "robust_dpo_loss",
    "simpo_loss",
    "value_loss",
]
