"Composed energies: gradients against autograd, sampled moments against closed forms, bad input."
import math

import pytest
import torch
from torch import nn

from torchebm.core.composition import ConditionalEnergy, MixtureEnergy, ProductOfExperts, TemperedEnergy
from torchebm.core.energies import DoubleWellModel, GaussianModel, RosenbrockModel
from torchebm.core.schedulers import TemperatureScheduler
from torchebm.samplers import HamiltonianMonteCarlo, LangevinDynamics


def _gaussian(mean, var, dtype=torch.float32):
    return GaussianModel(torch.tensor(mean, dtype=dtype), var * torch.eye(len(mean), dtype=dtype))


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_analytic_gradients_match_autograd(dtype):
    parts = [_gaussian([1., 0.], 0.5, dtype), DoubleWellModel(), RosenbrockModel()]
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=dtype)
    models = [ProductOfExperts(parts, weights=[1.0, 0.5, 0.01]), MixtureEnergy(parts, weights=[1, 2, 3]),
              TemperedEnergy(MixtureEnergy(parts[:2]), 2.5), TemperedEnergy(parts[1], torch.linspace(0.5, 4, 16, dtype=dtype))]
    for m in models:
        assert m.has_analytic_gradient
        xg = x.clone().requires_grad_(True)
        auto, = torch.autograd.grad(m(xg).sum(), xg)
        torch.testing.assert_close(m.gradient(x), auto)
        assert m.gradient(x).dtype == dtype


def _langevin_moments(model, n=4000, steps=600, step=0.01, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = LangevinDynamics(model, step_size=step).sample(x=torch.randn(n, 2, generator=g), n_steps=steps, generator=g)
    return x.mean(0), x.var(0), x


def test_mixture_weights_act_on_normalised_components():
    """Independent chains: mean of 0.3 N(-1, 0.25 I) + 0.7 N(1.5, I) is 0.75 per coordinate, within 4 standard errors
    (plus a small step-size bias). Without the log-normalisers (the broken variant) the weights act on the
    unnormalised densities, effective weights 0.097 / 0.903 and mean 1.26: the same check fails."""
    parts = [_gaussian([-1., -1.], 0.25), _gaussian([1.5, 1.5], 1.0)]
    var = 0.3 * 0.25 + 0.7 * 1.0 + 0.3 * 0.7 * 2.5 ** 2
    tolerance = 4 * math.sqrt(var / 4000) + 0.03
    for log_z in ('auto', None):
        mean, _, _ = _langevin_moments(MixtureEnergy(parts, weights=[0.3, 0.7], log_normalizers=log_z), steps=1500, step=0.02)
        assert ((mean - 0.75).abs().max() < tolerance) == (log_z == 'auto')


def test_tempered_per_chain_temperatures_scale_the_variance():
    "Each chain samples exp(-E/T_i): for a standard Gaussian the variance is T_i (4 SE on the variance, 2000 chains each)."
    temperatures = torch.cat([torch.full((2000,), 1.0), torch.full((2000,), 4.0)])
    _, _, x = _langevin_moments(TemperedEnergy(_gaussian([0., 0.], 1.0), temperatures), steps=800, step=0.02)
    for k, T in enumerate((1.0, 4.0)):
        v = x[2000 * k: 2000 * (k + 1)].var(0)
        assert (v - T).abs().max() < 4 * T * math.sqrt(2 / 2000) + 0.02 * T


def test_hmc_samples_a_tempered_product_and_annealing_follows_the_scheduler():
    "Product of N(1, I) and N(-1, I) at T = 2 is N(0, I): HMC reaches variance 1 (4 SE)."
    product = ProductOfExperts([_gaussian([1., 1.], 1.0), _gaussian([-1., -1.], 1.0)])
    g = torch.Generator().manual_seed(1)
    x = HamiltonianMonteCarlo(TemperedEnergy(product, 2.0), step_size=0.3, n_leapfrog_steps=5).sample(
        x=torch.randn(2000, 2, generator=g), n_steps=60, generator=g)
    assert x.mean(0).abs().max() < 4 * math.sqrt(1 / 2000) and (x.var(0) - 1).abs().max() < 4 * math.sqrt(2 / 2000)
    schedule = TemperatureScheduler(start_value=8.0, end_value=1.0, n_steps=3)
    annealed = TemperedEnergy(product, schedule)
    z = torch.ones(1, 2)
    values = []
    for _ in range(4):
        values.append(float(annealed(z))); schedule.step()
    assert values == pytest.approx([float(product(z)) / T for T in (8.0, 4.0, 2.0, 1.0)])


def test_conditional_energy_samples_the_condition_and_works_per_sample():
    class Shifted(nn.Module):
        def forward(self, x, y): return 0.5 * (x - y).square().sum(1)
    mean, var, _ = _langevin_moments(ConditionalEnergy(Shifted(), torch.tensor([3., -2.]), dim=2), steps=400, step=0.05)
    assert (mean - torch.tensor([3., -2.])).abs().max() < 4 * math.sqrt(1 / 4000) + 0.02
    per = ConditionalEnergy(Shifted(), torch.arange(8.).reshape(4, 2), per_sample=True)
    x = torch.zeros(4, 2)
    torch.testing.assert_close(per.gradient(x), -torch.arange(8.).reshape(4, 2))
    assert ConditionalEnergy(Shifted(), torch.zeros(2), dim=2).dim == 2


def test_bad_input():
    g = _gaussian([0., 0.], 1.0)
    with pytest.raises(ValueError, match='non-empty'): MixtureEnergy([])
    with pytest.raises(TypeError, match='nn.Module'): MixtureEnergy([lambda x: x])
    with pytest.raises(ValueError, match='different dims'): MixtureEnergy([g, _gaussian([0., 0., 0.], 1.0)])
    with pytest.raises(ValueError, match='weights has 1'): MixtureEnergy([g, g], weights=[1.0])
    with pytest.raises(ValueError, match="'auto'"): MixtureEnergy([g, g], log_normalizers='exact')
    with pytest.raises(ValueError, match='log_normalizers has 3'): MixtureEnergy([g, g], log_normalizers=[0, 0, 0])
    with pytest.raises(ValueError, match='temperature'): TemperedEnergy(g, -1.0)
    with pytest.raises(ValueError, match='temperature'): TemperedEnergy(g, torch.tensor([1.0, 0.0]))
    with pytest.raises(TypeError, match='model'): TemperedEnergy(lambda x: x, 1.0)
    with pytest.raises(TypeError, match='condition'): ConditionalEnergy(nn.Identity(), [1.0])
    class NoReduction(nn.Module):
        def forward(self, x, y): return x + y
    bad = ConditionalEnergy(NoReduction(), torch.zeros(2))
    with pytest.raises(ValueError, match=r'\[batch\] energies'): bad(torch.zeros(3, 2))
