"""decompose: residual + B A == W, and the principal part is optimal (property tests)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pissa
from helpers import WEIGHT_ONLY, decaying
from pissa.methods import svd
from pissa.methods.registry import METHODS
from pissa.methods.svd import truncated_svd


def optimal_residual(W: torch.Tensor, r: int) -> float:
    """sqrt(sum of the discarded S^2): the Frobenius error of the best rank-r approximation."""
    S = torch.linalg.svdvals(W.double())
    return S[r:].pow(2).sum().sqrt().item()


shapes = st.tuples(st.integers(1, 96), st.integers(1, 96))


@settings(max_examples=60, deadline=None)
@given(shape=shapes, rank_frac=st.floats(0.0, 1.0), dtype=st.sampled_from([torch.float32, torch.float64]),
       seed=st.integers(0, 2**31), method=st.sampled_from([m for m in WEIGHT_ONLY if m not in ("soka", "sara")]))  # no B A
def test_residual_plus_product_is_weight(shape, rank_frac, dtype, seed, method) -> None:
    m, n = shape
    r = max(1, round(rank_frac * min(m, n)))
    W = torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    d = pissa.decompose(W, r, method=method, seed=seed)
    r = min(m, n) if METHODS[method].full_rank else r  # CLIP-SVD: every layer at its full rank
    assert d.A.shape == (r, n) and d.B.shape == (m, r) and d.residual.shape == (m, n)
    assert d.residual.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert torch.allclose(d.residual + d.B @ d.A, W, atol=tol * max(1.0, W.abs().max().item()))


@settings(max_examples=40, deadline=None)
@given(m=st.integers(8, 160), n=st.integers(8, 160), rank_frac=st.floats(0.0, 0.5),
       decay=st.floats(0.8, 0.999), seed=st.integers(0, 2**31))
def test_pissa_principal_part_is_optimal(m, n, rank_frac, decay, seed) -> None:
    """The default (block Krylov) residual is within 0.1% of the best rank-r residual."""
    W = decaying(m, n, decay, seed).float()
    r = max(1, round(rank_frac * min(m, n)))
    d = pissa.decompose(W, r, method="pissa", seed=seed)
    err = (W.double() - d.B.double() @ d.A.double()).norm().item()
    rounding = 16 * torch.finfo(torch.float32).eps * W.norm().item()  # float32 factors' own floor
    assert err <= 1.001 * optimal_residual(W, r) + rounding


def test_steep_spectrum_stays_optimal_in_float32() -> None:
    """Top-30 energy > 99.99%: in float32, T = Z Z^T squares the spectrum and blurred the small
    directions (1.005 x optimal); such matrices take the exact SVD (svd.LOW_PRECISION_TAIL)."""
    W = decaying(145, 139, 0.81, 1).float()
    d = pissa.decompose(W, 30, seed=1)
    err = (W.double() - d.B.double() @ d.A.double()).norm().item()
    assert err <= 1.001 * optimal_residual(W, 30) + 16 * torch.finfo(torch.float32).eps * W.norm().item()


@settings(max_examples=25, deadline=None)
@given(m=st.integers(90, 140), n=st.integers(90, 140), q=st.integers(0, 40), extra=st.integers(0, 2),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**31))
def test_krylov_handles_rank_deficient_weights(m, n, q, extra, dtype, seed) -> None:
    """W of rank q <= r (q = 0: all zeros) on the block Lanczos path (4 steps of 16 < min(m, n)):
    the Krylov space runs out of directions before the last step (float64), or the top r hold all
    the energy and the exact SVD takes over (float32, see svd.LOW_PRECISION_TAIL). Finite factors,
    exact residual + B A, and B A captures all of W."""
    r = min(q + extra + 1, 40)
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(m, q, generator=g, dtype=dtype) @ torch.randn(q, n, generator=g, dtype=dtype))
    d = pissa.decompose(W, r, seed=seed, niter=4)
    assert torch.isfinite(d.A).all() and torch.isfinite(d.B).all()
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert torch.allclose(d.residual + d.B @ d.A, W, atol=tol * max(1.0, W.abs().max().item()))
    assert d.residual.norm() <= (1e-4 if dtype == torch.float32 else 1e-8) * W.norm() + 1e-12


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_decompose_in_float32(dtype) -> None:
    W = torch.randn(64, 48).to(dtype)
    d = pissa.decompose(W, 8)
    assert d.A.dtype == torch.float32 and d.B.dtype == torch.float32 and d.residual.dtype == dtype
    # the only error is the cast of the residual back to the half dtype (eps 2^-8 or 2^-11)
    eps = torch.finfo(dtype).eps
    assert (d.residual.float() + d.B @ d.A - W.float()).abs().max() <= eps * W.float().abs().max()


def test_pissa_factors_are_balanced_singular_factors() -> None:
    W = decaying(50, 30, 0.9, 0)
    d = pissa.decompose(W, 5, svd="exact")
    U, S, Vh = torch.linalg.svd(W)
    # B^T B = A A^T = diag(S[:r]) for the sqrt(S) split
    assert torch.allclose(d.B.T @ d.B, torch.diag(S[:5]), atol=1e-10)
    assert torch.allclose(d.A @ d.A.T, torch.diag(S[:5]), atol=1e-10)


def test_lora_init_is_kaiming_uniform_and_zero() -> None:
    W = torch.randn(40, 100)
    d = pissa.decompose(W, 4, method="lora", seed=3)
    assert torch.count_nonzero(d.B) == 0 and torch.equal(d.residual, W)
    assert d.A.abs().max() <= 1 / 100**0.5 and d.A.std() > 0.5 / 100**0.5 / 3**0.5
    assert torch.equal(d.A, pissa.decompose(W, 4, method="lora", seed=3).A)
    assert not torch.equal(d.A, pissa.decompose(W, 4, method="lora", seed=4).A)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_krylov_matches_exact_svd_on_decaying_spectrum(dtype) -> None:
    """Singular values to 1e-4 (measured 5e-6: Krylov convergence, not the bf16 passes, limits
    them, as the last Rayleigh-Ritz step runs in full precision), orthonormal factors, and a
    residual within 0.1% of optimal."""
    W = decaying(300, 200, 0.97, 1).to(dtype)
    U, S, Vh = truncated_svd(W[None], 10, seeds=[0])
    _, S_exact, _ = truncated_svd(W[None], 10, method="exact")
    assert torch.allclose(S, S_exact, rtol=1e-4)
    eye = torch.eye(10, dtype=dtype)
    assert torch.allclose(U[0].mT @ U[0], eye, atol=1e-5) and torch.allclose(Vh[0] @ Vh[0].mT, eye, atol=1e-4)
    residual = (W - (U[0] * S[0]) @ Vh[0]).double().norm().item()
    assert residual <= 1.001 * optimal_residual(W, 10)


def test_batched_equals_single() -> None:
    """A matrix's factors do not depend on which other matrices share its batch."""
    Ws = torch.stack([decaying(120, 90, 0.95, s).float() for s in range(3)])
    U, S, Vh = truncated_svd(Ws, 6, seeds=[5, 6, 7])
    U1, S1, Vh1 = truncated_svd(Ws[1:2], 6, seeds=[6])
    assert torch.allclose(S[1], S1[0], rtol=1e-5)
    assert torch.allclose((U[1] * S[1]) @ Vh[1], (U1[0] * S1[0]) @ Vh1[0], atol=1e-5)


