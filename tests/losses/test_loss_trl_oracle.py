"""Cross-checks against TRL 1.16 on identical random inputs (TRL is a test-only oracle).

TRL's DPO losses live inside ``DPOTrainer._compute_loss``, a method that runs the model; it
is called here on a minimal stand-in whose "model" returns the prepared per-token log-probs,
so TRL's own arithmetic produces the number. ORPO and SimPO are checked against
``ORPOTrainer.odds_ratio_loss`` and ``CPOTrainer.cpo_loss``, called the same way.

Deliberate differences from TRL, checked as ours:
* TRL 1.16's "sigmoid" has no label smoothing; conservative DPO is checked by hand numbers
  in test_loss_dpo.py.
* TRL's ORPO method returns +λ·log σ(log-odds) and adds the NLL elsewhere; ours returns the
  whole per-pair loss, NLL included, so the oracle is −TRL − mean log-prob of y_w.

KTO is checked against ``KTOTrainer._compute_loss`` the same way: its stand-in "model" returns
one set of per-token log-probs for the examples' own completions and another for the
mismatched (KL) completions, told apart by their input ids.
"""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from posttrain.losses import DPO_LOSSES, kto_loss, kto_reference_point

dpo_trainer = pytest.importorskip("trl.trainer.dpo_trainer")

B, T = 4, 6


def _identity(x):
    return x


ACCELERATOR = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=_identity, gather=_identity)


class _FakeModel:
    """Returns the given per-token log-probs (zero on non-completion tokens) as TRL expects."""

    training = True

    def __init__(self, log_probs):
        self.log_probs = log_probs

    def __call__(self, **_):
        zeros = torch.zeros_like(self.log_probs)
        return SimpleNamespace(log_probs=self.log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def _trl_dpo_loss(loss_type, beta, label_smoothing, token_logps, completion_mask, ref_chosen, ref_rejected):
    """TRL's per-batch DPO loss for one pair laid out as [chosen, rejected] rows."""
    model = _FakeModel(token_logps)
    trainer = SimpleNamespace(
        model=model, accelerator=ACCELERATOR, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type],
        loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing, use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
    )
    # TRL shifts the completion mask by one (position 0 is the prompt) and counts IPO's
    # lengths on the unshifted mask, so the prompt column is 0 for both counts to agree.
    full_mask = torch.cat([torch.zeros(2, 1, dtype=torch.long), completion_mask.long()], dim=1)
    inputs = {
        "input_ids": torch.ones(2, T + 1, dtype=torch.long),
        "attention_mask": torch.ones(2, T + 1, dtype=torch.long),
        "completion_mask": full_mask,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    return dpo_trainer.DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)


@pytest.mark.parametrize(("name", "label_smoothing"), [("sigmoid", 0.0), ("robust", 0.2), ("hinge", 0.0), ("ipo", 0.0)])
def test_reference_losses_match_trl_dpo_trainer(name, label_smoothing):
    spec = DPO_LOSSES[name]
    torch.manual_seed(0)
    beta = 0.3
    mask = torch.ones(2 * B, T, dtype=torch.bool)
    mask[:, 4:] = torch.rand(2 * B, 2) > 0.5
    token_logps = torch.where(mask, -torch.rand(2 * B, T, dtype=torch.float64) * 2, 0.0)
    ref_sums = token_logps.sum(-1) + torch.randn(2 * B, dtype=torch.float64)
    lengths = mask.sum(-1)
    # Sums, or per-token means when the record asks for length-normalised inputs.
    scale = lengths if spec.length_normalized else torch.ones_like(lengths)
    policy, reference = token_logps.sum(-1) / scale, ref_sums / scale
    kwargs = {"label_smoothing": label_smoothing} if spec.hyperparameters else {}
    ours, chosen_rewards, _ = spec.fn(policy[:B], policy[B:], reference[:B], reference[B:], beta=beta, **kwargs)
    for i in range(B):
        rows = [i, B + i]
        trl = _trl_dpo_loss(
            name, beta, label_smoothing, token_logps[rows], mask[rows], ref_sums[[i]], ref_sums[[B + i]]
        )
        torch.testing.assert_close(ours[i], trl, atol=1e-6, rtol=0)
    if not spec.length_normalized:
        torch.testing.assert_close(chosen_rewards, beta * (policy[:B] - reference[:B]))


