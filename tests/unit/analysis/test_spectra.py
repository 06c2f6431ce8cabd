"""Heavy-tail exponents: the Hill/KS fit on a known power law, and FARMS removing the aspect-ratio bias."""

from __future__ import annotations

import math

import torch

from pissa.analysis.spectra import farms_eigenvalues, hill_alpha


def test_hill_alpha_recovers_a_pareto_exponent() -> None:
    u = torch.rand(4000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    samples = (1 - u) ** (-1 / (3.0 - 1))  # Pareto density ~ x^-3 on [1, inf)
    assert abs(hill_alpha(samples) - 3.0) < 0.2
    assert math.isnan(hill_alpha(torch.ones(5)))


def _heavy(m: int, n: int, g: torch.Generator) -> torch.Tensor:
    """Entries with a power-law tail (symmetric Pareto, exponent 2.5): a heavy-tailed spectrum."""
    u = torch.rand(m, n, generator=g, dtype=torch.float64)
    return (torch.randint(0, 2, (m, n), generator=g) * 2 - 1) * (1 - u) ** (-1 / 2.5)


def test_farms_uses_square_windows_and_removes_the_aspect_ratio_bias() -> None:
    g = torch.Generator().manual_seed(1)
    square, wide = _heavy(64, 64, g), _heavy(64, 640, g)
    assert farms_eigenvalues(square).shape == (64,) and farms_eigenvalues(wide).shape == (640,)  # 10 windows of 64
    torch.testing.assert_close(farms_eigenvalues(square), torch.linalg.svdvals(square).square())
    plain, farms = [], []
    for _ in range(5):  # wide matrices vs square ones of the same entries: FARMS's alpha is the square one's
        reference = sum(hill_alpha(farms_eigenvalues(_heavy(128, 128, g))) for _ in range(3)) / 3
        wide = _heavy(128, 1280, g)
        plain.append(abs(hill_alpha(torch.linalg.svdvals(wide).square()) - reference))
        farms.append(abs(hill_alpha(farms_eigenvalues(wide)) - reference))
    assert sum(farms) < sum(plain)
