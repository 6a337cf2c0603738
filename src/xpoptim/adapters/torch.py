"""torch adapter: every xpoptim optimizer as a real :class:`torch.optim.Optimizer`.

One class per rule, written out in ``_torch_classes.py`` (``Adam``, ``AdamW``, ``AdaBelief``, ``LaProp``,
``MVNGrad``, ``SGD``, ``MSSD``, ``SVAG``, ``MSVAG``, ``AdamStar``, ``MSVAGMB``, ``AdamStarMB``, ``DeVALinf``,
``DeVASinf``, ``Muon``), each a subclass of :class:`XPOptimizer` (``XPOptimizer(params, "adamw", lr=...)`` runs any
registered rule), plus :func:`create`. The adapter holds no math and names no optimizer: elementwise rules run the
kernel of ``xpoptim.core.make_step_kernel`` with the scalars of ``xpoptim.core.step_scalars`` (float64 on the
host), matrix rules run ``xpoptim.core.functional.init`` / ``step``, dispatched through the spec.

Conventions (the torch ones):

* ``Cls(params, lr=..., *, <hyperparameters>, maximize=False, state_dtype=None, compile=False)``; ``params`` as
  tensors, param-group dicts or ``(name, tensor)`` pairs. Hyperparameter names are the spec's; rules with
  ``beta1``/``beta2`` keep them in the groups as torch's ``betas=(beta1, beta2)`` tuple (``OneCycleLR``/``CyclicLR``
  momentum cycling works) and accept ``beta1=``/``beta2=`` too. Every hyperparameter is re-read from ``group[...]``
  at every step (LR schedulers work): a Python or NumPy real number, or a 1-element real tensor; anything else
  (``None``, arrays, complex numbers, objects) is refused with a ``ValueError`` before anything changes.
* **The user's tensors stay the user's.** Parameters, gradients and state are ordinary tensors, exactly as
  torch.optim leaves them: no ``.data`` is re-pointed, gradients are read where backward left them, no gradient
  buffer is kept, and ``self.state[p]`` holds the rule's named state tensors (the parameter's shape and memory
  format, made by ``zeros_like(p, memory_format=torch.preserve_format)``), a ``step`` tensor of its own (float32,
  on the CPU, as torch.optim's) and ``state_version``. Tied parameters, ``torch.save`` of a submodule,
  ``safetensors`` and state dicts behave as with torch.optim; an AdamW/Adam state dict holds torch.optim's names
  (``exp_avg``, ``exp_avg_sq``, ``step``), so it can be read by ``torch.optim.AdamW`` and back (``load_state_dict``
  checks the group's ``rule`` key, which torch's groups lack: add ``rule`` when loading a torch dict).
* **Speed.** Elementwise rules run as one multi-tensor kernel per group:
  - CPU, float32/float64, contiguous tensors: the core kernel compiled into one C loop (``_cfuse``: traced on
    symbolic arrays, printed as IEEE-exact C, built once by the system C compiler and cached on disk) that updates
    every parameter and state tensor through its ``data_ptr()``, split over ``torch.get_num_threads()`` of
    torch's own OpenMP threads;
  - elsewhere (CUDA, bf16/fp16 parameters with float32 state, channels_last or strided tensors, no C compiler,
    rules calling ``erf``): the same kernel over lists of tensors through ``torch._foreach_*`` ops (one launch per
    operation for all tensors on CUDA), or tensor by tensor where an operation has no list form;
  - ``compile=True`` (opt-in): ``torch.compile`` of the in-place step, per tensor (the first step waits for the
    compiler). ``import xpoptim.adapters.torch`` does not load ``torch._dynamo`` or ``torch._inductor``.
  Each element is computed with the same IEEE operations in every path except ``compile=True``, so the compiled
  loop and the op-by-op paths give the same bits.
* **Atomic steps.** A step validates every group, gradient, state entry and option first, then computes every
  matrix-rule update, and only then writes anything: a step that raises (a bad hyperparameter, a gradient of the
  wrong shape, an ``eigh`` that fails on a NaN or 1e20 gradient) leaves parameters and state as they were, and a
  failed first step leaves no new state entries. ``load_state_dict`` builds the complete new state aside and swaps
  it in only when all of it is valid; groups of an older release without ``maximize``/``compile`` get the
  defaults.
* Complex parameters are **refused** with a ``TypeError`` (use ``torch.view_as_real``); sparse gradients with a
  ``ValueError``.
* DTensor parameters (FSDP2 ``fully_shard``, tensor parallelism): elementwise rules step each rank's local shard in
  place (no communication), with DTensor state of the parameter's placements, as torch.optim's. Matrix rules need
  the whole matrix: the parameter, gradient and state of the parameter's shape are all-gathered, every rank runs
  the same step, and each keeps its shard; state of other shapes (DeVASinf's factors) is replicated.
* Matrix rules (Muon, DeVASinf): one instance serves matrix groups (``rule`` = the matrix rule: 2-D weights, conv
  weights as ``(out, in*kh*kw)``) and fallback groups (``rule`` = an elementwise rule, by default the spec's
  fallback with its ``fallback_defaults``). Plain tensors are routed by dimension (all named or all unnamed: a mix
  is refused); :func:`matrix_param_groups` also sends embeddings and the output head to the fallback. A matrix with
  a zero-size side has nothing to update: the step skips it (no state), as it skips a parameter without gradient.
* Mini-batch rules (MSVAGMB, AdamStarMB): pass the per-element variance of the mini-batch gradient as
  ``opt.step(grad_variance={param: tensor})`` or as ``param.grad_variance``; :func:`minibatch_grad_variance`
  computes it with ``torch.func``.
* Matrix products of torch tensors in the core (Newton-Schulz, DeVA) go through ``_torch_gemm`` (oneDNN for
  float32 CPU, ``addmm``/``baddbmm``), registered with the core's neutral ``register_gemm`` hook on import.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import array_api_compat.torch as _txp
import torch
from torch.optim.optimizer import ParamsT

from xpoptim.core import SPECS, get_spec
from xpoptim.core.moments import minibatch_variance
from xpoptim.core.spec import MatrixSpec

from ._torch_classes import (
    SGD,
    MSSD,
    MSVAG,
    MSVAGMB,
    SVAG,
    AdaBelief,
    Adam,
    AdamStar,
    AdamStarMB,
    AdamW,
    DeVALinf,
    DeVASinf,
    LaProp,
    Muon,
    MVNGrad,
)
from ._torch_docs import class_doc
from ._torch_optimizer import XPOptimizer

__all__ = [
    "XPOptimizer",
    "create",
    "matrix_param_groups",
    "param_groups_for_muon",
    "minibatch_grad_variance",
    "OPTIMIZERS",
    "Adam",
    "AdamW",
    "AdaBelief",
    "LaProp",
    "MVNGrad",
    "SGD",
    "MSSD",
    "SVAG",
    "MSVAG",
    "AdamStar",
    "MSVAGMB",
    "AdamStarMB",
    "DeVALinf",
    "DeVASinf",
    "Muon",
]

_CLASSES: tuple[type[XPOptimizer], ...] = (
    Adam, AdamW, AdaBelief, LaProp, MVNGrad, SGD, MSSD, SVAG, MSVAG, AdamStar, MSVAGMB, AdamStarMB, DeVALinf, DeVASinf, Muon,
)

#: name -> class, for every spec that has a class here.
OPTIMIZERS: dict[str, type[XPOptimizer]] = {cls.spec.name: cls for cls in _CLASSES}

#: Classes made for rules added with ``xpoptim.core.register`` (by title; remade when the rule is registered anew).
_REGISTERED: dict[str, type[XPOptimizer]] = {}


def _registered_class(spec: Any) -> type[XPOptimizer]:
    """The optimizer class of a rule added with ``xpoptim.core.register``: an :class:`XPOptimizer` bound to the spec,
    taking the spec's hyperparameters as keyword arguments (``xpoptim.adapters.torch.Lion(params, lr=1e-4)``)."""
    cls = _REGISTERED.get(spec.title)
    if cls is not None and cls.spec is spec:
        return cls

    def __init__(self: XPOptimizer, params: ParamsT, **hyperparams: Any) -> None:
        XPOptimizer.__init__(self, params, spec, **hyperparams)

    cls = type(spec.title, (XPOptimizer,), {"spec": spec, "__init__": __init__, "__doc__": class_doc(spec), "__module__": __name__})
    _REGISTERED[spec.title] = cls
    return cls


