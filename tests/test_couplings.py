"Minibatch couplings: the exact plans against SciPy, the entropic plans' limits, label-aware pairing, bad input."
import math

import pytest
import torch
from scipy.optimize import linear_sum_assignment

from torchebm.couplings import (COUPLINGS, ConditionalOTCoupling, ExactOTCoupling, IndependentCoupling, SinkhornCoupling,
                                UnbalancedSinkhornCoupling, auction_assignment, get_coupling, linear_assignment,
                                sinkhorn_plan, squared_distance_cost)


def _optimal_cost(cost):
    r, c = linear_sum_assignment(cost.double().numpy())
    return cost.double().numpy()[r, c].sum()


@pytest.mark.parametrize('n', [2, 3, 16, 64, 128])
@pytest.mark.parametrize('bidders', ['free', 'all'])
def test_auction_is_the_scipy_plan_on_random_costs(n, bidders):
    g = torch.Generator().manual_seed(n)
    for _ in range(5):
        cost = torch.rand(n, n, generator=g, dtype=torch.float64) * 10
        _, ref = linear_sum_assignment(cost.numpy())
        assert auction_assignment(cost, bidders=bidders).tolist() == ref.tolist()


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('n', [5, 50, 300])
def test_auction_cost_is_within_n_eps_of_the_optimum(n, dtype):
    """The guarantee: cost <= optimum + n eps_final = optimum + tol (max C - min C). A coarse tol makes the bound bite:
    a broken variant that keeps every pair between phases (no eps-happy check) fails it at n = 5."""
    g = torch.Generator().manual_seed(n)
    for tol in (1e-2, 1e-9):
        for bidders in ('free', 'all'):
            cost = (torch.randn(n, 2, generator=g, dtype=dtype)[:, None] - torch.randn(n, 2, generator=g, dtype=dtype)).square().sum(-1)
            cols = auction_assignment(cost, tol=tol, bidders=bidders)
            assert sorted(cols.tolist()) == list(range(n))
            got, best = cost.double()[torch.arange(n), cols].sum().item(), _optimal_cost(cost)
            assert best - 1e-9 <= got <= best + tol * (cost.max() - cost.min()).item() + 1e-9


def test_auction_on_integer_costs_is_exact_when_n_eps_is_below_one():
    g = torch.Generator().manual_seed(3)
    cost = torch.randint(0, 100, (60, 60), generator=g).double()
    cols = auction_assignment(cost, tol=0.99 / 99)
    assert cost[torch.arange(60), cols].sum().item() == _optimal_cost(cost)


def test_auction_with_ties_reaches_the_optimal_cost():
    "Integer costs have many optimal permutations: the plan may differ, its cost may not."
    g = torch.Generator().manual_seed(0)
    for n in (5, 20, 50):
        cost = torch.randint(0, 4, (n, n), generator=g).double()
        cols = auction_assignment(cost)
        assert sorted(cols.tolist()) == list(range(n))
        assert cost[torch.arange(n), cols].sum().item() == pytest.approx(_optimal_cost(cost), abs=1e-9)


def test_scipy_path_reaches_the_optimum_of_the_unreduced_cost():
    """linear_assignment reduces rows and columns before SciPy: the optimum of the raw cost, forbidden (inf) pairs kept,
    and an infeasible cost still refused."""
    g = torch.Generator().manual_seed(4)
    for n in (3, 40, 200):
        x0, x1 = torch.randn(n, 2, generator=g, dtype=torch.float64) * 5, torch.randn(n, 2, generator=g, dtype=torch.float64)
        cost = squared_distance_cost(x1, x0) + torch.rand(n, 1, generator=g, dtype=torch.float64) * 100
        cost[torch.rand(n, n, generator=g) < 0.2] = float('inf')
        cost.fill_diagonal_(1.0)  # keeps a feasible permutation
        cols = linear_assignment(cost, 'scipy')
        assert sorted(cols.tolist()) == list(range(n))
        assert cost[torch.arange(n), cols].sum().item() == pytest.approx(_optimal_cost(cost), rel=1e-12)
    with pytest.raises(ValueError): linear_assignment(torch.full((3, 3), float('inf')), 'scipy')


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('solver', ['scipy', 'auction'])
def test_exact_coupling_minimises_the_transport_cost(dtype, solver):
    g = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(100, 3, generator=g, dtype=dtype), torch.randn(100, 3, generator=g, dtype=dtype) + 1
    paired = ExactOTCoupling(solver)(x0, x1)
    assert paired.dtype == dtype
    cost = squared_distance_cost(x1, x0, torch.float64)
    assert (paired.double() - x1.double()).square().sum().item() == pytest.approx(_optimal_cost(cost), rel=1e-6)


