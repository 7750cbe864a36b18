"""SG-MCMC samplers checked against the closed-form posterior of a conjugate Bayesian linear regression.

Model: y = X w + sigma * eps, prior w ~ N(0, s^2 I): the posterior is N(mu, Sigma) with
Sigma = (X^T X / sigma^2 + I / s^2)^-1 and mu = Sigma X^T y / sigma^2 (N = 200 examples, d = 2, batch n = 50).

How the tolerances are derived (`check_moments`): a moment estimated from the draws must satisfy
    |estimate - exact| <= Z * MCSE + bias,   Z = 4,
- MCSE from the project's ESS (`effective_sample_size(..., 'mean')`, all chains): sd / sqrt(ESS) for the mean,
  and sd((w - mean)^2) / sqrt(ESS of (w - mean)^2) for the variance.
- bias: for a Gaussian target the minibatch gradient is linear in w plus noise, so every scheme here is a linear
  recursion whose stationary MEAN is exact (bias 0). Its stationary VARIANCE is not: along an eigen-direction of the
  posterior precision (eigenvalue lam) with gradient-noise variance V it is the fixed point of Sigma = A Sigma A^T + Q
  (`stationary_variance`), e.g. for SGLD (2h + h^2 V) / (1 - (1 - h lam)^2) = (1 / lam)(1 + hV/2) / (1 - h lam/2),
  a relative bias O(h (lam + V)). The bound takes the largest relative bias over lam in {lam_min, lam_max} and
  V in {0, V_max} (V_max: the largest eigenvalue of the minibatch gradient covariance N^2/n * Cov_i(grad log p(y_i|x_i,w))
  at mu) at the LARGEST step size among the kept draws (steps decrease in every run here).
A deliberately broken variant (the N/n factor dropped: a loader whose dataset_size is the batch size) fails the
same check (`test_missing_n_over_n_scaling_fails_the_check`).
"""
import math
import warnings

import pytest
import torch
from torch import nn

from torchebm.diagnostics import effective_sample_size
from torchebm.samplers import SGHMC, SGLD, CyclicalSGLD, PreconditionedSGLD, pSGLD
from torchebm.core.schedulers import CyclicalCosineScheduler, PolynomialDecayScheduler

N, D, BATCH, SIGMA, PRIOR = 200, 2, 50, 1.0, 1.0
Z = 4.0
OPTIONS = dict(noise_scale=SIGMA, prior_scale=PRIOR)
RUN = dict(batch_size=BATCH, n_chains=32, n_steps=800, burn_in=300)


@pytest.fixture(scope='module')
def problem():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = X @ torch.tensor([0.5, -1.0], dtype=torch.float64) + SIGMA * torch.randn(N, generator=g, dtype=torch.float64)
    precision = X.T @ X / SIGMA ** 2 + torch.eye(D, dtype=torch.float64) / PRIOR ** 2
    cov = torch.linalg.inv(precision)
    mu = cov @ X.T @ y / SIGMA ** 2
    grads = X * (y - X @ mu)[:, None] / SIGMA ** 2  # per-example gradients of log p(y_i | x_i, w) at mu
    noise_cov = N ** 2 / BATCH * torch.cov(grads.T, correction=0)
    lam = torch.linalg.eigvalsh(precision)
    torch.manual_seed(0)
    net = nn.Linear(D, 1, bias=False).double()
    return dict(X=X, y=y[:, None], mu=mu, cov=cov, lam=(float(lam[0]), float(lam[-1])), net=net,
                v_max=float(torch.linalg.eigvalsh(noise_cov)[-1]), v_diag=torch.diagonal(noise_cov))


def stationary_variance(A, Q):
    "Fixed point of Sigma = A Sigma A^T + Q (solved as vec(Sigma) = (I - A kron A)^-1 vec(Q)); returns Sigma[0, 0]."
    k = A.shape[0]
    vec = torch.linalg.solve(torch.eye(k * k, dtype=A.dtype) - torch.kron(A, A), Q.reshape(-1))
    return float(vec.reshape(k, k)[0, 0])