def test_orpo_matches_trl_odds_ratio_loss():
    orpo_trainer = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    torch.manual_seed(0)
    chosen, rejected = -torch.rand(8, dtype=torch.float64) * 3 - 0.01, -torch.rand(8, dtype=torch.float64) * 3 - 0.01
    stand_in = SimpleNamespace(beta=0.25, accelerator=ACCELERATOR)
    trl_losses, *_ = orpo_trainer.ORPOTrainer.odds_ratio_loss(stand_in, chosen, rejected)
    ours, _, _ = DPO_LOSSES["orpo"].fn(chosen, rejected, None, None, beta=0.25)
    torch.testing.assert_close(ours, -trl_losses - chosen, atol=1e-6, rtol=0)


def test_simpo_matches_trl_cpo_loss():
    cpo_trainer = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    torch.manual_seed(0)
    chosen, rejected = -torch.rand(8, dtype=torch.float64) * 3, -torch.rand(8, dtype=torch.float64) * 3
    stand_in = SimpleNamespace(
        alpha=0.0, loss_type="simpo", simpo_gamma=0.7, beta=2.0, label_smoothing=0.0, accelerator=ACCELERATOR
    )
    trl_losses, trl_chosen, trl_rejected = cpo_trainer.CPOTrainer.cpo_loss(stand_in, chosen, rejected)
    ours, chosen_rewards, rejected_rewards = DPO_LOSSES["simpo"].fn(chosen, rejected, None, None, beta=2.0, gamma=0.7)
    torch.testing.assert_close(ours, trl_losses, atol=1e-6, rtol=0)
    torch.testing.assert_close((chosen_rewards, rejected_rewards), (trl_chosen, trl_rejected), atol=1e-6, rtol=0)


class _KTOFakeModel:
    """Per-token log-probs for rows whose input ids are all `own_id` or all `kl_id`."""

    training = True

    def __init__(self, own_id, own, kl_id, kl):
        self.by_id = {own_id: own, kl_id: kl}

    def __call__(self, input_ids, **_):
        log_probs = self.by_id[int(input_ids[0, 0])]
        zeros = torch.zeros_like(log_probs)
        return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


@pytest.mark.parametrize(("desirable_weight", "undesirable_weight"), [(1.0, 1.0), (1.33, 0.8)])
def test_kto_matches_trl_kto_trainer(desirable_weight, undesirable_weight):
    kto_trainer = pytest.importorskip("trl.trainer.kto_trainer")
    torch.manual_seed(0)
    beta, n = 0.3, 6
    labels = torch.tensor([True, False, True, True, False, False])

    def token_logps():
        mask = torch.ones(n, T, dtype=torch.bool)
        mask[:, 4:] = torch.rand(n, 2) > 0.5
        return torch.where(mask, -torch.rand(n, T, dtype=torch.float64) * 2, 0.0), mask

    (own, own_mask), (kl, kl_mask) = token_logps(), token_logps()
    ref_own = own.sum(-1) + torch.randn(n, dtype=torch.float64)
    # A reference below the policy on the mismatched completions, so z₀ > 0 is not clamped.
    ref_kl = kl.sum(-1) - torch.rand(n, dtype=torch.float64)
    z0 = kto_reference_point(kl.sum(-1), ref_kl)
    assert z0 > 0
    ours, stats = kto_loss(own.sum(-1), ref_own, labels, z0, beta=beta, desirable_weight=desirable_weight,
                           undesirable_weight=undesirable_weight)

    model = _KTOFakeModel(1, own, 2, kl)
    trainer = SimpleNamespace(
        model=model, accelerator=ACCELERATOR, aux_loss_enabled=False, precompute_ref_logps=True,
        calculate_KL=True, loss_type="kto", beta=beta, desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1,
    )
    trainer._compute_kl_logps = lambda m, b: kto_trainer.KTOTrainer._compute_kl_logps(trainer, m, b)
    # TRL drops the first column of its log-probs (position 0 is never predicted), so every row
    # starts with one prompt column, which its own log-prob rows do not carry.
    def rows(marker, mask):
        return torch.full((n, T + 1), marker), torch.cat([torch.zeros(n, 1, dtype=torch.long), mask.long()], 1)

    (ids, own_full), (kl_ids, kl_full) = rows(1, own_mask), rows(2, kl_mask)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": own_full,
              "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones_like(kl_ids), "KL_completion_mask": kl_full,
              "label": labels, "ref_logps": ref_own, "ref_KL_logps": ref_kl}
    trl = kto_trainer.KTOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    torch.testing.assert_close(ours.mean(), trl, atol=1e-6, rtol=0)
    logged = trainer._metrics["train"]
    assert logged["kl"][0] == pytest.approx(float(z0), abs=1e-6)
    assert logged["rewards/chosen"][0] == pytest.approx(float(stats["rewards/chosen"].mean()), abs=1e-6)
    assert logged["rewards/rejected"][0] == pytest.approx(float(stats["rewards/rejected"].mean()), abs=1e-6)
