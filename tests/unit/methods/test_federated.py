"""Federated math: FedSVD's refactorisation keeps B A with orthonormal A, weighted means, the Dirichlet split, DP budgets."""

from __future__ import annotations

import pytest
import torch
from opacus.accountants import RDPAccountant

from pissa.errors import PissaError
from pissa.methods.federated import (
    ALPHAS,
    client_weights,
    dirichlet_split,
    epsilon,
    noise_for,
    refactor,
    refactors,
    weighted_mean,
)


def test_server_step_keeps_the_averaged_product_and_makes_a_orthonormal() -> None:
    g = torch.Generator().manual_seed(0)
    A_old = torch.randn(4, 30, generator=g)
    Bs = [torch.randn(40, 4, generator=g) for _ in range(3)]
    p = client_weights([10, 30, 60])
    B, A = refactor(weighted_mean(Bs, p), A_old)
    expected = sum(w * b.double() for w, b in zip(p, Bs)) @ A_old.double()
    assert (B.double() @ A.double() - expected).abs().max() < 1e-5 * expected.abs().max()
    assert torch.allclose(A @ A.T, torch.eye(4), atol=1e-6)
    assert B.dtype == A.dtype == torch.float32 and B.shape == (40, 4) and A.shape == (4, 30)
    B64, A64 = refactor(weighted_mean([b.double() for b in Bs], p), A_old.double())  # float64: exact to 1e-6 and better
    assert (B64 @ A64 - expected).abs().max() < 1e-12
    norms = B64.norm(dim=0)
    assert torch.all(norms[:-1] >= norms[1:])  # B' = U S: columns ordered by singular value


def test_weights_and_weighted_mean() -> None:
    assert client_weights([1, 3]) == [0.25, 0.75]
    with pytest.raises(PissaError, match="at least one example"):
        client_weights([4, 0])
    a, b = torch.ones(2, 2), torch.full((2, 2), 3.0)
    assert torch.equal(weighted_mean([a, b], [0.25, 0.75]), torch.full((2, 2), 2.5))


def test_refactor_rounds() -> None:
    assert [r for r in range(1, 11) if refactors(r, every=3, warmup=2)] == [5, 8]
    assert [r for r in range(1, 5) if refactors(r, every=1, warmup=0)] == [1, 2, 3, 4]


@pytest.mark.parametrize("alpha", [None, 0.1, 0.5, 100.0])
def test_dirichlet_split_assigns_each_example_once(alpha) -> None:
    labels = [i % 2 for i in range(200)]
    parts = dirichlet_split(labels, 4, alpha, seed=0)
    assert sorted(i for p in parts for i in p) == list(range(200)) and all(parts)
    assert parts == dirichlet_split(labels, 4, alpha, seed=0)  # seeded
    if alpha is None:
        assert [len(p) for p in parts] == [50, 50, 50, 50]


def test_small_alpha_skews_labels_and_large_alpha_tends_to_iid() -> None:
    labels = [i % 2 for i in range(2000)]

    def worst_share(alpha: float) -> float:  # the most lopsided client's share of label 1
        parts = dirichlet_split(labels, 4, alpha, seed=1)
        return max(abs(sum(labels[i] for i in p) / len(p) - 0.5) for p in parts)

    assert worst_share(0.1) > 0.3
    assert worst_share(1000.0) < 0.05


def test_split_errors() -> None:
    with pytest.raises(PissaError, match="clients"):
        dirichlet_split([0, 1, 0], 4, None, seed=0)
    with pytest.raises(PissaError, match="dirichlet_alpha"):
        dirichlet_split([0, 1, 0], 2, 0.0, seed=0)


def test_epsilon_is_opacus_accounting_step_by_step_and_noise_for_meets_the_target() -> None:
    q, steps, delta = 8 / 250, 60, 1e-5  # Poisson rate = batch / the client's examples
    stepped = RDPAccountant()
    for _ in range(steps):
        stepped.step(noise_multiplier=1.1, sample_rate=q)
    assert epsilon(1.1, q, steps, delta) == pytest.approx(stepped.get_epsilon(delta, alphas=ALPHAS), rel=1e-9)
    assert epsilon(1.1, q, steps, delta) <= stepped.get_epsilon(delta) + 1e-12  # more orders: never a looser bound
    assert epsilon(1.1, q, 2 * steps, delta) > epsilon(1.1, q, steps, delta) > epsilon(2.0, q, steps, delta)
    sigma = noise_for(8.0, q, steps, delta)
    assert epsilon(sigma, q, steps, delta) <= 8.0 < epsilon(sigma * 0.9, q, steps, delta)


def test_large_noise_finds_its_optimal_order_inside_the_wide_list() -> None:
    """Opacus's default orders end at 63: there it warns and overstates eps; ALPHAS reaches the optimum."""
    q, steps, delta = 0.01, 5, 1e-5
    with pytest.warns(UserWarning, match="largest alpha"):
        default = RDPAccountant()
        default.history = [(8.0, q, steps)]
        loose = default.get_epsilon(delta)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tight = epsilon(8.0, q, steps, delta)
    assert 0 < tight < loose
