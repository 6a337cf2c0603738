"""Lion as a user-defined xpoptim rule: one spec, registered once, served by every adapter.

Lion (EvoLved Sign Momentum; Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Algorithm 2)::

    c = b1 m + (1 - b1) g          # interpolation of the momentum and the gradient
    p <- p - lr (sign(c) + wd p)   # the update is a sign: every coordinate moves by lr
    m <- b2 m + (1 - b2) g         # the momentum is tracked with a second, slower rate

The decay is decoupled and uses the learning rate: ``p - lr wd p`` is ``p (1 - lr wd)``, which is what the core
applies before ``- lr d`` for ``weight_decay="decoupled"``. So the rule only returns ``d = sign(c)`` and the new
momentum. The defaults are the paper's (lr 1e-4, b1 0.9, b2 0.99, wd 0).

Usage (nothing in xpoptim is edited)::

    import examples.lion  # registers "lion"
    from xpoptim.adapters import numpy as xnp, optax as xo, torch as xt

    opt = xt.create("lion", model.parameters(), lr=1e-4, weight_decay=1.0)
    tx = xo.create("lion", learning_rate=1e-4)
    opt = xnp.create("lion", [w, b], lr=1e-4)       # the compiled C loop (fuse=False: op by op)
"""

from __future__ import annotations

from typing import Any

from xpoptim.core import ElementwiseSpec, beta_hyper, lr_hyper, register, wd_hyper

__all__ = ["lion_direction", "lion_scalars", "LION"]


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
    ),
    replace=True,
)
