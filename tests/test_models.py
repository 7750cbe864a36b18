"Neural backbones, components and wrappers: shapes, closed forms, zero-init, learning, dtypes, bad input, samplers."
import math

import pytest
import torch
from torch import nn

from torchebm.core.base import BaseModel
from torchebm.models import (AdaLNZeroBlock, AdaLNZeroPatchHead, ClassifierFreeGuidance, ConditionalTransformer2D,
                             ConvPatchEmbed2d, EqMEnergy, LabelEmbedder, MLPEnergy, MLPTimestepEmbedder,
                             MultiheadSelfAttention, TimeConditionedMLP, VectorFieldEnergy, build_2d_sincos_pos_embed,
                             patchify2d, timestep_embedding, unpatchify2d)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')


def _perturb(module, scale=0.05, seed=0):
    "Move every parameter off its initial value (leave the exact adaLN-Zero start)."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters(): p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def _tiny_dit(**kw):
    args = dict(in_channels=2, input_size=8, patch_size=2, embed_dim=32, depth=2, num_heads=4)
    return ConditionalTransformer2D(**{**args, **kw})


# ---------------------------------------------------------------- components

def test_timestep_embedding_matches_formula():
    t = torch.tensor([0.0, 0.7, 3.0], dtype=torch.float64)
    emb = timestep_embedding(t, 6, max_period=100.0)
    freqs = 100.0 ** (-torch.arange(3, dtype=torch.float64) / 3)
    expected = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], 1)
    assert emb.dtype == torch.float64 and torch.allclose(emb, expected)
    with pytest.raises(ValueError, match=r'\[batch\]'): timestep_embedding(torch.zeros(2, 1), 6)


def test_timestep_embedder_distinguishes_times_and_follows_dtype():
    emb = MLPTimestepEmbedder(16).double()
    out = emb(torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    assert out.shape == (3, 16) and out.dtype == torch.float64
    assert (out[0] - out[2]).abs().max() > 0


def test_patchify_roundtrip_rectangular_and_conv_equivalence():
    x = torch.randn(3, 4, 6, 10, dtype=torch.float64)
    tokens = patchify2d(x, 2)
    assert tokens.shape == (3, 15, 16)
    assert torch.equal(unpatchify2d(tokens, 2, 4, grid_size=(3, 5)), x)
    pe = ConvPatchEmbed2d(4, 7, 2).double()
    w = pe.proj.weight.permute(0, 2, 3, 1).reshape(7, -1)
    assert torch.allclose(pe(x), tokens @ w.T + pe.proj.bias)
    with pytest.raises(ValueError, match='grid_size'): unpatchify2d(tokens, 2, 4, grid_size=(4, 4))
    with pytest.raises(ValueError, match='token width'): unpatchify2d(tokens, 2, 3, grid_size=(3, 5))


def test_sincos_positions_relative_structure():
    pos = build_2d_sincos_pos_embed(64, (4, 4), dtype=torch.float64)
    assert pos.shape == (16, 64)
    # sin/cos features: each 1-D half has constant squared norm, so dot products depend on offsets only
    assert torch.allclose(pos.square().sum(1), torch.full((16,), 32.0, dtype=torch.float64))
    dots = pos @ pos.T
    assert torch.allclose(dots[0, 1], dots[5, 6]) and torch.allclose(dots[0, 4], dots[6, 10])
    with pytest.raises(ValueError, match='divisible by 4'): build_2d_sincos_pos_embed(10, 2)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_attention_matches_manual_softmax(dtype):
    torch.manual_seed(0)
    att = MultiheadSelfAttention(12, 3).to(dtype)
    x = torch.randn(2, 7, 12, dtype=dtype)
    q, k, v = (z.reshape(2, 7, 3, 4).transpose(1, 2) for z in att.qkv(x).split(12, -1))
    ref = torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1) @ v
    expected = att.out_proj(ref.transpose(1, 2).reshape(2, 7, 12))
    assert torch.allclose(att(x), expected, atol=1e-5 if dtype == torch.float32 else 1e-12)
    with pytest.raises(ValueError, match='divisible'): MultiheadSelfAttention(10, 3)


