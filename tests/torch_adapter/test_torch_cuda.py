"""CUDA tensors: the multi-tensor ``torch._foreach_*`` path (the default on CUDA), ``torch.compile`` (opt-in), state
on the parameter's device, parameters and gradients never re-pointed.

Marked ``gpu`` (deselected by default; ``pytest -m gpu`` selects them) and skipped without a CUDA device.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from xpt_support import NAMES, make_params, run_torch, spec_hp

from xpoptim.adapters import torch as xt
from xpoptim.core import ELEMENTWISE, SPECS
from xpoptim.matrix import tolerance

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs an NVIDIA GPU with a CUDA build of torch (torch.cuda.is_available() is False on this machine)",
    ),
]

FUSABLE = [n for n in ELEMENTWISE if not SPECS[n].extras and SPECS[n].is_fusable(SPECS[n].validate(**spec_hp(n)))]


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("name", NAMES)
def test_cuda_matches_cpu_float64(name):
    cpu = make_params(name)
    gpu = make_params(name, device="cuda")
    run_torch(lambda ps: xt.create(name, ps, **spec_hp(name)), name, cpu, 4)
    opt = run_torch(lambda ps: xt.create(name, ps, **spec_hp(name)), name, gpu, 4)
    tol = dict(rtol=1e-9, atol=1e-11) if name == "deva_sinf" else dict(rtol=1e-12, atol=1e-13)
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(a.detach(), b.detach().cpu(), **tol)
    for p in gpu:
        for k, v in opt.state[p].items():
            if isinstance(v, torch.Tensor) and k != "step":
                assert v.device.type == "cuda"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", FUSABLE)
def test_cuda_foreach_path_follows_the_cpu_compiled_loop_within_the_verifier_bound(name, dtype):
    """The CUDA ``_foreach_*`` path and the CPU's compiled C loop agree within the rule's cross-backend bound
    (:func:`xpoptim.matrix.tolerance`: the largest difference over the distance travelled).

    They are not bit for bit: on an NVIDIA H200 (torch 2.11, CUDA 13) every rule differed in the last bits in float32
    and float64, as CUDA kernels may fuse a multiply and an add into one rounding where the C loop rounds twice.
    """
    gen = np.random.default_rng(0)
    shapes = [(64, 33), (1000,), (3, 1, 5), (), (7,)]
    init = [gen.standard_normal(s) for s in shapes]
    steps = 4
    out = []
    for device in ("cpu", "cuda"):
        params = [torch.tensor(x, dtype=dtype, device=device).requires_grad_() for x in init]
        opt = xt.create(name, params, **spec_hp(name))
        for k in range(steps):
            g_gen = np.random.default_rng([k, 7])
            for p in params:
                p.grad = torch.tensor(0.5 * g_gen.standard_normal(tuple(p.shape)), dtype=dtype, device=device)
            opt.step()
        out.append(np.concatenate([p.detach().cpu().double().numpy().ravel() for p in params]))
    start = np.concatenate([x.ravel() for x in init])
    travelled = np.max(np.abs(out[0] - start))
    err = np.max(np.abs(out[1] - out[0])) / travelled
    bound = tolerance(name, "float32" if dtype == torch.float32 else "float64", steps)
    assert err <= bound.bound, f"{name} {dtype}: CUDA vs CPU {err:.3g} of the distance travelled > {bound.bound:g} ({bound.reason})"


def test_cuda_parameters_and_gradients_are_never_repointed():
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)).cuda()
    ptrs = [p.data_ptr() for p in model.parameters()]
    opt = xt.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(4, 8, device="cuda")
    for _ in range(3):
        opt.zero_grad()
        model(x).square().sum().backward()
        grads = [(p.grad, p.grad.data_ptr()) for p in model.parameters()]
        opt.step()
        assert all(p.grad is g and p.grad.data_ptr() == gp for p, (g, gp) in zip(model.parameters(), grads))
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    assert all(st["step"].device.type == "cpu" and st["step"].item() == 3 for st in opt.state.values())


def test_cuda_compiled_adamw_follows_the_default_path():
    """``compile=True`` (opt-in) gives the default path's numbers up to the last bits (Inductor may contract into
    FMAs)."""
    p = [torch.randn(1 << 12, device="cuda", generator=torch.Generator("cuda").manual_seed(0)).requires_grad_() for _ in range(2)]
    q = [x.detach().clone().requires_grad_() for x in p]
    oa, ob = xt.AdamW(p, lr=1e-2, compile=False), xt.AdamW(q, lr=1e-2, compile=True)
    for k in range(3):
        for a, b in zip(p, q):
            g = torch.randn(1 << 12, device="cuda", generator=torch.Generator("cuda").manual_seed(k + 1))
            a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    for a, b in zip(p, q):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_cuda_state_dict_loads_onto_the_param_device():
    p = torch.ones(10, device="cuda", requires_grad=True)
    opt = xt.AdamW([p])
    p.grad = torch.ones(10, device="cuda")
    opt.step()
    sd = opt.state_dict()
    cpu_sd = {"param_groups": sd["param_groups"], "state": {k: {n: (v.cpu() if isinstance(v, torch.Tensor) else v) for n, v in s.items()} for k, s in sd["state"].items()}}
    q = torch.ones(10, device="cuda", requires_grad=True)
    opt2 = xt.AdamW([q])
    opt2.load_state_dict(cpu_sd)
    assert opt2.state[q]["exp_avg"].device.type == "cuda"


def test_cuda_bf16_adamw_close_to_float32():
    p32 = torch.randn(1 << 16, device="cuda", requires_grad=True)
    p16 = p32.detach().to(torch.bfloat16).requires_grad_()
    o32, o16 = xt.AdamW([p32]), xt.AdamW([p16])
    for k in range(3):
        g = torch.randn(1 << 16, device="cuda", generator=torch.Generator("cuda").manual_seed(k))
        p32.grad, p16.grad = g.clone(), g.to(torch.bfloat16)
        o32.step()
        o16.step()
    assert o16.state[p16]["exp_avg"].dtype == torch.float32
    # bf16 params round every step (2**-8 relative); three steps stay within a few bf16 ulps.
    torch.testing.assert_close(p16.detach().float(), p32.detach(), rtol=2**-6, atol=2**-6)
