"""Bad input to the NumPy adapter, every optimizer: a clear error with nothing changed (byte for byte), or the
documented result (``docs/reliability.md``).

Every failing call is bracketed by :func:`~reliability._cases.snapshot` of the parameters, ``state_dict()`` and
``param_groups``; :func:`~reliability._cases.assert_unchanged` names the first byte that moved.
"""

from __future__ import annotations

import copy
import math
import pickle

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reliability._cases import (
    GRADIENT_FILLS,
    MATRIX,
    MINIBATCH,
    NONFINITE_FILLS,
    ODD_SHAPES,
    OPTIMIZERS,
    assert_unchanged,
    bad_hyper_values,
    numeric_hypers,
    snapshot,
    state_garbles,
)
from xpoptim.adapters import numpy as xn

DTYPES = (np.float32, np.float64)

#: Rules whose step is proportional to a sum-form momentum (``m = mu m + g``, up to 10 |g| for mu = 0.9): near
#: the float maximum that momentum overflows, as torch.optim.SGD's buffer does (documented).
SUM_MOMENTUM_STEP = ("sgd", "msvag_mb")


def _params(dtype=np.float32, shapes=None) -> dict:
    shapes = shapes or {"w": (4, 3), "b": (3,)}
    rng = np.random.default_rng(0)
    return {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}


