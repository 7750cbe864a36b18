"Tests of torchebm.training: bit-for-bit resume after a crash, atomic checkpoints, divergence, callbacks."
import math
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import torchebm
import torchebm.training as training
from toy_training import GaussianEnergy, ToyPCD
from torchebm.training import (Trainer, Callback, EarlyStopping, LambdaCallback, TrainingDivergedError,
                               latest_checkpoint, list_checkpoints, make_dataloader, atomic_save, checkpoint_path)

REPO = Path(torchebm.__file__).resolve().parents[1]


class NoisyScalarLoss(nn.Module):
    "A scalar loss with its own generator (denoising-style noise), to check generator states are resumed."
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.generator = torch.Generator().manual_seed(5)

    def forward(self, x):
        noisy = x + 0.1 * torch.randn(x.shape, generator=self.generator)
        return self.model(noisy).mean() + 0.05 * self.model(noisy).pow(2).mean()


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(96, 2, generator=g) @ torch.tensor([[1.0, 0.0], [0.8, 0.5]]) + 1.0


def _run(ckpt, loss_kind='pcd', epochs=3, callbacks=(), resume=None, every=4):
    torch.manual_seed(1)
    model = GaussianEnergy(2)
    loss = ToyPCD(model, 2) if loss_kind == 'pcd' else NoisyScalarLoss(model)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    trainer = Trainer(model, loss, opt, lr_scheduler=torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.9),
                      ema_decay=0.8, grad_clip=1.0, checkpoint_dir=ckpt, checkpoint_every=every,
                      callbacks=callbacks, seed=0, progress=False, log_every=3)
    trainer.fit(make_dataloader(TensorDataset(_data()), batch_size=16, seed=3), epochs, resume=resume)
    return trainer


def _assert_same(a: Trainer, b: Trainer):
    for name, value in a.model.state_dict().items(): assert torch.equal(b.model.state_dict()[name], value), name
    for name, value in a.ema_model.state_dict().items(): assert torch.equal(b.ema_model.state_dict()[name], value)
    torch.testing.assert_close(dict(b.loss_fn.state_dict()), dict(a.loss_fn.state_dict()), rtol=0, atol=0)
    assert a.optimizer.param_groups[0]['lr'] == b.optimizer.param_groups[0]['lr']
    assert a.step == b.step and a.epoch == b.epoch
    assert [h['loss'] for h in a.history] == pytest.approx([h['loss'] for h in b.history], rel=1e-6)
    assert a.step_history == b.step_history


class Crash(Callback):
    def __init__(self, at): self.at = at
    def on_step(self, trainer, logs):
        if trainer.step == self.at: raise RuntimeError('simulated crash')


@pytest.mark.parametrize('loss_kind', ['pcd', 'scalar'])
@pytest.mark.parametrize('crash_at', [6, 13])
def test_resume_after_crash_is_bit_for_bit(tmp_path, loss_kind, crash_at):
    reference = _run(tmp_path / 'ref', loss_kind)
    with pytest.raises(RuntimeError, match='simulated crash'):
        _run(tmp_path / 'run', loss_kind, callbacks=[Crash(crash_at)])
    assert latest_checkpoint(tmp_path / 'run').name == f'checkpoint-{(crash_at // 4) * 4:09d}.pt'
    resumed = _run(tmp_path / 'run', loss_kind, resume=True)
    _assert_same(reference, resumed)


def test_resume_after_killed_process(tmp_path):
    "A subprocess dies abruptly (os._exit, no cleanup) mid-epoch; resuming here matches an uninterrupted run."
    script = tmp_path / 'killed.py'
    script.write_text(textwrap.dedent(f'''
        import os, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import torch
        torch.set_num_threads(1)
        from test_training import _run
        from torchebm.training import LambdaCallback
        die = LambdaCallback(on_step=lambda trainer, logs: os._exit(9) if trainer.step == 10 else None)
        _run({str(tmp_path / 'run')!r}, callbacks=[die])
    '''))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS='1')
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 9, result.stderr[-2000:]
    assert latest_checkpoint(tmp_path / 'run').name == 'checkpoint-000000008.pt'
    _assert_same(_run(tmp_path / 'ref'), _run(tmp_path / 'run', resume=True))


