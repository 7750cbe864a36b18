"Interpolants, flow / equilibrium matching losses and FlowSampler: closed forms, definitions, bad input, training."
import itertools
import math

import pytest
import torch
from torch import nn

from torchebm.interpolants import (CosineInterpolant, LinearInterpolant, VariancePreservingInterpolant,
                                   finite_difference_schedule, get_interpolant, safe_time_interval)
from torchebm.losses.flow_matching import (EquilibriumField, EquilibriumMatchingLoss, FlowMatchingLoss,
                                           LogitNormalTimeSampler, minibatch_ot_pairing)
from torchebm.samplers.flow import FlowSampler, log_standard_normal, nats_to_bits_per_dim

torch.set_num_threads(1)
F64 = torch.float64
INTERPOLANTS = [LinearInterpolant(), CosineInterpolant(), VariancePreservingInterpolant(),
                VariancePreservingInterpolant(sigma_min=0.5, sigma_max=5.0)]


def gen(seed=0): return torch.Generator().manual_seed(seed)


# -- interpolants ------------------------------------------------------------------------------------------
@pytest.mark.parametrize('interp', INTERPOLANTS, ids=repr)
def test_schedule_derivatives_match_finite_differences(interp):
    t = torch.linspace(0.005, 0.995, 199, dtype=F64)
    s = interp(t)
    d_alpha, d_sigma = finite_difference_schedule(interp, t, h=1e-6)
    torch.testing.assert_close(s.d_alpha, d_alpha, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s.d_sigma, d_sigma, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('interp', INTERPOLANTS[:3], ids=repr)
def test_boundaries_and_unit_interval(interp):
    s = interp(torch.tensor([0.0, 1.0], dtype=F64))
    torch.testing.assert_close(s.alpha[1], torch.tensor(1.0, dtype=F64))
    torch.testing.assert_close(s.sigma[1], torch.tensor(0.0, dtype=F64))
    assert s.sigma[0] > 0.999 and s.alpha[0] < 0.1
    t = torch.linspace(0, 1, 101, dtype=F64)
    s = interp(t)
    assert (s.alpha.diff() >= 0).all() and (s.sigma.diff() <= 0).all()  # monotone from noise to data


def test_vp_closed_form_and_variance_preservation():
    vp = VariancePreservingInterpolant(sigma_min=0.1, sigma_max=20.0)
    t = torch.tensor([0.0, 0.3, 0.7], dtype=F64)
    s_ = 1 - t
    alpha = torch.exp(-0.5 * (0.1 * s_ + 0.5 * s_ ** 2 * 19.9))  # exp(-1/2 int_0^s beta)
    sched = vp(t)
    torch.testing.assert_close(sched.alpha, alpha)
    torch.testing.assert_close(sched.alpha ** 2 + sched.sigma ** 2, torch.ones(3, dtype=F64))
    assert safe_time_interval(vp) == (0.0, 1.0 - 1e-5)
    assert torch.isinf(vp(torch.ones(1, dtype=F64)).d_sigma).all()


@pytest.mark.parametrize('interp', INTERPOLANTS, ids=repr)
def test_conversions_round_trip_on_images(interp):
    g = gen(1)
    x0, x1 = torch.randn(16, 2, 4, 4, generator=g, dtype=F64), torch.randn(16, 2, 4, 4, generator=g, dtype=F64)
    t = 0.05 + 0.9 * torch.rand(16, generator=g, dtype=F64)
    xt, ut = interp.interpolate(x0, x1, t)
    s = interp(t)
    torch.testing.assert_close(xt, s.alpha[:, None, None, None] * x1 + s.sigma[:, None, None, None] * x0)
    torch.testing.assert_close(interp.noise_from_velocity(ut, xt, t), x0)
    torch.testing.assert_close(interp.velocity_from_noise(x0, xt, t), ut)
    score = interp.score_from_noise(x0, t)
    torch.testing.assert_close(interp.velocity_from_score(score, xt, t), ut)
    torch.testing.assert_close(interp.noise_from_score(score, t), x0)


def test_interpolant_bad_input():
    lin, x = LinearInterpolant(), torch.zeros(4, 2)
    with pytest.raises(ValueError, match=r'\[0, 1\]'): lin.interpolate(x, x, torch.tensor([0., 0.5, 1.0, 1.01]))
    with pytest.raises(ValueError, match=r'\[0, 1\]'): lin.interpolate(x, x, torch.tensor([-0.1, 0.5, 1.0, 1.0]))
    with pytest.raises(ValueError, match='same shape'): lin.interpolate(x, torch.zeros(4, 3), torch.rand(4))
    with pytest.raises(ValueError, match=r'\[batch\]'): lin.interpolate(x, x, torch.rand(3))
    with pytest.raises(ValueError, match="expected one of"): get_interpolant('sigmoid')
    with pytest.raises(ValueError, match='sigma_max'): VariancePreservingInterpolant(sigma_min=2.0, sigma_max=1.0)
    assert isinstance(get_interpolant('variance_preserving'), VariancePreservingInterpolant)


# -- losses ------------------------------------------------------------------------------------------------
def _affine(x, t):
    return 0.5 * x - 1.0 + t[:, None]


@pytest.mark.parametrize('interp', INTERPOLANTS[:3], ids=repr)
@pytest.mark.parametrize('prediction', ['velocity', 'noise', 'score'])
def test_flow_matching_equals_definition(interp, prediction):
    g = gen(2)
    x1, x0 = torch.randn(32, 3, generator=g, dtype=F64), torch.randn(32, 3, generator=g, dtype=F64)
    t = 0.02 + 0.96 * torch.rand(32, generator=g, dtype=F64)
    s = interp(t)
    a, sg, da, dsg = (v[:, None] for v in (s.alpha, s.sigma, s.d_alpha, s.d_sigma))
    xt = a * x1 + sg * x0
    out = _affine(xt, t)
    expected = {'velocity': (out - (da * x1 + dsg * x0)) ** 2, 'noise': (out - x0) ** 2,
                'score': sg ** 2 * (out - (-x0 / sg)) ** 2}[prediction].mean()
    loss = FlowMatchingLoss(_affine, interpolant=interp, prediction=prediction)(x1, x0=x0, t=t)
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize('energy', [False, 'dot', 'l2'])
@pytest.mark.parametrize('interp', INTERPOLANTS[:3], ids=repr)
def test_equilibrium_matching_equals_definition(energy, interp):
    g = gen(3)
    x1, x0 = torch.randn(16, 2, generator=g, dtype=F64), torch.randn(16, 2, generator=g, dtype=F64)
    t = torch.rand(16, generator=g, dtype=F64) * 0.99
    W = torch.tensor([[0.5, -0.3], [0.2, 0.8]], dtype=F64)
    seen = []
    def net(x, t_model):
        seen.append(t_model)
        return torch.tanh(x @ W.T) + 0.1 * x
    s = interp(t)
    xt = s.alpha[:, None] * x1 + s.sigma[:, None] * x0
    u = s.d_alpha[:, None] * x1 + s.d_sigma[:, None] * x0
    c = 4.0 * torch.clamp((1 - t) / 0.2, max=1.0)
    if energy is False:
        field = net(xt, None)
    else:
        xg = xt.clone().requires_grad_(True)
        out = net(xg, None)
        e = (xg * out).sum(1) if energy == 'dot' else -0.5 * (out ** 2).sum(1)
        field, = torch.autograd.grad(e.sum(), xg)
    expected = ((field - (-u) * c[:, None]) ** 2).mean()
    loss = EquilibriumMatchingLoss(net, interpolant=interp, energy_parametrization=energy)(x1, x0=x0, t=t)
    torch.testing.assert_close(loss, expected)
    assert (seen[-1] == 0).all() and seen[-1].shape == (16,)  # the network is held at t = 0
    if interp.__class__ is LinearInterpolant:  # the paper's target (x0 - x1) c(t)
        torch.testing.assert_close(-u * c[:, None], (x0 - x1) * c[:, None])


def test_equilibrium_time_conditioned_receives_t():
    seen = []
    def net(x, t): seen.append(t); return x
    t = torch.tensor([0.1, 0.6])
    EquilibriumMatchingLoss(net, time_invariant=False)(torch.ones(2, 2), t=t)
    torch.testing.assert_close(seen[-1], t)


def test_losses_train_parameters_and_pass_model_kwargs():
    class Conditional(nn.Module):
        def __init__(self):
            super().__init__(); self.lin = nn.Linear(3, 2); self.emb = nn.Embedding(3, 2)
        def forward(self, x, t, y=None):
            return self.lin(torch.cat([x, t[:, None]], 1)) + self.emb(y)
    net, y = Conditional(), torch.tensor([0, 1, 2, 1])
    for loss_fn in (FlowMatchingLoss(net), EquilibriumMatchingLoss(net, energy_parametrization='dot')):
        net.zero_grad()
        loss_fn(torch.randn(4, 2), y=y, generator=gen()).backward()
        assert net.emb.weight.grad.abs().sum() > 0 and net.lin.weight.grad.abs().sum() > 0
        with pytest.raises(TypeError, match='not both'): loss_fn(torch.randn(4, 2), y=y, model_kwargs={'y': y})
    assert len(EquilibriumMatchingLoss(net).state_dict()) == len(net.state_dict())  # weights saved once


def test_ot_pairing_is_the_optimal_permutation():
    g = gen(4)
    x0, x1 = torch.randn(6, 2, generator=g), torch.randn(6, 2, generator=g) + 1
    paired = minibatch_ot_pairing(x0, x1)
    best = min(((x0[list(p)] - x1) ** 2).sum().item() for p in itertools.permutations(range(6)))
    assert math.isclose(((paired - x1) ** 2).sum().item(), best, rel_tol=1e-5)
    big0, big1 = torch.randn(128, 3, 2, generator=g), torch.randn(128, 3, 2, generator=g)
    assert ((minibatch_ot_pairing(big0, big1) - big1) ** 2).sum() < 0.7 * ((big0 - big1) ** 2).sum()
    with pytest.raises(ValueError, match='same shape'): minibatch_ot_pairing(x0, x1[:5])


def test_ot_pairing_inside_the_loss():
    seen = {}
    def net(x, t): seen['xt'] = x; return torch.zeros_like(x)
    x1, x0, t = torch.randn(64, 2, generator=gen(5)), torch.randn(64, 2, generator=gen(6)), torch.full((64,), 0.5)
    FlowMatchingLoss(net, ot_pairing=True)(x1, x0=x0, t=t)
    x0_used = 2 * seen['xt'] - x1
    torch.testing.assert_close(x0_used, minibatch_ot_pairing(x0, x1))


def test_time_samplers_and_interval():
    u = LogitNormalTimeSampler(loc=1.0, scale=0.5)(50000, generator=gen())
    assert abs(torch.logit(u).mean() - 1.0) < 0.01 and abs(torch.logit(u).std() - 0.5) < 0.01
    seen = {}
    def net(x, t): seen['t'] = t; return x
    FlowMatchingLoss(net, t_min=0.2, t_max=0.4)(torch.randn(5000, 1), generator=gen())
    assert seen['t'].min() >= 0.2 and seen['t'].max() <= 0.4 and abs(seen['t'].mean() - 0.3) < 0.005
    FlowMatchingLoss(net, interpolant='vp')(torch.randn(5000, 1), generator=gen())
    assert seen['t'].max() <= 1 - 1e-5


def test_loss_generator_reproducibility_and_bad_input():
    net = nn.Linear(2, 2)
    model = lambda x, t: net(x)
    x = torch.randn(32, 2, generator=gen())
    for loss_fn in (FlowMatchingLoss(model, time_sampler='logit_normal', ot_pairing=True),
                    EquilibriumMatchingLoss(model, interpolant='cosine')):
        assert loss_fn(x, generator=gen(9)).item() == loss_fn(x, generator=gen(9)).item()
        assert loss_fn(x, generator=gen(9)).item() != loss_fn(x, generator=gen(10)).item()
        with pytest.raises(ValueError, match=r'\[0, 1\]'): loss_fn(x, t=torch.full((32,), 1.5))
        with pytest.raises(ValueError, match=r'\[batch\]'): loss_fn(x, t=torch.rand(31))
        with pytest.raises(ValueError, match='x0 must be a tensor like x1'): loss_fn(x, x0=torch.zeros(32, 3))
        with pytest.raises(ValueError, match='NaN'): loss_fn(torch.full((4, 2), float('nan')))
    with pytest.raises(ValueError, match='prediction'): FlowMatchingLoss(model, prediction='x1')
    with pytest.raises(ValueError, match='time_sampler'): FlowMatchingLoss(model, time_sampler='beta')
    with pytest.raises(ValueError, match='interpolant'): EquilibriumMatchingLoss(model, interpolant='bridge')
    with pytest.raises(ValueError, match='energy_parametrization'): EquilibriumMatchingLoss(model, energy_parametrization='sum')
    with pytest.raises(ValueError, match='shaped like x'): FlowMatchingLoss(lambda x, t: x.sum(1))(x)
    with pytest.raises(TypeError, match='model'): FlowMatchingLoss(None)
    with pytest.raises(TypeError, match='ot_pairing'): FlowMatchingLoss(model, ot_pairing='yes')
    with pytest.raises(ValueError, match='dtype'): FlowMatchingLoss(_TimeMLP())(x.double())


# -- FlowSampler: closed forms -----------------------------------------------------------------------------
MU, S = torch.tensor([1.0, -2.0], dtype=F64), 0.3


def gaussian_velocity(x, t):
    t = t[:, None]
    return MU + (t * S ** 2 - (1 - t)) / (t ** 2 * S ** 2 + (1 - t) ** 2) * (x - t * MU)


@pytest.mark.parametrize('integrator,n_steps,tol', [('rk4', 40, 1e-6), ('dopri5', 10, 1e-4), ('heun', 200, 1e-3)])
def test_log_likelihood_closed_form(integrator, n_steps, tol):
    sampler = FlowSampler(gaussian_velocity, integrator=integrator, n_steps=n_steps, dtype=F64)
    x = MU + S * torch.randn(16, 2, generator=gen(), dtype=F64) * 1.5
    exact = torch.distributions.Normal(MU, S).log_prob(x).sum(1)
    torch.testing.assert_close(sampler.log_likelihood(x), exact, rtol=0, atol=tol)
    torch.testing.assert_close(sampler.bits_per_dim(x), -exact / (2 * math.log(2)), rtol=0, atol=tol)


def test_sampling_transports_gaussian_exactly():
    sampler = FlowSampler(gaussian_velocity, integrator='rk4', n_steps=40, dtype=F64)
    z = torch.randn(2000, 2, generator=gen(), dtype=F64)
    torch.testing.assert_close(sampler.sample(x=z), MU + S * z, rtol=0, atol=1e-6)  # the map is z -> mu + s z


def test_hutchinson_is_unbiased_on_a_linear_field():
    A = torch.tensor([[0.2, 0.9], [-0.6, -0.1]], dtype=F64)
    sampler = FlowSampler(lambda x, t: x @ A.T, integrator='rk4', n_steps=16)
    x = torch.tensor([[0.7, -1.2]], dtype=F64)
    exact = log_standard_normal(x @ torch.linalg.matrix_exp(-A).T) - A.trace()
    torch.testing.assert_close(sampler.log_likelihood(x), exact)
    est = sampler.log_likelihood(x.expand(20000, 2), divergence='hutchinson', generator=gen(3))
    assert est.std() > 0.2  # genuinely random per probe
    assert abs(est.mean() - exact) < 4 * est.std() / math.sqrt(20000)
    torch.testing.assert_close(nats_to_bits_per_dim(exact, 2), -exact / (2 * math.log(2)))


@pytest.mark.parametrize('prediction', ['noise', 'score'])
@pytest.mark.parametrize('mode', ['ode', 'sde'])
def test_predictions_and_sde_reach_the_target(prediction, mode):
    def noise(x, t):
        t = t[:, None]; return (1 - t) / (t ** 2 * S ** 2 + (1 - t) ** 2) * (x - t * MU)
    def score(x, t):
        t = t[:, None]; return -(x - t * MU) / (t ** 2 * S ** 2 + (1 - t) ** 2)
    sampler = FlowSampler(noise if prediction == 'noise' else score, prediction=prediction, mode=mode,
                          integrator='heun', n_steps=200, dtype=F64)
    out = sampler.sample(dim=2, n_samples=20000, generator=gen(11))
    torch.testing.assert_close(out.mean(0), MU, rtol=0, atol=0.02)
    torch.testing.assert_close(out.std(0), torch.full((2,), S, dtype=F64), rtol=0, atol=0.02)


def test_sampler_conventions_and_reproducibility():
    sampler = FlowSampler(gaussian_velocity, mode='sde', integrator='euler', n_steps=30, dtype=F64)
    a = sampler.sample(dim=2, n_samples=50, generator=gen(1))
    torch.testing.assert_close(a, sampler.sample(dim=2, n_samples=50, generator=gen(1)), rtol=0, atol=0)
    assert not torch.equal(a, sampler.sample(dim=2, n_samples=50, generator=gen(2)))
    traj, diag = sampler.sample(dim=2, n_samples=50, n_steps=30, thin=4, return_trajectory=True,
                                return_diagnostics=True, generator=gen(1))
    assert traj.shape == (50, 7, 2) and diag['mean'].shape == (7, 2) and diag['var'].shape == (7, 2)
    assert diag['t'].shape == (7,) and diag['t'].dtype == F64
    assert sampler.sample(dim=2, n_samples=3).dtype == F64


def test_sampler_bad_input():
    with pytest.raises(ValueError, match='mode'): FlowSampler(gaussian_velocity, mode='langevin')
    with pytest.raises(ValueError, match='integrator'): FlowSampler(gaussian_velocity, integrator='midpoint')
    with pytest.raises(ValueError, match='Hamiltonian'): FlowSampler(gaussian_velocity, integrator='leapfrog')
    with pytest.raises(ValueError, match='stochastic'): FlowSampler(gaussian_velocity, mode='sde', integrator='dopri5')
    with pytest.raises(ValueError, match='diffusion_form'): FlowSampler(gaussian_velocity, diffusion_form='linear')
    with pytest.raises(ValueError, match='t_eps'): FlowSampler(gaussian_velocity, t_eps=0.6)
    with pytest.raises(ValueError, match='n_steps'): FlowSampler(gaussian_velocity, n_steps=0)
    sampler = FlowSampler(gaussian_velocity, dtype=F64)
    with pytest.raises(ValueError, match=r'\[batch, \*dim\]'): sampler.sample(x=torch.zeros(3, dtype=F64))
    with pytest.raises(ValueError, match='shaped like x'): FlowSampler(lambda x, t: x[:, 0]).sample(dim=2, n_samples=4)
    with pytest.raises(ValueError, match='NaN or inf'):
        FlowSampler(lambda x, t: 1e30 * x).sample(dim=2, n_samples=4)
    with pytest.raises(ValueError, match='hutchinson'): sampler.log_likelihood(torch.zeros(2, 2, dtype=F64), divergence='rademacher')


class _ModeRecorder(nn.Module):
    "The exact Gaussian velocity that records `self.training` (its own and a child's) at every call."
    def __init__(self):
        super().__init__()
        self.child, self.modes, self.broken = nn.Identity(), [], False
    def forward(self, x, t):
        self.modes.append((self.training, self.child.training))
        return x[:, :1] if self.broken else gaussian_velocity(self.child(x), t)


@pytest.mark.parametrize('start_training', [True, False])
def test_sampling_and_likelihoods_run_in_eval_mode_and_restore_it(start_training):
    from torchebm.samplers.likelihood import flow_likelihood
    net = _ModeRecorder().train(start_training)
    for integrator in ('heun', 'dopri5'):
        sampler = FlowSampler(net, integrator=integrator, n_steps=4, dtype=F64)
        x = torch.randn(5, 2, generator=gen(), dtype=F64)
        calls = [lambda: sampler.sample(x=x), lambda: sampler.log_likelihood(x),
                 lambda: sampler.log_likelihood(x, divergence='hutchinson', generator=gen(1)),
                 lambda: sampler.bits_per_dim(x), lambda: flow_likelihood(sampler, x)]
        if integrator == 'heun':
            calls.append(lambda: sampler.sample(x=x, return_trajectory=True, return_diagnostics=True))
        for call in calls:
            net.modes.clear()
            call()
            assert net.modes and set(net.modes) == {(False, False)}
            assert net.training == start_training and net.child.training == start_training
    net.broken = True
    for call in (lambda: sampler.sample(x=x), lambda: sampler.log_likelihood(x)):
        with pytest.raises(ValueError, match='shaped like x'):  # the mode comes back when the model fails, too
            call()
        assert net.training == start_training and net.child.training == start_training


def test_transformer_label_dropout_is_off_while_sampling():
    """A DiT that drops every label in training mode (class_dropout_prob=1) still samples each class after a
    training step: the sampler switches it to eval mode. Fails when sampling runs in training mode."""
    from torchebm.models import ConditionalTransformer2D
    torch.manual_seed(0)
    net = ConditionalTransformer2D(in_channels=1, input_size=4, patch_size=2, embed_dim=16, depth=1, num_heads=2,
                                   num_classes=3, class_dropout_prob=1.0)
    with torch.no_grad():
        for p in net.parameters(): p.add_(0.3 * torch.randn_like(p))  # away from the zero (label-blind) init
    sampler = FlowSampler(net, integrator='euler', n_steps=3)
    x = torch.randn(4, 1, 4, 4, generator=gen())
    by_label = {k: sampler.sample(x=x, model_kwargs={'y': torch.full((4,), k)}) for k in range(3)}
    assert net.training
    assert not torch.allclose(by_label[0], by_label[1])   # labels reach the model
    net.eval()
    torch.testing.assert_close(by_label[2], sampler.sample(x=x, model_kwargs={'y': torch.full((4,), 2)}))
    null = sampler.sample(x=x, model_kwargs={'y': torch.full((4,), net.null_label)})
    assert not torch.allclose(by_label[2], null)        # what training mode would have sampled for every label


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_float32():
    mu = MU.float().cuda()
    def velocity(x, t):
        t = t[:, None]; return mu + (t * S ** 2 - (1 - t)) / (t ** 2 * S ** 2 + (1 - t) ** 2) * (x - t * mu)
    sampler = FlowSampler(velocity, integrator='rk4', n_steps=40, device='cuda', dtype=torch.float32)
    out = sampler.sample(dim=2, n_samples=4096, generator=torch.Generator('cuda').manual_seed(0))
    assert out.is_cuda and out.dtype == torch.float32
    torch.testing.assert_close(out.mean(0), mu, rtol=0, atol=0.03)
    x = mu + S * torch.randn(8, 2, device='cuda')
    exact = torch.distributions.Normal(mu, S).log_prob(x).sum(1)
    torch.testing.assert_close(sampler.log_likelihood(x), exact, rtol=0, atol=1e-3)
    net = nn.Linear(2, 2).cuda()
    loss = FlowMatchingLoss(lambda x, t: net(x), ot_pairing=True)(x, generator=torch.Generator('cuda').manual_seed(0))
    loss.backward()
    assert net.weight.grad is not None


# -- training ----------------------------------------------------------------------------------------------
CENTERS = torch.tensor([[-2.0, -2.0], [-2.0, 2.0], [2.0, -2.0], [2.0, 2.0]])


def _mixture(n, g):
    return CENTERS[torch.randint(0, 4, (n,), generator=g)] + 0.3 * torch.randn(n, 2, generator=g)


class _TimeMLP(nn.Module):
    def __init__(self, hidden=64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 2))
    def forward(self, x, t): return self.net(torch.cat([x, t[:, None]], 1))


