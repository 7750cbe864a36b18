"""Statistical and behavioural tests of the transition layer and the warm-up built on it.

Moment tests take their tolerance from the Monte Carlo standard error: `Z` standard errors with the ESS of the
draws (`torchebm.diagnostics.effective_sample_size(method='mean')`). With 10 coordinates and Z = 4.5 a correct
sampler fails with probability below 1e-4. Each statistical test names, in its docstring, the broken variant it
was checked to fail on.
"""
import math
import warnings

import pytest
import torch

from torchebm.core.base import BaseModel
from torchebm.core.energies import GaussianModel
from torchebm.diagnostics import effective_sample_size
from torchebm.integrators import MassMatrix
from torchebm.samplers import HamiltonianMonteCarlo, LangevinDynamics
from torchebm.samplers.mcmc import (AdaptedParameters, SamplingResult, Warmup, mass_adaptation_windows,
                                    restart_stuck_chains)
from torchebm.samplers.transitions import (HMC, MALA, ULA, ChainState, HMCParams, LangevinParams, as_box)

F64 = torch.float64
Z = 4.5


def assert_moments(draws: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, z: float = Z):
    "Mean and variance of `draws: [n_chains, n_draws, d]` within `z` ESS-based standard errors of the truth."
    ess = effective_sample_size(draws, method='mean')
    flat = draws.reshape(-1, draws.shape[-1])
    se_mean = (var / ess).sqrt()
    assert ((flat.mean(0) - mean).abs() <= z * se_mean).all(), (flat.mean(0), mean, se_mean, ess)
    # the variance's ESS is at least that of the squares; the mean's ESS is a fair proxy for a Gaussian
    se_var = var * (2 / ess).sqrt()
    assert ((flat.var(0) - var).abs() <= z * se_var).all(), (flat.var(0), var, se_var, ess)


# ------------------------------------------------------------------------------------------ Stan's windows
def stan_windows(num_warmup, init_buffer=75, term_buffer=50, base_window=25):
    "A line-by-line port of Stan's `windowed_adaptation` (stan/mcmc/windowed_adaptation.hpp)."
    if num_warmup < 20: return []
    if init_buffer + base_window + term_buffer > num_warmup:
        init_buffer, term_buffer = int(0.15 * num_warmup), int(0.1 * num_warmup)
        base_window = num_warmup - (init_buffer + term_buffer)
    counter, size = 0, base_window
    next_window = init_buffer + size - 1
    windows, start = [], None
    for _ in range(num_warmup):
        in_window = init_buffer <= counter < num_warmup - term_buffer and counter != num_warmup
        if in_window and start is None: start = counter
        if counter == next_window and counter != num_warmup:  # end_adaptation_window()
            windows.append((start, counter + 1))
            start = None
            if next_window != num_warmup - term_buffer - 1:  # compute_next_window()
                size *= 2
                next_window = counter + size
                if next_window != num_warmup - term_buffer - 1:
                    if next_window + 2 * size >= num_warmup - term_buffer:
                        next_window = num_warmup - term_buffer - 1
        counter += 1
    return windows


def test_warmup_windows_equal_stans_schedule():
    "Every warm-up length from 0 to 2000: the windows are Stan's (75 / 25, 50, 100, ... / 50, or 15/75/10 %)."
    assert stan_windows(1000) == [(75, 100), (100, 150), (150, 250), (250, 450), (450, 950)]
    for n in range(2001):
        assert mass_adaptation_windows(n) == stan_windows(n), n


# ------------------------------------------------------------------------------------------ moments
def ill_conditioned_gaussian(d=10, seed=0):
    "A correlated Gaussian with standard deviations from 0.01 to 10 (condition number 1e6)."
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    scales = torch.logspace(-2, 1, d, dtype=F64)
    cov = q @ torch.diag(scales ** 2) @ q.T
    return GaussianModel(torch.linspace(-1, 1, d, dtype=F64), 0.5 * (cov + cov.T)), g


