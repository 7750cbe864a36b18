"""Sampler overhead against hand-written loops in the same process (issue 7: flow rows W8a/W8b and the per-step
overhead of the generic Langevin step on a neural energy with 100 chains).

The speed of the W8 network (the shared harness's `workloads.VelocityNet`, MLP 3-128-128-2, 4096 samples) changes by
up to 2.4x between processes (how glibc recycles its 2 MB activation buffers, see `nbs/42_cuda.ipynb`), which swamps
a cross-process comparison of two libraries. Here every worker times the library's
`FlowSampler` and a plain Euler/Heun loop over the same network, interleaved, so the ratio `library / plain loop`
is measured under one placement. A trivial field on 100 samples leaves only the sampler's per-step Python and
dispatch cost. The Langevin row runs `LangevinDynamics` on a small MLP energy (2-32-1, 100 chains, 1000 steps, no
fused kernel) against a plain autograd loop. Each library runs in its own interpreter (both are packages named
`torchebm`).

    python benchmarks/bench_overhead.py                  # this checkout vs TorchEBM 0.8.9 (.venv089)
    python benchmarks/bench_overhead.py --procs 8 --threads 1

Writes benchmarks/results/overhead.{json,md}.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = r'''
import json, statistics, sys, time, torch
from torch import nn
threads, reps, which, bench_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
torch.set_num_threads(threads)
sys.path.insert(0, bench_dir)
from workloads import VelocityNet  # the harness's W8 network (3-128-128-2 SiLU, seeded weights)
from torchebm.core import BaseModel
from torchebm.samplers import FlowSampler, LangevinDynamics

class Trivial(nn.Module):
    def forward(self, x, t, **kw): return x * 0.5 + t.reshape(-1, 1)

def plain(field, x, n, heun):
    h = 1.0 / n
    with torch.no_grad():
        for i in range(n):
            t = torch.full((x.shape[0],), i * h)
            f0 = field(x, t)
            if heun: x = x + 0.5 * h * (f0 + field(x + h * f0, t + h))
            else: x = x + h * f0
    return x

out = {}
for row, field, n_samples in (('mlp', VelocityNet(801), 4096), ('trivial', Trivial(), 100)):
    x0 = torch.randn(n_samples, 2, generator=torch.Generator().manual_seed(0))
    for integrator in ('euler', 'heun'):
        kw = dict(model=field, interpolant='linear', prediction='velocity', integrator=integrator)
        if which == 'torchebm089': kw['device'] = 'cpu'
        sampler = FlowSampler(**kw)
        runs = {'library': lambda: sampler.sample(x=x0.clone(), n_steps=100),
                'plain': lambda: plain(field, x0.clone(), 100, integrator == 'heun')}
        for f in runs.values(): f()
        times = {k: [] for k in runs}
        for r in range(reps):
            for k in (('library', 'plain') if r % 2 == 0 else ('plain', 'library')):
                t0 = time.perf_counter(); runs[k](); times[k].append(time.perf_counter() - t0)
        out[f'{row}/{integrator}'] = {k: statistics.median(v) for k, v in times.items()}
class SmallEnergy(BaseModel):
    def __init__(self):
        super().__init__(); torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(2, 32), nn.SiLU(), nn.Linear(32, 1))
    def forward(self, x): return self.net(x).squeeze(-1)

def plain_langevin(model, x, n, h=0.01):
    for _ in range(n):
        xr = x.detach().requires_grad_(True)
        grad, = torch.autograd.grad(model(xr).sum(), xr)
        x = x.detach() - h * grad + (2 * h) ** 0.5 * torch.randn_like(x)
    return x

energy, x0 = SmallEnergy(), torch.randn(100, 2, generator=torch.Generator().manual_seed(0))
kw = dict(step_size=0.01, noise_scale=1.0, **({'device': 'cpu'} if which == 'torchebm089' else {}))
langevin = LangevinDynamics(energy, **kw)
runs = {'library': lambda: langevin.sample(x=x0.clone(), n_steps=1000), 'plain': lambda: plain_langevin(energy, x0.clone(), 1000)}
for f in runs.values(): f()
times = {k: [] for k in runs}
for r in range(reps):
    for k in (('library', 'plain') if r % 2 == 0 else ('plain', 'library')):
        t0 = time.perf_counter(); runs[k](); times[k].append(time.perf_counter() - t0)
out['langevin-mlp-100/ula'] = {k: statistics.median(v) for k, v in times.items()}
print(json.dumps(out))
'''


def run_worker(python, label, threads, reps, bench_dir):
    "One fresh process of `python` (run outside the checkout so the right `torchebm` is imported)."
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / 'worker.py'
        script.write_text(WORKER)
        res = subprocess.run([python, str(script), str(threads), str(reps), label, bench_dir], cwd=tmp,
                             capture_output=True, text=True, env={**os.environ, 'OMP_NUM_THREADS': str(threads)})
    if res.returncode != 0: raise RuntimeError(f'{label} worker failed:\n{res.stderr[-2000:]}')
    return json.loads(res.stdout.strip().splitlines()[-1])


def summarise(results):
    "Per participant and row: median library time, median plain time, median and range of per-process ratios."
    table = {}
    for label, workers in results.items():
        for row in workers[0]:
            ratios = [w[row]['library'] / w[row]['plain'] for w in workers]
            table.setdefault(row, {})[label] = dict(
                library_s=statistics.median(w[row]['library'] for w in workers),
                plain_s=statistics.median(w[row]['plain'] for w in workers),
                ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios))
    return table


def markdown(table, meta):
    lines = [f"Sampler overhead, {meta['procs']} processes per library, {meta['threads']} thread(s), "
             f"{meta['reps']} interleaved repetitions per process; `ratio` = library time / plain loop time in the "
             "same process (median over processes, range in brackets).", '',
             '| row | participant | library s | plain loop s | ratio |', '|---|---|---|---|---|']
    for row, by_label in table.items():
        for label, r in by_label.items():
            lines.append(f"| {row} | {label} | {r['library_s']:.4f} | {r['plain_s']:.4f} | "
                         f"{r['ratio']:.3f} [{r['ratio_min']:.3f}-{r['ratio_max']:.3f}] |")
    return '\n'.join(lines) + '\n'


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--procs', type=int, default=6)
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--reps', type=int, default=6)
    ap.add_argument('--bench-dir', default=os.environ.get('BENCH_DIR', str(ROOT.parent / 'shared' / 'bench')),
                    help="the shared harness, whose W8 network (workloads.VelocityNet) is timed")
    ap.add_argument('--old-venv', default=os.environ.get('OLD_VENV', str(ROOT / '.venv089')))
    ap.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results' / 'overhead'))
    opts = ap.parse_args()
    participants = {'torchebm': sys.executable}  # this checkout, installed in the running venv
    old_python = Path(opts.old_venv) / 'bin' / 'python'
    if old_python.exists(): participants['torchebm089'] = str(old_python)
    else: print(f'no TorchEBM 0.8.9 venv at {opts.old_venv}: timing this checkout only', file=sys.stderr)
    results = {label: [] for label in participants}
    for p in range(opts.procs):  # alternate the order of the libraries between rounds
        order = list(participants.items()) if p % 2 == 0 else list(participants.items())[::-1]
        for label, python in order:
            results[label].append(run_worker(python, label, opts.threads, opts.reps, opts.bench_dir))
            print(f'[flow-overhead] process {p + 1}/{opts.procs} {label} done', file=sys.stderr)
    meta = dict(procs=opts.procs, threads=opts.threads, reps=opts.reps)
    table = summarise(results)
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out + '.json').write_text(json.dumps(dict(meta=meta, table=table, raw=results), indent=1))
    Path(opts.out + '.md').write_text(markdown(table, meta))
    print(markdown(table, meta))


if __name__ == '__main__':
    main()
