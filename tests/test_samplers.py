"MCMC samplers against closed forms: Gaussians (2-D and 12-D), ULA's known bias, double wells, adaptation, reproducibility."
import math
import warnings

import pytest
import torch

from torchebm.core.base import BaseModel, BaseScheduler, expect_one_deprecation
from torchebm.core.energies import GaussianModel
from torchebm.samplers import (GradientDescentSampler, HamiltonianMonteCarlo, LangevinDynamics, MCMCSampler,
                               NesterovSampler)
from torchebm.samplers import mcmc

F64 = torch.float64


class Gaussian(BaseModel):
    "E(x) = (x - mean)^T P (x - mean) / 2 with a closed-form gradient."
    def __init__(self, mean, cov):
        super().__init__()
        self.register_buffer('mean', mean)
        self.register_buffer('precision', torch.linalg.inv(cov))

    @property
    def dim(self): return self.mean.shape[0]

    def forward(self, x):
        d = x - self.mean
        return 0.5 * ((d @ self.precision) * d).sum(-1)

    def analytic_gradient(self, x): return (x - self.mean) @ self.precision


class AutogradGaussian(Gaussian):
    "The same energy, differentiated by autograd (counts forward passes)."
    analytic_gradient = BaseModel.analytic_gradient
    forwards = 0

    def forward(self, x):
        AutogradGaussian.forwards += 1
        return super().forward(x)


class DoubleWell(BaseModel):
    def __init__(self, height=2.0): super().__init__(); self.height = height
    def forward(self, x): return self.height * ((x ** 2 - 1) ** 2).sum(-1)


def correlated(d, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=F64)
    cov = a @ a.T / d + 0.3 * torch.eye(d, dtype=F64)
    return torch.randn(d, generator=g, dtype=F64), cov


def assert_moments(samples, mean, cov, n_sigma=5.0):
    "Sample mean and covariance within `n_sigma` Monte Carlo standard errors (independent chains)."
    n = samples.shape[0]
    se_mean = (cov.diagonal() / n).sqrt()
    assert ((samples.mean(0) - mean).abs() < n_sigma * se_mean).all(), (samples.mean(0), mean)
    var = cov.diagonal()
    se_cov = ((var[:, None] * var[None, :] + cov ** 2) / n).sqrt()
    assert ((torch.cov(samples.T) - cov).abs() < n_sigma * se_cov + 1e-12).all()


def run(sampler, x, n_steps, seed, **kw):
    "Sample with a generator seeded apart from the seeds used for starting points (so the streams differ)."
    return sampler.sample(x=x, n_steps=n_steps, generator=torch.Generator().manual_seed(10_000 + seed), **kw)


def start_at_target(mean, cov, n, seed):
    g = torch.Generator().manual_seed(seed + 100)
    return mean + torch.randn(n, mean.shape[0], generator=g, dtype=F64) @ torch.linalg.cholesky(cov).T


# --- exactness against closed forms ------------------------------------------------------------------------

@pytest.mark.parametrize('seed', [0, 1, 2])
@pytest.mark.parametrize('kind', ['mala', 'hmc'])
def test_correlated_2d_gaussian_is_recovered(kind, seed):
    mean, cov = torch.tensor([1.0, -2.0], dtype=F64), torch.tensor([[2.0, 1.2], [1.2, 1.0]], dtype=F64)
    model = Gaussian(mean, cov)
    sampler = (LangevinDynamics(model, step_size=0.3, metropolis=True) if kind == 'mala'
               else HamiltonianMonteCarlo(model, step_size=0.3, n_leapfrog_steps=6))
    x0 = torch.randn(3000, 2, generator=torch.Generator().manual_seed(seed), dtype=F64)
    assert_moments(run(sampler, x0, 150, seed), mean, cov)


@pytest.mark.parametrize('seed', [0, 1])
@pytest.mark.parametrize('kind', ['ula', 'mala', 'hmc'])
def test_correlated_12d_gaussian_is_recovered(kind, seed):
    mean, cov = correlated(12, seed)
    model = Gaussian(mean, cov)
    sampler = {'ula': LangevinDynamics(model, step_size=0.002),
               'mala': LangevinDynamics(model, step_size=0.05, metropolis=True),
               'hmc': HamiltonianMonteCarlo(model, step_size=0.15, n_leapfrog_steps=10)}[kind]
    x0 = start_at_target(mean, cov, 2000, seed)
    samples = run(sampler, x0, 60 if kind != 'hmc' else 20, seed)
    # ULA at this step size is within Monte Carlo error; MALA/HMC are exact
    assert_moments(samples, mean, cov)


