"Kernel Stein discrepancy test: calibrated under the null, powerful under wrong models."
import pytest
import torch
from scipy.stats import kstest

from torchebm.core.energies import GaussianModel
from torchebm.diagnostics.stein import kernel_stein_discrepancy, ksd_test, stein_kernel_matrix

MODEL = GaussianModel(torch.zeros(2), torch.eye(2))


def _null_p_values(n_reps=200, n=80, n_bootstrap=200, seed=0, broken=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_reps):
        x = torch.randn(n, 2, generator=g)
        if not broken:
            out.append(float(ksd_test(x, MODEL, n_bootstrap=n_bootstrap, generator=g).p_value))
            continue
        # deliberately broken: the V-statistic (diagonal kept) against the U-statistic's bootstrap
        u = stein_kernel_matrix(x, MODEL.score(x))
        u0 = u - torch.diag_embed(u.diagonal())
        w = torch.randint(0, 2, (n_bootstrap, n), generator=g).float() * 2 - 1
        replicates = ((w @ u0) * w).sum(1) / (n * (n - 1))
        out.append(float((1 + (replicates >= u.mean()).sum()) / (1 + n_bootstrap)))
    return out


def test_null_p_values_are_uniform():
    """Kolmogorov-Smirnov over 200 repetitions (p-values on a 1/201 grid: a KS p-value below 0.01 would flag
    miscalibration); the broken V-statistic variant below is rejected by the same check."""
    assert kstest(_null_p_values(), 'uniform').pvalue > 0.01


def test_the_calibration_check_catches_a_broken_statistic():
    assert kstest(_null_p_values(n_reps=100, broken=True), 'uniform').pvalue < 1e-3


@pytest.mark.parametrize('wrong', [GaussianModel(torch.tensor([0.5, 0.]), torch.eye(2)),
                                   GaussianModel(torch.zeros(2), 2.5 * torch.eye(2)),
                                   GaussianModel(torch.zeros(2), torch.tensor([[1., 0.8], [0.8, 1.]]))])
def test_wrong_models_are_rejected(wrong):
    g = torch.Generator().manual_seed(1)
    rejections = sum(float(ksd_test(torch.randn(150, 2, generator=g), wrong, n_bootstrap=200, generator=g).p_value) < 0.05
                     for _ in range(20))
    assert rejections >= 18


def test_u_statistic_is_unbiased_under_the_null():
    "Mean of 200 independent U-statistics within 4 standard errors of 0 (their spread estimates the error)."
    g = torch.Generator().manual_seed(2)
    stats = torch.stack([kernel_stein_discrepancy(torch.randn(50, 2, generator=g, dtype=torch.float64), MODEL.double())
                         for _ in range(200)])
    assert stats.mean().abs() < 4 * stats.std() / 200 ** 0.5


def test_generator_reproducibility_float64_and_model_without_score():
    x = torch.randn(40, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    a = ksd_test(x, MODEL.double(), generator=torch.Generator().manual_seed(0))
    b = ksd_test(x, MODEL.double(), generator=torch.Generator().manual_seed(0))
    assert a == b and a.statistic.dtype == torch.float64
    quadratic = torch.nn.Module(); quadratic.forward = lambda x: 0.5 * (x * x).sum(1)
    torch.testing.assert_close(kernel_stein_discrepancy(x, quadratic), kernel_stein_discrepancy(x, MODEL.double()))


def test_bad_input():
    x = torch.randn(10, 2)
    with pytest.raises(TypeError, match='exactly one'): ksd_test(x, MODEL, score=lambda x: -x)
    with pytest.raises(ValueError, match='n >= 2'): ksd_test(x[:1], MODEL)
    with pytest.raises(ValueError, match='beta'): ksd_test(x, MODEL, beta=0.5)
    with pytest.raises(ValueError, match='c must be'): ksd_test(x, MODEL, c=-1.0)
    with pytest.raises(ValueError, match='n_bootstrap'): ksd_test(x, MODEL, n_bootstrap=0)
    with pytest.raises(ValueError, match='score shaped'): stein_kernel_matrix(x, x[:, :1])


def test_non_finite_samples_or_scores_are_refused():
    "NaN would make every bootstrap comparison False and report the strongest rejection, p = 1/(B+1)."
    x = torch.randn(10, 2)
    bad = x.clone()
    bad[3, 0] = float('nan')
    with pytest.raises(ValueError, match='x contains NaN or inf'): ksd_test(bad, MODEL)
    with pytest.raises(ValueError, match='x contains NaN or inf'): kernel_stein_discrepancy(bad, MODEL)
    with pytest.raises(ValueError, match=r'score \(the model score at x\) contains NaN or inf'):
        ksd_test(x, score=lambda z: torch.full_like(z, float('inf')))
