"""Statistical tests of `NoUTurnSampler` (multinomial NUTS): moments against closed forms with tolerances from the
Monte Carlo standard error (ESS-based) and a stationarity test from exact draws.

A broken variant these tests catch: `test_a_broken_nuts_fails_the_moment_test` replaces the multinomial draws (inside
each sub-tree and when a sub-tree joins the tree) by always taking the newest leaf; the variance check on a Gaussian
then fails by ~19 standard errors while the real sampler passes. (Merging each new sub-tree without its weight, alone,
was not rejected by the banana stationarity test: 600 chains, p = 0.10 after 4 and 0.065 after 20 transitions.)
`test_a_broken_nuts_fails_the_banana_test` and `test_a_broken_nuts_fails_the_stationarity_test` draw the momenta
with the inverse mass instead of the mass; the banana's moment checks then fail by 7-14 standard errors, and the
stationarity test (with a diagonal metric) gives p = 1/201.

The long moment tests are marked `slow` (about 2.5 CPU-minutes for the first four on this machine's cores)."""
import math
import warnings

import pytest
import torch

from torchebm.core.energies import GaussianModel
from torchebm.diagnostics import effective_sample_size, energy_distance_test
from torchebm.integrators import MassMatrix
from torchebm.samplers.nuts import AsyncNUTS, NUTS, NoUTurnSampler, NoUTurnTransition, NUTSParams, native_leaf

Z = 4.5  # standard errors allowed per estimate: a false alarm per estimate has probability ~7e-6
DT = torch.float64


def mc_check(values: torch.Tensor, exact, z: float = Z):
    """Assert `values.mean((0, 1))` equals `exact` within `z` Monte Carlo standard errors.

    `values: [n_chains, n_draws, k]`; the standard error is sd / sqrt(ESS) with the ESS of the mean estimate."""
    exact = torch.as_tensor(exact, dtype=values.dtype)
    estimate = values.mean((0, 1))
    se = values.reshape(-1, values.shape[-1]).std(0) / effective_sample_size(values, method='mean').sqrt()
    assert bool(((estimate - exact).abs() < z * se).all()), f"estimate {estimate} vs exact {exact} (s.e. {se})"
    return estimate, se


def run(model, dim, n_chains=32, n_warmup=150, n_steps=150, seed=0, **kwargs):
    x0 = torch.randn(n_chains, dim, dtype=DT, generator=torch.Generator().manual_seed(seed))
    sampler = NoUTurnSampler(model, n_warmup=n_warmup, **kwargs)
    return sampler.sample(x=x0, n_steps=n_steps, return_trajectory=True, return_diagnostics=True,
                          generator=torch.Generator().manual_seed(seed + 1))


def gaussian_checks(trajectory, mean, cov):
    mc_check(trajectory, mean)
    centred = trajectory - mean
    mc_check(centred ** 2, cov.diagonal())


class Banana(torch.nn.Module):
    "x1 ~ N(0, 2^2), x2 | x1 ~ N(x1^2 / 2, 0.5^2)."
    def forward(self, x): return x[:, 0] ** 2 / 8 + 2 * (x[:, 1] - 0.5 * x[:, 0] ** 2) ** 2

    @staticmethod
    def exact(n, generator):
        x1 = 2 * torch.randn(n, generator=generator, dtype=DT)
        return torch.stack([x1, 0.5 * x1 ** 2 + 0.5 * torch.randn(n, generator=generator, dtype=DT)], 1)

    @staticmethod
    def cdf_x2(values):
        "P(x2 < c) = E[Phi((c - x1^2 / 2) / 0.5)] over x1 ~ N(0, 4), by the trapezoid rule (error below 1e-10)."
        x1 = torch.linspace(-20, 20, 40001, dtype=DT)
        density = torch.exp(-x1 ** 2 / 8) / math.sqrt(8 * math.pi)
        return [float(torch.trapezoid(density * normal_cdf((c - x1 ** 2 / 2) / 0.5), x1)) for c in values]


def normal_cdf(t):
    "The standard normal CDF of a float or a tensor."
    return 0.5 * (1 + (torch.erf(t / math.sqrt(2)) if isinstance(t, torch.Tensor) else math.erf(t / math.sqrt(2))))


class Funnel(torch.nn.Module):
    "Neal's funnel: v ~ N(0, 3^2), x_i | v ~ N(0, e^v)."
    def forward(self, x):
        v, z = x[:, 0], x[:, 1:]
        return v ** 2 / 18 + 0.5 * (z ** 2).sum(-1) * torch.exp(-v) + 0.5 * z.shape[1] * v


class Mixture(torch.nn.Module):
    "0.3 N(-1.5, 1) + 0.7 N(1.5, 1): overlapping modes, so one chain mixes between them."
    def forward(self, x):
        x = x[:, 0]
        return -torch.logaddexp(math.log(0.3) - 0.5 * (x + 1.5) ** 2, math.log(0.7) - 0.5 * (x - 1.5) ** 2)


def test_correlated_gaussian_dense_metric():
    cov = torch.tensor([[1.0, 0.9, 0.0, 0.0], [0.9, 1.0, 0.0, 0.0], [0.0, 0.0, 4.0, -1.0], [0.0, 0.0, -1.0, 1.0]], dtype=DT)
    mean = torch.tensor([1.0, -1.0, 0.0, 2.0], dtype=DT)
    trajectory, diag = run(GaussianModel(mean, cov), 4, metric='dense')
    gaussian_checks(trajectory, mean, cov)
    assert diag['is_divergent'].sum() == 0
    assert 0.6 < float(diag['accept_prob'].mean()) < 0.99  # dual averaging toward 0.8


@pytest.mark.slow
def test_ill_conditioned_gaussian_diagonal_metric():
    scales = torch.logspace(-1, 1, 6, dtype=DT)  # 100x spread: warm-up with a unit metric starts at depth ~7
    cov = torch.diag(scales ** 2)
    trajectory, diag = run(GaussianModel(torch.zeros(6, dtype=DT), cov), 6, metric='diagonal')
    gaussian_checks(trajectory, torch.zeros(6, dtype=DT), cov)
    assert float(diag['tree_depth'].float().mean()) < 4  # the adapted metric removed the scale spread


