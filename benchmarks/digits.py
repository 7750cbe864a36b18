"""Image models on scikit-learn's 8x8 digits (issue 14): train, sample, score with an independent classifier, and
write the scored samples for anyone to re-score.

    python benchmarks/digits.py --model flow            # flow matching (UNetVelocity), about 10 min of CPU
    python benchmarks/digits.py --model ebm             # conv EBM (short-run CD from noise, pixel box): fresh chains
    python benchmarks/digits.py --model ebm_pcd         # the same conv EBM by persistent CD with a replay buffer
    python benchmarks/digits.py --model jem             # JEM: test accuracy, class-conditional fresh chains
    python benchmarks/digits.py --model ebm --score-only  # score the stored samples again (no training)

Every model is trained on the seeded training split (`DigitsDataset('train')`, 1,438 images) and judged on the
test split (359 images). Its samples are scored by a classifier trained here on the training split with its own seed
(`torchebm.diagnostics.sample_quality.train_classifier`: mixup and outlier exposure, so blobs are not confident),
against the issue's targets: mean top-class probability >= 0.8 and every class >= 5% of the samples; for the flow
also dequantised test bits/dim <= 2.3 (by default on the first 128 test digits). The samples, clipped to the data's range and written at the dataset's pixel
scale 0..16 as a float tensor `[n, 1, 8, 8]`, go to `benchmarks/results/digits_<model>_samples.pt`; the numbers
to `benchmarks/results/digits_<model>.json`. JEM also targets test accuracy >= 95%.
"""
import argparse
import json
import math
import platform
import time
from pathlib import Path
from typing import Callable, Dict

import torch

from torchebm.datasets import DigitsDataset
from torchebm.diagnostics.sample_quality import sample_quality, train_classifier

RESULTS = Path(__file__).resolve().parent / 'results'
TARGETS = {'confidence': 0.8, 'min_class_share': 0.05, 'flow_test_bits_per_dim': 2.3, 'jem_test_accuracy': 0.95}
CLASSIFIER_SEED = 12345  # the judge's own seed, different from every model's


# -- shared parts ---------------------------------------------------------------------------------------------------
def digits(dtype=torch.float32):
    "The seeded train and test splits in [-1, 1] (17 levels: bin width 1/8)."
    return DigitsDataset('train', dtype=dtype), DigitsDataset('test', dtype=dtype)


def independent_classifier(train):
    "The judge: a small conv classifier trained on the training split only; prints its test accuracy."
    t0 = time.time()
    classifier = train_classifier(train.images, train.labels, generator=torch.Generator().manual_seed(CLASSIFIER_SEED))
    _, test = digits(train.dtype)
    with torch.no_grad(): accuracy = float((classifier.logits(test.images).argmax(1) == test.labels).float().mean())
    print(f"independent classifier: test accuracy {accuracy:.4f} ({time.time() - t0:.0f} s)", flush=True)
    return classifier, accuracy


