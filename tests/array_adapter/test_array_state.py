"""Checkpoints: round trip, resume on another backend, refusal of bad state dicts."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
from array_helpers import SHAPES, Backend, _data, settings

from xpoptim.adapters import array as A
from xpoptim.core import SPECS, STATE_VERSION, get_spec

SPLIT = 3  # save after this many steps
TOTAL = 6


def _run(opt: A.Optimizer, backend: Backend, grads: list, var: list, steps: range) -> None:
    needs = bool(getattr(opt.spec, "extras", ()))
    for t in steps:
        ex = {"grad_variance": [backend.asarray(v) for v in var[t]]} if needs else {}
        opt.step([backend.asarray(g) for g in grads[t]], **ex)


def _numpy_backend() -> Backend:
    return Backend("numpy")


@pytest.mark.parametrize("name", list(SPECS))
def test_round_trip_resumes_the_same_trajectory(name: str) -> None:
    np_b = _numpy_backend()
    params, grads, var = _data(21, TOTAL)
    straight = [p.copy() for p in params]
    opt = A.create(name, straight, chunk_size=16, **settings(name))
    _run(opt, np_b, grads, var, range(TOTAL))

    first = [p.copy() for p in params]
    opt1 = A.create(name, first, chunk_size=16, **settings(name))
    _run(opt1, np_b, grads, var, range(SPLIT))
    sd = pickle.loads(pickle.dumps(opt1.state_dict()))  # plain picklable NumPy content
    assert sd["version"] == STATE_VERSION and sd["optimizer"] == get_spec(name).name and sd["step"] == SPLIT
    for entry in sd["state"].values():
        assert all(v is None or type(v) is np.ndarray for v in entry.values())
    resumed = [p.copy() for p in first]
    opt2 = A.create(name, resumed, chunk_size=None)  # default hyperparameters: restored from the checkpoint
    opt2.load_state_dict(sd)
    assert opt2.step_count == SPLIT and opt2.lr == settings(name)["lr"]
    _run(opt2, np_b, grads, var, range(SPLIT, TOTAL))
    for a, b in zip(resumed, straight):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["adamw", "mvngrad", "msvag_mb", "muon", "deva_sinf"])
@pytest.mark.parametrize("other", ["strict", "torch"])
@pytest.mark.parametrize("direction", ["numpy_to_other", "other_to_numpy"])
def test_cross_backend_resume(name: str, other: str, direction: str) -> None:
    pytest.importorskip("array_api_strict" if other == "strict" else "torch")
    params, grads, var = _data(33, TOTAL, SHAPES)
    b_np, b_other = Backend("numpy"), Backend(other)
    first_b, second_b = (b_np, b_other) if direction == "numpy_to_other" else (b_other, b_np)

    straight = [p.copy() for p in params]
    opt = A.create(name, straight, chunk_size=16, **settings(name))
    _run(opt, b_np, grads, var, range(TOTAL))

    arrays1 = [first_b.asarray(p) for p in params]
    opt1 = A.create(name, arrays1, **settings(name))
    _run(opt1, first_b, grads, var, range(SPLIT))
    sd = opt1.state_dict()
    arrays2 = [second_b.asarray(first_b.to_numpy(a)) for a in arrays1]
    opt2 = A.create(name, arrays2)
    opt2.load_state_dict(sd)
    _run(opt2, second_b, grads, var, range(SPLIT, TOTAL))
    for a, r in zip(arrays2, straight):
        np.testing.assert_allclose(second_b.to_numpy(a), r, rtol=1e-12, atol=1e-14)


def test_state_dict_layout_uses_core_state_names() -> None:
    params = {"w": np.ones((3, 4)), "b": np.ones(3), "c": np.ones((2, 3, 2))}
    sd = A.Muon(params).state_dict()
    assert sd["state"]["w"]["momentum_buffer"].shape == (3, 4)
    assert sd["state"]["c"]["momentum_buffer"].shape == (2, 6)  # flattened matrix (out, in*k)
    assert set(sd["state"]["b"]) == set(get_spec("adamw").state)
    assert sd["param_groups"][0]["keys"] == ["w", "b", "c"]
    assert "lr" not in sd["param_groups"][0]["fallback_hyperparams"]  # the fallback lr follows the group lr
    sd = A.DeVASinf({"w": np.ones((3, 4)), "b": np.ones(3)}, max_precond_dim=3).state_dict()
    assert sd["state"]["w"]["R"] is None and sd["state"]["w"]["L"].shape == (3, 3)
    assert set(sd["state"]["b"]) == set(get_spec("deva_linf").state)


def _opt_with_state() -> tuple:
    rng = np.random.default_rng(0)
    params = [rng.standard_normal((3, 4)), rng.standard_normal(5)]
    opt = A.AdamW(params, lr=0.1)
    opt.step([rng.standard_normal((3, 4)), rng.standard_normal(5)])
    return opt, params


def _bad(sd: dict, how: str) -> dict:
    sd = copy.deepcopy(sd)
    if how == "version":
        sd["version"] = STATE_VERSION + 1
    elif how == "optimizer":
        sd["optimizer"] = "adam"
    elif how == "missing_key":
        del sd["step"]
    elif how == "step":
        sd["step"] = -1
    elif how == "param_key":
        sd["state"][7] = sd["state"].pop(1)
    elif how == "state_name":
        sd["state"][0]["m"] = sd["state"][0].pop("exp_avg")
    elif how == "shape":
        sd["state"][0]["exp_avg"] = np.zeros((4, 3))
    elif how == "dtype":
        sd["state"][0]["exp_avg"] = np.zeros((3, 4), dtype=np.int64)
    elif how == "hyperparam":
        sd["param_groups"][0]["lr"] = -1.0
    elif how == "groups":
        sd["param_groups"].append(dict(sd["param_groups"][0]))
    return sd


@pytest.mark.parametrize(
    "how,match",
    [
        ("version", "version"),
        ("optimizer", "optimizer"),
        ("missing_key", "missing"),
        ("step", "step"),
        ("param_key", "keys"),
        ("state_name", "state"),
        ("shape", "shape"),
        ("dtype", "dtype"),
        ("hyperparam", "lr"),
        ("groups", "param groups"),
    ],
)
def test_bad_state_dict_is_refused_and_changes_nothing(how: str, match: str) -> None:
    opt, params = _opt_with_state()
    sd = opt.state_dict()
    before = opt.state_dict()
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(_bad(sd, how))
    after = opt.state_dict()
    assert after["step"] == before["step"] and after["param_groups"] == before["param_groups"]
    for k in before["state"]:
        for n in before["state"][k]:
            np.testing.assert_array_equal(after["state"][k][n], before["state"][k][n])


def test_checkpoint_checks_name_the_entry_and_what_the_layout_expects() -> None:
    """The checks are core.check_state_entry's against core.state_layout: the message names the entry, the buffer,
    what it holds and what the spec's layout expects."""
    opt, _ = _opt_with_state()
    sd = opt.state_dict()
    with pytest.raises(ValueError, match=r"state_dict\['state'\]\[0\]\['exp_avg'\] has shape \(4, 3\): expected \(3, 4\)"):
        opt.load_state_dict(_bad(sd, "shape"))
    with pytest.raises(ValueError, match=r"state_dict\['state'\]\[0\] has state \['exp_avg_sq', 'm'\]: expected \['exp_avg', 'exp_avg_sq'\]"):
        opt.load_state_dict(_bad(sd, "state_name"))
    bad = copy.deepcopy(sd)
    bad["state"][0]["exp_avg"] = None
    with pytest.raises(ValueError, match=r"\['exp_avg'\] is None: expected an array"):
        opt.load_state_dict(bad)


