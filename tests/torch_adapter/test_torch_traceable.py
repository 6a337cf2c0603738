"""The namespace the compilers trace (``adapters._traceable``): its ``sign`` gives array-api-compat's values. That it
compiles is checked by the compiled sign-based rules in ``test_torch_compile.py`` (M-SSD, DeVA_linf)."""

from __future__ import annotations

import array_api_compat.torch as txp
import torch

from xpoptim.adapters._traceable import TraceableNamespace


def test_traceable_sign_equals_the_array_api_sign_nan_and_zeros_included():
    x = torch.tensor([float("nan"), -0.0, 0.0, -2.5, 3.0, float("inf"), float("-inf"), 1e-45])
    ns = TraceableNamespace(txp, torch)
    got, want = ns.sign(x), txp.sign(x)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(got[~torch.isnan(got)], want[~torch.isnan(want)])
    assert ns.where is txp.where  # everything else is array-api-compat's