def langevin_bias(h, lam, V):
    "Relative variance bias of theta' = theta - h (lam theta + noise_V) + sqrt(2h) xi."
    A = torch.tensor([[1 - h * lam]], dtype=torch.float64)
    return stationary_variance(A, torch.tensor([[2 * h + h * h * V]], dtype=torch.float64)) * lam - 1


def sghmc_bias(eps, lam, V, C):
    "Relative variance bias of SGHMC: theta' = theta + eps r, r' = (1 - eps C) r - eps (lam theta' + noise_V) + N(0, 2 C eps)."
    A = torch.tensor([[1, eps], [-eps * lam, 1 - eps * C - eps * eps * lam]], dtype=torch.float64)
    Q = torch.tensor([[0, 0], [0, eps * eps * V + 2 * C * eps]], dtype=torch.float64)
    return stationary_variance(A, Q) * lam - 1


def bias_bound(problem, relative_bias):
    "The largest |relative variance bias| over lam in {lam_min, lam_max} and V in {0, V_max}."
    return max(abs(relative_bias(lam, V)) for lam in problem['lam'] for V in (0.0, problem['v_max']))


def check_moments(problem, theta, variance_bias):
    "Whether the draws `theta: [n_chains, n_draws, D]` match the posterior mean and variance within Z * MCSE + bias."
    mu, var = problem['mu'], torch.diagonal(problem['cov'])
    flat = theta.reshape(-1, D)
    mean, sd = flat.mean(0), flat.std(0)
    mean_ok = (mean - mu).abs() <= Z * sd / effective_sample_size(theta, 'mean').sqrt()
    sq = (theta - mean).square()
    var_mcse = sq.reshape(-1, D).std(0) / effective_sample_size(sq, 'mean').sqrt()
    var_ok = (flat.var(0) - var).abs() <= Z * var_mcse + variance_bias * var
    return bool(mean_ok.all() and var_ok.all())


def test_sgld_decreasing_steps(problem):
    schedule = PolynomialDecayScheduler(0.1, b=200, gamma=1.0)
    out = SGLD(problem['net'], 'gaussian', step_size=schedule, **OPTIONS).sample(
        (problem['X'], problem['y']), generator=torch.Generator().manual_seed(1), **RUN)
    h = schedule.compute_value(RUN['burn_in'])  # the largest step among the kept draws
    assert check_moments(problem, out.theta, bias_bound(problem, lambda lam, V: langevin_bias(h, lam, V)))


def test_psgld(problem):
    h = 0.02
    out = pSGLD(problem['net'], 'gaussian', step_size=h, **OPTIONS).sample(
        (problem['X'], problem['y']), generator=torch.Generator().manual_seed(2), **RUN)
    # G = 1 / (lambda + sqrt(V_avg)) with V_avg ~ E[g_j^2] >= Var(g_j): at most 1 / sqrt(min_j Var(g_j)); the factor
    # 1.2 covers the fluctuation of the alpha = 0.99 moving average (relative sd about sqrt(2 / 100) of V_avg).
    g_max = 1.2 / float(problem['v_diag'].min().sqrt())
    assert check_moments(problem, out.theta, bias_bound(problem, lambda lam, V: langevin_bias(h * g_max, lam, V)))


def test_sghmc(problem):
    eps, C = 0.01, 20.0
    out = SGHMC(problem['net'], 'gaussian', step_size=eps, friction=C, **OPTIONS).sample(
        (problem['X'], problem['y']), generator=torch.Generator().manual_seed(3), **RUN)
    assert check_moments(problem, out.theta, bias_bound(problem, lambda lam, V: sghmc_bias(eps, lam, V, C)))


def test_cyclical_sgld(problem):
    h0 = 5e-4
    sampler = CyclicalSGLD(problem['net'], 'gaussian', step_size=h0, n_cycles=2, exploration=0.25, **OPTIONS)
    out = sampler.sample((problem['X'], problem['y']), generator=torch.Generator().manual_seed(4),
                         **{**RUN, 'burn_in': 0})
    # draws only from sampling phases, whose largest step is at their start r = beta
    h = 0.5 * h0 * (math.cos(math.pi * 0.25) + 1)
    assert out.theta.shape[1] == 2 * 300  # 2 cycles of 400 steps, the last 3/4 of each kept
    assert check_moments(problem, out.theta, bias_bound(problem, lambda lam, V: langevin_bias(h, lam, V)))