def score_and_save(model: str, samples: torch.Tensor, train, test, extra: Dict, judge=None) -> Dict:
    """Clip `samples` (in [-1, 1] units) to the data's range, score them (by `judge`, an `independent_classifier(train)`
    result, trained here when not given), write them at pixel scale 0..16 and the numbers as JSON; returns the numbers."""
    if samples.ndim != 4 or samples.shape[1:] != (1, 8, 8) or samples.shape[0] < 1000:
        raise ValueError(f"expected at least 1000 samples [n, 1, 8, 8], got {tuple(samples.shape)}")
    n_outside = int(((samples < -1) | (samples > 1)).sum())
    samples = samples.detach().clamp(*train.value_range)
    classifier, accuracy = judge or independent_classifier(train)
    quality = sample_quality(classifier, samples, reference=test.images)
    real = sample_quality(classifier, test.images, reference=train.images)
    RESULTS.mkdir(exist_ok=True)
    torch.save(train.to_levels(samples).float().cpu(), RESULTS / f'digits_{model}_samples.pt')
    numbers = {
        'model': model, **extra,
        'n_samples': samples.shape[0], 'pixels_clipped': n_outside,
        'classifier_test_accuracy': accuracy,
        'confidence': quality.confidence, 'class_shares': [round(float(c), 4) for c in quality.coverage],
        'min_class_share': quality.min_coverage, 'frechet_distance_to_test': quality.frechet_distance,
        'real_test_digits': {'confidence': real.confidence, 'min_class_share': real.min_coverage,
                             'frechet_distance_to_train': real.frechet_distance},
        'meets_sample_targets': quality.meets(TARGETS['confidence'], TARGETS['min_class_share']),
        'machine': f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)",
    }
    (RESULTS / f'digits_{model}.json').write_text(json.dumps(numbers, indent=2) + '\n')
    print(f"{model}: samples {quality}  (real test digits: {real})")
    print(f"{model}: meets the sample targets (confidence >= {TARGETS['confidence']}, every class >= "
          f"{TARGETS['min_class_share']:.0%}): {numbers['meets_sample_targets']}")
    print(f"wrote {RESULTS / f'digits_{model}_samples.pt'} and {RESULTS / f'digits_{model}.json'}")
    return numbers


# -- flow matching ----------------------------------------------------------------------------------------------------
def train_flow(train, steps: int, batch_size: int, lr: float, seed: int, channels=(32, 64), cond_dim: int = 64):
    "Flow matching (linear path) of a `UNetVelocity` on uniformly dequantised training digits; Adam, one-cycle schedule."
    from torchebm.losses import FlowMatchingLoss
    from torchebm.models import UNetVelocity
    torch.manual_seed(seed)
    net = UNetVelocity(channels=channels, cond_dim=cond_dim)
    loss_fn = FlowMatchingLoss(net)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    data, t0, running = train.get_data(), time.time(), []
    for step in range(1, steps + 1):
        batch = train.dequantize(data[torch.randint(0, len(data), (batch_size,), generator=g)], generator=g)
        loss = loss_fn(batch, generator=g)
        opt.zero_grad(); loss.backward(); opt.step(); schedule.step()
        running.append(loss.detach())
        if step % 250 == 0 or step == steps:
            print(f"flow step {step}/{steps}: loss {torch.stack(running).mean():.4f} ({time.time() - t0:.0f} s)", flush=True)
            running = []
    return net.eval()


def run_flow(args) -> Dict:
    from torchebm.samplers import FlowSampler
    from torchebm.samplers.likelihood import flow_likelihood
    train, test = digits()
    t0 = time.time()
    steps, batch_size, lr = args.steps or 1500, args.batch_size or 128, args.lr or 2e-3
    if args.checkpoint:  # weights of an earlier run of this recipe (same seed and settings): skip the training
        from torchebm.models import UNetVelocity
        net = UNetVelocity(channels=(32, 64), cond_dim=64)
        net.load_state_dict(torch.load(args.checkpoint)['net']); net.eval()
    else:
        net = train_flow(train, steps, batch_size, lr, args.seed)
        if args.save_checkpoint: torch.save({'net': net.state_dict()}, args.save_checkpoint)
    train_time = time.time() - t0
    sampler = FlowSampler(net, integrator='heun', n_steps=args.ode_steps)
    t0 = time.time()
    g = torch.Generator().manual_seed(args.seed + 1)
    scored = test.get_data()[:args.n_test_likelihood]
    likelihood = flow_likelihood(sampler, scored, n_levels=train.n_levels, generator=g)
    bpd = likelihood.bits_per_dim
    bpd_mean, bpd_se = float(bpd.mean()), float(bpd.std() / math.sqrt(len(bpd)))
    print(f"flow: dequantised test bits/dim {bpd_mean:.4f} +- {bpd_se:.4f} on {len(scored)} test digits (Hutchinson, {args.ode_steps} Heun steps; "
          f"target <= {TARGETS['flow_test_bits_per_dim']}; uniform coding {math.log2(17):.3f}) "
          f"({time.time() - t0:.0f} s)", flush=True)
    samples = sampler.sample(dim=(1, 8, 8), n_samples=args.n_samples, generator=g)
    extra = {'train_steps': steps, 'batch_size': batch_size, 'lr': lr, 'seed': args.seed,
             'network': 'UNetVelocity(channels=(32, 64), cond_dim=64)',
             'parameters': sum(p.numel() for p in net.parameters()),
             'train_seconds': None if args.checkpoint else round(train_time), 'loaded_checkpoint': bool(args.checkpoint),
             'ode': f"heun, {args.ode_steps} steps",
             'test_images_in_bits_per_dim': len(scored), 'test_bits_per_dim': bpd_mean, 'test_bits_per_dim_standard_error': bpd_se,
             'meets_bits_per_dim_target': bpd_mean <= TARGETS['flow_test_bits_per_dim']}
    return score_and_save('flow', samples, train, test, extra)


