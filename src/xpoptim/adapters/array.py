"""Optimizers over plain arrays (NumPy, CuPy, or any Python Array API namespace).

For models whose parameters live in NumPy or CuPy arrays with hand-written gradients. Two layers:

* **Stateful** (:class:`Optimizer`, one subclass per optimizer named by ``spec.title``, and
  :func:`create`): ``opt = Adam([w, b], lr=1e-3)``; ``opt.step([gw, gb])`` updates the user's arrays
  **in place** (they must be writable: read-only NumPy arrays and JAX arrays are refused with a
  pointer to the functional layer). Parameters are given as a list or a dict of arrays, or as a list
  of parameter groups (``{"params": [...], "lr": 0.1}``, torch style) with per-group
  hyperparameters. ``opt.param_groups[i]["lr"] = ...``, ``opt.set_hyperparams(lr=...)`` or
  ``opt.lr = ...`` change hyperparameters between steps (read and validated at every step, so LR
  schedules just write them). ``state_dict()`` / ``load_state_dict()`` hold NumPy arrays only, so a
  checkpoint moves between NumPy, CuPy, torch and JAX.
* **Functional** (:func:`functional`): ``tx = functional("adam", lr=1e-3)``; ``state = tx.init(params)``;
  ``new_params, state = tx.update(grads, state, params)``. Pure (no input is written), eager, and it
  works on any array-API namespace, JAX arrays included. It is the per-array reference
  (``xpoptim.core.functional``) and gives the same numbers as the stateful layer.
  ``tx.state_dict(state)`` / ``tx.load_state_dict(checkpoint, params)`` convert to and from the
  NumPy checkpoint format of the stateful layer (so a NumPy run can resume on JAX and back).

Layout (no math here; the rules are ``xpoptim.core``'s):

* Elementwise rules run once per *flat bucket*: one bucket per (parameter group, rule, dtype). On
  NumPy (float32 and float64) the core step kernel is compiled once into one C loop
  (:mod:`xpoptim.adapters._cfuse`: traced on symbolic arrays, printed as IEEE-exact C, built with the
  system C compiler and cached on disk), which gives the op-by-op path's bits in one pass over memory; the
  ``fused`` attribute says whether every bucket runs that way and ``fuse_notes`` why not (no compiler, a
  rule calling ``erf``, float16 parameters with float32 state, ``fuse=False``). Either way large
  C-contiguous arrays are updated through flat views of themselves (no gather) and small arrays are
  grouped in packs of about ``chunk_size`` elements (65536 by default, 262144 with several threads).
  Compiled, the loop updates a pack's parameters through their addresses and only the gradients are
  gathered (one ``numpy.concatenate(out=)`` into a reusable buffer); op by op, a pack's parameters are
  gathered too and scattered back, and large arrays are processed in chunks of ``chunk_size``. Packs,
  arrays and chunks are shared by ``threads`` threads (NumPy and the compiled loop release the GIL; by
  default the available cores, at most 2).
  State is kept in flat buffers per bucket. On CuPy (and other namespaces) a bucket
  is processed whole; on CuPy the core step kernel is compiled with ``cupy.fuse`` and writes its
  results in place (``fused`` attribute per bucket; op by op, with a warning, when the rule is not
  fusable or fusion fails).
* Matrix rules (Muon, DeVA_Sinf) take every parameter with ``ndim >= 2``; arrays with more than two
  axes are flattened to ``(shape[0], prod(rest))`` for ``layout="out_in"`` (torch ``Linear`` / conv
  weights) or ``(prod(shape[:-1]), shape[-1])`` for ``layout="in_out"`` (flax kernels). Same-shape
  matrices of one group are stacked into one Newton-Schulz call. Other parameters go to the
  elementwise fallback rule (``spec.fallback``, with ``spec.fallback_defaults``; override with
  ``fallback=`` and ``fallback_hyperparams=``).
* State for float16/bfloat16 parameters is float32 by default (``state_dtype=`` to choose).

Checkpoint format (``state_dict()``)::

    {"version": core.STATE_VERSION, "optimizer": "adamw", "step": 3,
     "param_groups": [{"keys": [0, 1], "lr": ..., ...}],   # hyperparameters per group
     "state": {0: {"exp_avg": ndarray, "exp_avg_sq": ndarray}, 1: {...}}}

State names are the core spec's (``spec.state``; ``momentum_buffer`` for Muon; ``L, R, QL, QR,
exp_avg, exp_avg_sq, gamma`` for DeVA_Sinf, with ``None`` for a side larger than
``max_precond_dim``). Elementwise state has the parameter's shape; matrix-rule state has the
flattened matrix shape. Keys are the dict keys (named parameters) or the parameter's position.

CuPy: all parameters must be on one device; the work is issued under that device, on its current
stream. Mixed devices are refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from xpoptim.core import SPECS

from ._array.functional import FunctionalOptimizer, functional
from ._array.malloc import tune_glibc_malloc
from ._array.optimizer import Optimizer
from ._array.threads import COMPILED_TASK_SIZE, DEFAULT_CHUNK_SIZE, DEFAULT_THREADED_CHUNK_SIZE, MAX_AUTO_THREADS

__all__ = [
    "Optimizer",
    "FunctionalOptimizer",
    "create",
    "functional",
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_THREADED_CHUNK_SIZE",
    "MAX_AUTO_THREADS",
    "COMPILED_TASK_SIZE",
    "tune_glibc_malloc",
]


def create(name: str, params: Any, **hyperparams: Any) -> Optimizer:
    """``create("adamw", [w, b], lr=1e-3)``: the stateful optimizer by registry name or title."""
    return Optimizer(params, name, **hyperparams)


def _make_class(spec: Any, backend: str | None = None, module: str = __name__) -> type:
    doc = (
        f"{spec.title} over plain arrays (``xpoptim.core`` spec ``{spec.name!r}``): ``step(grads)`` updates "
        f"the arrays in place.\n\n{spec.conventions}\n\nSource: {spec.source}\n\nHyperparameters:\n"
        + "\n".join(f"    {h.name} (default {h.default!r}): {h.doc}" for h in spec.hyperparams)
        + "\n\nSee :class:`xpoptim.adapters.array.Optimizer` for the keyword options."
    )

    def __init__(self, params: Any, **kwargs: Any) -> None:
        Optimizer.__init__(self, params, spec.name, **kwargs)

    return type(spec.title, (Optimizer,), {"__init__": __init__, "__doc__": doc, "optimizer_name": spec.name, "backend": backend, "__module__": module})


_REGISTERED_CLASSES: dict = {}


def _class_for(spec: Any, backend: str | None, module: str, namespace: dict) -> type:
    """The class of ``spec`` in an adapter module: the module's own (built-in rules), else one made once for a rule
    added with ``xpoptim.core.register`` (replaced when the registration is)."""
    cls = namespace.get(spec.title)
    if isinstance(cls, type) and getattr(cls, "optimizer_name", None) == spec.name:
        return cls
    key = (module, spec.name)
    made = _REGISTERED_CLASSES.get(key)
    if made is None or made[0] is not spec:
        made = _REGISTERED_CLASSES[key] = (spec, _make_class(spec, backend=backend, module=module))
    return made[1]


def _module_getattr(name: str, backend: str | None, module: str, namespace: dict) -> type:
    """``module.<Title>`` for a rule added with ``xpoptim.core.register`` (PEP 562 module ``__getattr__``)."""
    for spec in SPECS.values():
        if spec.title == name:
            return _class_for(spec, backend, module, namespace)
    raise AttributeError(f"module {module!r} has no attribute {name!r}")


if not TYPE_CHECKING:  # at run time only: type checkers report an unknown name as unknown

    def __getattr__(name: str) -> type:
        return _module_getattr(name, None, __name__, globals())


# --- generated by `python -m xpoptim._codegen` from xpoptim.core.SPECS: do not edit by hand ---
from ._array.classes import (  # noqa: E402
    Adam as Adam,
    AdamW as AdamW,
    AdaBelief as AdaBelief,
    LaProp as LaProp,
    MVNGrad as MVNGrad,
    SGD as SGD,
    MSSD as MSSD,
    SVAG as SVAG,
    MSVAG as MSVAG,
    AdamStar as AdamStar,
    MSVAGMB as MSVAGMB,
    AdamStarMB as AdamStarMB,
    DeVALinf as DeVALinf,
    DeVASinf as DeVASinf,
    Muon as Muon,
)

__all__ += ["Adam", "AdamW", "AdaBelief", "LaProp", "MVNGrad", "SGD", "MSSD", "SVAG", "MSVAG", "AdamStar", "MSVAGMB", "AdamStarMB", "DeVALinf", "DeVASinf", "Muon"]
# --- end of generated code ---
