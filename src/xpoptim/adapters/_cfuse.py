"""A ``cupy.fuse`` for NumPy: trace the core step kernel once, emit one C loop, compile it with the system C compiler.

The NumPy path of the array adapter otherwise runs a rule op by op (a dozen NumPy calls per chunk, each one a pass
over the chunk). This module turns the *same* core kernel (``core.spec.make_step_kernel``) into one loop that reads
each input element once and writes each output once, the way ``torch.compile`` (Inductor's C++ backend) and
``cupy.fuse`` do for their arrays. It holds no optimizer math: the math is whatever the core kernel does when it is
called on symbolic arrays; this module only records the operations and prints them as C.

**Same bits as NumPy, by construction.** Only operations whose NumPy result is exactly specified by IEEE 754 are
accepted: ``+ - * /``, unary ``-``, ``sqrt``, ``abs``, comparisons, ``where``, ``maximum`` / ``minimum`` (with
NumPy's NaN propagation and its choice on ties), ``sign`` and the power fast paths NumPy itself takes (``x**2`` is
``x*x``, ``x**0.5`` is ``sqrt``, ``x**-1`` is ``1/x``). Types follow NumPy 2 (NEP 50): a Python number meeting an
array is converted to the array's dtype and the operation runs in that dtype; arithmetic between Python numbers runs
in Python (float64) before the call, exactly as the op-by-op path computes it. The C is compiled without
floating-point contraction (``-ffp-contract=off``: no FMA) or fast-math, so every operation rounds once, as in NumPy.
Anything else (``exp``, ``erf``, casts, a Python ``if`` on an array, a NumPy scalar among the inputs) stops the trace,
and the caller runs the rule op by op instead. ``tests/array_adapter/test_array_cfuse.py`` checks the bits against
the op-by-op path for every elementwise rule.

Each library has three entry points: ``xpoptim_step`` over one flat span (every array ``n`` elements),
``xpoptim_step_packed`` over a pack of parameters given by address (each its own array; gradient, extra inputs and
state flat), so that small arrays are updated where they are, with no gather or scatter of the parameters (the NumPy
adapter), and ``xpoptim_step_ptrs`` over spans whose every array is given by address (the torch adapter: parameters,
the gradients backward made, extra inputs and state, each where it lives); plus two helpers that read or set
float32 step counters by address.

The compiled library is cached by a hash of its source, the compiler, the flags and the CPU (``XPOPTIM_CACHE_DIR``,
default ``~/.cache/xpoptim``; a private temporary directory when that cannot be written); ``CC`` chooses the compiler
(default ``cc``). Calls go through ``ctypes``, which releases the GIL, so the adapter's threads run chunks of one
bucket in parallel.
"""

from __future__ import annotations

import ctypes
import hashlib
import operator
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["TraceError", "CKernel", "trace", "compile_kernel", "build_library", "compiler", "COMPILE_FLAGS", "COMPILE_TIMEOUT_S"]

#: IEEE-exact code: no contraction into FMA, no fast-math; errno-free sqrt lets the loop vectorise.
COMPILE_FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared")

_C_TYPES = {np.dtype(np.float32): ("float", "f"), np.dtype(np.float64): ("double", "")}


class TraceError(Exception):
    """The kernel uses something that has no exact one-loop C form here; run it op by op."""


# ----------------------------------------------------------------------------------------------
# Tracing
# ----------------------------------------------------------------------------------------------


class _Graph:
    def __init__(self) -> None:
        self.nodes: list[tuple] = []  # (kind, op, args); kind: "a" float array, "b" bool array, "s" host scalar

    def add(self, kind: str, op: str, *args: Any) -> _Sym:
        self.nodes.append((kind, op, args))
        return _Sym(self, len(self.nodes) - 1, kind)


