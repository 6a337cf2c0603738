"""Quickstart, PyTorch: MVN-Grad as a torch.optim optimizer on a small classifier (runs in seconds on a CPU)."""

import torch

from xpoptim.adapters.torch import MVNGrad

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))
x, y = torch.randn(256, 20), torch.randint(0, 3, (256,))
opt = MVNGrad(model.parameters(), lr=1e-3, weight_decay=1e-2)
for step in range(1, 201):
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    if step % 50 == 0:
        print(f"step {step:3d}  loss {loss.item():.4f}")