@pytest.mark.parametrize('seed', [0, 1])
def test_ula_bias_matches_theory_where_mala_and_hmc_are_exact(seed):
    lam = torch.tensor([0.5, 1.0, 2.0], dtype=F64)
    model = Gaussian(torch.zeros(3, dtype=F64), torch.diag(1 / lam))
    h, n = 0.6, 6000
    x0 = torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=F64) / lam.sqrt()
    ula = run(LangevinDynamics(model, step_size=h), x0, 100, seed).var(0)
    ula_theory = 1 / (lam * (1 - h * lam / 2))
    se = math.sqrt(2 / n) * ula_theory
    assert ((ula - ula_theory).abs() < 4 * se).all()
    assert ((ula - 1 / lam) > 8 * math.sqrt(2 / n) / lam).all()  # visibly biased
    mala = run(LangevinDynamics(model, step_size=h, metropolis=True), x0, 100, seed).var(0)
    hmc = run(HamiltonianMonteCarlo(model, step_size=h, n_leapfrog_steps=3), x0, 40, seed).var(0)
    for var in (mala, hmc):
        assert ((var - 1 / lam).abs() < 4 * math.sqrt(2 / n) / lam).all(), var


def test_noise_scale_tempers_the_target_for_ula_and_mala():
    model = Gaussian(torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64))
    x0 = torch.randn(4000, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * 0.3
    for metropolis, h in ((False, 0.01), (True, 0.2)):
        var = run(LangevinDynamics(model, step_size=h, noise_scale=0.3, metropolis=metropolis), x0, 60, 0).var(0)
        assert ((var - 0.09).abs() < 5 * math.sqrt(2 / 4000) * 0.09 + 0.09 * h / 2).all(), var


@pytest.mark.parametrize('kind', ['ula', 'mala', 'hmc'])
def test_double_well_is_visited_on_both_sides_with_equal_weight(kind):
    model = DoubleWell(height=1.0)
    sampler = {'ula': LangevinDynamics(model, step_size=0.01), 'mala': LangevinDynamics(model, step_size=0.1, metropolis=True),
               'hmc': HamiltonianMonteCarlo(model, step_size=0.2, n_leapfrog_steps=8)}[kind]
    x0 = torch.full((2000, 1), -1.0, dtype=F64)  # every chain starts in the left well
    samples = run(sampler, x0, 400 if kind == 'ula' else 150, 0)
    right = (samples > 0).double().mean().item()
    assert 0.44 < right < 0.56, right
    assert (samples.abs() > 0.4).double().mean() > 0.8


def test_one_chain_crosses_the_barrier_over_time():
    traj = run(LangevinDynamics(DoubleWell(1.0), step_size=0.02), torch.full((1, 1), -1.0, dtype=F64), 4000, 3,
               return_trajectory=True)
    assert (traj > 0.5).any() and (traj < -0.5).any()


# --- acceptance and adaptation -------------------------------------------------------------------------------

def test_acceptance_rates_are_sane():
    mean, cov = correlated(10, 3)
    model = Gaussian(mean, cov)
    x0 = start_at_target(mean, cov, 500, 3)
    rates = {}
    for h in (0.001, 0.05):
        _, d = run(LangevinDynamics(model, step_size=h, metropolis=True), x0, 40, 0, return_diagnostics=True)
        rates[h] = d['acceptance_rate'].mean().item()
    with pytest.warns(RuntimeWarning, match='acceptance below 0.01 over all 40 steps'):  # a step too large strands chains
        _, d = run(LangevinDynamics(model, step_size=1.0, metropolis=True), x0, 40, 0, return_diagnostics=True)
    rates[1.0] = d['acceptance_rate'].mean().item()
    assert rates[0.001] > 0.97 and rates[0.001] > rates[0.05] > rates[1.0] and rates[1.0] < 0.2
    _, d = run(HamiltonianMonteCarlo(model, step_size=0.1, n_leapfrog_steps=5), x0, 30, 0, return_diagnostics=True)
    assert 0.5 < d['acceptance_rate'].mean() <= 1.0
    assert ((d['acceptance_rate'] >= 0) & (d['acceptance_rate'] <= 1)).all()


@pytest.mark.parametrize('per_chain', [False, True])
@pytest.mark.parametrize('kind, target, start', [('mala', 0.57, 1.5), ('hmc', 0.65, 0.02), ('hmc', 0.85, 1.0)])
def test_step_size_adaptation_reaches_its_target(kind, target, start, per_chain):
    mean, cov = correlated(10, 4)
    model = Gaussian(mean, cov)
    x0 = start_at_target(mean, cov, 200, 4)
    kw = dict(adapt_step_size=True, target_accept=target, n_adapt_steps=200, adapt_per_chain=per_chain)
    sampler = (LangevinDynamics(model, step_size=start, metropolis=True, **kw) if kind == 'mala'
               else HamiltonianMonteCarlo(model, step_size=start, n_leapfrog_steps=5, **kw))
    _, d = run(sampler, x0, 300, 1, return_diagnostics=True)
    after = d['acceptance_rate'][200:].mean().item()
    assert abs(after - target) < 0.06, after
    assert sampler.adapted_step_size.shape == ((200,) if per_chain else ())
    assert torch.allclose(d['step_size'][200:], d['step_size'][-1].expand(100))  # frozen after warm-up


def test_diagonal_mass_adaptation_learns_the_scales():
    scales = torch.tensor([0.05, 0.5, 5.0], dtype=F64)
    model = Gaussian(torch.zeros(3, dtype=F64), torch.diag(scales ** 2))
    x0 = torch.randn(400, 3, generator=torch.Generator().manual_seed(0), dtype=F64) * scales
    hmc = HamiltonianMonteCarlo(model, step_size=0.01, n_leapfrog_steps=6, adapt_mass=True, adapt_step_size=True,
                                n_adapt_steps=150)
    samples, d = run(hmc, x0, 180, 2, return_diagnostics=True)
    est = (1 / hmc.adapted_mass.mass).sqrt()
    assert ((est / scales - 1).abs() < 0.1).all(), est
    assert ((samples.std(0) / scales - 1).abs() < 0.12).all()
    assert hmc.adapted_step_size > 0.3  # one step size fits every direction once the mass is right


# --- evaluation counts ---------------------------------------------------------------------------------------

class CountingGaussian(Gaussian):
    evaluations = 0
    def energy_and_gradient(self, x): CountingGaussian.evaluations += 1; return super().energy_and_gradient(x)
    def gradient(self, x, create_graph=False): CountingGaussian.evaluations += 1; return super().gradient(x, create_graph)


@pytest.mark.parametrize('make, n_steps, expected', [
    (lambda m: LangevinDynamics(m, step_size=0.1), 30, 30),
    (lambda m: LangevinDynamics(m, step_size=0.1, metropolis=True), 30, 31),
    (lambda m: LangevinDynamics(m, step_size=0.1, metropolis=True, adapt_step_size=True), 30, 31),
    (lambda m: HamiltonianMonteCarlo(m, step_size=0.1, n_leapfrog_steps=6), 12, 12 * 6 + 1),
    (lambda m: HamiltonianMonteCarlo(m, step_size=0.1, n_leapfrog_steps=1, adapt_mass=True), 40, 41),
    (lambda m: GradientDescentSampler(m, step_size=0.1), 30, 30),
    (lambda m: NesterovSampler(m, step_size=0.1), 30, 30)])
def test_each_point_is_evaluated_once(make, n_steps, expected):
    model = CountingGaussian(torch.zeros(3, dtype=F64), torch.eye(3, dtype=F64))
    CountingGaussian.evaluations = 0
    make(model).sample(x=torch.zeros(8, 3, dtype=F64), n_steps=n_steps)
    assert CountingGaussian.evaluations == expected


def test_autograd_models_take_one_forward_per_evaluation():
    model = AutogradGaussian(torch.zeros(3, dtype=F64), torch.eye(3, dtype=F64))
    AutogradGaussian.forwards = 0
    LangevinDynamics(model, step_size=0.1, metropolis=True).sample(x=torch.zeros(8, 3, dtype=F64), n_steps=20)
    assert AutogradGaussian.forwards == 21
    AutogradGaussian.forwards = 0
    HamiltonianMonteCarlo(model, step_size=0.1, n_leapfrog_steps=4).sample(x=torch.zeros(8, 3, dtype=F64), n_steps=5)
    assert AutogradGaussian.forwards == 21


# --- the sample() contract -----------------------------------------------------------------------------------

ALL = [lambda m: LangevinDynamics(m, step_size=0.05), lambda m: LangevinDynamics(m, step_size=0.05, metropolis=True),
       lambda m: LangevinDynamics(m, step_size=0.05, integrator='heun'),
       lambda m: HamiltonianMonteCarlo(m, step_size=0.1, n_leapfrog_steps=3),
       lambda m: HamiltonianMonteCarlo(m, step_size=0.1, adapt_step_size=True, adapt_mass=True, mass=torch.eye(2, dtype=F64)),
       lambda m: GradientDescentSampler(m, step_size=0.05), lambda m: NesterovSampler(m, step_size=0.05)]


@pytest.mark.parametrize('make', ALL)
def test_same_seed_same_samples_and_float64_end_to_end(make):
    model = Gaussian(torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64))
    x0 = torch.randn(16, 2, dtype=F64)
    a, da = run(make(model), x0, 25, 7, return_trajectory=True, return_diagnostics=True)
    b, db = run(make(model), x0, 25, 7, return_trajectory=True, return_diagnostics=True)
    assert torch.equal(a, b) and all(torch.equal(da[k], db[k]) for k in da)
    assert a.dtype == F64 and all(v.dtype == F64 for v in da.values())
    assert a.shape == (16, 25, 2)


