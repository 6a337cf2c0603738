"""The opt-in compiled path (torch.compile of the core kernel, per tensor) against the default path, and
torch.compile of a training step that calls ``opt.step()``.

Compiled and eager runs are not bitwise equal in general: inductor's generated C++/Triton code may contract
``a * b + c`` into FMAs and vectorises ``sqrt``/division differently, which changes the last bit of some elements.
So the comparison is at float32 rounding level over a few steps (relative 1e-6), and exact in the structure
(state names, dtypes, step counts).
"""

from __future__ import annotations

import pytest
import torch
from xpt_support import MATRIX, NAMES, dense_permuted, make_params, run_torch, spec_hp

from xpoptim.adapters import torch as xt


def _compare(name, dtype=torch.float32, steps=3, permuted=False):
    pa, pb = make_params(name, dtype), make_params(name, dtype)
    if permuted:  # channels_last / transposed parameters on the compiled side only
        pb = [dense_permuted(p) for p in pb]
    oa = run_torch(lambda ps: xt.create(name, ps, compile=False, **spec_hp(name)), name, pa, steps)
    ob = run_torch(lambda ps: xt.create(name, ps, compile=True, **spec_hp(name)), name, pb, steps)
    for x, y in zip(pa, pb):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
    for x, y in zip(pa, pb):
        sa, sb = oa.state[x], ob.state[y]
        assert sa.keys() == sb.keys()
        for k in sa:
            if isinstance(sa[k], torch.Tensor):
                assert sa[k].dtype == sb[k].dtype
                torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6)


def test_compiled_equals_eager_adamw():
    _compare("adamw")


def test_compiled_permuted_layouts_equal_eager_row_major():
    _compare("adamw", permuted=True)


FUSABLE = [n for n in NAMES if n not in MATRIX and n != "adamw"]


@pytest.mark.slow
@pytest.mark.parametrize("name", FUSABLE)
def test_compiled_equals_eager(name):
    _compare(name)


@pytest.mark.slow
def test_compiled_bf16_params():
    _compare("mvngrad", torch.bfloat16)


def test_lr_change_does_not_recompile():
    import torch._dynamo.utils as dutils

    p = torch.ones(1000, requires_grad=True)
    opt = xt.AdamW([p], compile=True)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.5)
    p.grad = torch.ones(1000)
    opt.step()
    before = dict(dutils.counters["stats"])
    for _ in range(3):
        p.grad = torch.ones(1000)
        opt.step()
        sched.step()
    after = dict(dutils.counters["stats"])
    assert after.get("unique_graphs", 0) == before.get("unique_graphs", 0)


def test_compiled_training_step_calling_opt_step():
    """torch.compile of a whole training step (forward, backward, opt.step, zero_grad) works and gives the eager
    numbers (the optimizer step runs outside the graph: it is marked ``torch.compiler.disable``)."""
    torch.manual_seed(0)
    make = lambda: torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))  # noqa: E731
    m1 = make()
    m2 = make()
    m2.load_state_dict(m1.state_dict())
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    o1, o2 = xt.AdamW(m1.parameters(), lr=1e-2, compile=False), xt.AdamW(m2.parameters(), lr=1e-2, compile=False)

    def train_step(model, opt):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    compiled = torch.compile(train_step)
    for _ in range(4):
        l1 = train_step(m1, o1)
        l2 = compiled(m2, o2)
        torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-6)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_step_kept_out_of_compiled_graphs_is_wrapped_once():
    """With dynamo loaded (torch.compile used anywhere in the process, or a torch.optim method called), the step
    runs through ``torch._dynamo.disable``; its wrapper is made once, not at every step (making it is a fixed cost
    per step, felt on small models)."""
    import torch._dynamo

    from xpoptim.adapters import _torch_optimizer as topt

    fn = xt.XPOptimizer._xp_step
    wrapped = topt._outside_graphs(fn)
    assert wrapped is not fn and getattr(wrapped, "_torchdynamo_disable", False)
    p = torch.nn.Parameter(torch.ones(3))
    opt = xt.AdamW([p], lr=0.1)
    for _ in range(3):
        p.grad = torch.ones(3)
        opt.step()
    assert topt._outside_graphs(fn) is wrapped
    assert torch.all(p < 1)


def test_compiled_step_serves_tensors_of_many_ranks_and_sizes_without_recompiling_per_shape():
    """One process, one rule, tensors of ranks 0 to 5 and many sizes (more distinct shapes than torch.compile's
    recompile limit of 8): the compiled step works on 1-D views of contiguous tensors, so it serves all of them, and
    gives the default path's numbers."""
    shapes = [(), (1,), (7,), (3, 5), (1, 9), (2, 3, 4), (4, 1, 3), (2, 2, 2, 2), (3, 1, 2, 1, 2), (33,), (6, 6), (5, 2, 3)]
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen) for s in shapes]
    pa = [x.clone().requires_grad_() for x in init]
    pb = [x.clone().requires_grad_() for x in init]
    oa, ob = xt.AdamW(pa, lr=1e-2, compile=False), xt.AdamW(pb, lr=1e-2, compile=True)
    for k in range(3):
        for a, b in zip(pa, pb):
            g = torch.randn(a.shape, generator=gen)
            a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    for a, b in zip(pa, pb):
        assert b.shape == a.shape
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
