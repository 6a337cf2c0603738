"""DistributedDataParallel with the gloo backend on 2 real CPU processes (torch.multiprocessing, spawn)."""

from __future__ import annotations

import datetime
import faulthandler
import gc
import os

import pytest
import torch
import torch.distributed as dist
from xpt_support import spawn_two_ranks

from xpoptim.adapters import torch as xt

STEPS = 3


def _data(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randn(8, 2, generator=g, dtype=torch.float64)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)).double()


def _worker(rank: int, world: int, store: str, out_dir: str, name: str, bucket_view: bool = False) -> None:
    faulthandler.dump_traceback_later(120, exit=False)  # a hung worker prints where it hangs
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    try:
        # gradient_as_bucket_view: DDP's gradients are views of its own buckets, and it expects p.grad to stay so.
        model = torch.nn.parallel.DistributedDataParallel(_model(), gradient_as_bucket_view=bucket_view)
        opt = xt.create(name, model.parameters(), lr=1e-2, compile=False)
        x, y = _data(rank)
        for step in range(STEPS):
            opt.zero_grad(set_to_none=not (bucket_view and step % 2))
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        torch.save([p.detach().clone() for p in model.parameters()], os.path.join(out_dir, f"rank{rank}.pt"))
        # Tear DDP down while the process group is alive (its reducer must not outlive the group).
        del model, opt
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()
    faulthandler.cancel_dump_traceback_later()


@pytest.mark.parametrize(
    "name, bucket_view",
    [("adamw", False), ("adamw", True), pytest.param("muon", False, marks=pytest.mark.slow)],
    ids=["adamw", "adamw-gradient_as_bucket_view", "muon"],
)
def test_ddp_gloo_two_processes(tmp_path, name, bucket_view):
    spawn_two_ranks(_worker, str(tmp_path), name, bucket_view, what="DDP workers")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for a, b in zip(r0, r1):
        assert torch.equal(a, b)  # replicas stay identical
    # Single-process reference: DDP averages the per-rank gradients = gradient of the loss on both halves,
    # stepped by torch.optim.AdamW (the same convention) for AdamW, by our Muon in one process for Muon.
    model = _model()
    if name == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01, foreach=False)
    else:
        opt = xt.create(name, model.parameters(), lr=1e-2, compile=False)
    (x0, y0), (x1, y1) = _data(0), _data(1)
    for _ in range(STEPS):
        opt.zero_grad()
        loss = 0.5 * (torch.nn.functional.mse_loss(model(x0), y0) + torch.nn.functional.mse_loss(model(x1), y1))
        loss.backward()
        opt.step()
    for a, p in zip(r0, model.parameters()):
        torch.testing.assert_close(a, p.detach(), rtol=1e-12, atol=1e-13)