class _Sym:
    """A symbolic value: an array element (``kind`` "a"/"b") or a Python number computed on the host ("s")."""

    __slots__ = ("graph", "index", "kind")
    __array_priority__ = 1000.0

    def __init__(self, graph: _Graph, index: int, kind: str) -> None:
        self.graph, self.index, self.kind = graph, index, kind

    def __bool__(self) -> bool:
        raise TraceError("the kernel branches on a value in Python")

    def __float__(self) -> float:
        raise TraceError("the kernel converts a traced value to a Python number")

    __int__ = __index__ = __float__

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        raise TraceError("the kernel converts a traced value to a NumPy array")

    def _bin(self, other: Any, op: str, reflected: bool = False) -> _Sym:
        a, b = (other, self) if reflected else (self, other)
        return _binary(self.graph, op, a, b)

    def __add__(self, o: Any) -> _Sym:
        return self._bin(o, "+")

    def __radd__(self, o: Any) -> _Sym:
        return self._bin(o, "+", True)

    def __sub__(self, o: Any) -> _Sym:
        return self._bin(o, "-")

    def __rsub__(self, o: Any) -> _Sym:
        return self._bin(o, "-", True)

    def __mul__(self, o: Any) -> _Sym:
        return self._bin(o, "*")

    def __rmul__(self, o: Any) -> _Sym:
        return self._bin(o, "*", True)

    def __truediv__(self, o: Any) -> _Sym:
        return self._bin(o, "/")

    def __rtruediv__(self, o: Any) -> _Sym:
        return self._bin(o, "/", True)

    def __pow__(self, o: Any) -> _Sym:
        if self.kind == "s" and (isinstance(o, (int, float)) or (isinstance(o, _Sym) and o.kind == "s")):
            return _binary(self.graph, "**", self, o)
        if self.kind == "a" and type(o) in (int, float):
            # NumPy's fast paths for a Python exponent (ndarray.__pow__): exact, like these.
            if o == 2:
                return self * self
            if o == 1:
                return self
            if o == 0.5:
                return self.graph.add("a", "sqrt", self)
            if o == -1:
                return 1 / self
        raise TraceError(f"power {o!r} of an array (only 2, 1, 0.5 and -1 are exact in NumPy)")

    def __rpow__(self, o: Any) -> _Sym:
        if self.kind == "s" and isinstance(o, (int, float)) and not isinstance(o, bool):
            return _binary(self.graph, "**", o, self)
        raise TraceError("a number raised to an array power")

    def __neg__(self) -> _Sym:
        if self.kind == "b":
            raise TraceError("negation of a boolean array")
        return self.graph.add(self.kind, "neg", self)

    def __pos__(self) -> _Sym:
        return self

    def __abs__(self) -> _Sym:
        return _unary("abs", self)

    def __lt__(self, o: Any) -> _Sym:
        return _compare(self.graph, "<", self, o)

    def __le__(self, o: Any) -> _Sym:
        return _compare(self.graph, "<=", self, o)

    def __gt__(self, o: Any) -> _Sym:
        return _compare(self.graph, ">", self, o)

    def __ge__(self, o: Any) -> _Sym:
        return _compare(self.graph, ">=", self, o)

    def __eq__(self, o: Any) -> _Sym:  # type: ignore[override]
        return _compare(self.graph, "==", self, o)

    def __ne__(self, o: Any) -> _Sym:  # type: ignore[override]
        return _compare(self.graph, "!=", self, o)

    __hash__ = None  # type: ignore[assignment]

    def __and__(self, o: Any) -> _Sym:
        return _logical(self.graph, "&&", self, o)

    __rand__ = __and__

    def __or__(self, o: Any) -> _Sym:
        return _logical(self.graph, "||", self, o)

    __ror__ = __or__

    def __invert__(self) -> _Sym:
        if self.kind != "b":
            raise TraceError("~ of a non-boolean value")
        return self.graph.add("b", "not", self)


def _operand(graph: _Graph, x: Any) -> Any:
    """A ``_Sym`` of ``graph`` or a Python number (bool excluded: NumPy would treat it as an integer array)."""
    if isinstance(x, _Sym):
        if x.graph is not graph:
            raise TraceError("values of two traces mixed")
        return x
    if type(x) in (int, float):
        return x
    raise TraceError(f"operand of type {type(x).__name__} (only traced arrays and Python numbers are exact here)")


