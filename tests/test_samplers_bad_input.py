"Bad input to the samplers fails early and clearly; NaN/inf appearing in a chain is reported with the chains."
import warnings

import pytest
import torch

from torchebm.core.base import BaseModel, BaseScheduler
from torchebm.samplers import (GradientDescentSampler, HamiltonianMonteCarlo, LangevinDynamics, NesterovSampler,
                               NoUTurnSampler)

F64 = torch.float64


class Gaussian2D(BaseModel):
    def __init__(self):
        super().__init__()
        self.register_buffer('mean', torch.zeros(2, dtype=F64))

    @property
    def dim(self): return 2

    def forward(self, x): return 0.5 * ((x - self.mean) ** 2).sum(-1)


class Steep(BaseModel):
    "E = x^4: explicit schemes blow up from far away with a large step."
    def forward(self, x): return (x ** 4).sum(-1)


SAMPLERS = {'langevin': lambda m, **k: LangevinDynamics(m, **k), 'mala': lambda m, **k: LangevinDynamics(m, metropolis=True, **k),
            'hmc': lambda m, **k: HamiltonianMonteCarlo(m, **k), 'gd': lambda m, **k: GradientDescentSampler(m, **k),
            'nesterov': lambda m, **k: NesterovSampler(m, **k)}


@pytest.fixture(params=sorted(SAMPLERS))
def make(request): return SAMPLERS[request.param]


def test_negative_n_steps(make):
    with pytest.raises(ValueError, match='n_steps'):
        make(Gaussian2D()).sample(x=torch.zeros(3, 2, dtype=F64), n_steps=-1)
    with pytest.raises(TypeError, match='n_steps'):
        make(Gaussian2D()).sample(x=torch.zeros(3, 2, dtype=F64), n_steps=2.5)


def test_zero_steps_return_the_start(make):
    x = torch.randn(3, 2, dtype=F64)
    out, diag = make(Gaussian2D()).sample(x=x, n_steps=0, return_trajectory=True, return_diagnostics=True)
    assert out.shape == (3, 0, 2) and diag['energy'].shape == (0, 3)
    assert torch.equal(make(Gaussian2D()).sample(x=x, n_steps=0), x)


@pytest.mark.parametrize('bad', [0.0, -1e-3, float('nan'), float('inf')])
def test_non_positive_step_size(make, bad):
    with pytest.raises(ValueError, match='step_size'):
        make(Gaussian2D(), step_size=bad)


def test_step_size_of_the_wrong_type(make):
    with pytest.raises(TypeError, match='step_size'):
        make(Gaussian2D(), step_size='0.1')


def test_schedule_that_turns_non_positive(make):
    class Decay(BaseScheduler):
        def compute_value(self, step): return self.start_value - 0.01 * step
    with pytest.raises(ValueError, match='at step 10'):
        make(Gaussian2D(), step_size=Decay(0.1)).sample(x=torch.zeros(3, 2, dtype=F64), n_steps=20)


def test_thin_and_n_samples(make):
    with pytest.raises(ValueError, match='thin'):
        make(Gaussian2D()).sample(x=torch.zeros(3, 2, dtype=F64), thin=0)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', DeprecationWarning)
        with pytest.raises(ValueError, match='n_samples'):
            make(Gaussian2D()).sample(n_samples=0)


def test_wrong_shape_for_the_model(make):
    with pytest.raises(ValueError, match=r'event shape \(3,\)'):
        make(Gaussian2D()).sample(x=torch.zeros(4, 3, dtype=F64), n_steps=1)
    with pytest.raises(ValueError, match=r'\[batch, \*dim\]'):
        make(Gaussian2D()).sample(x=torch.zeros(4, dtype=F64), n_steps=1)
    with pytest.raises(TypeError, match='torch.Tensor'):
        make(Gaussian2D()).sample(x=[[0.0, 0.0]], n_steps=1)
    with pytest.raises(TypeError, match='floating-point'):
        make(Gaussian2D()).sample(x=torch.zeros(4, 2, dtype=torch.int64), n_steps=1)


