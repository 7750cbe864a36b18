"""Training losses: closed forms on Gaussian models, unbiasedness, call forms, buffers, bad input, and training."""
import math

import pytest
import torch
from torch import nn

from torchebm.core.base import BaseModel, expect_one_deprecation
from torchebm.losses import (ContrastiveDivergence, DenoisingScoreMatching, NoiseContrastiveEstimation,
                             PersistentContrastiveDivergence, ScoreMatching, SlicedScoreMatching)
from torchebm.samplers.langevin import LangevinDynamics

torch.set_num_threads(1)


class LearnableGaussian(BaseModel):
    "E(x) = 0.5 (x-mu)^T L L^T (x-mu), learnable mean and factor."
    def __init__(self, dim, dtype=torch.float64):
        super().__init__()
        self.mean = nn.Parameter(torch.zeros(dim, dtype=dtype))
        self.factor = nn.Parameter(torch.eye(dim, dtype=dtype))

    @property
    def dim(self): return self.mean.shape[0]

    @property
    def precision(self): return self.factor @ self.factor.T

    def log_normalizer(self):
        return 0.5 * self.dim * math.log(2 * math.pi) - 0.5 * torch.logdet(self.precision)

    def forward(self, x): return 0.5 * ((x - self.mean) @ self.factor).pow(2).sum(-1)


class ConditionalQuadratic(BaseModel):
    "E(x | y) = 0.5 y |x|^2."
    def forward(self, x, y): return 0.5 * y * x.pow(2).sum(-1)


def random_gaussian(dim=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = LearnableGaussian(dim)
    with torch.no_grad():
        model.factor.copy_(torch.eye(dim, dtype=torch.float64) + 0.3 * torch.randn(dim, dim, generator=g, dtype=torch.float64).tril())
        model.mean.copy_(torch.randn(dim, generator=g, dtype=torch.float64))
    return model


def gaussian_sm(model, x):
    P = model.precision
    return (0.5 * ((x - model.mean) @ P).pow(2).sum(-1) - P.trace()).mean()


def seed_mean(loss_fn, x, n_seeds=300):
    values = torch.stack([loss_fn(x, generator=torch.Generator().manual_seed(s)).detach() for s in range(n_seeds)])
    return values.mean(), values.std() / math.sqrt(n_seeds)


DATA_COV = torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=torch.float64)


def gaussian_data(n=20000, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 2, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(DATA_COV).T).to(dtype)


# ---------------------------------------------------------------- score matching: closed forms

@pytest.mark.parametrize('seed', [0, 1, 2])
def test_exact_score_matching_equals_closed_form(seed):
    model = random_gaussian(seed=seed)
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(10 + seed), dtype=torch.float64)
    loss = ScoreMatching(model)(x)
    assert torch.allclose(loss, gaussian_sm(model, x), atol=1e-10)
    got = torch.autograd.grad(loss, [model.mean, model.factor])
    want = torch.autograd.grad(gaussian_sm(model, x), [model.mean, model.factor])
    for a, b in zip(got, want): assert torch.allclose(a, b, atol=1e-10)


@pytest.mark.parametrize('probe', ['rademacher', 'gaussian', 'sphere'])
def test_hutchinson_is_unbiased(probe):
    model = random_gaussian()
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    mean, se = seed_mean(ScoreMatching(model, hessian_method='hutchinson', hutchinson_samples=2, probe=probe), x)
    assert abs(mean - gaussian_sm(model, x)) < 4 * se + 1e-9


@pytest.mark.parametrize('projection_type', ['rademacher', 'gaussian', 'sphere'])
@pytest.mark.parametrize('variance_reduction', [False, True])
def test_sliced_score_matching_is_exact_in_expectation(projection_type, variance_reduction):
    model = random_gaussian(seed=3)
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    ssm = SlicedScoreMatching(model, n_projections=2, projection_type=projection_type,
                              variance_reduction=variance_reduction)
    mean, se = seed_mean(ssm, x)
    assert abs(mean - gaussian_sm(model, x)) < 4 * se + 1e-9


