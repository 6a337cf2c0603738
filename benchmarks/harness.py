"""Timing, memory and bookkeeping shared by every benchmark section.

A benchmark is a list of :class:`Subject` objects (one optimizer path, or a peer, or the copy floor) measured
together by :func:`measure_interleaved`: every subject takes its first step (timed on its own: that is the
first-step / compile cost), then a few warm-up steps, then ``repeats`` rounds in which every subject takes one
step in turn (A B C A B C ...; the starting subject rotates each round). Medians over rounds are reported, so a
burst of noise on a shared machine hits all subjects alike and ratios measured in one run stay meaningful.

Timing:
    * CPU: ``time.perf_counter`` around one step, including the synchronisation the subject needs
      (``block_until_ready`` for JAX).
    * CUDA, torch subjects: ``torch.cuda.Event`` pairs recorded around the step on the current stream.
    * CUDA, CuPy subjects: ``cupy.cuda.Event`` pairs.
    * CUDA, JAX subjects: ``perf_counter`` around the step and ``block_until_ready`` (JAX exposes no events).

Memory (peak bytes per parameter, see :class:`MemoryProbe`):
    * CPU: the peak resident set size of this process (``VmHWM``) reset through ``/proc/self/clear_refs`` before
      the measured region, minus the resident size before it. It counts what the allocators map (torch, JAX and
      NumPy alike), not what Python's ``tracemalloc`` sees (which misses torch and XLA). Freed memory that an
      allocator keeps cached is not returned, so this is an upper bound for small tensors.
    * CUDA: ``torch.cuda.max_memory_allocated`` (torch), ``memory_stats()['peak_bytes_in_use']`` (JAX),
      the CuPy memory pool's used bytes (CuPy).
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "construct",
    "Skip",
    "Subject",
    "Measurement",
    "measure_interleaved",
    "MemoryProbe",
    "Config",
    "log",
]


class Skip(Exception):
    """Raised by a subject builder when its path cannot run here; the message is the reason."""


def log(*parts: Any) -> None:
    """Progress line on stderr (stdout carries the tables)."""
    print(*parts, file=sys.stderr, flush=True)


@dataclasses.dataclass
class Config:
    """Options of one benchmark run (see ``python -m benchmarks --help``)."""

    device: str = "cpu"
    quick: bool = False
    size_scale: float = 1.0
    warmup: int = 3
    repeats: int = 12
    matrix_repeats: int = 3
    block_budget_s: float = 5.0
    threads: int = 2
    rules: tuple[str, ...] = ("adamw", "adam", "mvngrad", "msvag", "deva_linf")
    layouts: tuple[str, ...] = ("A", "B", "C")
    sections: tuple[str, ...] = ("elementwise", "matrix", "scaling", "compile")
    torch_compile: bool = True
    slow: bool = False
    out: str = ""


@dataclasses.dataclass
class Subject:
    """One thing to time: a step of one optimizer path, a peer, or the copy floor.

    Attributes:
        label: the row label in tables ("torch.optim.AdamW fused", "xpoptim torch AdamW compiled").
        kind: ``"ours"``, ``"peer"`` or ``"floor"``.
        framework: ``"torch"``, ``"jax"``, ``"numpy"`` or ``"cupy"``.
        path: the code path inside the framework (``"eager"``, ``"compiled"``, ``"per-leaf"``, ``"flat"``,
            ``"forloop"``, ``"foreach"``, ``"fused"``, ``"jit"``, ``"copy"``, ...).
        rule: the optimizer rule (``"adamw"``, ``"mvngrad"``, ...; ``"copy"`` for the floor).
        step: takes one step; may return before the device has finished.
        sync: waits until the device has finished the work issued by ``step``.
        timer: ``"wall"``, ``"torch_cuda"`` or ``"cupy_cuda"``.
        bytes_per_param: bytes an ideal single-pass step moves per parameter (28 for Adam-like rules).
        n_params: parameters updated by one step.
        info: free-form facts shown in the JSON (compile mode, dtypes, ...).
        close: frees the subject's buffers (optional).
        setup: builds the optimizer (its state, its jitted function) once the data exist; timed separately
            ("construct") so that the data's own memory and time stay out of the measured region.
        report: facts known only after stepping (e.g. whether CuPy fused the kernel), merged into ``info``.
        prepare: untimed work before each step (e.g. handing the optimizer fresh gradient tensors, as a
            backward pass after ``zero_grad(set_to_none=True)`` would).
    """

    label: str
    kind: str
    framework: str
    path: str
    rule: str
    step: Callable[[], Any]
    sync: Callable[[], None] = lambda: None
    timer: str = "wall"
    bytes_per_param: float = 28.0
    n_params: int = 0
    info: dict = dataclasses.field(default_factory=dict)
    close: Callable[[], None] | None = None
    prepare: Callable[[], None] | None = None
    setup: Callable[[], None] | None = None
    report: Callable[[], dict] | None = None

    def time_once(self) -> float:
        """Seconds taken by one step, measured with this subject's timer (``prepare`` runs untimed first)."""
        if self.prepare is not None:
            self.prepare()
            self.sync()
        if self.timer == "torch_cuda":
            import torch

            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self.step()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        if self.timer == "cupy_cuda":
            import cupy

            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            start.record()
            self.step()
            end.record()
            end.synchronize()
            return cupy.cuda.get_elapsed_time(start, end) / 1e3
        t0 = time.perf_counter()
        self.step()
        self.sync()
        return time.perf_counter() - t0


