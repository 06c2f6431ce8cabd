"""Spectral diagnostics of a trained adapter: singular values before/after and intruder dimensions.

For a layer with base weight ``W (out, in)`` and trained update ``ΔW`` (:meth:`pissa.adapter.shapes.Shape.update`;
low-rank: ``s (B C A - B0 C0 A0)``), the fine-tuned weight is ``W' = W + ΔW``.

Intruder dimensions (Shuttleworth et al., 2024, "LoRA vs Full Fine-tuning: An Illusion of
Equivalence", arXiv 2410.21228, Algorithm 1): among the top-k left singular vectors ``u'_j`` of
W', those whose largest ``|cos(u'_j, u_i)|`` over *all* min(out, in) left singular vectors
``u_i`` of W is below a threshold (k = 10, threshold 0.5 by default). They are new high-ranking
directions that the base weight does not have. SVDs run in float64 (exact LAPACK).

Heavy-tail exponents (heavy-tailed self-regularization, Martin & Mahoney; WeightWatcher's alpha):
the power-law exponent alpha of the tail of a weight's empirical spectral density (ESD, the
eigenvalues ``sigma_i^2`` of ``W^T W``), fitted by :func:`hill_alpha`. The plain alpha depends on
the matrix's aspect ratio (a random 576 x 1536 and a 576 x 576 matrix have different ESDs); FARMS
(Hu et al., ICML 2025, arXiv 2506.06280: fixed-aspect-ratio matrix subsampling) fits the average
ESD of square submatrices instead (:func:`farms_eigenvalues`), which removes that bias.
``pissa analyze spectrum`` reports both, before and after fine-tuning.

``pissa analyze spectrum`` and ``pissa analyze intruders`` write a markdown table, a CSV and a
PNG plot into ``--out`` (replaced atomically).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from pissa.adapter.attach import adapted_layers
from pissa.adapter.base_layers import dense_weight
from pissa.adapter.save_load import load_adapter
from pissa.adapter.targets import matches
from pissa.analysis.config import IntrudersConfig, SpectrumConfig
from pissa.analysis.tables import Report, to_csv, to_markdown
from pissa.errors import PissaError
from pissa.files.adapter_dir import read_adapter_doc, recorded_base
from pissa.runtime import hub
from pissa.runtime.devices import resolve_device


def max_cosines(W_base: Tensor, W_tuned: Tensor, k: int = 10) -> Tensor:
    """``(min(k, rank),)``: for each of the top-k left singular vectors of ``W_tuned (out, in)``, its
    largest |cosine| with any left singular vector of ``W_base (out, in)`` (float64)."""
    U0 = torch.linalg.svd(W_base.double(), full_matrices=False).U
    Ut = torch.linalg.svd(W_tuned.double(), full_matrices=False).U[:, :k]
    return (U0.T @ Ut).abs().amax(dim=0)


def intruder_count(W_base: Tensor, W_tuned: Tensor, k: int = 10, threshold: float = 0.5) -> int:
    """Number of intruder dimensions: top-k singular vectors of W_tuned with max |cos| < threshold to all of W_base's."""
    return int((max_cosines(W_base, W_tuned, k) < threshold).sum())


MIN_TAIL = 10
"""Fewest eigenvalues a power-law tail fit may use."""
MAX_CANDIDATES = 256
"""At most this many evenly spaced xmin candidates are tried (bounds the fit at O(256 N))."""


