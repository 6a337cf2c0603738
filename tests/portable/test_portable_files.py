"""Files: a portable state through safetensors and ``.npz`` (no pickle), the NumPy adapter's ``state_dict()``
through ``numpy.savez``, and the refusals (wrong optimizer, names, shapes), which change nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import xpoptim.portable as xpp
from xpoptim.adapters import numpy as xn
from xpoptim.adapters import torch as xt
from xpoptim.core import STATE_VERSION


def _numpy_run(name="deva_sinf", steps=3, **hp):
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((5, 3)), "b": rng.standard_normal(5), "c": rng.standard_normal((2, 3, 2))}
    opt = xn.create(name, params, **hp)
    grads = [{k: rng.standard_normal(v.shape) for k, v in params.items()} for _ in range(6)]
    for g in grads[:steps]:
        opt.step(g)
    return opt, params, grads


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_portable_file_round_trip_is_exact(tmp_path, suffix):
    opt, _, _ = _numpy_run(max_precond_dim=4)  # R/QR of the (5, 3) matrix is 3x3, L/QL None
    p = opt.export_state()
    assert p.params["w"].state["L"] is None and p.params["w"].state["R"].shape == (3, 3)
    p.save(tmp_path / f"s{suffix}")
    q = xpp.load(tmp_path / f"s{suffix}")
    assert (q.optimizer, q.version, q.fallback, q.hyperparams) == ("deva_sinf", STATE_VERSION, "deva_linf", p.hyperparams)
    assert q.names == p.names
    for n in p.names:
        a, b = p.params[n], q.params[n]
        assert (a.rule, a.step, a.shape) == (b.rule, b.step, b.shape)
        for k in a.state:
            if a.state[k] is None:
                assert b.state[k] is None
            else:
                assert a.state[k].dtype == b.state[k].dtype
                np.testing.assert_array_equal(a.state[k], b.state[k])
    if suffix == ".npz":
        with np.load(tmp_path / "s.npz", allow_pickle=False) as f:
            assert "xpoptim.portable" in f.files


def test_files_that_are_not_portable_states_are_refused(tmp_path):
    np.savez(tmp_path / "x.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="not an xpoptim portable state"):
        xpp.load(tmp_path / "x.npz")
    from safetensors.numpy import save_file

    save_file({"a": np.zeros(3)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not an xpoptim portable state"):
        xpp.load(tmp_path / "x.safetensors")
    arrays, meta = xpp.to_arrays(_numpy_run("adam")[0].export_state())
    with pytest.raises(ValueError, match="format='other/9' is not supported"):
        xpp.from_arrays(arrays, meta.replace(xpp.FORMAT, "other/9"))
    with pytest.raises(ValueError, match="is missing"):
        xpp.from_arrays({}, meta)


@pytest.mark.parametrize("name", ["muon", "deva_sinf", "msvag"])
def test_numpy_state_dict_round_trips_through_savez_without_pickle(tmp_path, name):
    kw = {"max_precond_dim": 4} if name == "deva_sinf" else {}
    opt, params, grads = _numpy_run(name, **kw)
    np.savez(tmp_path / "ck.npz", **xpp.flatten_state_dict(opt.state_dict()))
    fresh_params = {k: v.copy() for k, v in params.items()}
    fresh = xn.create(name, fresh_params, **kw)
    with np.load(tmp_path / "ck.npz", allow_pickle=False) as f:
        fresh.load_state_dict(xpp.unflatten_state_dict(f))
    for g in grads[3:]:
        opt.step(g)
        fresh.step(g)
    for k in params:
        np.testing.assert_array_equal(fresh_params[k], params[k])


def test_numpy_load_state_dict_accepts_a_0d_step():
    opt, params, grads = _numpy_run("adamw")
    sd = opt.state_dict()
    sd["step"] = np.array(sd["step"])
    fresh_params = {k: v.copy() for k, v in params.items()}
    fresh = xn.AdamW(fresh_params)
    fresh.load_state_dict(sd)
    assert fresh.step_count == 3
    with pytest.raises(ValueError, match="step=array"):
        fresh.load_state_dict({**sd, "step": np.array(1.5)})


def _torch_opt():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    opt = xt.AdamW(model.parameters(), compile=False)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    return model, opt


def _torch_snapshot(model, opt):
    return [p.detach().clone() for p in model.parameters()], {
        i: {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in st.items()} for i, st in opt.state_dict()["state"].items()
    }


def _assert_same(a, b):
    for x, y in zip(a[0], b[0]):
        assert torch.equal(x, y)
    assert a[1].keys() == b[1].keys()
    for i in a[1]:
        for k in a[1][i]:
            x, y = a[1][i][k], b[1][i][k]
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y


def test_refused_imports_change_nothing():
    model, opt = _torch_opt()
    good = opt.export_state(model.named_parameters())
    assert good.names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    before = _torch_snapshot(model, opt)
    other = xn.Adam({k: np.zeros(v.shape, np.float32) for k, v in good.params.items()}).export_state()
    with pytest.raises(ValueError, match="is a 'adam' state: expected 'adamw'"):
        opt.import_state(other, model.named_parameters())
    with pytest.raises(ValueError, match=r"missing \['0.weight'"):
        opt.import_state(good.rename({"0.weight": "first.weight"}), model.named_parameters())
    bad = good.rename({})
    bad.params["2.bias"] = xpp.ParamState("adamw", 1, (3,), {"exp_avg": np.zeros(3), "exp_avg_sq": np.zeros(3)})
    with pytest.raises(ValueError, match=r"'2.bias' has shape \(2,\) here, \(3,\)"):
        opt.import_state(bad, model.named_parameters())
    with pytest.raises(ValueError, match="state \\['exp_avg'\\]: expected"):
        xpp.PortableState("adamw", {}, {"x": xpp.ParamState("adamw", 1, (2,), {"exp_avg": np.zeros(2)})})
    with pytest.raises(ValueError, match="rule='muon'"):
        xpp.PortableState("adamw", {}, {"x": xpp.ParamState("muon", 1, (2, 2), {"momentum_buffer": np.zeros((2, 2))})})
    _assert_same(before, _torch_snapshot(model, opt))
    opt.import_state(good, [n for n, _ in model.named_parameters()])  # names as a list work too
    _assert_same(before, _torch_snapshot(model, opt))