def _grads(params: dict, fill: float | None = None, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for k, p in params.items():
        if fill is None:
            out[k] = rng.standard_normal(p.shape).astype(p.dtype)
        else:
            with np.errstate(over="ignore"):
                signs = np.where(rng.random(p.shape) < 0.5, -1.0, 1.0)
                out[k] = (signs * fill).astype(p.dtype)
    return out


def _extras(name: str, params: dict, value: float = 0.01) -> dict:
    if name not in MINIBATCH:
        return {}
    return {"grad_variance": {k: np.full(p.shape, value, p.dtype) for k, p in params.items()}}


def _opt(name: str, params: dict, **hp):
    return xn.create(name, params, **hp)


def _snap(opt, params: dict):
    return snapshot((params, opt.state_dict(), opt.param_groups, opt.step_count))


def _stepped(name: str, dtype=np.float32, steps: int = 2, **hp):
    params = _params(dtype)
    opt = _opt(name, params, **hp)
    for s in range(steps):
        opt.step(_grads(params, seed=s), **_extras(name, params))
    return params, opt


# ------------------------------------------------------------------------------------------------------------------
# Hyperparameters: at construction, set between steps, in a group
# ------------------------------------------------------------------------------------------------------------------


def _hyper_cases():
    out = []
    for name in OPTIMIZERS:
        for h in numeric_hypers(name):
            for label, value in bad_hyper_values(h):
                out.append(pytest.param(name, h.name, value, id=f"{name}-{h.name}-{label}"))
    return out


HYPER_CASES = _hyper_cases()


@pytest.mark.parametrize(("name", "arg", "value"), HYPER_CASES)
def test_bad_hyperparameter_at_construction_is_refused(name, arg, value):
    with pytest.raises(ValueError, match=rf"(?s){arg}=.* is invalid.*expected"):
        _opt(name, _params(), **{arg: value})


@pytest.mark.parametrize(("name", "arg", "value"), HYPER_CASES[::3])
def test_bad_hyperparameter_set_between_steps_changes_nothing(name, arg, value):
    params, opt = _stepped(name)
    before = _snap(opt, params)
    with pytest.raises(ValueError, match=rf"(?s){arg}=.* is invalid"):
        opt.set_hyperparams(**{arg: value})
    assert_unchanged(before, _snap(opt, params))
    # written straight into a group: refused at the next step, before anything is written
    opt.param_groups[0][arg] = value
    before = _snap(opt, params)
    with pytest.raises(ValueError, match=rf"(?s){arg}=.* is invalid"):
        opt.step(_grads(params), **_extras(name, params))
    assert_unchanged(before, _snap(opt, params))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_bad_lr_in_the_second_group_leaves_the_first_group_alone(name):
    """The torch adapter used to step the first group and then raise on ``lr = np.array([1e-2, 2e-2])``."""
    a, b = _params(shapes={"a": (4, 3)}), _params(shapes={"b": (4, 3)})
    params = {**a, **b}
    opt = _opt(name, [{"params": a}, {"params": b}], lr=1e-2)
    opt.step(_grads(params), **_extras(name, params))
    opt.param_groups[1]["lr"] = np.array([1e-2, 2e-2])
    before = _snap(opt, params)
    with pytest.raises(ValueError, match=r"lr=array\(\[0\.01, 0\.02\]\) is invalid: got an array of shape \(2,\)"):
        opt.step(_grads(params), **_extras(name, params))
    assert_unchanged(before, _snap(opt, params))


@pytest.mark.parametrize("name", ["adamw", "muon", "msvag"])
@pytest.mark.parametrize("value", [np.array([2e-2]), np.array(2e-2), np.float32(2e-2)], ids=["1-element", "0-d", "np-scalar"])
def test_one_element_and_0d_hyperparameters_are_accepted(name, value):
    p1, p2 = _params(), _params()
    o1, o2 = _opt(name, p1, lr=value), _opt(name, p2, lr=float(np.asarray(value).reshape(())))
    for _ in range(2):
        o1.step(_grads(p1))
        o2.step(_grads(p2))
    for k in p1:
        np.testing.assert_array_equal(p1[k], p2[k])


@pytest.mark.parametrize("name", MATRIX)
def test_ns_dtype_is_checked_at_construction(name):
    with pytest.raises(ValueError, match=r"ns_dtype='float99' is invalid: expected None or a floating dtype"):
        _opt(name, _params(), ns_dtype="float99")
    with pytest.raises(ValueError, match=r"ns_dtype=.*int32.* is invalid"):
        _opt(name, _params(), ns_dtype=np.int32)


# ------------------------------------------------------------------------------------------------------------------
# Gradients: values, shapes, dtypes, structure
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("fill", list(GRADIENT_FILLS))
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_finite_gradients_never_give_nan(name, fill, dtype):
    value = GRADIENT_FILLS[fill]
    params = _params(dtype)
    opt = _opt(name, params, lr=1e-3)
    for s in range(3):
        before = _snap(opt, params)
        try:
            opt.step(_grads(params, value, seed=s), **_extras(name, params, 0.01 * min(value * value, 1e30)))
        except FloatingPointError as exc:  # DeVA_Sinf: Kronecker factors beyond the state dtype's range
            assert name == "deva_sinf" and dtype == np.float32 and value >= 1e20, exc
            assert "nothing was changed" in str(exc)
            assert_unchanged(before, _snap(opt, params))
            return
        for k, p in params.items():
            if name in SUM_MOMENTUM_STEP and fill == "near_max_f32" and dtype == np.float32:
                continue  # the momentum overflows to +-inf (then inf - inf), as torch.optim.SGD's: the policy table
            else:
                assert np.isfinite(p).all(), (name, fill, k, p)
        if name in SUM_MOMENTUM_STEP and fill == "near_max_f32" and dtype == np.float32:
            continue
        for k, entry in opt.state_dict()["state"].items():
            for sname, v in entry.items():
                assert v is None or not np.isnan(v).any(), (name, fill, k, sname)


@pytest.mark.parametrize("fill", list(NONFINITE_FILLS))
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_nonfinite_gradients_propagate_or_raise_with_nothing_changed(name, fill):
    """NaN/inf gradients are not inspected (a pass over memory per step): the elementwise rules propagate them
    into the parameter as torch.optim does; a matrix decomposition that fails raises with nothing changed."""
    params, opt = _stepped(name)
    before = _snap(opt, params)
    try:
        opt.step(_grads(params, NONFINITE_FILLS[fill]), **_extras(name, params))
    except FloatingPointError as exc:
        assert name == "deva_sinf" and "nothing was changed" in str(exc)
        assert_unchanged(before, _snap(opt, params))
    else:
        assert opt.step_count == 3


def _bad_grads(params: dict) -> list:
    w = params["w"]
    return [
        ("wrong_shape", {**params, "w": np.zeros((3, 4), w.dtype)}, ValueError, r"grads\['w'\] has shape \(3, 4\)"),
        ("wrong_dtype", {**params, "w": w.astype(np.float64)}, ValueError, r"grads\['w'\] has dtype float64"),
        ("int_dtype", {**params, "w": np.zeros(w.shape, np.int32)}, ValueError, r"has dtype int32"),
        ("complex", {**params, "w": w.astype(np.complex64)}, ValueError, r"has dtype complex64"),
        ("missing", {"w": w}, ValueError, r"missing \['b'\]"),
        ("extra", {**params, "c": w}, ValueError, r"unexpected \['c'\]"),
        ("none", {**params, "w": None}, ValueError, r"grads\['w'\] is None"),
        ("list", [w, params["b"]], TypeError, r"must be a dict"),
        ("python_list", {**params, "w": w.tolist()}, TypeError, r"grads\['w'\] is a list"),
    ]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_wrong_gradients_are_refused_with_nothing_changed(name):
    params, opt = _stepped(name)
    for label, grads, exc, message in _bad_grads(_grads(params)):
        before = _snap(opt, params)
        with pytest.raises(exc, match=message):
            opt.step(grads, **_extras(name, params))
        assert_unchanged(before, _snap(opt, params))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_foreign_array_gradients_are_refused(name):
    torch = pytest.importorskip("torch")
    params, opt = _stepped(name)
    grads = {k: torch.from_numpy(g) for k, g in _grads(params).items()}
    before = _snap(opt, params)
    with pytest.raises(TypeError, match=r"grads\['w'\] is a Tensor: expected an array of the parameters' namespace"):
        opt.step(grads, **_extras(name, params))
    assert_unchanged(before, _snap(opt, params))


@pytest.mark.parametrize("bad", [-1e-3, math.nan], ids=["negative", "nan"])
@pytest.mark.parametrize("name", MINIBATCH)
def test_negative_or_nan_grad_variance_is_refused(name, bad):
    params, opt = _stepped(name)
    extras = _extras(name, params)
    extras["grad_variance"]["w"][1, 1] = bad
    before = _snap(opt, params)
    with pytest.raises(ValueError, match=r"grad_variance\['w'\] holds a negative or NaN value"):
        opt.step(_grads(params), **extras)
    assert_unchanged(before, _snap(opt, params))


# ------------------------------------------------------------------------------------------------------------------
# Zero-size and 0-d parameters
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", list(ODD_SHAPES), ids=list(ODD_SHAPES))
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_zero_size_and_0d_parameters_step_and_checkpoint(name, shape):
    params = {"odd": np.ones(ODD_SHAPES[shape], np.float32), "w": np.ones((4, 3), np.float32)}
    opt = _opt(name, params, lr=1e-2)
    for s in range(3):
        opt.step(_grads(params, seed=s), **_extras(name, params))
    assert params["odd"].shape == ODD_SHAPES[shape] and np.isfinite(params["odd"]).all()
    sd = opt.state_dict()
    fresh = {k: np.ones_like(v) for k, v in params.items()}
    other = _opt(name, fresh, lr=1e-2)
    other.load_state_dict(sd)
    assert_unchanged(snapshot(sd), snapshot(other.state_dict()))


# ------------------------------------------------------------------------------------------------------------------
# Checkpoints: garbled, foreign, older, future
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_garbled_checkpoints_are_refused_with_nothing_changed(name):
    params, opt = _stepped(name)
    good = opt.state_dict()
    accepted = []
    for label, bad in state_garbles(good):
        before = _snap(opt, params)
        try:
            opt.load_state_dict(bad)
        except (ValueError, TypeError) as exc:
            assert str(exc), label
            assert_unchanged(before, _snap(opt, params))
        else:
            accepted.append(label)
    # An unknown top-level key is ignored, as torch's load_state_dict ignores one; nothing else loads.
    assert accepted == ["unknown_top_key"], accepted


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_foreign_optimizer_checkpoint_is_refused(name):
    params, opt = _stepped(name)
    other_name = "adamw" if name != "adamw" else "adam"
    _, other = _stepped(other_name)
    before = _snap(opt, params)
    with pytest.raises(ValueError, match="does not match this optimizer"):
        opt.load_state_dict(other.state_dict())
    assert_unchanged(before, _snap(opt, params))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_older_checkpoint_without_a_hyperparameter_loads_with_the_default(name):
    """A checkpoint written before a hyperparameter existed: the missing value takes the spec default."""
    params, opt = _stepped(name)
    sd = opt.state_dict()
    h = numeric_hypers(name)[-1]
    for g in sd["param_groups"]:
        g.pop(h.name)
    fresh = {k: v.copy() for k, v in params.items()}
    other = _opt(name, fresh, **{h.name: h.default})
    other.load_state_dict(sd)
    a, b = copy.deepcopy(params), copy.deepcopy(fresh)
    oa, ob = copy.deepcopy(opt), copy.deepcopy(other)
    oa.set_hyperparams(**{h.name: h.default})
    ga = _grads(a, seed=9)
    oa.step({k: ga[k] for k in a}, **_extras(name, a))
    ob.step({k: ga[k] for k in b}, **_extras(name, b))
    for k in a:
        np.testing.assert_array_equal(oa.param_groups[0]["params"][k] if isinstance(oa.param_groups[0]["params"], dict) else a[k], ob.param_groups[0]["params"][k] if isinstance(ob.param_groups[0]["params"], dict) else b[k])


# ------------------------------------------------------------------------------------------------------------------
# Copies
# ------------------------------------------------------------------------------------------------------------------


def _arrays(opt) -> list:
    out = []
    for g in opt.param_groups:
        p = g["params"]
        out += list(p.values()) if isinstance(p, dict) else list(p)
    return out


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_copies_continue_bit_for_bit_and_leave_the_original_alone(name, how):
    params, opt = _stepped(name)
    clone = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    before = _snap(opt, params)
    g = _grads(params, seed=5)
    clone.step(g, **_extras(name, params))
    assert_unchanged(before, _snap(opt, params))  # the copy owns its arrays
    opt.step(g, **_extras(name, params))
    for a, b in zip(_arrays(opt), _arrays(clone)):
        np.testing.assert_array_equal(a, b)
    assert_unchanged(snapshot(opt.state_dict()), snapshot(clone.state_dict()))


# ------------------------------------------------------------------------------------------------------------------
# float16 parameters with the matrix rules
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MATRIX)
def test_float16_parameters_run_the_matrix_rule_in_the_float32_state(name):
    p16 = {"w": (np.arange(12).reshape(4, 3) / 10).astype(np.float16)}
    p32 = {"w": p16["w"].astype(np.float32)}
    o16, o32 = _opt(name, p16, lr=1e-2), _opt(name, p32, lr=1e-2)
    assert o16.state_dict()["state"]["w"][next(iter(o16.state_dict()["state"]["w"]))].dtype == np.float32
    for s in range(12):
        g = np.random.default_rng(s).standard_normal((4, 3))
        o16.step({"w": g.astype(np.float16)})
        o32.step({"w": g.astype(np.float16).astype(np.float32)})
        p32["w"][...] = p32["w"].astype(np.float16).astype(np.float32)  # the float16 parameter's rounding
    assert p16["w"].dtype == np.float16 and np.isfinite(p16["w"]).all()
    np.testing.assert_array_equal(p16["w"].astype(np.float32), p32["w"])


