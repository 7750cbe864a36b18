"""Fused sampling kernels (torchebm.cuda): energies, noise, reproducibility, agreement in distribution with the
transitions (torchebm.samplers.transitions), diagnostics, and every fallback path (no compiler, broken compiler, disabled, stale lock,
cache hit in a second process)."""
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip('torchebm.core.energies', reason='the analytic energies (torchebm.core.energies) have not landed')
from torchebm.core.energies import (AckleyModel, DoubleWellModel, GaussianModel, HarmonicModel, RastriginModel,
                                    RosenbrockModel)
from torchebm.cuda import loader
from torchebm.cuda.kernels import (CPU_EXTENSION, KINDS, _ENERGIES, analytic_energy, fused_hmc, fused_hmc_supported,
                                   fused_langevin, fused_langevin_supported)
from torchebm.samplers.transitions import HMC, MALA, ULA, HMCParams, LangevinParams

REPO = Path(__file__).resolve().parents[1]
F64 = torch.float64


def transition_chain(move, params, model, x, n_steps, generator):
    "Run a transition `n_steps` times from `x`: the one pure-torch implementation the kernels are checked against."
    state = move.init(model, x)
    for _ in range(n_steps): state, _ = move.step(model, state, params, generator)
    return state.x


@pytest.fixture(scope='module')
def ext():
    loader.enable_kernels()
    module = loader.load_extension(CPU_EXTENSION.name)
    if module is None:
        pytest.fail(f"the CPU extension did not build here: {loader.extension_state(CPU_EXTENSION.name)}")
    return module


def steps(n, value):
    return torch.full((n,), value, dtype=F64)


def gaussian3(dtype=F64):
    mean = torch.tensor([1.0, -1.0, 0.5], dtype=F64)
    cov = torch.tensor([[1.0, 0.4, 0.1], [0.4, 0.8, -0.2], [0.1, -0.2, 0.6]], dtype=F64)
    return GaussianModel(mean=mean.to(dtype), cov=cov.to(dtype)).to(dtype), mean, cov


def model_grad(model, x):
    x = x.clone().requires_grad_(True)
    e = model(x)
    return e.detach(), torch.autograd.grad(e.sum(), x)[0]


def run_python(code, env_extra, timeout=240):
    "Run `code` in a fresh interpreter from the repository root; returns its last stdout line parsed as JSON."
    env = {**os.environ, **env_extra}
    env.pop('PYTHONPATH', None)
    proc = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- the kernels' energies and noise ------------------------------------------------------------------------

@pytest.mark.parametrize('dtype,tol', [(torch.float64, 1e-10), (torch.float32, 2e-4)])
@pytest.mark.parametrize('dim', [1, 2, 5, 17])
def test_energy_and_gradient_match_models(ext, dtype, tol, dim):
    g = torch.Generator().manual_seed(dim)
    a = torch.randn(dim, dim, generator=g, dtype=F64)
    models = [DoubleWellModel(barrier_height=1.3, b=0.7), HarmonicModel(k=0.7),
              GaussianModel(mean=torch.randn(dim, generator=g, dtype=F64), cov=a @ a.T + dim * torch.eye(dim, dtype=F64)),
              RastriginModel(a=4.0), AckleyModel(a=10.0, b=0.5, c=3.0)]
    if dim >= 2: models.append(RosenbrockModel(a=0.5, b=20.0))
    assert {type(m) for m in models} == {cls for cls, entry in _ENERGIES.items() if dim >= entry.min_dim}  # all of them
    x = torch.randn(45, dim, generator=g, dtype=F64) * 1.3
    for model in models:
        model = model.to(F64)
        e_ref, g_ref = model_grad(model, x)
        k = analytic_energy(model, dtype, 'cpu')
        e, grad = ext.energy_and_gradient(x.to(dtype), k.kind, list(k.params), k.mean, k.precision)
        scale = 1 + e_ref.abs().max()
        assert (e.double() - e_ref).abs().max() <= tol * scale, type(model).__name__
        assert (grad.double() - g_ref).abs().max() <= tol * (1 + g_ref.abs().max()), type(model).__name__


def test_the_python_table_and_the_cpp_list_of_energies_agree(ext):
    """TEBM_ENERGIES in tebm_common.h is the one C++ list (codes, dispatch of both devices), `_ENERGIES` the one Python
    table: the compiled extension reports the header's list, every table entry names an energy of it, and every energy
    of it is reachable from a model class, under its position in the list."""
    assert ext.energy_kinds() == KINDS and len(set(KINDS)) == len(KINDS) > 0
    assert sorted(entry.kind for entry in _ENERGIES.values()) == sorted(KINDS)
    g = torch.Generator().manual_seed(0)
    for cls, entry in _ENERGIES.items():
        model = cls(mean=torch.zeros(3), cov=torch.eye(3)) if entry.params is None else cls()
        assert analytic_energy(model, F64, 'cpu').kind == KINDS.index(entry.kind), cls.__name__
        assert fused_langevin_supported(model, torch.zeros(5, 3)), cls.__name__
        x = torch.randn(4, 3, generator=g)
        assert torch.allclose(fused_langevin(model, x, step_sizes=[1e-3], noise_scales=[0.0])[0],
                              x - 1e-3 * model_grad(model, x)[1], atol=1e-5), cls.__name__


def test_ackley_gradient_at_origin_is_zero(ext):
    k = analytic_energy(AckleyModel().double(), F64, 'cpu')
    e, grad = ext.energy_and_gradient(torch.zeros(3, 4, dtype=F64), k.kind, list(k.params), k.mean, k.precision)
    assert torch.allclose(e, torch.zeros(3, dtype=F64), atol=1e-12) and torch.equal(grad, torch.zeros(3, 4, dtype=F64))


def test_kernel_form_is_read_afresh(ext):
    """The kernel form follows every change of the model's parameters: numbers set anew, tensor parameters written
    in place through `.data` (which leaves no version to compare), a NaN."""
    samplers = pytest.importorskip('torchebm.samplers')
    dw = DoubleWellModel(barrier_height=2.0, b=1.0)
    assert analytic_energy(dw, torch.float32, 'cpu').params == (2.0, 1.0)
    dw.b = 1.5
    assert analytic_energy(dw, torch.float32, 'cpu').params == (2.0, 2.25)
    x = torch.randn(30, 2, generator=torch.Generator().manual_seed(0))
    run = lambda model, s=None: (s or samplers.LangevinDynamics(model, step_size=0.01)).sample(
        x=x, n_steps=20, generator=torch.Generator().manual_seed(1))
    sampler = samplers.LangevinDynamics(dw, step_size=0.01)
    assert torch.equal(run(dw, sampler), run(DoubleWellModel(barrier_height=2.0, b=1.5)))
    dw.barrier_height = 3.0  # the same sampler and model, a new energy
    assert torch.equal(run(dw, sampler), run(DoubleWellModel(barrier_height=3.0, b=1.5)))
    dw.b = torch.tensor(0.5)
    assert analytic_energy(dw, F64, 'cpu').params == (3.0, 0.25)
    dw.b.data.fill_(2.0)
    assert analytic_energy(dw, F64, 'cpu').params == (3.0, 4.0)
    gauss = gaussian3()[0]
    gauss.mean.data.add_(1.0)
    assert torch.equal(analytic_energy(gauss, F64, 'cpu').mean, gauss.mean)
    rastrigin = RastriginModel(a=1.0)
    analytic_energy(rastrigin, F64, 'cpu')
    rastrigin.a = float('nan')
    assert math.isnan(analytic_energy(rastrigin, F64, 'cpu').params[0])