def test_atomic_write_survives_crash_during_write(tmp_path, monkeypatch):
    trainer = _run(tmp_path, epochs=1, every=2)
    good = latest_checkpoint(tmp_path)
    before = good.read_bytes()
    real_save = torch.save

    def broken_save(obj, f, *args, **kwargs):
        f.write(b'partial garbage')
        raise OSError('disk full')

    monkeypatch.setattr(training.torch, 'save', broken_save)
    with pytest.raises(OSError, match='disk full'):
        trainer.save_checkpoint()
    with pytest.raises(OSError, match='disk full'):
        atomic_save({'x': 1}, good)   # even overwriting the same file keeps the old bytes
    monkeypatch.setattr(training.torch, 'save', real_save)
    assert good.read_bytes() == before
    assert latest_checkpoint(tmp_path) == good
    assert not [p for p in tmp_path.iterdir() if 'tmp' in p.name]
    state = torch.load(good, weights_only=False)
    assert state['step'] == trainer.step


def test_keeps_only_recent_checkpoints(tmp_path):
    _run(tmp_path, epochs=2, every=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ['checkpoint-000000011.pt', 'checkpoint-000000012.pt']


class NaNAtStep(nn.Module):
    "Finite loss until call `bad_call`, then NaN."
    def __init__(self, model, bad_call):
        super().__init__()
        self.model, self.bad_call, self.calls = model, bad_call, 0

    def forward(self, x):
        self.calls += 1
        loss = self.model(x).pow(2).mean()
        return loss * float('nan') if self.calls >= self.bad_call else loss


@pytest.mark.parametrize('log_every', [1, 4])
def test_divergence_names_the_step_and_keeps_last_good_checkpoint(tmp_path, log_every):
    model = GaussianEnergy(2)
    trainer = Trainer(model, NaNAtStep(model, 7), torch.optim.SGD(model.parameters(), lr=0.01),
                      checkpoint_dir=tmp_path, checkpoint_every=2, log_every=log_every, progress=False)
    with pytest.raises(TrainingDivergedError, match='at step 7 .*checkpoint-000000006.pt'):
        trainer.fit(make_dataloader(TensorDataset(_data()), batch_size=8), epochs=2)
    assert latest_checkpoint(tmp_path).name == 'checkpoint-000000006.pt'
    state = torch.load(latest_checkpoint(tmp_path), weights_only=False)
    assert all(torch.isfinite(v).all() for v in state['model'].values())


def test_nonfinite_negatives_are_divergence(tmp_path):
    class BadNegatives(nn.Module):
        def __init__(self, model):
            super().__init__(); self.model = model
        def forward(self, x):
            return self.model(x).mean(), torch.full_like(x, float('inf'))
    model = GaussianEnergy(2)
    trainer = Trainer(model, BadNegatives(model), torch.optim.SGD(model.parameters(), lr=0.01), progress=False)
    with pytest.raises(TrainingDivergedError, match='at step 1 '):
        trainer.fit(make_dataloader(TensorDataset(_data()), batch_size=8), epochs=1)


def test_callbacks_order_and_early_stopping():
    events = []
    model = GaussianEnergy(2)
    cb = LambdaCallback(on_fit_start=lambda t: events.append('start'),
                        on_step=lambda t, logs: events.append(('step', logs['step'])),
                        on_epoch=lambda t, logs: events.append(('epoch', logs['epoch'])),
                        on_fit_end=lambda t: events.append('end'))
    stopper = EarlyStopping(patience=2, min_delta=1e9)
    trainer = Trainer(model, lambda x: model(x).pow(2).mean(), torch.optim.SGD(model.parameters(), lr=0.01),
                      callbacks=[cb, stopper], progress=False)
    history = trainer.fit(make_dataloader(TensorDataset(_data()), batch_size=48), epochs=10)
    assert len(history) == 3 and 'early stopping' in trainer.stop_reason
    assert events == ['start', ('step', 1), ('step', 2), ('epoch', 1), ('step', 3), ('step', 4), ('epoch', 2),
                      ('step', 5), ('step', 6), ('epoch', 3), 'end']


def test_stop_from_step_callback_and_resume_continues(tmp_path):
    stopper = LambdaCallback(on_step=lambda t, logs: t.stop('enough') if t.step == 5 else None)
    t1 = _run(tmp_path / 'a', callbacks=[stopper])
    assert t1.step == 5 and t1.stop_reason == 'enough'
    assert latest_checkpoint(tmp_path / 'a').name == 'checkpoint-000000005.pt'
    _assert_same(_run(tmp_path / 'ref'), _run(tmp_path / 'a', resume=True))


@pytest.mark.parametrize('precision,dtype', [('bf16', torch.bfloat16), (True, torch.bfloat16), ('fp16', torch.float16)])
def test_mixed_precision_on_cpu_trains(precision, dtype, tmp_path):
    torch.manual_seed(0)
    model = GaussianEnergy(2)
    trainer = Trainer(model, ToyPCD(model, 2), torch.optim.Adam(model.parameters(), lr=0.01),
                      mixed_precision=precision, progress=False, checkpoint_dir=tmp_path)
    trainer.fit(make_dataloader(TensorDataset(_data()), batch_size=16), epochs=2)
    assert trainer.autocast_dtype is dtype and model.mu.dtype == torch.float32
    assert (trainer.scaler is not None) == (dtype is torch.float16)
    assert (torch.load(latest_checkpoint(tmp_path), weights_only=False)['scaler'] is not None) == (dtype is torch.float16)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_progress_bar_shows_energies(capsys):
    model = GaussianEnergy(2)
    trainer = Trainer(model, ToyPCD(model, 2), torch.optim.SGD(model.parameters(), lr=0.01), log_every=1)
    trainer.fit(make_dataloader(TensorDataset(_data()), batch_size=16), epochs=1)
    err = capsys.readouterr().err
    assert 'e_pos' in err and 'e_neg' in err and 'loss' in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_fp16_with_grad_scaler():
    model = GaussianEnergy(2).cuda()
    trainer = Trainer(model, ToyPCD(model, 2), torch.optim.Adam(model.parameters(), lr=0.01),
                      mixed_precision='fp16', progress=False)
    trainer.fit(make_dataloader(TensorDataset(_data().cuda()), batch_size=16), epochs=1)
    assert trainer.scaler is not None and all(torch.isfinite(p).all() for p in model.parameters())


def test_bad_arguments(tmp_path):
    model = GaussianEnergy(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = ToyPCD(model, 2)
    with pytest.raises(TypeError, match='optimizer'): Trainer(model, loss, 'sgd')
    with pytest.raises(TypeError, match='loss_fn'): Trainer(model, 3, opt)
    with pytest.raises(ValueError, match='grad_clip'): Trainer(model, loss, opt, grad_clip=-1.0)
    with pytest.raises(ValueError, match='ema_decay'): Trainer(model, loss, opt, ema_decay=1.0)
    with pytest.raises(ValueError, match='scheduler_interval'): Trainer(model, loss, opt, scheduler_interval='batch')
    with pytest.raises(TypeError, match='callbacks'): Trainer(model, loss, opt, callbacks=[print])
    with pytest.raises(ValueError, match='checkpoint_every'): Trainer(model, loss, opt, checkpoint_every=0)
    t = Trainer(model, loss, opt, progress=False)
    with pytest.raises(ValueError, match='epochs'): t.fit(make_dataloader(TensorDataset(_data()), 16), epochs=0)
    with pytest.raises(ValueError, match='checkpoint_dir'): t.fit(make_dataloader(TensorDataset(_data()), 16), 1, resume=True)
    with pytest.raises(FileNotFoundError): t.load_checkpoint(tmp_path)
    bad = Trainer(model, lambda x: model(x), opt, progress=False)
    with pytest.raises(TypeError, match='scalar'): bad.fit(make_dataloader(TensorDataset(_data()), 16), 1)


def _cd_run(ckpt, callbacks=(), resume=None):
    "Persistent CD from torchebm.losses with a LangevinDynamics sampler (both use the global RNG)."
    from torchebm.core.base import BaseModel
    from torchebm.losses.contrastive_divergence import ContrastiveDivergence
    from torchebm.samplers.langevin import LangevinDynamics

    class Energy(BaseModel):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(2, 16), nn.SiLU(), nn.Linear(16, 1))
        def forward(self, x): return self.net(x).squeeze(-1) + 0.05 * x.pow(2).sum(-1)

    torch.manual_seed(2)
    model = Energy()
    loss = ContrastiveDivergence(model=model, sampler=LangevinDynamics(model, step_size=0.01), k_steps=3,
                                 persistent=True, buffer_size=64)
    trainer = Trainer(model, loss, torch.optim.Adam(model.parameters(), lr=1e-3), checkpoint_dir=ckpt,
                      checkpoint_every=4, callbacks=callbacks, seed=0, progress=False, ema_decay=0.9)
    trainer.fit(make_dataloader(TensorDataset(_data()), batch_size=16, seed=1), 2, resume=resume)
    return trainer


def test_resume_with_torchebm_persistent_cd(tmp_path):
    pytest.importorskip('torchebm.losses.contrastive_divergence')
    reference = _cd_run(tmp_path / 'ref')
    with pytest.raises(RuntimeError, match='simulated crash'):
        _cd_run(tmp_path / 'run', callbacks=[Crash(7)])
    resumed = _cd_run(tmp_path / 'run', resume=True)
    _assert_same(reference, resumed)
    assert resumed.loss_fn.replay_buffer.shape == (64, 2)


@pytest.mark.skipif(sys.version_info < (3, 11), reason='exception notes need Python 3.11')
def test_errors_raised_by_the_loss_name_the_step():
    model = GaussianEnergy(2)
    calls = []
    def loss(x):
        calls.append(1)
        if len(calls) == 3: raise ValueError('ContrastiveDivergence: the loss is nan')
        return model(x).mean()
    trainer = Trainer(model, loss, torch.optim.SGD(model.parameters(), lr=0.01), progress=False)
    with pytest.raises(ValueError, match='the loss is nan') as info:
        trainer.fit(make_dataloader(TensorDataset(_data()), batch_size=8), epochs=1)
    assert any('training step 3 (epoch 1)' in note for note in info.value.__notes__)


# -- silent failures of the old trainer (each test fails on it) ------------------------------------------------

def _labelled_data():
    x = _data()
    return x, (x[:, 0] > 1).long()


def test_labels_reach_the_loss_as_y():
    seen = []
    model = GaussianEnergy(2)
    def conditional(x, y=None):
        seen.append(y)
        return model(x).mean() + 0.1 * model(x).pow(2).mean()
    x, y = _labelled_data()
    Trainer(model, conditional, torch.optim.SGD(model.parameters(), lr=0.01), progress=False).fit(
        make_dataloader(TensorDataset(x, y), batch_size=96, shuffle=False), epochs=1)
    assert len(seen) == 1 and torch.equal(seen[0], y)
    unconditional = Trainer(model, lambda x: model(x).mean(), torch.optim.SGD(model.parameters(), lr=0.01), progress=False)
    with pytest.raises(TypeError, match='no `y` argument'):
        unconditional.fit(make_dataloader(TensorDataset(x, y), batch_size=16), epochs=1)
    with pytest.raises(TypeError, match='3-tuple'):
        unconditional.fit(make_dataloader(TensorDataset(x, y, y), batch_size=16), epochs=1)


class Explode(nn.Module):
    "A finite loss of -2.5e16 (kind='loss') or finite negatives at 1.6e4 (kind='samples') from call `at` on."
    def __init__(self, model, at, kind):
        super().__init__()
        self.model, self.at, self.kind, self.calls = model, at, kind, 0

    def forward(self, x):
        self.calls += 1
        loss = self.model(x).mean() + 0.1 * self.model(x).pow(2).mean()
        neg = torch.randn_like(x)
        if self.calls >= self.at:
            if self.kind == 'loss': loss = loss - 2.5e16 + loss.detach() * 0
            else: neg = neg + 1.6e4
        return loss, neg


@pytest.mark.parametrize('kind', ['loss', 'samples'])
def test_exploding_runs_warn_or_raise(kind):
    model = GaussianEnergy(2)
    loader = make_dataloader(TensorDataset(_data()), batch_size=8)
    trainer = Trainer(model, Explode(model, 3, kind), torch.optim.SGD(model.parameters(), lr=1e-20), progress=False, log_every=2)
    with pytest.warns(UserWarning, match='exploding at step 3'):
        trainer.fit(loader, epochs=1)
    strict = Trainer(model, Explode(model, 3, kind), torch.optim.SGD(model.parameters(), lr=1e-20), progress=False,
                     log_every=2, on_divergence='raise')
    with pytest.raises(TrainingDivergedError, match='exploding at step 3'):
        strict.fit(loader, epochs=1)


def test_rollback_returns_to_the_last_good_checkpoint_with_new_streams(tmp_path):
    class Unlucky(ToyPCD):
        "Chains blow up (finite) on call 7 only; calls are counted across rollbacks."
        calls = 0
        def forward(self, x):
            Unlucky.calls += 1
            loss, neg = super().forward(x)
            return loss, (neg * 1e4 if Unlucky.calls == 7 else neg)
    torch.manual_seed(0)
    model = GaussianEnergy(2)
    trainer = Trainer(model, Unlucky(model, 2), torch.optim.SGD(model.parameters(), lr=0.01), checkpoint_dir=tmp_path,
                      checkpoint_every=4, log_every=2, seed=0, progress=False, on_divergence='rollback', max_rollbacks=1)
    with pytest.warns(UserWarning, match='Rolling back to checkpoint-000000004.pt'):
        trainer.fit(make_dataloader(TensorDataset(_data()), batch_size=16), epochs=2)
    assert trainer.rollbacks == 1 and trainer.step == 12
    assert [s['step'] for s in trainer.step_history] == list(range(1, 13))
    # the replayed steps drew new random numbers: losses after the rollback differ from a run without it
    torch.manual_seed(0)
    clean_model = GaussianEnergy(2)
    clean = Trainer(clean_model, ToyPCD(clean_model, 2), torch.optim.SGD(clean_model.parameters(), lr=0.01), seed=0,
                    progress=False)
    clean.fit(make_dataloader(TensorDataset(_data()), batch_size=16), epochs=2)
    assert trainer.step_history[3]['loss'] == clean.step_history[3]['loss']
    assert trainer.step_history[4]['loss'] != clean.step_history[4]['loss']
    # without a checkpoint, or past max_rollbacks, it raises
    Unlucky.calls = 0
    no_ckpt = Trainer(model, Unlucky(model, 2), torch.optim.SGD(model.parameters(), lr=0.01), log_every=2,
                      progress=False, on_divergence='rollback')
    with pytest.raises(TrainingDivergedError, match='Cannot roll back: no checkpoint'):
        no_ckpt.fit(make_dataloader(TensorDataset(_data()), batch_size=16), epochs=2)


class ModeRecorder(nn.Module):
    "Records (grad enabled, training) at every forward; has dropout (not used in the energy)."
    def __init__(self):
        super().__init__()
        self.inner = GaussianEnergy(2)
        self.drop = nn.Dropout(0.5)
        self.calls = []

    def forward(self, x):
        self.calls.append((torch.is_grad_enabled(), self.training))
        return self.inner(x)


def test_fit_evaluates_in_eval_mode_and_restores_the_mode():
    from torchebm.core.base import BaseModel
    class Energy(ModeRecorder, BaseModel): pass
    model = Energy()
    in_callbacks = []
    cb = LambdaCallback(on_step=lambda t, logs: in_callbacks.append(t.model.training),
                        on_epoch=lambda t, logs: in_callbacks.append(t.model.training))
    trainer = Trainer(model, ToyPCD(model, 2), torch.optim.SGD(model.parameters(), lr=0.01), log_every=1,
                      ema_decay=0.9, callbacks=[cb], progress=False)
    model.eval()
    trainer.fit(make_dataloader(TensorDataset(_data()), batch_size=32), epochs=1)
    evaluations = [training for grad, training in model.calls if not grad]
    assert evaluations and not any(evaluations)            # the trainer's own energies: eval mode
    assert any(training for grad, training in model.calls if grad)  # the loss: train mode
    assert in_callbacks and not any(in_callbacks)
    assert model.training is False and trainer.ema_model.training is False


def test_final_checkpoint_is_always_written(tmp_path):
    model = GaussianEnergy(2)
    trainer = Trainer(model, ToyPCD(model, 2), torch.optim.SGD(model.parameters(), lr=0.01), checkpoint_dir=tmp_path,
                      checkpoint_every=5, progress=False)
    trainer.fit(make_dataloader(TensorDataset(_data()), batch_size=8), epochs=1)   # 12 steps
    assert latest_checkpoint(tmp_path).name == 'checkpoint-000000012.pt'


def test_checkpoint_every_epoch_opt_in(tmp_path):
    model = GaussianEnergy(2)
    trainer = Trainer(model, ToyPCD(model, 2), torch.optim.SGD(model.parameters(), lr=0.01), checkpoint_dir=tmp_path,
                      checkpoint_every=5, checkpoint_every_epoch=True, keep_checkpoints=10, progress=False)
    trainer.fit(make_dataloader(TensorDataset(_data()), batch_size=16), epochs=2)  # 6 steps per epoch
    assert [int(p.name[11:20]) for p in list_checkpoints(tmp_path)] == [5, 6, 10, 12]


def test_finite_loss_with_nan_gradient_never_becomes_a_good_checkpoint(tmp_path):
    model = GaussianEnergy(2)
    calls = []
    def loss(x):
        calls.append(1)
        value = model(x).mean() + 0.1 * model(x).pow(2).mean()
        if len(calls) == 5:   # sqrt at 0: the value is 0 (finite loss), the gradient inf
            value = value + (model.mu.sum() - model.mu.sum().detach()).sqrt()
        return value
    trainer = Trainer(model, loss, torch.optim.SGD(model.parameters(), lr=0.01), checkpoint_dir=tmp_path,
                      checkpoint_every=1, log_every=10, progress=False)
    with pytest.raises(TrainingDivergedError, match='at step 5 .*checkpoint-000000004.pt'):
        trainer.fit(make_dataloader(TensorDataset(_data()), batch_size=8), epochs=1)
    assert latest_checkpoint(tmp_path).name == 'checkpoint-000000004.pt'
    state = torch.load(latest_checkpoint(tmp_path), weights_only=False)
    assert all(torch.isfinite(v).all() for v in state['model'].values())
    with pytest.raises(TrainingDivergedError):
        trainer.save_checkpoint()   # inf parameters are never saved, even when asked
    assert latest_checkpoint(tmp_path).name == 'checkpoint-000000004.pt'


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True)
    orphan = tmp_path / f'.checkpoint-000000008.pt.tmp-{int(dead.stdout)}'
    orphan.write_bytes(b'half a checkpoint')
    alive = tmp_path / f'.checkpoint-000000009.pt.tmp-{os.getpid()}'
    alive.write_bytes(b'a write in progress')
    model = GaussianEnergy(2)
    Trainer(model, ToyPCD(model, 2), torch.optim.SGD(model.parameters(), lr=0.01), checkpoint_dir=tmp_path,
            progress=False).fit(make_dataloader(TensorDataset(_data()), batch_size=32), epochs=1)
    assert not orphan.exists() and alive.exists()


