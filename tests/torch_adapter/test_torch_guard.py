"""The steady-state step of the torch adapter: what it checks in bulk before its compiled loop writes through raw
addresses, in C (``_torch_guard``, torch's stable C ABI) and in Python (where the C checks cannot be built).

After a first step passes the full checks, later steps of the group check in bulk that the parameters, their state
tensors and step counters are the same objects at the same addresses and layouts, and that the fresh gradients are
contiguous CPU tensors of the right size and dtype. Every change a user can make between steps must either be
stepped exactly as torch.optim.AdamW steps it, or refused by name; never written through a stale address."""

from __future__ import annotations

import gc
import os
import sysconfig

import numpy as np
import pytest
import torch

from xpoptim.adapters import _cfuse
from xpoptim.adapters import _torch_guard as gd
from xpoptim.adapters import torch as xt

SHAPES = [(6,), (3, 4), (5,), (2, 3), (7,)]


def _can_build() -> str | None:
    if _cfuse.compiler() is None:
        return "no C compiler on this machine: the torch adapter checks tensors in Python"
    include = sysconfig.get_paths().get("include") or ""
    if not os.path.exists(os.path.join(include, "Python.h")):
        return "no Python headers on this machine: the torch adapter checks tensors in Python"
    if not hasattr(getattr(torch._C, "_aoti", None), "unsafe_alloc_void_ptrs_from_tensors"):
        return "this torch build has no AOTInductor bindings: the torch adapter checks tensors in Python"
    return None


@pytest.fixture(params=["checks-in-c", "checks-in-python"])
def where(request, monkeypatch):
    if request.param == "checks-in-c":
        reason = _can_build()
        if reason:
            pytest.skip(reason)
        assert gd.guard() is not None
    else:
        monkeypatch.setattr(gd, "ENABLED", False)
    return request.param


def _pair():
    torch.manual_seed(7)
    ours = [torch.randn(s, requires_grad=True) for s in SHAPES]
    ref = [p.detach().clone().requires_grad_() for p in ours]
    return ours, ref, xt.AdamW(ours, lr=0.05, weight_decay=0.01, compile=False), torch.optim.AdamW(ref, lr=0.05, weight_decay=0.01, foreach=False)


def _grads(ps, k, make=None):
    for i, p in enumerate(ps):
        g = torch.linspace(-1.0, 1.0, p.numel()).reshape(p.shape) * (k + 1) + 0.1 * i
        p.grad = make(i, g) if make else g  # fresh gradient tensors, as backward makes after zero_grad()


def _steps(ours, ref, oa, ob, ks):
    """Fresh gradients and one step of both optimizers for each ``k`` in ``ks``."""
    for k in ks:
        _grads(ours, k)
        _grads(ref, k)
        oa.step()
        ob.step()


def _fast(opt):
    (fg,) = [v[1] for v in opt._xp_fast.values()]
    return fg


def _assert_same_trajectory(ours, ref, oa=None, ob=None):
    """Parameters, and (given the optimizers) every state tensor the user sees, equal torch.optim.AdamW's."""
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)
        if oa is not None:
            for k in ("exp_avg", "exp_avg_sq", "step"):
                torch.testing.assert_close(oa.state[a][k], ob.state[b][k].reshape(oa.state[a][k].shape), rtol=1e-6, atol=1e-7, msg=k)


def test_fast_path_checks_where_expected(where):
    ours, ref, oa, ob = _pair()
    _steps(ours, ref, oa, ob, range(3))
    fg = _fast(oa)
    assert (fg.checked is not None) == (where == "checks-in-c")
    _assert_same_trajectory(ours, ref)


def _copy(st):
    """A parameter's state dict with every tensor cloned (equal values, new memory)."""
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in st.items()}


def _replaced(name):
    def change(opt, ps, i):
        opt.state[ps[i]][name] = opt.state[ps[i]][name].clone()

    return change