# -- conv EBM and JEM ---------------------------------------------------------------------------------------------------
# Both learn by short-run, non-persistent MCMC (Nijkamp et al. 2019, "Learning Non-Convergent Non-Persistent Short-Run
# MCMC toward Energy-Based Model"): every training step runs `k_steps` of SGLD from uniform noise (a replay buffer of
# one batch with `reinit_prob=1`, so no chain survives a step), and the samples scored are drawn by exactly that sampler:
# fresh uniform noise plus `k_steps`, then `final_steps` of it without the noise (the EBM: 10; JEM: 0). The EBM's
# 8,000 steps meet the targets with or without those 10 steps (same checkpoint, 1,000 chains: confidence 0.864,
# smallest class 7.7%, Frechet 1.43 without; 0.898, 6.7%, 3.02 with; `--seed 1`, with: 0.881, 6.9%, 3.05); after
# 2,400 steps (0.710 -> 0.751) and 4,000 (0.765 -> 0.815, smallest class 6.5% -> 5.5%) they held only with them.
# SGLD: a gradient step of `step_size` and Gaussian noise of std `noise` (far below exact Langevin's
# sqrt(2 step_size)), pixels clamped to the data's [-1, 1] (`box`). The data get Gaussian noise of std
# `data_noise` (as in Nijkamp et al.), which keeps the energy smooth around the discrete pixel levels.
EBM_CONFIG = dict(channels=(16, 32, 64), batch_size=64, k_steps=40, final_steps=10, step_size=1.0, noise=0.01,
                  data_noise=0.03, energy_reg=0.01, lr=1e-3, betas=(0.9, 0.999), steps=8000, cosine=True, ema=0.999)
# JEM: cross-entropy on p(y|x) plus contrastive divergence on p(x|y) with class-conditional short-run chains (each
# negative starts from noise and descends E(x, y) = -f(x)[y] for the label of its data row); scored samples are drawn
# the same way, 100 per class. Without the energy penalty (`energy_reg`, on E(x, y)^2 of data and negatives) the
# contrastive term ran away (loss -229 after 200 steps at lr 5e-4).
# The same conv EBM by persistent CD (IGEBM-style): a replay buffer of 10,000 chains, each call restarts 5% of the
# batch from uniform noise and continues the rest for `k_steps`. Scored twice: fresh chains (noise + `k_steps` +
# `final_steps`, the target) and the buffer's chains (what PCD trains on). Results: `digits_ebm_pcd.json`
# (4,000 steps): the buffer scores well (confidence 0.771, smallest class 8.1%, Frechet 1.92) but fresh chains do not
# (0.585, 3.3%, 11.5): a PCD model's energy is shaped around its long-run chains, not around 50 steps from noise.
EBM_PCD_CONFIG = dict(EBM_CONFIG, buffer_size=10000, reinit_prob=0.05, steps=4000)
JEM_CONFIG = dict(channels=(16, 32), batch_size=64, k_steps=40, final_steps=0, step_size=1.0, noise=0.01, data_noise=0.03,
                  generative_weight=1.0, energy_reg=0.1, classifier_steps=0, classifier_lr=2e-3, lr=1e-3,
                  betas=(0.9, 0.999), steps=1400)


