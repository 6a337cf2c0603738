"""Fusability: every elementwise step kernel runs under ``jax.jit`` with traced scalars (``t`` included) and
``torch.compile``, and gives the host path's numbers.

``make_step_kernel`` must contain only elementwise operations (DESIGN.md), so the jaxpr of every kernel is
checked against an allowlist of elementwise primitives: a reduction, matmul, gather or control flow would break
the single-kernel promise the adapters rely on.
"""

from __future__ import annotations

import numpy as np
import pytest
from _core_cases import CASES, Problem
from references.backends import Backend

from xpoptim.core import SPECS, functional, make_step_kernel, minibatch_variance, step_scalars

ELEMENTWISE_CASES = [c for c in CASES if SPECS[c.name].kind == "elementwise"]
WARM_STEPS = 4  # host steps before the compared step, so the state is not zero

#: Elementwise primitives (plus the call wrappers jax inserts around them).
ELEMENTWISE_PRIMITIVES = {
    "add", "sub", "mul", "div", "neg", "sign", "abs", "sqrt", "rsqrt", "pow", "integer_pow", "square", "max", "min",
    "select_n", "eq", "ne", "gt", "ge", "lt", "le", "and", "or", "not", "convert_element_type", "erf", "exp", "log",
    "broadcast_in_dim", "pjit", "jit", "custom_jvp_call", "custom_vjp_call", "stop_gradient", "copy", "copy_p",
}


def _need(lib: str):
    b = Backend(lib)
    reason = b.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    return b.load()


def _warm_state(case, h, dtype="float64"):
    """Host path for WARM_STEPS steps; returns (spec, hp, p, g, extras, state, t) for the next step on ``h``."""
    spec = SPECS[case.name]
    hp = spec.validate(**case.hp)
    prob = Problem(case)
    p = h.asarray(prob.theta0, dtype)
    state = functional.init(spec, p, hp)

    def grad(p, t):
        g_np = prob.grad(h.to_numpy(p).astype(np.float64), t)
        if case.mb:
            pe = h.asarray(g_np, dtype)
            return h.xp.mean(pe, axis=0), (minibatch_variance(h.xp, pe, axis=0),)
        return h.asarray(g_np, dtype), ()

    for t in range(1, WARM_STEPS + 1):
        g, extras = grad(p, t)
        p, state = functional.step(spec, p, g, state, hp, t, extras=extras, maximize=case.maximize)
    t = WARM_STEPS + 1
    g, extras = grad(p, t)
    return spec, hp, p, g, extras, state, t


def _primitives(jaxpr) -> set:
    out = set()
    for eqn in jaxpr.eqns:
        out.add(eqn.primitive.name)
        for v in eqn.params.values():
            for sub in v if isinstance(v, (list, tuple)) else (v,):
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    out |= _primitives(getattr(inner, "jaxpr", inner))
    return out


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", ELEMENTWISE_CASES, ids=lambda c: c.id)
def test_step_kernel_under_jax_jit_with_traced_scalars(case, dtype):
    h = _need("jax")
    import jax
    import jax.numpy as jnp

    spec, hp, p, g, extras, state, t = _warm_state(case, h, dtype)
    names = spec.state
    host_p, host_state = functional.step(spec, p, g, state, hp, t, extras=extras, maximize=case.maximize)

    static = spec.static(hp)
    numeric = {k: v for k, v in hp.items() if not next(x for x in spec.hyperparams if x.name == k).static}
    kernel = make_step_kernel(spec, jnp, static, maximize=case.maximize)

    def step(p, g, extras, state, num, t):
        scalars = step_scalars(spec, {**hp, **num}, t, ops=jnp)
        return kernel(p, g, *extras, *state, *scalars)

    fdt = jnp.float64 if dtype == "float64" else jnp.float32
    args = (p, g, extras, tuple(state[n] for n in names),
            {k: jnp.asarray(v, dtype=fdt) for k, v in numeric.items()}, jnp.asarray(t, dtype=fdt))
    out = jax.jit(step)(*args)

    prims = _primitives(jax.make_jaxpr(step)(*args).jaxpr)
    extra = prims - ELEMENTWISE_PRIMITIVES
    assert not extra, f"non-elementwise primitives in the kernel: {extra}"

    # float64: traced scalars (jnp.power etc.) vs host Python floats differ by an ulp; measured <= 1.6e-14.
    # float32: the scalars are formed in float32 inside the graph: beta2 = 0.999 rounds to 0.99900001 (error
    # 1.3e-8), so 1 - beta2**5 ~ 5e-3 carries ~1.3e-5 relative error; measured <= 1.3e-5 (Adam, DeVA_linf with
    # bias correction), against the float64 host scalars of functional.step.
    rtol = 1e-12 if dtype == "float64" else 5e-5
    d_host = np.asarray(host_p, dtype=np.float64) - np.asarray(p, dtype=np.float64)
    d_jit = np.asarray(out[0], dtype=np.float64) - np.asarray(p, dtype=np.float64)
    scale = np.max(np.abs(d_host))
    assert scale > 0
    assert np.max(np.abs(d_jit - d_host)) <= rtol * scale
    for n, arr in zip(names, out[1:]):
        ref = np.asarray(host_state[n], dtype=np.float64)
        np.testing.assert_allclose(np.asarray(arr, dtype=np.float64), ref, rtol=rtol, atol=rtol * np.max(np.abs(ref)))