def test_different_seeds_differ_and_generator_drives_the_start():
    model = Gaussian(torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64))
    s = LangevinDynamics(model, step_size=0.1)
    x0 = torch.zeros(4, 2, dtype=F64)
    assert not torch.equal(run(s, x0, 5, 1), run(s, x0, 5, 2))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', DeprecationWarning)
        a = s.sample(n_samples=4, n_steps=3, generator=torch.Generator().manual_seed(0))
        b = s.sample(n_samples=4, n_steps=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.dtype == F64


@pytest.mark.parametrize('make', ALL[:4] + ALL[5:])
def test_thinning_trajectory_and_diagnostics_layout_on_images(make):
    class ImageEnergy(BaseModel):
        def forward(self, x): return 0.5 * (x ** 2).flatten(1).sum(-1)
    x = torch.randn(6, 3, 4, 5)
    traj, diag = make(ImageEnergy()).sample(x=x, n_steps=10, thin=3, return_trajectory=True, return_diagnostics=True)
    assert traj.shape == (6, 3, 3, 4, 5) and traj.dtype == torch.float32
    assert diag['energy'].shape == (3, 6) and diag['mean'].shape == (3, 3, 4, 5) and diag['var'].shape == (3, 3, 4, 5)
    torch.testing.assert_close(diag['mean'], traj.mean(0))
    torch.testing.assert_close(diag['energy'], 0.5 * (traj ** 2).flatten(2).sum(-1).T)
    for key in ('acceptance_rate', 'step_size'):
        if key in diag: assert diag[key].shape == (3,)
    final = make(ImageEnergy()).sample(x=x, n_steps=10, generator=torch.Generator().manual_seed(0))
    assert final.shape == x.shape


def test_final_sample_is_the_last_trajectory_point():
    model = Gaussian(torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64))
    x0 = torch.randn(5, 2, dtype=F64)
    last = run(HamiltonianMonteCarlo(model, step_size=0.2), x0, 9, 4)
    traj = run(HamiltonianMonteCarlo(model, step_size=0.2), x0, 9, 4, return_trajectory=True, thin=3)
    assert torch.equal(last, traj[:, -1])


