"""Bad hyperparameters raise ValueError/TypeError whose message names the argument and the value.

Generated from each spec's hyperparameter kinds (so a new hyperparameter is covered automatically), plus the
cross-field rules the spec states (MVN-Grad beta1 = 0, mu = 0 for the kappa-based rules, Nesterov SGD, Newton-
Schulz coefficient tables, DeVA_Sinf's shampoo_beta).
"""

from __future__ import annotations

import math

import pytest

from xpoptim.core import SPECS, get_spec

BAD_BY_KIND = {
    "lr": [-0.1, -1e-12, math.nan, math.inf, True, "0.1", None],
    "nonneg": [-0.1, math.nan, math.inf, True, "0", None],
    "positive": [0.0, -1.0, math.nan, True],
    "beta": [1.0, -0.1, 1.5, math.nan, True, "0.9", None],
    "beta_open": [0.0, 1.0, math.nan, True],
    "bool": [1, 0, "yes", None],
    "choice": ["bogus", None, 3],
    "int_pos": [0, -1, 1.5, True, "5"],
}


def _cases():
    out = []
    for name, spec in SPECS.items():
        for h in spec.hyperparams:
            for value in BAD_BY_KIND.get(h.kind, []):
                out.append(pytest.param(name, h.name, value, id=f"{name}-{h.name}={value!r}"))
    return out


@pytest.mark.parametrize(("name", "arg", "value"), _cases())
def test_bad_value_is_rejected_with_a_clear_message(name, arg, value):
    spec = SPECS[name]
    with pytest.raises((ValueError, TypeError)) as info:
        spec.validate(**{arg: value})
    msg = str(info.value)
    assert arg in msg, msg
    assert repr(value) in msg or str(value) in msg, msg


@pytest.mark.parametrize("name", list(SPECS))
def test_unknown_hyperparameter_is_a_type_error(name):
    with pytest.raises(TypeError, match="betaa"):
        SPECS[name].validate(betaa=0.9)


@pytest.mark.parametrize("name", list(SPECS))
def test_defaults_validate(name):
    spec = SPECS[name]
    assert spec.validate() == spec.defaults


@pytest.mark.parametrize("name", ["adam", "adamw", "adabelief", "laprop", "mvngrad", "deva_linf"])
def test_betas_in_range_are_accepted(name):
    extra = {"residual": "m_prev"} if name == "mvngrad" else {}  # beta1 = 0 is degenerate with m_t (see below)
    SPECS[name].validate(beta1=0.0, beta2=0.0, **extra)
    SPECS[name].validate(beta1=0.999999, beta2=0.999999)


def test_mvngrad_beta1_zero_is_degenerate_with_the_m_t_residual():
    spec = get_spec("mvngrad")
    with pytest.raises(ValueError, match=r"beta1=0\.0") as info:
        spec.validate(beta1=0.0)
    assert "residual" in str(info.value)
    spec.validate(beta1=0.0, residual="m_prev")  # docs/algorithms.md section 2.4: fine with m_{t-1}
    spec.validate(beta1=0.0, eps_s=1e-8)  # fine with a variance floor


@pytest.mark.parametrize("name", ["svag", "msvag", "adam_star"])
def test_mu_zero_is_rejected_for_the_kappa_rules(name):
    with pytest.raises(ValueError, match=r"mu=0\.0"):
        SPECS[name].validate(mu=0.0)


def test_nesterov_sgd_needs_momentum_and_no_dampening():
    spec = get_spec("sgd")
    with pytest.raises(ValueError, match=r"momentum=0\.0"):
        spec.validate(nesterov=True, momentum=0.0)
    with pytest.raises(ValueError, match=r"dampening=0\.5"):
        spec.validate(nesterov=True, dampening=0.5)
    spec.validate(nesterov=True, momentum=0.9)


BAD_NS = ["bogus", (1.0, 2.0), ((3.0, -3.0, 1.0),), ("a", "b", "c"), (math.nan, 1.0, 1.0), (True, 1.0, 1.0), 3.0]


@pytest.mark.parametrize("name", ["muon", "deva_sinf"])
@pytest.mark.parametrize("coefficients", BAD_NS, ids=repr)
def test_bad_ns_coefficients_are_rejected_at_validation(name, coefficients):
    with pytest.raises(ValueError) as info:
        SPECS[name].validate(ns_coefficients=coefficients)
    assert "ns_coefficients" in str(info.value) and repr(coefficients) in str(info.value)


@pytest.mark.parametrize("name", ["muon", "deva_sinf"])
def test_good_ns_coefficients_are_accepted(name):
    spec = SPECS[name]
    spec.validate(ns_coefficients="cubic")
    spec.validate(ns_coefficients=(3.0, -3.2, 1.2))
    spec.validate(ns_coefficients=[(3.0, -3.2, 1.2)] * 3, ns_steps=3)


@pytest.mark.parametrize("name", ["muon", "deva_sinf"])
def test_bad_shape_scale(name):
    with pytest.raises(ValueError, match=r"shape_scale='sqrt'"):
        SPECS[name].validate(shape_scale="sqrt")


@pytest.mark.parametrize("value", [1.0, 1.5, math.nan, "x", True, None])
def test_deva_sinf_shampoo_beta(value):
    with pytest.raises(ValueError, match="shampoo_beta"):
        get_spec("deva_sinf").validate(shampoo_beta=value)
    get_spec("deva_sinf").validate(shampoo_beta=-1.0)
    get_spec("deva_sinf").validate(shampoo_beta=0.0)


def test_get_spec_by_name_and_title():
    for name, spec in SPECS.items():
        assert get_spec(name) is spec and get_spec(spec.title) is spec
    with pytest.raises(ValueError, match="'nadam'"):
        get_spec("nadam")


def test_get_spec_refuses_a_non_string_naming_the_swap():
    with pytest.raises(TypeError, match=r"optimizer=list is invalid: expected an optimizer name.*swapped"):
        get_spec([1.0, 2.0])
