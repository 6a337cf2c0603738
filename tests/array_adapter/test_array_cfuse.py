"""The compiled NumPy step (``adapters._cfuse``): the same bits as the op-by-op NumPy path, for every elementwise rule.

The op-by-op path runs the core kernel through NumPy (checked against float64 references in
``test_array_trajectories.py`` and the equivalence matrix); the compiled path prints the same kernel as one C loop.
Every IEEE operation rounds once in both, so the two must agree bit for bit, not to a tolerance. A float64 AdamW
written from the paper's pseudo-code checks the compiled path on its own as well.
"""

from __future__ import annotations

import itertools
import math
import re
import subprocess

import numpy as np
import pytest

import registry_cases
from xpoptim.adapters import _cfuse
from xpoptim.adapters import array as A
from xpoptim.adapters._array import threads as array_threads
from xpoptim.core import HOST, SPECS, ElementwiseSpec, make_step_kernel, step_scalars

NO_CC = "needs a C compiler (cc, gcc or clang on PATH, or $CC) to build the compiled NumPy step"
needs_cc = pytest.mark.skipif(_cfuse.compiler() is None, reason=NO_CC)

# One array past the test chunk (a flat view, split into threaded tasks), arrays packed together, a 0-D one.
SHAPES = [(3000,), (7, 5), (), (40,), (2, 3, 4)]


def _variants() -> list:
    """Every elementwise rule with every combination of its static switches over its registry settings (invalid
    combinations dropped; the learning rate is ``_run``'s)."""
    out = []
    for name, spec in SPECS.items():
        if not isinstance(spec, ElementwiseSpec):
            continue
        switches = [h for h in spec.hyperparams if h.static]
        options = [h.choices if h.kind == "choice" else (False, True) for h in switches]
        for combo in itertools.product(*options):
            hp = {k: v for k, v in registry_cases.settings(name).items() if k != "lr"}
            hp.update({h.name: v for h, v in zip(switches, combo)})
            try:
                spec.validate(**hp)
            except ValueError:
                continue
            out.append(pytest.param(name, hp, id=f"{name}-{'-'.join(f'{h.name}={v}' for h, v in zip(switches, combo)) or 'default'}"))
    return out


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint8)


def _run(name: str, hp: dict, dtype: type, *, fuse: bool, maximize: bool = False, threads: int = 1, steps: int = 4) -> tuple:
    rng = np.random.default_rng(7)
    params = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    opt = A.create(name, params, maximize=maximize, fuse=fuse, threads=threads, chunk_size=1024, lr=0.01, **hp)
    extras = {n: None for n in opt.spec.extras}
    for t in range(steps):
        grads = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
        grads[0][:50] = 0  # exact zeros: the 0/0 guards of the sign / variance rules
        if t == 1:
            grads[3][:] = 0
        for n in extras:
            extras[n] = [(np.abs(rng.standard_normal(s)) * 0.1).astype(dtype) for s in SHAPES]
        opt.step(grads, **extras)
    return params, opt


@needs_cc
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(("name", "hp"), _variants())
def test_compiled_step_has_the_bits_of_the_numpy_step(name: str, hp: dict, dtype: type) -> None:
    """Compiled and op-by-op NumPy trajectories are bitwise equal (parameters and state), maximize both ways."""
    for maximize in (False, True):
        fused_params, fused_opt = _run(name, hp, dtype, fuse=True, maximize=maximize, threads=2)
        plain_params, plain_opt = _run(name, hp, dtype, fuse=False, maximize=maximize)
        assert plain_opt.fused is False
        if hp.get("adaptation") == "erf":
            # erf is not an IEEE operation (NumPy takes SciPy's or math.erf): this variant stays op by op.
            assert fused_opt.fused is False
            assert "erf" in " ".join(fused_opt.fuse_notes)
        else:
            assert fused_opt.fused is True, fused_opt.fuse_notes
        for a, b in zip(fused_params, plain_params):
            assert np.array_equal(_bits(a), _bits(b))
        sa, sb = fused_opt.state_dict()["state"], plain_opt.state_dict()["state"]
        for key in sa:
            for k in sa[key]:
                assert np.array_equal(_bits(sa[key][k]), _bits(sb[key][k])), (key, k)


