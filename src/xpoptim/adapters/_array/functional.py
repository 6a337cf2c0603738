"""The pure functional layer of the array adapter: :class:`FunctionalOptimizer` and :func:`functional`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import array_api_compat
import numpy as np

from xpoptim.core import STATE_VERSION, ElementwiseSpec, MatrixSpec, get_spec
from xpoptim.core import functional as core_functional

from .namespace import _default_state_dtype, _from_numpy, _is_array, _matrix_shape, _numpy_dtype, _to_numpy
from .params import _matrix_rules, _LAYOUTS


class FunctionalOptimizer:
    """Pure ``init`` / ``update`` over a list or dict of arrays (any namespace, JAX included).

    ``state = {"version", "optimizer", "step", "state": {key: {name: array}}}`` with arrays in the
    parameters' namespace (the ``state`` part has the layout of ``Optimizer.state_dict()``).
    ``update`` runs ``xpoptim.core.functional.step`` per array (eager: not meant for ``jax.jit``;
    use the optax adapter there), routing as the stateful optimizer does.

    Args:
        optimizer: registry name or title.
        maximize, layout, fallback, fallback_hyperparams, state_dtype: as :class:`Optimizer`.
        **hyperparams: the optimizer's hyperparameters.
    """

    def __init__(
        self,
        optimizer: str,
        *,
        maximize: bool = False,
        layout: str = "out_in",
        fallback: str | None = None,
        fallback_hyperparams: Mapping[str, Any] | None = None,
        state_dtype: Any = None,
        **hyperparams: Any,
    ) -> None:
        self.spec = get_spec(optimizer)
        if not isinstance(maximize, bool):
            raise ValueError(f"maximize={maximize!r} is invalid: expected True or False")
        if layout not in _LAYOUTS:
            raise ValueError(f"layout={layout!r} is invalid: expected one of {_LAYOUTS}")
        self.maximize, self.layout, self.state_dtype = maximize, layout, state_dtype
        self.hyperparams = self.spec.validate(**hyperparams)
        self.fallback_spec = None
        self.fallback_hyperparams = None
        if isinstance(self.spec, MatrixSpec):
            self.fallback_spec, base = self.spec.resolve_fallback(fallback, fallback_hyperparams)
            self.fallback_hyperparams = self.fallback_spec.validate(**{"lr": self.hyperparams["lr"], **base})  # lr follows lr
        elif fallback is not None or fallback_hyperparams is not None:
            raise TypeError(f"{self.spec.title} is elementwise: fallback/fallback_hyperparams apply to the matrix rules only ({_matrix_rules()})")

    def _items(self, params: Any, what: str) -> tuple[list, list, bool]:
        if isinstance(params, Mapping):
            return list(params.keys()), list(params.values()), True
        if _is_array(params) or isinstance(params, (str, bytes)):
            raise TypeError(f"{what} must be a list or dict of arrays, got {type(params).__name__}")
        vals = list(params)
        return list(range(len(vals))), vals, False

    def _route(self, x: Any) -> tuple:
        if isinstance(self.spec, MatrixSpec) and x.ndim >= 2:
            return self.spec, self.hyperparams, _matrix_shape(tuple(x.shape), self.layout)
        if isinstance(self.spec, MatrixSpec):
            return self.fallback_spec, self.fallback_hyperparams, None
        return self.spec, self.hyperparams, None

    def init(self, params: Any) -> dict:
        """Zero state for ``params`` (a list or dict of arrays)."""
        keys, vals, _ = self._items(params, "params")
        state = {}
        for k, p in zip(keys, vals):
            spec, hp, mshape = self._route(p)
            xp = array_api_compat.array_namespace(p)
            like = p if mshape is None else xp.reshape(p, mshape)
            sd = _default_state_dtype(xp, p.dtype, self.state_dtype)
            state[k] = core_functional.init(spec, like, hp, state_dtype=sd)
        return {"version": STATE_VERSION, "optimizer": self.spec.name, "step": 0, "state": state}

    def update(self, grads: Any, state: Mapping[str, Any], params: Any, **extras: Any) -> tuple[Any, dict]:
        """One step; returns ``(new_params, new_state)`` with the structure of ``params``.

        Args:
            grads: gradients, same structure as ``params``.
            state: from ``init`` or the previous ``update``.
            params: the current parameters (not modified).
            **extras: extra inputs (``grad_variance=``), same structure.

        Raises:
            ValueError, TypeError: mismatched structure, shapes or dtypes, or a foreign state.
        """
        keys, vals, named = self._items(params, "params")
        gkeys, gvals, _ = self._items(grads, "grads")
        if gkeys != keys:
            raise ValueError(f"grads: structure does not match params (keys {gkeys} vs {keys})")
        if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION or state.get("optimizer") != self.spec.name:
            raise ValueError(f"state is not a {self.spec.title} state of version {STATE_VERSION} (use init(params))")
        if set(state["state"]) != set(keys):
            raise ValueError("state: keys do not match params")
        xl = {}
        for name, v in extras.items():
            xk, xv, _ = self._items(v, name)
            if xk != keys:
                raise ValueError(f"{name}: structure does not match params")
            xl[name] = xv
        t = int(state["step"]) + 1
        new_p, new_s = [], {}
        for i, (k, p, g) in enumerate(zip(keys, vals, gvals)):
            if tuple(g.shape) != tuple(p.shape) or g.dtype != p.dtype:
                raise ValueError(f"grads[{k!r}] has shape {tuple(g.shape)} and dtype {g.dtype}: expected {tuple(p.shape)} and {p.dtype}")
            spec, hp, mshape = self._route(p)
            xp = array_api_compat.array_namespace(p, g)
            ex = tuple(xl[n][i] for n in spec.extras) if isinstance(spec, ElementwiseSpec) else ()
            if isinstance(spec, ElementwiseSpec) and len(ex) != len(spec.extras):
                raise TypeError(f"{spec.title} needs the extra input(s) {spec.extras}")
            if mshape is not None:
                np_, ns = core_functional.step(
                    spec, xp.reshape(p, mshape), xp.reshape(g, mshape), state["state"][k], hp, t, maximize=self.maximize, layout=self.layout
                )
                np_ = xp.reshape(np_, tuple(p.shape))
                if np_.dtype != p.dtype:
                    np_ = xp.astype(np_, p.dtype)
            else:
                np_, ns = core_functional.step(spec, p, g, state["state"][k], hp, t, extras=ex, maximize=self.maximize)
            new_p.append(np_)
            new_s[k] = ns
        out = dict(zip(keys, new_p)) if named else (type(params)(new_p) if isinstance(params, (list, tuple)) else new_p)
        return out, {"version": STATE_VERSION, "optimizer": self.spec.name, "step": t, "state": new_s}


    def state_dict(self, state: Mapping[str, Any]) -> dict:
        """The functional ``state`` as a NumPy checkpoint (the format of ``Optimizer.state_dict()``).

        Args:
            state: from ``init`` / ``update``.

        Returns:
            A dict that ``Optimizer.load_state_dict`` of any backend (or :meth:`load_state_dict`)
            accepts.
        """
        group = dict(self.hyperparams)
        if self.fallback_hyperparams is not None:
            group["fallback_hyperparams"] = dict(self.fallback_hyperparams)
        group["keys"] = list(state["state"].keys())
        return {
            "version": STATE_VERSION,
            "optimizer": self.spec.name,
            "step": int(state["step"]),
            "param_groups": [group],
            "state": {k: {n: (None if v is None else _to_numpy(v)) for n, v in e.items()} for k, e in state["state"].items()},
        }

    def load_state_dict(self, state_dict: Mapping[str, Any], params: Any) -> dict:
        """A functional state from a checkpoint, with arrays like ``params`` (namespace, device).

        The checkpoint's hyperparameters are not applied (this object's are fixed at creation).

        Args:
            state_dict: from ``Optimizer.state_dict()`` or :meth:`state_dict`.
            params: the parameters the state is for (a list or dict of arrays).

        Returns:
            The state for :meth:`update`.

        Raises:
            ValueError: another version, optimizer, parameter set, state name or shape.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        for k in ("version", "optimizer", "step", "state"):
            if k not in state_dict:
                raise ValueError(f"state_dict is missing the key {k!r}")
        if state_dict["version"] != STATE_VERSION:
            raise ValueError(f"state_dict version={state_dict['version']!r} is not supported: expected {STATE_VERSION}")
        if state_dict["optimizer"] not in (self.spec.name, self.spec.title):
            raise ValueError(f"state_dict optimizer={state_dict['optimizer']!r} does not match this optimizer ({self.spec.name!r})")
        ref = self.init(params)
        keys = list(ref["state"])
        st = state_dict["state"]
        if not isinstance(st, Mapping) or set(st) != set(keys):
            raise ValueError("state_dict['state'] keys do not match params")
        _, vals, _ = self._items(params, "params")
        out: dict[Any, dict[str, Any]] = {}
        for key, p in zip(keys, vals):
            cur = ref["state"][key]
            entry = st[key]
            if not isinstance(entry, Mapping) or set(entry) != set(cur):
                raise ValueError(f"state_dict['state'][{key!r}] has state {sorted(entry) if isinstance(entry, Mapping) else entry!r}: expected {sorted(cur)}")
            xp = array_api_compat.array_namespace(p)
            out[key] = {}
            for n, r in cur.items():
                v = entry[n]
                if (r is None) != (v is None):
                    raise ValueError(f"state_dict['state'][{key!r}][{n!r}]: expected {'None' if r is None else 'an array'}")
                if r is None:
                    out[key][n] = None
                    continue
                host = _to_numpy(v) if _is_array(v) else np.asarray(v)
                if tuple(host.shape) != tuple(r.shape) or host.dtype.kind != "f":
                    raise ValueError(f"state_dict['state'][{key!r}][{n!r}] has shape {host.shape} and dtype {host.dtype}: expected {tuple(r.shape)}, floating")
                out[key][n] = _from_numpy(xp, host.astype(_numpy_dtype(r.dtype), copy=False), array_api_compat.device(p), r.dtype)
        return {"version": STATE_VERSION, "optimizer": self.spec.name, "step": int(state_dict["step"]), "state": out}


def functional(optimizer: str, **kwargs: Any) -> FunctionalOptimizer:
    """The pure ``init`` / ``update`` pair for ``optimizer`` (see :class:`FunctionalOptimizer`)."""
    return FunctionalOptimizer(optimizer, **kwargs)
