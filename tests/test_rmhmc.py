"""Statistical and bad-input tests of `RiemannianManifoldHMC` (notebook nbs/14a_rmhmc.ipynb holds the checks that
explain: finite differences of H, equality with HMC for a constant metric, reversibility, O(h^2) energy error).

The funnel test compares moments of Neal's funnel (v ~ N(0, 3^2), x | v ~ N(0, e^v)) with their closed forms, the
tolerance being Z Monte Carlo standard errors (sd / sqrt(ESS), the project's ESS of the mean). The same check run on
a sampler that drops the 1/2 log det G(x) term (so it samples e^{-E(x)} sqrt(det G(x)), pulled into the neck) fails.
The stationarity test starts at exact funnel draws, applies RMHMC transitions and compares with fresh draws (a
two-sample test in the coordinates that make the funnel a standard Gaussian); it too rejects that broken sampler."""
import math
import warnings

import pytest
import torch

from torchebm.diagnostics import effective_sample_size, energy_distance_test
from torchebm.integrators import MassMatrix
from torchebm.samplers import RiemannianManifoldHMC
from torchebm.samplers.rmhmc import RMHMC, FunctionMetric, RMHMCParams, SoftAbsMetric

Z = 4.5  # standard errors allowed per estimate: a false alarm per estimate has probability ~7e-6
DT = torch.float64


class Funnel(torch.nn.Module):
    "Neal's funnel: v ~ N(0, 3^2), x_i | v ~ N(0, e^v); chains are (v, x_1, ..., x_k)."
    def forward(self, x):
        v, z = x[:, 0], x[:, 1:]
        return v ** 2 / 18 + 0.5 * (z ** 2).sum(-1) * torch.exp(-v) + 0.5 * z.shape[1] * v


def funnel_draws(n, k, generator, dtype=DT):
    v = 3 * torch.randn(n, 1, dtype=dtype, generator=generator)
    return torch.cat([v, torch.exp(v / 2) * torch.randn(n, k, dtype=dtype, generator=generator)], 1)


class NoLogDetSoftAbs(SoftAbsMetric):
    "A deliberately broken metric: the 1/2 log det G term is dropped from H and from its gradient."
    def at(self, model, x, differentiable=True):
        point = super().at(model, x, differentiable)
        if not differentiable: return point
        return point._replace(log_det=torch.zeros_like(point.log_det),
                              log_det_weight=torch.zeros_like(point.log_det_weight))


def mc_check(values, exact, z=Z):
    "`values: [n_chains, n_draws, k]`: assert the means equal `exact` within `z` standard errors (ESS of the mean)."
    exact = torch.as_tensor(exact, dtype=values.dtype)
    estimate = values.mean((0, 1))
    se = values.reshape(-1, values.shape[-1]).std(0) / effective_sample_size(values, method='mean').sqrt()
    assert bool(((estimate - exact).abs() < z * se).all()), f"estimate {estimate} vs exact {exact} (s.e. {se})"


def funnel_run(metric, n_chains=256, n_steps=30, seed=0):
    "Chains started at exact funnel draws (so no warm-up is discarded), 3 generalised leapfrog steps of 0.3."
    g = torch.Generator().manual_seed(seed)
    sampler = RiemannianManifoldHMC(Funnel(), step_size=0.3, n_leapfrog_steps=3, metric=metric)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', RuntimeWarning)  # a few trajectories do not converge and are rejected
        return sampler.sample(x=funnel_draws(n_chains, 1, g), n_steps=n_steps, return_trajectory=True,
                              return_result=True, generator=g)


def funnel_checks(trajectory):
    v, z = trajectory[..., :1], trajectory[..., 1:]
    mc_check(v, [0.0])
    mc_check(v ** 2, [9.0])
    mc_check((z > 0).to(DT), [0.5])  # sign-symmetric: P(x_1 > 0) = 1/2 at every v


def test_funnel_marginals():
    result = funnel_run(SoftAbsMetric(1.0))
    funnel_checks(result.samples)
    assert float(result.accept_rate.mean()) > 0.7


def test_funnel_check_rejects_a_sampler_without_the_log_det_term():
    result = funnel_run(NoLogDetSoftAbs(1.0))
    with pytest.raises(AssertionError):
        funnel_checks(result.samples)


def standardised_funnel(y):
    "The bijection (v, x) -> (v / 3, x e^{-v/2}) that maps the funnel to N(0, I), where a two-sample test has power."
    return torch.cat([y[:, :1] / 3, y[:, 1:] * torch.exp(-y[:, :1] / 2)], 1)


def check_funnel_stationary(metric, n=500, k=10, seed=0):
    """Start at `n` exact funnel draws, apply `k` RMHMC transitions (3 steps of 0.3), compare with fresh draws in
    standardised coordinates (energy-distance permutation test, 400 permutations): p <= 0.01 means they moved away."""
    g, transition, model = torch.Generator().manual_seed(seed), RMHMC(), Funnel()
    state, params = transition.init(model, funnel_draws(n, 1, g)), RMHMCParams(0.3, 3, metric)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', RuntimeWarning)
        for _ in range(k): state, _ = transition.step(model, state, params, g)
    p = energy_distance_test(standardised_funnel(state.x), standardised_funnel(funnel_draws(n, 1, g)),
                             n_permutations=400, generator=g).p_value.item()
    assert p > 0.01, f"the chains moved away from the funnel: p = {p:.4f}"


def test_rmhmc_leaves_the_funnel_invariant():
    check_funnel_stationary(SoftAbsMetric(1.0))


