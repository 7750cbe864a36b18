"""Image EBMs on scikit-learn's 8x8 digits (issue 14 targets): train a model, write the samples it is scored on,
score them with an independent classifier.

    python benchmarks/digits.py --model ebm     # conv EBM, persistent CD; fresh chains (noise + the training chain length)
    python benchmarks/digits.py --model jem     # JEM; test accuracy and class-conditional fresh chains
    python benchmarks/digits.py --model ebm --score-only   # score the stored samples again (no training)

Targets: samples that an independent digit classifier assigns confidently (mean top-class probability >= 0.8)
with every class >= 5% of the samples; JEM also test accuracy >= 95%. Writes
`benchmarks/results/digits_<model>_samples.pt` (float `[n, 1, 8, 8]`, pixel scale 0..16 like the dataset) and
`digits_<model>.json` (configuration, timings, loss history, JEM's conditioning labels, scores).
Runs on one CPU thread by default (the cores of a shared machine); each model trains in minutes.
"""
import argparse
import json
import math
import time
from pathlib import Path

import torch

from torchebm.datasets import DigitsDataset
from torchebm.diagnostics.sample_quality import classifier_outputs, sample_quality, train_classifier
from torchebm.losses import JEMLoss, JointEnergyModel, PersistentContrastiveDivergence, calibration
from torchebm.models.image import ConvEnergy
from torchebm.samplers.langevin import LangevinDynamics

RESULTS = Path(__file__).resolve().parent / 'results'

# ---- conv EBM and JEM -----------------------------------------------------------------------------------------------
# Both sample with JEM/IGEBM's SGLD: a gradient step of `step_size` and Gaussian noise of std `noise` (far below
# exact Langevin's sqrt(2 step_size)), pixels clamped to the data's [-1, 1]; new chains start from uniform noise.
EBM_CONFIG = dict(channels=(16, 32), batch_size=32, k_steps=30, step_size=10.0, noise=0.005, buffer_size=2000,
                  reinit_prob=0.3, energy_reg=0.05, lr=1e-3, betas=(0.5, 0.999), steps=300)
JEM_CONFIG = dict(channels=(32, 64), batch_size=64, k_steps=20, step_size=1.0, noise=0.01, buffer_size=2000,
                  reinit_prob=0.05, energy_reg=0.0, generative_weight=0.1, classifier_steps=500, classifier_lr=2e-3,
                  lr=1e-4, betas=(0.9, 0.999), steps=200, sample_steps=60)


def sgld(model, config):
    "The sampler of both image EBMs: `LangevinDynamics` with noise std `config['noise']` inside the [-1, 1] pixel box."
    noise_scale = config['noise'] / math.sqrt(2 * config['step_size'])  # its noise is sqrt(2 step_size) * noise_scale
    return LangevinDynamics(model, step_size=config['step_size'], noise_scale=noise_scale, box=(-1.0, 1.0))


def uniform_chains(n, generator):
    "`n` fresh chains `[n, 1, 8, 8]`: uniform pixels in [-1, 1]."
    return torch.rand(n, 1, 8, 8, generator=generator) * 2 - 1


def fit(loss_fn, params, train, steps, lr, betas, batch_size, generator, labels=False, log_every=50):
    "Adam on `loss_fn` over random batches of `train` (with `y=` labels when `labels`); returns the loss per step."
    opt = torch.optim.Adam(params, lr=lr, betas=betas)
    history, start = [], time.time()
    for step in range(steps):
        idx = torch.randint(len(train), (batch_size,), generator=generator)
        extra = dict(y=train.labels[idx]) if labels else {}
        loss, _ = loss_fn(train.images[idx], generator=generator, **extra)
        opt.zero_grad(); loss.backward(); opt.step()
        history.append(float(loss.detach()))
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"  step {step:5d} loss {history[-1]: .4f} ({time.time() - start:.0f} s)", flush=True)
    return history


def train_ebm(train, test, n_samples, generator):
    "Conv EBM by persistent CD; returns `n_samples` fresh chains (uniform noise + `k_steps`, the training chain length)."
    c = EBM_CONFIG
    torch.manual_seed(int(torch.randint(2 ** 31, (1,), generator=generator)))
    model = ConvEnergy(channels=c['channels'])
    loss_fn = PersistentContrastiveDivergence(model, sgld(model, c), k_steps=c['k_steps'], buffer_size=c['buffer_size'],
                                              reinit_prob=c['reinit_prob'], energy_reg=c['energy_reg'],
                                              buffer_init='uniform')
    start = time.time()
    history = fit(loss_fn, model.parameters(), train, c['steps'], c['lr'], c['betas'], c['batch_size'], generator)
    train_seconds = time.time() - start
    model.eval()
    samples = sgld(model, c).sample(x=uniform_chains(n_samples, generator), n_steps=c['k_steps'], generator=generator)
    return samples, None, dict(config=c, train_seconds=train_seconds, loss_history=history)


