"Synthetic 2-D datasets: contract (Dataset, get_data, seeds, dtype/device), validation and distribution checks."
import math

import pytest
import torch
from torch.utils.data import DataLoader

from torchebm.datasets import (CheckerboardDataset, CircleDataset, EightGaussiansDataset, GaussianMixtureDataset,
                               GridDataset, PinwheelDataset, SpiralDataset, SwissRollDataset, SyntheticDataset,
                               TwoMoonsDataset)

ALL = [TwoMoonsDataset, EightGaussiansDataset, SwissRollDataset, GaussianMixtureDataset, CircleDataset,
       CheckerboardDataset, PinwheelDataset, GridDataset, SpiralDataset]


@pytest.mark.parametrize('cls', ALL)
def test_contract(cls):
    ds = cls(n_samples=257, seed=3)
    assert isinstance(ds, SyntheticDataset) and isinstance(ds, torch.utils.data.Dataset)
    data = ds.get_data()
    assert data.shape == (257, 2) and data.dtype == torch.float32 and len(ds) == 257
    assert torch.isfinite(data).all()
    assert torch.equal(ds[5], data[5]) and ds[-1].shape == (2,)
    batches = list(DataLoader(ds, batch_size=100, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert [len(b) for b in batches] == [100, 100, 57]
    assert torch.equal(torch.cat(batches).sort(0).values, data.sort(0).values)
    assert cls.__name__ in repr(ds) and 'seed=3' in repr(ds)


@pytest.mark.parametrize('cls', ALL)
def test_seeding_is_private_and_reproducible(cls):
    state = torch.get_rng_state()
    a, b = cls(n_samples=200, seed=11), cls(n_samples=200, seed=11)
    assert torch.equal(a.get_data(), b.get_data())
    assert not torch.equal(a.get_data(), cls(n_samples=200, seed=12).get_data())
    fresh1, fresh2 = cls(n_samples=200), cls(n_samples=200)
    assert not torch.equal(fresh1.get_data(), fresh2.get_data())
    assert torch.equal(cls(n_samples=200, seed=fresh1.seed).get_data(), fresh1.get_data())
    assert torch.equal(torch.get_rng_state(), state), 'building a dataset must not touch the global RNG'


@pytest.mark.parametrize('cls', ALL)
def test_regenerate(cls):
    ds = cls(n_samples=100, seed=1)
    first = ds.get_data().clone()
    new = ds.regenerate()
    assert new is ds.get_data() and not torch.equal(new, first)
    assert torch.equal(ds.regenerate(seed=1), first) and ds.seed == 1


@pytest.mark.parametrize('cls', ALL)
def test_dtype_and_default_box(cls):
    ds = cls(n_samples=2000, seed=0, dtype=torch.float64)
    data = ds.get_data()
    assert data.dtype == torch.float64
    assert torch.equal(data.float(), cls(n_samples=2000, seed=0).get_data())
    assert data.abs().max() < 3.5


@pytest.mark.parametrize('cls', ALL)
def test_common_validation(cls):
    for bad in (0, -3):
        with pytest.raises(ValueError, match='n_samples'): cls(n_samples=bad)
    with pytest.raises(TypeError, match='n_samples'): cls(n_samples=10.0)
    with pytest.raises(TypeError, match='dtype'): cls(n_samples=10, dtype=torch.int32)
    with pytest.raises(TypeError, match='seed'): cls(n_samples=10, seed='1')


@pytest.mark.parametrize('cls, kwargs, name', [
    (TwoMoonsDataset, dict(noise=-0.1), 'noise'),
    (TwoMoonsDataset, dict(noise=float('inf')), 'noise'),
    (TwoMoonsDataset, dict(noise='0.1'), 'noise'),
    (GaussianMixtureDataset, dict(n_components=0), 'n_components'),
    (GaussianMixtureDataset, dict(std=-1.0), 'std'),
    (GaussianMixtureDataset, dict(radius=0.0), 'radius'),
    (EightGaussiansDataset, dict(scale=-2.0), 'scale'),
    (SwissRollDataset, dict(arclength=0.0), 'arclength'),
    (CircleDataset, dict(radius=-1.0), 'radius'),
    (CheckerboardDataset, dict(n_cells=1), 'n_cells'),
    (CheckerboardDataset, dict(range_limit=0.0), 'range_limit'),
    (PinwheelDataset, dict(n_classes=0), 'n_classes'),
    (PinwheelDataset, dict(angular_scale=-0.1), 'angular_scale'),
    (GridDataset, dict(grid_size=0), 'grid_size'),
    (SpiralDataset, dict(n_arms=0), 'n_arms'),
    (SpiralDataset, dict(turns=0.0), 'turns'),
])
def test_specific_validation(cls, kwargs, name):
    with pytest.raises((ValueError, TypeError), match=name): cls(n_samples=10, **kwargs)


def test_spec_calls():
    assert len(TwoMoonsDataset(n_samples=5000)) == 5000
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    ds = TwoMoonsDataset(n_samples=3000, noise=0.05, seed=42, device=device)
    assert ds.get_data().device.type == device.type
    data = GaussianMixtureDataset(n_samples=500, n_components=4, std=0.1, seed=123).get_data()
    assert data.shape == (500, 2)
    assert sum(b.shape[0] for b in DataLoader(data, batch_size=32, shuffle=True)) == 500


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('cls', ALL)
def test_cuda_matches_cpu(cls):
    cuda = cls(n_samples=300, seed=5, device='cuda').get_data()
    assert cuda.is_cuda and torch.equal(cuda.cpu(), cls(n_samples=300, seed=5).get_data())


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_gaussian_mixture_moments(seed):
    "Equal weights: each component holds 1/K of the points, with per-coordinate std `std` around its centre."
    ds = GaussianMixtureDataset(n_samples=20000, n_components=5, std=0.1, radius=1.5, seed=seed, dtype=torch.float64)
    x = ds.get_data()
    label = torch.cdist(x, ds.centers).argmin(1)
    frac = torch.bincount(label, minlength=5).double() / len(x)
    assert torch.allclose(frac, torch.full((5,), 0.2, dtype=torch.float64), atol=0.015)
    resid = x - ds.centers[label]
    assert torch.allclose(resid.std(0), torch.full((2,), 0.1, dtype=torch.float64), rtol=0.03)
    assert torch.allclose(resid.mean(0), torch.zeros(2, dtype=torch.float64), atol=0.005)


@pytest.mark.parametrize('seed', [0, 1])
def test_eight_gaussians_and_grid_modes(seed):
    x8 = EightGaussiansDataset(n_samples=8000, seed=seed, dtype=torch.float64).get_data()
    angles = torch.atan2(x8[:, 1], x8[:, 0])
    sector = torch.round(angles / (math.pi / 4)) % 8
    assert torch.allclose(torch.bincount(sector.long(), minlength=8).double() / 8000, torch.full((8,), 0.125, dtype=torch.float64), atol=0.015)
    assert torch.allclose(x8.norm(dim=1).mean(), torch.tensor(2.0, dtype=torch.float64), atol=0.01)
    grid = GridDataset(n_samples=5000, grid_size=5, range_limit=2.0, std=0.05, seed=seed)
    assert grid.centers.shape == (25, 2)
    counts = torch.bincount(torch.cdist(grid.get_data().double(), grid.centers).argmin(1), minlength=25)
    assert counts.min() > 150 and counts.max() < 250


def test_geometry_without_noise():
    circle = CircleDataset(5000, noise=0.0, radius=1.7, seed=0, dtype=torch.float64).get_data()
    assert torch.allclose(circle.norm(dim=1), torch.tensor(1.7, dtype=torch.float64))
    angle = torch.atan2(circle[:, 1], circle[:, 0])
    assert torch.allclose(torch.histc(angle, bins=4, min=-math.pi, max=math.pi) / 5000, torch.full((4,), 0.25, dtype=torch.float64), atol=0.03)
    roll = SwissRollDataset(3000, noise=0.0, radius=2.0, seed=0, dtype=torch.float64).get_data()
    assert roll.norm(dim=1).max() <= 2.0 + 1e-12 and roll.norm(dim=1).min() >= 2.0 / 3 - 1e-12
    spiral = SpiralDataset(3000, noise=0.0, radius=2.5, seed=0, dtype=torch.float64).get_data()
    assert spiral.norm(dim=1).max() <= 2.5 + 1e-12
    pin = PinwheelDataset(3000, noise=0.0, seed=0, dtype=torch.float64).get_data()
    assert pin.norm(dim=1).max() <= 2.0 + 1e-12


def test_checkerboard_is_uniform_on_black_cells():
    x = CheckerboardDataset(16000, range_limit=2.0, n_cells=4, seed=0).get_data()
    cells = torch.floor(x + 2.0).long().clamp(0, 3)
    assert ((cells[:, 0] + cells[:, 1]) % 2 == 1).all()
    counts = torch.bincount(cells[:, 0] * 4 + cells[:, 1], minlength=16).reshape(4, 4)
    black = counts[(torch.arange(4)[:, None] + torch.arange(4)) % 2 == 1]
    assert black.min() > 1800 and black.max() < 2200
    assert counts.sum() == black.sum()


@pytest.mark.parametrize('cls, kwargs', [(GaussianMixtureDataset, dict(n_components=3, std=0.3)),
                                         (EightGaussiansDataset, dict(std=0.2)), (GridDataset, dict(grid_size=2, std=0.4))])
def test_mixture_log_prob_is_a_normalised_density_matching_the_sample(cls, kwargs):
    ds = cls(n_samples=20000, seed=0, dtype=torch.float64, **kwargs)
    side = torch.linspace(-4, 4, 401, dtype=torch.float64)
    mesh = torch.stack(torch.meshgrid(side, side, indexing='ij'), -1).reshape(-1, 2)
    assert abs(ds.log_prob(mesh).exp().sum() * (8 / 400) ** 2 - 1) < 2e-3
    # the sample's average log-density estimates -entropy; compare with an independent sample's
    other = cls(n_samples=20000, seed=1, dtype=torch.float64, **kwargs).get_data()
    assert abs(ds.log_prob(ds.get_data()).mean() - ds.log_prob(other).mean()) < 0.05
    with pytest.raises(ValueError, match='std > 0'): cls(n_samples=10, **{**kwargs, 'std': 0.0}).log_prob(mesh)