def _torch_compile_case(name, dtype):
    case = next(c for c in ELEMENTWISE_CASES if c.name == name)
    h = _need("torch")
    import torch

    spec, hp, p, g, extras, state, t = _warm_state(case, h, dtype)
    host_p, host_state = functional.step(spec, p, g, state, hp, t, extras=extras)
    kernel = make_step_kernel(spec, h.xp, spec.static(hp))
    scalars = [torch.tensor(float(s), dtype=getattr(torch, dtype)) for s in step_scalars(spec, hp, t)]
    compiled = torch.compile(kernel, fullgraph=True, dynamic=False)
    out = compiled(p, g, *extras, *(state[n] for n in spec.state), *scalars)
    # Inductor reorders and fuses (x / sqrt(c) -> x * rsqrt(c), FMAs): a few ulps per operation; in float32 the
    # residual (g - m)^2 of MVN-Grad cancels, measured up to 2.2e-6 relative in its state.
    rtol = 1e-12 if dtype == "float64" else 1e-5
    torch.testing.assert_close(out[0], host_p, rtol=rtol, atol=rtol * float(host_p.abs().max()))
    for n, arr in zip(spec.state, out[1:]):
        torch.testing.assert_close(arr, host_state[n], rtol=rtol, atol=rtol * float(host_state[n].abs().max()))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", ["adam", "mvngrad", "msvag", "deva_linf"])
def test_step_kernel_under_torch_compile(name, dtype):
    """torch.compile(fullgraph=True) of the kernel (CPU inductor: a C++ build per kernel, 2-8 s each)."""
    _torch_compile_case(name, dtype)


class _TracedLike(np.ndarray):
    """A NumPy array that refuses the Python builtins ``abs()``, ``bool()``, ``float()``, ``int()`` and ``round()``.

    ``cupy.fuse`` traces a kernel with proxy values that support only array operations (``cupy.abs``, comparisons,
    ``where``): a builtin called on an array makes the trace fail, and the CuPy adapter then runs the step op by op.
    Running every kernel on these arrays checks that the core uses the namespace's functions throughout.
    """

    def _refuse(self, *_a):
        raise TypeError("a Python builtin was called on an array inside a step kernel")

    __abs__ = __bool__ = __float__ = __int__ = __index__ = __round__ = _refuse

    def __array_wrap__(self, arr, context=None, return_scalar=False):
        return np.asarray(arr).view(_TracedLike)


@pytest.mark.parametrize("case", ELEMENTWISE_CASES, ids=lambda c: c.id)
def test_step_kernel_calls_no_python_builtin_on_arrays(case):
    """Every elementwise kernel runs on arrays that refuse ``abs()`` / ``bool()`` / ``float()`` (as ``cupy.fuse``'s
    tracing values do) and gives the plain NumPy run's numbers bit for bit."""
    h = _need("numpy")
    spec, hp, p, g, extras, state, t = _warm_state(case, h)
    kernel = make_step_kernel(spec, np, spec.static(hp), maximize=case.maximize)
    scalars = step_scalars(spec, hp, t)
    plain = kernel(p, g, *extras, *(state[n] for n in spec.state), *scalars)
    view = [np.asarray(a).view(_TracedLike) for a in (p, g, *extras, *(state[n] for n in spec.state))]
    traced = kernel(*view, *scalars)
    for a, b in zip(plain, traced):
        np.testing.assert_array_equal(np.asarray(b).view(np.ndarray), np.asarray(a))
