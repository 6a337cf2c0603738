"""The elementwise step of the stateful array optimizer: one kernel per flat bucket, run in segments and chunks
(compiled C loop on NumPy, ``cupy.fuse`` on CuPy, op by op otherwise)."""

from __future__ import annotations

from typing import Any

import numpy as np

from xpoptim.core._backend import HOST
from xpoptim.core.spec import make_step_kernel, step_scalars

from .. import _cfuse
from . import threads as _threads
from .cupy_fuse import _make_fused_inplace, _warn_unfused, fusion_namespace
from .layout import _Bucket, _Segment
from .malloc import _tune_glibc_malloc
from .namespace import _numpy_dtype, _reshape
from .threads import COMPILED_TASK_SIZE, _call, _pool


class BucketStepMixin:
    """The elementwise bucket step of :class:`xpoptim.adapters.array.Optimizer`."""

    # What the optimizer sets up (``Optimizer.__init__``) and this mixin reads:
    xp: Any
    maximize: bool
    fuse: bool
    threads: int
    chunk_size: int | None
    _kind: str

    def _kernel(self, b: _Bucket, hp: dict) -> tuple:
        static = b.spec.static(hp)
        key = tuple(sorted((k, repr(v)) for k, v in static.items()))
        if key not in b.kernels:
            kernel = make_step_kernel(b.spec, self.xp, static, maximize=self.maximize)
            fused: list | bool | None = None  # the cupy.fuse kernel or the compiled loop; False: op by op
            if self._kind == "cupy":
                fused = False
                if not self.fuse:
                    b.fuse_note = "fuse=False"
                elif not b.spec.is_fusable(hp):
                    b.fuse_note = f"{b.spec.title} with {static} calls a non-fusable function (erf)"
                elif b.state_dtype != b.dtype:
                    b.fuse_note = "state dtype differs from the parameter dtype"
                else:
                    fused_kernel = make_step_kernel(b.spec, fusion_namespace(self.xp), static, maximize=self.maximize)
                    fused = _make_fused_inplace(fused_kernel, len(b.spec.extras), len(b.spec.state))
                if fused is False:
                    _warn_unfused(b)
            elif self._kind == "numpy":
                fused = self._compile_numpy(b, hp, static)
            b.kernels[key] = [kernel, fused]
        return b.kernels[key]

    def _compile_numpy(self, b: _Bucket, hp: dict, static: dict) -> Any:
        """The core step kernel as one compiled C loop (:mod:`._cfuse`), or False (op by op; ``b.fuse_note`` says why)."""
        b.fused = False
        if not self.fuse:
            b.fuse_note = "fuse=False"
            return False
        if b.state_dtype != b.dtype:
            b.fuse_note = "state dtype differs from the parameter dtype"
            return False
        if not b.spec.is_fusable(hp):
            b.fuse_note = f"{b.spec.title} with {static} calls erf, which has no exact C form shared with NumPy"
            return False
        n_extra, n_state = len(b.spec.extras), len(b.spec.state)
        n_arrays = 2 + n_extra + n_state
        spec, maximize = b.spec, self.maximize
        try:
            ck = _cfuse.compile_kernel(
                lambda xp: make_step_kernel(spec, xp, static, maximize=maximize),
                _numpy_dtype(b.dtype),
                n_arrays,
                len(step_scalars(spec, hp, 1, HOST)),
                [0, *range(2 + n_extra, n_arrays)],
            )
        except _cfuse.TraceError as exc:
            b.fuse_note = f"not compiled: {exc}"
            return False
        b.fused = True
        b.fuse_note = ""
        return ck

    def _run_bucket(self, b: _Bucket, g_list: list, x_lists: dict, pos: dict, hp: dict, t: int) -> None:
        xp = self.xp
        kernel_slot = self._kernel(b, hp)
        scalars = step_scalars(b.spec, hp, t, HOST)
        chunk = self.chunk_size
        xnames = b.spec.extras
        # NumPy with several threads: every chunk of every segment is one task (NumPy releases the GIL in its
        # loops; tasks write disjoint slices, and each pack has its own buffers), so that many arrays smaller
        # than a chunk (layout B) share the threads as well as one large array does.
        threaded = self._kind == "numpy" and self.threads > 1
        # The compiled loop's host scalars, once per bucket and step (None: op by op, e.g. for a NumPy-scalar lr).
        fused = kernel_slot[1]
        host = fused.host_scalars(scalars) if isinstance(fused, _cfuse.CKernel) else None
        compiled = host is not None
        if threaded and chunk is not None and compiled:
            # One compiled pass is bandwidth-bound: larger tasks (fewer hand-offs) measured faster (16M AdamW, 2
            # threads: 9.5 ms in 256k tasks, 7.5-8.0 ms in 4M tasks; one thread 9-10 ms).
            chunk = max(chunk, COMPILED_TASK_SIZE)
        tasks: list = []
        sizes: list[int] = []
        for seg in b.segments:
            if seg.view is not None:
                e = seg.entries[0]
                i = pos[id(e)]
                p = seg.view
                g = xp.reshape(g_list[i], (-1,))
                xs = [xp.reshape(x_lists[n][i], (-1,)) for n in xnames]
                if threaded and chunk is not None and seg.size > chunk:
                    for a in range(0, seg.size, chunk):
                        z = min(seg.size, a + chunk)
                        tasks.append((self._run_span, (b, kernel_slot, p[a:z], g[a:z], [x[a:z] for x in xs], seg.offset + a, z - a, scalars, None, host)))
                        sizes.append(z - a)
                else:
                    tasks.append((self._run_span, (b, kernel_slot, p, g, xs, seg.offset, seg.size, scalars, chunk, host)))
                    sizes.append(seg.size)
                continue
            tasks.append((self._run_pack, (b, kernel_slot, seg, g_list, x_lists, pos, scalars, chunk, host)))
            sizes.append(seg.size)
        if threaded and compiled and len(tasks) > self.threads:
            # Many small compiled tasks (hundreds of arrays, layout B): run them in a few groups of consecutive
            # tasks, about min(COMPILED_TASK_SIZE, bucket / threads) elements each, rather than one hand-off each.
            tasks = _threads._grouped(tasks, sizes, min(COMPILED_TASK_SIZE, -(-b.size // self.threads)))
        if threaded and len(tasks) > 1:
            if not compiled:
                _tune_glibc_malloc()
            list(_pool(self.threads).map(_call, tasks))
        else:
            for fn, args in tasks:
                fn(*args)

    def _run_pack(self, b: _Bucket, kernel_slot: list, seg: _Segment, g_list: list, x_lists: dict, pos: dict, scalars: tuple, chunk: int | None, host: Any = None) -> None:
        """A pack of small arrays: gather them into the pack's buffers, run the kernel, scatter back (op by op).

        Compiled on NumPy, the parameters are updated where they are (the loop takes their addresses): only the
        gradients (and extra inputs) are gathered, and nothing is scattered. ``host``: the compiled loop's host
        scalars (``None``: op by op)."""
        xp = self.xp
        fused = kernel_slot[1]
        if host is not None and self._packable(seg, fused.dtype):
            _, g, xs = self._gather(seg, g_list, x_lists, pos, b.spec.extras, with_params=False)
            off, n = seg.offset, seg.size
            fused.packed(seg.sizes, seg.pointers, [g, *xs, *(b.state[k][off : off + n] for k in b.spec.state)], host)
            return
        p, g, xs = self._gather(seg, g_list, x_lists, pos, b.spec.extras)
        self._run_span(b, kernel_slot, p, g, xs, seg.offset, seg.size, scalars, chunk, host)
        if self._kind == "numpy":
            for e in seg.entries:
                a = e.offset - seg.offset
                e.array[...] = p[a : a + e.size].reshape(e.shape)
            return
        for e in seg.entries:
            a = e.offset - seg.offset
            e.array[...] = _reshape(xp, p[a : a + e.size], e.shape)

    @staticmethod
    def _packable(seg: _Segment, dtype: np.dtype) -> bool:
        """Can the compiled loop update this pack's parameters through their addresses (every one C-contiguous, of
        the loop's dtype)? Decided once per pack: a NumPy array's address, layout and dtype do not change while
        the optimizer holds it (``resize`` refuses an array referenced elsewhere)."""
        if seg.pointers is None:
            ok = all(e.array.flags.c_contiguous and e.array.dtype == dtype for e in seg.entries)
            seg.pointers = np.array([e.array.ctypes.data for e in seg.entries], dtype=np.uintp) if ok else False
            seg.sizes = np.array([e.size for e in seg.entries], dtype=np.int64)
        return seg.pointers is not False

    def _gather(self, seg: _Segment, g_list: list, x_lists: dict, pos: dict, xnames: tuple, with_params: bool = True) -> tuple:
        xp = self.xp
        idx = [pos[id(e)] for e in seg.entries]
        srcs = {"p": [e.array for e in seg.entries]} if with_params else {}
        srcs["g"] = [g_list[i] for i in idx]
        for n in xnames:
            srcs[n] = [x_lists[n][i] for i in idx]
        if self._kind == "numpy":
            if seg.buffers is None:
                seg.buffers = {}
            for k, arrs in srcs.items():
                if k not in seg.buffers:
                    seg.buffers[k] = np.empty(seg.size, dtype=seg.entries[0].array.dtype)
                np.concatenate(arrs, axis=None, out=seg.buffers[k])
            bufs = seg.buffers
        else:
            bufs = {k: xp.concat([xp.reshape(a, (-1,)) for a in arrs]) for k, arrs in srcs.items()}
        return bufs["p"] if with_params else None, bufs["g"], [bufs[n] for n in xnames]

    def _run_span(self, b: _Bucket, kernel_slot: list, p: Any, g: Any, xs: list, off: int, n: int, scalars: tuple, chunk: int | None, host: Any = None) -> None:
        """Run the kernel over ``p[0:n]`` (flat, written in place) and state ``[off, off+n)``; compiled when
        ``host`` (the compiled loop's host scalars) is given."""
        xp = self.xp
        kernel, fused = kernel_slot
        names = b.spec.state
        sd = b.state_dtype
        if host is not None:
            states = [b.state[k][off : off + n] for k in names]
            arrays = [a if a.flags.c_contiguous else np.ascontiguousarray(a) for a in (g, *xs)]
            fused(n, [p, *arrays, *states], host)
            return
        if self._kind == "cupy" and fused:
            states = [b.state[k][off : off + n] if (off, n) != (0, b.size) else b.state[k] for k in names]
            typed = tuple(np.dtype(str(sd).split(".")[-1]).type(s) for s in scalars)
            errors = []
            while kernel_slot[1]:
                try:
                    kernel_slot[1][0](p, g, *xs, *states, *typed)
                    b.fused = True
                    kernel_slot[1] = kernel_slot[1][:1]  # keep the variant that compiled
                    return
                except Exception as exc:  # compilation failed: nothing was written
                    errors.append(f"{type(exc).__name__}: {exc}")
                    kernel_slot[1] = kernel_slot[1][1:]
            kernel_slot[1] = False
            b.fuse_note = "cupy.fuse failed: " + "; ".join(errors)
            _warn_unfused(b)
        if b.fused is None and self._kind == "cupy":
            b.fused = bool(kernel_slot[1])
        step = n if chunk is None else chunk
        if self._kind == "numpy" and step < n:
            _tune_glibc_malloc()

        def run(a: int) -> None:
            z = min(n, a + step)
            whole = a == 0 and z == n
            pc = p if whole else p[a:z]
            gc = g if whole else g[a:z]
            xc = [x if whole else x[a:z] for x in xs]
            if pc.dtype != sd:
                pc = xp.astype(pc, sd)
                gc = xp.astype(gc, sd)
            full = (off + a, off + z) == (0, b.size)
            st = [b.state[k] if full else b.state[k][off + a : off + z] for k in names]
            out = kernel(pc, gc, *xc, *st, *scalars)
            new_p = out[0] if out[0].dtype == p.dtype else xp.astype(out[0], p.dtype)
            if whole:
                p[...] = new_p
            else:
                p[a:z] = new_p
            for k, v in zip(names, out[1:]):
                if v.dtype != sd:
                    v = xp.astype(v, sd)
                if full and self._kind != "numpy":
                    b.state[k] = v  # rebind: the buffer is ours
                else:
                    b.state[k][off + a : off + z] = v

        for a in range(0, n, step):
            run(a)

    # -- state dict ---------------------------------------------------------------------------
