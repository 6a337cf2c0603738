"""torch's ``OptimizerInfo`` entries for xpoptim's torch optimizers, built from the registry.

``torch.testing._internal.common_optimizers`` describes each torch optimizer by an ``OptimizerInfo``: the class,
a function giving the constructor arguments to try (``optim_inputs_func``), the inputs that must raise
(``optim_error_inputs_func``) and the flags it supports. The generic tests of torch's ``test/test_optim.py``
(vendored in ``test_torch_optim_generic.py``) run every entry. Here the entries are derived from each spec of
``xpoptim.adapters.torch.OPTIMIZERS``; nothing below names an optimizer:

* inputs: the defaults, a non-default ``lr``, a 1-element tensor ``lr``, ``weight_decay=0.1`` (rules that have
  it), ``maximize=True``, and every non-default value of each boolean and choice hyperparameter;
* error inputs: torch's own ``get_error_inputs_for_all_optims`` (what every torch optimizer must refuse; a
  parameter listed twice in a group, which torch.optim warns about, is refused with a ``ValueError``), one
  out-of-range value of every numeric hyperparameter (the message must name the argument and the value), a
  complex parameter (construction) and a sparse gradient (step);
* flags: no ``foreach``/``fused``/``differentiable`` implementations (each rule runs as one multi-tensor kernel;
  the flags are accepted only as ``None``/``False``), ``maximize`` is a flag older state dicts may lack;
* mini-batch rules (a spec with ``extras``) need the per-element variance of the mini-batch gradient, which
  torch's tests do not compute: their class here is a subclass whose ``step`` attaches
  ``p.grad_variance = (g / 10)^2`` (the documented attribute) once the gradients exist; the rule and its checks
  are the adapter's.

The tests that do not apply, and why, are in :data:`SKIPS` (see ``docs/reliability.md``).
"""

from __future__ import annotations

import unittest
from collections.abc import Callable
from typing import Any

import torch
from torch.nn import Parameter
from torch.testing._internal.common_optimizers import (
    DecorateInfo,
    ErrorOptimizerInput,
    OptimizerErrorEnum,
    OptimizerInfo,
    OptimizerInput,
    get_error_inputs_for_all_optims,
)

from xpoptim.adapters import torch as xt
from xpoptim.core.spec import HyperKind, MatrixSpec

# torch's test utilities call torch.backends.disable_global_flags() when imported: every later assignment to a
# cudnn/mkldnn flag in the process would raise, and the rest of the suite (the verifier's precise mode sets
# torch.backends.cudnn.allow_tf32) runs in the same process, so such assignments are allowed again.
torch.backends.disable_global_flags.__globals__["__allow_nonbracketed_mutation_flag"] = True

#: An out-of-range value for each numeric kind of hyperparameter.
_OUT_OF_RANGE = {
    HyperKind.LR: -1.0,
    HyperKind.NONNEG: -1.0,
    HyperKind.POSITIVE: 0.0,
    HyperKind.BETA: 1.5,
    HyperKind.BETA_OPEN: 0.0,
    HyperKind.BETA_OR_NEGATIVE: 1.0,
}

