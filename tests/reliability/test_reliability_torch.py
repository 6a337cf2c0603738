"""Bad input to the torch adapter through its public API: a clear error with nothing changed (byte for byte), or the
documented result (``docs/reliability.md``). Uses the shared case tables of ``_cases.py``.
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

from reliability._cases import BAD_ANY_NUMBER, GRADIENT_FILLS, ODD_SHAPES, OPTIMIZERS, assert_unchanged, snapshot, state_garbles
from xpoptim.core import SPECS

torch = pytest.importorskip("torch")
xt = pytest.importorskip("xpoptim.adapters.torch")

MB = tuple(n for n in OPTIMIZERS if getattr(SPECS[n], "extras", ()))
SUM_MOMENTUM_STEP = ("sgd", "msvag_mb")


def _make(name: str, shapes=((4, 3), (3,)), **hp):
    gen = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    return ps, xt.create(name, ps, compile=False, **hp)


def _grads(ps, fill=None, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for p in ps:
        g = torch.randn(p.shape, generator=gen)
        p.grad = g if fill is None else torch.where(g < 0, -1.0, 1.0) * fill


def _extra(name, ps, value=0.01):
    return {"grad_variance": {p: torch.full_like(p, value) for p in ps}} if name in MB else {}


def _snap(ps, opt):
    return snapshot(([p.detach().clone() for p in ps], opt.state_dict()))


def _stepped(name, steps=2, **hp):
    ps, opt = _make(name, **hp)
    for s in range(steps):
        _grads(ps, seed=s)
        opt.step(**_extra(name, ps))
    return ps, opt


REFUSED = list(BAD_ANY_NUMBER)


@pytest.mark.parametrize(("label", "value"), REFUSED, ids=[c[0] for c in REFUSED])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_bad_lr_at_construction_is_refused(name, label, value):
    with pytest.raises((ValueError, TypeError), match="lr"):
        _make(name, lr=value)


@pytest.mark.parametrize("value", [np.array([1e-2, 2e-2]), 1e-2 + 1e-3j, object(), "0.01", torch.tensor([1e-2, 2e-2])], ids=["array", "complex", "object", "string", "tensor2"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_bad_lr_in_the_second_group_changes_nothing(name, value):
    """The first group used to be stepped before the second group's ``lr`` was found to be an array."""
    ps = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(4, 3))]
    opt = xt.create(name, [{"params": [ps[0]]}, {"params": [ps[1]]}], compile=False)
    _grads(ps)
    opt.step(**_extra(name, ps))
    opt.param_groups[1]["lr"] = value
    before = _snap(ps, opt)
    with pytest.raises((ValueError, TypeError), match="lr"):
        opt.step(**_extra(name, ps))
    assert_unchanged(before, _snap(ps, opt))


@pytest.mark.parametrize("fill", list(GRADIENT_FILLS))
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_finite_float32_gradients_never_give_nan(name, fill):
    value = GRADIENT_FILLS[fill]
    ps, opt = _make(name, lr=1e-3)
    for s in range(3):
        _grads(ps, value, seed=s)
        before = _snap(ps, opt)
        try:
            opt.step(**_extra(name, ps, 0.01 * min(value * value, 1e30)))
        except Exception:  # DeVA_Sinf: Kronecker factors beyond float32 (documented): eigh fails, nothing changed
            assert name == "deva_sinf" and value >= 1e20
            assert_unchanged(before, _snap(ps, opt))
            return
    if name in SUM_MOMENTUM_STEP and fill == "near_max_f32":
        return  # the momentum overflows, as torch.optim.SGD's (documented)
    for p in ps:
        assert torch.isfinite(p).all(), (name, fill)


def test_muon_1e20_gradients_give_the_orthogonalised_step_not_nan():
    ps, opt = _make("muon", shapes=((4, 6),), lr=1e-2)
    _grads(ps, 1e20)
    opt.step()
    assert torch.isfinite(ps[0]).all() and not torch.equal(ps[0], _make("muon", shapes=((4, 6),))[0][0])


@pytest.mark.parametrize("where", ["argument", "attribute"])
@pytest.mark.parametrize("bad", [-1e-3, float("nan")], ids=["negative", "nan"])
@pytest.mark.parametrize("name", MB)
def test_negative_or_nan_grad_variance_is_refused_with_nothing_changed(name, bad, where):
    """As the NumPy and optax adapters: refused before anything is written (was: NaN in that element). The bad
    value sits in the second group, so the first group's parameters would have been written by a half step."""
    ps, opt = _stepped(name)
    opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2, 2))]})
    ps = ps + opt.param_groups[1]["params"]
    _grads(ps, seed=5)
    variance = _extra(name, ps)["grad_variance"]
    variance[ps[-1]][1, 0] = bad
    before = _snap(ps, opt)
    with pytest.raises(ValueError, match=r"grad_variance of a parameter of shape \(2, 2\) holds (-0\.001\d*|nan): expected a per-element variance >= 0"):
        if where == "argument":
            opt.step(grad_variance=variance)
        else:
            for p in ps:
                p.grad_variance = variance[p]
            opt.step()
    assert_unchanged(before, _snap(ps, opt))
    variance[ps[-1]][1, 0] = 0.0  # the same step with a valid variance goes ahead
    opt.step(grad_variance=variance)
    assert torch.isfinite(ps[-1]).all() and not torch.equal(ps[-1], torch.ones(2, 2))