def test_schedules_are_read_per_step():
    class Halving(BaseScheduler):
        def compute_value(self, step): return self.start_value * 0.5 ** step
    model = Gaussian(torch.zeros(1, dtype=F64), torch.eye(1, dtype=F64))
    _, d = LangevinDynamics(model, step_size=Halving(0.4), noise_scale=Halving(1.0)).sample(
        x=torch.ones(3, 1, dtype=F64), n_steps=4, return_diagnostics=True)
    torch.testing.assert_close(d['step_size'], torch.tensor([0.4, 0.2, 0.1, 0.05], dtype=F64))
    # noise-free in the limit: the schedule of the noise scale is applied too
    s = LangevinDynamics(model, step_size=0.1, noise_scale=Halving(1e-30))
    torch.testing.assert_close(s.sample(x=torch.ones(2, 1, dtype=F64), n_steps=1), torch.full((2, 1), 0.9, dtype=F64))


def test_progress_bar_does_not_change_the_result(capsys):
    model = Gaussian(torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64))
    x0 = torch.zeros(4, 2, dtype=F64)
    a = run(LangevinDynamics(model, step_size=0.1), x0, 20, 0, progress=True)
    b = run(LangevinDynamics(model, step_size=0.1), x0, 20, 0)
    assert torch.equal(a, b)


def test_mcmc_loop_has_no_host_sync_per_step(monkeypatch):
    "Device-to-host reads happen only every `check_every` steps (the NaN guard), never per step."
    calls = []
    original = mcmc.check_chains_finite
    monkeypatch.setattr(mcmc, 'check_chains_finite', lambda *a, **k: (calls.append(a[1:3]), original(*a, **k)))
    model = Gaussian(torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64))
    LangevinDynamics(model, step_size=0.1, metropolis=True).sample(x=torch.zeros(4, 2, dtype=F64), n_steps=250)
    assert calls == [(1, 100), (101, 200), (201, 250)]


# --- older forms from the spec ------------------------------------------------------------------------------

def test_older_forms_warn_once_and_work():
    model = Gaussian(torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64))
    s = expect_one_deprecation(lambda: LangevinDynamics(energy_function=model, step_size=0.1, noise_scale=1.0))
    assert s.model is model
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        s = LangevinDynamics(energy_function=model, step_size=10.0, noise_scale=0.1, n_steps=60)
    assert len(w) == 1 and 'energy_function' in str(w[0].message) and 'n_steps' in str(w[0].message)
    assert s.resolve_n_steps(None) == 60 and s.resolve_n_steps(5) == 5
    out = expect_one_deprecation(lambda: s.sample(dim=2, n_samples=100, n_steps=3))
    assert out.shape == (100, 2)
    out = expect_one_deprecation(lambda: HamiltonianMonteCarlo(model).sample(n_samples=10))
    assert out.shape == (10, 2)
    last, traj = expect_one_deprecation(
        lambda: LangevinDynamics(model, step_size=0.01).sample_chain(dim=2, n_steps=7, n_samples=5, return_trajectory=True))
    assert traj.shape == (8, 5, 2) and torch.equal(last, traj[-1])
    assert expect_one_deprecation(lambda: GradientDescentSampler(model).sample_chain(dim=2, n_steps=3, n_samples=4)).shape == (4, 2)
    assert expect_one_deprecation(lambda: s.energy_function) is model
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        LangevinDynamics(model=model, step_size=0.1).sample(x=torch.zeros(3, 2, dtype=F64), n_steps=2)
        LangevinDynamics(model, 0.1, 1.0).to('cpu').sample(x=torch.zeros(3, 2, dtype=F64), dim=2, n_steps=2)