def _kind_of(x: Any) -> str:
    return x.kind if isinstance(x, _Sym) else "s"


def _binary(graph: _Graph, op: str, a: Any, b: Any) -> _Sym:
    a, b = _operand(graph, a), _operand(graph, b)
    ka, kb = _kind_of(a), _kind_of(b)
    if "b" in (ka, kb):
        raise TraceError(f"arithmetic '{op}' on a boolean array")
    if ka == "s" and kb == "s":
        return graph.add("s", op, a, b)
    if op == "**":
        raise TraceError("power with an array operand")
    return graph.add("a", op, a, b)


def _compare(graph: _Graph, op: str, a: Any, b: Any) -> _Sym:
    a, b = _operand(graph, a), _operand(graph, b)
    ka, kb = _kind_of(a), _kind_of(b)
    if "b" in (ka, kb) or (ka == "s" and kb == "s"):
        raise TraceError(f"comparison '{op}' of booleans or of two host numbers")
    return graph.add("b", op, a, b)


def _logical(graph: _Graph, op: str, a: Any, b: Any) -> _Sym:
    a, b = _operand(graph, a), _operand(graph, b)
    if _kind_of(a) != "b" or _kind_of(b) != "b":
        raise TraceError(f"'{op}' of non-boolean values")
    return graph.add("b", op, a, b)


def _unary(op: str, x: Any) -> _Sym:
    if not isinstance(x, _Sym) or x.kind != "a":
        # NumPy would return a NumPy scalar (float64) for a Python number: a different type rule.
        raise TraceError(f"{op} of a {'boolean array' if isinstance(x, _Sym) else type(x).__name__}")
    return x.graph.add("a", op, x)


def _graph_of(*xs: Any) -> _Graph:
    for x in xs:
        if isinstance(x, _Sym):
            return x.graph
    raise TraceError("a namespace function called on host numbers only")


class _Namespace:
    """The array-API subset an elementwise core rule may call, recording instead of computing."""

    name = "xpoptim-cfuse-trace"

    @staticmethod
    def sqrt(x: Any) -> _Sym:
        return _unary("sqrt", x)

    @staticmethod
    def abs(x: Any) -> _Sym:  # noqa: A003
        return _unary("abs", x)

    @staticmethod
    def sign(x: Any) -> _Sym:
        return _unary("sign", x)

    @staticmethod
    def square(x: Any) -> _Sym:
        if not isinstance(x, _Sym) or x.kind != "a":
            raise TraceError("square of a non-array")
        return x * x  # NumPy's square is x*x, rounded once

    @staticmethod
    def negative(x: Any) -> _Sym:
        return -_operand(_graph_of(x), x)

    @staticmethod
    def maximum(a: Any, b: Any) -> _Sym:
        return _minmax("max", a, b)

    @staticmethod
    def minimum(a: Any, b: Any) -> _Sym:
        return _minmax("min", a, b)

    @staticmethod
    def where(c: Any, a: Any, b: Any) -> _Sym:
        graph = _graph_of(c, a, b)
        c, a, b = _operand(graph, c), _operand(graph, a), _operand(graph, b)
        if _kind_of(c) != "b":
            raise TraceError("where() with a condition that is not a boolean array")
        if "b" in (_kind_of(a), _kind_of(b)):
            raise TraceError("where() choosing between booleans")
        return graph.add("a", "where", c, a, b)

    @staticmethod
    def zeros_like(x: Any) -> _Sym:
        if not isinstance(x, _Sym) or x.kind != "a":
            raise TraceError("zeros_like of a non-array")
        return x.graph.add("a", "const", 0)

    @staticmethod
    def ones_like(x: Any) -> _Sym:
        if not isinstance(x, _Sym) or x.kind != "a":
            raise TraceError("ones_like of a non-array")
        return x.graph.add("a", "const", 1)

    def __getattr__(self, name: str) -> Any:
        raise TraceError(f"xp.{name} has no exact one-loop C form here")


