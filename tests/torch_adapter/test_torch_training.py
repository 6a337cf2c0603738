"""A small real training run: an MLP on scikit-learn's bundled digits, where the loss falls with every optimizer."""

from __future__ import annotations

import pytest
import torch
import registry_cases
from xpt_support import MATRIX, MB, NAMES

from xpoptim.adapters import torch as xt

load_digits = pytest.importorskip("sklearn.datasets", reason="the digits training tests need scikit-learn (installed by the test extra)").load_digits


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)


@pytest.mark.parametrize("name", NAMES)
def test_loss_falls_on_digits(name, digits):
    x, y = digits
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))
    params = xt.matrix_param_groups(model, name) if name in MATRIX else model.parameters()
    # The registry's training learning rate (the spec's verification.train_lr): the rules' scales differ (sign-based rules
    # move every coordinate by ~lr, SGD by lr * |g|).
    opt = xt.create(name, params, lr=registry_cases.train_lr(name), compile=False)
    loss_fn = torch.nn.functional.cross_entropy
    with torch.no_grad():
        initial = loss_fn(model(x), y).item()
    gen = torch.Generator().manual_seed(1)
    for _ in range(40):
        idx = torch.randint(0, x.shape[0], (128,), generator=gen)
        opt.zero_grad()
        if name in MB:
            xt.minibatch_grad_variance(model, loss_fn, x[idx], y[idx], set_grad=True, attach=True)
        else:
            loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()
    with torch.no_grad():
        final = loss_fn(model(x), y).item()
    assert final < 0.8 * initial, (name, initial, final)