def test_adaln_zero_block_and_head_at_init():
    block, head = AdaLNZeroBlock(16, 4, cond_dim=5), AdaLNZeroPatchHead(16, 2, 3, (2, 2), cond_dim=5)
    x, c = torch.randn(4, 4, 16), 10 * torch.randn(4, 5)
    with torch.no_grad():
        assert torch.equal(block(x, c), x)
        assert torch.equal(head(x, c), torch.zeros(4, 3, 4, 4))


def test_label_dropout_rate_generator_and_eval():
    emb = LabelEmbedder(5, 8, dropout_prob=0.25)
    y = torch.arange(5).repeat(2000)
    dropped = emb.drop_labels(y, generator=torch.Generator().manual_seed(0))
    frac = (dropped == 5).double().mean()
    assert abs(frac - 0.25) < 0.02
    assert torch.equal(emb.drop_labels(y, generator=torch.Generator().manual_seed(0)), dropped)
    assert torch.equal(dropped[dropped != 5], y[dropped != 5])
    emb.eval()
    with torch.no_grad(): assert torch.equal(emb(y[:5]), emb.embedding.weight[:5])
    with pytest.raises(ValueError, match='dropout_prob'): LabelEmbedder(5, 8, dropout_prob=1.5)
    with pytest.raises(ValueError, match='null'): LabelEmbedder(5, 8, dropout_prob=0.1, null_token=False)


# ---------------------------------------------------------------- ConditionalTransformer2D

@pytest.mark.parametrize('input_size, patch', [(8, 2), ((8, 12), 4), (4, 1)])
def test_dit_shapes_and_exact_zero_at_init(input_size, patch):
    model = ConditionalTransformer2D(in_channels=3, out_channels=5, input_size=input_size, patch_size=patch,
                                     embed_dim=32, depth=2, num_heads=2, num_classes=7)
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    x = torch.randn(4, 3, h, w)
    with torch.no_grad():
        out = model(x, torch.rand(4), y=torch.randint(0, 7, (4,)))
        assert out.shape == (4, 5, h, w) and torch.equal(out, torch.zeros_like(out))
        assert torch.equal(model(x, cond=torch.randn(4, 32)), torch.zeros(4, 5, h, w))


def test_dit_condition_paths_agree():
    model = _perturb(_tiny_dit(num_classes=3)).eval()
    x, t, y = torch.randn(3, 2, 8, 8), torch.rand(3), torch.tensor([0, 2, 1])
    with torch.no_grad():
        by_time = model(x, t)
        assert torch.equal(model(x, t=t), by_time)
        raw = model.condition.t_embedder(t)
        assert torch.allclose(model(x, raw), by_time, atol=1e-6)      # [B, cond_dim] is used as the vector itself
        assert torch.allclose(model(x, 0.3), model(x, torch.full((3,), 0.3)))
        assert not torch.allclose(model(x, t, y=y), by_time)


def test_dit_gradients_reach_every_parameter_after_a_few_steps():
    torch.manual_seed(0)
    model = _tiny_dit(num_classes=2, class_dropout_prob=0.0)
    x, t, y = torch.randn(4, 2, 8, 8), torch.rand(4), torch.tensor([0, 1, 0, 1])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(3):
        opt.zero_grad(); (model(x, t, y=y) - x).square().mean().backward(); opt.step()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert dead == []


@pytest.mark.slow
def test_dit_overfits_a_tiny_batch():
    torch.manual_seed(0)
    model = ConditionalTransformer2D(1, input_size=8, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                                     num_classes=3, class_dropout_prob=0.0)
    x, t, y = torch.randn(6, 1, 8, 8), torch.rand(6), torch.arange(6) % 3
    target = torch.cos(2 * x) * t[:, None, None, None] - y[:, None, None, None]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        opt.zero_grad()
        loss = (model(x, t, y=y) - target).square().mean()
        loss.backward(); opt.step()
        first = loss.item() if first is None else first
    assert loss.item() < 0.02 * first


def test_dit_float64_and_per_sample_independence():
    model = _perturb(_tiny_dit(num_classes=4)).double().eval()
    x, t, y = torch.randn(5, 2, 8, 8, dtype=torch.float64), torch.rand(5, dtype=torch.float64), torch.arange(5) % 4
    with torch.no_grad():
        out = model(x, t, y=y)
        assert out.dtype == torch.float64
        assert torch.allclose(model(x[2:4], t[2:4], y=y[2:4]), out[2:4], atol=1e-12)
    xg = x.clone().requires_grad_(True)
    grad, = torch.autograd.grad(model(xg, t, y=y)[0].sum(), xg)
    assert grad[1:].abs().max() == 0 and grad[0].abs().max() > 0


