"""Minibatch couplings (issue 15): one-Euler-step generation quality and time per batch.

1. Quality: a velocity network (MLP 3-64-64-2, SiLU) is trained by flow matching from 8 Gaussians (radius 5,
   variance 0.1) to two moons (sklearn's layout, noise 0.2, scaled by 3 and shifted by -1: the torchcfm toy setup)
   with the independent and the exact-OT coupling, then generates with ONE Euler step x1 = x0 + v(x0, 0). The score
   is the 2-Wasserstein distance W2 between 2000 generated and 2000 fresh target points (exact assignment).
   Published figure for this setup (arXiv 2503.10636): 6.23 (independent) vs 0.072 (OT).
2. Time per 1k-pair batch of every coupling on this machine's CPU (one thread unless --threads). No GPU here.

    python benchmarks/bench_couplings.py [--steps 2000] [--threads 1]

Writes benchmarks/results/couplings.{json,md}.
"""
import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from scipy.optimize import linear_sum_assignment

from torchebm.couplings import get_coupling
from torchebm.datasets import EightGaussiansDataset, TwoMoonsDataset
from torchebm.losses import FlowMatchingLoss

ROOT = Path(__file__).resolve().parents[1]


def source(n, seed):
    return EightGaussiansDataset(n_samples=n, scale=5.0, std=0.1 ** 0.5, seed=seed).get_data()


def target(n, seed):
    return 3 * TwoMoonsDataset(n_samples=n, noise=0.2, seed=seed).get_data() - 1


class Velocity(nn.Module):
    def __init__(self, hidden=64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2))

    def forward(self, x, t): return self.net(torch.cat([x, t[:, None]], 1))


def w2(a, b):
    cost = torch.cdist(a.double(), b.double()).square()
    r, c = linear_sum_assignment(cost.numpy())
    return float(cost[r, c].mean().sqrt())


def one_step_w2(coupling, steps, batch, seed=0):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = Velocity()
    loss_fn = FlowMatchingLoss(model, coupling=coupling)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    src, dst = source(50_000, 1), target(50_000, 2)
    for _ in range(steps):
        x0 = src[torch.randint(0, len(src), (batch,), generator=g)]
        x1 = dst[torch.randint(0, len(dst), (batch,), generator=g)]
        loss = loss_fn(x1, x0=x0, generator=g)
        opt.zero_grad(); loss.backward(); opt.step()
    with torch.no_grad():
        x0 = source(2000, 3)
        x1 = x0 + model(x0, torch.zeros(len(x0)))
    return w2(x1, target(2000, 4))


def time_per_batch(name, n=1000, repeats=3, **kwargs):
    g = torch.Generator().manual_seed(0)
    x0, x1 = source(n, 5), target(n, 6)
    y = torch.randint(0, 10, (n,), generator=g)
    coupling = get_coupling(name, **kwargs)
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        coupling(x0, x1, y=y if coupling.uses_labels else None, generator=g)
        wall.append(time.perf_counter() - t0); cpu.append(time.process_time() - c0)
    return dict(wall=statistics.median(wall), cpu=statistics.median(cpu))


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--steps', type=int, default=2000)
    p.add_argument('--batch', type=int, default=256)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--timing-only', action='store_true', help='keep the W2 numbers of the last run (results/couplings.json)')
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = ROOT / 'benchmarks' / 'results'
    if args.timing_only:
        previous = json.loads((out / 'couplings.json').read_text())
        quality, args.steps, args.batch = previous['one_step_w2'], previous['steps'], previous['batch']
    else:
        quality = {name: one_step_w2(name, args.steps, args.batch) for name in ('independent', 'exact')}
    rows = [('independent', {}), ('exact', dict(solver='scipy')), ('exact', dict(solver='auction')),
            ('sinkhorn', {}), ('unbalanced_sinkhorn', {}), ('conditional', {})]
    timing = {f"{name}{'(' + kw['solver'] + ')' if kw else ''}": time_per_batch(name, repeats=1 if kw.get('solver') == 'auction' else 3, **kw)
              for name, kw in rows}
    result = dict(steps=args.steps, batch=args.batch, threads=args.threads, one_step_w2=quality,
                  seconds_per_1k_batch_cpu=timing, published_one_step_w2={'independent': 6.23, 'exact': 0.072})
    (out / 'couplings.json').write_text(json.dumps(result, indent=1))
    md = [f"# Couplings: one-Euler-step W2, 8 Gaussians -> two moons ({args.steps} Adam steps, batch {args.batch})", '',
          '| coupling | W2 (this run) | W2 (published, arXiv 2503.10636) |', '|---|---|---|']
    md += [f"| {k} | {v:.3f} | {result['published_one_step_w2'][k]} |" for k, v in quality.items()]
    md += ['', f'Time per 1000-pair batch on CPU ({args.threads} thread(s); sinkhorn: 100 iterations, conditional: 10 labels, '
           'exact inside). Wall time on a shared machine includes waiting for a core; CPU time is the process\'s own. '
           'No GPU on this machine.', '',
           '| coupling | wall s | CPU s |', '|---|---|---|'] + [f"| {k} | {v['wall']:.4f} | {v['cpu']:.4f} |" for k, v in timing.items()]
    (out / 'couplings.md').write_text('\n'.join(md) + '\n')
    print('\n'.join(md))


if __name__ == '__main__':
    main()