@pytest.mark.parametrize('kind', ['hmc-dense', 'mala-dense'])
def test_adapted_samplers_get_the_moments_of_an_ill_conditioned_gaussian(kind):
    """Dense metric and step size adapted in Stan's windows, then draws kept apart from the warm-up.

    Checked to fail when the warm-up is left in the draws. (A metric 30x off still gives exact moments, only
    slower: the robustness of the metric estimate is tested on its own below.)"""
    model, g = ill_conditioned_gaussian()
    x0 = model.mean + torch.randn(64, 10, generator=g, dtype=F64) * 2
    if kind == 'hmc-dense':
        sampler = HamiltonianMonteCarlo(model, step_size=0.01, n_leapfrog_steps=8, adapt_step_size=True,
                                        adapt_mass='dense', n_adapt_steps=500, jitter=0.2)
    else:
        sampler = LangevinDynamics(model, step_size=1e-4, metropolis=True, adapt_step_size=True, adapt_mass='dense',
                                   n_adapt_steps=500)
    result = sampler.sample(x=x0, n_steps=1300 if kind == 'hmc-dense' else 2500, return_trajectory=True,
                            return_result=True, generator=g)
    assert isinstance(result, SamplingResult) and result.warmup.shape == (64, 500, 10)
    assert result.adapted.metric.kind == 'dense'
    # in the eigenbasis of the covariance every coordinate has a known variance
    evals, evecs = torch.linalg.eigh(model.cov)
    rotated = (result.samples - model.mean) @ evecs
    assert_moments(rotated, torch.zeros(10, dtype=F64), evals)
    assert (result.accept_rate > 0.3).all()


def test_hmc_with_a_diagonal_metric_and_per_chain_step_sizes():
    "Axis-aligned scales 0.01 .. 10; checked to fail with `adapt_mass=False` (the small scales barely move)."
    scales = torch.logspace(-2, 1, 6, dtype=F64)
    model = GaussianModel(torch.zeros(6, dtype=F64), torch.diag(scales ** 2))
    g = torch.Generator().manual_seed(1)
    sampler = HamiltonianMonteCarlo(model, step_size=0.005, n_leapfrog_steps=10, adapt_step_size=True,
                                    adapt_mass=True, adapt_per_chain=True, n_adapt_steps=400)
    result = sampler.sample(x=torch.randn(32, 6, generator=g, dtype=F64), n_steps=1000, return_trajectory=True,
                            return_result=True, generator=g)
    assert result.adapted.step_size.shape == (32,) and result.adapted.metric.kind == 'diagonal'
    assert_moments(result.samples, torch.zeros(6, dtype=F64), scales ** 2)


def test_robust_pooling_ignores_chains_that_have_not_converged():
    "A fifth of the chains far away inflate a pooled variance 100-fold; the warm-up's estimate stays within 30%."
    g = torch.Generator().manual_seed(0)
    warmup = Warmup(400, 0.65, adapt_step_size=False, adapt_metric='diagonal')
    x = torch.randn(50, 3, generator=g, dtype=F64)
    state = warmup.init(x, 0.1)
    window = warmup.windows[-1]
    for i in range(400):
        draw = torch.randn(50, 3, generator=g, dtype=F64)
        draw[:10] += 30.0 + 0.1 * i  # unconverged chains: far out and drifting
        if window[0] <= i < window[1]:
            pooled = draw if i == window[0] else torch.cat([pooled, draw])
        state, _ = warmup.update(i, state, ChainState(draw), torch.full((50,), 0.7, dtype=F64), g)
    estimate = 1 / state.metric.mass
    assert pooled.var(0).min() > 100  # what plain pooling would have used
    assert ((estimate - 1).abs() < 0.3).all(), estimate


