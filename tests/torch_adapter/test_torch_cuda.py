"""CUDA tensors: the same numbers as on CPU, compiled and eager, state on the parameter's device.

Marked ``gpu`` (deselected by default) and skipped without a CUDA device.
"""

from __future__ import annotations

import pytest
import torch
from xpt_support import NAMES, make_params, run_torch, spec_hp

from xpoptim.adapters import torch as xt

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="waits for a CUDA GPU (torch.cuda.is_available() is False; run `nox -s gpu` on a machine with an NVIDIA GPU)"),
]


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_cuda_matches_cpu_float64(name, compile):
    cpu = make_params(name)
    gpu = make_params(name, device="cuda")
    run_torch(lambda ps: xt.create(name, ps, compile=False, **spec_hp(name)), name, cpu, 4)
    opt = run_torch(lambda ps: xt.create(name, ps, compile=compile, **spec_hp(name)), name, gpu, 4)
    tol = dict(rtol=1e-9, atol=1e-11) if name == "deva_sinf" else dict(rtol=1e-12, atol=1e-13)
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(a.detach(), b.detach().cpu(), **tol)
    for p in gpu:
        for k, v in opt.state[p].items():
            if isinstance(v, torch.Tensor) and k != "step":
                assert v.device.type == "cuda"


def test_cuda_state_dict_loads_onto_the_param_device():
    p = torch.ones(10, device="cuda", requires_grad=True)
    opt = xt.AdamW([p], compile=False)
    p.grad = torch.ones(10, device="cuda")
    opt.step()
    sd = opt.state_dict()
    cpu_sd = {"param_groups": sd["param_groups"], "state": {k: {n: (v.cpu() if isinstance(v, torch.Tensor) else v) for n, v in s.items()} for k, s in sd["state"].items()}}
    q = torch.ones(10, device="cuda", requires_grad=True)
    opt2 = xt.AdamW([q], compile=False)
    opt2.load_state_dict(cpu_sd)
    assert opt2.state[q]["exp_avg"].device.type == "cuda"


def test_cuda_bf16_compiled_adamw_close_to_float32():
    p32 = torch.randn(1 << 16, device="cuda", requires_grad=True)
    p16 = p32.detach().to(torch.bfloat16).requires_grad_()
    o32, o16 = xt.AdamW([p32], compile=True), xt.AdamW([p16], compile=True)
    for k in range(3):
        g = torch.randn(1 << 16, device="cuda", generator=torch.Generator("cuda").manual_seed(k))
        p32.grad, p16.grad = g.clone(), g.to(torch.bfloat16)
        o32.step()
        o16.step()
    assert o16.state[p16]["exp_avg"].dtype == torch.float32
    # bf16 params round every step (2**-8 relative); three steps stay within a few bf16 ulps.
    torch.testing.assert_close(p16.detach().float(), p32.detach(), rtol=2**-6, atol=2**-6)
