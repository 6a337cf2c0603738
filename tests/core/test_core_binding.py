"""Elementwise rules are called by name: a spec whose names do not match its rule is refused when it is built.

A rule's state buffers and extra inputs go to the parameters of the same name (or the one ``arguments`` maps them
to), the values of ``scalars`` to the remaining parameters, and the new state comes back in the rule's order. So a
spec that lists its state in another order binds the same buffers (its numbers do not change), and a spec whose
state names are not the rule's (a swapped or renamed buffer with no mapping) cannot be built.

The expected moments after one step are the closed forms m_1 = (1 - b1) g, v_1 = (1 - b2) g^2 (Kingma & Ba, Alg. 1).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from xpoptim.core import ADAMW, ElementwiseSpec, Hyper, functional, make_direction_kernel
from xpoptim.core.adam_family import adam_direction


def _one_step(spec: ElementwiseSpec, g: np.ndarray) -> dict:
    p = np.zeros_like(g)
    hp = spec.validate()
    state = functional.init(spec, p, hp)
    _, new = functional.step(spec, p, g, state, hp, 1)
    return new


G = np.array([0.5, -2.0, 3.0, 1e-3])


def test_state_buffers_hold_their_own_moments_whatever_their_order() -> None:
    b1, b2 = ADAMW.defaults["beta1"], ADAMW.defaults["beta2"]
    swapped = dataclasses.replace(ADAMW, state=("exp_avg_sq", "exp_avg"))
    for spec in (ADAMW, swapped):
        st = _one_step(spec, G)
        np.testing.assert_allclose(st["exp_avg"], (1 - b1) * G, rtol=1e-15)
        np.testing.assert_allclose(st["exp_avg_sq"], (1 - b2) * G * G, rtol=1e-15)


def test_a_swapped_spec_without_its_mapping_is_refused() -> None:
    """adam_direction(xp, g, m, v, ...): state named ("exp_avg_sq", "exp_avg") with nothing saying which is m."""
    with pytest.raises(ValueError, match=r"AdamW: the rule adam_direction\(xp, g, m, v, .*\) has no parameter for 'exp_avg_sq', 'exp_avg'"):
        dataclasses.replace(ADAMW, state=("exp_avg_sq", "exp_avg"), arguments=None)


def test_a_mapping_to_a_parameter_the_rule_lacks_is_refused() -> None:
    with pytest.raises(ValueError, match=r"has no parameter for 'exp_avg_sq' \(as 'w'\)"):
        dataclasses.replace(ADAMW, arguments={"exp_avg": "m", "exp_avg_sq": "w"})
    with pytest.raises(ValueError, match=r"arguments names \['momentum'\], which are not extras or state"):
        dataclasses.replace(ADAMW, arguments={"exp_avg": "m", "exp_avg_sq": "v", "momentum": "m"})
    with pytest.raises(ValueError, match=r"two of the spec's extras/state"):
        dataclasses.replace(ADAMW, arguments={"exp_avg": "m", "exp_avg_sq": "m"})


def test_scalars_that_do_not_match_the_rule_are_refused() -> None:
    four = lambda hp, t, ops=None: (hp["beta1"], hp["beta2"], hp["eps"], 1.0)  # noqa: E731
    with pytest.raises(ValueError, match=r"scalars returns 4 value\(s\) but the rule .* takes 5 scalar\(s\) \['beta1', 'beta2', 'eps', 'bc1', 'sqrt_bc2'\]"):
        dataclasses.replace(ADAMW, scalars=four)
    named = lambda hp, t, ops=None: {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "bc1": 1.0, "bc2": 1.0}  # noqa: E731
    with pytest.raises(ValueError, match=r"scalars returns the names \[.*'bc2'.*\] but the rule .* takes the scalars"):
        dataclasses.replace(ADAMW, scalars=named)


def test_a_keyword_only_parameter_must_be_a_static_switch() -> None:
    def rule(xp, g, exp_avg, beta, *, flavour):  # noqa: ANN001, ANN202
        return g, exp_avg

    with pytest.raises(TypeError, match=r"keyword-only parameter 'flavour' is neither a static hyperparameter"):
        ElementwiseSpec(
            name="r", title="R", hyperparams=(Hyper("lr", 0.1, "lr"), Hyper("weight_decay", 0.0, "nonneg"), Hyper("beta", 0.9, "beta")),
            state=("exp_avg",), scalars=lambda hp, t, ops=None: (hp["beta"],), direction=rule,
        )


def test_named_scalars_are_bound_by_name() -> None:
    """``scalars`` may return a mapping, in any order: the rule gets each value under its name."""
    named = lambda hp, t, ops=None: {  # noqa: E731
        "sqrt_bc2": float(np.sqrt(1 - hp["beta2"] ** t)), "bc1": 1 - hp["beta1"] ** t,
        "eps": hp["eps"], "beta2": hp["beta2"], "beta1": hp["beta1"],
    }
    spec = dataclasses.replace(ADAMW, scalars=named)
    assert spec.binding.scalars == ("beta1", "beta2", "eps", "bc1", "sqrt_bc2")
    p = np.array([1.0, -1.0, 0.25, 2.0])
    for t in (1, 2, 3):
        a = functional.step(spec, p, G, functional.init(spec, p), spec.validate(), t)
        b = functional.step(ADAMW, p, G, functional.init(ADAMW, p), ADAMW.validate(), t)
        np.testing.assert_array_equal(a[0], b[0])


def test_the_direction_kernel_returns_state_in_spec_order() -> None:
    """The rule returns (d, m, v); a spec listing (exp_avg_sq, exp_avg) gets (d, v, m) from its kernel."""
    swapped = dataclasses.replace(ADAMW, state=("exp_avg_sq", "exp_avg"))
    m0, v0 = np.full(4, 0.1), np.full(4, 0.2)
    scal = ADAMW.rule_scalars(ADAMW.validate(), 1)
    d, m, v = adam_direction(np, G, m0, v0, *scal)
    d2, v2, m2 = make_direction_kernel(swapped, np, {})(G, v0, m0, *scal)
    np.testing.assert_array_equal(d2, d)
    np.testing.assert_array_equal(m2, m)
    np.testing.assert_array_equal(v2, v)