if not TYPE_CHECKING:  # at run time only: type checkers report an unknown name as unknown

    def __getattr__(name: str) -> type[XPOptimizer]:
        """``xpoptim.adapters.torch.<Title>`` for a rule added with ``xpoptim.core.register`` (PEP 562)."""
        for spec in SPECS.values():
            if spec.title == name and spec.name not in OPTIMIZERS:
                return _registered_class(spec)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def create(name: str, params: ParamsT, **hp: Any) -> XPOptimizer:
    """Create the torch optimizer of a registry name (``"adamw"``) or title (``"AdamW"``).

    Args:
        name: the optimizer.
        params: tensors, param-group dicts or ``(name, tensor)`` pairs.
        **hp: hyperparameters (the spec's names; ``betas=`` also accepted) and options (``maximize``,
            ``state_dtype``, ``compile``; ``fallback``/``fallback_hyperparams`` for the matrix rules).

    Returns:
        The optimizer (an instance of the rule's class, or of :class:`XPOptimizer` for a rule without one).
    """
    spec = get_spec(name)
    cls = OPTIMIZERS.get(spec.name)
    if cls is None:
        return _registered_class(spec)(params, **hp)
    import inspect

    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "params"}
    unknown = sorted(set(hp) - accepted)
    if unknown:
        raise TypeError(f"{spec.title}: unknown hyperparameter(s) {unknown}; expected a subset of {sorted(accepted)}")
    return cls(params, **hp)


