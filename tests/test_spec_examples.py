"""The project's contract test: every code example of the spec (`/work/shared/spec/*.md`), re-expressed with small sizes.

Each test uses the same import paths, names, argument names and call forms as its example (older forms must keep
working and emit one DeprecationWarning). The examples, file by file (introduction.md has no code):

| file | block (line) | what it shows | test |
|---|---|---|---|
| models-guide.md | 1 (19) | GaussianModel(mean=, cov=) standard and custom | test_gaussian_model_construction |
| models-guide.md | 2 (42) | DoubleWellModel(), DoubleWellModel(barrier_height=) | test_double_well_model_construction |
| models-guide.md | 3 (56) | RosenbrockModel(), RosenbrockModel(a=, b=) | test_rosenbrock_model_construction |
| models-guide.md | 4-5 (70, 80) | RastriginModel(), AckleyModel() | test_rastrigin_and_ackley_models |
| models-guide.md | 6-7 (94, 103) | model(x) -> [batch]; autograd gradient with create_graph | test_energy_call_and_autograd_gradient |
| models-guide.md | 8 (119) | model.to("cuda") / .to("cpu") | test_model_moves_between_devices |
| models-guide.md | 9 (131) | BaseModel subclass with parameters | test_custom_base_model_subclass |
| models-guide.md | 10 (153) | BaseModel subclass wrapping an nn.Sequential | test_neural_network_base_model |
| models-and-energy-functions.md | 1 (17) | MLPModel(BaseModel).to(device), print | test_neural_network_base_model |
| models-and-energy-functions.md | 2 (51) | GaussianModel(mean, covariance) positional | test_gaussian_model_positional |
| models-and-energy-functions.md | 3 (66) | DoubleWellModel(barrier_height=2.0) | test_double_well_model_construction |
| models-and-energy-functions.md | 4 (77) | energy landscape on a numpy grid under no_grad | test_energy_landscape_on_numpy_grid |
| core-components.md | 1 (66) | BaseEnergyFunction with forward/score (old base name) | test_base_energy_function_alias |
| core-components.md | 2 (179) | CompositeEnergy(energy_functions, weights) | test_composite_energy |
| core-components.md | 3 (219) | Sampler base with sample / sample_chain | test_sampler_alias_and_sample_chain |
| core-components.md | 4 (267) | LangevinDynamics(energy_function, step_size, noise_scale), sample_chain(dim, n_steps, n_samples, initial_samples, return_trajectory), sample(n_samples, dim, n_steps) | test_core_components_langevin_forms |
| core-components.md | 5-6 (375, 406) | BaseLoss; ContrastiveDivergence(sampler, k, batch_size), loss_fn(model, data) | test_core_components_contrastive_divergence |
| core-components.md | 7 (480) | EnergyModel(network) | test_energy_model_and_mlp |
| core-components.md | 8 (529) | GaussianEnergy, LangevinDynamics(energy_function=), sample_chain, EnergyModel(MLP(...)), CD(sampler=, k=) training loop | test_core_components_usage_example |
| full-docs.md | 1 (126) | GaussianModel(..., device=), LangevinDynamics(model=, device=), sample(x=, n_steps=) | test_quickstart_gaussian_langevin |
| full-docs.md | 2 (212) | GaussianEnergy(...).to(device), energies of a batch | test_gaussian_energy_alias_values |
| full-docs.md | 3 (240) | LangevinDynamics(energy_function=, ...).to(device), sample(dim=, n_samples=, n_steps=) | test_langevin_to_and_sample_from_dim |
| full-docs.md | 4 (268) | TwoMoonsDataset(n_samples=) in a DataLoader | test_two_moons_in_a_dataloader |
| full-docs.md | 5-7 (282-332) | BaseEnergyFunction subclass, LangevinDynamics(..., n_steps=60), ContrastiveDivergence(sampler=), cd_loss(x, model) | test_getting_started_training_loop |
| full-docs.md | 8-9 (380, 435) | LangevinDynamics(model=, noise_scale=, device=), sample(x=, return_trajectory=) | test_langevin_final_samples_and_trajectory |
| full-docs.md | 10, 19 (449, 887) | CosineScheduler / LinearScheduler / ExponentialDecayScheduler imports, schedulers as step_size / noise_scale, CD with them | test_schedulers_drive_langevin_and_cd |
| full-docs.md | 11 (476) | HamiltonianMonteCarlo(model=, step_size=, n_leapfrog_steps=, device=) | test_hmc_on_double_well |
| full-docs.md | 12-13, 17-18 (500, 521, 818, 873) | ContrastiveDivergence(model=, sampler=, k_steps=, persistent=, buffer_size=), loss, neg = loss_fn(x) | test_contrastive_divergence_current_form |
| full-docs.md | 14 (537) | LinearScheduler(initial_value=, final_value=, total_steps=), WarmupScheduler, sample(x=, dim=, return_trajectory=) | test_warmup_scheduler_trajectory_example |
| full-docs.md | 15-16 (624, 737) | custom BaseSampler: register_scheduler, get_scheduled_value, reset/step_schedulers, model.gradient | test_custom_base_sampler |
| full-docs.md | 20, 27 (925, 1367) | ScoreMatching(model=, device=), hessian_method="hutchinson", hutchinson_samples=; GaussianMixtureDataset(...).get_data() | test_score_matching_examples |
| full-docs.md | 21 (980) | SlicedScoreMatching(model=, n_projections=) | test_sliced_score_matching |
| full-docs.md | 22 (997) | DenoisingScoreMatching(model=, sigma=) | test_denoising_score_matching |
| full-docs.md | 23-26 (1015-1283) | TwoMoonsDataset(..., seed=, device=), CD(...).to(device), clip_grad_norm_, plot_energy_and_samples(...) | test_cd_training_guide_and_plot_helper |
| full-docs.md | 28-29 (1439, 1448) | gradient clipping, weight decay, spectral_norm layers in a BaseModel | test_regularised_model |
| full-docs.md | prose (10-14) | public names of the landing page (FlowSampler, EquilibriumMatchingLoss, interpolants, integrators, models) | test_landing_page_names |
"""
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from torchebm.core.base import expect_one_deprecation

