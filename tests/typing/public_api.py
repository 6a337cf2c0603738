"""Uses of the public API that ``mypy`` must accept (the ``[tool.mypy]`` files of ``pyproject.toml``).

Not a test module: ``tests/test_typing.py`` type-checks it (and checks that a misspelt keyword is refused).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
import optax
import torch

import xpoptim.core as core
from xpoptim import portable, testing
from xpoptim.adapters import array, cupy, numpy
from xpoptim.adapters import optax as xo
from xpoptim.adapters import torch as xpt


def numpy_optimizers() -> None:
    w = np.zeros((4, 3), dtype=np.float32)
    b = np.zeros(3, dtype=np.float32)
    opt: array.Optimizer = numpy.AdamW([w, b], lr=1e-3, beta1=0.9, weight_decay=0.01, threads=1)
    opt.step([np.ones_like(w), np.ones_like(b)])
    numpy.Muon({"w": w, "b": b}, lr=0.02, momentum=0.95, ns_steps=5, fallback="adamw", fallback_hyperparams={"lr": 3e-4})
    numpy.MVNGrad([w], lr=1e-3, fuse=False)
    array.DeVASinf([w], precondition_frequency=10, layout="in_out")
    cupy.MSVAGMB  # noqa: B018  (the class exists without CuPy installed)
    state = numpy.create("adam", [w]).state_dict()
    assert state["version"] == core.STATE_VERSION
    tx = array.functional("sgd", lr=0.1)
    tx.update([np.ones_like(w)], tx.init([w]), [w])


def optax_transformations() -> optax.GradientTransformationExtraArgs:
    params = {"w": jnp.zeros((4, 3))}
    chain = optax.chain(xo.scale_by_adam(beta1=0.9), optax.scale_by_learning_rate(1e-3))
    chain.init(params)
    xo.mvngrad(1e-3, beta2=0.999, mask=None)
    xo.deva_sinf(3e-3, precondition_frequency=5, dimension_numbers=xo.DimensionNumbers(0, 1))
    xo.scale_by_muon(momentum=0.9)
    xo.muon(0.02, weight_decay=jnp.asarray(0.1), ns_steps=5, fallback="adamw", fallback_hyperparams={"lr": 3e-4})
    xo.scale_by_deva_sinf(beta1=0.9, shampoo_beta=-1.0, precondition_frequency=10)
    xo.deva_linf(1e-2, beta1=0.9, second_moment_of="gradient")
    xo.msvag_mb(1e-3, mu=0.9)
    xo.flatten_by_dtype(xo.scale_by_adam())
    variance = xo.grad_variance({"w": jnp.zeros((8, 4, 3))})
    xo.scale_by_msvag_mb().update(params, xo.scale_by_msvag_mb().init(params), grad_variance=variance)
    exported: portable.PortableState = xo.export_state(chain.init(params), params, "adam")
    xo.import_state(exported, params, chain)
    state = xo.ScaleByAdamWState(count=jnp.zeros([], jnp.int32), exp_avg=params, exp_avg_sq=params)
    del state
    return xo.create("adamw", learning_rate=optax.linear_schedule(1e-3, 0.0, 100))


def specs() -> core.ElementwiseSpec:
    hp = core.ADAMW.validate(lr=1e-3)
    assert core.ADAMW.binding.inputs == ("m", "v")
    assert core.state_layout(core.MUON, (4, 3), core.MUON.validate(), (4, 3)) == {"momentum_buffer": (4, 3)}
    assert core.default_state_dtype(np.dtype("float16"), None, np.float32) is np.float32
    del hp
    return core.ADAMW


def torch_optimizers() -> xpt.XPOptimizer:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    opt: torch.optim.Optimizer = xpt.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), weight_decay=0.01)
    opt.zero_grad()
    opt.step()
    xpt.Adam(model.named_parameters(), lr=torch.tensor(1e-3), beta1=0.9, eps=1e-8, maximize=True)
    xpt.MVNGrad([{"params": list(model.parameters()), "lr": 1e-3}], residual="m_t", state_dtype=torch.float32)
    xpt.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    muon = xpt.Muon(xpt.param_groups_for_muon(model), lr=0.02, momentum=0.95, ns_steps=5, fallback="adamw")
    muon.step(closure=None)
    groups: list[dict[str, Any]] = xpt.matrix_param_groups(model, "deva_sinf", fallback_hyperparams={"lr": 1e-3})
    xpt.DeVASinf(groups, lr=3e-3, precondition_frequency=10, max_precond_dim=1024, shape_scale="match_rms_adamw")
    x, y = torch.zeros(8, 4), torch.zeros(8, 2)
    variance: dict[torch.Tensor, torch.Tensor] = xpt.minibatch_grad_variance(model, torch.nn.functional.mse_loss, x, y)
    mb = xpt.MSVAGMB(model.parameters(), lr=1e-3, mu=0.9)
    mb.step(grad_variance=variance)
    state: portable.PortableState = mb.export_state(model.named_parameters())
    mb.import_state(state, model.named_parameters())
    cls: type[xpt.XPOptimizer] = xpt.OPTIMIZERS["adamw"]
    del cls
    return xpt.create("adamw", model.parameters(), lr=1e-3)


def portable_states(path: str) -> portable.ParamState:
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    state: portable.PortableState = portable.from_torch_optim(opt, model.named_parameters())
    state.save(path)
    loaded = portable.load(path)
    portable.to_torch_optim(loaded.rename({"weight": "weight"}), opt, model.named_parameters())
    arrays, meta = portable.to_arrays(loaded)
    portable.from_arrays(arrays, meta)
    flat: dict[str, np.ndarray] = portable.flatten_state_dict(numpy.AdamW([np.zeros(3)]).state_dict())
    portable.unflatten_state_dict(flat)
    return loaded.params["weight"]


def verifier() -> None:
    testing.assert_backends_agree("adamw", backends="numpy,torch", dtypes=("float64", "float32"), steps=5, rtol={"float32": 1e-5})

    def my_step(xp: Any, dtype: str, device: Any) -> list[Any]:
        return [xp.zeros(3)]

    testing.assert_backends_agree(my_step, backends=["numpy", "torch"], atol=1e-12)
