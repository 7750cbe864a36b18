"Integrators against closed forms: convergence orders, adaptive tolerances, symplecticity, reversibility, SDE laws."
import math

import pytest
import torch

from torchebm.core.base import BaseIntegrator
from torchebm.integrators import (INTEGRATORS, RK4, Dopri5, EulerMaruyama, EulerMaruyamaIntegrator, Heun,
                                  HeunIntegrator, Leapfrog, LeapfrogIntegrator, MassMatrix, get_integrator)

F64 = torch.float64


ROTATION = torch.tensor([[-0.1, 1.0], [-1.0, -0.1]], dtype=F64)  # a damped rotation: dx/dt = A x


def rotation_drift(x, t):
    return x @ ROTATION.T


def rotation_exact(x0, t):
    return x0 @ torch.linalg.matrix_exp(ROTATION * t).T


def global_error(integrator, n_steps, t_end=2.0):
    x0 = torch.tensor([[1.0, 0.5], [-0.3, 2.0]], dtype=F64)
    out = integrator.integrate({'x': x0}, t_end / n_steps, n_steps, drift=rotation_drift)
    return (out['x'] - rotation_exact(x0, t_end)).abs().max().item()


@pytest.mark.parametrize('cls, order', [(EulerMaruyama, 1), (Heun, 2), (RK4, 4)])
def test_convergence_order_on_a_linear_system(cls, order):
    ns = [20, 40, 80, 160]
    errors = [global_error(cls(), n) for n in ns]
    slopes = [math.log2(errors[i] / errors[i + 1]) for i in range(len(ns) - 1)]
    assert all(abs(s - order) < 0.15 for s in slopes), slopes


def test_time_dependent_drift_gets_the_right_times():
    # dx/dt = t^3 from 0: x(1) = 1/4 exactly for RK4 (Simpson is exact on cubics)
    x0 = torch.zeros(3, 1, dtype=F64)
    out = RK4().integrate({'x': x0}, 0.25, 4, drift=lambda x, t: (t ** 3)[:, None])
    torch.testing.assert_close(out['x'], torch.full((3, 1), 0.25, dtype=F64))
    out = RK4().integrate({'x': x0}, 0.25, 4, drift=lambda x, t: (t ** 3)[:, None], t0=1.0)
    torch.testing.assert_close(out['x'], torch.full((3, 1), (16 - 1) / 4, dtype=F64))


@pytest.mark.parametrize('rtol', [1e-4, 1e-7, 1e-10])
def test_dopri5_meets_tolerance_and_counts_evaluations(rtol):
    x0 = torch.tensor([[1.0, 0.5], [-0.3, 2.0]], dtype=F64)
    solver = Dopri5(rtol=rtol, atol=rtol * 1e-2)
    out = solver.integrate({'x': x0}, 0.1, drift=rotation_drift, t1=5.0)
    assert (out['x'] - rotation_exact(x0, 5.0)).abs().max() < 100 * rtol
    assert solver.n_function_evals == 1 + 6 * (solver.n_accepted + solver.n_rejected)


def test_dopri5_tighter_tolerance_costs_more_and_runs_backward():
    x0 = torch.tensor([[1.0, 0.0]], dtype=F64)
    loose, tight = Dopri5(rtol=1e-3, atol=1e-5), Dopri5(rtol=1e-9, atol=1e-11)
    loose.integrate({'x': x0}, 0.1, drift=rotation_drift, t1=3.0)
    forward = tight.integrate({'x': x0}, 0.1, drift=rotation_drift, t1=3.0)
    assert tight.n_function_evals > 3 * loose.n_function_evals
    back = tight.integrate({'x': forward['x']}, 0.1, drift=rotation_drift, t0=3.0, t1=0.0)
    torch.testing.assert_close(back['x'], x0, atol=1e-7, rtol=0)


