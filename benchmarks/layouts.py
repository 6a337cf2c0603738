"""Parameter layouts (A: one large tensor, B: hundreds of medium, C: thousands of small) and their data."""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["Layout", "LAYOUTS", "layouts_for", "make_data", "bytes_per_param"]


@dataclasses.dataclass(frozen=True)
class Layout:
    """``count`` float32 tensors of ``size`` elements each."""

    name: str
    count: int
    size: int

    @property
    def n_params(self) -> int:
        return self.count * self.size

    @property
    def shape_text(self) -> str:
        return f"{self.count}x{_human(self.size)}"


def _human(n: int) -> str:
    for unit, div in (("M", 2**20), ("k", 2**10)):
        if n >= div and n % div == 0:
            return f"{n // div}{unit}"
    if n >= 10**6 and n % 10**6 == 0:
        return f"{n // 10**6}M"
    if n >= 1000 and n % 1000 == 0:
        return f"{n // 1000}k"
    return str(n)


#: The issue's sizes. CPU: A = 1x16M, B = 200x80k, C = 2000x1k; GPU: A = 1x64M, B = 256x256k, C = 4000x2k.
LAYOUTS = {
    "cpu": {"A": (1, 16 * 2**20), "B": (200, 80 * 2**10), "C": (2000, 2**10)},
    "cuda": {"A": (1, 64 * 2**20), "B": (256, 256 * 2**10), "C": (4000, 2 * 2**10)},
}

#: ``--quick``: a few tensors, a few thousand elements, so every path (and its compiler) runs in seconds.
QUICK = {"A": (1, 2**14), "B": (8, 2**11), "C": (48, 2**7)}


def layouts_for(device: str, names: tuple[str, ...], *, size_scale: float = 1.0, quick: bool = False) -> list[Layout]:
    """The layouts to run: the issue's sizes (or the quick ones), each tensor's size times ``size_scale``."""
    table = QUICK if quick else LAYOUTS[device]
    out = []
    for name in names:
        count, size = table[name]
        out.append(Layout(name, count, max(16, int(size * size_scale))))
    return out


def make_data(layout: Layout, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Float32 parameters (N(0, 1)) and gradients (N(0, 1e-2)) as lists of NumPy arrays (views of one block)."""
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(layout.n_params, dtype=np.float32)
    g = rng.standard_normal(layout.n_params, dtype=np.float32)
    g *= np.float32(1e-2)
    split = lambda a: [a[i * layout.size : (i + 1) * layout.size] for i in range(layout.count)]  # noqa: E731
    return split(p), split(g)


def bytes_per_param(n_state: int, n_extra: int = 0, itemsize: int = 4) -> int:
    """Bytes an ideal single-pass step moves per parameter: read p, g, extras and state; write p and state."""
    return itemsize * (3 + 2 * n_state + n_extra)
