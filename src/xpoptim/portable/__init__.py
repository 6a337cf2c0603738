"""xpoptim.portable: optimizer state that moves between torch, JAX/optax and NumPy/CuPy.

A :class:`PortableState` holds the optimizer's name, its hyperparameters, the core's state version and, per
parameter (by name or path), the rule serving it, its step count and its state as NumPy arrays, in one documented
orientation (torch's ``(out, in)``; see :mod:`xpoptim.portable.state`). Files are safetensors or ``.npz``, never
pickle.

* torch: ``opt.export_state(names=None)`` / ``opt.import_state(portable, names=None)``;
* optax: ``xo.export_state(state, params, optimizer=...)`` / ``xo.import_state(portable, params, tx)``;
* NumPy/CuPy: ``opt.export_state()`` / ``opt.import_state(portable)``;
* files: ``portable.save(path)`` / :func:`load`; the NumPy/CuPy adapter's own ``state_dict()`` through
  ``numpy.savez`` with :func:`flatten_state_dict` / :func:`unflatten_state_dict`;
* peers: :func:`from_torch_optim` / :func:`to_torch_optim` (torch.optim Adam, AdamW, SGD, Muon) and
  :func:`from_optax` (optax adam, adamw, sgd; contrib.muon is refused, with the reason).

The adapters' methods only delegate to the functions here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .array_state import flatten_state_dict, unflatten_state_dict
from .io import FORMAT, from_arrays, load, save, to_arrays
from .state import ParamState, PortableState

if TYPE_CHECKING:  # what type checkers see; at run time the peer helpers load on first use (module __getattr__)
    from .peers_optax import from_optax
    from .peers_torch import from_torch_optim, to_torch_optim

__all__ = [
    "FORMAT",
    "ParamState",
    "PortableState",
    "load",
    "save",
    "to_arrays",
    "from_arrays",
    "flatten_state_dict",
    "unflatten_state_dict",
    "from_torch_optim",
    "to_torch_optim",
    "from_optax",
]


_LAZY = {"from_torch_optim": "peers_torch", "to_torch_optim": "peers_torch", "from_optax": "peers_optax"}

if not TYPE_CHECKING:  # at run time only: type checkers see the imports above and report an unknown name as unknown

    def __getattr__(name: str) -> Any:  # PEP 562: the peer helpers import torch / JAX only when used
        if name in _LAZY:
            import importlib  # noqa: PLC0415

            return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