# ------------------------------------------------------------------------------------------------------------------
# Random hyperparameters (hypothesis): valid ones step, invalid ones are refused with nothing changed
# ------------------------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(OPTIMIZERS),
    value=st.one_of(
        st.floats(allow_nan=True, allow_infinity=True, width=64),
        st.complex_numbers(allow_nan=False, allow_infinity=False),
        st.none(),
        st.booleans(),
        st.lists(st.floats(-1, 1), min_size=2, max_size=3).map(np.array),
    ),
    arg_index=st.integers(0, 5),
)
def test_any_hyperparameter_value_is_accepted_or_refused_cleanly(name, value, arg_index):
    hypers = numeric_hypers(name)
    h = hypers[arg_index % len(hypers)]
    params, opt = _stepped(name, steps=1)
    before = _snap(opt, params)
    try:
        h.check(value, name)
        valid = True
    except ValueError:
        valid = False
    try:
        opt.set_hyperparams(**{h.name: value})
        opt.step(_grads(params), **_extras(name, params))
    except ValueError as exc:
        assert not valid or "mu=" in str(exc) or "beta1=" in str(exc) or "nesterov" in str(exc), exc  # cross-field
        assert_unchanged(before, _snap(opt, params))
    else:
        assert valid


def test_deva_sinf_decomposition_failure_on_one_matrix_leaves_every_matrix_alone():
    """The torch adapter wrote ``a`` and then raised in ``b``'s eigh (a refresh step): here every matrix rule update
    is computed before the first write, so a failure changes nothing."""
    params = {"a": np.ones((4, 3), np.float32), "b": np.ones((5, 2), np.float32), "c": np.ones(3, np.float32)}
    opt = _opt("deva_sinf", params, precondition_frequency=10)
    for s in range(10):
        opt.step(_grads(params, seed=s))
    grads = _grads(params, seed=10)
    grads["b"] = np.full((5, 2), 1e20, np.float32)
    before = _snap(opt, params)
    with pytest.raises(FloatingPointError, match=r"DeVASinf: the matrix step of parameter\(s\) \['b'\] failed"):
        opt.step(grads)  # step 11: the eigenbases are refreshed
    assert_unchanged(before, _snap(opt, params))