#: The generic tests that do not apply to some entries: (test name, reason, predicate on the spec, predicate on the
#: test's parameters or None). The reasons are listed in docs/reliability.md.
SKIPS: list[tuple[str, str, Callable[[Any], bool], Callable[[dict], bool] | None]] = [
    (
        "test_complex",
        "xpoptim refuses complex parameters with a TypeError (optimize torch.view_as_real(p) instead); "
        "torch.optim steps a complex tensor as its real view",
        lambda spec: True,
        None,
    ),
    (
        "test_complex_2d",
        "xpoptim refuses complex parameters with a TypeError (optimize torch.view_as_real(p) instead)",
        lambda spec: True,
        None,
    ),
    *(
        (
            name,
            "an explicit param group of a matrix rule must hold matrices: the test puts a 1-D bias in a group of "
            "its own without rule=, which is refused with a ValueError naming the fallback rule (torch.optim.Muon "
            "refuses 1-D parameters too); plain parameter lists are routed by dimension",
            lambda spec: isinstance(spec, MatrixSpec),
            None,
        )
        for name in ("test_param_group_with_lrscheduler_goes_right_direction", "test_param_groups_lr", "test_param_groups_weight_decay")
    ),
    (
        "test_can_load_from_to_named_state_dict",
        "a matrix rule routes a plain parameter list into a matrix group and a fallback group, so group 0 names "
        "only the matrices; the test expects every name in group 0",
        lambda spec: isinstance(spec, MatrixSpec),
        lambda kw: kw.get("is_named_optim0") or kw.get("is_named_optim1"),
    ),
    (
        "test_step_is_noop_for_zero_grads",
        "decoupled weight decay is on by default (as torch.optim.Muon's default weight_decay=0.1): a parameter "
        "decays with a zero gradient; the test lowers lr for this case only for a class named AdamW",
        lambda spec: _default(spec, "weight_decay", 0.0) != 0 and spec.title not in _TEST_LOWERS_LR_FOR,
        None,
    ),
    (
        "test_load_state_dict_post_hook",
        "the test tells whether its pre-hook ran by lr == 0.003, which is this rule's default lr",
        lambda spec: _default(spec, "lr") == 0.003,
        None,
    ),
]

#: Classes for which test_step_is_noop_for_zero_grads lowers lr to 1e-5 (by torch's class name).
_TEST_LOWERS_LR_FOR = ("AdamW",)


def _has(spec: Any, name: str) -> bool:
    return any(h.name == name for h in spec.hyperparams)


def _default(spec: Any, name: str, missing: Any = None) -> Any:
    return next((h.default for h in spec.hyperparams if h.name == name), missing)


def inputs_func(spec: Any) -> Callable[..., list[OptimizerInput]]:
    """``optim_inputs_func(device, dtype=None)`` of a spec."""

    def func(device: Any, dtype: Any = None) -> list[OptimizerInput]:
        lr = _default(spec, "lr")
        other_lr = 0.01 if lr != 0.01 else 0.003
        out = [
            OptimizerInput(params=None, kwargs={}, desc="default"),
            OptimizerInput(params=None, kwargs={"lr": other_lr}, desc="non-default lr"),
            OptimizerInput(params=None, kwargs={"lr": torch.tensor(other_lr)}, desc="Tensor lr"),
        ]
        if _has(spec, "weight_decay"):
            out.append(OptimizerInput(params=None, kwargs={"weight_decay": 0.1}, desc="nonzero weight_decay"))
            out.append(OptimizerInput(params=None, kwargs={"weight_decay": 0.1, "maximize": True}, desc="maximize, weight_decay"))
        else:
            out.append(OptimizerInput(params=None, kwargs={"maximize": True}, desc="maximize"))
        for h in spec.hyperparams:
            if h.kind is HyperKind.BOOL:
                out.append(OptimizerInput(params=None, kwargs={h.name: not h.default}, desc=f"{h.name}={not h.default}"))
            elif h.kind is HyperKind.CHOICE:
                out += [OptimizerInput(params=None, kwargs={h.name: c}, desc=f"{h.name}={c!r}") for c in h.choices if c != h.default]
        return out

    return func


def _ours_refuse_duplicates(e: ErrorOptimizerInput) -> ErrorOptimizerInput:
    """torch's input with a parameter listed twice in one group expects torch.optim's warning; xpoptim refuses it
    with a ``ValueError`` naming the positions (its step updates every parameter's memory in place, once)."""
    if e.error_type is UserWarning and "duplicate parameters" in e.error_regex:
        return ErrorOptimizerInput(e.optimizer_error_input, error_on=e.error_on, error_type=ValueError, error_regex=r"params\[1\] .* is params\[0\] again")
    return e