def test_dopri5_gives_up_after_max_steps():
    with pytest.raises(RuntimeError, match='max_steps'):
        Dopri5(rtol=1e-12, atol=1e-14, max_steps=5).integrate({'x': torch.ones(1, 1, dtype=F64)}, 0.1,
                                                               drift=lambda x, t: -x, t1=10.0)


def quartic_hamiltonian(state, mass):
    return (0.25 * state['x'] ** 4).sum(-1) + mass.kinetic_energy(state['p'])


def test_leapfrog_energy_error_stays_bounded_on_an_anharmonic_oscillator():
    mass = MassMatrix(torch.tensor([1.0, 2.0], dtype=F64))
    state = {'x': torch.tensor([[1.0, -0.5]], dtype=F64), 'p': torch.tensor([[0.3, 1.0]], dtype=F64)}
    h0 = quartic_hamiltonian(state, mass)
    errors = []
    for _ in range(40):
        state = Leapfrog().integrate(state, 0.05, 500, drift=lambda x, t: -x ** 3, mass=mass)
        errors.append((quartic_hamiltonian(state, mass) - h0).abs().item())
    assert max(errors) < 1e-2 * h0.item()
    assert max(errors[20:]) < 2 * max(errors[:20]) + 1e-12  # no drift over 20,000 steps


def test_leapfrog_matches_the_harmonic_solution_to_second_order():
    x0, p0 = torch.tensor([[1.0]], dtype=F64), torch.tensor([[0.0]], dtype=F64)
    errs = []
    for h in (0.1, 0.05):
        out = Leapfrog().integrate({'x': x0, 'p': p0}, h, int(round(2.0 / h)), drift=lambda x, t: -x)
        errs.append(abs(out['x'].item() - math.cos(2.0)))
    assert 3.5 < errs[0] / errs[1] < 4.5


@pytest.mark.parametrize('mass', [None, 2.0, 'diagonal', 'dense'])
def test_leapfrog_is_time_reversible(mass):
    g = torch.Generator().manual_seed(0)
    if mass == 'diagonal': mass = torch.tensor([0.5, 1.0, 3.0], dtype=F64)
    if mass == 'dense':
        a = torch.randn(3, 3, generator=g, dtype=F64)
        mass = a @ a.T + torch.eye(3, dtype=F64)
    force = lambda x, t: -torch.sin(x) - 0.1 * x ** 3
    start = {'x': torch.randn(16, 3, generator=g, dtype=F64), 'p': torch.randn(16, 3, generator=g, dtype=F64)}
    fwd = Leapfrog().integrate(start, 0.03, 300, drift=force, mass=mass)
    back = Leapfrog().integrate({'x': fwd['x'], 'p': -fwd['p']}, 0.03, 300, drift=force, mass=mass)
    torch.testing.assert_close(back['x'], start['x'], atol=1e-9, rtol=0)
    torch.testing.assert_close(-back['p'], start['p'], atol=1e-9, rtol=0)


def test_leapfrog_preserves_phase_space_volume():
    # the Jacobian of the leapfrog map has determinant 1
    def flow(z):
        out = Leapfrog().integrate({'x': z[None, :2], 'p': z[None, 2:]}, 0.1, 20, drift=lambda x, t: -x ** 3 - x)
        return torch.cat([out['x'][0], out['p'][0]])
    jac = torch.autograd.functional.jacobian(flow, torch.tensor([0.7, -0.2, 0.4, 1.1], dtype=F64))
    assert abs(torch.linalg.det(jac).item() - 1) < 1e-10


