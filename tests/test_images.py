"""Image datasets, image models, discrete-data likelihoods and the feature-space sample metric: loaders on files the
tests write themselves (nothing downloads), bad inputs, and the checks too slow or too cross-cutting for a notebook."""
import gzip
import math
import struct
import sys
import types
import warnings

import numpy as np
import pytest
import torch

from torchebm.datasets import (DigitsDataset, FashionMNISTDataset, ImageDataset, MNISTDataset, read_idx,
                               split_indices, uniform_dequantize)
from torchebm.diagnostics.sample_quality import classifier_outputs, frechet_distance, sample_quality, train_classifier
from torchebm.models import ConditionalTransformer2D, ConvEnergy, UNetVelocity
from torchebm.samplers import FlowSampler
from torchebm.samplers.likelihood import flow_likelihood, level_bin_width, resolve_divergence


def write_idx(path, array):
    "Write `array` as an IDX file (gzip-compressed when the name ends in .gz), the MNIST format."
    codes = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D, np.float64: 0x0E}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim]) + struct.pack(f'>{array.ndim}I', *array.shape)
    data = header + array.astype(array.dtype.newbyteorder('>')).tobytes()
    with (gzip.open(path, 'wb') if str(path).endswith('.gz') else open(path, 'wb')) as f:
        f.write(data)


# -- IDX files and the MNIST loaders ---------------------------------------------------------------------------------
@pytest.mark.parametrize('dtype', [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize('suffix', ['', '.gz'])
def test_read_idx_round_trip(tmp_path, dtype, suffix):
    array = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype) if dtype != np.uint8 else np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / f'a.idx{suffix}', array)
    out = read_idx(tmp_path / f'a.idx{suffix}')
    assert out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out.numpy(), array)


def test_read_idx_bad_files(tmp_path):
    (tmp_path / 'bad').write_bytes(b'\x00\x00\x07\x01' + struct.pack('>I', 1) + b'\x00')
    with pytest.raises(ValueError, match='not an IDX file'): read_idx(tmp_path / 'bad')
    write_idx(tmp_path / 'short', np.zeros((4, 2), np.uint8))
    (tmp_path / 'short').write_bytes((tmp_path / 'short').read_bytes()[:-1])
    with pytest.raises(ValueError, match='truncated'): read_idx(tmp_path / 'short')
    with pytest.raises(FileNotFoundError): read_idx(tmp_path / 'missing')


@pytest.mark.parametrize('cls, layout', [(MNISTDataset, ''), (MNISTDataset, 'MNIST/raw'),
                                         (FashionMNISTDataset, 'FashionMNIST/raw')])
def test_mnist_loaders(tmp_path, cls, layout):
    rng = np.random.default_rng(1)
    folder = tmp_path / layout
    folder.mkdir(parents=True, exist_ok=True)
    data = {split: (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8))
            for split, n in (('train', 12), ('t10k', 5))}
    for split, (images, labels) in data.items():
        write_idx(folder / f'{split}-images-idx3-ubyte.gz', images)
        write_idx(folder / f'{split}-labels-idx1-ubyte', labels)
    for split, key in (('train', 'train'), ('test', 't10k')):
        for value_range in ((-1.0, 1.0), (0.0, 1.0)):
            ds = cls(tmp_path, split=split, value_range=value_range)
            images, labels = data[key]
            low, high = value_range
            assert ds.get_data().shape == (len(images), 1, 28, 28) and ds.n_levels == 256 and ds.n_classes == 10
            torch.testing.assert_close(ds.images[:, 0], low + (high - low) * torch.from_numpy(images).float() / 255)
            torch.testing.assert_close(ds.to_levels(ds.images).round()[:, 0], torch.from_numpy(images).float())
            assert torch.equal(ds.labels, torch.from_numpy(labels).long())
            x, y = ds[3]
            assert x.shape == (1, 28, 28) and y.dtype == torch.long


def test_mnist_missing_and_mismatched(tmp_path):
    with pytest.raises(FileNotFoundError, match='never downloads'): MNISTDataset(tmp_path)
    write_idx(tmp_path / 'train-images-idx3-ubyte', np.zeros((3, 4, 4), np.uint8))
    write_idx(tmp_path / 'train-labels-idx1-ubyte', np.zeros(2, np.uint8))
    with pytest.raises(ValueError, match='expected images'): MNISTDataset(tmp_path)
    with pytest.raises(ValueError, match="expected one of"): MNISTDataset(tmp_path, split='valid')