def sgld(model, config):
    "The sampler of both image EBMs: `LangevinDynamics` with noise std `config['noise']` inside the [-1, 1] pixel box."
    from torchebm.samplers.langevin import LangevinDynamics
    noise_scale = config['noise'] / math.sqrt(2 * config['step_size'])  # its noise is sqrt(2 step_size) * noise_scale
    return LangevinDynamics(model, step_size=config['step_size'], noise_scale=noise_scale, box=(-1.0, 1.0))


def short_run_cd(model, config):
    """Contrastive divergence whose negatives are fresh short-run chains: a one-batch buffer that restarts every chain
    (the default), or persistent CD when the config names a `buffer_size` and a `reinit_prob` below 1."""
    from torchebm.losses import PersistentContrastiveDivergence
    return PersistentContrastiveDivergence(model, sgld(model, config), k_steps=config['k_steps'],
                                           buffer_size=config.get('buffer_size', config['batch_size']),
                                           reinit_prob=config.get('reinit_prob', 1.0), buffer_init='uniform',
                                           energy_reg=config['energy_reg'])


def finish(model, config, x, generator):
    """The scored samples' last `config['final_steps']` SGLD steps without noise (gradient steps of `step_size` inside
    the box): they remove the chain's last pixel noise, as short-run EBM papers show their samples."""
    n = config.get('final_steps', 0)
    if not n: return x
    from torchebm.samplers.langevin import LangevinDynamics
    return LangevinDynamics(model, step_size=config['step_size'], noise_scale=0.0, box=(-1.0, 1.0)).sample(
        x=x, n_steps=n, generator=generator)


def uniform_chains(n, generator):
    "`n` fresh chains `[n, 1, 8, 8]`: uniform pixels in [-1, 1]."
    return torch.rand(n, 1, 8, 8, generator=generator) * 2 - 1


def fit(loss_fn, params, train, steps, lr, betas, batch_size, generator, labels=False, data_noise=0.0, log_every=50,
        cosine=False, after_step=None):
    """Adam on `loss_fn` over random batches of `train` (with `y=` labels when `labels`); returns the loss per step.
    `cosine`: the learning rate decays from `lr` to 0 over the `steps` (cosine); `after_step()` runs after each step."""
    opt = torch.optim.Adam(params, lr=lr, betas=betas)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if cosine else None
    history, start = [], time.time()
    for step in range(steps):
        idx = torch.randint(len(train), (batch_size,), generator=generator)
        extra = dict(y=train.labels[idx]) if labels else {}
        x = train.images[idx]
        if data_noise: x = x + data_noise * torch.randn(x.shape, generator=generator)
        loss, _ = loss_fn(x, generator=generator, **extra)
        opt.zero_grad(); loss.backward(); opt.step()
        if schedule: schedule.step()
        if after_step: after_step()
        history.append(float(loss.detach()))
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"  step {step:5d} loss {history[-1]: .4f} ({time.time() - start:.0f} s)", flush=True)
    return history


def model_config(defaults, args):
    "The model's settings with the command line's `--steps`, `--batch-size` and `--lr` when given."
    given = {'steps': args.steps, 'batch_size': args.batch_size, 'lr': args.lr}
    return dict(defaults, **{k: v for k, v in given.items() if v is not None})


def stored_run(model, train):
    "`(samples in [-1, 1], report)` of an earlier run of `model` (for `--score-only`)."
    report = json.loads((RESULTS / f'digits_{model}.json').read_text())
    return train.from_levels(torch.load(RESULTS / f'digits_{model}_samples.pt')), report


