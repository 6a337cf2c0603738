"""Process-wide glibc ``mallopt`` tuning for chunked NumPy steps."""

from __future__ import annotations

#: glibc ``mallopt`` settings applied once, the first time a NumPy bucket is stepped in chunks (``M_MMAP_THRESHOLD``
#: 4 MiB, ``M_TOP_PAD`` 16 MiB). Set ``XPOPTIM_MALLOPT=0`` in the environment to leave the allocator alone.
MALLOPT_SETTINGS = ((-3, 4 << 20), (-2, 16 << 20))
_MALLOPT_DONE: list[bool] = []


def _tune_glibc_malloc() -> None:
    """Keep chunk temporaries out of the page-fault path (glibc only; once per process).

    A chunked NumPy step allocates a dozen 256 KiB temporaries per chunk. With glibc's defaults the top of the
    heap is handed back to the OS whenever more than twice the (dynamic) mmap threshold is free there, so each chunk
    can fault its temporaries in again; whether that happens depends on what else sits at the top of the heap
    (measured on 16M float32 parameters, NumPy only: AdamW 118-200 ms per step in some processes, 33 ms in others;
    with these settings 33 ms in every process). A fixed 4 MiB mmap threshold is within the range glibc's own
    dynamic threshold moves in (up to 32 MiB); a 16 MiB top pad keeps at most that much freed memory mapped.
    """
    if _MALLOPT_DONE:
        return
    _MALLOPT_DONE.append(True)
    import os  # noqa: PLC0415
    import platform  # noqa: PLC0415

    if os.environ.get("XPOPTIM_MALLOPT", "1") == "0" or platform.libc_ver()[0] != "glibc":
        return
    try:
        import ctypes  # noqa: PLC0415

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    for param, value in MALLOPT_SETTINGS:
        mallopt(param, value)