def _train(loss_fn, params, g, steps):
    opt = torch.optim.Adam(params, lr=3e-3)
    data = _mixture(8192, g)
    for _ in range(steps):
        loss = loss_fn(data[torch.randint(0, 8192, (256,), generator=g)], generator=g)
        opt.zero_grad(); loss.backward(); opt.step()


def _check_mixture(samples):
    nearest = torch.cdist(samples, CENTERS).argmin(1)
    share = nearest.bincount(minlength=4) / len(samples)
    assert (share > 0.15).all() and (share < 0.35).all(), share            # every mode, roughly balanced
    assert samples.mean(0).abs().max() < 0.3, samples.mean(0)               # mean ~ 0
    assert (samples.std(0) - _mixture(20000, gen(9)).std(0)).abs().max() < 0.3, samples.std(0)  # spread ~ 2.02
    assert (samples - CENTERS[nearest]).norm(dim=1).median() < 0.6          # on the modes, not between them


@pytest.mark.slow
def test_flow_matching_learns_a_gaussian_mixture():
    torch.manual_seed(0)
    g = gen(0)
    net = _TimeMLP()
    _train(FlowMatchingLoss(net, ot_pairing=True), net.parameters(), g, 500)
    with torch.no_grad():
        samples = FlowSampler(net, integrator='heun', n_steps=40).sample(dim=2, n_samples=4000, generator=g)
    _check_mixture(samples)


