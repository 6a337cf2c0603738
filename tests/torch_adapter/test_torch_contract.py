"""The torch.optim contract, tested generically over every optimizer (in the spirit of torch's OptimizerInfo)."""

from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import pytest
import torch
from xpt_support import (
    MATRIX,
    MB,
    NAMES,
    assert_same_snapshot,
    dense_permuted,
    make_params,
    run_torch,
    set_grads,
    snapshot,
    spec_hp,
)

from xpoptim.adapters import torch as xt
from xpoptim.core import SPECS, STATE_VERSION, builtin_specs


def _opt(name, params, **over):
    kw = spec_hp(name)
    kw.update(over)
    kw.setdefault("compile", False)
    return xt.create(name, params, **kw)


def _clone(params):
    return [p.detach().clone().requires_grad_() for p in params]


# ---------------------------------------------------------------------------------------------------------------
# Classes, construction, repr
# ---------------------------------------------------------------------------------------------------------------


def test_one_class_per_spec():
    """Each shipped rule has its generated class (a registered one is served by create)."""
    for spec in builtin_specs():
        name = spec.name
        cls = getattr(xt, spec.title)
        assert issubclass(cls, torch.optim.Optimizer) and cls.spec is spec
        assert xt.OPTIMIZERS[name] is cls
        for h in spec.hyperparams:
            assert h.name in cls.__doc__
        assert spec.source.split(";")[0] in cls.__doc__


@pytest.mark.parametrize("name", NAMES)
def test_defaults_and_repr(name):
    spec = SPECS[name]
    opt = xt.create(name, make_params(name))
    for h in spec.hyperparams:
        if h.name in ("beta1", "beta2") and "betas" in opt.defaults:
            assert opt.defaults["betas"][0 if h.name == "beta1" else 1] == h.default
        else:
            assert opt.defaults[h.name] == h.default
    assert opt.defaults["maximize"] is False
    text = repr(opt)
    # A shipped rule has its generated class (its title in the repr); a registered one is an XPOptimizer that
    # names its rule.
    assert (spec.title if name in xt.OPTIMIZERS else f"rule: {spec.name}") in text and "lr" in text


def test_params_forms():
    a = torch.zeros(3, requires_grad=True)
    b = torch.zeros(2, 2, requires_grad=True)
    opt = xt.AdamW([("a", a), ("b", b)])
    assert opt.param_groups[0]["param_names"] == ["a", "b"]
    opt = xt.AdamW([{"params": [a], "lr": 0.5}, {"params": [b]}], lr=0.1)
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.1]
    opt = xt.AdamW(iter([a, b]))
    assert len(opt.param_groups[0]["params"]) == 2


def test_betas_and_beta1_beta2_are_the_same():
    p = torch.zeros(3, requires_grad=True)
    assert xt.Adam([p], betas=(0.8, 0.9)).defaults["betas"] == (0.8, 0.9)
    assert xt.Adam([p], beta1=0.8, beta2=0.9).defaults["betas"] == (0.8, 0.9)
    assert xt.Adam([p], beta1=0.8).defaults["betas"] == (0.8, 0.999)
    with pytest.raises(TypeError, match="either betas"):
        xt.Adam([p], betas=(0.8, 0.9), beta1=0.7)
    with pytest.raises(TypeError, match="betas"):
        xt.SGD([p], betas=(0.8, 0.9))


def test_betas_folding_is_asked_per_spec_object():
    """Whether a rule keeps torch's ``betas`` pair is remembered per spec object; asked again, every shipped rule
    gets the same answer, the one its hyperparameter names give."""
    from xpoptim.adapters._torch_hparams import group_keys, uses_betas

    for _ in range(2):
        for spec in builtin_specs():
            names = {h.name for h in spec.hyperparams}
            expected = "beta1" in names and "beta2" in names
            assert uses_betas(spec) is expected, spec.name
            assert ("betas" in group_keys(spec)) is expected, spec.name
    assert uses_betas(SPECS["adam"]) and not uses_betas(SPECS["sgd"])