# -- torchvision (a stand-in module: torchvision is optional and never imported otherwise) ------------------------
def test_from_torchvision_with_a_stand_in(monkeypatch, tmp_path):
    calls = []

    class CIFAR10:
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            self.data = np.random.default_rng(0).integers(0, 256, (4, 6, 6, 3), dtype=np.uint8)  # channels last
            self.targets = [0, 1, 2, 1]

    fake = types.ModuleType('torchvision')
    fake.datasets = types.SimpleNamespace(CIFAR10=CIFAR10)
    monkeypatch.setitem(sys.modules, 'torchvision', fake)
    ds = ImageDataset.from_torchvision('CIFAR10', tmp_path, train=False, value_range=(0, 1))
    assert calls == [(str(tmp_path), False, False)]  # never downloads
    assert ds.image_shape == (3, 6, 6) and ds.n_classes == 3
    torch.testing.assert_close(ds.images[2], torch.from_numpy(CIFAR10(tmp_path, 1, 0).data[2]).permute(2, 0, 1) / 255.)
    with pytest.raises(ValueError, match='class name'): ImageDataset.from_torchvision('NoSuchSet', tmp_path)


def test_from_torchvision_without_torchvision(monkeypatch):
    monkeypatch.setitem(sys.modules, 'torchvision', None)  # makes `import torchvision` fail
    with pytest.raises(ImportError, match='torchvision'): ImageDataset.from_torchvision('MNIST', '.')


# -- the digits ---------------------------------------------------------------------------------------------------
def test_digits_splits_are_seeded_and_disjoint():
    every = DigitsDataset('all', value_range=(0, 1))
    rows = {tuple(r) for r in every.images.flatten(1).tolist()}
    train, test = DigitsDataset('train', seed=3, value_range=(0, 1)), DigitsDataset('test', seed=3, value_range=(0, 1))
    assert len(train) + len(test) == len(every) == 1797 and len(test) == round(0.2 * 1797)
    # indices are disjoint (identical images may occur twice in the data, so compare the indices)
    tr, te = split_indices(1797, 'train', 0.2, 3), split_indices(1797, 'test', 0.2, 3)
    assert not set(tr.tolist()) & set(te.tolist())
    assert torch.equal(train.images, every.images[tr]) and torch.equal(test.labels, every.labels[te])
    assert not torch.equal(DigitsDataset('test', seed=4).labels, DigitsDataset('test', seed=3).labels)
    assert {tuple(r) for r in train.images.flatten(1).tolist()} <= rows
    assert train.images.dtype == torch.float32 and DigitsDataset('test', dtype=torch.float64).images.dtype == torch.float64
    assert (test.labels.bincount(minlength=10) > 20).all()


def test_digits_scale_and_levels():
    ds = DigitsDataset('all')
    assert ds.n_levels == 17 and ds.bin_width == pytest.approx(2 / 16)
    levels = ds.to_levels(ds.images)
    torch.testing.assert_close(levels, levels.round())
    assert levels.min() == 0 and levels.max() == 16


def test_digits_without_sklearn(monkeypatch):
    monkeypatch.setitem(sys.modules, 'sklearn.datasets', None)
    with pytest.raises(ImportError, match=r"torchebm\[images\]"): DigitsDataset()