# ----------------------------------------------------------------------------------------------------------------------
# Helpers: routing for the matrix rules, mini-batch variance
# ----------------------------------------------------------------------------------------------------------------------

_HEAD_NAMES = ("lm_head", "head", "classifier", "fc_out", "output")


def matrix_param_groups(
    model: torch.nn.Module,
    optimizer: str = "muon",
    *,
    fallback: str | None = None,
    head: str | Iterable[str] | None = None,
    exclude: Callable[[str, torch.nn.Parameter], bool] | None = None,
    matrix_hyperparams: Mapping[str, Any] | None = None,
    fallback_hyperparams: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Split a model's trainable parameters into a matrix group and a fallback group for Muon / DeVASinf.

    Routing (the usual Muon convention): hidden 2-D weights and conv weights (flattened to ``(out, in*kh*kw)`` by
    the optimizer) go to the matrix rule; embeddings (``nn.Embedding``/``nn.EmbeddingBag`` weights), the output
    head, biases, norm weights and every other non-matrix parameter go to the fallback elementwise rule.

    Args:
        model: the module.
        optimizer: ``"muon"`` or ``"deva_sinf"``.
        fallback: elementwise rule for the fallback group (default: the spec's fallback, AdamW for Muon with
            its ``fallback_defaults``, DeVALinf for DeVASinf).
        head: qualified module name(s) of the output head; default: the last ``nn.Linear`` whose name ends in one
            of ``lm_head``, ``head``, ``classifier``, ``fc_out``, ``output``, else the last ``nn.Linear`` of the
            model (``model.modules()`` order).
        exclude: ``exclude(name, param) -> True`` sends a parameter to the fallback group.
        matrix_hyperparams: hyperparameters written into the matrix group.
        fallback_hyperparams: hyperparameters written into the fallback group.

    Returns:
        A list of param-group dicts (``rule`` set on each; empty groups omitted) with ``param_names``.
    """
    spec = get_spec(optimizer)
    if not isinstance(spec, MatrixSpec):
        raise ValueError(f"optimizer={optimizer!r} is invalid: expected a matrix rule, one of {[s.name for s in SPECS.values() if isinstance(s, MatrixSpec)]}")
    fb = spec.fallback if fallback is None else fallback
    XPOptimizer._fallback_spec(fb, spec.title)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if head is None:
        named = [n for n, _ in linears if n.split(".")[-1] in _HEAD_NAMES]
        heads = {named[-1]} if named else ({linears[-1][0]} if linears else set())
    else:
        heads = {head} if isinstance(head, str) else set(head)
    to_fallback: set[int] = set()
    for n, m in model.named_modules():
        if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)) or n in heads:
            to_fallback.update(id(p) for p in m.parameters(recurse=False))
    mat: list[torch.Tensor] = []
    other: list[torch.Tensor] = []
    mat_names: list[str] = []
    other_names: list[str] = []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_matrix = p.ndim >= 2 and id(p) not in to_fallback and not (exclude is not None and exclude(n, p))
        (mat if is_matrix else other).append(p)
        (mat_names if is_matrix else other_names).append(n)
    groups: list[dict[str, Any]] = []
    if mat:
        groups.append({"params": mat, "param_names": mat_names, "rule": spec.name, **dict(matrix_hyperparams or {})})
    if other:
        g = {"params": other, "param_names": other_names, "rule": fb, **spec.resolve_fallback(fb)[1]}
        g.update(dict(fallback_hyperparams or {}))
        groups.append(g)
    return groups


def param_groups_for_muon(model: torch.nn.Module, **kwargs: Any) -> list[dict[str, Any]]:
    """:func:`matrix_param_groups` for Muon (the name torch users look for)."""
    return matrix_param_groups(model, "muon", **kwargs)


def minibatch_grad_variance(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    set_grad: bool = True,
    attach: bool = False,
) -> dict[torch.Tensor, torch.Tensor]:
    """Per-element variance of the mini-batch mean gradient, from per-example gradients (``torch.func``).

    ``vmap`` over ``grad`` of the per-example loss gives every example's gradient; the unbiased variance of their
    mean is ``core.moments.minibatch_variance`` (Balles & Hennig Eq. 44, unbiased form).

    Args:
        model: the module (its buffers are used as they are; no batch-norm statistics are updated).
        loss_fn: ``loss_fn(output, target) -> scalar`` for a batch (called on batches of one example).
        inputs: the batch inputs (batch axis 0, at least 2 examples).
        targets: the batch targets.
        set_grad: also set ``p.grad`` to the mini-batch mean gradient (the gradient of the mean loss).
        attach: also set ``p.grad_variance`` (read by ``step`` when no ``grad_variance=`` is passed).

    Returns:
        ``{param: variance}`` for every parameter that requires a gradient.
    """
    if inputs.shape[0] < 2:
        raise ValueError(f"inputs has batch size {inputs.shape[0]}: the unbiased mini-batch variance needs >= 2 examples")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())

    def loss_one(ps: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(model, (ps, buffers), (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0))

    detached = {n: p.detach() for n, p in params.items()}
    per_example = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(detached, inputs, targets)
    out: dict[torch.Tensor, torch.Tensor] = {}
    for n, p in params.items():
        pe = per_example[n]
        out[p] = minibatch_variance(_txp, pe, axis=0)
        if set_grad:
            p.grad = pe.mean(dim=0)
        if attach:
            setattr(p, "grad_variance", out[p])  # noqa: B010  (an attribute of the user's tensor, unknown to torch)
    return out
