"""Atomic steps and loads: every failing ``step`` or ``load_state_dict`` leaves parameters and state byte for byte as
they were (and a failed first step adds no state entry); bad hyperparameters are clear errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from xpoptim.adapters import torch as xt


def byte_snapshot(opt) -> dict:
    """Every parameter's and state tensor's bytes (NaN and -0.0 compared exactly), dtype and shape; other values
    as they are; which parameters have state; the groups' keys and values."""

    def enc(v):
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu()
            return ("tensor", str(t.dtype), tuple(t.shape), tuple(t.stride()), t.numpy().tobytes())
        return ("value", repr(v))

    params = [p for g in opt.param_groups for p in g["params"]]
    return {
        "params": [enc(p) for p in params],
        "state": [
            None if p not in opt.state else {k: enc(v) for k, v in sorted(opt.state[p].items())} for p in params
        ],
        "n_state": len(opt.state),
        "groups": [{k: repr(v) for k, v in g.items() if k != "params"} for g in opt.param_groups],
    }


def _mlp_params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(5, 4, generator=gen).requires_grad_(), torch.randn(4, generator=gen).requires_grad_()]


def _grads(params, k):
    for i, p in enumerate(params):
        p.grad = torch.full_like(p, 0.1 * (k + 1)) + torch.linspace(-1, 1, p.numel()).reshape(p.shape) * (i + 1)


def _stepped(make, n=3):
    params = _mlp_params()
    opt = make(params)
    for k in range(n):
        _grads(params, k)
        opt.step()
    return params, opt


# ---------------------------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.array([1e-2, 2e-2]), None, 1j, "0.1", torch.tensor([1e-2, 2e-2]), object()], ids=["ndarray", "None", "complex", "str", "tensor-2", "object"])
def test_non_number_hyperparameter_set_between_steps_changes_nothing(bad):
    """A second group whose lr is not a number: the first group is not stepped either."""
    a, b = _mlp_params()
    opt = xt.AdamW([{"params": [a]}, {"params": [b]}], lr=1e-2)
    for k in range(2):
        _grads([a, b], k)
        opt.step()
    opt.param_groups[1]["lr"] = bad
    before = byte_snapshot(opt)
    with pytest.raises(ValueError, match=r"lr=.* is invalid: expected a real number or a 1-element real tensor"):
        opt.step()
    assert byte_snapshot(opt) == before


def test_one_element_tensor_and_numpy_scalar_hyperparameters_are_numbers():
    """As torch.optim: a 1-element tensor lr (and a NumPy scalar) steps exactly like the float."""
    runs = []
    for lr in (1e-2, torch.tensor([1e-2]), np.float64(1e-2)):
        params, opt = _stepped(lambda ps, lr=lr: xt.AdamW(ps, lr=lr))
        runs.append([p.detach().clone() for p in params])
    for other in runs[1:]:
        assert all(torch.equal(x, y) for x, y in zip(runs[0], other))


@pytest.mark.parametrize(
    ("make", "key", "good", "bad", "match"),
    [
        (lambda ps: xt.AdamW(ps, lr=1e-2), "lr", 1e-2, -1e-2, r"lr=-0.01 is invalid"),
        (lambda ps: xt.AdamW(ps, lr=1e-2), "betas", (0.9, 0.999), (0.9, 1.0), r"beta2=1.0 is invalid"),
        (lambda ps: xt.Muon([p for p in ps if p.ndim == 2], lr=1e-2), "ns_steps", 5, 5.0, r"ns_steps=5.0 is invalid"),
        (lambda ps: xt.Muon([p for p in ps if p.ndim == 2], lr=1e-2), "ns_steps", 5, True, r"ns_steps=True is invalid"),
    ],
    ids=["lr-negative", "beta2-one", "ns_steps-float", "ns_steps-bool"],
)
def test_values_validated_before_are_still_checked_at_every_step(make, key, good, bad, match):
    """The step re-validates a group's hyperparameters at every step (it remembers the values that passed): a value
    set between steps is refused by name and changes nothing, even one equal to a value that passed (5.0 and True
    compare equal to 5, and are refused where an integer is required); the good value steps again afterwards."""
    params = [p for p in _mlp_params()]
    opt = make(params)
    stepped = [p for g in opt.param_groups for p in g["params"]]
    for k in range(2):
        _grads(stepped, k)
        opt.step()
    opt.param_groups[0][key] = bad
    before = byte_snapshot(opt)
    with pytest.raises(ValueError, match=match):
        opt.step()
    assert byte_snapshot(opt) == before
    opt.param_groups[0][key] = good
    opt.step()
    assert byte_snapshot(opt) != before