def test_images_are_paired_on_flattened_pixels():
    g = torch.Generator().manual_seed(2)
    x0, x1 = torch.randn(12, 1, 4, 4, generator=g), torch.randn(12, 1, 4, 4, generator=g)
    _, ref = linear_sum_assignment(torch.cdist(x1.flatten(1).double(), x0.flatten(1).double()).square().numpy())
    assert torch.equal(ExactOTCoupling()(x0, x1), x0[ref])


def test_sinkhorn_coupling_tends_to_exact_ot_and_is_reproducible():
    "The sampled pairs' mean cost falls to the exact optimum as reg -> 0 (and stays above it)."
    g = torch.Generator().manual_seed(3)
    x0, x1 = torch.randn(64, 2, generator=g, dtype=torch.float64), torch.randn(64, 2, generator=g, dtype=torch.float64) + 2
    exact = (ExactOTCoupling()(x0, x1) - x1).square().sum(1).mean().item()
    independent = (x0 - x1).square().sum(1).mean().item()
    cost = squared_distance_cost(x1, x0)
    costs = []
    for reg in (1.0, 0.1, 0.01):
        plan = SinkhornCoupling(reg=reg, n_iters=1000).plan(x0, x1)
        costs.append((plan * cost).sum().item() / plan.sum().item())  # the mean cost of the pairs the coupling draws
    assert independent > costs[0] > costs[1] > costs[2] >= exact * 0.999
    assert costs[2] < exact * 1.1
    a = SinkhornCoupling().pair(x0, x1, generator=torch.Generator().manual_seed(0))
    b = SinkhornCoupling().pair(x0, x1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


def test_unbalanced_tends_to_balanced_as_the_marginal_penalty_grows():
    g = torch.Generator().manual_seed(4)
    cost = torch.rand(20, 20, generator=g, dtype=torch.float64)
    balanced = sinkhorn_plan(cost, 0.1, n_iters=3000)
    loose, tight = (sinkhorn_plan(cost, 0.1, reg_marginals=rho, n_iters=3000) for rho in (0.1, 1e4))
    assert (tight - balanced).abs().max() < 1e-4 * balanced.max()
    assert (loose - balanced).abs().max() > 100 * (tight - balanced).abs().max()


def test_unbalanced_coupling_downweights_an_outlier():
    "A datum far from all noise keeps fewer plan mass than the others (it would dominate a balanced plan)."
    g = torch.Generator().manual_seed(5)
    x0, x1 = torch.randn(32, 2, generator=g, dtype=torch.float64), torch.randn(32, 2, generator=g, dtype=torch.float64)
    x1[0] = torch.tensor([30., 30.], dtype=torch.float64)
    rows = UnbalancedSinkhornCoupling(reg=0.05, reg_marginals=0.05, n_iters=500).plan(x0, x1).sum(1)
    assert rows[0] < 0.1 * rows[1:].median()


@pytest.mark.parametrize('inner', ['exact', 'sinkhorn'])
def test_conditional_pairs_stay_within_labels_and_are_optimal_per_label(inner):
    g = torch.Generator().manual_seed(6)
    x0, x1 = torch.randn(90, 2, generator=g), torch.randn(90, 2, generator=g)
    y = torch.randint(0, 4, (90,), generator=g)
    idx = ConditionalOTCoupling(inner).pair(x0, x1, y=y, generator=g)
    assert torch.equal(y[idx], y)
    if inner == 'exact':
        assert sorted(idx.tolist()) == list(range(90))
        for label in range(4):
            rows = (y == label).nonzero().squeeze(1)
            cost = squared_distance_cost(x1[rows], x0[rows], torch.float64)
            assert (x0[idx[rows]] - x1[rows]).double().square().sum().item() == pytest.approx(_optimal_cost(cost), rel=1e-6)
    one_hot = torch.nn.functional.one_hot(y, 4).float()
    assert torch.equal(ConditionalOTCoupling('exact').pair(x0, x1, y=one_hot), ConditionalOTCoupling('exact').pair(x0, x1, y=y))


def test_registry_and_bad_input():
    assert set(COUPLINGS) == {'independent', 'exact', 'sinkhorn', 'unbalanced_sinkhorn', 'conditional'}
    assert isinstance(get_coupling(None), IndependentCoupling)
    c = SinkhornCoupling(reg=0.2); assert get_coupling(c) is c
    assert get_coupling('sinkhorn', reg=0.3).reg == 0.3
    with pytest.raises(ValueError, match="'unbalanced_sinkhorn'"): get_coupling('ot')
    with pytest.raises(TypeError, match='BaseCoupling'): get_coupling(3)
    x = torch.randn(4, 2)
    with pytest.raises(ValueError, match='same shape'): ExactOTCoupling()(x, x[:3])
    with pytest.raises(ValueError, match='batch'): ExactOTCoupling()(torch.randn(4), torch.randn(4))
    with pytest.raises(ValueError, match="'auction'"): ExactOTCoupling('lapjv')
    with pytest.raises(ValueError, match='square'): linear_assignment(torch.rand(3, 4))
    with pytest.raises(ValueError, match='reg'): SinkhornCoupling(reg=0.0)
    with pytest.raises(ValueError, match='reg_marginals'): UnbalancedSinkhornCoupling(reg_marginals=-1.0)
    with pytest.raises(ValueError, match='labels y'): ConditionalOTCoupling().pair(x, x, y=torch.zeros(3))
    with pytest.raises(ValueError, match='must not itself use labels'): ConditionalOTCoupling(ConditionalOTCoupling())
    with pytest.raises(ValueError, match='scaling'): auction_assignment(torch.rand(3, 3), scaling=1.0)
    with pytest.raises(ValueError, match="'free'"): auction_assignment(torch.rand(3, 3), bidders='some')
    with pytest.raises(ValueError, match='check_every'): auction_assignment(torch.rand(3, 3), check_every=0)


@pytest.mark.parametrize('bad', [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize('bidders', ['free', 'all'])
def test_auction_refuses_a_non_finite_cost_at_once(bad, bidders):
    "No bid settles on NaN or inf: the auction used to spin to max_rounds (minutes at the default)."
    cost = torch.rand(6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cost[2, 3] = bad
    with pytest.raises(ValueError, match='cost must be finite'): auction_assignment(cost, bidders=bidders, max_rounds=2000)
    with pytest.raises(ValueError, match='cost must be finite'): auction_assignment(torch.tensor([[bad]]))


@pytest.mark.parametrize('coupling', [ExactOTCoupling('scipy'), ExactOTCoupling('auction'), SinkhornCoupling(),
                                      UnbalancedSinkhornCoupling()], ids=repr)
def test_non_finite_input_raises_naming_it(coupling):
    "Every coupling and solver raises the same ValueError, naming the batch that holds NaN or inf."
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(16, 2, generator=g), torch.randn(16, 2, generator=g)
    with pytest.raises(ValueError, match='x0 contains NaN or inf'): coupling(torch.where(x0 > 1, math.nan, x0), x1)
    with pytest.raises(ValueError, match='x1 contains NaN or inf'): coupling(x0, torch.where(x1 > 1, math.inf, x1))


def test_unbalanced_coupling_pairs_an_outlier_whose_row_mass_underflows():
    """The outlier's row of the float32 plan is all 0, and normalising it gave NaN and a crash in multinomial. Each row is
    now normalised in the log domain: the same conditional where the row has mass, and for the outlier the nearest noise."""
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(64, 2, generator=g), torch.randn(64, 2, generator=g)
    x1[0] = 10.0
    coupling = UnbalancedSinkhornCoupling(reg_marginals=0.1)
    plan = coupling.plan(x0, x1)
    assert plan[0].sum() == 0 and (plan[1:].sum(1) > 0).all()
    torch.testing.assert_close(coupling.log_plan(x0, x1)[1:].softmax(1), plan[1:] / plan[1:].sum(1, keepdim=True))
    idx = coupling.pair(x0, x1, generator=g)
    assert idx[0] == (x0 - x1[0]).square().sum(1).argmin()
    assert torch.equal(coupling(x0, x1, generator=torch.Generator().manual_seed(1)),
                       x0[coupling.pair(x0, x1, generator=torch.Generator().manual_seed(1))])


_COST = torch.rand(4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

@pytest.mark.parametrize('kwargs, error, match', [
    (dict(a=torch.full((4,), 0.5, dtype=torch.float64)), ValueError, 'equal sums'),
    (dict(b=torch.full((5,), 0.1, dtype=torch.float64)), ValueError, 'equal sums'),
    (dict(a=torch.tensor([-0.2, 0.4, 0.4, 0.4], dtype=torch.float64)), ValueError, 'a must be finite and non-negative'),
    (dict(b=torch.tensor([0.2, 0.2, math.nan, 0.2, 0.2])), ValueError, 'b must be finite and non-negative'),
    (dict(a=torch.zeros(4), reg_marginals=1.0), ValueError, 'positive sum'),
    (dict(a=torch.full((3,), 1 / 3)), ValueError, r'a must have shape \[4\]'),
    (dict(a=[0.25] * 4), TypeError, 'a must be a tensor'),
    (dict(tol=-1.0), ValueError, 'tol'),
    (dict(tol=0.0), ValueError, 'tol'),
])
def test_sinkhorn_plan_checks_its_marginals_and_tol(kwargs, error, match):
    with pytest.raises(error, match=match): sinkhorn_plan(_COST, 0.1, **kwargs)


def test_sinkhorn_plan_takes_equal_masses_balanced_and_any_masses_unbalanced():
    a, b = torch.full((4,), 0.5, dtype=torch.float64), torch.full((5,), 0.4, dtype=torch.float64)
    plan = sinkhorn_plan(_COST, 0.1, a=a, b=b, n_iters=500, tol=1e-12)
    torch.testing.assert_close(plan.sum(1), a); torch.testing.assert_close(plan.sum(0), b)
    a[0] = 0.0  # a zero weight leaves its row empty
    assert sinkhorn_plan(_COST, 0.1, a=a, b=2 * b, reg_marginals=1.0)[0].abs().max() == 0
    torch.testing.assert_close(sinkhorn_plan(_COST, 0.1, log=True).exp(), sinkhorn_plan(_COST, 0.1))


def test_float32_costs_and_sinkhorn_pairs_far_from_the_origin():
    """At 1000 +- 0.01 the |x|^2 + |y|^2 - 2xy cost cancelled in float32 (errors 0.25 against costs <= 0.003) and the
    Sinkhorn pairing was no better than chance; the float32 coupling must now match the float64 one."""
    g = torch.Generator().manual_seed(0)
    x0, x1 = 1000 + 0.01 * torch.randn(64, 2, generator=g), 1000 + 0.01 * torch.randn(64, 2, generator=g)
    true_cost = torch.cdist(x1.double(), x0.double()).square()
    assert (squared_distance_cost(x1, x0).double() - true_cost).abs().max() < 1e-3 * true_cost.max()
    def pair_cost(dtype):
        plan = SinkhornCoupling().plan(x0.to(dtype), x1.to(dtype)).double()
        return ((plan * true_cost).sum() / plan.sum()).item()
    assert pair_cost(torch.float32) == pytest.approx(pair_cost(torch.float64), rel=1e-3)
    assert pair_cost(torch.float32) < 0.5 * true_cost.diagonal().mean().item()  # well below independent pairs


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('name', ['exact', 'sinkhorn', 'unbalanced_sinkhorn'])
def test_cuda_couplings_stay_on_the_device(name):
    g = torch.Generator('cuda').manual_seed(0)
    x0, x1 = torch.randn(64, 2, device='cuda', generator=g), torch.randn(64, 2, device='cuda', generator=g)
    out = get_coupling(name)(x0, x1, generator=g)
    assert out.device == x0.device
    if name == 'exact':
        assert torch.equal(out.cpu(), ExactOTCoupling('scipy')(x0.cpu(), x1.cpu()))
