"""The snapshot helpers themselves: a change of one bit anywhere is reported, an untouched copy is not."""

from __future__ import annotations

import numpy as np
import pytest

from xpoptim.core import BUILTIN, SPECS

from reliability._cases import GRADIENT_FILLS, OPTIMIZERS, assert_unchanged, bad_hyper_values, numeric_hypers, snapshot, state_garbles


def test_snapshot_sees_one_bit() -> None:
    a = {"w": np.zeros(3, np.float32), "s": [np.ones((2, 2)), 3]}
    before = snapshot(a)
    assert_unchanged(before, snapshot(a))
    a["w"].view(np.uint32)[1] = 1  # the smallest subnormal
    with pytest.raises(AssertionError, match="bytes differ"):
        assert_unchanged(before, snapshot(a))


def test_snapshot_sees_dtype_shape_and_values() -> None:
    base = snapshot({"x": np.zeros(2), "n": 1})
    for other in ({"x": np.zeros(2, np.float32), "n": 1}, {"x": np.zeros((2, 1)), "n": 1}, {"x": np.zeros(2), "n": 2}):
        with pytest.raises(AssertionError):
            assert_unchanged(base, snapshot(other))


def test_snapshot_torch_bits() -> None:
    torch = pytest.importorskip("torch")
    t = torch.zeros((), dtype=torch.bfloat16)
    before = snapshot([t])
    t.add_(torch.tensor(2.0**-130, dtype=torch.bfloat16))
    with pytest.raises(AssertionError):
        assert_unchanged(before, snapshot([t]))


def test_garbles_leave_the_input_alone() -> None:
    sd = {"version": 1, "step": 3, "state": {"w": {"m": np.ones(2)}}, "param_groups": [{"lr": 0.1, "keys": ["w"]}]}
    before = snapshot(sd)
    labels = [label for label, _ in state_garbles(sd)]
    assert_unchanged(before, snapshot(sd))
    for want in ("future_version", "step_none", "state_int64", "state_wrong_shape", "missing_state", "group_lr_complex"):
        assert want in labels


def test_tables_cover_every_optimizer() -> None:
    assert len(BUILTIN) == 15 and set(BUILTIN) <= set(OPTIMIZERS) == set(SPECS)  # shipped + any rule registered for the run
    assert GRADIENT_FILLS["huge"] == 1e20
    for name in OPTIMIZERS:
        for h in numeric_hypers(name):
            assert len(bad_hyper_values(h)) >= len(("complex", "array", "object", "None"))