def trained(model, c, train_fn, args, generator):
    """Train `model` by `train_fn() -> report`, or load the weights, report and generator state an earlier run of the
    same recipe wrote with `--save-checkpoint` (so the samples drawn next are the ones a full run draws)."""
    if args.checkpoint:
        state, training = torch.load(args.checkpoint), {k: v for k, v in c.items() if k != 'final_steps'}
        saved = {k: v for k, v in state['report']['config'].items() if k != 'final_steps'}
        if saved != json.loads(json.dumps(training)):
            raise ValueError(f"checkpoint {args.checkpoint} was trained with {saved}, not {training}")
        model.load_state_dict(state['net']); generator.set_state(state['generator'])
        return dict(state['report'], config=c, loaded_checkpoint=True)
    report = train_fn()
    if args.save_checkpoint:
        torch.save({'net': model.state_dict(), 'report': json.loads(json.dumps(report)),
                    'generator': generator.get_state()}, args.save_checkpoint)
    return dict(report, loaded_checkpoint=False)


def train_ebm(train, c, n_samples, generator, args):
    """Conv EBM by short-run CD (cosine learning-rate decay when `c['cosine']`); `n_samples` fresh chains (uniform noise
    + `k_steps`, exactly the training sampler) of the EMA weights (`c['ema']`, decay per step; 0: the live weights),
    finished by `final_steps` noise-free steps."""
    from torchebm.models.image import ConvEnergy
    from torchebm.training import EMA
    torch.manual_seed(int(torch.randint(2 ** 31, (1,), generator=generator)))
    model = ConvEnergy(channels=c['channels'])
    ema = EMA(model, decay=c['ema']) if c['ema'] else None
    weights = torch.nn.ModuleDict(dict(model=model, **({'ema': ema} if ema else {})))

    loss_fn = short_run_cd(model, c)

    def train_fn():
        start = time.time()
        history = fit(loss_fn, model.parameters(), train, c['steps'], c['lr'], c['betas'],
                      c['batch_size'], generator, data_noise=c['data_noise'], cosine=c['cosine'],
                      after_step=(lambda: ema.update(model)) if ema else None)
        return dict(config=c, train_seconds=round(time.time() - start), loss_history=history)

    report = trained(weights, c, train_fn, args, generator)
    sampled = ema.module if ema else model.eval()
    report['samples_from'] = (f"fresh chains of the {'EMA' if ema else 'live'} weights in eval mode: uniform noise + "
                              'k_steps SGLD steps (the training sampler), then '
                              f"{c.get('final_steps', 0)} noise-free steps of the same step size")
    samples = sgld(sampled, c).sample(x=uniform_chains(n_samples, generator), n_steps=c['k_steps'], generator=generator)
    if c.get('reinit_prob', 1.0) < 1 and loss_fn.replay_buffer is not None:  # persistent CD: score its chains too
        report['buffer_samples'] = loss_fn.replay_buffer[:n_samples].clone()
    return finish(sampled, c, samples, generator), report


def ebm_runner(name, config):
    "The runner of a conv EBM recipe: train (or load), draw fresh chains, score them; a replay buffer is scored as well."
    def run(args) -> Dict:
        train, test = digits()
        if args.score_only: samples, report = stored_run(name, train)
        else: samples, report = train_ebm(train, model_config(config, args), args.n_samples,
                                          torch.Generator().manual_seed(args.seed), args)
        extra = {k: v for k, v in report.items() if k in ('config', 'train_seconds', 'loss_history', 'samples_from',
                                                          'loaded_checkpoint', 'buffer')}
        judge = independent_classifier(train)
        if 'buffer_samples' in report:
            buffer = sample_quality(judge[0], report['buffer_samples'].clamp(*train.value_range), reference=test.images)
            extra['buffer'] = {'n_samples': len(report['buffer_samples']), 'confidence': buffer.confidence,
                               'min_class_share': buffer.min_coverage, 'frechet_distance_to_test': buffer.frechet_distance}
            print(f"{name}: replay-buffer chains {buffer}", flush=True)
        return score_and_save(name, samples, train, test, extra, judge)
    return run


