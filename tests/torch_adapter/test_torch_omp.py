"""Split CPU steps on torch's own OpenMP threads (``_torch_omp``): every element updated once, with the bits of one
thread, whatever the cut; the runtime is the one torch uses (one ``libgomp`` in the process, its thread count)."""

from __future__ import annotations

import multiprocessing as mp
import os

import numpy as np
import pytest
import torch

from xpoptim.adapters import _torch_ckernel as ck
from xpoptim.adapters import _torch_omp as omp
from xpoptim.adapters import torch as xt
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
    """The regions run on the ``libgomp`` torch loaded, whose thread count follows ``torch.set_num_threads``."""
    r = _runner()
    assert omp.same_runtime(r)
    assert "libgomp" in os.path.basename(r.runtime)
    torch_dir = os.path.realpath(os.path.dirname(torch.__file__))
    if any(p.startswith(torch_dir) for p in omp._mapped_libgomp()):  # torch ships its runtime: ours is that file
        assert os.path.realpath(r.runtime).startswith(torch_dir)
    prev = torch.get_num_threads()
    try:
        for n in (1, 3, 2):
            torch.set_num_threads(n)
            assert r.max_threads() == n
    finally:
        torch.set_num_threads(prev)


def _step_in_child(conn):
    torch.set_num_threads(2)
    try:
        _, got = _steps(seed=1)
        conn.send(got)
    finally:
        conn.close()


def _steps(seed):
    """Two AdamW steps over 300 tensors of 1,000 elements (large enough to split over two threads)."""
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(1000, generator=g)) for _ in range(300)]
    opt = xt.AdamW(ps, lr=0.01, compile=False)
    for _ in range(2):
        for p in ps:
            p.grad = torch.randn(1000, generator=g)
        opt.step()
    return ps, [p.detach().numpy().tobytes() for p in ps]


@pytest.mark.parametrize("threads_of", ["torch's OpenMP pool", "the adapter's thread pool"])
def test_a_forked_child_steps_after_the_parent_used_the_pool(monkeypatch, threads_of):
    """A process forked after a split step steps too, with the same bits, instead of waiting forever for threads
    that were not copied: after torch's OpenMP pool was used (GNU OpenMP cannot start a region in such a child) it
    steps on the adapter's own threads, and a pool of the adapter's is started anew."""
    if threads_of == "torch's OpenMP pool":
        _runner()
    else:
        monkeypatch.setattr(omp, "ENABLED", False)
    if "fork" not in mp.get_all_start_methods():
        pytest.skip("this platform cannot fork processes")
    monkeypatch.setattr(omp, "_USED", [])  # this process's record, as if nothing had been split before
    monkeypatch.setattr(ck, "_POOL", [])
    monkeypatch.setattr(ck, "MIN_ELEMENTS_PER_THREAD", 1 << 10)
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _steps(seed=0)  # the parent uses the pool
        assert bool(omp._USED) == (threads_of == "torch's OpenMP pool")
        assert bool(ck._POOL) == (threads_of == "the adapter's thread pool")
        ctx = mp.get_context("fork")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_step_in_child, args=(child,))
        proc.start()
        ready = parent.poll(120)
        got = parent.recv() if ready else None
        proc.join(10)
        if proc.is_alive():
            proc.kill()
        assert ready, "the forked child did not finish its steps"
        assert got == _steps(seed=1)[1]
    finally:
        torch.set_num_threads(prev)