def test_all_finite_uses_the_loaded_extension_and_never_builds(ext, monkeypatch):
    import torchebm.cuda.kernels as kernels
    x = torch.randn(7, 3, dtype=F64)
    assert kernels.all_finite(x) is True and kernels.all_finite(x.float()) is True
    for bad in (float('nan'), float('inf'), -float('inf')):
        y = x.clone(); y[6, 2] = bad
        assert kernels.all_finite(y) is False and kernels.all_finite(y.t()) is False  # also non-contiguous
    loader.disable_kernels()
    try: assert kernels.all_finite(x) is None
    finally: loader.enable_kernels()
    monkeypatch.setattr(kernels, '_LOADED', {})  # not loaded yet: no answer, and nothing is built
    monkeypatch.setattr(kernels, 'load_extension', lambda name: pytest.fail('all_finite built the extension'))
    assert kernels.all_finite(x) is None


def test_noise_is_standard_normal(ext):
    z = ext.standard_normal(256, 4000, 11).flatten()
    n = z.numel()
    assert abs(z.mean()) < 4 / math.sqrt(n)
    assert abs(z.var() - 1) < 4 * math.sqrt(2 / n)
    assert abs((z ** 4).mean() - 3) < 4 * math.sqrt(96 / n)
    zs, _ = torch.sort(z)
    cdf = 0.5 * (1 + torch.erf(zs / math.sqrt(2)))
    ks = (cdf - torch.arange(1, n + 1, dtype=F64) / n).abs().max()
    assert ks < 1.95 / math.sqrt(n)  # 0.1% level of the Kolmogorov-Smirnov test
    # chains draw independent streams
    c = torch.corrcoef(ext.standard_normal(64, 2000, 3))
    assert (c - torch.eye(64, dtype=F64)).abs().max() < 0.11


# ---- reproducibility ------------------------------------------------------------------------------------------

def _run_all(x, seed):
    dw, (gauss, _, _) = DoubleWellModel(), gaussian3(x.dtype)
    xg = torch.randn(x.shape[0], 3, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    return [fused_langevin(dw, x, step_sizes=steps(40, 0.01), noise_scales=steps(40, 1.0), seed=seed)[0],
            fused_langevin(gauss, xg, step_sizes=steps(40, 0.1), noise_scales=steps(40, 1.0), metropolis=True,
                           seed=seed)[0],
            fused_hmc(gauss, xg, step_sizes=steps(10, 0.2), n_leapfrog_steps=4, seed=seed)[0]]


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_bit_reproducible_for_any_thread_count(ext, dtype):
    x = torch.randn(203, 2, generator=torch.Generator().manual_seed(0), dtype=dtype)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1); one = _run_all(x, 5)
        torch.set_num_threads(2); two = _run_all(x, 5)
    finally:
        torch.set_num_threads(old)
    again = _run_all(x, 5)
    for a, b, c in zip(one, two, again): assert torch.equal(a, b) and torch.equal(a, c)
    for a, b in zip(one, _run_all(x, 6)): assert not torch.equal(a, b)


def test_a_chain_depends_only_on_seed_and_its_index(ext):
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(0))
    full = fused_langevin(DoubleWellModel(), x, step_sizes=steps(30, 0.01), noise_scales=steps(30, 1.0), seed=9)[0]
    part = fused_langevin(DoubleWellModel(), x[:21], step_sizes=steps(30, 0.01), noise_scales=steps(30, 1.0), seed=9)[0]
    assert torch.equal(full[:21], part)


def test_generator_seed_is_reproducible(ext):
    x = torch.randn(10, 2)
    run = lambda s: fused_langevin(DoubleWellModel(), x, step_sizes=steps(5, .01), noise_scales=steps(5, 1.), seed=s)[0]
    assert torch.equal(run(torch.Generator().manual_seed(3)), run(torch.Generator().manual_seed(3)))


@pytest.mark.parametrize('kind', ['ula', 'hmc'])
def test_a_generator_is_drawn_from_inside_the_call_as_torch_randint(ext, kind):
    "The call's one draw from a CPU generator (given, or torch's global one) is torch.randint(0, 2**62, ())'s number."
    x = torch.randn(10, 2, generator=torch.Generator().manual_seed(0)) * 0.5  # no chain runs away: NaN != NaN
    def run(seed, generator=None):
        return run_entry(ext, kind, x, DoubleWellModel(), seed=seed, generator=generator, record_traj=False,
                         step=0.01)[0]
    g = torch.Generator().manual_seed(11)
    drawn = run(-1, g)
    assert torch.isfinite(drawn).all()
    assert g.initial_seed() == 11 and not torch.equal(g.get_state(), torch.Generator().manual_seed(11).get_state())
    assert torch.equal(drawn, run(int(torch.randint(0, 2 ** 62, (), generator=torch.Generator().manual_seed(11)))))
    torch.manual_seed(12)
    drawn = run(-1)
    torch.manual_seed(12)
    assert torch.equal(drawn, run(int(torch.randint(0, 2 ** 62, ()))))


# ---- exact arithmetic: the deterministic part of the chain ------------------------------------------------------

@pytest.mark.parametrize('model', [DoubleWellModel(barrier_height=1.5, b=0.9), HarmonicModel(k=2.0), gaussian3()[0],
                                   RosenbrockModel(a=1.0, b=5.0), RastriginModel(a=2.0), AckleyModel()],
                         ids=lambda m: type(m).__name__)
def test_noise_free_ula_is_gradient_descent_with_the_schedule(ext, model):
    model = model.to(F64)
    x = torch.randn(33, 3, generator=torch.Generator().manual_seed(2), dtype=F64) * 0.5
    eta = torch.linspace(0.002, 0.01, 25, dtype=F64)
    fused = fused_langevin(model, x, step_sizes=eta, noise_scales=torch.zeros(25, dtype=F64))[0]
    ref = x.clone()
    for h in eta.tolist(): ref = ref - h * model_grad(model, ref)[1]
    assert torch.allclose(fused, ref, rtol=1e-9, atol=1e-10)


# ---- agreement in distribution ---------------------------------------------------------------------------------

def _z(a, b):
    "Largest two-sample z-score between the per-coordinate means and second moments of samples a and b."
    z = 0.0
    for f in (lambda s: s, lambda s: s ** 2):
        fa, fb = f(a.double()), f(b.double())
        se = (fa.var(0) / fa.shape[0] + fb.var(0) / fb.shape[0]).sqrt()
        z = max(z, float(((fa.mean(0) - fb.mean(0)).abs() / se).max()))
    return z


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('seed', [0, 1])
def test_fused_and_transitions_agree_in_distribution(ext, dtype, seed):
    g = torch.Generator().manual_seed(100 + seed)
    gauss, mean, cov = gaussian3(dtype)
    x = torch.randn(1500, 3, generator=g, dtype=dtype)
    n = 100
    pairs = {
        'ula': (fused_langevin(gauss, x, step_sizes=steps(n, .1), noise_scales=steps(n, 1.), seed=seed)[0],
                transition_chain(ULA(), LangevinParams(.1), gauss, x, n, g)),
        'mala': (fused_langevin(gauss, x, step_sizes=steps(n, .2), noise_scales=steps(n, 1.), metropolis=True,
                                seed=seed)[0],
                 transition_chain(MALA(), LangevinParams(.2), gauss, x, n, g)),
        'hmc': (fused_hmc(gauss, x, step_sizes=steps(30, .25), n_leapfrog_steps=5, seed=seed)[0],
                transition_chain(HMC(), HMCParams(.25, 5), gauss, x, 30, g)),
    }
    for name, (fused, ref) in pairs.items():
        assert fused.dtype == dtype
        assert _z(fused, ref) < 4.5, name
    # the exact samplers hit the target itself
    for name in ('mala', 'hmc'):
        s = pairs[name][0].double()
        se = (cov.diagonal() / s.shape[0]).sqrt()
        assert ((s.mean(0) - mean).abs() / se).max() < 4.5, name
        assert (torch.cov(s.T) - cov).abs().max() < 0.12, name


# ---- the kernels take the transitions' steps (torchebm.samplers.transitions), given the same noise ---------------

