"""The user's tensors stay the user's: after steps, parameters, gradients and state are ordinary tensors, exactly as
torch.optim leaves them (own storage, tied parameters stay tied, safetensors and ``torch.save`` of a submodule work,
a state dict crosses to torch.optim.AdamW and back, live memory equals torch.optim's)."""

from __future__ import annotations

import copy
import gc
import io
import warnings

import pytest
import torch

from xpoptim.adapters import torch as xt

safetensors_torch = pytest.importorskip("safetensors.torch", reason="the safetensors checks need the safetensors package (test extra)")


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4))


def _train(model, opt, steps, start=0):
    x = torch.linspace(-1, 1, 48).reshape(8, 6)
    for k in range(start, start + steps):
        opt.zero_grad()
        model(x * (1 + 0.1 * k)).pow(2).sum().backward()
        opt.step()


def test_parameters_keep_their_own_storage():
    model = _model()
    storages = [p.untyped_storage().data_ptr() for p in model.parameters()]
    opt = xt.AdamW(model.parameters(), lr=1e-2)
    _train(model, opt, 3)
    for p, ptr in zip(model.parameters(), storages):
        assert p.untyped_storage().data_ptr() == ptr  # updated where it lives, never re-pointed
        assert p.untyped_storage().nbytes() == p.numel() * p.element_size()
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                assert v.untyped_storage().nbytes() == v.numel() * v.element_size()


def test_torch_save_of_a_submodule_writes_only_its_bytes():
    model = _model()
    opt = xt.AdamW(model.parameters(), lr=1e-2)
    _train(model, opt, 2)
    buf, ref = io.BytesIO(), io.BytesIO()
    torch.save(model[2].bias, buf)
    torch.save(_model(seed=1)[2].bias, ref)  # the same parameter of a model no optimizer touched
    assert len(buf.getvalue()) == len(ref.getvalue())


def test_safetensors_saves_the_model_and_the_optimizer_state(tmp_path):
    model = _model()
    opt = xt.AdamW(model.parameters(), lr=1e-2)
    _train(model, opt, 2)
    safetensors_torch.save_model(model, str(tmp_path / "model.safetensors"))
    loaded = _model(seed=5)
    safetensors_torch.load_model(loaded, str(tmp_path / "model.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), loaded.parameters()))
    flat = {f"{i}.{k}": v for i, st in opt.state_dict()["state"].items() for k, v in st.items() if isinstance(v, torch.Tensor)}
    safetensors_torch.save_file(flat, str(tmp_path / "opt.safetensors"))  # refuses tensors that share memory
    back = safetensors_torch.load_file(str(tmp_path / "opt.safetensors"))
    assert all(torch.equal(back[k], v) for k, v in flat.items())


def test_each_parameter_has_its_own_step_tensor():
    model = _model()
    opt = xt.AdamW(model.parameters(), lr=1e-2)
    _train(model, opt, 2)
    steps = [st["step"] for st in opt.state.values()]
    assert len({id(s) for s in steps}) == len(steps) == 4
    assert all(s.dtype == torch.float32 and s.device.type == "cpu" and s.ndim == 0 and s.item() == 2 for s in steps)


def test_tied_parameters_stay_tied_and_follow_torch_adamw():
    """A parameter shared by two modules (weight tying) is one parameter; two parameters tied through ``.data``
    share memory, and both optimizers update that memory twice per step, in the same order."""

    def tied():
        torch.manual_seed(3)
        enc, dec = torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(4, 4, bias=False)
        dec.weight = enc.weight
        a, b = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.zeros(5))
        b.data = a.data
        return enc, dec, a, b

    runs = []
    for make in (lambda ps: xt.AdamW(ps, lr=1e-2), lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False)):
        enc, dec, a, b = tied()
        opt = make([*{id(p): p for p in [*enc.parameters(), *dec.parameters()]}.values(), a, b])
        x = torch.linspace(-1, 1, 8).reshape(2, 4)
        for _ in range(3):
            opt.zero_grad()
            (dec(enc(x)).pow(2).sum() + (a * torch.arange(5.0)).sum() + (b * b).sum()).backward()
            opt.step()
        assert dec.weight is enc.weight and a.data_ptr() == b.data_ptr()
        runs.append((enc.weight.detach().clone(), a.detach().clone()))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("threads", [1, 2])