def test_seed_uses_the_trainers_own_streams():
    import random
    import numpy as np
    def draws(): return torch.rand(2), np.random.rand(), random.random()
    torch.manual_seed(5); np.random.seed(5); random.seed(5)
    expected = draws()
    model = GaussianEnergy(2)
    loss = ToyPCD(model, 2)   # its buffer is drawn from the global stream: made before seeding
    torch.manual_seed(5); np.random.seed(5); random.seed(5)
    trainer = Trainer(model, loss, torch.optim.SGD(model.parameters(), lr=0.01), seed=0, progress=False)
    trainer.fit(make_dataloader(TensorDataset(_data()), batch_size=32), epochs=1)
    got = draws()
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


def test_ema_warmup_and_max_steps_and_step_history():
    model = GaussianEnergy(2)
    trainer = Trainer(model, ToyPCD(model, 2), torch.optim.SGD(model.parameters(), lr=0.01), ema_decay=0.999,
                      progress=False, log_every=4)
    trainer.fit(make_dataloader(TensorDataset(_data()), batch_size=16), epochs=5, max_steps=9)
    assert (trainer.step, trainer.epoch, len(trainer.history)) == (9, 1, 1)
    assert trainer.ema.n_updates == 9 and trainer.ema.current_decay() == pytest.approx(10 / 19)
    records = trainer.step_history
    assert [r['step'] for r in records] == list(range(1, 10)) and all(math.isfinite(r['loss']) for r in records)
    assert 'e_pos' in records[3] and 'e_pos' not in records[2]   # logged metrics at the logging steps
    # with warm-up the average follows the weights closely after a few steps; a fixed 0.999 would not
    for name, value in model.state_dict().items():
        torch.testing.assert_close(trainer.ema_model.state_dict()[name], value, atol=0.05, rtol=0)