def error_inputs_func(spec: Any) -> Callable[..., list[ErrorOptimizerInput]]:
    """``optim_error_inputs_func(device, dtype)`` of a spec."""

    def func(device: Any, dtype: Any) -> list[ErrorOptimizerInput]:
        out = [_ours_refuse_duplicates(e) for e in get_error_inputs_for_all_optims(device, dtype)]
        param = Parameter(torch.randn(2, 2, device=device, dtype=dtype))
        for h in spec.hyperparams:
            bad = _OUT_OF_RANGE.get(h.kind)
            if bad is None:
                continue
            out.append(
                ErrorOptimizerInput(
                    OptimizerInput(params=[param], kwargs={h.name: bad}, desc=f"invalid {h.name}"),
                    error_type=ValueError,
                    error_regex=rf"{h.name}={bad!r} is invalid",
                )
            )
        out.append(
            ErrorOptimizerInput(
                OptimizerInput(params=[torch.randn(2, 2, dtype=torch.complex64, device=device)], kwargs={}, desc="complex param"),
                error_type=TypeError,
                error_regex="complex",
            )
        )
        sparse = Parameter(torch.randn(2, 2, device=device, dtype=dtype))
        sparse.grad = torch.randn(2, 2, device=device, dtype=dtype).to_sparse()
        out.append(
            ErrorOptimizerInput(
                OptimizerInput(params=[sparse], kwargs={}, desc="sparse grad"),
                error_on=OptimizerErrorEnum.STEP_ERROR,
                error_type=ValueError,
                error_regex="sparse gradients are not supported",
            )
        )
        return out

    return func


def _attach_variance(optimizer: torch.optim.Optimizer) -> None:
    """``p.grad_variance = (g / 10)^2`` for every parameter with a dense gradient."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None and p.grad.layout == torch.strided:
                p.grad_variance = (p.grad / 10).square()


def optimizer_class(cls: type) -> type:
    """The class under test: ``cls`` itself, or for a rule that needs ``grad_variance`` a subclass (same name)
    whose ``step`` attaches it after the closure (if any) has made the gradients, then runs ``cls.step``."""
    if not getattr(cls.spec, "extras", ()):
        return cls
    # torch wraps a class's step once with its hook runner (marked ``hooked``); call the step under it, so that
    # the hooks run once, around this step.
    base_step = cls.step.__wrapped__ if getattr(cls.step, "hooked", False) else cls.step

    def step(self: Any, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
        if closure is None:
            _attach_variance(self)
            return base_step(self, None, **kwargs)

        def closure_with_variance() -> Any:
            loss = closure()
            _attach_variance(self)
            return loss

        return base_step(self, closure_with_variance, **kwargs)

    return type(cls.__name__, (cls,), {"step": step, "__module__": __name__, "__qualname__": cls.__name__})


def _skips(spec: Any) -> tuple[DecorateInfo, ...]:
    return tuple(
        DecorateInfo(unittest.skip(reason), "TestOptimRenewed", name, active_if=params if params is not None else True)
        for name, reason, applies, params in SKIPS
        if applies(spec)
    )


def optimizer_info(cls: type) -> OptimizerInfo:
    """The ``OptimizerInfo`` of one xpoptim torch class."""
    spec = cls.spec
    return OptimizerInfo(
        optimizer_class(cls),
        optim_inputs_func=inputs_func(spec),
        optim_error_inputs_func=error_inputs_func(spec),
        supported_impls=(),
        not_og_supported_flags=("maximize",),
        supports_complex=True,  # generated, then skipped with the reason in SKIPS
        skips=_skips(spec),
    )


#: One entry per xpoptim torch optimizer, in registry order.
xpoptim_optim_db: list[OptimizerInfo] = [optimizer_info(cls) for cls in xt.OPTIMIZERS.values()]
