"""The machine and library versions a result was measured with, and the results folder's name."""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["cpu_model", "machine_slug", "environment", "results_dir"]

ROOT = Path(__file__).resolve().parents[1]

_PACKAGES = ("xpoptim", "numpy", "array-api-compat", "torch", "jax", "jaxlib", "optax", "cupy-cuda12x", "cupy-cuda13x", "scipy", "matplotlib")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def gpu_name() -> str | None:
    """The first CUDA device's name through torch, or ``None`` without one."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:
        return None
    return None


def _slug(text: str) -> str:
    text = re.sub(r"\((r|tm|c)\)", "", text.lower())
    text = re.sub(r"\b(cpu|processor|with|radeon graphics)\b", " ", text)
    text = re.sub(r"@.*", "", text)
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def machine_slug(device: str) -> str:
    """``<cpu-model>-<n>c`` on CPU, ``<gpu-name>-<cpu-model>-<n>c`` on CUDA (folder name under results/)."""
    cpu = f"{_slug(cpu_model())}-{_cores()}c"
    if device == "cuda":
        name = gpu_name() or "cuda"
        return f"{_slug(name)}-{cpu}"
    return cpu


def _version(pkg: str) -> str | None:
    if pkg == "xpoptim":  # the code measured: the package imported, not the first metadata found on the path
        import xpoptim

        return xpoptim.__version__
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def _git() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        pass
    return {}


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _mem_total() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def environment(device: str, threads: int) -> dict[str, Any]:
    """Everything a reader needs to know to compare a result: machine, versions, threads, time."""
    env: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device,
        "machine": machine_slug(device),
        "cpu": cpu_model(),
        "cpu_cores": _cores(),
        "memory_gib": None if _mem_total() is None else round(_mem_total() / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch_threads": threads,
        "load_average_1m": _loadavg(),
        "versions": {p: v for p in _PACKAGES if (v := _version(p)) is not None},
        "git": _git(),
    }
    if device == "cuda":
        env["gpu"] = gpu_name()
        try:
            import torch

            env["cuda"] = torch.version.cuda
            props = torch.cuda.get_device_properties(0)
            env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
            env["torch_matmul_allow_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
        except Exception:
            pass
    try:
        import jax

        env["jax_backend"] = jax.default_backend()
    except Exception:
        pass
    return env


def describe(env: dict) -> str:
    """A Markdown paragraph naming the machine and the versions."""
    versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items())
    dev = f"GPU {env['gpu']} ({env.get('gpu_memory_gib')} GiB, CUDA {env.get('cuda')}); " if env.get("gpu") else ""
    git = env.get("git", {})
    rev = f"; xpoptim at {git['commit']}{' (uncommitted changes)' if git.get('dirty') else ''}" if git else ""
    return (
        f"Measured {env['date_utc']} on `{env['machine']}`: {dev}CPU {env['cpu']}, {env['cpu_cores']} cores, "
        f"{env.get('memory_gib')} GiB; torch threads {env['torch_threads']}; load average {env.get('load_average_1m')} at the "
        f"start; Python {env['python']}; {versions}{rev}."
    )


def results_dir(device: str, out: str | None = None) -> Path:
    """``benchmarks/results/<machine>/`` (or ``out`` when given), created."""
    path = Path(out) if out else ROOT / "benchmarks" / "results" / machine_slug(device)
    path.mkdir(parents=True, exist_ok=True)
    return path