def _minmax(op: str, a: Any, b: Any) -> _Sym:
    graph = _graph_of(a, b)
    a, b = _operand(graph, a), _operand(graph, b)
    if "a" not in (_kind_of(a), _kind_of(b)) or "b" in (_kind_of(a), _kind_of(b)):
        raise TraceError(f"{op}imum needs a float array operand")
    return graph.add("a", op, a, b)


_NAMESPACE = _Namespace()

_HOST_OPS: dict[str, Callable] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "/": operator.truediv,
    "**": operator.pow,
    "neg": operator.neg,
}


# ----------------------------------------------------------------------------------------------
# C code
# ----------------------------------------------------------------------------------------------


def _c_literal(v: float | int) -> str:
    return float(v).hex() if v == v and abs(v) != float("inf") else ("NAN" if v != v else ("INFINITY" if v > 0 else "-INFINITY"))


class CKernel:
    """One compiled step loop: ``kernel(n, p, g, *extras, *state, *scalars)`` writes ``p`` and the state in place;
    :meth:`packed` runs it over many parameters given by address.

    Attributes:
        dtype: the one floating dtype of every array (float32 or float64).
        source: the C source.
        n_arrays: number of array arguments (``p, g, *extras, *state``).
    """

    # The loops over arrays given by address (set by :func:`compile_kernel` from the same library):
    _ptrs: Any
    #: The address of the compiled span loop (``xpoptim_step_ptrs``), for C code that calls it directly.
    spans_address: int
    _read_steps: Any
    _write_steps: Any

    def __init__(self, fn: Any, packed: Any, dtype: np.dtype, source: str, n_arrays: int, host_program: list, n_inputs: int, host_outputs: list) -> None:
        self._fn = fn
        self._packed = packed
        self.dtype = dtype
        self.source = source
        self.n_arrays = n_arrays
        self._host_program = host_program
        self._n_inputs = n_inputs
        self._host_outputs = host_outputs
        self._host_type = ctypes.c_double * max(1, len(host_outputs))

    def host_scalars(self, scalars: tuple) -> Any:
        """The doubles the loop reads (a ctypes array), computed in Python as the op-by-op path computes them;
        ``None`` when a runtime scalar is not a Python number (a NumPy scalar or a 0-D array follows other type
        rules)."""
        if len(scalars) != self._n_inputs:
            return None
        values: list = list(scalars)
        for s in scalars:
            if type(s) not in (int, float):
                return None
        for op, args in self._host_program:
            values.append(_HOST_OPS[op](*(values[a] if isinstance(a, int) else a[0] for a in args)))
        return self._host_type(*(float(values[i]) for i in self._host_outputs))

    def __call__(self, n: int, arrays: list, host: Any) -> None:
        """Run the loop over ``n`` elements: ``arrays`` are C-contiguous and of :attr:`dtype`; ``host`` from
        :meth:`host_scalars`."""
        self._fn(n, *(a.ctypes.data for a in arrays), host)

    def packed(self, sizes: np.ndarray, pointers: np.ndarray, flat: list, host: Any) -> None:
        """Run the loop over a pack of parameters updated where they are (no gather, no scatter).

        Args:
            sizes: int64, the element count of each parameter.
            pointers: uintp, the address of each parameter's first element (C-contiguous, :attr:`dtype`).
            flat: the other arrays (gradient, extras, state), C-contiguous, ``sizes.sum()`` elements each, the
                parameters' elements one after another.
            host: from :meth:`host_scalars`.
        """
        self._packed(sizes.size, sizes.ctypes.data, pointers.ctypes.data, *(a.ctypes.data for a in flat), host)

    def spans(self, sizes: np.ndarray, pointers: np.ndarray, host: Any) -> None:
        """Run the loop over spans whose every array is given by address (nothing gathered, nothing packed).

        Args:
            sizes: int64, the element count of each span.
            pointers: uintp, shape ``(len(sizes), n_arrays)``, C-contiguous: row ``j`` holds the addresses of span
                ``j``'s parameter, gradient, extra inputs and state, each C-contiguous with ``sizes[j]`` elements of
                :attr:`dtype`.
            host: from :meth:`host_scalars`.
        """
        self.spans_at(sizes.size, sizes.ctypes.data, pointers.ctypes.data, host)

    def spans_at(self, m: int, sizes: int, pointers: int, host: Any) -> None:
        """:meth:`spans` over arrays given by their addresses (``sizes.ctypes.data`` and ``pointers.ctypes.data``,
        read once by a caller that keeps the arrays): ``m`` spans."""
        self._ptrs(m, sizes, pointers, host)

    def read_steps(self, pointers: np.ndarray) -> np.ndarray:
        """The float32 values at ``pointers`` (uintp addresses of float32 scalars), as a NumPy array."""
        out = np.empty(pointers.size, dtype=np.float32)
        self._read_steps(pointers.size, pointers.ctypes.data, out.ctypes.data)
        return out

    def write_steps(self, pointers: np.ndarray, value: float) -> None:
        """Set the float32 scalars at ``pointers`` (uintp addresses) to ``value``."""
        self.write_steps_at(pointers.size, pointers.ctypes.data, value)

    def write_steps_at(self, n: int, pointers: int, value: float) -> None:
        """:meth:`write_steps` with the pointer array given by its address (``pointers.ctypes.data``): ``n`` scalars."""
        self._write_steps(n, pointers, float(value))


