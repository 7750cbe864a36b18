"Plotting helpers: headless, no global state, return Figure/Axes, float32/float64/CUDA inputs, clear errors."
import subprocess
import sys
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib import animation
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from torchebm.core import DoubleWellModel, GaussianModel
from torchebm.visualization import (animate_sampling, energy_grid, grid_quantity, plot_diagnostics,
                                    plot_energy_and_samples, plot_energy_landscape, plot_samples, plot_trajectories)

ROOT = Path(__file__).resolve().parents[1]
DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close('all')


def _gaussian(dtype=torch.float32, device='cpu'):
    return GaussianModel(mean=torch.zeros(2, dtype=dtype, device=device), cov=torch.eye(2, dtype=dtype, device=device))


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_landscape_matches_the_closed_form_on_any_device_and_dtype(dtype, device):
    xs, ys, energy = energy_grid(_gaussian(dtype, device), (-2, 2), (-1, 3), resolution=21)
    X, Y = np.meshgrid(xs, ys)
    np.testing.assert_allclose(energy, 0.5 * (X ** 2 + Y ** 2), rtol=1e-5, atol=1e-6)
    density = grid_quantity(xs, ys, energy, 'density')
    cell = (xs[1] - xs[0]) * (ys[1] - ys[0])
    np.testing.assert_allclose(density.sum() * cell, 1.0, rtol=1e-9)
    # the window's normalised density is the Gaussian's density divided by its mass inside the window
    exact = np.exp(-energy) / (2 * np.pi)
    np.testing.assert_allclose(density / density.max(), exact / exact.max(), rtol=1e-6)


def test_every_helper_returns_figure_or_axes_and_leaves_rcparams_alone(tmp_path):
    before = dict(matplotlib.rcParams)
    model = DoubleWellModel(barrier_height=1.0)
    points = torch.randn(50, 2)
    trajectory = torch.randn(4, 12, 2).cumsum(1) * 0.1
    diagnostics = {'energy': torch.rand(12, 4), 'acceptance_rate': torch.rand(12), 'mean': torch.zeros(12, 2),
                   'var': torch.ones(12, 2)}
    assert isinstance(plot_energy_landscape(model, resolution=20), Axes)
    assert plot_energy_landscape(model, resolution=10, kind='surface', quantity='log_density').name == '3d'
    assert isinstance(plot_samples(points, model=model, data=points + 1, resolution=20), Axes)
    assert isinstance(plot_trajectories(trajectory, model=model, resolution=20), Axes)
    assert isinstance(plot_diagnostics(diagnostics), Figure)
    assert isinstance(plot_energy_and_samples(model, points, model_samples=points, grid_size=20), Figure)
    assert isinstance(animate_sampling(trajectory, max_frames=3, save_path=tmp_path / 'a.gif'), animation.FuncAnimation)
    assert dict(matplotlib.rcParams) == before


def test_helpers_draw_into_a_given_axes():
    fig, (left, right) = plt.subplots(1, 2)
    assert plot_samples(torch.randn(10, 2), ax=left) is left
    assert plot_trajectories(torch.randn(2, 5, 2), ax=right) is right
    assert len(fig.axes) == 2


def test_plot_energy_and_samples_runs_the_sampler_reproducibly():
    from torchebm.samplers import LangevinDynamics
    model = _gaussian()
    sampler = LangevinDynamics(model, step_size=0.1)

    def scattered():
        fig = plot_energy_and_samples(model, torch.randn(20, 2), sampler, epoch=3, grid_size=20, k_sampling=5,
                                      n_samples=30, generator=torch.Generator().manual_seed(7))
        return fig.axes[0].collections[-1].get_offsets()

    first, second = scattered(), scattered()
    assert first.shape == (30, 2)
    np.testing.assert_array_equal(first, second)


def test_diagnostics_from_a_real_sampler_use_the_recorded_steps():
    from torchebm.samplers import LangevinDynamics
    sampler = LangevinDynamics(_gaussian(), step_size=0.1, metropolis=True)
    _, diagnostics = sampler.sample(x=torch.randn(16, 2), n_steps=40, thin=4, return_diagnostics=True,
                                    generator=torch.Generator().manual_seed(0))
    fig = plot_diagnostics(diagnostics, thin=4)
    energy_axes = fig.axes[0]
    assert energy_axes.get_title() == 'energy'
    np.testing.assert_array_equal(energy_axes.lines[0].get_xdata(), np.arange(4, 41, 4))