def test_dit_label_dropout_only_in_training_and_reproducible():
    model = _perturb(_tiny_dit(num_classes=4, class_dropout_prob=0.5))
    x, t, y = torch.randn(8, 2, 8, 8), torch.rand(8), torch.arange(8) % 4
    with torch.no_grad():
        a = model(x, t, y=y, generator=torch.Generator().manual_seed(3))
        b = model(x, t, y=y, generator=torch.Generator().manual_seed(3))
        assert torch.equal(a, b)
        model.eval()
        assert torch.equal(model(x, t, y=y), model(x, t, y=y))
        null = model(x, t, y=torch.full((8,), model.null_label))
        assert not torch.allclose(model(x, t, y=y), null)


def test_dit_state_dict_roundtrip():
    a, b = _perturb(_tiny_dit()).eval(), _tiny_dit().eval()
    b.load_state_dict(a.state_dict())
    x, t = torch.randn(2, 2, 8, 8), torch.rand(2)
    with torch.no_grad(): assert torch.equal(a(x, t), b(x, t))
    assert 'pos_embed' not in a.state_dict()          # fixed table, rebuilt from the config


@pytest.mark.parametrize('kwargs, match', [
    (dict(input_size=9), 'divisible'),
    (dict(embed_dim=30), 'divisible'),
    (dict(depth=0), 'depth'),
    (dict(patch_size=0), 'patch_size'),
    (dict(num_classes=0), 'num_classes'),
    (dict(input_size=(8, 8, 8)), 'input_size|pair'),
])
def test_dit_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match): _tiny_dit(**kwargs)


def test_dit_bad_inputs():
    model = _tiny_dit()
    x = torch.randn(2, 2, 8, 8)
    with pytest.raises(ValueError, match='x must have shape'): model(torch.randn(2, 3, 8, 8), torch.rand(2))
    with pytest.raises(ValueError, match='condition'): model(x)
    with pytest.raises(ValueError, match='num_classes'): model(x, torch.rand(2), y=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match='cond'): model(x, torch.randn(2, 5))


@CUDA
def test_dit_cuda_matches_cpu():
    model = _perturb(_tiny_dit(num_classes=3)).eval()
    x, t, y = torch.randn(3, 2, 8, 8), torch.rand(3), torch.tensor([0, 1, 2])
    with torch.no_grad():
        cpu = model(x, t, y=y)
        gpu = model.cuda()(x.cuda(), t.cuda(), y=y.cuda())
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-4)


# ---------------------------------------------------------------- MLPs

@pytest.mark.parametrize('activation', ['silu', 'tanh', 'softplus', 'gelu'])
def test_mlp_energy_gradient_matches_finite_differences(activation):
    torch.manual_seed(0)
    model = MLPEnergy(3, hidden_dims=(16, 16), activation=activation, dtype=torch.float64)
    x = torch.randn(5, 3, dtype=torch.float64)
    grad = model.gradient(x)
    eye, h = torch.eye(3, dtype=torch.float64), 1e-6
    with torch.no_grad():
        fd = torch.stack([(model(x + h * e) - model(x - h * e)) / (2 * h) for e in eye], 1)
    assert torch.allclose(grad, fd, atol=1e-7)
    assert model.dim == 3 and model(x).shape == (5,)


def test_mlp_energy_spectral_norm_bounds_the_gradient():
    torch.manual_seed(1)
    model = MLPEnergy(2, hidden_dims=(64, 64, 64), spectral_norm=True)
    for _ in range(50): model(torch.randn(4, 2))
    model.eval()
    grads = model.gradient(10 * torch.randn(4000, 2)).norm(dim=1)
    assert grads.max() <= 1.1 ** 3 + 1e-3            # each SiLU has Lipschitz constant ~1.1
    plain = MLPEnergy(2, hidden_dims=(64, 64, 64))
    assert not any('parametrizations' in n for n, _ in plain.named_parameters())


@pytest.mark.parametrize('kwargs, match', [
    (dict(input_dim=0), 'input_dim'), (dict(input_dim=2, hidden_dims=(8, -1)), 'hidden_dims'),
    (dict(input_dim=2, hidden_dims=8), 'hidden_dims'), (dict(input_dim=2, activation='swishy'), 'activation'),
])
def test_mlp_energy_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match): MLPEnergy(**kwargs)


