"""Fused sampling kernels against TorchEBM 0.8.9 and the hand-written limits (issue 7's analytic rows).

Participants, each in its own fresh process (both libraries are packages named `torchebm`):
  torchebm-0.8.9   LangevinDynamics / HamiltonianMonteCarlo of TorchEBM 0.8.9 (its venv, run from /tmp)
  fused            this checkout's samplers with their defaults: the fused C++ kernel is picked automatically
  reference        this checkout's samplers with use_kernels=False (the pure-torch path)
  limit_cpp        the hand-written C++ chain of ../shared/bench/limits.py (W1/W1s; W2 = MKL GEMM + fused noise)
  limit_torch      the hand-written pure-torch loop of ../shared/bench/limits.py

Rows (the sizes of ../shared/bench/workloads.py):
  W1   Langevin, DoubleWell 2-D, 10 000 chains x 1 000 steps
  W1s  Langevin, DoubleWell 2-D, 100 chains x 1 000 steps (per-step overhead)
  W2   Langevin, Gaussian 64-D full covariance, 4 096 chains x 500 steps
  W4   HMC, Gaussian 16-D, 1 024 chains x 200 steps x 10 leapfrog steps

Rounds alternate the participants' order; each worker warms up once, then times `--repeats` runs; the table
shows the median over rounds of each worker's median, and each row's sample quality (so a fast wrong answer
shows). Usage:
  python benchmarks/bench_kernels.py [--rounds 3] [--repeats 3] [--rows W1,W1s,W2,W4] [--out results.json]
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(os.environ.get('BENCH_DIR', ROOT.parent / 'shared' / 'bench'))
VENV089 = Path(os.environ.get('OLD_VENV', ROOT / '.venv089'))

ROWS = {
    'W1': dict(title='Langevin DoubleWell 2-D, 10k chains x 1k steps', kind='dw', chains=10000, dim=2, steps=1000,
               step_size=0.01, h=2.0, b=1.0, seed=101),
    'W1s': dict(title='Langevin DoubleWell 2-D, 100 chains x 1k steps', kind='dw', chains=100, dim=2, steps=1000,
                step_size=0.01, h=2.0, b=1.0, seed=102),
    'W2': dict(title='Langevin Gaussian 64-D full cov, 4096 chains x 500 steps', kind='gauss', chains=4096, dim=64,
               steps=500, step_size=0.01, seed=201),
    'W4': dict(title='HMC Gaussian 16-D, 1024 chains x 200 steps x 10 leapfrog', kind='hmc', chains=1024, dim=16,
               steps=200, step_size=0.1, n_leapfrog=10, seed=401),
}
LIMITS = {'limit_cpp': {'W1': 'DWCpp', 'W1s': 'DWCpp', 'W2': 'GaussLangevinCpp'},
          'limit_torch': {'W1': 'DWTorch', 'W1s': 'DWTorch', 'W2': 'GaussLangevinTorch', 'W4': 'HMCTorch'}}


# ---- worker side (runs under the participant's interpreter) --------------------------------------------------
def make_gaussian(torch, d, seed):
    "Covariance Q diag(linspace(0.5, 2)) Q^T with a seeded random orthogonal Q; mean linspace(-1, 1)."
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    cov = q @ torch.diag(torch.linspace(0.5, 2.0, d, dtype=torch.float64)) @ q.T
    return torch.linspace(-1.0, 1.0, d, dtype=torch.float64), 0.5 * (cov + cov.T)


def library_row(participant, row):
    "A `run()` closure timing the library's public sampler on `row`, and a quality function of its output."
    import torch
    from torchebm.core import DoubleWellModel, GaussianModel
    from torchebm.samplers import HamiltonianMonteCarlo, LangevinDynamics
    extra = dict(use_kernels=False) if participant == 'reference' else {}
    s = ROWS[row]
    x0 = torch.randn(s['chains'], s['dim'], generator=torch.Generator().manual_seed(s['seed']))
    if s['kind'] == 'dw':
        model = DoubleWellModel(barrier_height=s['h'], b=s['b'])
        sampler = LangevinDynamics(model=model, step_size=s['step_size'], noise_scale=1.0, **extra)
        quality = lambda x: dict(mean_sq=round(float((x.double() ** 2).mean()), 4))
    else:
        mean, cov = make_gaussian(torch, s['dim'], s['seed'])
        model = GaussianModel(mean=mean.float(), cov=cov.float())
        if s['kind'] == 'hmc':
            sampler = HamiltonianMonteCarlo(model=model, step_size=s['step_size'], n_leapfrog_steps=s['n_leapfrog'],
                                            **extra)
        else:
            sampler = LangevinDynamics(model=model, step_size=s['step_size'], noise_scale=1.0, **extra)
        quality = lambda x: dict(mean_err=round(float((x.double().mean(0) - mean).norm()), 4))

    def run(n_steps=s['steps']):
        return sampler.sample(x=x0.clone(), n_steps=n_steps)
    return run, quality


def limit_row(participant, row):
    import torch
    sys.path.insert(0, str(BENCH))
    import limits
    import workloads
    cls = LIMITS[participant].get(row)
    if cls is None: return None, None
    timed = getattr(limits, cls)(None, workloads.scaled_spec(row), 'cpu')
    timed.build()

    def run(n_steps=None):
        timed.prepare()
        timed.run()
        return timed.last
    quality = lambda x: dict(mean_sq=round(float((x.double() ** 2).mean()), 4))
    return run, quality


def worker(participant, rows, repeats, budget_s, threads):
    if participant in ('fused', 'reference'): sys.path.insert(0, str(ROOT))
    import torch
    if threads: torch.set_num_threads(threads)
    results = {}
    for row in rows:
        try:
            run, quality = (limit_row if participant.startswith('limit') else library_row)(participant, row)
        except Exception as e:  # a participant without this row (or a failed build) is reported, not fatal
            results[row] = dict(error=f'{type(e).__name__}: {e}')
            continue
        if run is None: continue
        run(max(2, ROWS[row]['steps'] // 10))  # warm-up (builds/loads the kernels, allocator, threads)
        times = []
        while len(times) < repeats and sum(times) < budget_s:  # slow participants: fewer repeats
            t0 = time.perf_counter()
            out = run()
            times.append(time.perf_counter() - t0)
        results[row] = dict(median_s=statistics.median(times), min_s=min(times), **quality(out))
    info = dict(torch=torch.__version__, threads=torch.get_num_threads())
    if participant == 'fused':
        from torchebm.cuda import status
        info['kernels'] = sorted({f"{r['kernel']}:{r['device']}:{r['path']}" for r in status(verbose=False)})
    print(json.dumps(dict(results=results, info=info)))


# ---- orchestrator (standard library only) --------------------------------------------------------------------
def participants():
    py = sys.executable
    out = {}
    if (VENV089 / 'bin' / 'python').exists(): out['torchebm-0.8.9'] = str(VENV089 / 'bin' / 'python')
    out['fused'] = py
    out['reference'] = py
    if (BENCH / 'limits.py').exists():
        out['limit_cpp'] = out['limit_torch'] = py
    return out


def run_worker(name, python, rows, repeats, budget_s, threads):
    env = dict(os.environ)
    env.pop('PYTHONPATH', None)
    env.setdefault('TORCH_EXTENSIONS_DIR', str(ROOT / '.torch_extensions'))  # the build tools/test.sh uses
    cmd = [python, str(Path(__file__).resolve()), '--worker', name, '--rows', ','.join(rows), '--repeats', str(repeats),
           '--budget-s', str(budget_s), '--threads', str(threads)]
    proc = subprocess.run(cmd, cwd='/tmp', env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return dict(results={r: dict(error=proc.stderr.strip().splitlines()[-1]) for r in rows}, info={})
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(runs, rows, names):
    "Markdown: median seconds per participant and the speed-up of `fused` and `reference` over 0.8.9."
    med = {}
    for name in names:
        for row in rows:
            ts = [r['results'][row]['median_s'] for r in runs[name] if 'median_s' in r['results'].get(row, {})]
            if ts: med[name, row] = statistics.median(ts)
    lines = ['| row | ' + ' | '.join(names) + ' | fused vs 0.8.9 | reference vs 0.8.9 | fused / limit_cpp |',
             '|---|' + '---|' * (len(names) + 3)]
    for row in rows:
        cells = [f"{med[n, row]:.4f} s" if (n, row) in med else '-' for n in names]
        base = med.get(('torchebm-0.8.9', row))
        ratio = lambda n: f"{base / med[n, row]:.1f}x" if base and (n, row) in med else '-'
        lim = (f"{med['fused', row] / med['limit_cpp', row]:.2f}"
               if ('fused', row) in med and ('limit_cpp', row) in med else '-')
        lines.append(f"| {row} {ROWS[row]['title']} | " + ' | '.join(cells) +
                     f" | {ratio('fused')} | {ratio('reference')} | {lim} |")
    lines += ['', '| row | ' + ' | '.join(names) + ' |', '|---|' + '---|' * len(names)]
    for row in rows:
        q = []
        for n in names:
            last = next((r['results'][row] for r in reversed(runs[n]) if 'median_s' in r['results'].get(row, {})), None)
            q.append(', '.join(f'{k}={v}' for k, v in last.items() if k not in ('median_s', 'min_s')) if last else
                     next((r['results'][row].get('error', '-') for r in runs[n] if row in r['results']), '-'))
        lines.append(f'| {row} quality | ' + ' | '.join(q) + ' |')
    return '\n'.join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--worker')
    p.add_argument('--rows', default='W1,W1s,W2,W4')
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--threads', type=int, default=0, help='torch threads in every worker (0: all cores)')
    p.add_argument('--budget-s', type=float, default=8.0, help='stop repeating a row in a worker after this long')
    p.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results' / 'bench_kernels.json'))
    a = p.parse_args()
    rows = a.rows.split(',')
    if a.worker: return worker(a.worker, rows, a.repeats, a.budget_s, a.threads)
    who = participants()
    names = list(who)
    runs = {n: [] for n in names}
    for k in range(a.rounds):
        order = names if k % 2 == 0 else names[::-1]
        for n in order:
            t0 = time.time()
            runs[n].append(run_worker(n, who[n], rows, a.repeats, a.budget_s, a.threads))
            print(f'round {k + 1}/{a.rounds} {n}: {time.time() - t0:.0f} s', file=sys.stderr)
    md = table(runs, rows, names)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(dict(runs=runs, rows=ROWS, threads=a.threads, date=time.strftime('%Y-%m-%d %H:%M %Z')),
                                      indent=1))
    Path(a.out).with_suffix('.md').write_text(md + '\n')
    print(md)


if __name__ == '__main__':
    main()
