"""Uses of the public API that ``mypy`` must accept (the ``[tool.mypy]`` files of ``pyproject.toml``).

Not a test module: ``tests/test_typing.py`` type-checks it (and checks that a misspelt keyword is refused).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax

import xpoptim.core as core
from xpoptim.adapters import array, cupy, numpy
from xpoptim.adapters import optax as xo


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
