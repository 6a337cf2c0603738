"""torch adapter: every xpoptim optimizer as a real :class:`torch.optim.Optimizer`.

One generic base class, :class:`XPOptimizer`, and one subclass per core spec, named by the spec's title
(``Adam``, ``AdamW``, ``AdaBelief``, ``LaProp``, ``MVNGrad``, ``SGD``, ``MSSD``, ``SVAG``, ``MSVAG``, ``AdamStar``,
``MSVAGMB``, ``AdamStarMB``, ``DeVALinf``, ``DeVASinf``, ``Muon``), plus :func:`create`. The adapter holds no
math: the elementwise kernel comes from ``xpoptim.core.make_step_kernel``, the step-derived scalars from
``xpoptim.core.step_scalars`` (float64 on the host, never in a 16-bit dtype), the matrix rules from
``xpoptim.core.muon`` / ``xpoptim.core.deva``.

Conventions of this adapter (the torch ones):

* Constructor ``Cls(params, lr=..., *, <hyperparameters>, maximize=False, state_dtype=None, compile="auto")``;
  ``params`` as tensors, param-group dicts or ``(name, tensor)`` pairs. Hyperparameter names are the spec's;
  optimizers with ``beta1`` and ``beta2`` keep them in the groups as torch's ``betas=(beta1, beta2)`` tuple (so
  ``OneCycleLR``/``CyclicLR`` momentum cycling works) and accept ``beta1=``/``beta2=`` too. Every hyperparameter
  is re-read from ``group[...]`` at every step (LR schedulers work; ``lr`` may be a 1-element tensor).
* State: ``self.state[p]`` holds the spec's named state tensors, ``step`` (a float32 CPU tensor, as in torch) and
  ``state_version`` (``core.STATE_VERSION``). Each group carries ``rule`` (the spec name that serves it).
  ``load_state_dict`` refuses another optimizer's, another version's or wrongly shaped state with a clear
  ``ValueError`` and leaves the optimizer unchanged; floating state is cast to the state-dtype policy (float32
  for bf16/fp16 parameters unless ``state_dtype`` says otherwise) and to the parameter's device.
* Speed: within a group, parameters with gradients are laid out in flat buffers per (device, dtype, state dtype,
  step count): **each parameter's ``.data`` becomes a view into the flat buffer** and so does each state tensor, and
  the rule runs once per buffer. A view keeps its parameter's strides when they are dense (``channels_last`` conv
  weights, transposed weights: ``memory_format`` is preserved for the parameter, its gradient view and its
  elementwise state, as ``torch.optim`` does); parameters with gaps or overlaps in memory become row-major.
  Gradients are gathered into a flat gradient buffer and ``p.grad`` is re-pointed to its view, so later backward
  passes accumulate in place while the grads are kept (``zero_grad(set_to_none=False)``); with the default
  ``set_to_none=True`` each step pays one gather pass (a bucket of a single row-major parameter reads its gradient
  directly and never gathers), and after two such steps in a row ``p.grad`` is left as the tensor backward made
  (re-pointed again every 64 steps, so a switch to ``set_to_none=False`` regains the no-gather path). Re-pointing
  ``p.data`` or ``p.grad.data`` elsewhere (``Module._apply``, ``model.double()``) is detected: per-tensor pointer
  checks run whenever the number of tensors sharing a flat buffer's storage has changed since the last step (an
  unchanged count skips them; it can only miss a re-pointing if exactly as many new aliases of that storage appeared
  in the same interval). Holding on to an old ``p.data`` across a re-layout (the set of parameters with gradients
  changed, or ``load_state_dict``) leaves you with a stale copy; ``p`` itself always holds the current values.
  ``compile=True`` runs the kernel under ``torch.compile`` (one fused kernel, scalars passed as 0-D tensors so LR
  changes never recompile); ``False`` runs it eagerly (in cache-sized chunks on CPU); ``"auto"`` compiles buckets of
  at least 2**20 elements and falls back to eager, with a warning, if the compiler fails.
* Complex parameters are **refused** with a ``TypeError`` (use ``torch.view_as_real`` on your side); sparse
  gradients are refused with a ``ValueError``.
* DTensor parameters (FSDP2 ``fully_shard``, tensor parallelism) work with the elementwise rules: an elementwise
  rule needs no communication, so each rank steps its local shard, in place (FSDP2 all-gathers the next forward's
  weights from that memory, so these parameters never move into a flat buffer), shard by shard (``compile``
  applies per shard); the state is DTensors with the parameter's placements, as torch.optim's. Gradients (and ``grad_variance``) must be
  DTensors with the parameter's placements and local shape. Muon keeps its momentum sharded and all-gathers only
  the Newton-Schulz input (every rank orthogonalizes the whole matrix and keeps its shard of the result).
  DeVASinf needs whole matrices for its Kronecker factors: it all-gathers the parameter and gradient, runs the
  whole step on every rank with replicated state (``Replicate`` DTensors), and each rank keeps its shard. Other
  tensor subclasses are refused with a ``TypeError``.
* Muon / DeVASinf: one instance serves matrix groups (``rule`` = the matrix rule: 2-D weights, conv weights
  flattened to ``(out, in*kh*kw)``) and fallback groups (``rule`` = an elementwise rule, by default the spec's
  fallback with its ``fallback_defaults``). Passing plain tensors routes by dimension; :func:`matrix_param_groups`
  also sends embeddings and the output head to the fallback rule.
* Mini-batch rules (MSVAGMB, AdamStarMB): pass the per-element variance of the mini-batch gradient as
  ``opt.step(grad_variance={param: tensor})`` or as an attribute ``param.grad_variance``;
  :func:`minibatch_grad_variance` computes it with ``torch.func``.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import repeat
from typing import Any

import array_api_compat.torch as _txp
import torch
from torch.optim import Optimizer
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from xpoptim.core import ELEMENTWISE, SPECS, STATE_VERSION, get_spec
from xpoptim.core.moments import minibatch_variance
from xpoptim.core.spec import ElementwiseSpec, MatrixSpec

from . import _torch_engine as _eng

_GRAD = operator.attrgetter("grad")

__all__ = [
    "XPOptimizer",
    "create",
    "matrix_param_groups",
    "param_groups_for_muon",
    "minibatch_grad_variance",
    "OPTIMIZERS",
    *(s.title for s in SPECS.values()),
]

_OPTION_KEYS = ("maximize", "state_dtype", "compile")
_COMPILE_CHOICES = (True, False, "auto")


def _uses_betas(spec: ElementwiseSpec | MatrixSpec) -> bool:
    names = {h.name for h in spec.hyperparams}
    return "beta1" in names and "beta2" in names


def _group_keys(spec: ElementwiseSpec | MatrixSpec) -> tuple[str, ...]:
    """Group keys for a spec's hyperparameters (``beta1``/``beta2`` folded into ``betas``)."""
    keys = []
    for h in spec.hyperparams:
        if _uses_betas(spec) and h.name in ("beta1", "beta2"):
            if "betas" not in keys:
                keys.append("betas")
        else:
            keys.append(h.name)
    return tuple(keys)


