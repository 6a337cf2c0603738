"""Hyperparameter kinds are an enum, and one helper tells numbers, traced values and everything else apart.

* ``Hyper.kind`` is a :class:`HyperKind` (a ``str`` enum); a misspelled kind fails when the spec is built, so a
  kind spelled ``"nonnegative"`` can no longer accept -5.
* :func:`xpoptim.core._backend.real_scalar` is the one check for "a real number now / traced / neither" used by
  every validation: complex numbers, arrays of other sizes, ``None``, strings and other objects are refused (they
  used to be taken for traced values and skipped validation).
* A traced value is checked inside the graph (:meth:`traced_validity`), see ``docs/reliability.md``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from xpoptim.core import SPECS
from xpoptim.core._backend import real_scalar
from xpoptim.core.spec import Hyper, HyperKind, dtype_name


def test_a_misspelled_kind_fails_when_the_spec_is_built():
    with pytest.raises(ValueError, match=r"kind='nonnegative' is invalid: expected one of \['lr', 'beta'"):
        Hyper("x", 0.0, "nonnegative")
    with pytest.raises(ValueError, match="needs the allowed values"):
        Hyper("x", "a", "choice")


def test_every_spec_uses_the_enum():
    for spec in SPECS.values():
        for h in spec.hyperparams:
            assert isinstance(h.kind, HyperKind) and h.kind == h.kind.value  # str enum: "lr" == HyperKind.LR


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1, 1.0), (2.5, 2.5), (np.float32(0.5), 0.5), (np.array(0.25), 0.25), (np.array([0.125]), 0.125),
     (np.int64(3), 3.0), (math.nan, math.nan), (math.inf, math.inf)],
    ids=["int", "float", "np.float32", "0-d", "1-element", "np.int64", "nan", "inf"],
)
def test_real_scalar_reads_real_numbers(value, expected):
    got = real_scalar(value)
    assert got == expected or (math.isnan(got) and math.isnan(expected))


@pytest.mark.parametrize(
    ("value", "what"),
    [(None, "None"), (True, "a bool"), ("0.1", "a string"), (1e-3 + 0j, "a complex number"),
     (np.complex64(1), "dtype complex64"), (np.array([1.0, 2.0]), r"shape \(2,\)"), (np.zeros((0,)), r"shape \(0,\)"),
     (np.array([True]), "dtype bool"), (object(), "an object of type object"), ([0.1], "an object of type list")],
    ids=["None", "bool", "str", "complex", "np.complex64", "array2", "empty", "bool-array", "object", "list"],
)
def test_real_scalar_refuses_everything_else_and_says_what_it_got(value, what):
    with pytest.raises(TypeError, match=what):
        real_scalar(value)


def test_traced_jax_values_are_traced_and_checked_in_the_graph():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    spec = SPECS["adamw"]
    seen = []

    @jax.jit
    def f(lr, beta1):
        seen.append(real_scalar(lr))
        hp = spec.validate(lr=lr, beta1=beta1)  # traced values pass validation...
        ok, names = spec.traced_validity(hp)  # ...and are checked in the graph
        assert names == ("lr", "beta1")
        return ok

    assert bool(f(jnp.float32(1e-3), jnp.float32(0.9)))
    assert not bool(f(jnp.float32(-1.0), jnp.float32(0.9)))
    assert not bool(f(jnp.float32(1e-3), jnp.float32(1.5)))
    assert not bool(f(jnp.float32(math.nan), jnp.float32(0.9)))
    assert not bool(f(jnp.float32(math.inf), jnp.float32(0.9)))
    assert seen == [None]  # traced: neither a number nor an error


def test_traced_guard_is_none_without_traced_values():
    assert SPECS["adamw"].traced_guard(np, SPECS["adamw"].validate(lr=1e-3)) is None


@pytest.mark.parametrize("value", ["float32", "bfloat16", np.float16, np.dtype("float64")])
def test_dtype_names(value):
    assert dtype_name(value) in ("float16", "bfloat16", "float32", "float64")


@pytest.mark.parametrize("value", ["float99", np.int32, "int8", 3])
def test_dtype_names_refused(value):
    assert dtype_name(value) is None


def test_torch_dtypes_are_dtypes():
    torch = pytest.importorskip("torch")
    assert dtype_name(torch.bfloat16) == "bfloat16" and dtype_name(torch.int32) is None
    SPECS["muon"].validate(ns_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="ns_dtype=torch.int64 is invalid"):
        SPECS["muon"].validate(ns_dtype=torch.int64)