def _emit(graph: _Graph, n_arrays: int, n_host_in: int, outputs: list, dtype: np.dtype) -> tuple[str, list, list]:
    """C source for the traced graph, the host program (scalar nodes) and which host values the loop reads."""
    ctype, suffix = _C_TYPES[dtype]
    host_program: list = []  # (op, args) appended after the runtime scalars
    host_index: dict[int, int] = {}  # node -> position in the host value list
    for i in range(n_host_in):
        host_index[n_arrays + i] = i
    body: list[str] = []
    loop_reads: list[int] = []  # host value positions read by the loop
    read_slot: dict[int, int] = {}
    names: dict[int, str] = {}

    def host_arg(x: Any) -> Any:
        return host_index[x.index] if isinstance(x, _Sym) else (x,)

    def operand(x: Any) -> str:
        if isinstance(x, _Sym):
            if x.kind == "s":
                pos = host_index[x.index]
                if pos not in read_slot:
                    read_slot[pos] = len(loop_reads)
                    loop_reads.append(pos)
                return f"c{read_slot[pos]}"
            return names[x.index]
        return f"(({ctype}){_c_literal(x)})"

    for idx, (kind, op, args) in enumerate(graph.nodes):
        if op in ("input", "scalar"):
            if op == "input":
                names[idx] = f"x{args[0]}"
            continue
        if kind == "s":
            host_index[idx] = n_host_in + len(host_program)
            host_program.append((op, tuple(host_arg(a) for a in args)))
            continue
        name = f"t{idx}"
        names[idx] = name
        ops = [operand(a) for a in args]
        if op in ("+", "-", "*", "/"):
            expr = f"{ops[0]} {op} {ops[1]}"
        elif op in ("<", "<=", ">", ">=", "==", "!="):
            expr = f"{ops[0]} {op} {ops[1]}"
        elif op == "&&":
            # As a select, not ``&&`` or ``&``: gcc turns either form, when the result feeds another select, into a
            # select between comparison masks that its vectoriser refuses (M-SVAG's direction then ran one element
            # at a time); the select form vectorises. Same 0/1 values.
            expr = f"({ops[0]} ? {ops[1]} : 0)"
        elif op == "||":
            expr = f"({ops[0]} ? 1 : {ops[1]})"
        elif op == "neg":
            expr = f"-{ops[0]}"
        elif op == "not":
            expr = f"!{ops[0]}"
        elif op == "sqrt":
            expr = f"sqrt{suffix}({ops[0]})"
        elif op == "abs":
            expr = f"fabs{suffix}({ops[0]})"
        elif op == "sign":
            # NumPy: -1, 0 (+0 for both zeros), 1; NaN stays NaN.
            expr = f"({ops[0]} > 0 ? ({ctype})1 : ({ops[0]} < 0 ? ({ctype})-1 : ({ops[0]} == 0 ? ({ctype})0 : {ops[0]})))"
        elif op in ("max", "min"):
            # NumPy: NaN propagates (the first NaN), and a tie (+0 / -0) returns the second operand.
            cmp = ">" if op == "max" else "<"
            a, b = ops
            expr = f"({a} != {a} ? {a} : ({b} != {b} ? {b} : ({a} {cmp} {b} ? {a} : {b})))"
        elif op == "where":
            expr = f"({ops[0]} ? {ops[1]} : {ops[2]})"
        elif op == "const":
            expr = f"({ctype}){_c_literal(args[0])}"
        else:  # pragma: no cover - every op the tracer records is printed above
            raise TraceError(f"no C form for {op}")
        body.append(f"    const {'int' if kind == 'b' else ctype} {name} = {expr};")

    stores = [(arr, operand(out)) for arr, out in outputs]
    consts = [f"  const {ctype} c{k} = ({ctype})sc[{k}];" for k in range(len(loop_reads))]

    def loop(base: str, indent: str) -> list[str]:
        # Every input element is read before any output is stored: in-place updates (and a gradient that is the
        # parameter itself) see the values of the step's start, as in the op-by-op path.
        return [
            f"{indent}for (int64_t i = 0; i < n; ++i) {{",
            *(f"{indent}  const {ctype} x{k} = {base}{k}[i];" for k in range(n_arrays)),
            *(indent + line[2:] for line in body),
            *(f"{indent}  {base}{arr}[i] = {value};" for arr, value in stores),
            f"{indent}}}",
        ]

    params = ", ".join(f"{ctype}* a{k}" for k in range(n_arrays))
    flat = ", ".join(f"{ctype}* a{k}" for k in range(1, n_arrays))
    lines = [
        "#include <math.h>",
        "#include <stdint.h>",
        "",
        "/* One flat span: every array holds n elements. */",
        f"void xpoptim_step(int64_t n, {params}, const double* sc) {{",
        *consts,
        *loop("a", "  "),
        "}",
        "",
        "/* A pack of m parameters: each parameter its own array (pointers p[j], sizes sizes[j]); the gradient, the",
        "   extra inputs and the state flat, the parameters one after another. */",
        f"void xpoptim_step_packed(int64_t m, const int64_t* sizes, {ctype}* const* p, {flat}, const double* sc) {{",
        *consts,
        "  int64_t off = 0;",
        "  for (int64_t j = 0; j < m; ++j) {",
        "    const int64_t n = sizes[j];",
        f"    {ctype}* b0 = p[j];",
        *(f"    {ctype}* b{k} = a{k} + off;" for k in range(1, n_arrays)),
        *loop("b", "    "),
        "    off += n;",
        "  }",
        "}",
        "",
        f"/* m spans, each its own {n_arrays} arrays by address: span j's array k starts at ptrs[j * {n_arrays} + k] and",
        "   holds sizes[j] elements (torch tensors updated where they live: parameters, the gradients backward made,",
        "   extra inputs and state, no gather). */",
        f"void xpoptim_step_ptrs(int64_t m, const int64_t* sizes, {ctype}* const* ptrs, const double* sc) {{",
        *consts,
        "  for (int64_t j = 0; j < m; ++j) {",
        "    const int64_t n = sizes[j];",
        *(f"    {ctype}* b{k} = ptrs[j * {n_arrays} + {k}];" for k in range(n_arrays)),
        *loop("b", "    "),
        "  }",
        "}",
        "",
        "/* Step counters (float32 scalars, one per parameter, by address): read them all, or set them all. */",
        "void xpoptim_read_steps(int64_t m, float* const* ptrs, float* out) {",
        "  for (int64_t j = 0; j < m; ++j) out[j] = *ptrs[j];",
        "}",
        "void xpoptim_write_steps(int64_t m, float* const* ptrs, double value) {",
        "  for (int64_t j = 0; j < m; ++j) *ptrs[j] = (float)value;",
        "}",
        "",
    ]
    return "\n".join(lines), host_program, loop_reads