@pytest.mark.parametrize("name", NAMES)
def test_bad_hyperparameters(name):
    spec = SPECS[name]
    params = make_params(name)
    bad = {"lr": -1.0, "beta": 1.0, "beta_open": 0.0, "nonneg": -0.5, "positive": 0.0, "bool": 1, "int_pos": 0}
    for h in spec.hyperparams:
        if h.kind not in bad:
            continue
        with pytest.raises(ValueError, match=h.name):
            xt.create(name, params, **{h.name: bad[h.kind]})
        # Also in an added group and at step time (schedulers write groups).
        opt = xt.create(name, [params[0]])
        key = "betas" if h.name in ("beta1", "beta2") and "betas" in opt.defaults else h.name
        value = bad[h.kind]
        if key == "betas":
            value = (value, 0.999) if h.name == "beta1" else (0.9, value)
        n_groups = len(opt.param_groups)
        with pytest.raises(ValueError, match=h.name):
            opt.add_param_group({"params": [params[2]], key: value})
        assert len(opt.param_groups) == n_groups  # refused groups are not kept
    with pytest.raises(TypeError, match="unknown"):
        xt.create(name, params, not_a_hyperparameter=1.0)
    with pytest.raises(ValueError, match="maximize"):
        xt.create(name, params, maximize="yes")
    with pytest.raises(ValueError, match="compile"):
        xt.create(name, params, compile="sometimes")
    with pytest.raises(ValueError, match="state_dtype"):
        xt.create(name, params, state_dtype=torch.int32)
    with pytest.raises(ValueError, match="lr"):
        xt.create(name, params, lr=float("nan"))


def test_bad_hyperparameter_written_by_hand_is_caught_at_step_without_changes():
    p = torch.ones(3, requires_grad=True)
    opt = xt.AdamW([p], compile=False)
    p.grad = torch.ones(3)
    opt.step()
    before = snapshot(opt)
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr"):
        opt.step()
    assert_same_snapshot(before, snapshot(opt))


def test_complex_and_integer_params_are_refused():
    with pytest.raises(TypeError, match="view_as_real"):
        xt.AdamW([torch.zeros(3, dtype=torch.complex64, requires_grad=True)])
    with pytest.raises(TypeError, match="floating"):
        xt.AdamW([torch.zeros(3, dtype=torch.int64)])


def test_sparse_grad_is_refused_without_changes():
    p = torch.ones(4, requires_grad=True)
    opt = xt.AdamW([p], compile=False)
    p.grad = torch.ones(4).to_sparse()
    with pytest.raises(ValueError, match="sparse"):
        opt.step()
    assert torch.equal(p.detach(), torch.ones(4)) and len(opt.state) == 0


# ---------------------------------------------------------------------------------------------------------------
# Steps: closure, None grads, zero grads, per-group lr, schedulers
# ---------------------------------------------------------------------------------------------------------------


def test_step_returns_closure_loss_and_runs_it_with_grad():
    p = torch.ones(3, requires_grad=True)
    opt = xt.AdamW([p], compile=False)

    def closure():
        assert torch.is_grad_enabled()
        opt.zero_grad()
        loss = (p * p).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 3.0
    assert not torch.equal(p.detach(), torch.ones(3))


@pytest.mark.parametrize("name", NAMES)
def test_none_grads_are_skipped(name):
    params = make_params(name)
    init = [p.detach().clone() for p in params]
    others = _clone(params)
    skip = (0, 3)
    opt = run_torch(lambda ps: _opt(name, ps), name, params, 3, skip=skip)
    for i in skip:
        assert torch.equal(params[i].detach(), init[i]) and len(opt.state[params[i]]) == 0
    # The other parameters move exactly as if the skipped ones were not there.
    kept = [i for i in range(len(params)) if i not in skip]
    sub = [others[i] for i in kept]
    for step in range(3):
        gv = set_grads(others, step, name, skip)
        _o = opt_sub if step else (opt_sub := _opt(name, sub))
        _o.step(grad_variance=gv) if gv is not None else _o.step()
    for i in kept:
        assert torch.equal(params[i].detach(), others[i].detach())


@pytest.mark.parametrize("name", NAMES)
def test_zero_grads_do_not_move_params(name):
    """With zero gradients from a fresh state and no weight decay, every rule's update is exactly 0
    (0/0 := 0 in the variance factors, sign(0) = 0, NS(0) = 0)."""
    params = make_params(name)
    init = [p.detach().clone() for p in params]
    kw = {"weight_decay": 0.0}
    opt = _opt(name, params, **kw)
    for _ in range(3):
        for p in params:
            p.grad = torch.zeros_like(p)
        gv = {p: torch.zeros_like(p) for p in params} if name in MB else None
        opt.step(grad_variance=gv) if gv is not None else opt.step()
    for p, q in zip(params, init):
        assert torch.equal(p.detach(), q)


