"""Reading and writing a :class:`~xpoptim.portable.PortableState`: safetensors or ``.npz``, never pickle.

Both files hold the state arrays under ``params.<i>.<state name>`` (``i`` the parameter's position) and one JSON
document with everything else (format tag, optimizer, version, hyperparameters, fallback, and per parameter its
name, rule, step, shape and the names of ``None`` state): in the safetensors metadata (key ``xpoptim.portable``),
or in ``.npz`` as a 0-D unicode array of that name, so ``numpy.load(path, allow_pickle=False)`` reads it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from .state import ParamState, PortableState, state_names

__all__ = ["FORMAT", "save", "load", "to_arrays", "from_arrays"]

#: Format tag written into every file; :func:`load` refuses another.
FORMAT = "xpoptim.portable/1"
_META = "xpoptim.portable"


def to_arrays(state: PortableState) -> tuple[dict[str, np.ndarray], str]:
    """The state as ``({key: array}, json_metadata)`` (what :func:`save` writes)."""
    arrays: dict[str, np.ndarray] = {}
    entries = []
    for i, (name, ps) in enumerate(state.params.items()):
        nones = []
        for k, v in ps.state.items():
            if v is None:
                nones.append(k)
            else:
                arrays[f"params.{i}.{k}"] = np.ascontiguousarray(np.asarray(v))
        entries.append({"name": name, "rule": ps.rule, "step": ps.step, "shape": list(ps.shape), "none": nones})
    meta = {
        "format": FORMAT,
        "optimizer": state.optimizer,
        "version": state.version,
        "hyperparams": state.hyperparams,
        "fallback": state.fallback,
        "fallback_hyperparams": state.fallback_hyperparams,
        "params": entries,
    }
    return arrays, json.dumps(meta)


def from_arrays(arrays: Any, meta: str) -> PortableState:
    """Rebuild a state from :func:`to_arrays`' output (``arrays``: any mapping of key -> array).

    Raises:
        ValueError: not an xpoptim portable state, another format, or an array missing.
    """
    try:
        doc = json.loads(meta)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"not an xpoptim portable state: its metadata is not JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ValueError(f"portable state format={got!r} is not supported: expected {FORMAT!r}")
    params = {}
    for i, e in enumerate(doc["params"]):
        st: dict[str, Any] = {}
        for k in state_names(e["rule"]):
            key = f"params.{i}.{k}"
            if k in e["none"]:
                st[k] = None
            elif key in arrays:
                st[k] = np.asarray(arrays[key])
            else:
                raise ValueError(f"portable state: array {key!r} (parameter {e['name']!r}, state {k!r}) is missing")
        params[e["name"]] = ParamState(e["rule"], e["step"], tuple(e["shape"]), st)
    return PortableState(
        optimizer=doc["optimizer"],
        hyperparams=doc["hyperparams"],
        params=params,
        fallback=doc["fallback"],
        fallback_hyperparams=doc["fallback_hyperparams"],
        version=doc["version"],
    )


def _is_npz(path: Any) -> bool:
    return os.fspath(path).endswith(".npz")


def save(state: PortableState, path: Any) -> None:
    """Write ``state`` to ``path``: NumPy ``.npz`` when the name ends in ``.npz``, else safetensors.

    Args:
        state: the portable state.
        path: a file path (str or ``os.PathLike``).
    """
    arrays, meta = to_arrays(state)
    if _is_npz(path):
        np.savez(path, allow_pickle=False, **arrays, **{_META: np.array(meta)})
        return
    from safetensors.numpy import save_file  # noqa: PLC0415  (an optional dependency: the torch/jax extras)

    save_file(arrays, os.fspath(path), metadata={_META: meta})


def load(path: Any) -> PortableState:
    """Read a state written by :func:`save` (``.npz`` by its name, else safetensors); nothing is unpickled.

    Raises:
        ValueError: the file is not an xpoptim portable state.
    """
    if _is_npz(path):
        with np.load(path, allow_pickle=False) as f:
            if _META not in f.files:
                raise ValueError(f"{os.fspath(path)!r} is not an xpoptim portable state: no {_META!r} entry")
            return from_arrays({k: f[k] for k in f.files if k != _META}, str(f[_META][()]))
    from safetensors import safe_open  # noqa: PLC0415

    with safe_open(os.fspath(path), framework="np") as f:
        meta = (f.metadata() or {}).get(_META)
        if meta is None:
            raise ValueError(f"{os.fspath(path)!r} is not an xpoptim portable state: no {_META!r} metadata")
        return from_arrays({k: f.get_tensor(k) for k in f.keys()}, meta)
