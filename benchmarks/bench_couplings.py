"""Minibatch couplings (issue 15): one-Euler-step generation quality and time per batch.

1. Quality: train a velocity field from 8 Gaussians to two moons with independent or exact-OT pairs, generate with ONE
   Euler step x1 = x0 + v(x0, 0) and score it by W2 = sqrt(mean squared distance of the exact assignment) between the
   generated and as many fresh target points (reported with W2^2). A perfect independent-coupling field sends every
   x0 to E[x1] at t = 0, so its one-step W2^2 tends to tr Cov(target) = 9.01 (`collapse`).
   `--setup c2ot` (default): the published figure's setup (arXiv 2503.10636, Fig. 1, Euler-1: 6.232 +- 0.186 (FM)
   vs 0.072 +- 0.025 (OT), 10 seeds), as its public code (hkchengrex/C2OT, `moons.py`) does it: data as torchcfm's
   (below); a width-128 residual MLP (3 GELU blocks, expansion 4, time by a linear embedding); path noise 0; Adam 3e-4;
   20000 steps of batch 256, cut from fresh draws of 1024 pairs coupled as a whole (OT batch 1024), kept in the
   source's order, so an independent batch's data are one quarter of torchdyn's arc-ordered moons; score on 10000
   points by POT's `emd2` of the squared-distance cost, which is W2^2 (no square root).
   `--setup torchcfm`: torchcfm's toy setup: source `sample_8gaussians`, radius 5, covariance sqrt(0.1) I (torchcfm
   passes sqrt(var) as the COVARIANCE: per-coordinate std 0.1**0.25 = 0.56); target torchdyn's `generate_moons` (evenly
   spaced arc points plus ONE U(0, 0.2) offset added to both coordinates) times 3 minus 1; MLP 3-64-64-64-2 SELU; path
   noise sigma = 0.1; Adam 1e-3, batch 256 drawn from 50000-point pools, OT on the 256-batch; 1024 evaluation points.
   `--setup ours`: variance 0.1, sklearn's Gaussian-noise moons, MLP 3-64-64-2 SiLU, sigma = 0, FlowMatchingLoss.
   Results and findings: results/couplings.md.
2. Time per 1k-pair batch of every coupling on the CPU (one thread unless --threads) or, with `--device cuda`, the GPU.

    python benchmarks/bench_couplings.py [--setup c2ot] [--couplings independent exact] [--steps N] [--eval N]
    python benchmarks/bench_couplings.py --timing-only [--device cuda]

Updates benchmarks/results/couplings.{json,md} (runs of other setups and couplings are kept).
"""
import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from scipy.optimize import linear_sum_assignment

from torchebm.couplings import get_coupling, squared_distance_cost
from torchebm.datasets import EightGaussiansDataset, TwoMoonsDataset
from torchebm.losses import FlowMatchingLoss

ROOT = Path(__file__).resolve().parents[1]


SETUP = 'torchcfm'


def source(n, seed):
    std = 0.1 ** 0.5 if SETUP == 'ours' else 0.1 ** 0.25
    return EightGaussiansDataset(n_samples=n, scale=5.0, std=std, seed=seed).get_data()


