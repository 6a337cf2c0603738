"""Layout: in-place updates of the user's arrays, chunking, packing, threads, groups, dtypes, routing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import registry_cases
from array_helpers import STEPS, _data, reference, settings

from xpoptim.adapters import array as A
from xpoptim.adapters._array import threads as array_threads
from xpoptim.adapters import numpy as N
from xpoptim.core import SPECS, get_spec
from xpoptim.core import functional as F


def test_user_arrays_are_updated_in_place() -> None:
    base = np.zeros((4, 6))
    view = base[:, ::2]  # a non-contiguous view into the user's own buffer
    w, b = np.ones((3, 3)), np.ones(3)
    params = {"w": w, "b": b, "v": view}
    opt = N.SGD(params, lr=0.5)
    opt.step({"w": np.ones((3, 3)), "b": np.ones(3), "v": np.ones((4, 3))})
    assert params["w"] is w and params["b"] is b
    np.testing.assert_array_equal(w, 0.5)
    np.testing.assert_array_equal(b, 0.5)
    np.testing.assert_array_equal(base[:, ::2], -0.5)
    np.testing.assert_array_equal(base[:, 1::2], 0.0)  # untouched neighbours


def test_strict_and_torch_arrays_are_updated_in_place() -> None:
    xs = pytest.importorskip("array_api_strict")
    torch = pytest.importorskip("torch")
    a = xs.asarray(np.ones(3))
    A.SGD([a], lr=0.5).step([xs.asarray(np.ones(3))])
    np.testing.assert_array_equal(np.from_dlpack(a), 0.5)
    t = torch.ones(2, 2, dtype=torch.float64, requires_grad=True)  # a leaf: written under no_grad
    A.SGD([t], lr=0.5).step([torch.ones(2, 2, dtype=torch.float64)])
    assert torch.all(t == 0.5)


@pytest.mark.parametrize("name", list(SPECS))
def test_chunked_equals_unchunked_exactly(name: str) -> None:
    """Chunks, packs, views and threads give identical bits (every op is elementwise)."""
    shapes = [(1000,), (3, 5), (37,), (), (64, 33), (2, 3, 4), (129,)]
    params, grads, var = _data(4, 3, shapes)
    runs = []
    for chunk, threads in [(None, 1), (64, 1), (7, 1), (64, 2), (10**6, 1)]:
        arrays = [p.copy() for p in params]
        opt = A.create(name, arrays, chunk_size=chunk, threads=threads, **settings(name))
        for t in range(3):
            ex = {"grad_variance": var[t]} if get_spec(name).kind == "elementwise" and get_spec(name).extras else {}
            opt.step(grads[t], **ex)
        runs.append((arrays, opt.state_dict()))
    for arrays, sd in runs[1:]:
        for a, r in zip(arrays, runs[0][0]):
            np.testing.assert_array_equal(a, r)
        for k in sd["state"]:
            for n, v in sd["state"][k].items():
                if v is not None:
                    np.testing.assert_array_equal(v, runs[0][1]["state"][k][n])


def test_default_threads_and_chunks_give_the_one_thread_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    """By default NumPy buckets use the available cores (at most ``MAX_AUTO_THREADS``) with larger chunks; on a
    bucket big enough to be shared between threads the bits are those of one thread over the whole bucket."""
    monkeypatch.setattr(array_threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    rng = np.random.default_rng(5)
    n = 4 * A.DEFAULT_THREADED_CHUNK_SIZE + 123
    p0 = rng.standard_normal(n).astype(np.float32)
    grads = [rng.standard_normal(n).astype(np.float32) for _ in range(3)]
    auto, whole = p0.copy(), p0.copy()
    oa = N.MVNGrad([auto], lr=1e-2)
    ow = N.MVNGrad([whole], lr=1e-2, threads=1, chunk_size=None)
    assert (oa.threads, oa.chunk_size) == (A.MAX_AUTO_THREADS, A.DEFAULT_THREADED_CHUNK_SIZE)
    assert N.MVNGrad([p0.copy()], threads=1).chunk_size == A.DEFAULT_CHUNK_SIZE
    for g in grads:
        oa.step([g])
        ow.step([g])
    np.testing.assert_array_equal(auto, whole)
    assert not np.array_equal(auto, p0)


def test_segments_use_views_for_large_arrays_and_packs_for_small() -> None:
    big, small1, small2 = np.ones(200), np.ones(3), np.ones(4)
    opt = A.Adam([small1, big, small2], chunk_size=64)
    (b,) = opt._buckets
    kinds = [(s.view is not None, [e.key for e in s.entries]) for s in b.segments]
    assert kinds == [(False, [0]), (True, [1]), (False, [2])]
    assert np.shares_memory(b.segments[1].view, big)


def test_float16_params_keep_float32_state() -> None:
    rng = np.random.default_rng(2)
    p32 = rng.standard_normal(50).astype(np.float32)
    g = [rng.standard_normal(50).astype(np.float16) for _ in range(3)]
    p16 = p32.astype(np.float16)
    opt = A.AdamW([p16], lr=0.01, chunk_size=16)
    # Reference: core.functional with float32 state, the parameter rounded to float16 each step.
    spec = get_spec("adamw")
    hp = spec.validate(lr=0.01)
    ref = p32.astype(np.float16)
    st = F.init(spec, ref, hp, state_dtype=np.float32)
    for t, gi in enumerate(g, 1):
        opt.step([gi])
        ref, st = F.step(spec, ref, gi, st, hp, t)
    assert p16.dtype == np.float16
    np.testing.assert_array_equal(p16, ref)
    assert opt.state_dict()["state"][0]["exp_avg"].dtype == np.float32


def test_param_groups_and_schedules() -> None:
    params, grads, _ = _data(8, 4, [(5,), (6,)])
    a, b = params[0].copy(), params[1].copy()
    opt = A.AdamW([{"params": [a], "lr": 0.1}, {"params": [b]}], lr=0.01, weight_decay=0.0)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.01]
    spec = get_spec("adamw")
    ra, rb = params[0].copy(), params[1].copy()
    sa, sb = F.init(spec, ra), F.init(spec, rb)
    for t in range(1, 5):
        lr_a = 0.1 * 0.5 ** (t - 1)  # a schedule on group 0 only
        opt.param_groups[0]["lr"] = lr_a
        if t == 3:
            opt.set_hyperparams(group=1, beta1=0.5)
        opt.step(grads[t - 1])
        ra, sa = F.step(spec, ra, grads[t - 1][0], sa, spec.validate(lr=lr_a, weight_decay=0.0), t)
        rb, sb = F.step(spec, rb, grads[t - 1][1], sb, spec.validate(lr=0.01, weight_decay=0.0, beta1=0.9 if t < 3 else 0.5), t)
    np.testing.assert_array_equal(a, ra)
    np.testing.assert_array_equal(b, rb)
    opt.lr = 0.3
    assert [g["lr"] for g in opt.param_groups] == [0.3, 0.3] and opt.hyperparams["lr"] == 0.3


def test_named_groups() -> None:
    w, b = np.ones((2, 2)), np.ones(2)
    opt = A.SGD([{"params": {"w": w}, "lr": 1.0}, {"params": {"b": b}}], lr=0.5)
    opt.step({"w": np.ones((2, 2)), "b": np.ones(2)})
    np.testing.assert_array_equal(w, 0.0)
    np.testing.assert_array_equal(b, 0.5)
    assert [g["keys"] for g in opt.state_dict()["param_groups"]] == [["w"], ["b"]]


# -- routing of the matrix rules ---------------------------------------------------------------


@pytest.mark.parametrize("name", registry_cases.matrix_names())
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_matrix_routing_and_layout(name: str, layout: str) -> None:
    shapes = [(4, 6), (4, 6), (3, 2, 2), (6,), (), (2, 3, 2)]
    params, grads, var = _data(12, STEPS, shapes)
    ref = reference(name, settings(name), params, grads, var, layout=layout)
    arrays = [p.copy() for p in params]
    opt = A.create(name, arrays, layout=layout, **settings(name))
    stacks = sorted((len(s.entries), s.mshape) for s in opt._stacks)
    want = [(1, (2, 6)), (1, (3, 4)), (2, (4, 6))] if layout == "out_in" else [(2, (4, 6)), (2, (6, 2))]
    assert stacks == want
    for g in grads:
        opt.step(g)
    for a, r in zip(arrays, ref):
        np.testing.assert_allclose(a, r, rtol=1e-12, atol=1e-14)


def test_stacked_matrices_match_separate_newton_schulz() -> None:
    """Same-shape matrices stepped as one stack == each matrix stepped alone."""
    params, grads, _ = _data(13, 3, [(5, 3)] * 4)
    together = [p.copy() for p in params]
    opt = A.Muon(together, lr=0.05)
    assert len(opt._stacks) == 1 and len(opt._stacks[0].entries) == 4
    alone = [p.copy() for p in params]
    opts = [A.Muon([a], lr=0.05) for a in alone]
    for g in grads:
        opt.step(g)
        for o, gi in zip(opts, g):
            o.step([gi])
    for a, b in zip(together, alone):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)


def test_fallback_defaults_and_override() -> None:
    opt = A.Muon([np.ones((2, 2)), np.ones(2)])
    (b,) = opt._buckets
    assert b.spec.name == "adamw"
    fb = opt.param_groups[0]["fallback_hyperparams"]
    assert fb == {"beta1": 0.9, "beta2": 0.95, "eps": 1e-10, "weight_decay": 0.0}  # lr: the optimizer's
    opt = A.Muon([np.ones((2, 2)), np.ones(2)], fallback="sgd", fallback_hyperparams={"lr": 0.5, "momentum": 0.0})
    assert opt._buckets[0].spec.name == "sgd"
    v = opt._entries[1].array
    opt.step([np.zeros((2, 2)), np.ones(2)])
    np.testing.assert_array_equal(v, 0.5)  # plain SGD, lr 0.5
    opt.set_hyperparams(fallback_hyperparams={"lr": 0.25})
    opt.step([np.zeros((2, 2)), np.ones(2)])
    np.testing.assert_array_equal(v, 0.25)


def test_conv_weight_flattening() -> None:
    """A 4-D conv weight (out, in, kh, kw) is one (out, in*kh*kw) matrix for Muon."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 2, 3, 3))
    g = rng.standard_normal(w.shape)
    ref = w.reshape(4, 18).copy()
    A.Muon([w], lr=0.1).step([g])
    spec = get_spec("muon")
    hp = spec.validate(lr=0.1)
    ref, _ = F.step(spec, ref, g.reshape(4, 18), F.init(spec, ref), hp, 1)
    np.testing.assert_allclose(w, ref.reshape(w.shape), rtol=1e-13, atol=1e-15)
    # Scale in fan terms: fan_out 4, fan_in 18 for out_in.
    assert math.isclose(F.matrix_scale(spec, hp, (4, 18), "out_in"), 1.0)