def test_variance_reduction_lowers_the_variance():
    model = random_gaussian(seed=4)
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    plain = seed_mean(SlicedScoreMatching(model, n_projections=1, projection_type='gaussian'), x)[1]
    reduced = seed_mean(SlicedScoreMatching(model, n_projections=1, projection_type='gaussian', variance_reduction=True), x)[1]
    assert reduced < plain


def test_dsm_minimised_at_the_smoothed_model():
    data, sigma = gaussian_data(), 0.5
    smoothed = torch.linalg.inv(DATA_COV + sigma ** 2 * torch.eye(2, dtype=torch.float64))
    model = LearnableGaussian(2)
    dsm = DenoisingScoreMatching(model, sigma=sigma)
    scales = torch.linspace(0.7, 1.3, 13)
    values = []
    for c in scales:
        with torch.no_grad(): model.factor.copy_(torch.linalg.cholesky(c.item() * smoothed))
        values.append(dsm(data, generator=torch.Generator().manual_seed(0)).item())
    assert abs(scales[int(torch.tensor(values).argmin())].item() - 1.0) < 0.1


def test_dsm_matches_its_definition_for_several_levels():
    model = random_gaussian()
    x = torch.randn(32, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    levels = [0.1, 0.5, 2.0]
    g = torch.Generator().manual_seed(9)
    eps, level = torch.randn(x.shape, generator=g, dtype=x.dtype), torch.randint(3, (32,), generator=g)
    s = torch.tensor(levels, dtype=x.dtype)[level][:, None]
    want = 0.5 * (s * ((x + s * eps - model.mean) @ model.precision) - eps).pow(2).sum(-1).mean()
    got = DenoisingScoreMatching(model, sigma=levels)(x, generator=torch.Generator().manual_seed(9))
    assert torch.allclose(got, want, atol=1e-10)
    g = torch.Generator().manual_seed(9)
    eps = torch.randn(x.shape, generator=g, dtype=x.dtype)
    want = 0.5 * (((x + 0.3 * eps - model.mean) @ model.precision) - eps / 0.3).pow(2).sum(-1).mean()
    assert torch.allclose(DenoisingScoreMatching(model, sigma=0.3)(x, generator=torch.Generator().manual_seed(9)), want)


# ---------------------------------------------------------------- training a quadratic energy

def fit(make_loss, steps=300, lr=0.05, dtype=torch.float64):
    data = gaussian_data(dtype=dtype)
    model = LearnableGaussian(2, dtype=dtype)
    loss_fn = make_loss(model)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = data[torch.randint(len(data), (256,), generator=g)]
        opt.zero_grad()
        out = loss_fn(batch, generator=g)
        (out[0] if isinstance(out, tuple) else out).backward()
        opt.step(); decay.step()
    return model


@pytest.mark.parametrize('name,make_loss,target,tol', [
    ('SM', lambda m: ScoreMatching(m), DATA_COV, 0.08),
    ('SM-hutchinson', lambda m: ScoreMatching(m, hessian_method='hutchinson'), DATA_COV, 0.1),
    ('SSM', lambda m: SlicedScoreMatching(m, n_projections=1), DATA_COV, 0.1),
    ('DSM', lambda m: DenoisingScoreMatching(m, sigma=0.3), DATA_COV + 0.09 * torch.eye(2, dtype=torch.float64), 0.1),
])
def test_training_recovers_the_covariance(name, make_loss, target, tol):
    model = fit(make_loss)
    cov = torch.linalg.inv(model.precision.detach())
    assert torch.allclose(cov, target, atol=tol), (name, cov)


@pytest.mark.slow
def test_persistent_cd_recovers_the_covariance():
    def make(m): return ContrastiveDivergence(m, LangevinDynamics(model=m, step_size=0.02), k_steps=10,
                                             persistent=True, buffer_size=1024, reinit_prob=0.0)
    model = fit(make, dtype=torch.float32, lr=0.03)
    cov = torch.linalg.inv(model.precision.detach().double())
    assert torch.allclose(cov, DATA_COV, atol=0.12), cov


# ---------------------------------------------------------------- NCE

def test_nce_recovers_log_z_of_a_fixed_energy():
    s, dim = 0.7, 2

    class Fixed(BaseModel):
        def forward(self, x): return x.pow(2).sum(-1) / (2 * s ** 2)

    g = torch.Generator().manual_seed(0)
    data = s * torch.randn(50000, dim, generator=g, dtype=torch.float64)
    noise = torch.distributions.MultivariateNormal(torch.zeros(dim, dtype=torch.float64),
                                                   2.0 * torch.eye(dim, dtype=torch.float64))
    nce = NoiseContrastiveEstimation(Fixed(dtype=torch.float64), noise, noise_ratio=4)
    opt = torch.optim.LBFGS(nce.parameters(), lr=0.5, max_iter=50)

    def closure():
        opt.zero_grad()
        loss = nce(data, generator=torch.Generator().manual_seed(1))
        loss.backward()
        return loss
    opt.step(closure)
    assert abs(nce.log_normalizer.item() - dim / 2 * math.log(2 * math.pi * s ** 2)) < 0.03


@pytest.mark.slow
def test_nce_learns_a_normalised_gaussian():
    data = gaussian_data()
    model = LearnableGaussian(2)
    noise = torch.distributions.MultivariateNormal(torch.zeros(2, dtype=torch.float64), 2.0 * DATA_COV)
    nce = NoiseContrastiveEstimation(model, noise, noise_ratio=2)
    opt = torch.optim.Adam(nce.parameters(), lr=0.05)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 400)
    g = torch.Generator().manual_seed(0)
    for _ in range(400):
        opt.zero_grad()
        nce(data[torch.randint(len(data), (512,), generator=g)], generator=g).backward()
        opt.step(); decay.step()
    assert torch.allclose(torch.linalg.inv(model.precision.detach()), DATA_COV, atol=0.1)
    assert abs(nce.log_normalizer.item() - model.log_normalizer().item()) < 0.1