@needs_cc
def test_compiled_adamw_matches_a_float64_adamw_from_the_paper() -> None:
    """AdamW (Loshchilov & Hutter, Alg. 2 with torch's eps placement), written out here in float64, 60 steps; one
    parameter large enough to be stepped through a view of itself, two small ones in a pack."""
    rng = np.random.default_rng(3)
    sizes = [40000, 700, 300]
    p = rng.standard_normal(sum(sizes))
    ours = np.split(p.copy(), np.cumsum(sizes)[:-1])
    ours = [a.copy() for a in ours]
    opt = A.create("adamw", ours, lr=0.003, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1)
    assert opt.fused is None or opt.fused is True  # compiled on the first step
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    ref = p.copy()
    for t in range(1, 61):
        g = rng.standard_normal(p.size)
        opt.step(np.split(g, np.cumsum(sizes)[:-1]))
        ref = ref * (1 - 0.003 * 0.1)
        m = 0.8 * m + 0.2 * g
        v = 0.99 * v + 0.01 * g * g
        mhat, vhat = m / (1 - 0.8**t), v / (1 - 0.99**t)
        ref = ref - 0.003 * mhat / (np.sqrt(vhat) + 1e-6)
    assert opt.fused is True
    assert [len(s.entries) for s in opt._buckets[0].segments] == [1, 2]
    np.testing.assert_allclose(np.concatenate(ours), ref, rtol=1e-12, atol=1e-14)


@needs_cc
def test_numpy_scalar_hyperparameters_run_op_by_op_with_numpy_type_rules() -> None:
    """A NumPy float64 ``lr`` promotes float32 arithmetic to float64 in NumPy (NEP 50): such a step is not run
    by the float32 loop; it gives the op-by-op bits."""
    rng = np.random.default_rng(1)
    p0 = rng.standard_normal(2000).astype(np.float32)
    grads = [rng.standard_normal(2000).astype(np.float32) for _ in range(3)]
    out = []
    for fuse in (True, False):
        p = [p0.copy()]
        opt = A.create("adam", p, lr=np.float64(0.01), fuse=fuse)
        for g in grads:
            opt.step([g])
        out.append(p[0])
    assert np.array_equal(_bits(out[0]), _bits(out[1]))


@needs_cc
def test_strided_gradients_and_mixed_dtypes() -> None:
    """A non-contiguous gradient is read correctly; float16 parameters (float32 state) stay op by op, with a note."""
    rng = np.random.default_rng(2)
    # 40000 elements: large enough to be stepped through a view of itself (the gradient is not gathered).
    base = rng.standard_normal(40000).astype(np.float32)
    grads = [rng.standard_normal(80000).astype(np.float32)[::2] for _ in range(3)]  # strided views
    assert not grads[0].flags.c_contiguous
    outs = []
    for fuse in (True, False):
        p = [base.copy()]
        opt = A.create("adamw", p, fuse=fuse, lr=0.01)
        for g in grads:
            opt.step([g])
        outs.append(p[0])
    assert np.array_equal(_bits(outs[0]), _bits(outs[1]))
    h = [np.ones(10, np.float16)]
    opt = A.create("adam", h)
    opt.step([np.ones(10, np.float16)])
    assert opt.fused is False
    assert opt.fuse_notes == ["Adam float16: state dtype differs from the parameter dtype"]


@needs_cc
def test_packs_update_parameters_where_they_are_or_gather_a_non_contiguous_one() -> None:
    """Small arrays are packed: the compiled loop writes each contiguous one through its address (no scatter); a
    pack holding a non-contiguous (Fortran-ordered) array is gathered and scattered as op by op. Both give the
    op-by-op bits, in the user's own array objects."""
    rng = np.random.default_rng(5)
    base = [rng.standard_normal((6, 4)), rng.standard_normal(9), rng.standard_normal(()), rng.standard_normal((3, 5))]
    runs = []
    for fuse in (True, False):
        for fortran in (False, True):
            params = [np.array(a, order="F" if (fortran and a.ndim == 2) else "C") for a in base]
            ids = [id(a) for a in params]
            opt = A.create("adabelief", params, fuse=fuse, lr=0.05, weight_decay=0.1)
            g_rng = np.random.default_rng(6)
            for _ in range(4):
                opt.step([g_rng.standard_normal(a.shape) for a in base])
            assert [id(a) for a in params] == ids
            assert params[0].flags.f_contiguous == fortran
            runs.append((fuse, fortran, params, opt.fused))
    reference = runs[2][2]  # op by op, C order
    for fuse, fortran, params, fused in runs:
        assert fused is fuse
        for a, b in zip(params, reference):
            assert np.array_equal(_bits(a), _bits(b)), (fuse, fortran)


