"""The pure math of federated fine-tuning (FedSVD, arXiv 2505.12805, and its baselines FFA-LoRA and FedAvg of LoRA):
client weights, aggregation, FedSVD's refactorisation, the Dirichlet (non-IID) client split and the DP-SGD privacy
budget (Opacus's RDP accountant, over the wide orders :data:`ALPHAS`). ``pissa federate``
(:mod:`pissa.training.federate`, Flower apps in :mod:`pissa.training.flower`) runs it.

One server step of each algorithm, with ``p_k = n_k / sum_j n_j`` (client k's share of the examples):

    fedavg-lora   A <- sum p_k A_k,  B <- sum p_k B_k          (both factors trained and averaged)
    ffa-lora      A kept (frozen),   B <- sum p_k B_k
    fedsvd        B <- sum p_k B_k, then on a refactor round  (B, A) <- refactor(B, A):
                  A <- the top-r right singular vectors of B A (orthonormal rows), B <- U_r S_r,
                  so the product (B A) is unchanged and A A^T = I_r.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

_root_handlers = list(logging.getLogger().handlers)
from opacus.accountants import RDPAccountant  # noqa: E402
from opacus.accountants.utils import get_noise_multiplier  # noqa: E402

# opacus (opacus.utils.module_utils) calls logging.basicConfig when imported, giving the root logger a handler, so
# every later log line of the program printed twice; a library must leave the root logger to the application
logging.getLogger().handlers[:] = _root_handlers

from torch import Tensor  # noqa: E402

from pissa.errors import PissaError  # noqa: E402


def client_weights(counts: Sequence[int]) -> list[float]:
    """``p_k = n_k / sum_j n_j`` for the clients' example counts ``n_k`` (each >= 1)."""
    if not counts or min(counts) < 1:
        raise PissaError(f"every client needs at least one example, got counts {list(counts)}")
    total = float(sum(counts))
    return [n / total for n in counts]


def weighted_mean(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """``sum_k w_k T_k`` of same-shape tensors, accumulated in float64 and cast back to the first one's dtype."""
    total = torch.zeros(tensors[0].shape, dtype=torch.float64, device=tensors[0].device)
    for t, w in zip(tensors, weights, strict=True):
        total += w * t.double()
    return total.to(tensors[0].dtype)


def refactor(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
    """FedSVD's re-factorisation of ``M = B A`` (B ``(out, r)``, A ``(r, in)``) without forming M:

        B = Q R (reduced QR, Q (out, r)),  R A = U' S V^T (SVD of the small (r, in) matrix),
        A' = V^T (r, in, orthonormal rows),  B' = Q U' S (out, r),  so B' A' = Q R A = B A.

    Exact up to rounding: formed in float64, returned in the inputs' dtypes.
    """
    Q, R = torch.linalg.qr(B.double(), mode="reduced")
    U, S, Vh = torch.linalg.svd(R @ A.double(), full_matrices=False)
    return ((Q @ U) * S).to(B.dtype), Vh.to(A.dtype)


def refactors(round_: int, every: int, warmup: int) -> bool:
    """Whether FedSVD re-factorises after round ``round_`` (1-based): every ``every`` rounds once ``warmup``
    rounds have passed (rounds ``warmup + every``, ``warmup + 2 every``, ...)."""
    return round_ > warmup and (round_ - warmup) % every == 0


def dirichlet_split(labels: Sequence[int], clients: int, alpha: float | None, seed: int) -> list[list[int]]:
    """Share the example indices ``0..len(labels)-1`` out among ``clients`` (each index exactly once).

    ``alpha`` None: IID (a seeded shuffle cut into near-equal parts). Otherwise non-IID: for each label c the
    proportions ``q ~ Dirichlet(alpha 1_K)`` (numpy, seeded) cut that label's shuffled indices; small alpha gives
    each client few labels, alpha -> inf tends to IID. Redrawn (the next draws of the same generator) until
    every client has an example; a PissaError when ``clients`` exceeds the examples. Each part is sorted.
    """
    n = len(labels)
    if clients < 1 or clients > n:
        raise PissaError(f"`clients` {clients} must be between 1 and the {n} training examples; "
                         "lower `clients` or give more data")
    if alpha is not None and not alpha > 0:
        raise PissaError(f"`dirichlet_alpha` must be > 0 (or none for IID), got {alpha}")
    rng = np.random.default_rng(seed)
    if alpha is None:
        return [sorted(part.tolist()) for part in np.array_split(rng.permutation(n), clients)]
    by_label: dict[int, list[int]] = {}
    for i, c in enumerate(labels):
        by_label.setdefault(int(c), []).append(i)
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(clients)]
        for c in sorted(by_label):
            idx = rng.permutation(by_label[c])
            cuts = (np.cumsum(rng.dirichlet([alpha] * clients))[:-1] * len(idx)).astype(int)
            for k, piece in enumerate(np.split(idx, cuts)):
                parts[k] += piece.tolist()
        if all(parts):
            return [sorted(p) for p in parts]
    raise PissaError(f"no Dirichlet split with alpha {alpha} gives each of {clients} clients an example; "
                     "raise `dirichlet_alpha` or lower `clients`")


ALPHAS: list[float] = ([1 + x / 10.0 for x in range(1, 100)] + [float(a) for a in range(12, 64)]
                      + [float(a) for a in range(64, 256, 8)] + [float(2**k) for k in range(8, 13)])
"""RDP orders the accountant minimises over: Opacus's default (1.1 .. 63) and on up to 4096 (an integer order
costs its value in terms, so they thin out), so the optimum stays inside the list for large noise or few steps,
where the default list warns "Optimal order is the largest alpha" and overstates epsilon."""


def epsilon(noise: float, sample_rate: float, steps: int, delta: float) -> float:
    """The (eps, ``delta``)-DP budget spent by ``steps`` DP-SGD steps with Poisson sampling rate
    ``sample_rate`` (q = batch / n_k, client k's examples) and noise multiplier ``noise`` (std noise * clip),
    by Opacus's RDP accountant over the orders :data:`ALPHAS`."""
    accountant = RDPAccountant()
    accountant.history = [(noise, sample_rate, steps)]
    return float(accountant.get_epsilon(delta, alphas=ALPHAS))


def noise_for(target: float, sample_rate: float, steps: int, delta: float) -> float:
    """The smallest noise multiplier whose :func:`epsilon` after ``steps`` steps at ``sample_rate`` is at most
    ``target`` (Opacus's search over its RDP accountant, tolerance 0.01)."""
    return float(get_noise_multiplier(target_epsilon=target, target_delta=delta, sample_rate=sample_rate,
                                      steps=steps, accountant="rdp", alphas=ALPHAS))
