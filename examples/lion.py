"""Lion as a user-defined xpoptim rule: one spec, registered once, served by every adapter.

Lion (EvoLved Sign Momentum; Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Algorithm 2)::

    c = b1 m + (1 - b1) g          # interpolation of the momentum and the gradient
    p <- p - lr (sign(c) + wd p)   # the update is a sign: every coordinate moves by lr
    m <- b2 m + (1 - b2) g         # the momentum is tracked with a second, slower rate

The decay is decoupled and uses the learning rate: ``p - lr wd p`` is ``p (1 - lr wd)``, which is what the core
applies before ``- lr d`` for ``weight_decay="decoupled"``. So the rule only returns ``d = sign(c)`` and the new
momentum. The defaults are the paper's (lr 1e-4, b1 0.9, b2 0.99, wd 0).

The file also carries Lion's float64 reference, :func:`lion_reference`: plain NumPy written from the paper, sharing
no code with the rule. Registered with the spec (``Verification(reference=...)``), it lets xpoptim's own test suites
check the rule on every backend and adapter: ``python -m pytest --xpoptim-rules examples/lion.py``.

Usage (nothing in xpoptim is edited)::

    import examples.lion  # registers "lion"
    from xpoptim.adapters import numpy as xnp, optax as xo, torch as xt

    opt = xt.create("lion", model.parameters(), lr=1e-4, weight_decay=1.0)
    tx = xo.create("lion", learning_rate=1e-4)
    opt = xnp.create("lion", [w, b], lr=1e-4)       # the compiled C loop (fuse=False: op by op)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from xpoptim.core import ElementwiseSpec, beta_hyper, lr_hyper, register, wd_hyper
from xpoptim.core.verification import Verification

__all__ = ["lion_direction", "lion_scalars", "lion_reference", "LION"]


def lion_direction(xp: Any, g: Any, exp_avg: Any, beta1: Any, beta2: Any) -> tuple:
    """Lion's direction and momentum update (Chen et al. 2023, Algorithm 2).

    ``c = b1 m + (1 - b1) g``; ``d = sign(c)``; ``m <- b2 m + (1 - b2) g``.

    The parameters after ``g`` are bound by name: ``exp_avg`` is the spec's state buffer, ``beta1`` and ``beta2``
    the values of :func:`lion_scalars`.

    Args:
        xp: the array namespace.
        g: the gradient.
        exp_avg: the momentum ``m``.
        beta1: interpolation rate of the update.
        beta2: decay of the momentum.

    Returns:
        ``(d, new_exp_avg)``.

    References:
        X. Chen et al., Symbolic Discovery of Optimization Algorithms (NeurIPS 2023), Algorithm 2.
    """
    c = beta1 * exp_avg + (1 - beta1) * g
    return xp.sign(c), beta2 * exp_avg + (1 - beta2) * g


def lion_scalars(hp: dict, t: Any, ops: Any = None) -> dict:
    """The rule's scalar inputs by name (Lion has no bias correction, so ``t`` is not used)."""
    return {"beta1": hp["beta1"], "beta2": hp["beta2"]}


def lion_reference(
    theta0: np.ndarray,
    grad_fn: Callable[[np.ndarray, int], np.ndarray],
    steps: int,
    hp: Mapping[str, Any],
    *,
    maximize: bool = False,
    layout: str = "out_in",
) -> np.ndarray:
    """Lion in float64 NumPy, Algorithm 2 as printed (the independent reference the test suites compare against).

    ``c = b1 m + (1 - b1) g``; ``p <- p - lr (sign(c) + wd p)``; ``m <- b2 m + (1 - b2) g``, with ``g`` negated
    first when maximizing.

    Args:
        theta0: the initial parameters.
        grad_fn: ``grad_fn(theta, t)``, the gradient at ``theta`` for step ``t >= 1``.
        steps: the number of steps.
        hp: every hyperparameter (``lr``, ``beta1``, ``beta2``, ``weight_decay``).
        maximize: ascend instead of descend.
        layout: unused (Lion is elementwise).

    Returns:
        The trajectory ``theta_0 .. theta_T``, shape ``(steps + 1, *theta0.shape)``, float64.

    References:
        X. Chen et al., Symbolic Discovery of Optimization Algorithms (NeurIPS 2023), Algorithm 2.
    """
    lr, b1, b2, wd = (float(hp[k]) for k in ("lr", "beta1", "beta2", "weight_decay"))
    p = np.array(theta0, dtype=np.float64)
    m = np.zeros_like(p)
    out = [p.copy()]
    for t in range(1, steps + 1):
        g = np.asarray(grad_fn(p.copy(), t), dtype=np.float64)
        g = -g if maximize else g
        c = b1 * m + (1 - b1) * g
        p = p - lr * (np.sign(c) + wd * p)
        m = b2 * m + (1 - b2) * g
        out.append(p.copy())
    return np.stack(out)


LION = register(
    ElementwiseSpec(
        name="lion",
        title="Lion",
        hyperparams=(
            lr_hyper(1e-4),
            beta_hyper("beta1", 0.9, "interpolation of momentum and gradient in the update"),
            beta_hyper("beta2", 0.99, "decay of the momentum"),
            wd_hyper(0.0, "decoupled decay p <- p (1 - lr wd) (the paper's p - lr wd p)"),
        ),
        state=("exp_avg",),
        scalars=lion_scalars,
        direction=lion_direction,
        weight_decay="decoupled",
        conventions="update sign(b1 m + (1 - b1) g); momentum EMA with b2; decoupled decay lr*wd before the step",
        source="Chen et al. 2023, Symbolic Discovery of Optimization Algorithms, Algorithm 2",
        # What the test suites and the verifier run Lion at (a step that moves the parameters visibly, with decay),
        # and its independent reference.
        verification=Verification(hp={"lr": 1e-2, "weight_decay": 0.1}, reference=lion_reference),
    ),
    replace=True,
)