@pytest.mark.slow
def test_equilibrium_matching_energy_is_sampled_by_descent_and_langevin():
    """EqM on the mixture: descent covers every mode, and the dot energy is the same landscape.

    The equilibria of the EqM objective lie *outside* a spread-out mode (at a mode centre m the target averages to
    about -m E[c(t)], since for t near 1 the noise x0 is nearly independent of x_t), so the samples are checked for
    coverage, not for the data's spread or centre."""
    from torchebm.models import VectorFieldEnergy
    from torchebm.samplers.langevin import LangevinDynamics
    torch.manual_seed(0)
    g = gen(1)
    net = nn.Sequential(nn.Linear(2, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 2))
    field_net = lambda x, t: net(x)
    loss_fn = EquilibriumMatchingLoss(field_net, energy_parametrization='dot')
    _train(loss_fn, net.parameters(), g, 600)
    start = torch.randn(2000, 2, generator=g) * 2
    descent = FlowSampler(loss_fn.field, negate_velocity=True, integrator='euler').sample(x=start, n_steps=200)
    nearest = torch.cdist(descent, CENTERS).argmin(1)
    share = nearest.bincount(minlength=4) / 2000
    assert (share > 0.15).all() and (share < 0.35).all(), share
    assert (descent.abs() > 1.0).all(1).float().mean() > 0.95  # in a mode's quadrant, not stuck between modes
    # the same network as an energy: its gradient is the trained field, and Langevin stays in the modes
    energy = VectorFieldEnergy(field_net, energy_type='dot', t=0.0)
    torch.testing.assert_close(energy.gradient(start[:5]), loss_fn.field(start[:5]))
    assert energy(descent).mean() < energy(start).mean()
    out = LangevinDynamics(energy, step_size=0.01, noise_scale=0.1).sample(x=descent, n_steps=200, generator=g)
    nearest_after = torch.cdist(out, CENTERS).argmin(1)
    assert (nearest_after == nearest).float().mean() > 0.95


