"""A run moved between devices: CUDA torch -> CuPy -> JAX on the GPU -> NumPy on the host (``-m gpu``).

The state crosses the devices through ``.npz`` files; the moved run must stay within the float64 cross-backend
bound of an uninterrupted NumPy run (the GPUs' float64 matmuls and reductions differ from the host's only by
rounding order).
"""

from __future__ import annotations

import importlib.util

import jax
import portable_problem as prob
import pytest
from portable_runners import needs_variance

import xpoptim.portable as xpp
from xpoptim.matrix import Trajectory, tolerance, trajectory_error


def _cuda_reason() -> str | None:
    if importlib.util.find_spec("cupy") is None:
        return "waits for a CUDA GPU with CuPy (cupy is not installed)"
    import cupy
    import torch

    if not cupy.cuda.is_available() or not torch.cuda.is_available():
        return "waits for a CUDA GPU visible to both CuPy and torch"
    if not any(d.platform == "gpu" for d in jax.devices()):
        return "waits for a CUDA GPU visible to JAX"
    return None


pytestmark = [pytest.mark.gpu]

NAMES = ["adamw", "mvngrad", "msvag_mb", "muon", "deva_sinf"]


def _torch_cuda(name, params, t0, steps, portable):
    import torch

    from xpoptim.adapters import torch as xt

    tp = {k: torch.nn.Parameter(torch.from_numpy(v.copy()).cuda()) for k, v in params.items()}
    opt = xt.create(name, list(tp.items()), compile=False)
    if portable is not None:
        opt.import_state(portable)
    traj = []
    for t in range(t0 + 1, t0 + steps + 1):
        _, g = prob.loss_and_grads({k: p.detach().cpu().numpy() for k, p in tp.items()}, t)
        for k, p in tp.items():
            p.grad = torch.from_numpy(g[k]).cuda()
        var = {tp[k]: torch.from_numpy(v).cuda() for k, v in prob.grad_variance(g).items()} if needs_variance(name) else None
        opt.step(grad_variance=var)
        traj.append({k: p.detach().cpu().numpy().copy() for k, p in tp.items()})
    return {k: p.detach().cpu().numpy().copy() for k, p in tp.items()}, traj, opt.export_state()


def _cupy(name, params, t0, steps, portable):
    import cupy as cp

    from xpoptim.adapters import cupy as xc

    arrays = {k: cp.asarray(v) for k, v in params.items()}
    opt = xc.create(name, arrays)
    opt.import_state(portable)
    traj = []
    for t in range(t0 + 1, t0 + steps + 1):
        _, g = prob.loss_and_grads({k: cp.asnumpy(v) for k, v in arrays.items()}, t)
        extra = {"grad_variance": {k: cp.asarray(v) for k, v in prob.grad_variance(g).items()}} if needs_variance(name) else {}
        opt.step({k: cp.asarray(v) for k, v in g.items()}, **extra)
        traj.append({k: cp.asnumpy(v) for k, v in arrays.items()})
    return {k: cp.asnumpy(v) for k, v in arrays.items()}, traj, opt.export_state()


@pytest.mark.parametrize("name", NAMES)
def test_run_moves_across_gpu_frameworks(name, tmp_path):
    reason = _cuda_reason()
    if reason is not None:
        pytest.skip(reason)
    from portable_runners import run_jax, run_numpy

    with jax.enable_x64(True), jax.default_matmul_precision("float32"):
        p0 = prob.init("float64")
        p, tr1, s = _torch_cuda(name, p0, 0, 3, None)
        s.save(tmp_path / "a.npz")
        p, tr2, s = _cupy(name, p, 3, 3, xpp.load(tmp_path / "a.npz"))
        s.save(tmp_path / "b.npz")
        with jax.default_device(next(d for d in jax.devices() if d.platform == "gpu")):
            p, tr3, _, s = run_jax(name, {}, p, 6, 3, xpp.load(tmp_path / "b.npz"))
        _, tr4, _, _ = run_numpy(name, {}, p, 9, 3, s)
        _, ref, _, _ = run_numpy(name, {}, p0, 0, 12)
    err = trajectory_error(Trajectory([p0, *tr1, *tr2, *tr3, *tr4], []), Trajectory([p0, *ref], []), name)
    assert err.error <= tolerance(name, "float64", 12).bound, err