def test_glibc_malloc_is_tuned_only_when_asked() -> None:
    """``tune_glibc_malloc()`` (or ``XPOPTIM_MALLOPT=1`` at the first chunked op-by-op NumPy step) sets glibc's mmap
    threshold to 4 MiB and its top pad (without them chunk temporaries can page-fault on every chunk, 3.5-6x
    slower); by default the process-wide allocator is left alone. Observed in fresh interpreters through glibc's
    ``mallinfo2``: after the step a 3 MiB allocation is served from the heap (no new mmapped bytes) when tuned, and
    mmapped under glibc's default threshold when not."""
    import ctypes
    import os
    import platform
    import subprocess
    import sys

    if platform.libc_ver()[0] != "glibc" or not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("the malloc tuning applies to glibc (>= 2.33 for mallinfo2) only")
    code = (
        "import ctypes, sys, numpy as np\n"
        "from xpoptim.adapters import array as A, numpy as N\nfrom xpoptim.adapters._array import malloc\n"
        "class MI2(ctypes.Structure):\n"
        "    _fields_ = [(n, ctypes.c_size_t) for n in ('arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks',"
        " 'fsmblks', 'uordblks', 'fordblks', 'keepcost')]\n"
        "libc = ctypes.CDLL(None); libc.mallinfo2.restype = MI2\n"
        "if sys.argv[1] == 'call': assert A.tune_glibc_malloc() is True\n"
        "p = [np.zeros(1000)]; N.SGD(p, lr=0.5, chunk_size=100, fuse=False).step([np.ones(1000)])\n"
        "assert (p[0] == -0.5).all()\n"
        "before = libc.mallinfo2().hblkhd\n"
        "a = np.empty(3 << 20, np.uint8)\n"
        "print(libc.mallinfo2().hblkhd - before)\n"
    )
    mapped = {}
    for label, env_value, arg in (("env", "1", "-"), ("call", None, "call"), ("default", None, "-"), ("env0", "0", "-")):
        env = {k: v for k, v in os.environ.items() if k != "XPOPTIM_MALLOPT"}
        if env_value is not None:
            env["XPOPTIM_MALLOPT"] = env_value
        out = subprocess.run([sys.executable, "-c", code, arg], env=env, capture_output=True, text=True, check=True)
        mapped[label] = int(out.stdout.split()[-1])
    assert mapped["env"] == 0 and mapped["call"] == 0
    assert mapped["default"] >= 3 << 20 and mapped["env0"] >= 3 << 20