@needs_cc
def test_many_arrays_on_two_threads_run_in_grouped_tasks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hundreds of arrays (each its own compiled task) are run in a few groups of tasks on the threads: every array
    is stepped once, with the op-by-op bits."""
    calls = []
    real = array_threads._grouped

    def spy(tasks, sizes, target):
        out = real(tasks, sizes, target)
        calls.append((len(tasks), len(out)))
        return out

    monkeypatch.setattr(array_threads, "_grouped", spy)
    rng = np.random.default_rng(8)
    base = [rng.standard_normal(600).astype(np.float32) for _ in range(60)] + [rng.standard_normal(5).astype(np.float32)]
    out = []
    for fuse in (True, False):
        params = [a.copy() for a in base]
        opt = A.create("mvngrad", params, fuse=fuse, threads=2, chunk_size=1024, lr=0.01)
        g_rng = np.random.default_rng(9)
        for _ in range(3):
            opt.step([g_rng.standard_normal(a.shape).astype(np.float32) for a in base])
        out.append(params)
    assert calls and all(n_tasks == 61 and n_groups == 2 for n_tasks, n_groups in calls), calls
    for a, b in zip(*out):
        assert np.array_equal(_bits(a), _bits(b))


def test_without_a_compiler_the_step_runs_op_by_op(monkeypatch: pytest.MonkeyPatch) -> None:
    """No C compiler: the same numbers, op by op, and ``fuse_notes`` says why."""
    monkeypatch.setattr(_cfuse, "_COMPILER", [None])
    p = [np.linspace(-1, 1, 100)]
    opt = A.create("sgd", p, lr=0.5)
    opt.step([np.ones(100)])
    np.testing.assert_array_equal(p[0], np.linspace(-1, 1, 100) - 0.5)
    assert opt.fused is False
    assert "no C compiler" in opt.fuse_notes[0]


def test_a_failing_compiler_leaves_the_step_op_by_op(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """A compiler that fails (here ``false``) is reported in ``fuse_notes``; the step still runs, op by op."""
    false = __import__("shutil").which("false")
    if false is None:
        pytest.skip("needs the 'false' command")
    monkeypatch.setattr(_cfuse, "_COMPILER", [false])
    monkeypatch.setenv("XPOPTIM_CACHE_DIR", str(tmp_path))
    p = [np.zeros(10)]
    opt = A.create("sgd", p, lr=0.25)
    opt.step([np.ones(10)])
    np.testing.assert_array_equal(p[0], -0.25 * np.ones(10))
    assert opt.fused is False and "failed" in opt.fuse_notes[0]


@needs_cc
def test_a_compiler_without_march_native_gets_a_second_try(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """Some compilers (clang on arm64) refuse ``-march=native``: the kernel is built without it."""
    wrapper = tmp_path / "picky-cc"
    wrapper.write_text(
        "#!/bin/sh\n"
        'for a in "$@"; do [ "$a" = "-march=native" ] && { echo "unsupported option -march=native" >&2; exit 1; }; done\n'
        f'exec {_cfuse.compiler()} "$@"\n'
    )
    wrapper.chmod(0o755)
    monkeypatch.setattr(_cfuse, "_COMPILER", [str(wrapper)])
    monkeypatch.setattr(_cfuse, "_LOADED", {})
    monkeypatch.setenv("XPOPTIM_CACHE_DIR", str(tmp_path / "cache"))
    p = [np.zeros(10, np.float32)]
    opt = A.create("sgd", p, lr=0.25)
    opt.step([np.ones(10, np.float32)])
    assert opt.fused is True, opt.fuse_notes
    np.testing.assert_array_equal(p[0], np.full(10, -0.25, np.float32))


@needs_cc
def test_an_unwritable_cache_directory_falls_back_to_a_private_one(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """``XPOPTIM_CACHE_DIR`` under a regular file cannot be created: the kernel is built in a private temporary
    directory of the process and the step is still compiled."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("XPOPTIM_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.setattr(_cfuse, "_LOADED", {})
    monkeypatch.setattr(_cfuse, "_PRIVATE_DIR", [])
    p = [np.zeros(10, np.float32)]
    opt = A.create("sgd", p, lr=0.25)
    opt.step([np.ones(10, np.float32)])
    np.testing.assert_array_equal(p[0], np.full(10, -0.25, np.float32))
    assert opt.fused is True
    assert _cfuse._PRIVATE_DIR and not str(_cfuse._PRIVATE_DIR[0]).startswith(str(blocker))


# -- the C printer on its own: each operation against NumPy on the values where conventions differ -----------

SPECIAL = [0.0, -0.0, 1.5, -2.25, np.inf, -np.inf, np.nan, 1e-30, -1e30, 3.0]


def _pairs(dtype: type) -> tuple:
    a, b = zip(*itertools.product(SPECIAL, SPECIAL))
    return np.array(a, dtype), np.array(b, dtype)


