"""Split CPU steps on torch's own OpenMP threads (``_torch_omp``): every element updated once, with the bits of one
thread, whatever the cut; the runtime is the one torch uses (one ``libgomp`` in the process, its thread count)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xpoptim.adapters import _torch_ckernel as ck
from xpoptim.adapters import _torch_omp as omp
from xpoptim.core import HOST, SPECS, step_scalars


def _runner() -> omp.Runner:
    r = omp.runner()
    if r is None:
        pytest.skip(
            "split CPU steps run on the adapter's own thread pool here: torch does not run its CPU kernels on a "
            "libgomp OpenMP pool, or no C compiler with OpenMP support is installed"
        )
    return r


def _spans(sizes, seed):
    """AdamW's compiled loop, its host scalars (step 3), and per span a parameter, gradient and two state tensors."""
    spec = SPECS["adamw"]
    hp = spec.validate(lr=0.01, weight_decay=0.1)
    kernel = ck.c_kernel(spec, hp, spec.static(hp), False, torch.float32)
    if kernel is None:
        pytest.skip("the compiled CPU loop needs a C compiler (cc, gcc or clang) on PATH")
    g = torch.Generator().manual_seed(seed)
    rows = [[torch.randn(int(n), generator=g), torch.randn(int(n), generator=g), torch.randn(int(n), generator=g), torch.rand(int(n), generator=g)] for n in sizes]
    return kernel, kernel.host_scalars(tuple(step_scalars(spec, hp, 3, HOST))), rows


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("threads", [1, 2, 3, 5])
def test_split_steps_give_the_bits_of_one_thread(seed, threads):
    """Spans of random sizes (empty ones included) cut into equal element runs, one per thread, a span cut anywhere:
    the result equals the whole loop on one thread, so every element was updated exactly once (an element updated
    twice or not at all would differ)."""
    r = _runner()
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, 40, size=int(rng.integers(1, 30))).astype(np.int64)
    sizes[rng.integers(0, sizes.size)] = 0
    if not sizes.any():
        sizes[0] = 1
    kernel, host, ours = _spans(sizes, seed)
    _, _, ref = _spans(sizes, seed)
    kernel.spans(sizes, ck.pointers([list(c) for c in zip(*ref)]), host)
    ran = r.spans(kernel, host, sizes, np.cumsum(sizes), ck.pointers([list(c) for c in zip(*ours)]), 4, threads)
    assert ran == threads
    for a, b in zip(ours, ref):
        for x, y in zip(a, b):
            assert x.numpy().tobytes() == y.numpy().tobytes()


def test_the_runtime_is_torchs():
    """One OpenMP runtime in the process, whose thread count follows ``torch.set_num_threads``."""
    r = _runner()
    assert omp.one_runtime()
    prev = torch.get_num_threads()
    try:
        for n in (1, 3, 2):
            torch.set_num_threads(n)
            assert r.max_threads() == n
    finally:
        torch.set_num_threads(prev)