DEVICE = torch.device('cuda' if torch.cuda.is_available() else 'cpu')


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class _MLP(nn.Module):
    def __init__(self, input_dim=2, hidden_dim=16, act=nn.SELU):
        super().__init__()
        self.network = nn.Sequential(nn.Linear(input_dim, hidden_dim), act(), nn.Linear(hidden_dim, hidden_dim), act(),
                                     nn.Linear(hidden_dim, 1))

    def forward(self, x):
        return self.network(x).squeeze(-1)


def _no_deprecation(f):
    "Run `f` and check it emits no DeprecationWarning (current forms)."
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        out = f()
    deprecations = [w for w in caught if issubclass(w.category, DeprecationWarning)]
    assert not deprecations, [str(w.message) for w in deprecations]
    return out


# ---------------------------------------------------------------- models-guide.md and models-and-energy-functions.md
def test_gaussian_model_construction():
    from torchebm.core import GaussianModel
    standard = GaussianModel(mean=torch.zeros(2), cov=torch.eye(2))
    mean, cov = torch.tensor([1.0, -1.0]), torch.tensor([[1.0, 0.5], [0.5, 2.0]])
    custom = GaussianModel(mean=mean, cov=cov)
    x = torch.tensor([[1.0, -1.0], [0.0, 0.0]])
    torch.testing.assert_close(standard(x), 0.5 * (x ** 2).sum(-1))
    diff = x - mean
    torch.testing.assert_close(custom(x), 0.5 * (diff @ torch.linalg.inv(cov) * diff).sum(-1))


def test_gaussian_model_positional():
    from torchebm.core import GaussianModel
    model = GaussianModel(torch.tensor([0.0, 0.0]), torch.eye(2))
    assert model(torch.ones(3, 2)).shape == (3,)


