"""The issue's performance targets, as ratios, and how a measurement is judged against them.

Each target is a ratio measured in one interleaved run:

CPU
    * torch adapter, default path (fresh gradients every step), AdamW, layouts A and B: step time <= 1.1 x
      torch.optim.AdamW(fused=True);
    * torch adapter, default path, MVN-Grad, layouts A and B: <= 1.35 x torch fused AdamW (it moves 36 bytes per
      parameter, not 28);
    * torch adapter, default path, any rule, layout C: >= 8 x faster than torch fused AdamW;
    * optax adapter, AdamW, layouts A and B: <= 1.1 x optax.adamw under jit; MVN-Grad on A: <= 1.3 x;
    * optax adapter, flat path, any rule, layout C: >= 10 x faster than optax.adamw;
    * NumPy adapter, layout A: <= 3 x the copy floor (the copy floor scaled to the rule's bytes per parameter).
GPU
    * every adapter path, every rule, every layout: <= 1.2 x the copy floor (scaled to the rule's bytes).
Matrix
    * Muon step (torch adapter) faster than torch.optim.Muon on the same parameters: float32 Newton-Schulz on CPU,
      bf16 on GPU.
"""

from __future__ import annotations

import dataclasses

__all__ = ["Target", "judge", "elementwise_targets", "muon_target"]


@dataclasses.dataclass(frozen=True)
class Target:
    """``value <= bound`` (``kind="at_most"``: a time ratio) or ``value >= bound`` (``"at_least"``: a speedup)."""

    name: str
    kind: str
    bound: float
    against: str  # "torch_fused", "optax_adamw", "floor", "torch_muon"

    def describe(self) -> str:
        sign = "<=" if self.kind == "at_most" else ">="
        what = {
            "torch_fused": "x torch fused AdamW" if self.kind == "at_most" else "x faster than torch fused AdamW",
            "optax_adamw": "x optax.adamw" if self.kind == "at_most" else "x faster than optax.adamw",
            "floor": "x copy floor",
            "torch_muon": "x torch.optim.Muon",
        }[self.against]
        return f"{sign} {self.bound:g}{what}"


def judge(target: Target, value: float | None) -> dict:
    """``{"target", "value", "met", "missed_by", "text"}``: met, or missed by ``value/bound`` (or its inverse)."""
    if value is None:
        return {"target": target.describe(), "value": None, "met": None, "missed_by": None, "text": "not measured"}
    if target.kind == "at_most":
        met = value <= target.bound
        missed = None if met else value / target.bound
    else:
        met = value >= target.bound
        missed = None if met else (target.bound / value if value > 0 else float("inf"))
    text = f"met ({value:.2f})" if met else f"missed by {missed:.2f}x ({value:.2f})"
    return {"target": target.describe(), "value": value, "met": met, "missed_by": missed, "text": text}


def elementwise_targets(device: str, framework: str, path: str, rule: str, layout: str) -> list[Target]:
    """The targets that apply to one of our elementwise rows."""
    if device == "cuda":
        return [Target("gpu-floor", "at_most", 1.2, "floor")]
    out: list[Target] = []
    if framework == "torch" and path == "default":
        if layout in ("A", "B") and rule == "adamw":
            out.append(Target("cpu-torch-adamw", "at_most", 1.1, "torch_fused"))
        if layout in ("A", "B") and rule == "mvngrad":
            out.append(Target("cpu-torch-mvngrad", "at_most", 1.35, "torch_fused"))
        if layout == "C":
            out.append(Target("cpu-torch-C", "at_least", 8.0, "torch_fused"))
    elif framework == "jax":
        if layout in ("A", "B") and rule == "adamw":
            out.append(Target("cpu-optax-adamw", "at_most", 1.1, "optax_adamw"))
        if layout == "A" and rule == "mvngrad":
            out.append(Target("cpu-optax-mvngrad", "at_most", 1.3, "optax_adamw"))
        if layout == "C" and "flat" in path:
            out.append(Target("cpu-optax-C", "at_least", 10.0, "optax_adamw"))
    elif framework == "numpy":
        if layout == "A":
            out.append(Target("cpu-numpy-A", "at_most", 3.0, "floor"))
    return out


def muon_target() -> Target:
    return Target("muon", "at_most", 1.0, "torch_muon")
