"""The verifier's adapter candidates: the same problems driven through the adapters' ``create`` interfaces.

* ``torch.optim`` on ``torch-cpu`` / ``torch-cuda``: ``xpoptim.adapters.torch.create(name, params, **hp)``,
  gradients written to ``p.grad``, ``opt.step(grad_variance={p: v})`` for the mini-batch rules. Matrices
  are torch ``Linear.weight`` ``(out, in)``, the adapter's layout. Eager (``compile=False``); with
  ``--torch-compile`` also ``torch.optim[compile]`` (``compile=True``).
* ``optax`` on ``jax-cpu`` / ``jax-gpu``: ``xpoptim.adapters.optax.create(name, **hp)``, ``update`` under
  ``jax.jit`` (the way it is used), updates added with ``optax.apply_updates``. The optax adapter reads a
  2-D leaf as a flax kernel ``(in, out)``, so the problem's ``(out, in)`` matrices are handed over
  transposed (and the updates transposed back): a wrong fan layout changes Muon's shape scale and fails.
* ``array`` on ``numpy`` / ``array_api_strict`` / ``cupy``: ``xpoptim.adapters.array.create(name, params,
  **hp)`` updating the arrays in place, ``opt.step(grads, grad_variance=...)`` (on NumPy the compiled C loop
  when a C compiler is found, on CuPy ``cupy.fuse``); ``array[op-by-op]`` on NumPy and CuPy: the same with
  ``fuse=False``; and ``array.functional`` on JAX (the pure ``init``/``update`` layer).

Adapters are imported lazily: one that cannot be imported is reported as not available, with the
reason, and the rest of the matrix runs.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._backends import Backend, to_numpy
from .core import get_spec
from .core.spec import ElementwiseSpec

__all__ = ["candidates"]


def _needs_variance(optimizer: str) -> bool:
    spec = get_spec(optimizer)
    return isinstance(spec, ElementwiseSpec) and bool(spec.extras)


def _import(module: str) -> Any:
    return importlib.import_module(module)


def _trajectory(params: dict) -> dict:
    return {k: to_numpy(v) for k, v in params.items()}


def _run_torch(backend: Backend, config: Any, problem: Any, dtype: str, steps: int, compile: bool = False) -> Any:
    from .matrix import Trajectory

    torch = _import("torch")
    ta = _import("xpoptim.adapters.torch")
    xp, dt, dev = backend.xp, backend.dtypes[dtype], backend.device
    params = {k: torch.nn.Parameter(v.clone()) for k, v in problem.init(xp, dt, dev).items()}
    opt = ta.create(config.optimizer, list(params.values()), **dict(config.hp), compile=compile)
    variance = _needs_variance(config.optimizer)
    traj = Trajectory([_trajectory(params)], [])
    for t in range(1, steps + 1):
        with torch.no_grad():
            loss, grads, var = problem.gradients(xp, {k: p.detach() for k, p in params.items()}, t, dt, dev)
        for k, p in params.items():
            p.grad = grads[k]
        if variance:
            opt.step(grad_variance={p: var[k] for k, p in params.items()})
        else:
            opt.step()
        traj.losses.append(float(loss))
        traj.params.append(_trajectory(params))
    return traj


def _transpose(jnp: Any, tree: dict) -> dict:
    return {k: (jnp.matrix_transpose(v) if v.ndim >= 2 else v) for k, v in tree.items()}


def _run_optax(backend: Backend, config: Any, problems: list, dtype: str, steps: int) -> dict:
    """All problems at once: their parameters form one pytree, so ``update`` is compiled once per config."""
    from .matrix import Trajectory

    jax = _import("jax")
    optax = _import("optax")
    oa = _import("xpoptim.adapters.optax")
    jnp, dt, dev = backend.xp, backend.dtypes[dtype], backend.device
    tx = oa.create(config.optimizer, **dict(config.hp))
    params = {p.name: p.init(jnp, dt, dev) for p in problems}
    state = tx.init(_transpose_all(jnp, params))
    variance = _needs_variance(config.optimizer)

    @jax.jit
    def update(grads: dict, state: Any, params: dict, var: dict) -> tuple:
        kw = {"grad_variance": _transpose_all(jnp, var)} if variance else {}
        p_t = _transpose_all(jnp, params)
        upd, state = tx.update(_transpose_all(jnp, grads), state, p_t, **kw)
        return _transpose_all(jnp, optax.apply_updates(p_t, upd)), state

    trajs = {p.name: Trajectory([_trajectory(params[p.name])], []) for p in problems}
    for t in range(1, steps + 1):
        out = {p.name: p.gradients(jnp, params[p.name], t, dt, dev) for p in problems}
        grads = {k: v[1] for k, v in out.items()}
        var = {k: v[2] for k, v in out.items()}
        params, state = update(grads, state, params, var)
        for p in problems:
            trajs[p.name].losses.append(float(out[p.name][0]))
            trajs[p.name].params.append(_trajectory(params[p.name]))
    return trajs


def _transpose_all(jnp: Any, tree: dict) -> dict:
    return {k: _transpose(jnp, v) for k, v in tree.items()}


def _run_array(backend: Backend, config: Any, problem: Any, dtype: str, steps: int, fuse: bool = True) -> Any:
    from .matrix import Trajectory

    aa = _import("xpoptim.adapters.array")
    xp, dt, dev = backend.xp, backend.dtypes[dtype], backend.device
    # Fresh, writable copies: the stateful adapter updates the arrays in place.
    params = {k: xp.asarray(v, copy=True) for k, v in problem.init(xp, dt, dev).items()}
    opt = aa.create(config.optimizer, params, fuse=fuse, **dict(config.hp))
    variance = _needs_variance(config.optimizer)
    traj = Trajectory([_trajectory(params)], [])
    for t in range(1, steps + 1):
        loss, grads, var = problem.gradients(xp, params, t, dt, dev)
        if variance:
            opt.step(grads, grad_variance=var)
        else:
            opt.step(grads)
        traj.losses.append(float(to_numpy(loss)))
        traj.params.append(_trajectory(params))
    return traj


def _run_array_op_by_op(backend: Backend, config: Any, problem: Any, dtype: str, steps: int) -> Any:
    return _run_array(backend, config, problem, dtype, steps, fuse=False)


def _run_array_functional(backend: Backend, config: Any, problem: Any, dtype: str, steps: int) -> Any:
    from .matrix import Trajectory

    aa = _import("xpoptim.adapters.array")
    xp, dt, dev = backend.xp, backend.dtypes[dtype], backend.device
    tx = aa.functional(config.optimizer, **dict(config.hp))
    params = problem.init(xp, dt, dev)
    state = tx.init(params)
    variance = _needs_variance(config.optimizer)
    traj = Trajectory([_trajectory(params)], [])
    for t in range(1, steps + 1):
        loss, grads, var = problem.gradients(xp, params, t, dt, dev)
        kw = {"grad_variance": var} if variance else {}
        params, state = tx.update(grads, state, params, **kw)
        traj.losses.append(float(to_numpy(loss)))
        traj.params.append(_trajectory(params))
    return traj


# (path, module to import, backend frameworks it serves, runner, runner takes all problems at once)
_PATHS = (
    ("torch.optim", "xpoptim.adapters.torch", ("torch",), _run_torch, False),
    ("optax", "xpoptim.adapters.optax", ("jax",), _run_optax, True),
    ("array", "xpoptim.adapters.array", ("numpy", "array_api_strict", "cupy"), _run_array, False),
    ("array[op-by-op]", "xpoptim.adapters.array", ("numpy", "cupy"), _run_array_op_by_op, False),
    ("array.functional", "xpoptim.adapters.array", ("jax",), _run_array_functional, False),
)


def _run_torch_compiled(backend: Backend, config: Any, problem: Any, dtype: str, steps: int) -> Any:
    return _run_torch(backend, config, problem, dtype, steps, compile=True)


def candidates(backends: list[Backend], torch_compile: bool = False) -> tuple[list, dict]:
    """The adapter candidates for ``backends`` and the adapters that cannot be used (with the reason).

    ``torch_compile`` adds ``torch.optim[compile]``: the torch adapter with ``compile=True`` (the
    elementwise rule under ``torch.compile``; slow to compile, so not in the default run).
    """
    from .matrix import Candidate

    out: list = []
    missing: dict[str, str] = {}
    paths = list(_PATHS)
    if torch_compile:
        paths.insert(1, ("torch.optim[compile]", "xpoptim.adapters.torch", ("torch",), _run_torch_compiled, False))
    for path, module, frameworks, runner, joint in paths:
        served = [b for b in backends if b.framework in frameworks]
        if not served:
            continue
        try:
            _import(module)
        except Exception as exc:  # ImportError, or an adapter that fails while importing
            missing[path] = f"not available ({type(exc).__name__}: {exc})"
            continue
        for b in served:
            run = lambda c, p, d, n, _b=b, _r=runner: _r(_b, c, p, d, n)  # noqa: E731
            out.append(Candidate(path, b.name, None, joint_runner=run) if joint else Candidate(path, b.name, run))
    return out, missing