class _GivenNoise:
    "A unit metric (`MassMatrix(1.0)`) whose momentum draw returns a fixed tensor: feeds the kernel's noise to a transition."
    def __new__(cls, noise):
        from torchebm.integrators import MassMatrix
        class Given(MassMatrix):
            def sample_momentum(self, x, generator=None): return noise.to(x.dtype)
        return Given(1.0)


def _kernel_noise(ext, n, d, seed):
    """The first step's normals of every chain `[n, d]` and, for MALA, log u of its Metropolis test `[n]`.

    Each lane draws its d normals as ceil(d/2) Box-Muller pairs in coordinate order, then one 32-bit word for u. For
    even d that word is the first of the next pair, whose radius gives log u = -(z_d^2 + z_{d+1}^2) / 2 (to ~1e-6)."""
    z = ext.standard_normal(n, d + 2, seed)
    return z[:, :d], -0.5 * (z[:, d] ** 2 + z[:, d + 1] ** 2)


@pytest.mark.parametrize('model', [DoubleWellModel(barrier_height=1.5, b=0.9), gaussian3()[0], RosenbrockModel(),
                                   RastriginModel(a=2.0)], ids=lambda m: type(m).__name__)
@pytest.mark.parametrize('noise_scale', [1.0, 0.6])
def test_ula_step_is_the_transition_given_the_same_noise(ext, model, noise_scale):
    "One kernel ULA step equals `transitions.ULA().step` fed the kernel's own normals (same seed, same stream)."
    model = model.to(F64)
    d = 3 if isinstance(model, GaussianModel) else 4
    n, h, seed = 97, 0.01, 21
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(1), dtype=F64)
    fused = fused_langevin(model, x, step_sizes=steps(1, h), noise_scales=steps(1, noise_scale), seed=seed)[0]
    z = ext.standard_normal(n, d, seed)
    ula = ULA()
    new, _ = ula.step(model, ula.init(model, x), LangevinParams(h, noise_scale, _GivenNoise(z)))
    assert torch.allclose(fused, new.x, rtol=1e-12, atol=1e-12), (fused - new.x).abs().max()
    # a deliberately different step (another seed's noise) is far from it: the comparison can fail
    assert not torch.allclose(fused, ula.step(model, ula.init(model, x), LangevinParams(
        h, noise_scale, _GivenNoise(ext.standard_normal(n, d, seed + 1))))[0].x, atol=1e-6)


@pytest.mark.parametrize('noise_scale', [1.0, 0.7, 1.5])
def test_mala_step_is_the_transition_given_the_same_noise(ext, noise_scale):
    """One kernel MALA step equals `transitions.MALA().step` fed the same normals and the same uniform: the same
    proposal, the same Metropolis ratio (so the same target e^{-E/s^2} for noise scale s), the same decisions."""
    gauss4 = GaussianModel(mean=torch.tensor([1.0, -1.0, 0.5, 0.0], dtype=F64),
                           cov=torch.diag(torch.tensor([1.0, 0.8, 0.6, 1.3], dtype=F64)) + 0.1).to(F64)
    n, h, seed = 4000, 0.6, 5  # a large step: hundreds of proposals are rejected
    x = 1.5 * torch.randn(n, 4, generator=torch.Generator().manual_seed(2), dtype=F64)
    fused = fused_langevin(gauss4, x, step_sizes=steps(1, h), noise_scales=steps(1, noise_scale), metropolis=True,
                           seed=seed)[0]
    z, log_u = _kernel_noise(ext, n, 4, seed)
    mala = MALA()
    proposal = mala.step(gauss4, mala.init(gauss4, x), LangevinParams(h, noise_scale, _GivenNoise(z)))
    log_ratio = -proposal[1].energy_error
    y = x - h * gauss4.gradient(x) + math.sqrt(2 * h) * noise_scale * z  # the proposal both must make
    moved = (fused - x).abs().amax(1) > 0
    assert torch.allclose(fused[moved], y[moved], rtol=1e-12, atol=1e-12)
    clear = (log_u - log_ratio).abs() > 1e-4  # the decision is not decided by rounding
    assert clear.float().mean() > 0.99 and 0.2 < moved.float().mean() < 0.95
    assert torch.equal(moved[clear], (log_u < log_ratio)[clear])


@pytest.mark.parametrize('mass', [1.0, 2.5])
def test_hmc_step_is_the_transition_given_the_same_noise(ext, mass):
    """One kernel HMC step equals the transitions' leapfrog and Metropolis test fed the kernel's momenta and uniform:
    the same end points for the chains that moved, and the same decisions wherever rounding cannot decide them."""
    from torchebm.integrators import MassMatrix
    from torchebm.samplers.transitions import hamiltonian, leapfrog
    gauss4 = GaussianModel(mean=torch.tensor([1.0, -1.0, 0.5, 0.0], dtype=F64),
                           cov=torch.diag(torch.tensor([1.0, 0.8, 0.6, 1.3], dtype=F64)) + 0.1).to(F64)
    n, h, n_leapfrog, seed = 4000, 1.3 * math.sqrt(mass), 4, 9  # a large step for the mass: many proposals are rejected
    x = 1.5 * torch.randn(n, 4, generator=torch.Generator().manual_seed(3), dtype=F64)
    fused = fused_hmc(gauss4, x, step_sizes=steps(1, h), n_leapfrog_steps=n_leapfrog, mass=mass, seed=seed)[0]
    z, log_u = _kernel_noise(ext, n, 4, seed)
    metric, start = MassMatrix(mass), HMC().init(gauss4, x)
    p = math.sqrt(mass) * z
    end, p_end = leapfrog(gauss4, start, p, h, n_leapfrog, metric)
    log_ratio = hamiltonian(start, p, metric) - hamiltonian(end, p_end, metric)
    moved = (fused - x).abs().amax(1) > 0
    assert torch.allclose(fused[moved], end.x[moved], rtol=1e-12, atol=1e-12)
    clear = (log_u - log_ratio).abs() > 1e-4
    assert clear.float().mean() > 0.99 and 0.2 < moved.float().mean() < 0.95
    assert torch.equal(moved[clear], (log_u < log_ratio)[clear])


def test_double_well_agrees_with_transitions_and_quadrature(ext):
    g = torch.Generator().manual_seed(7)
    dw = DoubleWellModel(barrier_height=2.0, b=1.0)
    x = torch.randn(3000, 1, generator=g, dtype=F64)
    fused = fused_langevin(dw, x, step_sizes=steps(300, .01), noise_scales=steps(300, 1.), metropolis=True, seed=1)[0]
    ref = transition_chain(MALA(), LangevinParams(.01), dw, x, 300, g)
    assert _z(fused, ref) < 4.5
    grid = torch.linspace(-3, 3, 20001, dtype=F64)[:, None]
    p = torch.exp(-dw(grid))
    ex2 = float((grid[:, 0] ** 2 * p).sum() / p.sum())
    s2 = fused[:, 0] ** 2
    assert abs(float(s2.mean()) - ex2) < 4.5 * float(s2.std()) / math.sqrt(s2.numel())


def test_mala_with_noise_scale_targets_the_tempered_density(ext):
    "MALA with noise scale s targets e^{-E/s^2}, as `transitions.MALA` does: for this Gaussian, covariance s^2 cov."
    gauss, mean, cov = gaussian3()
    x = torch.randn(3000, 3, generator=torch.Generator().manual_seed(3), dtype=F64)
    s = fused_langevin(gauss, x, step_sizes=steps(1000, .1), noise_scales=steps(1000, 1.5), metropolis=True, seed=4)[0]
    assert (s.mean(0) - mean).abs().max() < 0.12 and (torch.cov(s.T) - 2.25 * cov).abs().max() < 0.2


def test_hmc_scalar_mass(ext):
    gauss, mean, cov = gaussian3()
    x = torch.randn(3000, 3, generator=torch.Generator().manual_seed(5), dtype=F64)
    s = fused_hmc(gauss, x, step_sizes=steps(40, .4), n_leapfrog_steps=5, mass=2.5, seed=6)[0]
    assert (s.mean(0) - mean).abs().max() < 0.08 and (torch.cov(s.T) - cov).abs().max() < 0.1
    assert fused_hmc_supported(gauss, x, mass=torch.tensor(2.5)) and not fused_hmc_supported(gauss, x, mass=-1.0)