def test_missing_n_over_n_scaling_fails_the_check(problem):
    "The same check as test_sgld_decreasing_steps FAILS when the N/n factor is lost (dataset_size = batch size)."
    X, y = problem['X'], problem['y']
    loader = [(X[i:i + BATCH], y[i:i + BATCH]) for i in range(0, N, BATCH)]
    schedule = PolynomialDecayScheduler(0.1, b=200, gamma=1.0)
    run = {k: v for k, v in RUN.items() if k != 'batch_size'}
    good = SGLD(problem['net'], 'gaussian', step_size=schedule, dataset_size=N, **OPTIONS).sample(
        loader, generator=torch.Generator().manual_seed(1), **run)
    broken = SGLD(problem['net'], 'gaussian', step_size=schedule, dataset_size=BATCH, **OPTIONS).sample(
        loader, generator=torch.Generator().manual_seed(1), **run)
    h = schedule.compute_value(RUN['burn_in'])
    bound = bias_bound(problem, lambda lam, V: langevin_bias(h, lam, V))
    assert check_moments(problem, good.theta, bound)
    assert not check_moments(problem, broken.theta, bound)


def test_predictive_mean_and_categorical_bnn(problem):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 3, generator=g)
    labels = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, labels), batch_size=16)
    out = SGHMC(mlp, 'categorical', step_size=1e-3, friction=50.0).sample(loader, n_chains=4, n_steps=40, burn_in=20,
                                                                         thin=5, generator=g)
    assert out.theta.shape == (4, 4, sum(p.numel() for p in mlp.parameters()))
    assert out.params['0.weight'].shape == (4, 4, 8, 3)
    probs = out.predict(x[:5])
    assert probs.shape == (5, 3) and torch.allclose(probs.sum(-1), torch.ones(5))
    assert out.theta.dtype == torch.float32


def test_reproducible_with_generator(problem):
    data = (problem['X'], problem['y'])
    for cls, kw in ((SGLD, dict(step_size=1e-4)), (PreconditionedSGLD, dict(step_size=1e-2)),
                    (SGHMC, dict(step_size=1e-2, friction=10.0)), (CyclicalSGLD, dict(step_size=1e-4))):
        sampler = cls(problem['net'], 'gaussian', **kw)
        run = lambda seed: sampler.sample(data, batch_size=BATCH, n_chains=3, n_steps=30, burn_in=10,
                                          generator=torch.Generator().manual_seed(seed)).theta
        assert torch.equal(run(7), run(7)), cls.__name__
        assert not torch.equal(run(7), run(8)), cls.__name__


def test_float32(problem):
    net = nn.Linear(D, 1, bias=False)
    out = SGLD(net, 'gaussian', step_size=1e-4).sample(
        (problem['X'].float(), problem['y'].float()), batch_size=BATCH, n_chains=4, n_steps=50,
        generator=torch.Generator().manual_seed(0))
    assert out.theta.dtype == torch.float32 and torch.isfinite(out.theta).all()


def test_initial_parameters(problem):
    "Chains start at `initial` (a dict of [n_chains, *shape] parameters or a [n_chains, D] tensor) when init_scale=0."
    start = {'weight': torch.arange(6, dtype=torch.float64).reshape(3, 1, 2)}
    sampler = SGLD(problem['net'], 'gaussian', step_size=1e-12)  # one step that barely moves
    for initial in (start, start['weight'].reshape(3, 2)):
        out = sampler.sample((problem['X'], problem['y']), batch_size=BATCH, n_chains=3, n_steps=1, burn_in=0,
                             initial=initial, init_scale=0, generator=torch.Generator().manual_seed(0))
        assert torch.allclose(out.params['weight'][:, 0], start['weight'], atol=1e-4)