def _exact_eqm_field(centers, std, loss, n_quad=100):
    """The minimiser of the EqM `loss` (linear path, uniform t) for data `sum_k N(centers_k, std^2 I) / K`:
    E[c(t)(x0 - x1) | x_t = x], with t integrated by the midpoint rule. Given t and the component k, x0, x1 and
    x_t = t x1 + (1 - t) x0 are jointly Gaussian, and x_t ~ N(t m_k, var I) with var = t^2 std^2 + (1 - t)^2."""
    t = loss.t_min + (loss.t_max - loss.t_min) * (torch.arange(n_quad, dtype=F64) + 0.5) / n_quad
    c, sigma, var = loss.decay(t), 1 - t, t ** 2 * std ** 2 + (1 - t) ** 2
    def field(x, t_unused=None):
        diff = x[:, None, None] - t[None, :, None, None] * centers[None, None]             # [B, T, K, d]
        log_w = -0.5 * diff.square().sum(-1) / var[:, None] - 0.5 * x.shape[1] * var.log()[:, None]
        w = torch.softmax(log_w.flatten(1), 1).view_as(log_w) * c[:, None]                 # p(t, k | x) c(t)
        resid = diff / var[:, None, None]
        noise = sigma[:, None, None] * resid                                                 # E[x0 | x, t, k]
        data = centers[None, None] + (t * std ** 2)[:, None, None] * resid                   # E[x1 | x, t, k]
        return torch.einsum('btk,btkd->bd', w, noise - data)
    return field