def torchdyn_moons(n, seed, noise=0.2):
    "torchdyn's `generate_moons`: evenly spaced arc points plus one U(0, noise) offset shared by both coordinates."
    g = torch.Generator().manual_seed(seed)
    a, b = torch.linspace(0, math.pi, n // 2), torch.linspace(0, math.pi, n - n // 2)
    x = torch.cat([torch.stack([a.cos(), a.sin()], 1), torch.stack([1 - b.cos(), 1 - b.sin() - 0.5], 1)])
    return x + noise * torch.rand(n, 1, generator=g)


def target(n, seed):
    x = TwoMoonsDataset(n_samples=n, noise=0.2, seed=seed).get_data() if SETUP == 'ours' else torchdyn_moons(n, seed)
    return 3 * x - 1


class Velocity(nn.Module):
    def __init__(self, hidden=64):
        super().__init__()
        act, depth = (nn.SELU, 3) if SETUP == 'torchcfm' else (nn.SiLU, 2)
        layers, width = [], 3
        for _ in range(depth): layers += [nn.Linear(width, hidden), act()]; width = hidden
        self.net = nn.Sequential(*layers, nn.Linear(hidden, 2))

    def forward(self, x, t): return self.net(torch.cat([x, t[:, None]], 1))


def cfm_loss(model, coupling, x1, x0, g, sigma=0.1):
    "torchcfm's (exact-OT) conditional flow matcher: pair, then regress on x1 - x0 at x_t = t x1 + (1 - t) x0 + sigma eps."
    x0 = coupling(x0, x1, generator=g)
    t = torch.rand(len(x1), generator=g)
    xt = t[:, None] * x1 + (1 - t[:, None]) * x0 + sigma * torch.randn(x1.shape, generator=g)
    return (model(xt, t) - (x1 - x0)).square().mean()


def w2(a, b):
    "W2 = sqrt(mean squared distance of the optimal assignment) (POT's emd2 gives the square)."
    cost = torch.cdist(a.double(), b.double()).square()
    r, c = linear_sum_assignment(cost.numpy())
    return float(cost[r, c].mean().sqrt())


class ResidualVelocity(nn.Module):
    "The C2OT playground network: width-128 residual MLP (3 GELU blocks of expansion 4), time added by a linear embedding."
    def __init__(self, width=128, depth=3):
        super().__init__()
        self.embed_x, self.embed_t, self.head = nn.Linear(2, width), nn.Linear(1, width), nn.Linear(width, 2)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
                                    for _ in range(depth))

    def forward(self, x, t):
        h = self.embed_x(x) + self.embed_t(t[:, None])
        for block in self.blocks: h = h + block(h)
        return self.head(h)


def one_step_sample(model, n, seed):
    "One Euler step x0 + v(x0, 0) from `n` fresh source points, and `n` fresh target points."
    with torch.no_grad():
        x0 = source(n, seed)
        return x0 + model(x0, torch.zeros(len(x0))), target(n, seed + 1)


