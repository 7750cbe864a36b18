"Toy energies and losses shared by tests/test_training.py and the torchrun worker of tests/test_distributed.py."
import math

import torch
from torch import nn

class GaussianEnergy(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.mu = nn.Parameter(torch.zeros(dim)); self.chol = nn.Parameter(torch.eye(dim))
    def precision(self): return self.chol @ self.chol.T + 1e-3 * torch.eye(len(self.mu))
    def forward(self, x):
        d = x - self.mu
        return 0.5 * ((d @ self.precision()) * d).sum(-1)

class ScoreMatching(nn.Module):
    def __init__(self, model):
        super().__init__(); self.model = model
    def forward(self, x):
        p = self.model.precision()
        return 0.5 * ((x - self.model.mu) @ p).pow(2).sum(-1).mean() - torch.trace(p)

class ToyPCD(nn.Module):
    "Persistent CD: replay buffer, Langevin steps from the global RNG; returns (loss, negatives)."
    def __init__(self, model, dim, buffer_size=32, k=3, step_size=0.05):
        super().__init__()
        self.model, self.k, self.step_size = model, k, step_size
        self.register_buffer('replay_buffer', torch.randn(buffer_size, dim))
    def forward(self, x):
        idx = torch.randint(len(self.replay_buffer), (len(x),))
        neg = self.replay_buffer[idx]
        for _ in range(self.k):
            neg = neg.detach().requires_grad_(True)
            grad, = torch.autograd.grad(self.model(neg).sum(), neg)
            neg = neg - self.step_size * grad + math.sqrt(2 * self.step_size) * torch.randn_like(neg)
        neg = neg.detach()
        self.replay_buffer[idx] = neg
        return self.model(x).mean() - self.model(neg).mean() + 0.1 * self.model(x).pow(2).mean(), neg

def make_data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(64, 2, generator=g) @ torch.tensor([[1.0, 0.0], [0.8, 0.5]]) + 1.0
