"""Parallel tempering: swap acceptance against a hand computation, stationarity of the replica-exchange move,
and a well-separated mixture's weights recovered where one chain stays stuck.

Each statistical check is a function that raises AssertionError; every test also runs it on a deliberately
broken variant (a swap without its Metropolis test, no swaps at all) and expects it to fail."""
import math
import warnings

import pytest
import torch

from torchebm.core.base import BaseModel
from torchebm.core.energies import GaussianModel
from torchebm.diagnostics import energy_distance_test
from torchebm.samplers import tempering
from torchebm.samplers.mcmc import ChainState
from torchebm.samplers.tempering import (AdaptedLadder, GaussianBase, ParallelTempering, TemperedModel,
                                         replica_exchange_step, swap_log_ratio, swap_permutation)
from torchebm.samplers.transitions import MALA, ULA, LangevinParams


class MixtureEnergy(BaseModel):
    "Isotropic Gaussian mixture $-\\log \\sum_i w_i e^{-|x - m_i|^2 / 2s^2}$ with a closed-form gradient."
    def __init__(self, weights, means, std):
        super().__init__()
        self.register_buffer('log_weights', torch.as_tensor(weights, dtype=torch.float64).log())
        self.register_buffer('means', torch.as_tensor(means, dtype=torch.float64))
        self.std = std

    @property
    def dim(self): return self.means.shape[1]

    @property
    def log_z(self) -> float:
        "$\\log Z = \\log \\sum_i w_i + \\tfrac d2 \\log 2\\pi s^2$."
        return torch.logsumexp(self.log_weights, 0).item() + 0.5 * self.dim * math.log(2 * math.pi * self.std ** 2)

    def _logits(self, x):
        sq = (x[:, None, :] - self.means.to(x.dtype)).pow(2).sum(-1)
        return self.log_weights.to(x.dtype) - 0.5 * sq / self.std ** 2

    def forward(self, x): return -torch.logsumexp(self._logits(x), 1)

    def analytic_gradient(self, x):
        r = torch.softmax(self._logits(x), 1)
        return (x - r @ self.means.to(x.dtype)) / self.std ** 2


def two_modes(dtype=torch.float64):
    "Weights 0.3 at (+4, 0) and 0.7 at (-4, 0), std 0.5: a 32-nat barrier no single chain crosses."
    return MixtureEnergy([0.3, 0.7], [[4.0, 0.0], [-4.0, 0.0]], 0.5).to(dtype)