def train_c2ot(coupling, steps, batch, ot_batch, seed, check_every, n_check):
    """The C2OT playground's training (arXiv 2503.10636, `moons.py`): fresh draws of `ot_batch` pairs, coupled as a whole,
    kept in the source's order (the data of an independent batch stay in torchdyn's arc order, so each `batch` slice
    is a quarter of the moons) and cut into consecutive slices; path noise 0; Adam 3e-4. Every `check_every` steps
    the one-step W2 on `n_check` points is recorded."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model, pair = ResidualVelocity(), get_coupling(coupling)
    opt = torch.optim.Adam(model.parameters(), lr=3e-4)
    checks, step = {}, 0
    while step < steps:
        draw = step // (ot_batch // batch)
        x0, x1 = source(ot_batch, 2 * (seed * 10**6 + draw)), target(ot_batch, 2 * (seed * 10**6 + draw) + 1)
        x1 = x1[torch.argsort(pair.pair(x0, x1, generator=g))]  # x1[k] is now x0[k]'s partner
        for i in range(0, ot_batch, batch):
            a, b = x0[i:i + batch], x1[i:i + batch]
            t = torch.rand(len(a), generator=g)
            loss = (model(t[:, None] * b + (1 - t[:, None]) * a, t) - (b - a)).square().mean()
            opt.zero_grad(); loss.backward(); opt.step()
            step += 1
            if step % check_every == 0 and step < steps:
                checks[step] = w2(*one_step_sample(model, n_check, 10**8 + 2 * step))
                print(coupling, step, f'W2 {checks[step]:.3f} W2^2 {checks[step] ** 2:.3f}', flush=True)
            if step == steps: break
    return model, checks


def one_step_w2(coupling, steps, batch, n_eval, seed=0, ot_batch=1024, check_every=1000, n_check=2048):
    "One-step W2 after training, and for the c2ot setup the W2 on `n_check` points every `check_every` steps."
    if SETUP == 'c2ot':
        model, checks = train_c2ot(coupling, steps, batch, ot_batch, seed, check_every, n_check)
        return w2(*one_step_sample(model, n_eval, 10**9 + 2 * seed)), checks
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = Velocity()
    pair = get_coupling(coupling)
    loss_fn = FlowMatchingLoss(model, coupling=coupling)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    src, dst = source(50_000, 1), target(50_000, 2)
    for _ in range(steps):
        x0 = src[torch.randint(0, len(src), (batch,), generator=g)]
        x1 = dst[torch.randint(0, len(dst), (batch,), generator=g)]
        loss = cfm_loss(model, pair, x1, x0, g) if SETUP == 'torchcfm' else loss_fn(x1, x0=x0, generator=g)
        opt.zero_grad(); loss.backward(); opt.step()
    with torch.no_grad():
        x0 = source(n_eval, 3)
        x1 = x0 + model(x0, torch.zeros(len(x0)))
    return w2(x1, target(n_eval, 4)), {}


def time_per_batch(name, n=1000, repeats=3, device='cpu', **kwargs):
    """Median wall and CPU seconds of one coupling call on a 1000-pair batch on `device` (CUDA: synchronised before the
    clock stops, after one untimed warm-up call); `name` 'unreduced' times SciPy on the raw cost."""
    g = torch.Generator(device=device).manual_seed(0)
    x0, x1 = source(n, 5).to(device), target(n, 6).to(device)
    y = torch.randint(0, 10, (n,), generator=g, device=device)
    if name == 'unreduced':  # what linear_assignment's row and column reduction saves
        call = lambda: linear_sum_assignment(squared_distance_cost(x1, x0, torch.float64).cpu().numpy())
    else:
        coupling = get_coupling(name, **kwargs)
        call = lambda: coupling(x0, x1, y=y if coupling.uses_labels else None, generator=g)
    cuda = torch.device(device).type == 'cuda'
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda: call(); sync()  # warm-up: CUDA context and kernels load on the first call
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        call(); sync()
        wall.append(time.perf_counter() - t0); cpu.append(time.process_time() - c0)
    return dict(wall=statistics.median(wall), cpu=statistics.median(cpu))


PUBLISHED = {'independent': 6.232, 'exact': 0.072}  # arXiv 2503.10636 Fig. 1, Euler-1, mean of 10 seeds (POT emd2: W2^2)


def render(result):
    md = ['# Couplings: one-Euler-step W2, 8 Gaussians -> two moons', '',
          'W2 = sqrt(mean squared distance of the exact assignment) between the one-step samples and fresh target points; '
          'the paper reports POT\'s `emd2` of the squared-distance cost, which is W2^2 (no square root). '
          'Single seed here; the paper averages 10 seeds.', '',
          '| setup | coupling | Adam steps | eval points | W2 | W2^2 | published W2^2 (arXiv 2503.10636) |',
          '|---|---|---|---|---|---|---|']
    for setup, runs in result['one_step'].items():
        for name, r in runs.items():
            md.append(f"| {setup} | {name} | {r['steps']} | {r['eval']} | {r['w2']:.3f} | {r['w2'] ** 2:.3f} | "
                      f"{PUBLISHED[name] if setup == 'c2ot' else '-'} |")
    for setup, runs in result['one_step'].items():
        for name, r in runs.items():
            if r.get('note'): md += ['', f"{setup}, {name}: {r['note']}."]
            if r.get('history'): md += ['', f"{setup}, {name}, earlier runs of the same setup (1024 points): {r['history']}."]
            if r.get('checks'):
                md += ['', f"{setup}, {name}: W2^2 during training ({r['n_check']} fresh points each): " +
                       ', '.join(f"{k} steps {v ** 2:.2f}" for k, v in r['checks'].items()) + '.']
    c = result['collapse_w2']
    md += ['', f'A perfect independent-coupling field collapses every point onto the target mean at t = 0: W2 = '
           f'sqrt(tr Cov(target)) = {c:.3f} (W2^2 = {c ** 2:.3f}), the same in the torchcfm and c2ot setups (same data).']
    md += result.get('notes', [])
    t = result['seconds_per_1k_batch_cpu']
    md += ['', f"Time per 1000-pair batch on CPU ({result['threads']} thread(s); sinkhorn: 100 iterations, conditional: 10 "
           'labels, exact inside). Wall time on a shared machine includes waiting for a core; CPU time is the process\'s own.',
           '', '| coupling | wall s | CPU s |', '|---|---|---|'] + [f"| {k} | {v['wall']:.4f} | {v['cpu']:.4f} |" for k, v in t.items()]
    gpu = result.get('seconds_per_1k_batch_cuda')
    md += ['', 'GPU: not measured (`--device cuda` on a machine with a GPU fills this table).'] if gpu is None else \
          ['', f"Time per 1000-pair batch on {result['gpu']} (synchronised; exact(scipy) copies the cost to the CPU):", '',
           '| coupling | wall s |', '|---|---|'] + [f"| {k} | {v['wall']:.4f} |" for k, v in gpu.items()]
    return '\n'.join(md) + '\n'


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--setup', default='c2ot', choices=('c2ot', 'torchcfm', 'ours'))
    p.add_argument('--couplings', nargs='+', default=['independent', 'exact'], choices=('independent', 'exact'))
    p.add_argument('--steps', type=int, default=None, help='Adam steps (default: 20000 for c2ot, 4000 otherwise)')
    p.add_argument('--batch', type=int, default=256)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--eval', type=int, default=None, help='points in the final W2 (default: 10000 for c2ot, 1024 otherwise)')
    p.add_argument('--check-every', type=int, default=1000, help='c2ot: steps between W2 checks during training')
    p.add_argument('--skip-timing', action='store_true', help='keep the timing table of results/couplings.json')
    p.add_argument('--timing-only', action='store_true', help='keep the W2 numbers of results/couplings.json')
    p.add_argument('--device', default='cpu', choices=('cpu', 'cuda'), help='where the coupling calls are timed')
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    global SETUP
    SETUP = args.setup
    steps = args.steps or (20000 if SETUP == 'c2ot' else 4000)
    n_eval = args.eval or (10000 if SETUP == 'c2ot' else 1024)
    path = ROOT / 'benchmarks' / 'results' / 'couplings.json'
    result = json.loads(path.read_text()) if path.exists() else {}
    result.setdefault('one_step', {})
    if not args.timing_only:
        for name in args.couplings:
            w, checks = one_step_w2(name, steps, args.batch, n_eval, check_every=args.check_every)
            print(name, f'W2 {w:.3f} W2^2 {w * w:.3f}', flush=True)
            result = json.loads(path.read_text()) if path.exists() else result  # another process may have written meanwhile
            result.setdefault('one_step', {}).setdefault(SETUP, {})[name] = dict(
                steps=steps, batch=args.batch, eval=n_eval, w2=w, checks=checks, n_check=2048)
            result['collapse_w2'] = float(torch.cov(target(100_000, 7).double().T).trace().sqrt())
            path.write_text(json.dumps(result, indent=1))
    if not args.skip_timing:
        rows = [('independent', {}), ('exact', dict(solver='scipy')), ('unreduced', {}), ('exact', dict(solver='auction')),
                ('sinkhorn', {}), ('unbalanced_sinkhorn', {}), ('conditional', {})]
        labels = {'unreduced': 'exact(scipy on the unreduced cost)'}
        key, cuda = f'seconds_per_1k_batch_{args.device}', args.device == 'cuda'
        result[key] = {
            labels.get(name, f"{name}{'(' + kw['solver'] + ')' if kw else ''}"):
                time_per_batch(name, repeats=3 if cuda or kw.get('solver') != 'auction' else 1, device=args.device, **kw)
            for name, kw in rows}
        timing = {key: result[key], **({'gpu': torch.cuda.get_device_name()} if cuda else {'threads': args.threads})}
        result = {**(json.loads(path.read_text()) if path.exists() else result), **timing}
    path.write_text(json.dumps(result, indent=1))
    md = render(result)
    (path.parent / 'couplings.md').write_text(md)
    print(md)


if __name__ == '__main__':
    main()
