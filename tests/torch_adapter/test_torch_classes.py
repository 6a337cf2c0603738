"""The per-rule classes are written out (greppable, visible to type checkers) and match their specs; the base class
``XPOptimizer(params, rule, **hyperparams)`` runs any rule and is what the classes (and generated ones) subclass."""

from __future__ import annotations

import inspect
import pathlib

import pytest
import torch
from xpt_support import NAMES, make_params, run_torch, spec_hp

from xpoptim.adapters import _torch_classes
from xpoptim.adapters import torch as xt
from xpoptim.core import SPECS, builtin_specs
from xpoptim.core.spec import MatrixSpec


@pytest.mark.parametrize("name", [s.name for s in builtin_specs() if s.name in NAMES])
def test_class_signature_matches_the_spec(name):
    """The generated, checked-in classes of the shipped rules (a registered rule is reached through create)."""
    spec = SPECS[name]
    cls = xt.OPTIMIZERS[name]
    source = pathlib.Path(_torch_classes.__file__).read_text()
    assert f"class {spec.title}(XPOptimizer):" in source
    sig = inspect.signature(cls.__init__).parameters
    assert sig["lr"].default == spec.defaults["lr"]
    betas = {"beta1", "beta2"} <= set(spec.defaults)
    for h in spec.hyperparams:
        # the annotation type checkers see: the kind's Python type (numbers also as tensors, as torch.optim types lr)
        assert sig[h.name].annotation == _ANNOTATION.get(h.kind.value, "float | torch.Tensor") + (" | None" if betas and h.name in ("beta1", "beta2") else ""), h.name
        if h.name == "lr" or (betas and h.name in ("beta1", "beta2")):
            continue
        assert sig[h.name].default == h.default and sig[h.name].kind is inspect.Parameter.KEYWORD_ONLY, h.name
    assert sig["params"].annotation == "ParamsT"
    expected = {h.name for h in spec.hyperparams} | {"self", "params", "maximize", "state_dtype", "compile"}
    expected |= {"foreach", "fused", "capturable", "differentiable"}
    if betas:
        expected |= {"betas"}
    if isinstance(spec, MatrixSpec):
        expected |= {"fallback", "fallback_hyperparams"}
    assert set(sig) == expected
    assert sig["compile"].default is False


#: Annotation of a hyperparameter by kind (the numeric kinds: ``float | torch.Tensor``).
_ANNOTATION = {"bool": "bool", "int_pos": "int", "choice": "str", "dtype": "Any", "any": "Any"}


@pytest.mark.parametrize("name", ["adamw", "mvngrad", "muon"])
def test_base_class_with_a_rule_name_equals_the_class(name):
    pa, pb = make_params(name), make_params(name)
    oa = run_torch(lambda ps: xt.create(name, ps, **spec_hp(name)), name, pa, 3)
    ob = run_torch(lambda ps: xt.XPOptimizer(ps, name, **spec_hp(name)), name, pb, 3)
    assert all(torch.equal(a, b) for a, b in zip(pa, pb))
    assert oa.state_dict()["param_groups"] == ob.state_dict()["param_groups"]


def test_a_subclass_written_like_the_generated_ones_works():
    """What a generated module writes: an explicit signature calling ``XPOptimizer.__init__(params, rule, ...)``."""

    class MyAdamW(xt.XPOptimizer):
        def __init__(self, params, lr: float = 1e-3, *, weight_decay: float = 0.01) -> None:
            super().__init__(params, "adamw", lr=lr, weight_decay=weight_decay)

    p, q = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
    a, b = MyAdamW([p], lr=0.1), xt.AdamW([q], lr=0.1)
    for _ in range(2):
        p.grad, q.grad = torch.full((3,), 0.5), torch.full((3,), 0.5)
        a.step()
        b.step()
    assert torch.equal(p, q) and a.spec is SPECS["adamw"]


def test_base_class_needs_a_rule():
    with pytest.raises(TypeError, match="give the rule"):
        xt.XPOptimizer([torch.ones(2, requires_grad=True)])
    with pytest.raises(ValueError):
        xt.XPOptimizer([torch.ones(2, requires_grad=True)], "not_a_rule")


def test_base_class_instance_survives_pickle():
    import pickle

    p = torch.ones(3, requires_grad=True)
    opt = xt.XPOptimizer([p], "mvngrad", lr=0.1)
    p.grad = torch.full((3,), 0.5)
    opt.step()
    clone = pickle.loads(pickle.dumps(opt))
    assert clone.spec is SPECS["mvngrad"] and clone.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