def test_cached_drift_is_used_and_refreshed():
    calls = []
    def drift(x, t): calls.append(1); return -x
    x = torch.ones(2, 2, dtype=F64)
    out = EulerMaruyama().step({'x': x, 'drift': torch.zeros_like(x)}, 0.1, drift=drift)
    assert not calls and 'drift' not in out
    torch.testing.assert_close(out['x'], x)
    out = Leapfrog().integrate({'x': x, 'p': x}, 0.1, 5, drift=drift)
    assert len(calls) == 6 and 'drift' in out
    torch.testing.assert_close(out['drift'], -out['x'])


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_euler_maruyama_ornstein_uhlenbeck_stationary_variance(seed):
    theta, s, h, n = 1.5, 0.8, 0.06, 10_000
    g = torch.Generator().manual_seed(seed)
    out = EulerMaruyama().integrate({'x': torch.zeros(n, 2, dtype=F64)}, h, 120, drift=lambda x, t: -theta * x,
                                    noise_scale=s, generator=g)
    expected = s ** 2 / (theta * (1 - theta * h / 2))
    var = out['x'].var(0)
    assert ((var - expected).abs() < 4 * expected * math.sqrt(2 / n)).all(), (var, expected)
    assert out['x'].mean(0).abs().max() < 4 * math.sqrt(expected / n)


def test_heun_sde_has_second_order_weak_bias_on_ou():
    theta, s, n = 1.5, 0.8, 20_000
    out = Heun().integrate({'x': torch.zeros(n, 1, dtype=F64)}, 0.1, 80, drift=lambda x, t: -theta * x,
                           noise_scale=s, generator=torch.Generator().manual_seed(5))
    em_bias = s ** 2 / (theta * (1 - theta * 0.1 / 2)) - s ** 2 / theta
    assert abs(out['x'].var().item() - s ** 2 / theta) < em_bias / 2


def test_noise_free_euler_maruyama_is_euler_and_seeds_reproduce():
    x = torch.randn(5, 3, dtype=F64)
    out = EulerMaruyama().step({'x': x}, 0.1, drift=lambda x, t: -x)
    torch.testing.assert_close(out['x'], 0.9 * x)
    run = lambda seed: EulerMaruyama().integrate({'x': x}, 0.1, 10, drift=lambda x, t: -x, noise_scale=1.0,
                                                 generator=torch.Generator().manual_seed(seed))['x']
    assert torch.equal(run(3), run(3)) and not torch.equal(run(3), run(4))


def test_mass_matrix_forms():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(3, 3, generator=g, dtype=F64)
    dense = a @ a.T + 0.5 * torch.eye(3, dtype=F64)
    m = MassMatrix(dense)
    p = torch.randn(50_000, 3, generator=g, dtype=F64)
    torch.testing.assert_close(m.velocity(p), p @ torch.linalg.inv(dense), atol=1e-10, rtol=1e-10)
    draws = m.sample_momentum(p, torch.Generator().manual_seed(2))
    assert (torch.cov(draws.T) - dense).abs().max() < 0.05 * dense.abs().max()
    square_diag = MassMatrix(torch.full((2, 2), 2.0, dtype=F64), kind='diagonal')
    img = torch.ones(4, 2, 2, dtype=F64)
    torch.testing.assert_close(square_diag.velocity(img), img / 2)
    torch.testing.assert_close(MassMatrix(torch.tensor([1., 2., 3., 4.], dtype=F64)).kinetic_energy(img),
                               torch.full((4,), 0.5 * (1 + 1 / 2 + 1 / 3 + 1 / 4), dtype=F64))


@pytest.mark.parametrize('bad, match', [(0.0, 'mass'), (float('nan'), 'mass'), (torch.tensor([1.0, -1.0]), 'positive'),
                                        (torch.tensor([[1.0, 2.0], [2.0, 1.0]]), 'positive definite'),
                                        (torch.tensor([[1.0, 0.3], [0.0, 1.0]]), 'symmetric'),
                                        (torch.tensor([1.0, float('inf')]), 'NaN or inf'),
                                        (torch.tensor([1, 2]), 'floating-point')])
