"""Device and dtype hygiene of the samplers that build their own tensors: NUTS, parallel tempering, SMC, AIS and
contrastive divergence's replay buffer.

Each sampler runs on a small Gaussian (`GaussianModel`, a `BaseModel`) and on a small `nn.Module` energy, for every
device (CUDA only where one exists) and dtype: the draws come back on the requested device and dtype, every tensor of
the result (step sizes, acceptance rates, log Z, ...) on the same device, all finite, and the same seed of a generator
gives the same numbers (a sampler that drew from the global RNG somewhere would not).

CI has no GPU, so two CPU checks stand in for it:
- the *default-device trap*: the run happens under `with torch.device('meta')`, so any tensor a sampler creates
  without `device=` lands on 'meta' and either breaks the run or shows up in the result (on CUDA it would be a CPU
  tensor mixed with CUDA ones);
- contrastive divergence's buffer is built on `device='meta'` while the data are on the CPU, so a buffer that followed
  the data instead of `device=` (the bug once reported as "ContrastiveDivergence(device='cuda') is ignored") fails here.

The host-sync test counts explicit device-to-host reads (`bool(t)`, `int(t)`, `float(t)`, `t.item()`, `t.tolist()`,
`t.numpy()`) during `NoUTurnSampler.sample` through the public API only; see its docstring for what it assumes."""
import warnings

import pytest
import torch
from torch import distributions as D

from torchebm.core.energies import GaussianModel
from torchebm.diagnostics.partition import annealed_importance_sampling
from torchebm.losses.contrastive_divergence import ContrastiveDivergence, PersistentContrastiveDivergence
from torchebm.samplers.langevin import LangevinDynamics
from torchebm.samplers.nuts import NoUTurnSampler
from torchebm.samplers.smc import SequentialMonteCarlo
from torchebm.samplers.tempering import ParallelTempering

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
DEVICES = ['cpu', pytest.param('cuda', marks=needs_cuda)]
DTYPES = [torch.float32, torch.float64]
MODELS = ['gaussian', 'network']
DIM = 2


