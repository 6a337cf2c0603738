"""The framework-neutral optimizer state: :class:`PortableState` and :class:`ParamState`.

One layout, whatever framework wrote it:

* ``optimizer``: the registry name of the optimizer (``"adamw"``, ``"muon"``); ``version``: the core's
  ``STATE_VERSION`` (the meaning of the state names); ``hyperparams``: the optimizer's hyperparameters by spec
  name, as recorded by the exporter (JSON values; informational: the importer keeps the target optimizer's own);
  ``fallback`` / ``fallback_hyperparams``: for Muon and DeVA_Sinf, the elementwise rule of the non-matrix
  parameters and its hyperparameters.
* ``params``: one :class:`ParamState` per parameter, keyed by the parameter's name or path, in the exporter's
  order. Each holds the rule that serves it (the optimizer, or its fallback), the number of update calls it has
  taken (``step``), the parameter's shape and its state arrays (NumPy), named as in the core spec.

Orientation (the one documented layout): **torch's**. A weight is stored as ``(out, in...)``: a torch
``Linear.weight`` as it is, a flax ``Dense`` kernel ``(in, out)`` transposed. In general a JAX leaf with
dimension numbers is stored with its axes permuted to ``(batch..., output..., reduction...)``; with
``DimensionNumbers(reduction_axis=(2, 0, 1), output_axis=3)`` a flax ``Conv`` kernel ``(kh, kw, in, out)`` is
stored as torch's ``(out, in, kh, kw)``. Elementwise state has the parameter's stored shape. Matrix-rule state
(Muon's ``momentum_buffer``; DeVA_Sinf's ``exp_avg``, ``exp_avg_sq``, ``gamma``) is the matrix
``(out, prod(in))`` (a leading batch axis for batched JAX matrices); DeVA_Sinf's Kronecker factors ``L``/``QL``
are ``(out, out)`` and ``R``/``QR`` are ``(in, in)``, ``None`` on a side larger than ``max_precond_dim``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from xpoptim.core import SPECS, STATE_VERSION, get_spec
from xpoptim.core.spec import MatrixSpec

__all__ = ["ParamState", "PortableState", "jsonable"]


def jsonable(value: Any) -> Any:
    """A hyperparameter value as JSON data: numbers, bools, strings, None and lists of them.

    One-element arrays and tensors become numbers; dtypes their name (``"bfloat16"``); anything else its
    ``repr`` (recorded for the reader, not reloaded as an object).
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)):
        return value if not isinstance(value, float) or math.isfinite(value) else repr(value)
    if isinstance(value, (tuple, list)):
        return [jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    item = getattr(value, "item", None)
    size = getattr(value, "size", None)
    numel = getattr(value, "numel", None)
    if callable(numel):
        size = numel()
    if callable(item) and size == 1:
        return jsonable(item())
    name = getattr(value, "name", None) if "dtype" in type(value).__name__.lower() else None
    if isinstance(name, str):
        return name
    text = str(value)
    return text[len("torch."):] if text.startswith("torch.") else text


@dataclasses.dataclass
class ParamState:
    """The optimizer state of one parameter.

    Attributes:
        rule: registry name of the rule that serves the parameter (the optimizer's, or its fallback's).
        step: update calls the parameter has taken (optax's ``count``, torch's ``state[p]["step"]``).
        shape: the parameter's shape in the portable (torch) orientation.
        state: the rule's state arrays by core name (``None`` for DeVA_Sinf's unused factor sides).
    """

    rule: str
    step: int
    shape: tuple[int, ...]
    state: dict[str, np.ndarray | None]

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        self.step = int(self.step)


@dataclasses.dataclass
class PortableState:
    """A framework-neutral optimizer state (see the module docstring for the layout).

    Build one with an adapter's ``export_state``, save it with :meth:`save` (safetensors or ``.npz``, never
    pickle), read it with :func:`xpoptim.portable.load` and hand it to another adapter's ``import_state``.

    Attributes:
        optimizer: registry name of the optimizer.
        hyperparams: its hyperparameters by spec name (JSON values), as the exporter knew them.
        params: ``{name: ParamState}`` in the exporter's order.
        fallback: Muon / DeVA_Sinf: the elementwise rule of the non-matrix parameters.
        fallback_hyperparams: that rule's hyperparameters.
        version: the core's ``STATE_VERSION`` the state names and shapes follow.
    """

    optimizer: str
    hyperparams: dict[str, Any]
    params: dict[str, ParamState]
    fallback: str | None = None
    fallback_hyperparams: dict[str, Any] = dataclasses.field(default_factory=dict)
    version: int = STATE_VERSION

    def __post_init__(self) -> None:
        self.optimizer = get_spec(self.optimizer).name
        self.hyperparams = {k: jsonable(v) for k, v in dict(self.hyperparams).items()}
        self.fallback_hyperparams = {k: jsonable(v) for k, v in dict(self.fallback_hyperparams or {}).items()}
        self.validate()

    # -- checks --------------------------------------------------------------------------------------------------

    def validate(self) -> None:
        """Check the version, the rule of every parameter and its state names against the specs.

        Raises:
            ValueError: another state version; a parameter served by a rule this optimizer cannot run; state
                names that are not the rule's.
        """
        if self.version != STATE_VERSION:
            raise ValueError(f"portable state version={self.version!r} is not supported: expected {STATE_VERSION}")
        spec = SPECS[self.optimizer]
        allowed = {spec.name}
        if isinstance(spec, MatrixSpec):
            allowed.add(self.fallback if self.fallback is not None else spec.fallback)
        for name, ps in self.params.items():
            if not isinstance(ps, ParamState):
                raise TypeError(f"portable state: params[{name!r}] is a {type(ps).__name__}: expected a ParamState")
            if ps.rule not in allowed:
                raise ValueError(
                    f"portable state: parameter {name!r} has rule={ps.rule!r}: a {spec.title} state holds only "
                    f"{sorted(allowed)}"
                )
            if ps.step < 0:
                raise ValueError(f"portable state: parameter {name!r} has step={ps.step}: expected an integer >= 0")
            want = set(state_names(ps.rule))
            if set(ps.state) != want:
                raise ValueError(
                    f"portable state: parameter {name!r} (rule {ps.rule!r}) has state {sorted(ps.state)}: expected {sorted(want)}"
                )

    # -- convenience ---------------------------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        """The parameter names, in order."""
        return list(self.params)

    def rename(self, mapping: Mapping[str, str] | Callable[[str], str]) -> PortableState:
        """A copy with the parameters renamed (arrays shared).

        Args:
            mapping: ``{old: new}`` (names not in it are kept) or a function ``old -> new``.

        Returns:
            The renamed state.

        Raises:
            ValueError: two parameters would get the same name.
        """
        fn = mapping if callable(mapping) else (lambda n: mapping.get(n, n))
        new = {}
        for n, ps in self.params.items():
            m = str(fn(n))
            if m in new:
                raise ValueError(f"rename: parameters {n!r} and another both map to {m!r}")
            new[m] = ps
        return dataclasses.replace(self, params=new)

    def save(self, path: Any) -> None:
        """Write to ``path``: safetensors, or NumPy ``.npz`` when the name ends in ``.npz`` (no pickle either way)."""
        from .io import save  # noqa: PLC0415  (io imports this module)

        save(self, path)


def state_names(rule: str) -> tuple[str, ...]:
    """The state names of a rule (``spec.state``, elementwise and matrix rules alike)."""
    return tuple(get_spec(rule).state)


def matrix_roles(rule: str) -> dict[str, str]:
    """Role of each state array of a matrix rule: ``"matrix"``, ``"left"`` or ``"right"`` (a Kronecker factor).

    Read from the spec's state layout (``spec.state_shapes``) of a ``(2, 3)`` matrix: ``(2, 3)`` arrays have the
    matrix's shape, ``(2, 2)`` ones sit on its row side and ``(3, 3)`` ones on its column side.
    """
    spec = get_spec(rule)
    if not isinstance(spec, MatrixSpec):
        raise ValueError(f"matrix_roles: rule={rule!r} is invalid: expected a matrix rule, one of {[n for n, s in SPECS.items() if isinstance(s, MatrixSpec)]}")
    shapes = spec.state_shapes((2, 3), spec.validate())
    return {k: {(2, 3): "matrix", (2, 2): "left", (3, 3): "right"}[tuple(shapes[k])] for k in spec.state}
