import math

import pytest

from cpt_megatron.train.schedule import ScheduleConfig, lr_at, warmup_steps


def test_rewarm_then_cosine_to_min_lr():
    cfg = ScheduleConfig(type="cosine", warmup=10, warmup_init_lr=0.0)
    lrs = [lr_at(s, cfg, lr=1e-3, min_lr=1e-4, total_steps=100) for s in range(100)]
    assert lrs[0] == 0.0
    assert lrs[5] == pytest.approx(5e-4)
    assert lrs[10] == pytest.approx(1e-3)  # warmup end = peak
    assert lrs[-1] == pytest.approx(1e-4)  # reaches min_lr exactly at the last step
    assert all(b <= a + 1e-15 for a, b in zip(lrs[10:], lrs[11:]))  # monotone decay after warmup
    mid = 10 + (99 - 10) / 2
    assert lr_at(int(mid), cfg, lr=1e-3, min_lr=1e-4, total_steps=100) == pytest.approx(5.5e-4, rel=0.02)


def test_warmup_fraction_default_one_percent():
    assert warmup_steps(ScheduleConfig(), 1000) == 10
    assert warmup_steps(ScheduleConfig(warmup=0.05), 200) == 10


def test_nonzero_warmup_init():
    cfg = ScheduleConfig(warmup=4, warmup_init_lr=1e-5)
    assert lr_at(0, cfg, lr=1e-3, min_lr=1e-4, total_steps=10) == pytest.approx(1e-5)


@pytest.mark.parametrize("shape", ["linear", "cosine", "sqrt"])
def test_wsd_shape(shape):
    cfg = ScheduleConfig(type="wsd", warmup=10, wsd_decay_fraction=0.2, wsd_decay_shape=shape)
    lrs = [lr_at(s, cfg, lr=1.0, min_lr=0.1, total_steps=100) for s in range(100)]
    assert lrs[9] < 1.0 and all(x == 1.0 for x in lrs[10:80])  # stable plateau
    assert lrs[-1] == pytest.approx(0.1)
    assert all(b <= a for a, b in zip(lrs[80:], lrs[81:]))
    if shape == "sqrt":
        assert lrs[85] < 1 - 0.9 * math.sqrt(5 / 19) + 1e-9


def test_constant():
    cfg = ScheduleConfig(type="constant", warmup=2)
    assert [lr_at(s, cfg, lr=0.5, min_lr=0.0, total_steps=5) for s in range(5)] == [0.0, 0.25, 0.5, 0.5, 0.5]


def test_bad_schedule_names_the_field():
    with pytest.raises(ValueError, match="schedule.type"):
        ScheduleConfig(type="linear-ish")