# ---- trajectory and diagnostics ---------------------------------------------------------------------------------

@pytest.mark.parametrize('kind', ['ula', 'mala', 'hmc'])
def test_trajectory_and_diagnostics(ext, kind):
    gauss, _, _ = gaussian3(torch.float32)
    x = torch.randn(37, 3, generator=torch.Generator().manual_seed(0))
    eta = torch.linspace(0.05, 0.1, 23, dtype=F64)
    kw = dict(thin=4, return_trajectory=True, return_diagnostics=True, seed=3)
    if kind == 'hmc': out = fused_hmc(gauss, x, step_sizes=eta, n_leapfrog_steps=3, **kw)
    else: out = fused_langevin(gauss, x, step_sizes=eta, noise_scales=torch.ones(23, dtype=F64),
                               metropolis=kind == 'mala', **kw)
    final, traj, diag = out
    assert traj.shape == (37, 5, 3) and traj.dtype == torch.float32
    plain = (fused_hmc(gauss, x, step_sizes=eta, n_leapfrog_steps=3, seed=3) if kind == 'hmc' else
             fused_langevin(gauss, x, step_sizes=eta, noise_scales=torch.ones(23, dtype=F64),
                            metropolis=kind == 'mala', seed=3))
    assert torch.equal(plain[0], final) and plain[1] is None and plain[2] is None  # recording changes nothing
    assert torch.allclose(diag['mean'], traj.mean(0), atol=1e-5)
    assert torch.allclose(diag['var'], traj.var(0), rtol=1e-4, atol=1e-5)
    assert torch.allclose(diag['energy'], torch.stack([gauss(traj[:, k]) for k in range(5)]), rtol=1e-4, atol=1e-4)
    assert torch.allclose(diag['step_size'], eta[3::4][:5].float())
    if kind == 'ula': assert 'acceptance_rate' not in diag
    else:
        assert diag['acceptance_rate'].shape == (5,)
        assert ((diag['acceptance_rate'] >= 0) & (diag['acceptance_rate'] <= 1)).all()


def run_entry(ext, kind, x, model, n_steps=9, thin=2, record_traj=True, record_diag=True, seed=3, screen=(0.0, 0.0),
              step=0.05, generator=None):
    "One raw call of `ext`'s langevin_chain ('ula', 'mala') or hmc_chain ('hmc'): the kernels' 7 outputs."
    k = analytic_energy(model, x.dtype, x.device)
    head = (x, k.kind, list(k.params), k.mean, k.precision, steps(n_steps, step))
    if kind == 'hmc': return ext.hmc_chain(*head, 3, 1.0, thin, record_traj, record_diag, seed, generator)
    return ext.langevin_chain(*head, steps(n_steps, 1.), kind == 'mala', thin, record_traj, record_diag, seed,
                              generator, *screen)