def _to_group_form(spec: ElementwiseSpec | MatrixSpec, hp: Mapping[str, Any]) -> dict:
    """Spec-named hyperparameters -> group keys (``betas`` tuple where the spec has beta1/beta2)."""
    out = {k: v for k, v in hp.items() if k not in ("beta1", "beta2") or not _uses_betas(spec)}
    if _uses_betas(spec) and ("beta1" in hp or "beta2" in hp):
        out["betas"] = (hp["beta1"], hp["beta2"])
    return out


def _normalize_betas(spec: ElementwiseSpec | MatrixSpec, group: dict, where: str) -> None:
    """Fold ``beta1=``/``beta2=`` given next to (or instead of) ``betas=`` into the group's ``betas``."""
    has_b = [k for k in ("beta1", "beta2") if k in group]
    if not _uses_betas(spec):
        if "betas" in group:
            raise TypeError(f"{where}: betas={group['betas']!r} is not a hyperparameter of {spec.title}")
        return
    if has_b and "betas" in group:
        raise TypeError(f"{where}: give either betas=(beta1, beta2) or beta1=/beta2=, not both")
    if "betas" in group:
        betas = group["betas"]
        if isinstance(betas, torch.Tensor) or not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"{where}: betas={betas!r} is invalid: expected a pair (beta1, beta2)")
        group["betas"] = tuple(betas)
    elif has_b:
        d = spec.defaults
        group["betas"] = (group.pop("beta1", d["beta1"]), group.pop("beta2", d["beta2"]))