@pytest.mark.slow
def test_banana():
    """The mean of x1 and three probabilities (x1 < 1, x2 < 0.5, x2 < 2) against their exact values. Bounded
    statistics: the moments of x2 are heavy-tailed (x2^2 ~ x1^4 / 4), so runs of this length underestimate E[x2^2] =
    12.25 and its ESS-based standard error together, lockstep and asynchronous chains alike (|z| > 4.5 at 6 of 10
    seeds for lockstep chains, 4 of 10 for asynchronous ones), and a test on them passes or fails by the seed."""
    banana_checks(run(Banana(), 2, target_accept=0.9)[0])


def banana_checks(trajectory):
    mc_check(trajectory[..., :1], [0.0])
    x1, x2 = trajectory[..., 0], trajectory[..., 1]
    mc_check(torch.stack([x1 < 1, x2 < 0.5, x2 < 2], -1).to(DT), [normal_cdf(0.5), *Banana.cdf_x2([0.5, 2.0])])


@pytest.mark.slow
def test_funnel_marginal_of_v():
    """The mean of v ~ N(0, 3^2) is right and the divergences are reported. Its variance is not: like Stan's, this
    sampler cannot enter the centred funnel's neck (measured: E[v^2] = 6.3 +- 0.4 instead of 9, v rarely below
    -3.5), and the divergences are the warning; reparametrise (non-centred) to sample it."""
    with pytest.warns(RuntimeWarning, match='divergent transitions'):
        trajectory, diag = run(Funnel(), 2, n_steps=250, target_accept=0.95, seed=3)
    mc_check(trajectory[..., :1], [0.0])
    assert int(diag['is_divergent'].sum()) > 0
    assert diag['tree_depth'].max() > diag['tree_depth'].min()  # the tree adapts to the local scale


@pytest.mark.slow
def test_mixture_weights():
    trajectory, _ = run(Mixture(), 1, n_steps=300)
    exact_positive = 0.3 * 0.5 * math.erfc(1.5 / math.sqrt(2)) + 0.7 * 0.5 * math.erfc(-1.5 / math.sqrt(2))
    mc_check((trajectory > 0).to(DT), [exact_positive])
    mc_check(trajectory, [0.3 * -1.5 + 0.7 * 1.5])


@pytest.mark.slow
def test_conjugate_linear_regression():
    g = torch.Generator().manual_seed(7)
    n, d, sigma, tau = 30, 3, 0.5, 2.0
    X = torch.randn(n, d, dtype=DT, generator=g)
    y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=DT) + sigma * torch.randn(n, dtype=DT, generator=g)

    class Posterior(torch.nn.Module):
        def forward(self, beta): return 0.5 * ((y - beta @ X.T) ** 2).sum(-1) / sigma ** 2 + 0.5 * (beta ** 2).sum(-1) / tau ** 2

    precision = X.T @ X / sigma ** 2 + torch.eye(d, dtype=DT) / tau ** 2
    cov = torch.linalg.inv(precision)
    mean = cov @ X.T @ y / sigma ** 2
    trajectory, _ = run(Posterior(), d)
    gaussian_checks(trajectory, mean, cov)


# The three ways `NoUTurnSampler` grows trees: asynchronous chains (C++, the default on the CPU), lockstep chains with
# the C++ leaf, lockstep chains with the torch leaf.
PATHS = {'async': {}, 'lockstep C++ leaf': dict(asynchronous=False), 'torch leaf': dict(use_kernels=False)}


# A diagonal metric near the banana's scales (x1: sd 2, x2: sd 2.9): mass = 1 / variance.
BANANA_MASS = MassMatrix(torch.tensor([0.25, 0.125], dtype=DT))


def stationarity_p_value(k=4, n=600, seed=11, path='async', metric=MassMatrix(1.0), step_size=0.15):
    "Start at exact banana draws, apply `k` NUTS transitions with a fixed step size and metric, and test against fresh draws."
    g = torch.Generator().manual_seed(seed)
    model = Banana()
    transition = NoUTurnTransition()
    state = transition.init(model, Banana.exact(n, g))
    if path == 'async':
        chains = AsyncNUTS(native_leaf(state.x, metric)[0], model, state, step_size, metric, max_tree_depth=8)
        x = chains.run(k, generator=g)[0].x[-1]
    else:
        params = NUTSParams(step_size=step_size, metric=metric, max_tree_depth=8, use_kernels=path != 'torch leaf')
        for _ in range(k): state, _ = transition.step(model, state, params, generator=g)
        x = state.x
    return float(energy_distance_test(x, Banana.exact(n, g), n_permutations=200, generator=g).p_value)


@pytest.mark.parametrize('path', PATHS)
def test_stationarity_from_exact_draws(path):
    assert stationarity_p_value(path=path) > 0.01
    assert stationarity_p_value(path=path, metric=BANANA_MASS, step_size=0.1) > 0.01


def momenta_with_the_inverse_mass(self, x, generator=None):
    "A broken `MassMatrix.sample_momentum`: p ~ N(0, M^-1), where the kinetic energy assumes N(0, M) (the two confused)."
    eps = torch.randn(x.shape, generator=generator, dtype=x.dtype)
    if self.kind == 'scalar': return eps / self.scalar ** 0.5
    return eps * self._event(eps, self.inverse.sqrt())


def test_a_broken_nuts_fails_the_stationarity_test(monkeypatch):
    """With momenta drawn with the inverse mass the chains leave the banana within 4 draws: p = 1/201 (the smallest
    200 permutations give) on every path at seeds 11-13, against 0.13-0.92 for the real sampler."""
    monkeypatch.setattr(MassMatrix, 'sample_momentum', momenta_with_the_inverse_mass)
    for path in PATHS: assert stationarity_p_value(path=path, metric=BANANA_MASS, step_size=0.1) < 0.01


