"""The torch optimizer classes, one per rule: explicit subclasses of :class:`XPOptimizer`.

Private module: import the classes from ``xpoptim.adapters.torch``. Each class fixes its rule and spells out its
hyperparameters with the spec's defaults and types (numbers as ``float | torch.Tensor``, as torch.optim types
``lr``; ``tests/torch_adapter/test_torch_classes.py`` checks that every signature matches its spec), then calls ``XPOptimizer.__init__(params, "<rule>", ...)``. ``betas=None`` / ``beta1=None`` /
``beta2=None`` mean "not given" (the spec's defaults); ``foreach``, ``fused``, ``capturable`` and
``differentiable`` are torch.optim's flags, accepted as ``None``/``False`` only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.optim.optimizer import ParamsT

from xpoptim.core import SPECS

from ._torch_docs import class_doc
from ._torch_optimizer import XPOptimizer

__all__ = [
    "Adam",
    "AdamW",
    "AdaBelief",
    "LaProp",
    "MVNGrad",
    "SGD",
    "MSSD",
    "SVAG",
    "MSVAG",
    "AdamStar",
    "MSVAGMB",
    "AdamStarMB",
    "DeVALinf",
    "DeVASinf",
    "Muon",
]


class Adam(XPOptimizer):
    spec = SPECS["adam"]
    __doc__ = class_doc(SPECS["adam"])

    def __init__(
        self,
        params: ParamsT,
        lr: float | torch.Tensor = 0.001,
        *,
        betas: tuple[float | torch.Tensor, float | torch.Tensor] | None = None,
        eps: float | torch.Tensor = 1e-08,
        weight_decay: float | torch.Tensor = 0.0,
        maximize: bool = False,
        state_dtype: torch.dtype | None = None,
        compile: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        beta1: float | torch.Tensor | None = None,
        beta2: float | torch.Tensor | None = None,
    ) -> None:
        super().__init__(
            params,
            "adam",
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            maximize=maximize,
            state_dtype=state_dtype,
            compile=compile,
            foreach=foreach,
            fused=fused,
            capturable=capturable,
            differentiable=differentiable,
            beta1=beta1,
            beta2=beta2,
        )

class AdamW(XPOptimizer):
    spec = SPECS["adamw"]
    __doc__ = class_doc(SPECS["adamw"])

    def __init__(
        self,
        params: ParamsT,
        lr: float | torch.Tensor = 0.001,
        *,
        betas: tuple[float | torch.Tensor, float | torch.Tensor] | None = None,
        eps: float | torch.Tensor = 1e-08,
        weight_decay: float | torch.Tensor = 0.01,
        maximize: bool = False,
        state_dtype: torch.dtype | None = None,
        compile: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        beta1: float | torch.Tensor | None = None,
        beta2: float | torch.Tensor | None = None,
    ) -> None:
        super().__init__(
            params,
            "adamw",
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            maximize=maximize,
            state_dtype=state_dtype,
            compile=compile,
            foreach=foreach,
            fused=fused,
            capturable=capturable,
            differentiable=differentiable,
            beta1=beta1,
            beta2=beta2,
        )

class AdaBelief(XPOptimizer):
    spec = SPECS["adabelief"]
    __doc__ = class_doc(SPECS["adabelief"])

    def __init__(
        self,
        params: ParamsT,
        lr: float | torch.Tensor = 0.001,
        *,
        betas: tuple[float | torch.Tensor, float | torch.Tensor] | None = None,
        eps: float | torch.Tensor = 1e-16,
        weight_decay: float | torch.Tensor = 0.0,
        maximize: bool = False,
        state_dtype: torch.dtype | None = None,
        compile: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        beta1: float | torch.Tensor | None = None,
        beta2: float | torch.Tensor | None = None,
    ) -> None:
        super().__init__(
            params,
            "adabelief",
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            maximize=maximize,
            state_dtype=state_dtype,
            compile=compile,
            foreach=foreach,
            fused=fused,
            capturable=capturable,
            differentiable=differentiable,
            beta1=beta1,
            beta2=beta2,
        )

class LaProp(XPOptimizer):
    spec = SPECS["laprop"]
    __doc__ = class_doc(SPECS["laprop"])

    def __init__(
        self,
        params: ParamsT,
        lr: float | torch.Tensor = 0.0004,
        *,
        betas: tuple[float | torch.Tensor, float | torch.Tensor] | None = None,
        eps: float | torch.Tensor = 1e-15,
        weight_decay: float | torch.Tensor = 0.0,
        maximize: bool = False,
        state_dtype: torch.dtype | None = None,
        compile: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        beta1: float | torch.Tensor | None = None,
        beta2: float | torch.Tensor | None = None,
    ) -> None:
        super().__init__(
            params,
            "laprop",
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            maximize=maximize,
            state_dtype=state_dtype,
            compile=compile,
            foreach=foreach,
            fused=fused,
            capturable=capturable,
            differentiable=differentiable,
            beta1=beta1,
            beta2=beta2,
        )

class MVNGrad(XPOptimizer):
    spec = SPECS["mvngrad"]
    __doc__ = class_doc(SPECS["mvngrad"])

    def __init__(
        self,
        params: ParamsT,
        lr: float | torch.Tensor = 0.001,
        *,
        betas: tuple[float | torch.Tensor, float | torch.Tensor] | None = None,
        eps: float | torch.Tensor = 1e-08,
        eps_s: float | torch.Tensor = 0.0,
        weight_decay: float | torch.Tensor = 0.0,
        residual: str = "m_t",
        maximize: bool = False,
        state_dtype: torch.dtype | None = None,
        compile: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        beta1: float | torch.Tensor | None = None,
        beta2: float | torch.Tensor | None = None,
    ) -> None:
        super().__init__(
            params,
            "mvngrad",
            lr=lr,
            betas=betas,
            eps=eps,
            eps_s=eps_s,
            weight_decay=weight_decay,
            residual=residual,
            maximize=maximize,
            state_dtype=state_dtype,
            compile=compile,
            foreach=foreach,
            fused=fused,
            capturable=capturable,
            differentiable=differentiable,
            beta1=beta1,
            beta2=beta2,
        )

class SGD(XPOptimizer):
    spec = SPECS["sgd"]
    __doc__ = class_doc(SPECS["sgd"])

    def __init__(
        self,
        params: ParamsT,
        lr: float | torch.Tensor = 0.001,
        *,
        momentum: float | torch.Tensor = 0.9,
        dampening: float | torch.Tensor = 0.0,
        weight_decay: float | torch.Tensor = 0.0,
        nesterov: bool = False,
        maximize: bool = False,
        state_dtype: torch.dtype | None = None,
        compile: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        super().__init__(
            params,
            "sgd",
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            state_dtype=state_dtype,
            compile=compile,
            foreach=foreach,
            fused=fused,
            capturable=capturable,
            differentiable=differentiable,
        )

class MSSD(XPOptimizer):
    spec = SPECS["mssd"]
    __doc__ = class_doc(SPECS["mssd"])

    def __init__(
        self,
        params: ParamsT,
        lr: float | torch.Tensor = 0.001,
        *,
        mu: float | torch.Tensor = 0.9,
        weight_decay: float | torch.Tensor = 0.0,
        maximize: bool = False,
        state_dtype: torch.dtype | None = None,
        compile: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        super().__init__(
            params,
            "mssd",
            lr=lr,
            mu=mu,
            weight_decay=weight_decay,
            maximize=maximize,
            state_dtype=state_dtype,
            compile=compile,
            foreach=foreach,
            fused=fused,
            capturable=capturable,
            differentiable=differentiable,
        )

class SVAG(XPOptimizer):
    spec = SPECS["svag"]
    __doc__ = class_doc(SPECS["svag"])

    def __init__(
        self,
        params: ParamsT,
        lr: float | torch.Tensor = 0.001,
        *,
        mu: float | torch.Tensor = 0.9,
        weight_decay: float | torch.Tensor = 0.0,
        variance_unbiasing: bool = True,
        maximize: bool = False,
        state_dtype: torch.dtype | None = None,
        compile: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        super().__init__(
            params,
            "svag",
            lr=lr,
            mu=mu,
            weight_decay=weight_decay,
            variance_unbiasing=variance_unbiasing,
            maximize=maximize,
            state_dtype=state_dtype,
            compile=compile,
            foreach=foreach,
            fused=fused,
            capturable=capturable,
            differentiable=differentiable,
        )

class MSVAG(XPOptimizer):
    spec = SPECS["msvag"]
    __doc__ = class_doc(SPECS["msvag"])

    def __init__(
        self,
        params: ParamsT,
        lr: float | torch.Tensor = 0.001,
        *,
        mu: float | torch.Tensor = 0.9,
        weight_decay: float | torch.Tensor = 0.0,
        variance_unbiasing: bool = True,
        maximize: bool = False,
        state_dtype: torch.dtype | None = None,
        compile: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        super().__init__(
            params,
            "msvag",
            lr=lr,
            mu=mu,
            weight_decay=weight_decay,
            variance_unbiasing=variance_unbiasing,
            maximize=maximize,
            state_dtype=state_dtype,
            compile=compile,
            foreach=foreach,
            fused=fused,
            capturable=capturable,
            differentiable=differentiable,
        )

class AdamStar(XPOptimizer):
    spec = SPECS["adam_star"]
    __doc__ = class_doc(SPECS["adam_star"])

    def __init__(
        self,
        params: ParamsT,
        lr: float | torch.Tensor = 0.001,
        *,
        mu: float | torch.Tensor = 0.9,
        weight_decay: float | torch.Tensor = 0.0,
        adaptation: str = "adam",
        maximize: bool = False,
        state_dtype: torch.dtype | None = None,
        compile: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        super().__init__(
            params,
            "adam_star",
            lr=lr,
            mu=mu,
            weight_decay=weight_decay,
            adaptation=adaptation,
            maximize=maximize,
            state_dtype=state_dtype,
            compile=compile,
            foreach=foreach,
            fused=fused,
            capturable=capturable,
            differentiable=differentiable,
        )

class MSVAGMB(XPOptimizer):
    spec = SPECS["msvag_mb"]
    __doc__ = class_doc(SPECS["msvag_mb"])

    def __init__(
        self,
        params: ParamsT,
        lr: float | torch.Tensor = 0.001,
        *,
        mu: float | torch.Tensor = 0.9,
        weight_decay: float | torch.Tensor = 0.0,
        maximize: bool = False,
        state_dtype: torch.dtype | None = None,
        compile: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        super().__init__(
            params,
            "msvag_mb",
            lr=lr,
            mu=mu,
            weight_decay=weight_decay,
            maximize=maximize,
            state_dtype=state_dtype,
            compile=compile,
            foreach=foreach,
            fused=fused,
            capturable=capturable,
            differentiable=differentiable,
        )

class AdamStarMB(XPOptimizer):
    spec = SPECS["adam_star_mb"]
    __doc__ = class_doc(SPECS["adam_star_mb"])

    def __init__(
        self,
        params: ParamsT,
        lr: float | torch.Tensor = 0.001,
        *,
        mu: float | torch.Tensor = 0.9,
        weight_decay: float | torch.Tensor = 0.0,
        adaptation: str = "adam",
        maximize: bool = False,
        state_dtype: torch.dtype | None = None,
        compile: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        super().__init__(
            params,
            "adam_star_mb",
            lr=lr,
            mu=mu,
            weight_decay=weight_decay,
            adaptation=adaptation,
            maximize=maximize,
            state_dtype=state_dtype,
            compile=compile,
            foreach=foreach,
            fused=fused,
            capturable=capturable,
            differentiable=differentiable,
        )

class DeVALinf(XPOptimizer):
    spec = SPECS["deva_linf"]
    __doc__ = class_doc(SPECS["deva_linf"])

    def __init__(
        self,
        params: ParamsT,
        lr: float | torch.Tensor = 0.02,
        *,
        betas: tuple[float | torch.Tensor, float | torch.Tensor] | None = None,
        eps: float | torch.Tensor = 1e-05,
        weight_decay: float | torch.Tensor = 0.0,
        nesterov: bool = False,
        second_moment_of: str = "momentum",
        bias_correction: bool = False,
        maximize: bool = False,
        state_dtype: torch.dtype | None = None,
        compile: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        beta1: float | torch.Tensor | None = None,
        beta2: float | torch.Tensor | None = None,
    ) -> None:
        super().__init__(
            params,
            "deva_linf",
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            nesterov=nesterov,
            second_moment_of=second_moment_of,
            bias_correction=bias_correction,
            maximize=maximize,
            state_dtype=state_dtype,
            compile=compile,
            foreach=foreach,
            fused=fused,
            capturable=capturable,
            differentiable=differentiable,
            beta1=beta1,
            beta2=beta2,
        )

class DeVASinf(XPOptimizer):
    spec = SPECS["deva_sinf"]
    __doc__ = class_doc(SPECS["deva_sinf"])

    def __init__(
        self,
        params: ParamsT,
        lr: float | torch.Tensor = 0.003,
        *,
        betas: tuple[float | torch.Tensor, float | torch.Tensor] | None = None,
        shampoo_beta: float | torch.Tensor = -1.0,
        eps: float | torch.Tensor = 1e-08,
        weight_decay: float | torch.Tensor = 0.01,
        precondition_frequency: int = 10,
        max_precond_dim: int = 10000,
        correct_bias: bool = True,
        nesterov: bool = True,
        normalize_grads: bool = False,
        shape_scale: str = "match_rms_adamw",
        ns_steps: int = 5,
        ns_coefficients: Any = "quintic",
        ns_dtype: Any = None,
        maximize: bool = False,
        state_dtype: torch.dtype | None = None,
        compile: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fallback: str | None = None,
        fallback_hyperparams: Mapping[str, Any] | None = None,
        beta1: float | torch.Tensor | None = None,
        beta2: float | torch.Tensor | None = None,
    ) -> None:
        super().__init__(
            params,
            "deva_sinf",
            lr=lr,
            betas=betas,
            shampoo_beta=shampoo_beta,
            eps=eps,
            weight_decay=weight_decay,
            precondition_frequency=precondition_frequency,
            max_precond_dim=max_precond_dim,
            correct_bias=correct_bias,
            nesterov=nesterov,
            normalize_grads=normalize_grads,
            shape_scale=shape_scale,
            ns_steps=ns_steps,
            ns_coefficients=ns_coefficients,
            ns_dtype=ns_dtype,
            maximize=maximize,
            state_dtype=state_dtype,
            compile=compile,
            foreach=foreach,
            fused=fused,
            capturable=capturable,
            differentiable=differentiable,
            fallback=fallback,
            fallback_hyperparams=fallback_hyperparams,
            beta1=beta1,
            beta2=beta2,
        )

class Muon(XPOptimizer):
    spec = SPECS["muon"]
    __doc__ = class_doc(SPECS["muon"])

    def __init__(
        self,
        params: ParamsT,
        lr: float | torch.Tensor = 0.001,
        *,
        weight_decay: float | torch.Tensor = 0.1,
        momentum: float | torch.Tensor = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        ns_coefficients: Any = "quintic",
        ns_dtype: Any = None,
        ns_prenorm: str = "frobenius",
        ns_eps: float | torch.Tensor = 1e-07,
        shape_scale: str = "original",
        maximize: bool = False,
        state_dtype: torch.dtype | None = None,
        compile: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fallback: str | None = None,
        fallback_hyperparams: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(
            params,
            "muon",
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            ns_coefficients=ns_coefficients,
            ns_dtype=ns_dtype,
            ns_prenorm=ns_prenorm,
            ns_eps=ns_eps,
            shape_scale=shape_scale,
            maximize=maximize,
            state_dtype=state_dtype,
            compile=compile,
            foreach=foreach,
            fused=fused,
            capturable=capturable,
            differentiable=differentiable,
            fallback=fallback,
            fallback_hyperparams=fallback_hyperparams,
        )