def test_checkpoint_whose_hyperparameters_change_the_state_layout_is_refused_byte_for_byte() -> None:
    """A DeVA_Sinf checkpoint taken with max_precond_dim=2 keeps no factor for a side of 3 or 4; loading it into an
    optimizer that keeps both factors would leave buffers without values: refused, nothing changed."""
    rng = np.random.default_rng(0)
    small = [rng.standard_normal((3, 4))]
    src = A.create("deva_sinf", small, max_precond_dim=2)
    for _ in range(2):
        src.step([rng.standard_normal((3, 4))])
    params = [rng.standard_normal((3, 4))]
    opt = A.create("deva_sinf", params)
    for _ in range(2):
        opt.step([rng.standard_normal((3, 4))])
    before = copy.deepcopy(opt.state_dict())
    p_before = params[0].tobytes()
    with pytest.raises(ValueError, match=r"state_dict\['state'\]\[0\]: the checkpoint's hyperparameters give the state layout"):
        opt.load_state_dict(src.state_dict())
    after = opt.state_dict()
    assert params[0].tobytes() == p_before and after["step"] == before["step"]
    assert after["param_groups"] == before["param_groups"]
    for n, v in before["state"][0].items():
        assert (v is None and after["state"][0][n] is None) or v.tobytes() == after["state"][0][n].tobytes(), n


def test_load_state_dict_rejects_non_mapping() -> None:
    opt, _ = _opt_with_state()
    with pytest.raises(TypeError, match="dict"):
        opt.load_state_dict([1, 2])


def test_state_dict_is_a_copy() -> None:
    opt, params = _opt_with_state()
    sd = opt.state_dict()
    sd["state"][0]["exp_avg"][...] = 123.0
    assert not np.any(opt.state_dict()["state"][0]["exp_avg"] == 123.0)


@pytest.mark.parametrize("name", ["adamw", "muon", "msvag_mb"])
def test_checkpoint_moves_to_jax_functional_and_back(name: str) -> None:
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    params, grads, var = _data(44, TOTAL)
    needs = bool(getattr(get_spec(name), "extras", ()))
    straight = [p.copy() for p in params]
    opt = A.create(name, straight, **settings(name))
    for t in range(TOTAL):
        opt.step(grads[t], **({"grad_variance": var[t]} if needs else {}))

    first = [p.copy() for p in params]
    opt1 = A.create(name, first, **settings(name))
    for t in range(2):
        opt1.step(grads[t], **({"grad_variance": var[t]} if needs else {}))
    with jax.enable_x64(True):
        tx = A.functional(name, **settings(name))
        cur = [jnp.asarray(p) for p in first]
        state = tx.load_state_dict(opt1.state_dict(), cur)
        for t in range(2, 4):
            ex = {"grad_variance": [jnp.asarray(v) for v in var[t]]} if needs else {}
            cur, state = tx.update([jnp.asarray(g) for g in grads[t]], state, cur, **ex)
        back = [np.array(c) for c in cur]
        sd = tx.state_dict(state)
    assert sd["step"] == 4
    opt2 = A.create(name, back, **settings(name))
    opt2.load_state_dict(sd)
    for t in range(4, TOTAL):
        opt2.step(grads[t], **({"grad_variance": var[t]} if needs else {}))
    for a, r in zip(back, straight):
        np.testing.assert_allclose(a, r, rtol=1e-12, atol=1e-14)