# ------------------------------------------------------------------------------------------ stuck chains
class Quartic(BaseModel):
    "E = |x|^2 / 2 + sum x^4 / 4: the leapfrog is unstable far out (curvature 1 + 3 x^2) for steps that suit the bulk."
    def forward(self, x): return 0.5 * (x ** 2).sum(-1) + 0.25 * (x ** 4).sum(-1)
    def analytic_gradient(self, x): return x + x ** 3


def stuck_start(g):
    x0 = 0.5 * torch.randn(100, 2, generator=g, dtype=F64)
    x0[:30] = 6.0  # a bad random start: a third of the chains where the leapfrog diverges
    return x0


def test_a_shared_step_size_that_strands_chains_is_warned_about():
    """The old failure: chains that never accept, while the others accept ~0.98, used to pass silently
    (the mean acceptance looked healthy). Now per-chain rates show it and a warning names the chains."""
    g = torch.Generator().manual_seed(0)
    sampler = HamiltonianMonteCarlo(Quartic(), step_size=0.3, n_leapfrog_steps=10)
    with pytest.warns(RuntimeWarning) as record:
        result = sampler.sample(x=stuck_start(g), n_steps=300, return_result=True, generator=g)
    messages = [str(w.message) for w in record]
    assert any('30 of 100 chains (chains [0, 1, 2' in m and 'acceptance below 0.01' in m for m in messages), messages
    assert any('30 of 100 chains' in m and 'divergent transitions' in m for m in messages), messages
    assert (result.accept_rate[:30] == 0).all() and (result.accept_rate[30:] > 0.9).all()
    assert (result.n_divergent[:30] == 300).all()


def test_warmup_restarts_stuck_chains_and_then_samples_correctly():
    """Adapting from the same bad start: stuck chains are restarted from moving ones during warm-up, every chain
    accepts afterwards, and the draws have the right second moment. Checked to fail with `restart_every=0`: the
    shared step size then settles where the mean acceptance is 0.65, 30 chains at 0 and 70 at 0.92."""
    g = torch.Generator().manual_seed(0)
    sampler = HamiltonianMonteCarlo(Quartic(), step_size=0.3, n_leapfrog_steps=10, adapt_step_size=True,
                                    n_adapt_steps=300)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', RuntimeWarning)  # a few tail divergences are expected on a quartic
        result = sampler.sample(x=stuck_start(g), n_steps=1300, return_trajectory=True, return_result=True, generator=g)
    assert (result.accept_rate > 0.3).all(), result.accept_rate[:30]
    # E[x^2] of the 1-D density exp(-x^2/2 - x^4/4), by quadrature
    grid = torch.linspace(-6, 6, 20001, dtype=F64)
    w = torch.exp(-0.5 * grid ** 2 - 0.25 * grid ** 4)
    second = float((grid ** 2 * w).sum() / w.sum())
    squares = result.samples ** 2
    ess = effective_sample_size(squares, method='mean')
    se = squares.reshape(-1, 2).std(0) / ess.sqrt()
    assert ((squares.reshape(-1, 2).mean(0) - second).abs() < Z * se).all(), (squares.mean(), second, se)


def test_restart_stuck_chains_copies_moving_chains_only():
    x = torch.arange(6, dtype=F64)[:, None].expand(6, 2).clone()
    state = ChainState(x, x.sum(-1), x.clone())
    rate = torch.tensor([0.5, 0.0, 0.7, 0.001, 0.6, 0.9], dtype=F64)
    new, index = restart_stuck_chains(state, rate, generator=torch.Generator().manual_seed(0))
    assert index[[0, 2, 4, 5]].tolist() == [0, 2, 4, 5] and set(index[[1, 3]].tolist()) <= {0, 2, 4, 5}
    assert torch.equal(new.x, x[index]) and torch.equal(new.energy, state.energy[index])
    assert restart_stuck_chains(state, torch.zeros(6, dtype=F64))[1] is None  # nobody to copy from