# ---------------------------------------------------------------- contrastive divergence

def small_cd(**kw):
    model = LearnableGaussian(2, dtype=torch.float32)
    return model, ContrastiveDivergence(model=model, sampler=LangevinDynamics(model=model, step_size=0.05), **kw)


def test_cd_gradient_is_data_minus_model_expectation():
    model, cd = small_cd(k_steps=3)
    with torch.no_grad(): model.factor.copy_(torch.tensor([[1.2, 0.0], [0.4, 0.7]]))
    x = gaussian_data(64, dtype=torch.float32)
    loss, negatives = cd(x, generator=torch.Generator().manual_seed(0))
    params = [model.mean, model.factor]
    got = torch.autograd.grad(loss, params)
    per_sample = lambda pts: torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(model(p[None]).sum(), params)])
                                          for p in pts]).mean(0)
    want = per_sample(x) - per_sample(negatives)
    assert torch.allclose(torch.cat([g.flatten() for g in got]), want, atol=1e-5)
    assert not negatives.requires_grad


def test_cd_is_reproducible_with_a_generator():
    model, cd = small_cd(k_steps=5, persistent=True, buffer_size=200)
    _, cd2 = small_cd(k_steps=5, persistent=True, buffer_size=200)
    x = gaussian_data(32, dtype=torch.float32)
    a, neg_a = cd(x, generator=torch.Generator().manual_seed(3))
    b, neg_b = cd2(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(neg_a, neg_b) and a.item() == b.item()
    assert torch.equal(cd.replay_buffer, cd2.replay_buffer)


def test_pcd_buffer_state_dict_round_trip_and_to():
    model, pcd = small_cd(persistent=True, buffer_size=100)
    pcd(gaussian_data(64, dtype=torch.float32))
    pcd(gaussian_data(32, dtype=torch.float32))
    assert pcd.replay_buffer.shape == (100, 2)
    state = pcd.state_dict()
    _, fresh = small_cd(persistent=True, buffer_size=100)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.replay_buffer, pcd.replay_buffer)
    fresh.to(torch.float64)
    assert fresh.replay_buffer.dtype == torch.float64 and fresh.model.mean.dtype == torch.float64
    _, negatives = fresh(gaussian_data(16))
    assert negatives.dtype == torch.float64
    assert isinstance(PersistentContrastiveDivergence(model=model, sampler=LangevinDynamics(step_size=0.1)).persistent, bool)


