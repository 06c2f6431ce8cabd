"""QPiSSA: which factors to keep in full precision when the residual is quantized (and LoftQ, the baseline).

QPiSSA (PiSSA paper, Algorithm 1) keeps the principal part ``B A`` in full precision and
quantizes only the residual. It is LoftQ's alternation started from PiSSA's factors instead of
from 0, and like LoftQ it ends on the SVD step (optimal for the last Q):

    B_0 A_0 = best rank-r approximation of W                           (PiSSA)
    t = 1 .. T:  Q_t = nf4(W - B_{t-1} A_{t-1});  B_t A_t = best rank-r approximation of W - Q_t
    stored:      Q_T = nf4(W - Br Ar) with the residual factors (Ar, Br) = (A_{T-1}, B_{T-1}),
                 and the trainable initial factors (A, B) = (A_T, B_T)

LoftQ (Li et al., 2023), the baseline, quantizes W itself first and then alternates:

    Q = nf4(W);  repeat T times: B A = best rank-r of W - Q, then (except the last time) Q = nf4(W - B A)
    stored:      Q, B, A

Both are measured on their final pair ``(Q_T, B_T A_T)``.

With calibration statistics (``C = X^T X / n``) QPiSSA's last SVD step becomes EoRA's
activation-weighted one, ``B_T A_T = argmin ||(W - Q_T - B A) L||_F`` with ``L L^T = C``
(:func:`pissa.methods.data_aware.eora_fit`): the factors are spent where the inputs are. A method that
:attr:`~pissa.methods.registry.Method.compensates` (EoRA) is applied once to ``W - nf4(W)`` instead.

The formulas name nf4, the paper's quantizer; every function takes the quantizer's round trip as ``quantize``
(:mod:`pissa.methods.quantize`; default nf4): with int8, read int8 for nf4.
The error metric of the paper is in :mod:`pissa.analysis.quant_error`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import cast

import torch
from torch import Tensor

from pissa.methods.data_aware import eora_fit
from pissa.methods.factors import Factors, as_factors
from pissa.methods.inits import pissa_init
from pissa.methods.inputs import InitOptions
from pissa.methods.nf4 import nf4
from pissa.methods.quantize import Quantizer
from pissa.methods.registry import METHODS


def qpissa_iterates(W: Tensor, A: Tensor, B: Tensor, opt: InitOptions,
                    quantize: Quantizer = nf4) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """QPiSSA's iterates ``(Q_t, A_t, B_t)`` for t = 1, 2, ...: ``Q_t = nf4(W - B_{t-1} A_{t-1})``, then
    ``B_t A_t`` = best rank-r of ``W - Q_t``.

    ``W (L, out, in)``; ``(A, B) = (A_0, B_0)`` are PiSSA's factors. Endless: take what you need.
    """
    r = A.shape[-2]
    while True:
        Q = quantize(W - B @ A)
        A, B = pissa_init(W - Q, r, opt)
        yield Q, A, B


def loftq_iterates(W: Tensor, r: int, opt: InitOptions,
                   quantize: Quantizer = nf4) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """LoftQ's iterates ``(Q, A, B)`` for t = 1, 2, ...: ``B A`` <- best rank-r of ``W - Q``,
    then ``Q = nf4(W - B A)``; ``Q`` starts as ``nf4(W)``."""
    Q = quantize(W)
    while True:
        A, B = pissa_init(W - Q, r, opt)
        yield Q, A, B
        Q = quantize(W - B @ A)


def refine(W: Tensor, factors: Factors, method: str, iters: int, opt: InitOptions, quantize: Quantizer = nf4) -> Factors:
    """The factors for a residual quantized by ``quantize`` (nf4, int8; written nf4 below): QPiSSA's iteration
    ``T = iters`` for PiSSA, the compensation of ``W - nf4(W)`` for EoRA, unchanged otherwise (LoRA: QLoRA).

    ``W (L, out, in)`` in the compute dtype, ``factors`` the method's (unscaled) init of it
    (``A_0, B_0``). QPiSSA returns ``A, B = A_T, B_T`` (trainable) and the residual factors
    ``Ar, Br = A_{T-1}, B_{T-1}``: the residual is ``nf4(W - Br Ar) = Q_T``, as in :func:`qpissa_iterates`;
    with ``opt.stats`` holding a covariance the last step is :func:`~pissa.methods.data_aware.eora_fit`.
    EoRA returns its init of ``W - nf4(W)`` with zero residual factors: the residual is ``nf4(W)``.
    """
    m = METHODS[method]
    r = factors.A.shape[-2]
    if m.compensates:
        comp = as_factors(cast("tuple[Tensor, Tensor] | Factors", m.init(W - quantize(W), r, opt)))
        return dataclasses.replace(comp, Ar=torch.zeros_like(comp.A), Br=torch.zeros_like(comp.B))
    if not m.qpissa:
        return factors
    weighted = opt.stats is not None and opt.stats.cov is not None
    A, B = factors.A, factors.B
    for t in range(iters):
        Ar, Br = A, B
        E = W - quantize(W - Br @ Ar)
        A, B = eora_fit(E, r, opt) if weighted and t == iters - 1 else pissa_init(E, r, opt)
    return dataclasses.replace(factors, A=A, B=B, Ar=Ar, Br=Br)