def test_every_sampler_is_an_mcmc_sampler_with_explicit_keyword_arguments():
    import inspect
    for cls in (LangevinDynamics, HamiltonianMonteCarlo, GradientDescentSampler, NesterovSampler):
        assert issubclass(cls, MCMCSampler)
        params = inspect.signature(cls).parameters
        assert not any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in params.values())
        assert {'model', 'step_size', 'n_steps', 'dtype', 'device', 'energy_function'} <= set(params)


# --- spec examples (need the analytic energies and schedulers of torchebm.core) -----------------------------

def test_spec_examples_run_unchanged():
    core = pytest.importorskip('torchebm.core.energies')
    from torchebm.core import GaussianModel, DoubleWellModel, GaussianEnergy
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    model = GaussianModel(mean=torch.zeros(2), cov=torch.eye(2), device=device)
    sampler = LangevinDynamics(model=model, step_size=0.01, device=device)
    samples = sampler.sample(x=torch.randn(500, 2, device=device), n_steps=100)
    assert samples.shape == (500, 2)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', DeprecationWarning)
        energy_fn = GaussianEnergy(mean=torch.zeros(2), cov=torch.eye(2))
        sampler = LangevinDynamics(energy_function=energy_fn, step_size=0.1, noise_scale=1.0).to(device)
        assert sampler.sample(dim=2, n_samples=1000, n_steps=100).shape == (1000, 2)
        assert LangevinDynamics(energy_function=energy_fn, step_size=0.01).sample_chain(
            dim=2, n_steps=1000, n_samples=100).shape == (100, 2)
        assert sampler.sample(n_samples=1000).shape == (1000, 2)
    hmc = HamiltonianMonteCarlo(model=DoubleWellModel(), step_size=0.1, n_leapfrog_steps=10, device=device)
    assert hmc.sample(x=torch.randn(100, 2, device=device), n_steps=500, return_trajectory=False).shape == (100, 2)


def test_spec_scheduler_examples_run_unchanged():
    pytest.importorskip('torchebm.core.schedulers')
    from torchebm.core import CosineScheduler, DoubleWellModel, LinearScheduler, WarmupScheduler
    model = DoubleWellModel(barrier_height=5.0)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', DeprecationWarning)  # the spec's older LinearScheduler spelling
        scheduler = WarmupScheduler(main_scheduler=LinearScheduler(initial_value=0.05, final_value=0.03, total_steps=100),
                                    warmup_steps=10, warmup_init_factor=0.01)
    sampler = LangevinDynamics(model=model, step_size=scheduler)
    trajectory = sampler.sample(x=torch.tensor([[-2.0, 0.0]], dtype=torch.float32), dim=2, n_steps=1000,
                                return_trajectory=True)
    assert trajectory.shape == (1, 1000, 2)
    class MLPModel(BaseModel):
        def __init__(self, input_dim, hidden_dim=64):
            super().__init__()
            self.network = torch.nn.Sequential(torch.nn.Linear(input_dim, hidden_dim), torch.nn.SELU(),
                                               torch.nn.Linear(hidden_dim, hidden_dim), torch.nn.SELU(),
                                               torch.nn.Linear(hidden_dim, 1))
        def forward(self, x): return self.network(x).squeeze(-1)
    dynamic = LangevinDynamics(model=MLPModel(input_dim=2, hidden_dim=32),
                               step_size=CosineScheduler(start_value=3e-2, end_value=5e-3, n_steps=100),
                               noise_scale=CosineScheduler(start_value=3e-1, end_value=1e-2, n_steps=100))
    assert dynamic.sample(x=torch.randn(100, 2), n_steps=200).shape == (100, 2)


# --- fused kernels -------------------------------------------------------------------------------------------

def _kernels_or_skip(model, x):
    kernels = mcmc.fused_kernels()
    if kernels is None or not kernels.fused_langevin_supported(model, x):
        pytest.skip('fused kernels unavailable for this model/device')
    return kernels


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['ula', 'mala', 'hmc'])
def test_fused_path_is_used_and_agrees_with_the_reference(kind, monkeypatch):
    pytest.importorskip('torchebm.core.energies')
    from torchebm.core import GaussianModel
    mean, cov = torch.tensor([0.5, -1.0], dtype=F64), torch.tensor([[1.0, 0.6], [0.6, 2.0]], dtype=F64)
    model = GaussianModel(mean=mean, cov=cov).double()
    x0 = start_at_target(mean, cov, 4000, 0)
    kernels = _kernels_or_skip(model, x0)
    make = {'ula': lambda k: LangevinDynamics(model, step_size=0.01, use_kernels=k),
            'mala': lambda k: LangevinDynamics(model, step_size=0.3, metropolis=True, use_kernels=k),
            'hmc': lambda k: HamiltonianMonteCarlo(model, step_size=0.2, n_leapfrog_steps=5, use_kernels=k)}[kind]
    used = []
    name = 'fused_hmc' if kind == 'hmc' else 'langevin_kernel'  # the entry the samplers call
    original = getattr(kernels, name)
    monkeypatch.setattr(kernels, name, lambda *a, **k: (used.append(1), original(*a, **k))[1])
    fused, d_fused = run(make(True), x0, 60, 1, return_diagnostics=True)
    assert used == [1]
    reference, d_ref = run(make(False), x0, 60, 1, return_diagnostics=True)
    assert used == [1]
    assert set(d_fused) == set(d_ref)
    assert_moments(fused, mean, cov)
    assert_moments(reference, mean, cov)