@pytest.mark.slow
def test_exact_eqm_field_and_where_its_descent_ends():
    """The closed-form EqM minimiser is orthogonal to x in the loss (a 5% error is not), and descent on it for
    tau = 1 ends *outside* the modes: at radius 2.25 for the tutorial's narrow ring of radius 2 and far out for
    wide modes, the displacement the tutorial describes (the data points are equilibria only for isolated points)."""
    loss = EquilibriumMatchingLoss(lambda x, t: x)
    g = gen(0)
    data = CENTERS.double()[torch.randint(0, 4, (20000,), generator=g)] + 0.3 * torch.randn(20000, 2, generator=g, dtype=F64)
    field = _exact_eqm_field(CENTERS.double(), 0.3, loss)
    def x_correlation(f, delta=0.1):  # E[(f(x_t) - target) . x_t] from the loss: (L(f + d x) - L(f - d x)) / 4d
        plus, minus = (EquilibriumMatchingLoss(lambda x, t: f(x) + s * delta * x)(data, generator=gen(5)) for s in (1, -1))
        return ((plus - minus) / (4 * delta)).item()
    assert abs(x_correlation(field)) < 0.05
    assert abs(x_correlation(lambda x: 1.05 * field(x))) > 0.1
    descend = lambda f, n: FlowSampler(f, negate_velocity=True, integrator='euler').sample(
        x=torch.randn(n, 2, generator=g, dtype=F64), n_steps=100)
    assert descend(field, 300).norm(dim=1).median() > 3.3                       # the modes sit at radius 2.83
    angles = torch.arange(8, dtype=F64) * math.pi / 4
    ring = _exact_eqm_field(2.0 * torch.stack([angles.cos(), angles.sin()], 1), 0.2, loss)
    assert 2.15 < descend(ring, 300).norm(dim=1).median() < 2.4                 # the ring has radius 2