def unit_metric_gaussian(seed=0, **kwargs):
    "64 chains from exact draws of N(0, diag(0.25, 1, 4)), 100 NUTS draws with a fixed step size 0.7 and a unit metric."
    scales = torch.tensor([0.5, 1.0, 2.0], dtype=DT)
    x0 = scales * torch.randn(64, 3, dtype=DT, generator=torch.Generator().manual_seed(seed))
    sampler = NoUTurnSampler(GaussianModel(torch.zeros(3, dtype=DT), torch.diag(scales ** 2)), step_size=0.7,
                             metric='unit', n_warmup=0, **kwargs)
    trajectory = sampler.sample(x=x0, n_steps=100, return_trajectory=True, generator=torch.Generator().manual_seed(seed + 1))
    return trajectory, torch.zeros(3, dtype=DT), torch.diag(scales ** 2)


@pytest.mark.parametrize('path', PATHS)
def test_unit_metric_gaussian_with_fixed_step_size(path):
    gaussian_checks(*unit_metric_gaussian(**PATHS[path]))


def test_a_broken_nuts_fails_the_moment_test(monkeypatch):
    """Without the multinomial draw (always taking the newest leaf of a sub-tree, always moving to a new sub-tree) the
    draw sits at the trajectory's edge: the variance of the widest coordinate comes out ~19 standard errors too big."""
    import torchebm.samplers.nuts as nuts
    monkeypatch.setattr(nuts, '_uniform_log', lambda shape, like, generator: like.new_full(torch.Size([shape]) if isinstance(shape, int) else shape, -math.inf))
    real = nuts.AsyncNUTS.randomness
    def always_newest(self, generator=None):  # the asynchronous chains' uniforms of both draws set to 0: log u = -inf
        u = real(self, generator)
        return torch.cat([torch.zeros_like(u[:, :2]), u[:, 2:]], 1)
    monkeypatch.setattr(nuts.AsyncNUTS, 'randomness', always_newest)
    for path in PATHS:
        with pytest.raises(AssertionError, match='estimate'): gaussian_checks(*unit_metric_gaussian(**PATHS[path]))


@pytest.mark.slow
def test_a_broken_nuts_fails_the_banana_test(monkeypatch):
    """Momenta drawn with the inverse mass (`momenta_with_the_inverse_mass`): the refreshed momenta are too big by the
    adapted scales (~2-3 here), and the chains spread too far up the banana's arms. `test_banana`'s checks reject it
    (P(x2 < 0.5) off by 7-14 standard errors at seeds 0 and 1 on each of the three paths; the unit-metric Gaussian test
    cannot see this bug). Run here on the default path; `test_a_broken_nuts_fails_the_stationarity_test` runs all three."""
    monkeypatch.setattr(MassMatrix, 'sample_momentum', momenta_with_the_inverse_mass)
    with pytest.raises(AssertionError, match='estimate'): banana_checks(run(Banana(), 2, target_accept=0.9)[0])


def test_float32_per_chain_step_sizes_and_reproducible():
    model = GaussianModel(torch.zeros(3), torch.eye(3))
    x0 = torch.randn(16, 3)
    sampler = NUTS(model, step_size=torch.linspace(0.3, 0.9, 16), metric='unit', n_warmup=0)
    a = sampler.sample(x=x0, n_steps=5, return_diagnostics=True, generator=torch.Generator().manual_seed(0))
    b = sampler.sample(x=x0, n_steps=5, return_diagnostics=True, generator=torch.Generator().manual_seed(0))
    assert a[0].dtype == torch.float32 and torch.equal(a[0], b[0])
    assert a[1]['accept_prob'].dtype == torch.float32 and a[1]['tree_depth'].shape == (5, 16)


def test_max_tree_depth_is_reported():
    model = GaussianModel(torch.zeros(2, dtype=DT), torch.eye(2, dtype=DT))
    sampler = NoUTurnSampler(model, step_size=0.01, metric='unit', max_tree_depth=3, n_warmup=0)
    with pytest.warns(RuntimeWarning, match=r'8 of 8 chains .* trees that stopped at the maximum depth'):
        _, diag = sampler.sample(x=torch.zeros(8, 2, dtype=DT), n_steps=3, return_diagnostics=True,
                                 generator=torch.Generator().manual_seed(0))
    assert bool(diag['hit_max_depth'].all()) and bool((diag['tree_depth'] == 3).all())
    assert bool((diag['n_leapfrog'] == 7).all())


def test_divergences_are_counted_and_warned():
    model = GaussianModel(torch.zeros(2, dtype=DT), torch.diag(torch.tensor([1.0, 1e-4], dtype=DT)))
    sampler = NoUTurnSampler(model, step_size=1.0, metric='unit', n_warmup=0)
    with pytest.warns(RuntimeWarning, match='divergent transitions'):
        result = sampler.sample(x=torch.zeros(4, 2, dtype=DT), n_steps=3, return_result=True,
                                generator=torch.Generator().manual_seed(0))
    assert bool((result.n_divergent == 3).all())


def test_divergence_warning_states_the_samplers_own_limit():
    model = GaussianModel(torch.zeros(2, dtype=DT), torch.diag(torch.tensor([1.0, 1e-4], dtype=DT)))
    sampler = NoUTurnSampler(model, step_size=1.0, metric='unit', n_warmup=0, max_energy_error=50.0)
    with pytest.warns(RuntimeWarning, match=r'energy error above 50 or not finite'):
        sampler.sample(x=torch.zeros(4, 2, dtype=DT), n_steps=3, generator=torch.Generator().manual_seed(0))


def test_warmup_runs_through_the_shared_loop_with_its_own_progress_bar(capsys):
    model = GaussianModel(torch.zeros(2, dtype=DT), torch.eye(2, dtype=DT))
    sampler = NoUTurnSampler(model, step_size=0.5, n_warmup=30)
    result = sampler.sample(x=torch.zeros(4, 2, dtype=DT), n_steps=5, thin=10, return_trajectory=True,
                            return_result=True, progress=True, generator=torch.Generator().manual_seed(0))
    assert 'NoUTurnSampler warm-up' in capsys.readouterr().err
    assert result.warmup.shape == (4, 3, 2) and result.samples.shape == (4, 0, 2)


