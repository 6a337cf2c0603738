"""Bad input gets a clear error, and a step that raises leaves parameters and state as they were."""

from __future__ import annotations

import numpy as np
import pytest

from xpoptim.adapters import array as A
from xpoptim.adapters import numpy as N


def _setup(name: str = "adamw", **kw) -> tuple:
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((3, 4)), "b": rng.standard_normal(4), "s": rng.standard_normal(())}
    grads = {k: rng.standard_normal(v.shape) for k, v in params.items()}
    opt = A.create(name, params, chunk_size=4, **kw)
    opt.step(grads)  # non-zero state
    return opt, params, grads


def _snapshot(opt: A.Optimizer, params: dict) -> tuple:
    return {k: v.copy() for k, v in params.items()}, opt.state_dict()


def _assert_unchanged(opt: A.Optimizer, params: dict, snap: tuple) -> None:
    p_before, sd_before = snap
    for k, v in params.items():
        np.testing.assert_array_equal(v, p_before[k])
    sd = opt.state_dict()
    assert sd["step"] == sd_before["step"]
    for k in sd["state"]:
        for n, v in sd["state"][k].items():
            np.testing.assert_array_equal(v, sd_before["state"][k][n])


def test_read_only_numpy_array_is_refused_at_construction() -> None:
    p = np.ones(3)
    p.flags.writeable = False
    with pytest.raises(ValueError, match="read-only.*functional"):
        A.Adam([p])


def test_read_only_at_step_changes_nothing() -> None:
    opt, params, grads = _setup()
    snap = _snapshot(opt, params)
    params["b"].flags.writeable = False
    with pytest.raises(ValueError, match=r"'b'.*read-only"):
        opt.step(grads)
    params["b"].flags.writeable = True
    _assert_unchanged(opt, params, snap)


def test_jax_arrays_point_to_the_functional_api() -> None:
    jnp = pytest.importorskip("jax.numpy")
    with pytest.raises(TypeError, match="immutable.*functional"):
        A.AdamW([jnp.ones(3)])


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda g: g.__setitem__("w", np.ones((4, 3))), ValueError, r"grads\['w'\] has shape \(4, 3\).*\(3, 4\)"),
        (lambda g: g.__setitem__("b", np.ones(4, dtype=np.float32)), ValueError, r"grads\['b'\] has dtype float32.*float64"),
        (lambda g: g.__setitem__("b", [1.0, 2.0, 3.0, 4.0]), TypeError, r"grads\['b'\] is a list"),
        (lambda g: g.__setitem__("b", None), ValueError, r"grads\['b'\] is None"),
        (lambda g: g.pop("s"), ValueError, r"missing \['s'\]"),
        (lambda g: g.__setitem__("zz", np.ones(2)), ValueError, r"unexpected \['zz'\]"),
    ],
)
def test_bad_grads_change_nothing(mutate, exc, match) -> None:
    opt, params, grads = _setup()
    snap = _snapshot(opt, params)
    bad = dict(grads)
    mutate(bad)
    with pytest.raises(exc, match=match):
        opt.step(bad)
    _assert_unchanged(opt, params, snap)


def test_grads_structure_must_match() -> None:
    opt, params, grads = _setup()
    with pytest.raises(TypeError, match="dict"):
        opt.step(list(grads.values()))
    lst = [np.ones(3), np.ones(2)]
    opt2 = A.Adam(lst)
    with pytest.raises(ValueError, match="got 1 arrays for 2"):
        opt2.step([np.ones(3)])
    with pytest.raises(TypeError, match="list of arrays"):
        opt2.step({"a": np.ones(3)})


def test_grads_from_another_namespace() -> None:
    torch = pytest.importorskip("torch")
    opt = A.Adam([np.ones(3)])
    with pytest.raises(TypeError, match=r"grads\[0\] is a Tensor"):
        opt.step([torch.ones(3, dtype=torch.float64)])


def test_bad_hyperparameters_at_construction() -> None:
    with pytest.raises(ValueError, match=r"lr=-0.1 is invalid.*>= 0"):
        A.Adam([np.ones(3)], lr=-0.1)
    with pytest.raises(ValueError, match=r"beta1=1.0"):
        A.AdamW([np.ones(3)], beta1=1.0)
    with pytest.raises(TypeError, match=r"unknown hyperparameter\(s\) \['momentum'\]"):
        A.AdamW([np.ones(3)], momentum=0.9)
    with pytest.raises(ValueError, match="layout='xy'"):
        A.Muon([np.ones((2, 2))], layout="xy")
    with pytest.raises(ValueError, match="chunk_size=0"):
        A.Adam([np.ones(3)], chunk_size=0)
    with pytest.raises(TypeError, match="fallback"):
        A.Adam([np.ones(3)], fallback="adamw")
    with pytest.raises(ValueError, match="fallback='muon'"):
        A.Muon([np.ones((2, 2))], fallback="muon")
    with pytest.raises(ValueError, match="lr=-1"):
        A.Muon([np.ones((2, 2))], fallback_hyperparams={"lr": -1})
    with pytest.raises(ValueError, match="optimizer='nope'"):
        A.create("nope", [np.ones(3)])