_FORK_SCRIPT = """
import multiprocessing as mp
import numpy as np
from xpoptim.adapters import array as A
from xpoptim.adapters import numpy as N

def child(queue):
    p = np.zeros(4 * A.DEFAULT_THREADED_CHUNK_SIZE, np.float32)
    N.SGD([p], lr=0.5, threads=2).step([np.ones_like(p)])
    queue.put(float(p[0]))

if __name__ == "__main__":
    p = np.zeros(4 * A.DEFAULT_THREADED_CHUNK_SIZE, np.float32)
    N.SGD([p], lr=0.5, threads=2).step([np.ones_like(p)])  # the parent's pool now exists
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=child, args=(queue,))
    proc.start()
    proc.join(timeout=60)
    if proc.is_alive():
        proc.kill()
        raise SystemExit("HUNG")
    print("child", queue.get(timeout=5))
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork (POSIX) to test a forked child")
def test_threaded_step_works_in_a_forked_child(tmp_path) -> None:  # noqa: ANN001
    """A process forked after the parent used the thread pool must get its own pool (the inherited one has no
    threads, and a task sent to it would never run). Run in a fresh interpreter with NumPy alone, so that no
    torch or JAX thread is alive at the fork."""
    import subprocess
    import sys

    script = tmp_path / "fork_child.py"
    script.write_text(_FORK_SCRIPT)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == "child -0.5"