def test_result_returns_adapted_parameters_and_warmup():
    model = GaussianModel(torch.zeros(2, dtype=DT), torch.diag(torch.tensor([1.0, 9.0], dtype=DT)))
    sampler = NoUTurnSampler(model, n_warmup=120)
    result = sampler.sample(x=torch.zeros(8, 2, dtype=DT), n_steps=10, thin=2, return_trajectory=True,
                            return_result=True, generator=torch.Generator().manual_seed(0))
    assert result.samples.shape == (8, 5, 2) and result.warmup.shape == (8, 60, 2)
    assert result.adapted.step_size.shape == (8,) and result.adapted.metric.kind == 'diagonal'
    assert 3 < float(result.adapted.metric.inverse[1] / result.adapted.metric.inverse[0]) < 30


def test_warm_start_skips_warmup_and_reuses_what_was_adapted():
    model = GaussianModel(torch.zeros(2, dtype=DT), torch.diag(torch.tensor([1.0, 9.0], dtype=DT)))
    sampler = NoUTurnSampler(model, n_warmup=100)
    first = sampler.sample(x=torch.zeros(8, 2, dtype=DT), n_steps=5, return_result=True,
                           generator=torch.Generator().manual_seed(0))
    again = sampler.sample(x=first.samples, n_steps=5, return_result=True, return_diagnostics=True,
                           warm_start=first.adapted, generator=torch.Generator().manual_seed(1))
    assert int(again.diagnostics['warmup_n_grad_evals']) == 0
    assert torch.equal(again.adapted.step_size, first.adapted.step_size)
    assert torch.equal(again.adapted.metric.inverse, first.adapted.metric.inverse)
    with pytest.raises(TypeError, match='warm_start'):
        sampler.sample(x=first.samples, n_steps=1, warm_start=(0.1, None))


class NarrowWell(torch.nn.Module):
    "N(0, 1) plus a well of width 1e-3 at x = 50: a chain started in the well accepts nothing with the others' step size."
    def forward(self, x):
        x = x[:, 0]
        return -torch.logaddexp(-0.5 * x ** 2, -0.5 * ((x - 50) / 1e-3) ** 2 - 20.0)


@pytest.mark.parametrize('restart_every, restarted', [(50, True), (0, False)])
def test_stuck_chains_restart_in_warmup(restart_every, restarted):
    x0 = torch.cat([torch.tensor([[50.0]], dtype=DT), torch.randn(7, 1, dtype=DT, generator=torch.Generator().manual_seed(0))])
    sampler = NoUTurnSampler(NarrowWell(), n_warmup=100, adapt_per_chain=False, metric='unit', restart_every=restart_every)
    result = sampler.sample(x=x0, n_steps=1, return_result=True, generator=torch.Generator().manual_seed(1))
    assert bool(result.samples[0, 0].abs() < 10) == restarted