def _number(value: Any, name: str, where: str) -> Any:
    """Hyperparameter value as a Python number (1-element tensors are read once per step)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{where}: {name} is a tensor with {value.numel()} elements; expected a number or a 1-element tensor")
        return value.item()
    return value


def _hp_from_group(spec: ElementwiseSpec | MatrixSpec, group: Mapping[str, Any], where: str) -> dict:
    """Validated spec hyperparameters from a param group (Python numbers for numeric ones)."""
    hp = {}
    for h in spec.hyperparams:
        if _uses_betas(spec) and h.name in ("beta1", "beta2"):
            b = group["betas"]
            val = b[0] if h.name == "beta1" else b[1]
        else:
            val = group[h.name]
        hp[h.name] = val if h.static else _number(val, h.name, where)
    return spec.validate(**hp)


def _check_options(group: Mapping[str, Any], where: str) -> None:
    if not isinstance(group["maximize"], bool):
        raise ValueError(f"{where}: maximize={group['maximize']!r} is invalid: expected True or False")
    sd = group["state_dtype"]
    if sd is not None and not (isinstance(sd, torch.dtype) and sd.is_floating_point and not sd.is_complex):
        raise ValueError(f"{where}: state_dtype={sd!r} is invalid: expected None or a real floating torch.dtype")
    c = group["compile"]
    if not any(c is x or (isinstance(c, str) and c == x) for x in _COMPILE_CHOICES):
        raise ValueError(f"{where}: compile={c!r} is invalid: expected True, False or 'auto'")


class XPOptimizer(Optimizer):
    """Generic base of the xpoptim torch optimizers; subclasses set ``spec`` (one per core spec).

    Do not instantiate directly: use a subclass (``xpoptim.adapters.torch.AdamW``, ...) or :func:`create`.
    """

    spec: ElementwiseSpec | MatrixSpec

    def __init__(
        self,
        params: Any,
        lr: Any = None,
        *,
        maximize: bool = False,
        state_dtype: torch.dtype | None = None,
        compile: bool | str = "auto",
        fallback: str | None = None,
        fallback_hyperparams: Mapping[str, Any] | None = None,
        **hyperparams: Any,
    ) -> None:
        spec = getattr(type(self), "spec", None)
        if spec is None:
            raise TypeError("XPOptimizer is a base class: use one of its subclasses (e.g. AdamW) or create(name, ...)")
        where = spec.title
        if isinstance(params, torch.Tensor):
            raise TypeError(f"{where}: params should be an iterable of tensors or dicts, got a {type(params).__name__}")
        hp_in = dict(hyperparams)
        for flag in ("foreach", "fused", "capturable", "differentiable"):
            if flag in hp_in:
                value = hp_in.pop(flag)
                if value not in (None, False):
                    raise TypeError(
                        f"{where}: {flag}={value!r} is not supported: xpoptim applies each rule once per flat buffer "
                        "(use compile=True for one fused kernel); foreach/fused/capturable/differentiable accept only "
                        "None or False"
                    )
        if lr is not None:
            hp_in["lr"] = lr
        _normalize_betas(spec, hp_in, where)
        known = set(_group_keys(spec))
        unknown = sorted(set(hp_in) - known)
        if unknown:
            raise TypeError(f"{where}: unknown hyperparameter(s) {unknown}; expected a subset of {sorted(known | {'beta1', 'beta2'} if 'betas' in known else known)}")
        defaults = {**_to_group_form(spec, spec.defaults), **hp_in}
        defaults.update(maximize=maximize, state_dtype=state_dtype, compile=compile, rule=spec.name)
        if isinstance(spec, MatrixSpec):
            fb_name = spec.fallback if fallback is None else fallback
            self._fallback_spec(fb_name, where)  # torch's own restriction (no rule with extra inputs), then the core's
            fb, fb_hp = spec.resolve_fallback(fb_name)  # user values in group form (betas=) are checked below
            fb_hp.update(fallback_hyperparams or {})
            _normalize_betas(fb, fb_hp, f"{where} fallback {fb.title}")
            fb_full = {**_to_group_form(fb, fb.defaults), **fb_hp}
            _hp_from_group(fb, {**fb_full, **({"betas": fb_full["betas"]} if "betas" in fb_full else {})}, f"{where} fallback {fb.title}")
            if "lr" not in fb_hp:  # the fallback's lr follows the optimizer's (see MatrixSpec.fallback_defaults)
                del fb_full["lr"]
            defaults["fallback"] = (fb.name, fb_full)  # kept in defaults (pickled), popped from the groups
        elif fallback is not None or fallback_hyperparams is not None:
            raise TypeError(f"{where}: fallback= and fallback_hyperparams= only apply to the matrix rules (Muon, DeVASinf)")
        # Validate the defaults once, up front (clear errors before any group exists).
        _hp_from_group(spec, defaults, where)
        _check_options(defaults, where)
        params = list(params)
        if isinstance(spec, MatrixSpec) and params and not isinstance(params[0], dict):
            self.__dict__["_xp_pending_fallback"] = defaults["fallback"]
            params = self._route_by_ndim(params)
        super().__init__(params, defaults)

    # -- groups --------------------------------------------------------------------------------------------------

    @staticmethod
    def _fallback_spec(name: str, where: str, arg: str = "fallback", own: str | None = None) -> ElementwiseSpec:
        if name not in ELEMENTWISE or SPECS[name].extras:
            allowed = [n for n in ELEMENTWISE if not SPECS[n].extras]
            if own is None:
                raise ValueError(f"{where}: {arg}={name!r} is invalid: expected one of {allowed}")
            raise ValueError(
                f"{where}: a param group with {arg}={name!r} is invalid: expected {own!r} (the matrix rule) or an "
                f"elementwise fallback rule, one of {allowed} (matrix_param_groups(model, {own!r}) builds such groups)"
            )
        return SPECS[name]  # type: ignore[return-value]

    def _fallback(self) -> tuple[str, dict]:
        """(rule name, group-form hyperparameters) of the fallback rule of a matrix optimizer."""
        fb = self.__dict__.get("defaults", {}).get("fallback")
        if fb is None:
            fb = self.__dict__.get("_xp_pending_fallback", (getattr(self.spec, "fallback", None), {}))
        return fb

    def _route_by_ndim(self, params: list) -> list:
        named = params and isinstance(params[0], tuple)
        mat, other = [], []
        for item in params:
            p = item[1] if named else item
            (mat if isinstance(p, torch.Tensor) and p.ndim >= 2 else other).append(item)
        groups = []
        if mat:
            groups.append({"params": mat})
        if other:
            groups.append({"params": other, "rule": self._fallback()[0]})
        return groups

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (torch semantics), validating its hyperparameters and its parameters.

        Groups of Muon / DeVASinf may set ``rule`` to an elementwise rule name (the fallback); they are filled
        with the fallback's hyperparameters instead of the matrix rule's.
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
            gspec: ElementwiseSpec | MatrixSpec = spec
        elif rule == spec.name:
            gspec = spec
        else:
            gspec = self._fallback_spec(rule, where, "rule", spec.name)
            fb_name, fb_full = self._fallback()
            base = fb_full if fb_name == rule else {k: v for k, v in _to_group_form(gspec, gspec.defaults).items() if k != "lr"}
            _normalize_betas(gspec, group, where)
            for k, v in base.items():
                group.setdefault(k, v)
        _normalize_betas(gspec, group, where)
        allowed = set(_group_keys(gspec)) | set(_OPTION_KEYS) | {"params", "rule", "param_names", "initial_lr"}
        if gspec is spec:
            allowed |= set(self.defaults)
        extra = sorted(set(group) - allowed - set(self.defaults))
        if extra:
            raise TypeError(f"{where}: unknown key(s) {extra} in a param group for rule {rule!r}")
        n_before = len(self.param_groups)
        super().add_param_group(group)
        self.param_groups[-1].pop("fallback", None)
        if gspec is not spec:  # drop the matrix rule's keys the base class filled into a fallback group
            g = self.param_groups[-1]
            for k in _group_keys(spec):
                if k not in _group_keys(gspec) and k not in param_group:
                    g.pop(k, None)
        try:
            g = self.param_groups[-1]
            _hp_from_group(gspec, g, where)
            _check_options(g, where)
            for p in g["params"]:
                if is_traceable_wrapper_subclass(p) and not _eng.is_sharded(p):
                    raise TypeError(
                        f"{where}: parameters that are tensor subclasses are not supported (got a "
                        f"{type(p).__name__} of shape {tuple(p.shape)}): only plain tensors and DTensor"
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
                        f"{where}: a parameter of shape {tuple(p.shape)} is in a group with rule={spec.name!r}, which "
                        "needs matrices (ndim >= 2); route it to the fallback rule (rule="
                        f"{self._fallback()[0]!r}) or use matrix_param_groups(model)"
                    )
        except Exception:
            del self.param_groups[n_before:]
            raise
        self._xp_invalidate()

    # -- caches (not part of the pickled state: rebuilt lazily) --------------------------------------------------

    def _xp_invalidate(self) -> None:
        self.__dict__["_xp_buckets"] = {}

    def _xp_bucket_cache(self) -> dict:
        cache = self.__dict__.get("_xp_buckets")
        if cache is None:
            cache = self.__dict__["_xp_buckets"] = {}
        return cache

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._xp_invalidate()

    # -- step ----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, grad_variance: Mapping[torch.Tensor, torch.Tensor] | None = None) -> Any:
        """Take one optimization step.

        Args:
            closure: re-evaluates the model and returns the loss (run with gradients enabled).
            grad_variance: for the mini-batch rules (MSVAGMB, AdamStarMB): ``{param: variance}`` with the
                per-element variance of the mini-batch gradient (Balles & Hennig Eq. 44, see
                :func:`minibatch_grad_variance`); a parameter's ``grad_variance`` attribute is used when absent.

        Returns:
            The closure's loss, or ``None``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._xp_step(grad_variance)
        return loss

    @torch.compiler.disable
    def _xp_step(self, grad_variance: Mapping[torch.Tensor, torch.Tensor] | None) -> None:
        spec = self.spec
        # Phase 1: validate everything; nothing is modified before all checks pass.
        plans = []
        state = self.state
        cache = self._xp_bucket_cache()
        for gi, group in enumerate(self.param_groups):
            rule = group.get("rule", spec.name)
            gspec = spec if rule == spec.name else SPECS[rule]
            hp = _hp_from_group(gspec, group, spec.title)
            _check_options(group, spec.title)
            params = group["params"]
            grads = list(map(_GRAD, params))
            if all(map(operator.is_not, grads, repeat(None))):  # the common case: every parameter has a gradient
                active, agrads = list(params), grads  # a copy: the cache keeps it, the group's list may change
            else:
                active = [p for p, g in zip(params, grads) if g is not None]
                if not active:
                    continue
                agrads = [g for g in grads if g is not None]
            cached = cache.get(gi) if isinstance(gspec, ElementwiseSpec) else None
            layout = None  # (buckets, [(bucket grads, in-place flags)]) when the cached layout still holds
            if cached is not None and self._buckets_valid(gi, cached, active):
                _, buckets, _, perms, sharded, _, _ = cached
                per_bucket = []
                to_check = []
                for b, idx in zip(buckets, perms):
                    bg = agrads if idx is None else [agrads[i] for i in idx]
                    ok = _eng.grads_in_place(b, bg)
                    per_bucket.append((bg, ok))
                    if all(ok):  # our own flat-buffer views were checked when they were made
                        continue
                    if not _eng.grads_match(b, bg, ok):
                        to_check.extend((b.params[i], bg[i]) for i in _eng.not_in_place(ok))
                layout = (buckets, per_bucket)
            else:
                to_check = list(zip(active, agrads))
                sharded = [i for i, p in enumerate(active) if _eng.is_sharded(p)]
            for p, g in to_check:
                if g.layout != torch.strided:
                    raise ValueError(f"{spec.title}: sparse gradients are not supported (param of shape {tuple(p.shape)})")
                if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
                    raise ValueError(
                        f"{spec.title}: grad of shape {tuple(g.shape)}, dtype {g.dtype}, device {g.device} does not "
                        f"match its parameter (shape {tuple(p.shape)}, dtype {p.dtype}, device {p.device})"
                    )
            extras = []
            if isinstance(gspec, ElementwiseSpec) and gspec.extras:
                extras = [self._extra_for(gspec, p, grad_variance) for p in active]
            names, replicated = _sharded_state_names(gspec)
            for i in sharded:
                self._check_sharded(names, active[i], agrads[i], extras[i] if extras else None, replicated)
            plans.append((gi, group, gspec, hp, active, extras, layout, sharded, [agrads[i] for i in sharded]))
        # Phase 2: compute and write.
        for gi, group, gspec, hp, active, extras, layout, sharded, sharded_grads in plans:
            plain = active
            if sharded:
                skip = set(sharded)
                plain = [p for i, p in enumerate(active) if i not in skip]
            if isinstance(gspec, MatrixSpec):
                sharded_step = _eng.muon_step_sharded if gspec.name == "muon" else _eng.deva_step_sharded
                for i, g in zip(sharded, sharded_grads):  # DTensor matrices: see muon_step_sharded, deva_step_sharded
                    sharded_step(gspec, hp, group["maximize"], group["state_dtype"], active[i], g, state)
                if plain:
                    _eng.matrix_step(gspec, plain, state, hp, group["maximize"], group["state_dtype"])
                continue
            static = gspec.static(hp)
            scalar_cache: dict = {}  # the compiled kernel's scalars, shared by the shards of one step count
            for i, g in zip(sharded, sharded_grads):  # DTensor parameters: stepped shard by shard, where they live
                ex = [extras[i]] if extras else []
                _eng.run_sharded(
                    gspec, hp, static, group["maximize"], group["state_dtype"], group["compile"], active[i], g, ex, state, scalar_cache
                )
            if layout is None:
                buckets = self._make_buckets(gspec, plain, group["state_dtype"])
                index = {id(p): i for i, p in enumerate(active)}
                perms = [[index[id(p)] for p in b.params] for b in buckets]
                # None: the bucket holds every active parameter in order (one bucket, the common case).
                perms = [None if idx == list(range(len(active))) else idx for idx in perms]
                cache[gi] = (active, buckets, group["state_dtype"], perms, sharded, state, -1)
                per_bucket = []
                for b in buckets:
                    bg = [p.grad for p in b.params]
                    per_bucket.append((bg, _eng.grads_in_place(b, bg)))
            else:
                buckets, per_bucket = layout
            pos = {id(p): i for i, p in enumerate(active)} if extras else None
            for b, (bg, ok) in zip(buckets, per_bucket):
                ex = [[extras[pos[id(p)]] for p in b.params]] if extras else ()
                _eng.run_bucket(b, gspec, hp, static, group["maximize"], group["compile"], ex, bg, ok)
        # Remember how many parameters have state: a change (state dropped or replaced by hand) re-lays out.
        n_state = len(state)
        for key, entry in list(cache.items()):
            cache[key] = (*entry[:-1], n_state)

    def _extra_for(self, gspec: ElementwiseSpec, p: torch.Tensor, grad_variance: Any) -> torch.Tensor:
        v = None
        if grad_variance is not None:
            v = grad_variance.get(p) if isinstance(grad_variance, Mapping) else None
            if v is None and not isinstance(grad_variance, Mapping):
                raise TypeError(f"{gspec.title}: grad_variance must be a mapping {{param: tensor}}, got {type(grad_variance).__name__}")
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
        return v

    def _check_sharded(self, names: Sequence[str], p: Any, g: Any, extra: Any, replicated: bool = False) -> None:
        """A DTensor parameter's gradient (and ``grad_variance``) must be DTensors with its placements and local
        shape (what FSDP2's reduce-scatter produces), and its state DTensors (a plain tensor loaded into it is
        refused: load sharded state, e.g. with ``torch.distributed.checkpoint``) sharded like it, or replicated
        (``replicated``: DeVASinf's whole-matrix state)."""
        where = self.spec.title
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
        for name, v in self.state.get(p, {}).items():
            if name not in names:
                continue
            if v is None and replicated:
                continue
            if not _eng.is_sharded(v):
                raise ValueError(
                    f"{where}: state {name!r} of a DTensor parameter (shape {tuple(p.shape)}) is a "
                    f"{type(v).__name__}, not a DTensor: load sharded state (torch.distributed.checkpoint, or a state "
                    "dict saved from the same sharding)"
                )
            if replicated:
                if any(not pl.is_replicate() for pl in v.placements) or v.to_local().shape != v.shape:
                    raise ValueError(
                        f"{where}: state {name!r} of a DTensor parameter (shape {tuple(p.shape)}) has placements "
                        f"{v.placements}: DeVASinf keeps whole-matrix state, replicated on every rank"
                    )
                continue
            if v.placements != p.placements or tuple(v.to_local().shape) != local_shape:
                raise ValueError(
                    f"{where}: state {name!r} of a DTensor parameter (placements {p.placements}, local shape "
                    f"{local_shape}) has placements {v.placements} and local shape {tuple(v.to_local().shape)}: it "
                    "was saved under another sharding (reshard it with torch.distributed.checkpoint)"
                )

    def _buckets_valid(self, gi: int, cached: tuple, active: list) -> bool:
        prev, buckets, sdt, _perms, _sharded, state_obj, n_state = cached
        if sdt != self.param_groups[gi]["state_dtype"] or state_obj is not self.state or n_state != len(self.state):
            return False
        if len(prev) != len(active) or not all(map(operator.is_, prev, active)):
            return False
        return all(_eng.bucket_is_valid(b) for b in buckets)

    def _make_buckets(self, gspec: ElementwiseSpec, active: list, state_dtype_opt: Any) -> list:
        keyed: dict[tuple, list] = {}
        for p in active:
            st = self.state[p]
            t = int(st["step"].item()) if "step" in st else 0
            sdt = _eng.state_dtype_for(p, state_dtype_opt)
            keyed.setdefault((p.device, p.dtype, sdt, t), []).append(p)
        return [_eng.build_bucket(ps, self.state, gspec, sdt, t) for (_d, _dt, sdt, t), ps in keyed.items()]

    # -- state dict ----------------------------------------------------------------------------------------------

    def _expected_state(self, gspec: ElementwiseSpec | MatrixSpec, p: torch.Tensor, hp: dict) -> dict:
        """Names and shapes of the floating state a parameter holds under ``gspec``."""
        if isinstance(gspec, ElementwiseSpec):
            return {n: tuple(p.shape) for n in gspec.state}
        shape2 = _eng.matrix_shape(p)
        n, m = shape2
        if gspec.name == "muon":  # a DTensor parameter keeps its momentum sharded like itself, in its own shape
            return {"momentum_buffer": tuple(p.shape) if _eng.is_sharded(p) else shape2}
        mp = hp["max_precond_dim"]
        return {
            "L": (n, n) if n <= mp else None,
            "R": (m, m) if m <= mp else None,
            "QL": (n, n) if n <= mp else None,
            "QR": (m, m) if m <= mp else None,
            "exp_avg": shape2,
            "exp_avg_sq": shape2,
            "gamma": shape2,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict` (torch semantics), after checking that it fits.

        Refused, with a ``ValueError`` and the optimizer left unchanged: a state dict of another optimizer or rule
        (group ``rule`` differs or is missing), of another state version, or with state of the wrong names or
        shapes. Floating state is cast to the state-dtype policy (``state_dtype``, float32 for bf16/fp16
        parameters) and moved to the parameter's device; ``step`` is kept as saved.
        """
        where = self.spec.title
        if not isinstance(state_dict, Mapping) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError(f"{where}: load_state_dict expects a dict with 'state' and 'param_groups'")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"{where}: the state dict has {len(saved_groups)} parameter group(s), this optimizer has {len(self.param_groups)}"
            )
        id_map = {}
        for sg, g in zip(saved_groups, self.param_groups):
            if len(sg["params"]) != len(g["params"]):
                raise ValueError(f"{where}: a saved parameter group has {len(sg['params'])} params, the optimizer's has {len(g['params'])}")
            if sg.get("rule") != g["rule"]:
                raise ValueError(
                    f"{where}: the state dict was not written by this optimizer: a group has rule={sg.get('rule')!r}, "
                    f"expected rule={g['rule']!r} (an xpoptim {where} state dict)"
                )
            id_map.update(zip(sg["params"], g["params"]))
        for pid, st in state_dict["state"].items():
            if pid not in id_map:
                continue
            p = id_map[pid]
            g = next(gr for gr in self.param_groups if any(q is p for q in gr["params"]))
            gspec = SPECS[g["rule"]]
            version = st.get("state_version")
            if version != STATE_VERSION:
                raise ValueError(f"{where}: state version {version!r} is not supported: expected state_version={STATE_VERSION}")
            expected = self._expected_state(gspec, p, _hp_from_group(gspec, g, where))
            got = set(st) - {"step", "state_version"}
            if got != set(expected):
                raise ValueError(f"{where}: saved state names {sorted(got)} do not match the rule's {sorted(expected)}")
            if "step" not in st:
                raise ValueError(f"{where}: saved state lacks 'step'")
            for name, shape in expected.items():
                v = st[name]
                if shape is None:
                    if v is not None:
                        raise ValueError(f"{where}: saved state {name!r} should be None for a parameter of shape {tuple(p.shape)}")
                    continue
                if not isinstance(v, torch.Tensor) or tuple(v.shape) != shape:
                    got_shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                    raise ValueError(
                        f"{where}: saved state {name!r} has shape {got_shape}, expected {shape} for a parameter of shape {tuple(p.shape)}"
                    )
        originals = {pid: st for pid, st in state_dict["state"].items() if pid in id_map}
        super().load_state_dict(state_dict)
        # Re-cast from the saved tensors (the base class casts floating state to the param dtype, lossy for bf16).
        for pid, st in originals.items():
            p = id_map[pid]
            g = next(gr for gr in self.param_groups if any(q is p for q in gr["params"]))
            sdt = _eng.state_dtype_for(p, g["state_dtype"])
            new = {}
            for k, v in st.items():
                if k == "step":
                    new[k] = v.detach().clone().to(torch.float32) if isinstance(v, torch.Tensor) else torch.tensor(float(v))
                elif isinstance(v, torch.Tensor) and v.is_floating_point():
                    new[k] = v.detach().to(device=p.device, dtype=sdt, copy=True)
                else:
                    new[k] = v
            self.state[p] = new
        self._xp_invalidate()

    # -- portable state (xpoptim.portable) ----------------------------------------------------------------------

    def export_state(self, names: Any = None) -> Any:
        """The framework-neutral state (:class:`xpoptim.portable.PortableState`); see :mod:`xpoptim.portable`.

        Args:
            names: parameter names in param-group order, or ``model.named_parameters()``; default: the groups'
                ``param_names``, else the positions ``"0"``, ``"1"``, ...
        """
        from xpoptim.portable.torch_state import export_torch  # noqa: PLC0415

        return export_torch(self, names)

    def import_state(self, portable: Any, names: Any = None) -> None:
        """Load a :class:`xpoptim.portable.PortableState` (names as for :meth:`export_state`); hyperparameters are kept."""
        from xpoptim.portable.torch_state import import_torch  # noqa: PLC0415

        import_torch(self, portable, names)


# ----------------------------------------------------------------------------------------------------------------------
# One class per spec
# ----------------------------------------------------------------------------------------------------------------------


def _sharded_state_names(gspec: ElementwiseSpec | MatrixSpec) -> tuple[tuple[str, ...], bool]:
    """Names of the floating state a DTensor parameter holds under ``gspec``, and whether it is replicated (DeVASinf's
    whole-matrix state) rather than sharded like the parameter."""
    if isinstance(gspec, ElementwiseSpec):
        return tuple(gspec.state), False
    if gspec.name == "muon":
        return ("momentum_buffer",), False
    return _eng.DEVA_KEYS, True


def _fmt(v: Any) -> str:
    return repr(v)


def _class_doc(spec: ElementwiseSpec | MatrixSpec) -> str:
    lines = [f"{spec.title}: the xpoptim ``{spec.name}`` rule as a torch.optim.Optimizer.", ""]
    lines.append(f"Conventions: {spec.conventions}.")
    lines.append("")
    lines.append("Args:")
    lines.append("    params: tensors, param-group dicts or ``(name, tensor)`` pairs.")
    for h in spec.hyperparams:
        lines.append(f"    {h.name}: {h.doc} (default {_fmt(h.default)}).")
    if _uses_betas(spec):
        lines.append("    betas: ``(beta1, beta2)``, torch's spelling (stored in the groups as ``betas``).")
    lines.append("    maximize: ascend instead of descend (default False).")
    lines.append("    state_dtype: dtype of floating state (default: float32 for bf16/fp16 params, else the param's).")
    lines.append("    compile: run the fused elementwise kernel under torch.compile: True, False or 'auto' (default).")
    if isinstance(spec, MatrixSpec):
        lines.append(
            f"    fallback: elementwise rule for non-matrix parameters (default {spec.fallback!r}, with "
            f"{dict(spec.fallback_defaults)!r})."
        )
        lines.append("    fallback_hyperparams: overrides of the fallback rule's hyperparameters.")
    if isinstance(spec, ElementwiseSpec) and spec.extras:
        lines.append("")
        lines.append(
            "The rule needs the per-element variance of the mini-batch gradient: ``opt.step(grad_variance={p: v})`` "
            "or ``p.grad_variance = v`` (see ``minibatch_grad_variance``)."
        )
    lines += ["", "State per parameter: " + (", ".join(spec.state) if isinstance(spec, ElementwiseSpec) else
              ("momentum_buffer" if spec.name == "muon" else "L, R, QL, QR, exp_avg, exp_avg_sq, gamma")) + ", step, state_version."]
    lines += ["", "References:", f"    {spec.source}."]
    return "\n".join(lines)


def _signature(spec: ElementwiseSpec | MatrixSpec) -> inspect.Signature:
    P = inspect.Parameter
    ps = [P("self", P.POSITIONAL_OR_KEYWORD), P("params", P.POSITIONAL_OR_KEYWORD)]
    ps.append(P("lr", P.POSITIONAL_OR_KEYWORD, default=spec.defaults["lr"]))
    for h in spec.hyperparams:
        if h.name != "lr":
            ps.append(P(h.name, P.KEYWORD_ONLY, default=h.default))
    if _uses_betas(spec):
        ps.append(P("betas", P.KEYWORD_ONLY, default=None))
    ps += [P("maximize", P.KEYWORD_ONLY, default=False), P("state_dtype", P.KEYWORD_ONLY, default=None),
           P("compile", P.KEYWORD_ONLY, default="auto")]
    if isinstance(spec, MatrixSpec):
        ps += [P("fallback", P.KEYWORD_ONLY, default=spec.fallback), P("fallback_hyperparams", P.KEYWORD_ONLY, default=None)]
    return inspect.Signature(ps)


def _make_class(spec: ElementwiseSpec | MatrixSpec) -> type:
    cls = type(spec.title, (XPOptimizer,), {"spec": spec, "__doc__": _class_doc(spec), "__module__": __name__})
    cls.__init__ = _make_init(spec)  # type: ignore[method-assign]
    return cls


def _make_init(spec: ElementwiseSpec | MatrixSpec) -> Callable:
    def __init__(self, params, lr=None, **kwargs):  # noqa: N807
        XPOptimizer.__init__(self, params, lr, **kwargs)

    __init__.__signature__ = _signature(spec)  # type: ignore[attr-defined]
    __init__.__doc__ = f"Create a {spec.title} optimizer (see the class docstring)."
    __init__.__qualname__ = f"{spec.title}.__init__"
    return __init__


#: name -> class, for every spec.
OPTIMIZERS: dict[str, type] = {name: _make_class(s) for name, s in SPECS.items()}
globals().update({cls.__name__: cls for cls in OPTIMIZERS.values()})


def create(name: str, params: Any, **hp: Any) -> XPOptimizer:
    """Create the torch optimizer of a registry name (``"adamw"``) or title (``"AdamW"``).

    Args:
        name: the optimizer.
        params: tensors, param-group dicts or ``(name, tensor)`` pairs.
        **hp: hyperparameters (the spec's names; ``betas=`` also accepted) and options (``maximize``,
            ``state_dtype``, ``compile``; ``fallback``/``fallback_hyperparams`` for Muon and DeVASinf).

    Returns:
        The optimizer.
    """
    return OPTIMIZERS[get_spec(name).name](params, **hp)


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
    mat, mat_names, other, other_names = [], [], [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_matrix = p.ndim >= 2 and id(p) not in to_fallback and not (exclude is not None and exclude(n, p))
        (mat if is_matrix else other).append(p)
        (mat_names if is_matrix else other_names).append(n)
    groups = []
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
    out = {}
    for n, p in params.items():
        pe = per_example[n]
        out[p] = minibatch_variance(_txp, pe, axis=0)
        if set_grad:
            p.grad = pe.mean(dim=0)
        if attach:
            p.grad_variance = out[p]
    return out