@pytest.mark.slow
def test_equilibrium_matching_descent_reproduces_the_tutorial_mixture():
    """The tutorial's EqM run: descent for tau = 1 recovers the mean, spread and modes of 8 narrow Gaussians; 10x
    longer descent contracts the modes."""
    from torchebm.datasets import GaussianMixtureDataset
    from torchebm.models import VectorFieldEnergy
    from torchebm.samplers import GradientDescentSampler
    torch.manual_seed(0)
    dataset = GaussianMixtureDataset(n_samples=8192, n_components=8, std=0.2, radius=2.0, seed=0)
    data, centers = dataset.get_data(), dataset.centers.float()
    net = nn.Sequential(nn.Linear(2, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(),
                        nn.Linear(128, 2))
    loss_fn, g = EquilibriumMatchingLoss(lambda x, t: net(x)), gen(0)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 3000)
    for _ in range(3000):
        loss = loss_fn(data[torch.randint(0, len(data), (256,), generator=g)], generator=g)
        opt.zero_grad(); loss.backward(); opt.step(); schedule.step()
    noise = torch.randn(4000, 2, generator=gen(1))
    samples = FlowSampler(loss_fn.field, negate_velocity=True, integrator='euler').sample(x=noise, n_steps=100)
    nearest = torch.cdist(samples, centers).argmin(1)
    share = nearest.bincount(minlength=8) / len(samples)
    distance = lambda s: (s - centers[torch.cdist(s, centers).argmin(1)]).norm(dim=1).median()
    assert samples.mean(0).abs().max() < 0.15 and (samples.std(0) - data.std(0)).abs().max() < 0.15
    assert share.min() > 0.07 and share.max() < 0.18, share
    assert distance(samples) < 1.25 * distance(data)                              # data: 0.24
    descent = GradientDescentSampler(VectorFieldEnergy(net, energy_type='implicit', t=None), step_size=0.01)
    torch.testing.assert_close(descent.sample(x=noise, n_steps=100), samples, rtol=1e-5, atol=1e-5)
    assert distance(descent.sample(x=noise, n_steps=1000)) < 0.9 * distance(samples)


