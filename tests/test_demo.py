"The demo command (`python -m torchebm.demo`): quick runs write the pictures, --help, clear errors for bad options."
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torchebm.demo import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def _is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 2000 and path.read_bytes()[:8] == PNG_MAGIC


def _run_module(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, MPLBACKEND='Agg', OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]))
    return subprocess.run([sys.executable, '-m', 'torchebm.demo', *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_quick_ebm_run_writes_the_three_pictures(tmp_path, capsys):
    out = tmp_path / 'nested' / 'demo'
    assert main(['--quick', '--no-progress', '--out', str(out)]) == 0
    for name in ('ebm_landscape.png', 'ebm_loss.png', 'ebm_diagnostics.png'):
        assert _is_png(out / name), name
    printed = capsys.readouterr().out
    assert 'finished' in printed and str(out / 'ebm_landscape.png') in printed


def test_quick_eqm_run_writes_its_pictures(tmp_path):
    assert main(['--task', 'eqm', '--quick', '--no-progress', '--out', str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ['eqm_loss.png', 'eqm_samples.png']
    assert all(_is_png(p) for p in tmp_path.iterdir())


def test_module_runs_as_a_program_with_a_progress_bar(tmp_path):
    result = _run_module('--quick', '--steps', '5', '--out', str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert 'EBM (persistent CD, two moons)' in result.stderr and '5/5' in result.stderr   # tqdm writes to stderr
    assert _is_png(tmp_path / 'ebm_landscape.png')


def test_help_lists_every_option():
    result = _run_module('--help')
    assert result.returncode == 0
    for option in ('--task', '--out', '--device', '--steps', '--batch-size', '--lr', '--k-steps',
                   '--sampler-step-size', '--n-data', '--seed', '--quick', '--no-progress'):
        assert option in result.stdout, option


@pytest.mark.parametrize('argv, message', [
    (['--task', 'gan'], "argument --task: invalid choice: 'gan'"),
    (['--steps', '0'], 'argument --steps: expected a positive integer, got 0'),
    (['--batch-size', 'many'], "argument --batch-size: expected a positive integer, got 'many'"),
    (['--lr', '0'], 'argument --lr: expected a positive number, got 0'),
    (['--device', 'tpu'], "--device: unknown device 'tpu'"),
    (['--frobnicate'], 'unrecognized arguments: --frobnicate'),
])
def test_bad_options_give_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the error on machines without CUDA')
def test_cuda_device_without_cuda_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(['--device', 'cuda', '--quick'])
    assert exit_info.value.code == 2
    assert 'CUDA is not available on this machine' in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_quick_run_on_cuda(tmp_path):
    assert main(['--device', 'cuda', '--task', 'both', '--quick', '--no-progress', '--out', str(tmp_path)]) == 0
    assert len(list(tmp_path.glob('*.png'))) == 5


def test_same_seed_same_losses():
    from torchebm.demo import settings_from_args, train_ebm
    args = build_parser().parse_args(['--quick', '--steps', '5', '--no-progress'])
    runs = [train_ebm(settings_from_args(args, torch.device('cpu'))) for _ in range(2)]
    assert torch.equal(runs[0].losses, runs[1].losses)
    assert torch.equal(runs[0].samples, runs[1].samples)