@pytest.mark.parametrize("name", NAMES)
def test_per_group_lr_equals_separate_optimizers(name):
    params = make_params(name)
    a, b = _clone(params), _clone(params)
    if name in MATRIX:
        groups = [{"params": a[:2], "lr": 0.03}, {"params": a[2:4]}, {"params": a[4:], "rule": SPECS[name].fallback}]
        split = [(b[:2], {"lr": 0.03}), (b[2:4], {}), (b[4:], {})]
    else:
        groups = [{"params": a[:2], "lr": 0.03}, {"params": a[2:]}]
        split = [(b[:2], {"lr": 0.03}), (b[2:], {})]
    opt = _opt(name, groups)
    singles = [_opt(name, ps, **kw) for ps, kw in split]
    for step in range(3):
        gv = set_grads(a, step, name)
        opt.step(grad_variance=gv) if gv is not None else opt.step()
        gv = set_grads(b, step, name)
        for o in singles:
            o.step(grad_variance=gv) if gv is not None else o.step()
    for x, y in zip(a, b):
        assert torch.equal(x.detach(), y.detach())


@pytest.mark.parametrize("name", NAMES)
def test_lr_scheduler_is_read_every_step(name):
    params = make_params(name)
    a, b = _clone(params), _clone(params)
    opt_a = _opt(name, a)
    sched = torch.optim.lr_scheduler.LambdaLR(opt_a, lambda k: 0.5**k)
    opt_b = _opt(name, b)
    base = [g["lr"] for g in opt_b.param_groups]
    for step in range(4):
        for g, lr0 in zip(opt_b.param_groups, base):
            g["lr"] = lr0 * 0.5**step
        for opt, ps in ((opt_a, a), (opt_b, b)):
            gv = set_grads(ps, step, name)
            opt.step(grad_variance=gv) if gv is not None else opt.step()
        sched.step()
    for x, y in zip(a, b):
        assert torch.equal(x.detach(), y.detach())
    assert opt_a.param_groups[0]["lr"] == pytest.approx(spec_hp(name)["lr"] * 0.5**4)


def test_one_cycle_lr_cycles_betas_and_momentum():
    p = torch.ones(4, requires_grad=True)
    opt = xt.AdamW([p], compile=False)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
    seen = set()
    for _ in range(5):
        p.grad = torch.ones(4)
        opt.step()
        sched.step()
        seen.add(opt.param_groups[0]["betas"][0])
    assert len(seen) > 1
    q = torch.ones(4, requires_grad=True)
    sgd = xt.SGD([q], compile=False)
    torch.optim.lr_scheduler.OneCycleLR(sgd, max_lr=0.1, total_steps=10)
    assert "momentum" in sgd.param_groups[0]


def test_tensor_lr_equals_float_lr():
    a, b = torch.ones(5, requires_grad=True), torch.ones(5, requires_grad=True)
    oa = xt.AdamW([a], lr=torch.tensor(0.01), compile=False)
    ob = xt.AdamW([b], lr=0.01, compile=False)
    sched = torch.optim.lr_scheduler.ExponentialLR(oa, 0.9)
    sched_b = torch.optim.lr_scheduler.ExponentialLR(ob, 0.9)
    for k in range(3):
        a.grad = torch.full((5,), float(k + 1))
        b.grad = torch.full((5,), float(k + 1))
        oa.step()
        ob.step()
        sched.step()
        sched_b.step()
    assert isinstance(oa.param_groups[0]["lr"], torch.Tensor)
    assert torch.equal(a.detach(), b.detach())


# ---------------------------------------------------------------------------------------------------------------
# State: layout, state_dict round trip, resume, refusal, deepcopy/pickle, hooks
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_state_is_named_tensors_with_step_and_version(name):
    params = make_params(name)
    opt = run_torch(lambda ps: _opt(name, ps), name, params, 2)
    spec = SPECS[name]
    for p in params:
        st = opt.state[p]
        assert st["state_version"] == STATE_VERSION
        assert isinstance(st["step"], torch.Tensor) and st["step"].item() == 2.0
        if spec.kind == "elementwise":
            assert set(st) == {*spec.state, "step", "state_version"}
            for n in spec.state:
                assert st[n].shape == p.shape and st[n].dtype == p.dtype


