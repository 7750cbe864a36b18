"The samplers' `compile=` option: same chains as the eager path, one compiled program reused, clear bad input."
import math
import shutil

import pytest
import torch
from torch import nn

from torchebm.core.energies import GaussianModel
from torchebm.integrators import MassMatrix
from torchebm.models import MLPEnergy
from torchebm.samplers import (GradientDescentSampler, HamiltonianMonteCarlo, LangevinDynamics, NesterovSampler)
from torchebm.samplers.mcmc import CompiledModel, model_energy_and_gradient

pytestmark = pytest.mark.skipif(shutil.which('c++') is None and shutil.which('g++') is None,
                                reason='torch.compile on the CPU needs a C++ compiler')


def mlp_energy(dtype=None):
    "A seeded `MLPEnergy`: a `BaseModel` without a closed-form gradient, so `torch.func.grad` traces its gradient."
    torch.manual_seed(0)
    return MLPEnergy(3, (32, 32), dtype=dtype)


SAMPLERS = {
    'ula': lambda m, **kw: LangevinDynamics(m, step_size=0.01, **kw),
    'mala': lambda m, **kw: LangevinDynamics(m, step_size=0.05, metropolis=True, **kw),
    'hmc': lambda m, **kw: HamiltonianMonteCarlo(m, step_size=0.1, n_leapfrog_steps=3, **kw),
    'descent': lambda m, **kw: GradientDescentSampler(m, step_size=0.05, **kw),
    'nesterov': lambda m, **kw: NesterovSampler(m, step_size=0.05, **kw),
}


@pytest.mark.parametrize('name', SAMPLERS)
def test_compiled_chains_match_eager_chains(name):
    model = mlp_energy()
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(1))
    run = lambda sampler: sampler.sample(x=x, n_steps=5, generator=torch.Generator().manual_seed(2))
    eager = run(SAMPLERS[name](model))
    compiled_sampler = SAMPLERS[name](model, compile=True)
    compiled = run(compiled_sampler)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    assert isinstance(compiled_sampler.step_model, CompiledModel)
    assert compiled_sampler.step_model is compiled_sampler.step_model  # built once, reused by every run


def test_compiled_gradient_matches_autograd_in_float64():
    model = mlp_energy(torch.float64)
    x = torch.randn(32, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    energy, grad = CompiledModel(model).energy_and_gradient(x)
    ref_energy, ref_grad = model_energy_and_gradient(model, x)
    assert grad.dtype == torch.float64 and not grad.requires_grad
    torch.testing.assert_close(energy, ref_energy)
    torch.testing.assert_close(grad, ref_grad)


def test_compiled_analytic_gradient_and_weights_that_change():
    "A closed-form gradient is compiled as it is; a network trained between runs is sampled with its new weights."
    gaussian = GaussianModel(torch.zeros(2), torch.tensor([[2.0, 0.3], [0.3, 0.5]]))
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(CompiledModel(gaussian).gradient(x), gaussian.gradient(x))
    model = mlp_energy()
    sampler = GradientDescentSampler(model, step_size=0.05, compile=True)
    before = sampler.sample(x=x.new_ones(16, 3), n_steps=3)
    first_weight, *_, last_bias = model.parameters()
    with torch.no_grad(): last_bias += 1.0                # a constant shift: same gradient, same chains
    torch.testing.assert_close(sampler.sample(x=x.new_ones(16, 3), n_steps=3), before)
    with torch.no_grad(): first_weight.mul_(2.0)         # a real change must reach the compiled program
    after = sampler.sample(x=x.new_ones(16, 3), n_steps=3)
    torch.testing.assert_close(after, GradientDescentSampler(model, step_size=0.05).sample(x=x.new_ones(16, 3), n_steps=3),
                               rtol=1e-4, atol=1e-5)
    assert not torch.allclose(after, before)


@pytest.mark.parametrize('bad', ['yes', 1, {1: 'mode'}])
def test_bad_compile_option(bad):
    with pytest.raises(TypeError, match='compile must be'):
        LangevinDynamics(mlp_energy(), step_size=0.01, compile=bad)


def test_compiled_model_refuses_create_graph():
    with pytest.raises(ValueError, match='create_graph'):
        CompiledModel(mlp_energy()).gradient(torch.randn(4, 3), create_graph=True)


def test_flow_sampler_runs_a_compiled_network():
    "FlowSampler only calls its model, so `torch.compile(net)` samples the same as `net`."
    from torchebm.samplers import FlowSampler

    class Velocity(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(3, 32), nn.SiLU(), nn.Linear(32, 2))
        def forward(self, x, t): return self.net(torch.cat([x, t[:, None]], 1))

    net = Velocity()
    x = torch.randn(128, 2, generator=torch.Generator().manual_seed(5))
    eager = FlowSampler(net, integrator='heun').sample(x=x, n_steps=10)
    compiled = FlowSampler(torch.compile(net), integrator='heun').sample(x=x, n_steps=10)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def nuts_leaves_inputs(model, n=16, dim=3, seed=6):
    "What `grow_leaves` takes for the two leaves of a sub-tree of depth 1 (one run), `n` chains in float64."
    from torchebm.samplers.nuts import empty_subtree, kinetic, leaf_chunks, start_leaf
    from torchebm.samplers.transitions import ChainState
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, dtype=torch.float64, generator=gen)
    energy, grad = model_energy_and_gradient(model, x)
    metric = MassMatrix(torch.rand(dim, dtype=torch.float64, generator=gen) + 0.5)
    leaf = start_leaf(ChainState(x, energy, grad), metric, gen)
    h0 = leaf.energy + kinetic(leaf)
    h = torch.where(torch.rand(n, generator=gen) < 0.5, 1.2, -1.2).to(torch.float64)
    tree = empty_subtree(leaf, torch.rand(n, generator=gen) < 0.8, 3)
    log_u = torch.rand(2, n, dtype=torch.float64, generator=gen).log()
    (_, _, masks), = leaf_chunks(3, 1, 2, x.device)
    return leaf, h, metric, h0, tree, log_u, masks, 1000.0


