"""The elementwise paths give the same bits: the compiled C loop over the tensors' addresses (split over threads or
not), the multi-tensor ``torch._foreach_*`` path, and the op-by-op reference (the core kernel on one tensor at a time
with the array-API torch namespace). Also: importing the adapter and stepping do not load dynamo or inductor."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from xpt_support import spec_hp

from xpoptim.adapters import _cfuse
from xpoptim.adapters import _torch_ckernel as ck
from xpoptim.adapters import _torch_engine as eng
from xpoptim.adapters import _torch_omp as omp
from xpoptim.adapters import torch as xt
from xpoptim.core import ELEMENTWISE, SPECS

SHAPES = [(64, 33), (1000,), (3, 1, 5), (), (0,), (7,)]
RULES = [n for n in ELEMENTWISE if not SPECS[n].extras]
needs_cc = pytest.mark.skipif(_cfuse.compiler() is None, reason="the compiled CPU loop needs a C compiler (cc, gcc or clang) on PATH")


def _params(dtype, seed=0, permuted=False):
    gen = np.random.default_rng(seed)
    out = []
    for s in SHAPES:
        t = torch.tensor(gen.standard_normal(s), dtype=dtype)
        if permuted and t.ndim == 2:
            t = t.t().contiguous().t()  # a dense transposed layout: not contiguous
        out.append(t.requires_grad_())
    return out


def _grads(params, k, scale):
    gen = np.random.default_rng([k, 7])
    return [torch.tensor(scale * gen.standard_normal(tuple(p.shape)), dtype=p.dtype) for p in params]


def _bytes(t):
    t = t.detach().cpu()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()


def _run_optimizer(name, dtype, maximize, permuted=False, steps=4):
    params = _params(dtype, permuted=permuted)
    opt = xt.create(name, params, maximize=maximize, **spec_hp(name))
    for k in range(steps):
        for p, g in zip(params, _grads(params, k, 0.5)):
            p.grad = g
        opt.step()
    return params, opt


def _run_reference(name, dtype, maximize, steps=4):
    """The op-by-op path: ``_torch_engine.eager_step`` on each tensor, with state made like the optimizer's."""
    spec = SPECS[name]
    hp = spec.validate(**spec_hp(name))
    params = [p.detach() for p in _params(dtype)]
    states = [[torch.zeros_like(p) for _ in spec.state] for p in params]
    for k in range(steps):
        for p, g, st in zip(params, _grads(params, k, 0.5), states):
            eng.eager_step(spec, hp, maximize, k + 1, p, g, [], st)
    return params, states


@needs_cc
@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", RULES)
def test_compiled_loop_and_foreach_path_equal_op_by_op_bit_for_bit(name, dtype, maximize, monkeypatch):
    ref_p, ref_s = _run_reference(name, dtype, maximize)
    spec = SPECS[name]
    runs = {}
    for path, enabled in (("c", True), ("foreach", False)):
        monkeypatch.setattr(ck, "ENABLED", enabled)
        runs[path] = _run_optimizer(name, dtype, maximize)
    uses_c = spec.is_fusable(spec.validate(**spec_hp(name)))
    if uses_c:  # the rule has an exact C form: the compiled loop really ran
        key = (name, ck._static_key(spec.static(spec.validate(**spec_hp(name)))), maximize, dtype)
        assert isinstance(ck._KERNELS.get(key), _cfuse.CKernel), ck._KERNELS.get(key)
    for path, (params, opt) in runs.items():
        for p, rp, rs in zip(params, ref_p, ref_s):
            assert _bytes(p) == _bytes(rp), (path, tuple(p.shape))
            for n, r in zip(spec.state, rs):
                assert _bytes(opt.state[p][n]) == _bytes(r), (path, n, tuple(p.shape))