def test_double_well_model_construction():
    from torchebm.core import DoubleWellModel
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    default, custom = DoubleWellModel(), DoubleWellModel(barrier_height=5.0)
    assert default(x).shape == (2,)
    torch.testing.assert_close(custom(x) / default(x).clamp_min(1e-12) * (default(x) > 0),
                               torch.tensor([2.5, 0.0]))   # energies scale with the barrier height (default 2.0)


def test_rosenbrock_model_construction():
    from torchebm.core import RosenbrockModel
    minimum = torch.tensor([[1.0, 1.0]])
    torch.testing.assert_close(RosenbrockModel()(minimum), torch.zeros(1))
    custom = RosenbrockModel(a=2.0, b=50.0)
    torch.testing.assert_close(custom(torch.tensor([[2.0, 4.0]])), torch.zeros(1))


def test_rastrigin_and_ackley_models():
    from torchebm.core import AckleyModel, RastriginModel
    origin = torch.zeros(1, 2)
    torch.testing.assert_close(RastriginModel()(origin), torch.zeros(1), atol=1e-5, rtol=0)
    torch.testing.assert_close(AckleyModel()(origin), torch.zeros(1), atol=1e-5, rtol=0)


def test_energy_call_and_autograd_gradient():
    from torchebm.core import GaussianModel
    model = GaussianModel(mean=torch.zeros(3), cov=torch.eye(3))
    x = torch.randn(5, 3)
    assert model(x).shape == (5,)
    x.requires_grad_(True)
    gradients = torch.autograd.grad(model(x).sum(), x, create_graph=True)[0]
    assert gradients.shape == (5, 3) and gradients.requires_grad
    torch.testing.assert_close(gradients, x)
    torch.testing.assert_close(model.gradient(x.detach()), x.detach())


def test_model_moves_between_devices():
    from torchebm.core import GaussianModel
    model = GaussianModel(mean=torch.zeros(2), cov=torch.eye(2))
    if torch.cuda.is_available():
        model = model.to('cuda')
        assert model(torch.zeros(1, 2, device='cuda')).device.type == 'cuda'
    model = model.to('cpu')
    assert model(torch.zeros(1, 2)).device.type == 'cpu'


def test_custom_base_model_subclass():
    from torchebm.core import BaseModel

    class MyCustomModel(BaseModel):
        def __init__(self, param1, param2):
            super().__init__()
            self.param1, self.param2 = param1, param2

        def forward(self, x):
            return torch.sum(self.param1 * x ** 2 + self.param2 * torch.sin(x), dim=-1)

    model = MyCustomModel(1.5, 0.5)
    x = torch.randn(4, 2)
    torch.testing.assert_close(model(x), (1.5 * x ** 2 + 0.5 * torch.sin(x)).sum(-1))
    torch.testing.assert_close(model.gradient(x), 3.0 * x + 0.5 * torch.cos(x))


def test_neural_network_base_model():
    from torchebm.core import BaseModel

    class NeuralNetworkModel(BaseModel):
        def __init__(self, input_dim, hidden_dim):
            super().__init__()
            self.network = _MLP(input_dim, hidden_dim, nn.ReLU).network

        def forward(self, x):
            return self.network(x).squeeze(-1)

    model = NeuralNetworkModel(input_dim=2, hidden_dim=8).to(DEVICE)
    assert 'NeuralNetworkModel' in repr(model)
    assert model(torch.randn(6, 2, device=DEVICE)).shape == (6,)
    assert model.gradient(torch.randn(6, 2, device=DEVICE)).shape == (6, 2)


def test_energy_landscape_on_numpy_grid():
    from torchebm.core import DoubleWellModel
    model = DoubleWellModel(barrier_height=2.0)
    X, Y = np.meshgrid(np.linspace(-2, 2, 20), np.linspace(-2, 2, 20))
    grid = torch.tensor(np.stack([X.flatten(), Y.flatten()], axis=1), dtype=torch.float32)
    with torch.no_grad():
        energies = model(grid).numpy().reshape(X.shape)
    assert energies.shape == (20, 20) and np.isfinite(energies).all()


