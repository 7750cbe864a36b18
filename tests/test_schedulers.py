"Schedulers: closed-form values, clamping, both argument spellings, state round trips, bad arguments."
import math
import warnings

import pytest
import torch

from torchebm.core.base import BaseSampler, ConstantScheduler, expect_one_deprecation
from torchebm.core.schedulers import (CosineScheduler, ExponentialDecayScheduler, LinearScheduler,
                                      MultiStepScheduler, WarmupScheduler)


def _run(s, n):
    "Values at steps 0..n (get_value, then n calls of step)."
    return [s.get_value()] + [s.step() for _ in range(n)]


def test_linear_closed_form_and_clamp():
    s = LinearScheduler(start_value=2.0, end_value=-1.0, n_steps=6)
    expected = [2.0 - 3.0 * min(k, 6) / 6 for k in range(10)]
    assert _run(s, 9) == pytest.approx(expected)


def test_cosine_closed_form_and_clamp():
    s = CosineScheduler(start_value=3e-2, end_value=5e-3, n_steps=100)
    values = _run(s, 150)
    for k in [0, 1, 37, 50, 99, 100, 120, 150]:
        expected = 5e-3 + 0.5 * (3e-2 - 5e-3) * (1 + math.cos(math.pi * min(k, 100) / 100))
        assert values[k] == pytest.approx(expected)
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_increasing_schedules():
    assert _run(LinearScheduler(start_value=0.0, end_value=1.0, n_steps=2), 3) == pytest.approx([0, .5, 1, 1])
    assert _run(CosineScheduler(start_value=0.0, end_value=1.0, n_steps=2), 3) == pytest.approx([0, .5, 1, 1])


def test_exponential_decay():
    s = ExponentialDecayScheduler(start_value=1.0, decay_rate=0.9, min_value=0.5)
    values = _run(s, 20)
    assert values == pytest.approx([max(0.5, 0.9 ** k) for k in range(21)])
    assert ExponentialDecayScheduler(start_value=2.0, decay_rate=0.5).compute_value(3) == pytest.approx(0.25)


def test_multistep():
    s = MultiStepScheduler(start_value=1.0, milestones=[2, 5], gamma=0.5)
    assert _run(s, 7) == pytest.approx([1, 1, .5, .5, .5, .25, .25, .25])
    assert _run(MultiStepScheduler(start_value=3.0, milestones=[]), 3) == pytest.approx([3.0] * 4)