def train_jem(train, test, n_samples, generator):
    "JEM: a ConvEnergy classifier warmed up on cross-entropy, then the hybrid loss; class-conditional fresh chains."
    c = JEM_CONFIG
    torch.manual_seed(int(torch.randint(2 ** 31, (1,), generator=generator)))
    model = JointEnergyModel(ConvEnergy(channels=c['channels'], n_classes=10))
    start = time.time()
    warmup = JEMLoss(model, sgld(model, c), generative_weight=0.0)
    fit(warmup, model.parameters(), train, c['classifier_steps'], c['classifier_lr'], c['betas'], c['batch_size'],
        generator, labels=True)
    loss_fn = JEMLoss(model, sgld(model, c), generative_weight=c['generative_weight'], k_steps=c['k_steps'],
                      buffer_size=c['buffer_size'], reinit_prob=c['reinit_prob'], energy_reg=c['energy_reg'],
                      buffer_init='uniform')
    history = fit(loss_fn, model.parameters(), train, c['steps'], c['lr'], c['betas'], c['batch_size'], generator,
                  labels=True)
    train_seconds = time.time() - start
    model.eval()
    with torch.no_grad(): probs = model.predict_proba(test.images)
    labels = torch.arange(10).repeat_interleave(-(-n_samples // 10))[:n_samples]
    samples = sgld(model.conditional(labels), c).sample(x=uniform_chains(len(labels), generator),
                                                         n_steps=c['sample_steps'], generator=generator)
    return samples, labels, dict(config=c, train_seconds=train_seconds, loss_history=history,
                                 test_accuracy=float((probs.argmax(-1) == test.labels).float().mean()),
                                 test_ece=float(calibration(probs, test.labels).ece))


TRAINERS = {'ebm': train_ebm, 'jem': train_jem}


def score(model, train, test, generator):
    "Score the stored samples of `model` with an independent classifier; adds the scores to its JSON report."
    path = RESULTS / f'digits_{model}.json'
    report = json.loads(path.read_text())
    samples = train.from_levels(torch.load(RESULTS / f'digits_{model}_samples.pt'))
    judge = train_classifier(train.images, train.labels, n_classes=10, generator=generator)
    quality = sample_quality(judge, samples, reference=test.images)
    real = sample_quality(judge, test.images, reference=train.images)
    scores = dict(confidence=quality.confidence, min_class_share=quality.min_coverage,
                  class_shares=quality.coverage.tolist(), frechet_distance=quality.frechet_distance,
                  meets_target=quality.meets(0.8, 0.05), test_digits_confidence=real.confidence,
                  test_digits_frechet_to_train=real.frechet_distance,
                  judge_test_accuracy=float((classifier_outputs(judge, test.images)[0].argmax(-1) ==
                                             test.labels).float().mean()))
    if report.get('labels') is not None:
        judged = classifier_outputs(judge, samples)[0].argmax(-1)
        scores['label_agreement'] = float((judged == torch.tensor(report['labels'])).float().mean())
    report['scores'] = scores
    path.write_text(json.dumps(report, indent=1))
    print(f"{model}: {quality}; target met: {scores['meets_target']}", flush=True)
    return scores


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', required=True, choices=sorted(TRAINERS))
    parser.add_argument('--n-samples', type=int, default=1000)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--score-only', action='store_true', help='score the stored samples without training')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)
    train, test = DigitsDataset('train'), DigitsDataset('test')
    if args.score_only: return score(args.model, train, test, generator)
    print(f"{args.model}: training on {len(train)} digits", flush=True)
    samples, labels, report = TRAINERS[args.model](train, test, args.n_samples, generator)
    RESULTS.mkdir(exist_ok=True)
    torch.save(train.to_levels(samples).float(), RESULTS / f'digits_{args.model}_samples.pt')
    report.update(n_samples=args.n_samples, seed=args.seed, threads=args.threads,
                  labels=None if labels is None else labels.tolist())
    (RESULTS / f'digits_{args.model}.json').write_text(json.dumps(report, indent=1))
    print({k: v for k, v in report.items() if k not in ('loss_history', 'labels')}, flush=True)
    score(args.model, train, test, generator)


if __name__ == '__main__':
    main()
