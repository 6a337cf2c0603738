"""``xpoptim.testing``: the assertions say which step, which parameter and how far apart."""

from __future__ import annotations

import numpy as np
import pytest

from xpoptim.testing import assert_backends_agree, assert_trajectories_close


def _traj(n=5):
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(3, 4)), rng.normal(size=(4,))
    out = []
    for t in range(n):
        w, b = w * 0.9 + 0.01 * t, b - 0.1
        out.append({"w": w.copy(), "b": b.copy()})
    return out


def test_identical_trajectories_pass():
    assert_trajectories_close(_traj(), _traj(), rtol=0, atol=0)


def test_message_names_step_parameter_distance_and_index():
    desired = _traj()
    actual = _traj()
    actual[3]["w"][1, 2] += 1e-4
    actual[4]["w"][0, 0] += 1e-2  # a later, larger deviation
    with pytest.raises(AssertionError) as info:
        assert_trajectories_close(actual, desired, rtol=1e-7, atol=1e-9, label="torch-cpu float32")
    msg = str(info.value)
    assert msg.startswith("torch-cpu float32: trajectories differ first at step 3, parameter 'w'")
    assert "1 of 12 elements" in msg
    assert "max abs error 1.000e-04 at index (1, 2)" in msg
    assert "max rel error" in msg
    assert "worst: step 4, parameter 'w' (max abs error 1.000e-02 at index (0, 0))" in msg


def test_tolerances_are_respected():
    desired = _traj()
    actual = _traj()
    actual[2]["b"] = actual[2]["b"] * (1 + 1e-6)
    assert_trajectories_close(actual, desired, rtol=2e-6)
    with pytest.raises(AssertionError, match="step 2, parameter 'b'"):
        assert_trajectories_close(actual, desired, rtol=1e-7)


def test_structure_mismatches_and_nan():
    d = _traj()
    with pytest.raises(AssertionError, match="different lengths: actual 4 steps, desired 5"):
        assert_trajectories_close(d[:4], d)
    with pytest.raises(AssertionError, match="step 0: parameter names differ"):
        assert_trajectories_close([{"w": d[0]["w"]}] + d[1:], d)
    with pytest.raises(AssertionError, match="shapes differ"):
        assert_trajectories_close([{"w": d[0]["w"].T, "b": d[0]["b"]}] + d[1:], d)
    a = _traj()
    a[1]["b"][2] = np.nan
    with pytest.raises(AssertionError, match=r"step 1, parameter 'b'.*index \(2,\)"):
        assert_trajectories_close(a, d, rtol=1e-3)
    # plain sequences of arrays and single arrays are accepted (parameters named by position)
    assert_trajectories_close([[x["w"], x["b"]] for x in d], [[x["w"], x["b"]] for x in d])
    with pytest.raises(AssertionError, match="step 0, parameter '0'"):
        assert_trajectories_close(np.ones(3), np.zeros(3))


def _user_fn(xp, dtype, device):
    kw = {} if device is None else {"device": device}
    w = xp.asarray([1.0, -2.0, 0.5], dtype=dtype, **kw)
    out = []
    for _ in range(6):
        w = w - 0.1 * xp.sin(w) * xp.exp(-w * w)
        out.append({"w": w})
    return out


def test_backends_agree_on_a_user_function():
    assert_backends_agree(_user_fn, dtypes=("float64", "float32"))


def test_backends_disagree_names_backend_step_and_parameter():
    def fn(xp, dtype, device):
        traj = _user_fn(xp, dtype, device)
        if "strict" in xp.__name__:  # a deliberately backend-dependent bug from step 4 on
            traj[4] = {"w": traj[4]["w"] * 1.001}
        return traj

    pytest.importorskip("array_api_strict", reason="needs array-api-strict (the backend with the bug)")
    with pytest.raises(AssertionError) as info:
        assert_backends_agree(fn, backends="numpy,strict")
    msg = str(info.value)
    assert "backends disagree with NumPy float64 (1 case(s))" in msg
    assert "array_api_strict float64: trajectories differ first at step 4, parameter 'w'" in msg


def test_backends_agree_for_an_optimizer_and_reports_where_not():
    assert_backends_agree("laprop", backends="numpy,strict", dtypes=("float64", "float32"), steps=4, problems=["quadratic"])
    # A zero bound: float32 arithmetic beyond the parameter's own rounding must show up, located. (LaProp's float32
    # deviation on this problem lies entirely within the representation floor; Muon's Newton-Schulz matmuls add
    # rounding of the step itself.)
    with pytest.raises(AssertionError) as info:
        assert_backends_agree("muon", backends="numpy", dtypes=("float32",), steps=4, problems=["matrix"], rtol=0.0)
    msg = str(info.value)
    assert msg.startswith("Muon disagrees with its float64 NumPy reference")
    assert "core/numpy float32: error" in msg and "at matrix/" in msg and " step " in msg and " index [" in msg


def test_bad_arguments():
    with pytest.raises(ValueError, match="optimizer='nope' is unknown"):
        assert_backends_agree("nope", backends="numpy")
    with pytest.raises(TypeError, match="expected an optimizer name or a callable"):
        assert_backends_agree(3, backends="numpy")
    with pytest.raises(ValueError, match="rtol=-1"):
        assert_trajectories_close(np.ones(2), np.ones(2), rtol=-1)
