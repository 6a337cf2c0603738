"""State policy shared by every adapter: the state dtype, the state layout of a parameter, checkpoint checks.

Derived once from the spec, so that an adapter never spells out an optimizer's state: an elementwise rule keeps
one array per name of ``spec.state`` with the parameter's shape; a matrix rule's layout is ``spec.state_shapes``
of the parameter's matrix shape.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from .spec import ElementwiseSpec, MatrixSpec

__all__ = ["is_low_precision", "default_state_dtype", "state_layout", "check_state_entry"]


def is_low_precision(dtype: Any) -> bool:
    """True for 16-bit floating dtypes (float16, bfloat16) of any framework (judged by the dtype's name)."""
    return str(dtype).rsplit(".", 1)[-1] in ("float16", "bfloat16")


def default_state_dtype(dtype: Any, state_dtype: Any = None, float32: Any = None) -> Any:
    """The state-dtype policy: ``state_dtype`` when given, else float32 for a 16-bit parameter, else its own dtype.

    Args:
        dtype: the parameter's dtype.
        state_dtype: the user's choice (``None``: the policy).
        float32: the framework's float32 dtype (``numpy.float32``, ``torch.float32``, ``jnp.float32``).

    Returns:
        The dtype the rule's state is kept (and its arithmetic run) in.
    """
    if state_dtype is not None:
        return state_dtype
    return float32 if is_low_precision(dtype) else dtype


def state_layout(spec: ElementwiseSpec | MatrixSpec, shape: tuple, hp: Mapping[str, Any], matrix_shape: tuple | None = None) -> dict:
    """The state names and shapes one parameter holds under ``spec``.

    Args:
        spec: the rule the parameter is routed to.
        shape: the parameter's shape.
        hp: validated hyperparameters of ``spec``.
        matrix_shape: for a matrix rule, the ``(n, m)`` matrix the parameter is seen as (the adapter's layout).

    Returns:
        ``{name: shape or None}`` in ``spec.state`` order (``None``: an array the rule does not keep, such as a
        DeVA_Sinf factor of a side larger than ``max_precond_dim``).
    """
    if isinstance(spec, MatrixSpec):
        shapes = spec.state_shapes(tuple(matrix_shape if matrix_shape is not None else shape), hp)
        return {n: (None if shapes[n] is None else tuple(shapes[n])) for n in spec.state}
    return {n: tuple(shape) for n in spec.state}


def check_state_entry(
    where: str,
    entry: Any,
    layout: Mapping[str, tuple | None],
    shape_of: Callable[[Any], tuple] = lambda a: tuple(a.shape),
    is_floating: Callable[[Any], bool] | None = None,
) -> None:
    """Check one parameter's checkpointed state against its layout; raise a ``ValueError`` naming what differs.

    Args:
        where: how the message names the entry (``"state_dict['state'][0]"``).
        entry: the checkpoint's ``{name: array or None}`` for the parameter.
        layout: from :func:`state_layout`.
        shape_of: the shape of a stored array (default ``tuple(a.shape)``).
        is_floating: whether a stored array has a real floating dtype (not checked when ``None``).

    Raises:
        ValueError: another set of names, ``None`` where an array is expected (or the reverse), another shape, a
            dtype that is not real floating.
    """
    if not isinstance(entry, Mapping) or set(entry) != set(layout):
        got = sorted(entry) if isinstance(entry, Mapping) else type(entry).__name__
        raise ValueError(f"{where} has state {got}: expected {sorted(layout)}")
    for name, want in layout.items():
        v = entry[name]
        if (want is None) != (v is None):
            raise ValueError(f"{where}[{name!r}] is {'None' if v is None else 'an array'}: expected {'None' if want is None else 'an array'}")
        if v is None:
            continue
        got_shape = tuple(shape_of(v))
        if want is not None and got_shape != tuple(want):
            raise ValueError(f"{where}[{name!r}] has shape {got_shape}: expected {tuple(want)}")
        if is_floating is not None and not is_floating(v):
            raise ValueError(f"{where}[{name!r}] has dtype {getattr(v, 'dtype', type(v).__name__)}: expected a real floating dtype")