def test_x_with_another_dtype_or_device(make):
    with pytest.raises(ValueError, match='dtype'):
        make(Gaussian2D()).sample(x=torch.zeros(4, 2, dtype=torch.float32), n_steps=1)
    with pytest.raises(ValueError, match='is on meta but the model is on cpu'):
        make(Gaussian2D()).sample(x=torch.zeros(4, 2, dtype=F64, device='meta'), n_steps=1)


def test_non_finite_start(make):
    with pytest.raises(ValueError, match='NaN or inf'):
        make(Gaussian2D()).sample(x=torch.tensor([[0.0, float('inf')]], dtype=F64), n_steps=1)


def test_missing_model_and_both_models(make):
    with pytest.raises(ValueError, match='no model'):
        make(None).sample(x=torch.zeros(2, 2), n_steps=1)
    with pytest.raises(TypeError, match='not both'):
        make(Gaussian2D(), energy_function=Gaussian2D())
    with pytest.raises(TypeError, match='callable'):
        make(42)


@pytest.mark.parametrize('name', ['rk4', 'dopri5', 'dopri8', 'bosh3', 'adaptive_heun', 'leapfrog'])
def test_langevin_refuses_deterministic_integrators(name):
    with pytest.raises(ValueError, match='stochastic integrator'):
        LangevinDynamics(Gaussian2D(), integrator=name)


def test_unknown_integrator_lists_the_valid_ones():
    with pytest.raises(ValueError, match="integrator='verlet' is not valid; expected one of"):
        LangevinDynamics(Gaussian2D(), integrator='verlet')
    with pytest.raises(ValueError, match='euler_maruyama'):
        LangevinDynamics(Gaussian2D(), integrator='heun', metropolis=True)


def test_langevin_option_conflicts():
    with pytest.raises(ValueError, match='metropolis=True'):
        LangevinDynamics(Gaussian2D(), adapt_step_size=True)
    with pytest.raises(ValueError, match='noise_scale'):
        LangevinDynamics(Gaussian2D(), noise_scale=0.0, metropolis=True)
    with pytest.raises(ValueError, match='noise_scale'):
        LangevinDynamics(Gaussian2D(), noise_scale=-1.0)
    with pytest.raises(ValueError, match='target_accept'):
        LangevinDynamics(Gaussian2D(), metropolis=True, adapt_step_size=True, target_accept=0.0)


@pytest.mark.parametrize('mass, match', [(-1.0, 'mass'), (torch.tensor([1.0, 0.0], dtype=F64), 'positive definite'),
                                         (torch.tensor([[1.0, 3.0], [3.0, 1.0]], dtype=F64), 'positive definite'),
                                         (torch.tensor([[1.0, 0.2], [0.0, 1.0]], dtype=F64), 'symmetric')])
def test_hmc_bad_mass(mass, match):
    with pytest.raises(ValueError, match=match):
        HamiltonianMonteCarlo(Gaussian2D(), mass=mass)


def test_hmc_mass_of_the_wrong_size_and_bad_options():
    with pytest.raises(ValueError, match='mass has 3 entries'):
        HamiltonianMonteCarlo(Gaussian2D(), mass=torch.ones(3, dtype=F64)).sample(x=torch.zeros(2, 2, dtype=F64), n_steps=1)
    with pytest.raises(ValueError, match='n_leapfrog_steps'):
        HamiltonianMonteCarlo(Gaussian2D(), n_leapfrog_steps=0)
    with pytest.raises(ValueError, match='n_adapt_steps'):
        HamiltonianMonteCarlo(Gaussian2D(), n_adapt_steps=-5)
    with pytest.raises(ValueError, match='momentum'):
        NesterovSampler(Gaussian2D(), momentum=1.5)


@pytest.mark.parametrize('name', ['langevin', 'gd', 'nesterov'])
def test_nan_appearing_in_the_chain_names_the_chains(name):
    x = torch.zeros(6, 1, dtype=F64)
    x[[1, 4]] = 30.0  # only these chains are far enough out to diverge
    sampler = SAMPLERS[name](Steep(), step_size=0.01, nan_policy='raise')
    with pytest.raises(ValueError, match=r'2 of 6 chains \(chains \[1, 4\]\) between steps 1 and 100'):
        sampler.sample(x=x, n_steps=250)