def trace(make_kernel: Callable[[Any], Callable], n_arrays: int, n_scalars: int, write_to: list[int]) -> tuple:
    """Trace ``make_kernel(xp)(*arrays, *scalars)``.

    Args:
        make_kernel: builds the kernel for a namespace (``lambda xp: make_step_kernel(spec, xp, ...)``).
        n_arrays: array arguments (all of one dtype).
        n_scalars: host scalar arguments after them.
        write_to: for each output of the kernel, the array argument it is stored into.

    Returns:
        ``(graph, outputs)`` with ``outputs = [(array position, value), ...]``.

    Raises:
        TraceError: the kernel does something this module cannot print exactly.
    """
    graph = _Graph()
    arrays = [graph.add("a", "input", k) for k in range(n_arrays)]
    scalars = [graph.add("s", "scalar", k) for k in range(n_scalars)]
    try:
        out = make_kernel(_NAMESPACE)(*arrays, *scalars)
    except TraceError:
        raise
    except Exception as exc:  # anything the rule does with a traced value that NumPy arrays allow and we do not
        raise TraceError(f"{type(exc).__name__}: {exc}") from None
    out = tuple(out)
    if len(out) != len(write_to):
        raise TraceError(f"the kernel returned {len(out)} values, expected {len(write_to)}")
    outputs = []
    for pos, v in zip(write_to, out):
        v = _operand(graph, v)
        if isinstance(v, _Sym) and v.kind != "a":
            raise TraceError("an output is a boolean array or a host number (NumPy would give another dtype)")
        if not isinstance(v, _Sym):
            raise TraceError("an output is a Python number")
        outputs.append((pos, v))
    return graph, outputs