def test_pcd_only_moves_the_chains_it_used():
    _, pcd = small_cd(persistent=True, buffer_size=100, reinit_prob=0.0)
    pcd(gaussian_data(8, dtype=torch.float32))
    before = pcd.replay_buffer.clone()
    pcd(gaussian_data(8, dtype=torch.float32))
    assert int((pcd.replay_buffer != before).any(1).sum()) == 8


def test_pcd_restarts_a_fraction_from_noise():
    model, pcd = small_cd(persistent=True, buffer_size=4000, reinit_prob=0.5, init_std=100.0, k_steps=1)
    with torch.no_grad(): pcd.replay_buffer = torch.zeros(4000, 2)
    _, negatives = pcd(gaussian_data(2000, dtype=torch.float32), generator=torch.Generator().manual_seed(0))
    restarted = (negatives.abs() > 10).any(1).float().mean().item()
    assert abs(restarted - 0.5) < 0.05


def test_cd_conditioning_reaches_energies_and_sampler():
    cd = ContrastiveDivergence(model=ConditionalQuadratic(), sampler=LangevinDynamics(step_size=0.01), k_steps=300)
    y = torch.cat([torch.full((500,), 1.0), torch.full((500,), 4.0)])
    loss, negatives = cd(torch.zeros(1000, 2), y=y, generator=torch.Generator().manual_seed(0))
    assert abs(negatives[:500].var().item() - 1.0) < 0.15
    assert abs(negatives[500:].var().item() - 0.25) < 0.05
    want = (0.5 * y * torch.zeros(1000)).mean() - (0.5 * y * negatives.pow(2).sum(-1)).mean()
    assert torch.allclose(loss, want)


def test_cd_passes_its_model_to_the_run_and_never_touches_the_sampler():
    "The sampler is an argument holder only: its model is not swapped, also not temporarily."
    class Spy(LangevinDynamics):
        seen = []
        def sample(self, *args, model=None, **kwargs):
            Spy.seen.append((self.model, model))
            return super().sample(*args, model=model, **kwargs)
    spy = Spy(step_size=0.01)
    model = LearnableGaussian(2, dtype=torch.float32)
    ContrastiveDivergence(model=model, sampler=spy, k_steps=2)(gaussian_data(8, dtype=torch.float32))
    assert Spy.seen == [(None, model)] and spy.model is None


def test_cd_with_a_sampler_that_cannot_take_a_model():
    "A duck-typed sampler without `sample(model=)` works for its own model and is refused for another one."
    class Fixed:
        def __init__(self, model): self.model = model
        def sample(self, x, n_steps, generator=None): return x + 0.0
    model = LearnableGaussian(2, dtype=torch.float32)
    x = gaussian_data(8, dtype=torch.float32)
    loss, negatives = ContrastiveDivergence(model=model, sampler=Fixed(model))(x)
    assert torch.equal(negatives, x)
    with pytest.raises(TypeError, match='must accept model='):
        ContrastiveDivergence(model=LearnableGaussian(2, dtype=torch.float32), sampler=Fixed(model))(x)