# ---------------------------------------------------------------- core-components.md (the oldest API)
def test_base_energy_function_alias():
    from torchebm.core import BaseEnergyFunction, BaseModel

    def define():
        class Quadratic(BaseEnergyFunction):
            def forward(self, x):
                return 0.5 * (x ** 2).sum(-1)
        return Quadratic

    Quadratic = expect_one_deprecation(define)
    energy = Quadratic()
    assert isinstance(energy, BaseModel)
    x = torch.randn(3, 2)
    torch.testing.assert_close(energy.gradient(x), x)
    torch.testing.assert_close(energy.score(x), -x)   # the true score, grad log p (NOTES.md)


def test_composite_energy():
    from torchebm.core import CompositeEnergy, GaussianModel, HarmonicModel
    parts = [GaussianModel(mean=torch.zeros(2), cov=torch.eye(2)), HarmonicModel()]
    x = torch.randn(4, 2)
    torch.testing.assert_close(CompositeEnergy(parts)(x), parts[0](x) + parts[1](x))
    weighted = expect_one_deprecation(lambda: CompositeEnergy(energy_functions=parts, weights=[2.0, 0.5]))
    torch.testing.assert_close(weighted(x), 2.0 * parts[0](x) + 0.5 * parts[1](x))


def test_sampler_alias_and_sample_chain():
    from torchebm.core import BaseSampler, GaussianModel, Sampler
    from torchebm.samplers import LangevinDynamics
    assert Sampler is BaseSampler or issubclass(Sampler, BaseSampler)

    def define():
        class Walk(Sampler):
            def sample(self, x=None, dim=None, n_steps=None, n_samples=1, **kwargs):
                return torch.zeros(n_samples, dim)
        return Walk

    walk = expect_one_deprecation(define)(GaussianModel(mean=torch.zeros(2), cov=torch.eye(2)))
    assert isinstance(walk, BaseSampler) and walk.sample(dim=2, n_samples=3).shape == (3, 2)
    sampler = LangevinDynamics(GaussianModel(mean=torch.zeros(2), cov=torch.eye(2)), step_size=0.1)
    out = expect_one_deprecation(lambda: sampler.sample_chain(dim=2, n_steps=5, n_samples=7))
    assert out.shape == (7, 2)


def test_core_components_langevin_forms():
    from torchebm.core import GaussianEnergy
    from torchebm.samplers import LangevinDynamics
    energy = expect_one_deprecation(lambda: GaussianEnergy(mean=torch.zeros(2), cov=torch.eye(2)))
    sampler = expect_one_deprecation(
        lambda: LangevinDynamics(energy_function=energy, step_size=0.01, noise_scale=1.0))
    start = torch.randn(6, 2)
    x, trajectory = expect_one_deprecation(lambda: sampler.sample_chain(
        dim=2, n_steps=4, n_samples=6, initial_samples=start, return_trajectory=True))
    assert x.shape == (6, 2) and trajectory.shape == (5, 6, 2)     # old layout [n_steps + 1, n_samples, dim]
    torch.testing.assert_close(trajectory[0], start)
    torch.testing.assert_close(trajectory[-1], x)
    samples = expect_one_deprecation(lambda: sampler.sample(n_samples=9, dim=2, n_steps=3))   # old: no x=
    assert samples.shape == (9, 2)


def test_core_components_contrastive_divergence():
    from torchebm.core import BaseLoss, BaseModel
    from torchebm.losses import ContrastiveDivergence
    from torchebm.samplers import LangevinDynamics

    class Net(BaseModel):
        def __init__(self):
            super().__init__()
            self.mlp = _MLP(2, 8)

        def forward(self, x):
            return self.mlp(x)

    model = Net()
    sampler = LangevinDynamics(model, step_size=0.01)
    loss_fn = expect_one_deprecation(lambda: ContrastiveDivergence(sampler, k=2, batch_size=16))
    assert isinstance(loss_fn, BaseLoss)
    data = torch.randn(16, 2)
    loss = expect_one_deprecation(lambda: loss_fn(model, data))        # the old (model, data) call form
    assert loss.ndim == 0 and loss.requires_grad
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_energy_model_and_mlp():
    from torchebm.core import MLP, BaseModel, EnergyModel
    network = MLP(input_dim=2, hidden_dims=[8, 8], output_dim=1)
    model = EnergyModel(network=network)
    assert isinstance(model, BaseModel)
    x = torch.randn(5, 2)
    torch.testing.assert_close(model(x), network(x).squeeze(-1))


