"""Sequential Monte Carlo: log Z against Gaussians and a bimodal mixture with known normaliser (tolerance from
the reported standard error), the standard error's calibration over independent runs, and the mixture's mode
weights. Each check is a function that raises AssertionError; the tests also run it on SMC without
reweighting and expect it to fail."""
import math

import pytest
import torch

from torchebm.core.base import BaseModel
from torchebm.core.energies import GaussianModel
from torchebm.samplers import smc
from torchebm.samplers.smc import SequentialMonteCarlo
from torchebm.samplers.transitions import ULA, LangevinParams
from test_tempering import two_modes


def _gaussian(d, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    cov = a @ a.T / d + 0.3 * torch.eye(d, dtype=torch.float64)
    return GaussianModel(2 * torch.randn(d, generator=g, dtype=torch.float64), cov)


def check_log_z(result, exact):
    "The estimate within 4 reported standard errors, and a standard error small enough to mean something."
    assert abs(result.log_z.item() - exact) < 4 * result.stderr.item(), \
        f"log Z {result.log_z.item():.3f} +- {result.stderr.item():.3f}, exact {exact:.3f}"
    assert result.stderr.item() < 0.25, f"standard error {result.stderr.item():.3f} gives the check no power"


@pytest.mark.parametrize('transition', ['mala', 'hmc'])
@pytest.mark.parametrize('seed', [0, 1])
def test_smc_log_z_of_gaussians(transition, seed):
    model = _gaussian(4, seed)
    result = SequentialMonteCarlo(model, transition, n_leapfrog_steps=3).sample(
        n_samples=512, generator=torch.Generator().manual_seed(seed))
    check_log_z(result, model.log_normalizer.item())
    assert result.betas[0] == 0 and result.betas[-1] == 1 and len(result.ess_history) == len(result.betas) - 1


def check_stderr_calibrated(target_ess=0.9, n_runs=60):
    """Over independent runs on a Gaussian wider than the base along one axis (variance 3.7 against 1: importance
    weights with a heavy tail), the errors z = (log Z_hat - log Z) / stderr have a root mean square near 1. The
    estimate is skewed, so z leans negative even where the spread is right (over 300 runs at target_ess=0.9: mean
    -0.33, sd 1.07, root mean square 1.12; at 0.5, 60 runs: -0.92, 1.48, 1.74); the root mean square counts both.
    Tolerance: 4 of its Monte Carlo errors, 1/sqrt(2 n) for normal z."""
    model = _gaussian(3, 0)
    z = torch.stack([(r.log_z - model.log_normalizer) / r.stderr for r in (
        SequentialMonteCarlo(model, target_ess=target_ess).sample(n_samples=512, generator=torch.Generator().manual_seed(s))
        for s in range(n_runs))])
    rms = z.pow(2).mean().sqrt().item()
    assert rms < 1 + 4 / math.sqrt(2 * n_runs), f"root mean square of z {rms:.2f} (mean {z.mean().item():.2f})"


def test_smc_stderr_is_calibrated():
    check_stderr_calibrated()


def test_calibration_check_catches_a_short_ladder():
    "With target_ess=0.5 the ladder has 3 stages and the reported standard errors are too small."
    with pytest.raises(AssertionError, match='root mean square of z'):
        check_stderr_calibrated(target_ess=0.5)


def _mixture_runs(n_runs=6):
    model = two_modes()
    return model, [SequentialMonteCarlo(model, base=torch.distributions.Normal(torch.zeros(2, dtype=torch.float64), 2.0))
                   .sample(dim=2, n_samples=512, generator=torch.Generator().manual_seed(s)) for s in range(n_runs)]


def check_mixture(model, runs, weight=0.3):
    "log Z of every run within 4 standard errors; the weight of the (+4, 0) mode within 4 errors across runs."
    weights = torch.stack([torch.softmax(r.log_weights, 0)[r.samples[:, 0] > 0].sum() for r in runs])
    # No slack beyond the standard error: the split at x = 0 is 8 standard deviations from either mode. The error
    # is estimated from the runs themselves, so with 6 runs the ratio is Student-t with 5 degrees of freedom and
    # |t| > 4 has probability ~0.01 for a correct sampler (not 6e-5); the seeds are fixed. Over ten sets of 6
    # seeds (0-59) |t| stayed below 1.8.
    stderr = weights.std().item() / math.sqrt(len(runs))
    assert abs(weights.mean().item() - weight) < 4 * stderr, \
        f"mode weight {weights.mean().item():.3f} +- {stderr:.3f}, expected {weight}"
    for r in runs: check_log_z(r, model.log_z)


def test_smc_bimodal_mixture_log_z_and_weights():
    check_mixture(*_mixture_runs())


def test_checks_catch_smc_without_reweighting(monkeypatch):
    "With the incremental weights dropped, particles never learn the target's mass: both checks fail."
    monkeypatch.setattr(smc, 'incremental_log_weight', lambda gap, beta, new_beta: torch.zeros_like(gap))
    with pytest.raises(AssertionError, match='mode weight'):
        check_mixture(*_mixture_runs(2))
    model = _gaussian(4, 0)
    with pytest.raises(AssertionError, match='log Z'):
        check_log_z(SequentialMonteCarlo(model).sample(n_samples=512, generator=torch.Generator().manual_seed(0)),
                    model.log_normalizer.item())


def test_smc_float64_base_and_parameter_free_energy():
    base = torch.distributions.Normal(torch.zeros(2, dtype=torch.float64), 1.0)
    result = SequentialMonteCarlo(lambda x: 0.5 * x.pow(2).sum(-1), base=base).sample(
        dim=2, n_samples=64, generator=torch.Generator().manual_seed(0))
    assert result.samples.dtype == torch.float64
    assert abs(result.log_z.item() - math.log(2 * math.pi)) < 1e-12  # base = target: one stage, exact


class HalfNormal(torch.nn.Module):
    "$x^2/2$ on $x > 0$ and +inf elsewhere: $Z = \\sqrt{2\\pi}/2$. Half the base's draws get weight 0 at the first stage."
    def forward(self, x):
        return torch.where(x[:, 0] > 0, 0.5 * x[:, 0] ** 2, torch.full_like(x[:, 0], math.inf))


def check_half_normal_log_z(dtype):
    result = SequentialMonteCarlo(HalfNormal(), dtype=dtype).sample(
        dim=1, n_samples=2048, generator=torch.Generator().manual_seed(0))
    assert result.samples.dtype == dtype
    check_log_z(result, math.log(math.sqrt(2 * math.pi) / 2))


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_smc_log_z_of_a_target_with_infinite_energies(dtype):
    """No beta keeps the conditional ESS at target_ess (half the particles die at any beta > 0), so the first stage
    stops at 1e-12; the target's energy must then be evaluated afresh, not recovered by dividing by beta."""
    check_half_normal_log_z(dtype)


def test_half_normal_check_catches_energies_recovered_at_a_tiny_beta(monkeypatch):
    "Recovering E from E_beta at beta = 1e-12 loses it in float32 (log Z -0.69 +- 0.02 instead of 0.23)."
    monkeypatch.setattr(smc, 'min_recoverable_beta', lambda dtype: 0.0)
    with pytest.raises(AssertionError, match='log Z'):
        check_half_normal_log_z(torch.float32)


def test_smc_raises_at_once_on_a_nan_energy():
    "A NaN energy among the base's draws is an error at stage 1 (it used to creep up by 1e-12 for 10,000 stages)."
    model = lambda x: torch.where(x.abs().max(-1).values > 3, torch.nan, 0.5 * x.pow(2).sum(-1))
    with pytest.raises(ValueError, match=r'SequentialMonteCarlo: the energy is NaN or -inf at particles \[\d+'):
        SequentialMonteCarlo(model).sample(dim=2, n_samples=256, generator=torch.Generator().manual_seed(0))


def test_smc_without_resampling_is_ais_and_warns_when_the_weights_collapse():
    """`resampling=None` never resamples: log Z within 4 standard errors on a Gaussian, and a warning (not the
    void-ancestry one) when a narrow far target leaves the weights on a few particles."""
    model = _gaussian(3, 0)
    result = SequentialMonteCarlo(model, resampling=None).sample(n_samples=512, generator=torch.Generator().manual_seed(0))
    assert result.n_resampled == 0 and result.n_ancestors == 512
    check_log_z(result, model.log_normalizer.item())
    far = GaussianModel(torch.full((3,), 6.0, dtype=torch.float64), 0.05 * torch.eye(3, dtype=torch.float64))
    with pytest.warns(RuntimeWarning, match='importance weights collapsed'):
        SequentialMonteCarlo(far, resampling=None, n_mutation_steps=0).sample(
            n_samples=256, generator=torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match='resampling must be one of'):
        SequentialMonteCarlo(model, resampling=1)



class NaNBeyond(BaseModel):
    "$|x|^2 / 2$ (the base itself: one stage) whose gradient is NaN where $x_1 > 2.5$ (a few of the base's draws)."
    @property
    def dim(self): return 2

    def forward(self, x): return 0.5 * x.pow(2).sum(-1)

    def analytic_gradient(self, x): return torch.where(x[:, :1] > 2.5, torch.nan, x)


def test_smc_nan_guard_names_the_stage_and_particles():
    """Mutations run through the shared loop: particles that leave the finite numbers (unadjusted Langevin taking
    a NaN gradient) stop the run at the end of that stage's sweep, naming the stage and the particles."""
    sampler = SequentialMonteCarlo(NaNBeyond(), ULA(), params=LangevinParams(step_size=0.01))
    with pytest.raises(ValueError, match=r'SequentialMonteCarlo stage 1: NaN or inf appeared in [1-9]\d* of 512 '
                                         r'chains \(chains \[\d+.*\]\) between steps 1 and 5'):
        sampler.sample(n_samples=512, generator=torch.Generator().manual_seed(0))