def hill_alpha(eigenvalues: Tensor) -> float:
    """The power-law exponent of the tail of an ESD: for each candidate ``xmin = lam_i`` (ascending, at
    least :data:`MIN_TAIL` values from ``i`` on) the maximum-likelihood (Hill) estimate
    ``alpha_i = 1 + n_i / sum_{j >= i} log(lam_j / lam_i)``, keeping the one whose fitted CDF
    ``1 - (lam / xmin)^(1 - alpha)`` is closest to the empirical tail's in Kolmogorov-Smirnov
    distance (Clauset, Shalizi & Newman, 2009; WeightWatcher's and FARMS's fit), among at most
    :data:`MAX_CANDIDATES` evenly spaced candidates. Zero eigenvalues are left out; NaN with fewer than
    :data:`MIN_TAIL` positive ones."""
    lam = eigenvalues.double().flatten()
    lam = lam[lam > lam.max() * 1e-12].sort().values
    N = lam.numel()
    if N < MIN_TAIL:
        return float("nan")
    logs = lam.log()
    i = torch.linspace(0, N - MIN_TAIL, min(MAX_CANDIDATES, N - MIN_TAIL + 1)).round().long().unique()
    n = (N - i).double()
    tail_sums = logs.flip(0).cumsum(0).flip(0)[i]  # sum_{j >= i} log lam_j
    alpha = 1 + n / (tail_sums - n * logs[i]).clamp_min(1e-300)
    j = torch.arange(N)
    ratio = (logs[None, :] - logs[i, None]).exp()  # lam_j / lam_i, (candidates, N)
    fitted = 1 - ratio.pow(1 - alpha[:, None])
    empirical = (j[None, :] - i[:, None]).double() / n[:, None]
    ks = ((fitted - empirical).abs() * (j[None, :] >= i[:, None])).amax(1)
    return float(alpha[ks.argmin()])


FARMS_WINDOWS = 10
"""FARMS: square submatrices per dimension (evenly spaced, overlapping when needed)."""


def farms_eigenvalues(W: Tensor, windows: int = FARMS_WINDOWS) -> Tensor:
    """FARMS's averaged ESD of ``W (out, in)``: the squared singular values of up to ``windows`` square
    ``d x d`` submatrices (``d = min(out, in)``) evenly spaced along the long side, concatenated
    (aspect ratio 1 for every matrix; a square W is its own single window)."""
    d, D = min(W.shape), max(W.shape)
    M = W if W.shape[0] == d else W.T  # (d, D)
    count = min(windows, D - d + 1)
    starts = sorted({round(k * (D - d) / max(1, count - 1)) for k in range(count)})
    return torch.cat([torch.linalg.svdvals(M[:, s : s + d].double()).square() for s in starts])


@dataclass(frozen=True)
class LayerWeights:
    """One adapted layer: its base weight ``W (out, in)``, its trained update ``ΔW`` (float64) and the adapter rank."""

    name: str
    base: Tensor
    update: Tensor
    rank: int

    @property
    def tuned(self) -> Tensor:
        return self.base + self.update


def load_layers(model_name: str | None, adapter: str, patterns: list[str] | None, kind: str,
                device: torch.device | None = None) -> list[LayerWeights]:
    """Base weights and trained updates (float64, on ``device``; default: the CPU) of the adapter's
    layers matching ``patterns`` (all when None).

    Raises PissaError (before any work) for a bad adapter folder or patterns that match nothing.
    """
    doc = read_adapter_doc(adapter)
    names = list(doc["layers"])
    if patterns:
        names = [n for n in names if any(matches(n, p) for p in patterns)]
        if not names:
            raise PissaError(f"`layers` {' '.join(patterns)} matched none of the adapter's {len(doc['layers'])} layers "
                             f"(e.g. {next(iter(doc['layers']))})")
    model_name, kind, num_labels, dtype = recorded_base(adapter, model_name, kind)
    kind = hub.resolve_kind(model_name, kind)
    model, _ = hub.load_model(model_name, kind=kind, num_labels=num_labels if kind == "seq-cls" else None, dtype=dtype)
    base = {n: dense_weight(model.get_submodule(n)).detach().double().clone() for n in names}
    load_adapter(model, adapter)
    out = []
    for name, layer in adapted_layers(model):
        if name in base:
            update = layer.shape.update(layer.tensors(), layer.scaling)
            out.append(LayerWeights(name, base[name].to(device), update.to(device), layer.rank))
    return out