def test_core_components_usage_example():
    from torchebm.core import MLP, EnergyModel, GaussianEnergy
    from torchebm.losses import ContrastiveDivergence
    from torchebm.samplers import LangevinDynamics
    energy_fn = expect_one_deprecation(lambda: GaussianEnergy(mean=torch.zeros(2), cov=torch.eye(2)))
    sampler = expect_one_deprecation(lambda: LangevinDynamics(energy_function=energy_fn, step_size=0.01))
    data_samples = expect_one_deprecation(lambda: sampler.sample_chain(dim=2, n_steps=20, n_samples=32))
    model = EnergyModel(network=MLP(input_dim=2, hidden_dims=[16, 16], output_dim=1))
    loss_fn = expect_one_deprecation(lambda: ContrastiveDivergence(sampler=sampler, k=3))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        optimizer.zero_grad()
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', DeprecationWarning)
            loss = loss_fn(model, data_samples)
        loss.backward()
        optimizer.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


# ---------------------------------------------------------------- full-docs.md
def test_quickstart_gaussian_langevin():
    from torchebm.core import GaussianModel
    from torchebm.samplers import LangevinDynamics
    model = GaussianModel(mean=torch.zeros(2), cov=torch.eye(2), device=DEVICE)
    sampler = _no_deprecation(lambda: LangevinDynamics(model=model, step_size=0.01, device=DEVICE))
    samples = _no_deprecation(lambda: sampler.sample(x=torch.randn(50, 2, device=DEVICE), n_steps=10))
    assert samples.shape == torch.Size([50, 2]) and samples.device.type == DEVICE.type


def test_gaussian_energy_alias_values():
    from torchebm.core import GaussianEnergy, GaussianModel
    energy_fn = expect_one_deprecation(
        lambda: GaussianEnergy(mean=torch.zeros(2, device=DEVICE), cov=torch.eye(2, device=DEVICE))).to(DEVICE)
    assert isinstance(energy_fn, GaussianModel)
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]], device=DEVICE)
    torch.testing.assert_close(energy_fn(x).cpu(), torch.tensor([0.0, 1.0, 4.0]))