def check_outputs(out, x, n_records, metropolis, record_traj, record_diag):
    "The outputs of tebm_outputs.h: order, dtypes, shapes, devices, and `None` where not asked for."
    n, d = x.shape
    assert len(out) == 7
    final, traj, energy, stats, accepted, block, flags = out
    assert final.shape == x.shape and final.dtype == x.dtype and final.device == x.device
    if record_traj: assert traj.shape == (n, n_records, d) and traj.dtype == x.dtype and traj.device == x.device
    else: assert traj is None
    if record_diag:
        assert block.dtype == torch.int64 and block.device.type == 'cpu' and block.dim() == 0 and int(block) >= 1
        n_blocks = -(-n // int(block))
        assert energy.shape == (n_records, n) and energy.dtype == x.dtype and energy.device == x.device
        assert stats.shape == (n_blocks, n_records, 2, d) and stats.dtype == F64 and stats.device == x.device
        if metropolis: assert accepted.shape == (n_records, n) and accepted.dtype == x.dtype
        else: assert accepted is None
    else: assert energy is None and stats is None and accepted is None and block is None
    assert flags is None or (flags.shape == (n,) and flags.dtype == torch.uint8 and flags.device == x.device)


@pytest.mark.parametrize('kind', ['ula', 'mala', 'hmc'])
@pytest.mark.parametrize('record', [(False, False), (True, False), (False, True), (True, True)])
def test_entry_points_return_the_seven_outputs(ext, kind, record):
    x = torch.randn(37, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    out = run_entry(ext, kind, x, gaussian3()[0], record_traj=record[0], record_diag=record[1])
    check_outputs(out, x, 4, kind != 'ula', *record)
    assert out[6] is None  # not screened


def test_diagnostics_with_one_chain_and_no_recorded_steps(ext):
    x = torch.zeros(1, 2)
    _, traj, diag = fused_langevin(DoubleWellModel(), x, step_sizes=steps(3, .01), noise_scales=steps(3, 1.),
                                   thin=2, return_trajectory=True, return_diagnostics=True, seed=0)
    assert traj.shape == (1, 1, 2) and torch.equal(diag['var'], torch.zeros(1, 2))
    _, traj, diag = fused_langevin(DoubleWellModel(), x, step_sizes=steps(3, .01), noise_scales=steps(3, 1.),
                                   thin=5, return_trajectory=True, return_diagnostics=True, seed=0)
    assert traj.shape == (1, 0, 2) and diag['energy'].shape == (0, 1)


# ---- when the fused path does not apply ---------------------------------------------------------------------------

def test_supported_checks(ext):
    dw = DoubleWellModel()
    assert fused_langevin_supported(dw, torch.zeros(4, 2)) and fused_langevin_supported(dw, torch.zeros(4, 2, dtype=F64))
    assert not fused_langevin_supported(dw, torch.zeros(4, 2, requires_grad=True))
    assert not fused_langevin_supported(dw, torch.zeros(4, 2, dtype=torch.bfloat16))
    assert not fused_langevin_supported(dw, torch.zeros(4, 2, 2))
    assert not fused_langevin_supported(RosenbrockModel(), torch.zeros(4, 1))
    assert not fused_langevin_supported(gaussian3()[0], torch.zeros(4, 2, dtype=F64))

    class Custom(HarmonicModel):
        def forward(self, x): return super().forward(x) + x[:, 0]
    class Renamed(HarmonicModel):  # same formula, e.g. a deprecated alias
        pass
    assert not fused_langevin_supported(Custom(), torch.zeros(4, 2))
    assert fused_langevin_supported(Renamed(), torch.zeros(4, 2))
    with pytest.raises(ValueError, match='no kernel for Custom'):
        fused_langevin(Custom(), torch.zeros(4, 2), step_sizes=[.1], noise_scales=[1.])


def test_bad_arguments(ext):
    dw, x = DoubleWellModel(), torch.zeros(4, 2)
    with pytest.raises(ValueError, match='step_sizes must be finite and > 0; step 0 has nan'):
        fused_langevin(dw, x, step_sizes=[float('nan')], noise_scales=[1.])
    with pytest.raises(ValueError, match=r'noise_scales must have one value per step \(2\)'):
        fused_langevin(dw, x, step_sizes=[.1, .1], noise_scales=[1., 1., 1.])
    with pytest.raises(ValueError, match='noise_scales must be finite and >= 0'):
        fused_langevin(dw, x, step_sizes=[.1], noise_scales=[-1.])
    with pytest.raises(ValueError, match='thin'):
        fused_langevin(dw, x, step_sizes=[.1], noise_scales=[1.], thin=0)
    with pytest.raises(ValueError, match='n_leapfrog_steps'):
        fused_hmc(dw, x, step_sizes=[.1], n_leapfrog_steps=0)
    with pytest.raises(ValueError, match='positive scalar mass'):
        fused_hmc(dw, x, step_sizes=[.1], n_leapfrog_steps=2, mass=torch.ones(2))
    with pytest.raises(TypeError, match='seed must be an int'):
        fused_langevin(dw, x, step_sizes=[.1], noise_scales=[1.], seed='1')


def test_disable_and_enable_in_process(ext):
    dw, x = DoubleWellModel(), torch.zeros(4, 2)
    try:
        loader.disable_kernels()
        assert not fused_langevin_supported(dw, x)
        rows = loader.status(verbose=False)
        assert {r['path'] for r in rows} == {'pure torch'} and all('disable_kernels()' in r['reason'] for r in rows)
        with pytest.raises(ValueError, match='kernels are disabled'):
            fused_langevin(dw, x, step_sizes=[.1], noise_scales=[1.])
    finally:
        loader.enable_kernels()
    assert fused_langevin_supported(dw, x)


def test_status_reports_each_kernel(ext, capsys):
    rows = loader.status()
    printed = capsys.readouterr().out
    cpu = {r['kernel']: r for r in rows if r['device'] == 'cpu'}
    assert set(cpu) == {'langevin', 'mala', 'hmc', 'nuts leaf', 'nuts async'}
    assert all(r['path'] in ('compiled', 'cached') for r in cpu.values())
    assert CPU_EXTENSION.build_name() in cpu['langevin']['extension'] and 'langevin' in printed
    cuda = [r for r in rows if r['device'] == 'cuda']
    assert len(cuda) == 3
    if not torch.cuda.is_available():
        assert all(r['path'] == 'pure torch' and 'unavailable' in r['reason'] for r in cuda)


# ---- fallbacks and caching across processes ---------------------------------------------------------------------

FALLBACK_CHECK = '''
import json, warnings, torch
from torchebm.core.energies import GaussianModel
from torchebm.cuda import loader
from torchebm.cuda.kernels import fused_langevin_supported
from torchebm.samplers import LangevinDynamics
mean = torch.tensor([1.0, -0.5], dtype=torch.float64)
cov = torch.tensor([[1.0, 0.3], [0.3, 0.5]], dtype=torch.float64)
model = GaussianModel(mean=mean, cov=cov).double()
x = torch.randn(1000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    supported = fused_langevin_supported(model, x)
    supported = supported or fused_langevin_supported(model, x)  # asked twice: a failed build is not retried
s = LangevinDynamics(model, step_size=0.2, metropolis=True).sample(x=x, n_steps=120, generator=torch.Generator().manual_seed(1))
rows = loader.status(verbose=False)
print(json.dumps(dict(supported=supported, warnings=[str(w.message) for w in caught],
                      paths=sorted({r['path'] for r in rows if r['device'] == 'cpu'}),
                      reasons=sorted({r['reason'] for r in rows if r['device'] == 'cpu'}),
                      mean_err=float((s.mean(0) - mean).abs().max()), cov_err=float((torch.cov(s.T) - cov).abs().max()))))
'''


def _check_fallback(out, path_reason):
    assert out['supported'] is False
    assert out['paths'] == ['pure torch'] and any(path_reason in r for r in out['reasons']), out['reasons']
    assert out['mean_err'] < 0.15 and out['cov_err'] < 0.15  # still the right distribution (1000 chains)


def test_fallback_without_compiler(tmp_path):
    out = run_python(FALLBACK_CHECK, {'CXX': '/nonexistent/c++', 'TORCHEBM_EXTENSIONS_DIR': str(tmp_path)})
    _check_fallback(out, "'/nonexistent/c++' not found")
    assert out['warnings'] == [] and not any(tmp_path.iterdir())  # nothing attempted


def test_fallback_when_kernels_disabled(tmp_path):
    out = run_python(FALLBACK_CHECK, {'TORCHEBM_DISABLE_KERNELS': '1', 'TORCHEBM_EXTENSIONS_DIR': str(tmp_path)})
    _check_fallback(out, 'TORCHEBM_DISABLE_KERNELS is set')


def test_fallback_when_the_build_fails(tmp_path):
    out = run_python(FALLBACK_CHECK, {'CXX': 'false', 'TORCHEBM_EXTENSIONS_DIR': str(tmp_path)})
    _check_fallback(out, 'build error')
    ours = [w for w in out['warnings'] if 'using pure torch instead' in w]
    assert len(ours) == 1, out['warnings']  # said once, not on every call


CACHE_CHECK = '''
import json
import torch
from torchebm.cuda import loader
from torchebm.cuda.kernels import CPU_EXTENSION
ext = loader.load_extension(CPU_EXTENSION.name)
state = loader.extension_state(CPU_EXTENSION.name)
print(json.dumps(dict(ok=ext is not None, path=state.path, lock=(loader.cache_dir() / CPU_EXTENSION.build_name() / 'lock').exists())))
'''


def test_second_process_loads_from_cache_without_compiling(ext):
    "The library file is loaded as it is: same modification time afterwards (a timing bound would flake on a busy machine)."
    build = loader.cache_dir() / CPU_EXTENSION.build_name()
    libraries = lambda: {p.name: p.stat().st_mtime_ns for p in build.glob('*.so')}
    before = libraries()
    out = run_python(CACHE_CHECK, {'TORCHEBM_EXTENSIONS_DIR': str(loader.cache_dir())})
    assert out['ok'] and out['path'] == 'cached', out
    assert before and libraries() == before, 'the second process rebuilt the extension'


def test_stale_lock_does_not_hang(ext):
    lock = loader.cache_dir() / CPU_EXTENSION.build_name() / 'lock'
    lock.touch()
    old = time.time() - 2 * loader.STALE_LOCK_SECONDS
    os.utime(lock, (old, old))
    try:
        out = run_python(CACHE_CHECK, {'TORCHEBM_EXTENSIONS_DIR': str(loader.cache_dir())}, timeout=120)
    finally:
        lock.unlink(missing_ok=True)
    assert out['ok'] and out['path'] == 'cached' and not out['lock'], out


HEADER_PROBE = '''
import json
from pathlib import Path
from torchebm.cuda import loader
spec = loader.register_extension(loader.ExtensionSpec(
    name='header_probe', cpp_sources=['#include "outer.h"\\nint64_t value() { return VALUE; }'], functions=['value'],
    kernels=['value'], headers=[Path(FOLDER) / 'outer.h'], extra_cflags=('-O0',), extra_ldflags=()))
ext = loader.load_extension('header_probe')
print(json.dumps(dict(value=ext.value(), path=loader.extension_state('header_probe').path, name=spec.build_name())))
'''


@pytest.mark.slow
def test_a_header_edit_never_loads_the_stale_build(tmp_path):
    """Processes sharing one cache: after an edit of a header that `headers` does not list (another header includes
    it), the next process builds anew and sees the new value; with nothing changed, one more loads that build."""
    src = tmp_path / 'src'
    src.mkdir()
    (src / 'outer.h').write_text('#pragma once\n#include "inner.h"\n')
    env = {'TORCHEBM_EXTENSIONS_DIR': str(tmp_path / 'cache')}
    code = HEADER_PROBE.replace('FOLDER', repr(str(src)))
    runs = []
    for value in (1, 2, 2):
        (src / 'inner.h').write_text(f'#define VALUE {value}\n')
        runs.append(run_python(code, env, timeout=600))
    assert [r['value'] for r in runs] == [1, 2, 2], runs
    assert [r['path'] for r in runs] == ['compiled', 'compiled', 'cached'], runs
    assert runs[0]['name'] != runs[1]['name'] == runs[2]['name']


def test_samplers_pick_the_fused_path_and_agree_with_the_reference_path(ext):
    samplers = pytest.importorskip('torchebm.samplers')
    gauss, mean, cov = gaussian3()
    x = torch.randn(2000, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    fused = samplers.LangevinDynamics(gauss, step_size=0.2, metropolis=True).sample(
        x=x, n_steps=150, generator=torch.Generator().manual_seed(1))
    ref = samplers.LangevinDynamics(gauss, step_size=0.2, metropolis=True, use_kernels=False).sample(
        x=x, n_steps=150, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(fused, ref)  # different random streams: the fused path really ran
    assert _z(fused, ref) < 4.5
    for metropolis in (False, True):  # the same diagnostics, shapes and dtypes from both paths
        outs = [samplers.LangevinDynamics(gauss, step_size=0.1, metropolis=metropolis, use_kernels=k).sample(
            x=x[:50], n_steps=6, thin=3, return_diagnostics=True, generator=torch.Generator().manual_seed(2))[1]
            for k in (True, False)]
        assert outs[0].keys() == outs[1].keys()
        for key in outs[0]: assert outs[0][key].shape == outs[1][key].shape and outs[0][key].dtype == outs[1][key].dtype


def test_mala_with_a_noise_scale_runs_in_the_kernel_and_agrees_with_the_python_path(ext, monkeypatch):
    "`LangevinDynamics(metropolis=True, noise_scale=s)` hands s != 1 to the kernel; both paths sample e^{-E/s^2}."
    samplers = pytest.importorskip('torchebm.samplers')
    import torchebm.cuda.kernels as kernels
    gauss, mean, cov = gaussian3()
    x = torch.randn(2000, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    used, original = [], kernels.langevin_kernel  # the unchecked entry the samplers call
    monkeypatch.setattr(kernels, 'langevin_kernel', lambda *a, **k: (used.append(1), original(*a, **k))[1])
    run = lambda k: samplers.LangevinDynamics(gauss, step_size=0.1, noise_scale=0.7, metropolis=True,
                                              use_kernels=k).sample(x=x, n_steps=300,
                                                                    generator=torch.Generator().manual_seed(1))
    fused = run(True)
    assert used == [1]
    ref = run(False)
    assert used == [1] and _z(fused, ref) < 4.5
    assert (torch.cov(fused.T) - 0.49 * cov).abs().max() < 0.06  # cov s^2 Sigma, not Sigma



def test_sampler_one_call_path_matches_the_general_path_and_still_reports_problems(ext, monkeypatch):
    """`LangevinDynamics.sample` with constant schedules on the CPU runs one unchecked kernel call that screens the
    chains; a run the screen flags gets the general path's checks. Same numbers as the general fused path, and the
    NaN guard, the runaway-energy check, the stuck-chain check and the start-point check all still fire."""
    import warnings
    samplers = pytest.importorskip('torchebm.samplers')
    from torchebm.core.base import ConstantScheduler
    import torchebm.cuda.kernels as kernels

    class Same(ConstantScheduler):  # not a plain ConstantScheduler: takes the general path, same values
        pass

    dw, gauss = DoubleWellModel(), gaussian3()[0]  # float32, float64
    x = torch.randn(40, 2, generator=torch.Generator().manual_seed(0))
    screened = []
    original = kernels.langevin_kernel
    monkeypatch.setattr(kernels, 'langevin_kernel',
                        lambda *a, **k: (screened.append(k.get('screen') is not None), original(*a, **k))[1])
    for model, y, metropolis, h in ((dw, x, False, 0.01), (DoubleWellModel().double(), x.double(), False, 0.01),
                                    (gauss, x.double().repeat(1, 2)[:, :3], True, 0.3)):
        for kw in (dict(), dict(return_trajectory=True, thin=3), dict(return_diagnostics=True, thin=2)):
            with warnings.catch_warnings():
                warnings.simplefilter('error', RuntimeWarning)
                a = samplers.LangevinDynamics(model, step_size=h, metropolis=metropolis).sample(
                    x=y, n_steps=30, generator=torch.Generator().manual_seed(1), **kw)
                b = samplers.LangevinDynamics(model, step_size=Same(h), metropolis=metropolis).sample(
                    x=y, n_steps=30, generator=torch.Generator().manual_seed(1), **kw)
            for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
                if isinstance(u, dict): assert all(torch.equal(u[k], v[k]) for k in u)
                else: assert torch.equal(u, v)
    assert screened == [True, False] * 9  # the one-call path screens; the general path checks as before
    with pytest.warns(RuntimeWarning, match='NaN or inf appeared in'):
        samplers.LangevinDynamics(dw, step_size=1.0).sample(x=x * 10, n_steps=50)
    with pytest.raises(ValueError, match='NaN or inf appeared in'):
        samplers.LangevinDynamics(dw, step_size=1.0, nan_policy='raise').sample(x=x * 10, n_steps=50)
    with pytest.warns(RuntimeWarning, match='running away'):  # finite but huge energies at the start
        samplers.LangevinDynamics(HarmonicModel(), step_size=0.01).sample(x=x * 1e6, n_steps=20)
    with pytest.warns(RuntimeWarning, match='no accepted proposal in 50 steps'):
        samplers.LangevinDynamics(gauss, step_size=50.0, metropolis=True).sample(x=x.double().repeat(1, 2)[:, :3],
                                                                                 n_steps=50)
    for value in (float('inf'), float('nan')):  # the screen flags the start; the sampler's check then raises
        bad = x.clone(); bad[3, 1] = value
        for metropolis in (False, True):
            with pytest.raises(ValueError, match='x contains NaN or inf'):
                samplers.LangevinDynamics(dw, step_size=0.01, metropolis=metropolis).sample(x=bad, n_steps=5)
    with pytest.raises(ValueError, match=r'step_size must be finite and > 0 at every step, but .* nan at step 0'):
        samplers.LangevinDynamics(dw, step_size=ConstantScheduler(float('nan'))).sample(x=x, n_steps=5)


def test_the_lean_plan_is_rechecked_on_every_run(ext, monkeypatch):
    """After a lean run a `LangevinDynamics` keeps a `LeanPlan`; a later run uses it only while everything it depended
    on is unchanged, and gives the numbers of a sampler that never planned. Copies and pickles leave it out."""
    import copy, io
    samplers = pytest.importorskip('torchebm.samplers')
    from torchebm.core.base import ConstantScheduler
    from torchebm.core.schedulers import LinearScheduler
    from torchebm.samplers.langevin import LeanPlan
    planned, original = [], LeanPlan.run
    monkeypatch.setattr(LeanPlan, 'run', lambda *a: (lambda out: (planned.append(out is not None), out)[1])(original(*a)))
    x = torch.randn(30, 2, generator=torch.Generator().manual_seed(0))
    dw = DoubleWellModel()
    sampler = samplers.LangevinDynamics(dw, step_size=0.01)

    def run(y=x, fresh=None, **kw):  # a run of `sampler`, and the same run of a new sampler (no plan yet)
        planned.clear()
        got = sampler.sample(x=y, n_steps=20, generator=torch.Generator().manual_seed(5), **kw)
        if fresh is None: fresh = samplers.LangevinDynamics(sampler.model, step_size=sampler.schedulers['step_size'],
                                                              noise_scale=sampler.schedulers['noise_scale'],
                                                              use_kernels=sampler.use_kernels)
        want = fresh.sample(x=y, n_steps=20, generator=torch.Generator().manual_seed(5), **kw)
        assert torch.equal(got, want)
        return planned[:1]

    assert run() == [] and isinstance(sampler._lean_plan, LeanPlan)  # the first run plans
    assert run() == [True]
    dw.barrier_height = 3.0; assert run() == [True]  # parameters are read afresh
    assert run(x.double()) == [False] and run(x.double()) == [True]  # another dtype: planned anew
    assert run(x.repeat(1, 2)) == [False] and run(x) == [False] and run(x) == [True]  # another width
    assert run(x.clone().requires_grad_(True)) == [False]
    assert run(x.t().contiguous().t()) == [True]  # not contiguous: the kernel gets a contiguous copy
    sampler.schedulers['step_size'] = ConstantScheduler(0.02); assert run() == [True]  # the registry is read afresh
    sampler.register_scheduler('step_size', LinearScheduler(0.02, 0.01, 10)); assert run() == [False]
    sampler.register_scheduler('step_size', 0.01); run()
    sampler.schedulers['step_size'] = ConstantScheduler(float('nan'))
    with pytest.raises(ValueError, match='step_size must be finite and > 0'): sampler.sample(x=x, n_steps=5)
    sampler.register_scheduler('step_size', 0.01); run()
    try:
        loader.disable_kernels(); assert run() == [False]
    finally:
        loader.enable_kernels()
    sampler.use_kernels = False; assert sampler._lean_plan is None  # setting any attribute drops the plan
    assert run() == []
    sampler.use_kernels = True; run(); assert isinstance(sampler._lean_plan, LeanPlan)
    dw.to(F64); assert run(x.double()) == [False]  # the model now pins float64
    with pytest.raises(ValueError, match='dtype'): sampler.sample(x=x, n_steps=5)
    dw.register_buffer('shift', torch.zeros(2, dtype=F64)); assert run(x.double()) == [False]
    dw = DoubleWellModel(); sampler.model = dw; assert sampler._lean_plan is None; run()
    planned.clear(); sampler.sample(x=x, n_steps=20, model=HarmonicModel()); assert planned == []  # another model
    assert run() == [True] and run(thin=4, return_trajectory=True) == [True]
    assert torch.equal(sampler.sample(x=x, n_steps=0), x)
    bad = x.clone(); bad[2, 0] = float('nan')  # a planned run the screen flags gets the full checks
    with pytest.raises(ValueError, match='x contains NaN or inf'): sampler.sample(x=bad, n_steps=5)
    with pytest.warns(RuntimeWarning, match='running away'): sampler.sample(x=x * 1e3, n_steps=1)
    for twin in (copy.deepcopy(sampler), torch.load(_saved(sampler), weights_only=False)):
        assert twin._lean_plan is None
        assert torch.equal(twin.sample(x=x, n_steps=20, generator=torch.Generator().manual_seed(5)),
                           sampler.sample(x=x, n_steps=20, generator=torch.Generator().manual_seed(5)))


def test_sampler_warnings_point_at_the_line_that_called_sample(ext):
    "The warnings of every Langevin route (lean, planned, general fused, pure torch) name the caller of `sample`."
    import warnings
    samplers = pytest.importorskip('torchebm.samplers')
    from torchebm.core.base import ConstantScheduler

    class Same(ConstantScheduler):  # takes the general fused path
        pass

    x = torch.randn(30, 2, generator=torch.Generator().manual_seed(0)) * 1e6
    planned = samplers.LangevinDynamics(DoubleWellModel(), step_size=0.01)
    planned.sample(x=x[:, :1].repeat(1, 2) * 0, n_steps=1)
    for sampler in (samplers.LangevinDynamics(DoubleWellModel(), step_size=0.01), planned,
                    samplers.LangevinDynamics(DoubleWellModel(), step_size=Same(0.01)),
                    samplers.LangevinDynamics(DoubleWellModel(), step_size=0.01, use_kernels=False)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            sampler.sample(x=x, n_steps=5)
        assert caught and {Path(w.filename).name for w in caught} == {'test_kernels.py'}, [str(w) for w in caught]


def _saved(obj):
    import io
    buffer = io.BytesIO(); torch.save(obj, buffer); buffer.seek(0)
    return buffer


def test_screen_flags_a_start_that_is_not_finite(ext):
    "A start holding NaN or inf is flagged NOT_FINITE (1): the samplers check their start points only on a flagged run."
    x = torch.zeros(6, 2); x[1, 0] = float('nan'); x[4, 1] = float('inf')
    for kind in ('ula', 'mala'):
        flags = run_entry(ext, kind, x, HarmonicModel(), record_traj=False, record_diag=False, screen=(1e10, 1e6),
                          step=0.01)[6]
        assert flags is not None and {i for i, f in enumerate(flags.tolist()) if f & 1} == {1, 4}


# ---- CUDA --------------------------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


@cuda
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_cuda_kernels_agree_with_cpu_and_are_reproducible(ext, dtype):
    gauss, mean, cov = gaussian3(dtype)
    x = torch.randn(4000, 3, generator=torch.Generator().manual_seed(0), dtype=dtype)
    assert fused_langevin_supported(gauss.cuda(), x.cuda(), metropolis=True)
    for run in (lambda m, y: fused_langevin(m, y, step_sizes=steps(200, .2), noise_scales=steps(200, 1.),
                                            metropolis=True, seed=3)[0],
                lambda m, y: fused_hmc(m, y, step_sizes=steps(30, .25), n_leapfrog_steps=5, seed=3)[0]):
        gpu = run(gauss.cuda(), x.cuda())
        assert gpu.is_cuda and torch.equal(gpu, run(gauss.cuda(), x.cuda()))
        assert _z(gpu.cpu(), run(gauss, x)) < 4.5


@cuda
@pytest.mark.parametrize('kind', ['ula', 'mala', 'hmc'])
@pytest.mark.parametrize('n', [1, 37, 100, 300])  # a part of a warp, several warps, several thread blocks
def test_cuda_diagnostics(ext, kind, n):
    """The diagnostics from the per-warp statistics are those of the trajectory, also for chains that end part way
    through a warp; recording changes nothing; the same seed gives the same bits."""
    gauss = gaussian3()[0].cuda()
    x = torch.randn(n, 3, generator=torch.Generator().manual_seed(0), dtype=F64).cuda()
    kw = dict(thin=5, return_trajectory=True, return_diagnostics=True, seed=0)
    run = ((lambda **k: fused_hmc(gauss, x, step_sizes=steps(20, .1), n_leapfrog_steps=3, **k)) if kind == 'hmc' else
           (lambda **k: fused_langevin(gauss, x, step_sizes=steps(20, .1), noise_scales=steps(20, 1.),
                                       metropolis=kind == 'mala', **k)))
    final, traj, diag = run(**kw)
    assert traj.shape == (n, 4, 3) and diag['mean'].is_cuda and diag['var'].is_cuda
    assert torch.allclose(diag['mean'], traj.mean(0), rtol=1e-12, atol=1e-12)
    assert torch.allclose(diag['var'], traj.var(0, correction=1 if n > 1 else 0), rtol=1e-10, atol=1e-12)
    assert torch.allclose(diag['energy'], torch.stack([gauss(traj[:, k]) for k in range(4)]), rtol=1e-9, atol=1e-12)
    assert ('acceptance_rate' in diag) == (kind != 'ula')
    again = run(**kw)
    assert torch.equal(again[0], final) and all(torch.equal(diag[k], again[2][k]) for k in diag)
    assert torch.equal(run(seed=0)[0], final)


@cuda
@pytest.mark.parametrize('kind', ['ula', 'mala', 'hmc'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_cuda_entry_points_return_the_cpu_outputs(ext, kind, dtype):
    "The CUDA module's langevin_chain and hmc_chain take the CPU's arguments and return its seven outputs."
    cuda_ext = loader.load_extension('cuda_samplers')
    assert cuda_ext is not None, loader.extension_state('cuda_samplers')
    x = torch.randn(37, 3, generator=torch.Generator().manual_seed(0), dtype=dtype)
    for record in ((False, False), (True, False), (False, True), (True, True)):
        out = run_entry(cuda_ext, kind, x.cuda(), gaussian3(dtype)[0].cuda(), record_traj=record[0],
                        record_diag=record[1])
        check_outputs(out, x.cuda(), 4, kind != 'ula', *record)
        assert out[6] is None


@cuda
def test_the_cuda_build_reports_the_headers_energies():
    "The CUDA build compiles the same TEBM_ENERGIES list as the CPU build, in the same order."
    cuda_ext = loader.load_extension('cuda_samplers')
    assert cuda_ext is not None, loader.extension_state('cuda_samplers')
    assert cuda_ext.energy_kinds() == KINDS


@cuda
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_cuda_screen_flags_what_the_cpu_flags(ext, dtype):
    """The screen on the device: the same flags as the CPU's where they do not depend on the noise (a start far out,
    a Metropolis chain that cannot accept, a step that overflows), `None` when nothing is flagged."""
    cuda_ext = loader.load_extension('cuda_samplers')
    limits = (1e10, 1e6)
    x = torch.randn(40, 2, generator=torch.Generator().manual_seed(0), dtype=dtype)
    x[5] *= 1e6  # runaway energy at the start (and the end)
    harmonic, dw = HarmonicModel(), DoubleWellModel()
    for model, y, kind, step, expect in ((harmonic, x, 'ula', 0.01, {5: 2}),
                                         (harmonic, x[:3] * 0 + 1, 'mala', 1e6, {0: 4, 1: 4, 2: 4}),
                                         (dw.to(dtype), x * 0 + 50, 'ula', 1.0, None)):
        cpu = run_entry(ext, kind, y, model.to(dtype), record_traj=False, record_diag=False, screen=limits, step=step)[6]
        gpu = run_entry(cuda_ext, kind, y.cuda(), model.to(dtype).cuda(), record_traj=False, record_diag=False,
                        screen=limits, step=step)[6]
        assert cpu is not None and gpu is not None and gpu.is_cuda
        if expect is None: assert (cpu & 1).all() and torch.equal(gpu.cpu() & 1, cpu & 1)  # all overflow
        else:
            assert {i: int(f) for i, f in enumerate(cpu) if f} == expect
            assert torch.equal(gpu.cpu(), cpu)
    calm = run_entry(cuda_ext, 'ula', x[6:].cuda(), harmonic.to(dtype).cuda(), record_traj=False, record_diag=False,
                     screen=limits, step=0.01)
    assert calm[6] is None


ALLOCATOR_PROBE = '''
import os, sys, torch
import torchebm.cuda as tc
def resident(): return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
if sys.argv[1] == 'tuned': assert tc.tune_cpu_allocator() is True
x = torch.ones(16 << 20)  # 64 MiB, written, so resident
held = resident(); del x
print((held - resident()) >> 20)
'''


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc mallopt')
def test_tune_cpu_allocator_keeps_freed_memory():
    "Default glibc returns a freed 64 MiB tensor to the OS; after tune_cpu_allocator() it stays for reuse."
    def released_mib(mode):
        out = subprocess.run([sys.executable, '-c', ALLOCATOR_PROBE, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])
    assert released_mib('default') >= 60
    assert released_mib('tuned') <= 4


def _build_includes(*extra) -> list:
    "The `-I` flags of a build of the kernel sources against this torch's headers, `extra` directories first."
    import sysconfig
    from torch.utils.cpp_extension import include_paths
    from torchebm.cuda.kernels import CSRC
    return [f'-I{d}' for d in (CSRC, *extra, *include_paths(), sysconfig.get_paths()['include'])]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which('nvcc') is None, reason='needs the CUDA compiler (nvcc)')
def test_cuda_kernels_compile_with_nvcc(tmp_path):
    """The CUDA twins compile (device code for sm_80, no warnings from our source) against this torch's headers,
    also on a machine without a GPU, and so does the binding load_inline makes of kernels_cuda.h (the CUDA entry
    points under the CPU build's names). A CPU build of torch lacks one generated CUDA header, supplied here."""
    from torchebm.cuda.kernels import CSRC, CUDA_EXTENSION
    shim = tmp_path / 'shim' / 'c10' / 'cuda' / 'impl'
    shim.mkdir(parents=True)
    (shim / 'cuda_cmake_macros.h').write_text('#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n')
    source = CSRC / 'kernels.cu'
    includes = _build_includes(tmp_path / 'shim')
    cmd = ['nvcc', '-c', str(source), '-o', str(tmp_path / 'kernels.o'), '-std=c++17', '-O3', *includes,
           '-DTORCH_EXTENSION_NAME=tebm_check', '-D_GLIBCXX_USE_CXX11_ABI=1', '-gencode=arch=compute_80,code=sm_80']
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    ours = [line for line in out.stderr.splitlines() if str(CSRC) in line]  # kernels.cu or tebm_common.h
    assert not ours, '\n'.join(ours)
    binding = tmp_path / 'main.cpp'  # what load_inline compiles: torch's header, the C++ sources, the module
    binding.write_text('\n'.join(['#include <torch/extension.h>', (CSRC / 'kernels_cuda.h').read_text(),
                                   'PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {',
                                   *(f'm.def("{f}", torch::wrap_pybind_function({f}), "{f}");'
                                     for f in CUDA_EXTENSION.functions), '}']))
    cmd = [os.environ.get('CXX', 'c++'), '-fsyntax-only', '-std=c++17', str(binding), *includes,
           '-DTORCH_EXTENSION_NAME=tebm_check']
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]


def _vectorized_lane_loops(tmp_path, flags):
    """Compile kernels.cpp as the loader does but for AVX2 without AVX-512 (`-march=x86-64-v3`, the EPYC of issue 13)
    and map each `#pragma omp simd` line to whether GCC reports its loop vectorised (the report names a line of the
    loop, at most three lines below the pragma)."""
    import re
    from torchebm.cuda.kernels import CSRC
    _require_gcc_on_x86()
    report = tmp_path / 'vec.txt'
    cmd = [os.environ.get('CXX', 'c++'), '-c', str(CSRC / 'kernels.cpp'), '-o', str(tmp_path / 'kernels.o'),
           '-std=c++20', '-fPIC', '-w', *flags, *_build_includes(), '-DTORCH_EXTENSION_NAME=tebm_check',
           f'-fopt-info-vec-optimized={report}']
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    vectorized = {int(n) for n in re.findall(r'kernels\.cpp:(\d+):\d+: optimized: loop vectorized', report.read_text())}
    lines = (CSRC / 'kernels.cpp').read_text().splitlines()
    return {i: any(k in vectorized for k in range(i + 1, i + 5))
            for i, line in enumerate(lines, 1) if '#pragma omp simd' in line}


def _avx2_flags(flags):
    return [('-march=x86-64-v3' if f == '-march=native' else f) for f in flags]


def _require_gcc_on_x86() -> None:
    "Skip unless the loader's C++ compiler is GCC (its -fopt-info report) on x86-64; asked when run, not at collection."
    import platform
    if platform.machine().lower() not in ('x86_64', 'amd64'): pytest.skip('needs an x86-64 machine')
    try: out = subprocess.run([os.environ.get('CXX', 'c++'), '--version'], capture_output=True, text=True, timeout=60)
    except OSError: pytest.skip('no C++ compiler')
    if 'free software foundation' not in out.stdout.lower(): pytest.skip('needs GCC (its -fopt-info vectoriser report)')


@pytest.mark.slow
def test_every_lane_loop_vectorizes_on_avx2_without_avx512(tmp_path):
    """The fused kernels keep their speed on CPUs without AVX-512 only if every SIMD lane loop vectorises there
    (issue 13: one missing compiler flag left them scalar, 8x slower than the hand-written chain on an AVX2 EPYC).
    Checked at compile time with the loader's own flags, so a change that de-vectorises a loop fails here, on any
    development machine."""
    loops = _vectorized_lane_loops(tmp_path, _avx2_flags(CPU_EXTENSION.extra_cflags))
    assert len(loops) >= 10, loops
    scalar = [i for i, vectorized in loops.items() if not vectorized]
    assert not scalar, f"lane loops not vectorised (lines of their #pragma): {scalar}"


@pytest.mark.slow
def test_without_no_trapping_math_the_noise_loops_stay_scalar_on_avx2(tmp_path):
    "The check above can fail: without `-fno-trapping-math` GCC leaves the Box-Muller noise loops scalar on AVX2."
    flags = [f for f in _avx2_flags(CPU_EXTENSION.extra_cflags) if f != '-fno-trapping-math']
    loops = _vectorized_lane_loops(tmp_path, flags)
    assert not all(loops.values())
    assert sum(loops.values()) >= len(loops) - 3  # only the noise loops fall back
