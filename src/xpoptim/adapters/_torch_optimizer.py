"""The torch adapter's optimizer class, :class:`XPOptimizer`: any xpoptim rule as a ``torch.optim.Optimizer``.

Private module: import it from ``xpoptim.adapters.torch``. See that module's docstring for the conventions.
"""

from __future__ import annotations

import operator
import sys
from collections.abc import Callable, Mapping, Sequence
from itertools import repeat
from typing import TYPE_CHECKING, Any

import torch
from torch.optim import Optimizer
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from xpoptim.core import ELEMENTWISE, SPECS, get_spec
from xpoptim.core.spec import ElementwiseSpec, MatrixSpec

from . import _torch_engine as _eng
from . import _torch_gemm
from ._torch_state import ParamStates, build_loaded, expected_state
from ._torch_hparams import (
    OPTION_DEFAULTS,
    OPTION_KEYS,
    check_options,
    group_keys,
    hp_from_group,
    normalize_betas,
    to_group_form,
)

if TYPE_CHECKING:
    from xpoptim.portable import PortableState

__all__ = ["XPOptimizer"]

_GRAD = operator.attrgetter("grad")
_SHAPE = operator.attrgetter("shape")
_DTYPE = operator.attrgetter("dtype")
_DEVICE = operator.attrgetter("device")
_LAYOUT = operator.attrgetter("layout")
_is = operator.is_
_TORCH_FLAGS = ("foreach", "fused", "capturable", "differentiable")

Spec = ElementwiseSpec | MatrixSpec


_SIXTEEN_BIT = {torch.bfloat16: torch.float32, torch.float16: torch.float32}


def _recast_state(params: Sequence[Any], sts: list, names: Sequence[str], sdt_opt: Any, new_state: dict) -> None:
    """State whose dtype is not the policy's (``state_dtype`` changed between steps) is cast, in a new state dict
    kept aside in ``new_state`` (swapped in with the step's other writes; ``sts`` points at it)."""
    dts = list(map(_DTYPE, params))
    want = [sdt_opt] * len(dts) if sdt_opt is not None else [_SIXTEEN_BIT.get(d, d) for d in dts]
    for name in names:
        col = [st.get(name) for st in sts]
        got = [t.dtype if isinstance(t, torch.Tensor) else w for t, w in zip(col, want)]
        if got == want:
            continue
        for i, (t, w) in enumerate(zip(col, want)):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != w:
                if params[i] not in new_state:
                    new_state[params[i]] = sts[i] = dict(sts[i])
                sts[i][name] = t.to(w)


def _base(name: str) -> Callable:
    """torch.optim.Optimizer's method ``name``. torch wraps ``add_param_group``, ``zero_grad``, ``state_dict`` and
    ``load_state_dict`` in ``torch._disable_dynamo``, which imports dynamo (seconds) on the first call; while dynamo
    is not loaded nothing can be tracing, so the undecorated method is called (the same code)."""
    fn = getattr(Optimizer, name)
    if "torch._dynamo" in sys.modules:
        return fn
    return getattr(fn, "__wrapped__", fn)


#: ``fn -> dynamo.disable(fn)``, made once per function (building the wrapper costs more than the step of a small
#: model).
_OUTSIDE_GRAPHS: dict[Callable, Callable] = {}


def _outside_graphs(fn: Callable) -> Callable:
    """``fn`` excluded from ``torch.compile`` graphs when dynamo is loaded (a compiled training step that calls
    ``opt.step()`` runs the step eagerly, as torch.optim's does); when dynamo was never imported nothing can be
    tracing, and it is not imported here (importing it costs seconds). ``fn`` is a plain function (not a bound
    method, which is a new object at every attribute access): its wrapper is made once and kept."""
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is None:
        return fn
    wrapped = _OUTSIDE_GRAPHS.get(fn)
    if wrapped is None:
        wrapped = _OUTSIDE_GRAPHS[fn] = dynamo.disable(fn, recursive=True)
    return wrapped