def test_jitter_changes_the_step_sizes_only_after_warmup():
    model = GaussianModel(torch.zeros(2, dtype=DT), torch.eye(2, dtype=DT))
    x0 = torch.zeros(8, 2, dtype=DT)
    plain, jit = (NoUTurnSampler(model, step_size=0.5, metric='unit', n_warmup=0, jitter=j) for j in (0.0, 0.5))
    a, da = plain.sample(x=x0, n_steps=3, return_diagnostics=True, generator=torch.Generator().manual_seed(0))
    b, db = jit.sample(x=x0, n_steps=3, return_diagnostics=True, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(a, b) and torch.equal(da['step_size'], db['step_size'])


@pytest.mark.parametrize('kwargs, match', [
    (dict(jitter=1.0), 'jitter'), (dict(restart_every=-1), 'restart_every'),
    (dict(metric='diag'), "expected one of"), (dict(max_tree_depth=0), 'max_tree_depth'),
    (dict(target_accept=0.0), 'target_accept'), (dict(n_warmup=-1), 'n_warmup'),
    (dict(max_energy_error=-1.0), 'max_energy_error'), (dict(step_size=0.0), 'step_size')])
def test_bad_constructor_arguments(kwargs, match):
    model = GaussianModel(torch.zeros(2), torch.eye(2))
    with pytest.raises((ValueError, TypeError), match=match): NoUTurnSampler(model, **kwargs)


def test_step_size_of_wrong_shape():
    model = GaussianModel(torch.zeros(2), torch.eye(2))
    with pytest.raises(ValueError, match=r'\[n_chains\]'):
        NoUTurnSampler(model, step_size=torch.ones(3), n_warmup=0).sample(x=torch.zeros(4, 2), n_steps=1)


class ModeRecorder(torch.nn.Module):
    "A standard Gaussian energy that records its `training` flag on every call."
    def __init__(self):
        super().__init__()
        self.modes = []

    def forward(self, x):
        self.modes.append(self.training)
        return 0.5 * (x ** 2).sum(-1)


def test_sample_runs_the_model_in_eval_mode_and_restores_it():
    model = ModeRecorder().train()
    NoUTurnSampler(model, n_warmup=5, max_tree_depth=3).sample(x=torch.zeros(4, 2, dtype=DT), n_steps=3,
                                                              generator=torch.Generator().manual_seed(0))
    assert model.modes and not any(model.modes) and model.training
    model.eval()
    NoUTurnSampler(model, n_warmup=0, step_size=0.5).sample(x=torch.zeros(4, 2, dtype=DT), n_steps=1)
    assert not model.training


def test_model_argument_samples_another_model_for_one_run():
    first = GaussianModel(torch.zeros(2, dtype=DT), torch.eye(2, dtype=DT))
    other = GaussianModel(torch.tensor([3.0, -3.0], dtype=DT), torch.diag(torch.tensor([1.0, 4.0], dtype=DT)))
    x0 = torch.randn(8, 2, dtype=DT, generator=torch.Generator().manual_seed(0))
    sample = lambda sampler, **kw: sampler.sample(x=x0, n_steps=20, n_warmup=100, return_result=True,
                                                  return_trajectory=True, generator=torch.Generator().manual_seed(1), **kw)
    sampler = NoUTurnSampler(first)
    got, expected = sample(sampler, model=other), sample(NoUTurnSampler(other))
    assert torch.equal(got.samples, expected.samples) and torch.equal(got.adapted.step_size, expected.adapted.step_size)
    assert sampler.model is first
    assert torch.equal(sample(sampler).samples, sample(NoUTurnSampler(first)).samples)  # the constructor's model again
    assert torch.equal(sample(NoUTurnSampler(), model=other).samples, expected.samples)  # no model in the constructor
    with pytest.raises(ValueError, match='model='):
        NoUTurnSampler().sample(x=x0, n_steps=1)


def test_stuck_chain_is_named_once_and_a_healthy_run_does_not_warn():
    model = GaussianModel(torch.zeros(2, dtype=DT), torch.eye(2, dtype=DT))
    x0 = torch.randn(4, 2, dtype=DT, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # a healthy run, from the same sampler class and start, says nothing
        NoUTurnSampler(model, n_warmup=0, step_size=0.5).sample(x=x0, n_steps=30, generator=torch.Generator().manual_seed(1))
    # chain 1 leapfrogs with an absurd step size and no warm-up to adapt it: every tree diverges at its first leaf
    sampler = NoUTurnSampler(model, n_warmup=0, step_size=torch.tensor([0.5, 1e3, 0.5, 0.5], dtype=DT))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        result = sampler.sample(x=x0, n_steps=30, return_result=True, generator=torch.Generator().manual_seed(1))
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 2, messages  # one per problem: acceptance collapse and divergences
    assert sum('chains [1]) had acceptance below 0.01' in m for m in messages) == 1, messages
    assert sum('chains [1]) had divergent transitions' in m for m in messages) == 1, messages
    assert result.n_divergent.tolist() == [0, 30, 0, 0] and float(result.accept_rate[1]) < 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # the same problems in the next run of this sampler are not warned again
        sampler.sample(x=x0, n_steps=30, generator=torch.Generator().manual_seed(2))


# ---- the C++ leaf (`native_grow_leaf`) against the torch leaf (`grow_leaf`) ----------------------------------------
def subtrees_both_ways(dtype, metric, depth, seed=0, event=(2, 3), n=24):
    "One sub-tree of `depth` from the same start and random numbers, grown by the torch leaf and by the C++ leaf."
    import torchebm.samplers.nuts as nuts
    g = torch.Generator().manual_seed(seed)
    d = math.prod(event)
    model = GaussianModel(torch.linspace(-1, 1, d, dtype=dtype), torch.diag(torch.linspace(0.5, 2.0, d, dtype=dtype)))
    flat = lambda t: t.reshape(n, *event)
    x = flat(torch.randn(n, d, generator=g, dtype=dtype))
    energy, grad = model.energy_and_gradient(x.reshape(n, d))
    p = metric.sample_momentum(x, g)
    start = nuts.Leaf(x, energy, flat(grad), p, metric.velocity(p))
    h = 0.3 * (torch.rand(n, generator=g, dtype=dtype) + 0.5) * torch.where(torch.rand(n, generator=g) < 0.5, 1, -1).to(dtype)
    h0 = energy + nuts.kinetic(start)
    active = torch.rand(n, generator=g) < 0.9

    class EventModel(torch.nn.Module):  # the Gaussian on [n, 2, 3] events, through autograd
        def forward(self, x): return model(x.reshape(x.shape[0], -1))
    out = []
    for native in (None, nuts.native_leaf(x, metric)):
        sub, ran = nuts.build_subtree(EventModel(), start, h, metric, depth, h0, active, 1000.0,
                                      torch.Generator().manual_seed(seed + 1), native=native)
        out.append((sub, ran))
    return out


def flat_fields(t):
    return [f for field in t for f in (flat_fields(field) if isinstance(field, tuple) else [field])]


def assert_same_subtree(ref, got, **tol):
    "Every field of two sub-trees: floats within `tol` (exactly equal without one), flags and counts equal."
    for a, b in zip(flat_fields(ref), flat_fields(got)):
        assert a.dtype == b.dtype and a.shape == b.shape
        if a.is_floating_point() and tol: torch.testing.assert_close(b, a, **tol)
        else: assert torch.equal(a, b), (a, b)


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize('metric_kind', ['unit', 'scalar', 'diagonal'])
def test_native_leaf_grows_the_same_subtree_as_the_torch_leaf(dtype, metric_kind):
    from torchebm.samplers.nuts import native_leaf
    metric = {'unit': MassMatrix(1.0), 'scalar': MassMatrix(2.5),
              'diagonal': MassMatrix(torch.linspace(0.5, 3.0, 6, dtype=dtype).reshape(2, 3))}[metric_kind]
    assert native_leaf(torch.zeros(2, 2, 3, dtype=dtype), metric) is not None, 'the C++ leaf is not available'
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    mixed = False  # some sub-tree where some chains turned and others did not
    for depth in range(8):
        (ref, ran_ref), (got, ran_got) = subtrees_both_ways(dtype, metric, depth, seed=depth)
        assert ran_ref == ran_got
        assert_same_subtree(ref, got, **tol)
        mixed |= bool(ref.is_turning.any()) and not bool(ref.is_turning.all())
    assert mixed, 'no U-turn was exercised'


def test_native_leaf_splits_many_chains_over_threads_with_the_same_numbers():
    "512 chains of 64 numbers: the C++ leaf splits them over torch's threads; 1 or 2 threads, the same bits."
    metric = MassMatrix(torch.linspace(0.5, 2.0, 64, dtype=DT))
    threads = torch.get_num_threads()
    grown = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            grown.append(subtrees_both_ways(DT, metric, 4, event=(8, 8), n=512))
    finally: torch.set_num_threads(threads)
    for (ref, _), (got, _) in grown: assert_same_subtree(ref, got, rtol=1e-12, atol=1e-12)
    assert_same_subtree(grown[0][1][0], grown[1][1][0])  # the C++ leaf on 1 and on 2 threads: bitwise


def test_native_leaf_serves_eager_cpu_chains_with_a_scalar_or_diagonal_metric(monkeypatch):
    import torchebm.samplers.nuts as nuts
    import torchebm.cuda as cuda
    calls = []
    real = nuts.native_grow_leaf
    monkeypatch.setattr(nuts, 'native_grow_leaf', lambda *a, **k: calls.append(1) or real(*a, **k))
    model = GaussianModel(torch.zeros(2, dtype=DT), torch.eye(2, dtype=DT))
    x0 = torch.randn(8, 2, dtype=DT, generator=torch.Generator().manual_seed(0))
    def leaves(**kwargs):
        calls.clear()
        NoUTurnSampler(model, n_warmup=0, step_size=0.5, asynchronous=False, **kwargs).sample(x=x0, n_steps=3)
        return len(calls)
    assert leaves(metric='unit') > 0 and leaves(metric='diagonal') > 0
    assert leaves(use_kernels=False) == 0
    assert leaves(metric=torch.tensor([[1.0, 0.3], [0.3, 1.0]], dtype=DT)) == 0  # a dense mass
    assert leaves(metric='dense') > 0  # not adapted yet (no warm-up): the unit metric
    cuda.disable_kernels()
    try: assert leaves() == 0
    finally: cuda.enable_kernels()
    class Float32Energy(torch.nn.Module):  # energies in another dtype than the chains: H would be kept in float32
        def forward(self, x): return (0.5 * (x ** 2).sum(-1)).float()
    calls.clear()
    NoUTurnSampler(Float32Energy(), n_warmup=0, step_size=0.5, asynchronous=False).sample(x=x0, n_steps=3)
    assert len(calls) == 0
    # chains in strided memory (a transposed view) take the C++ leaf and give the numbers of contiguous ones
    strided = x0.T.contiguous().T
    assert not strided.is_contiguous()
    runs = [NoUTurnSampler(model, n_warmup=5).sample(x=x, n_steps=3, generator=torch.Generator().manual_seed(2))
            for x in (strided, x0)]
    assert torch.equal(runs[0], runs[1])
    assert nuts.native_leaf(x0.half(), MassMatrix(1.0)) is None
    assert nuts.native_leaf(x0.to(torch.bfloat16), MassMatrix(1.0)) is None


def test_native_and_torch_nuts_runs_agree_to_rounding():
    "Warm-up and draws through each leaf, same seed: float64 chains that differ only by rounding stay together."
    model = GaussianModel(torch.tensor([1.0, -1.0, 0.5], dtype=DT),
                          torch.tensor([[1.0, 0.9, 0.0], [0.9, 1.0, 0.2], [0.0, 0.2, 2.0]], dtype=DT))
    x0 = torch.randn(16, 3, dtype=DT, generator=torch.Generator().manual_seed(0))
    runs = [NoUTurnSampler(model, n_warmup=50, use_kernels=k, asynchronous=False).sample(
                x=x0, n_steps=30, return_result=True, return_trajectory=True, return_diagnostics=True,
                generator=torch.Generator().manual_seed(1)) for k in (True, False)]
    a, b = runs
    torch.testing.assert_close(a.samples, b.samples, rtol=1e-6, atol=1e-6)
    for key in ('tree_depth', 'n_leapfrog', 'is_divergent'): assert torch.equal(a.diagnostics[key], b.diagnostics[key])
    torch.testing.assert_close(a.adapted.step_size, b.adapted.step_size, rtol=1e-6, atol=0)


# ---- asynchronous chains -----------------------------------------------------------------------------------------
def one_chain_async(model, x, step_size, metric, momenta, ticks, n_draws, max_tree_depth, jitter=0.0, dual=None):
    """One chain's asynchronous draws rebuilt from the lockstep pieces (`grow_leaf`, `join_subtree`,
    `dual_averaging_update`) on its random numbers: the momenta its draws started with, in order, and its row of each
    tick's uniforms, `ticks[t]: [1, 4]` (`ticks[0]` starts the first draw). Returns the draws as `(Draw, accept_prob,
    depth, n_leapfrog, hit_max_depth)`, and `dual`."""
    import torchebm.samplers.nuts as nuts
    from torchebm.samplers.mcmc import dual_averaging_update
    from torchebm.samplers.transitions import model_energy_and_gradient
    energy, grad = model_energy_and_gradient(model, x)
    draw, draws, ticks, momenta = (x, energy, grad), [], iter(ticks), iter(momenta)
    def begin_draw(u):
        p = next(momenta)
        start = nuts.Leaf(*draw, p, metric.velocity(p))
        eps = step_size * (1 + jitter * (2 * u[:, 3] - 1)) if jitter else step_size
        return nuts.start_trajectory(start), start.energy + nuts.kinetic(start), eps
    def begin_subtree(u):
        forward = u[:, 2] < 0.5
        leaf = traj.right if bool(forward) else traj.left
        return forward, leaf, nuts.empty_subtree(leaf, traj.active, int(traj.depth) + 1), 0, torch.where(forward, eps, -eps)
    u = next(ticks)
    traj, h0, eps = begin_draw(u)
    forward, leaf, sub, k, h = begin_subtree(u)
    while len(draws) < n_draws:
        u = next(ticks)
        depth = int(traj.depth)
        leaf, sub = nuts.grow_leaf(model, leaf, h, metric, h0, sub, u[:, 0].log(),
                                   nuts.level_masks(depth + 1, x.device)[k], 1000.0)
        first, k = leaf if k == 0 else first, k + 1
        if k < 2 ** depth and bool(sub.alive): continue
        traj = nuts.join_subtree(traj, nuts.Subtree(first, leaf, sub.proposal, sub.rho, sub.log_weight, sub.is_turning,
                                                    sub.is_divergent, sub.sum_accept, sub.n_leapfrog), forward, u[:, 1].log())
        if not bool(traj.active) or int(traj.depth) == max_tree_depth:
            accept = traj.sum_accept / traj.n_leapfrog.clamp(min=1)
            draws.append((traj.proposal, accept, traj.depth, traj.n_leapfrog, traj.active))
            draw = traj.proposal[:3]
            if dual is not None:
                dual = dual_averaging_update(dual, accept, 0.8, 0.05)
                step_size = dual.log_step_size.exp()
            if len(draws) == n_draws: break
            traj, h0, eps = begin_draw(u)
        forward, leaf, sub, k, h = begin_subtree(u)
    return draws, dual


class StartedMomenta:
    "The extension of `chains`, recording after each call the momentum every chain started a draw with."
    def __init__(self, chains):
        self.ext, self.chains, self.momenta = chains.ext, chains, [[] for _ in range(chains.shape[0])]
    def __getattr__(self, name): return getattr(self.ext, name)
    def note(self):
        f = self.chains.field
        for c in ((f['depth'] == 0) & (f['leaf'] == 0)).nonzero().flatten().tolist():  # just started a draw
            self.momenta[c].append(f['left_p'][c:c + 1].clone())
    def nuts_async_start(self, *args): return self.noted(self.ext.nuts_async_start(*args))
    def nuts_async_advance(self, *args): return self.noted(self.ext.nuts_async_advance(*args))
    def noted(self, result):
        self.note()
        return result


@pytest.mark.parametrize('adapt', [False, True])
def test_async_chains_are_the_lockstep_pieces_chain_by_chain(adapt):
    """Five chains (banana, diagonal metric, per-chain step sizes, jitter, max depth 6 reached) run asynchronously and
    rebuilt one by one from `grow_leaf` and `join_subtree` on the same random numbers: the same draws to rounding, the
    same depths and step counts; with dual averaging, the same step sizes."""
    from torchebm.samplers.mcmc import dual_averaging_init
    n, model = 5, Banana()
    x0 = torch.randn(n, 2, dtype=DT, generator=torch.Generator().manual_seed(0))
    metric = MassMatrix(torch.tensor([0.5, 2.0], dtype=DT))
    steps = torch.linspace(0.02, 0.6, n, dtype=DT)
    chains = AsyncNUTS(native_leaf(x0, metric)[0], model, NoUTurnTransition().init(model, x0), steps, metric, 6)
    ticks, real = [], chains.randomness
    chains.randomness = lambda generator: ticks.append(real(generator)) or ticks[-1]
    chains.ext = started = StartedMomenta(chains)
    dual = dual_averaging_init(steps) if adapt else None
    records, n_ticks = chains.run(15, torch.Generator().manual_seed(3), jitter=0.2, dual=dual)
    assert n_ticks == len(ticks) - 1 == int(records.n_leapfrog.sum(0).max())  # the busiest chain sets the ticks
    assert bool((records.tree_depth == 6).any()) and bool(records.hit_max_depth.any())
    for c in range(n):
        one = None if dual is None else type(dual)(*(v[c:c + 1] for v in dual[:4]), dual.count)
        draws, one = one_chain_async(model, x0[c:c + 1], steps[c:c + 1], metric, started.momenta[c],
                                     [u[c:c + 1] for u in ticks], 15, 6, jitter=0.2, dual=one)
        torch.testing.assert_close(torch.cat([d[0].x for d in draws]), records.x[:, c], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(torch.cat([d[0].energy_error for d in draws]), records.energy_error[:, c], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(torch.cat([d[1] for d in draws]), records.accept_prob[:, c], rtol=1e-9, atol=1e-9)
        for i, key in ((2, 'tree_depth'), (3, 'n_leapfrog'), (4, 'hit_max_depth')):
            assert torch.equal(torch.cat([d[i] for d in draws]), getattr(records, key)[:, c])
        if adapt: torch.testing.assert_close(chains.dual(15).log_step_size[c:c + 1], one.log_step_size, rtol=1e-9, atol=1e-9)


def test_async_chains_split_over_threads_with_the_same_numbers():
    "512 chains of 64 numbers: any thread count gives the same bits."
    model = GaussianModel(torch.zeros(64, dtype=DT), torch.diag(torch.linspace(0.5, 2.0, 64, dtype=DT)))
    x0 = torch.randn(512, 64, dtype=DT, generator=torch.Generator().manual_seed(0))
    threads, runs = torch.get_num_threads(), []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            runs.append(NoUTurnSampler(model, n_warmup=10).sample(x=x0, n_steps=3, generator=torch.Generator().manual_seed(1)))
    finally: torch.set_num_threads(threads)
    assert torch.equal(runs[0], runs[1])


def test_async_chains_serve_where_the_cpp_leaf_does():
    import torchebm.cuda as cuda
    model = GaussianModel(torch.zeros(2, dtype=DT), torch.eye(2, dtype=DT))
    x0 = torch.randn(8, 2, dtype=DT, generator=torch.Generator().manual_seed(0))
    state = NoUTurnTransition().init(model, x0)
    def serves(mass=MassMatrix(1.0), **kwargs):
        return NoUTurnSampler(model, **kwargs).async_chains(model, state, 0.5, mass) is not None
    assert serves() and serves(MassMatrix(torch.ones(2, dtype=DT))) and serves(metric='unit')
    assert not serves(asynchronous=False) and not serves(use_kernels=False)
    assert not serves(metric='dense')  # the metric warm-up would adapt is dense
    assert not serves(MassMatrix(torch.eye(2, dtype=DT)))
    cuda.disable_kernels()
    try: assert not serves()
    finally: cuda.enable_kernels()


def test_async_warmup_adapts_each_chain():
    "Asynchronous warm-up: each chain's step size reaches the target acceptance; the metric is adapted from every chain."
    model = GaussianModel(torch.zeros(3, dtype=DT), torch.diag(torch.tensor([0.1, 1.0, 10.0], dtype=DT)))
    x0 = torch.randn(16, 3, dtype=DT, generator=torch.Generator().manual_seed(0))
    result = NoUTurnSampler(model, n_warmup=200).sample(x=x0, n_steps=100, return_result=True, return_diagnostics=True,
                                                         generator=torch.Generator().manual_seed(1))
    accept = result.diagnostics['accept_prob'].mean(0)
    # Stan's final step size exp(x-bar) accepts above the 0.8 target; one chain's mean over 100 draws moves by ~0.03
    assert bool(((accept > 0.65) & (accept < 0.98)).all()) and 0.8 < float(accept.mean()) < 0.95, accept
    inverse = result.adapted.metric.inverse
    assert 30 < float(inverse[2] / inverse[0]) < 300  # variances 0.1 and 10
    assert result.adapted.step_size.shape == (16,) and float(result.adapted.step_size.std()) > 0


def test_async_chains_reject_bad_input():
    model = GaussianModel(torch.zeros(2, dtype=DT), torch.eye(2, dtype=DT))
    state = NoUTurnTransition().init(model, torch.zeros(4, 2, dtype=DT))
    ext = native_leaf(state.x, MassMatrix(1.0))[0]
    with pytest.raises(ValueError, match='metric'):
        AsyncNUTS(ext, model, state, 0.5, MassMatrix(torch.eye(2, dtype=DT)))
    with pytest.raises(ValueError, match='step_size'): AsyncNUTS(ext, model, state, -0.5, MassMatrix(1.0))
    with pytest.raises(ValueError, match='max_tree_depth'): AsyncNUTS(ext, model, state, 0.5, MassMatrix(1.0), max_tree_depth=0)
    chains = AsyncNUTS(ext, model, state, 0.5, MassMatrix(1.0))
    with pytest.raises(ValueError, match='n_draws'): chains.run(-1)
    records, ticks = chains.run(0)
    assert ticks == 0 and records.x.shape == (0, 4, 2)


def test_async_chains_keep_the_event_shape():
    "Chains of [2, 3] events run asynchronously as flat rows and come back in their shape, with their energies."
    class EventGaussian(torch.nn.Module):
        def forward(self, x): return 0.5 * (x ** 2).sum((1, 2))
    model = EventGaussian()
    state = NoUTurnTransition().init(model, torch.randn(8, 2, 3, dtype=DT, generator=torch.Generator().manual_seed(0)))
    chains = AsyncNUTS(native_leaf(state.x, MassMatrix(1.0))[0], model, state, 0.5, MassMatrix(1.0))
    draws = chains.run(3, generator=torch.Generator().manual_seed(1))[0]
    x = draws.x[-1].view(8, 2, 3)
    torch.testing.assert_close(draws.energy[-1], model(x))
    result = NoUTurnSampler(model, n_warmup=50).sample(x=state.x, n_steps=5, return_trajectory=True,
                                                       generator=torch.Generator().manual_seed(2))
    assert result.shape == (8, 5, 2, 3)


def test_warm_start_with_a_warmup_starts_from_the_adapted_values():
    """`warm_start=` alone samples with the given step sizes and metric; with `n_warmup=` a warm-up starts from them (as
    Stan's `stepsize` and `inv_metric`), instead of the explicit `n_warmup` being ignored."""
    model = GaussianModel(torch.zeros(2, dtype=DT), torch.diag(torch.tensor([1.0, 9.0], dtype=DT)))
    x0 = torch.randn(8, 2, dtype=DT, generator=torch.Generator().manual_seed(0))
    first = NoUTurnSampler(model, n_warmup=150).sample(x=x0, n_steps=5, return_result=True,
                                                       generator=torch.Generator().manual_seed(1))
    sampler = NoUTurnSampler(model, n_warmup=150)
    reuse = sampler.sample(x=x0, n_steps=5, return_result=True, warm_start=first.adapted)
    assert torch.equal(reuse.adapted.step_size, first.adapted.step_size) and reuse.warmup is None
    seen = []
    real = NoUTurnSampler.warmup
    def spy(self, model, state, n_warmup, *args):
        seen.append((n_warmup, args[-1]))
        return real(self, model, state, n_warmup, *args)
    NoUTurnSampler.warmup = spy
    try: again = sampler.sample(x=x0, n_steps=5, n_warmup=30, return_result=True, warm_start=first.adapted,
                                generator=torch.Generator().manual_seed(2))
    finally: NoUTurnSampler.warmup = real
    assert seen == [(30, first.adapted)]
    assert not torch.equal(again.adapted.step_size, first.adapted.step_size)  # adapted further
    assert bool((again.adapted.step_size / first.adapted.step_size).log().abs().max() < math.log(3))  # from there


@pytest.mark.slow
def test_async_chains_give_the_same_numbers_run_after_run():
    """Same seed, same numbers, however the heap lies: a funnel warm-up (stuck-chain restarts, per-chain dual averaging,
    deep trees) four times in one process, with allocations of other sizes in between. With fused multiply-adds in the
    C++ engine, GCC's alias-checked vector and scalar versions of a loop rounded the last chain's energy error
    differently, and the adapted step sizes came out different in most such series."""
    model = Funnel()
    x0 = 4 * torch.rand(64, 4, dtype=DT, generator=torch.Generator().manual_seed(0)) - 2
    runs = []
    for k in range(4):
        heap = [torch.empty(1000 + 777 * k + 13 * j, dtype=DT) for j in range(20)]  # noqa: F841 (moves later allocations)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', RuntimeWarning)
            result = NoUTurnSampler(model, n_warmup=200, metric='diagonal').sample(
                x=x0, n_steps=1, return_result=True, generator=torch.Generator().manual_seed(0))
        runs.append(result.adapted.step_size)
    assert all(torch.equal(runs[0], r) for r in runs[1:]), [float(r.sum()) for r in runs]


def test_diagnostics_of_a_run_without_draws_keep_their_dtypes():
    "n_steps=0 gives empty per-draw diagnostics with the dtypes of a run with draws (bool flags, int64 counts)."
    sampler, x = NoUTurnSampler(GaussianModel(torch.zeros(2), torch.eye(2)), step_size=0.3), torch.randn(4, 2)
    dtypes = lambda n_steps: {k: v.dtype for k, v in
                              sampler.sample(x, n_steps=n_steps, n_warmup=0, return_diagnostics=True)[1].items()}
    assert dtypes(0) == dtypes(1)
