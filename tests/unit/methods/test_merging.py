"""RMM's reversible basis (exact at p >= rank, error = the discarded singular values) and linear / TIES / DARE merges."""

from __future__ import annotations

import pytest
import torch

from pissa.errors import PissaError
from pissa.methods.merging import dare_merge, linear_merge, rmm_basis, rmm_task, ties_merge


def stack(n: int = 5, r: int = 6, tasks: int = 4, rank: int | None = None, seed: int = 0) -> torch.Tensor:
    """``(n, r, T)`` task vectors; ``rank``: each position's matrix has that rank."""
    g = torch.Generator().manual_seed(seed)
    if rank is None:
        return torch.randn(n, r, tasks, generator=g, dtype=torch.float64)
    left = torch.randn(n, r, rank, generator=g, dtype=torch.float64)
    return left @ torch.randn(n, rank, tasks, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("p", [2, 3, 4])
def test_p_at_least_the_rank_rebuilds_every_task_exactly(p) -> None:
    x = stack(rank=2)
    basis = rmm_basis(x, p)
    for t in range(x.shape[-1]):
        assert torch.allclose(rmm_task(basis.basis, basis.coefficients, t), x[:, :, t], atol=1e-12)
    assert basis.discarded.max() < 1e-12


@pytest.mark.parametrize("p", [1, 2, 3])
def test_each_positions_error_is_its_discarded_singular_values(p) -> None:
    x = stack()
    basis = rmm_basis(x, p)
    rebuilt = torch.stack([rmm_task(basis.basis, basis.coefficients, t) for t in range(x.shape[-1])], -1)
    error = (rebuilt - x).flatten(1).norm(dim=1)
    s = torch.linalg.svdvals(x)
    assert torch.allclose(error, s[:, p:].square().sum(-1).sqrt(), atol=1e-10)
    assert torch.allclose(basis.discarded, error, atol=1e-10)
    assert basis.basis.shape == (5, 6, p) and basis.coefficients.shape == (5, p, 4)
    gram = basis.basis.transpose(1, 2) @ basis.basis  # orthonormal basis columns per position
    assert torch.allclose(gram, torch.eye(p, dtype=torch.float64).expand_as(gram), atol=1e-12)


def test_more_components_than_exist_are_capped() -> None:
    basis = rmm_basis(stack(r=3, tasks=5), 10)
    assert basis.basis.shape[-1] == 3 and basis.discarded.max() < 1e-12
    with pytest.raises(PissaError, match="components"):
        rmm_basis(stack(), 0)


def test_linear_is_the_mean() -> None:
    d = stack().permute(2, 0, 1)
    assert torch.allclose(linear_merge(d), d.mean(0))


def test_ties_trims_elects_and_averages_the_agreeing_entries() -> None:
    d = torch.tensor([[3.0, -1.0, 0.5, 2.0], [-4.0, 2.0, 0.1, 1.0], [2.0, 3.0, -0.2, -5.0]])
    # density 0.5: keep the 2 largest magnitudes of each task
    # task 0: 3, 2 -> [3, 0, 0, 2]; task 1: -4, 2 -> [-4, 2, 0, 0]; task 2: 3, -5 -> [0, 3, 0, -5]
    # signs of the sums: [-1, +1, 0, -1]; agreeing means: [-4, 2.5, 0, -5]
    assert torch.allclose(ties_merge(d, 0.5), torch.tensor([-4.0, 2.5, 0.0, -5.0], dtype=torch.float64))
    assert torch.allclose(ties_merge(d[:1], 1.0), d[0].double())  # one task, nothing trimmed: itself
    with pytest.raises(PissaError, match="density"):
        ties_merge(d, 0.0)


def test_dare_drops_rescales_and_is_seeded() -> None:
    d = torch.ones(2, 10_000, dtype=torch.float64)
    merged = dare_merge(d, 0.75, torch.Generator().manual_seed(0))
    assert set(merged.unique().tolist()) <= {0.0, 2.0, 4.0}  # each task's entry: 0 or 1 / (1 - 0.75), then the mean
    assert abs(merged.mean().item() - 1.0) < 0.05  # unbiased: E[keep / (1 - drop)] = 1
    again = dare_merge(d, 0.75, torch.Generator().manual_seed(0))
    assert torch.equal(merged, again)
    assert torch.equal(dare_merge(d, 0.0, torch.Generator().manual_seed(1)), d.mean(0))
    with pytest.raises(PissaError, match="drop"):
        dare_merge(d, 1.0, torch.Generator())
