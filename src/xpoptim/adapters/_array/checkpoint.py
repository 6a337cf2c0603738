"""Checkpoints of the stateful array optimizer: ``state_dict`` / ``load_state_dict`` (NumPy arrays only)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from xpoptim.core import STATE_VERSION, check_state_entry, state_layout

from .layout import _Bucket, _Entry, _MatrixStack
from .namespace import _device_context, _from_numpy, _is_array, _numpy_dtype, _reshape, _to_numpy
from .params import _GROUP_EXTRA_KEYS

if TYPE_CHECKING:
    from xpoptim.core import ElementwiseSpec, MatrixSpec


class CheckpointMixin:
    """``state_dict`` / ``load_state_dict`` of :class:`xpoptim.adapters.array.Optimizer`."""

    # What the optimizer sets up (``Optimizer.__init__``) and this mixin reads:
    spec: ElementwiseSpec | MatrixSpec
    fallback_spec: ElementwiseSpec | None
    param_groups: list[dict]
    xp: Any
    device: Any
    _kind: str
    _step: int
    _entries: list[_Entry]
    _buckets: list[_Bucket]
    _stacks: list[_MatrixStack]

    def _entry_state(self) -> dict:
        xp = self.xp
        out: dict = {}
        for b in self._buckets:
            for e in b.entries:
                out[e.key] = {k: _reshape(xp, b.state[k][e.offset : e.offset + e.size], e.shape) for k in b.spec.state}
        for st in self._stacks:
            for e in st.entries:
                out[e.key] = {k: (None if v is None else v[e.index, ...]) for k, v in st.state.items()}
        return out

    def state_dict(self) -> dict:
        """A checkpoint with NumPy arrays only (see the module docstring for the format).

        Returns:
            ``{"version", "optimizer", "step", "param_groups", "state"}``; arrays are copies.
        """
        per = self._entry_state()
        groups = []
        for gi, g in enumerate(self.param_groups):
            d = {k: v for k, v in g.items() if k != "params"}
            if "fallback_hyperparams" in d:
                d["fallback_hyperparams"] = dict(d["fallback_hyperparams"])
            d["keys"] = [e.key for e in self._entries if e.group == gi]
            groups.append(d)
        return {
            "version": STATE_VERSION,
            "optimizer": self.spec.name,
            "step": self._step,
            "param_groups": groups,
            "state": {e.key: {k: (None if v is None else _to_numpy(v)) for k, v in per[e.key].items()} for e in self._entries},
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a checkpoint from ``state_dict()`` (of any backend's array optimizer).

        Hyperparameters, the step count and every state array are restored. Everything is checked
        first; on any error nothing changes.

        Raises:
            ValueError: another version, optimizer, parameter set, state name, shape or dtype kind.
            TypeError: not a mapping.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        missing = [k for k in ("version", "optimizer", "step", "param_groups", "state") if k not in state_dict]
        if missing:
            raise ValueError(f"state_dict is missing the key(s) {missing}")
        if state_dict["version"] != STATE_VERSION:
            raise ValueError(f"state_dict version={state_dict['version']!r} is not supported: expected {STATE_VERSION}")
        if state_dict["optimizer"] not in (self.spec.name, self.spec.title):
            raise ValueError(f"state_dict optimizer={state_dict['optimizer']!r} does not match this optimizer ({self.spec.name!r})")
        step = state_dict["step"]
        if isinstance(step, np.ndarray) and step.ndim == 0 and step.dtype.kind in "iu":
            step = step.item()  # numpy.savez / numpy.load give a 0-D array
        if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or step < 0:
            raise ValueError(f"state_dict step={step!r} is invalid: expected an integer >= 0")
        groups = state_dict["param_groups"]
        if not isinstance(groups, Sequence) or len(groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(groups) if isinstance(groups, Sequence) else groups!r} param groups: expected {len(self.param_groups)}")
        new_groups = []
        for gi, sg in enumerate(groups):
            want = [e.key for e in self._entries if e.group == gi]
            if list(sg.get("keys", [])) != want:
                raise ValueError(f"state_dict param group {gi} has keys {sg.get('keys')!r}: expected {want}")
            hp = {k: v for k, v in sg.items() if k not in ("keys", "fallback_hyperparams", "params")}
            checked = self.spec.validate(**hp)
            fbh = None
            if self.fallback_spec is not None:
                fbh = dict(sg.get("fallback_hyperparams", self.param_groups[gi]["fallback_hyperparams"]))
                self.fallback_spec.validate(**fbh)
            new_groups.append((hp, fbh, checked))
        st = state_dict["state"]
        if not isinstance(st, Mapping):
            raise ValueError("state_dict['state'] must be a dict keyed by parameter")
        keys = [e.key for e in self._entries]
        if set(st.keys()) != set(keys):
            raise ValueError(
                f"state_dict['state'] keys do not match the parameters (missing {[k for k in keys if k not in st]}, "
                f"unexpected {[k for k in st if k not in set(keys)]})"
            )
        staged = self._staged_state(st, new_groups)
        # Build the new storage (host side first, then one transfer per buffer), then commit.
        xp = self.xp
        new_b = []
        for b in self._buckets:
            sd_np = _numpy_dtype(b.state_dtype)
            bufs = {}
            for k in b.spec.state:
                host = np.concatenate([np.reshape(staged[e.key][k], -1).astype(sd_np, copy=False) for e in b.entries])
                with _device_context(self.device):
                    bufs[k] = _from_numpy(xp, host, self.device, b.state_dtype)
            new_b.append(bufs)
        new_s = []
        for stk in self._stacks:
            sd_np = _numpy_dtype(stk.state_dtype)
            bufs = {}
            for k, v in stk.state.items():
                if v is None:
                    bufs[k] = None
                    continue
                host = np.stack([staged[e.key][k].astype(sd_np, copy=False) for e in stk.entries])
                with _device_context(self.device):
                    bufs[k] = _from_numpy(xp, host, self.device, v.dtype)
            new_s.append(bufs)
        for b, bufs in zip(self._buckets, new_b):
            if self._kind == "numpy":
                for k in b.spec.state:
                    b.state[k][...] = bufs[k]
            else:
                b.state = bufs
        for stk, bufs in zip(self._stacks, new_s):
            stk.state = bufs
        for g, (hp, fbh, _) in zip(self.param_groups, new_groups):
            for k in [k for k in g if k not in _GROUP_EXTRA_KEYS]:
                del g[k]
            g.update(hp)
            if fbh is not None:
                g["fallback_hyperparams"] = fbh
        self._step = int(step)

    def _layouts(self, group_hp: Sequence[Mapping[str, Any]]) -> dict:
        """``{key: core.state_layout}`` of every parameter, with the matrix rules' layouts at ``group_hp``."""
        out: dict = {}
        for b in self._buckets:
            for e in b.entries:
                out[e.key] = state_layout(b.spec, e.shape, {})
        for stk in self._stacks:
            for e in stk.entries:
                out[e.key] = state_layout(stk.spec, e.shape, group_hp[stk.group], matrix_shape=stk.mshape)
        return out

    def _staged_state(self, st: Mapping[str, Any], new_groups: list) -> dict:
        """Every parameter's checkpointed state as NumPy arrays, checked against its layout
        (``core.state_layout`` / ``core.check_state_entry``, as every adapter checks); nothing is written here."""
        current_hp = [self.spec.validate(**{k: v for k, v in g.items() if k not in _GROUP_EXTRA_KEYS}) for g in self.param_groups]
        layouts = self._layouts(current_hp)
        loaded = self._layouts([checked for _, _, checked in new_groups])
        staged: dict = {}
        for e in self._entries:
            where = f"state_dict['state'][{e.key!r}]"
            if loaded[e.key] != layouts[e.key]:
                raise ValueError(
                    f"{where}: the checkpoint's hyperparameters give the state layout {loaded[e.key]}, this optimizer "
                    f"holds {layouts[e.key]} (a switch such as max_precond_dim differs): create the optimizer with the "
                    "checkpoint's hyperparameters, then load it"
                )
            entry = st[e.key]
            arrays = (
                {k: (None if v is None else (_to_numpy(v) if _is_array(v) else np.asarray(v))) for k, v in entry.items()}
                if isinstance(entry, Mapping)
                else entry
            )
            check_state_entry(where, arrays, layouts[e.key], is_floating=lambda a: a.dtype.kind == "f")
            staged[e.key] = arrays
        return staged

    def export_state(self) -> Any:
        """The framework-neutral state (:class:`xpoptim.portable.PortableState`); see :mod:`xpoptim.portable`."""
        from xpoptim.portable.array_state import export_array  # noqa: PLC0415

        return export_array(self)

    def import_state(self, portable: Any) -> None:
        """Load a :class:`xpoptim.portable.PortableState` (keys ``str(key)``); hyperparameters are kept."""
        from xpoptim.portable.array_state import import_array  # noqa: PLC0415

        import_array(self, portable)
