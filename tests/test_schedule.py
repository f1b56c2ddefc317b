"""train/optim.py's learning-rate schedules: warm-up, then linear (the paper's) or cosine decay to zero;
an unknown decay is a one-line config error before any work."""

import math

import pytest

from kosmos2_jax.train.optim import learning_rate_schedule


@pytest.mark.parametrize("decay", ["linear", "cosine"])
def test_warmup_then_decay_to_zero(decay):
    peak, warmup, total = 1e-3, 100, 2000
    lr = learning_rate_schedule(peak, warmup, total, decay=decay)
    assert float(lr(0)) == 0.0
    assert float(lr(50)) == pytest.approx(peak / 2)
    assert float(lr(warmup)) == pytest.approx(peak)
    assert float(lr(total)) == pytest.approx(0.0, abs=1e-12)
    for step in (500, 1333, 1500, 1900):
        t = (step - warmup) / (total - warmup)
        expected = peak * (1 - t) if decay == "linear" else peak * 0.5 * (1 + math.cos(math.pi * t))
        assert float(lr(step)) == pytest.approx(expected, rel=1e-5), step


def test_unknown_decay_is_a_config_error():
    from kosmos2_jax.utils.errors import UsageError
    from kosmos2_jax.train import config_check, presets

    cfg = presets.base()
    cfg.optim.decay = "exponential"
    with pytest.raises(UsageError, match=r"config.optim.decay='exponential': must be one of linear, cosine"):
        config_check.check(cfg)
    with pytest.raises(ValueError, match="exponential"):
        learning_rate_schedule(1e-3, 10, 100, decay="exponential")
