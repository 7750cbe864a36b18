"Analytic energies: gradients against autograd and finite differences, minima, closed forms, dtypes, bad input."
import math
import warnings

import pytest
import torch
from torch import nn

from torchebm.core.base import BaseModel, expect_one_deprecation
from torchebm.core.energies import (AckleyEnergy, AckleyModel, BoothModel, CompositeEnergy, DoubleWellEnergy,
                                    DoubleWellModel, EnergyModel, GaussianEnergy, GaussianModel, HarmonicEnergy,
                                    HarmonicModel, HimmelblauModel, MLP, RastriginEnergy, RastriginModel,
                                    RosenbrockEnergy, RosenbrockModel, StyblinskiTangModel)

F64 = torch.float64


def _gaussian(d=3, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=dtype)
    return GaussianModel(torch.randn(d, generator=g, dtype=dtype), a @ a.T + 0.5 * torch.eye(d, dtype=dtype))


MODELS = {
    'gaussian': (lambda: _gaussian(3), 3),
    'double_well': (lambda: DoubleWellModel(barrier_height=1.5, b=0.7), 4),
    'harmonic': (lambda: HarmonicModel(k=2.5), 3),
    'rosenbrock': (lambda: RosenbrockModel(a=1.5, b=20.0), 5),
    'rastrigin': (lambda: RastriginModel(a=3.0), 3),
    'ackley': (lambda: AckleyModel(), 4),
    'himmelblau': (lambda: HimmelblauModel(), 2),
    'booth': (lambda: BoothModel(), 2),
    'styblinski_tang': (lambda: StyblinskiTangModel(), 3),
    'composite': (lambda: CompositeEnergy([HarmonicModel(k=0.5), DoubleWellModel()], weights=[2.0, 0.25]), 3),
}


def _autograd(model, x):
    xg = x.clone().requires_grad_(True)
    return torch.autograd.grad(model(xg).sum(), xg)[0]


def _finite_difference(model, x, h=1e-6):
    cols = []
    for j in range(x.shape[1]):
        e = torch.zeros_like(x); e[:, j] = h
        cols.append((model(x + e) - model(x - e)) / (2 * h))
    return torch.stack(cols, 1)


@pytest.mark.parametrize('name', list(MODELS))
@pytest.mark.parametrize('seed', [0, 1])
def test_analytic_gradient_matches_autograd_and_finite_differences(name, seed):
    make, d = MODELS[name]
    model = make()
    assert model.has_analytic_gradient
    x = 1.5 * torch.randn(32, d, generator=torch.Generator().manual_seed(seed), dtype=F64)
    grad = model.gradient(x)
    torch.testing.assert_close(grad, _autograd(model, x), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grad, _finite_difference(model, x), rtol=1e-5, atol=1e-5 * max(1.0, grad.abs().max().item()))
    torch.testing.assert_close(model.score(x), -grad)


@pytest.mark.parametrize('name', list(MODELS))
def test_float32_in_float32_out_and_no_graph(name):
    make, d = MODELS[name]
    model = make().float()
    x = torch.randn(8, d)
    with torch.no_grad():
        e, g = model(x), model.gradient(x)
    assert e.shape == (8,) and e.dtype == torch.float32
    assert g.shape == x.shape and g.dtype == torch.float32 and not g.requires_grad
    e2, g2 = model.energy_and_gradient(x)
    assert not e2.requires_grad and not g2.requires_grad
    torch.testing.assert_close(g2, g)


@pytest.mark.parametrize('name', list(MODELS))
def test_gradient_with_create_graph_is_differentiable(name):
    "Score matching differentiates the gradient: the analytic path must keep its graph."
    make, d = MODELS[name]
    model = make()
    x = torch.randn(6, d, generator=torch.Generator().manual_seed(3), dtype=F64).requires_grad_(True)
    g = model.gradient(x, create_graph=True)
    assert g.requires_grad
    hess_diag_sum, = torch.autograd.grad(g.sum(), x)
    xr = x.detach().requires_grad_(True)
    g_ref = torch.autograd.grad(model(xr).sum(), xr, create_graph=True)[0]
    ref, = torch.autograd.grad(g_ref.sum(), xr)
    torch.testing.assert_close(hess_diag_sum, ref)