@pytest.mark.parametrize('name', ['langevin', 'gd', 'nesterov'])
def test_nan_by_default_warns_once_and_returns_the_chains_as_they_are(name):
    x = torch.zeros(6, 1, dtype=F64)
    x[[1, 4]] = 30.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        out = SAMPLERS[name](Steep(), step_size=0.01).sample(x=x, n_steps=250)
    assert len(caught) == 1 and issubclass(caught[0].category, RuntimeWarning)
    assert 'chains [1, 4]) between steps 1 and 100' in str(caught[0].message)
    assert (~torch.isfinite(out)).flatten().tolist() == [False, True, False, False, True, False]


def test_unknown_nan_policy(make):
    with pytest.raises(ValueError, match="nan_policy='ignore' is not valid"):
        make(Gaussian2D(), nan_policy='ignore')


def test_nan_reported_in_the_last_window():
    x = torch.zeros(3, 1, dtype=F64)
    x[2] = 30.0
    with pytest.raises(ValueError, match=r'chains \[2\]\) between steps 1 and 40'):
        LangevinDynamics(Steep(), step_size=0.01, nan_policy='raise').sample(x=x, n_steps=40)


def test_metropolis_samplers_reject_non_finite_proposals_instead_of_returning_them():
    class Walled(BaseModel):
        "A Gaussian whose energy is NaN outside |x| < 1.5 (e.g. a network that overflows)."
        def forward(self, x):
            e = 0.5 * (x ** 2).sum(-1)
            return torch.where(x.abs().amax(-1) < 1.5, e, torch.full_like(e, float('nan')))
    x = torch.zeros(200, 2, dtype=F64)
    for sampler in (LangevinDynamics(Walled(), step_size=0.5, metropolis=True),
                    HamiltonianMonteCarlo(Walled(), step_size=0.5, n_leapfrog_steps=4)):
        out, d = sampler.sample(x=x, n_steps=50, return_diagnostics=True)
        assert torch.isfinite(out).all() and (out.abs() < 1.5).all()
        assert d['acceptance_rate'].mean() < 0.95


@pytest.mark.parametrize('name', ['mala', 'hmc'])
def test_energy_of_the_wrong_shape_fails_clearly(name):
    class Bad(BaseModel):
        def forward(self, x): return x  # [batch, dim] instead of [batch]
    with pytest.raises(ValueError, match=r'energies of shape \[batch\] = \(4,\)'):
        SAMPLERS[name](Bad()).sample(x=torch.zeros(4, 2), n_steps=2)
    with pytest.raises(ValueError, match='energies of shape'):
        LangevinDynamics(Bad()).sample(x=torch.zeros(4, 2), n_steps=2, return_diagnostics=True)


# ---------------------------------------------------------------- options of the transition-based samplers
@pytest.mark.parametrize('cls', [LangevinDynamics, HamiltonianMonteCarlo])
def test_box_grad_clip_and_adaptation_options_are_checked(cls):
    model = Gaussian2D()
    with pytest.raises(TypeError, match='box must be a \\(low, high\\) pair'):
        cls(model, box=1.0)
    with pytest.raises(ValueError, match='box must have low < high'):
        cls(model, box=(1.0, -1.0))
    with pytest.raises(ValueError, match="box_mode='wrap' is not valid; expected one of \\['clamp', 'reflect'\\]"):
        cls(model, box=(0.0, 1.0), box_mode='wrap')
    with pytest.raises(ValueError, match="box_mode='wrap' is not valid"):
        cls(model, box_mode='wrap')  # checked without a box too, not ignored
    with pytest.raises(ValueError, match='grad_clip'):
        cls(model, grad_clip=0.0)
    extra = {'metropolis': True} if cls is LangevinDynamics else {}
    with pytest.raises(ValueError, match='jitter must be a number in \\[0, 1\\)'):
        cls(model, jitter=1.5, **extra)
    with pytest.raises(ValueError, match="adapt_mass='full' is not valid; expected one of \\['dense', 'diagonal'\\]"):
        cls(model, adapt_mass='full', **extra)