@pytest.mark.parametrize("m, n", [(300, 200), (200, 300)])  # tall (column norms from W * W) and wide
@pytest.mark.parametrize("as_tensor", [False, True])
def test_chunked_krylov_equals_one_batch(monkeypatch, m, n, as_tensor) -> None:
    """On the CPU the Krylov SVD takes a batch a few matrices at a time (svd.CHUNK_BYTES), each chunk converted
    into one reused buffer: the factors equal those of one chunk, and every residual is within 0.1% of the one
    from torch.linalg.svd."""
    Ws = [decaying(m, n, 0.95, s).float() for s in range(5)]
    batch = torch.stack(Ws) if as_tensor else Ws
    whole = truncated_svd(batch, 6, seeds=[0, 1, 2, 3, 4])  # 5 matrices of 120 kB in bf16: one chunk
    monkeypatch.setattr(svd, "CHUNK_BYTES", 2 * m * n * 2)  # two per chunk: 2, 2, 1
    U, S, Vh = truncated_svd(batch, 6, seeds=[0, 1, 2, 3, 4])
    for i, W in enumerate(Ws):
        assert torch.allclose((U[i] * S[i]) @ Vh[i], (whole[0][i] * whole[1][i]) @ whole[2][i], atol=1e-5)
        _, s_exact, _ = torch.linalg.svd(W.double())
        optimal = s_exact[6:].square().sum().sqrt().item()
        assert (W.double() - (U[i] * S[i]).double() @ Vh[i].double()).norm().item() <= 1.001 * optimal


@pytest.mark.parametrize("m, n", [(200, 60), (60, 200)])
def test_gram_path_is_optimal_without_lapack_svd(monkeypatch, m, n) -> None:
    """When the Krylov space would span the whole small side (4 steps of 16 >= 60), float32 weights take the Gram
    matrix's eigenvectors and a float32 Rayleigh-Ritz step (svd.gram_chunk), not LAPACK's SVD: every residual is
    within 0.1% of torch.linalg.svd's, the singular values agree to 1e-5, and the factors are orthonormal."""
    def no_lapack(*args, **kwargs):
        raise AssertionError("the exact SVD ran")

    Ws = torch.stack([decaying(m, n, 0.97, s).float() for s in range(3)])
    monkeypatch.setattr(svd, "exact_svd", no_lapack)
    U, S, Vh = truncated_svd(Ws, 10, seeds=[0, 1, 2])
    for i, W in enumerate(Ws):
        s_exact = torch.linalg.svdvals(W.double())
        assert torch.allclose(S[i].double(), s_exact[:10], rtol=1e-5)
        assert torch.allclose(U[i].mT @ U[i], torch.eye(10), atol=1e-5)
        assert torch.allclose(Vh[i] @ Vh[i].mT, torch.eye(10), atol=1e-5)
        residual = (W.double() - (U[i] * S[i]).double() @ Vh[i].double()).norm().item()
        assert residual <= 1.001 * s_exact[10:].square().sum().sqrt().item()


@pytest.mark.parametrize(
    "weight, rank, message",
    [
        (torch.randn(8, 6), 0, "choose 1 <= rank <= 6"),
        (torch.randn(8, 6), 7, "choose 1 <= rank <= 6"),
        (torch.randint(-5, 5, (8, 6), dtype=torch.int8), 2, "cannot be decomposed"),
        (torch.full((8, 6), float("nan")), 2, "NaN or Inf"),
        (torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), 1, "NaN or Inf"),
        (torch.randn(4, 3, 2), 1, "2-D"),
    ],
)
def test_bad_weights_are_refused(weight, rank, message) -> None:
    with pytest.raises(pissa.PissaError, match=message):
        pissa.decompose(weight, rank)


def test_unknown_method_is_refused() -> None:
    with pytest.raises(pissa.PissaError, match="unknown method 'dora'; choose one of"):
        pissa.decompose(torch.randn(4, 4), 2, method="dora")