MINIMA = [
    (DoubleWellModel(barrier_height=3.0, b=1.5), [[1.5, -1.5, 1.5]], 0.0),
    (HarmonicModel(k=4.0), [[0.0, 0.0]], 0.0),
    (RosenbrockModel(a=2.0, b=50.0), [[2.0, 4.0]], 0.0),
    (RosenbrockModel(), [[1.0, 1.0, 1.0, 1.0]], 0.0),
    (RastriginModel(), [[0.0, 0.0, 0.0]], 0.0),
    (AckleyModel(), [[0.0, 0.0]], 0.0),
    (HimmelblauModel(), [[3.0, 2.0], [-2.805118, 3.131312], [-3.779310, -3.283186], [3.584428, -1.848126]], 0.0),
    (BoothModel(), [[1.0, 3.0]], 0.0),
    (StyblinskiTangModel(), [[-2.903534, -2.903534]], -39.16617 * 2),
]


@pytest.mark.parametrize('model,points,value', MINIMA, ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else '')
def test_known_minima(model, points, value):
    x = torch.tensor(points, dtype=F64)
    torch.testing.assert_close(model(x), torch.full((len(points),), value, dtype=F64), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(model.gradient(x), torch.zeros_like(x), atol=1e-4, rtol=0)
    # a minimum: nearby points are higher
    bump = 1e-2 * torch.randn(64, x.shape[1], generator=torch.Generator().manual_seed(0), dtype=F64)
    assert (model(x[:1] + bump) >= model(x[:1]) - 1e-10).all()


def test_ackley_is_finite_at_its_minimum_including_second_derivatives():
    a = AckleyModel()
    x = torch.zeros(3, 2, dtype=F64, requires_grad=True)
    g = a.gradient(x, create_graph=True)
    assert torch.isfinite(g).all()
    h, = torch.autograd.grad(g.sum(), x)
    assert torch.isfinite(h).all()
    e_grad = torch.autograd.grad(a(x).sum(), x)[0]
    assert torch.isfinite(e_grad).all()


def test_gaussian_matches_multivariate_normal_and_scipy():
    scipy_stats = pytest.importorskip('scipy.stats')
    model = _gaussian(4, seed=5)
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    mvn = torch.distributions.MultivariateNormal(model.mean, model.cov)
    torch.testing.assert_close(-model(x) - model.log_normalizer, mvn.log_prob(x))
    ref = scipy_stats.multivariate_normal(model.mean.numpy(), model.cov.numpy()).logpdf(x.numpy())
    torch.testing.assert_close(-model(x) - model.log_normalizer, torch.from_numpy(ref))
    torch.testing.assert_close(model.precision @ model.cov, torch.eye(4, dtype=F64), atol=1e-10, rtol=0)
    assert model.dim == 4


def test_gaussian_log_normalizer_by_quadrature():
    model = GaussianModel(torch.tensor([0.5, -1.0], dtype=F64), torch.tensor([[1.0, 0.6], [0.6, 0.8]], dtype=F64))
    u = torch.linspace(-8, 8, 801, dtype=F64)
    X, Y = torch.meshgrid(u, u, indexing='ij')
    E = model(torch.stack([X.flatten(), Y.flatten()], 1))
    log_z = torch.logsumexp(-E, 0) + 2 * math.log(u[1] - u[0])
    torch.testing.assert_close(log_z, model.log_normalizer, atol=1e-6, rtol=0)


def test_gaussian_dtypes_and_to():
    m = GaussianModel(torch.zeros(2, dtype=F64), torch.eye(2, dtype=torch.float32))
    assert m.dtype == F64 and m.cov.dtype == F64
    assert GaussianModel(torch.zeros(2), torch.eye(2), dtype=F64).mean.dtype == F64
    assert GaussianModel([0.0, 1.0], [[1.0, 0.0], [0.0, 1.0]]).dim == 2
    m32 = m.float()
    assert m32.dtype == torch.float32
    assert all(b.dtype == torch.float32 for b in m32.buffers())
    assert m32(torch.zeros(3, 2)).dtype == torch.float32


@pytest.mark.parametrize('mean,cov,match', [
    (torch.zeros(2), torch.tensor([[1.0, 2.0], [2.0, 1.0]]), 'positive definite'),
    (torch.zeros(2), torch.zeros(2, 2), 'positive definite'),
    (torch.zeros(2), torch.tensor([[1.0, 0.5], [0.0, 1.0]]), 'symmetric'),
    (torch.zeros(2), torch.eye(3), 'cov'),
    (torch.zeros(2), torch.ones(2, 3), 'cov'),
    (torch.zeros(1, 2), torch.eye(2), 'mean'),
    (torch.zeros(2), torch.tensor([[1.0, float('nan')], [float('nan'), 1.0]]), 'finite'),
    (torch.tensor([0.0, float('inf')]), torch.eye(2), 'finite'),
])
def test_gaussian_bad_parameters(mean, cov, match):
    with pytest.raises(ValueError, match=match):
        GaussianModel(mean, cov)


@pytest.mark.parametrize('model,x,match', [
    (GaussianModel(torch.zeros(2), torch.eye(2)), torch.zeros(4, 3), '2'),
    (HimmelblauModel(), torch.zeros(4, 3), '2'),
    (BoothModel(), torch.zeros(4, 1), '2'),
    (HarmonicModel(), torch.zeros(4), r'\[batch'),
    (RosenbrockModel(), torch.zeros(4, 1), 'd >= 2'),
])
def test_bad_points(model, x, match):
    with pytest.raises(ValueError, match=match):
        model(x)


@pytest.mark.parametrize('make,match', [
    (lambda: HarmonicModel(k=0.0), 'k'),
    (lambda: HarmonicModel(k=-1.0), 'k'),
    (lambda: DoubleWellModel(barrier_height=-1.0), 'barrier_height'),
    (lambda: RastriginModel(a='ten'), 'a'),
    (lambda: AckleyModel(b=float('nan')), 'b'),
    (lambda: CompositeEnergy([]), 'energies'),
    (lambda: CompositeEnergy([HarmonicModel()], weights=[1.0, 2.0]), 'weights'),
    (lambda: CompositeEnergy([_gaussian(2), _gaussian(3)]), 'dim'),
    (lambda: MLP(2, [8], activation='swishy'), 'activation'),
    (lambda: MLP(2, [0]), 'hidden_dims'),
    (lambda: EnergyModel(network=lambda x: x), 'network'),
    (lambda: DoubleWellEnergy(a=1.0, b=-2.0), 'b'),
])
def test_bad_hyperparameters(make, match):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', DeprecationWarning)
        with pytest.raises((ValueError, TypeError), match=match):
            make()


def test_double_well_energy_legacy_formula():
    x = torch.randn(20, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    for a, b in [(1.0, 2.0), (0.5, 1.0), (3.0, 0.25)]:
        old = expect_one_deprecation(lambda: DoubleWellEnergy(a=a, b=b))
        assert isinstance(old, DoubleWellModel)
        torch.testing.assert_close(old(x), a * ((x ** 2 - b) ** 2).sum(-1))
        torch.testing.assert_close(old.gradient(x), _autograd(old, x))
    old = expect_one_deprecation(lambda: DoubleWellEnergy(1.0, 2.0))
    torch.testing.assert_close(old.gradient(torch.tensor([[math.sqrt(2.0), -math.sqrt(2.0)]])), torch.zeros(1, 2))


@pytest.mark.parametrize('alias,new,kwargs', [
    (GaussianEnergy, GaussianModel, dict(mean=torch.zeros(2), cov=torch.eye(2))),
    (RosenbrockEnergy, RosenbrockModel, dict(a=1.0, b=100.0)),
    (RastriginEnergy, RastriginModel, dict(a=10.0)),
    (AckleyEnergy, AckleyModel, dict()),
    (HarmonicEnergy, HarmonicModel, dict(k=2.0)),
])
def test_legacy_aliases_warn_once_and_agree(alias, new, kwargs):
    old = expect_one_deprecation(lambda: alias(**kwargs))
    assert isinstance(old, new)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(old(x), new(**kwargs)(x))


def test_composite_energy():
    parts = [HarmonicModel(k=1.0), _gaussian(2, dtype=torch.float32)]
    mix = CompositeEnergy(parts, weights=[0.5, 2.0])
    x = torch.randn(7, 2)
    torch.testing.assert_close(mix(x), 0.5 * parts[0](x) + 2.0 * parts[1](x))
    assert mix.dim == 2 and mix.has_analytic_gradient
    legacy = expect_one_deprecation(lambda: CompositeEnergy(energy_functions=parts, weights=[0.5, 2.0]))
    torch.testing.assert_close(legacy(x), mix(x))
    assert expect_one_deprecation(lambda: legacy.energy_functions) is legacy.energies
    with pytest.raises(TypeError, match='not both'):
        CompositeEnergy(parts, energy_functions=parts)
    neural = CompositeEnergy([HarmonicModel(), EnergyModel(MLP(2, [8]))])
    assert not neural.has_analytic_gradient
    torch.testing.assert_close(neural.gradient(x), _autograd(neural, x))


@pytest.mark.parametrize('activation', ['silu', 'relu', 'tanh', 'selu', 'gelu', 'elu', nn.Softplus])
def test_mlp_energy_model(activation):
    torch.manual_seed(0)
    net = MLP(input_dim=3, hidden_dims=[16, 16], output_dim=1, activation=activation)
    acts = [m for m in net if not isinstance(m, nn.Linear)]
    assert len(acts) == 2
    model = EnergyModel(network=net)
    x = torch.randn(9, 3)
    assert model(x).shape == (9,)
    torch.testing.assert_close(model.gradient(x), _autograd(model, x))
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in net.parameters())


def test_mlp_spectral_norm_bounds_layers():
    torch.manual_seed(0)
    net = MLP(2, [32], spectral_norm=True)
    net.train()
    for _ in range(20):
        net(torch.randn(4, 2))
    for layer in net:
        if isinstance(layer, nn.Linear):
            assert torch.linalg.matrix_norm(layer.weight, ord=2) <= 1.05


def test_energy_model_output_shape_check():
    with pytest.raises(ValueError, match=r'\[batch\]'):
        EnergyModel(MLP(2, [4], output_dim=3))(torch.zeros(5, 2))


def test_spec_models_guide_examples():
    gaussian = GaussianModel(mean=torch.zeros(2), cov=torch.eye(2))
    custom = GaussianModel(mean=torch.tensor([1.0, -1.0]), cov=torch.tensor([[1.0, 0.5], [0.5, 2.0]]))
    for model in [gaussian, custom, DoubleWellModel(), DoubleWellModel(barrier_height=5.0), RosenbrockModel(),
                  RosenbrockModel(a=2.0, b=50.0), RastriginModel(), AckleyModel(), GaussianModel(torch.zeros(2), torch.eye(2))]:
        x = torch.randn(10, 2)
        assert model(x).shape == (10,)
        xg = x.clone().requires_grad_(True)
        grads = torch.autograd.grad(model(xg).sum(), xg, create_graph=True)[0]
        assert grads.shape == (10, 2)
        assert isinstance(model.to('cpu'), BaseModel)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('name', list(MODELS))
def test_cuda_matches_cpu(name):
    make, d = MODELS[name]
    model = make()
    x = torch.randn(16, d, dtype=F64)
    cuda_model = make().to('cuda')
    assert cuda_model.device.type == 'cuda' or not list(cuda_model.buffers())
    xc = x.to('cuda')
    torch.testing.assert_close(cuda_model(xc).cpu(), model(x))
    torch.testing.assert_close(cuda_model.gradient(xc).cpu(), model.gradient(x))


@pytest.mark.parametrize('make', [lambda: GaussianModel(torch.zeros(2), 2 * torch.eye(2)), lambda: DoubleWellModel(),
                                  lambda: HarmonicModel(), lambda: CompositeEnergy([HarmonicModel(), GaussianModel(torch.ones(2), torch.eye(2))])])
def test_one_dtype_rule_closed_form_energies_compute_in_the_input_dtype(make):
    "A float32 closed-form energy takes a float64 start in every sampler and computes in float64."
    from torchebm.samplers import HamiltonianMonteCarlo, LangevinDynamics
    model = make()
    x0 = torch.full((3, 2), 0.3, dtype=F64)
    assert model(x0).dtype == F64 and model.gradient(x0).dtype == F64
    for sampler in (LangevinDynamics(model, step_size=0.05), LangevinDynamics(model, step_size=0.05, metropolis=True),
                    HamiltonianMonteCarlo(model, step_size=0.05, n_leapfrog_steps=3)):
        out = sampler.sample(x=x0, n_steps=3, generator=torch.Generator().manual_seed(0))
        assert out.dtype == F64 and torch.isfinite(out).all()


def test_learned_weights_fix_the_input_dtype():
    from torchebm.samplers import LangevinDynamics
    model = EnergyModel(nn.Linear(2, 1))
    with pytest.raises(ValueError, match='x has dtype torch.float64 but the model has dtype torch.float32'):
        LangevinDynamics(model, step_size=0.05).sample(x=torch.zeros(3, 2, dtype=F64), n_steps=2)
