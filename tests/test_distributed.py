"Two Gloo processes under torchrun train exactly like one process with the same global batch."
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

import torchebm
from torchebm.training import Trainer, make_dataloader, latest_checkpoint

import toy_training as toys

REPO = Path(torchebm.__file__).resolve().parents[1]

TESTS = Path(__file__).resolve().parent

WORKER = '''
import os, sys, torch
torch.set_num_threads(1)
from torch.utils.data import TensorDataset
import torch.distributed as dist
from torchebm.training import Trainer, init_distributed, make_dataloader
from toy_training import GaussianEnergy, ScoreMatching, ToyPCD, make_data
out = sys.argv[1]
device = init_distributed()
rank = dist.get_rank()
data = make_data()

torch.manual_seed(123)
model = GaussianEnergy(2)
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
t = Trainer(model, ScoreMatching(model), opt, seed=0, progress=False, checkpoint_dir=out + '/sm', grad_clip=5.0)
t.fit(make_dataloader(TensorDataset(data), batch_size=16, shuffle=False), epochs=3)
if rank == 0: torch.save(model.state_dict(), out + '/sm_model.pt')

torch.manual_seed(7)
model = GaussianEnergy(2)
loss = ToyPCD(model, 2)
t = Trainer(model, loss, torch.optim.SGD(model.parameters(), lr=0.01), seed=0, progress=False,
            checkpoint_dir=out + '/pcd', checkpoint_every=4)
t.fit(make_dataloader(TensorDataset(data), batch_size=16, shuffle=True), epochs=2)
torch.save({'model': model.state_dict(), 'buffer': loss.replay_buffer}, f"{out}/pcd_rank{rank}.pt")

torch.manual_seed(7)
model = GaussianEnergy(2)
loss = ToyPCD(model, 2)
before = loss.replay_buffer.clone()
t = Trainer(model, loss, torch.optim.SGD(model.parameters(), lr=0.01), progress=False, mix_buffers_every=2)
t.fit(make_dataloader(TensorDataset(data), batch_size=16, shuffle=True), epochs=1)
torch.save({'before': before, 'after': loss.replay_buffer}, f"{out}/mixed_rank{rank}.pt")

class Unlucky(ToyPCD):
    "Chains blow up (finite) at call 7 on rank 0 only: every rank must roll back together."
    calls = 0
    def forward(self, x):
        Unlucky.calls += 1
        loss, neg = super().forward(x)
        return loss, (neg * 1e4 if Unlucky.calls == 7 and dist.get_rank() == 0 else neg)

import warnings
torch.manual_seed(7)
model = GaussianEnergy(2)
t = Trainer(model, Unlucky(model, 2), torch.optim.SGD(model.parameters(), lr=0.01), seed=0, progress=False,
            checkpoint_dir=out + '/rollback', checkpoint_every=4, log_every=2, on_divergence='rollback')
with warnings.catch_warnings(record=True):
    warnings.simplefilter('always')
    t.fit(make_dataloader(TensorDataset(data), batch_size=16, shuffle=True), epochs=2)
torch.save({'rollbacks': t.rollbacks, 'step': t.step, 'model': model.state_dict()}, f"{out}/rollback_rank{rank}.pt")
dist.barrier()
dist.destroy_process_group()
# Gloo's worker threads can abort the interpreter's final teardown (SIGABRT, "terminate called without an active
# exception", about 1 run in 10 here; pytorch/pytorch#179291): everything is saved, so leave without it.
sys.stdout.flush(); sys.stderr.flush()
os._exit(0)
'''


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def two_process_run(tmp_path_factory):
    "Launch the worker under torchrun with 2 Gloo processes on 127.0.0.1; return its output folder."
    out = tmp_path_factory.mktemp('ddp')
    (out / 'worker.py').write_text(WORKER)
    env = dict(os.environ, PYTHONPATH=f"{TESTS}{os.pathsep}{REPO}", OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nnodes=1', '--nproc_per_node=2',
           '--master_addr=127.0.0.1', f'--master_port={_free_port()}', str(out / 'worker.py'), str(out)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (out / 'stderr.txt').write_text(result.stderr)
    return out


def test_two_ranks_equal_one_process_with_same_global_batch(two_process_run):
    data = toys.make_data()
    torch.manual_seed(123)
    model = toys.GaussianEnergy(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
    Trainer(model, toys.ScoreMatching(model), opt, seed=0, progress=False, grad_clip=5.0).fit(
        make_dataloader(TensorDataset(data), batch_size=16, shuffle=False), epochs=3)
    ddp = torch.load(two_process_run / 'sm_model.pt')
    for name, value in model.state_dict().items():
        torch.testing.assert_close(ddp[name], value, rtol=1e-5, atol=1e-6)


def test_per_rank_buffers_and_shared_weights(two_process_run):
    r0, r1 = (torch.load(two_process_run / f'pcd_rank{r}.pt') for r in (0, 1))
    for name in r0['model']:
        torch.testing.assert_close(r0['model'][name], r1['model'][name])   # DDP keeps weights in sync
    assert not torch.allclose(r0['buffer'], r1['buffer'])                 # independent chains per rank


def test_mixed_buffers_pool_chains_across_ranks(two_process_run):
    r0, r1 = (torch.load(two_process_run / f'mixed_rank{r}.pt') for r in (0, 1))
    # Both ranks start from the same buffer (same torch.manual_seed(7)); afterwards each holds a random subset
    # of the pooled chains, so they share rows, but differ: without seed= the trainer still gives every rank
    # its own random stream (identical streams would pick identical subsets).
    assert torch.equal(r0['before'], r1['before'])
    assert not torch.equal(r0['after'], r1['after'])
    shared = (r0['after'][:, None, :] == r1['after'][None, :, :]).all(-1).any(1)
    assert shared.any()


def test_rank0_checkpoint_loads_with_another_world_size(two_process_run):
    path = latest_checkpoint(two_process_run / 'pcd')
    state = torch.load(path, weights_only=False)
    assert state['world_size'] == 2 and len(state['ranks']) == 2
    assert not torch.equal(state['ranks'][0]['loss']['loss']['replay_buffer'],
                           state['ranks'][1]['loss']['loss']['replay_buffer'])
    model = toys.GaussianEnergy(2)
    loss = toys.ToyPCD(model, 2)
    trainer = Trainer(model, loss, torch.optim.SGD(model.parameters(), lr=0.01), seed=0, progress=False)
    with pytest.warns(UserWarning, match='world size 2'):
        trainer.load_checkpoint(path)
    final = torch.load(two_process_run / 'pcd_rank0.pt')
    for name, value in final['model'].items():
        torch.testing.assert_close(model.state_dict()[name], value)
    torch.testing.assert_close(loss.replay_buffer, final['buffer'])
    trainer.fit(make_dataloader(TensorDataset(toys.make_data()), batch_size=16), epochs=3)
    assert trainer.epoch == 3 and all(torch.isfinite(p).all() for p in model.parameters())


def test_no_deprecation_warning_on_every_rank(two_process_run):
    "DDP is built without the deprecated broadcast_buffers argument (torch 2.13 warns on every rank for it)."
    stderr = (two_process_run / 'stderr.txt').read_text()
    assert 'broadcast_buffers' not in stderr and 'FutureWarning' not in stderr, stderr[-2000:]


def test_ranks_roll_back_together(two_process_run):
    "Only rank 0's chains explode; both ranks return to the same checkpoint and stay in step."
    r0, r1 = (torch.load(two_process_run / f'rollback_rank{r}.pt') for r in (0, 1))
    assert r0['rollbacks'] == r1['rollbacks'] == 1 and r0['step'] == r1['step'] == 8
    for name in r0['model']:
        torch.testing.assert_close(r0['model'][name], r1['model'][name])