@pytest.mark.parametrize('kind', ['mala', 'hmc'])
def test_fused_runs_warn_about_stuck_chains_and_healthy_ones_do_not(kind, monkeypatch):
    """The fused kernels report no per-chain acceptance; a Metropolis chain that never left its start accepted
    nothing, and the warning names it (it used to say nothing at acceptance 0.00)."""
    pytest.importorskip('torchebm.core.energies')
    from torchebm.core import GaussianModel
    model = GaussianModel(mean=torch.zeros(2, dtype=F64), cov=torch.eye(2, dtype=F64)).double()
    x0 = torch.randn(50, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    kernels = _kernels_or_skip(model, x0)
    name = 'fused_hmc' if kind == 'hmc' else 'langevin_kernel'  # the entry the samplers call
    used, original = [], getattr(kernels, name)
    monkeypatch.setattr(kernels, name, lambda *a, **k: (used.append(1), original(*a, **k))[1])
    make = {'mala': lambda h: LangevinDynamics(model, step_size=h, metropolis=True),
            'hmc': lambda h: HamiltonianMonteCarlo(model, step_size=h, n_leapfrog_steps=5)}[kind]
    with pytest.warns(RuntimeWarning, match=r'50 of 50 chains \(chains \[0, 1, 2.*no accepted proposal in 50 steps'):
        run(make(50.0), x0, 50, 0)
    with warnings.catch_warnings():
        warnings.simplefilter('error', RuntimeWarning)
        run(make(0.3), x0, 50, 0)
    assert used == [1, 1]


# --- warnings that name chains -------------------------------------------------------------------------------

def _stuck_mala(d=50):
    "MALA at step 1.8 on a 50-D standard Gaussian: acceptance below 1e-5 on every chain, and no divergences."
    return LangevinDynamics(Gaussian(torch.zeros(d, dtype=F64), torch.eye(d, dtype=F64)), step_size=1.8, metropolis=True)


def test_collapse_is_warned_about_in_runs_shorter_than_the_window():
    "CD-k runs 20 steps: the 100-step window never filled, so acceptance ~1e-35 passed silently."
    sampler, x0 = _stuck_mala(), torch.randn(40, 50, generator=torch.Generator().manual_seed(0), dtype=F64)
    with pytest.warns(RuntimeWarning, match=r'40 of 40 chains .*acceptance below 0.01 over all 20 steps') as record:
        result = run(sampler, x0, 20, 0, return_result=True)
    assert len(record) == 1 and (result.accept_rate < 1e-5).all() and (result.n_divergent == 0).all()
    with warnings.catch_warnings():
        warnings.simplefilter('error', RuntimeWarning)
        run(_stuck_mala(), x0, mcmc.MIN_WINDOW - 1, 0)  # too few steps to tell


def test_a_persisting_problem_is_warned_about_once_per_sampler_until_it_clears():
    """A training loop calls the sampler every step; Python's own de-duplication keys on the message, which names
    different chains each time, so without this every call would warn again."""
    from torchebm.losses import ContrastiveDivergence
    sampler, g = _stuck_mala(), torch.Generator().manual_seed(0)
    model = Gaussian(torch.zeros(50, dtype=F64), torch.eye(50, dtype=F64))
    cd = ContrastiveDivergence(model, sampler, k_steps=20)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter('always')
        for _ in range(4): cd(torch.randn(16, 50, generator=g, dtype=F64), generator=g)
        assert [str(w.message).count('not warned again') for w in record] == [1]
        wide = Gaussian(torch.zeros(50, dtype=F64), 100 * torch.eye(50, dtype=F64))
        sampler.sample(x=torch.randn(16, 50, generator=g, dtype=F64), n_steps=20, model=wide, generator=g)  # healthy
        assert len(record) == 1
        cd(torch.randn(16, 50, generator=g, dtype=F64), generator=g)
    assert len(record) == 2 and 'acceptance below 0.01' in str(record[1].message)


class Repelling(BaseModel):
    "E(x) = -|x|^2: Langevin runs away exponentially, finite for a long time."
    def forward(self, x): return -(x ** 2).sum(-1)


def test_energies_that_explode_while_finite_are_warned_about():
    "Noise-free ULA on -|x|^2 from 0 stays at 0; the other chains grow 1.2-fold a step and are named."
    x0 = torch.randn(10, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    x0[0] = 0.0
    sampler = LangevinDynamics(Repelling(), step_size=0.1, noise_scale=0.0)
    with pytest.warns(RuntimeWarning) as record:
        out = run(sampler, x0, 100, 0)
    assert torch.isfinite(out).all() and (out[0] == 0).all()
    messages = [str(w.message) for w in record]
    assert len(messages) == 1 and '9 of 10 chains (chains [1, 2, 3, 4, 5, 6, 7, 8, 9])' in messages[0], messages
    assert 'running away' in messages[0]


@pytest.mark.parametrize('kind', ['mala', 'hmc'])
def test_step_size_jitter_changes_draws_after_warmup_only(kind):
    """Jitter multiplies each chain's step size by U(1 - j, 1 + j) after warm-up: the warm-up (draws and adapted step
    size) is the same as without it, the draws after it are not."""
    mean, cov = torch.tensor([0.5, -1.0], dtype=F64), torch.tensor([[1.0, 0.6], [0.6, 2.0]], dtype=F64)
    make = {'mala': lambda j: LangevinDynamics(Gaussian(mean, cov), step_size=0.3, metropolis=True, jitter=j,
                                               adapt_step_size=True, n_adapt_steps=20),
            'hmc': lambda j: HamiltonianMonteCarlo(Gaussian(mean, cov), step_size=0.2, n_leapfrog_steps=5, jitter=j,
                                                   adapt_step_size=True, n_adapt_steps=20)}[kind]
    x0 = start_at_target(mean, cov, 30, 0)
    plain, jittered = (run(make(j), x0, 40, 0, return_trajectory=True, return_result=True) for j in (0.0, 0.5))
    assert torch.equal(plain.warmup, jittered.warmup)
    assert torch.equal(plain.adapted.step_size, jittered.adapted.step_size)
    assert not torch.equal(plain.samples[:, 0], jittered.samples[:, 0])


@pytest.mark.parametrize('kind', ['mala', 'hmc'])
def test_step_size_jitter_is_applied_on_models_with_fused_kernels(kind):
    "Without warm-up every step is jittered, also where the fused kernels (one step size per step) could run."
    pytest.importorskip('torchebm.core.energies')
    from torchebm.core import GaussianModel
    model = GaussianModel(mean=torch.zeros(2, dtype=F64), cov=torch.eye(2, dtype=F64)).double()
    make = {'mala': lambda j: LangevinDynamics(model, step_size=0.3, metropolis=True, jitter=j),
            'hmc': lambda j: HamiltonianMonteCarlo(model, step_size=0.2, n_leapfrog_steps=5, jitter=j)}[kind]
    x0 = torch.randn(30, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    _, diagnostics = run(make(0.5), x0, 10, 0, return_diagnostics=True)
    steps = diagnostics['step_size']
    assert ((steps - steps.mean()).abs() > 1e-3).any() and ((steps - 0.3).abs() < 0.3 * 0.5 + 1e-12).all(), steps


class RecordsMode(BaseModel):
    "A quadratic energy behind dropout that records the mode it was called in."
    def __init__(self):
        super().__init__()
        self.dropout, self.modes = torch.nn.Dropout(0.5), []

    def forward(self, x):
        self.modes.append((self.training, self.dropout.training))
        return 0.5 * (self.dropout(x) ** 2).sum(-1)


@pytest.mark.parametrize('make', [lambda m: LangevinDynamics(m, step_size=0.1),
                                  lambda m: HamiltonianMonteCarlo(m, step_size=0.1, n_leapfrog_steps=2)])
def test_sampling_runs_the_model_in_eval_mode_and_restores_its_mode(make):
    model = RecordsMode()
    x0 = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    for training in (True, False):
        model.train(training)
        model.dropout.train(True)  # a sub-module in another mode than its parent keeps it too
        model.modes.clear()
        run(make(model), x0, 3, 0)
        assert model.modes and set(model.modes) == {(False, False)}
        assert (model.training, model.dropout.training) == (training, True)


# --- CUDA ----------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
@pytest.mark.parametrize('make', ALL)
def test_samplers_run_on_cuda(make):
    mean, cov = torch.tensor([0.5, -1.0], dtype=F64), torch.tensor([[1.0, 0.6], [0.6, 2.0]], dtype=F64)
    model = Gaussian(mean, cov).cuda()
    x0 = start_at_target(mean, cov, 2000, 0).cuda()
    out, diag = make(model).sample(x=x0, n_steps=30, return_diagnostics=True,
                                   generator=torch.Generator('cuda').manual_seed(0))
    assert out.is_cuda and all(v.is_cuda for v in diag.values()) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match='device'):
        make(model).sample(x=x0.cpu(), n_steps=1)


def test_adapted_values_are_a_record_not_state():
    """What the last warm-up adapted can be read off the sampler, but it is not a sub-module: `state_dict` keeps its
    keys after an adaptive run, so a fresh sampler loads it."""
    model = Gaussian(torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64))
    make = lambda: HamiltonianMonteCarlo(model, step_size=0.1, adapt_step_size=True, adapt_mass=True, n_adapt_steps=30)
    sampler, keys = make(), set(make().state_dict())
    result = sampler.sample(x=torch.zeros(4, 2, dtype=F64), n_steps=40, return_result=True,
                            generator=torch.Generator().manual_seed(0))
    assert set(sampler.state_dict()) == keys
    make().load_state_dict(sampler.state_dict())
    assert sampler.adapted_step_size is result.adapted.step_size and sampler.adapted_mass is result.adapted.metric


def test_a_step_size_scheduler_is_followed_when_only_the_metric_adapts():
    "With `adapt_mass=True, adapt_step_size=False` the step size keeps following its scheduler, in warm-up and after."
    from torchebm.core import LinearScheduler
    model = Gaussian(torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64))
    sampler = HamiltonianMonteCarlo(model, step_size=LinearScheduler(start_value=0.1, end_value=0.3, n_steps=20),
                                    adapt_step_size=False, adapt_mass=True, n_adapt_steps=10)
    _, diag = sampler.sample(x=torch.zeros(4, 2, dtype=F64), n_steps=20, return_trajectory=True,
                             return_diagnostics=True, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(diag['step_size'].reshape(20, -1)[:, 0], torch.linspace(0.1, 0.29, 20, dtype=F64))


class ModeSpy(torch.nn.Module):
    "N(0, I) on 2 coordinates that records the `training` flag of every call (dropout or batch norm would change with it)."
    def __init__(self):
        super().__init__()
        self.dim, self.modes, self.layer = 2, set(), torch.nn.Linear(2, 1)
    def forward(self, x):
        self.modes.add(self.training)
        return 0.5 * (x ** 2).sum(-1) + 0.0 * self.layer(x).squeeze(-1)


def tempering_samplers():
    from torchebm.diagnostics import annealed_importance_sampling
    from torchebm.samplers.smc import SequentialMonteCarlo
    from torchebm.samplers.tempering import ParallelTempering
    g = torch.Generator().manual_seed(0)
    return {'pt': lambda m: ParallelTempering(ModeSpy(), n_temperatures=3).sample(n_samples=4, n_steps=3, n_warmup=2, generator=g, model=m),
            'smc': lambda m: SequentialMonteCarlo(ModeSpy()).sample(n_samples=16, generator=g, model=m),
            'ais': lambda m: annealed_importance_sampling(m, n_chains=16, n_temperatures=5, generator=g)}


@pytest.mark.parametrize('name', ['pt', 'smc', 'ais'])
def test_tempered_samplers_run_the_model_in_eval_mode(name):
    "Parallel tempering, SMC and AIS see the model in eval mode, as the MCMC samplers do, and restore its mode; PT and SMC take `model=` per run."
    model = ModeSpy().train()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', RuntimeWarning)  # runs this short may warn about their swaps or weights
        tempering_samplers()[name](model)
    assert model.modes == {False} and model.training


def test_run_chain_records_the_steps_asked_for():
    "`record_at` (SG-MCMC's burn-in, thinning and cyclical phases) records after exactly those steps; bad steps raise."
    state = mcmc.ChainState(torch.zeros(2, 1, dtype=F64))
    count = lambda state, i: (mcmc.ChainState(state.x + 1), {})
    _, trajectory, _ = mcmc.run_chain(count, state, 10, return_trajectory=True, record_at=[0, 3, 4, 9])
    assert trajectory[0, :, 0].tolist() == [1.0, 4.0, 5.0, 10.0]
    for bad in ([3, 3], [10], [-1]):
        with pytest.raises(ValueError, match='record_at must hold distinct steps'):
            mcmc.run_chain(count, state, 10, return_trajectory=True, record_at=bad)


@pytest.mark.parametrize('make', [lambda m: HamiltonianMonteCarlo(m, step_size=0.3, use_kernels=False),
                                  lambda m: LangevinDynamics(m, step_size=0.1, metropolis=True, use_kernels=False)])
def test_progress_bar_and_result_form_do_not_change_the_draws_of_the_reference_loop(make):
    "With one seed the reference loop gives the same draws with or without a progress bar or a SamplingResult."
    model, x = GaussianModel(torch.zeros(2), torch.eye(2)), torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    sampler, seeded = make(model), lambda: torch.Generator().manual_seed(1)
    plain = sampler.sample(x, n_steps=20, generator=seeded())
    assert torch.equal(plain, sampler.sample(x, n_steps=20, generator=seeded(), progress=True))
    assert torch.equal(plain, sampler.sample(x, n_steps=20, generator=seeded(), return_result=True).samples)
    assert not torch.equal(plain, sampler.sample(x, n_steps=20, generator=torch.Generator().manual_seed(2)))