@pytest.mark.parametrize("layout", ["row-major", "permuted"])
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_and_resume_bit_for_bit(name, layout):
    """Also with channels_last / transposed parameters (their state views are strided), and through
    ``torch.load``'s default ``weights_only=True``."""
    params = make_params(name)
    if layout == "permuted":
        params = [dense_permuted(p) for p in params]
    opt = run_torch(lambda ps: _opt(name, ps), name, params, 3)
    saved_params = [p.detach().clone() for p in params]
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    run_torch(None, name, params, 4, start=3, opt=opt)
    # Resume from the checkpoint into fresh objects.
    params2 = [p.clone().requires_grad_() for p in saved_params]  # clone keeps the strides
    opt2 = _opt(name, params2)
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    sd1, sd2 = opt.state_dict(), opt2.state_dict()
    assert sd1["param_groups"] == sd2["param_groups"]
    run_torch(None, name, params2, 4, start=3, opt=opt2)
    for x, y in zip(params, params2):
        assert torch.equal(x.detach(), y.detach())
    for k in opt.state_dict()["state"]:
        s1, s2 = opt.state_dict()["state"][k], opt2.state_dict()["state"][k]
        assert s1.keys() == s2.keys()
        for n in s1:
            if isinstance(s1[n], torch.Tensor):
                assert torch.equal(s1[n], s2[n]), n
            else:
                assert s1[n] == s2[n]


@pytest.mark.parametrize("name", ["adamw", "muon", "msvag_mb", "deva_sinf"])
def test_load_refuses_mismatches_and_leaves_optimizer_unchanged(name):
    params = make_params(name)
    opt = run_torch(lambda ps: _opt(name, ps), name, params, 2)
    good = copy.deepcopy(opt.state_dict())
    before = snapshot(opt)

    wrong_shape = copy.deepcopy(good)
    key = next(k for k, v in wrong_shape["state"].items() if v)
    tensor_name = next(n for n, v in wrong_shape["state"][key].items() if isinstance(v, torch.Tensor) and n != "step" and v.ndim)
    wrong_shape["state"][key][tensor_name] = torch.zeros(17)
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(wrong_shape)
    assert_same_snapshot(before, snapshot(opt))

    wrong_version = copy.deepcopy(good)
    wrong_version["state"][key]["state_version"] = STATE_VERSION + 1
    with pytest.raises(ValueError, match="version"):
        opt.load_state_dict(wrong_version)

    other = "sgd" if name != "sgd" else "adamw"
    other_params = make_params(other)[: len(params)]
    other_opt = run_torch(lambda ps: _opt(other, ps), other, other_params, 1)
    with pytest.raises(ValueError):
        opt.load_state_dict(other_opt.state_dict())
    assert_same_snapshot(before, snapshot(opt))

    # A torch.optim state dict is not ours either.
    torch_opt = torch.optim.AdamW([torch.zeros(3, requires_grad=True)])
    with pytest.raises(ValueError):
        opt.load_state_dict(torch_opt.state_dict())
    assert_same_snapshot(before, snapshot(opt))
    opt.load_state_dict(good)  # the good one still loads


def test_adam_state_dict_does_not_load_into_adamw():
    a = torch.ones(3, requires_grad=True)
    adam = xt.Adam([a], compile=False)
    a.grad = torch.ones(3)
    adam.step()
    with pytest.raises(ValueError, match="rule"):
        xt.AdamW([torch.ones(3, requires_grad=True)]).load_state_dict(adam.state_dict())


@pytest.mark.parametrize("name", NAMES)
def test_deepcopy_and_pickle_continue_identically(name):
    params = make_params(name)
    opt = run_torch(lambda ps: _opt(name, ps), name, params, 2)
    clones = [copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))]
    run_torch(None, name, params, 2, start=2, opt=opt)
    for c in clones:
        cparams = [p for g in c.param_groups for p in g["params"]]
        assert all(cp is not p for cp, p in zip(cparams, params))
        run_torch(None, name, cparams, 2, start=2, opt=c)
        for x, y in zip(params, cparams):
            assert torch.equal(x.detach(), y.detach())


def test_hooks_run():
    p = torch.ones(3, requires_grad=True)
    opt = xt.AdamW([p], compile=False)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("sd"))
    p.grad = torch.ones(3)
    opt.step()
    opt.state_dict()
    assert calls == ["pre", "post", "sd"]


def test_zero_grad_both_ways():
    ps = [torch.ones(3, requires_grad=True), torch.ones(2, requires_grad=True)]
    opt = xt.AdamW(ps, compile=False)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    opt.zero_grad(set_to_none=False)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in ps)
    opt.zero_grad()
    assert all(p.grad is None for p in ps)