def _repointed(name):
    def change(opt, ps, i):
        t = opt.state[ps[i]][name]
        t.data = t.data.clone()

    return change


def _state_dict_replaced(opt, ps, i):
    opt.state[ps[i]] = _copy(opt.state[ps[i]])


def _param_repointed(opt, ps, i):
    ps[i].data = ps[i].data.clone()


def _param_transposed_in_place(opt, ps, i):
    # same memory, another layout: the step must read and write it in its logical order
    st = opt.state[ps[i]]
    ps[i].data = ps[i].data.t().contiguous().t()
    for k in ("exp_avg", "exp_avg_sq"):
        st[k].data = st[k].data.t().contiguous().t()


MUTATIONS = {
    "state-tensor-replaced": _replaced("exp_avg"),
    "state-tensor-data-repointed": _repointed("exp_avg_sq"),
    "step-tensor-replaced": _replaced("step"),
    "step-tensor-data-repointed": _repointed("step"),
    "state-dict-replaced": _state_dict_replaced,
    "param-data-repointed": _param_repointed,
    "param-and-state-permuted": _param_transposed_in_place,
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_changes_between_steps_are_stepped_like_torch_optim(where, mutation):
    """Each change is made to one parameter (a matrix, index 1) between fast steps of ours and the same one to
    torch.optim's (where it is meaningful there); the trajectories stay equal. A check that missed the change would
    write through the old address (stale state, a parameter that stops moving)."""
    ours, ref, oa, ob = _pair()
    _steps(ours, ref, oa, ob, range(3))
    MUTATIONS[mutation](oa, ours, 1)
    if mutation in ("param-data-repointed", "param-and-state-permuted"):
        MUTATIONS[mutation](ob, ref, 1)
    _steps(ours, ref, oa, ob, range(3, 7))
    _assert_same_trajectory(ours, ref, oa, ob)


@pytest.mark.parametrize("kind", ["transposed", "expanded", "strided-slice"])
def test_non_contiguous_fresh_gradients_are_read_in_logical_order(where, kind):
    """Fresh gradients of the right shape that are not contiguous (torch accepts them in ``p.grad = g``)."""

    def make(i, g):
        if kind == "transposed" and g.ndim == 2:
            return g.t().contiguous().t()
        if kind == "expanded":
            return torch.full((1,), 0.25 * (i + 1)).expand(g.shape)
        if kind == "strided-slice":
            return torch.stack([g, -g], dim=-1)[..., 0]
        return g

    ours, ref, oa, ob = _pair()
    for k in range(6):
        _grads(ours, k, make if k >= 2 else None)
        _grads(ref, k, (lambda i, g: make(i, g).contiguous()) if k >= 2 else None)
        oa.step()
        ob.step()
    _assert_same_trajectory(ours, ref, oa, ob)


def test_bad_gradient_data_is_refused_without_changes(where):
    ours, ref, oa, ob = _pair()
    for k in range(3):
        _grads(ours, k)
        oa.step()
    _grads(ours, 3)
    ours[2].grad.data = torch.ones(9, dtype=torch.float64)  # torch refuses ``p.grad = x`` here; ``.data`` gets past
    before = [p.detach().clone() for p in ours], {i: {k: v.clone() for k, v in oa.state[p].items() if isinstance(v, torch.Tensor)} for i, p in enumerate(ours)}
    with pytest.raises(ValueError, match="does not match its parameter"):
        oa.step()
    for p, b in zip(ours, before[0]):
        assert torch.equal(p.detach(), b)
    for i, p in enumerate(ours):
        for k, v in before[1][i].items():
            assert torch.equal(oa.state[p][k], v), (i, k)


def test_handles_are_released():
    """The C checks hold references to the parameters' and state tensors' implementations while the group's fast
    path lives, and none to the gradients after a step; dropping the optimizer releases every one."""
    if (reason := _can_build()):
        pytest.skip(reason)
    ours, _, oa, _ = _pair()
    base = [p._use_count() for p in ours]
    for k in range(3):
        _grads(ours, k)
        grads = [p.grad for p in ours]
        g_base = [g._use_count() for g in grads]
        oa.step()
        assert [g._use_count() for g in grads] == g_base
    assert _fast(oa).checked is not None
    assert all(p._use_count() > b for p, b in zip(ours, base))
    del oa
    gc.collect()
    assert [p._use_count() for p in ours] == base


def _rows(g, held_ts, fresh, threads=1, steps=None):
    """``Guard.rows`` over one held column (plus a column of step counters when given)."""
    n = len(held_ts)
    numel = np.array([t.numel() for t in held_ts], dtype=np.int64)
    cols, nums, dts, exp = [held_ts], [numel], [torch.float32], [np.array([t.data_ptr() for t in held_ts], dtype=np.uintp)]
    if steps is not None:
        cols.append(steps)
        nums.append(None)
        dts.append(torch.float32)
        exp.append(np.array([s.data_ptr() for s in steps], dtype=np.uintp))
    out = np.zeros((n, 2), dtype=np.uintp)
    held = gd.Held(g, cols, nums, dts, exp, numel, torch.float32, out, 1, step_col=1 if steps is not None else -1)
    return held, numel, lambda: g.rows(held, fresh, threads), out


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_checks_see_each_kind_of_change_directly(threads):
    """The C checks themselves: each change to one held tensor (first, middle or last row, so every thread's
    share), each wrong fresh tensor and each differing step counter is seen."""
    if (reason := _can_build()):
        pytest.skip(reason)
    g = gd.guard()
    n = 300  # above the row count from which the engine splits the checks over threads
    ts = [torch.randn(4, 3) for _ in range(n)]
    fresh = [torch.randn(4, 3) for _ in range(n)]
    steps = [torch.tensor(5.0) for _ in range(n)]
    _held, _numel, check, out = _rows(g, ts, fresh, threads, steps)
    assert check() == 5.0
    assert [int(a) for a in out[:, 1]] == [t.data_ptr() for t in fresh]
    for row in (0, n // 2, n - 1):
        for change in (
            lambda t: t.set_(t.clone()),
            lambda t: t.t_(),
            lambda t: t.resize_(13),
            lambda t: setattr(t, "data", t.data.double()),
            lambda t: t.as_strided_((4, 3), (1, 4)),
        ):
            ts = [torch.randn(4, 3) for _ in range(n)]
            _held, _numel, check, _out = _rows(g, ts, fresh, threads)
            change(ts[row])
            assert check() is None
        for wrong in (torch.randn(3, 4).t(), torch.randn(12, dtype=torch.float64), torch.randn(13), torch.randn(4, 3)[:, :2]):
            bad = list(fresh)
            bad[row] = wrong
            ts = [torch.randn(4, 3) for _ in range(n)]
            assert _rows(g, ts, bad, threads)[2]() is None
        odd = [torch.tensor(5.0) for _ in range(n)]
        odd[row].fill_(6.0)
        assert _rows(g, [torch.randn(4, 3) for _ in range(n)], fresh, threads, odd)[2]() is None
    d = [{"a": ts[0]}]
    ids = np.array([[id(ts[0])]], dtype=np.uintp)
    assert g.values(d, ("a",), ids)
    assert not g.values([{"a": ts[1]}], ("a",), ids) and not g.values([{}], ("a",), ids)


def test_checks_release_the_fresh_tensors():
    """The handles the checks take on the fresh tensors are released, on every thread's share."""
    if (reason := _can_build()):
        pytest.skip(reason)
    g = gd.guard()
    ts = [torch.randn(5) for _ in range(300)]
    fresh = [torch.randn(5) for _ in range(300)]
    base = [f._use_count() for f in fresh]
    for threads in (1, 2):
        assert _rows(g, ts, fresh, threads)[2]() == 0.0
        bad = fresh[:-1] + [torch.randn(6)]
        assert _rows(g, ts, bad, threads)[2]() is None
    assert [f._use_count() for f in fresh] == base


# ---------------------------------------------------------------------------------------------------------------
# optimizer.state counts its entry changes (the steady-state step's O(1) look at it)
# ---------------------------------------------------------------------------------------------------------------


def _update_entry(opt, ps, i):
    opt.state.update({ps[i]: _copy(opt.state[ps[i]])})


def _ior_entry(opt, ps, i):
    opt.state |= {ps[i]: _copy(opt.state[ps[i]])}


def _pop_and_setdefault(opt, ps, i):
    opt.state.setdefault(ps[i], _copy(opt.state.pop(ps[i])))


def _del_and_reinsert(opt, ps, i):
    st = opt.state[ps[i]]
    del opt.state[ps[i]]
    opt.state[ps[i]] = _copy(st)


def _clear_and_restore(opt, ps, i):
    saved = {p: _copy(st) for p, st in opt.state.items()}
    opt.state.clear()
    for p, st in saved.items():
        dict.__setitem__(opt.state, p, st)  # bypasses the count: ``clear`` above was counted


def _whole_mapping_replaced(opt, ps, i):
    from collections import defaultdict

    opt.state = defaultdict(dict, {p: _copy(st) for p, st in opt.state.items()})


def _round_trip(opt, ps, i):
    opt.load_state_dict(opt.state_dict())


STATE_CHANGES = {
    "entry-replaced": _state_dict_replaced,
    "update": _update_entry,
    "in-place-or": _ior_entry,
    "pop-setdefault": _pop_and_setdefault,
    "del-reinsert": _del_and_reinsert,
    "clear": _clear_and_restore,
    "mapping-replaced": _whole_mapping_replaced,
    "load_state_dict": _round_trip,
}


@pytest.mark.parametrize("change", list(STATE_CHANGES))
def test_state_entry_changes_are_seen(where, change):
    """A parameter's state dict swapped for an equal copy, through each way of changing ``optimizer.state``: the
    later steps update the new tensors (what the user sees in ``optimizer.state``), as torch.optim.AdamW does."""
    ours, ref, oa, ob = _pair()
    _steps(ours, ref, oa, ob, range(3))
    STATE_CHANGES[change](oa, ours, 1)
    _steps(ours, ref, oa, ob, range(3, 6))
    _assert_same_trajectory(ours, ref, oa, ob)


def test_state_mapping_behaves_as_torch_optims():
    import copy
    import pickle
    from collections import defaultdict

    ours, _, oa, _ = _pair()
    _grads(ours, 0)
    oa.step()
    assert isinstance(oa.state, defaultdict) and oa.state.default_factory is dict
    before = oa.state.changes
    stranger = torch.zeros(1)
    assert oa.state[stranger] == {} and oa.state.changes == before + 1  # a missing key filled by the default
    del oa.state[stranger]
    for other in (copy.deepcopy(oa), pickle.loads(pickle.dumps(oa))):
        assert type(other.state) is type(oa.state)
        for p, q in zip(ours, other.param_groups[0]["params"]):
            assert torch.equal(oa.state[p]["exp_avg"], other.state[q]["exp_avg"])
    oa.load_state_dict(oa.state_dict())
    assert type(oa.state) is type(other.state)


def test_checks_build_without_openmp(monkeypatch):
    """A compiler that cannot build OpenMP code still gets the C checks (their rows on one thread)."""
    if (reason := _can_build()):
        pytest.skip(reason)
    from xpoptim.adapters import _torch_omp

    monkeypatch.setattr(_torch_omp, "openmp_link", lambda: ("-fopenmp", "-lxpoptim-no-such-openmp-runtime"))
    g = gd._build()
    assert g is not None
    ts = [torch.randn(3) for _ in range(300)]
    assert _rows(g, ts, [torch.randn(3) for _ in range(300)], threads=2)[2]() == 0.0