def _gaussian_marginal_velocity(interp):
    "The exact marginal velocity of `interp` for data N(MU, S^2 I): x_t ~ N(alpha MU, (alpha^2 S^2 + sigma^2) I)."
    def velocity(x, t):
        s = interp(t.clamp(max=1 - 1e-7))  # VP's sigma * d_sigma is 0 * inf at t = 1 (its limit is finite)
        a, sg, da, dsg = (v[:, None] for v in (s.alpha, s.sigma, s.d_alpha, s.d_sigma))
        var = a ** 2 * S ** 2 + sg ** 2
        return da * MU + (a * da * S ** 2 + sg * dsg) / var * (x - a * MU)
    return velocity


@pytest.mark.parametrize('interp', INTERPOLANTS[:3], ids=repr)
def test_loss_minimiser_is_the_sampled_field_for_every_interpolant(interp):
    """The loss's target and the sampler's convention agree: the exact marginal velocity minimises the loss
    (a constant shift of 0.1 costs exactly 0.01 more) and its ODE carries N(0, I) onto the data law."""
    velocity = _gaussian_marginal_velocity(interp)
    data = MU + S * torch.randn(40000, 2, generator=gen(4), dtype=F64)
    loss_fn = FlowMatchingLoss(velocity, interpolant=interp, t_max=0.999)
    best = loss_fn(data, generator=gen(5))
    shifted = FlowMatchingLoss(lambda x, t: velocity(x, t) + 0.1, interpolant=interp, t_max=0.999)(data, generator=gen(5))
    assert abs((shifted - best).item() - 0.01) < 3e-3
    out = FlowSampler(velocity, interpolant=interp, integrator='rk4', n_steps=200).sample(
        x=torch.randn(20000, 2, generator=gen(6), dtype=F64))
    alpha0 = interp(torch.zeros(1, dtype=F64)).alpha  # VP starts at alpha(0) ~ 0.006, not exactly at noise
    torch.testing.assert_close(out.mean(0), MU, rtol=0, atol=0.02 + 3 * alpha0.item())
    torch.testing.assert_close(out.std(0), torch.full((2,), S, dtype=F64), rtol=0, atol=0.02)


# ---- issue 15: couplings in the losses, stochastic interpolants, energy matching ----
from torchebm.core.energies import MLP, EnergyModel
from torchebm.couplings import ExactOTCoupling, get_coupling
from torchebm.interpolants import StochasticInterpolant
from torchebm.losses.flow_matching import EnergyMatchingLoss