def test_time_conditioned_mlp_contract():
    model = TimeConditionedMLP(3, output_dim=4, hidden_dim=16, depth=2, num_classes=2)
    x = torch.randn(5, 3)
    with torch.no_grad():
        assert torch.equal(model(x, torch.rand(5), y=torch.tensor([0, 1, 0, 1, 2])), torch.zeros(5, 4))
    _perturb(model).eval()
    with torch.no_grad():
        assert not torch.allclose(model(x, torch.zeros(5)), model(x, torch.ones(5)))
    with pytest.raises(ValueError, match=r'model\(x, t\)'): model(x)
    with pytest.raises(ValueError, match='event shape'): model(torch.randn(5, 2), torch.rand(5))


@pytest.mark.slow
def test_time_invariant_field_ignores_time_and_learns():
    torch.manual_seed(0)
    field = TimeConditionedMLP(2, hidden_dim=32, depth=2, time_conditioned=False)
    opt = torch.optim.Adam(field.parameters(), lr=3e-3)
    for _ in range(200):
        x = torch.randn(128, 2)
        loss = (field(x, torch.rand(128)) - (x - torch.tensor([1.0, -1.0]))).square().mean()
        opt.zero_grad(); loss.backward(); opt.step()
    x = torch.randn(500, 2)
    with torch.no_grad():
        assert torch.equal(field(x, torch.zeros(500)), field(x, torch.ones(500)))
        assert (field(x) - (x - torch.tensor([1.0, -1.0]))).square().mean() < 0.02


# ---------------------------------------------------------------- wrappers

class _TableField(nn.Module):
    null_label = 3

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(4, 2))

    def forward(self, x, t, y=None):
        return x * t[:, None] + self.table[y]


@pytest.mark.parametrize('w', [-0.5, 0.0, 1.0, 2.0, 7.5])
def test_cfg_formula(w):
    torch.manual_seed(0)
    f = _TableField()
    x, t, y = torch.randn(6, 2), torch.rand(6), torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        c, u = f(x, t, y), f(x, t, torch.full((6,), 3))
        assert torch.allclose(ClassifierFreeGuidance(f, w)(x, t, y=y), u + w * (c - u), atol=1e-6)


def test_cfg_uses_backbone_null_label_and_tensor_null():
    model = _perturb(TimeConditionedMLP(2, hidden_dim=16, depth=1, num_classes=3)).eval()
    cfg = ClassifierFreeGuidance(model, 2.0)
    assert cfg.null_label == 3
    x, t, y = torch.randn(4, 2), torch.rand(4), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        c, u = model(x, t, y=y), model(x, t, y=torch.full((4,), 3))
        assert torch.allclose(cfg(x, t, y=y), u + 2.0 * (c - u), atol=1e-6)
        assert torch.allclose(ClassifierFreeGuidance(model, 2.0, null_label=torch.tensor(3))(x, t, y=y), cfg(x, t, y=y))


def test_cfg_guided_energy_gradient_and_langevin():
    class ClassEnergy(BaseModel):            # E(x|y) = |x - mu_y|^2 / 2, mu_null = 0
        null_label = 2
        def __init__(self):
            super().__init__(); self.register_buffer('mu', torch.tensor([[2.0, 0.0], [0.0, -1.0], [0.0, 0.0]]))
        def forward(self, x, y=None): return 0.5 * (x - self.mu[y]).square().sum(-1)
    guided = ClassifierFreeGuidance(ClassEnergy(), 1.5, y=1)
    x = torch.randn(10, 2)
    assert torch.allclose(guided.gradient(x), x - 1.5 * torch.tensor([0.0, -1.0]), atol=1e-6)


def test_cfg_bad_arguments():
    with pytest.raises(ValueError, match='null_label'): ClassifierFreeGuidance(nn.Linear(2, 2), 1.0)
    with pytest.raises(TypeError, match='guidance_scale'): ClassifierFreeGuidance(_TableField(), '2')
    with pytest.raises(TypeError, match='model'): ClassifierFreeGuidance(3, 1.0, null_label=0)