@pytest.mark.parametrize('init', ['gaussian', 'uniform', 'data'])
def test_pcd_restarts_follow_buffer_init(init):
    "Restarted chains come from the same distribution as the buffer's first fill."
    _, pcd = small_cd(persistent=True, buffer_size=4000, reinit_prob=1.0, k_steps=1, buffer_init=init,
                      init_range=(5.0, 6.0), init_std=0.01, data_noise=0.0)
    x = torch.full((2000, 2), -7.0)
    pcd.replay_buffer = torch.zeros(4000, 2)
    index, start = pcd.buffer_start_points(x, 2000, torch.Generator().manual_seed(0))
    if init == 'gaussian': assert start.abs().max() < 0.1
    if init == 'uniform': assert start.min() >= 5.0 and start.max() <= 6.0
    if init == 'data': assert torch.equal(start, x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_pcd_buffer_lives_on_the_device_it_was_given():
    "ContrastiveDivergence(device='cpu') keeps a large buffer in host memory while the chains run on the GPU."
    model = LearnableGaussian(2).cuda()
    pcd = ContrastiveDivergence(model=model, sampler=LangevinDynamics(step_size=0.01), k_steps=2, persistent=True,
                                buffer_size=256, device='cpu')
    loss, negatives = pcd(torch.randn(32, 2, device='cuda'))
    assert pcd.replay_buffer.device.type == 'cpu' and negatives.is_cuda and loss.is_cuda


# ---------------------------------------------------------------- call forms from the spec

def test_cd_spec_call_forms():
    model, cd = small_cd(k_steps=2)
    x = gaussian_data(16, dtype=torch.float32)
    loss, negatives = cd(x)
    assert loss.shape == () and negatives.shape == x.shape
    old = expect_one_deprecation(lambda: ContrastiveDivergence(sampler=cd.sampler, k=10))
    assert old.model is model and old.k_steps == 10
    assert expect_one_deprecation(lambda: old(x, model)).shape == ()
    assert expect_one_deprecation(lambda: old(model, x)).shape == ()
    positional = expect_one_deprecation(lambda: ContrastiveDivergence(cd.sampler, k=1, batch_size=8))
    assert positional.k_steps == 1 and positional.n_negatives == 8
    new = ContrastiveDivergence(model=model, sampler=cd.sampler, k_steps=10, persistent=True, buffer_size=1024)
    loss, negative_samples = new(x)
    assert negative_samples.shape == x.shape


def test_score_matching_spec_call_forms():
    model = random_gaussian()
    x = torch.randn(8, 3, dtype=torch.float64)
    for loss_fn in [ScoreMatching(model=model, device='cpu'),
                    ScoreMatching(model=model, hessian_method='hutchinson', hutchinson_samples=5, device='cpu'),
                    SlicedScoreMatching(model=model, n_projections=5), DenoisingScoreMatching(model=model, sigma=0.1)]:
        assert loss_fn(x).shape == ()
        assert expect_one_deprecation(lambda: loss_fn(model, x)).shape == ()
    assert expect_one_deprecation(lambda: ScoreMatching(model, hessian_method='approx')).hessian_method == 'hutchinson'
    assert expect_one_deprecation(lambda: DenoisingScoreMatching(model, noise_scale=0.2)).sigma == 0.2


@pytest.mark.parametrize('make', [
    lambda m: ScoreMatching(m, hessian_method='hutchinson'), lambda m: SlicedScoreMatching(m),
    lambda m: DenoisingScoreMatching(m, sigma=[0.1, 1.0]),
    lambda m: NoiseContrastiveEstimation(m, torch.distributions.MultivariateNormal(
        torch.zeros(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64)), noise_ratio=3)])
def test_same_seed_same_loss(make):
    loss_fn = make(random_gaussian())
    x = torch.randn(8, 3, dtype=torch.float64)
    a = loss_fn(x, generator=torch.Generator().manual_seed(0)).item()
    assert a == loss_fn(x, generator=torch.Generator().manual_seed(0)).item()
    assert a != loss_fn(x, generator=torch.Generator().manual_seed(1)).item()


@pytest.mark.parametrize('make', [lambda m: ScoreMatching(m), lambda m: ScoreMatching(m, hessian_method='hutchinson'),
                                  lambda m: SlicedScoreMatching(m, variance_reduction=True)])
def test_score_matching_conditioning(make):
    x = torch.randn(16, 3, dtype=torch.float64)
    y = torch.linspace(0.5, 2.0, 16, dtype=torch.float64)
    want = (0.5 * (y[:, None] * x).pow(2).sum(-1) - 3 * y).mean()
    assert torch.allclose(make(ConditionalQuadratic())(x, y=y), want)
    assert torch.allclose(make(ConditionalQuadratic())(x, model_kwargs={'y': y}), want)


# ---------------------------------------------------------------- bad input

ALL_LOSSES = {
    'SM': lambda m: ScoreMatching(m), 'SSM': lambda m: SlicedScoreMatching(m), 'DSM': lambda m: DenoisingScoreMatching(m),
    'NCE': lambda m: NoiseContrastiveEstimation(m, torch.distributions.MultivariateNormal(
        torch.zeros(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64))),
    'CD': lambda m: ContrastiveDivergence(m, LangevinDynamics(step_size=0.01), k_steps=2),
    'PCD': lambda m: PersistentContrastiveDivergence(m, LangevinDynamics(step_size=0.01), k_steps=2, buffer_size=50),
}


@pytest.mark.parametrize('name', list(ALL_LOSSES))
def test_bad_batches_are_clear_errors(name):
    loss_fn = ALL_LOSSES[name](random_gaussian())
    with pytest.raises(ValueError, match='event shape'): loss_fn(torch.zeros(4, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r'\[batch, \*dim\]'): loss_fn(torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match='dtype'): loss_fn(torch.zeros(4, 3))
    with pytest.raises(ValueError, match='NaN'): loss_fn(torch.full((4, 3), float('nan'), dtype=torch.float64))
    with pytest.raises(TypeError): loss_fn([[0.0, 0.0, 0.0]])


def test_bad_options_are_clear_errors():
    model = random_gaussian()
    sampler = LangevinDynamics(model=model, step_size=0.1)
    with pytest.raises(ValueError, match='hessian_method'): ScoreMatching(model, hessian_method='fd')
    with pytest.raises(ValueError, match='probe'): ScoreMatching(model, hessian_method='hutchinson', probe='uniform')
    with pytest.raises(ValueError, match='projection_type'): SlicedScoreMatching(model, projection_type='uniform')
    with pytest.raises(ValueError, match='n_projections'): SlicedScoreMatching(model, n_projections=0)
    with pytest.raises(ValueError, match='sigma'): DenoisingScoreMatching(model, sigma=0.0)
    with pytest.raises(ValueError, match='k_steps'): ContrastiveDivergence(model, sampler, k_steps=0)
    with pytest.raises(ValueError, match='buffer_size'): ContrastiveDivergence(model, sampler, buffer_size=0)
    with pytest.raises(ValueError, match='reinit_prob'): ContrastiveDivergence(model, sampler, reinit_prob=-0.1)
    with pytest.raises(ValueError, match='energy_reg'): ContrastiveDivergence(model, sampler, energy_reg=-1.0)
    with pytest.raises(TypeError, match='sampler='): ContrastiveDivergence(model)
    with pytest.raises(ValueError, match='noise_ratio'): NoiseContrastiveEstimation(model, torch.distributions.Normal(0., 1.), noise_ratio=0)
    with pytest.raises(ValueError, match='shape \\[batch\\]'):
        ContrastiveDivergence(lambda x: x, LangevinDynamics(step_size=0.1), k_steps=1)(torch.zeros(4, 2))


def test_non_finite_loss_is_raised_not_replaced():
    class Wall(BaseModel):
        def forward(self, x): return x.sum(-1) + torch.where(x[:, 0] > 100, float('inf'), 0.0)
    with pytest.raises(ValueError, match='diverged'):
        ContrastiveDivergence(Wall(), LangevinDynamics(step_size=0.01), k_steps=1)(torch.full((4, 2), 1000.0))
    with pytest.raises(ValueError, match='diverged'):
        DenoisingScoreMatching(lambda x: torch.full((x.shape[0],), float('nan')) * x.sum(-1))(torch.zeros(4, 2))


# ---------------------------------------------------------------- dtype and device

@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_losses_keep_the_model_dtype(dtype):
    model = LearnableGaussian(3, dtype=dtype)
    x = torch.randn(8, 3, dtype=dtype)
    for make in ALL_LOSSES.values():
        if make is ALL_LOSSES['NCE']:
            loss_fn = NoiseContrastiveEstimation(model, torch.distributions.MultivariateNormal(
                torch.zeros(3, dtype=dtype), torch.eye(3, dtype=dtype)))
        else:
            loss_fn = make(model)
        out = loss_fn(x)
        assert (out[0] if isinstance(out, tuple) else out).dtype == dtype


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_losses_run_on_cuda():
    model = LearnableGaussian(3).cuda()
    x = torch.randn(64, 3, dtype=torch.float64, device='cuda')
    g = torch.Generator(device='cuda').manual_seed(0)
    for make in ['SM', 'SSM', 'DSM', 'CD', 'PCD']:
        out = ALL_LOSSES[make](model).cuda()(x, generator=g)
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()
        assert loss.device.type == 'cuda'
    noise = torch.distributions.MultivariateNormal(torch.zeros(3, dtype=torch.float64, device='cuda'),
                                                   torch.eye(3, dtype=torch.float64, device='cuda'))
    NoiseContrastiveEstimation(model, noise)(x, generator=g).backward()
    pcd = ALL_LOSSES['PCD'](LearnableGaussian(3))
    pcd(torch.randn(8, 3, dtype=torch.float64))
    pcd.cuda()
    assert pcd.replay_buffer.is_cuda
    pcd(x[:8], generator=g)


@pytest.mark.slow
def test_cd_k_learns_two_moons():
    """CD-10 (chains started at the batch) on standardised two moons, 600 Adam steps: held-out data gets lower
    energy than points away from the moons, and Langevin chains from N(0, I) end on the moons. An untrained network
    scores about 0.4 and leaves the chains about 2 away."""
    from torchebm.datasets import TwoMoonsDataset
    from torchebm.models import MLPEnergy
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    raw = TwoMoonsDataset(4096, noise=0.05, seed=0).get_data()
    data, held_out = ((raw - raw.mean(0)) / raw.std(0)).split(2048)
    model = MLPEnergy(2, (64, 64))
    sampler = LangevinDynamics(model, step_size=0.01)
    cd = ContrastiveDivergence(model, sampler, k_steps=10, energy_reg=0.1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(600):
        loss, _ = cd(data[torch.randint(0, len(data), (256,), generator=g)], generator=g)
        opt.zero_grad(); loss.backward(); opt.step()
    distance = lambda s: torch.cdist(s, data).min(1).values
    box = torch.rand(4000, 2, generator=g) * 6 - 3
    away = box[distance(box) > 0.5]
    with torch.no_grad():
        ranked = (model(held_out)[:, None] < model(away)[None]).float().mean()
    assert ranked > 0.97, ranked
    samples = sampler.sample(x=torch.randn(1000, 2, generator=g), n_steps=500, generator=g)
    assert distance(samples).median() < 0.2 and (distance(samples) < 0.2).float().mean() > 0.5


class ModeRecorder(BaseModel):
    "A quadratic energy that records whether it was in train mode at each call (as dropout or spectral norm would see)."
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.modes = []

    def forward(self, x):
        self.modes.append(self.training)
        return 0.5 * self.w * x.pow(2).sum(-1)


@pytest.mark.parametrize('persistent', [False, True])
def test_cd_chains_run_in_eval_mode_and_the_mode_is_restored(persistent):
    """The sampler inside CD / PCD sees the model in eval mode (no dropout, no spectral-norm power iteration while
    drawing negatives); the loss's own energies are computed in the caller's mode, which is restored afterwards.
    Fails when the chains run in train mode (before: every sampler call saw `training=True`)."""
    model = ModeRecorder()
    sampler = LangevinDynamics(model, step_size=0.1, use_kernels=False)
    cd = ContrastiveDivergence(model, sampler, k_steps=3, persistent=persistent, buffer_size=8)
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    for mode in (True, False):
        model.train(mode); model.modes.clear()
        cd(x, generator=torch.Generator().manual_seed(1))
        assert model.training is mode
        assert model.modes[-1] is mode  # the loss's energies: the caller's mode
        assert len(model.modes) > 1 and not any(model.modes[:-1])  # every sampler call: eval mode
