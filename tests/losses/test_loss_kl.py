"""KL estimators and controllers: hand numbers, exact expectations, checkpoint round trip."""

import math

import pytest
import torch

from posttrain.losses import KL_ESTIMATORS, kl_k1, kl_k2, kl_k3
from posttrain.trainers.kl_control import AdaptiveKLController, FixedKLController


def test_estimators_hand_numbers():
    # π = 0.5, π_ref = 0.25, r = π_ref/π = 0.5.
    # k1 = ln 2 = 0.6931472; k2 = ½(ln 2)² = 0.2402265; k3 = (0.5 - 1) - ln 0.5 = 0.1931472.
    logprobs, ref_logprobs = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    torch.testing.assert_close(kl_k1(logprobs, ref_logprobs), torch.tensor([0.6931472]))
    torch.testing.assert_close(kl_k2(logprobs, ref_logprobs), torch.tensor([0.2402265]))
    torch.testing.assert_close(kl_k3(logprobs, ref_logprobs), torch.tensor([0.1931472]))
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3"}


def test_k1_and_k3_are_unbiased_in_exact_expectation():
    # Weight each vocabulary entry by π instead of sampling: E_π[k1] = E_π[k3] = KL(π‖π_ref).
    torch.manual_seed(0)
    logp = torch.log_softmax(torch.randn(7, dtype=torch.float64), -1)
    ref = torch.log_softmax(torch.randn(7, dtype=torch.float64), -1)
    exact = (logp.exp() * (logp - ref)).sum()
    for estimator in (kl_k1, kl_k3):
        torch.testing.assert_close((logp.exp() * estimator(logp, ref)).sum(), exact)


@pytest.mark.parametrize("estimator", [kl_k1, kl_k2, kl_k3])
def test_estimators_gradcheck_float64(estimator):
    torch.manual_seed(0)
    logprobs = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(2, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: estimator(x, ref), (logprobs,))


def test_adaptive_controller_hand_numbers_and_round_trip():
    # init 0.1, target 6, horizon 10000, n = 256 samples, so K = 0.0256.
    # KL 9   -> e = clip(0.5)  = 0.2  -> β = 0.1·(1 + 0.2·0.0256) = 0.100512
    # KL 6.6 -> e = 0.1               -> β = 0.100512·(1 + 0.1·0.0256) = 0.1007693
    # KL 3   -> e = clip(-0.5) = -0.2 -> β = 0.1007693·(1 - 0.2·0.0256) = 0.1002534
    controller = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    expected = [0.100512, 0.100512 * 1.00256, 0.100512 * 1.00256 * 0.99488]
    for kl, beta in zip([9.0, 6.6, 3.0], expected):
        controller.update(kl, n_steps=256)
        assert controller.value == pytest.approx(beta, rel=1e-12)
    restored = AdaptiveKLController(1.0, target=1.0, horizon=1.0)
    restored.load_state_dict(controller.state_dict())
    assert restored.state_dict() == controller.state_dict()
    with pytest.raises(ValueError, match="target > 0"):
        AdaptiveKLController(0.1, target=0.0, horizon=1.0)


def test_fixed_controller_never_moves():
    controller = FixedKLController(0.05)
    controller.update(100.0, n_steps=64)
    assert controller.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(controller.state_dict())
    assert other.value == 0.05