@dataclasses.dataclass
class Measurement:
    """What :func:`measure_interleaved` found for one subject (times in seconds)."""

    label: str
    kind: str
    framework: str
    path: str
    rule: str
    n_params: int
    bytes_per_param: float
    construct_s: float | None = None
    first_s: float | None = None
    samples: list[float] = dataclasses.field(default_factory=list)
    error: str | None = None
    info: dict = dataclasses.field(default_factory=dict)

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    def quantile(self, q: float) -> float | None:
        if not self.samples:
            return None
        xs = sorted(self.samples)
        pos = q * (len(xs) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    def gbps(self) -> float | None:
        """Effective bandwidth: ``bytes_per_param * n_params / median`` in GB/s."""
        m = self.median_s
        if not m:
            return None
        return self.bytes_per_param * self.n_params / m / 1e9

    def to_json(self) -> dict:
        med = self.median_s
        return {
            "label": self.label,
            "kind": self.kind,
            "framework": self.framework,
            "path": self.path,
            "rule": self.rule,
            "n_params": self.n_params,
            "bytes_per_param": self.bytes_per_param,
            "construct_ms": None if self.construct_s is None else self.construct_s * 1e3,
            "first_step_ms": None if self.first_s is None else self.first_s * 1e3,
            "median_ms": None if med is None else med * 1e3,
            "p25_ms": None if med is None else self.quantile(0.25) * 1e3,
            "p75_ms": None if med is None else self.quantile(0.75) * 1e3,
            "min_ms": None if med is None else min(self.samples) * 1e3,
            "samples": len(self.samples),
            "gbps": self.gbps(),
            "error": self.error,
            "info": self.info,
        }


def _short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def construct(subject: Subject, on_error: Callable[[BaseException], None] | None = None) -> float | None:
    """Run ``subject.setup`` (if any) and return its duration in seconds (``None`` on failure)."""
    if subject.setup is None:
        return 0.0
    t0 = time.perf_counter()
    try:
        subject.setup()
        subject.sync()
    except Exception as exc:
        if on_error is None:
            raise
        on_error(exc)
        return None
    return time.perf_counter() - t0


#: Seconds to wait before a step whose framework differs from the previous step's (outside the timed region).
#: XLA's CPU thread pool keeps spinning after a JAX step, and on 2 cores the next torch step pays for it: measured
#: with torch 2.13 / jax 0.10.2, torch.optim.Muon's Newton-Schulz on 1024x1024 took 134 ms right after a jitted JAX
#: Newton-Schulz, 95 ms after a 50 ms pause and 42 ms after 200 ms (42-46 ms on its own). The wait is a busy loop,
#: not a sleep: after a 0.25 s sleep an in-place pass over 28 MB took 5.9 ms instead of 0.3 ms (idle cores and
#: parked thread pools wake slowly), after a 0.25 s busy wait 0.75 ms.
SETTLE_S = 0.25


def _settle(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def measure_interleaved(
    subjects: Sequence[Subject],
    *,
    warmup: int,
    repeats: int,
    budget_s: float | None = None,
    min_repeats: int = 3,
    name: str = "",
) -> list[Measurement]:
    """Measure ``subjects`` together, interleaved round by round.

    Args:
        subjects: what to time; each keeps its own buffers between steps.
        warmup: steps per subject after the first (untimed for the median).
        repeats: timed rounds (each subject one step per round).
        budget_s: when set, the number of rounds is reduced (not below ``min_repeats``) so that the timed
            rounds take about this long, judged from the warm-up steps.
        min_repeats: the fewest rounds kept under a budget.
        name: a label for progress lines.

    Returns:
        One :class:`Measurement` per subject, in the order given. A subject whose step raises is
        dropped from later rounds and keeps the error message.
    """
    results = [
        Measurement(s.label, s.kind, s.framework, s.path, s.rule, s.n_params, s.bytes_per_param, info=dict(s.info))
        for s in subjects
    ]
    alive = list(range(len(subjects)))

    def fail(i: int, exc: BaseException, what: str) -> None:
        results[i].error = _short_error(exc)
        log(f"  [{name}] {subjects[i].label}: {what} failed: {results[i].error}")
        if os.environ.get("XPOPTIM_BENCH_DEBUG"):
            traceback.print_exc()
        if i in alive:
            alive.remove(i)

    last = [None]

    def attempt(i: int) -> float | None:
        if last[0] is not None and last[0] != subjects[i].framework and SETTLE_S > 0:
            _settle(SETTLE_S)
        last[0] = subjects[i].framework
        try:
            return subjects[i].time_once()
        except Exception as exc:  # a path that breaks is reported, never fatal
            fail(i, exc, "step")
            return None

    for i in list(alive):
        results[i].construct_s = construct(subjects[i], lambda exc, i=i: fail(i, exc, "construction"))
    for i in list(alive):
        results[i].first_s = attempt(i)
    per_step: dict[int, float] = {}
    for _ in range(max(0, warmup)):
        for i in list(alive):
            t = attempt(i)
            if t is not None:
                per_step[i] = t
    rounds = repeats
    if budget_s is not None and alive:
        est = sum(per_step.get(i, results[i].first_s or 0.0) for i in alive)
        if est > 0:
            rounds = max(min_repeats, min(repeats, int(budget_s / est)))
    for r in range(rounds):
        if not alive:
            break
        k = r % len(alive)
        for i in alive[k:] + alive[:k]:
            t = attempt(i)
            if t is not None:
                results[i].samples.append(t)
    for s, res in zip(subjects, results):
        if s.report is not None:
            try:
                res.info.update(s.report())
            except Exception as exc:
                res.info["report_error"] = _short_error(exc)
    return results


# ----------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------


def _read_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class MemoryProbe:
    """Peak memory of a region of code, in bytes, on the benchmark's device.

    Use as ``with MemoryProbe(device) as probe: ...`` then read ``probe.peak_bytes`` (``None`` when the
    platform offers no way to measure) and ``probe.method`` (how it was measured, for the tables).
    """

    def __init__(self, device: str, framework: str = "torch") -> None:
        self.device = device
        self.framework = framework
        self.peak_bytes: int | None = None
        self.method = ""

    def __enter__(self) -> MemoryProbe:
        gc.collect()
        self._base = None
        if self.device == "cuda":
            if self.framework == "torch":
                import torch

                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                self._base = torch.cuda.memory_allocated()
                self.method = "torch.cuda.max_memory_allocated"
            elif self.framework == "jax":
                import jax

                stats = jax.devices()[0].memory_stats() or {}
                self._base = stats.get("bytes_in_use")
                self.method = "jax memory_stats bytes_in_use (peak not resettable: end minus start)"
            elif self.framework == "cupy":
                import cupy

                self._base = cupy.get_default_memory_pool().used_bytes()
                self.method = "cupy pool used bytes (end minus start)"
            return self
        self._reset = _reset_peak_rss()
        self._base = _read_status_kb("VmRSS")
        self.method = "peak RSS (VmHWM after clear_refs) minus RSS before" if self._reset else "RSS after minus before"
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._base is None:
            return
        if self.device == "cuda":
            if self.framework == "torch":
                import torch

                torch.cuda.synchronize()
                self.peak_bytes = torch.cuda.max_memory_allocated() - self._base
            elif self.framework == "jax":
                import jax

                stats = jax.devices()[0].memory_stats() or {}
                if "bytes_in_use" in stats:
                    self.peak_bytes = stats["bytes_in_use"] - self._base
            elif self.framework == "cupy":
                import cupy

                self.peak_bytes = cupy.get_default_memory_pool().used_bytes() - self._base
            return
        end = _read_status_kb("VmHWM") if self._reset else _read_status_kb("VmRSS")
        if end is not None:
            self.peak_bytes = max(0, end - self._base)