def test_kept_and_fresh_grads_follow_torch_adamw():
    """Alternating ``zero_grad(set_to_none=True)`` and ``False`` (backward accumulating into kept gradients)
    gives torch.optim.AdamW's trajectory."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    ref = copy.deepcopy(model)
    x = torch.randn(8, 4)
    oa = xt.AdamW(model.parameters(), compile=False)
    ob = torch.optim.AdamW(ref.parameters(), foreach=False)
    for k in range(4):
        for m, o in ((model, oa), (ref, ob)):
            o.zero_grad(set_to_none=(k % 2 == 0))
            m(x).pow(2).sum().backward()
            o.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_duplicate_parameters_in_a_group_are_refused_without_changes():
    """torch.optim warns about a parameter listed twice in a group (and steps it twice); ours refuses it by position,
    at construction and in ``add_param_group``, as tensors or ``(name, tensor)`` pairs, leaving the optimizer as it
    was."""
    import warnings

    p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    with pytest.warns(UserWarning, match="duplicate parameters"):
        torch.optim.AdamW([p, p])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused before torch's warning
        with pytest.raises(ValueError, match=r"params\[1\] \(shape \(3,\)\) is params\[0\] again"):
            xt.AdamW([p, p])
        with pytest.raises(ValueError, match=r"params\[2\] \(shape \(3,\)\) is params\[0\] again"):
            xt.AdamW([("w", p), ("b", q), ("w2", p)])
        opt = xt.AdamW([q], lr=0.1)
        q.grad = torch.ones(2)
        opt.step()
        before, groups = snapshot(opt), copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
        with pytest.raises(ValueError, match=r"params\[1\] \(shape \(3,\)\) is params\[0\] again"):
            opt.add_param_group({"params": (t for t in (p, p))})
        assert len(opt.param_groups) == 1 and opt.param_groups[0]["params"] == [q]
        assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups
        assert_same_snapshot(snapshot(opt), before)
        opt.add_param_group({"params": p})  # once is fine
        assert len(opt.param_groups) == 2


def test_failed_step_leaves_params_and_state_unchanged():
    """A bad grad in the second group is found before the first group is touched."""
    a, b = torch.ones(3, requires_grad=True), torch.ones(4, requires_grad=True)
    opt = xt.AdamW([{"params": [a]}, {"params": [b]}], compile=False)
    a.grad, b.grad = torch.ones(3), torch.ones(4)
    opt.step()
    before = snapshot(opt)
    b.grad.data = torch.ones(5)  # torch lets .data change shape; the step must refuse it
    with pytest.raises(ValueError, match="does not match"):
        opt.step()
    assert_same_snapshot(before, snapshot(opt))


def test_missing_or_bad_grad_variance_is_refused_without_changes():
    ps = make_params("msvag_mb")
    opt = run_torch(lambda q: _opt("msvag_mb", q), "msvag_mb", ps, 1)
    before = snapshot(opt)
    set_grads(ps, 5, "msvag_mb")
    with pytest.raises(ValueError, match="grad_variance"):
        opt.step()
    bad = {p: torch.ones(p.shape + (2,), dtype=p.dtype) for p in ps}
    with pytest.raises(ValueError, match="grad_variance"):
        opt.step(grad_variance=bad)
    assert_same_snapshot(before, snapshot(opt))


def test_grad_variance_attribute_equals_argument():
    a, b = make_params("adam_star_mb"), make_params("adam_star_mb")
    oa, ob = _opt("adam_star_mb", a), _opt("adam_star_mb", b)
    for step in range(3):
        gv = set_grads(a, step, "adam_star_mb")
        oa.step(grad_variance=gv)
        gv = set_grads(b, step, "adam_star_mb")
        for p in b:
            p.grad_variance = gv[p]
        ob.step()
    for x, y in zip(a, b):
        assert torch.equal(x.detach(), y.detach())


# ---------------------------------------------------------------------------------------------------------------
# Dtypes: bf16 params with float32 state, state_dtype option
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_bf16_params_float32_state(name):
    """bf16 params: state is float32, the step runs in float32 and rounds once into the bf16 param.

    Reference: the same trajectory with float32 master copies that are rounded to bf16 after every step and
    fed back (what the adapter must do), through core.functional on torch float32 tensors.
    """
    from xpoptim.core import functional

    spec = SPECS[name]
    params = make_params(name, torch.bfloat16)
    init = [p.detach().clone() for p in params]
    opt = run_torch(lambda ps: _opt(name, ps), name, params, 3)
    for p in params:
        for k, v in opt.state[p].items():
            if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "step":
                assert v.dtype == torch.float32, (name, k)
    if spec.kind == "matrix":
        return  # matrix rules: dtype policy checked above; their numbers are checked in float64 elsewhere
    hp = spec.validate(**spec_hp(name))
    ref = [q.clone() for q in init]
    states = [functional.init(spec, q, hp, state_dtype=torch.float32) for q in ref]
    fake = [torch.empty(q.shape) for q in ref]
    from xpt_support import grads_for, variances_for

    for step in range(3):
        gs = grads_for(fake, step)
        vs = variances_for(fake, step) if name in MB else None
        for i in range(len(ref)):
            g = torch.tensor(gs[i]).to(torch.bfloat16)
            ex = (torch.tensor(vs[i]).to(torch.bfloat16).float(),) if vs is not None else ()
            ref[i], states[i] = functional.step(spec, ref[i], g, states[i], hp, step + 1, extras=ex)
    for p, r in zip(params, ref):
        assert p.dtype == torch.bfloat16
        assert torch.equal(p.detach(), r), name


def test_state_dtype_option_and_load_policy():
    p = torch.ones(4, dtype=torch.bfloat16, requires_grad=True)
    opt = xt.AdamW([p], state_dtype=torch.bfloat16, compile=False)
    p.grad = torch.ones(4, dtype=torch.bfloat16)
    opt.step()
    assert opt.state[p]["exp_avg"].dtype == torch.bfloat16
    q = torch.ones(4, dtype=torch.bfloat16, requires_grad=True)
    opt32 = xt.AdamW([q], compile=False)
    q.grad = torch.ones(4, dtype=torch.bfloat16) * 0.3
    opt32.step()
    sd = copy.deepcopy(opt32.state_dict())
    exact = sd["state"][0]["exp_avg_sq"].clone()
    r = torch.ones(4, dtype=torch.bfloat16, requires_grad=True)
    fresh = xt.AdamW([r], compile=False)
    fresh.load_state_dict(sd)
    # The base class would cast float state to the param dtype (bf16); ours keeps the float32 policy exactly.
    assert fresh.state[r]["exp_avg_sq"].dtype == torch.float32
    assert torch.equal(fresh.state[r]["exp_avg_sq"], exact)
    assert fresh.state[r]["step"].item() == 1.0


# ---------------------------------------------------------------------------------------------------------------
# Matrix rules: routing helper, conv weights, one instance for both kinds
# ---------------------------------------------------------------------------------------------------------------


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 6)
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.hidden = torch.nn.Linear(6, 6)
        self.norm = torch.nn.LayerNorm(6)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, idx, img):
        h = self.emb(idx).mean(1) + self.conv(img).mean((1, 2, 3))[:, None]
        return self.head(self.norm(torch.tanh(self.hidden(h))))


@pytest.mark.parametrize("name", MATRIX)
def test_matrix_param_groups_routing(name):
    net = _Net()
    groups = xt.matrix_param_groups(net, name)
    mat = dict(zip(groups[0]["param_names"], groups[0]["params"]))
    other = groups[1]["param_names"]
    assert set(mat) == {"conv.weight", "hidden.weight"}
    assert {"emb.weight", "head.weight", "head.bias", "norm.weight", "norm.bias", "conv.bias", "hidden.bias"} == set(other)
    assert groups[0]["rule"] == name and groups[1]["rule"] == SPECS[name].fallback
    opt = xt.create(name, groups, compile=False)
    assert opt.param_groups[1]["lr"] == opt.defaults["lr"]  # the fallback's lr follows the optimizer's
    assert "ns_steps" not in opt.param_groups[1]
    idx, img = torch.randint(0, 10, (5, 4)), torch.randn(5, 1, 5, 5)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    for _ in range(3):
        opt.zero_grad()
        net(idx, img).pow(2).mean().backward()
        opt.step()
    for n, p in net.named_parameters():
        assert not torch.equal(p.detach(), before[n]) or name == "deva_sinf", n
    assert opt.state[net.conv.weight][next(iter(k for k in opt.state[net.conv.weight] if k in ("momentum_buffer", "exp_avg")))].shape == (4, 9)


def test_muon_refuses_vectors_in_a_matrix_group():
    with pytest.raises(ValueError, match="matrix_param_groups"):
        xt.Muon([{"params": [torch.zeros(3, requires_grad=True)]}])
    with pytest.raises(ValueError, match="fallback"):
        xt.Muon([torch.zeros(3, 3, requires_grad=True)], fallback="muon")


def test_a_group_of_another_matrix_rule_is_refused_naming_the_rule():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"rule='muon' is invalid: expected 'deva_sinf'.*matrix_param_groups\(model, 'deva_sinf'\)"):
        xt.DeVASinf(xt.matrix_param_groups(model, "muon"))


def test_muon_custom_fallback_rule():
    w, b = torch.ones(4, 3, requires_grad=True), torch.ones(3, requires_grad=True)
    opt = xt.Muon([w, b], fallback="sgd", fallback_hyperparams={"lr": 0.1, "momentum": 0.0}, compile=False)
    assert opt.param_groups[1]["rule"] == "sgd"
    w.grad, b.grad = torch.ones(4, 3), torch.ones(3)
    opt.step()
    assert torch.allclose(b.detach(), torch.full((3,), 0.9))


# ---------------------------------------------------------------------------------------------------------------
# Mini-batch variance helper
# ---------------------------------------------------------------------------------------------------------------


def test_minibatch_grad_variance_matches_a_per_example_loop():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    loss_fn = torch.nn.functional.cross_entropy
    var = xt.minibatch_grad_variance(model, loss_fn, x, y, set_grad=True, attach=True)
    mean_grads = [p.grad.clone() for p in model.parameters()]
    per = []
    for k in range(6):
        model.zero_grad()
        loss_fn(model(x[k : k + 1]), y[k : k + 1]).backward()
        per.append([p.grad.detach().numpy().copy() for p in model.parameters()])
    for i, p in enumerate(model.parameters()):
        g = np.stack([e[i] for e in per])
        expected = ((g - g.mean(0)) ** 2).sum(0) / (6 * 5)  # Eq. 44, unbiased: 1/|B| * 1/(|B|-1) sum (g_k - g)^2
        np.testing.assert_allclose(var[p].numpy(), expected, rtol=1e-12, atol=1e-15)
        assert p.grad_variance is var[p]
    # set_grad wrote the mean gradient = gradient of the mean loss
    model.zero_grad()
    loss_fn(model(x), y).backward()
    for g, p in zip(mean_grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-12, atol=1e-14)
    opt = xt.MSVAGMB(model.parameters(), compile=False)
    opt.step()  # reads p.grad_variance


def test_fallback_settings_survive_pickle():
    w, b = torch.ones(4, 3, requires_grad=True), torch.ones(3, requires_grad=True)
    opt = pickle.loads(pickle.dumps(xt.Muon([w], fallback_hyperparams={"lr": 0.123}, compile=False)))
    opt.add_param_group({"params": [b], "rule": "adamw"})
    assert opt.param_groups[1]["lr"] == 0.123 and opt.param_groups[1]["betas"] == (0.9, 0.95)
    assert "fallback" not in opt.param_groups[0] and "fallback" not in opt.param_groups[1]


def test_torch_only_flags():
    p = torch.ones(3, requires_grad=True)
    xt.AdamW([p], foreach=None, fused=False)  # accepted as "not requested"
    for flag in ("foreach", "fused", "capturable", "differentiable"):
        with pytest.raises(TypeError, match=flag):
            xt.AdamW([p], **{flag: True})


def test_changing_state_dtype_relayouts_state():
    p = torch.ones(6, requires_grad=True)
    opt = xt.AdamW([p], compile=False)
    p.grad = torch.ones(6)
    opt.step()
    opt.param_groups[0]["state_dtype"] = torch.float64
    p.grad = torch.ones(6)
    opt.step()
    assert opt.state[p]["exp_avg"].dtype == torch.float64 and opt.state[p]["step"].item() == 2


@pytest.mark.parametrize("name", ["adamw", "mvngrad"])
def test_parameter_appended_to_a_group_list_is_stepped_with_fresh_state(name):
    """A parameter appended to ``group['params']`` by hand is stepped (with fresh state) exactly like one given at
    construction."""
    params = make_params(name)[:2]
    extra = torch.tensor(np.linspace(-1.0, 1.0, 5), requires_grad=True)
    twin = _clone(params) + [extra.detach().clone().requires_grad_()]
    opt = _opt(name, params)
    ref = _opt(name, twin[:2])
    run_torch(None, name, params, 2, opt=opt)
    run_torch(None, name, twin[:2], 2, opt=ref)
    opt.param_groups[0]["params"].append(extra)
    ref.add_param_group({"params": [twin[2]]})
    run_torch(None, name, params + [extra], 3, start=2, opt=opt)
    run_torch(None, name, twin, 3, start=2, opt=ref)
    assert len(opt.state[extra]) > 0
    for p, q in zip(params + [extra], twin):
        np.testing.assert_array_equal(p.detach().numpy(), q.detach().numpy())


def _adamw_pair(n=4, size=6):
    """Our AdamW (one multi-tensor kernel over ``n`` parameters) and torch.optim.AdamW (for-loop) on equal copies."""
    torch.manual_seed(3)
    ours = [torch.randn(size, requires_grad=True) for _ in range(n)]
    ref = _clone(ours)
    return ours, ref, xt.AdamW(ours, lr=0.1, compile=False), torch.optim.AdamW(ref, lr=0.1, foreach=False)


def _step_both(ours, ref, oa, ob, k):
    for i, (a, b) in enumerate(zip(ours, ref)):
        g = torch.full_like(a, 0.1 * (k + 1) * (i + 1)) + torch.linspace(-1, 1, a.numel())
        if a.grad is None:
            a.grad = g.clone()
        else:
            a.grad.copy_(g)  # a kept gradient, written in place
        b.grad = g.clone()
    oa.step()
    ob.step()


@pytest.mark.parametrize("alias", [False, True], ids=["no-alias", "alias-held"])
def test_repointed_param_data_is_stepped(alias):
    """``p.data = x`` (what ``Module._apply`` does in ``model.double()``) after steps: the step updates the new
    tensor (addresses are read at every step), and the trajectory stays torch.optim.AdamW's, also while other
    references to the parameters' memory are held (``alias-held``)."""
    ours, ref, oa, ob = _adamw_pair()
    for k in range(2):
        _step_both(ours, ref, oa, ob, k)
    keep = [ours[0].detach(), ours[1].detach()] if alias else []  # two new aliases of parameters' memory
    ours[2].data = ours[2].data.clone()  # one parameter moves to new memory
    ref[2].data = ref[2].data.clone()
    for k in range(2, 5):
        _step_both(ours, ref, oa, ob, k)
    del keep
    for k in range(5, 7):
        _step_both(ours, ref, oa, ob, k)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)