class TiltedGaussian(torch.nn.Module):
    "A plain `nn.Module` energy: $\\tfrac12|x|^2$ plus a bounded tanh network, so it is confining and smooth."
    def __init__(self, dim: int, hidden: int = 16, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.nn.Parameter(torch.randn(hidden, dim, generator=g))
        self.b1 = torch.nn.Parameter(torch.randn(hidden, generator=g))
        self.w2 = torch.nn.Parameter(0.3 * torch.randn(hidden, generator=g) / hidden ** 0.5)

    def forward(self, x):
        return 0.5 * x.pow(2).sum(-1) + torch.tanh(x @ self.w1.T + self.b1) @ self.w2


def make_model(kind: str, device, dtype):
    if kind == 'gaussian':
        return GaussianModel(torch.tensor([0.5, -0.5]), torch.tensor([[1.0, 0.3], [0.3, 0.5]]), dtype=dtype,
                             device=device)
    return TiltedGaussian(DIM).to(device=device, dtype=dtype)


def generator(device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def start(n: int, device, dtype, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(device)


def tensors(obj, path: str = 'result'):
    "`(path, tensor)` for every tensor inside a result: NamedTuples, dicts, lists and modules' buffers (a `MassMatrix`)."
    if isinstance(obj, torch.Tensor): yield path, obj
    elif isinstance(obj, torch.nn.Module):
        for name, t in obj.named_buffers(): yield f'{path}.{name}', t
    elif isinstance(obj, tuple) and hasattr(obj, '_fields'):
        for name in obj._fields: yield from tensors(getattr(obj, name), f'{path}.{name}')
    elif isinstance(obj, dict):
        for name, v in obj.items(): yield from tensors(v, f'{path}[{name!r}]')
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj): yield from tensors(v, f'{path}[{i}]')


def check_result(result, device):
    "Every tensor of `result` on `device` and finite; returns `{path: tensor}`."
    found = dict(tensors(result))
    assert found
    device = torch.device(device)
    wrong = {p: t.device for p, t in found.items() if t.device.type != device.type}
    assert not wrong, f"tensors not on {device}: {wrong}"
    bad = [p for p, t in found.items() if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all())]
    assert not bad, f"non-finite values in {bad}"
    return found


def floating(found) -> dict:
    return {p: t.dtype for p, t in found.items() if t.is_floating_point()}


def assert_same(a, b, device):
    "Two runs gave the same numbers: bit for bit on the CPU, to rounding on CUDA (atomics may reorder sums)."
    ta, tb = dict(tensors(a)), dict(tensors(b))
    assert ta.keys() == tb.keys()
    for p in ta:
        if torch.device(device).type == 'cpu': assert torch.equal(ta[p], tb[p]), p
        else: torch.testing.assert_close(ta[p], tb[p], msg=p)


# ----------------------------------------------------------------------------------------------- the samplers

def run_nuts(model, device, dtype, seed):
    sampler = NoUTurnSampler(model, n_warmup=20, max_tree_depth=5)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', RuntimeWarning)  # a divergence after 20 warm-up steps is no failure here
        return sampler.sample(x=start(6, device, dtype), n_steps=8, return_trajectory=True, return_diagnostics=True,
                              return_result=True, generator=generator(device, seed))


def run_pt(model, device, dtype, seed, **kwargs):
    sampler = ParallelTempering(model, n_temperatures=3, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', RuntimeWarning)  # few steps: swap-rate warnings are expected
        return sampler.sample(x=start(4, device, dtype), n_steps=10, n_warmup=10, generator=generator(device, seed))


def run_smc(model, device, dtype, seed, **kwargs):
    sampler = SequentialMonteCarlo(model, n_mutation_steps=2, dtype=dtype, device=device, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', RuntimeWarning)
        return sampler.sample(dim=DIM, n_samples=64, generator=generator(device, seed))


def run_ais(model, device, dtype, seed):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', RuntimeWarning)
        return annealed_importance_sampling(model, dim=DIM, n_chains=64, n_temperatures=10, dtype=dtype,
                                            device=device, generator=generator(device, seed))


def make_pcd(model, device=None):
    # use_kernels=False: the compiled fused kernels have their own tests (test_kernels.py); building them here would
    # cost minutes, and this test is about the loss's buffer
    sampler = LangevinDynamics(model, step_size=0.05, use_kernels=False)
    return ContrastiveDivergence(model, sampler, k_steps=3, persistent=True, buffer_size=32, device=device)


def run_pcd(model, device, dtype, seed):
    pcd = make_pcd(model, device)
    g = generator(device, seed)
    x = start(16, device, dtype, seed=1)
    for _ in range(2): loss, negatives = pcd(x, generator=g)  # the second call starts from the buffer
    return {'loss': loss, 'negatives': negatives, 'replay_buffer': pcd.replay_buffer}


@pytest.mark.parametrize('kind', MODELS)
@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('device', DEVICES)
def test_nuts_device_and_dtype(device, dtype, kind):
    model = make_model(kind, device, dtype)
    result = run_nuts(model, device, dtype, seed=1)
    found = check_result(result, device)
    assert result.samples.shape == (6, 8, DIM)
    assert set(floating(found).values()) == {dtype}, floating(found)  # step sizes, metric, rates: all in x's dtype
    assert result.adapted.step_size.shape == (6,) and result.adapted.metric.mass.device.type == torch.device(device).type
    assert_same(result, run_nuts(model, device, dtype, seed=1), device)
    assert not torch.equal(result.samples, run_nuts(model, device, dtype, seed=2).samples)


@pytest.mark.parametrize('kind', MODELS)
@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('device', DEVICES)
def test_parallel_tempering_device_and_dtype(device, dtype, kind):
    model = make_model(kind, device, dtype)
    result = run_pt(model, device, dtype, seed=1)
    found = check_result(result, device)
    assert result.samples.shape == (4, 10, DIM) and result.warmup.shape == (4, 10, DIM)
    assert set(floating(found).values()) == {dtype}, floating(found)
    assert result.round_trips.dtype == result.n_divergent.dtype == torch.long
    assert_same(result, run_pt(model, device, dtype, seed=1), device)
    assert not torch.equal(result.samples, run_pt(model, device, dtype, seed=2).samples)


@pytest.mark.parametrize('kind', MODELS)
@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('device', DEVICES)
def test_smc_device_and_dtype(device, dtype, kind):
    model = make_model(kind, device, dtype)
    result = run_smc(model, device, dtype, seed=1)
    found = check_result(result, device)
    assert result.samples.dtype == dtype and result.samples.shape == (64, DIM)
    # log Z, the log weights and the ladder are accumulated in float64 whatever the particles' dtype (documented)
    others = {p: d for p, d in floating(found).items() if p != 'result.samples'}
    assert set(others.values()) == {torch.float64}, others
    assert_same(result, run_smc(model, device, dtype, seed=1), device)
    assert not torch.equal(result.samples, run_smc(model, device, dtype, seed=2).samples)


@pytest.mark.parametrize('kind', MODELS)
@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('device', DEVICES)
def test_ais_device_and_dtype(device, dtype, kind):
    model = make_model(kind, device, dtype)
    result = run_ais(model, device, dtype, seed=1)
    found = check_result(result, device)
    assert result.samples.dtype == dtype and result.samples.shape == (64, DIM)
    others = {p: d for p, d in floating(found).items() if p != 'result.samples'}
    assert set(others.values()) == {torch.float64}, others
    assert_same(result, run_ais(model, device, dtype, seed=1), device)
    assert not torch.equal(result.log_weights, run_ais(model, device, dtype, seed=2).log_weights)


@pytest.mark.parametrize('kind', MODELS)
@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('device', DEVICES)
def test_persistent_cd_device_and_dtype(device, dtype, kind):
    model = make_model(kind, device, dtype)
    out = run_pcd(model, device, dtype, seed=1)
    found = check_result(out, device)
    assert set(floating(found).values()) == {dtype}, floating(found)
    assert out['loss'].ndim == 0 and out['negatives'].shape == (16, DIM) and out['replay_buffer'].shape == (32, DIM)
    assert_same(out, run_pcd(model, device, dtype, seed=1), device)
    assert not torch.equal(out['replay_buffer'], run_pcd(model, device, dtype, seed=2)['replay_buffer'])


@needs_cuda
@pytest.mark.parametrize('dtype', DTYPES)
def test_pcd_buffer_on_cpu_with_chains_on_cuda(dtype):
    "A large buffer in host memory (device='cpu') while the model, data and chains are on the GPU."
    model = make_model('network', 'cuda', dtype)
    pcd = make_pcd(model, device='cpu')
    x = start(16, 'cuda', dtype)
    for _ in range(2): loss, negatives = pcd(x, generator=generator('cuda', 0))
    assert pcd.replay_buffer.device.type == 'cpu' and pcd.replay_buffer.dtype == dtype
    assert negatives.is_cuda and loss.is_cuda and negatives.dtype == dtype


# ------------------------------------------------- CPU stand-ins for a second device: the default-device trap

def trapped(run):
    "Run under `torch.device('meta')` as the default device: a tensor made without `device=` cannot pass unnoticed."
    with torch.device('meta'): return run()


@pytest.mark.parametrize('dtype', DTYPES)
def test_default_device_trap(dtype):
    """NUTS, PT (MALA and HMC), SMC and PCD with CPU data under a 'meta' default device: every tensor of their results
    is on the CPU, so none was made on the default device (which on a CUDA run would be the CPU, not the chains')."""
    model = make_model('gaussian', 'cpu', dtype)
    nuts = NoUTurnSampler(model, n_warmup=10, max_tree_depth=4)  # samplers are built outside: their ladders etc.
    pt_mala, pt_hmc = ParallelTempering(model, n_temperatures=3), ParallelTempering(model, 'hmc', n_temperatures=3)
    # SMC with an explicit base: its default N(0, I) is built on the default device and then moved, which is fine
    # on CUDA but cannot leave 'meta' (the same holds for AIS's temperature ladder, so AIS is not trapped)
    base = D.Normal(torch.zeros(DIM, dtype=dtype), torch.ones(DIM, dtype=dtype))
    smc = SequentialMonteCarlo(model, n_mutation_steps=2, base=base)
    pcd, x = make_pcd(model), start(8, 'cpu', dtype)
    runs = {
        'nuts': lambda g: nuts.sample(x=x, n_steps=4, return_trajectory=True, return_diagnostics=True,
                                      return_result=True, generator=g),
        'pt_mala': lambda g: pt_mala.sample(x=x, n_steps=4, n_warmup=4, generator=g),
        'pt_hmc': lambda g: pt_hmc.sample(x=x, n_steps=4, n_warmup=4, return_all_temperatures=True, generator=g),
        'smc': lambda g: smc.sample(n_samples=32, generator=g),
        'pcd': lambda g: [pcd(x, generator=g) for _ in range(2)] + [pcd.replay_buffer],
    }
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', RuntimeWarning)
        for run in runs.values():
            result = trapped(lambda: run(torch.Generator().manual_seed(0)))
            check_result(result, 'cpu')


def test_nuts_counts_follow_the_chains():
    model = make_model('gaussian', 'cpu', torch.float64)
    sampler = NoUTurnSampler(model, n_warmup=5, max_tree_depth=3)
    x = start(4, 'cpu', torch.float64)
    result = trapped(lambda: sampler.sample(x=x, n_steps=2, return_diagnostics=True, return_result=True,
                                            generator=torch.Generator().manual_seed(0)))
    check_result(result, 'cpu')


# ---------------------------------------------------- contrastive divergence honours device= without a GPU

@pytest.mark.parametrize('cls', [ContrastiveDivergence, PersistentContrastiveDivergence])
def test_cd_buffer_is_built_on_its_device_not_the_datas(cls):
    "device='meta' with CPU data: the buffer is made on 'meta' (a buffer following the data would be on the CPU)."
    model = make_model('network', 'cpu', torch.float32)
    kwargs = dict(persistent=True) if cls is ContrastiveDivergence else {}
    pcd = cls(model, LangevinDynamics(model, step_size=0.05, use_kernels=False), buffer_size=32, device='meta', **kwargs)
    x = start(8, 'cpu', torch.float32)
    assert pcd.buffer_device(x) == torch.device('meta')
    buffer = pcd.initialized_buffer(x, torch.Generator().manual_seed(0))
    assert buffer is pcd.replay_buffer
    assert buffer.device.type == 'meta' and buffer.shape == (32, DIM) and buffer.dtype == torch.float32


@pytest.mark.parametrize('dtype', DTYPES)
def test_cd_buffer_on_cpu_device(dtype):
    "device='cpu' with the model on the CPU: buffer, negatives and loss on the CPU in the data's dtype."
    model = make_model('network', 'cpu', dtype)
    pcd = make_pcd(model, device='cpu')
    loss, negatives = pcd(start(8, 'cpu', dtype), generator=torch.Generator().manual_seed(0))
    assert pcd.replay_buffer.device.type == 'cpu' and pcd.replay_buffer.dtype == dtype
    assert negatives.dtype == loss.dtype == dtype


def test_cd_dtype_argument_does_not_cast_the_buffer():
    "`dtype=` does not cast the buffer: it is made in the data's dtype (as documented since this test was added)."
    model = make_model('gaussian', 'cpu', torch.float32)
    pcd = ContrastiveDivergence(model, LangevinDynamics(model, step_size=0.05, use_kernels=False), persistent=True,
                                buffer_size=32, dtype=torch.float64)
    loss, negatives = pcd(start(8, 'cpu', torch.float32), generator=torch.Generator().manual_seed(0))
    assert pcd.replay_buffer.dtype == negatives.dtype == loss.dtype == torch.float32


def test_cd_buffer_follows_to_and_refuses_a_mismatched_dtype():
    "`.to()` moves the buffer with the loss; data in another dtype than the buffer's is a ValueError naming the fix."
    model = make_model('gaussian', 'cpu', torch.float32)  # any_input_dtype: the model itself takes either dtype
    pcd = make_pcd(model)
    x = start(8, 'cpu', torch.float32)
    pcd(x, generator=torch.Generator().manual_seed(0))
    assert pcd.replay_buffer.dtype == torch.float32
    pcd.to(torch.float64)
    assert pcd.replay_buffer.dtype == torch.float64
    with pytest.raises(ValueError, match='reset_buffer'):
        pcd(x, generator=torch.Generator().manual_seed(0))
    loss, negatives = pcd(x.double(), generator=torch.Generator().manual_seed(0))
    assert negatives.dtype == loss.dtype == pcd.replay_buffer.dtype == torch.float64
    pcd.to('meta')
    assert pcd.replay_buffer.device.type == 'meta' and pcd.buffer_device(x) == torch.device('meta')


# ------------------------------------------------------------------------------- NUTS: no host sync per leapfrog

SYNCS = ('__bool__', '__int__', '__float__', '__index__', 'item', 'tolist', 'numpy')


def count_syncs(monkeypatch, run) -> int:
    "Explicit device-to-host reads (`SYNCS` on any tensor) made while `run()` runs."
    count = [0]
    def counting(original):
        def method(self, *args, **kwargs):
            count[0] += 1
            return original(self, *args, **kwargs)
        return method
    with monkeypatch.context() as patch:
        for name in SYNCS: patch.setattr(torch.Tensor, name, counting(getattr(torch.Tensor, name)))
        run()
    return count[0]


def nuts_syncs(monkeypatch, max_tree_depth: int, n_steps: int):
    """Syncs of a NUTS run whose every tree reaches `max_tree_depth` (a tiny fixed step size, no warm-up, unit
    metric, so no tree turns), and the leapfrog steps each chain took."""
    model = make_model('gaussian', 'cpu', torch.float64)
    sampler = NoUTurnSampler(model, step_size=1e-4, metric='unit', max_tree_depth=max_tree_depth, n_warmup=0)
    x, out = start(8, 'cpu', torch.float64), {}
    run = lambda: out.update(d=sampler.sample(x=x, n_steps=n_steps, return_diagnostics=True,
                                              generator=torch.Generator().manual_seed(0))[1])
    syncs = count_syncs(monkeypatch, run)
    if n_steps: assert bool(out['d']['hit_max_depth'].all()) and bool((out['d']['tree_depth'] == max_tree_depth).all())
    return syncs, int(out['d']['n_leapfrog'].sum(0).max()) if n_steps else 0


def test_nuts_host_syncs_are_few_per_leapfrog_step(monkeypatch):
    """Deep trees (255 leapfrog steps per draw): the syncs the draws add (beyond a run without draws) are at most one
    per 4 leapfrog steps. Today: one per doubling plus one per power of two inside each doubling, 35 per draw;
    a sync per leaf would give 255."""
    base, _ = nuts_syncs(monkeypatch, 8, 0)
    syncs, leapfrog = nuts_syncs(monkeypatch, 8, 3)
    assert leapfrog == 3 * 255
    assert syncs - base <= leapfrog / 4, f"{syncs - base} host syncs for {leapfrog} leapfrog steps"


def test_nuts_host_syncs_grow_with_doublings_not_leapfrog_steps(monkeypatch):
    """From trees of depth 4 (15 leapfrog steps) to depth 8 (255, x17) the syncs per draw may grow with the number of
    doublings (up to quadratically: a check per power of two inside each doubling, x4), not with the leapfrog steps."""
    (base_shallow, _), (base_deep, _) = nuts_syncs(monkeypatch, 4, 0), nuts_syncs(monkeypatch, 8, 0)
    shallow, leapfrog_shallow = nuts_syncs(monkeypatch, 4, 3)
    deep, leapfrog_deep = nuts_syncs(monkeypatch, 8, 3)
    assert leapfrog_deep / leapfrog_shallow == 17
    shallow, deep = shallow - base_shallow, deep - base_deep
    ratio = deep / max(shallow, 1)
    assert ratio <= 6, f"syncs per draw grew x{ratio:.1f} ({shallow} -> {deep}) for x17 leapfrog steps"