def test_langevin_options_that_need_mala_or_euler_maruyama():
    with pytest.raises(ValueError, match='metropolis=True'):
        LangevinDynamics(Gaussian2D(), adapt_mass=True)
    with pytest.raises(ValueError, match="need integrator='euler_maruyama'"):
        LangevinDynamics(Gaussian2D(), integrator='heun', box=(0.0, 1.0))


def test_warm_start_of_the_wrong_type_or_shape():
    sampler = HamiltonianMonteCarlo(Gaussian2D())
    x = torch.zeros(4, 2, dtype=F64)
    with pytest.raises(TypeError, match='warm_start must be an AdaptedParameters'):
        sampler.sample(x=x, n_steps=1, warm_start=0.1)
    from torchebm.samplers.mcmc import AdaptedParameters
    with pytest.raises(ValueError, match=r'warm_start.step_size must be 0-d or one per chain \(4,\)'):
        sampler.sample(x=x, n_steps=1, warm_start=AdaptedParameters(torch.ones(3, dtype=F64)))
    with pytest.raises(ValueError, match='cannot be warm-started'):
        LangevinDynamics(Gaussian2D(), integrator='heun').sample(x=x, n_steps=1, warm_start=AdaptedParameters(torch.tensor(0.1)))


@pytest.mark.parametrize('bad', [torch.tensor(-0.1, dtype=F64), torch.tensor([0.1, 0.0, 0.1, 0.1], dtype=F64),
                                 torch.tensor(float('nan'), dtype=F64)])
def test_warm_start_step_sizes_must_be_finite_and_positive(bad):
    from torchebm.samplers.mcmc import AdaptedParameters
    from torchebm.samplers.nuts import NoUTurnSampler
    x = torch.zeros(4, 2, dtype=F64)
    for sampler in (HamiltonianMonteCarlo(Gaussian2D()), NoUTurnSampler(Gaussian2D())):
        with pytest.raises(ValueError, match=r'warm_start.step_size must be finite and > 0'):
            sampler.sample(x=x, n_steps=1, warm_start=AdaptedParameters(bad))
    with pytest.raises(ValueError, match=r'^step_size must be finite and > 0'):
        NoUTurnSampler(Gaussian2D(), step_size=bad)


def test_more_warmup_steps_than_steps():
    "The old API counts warm-up inside `n_steps`: asking for more warm-up than steps is an error, not a silent clamp."
    sampler = HamiltonianMonteCarlo(Gaussian2D(), adapt_step_size=True, n_adapt_steps=50)
    with pytest.raises(ValueError, match='n_adapt_steps=50 is more than n_steps=40'):
        sampler.sample(x=torch.zeros(4, 2, dtype=F64), n_steps=40)
    sampler.sample(x=torch.zeros(4, 2, dtype=F64), n_steps=50)  # all warm-up is allowed


@pytest.mark.parametrize('make', [lambda m: HamiltonianMonteCarlo(m, step_size=0.1),
                                  lambda m: LangevinDynamics(m, step_size=0.1, metropolis=True),
                                  lambda m: NoUTurnSampler(m, step_size=0.1)])
def test_a_start_at_a_nan_energy_is_an_error_naming_the_chains(make):
    "A chain that starts where the energy is NaN could never leave it (every Metropolis test fails), so it is refused."
    model = lambda x: torch.where(x[:, 0] > 5, torch.nan, 0.5 * x.pow(2).sum(-1))
    x = torch.zeros(4, 2)
    x[2, 0] = 6.0
    with pytest.raises(ValueError, match=r'energy at the start is NaN or -inf for 1 of 4 chains \(chains \[2\]\)'):
        make(model).sample(x, n_steps=3, generator=torch.Generator().manual_seed(0))
