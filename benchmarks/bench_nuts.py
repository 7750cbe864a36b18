"""NUTS against NumPyro's NUTS (jax on CPU, vectorised chains) and Pyro's NUTS on the same targets (issue 13).

Every library runs Stan's defaults (target acceptance 0.8, max tree depth 10, diagonal metric adapted in Stan's
windows) on the same energies, with the same warm-up and draw counts, one thread each. The draws of every library
are scored with the same estimator (`torchebm.diagnostics.effective_sample_size`, bulk, minimum over
coordinates):

- ESS per gradient evaluation: min ESS / (leapfrog steps the chains used while drawing). Load-independent.
  For torchebm the leapfrog steps the whole batch computed are reported beside it (`grads_lockstep`, shown as
  "batch"): on the CPU the chains run asynchronously (`torchebm` eager, `torchebm-compile` with the model's energy
  and gradient compiled), so the batch runs as many ticks as its busiest chain needs; lockstep chains
  (`torchebm-lockstep`, `torchebm-compile-lockstep`: runs of leaves traced) compute the deepest tree of every draw.
- ESS per second: min ESS / wall time of warm-up + draws (NumPyro and `torchebm-compile*`: the second run, after
  jit compilation / `torch.compile` tracing; the first run's time of `torchebm-compile*` is reported beside it).
  Pyro runs its chains one after another in one process (its multi-chain mode forks one process per chain,
  which on one core is no faster), so its ESS/s is per core and does not depend on the chain count; it is
  measured on `--pyro-chains` chains. On a shared machine the ESS/s numbers move with the load.

NumPyro and Pyro run in their own venv (`--peers`, default /work/venvs/peers: `python3 -m venv ...; pip install
torch==2.13.0; pip install numpyro jax pyro-ppl`), in a subprocess that writes their draws to a temporary file.

    python benchmarks/bench_nuts.py                       # all targets, all libraries
    python benchmarks/bench_nuts.py --targets banana --libraries torchebm,numpyro
    python benchmarks/bench_nuts.py --libraries torchebm,torchebm-lockstep   # asynchronous against lockstep chains
    python benchmarks/bench_nuts.py --libraries torchebm-compile,torchebm-compile-lockstep

Writes benchmarks/results/bench_nuts.{json,md}.
"""
import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ('gauss_corr', 'gauss_illcond', 'banana', 'funnel', 'linreg')


def target_data(name: str):
    "Arrays that define each target (shared by every library, built with numpy so all see the same numbers)."
    if name == 'gauss_corr':  # AR(1) covariance, rho = 0.9, d = 10
        d = 10
        cov = 0.9 ** np.abs(np.subtract.outer(np.arange(d), np.arange(d)))
        return dict(dim=d, precision=np.linalg.inv(cov))
    if name == 'gauss_illcond':  # independent, scales 0.01 .. 10, d = 10
        d = 10
        return dict(dim=d, precision=np.diag(np.logspace(-2, 1, d) ** -2.0))
    if name == 'banana':
        return dict(dim=2)
    if name == 'funnel':  # v and 3 x's
        return dict(dim=4)
    if name == 'linreg':  # conjugate Bayesian linear regression, n = 100, d = 5, sigma = 1, prior N(0, 10^2)
        rng = np.random.default_rng(0)
        X = rng.standard_normal((100, 5))
        y = X @ np.array([1.0, -2.0, 0.5, 0.0, 3.0]) + rng.standard_normal(100)
        return dict(dim=5, X=X, y=y)
    raise ValueError(f"unknown target {name!r}; expected one of {TARGETS}")


# The same energies written for torch (torchebm, pyro) and jax (numpyro): `xp` is torch or jax.numpy.
def energy(name: str, data, x, xp):
    "E(x) for a batch `x: [n, d]` -> `[n]`."
    if name in ('gauss_corr', 'gauss_illcond'):
        P = data['precision_t']
        return 0.5 * ((x @ P) * x).sum(-1)
    if name == 'banana':
        return x[:, 0] ** 2 / 8 + 2 * (x[:, 1] - 0.5 * x[:, 0] ** 2) ** 2
    if name == 'funnel':
        v, z = x[:, 0], x[:, 1:]
        return v ** 2 / 18 + 0.5 * (z ** 2).sum(-1) * xp.exp(-v) + 0.5 * z.shape[1] * v
    if name == 'linreg':
        X, y = data['X_t'], data['y_t']
        return 0.5 * ((y - x @ X.T) ** 2).sum(-1) + 0.5 * (x ** 2).sum(-1) / 100.0
    raise ValueError(name)