def test_lr_none_is_refused():
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match=r"lr=None is invalid"):
        xt.AdamW([p], lr=None)
    opt = xt.AdamW([p])
    with pytest.raises(ValueError, match=r"lr=None is invalid"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "lr": None})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("grad", [float("nan"), 1e20], ids=["nan", "huge"])
def test_deva_eigh_failure_changes_nothing(grad):
    """DeVASinf refreshes its eigenbases every step here: a NaN (or float32-overflowing) gradient of the last group
    makes ``eigh`` fail; the earlier matrix group and the elementwise fallback group stay as they were."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4, 3, generator=gen).requires_grad_()
    c = torch.randn(3, 3, generator=gen).requires_grad_()
    b = torch.randn(3, generator=gen).requires_grad_()
    opt = xt.DeVASinf([{"params": [a]}, {"params": [b], "rule": "deva_linf"}, {"params": [c]}], precondition_frequency=1)
    for k in range(3):
        _grads([a, c, b], k)
        opt.step()
    _grads([a, c, b], 3)
    c.grad = torch.full_like(c, grad)  # the last group fails, after the others were computed
    before = byte_snapshot(opt)
    with pytest.raises(RuntimeError, match="eigh"):  # torch.linalg.LinAlgError
        opt.step()
    assert byte_snapshot(opt) == before


def test_failed_first_step_leaves_no_state():
    """A first step refused by a bad gradient in a later group adds no state entries for earlier groups."""
    a, b = _mlp_params()
    opt = xt.AdamW([{"params": [a]}, {"params": [b]}])
    a.grad = torch.ones_like(a)
    b.grad = torch.ones_like(b)
    b.grad.data = torch.ones(7)  # torch refuses ``p.grad = wrong`` itself; ``.data`` gets past its check
    before = byte_snapshot(opt)
    with pytest.raises(ValueError, match="does not match its parameter"):
        opt.step()
    assert byte_snapshot(opt) == before and len(opt.state) == 0


def test_failed_first_matrix_step_leaves_no_state():
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(4, 3, generator=gen).requires_grad_()
    b = torch.randn(3, generator=gen).requires_grad_()
    opt = xt.DeVASinf([a, b], precondition_frequency=1)
    a.grad = torch.full_like(a, float("nan"))
    b.grad = torch.ones_like(b)
    before = byte_snapshot(opt)
    with pytest.raises(RuntimeError, match="eigh"):
        opt.step()
    assert byte_snapshot(opt) == before and len(opt.state) == 0


@pytest.mark.parametrize("name", ["muon", "deva_sinf"])
@pytest.mark.parametrize("shape", [(3, 0), (0, 3)])
def test_zero_size_matrix_is_skipped(name, shape):
    """A matrix with a zero-size side has nothing to update: the step skips it (no state, no error) and steps the
    other parameters as if it were absent."""
    gen = torch.Generator().manual_seed(2)
    empty = torch.zeros(shape, requires_grad=True)
    w = torch.randn(4, 3, generator=gen).requires_grad_()
    twin = w.detach().clone().requires_grad_()
    opt = xt.create(name, [empty, w])
    ref = xt.create(name, [twin])
    for k in range(3):
        empty.grad = torch.zeros(shape)
        w.grad = torch.full_like(w, 0.1 * (k + 1)) + torch.linspace(-1, 1, 12).reshape(4, 3)
        twin.grad = w.grad.clone()
        opt.step()
        ref.step()
    assert empty not in opt.state or not opt.state[empty]
    assert torch.equal(w.detach(), twin.detach())


def test_muon_mixed_named_and_unnamed_params_is_a_clear_error():
    a, b = _mlp_params()
    with pytest.raises(ValueError, match="mixes \\(name, tensor\\) pairs and bare tensors"):
        xt.Muon([("w", a), b])


# ---------------------------------------------------------------------------------------------------------------
# load_state_dict
# ---------------------------------------------------------------------------------------------------------------


def _broken(sd, fn):
    out = copy.deepcopy(sd)
    fn(out)
    return out


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda sd: sd["state"][0].__setitem__("step", None), "step=None is invalid"),
        (lambda sd: sd["state"][0].__setitem__("step", torch.tensor(-5.0)), "step=.*-5.* is invalid"),
        (lambda sd: sd["state"][0].__setitem__("step", torch.tensor(2.5)), "step=.*2.5.* is invalid"),
        (lambda sd: sd["state"][0].__setitem__("step", float("nan")), "step=nan is invalid"),
        (lambda sd: sd["state"][1].__setitem__("exp_avg", torch.zeros(4, dtype=torch.int64)), "dtype torch.int64"),
        (lambda sd: sd["param_groups"][0].pop("state_dtype"), "lacks 'state_dtype'"),
        (lambda sd: sd["param_groups"][0].__setitem__("lr", np.array([1.0, 2.0])), "lr=.* is invalid"),
        (lambda sd: sd["param_groups"][0].__setitem__("maximize", "no"), "maximize="),
    ],
    ids=["step-None", "step-negative", "step-fraction", "step-nan", "int64-state", "no-state_dtype", "lr-array", "maximize-str"],
)
def test_bad_state_dict_is_refused_and_changes_nothing(mutate, match):
    """The complete new state is built aside: a refusal anywhere (even in the last parameter's entry, after the
    first one's state was read) changes nothing, and the next step runs as if the load was never tried."""
    params, opt = _stepped(lambda ps: xt.AdamW(ps, lr=1e-2))
    twin_params, twin = _stepped(lambda ps: xt.AdamW(ps, lr=1e-2))
    bad = _broken(opt.state_dict(), mutate)
    before = byte_snapshot(opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(bad)
    assert byte_snapshot(opt) == before
    _grads(params, 5)
    _grads(twin_params, 5)
    opt.step()
    twin.step()
    assert all(torch.equal(x, y) for x, y in zip(params, twin_params))


def test_older_state_dict_without_maximize_and_compile_gets_defaults():
    """torch's ``test_can_load_older_state_dict`` idea: groups written before ``maximize``/``compile`` existed load
    with the defaults, and the next steps equal those of the optimizer that wrote them."""
    params, opt = _stepped(lambda ps: xt.AdamW(ps, lr=1e-2))
    old = copy.deepcopy(opt.state_dict())
    for g in old["param_groups"]:
        del g["maximize"], g["compile"]
    params2 = [p.detach().clone().requires_grad_() for p in params]
    opt2 = xt.AdamW(params2, lr=1e-2)
    opt2.load_state_dict(old)
    assert opt2.param_groups[0]["maximize"] is False and opt2.param_groups[0]["compile"] is False
    for k in range(3, 5):
        _grads(params, k)
        _grads(params2, k)
        opt.step()
        opt2.step()
    assert all(torch.equal(x, y) for x, y in zip(params, params2))


def test_load_state_dict_swaps_in_new_tensors_only_on_success():
    """A successful load does not alias the dict's tensors (changing the dict later changes nothing)."""
    params, opt = _stepped(lambda ps: xt.AdamW(ps, lr=1e-2))
    sd = copy.deepcopy(opt.state_dict())
    params2 = [p.detach().clone().requires_grad_() for p in params]
    opt2 = xt.AdamW(params2, lr=1e-2)
    opt2.load_state_dict(sd)
    snap = byte_snapshot(opt2)
    sd["state"][0]["exp_avg"].fill_(123.0)
    sd["state"][0]["step"].fill_(99.0)
    assert byte_snapshot(opt2) == snap