@pytest.mark.parametrize('energy_type', ['dot', 'l2'])
def test_vector_field_energy_gradient_matches_finite_differences(energy_type):
    torch.manual_seed(0)
    field = _perturb(TimeConditionedMLP(2, hidden_dim=16, depth=2, time_conditioned=False)).double()
    energy = VectorFieldEnergy(field, energy_type)
    x = torch.randn(6, 2, dtype=torch.float64)
    eye, h = torch.eye(2, dtype=torch.float64), 1e-6
    with torch.no_grad():
        fd = torch.stack([(energy(x + h * e) - energy(x - h * e)) / (2 * h) for e in eye], 1)
        f = field(x)
    assert torch.allclose(energy.gradient(x), fd, atol=1e-7)
    expected = (x * f).sum(1) if energy_type == 'dot' else -0.5 * f.square().sum(1)
    assert torch.allclose(energy(x), expected)


def test_vector_field_energy_images_and_implicit():
    field = lambda x, t: -x * (1 + t[:, None, None, None])
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    dot = VectorFieldEnergy(field, 'dot', t=0.5)
    assert torch.allclose(dot(x), -1.5 * x.square().sum((1, 2, 3)))
    assert torch.allclose(dot.gradient(x), -3.0 * x)
    implicit = EqMEnergy(field, 'implicit', t=0.0)
    assert implicit.has_analytic_gradient and not dot.has_analytic_gradient
    assert torch.equal(implicit.gradient(x), -x)
    with pytest.raises(NotImplementedError): dot.analytic_gradient(x)
    with pytest.raises(ValueError, match='energy_type'): VectorFieldEnergy(field, 'cosine')
    with pytest.raises(TypeError, match='t must'): VectorFieldEnergy(field, t='zero')


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_vector_field_energy_sampled_by_mala_is_the_closed_form_gaussian(seed):
    "f(x) = x/2 - mu in 'dot' mode is the energy |x|^2/2 - mu.x, i.e. N(mu, I): MALA must recover it."
    langevin = pytest.importorskip('torchebm.samplers.langevin')
    mu = torch.tensor([1.5, -1.0])
    energy = VectorFieldEnergy(lambda x: 0.5 * x - mu, 'dot', t=None)
    sampler = langevin.LangevinDynamics(model=energy, step_size=0.2, metropolis=True)
    x0 = torch.randn(4000, 2, generator=torch.Generator().manual_seed(100 + seed))
    x = sampler.sample(x=x0, n_steps=200, generator=torch.Generator().manual_seed(seed))
    assert torch.allclose(x.mean(0), mu, atol=0.08)
    assert torch.allclose(x.var(0), torch.ones(2), atol=0.1)


def test_mlp_energy_drives_langevin_with_inferred_dim():
    langevin = pytest.importorskip('torchebm.samplers.langevin')
    sampler = langevin.LangevinDynamics(model=MLPEnergy(3, hidden_dims=(8,)), step_size=0.01)
    out = sampler.sample(x=torch.randn(7, 3), n_steps=5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (7, 3) and torch.isfinite(out).all()


@pytest.mark.parametrize('kwargs', [dict(), dict(time_conditioned=False), dict(time_conditioned=False, num_classes=3)])
def test_time_conditioned_mlp_has_no_dead_parameters(kwargs):
    torch.manual_seed(0)
    model = TimeConditionedMLP(2, hidden_dim=16, depth=2, **kwargs)
    x, t = torch.randn(16, 2), torch.rand(16)
    y = torch.randint(0, 3, (16,)) if 'num_classes' in kwargs else None
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad(); (model(x, t, y=y) - x.flip(1)).square().mean().backward(); opt.step()
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []


@pytest.mark.parametrize('energy_type', ['dot', 'l2'])
def test_vector_field_energy_matches_the_equilibrium_matching_loss_field(energy_type):
    "The energy sampled by MCMC must be the one EquilibriumMatchingLoss trains: same formula, field at t = 0."
    flow = pytest.importorskip('torchebm.losses.flow_matching')
    if not hasattr(flow, 'EquilibriumField'): pytest.skip('EquilibriumField not available')
    torch.manual_seed(0)
    net = _perturb(TimeConditionedMLP(2, hidden_dim=16, depth=2)).double()
    x = torch.randn(7, 2, dtype=torch.float64)
    trained_field = flow.EquilibriumField(net, energy_parametrization=energy_type)
    energy = VectorFieldEnergy(net, energy_type, t=0.0)
    assert torch.allclose(energy(x), trained_field.energy(x))
    assert torch.allclose(energy.gradient(x), trained_field(x))