def test_repointed_grad_view_data_is_read():
    """``p.grad.data = x`` on a kept gradient (``Module._apply`` does this to gradients): the step reads ``x``."""
    ours, ref, oa, ob = _adamw_pair()
    for k in range(2):
        _step_both(ours, ref, oa, ob, k)
    for k in range(2, 5):
        for i, (a, b) in enumerate(zip(ours, ref)):
            g = torch.linspace(-2, 3, a.numel()) * (k - i)
            a.grad.data = g.clone() if i == 1 else a.grad.data  # only parameter 1's gradient moves
            if i != 1:
                a.grad.copy_(g)
            b.grad = g.clone()
        oa.step()
        ob.step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "bad",
    [torch.ones(7), torch.ones(6, dtype=torch.float64), torch.ones(6).to_sparse()],
    ids=["shape", "dtype", "sparse"],
)
@pytest.mark.parametrize("all_fresh", [True, False], ids=["all-fresh", "one-fresh"])
def test_bad_fresh_grad_among_many_is_refused_without_changes(bad, all_fresh):
    """Gradients are checked in bulk (all fresh, or one fresh among kept ones); one bad gradient among them is
    named and refused before anything is written."""
    ours, ref, oa, ob = _adamw_pair()
    for k in range(3):
        _step_both(ours, ref, oa, ob, k)
    for a in ours if all_fresh else ours[2:3]:
        a.grad = torch.ones_like(a)  # fresh gradients (the set_to_none pattern); the others are kept
    if bad.layout == torch.strided:
        ours[2].grad.data = bad  # torch refuses ``p.grad = bad`` itself; ``.data`` gets past its check
    else:
        ours[2].grad = bad
    before = snapshot(oa)
    with pytest.raises(ValueError, match="sparse gradients|does not match its parameter"):
        oa.step()
    assert_same_snapshot(before, snapshot(oa))


def test_grads_stay_the_tensors_backward_made():
    """With ``zero_grad(set_to_none=True)`` (torch's default) and with kept gradients, ``p.grad`` after a step is
    the very tensor backward left there (same object, same memory), and the trajectory is torch.optim.AdamW's."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    twin = copy.deepcopy(model)
    oa = xt.AdamW(model.parameters(), lr=0.01)
    ob = torch.optim.AdamW(twin.parameters(), lr=0.01, foreach=False)
    x = torch.randn(16, 5)
    for k in range(8):
        fresh = k < 4
        for m, o in ((model, oa), (twin, ob)):
            o.zero_grad(set_to_none=fresh)
            (m(x * (1 + 0.01 * k)).tanh().sum()).backward()
        mine = [(p.grad, p.grad.data_ptr()) for p in model.parameters()]
        oa.step()
        ob.step()
        assert all(p.grad is g and p.grad.data_ptr() == ptr for p, (g, ptr) in zip(model.parameters(), mine))
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
