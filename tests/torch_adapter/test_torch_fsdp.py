"""FSDP2 (``fully_shard``): DTensor parameters stepped shard by shard, on 2 real gloo CPU processes.

The parameters are sharded unevenly (7 rows over 2 ranks: 4 and 3; one row: 1 and an empty shard); the state is
checked through ``torch.distributed.checkpoint``'s full state dict and a ``state_dict`` resume. The references share
no code with the sharded path: torch.optim.AdamW on the unsharded model for AdamW (the same convention), and the
plain (flat-buffer) path of the same rule in one process for rules torch.optim lacks (the rule itself is checked
against float64 references written from the papers in ``test_torch_trajectories``).
"""

from __future__ import annotations

import datetime
import faulthandler
import gc
import io
import os

import pytest
import torch
import torch.distributed as dist
from xpt_support import spawn_two_ranks

from xpoptim.adapters import _torch_engine as _eng
from xpoptim.adapters import torch as xt

STEPS = 4
SPLIT = 2  # the state dict is saved after this many steps, loaded into a fresh optimizer, and both continue
LR = 1e-2


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    # The last layer has one output: rank 1 holds empty shards of its weight and bias.
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3), torch.nn.Linear(3, 1)).double()


def _data(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randn(8, 1, generator=g, dtype=torch.float64)


def _variance(p: torch.Tensor) -> torch.Tensor:
    """A fixed per-element grad_variance for the mini-batch rules (``full_like`` keeps a DTensor a DTensor)."""
    return torch.full_like(p, 0.05)


def _train(model, opt, name, batches, steps):
    for _ in range(steps):
        opt.zero_grad()
        loss = sum(torch.nn.functional.mse_loss(model(x), y) for x, y in batches) / len(batches)
        loss.backward()
        if name in ("msvag_mb", "adam_star_mb"):
            opt.step(grad_variance={p: _variance(p) for p in model.parameters()})
        else:
            opt.step()


def _sharded_model(mesh):
    from torch.distributed.fsdp import fully_shard

    model = _model()
    for layer in (model[0], model[2], model[3]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _worker(rank: int, world: int, store: str, out_dir: str, name: str) -> None:
    faulthandler.dump_traceback_later(120, exit=False)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    try:
        _run(rank, world, out_dir, name)
        # Every model, optimizer and DTensor is gone before the group is (a gloo object outliving its group
        # aborts the process at exit: "terminate called without an active exception").
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()
    faulthandler.cancel_dump_traceback_later()


def _run(rank: int, world: int, out_dir: str, name: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    model, resumed = _sharded_model(mesh), _sharded_model(mesh)
    opt = xt.create(name, model.parameters(), lr=LR, compile=False)
    batch = [_data(rank)]
    _train(model, opt, name, batch, SPLIT)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    with torch.no_grad():
        for a, b in zip(model.parameters(), resumed.parameters()):
            b.to_local().copy_(a.to_local())
    opt2 = xt.create(name, resumed.parameters(), lr=LR, compile=False)
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf, weights_only=False))
    _train(model, opt, name, batch, STEPS - SPLIT)
    _train(resumed, opt2, name, batch, STEPS - SPLIT)
    full = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    out = {
        "full_state": {fqn: {k: v.clone() for k, v in st.items() if isinstance(v, torch.Tensor)} for fqn, st in full["state"].items()},
        "params": [p.full_tensor().detach().clone() for p in model.parameters()],
        "resumed_equal": all(torch.equal(a.to_local(), b.to_local()) for a, b in zip(model.parameters(), resumed.parameters())),
        "state_types": sorted({type(v).__name__ for st in opt.state.values() for k, v in st.items() if k not in ("step", "state_version")}),
        "local_shapes": [tuple(p.to_local().shape) for p in model.parameters()],
    }
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.parametrize("name", ["adamw", "mvngrad", "msvag_mb", "muon", "deva_sinf"])
def test_fsdp2_two_processes_follow_the_unsharded_reference(tmp_path, name):
    spawn_two_ranks(_worker, str(tmp_path), name, what="FSDP workers")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0["local_shapes"] == [(4, 5), (4,), (2, 7), (2,), (1, 3), (1,)]
    assert r1["local_shapes"] == [(3, 5), (3,), (1, 7), (1,), (0, 3), (0,)]
    assert r0["state_types"] == ["DTensor"]  # sharded state, like torch.optim's zeros_like(p)
    assert r0["resumed_equal"] and r1["resumed_equal"]  # state_dict round trip under FSDP2, bit for bit
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)
    # Reference: the unsharded model on both ranks' data (FSDP2 averages the gradients across ranks).
    model = _model()
    if name == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01, foreach=False)
    else:
        opt = xt.create(name, model.parameters(), lr=LR, compile=False)
    _train(model, opt, name, [_data(0), _data(1)], STEPS)
    for a, p in zip(r0["params"], model.parameters()):
        torch.testing.assert_close(a, p.detach(), rtol=1e-12, atol=1e-13)
    # torch.distributed.checkpoint gathers our DTensor state into the full state of the unsharded reference.
    for fqn, p in model.named_parameters():
        ours, ref = r0["full_state"][fqn], opt.state[p]
        assert float(ours["step"]) == float(ref["step"]) == STEPS
        floating = {k for k, v in ref.items() if k != "step" and isinstance(v, torch.Tensor)}
        assert floating and ours.keys() - {"step"} == floating
        for key in ours.keys() - {"step"}:
            torch.testing.assert_close(ours[key], ref[key], rtol=1e-12, atol=1e-14, msg=f"{fqn} {key}")