@needs_cc
@pytest.mark.parametrize("threads_of", ["torch's OpenMP pool", "the adapter's thread pool"])
def test_threaded_spans_equal_one_thread(monkeypatch, threads_of):
    """Large steps are cut into one element range per thread (a tensor on a cut is split in two): same bits, on
    torch's OpenMP threads (where ``_torch_omp`` builds) and on the adapter's own pool."""
    if threads_of == "the adapter's thread pool":
        monkeypatch.setattr(omp, "ENABLED", False)
    out = []
    for min_per_thread, threads in ((1 << 30, 1), (7, 2), (3, 3)):
        monkeypatch.setattr(ck, "MIN_ELEMENTS_PER_THREAD", min_per_thread)
        prev = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            params, opt = _run_optimizer("adamw", torch.float32, False)
        finally:
            torch.set_num_threads(prev)
        out.append([_bytes(p) for p in params] + [_bytes(opt.state[p]["exp_avg_sq"]) for p in params])
    assert out[0] == out[1] == out[2]


def test_split_covers_every_element_once():
    sizes = np.array([5, 0, 17, 1, 9], dtype=np.int64)
    ptrs = np.arange(10, dtype=np.uintp).reshape(5, 2) * np.uintp(1000)
    for parts in (1, 2, 3, 7):
        jobs = ck._split(sizes, ptrs, 4, parts)
        covered = []
        for s, p in jobs:
            for n, row in zip(s, p):
                j = int(np.nonzero(ptrs[:, 1] // 1000 == (row[1] - row[1] % 1000) // 1000)[0][0])
                start = (int(row[0]) - int(ptrs[j, 0])) // 4
                covered += [(j, start + i) for i in range(int(n))]
        assert sorted(covered) == [(j, i) for j, n in enumerate(sizes) for i in range(int(n))]


@needs_cc
def test_permuted_layouts_take_the_foreach_path_with_the_same_bits():
    a, oa = _run_optimizer("adamw", torch.float32, False, permuted=True)
    b, ob = _run_optimizer("adamw", torch.float32, False, permuted=False)
    assert not a[0].is_contiguous()
    assert all(_bytes(x) == _bytes(y) for x, y in zip(a, b))
    assert oa.state[a[0]]["exp_avg"].stride() == a[0].stride()  # state keeps the parameter's memory format


def test_bf16_params_with_float32_state_round_a_float32_step():
    """bf16 parameters keep float32 state; each step is the float32 step of the parameter's float32 value, rounded
    once to bf16 (checked bit for bit against the op-by-op float32 step)."""
    spec = SPECS["adamw"]
    hp = spec.validate(lr=1e-2, weight_decay=0.1)
    p16 = torch.linspace(-1, 1, 50, dtype=torch.bfloat16).requires_grad_()
    opt = xt.AdamW([p16], lr=1e-2, weight_decay=0.1)
    state = [torch.zeros(50), torch.zeros(50)]
    for k in range(3):
        g = (torch.linspace(-0.5, 0.7, 50) * (k + 1)).bfloat16()
        ref = p16.detach().float().clone()
        eng.eager_step(spec, hp, False, k + 1, ref, g.float(), [], state)
        p16.grad = g
        opt.step()
        assert opt.state[p16]["exp_avg"].dtype == torch.float32
        assert _bytes(p16) == _bytes(ref.bfloat16())
        assert _bytes(opt.state[p16]["exp_avg_sq"]) == _bytes(state[1])


def _python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_import_and_default_steps_do_not_load_dynamo_or_inductor():
    """``import xpoptim.adapters.torch``, constructing, stepping, ``zero_grad``, ``state_dict`` and
    ``load_state_dict`` never import ``torch._dynamo`` or ``torch._inductor`` (seconds of import; torch.compile is
    opt-in)."""
    out = _python(
        """
        import sys
        import torch
        import xpoptim.adapters.torch as xt
        seen = []
        seen.append(any(m in sys.modules for m in ("torch._dynamo", "torch._inductor")))
        p = torch.zeros(4, 3, requires_grad=True)
        b = torch.zeros(3, requires_grad=True)
        for opt in (xt.AdamW([p, b]), xt.Muon([p, b])):
            for _ in range(2):
                opt.zero_grad()
                p.grad, b.grad = torch.ones(4, 3), torch.ones(3)
                opt.step()
            opt.load_state_dict(opt.state_dict())
        seen.append(any(m in sys.modules for m in ("torch._dynamo", "torch._inductor")))
        print(seen)
        """
    )
    assert out == "[False, False]"