def test_parameters_with_overlapping_memory_follow_torch_adamw_on_any_number_of_threads(threads):
    """Two parameters viewing overlapping halves of one storage, each large enough for the step to be split over
    threads: the shared elements are updated by the first parameter's step, then by the second's, as torch.optim's
    for-loop does (split over two threads, both would update them at the same time)."""
    n = 1 << 17
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        runs = []
        for make in (lambda ps: xt.AdamW(ps, lr=0.1, compile=False), lambda ps: torch.optim.AdamW(ps, lr=0.1, foreach=False)):
            base = torch.linspace(-1, 1, 3 * n // 2)
            p0, p1 = torch.nn.Parameter(base[:n]), torch.nn.Parameter(base[n // 2 :])
            opt = make([p0, p1])
            g = torch.Generator().manual_seed(0)
            for _ in range(3):  # the first step through the full checks, then the steady-state path
                p0.grad, p1.grad = torch.randn(n, generator=g), torch.randn(n, generator=g)
                opt.step()
            runs.append(base.clone())
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-6, atol=1e-7)


def test_written_overlap_reads_byte_ranges():
    """The ranges are ``[address, address + count * itemsize)`` over the written columns: touching is not
    overlapping, an empty range never overlaps, a read-only column is not looked at."""
    import numpy as np

    from xpoptim.adapters._torch_ckernel import written_overlap

    def table(*rows):
        return np.array(rows, dtype=np.uintp)

    sizes = np.array([4, 4], dtype=np.int64)
    assert not written_overlap(table([1000, 0], [1016, 0]), [0], sizes, 4)  # touching
    assert written_overlap(table([1000, 0], [1012, 0]), [0], sizes, 4)  # one element shared
    assert written_overlap(table([1000, 0], [1000, 0]), [0], sizes, 4)  # the same memory
    assert not written_overlap(table([1000, 5000], [1016, 5000]), [0], sizes, 4)  # column 1 read only
    assert written_overlap(table([1000, 5000], [1016, 5000]), [0, 1], sizes, 4)
    assert written_overlap(table([1000, 2000], [3000, 1990]), [0, 1], sizes, 4)  # a state inside another row's
    assert not written_overlap(table([1000, 0], [1004, 0]), [0], np.array([0, 4], dtype=np.int64), 4)  # empty
    assert not written_overlap(table([1000, 0]), [0], sizes[:1], 4)


def test_views_taken_before_the_first_step_track_the_weights():
    model = _model()
    held = model[0].weight.detach()
    sd = model.state_dict()
    opt = xt.AdamW(model.parameters(), lr=1e-2)
    _train(model, opt, 2)
    assert torch.equal(held, model[0].weight) and torch.equal(sd["0.weight"], model[0].weight)


@pytest.mark.parametrize("ours_cls, ref_cls", [(xt.AdamW, torch.optim.AdamW), (xt.Adam, torch.optim.Adam)], ids=["adamw", "adam"])
def test_state_dict_crosses_to_torch_optim_and_back(ours_cls, ref_cls):
    """Our AdamW/Adam state (``exp_avg``, ``exp_avg_sq``, a ``step`` per parameter) loads into torch.optim's, which
    continues with the step count one higher per step (not once per parameter); torch's loads back into ours once
    the groups carry our ``rule`` and ``state_dtype``. All four continuations follow the same trajectory."""
    hp = {"lr": 1e-2, "weight_decay": 0.1}
    base = _model()
    ours = ours_cls(base.parameters(), **hp)
    _train(base, ours, 2)
    sd = copy.deepcopy(ours.state_dict())

    m_torch = copy.deepcopy(base)
    to_torch = ref_cls(m_torch.parameters(), **hp, foreach=False)
    to_torch.load_state_dict(sd)
    _train(m_torch, to_torch, 2, start=2)
    assert all(st["step"].item() == 4 for st in to_torch.state.values())

    _train(base, ours, 2, start=2)
    for a, b in zip(base.parameters(), m_torch.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    back_sd = copy.deepcopy(to_torch.state_dict())
    for g in back_sd["param_groups"]:
        g.update(rule=ours.param_groups[0]["rule"], state_dtype=None)
    m_back = copy.deepcopy(m_torch)
    back = ours_cls(m_back.parameters(), **hp)
    back.load_state_dict(back_sd)
    _train(m_back, back, 2, start=4)
    _train(base, ours, 2, start=4)
    for a, b in zip(base.parameters(), m_back.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _live_tensor_bytes() -> int:
    gc.collect()
    seen, total = set(), 0
    with warnings.catch_warnings():  # isinstance on deprecated module-level objects warns
        warnings.simplefilter("ignore")
        objs = [o for o in gc.get_objects() if type(o) in (torch.Tensor, torch.nn.Parameter)]  # not fake tensors
    for obj in objs:
        if obj.device.type == "cpu" and not obj.is_sparse:
            st = obj.untyped_storage()
            if st.data_ptr() and st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                total += st.nbytes()
    return total


def test_live_memory_after_zero_grad_equals_torch_optim():
    """After ``zero_grad()`` the optimizer holds parameters and state only: the live tensor bytes equal
    torch.optim.AdamW's for the same model (no gradient buffer, no flat copies)."""

    def measure(make):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(300, 200), torch.nn.ReLU(), torch.nn.Linear(200, 100))
        opt = make(model.parameters())
        _train_big(model, opt)
        opt.zero_grad()
        out = _live_tensor_bytes()
        del model, opt
        return out

    def _train_big(model, opt):
        x = torch.linspace(-1, 1, 300 * 4).reshape(4, 300)
        for _ in range(3):
            opt.zero_grad()
            model(x).pow(2).sum().backward()
            opt.step()

    baseline = _live_tensor_bytes()
    ours = measure(lambda ps: xt.AdamW(ps, lr=1e-3)) - baseline
    ref = measure(lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=False)) - baseline
    n = 300 * 200 + 200 + 200 * 100 + 100
    assert ref >= 3 * 4 * n  # params + exp_avg + exp_avg_sq
    assert ours == ref
