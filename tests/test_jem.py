"""JEM: exact class-conditional sampling (MALA, MCSE tolerance), image-shaped inputs, the metrics against
independent implementations, and the hybrid loss inside a training loop."""
import math

import pytest
import torch
from torch import nn

from torchebm.losses import JEMLoss, JointEnergyModel, auroc, calibration
from torchebm.models.image import ConvEnergy
from torchebm.samplers.hmc import HamiltonianMonteCarlo
from torchebm.samplers.langevin import LangevinDynamics

torch.set_num_threads(1)

MEANS = torch.tensor([[-3.0, 0.0], [3.0, 0.0], [0.0, 4.0]], dtype=torch.float64)


class GaussianLogits(nn.Module):
    "Logits -|x - mu_y|^2 / 2: p(x | y) = N(mu_y, I) exactly."
    def __init__(self, means): super().__init__(); self.means = nn.Parameter(means.clone())
    def forward(self, x): return -0.5 * (x[:, None, :] - self.means).pow(2).sum(-1)


@pytest.mark.parametrize('make_sampler', [
    lambda m: LangevinDynamics(m, step_size=0.3, metropolis=True),
    lambda m: HamiltonianMonteCarlo(m, step_size=0.3, n_leapfrog_steps=5)], ids=['mala', 'hmc'])
def test_conditional_sampling_is_exact(make_sampler):
    """Metropolis-corrected chains of `conditional(y)` have the moments of N(mu_y, I): each chain's last state is
    an independent draw, so the tolerance is 5 Monte Carlo standard errors (sd / sqrt(n)). A broken conditional
    energy (the unconditional -logsumexp, i.e. ignoring y) puts the class means at the mixture's and fails by
    more than 100 standard errors."""
    jem = JointEnergyModel(GaussianLogits(MEANS), n_classes=3)
    gen = torch.Generator().manual_seed(0)
    n = 3000
    labels = torch.arange(3).repeat_interleave(n)
    start = MEANS[labels] + torch.randn(3 * n, 2, generator=gen, dtype=torch.float64)
    samples = make_sampler(jem.conditional(labels)).sample(x=start.flip(0), n_steps=300, generator=gen)
    for k in range(3):
        s = samples[labels == k]
        se_mean = 1 / math.sqrt(n)
        se_var = math.sqrt(2 / (n - 1))  # sd of a Gaussian sample variance with unit variance
        assert (s.mean(0) - MEANS[k]).abs().max() < 5 * se_mean, (k, s.mean(0))
        assert (s.var(0) - 1).abs().max() < 5 * se_var, (k, s.var(0))


def test_image_shaped_energies_and_gradients():
    "ConvEnergy's class head on images [batch, C, H, W], per-chain labels: energies [batch], finite differences agree."
    torch.manual_seed(0)
    jem = JointEnergyModel(ConvEnergy(channels=(4, 8), n_classes=10, dtype=torch.float64))
    assert jem.n_classes == 10
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 4, 9])
    assert jem(x).shape == (3,) and jem(x, y=y).shape == (3,)
    assert torch.allclose(jem(x), jem.classifier(x))  # ConvEnergy's own energy is -logsumexp of its logits
    direction = torch.randn_like(x)
    h = 1e-6
    for model in (jem, jem.conditional(y)):
        directional = ((model(x + h * direction) - model(x - h * direction)) / (2 * h))
        analytic = (model.gradient(x) * direction).flatten(1).sum(-1)
        assert torch.allclose(directional, analytic, rtol=1e-6, atol=1e-8)
    samples = LangevinDynamics(jem.conditional(y), step_size=0.01, box=(-1.0, 1.0)).sample(x=x, n_steps=3)
    assert samples.shape == x.shape and samples.abs().max() <= 1


def test_calibration_matches_a_loop():
    "ECE and its bins against a plain Python loop over predictions, on random probabilities (float32 and float64)."
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        probs = torch.randn(500, 4, generator=gen, dtype=dtype).mul(2).softmax(-1)
        y = torch.randint(4, (500,), generator=gen)
        report = calibration(probs, y, n_bins=10)
        bins = [[] for _ in range(10)]
        for p, label in zip(probs.tolist(), y.tolist()):
            conf = max(p)
            b = min(max(math.ceil(conf * 10), 1), 10) - 1
            bins[b].append((conf, float(p.index(conf) == label)))
        ece = sum(len(b) / 500 * abs(sum(a for _, a in b) / len(b) - sum(c for c, _ in b) / len(b)) for b in bins if b)
        assert report.ece.dtype == dtype
        assert abs(report.ece.item() - ece) < 1e-5
        assert report.count.tolist() == [float(len(b)) for b in bins]


def test_auroc_matches_scikit_learn_with_ties():
    metrics = pytest.importorskip('sklearn.metrics')
    gen = torch.Generator().manual_seed(0)
    inside = torch.randint(0, 20, (300,), generator=gen).float()  # integer scores: many ties
    outside = torch.randint(-5, 15, (200,), generator=gen).float()
    expected = metrics.roc_auc_score([1] * 300 + [0] * 200, torch.cat([inside, outside]).numpy())
    assert abs(auroc(inside, outside).item() - expected) < 1e-12


@pytest.mark.slow
def test_jem_loss_trains_a_classifier_and_a_density():
    """A few hundred steps on labelled blobs: the classifier is accurate and fresh chains (noise + Langevin) land
    on the data; with generative_weight=0 (a plain classifier) the energy's chains stay spread out (the same
    check fails), so the generative term is what makes the samples."""
    def fit(generative_weight):
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(0)
        y = torch.randint(3, (2000,), generator=gen)
        x = MEANS.float()[y] + 0.7 * torch.randn(2000, 2, generator=gen)
        model = JointEnergyModel(nn.Sequential(nn.Linear(2, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(),
                                               nn.Linear(64, 3)), n_classes=3)
        loss_fn = JEMLoss(model, LangevinDynamics(model, step_size=0.02), generative_weight=generative_weight,
                          k_steps=20, buffer_size=2000, energy_reg=0.01, init_std=3.0)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(300):
            idx = torch.randint(2000, (128,), generator=gen)
            loss, _ = loss_fn(x[idx], y=y[idx], generator=gen)
            opt.zero_grad(); loss.backward(); opt.step()
        accuracy = (model.predict_proba(x).argmax(-1) == y).float().mean().item()
        fresh = LangevinDynamics(model, step_size=0.02).sample(x=3 * torch.randn(1000, 2, generator=gen), n_steps=300,
                                                               generator=gen)
        near = ((fresh[:, None] - MEANS.float()).norm(dim=-1).min(-1).values < 2).float().mean().item()
        return accuracy, near
    accuracy, near = fit(1.0)
    assert accuracy > 0.97 and near > 0.9, (accuracy, near)
    _, near_classifier_only = fit(0.0)
    assert near_classifier_only < 0.6, near_classifier_only