def test_one_progress_bar(capsys):
    model = GaussianEnergy(2)
    Trainer(model, ToyPCD(model, 2), torch.optim.SGD(model.parameters(), lr=0.01), log_every=1).fit(
        make_dataloader(TensorDataset(_data()), batch_size=16), epochs=3)
    err = capsys.readouterr().err
    assert 'training' in err and '18/18' in err and 'epoch 1/' not in err


def test_loads_checkpoints_of_the_previous_format(tmp_path):
    "Format 1 (before the rewrite) held torch's AveragedModel EMA state and no step history."
    trainer = _run(tmp_path / 'run', epochs=1)
    state = torch.load(latest_checkpoint(tmp_path / 'run'), weights_only=False)
    ema = {k: v for k, v in state['ema'].items() if k != '_extra_state'}
    old = {**state, 'format': 1, 'ema': {**ema, 'n_averaged': torch.tensor(6)}}
    del old['step_history']
    torch.save(old, tmp_path / 'old.pt')
    model = GaussianEnergy(2)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    fresh = Trainer(model, ToyPCD(model, 2), opt, lr_scheduler=torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.9),
                    ema_decay=0.8, progress=False)
    fresh.load_checkpoint(tmp_path / 'old.pt')
    assert fresh.ema.n_updates == 6 and fresh.step == trainer.step and fresh.step_history == []
    for name, value in trainer.ema_model.state_dict().items():
        assert torch.equal(fresh.ema_model.state_dict()[name], value)
