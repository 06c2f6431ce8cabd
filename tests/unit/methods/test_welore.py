"""WeLore's pure math: normalised spectra, ranks from σ̂ >= τ, the LRCM rule, the τ and uniform bisections."""

from __future__ import annotations

import pytest
import torch

from helpers import decaying
from pissa.errors import PissaError
from pissa.methods.welore import (
    is_lrcm,
    kept_rank,
    lowrank_factors,
    normalized,
    reduction,
    uniform_plan,
    uniform_rank,
    welore_plan,
)


def test_ranks_count_the_normalised_singular_values_at_or_above_tau() -> None:
    sigma = torch.tensor([10.0, 6.0, 3.0, 2.0])  # σ̂ = 1, 0.5, 0.125, 0
    assert torch.allclose(normalized(sigma), torch.tensor([1.0, 0.5, 0.125, 0.0]))
    assert [kept_rank(sigma, t) for t in (0.0, 0.1, 0.125, 0.2, 0.5, 0.6, 1.0)] == [4, 3, 3, 2, 2, 1, 1]
    assert kept_rank(torch.ones(5), 0.7) == 5  # a flat spectrum keeps everything


def test_a_matrix_is_low_rank_capable_only_when_its_factors_are_smaller() -> None:
    assert is_lrcm((64, 32), 21) and not is_lrcm((64, 32), 22)  # 21 * 96 = 2016 < 2048 <= 22 * 96
    assert not is_lrcm((8, 8), 4)  # 4 * 16 = 64 = 8 * 8: no saving


def _spectra(seed: int = 0) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
    shapes = [(48, 32), (32, 32), (64, 32), (32, 96), (40, 40)]
    mats = [decaying(m, n, decay, seed + i) for i, ((m, n), decay) in enumerate(zip(shapes, (0.9, 0.5, 0.97, 0.8, 0.7)))]
    return [torch.linalg.svdvals(W) for W in mats], shapes


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.5, 0.7])
def test_tau_bisection_reaches_the_request_within_one_step(fraction: float) -> None:
    """The plan reaches the request; the next τ below (any τ' < τ) does not: the overshoot is a single step."""
    spectra, shapes = _spectra()
    plan = welore_plan(spectra, shapes, fraction)
    assert plan.reached >= fraction and plan.reached == reduction(shapes, plan.ranks)
    for r, s, shape in zip(plan.ranks, spectra, shapes):  # ranks come from σ̂ >= τ, dense where no saving
        k = kept_rank(s, plan.threshold)
        assert r == (k if is_lrcm(shape, k) else None)
    lower = [kept_rank(s, plan.threshold - 1e-12) for s in spectra]
    assert reduction(shapes, [k if is_lrcm(sh, k) else None for k, sh in zip(lower, shapes)]) < fraction


def test_heavy_tailed_spectra_lose_more_rank_than_flat_ones() -> None:
    spectra, shapes = _spectra()
    plan = welore_plan(spectra, shapes, 0.3)
    ranks = {d: r for d, r in zip((0.9, 0.5, 0.97, 0.8, 0.7), plan.ranks)}
    assert ranks[0.5] is not None and (ranks[0.97] is None or ranks[0.97] > ranks[0.5])


@pytest.mark.parametrize("fraction", [0.2, 0.5])
def test_uniform_plan_cuts_one_rank_fraction_everywhere(fraction: float) -> None:
    _, shapes = _spectra()
    plan = uniform_plan(shapes, fraction)
    assert plan.reached >= fraction
    assert plan.ranks == [uniform_rank(s, plan.threshold) if is_lrcm(s, uniform_rank(s, plan.threshold)) else None
                          for s in shapes]
    lower = [uniform_rank(s, plan.threshold - 1e-12) for s in shapes]
    assert reduction(shapes, [r if is_lrcm(s, r) else None for r, s in zip(lower, shapes)]) < fraction


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_a_reduction_outside_zero_one_is_refused(fraction: float) -> None:
    spectra, shapes = _spectra()
    with pytest.raises(PissaError, match=r"must be a fraction in \(0, 1\)"):
        welore_plan(spectra, shapes, fraction)


def test_an_unreachable_reduction_names_the_maximum() -> None:
    spectra, shapes = _spectra()
    top = reduction(shapes, [1] * len(shapes))
    with pytest.raises(PissaError, match=f"saves at most {top:.4f}"):
        welore_plan(spectra, shapes, (1 + top) / 2)


def test_factors_are_the_best_rank_r_approximation_with_balanced_norms() -> None:
    W = decaying(24, 16, 0.8, 1).double()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    A, B = lowrank_factors(U, S, Vh, 5)
    assert A.shape == (5, 16) and B.shape == (24, 5)
    err = torch.linalg.matrix_norm(W - B @ A)
    assert torch.isclose(err, S[5:].norm()) and torch.isclose(A.norm(), B.norm())