class BowlWithMLP(torch.nn.Module):
    "A quadratic bowl plus a seeded MLP: trajectories turn within a few leapfrog steps, and the gradient is traced."
    def __init__(self):
        super().__init__()
        self.mlp = mlp_energy(torch.float64)
    def forward(self, x): return 0.5 * (x ** 2).sum(-1) + 0.1 * self.mlp(x)


def test_compiled_nuts_leaves_are_the_eager_leaves():
    "Under `compile=`, NUTS traces a run of `grow_leaf` (leapfrog, weights, multinomial draw, U-turn checks) as one program."
    from torchebm.samplers.nuts import grow_leaves
    model = BowlWithMLP()
    args = nuts_leaves_inputs(model)
    first, last, tree = grow_leaves(model, *args)
    assert bool(tree.is_turning.any()) and bool(tree.alive.any())  # the run reaches the U-turn checks both ways
    compiled = CompiledModel(model).compiled(grow_leaves)
    torch.testing.assert_close(compiled(*args), (first, last, tree))


def test_compiled_nuts_join_is_the_eager_join():
    "Under `compile=`, joining a sub-tree to the trajectory (progressive draw, U-turn checks across, counts) is one program."
    from torchebm.samplers.nuts import Subtree, grow_leaves, join_subtree, start_trajectory
    model = BowlWithMLP()
    leaf, h, metric, h0, tree, log_u, masks, limit = nuts_leaves_inputs(model)
    first, last, grown = grow_leaves(model, leaf, h, metric, h0, tree, log_u, masks, limit)
    sub = Subtree(first, last, grown.proposal, grown.rho, grown.log_weight, grown.is_turning, grown.is_divergent,
                  grown.sum_accept, grown.n_leapfrog)
    gen = torch.Generator().manual_seed(7)
    forward, log_u = h > 0, torch.rand(h.shape[0], dtype=torch.float64, generator=gen).log()
    joined = join_subtree(start_trajectory(leaf), sub, forward, log_u)
    assert 0 < int(joined.moved.sum()) < h.shape[0] and 0 < int(joined.active.sum()) < h.shape[0]  # both ways
    compiled = CompiledModel(model).compiled(join_subtree, with_model=False)
    torch.testing.assert_close(compiled(start_trajectory(leaf), sub, forward, log_u), joined)


def gradient_step(model, x):
    return model.energy_and_gradient(x)[1]


def test_each_compiled_model_has_its_own_recompile_budget():
    "Ten model classes through one step: each is traced (dynamo's limit of 8 programs per code object is not shared)."
    from torch._dynamo.utils import counters
    x = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for k in range(10):
        Model = type(f'Bowl{k}', (torch.nn.Module,), {'forward': lambda self, x, k=k: (k + 1) * (x ** 2).sum(-1)})
        before = counters['stats']['unique_graphs']
        grad = CompiledModel(Model()).compiled(gradient_step)(x)
        assert counters['stats']['unique_graphs'] > before, f"model {k} ran uncompiled"
        torch.testing.assert_close(grad, 2 * (k + 1) * x)


def test_compiled_nuts_chains_run_asynchronously(monkeypatch):
    """Under `compile=` with a scalar or diagonal metric the chains run asynchronously (the C++ engine), each tick's
    energy and gradient one compiled program: without warm-up the draws are the eager asynchronous chains' to rounding."""
    from torchebm.samplers.nuts import AsyncNUTS, NoUTurnSampler
    models = []
    real_init = AsyncNUTS.__init__
    def spy(self, ext, model, *args, **kwargs):
        models.append(model)
        real_init(self, ext, model, *args, **kwargs)
    monkeypatch.setattr(AsyncNUTS, '__init__', spy)
    model = BowlWithMLP()
    x = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    mass = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    def draws(**kwargs):
        sampler = NoUTurnSampler(model, step_size=0.4, metric=mass, n_warmup=0, **kwargs)
        return sampler.sample(x=x, n_steps=10, return_trajectory=True, generator=torch.Generator().manual_seed(2))
    eager, compiled = draws(), draws(compile=True)
    assert [type(m) for m in models] == [BowlWithMLP, CompiledModel]
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-9)


def test_compiled_nuts_samples_a_correlated_gaussian():
    "Compiled NUTS (dense metric) passes the eager sampler's moment checks (tolerances from the Monte Carlo standard error)."
    from test_nuts import gaussian_checks, run
    cov = torch.tensor([[1.0, 0.9, 0.0], [0.9, 1.0, 0.0], [0.0, 0.0, 4.0]], dtype=torch.float64)
    mean = torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64)
    trajectory, diag = run(GaussianModel(mean, cov), 3, metric='dense', compile=True)
    gaussian_checks(trajectory, mean, cov)
    assert int(diag['is_divergent'].sum()) == 0