# ----------------------------------------------------------------------------------------------
# Compiling
# ----------------------------------------------------------------------------------------------

_LOCK = threading.Lock()
_LOADED: dict[tuple, Any] = {}
_COMPILER: list = []


def compiler() -> str | None:
    """The C compiler command (``$CC``, else ``cc``, ``gcc`` or ``clang`` on ``PATH``), or ``None``."""
    if not _COMPILER:
        found = None
        for cand in ([os.environ["CC"]] if os.environ.get("CC") else []) + ["cc", "gcc", "clang"]:
            path = shutil.which(cand)
            if path:
                found = path
                break
        _COMPILER.append(found)
    return _COMPILER[0]


def _cache_dir() -> str:
    base = os.environ.get("XPOPTIM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "xpoptim")
    return os.path.join(base, "cfuse")


def _machine_tag() -> str:
    # -march=native: a library built on one CPU may not run on another; key the cache by the CPU model.
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags")):
                    model += line
                    if line.startswith("flags"):
                        break
    except OSError:
        pass
    return f"{sys.platform}|{os.uname().machine if hasattr(os, 'uname') else ''}|{model}"


_PRIVATE_DIR: list[str] = []

#: Seconds the C compiler may take for one kernel before the step gives up on it (and runs op by op).
COMPILE_TIMEOUT_S = 120


def _compile_into(directory: str, path: str, source: str, cc: str, link: tuple[str, ...] = ()) -> None:
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        src = os.path.join(tmp, "kernel.c")
        with open(src, "w") as f:
            f.write(source)
        lib = os.path.join(tmp, "kernel.so")
        # A compiler that does not know -march=native (some clang builds on arm64) gets a second try without it.
        for flags in (COMPILE_FLAGS, tuple(f for f in COMPILE_FLAGS if f != "-march=native")):
            try:
                proc = subprocess.run([cc, *flags, src, "-o", lib, "-lm", *link], capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                raise TraceError(f"{cc} took more than {COMPILE_TIMEOUT_S} s") from None
            if proc.returncode == 0:
                break
        else:
            raise TraceError(f"{cc} failed: {proc.stderr.strip()[:500]}")
        os.replace(lib, path)  # atomic: another process sees the whole library or none


def build_library(source: str, link: Sequence[str] = (), loader: Callable[[str], Any] = ctypes.CDLL) -> Any:
    """Compile a C source into a shared library (cached on disk by a hash of the source, the compiler, the flags,
    ``link`` and the CPU) and load it with ``loader`` (``ctypes.CDLL``, or ``ctypes.PyDLL`` for functions that use
    the Python C API and must hold the GIL).

    Args:
        source: the C source.
        link: extra compiler arguments after the source (include directories, libraries to link).
        loader: how to load the library.

    Returns:
        The loaded library (one per source, flags and loader in this process).

    Raises:
        TraceError: no compiler, the compiler failed, or the library cannot be written or loaded.
    """
    cc = compiler()
    if cc is None:
        raise TraceError("no C compiler found (set CC, or install cc/gcc/clang)")
    link = tuple(link)
    key = hashlib.sha256("\n".join((source, cc, " ".join(COMPILE_FLAGS), " ".join(link), _machine_tag())).encode()).hexdigest()[:24]
    name = f"xpoptim_{key}.so"
    with _LOCK:
        loaded = _LOADED.get((key, loader))
        if loaded is not None:
            return loaded
        directory = _cache_dir()
        path = os.path.join(directory, name)
        try:
            if not os.path.exists(path):
                _compile_into(directory, path, source, cc, link)
        except OSError:
            # The cache directory cannot be written (read-only home, say): build in a private directory of this
            # process instead (never a predictable shared path: a library found there could be anyone's).
            if not _PRIVATE_DIR:
                _PRIVATE_DIR.append(tempfile.mkdtemp(prefix="xpoptim-cfuse-"))
            path = os.path.join(_PRIVATE_DIR[0], name)
            try:
                if not os.path.exists(path):
                    _compile_into(_PRIVATE_DIR[0], path, source, cc, link)
            except OSError as exc:
                raise TraceError(f"cannot write a compiled kernel: {exc}") from None
        try:
            lib = loader(path)
        except OSError as exc:
            raise TraceError(f"cannot load the compiled library {path}: {exc}") from None
        _LOADED[(key, loader)] = lib
        return lib


def _build(source: str) -> Any:
    lib = build_library(source)
    try:
        fns = (lib.xpoptim_step, lib.xpoptim_step_packed, lib.xpoptim_step_ptrs, lib.xpoptim_read_steps, lib.xpoptim_write_steps)
    except AttributeError as exc:
        raise TraceError(f"the compiled kernel lacks a function: {exc}") from None
    for fn in fns:
        fn.restype = None
    return fns


def compile_kernel(make_kernel: Callable[[Any], Callable], dtype: Any, n_arrays: int, n_scalars: int, write_to: list[int]) -> CKernel:
    """Trace the kernel and compile it for ``dtype``.

    Args:
        make_kernel: builds the kernel for a namespace.
        dtype: NumPy float32 or float64 (the dtype of every array argument).
        n_arrays: array arguments (``p, g, *extras, *state``).
        n_scalars: host scalar arguments after them.
        write_to: for each output, the array argument it overwrites (``[0, first state, ...]``).

    Returns:
        The compiled kernel.

    Raises:
        TraceError: the kernel cannot be printed exactly, the dtype is not float32/float64, or no compiler works.
    """
    dtype = np.dtype(dtype)
    if dtype not in _C_TYPES:
        raise TraceError(f"dtype {dtype} (compiled loops cover float32 and float64)")
    graph, outputs = trace(make_kernel, n_arrays, n_scalars, write_to)
    source, host_program, loop_reads = _emit(graph, n_arrays, n_scalars, outputs, dtype)
    fn, packed, ptrs, read_steps, write_steps = _build(source)
    fn.argtypes = [ctypes.c_int64, *([ctypes.c_void_p] * n_arrays), ctypes.POINTER(ctypes.c_double)]
    packed.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, *([ctypes.c_void_p] * (n_arrays - 1)), ctypes.POINTER(ctypes.c_double)]
    ptrs.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_double)]
    read_steps.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    write_steps.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_double]
    ck = CKernel(fn, packed, dtype, source, n_arrays, host_program, n_scalars, loop_reads)
    ck._ptrs, ck._read_steps, ck._write_steps = ptrs, read_steps, write_steps
    ck.spans_address = int(ctypes.cast(ptrs, ctypes.c_void_p).value or 0)
    return ck
