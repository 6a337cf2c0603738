"""Migration from optax's own optimizers (``optax.adam``, ``optax.adamw``, ``optax.sgd``, ``optax.contrib.muon``).

:func:`from_optax` reads the peer's state (its public state classes ``optax.ScaleByAdamState``,
``optax.TraceState``, ``optax.contrib.MuonState``, wherever they sit in the tree) into a portable state, in the
portable orientation (leaves with dimension numbers, by default every 2-D leaf as a flax ``(in, out)`` kernel, are
transposed to ``(out, in)``, as for the optax adapter). Import it with any adapter's ``import_state``.

Conventions:

* ``optax.adam`` / ``optax.adamw``: ``mu``, ``nu``, ``count`` are xpoptim's ``exp_avg``, ``exp_avg_sq`` and step,
  and the rules agree (eps outside ``sqrt(nu_hat)``, both moments bias-corrected; adamw's decay
  ``p - lr (d + wd p)`` is the decoupled decay before the step). The state does not record ``nesterov=True`` or
  ``eps_root > 0``, which xpoptim has no equivalent for: naming the optimizer asserts they were not used.
* ``optax.sgd``: ``trace`` (``t <- g + momentum t``, from zero) is xpoptim SGD's ``momentum_buffer`` with
  dampening 0 (``nesterov`` is the same rule too); optax counts no steps and xpoptim's SGD only distinguishes the
  first one, so every parameter is put at step 1, which continues identically (a zero trace then gives ``g``).
* ``optax.contrib.muon``: **refused** by default: it bias-corrects the momentum it orthogonalises
  (``mu / (1 - beta^t)``, Nesterov-mixed with ``g / (1 - beta^t)``) and its Adam fallback is Nesterov Adam,
  whereas xpoptim's Muon follows torch.optim.Muon (no bias correction) with an AdamW fallback, so the trajectory
  changes from the next step. ``strict=False`` maps the state anyway (``mu`` -> ``momentum_buffer``, the Adam
  part -> the AdamW fallback), exactly, for a user who accepts the change of rule.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import optax
import optax.contrib

from .layout import matrix_from_leaf
from .optax_state import leaf_names, leaf_orientations
from .state import ParamState, PortableState

__all__ = ["from_optax", "OPTAX_PEERS"]

#: Peer optimizers: name -> the xpoptim optimizer of the portable state.
OPTAX_PEERS = {"adam": "adam", "adamw": "adamw", "sgd": "sgd", "contrib.muon": "muon"}

_CONTRIB_MUON = (
    "optax.contrib.muon bias-corrects the momentum it orthogonalises (mu / (1 - beta^t), Nesterov-mixed with "
    "g / (1 - beta^t)) and its Adam fallback is Nesterov Adam; xpoptim's Muon follows torch.optim.Muon (no bias "
    "correction) with an AdamW fallback, so the trajectory would change from the next step. Pass strict=False to "
    "map the state anyway (exactly) and continue under xpoptim's rule"
)


def _find(node: Any, types: tuple, found: list) -> None:
    if isinstance(node, types):
        found.append(node)
        return
    if isinstance(node, (tuple, list)):
        for x in node:
            _find(x, types, found)
    elif isinstance(node, Mapping):
        for x in node.values():
            _find(x, types, found)


def _leaf_values(tree: Any, treedef: Any) -> list:
    return [None if isinstance(v, optax.MaskedNode) else v for v in treedef.flatten_up_to(tree)]


def from_optax(
    state: Any,
    params: Any,
    optimizer: str,
    *,
    hyperparams: Mapping[str, Any] | None = None,
    dimension_numbers: Any = None,
    strict: bool = True,
) -> PortableState:
    """The portable state of an optax peer optimizer's state.

    Args:
        state: the peer's state (from ``tx.init`` / ``tx.update``).
        params: the parameters (structure, shapes, leaf names).
        optimizer: ``"adam"``, ``"adamw"``, ``"sgd"`` or ``"contrib.muon"``.
        hyperparams: the hyperparameters it runs with, by xpoptim names (recorded only).
        dimension_numbers: the leaves' layout (as for ``xo.export_state``; ``optax.contrib.MuonDimensionNumbers``
            accepted).
        strict: refuse a peer whose rule differs from xpoptim's (``contrib.muon``).

    Returns:
        The :class:`PortableState` of ``OPTAX_PEERS[optimizer]``, keyed by the dotted leaf paths.

    Raises:
        ValueError: an unknown peer, a rule that differs (with ``strict``), or a state without the peer's state.
    """
    if optimizer not in OPTAX_PEERS:
        raise ValueError(f"optimizer={optimizer!r} is invalid: expected one of {sorted(OPTAX_PEERS)}")
    if optimizer == "contrib.muon" and strict:
        raise ValueError(_CONTRIB_MUON)
    rule = OPTAX_PEERS[optimizer]
    leaves, treedef = jax.tree.flatten(params)
    names = leaf_names(params)
    orients = leaf_orientations(params, dimension_numbers)
    per: list[tuple[str, int, dict] | None] = [None] * len(leaves)

    def put(i: int, r: str, step: int, arrays: dict) -> None:
        if per[i] is not None:
            raise ValueError(f"from_optax: leaf {names[i]!r} appears in two {optimizer} states")
        per[i] = (r, step, arrays)

    adam: list = []
    _find(state, (optax.ScaleByAdamState,), adam)
    if rule in ("adam", "adamw", "muon"):
        for node in adam:
            r = "adamw" if rule == "muon" else rule
            for i, (m, v) in enumerate(zip(_leaf_values(node.mu, treedef), _leaf_values(node.nu, treedef))):
                if m is not None:
                    put(i, r, int(node.count), {"exp_avg": orients[i].to_portable(np.array(m)), "exp_avg_sq": orients[i].to_portable(np.array(v))})
    if rule == "muon":
        muon: list = []
        _find(state, (optax.contrib.MuonState,), muon)
        for node in muon:
            for i, m in enumerate(_leaf_values(node.mu, treedef)):
                if m is not None:
                    put(i, "muon", int(node.count), {"momentum_buffer": matrix_from_leaf(np.array(m), orients[i])})
    if rule == "sgd":
        trace: list = []
        _find(state, (optax.TraceState,), trace)
        for node in trace:
            for i, m in enumerate(_leaf_values(node.trace, treedef)):
                if m is not None:
                    put(i, "sgd", 1, {"momentum_buffer": orients[i].to_portable(np.array(m))})
        if not trace:  # optax.sgd without momentum keeps no trace
            for i, x in enumerate(leaves):
                put(i, "sgd", 1, {"momentum_buffer": np.zeros(orients[i].portable_shape(x.shape), np.asarray(x).dtype)})
    if all(p is None for p in per):
        raise ValueError(f"from_optax: state holds no optax.{optimizer} state for these params")
    out = {
        names[i]: ParamState(r, step, orients[i].portable_shape(leaves[i].shape), arrays)
        for i, entry in enumerate(per)
        if entry is not None
        for r, step, arrays in [entry]
    }
    return PortableState(rule, dict(hyperparams or {}), out, fallback="adamw" if rule == "muon" else None)