def train_jem(train, test, c, n_samples, generator, args):
    """JEM: a ConvEnergy classifier trained on cross-entropy, then cross-entropy plus short-run CD on p(x|y);
    class-conditional fresh chains finished by `final_steps` noise-free steps."""
    from torchebm.losses import JEMLoss, JointEnergyModel, calibration
    from torchebm.models.image import ConvEnergy
    torch.manual_seed(int(torch.randint(2 ** 31, (1,), generator=generator)))
    model = JointEnergyModel(ConvEnergy(channels=c['channels'], n_classes=10))
    cross_entropy = JEMLoss(model, sgld(model, c), generative_weight=0.0)

    def train_fn():
        start = time.time()
        fit(cross_entropy, model.parameters(), train, c['classifier_steps'], c['classifier_lr'], c['betas'],
            c['batch_size'], generator, labels=True)
        conditional_cd = short_run_cd(model, c)  # with y=, its chains descend E(x, y) = -f(x)[y]

        def hybrid(x, y, generator):
            (ce, _), (cd, negatives) = (cross_entropy(x, y=y, generator=generator),
                                        conditional_cd(x, y=y, generator=generator))
            return ce + c['generative_weight'] * cd, negatives

        history = fit(hybrid, model.parameters(), train, c['steps'], c['lr'], c['betas'], c['batch_size'], generator,
                      labels=True, data_noise=c['data_noise'])
        return dict(config=c, train_seconds=round(time.time() - start), loss_history=history)

    report = trained(model, c, train_fn, args, generator)
    report['samples_from'] = ('class-conditional fresh chains: uniform noise + k_steps SGLD steps on E(x, y) (the '
                              f"training sampler), then {c.get('final_steps', 0)} noise-free steps of the same step "
                              'size; labels 0..9 in equal numbers')
    model.eval()
    with torch.no_grad(): probs = model.predict_proba(test.images)
    report.update(test_accuracy=float((probs.argmax(-1) == test.labels).float().mean()),
                  test_ece=float(calibration(probs, test.labels).ece))
    labels = torch.arange(10).repeat_interleave(-(-n_samples // 10))[:n_samples]
    conditional = model.conditional(labels)
    samples = sgld(conditional, c).sample(x=uniform_chains(len(labels), generator), n_steps=c['k_steps'],
                                          generator=generator)
    return finish(conditional, c, samples, generator), dict(report, labels=labels.tolist())


def run_jem(args) -> Dict:
    train, test = digits()
    if args.score_only: samples, report = stored_run('jem', train)
    else: samples, report = train_jem(train, test, model_config(JEM_CONFIG, args), args.n_samples,
                                      torch.Generator().manual_seed(args.seed), args)
    extra = {k: v for k, v in report.items() if k in
             ('config', 'train_seconds', 'loss_history', 'test_accuracy', 'test_ece', 'labels', 'samples_from',
              'loaded_checkpoint')}
    extra['meets_accuracy_target'] = report['test_accuracy'] >= TARGETS['jem_test_accuracy']
    return score_and_save('jem', samples, train, test, extra)


# -- registry: one runner per model ----------------------------------------------------------------------------------
MODELS: Dict[str, Callable] = {'flow': run_flow, 'ebm': ebm_runner('ebm', EBM_CONFIG),
                               'ebm_pcd': ebm_runner('ebm_pcd', EBM_PCD_CONFIG), 'jem': run_jem}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', required=True, choices=sorted(MODELS))
    parser.add_argument('--steps', type=int, default=None, help="training steps (default: the model's own)")
    parser.add_argument('--batch-size', type=int, default=None, help="default: the model's own")
    parser.add_argument('--lr', type=float, default=None, help="default: the model's own")
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--n-samples', type=int, default=1000)
    parser.add_argument('--ode-steps', type=int, default=20, help='flow: Heun steps for sampling and likelihood')
    parser.add_argument('--n-test-likelihood', type=int, default=128, help='flow: bits/dim on the first N test digits (359: all)')
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--checkpoint', default=None, help="load an earlier run's --save-checkpoint instead of training")
    parser.add_argument('--save-checkpoint', default=None, help="write the trained weights (ebm, jem: with the report and generator state)")
    parser.add_argument('--score-only', action='store_true', help='ebm, jem: score the stored samples again (no training)')
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    return MODELS[args.model](args)


if __name__ == '__main__':
    main()
