"""Shared helpers for the torch adapter tests (module name kept unique: pytest imports test helpers by basename).

The optimizers and the hyperparameters that exercise each rule (non-zero weight decay, a short preconditioner
period for DeVASinf, ...) come from the registry (``registry_cases.settings``: the spec's ``verification.hp``), so a
rule registered with ``--xpoptim-rules`` is tested here too. ``reference_run`` replays a trajectory through
``xpoptim.core.functional`` on NumPy float64 arrays, parameter by parameter, which is what the adapter (flat
buckets, stacked matrices, views, in-place writes) must reproduce.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import registry_cases
from xpoptim.core import SPECS, functional

NAMES = registry_cases.names()
MATRIX = registry_cases.matrix_names()
MB = registry_cases.minibatch_names()

#: Shapes per kind: elementwise rules get mixed shapes; matrix rules get two same-shape matrices (stacked),
#: a wide matrix, a conv weight (flattened to (out, in*kh*kw)) and vectors (routed to the fallback rule).
#: Sides of very different lengths (rank-deficient DeVASinf seed factors) are included on purpose: the core
#: canonicalises the null-space eigenbasis, so torch's LAPACK must give NumPy's numbers.
ELEM_SHAPES = [(4, 3), (7,), (2, 3, 2), ()]
MATRIX_SHAPES = [(4, 3), (4, 3), (2, 6), (3, 1, 2, 2), (5,), (3,)]


def shapes_for(name: str) -> list[tuple]:
    return MATRIX_SHAPES if name in MATRIX else ELEM_SHAPES


def make_params(name: str, dtype: torch.dtype = torch.float64, seed: int = 0, device: str = "cpu") -> list[torch.Tensor]:
    gen = np.random.default_rng(seed)
    return [
        torch.tensor(gen.standard_normal(s), dtype=dtype, device=device).requires_grad_() for s in shapes_for(name)
    ]


def dense_permuted(p: torch.Tensor) -> torch.Tensor:
    """A copy of ``p`` in a dense layout that is not row-major: channels_last for 4-D, reversed axes otherwise."""
    if p.ndim < 2:
        return p.detach().clone().requires_grad_()
    if p.ndim == 4:
        out = p.detach().to(memory_format=torch.channels_last)
    else:
        out = torch.empty(tuple(reversed(p.shape)), dtype=p.dtype).permute(*reversed(range(p.ndim)))
        out.copy_(p.detach())
    return out.requires_grad_()


def grads_for(params: list[torch.Tensor], step: int, seed: int = 1, scale: float = 1.0) -> list[np.ndarray]:
    """Deterministic float64 gradients for ``step`` (noisy around a fixed mean so variance rules see noise)."""
    out = []
    for i, p in enumerate(params):
        gen = np.random.default_rng([seed, step, i])
        mean = np.random.default_rng([seed, 10_000, i]).standard_normal(tuple(p.shape))
        out.append(scale * (mean + 0.5 * gen.standard_normal(tuple(p.shape))))
    return out


def variances_for(params: list[torch.Tensor], step: int, seed: int = 2) -> list[np.ndarray]:
    return [np.random.default_rng([seed, step, i]).uniform(0.01, 0.5, tuple(p.shape)) for i, p in enumerate(params)]


def set_grads(params, step: int, name: str, skip: tuple[int, ...] = (), seed: int = 1) -> dict | None:
    """Set ``p.grad`` for every param not in ``skip``; returns ``grad_variance`` for the -mb rules."""
    gs = grads_for(params, step, seed)
    for i, (p, g) in enumerate(zip(params, gs)):
        p.grad = None if i in skip else torch.tensor(g, dtype=p.dtype, device=p.device)
    if name in MB:
        vs = variances_for(params, step)
        return {p: torch.tensor(v, dtype=p.dtype, device=p.device) for i, (p, v) in enumerate(zip(params, vs)) if i not in skip}
    return None


def spec_hp(name: str, **over: Any) -> dict:
    """The registry's settings for ``name`` (``registry_cases.settings``), then ``over``."""
    return registry_cases.settings(name, **over)


def reference_run(name: str, params0: list[np.ndarray], steps: int, skip: tuple[int, ...] = (), maximize: bool = False, **over: Any) -> list[np.ndarray]:
    """The trajectory through ``core.functional`` on NumPy float64, one parameter at a time."""
    spec = SPECS[name]
    hp = spec.validate(**spec_hp(name, **over))
    params = [np.array(p, dtype=np.float64) for p in params0]
    rules, hps, states, ts = [], [], [], []
    for p in params:
        if spec.kind == "matrix" and p.ndim < 2:
            fb = SPECS[spec.fallback]
            rules.append(fb)
            hps.append(fb.validate(**{"lr": hp["lr"], **spec.fallback_defaults}))  # the fallback lr follows lr
        else:
            rules.append(spec)
            hps.append(hp)
        states.append(None)
        ts.append(0)
    fake = [torch.empty(p.shape) for p in params]
    for step in range(steps):
        gs = grads_for(fake, step)
        vs = variances_for(fake, step) if name in MB else None
        for i, p in enumerate(params):
            if i in skip:
                continue
            rule, h = rules[i], hps[i]
            x, g = p, gs[i]
            if rule.kind == "matrix" and p.ndim > 2:
                x, g = p.reshape(p.shape[0], -1), g.reshape(p.shape[0], -1)
            if states[i] is None:
                states[i] = functional.init(rule, x, h)
            ts[i] += 1
            extras = (vs[i],) if (vs is not None and rule.extras) else ()
            new, states[i] = functional.step(rule, x, g, states[i], h, ts[i], extras=extras, maximize=maximize)
            params[i] = np.asarray(new).reshape(p.shape)
    return params


def run_torch(opt_factory, name: str, params: list[torch.Tensor], steps: int, skip=(), start: int = 0, seed: int = 1, opt=None):
    """Drive an optimizer over the deterministic gradient sequence; returns the optimizer."""
    opt = opt_factory(params) if opt is None else opt
    for step in range(start, start + steps):
        gv = set_grads(params, step, name, skip, seed)
        opt.step(grad_variance=gv) if gv is not None else opt.step()
    return opt


def snapshot(opt) -> dict:
    """A deep copy of params and state, for "unchanged" checks."""
    import copy

    params = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    state = copy.deepcopy({id(k): {n: (v.clone() if isinstance(v, torch.Tensor) else v) for n, v in s.items()} for k, s in opt.state.items()})
    return {"params": params, "state": list(state.values())}


def assert_same_snapshot(a: dict, b: dict) -> None:
    assert len(a["params"]) == len(b["params"])
    for x, y in zip(a["params"], b["params"]):
        assert torch.equal(x, y)
    assert len(a["state"]) == len(b["state"])
    for s, t in zip(a["state"], b["state"]):
        assert s.keys() == t.keys()
        for k in s:
            if isinstance(s[k], torch.Tensor):
                assert torch.equal(s[k], t[k]), k
            else:
                assert s[k] == t[k], k


def spawn_two_ranks(worker: Callable, out_dir: str, *args: Any, what: str = "workers", limit_s: float = 150.0) -> None:
    """Run ``worker(rank, 2, store_path, out_dir, *args)`` on 2 real processes (``torch.multiprocessing.spawn``);
    fail, and stop both, instead of hanging if they do not finish within ``limit_s`` seconds."""
    store = os.path.join(out_dir, "store")
    ctx = mp.spawn(worker, args=(2, store, out_dir, *args), nprocs=2, join=False)
    deadline = time.monotonic() + limit_s
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.terminate()
            pytest.fail(f"{what} did not finish within {limit_s} s")