OPS = {
    "add": lambda xp: lambda a, b, s: (a + b, b),
    "sub_scalar": lambda xp: lambda a, b, s: (s - a * (1 - s), b),
    "div": lambda xp: lambda a, b, s: (a / b, b),
    "sqrt_abs": lambda xp: lambda a, b, s: (xp.sqrt(xp.abs(a)) + abs(b), b),
    "sign": lambda xp: lambda a, b, s: (xp.sign(a), b),
    "maximum": lambda xp: lambda a, b, s: (xp.maximum(a, b), xp.minimum(a, b)),
    "where": lambda xp: lambda a, b, s: (xp.where((a > b) | (a != a), a, 0 * b), xp.where(~(a <= s), b, -a)),
    "powers": lambda xp: lambda a, b, s: (a**2 + b**0.5, a**-1 * s**2),
}


@needs_cc
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("op", list(OPS))
def test_printed_operations_follow_numpy_on_special_values(op: str, dtype: type) -> None:
    """Signed zeros, infinities, NaN, tiny and huge values: each printed operation gives NumPy's bits."""
    a, b = _pairs(dtype)
    s = 0.7
    with np.errstate(all="ignore"):
        want = OPS[op](np)(a.copy(), b.copy(), s)
    ck = _cfuse.compile_kernel(OPS[op], dtype, 2, 1, [0, 1])
    x, y = a.copy(), b.copy()
    ck(x.size, [x, y], ck.host_scalars((s,)))
    for got, w in zip((x, y), want):
        w = np.asarray(w, dtype)
        nan = np.isnan(w)
        assert np.array_equal(np.isnan(got), nan)
        assert np.array_equal(_bits(got[~nan]), _bits(w[~nan])), op


@pytest.mark.parametrize(
    ("kernel", "message"),
    [
        (lambda xp: lambda a, b, s: (xp.exp(a), b), "xp.exp"),
        (lambda xp: lambda a, b, s: (a if a > 0 else b, b), "branches"),
        (lambda xp: lambda a, b, s: (a**3, b), "power 3"),
        (lambda xp: lambda a, b, s: (a * np.float64(2.0), b), "float64"),
        (lambda xp: lambda a, b, s: (a, b > 0), "boolean"),
        (lambda xp: lambda a, b, s: (xp.sqrt(s) * a, b), "sqrt of a"),
        (lambda xp: lambda a, b, s: (a, math.sqrt(s) * b), "Python number"),
    ],
    ids=["exp", "python-if", "cube", "numpy-scalar", "bool-output", "sqrt-of-host-number", "math-sqrt"],
)
def test_the_tracer_refuses_what_it_cannot_print_exactly(kernel, message: str) -> None:
    with pytest.raises(_cfuse.TraceError, match=message):
        _cfuse.trace(kernel, 2, 1, [0, 1])


def _gcc() -> str | None:
    cc = _cfuse.compiler()
    if cc is None:
        return None
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return cc if "Free Software Foundation" in out else None


@pytest.mark.skipif(_gcc() is None, reason="the vectorisation report read here is gcc's (-fopt-info-vec); this machine's C compiler is not gcc")
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(("name", "hp"), _variants())
def test_every_compiled_loop_is_vectorised(name: str, hp: dict, dtype: type, tmp_path) -> None:
    """gcc vectorises each rule's loops (one element at a time is several times slower: M-SVAG's direction ran so
    until boolean ``and`` was printed as a select): the flat loop and the inner loops over packs and over spans by
    address, read from gcc's own report with the library's flags."""
    spec = SPECS[name]
    full = {**spec.defaults, "lr": 0.01, **hp}
    if not spec.is_fusable(full):
        pytest.skip(f"{name} with {hp} runs op by op (an operation with no exact C form)")
    static = spec.static(full)
    n_arrays = 2 + len(spec.extras) + len(spec.state)
    n_scalars = len(step_scalars(spec, full, 1, HOST))
    graph, outputs = _cfuse.trace(lambda xp: make_step_kernel(spec, xp, static, maximize=False), n_arrays, n_scalars, [0, *range(2 + len(spec.extras), n_arrays)])
    source = _cfuse._emit(graph, n_arrays, n_scalars, outputs, np.dtype(dtype))[0]
    src = tmp_path / "k.c"
    src.write_text(source)
    flags = [f for f in _cfuse.COMPILE_FLAGS if f != "-shared"]
    report = subprocess.run([_gcc(), *flags, "-c", "-fopt-info-vec-optimized", str(src), "-o", str(tmp_path / "k.o")], capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    loops = [i + 1 for i, line in enumerate(source.splitlines()) if "for (int64_t i = 0; i < n; ++i)" in line]
    assert len(loops) == 3, loops
    vectorised = {int(m) for m in re.findall(r"k\.c:(\d+):\d+: optimized: loop vectorized", report.stderr)}
    assert set(loops) <= vectorised, (loops, report.stderr[:2000])