def test_plain_or_resharded_state_is_refused_for_dtensor_parameters():
    """A plain (unsharded) state tensor, or a shard of another sharding, loaded for a DTensor parameter is refused
    at the step, with nothing changed.
    A real ``fully_shard`` on a one-process gloo group (in-process store)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        _refusals()
        gc.collect()  # nothing of the group may outlive it
    finally:
        dist.destroy_process_group()


def _refusals() -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    model = _sharded_model(init_device_mesh("cpu", (1,)))
    assert type(model[0].weight).__name__ == "DTensor"
    opt = xt.AdamW(model.parameters(), compile=False)
    x, y = _data(0)
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    p = model[0].weight
    good = opt.state[p]["exp_avg"]
    before = [q.to_local().clone() for q in model.parameters()]
    opt.state[p]["exp_avg"] = good.full_tensor()  # a plain tensor where a shard belongs
    with pytest.raises(ValueError, match=r"state 'exp_avg' of a DTensor parameter \(shape \(7, 5\)\) is a Tensor, not a DTensor"):
        opt.step()
    # A shard of another sharding (here 3 of the 7 rows).
    opt.state[p]["exp_avg"] = DTensor.from_local(torch.zeros(3, 5, dtype=torch.float64), p.device_mesh, p.placements, run_check=False)
    with pytest.raises(ValueError, match=r"local shape \(7, 5\)\) has placements .* and local shape \(3, 5\): it was saved under another sharding"):
        opt.step()
    assert all(torch.equal(b, q.to_local()) for b, q in zip(before, model.parameters()))
    opt.state[p]["exp_avg"] = good
    opt.step()  # the good state steps again
    assert not torch.equal(before[0], p.to_local())
    # DeVASinf keeps whole-matrix state, replicated: a sharded one is refused, with nothing changed.
    deva = xt.DeVASinf([p], compile=False)
    deva.step()
    deva.step()
    kept = p.to_local().clone()
    ql = deva.state[p]["QL"]
    assert all(pl.is_replicate() for pl in ql.placements)
    deva.state[p]["QL"] = DTensor.from_local(ql.to_local(), p.device_mesh, p.placements, run_check=False)
    with pytest.raises(ValueError, match=r"state 'QL' of a DTensor parameter \(shape \(7, 5\)\) has placements .*replicated"):
        deva.step()
    assert torch.equal(kept, p.to_local())
    # Plain and DTensor parameters in one group: the plain ones take the usual path.
    plain = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    twin = plain.detach().clone().requires_grad_()
    mixed = xt.AdamW([plain, *model.parameters()], lr=LR, compile=False)
    ref = torch.optim.AdamW([twin], lr=LR, foreach=False)
    for k in range(3):
        plain.grad = torch.full((4, 3), 0.1 * (k + 1), dtype=torch.float64)
        twin.grad = plain.grad.clone()
        mixed.step()
        ref.step()
    torch.testing.assert_close(plain.detach(), twin.detach(), rtol=1e-12, atol=1e-14)
    assert type(mixed.state[p]["exp_avg"]).__name__ == "DTensor" and mixed.state[p]["step"].item() == 3


def test_compiled_shard_step_follows_the_eager_one():
    """``compile=True`` runs the fused kernel on each local shard; it gives the eager numbers up to the last bits
    (inductor may contract into FMAs). One-process gloo group, real ``fully_shard``."""
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        models = [_sharded_model(mesh) for _ in range(2)]
        compiled = _eng._COMPILED_CACHE
        compiled.pop(next((k for k in compiled if k[0] == "adamw" and k[3] == torch.float64), None), None)
        for model, compile_opt in zip(models, (False, True)):
            _train(model, xt.AdamW(model.parameters(), lr=LR, compile=compile_opt), "adamw", [_data(0)], 3)
        assert any(k[0] == "adamw" and k[3] == torch.float64 for k in compiled)  # the shards ran the compiled kernel
        for a, b in zip(*(m.parameters() for m in models)):
            torch.testing.assert_close(a.to_local(), b.to_local(), rtol=1e-12, atol=1e-14)
        assert not torch.equal(models[0][0].weight.to_local(), _model()[0].weight)
        del models
        gc.collect()
    finally:
        dist.destroy_process_group()
