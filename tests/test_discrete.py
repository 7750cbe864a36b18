"""Statistical checks of the binary-state samplers against exact enumeration (torchebm.samplers.discrete).

Each sampler runs N independent chains on a 4-spin Ising model with strong random couplings (16 states, exact
probabilities p by enumeration); the empirical distribution of the final states is compared with p in total
variation. For N i.i.d. exact draws E[TV] <= 1/2 sum_i sqrt(p_i (1 - p_i) / N) (Jensen), and TV moves by at most 1/N
when one draw changes, so McDiarmid gives P(TV > E[TV] + t) <= exp(-2 N t^2); t is set for a false alarm rate of
1e-6. The broken variants (Gibbs with Gradients without its Metropolis-Hastings correction, unadjusted DULA with a
large step) must fail the same test, which shows it has power.

The same test runs on a 3-state Potts model on 4 sites (81 states), where Gibbs resamples over the 3 labels and the
gradient-based samplers use the gradient with respect to the one-hot states; its broken variants fail it too."""
import math

import pytest
import torch

from torchebm.core.discrete import IsingModel, PottsModel, all_states, exact_probabilities, state_codes, exact_log_partition
import torchebm.samplers.discrete as discrete
from torchebm.samplers.discrete import (DiscreteLangevinSampler, GibbsSampler, GibbsWithGradientsSampler)
from torchebm.losses import PseudoLikelihood, RatioMatching
from torchebm.losses.discrete import flip_energy_gaps

N_CHAINS, N_STEPS, D = 20000, 150, 4


def strong_ising():
    g = torch.Generator().manual_seed(3)
    J = torch.randn(D, D, generator=g, dtype=torch.float64) * 0.8
    J = torch.triu(J, 1); J = J + J.T
    return IsingModel(J, torch.randn(D, generator=g, dtype=torch.float64) * 0.5)


def strong_potts(q=3):
    g = torch.Generator().manual_seed(4)
    J = torch.randn(D, D, generator=g, dtype=torch.float64) * 1.0
    J = torch.triu(J, 1); J = J + J.T
    return PottsModel(J, n_states=q, field=torch.randn(D, q, generator=g, dtype=torch.float64) * 0.7)


def tv_and_tolerance(sampler, model, seed=0):
    """TV between the final states of N_CHAINS independent chains and the exact distribution, and its tolerance."""
    q = getattr(model, 'n_states', 2)
    p = exact_probabilities(model)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, q, (N_CHAINS, D), generator=g).double()
    x = sampler.sample(x=x0, n_steps=N_STEPS, generator=g)
    tv = 0.5 * (torch.bincount(state_codes(x, q), minlength=q ** D) / N_CHAINS - p).abs().sum()
    mean_bound = 0.5 * (p * (1 - p) / N_CHAINS).sqrt().sum()
    t = math.sqrt(math.log(1e6) / (2 * N_CHAINS))
    return float(tv), float(mean_bound + t)


SAMPLERS = [lambda m: GibbsSampler(m, scan='random'), lambda m: GibbsSampler(m, scan='systematic'),
            GibbsWithGradientsSampler, lambda m: DiscreteLangevinSampler(m, step_size=0.3),
            lambda m: DiscreteLangevinSampler(m, step_size=2.0)]


MODELS = pytest.mark.parametrize('strong_model', [strong_ising, strong_potts], ids=['ising', 'potts'])


@MODELS
@pytest.mark.parametrize('make', SAMPLERS, ids=['gibbs-random', 'gibbs-systematic', 'gwg', 'dmala-0.3', 'dmala-2'])
def test_sampler_matches_exact_distribution(strong_model, make):
    model = strong_model()
    tv, tol = tv_and_tolerance(make(model), model)
    assert tv < tol, f"TV {tv:.4f} >= tolerance {tol:.4f}"


def _accept_all(current, proposal, log_ratio, generator=None):
    return proposal, torch.ones_like(log_ratio, dtype=torch.bool)


@MODELS
def test_gwg_without_metropolis_correction_fails(strong_model, monkeypatch):
    monkeypatch.setattr(discrete, 'metropolis_select', _accept_all)
    model = strong_model()
    tv, tol = tv_and_tolerance(GibbsWithGradientsSampler(model), model)
    assert tv > 2 * tol, f"the broken sampler went undetected: TV {tv:.4f}, tolerance {tol:.4f}"


@MODELS
def test_unadjusted_dula_fails(strong_model):
    model = strong_model()
    tv, tol = tv_and_tolerance(DiscreteLangevinSampler(model, step_size=2.0, metropolis=False), model)
    assert tv > 2 * tol, f"the biased sampler went undetected: TV {tv:.4f}, tolerance {tol:.4f}"


def test_potts_gibbs_blind_to_one_label_fails():
    """A Gibbs sampler that believes q = 2 on a 3-state model never visits label 2: the test must see it."""
    model = strong_potts()
    class TwoLabelView(torch.nn.Module):
        n_states, dim = 2, D
        def forward(self, x): return model(x)
    p = exact_probabilities(model)
    x = GibbsSampler(TwoLabelView()).sample(x=torch.zeros(N_CHAINS, D).double(), n_steps=20,
                                            generator=torch.Generator().manual_seed(0))
    tv = float(0.5 * (torch.bincount(state_codes(x, 3), minlength=3 ** D) / N_CHAINS - p).abs().sum())
    _, tol = tv_and_tolerance(GibbsSampler(model), model)
    assert tv > 2 * tol