def spectrum(args: SpectrumConfig) -> Report:
    """``pissa analyze spectrum --adapter DIR``: singular values of W (before) and W + ΔW (after)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = load_layers(args.model, args.adapter, args.layers, args.kind, resolve_device(args.device))
    spectra = {}
    rows, csv_rows = [], []
    for lw in tqdm(layers, desc="spectra", unit="layer"):
        before, after = torch.linalg.svdvals(lw.base).cpu(), torch.linalg.svdvals(lw.tuned).cpu()
        spectra[lw.name] = (before, after)
        r = lw.rank
        rel = (lw.update.norm() / lw.base.norm()).item()
        alphas = [hill_alpha(before.square()), hill_alpha(after.square()),
                  hill_alpha(farms_eigenvalues(lw.base)), hill_alpha(farms_eigenvalues(lw.tuned))]
        rows.append([lw.name, before[0].item(), after[0].item(), before[r - 1].item(), after[r - 1].item(), rel, *alphas])
        csv_rows += [[lw.name, i + 1, b, a] for i, (b, a) in enumerate(zip(before.tolist(), after.tolist()))]
    header = ["layer", "σ1 before", "σ1 after", "σr before", "σr after", "‖ΔW‖/‖W‖",
              "α before", "α after", "α FARMS before", "α FARMS after"]
    md = (f"Singular values of W (before) and W + ΔW (after); r = {layers[0].rank}. α: power-law exponent of the "
          "spectral density's tail (eigenvalues σ², Hill estimate, xmin by minimum KS distance); α FARMS: the same "
          "fit on the average spectrum of square submatrices, free of the aspect ratio's bias.\n\n" + to_markdown(header, rows))
    step = max(1, len(layers) // args.plot_layers)
    shown = [lw.name for lw in layers][::step][: args.plot_layers]
    fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3), squeeze=False)
    for ax, name in zip(axes[0], shown):
        before, after = spectra[name]
        ax.semilogy(before.numpy(), "--", label="before")
        ax.semilogy(after.numpy(), label="after")
        ax.set_title(name.removeprefix("model.").removeprefix("layers."), fontsize=8)
        ax.set_xlabel("index")
    axes[0][0].set_ylabel("singular value")
    axes[0][0].legend()
    return Report("spectrum", md, to_csv(["layer", "index", "before", "after"], csv_rows), fig)


def intruders(args: IntrudersConfig) -> Report:
    """``pissa analyze intruders --adapter DIR``: intruder dimensions per layer (see the module docstring)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = load_layers(args.model, args.adapter, args.layers, args.kind, resolve_device(args.device))
    rows = []
    for lw in tqdm(layers, desc="intruders", unit="layer"):
        cos = max_cosines(lw.base, lw.tuned, args.k)
        rows.append([lw.name, int((cos < args.threshold).sum()), cos.min().item(), (lw.update.norm() / lw.base.norm()).item()])
    total = sum(r[1] for r in rows)
    hit = sum(1 for r in rows if r[1] > 0)
    summary = (
        f"Intruder dimensions (k = {args.k}, threshold {args.threshold}): {total} in total, "
        f"{hit} of {len(rows)} layers have at least one. \"min max cos\": the lowest, over the top-{args.k} "
        "singular vectors of W + ΔW, of their largest |cosine| with a singular vector of W.\n\n"
    )
    md = summary + to_markdown(["layer", "intruders", "min max cos", "‖ΔW‖/‖W‖"], rows)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.06 * len(rows)), 3))
    ax.bar(range(len(rows)), [r[1] for r in rows], width=0.9)
    ax.set_xlabel("adapted layer (module order)")
    ax.set_ylabel(f"intruders (of top {args.k})")
    ax.set_title(f"{Path(args.adapter).name}: {total} intruder dimensions", fontsize=9)
    return Report("intruders", md, to_csv(["layer", "intruders", "min_max_cos", "relative_update"], rows), fig)