def test_langevin_to_and_sample_from_dim():
    from torchebm.core import GaussianModel
    from torchebm.samplers import LangevinDynamics
    energy_fn = GaussianModel(mean=torch.zeros(2), cov=torch.eye(2)).to(DEVICE)
    sampler = expect_one_deprecation(
        lambda: LangevinDynamics(energy_function=energy_fn, step_size=0.1, noise_scale=1.0)).to(DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', DeprecationWarning)   # sampling from dim= is an older form where it warns
        samples = sampler.sample(dim=2, n_samples=40, n_steps=5)
    assert samples.shape == (40, 2)


def test_two_moons_in_a_dataloader():
    from torchebm.datasets import TwoMoonsDataset
    dataset = TwoMoonsDataset(n_samples=300)
    batch = next(iter(DataLoader(dataset, batch_size=128, shuffle=True)))
    assert batch.shape == (128, 2) and batch.dtype == torch.float32


def test_getting_started_training_loop():
    from torchebm.core import BaseEnergyFunction
    from torchebm.datasets import TwoMoonsDataset
    from torchebm.losses import ContrastiveDivergence
    from torchebm.samplers import LangevinDynamics

    def define():
        class NeuralEnergy(BaseEnergyFunction):
            def __init__(self, input_dim=2, hidden_dim=16):
                super().__init__()
                self.network = _MLP(input_dim, hidden_dim, nn.Tanh).network

            def forward(self, x):
                return self.network(x).squeeze(-1)
        return NeuralEnergy

    neural_energy_fn = expect_one_deprecation(define)().to(DEVICE)
    sampler = expect_one_deprecation(lambda: LangevinDynamics(
        energy_function=neural_energy_fn, step_size=10.0, noise_scale=0.1, n_steps=60))
    assert sampler.n_steps == 60
    cd_loss = ContrastiveDivergence(sampler=sampler, k_steps=3)
    optimizer = torch.optim.Adam(neural_energy_fn.parameters(), lr=1e-4)
    dataloader = DataLoader(TwoMoonsDataset(n_samples=64, seed=0), batch_size=32, shuffle=True)
    for batch_data in dataloader:
        optimizer.zero_grad()
        loss = expect_one_deprecation(lambda: cd_loss(batch_data.to(DEVICE), neural_energy_fn))   # (x, model) form
        assert loss.ndim == 0
        loss.backward()
        optimizer.step()


def _selu_model():
    from torchebm.core import BaseModel

    class MLPModel(BaseModel):
        def __init__(self, input_dim, hidden_dim=16):
            super().__init__()
            self.network = _MLP(input_dim, hidden_dim).network

        def forward(self, x):
            return self.network(x).squeeze(-1)

    return MLPModel(input_dim=2, hidden_dim=16).to(DEVICE)


def test_langevin_final_samples_and_trajectory():
    from torchebm.samplers import LangevinDynamics
    model = _selu_model()
    langevin_sampler = LangevinDynamics(model=model, step_size=0.1, noise_scale=0.01, device=DEVICE)
    initial_points = torch.randn(10, 2, device=DEVICE)
    samples = langevin_sampler.sample(x=initial_points, n_steps=20, return_trajectory=False)
    assert samples.shape == (10, 2)
    trajectory = langevin_sampler.sample(x=initial_points, n_steps=20, return_trajectory=True)
    assert trajectory.shape == (10, 20, 2)    # [n_samples, n_steps, dim]


def test_schedulers_drive_langevin_and_cd():
    from torchebm.core import CosineScheduler, ExponentialDecayScheduler, LinearScheduler
    from torchebm.losses import ContrastiveDivergence
    from torchebm.samplers import LangevinDynamics
    model = _selu_model()
    step_size_scheduler = CosineScheduler(start_value=3e-2, end_value=5e-3, n_steps=100)
    noise_scheduler = CosineScheduler(start_value=3e-1, end_value=1e-2, n_steps=100)
    assert abs(step_size_scheduler.get_value() - 3e-2) < 1e-9
    sampler = LangevinDynamics(model=model, step_size=step_size_scheduler, noise_scale=noise_scheduler, device=DEVICE)
    assert sampler.sample(x=torch.randn(8, 2, device=DEVICE), n_steps=10).shape == (8, 2)
    loss_fn = ContrastiveDivergence(model=model, sampler=sampler, k_steps=3, persistent=True)
    loss, negatives = loss_fn(torch.randn(8, 2, device=DEVICE))
    assert negatives.shape == (8, 2) and loss.ndim == 0
    linear = LinearScheduler(start_value=1.0, end_value=0.0, n_steps=10)
    for _ in range(10): linear.step()
    assert abs(linear.get_value()) < 1e-9
    assert ExponentialDecayScheduler.__name__ == 'ExponentialDecayScheduler'


def test_hmc_on_double_well():
    from torchebm.core import DoubleWellModel
    from torchebm.samplers import HamiltonianMonteCarlo
    model = DoubleWellModel()
    hmc_sampler = HamiltonianMonteCarlo(model=model, step_size=0.1, n_leapfrog_steps=10, device=DEVICE)
    samples = hmc_sampler.sample(x=torch.randn(20, 2, device=DEVICE), n_steps=20, return_trajectory=False)
    assert samples.shape == (20, 2) and torch.isfinite(samples).all()


@pytest.mark.parametrize('persistent', [False, True])
def test_contrastive_divergence_current_form(persistent):
    from torchebm.losses import ContrastiveDivergence
    from torchebm.samplers import LangevinDynamics
    model = _selu_model()
    langevin_sampler = LangevinDynamics(model=model, step_size=0.1, device=DEVICE)
    loss_fn = _no_deprecation(lambda: ContrastiveDivergence(model=model, sampler=langevin_sampler, k_steps=3,
                                                            persistent=persistent, buffer_size=64))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    data_batch = torch.randn(16, 2, device=DEVICE)
    optimizer.zero_grad()
    loss, negative_samples = loss_fn(data_batch)
    loss.backward()
    optimizer.step()
    assert loss.ndim == 0 and negative_samples.shape == (16, 2) and not negative_samples.requires_grad


def test_warmup_scheduler_trajectory_example():
    from torchebm.core import DoubleWellModel, LinearScheduler, WarmupScheduler
    from torchebm.samplers import LangevinDynamics
    model = DoubleWellModel(barrier_height=5.0)
    scheduler_linear = expect_one_deprecation(
        lambda: LinearScheduler(initial_value=0.05, final_value=0.03, total_steps=100))
    scheduler = WarmupScheduler(main_scheduler=scheduler_linear, warmup_steps=10, warmup_init_factor=0.01)
    assert abs(scheduler.get_value() - 0.05 * 0.01) < 1e-9
    sampler = LangevinDynamics(model=model, step_size=scheduler)
    initial_point = torch.tensor([[-2.0, 0.0]], dtype=torch.float32)
    trajectory = sampler.sample(x=initial_point, dim=2, n_steps=50, return_trajectory=True)
    assert trajectory.shape == (1, 50, 2)
    assert trajectory[0, :, 0].numpy().shape == (50,)


def test_custom_base_sampler():
    from torchebm.core import BaseModel, BaseSampler, ConstantScheduler, GaussianModel

    class SimpleLangevin(BaseSampler):
        def __init__(self, model: BaseModel, step_size=0.01, noise_scale=1.0, dtype=torch.float32, device=None):
            super().__init__(model=model, dtype=dtype, device=device)
            self.register_scheduler('step_size', ConstantScheduler(step_size))
            self.register_scheduler('noise_scale', ConstantScheduler(noise_scale))

        def langevin_step(self, x):
            step_size = self.get_scheduled_value('step_size')
            noise_scale = self.get_scheduled_value('noise_scale')
            return (x - step_size * self.model.gradient(x)
                    + torch.sqrt(torch.tensor(2.0 * step_size)) * noise_scale * torch.randn_like(x))

        @torch.no_grad()
        def sample(self, x=None, dim=10, n_steps=100, n_samples=1, thin=1, return_trajectory=False,
                   return_diagnostics=False, *args, **kwargs):
            self.reset_schedulers()
            x = torch.randn(n_samples, dim, dtype=self.dtype, device=self.device) if x is None else x.to(self.device)
            trajectory = torch.empty((n_samples, n_steps, dim), dtype=self.dtype, device=self.device)
            for i in range(n_steps):
                self.step_schedulers()
                x = self.langevin_step(x)
                trajectory[:, i, :] = x
            return trajectory if return_trajectory else x

    sampler = SimpleLangevin(GaussianModel(mean=torch.zeros(2), cov=torch.eye(2)), step_size=0.1)
    assert sampler.sample(dim=2, n_steps=5, n_samples=4).shape == (4, 2)
    assert sampler.sample(dim=2, n_steps=5, n_samples=4, return_trajectory=True).shape == (4, 5, 2)
    assert sampler.get_scheduled_value('step_size') == pytest.approx(0.1)


def test_score_matching_examples():
    from torchebm.datasets import GaussianMixtureDataset
    from torchebm.losses import ScoreMatching
    model = _selu_model()
    dataset = GaussianMixtureDataset(n_samples=64, n_components=4, std=0.1, seed=123).get_data()
    assert dataset.shape == (64, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for loss_fn in (ScoreMatching(model=model, device=DEVICE),
                    ScoreMatching(model=model, hessian_method='hutchinson', hutchinson_samples=5, device=DEVICE)):
        for batch_data in DataLoader(dataset, batch_size=32, shuffle=True):
            optimizer.zero_grad()
            loss = loss_fn(batch_data.to(DEVICE))
            loss.backward()
            optimizer.step()
            assert loss.ndim == 0 and torch.isfinite(loss)
    with pytest.raises(ValueError, match='hessian_method'):
        ScoreMatching(model=model, hessian_method='bogus')


def test_sliced_score_matching():
    from torchebm.losses import SlicedScoreMatching
    model = _selu_model()
    ssm_loss_fn = SlicedScoreMatching(model=model, n_projections=5)
    loss = ssm_loss_fn(torch.randn(16, 2, device=DEVICE))
    loss.backward()
    assert loss.ndim == 0


def test_denoising_score_matching():
    from torchebm.losses import DenoisingScoreMatching
    model = _selu_model()
    dsm_loss_fn = DenoisingScoreMatching(model=model, sigma=0.1)
    loss = dsm_loss_fn(torch.randn(16, 2, device=DEVICE))
    loss.backward()
    assert loss.ndim == 0
    old = expect_one_deprecation(lambda: DenoisingScoreMatching(model=model, noise_scale=0.1))
    assert old(torch.randn(4, 2, device=DEVICE)).ndim == 0


def test_cd_training_guide_and_plot_helper(tmp_path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from torchebm.core import CosineScheduler
    from torchebm.datasets import TwoMoonsDataset
    from torchebm.losses import ContrastiveDivergence
    from torchebm.samplers import LangevinDynamics
    from torchebm.visualization import plot_energy_and_samples
    model = _selu_model()
    dataset = TwoMoonsDataset(n_samples=128, noise=0.05, seed=42, device=DEVICE)
    dataloader = DataLoader(dataset, batch_size=32, shuffle=True, drop_last=True)
    sampler = LangevinDynamics(model=model, step_size=CosineScheduler(start_value=3e-2, end_value=5e-3, n_steps=100),
                               noise_scale=CosineScheduler(start_value=3e-1, end_value=1e-2, n_steps=100), device=DEVICE)
    loss_fn = ContrastiveDivergence(model=model, sampler=sampler, k_steps=3, persistent=True, buffer_size=32).to(DEVICE)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for data_batch in dataloader:
        optimizer.zero_grad()
        loss, negative_samples = loss_fn(data_batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
        optimizer.step()
    figure = plot_energy_and_samples(model=model, real_samples=dataset.get_data(), sampler=sampler, epoch=1,
                                     device=DEVICE, grid_size=20, plot_range=2.5, k_sampling=5,
                                     save_path=tmp_path / 'epoch_1.png')
    assert (tmp_path / 'epoch_1.png').stat().st_size > 0 and figure.axes[0].get_title() == 'Epoch 1'
    plt.close(figure)


def test_regularised_model():
    from torch.nn.utils import spectral_norm
    from torchebm.core import BaseModel

    class RegularizedMLPModel(BaseModel):
        def __init__(self, input_dim, hidden_dim=8):
            super().__init__()
            self.network = nn.Sequential(spectral_norm(nn.Linear(input_dim, hidden_dim)), nn.ReLU(),
                                         spectral_norm(nn.Linear(hidden_dim, 1)))

        def forward(self, x):
            return self.network(x).squeeze(-1)

    model = RegularizedMLPModel(2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    loss = model(torch.randn(8, 2)).pow(2).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
    optimizer.step()
    assert model.gradient(torch.randn(3, 2)).shape == (3, 2)


def test_landing_page_names():
    import torchebm.integrators as integrators
    import torchebm.interpolants as interpolants
    import torchebm.losses as losses
    import torchebm.models as models
    import torchebm.samplers as samplers
    for module, names in [
            (samplers, ['LangevinDynamics', 'HamiltonianMonteCarlo', 'FlowSampler', 'GradientDescentSampler']),
            (losses, ['ContrastiveDivergence', 'ScoreMatching', 'EquilibriumMatchingLoss']),
            (interpolants, ['LinearInterpolant', 'CosineInterpolant', 'VariancePreservingInterpolant']),
            (integrators, ['EulerMaruyama', 'Heun', 'Leapfrog']),
            (models, ['ConditionalTransformer2D'])]:
        missing = [n for n in names if not hasattr(module, n)]
        assert not missing, f'{module.__name__} lacks {missing}'
    from torchebm.models import components
    assert components.__name__ == 'torchebm.models.components'