@pytest.mark.parametrize('coupling', ['exact', 'sinkhorn', 'unbalanced_sinkhorn'])
def test_flow_loss_uses_the_coupling_it_is_given(coupling):
    "The loss on explicit noise equals the loss on the coupling's own pairing drawn with the same generator."
    zero = lambda x, t: torch.zeros_like(x)
    x1 = torch.randn(32, 2, generator=torch.Generator().manual_seed(0)) + 2
    x0 = torch.randn(32, 2, generator=torch.Generator().manual_seed(1))
    t = torch.full((32,), 0.5)
    loss = FlowMatchingLoss(zero, coupling=coupling)(x1, x0=x0, t=t, generator=torch.Generator().manual_seed(2))
    paired = get_coupling(coupling)(x0, x1, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(loss, (x1 - paired).square().mean())
    legacy = FlowMatchingLoss(zero, ot_pairing=True)(x1, x0=x0, t=t)
    torch.testing.assert_close(legacy, FlowMatchingLoss(zero, coupling=ExactOTCoupling())(x1, x0=x0, t=t))


def test_stochastic_interpolant_flow_reaches_the_target():
    """Velocity training on a stochastic interpolant: the minimiser's ODE transports N(0, I) to the data. With
    Gaussian data the exact marginal velocity is affine, E[u | x] = m(t) + k(t)(x - alpha mu); integrating it
    (Heun, 200 steps) carries 20000 noise samples to N(mu, s^2): mean and std within 4 SE + 0.01."""
    si = StochasticInterpolant('linear', gamma='quadratic', gamma_scale=0.8)
    mu, s = torch.tensor([1.5, -0.5], dtype=torch.float64), 0.6

    def velocity(x, t):
        sch, (gamma, d_gamma) = si(t), si.latent_schedule(t)
        var = sch.alpha ** 2 * s * s + sch.sigma ** 2 + gamma ** 2
        cov = sch.d_alpha * sch.alpha * s * s + sch.d_sigma * sch.sigma + d_gamma * gamma
        return sch.d_alpha[:, None] * mu + (cov / var)[:, None] * (x - sch.alpha[:, None] * mu)

    g = torch.Generator().manual_seed(0)
    data = mu + s * torch.randn(4000, 2, generator=g, dtype=torch.float64)
    fm = FlowMatchingLoss(velocity, interpolant=si)
    best = fm(data, generator=torch.Generator().manual_seed(1))
    off = FlowMatchingLoss(lambda x, t: velocity(x, t) + 0.1, interpolant=si)(data, generator=torch.Generator().manual_seed(1))
    # the closed form is the loss's minimiser: the excess is 0.01 plus a cross term 0.2 * mean(residual), whose
    # standard error is 0.2 * rms(residual) / sqrt(elements)
    assert abs(float(off - best) - 0.01) < 4 * 0.2 * math.sqrt(float(best) / data.numel())
    x = torch.randn(20000, 2, generator=g, dtype=torch.float64)
    h = 1.0 / 200
    for i in range(200):
        t0, t1 = torch.full((len(x),), i * h, dtype=torch.float64), torch.full((len(x),), (i + 1) * h, dtype=torch.float64)
        k1 = velocity(x, t0); k2 = velocity(x + h * k1, t1)
        x = x + 0.5 * h * (k1 + k2)
    assert (x.mean(0) - mu).abs().max() < 4 * s / 20000 ** 0.5 + 0.01
    assert (x.std(0) - s).abs().max() < 4 * s / (2 * 20000) ** 0.5 + 0.01


def test_energy_matching_warm_up_flow_lands_on_the_data_and_bad_input():
    "Transport term only: 200 Adam steps; 20 Euler steps of -grad V from noise land within 0.3 of the data mean."
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    mu = torch.tensor([2., -1.])
    data = mu + 0.5 * torch.randn(8000, 2, generator=g)
    potential = EnergyModel(MLP(2, (32, 32), 1, activation='softplus'))
    em = EnergyMatchingLoss(potential)
    opt = torch.optim.Adam(potential.parameters(), lr=5e-3)
    for _ in range(200):
        loss = em(data[torch.randint(0, len(data), (128,), generator=g)], generator=g)
        opt.zero_grad(); loss.backward(); opt.step()
    x = torch.randn(2000, 2, generator=g)
    for _ in range(20): x = x - 0.05 * potential.gradient(x)
    assert (x.mean(0) - mu).norm() < 0.3
    with pytest.raises(ValueError, match='negatives'): em(data[:4], negatives=torch.zeros(4, 3))
    with pytest.raises(ValueError, match='n_sampler_steps'): EnergyMatchingLoss(potential, n_sampler_steps=0)
    with pytest.raises(TypeError, match='callable energy'): EnergyMatchingLoss(None)


# ---- audit: what the constructor refuses, the likelihood's integrator, non-finite input ----
from torchebm.samplers.likelihood import flow_likelihood


@pytest.mark.parametrize('integrator', ['bosh3', 'dopri8', 'adaptive_heun', 'dopri5', 'rk4'])
def test_sde_mode_with_an_ode_only_integrator_is_refused_on_construction(integrator):
    with pytest.raises(ValueError, match=r"mode='sde' needs a stochastic integrator .* integrates ODEs only"):
        FlowSampler(gaussian_velocity, mode='sde', integrator=integrator)


@pytest.mark.parametrize('prediction, mode', [('score', 'ode'), ('noise', 'ode'), ('velocity', 'sde'), ('score', 'sde')])
def test_a_stochastic_interpolant_needs_a_velocity_ode_on_construction(prediction, mode):
    with pytest.raises(ValueError, match=f"prediction='velocity' and mode='ode', got prediction='{prediction}', mode='{mode}'"):
        FlowSampler(gaussian_velocity, interpolant='stochastic', prediction=prediction, mode=mode, integrator='euler')
    ode = FlowSampler(gaussian_velocity, interpolant='stochastic', integrator='euler', n_steps=4)
    assert ode.sample(dim=2, n_samples=2, generator=gen()).shape == (2, 2)


def test_log_likelihood_with_the_implicit_integrator_says_why_it_cannot():
    sampler = FlowSampler(gaussian_velocity, integrator='implicit_euler_maruyama', n_steps=3)
    with pytest.raises(ValueError, match='explicit integrator'): sampler.log_likelihood(torch.ones(3, 2, dtype=F64))
    assert sampler.sample(x=torch.ones(3, 2, dtype=F64)).shape == (3, 2)  # sampling with it works


def test_non_finite_input_is_reported_as_the_input():
    sampler = FlowSampler(gaussian_velocity, n_steps=3, dtype=F64)
    x = torch.ones(2, 2, dtype=F64)
    for bad in (math.nan, math.inf):
        x[1, 1] = bad
        with pytest.raises(ValueError, match='^x contains NaN or inf values$'): sampler.sample(x=x)
        with pytest.raises(ValueError, match='^x contains NaN or inf values$'): sampler.log_likelihood(x)
        with pytest.raises(ValueError, match='^x contains NaN or inf values$'):
            flow_likelihood(sampler, x, n_levels=17)