@pytest.mark.parametrize("shape", list(ODD_SHAPES))
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_zero_size_and_0d_parameters_step(name, shape):
    ps, opt = _make(name, shapes=(ODD_SHAPES[shape], (4, 3)), lr=1e-2)
    for s in range(3):
        _grads(ps, seed=s)
        opt.step(**_extra(name, ps))
    assert ps[0].shape == ODD_SHAPES[shape] and torch.isfinite(ps[0]).all()


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_garbled_checkpoints_are_refused_with_nothing_changed(name):
    ps, opt = _stepped(name)
    accepted = []
    for label, bad in state_garbles(opt.state_dict(), to_int=lambda a: a.to(torch.int64), grow=lambda a: torch.stack([a, a])):
        before = _snap(ps, opt)
        try:
            opt.load_state_dict(bad)
        except (ValueError, TypeError, KeyError):
            assert_unchanged(before, _snap(ps, opt))
        else:
            accepted.append(label)
    assert accepted == ["unknown_top_key"], accepted  # an unknown extra key is ignored, as by torch.optim


@pytest.mark.parametrize("missing", ["maximize", "compile"])
def test_an_older_checkpoint_without_an_option_loads_with_its_default(missing):
    ps, opt = _stepped("adamw")
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        g.pop(missing, None)
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    other = xt.create("adamw", qs, compile=False)
    other.load_state_dict(sd)
    _grads(qs, seed=3)
    other.step()
    assert all(torch.isfinite(q).all() for q in qs)


def test_deva_sinf_decomposition_failure_on_one_matrix_changes_nothing():
    """``b``'s Kronecker factors overflow at the refresh step (step 11): ``a`` must not have been written."""
    a, b = torch.nn.Parameter(torch.ones(4, 3)), torch.nn.Parameter(torch.ones(5, 2))
    opt = xt.DeVASinf([a, b], compile=False)
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        a.grad, b.grad = torch.randn(4, 3, generator=gen), torch.randn(5, 2, generator=gen)
        opt.step()
    a.grad, b.grad = torch.randn(4, 3, generator=gen), torch.full((5, 2), 1e20)
    before = _snap([a, b], opt)
    with pytest.raises(Exception):  # noqa: B017  (torch.linalg's error type)
        opt.step()
    assert_unchanged(before, _snap([a, b], opt))


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_copies_continue_with_the_same_numbers(name, how):
    ps, opt = _stepped(name)
    sd = copy.deepcopy(opt.state_dict())
    clone_sd = copy.deepcopy(sd) if how == "deepcopy" else pickle.loads(pickle.dumps(sd))
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    other = xt.create(name, qs, compile=False)
    other.load_state_dict(clone_sd)
    for p, q in zip(ps, qs):
        g = torch.randn(p.shape, generator=torch.Generator().manual_seed(11))
        p.grad, q.grad = g, g.clone()
    opt.step(**_extra(name, ps))
    other.step(**_extra(name, qs))
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_copied_optimizer_keeps_every_public_attribute_and_steps_alike(name, how):
    """As torch's test_deepcopy_copies_all_public_attrs (``spec`` was lost); the copy owns its tensors."""
    ps, opt = _stepped(name)
    if how == "deepcopy":
        ps2, other = copy.deepcopy((ps, opt))
    else:
        ps2, other = pickle.loads(pickle.dumps((ps, opt)))
    public = {k for k in opt.__dict__ if not k.startswith("_")}
    assert public == {k for k in other.__dict__ if not k.startswith("_")} and "spec" in public
    assert other.spec is opt.spec
    for p, q in zip(ps, ps2):
        g = torch.randn(p.shape, generator=torch.Generator().manual_seed(11))
        p.grad, q.grad = g, g.clone()
    opt.step(**_extra(name, ps))
    other.step(**_extra(name, ps2))
    for p, q in zip(ps, ps2):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr()


@pytest.mark.parametrize("named_before", [True, False])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_load_state_dict_keeps_param_names_given_to_either_side(name, named_before):
    """As torch.optim: names in the loaded dict are loaded; without them the optimizer keeps its own."""
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    for p in model.parameters():
        p.data = torch.randn(p.shape, generator=gen)
    first = xt.create(name, model.named_parameters() if named_before else model.parameters(), compile=False)
    second = xt.create(name, model.parameters() if named_before else model.named_parameters(), compile=False)
    named = first if named_before else second
    names = [g["param_names"] for g in named.param_groups]
    second.load_state_dict(first.state_dict())
    assert [g["param_names"] for g in second.param_groups] == names
    assert sorted(n for ns in names for n in ns) == sorted(n for n, _ in model.named_parameters())
