"""Docstrings of the torch optimizer classes, written from their specs.

Private module of the torch adapter.
"""

from __future__ import annotations

import torch

from xpoptim.core.spec import ElementwiseSpec, MatrixSpec

from ._torch_hparams import uses_betas

__all__ = ["class_doc", "state_names"]


def state_names(spec: ElementwiseSpec | MatrixSpec) -> tuple[str, ...]:
    """The names of the state a parameter holds under ``spec`` (a matrix rule's from ``core.functional.init``)."""
    if isinstance(spec, ElementwiseSpec):
        return tuple(spec.state)
    from . import _torch_engine as _eng

    init = _eng.matrix_state_init(spec, torch.empty((2, 2), device="meta"), spec.validate(), torch.float32)
    return tuple(k for k in init if k not in ("step", "state_version"))


def class_doc(spec: ElementwiseSpec | MatrixSpec) -> str:
    """The docstring of a spec's torch class: conventions, arguments with defaults, state, references."""
    lines = [f"{spec.title}: the xpoptim ``{spec.name}`` rule as a torch.optim.Optimizer.", ""]
    lines.append(f"Conventions: {spec.conventions}.")
    lines.append("")
    lines.append("Args:")
    lines.append("    params: tensors, param-group dicts or ``(name, tensor)`` pairs.")
    for h in spec.hyperparams:
        lines.append(f"    {h.name}: {h.doc} (default {h.default!r}).")
    if uses_betas(spec):
        lines.append("    betas: ``(beta1, beta2)``, torch's spelling (stored in the groups as ``betas``).")
    lines.append("    maximize: ascend instead of descend (default False).")
    lines.append("    state_dtype: dtype of floating state (default: float32 for bf16/fp16 params, else the param's).")
    lines.append("    compile: run the elementwise step under torch.compile (opt-in; default False).")
    lines.append("    foreach, fused, capturable, differentiable: torch.optim's flags, accepted as None/False only.")
    if isinstance(spec, MatrixSpec):
        lines.append(
            f"    fallback: elementwise rule for non-matrix parameters (default {spec.fallback!r}, with "
            f"{dict(spec.fallback_defaults)!r})."
        )
        lines.append("    fallback_hyperparams: overrides of the fallback rule's hyperparameters.")
    if isinstance(spec, ElementwiseSpec) and spec.extras:
        lines.append("")
        lines.append(
            "The rule needs the per-element variance of the mini-batch gradient: ``opt.step(grad_variance={p: v})`` "
            "or ``p.grad_variance = v`` (see ``minibatch_grad_variance``)."
        )
    lines += ["", "State per parameter: " + ", ".join(state_names(spec)) + ", step, state_version."]
    lines += ["", "References:", f"    {spec.source}."]
    return "\n".join(lines)