def test_nan_raises_or_warns(problem):
    data = (problem['X'], problem['y'])
    sampler = SGLD(problem['net'], 'gaussian', step_size=1.0)  # h lam >> 2: the chains blow up
    with pytest.raises(ValueError, match='NaN or inf'):
        sampler.sample(data, batch_size=BATCH, n_steps=400, check_every=50)
    with pytest.warns(RuntimeWarning, match='NaN or inf'):
        sampler.sample(data, batch_size=BATCH, n_steps=400, check_every=50, nan_policy='warn')


def test_bad_input(problem):
    net, data = problem['net'], (problem['X'], problem['y'])
    with pytest.raises(ValueError, match='step_size'): SGLD(net, step_size=-1.0)
    with pytest.raises(TypeError, match='step_size'): SGLD(net, step_size='big')
    with pytest.raises(ValueError, match='friction'): SGHMC(net, step_size=1e-3, friction=0.0)
    with pytest.raises(ValueError, match='noise_estimate'): SGHMC(net, step_size=1e-3, friction=1.0, noise_estimate=1.0)
    with pytest.raises(ValueError, match=r'step_size \* friction'):
        SGHMC(net, step_size=0.1, friction=20.0).sample(data, batch_size=BATCH, n_steps=2)
    with pytest.raises(ValueError, match=r"\['bernoulli', 'categorical', 'gaussian'\]"):
        SGLD(net, 'poisson', step_size=1e-3)
    with pytest.raises(ValueError, match='noise_scale'): SGLD(net, 'categorical', noise_scale=0.5, step_size=1e-3)
    with pytest.raises(TypeError, match='not both'):
        SGLD(net, 'gaussian', loss=lambda o, t: (o - t).square().sum(-1), step_size=1e-3)
    with pytest.raises(TypeError, match='module'): SGLD(lambda x: x, step_size=1e-3)
    with pytest.raises(ValueError, match='prior_scale'): SGLD(net, step_size=1e-3, prior_scale=0.0)
    with pytest.raises(ValueError, match='alpha'): PreconditionedSGLD(net, step_size=1e-3, alpha=1.0)
    with pytest.raises(ValueError, match='exploration'): CyclicalSGLD(net, step_size=1e-3, exploration=1.0)
    with pytest.raises(TypeError, match='step_size'): CyclicalSGLD(net, step_size=PolynomialDecayScheduler(0.1))
    with pytest.raises(ValueError, match='gamma'): PolynomialDecayScheduler(0.1, gamma=0.4)
    with pytest.raises(ValueError, match='n_cycles'): CyclicalCosineScheduler(1e-3, n_steps=3, n_cycles=4)
    sampler = SGLD(net, step_size=1e-4)
    with pytest.raises(ValueError, match='batch_size'): sampler.sample(data, batch_size=N + 1, n_steps=2)
    with pytest.raises(TypeError, match='batch_size'): sampler.sample(data, n_steps=2)
    with pytest.raises(ValueError, match=r"\['raise', 'warn'\]"):
        sampler.sample(data, batch_size=BATCH, n_steps=2, nan_policy='ignore')
    with pytest.raises(ValueError, match='burn_in'): sampler.sample(data, batch_size=BATCH, n_steps=2, burn_in=2)
    with pytest.raises(ValueError, match='initial'):
        sampler.sample(data, batch_size=BATCH, n_steps=2, initial=torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match='dataset_size'):
        SGLD(net, step_size=1e-4, dataset_size=N + 1).sample(data, batch_size=BATCH, n_steps=2)
    loader = [(problem['X'][:BATCH], problem['y'][:BATCH])]
    with pytest.raises(ValueError, match='dataset_size'): sampler.sample(loader, n_steps=2)  # N unknown
    with pytest.raises(ValueError, match='dataset_size'):
        SGLD(net, step_size=1e-4, dataset_size=BATCH - 1).sample(loader, n_steps=2)  # N < n
    with pytest.raises(ValueError, match='one value per example'):
        SGLD(net, lambda out, t: out.sum(), step_size=1e-4).sample(data, batch_size=BATCH, n_steps=2)
