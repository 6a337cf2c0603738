"""Shared helpers of the plain-array adapter tests (backends, data, the per-array reference): NumPy, array-api-strict, torch (CPU), CuPy.

Each backend converts NumPy float64 test data to its arrays and back. CuPy runs only when
``cupy.cuda.is_available()`` (importing CuPy alone proves nothing: it imports without a driver).
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import numpy as np

import registry_cases
from xpoptim.core import MatrixSpec, get_spec
from xpoptim.core import functional as F


def cupy_available() -> bool:
    try:
        cupy = importlib.import_module("cupy")
        return bool(cupy.cuda.is_available())
    except Exception:
        return False


CUPY_SKIP = (
    "waits for a CUDA GPU with CuPy (cupy is not installed or cupy.cuda.is_available() is False; run `nox -s gpu` "
    "on a machine with an NVIDIA GPU)"
)


class Backend:
    """Conversion helpers for one namespace."""

    def __init__(self, name: str) -> None:
        self.name = name
        if name == "numpy":
            self.mod = np
        elif name == "strict":
            self.mod = importlib.import_module("array_api_strict")
        elif name == "torch":
            self.mod = importlib.import_module("torch")
        elif name == "cupy":
            self.mod = importlib.import_module("cupy")
        else:
            raise ValueError(name)

    def asarray(self, a: np.ndarray) -> Any:
        a = np.array(a, copy=True)
        if self.name == "numpy":
            return a
        if self.name == "strict":
            return self.mod.asarray(a)
        if self.name == "torch":
            return self.mod.from_numpy(a)
        return self.mod.asarray(a)

    def to_numpy(self, x: Any) -> np.ndarray:
        if self.name == "numpy":
            return np.array(x, copy=True)
        if self.name == "strict":
            return np.array(np.from_dlpack(x), copy=True)
        if self.name == "torch":
            return x.detach().cpu().numpy().copy()
        return self.mod.asnumpy(x)

    def __repr__(self) -> str:
        return self.name


# Mixed shapes: two same-shape matrices (stacked for Newton-Schulz), a 3-D "conv" weight, a 0-D
# scalar, a vector longer than the test chunk size (updated through a flat view), small vectors
# (packed).
SHAPES = [(5,), (3, 4), (3, 4), (2, 3, 2), (), (70,), (4, 3), (1,)]
STEPS = 5

#: The hyperparameters each test runs a rule at come from the registry (``registry_cases.settings``: the spec's
#: ``verification.hp``, non-zero weight decay and settings that exercise the rule), and the trajectory tests add
#: each spec's ``verification.variants`` (``registry_cases.rows``), so a rule registered with ``--xpoptim-rules`` is
#: tested here without an edit.
settings = registry_cases.settings


def _data(seed: int, n_steps: int = STEPS, shapes: list = SHAPES) -> tuple:
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s) for s in shapes]
    grads = [[rng.standard_normal(s) for s in shapes] for _ in range(n_steps)]
    var = [[np.abs(rng.standard_normal(s)) * 0.1 for s in shapes] for _ in range(n_steps)]
    return params, grads, var


def reference(name: str, hp: dict, params: list, grads: list, var: list, *, maximize: bool = False, layout: str = "out_in") -> list:
    """Per-array ``core.functional.step`` trajectory in NumPy (input dtype), routing written out by hand."""
    spec = get_spec(name)
    out = []
    for i, p0 in enumerate(params):
        p = np.array(p0)  # keeps the dtype (float64 in most tests)
        if isinstance(spec, MatrixSpec) and p.ndim >= 2:
            rule, rhp = spec, spec.validate(**hp)
            shape = (p.shape[0], math.prod(p.shape[1:])) if layout == "out_in" else (math.prod(p.shape[:-1]), p.shape[-1])
        elif isinstance(spec, MatrixSpec):
            rule = get_spec(spec.fallback)
            rhp = rule.validate(**{"lr": spec.validate(**hp)["lr"], **spec.fallback_defaults})  # the fallback lr follows lr
            shape = p.shape
        else:
            rule, rhp, shape = spec, spec.validate(**hp), p.shape
        x = p.reshape(shape)
        st = F.init(rule, x, rhp)
        for t in range(1, len(grads) + 1):
            ex = (var[t - 1][i].reshape(shape),) if getattr(rule, "extras", ()) else ()
            x, st = F.step(rule, x, grads[t - 1][i].reshape(shape), st, rhp, t, extras=ex, maximize=maximize, layout=layout)
        out.append(np.asarray(x).reshape(p.shape))
    return out