def test_image_dataset_bad_input():
    with pytest.raises(ValueError, match='0 .. 16'): ImageDataset(torch.full((1, 2, 2), 17), n_levels=17)
    with pytest.raises(ValueError, match='integers'): ImageDataset(torch.full((1, 2, 2), 0.5), n_levels=17)
    with pytest.raises(ValueError, match=r'\[n, C, H, W\]'): ImageDataset(torch.zeros(2, 2))
    with pytest.raises(ValueError, match='labels'): ImageDataset(torch.zeros(2, 2, 2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match='labels'): ImageDataset(torch.zeros(2, 2, 2), torch.zeros(2))
    with pytest.raises(TypeError, match='value_range'): ImageDataset(torch.zeros(1, 2, 2), value_range=0)
    with pytest.raises(TypeError, match='n_levels'): ImageDataset(torch.zeros(1, 2, 2), n_levels=2.0)
    with pytest.raises(ValueError, match='test_fraction'): split_indices(10, 'train', 1.0)
    with pytest.raises(ValueError, match='bin_width'): uniform_dequantize(torch.zeros(2), 0.0)


def test_dequantization_is_uniform_within_the_bins():
    "Deviations are U(-D/2, D/2): mean 0 and variance D^2/12 within a few Monte Carlo standard errors."
    x = torch.zeros(200_000, dtype=torch.float64)
    d = uniform_dequantize(x, 0.5, generator=torch.Generator().manual_seed(0))
    assert d.min() >= -0.25 and d.max() < 0.25
    se_mean = (0.5 ** 2 / 12 / len(x)) ** 0.5
    assert abs(float(d.mean())) < 5 * se_mean
    assert abs(float(d.var()) - 0.5 ** 2 / 12) < 5 * 0.5 ** 2 / 12 * (0.8 / len(x)) ** 0.5  # Var(U^2) = 4/5 (D^2/12)^2


# -- image models -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_conv_energy_contract(dtype):
    for n_classes in (None, 10):
        model = ConvEnergy(channels=(8, 16), n_classes=n_classes, spectral_norm=True, dtype=dtype)
        x = torch.randn(4, 1, 8, 8, dtype=dtype)
        e = model(x)
        assert e.shape == (4,) and e.dtype == dtype and model.gradient(x).shape == x.shape
        assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    with pytest.raises(ValueError, match='channels'): ConvEnergy(channels=())
    with pytest.raises(ValueError, match='n_classes'): ConvEnergy(n_classes=1)


def test_unet_velocity_bad_input():
    with pytest.raises(ValueError, match='channels'): UNetVelocity(channels=(8, 0))
    with pytest.raises(ValueError, match=r'\[batch, 1, H, W\]'): UNetVelocity()(torch.randn(2, 64), 0.5)
    with pytest.raises(ValueError, match='divisible by 4'): UNetVelocity()(torch.randn(2, 1, 10, 10), 0.5)


@pytest.mark.slow
def test_backbones_learn_digits_flow_matching():
    "UNetVelocity and ConditionalTransformer2D (patches of 2x2) both fit the digits' flow-matching loss on 8x8."
    from torchebm.losses import FlowMatchingLoss
    data = DigitsDataset('train').get_data()
    nets = {'unet': UNetVelocity(channels=(16, 32)),
            'dit': ConditionalTransformer2D(in_channels=1, input_size=8, patch_size=2, embed_dim=64, depth=2,
                                            num_heads=4, time_scale=1000.0)}
    for name, net in nets.items():
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        loss_fn, opt = FlowMatchingLoss(net), torch.optim.Adam(net.parameters(), lr=1e-3)
        losses = []
        for _ in range(300):
            loss = loss_fn(data[torch.randint(0, len(data), (128,), generator=g)], generator=g)
            opt.zero_grad(); loss.backward(); opt.step(); losses.append(loss.item())
        # the untrained (zero) field's loss is E|x1 - x0|^2 / D, about 1.5 on the digits; a trained one is well below
        assert np.mean(losses[:10]) > 1.2 and np.mean(losses[-50:]) < 0.75, (name, np.mean(losses[-50:]))


@pytest.mark.parametrize('name', ['unet', 'dit'])
def test_backbones_train_on_28x28(name):
    """At 28x28 (MNIST size) both velocity fields train: on a tiny fixed batch (8 digits upsampled to 28x28) the
    flow-matching loss, on fixed noise and times, falls by a quarter within 20 Adam steps; every parameter gets a
    non-zero finite gradient (the zero-initialised output layers pass gradients on once they move), nothing NaNs."""
    from torchebm.losses import FlowMatchingLoss
    torch.manual_seed(0)
    net = (UNetVelocity(channels=(8, 16, 16), cond_dim=32) if name == 'unet' else
           ConditionalTransformer2D(in_channels=1, input_size=28, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                                    time_scale=1000.0))
    x = torch.nn.functional.interpolate(DigitsDataset('train').get_data()[:8], size=28, mode='bilinear')
    loss_fn, opt = FlowMatchingLoss(net), torch.optim.Adam(net.parameters(), lr=3e-3)

    def fixed_loss():
        with torch.no_grad():
            return sum(loss_fn(x, generator=torch.Generator().manual_seed(s)).item() for s in range(4)) / 4

    before, g = fixed_loss(), torch.Generator().manual_seed(1)
    for _ in range(20):
        loss = loss_fn(x, generator=g)
        opt.zero_grad(); loss.backward(); opt.step()
        assert torch.isfinite(loss)
    after = fixed_loss()
    assert net(x, torch.full((8,), 0.5)).shape == x.shape
    assert after < 0.75 * before, (before, after)
    for pname, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname
        assert torch.isfinite(p).all(), pname


# -- likelihood of discrete data ------------------------------------------------------------------------------------


class _Contraction(torch.nn.Module):
    "v(x, t) = -a x: the flow of N(0, I) at t = 0 to N(0, e^{-2a} I) at t = 1, so log p(x) is known in closed form."
    def __init__(self, a): super().__init__(); self.a = a
    def forward(self, x, t): return -self.a * x


def _closed_form(x, a):
    var = math.exp(-2 * a)
    flat = x.flatten(1)
    return -0.5 * flat.square().sum(1) / var - 0.5 * flat.shape[1] * math.log(2 * math.pi * var)



@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_flow_likelihood_continuous_matches_closed_form(dtype):
    x = 0.5 * torch.randn(5, 1, 4, 4, dtype=dtype, generator=torch.Generator().manual_seed(0))
    sampler = FlowSampler(_Contraction(0.3), integrator='rk4', n_steps=20)
    for divergence in ('exact', 'hutchinson', 'auto'):  # the field's Jacobian is -a I: Hutchinson is exact here
        out = flow_likelihood(sampler, x, divergence=divergence)
        assert out.log_likelihood.dtype == dtype
        torch.testing.assert_close(out.log_likelihood, _closed_form(x, 0.3).to(dtype), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out.bits_per_dim, -out.log_likelihood / (16 * math.log(2)))


def test_flow_likelihood_discrete_adds_the_bin_volume():
    "Discrete bound = E log p(dequantised) + D log(bin width); dropping the D log(bin width) term fails this check."
    levels, a = 5, 0.2
    width = level_bin_width(levels)
    x = -1 + width * torch.randint(0, levels, (4000, 1, 2, 2), generator=torch.Generator().manual_seed(1)).double()
    sampler = FlowSampler(_Contraction(a), integrator='rk4', n_steps=10)
    out = flow_likelihood(sampler, x, n_levels=levels, generator=torch.Generator().manual_seed(2))
    # E_u[log N(c + u)] = log N(c) - D width^2 / (24 var); the per-sample noise is sum_i c_i u_i / var
    var = math.exp(-2 * a)
    expected = _closed_form(x, a) - 4 * width ** 2 / (24 * var) + 4 * math.log(width)
    diff = out.log_likelihood - expected
    se = float(diff.std()) / math.sqrt(len(diff))
    assert abs(float(diff.mean())) < 5 * se
    assert float(diff.std()) < 1.0  # per-sample noise is small: the bound is not off by the D log(width) = -2.8 term


def test_flow_likelihood_bad_input():
    sampler = FlowSampler(_Contraction(0.1))
    x = torch.zeros(2, 1, 2, 2)
    assert resolve_divergence('auto', 32) == 'exact' and resolve_divergence('auto', 33) == 'hutchinson'
    assert resolve_divergence('auto', 64, max_exact_dim=64) == 'exact'
    with pytest.raises(ValueError, match="expected one of"): flow_likelihood(sampler, x, divergence='skilling')
    with pytest.raises(TypeError, match='FlowSampler'): flow_likelihood(_Contraction(0.1), x)
    with pytest.raises(ValueError, match='levels'): flow_likelihood(sampler, x + 0.01, n_levels=17)
    with pytest.raises(ValueError, match='levels'): flow_likelihood(sampler, x + 3.0, n_levels=17)
    with pytest.raises(TypeError, match='n_dequantizations'): flow_likelihood(sampler, x, n_levels=17, n_dequantizations=1.5)


def test_bits_per_dim_of_discrete_data_is_not_the_density_silently():
    """`FlowSampler.bits_per_dim` is `flow_likelihood(...).bits_per_dim`: digits without `n_levels` (the old call)
    warn that they look discrete; with `n_levels=17` the dequantised bound adds log2(1/bin width) = 3 bits/dim."""
    digits = DigitsDataset('test', dtype=torch.float64).get_data()[:6]
    sampler = FlowSampler(_Contraction(0.2), integrator='rk4', n_steps=8)
    with pytest.warns(UserWarning, match=r'looks discrete.*17 levels.*n_levels='):
        raw = sampler.bits_per_dim(digits, divergence='exact')
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        deq = sampler.bits_per_dim(digits, n_levels=17, generator=torch.Generator().manual_seed(1))
        ref = flow_likelihood(sampler, digits, n_levels=17, generator=torch.Generator().manual_seed(1))
        sampler.bits_per_dim(0.5 * torch.randn(6, 1, 8, 8, dtype=torch.float64))  # continuous data: no warning
    torch.testing.assert_close(deq, ref.bits_per_dim)
    # E log p(dequantised) is below log p(centres) by D width^2 / (24 var): under 0.02 bits/dim here
    assert 2.95 < float((deq - raw).mean()) < 3.05
    torch.testing.assert_close(raw, -_closed_form(digits, 0.2) / (64 * math.log(2)), rtol=1e-4, atol=1e-4)


def test_bits_per_dim_chooses_the_divergence_by_dimension():
    "'auto': exact divergence up to 32 dimensions, Hutchinson above (a non-symmetric linear field tells them apart)."
    g = torch.Generator().manual_seed(0)
    fields = {d: torch.randn(d, d, generator=g, dtype=torch.float64) / d ** 0.5 for d in (16, 64)}
    for d, side in ((16, 4), (64, 8)):
        a = fields[d]
        sampler = FlowSampler(lambda x, t: (x.flatten(1) @ a.T).reshape(x.shape), integrator='rk4', n_steps=4)
        x = torch.randn(3, 1, side, side, generator=g, dtype=torch.float64)
        auto = sampler.bits_per_dim(x, generator=torch.Generator().manual_seed(2))
        nats = {m: sampler.log_likelihood(x, divergence=m, generator=torch.Generator().manual_seed(2))
                for m in ('exact', 'hutchinson')}
        expected = 'exact' if d <= 32 else 'hutchinson'
        torch.testing.assert_close(auto, -nats[expected] / (d * math.log(2)))
        assert not torch.allclose(nats['exact'], nats['hutchinson'])
    # the old positional form (n_steps, divergence) still works
    torch.testing.assert_close(sampler.bits_per_dim(x, 4, 'exact'), -nats['exact'] / (64 * math.log(2)))


# -- sample quality -------------------------------------------------------------------------------------------------


def test_frechet_distance_matches_scipy_sqrtm():
    from scipy.linalg import sqrtm
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    b = torch.randn(200, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64) + 0.5
    ca, cb = np.cov(a.numpy().T), np.cov(b.numpy().T)
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum().item() + np.trace(ca + cb - 2 * sqrtm(ca @ cb).real)
    assert float(frechet_distance(a, b)) == pytest.approx(ref, rel=1e-6)
    with pytest.raises(ValueError, match='features_a'): frechet_distance(a[:1], b)


def test_classifier_is_seeded_and_leaves_the_global_rng_alone():
    train = DigitsDataset('train')
    state = torch.get_rng_state()
    c1 = train_classifier(train.images[:256], train.labels[:256], n_classes=10, epochs=1, generator=torch.Generator().manual_seed(0))
    c2 = train_classifier(train.images[:256], train.labels[:256], n_classes=10, epochs=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), state)
    for p, q in zip(c1.parameters(), c2.parameters()): assert torch.equal(p, q)
    probs, feats = classifier_outputs(c1.train(), train.images[:8])
    assert c1.training  # the mode is restored
    assert probs.shape == (8, 10) and feats.shape == (8, 64)
    with pytest.raises(ValueError, match='NaN'): sample_quality(c1, torch.full((4, 1, 8, 8), float('nan')))
    with pytest.raises(ValueError, match='labels'): train_classifier(train.images[:4], train.labels[:3])


def test_plot_image_grid_panels():
    import matplotlib
    matplotlib.use('Agg')
    from torchebm.visualization import plot_image_grid
    x = torch.rand(10, 1, 8, 8) * 2 - 1
    assert len(plot_image_grid(x).axes) == 1 and len(plot_image_grid(x, x).axes) == 2
    with pytest.raises(ValueError, match='titles'): plot_image_grid(x, x, titles=('one',))