# ------------------------------------------------------------------------------------------ warm start
def test_warm_start_reuses_what_was_adapted_without_adapting_again():
    model, g = ill_conditioned_gaussian(d=4)
    sampler = HamiltonianMonteCarlo(model, step_size=0.01, n_leapfrog_steps=5, adapt_step_size=True,
                                    adapt_mass='diagonal', n_adapt_steps=200)
    first = sampler.sample(x=model.mean + torch.randn(16, 4, generator=g, dtype=F64), n_steps=300,
                           return_result=True, generator=g)
    assert isinstance(first.adapted, AdaptedParameters) and first.warmup is None
    again = sampler.sample(x=first.samples, n_steps=50, return_result=True, return_diagnostics=True,
                           warm_start=first.adapted, generator=g)
    assert again.adapted is first.adapted
    assert torch.allclose(again.diagnostics['step_size'], first.adapted.step_size.expand(50))
    assert again.diagnostics['energy'].shape == (50, 16)  # no warm-up steps: every step is a draw
    per_chain = AdaptedParameters(torch.linspace(0.001, 0.01, 16, dtype=F64), None)
    _, diag = sampler.sample(x=first.samples, n_steps=3, return_diagnostics=True, warm_start=per_chain)
    assert torch.allclose(diag['step_size'], torch.full((3,), per_chain.step_size.mean().item(), dtype=F64))
    with pytest.raises(ValueError, match='one per chain'):
        sampler.sample(x=first.samples[:4], n_steps=1, warm_start=per_chain)


def test_sampling_another_model_leaves_the_sampler_unchanged():
    a = GaussianModel(torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64))
    b = GaussianModel(torch.full((2,), 5.0, dtype=F64), torch.eye(2, dtype=F64) * 0.25)
    sampler = LangevinDynamics(a, step_size=0.05, metropolis=True)
    out = sampler.sample(x=torch.zeros(2000, 2, dtype=F64), n_steps=300, model=b,
                         generator=torch.Generator().manual_seed(0))
    assert sampler.model is a
    assert torch.allclose(out.mean(0), b.mean, atol=0.05) and torch.allclose(out.var(0), torch.full((2,), 0.25, dtype=F64), atol=0.03)


# ------------------------------------------------------------------------------------------ boxes and clipping
def truncated_normal_moments(low, high):
    "Mean and variance of N(0, 1) truncated to [low, high]."
    phi = lambda t: math.exp(-t * t / 2) / math.sqrt(2 * math.pi)
    Phi = lambda t: 0.5 * (1 + math.erf(t / math.sqrt(2)))
    z = Phi(high) - Phi(low)
    mean = (phi(low) - phi(high)) / z
    var = 1 + (low * phi(low) - high * phi(high)) / z - mean ** 2
    return mean, var


def test_hmc_with_reflecting_walls_samples_the_truncated_density_exactly():
    """N(0, I) on the box [-0.5, 2]^3: reflecting walls keep the leapfrog reversible and volume-preserving, so HMC is
    exact. Checked to fail with box_mode='clamp' (mass piles up on the walls)."""
    g = torch.Generator().manual_seed(0)
    model = GaussianModel(torch.zeros(3, dtype=F64), torch.eye(3, dtype=F64))
    sampler = HamiltonianMonteCarlo(model, step_size=0.3, n_leapfrog_steps=6, box=(-0.5, 2.0), box_mode='reflect')
    traj = sampler.sample(x=torch.rand(64, 3, generator=g, dtype=F64), n_steps=600, return_trajectory=True,
                          generator=g)[:, 100:]
    assert traj.min() >= -0.5 and traj.max() <= 2.0
    mean, var = truncated_normal_moments(-0.5, 2.0)
    assert_moments(traj, torch.full((3,), mean, dtype=F64), torch.full((3,), var, dtype=F64))