def test_gif_has_the_requested_frames_and_mp4_needs_ffmpeg(tmp_path):
    from PIL import Image
    trajectory = torch.randn(5, 30, 2)
    animate_sampling(trajectory, save_path=tmp_path / 'chains.gif', max_frames=6)
    with Image.open(tmp_path / 'chains.gif') as gif:
        assert gif.n_frames == 6
    if animation.writers.is_available('ffmpeg'):
        animate_sampling(trajectory, save_path=tmp_path / 'chains.mp4', max_frames=3)
        assert (tmp_path / 'chains.mp4').stat().st_size > 0
    else:
        with pytest.raises(RuntimeError, match="'ffmpeg' writer is not available"):
            animate_sampling(trajectory, save_path=tmp_path / 'chains.mp4')


@pytest.mark.parametrize('call, error, message', [
    (lambda: plot_samples(torch.randn(5, 3)), ValueError, r'shape \[n, 2\]'),
    (lambda: plot_samples([[0.0, 1.0]]), TypeError, 'torch.Tensor or numpy array'),
    (lambda: plot_trajectories(torch.randn(5, 2)), ValueError, '3 dimensions'),
    (lambda: plot_energy_landscape(GaussianModel(mean=torch.zeros(3), cov=torch.eye(3))), ValueError, 'dim=3'),
    (lambda: plot_energy_landscape(_gaussian(), x_range=(1, 1)), ValueError, 'low < high'),
    (lambda: plot_energy_landscape(_gaussian(), quantity='probability'), ValueError, 'quantity'),
    (lambda: plot_energy_landscape(_gaussian(), resolution=1), ValueError, 'resolution'),
    (lambda: plot_energy_landscape(lambda x: torch.full((x.shape[0],), float('nan'))), ValueError, 'NaN'),
    (lambda: plot_energy_landscape(lambda x: x), ValueError, 'one energy per point'),
    (lambda: plot_diagnostics({'acceptance_rate': torch.ones(3)}), ValueError, "'energy'"),
    (lambda: plot_diagnostics({'energy': torch.ones(3, 2), 'step_size': torch.ones(4)}), ValueError, 'records'),
    (lambda: animate_sampling(torch.randn(2, 3, 2), save_path='x.webm'), ValueError, 'must end in one of'),
])
def test_bad_input_is_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_import_and_plot_headless_without_a_display(tmp_path):
    code = ("import matplotlib; import torch; from torchebm.visualization import plot_samples; "
            "ax = plot_samples(torch.randn(10, 2)); ax.figure.savefig(r'%s'); print(matplotlib.get_backend())"
            % (tmp_path / 'p.png'))
    env = {'PATH': '/usr/bin:/bin', 'PYTHONPATH': str(ROOT), 'HOME': str(tmp_path)}
    result = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().lower() == 'agg' and (tmp_path / 'p.png').stat().st_size > 0


def test_image_grid_gaps_are_background_not_dark_lines():
    "The one-pixel gaps of a one-channel grid are drawn in the colour of a blank pixel (before: black lines)."
    from torchebm.visualization import image_grid, plot_image_grid
    images = -torch.ones(4, 1, 3, 3)  # blank paper in the (-1, 1) range
    images[:, :, 1, 1] = 1.0  # one ink pixel per image
    fig = plot_image_grid(images, nrow=2)
    shown = fig.axes[0].images[0]
    rgba = shown.cmap(shown.norm(np.asarray(shown.get_array())))
    blank, gap = rgba[0, 0], rgba[3]  # a background pixel of the first image; the padding row
    np.testing.assert_allclose(gap, np.broadcast_to(blank, gap.shape))
    assert blank[:3].min() == 1.0  # paper is white, ink dark
    assert rgba[1, 1, :3].max() == 0.0
    np.testing.assert_array_equal(image_grid(torch.rand(2, 3, 2, 2), value_range=(0, 1))[:, 2], 1.0)  # RGB: white
    with pytest.raises(ValueError, match='pad_value'):
        image_grid(images, pad_value=2.0)