def _refuse_duplicates(params: list, where: str) -> None:
    """A parameter may appear once in a param group. torch.optim warns and steps such a parameter once per
    occurrence (announcing an error for the future); one multi-tensor step that updates every parameter's memory in
    place would update it twice from the same state, split over threads at the same time. Entries may be tensors or
    ``(name, tensor)`` pairs."""
    first: dict[int, int] = {}
    for i, item in enumerate(params):
        p = item[1] if isinstance(item, tuple) and len(item) == 2 else item
        j = first.setdefault(id(p), i)
        if j != i:
            shape = tuple(p.shape) if isinstance(p, torch.Tensor) else None
            raise ValueError(
                f"{where}: params[{i}] (shape {shape}) is params[{j}] again: a parameter may appear once in a param "
                "group (torch.optim warns that duplicates will become an error)"
            )


class XPOptimizer(Optimizer):
    """Any xpoptim rule as a :class:`torch.optim.Optimizer`.

    ``XPOptimizer(params, rule, **hyperparams)`` with ``rule`` a registry name (``"adamw"``), a title
    (``"AdamW"``) or a spec object; the per-rule classes (``AdamW``, ``Muon``, ...) are subclasses with an explicit
    signature that call ``super().__init__(params, "<name>", ...)``. This constructor interface is stable: a class
    generated for another rule subclasses it the same way.

    Args:
        params: tensors, param-group dicts or ``(name, tensor)`` pairs.
        rule: the rule (registry name, title or spec).
        lr: learning rate (a number or a 1-element tensor); omitted: the spec's default. ``None`` is refused.
        maximize: ascend instead of descend.
        state_dtype: dtype of floating state (default: float32 for bf16/fp16 parameters, else the parameter's).
        compile: ``True`` runs the elementwise step under ``torch.compile`` (opt-in: the first step waits for the
            compiler); ``False`` (default) runs the compiled C loop on CPU and torch's multi-tensor ops elsewhere.
        fallback: matrix rules only: the elementwise rule for non-matrix parameters (default: the spec's).
        fallback_hyperparams: matrix rules only: hyperparameters of the fallback rule.
        **hyperparams: the rule's hyperparameters (spec names; ``betas=(beta1, beta2)`` or ``beta1=``/``beta2=``).
    """

    spec: Spec

    def __init__(
        self,
        params: Any,
        rule: str | Spec | None = None,
        *,
        maximize: bool = False,
        state_dtype: torch.dtype | None = None,
        compile: bool = False,
        fallback: str | None = None,
        fallback_hyperparams: Mapping[str, Any] | None = None,
        **hyperparams: Any,
    ) -> None:
        spec = self._resolve_spec(rule)
        self.__dict__["spec"] = spec
        where = spec.title
        if isinstance(params, torch.Tensor):
            raise TypeError(
                f"{where}: params argument given to the optimizer should be an iterable of Tensors or dicts, but got "
                f"a {type(params).__name__}"
            )
        hp_in = {k: v for k, v in hyperparams.items() if not (k in ("beta1", "beta2", "betas") and v is None)}
        for flag in _TORCH_FLAGS:
            if flag in hp_in:
                value = hp_in.pop(flag)
                if value not in (None, False):
                    raise TypeError(
                        f"{where}: {flag}={value!r} is not supported: xpoptim runs each rule as one multi-tensor "
                        "kernel already (compile=True for torch.compile); foreach/fused/capturable/differentiable "
                        "accept only None or False"
                    )
        if "lr" in hp_in and hp_in["lr"] is None:
            raise ValueError(f"{where}: lr=None is invalid: expected a real number >= 0 or a 1-element tensor")
        normalize_betas(spec, hp_in, where)
        known = set(group_keys(spec))
        unknown = sorted(set(hp_in) - known)
        if unknown:
            allowed = sorted(known | {"beta1", "beta2"} if "betas" in known else known)
            raise TypeError(f"{where}: unknown hyperparameter(s) {unknown}; expected a subset of {allowed}")
        defaults = {**to_group_form(spec, spec.defaults), **hp_in}
        defaults.update(maximize=maximize, state_dtype=state_dtype, compile=compile, rule=spec.name)
        if isinstance(spec, MatrixSpec):
            fb_name = spec.fallback if fallback is None else fallback
            self._fallback_spec(fb_name, where)
            fb, fb_hp = spec.resolve_fallback(fb_name)
            fb_hp.update(fallback_hyperparams or {})
            normalize_betas(fb, fb_hp, f"{where} fallback {fb.title}")
            fb_full = {**to_group_form(fb, fb.defaults), **fb_hp}
            hp_from_group(fb, fb_full, f"{where} fallback {fb.title}")
            if "lr" not in fb_hp:  # the fallback's lr follows the optimizer's (see MatrixSpec.fallback_defaults)
                del fb_full["lr"]
            defaults["fallback"] = (fb.name, fb_full)  # kept in defaults (pickled), popped from the groups
        elif fallback is not None or fallback_hyperparams is not None:
            raise TypeError(f"{where}: fallback= and fallback_hyperparams= only apply to the matrix rules")
        hp_from_group(spec, defaults, where)
        check_options(defaults, where)
        params = list(params)
        if isinstance(spec, MatrixSpec) and params and not isinstance(params[0], dict):
            self.__dict__["_xp_pending_fallback"] = defaults["fallback"]
            params = self._route_by_ndim(params, where)
        super().__init__(params, defaults)
        self.state = ParamStates(dict, self.state)
        _torch_gemm.install()

    @staticmethod
    def _resolve_spec(rule: Any) -> Spec:
        if isinstance(rule, (ElementwiseSpec, MatrixSpec)):
            return rule
        if rule is None:
            raise TypeError("XPOptimizer(params, rule, ...): give the rule (e.g. 'adamw'), or use a subclass such as AdamW")
        return get_spec(rule)

    # -- groups --------------------------------------------------------------------------------------------------

    @staticmethod
    def _fallback_spec(name: str, where: str, arg: str = "fallback", own: str | None = None) -> ElementwiseSpec:
        spec = SPECS.get(name) if name in ELEMENTWISE else None
        if not isinstance(spec, ElementwiseSpec) or spec.extras:
            allowed = [n for n, s in SPECS.items() if n in ELEMENTWISE and isinstance(s, ElementwiseSpec) and not s.extras]
            if own is None:
                raise ValueError(f"{where}: {arg}={name!r} is invalid: expected one of {allowed}")
            raise ValueError(
                f"{where}: a param group with {arg}={name!r} is invalid: expected {own!r} (the matrix rule) or an "
                f"elementwise fallback rule, one of {allowed} (matrix_param_groups(model, {own!r}) builds such groups)"
            )
        return spec

    def _fallback(self) -> tuple[str, dict]:
        """(rule name, group-form hyperparameters) of the fallback rule of a matrix optimizer."""
        fb = self.__dict__.get("defaults", {}).get("fallback")
        if fb is None:
            fb = self.__dict__.get("_xp_pending_fallback", (getattr(self.spec, "fallback", None), {}))
        return fb

    def _route_by_ndim(self, params: list, where: str) -> list:
        kinds = {isinstance(item, tuple) for item in params}
        if len(kinds) > 1:
            raise ValueError(
                f"{where}: all optimizer params should be with/without names. Some param names are missing: params "
                "mixes (name, tensor) pairs and bare tensors; give all parameters named or none"
            )
        named = kinds == {True}
        mat: list[torch.Tensor | tuple[str, torch.Tensor]] = []
        other: list[torch.Tensor | tuple[str, torch.Tensor]] = []
        for item in params:
            p = item[1] if named else item
            (mat if isinstance(p, torch.Tensor) and p.ndim >= 2 else other).append(item)
        groups: list[dict[str, Any]] = []
        if mat:
            groups.append({"params": mat})
        if other:
            groups.append({"params": other, "rule": self._fallback()[0]})
        return groups

    def _group_spec(self, group: Mapping[str, Any], where: str) -> Spec:
        rule = group.get("rule", self.spec.name)
        if rule == self.spec.name:
            return self.spec
        if isinstance(self.spec, MatrixSpec) and rule in ELEMENTWISE:
            return SPECS[rule]
        raise ValueError(f"{where}: a param group has rule={rule!r}; this optimizer runs rule={self.spec.name!r}")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (torch semantics), validating its hyperparameters and its parameters.

        Groups of a matrix rule may set ``rule`` to an elementwise rule name (the fallback); they are filled with
        the fallback's hyperparameters instead of the matrix rule's.
        """
        spec = self.spec
        where = spec.title
        if not isinstance(param_group, dict):
            raise TypeError(f"{where}: a param group must be a dict, got {type(param_group).__name__}")
        group = dict(param_group)
        rule = group.get("rule", spec.name)
        if isinstance(spec, ElementwiseSpec):
            if rule != spec.name:
                raise ValueError(f"{where}: rule={rule!r} is invalid: this optimizer only runs rule={spec.name!r}")
            gspec: Spec = spec
        elif rule == spec.name:
            gspec = spec
        else:
            gspec = self._fallback_spec(rule, where, "rule", spec.name)
            fb_name, fb_full = self._fallback()
            base = fb_full if fb_name == rule else {k: v for k, v in to_group_form(gspec, gspec.defaults).items() if k != "lr"}
            normalize_betas(gspec, group, where)
            for k, v in base.items():
                group.setdefault(k, v)
        normalize_betas(gspec, group, where)
        if group.get("lr", 0.0) is None:
            raise ValueError(f"{where}: lr=None is invalid: expected a real number >= 0 or a 1-element tensor")
        allowed = set(group_keys(gspec)) | set(OPTION_KEYS) | {"params", "rule", "param_names", "initial_lr"}
        if gspec is spec:
            allowed |= set(self.defaults)
        extra = sorted(set(group) - allowed - set(self.defaults))
        if extra:
            raise TypeError(f"{where}: unknown key(s) {extra} in a param group for rule {rule!r}")
        params = group.get("params")
        if isinstance(params, torch.Tensor):
            group["params"] = [params]
        elif params is not None and not isinstance(params, set):  # a set is refused by torch's add_param_group
            group["params"] = list(params)
            _refuse_duplicates(group["params"], where)
        n_before = len(self.param_groups)
        _base("add_param_group")(self, group)
        self.param_groups[-1].pop("fallback", None)
        if gspec is not spec:  # drop the matrix rule's keys the base class filled into a fallback group
            g = self.param_groups[-1]
            for k in group_keys(spec):
                if k not in group_keys(gspec) and k not in param_group:
                    g.pop(k, None)
        try:
            g = self.param_groups[-1]
            hp_from_group(gspec, g, where)
            check_options(g, where)
            for p in g["params"]:
                self._check_param(p, gspec, where)
        except Exception:
            del self.param_groups[n_before:]
            raise

    def _check_param(self, p: torch.Tensor, gspec: Spec, where: str) -> None:
        if is_traceable_wrapper_subclass(p) and not _eng.is_sharded(p):
            raise TypeError(
                f"{where}: parameters that are tensor subclasses are not supported (got a {type(p).__name__} of "
                f"shape {tuple(p.shape)}): only plain tensors and DTensor"
            )
        if p.is_complex():
            raise TypeError(
                f"{where}: complex parameters are not supported (got dtype {p.dtype}); optimize "
                "torch.view_as_real(p) (real and imaginary parts as independent reals) instead"
            )
        if not p.is_floating_point():
            raise TypeError(f"{where}: parameters must be floating point, got dtype {p.dtype}")
        if isinstance(gspec, MatrixSpec) and p.ndim < 2:
            raise ValueError(
                f"{where}: a parameter of shape {tuple(p.shape)} is in a group with rule={gspec.name!r}, which "
                f"needs matrices (ndim >= 2); route it to the fallback rule (rule={self._fallback()[0]!r}) or use "
                "matrix_param_groups(model)"
            )

    def __getstate__(self) -> dict[str, Any]:
        """torch.optim's (``defaults``, ``state``, ``param_groups``) plus the public ``spec`` (a registered spec by
        name), so that ``copy.deepcopy`` and pickling keep every public attribute."""
        state = super().__getstate__()
        spec = self.spec
        state["spec"] = spec.name if SPECS.get(spec.name) is spec else spec
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state.get("spec"), str):
            state = {**state, "spec": SPECS[state["spec"]]}
        if "state" in state and not isinstance(state["state"], ParamStates):  # torch.optim's, or an older pickle's
            state = {**state, "state": ParamStates(dict, state["state"])}
        super().__setstate__(state)
        self.__dict__["_xp_fast"] = {}
        if "spec" not in type(self).__dict__:
            self.__dict__["spec"] = get_spec(self.defaults["rule"])
        for g in self.param_groups:  # groups of an older release lack newer options: torch's defaults
            for k, v in OPTION_DEFAULTS.items():
                g.setdefault(k, v)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients (torch.optim's ``zero_grad``): ``None`` by default, else zeroed in place."""
        _base("zero_grad")(self, set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The state dict (torch.optim's format: ``state`` by parameter index, ``param_groups``)."""
        return _base("state_dict")(self)

    # -- step ----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, grad_variance: Mapping[torch.Tensor, torch.Tensor] | None = None) -> Any:
        """Take one optimization step; a step that raises leaves parameters and state as they were.

        Args:
            closure: re-evaluates the model and returns the loss (run with gradients enabled).
            grad_variance: for the mini-batch rules: ``{param: variance}`` with the per-element variance of the
                mini-batch gradient (see ``minibatch_grad_variance``); a parameter's ``grad_variance`` attribute is
                used when absent.

        Returns:
            The closure's loss, or ``None``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        _outside_graphs(type(self)._xp_step)(self, grad_variance)
        return loss

    def _xp_step(self, grad_variance: Mapping[torch.Tensor, torch.Tensor] | None) -> None:
        where = self.spec.title
        state = self.state
        fast = self.__dict__.setdefault("_xp_fast", {})
        # Phase 1: validate every group, gradient, state entry and option; nothing is written.
        plans = []
        ready: list[Callable[[], None]] = []  # steady-state groups, checked in bulk (see _torch_engine.FastGroup)
        for group in self.param_groups:
            gspec = self._group_spec(group, where)
            hp = hp_from_group(gspec, group, where)
            check_options(group, where)
            params = group["params"]
            grads = list(map(_GRAD, params))
            if not all(map(operator.is_not, grads, repeat(None))):
                pairs = [(p, g) for p, g in zip(params, grads) if g is not None]
                params, grads = [p for p, _ in pairs], [g for _, g in pairs]
            if not params:
                continue
            sdt_fg = fast.get(id(group))
            if sdt_fg is not None and sdt_fg[0] == group["state_dtype"] and not group["compile"] and isinstance(gspec, ElementwiseSpec):
                run = _eng.fast_plan(sdt_fg[1], gspec, hp, group["maximize"], params, grads, state)
                if run is not None:
                    ready.append(run)
                    continue
            self._check_grads(params, grads, where)
            extras = [self._extra_for(gspec, p, grad_variance) for p in params] if isinstance(gspec, ElementwiseSpec) and gspec.extras else []
            plans.append((group, gspec, hp, list(params), grads, extras))
        # Phase 2: compute every matrix-rule update (may raise: nothing has been written yet).
        writes: list[Callable[[], None]] = []
        new_state: dict = {}
        elementwise = []
        for group, gspec, hp, params, grads, extras in plans:
            if isinstance(gspec, MatrixSpec):
                writes += self._matrix_writes(group, gspec, hp, params, grads, new_state, where)
            else:
                elementwise.append(self._elementwise_plan(group, gspec, hp, params, grads, extras, new_state, where))
        # Phase 3: write. New state entries first (the elementwise kernels write into them), then the kernels,
        # then the matrix updates computed above.
        if new_state:
            state.update(new_state)
        for run in ready:
            run()
        for run in elementwise:
            run()
        for w in writes:
            w()
        # Groups that passed the full checks: remember their tensors, so the next step can check them in bulk.
        for group, gspec, hp, params, _grads, _extras in plans:
            if isinstance(gspec, ElementwiseSpec) and not group["compile"]:
                fg = _eng.fast_group(gspec, hp, group["maximize"], params, state)
                if fg is None:
                    fast.pop(id(group), None)
                else:
                    fast[id(group)] = (group["state_dtype"], fg)

    def _check_grads(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], where: str) -> None:
        """Gradients must be dense tensors of their parameters' shape, dtype and device (checked in bulk; the
        loop that names the culprit runs only when something is off); DTensor parameters need DTensor gradients."""
        ok = (
            all(map(_is, map(_LAYOUT, grads), repeat(torch.strided)))
            and list(map(_SHAPE, grads)) == list(map(_SHAPE, params))
            and list(map(_DTYPE, grads)) == list(map(_DTYPE, params))
            and list(map(_DEVICE, grads)) == list(map(_DEVICE, params))
        )
        if ok:
            return
        for p, g in zip(params, grads):
            if g.layout != torch.strided:
                raise ValueError(f"{where}: sparse gradients are not supported (param of shape {tuple(p.shape)})")
            if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
                raise ValueError(
                    f"{where}: grad of shape {tuple(g.shape)}, dtype {g.dtype}, device {g.device} does not "
                    f"match its parameter (shape {tuple(p.shape)}, dtype {p.dtype}, device {p.device})"
                )

    def _elementwise_plan(self, group, gspec, hp, params, grads, extras, new_state, where) -> Callable[[], None]:
        """Check the state of an elementwise group (new state for parameters without any, made aside) and return
        the step, not yet run."""
        names = gspec.state
        sdt_opt = group["state_dtype"]
        sts: list[dict[str, Any]] = [self.state.get(p) or {} for p in params]  # an empty dict: new state below
        sharded = [i for i, p in enumerate(params) if _eng.is_sharded(p)] if _eng.dtensor_loaded() else []
        for i, st in enumerate(sts):
            if not st:
                p = params[i]
                sdt = _eng.state_dtype_for(p, sdt_opt)
                st = _eng.sharded_state_init(names, p, sdt) if i in sharded else _eng.new_elementwise_state(gspec, p, sdt)
                new_state[p] = sts[i] = st
        for i in sharded:
            self._check_sharded(params[i], grads[i], extras[i] if extras else None, sts[i], set(names), where)
        _recast_state(params, sts, names, sdt_opt, new_state)
        plain = [i for i in range(len(params)) if i not in set(sharded)] if sharded else None
        try:
            columns = [list(map(operator.itemgetter(n), sts)) for n in names]
            steps = list(map(operator.itemgetter("step"), sts))
        except KeyError as exc:
            raise ValueError(f"{where}: a parameter's state lacks {exc.args[0]!r} (expected {list(names)} and 'step')") from None
        if sharded:
            local = _eng.local
            ps = [local(p) for p in params]
            gs = [local(g) for g in grads]
            xs = [[local(x) for x in extras]] if extras else []
            cols = [[local(t) for t in c] for c in columns]
        else:
            ps, gs, xs, cols = params, grads, ([extras] if extras else []), columns
        self._check_state(params, ps, cols, steps, names, group, plain, where)
        maximize, compile_opt = group["maximize"], group["compile"]

        def run() -> None:
            _eng.elementwise_step(gspec, hp, maximize, compile_opt, ps, gs, xs, cols, steps)

        return run

    def _check_state(self, params, ps, cols, steps, names, group, plain, where) -> None:
        shapes = list(map(_SHAPE, ps))
        devices = list(map(_DEVICE, ps))
        for name, col in zip(names, cols):
            if (
                list(map(_SHAPE, col)) == shapes
                and list(map(_DEVICE, col)) == devices
                and all(map(torch.Tensor.is_floating_point, col))
            ):
                continue
            for p, t in zip(params, col):
                if not isinstance(t, torch.Tensor) or t.shape != _eng.local(p).shape or t.device != _eng.local(p).device or not t.is_floating_point():
                    desc = f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
                    raise ValueError(
                        f"{where}: state {name!r} ({desc}) does not fit its parameter (shape {tuple(p.shape)}, "
                        f"device {p.device}): expected a floating tensor of the parameter's shape and device"
                    )
        if not all(isinstance(s, torch.Tensor) and s.numel() == 1 and not s.is_complex() for s in steps):
            raise ValueError(f"{where}: a parameter's 'step' is not a 1-element real tensor")

    def _matrix_writes(self, group, gspec, hp, params, grads, new_state, where) -> list[Callable[[], None]]:
        """Compute a matrix group's step (new state made aside); return its writes. Zero-size matrices have nothing
        to update: they are skipped (no state, no step count), as parameters without a gradient are."""
        sdt_opt, maximize = group["state_dtype"], group["maximize"]
        plain_p, plain_g, plain_s = [], [], []
        writes = []
        for p, g in zip(params, grads):
            if p.numel() == 0:
                continue
            st = self.state.get(p)
            sdt = _eng.state_dtype_for(p, sdt_opt)
            if _eng.is_sharded(p):
                if not st:
                    st = new_state[p] = _eng.sharded_matrix_state_init(gspec, p, hp, sdt)
                own = {k for k, shape in expected_state(gspec, p, hp).items() if shape == tuple(p.shape)}
                self._check_sharded(p, g, None, st, own, where)
                writes.append(_eng.sharded_matrix_plan(gspec, hp, maximize, p, g, st))
                continue
            if not st:
                st = new_state[p] = _eng.matrix_state_init(gspec, p, hp, sdt)
            else:
                sts = [st]
                _recast_state([p], sts, [k for k, v in st.items() if isinstance(v, torch.Tensor) and k != "step"], sdt_opt, new_state)
                st = sts[0]
            plain_p.append(p)
            plain_g.append(g)
            plain_s.append(st)
        if plain_p:
            writes += _eng.matrix_plan(gspec, hp, maximize, plain_p, plain_g, plain_s)
        return writes

    def _extra_for(self, gspec: ElementwiseSpec, p: torch.Tensor, grad_variance: Any) -> torch.Tensor:
        v = None
        if grad_variance is not None:
            if not isinstance(grad_variance, Mapping):
                raise TypeError(f"{gspec.title}: grad_variance must be a mapping {{param: tensor}}, got {type(grad_variance).__name__}")
            v = grad_variance.get(p)
        if v is None:
            v = getattr(p, "grad_variance", None)
        if v is None:
            raise ValueError(
                f"{gspec.title}: no grad_variance for a parameter of shape {tuple(p.shape)}: pass "
                "step(grad_variance={param: tensor}) or set param.grad_variance (see minibatch_grad_variance)"
            )
        if not isinstance(v, torch.Tensor) or v.shape != p.shape or v.device != p.device or not v.is_floating_point():
            desc = f"shape {tuple(v.shape)}, device {v.device}" if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"{gspec.title}: grad_variance ({desc}) does not match its parameter (shape {tuple(p.shape)}, device {p.device})")
        local = _eng.local(v)
        if local.numel() and not bool((local >= 0).all()):
            bad = local[~(local >= 0)].reshape(-1)[0].item()
            raise ValueError(
                f"{gspec.title}: grad_variance of a parameter of shape {tuple(p.shape)} holds {bad!r}: expected a "
                "per-element variance >= 0 (not NaN), e.g. from minibatch_grad_variance"
            )
        return v

    def _check_sharded(self, p: Any, g: Any, extra: Any, st: Mapping[str, Any], own: set, where: str) -> None:
        """A DTensor parameter's gradient (and ``grad_variance``) must be DTensors with its placements and local
        shape (what FSDP2's reduce-scatter produces); its state DTensors: sharded like it for the names in ``own``
        (state of the parameter's shape), replicated otherwise (a matrix rule's factors)."""
        local_shape = tuple(p.to_local().shape)
        for what, x in (("grad", g), ("grad_variance", extra)):
            if x is None and what == "grad_variance":
                continue
            if not _eng.is_sharded(x) or x.placements != p.placements or tuple(x.to_local().shape) != local_shape:
                desc = f"DTensor with placements {x.placements}, local shape {tuple(x.to_local().shape)}" if _eng.is_sharded(x) else type(x).__name__
                raise ValueError(
                    f"{where}: the {what} of a DTensor parameter (shape {tuple(p.shape)}, placements {p.placements}, "
                    f"local shape {local_shape}) must be a DTensor with the same placements and local shape, got a {desc}"
                )
        for name, v in st.items():
            if name in ("step", "state_version") or v is None:
                continue
            if not _eng.is_sharded(v):
                raise ValueError(
                    f"{where}: state {name!r} of a DTensor parameter (shape {tuple(p.shape)}) is a "
                    f"{type(v).__name__}, not a DTensor: load sharded state (torch.distributed.checkpoint, or a state "
                    "dict saved from the same sharding)"
                )
            if name in own:
                if v.placements != p.placements or tuple(v.to_local().shape) != local_shape:
                    raise ValueError(
                        f"{where}: state {name!r} of a DTensor parameter (placements {p.placements}, local shape "
                        f"{local_shape}) has placements {v.placements} and local shape {tuple(v.to_local().shape)}: it "
                        "was saved under another sharding (reshard it with torch.distributed.checkpoint)"
                    )
            elif any(not pl.is_replicate() for pl in v.placements):
                raise ValueError(
                    f"{where}: state {name!r} of a DTensor parameter (shape {tuple(p.shape)}) has placements "
                    f"{v.placements}: state of another shape than the parameter is kept whole, replicated on every rank"
                )

    # -- state dict ----------------------------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict` (torch semantics); all of it is checked and built aside first,
        and swapped in only when valid (a refused dict leaves the optimizer unchanged).

        Refused with a ``ValueError``: a state dict of another optimizer or rule, of another state version, with
        state of the wrong names or shapes, a ``step`` that is not a whole number >= 0, non-floating state, or a
        group lacking ``state_dtype``. Groups of an older release without ``maximize`` or ``compile`` get their
        defaults (as torch does). Floating state is cast to the state-dtype policy (float32 for bf16/fp16
        parameters unless ``state_dtype`` says otherwise) and moved to the parameter's device.
        """
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        groups, new_state = build_loaded(self, state_dict)
        self.__setstate__({"state": new_state, "param_groups": groups})
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    # -- portable state (xpoptim.portable) ----------------------------------------------------------------------

    def export_state(self, names: Any = None) -> PortableState:
        """The framework-neutral state (:class:`xpoptim.portable.PortableState`); see :mod:`xpoptim.portable`.

        Args:
            names: parameter names in param-group order, or ``model.named_parameters()``; default: the groups'
                ``param_names``, else the positions ``"0"``, ``"1"``, ...
        """
        from xpoptim.portable.torch_state import export_torch  # noqa: PLC0415

        return export_torch(self, names)

    def import_state(self, portable: PortableState, names: Any = None) -> None:
        """Load a :class:`xpoptim.portable.PortableState` (names as for :meth:`export_state`); hyperparameters are kept."""
        from xpoptim.portable.torch_state import import_torch  # noqa: PLC0415

        import_torch(self, portable, names)