@pytest.mark.parametrize('mode', ['clamp', 'reflect'])
@pytest.mark.parametrize('metropolis', [False, True])
def test_langevin_keeps_chains_in_the_box(mode, metropolis):
    model = GaussianModel(torch.zeros(4, dtype=F64), torch.eye(4, dtype=F64))
    low = torch.tensor([-1.0, 0.0, 0.5, -3.0], dtype=F64)
    out = LangevinDynamics(model, step_size=0.5, metropolis=metropolis, box=(low, 1.0), box_mode=mode).sample(
        x=torch.zeros(200, 4, dtype=F64).clamp(min=low), n_steps=50, generator=torch.Generator().manual_seed(0))
    assert (out >= low).all() and (out <= 1.0).all()
    if mode == 'clamp' and not metropolis: assert (out[:, 2] == 0.5).any()  # clamping puts mass on the walls


def test_gradient_clipping_bounds_each_chains_drift_and_keeps_metropolis_exact():
    "ULA without noise moves exactly h * grad_clip along -grad when the gradient is larger; HMC stays exact."
    model = GaussianModel(torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64) * 1e-2)  # gradient 100 |x|
    x = torch.tensor([[3.0, 4.0], [0.003, 0.004]], dtype=F64)
    out = LangevinDynamics(model, step_size=0.1, noise_scale=0.0, grad_clip=2.0).sample(x=x, n_steps=1)
    assert torch.allclose((x - out).norm(dim=1), torch.tensor([0.2, 0.1 * 0.5], dtype=F64))
    g = torch.Generator().manual_seed(0)
    std = GaussianModel(torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64))
    traj = HamiltonianMonteCarlo(std, step_size=0.4, n_leapfrog_steps=5, grad_clip=0.5).sample(
        x=torch.randn(64, 2, generator=g, dtype=F64), n_steps=500, return_trajectory=True, generator=g)[:, 50:]
    assert_moments(traj, torch.zeros(2, dtype=F64), torch.ones(2, dtype=F64))


# ------------------------------------------------------------------------------------------ stationarity
@pytest.mark.parametrize('name', ['ula', 'mala', 'hmc'])
def test_every_transition_leaves_its_target_invariant(name):
    """Start at exact draws of a correlated Gaussian, apply 20 transitions, compare with fresh exact draws
    (energy-distance permutation test, fixed seeds). ULA at a small step (its O(h) bias is below the test's power).
    Checked to fail for MALA and HMC when the Metropolis ratio drops the kinetic energy (p at its minimum, 1/401)."""
    from torchebm.diagnostics import energy_distance_test
    g = torch.Generator().manual_seed(3)
    cov = torch.tensor([[1.0, 0.9], [0.9, 1.0]], dtype=F64)
    model = GaussianModel(torch.zeros(2, dtype=F64), cov)
    chol = torch.linalg.cholesky(cov)
    x = torch.randn(1000, 2, generator=g, dtype=F64) @ chol.T
    metric = MassMatrix(torch.linalg.inv(cov))
    transition, params = {'ula': (ULA(), LangevinParams(0.002)),
                          'mala': (MALA(), LangevinParams(0.8, metric=metric)),
                          'hmc': (HMC(), HMCParams(0.5, 4, metric))}[name]
    state = transition.init(model, x)
    for _ in range(20): state, _ = transition.step(model, state, params, g)
    fresh = torch.randn(1000, 2, generator=g, dtype=F64) @ chol.T
    assert energy_distance_test(state.x, fresh, n_permutations=400, generator=g).p_value > 0.01


def test_box_reflect_refuses_a_dense_metric():
    model = GaussianModel(torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64))
    dense = MassMatrix(torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=F64))
    state = HMC().init(model, torch.zeros(3, 2, dtype=F64))
    with pytest.raises(ValueError, match='scalar or diagonal metric'):
        HMC().step(model, state, HMCParams(0.1, 2, dense, box=as_box((-1.0, 1.0), 'reflect')))