def with_tensors(data, to_tensor):
    out = dict(data)
    for key in ('precision', 'X', 'y'):
        if key in data: out[key + '_t'] = to_tensor(data[key])
    return out


def initial_points(n_chains: int, dim: int, seed: int = 0) -> np.ndarray:
    "Stan-style random starts: uniform in (-2, 2)."
    return np.random.default_rng(seed).uniform(-2, 2, size=(n_chains, dim))


def run_torchebm(name, n_chains, n_warmup, n_draws, seed, compile=False, asynchronous=True):
    """torchebm's NUTS on one target. With `compile=True` (libraries `torchebm-compile*`) the model's energy and
    gradient (asynchronous chains) or each run of leaves (lockstep) is one program traced by `torch.compile`; the first
    run traces it (its wall time is kept as `first_seconds`) and the second, timed run reuses it, as NumPyro's timed run
    reuses its jit-compiled program. `asynchronous=False` (libraries `*-lockstep`) keeps the chains in lockstep."""
    import torch
    torch.set_num_threads(1)
    from torchebm.samplers.nuts import NoUTurnSampler
    data = with_tensors(target_data(name), lambda a: torch.tensor(a, dtype=torch.float64))

    class Target(torch.nn.Module):
        def forward(self, x): return energy(name, data, x, torch)

    x0 = torch.tensor(initial_points(n_chains, data['dim'], seed))
    sampler = NoUTurnSampler(Target(), n_warmup=n_warmup, metric='diagonal', compile=compile, asynchronous=asynchronous)
    import warnings
    def sample(run_seed):
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', RuntimeWarning)
            result = sampler.sample(x=x0, n_steps=n_draws, return_trajectory=True, return_diagnostics=True,
                                    return_result=True, generator=torch.Generator().manual_seed(run_seed))
        return result, time.perf_counter() - start
    first_seconds = None
    if compile: _, first_seconds = sample(seed + 1000)  # traces the programs
    result, seconds = sample(seed)
    diag = result.diagnostics
    return dict(draws=result.samples.numpy(), seconds=seconds, first_seconds=first_seconds,
                grads=int(diag['n_leapfrog'].sum()), grads_lockstep=int(diag['n_grad_evals']) * n_chains,
                divergent=int(result.n_divergent.sum()), mean_depth=float(diag['tree_depth'].double().mean()))


PEER_WORKER = r'''
import json, sys, time, os
import numpy as np
sys.path.insert(0, os.environ['BENCH_DIR'])
from bench_nuts import target_data, energy, with_tensors, initial_points
args = json.loads(sys.argv[1])
name, n_chains, n_warmup, n_draws, seed, library = (args[k] for k in
    ('name', 'n_chains', 'n_warmup', 'n_draws', 'seed', 'library'))
out = {}
if library == 'numpyro':
    os.environ['XLA_FLAGS'] = '--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1'
    import jax
    jax.config.update('jax_enable_x64', True)
    import jax.numpy as jnp
    from numpyro.infer import MCMC, NUTS
    data = with_tensors(target_data(name), jnp.asarray)
    def potential(x): return energy(name, data, x[None], jnp)[0]
    x0 = jnp.asarray(initial_points(n_chains, data['dim'], seed))
    mcmc = MCMC(NUTS(potential_fn=potential, target_accept_prob=0.8, max_tree_depth=10), num_warmup=n_warmup,
                num_samples=n_draws, num_chains=n_chains, chain_method='vectorized', progress_bar=False)
    mcmc.run(jax.random.PRNGKey(seed), init_params=x0, extra_fields=('num_steps', 'diverging'))  # compiles
    start = time.perf_counter()
    mcmc.run(jax.random.PRNGKey(seed + 1), init_params=x0, extra_fields=('num_steps', 'diverging'))
    draws = np.asarray(mcmc.get_samples(group_by_chain=True))
    seconds = time.perf_counter() - start
    extra = mcmc.get_extra_fields(group_by_chain=True)
    out = dict(seconds=seconds, grads=int(np.asarray(extra['num_steps']).sum()),
               divergent=int(np.asarray(extra['diverging']).sum()))
else:
    import torch
    torch.set_num_threads(1)
    import pyro
    from pyro.infer import MCMC, NUTS
    data = with_tensors(target_data(name), lambda a: torch.tensor(a, dtype=torch.float64))
    def potential(params): return energy(name, data, params['x'][None], torch)[0]
    x0 = torch.tensor(initial_points(n_chains, data['dim'], seed))
    chains, grads, seconds = [], 0, 0.0
    for c in range(n_chains):
        pyro.set_rng_seed(seed + c)
        kernel = NUTS(potential_fn=potential, target_accept_prob=0.8, max_tree_depth=10, adapt_mass_matrix=True)
        mcmc = MCMC(kernel, num_samples=n_draws, warmup_steps=n_warmup, initial_params={'x': x0[c]},
                    disable_progbar=True)
        start = time.perf_counter()
        mcmc.run()
        seconds += time.perf_counter() - start
        chains.append(mcmc.get_samples()['x'].numpy())
    draws = np.stack(chains)
    out = dict(seconds=seconds, grads=None, divergent=None)
np.save(os.environ['BENCH_OUT'], draws)
print(json.dumps(out))
'''


