"""Matrix rules: Newton-Schulz alone, and full Muon / DeVA_Sinf steps, against torch.optim.Muon and optax.contrib.muon.

Cases (CPU): one 1024x1024 matrix, one 4096x1024 matrix, and a stack of 4 1024x1024 matrices (GPU: the stack is
24 x (1024x4096), the shape of performance.md's measurement). Each case is one interleaved block. Newton-Schulz
is 5 quintic iterations; "float32" / "bfloat16" is the dtype it runs in.
"""

from __future__ import annotations

import gc
import math
from typing import Any

from . import array_paths, jax_paths, torch_paths
from .harness import Config, Measurement, Skip, Subject, log, measure_interleaved
from .targets import judge, muon_target

__all__ = ["run", "cases_for", "ns_flops"]

CASES = {
    "cpu": [("1024x1024", (1024, 1024)), ("4096x1024", (4096, 1024)), ("4x(1024x1024)", (4, 1024, 1024))],
    "cuda": [("1024x1024", (1024, 1024)), ("4096x1024", (4096, 1024)), ("24x(1024x4096)", (24, 1024, 4096))],
}
QUICK = [("64x48", (64, 48)), ("2x(32x32)", (2, 32, 32))]


def cases_for(device: str, quick: bool, size_scale: float = 1.0) -> list[tuple[str, tuple[int, ...]]]:
    """The matrix cases; ``size_scale`` shrinks both matrix sides by ``sqrt(size_scale)`` (at least 16)."""
    if quick:
        return QUICK
    if size_scale == 1.0:
        return CASES[device]
    f = math.sqrt(size_scale)
    out = []
    for _, shape in CASES[device]:
        s = tuple(shape[:-2]) + tuple(max(16, int(d * f)) for d in shape[-2:])
        name = "x".join(map(str, s[-2:]))
        out.append((f"{s[0]}x({name})" if len(s) == 3 else name, s))
    return out


def ns_flops(shape: tuple[int, ...], steps: int = 5) -> float:
    """Floating-point operations of ``steps`` quintic Newton-Schulz iterations on ``shape`` (stack allowed)."""
    n, m = sorted(shape[-2:])
    batch = math.prod(shape[:-2]) if len(shape) > 2 else 1
    return batch * steps * (4 * n * n * m + 2 * n**3)


def _try(builder, *args, skipped: list, label: str) -> Subject | None:
    try:
        return builder(*args)
    except Skip as exc:
        skipped.append({"label": label, "reason": str(exc)})
        log(f"  skipped: {label}: {exc}")
    except Exception as exc:
        reason = f"construction failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        skipped.append({"label": label, "reason": reason})
        log(f"  skipped: {label}: {reason}")
    return None


def _subjects(case: str, shape: tuple[int, ...], cfg: Config, skipped: list) -> list[tuple[Subject, str]]:
    dev = cfg.device
    out: list[tuple[Subject | None, str]] = []
    dtypes = ("float32",) if cfg.quick else ("float32", "bfloat16")
    first = case == cases_for(dev, cfg.quick, cfg.size_scale)[0][0]
    if len(shape) == 2:  # Newton-Schulz alone (on a stack, the Muon steps below show the batching)
        for dt in dtypes:
            out.append((_try(torch_paths.newton_schulz_ours, shape, dev, dt, skipped=skipped, label=f"NS torch {dt}"), dt))
            out.append((_try(jax_paths.newton_schulz_ours, shape, dev, dt, skipped=skipped, label=f"NS jax {dt}"), dt))
        out.append((_try(array_paths.newton_schulz_ours, shape, dev, "float32", skipped=skipped, label="NS array float32"), "float32"))
        if dev == "cuda":
            out.append((_try(array_paths.newton_schulz_ours, shape, dev, "float16", skipped=skipped, label="NS cupy float16"), "float16"))
        out.append((_try(torch_paths.newton_schulz_peer, shape, dev, skipped=skipped, label="NS torch.optim.Muon"), "bfloat16"))
        for dt in dtypes:
            out.append((_try(jax_paths.newton_schulz_peer, shape, dev, dt, skipped=skipped, label=f"NS optax {dt}"), dt))
    # Full steps
    out.append((_try(torch_paths.peer_muon, shape, dev, skipped=skipped, label="torch.optim.Muon"), "bfloat16"))
    for dt in dtypes:
        out.append((_try(jax_paths.peer_muon, shape, dev, dt, skipped=skipped, label=f"optax.contrib.muon {dt}"), dt))
    for rule in ("muon", "deva_sinf"):
        rule_dtypes = dtypes
        if rule == "deva_sinf" and dev == "cpu" and not cfg.slow:
            if not first:
                skipped.append({"label": f"DeVA_Sinf on {case}", "reason": "on CPU its first step (eigendecompositions of the Kronecker factors, up to 4096x4096) takes minutes: measured on the first case only (--slow for all)"})
                continue
            rule_dtypes = ("float32",)  # on CPU bf16 Newton-Schulz is slower (no AMX) and DeVA's rotations stay float32
        for dt in rule_dtypes:
            out.append((_try(torch_paths.ours_matrix, rule, shape, dev, dt, "adapter", {}, skipped=skipped, label=f"torch {rule} {dt}"), dt))
            out.append((_try(jax_paths.ours_matrix, rule, shape, dev, dt, "adapter", {}, skipped=skipped, label=f"optax {rule} {dt}"), dt))
        out.append((_try(array_paths.ours_matrix, rule, shape, dev, "float32", skipped=skipped, label=f"array {rule} float32"), "float32"))
    return [(s, dt) for s, dt in out if s is not None]


def run(cfg: Config) -> dict[str, Any]:
    """Run the matrix section; returns the JSON-able results."""
    rows: list[dict] = []
    skipped: list[dict] = []
    target = muon_target()
    target_dtype = "bfloat16" if cfg.device == "cuda" else "float32"
    for case, shape in cases_for(cfg.device, cfg.quick, cfg.size_scale):
        log(f"[matrix] {case}")
        built = _subjects(case, shape, cfg, skipped)
        subjects = [s for s, _ in built]
        ms: list[Measurement] = measure_interleaved(subjects, warmup=0, repeats=cfg.matrix_repeats, name=case)
        peer = next((m for m in ms if m.label.startswith("torch.optim.Muon (") and m.median_s), None)
        flops = ns_flops(shape)
        for m, (_, dt) in zip(ms, built):
            row = {"case": case, "shape": list(shape), "dtype": dt, **m.to_json(), "max_ms": max(m.samples) * 1e3 if m.samples else None}
            row["tflops"] = flops / m.median_s / 1e12 if m.median_s and m.rule in ("newton_schulz", "muon") else None
            if m.rule == "muon" and peer is not None and m.median_s and m is not peer:
                row["vs_torch_muon"] = m.median_s / peer.median_s
                if m.kind == "ours" and m.framework == "torch" and dt == target_dtype:
                    row["target"] = judge(target, row["vs_torch_muon"])
            rows.append(row)
            if m.median_s:
                log(f"    {m.label:<52} {m.median_s * 1e3:9.2f} ms")
        subjects.clear()
        built.clear()
        del ms
        gc.collect()
    return {"rows": rows, "skipped": skipped, "target_dtype": target_dtype, "repeats": cfg.matrix_repeats}