def test_bad_masses_are_refused(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        MassMatrix(bad)


def test_registry_and_aliases():
    assert EulerMaruyamaIntegrator is EulerMaruyama and HeunIntegrator is Heun and LeapfrogIntegrator is Leapfrog
    for name, cls in INTEGRATORS.items():
        assert isinstance(get_integrator(name), cls) and isinstance(get_integrator(name), BaseIntegrator)
    inst = Heun()
    assert get_integrator(inst) is inst
    with pytest.raises(ValueError, match="expected one of \\['adaptive_heun', 'bosh3', 'dopri5', 'dopri8', 'euler'"):
        get_integrator('verlet')
    with pytest.raises(TypeError, match='BaseIntegrator'):
        get_integrator(object())


@pytest.mark.parametrize('name', ['rk4', 'dopri5', 'leapfrog'])
def test_ode_integrators_refuse_noise(name):
    state = {'x': torch.zeros(2, 1), 'p': torch.zeros(2, 1)}
    with pytest.raises(ValueError, match='noise_scale'):
        get_integrator(name).integrate(state, 0.1, 2, drift=lambda x, t: -x, noise_scale=1.0)


@pytest.mark.parametrize('bad', [0.0, -0.1, float('inf')])
def test_non_positive_step_sizes_are_refused(bad):
    for name in INTEGRATORS:
        with pytest.raises(ValueError, match='step_size'):
            get_integrator(name).integrate({'x': torch.zeros(2, 1), 'p': torch.zeros(2, 1)}, bad, 2,
                                           drift=lambda x, t: -x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
@pytest.mark.parametrize('name', sorted(INTEGRATORS))
def test_integrators_on_cuda_match_cpu(name):
    x = torch.randn(8, 3, dtype=F64)
    state = lambda dev: {'x': x.to(dev), 'p': torch.ones_like(x).to(dev)}
    cpu = get_integrator(name).integrate(state('cpu'), 0.05, 10, drift=lambda x, t: -x)
    gpu = get_integrator(name).integrate(state('cuda'), 0.05, 10, drift=lambda x, t: -x)
    torch.testing.assert_close(gpu['x'].cpu(), cpu['x'])
    noisy = EulerMaruyama().integrate(state('cuda'), 0.05, 10, drift=lambda x, t: -x, noise_scale=1.0,
                                      generator=torch.Generator('cuda').manual_seed(0))
    assert noisy['x'].is_cuda and torch.isfinite(noisy['x']).all()


# ---- issue 15: embedded Runge-Kutta pairs and the drift-implicit SDE step ----
from torchebm.integrators import AdaptiveHeun, Bosh3, Dopri8, ImplicitEulerMaruyama


@pytest.mark.parametrize('cls, order, ns', [(AdaptiveHeun, 2, [20, 40, 80]), (Bosh3, 3, [20, 40, 80]), (Dopri8, 8, [4, 8])])
def test_embedded_pairs_converge_at_their_order_on_a_linear_system(cls, order, ns):
    "Fixed steps of the propagated solution (the error estimate is discarded)."
    x0 = torch.tensor([[1.0, 0.5], [-0.3, 2.0]], dtype=F64)
    errors = []
    for n in ns:
        state, h = {'x': x0}, 2.0 / n
        for i in range(n):
            state = cls().step(state, h, drift=rotation_drift, t=torch.full((2,), i * h, dtype=F64)); state.pop('error')
        errors.append((state['x'] - rotation_exact(x0, 2.0)).abs().max().item())
    slopes = [math.log2(errors[i] / errors[i + 1]) / math.log2(ns[i + 1] / ns[i]) for i in range(len(ns) - 1)]
    assert all(abs(s - order) < 0.3 for s in slopes), slopes


@pytest.mark.parametrize('cls, rtols', [(Bosh3, (1e-4, 1e-7)), (AdaptiveHeun, (1e-3, 1e-5)), (Dopri8, (1e-4, 1e-10))])
def test_adaptive_pairs_meet_their_tolerance_and_count_evaluations(cls, rtols):
    x0 = torch.tensor([[1.0, 0.5], [-0.3, 2.0]], dtype=F64)
    errors, costs = [], []
    for rtol in rtols:
        solver = cls(rtol=rtol, atol=rtol * 1e-2)
        out = solver.integrate({'x': x0}, 0.1, drift=rotation_drift, t1=5.0)
        errors.append((out['x'] - rotation_exact(x0, 5.0)).abs().max().item()); costs.append(solver.n_function_evals)
        tries = solver.n_accepted + solver.n_rejected
        # the first stage is evaluated once per point: Bosh3 (FSAL) gets it from the previous step, AdaptiveHeun and
        # Dopri8 (as in Hairer's DOP853) evaluate it at every accepted point (the start included, the end not)
        expected = {Bosh3: 1 + 3 * tries, AdaptiveHeun: tries + solver.n_accepted, Dopri8: 11 * tries + solver.n_accepted}[cls]
        assert solver.n_function_evals == expected
        assert errors[-1] < 200 * rtol
    assert errors[1] < errors[0] and costs[1] > costs[0]
    back = cls(rtol=rtols[1], atol=rtols[1] * 1e-2).integrate({'x': rotation_exact(x0, 1.0)}, 0.1, drift=rotation_drift, t0=1.0, t1=0.0)
    torch.testing.assert_close(back['x'], x0, rtol=0, atol=200 * rtols[1])
    with pytest.raises(RuntimeError, match='max_steps'):
        cls(rtol=1e-12, atol=1e-14, max_steps=3).integrate({'x': x0}, 0.1, drift=rotation_drift, t1=5.0)


def test_implicit_euler_maruyama_ou_law_in_the_stiff_regime():
    """One step is x' = (x + sqrt(2h) s xi) / (1 + lam h): after 30 steps of h = 0.2 at lam = 20 from x0 = 1, mean
    x0 (1 + lam h)^-30 ~ 0 and variance 2 s^2 h / ((1 + lam h)^2 - 1) (stationary): 4 SE on 20000 chains."""
    lam, h, n = 20.0, 0.2, 20000
    g = torch.Generator().manual_seed(0)
    x = ImplicitEulerMaruyama().integrate({'x': torch.ones(n, 2, dtype=F64)}, h, 30, drift=lambda x, t: -lam * x,
                                          noise_scale=1.0, generator=g)['x']
    var = 2 * h / ((1 + lam * h) ** 2 - 1)
    assert x.mean(0).abs().max() < 4 * math.sqrt(var / n)
    assert (x.var(0) - var).abs().max() < 4 * var * math.sqrt(2 / n)


def test_implicit_euler_maruyama_solves_a_nonlinear_drift_and_is_reproducible():
    "Stiff double well: each step satisfies its implicit equation to the Newton tolerance."
    drift = lambda x, t: -4 * x * (x * x - 1) * 25
    x = torch.linspace(-2, 2, 9, dtype=F64)[:, None]
    new = ImplicitEulerMaruyama().step({'x': x}, 0.1, drift=drift, t=torch.zeros(9, dtype=F64))['x']
    torch.testing.assert_close(new, x + 0.1 * drift(new, None), rtol=0, atol=1e-9)
    a = ImplicitEulerMaruyama().integrate({'x': x}, 0.1, 3, drift=drift, noise_scale=0.5, generator=torch.Generator().manual_seed(1))
    b = ImplicitEulerMaruyama().integrate({'x': x}, 0.1, 3, drift=drift, noise_scale=0.5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a['x'], b['x'])
    with pytest.raises(ValueError, match='newton_steps'): ImplicitEulerMaruyama(newton_steps=0)


# ---- issue 13: the typed state, one loop, Dopri5 on the shared adaptive implementation ----
from torchebm.core.base import run_steps
from torchebm.integrators import AdaptiveHeun, EmbeddedRungeKutta, IntegratorState, as_integrator_state


@pytest.mark.parametrize('name', sorted(INTEGRATORS))
def test_typed_and_dict_states_give_the_same_numbers_in_the_form_given(name):
    x, p = torch.randn(4, 3, dtype=F64), torch.randn(4, 3, dtype=F64)
    integ = get_integrator(name)
    typed = integ.integrate(IntegratorState(x, p), 0.05, 4, drift=lambda x, t: -x)
    as_dict = integ.integrate({'x': x, 'p': p, 'extra': 'kept'}, 0.05, 4, drift=lambda x, t: -x)
    assert isinstance(typed, IntegratorState) and isinstance(as_dict, dict) and as_dict['extra'] == 'kept'
    assert torch.equal(typed.x, as_dict['x']) and torch.equal(typed.p, as_dict['p'])
    one = integ.step(IntegratorState(x, p), 0.05, drift=lambda x, t: -x, t=torch.zeros(4, dtype=F64))
    one_dict = integ.step({'x': x, 'p': p}, 0.05, drift=lambda x, t: -x, t=torch.zeros(4, dtype=F64))
    assert isinstance(one, IntegratorState) and torch.equal(one.x, one_dict['x'])


def test_dopri5_is_an_embedded_runge_kutta_and_its_stored_numbers_hold():
    "Values of the former stand-alone Dopri5 (bit-identical on 20 ODE cases when it was replaced)."
    assert issubclass(Dopri5, EmbeddedRungeKutta)
    solver = Dopri5(rtol=1e-6, atol=1e-8)
    out = solver.integrate(IntegratorState(torch.tensor([[1.0, 0.5]], dtype=F64)), 0.1, drift=rotation_drift, t1=3.0)
    assert (solver.n_accepted, solver.n_rejected, solver.n_function_evals) == (16, 3, 115)
    torch.testing.assert_close(out.x, torch.tensor([[-0.6811320494516104, -0.4712463955034357]], dtype=F64),
                               rtol=1e-12, atol=1e-14)


def test_dopri8_tableau_equals_the_published_decimals_as_scipy_ships_them():
    "Cross-check only: the package writes the DOP853 decimals out itself and never imports SciPy's private module."
    d = pytest.importorskip('scipy.integrate._ivp.dop853_coefficients')
    assert Dopri8.nodes == tuple(float(c) for c in d.C[:12])
    assert Dopri8.weights == tuple(float(b) for b in d.B)
    assert all(Dopri8.coefficients[i] == tuple(float(a) for a in d.A[i, :i]) for i in range(12))
    assert Dopri8.error_weights == tuple(float(e) for e in d.E5[:12]) and d.E5[12] == 0
    assert Dopri8.error_weights3 == tuple(float(e) for e in d.E3[:12]) and d.E3[12] == 0
    import torchebm.integrators as module
    assert 'scipy' not in open(module.__file__).read()


def test_dopri8_error_estimate_tracks_the_tolerance():
    "Adaptive Dopri8 on x' = x cos t: the global error stays within 10 rtol from rtol 1e-4 to 1e-12."
    x0 = torch.tensor([[1.0], [-0.5]], dtype=F64)
    exact = x0 * math.exp(math.sin(2.0))
    for rtol in (1e-4, 1e-6, 1e-8, 1e-10, 1e-12):
        solver = Dopri8(rtol=rtol, atol=rtol * 1e-2)
        out = solver.integrate(IntegratorState(x0), 0.1, drift=lambda x, t: x * torch.cos(t)[:, None], t1=2.0)
        assert (out.x - exact).abs().max() < 10 * rtol


def test_run_steps_is_the_loop_of_integrators():
    calls = []
    def step(s, i): calls.append(i); return s + 1, None
    assert run_steps(step, 0, 5) == (5, 5) and calls == [0, 1, 2, 3, 4]
    assert run_steps(step, 0, 100, until=lambda s: s >= 2)[1] == 2


def test_bad_states_and_inputs_name_the_argument():
    x = torch.zeros(3, 1, dtype=F64)
    force = lambda x, t: -x
    with pytest.raises(ValueError, match='step_size'): EulerMaruyama().integrate({'x': x}, 0.0, 5, drift=force)
    with pytest.raises(ValueError, match='n_steps'): Heun().integrate({'x': x}, 0.1, -1, drift=force)
    with pytest.raises(ValueError, match='EulerMaruyama or Heun'): RK4().step({'x': x}, 0.1, drift=force, noise_scale=0.5)
    with pytest.raises(ValueError, match="'p'"): Leapfrog().step({'x': x}, 0.1, drift=force)
    with pytest.raises(ValueError, match='momenta'): Leapfrog().step(IntegratorState(x), 0.1, drift=force)
    with pytest.raises(ValueError, match='ODEs only'): Bosh3().step({'x': x}, 0.1, drift=force, noise_scale=1.0)
    with pytest.raises(ValueError, match='noise_scale'):
        Dopri5().integrate({'x': x}, 0.1, 5, drift=force, noise_scale=1.0)
    with pytest.raises(ValueError, match="'x'"): as_integrator_state({'p': x})
    with pytest.raises(TypeError, match='IntegratorState'): EulerMaruyama().step(x, 0.1, drift=force)
    with pytest.raises(ValueError, match="'heun', 'implicit_euler_maruyama', 'leapfrog', 'rk4'"):
        get_integrator('midpoint')
    with pytest.raises(ValueError, match='n_steps or t1'): AdaptiveHeun().integrate({'x': x}, 0.1, drift=force)


# ---- audit: drift shapes, non-finite times and states, per-chain step sizes, Newton convergence ----
from torchebm.integrators import leapfrog_steps

FIXED_STEP = ['euler_maruyama', 'heun', 'rk4', 'leapfrog', 'implicit_euler_maruyama']
ADAPTIVE = ['dopri5', 'bosh3', 'adaptive_heun', 'dopri8']


def summed_drift(x, t):
    "A drift that sums over the event dimension: [batch] instead of [batch, 1] (it used to reshape the state)."
    return -(x ** 3 - x).sum(1)


@pytest.mark.parametrize('name', sorted(INTEGRATORS))
def test_a_drift_not_shaped_like_x_is_refused_by_step_and_integrate(name):
    state = {'x': torch.zeros(4, 1, dtype=F64), 'p': torch.zeros(4, 1, dtype=F64)}
    with pytest.raises(ValueError, match=r'drift\(x, t\) must return a tensor with the shape of x \(4, 1\), got shape \(4,\)'):
        get_integrator(name).integrate(state, 0.1, 3, drift=summed_drift)
    with pytest.raises(ValueError, match='shape of x'):
        get_integrator(name).step(state, 0.1, drift=lambda x, t: -x[:1])  # a later stage's output, broadcastable
    with pytest.raises(ValueError, match='got float'):
        get_integrator(name).step(state, 0.1, drift=lambda x, t: 0.0)


@pytest.mark.parametrize('name', ADAPTIVE)
@pytest.mark.parametrize('times', [{'t1': math.inf}, {'t1': -math.inf}, {'t1': math.nan},
                                   {'t0': math.nan, 't1': 1.0}, {'t0': math.inf, 't1': 1.0}])
def test_adaptive_integrate_refuses_non_finite_times(name, times):
    which = 't0' if 't0' in times else 't1'
    with pytest.raises(ValueError, match=f'{which} must be a finite number'):
        get_integrator(name, max_steps=50).integrate({'x': torch.ones(2, 1, dtype=F64)}, 0.1, drift=lambda x, t: -x,
                                                     **times)


@pytest.mark.parametrize('name', FIXED_STEP)
def test_fixed_step_integrate_refuses_non_finite_times_noise_and_states(name):
    integ, decay = get_integrator(name), lambda x, t: -x
    state = lambda x: {'x': x, 'p': torch.zeros_like(x)}
    ones = state(torch.ones(2, 1, dtype=F64))
    for t0 in (math.nan, math.inf):
        with pytest.raises(ValueError, match='t0 must be a finite number'): integ.integrate(ones, 0.1, 3, drift=decay, t0=t0)
    if name in ('euler_maruyama', 'heun', 'implicit_euler_maruyama'):
        with pytest.raises(ValueError, match='noise_scale must be a finite number'):
            integ.integrate(ones, 0.1, 3, drift=decay, noise_scale=math.nan)
    with pytest.raises(ValueError, match='NaN or inf appeared'):  # in the state, or in the Newton solve (implicit)
        integ.integrate(ones, 0.1, 3, drift=lambda x, t: x * math.inf)
    with pytest.raises(ValueError, match='state .*contains NaN or inf'):
        integ.integrate(state(torch.tensor([[1.0], [math.nan]], dtype=F64)), 0.1, 3, drift=decay)
    assert torch.isfinite(integ.integrate(ones, 0.1, 3, drift=decay)['x']).all()


def test_leapfrog_integrate_checks_the_momenta_too():
    "The force at the end of the last step only reaches p: a NaN there leaves x finite."
    force = lambda x, t: torch.where(x > 1.05, math.nan, -x)
    with pytest.raises(ValueError, match='NaN or inf appeared'):
        Leapfrog().integrate({'x': torch.ones(1, 1, dtype=F64), 'p': torch.ones(1, 1, dtype=F64)}, 0.1, 1, drift=force)


@pytest.mark.parametrize('name', FIXED_STEP)
def test_integrate_takes_one_step_size_for_the_batch(name):
    state = {'x': torch.ones(3, 2, dtype=F64), 'p': torch.zeros(3, 2, dtype=F64)}
    with pytest.raises(ValueError, match=r'one step_size for the whole batch .* shape \(3, 1\)'):
        get_integrator(name).integrate(state, torch.full((3, 1), 0.1, dtype=F64), 4, drift=lambda x, t: -x)
    for one in (torch.tensor(0.1, dtype=F64), torch.tensor([0.1], dtype=F64)):
        torch.testing.assert_close(get_integrator(name).integrate(state, one, 4, drift=lambda x, t: -x)['x'],
                                   get_integrator(name).integrate(state, 0.1, 4, drift=lambda x, t: -x)['x'])


@pytest.mark.parametrize('n_steps', [0, -1])
def test_leapfrog_steps_needs_at_least_one_step(n_steps):
    "With no step it used to hand back p after the opening half kick."
    with pytest.raises(ValueError, match='n_steps must be an int >= 1'):
        leapfrog_steps(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), 0.1, n_steps, lambda p: p,
                       lambda x, i: (-x, None))


def test_implicit_euler_maruyama_refuses_an_unconverged_newton_iterate():
    "-50 sin(x) at h = 0.1: I - h J is near singular for some chains; Newton wanders (it left a residual of 6.24)."
    x = torch.linspace(-2, 2, 8, dtype=F64).reshape(4, 2)
    steep = lambda x, t: -50 * torch.sin(x)
    with pytest.raises(RuntimeError, match=r"did not converge in newton_steps=20 iterations at step_size=0\.1 .*smaller "
                                           r"step_size, more newton_steps"):
        ImplicitEulerMaruyama().step({'x': x}, 0.1, drift=steep)
    new = ImplicitEulerMaruyama().integrate({'x': x}, 0.01, 10, drift=steep)['x']  # small steps converge
    assert torch.isfinite(new).all()


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_implicit_euler_maruyama_default_tolerance_follows_the_dtype(dtype):
    "float32 used to run all 20 Newton iterations (42 drift calls) per step: tol=1e-10 was out of its reach."
    calls = []
    def double_well(x, t): calls.append(1); return -4 * x * (x * x - 1)
    x = torch.linspace(-2, 2, 8, dtype=dtype).reshape(4, 2)
    new = ImplicitEulerMaruyama().step({'x': x}, 0.1, drift=double_well)['x']
    assert len(calls) < 20
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(new, x + 0.1 * double_well(new, None), rtol=0, atol=50 * eps)
    assert ImplicitEulerMaruyama().tol is None and ImplicitEulerMaruyama(tol=1e-6).tol == 1e-6
    with pytest.raises(ValueError, match='tol'): ImplicitEulerMaruyama(tol=0.0)