def run_peer(library, name, n_chains, n_warmup, n_draws, seed, python):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / 'draws.npy'
        env = dict(os.environ, BENCH_DIR=str(Path(__file__).parent), BENCH_OUT=str(out), OMP_NUM_THREADS='1',
                   JAX_PLATFORMS='cpu')
        args = json.dumps(dict(name=name, n_chains=n_chains, n_warmup=n_warmup, n_draws=n_draws, seed=seed,
                               library=library))
        proc = subprocess.run([python, '-c', PEER_WORKER, args], env=env, capture_output=True, text=True, cwd=tmp)
        if proc.returncode != 0: raise RuntimeError(f"{library} on {name} failed:\n{proc.stderr[-3000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result['draws'] = np.load(out)
    return result


def score(result):
    "Min bulk ESS over coordinates (and of each coordinate) with the library's counts."
    import torch
    from torchebm.diagnostics import effective_sample_size
    draws = torch.as_tensor(result.pop('draws'))
    ess = effective_sample_size(draws)
    result['ess_min'] = float(ess.min())
    result['ess_per_grad'] = result['ess_min'] / result['grads'] if result.get('grads') else None
    result['ess_per_s'] = result['ess_min'] / result['seconds']
    result['n_chains'], result['n_draws'] = draws.shape[0], draws.shape[1]
    return result


def markdown(rows, settings):
    lines = [f"NUTS, {settings}", '',
             '| target | seed | library | chains | min ESS | grads | ESS/grad | ESS/grad vs NumPyro | seconds | ESS/s | ESS/s vs Pyro | divergent |',
             '|---|---|---|---|---|---|---|---|---|---|---|---|']
    for name, seed in dict.fromkeys((r['target'], r['seed']) for r in rows):
        by = {r['library']: r for r in rows if r['target'] == name and r['seed'] == seed}
        for lib, r in by.items():
            ref_grad = by.get('numpyro', {}).get('ess_per_grad')
            ref_s = by.get('pyro', {}).get('ess_per_s')
            per_grad = f"{r['ess_per_grad']:.4f}" if r['ess_per_grad'] else 'n/a'
            vs_grad = f"{r['ess_per_grad'] / ref_grad:.2f}x" if r['ess_per_grad'] and ref_grad else ''
            vs_s = f"{r['ess_per_s'] / ref_s:.1f}x" if ref_s else ''
            grads = r['grads'] if r['grads'] is not None else 'n/a'
            seconds = f"{r['seconds']:.1f}" + (f" (first run {r['first_seconds']:.1f})" if r.get('first_seconds') else '')
            if lib.startswith('torchebm'): grads = f"{grads} ({r['grads_lockstep']} batch)"
            lines.append(f"| {name} | {seed} | {lib} | {r['n_chains']} | {r['ess_min']:.0f} | {grads} | {per_grad} | {vs_grad} | "
                         f"{seconds} | {r['ess_per_s']:.1f} | {vs_s} | {r['divergent'] if r['divergent'] is not None else 'n/a'} |")
    seeds = sorted({r['seed'] for r in rows})
    if len(seeds) > 1: lines += ['', seed_summary(rows, seeds)]
    return '\n'.join(lines) + '\n'


def mean_and_se(values):
    values = np.asarray(values, dtype=float)
    return values.mean(), (values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else float('nan'))


def seed_summary(rows, seeds):
    """Means over seeds (with their standard errors): min-ESS per gradient varies by tens of percent from seed to seed
    on the banana and the funnel (rare excursions into the tails), so one seed does not decide a ratio."""
    lines = [f"Mean over seeds {', '.join(map(str, seeds))} (+- standard error of the mean):", '',
             '| target | library | seeds | ESS/grad | ESS/grad vs NumPyro | ESS/s | ESS/s vs Pyro | divergent |',
             '|---|---|---|---|---|---|---|---|']
    for name in dict.fromkeys(r['target'] for r in rows):
        libs = dict.fromkeys(r['library'] for r in rows if r['target'] == name)
        stats = {lib: [r for r in rows if r['target'] == name and r['library'] == lib] for lib in libs}
        ref_grad = mean_and_se([r['ess_per_grad'] for r in stats.get('numpyro', [])])[0] if 'numpyro' in stats else None
        ref_s = mean_and_se([r['ess_per_s'] for r in stats.get('pyro', [])])[0] if 'pyro' in stats else None
        for lib, group in stats.items():
            per_grad = [r['ess_per_grad'] for r in group if r['ess_per_grad']]
            g_mean, g_se = mean_and_se(per_grad) if per_grad else (None, None)
            s_mean, s_se = mean_and_se([r['ess_per_s'] for r in group])
            divergent = [r['divergent'] for r in group if r['divergent'] is not None]
            lines.append(f"| {name} | {lib} | {len(group)} | "
                         + (f"{g_mean:.4f} +- {g_se:.4f}" if g_mean else 'n/a') + ' | '
                         + (f"{g_mean / ref_grad:.2f}x" if g_mean and ref_grad else '') + ' | '
                         + f"{s_mean:.1f} +- {s_se:.1f} | " + (f"{s_mean / ref_s:.1f}x" if ref_s else '') + ' | '
                         + (f"{np.mean(divergent):.0f}" if divergent else 'n/a') + ' |')
    return '\n'.join(lines) + '\n'


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--targets', default=','.join(TARGETS))
    parser.add_argument('--libraries', default='torchebm,torchebm-compile,numpyro,pyro')
    parser.add_argument('--chains', type=int, default=64)
    parser.add_argument('--pyro-chains', type=int, default=2)
    parser.add_argument('--warmup', type=int, default=500)
    parser.add_argument('--draws', type=int, default=500)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--seeds', default=None, help='comma-separated seeds (overrides --seed); adds a table of means over seeds')
    parser.add_argument('--peers', default='/work/venvs/peers/bin/python')
    parser.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results' / 'bench_nuts'))
    args = parser.parse_args()
    settings = (f"{args.warmup} warm-up + {args.draws} draws per chain, diagonal metric, target acceptance 0.8, "
                f"max tree depth 10, one thread per library, float64")
    rows = []
    seeds = [int(v) for v in args.seeds.split(',')] if args.seeds else [args.seed]
    for name, seed, library in itertools.product(args.targets.split(','), seeds, args.libraries.split(',')):
        n_chains = args.pyro_chains if library == 'pyro' else args.chains
        if library.startswith('torchebm'):
            result = run_torchebm(name, n_chains, args.warmup, args.draws, seed, compile='-compile' in library,
                                  asynchronous=not library.endswith('-lockstep'))
        else:
            result = run_peer(library, name, n_chains, args.warmup, args.draws, seed, args.peers)
        row = dict(target=name, seed=seed, library=library, **score(result))
        rows.append(row)
        print(json.dumps(row), flush=True)
        Path(args.out + '.json').write_text(json.dumps(dict(settings=settings, rows=rows), indent=1))
        Path(args.out + '.md').write_text(markdown(rows, settings))  # rewritten after every row
    print(markdown(rows, settings))


if __name__ == '__main__':
    main()
