"""LOST's decomposition (pissa.methods.lost): exact rebuild with every channel, the rank-r truncation with none,
the channel rule, the layer's forward, and the channel-count option."""

from __future__ import annotations

import pytest
import torch

from pissa.errors import PissaError
from pissa.methods.lost import channel_count, lost_decompose, lost_forward, lost_weight, select_channels


def _weight(out: int = 40, inp: int = 24, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(0), dtype=dtype)


@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
def test_every_channel_rebuilds_w_exactly(shape) -> None:
    w = _weight(*shape)
    f = lost_decompose(w, rank=5, k=shape[1])
    assert f.index.tolist() == list(range(shape[1]))
    assert torch.allclose(lost_weight(f), w, rtol=0, atol=1e-12)


def test_no_channel_is_the_rank_r_truncation() -> None:
    w = _weight()
    f = lost_decompose(w, rank=6, k=0)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    truncation = u[:, :6] @ torch.diag(s[:6]) @ vh[:6]
    assert f.values.shape == (40, 0) and f.index.numel() == 0
    assert torch.allclose(lost_weight(f), truncation, rtol=0, atol=1e-12)
    assert torch.allclose(f.B.T @ f.B, f.A @ f.A.T, atol=1e-12)  # both carry sqrt(S): B^T B = A A^T = diag(S_r)


def test_sparse_part_is_the_residual_on_the_largest_norm_columns() -> None:
    w = _weight()
    f = lost_decompose(w, rank=4, k=7)
    residual = w - f.B @ f.A
    norms = residual.norm(dim=0)
    assert set(f.index.tolist()) == set(norms.topk(7).indices.tolist())
    assert torch.equal(f.index, f.index.sort().values)
    assert torch.allclose(f.values, residual[:, f.index], atol=1e-12)
    # the error is the norm of the columns left out, the least any 7 whole columns leave
    left = [j for j in range(24) if j not in f.index.tolist()]
    assert torch.allclose((w - lost_weight(f)).norm() ** 2, (norms[left] ** 2).sum(), atol=1e-10)


def test_select_channels_breaks_ties_towards_the_lower_index() -> None:
    r = torch.tensor([[1.0, 2.0, 2.0, 0.5, 2.0]])
    assert select_channels(r, 2).tolist() == [1, 2]
    assert select_channels(r, 0).tolist() == []


def test_forward_equals_x_times_the_rebuilt_weight() -> None:
    w = _weight(dtype=torch.float32)
    f = lost_decompose(w, rank=5, k=6)
    x = torch.randn(3, 7, 24, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(lost_forward(x, f), x @ lost_weight(f).T, atol=1e-5)
    low = lost_decompose(w, rank=5, k=0)
    assert torch.allclose(lost_forward(x, low), x @ (low.B @ low.A).T, atol=1e-5)
    assert f.B.dtype == torch.float32 and f.index.dtype == torch.int64


def test_channel_count_takes_a_fraction_or_a_count() -> None:
    assert channel_count(0.25, 64) == 16 and channel_count(0, 64) == 0 and channel_count(1.0, 64) == 64
    assert channel_count(1, 64) == 64  # 1 is the whole fraction
    assert channel_count(12, 64) == 12 and channel_count(12.0, 64) == 12
    for bad in (-0.1, 1.5, float("nan"), True):
        with pytest.raises(PissaError, match="`sparse_channels`"):
            channel_count(bad, 64)
    with pytest.raises(PissaError, match="more than the 64 input channels"):
        channel_count(65, 64)


def test_rank_must_be_below_the_smaller_side() -> None:
    with pytest.raises(PissaError, match="`rank` must be between 1 and 23"):
        lost_decompose(_weight(), rank=24, k=0)
    with pytest.raises(PissaError, match="`rank`"):
        lost_decompose(_weight(), rank=0, k=0)
