"""torch's training utilities that drive any ``torch.optim.Optimizer``, with ours in the place of torch.optim.AdamW:
mixed precision's ``GradScaler`` (with ``unscale_`` and ``clip_grad_norm_``), ``ZeroRedundancyOptimizer`` (which
builds the optimizer from its class) and the SWA helpers. Each runs the same loop with torch.optim.AdamW (or SGD)
as the reference."""

from __future__ import annotations

import copy
import datetime

import pytest
import torch
import torch.distributed as dist

from xpoptim.adapters import torch as xt

STEPS = 4


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 8, generator=g), torch.randn(32, 2, generator=g)


def _scaled_run(opt_cls, poison_step: int | None = None):
    """Steps of a bf16-autocast loop through ``GradScaler``; at ``poison_step`` one gradient holds an inf. Returns
    the model, the optimizer, the scaler's scale after each step, and the parameters after each step."""
    model = _model()
    opt = opt_cls(model.parameters(), lr=1e-2, weight_decay=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = _data()
    scales, params = [], []
    for k in range(STEPS):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.mse_loss(model(x).float(), y)
        scaler.scale(loss).backward()
        if k == poison_step:
            model[0].weight.grad[0, 0] = float("inf")
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
        params.append([p.detach().clone() for p in model.parameters()])
    return model, opt, scales, params


def _adamw(params, **kw):
    return xt.AdamW(params, compile=False, **kw)


def test_grad_scaler_unscale_and_clipping_follow_torch_adamw():
    _, _, scales, ours = _scaled_run(_adamw)
    _, _, ref_scales, ref = _scaled_run(torch.optim.AdamW)
    assert scales == ref_scales
    for step_ours, step_ref in zip(ours, ref):
        for a, b in zip(step_ours, step_ref):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_grad_scaler_skips_the_step_of_an_inf_gradient():
    """The scaler finds the inf, skips ``step`` (parameters and state as they were) and halves the scale; the next
    steps follow torch.optim.AdamW's, which skipped the same step."""
    _, opt, scales, ours = _scaled_run(_adamw, poison_step=2)
    _, _, ref_scales, ref = _scaled_run(torch.optim.AdamW, poison_step=2)
    assert scales == ref_scales and scales[2] == scales[1] / 2
    for a, b in zip(ours[2], ours[1]):
        assert torch.equal(a, b)
    assert all(int(st["step"].item()) == STEPS - 1 for st in opt.state.values())
    for a, b in zip(ours[-1], ref[-1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.fixture
def one_rank_group(tmp_path):
    if not dist.is_available():
        pytest.skip("this torch build has no torch.distributed (ZeroRedundancyOptimizer runs on its gloo backend)")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1, timeout=datetime.timedelta(seconds=60)
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def _zero_run(opt_cls):
    """``STEPS`` steps under ``ZeroRedundancyOptimizer``, then its consolidated state dict loaded into a second one
    over a copy of the model, and one more step of each. Returns both models and the state dict."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    model = _model()
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=opt_cls, lr=1e-2, weight_decay=0.01)
    x, y = _data()
    for _ in range(STEPS):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    opt.consolidate_state_dict(to=0)
    sd = opt.state_dict()
    twin = copy.deepcopy(model)
    twin_opt = ZeroRedundancyOptimizer(twin.parameters(), optimizer_class=opt_cls, lr=1e-2, weight_decay=0.01)
    twin_opt.load_state_dict(sd)
    for m, o in ((model, opt), (twin, twin_opt)):
        o.zero_grad()
        torch.nn.functional.mse_loss(m(x), y).backward()
        o.step()
    return model, twin, sd


def test_zero_redundancy_optimizer_builds_and_steps_ours(one_rank_group):
    """``ZeroRedundancyOptimizer(optimizer_class=xt.AdamW)`` steps, consolidates its state dict and resumes from it
    as it does with torch.optim.AdamW (ZeRO orders the local optimizer's parameters by size, and its resumed run
    is not the uninterrupted one with either class)."""
    model, twin, sd = _zero_run(_adamw)
    ref_model, ref_twin, ref_sd = _zero_run(torch.optim.AdamW)
    assert sorted(sd["state"][0]) == ["exp_avg", "exp_avg_sq", "state_version", "step"]
    assert sorted(ref_sd["state"][0]) == ["exp_avg", "exp_avg_sq", "step"]
    for i, st in sd["state"].items():
        for k in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(st[k], ref_sd["state"][i][k], rtol=1e-6, atol=1e-7)
    for ours, ref in ((model, ref_model), (twin, ref_twin)):
        for a, b in zip(ours.parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_swa_helpers_and_plateau_schedule_drive_our_groups():
    """``SWALR`` anneals and ``ReduceLROnPlateau`` cuts the ``lr`` of our groups as they do torch.optim.SGD's;
    ``AveragedModel`` averages the same weights."""
    runs = []
    for cls in (lambda ps, **kw: xt.SGD(ps, compile=False, **kw), torch.optim.SGD):
        model = _model()
        opt = cls(model.parameters(), lr=0.1, momentum=0.9)
        swa = torch.optim.swa_utils.AveragedModel(model)
        anneal = torch.optim.swa_utils.SWALR(opt, swa_lr=0.05, anneal_epochs=3)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0)
        x, y = _data()
        lrs = []
        for _ in range(STEPS):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            swa.update_parameters(model)
            anneal.step()
            plateau.step(1.0)
            lrs.append(opt.param_groups[0]["lr"])
        runs.append((lrs, [p.detach().clone() for p in swa.module.parameters()]))
    (lrs, avg), (ref_lrs, ref_avg) = runs
    assert lrs == ref_lrs and lrs[-1] < lrs[0]
    for a, b in zip(avg, ref_avg):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