def test_warmup_then_main():
    main = CosineScheduler(start_value=1.0, end_value=0.0, n_steps=4)
    s = WarmupScheduler(main_scheduler=main, warmup_steps=4, warmup_init_factor=0.2)
    values = _run(s, 10)
    assert values[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    ref = CosineScheduler(start_value=1.0, end_value=0.0, n_steps=4)
    assert values[4:] == pytest.approx(_run(ref, 6))
    s0 = WarmupScheduler(LinearScheduler(start_value=1.0, end_value=0.0, n_steps=2), warmup_steps=0)
    assert _run(s0, 3) == pytest.approx([1.0, 0.5, 0.0, 0.0])


def test_warmup_default_factor_matches_torchebm_0_8_9():
    assert WarmupScheduler(ConstantScheduler(2.0), warmup_steps=5).get_value() == pytest.approx(0.02)


def test_spec_calls_run_unchanged():
    "The call forms of the documentation."
    CosineScheduler(start_value=3e-2, end_value=5e-3, n_steps=100)
    CosineScheduler(start_value=3e-1, end_value=1e-2, n_steps=100)
    linear = expect_one_deprecation(lambda: LinearScheduler(initial_value=0.05, final_value=0.03, total_steps=100))
    s = WarmupScheduler(main_scheduler=linear, warmup_steps=10, warmup_init_factor=0.01)
    values = _run(s, 200)
    assert values[0] == pytest.approx(0.05 * 0.01)
    assert values[10] == pytest.approx(0.05)
    assert values[110:] == pytest.approx([0.03] * 91)
    assert ConstantScheduler(0.01).get_value() == 0.01


@pytest.mark.parametrize('cls', [LinearScheduler, CosineScheduler])
def test_legacy_spelling_is_equivalent_and_warns_once(cls):
    old = expect_one_deprecation(lambda: cls(initial_value=1.0, final_value=0.1, total_steps=7))
    new = cls(start_value=1.0, end_value=0.1, n_steps=7)
    assert _run(old, 9) == pytest.approx(_run(new, 9))
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        cls(1.0, 0.1, 7)


@pytest.mark.parametrize('kwargs', [
    dict(start_value=1.0, initial_value=1.0, end_value=0.0, n_steps=3),
    dict(start_value=1.0, end_value=0.0, final_value=0.0, n_steps=3),
    dict(start_value=1.0, end_value=0.0, n_steps=3, total_steps=3),
])
def test_both_spellings_for_one_argument_is_a_type_error(kwargs):
    with pytest.raises(TypeError, match='not both'):
        LinearScheduler(**kwargs)


@pytest.mark.parametrize('make,error,match', [
    (lambda: LinearScheduler(start_value=1.0, end_value=0.0, n_steps=0), ValueError, 'n_steps'),
    (lambda: LinearScheduler(start_value=1.0, end_value=0.0, n_steps=-5), ValueError, 'n_steps'),
    (lambda: CosineScheduler(start_value=1.0, end_value=0.0, n_steps=2.5), TypeError, 'n_steps'),
    (lambda: CosineScheduler(start_value=1.0, n_steps=10), TypeError, 'end_value'),
    (lambda: LinearScheduler(start_value='1', end_value=0.0, n_steps=3), TypeError, 'start_value'),
    (lambda: LinearScheduler(start_value=1.0, end_value=None, n_steps=3), TypeError, 'end_value'),
    (lambda: LinearScheduler(start_value=1.0, end_value=0.0, steps=3), TypeError, 'steps'),
    (lambda: ExponentialDecayScheduler(start_value=1.0, decay_rate=0.0), ValueError, 'decay_rate'),
    (lambda: ExponentialDecayScheduler(start_value=1.0, decay_rate=1.5), ValueError, 'decay_rate'),
    (lambda: ExponentialDecayScheduler(start_value=1.0), ValueError, 'decay_rate'),
    (lambda: ExponentialDecayScheduler(start_value=1.0, decay_rate=0.5, min_value='x'), (TypeError, ValueError), 'min_value'),
    (lambda: MultiStepScheduler(start_value=1.0, milestones=[5, 2]), ValueError, 'increasing'),
    (lambda: MultiStepScheduler(start_value=1.0, milestones=[0]), ValueError, 'milestones'),
    (lambda: MultiStepScheduler(start_value=1.0, milestones=[2], gamma=0.0), ValueError, 'gamma'),
    (lambda: WarmupScheduler(ConstantScheduler(1.0), warmup_steps=-1), ValueError, 'warmup_steps'),
    (lambda: WarmupScheduler(ConstantScheduler(1.0), warmup_steps=3, warmup_init_factor=0.0), ValueError, 'warmup_init_factor'),
    (lambda: WarmupScheduler(ConstantScheduler(1.0), warmup_steps=3, warmup_init_factor=1.5), ValueError, 'warmup_init_factor'),
    (lambda: WarmupScheduler(0.1, warmup_steps=3), TypeError, 'main_scheduler'),
])
def test_bad_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


def _all_schedulers():
    return [ConstantScheduler(0.3),
            LinearScheduler(start_value=1.0, end_value=0.0, n_steps=10),
            CosineScheduler(start_value=1.0, end_value=0.0, n_steps=10),
            ExponentialDecayScheduler(start_value=1.0, decay_rate=0.8, min_value=0.05),
            MultiStepScheduler(start_value=1.0, milestones=[3, 6], gamma=0.1),
            WarmupScheduler(main_scheduler=CosineScheduler(start_value=1.0, end_value=0.0, n_steps=10),
                            warmup_steps=4, warmup_init_factor=0.1)]


@pytest.mark.parametrize('index', range(6))
def test_state_dict_round_trip_and_reset(index):
    s, fresh = _all_schedulers()[index], _all_schedulers()[index]
    _run(s, 7)
    fresh.load_state_dict(s.state_dict())
    assert fresh.get_value() == s.get_value()
    assert _run(fresh, 8)[1:] == _run(s, 8)[1:]
    s.reset()
    assert s.get_value() == _all_schedulers()[index].get_value()


def test_warmup_state_includes_main_scheduler():
    s = _all_schedulers()[-1]
    _run(s, 9)
    state = s.state_dict()
    assert state['main_scheduler'] == {'step_count': 5}
    s.reset()
    assert s.main_scheduler.step_count == 0


class _Recorder(BaseSampler):
    def sample(self, x=None, dim=None, n_steps=3, **kwargs):
        self.reset_schedulers()
        out = []
        for _ in range(n_steps):
            out.append(self.get_scheduled_value('step_size'))
            self.step_schedulers()
        return out


def test_schedulers_in_a_sampler_and_its_state_dict():
    make = lambda: WarmupScheduler(LinearScheduler(start_value=0.1, end_value=0.01, n_steps=5), warmup_steps=2,
                                  warmup_init_factor=0.1)
    sampler = _Recorder(model=None)
    sampler.register_scheduler('step_size', make())
    assert sampler.sample(n_steps=8) == pytest.approx([0.01, 0.055, 0.1, 0.082, 0.064, 0.046, 0.028, 0.01])
    other = _Recorder(model=None)
    other.register_scheduler('step_size', make())
    other.load_state_dict(sampler.state_dict())
    assert other.get_scheduled_value('step_size') == sampler.get_scheduled_value('step_size')


def test_temperature_closed_form_state_and_bad_input():
    from torchebm.core.schedulers import TemperatureScheduler
    s = TemperatureScheduler(start_value=10.0, end_value=0.5, n_steps=7)
    values = _run(s, 9)
    assert values == pytest.approx([10.0 * 0.05 ** (min(k, 7) / 7) for k in range(10)])
    assert s.inverse_temperature() == pytest.approx(2.0)
    state = s.state_dict(); s.reset(); assert s.get_value() == 10.0
    s.load_state_dict(state); assert s.get_value() == pytest.approx(0.5)
    lin = TemperatureScheduler(start_value=4.0, end_value=1.0, n_steps=3, schedule='Linear')
    assert _run(lin, 4) == pytest.approx([4.0, 3.0, 2.0, 1.0, 1.0])
    with pytest.raises(ValueError, match='end_value must be a positive temperature'):
        TemperatureScheduler(start_value=1.0, end_value=-1.0, n_steps=3)
    with pytest.raises(TypeError, match='n_steps'): TemperatureScheduler(start_value=1.0)
    with pytest.raises(ValueError, match="'geometric'"): TemperatureScheduler(start_value=1.0, n_steps=2, schedule='exp')
