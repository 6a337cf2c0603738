"""Signature defaults and docstrings of the optax adapter's per-optimizer functions (shared by the functions made at
run time for registered rules and by ``python -m xpoptim._codegen``, which writes the built-in ones)."""

from __future__ import annotations

from typing import Any

from xpoptim.core.spec import ElementwiseSpec

__all__ = ["_sig_default", "_doc_args", "_scale_by_doc", "_alias_doc"]


def _sig_default(h: Any) -> Any:
    """Integer switches default to None (= the spec default) so inject_hyperparams keeps them static."""
    return None if h.kind == "int_pos" else h.default


def _doc_args(spec: Any, skip: tuple) -> str:
    lines = []
    for h in spec.hyperparams:
        if h.name in skip:
            continue
        lines.append(f"        {h.name}: {h.doc} (default {h.default!r}).")
    return "\n".join(lines)


def _scale_by_doc(spec: ElementwiseSpec) -> str:
    """The docstring of ``scale_by_<name>`` (the generated functions carry the same text)."""
    extra = (
        f"\n    ``update`` needs the extra argument ``{spec.extras[0]}=`` (a pytree like the gradients).\n"
        if spec.extras
        else ""
    )
    return f"""Rescale updates by the {spec.title} rule (the direction; no learning rate, no decay).

    Convention: {spec.conventions}.
{extra}
    Args:
{_doc_args(spec, ("lr", "weight_decay"))}
        state_dtype: dtype of the state buffers (default: the leaf's, float32 for bf16/fp16 leaves).

    Returns:
        A ``GradientTransformationExtraArgs`` with state ``ScaleBy{spec.title}State``.

    References:
        {spec.source}.
    """


def _alias_doc(spec: ElementwiseSpec) -> str:
    """The docstring of the alias ``<name>`` (the generated functions carry the same text)."""
    where = "before the rule (coupled L2: g + wd p)" if spec.weight_decay == "coupled" else "after the rule (decoupled: p - lr (d + wd p))"
    return f"""The {spec.title} optimizer as an optax alias (same numbers as the torch adapter).

    ``chain`` of the weight decay {where}, :func:`scale_by_{spec.name}` and
    ``optax.scale_by_learning_rate``. Convention: {spec.conventions}.

    Args:
        learning_rate: a float or an optax schedule (default {spec.defaults['lr']!r}).
{_doc_args(spec, ("lr",))}
        mask: weight-decay mask (pytree of bools or callable), as in ``optax.add_decayed_weights``.
        state_dtype: dtype of the state buffers (default: the leaf's, float32 for bf16/fp16 leaves).

    Returns:
        A ``GradientTransformationExtraArgs``.

    References:
        {spec.source}.
    """