# -- swap acceptance --------------------------------------------------------------------------------------------
def test_swap_log_ratio_matches_hand_computation():
    "log r = log pi_k(x_{k+1}) + log pi_{k+1}(x_k) - log pi_k(x_k) - log pi_{k+1}(x_{k+1}), from the path energies."
    model, base = two_modes(), GaussianBase(torch.zeros(2, dtype=torch.float64), 2, std=torch.ones(2, dtype=torch.float64))
    betas = torch.tensor([0.1, 0.4, 1.0], dtype=torch.float64)
    x = torch.randn(3, 5, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    energy = lambda b, y: TemperedModel(model, base, b)(y)  # E_b(y)
    hand = torch.stack([energy(betas[k], x[k]) + energy(betas[k + 1], x[k + 1])
                        - energy(betas[k], x[k + 1]) - energy(betas[k + 1], x[k]) for k in range(2)])
    gap = TemperedModel(model, base).parts(x.reshape(15, 2)).gap.reshape(3, 5)
    torch.testing.assert_close(swap_log_ratio(gap, betas), hand)


def test_swap_permutation_pairs_and_metropolis():
    "Even pairs, odd pairs, certain acceptance, certain rejection; acceptance probability min(1, e^log r)."
    sure, never = torch.zeros(3, 2), torch.full((3, 2), -math.inf)
    src, prob = swap_permutation(sure, torch.tensor(0))
    assert src[:, 0].tolist() == [1, 0, 3, 2] and torch.equal(prob, torch.ones(3, 2))
    assert swap_permutation(sure, torch.tensor(1))[0][:, 1].tolist() == [0, 2, 1, 3]
    assert swap_permutation(never, torch.tensor(0))[0][:, 0].tolist() == [0, 1, 2, 3]
    log_r = torch.full((1, 20000), math.log(0.3))
    src, prob = swap_permutation(log_r, torch.tensor(0), torch.Generator().manual_seed(1))
    rate = (src[0] == 1).double().mean().item()
    assert abs(rate - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 20000) and torch.allclose(prob, torch.full_like(prob, 0.3))


# -- stationarity of one replica-exchange step -----------------------------------------------------------------
def _gaussian_path(hottest, dtype=torch.float64):
    "Target N(m, s^2 I), base N(0, I): every pi_beta is Gaussian with precision beta/s^2 + 1 - beta."
    m, s = torch.tensor([3.0, 0.0], dtype=dtype), 0.5
    model = GaussianModel(m, s ** 2 * torch.eye(2, dtype=dtype))
    base = GaussianBase(torch.zeros(2, dtype=dtype), 2, std=torch.ones(2, dtype=dtype))
    betas = torch.tensor([hottest, 0.2, 0.5, 1.0], dtype=dtype)
    precision = betas / s ** 2 + 1 - betas
    return model, base, betas, (betas / s ** 2)[:, None] * m / precision[:, None], precision.rsqrt()


def check_exchange_is_stationary(hottest=0.0, n=400, k=2, seed=0, dtype=torch.float64):
    """Start at exact draws of every temperature, apply k exchange steps, compare each rung with fresh exact draws.
    A rung below `min_recoverable_beta` (as in `ParallelTempering.sample`) needs the path's ends evaluated afresh;
    otherwise they come from the transition's state."""
    model, base, betas, mean, std = _gaussian_path(hottest, dtype)
    g = torch.Generator().manual_seed(seed)
    exact = lambda: mean[:, None] + std[:, None, None] * torch.randn(4, n, 2, generator=g, dtype=dtype)
    x = exact().reshape(4 * n, 2)
    parts = TemperedModel(model, base).parts(x)
    state = ChainState(x, *parts.at(betas.repeat_interleave(n)))
    params = LangevinParams(step_size=(0.05 * std ** 2).repeat_interleave(n))  # small moves: swaps dominate
    for t in range(k):
        state, _, _ = replica_exchange_step(model, base, state, betas, MALA(), params, torch.tensor(t % 2), g,
                                            evaluate=hottest < tempering.min_recoverable_beta(dtype))
    fresh = exact()
    p = [energy_distance_test(state.x.reshape(4, n, 2)[i], fresh[i], n_permutations=999, generator=g).p_value.item()
         for i in range(4)]
    assert min(p) > 0.01 / 4, f"a rung moved away from its distribution: p-values {p}"


@pytest.mark.parametrize('hottest', [0.0, 0.05])
def test_exchange_step_is_stationary(hottest):
    check_exchange_is_stationary(hottest)


def test_exchange_step_is_stationary_with_a_tiny_rung_in_float32():
    check_exchange_is_stationary(1e-9, dtype=torch.float32)


def test_stationarity_check_catches_energies_recovered_at_a_tiny_beta(monkeypatch):
    "Dividing by beta = 1e-9 in float32 loses the target's energy at the hottest rung: the swaps then move the wrong states."
    monkeypatch.setattr(tempering, 'min_recoverable_beta', lambda dtype: 0.0)
    with pytest.raises(AssertionError, match='moved away'):
        check_exchange_is_stationary(1e-9, dtype=torch.float32)


def test_stationarity_check_catches_a_swap_without_metropolis_test(monkeypatch):
    monkeypatch.setattr(tempering, 'swap_log_ratio', lambda gap, betas: torch.zeros_like(gap[1:]))
    with pytest.raises(AssertionError, match='moved away'):
        check_exchange_is_stationary()


# -- a well-separated mixture ----------------------------------------------------------------------------------
def check_mixture_weight(result, weight=0.3):
    "The fraction of beta = 1 draws in the right-hand mode, within 4 Monte Carlo standard errors of `weight`."
    per_column = (result.samples[..., 0] > 0).double().mean(1)  # columns are independent replica systems
    stderr = per_column.std().item() / math.sqrt(len(per_column))
    assert stderr < 0.05, f"the check has no power (standard error {stderr:.3f})"
    # no slack beyond the standard error (the once added 1e-3 stood for no stated error); the stderr comes from 24
    # columns, Student-t with 23 dof: |t| > 4 has probability ~6e-4. Seeds 0-4 of every scheme gave |t| < 1.1.
    assert abs(per_column.mean().item() - weight) < 4 * stderr, \
        f"mode weight {per_column.mean().item():.3f} +- {stderr:.3f}, expected {weight}"


def _mixture_run(transition='mala', n_steps=800, n_warmup=200, **kwargs):
    pt = ParallelTempering(two_modes(), transition, n_temperatures=6, min_beta=0.02, step_size=0.1,
                           n_leapfrog_steps=3, **kwargs)
    x0 = torch.tensor([[4.0, 0.0]], dtype=torch.float64).expand(24, 2)  # every chain starts in the 0.3 mode
    return pt.sample(x=x0, n_steps=n_steps, n_warmup=n_warmup, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize('transition, swap_scheme', [('mala', 'seo'), ('mala', 'deo'), ('hmc', 'deo')])
def test_pt_recovers_mixture_weights(transition, swap_scheme):
    result = _mixture_run(transition, swap_scheme=swap_scheme)
    check_mixture_weight(result)
    assert (result.round_trips > 0).all() and result.swap_rate.min() > 0.3
    assert result.swap_rate.max() - result.swap_rate.min() < 0.15  # the adapted ladder equalises the swap rates


def test_mixture_check_catches_chains_without_swaps(monkeypatch):
    "Without swaps every chain is a plain MALA chain: stuck in the mode it started in."
    monkeypatch.setattr(tempering, 'swap_log_ratio', lambda gap, betas: torch.full_like(gap[1:], -math.inf))
    with pytest.warns(RuntimeWarning, match=r'rungs \[\(0, 1\), \(1, 2\), \(2, 3\), \(3, 4\), \(4, 5\)\]'):
        result = _mixture_run(n_steps=300, n_warmup=100)
    per_column = (result.samples[..., 0] > 0).double().mean(1)
    assert ((per_column == 0) | (per_column == 1)).all()  # no chain changes mode after warm-up
    with pytest.raises(AssertionError):
        check_mixture_weight(result)


def test_warm_start_reuses_the_adapted_ladder_and_step_sizes():
    model = GaussianModel(torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64))
    x0 = torch.zeros(4, 2, dtype=torch.float64)
    sampler = ParallelTempering(model, n_temperatures=4, min_beta=0.05)
    first = sampler.sample(x=x0, n_steps=5, n_warmup=40, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(first.betas, sampler.betas.to(first.betas.dtype))  # the ladder adapted
    again = sampler.sample(x=first.samples[:, -1], n_steps=5, n_warmup=10, warm_start=first,
                           generator=torch.Generator().manual_seed(1))
    assert torch.equal(again.betas, first.betas) and torch.equal(again.step_size, first.step_size)
    with pytest.raises(TypeError, match='warm_start'):
        sampler.sample(x=x0, n_steps=1, n_warmup=0, warm_start=(first.betas, first.step_size))
    from_adapted = sampler.sample(x=first.samples[:, -1], n_steps=5, n_warmup=10, warm_start=first.adapted,
                                  generator=torch.Generator().manual_seed(1))
    assert isinstance(first.adapted, AdaptedLadder) and torch.equal(from_adapted.samples, again.samples)


# -- the shared loop: trajectories, per-chain counts, NaN guard and warnings ----------------------------------
def _standard_normal():
    return GaussianModel(torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64))


@pytest.mark.parametrize('swap_scheme', ['seo', 'deo'])
def test_warmup_trajectory_continues_into_the_draws(swap_scheme):
    """With a fixed ladder, warm-up steps are kept steps that are not returned as draws: a run with warm-up W and N
    kept steps gives the same chain as one with N + W kept steps, split at W (thinned alike)."""
    sampler = ParallelTempering(_standard_normal(), n_temperatures=4, min_beta=0.1, swap_scheme=swap_scheme)
    fixed = AdaptedLadder(sampler.betas, torch.full((4,), 0.3, dtype=torch.float64))
    x0 = torch.full((3, 2), 5.0, dtype=torch.float64)
    run = lambda **kw: sampler.sample(x=x0, thin=2, warm_start=fixed, generator=torch.Generator().manual_seed(0), **kw)
    split, whole = run(n_warmup=6, n_steps=8), run(n_warmup=0, n_steps=14)
    assert split.warmup.shape == (3, 3, 2) and split.samples.shape == (3, 4, 2) and whole.warmup.shape == (3, 0, 2)
    torch.testing.assert_close(torch.cat([split.warmup, split.samples], 1), whole.samples, rtol=0, atol=0)
    every = run(n_warmup=6, n_steps=8, return_all_temperatures=True)  # the trajectories keep every rung
    assert torch.equal(every.warmup, split.warmup) and every.all_samples.shape == (4, 3, 4, 2)
    assert torch.equal(every.all_samples[-1], split.samples)


def test_per_chain_accept_rate_and_divergences_name_the_broken_rung():
    """One rung with an absurd step size: its chains (numbered k * n_chains + j) are the ones whose acceptance
    collapses and whose transitions diverge; the other rungs are untouched. A sane ladder warns of nothing."""
    sampler = ParallelTempering(_standard_normal(), betas=[0.25, 0.5, 1.0])
    x0 = torch.zeros(4, 2, dtype=torch.float64)
    broken = AdaptedLadder(sampler.betas, torch.tensor([0.5, 0.5, 1e4], dtype=torch.float64))
    with pytest.warns(RuntimeWarning) as caught:
        result = sampler.sample(x=x0, n_steps=200, n_warmup=0, warm_start=broken,
                                generator=torch.Generator().manual_seed(0))
    messages = [str(w.message) for w in caught]
    assert any('chains [8, 9, 10, 11]) had acceptance below' in m and 'warm_start=' in m for m in messages), messages
    assert any('chains [8, 9, 10, 11]) had divergent transitions' in m for m in messages), messages
    assert all('chain 4k+j: chain j at temperature k' in m for m in messages if 'chains [' in m)
    assert result.accept_rate.shape == (3, 4) and result.n_divergent.dtype == torch.int64
    assert (result.accept_rate[2] < 0.01).all() and (result.accept_rate[:2] > 0.3).all()
    assert (result.n_divergent[2] > 0).all() and (result.n_divergent[:2] == 0).all()
    torch.testing.assert_close(result.acceptance_rate, result.accept_rate.mean(1))
    sane = AdaptedLadder(sampler.betas, torch.full((3,), 0.5, dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter('error', RuntimeWarning)
        sampler.sample(x=x0, n_steps=200, n_warmup=0, warm_start=sane, generator=torch.Generator().manual_seed(0))


class NaNAfter(BaseModel):
    "$|x|^2 / 2$ whose gradient turns NaN at batch rows `rows` from evaluation `after` on (counts its evaluations)."
    def __init__(self, rows, after):
        super().__init__()
        self.rows, self.after, self.calls = rows, after, 0

    @property
    def dim(self): return 2

    def forward(self, x): return 0.5 * x.pow(2).sum(-1)

    def analytic_gradient(self, x):
        self.calls += 1
        grad = x.clone()
        if self.calls > self.after: grad[self.rows] = float('nan')
        return grad


@pytest.mark.parametrize('phase', ['kept', 'warm-up'])
def test_nan_guard_stops_the_run_naming_chains(phase):
    """Unadjusted Langevin takes a NaN gradient into the state: the guard (every 100 steps) stops the run long
    before its end, naming the chains (temperature 1 and 2 of 4 chains per rung) and the phase."""
    model = NaNAfter(rows=[5, 10], after=150)
    sampler = ParallelTempering(model, ULA(), betas=[0.3, 0.6, 1.0], params=LangevinParams(step_size=0.05))
    fixed = AdaptedLadder(sampler.betas, torch.full((3,), 0.05, dtype=torch.float64))
    n_warmup, n_steps = (0, 1000) if phase == 'kept' else (1000, 1)
    with pytest.raises(ValueError, match=r'chains \[5, 10\]\) between steps 101 and 200') as error:
        sampler.sample(x=torch.zeros(4, 2, dtype=torch.float64), n_steps=n_steps, n_warmup=n_warmup,
                       warm_start=fixed, generator=torch.Generator().manual_seed(0))
    assert ('warm-up' in str(error.value)) == (phase == 'warm-up')
    assert model.calls <= 202  # stopped at the check after step 200, not at the end of the run


def test_a_start_at_a_nan_energy_is_an_error_naming_the_chains():
    "Not a NaN 'appearing between steps': the start itself is refused, naming each temperature's copy of the chain."
    model = lambda x: torch.where(x[:, 0] > 5, torch.nan, 0.5 * x.pow(2).sum(-1))
    x = torch.zeros(4, 2)
    x[1, 0] = 6.0
    with pytest.raises(ValueError, match=r'energy at the start is NaN or -inf for 3 of 12 chains \(chains \[1, 5, 9\]\)'):
        ParallelTempering(model, n_temperatures=3).sample(x, n_steps=3, n_warmup=2)
