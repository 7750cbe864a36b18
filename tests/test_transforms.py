"""Constrained targets sampled unconstrained with `TransformedModel` and NUTS: moments against closed forms with
tolerances from the Monte Carlo standard error; without the log-Jacobian term the same checks fail."""
import math

import pytest
import torch

from torchebm.core.transforms import (BlockTransform, ExpTransform, IntervalTransform, SoftplusTransform,
                                      StickBreakingTransform, TransformedModel, transform_for)
from torchebm.core.energies import GaussianModel
from torchebm.diagnostics import effective_sample_size
from torchebm.samplers.nuts import NoUTurnSampler

DT = torch.float64
Z = 4.5  # standard errors allowed per estimate


class GammaEnergy(torch.nn.Module):
    "Gamma(shape 3, rate 2) on x > 0."
    def forward(self, x): return (-2.0 * x.log() + 2.0 * x).sum(-1)


class DirichletEnergy(torch.nn.Module):
    "Dirichlet(2, 3, 5) on the 3-simplex."
    alpha = torch.tensor([2.0, 3.0, 5.0], dtype=DT)
    def forward(self, x): return -((self.alpha - 1) * x.log()).sum(-1)


class NoJacobian(TransformedModel):
    "The broken variant: E(T(u)) without the log-Jacobian, i.e. the wrong density in u."
    def forward(self, u): return self.model(self.transform.forward(u))


def draws(model, free_dim, n_chains=32, seed=0):
    sampler = NoUTurnSampler(model, n_warmup=150)
    u = sampler.sample(x=torch.zeros(n_chains, free_dim, dtype=DT), n_steps=200, return_trajectory=True,
                       generator=torch.Generator().manual_seed(seed))
    return model.constrain(u)


def within_mc_error(values, exact):
    "Whether every coordinate's mean of `values: [n_chains, n_draws, k]` is within Z standard errors of `exact`."
    estimate = values.mean((0, 1))
    se = values.reshape(-1, values.shape[-1]).std(0) / effective_sample_size(values, method='mean').sqrt()
    return bool(((estimate - torch.as_tensor(exact, dtype=DT)).abs() < Z * se).all())


@pytest.mark.parametrize('transform', [ExpTransform(), SoftplusTransform()])
def test_gamma_through_positive_transforms(transform):
    x = draws(TransformedModel(GammaEnergy(), transform), 1)
    assert bool((x > 0).all())
    assert within_mc_error(x, [1.5]) and within_mc_error((x - 1.5) ** 2, [0.75])


def test_dirichlet_through_stick_breaking():
    x = draws(TransformedModel(DirichletEnergy(), StickBreakingTransform()), 2)
    torch.testing.assert_close(x.sum(-1), torch.ones(x.shape[:-1], dtype=DT))
    alpha = DirichletEnergy.alpha
    mean = alpha / alpha.sum()
    var = alpha * (alpha.sum() - alpha) / (alpha.sum() ** 2 * (alpha.sum() + 1))
    assert within_mc_error(x, mean) and within_mc_error((x - mean) ** 2, var)


def test_mixed_supports_in_blocks():
    "A Gamma(3, 2) scale next to a Beta(2, 5) probability in one parameter vector."
    class Joint(torch.nn.Module):
        def forward(self, x):
            s, p = x[:, 0], x[:, 1]
            return -2.0 * s.log() + 2.0 * s - p.log() - 4.0 * torch.log1p(-p)
    x = draws(TransformedModel(Joint(), BlockTransform(['positive', IntervalTransform(0.0, 1.0)], [1, 1])), 2)
    assert within_mc_error(x, [1.5, 2 / 7])


def test_without_the_log_jacobian_the_checks_fail():
    x = draws(NoJacobian(GammaEnergy(), ExpTransform()), 1)  # samples x^(a-1) e^(-bx) / x: Gamma(2, 2), mean 1
    assert not within_mc_error(x, [1.5])


def test_bad_input():
    with pytest.raises(ValueError, match='lower < upper'): IntervalTransform(1.0, 0.0)
    with pytest.raises(ValueError, match='expected one of'): transform_for('postive')
    with pytest.raises(ValueError, match='one size per transform'): BlockTransform(['positive'], [1, 2])
    with pytest.raises(ValueError, match='sizes must be ints'): BlockTransform(['positive'], [0])
    with pytest.raises(ValueError, match='last axis of length 3'): BlockTransform([None, 'simplex'], [1, 3]).forward(torch.zeros(2, 4))
    with pytest.raises(ValueError, match='length >= 2'): StickBreakingTransform().inverse(torch.ones(2, 1))


def test_bounds_must_be_finite_and_points_inside_the_support():
    for make in (ExpTransform, SoftplusTransform):
        for bad in (math.nan, math.inf, -math.inf):
            with pytest.raises(ValueError, match='lower must be a finite number'): make(bad)
    model = TransformedModel(GaussianModel(torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64)), 'positive')
    with pytest.raises(ValueError, match=r'x has 1 points outside the support of ExpTransform \(rows \[1\]\)'):
        model.unconstrain(torch.tensor([[1.0, 2.0], [-1.0, 3.0]], dtype=torch.float64))
    simplex = TransformedModel(GaussianModel(torch.zeros(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64)), 'simplex')
    with pytest.raises(ValueError, match='outside the support of StickBreakingTransform'):
        simplex.unconstrain(torch.tensor([[0.5, 0.7, -0.2]], dtype=torch.float64))
