"Core layer through the installed package: energies against autograd, bad input, schedulers, dtype/device."
import math

import pytest
import torch

from torchebm.core import (AckleyModel, BaseModel, BoothModel, CompositeEnergy, ConstantScheduler, CosineScheduler,
                           DoubleWellEnergy, DoubleWellModel, EnergyModel, ExponentialDecayScheduler, GaussianModel,
                           HarmonicModel, HimmelblauModel, LinearScheduler, MLP, MultiStepScheduler, RastriginModel,
                           RosenbrockModel, StyblinskiTangModel, WarmupScheduler, expect_one_deprecation)

ANALYTIC = [
    lambda: GaussianModel(torch.tensor([0.5, -1.0, 2.0]), torch.tensor([[2.0, 0.4, 0.1], [0.4, 1.0, -0.2], [0.1, -0.2, 0.7]])),
    lambda: DoubleWellModel(barrier_height=1.3, b=0.8), lambda: HarmonicModel(k=3.0), lambda: RosenbrockModel(a=1.5, b=20.0),
    lambda: RastriginModel(a=5.0), lambda: AckleyModel(), lambda: StyblinskiTangModel(),
    lambda: CompositeEnergy([HarmonicModel(), DoubleWellModel()], weights=[0.3, 2.0])]


@pytest.mark.parametrize('make', ANALYTIC)
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_analytic_gradient_matches_autograd(make, dtype):
    model = make().to(dtype)
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(3), dtype=dtype)
    xg = x.clone().requires_grad_(True)
    expected, = torch.autograd.grad(model(xg).sum(), xg)
    got = model.gradient(x)
    assert got.dtype == dtype and got.shape == x.shape
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    energy, grad = model.energy_and_gradient(x)
    torch.testing.assert_close(energy, model(x)); torch.testing.assert_close(grad, got)


@pytest.mark.parametrize('model', [HimmelblauModel(), BoothModel()])
def test_two_dimensional_functions_reject_other_dimensions(model):
    with pytest.raises(ValueError, match='2 columns'):
        model(torch.zeros(3, 4))


def test_gaussian_validation_and_log_normalizer():
    with pytest.raises(ValueError, match='positive definite'):
        GaussianModel(torch.zeros(2), torch.tensor([[1.0, 3.0], [3.0, 1.0]]))
    with pytest.raises(ValueError, match='square'):
        GaussianModel(torch.zeros(2), torch.ones(2, 3))
    with pytest.raises(ValueError, match='1-D'):
        GaussianModel(torch.zeros(2, 1), torch.eye(2))
    with pytest.raises(ValueError, match='finite'):
        GaussianModel(torch.tensor([0.0, float('nan')]), torch.eye(2))
    cov = torch.tensor([[2.0, 0.3], [0.3, 0.5]], dtype=torch.float64)
    model = GaussianModel(torch.zeros(2, dtype=torch.float64), cov)
    assert model.dtype == torch.float64
    assert math.isclose(float(model.log_normalizer), math.log(2 * math.pi) + 0.5 * math.log(float(torch.det(cov))), rel_tol=1e-12)


def test_gaussian_energy_is_the_normal_log_density_up_to_log_z():
    mean, cov = torch.tensor([1.0, -2.0]), torch.tensor([[1.0, 0.6], [0.6, 2.0]])
    model = GaussianModel(mean, cov)
    x = torch.randn(10, 2)
    log_p = torch.distributions.MultivariateNormal(mean, cov).log_prob(x)
    torch.testing.assert_close(-model(x) - model.log_normalizer, log_p, rtol=1e-5, atol=1e-5)


def test_double_well_energy_legacy_formula():
    old = expect_one_deprecation(lambda: DoubleWellEnergy(a=2.0, b=3.0))
    x = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(old(x), 2.0 * ((x ** 2 - 3.0) ** 2).sum(-1))
    with pytest.raises(ValueError, match='b must be >= 0'):
        DoubleWellEnergy(a=1.0, b=-1.0)


def test_energy_model_and_mlp():
    model = EnergyModel(network=MLP(input_dim=2, hidden_dims=[16], output_dim=1, activation='tanh'))
    assert isinstance(model, BaseModel)
    assert model(torch.randn(3, 2)).shape == (3,)
    with pytest.raises(ValueError, match='activation'):
        MLP(2, [4], activation='nope')
    with pytest.raises(TypeError, match='network'):
        EnergyModel(network=lambda x: x)


def test_schedulers_reach_their_end_and_round_trip():
    for s in [LinearScheduler(start_value=1.0, end_value=0.1, n_steps=7), CosineScheduler(start_value=1.0, end_value=0.1, n_steps=7)]:
        values = [s.step() for _ in range(10)]
        assert values[-1] == pytest.approx(0.1) and values[6] == pytest.approx(0.1)
        clone = type(s)(start_value=1.0, end_value=0.1, n_steps=7); clone.load_state_dict(s.state_dict())
        assert clone.get_value() == s.get_value()
    assert ConstantScheduler(0.2).step() == 0.2
    assert ExponentialDecayScheduler(start_value=1.0, decay_rate=0.5).step() == 0.5
    assert MultiStepScheduler(start_value=1.0, milestones=[1], gamma=0.5).step() == 0.5
    warm = WarmupScheduler(main_scheduler=ConstantScheduler(1.0), warmup_steps=4, warmup_init_factor=0.2)
    assert warm.get_value() == pytest.approx(0.2) and [warm.step() for _ in range(5)][-1] == 1.0


@pytest.mark.parametrize('bad', [dict(start_value=1.0, end_value=0.0, n_steps=-3), dict(start_value='a', end_value=0.0, n_steps=3),
                                 dict(start_value=1.0, end_value=0.0)])
def test_scheduler_bad_arguments(bad):
    with pytest.raises((TypeError, ValueError)):
        LinearScheduler(**bad)


def test_scheduler_legacy_spelling_warns_once():
    s = expect_one_deprecation(lambda: CosineScheduler(initial_value=0.3, final_value=0.01, total_steps=10))
    assert (s.start_value, s.end_value, s.n_steps) == (0.3, 0.01, 10)