def test_bad_hyperparameter_set_between_steps_changes_nothing() -> None:
    opt, params, grads = _setup()
    snap = _snapshot(opt, params)
    with pytest.raises(ValueError, match="lr"):
        opt.set_hyperparams(lr=-1.0)
    with pytest.raises(ValueError, match="lr"):
        opt.lr = float("nan")
    assert opt.lr == 1e-3
    opt.param_groups[0]["beta2"] = 1.5  # written directly: checked at the step
    with pytest.raises(ValueError, match="beta2=1.5"):
        opt.step(grads)
    _assert_unchanged(opt, params, snap)


def test_bad_params() -> None:
    with pytest.raises(TypeError, match="single ndarray: wrap it in a list"):
        A.Adam(np.ones(3))
    with pytest.raises(ValueError, match="empty"):
        A.Adam([])
    with pytest.raises(ValueError, match="real floating"):
        A.Adam([np.ones(3, dtype=np.int64)])
    with pytest.raises(ValueError, match="real floating"):
        A.Adam([np.ones(3, dtype=np.complex128)])
    p = np.ones(3)
    with pytest.raises(ValueError, match="more than once"):
        A.Adam([p, p])
    with pytest.raises(TypeError, match="expected an array"):
        A.Adam([np.ones(3), [1.0, 2.0]])


def test_parameters_sharing_elements_are_refused() -> None:
    """Views with common elements are refused by name (the step would update them in place through several
    paths and threads); views that only interleave, or touch, have elements of their own and are accepted."""
    base = np.zeros(12, np.float32)
    with pytest.raises(ValueError, match="parameters 'a' and 'b' share memory"):
        N.AdamW({"a": base[:8], "b": base[4:]})
    with pytest.raises(ValueError, match="parameters 'big' and 'tail' share memory"):
        N.AdamW({"big": base, "other": np.zeros(2, np.float32), "tail": base[10:]})  # not neighbours by address
    with pytest.raises(ValueError, match="share memory"):
        N.AdamW({"w": base.reshape(3, 4).T, "row": base[4:8]})  # a transposed view and a slice of its memory
    N.AdamW({"a": base[:4], "b": base[4:8]})
    N.AdamW({"even": base[::2], "odd": base[1::2]})


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("fuse", [True, False])
def test_interleaved_views_step_like_separate_arrays(threads: int, fuse: bool) -> None:
    """``x[::2]`` and ``x[1::2]`` as two parameters end on the bits of two separate arrays, compiled or op by op,
    on one thread or two (each large enough to be split)."""
    n = 1 << 17

    def run(interleaved: bool) -> np.ndarray:
        base = np.linspace(-1, 1, 2 * n).astype(np.float32)
        params = {"a": base[::2], "b": base[1::2]} if interleaved else {"a": base[::2].copy(), "b": base[1::2].copy()}
        opt = N.AdamW(params, lr=0.1, threads=threads, fuse=fuse)
        rng = np.random.default_rng(0)
        for _ in range(3):
            opt.step({"a": rng.standard_normal(n).astype(np.float32), "b": rng.standard_normal(n).astype(np.float32)})
        out = np.empty(2 * n, np.float32)
        out[::2], out[1::2] = params["a"], params["b"]
        return out

    np.testing.assert_array_equal(run(True), run(False))


def test_mixed_namespaces_are_refused() -> None:
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="mix array namespaces"):
        A.Adam([np.ones(3), torch.ones(3)])


def test_mixed_devices_are_refused() -> None:
    xs = pytest.importorskip("array_api_strict")
    a = xs.asarray(np.ones(3))
    b = xs.asarray(np.ones(3), device=xs.Device("device1"))
    with pytest.raises(ValueError, match="several devices"):
        A.Adam([a, b])


def test_bound_modules_take_their_namespace_only() -> None:
    xs = pytest.importorskip("array_api_strict")
    with pytest.raises(TypeError, match=r"adapters.numpy.Adam takes numpy arrays.*adapters.array"):
        N.Adam([xs.asarray(np.ones(3))])


def test_extras_are_required_and_checked() -> None:
    params = [np.ones(3)]
    opt = A.MSVAGMB(params)
    with pytest.raises(TypeError, match="grad_variance="):
        opt.step([np.ones(3)])
    with pytest.raises(ValueError, match=r"grad_variance\[0\] has shape"):
        opt.step([np.ones(3)], grad_variance=[np.ones(2)])
    with pytest.raises(TypeError, match="unknown extra"):
        A.Adam([np.ones(3)]).step([np.ones(3)], grad_variance=[np.ones(3)])
    np.testing.assert_array_equal(params[0], np.ones(3))
    assert opt.step_count == 0


def test_functional_errors() -> None:
    tx = A.functional("adamw")
    state = tx.init([np.ones(3)])
    with pytest.raises(ValueError, match="shape"):
        tx.update([np.ones(2)], state, [np.ones(3)])
    with pytest.raises(ValueError, match="state is not a AdamW state"):
        tx.update([np.ones(3)], {"version": 99}, [np.ones(3)])
    with pytest.raises(ValueError, match="structure"):
        tx.update({"a": np.ones(3)}, state, [np.ones(3)])


def test_name_and_params_swapped_is_a_clear_error() -> None:
    with pytest.raises(TypeError, match=r"optimizer=list is invalid.*swapped order"):
        A.Optimizer("adamw", [np.zeros(3)])