def test_stationarity_check_rejects_a_sampler_without_the_log_det_term():
    with pytest.raises(AssertionError, match='moved away'):
        check_funnel_stationary(NoLogDetSoftAbs(1.0))


def test_sampler_equals_the_transition_loop_and_is_reproducible():
    "The sampler runs under no_grad; its metric terms must still be differentiated (a regression test)."
    x = funnel_draws(8, 2, torch.Generator().manual_seed(1))
    sampler = RiemannianManifoldHMC(Funnel(), step_size=0.2, n_leapfrog_steps=2)
    out = sampler.sample(x=x, n_steps=3, generator=torch.Generator().manual_seed(2))
    again = sampler.sample(x=x, n_steps=3, generator=torch.Generator().manual_seed(2))
    g, transition = torch.Generator().manual_seed(2), RMHMC()
    state, params = transition.init(Funnel(), x), RMHMCParams(0.2, 2, SoftAbsMetric(1.0))
    for _ in range(3): state, info = transition.step(Funnel(), state, params, g)
    torch.testing.assert_close(out, state.x, rtol=0, atol=1e-12)
    assert torch.equal(out, again)
    assert info.accept_prob.shape == (8,) and info.is_divergent.dtype == torch.bool


def test_float32_and_per_chain_step_sizes():
    x = funnel_draws(16, 1, torch.Generator().manual_seed(3), dtype=torch.float32)
    transition, model = RMHMC(), Funnel()
    state = transition.init(model, x)
    step_size = torch.linspace(0.05, 0.3, 16)
    state, info = transition.step(model, state, RMHMCParams(step_size, 2), torch.Generator().manual_seed(4))
    assert state.x.dtype == torch.float32 and bool(torch.isfinite(state.x).all())
    assert float(info.accept_prob.mean()) > 0.5


def test_step_size_warmup_runs_through_the_shared_loop():
    x = funnel_draws(16, 1, torch.Generator().manual_seed(9))
    sampler = RiemannianManifoldHMC(Funnel(), step_size=0.05, n_leapfrog_steps=2, adapt_step_size=True, n_adapt_steps=6)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', RuntimeWarning)
        result = sampler.sample(x=x, n_steps=8, return_result=True, generator=torch.Generator().manual_seed(10))
    assert result.adapted is not None and float(result.adapted.step_size) != 0.05
    assert result.samples.shape == x.shape and bool(torch.isfinite(result.samples).all())


def test_nonconvergence_warns_and_counts_as_divergent():
    x = funnel_draws(32, 1, torch.Generator().manual_seed(5))
    sampler = RiemannianManifoldHMC(Funnel(), step_size=0.5, n_leapfrog_steps=2, n_fixed_point_iters=2,
                                    fixed_point_tol=1e-12)
    with pytest.warns(RuntimeWarning, match='fixed-point iterations did not converge') as caught:
        result = sampler.sample(x=x, n_steps=2, return_result=True, generator=torch.Generator().manual_seed(6))
    assert int(result.n_divergent.sum()) > 0
    assert {w.filename for w in caught if 'fixed-point' in str(w.message)} == {__file__}  # points at the sample call


def test_user_metric_not_positive_definite_is_rejected():
    "Chains where metric_fn is not SPD get NaN energies and are never accepted."
    model, x = Funnel(), funnel_draws(4, 1, torch.Generator().manual_seed(7))
    bad = FunctionMetric(lambda y: -torch.eye(2, dtype=DT).expand(y.shape[0], 2, 2))
    state, info = RMHMC().step(model, RMHMC().init(model, x), RMHMCParams(0.1, 1, bad), torch.Generator().manual_seed(8))
    assert not bool(info.accepted.any()) and bool(info.is_divergent.all())
    torch.testing.assert_close(state.x, x)


@pytest.mark.parametrize('kwargs, error, match', [
    (dict(step_size=0.0), ValueError, 'step_size'),
    (dict(step_size='big'), TypeError, 'step_size'),
    (dict(alpha=0.0), ValueError, 'alpha'),
    (dict(alpha=-1.0), ValueError, 'alpha'),
    (dict(n_leapfrog_steps=0), ValueError, 'n_leapfrog_steps'),
    (dict(n_leapfrog_steps=2.5), TypeError, 'n_leapfrog_steps'),
    (dict(n_fixed_point_iters=1), ValueError, 'n_fixed_point_iters'),
    (dict(fixed_point_tol=0.0), ValueError, 'fixed_point_tol'),
    (dict(metric='euclid'), ValueError, "metric='euclid' is not valid; expected one of \\['softabs'\\]"),
    (dict(metric=3), TypeError, 'metric must be'),
    (dict(target_accept=1.5), ValueError, 'target_accept'),
])
def test_bad_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        RiemannianManifoldHMC(Funnel(), **kwargs)


def test_bad_metric_inputs():
    with pytest.raises(TypeError, match='metric_fn must be a callable'):
        FunctionMetric(3)
    model, x = Funnel(), torch.zeros(4, 2, dtype=DT)
    with pytest.raises(ValueError, match=r'shape \[n, d, d\] = \(4, 2, 2\), got \(2, 2\)'):
        FunctionMetric(lambda y: torch.eye(2, dtype=DT)).at(model, x)
    with pytest.raises(TypeError, match='metric must be a RiemannianMetric'):
        RMHMC().step(model, RMHMC().init(model, x), RMHMCParams(0.1, 1, MassMatrix(1.0)))
    with pytest.raises(ValueError, match='step_size'):
        RMHMC().step(model, RMHMC().init(model, x), RMHMCParams(-0.1, 1))
