"""Opt-in glibc ``mallopt`` tuning for chunked NumPy steps (process-wide, so never applied behind the user's back)."""

from __future__ import annotations

import os

#: glibc ``mallopt`` settings (``M_MMAP_THRESHOLD`` 4 MiB, ``M_TOP_PAD`` 16 MiB) applied by :func:`tune_glibc_malloc`,
#: or at the first chunked NumPy step when the environment has ``XPOPTIM_MALLOPT=1``.
MALLOPT_SETTINGS = ((-3, 4 << 20), (-2, 16 << 20))
_MALLOPT_DONE: list[bool] = []


def tune_glibc_malloc() -> bool:
    """Set glibc's mmap threshold to 4 MiB and its top pad to 16 MiB for the whole process (glibc only).

    This changes the allocator of the whole process (every library in it), so xpoptim never does it by itself:
    call this function, or set ``XPOPTIM_MALLOPT=1`` in the environment to apply it at the first chunked NumPy step.

    Why it helps: a chunked NumPy step allocates a dozen 256 KiB temporaries per chunk. With glibc's defaults the
    top of the heap is handed back to the OS whenever more than twice the (dynamic) mmap threshold is free there,
    so each chunk can fault its temporaries in again; whether that happens depends on what else sits at the top
    of the heap (measured on 16M float32 parameters, NumPy only: AdamW 118-200 ms per step in some processes,
    33 ms in others; with these settings 33 ms in every process). A fixed 4 MiB mmap threshold is within the range
    glibc's own dynamic threshold moves in (up to 32 MiB); a 16 MiB top pad keeps at most that much freed memory
    mapped. Steps compiled into one C loop (the default with a C compiler) allocate no temporaries and do not
    need it.

    Returns:
        True when the settings were applied (now or before), False on a non-glibc platform.
    """
    if _MALLOPT_DONE:
        return _MALLOPT_DONE[0]
    import platform  # noqa: PLC0415

    ok = platform.libc_ver()[0] == "glibc"
    if ok:
        try:
            import ctypes  # noqa: PLC0415

            mallopt = ctypes.CDLL(None).mallopt
        except (OSError, AttributeError):
            ok = False
        else:
            for param, value in MALLOPT_SETTINGS:
                mallopt(param, value)
    _MALLOPT_DONE.append(ok)
    return ok


def _tune_glibc_malloc() -> None:
    """At a chunked NumPy step: apply :func:`tune_glibc_malloc` only when ``XPOPTIM_MALLOPT=1`` asks for it."""
    if not _MALLOPT_DONE and os.environ.get("XPOPTIM_MALLOPT", "0") == "1":
        tune_glibc_malloc()