def test_bad_input():
    model = strong_ising()
    with pytest.raises(ValueError, match='0s and 1s'): GibbsSampler(model).sample(x=torch.full((2, D), 0.5).double())
    with pytest.raises(ValueError, match=r'\[batch, d\]'): GibbsSampler(model).sample(x=torch.zeros(2, 2, 2).double())
    with pytest.raises(ValueError, match='random'): GibbsSampler(model, scan='sweep')
    with pytest.raises(ValueError, match='step_size'): DiscreteLangevinSampler(model, step_size=-1.0)
    with pytest.raises(ValueError, match='d <= 20'): exact_log_partition(model, d=21)
    potts = strong_potts()
    with pytest.raises(ValueError, match=r'labels 0, \.\.\., 2'): GibbsSampler(potts).sample(x=torch.full((2, D), 3.).double())
    with pytest.raises(ValueError, match='one-hot'): potts.analytic_gradient(torch.zeros(2, D).double())
    with pytest.raises(ValueError, match='n_states'): PottsModel(potts.coupling, n_states=1)
    with pytest.raises(ValueError, match=r'\[d, q\]'): PottsModel(potts.coupling, n_states=3, field=torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r'field must be a number or of shape \[d\] = \(4,\)'): IsingModel(model.coupling, torch.zeros(3))
    with pytest.raises(ValueError, match='symmetric'): PottsModel(torch.tensor([[0., 1.], [2., 0.]]), n_states=3)


def test_start_from_noise_and_reproducible():
    model = strong_ising()
    a = GibbsWithGradientsSampler(model).sample(n_samples=5, n_steps=3, generator=torch.Generator().manual_seed(0))
    b = GibbsWithGradientsSampler(model).sample(n_samples=5, n_steps=3, generator=torch.Generator().manual_seed(0))
    assert a.shape == (5, D) and torch.equal(a, b)


def test_pseudo_likelihood_bad_input():
    loss = PseudoLikelihood(strong_ising())
    with pytest.raises(ValueError, match='0s and 1s'): loss(torch.full((2, D), 0.5).double())
    with pytest.raises(ValueError, match='model_kwargs'): loss(torch.zeros(2, D).double(), y=torch.zeros(2))


def fit_ising(loss_cls, data, d=D):
    """Couplings (upper triangle) and fields of the Ising model minimising `loss_cls` on binary `data` (L-BFGS)."""
    rows, cols = torch.triu_indices(d, d, 1)
    upper = torch.zeros(len(rows), dtype=torch.float64, requires_grad=True)
    field = torch.zeros(d, dtype=torch.float64, requires_grad=True)
    def energy(x):
        s = 2 * x - 1
        Jf = torch.zeros(d, d, dtype=torch.float64).index_put((rows, cols), upper)
        return -((s @ Jf) * s).sum(-1) - s @ field
    loss_fn = loss_cls(energy)
    opt = torch.optim.LBFGS([upper, field], max_iter=200, tolerance_grad=1e-10, tolerance_change=1e-14,
                            line_search_fn='strong_wolfe')
    def closure():
        opt.zero_grad(); loss = loss_fn(data); loss.backward(); return loss
    opt.step(closure)
    return torch.cat([upper.detach(), field.detach()])


class WrongSignRatioMatching(RatioMatching):
    """Broken on purpose: sigma(E(x^(i)) - E(x))^2 rewards the flipped states instead of the data."""
    def compute_loss(self, x, model, model_kwargs, generator):
        return torch.sigmoid(-flip_energy_gaps(model, x)).square().sum(-1).mean()


@pytest.mark.parametrize('loss_cls, works', [(RatioMatching, True), (WrongSignRatioMatching, False)],
                         ids=['ratio-matching', 'wrong-sign'])
def test_ratio_matching_recovers_ising_parameters(loss_cls, works):
    """Fit an Ising model to N = 40000 exact draws of a known one (4 spins, 10 parameters).

    Tolerance: 6 standard errors per parameter, the standard error estimated from the spread of the estimates on
    K = 20 disjoint subsets of N / K draws (sd / sqrt(K) estimates the full-data standard error; error / that is then
    roughly t-distributed with 19 degrees of freedom, P(|t| > 6) < 1e-5 per parameter), plus 1e-3 for the optimiser. Ratio matching is consistent, so its error is sampling error; the wrong-sign variant must miss by far."""
    g = torch.Generator().manual_seed(5)
    J = (0.5 * torch.randn(D, D, generator=g, dtype=torch.float64)).triu(1); J = J + J.T
    model = IsingModel(J, 0.3 * torch.randn(D, generator=g, dtype=torch.float64))
    rows, cols = torch.triu_indices(D, D, 1)
    truth = torch.cat([J[rows, cols], model.field])
    data = all_states(D, dtype=torch.float64)[torch.multinomial(exact_probabilities(model), 40000, replacement=True,
                                                                generator=g)]
    estimate = fit_ising(loss_cls, data)
    subsets = torch.stack([fit_ising(RatioMatching, part) for part in data.chunk(20)])
    tolerance = 6 * subsets.std(0) / math.sqrt(20) + 1e-3
    error = (estimate - truth).abs()
    if works: assert (error < tolerance).all(), f"errors {error} exceed tolerances {tolerance}"
    else: assert (error > 2 * tolerance).any(), f"the wrong-sign loss went undetected: errors {error}"


def test_ratio_matching_bad_input():
    loss = RatioMatching(strong_ising())
    with pytest.raises(ValueError, match='0s and 1s'): loss(torch.full((2, D), 0.5).double())
    with pytest.raises(ValueError, match='RatioMatching does not take'): loss(torch.zeros(2, D).double(), y=torch.zeros(2))
